//! The circuit breaker, for real: agents that step out of scope are killed, whole trees
//! included; lesser violations trip only at the threshold; monitor mode never kills.

use std::{net::TcpListener, path::Path};

use agentd_tests::{
    AgentRun, DEFAULT_LIMITS, agent_dir, process_gone, profile_file, require_root, test_profile,
};

/// A test profile with a canary directory `{workspace}/secrets` and the given breaker.
fn profile(name: &str, limits: &str, breaker: &str) -> String {
    let base = test_profile(name, "invoker", limits, &format!("[breaker]\n{breaker}\n"));
    // Canaries belong in [filesystem]: insert after its exec line.
    base.replacen(
        "exec = [",
        "canaries = [\"{workspace}/secrets\"]\nexec = [",
        1,
    )
}

fn workspace_with_canary() -> tempfile::TempDir {
    let ws = agent_dir(true);
    let secrets = ws.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    std::fs::write(secrets.join("key"), "AKIA-canary\n").unwrap();
    // Readable by the agent's uid: the canary is a honeytoken it *can* open.
    std::process::Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&secrets)
        .status()
        .unwrap();
    ws
}

fn pids_in(file: &Path) -> Vec<u32> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

fn breaker_event(run: &agentd_tests::Run) -> &serde_json::Value {
    run.event("breaker")
        .unwrap_or_else(|| panic!("no breaker event\n{}", run.explain()))
}

#[test]
fn breaker_canary_kills_the_tree_including_a_setsid_grandchild() {
    if !require_root() {
        return;
    }
    let ws = workspace_with_canary();
    let (_p, path) = profile_file(&profile(
        "canary",
        DEFAULT_LIMITS,
        "trip_on = [\"canary\"]\naction = \"kill\"",
    ));
    let pidfile = ws.path().join("pids");
    let run = AgentRun::new(path.to_str().unwrap(), ws.path())
        .sh(&format!(
            "/usr/bin/setsid /bin/sh -c 'echo $$ >> {p}; exec /bin/sleep 300' & \
             /bin/sleep 0.3; /bin/cat \"$PWD/secrets/key\" >/dev/null; /bin/sleep 5; echo survived",
            p = pidfile.display()
        ))
        .run();
    assert_eq!(run.code(), 137, "{}", run.explain());
    assert!(!run.stdout().contains("survived"), "{}", run.explain());
    assert!(
        run.stderr()
            .contains("agentd: breaker tripped: trip_on:canary"),
        "{}",
        run.explain()
    );
    let b = breaker_event(&run);
    assert_eq!(b["verdict"], "killed");
    assert_eq!(b["detail"]["trigger"]["kind"], "canary");
    assert!(b["detail"]["contain_ns"].as_u64().unwrap() > 0, "{b}");
    let grandchild = pids_in(&pidfile);
    assert_eq!(
        grandchild.len(),
        1,
        "the grandchild wrote its pid\n{}",
        run.explain()
    );
    assert!(
        process_gone(grandchild[0]),
        "setsid grandchild {} survived",
        grandchild[0]
    );
}

/// The path an agent uses must not matter: relative, through `..`, or a symlink.
#[test]
fn breaker_canary_by_relative_or_indirect_path_trips() {
    if !require_root() {
        return;
    }
    for how in [
        "/bin/cat secrets/key",
        "cd secrets && /bin/cat ./key",
        "/bin/ln -s secrets/key link && /bin/cat link",
        "cd /tmp && /bin/cat \"$OLDPWD/secrets/../secrets/key\"",
    ] {
        let ws = workspace_with_canary();
        let (_p, path) = profile_file(&profile(
            "canary-rel",
            DEFAULT_LIMITS,
            "trip_on = [\"canary\"]",
        ));
        let run = AgentRun::new(path.to_str().unwrap(), ws.path())
            .sh(&format!("{how} >/dev/null; /bin/sleep 5; echo survived"))
            .run();
        assert_eq!(run.code(), 137, "{how}\n{}", run.explain());
        assert_eq!(
            breaker_event(&run)["detail"]["trigger"]["kind"],
            "canary",
            "{how}"
        );
    }
}

#[test]
fn breaker_exec_outside_exec_trips() {
    if !require_root() {
        return;
    }
    let ws = workspace_with_canary();
    std::fs::copy("/bin/true", ws.path().join("tool")).unwrap();
    let (_p, path) = profile_file(&profile("exec", DEFAULT_LIMITS, ""));
    let run = AgentRun::new(path.to_str().unwrap(), ws.path())
        .sh("\"$PWD/tool\"; /bin/sleep 5; echo survived")
        .run();
    assert_eq!(run.code(), 137, "{}", run.explain());
    let b = breaker_event(&run);
    assert_eq!(b["detail"]["rule"], "trip_on:exec");
    assert_eq!(b["detail"]["trigger"]["layer"], "landlock");
}

