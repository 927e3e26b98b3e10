//! Asking a person (issue #17): a profile's `network.ask` and `filesystem.ask_exec` hold
//! the agent's `connect` or `execve` in the kernel until someone answers. These tests are
//! the person: they follow requests (`agentd approvals --follow --json`, a real client of
//! the daemon), answer them with `agentd approve`/`deny`, or type at the prompt on the
//! agent's own terminal, and check what then reached the loopback listeners the agents
//! connect to, what the kernel refused, the events and the audit log.
//!
//! The attacks: an agent answering its own request through the control socket; a thread
//! swapping the sockaddr while the call is held; a symlink retargeted after an exec was
//! approved; a flood of requests; unsigned, badly signed and well-signed approvals when
//! the profile requires signatures.

use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::Duration,
};

use agentd_tests::{
    AgentRun, DEFAULT_LIMITS, Daemon, NOBODY, agent_dir, agentd_bin, profile_file, require_root,
    test_profile,
};
use serde_json::Value;

const EPERM: i64 = libc::EPERM as i64;

/// A TCP listener on a loopback address that counts the connections that reached it.
struct Counted {
    port: u16,
    count: Arc<AtomicUsize>,
}

impl Counted {
    fn on(ip: &str) -> Counted {
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
    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

/// `agentd approvals --follow --json` against a daemon: the requests it sees, in order.
struct Follower {
    child: Child,
    held: mpsc::Receiver<Value>,
}

impl Follower {
    fn start(d: &Daemon) -> Follower {
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
    fn next(&self, limit: Duration) -> Value {
        self.held
            .recv_timeout(limit)
            .unwrap_or_else(|e| panic!("no request was held within {limit:?}: {e}"))
    }

    /// No request held within `limit`.
    fn none(&self, limit: Duration) {
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
fn ask_profile(name: &str, ask: &str, ask_exec: &str, ask_table: &str, breaker: &str) -> String {
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
fn person(d: &Daemon, args: &[&str]) -> (i32, String, String) {
    d.client(args)
}

fn approve(d: &Daemon, id: &str, extra: &[&str]) {
    let mut args = vec!["approve", id];
    args.extend_from_slice(extra);
    let (code, out, err) = person(d, &args);
    assert_eq!(code, 0, "approve {id}: {out}{err}");
}

fn deny(d: &Daemon, id: &str) {
    let (code, out, err) = person(d, &["deny", id, "--reason", "not now"]);
    assert_eq!(code, 0, "deny {id}: {out}{err}");
}

/// The agent: connects to 127.0.0.1:PORT once per step; a step `sN` sleeps N tenths of
/// a second first. Prints the errno of each connect (0: connected).
const CONNECTS: &str = r#"
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

fn run_in_daemon(d: &Daemon, profile: &Path, ws: &Path, script: &str, args: &[String]) -> Child {
    let mut cmd: Vec<&str> = vec!["/usr/bin/python3", "-c", script];
    cmd.extend(args.iter().map(String::as_str));
    d.run(profile, ws, &cmd)
}

fn finish(child: Child) -> (i32, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_out(out: &str, err: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: stdout {out:?}\nstderr {err}"))
}

fn approvals_of(events: &[Value], agent: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["kind"] == "approval" && e["agent"] == agent)
        .cloned()
        .collect()
}

fn agent_of(req: &Value) -> String {
    req["agent"].as_str().unwrap().to_owned()
}

#[test]
fn approve_once_deny_expire_grant_revoke_through_the_daemon() {
    if !require_root() {
        return;
    }
    let d = Daemon::start();
    let follower = Follower::start(&d);
    let l = Counted::on("127.0.0.1");
    let ws = agent_dir(false);
    let (_p, profile) = profile_file(&ask_profile(
        "ask-daemon",
        &format!("\"127.0.0.1/32:{}\"", l.port),
        "",
        "timeout = \"3s\"",
        "trip_on = [\"canary\"]",
    ));

    // 1. Once, then the same destination is held again; denied; expired.
    let args: Vec<String> = [l.port.to_string(), "s0".into(), "s0".into(), "s0".into()].into();
    let child = run_in_daemon(&d, &profile, ws.path(), CONNECTS, &args);
    let r1 = follower.next(Duration::from_secs(30));
    assert_eq!(r1["target"]["kind"], "connect", "{r1}");
    assert_eq!(r1["target"]["port"], l.port);
    assert!(
        r1["chain"][0]["cmdline"]
            .as_str()
            .unwrap()
            .contains("python3"),
        "{r1}"
    );
    assert_eq!(l.count(), 0, "nothing reached the listener while held");
    approve(&d, r1["id"].as_str().unwrap(), &["--once"]);
    let r2 = follower.next(Duration::from_secs(10));
    assert_ne!(r1["id"], r2["id"]);
    deny(&d, r2["id"].as_str().unwrap());
    let r3 = follower.next(Duration::from_secs(10));
    // r3 is left to expire (3 s).
    let (code, out, err) = finish(child);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(json_out(&out, &err), serde_json::json!([0, EPERM, EPERM]));
    assert_eq!(
        l.count(),
        1,
        "exactly the approved connection reached the listener"
    );
    let agent = agent_of(&r1);
    let events = d.events();
    let approvals = approvals_of(&events, &agent);
    assert_eq!(approvals.len(), 3, "{approvals:?}");
    assert_eq!(approvals[0]["verdict"], "allow");
    assert_eq!(approvals[0]["detail"]["scope"], "once");
    assert_eq!(approvals[1]["verdict"], "deny");
    assert_eq!(approvals[1]["detail"]["reason"], "not now");
    assert_eq!(approvals[2]["verdict"], "deny");
    assert_eq!(approvals[2]["detail"]["via"], "timeout");
    assert!(
        approvals[2]["detail"]["waited_ms"].as_u64().unwrap() >= 3000,
        "{:?}",
        approvals[2]
    );
    assert_eq!(r3["agent"], r1["agent"]);
    let asks = events
        .iter()
        .filter(|e| e["kind"] == "ask" && e["agent"] == agent)
        .count();
    assert_eq!(asks, 3);

    // 2. --for 2s: the next connect within it is not held, one after it is; --session
    // until revoked.
    let args: Vec<String> = [
        l.port.to_string(),
        "s0".into(),
        "s2".into(),
        "s35".into(),
        "s0".into(),
        "s2".into(),
        "s30".into(),
    ]
    .into();
    let before = l.count();
    let child = run_in_daemon(&d, &profile, ws.path(), CONNECTS, &args);
    let g1 = follower.next(Duration::from_secs(30));
    approve(&d, g1["id"].as_str().unwrap(), &["--for", "2s"]);
    let (code, out, err) = person(&d, &["grants", "--json"]);
    assert_eq!(code, 0, "{err}");
    let grants: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(grants.as_array().unwrap().len(), 1, "{grants}");
    assert_eq!(grants[0]["scope"]["for"], 2, "{grants}");
    // The second connect (0.2 s later) goes through without a request; the third, 3.5 s
    // later, is held again.
    let g2 = follower.next(Duration::from_secs(10));
    approve(&d, g2["id"].as_str().unwrap(), &["--session"]);
    follower.none(Duration::from_millis(500));
    let (code, out, _) = person(&d, &["grants", "--json"]);
    assert_eq!(code, 0);
    let grants: Value = serde_json::from_str(&out).unwrap();
    let session = grants
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["scope"] == "session")
        .unwrap_or_else(|| panic!("no session grant: {grants}"))
        .clone();
    let (code, out, err) = person(&d, &["revoke", session["id"].as_str().unwrap()]);
    assert_eq!(code, 0, "revoke: {out}{err}");
    let g3 = follower.next(Duration::from_secs(10));
    deny(&d, g3["id"].as_str().unwrap());
    let (code, out, err) = finish(child);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        json_out(&out, &err),
        serde_json::json!([0, 0, 0, 0, 0, EPERM])
    );
    assert_eq!(l.count() - before, 5);

    // 3. Every request and decision is in the audit log, which verifies.
    let verify = Command::new(agentd_bin())
        .args(["audit", "verify"])
        .arg(d.audit_log())
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let log = std::fs::read_to_string(d.audit_log()).unwrap();
    for action in [
        "\"action\":\"ask\"",
        "\"action\":\"approve\"",
        "\"action\":\"deny\"",
        "\"action\":\"revoke\"",
    ] {
        assert!(log.contains(action), "{action} is not in the audit log");
    }
}

#[test]
fn nobody_to_ask_is_a_denial_at_once_and_a_denial_can_trip_the_breaker() {
    if !require_root() {
        return;
    }
    let d = Daemon::start();
    let l = Counted::on("127.0.0.1");
    let ws = agent_dir(false);
    // No follower, no terminal: denied at once, in both modes.
    let (_p, profile) = profile_file(&ask_profile(
        "ask-nobody",
        &format!("\"127.0.0.1/32:{}\"", l.port),
        "",
        "timeout = \"30s\"",
        "trip_on = [\"canary\"]",
    ));
    let args: Vec<String> = [l.port.to_string(), "s0".into()].into();
    let (code, out, err) = finish(run_in_daemon(&d, &profile, ws.path(), CONNECTS, &args));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(json_out(&out, &err), serde_json::json!([EPERM]));
    let ev = d
        .events()
        .into_iter()
        .find(|e| e["kind"] == "approval")
        .expect("an approval event");
    assert_eq!(ev["verdict"], "deny");
    assert_eq!(ev["detail"]["via"], "no one to ask");

    // Embedded (no daemon at the default socket; stdin is not a terminal).
    let run = AgentRun::new(profile.to_str().unwrap(), ws.path()).cmd(&[
        "/usr/bin/python3",
        "-c",
        CONNECTS,
        &l.port.to_string(),
        "s0",
    ]);
    let r = run.run();
    assert_eq!(r.code(), 0, "{}", r.explain());
    assert_eq!(r.json(), serde_json::json!([EPERM]), "{}", r.explain());
    let ev = r.event("approval").expect("an approval event");
    assert_eq!(ev["detail"]["via"], "no one to ask", "{}", r.explain());
    assert_eq!(l.count(), 0);

    // A person's denial trips a breaker that trips on `denied`.
    let follower = Follower::start(&d);
    let (_p2, tripping) = profile_file(&ask_profile(
        "ask-trip",
        &format!("\"127.0.0.1/32:{}\"", l.port),
        "",
        "timeout = \"30s\"",
        "trip_on = [\"denied\"]",
    ));
    let args: Vec<String> = [l.port.to_string(), "s0".into(), "s0".into()].into();
    let child = run_in_daemon(&d, &tripping, ws.path(), CONNECTS, &args);
    let r = follower.next(Duration::from_secs(30));
    deny(&d, r["id"].as_str().unwrap());
    let (code, out, err) = finish(child);
    assert_eq!(code, 137, "the breaker killed the agent: {out}{err}");
    assert!(err.contains("denied"), "{err}");
    follower.none(Duration::from_millis(200));
}

/// The attack: the agent (running as its owner's uid, in the daemon's group) answers its
/// own request over the control socket.
const SELF_APPROVE: &str = r#"
import json, socket, sys, threading, time
port, sock = int(sys.argv[1]), sys.argv[2]
agent = [l for l in open("/proc/self/cgroup").read().split("/") if l.strip()][-1].strip()
res = {}
def held():
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port)); res["connect"] = 0
    except OSError as e:
        res["connect"] = e.errno
t = threading.Thread(target=held); t.start()
time.sleep(1.0)
c = socket.socket(socket.AF_UNIX)
c.connect(sock)
req = {"op": "decide", "request": f"r-{agent}-1", "answer": {"answer": "allow", "scope": "session"}}
c.sendall((json.dumps(req) + "\n").encode())
res["reply"] = c.makefile().readline().strip()
t.join()
print(json.dumps(res), flush=True)
"#;

#[test]
fn an_agent_cannot_answer_its_own_request() {
    if !require_root() {
        return;
    }
    // The daemon's group is the agent's (nobody's group): its uid alone would let it in.
    let d = Daemon::start_with_group("nogroup");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let follower = Follower::start(&d);
    let l = Counted::on("127.0.0.1");
    let ws = agent_dir(false);
    let socket = d.socket();
    let mut text = ask_profile(
        "ask-self",
        &format!("\"127.0.0.1/32:{}\"", l.port),
        "",
        "timeout = \"3s\"",
        "trip_on = [\"canary\"]",
    );
    text = text.replace(
        "bind = []",
        &format!("bind = []\nunix = [\"{}\"]", socket.display()),
    );
    let (_p, profile) = profile_file(&text);
    let args: Vec<String> = [l.port.to_string(), socket.display().to_string()].into();
    let child = run_in_daemon(&d, &profile, ws.path(), SELF_APPROVE, &args);
    let r = follower.next(Duration::from_secs(30));
    let (code, out, err) = finish(child);
    assert_eq!(code, 0, "{out}{err}");
    let res = json_out(&out, &err);
    let reply = res["reply"].as_str().unwrap();
    assert!(
        reply.contains("is a process of agent"),
        "the daemon must refuse: {reply}"
    );
    assert_eq!(res["connect"], EPERM, "the held call expired: {res}");
    assert_eq!(l.count(), 0);
    let agent = agent_of(&r);
    let events = d.events();
    let approvals = approvals_of(&events, &agent);
    assert!(
        approvals.iter().any(|e| e["verdict"] == "deny"
            && e["detail"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("inside an agent"))),
        "the attempt is an event: {approvals:?}"
    );
    assert!(
        approvals.iter().any(|e| e["detail"]["via"] == "timeout"),
        "{approvals:?}"
    );
}

/// The attack: a second thread swaps the held connect's sockaddr (127.0.0.1:P1, the one
/// asked about) for another (127.0.0.2:P2) before the person approves.
const SWAP_ADDR: &str = r#"
import ctypes, json, socket, struct, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
p1, p2 = int(sys.argv[1]), int(sys.argv[2])
buf = ctypes.create_string_buffer(16)
def fill(ip, port):
    struct.pack_into("=HH4s8x", buf, 0, socket.AF_INET, socket.htons(port), socket.inet_aton(ip))
fill("127.0.0.1", p1)
s = socket.socket()
res = {}
def go():
    r = libc.connect(s.fileno(), buf, 16)
    res["rc"] = r
    res["errno"] = ctypes.get_errno() if r != 0 else 0
t = threading.Thread(target=go); t.start()
time.sleep(1.0)
fill("127.0.0.2", p2)
t.join()
print(json.dumps(res), flush=True)
"#;

#[test]
fn a_swapped_address_or_program_never_gets_through() {
    if !require_root() {
        return;
    }
    let d = Daemon::start();
    let follower = Follower::start(&d);
    let asked = Counted::on("127.0.0.1");
    let other = Counted::on("127.0.0.2");
    let ws = agent_dir(true);
    let (_p, profile) = profile_file(&ask_profile(
        "ask-swap",
        &format!("\"127.0.0.1/32:{}\"", asked.port),
        "\"/usr/bin/env\"",
        "timeout = \"20s\"",
        "trip_on = [\"canary\"]",
    ));
    let args: Vec<String> = [asked.port.to_string(), other.port.to_string()].into();
    let child = run_in_daemon(&d, &profile, ws.path(), SWAP_ADDR, &args);
    let r = follower.next(Duration::from_secs(30));
    assert_eq!(r["target"]["addr"], "127.0.0.1", "{r}");
    // The swap happens 1 s after the call; approve after it.
    std::thread::sleep(Duration::from_millis(2000));
    approve(&d, r["id"].as_str().unwrap(), &["--once"]);
    let (code, out, err) = finish(child);
    assert_eq!(code, 0, "{out}{err}");
    let res = json_out(&out, &err);
    assert_eq!(
        res["errno"], EPERM,
        "the kernel refused the swapped address: {res}"
    );
    assert_eq!(other.count(), 0, "nothing reached the swapped-in address");
    assert_eq!(
        asked.count(),
        0,
        "the call did not go to the approved address either"
    );

    // Exec: approved once, the program runs; approved, then the symlink it named is
    // retargeted before the kernel resolves it: killed before its first instruction.
    let script = r#"
import json, os, sys, time
link = os.path.join(os.getcwd(), "prog")
os.symlink("/usr/bin/env", link)
out = {}
def run(swap):
    pid = os.fork()
    if pid == 0:
        os.execv(link, ["prog", "-i"])
    if swap:
        time.sleep(1.0)
        os.symlink("/usr/bin/id", link + ".new")
        os.replace(link + ".new", link)
    _, st = os.waitpid(pid, 0)
    return {"signal": os.WTERMSIG(st) if os.WIFSIGNALED(st) else 0,
            "code": os.WEXITSTATUS(st) if os.WIFEXITED(st) else None}
out["plain"] = run(False)
out["swapped"] = run(True)
print(json.dumps(out), flush=True)
"#;
    let child = run_in_daemon(&d, &profile, ws.path(), script, &[]);
    let e1 = follower.next(Duration::from_secs(30));
    assert_eq!(e1["target"]["kind"], "exec", "{e1}");
    assert_eq!(
        e1["target"]["path"], "/usr/bin/env",
        "the real program is shown: {e1}"
    );
    assert!(
        e1["target"]["named"].as_str().unwrap().ends_with("/prog"),
        "and the link the agent named: {e1}"
    );
    assert_eq!(
        e1["target"]["sha256"].as_str().unwrap().len(),
        64,
        "the program's hash is shown: {e1}"
    );
    approve(&d, e1["id"].as_str().unwrap(), &["--once"]);
    let e2 = follower.next(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(2000));
    approve(&d, e2["id"].as_str().unwrap(), &["--once"]);
    let (code, out, err) = finish(child);
    assert_eq!(code, 0, "{out}{err}");
    let res = json_out(&out, &err);
    assert_eq!(res["plain"]["code"], 0, "the approved program ran: {res}");
    assert_eq!(
        res["swapped"]["signal"], 9,
        "the swapped program was killed: {res}"
    );
    let agent = agent_of(&e1);
    let killed = d
        .events()
        .into_iter()
        .find(|e| e["kind"] == "exec" && e["agent"] == agent && e["verdict"] == "deny");
    let killed = killed.expect("a refused exec event");
    assert_eq!(killed["detail"]["reason"], "swapped", "{killed}");
}

#[test]
fn a_flood_of_requests_is_capped_and_counted() {
    if !require_root() {
        return;
    }
    let d = Daemon::start();
    let follower = Follower::start(&d);
    let l = Counted::on("127.0.0.1");
    let ws = agent_dir(false);
    let (_p, profile) = profile_file(&ask_profile(
        "ask-flood",
        &format!("\"127.0.0.1/32:{}\"", l.port),
        "",
        "timeout = \"2s\"\nmax_pending = 2",
        // Six denials would trip the default threshold: this test counts them.
        "trip_on = [\"canary\"]\nthreshold = 100\nwindow = \"10s\"",
    ));
    let script = r#"
import json, socket, sys, threading
port = int(sys.argv[1])
res = []
def go():
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port)); res.append(0)
    except OSError as e:
        res.append(e.errno)
ts = [threading.Thread(target=go) for _ in range(6)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps(sorted(res)), flush=True)
"#;
    let args: Vec<String> = [l.port.to_string()].into();
    let (code, out, err) = finish(run_in_daemon(&d, &profile, ws.path(), script, &args));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        json_out(&out, &err),
        serde_json::json!([EPERM, EPERM, EPERM, EPERM, EPERM, EPERM])
    );
    let r = follower.next(Duration::from_secs(5));
    let agent = agent_of(&r);
    let events = d.events();
    let approvals = approvals_of(&events, &agent);
    let by = |via: &str| {
        approvals
            .iter()
            .filter(|e| e["detail"]["via"] == via)
            .count()
    };
    assert_eq!(by("pending cap"), 4, "{approvals:?}");
    assert_eq!(by("timeout"), 2, "{approvals:?}");
    assert_eq!(l.count(), 0);
}

