//! `cargo xtask <command>`: the project's chores, so that CI and people run the same steps.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod bench;
mod deb;
mod demo;
mod fuzz;
mod vm;

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "agentd's build, test and benchmark chores"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what building and testing need (root; idempotent): Debian's BPF-capable
    /// rustc, LLVM, bpf-linker, and the bpffs/tracefs/securityfs mounts
    Setup,
    /// Everything CI checks, in order: setup, fmt, clippy, unit tests, 30 s of fuzzing per
    /// target, privileged tests on this host, then on Debian's 6.1 and 6.12 kernels under
    /// qemu (`vm-test --kernel all`)
    Ci,
    /// The privileged integration tests in tests/ (root; they load BPF programs, create
    /// cgroups and launch agents). A test that cannot run fails with AGENTD_TEST_MUST_RUN=1.
    /// Builds the debug package first (`deb --debug`): tests/tests/deb.rs installs it
    Test {
        /// Only tests whose name contains this
        filter: Option<String>,
    },
    /// The privileged tests on stock Debian kernels booted under qemu: 6.1 (Landlock ABI 2)
    /// and bookworm-backports' 6.12 (ABI 6) (root; installs qemu, downloads the kernels)
    VmTest(vm::VmTestArgs),
    /// Fuzz agentd's parsers with libFuzzer on the stable toolchain (fuzz/): the profile,
    /// control-line, kernel-record and audit-log targets and agentd-dns's two, each for the
    /// given time, two at a time; fails on a crash, naming the input it left in
    /// target/fuzz/artifacts
    Fuzz {
        /// Seconds per target
        #[arg(long, alias = "seconds", default_value_t = 60)]
        time: u32,
    },
    /// Build a Debian package of agentd: the program, its systemd unit, the built-in
    /// profiles as examples, man pages and shell completions (docs/packaging.md); prints
    /// its path
    Deb(deb::DebArgs),
    /// The main job: set up, build, and launch a demo agent under `analyze-only` that
    /// tries to post an answer it was only asked to analyze; show that it is contained
    Demo,
    /// Measure agentd's costs as ratios to baselines taken in the same run: the kernel
    /// watch, launching, and the breaker's time from violation to an empty cgroup
    Bench {
        /// Only this part: `watch` (the kernel watch's costs and event pipeline),
        /// `launch`, `breaker` (idle), `load` (the breaker under load), `terminal` (the
        /// agent's terminal relay), `client` (a real agent CLI), `dns` (lookups through
        /// agentd's resolver, connects admitted by name), `transaction` (a build in a
        /// transaction against direct, commit and undo of 10 000 files, the mount
        /// namespace's share of a launch)
        #[arg(long, value_enum)]
        only: Option<bench::Part>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.command {
        Task::Setup => setup(&root),
        Task::Ci => ci(&root),
        Task::Test { filter } => privileged_tests(&root, filter.as_deref()),
        Task::VmTest(args) => vm::vm_test(&root, &args),
        Task::Fuzz { time } => fuzz::fuzz(&root, time),
        Task::Deb(args) => deb::deb(&root, &args),
        Task::Demo => demo::demo(&root),
        Task::Bench { only } => bench::bench(&root, only),
    }
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// Runs a command in the workspace root, echoing it, failing on a non-zero exit.
fn run(root: &Path, program: &str, args: &[&str], envs: &[(&str, &str)]) -> anyhow::Result<()> {
    eprintln!("[xtask] $ {program} {}", args.join(" "));
    let started = Instant::now();
    let status = Command::new(program)
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(root)
        .status()
        .with_context(|| format!("cannot start {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed: {status}", args.join(" "));
    }
    eprintln!("[xtask]   ok in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn setup(root: &Path) -> anyhow::Result<()> {
    run(root, "bash", &["scripts/setup.sh"], &[])
}

fn ci(root: &Path) -> anyhow::Result<()> {
    setup(root)?;
    run(root, "cargo", &["fmt", "--all", "--", "--check"], &[])?;
    run(
        root,
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--exclude",
            "agentd-ebpf",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    run(root, "cargo", &["test", "--locked"], &[])?;
    // Bounded (about 2.5 minutes, the build included): half a minute per target catches
    // what the seeds' neighbourhood holds; longer campaigns are run by hand (`cargo xtask
    // fuzz --time 3600`).
    fuzz::fuzz(root, fuzz::CI_SECONDS)?;
    privileged_tests(root, None)?;
    // The main job, as a user runs it: the incident contained, then held for a person who
    // says no (signed), with the audit log verified.
    demo::demo(root)?;
    // The same suite on the stock kernels users run: Debian 6.1 (Landlock ABI 2) and
    // bookworm-backports 6.12 (ABI 6), with BPF LSM active and cgroup v2 complete.
    vm::vm_test(root, &vm::VmTestArgs::ci())
}

fn privileged_tests(root: &Path, filter: Option<&str>) -> anyhow::Result<()> {
    run(
        root,
        "cargo",
        &["build", "--locked", "--package", "agentd"],
        &[],
    )?;
    let bin = root.join("target/debug/agentd");
    let bin = bin.to_str().context("non-UTF-8 target path")?;
    // The package tests/tests/deb.rs installs and purges, of the same debug build.
    let deb = deb::build(root, deb::Profile::Debug)?;
    let deb = deb.to_str().context("non-UTF-8 target path")?;
    let mut args = vec![
        "test",
        "--locked",
        "--package",
        "agentd-tests",
        "--",
        "--test-threads=1",
    ];
    if let Some(f) = filter {
        args.push(f);
    }
    run(
        root,
        "cargo",
        &args,
        &[
            ("AGENTD_BIN", bin),
            ("AGENTD_DEB", deb),
            ("AGENTD_TEST_MUST_RUN", "1"),
        ],
    )
}
