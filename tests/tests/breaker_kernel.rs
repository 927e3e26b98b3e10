//! The breaker in the kernel: an immediate trip is decided in the violating system call, so
//! the violator never returns to user space and no other process of the agent completes a
//! later call; refusals the kernel cannot attribute are held (the process stopped) until
//! agentd does. Also: every refusal reported by the layer that really decided it.
//!
//! Privileged: run as root with `SUDO_UID` naming an unprivileged user, as `sudo` would.

use std::{net::TcpListener, path::Path};

use agentd_tests::{
    AgentRun, DEFAULT_LIMITS, Run, agent_dir, profile_file, require_root, test_profile,
};

/// A profile whose breaker kills at once on `trip_on`, with `extra` lines in
/// `[filesystem]` and a canary `{workspace}/secrets`.
fn profile(name: &str, trip_on: &str, fs_extra: &str) -> String {
    test_profile(
        name,
        "invoker",
        DEFAULT_LIMITS,
        &format!("[breaker]\ntrip_on = [{trip_on}]\naction = \"kill\"\n"),
    )
    .replacen(
        "exec = [",
        &format!("canaries = [\"{{workspace}}/secrets\"]\n{fs_extra}exec = ["),
        1,
    )
}

fn breaker_event(run: &Run) -> &serde_json::Value {
    run.event("breaker")
        .unwrap_or_else(|| panic!("no breaker event\n{}", run.explain()))
}

/// Events of `kind` refused by `layer`.
fn refusals<'a>(run: &'a Run, kind: &str, layer: &str) -> Vec<&'a serde_json::Value> {
    run.events
        .iter()
        .filter(|e| e["kind"] == kind && e["verdict"] == "deny" && e["layer"] == layer)
        .collect()
}

/// A directory granted by no rule, with `notes.txt` that everyone may read: only
/// Landlock refuses reading it.
fn readable_outside() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let outside = agent_dir(false);
    let notes = outside.path().join("notes.txt");
    std::fs::write(&notes, "x").unwrap();
    std::fs::set_permissions(&notes, std::fs::Permissions::from_mode(0o644)).unwrap();
    outside
}

/// A file in `ws` (granted for reading) that only root may read.
fn root_only(ws: &tempfile::TempDir) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let p = ws.path().join("root-only");
    std::fs::write(&p, "x").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn ws_with_secret() -> tempfile::TempDir {
    let ws = agent_dir(true);
    let secrets = ws.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    std::fs::write(secrets.join("key"), "AKIA-canary\n").unwrap();
    std::process::Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&secrets)
        .status()
        .unwrap();
    ws
}

