//! Attempts to reach outside the workspace by indirection, under a profile that lets the
//! agent write its workspace: the kernel must say no and nothing outside may change.

use std::{os::unix::fs::PermissionsExt as _, path::Path};

use agentd_tests::{
    AgentRun, DEFAULT_LIMITS, PY_ATTEMPT, Run, agent_dir, bpf_lsm_usable, landlock_abi,
    profile_file, require_root, test_profile,
};

/// Runs `script` (python3) under a workspace-writable profile and returns its JSON output.
fn attempt(ws: &Path, script: &str) -> serde_json::Value {
    attempt_run(ws, script).0
}

/// [`attempt`], with the run (its events).
fn attempt_run(ws: &Path, script: &str) -> (serde_json::Value, Run) {
    // No breaker: the refusals themselves are under test.
    let text = test_profile(
        "escape",
        "invoker",
        DEFAULT_LIMITS,
        "[breaker]\ntrip_on = [\"canary\"]\n",
    );
    let (_p, profile) = profile_file(&text);
    let run = AgentRun::new(profile.to_str().unwrap(), ws)
        .python(script)
        .run();
    assert_eq!(run.code(), 0, "{}", run.explain());
    (run.json(), run)
}

/// The refused file event of `kind` on `path` (absolute, as the kernel resolved it):
/// Landlock's, with EACCES (or EXDEV, Landlock's answer to some renames and links).
fn assert_refused_by_landlock(run: &Run, kind: &str, field: &str, path: &Path) {
    let path = path.to_str().unwrap();
    let e = run
        .events
        .iter()
        .find(|e| e["kind"] == kind && e[field] == path && e["verdict"] == "deny")
        .unwrap_or_else(|| panic!("no refused {kind} with {field} {path}\n{}", run.explain()));
    assert_eq!(e["layer"], "landlock", "{e}");
    assert!(
        e["errno"] == libc::EACCES || (kind == "file_rename" && e["errno"] == libc::EXDEV),
        "{e}"
    );
}

/// A world-writable directory outside the workspace with one world-writable file, so that
/// only agentd's confinement can refuse changes to it.
fn outside() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = agent_dir(true);
    let file = dir.path().join("precious.txt");
    std::fs::write(&file, "original\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    (dir, file)
}

fn unchanged(file: &Path) {
    assert_eq!(
        std::fs::read_to_string(file).unwrap(),
        "original\n",
        "{} changed",
        file.display()
    );
}

#[test]
fn run_escape_through_a_planted_symlink_is_refused() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(true);
    let (_o, target) = outside();
    let outside_dir = target.parent().unwrap().canonicalize().unwrap();
    std::os::unix::fs::symlink(&target, ws.path().join("link")).unwrap();
    std::os::unix::fs::symlink(&outside_dir, ws.path().join("dirlink")).unwrap();
    let up = format!(
        "../{}/dotdot.txt",
        outside_dir.file_name().unwrap().to_str().unwrap()
    );
    let (r, run) = attempt_run(
        ws.path(),
        &format!(
            "{PY_ATTEMPT}\nattempt('write', lambda: open('link', 'w').write('pwned'))\nattempt('append', lambda: open('link', 'a').write('pwned'))\nattempt('dir', lambda: open('dirlink/new.txt', 'w').write('pwned'))\nattempt('dotdot', lambda: open({up:?}, 'w').write('pwned'))\nprint(json.dumps(out))"
        ),
    );
    for op in ["write", "append", "dir", "dotdot"] {
        assert_eq!(r[op], libc::EACCES, "{op}: {r}");
    }
    unchanged(&target);
    assert!(!outside_dir.join("new.txt").exists() && !outside_dir.join("dotdot.txt").exists());
    // Each refusal names the file the kernel would have written, not the spelling.
    let target = target.canonicalize().unwrap();
    assert_refused_by_landlock(&run, "file_write", "path", &target);
    assert_refused_by_landlock(&run, "file_write", "path", &outside_dir.join("new.txt"));
    assert_refused_by_landlock(&run, "file_write", "path", &outside_dir.join("dotdot.txt"));
}

