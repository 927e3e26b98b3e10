//! Harness for the privileged tests: find the agentd binary, run it, and refuse to skip.
//!
//! A test that needs something this host lacks (root, a kernel feature) calls [`require`]:
//! it skips with a loud message, unless `AGENTD_TEST_MUST_RUN=1` (set by `cargo xtask test`
//! and CI), in which case the missing requirement fails the test.

pub mod ask;
pub mod dns;
pub mod pty;

use std::{
    net::{Ipv4Addr, Ipv6Addr, UdpSocket},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

/// The agentd binary under test: `AGENTD_BIN`, else the workspace's debug build.
pub fn agentd_bin() -> PathBuf {
    let bin = std::env::var_os("AGENTD_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/agentd"),
        PathBuf::from,
    );
    assert!(
        bin.exists(),
        "agentd binary {} not found: run `cargo build -p agentd` or set AGENTD_BIN",
        bin.display()
    );
    bin
}

/// agentd's test harnesses (`agentd-harness`, not part of the product): beside the agentd
/// binary under test, as cargo builds them, or `AGENTD_HARNESS_BIN`.
pub fn harness_bin() -> PathBuf {
    let bin = std::env::var_os("AGENTD_HARNESS_BIN").map_or_else(
        || agentd_bin().with_file_name("agentd-harness"),
        PathBuf::from,
    );
    assert!(
        bin.exists(),
        "agentd-harness {} not found: run `cargo build -p agentd` (it builds both) or set AGENTD_HARNESS_BIN",
        bin.display()
    );
    bin
}

/// Runs `agentd-harness ARGS...` to completion.
pub fn harness(args: &[&str]) -> Output {
    Command::new(harness_bin())
        .args(args)
        .output()
        .expect("cannot run agentd-harness")
}

/// Runs `agentd ARGS...` to completion.
pub fn agentd(args: &[&str]) -> Output {
    Command::new(agentd_bin())
        .args(args)
        .output()
        .expect("cannot run agentd")
}

pub fn must_run() -> bool {
    std::env::var("AGENTD_TEST_MUST_RUN").as_deref() == Ok("1")
}

/// Returns true when `ok`; otherwise skips loudly (false) or, with AGENTD_TEST_MUST_RUN=1,
/// panics naming what is missing.
#[must_use]
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if must_run() {
        panic!("requirement missing: {what} (AGENTD_TEST_MUST_RUN=1 forbids skipping)");
    }
    eprintln!("\n*** SKIPPED: requirement missing: {what} ***\n");
    false
}

/// Root is the first requirement of every privileged test.
#[must_use]
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    require(euid == 0, "running as root")
}

/// The running kernel's Landlock ABI (0 or negative: none). Tests of what Landlock
/// enforces compare with it: each feature exists from one ABI on, and below it the test
/// asserts the degradation agentd documents (SECURITY.md, "Older kernels") instead.
pub fn landlock_abi() -> i64 {
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) reads no
    // memory and returns the ABI version or an error.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    }
}

/// What agentd reports missing on a kernel of Landlock ABI `abi`, for a profile that
/// scopes signals and abstract unix sockets (every profile does): the start event's
/// `landlock_missing`, in this order.
pub fn landlock_missing_below(abi: i64) -> Vec<&'static str> {
    [
        ("refer (cross-directory rename and link)", 2),
        ("truncate", 3),
        ("device ioctl", 5),
        ("signal and abstract-unix-socket scoping", 6),
    ]
    .into_iter()
    .filter(|(_, from)| abi < *from)
    .map(|(name, _)| name)
    .collect()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

// ---------------------------------------------------------------------------------------
// `agentd run` helpers: a workspace, custom profiles, one run with its events, and the
// check that no cgroup of the agent is left behind.

/// A temporary directory the agent's (unprivileged) user can use: 0755, or 0777 when the
/// agent must write into it. Tests run as root; the agent does not.
pub fn agent_dir(writable: bool) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::Builder::new()
        .prefix("agentd-test-")
        .tempdir()
        .expect("cannot create a temporary directory");
    let mode = if writable { 0o777 } else { 0o755 };
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode))
        .expect("cannot chmod the temporary directory");
    dir
}

