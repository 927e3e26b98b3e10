//! `cargo xtask fuzz`: coverage-guided fuzzing of agentd-dns (fuzz/) with libFuzzer, on
//! the stable toolchain.
//!
//! cargo-fuzz needs nightly for `-Zsanitizer`; the coverage instrumentation libFuzzer
//! steers by is plain LLVM passes that stable rustc runs with `-Cpasses=sancov-module`.
//! There is no AddressSanitizer (nightly only), which the targets, safe Rust, do without;
//! overflow checks and debug assertions are on (fuzz/Cargo.toml's release profile).
//! libfuzzer-sys builds libFuzzer itself with the C++ compiler (g++, scripts/setup.sh).
//!
//! Each target runs for the given time from the seeds in fuzz/corpus/<target>/ plus what
//! earlier runs found (target/fuzz/corpus/<target>/); a crash fails the task and leaves
//! the input in target/fuzz/artifacts/<target>/.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, bail};

/// The fuzz targets, fuzz/fuzz_targets/<name>.rs.
const TARGETS: [&str; 2] = ["parse_query", "read_answer"];

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

/// The largest input libFuzzer generates: a DNS message over UDP with EDNS is rarely
/// above 1232 bytes; 4096 leaves room. Sizes up to MAX_MESSAGE are unit-tested.
const MAX_LEN: usize = 4096;

pub fn fuzz(root: &Path, seconds: u32) -> anyhow::Result<()> {
    let host = host_triple()?;
    // An explicit --target keeps RUSTFLAGS off build scripts and proc macros, which run
    // on the host and cannot link the coverage callbacks; target/fuzz keeps this build
    // from invalidating the workspace's.
    eprintln!(
        "[xtask] fuzz build with CARGO_ENCODED_RUSTFLAGS: {}",
        RUSTFLAGS.join(" ")
    );
    let encoded = RUSTFLAGS.join("\u{1f}");
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
        &[("CARGO_ENCODED_RUSTFLAGS", &encoded)],
    )?;

    for target in TARGETS {
        let corpus = format!("target/fuzz/corpus/{target}");
        let artifacts = format!("target/fuzz/artifacts/{target}/");
        for dir in [&corpus, &artifacts] {
            fs::create_dir_all(root.join(dir)).with_context(|| format!("cannot create {dir}"))?;
        }
        let bin = root.join(format!("target/fuzz/{host}/release/{target}"));
        let bin = bin.to_str().context("non-UTF-8 target path")?;
        // The first corpus directory is where libFuzzer writes new inputs; the committed
        // seeds are only read.
        crate::run(
            root,
            bin,
            &[
                &corpus,
                &format!("fuzz/corpus/{target}"),
                &format!("-max_total_time={seconds}"),
                &format!("-max_len={MAX_LEN}"),
                // An input that takes this long is a hang: a failure like a crash.
                "-timeout=10",
                &format!("-artifact_prefix={artifacts}"),
                "-print_final_stats=1",
            ],
            &[],
        )
        .with_context(|| format!("fuzz target {target} failed: the input is in {artifacts}"))?;
    }
    Ok(())
}

/// The host's target triple, from `rustc -vV`.
fn host_triple() -> anyhow::Result<String> {
    let output = Command::new("rustc")
        .arg("-vV")
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
