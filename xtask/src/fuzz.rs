//! `cargo xtask fuzz`: coverage-guided fuzzing of agentd's parsers (fuzz/) with libFuzzer,
//! on the stable toolchain.
//!
//! cargo-fuzz needs nightly for `-Zsanitizer`; the coverage instrumentation libFuzzer
//! steers by is plain LLVM passes that stable rustc runs with `-Cpasses=sancov-module`.
//! There is no AddressSanitizer (nightly only), which the targets, safe Rust, do without;
//! overflow checks and debug assertions are on (fuzz/Cargo.toml's release profile).
//! libfuzzer-sys builds libFuzzer itself with the C++ compiler (g++, scripts/setup.sh).
//!
//! The targets of agentd (`profile`, `control_line`, `kernel_record`, `audit_log`) link
//! the agentd library, whose build script builds the BPF object as every build of agentd
//! does: once into target/fuzz (about 35 s on two cores), again only when agentd-ebpf or
//! agentd-common change. The object is embedded but never loaded; the entry points
//! (agentd/src/fuzzing.rs) touch nothing of the host.
//!
//! Each target runs for the given time from the seeds in fuzz/corpus/<target>/ plus what
//! earlier runs found (target/fuzz/corpus/<target>/), [`PARALLEL`] targets at a time,
//! each on one core, its output in target/fuzz/logs/<target>.log; a crash (a panic, an
//! assertion of the target) or a hang fails the task, naming the input libFuzzer left in
//! target/fuzz/artifacts/<target>/. `cargo xtask ci` gives each target [`CI_SECONDS`]:
//! with a warm target/fuzz the whole step takes about two and a half minutes.

use std::{
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

/// A fuzz target, fuzz/fuzz_targets/<name>.rs, and the largest input libFuzzer makes for
/// it.
struct Target {
    name: &'static str,
    max_len: usize,
}

const TARGETS: [Target; 6] = [
    // A DNS message over UDP with EDNS is rarely above 1232 bytes; 4096 leaves room.
    // Sizes up to MAX_MESSAGE are unit-tested.
    Target {
        name: "parse_query",
        max_len: 4096,
    },
    Target {
        name: "read_answer",
        max_len: 4096,
    },
    // The largest built-in profile is about 4 KB.
    Target {
        name: "profile",
        max_len: 8192,
    },
    // Every message type's structure fits; the 64 KiB limit is unit-tested.
    Target {
        name: "control_line",
        max_len: 4096,
    },
    // One RawEvent is 864 bytes; the daemon ignores what follows it.
    Target {
        name: "kernel_record",
        max_len: 1024,
    },
    // A few records, one of them a signed decision, across rotated files.
    Target {
        name: "audit_log",
        max_len: 8192,
    },
];

/// Targets fuzzed at a time: one per core of the machines CI runs on.
const PARALLEL: usize = 2;

/// Seconds per target in `cargo xtask ci`: 6 targets, [`PARALLEL`] at a time, 90 s.
pub const CI_SECONDS: u32 = 30;

/// Sanitizer coverage as cargo-fuzz configures it: 8-bit edge counters and the PC table
/// (what libFuzzer counts as coverage), and comparison tracing (how it solves magic
/// values); `--cfg fuzzing` as libfuzzer-sys expects.
const RUSTFLAGS: [&str; 7] = [
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "--cfg",
    "fuzzing",
];

/// The newest BPF object a build of the workspace left (`target/*/build/agentd-*/out/`),
/// for the fuzz build to embed instead of building its own: the fuzz targets never load
/// it, so which version it is does not matter.
fn prebuilt_ebpf_object(root: &Path) -> Option<std::path::PathBuf> {
    let mut newest: Option<(std::time::SystemTime, std::path::PathBuf)> = None;
    for profile in ["debug", "release"] {
        let Ok(dirs) = std::fs::read_dir(root.join("target").join(profile).join("build")) else {
            continue;
        };
        for dir in dirs.flatten() {
            if !dir.file_name().to_string_lossy().starts_with("agentd-") {
                continue;
            }
            let object = dir.path().join("out/agentd-ebpf");
            let Ok(modified) = std::fs::metadata(&object).and_then(|m| m.modified()) else {
                continue;
            };
            if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                newest = Some((modified, object));
            }
        }
    }
    newest.map(|(_, object)| object)
}