/// A relative exec by a process that exits at once must still be attributed to Landlock.
#[test]
fn breaker_relative_exec_outside_exec_trips() {
    if !require_root() {
        return;
    }
    let ws = workspace_with_canary();
    std::fs::copy("/bin/true", ws.path().join("tool")).unwrap();
    let (_p, path) = profile_file(&profile("exec-rel", DEFAULT_LIMITS, ""));
    let run = AgentRun::new(path.to_str().unwrap(), ws.path())
        .sh("./tool; /bin/sleep 5; echo survived")
        .run();
    assert_eq!(run.code(), 137, "{}", run.explain());
    assert_eq!(breaker_event(&run)["detail"]["rule"], "trip_on:exec");
}

#[test]
fn breaker_connect_outside_scope_trips() {
    if !require_root() {
        return;
    }
    let ws = workspace_with_canary();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // One rule (port 1); the connect is out of scope.
    let text = profile("connect", DEFAULT_LIMITS, "").replacen(
        "connect = []",
        "connect = [\"127.0.0.1/32:1\"]",
        1,
    );
    let (_p, path) = profile_file(&text);
    let run = AgentRun::new(path.to_str().unwrap(), ws.path())
        .python(&format!(
            "import socket, time\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\nexcept OSError as e:\n    print('refused', e.errno)\ntime.sleep(5)\nprint('survived')"
        ))
        .run();
    assert_eq!(run.code(), 137, "{}", run.explain());
    assert!(!run.stdout().contains("survived"), "{}", run.explain());
    let b = breaker_event(&run);
    assert_eq!(b["detail"]["rule"], "trip_on:connect");
    assert_eq!(b["detail"]["trigger"]["layer"], "bpf", "{b}");
    assert_eq!(b["detail"]["trigger"]["kind"], "net_connect");
}

/// Denied writes (outside `write`) are lesser violations: N-1 of them do nothing, the Nth
/// trips.
#[test]
fn breaker_threshold_trips_at_n_and_not_before() {
    if !require_root() {
        return;
    }
    let ws = workspace_with_canary();
    let (_p, path) = profile_file(&profile(
        "threshold",
        DEFAULT_LIMITS,
        "trip_on = [\"canary\"]\nthreshold = 5\nwindow = \"60s\"\naction = \"kill\"",
    ));
    // A directory the agent's user may write and the profile does not grant: Landlock
    // refuses there. (Under /etc the file's permissions would refuse first, which is not
    // a violation of the profile.)
    let outside = agent_dir(true);
    let writes = |n: usize| {
        format!(
            "for i in $(/usr/bin/seq {n}); do /usr/bin/touch {}/t-$i 2>/dev/null; done; /bin/sleep 0.5; echo done",
            outside.path().display()
        )
    };
    let below = AgentRun::new(path.to_str().unwrap(), ws.path())
        .sh(&writes(4))
        .run();
    assert_eq!(below.code(), 0, "{}", below.explain());
    assert!(below.event("breaker").is_none(), "{}", below.explain());
    let denied = below
        .events
        .iter()
        .filter(|e| e["kind"] == "file_write" && e["verdict"] == "deny")
        .count();
    assert_eq!(
        denied,
        4,
        "each refused write is an event\n{}",
        below.explain()
    );

    let at = AgentRun::new(path.to_str().unwrap(), ws.path())
        .sh(&writes(5))
        .run();
    assert_eq!(at.code(), 137, "{}", at.explain());
    let b = breaker_event(&at);
    assert_eq!(b["detail"]["rule"], "threshold:5/1m");
    assert_eq!(b["detail"]["violation"], "write");
    let before = at
        .events
        .iter()
        .take_while(|e| e["kind"] != "breaker")
        .filter(|e| e["kind"] == "file_write" && e["verdict"] == "deny")
        .count();
    assert_eq!(
        before,
        5,
        "the trip came with the 5th violation\n{}",
        at.explain()
    );
    assert!(!outside.path().join("t-1").exists());
    let perm = AgentRun::new(path.to_str().unwrap(), ws.path())
        .sh("for i in 1 2 3 4 5 6; do /usr/bin/touch /etc/agentd-breaker-test-$i 2>/dev/null; done; echo done")
        .run();
    assert_eq!(
        perm.code(),
        0,
        "refusals by file permissions do not count\n{}",
        perm.explain()
    );
    let by_permission = perm
        .events
        .iter()
        .filter(|e| e["kind"] == "file_write" && e["layer"] == "permission")
        .count();
    assert_eq!(by_permission, 6, "{}", perm.explain());
}

