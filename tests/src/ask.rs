//! What the ask tests share (`tests/ask.rs`, `tests/ask_flows.rs`): the person (a
//! follower of `agentd approvals`, `approve`, `deny`), loopback listeners that count what
//! reached them, the agents' scripts and profiles, and a pseudo-terminal to type at.

use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
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

use crate::{DEFAULT_LIMITS, Daemon, agentd_bin, test_profile};

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
