//! `agentd doctor`: what this host offers and what agentd does about it.
//!
//! Every finding comes from a probe in [`probe`] (a syscall made, a BPF program loaded and
//! attached, a cgroup created and written to), not from reading configuration: a kernel may
//! list `bpf` among its LSMs and still refuse LSM programs. This module holds the report
//! types, the requirements for enforcement and the rendering; it does no I/O, so all of it
//! is unit-tested from synthetic findings.

mod probe;

pub use probe::bpf_lsm;

use std::{fmt::Write as _, path::PathBuf, process::ExitCode};

use nix::errno::Errno;
use serde::{Serialize, Serializer, ser::SerializeMap as _};

use crate::report;

/// Exit status when something agentd needs for enforcement is missing.
const EXIT_NOT_READY: u8 = 1;

/// Probes the host, prints the report (human or JSON) and exits 1 when a requirement for
/// enforcement is missing.
pub fn run(json: bool) -> anyhow::Result<ExitCode> {
    let report = Report::new(probe::probe_host());
    if json {
        report::print_json(&report)?;
    } else {
        print!("{}", render(&report));
    }
    Ok(if report.enforcement_ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_READY)
    })
}

/// Why a feature is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// EPERM or EACCES while agentd runs without root: this says nothing about the kernel.
    #[error("needs root ({errno:?} at {call})")]
    NeedsRoot { call: &'static str, errno: Errno },
    /// The kernel refused a privileged caller.
    #[error("refused ({errno:?} at {call})")]
    Refused { call: &'static str, errno: Errno },
    /// Something it depends on is absent.
    #[error("{0}")]
    Missing(String),
    /// Any other failure, with what failed.
    #[error("{0}")]
    Failed(String),
}

impl Unavailable {
    fn reason(&self) -> &'static str {
        match self {
            Self::NeedsRoot { .. } => "needs_root",
            Self::Refused { .. } => "refused",
            Self::Missing(_) => "missing",
            Self::Failed(_) => "failed",
        }
    }
}

/// The answer of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Usable,
    Unusable(Unavailable),
}

impl Status {
    pub fn usable(&self) -> bool {
        match self {
            Self::Usable => true,
            Self::Unusable(_) => false,
        }
    }
}

impl From<Result<(), Unavailable>> for Status {
    fn from(r: Result<(), Unavailable>) -> Self {
        match r {
            Ok(()) => Self::Usable,
            Err(e) => Self::Unusable(e),
        }
    }
}

/// `{"usable": true}`, or `{"usable": false, "error": "...", "reason": "refused",
/// "call": "BPF_PROG_LOAD", "errno": "EPERM"}` (`call` and `errno` where a syscall
/// failed).
impl Serialize for Status {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("usable", &self.usable())?;
        if let Self::Unusable(why) = self {
            map.serialize_entry("error", &why.to_string())?;
            map.serialize_entry("reason", why.reason())?;
            match why {
                Unavailable::NeedsRoot { call, errno } | Unavailable::Refused { call, errno } => {
                    map.serialize_entry("call", call)?;
                    map.serialize_entry("errno", &format!("{errno:?}"))?;
                }
                Unavailable::Missing(_) | Unavailable::Failed(_) => {}
            }
        }
        map.end()
    }
}

/// Who agentd runs as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Root {
    pub euid: u32,
    pub cap_sys_admin: bool,
    pub cap_bpf: bool,
}

