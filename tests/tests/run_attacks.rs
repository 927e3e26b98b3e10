//! Attacks from inside an agent launched by `agentd run`: each test runs a real program
//! under a profile and asserts the kernel refused (errno, and the side effect absent).

use std::os::unix::{fs::PermissionsExt as _, process::CommandExt as _};

use agentd_tests::{
    AgentRun, DEFAULT_LIMITS, agent_dir, landlock_abi, profile_file, require_root, test_profile,
};

const EACCES: i64 = 13;
const EPERM: i64 = 1;
const ENOSYS: i64 = 38;

/// Runs `script` under `profile` as nobody; returns its stdout parsed as JSON.
fn python_json(profile: &str, workspace: &std::path::Path, script: &str) -> serde_json::Value {
    let run = AgentRun::new(profile, workspace).python(script).run();
    assert_eq!(run.code(), 0, "{}", run.explain());
    run.json()
}

#[test]
fn run_write_outside_the_workspace_is_refused_under_analyze_only() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(true);
    // world-writable, so only Landlock can refuse
    let outside = agent_dir(true);
    let target = outside.path().join("posted.txt");
    let inside = ws.path().join("note.txt");
    let script = format!(
        r#"
import json
out = {{}}
for name, path in [("outside", {target:?}), ("inside", {inside:?})]:
    try:
        open(path, "w").write("x")
        out[name] = 0
    except OSError as e:
        out[name] = e.errno
print(json.dumps(out))
"#,
        target = target.to_str().unwrap(),
        inside = inside.to_str().unwrap(),
    );
    let r = python_json("analyze-only", ws.path(), &script);
    assert_eq!(r["outside"], EACCES, "{r}");
    // analyze-only writes nothing, not even the workspace
    assert_eq!(r["inside"], EACCES, "{r}");
    assert!(!target.exists(), "the write outside the workspace happened");
    assert!(!inside.exists());
}

#[test]
fn run_workspace_is_writable_when_the_profile_says_so() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(true);
    let (_p, profile) = profile_file(&test_profile("rt-write", "invoker", DEFAULT_LIMITS, ""));
    let run = AgentRun::new(profile.to_str().unwrap(), ws.path())
        .sh("echo hi > made.txt && mkdir d && mv made.txt d/ && cat d/made.txt")
        .run();
    assert_eq!(run.code(), 0, "{}", run.explain());
    assert_eq!(run.stdout(), "hi\n");
    let meta = std::fs::metadata(ws.path().join("d/made.txt")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 65534);
}

#[test]
fn run_read_outside_the_read_list_is_refused() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let secret_dir = agent_dir(false);
    let secret = secret_dir.path().join("secret.txt");
    std::fs::write(&secret, "s3cr3t").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let script = format!(
        r#"
import json, os
out = {{}}
try:
    out["read"] = open({secret:?}).read()
except OSError as e:
    out["read"] = e.errno
try:
    out["list"] = os.listdir({dir:?})
except OSError as e:
    out["list"] = e.errno
out["workspace"] = os.listdir(".")
print(json.dumps(out))
"#,
        secret = secret.to_str().unwrap(),
        dir = secret_dir.path().to_str().unwrap(),
    );
    let r = python_json("analyze-only", ws.path(), &script);
    assert_eq!(r["read"], EACCES, "{r}");
    assert_eq!(r["list"], EACCES, "{r}");
    assert!(r["workspace"].is_array(), "{r}");
}

