//! What the ask tests share (`tests/ask.rs`, `tests/ask_flows.rs`): the person (a
//! follower of `agentd approvals`, `approve`, `deny`), loopback listeners that count what
//! reached them, the agents' scripts and profiles, and a pseudo-terminal to type at.

use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    os::fd::AsRawFd as _,
    path::Path,
    process::{Child, ChildStdout, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::Duration,
};

use serde_json::Value;

use crate::{DEFAULT_LIMITS, Daemon, NOBODY, agentd_bin, test_profile};

pub const EPERM: i64 = libc::EPERM as i64;

/// A TCP listener on a loopback address that counts the connections that reached it.
pub struct Counted {
    pub port: u16,
    count: Arc<AtomicUsize>,
}

impl Counted {
    pub fn on(ip: &str) -> Counted {
        let l = TcpListener::bind((ip, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let count = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&count);
        std::thread::spawn(move || {
            for s in l.incoming() {
                if s.is_ok() {
                    c.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Counted { port, count }
    }
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

/// `agentd approvals --follow --json` against a daemon: the requests it sees, in order.
pub struct Follower {
    child: Child,
    held: mpsc::Receiver<Value>,
}

impl Follower {
    pub fn start(d: &Daemon) -> Follower {
        let mut child = Command::new(agentd_bin())
            .args(["approvals", "--follow", "--json", "--socket"])
            .arg(d.socket())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out: ChildStdout = child.stdout.take().unwrap();
        let (tx, held) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if let Some(r) = v.get("held") {
                    let _ = tx.send(r.clone());
                }
            }
        });
        // The daemon counts it as someone to ask once it has its first reply (the pending
        // list); give it that long.
        std::thread::sleep(Duration::from_millis(300));
        Follower { child, held }
    }

    /// The next held request (within `limit`).
    pub fn next(&self, limit: Duration) -> Value {
        self.held
            .recv_timeout(limit)
            .unwrap_or_else(|e| panic!("no request was held within {limit:?}: {e}"))
    }

    /// No request held within `limit`.
    pub fn none(&self, limit: Duration) {
        if let Ok(r) = self.held.recv_timeout(limit) {
            panic!("a request was held that should not have been: {r}");
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A profile asking about `ask` (network) and/or `ask_exec`, with `[ask]` and
/// `[breaker]` bodies.
pub fn ask_profile(
    name: &str,
    ask: &str,
    ask_exec: &str,
    ask_table: &str,
    breaker: &str,
) -> String {
    let mut p = test_profile(name, "invoker", DEFAULT_LIMITS, "");
    if !ask.is_empty() {
        p = p.replace("connect = []", &format!("connect = []\nask = [{ask}]"));
    }
    if !ask_exec.is_empty() {
        // The programs to ask about may not also be allowed outright.
        let python = std::fs::canonicalize("/usr/bin/python3").unwrap();
        p = p.replace(
            "exec = [\"/usr/bin\", \"/bin\", \"/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2\"]",
            &format!(
                "exec = [\"/usr/bin/python3\", \"{}\", \"/usr/bin/id\", \"/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2\"]\nask_exec = [{ask_exec}]",
                python.display()
            ),
        );
    }
    format!("{p}\n[ask]\n{ask_table}\n\n[breaker]\n{breaker}\n")
}

/// `agentd ARGS --socket S` as the person: (code, stdout, stderr).
pub fn person(d: &Daemon, args: &[&str]) -> (i32, String, String) {
    d.client(args)
}

pub fn approve(d: &Daemon, id: &str, extra: &[&str]) {
    let mut args = vec!["approve", id];
    args.extend_from_slice(extra);
    let (code, out, err) = person(d, &args);
    assert_eq!(code, 0, "approve {id}: {out}{err}");
}

pub fn deny(d: &Daemon, id: &str) {
    let (code, out, err) = person(d, &["deny", id, "--reason", "not now"]);
    assert_eq!(code, 0, "deny {id}: {out}{err}");
}

/// The agent: connects to 127.0.0.1:PORT once per step; a step `sN` sleeps N tenths of
/// a second first. Prints the errno of each connect (0: connected).
pub const CONNECTS: &str = r#"
import json, socket, sys, time
port = int(sys.argv[1])
res = []
for step in sys.argv[2:]:
    time.sleep(int(step[1:]) / 10)
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
        res.append(0)
    except OSError as e:
        res.append(e.errno)
    s.close()
print(json.dumps(res), flush=True)
"#;

pub fn run_in_daemon(
    d: &Daemon,
    profile: &Path,
    ws: &Path,
    script: &str,
    args: &[String],
) -> Child {
    let mut cmd: Vec<&str> = vec!["/usr/bin/python3", "-c", script];
    cmd.extend(args.iter().map(String::as_str));
    d.run(profile, ws, &cmd)
}

pub fn finish(child: Child) -> (i32, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn json_out(out: &str, err: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: stdout {out:?}\nstderr {err}"))
}

pub fn approvals_of(events: &[Value], agent: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["kind"] == "approval" && e["agent"] == agent)
        .cloned()
        .collect()
}

pub fn agent_of(req: &Value) -> String {
    req["agent"].as_str().unwrap().to_owned()
}

/// A pseudo-terminal whose slave is the controlling terminal of `agentd run`.
pub struct Pty {
    master: std::os::fd::OwnedFd,
    slave: std::os::fd::OwnedFd,
}

impl Pty {
    pub fn open() -> Pty {
        use std::os::fd::FromRawFd as _;
        let (mut m, mut s) = (0, 0);
        let ws = libc::winsize {
            ws_row: 40,
            ws_col: 200,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two fds; name and termios may be NULL; `ws` is valid.
        let rc =
            unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(rc, 0);
        // SAFETY: openpty returned two new fds that nothing else owns.
        unsafe {
            Pty {
                master: std::os::fd::OwnedFd::from_raw_fd(m),
                slave: std::os::fd::OwnedFd::from_raw_fd(s),
            }
        }
    }

    pub fn spawn(&self, mut cmd: Command) -> Child {
        use std::os::unix::process::CommandExt as _;
        let slave = self.slave.as_raw_fd();
        cmd.env("SUDO_UID", NOBODY)
            .env("SUDO_GID", NOBODY)
            .stdin(Stdio::from(self.slave.try_clone().unwrap()))
            .stdout(Stdio::from(self.slave.try_clone().unwrap()))
            .stderr(Stdio::from(self.slave.try_clone().unwrap()));
        // SAFETY: setsid and ioctl are async-signal-safe; run in the child before exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 || libc::ioctl(slave, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().unwrap()
    }

    pub fn type_keys(&self, keys: &[u8]) {
        // SAFETY: writes `keys` to the master.
        let n = unsafe { libc::write(self.master.as_raw_fd(), keys.as_ptr().cast(), keys.len()) };
        assert_eq!(n, keys.len() as isize);
    }
}

#[derive(Clone)]
pub struct Screen(Arc<std::sync::Mutex<Vec<u8>>>);

impl Screen {
    pub fn start(pty: &Pty) -> Screen {
        use std::io::Read as _;
        let text = Arc::new(std::sync::Mutex::new(Vec::new()));
        let into = Arc::clone(&text);
        let mut f = std::fs::File::from(pty.master.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    return;
                }
                into.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Screen(text)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    pub fn wait_for(&self, what: &str, from: usize, mode: &str) -> usize {
        let started = std::time::Instant::now();
        loop {
            let text = self.text();
            if let Some(at) = text.get(from.min(text.len())..).and_then(|t| t.find(what)) {
                return from + at + what.len();
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{mode}: timed out waiting for {what:?} on the screen:\n{text:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