#[test]
fn run_escape_by_hardlink_rename_truncate_chmod_is_refused() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(true);
    let (_o, target) = outside();
    let mine = ws.path().join("mine.txt");
    std::fs::write(&mine, "agent's\n").unwrap();
    std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o666)).unwrap();
    let outside_dir = target.parent().unwrap();
    let script = format!(
        "{PY_ATTEMPT}\n\
         attempt('hardlink', lambda: os.link({t:?}, 'hl'))\n\
         attempt('rename_out', lambda: os.rename('mine.txt', {dest:?}))\n\
         attempt('rename_in', lambda: os.rename({t:?}, 'stolen.txt'))\n\
         attempt('truncate', lambda: os.truncate({t:?}, 0))\n\
         attempt('chmod', lambda: os.chmod({t:?}, 0o777))\n\
         attempt('unlink', lambda: os.unlink({t:?}))\n\
         print(json.dumps(out))",
        t = target.display().to_string(),
        dest = outside_dir.join("moved.txt").display().to_string(),
    );
    let (r, run) = attempt_run(ws.path(), &script);
    // The rename out of the workspace, as an event naming both ends.
    let dest = outside_dir.canonicalize().unwrap().join("moved.txt");
    assert_refused_by_landlock(&run, "file_rename", "path2", &dest);
    // Landlock: linking and renaming across the workspace boundary need rights on both
    // sides (REFER), truncate needs TRUNCATE; chmod is refused by ownership (root's file).
    // Landlock confines truncate from ABI 3 (SECURITY.md, "Older kernels"): below it
    // seccomp refuses truncate(2) (EPERM), and this world-writable file is not truncated.
    if landlock_abi() < 3 {
        assert_eq!(
            r["truncate"],
            libc::EPERM,
            "truncate below Landlock ABI 3: {r}"
        );
    }
    for (op, want) in [
        ("hardlink", libc::EXDEV),
        ("rename_out", libc::EXDEV),
        ("rename_in", libc::EXDEV),
        ("truncate", libc::EACCES),
        ("unlink", libc::EACCES),
    ] {
        if op == "truncate" && landlock_abi() < 3 {
            continue;
        }
        let got = r[op].as_i64().unwrap();
        assert!(
            got == i64::from(want) || got == i64::from(libc::EACCES),
            "{op}: {r}"
        );
    }
    assert_eq!(r["chmod"], libc::EPERM, "{r}");
    unchanged(&target);
    assert_eq!(
        std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
        0o666
    );
    assert!(mine.exists(), "the workspace file was not moved out");
    assert!(!outside_dir.join("moved.txt").exists());
    assert!(!ws.path().join("hl").exists() && !ws.path().join("stolen.txt").exists());
}

#[test]
fn run_escape_device_nodes_and_fifos_outside() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(true);
    let (_o, target) = outside();
    let outside_fifo = target.parent().unwrap().join("fifo");
    let script = format!(
        "{PY_ATTEMPT}\nimport stat\n\
         attempt('chardev', lambda: os.mknod('null2', 0o666 | stat.S_IFCHR, os.makedev(1, 3)))\n\
         attempt('blockdev', lambda: os.mknod('sda2', 0o666 | stat.S_IFBLK, os.makedev(8, 0)))\n\
         attempt('fifo_outside', lambda: os.mkfifo({f:?}))\n\
         print(json.dumps(out))",
        f = outside_fifo.display().to_string()
    );
    let r = attempt(ws.path(), &script);
    for op in ["chardev", "blockdev"] {
        let got = r[op].as_i64().unwrap();
        assert!(
            got == i64::from(libc::EPERM) || got == i64::from(libc::EACCES),
            "{op}: {r}"
        );
    }
    assert_eq!(r["fifo_outside"], libc::EACCES, "{r}");
    assert!(!ws.path().join("null2").exists() && !ws.path().join("sda2").exists());
    assert!(!outside_fifo.exists());
}

