//! The kernel watch end to end, through `agentd-harness watch-test`: real BPF programs,
//! a real cgroup, a child under Landlock and seccomp doing allowed and forbidden things,
//! a process outside the cgroup, the kill flag, removal. The binary prints one JSON
//! document of named checks; this test fails naming every check that failed.

use agentd_tests::{harness, require_root, stderr, stdout};
use serde_json::Value;

fn run_selftest() -> Value {
    let out = harness(&["watch-test"]);
    let text = stdout(&out);
    let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "watch-test printed no JSON ({e}); status {}\nstdout: {text}\nstderr: {}",
            out.status,
            stderr(&out)
        )
    });
    let failed: Vec<String> = doc["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["ok"] != true)
        .map(|c| format!("{}: {}", c["name"], c["detail"]))
        .collect();
    assert!(
        failed.is_empty() && out.status.success(),
        "watch-test: {} check(s) failed (status {}):\n  {}\nfacts: {}\nstderr: {}",
        failed.len(),
        out.status,
        failed.join("\n  "),
        doc["facts"],
        stderr(&out)
    );
    doc
}

#[test]
fn bpf_watch_enforces_network_and_reports_files_execs_and_canaries() {
    if !require_root() {
        return;
    }
    let doc = run_selftest();
    let checks = doc["checks"].as_array().unwrap();
    // The self-test must have exercised every area, not passed by checking little.
    for must in [
        "event: connect denied with EPERM",
        "event: IPv4-mapped IPv6 connect decided by the v4 rule",
        "event: UDP sendto denied",
        "event: bind denied",
        "event: raw socket refused",
        "event: write outside, denied by landlock with EACCES",
        "event: mkdir refused by seccomp is reported (layer seccomp, EPERM)",
        "event: unshare refused by seccomp (kind syscall, layer seccomp, EPERM)",
        "event: mount refused by seccomp (kind syscall, layer seccomp, EPERM)",
        "event: umount2 refused by seccomp (kind syscall, layer seccomp, EPERM)",
        "no syscall event for a process outside the cgroup",
        "no syscall event for the socket the cgroup program refused and reported",
        "event: canary open that failed (ENOENT) still reported",
        "no canary event for a sibling sharing the prefix (canaryfoo)",
        "event: canary opened by a relative path, refused, resolved",
        "event: exec /bin/true with argv and the new comm",
        "event: monitor-mode connect recorded as deny, flagged monitor, no errno",
        "outside process connects to the port the agent may not",
        "no event for the process outside the cgroup",
        "killed agent's process is SIGKILLed by the kill gate",
        "killed agent's process completes no system call after the flag",
        "flood: every write is delivered or counted as lost",
        "event: canary opened through a path not resident at entry, read at the exit",
        "after remove_agent the cgroup is no longer restricted",
    ] {
        assert!(
            checks.iter().any(|c| c["name"] == must),
            "check `{must}` missing from the self-test"
        );
    }
    // Documented kernel behaviour the design relies on: seccomp refuses before the
    // sys_enter tracepoints, the sys_exit ones still fire.
    assert_eq!(
        doc["facts"]["seccomp_refused_call_reaches_sys_enter"],
        false
    );
    assert_eq!(doc["facts"]["seccomp_refused_call_reaches_sys_exit"], true);
}

#[test]
fn bpf_watch_leaves_no_cgroup_behind() {
    if !require_root() {
        return;
    }
    run_selftest();
    // watch-test makes its cgroup at the top of the v2 hierarchy.
    let leftovers: Vec<_> = std::fs::read_dir("/sys/fs/cgroup/unified")
        .into_iter()
        .chain(std::fs::read_dir("/sys/fs/cgroup"))
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("agentd-test-"))
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "cgroups left behind: {leftovers:?}");
}