#[test]
fn breaker_monitor_mode_reports_and_never_kills() {
    if !require_root() {
        return;
    }
    let ws = workspace_with_canary();
    let text = profile(
        "monitor",
        DEFAULT_LIMITS,
        "trip_on = [\"canary\", \"connect\"]\naction = \"deny\"",
    )
    .replacen("description = ", "mode = \"monitor\"\ndescription = ", 1);
    let (_p, path) = profile_file(&text);
    let run = AgentRun::new(path.to_str().unwrap(), ws.path())
        .sh("/bin/cat \"$PWD/secrets/key\" >/dev/null; /bin/sleep 0.3; echo alive; exit 7")
        .run();
    assert_eq!(run.code(), 7, "the agent's own status\n{}", run.explain());
    assert!(run.stdout().contains("alive"));
    let b = breaker_event(&run);
    assert_eq!(b["detail"]["enforced"], false);
    assert_eq!(b["verdict"], "none");
    assert!(
        !run.stderr().contains("breaker tripped"),
        "{}",
        run.explain()
    );
}

/// 50 processes: 47 plain children, one that ignores SIGTERM, one double-forked `setsid`
/// daemon, and the shell itself. All gone after a trip; a process outside the agent is
/// untouched.
#[test]
fn breaker_kills_a_50_process_tree_and_nothing_outside() {
    if !require_root() {
        return;
    }
    let ws = workspace_with_canary();
    let mut outsider = std::process::Command::new("/bin/sleep")
        .arg("300")
        .spawn()
        .unwrap();
    let (_p, path) = profile_file(&profile("tree", "pids = 128", "trip_on = [\"canary\"]"));
    let pidfile = ws.path().join("pids");
    let p = pidfile.display();
    let script = format!(
        "echo $$ >> {p}\n\
         for i in $(/usr/bin/seq 47); do /bin/sleep 300 & echo $! >> {p}; done\n\
         /bin/sh -c 'trap \"\" TERM; echo $$ >> {p}; while :; do /bin/sleep 1; done' &\n\
         /bin/sh -c '/usr/bin/setsid /bin/sh -c \"echo \\$\\$ >> {p}; exec /bin/sleep 300\" &' \n\
         while [ $(/usr/bin/wc -l < {p}) -lt 50 ]; do /bin/sleep 0.1; done\n\
         /bin/cat \"$PWD/secrets/key\" > /dev/null; /bin/sleep 30"
    );
    let run = AgentRun::new(path.to_str().unwrap(), ws.path())
        .sh(&script)
        .run();
    assert_eq!(run.code(), 137, "{}", run.explain());
    let pids = pids_in(&pidfile);
    assert_eq!(pids.len(), 50, "{}", run.explain());
    let alive: Vec<u32> = pids.iter().copied().filter(|p| !process_gone(*p)).collect();
    assert!(alive.is_empty(), "survivors: {alive:?}");
    assert_eq!(
        outsider.try_wait().unwrap(),
        None,
        "a process outside the agent was signalled"
    );
    outsider.kill().unwrap();
    outsider.wait().unwrap();
}