#[test]
fn run_escape_from_the_cgroup_is_refused() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(true);
    let script = format!(
        "{PY_ATTEMPT}\n\
         before = open('/proc/self/cgroup').read()\n\
         for root in ['/sys/fs/cgroup/unified', '/sys/fs/cgroup']:\n\
         \x20   attempt('join_' + root, lambda: open(root + '/cgroup.procs', 'w').write(str(os.getpid())))\n\
         out['after_same'] = open('/proc/self/cgroup').read() == before\n\
         out['in_agent'] = '/agentd/' in before\n\
         print(json.dumps(out))"
    );
    let r = attempt(ws.path(), &script);
    for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let got = &r[format!("join_{root}")];
        assert!(got.as_i64().is_some_and(|e| e != 0), "{root}: {r}");
    }
    assert_eq!(r["in_agent"], true, "{r}");
    assert_eq!(r["after_same"], true, "{r}");
}

/// Code the agent writes to memory (a memfd) and executes: Landlock's `exec` rules cannot
/// see a file no path names. Needs nothing optional, and behaves by what the kernel has
/// (both documented in SECURITY.md): with BPF LSM, `bprm_check_security` refuses the exec
/// with EACCES before the kernel loads the file (`layer: bpf-lsm`); without (this
/// project's host), the `sched_process_exec` program kills the process before its first
/// instruction (`layer: bpf`).
#[test]
fn run_escape_by_exec_of_a_memfd_is_killed() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(true);
    let script = r#"
import json, os
fd = os.memfd_create("payload", 0)
os.write(fd, open("/usr/bin/true", "rb").read())
out = {}
for how in ["fexecve", "proc_fd"]:
    pid = os.fork()
    if pid == 0:
        try:
            if how == "fexecve":
                os.execve(fd, ["payload"], {})
            else:
                os.execve("/proc/self/fd/%d" % fd, ["payload"], {})
        except OSError as e:
            os._exit(100 + e.errno)
    _, st = os.waitpid(pid, 0)
    out[how] = os.waitstatus_to_exitcode(st)
# A program on the filesystem still runs.
pid = os.fork()
if pid == 0:
    os.execve("/usr/bin/true", ["true"], {})
_, st = os.waitpid(pid, 0)
out["true"] = os.waitstatus_to_exitcode(st)
print(json.dumps(out))
"#;
    let (r, run) = attempt_run(ws.path(), script);
    let lsm = bpf_lsm_usable();
    // The child's exit: 100 + errno when execve failed, -signal when it was killed.
    let expected = if lsm {
        100 + libc::EACCES
    } else {
        -libc::SIGKILL
    };
    assert_eq!(r["fexecve"], expected, "BPF LSM {lsm}: {r}");
    assert_eq!(r["proc_fd"], expected, "BPF LSM {lsm}: {r}");
    assert_eq!(r["true"], 0, "{r}");
    let layer = if lsm { "bpf-lsm" } else { "bpf" };
    let refused: Vec<_> = run
        .events
        .iter()
        .filter(|e| e["kind"] == "exec" && e["verdict"] == "deny" && e["layer"] == layer)
        .collect();
    // Identical refusals within a second are one record with their count.
    assert_eq!(
        agentd_tests::counted(refused.iter().copied()),
        2,
        "{}",
        run.explain()
    );
    for e in refused {
        assert!(
            e["detail"]["reason"].as_str().unwrap().contains("memfd"),
            "{e}"
        );
        if lsm {
            assert_eq!(e["errno"], libc::EACCES, "{e}");
        } else {
            assert_eq!(
                e["detail"]["action"], "the process was killed at exec",
                "{e}"
            );
        }
    }
}