/// A profile for tests: reads the system and the workspace, writes the workspace, runs
/// /usr/bin and /bin, no network. `extra` is appended (more sections); `limits` replaces
/// the default [limits] body.
pub fn test_profile(name: &str, run_as: &str, limits: &str, extra: &str) -> String {
    format!(
        r#"[agent]
name = "{name}"
description = "agentd run test"

[identity]
run_as = "{run_as}"

[filesystem]
read = ["{{workspace}}", "/usr", "/lib", "/lib64", "/bin", "/etc", "/proc", "/dev/null", "/dev/urandom"]
write = ["{{workspace}}", "/dev/null"]
exec = ["/usr/bin", "/bin", "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"]

[network]
connect = []
bind = []

[limits]
{limits}

[environment]
pass = ["PATH", "HOME", "USER", "LANG"]
set = {{ FOO = "bar" }}

{extra}
"#
    )
}

pub const DEFAULT_LIMITS: &str = "pids = 64\nmemory = \"512MiB\"\nwall_time = \"60s\"";

/// Writes `text` as a profile file in a fresh temporary directory (kept alive by the
/// returned guard).
pub fn profile_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("cannot create a temporary directory");
    let path = dir.path().join("profile.toml");
    std::fs::write(&path, text).expect("cannot write the profile");
    (dir, path)
}

/// One `agentd run`: its output and its `--events` lines.
#[derive(Debug)]
pub struct Run {
    pub output: Output,
    pub events: Vec<serde_json::Value>,
}

impl Run {
    /// The exit status (panics if agentd died of a signal).
    pub fn code(&self) -> i32 {
        self.output
            .status
            .code()
            .unwrap_or_else(|| panic!("agentd died of a signal: {:?}", self.output.status))
    }
    pub fn stdout(&self) -> String {
        stdout(&self.output)
    }
    pub fn stderr(&self) -> String {
        stderr(&self.output)
    }
    /// The agent's stdout parsed as JSON (the scripts print one object); panics with
    /// everything known about the run when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout().trim())
            .unwrap_or_else(|e| panic!("{e}: {}", self.explain()))
    }
    /// The first event of `kind`.
    pub fn event(&self, kind: &str) -> Option<&serde_json::Value> {
        self.events.iter().find(|e| e["kind"] == kind)
    }
    pub fn agent_id(&self) -> Option<String> {
        self.events
            .iter()
            .find_map(|e| e["agent"].as_str().map(str::to_owned))
    }
    /// Panics with everything known about the run.
    pub fn explain(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}\n--- events\n{}",
            self.output.status,
            self.stdout(),
            self.stderr(),
            self.events
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    }
}

/// Python for agent scripts: `attempt(name, f)` records 0 or the errno `f` failed with in
/// `out[name]`; scripts end with `print(json.dumps(out))` (read with [`Run::json`]).
pub const PY_ATTEMPT: &str = r#"
import errno, json, os, socket
out = {}
def attempt(name, f):
    try:
        f()
        out[name] = 0
    except OSError as e:
        out[name] = e.errno
"#;

/// Builder for `agentd run --profile P --workspace W --events E -- CMD...`. By default the
/// invoking user is `nobody` (SUDO_UID/SUDO_GID=65534) and stdin is empty.
#[derive(Debug, Clone)]
pub struct AgentRun {
    profile: String,
    workspace: PathBuf,
    args: Vec<String>,
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    env_remove: Vec<String>,
    stdin: Vec<u8>,
    /// Where the --events file is made (a temporary directory in it).
    events_dir: Option<PathBuf>,
}

pub const NOBODY: &str = "65534";

