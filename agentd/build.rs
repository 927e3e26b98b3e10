//! Builds `agentd-ebpf` for bpfel-unknown-none and leaves the object in OUT_DIR, where
//! `src/bpf` embeds it with `include_bytes_aligned!`.
//!
//! The BPF crate is compiled by Debian's rustc-web (registered in rustup as `debian-bpf` by
//! `cargo xtask setup`), which ships a precompiled `core` for the BPF target, and linked by
//! `bpf-linker` from PATH. Override the toolchain name with AGENTD_EBPF_TOOLCHAIN.
//!
//! AGENTD_EBPF_OBJECT=PATH embeds an object built before instead (`cargo xtask fuzz`
//! passes the workspace's: the fuzz targets never load it, and the build of fuzz/ then
//! skips its own BPF build).
use std::env;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AGENTD_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=AGENTD_EBPF_OBJECT");
    if let Ok(prebuilt) = env::var("AGENTD_EBPF_OBJECT") {
        println!("cargo:rerun-if-changed={prebuilt}");
        let bytes =
            std::fs::read(&prebuilt).with_context(|| format!("AGENTD_EBPF_OBJECT: {prebuilt}"))?;
        anyhow::ensure!(
            bytes.starts_with(b"\x7fELF"),
            "AGENTD_EBPF_OBJECT: {prebuilt} is not an ELF object"
        );
        let out = format!("{}/agentd-ebpf", env::var("OUT_DIR")?);
        std::fs::write(&out, bytes).with_context(|| format!("writing {out}"))?;
        return Ok(());
    }
    let toolchain = env::var("AGENTD_EBPF_TOOLCHAIN").unwrap_or_else(|_| "debian-bpf".into());

    // aya-ebpf needs one unstable feature (asm_experimental_arch). Debian's rustc is a
    // stable build: unlock features for the aya_ebpf crate only. Any value other than "1"
    // also keeps aya-build from passing `-Z build-std=core`, so the packaged core is used.
    // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf") };

    let manifest_dir = env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = format!("{manifest_dir}/../agentd-ebpf");
    let common_dir = format!("{manifest_dir}/../agentd-common");
    println!("cargo:rerun-if-changed={common_dir}/src");

    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agentd-ebpf",
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .with_context(|| {
        format!(
            "building the BPF programs with the `{toolchain}` toolchain failed; \
             run `cargo xtask setup` (as root) to install it and bpf-linker"
        )
    })
}
