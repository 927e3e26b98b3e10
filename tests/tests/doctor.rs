//! `agentd doctor` against the real host: each answer is checked against a probe the test
//! makes itself (a syscall, a BPF program load), not against a hard-coded expectation.

use std::{
    fs,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use agentd_tests::{agentd_bin, bpf_lsm_probe, require_root, stderr, stdout};
use serde_json::Value;

/// Runs `agentd doctor ARGS` and returns its pid with its output (the pid names the
/// scratch cgroup it creates).
fn doctor(args: &[&str], uid: Option<u32>) -> (u32, Output) {
    let mut cmd = Command::new(agentd_bin());
    cmd.arg("doctor")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let bin_copy;
    if let Some(uid) = uid {
        // The workspace's target directory may not be reachable for an unprivileged
        // user: run a copy from a world-readable directory.
        bin_copy = tempfile::tempdir().unwrap();
        fs::set_permissions(bin_copy.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let bin = bin_copy.path().join("agentd");
        fs::copy(agentd_bin(), &bin).unwrap();
        cmd = Command::new(&bin);
        cmd.arg("doctor")
            .args(args)
            .uid(uid)
            .gid(uid)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }
    let child = cmd.spawn().expect("cannot run agentd doctor");
    let pid = child.id();
    (pid, child.wait_with_output().unwrap())
}

fn json(o: &Output) -> Value {
    serde_json::from_str(&stdout(o)).unwrap_or_else(|e| {
        panic!(
            "doctor --json printed no JSON ({e}):\n{}\n{}",
            stdout(o),
            stderr(o)
        )
    })
}

/// The kernel's Landlock ABI, asked directly.
fn landlock_abi() -> i64 {
    // SAFETY: a null attr with size 0 and LANDLOCK_CREATE_RULESET_VERSION (1) reads no
    // memory and only returns the version.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32,
        )
    }
}

/// cgroup v2 mount points from /proc/self/mountinfo.
fn cgroup2_mounts() -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            (post.split(' ').next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect()
}

fn errno_name(errno: i32) -> Option<&'static str> {
    Some(match errno {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::ENOENT => "ENOENT",
        libc::E2BIG => "E2BIG",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        _ => return None,
    })
}

/// Scratch cgroups `agentd-doctor-<pid>` under `mount` whose doctor is gone: leaks.
fn leaked_scratch_cgroups(mount: &Path) -> Vec<PathBuf> {
    fs::read_dir(mount)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix("agentd-doctor-")?;
            let alive = Path::new("/proc").join(pid).exists();
            (!alive).then(|| e.path())
        })
        .collect()
}

