//! `agentd run` from the outside: exit codes, events, identities, limits, signals,
//! `--dry-run`, and that nothing of the agent (processes, cgroups) outlives the run.

use std::{
    io::BufRead as _,
    os::unix::fs::PermissionsExt as _,
    time::{Duration, Instant},
};

use agentd_tests::{
    AgentRun, DEFAULT_LIMITS, agent_dir, agentd, assert_no_cgroup, cgroups_named, landlock_abi,
    landlock_missing_below, process_gone, profile_file, read_events, require_root, stderr, stdout,
    test_profile,
};

#[test]
fn run_exit_codes() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let code = |r: AgentRun| {
        let run = r.run();
        (run.code(), run)
    };
    let base = || AgentRun::new("analyze-only", ws.path());
    assert_eq!(code(base().sh("exit 0")).0, 0);
    assert_eq!(code(base().sh("exit 3")).0, 3);
    assert_eq!(code(base().sh("kill -9 $$")).0, 128 + 9);
    assert_eq!(code(base().sh("kill -TERM $$")).0, 128 + 15);

    let (c, run) = code(base().cmd(&["agentd-no-such-command"]));
    assert_eq!(c, 127, "{}", run.explain());
    assert!(
        run.stderr().contains("command not found"),
        "{}",
        run.explain()
    );
    let lf = run.event("launch_failed").expect("launch_failed event");
    assert_eq!(lf["detail"]["step"], "command");

    // a program outside filesystem.exec (analyze-only runs nothing from the workspace):
    // refused before fork, naming the key
    let copy = ws.path().join("true-copy");
    std::fs::copy("/bin/true", &copy).unwrap();
    let (c, run) = code(base().cmd(&[copy.to_str().unwrap()]));
    assert_eq!(c, 125, "{}", run.explain());
    assert!(
        run.stderr().contains("filesystem.exec"),
        "{}",
        run.explain()
    );

    // a bad profile
    let (_p, bad) = profile_file("[agent]\nname = \"x\"\nbogus = true\n");
    let (c, run) = code(AgentRun::new(bad.to_str().unwrap(), ws.path()).sh("true"));
    assert_eq!(c, 125, "{}", run.explain());
    assert_eq!(
        run.stderr().lines().count(),
        1,
        "one line: {}",
        run.stderr()
    );
    assert!(run.stderr().starts_with("agentd: cannot launch: profile: "));
}

#[test]
fn run_events_have_start_and_exit() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let run = AgentRun::new("analyze-only", ws.path()).sh("exit 7").run();
    assert_eq!(run.code(), 7, "{}", run.explain());
    let start = run.event("start").expect("start event");
    let exit = run.event("exit").expect("exit event");
    for e in [start, exit] {
        for field in ["ts", "agent", "pid", "comm", "kind", "verdict", "layer"] {
            assert!(e.get(field).is_some(), "{field} missing in {e}");
        }
        assert_eq!(e["layer"], "agentd");
        assert_eq!(e["verdict"], "none");
        assert_eq!(e["comm"], "sh");
        assert!(e["pid"].as_u64().unwrap() > 1);
    }
    let id = start["agent"].as_str().unwrap();
    assert!(id.starts_with("analyze-only-"), "{id}");
    assert_eq!(exit["agent"], id);
    let d = &start["detail"];
    assert_eq!(d["profile"], "builtin:analyze-only");
    assert_eq!(d["uid"], 65534);
    // Landlock as this kernel enforces it: fully from ABI 6 (every feature the profile
    // uses), partially below, naming what is missing, with a warning on stderr.
    let abi = landlock_abi();
    let missing = landlock_missing_below(abi);
    assert_eq!(d["landlock_abi"], abi, "{d}");
    assert_eq!(d["landlock_missing"], serde_json::json!(missing), "{d}");
    let warned = run
        .stderr()
        .contains("agentd: warning: landlock is only partially enforced");
    if missing.is_empty() {
        assert_eq!(d["landlock"], "full", "{d}");
        assert!(!warned, "{}", run.explain());
    } else {
        assert_eq!(d["landlock"], "partial", "{d}");
        assert!(warned, "{}", run.explain());
    }
    assert!(
        d["cgroup"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/agentd/{id}")),
        "{d}"
    );
    assert_eq!(exit["detail"]["code"], 7);
    assert_eq!(exit["pid"], start["pid"]);
}

