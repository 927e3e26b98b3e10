//! Asking a person (issue #17), the flows: the tests are the person. They follow requests
//! (`agentd approvals --follow --json`, a real client of the daemon), answer them with
//! `agentd approve`/`deny`, or type at the prompt on the agent's own terminal, and check
//! what reached the loopback listeners the agents connect to, the events and the audit log.
//! Also the attacks that are not the kernel's to stop: an agent answering its own request
//! through the control socket, a flood of requests, unsigned and badly signed approvals.
//! Host only (the kernel-side checks, in `ask.rs`, run in the guests too).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use agentd_tests::{
    AgentRun, Daemon, agent_dir, agentd_bin,
    ask::*,
    profile_file,
    pty::{Screen, openpty, spawn_on, type_keys},
    require_root,
};
use serde_json::Value;

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
    let log = d.audit_verified();
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
        let pty = openpty(40, 200);
        let screen = Screen::start(&pty.master);
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
        let mut child = spawn_on(&pty, cmd);
        let mode = if through_daemon { "daemon" } else { "embedded" };
        let at = screen.wait_for("allow? y = once", 0);
        assert!(
            screen
                .text()
                .contains(&format!("wants: connect tcp 127.0.0.1:{}", l.port)),
            "{mode}: {}",
            screen.text()
        );
        // Keys within 400 ms of the prompt are not taken as answers.
        std::thread::sleep(Duration::from_millis(600));
        type_keys(&pty.master, b"y");
        let at = screen.wait_for("allowed once", at);
        let at = screen.wait_for("allow? y = once", at);
        std::thread::sleep(Duration::from_millis(600));
        type_keys(&pty.master, b"n");
        screen.wait_for("denied", at);
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

/// The agent's process that connects exits (its parent reaps it) before its connection,
/// which the parent shares, sends a request; the parent waits for `go` in the workspace
/// and prints the reply. `peer` in the workspace: the pid of the process that connected.
const LEAVES_ITS_PID: &str = r#"
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
child = os.fork()
if child == 0:
    s.connect(sys.argv[1])
    os._exit(0)
os.waitpid(child, 0)
with open("peer.tmp", "w") as f:
    f.write(str(child))
os.rename("peer.tmp", "peer")
while not os.path.exists("go"):
    time.sleep(0.02)
s.sendall(b'{"op":"grants"}\n')
print(s.makefile().readline(), end="")
"#;

/// A process outside any agent given pid `pid` (the next pid the kernel hands out is set
/// through /proc/sys/kernel/ns_last_pid; another process may take it first: retried).
fn take_pid(pid: u32) -> std::process::Child {
    for _ in 0..200 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let mut child = Command::new("/bin/sleep").arg("60").spawn().unwrap();
        if child.id() == pid {
            return child;
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    panic!("could not get pid {pid} for a process outside the agent");
}

/// An agent's process connects, leaves the connection to another process of the agent and
/// exits; its pid goes to a process outside any agent; then the request comes. The daemon
/// must judge the process that connected (gone: inside an agent), not the pid's new owner.
#[test]
fn a_request_from_a_peer_whose_pid_went_to_a_process_outside_the_agent_is_refused() {
    if !require_root() {
        return;
    }
    // The daemon's group is the agent's (nobody's group): its uid alone would let it in.
    let d = Daemon::start_with_group("nogroup");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let ws = agent_dir(true);
    let socket = d.socket();
    let text = agentd_tests::test_profile("peer-pid", "invoker", agentd_tests::DEFAULT_LIMITS, "")
        .replace(
            "bind = []",
            &format!("bind = []\nunix = [\"{}\"]", socket.display()),
        );
    let (_p, profile) = profile_file(&text);
    let args: Vec<String> = [socket.display().to_string()].into();
    let child = run_in_daemon(&d, &profile, ws.path(), LEAVES_ITS_PID, &args);
    let peer = ws.path().join("peer");
    agentd_tests::wait_until(Duration::from_secs(30), "the agent's connection", || {
        peer.exists()
    });
    let pid: u32 = std::fs::read_to_string(&peer).unwrap().parse().unwrap();
    let mut outside = take_pid(pid);
    std::fs::write(ws.path().join("go"), "").unwrap();
    let (code, out, err) = finish(child);
    outside.kill().unwrap();
    outside.wait().unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let refused = format!(
        "permission denied: the caller (pid {pid}) is a process of agent unknown (the process that connected has exited)"
    );
    assert!(
        out.contains(&refused),
        "the daemon judged the pid's new owner: {out}{err}"
    );
}