impl Root {
    /// Root with CAP_SYS_ADMIN effective: an EPERM is then the kernel's answer, not a
    /// missing privilege. CAP_SYS_ADMIN covers CAP_BPF for every BPF operation agentd makes.
    pub fn privileged(&self) -> bool {
        self.euid == 0 && self.cap_sys_admin
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Landlock {
    /// What `landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)` returned.
    pub abi: Option<u32>,
    #[serde(flatten)]
    pub status: Status,
}

/// The seccomp mode this process already runs in (`PR_GET_SECCOMP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    Disabled,
    Strict,
    Filter,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Seccomp {
    /// None when `prctl(PR_GET_SECCOMP)` failed (the error is in `filter`).
    pub own_mode: Option<SeccompMode>,
    /// Filters with the ERRNO and KILL_PROCESS actions.
    pub filter: Status,
    /// The USER_NOTIF action (a supervisor decides a call).
    pub user_notif: Status,
}

/// Where a resource controller agentd sets limits with lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "hierarchy", rename_all = "lowercase")]
pub enum Controller {
    /// In the v2 root's `cgroup.controllers`; `enabled` when also in its
    /// `cgroup.subtree_control`.
    V2 {
        enabled: bool,
    },
    /// Bound to a v1 hierarchy (hybrid hosts).
    V1 {
        mount: PathBuf,
    },
    Missing,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cgroup {
    /// Where cgroup v2 is mounted.
    pub mount: Option<PathBuf>,
    /// The v2 root's `cgroup.controllers`.
    pub controllers: Vec<String>,
    /// `cgroup.kill` exists and takes a write (tried on an empty cgroup).
    pub kill: Status,
    pub pids: Controller,
    pub memory: Controller,
}

/// Which BPF program and map types load (and attach) on this kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bpf {
    /// /sys/kernel/btf/vmlinux parses.
    pub btf: Status,
    pub ring_buffer: Status,
    /// cgroup/connect4, attached to a v2 cgroup.
    pub cgroup_sock_addr: Status,
    /// cgroup/sock_create, attached to a v2 cgroup.
    pub cgroup_sock: Status,
    /// A classic tracepoint, attached to sched/sched_process_fork.
    pub tracepoint: Status,
    /// tp_btf/sched_process_fork.
    pub tp_btf: Status,
    /// An LSM program on file_open, and `bpf` among the active LSMs.
    pub lsm: Status,
}

/// The state of a pseudo-filesystem agentd uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountState {
    Mounted,
    /// Was not mounted; doctor mounted it (it stays mounted).
    MountedByDoctor,
    NotMounted(Option<Unavailable>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filesystem {
    pub path: &'static str,
    pub state: MountState,
}

impl Filesystem {
    pub fn mounted(&self) -> bool {
        match self.state {
            MountState::Mounted | MountState::MountedByDoctor => true,
            MountState::NotMounted(_) => false,
        }
    }
}

/// `{"path": "...", "mounted": bool, "mounted_by_doctor": bool, "error"?: "..."}`
impl Serialize for Filesystem {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("path", self.path)?;
        map.serialize_entry("mounted", &self.mounted())?;
        map.serialize_entry(
            "mounted_by_doctor",
            &matches!(self.state, MountState::MountedByDoctor),
        )?;
        if let MountState::NotMounted(Some(why)) = &self.state {
            map.serialize_entry("error", &why.to_string())?;
        }
        map.end()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mounts {
    pub bpffs: Filesystem,
    pub tracefs: Filesystem,
    pub securityfs: Filesystem,
    /// The active LSMs, from /sys/kernel/security/lsm; None when it cannot be read.
    pub lsm: Option<Vec<String>>,
    /// overlay is in /proc/filesystems (workspace transactions need it).
    pub overlay: bool,
}

/// Everything the probes found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Findings {
    /// The running kernel's release.
    pub kernel: Option<String>,
    pub root: Root,
    pub landlock: Landlock,
    pub seccomp: Seccomp,
    pub cgroup: Cgroup,
    pub bpf: Bpf,
    pub mounts: Mounts,
    /// What a probe could not read or undo.
    pub notes: Vec<String>,
}

/// What agentd cannot enforce without.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Requirement {
    Root,
    Landlock,
    SeccompFilter,
    Cgroup2,
    CgroupKill,
    CgroupSockAddr,
    CgroupSock,
    Tracepoint,
    RingBuffer,
}

impl Requirement {
    pub const ALL: [Self; 9] = [
        Self::Root,
        Self::Landlock,
        Self::SeccompFilter,
        Self::Cgroup2,
        Self::CgroupKill,
        Self::CgroupSockAddr,
        Self::CgroupSock,
        Self::Tracepoint,
        Self::RingBuffer,
    ];

    pub fn met(self, f: &Findings) -> bool {
        match self {
            Self::Root => f.root.privileged(),
            Self::Landlock => f.landlock.status.usable() && f.landlock.abi.is_some_and(|a| a >= 1),
            Self::SeccompFilter => f.seccomp.filter.usable(),
            Self::Cgroup2 => f.cgroup.mount.is_some(),
            Self::CgroupKill => f.cgroup.kill.usable(),
            Self::CgroupSockAddr => f.bpf.cgroup_sock_addr.usable(),
            Self::CgroupSock => f.bpf.cgroup_sock.usable(),
            Self::Tracepoint => f.bpf.tracepoint.usable(),
            Self::RingBuffer => f.bpf.ring_buffer.usable(),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Root => "root",
            Self::Landlock => "landlock",
            Self::SeccompFilter => "seccomp filter",
            Self::Cgroup2 => "cgroup v2",
            Self::CgroupKill => "cgroup.kill",
            Self::CgroupSockAddr => "cgroup/connect4",
            Self::CgroupSock => "cgroup/sock_create",
            Self::Tracepoint => "tracepoint",
            Self::RingBuffer => "ring buffer",
        }
    }
}

/// The findings and the verdict, as `--json` prints them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub findings: Findings,
    pub enforcement_ready: bool,
    /// The requirements for enforcement this host does not meet.
    pub missing: Vec<Requirement>,
}

impl Report {
    pub fn new(findings: Findings) -> Self {
        let missing: Vec<Requirement> = Requirement::ALL
            .into_iter()
            .filter(|r| !r.met(&findings))
            .collect();
        Self {
            enforcement_ready: missing.is_empty(),
            missing,
            findings,
        }
    }
}

/// How a line of the human report is marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// Present.
    Ok,
    /// Optional and absent, or information.
    Degraded,
    /// Required and absent.
    Fail,
}