#[test]
fn run_background_processes_do_not_survive() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    // double fork + setsid: the grandchild is in no process group or session of the
    // agent's first process, and its parent is gone
    let script = r#"
import os, sys, time
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(w, str(os.getpid()).encode())
        time.sleep(120)
        os._exit(0)
    os._exit(0)
os.wait()
print(os.read(r, 32).decode())
sys.stdout.flush()
"#;
    let started = Instant::now();
    let run = AgentRun::new("analyze-only", ws.path())
        .python(script)
        .run();
    assert_eq!(run.code(), 0, "{}", run.explain());
    assert!(started.elapsed() < Duration::from_secs(60));
    let pid: u32 = run.stdout().trim().parse().unwrap();
    // agentd waited for the cgroup to empty before exiting: only a zombie may remain
    // until init reaps it
    let deadline = Instant::now() + Duration::from_secs(2);
    while !process_gone(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(process_gone(pid), "pid {pid} survived agentd run");
    assert_eq!(run.event("exit").unwrap()["detail"]["left_behind"], 1);
}

#[test]
fn run_dry_run_creates_nothing() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let (_p, profile) = profile_file(&test_profile("rt-dryrun", "invoker", DEFAULT_LIMITS, ""));
    let profile = profile.to_str().unwrap();
    let ws_s = ws.path().to_str().unwrap();
    let before = cgroups_named("rt-dryrun-");
    let out = std::process::Command::new(agentd_tests::agentd_bin())
        .args([
            "run",
            "--dry-run",
            "--profile",
            profile,
            "--workspace",
            ws_s,
        ])
        .args(["--", "/bin/true"])
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    for want in [
        "rt-dryrun-",
        "/agentd/rt-dryrun-",
        "pids.max",
        "uid 65534",
        "landlock",
        "seccomp",
        "FOO=bar",
        "connect nothing; bind nothing",
        "bpf lsm",
    ] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }
    assert_eq!(
        cgroups_named("rt-dryrun-"),
        before,
        "--dry-run created a cgroup"
    );

    let out = std::process::Command::new(agentd_tests::agentd_bin())
        .args([
            "run",
            "--dry-run",
            "--json",
            "--profile",
            profile,
            "--workspace",
            ws_s,
        ])
        .args(["--", "/bin/true"])
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["identity"]["uid"], 65534);
    assert!(plan["agent_id"].as_str().unwrap().starts_with("rt-dryrun-"));
    assert!(plan["landlock"]["rules"].as_array().unwrap().len() > 3);
    assert_eq!(plan["kernel"]["connect"], serde_json::json!([]));
    assert_eq!(plan["refused"], serde_json::Value::Null);
    assert_eq!(cgroups_named("rt-dryrun-"), before);

    // A profile that protects paths: the dry run says how, on every host (the agent's
    // view; with BPF LSM too where it runs), and that a missing one has nothing to bind.
    let lsm = agentd_tests::bpf_lsm_usable();
    let (_p, protecting) = profile_file(
        &test_profile("rt-dryrun", "invoker", DEFAULT_LIMITS, "").replace(
            "write = [\"{workspace}\", \"/dev/null\"]\n",
            "write = [\"{workspace}\", \"/dev/null\"]\nprotect = [\"{workspace}/.git/hooks\"]\n",
        ),
    );
    let out = std::process::Command::new(agentd_tests::agentd_bin())
        .args(["run", "--dry-run", "--profile"])
        .arg(&protecting)
        .args(["--workspace", ws_s, "--", "/bin/true"])
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .output()
        .unwrap();
    let text = stdout(&out);
    let hooks = format!("{ws_s}/.git/hooks");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        text.contains(&format!(
            "NOT protected, missing at launch (only BPF LSM forbids creating them): {hooks}"
        )),
        "{text}"
    );
    if lsm {
        assert!(
            text.contains(&format!(
                "protected (also by the read-only mounts of the agent's view): {hooks}"
            )),
            "{text}"
        );
    } else {
        assert!(
            text.contains("the agent's view alone keeps protected paths read-only"),
            "{text}"
        );
    }
    assert_eq!(cgroups_named("rt-dryrun-"), before);
}