/// Builds the targets, then fuzzes each for `seconds`.
pub fn fuzz(root: &Path, seconds: u32) -> anyhow::Result<()> {
    let started = Instant::now();
    let host = host_triple()?;
    // An explicit --target keeps RUSTFLAGS off build scripts and proc macros, which run
    // on the host and cannot link the coverage callbacks; target/fuzz keeps this build
    // from invalidating the workspace's.
    eprintln!(
        "[xtask] fuzz build with CARGO_ENCODED_RUSTFLAGS: {}",
        RUSTFLAGS.join(" ")
    );
    let encoded = RUSTFLAGS.join("\u{1f}");
    let mut envs = vec![("CARGO_ENCODED_RUSTFLAGS", encoded.as_str())];
    let prebuilt = prebuilt_ebpf_object(root);
    if let Some(object) = prebuilt.as_deref().and_then(Path::to_str) {
        eprintln!("[xtask] fuzz build embeds the BPF object built before: {object}");
        envs.push(("AGENTD_EBPF_OBJECT", object));
    }
    crate::run(
        root,
        "cargo",
        &[
            "build",
            "--release",
            "--locked",
            "--manifest-path",
            "fuzz/Cargo.toml",
            "--target",
            &host,
            "--target-dir",
            "target/fuzz",
            "--bins",
        ],
        &envs,
    )
    .context(
        "the fuzz build failed; if fuzz/Cargo.lock is out of date (agentd's dependencies \
         changed), `cargo update --workspace --manifest-path fuzz/Cargo.toml` brings it up \
         to date",
    )?;

    let mut failures = Vec::new();
    for batch in TARGETS.chunks(PARALLEL) {
        let mut running = Vec::new();
        for target in batch {
            match start(root, &host, target, seconds) {
                Ok(child) => running.push((target, child)),
                Err(e) => {
                    // Stop what this batch started before failing.
                    for (_, mut child) in running {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    return Err(e);
                }
            }
        }
        for (target, child) in running {
            if let Err(e) = finish(root, &host, target, child) {
                eprintln!("[xtask] {e:#}");
                failures.push(e);
            }
        }
    }
    eprintln!(
        "[xtask] fuzzing done in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    match failures.as_slice() {
        [] => Ok(()),
        [one] => bail!("{one:#}"),
        [first, ..] => bail!(
            "{} fuzz targets failed; the first: {first:#}",
            failures.len()
        ),
    }
}

/// Starts fuzzing `target` for `seconds`, its output going to its log.
fn start(root: &Path, host: &str, target: &Target, seconds: u32) -> anyhow::Result<Child> {
    let name = target.name;
    let corpus = format!("target/fuzz/corpus/{name}");
    let artifacts = format!("target/fuzz/artifacts/{name}/");
    for dir in [&corpus, &artifacts, &"target/fuzz/logs".to_owned()] {
        fs::create_dir_all(root.join(dir)).with_context(|| format!("cannot create {dir}"))?;
    }
    let log_path = root.join(log(name));
    let output = fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let bin = root.join(format!("target/fuzz/{host}/release/{name}"));
    // The first corpus directory is where libFuzzer writes new inputs; the committed
    // seeds are only read.
    let args = [
        corpus,
        format!("fuzz/corpus/{name}"),
        format!("-max_total_time={seconds}"),
        format!("-max_len={}", target.max_len),
        // An input that takes this long is a hang: a failure like a crash.
        "-timeout=10".to_owned(),
        format!("-artifact_prefix={artifacts}"),
        "-print_final_stats=1".to_owned(),
    ];
    eprintln!(
        "[xtask] $ {} {} > {}",
        bin.display(),
        args.join(" "),
        log(name)
    );
    Command::new(&bin)
        .args(&args)
        .current_dir(root)
        .stdout(output.try_clone().context("cannot share the log")?)
        .stderr(output)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))
}

/// Waits for `target`'s run and reports it: executions and their rate, or the failure
/// and the input that caused it.
fn finish(root: &Path, host: &str, target: &Target, mut child: Child) -> anyhow::Result<()> {
    let name = target.name;
    let status = child
        .wait()
        .with_context(|| format!("cannot wait for fuzz target {name}"))?;
    let output = fs::read_to_string(root.join(log(name))).unwrap_or_default();
    let stat = |key: &str| {
        output
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    if status.success() {
        eprintln!(
            "[xtask] fuzz {name}: {} runs, {} exec/s, coverage {} edges",
            stat("stat::number_of_executed_units:"),
            stat("stat::average_exec_per_sec:"),
            output
                .lines()
                .rev()
                .find_map(|l| l.split_once(" cov: ")?.1.split_whitespace().next())
                .unwrap_or("?"),
        );
        return Ok(());
    }
    // libFuzzer's report: the panic, the stack, the input's path.
    let tail: Vec<&str> = output.lines().rev().take(40).collect();
    for line in tail.iter().rev() {
        eprintln!("[{name}] {line}");
    }
    let input = output
        .lines()
        .find_map(|l| {
            l.split_once("Test unit written to ")?
                .1
                .split_whitespace()
                .next()
        })
        .map_or_else(|| format!("target/fuzz/artifacts/{name}/"), str::to_owned);
    bail!(
        "fuzz target {name} failed ({status}): the input is {input} (replay: \
         target/fuzz/{host}/release/{name} {input}; all its output: {})",
        log(name)
    )
}

/// Where a target's output goes, relative to the workspace root.
fn log(name: &str) -> String {
    format!("target/fuzz/logs/{name}.log")
}

/// The host's target triple, from `rustc -vV`.
fn host_triple() -> anyhow::Result<String> {
    let output = Command::new("rustc")
        .arg("-vV")
        .stdin(Stdio::null())
        .output()
        .context("cannot run rustc -vV")?;
    if !output.status.success() {
        bail!("`rustc -vV` failed: {}", output.status);
    }
    let text = String::from_utf8(output.stdout).context("rustc -vV printed non-UTF-8")?;
    text.lines()
        .find_map(|line| line.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV printed no `host:` line")
}