impl AgentRun {
    pub fn new(profile: &str, workspace: &std::path::Path) -> AgentRun {
        AgentRun {
            profile: profile.to_owned(),
            workspace: workspace.to_path_buf(),
            args: Vec::new(),
            cmd: Vec::new(),
            env: vec![
                ("SUDO_UID".into(), NOBODY.into()),
                ("SUDO_GID".into(), NOBODY.into()),
            ],
            env_remove: Vec::new(),
            stdin: Vec::new(),
            events_dir: None,
        }
    }
    /// The events file in a temporary directory under `dir` (not under /tmp, where a
    /// profile that lets the agent write /tmp would have it refused).
    pub fn events_in(mut self, dir: &std::path::Path) -> AgentRun {
        self.events_dir = Some(dir.to_path_buf());
        self
    }
    pub fn cmd(mut self, cmd: &[&str]) -> AgentRun {
        self.cmd = cmd.iter().map(|s| (*s).to_owned()).collect();
        self
    }
    /// `python3 -c SCRIPT`.
    pub fn python(self, script: &str) -> AgentRun {
        self.cmd(&["/usr/bin/python3", "-c", script])
    }
    /// `/bin/sh -c SCRIPT`.
    pub fn sh(self, script: &str) -> AgentRun {
        self.cmd(&["/bin/sh", "-c", script])
    }
    pub fn arg(mut self, a: &str) -> AgentRun {
        self.args.push(a.to_owned());
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> AgentRun {
        self.env.retain(|(n, _)| n != k);
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }
    pub fn env_remove(mut self, k: &str) -> AgentRun {
        self.env.retain(|(n, _)| n != k);
        self.env_remove.push(k.to_owned());
        self
    }
    pub fn stdin(mut self, input: &[u8]) -> AgentRun {
        self.stdin = input.to_vec();
        self
    }

    /// The command, ready to spawn; `events` is the --events file.
    pub fn command(&self, events: &std::path::Path) -> Command {
        let mut c = Command::new(agentd_bin());
        c.arg("run")
            .arg("--profile")
            .arg(&self.profile)
            .arg("--workspace")
            .arg(&self.workspace)
            .arg("--events")
            .arg(events)
            .args(&self.args)
            .arg("--")
            .args(&self.cmd);
        for k in &self.env_remove {
            c.env_remove(k);
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs to completion; then checks that no cgroup of the agent is left.
    pub fn run(&self) -> Run {
        use std::io::Write as _;
        let dir = match &self.events_dir {
            Some(d) => tempfile::tempdir_in(d),
            None => tempfile::tempdir(),
        }
        .expect("cannot create a temporary directory");
        let events_path = dir.path().join("events.jsonl");
        let mut child = self
            .command(&events_path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("cannot run agentd");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&self.stdin).expect("cannot write stdin");
        drop(stdin);
        let output = child.wait_with_output().expect("cannot wait for agentd");
        let run = Run {
            output,
            events: read_events(&events_path),
        };
        if let Some(id) = run.agent_id() {
            assert_no_cgroup(&id);
        }
        run
    }
}

/// How many refusals `records` stand for: identical refusals within a second are
/// recorded as the first and one summary whose `detail.repeated` counts the others.
pub fn counted<'a>(records: impl Iterator<Item = &'a serde_json::Value>) -> u64 {
    records
        .map(|e| e["detail"]["repeated"].as_u64().unwrap_or(1))
        .sum()
}

/// The JSON lines of an events file (none if it does not exist).
pub fn read_events(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event line {l:?}: {e}")))
        .collect()
}

/// Where agentd puts agents' cgroups on this host: `<hierarchy>/agentd` for cgroup v2 and
/// the v1 pids and memory hierarchies.
pub fn cgroup_parents() -> Vec<PathBuf> {
    [
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/memory",
    ]
    .iter()
    .map(|h| PathBuf::from(h).join("agentd"))
    .collect()
}

/// Cgroup directories whose name starts with `prefix` (an agent id, or a profile name
/// followed by `-`).
pub fn cgroups_named(prefix: &str) -> Vec<PathBuf> {
    cgroup_parents()
        .into_iter()
        .filter_map(|p| std::fs::read_dir(p).ok())
        .flat_map(|d| d.flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect()
}

/// Panics if a cgroup directory of `agent_id` exists in any hierarchy.
pub fn assert_no_cgroup(agent_id: &str) {
    let left = cgroups_named(agent_id);
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
}

/// Whether process `pid` is gone (or a zombie waiting for its new parent to reap it).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

// ---------------------------------------------------------------------------------------
// Kernel features tests declare: BPF LSM, probed here without agentd's code.

/// The id of BTF FUNC `name` in vmlinux BTF (just enough of the format to walk types).
fn btf_func_id(data: &[u8], name: &str) -> Option<u32> {
    let u32_at = |o: usize| Some(u32::from_le_bytes(data.get(o..o + 4)?.try_into().ok()?));
    if data.get(0..2)? != [0x9f, 0xeb] {
        return None;
    }
    let hdr = u32_at(4)? as usize;
    let (type_off, type_len, str_off) = (
        u32_at(8)? as usize,
        u32_at(12)? as usize,
        u32_at(16)? as usize,
    );
    let strings = hdr + str_off;
    let (mut p, end) = (hdr + type_off, hdr + type_off + type_len);
    let mut id = 1;
    while p < end {
        let (name_off, info) = (u32_at(p)? as usize, u32_at(p + 4)?);
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        if kind == 12 {
            let s = data.get(strings + name_off..)?;
            let s = &s[..s.iter().position(|&c| c == 0)?];
            if s == name.as_bytes() {
                return Some(id);
            }
        }
        p += 12
            + match kind {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                3 => 12,                      // ARRAY
                4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
                _ => 0,
            };
        id += 1;
    }
    None
}

/// The BPF_PROG_LOAD part of `union bpf_attr` (uapi linux/bpf.h), up to attach_prog_fd.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
    attach_prog_fd: u32,
}

fn bpf(cmd: libc::c_long, attr: *const libc::c_void, size: usize) -> Result<i32, i32> {
    // SAFETY: attr points to a live, zero-padded bpf_attr prefix of `size` bytes.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if ret < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        Ok(i32::try_from(ret).unwrap())
    }
}

/// Loads and attaches `r0 = 0; exit` as a BPF LSM program on file_open, with raw
/// syscalls (independent of aya and of agentd's code). Err(errno) when the kernel refuses,
/// Err(ENOENT) when vmlinux BTF has no bpf_lsm_file_open.
pub fn bpf_lsm_probe() -> Result<(), i32> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
    const BPF_PROG_TYPE_LSM: u32 = 29;
    const BPF_LSM_MAC: u32 = 27;
    let vmlinux = std::fs::read("/sys/kernel/btf/vmlinux").map_err(|_| libc::ENOENT)?;
    let btf_id = btf_func_id(&vmlinux, "bpf_lsm_file_open").ok_or(libc::ENOENT)?;
    let insns: [u64; 2] = [0xb7, 0x95]; // mov r0, 0; exit
    let license = c"GPL";
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_LSM,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: BPF_LSM_MAC,
        attach_btf_id: btf_id,
        ..ProgLoadAttr::default()
    };
    let prog = bpf(
        BPF_PROG_LOAD,
        (&raw const attr).cast(),
        size_of::<ProgLoadAttr>(),
    )?;
    // raw_tracepoint_open: { __u64 name; __u32 prog_fd; } with name NULL for LSM programs.
    let open: [u64; 2] = [0, u64::try_from(prog).unwrap()];
    let link = bpf(BPF_RAW_TRACEPOINT_OPEN, (&raw const open).cast(), 16);
    // SAFETY: prog is a file descriptor this function owns.
    unsafe { libc::close(prog) };
    let link = link?;
    // SAFETY: link is a file descriptor this function owns; closing it detaches.
    unsafe { libc::close(link) };
    Ok(())
}