#[test]
fn run_refuses_root_as_the_invoker() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let run = AgentRun::new("analyze-only", ws.path())
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID")
        .sh("id")
        .run();
    assert_eq!(run.code(), 125, "{}", run.explain());
    let err = run.stderr();
    assert!(
        err.contains("root") && err.contains("transient") && err.contains("sudo"),
        "{err}"
    );
    assert!(run.stdout().is_empty(), "the agent ran: {}", run.explain());
    let lf = run.event("launch_failed").expect("launch_failed event");
    assert_eq!(lf["detail"]["step"], "identity");
    // SUDO_UID=0 is root as well
    let run = AgentRun::new("analyze-only", ws.path())
        .env("SUDO_UID", "0")
        .env("SUDO_GID", "0")
        .sh("id")
        .run();
    assert_eq!(run.code(), 125, "{}", run.explain());
}

#[test]
fn run_transient_and_named_identities() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let (_p, transient) = profile_file(&test_profile(
        "rt-transient",
        "transient",
        DEFAULT_LIMITS,
        "",
    ));
    let run = AgentRun::new(transient.to_str().unwrap(), ws.path())
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID")
        .cmd(&["/usr/bin/id", "-u"])
        .run();
    assert_eq!(run.code(), 0, "{}", run.explain());
    let uid: u32 = run.stdout().trim().parse().unwrap();
    assert!((0x7700_0000..0x7701_0000).contains(&uid), "{uid}");
    assert_eq!(run.event("start").unwrap()["detail"]["uid"], uid);

    let named = test_profile("rt-named", "user", DEFAULT_LIMITS, "")
        .replace("run_as = \"user\"", "run_as = \"user\"\nuser = \"nobody\"");
    let (_q, named) = profile_file(&named);
    let run = AgentRun::new(named.to_str().unwrap(), ws.path())
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID")
        .cmd(&["/usr/bin/id", "-u"])
        .run();
    assert_eq!(run.code(), 0, "{}", run.explain());
    assert_eq!(run.stdout().trim(), "65534");
}

#[test]
fn run_wall_time_limit_kills_the_agent() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let limits = "pids = 16\nwall_time = \"700ms\"";
    let (_p, profile) = profile_file(&test_profile("rt-wall", "invoker", limits, ""));
    let started = Instant::now();
    let run = AgentRun::new(profile.to_str().unwrap(), ws.path())
        .sh("sleep 30 & sleep 30")
        .run();
    let took = started.elapsed();
    assert_eq!(run.code(), 128 + 9, "{}", run.explain());
    // Killed long before its 30 s sleeps end; `took` includes loading the BPF programs,
    // which takes seconds under emulation (the guests of `cargo xtask vm-test`).
    assert!(took < Duration::from_secs(25), "{took:?}");
    assert!(took >= Duration::from_millis(700), "{took:?}");
    let limit = run.event("limit").expect("limit event");
    assert_eq!(limit["detail"]["limit"], "wall_time");
    assert_eq!(run.event("exit").unwrap()["detail"]["signal"], 9);
}

#[test]
fn run_pids_limit_is_enforced() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let limits = "pids = 8\nwall_time = \"60s\"";
    let (_p, profile) = profile_file(&test_profile("rt-pids", "invoker", limits, ""));
    let script = r#"
import json, os, time
made, err = 0, 0
kids = []
for i in range(20):
    try:
        pid = os.fork()
    except OSError as e:
        err = e.errno
        break
    if pid == 0:
        time.sleep(5)
        os._exit(0)
    kids.append(pid)
    made += 1