/// Calls that must fail with EPERM under the seccomp allow-list. Several would succeed for
/// an unprivileged user without it (ptrace TRACEME, unshare of a user namespace, keyctl
/// reading the session keyring, personality's query), so EPERM proves the filter.
const SYSCALLS: &str = r#"
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sc(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if r == 0 and nr == 56:
        os._exit(0)  # a clone that should have failed: the child leaves at once
    return ctypes.get_errno() if r == -1 else 0
buf = ctypes.create_string_buffer(256)
addr = ctypes.addressof(buf)
CLONE_NEWUSER, SIGCHLD = 0x10000000, 17
out = {
    "ptrace": sc(101, 0, 0, 0, 0),            # PTRACE_TRACEME
    "unshare": sc(272, CLONE_NEWUSER),
    "mount": sc(165, 0, 0, 0, 0, 0),
    "bpf": sc(321, 0, addr, 72),              # BPF_MAP_CREATE
    "io_uring_setup": sc(425, 1, addr),
    "keyctl": sc(250, 0, -3, 0),              # KEYCTL_GET_KEYRING_ID, session keyring
    "personality": sc(135, 0xffffffff),       # query
    "perf_event_open": sc(298, addr, 0, -1, -1, 0),
    "userfaultfd": sc(323, 0),
    "setns": sc(308, 0, 0),
    "init_module": sc(175, 0, 0, 0),
    "clone_newuser": sc(56, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0),
    "clone3": sc(435, addr, 88),
}
print(json.dumps(out))
"#;

#[test]
fn run_dangerous_syscalls_get_eperm() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    // The seccomp filter is the same for every profile. This one has no breaker threshold:
    // analyze-only's (ten violations a minute) would kill the agent at the tenth refusal
    // below, each being an event.
    let (_p, profile) = profile_file(&test_profile(
        "rt-syscalls",
        "invoker",
        DEFAULT_LIMITS,
        "[breaker]\ntrip_on = [\"canary\"]\n",
    ));
    let run = AgentRun::new(profile.to_str().unwrap(), ws.path())
        .python(SYSCALLS)
        .run();
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    // Refused before the kernel runs them, so no entry tracepoint sees them: the exit
    // tracepoints report them (init_module is left out: kernels without modules have no
    // tracepoint for it).
    for call in [
        "ptrace",
        "unshare",
        "mount",
        "bpf",
        "io_uring_setup",
        "keyctl",
        "personality",
        "perf_event_open",
        "userfaultfd",
        "setns",
    ] {
        let event = run.events.iter().find(|e| {
            e["kind"] == "syscall"
                && e["detail"]["syscall"] == call
                && e["layer"] == "seccomp"
                && e["verdict"] == "deny"
                && e["errno"] == EPERM
        });
        assert!(event.is_some(), "no event for {call}: {}", run.explain());
    }
    for call in [
        "ptrace",
        "unshare",
        "mount",
        "bpf",
        "io_uring_setup",
        "keyctl",
        "personality",
        "perf_event_open",
        "userfaultfd",
        "setns",
        "init_module",
        "clone_newuser",
    ] {
        assert_eq!(r[call], EPERM, "{call}: {r}");
    }
    assert_eq!(r["clone3"], ENOSYS, "clone3 falls back to clone: {r}");
}

#[test]
fn run_unshare_program_cannot_make_a_user_namespace() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let run = AgentRun::new("analyze-only", ws.path())
        .cmd(&["/usr/bin/unshare", "-U", "/bin/true"])
        .run();
    assert_ne!(run.code(), 0, "{}", run.explain());
    assert!(
        run.stderr().contains("Operation not permitted"),
        "{}",
        run.explain()
    );
}

#[test]
fn run_tiocsti_is_refused_even_with_high_bits() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let script = r#"
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
fd = os.open("/dev/null", os.O_RDONLY)
c = ctypes.c_char(b"x")
def ioctl(req):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(16), ctypes.c_long(fd), ctypes.c_ulong(req), ctypes.byref(c))
    return ctypes.get_errno() if r == -1 else 0
print(json.dumps({
    "tiocsti": ioctl(0x5412),
    "tiocsti_high": ioctl((1 << 32) | 0x5412),
    "tioclinux": ioctl(0x541C),
    "tcgets": ioctl(0x5401),
}))
"#;
    let r = python_json("analyze-only", ws.path(), script);
    assert_eq!(r["tiocsti"], EPERM, "{r}");
    assert_eq!(r["tiocsti_high"], EPERM, "{r}");
    assert_eq!(r["tioclinux"], EPERM, "{r}");
    // ioctl itself is allowed: /dev/null is no terminal
    assert_eq!(r["tcgets"], 25, "ENOTTY expected: {r}");
}

#[test]
fn run_agent_has_no_capabilities_and_is_not_root() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let run = AgentRun::new("analyze-only", ws.path())
        .cmd(&["/bin/cat", "/proc/self/status"])
        .run();
    assert_eq!(run.code(), 0, "{}", run.explain());
    let status = run.stdout();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{name} missing: {status}"))
            .to_owned()
    };
    for set in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(set), "0000000000000000", "{set}");
    }
    assert_eq!(field("Uid:"), "65534\t65534\t65534\t65534");
    assert_eq!(field("Gid:"), "65534\t65534\t65534\t65534");
    assert_eq!(field("Groups:"), "65534");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2");
    // a new session: the agent leads it
    let pid = field("Pid:");
    assert_eq!(field("NSsid:"), pid);
}