impl Mark {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Degraded => "--",
            Self::Fail => "FAIL",
        }
    }

    /// The mark of a requirement: ok when met, FAIL when not.
    fn required(ok: bool) -> Self {
        if ok { Self::Ok } else { Self::Fail }
    }

    /// The mark of an optional feature: ok when present, `--` when not.
    fn optional(ok: bool) -> Self {
        if ok { Self::Ok } else { Self::Degraded }
    }
}

struct Line {
    mark: Mark,
    label: &'static str,
    text: String,
}

/// "<what> — <consequence>" for a status: `usable` when usable, else the reason and
/// `otherwise`.
fn consequence(status: &Status, usable: &str, otherwise: &str) -> String {
    match status {
        Status::Usable => usable.to_owned(),
        Status::Unusable(why) => format!("{why} — {otherwise}"),
    }
}

fn landlock_features(abi: u32) -> &'static str {
    match abi {
        0 => "nothing",
        1 => "filesystem",
        2 => "filesystem, refer",
        3 => "filesystem, refer, truncate",
        4 => "filesystem, truncate, TCP ports",
        5 => "filesystem, device ioctls, TCP ports",
        6 => "filesystem, device ioctls, TCP ports, IPC scopes",
        7.. => "filesystem, device ioctls, TCP ports, IPC scopes, audit",
    }
}

fn controller_text(name: &str, c: &Controller) -> String {
    match c {
        Controller::V2 { enabled: true } => {
            format!("v2 — limits.{name} is set in the agent's cgroup")
        }
        Controller::V2 { enabled: false } => format!(
            "v2, not yet enabled in cgroup.subtree_control — limits.{name} is set in the agent's cgroup"
        ),
        Controller::V1 { mount } => format!(
            "v1 at {} — limits.{name} is set in a v1 cgroup beside the agent's v2 cgroup",
            mount.display()
        ),
        Controller::Missing => {
            format!("missing — profiles that set limits.{name} are refused")
        }
    }
}

fn filesystem_text(fs: &Filesystem, absent: &str) -> String {
    match &fs.state {
        MountState::Mounted => format!("mounted at {}", fs.path),
        MountState::MountedByDoctor => format!("was not mounted; doctor mounted it at {}", fs.path),
        MountState::NotMounted(None) => format!("not mounted at {} — {absent}", fs.path),
        MountState::NotMounted(Some(why)) => {
            format!("not mounted at {}: {why} — {absent}", fs.path)
        }
    }
}

/// The lines of the human report, in order: privilege and the launch-time mechanisms,
/// cgroups, pseudo-filesystems, BPF.
fn lines(f: &Findings) -> Vec<Line> {
    let mut out = Vec::new();
    let mut push = |mark, label, text: String| out.push(Line { mark, label, text });
    launch_lines(f, &mut push);
    cgroup_lines(f, &mut push);
    mount_lines(f, &mut push);
    bpf_lines(f, &mut push);
    out
}