/// A fork bomb runs into pids.max, then the breaker kills it.
#[test]
fn breaker_fork_bomb_is_held_by_pids_max_and_killed() {
    if !require_root() {
        return;
    }
    let ws = workspace_with_canary();
    let (_p, path) = profile_file(&profile("forkbomb", "pids = 24", "trip_on = [\"canary\"]"));
    let script = "import os, time\nn = 0\nwhile True:\n    try:\n        pid = os.fork()\n    except OSError as e:\n        print('fork failed after', n, e.errno, flush=True)\n        break\n    if pid == 0:\n        time.sleep(300)\n        os._exit(0)\n    n += 1\nopen(os.getcwd() + '/secrets/key').read()\ntime.sleep(30)\n";
    let run = AgentRun::new(path.to_str().unwrap(), ws.path())
        .python(script)
        .run();
    assert_eq!(run.code(), 137, "{}", run.explain());
    let out = run.stdout();
    let forked: usize = out
        .split_whitespace()
        .nth(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no fork count\n{}", run.explain()));
    assert!(
        forked < 24,
        "pids.max held the bomb at {forked}\n{}",
        run.explain()
    );
    assert!(
        out.contains(" 11"),
        "fork failed with EAGAIN\n{}",
        run.explain()
    );
    assert_eq!(breaker_event(&run)["detail"]["rule"], "trip_on:canary");
}

/// The incident: an agent asked only to analyze tries to post. Under the built-in
/// analyze-only profile its first attempt to reach the network stops it: the cgroup
/// program refuses the connect, and the breaker kills the agent for it.
#[test]
fn breaker_analyze_only_stops_an_agent_that_tries_to_post() {
    if !require_root() {
        return;
    }
    let ws = workspace_with_canary();
    let forum = TcpListener::bind("127.0.0.1:0").unwrap();
    forum.set_nonblocking(true).unwrap();
    let port = forum.local_addr().unwrap().port();
    let run = AgentRun::new("analyze-only", ws.path())
        .python(&format!(
            "import socket\nprint('analyzing', flush=True)\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'POST answer')\nprint('posted')"
        ))
        .run();
    assert_eq!(run.code(), 137, "{}", run.explain());
    assert!(run.stdout().contains("analyzing") && !run.stdout().contains("posted"));
    let b = breaker_event(&run);
    assert_eq!(b["detail"]["rule"], "trip_on:connect");
    assert_eq!(b["detail"]["trigger"]["kind"], "net_connect", "{b}");
    assert_eq!(b["detail"]["trigger"]["layer"], "bpf", "{b}");
    assert_eq!(b["detail"]["trigger"]["port"], port, "{b}");
    assert!(
        run.stderr()
            .contains("agentd: breaker tripped: trip_on:connect"),
        "{}",
        run.explain()
    );
    assert!(forum.accept().is_err(), "nothing reached the forum");
}

/// Starts `agentd run` in the background and returns it with its agent id, once started.
fn spawn_agent(
    script: &str,
) -> (
    std::process::Child,
    String,
    tempfile::TempDir,
    tempfile::TempDir,
    tempfile::TempDir,
) {
    let ws = workspace_with_canary();
    let (pdir, path) = profile_file(&profile("switch", DEFAULT_LIMITS, "trip_on = [\"canary\"]"));
    let edir = tempfile::tempdir().unwrap();
    let events = edir.path().join("events.jsonl");
    let child = AgentRun::new(path.to_str().unwrap(), ws.path())
        .sh(script)
        .command(&events)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Loading the programs takes seconds under emulation (the guests), more on a busy host.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let id = loop {
        let start = agentd_tests::read_events(&events)
            .into_iter()
            .find(|e| e["kind"] == "start")
            .and_then(|e| e["agent"].as_str().map(str::to_owned));
        // The registration is written right after the start event.
        if let Some(id) =
            start.filter(|id| Path::new(&format!("/run/agentd/agents/{id}.pid")).exists())
        {
            break id;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    (child, id, ws, pdir, edir)
}

#[test]
fn breaker_agentd_kill_is_the_manual_kill_switch() {
    if !require_root() {
        return;
    }
    let (child, id, ws, _p, edir) = spawn_agent(
        "/usr/bin/setsid /bin/sh -c 'echo $$ > grandchild.pid; exec /bin/sleep 300' & /bin/sleep 300",
    );
    let p = ws.path().join("grandchild.pid");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::read_to_string(&p).map_or(true, |s| s.trim().is_empty()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the grandchild did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = agentd_tests::agentd(&["kill", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", agentd_tests::stderr(&out));
    let run = child.wait_with_output().unwrap();
    assert_eq!(run.status.code(), Some(137));
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("killed by the kill switch (agentd kill)")
    );
    let grandchild: u32 = std::fs::read_to_string(&p).unwrap().trim().parse().unwrap();
    assert!(process_gone(grandchild), "setsid grandchild survived");
    let events = agentd_tests::read_events(&edir.path().join("events.jsonl"));
    let b = events
        .iter()
        .find(|e| e["kind"] == "breaker")
        .expect("breaker event");
    assert_eq!(b["detail"]["rule"], "manual");
    agentd_tests::assert_no_cgroup(&id);
    assert!(!Path::new(&format!("/run/agentd/agents/{id}.pid")).exists());
    let again = agentd_tests::agentd(&["kill", &id]);
    assert_eq!(again.status.code(), Some(1), "no such agent any more");
}

#[test]
fn breaker_interrupt_twice_kills_an_agent_that_ignores_sigint() {
    if !require_root() {
        return;
    }
    let (child, id, _ws, _p, _e) =
        spawn_agent("trap '' INT; /bin/sleep 300 & wait; /bin/sleep 300");
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(pid, libc::SIGINT) };
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let run = child.wait_with_output().unwrap();
    assert_eq!(
        run.status.code(),
        Some(137),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(String::from_utf8_lossy(&run.stderr).contains("interrupted twice"));
    agentd_tests::assert_no_cgroup(&id);
}