print(json.dumps({"made": made, "errno": err}))
"#;
    let run = AgentRun::new(profile.to_str().unwrap(), ws.path())
        .python(script)
        .run();
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    assert_eq!(r["errno"], 11, "EAGAIN from pids.max: {r}");
    assert!(r["made"].as_u64().unwrap() < 8, "{r}");
    let limit = run.event("limit").expect("limit event");
    assert_eq!(limit["detail"]["limit"], "pids", "{}", run.explain());
}

#[test]
fn run_memory_limit_is_enforced() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let limits = "memory = \"64MiB\"\nwall_time = \"60s\"";
    let (_p, profile) = profile_file(&test_profile("rt-mem", "invoker", limits, ""));
    let run = AgentRun::new(profile.to_str().unwrap(), ws.path())
        .python("b = bytearray(512 << 20); b[::4096] = b'x' * len(b[::4096]); print('survived')")
        .run();
    assert_eq!(run.code(), 128 + 9, "{}", run.explain());
    assert!(!run.stdout().contains("survived"));
    let limit = run.event("limit").expect("limit event");
    assert_eq!(limit["detail"]["limit"], "memory", "{}", run.explain());
}

#[test]
fn run_forwards_sigterm_and_stdin_works() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let mut child = AgentRun::new("analyze-only", ws.path())
        .sh("trap 'echo got-term; exit 42' TERM; read line; echo \"read:$line\"; sleep 30 & wait")
        .command(&events)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"hello\n").unwrap();
    }
    // wait until the agent has read its input (it then waits for the signal)
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert_eq!(first, "read:hello\n");
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill takes no pointers; the pid is our unreaped child's.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert_eq!(status.code(), Some(42), "stdout after the signal: {rest:?}");
    assert_eq!(rest, "got-term\n");
    let ev = read_events(&events);
    let id = ev[0]["agent"].as_str().unwrap();
    assert_no_cgroup(id);
    assert_eq!(ev.last().unwrap()["detail"]["code"], 42);
}

#[test]
fn run_help_mentions_the_exit_codes() {
    if !require_root() {
        return;
    }
    let out = agentd(&["run", "--help"]);
    let text = stdout(&out);
    assert!(text.contains("125") && text.contains("127") && text.contains("--dry-run"));
}

#[test]
fn run_child_failures_are_reported_with_their_step() {
    if !require_root() {
        return;
    }
    // a workspace the agent's user cannot enter: the child fails at chdir, after the
    // identity switch, and reports it over the launch channel
    let closed = tempfile::tempdir().unwrap();
    std::fs::set_permissions(closed.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let run = AgentRun::new("analyze-only", closed.path())
        .sh("echo ran")
        .run();
    assert_eq!(run.code(), 125, "{}", run.explain());
    assert!(run.stdout().is_empty(), "{}", run.explain());
    assert!(
        run.stderr()
            .lines()
            .any(|l| l.starts_with("agentd: cannot launch: workspace: permission denied (EACCES)")),
        "{}",
        run.explain()
    );
    let lf = run.event("launch_failed").expect("launch_failed event");
    assert_eq!(lf["detail"]["step"], "workspace");
    assert!(run.event("start").is_none());

    // a profile without the dynamic loader under `exec`: Landlock refuses the exec
    let ws = agent_dir(false);
    let no_loader = test_profile("rt-noloader", "invoker", DEFAULT_LIMITS, "").replace(
        r#"exec = ["/usr/bin", "/bin", "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"]"#,
        r#"exec = ["/usr/bin", "/bin"]"#,
    );
    let (_p, profile) = profile_file(&no_loader);
    let run = AgentRun::new(profile.to_str().unwrap(), ws.path())
        .cmd(&["/usr/bin/true"])
        .run();
    assert_eq!(run.code(), 126, "{}", run.explain());
    assert!(
        run.stderr().contains("exec: permission denied"),
        "{}",
        run.explain()
    );
    assert!(
        run.stderr().contains("filesystem.exec"),
        "{}",
        run.explain()
    );
    assert_eq!(
        run.event("launch_failed").unwrap()["detail"]["step"],
        "exec"
    );
}