/// Whether this kernel runs BPF LSM programs: `bpf` is an active LSM and a raw load and
/// attach succeeds (this project's machines list `bpf` and refuse the program). Tests of
/// the BPF LSM backend assert enforcement where this is true, and the documented refusal
/// where it is false. With `AGENTD_TEST_EXPECT_BPF_LSM=1` (the stock-kernel guests of
/// `cargo xtask vm-test`) false is a failure, so no test there takes the other branch.
pub fn bpf_lsm_usable() -> bool {
    let lsms = std::fs::read_to_string("/sys/kernel/security/lsm");
    let listed = lsms
        .as_ref()
        .is_ok_and(|l| l.trim().split(',').any(|m| m == "bpf"));
    let probe = bpf_lsm_probe();
    let usable = listed && probe.is_ok();
    if !usable && std::env::var("AGENTD_TEST_EXPECT_BPF_LSM").as_deref() == Ok("1") {
        panic!(
            "AGENTD_TEST_EXPECT_BPF_LSM=1, but BPF LSM does not run here (active LSMs: \
             {lsms:?}; probe: {probe:?})"
        );
    }
    usable
}

// ---------------------------------------------------------------------------------------
// `agentd daemon` for tests.

/// A daemon of a test (its own socket, state directory, audit log and bpffs pins): stopped (SIGINT) and its files removed on drop.
pub struct Daemon {
    pub child: Option<Child>,
    /// Its socket, state directory, audit log and log live here.
    pub dir: tempfile::TempDir,
    group: String,
    /// More arguments of `agentd daemon`.
    args: Vec<String>,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with_group("agentd-test-no-such-group")
    }

    /// A daemon whose `--group` is `group`.
    pub fn start_with_group(group: &str) -> Daemon {
        Daemon::start_with(group, &[])
    }

    /// A daemon started with more arguments (`--dns-upstream ADDR`...).
    pub fn start_with_args(args: &[&str]) -> Daemon {
        Daemon::start_with("agentd-test-no-such-group", args)
    }

    /// A daemon whose `--group` is `group`, started with more arguments.
    pub fn start_with_group_and_args(group: &str, args: &[&str]) -> Daemon {
        Daemon::start_with(group, args)
    }

    fn start_with(group: &str, args: &[&str]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("agentd-daemon-test-")
            .tempdir()
            .unwrap();
        let mut d = Daemon {
            child: None,
            dir,
            group: group.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        };
        d.spawn();
        d
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agentd.sock")
    }
    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Starts the daemon (again) with this test's paths; returns once it answers.
    pub fn spawn(&mut self) {
        self.spawn_from(&agentd_bin());
    }

    /// [`Daemon::spawn`] from another agentd binary (an upgrade).
    pub fn spawn_from(&mut self, bin: &Path) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let mut cmd = Command::new(bin);
        // A session of its own, as systemd starts it (and so its own share of the CPU
        // against the agents' sessions, not one shared with this test).
        // SAFETY: setsid is async-signal-safe and takes no arguments.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd
            .args(["daemon", "--socket"])
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("--audit-log")
            .arg(self.audit_log())
            .arg("--group")
            .arg(&self.group)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(90) {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the daemon exited: {st}\n{}", self.log());
            }
            if UnixStream::connect(self.socket()).is_ok() && self.client(&["stats"]).0 == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the daemon did not answer\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// `agentd ARGS --socket S`: (exit code, stdout, stderr).
    pub fn client(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(agentd_bin())
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn ps(&self) -> Vec<serde_json::Value> {
        let (code, out, err) = self.client(&["ps", "--json"]);
        assert_eq!(code, 0, "ps: {err}");
        serde_json::from_str(&out).unwrap()
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        let (code, out, err) = self.client(&["events", "--json"]);
        assert_eq!(code, 0, "events: {err}");
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// `agentd run --socket S --profile P --workspace W -- CMD` in the background.
    pub fn run(&self, profile: &Path, ws: &Path, cmd: &[&str]) -> Child {
        Command::new(agentd_bin())
            .arg("run")
            .arg("--socket")
            .arg(self.socket())
            .arg("--profile")
            .arg(profile)
            .arg("--workspace")
            .arg(ws)
            .arg("--")
            .args(cmd)
            .env("SUDO_UID", NOBODY)
            .env("SUDO_GID", NOBODY)
            // Neither may reach the supervisor (root): only what the profile passes.
            .env("LD_LIBRARY_PATH", "/nonexistent-agentd-test")
            .env("AGENTD_TEST_NOT_PASSED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Runs `agentd audit verify` on its log, asserts it passes, and returns the log.
    pub fn audit_verified(&self) -> String {
        let out = Command::new(agentd_bin())
            .args(["audit", "verify"])
            .arg(self.audit_log())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "audit verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_to_string(self.audit_log()).unwrap()
    }

    /// The events recorded in its audit log, in order.
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.audit_log())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["kind"] == "event")
            .map(|mut r| r["event"].take())
            .collect()
    }

    /// Stops it with SIGINT: the agents it still supervises are killed (SIGTERM would
    /// hand them over to a next daemon: restart.rs).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill takes a pid and a signal number; the pid is our child's.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Panics with a background client's output if it has already exited.
pub fn still_running(child: &mut Child, what: &str) {
    if let Some(st) = child.try_wait().unwrap() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        panic!("{what}: agentd run exited early ({st}): {err}");
    }
}