#[test]
fn run_environment_is_scrubbed() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let (_p, profile) = profile_file(&test_profile("rt-env", "invoker", DEFAULT_LIMITS, ""));
    let run = AgentRun::new(profile.to_str().unwrap(), ws.path())
        .cmd(&["/usr/bin/env"])
        .env("LD_PRELOAD", "")
        .env("LD_LIBRARY_PATH", "/nonexistent-agentd-test")
        .env("AWS_SECRET_ACCESS_KEY", "leaked")
        .env("LANG", "C.UTF-8")
        .run();
    assert_eq!(run.code(), 0, "{}", run.explain());
    let env = run.stdout();
    let mut names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["AGENTD_AGENT_ID", "FOO", "HOME", "LANG", "PATH", "USER"],
        "{env}"
    );
    assert!(env.contains("FOO=bar\n"));
    assert!(
        env.contains("HOME=/nonexistent\n"),
        "the agent's home, not root's"
    );
    assert!(env.contains("USER=nobody\n"));
    assert!(!env.contains("leaked") && !env.contains("LD_"));
}

#[test]
fn run_inherited_fds_are_closed() {
    use std::os::fd::AsRawFd as _;
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let dir = tempfile::tempdir().unwrap();
    let leaked = std::fs::File::create(dir.path().join("leak")).unwrap();
    let raw = leaked.as_raw_fd();
    let events = dir.path().join("events.jsonl");
    let script = r#"
import json, os
open_fds = []
for fd in range(3, 1024):
    try:
        os.fstat(fd)
        open_fds.append(fd)
    except OSError:
        pass
print(json.dumps(open_fds))
"#;
    let mut cmd = AgentRun::new("analyze-only", ws.path())
        .python(script)
        .command(&events);
    // SAFETY: dup2 is async-signal-safe; the new fd 7 (not close-on-exec) is what a
    // careless parent would leak into agentd.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 7) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", agentd_tests::stderr(&out));
    let fds: Vec<i32> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(fds.is_empty(), "fds above 2 reached the agent: {fds:?}");
    let ev = agentd_tests::read_events(&events);
    agentd_tests::assert_no_cgroup(ev[0]["agent"].as_str().unwrap());
}

/// Runs `kill -9` of a `sleep` of uid nobody (outside the agent) from an agent of
/// `profile`; returns the run, the kill's errno (0: delivered) and whether the victim died
/// of the agent's SIGKILL (it is ended with SIGTERM afterwards, so its status tells).
fn kill_from_agent(profile: &str, ws: &std::path::Path) -> (agentd_tests::Run, i64, bool) {
    use std::os::unix::process::ExitStatusExt as _;
    let mut victim = std::process::Command::new("/bin/sleep")
        .arg("30")
        .uid(65534)
        .gid(65534)
        .spawn()
        .unwrap();
    let script = format!(
        r#"
import json, os
try:
    os.kill({pid}, 9)
    r = 0
except OSError as e:
    r = e.errno
print(json.dumps({{"kill": r}}))
"#,
        pid = victim.id()
    );
    let run = AgentRun::new(profile, ws).python(&script).run();
    // SAFETY: kill(2) on our own child's pid, not yet reaped, so not reused.
    unsafe { libc::kill(victim.id() as i32, libc::SIGTERM) };
    let killed = victim.wait().unwrap().signal() == Some(libc::SIGKILL);
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    let errno = r["kill"].as_i64().unwrap();
    (run, errno, killed)
}