/// The violator, busy in a loop, never returns from its refused connect: the marker it
/// writes after each attempt is never written. A second process of the agent, writing
/// CLOCK_MONOTONIC stamps as fast as it can, writes none later than the decision. A second
/// agent, busy at the same time, goes on.
#[test]
fn breaker_kernel_violator_never_returns_and_no_sibling_call_completes() {
    if !require_root() {
        return;
    }
    let ws = ws_with_secret();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_p, path) = profile_file(&profile("kernel-trip", "\"connect\"", ""));
    let script = format!(
        r#"
import os, socket, time
stamps = os.open("stamps", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
if os.fork() == 0:
    # The sibling: busy, one write system call per stamp.
    while True:
        os.write(stamps, b"%d\n" % time.monotonic_ns())
time.sleep(0.3)
n = 0
while True:
    n += 1
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=2)
    except OSError:
        pass
    # Never reached: the connect above is the violation.
    open("after-%d" % n, "w").close()
"#
    );
    // A second agent at work meanwhile: the kill gate is the tripped agent's alone.
    let other_ws = agent_dir(true);
    let (other_dir, other_profile) = profile_file(&profile("kernel-trip-other", "\"connect\"", ""));
    let mut other = AgentRun::new(other_profile.to_str().unwrap(), other_ws.path())
        .sh("while :; do echo x > busy; done")
        .command(&other_dir.path().join("events.jsonl"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let run = AgentRun::new(path.to_str().unwrap(), ws.path())
        .python(&script)
        .run();
    let other_alive = other.try_wait().unwrap().is_none();
    // SAFETY: kill takes a pid and a signal number; the pid is our child's (agentd run,
    // which forwards SIGTERM to its agent and cleans up).
    unsafe { libc::kill(other.id() as i32, libc::SIGTERM) };
    let _ = other.wait();
    assert!(other_alive, "the other agent was not spared");
    assert_eq!(run.code(), 137, "{}", run.explain());
    let b = breaker_event(&run);
    assert_eq!(b["detail"]["rule"], "trip_on:connect", "{b}");
    assert_eq!(
        b["detail"]["decided"], "kernel: the violating call never returned",
        "{b}"
    );
    let trigger = &b["detail"]["trigger"];
    assert_eq!(trigger["detail"]["tripped_in_kernel"], true, "{trigger}");
    assert!(
        !ws.path().join("after-1").exists(),
        "the violator returned from its connect\n{}",
        run.explain()
    );
    assert!(
        listener.accept().is_err(),
        "the connect reached the listener"
    );
    // The decision's time: the cgroup program set the kill flag before stamping the event.
    let decided = trigger["ktime_ns"].as_u64().expect("ktime_ns");
    let stamps = std::fs::read_to_string(ws.path().join("stamps")).unwrap();
    let stamps: Vec<u64> = stamps.lines().filter_map(|l| l.parse().ok()).collect();
    assert!(stamps.len() > 10, "the sibling was not busy: {stamps:?}");
    let late: Vec<&u64> = stamps.iter().filter(|&&t| t > decided).collect();
    assert!(
        late.is_empty(),
        "the sibling completed {} writes stamped after the decision ({decided}): {late:?}",
        late.len()
    );
}

/// Through the daemon, the sequence of a real agent that goes rogue: a refused post, then
/// an allowed write in its workspace (the "draft"). The write never happens.
#[test]
fn breaker_kernel_daemon_refused_post_then_write_never_happens() {
    if !require_root() {
        return;
    }
    let daemon = agentd_tests::Daemon::start();
    let ws = ws_with_secret();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_p, path) = profile_file(&profile("daemon-trip", "\"connect\"", ""));
    let script = format!(
        r#"
import socket
try:
    s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
    s.sendall(b"POST /answer")
except OSError:
    pass
open("draft.txt", "w").write("the answer")
print("posted")
"#
    );
    let run = AgentRun::new(path.to_str().unwrap(), ws.path())
        .env("AGENTD_SOCKET", daemon.socket().to_str().unwrap())
        .python(&script)
        .run();
    assert_eq!(run.code(), 137, "{}", run.explain());
    assert!(!run.stdout().contains("posted"), "{}", run.explain());
    assert!(
        !ws.path().join("draft.txt").exists(),
        "the write after the refused connect happened\n{}",
        run.explain()
    );
    assert!(listener.accept().is_err(), "the post reached the forum");
    let daemon_events = daemon.events();
    let b = daemon_events
        .iter()
        .find(|e| e["kind"] == "breaker")
        .unwrap_or_else(|| panic!("no breaker event from the daemon: {daemon_events:?}"));
    assert_eq!(
        b["detail"]["decided"], "kernel: the violating call never returned",
        "{b}"
    );
}