/// A finished background client: (exit code, stdout, stderr).
pub fn finish(child: Child) -> (i32, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------
// A user with a home, for `{home}` rules.

/// `agentd-test` (uid 64123), whose home is `/home/agentd-test`: the guests have it in
/// their passwd; on a host without it the test adds it (useradd) and removes it on drop,
/// with the home directory if the test made it.
pub struct TestUser {
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    added: bool,
    made_home: bool,
}

pub const TEST_USER: &str = "agentd-test";

impl TestUser {
    pub fn get() -> TestUser {
        let lookup = || {
            let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
            passwd.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.first() == Some(&TEST_USER)).then_some(())?;
                Some((
                    f.get(2)?.parse().ok()?,
                    f.get(3)?.parse().ok()?,
                    PathBuf::from(f.get(5)?),
                ))
            })
        };
        let mut added = false;
        let (uid, gid, home) = match lookup() {
            Some(u) => u,
            None => {
                // (useradd warns that the uid is above UID_MAX: shown only on failure.)
                let out = Command::new("useradd")
                    .args(["--no-create-home", "--home-dir", "/home/agentd-test"])
                    .args(["--uid", "64123", "--user-group", "--shell", "/bin/false"])
                    .arg(TEST_USER)
                    .output()
                    .expect("useradd");
                assert!(
                    out.status.success(),
                    "useradd {TEST_USER}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                added = true;
                lookup().expect("the user just added")
            }
        };
        let made_home = !home.exists();
        if made_home {
            std::fs::create_dir_all(&home).unwrap();
        }
        std::os::unix::fs::chown(&home, Some(uid), Some(gid)).unwrap();
        TestUser {
            uid,
            gid,
            home,
            added,
            made_home,
        }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        if self.made_home {
            let _ = std::fs::remove_dir_all(&self.home);
        }
        if self.added {
            match Command::new("userdel").arg(TEST_USER).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "userdel {TEST_USER}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => eprintln!("userdel {TEST_USER}: {e}"),
            }
        }
    }
}