/// Signals. A process of the agent's own user outside the agent is out of reach through
/// Landlock's signal scoping (ABI 6). Below ABI 6 agentd documents the gap (SECURITY.md,
/// "Older kernels") and reports it: the start event says `landlock: partial` with the
/// scope in `landlock_missing`, and stderr has a warning. A process of another user is out
/// of reach on every kernel when the agent runs as a transient identity.
#[test]
fn run_signals_cannot_reach_processes_outside_the_agent() {
    if !require_root() {
        return;
    }
    const SCOPE: &str = "signal and abstract-unix-socket scoping";
    let ws = agent_dir(false);
    // analyze-only runs as the invoker: nobody, the victim's uid.
    let (run, errno, killed) = kill_from_agent("analyze-only", ws.path());
    let start = &run.event("start").unwrap()["detail"];
    let missing_scope = start["landlock_missing"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m == SCOPE);
    if landlock_abi() >= 6 {
        assert_eq!(errno, EPERM, "Landlock signal scoping\n{}", run.explain());
        assert!(!killed, "the agent killed a process outside it");
        assert!(!missing_scope, "{start}");
    } else {
        // The documented degradation, and agentd saying so.
        assert_eq!(start["landlock"], "partial", "{start}");
        assert!(missing_scope, "{start}");
        assert!(
            run.stderr()
                .contains("agentd: warning: landlock is only partially enforced")
                && run.stderr().contains(SCOPE),
            "{}",
            run.explain()
        );
        assert_eq!(
            (errno, killed),
            (0, true),
            "without scoping, the invoker's own processes are reachable\n{}",
            run.explain()
        );
    }

    // Another user's process, on every kernel: the transient uid is no one else's.
    let (_p, transient) = profile_file(&test_profile(
        "signals-transient",
        "transient",
        DEFAULT_LIMITS,
        "",
    ));
    let (run, errno, killed) = kill_from_agent(transient.to_str().unwrap(), ws.path());
    assert_eq!(errno, EPERM, "transient identity\n{}", run.explain());
    assert!(!killed, "the agent killed another user's process");
}

/// Socket families: the seccomp filter is the only layer that sees AF_NETLINK and AF_PACKET
/// (the cgroup sock_create program runs for AF_INET and AF_INET6 only). analyze-only has no
/// network rules: AF_UNIX sockets and TCP/UDP sockets (whose every connect, datagram and
/// bind the cgroup programs refuse, see tests/tests/net_scope.rs) can be made, nothing
/// else, and each refusal is an event.
#[test]
fn run_socket_families_outside_the_profile_get_eperm() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let script = r#"
import json, socket
def make(*args):
    try:
        socket.socket(*args).close()
        return 0
    except OSError as e:
        return e.errno
def pair(*args):
    try:
        for s in socket.socketpair(*args):
            s.close()
        return 0
    except OSError as e:
        return e.errno
print(json.dumps({
    "netlink_uevent": make(socket.AF_NETLINK, socket.SOCK_RAW, 15),  # NETLINK_KOBJECT_UEVENT
    "netlink_route": make(socket.AF_NETLINK, socket.SOCK_RAW, 0),
    "packet": make(socket.AF_PACKET, socket.SOCK_RAW, 0x0300),      # htons(ETH_P_ALL)
    "inet_stream": make(socket.AF_INET, socket.SOCK_STREAM),
    "inet6_dgram": make(socket.AF_INET6, socket.SOCK_DGRAM),
    "inet_raw": make(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
    "unix": make(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC),
    "unix_pair": pair(socket.AF_UNIX),
    "inet_pair": pair(socket.AF_INET),
}))
"#;
    // analyze-only's families, without its breaker (which trips on a refused socket):
    // the refusals themselves are under test here.
    let text = test_profile(
        "sockets",
        "invoker",
        DEFAULT_LIMITS,
        "[breaker]\ntrip_on = [\"canary\"]\n",
    );
    let (_p, profile) = profile_file(&text);
    let run = AgentRun::new(profile.to_str().unwrap(), ws.path())
        .python(script)
        .run();
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    let refused = [
        "netlink_uevent",
        "netlink_route",
        "packet",
        "inet_raw",
        "inet_pair",
    ];
    for name in refused {
        assert_eq!(r[name], EPERM, "{name}: {r}");
    }
    for name in ["unix", "unix_pair", "inet_stream", "inet6_dgram"] {
        assert_eq!(r[name], 0, "{name}: {r}");
    }
    // Each refusal is reported and attributed to seccomp (identical ones folded into one
    // record with their count).
    let seen = |call: &str| {
        agentd_tests::counted(run.events.iter().filter(|e| {
            e["kind"] == "syscall"
                && e["detail"]["syscall"] == call
                && e["layer"] == "seccomp"
                && e["verdict"] == "deny"
                && e["errno"] == EPERM
        }))
    };
    assert_eq!(seen("socket"), 4, "{}", run.explain());
    assert_eq!(seen("socketpair"), 1, "{}", run.explain());
    assert!(run.event("breaker").is_none(), "{}", run.explain());
}