/// Refused reads are events with the layer that refused them: a file outside `read`
/// (Landlock), a directory listing outside `read` (Landlock), a file the agent's user
/// cannot read (the permissions); an `O_PATH` open of a canary is a canary.
#[test]
fn breaker_kernel_refused_reads_are_reported_by_their_layer() {
    if !require_root() {
        return;
    }
    let ws = ws_with_secret();
    let outside = readable_outside();
    // Inside a read rule (the workspace) but unreadable by the agent's user: the
    // permissions.
    let private = root_only(&ws);
    let private = private.to_str().unwrap();
    let (_p, path) = profile_file(&profile("reads", "\"exec\"", ""));
    let script = format!(
        r#"
import os
def attempt(name, f):
    try:
        f()
        print(name, "ok")
    except OSError as e:
        print(name, "errno", e.errno)
attempt("file", lambda: open("{o}/notes.txt").read())
attempt("list", lambda: os.listdir("{o}"))
attempt("perm", lambda: open("{private}").read())
attempt("opath", lambda: os.close(os.open("secrets/key", os.O_PATH)))
print("done")
"#,
        o = outside.path().display()
    );
    let run = AgentRun::new(path.to_str().unwrap(), ws.path())
        .python(&script)
        .run();
    assert_eq!(run.code(), 0, "{}", run.explain());
    let out = run.stdout();
    assert!(out.contains("file errno 13"), "{}", run.explain());
    assert!(out.contains("list errno 13"), "{}", run.explain());
    assert!(out.contains("perm errno 13"), "{}", run.explain());
    let landlock = refusals(&run, "file_read", "landlock");
    let notes = outside.path().join("notes.txt");
    assert!(
        landlock
            .iter()
            .any(|e| e["path"] == notes.to_str().unwrap()),
        "refused read of {}\n{}",
        notes.display(),
        run.explain()
    );
    assert!(
        landlock
            .iter()
            .any(|e| e["path"] == outside.path().to_str().unwrap()),
        "refused listing\n{}",
        run.explain()
    );
    assert!(
        refusals(&run, "file_read", "permission")
            .iter()
            .any(|e| e["path"] == private),
        "a read the file's mode refuses is the permission layer's\n{}",
        run.explain()
    );
    assert!(
        run.events.iter().any(|e| e["kind"] == "canary"
            && e["detail"]["flags"]
                .as_str()
                .unwrap_or("")
                .contains("O_PATH")),
        "an O_PATH open of a canary is a canary event\n{}",
        run.explain()
    );
}

/// `trip_on = ["read"]` fires: the reader is held in the kernel, agentd attributes the
/// refusal to Landlock and kills the agent; it never prints after the read.
#[test]
fn breaker_kernel_trip_on_read_trips() {
    if !require_root() {
        return;
    }
    let ws = ws_with_secret();
    let outside = readable_outside();
    let private = root_only(&ws);
    let (_p, path) = profile_file(&profile("trip-read", "\"read\"", ""));
    let run = AgentRun::new(path.to_str().unwrap(), ws.path())
        .python(&format!(
            "import time\ntry:\n    open('{}').read()\nexcept OSError:\n    print('private refused', flush=True)\ntry:\n    open('{}/notes.txt').read()\nexcept OSError:\n    print('after', flush=True)\ntime.sleep(3)\nprint('survived')",
            private.display(),
            outside.path().display()
        ))
        .run();
    assert_eq!(run.code(), 137, "{}", run.explain());
    let out = run.stdout();
    assert!(
        out.contains("private refused"),
        "a read refused by the file's permissions is no violation\n{}",
        run.explain()
    );
    assert!(!out.contains("after"), "{}", run.explain());
    let b = breaker_event(&run);
    assert_eq!(b["detail"]["rule"], "trip_on:read", "{b}");
    assert_eq!(b["detail"]["trigger"]["layer"], "landlock", "{b}");
    assert_eq!(b["detail"]["trigger"]["detail"]["held"], true, "{b}");
}