/// Code the agent wrote, run without exec: the program loader maps `./payload` itself
/// (`ld.so ./payload`), or the agent maps it (or a memfd) executable. Landlock's `exec`
/// rules see neither. Where BPF LSM runs, `mmap_file` and `file_mprotect` refuse an
/// executable mapping of a file beneath a write path and no exec path, or of a memfd
/// (EACCES, an `exec` event of `layer: bpf-lsm`), while the system's files map as
/// before. Without BPF LSM (this project's host) the agent's view refuses the payload's:
/// the workspace, which this profile grants no exec on, is mounted noexec (EPERM for
/// mmap, EACCES for mprotect); a memfd maps executable there, the documented gap
/// (SECURITY.md), asserted so that a change in it is noticed.
#[test]
fn run_escape_by_mapping_written_code_is_refused_where_bpf_lsm_runs() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(true);
    let script = r#"
import ctypes, json, mmap, os, shutil
out = {}
with open("/usr/bin/true", "rb") as src, open("payload", "wb") as dst:
    dst.write(src.read())
pid = os.fork()
if pid == 0:
    fd = os.open("/dev/null", os.O_WRONLY)
    os.dup2(fd, 2)
    os.execv("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", ["ld.so", "./payload"])
_, st = os.waitpid(pid, 0)
out["ld_so"] = os.waitstatus_to_exitcode(st)
def m(fd, prot):
    try:
        mmap.mmap(fd, 4096, flags=mmap.MAP_PRIVATE, prot=prot)
        return 0
    except OSError as e:
        return e.errno
payload = os.open("payload", os.O_RDONLY)
system = os.open("/usr/bin/true", os.O_RDONLY)
memfd = os.memfd_create("code")
os.write(memfd, bytes(4096))
out["payload_exec"] = m(payload, mmap.PROT_READ | mmap.PROT_EXEC)
out["payload_read"] = m(payload, mmap.PROT_READ)
out["system_exec"] = m(system, mmap.PROT_READ | mmap.PROT_EXEC)
out["memfd_exec"] = m(memfd, mmap.PROT_READ | mmap.PROT_EXEC)
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
addr = libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_PRIVATE, payload, 0)
rc = libc.mprotect(addr, 4096, mmap.PROT_READ | mmap.PROT_EXEC)
out["payload_mprotect"] = 0 if rc == 0 else ctypes.get_errno()
print(json.dumps(out))
"#;
    let (r, run) = attempt_run(ws.path(), script);
    let lsm = bpf_lsm_usable();
    assert_eq!(r["payload_read"], 0, "{r}");
    assert_eq!(r["system_exec"], 0, "{r}");
    let mapped: Vec<_> = run
        .events
        .iter()
        .filter(|e| e["kind"] == "exec" && e["layer"] == "bpf-lsm")
        .collect();
    // The loader cannot map the payload's code: "failed to map segment", exit 127.
    assert_eq!(r["ld_so"], 127, "{r}");
    if !lsm {
        assert_eq!(r["payload_exec"], libc::EPERM, "noexec: {r}");
        assert_eq!(r["payload_mprotect"], libc::EACCES, "noexec: {r}");
        assert_eq!(r["memfd_exec"], 0, "without BPF LSM, memfd_exec: {r}");
        assert!(mapped.is_empty(), "{}", run.explain());
        return;
    }
    for refused in ["payload_exec", "memfd_exec", "payload_mprotect"] {
        assert_eq!(r[refused], libc::EACCES, "{refused}: {r}");
    }
    let payload = ws.path().canonicalize().unwrap().join("payload");
    let calls: Vec<(&str, &str)> = mapped
        .iter()
        .map(|e| {
            assert_eq!(e["verdict"], "deny", "{e}");
            assert_eq!(e["errno"], libc::EACCES, "{e}");
            (
                e["path"].as_str().unwrap_or(""),
                e["detail"]["call"].as_str().unwrap(),
            )
        })
        .collect();
    let payload = payload.to_str().unwrap();
    // (An mprotect of a mapping from a noexec mount is refused before BPF LSM is asked.)
    assert!(
        calls.contains(&(payload, "mmap")),
        "{calls:?}\n{}",
        run.explain()
    );
}
