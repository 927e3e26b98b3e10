//! `agentd daemon`: a real daemon per test (its own socket, state directory, audit log and
//! bpffs pins), agents launched through it by `agentd run --socket`, and its clients.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::{net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agentd_tests::{
    AgentRun, DEFAULT_LIMITS, Daemon, TestUser, agent_dir, agentd_bin, finish, process_gone,
    profile_file, require_root, still_running, test_profile, wait_until,
};
use serde_json::Value;

/// The daemons' pin directories now present (`/sys/fs/bpf/agentd/*`).
fn pin_dirs() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/bpf/agentd")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect()
}

fn running<'a>(rows: &'a [Value], profile: &str) -> Option<&'a Value> {
    rows.iter()
        .find(|r| r["profile"] == profile && r["state"] == "running")
}

/// Two agents under different profiles through one daemon: `ps` lists both, `events`
/// has a denial of each, `kill` ends one and not the other; then the audit log verifies,
/// and fails naming the record after one line is edited.
#[test]
fn daemon_two_agents_ps_events_kill_and_the_audit_log() {
    if !require_root() {
        return;
    }
    let pins_before = pin_dirs();
    let mut d = Daemon::start();
    // A live subscriber from before the agents exist: `agentd events --follow --json`.
    let mut follower = Command::new(agentd_bin())
        .args(["events", "--follow", "--json", "--socket"])
        .arg(d.socket())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let follower_out = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(follower_out).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let ws_a = agent_dir(true);
    let ws_b = agent_dir(true);
    // Writable by the agent's user, granted by no profile: only Landlock refuses there
    // (under /etc the file's permissions would refuse first).
    let outside = agent_dir(true);
    let write_outside = format!(
        "echo a-up; while true; do echo x > {}/agentd-daemon-test 2>/dev/null; sleep 0.2; done",
        outside.path().display()
    );
    let (_pa, writer) = profile_file(&test_profile(
        "daemon-writer",
        "invoker",
        DEFAULT_LIMITS,
        "[breaker]\ntrip_on = [\"canary\"]\n",
    ));
    let (_pb, offline) = profile_file(
        &test_profile(
            "daemon-offline",
            "invoker",
            DEFAULT_LIMITS,
            "[breaker]\ntrip_on = [\"canary\"]\n",
        )
        .replace(
            "write = [\"{workspace}\", \"/dev/null\"]",
            "write = [\"/dev/null\"]",
        ),
    );
    // A: writes outside its workspace (refused by Landlock), B: connects (refused by the
    // cgroup program); both keep going until killed.
    let mut a = d.run(&writer, ws_a.path(), &["/bin/sh", "-c", &write_outside]);
    let mut b = d.run(
        &offline,
        ws_b.path(),
        &[
            "/usr/bin/python3",
            "-c",
            "import socket, time\nprint('b-up', flush=True)\nwhile True:\n    try:\n        socket.create_connection(('127.0.0.1', 9), timeout=1)\n    except OSError:\n        pass\n    time.sleep(0.2)",
        ],
    );
    wait_until(Duration::from_secs(120), "both agents running", || {
        still_running(&mut a, "A");
        still_running(&mut b, "B");
        let rows = d.ps();
        running(&rows, "daemon-writer").is_some() && running(&rows, "daemon-offline").is_some()
    });
    let rows = d.ps();
    let id_a = running(&rows, "daemon-writer").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let row_b = running(&rows, "daemon-offline").unwrap().clone();
    let id_b = row_b["id"].as_str().unwrap().to_owned();
    let pid_b = row_b["pid"].as_u64().unwrap() as u32;
    // The supervisor (the agent's parent, root) got only the profile's variables.
    let ppid = std::fs::read_to_string(format!("/proc/{pid_b}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("PPid:").map(|v| v.trim().to_owned()))
        .unwrap();
    // What the supervisor was started with (a supervisor started ahead of need was
    // started with the link's variables only, and was handed the rest with its launch).
    let environ = std::fs::read(format!("/proc/{ppid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    // The client is root under sudo's variables, which the daemon then honours.
    let uid = std::fs::read_to_string(format!("/proc/{pid_b}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
        })
        .unwrap();
    assert_eq!(uid, "65534", "the agent runs as the user SUDO_UID named");
    for var in ["LD_LIBRARY_PATH", "AGENTD_TEST_NOT_PASSED"] {
        assert!(
            !environ.contains(var),
            "{var} reached the supervisor: {environ}"
        );
    }
    for r in [running(&rows, "daemon-writer").unwrap(), &row_b] {
        assert!(r["pid"].as_u64().unwrap() > 0, "{r}");
        assert!(
            r["cgroup"]
                .as_str()
                .unwrap()
                .ends_with(r["id"].as_str().unwrap()),
            "{r}"
        );
        // The owner of a root request is the user SUDO_UID names, as for approvals and
        // the kill switch.
        assert_eq!(r["owner_uid"], 65534, "{r}");
    }
    wait_until(Duration::from_secs(120), "a denial of each agent", || {
        let evs = d.events();
        let denied = |id: &str, kind: &str, layer: &str| {
            evs.iter().any(|e| {
                e["agent"] == id
                    && e["kind"] == kind
                    && e["verdict"] == "deny"
                    && e["layer"] == layer
            })
        };
        denied(&id_a, "file_write", "landlock") && denied(&id_b, "net_connect", "bpf")
    });
    // The live stream carried a denial of each, as they happened.
    let mut seen_a = false;
    let mut seen_b = false;
    let streamed = Instant::now();
    while !(seen_a && seen_b) {
        assert!(
            streamed.elapsed() < Duration::from_secs(60),
            "events --follow: a denial of each agent (A {seen_a}, B {seen_b})"
        );
        let Ok(line) = lines_rx.recv_timeout(Duration::from_secs(1)) else {
            continue;
        };
        let e: Value = serde_json::from_str(&line).unwrap();
        if e["verdict"] == "deny" {
            seen_a |= e["agent"] == id_a.as_str() && e["kind"] == "file_write";
            seen_b |= e["agent"] == id_b.as_str() && e["kind"] == "net_connect";
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    // Filters.
    let (code, out, _) = d.client(&[
        "events",
        "--json",
        "--agent",
        &id_b,
        "--kind",
        "net_connect",
    ]);
    assert_eq!(code, 0);
    assert!(!out.is_empty());
    for l in out.lines() {
        let e: Value = serde_json::from_str(l).unwrap();
        assert_eq!(
            (e["agent"].as_str(), e["kind"].as_str()),
            (Some(id_b.as_str()), Some("net_connect"))
        );
    }

    // The kill switch ends A, not B.
    let (code, out, err) = d.client(&["kill", &id_a]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = finish(a);
    assert_eq!(code, 137, "A's agentd run: {out}{err}");
    assert!(
        out.contains("a-up"),
        "the agent's stdout is the client's: {out}"
    );
    assert!(err.contains("killed by the kill switch"), "{err}");
    std::thread::sleep(Duration::from_millis(500));
    let rows = d.ps();
    assert!(
        running(&rows, "daemon-offline").is_some(),
        "B survives: {rows:?}"
    );
    assert!(!process_gone(pid_b), "B's process is alive");
    let a_row = rows.iter().find(|r| r["id"] == id_a.as_str()).unwrap();
    assert_eq!(a_row["state"], "tripped", "{a_row}");
    let (code, _, _) = d.client(&["stats"]);
    assert_eq!(code, 0);

    // B ends on SIGTERM, forwarded by its client, as `agentd run` forwards it.
    // SAFETY: kill with a pid of our child and a signal number.
    unsafe { libc::kill(b.id() as i32, libc::SIGTERM) };
    let (code, out, err) = finish(b);
    assert_eq!(code, 128 + libc::SIGTERM, "B's agentd run: {out}{err}");
    assert!(process_gone(pid_b));

    // A hostile client gets an error and the daemon goes on.
    for garbage in [&b"{\"op\":\"launch\"}\n"[..], b"\xff\xfe\n", b"[1,2,3]\n"] {
        let mut s = UnixStream::connect(d.socket()).unwrap();
        s.write_all(garbage).unwrap();
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply).unwrap();
        assert!(reply.contains("\"error\""), "{reply}");
    }
    let mut s = UnixStream::connect(d.socket()).unwrap();
    s.write_all(&vec![b'a'; 70 * 1024]).unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.contains("longer than"), "{reply}");
    assert_eq!(d.client(&["ps"]).0, 0, "the daemon still serves");

    // A planned stop (SIGINT) with C running: C's client learns the daemon killed it, as
    // from the kill switch, not that its daemon died.
    let ws_c = agent_dir(true);
    let mut c = d.run(
        &writer,
        ws_c.path(),
        &["/bin/sh", "-c", "echo c-up; exec sleep 60"],
    );
    wait_until(Duration::from_secs(60), "C running", || {
        still_running(&mut c, "C");
        d.ps()
            .iter()
            .any(|r| r["state"] == "running" && r["id"] != id_a.as_str())
    });
    let stopping = Instant::now();
    d.stop();
    let stopped_in = stopping.elapsed();
    let (code, out, err) = finish(c);
    assert_eq!(code, 137, "C's agentd run: {out}{err}");
    assert!(
        err.contains("killed by the kill switch (the daemon is stopping)"),
        "{err}"
    );
    assert!(!err.contains("went away"), "{err}");
    assert!(stopped_in < Duration::from_secs(10), "{stopped_in:?}");
    // "stopped" is the daemon's last word, and the end of its event stream no news.
    let daemon_log = d.log();
    assert_eq!(
        daemon_log.lines().last(),
        Some("agentd daemon: stopped"),
        "{daemon_log}"
    );
    assert!(!daemon_log.contains("event stream ended"), "{daemon_log}");

    // The audit log: the launches, the kills (by uid 0) and the events, intact.
    // A stopped daemon leaves no pins behind.
    let left: Vec<PathBuf> = pin_dirs()
        .into_iter()
        .filter(|p| !pins_before.contains(p))
        .collect();
    assert!(left.is_empty(), "pins left: {left:?}");
    let log = d.audit_log();
    let verify = |path: &Path| {
        Command::new(agentd_bin())
            .args(["audit", "verify"])
            .arg(path)
            .output()
            .unwrap()
    };
    let out = verify(&log);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let kill = text
        .lines()
        .find(|l| l.contains("\"kind\":\"control\"") && l.contains("\"action\":\"kill\""))
        .expect("a control record of the kill");
    assert!(kill.contains(&id_a) && kill.contains("\"uid\":0"), "{kill}");
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("\"action\":\"launch\""))
            .count(),
        3
    );
    assert!(
        text.lines()
            .any(|l| l.contains("\"action\":\"kill\"") && l.contains("the daemon is stopping")),
        "the stop's kill of C is recorded"
    );
    // Edit one line (a digit of a pid in a middle record): verify names that record.
    let lines: Vec<&str> = text.lines().collect();
    let k = lines.len() / 2;
    let edited_line = lines[k].replacen("\"pid\":", "\"pid\":1", 1);
    assert_ne!(edited_line, lines[k]);
    let mut edited: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    edited[k] = edited_line;
    let copy = d.dir.path().join("edited.jsonl");
    std::fs::write(&copy, edited.join("\n") + "\n").unwrap();
    let out = verify(&copy);
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains(&format!("line {}", k + 1)),
        "verify names the edited record (line {}): {said}",
        k + 1
    );
}

/// The pin directory of a daemon whose `--state-dir` is `state` (as the daemon names it:
/// the first 6 bytes of the path's SHA-256).
fn pin_dir_of(state: &Path) -> PathBuf {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(state.as_os_str().as_encoded_bytes());
    let tag: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    Path::new("/sys/fs/bpf/agentd").join(tag)
}

/// A daemon that cannot start says why and leaves nothing behind: no pinned maps, no
/// control socket. What can be refused before the kernel watch is loaded (a port in use,
/// a socket's missing directory, a bad option) is, at once; a failure after the load
/// (a control socket path that is a directory) unpins what the start pinned.
#[test]
fn a_daemon_that_cannot_start_leaves_nothing_behind() {
    if !require_root() {
        return;
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let dir = tempfile::Builder::new()
        .prefix("agentd-daemon-test-")
        .tempdir()
        .unwrap();
    let missing = dir.path().join("missing/m.sock");
    let metrics_missing = format!("unix:{}", missing.display());
    let socket_dir = dir.path().join("a-directory");
    std::fs::create_dir_all(socket_dir.join("in-it")).unwrap();
    let socket = dir.path().join("agentd.sock");
    let cases: [(&[&str], &Path, &str, Duration); 4] = [
        (
            &["--metrics", &port],
            &socket,
            "another program listens there",
            Duration::from_secs(5),
        ),
        (
            &["--ui", "unix:/x"],
            &socket,
            "the web view listens on TCP",
            Duration::from_secs(5),
        ),
        (
            &["--metrics", &metrics_missing],
            &socket,
            "its directory must exist",
            Duration::from_secs(5),
        ),
        // Found only when the socket is bound, after the load.
        (&[], &socket_dir, "removing", Duration::from_secs(60)),
    ];
    for (i, (args, socket, says, bound)) in cases.into_iter().enumerate() {
        let state = dir.path().join(format!("state-{i}"));
        let started = Instant::now();
        let out = Command::new(agentd_bin())
            .arg("daemon")
            .arg("--socket")
            .arg(socket)
            .arg("--state-dir")
            .arg(&state)
            .arg("--audit-log")
            .arg(dir.path().join("audit.jsonl"))
            .arg("--group")
            .arg("agentd-test-no-such-group")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let took = started.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(took < bound, "{args:?}: {took:?}\n{err}");
        assert!(!err.contains("event stream ended"), "{args:?}: {err}");
        assert!(
            !pin_dir_of(&state).exists(),
            "{args:?}: {} left",
            pin_dir_of(&state).display()
        );
        assert!(!dir.path().join("agentd.sock").exists(), "{args:?}");
        assert!(!missing.exists() && !missing.parent().unwrap().exists());
    }
    assert!(
        socket_dir.join("in-it").exists(),
        "nothing of the user's removed"
    );
}

/// kill -9 of the daemon while an agent runs: the agent's network stays decided (its
/// programs are pinned), its supervisor kills it at once, and a restarted daemon reaps
/// what is left and unpins; the audit log still verifies.
#[test]
fn daemon_kill_9_and_restart_leave_no_agent_unwatched() {
    if !require_root() {
        return;
    }
    let mut d = Daemon::start();
    let ws = agent_dir(true);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_p, profile) = profile_file(&test_profile(
        "daemon-crash",
        "invoker",
        DEFAULT_LIMITS,
        "[breaker]\ntrip_on = [\"canary\"]\n",
    ));
    // Tries to connect every 20 ms and records each result in its workspace.
    let script = format!(
        "import socket, time\nprint('up', flush=True)\nwhile True:\n    try:\n        socket.create_connection(('127.0.0.1', {port}), timeout=1)\n        r = 'connected'\n    except OSError as e:\n        r = str(e.errno)\n    with open('log', 'a') as f:\n        f.write(r + '\\n')\n    time.sleep(0.02)"
    );
    let mut client = d.run(&profile, ws.path(), &["/usr/bin/python3", "-c", &script]);
    wait_until(Duration::from_secs(120), "the agent running", || {
        still_running(&mut client, "the agent");
        running(&d.ps(), "daemon-crash").is_some()
    });
    let row = running(&d.ps(), "daemon-crash").unwrap().clone();
    let id = row["id"].as_str().unwrap().to_owned();
    let pid = row["pid"].as_u64().unwrap() as u32;
    let cgroup = PathBuf::from(row["cgroup"].as_str().unwrap());
    let state_file = d.dir.path().join("state/agents").join(format!("{id}.json"));
    let record: Value = serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    let cgroup_id = record["cgroup_id"].as_u64().unwrap().to_string();
    // The agent's pinned cgroup programs: /sys/fs/bpf/agentd/<daemon>/<cgroup id>/.
    let pins = || -> Vec<PathBuf> {
        std::fs::read_dir("/sys/fs/bpf/agentd")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join(&cgroup_id))
            .filter(|p| p.is_dir())
            .collect()
    };
    assert_eq!(pins().len(), 1, "the agent's programs are pinned");
    // The agent is at work (python starts slowly under emulation).
    wait_until(
        Duration::from_secs(120),
        "the agent's first attempts",
        || {
            still_running(&mut client, "the agent");
            std::fs::read_to_string(ws.path().join("log")).is_ok_and(|l| l.lines().count() >= 3)
        },
    );

    let killed_at = Instant::now();
    // SAFETY: kill with our child's pid and SIGKILL.
    unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
    let _ = d.child.take().map(|mut c| c.wait());
    wait_until(
        Duration::from_secs(60),
        "the agent killed by its supervisor",
        || process_gone(pid),
    );
    let gone_after = killed_at.elapsed();
    let (code, _out, err) = finish(client);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("daemon went away"), "{err}");
    // Nothing reached the listener, before or after the daemon died.
    assert!(
        listener.accept().is_err(),
        "a connection got through while the daemon was down"
    );
    let log = std::fs::read_to_string(ws.path().join("log")).unwrap_or_default();
    assert!(!log.contains("connected"), "{log}");
    assert!(log.lines().count() > 0, "the agent ran before the kill");
    eprintln!("agent gone {gone_after:?} after the daemon's SIGKILL");
    // While no daemon runs, the network programs stay attached.
    assert_eq!(pins().len(), 1, "the pins outlive the daemon");

    // The restart reaps: the record, the pins and any cgroup left.
    d.spawn();
    let daemon_log = d.log();
    assert!(daemon_log.contains(&format!("reaped {id}")), "{daemon_log}");
    assert!(!state_file.exists());
    assert!(!cgroup.exists(), "{} left", cgroup.display());
    assert!(
        pins().is_empty(),
        "the restarted daemon unpinned the dead agent's programs"
    );
    d.stop();
    let text = d.audit_verified();
    assert!(
        text.lines().any(|l| l.contains("\"action\":\"kill\"")
            && l.contains(&id)
            && l.contains("left by a daemon that died")),
        "the reap is recorded"
    );
}