/// A PATH search through a directory the agent's user cannot enter is no exec violation
/// (the permissions refuse, before Landlock is asked); a real exec outside `exec` trips,
/// held in the kernel until agentd attributes it.
#[test]
fn breaker_kernel_path_search_is_not_an_exec_violation() {
    if !require_root() {
        return;
    }
    let ws = ws_with_secret();
    // Root's own, mode 0700: the agent's user cannot search it.
    let locked = tempfile::Builder::new()
        .prefix("agentd-locked-")
        .tempdir()
        .unwrap();
    std::fs::copy("/bin/true", locked.path().join("true")).unwrap();
    std::process::Command::new("chmod")
        .arg("0700")
        .arg(locked.path())
        .status()
        .unwrap();
    let (_p, path) = profile_file(&profile("path-search", "\"exec\"", ""));
    let search = AgentRun::new(path.to_str().unwrap(), ws.path())
        .env(
            "PATH",
            &format!("{}:/usr/bin:/bin", locked.path().display()),
        )
        .cmd(&["/usr/bin/env", "true"])
        .run();
    assert_eq!(search.code(), 0, "{}", search.explain());
    assert!(search.event("breaker").is_none(), "{}", search.explain());
    assert!(
        !refusals(&search, "exec", "permission").is_empty(),
        "the refused candidate is reported, by the permission layer\n{}",
        search.explain()
    );

    std::fs::copy("/bin/true", ws.path().join("tool")).unwrap();
    let real = AgentRun::new(path.to_str().unwrap(), ws.path())
        .sh("./tool; echo after")
        .run();
    assert_eq!(real.code(), 137, "{}", real.explain());
    assert!(!real.stdout().contains("after"), "{}", real.explain());
    let b = breaker_event(&real);
    assert_eq!(b["detail"]["rule"], "trip_on:exec", "{b}");
    assert_eq!(b["detail"]["trigger"]["layer"], "landlock", "{b}");
    assert_eq!(b["detail"]["trigger"]["detail"]["held"], true, "{b}");
}

