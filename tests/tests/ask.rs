//! Asking a person (issue #17), where the kernel decides: the approval of a held connect
//! or exec is a kernel map entry, and the kernel then checks what it really uses. These
//! run on every kernel (host and guests): a thread swapping the sockaddr after it was read,
//! a symbolic link retargeted after an exec was approved, the program's loader run
//! directly, a script whose interpreter is asked about. The flows through the daemon and
//! the terminal (`ask_flows.rs`) run on the host.

use std::time::Duration;

use agentd_tests::{AgentRun, Daemon, agent_dir, ask::*, profile_file, require_root};
use serde_json::Value;

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