#[test]
fn doctor_json_matches_what_the_host_does() {
    if !require_root() {
        return;
    }
    let (pid, out) = doctor(&["--json"], None);
    let report = json(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "doctor says this host cannot enforce: {}\n{}",
        report["missing"],
        stderr(&out)
    );
    assert_eq!(report["enforcement_ready"], true);
    assert_eq!(report["missing"], serde_json::json!([]));

    // Landlock: the ABI doctor reports is what the kernel tells us.
    let abi = landlock_abi();
    assert!(abi >= 1, "landlock_create_ruleset(VERSION) returned {abi}");
    assert_eq!(report["landlock"]["abi"], abi, "{}", report["landlock"]);
    assert_eq!(report["landlock"]["usable"], true);

    // cgroup socket programs load and attach (a requirement: exit 0 implies it).
    assert_eq!(
        report["bpf"]["cgroup_sock_addr"]["usable"], true,
        "{}",
        report["bpf"]
    );
    assert_eq!(report["bpf"]["ring_buffer"]["usable"], true);
    assert_eq!(report["bpf"]["tracepoint"]["usable"], true);

    // BPF LSM: what a raw BPF_PROG_LOAD + attach of our own says, and whether `bpf` is an
    // active LSM.
    let lsm = &report["bpf"]["lsm"];
    let listed = fs::read_to_string("/sys/kernel/security/lsm")
        .unwrap()
        .trim()
        .split(',')
        .any(|m| m == "bpf");
    let direct = bpf_lsm_probe();
    eprintln!("bpf in the active LSMs: {listed}; raw BPF LSM load+attach: {direct:?}");
    match direct {
        Ok(()) => assert_eq!(lsm["usable"], listed, "{lsm}"),
        Err(errno) => {
            assert_eq!(lsm["usable"], false, "{lsm}");
            if let Some(name) = errno_name(errno)
                && errno != libc::ENOENT
            {
                assert_eq!(lsm["errno"], name, "{lsm}");
            }
            if listed && errno == libc::EPERM {
                let error = lsm["error"].as_str().unwrap();
                assert!(
                    error.contains("EPERM") && error.contains("refused"),
                    "bpf is an active LSM and the kernel refused the program: doctor must say so, said {lsm}"
                );
            }
        }
    }

    // cgroup v2: the mount point in /proc/self/mountinfo.
    let mounts = cgroup2_mounts();
    let mount = PathBuf::from(report["cgroup"]["mount"].as_str().unwrap());
    assert!(mounts.contains(&mount), "{mount:?} not in {mounts:?}");
    if let [only] = mounts.as_slice() {
        assert_eq!(&mount, only);
    }
    assert_eq!(report["cgroup"]["kill"]["usable"], true);

    // The scratch cgroup is gone, and no earlier doctor left one.
    let scratch = mount.join(format!("agentd-doctor-{pid}"));
    assert!(!scratch.exists(), "{} was left behind", scratch.display());
    assert_eq!(leaked_scratch_cgroups(&mount), Vec::<PathBuf>::new());
}

#[test]
fn doctor_human_output_agrees_with_json() {
    if !require_root() {
        return;
    }
    let (_, out) = doctor(&[], None);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    assert!(text.ends_with("verdict: ready to enforce\n"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    let abi = landlock_abi();
    let abi = abi.to_string();
    assert!(
        text.lines().any(|l| l.split_whitespace().take(4).eq([
            "ok",
            "landlock",
            "ABI",
            abi.as_str()
        ])),
        "{text}"
    );
    let lsm_line = text
        .lines()
        .find(|l| l.contains("bpf lsm"))
        .unwrap_or_else(|| panic!("no bpf lsm line:\n{text}"));
    let (_, json_out) = doctor(&["--json"], None);
    let usable = json(&json_out)["bpf"]["lsm"]["usable"] == true;
    assert_eq!(
        lsm_line.trim_start().starts_with("ok"),
        usable,
        "{lsm_line}"
    );
}

/// Unprivileged, doctor must blame the missing privilege, not the kernel, and exit 1.
#[test]
fn doctor_without_root_says_needs_root() {
    if !require_root() {
        return;
    }
    let nobody = 65534;
    let (pid, out) = doctor(&["--json"], Some(nobody));
    let report = json(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert_eq!(report["enforcement_ready"], false);
    let missing = report["missing"].as_array().unwrap();
    assert!(missing.contains(&"root".into()), "{missing:?}");
    for probe in ["ring_buffer", "cgroup_sock_addr", "tracepoint", "lsm"] {
        let p = &report["bpf"][probe];
        assert_eq!(p["usable"], false, "{probe}: {p}");
        assert_eq!(p["reason"], "needs_root", "{probe}: {p}");
        assert!(
            p["error"].as_str().unwrap().starts_with("needs root"),
            "{probe}: {p}"
        );
    }
    // Landlock and seccomp need no privilege: their answers do not change.
    assert_eq!(report["landlock"]["abi"], landlock_abi());
    let mount = PathBuf::from(report["cgroup"]["mount"].as_str().unwrap());
    assert!(!mount.join(format!("agentd-doctor-{pid}")).exists());
}
