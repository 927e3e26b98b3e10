//! Harness for the privileged tests: find the agentd binary, run it, and refuse to skip.
//!
//! A test that needs something this host lacks (root, a kernel feature) calls [`require`]:
//! it skips with a loud message, unless `AGENTD_TEST_MUST_RUN=1` (set by `cargo xtask test`
//! and CI), in which case the missing requirement fails the test.
#![expect(clippy::expect_used, clippy::unwrap_used, reason = "test harness")]

use std::{
    path::PathBuf,
    process::{Command, Output},
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