/// A user who is neither root nor in the daemon's group is refused, and told why.
/// Connects to `socket` (the connecting process exits and is reaped first when `leave`:
/// it connects in a child, on a socket it shares with its parent), then sends `request`;
/// returns the reply line.
const PEER: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
if sys.argv[2] == "leave":
    pid = os.fork()
    if pid == 0:
        s.connect(sys.argv[1])
        os._exit(0)
    os.waitpid(pid, 0)
else:
    s.connect(sys.argv[1])
s.sendall(sys.argv[3].encode() + b"\n")
print(s.makefile().readline(), end="")
"#;

#[test]
fn daemon_refuses_a_user_outside_its_group_and_a_peer_gone_before_its_request() {
    if !require_root() {
        return;
    }
    let d = Daemon::start();
    let out = Command::new(agentd_bin())
        .args(["ps", "--socket"])
        .arg(d.socket())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        err.contains("permission denied: uid 65534 is neither root nor in"),
        "{err}"
    );

    // A peer whose process left its connection to another and exited before the request:
    // its pid may be anyone's by then, so it counts as inside an agent (root or not).
    let peer = |how: &str| {
        let out = Command::new("/usr/bin/python3")
            .args(["-c", PEER])
            .arg(d.socket())
            .args([how, r#"{"op":"grants"}"#])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let reply = peer("stay");
    assert!(
        reply.contains("grants") && !reply.contains("permission denied"),
        "{reply}"
    );
    let reply = peer("leave");
    assert!(
        reply.contains("is a process of agent unknown (the process that connected has exited)"),
        "{reply}"
    );
}

/// A member of the daemon's group who is not root launches agents as itself or a transient
/// uid, never as another named user.
#[test]
fn daemon_group_members_launch_only_as_themselves() {
    use std::os::unix::fs::PermissionsExt as _;
    if !require_root() {
        return;
    }
    // nobody's primary group: nobody is a member.
    let group = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.get(2) == Some(&"65534")).then(|| f[0].to_owned())
        })
        .expect("a group with gid 65534 in /etc/group");
    let d = Daemon::start_with_group(&group);
    let ws = agent_dir(false);
    let profiles = agent_dir(false);
    let write = |name: &str, run_as: &str| {
        let path = profiles.path().join(format!("{name}.toml"));
        let text = match run_as {
            "invoker" | "transient" => test_profile(name, run_as, DEFAULT_LIMITS, ""),
            user => test_profile(name, "user", DEFAULT_LIMITS, "").replacen(
                "run_as = \"user\"",
                &format!("run_as = \"user\"\nuser = \"{user}\""),
                1,
            ),
        };
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        path
    };
    let as_daemon_user = write("as-daemon", "daemon");
    let as_invoker = write("as-invoker", "invoker");
    let run_as_nobody = |profile: &Path| {
        Command::new(agentd_bin())
            .arg("run")
            .arg("--socket")
            .arg(d.socket())
            .arg("--profile")
            .arg(profile)
            .arg("--workspace")
            .arg(ws.path())
            .args(["--", "/usr/bin/id", "-u"])
            .current_dir(ws.path())
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let out = run_as_nobody(&as_daemon_user);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("only root may launch an agent as another user"),
        "{err}"
    );
    let out = run_as_nobody(&as_invoker);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "65534");
}

