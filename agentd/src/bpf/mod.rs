//! Loading agentd's BPF programs and the pseudo-filesystems they need.
//!
//! - [`watch`]: [`Watch`], what the supervisor drives (load, add/remove agents, kill
//!   flag, the event stream);
//! - `encode`: CompiledPolicy -> map entries (pure); [`decode`]: ring-buffer record ->
//!   [`crate::event::Event`] and errno -> layer attribution (pure);
//! - [`admit`], [`ask`]: the maps of addresses and programs agents may use beyond their
//!   policy (admitted from DNS answers, approved by a person);
//! - `btf`, `tracefs`: kernel struct offsets and tracepoint layouts, checked at load;
//! - `programs`: which program attaches where.
//!
//! Its end-to-end test and cost measurements are in `crate::harness` (`agentd-harness
//! watch-test`), outside the product.

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
/// The active LSMs, in securityfs.
pub const LSM_LIST: &str = "/sys/kernel/security/lsm";

/// The active LSMs, from [`LSM_LIST`] (securityfs must be mounted).
pub fn active_lsms() -> std::io::Result<Vec<String>> {
    std::fs::read_to_string(LSM_LIST).map(|text| parse_lsm_list(&text))
}

/// The comma-separated list in [`LSM_LIST`].
fn parse_lsm_list(text: &str) -> Vec<String> {
    text.trim()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

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

pub mod admit;
pub mod ask;
mod btf;
pub mod decode;
mod encode;
mod programs;
mod tracefs;
pub mod watch;

pub use watch::{AgentHandle, Watch};

/// What agentd's BPF LSM programs need that this kernel's BTF lacks: hooks (each needs a
/// `bpf_lsm_<hook>` function; the `path_*` ones exist only with CONFIG_SECURITY_PATH), as
/// `bpf_lsm_<hook>` names, and struct members (`btf::LSM_MEMBERS`).
pub fn missing_lsm_support() -> Result<Vec<String>, String> {
    use watch::VMLINUX_BTF;
    let raw = std::fs::read(VMLINUX_BTF).map_err(|e| format!("{VMLINUX_BTF}: {e}"))?;
    let btf = btf::Btf::parse(&raw).map_err(|e| format!("{VMLINUX_BTF}: {e}"))?;
    let funcs: Vec<String> = programs::LSM_PROGRAMS
        .iter()
        .map(|(_, hook)| format!("bpf_lsm_{hook}"))
        .collect();
    let names: Vec<&str> = funcs.iter().map(String::as_str).collect();
    let missing = btf
        .missing_funcs(&names)
        .map_err(|e| format!("{VMLINUX_BTF}: {e}"))?;
    let mut out: Vec<String> = missing.into_iter().map(str::to_owned).collect();
    out.extend(
        btf::LSM_MEMBERS
            .iter()
            .filter_map(|m| btf.offsets(&[*m]).err()),
    );
    Ok(out)
}

/// Why the kernel watch could not be set up or changed. Each variant names the program,
/// map, tracepoint or path involved.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel BTF: {0} (agentd needs CONFIG_DEBUG_INFO_BTF for the process tracepoints)")]
    Btf(String),
    #[error(
        "tracepoint {tracepoint}: {reason} (its record layout differs from the one the programs read)"
    )]
    TracepointFormat { tracepoint: String, reason: String },
    #[error("cannot load the BPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("BPF program {0} is missing from the object or has the wrong type")]
    MissingProgram(&'static str),
    #[error("cannot load BPF program {program}: {source}")]
    LoadProgram {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot attach BPF program {program} to {target}: {source}")]
    Attach {
        program: &'static str,
        target: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot detach BPF program {program} from {target}: {source}")]
    Detach {
        program: &'static str,
        target: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot pin a BPF link at {path}: {reason}")]
    Pin {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("BPF map {0} is missing from the object or has the wrong type")]
    MissingMap(&'static str),
    #[error("BPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cgroup {path}: {reason}")]
    Cgroup {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("policy of agent {agent}: {reason}")]
    Policy { agent: String, reason: String },
    #[error("agent {agent} (cgroup {cgroup_id}) is not watched")]
    UnknownAgent { agent: String, cgroup_id: u64 },
    #[error("the event stream was already taken: Watch::events can be called once")]
    EventsTaken,
    #[error("Watch::events needs a tokio runtime (call it from within one)")]
    NoRuntime,
    #[error("cannot poll the ring buffer: {0}")]
    Poll(#[source] std::io::Error),
    #[error(transparent)]
    ExecGate(#[from] ask::ExecGateError),
    #[error("handing the watch over: {0}")]
    Handover(String),
}

#[cfg(test)]
mod tests {
    #[test]
    fn lsm_list() {
        assert_eq!(
            super::parse_lsm_list("lockdown,capability,landlock,bpf\n"),
            ["lockdown", "capability", "landlock", "bpf"]
        );
        assert!(super::parse_lsm_list("\n").is_empty());
    }
}