/// Waits until `pred` holds, polling every 50 ms; panics naming `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, pred: impl FnMut() -> bool) {
    wait_until_or(limit, pred, || format!("timed out waiting for {what}"));
}

/// [`wait_until`], panicking with `why()`, computed only then (it may describe the state
/// that never came).
pub fn wait_until_or(limit: Duration, mut pred: impl FnMut() -> bool, why: impl Fn() -> String) {
    let started = Instant::now();
    while !pred() {
        assert!(started.elapsed() < limit, "{}", why());
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------
// A network namespace of the test's own.

/// Moves the calling thread into a network namespace of its own, whose loopback is up
/// (127.0.0.1/8 and ::1, as always) and also carries `v4` (each a /32, on aliases `lo:1`,
/// `lo:2`...) and `v6` (each a /128): addresses a test may give its listeners and its fake
/// DNS answers without touching the host's network. Panics (the test fails) if anything
/// does not work.
///
/// Namespaces belong to threads: only this thread moves, and what it creates afterwards
/// (sockets, threads, child processes: `agentd run`, `agentd daemon` and their agents)
/// lives in the new namespace. So the caller is the test's own thread and calls this
/// first, before anything binds or spawns.
///
/// No cleanup: the namespace goes away with the last thing that holds it (the test's
/// thread, when it ends, and whatever it spawned).
///
/// No `ip` binary is needed (the test guests may not have one): the interface ioctls
/// `ifconfig` uses.
pub fn private_netns(v4: &[Ipv4Addr], v6: &[Ipv6Addr]) {
    // SAFETY: unshare takes flags only; CLONE_NEWNET moves the calling thread alone.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        panic!(
            "unshare(CLONE_NEWNET): {} (a private network namespace needs CAP_SYS_ADMIN)",
            std::io::Error::last_os_error()
        );
    }
    let inet = ioctl_socket(libc::AF_INET);
    let mut req = ifreq("lo");
    ioctl(&inet, libc::SIOCGIFFLAGS, &mut req, "SIOCGIFFLAGS lo");
    // SAFETY: SIOCGIFFLAGS succeeded: it set the union's flags member.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    // IFF_UP fits a c_short (it is 1).
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ioctl(&inet, libc::SIOCSIFFLAGS, &mut req, "SIOCSIFFLAGS lo up");
    for (i, addr) in v4.iter().enumerate() {
        let label = format!("lo:{}", i + 1);
        let mut req = ifreq(&label);
        req.ifr_ifru.ifru_addr = sockaddr_v4(*addr);
        ioctl(
            &inet,
            libc::SIOCSIFADDR,
            &mut req,
            &format!("SIOCSIFADDR {label} {addr}"),
        );
        // SIOCSIFADDR gave it its class's mask (192.0.2.2: /24): a host address instead.
        req.ifr_ifru.ifru_netmask = sockaddr_v4(Ipv4Addr::BROADCAST);
        ioctl(
            &inet,
            libc::SIOCSIFNETMASK,
            &mut req,
            &format!("SIOCSIFNETMASK {label} /32"),
        );
    }
    if v6.is_empty() {
        return;
    }
    let mut req = ifreq("lo");
    ioctl(&inet, libc::SIOCGIFINDEX, &mut req, "SIOCGIFINDEX lo");
    // SAFETY: SIOCGIFINDEX succeeded: it set the union's ifindex member.
    let ifindex = unsafe { req.ifr_ifru.ifru_ifindex };
    // `ifconfig lo inet6 add ADDR/128`: SIOCSIFADDR with an in6_ifreq, on an IPv6 socket.
    let inet6 = ioctl_socket(libc::AF_INET6);
    for addr in v6 {
        let mut req = libc::in6_ifreq {
            ifr6_addr: libc::in6_addr {
                s6_addr: addr.octets(),
            },
            ifr6_prefixlen: 128,
            ifr6_ifindex: ifindex,
        };
        ioctl(
            &inet6,
            libc::SIOCSIFADDR,
            &mut req,
            &format!("SIOCSIFADDR lo {addr}/128"),
        );
    }
    // A new IPv6 address is tentative until duplicate address detection ends: skipped on
    // loopback, but done by a kernel worker, so not always by now. Bindable means ready.
    for addr in v6 {
        wait_until(
            Duration::from_secs(10),
            &format!("{addr} to be bindable"),
            || UdpSocket::bind((*addr, 0)).is_ok(),
        );
    }
}