/// A path granted by the profile that did not exist at launch is not granted (Landlock
/// could not open it): a refusal beneath it is Landlock's, and counts.
#[test]
fn breaker_kernel_grant_missing_at_launch_is_landlock() {
    if !require_root() {
        return;
    }
    let ws = ws_with_secret();
    let outside = agent_dir(true);
    let later = outside.path().join("later");
    let (_p, path) = profile_file(&profile("missing-grant", "\"canary\"", "").replacen(
        "write = [\"{workspace}\", \"/dev/null\"]",
        &format!(
            "write = [\"{{workspace}}\", \"/dev/null\", \"{}\"]",
            later.display()
        ),
        1,
    ));
    let later_s = later.display().to_string();
    let run = AgentRun::new(path.to_str().unwrap(), ws.path())
        .python(&format!(
            "import os, time\nopen('waiting', 'w').close()\nfor _ in range(600):\n    if os.path.isdir('{later_s}'):\n        break\n    time.sleep(0.05)\ntry:\n    open('{later_s}/f', 'w')\nexcept OSError as e:\n    print('errno', e.errno)"
        ));
    // Made after the launch, by someone else, writable by all.
    let child = run
        .command(&outside.path().join("events.jsonl"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the agent runs (its grants were settled at launch).
    let waiting = ws.path().join("waiting");
    let started = std::time::Instant::now();
    while !waiting.exists() && started.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Made whole, then put in place: the agent never sees it without its mode.
    let staging = outside.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    std::process::Command::new("chmod")
        .args(["777"])
        .arg(&staging)
        .status()
        .unwrap();
    std::fs::rename(&staging, &later).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let events = agentd_tests::read_events(&outside.path().join("events.jsonl"));
    assert!(stdout.contains("errno 13"), "{stdout}\n{events:?}");
    let f = later.join("f");
    let e = events
        .iter()
        .find(|e| e["kind"] == "file_write" && e["path"] == f.to_str().unwrap())
        .unwrap_or_else(|| panic!("no event for {}: {events:?}", f.display()));
    assert_eq!(e["layer"], "landlock", "{e}");
    assert_eq!(e["verdict"], "deny", "{e}");
}

/// An exec through `/proc/self/exe` and `/proc/self/fd/N` names the agent's file, not
/// agentd's. (Resolved through /proc while the process lives: the program run through
/// the fd sleeps a second.)
#[test]
fn breaker_kernel_proc_self_paths_name_the_agents_files() {
    if !require_root() {
        return;
    }
    let ws = ws_with_secret();
    let (_p, path) = profile_file(&profile("proc-self", "\"canary\"", ""));
    let run = AgentRun::new(path.to_str().unwrap(), ws.path())
        .python(
            "import os, sys\nif len(sys.argv) > 1:\n    print('again', sys.argv[1])\n    sys.exit(0)\nif os.fork() == 0:\n    os.execv('/proc/self/exe', ['python3', '-c', 'print(1)', 'exe'])\nos.wait()\nfd = os.open('/usr/bin/sleep', os.O_RDONLY)\nos.execv('/proc/self/fd/%d' % fd, ['sleep', '1'])",
        )
        .run();
    assert_eq!(run.code(), 0, "{}", run.explain());
    let python = std::fs::canonicalize("/usr/bin/python3").unwrap();
    let execs: Vec<&serde_json::Value> =
        run.events.iter().filter(|e| e["kind"] == "exec").collect();
    let named = |arg: &str, want: &Path| {
        execs.iter().any(|e| {
            e["detail"]["path_arg"]
                .as_str()
                .is_some_and(|p| p.starts_with(arg))
                && e["path"] == want.to_str().unwrap()
        })
    };
    assert!(
        named("/proc/self/exe", &python),
        "exec of /proc/self/exe names {}\n{}",
        python.display(),
        run.explain()
    );
    assert!(
        named("/proc/self/fd/", Path::new("/usr/bin/sleep")),
        "exec of /proc/self/fd/N names /usr/bin/sleep\n{}",
        run.explain()
    );
    let agentd = std::fs::canonicalize(agentd_tests::agentd_bin()).unwrap();
    assert!(
        !execs.iter().any(|e| e["path"] == agentd.to_str().unwrap()),
        "{}",
        run.explain()
    );
}

/// `--events` where the agent may write would let it edit its own record: refused before
/// the launch, naming the grant and where to put the file instead.
#[test]
fn breaker_kernel_events_file_in_the_agents_reach_is_refused() {
    if !require_root() {
        return;
    }
    let ws = ws_with_secret();
    let (_p, path) = profile_file(&profile("events-reach", "\"canary\"", ""));
    let events = ws.path().join("events.jsonl");
    let mut c = AgentRun::new(path.to_str().unwrap(), ws.path())
        .cmd(&["/bin/true"])
        .command(&events);
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("could edit its own record"), "{err}");
    assert!(err.contains(ws.path().to_str().unwrap()), "{err}");
    assert!(
        !events.exists(),
        "nothing is created where the agent could edit it"
    );
}

/// A signal refused to a process outside the agent is an event with the layer that
/// refused it: a process of the agent's own user outside its domain (Landlock's signal
/// scoping, ABI 6), and root's init (the permission check).
#[test]
fn breaker_kernel_refused_signals_are_reported_by_their_layer() {
    if !require_root() {
        return;
    }
    use std::os::unix::process::CommandExt as _;
    let ws = ws_with_secret();
    // A process of the agent's user (nobody), outside the agent.
    let mut neighbour = std::process::Command::new("/bin/sleep")
        .arg("30")
        .uid(65534)
        .gid(65534)
        .spawn()
        .unwrap();
    let (_p, path) = profile_file(&profile("signals", "\"canary\"", ""));
    let script = format!(
        "import os\nfor pid in ({}, 1):\n    try:\n        os.kill(pid, 0)\n        print(pid, 'ok')\n    except OSError as e:\n        print(pid, 'errno', e.errno)",
        neighbour.id()
    );
    let run = AgentRun::new(path.to_str().unwrap(), ws.path())
        .python(&script)
        .run();
    let _ = neighbour.kill();
    let _ = neighbour.wait();
    assert_eq!(run.code(), 0, "{}", run.explain());
    let signals: Vec<&serde_json::Value> = run
        .events
        .iter()
        .filter(|e| e["kind"] == "process_signal")
        .collect();
    let of = |pid: u32| signals.iter().find(|e| e["detail"]["target"] == pid);
    let init =
        of(1).unwrap_or_else(|| panic!("no event for the signal to init\n{}", run.explain()));
    assert_eq!(init["layer"], "permission", "{init}");
    assert_eq!(init["errno"], libc_eperm(), "{init}");
    if agentd_tests::landlock_abi() >= 6 {
        assert!(
            run.stdout()
                .contains(&format!("{} errno 1", neighbour.id())),
            "{}",
            run.explain()
        );
        let n = of(neighbour.id())
            .unwrap_or_else(|| panic!("no event for the scoped signal\n{}", run.explain()));
        assert_eq!(n["layer"], "landlock", "{n}");
    } else {
        // No signal scoping below ABI 6: the signal goes through, and is no refusal.
        assert!(
            run.stdout().contains(&format!("{} ok", neighbour.id())),
            "{}",
            run.explain()
        );
        assert!(of(neighbour.id()).is_none(), "{}", run.explain());
    }
}

fn libc_eperm() -> i32 {
    1
}

/// A loop of one refusal is recorded as the first event and one summary per window with
/// the count: nothing is dropped (every attempt is counted), the record stays readable.
#[test]
fn breaker_kernel_a_burst_of_one_refusal_is_folded_and_counted() {
    if !require_root() {
        return;
    }
    let ws = ws_with_secret();
    let outside = agent_dir(true);
    let target = outside.path().join("x");
    let (_p, path) = profile_file(&profile("bursts", "\"canary\"", ""));
    let run = AgentRun::new(path.to_str().unwrap(), ws.path())
        .python(&format!(
            "n = 0\nfor _ in range(300):\n    try:\n        open('{}', 'w')\n    except OSError:\n        n += 1\nprint(n)",
            target.display()
        ))
        .run();
    assert_eq!(run.code(), 0, "{}", run.explain());
    assert_eq!(run.stdout().trim(), "300", "{}", run.explain());
    let records: Vec<&serde_json::Value> = run
        .events
        .iter()
        .filter(|e| e["kind"] == "file_write" && e["path"] == target.to_str().unwrap())
        .collect();
    // The first of a window is recorded as it is; its summary counts the repeats.
    let counted = agentd_tests::counted(records.iter().copied());
    assert_eq!(counted, 300, "every refusal is counted\n{}", run.explain());
    // Two records per window of a second at most (slow guests take several).
    assert!(
        records.len() < 60,
        "folded into a few records, not {}",
        records.len()
    );
}

/// `agentd run` reports what happened: when the agent had already exited on its own when
/// the breaker acted (a trip decided in user space, on a violation made just before the
/// exit), its own status and a late trip; 137 only when the kill reached it.
#[test]
fn breaker_kernel_exit_status_says_who_ended_the_agent() {
    if !require_root() {
        return;
    }
    let ws = ws_with_secret();
    let outside = agent_dir(true);
    // A threshold of one refused write, decided by agentd from the event.
    let text = test_profile(
        "late-trip",
        "invoker",
        DEFAULT_LIMITS,
        "[breaker]\ntrip_on = []\nthreshold = 1\nwindow = \"60s\"\naction = \"kill\"\n",
    );
    let (_p, path) = profile_file(&text);
    let run = AgentRun::new(path.to_str().unwrap(), ws.path())
        .sh(&format!(
            "echo > {}/x 2>/dev/null; exit 3",
            outside.path().display()
        ))
        .run();
    let exit = run
        .event("exit")
        .unwrap_or_else(|| panic!("no exit event\n{}", run.explain()));
    assert!(run.event("breaker").is_some(), "{}", run.explain());
    match run.code() {
        3 => {
            assert!(exit["detail"]["late_trip"].is_string(), "{}", run.explain());
            assert!(
                run.stderr().contains("had already exited (status 3)"),
                "{}",
                run.explain()
            );
            eprintln!("the agent exited first: its status, and a late trip");
        }
        137 => {
            assert_eq!(exit["detail"]["signal"], 9, "{}", run.explain());
            eprintln!("the kill reached the agent first: 137");
        }
        other => panic!("exit {other}\n{}", run.explain()),
    }
}