/// `{home}` is the invoking user's (`SUDO_UID`'s) in both modes: a canary there trips
/// the breaker embedded and through the daemon, whose socket peer is root.
#[test]
fn home_canaries_watch_the_invoking_users_home_in_both_modes() {
    use std::os::unix::fs::PermissionsExt as _;
    if !require_root() {
        return;
    }
    let user = TestUser::get();
    let ssh = user.home.join(".ssh");
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _ssh = Remove(ssh.clone());
    std::fs::create_dir_all(&ssh).unwrap();
    let key = ssh.join("id_rsa");
    std::fs::write(&key, "not a real key\n").unwrap();
    for p in [&ssh, &key] {
        std::os::unix::fs::chown(p, Some(user.uid), Some(user.gid)).unwrap();
    }
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o700)).unwrap();
    let ws = agent_dir(true);
    let (_p, profile) = profile_file(
        &test_profile(
            "home-canary",
            "invoker",
            DEFAULT_LIMITS,
            "[breaker]\ntrip_on = [\"canary\"]\n",
        )
        .replace(
            "read = [\"{workspace}\",",
            "read = [\"{home}\", \"{workspace}\",",
        )
        .replace("[network]", "canaries = [\"{home}/.ssh\"]\n\n[network]"),
    );
    let mut d = Daemon::start();
    let socket = d.socket();
    for daemon in [false, true] {
        let mut run = AgentRun::new(profile.to_str().unwrap(), ws.path())
            .env("SUDO_UID", &user.uid.to_string())
            .env("SUDO_GID", &user.gid.to_string())
            .cmd(&["/bin/cat", key.to_str().unwrap()]);
        if daemon {
            run = run.arg("--socket").arg(socket.to_str().unwrap());
        }
        let run = run.run();
        let mode = if daemon { "daemon" } else { "embedded" };
        assert_eq!(run.code(), 137, "{mode}: killed\n{}", run.explain());
        assert!(
            !run.stdout().contains("not a real key"),
            "{mode}: the canary's contents never reach the agent\n{}",
            run.explain()
        );
        let canary = run
            .events
            .iter()
            .find(|e| e["kind"] == "canary")
            .unwrap_or_else(|| panic!("{mode}: a canary event\n{}", run.explain()));
        assert_eq!(canary["path"], key.to_str().unwrap(), "{mode}");
        assert!(
            run.events.iter().any(|e| e["kind"] == "breaker"),
            "{mode}: the breaker tripped\n{}",
            run.explain()
        );
    }
    d.stop();
}
