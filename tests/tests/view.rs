//! The agent's own view of the filesystem (its private mount namespace), on every host,
//! with BPF LSM or without: what the agent wrote cannot be mapped executable, host service
//! sockets under /run it was not given are not there, it cannot change its mounts, and
//! nothing of the view is left on the host. Also truncation by path outside its write
//! scope, which Landlock decides only from ABI 3 (seccomp refuses it below).

use std::{
    io::Read as _,
    os::unix::{fs::PermissionsExt as _, net::UnixListener},
    path::{Path, PathBuf},
};

use agentd_tests::{
    AgentRun, DEFAULT_LIMITS, Daemon, PY_ATTEMPT, Run, agent_dir, profile_file, require_root,
    test_profile,
};

/// The test profile, with /tmp readable and writable but not executable (the workspace,
/// beneath it, is), `extra` appended.
fn view_profile(extra: &str) -> String {
    test_profile(
        "view",
        "invoker",
        DEFAULT_LIMITS,
        &format!("[breaker]\ntrip_on = [\"canary\"]\n{extra}"),
    )
    .replace("read = [", "read = [\"/tmp\", ")
    .replace("write = [", "write = [\"/tmp\", ")
    .replace("exec = [", "exec = [\"{workspace}\", ")
}

fn run(profile: &str, ws: &Path, script: &str) -> Run {
    let (_p, profile) = profile_file(profile);
    // The events file where the agent cannot write (it may write /tmp).
    AgentRun::new(profile.to_str().unwrap(), ws)
        .events_in(Path::new("/var/tmp"))
        .python(&format!("{PY_ATTEMPT}\n{script}"))
        .run()
}

/// The mounts of the host (this test's mount namespace): none of an agent's may remain.
fn host_mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

const NOEXEC: &str = r#"
import mmap, shutil, subprocess
tag = str(os.getpid())
payload = "/tmp/agentd-view-payload-" + tag
shutil.copy("/usr/bin/true", payload)
os.chmod(payload, 0o755)
# The program loader maps it executable: refused on a noexec mount.
loader = "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
r = subprocess.run([loader, payload], capture_output=True)
out["ld_so"] = r.returncode
out["ld_so_err"] = r.stderr.decode()[-200:]
def map_exec():
    fd = os.open(payload, os.O_RDONLY)
    try:
        mmap.mmap(fd, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC, flags=mmap.MAP_PRIVATE)
    finally:
        os.close(fd)
attempt("mmap_exec", map_exec)
attempt("exec", lambda: subprocess.run([payload]))
os.unlink(payload)
# The workspace, which `exec` covers, runs what the agent builds there.
shutil.copy("/usr/bin/true", "built")
os.chmod("built", 0o755)
out["ws_exec"] = subprocess.run(["./built"]).returncode
print(json.dumps(out))
"#;

fn assert_noexec(run: &Run) {
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    assert_ne!(r["ld_so"], 0, "ld.so ran a file the agent wrote: {r}");
    assert!(
        r["ld_so_err"]
            .as_str()
            .unwrap()
            .contains("failed to map segment"),
        "{r}"
    );
    // EPERM from the noexec mount; EACCES where BPF LSM runs (asked first).
    let mmap = r["mmap_exec"].as_i64().unwrap() as i32;
    assert!([libc::EPERM, libc::EACCES].contains(&mmap), "{r}");
    assert_eq!(r["exec"], libc::EACCES, "{r}");
    assert_eq!(r["ws_exec"], 0, "{r}\n{}", run.explain());
}

/// `ld.so /tmp/payload` (and any executable mapping or exec of a file in a writable tree
/// the profile grants no exec on) fails, without BPF LSM; the workspace, which `exec`
/// covers, still runs what the agent builds. (Through the daemon: below.)
#[test]
fn what_the_agent_wrote_outside_its_exec_trees_cannot_be_mapped_executable() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(true);
    let profile = view_profile("");
    let before = host_mounts();
    assert_noexec(&run(&profile, ws.path(), NOEXEC));
    assert_eq!(host_mounts(), before, "mounts left on the host");
}

/// A socket a host service listens on, in a directory of its own under /run; removed on
/// drop.
struct HostSocket {
    dir: PathBuf,
    listener: UnixListener,
}

