//! Loading agentd's BPF programs and the pseudo-filesystems they need.

use std::path::Path;

/// The BPF object built from `agentd-ebpf` by build.rs, embedded so the binary is
/// self-contained.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agentd-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot mount {fstype} at {dir}: {source} (agentd needs root to mount it)")]
    Mount {
        fstype: &'static str,
        dir: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(#[source] std::io::Error),
}

/// Pseudo-filesystems agentd uses: tracefs (tracepoint ids), bpffs (pins), securityfs
/// (the active LSM list).
pub const TRACEFS: (&str, &str) = ("tracefs", "/sys/kernel/tracing");
pub const BPFFS: (&str, &str) = ("bpf", "/sys/fs/bpf");
pub const SECURITYFS: (&str, &str) = ("securityfs", "/sys/kernel/security");

/// Mounts `fstype` at `dir` unless a filesystem of that type is already there. Returns
/// whether it mounted it now.
pub fn ensure_mounted((fstype, dir): (&'static str, &'static str)) -> Result<bool, MountError> {
    let mounts = crate::host::mounts().map_err(MountError::MountInfo)?;
    if mounts
        .iter()
        .any(|m| m.mount_point == Path::new(dir) && m.fstype == fstype)
    {
        return Ok(false);
    }
    nix::mount::mount(
        Some(fstype),
        dir,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| MountError::Mount {
        fstype,
        dir,
        source,
    })?;
    Ok(true)
}