/// ssh-keygen, as the test's person uses it.
fn keygen(dir: &Path, name: &str) -> PathBuf {
    let key = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    key
}

#[test]
fn signed_approvals_are_required_verified_and_audited() {
    if !require_root() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let good = keygen(keys.path(), "alice");
    let stranger = keygen(keys.path(), "mallory");
    let public = std::fs::read_to_string(good.with_extension("pub")).unwrap();
    let signers = keys.path().join("allowed_signers");
    std::fs::write(
        &signers,
        format!("alice@example.org namespaces=\"agentd-approval\" {public}"),
    )
    .unwrap();
    let d = Daemon::start_with_args(&["--allowed-signers", signers.to_str().unwrap()]);
    let follower = Follower::start(&d);
    let l = Counted::on("127.0.0.1");
    let ws = agent_dir(false);
    let (_p, profile) = profile_file(&ask_profile(
        "ask-signed",
        &format!("\"127.0.0.1/32:{}\"", l.port),
        "",
        "timeout = \"20s\"\nrequire_signature = true",
        "trip_on = [\"canary\"]",
    ));
    let args: Vec<String> = [l.port.to_string(), "s0".into(), "s0".into()].into();
    let child = run_in_daemon(&d, &profile, ws.path(), CONNECTS, &args);
    let r1 = follower.next(Duration::from_secs(30));
    let id = r1["id"].as_str().unwrap();
    // Unsigned: refused.
    let (code, _, err) = person(&d, &["approve", id]);
    assert_ne!(code, 0);
    assert!(err.contains("needs a signed approval"), "{err}");
    // Signed by a key that is not an allowed signer: refused.
    let (code, _, err) = person(&d, &["approve", id, "--sign", stranger.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("does not verify"), "{err}");
    // Signed by alice, but over the message of another scope (a tampered approval):
    // refused.
    let (code, msg, err) = person(&d, &["approvals", "--message", id]);
    assert_eq!(code, 0, "{err}");
    let msg_path = keys.path().join("msg");
    std::fs::write(&msg_path, msg.replace("scope: once", "scope: session")).unwrap();
    let out = Command::new("ssh-keygen")
        .args(["-q", "-Y", "sign", "-n", "agentd-approval", "-f"])
        .arg(&good)
        .arg(&msg_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sig = msg_path.with_extension("sig");
    let (code, _, err) = person(
        &d,
        &[
            "approve",
            id,
            "--once",
            "--signature",
            sig.to_str().unwrap(),
        ],
    );
    assert_ne!(
        code, 0,
        "a signature over another scope must not approve once"
    );
    assert!(err.contains("does not verify"), "{err}");
    // The same signature for the scope it was made for is fine.
    let (code, out, err) = person(
        &d,
        &[
            "approve",
            id,
            "--session",
            "--signature",
            sig.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    // The session grant lets the second connect through.
    follower.none(Duration::from_millis(500));
    let (code, out, err) = finish(child);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(json_out(&out, &err), serde_json::json!([0, 0]));
    assert_eq!(l.count(), 2);
    let approval = d
        .events()
        .into_iter()
        .find(|e| e["kind"] == "approval" && e["verdict"] == "allow")
        .unwrap();
    assert_eq!(approval["detail"]["signed_by"], "alice@example.org");

    // The audit log carries the signature, and `audit verify` checks it.
    let verify = Command::new(agentd_bin())
        .args(["audit", "verify", "--allowed-signers"])
        .arg(&signers)
        .arg(d.audit_log())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(text.contains("1 signed decision"), "{text}");
}

#[test]
fn the_agents_terminal_prompts_in_both_modes() {
    if !require_root() {
        return;
    }
    let d = Daemon::start();
    let l = Counted::on("127.0.0.1");
    let ws = agent_dir(false);
    let (_p, profile) = profile_file(&ask_profile(
        "ask-tty",
        &format!("\"127.0.0.1/32:{}\"", l.port),
        "",
        "timeout = \"30s\"",
        "trip_on = [\"canary\"]",
    ));
    for through_daemon in [false, true] {
        let before = l.count();
        let pty = Pty::open();
        let screen = Screen::start(&pty);
        let socket = d.socket();
        let mut cmd = Command::new(agentd_bin());
        cmd.arg("run");
        if through_daemon {
            cmd.arg("--socket").arg(&socket);
        }
        cmd.arg("--profile")
            .arg(&profile)
            .arg("--workspace")
            .arg(ws.path())
            .args(["--", "/usr/bin/python3", "-c", CONNECTS])
            .arg(l.port.to_string())
            .args(["s0", "s0"]);
        let mut child = pty.spawn(cmd);
        let mode = if through_daemon { "daemon" } else { "embedded" };
        let at = screen.wait_for("allow? y = once", 0, mode);
        assert!(
            screen
                .text()
                .contains(&format!("wants: connect tcp 127.0.0.1:{}", l.port)),
            "{mode}: {}",
            screen.text()
        );
        // Keys within 400 ms of the prompt are not taken as answers.
        std::thread::sleep(Duration::from_millis(600));
        pty.type_keys(b"y");
        let at = screen.wait_for("allowed once", at, mode);
        let at = screen.wait_for("allow? y = once", at, mode);
        std::thread::sleep(Duration::from_millis(600));
        pty.type_keys(b"n");
        screen.wait_for("denied", at, mode);
        let st = child.wait().unwrap();
        assert!(st.success(), "{mode}: {st}\n{}", screen.text());
        let text = screen.text();
        assert!(
            text.contains(&format!("[0, {EPERM}]")),
            "{mode}: the agent's output came after the answers: {text}"
        );
        assert_eq!(l.count() - before, 1, "{mode}");
    }
}

/// A pseudo-terminal whose slave is the controlling terminal of `agentd run`.
struct Pty {
    master: std::os::fd::OwnedFd,
    slave: std::os::fd::OwnedFd,
}

impl Pty {
    fn open() -> Pty {
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

    fn spawn(&self, mut cmd: Command) -> Child {
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

    fn type_keys(&self, keys: &[u8]) {
        // SAFETY: writes `keys` to the master.
        let n = unsafe { libc::write(self.master.as_raw_fd(), keys.as_ptr().cast(), keys.len()) };
        assert_eq!(n, keys.len() as isize);
    }
}

#[derive(Clone)]
struct Screen(Arc<std::sync::Mutex<Vec<u8>>>);

impl Screen {
    fn start(pty: &Pty) -> Screen {
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
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    fn wait_for(&self, what: &str, from: usize, mode: &str) -> usize {
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

#[test]
fn embedded_events_carry_the_request_and_the_decision() {
    if !require_root() {
        return;
    }
    // An exec ask without a terminal (embedded): denied at once, EACCES, with the hash.
    let ws = agent_dir(false);
    let (_p, profile) = profile_file(&ask_profile(
        "ask-exec-embedded",
        "",
        "\"/usr/bin/env\"",
        "timeout = \"5s\"",
        "trip_on = [\"canary\"]",
    ));
    // Around the program too: its loader run directly (it would load the program without
    // an exec of it), and a script whose interpreter is the program.
    let scripts = agent_dir(false);
    let script_path = scripts.path().join("tool");
    std::fs::write(&script_path, "#!/usr/bin/env -i\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script_path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let text = std::fs::read_to_string(&profile).unwrap().replace(
        "exec = [\"/usr/bin/python3\"",
        &format!(
            "exec = [\"{}\", \"/usr/bin/python3\"",
            scripts.path().display()
        ),
    );
    std::fs::write(&profile, text).unwrap();
    let script = format!(
        r#"
import json, os
out = {{}}
for name, argv in [("direct", ["/usr/bin/env", "true"]),
                   ("loader", ["/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "/usr/bin/env", "-i"]),
                   ("script", ["{}"])]:
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(argv[0], argv)
        except OSError as e:
            os._exit(e.errno)
    _, st = os.waitpid(pid, 0)
    out[name] = os.WEXITSTATUS(st) if os.WIFEXITED(st) else -os.WTERMSIG(st)
print(json.dumps(out), flush=True)
"#,
        script_path.display()
    );
    let r = AgentRun::new(profile.to_str().unwrap(), ws.path())
        .python(&script)
        .run();
    assert_eq!(r.code(), 0, "{}", r.explain());
    let out = r.json();
    for case in ["direct", "loader", "script"] {
        assert_eq!(out[case], libc::EACCES, "{case}: {}", r.explain());
    }
    let asks: Vec<&Value> = r.events.iter().filter(|e| e["kind"] == "ask").collect();
    assert_eq!(asks.len(), 3, "{}", r.explain());
    let ask = asks[0];
    assert_eq!(ask["path"], "/usr/bin/env");
    assert!(
        asks[1]["path"].as_str().unwrap().contains("ld-linux"),
        "the loader is asked about: {}",
        asks[1]
    );
    assert_eq!(
        asks[2]["path"], "/usr/bin/env",
        "the script's interpreter: {}",
        asks[2]
    );
    assert!(
        r.events
            .iter()
            .any(|e| e["kind"] == "approval" && e["verdict"] == "deny"),
        "{}",
        r.explain()
    );
}