impl HostSocket {
    fn new(name: &str) -> HostSocket {
        let dir = PathBuf::from(format!(
            "/run/agentd-view-test-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("service.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // Anyone may connect, as with docker.sock for its group or D-Bus for everyone:
        // file permissions alone would let the agent in.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        listener.set_nonblocking(true).unwrap();
        HostSocket { dir, listener }
    }
    fn path(&self) -> PathBuf {
        self.dir.join("service.sock")
    }
    /// How many connections reached the service.
    fn accepted(&self) -> usize {
        let mut n = 0;
        while let Ok((mut s, _)) = self.listener.accept() {
            let mut b = [0u8; 1];
            let _ = s.read(&mut b);
            n += 1;
        }
        n
    }
}

impl Drop for HostSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The profile listing `listed` in `network.unix`, and the script connecting to both.
fn sockets_case(listed: &HostSocket, unlisted: &HostSocket) -> (String, String) {
    let profile = view_profile(&format!(
        "[network]\nunix = [{:?}]\n",
        listed.path().to_str().unwrap()
    ))
    .replace("[network]\nconnect = []\nbind = []\n", "");
    let script = format!(
        r#"
def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    finally:
        s.close()
attempt("listed", lambda: connect({listed:?}))
attempt("unlisted", lambda: connect({unlisted:?}))
attempt("list_run", lambda: os.stat({unlisted_dir:?}))
print(json.dumps(out))
"#,
        listed = listed.path().to_str().unwrap(),
        unlisted = unlisted.path().to_str().unwrap(),
        unlisted_dir = unlisted.dir.to_str().unwrap(),
    );
    (profile, script)
}

/// A listed socket in a directory the agent's user cannot enter on the host (another
/// user's 0700 `/run/user/UID`) stays out of its reach in its view: the private /run's
/// directories have the host's owners and modes.
#[test]
fn a_listed_socket_is_no_easier_to_reach_than_on_the_host() {
    if !require_root() {
        return;
    }
    let private = HostSocket::new("private");
    std::fs::set_permissions(&private.dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let other = HostSocket::new("other");
    let (profile, script) = sockets_case(&private, &other);
    let ws = agent_dir(true);
    let r = run(&profile, ws.path(), &script);
    assert_eq!(r.code(), 0, "{}", r.explain());
    let out = r.json();
    assert_eq!(out["listed"], libc::EACCES, "{out}");
    assert_eq!(
        private.accepted(),
        0,
        "the socket behind a 0700 directory was reached"
    );
}

/// A host service's socket under /run that `network.unix` does not list is not in the
/// agent's view (ENOENT), though its file permissions would let the agent in; a listed
/// one is reachable. Without BPF LSM. (Through the daemon: below.)
#[test]
fn host_sockets_under_run_are_out_of_reach_unless_listed() {
    if !require_root() {
        return;
    }
    let listed = HostSocket::new("listed");
    let unlisted = HostSocket::new("unlisted");
    let (profile, script) = sockets_case(&listed, &unlisted);
    let ws = agent_dir(true);
    let r = run(&profile, ws.path(), &script);
    assert_eq!(r.code(), 0, "{}", r.explain());
    let out = r.json();
    assert_eq!(out["listed"], 0, "{out}\n{}", r.explain());
    assert_eq!(out["unlisted"], libc::ENOENT, "{out}");
    assert_eq!(out["list_run"], libc::ENOENT, "{out}");
    assert_eq!(listed.accepted(), 1);
    assert_eq!(unlisted.accepted(), 0, "the unlisted service was reached");
}

/// The agent cannot unmount, remount, bind or make a namespace of its own: its view is
/// fixed. And no mount of it is left on the host after it ends.
#[test]
fn the_agent_cannot_change_its_view_and_nothing_of_it_is_left() {
    if !require_root() {
        return;
    }
    let before = host_mounts();
    let ws = agent_dir(true);
    let script = r#"
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    def f():
        if getattr(libc, name)(*args) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    return f
attempt("umount_tmp", call("umount2", b"/tmp", 2))
attempt("remount_run_rw", call("mount", None, b"/run", None, 32 | 1 << 12, None))
attempt("bind", call("mount", b"/tmp", b"/run", None, 4096, None))
attempt("unshare_mnt", call("unshare", 0x00020000))
attempt("write_run", lambda: open("/run/x", "w").close())
print(json.dumps(out))
"#;
    let r = run(&view_profile(""), ws.path(), script);
    assert_eq!(r.code(), 0, "{}", r.explain());
    let out = r.json();
    for call in ["umount_tmp", "remount_run_rw", "bind", "unshare_mnt"] {
        assert_eq!(out[call], libc::EPERM, "{call}: {out}");
    }
    assert_ne!(out["write_run"], 0, "{out}");
    assert_eq!(host_mounts(), before, "mounts left on the host");
}

/// Truncating a file by path outside the write scope, which the agent's uid may write by
/// file permissions, is refused on every kernel: by Landlock from ABI 3, by seccomp
/// below it (Debian 6.1's kernel has ABI 2). Truncating inside the scope works where
/// Landlock decides it; ftruncate of a file opened for writing works everywhere.
#[test]
fn truncation_by_path_outside_the_write_scope_is_refused_on_every_kernel() {
    if !require_root() {
        return;
    }
    // Outside every write grant of the profile (which grants /tmp).
    let outside = tempfile::Builder::new()
        .prefix("agentd-view-test-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let victim = outside.path().join("victim.txt");
    std::fs::write(&victim, "keep me\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o666)).unwrap();
    let ws = agent_dir(true);
    std::fs::write(ws.path().join("mine.txt"), "mine\n").unwrap();
    std::fs::set_permissions(
        ws.path().join("mine.txt"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let script = format!(
        r#"
attempt("outside", lambda: os.truncate({victim:?}, 0))
def ftrunc():
    with open("mine.txt", "r+") as f:
        os.ftruncate(f.fileno(), 1)
attempt("ftruncate_inside", ftrunc)
print(json.dumps(out))
"#,
        victim = victim.to_str().unwrap()
    );
    let r = run(&view_profile(""), ws.path(), &script);
    assert_eq!(r.code(), 0, "{}", r.explain());
    let out = r.json();
    let abi = agentd_tests::landlock_abi();
    let errno = out["outside"].as_i64().unwrap() as i32;
    assert!(
        [libc::EACCES, libc::EPERM].contains(&errno),
        "truncate outside the write scope (Landlock ABI {abi}): {out}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me\n");
    assert_eq!(out["ftruncate_inside"], 0, "{out}");
    assert_eq!(
        std::fs::read_to_string(ws.path().join("mine.txt")).unwrap(),
        "m"
    );
}

/// Through the daemon (whose supervisors build the same view): what the agent wrote in
/// /tmp cannot be mapped executable, and an unlisted host socket under /run is not there.
#[test]
fn the_view_through_the_daemon() {
    if !require_root() {
        return;
    }
    let before = host_mounts();
    let ws = agent_dir(true);
    let d = Daemon::start();
    let agent = |profile: &str, script: &str| -> serde_json::Value {
        let (_p, path) = profile_file(profile);
        let o = d
            .run(
                &path,
                ws.path(),
                &["/usr/bin/python3", "-c", &format!("{PY_ATTEMPT}\n{script}")],
            )
            .wait_with_output()
            .unwrap();
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stderr)))
    };
    let r = agent(&view_profile(""), NOEXEC);
    let mmap = r["mmap_exec"].as_i64().unwrap() as i32;
    assert!([libc::EPERM, libc::EACCES].contains(&mmap), "{r}");
    assert_eq!(r["exec"], libc::EACCES, "{r}");
    assert_eq!(r["ws_exec"], 0, "{r}");

    let listed = HostSocket::new("dlisted");
    let unlisted = HostSocket::new("dunlisted");
    let (profile, script) = sockets_case(&listed, &unlisted);
    let out = agent(&profile, &script);
    assert_eq!(out["listed"], 0, "{out}");
    assert_eq!(out["unlisted"], libc::ENOENT, "{out}");
    assert_eq!(listed.accepted(), 1);
    assert_eq!(unlisted.accepted(), 0, "the unlisted service was reached");
    drop(d);
    assert_eq!(host_mounts(), before, "mounts left on the host");
}