/// Root, Landlock, seccomp.
fn launch_lines(f: &Findings, push: &mut impl FnMut(Mark, &'static str, String)) {
    let met = |req: Requirement| req.met(f);
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    push(
        Mark::required(met(Requirement::Root)),
        "root",
        format!(
            "euid {}, CAP_SYS_ADMIN {}, CAP_BPF {}{}",
            f.root.euid,
            yes_no(f.root.cap_sys_admin),
            yes_no(f.root.cap_bpf),
            if met(Requirement::Root) {
                ""
            } else {
                " — agentd needs root to create cgroups, load BPF programs and switch identities"
            }
        ),
    );

    let landlock = match (&f.landlock.status, f.landlock.abi) {
        (Status::Usable, Some(abi)) if abi < 4 => format!(
            "ABI {abi} ({}) — files and exec are confined; ABI < 4 has no TCP port rules, the cgroup programs alone decide connect and bind",
            landlock_features(abi)
        ),
        (Status::Usable, Some(abi)) => format!(
            "ABI {abi} ({}) — files, exec and TCP ports are confined",
            landlock_features(abi)
        ),
        (Status::Usable, None) => {
            "no ABI version — agents cannot be confined to their files".into()
        }
        (Status::Unusable(why), _) => {
            format!(
                "{why} — agents cannot be confined to their files (CONFIG_SECURITY_LANDLOCK, landlock in lsm=)"
            )
        }
    };
    push(
        Mark::required(met(Requirement::Landlock)),
        "landlock",
        landlock,
    );

    let own = match f.seccomp.own_mode {
        Some(SeccompMode::Filter) => {
            "; agentd itself runs under a filter, agents' filters stack on it"
        }
        Some(SeccompMode::Disabled | SeccompMode::Strict) | None => "",
    };
    push(
        Mark::required(met(Requirement::SeccompFilter)),
        "seccomp",
        consequence(
            &f.seccomp.filter,
            &format!(
                "filters with ERRNO and KILL_PROCESS — the syscall allow-list is enforced{own}"
            ),
            "the syscall allow-list cannot be installed",
        ),
    );
    push(
        Mark::optional(f.seccomp.user_notif.usable()),
        "seccomp notify",
        consequence(
            &f.seccomp.user_notif,
            "user notification — a supervisor can decide individual calls",
            "calls that need a supervisor's decision are denied outright",
        ),
    );
}

fn cgroup_lines(f: &Findings, push: &mut impl FnMut(Mark, &'static str, String)) {
    let met = |req: Requirement| req.met(f);
    push(
        Mark::required(met(Requirement::Cgroup2)),
        "cgroup v2",
        match &f.cgroup.mount {
            Some(m) => format!(
                "{}, controllers: {}",
                m.display(),
                if f.cgroup.controllers.is_empty() {
                    "none".to_owned()
                } else {
                    f.cgroup.controllers.join(" ")
                }
            ),
            None => "not mounted — agents cannot get a cgroup of their own: no kill switch, no cgroup BPF programs".into(),
        },
    );
    push(
        Mark::required(met(Requirement::CgroupKill)),
        "cgroup.kill",
        match &f.cgroup.kill {
            Status::Usable => "works — the kill switch ends a whole process tree at once".into(),
            Status::Unusable(why @ Unavailable::Missing(_)) => format!(
                "{why} — the kill switch cannot end a process tree at once (cgroup.kill needs Linux 5.14)"
            ),
            Status::Unusable(
                why @ (Unavailable::NeedsRoot { .. }
                | Unavailable::Refused { .. }
                | Unavailable::Failed(_)),
            ) => format!("{why} — the kill switch cannot end a process tree at once"),
        },
    );
    push(
        Mark::optional(!matches!(f.cgroup.pids, Controller::Missing)),
        "pids",
        controller_text("pids", &f.cgroup.pids),
    );
    push(
        Mark::optional(!matches!(f.cgroup.memory, Controller::Missing)),
        "memory",
        controller_text("memory", &f.cgroup.memory),
    );
}

fn mount_lines(f: &Findings, push: &mut impl FnMut(Mark, &'static str, String)) {
    push(
        Mark::optional(f.mounts.bpffs.mounted()),
        "bpffs",
        filesystem_text(&f.mounts.bpffs, "agentd mounts it when it pins"),
    );
    push(
        Mark::optional(f.mounts.tracefs.mounted()),
        "tracefs",
        filesystem_text(&f.mounts.tracefs, "classic tracepoints cannot attach"),
    );
    push(
        Mark::optional(f.mounts.securityfs.mounted()),
        "securityfs",
        filesystem_text(&f.mounts.securityfs, "the active LSMs cannot be read"),
    );
    push(
        Mark::optional(f.mounts.lsm.is_some()),
        "active lsms",
        match &f.mounts.lsm {
            Some(l) => l.join(","),
            None => "unknown (/sys/kernel/security/lsm cannot be read)".into(),
        },
    );
    push(
        Mark::optional(f.mounts.overlay),
        "overlay",
        if f.mounts.overlay {
            "available — a workspace can be a transaction ([workspace] mode, --transaction)".into()
        } else {
            "not in /proc/filesystems — the kernel may load it at the first transaction; if it cannot, `[workspace] mode = \"transaction\"` and `\"auto\"` fail to launch (modprobe overlay)".into()
        },
    );
}

fn bpf_lines(f: &Findings, push: &mut impl FnMut(Mark, &'static str, String)) {
    let met = |req: Requirement| req.met(f);
    let bpf_lsm_listed = f
        .mounts
        .lsm
        .as_ref()
        .is_some_and(|l| l.iter().any(|m| m == "bpf"));
    push(
        Mark::optional(f.bpf.btf.usable()),
        "btf",
        consequence(
            &f.bpf.btf,
            "/sys/kernel/btf/vmlinux parses",
            "tp_btf and BPF LSM programs cannot load",
        ),
    );
    push(
        Mark::required(met(Requirement::RingBuffer)),
        "ring buffer",
        consequence(
            &f.bpf.ring_buffer,
            "created and mapped — kernel events reach agentd",
            "denials, execs and forks cannot reach agentd and the breaker cannot count them",
        ),
    );
    push(
        Mark::required(met(Requirement::CgroupSockAddr)),
        "cgroup/connect4",
        consequence(
            &f.bpf.cgroup_sock_addr,
            "loads and attaches to a v2 cgroup — connect, sendmsg and bind are decided per agent in the kernel",
            "the network allow-list cannot be enforced",
        ),
    );
    push(
        Mark::required(met(Requirement::CgroupSock)),
        "cgroup/sock_create",
        consequence(
            &f.bpf.cgroup_sock,
            "loads and attaches to a v2 cgroup — socket families are decided per agent",
            "socket creation is not reported per agent (the seccomp filter still restricts families)",
        ),
    );
    push(
        Mark::required(met(Requirement::Tracepoint)),
        "tracepoint",
        consequence(
            &f.bpf.tracepoint,
            "attaches to sched/sched_process_fork — file writes, execs and forks are observed",
            "file writes, execs and forks are not observed",
        ),
    );
    push(
        Mark::optional(f.bpf.tp_btf.usable()),
        "tp_btf",
        consequence(
            &f.bpf.tp_btf,
            "loads and attaches",
            "classic tracepoints are used instead",
        ),
    );
    let lsm_text = match &f.bpf.lsm {
        Status::Usable => "loads and attaches, bpf is an active LSM — besides the agent's own view (read-only protect mounts, noexec writable trees, a private /run), its programs refuse changes to filesystem.protect paths and the creation of missing ones, an agent's memfd exec and executable mappings of files it could write, and unix-socket connects beyond its own sockets and network.unix".to_owned(),
        Status::Unusable(why) => format!(
            "{why}{} — the agent's own view alone enforces filesystem.protect (read-only mounts; a protected path missing at launch is not protected), refuses executable mappings in writable trees without exec (noexec mounts) and keeps host sockets under /run out of reach but those network.unix lists; an agent's memfd exec is killed at exec instead of refused",
            match why {
                Unavailable::Refused { .. } if bpf_lsm_listed => " although bpf is an active LSM",
                Unavailable::Refused { .. }
                | Unavailable::NeedsRoot { .. }
                | Unavailable::Missing(_)
                | Unavailable::Failed(_) => "",
            }
        ),
    };
    push(Mark::optional(f.bpf.lsm.usable()), "bpf lsm", lsm_text);
}

/// The human report: one aligned line per finding, notes, and a verdict.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "agentd doctor: kernel {}",
        r.findings.kernel.as_deref().unwrap_or("unknown")
    );
    let lines = lines(&r.findings);
    let width = lines.iter().map(|l| l.label.len()).max().unwrap_or(0);
    for l in &lines {
        let _ = writeln!(
            s,
            "  {:<4}  {:<width$}  {}",
            l.mark.as_str(),
            l.label,
            l.text
        );
    }
    for n in &r.findings.notes {
        let _ = writeln!(s, "  note: {n}");
    }
    if r.enforcement_ready {
        let _ = writeln!(s, "verdict: ready to enforce");
    } else {
        let _ = writeln!(
            s,
            "verdict: not ready to enforce, missing: {}",
            r.missing
                .iter()
                .map(|m| m.label())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    s
}

#[cfg(test)]
mod tests {

    use super::*;

    /// What this project's machines report: everything but BPF LSM, memory and pids on v1.
    fn hybrid_host() -> Findings {
        Findings {
            kernel: Some("6.18.0-hardened".into()),
            root: Root {
                euid: 0,
                cap_sys_admin: true,
                cap_bpf: true,
            },
            landlock: Landlock {
                abi: Some(7),
                status: Status::Usable,
            },
            seccomp: Seccomp {
                own_mode: Some(SeccompMode::Disabled),
                filter: Status::Usable,
                user_notif: Status::Usable,
            },
            cgroup: Cgroup {
                mount: Some("/sys/fs/cgroup/unified".into()),
                controllers: vec!["hugetlb".into()],
                kill: Status::Usable,
                pids: Controller::V1 {
                    mount: "/sys/fs/cgroup/pids".into(),
                },
                memory: Controller::V1 {
                    mount: "/sys/fs/cgroup/memory".into(),
                },
            },
            bpf: Bpf {
                btf: Status::Usable,
                ring_buffer: Status::Usable,
                cgroup_sock_addr: Status::Usable,
                cgroup_sock: Status::Usable,
                tracepoint: Status::Usable,
                tp_btf: Status::Usable,
                lsm: Status::Unusable(Unavailable::Refused {
                    call: "BPF_PROG_LOAD",
                    errno: Errno::EPERM,
                }),
            },
            mounts: Mounts {
                bpffs: Filesystem {
                    path: "/sys/fs/bpf",
                    state: MountState::Mounted,
                },
                tracefs: Filesystem {
                    path: "/sys/kernel/tracing",
                    state: MountState::MountedByDoctor,
                },
                securityfs: Filesystem {
                    path: "/sys/kernel/security",
                    state: MountState::Mounted,
                },
                lsm: Some(vec!["capability".into(), "landlock".into(), "bpf".into()]),
                overlay: true,
            },
            notes: Vec::new(),
        }
    }

    #[test]
    fn hybrid_host_is_ready_without_bpf_lsm() {
        let r = Report::new(hybrid_host());
        assert!(r.enforcement_ready);
        assert!(r.missing.is_empty());
        let text = render(&r);
        assert!(text.contains(
            "bpf lsm             refused (EPERM at BPF_PROG_LOAD) although bpf is an active LSM — the agent's own view alone enforces filesystem.protect"
        ), "{text}");
        assert!(text.contains("  --    bpf lsm"), "{text}");
        assert!(text.contains("  ok    landlock            ABI 7"), "{text}");
        assert!(text.contains("v1 at /sys/fs/cgroup/pids"), "{text}");
        assert!(
            text.contains("doctor mounted it at /sys/kernel/tracing"),
            "{text}"
        );
        assert!(text.ends_with("verdict: ready to enforce\n"), "{text}");
        assert!(!text.contains("FAIL"), "{text}");
    }

    #[test]
    fn each_missing_requirement_is_named_and_fails() {
        let mut f = hybrid_host();
        f.root = Root {
            euid: 1000,
            cap_sys_admin: false,
            cap_bpf: false,
        };
        let needs_root = Status::Unusable(Unavailable::NeedsRoot {
            call: "BPF_MAP_CREATE",
            errno: Errno::EPERM,
        });
        f.bpf.ring_buffer = needs_root.clone();
        f.bpf.cgroup_sock_addr = needs_root.clone();
        f.bpf.cgroup_sock = needs_root.clone();
        f.bpf.tracepoint = needs_root.clone();
        f.cgroup.kill = Status::Unusable(Unavailable::Missing("no cgroup.kill".into()));
        let r = Report::new(f);
        assert!(!r.enforcement_ready);
        assert_eq!(
            r.missing,
            [
                Requirement::Root,
                Requirement::CgroupKill,
                Requirement::CgroupSockAddr,
                Requirement::CgroupSock,
                Requirement::Tracepoint,
                Requirement::RingBuffer,
            ]
        );
        let text = render(&r);
        assert!(
            text.contains("FAIL  cgroup/connect4     needs root (EPERM at BPF_MAP_CREATE)"),
            "{text}"
        );
        assert!(text.ends_with(
            "verdict: not ready to enforce, missing: root, cgroup.kill, cgroup/connect4, cgroup/sock_create, tracepoint, ring buffer\n"
        ), "{text}");
    }

    #[test]
    fn optional_features_do_not_block_enforcement() {
        let mut f = hybrid_host();
        f.seccomp.user_notif = Status::Unusable(Unavailable::Refused {
            call: "seccomp(SECCOMP_GET_ACTION_AVAIL)",
            errno: Errno::EOPNOTSUPP,
        });
        f.bpf.btf = Status::Unusable(Unavailable::Failed("no vmlinux".into()));
        f.bpf.tp_btf = Status::Unusable(Unavailable::Missing("no BTF".into()));
        f.cgroup.pids = Controller::Missing;
        f.cgroup.memory = Controller::V2 { enabled: false };
        f.mounts.bpffs.state = MountState::NotMounted(None);
        f.mounts.lsm = None;
        let r = Report::new(f);
        assert!(r.enforcement_ready, "{:?}", r.missing);
        let text = render(&r);
        assert!(
            text.contains(
                "--    pids                missing — profiles that set limits.pids are refused"
            ),
            "{text}"
        );
        assert!(
            text.contains("ok    memory              v2, not yet enabled"),
            "{text}"
        );
        assert!(!text.contains("although bpf is an active LSM"), "{text}");
    }

    #[test]
    fn landlock_below_abi_4_is_enough_but_says_so() {
        let mut f = hybrid_host();
        f.landlock.abi = Some(3);
        let r = Report::new(f.clone());
        assert!(r.enforcement_ready);
        assert!(render(&r).contains("ABI < 4 has no TCP port rules"));

        f.landlock = Landlock {
            abi: None,
            status: Status::Unusable(Unavailable::Refused {
                call: "landlock_create_ruleset",
                errno: Errno::EOPNOTSUPP,
            }),
        };
        let r = Report::new(f);
        assert_eq!(r.missing, [Requirement::Landlock]);
        assert!(
            render(&r).contains(
                "FAIL  landlock            refused (EOPNOTSUPP at landlock_create_ruleset)"
            )
        );
    }

    #[test]
    fn json_shape_is_stable() {
        let mut f = hybrid_host();
        f.bpf.cgroup_sock = Status::Unusable(Unavailable::NeedsRoot {
            call: "BPF_PROG_LOAD",
            errno: Errno::EPERM,
        });
        let v = serde_json::to_value(Report::new(f)).unwrap();
        assert_eq!(v["landlock"], serde_json::json!({"abi": 7, "usable": true}));
        assert_eq!(
            v["bpf"]["cgroup_sock_addr"],
            serde_json::json!({"usable": true})
        );
        assert_eq!(
            v["bpf"]["lsm"],
            serde_json::json!({
                "usable": false,
                "error": "refused (EPERM at BPF_PROG_LOAD)",
                "reason": "refused",
                "call": "BPF_PROG_LOAD",
                "errno": "EPERM",
            })
        );
        assert_eq!(v["bpf"]["cgroup_sock"]["reason"], "needs_root");
        assert_eq!(v["cgroup"]["mount"], "/sys/fs/cgroup/unified");
        assert_eq!(
            v["cgroup"]["pids"],
            serde_json::json!({"hierarchy": "v1", "mount": "/sys/fs/cgroup/pids"})
        );
        assert_eq!(
            v["mounts"]["tracefs"],
            serde_json::json!({"path": "/sys/kernel/tracing", "mounted": true, "mounted_by_doctor": true})
        );
        assert_eq!(v["seccomp"]["own_mode"], "disabled");
        assert_eq!(v["enforcement_ready"], false);
        assert_eq!(v["missing"], serde_json::json!(["cgroup_sock"]));
    }
}