/// A socket to address interface ioctls to.
fn ioctl_socket(family: libc::c_int) -> OwnedFd {
    // SAFETY: socket takes integers only and returns a new descriptor or -1.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(
        fd >= 0,
        "socket(family {family}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a descriptor just opened, owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// An `ifreq` naming interface `name`, its union zeroed.
fn ifreq(name: &str) -> libc::ifreq {
    assert!(
        name.len() < libc::IFNAMSIZ,
        "interface name {name:?} too long"
    );
    // SAFETY: ifreq is plain C data (integers, arrays, a union of such and of a pointer,
    // here null): all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (c, b) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *c = libc::c_char::from_ne_bytes([b]);
    }
    req
}

/// `addr` as the `struct sockaddr` an ifreq holds (a sockaddr_in: family, port 0, address).
fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let mut sa_data = [0 as libc::c_char; 14];
    for (c, b) in sa_data[2..6].iter_mut().zip(addr.octets()) {
        *c = libc::c_char::from_ne_bytes([b]);
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data,
    }
}

/// `ioctl(fd, request, arg)`, panicking with `what` when it fails.
fn ioctl<T>(fd: &OwnedFd, request: libc::Ioctl, arg: &mut T, what: &str) {
    // SAFETY: every request passed here reads and writes one struct of the type `arg`
    // points to (an ifreq, or an in6_ifreq for SIOCSIFADDR on an IPv6 socket), live and
    // exclusively borrowed for the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(arg)) };
    assert!(ret == 0, "{what}: {}", std::io::Error::last_os_error());
}
