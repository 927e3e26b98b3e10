//! agentd's test harnesses, in a program of their own (`agentd-harness`, built beside
//! `agentd` and never packaged): what the privileged tests and `cargo xtask bench` need
//! from inside the crate, kept out of the product.
//!
//! - [`watch`] with [`bench`]: `agentd-harness watch-test`, the kernel watch end to end
//!   (tests/tests/bpf_watch.rs), and `watch-test bench`, what it costs a process;
//! - [`audit_sample`]: `agentd-harness audit-sample`, a synthetic audit log
//!   (tests/tests/audit.rs).

pub mod audit_sample;
pub mod bench;
pub mod watch;

use std::{
    num::{NonZeroU64, NonZeroUsize},
    path::PathBuf,
    process::ExitCode,
};

use clap::Parser as _;

/// agentd's test harnesses (not part of the product, not packaged).
#[derive(Debug, clap::Parser)]
#[command(name = "agentd-harness")]
enum Harness {
    /// The kernel watch end to end, as root (tests/tests/bpf_watch.rs); `bench [N]`: what
    /// it costs a process (cargo xtask bench)
    WatchTest {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Writes a synthetic audit log of event and control records (refuses existing files)
    AuditSample {
        path: PathBuf,
        /// Event and control records to write
        #[arg(long, default_value_t = 10)]
        records: u64,
        /// Rotate after every N of them
        #[arg(long)]
        rotate_every: Option<NonZeroU64>,
        /// Rotated files to keep
        #[arg(long, default_value = "10")]
        keep: NonZeroUsize,
    },
}

/// `agentd-harness`'s `main`.
pub fn main() -> ExitCode {
    crate::cli::init_logging();
    let result = match Harness::parse() {
        Harness::WatchTest { args } => watch::watch_selftest(&args),
        Harness::AuditSample {
            path,
            records,
            rotate_every,
            keep,
        } => audit_sample::sample(&path, records, rotate_every, keep),
    };
    result.unwrap_or_else(|e| {
        eprintln!("agentd-harness: {e:#}");
        ExitCode::FAILURE
    })
}
