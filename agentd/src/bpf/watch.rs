//! The kernel watch the supervisor drives: load the programs once, add and remove agents
//! (attach the network programs to each agent's cgroup, fill the policy maps), set an
//! agent's kill flag, and stream decoded events.
//!
//! Order matters and is kept here:
//! - `load` checks every tracepoint's record layout and resolves struct offsets from BTF
//!   before loading, so a mismatching kernel fails at start, not with garbage events;
//! - `add_agent` writes the maps before attaching the cgroup programs, and is called
//!   before the agent's first process enters its cgroup: no process of the agent ever
//!   runs unwatched;
//! - `remove_agent` detaches first, then deletes entries.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    fs::File,
    mem::size_of,
    os::unix::fs::MetadataExt as _,
    path::{Component, Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use agentd_common::{
    AGENT_FLAG_KILLED, AgentState, BindKey, CONFIG_CGROUP_LEVELS, CONFIG_KILL_GATE,
    CONFIG_LEVEL_MAX, CONFIG_LEVEL_MIN, CanaryInode, CanaryKey, CanaryPath, GUARD_EXEC_ROOT,
    GUARD_WRITE_ROOT, GuardedName, NAME_FORBID, NAME_UNIX_PEER, NetKey, RawEvent,
    SYSCALL_EXIT_ONLY,
};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuHashMap, RingBuf, lpm_trie::Key},
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock,
        CgroupSockAddr, Lsm, Program, ProgramError, TracePoint,
        links::{FdLink, PinnedLink},
        lsm::LsmLinkId,
        tp_btf::BtfTracePointLinkId,
        trace_point::TracePointLinkId,
    },
};
use tokio::{io::unix::AsyncFd, sync::mpsc};

mod handover;

pub use handover::{LINKS_DIR, MAPS_DIR, layout_stamp, release_previous};

use super::{
    BPFFS, BpfError, EBPF_OBJECT, TRACEFS,
    admit::{Admissions, DnsClients},
    ask::ExecGate,
    btf::{self, Btf as KernelBtf},
    decode::{AT_FDCWD, AgentInfo, ClockOffset, TargetCreds, Targets, decode, normalize},
    encode::{
        AgentEntries, CanaryStat, agent_entries, canary_inode_keys, cgroup_level, guard_plan,
        guarded_name, inode_matchable, mountinfo_dev,
    },
    ensure_mounted, programs, tracefs,
};
use crate::{
    event::{Event, Kind, Layer, Verdict},
    host::Creds,
    profile::CompiledPolicy,
};

pub(super) const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// `CGROUP2_SUPER_MAGIC`.
const CGROUP2_MAGIC: i64 = 0x6367_7270;
/// Capacity of the channel `events()` returns; when the consumer lags this far, the
/// reader stops draining and the kernel counts further events as lost.
const EVENT_CHANNEL: usize = 4096;
/// How often lost-event counts are read and reported.
const LOST_POLL: Duration = Duration::from_secs(1);
/// How long a removed agent's id stays known to the decoder, for its last events.
const REMOVED_GRACE: Duration = Duration::from_secs(60);

/// A watched agent, returned by [`Watch::add_agent`] and given back to
/// [`Watch::remove_agent`]. Dropping it changes nothing: the agent stays watched (fail
/// closed) until `remove_agent`.
#[derive(Debug)]
pub struct AgentHandle {
    agent_id: String,
    cgroup_dir: PathBuf,
    cgroup_id: u64,
    level: u32,
    entries: AgentEntries,
    links: Vec<CgroupLink>,
}

impl AgentHandle {
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// The agent's cgroup id (its cgroup v2 directory's inode), as in events and
    /// [`Watch::set_killed`].
    pub fn cgroup_id(&self) -> u64 {
        self.cgroup_id
    }
}

/// One cgroup program attached to an agent's cgroup: a BPF link, held by this process
/// (detached when dropped) or pinned in bpffs (attached until unpinned, whatever happens
/// to this process).
#[derive(Debug)]
struct CgroupLink {
    program: &'static str,
    link: HeldLink,
}

#[derive(Debug)]
enum HeldLink {
    Fd(FdLink),
    Pinned(PinnedLink),
}

/// What the event reader knows about agents, shared with the `Watch`.
#[derive(Debug, Default)]
struct Registry {
    agents: StdHashMap<u64, (AgentInfo, Option<Instant>)>,
}

impl Registry {
    fn purge(&mut self, now: Instant) {
        self.agents.retain(|_, (_, removed)| {
            removed.is_none_or(|t| now.duration_since(t) < REMOVED_GRACE)
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The loaded programs and the maps user space writes.
pub struct Watch {
    ebpf: Ebpf,
    /// Behind a mutex so the breaker can set the kill flag through `&Watch`.
    agents: Mutex<HashMap<MapData, u64, AgentState>>,
    net_allow: LpmTrie<MapData, NetKey, u8>,
    /// `DNS_ALLOW`, shared with the resolvers that admit addresses.
    admissions: Admissions,
    /// `DNS_CLIENTS`, shared with the resolvers that check who asked.
    dns_clients: DnsClients,
    /// `ASK_EXEC` and `EXEC_GRANT`, shared with whoever answers held execs.
    exec_gate: ExecGate,
    bind_allow: HashMap<MapData, BindKey, u8>,
    canaries: HashMap<MapData, CanaryKey, CanaryPath>,
    canary_inodes: HashMap<MapData, CanaryInode, u32>,
    guarded: HashMap<MapData, CanaryInode, u32>,
    guarded_names: HashMap<MapData, GuardedName, u8>,
    /// Whether the BPF LSM programs are attached; why not when they are not.
    lsm: Result<(), String>,
    config: Array<MapData, u64>,
    /// The ring buffer and lost-event counters, until `events()` hands them to its task.
    stream: Option<(RingBuf<MapData>, PerCpuHashMap<MapData, u64, u64>)>,
    registry: Arc<Mutex<Registry>>,
    cgroup_mount: PathBuf,
    /// Agents per cgroup level (the `CONFIG_CGROUP_LEVELS` mask is the set of keys).
    levels: BTreeMap<u32, usize>,
    next_policy_id: u32,
    /// Dropping it (with the Watch) stops the event task.
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    /// Syscall tracepoint attachments, detached together when the Watch is dropped.
    tracepoint_links: Vec<(&'static str, TracePointLinkId)>,
    /// The process tracepoints' attachments (exec, fork, exit).
    process_links: Vec<(&'static str, BtfTracePointLinkId)>,
    /// The BPF LSM programs' attachments, where they run.
    lsm_links: Vec<(&'static str, LsmLinkId)>,
    /// The kill gate's attachments, while agents are watched (empty otherwise).
    gate_links: Vec<(&'static str, BtfTracePointLinkId)>,
    /// Where agents' cgroup links are pinned (the daemon), if anywhere.
    pin_dir: Option<PathBuf>,
    /// The write end of the pipe a reaper forked early waits on ([`Watch::hold_in_reaper`]).
    reaper: Option<std::os::fd::OwnedFd>,
}

impl Drop for Watch {
    /// Releasing a syscall tracepoint waits for an RCU grace period under the kernel's
    /// `event_mutex` (measured here: 40-90 ms each, one after another): dropping the 54
    /// attachments made every `agentd run` end 2-4 s after its agent. Instead, a reaper
    /// process inherits a reference to every descriptor and releases them after we are
    /// gone: our own closes are then cheap (not the last reference), and the reaper's exit
    /// pays the grace periods in the background. Until then the programs keep running
    /// with no agent in their maps, returning at the first lookup.
    fn drop(&mut self) {
        let Some(release) = self.reaper.take().or_else(spawn_reaper) else {
            return;
        };
        for (name, id) in std::mem::take(&mut self.tracepoint_links) {
            match program::<TracePoint>(&mut self.ebpf, name).map(|p| p.take_link(id)) {
                Ok(Ok(link)) => drop(link),
                Ok(Err(e)) => tracing::debug!("tracepoint link of {name}: {e}"),
                Err(e) => tracing::debug!("tracepoint link of {name}: {e}"),
            }
        }
        // The reaper exits (releasing the last references) once this closes; the rest of
        // the Watch's descriptors close after this function, also not the last references.
        drop(release);
    }
}

/// The descriptors of this process that are sockets (`/proc/self/fd`).
fn open_sockets() -> Vec<std::os::fd::RawFd> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|target| {
                target
                    .as_os_str()
                    .as_encoded_bytes()
                    .starts_with(b"socket:")
            })
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Forks the reaper described at `Drop for Watch`. Returns the write end of a pipe: the
/// reaper exits when it is closed. `None` when the fork failed (the caller then releases
/// the descriptors itself, slowly).
fn spawn_reaper() -> Option<std::os::fd::OwnedFd> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ok()?;
    // The reaper holds no socket: a listening one (the daemon's outputs, bound before the
    // watch is loaded) would keep its port taken, answering nobody, after we are gone.
    let sockets = open_sockets();
    // SAFETY: the child runs only async-signal-safe calls (close, read, _exit) on
    // descriptors it owns, then exits without returning, so the state of the parent's
    // other threads at fork time cannot matter.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            let read = std::os::fd::AsRawFd::as_raw_fd(&read);
            let write = std::os::fd::AsRawFd::as_raw_fd(&write);
            let mut byte = 0u8;
            // SAFETY: plain syscalls on integer descriptors and a stack buffer (the list
            // of sockets was made before the fork; reading it allocates nothing). Closing
            // stdio first keeps a caller reading our output from waiting for this process.
            unsafe {
                libc::close(0);
                libc::close(1);
                libc::close(2);
                for &fd in &sockets {
                    libc::close(fd);
                }
                libc::close(write);
                while libc::read(read, (&raw mut byte).cast(), 1) < 0
                    && *libc::__errno_location() == libc::EINTR
                {}
                libc::_exit(0)
            }
        }
        Ok(nix::unistd::ForkResult::Parent { .. }) => Some(write),
        Err(e) => {
            tracing::debug!("cannot fork the tracepoint reaper: {e}");
            None
        }
    }
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("cgroup_mount", &self.cgroup_mount)
            .field("levels", &self.levels)
            .field("agents", &lock(&self.registry).agents.len())
            .field("events_taken", &self.stream.is_none())
            .finish_non_exhaustive()
    }
}

fn take_map<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    conv: impl FnOnce(aya::maps::Map) -> Result<T, MapError>,
) -> Result<T, BpfError> {
    let map = ebpf.take_map(name).ok_or(BpfError::MissingMap(name))?;
    conv(map).map_err(|source| BpfError::Map { map: name, source })
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> BpfError {
    move |source| BpfError::Map { map, source }
}

fn load_err(program: &'static str) -> impl FnOnce(ProgramError) -> BpfError {
    move |source| BpfError::LoadProgram { program, source }
}

fn btf_err(e: impl std::fmt::Display) -> BpfError {
    BpfError::Btf(format!("{VMLINUX_BTF}: {e}"))
}

/// What the load needs from the running kernel's BTF, read and parsed once per load
/// (each parse of vmlinux's BTF costs milliseconds).
struct KernelFacts {
    /// Program globals: the process programs' offsets ([`task_offsets`]) and the file
    /// programs' ([`vfs_offsets`]).
    globals: Vec<(&'static str, u64)>,
    /// Why each missing [`btf::LSM_MEMBERS`] entry is missing.
    lsm_missing: Vec<String>,
    /// [`process_exit_program`].
    exit_program: &'static str,
    /// aya's parse of the same BTF: the targets of the tp_btf and LSM programs, and the
    /// object's relocations.
    btf: Btf,
}

/// Reads the kernel's BTF once and takes from it all the load needs.
fn kernel_facts() -> Result<KernelFacts, BpfError> {
    let raw = std::fs::read(VMLINUX_BTF).map_err(|source| BpfError::Read {
        path: VMLINUX_BTF.into(),
        source,
    })?;
    let own = KernelBtf::parse(&raw).map_err(btf_err)?;
    let mut globals = task_offsets(&own)?.to_vec();
    let vfs = vfs_offsets(&own)?;
    globals.extend(vfs.globals);
    let exit_program = process_exit_program(&own)?;
    let btf = Btf::parse(&raw, aya::Endianness::default()).map_err(btf_err)?;
    Ok(KernelFacts {
        globals,
        lsm_missing: vfs.lsm_missing,
        exit_program,
        btf,
    })
}

/// Struct offsets the file programs' dentry walks read (`btf::VFS_MEMBERS`) and where
/// they read neighbouring fields at once (`btf::VFS_WINDOWS`), from the running kernel's
/// BTF.
/// Also what BPF LSM's own members the BTF lacks (see `btf::LSM_MEMBERS`).
fn vfs_offsets(btf: &KernelBtf<'_>) -> Result<btf::VfsGlobals, BpfError> {
    let globals = btf::vfs_globals(btf).map_err(btf_err)?;
    tracing::debug!(?globals, "vfs struct offsets");
    Ok(globals)
}

/// Struct offsets the process programs read, from the running kernel's BTF.
fn task_offsets(btf: &KernelBtf<'_>) -> Result<[(&'static str, u64); 4], BpfError> {
    let off = |member: &str| {
        btf.member_offset("task_struct", member)
            .map(u64::from)
            .map_err(btf_err)
    };
    Ok([
        ("TASK_PID_OFFSET", off("pid")?),
        ("TASK_TGID_OFFSET", off("tgid")?),
        ("TASK_EXIT_CODE_OFFSET", off("exit_code")?),
        (
            "BPRM_FILE_OFFSET",
            btf.member_offset("linux_binprm", "file")
                .map(u64::from)
                .map_err(btf_err)?,
        ),
    ])
}

/// A tracepoint every kernel with syscall tracepoints has (openat exists on every
/// architecture): when it is missing, so are all the others.
const ANY_SYSCALL_TRACEPOINT: &str = "sys_enter_openat";

/// Whether the entry tracepoint `enter` of a covered call is missing because the kernel
/// does not have the call (e.g. fchmodat2 before 6.6): then it is skipped. Syscall
/// tracepoints exist for every call a kernel defines, so with syscall tracepoints present
/// and neither of the call's two, the call is not there. Anything else is an error:
/// no syscall tracepoints at all (CONFIG_FTRACE_SYSCALLS off), or one of the two
/// without the other.
fn missing_syscall(
    tracefs: &Path,
    enter: &str,
    exit: &str,
    has_exit: bool,
) -> Result<(), BpfError> {
    let err = |tracepoint: &str, reason: &str| BpfError::TracepointFormat {
        tracepoint: format!("syscalls/{tracepoint}"),
        reason: reason.into(),
    };
    if tracefs::read_format(tracefs, "syscalls", ANY_SYSCALL_TRACEPOINT)?.is_none() {
        return Err(err(
            enter,
            "does not exist, nor does any syscall tracepoint (kernel without CONFIG_FTRACE_SYSCALLS?)",
        ));
    }
    if has_exit {
        return Err(err(enter, &format!("does not exist, but {exit} does")));
    }
    Ok(())
}

/// The covered syscalls this kernel has, with their formats checked. A call the kernel
/// does not have (neither tracepoint exists) is skipped: nothing can make it.
fn checked_tracepoints() -> Result<Vec<(programs::SyscallTracepoint, i64)>, BpfError> {
    let tracefs = Path::new(TRACEFS.1);
    let mut out = Vec::new();
    for tp in programs::syscall_tracepoints() {
        let Some(nr) = tp.nr else {
            tracing::debug!(syscall = tp.syscall.name(), "not on this architecture");
            continue;
        };
        let enter = tp.tracepoint;
        let exit = format!("sys_exit_{}", tp.syscall.name());
        let Some(fields) = tracefs::read_format(tracefs, "syscalls", enter)? else {
            let has_exit = tracefs::read_format(tracefs, "syscalls", &exit)?.is_some();
            missing_syscall(tracefs, enter, &exit, has_exit)?;
            tracing::debug!(
                syscall = tp.syscall.name(),
                "no such syscall on this kernel: its tracepoints are skipped"
            );
            continue;
        };
        check_syscall_pair(tracefs, enter, &fields, tp.args, &exit)?;
        out.push((tp, nr));
    }
    Ok(out)
}

/// The calls watched at their exit only whose tracepoint this kernel has, with their
/// formats checked and their numbers. A call the kernel was built without (no
/// `sys_exit_*` tracepoint: e.g. init_module without CONFIG_MODULES) is skipped: nothing
/// can call it, so there is no refusal to report.
fn checked_exit_only_tracepoints() -> Result<Vec<(programs::ExitOnlyTracepoint, u32)>, BpfError> {
    let tracefs = Path::new(TRACEFS.1);
    let mut out = Vec::new();
    for tp in programs::exit_only_tracepoints() {
        let Some(nr) = tp.nr else {
            tracing::debug!(syscall = tp.syscall.name(), "not on this architecture");
            continue;
        };
        let Some(fields) = tracefs::read_format(tracefs, "syscalls", &tp.tracepoint)? else {
            tracing::debug!(
                syscall = tp.syscall.name(),
                tracepoint = tp.tracepoint,
                "no such tracepoint on this kernel: its refusals are not reported"
            );
            continue;
        };
        tracefs::check_exit(&fields).map_err(|reason| BpfError::TracepointFormat {
            tracepoint: format!("syscalls/{}", tp.tracepoint),
            reason,
        })?;
        let nr = u32::try_from(nr).map_err(|_| BpfError::TracepointFormat {
            tracepoint: format!("syscalls/{}", tp.tracepoint),
            reason: format!("syscall number {nr} out of range"),
        })?;
        out.push((tp, nr));
    }
    Ok(out)
}

/// The connect/bind tracepoints to attach, as (call, entry program), with their formats
/// checked. They report unix-socket calls (no cgroup program sees them) and inet calls a
/// host security module refused before the cgroup programs, on every kernel.
fn checked_pair_tracepoints(
    table: &[(&'static str, &'static str, &[&str])],
) -> Result<Vec<(&'static str, &'static str)>, BpfError> {
    let tracefs = Path::new(TRACEFS.1);
    let mut out = Vec::new();
    for &(call, enter, args) in table {
        let exit = format!("sys_exit_{call}");
        let fields = tracefs::read_format(tracefs, "syscalls", enter)?.ok_or_else(|| {
            BpfError::TracepointFormat {
                tracepoint: format!("syscalls/{enter}"),
                reason: "does not exist (kernel without CONFIG_FTRACE_SYSCALLS?)".into(),
            }
        })?;
        check_syscall_pair(tracefs, enter, &fields, args, &exit)?;
        out.push((call, enter));
    }
    Ok(out)
}

/// The programs of `(call, entry program)` pairs, as [`load_programs`] jobs: each entry
/// program, then the shared `exit` program (none when there are no pairs).
fn pair_jobs(
    pairs: &[(&'static str, &'static str)],
    exit: &'static str,
) -> impl Iterator<Item = (&'static str, Load)> {
    let exit = (!pairs.is_empty()).then_some((exit, Load::TracePoint));
    pairs
        .iter()
        .map(|(_, enter)| (*enter, Load::TracePoint))
        .chain(exit)
}

/// Attaches the entry program of each `(call, entry program)` pair (loaded) to its
/// `sys_enter_<call>`, and the shared `exit` program to each `sys_exit_<call>`.
fn attach_pairs(
    ebpf: &mut Ebpf,
    pairs: &[(&'static str, &'static str)],
    exit: &'static str,
    links: &mut Vec<(&'static str, TracePointLinkId)>,
) -> Result<(), BpfError> {
    for (_, enter) in pairs {
        let p: &mut TracePoint = program(ebpf, enter)?;
        let link = p
            .attach("syscalls", enter)
            .map_err(|source| BpfError::Attach {
                program: enter,
                target: format!("tracepoint syscalls/{enter}"),
                source,
            })?;
        links.push((*enter, link));
    }
    if pairs.is_empty() {
        return Ok(());
    }
    let p: &mut TracePoint = program(ebpf, exit)?;
    for (call, _) in pairs {
        let name = format!("sys_exit_{call}");
        let link = p
            .attach("syscalls", &name)
            .map_err(|source| BpfError::Attach {
                program: exit,
                target: format!("tracepoint syscalls/{name}"),
                source,
            })?;
        links.push((exit, link));
    }
    Ok(())
}

/// Checks a syscall's entry tracepoint (its format already read) and its exit tracepoint
/// against the layouts the programs read; the exit must exist.
fn check_syscall_pair(
    tracefs: &Path,
    enter: &str,
    enter_fields: &[tracefs::Field],
    args: &[&str],
    exit: &str,
) -> Result<(), BpfError> {
    tracefs::check_enter(enter_fields, args).map_err(|reason| BpfError::TracepointFormat {
        tracepoint: format!("syscalls/{enter}"),
        reason,
    })?;
    let fields = tracefs::read_format(tracefs, "syscalls", exit)?.ok_or_else(|| {
        BpfError::TracepointFormat {
            tracepoint: format!("syscalls/{exit}"),
            reason: "does not exist".into(),
        }
    })?;
    tracefs::check_exit(&fields).map_err(|reason| BpfError::TracepointFormat {
        tracepoint: format!("syscalls/{exit}"),
        reason,
    })
}

/// The process-exit program whose reads the kernel's `sched_process_exit` prototype
/// allows (see [`programs::PROCESS_EXIT_PROGRAMS`]).
fn process_exit_program(btf: &KernelBtf<'_>) -> Result<&'static str, BpfError> {
    let args = btf
        .tracepoint_args(programs::PROCESS_EXIT)
        .map_err(btf_err)?;
    exit_program_for(args).ok_or_else(|| {
        BpfError::Btf(format!(
            "{VMLINUX_BTF}: tracepoint {} has {args} arguments, agentd knows 1 or 2",
            programs::PROCESS_EXIT
        ))
    })
}

/// The program of [`programs::PROCESS_EXIT_PROGRAMS`] for a prototype of `args` arguments:
/// the one reading the most arguments the kernel passes.
fn exit_program_for(args: usize) -> Option<&'static str> {
    programs::PROCESS_EXIT_PROGRAMS
        .iter()
        .filter(|(_, reads)| *reads <= args)
        .max_by_key(|(_, reads)| *reads)
        .map(|(name, _)| *name)
}

/// What [`Watch::load`] reads and checks before it loads anything.
struct Checked {
    cgroup_mount: PathBuf,
    tracepoints: Vec<(programs::SyscallTracepoint, i64)>,
    exit_only: Vec<(programs::ExitOnlyTracepoint, u32)>,
    sockaddr: Vec<(&'static str, &'static str)>,
    signal: Vec<(&'static str, &'static str)>,
    kernel: KernelFacts,
}

impl Checked {
    fn read() -> Result<Checked, BpfError> {
        Ok(Checked {
            cgroup_mount: cgroup2_root()?,
            tracepoints: checked_tracepoints()?,
            exit_only: checked_exit_only_tracepoints()?,
            sockaddr: checked_pair_tracepoints(&programs::SOCKADDR_TRACEPOINTS)?,
            signal: checked_pair_tracepoints(&programs::SIGNAL_TRACEPOINTS)?,
            kernel: kernel_facts()?,
        })
    }
}

/// Whether the BPF LSM programs ([`programs::LSM_PROGRAMS`]) are worth loading; `Err`
/// says why not: the kernel's BTF lacks members they read (`lsm_missing`), or `bpf` is
/// not an active LSM (programs would load, attach and never run: checked from
/// securityfs, mounted if needed).
fn lsm_usable(lsm_missing: &[String]) -> Result<(), String> {
    if !lsm_missing.is_empty() {
        return Err(format!("the kernel's BTF lacks {}", lsm_missing.join(", ")));
    }
    ensure_mounted(super::SECURITYFS)
        .map_err(|e| format!("the active LSMs cannot be read: {e}"))?;
    let list = super::active_lsms()
        .map_err(|e| format!("the active LSMs cannot be read: {}: {e}", super::LSM_LIST))?;
    if !list.iter().any(|m| m == "bpf") {
        return Err(format!(
            "bpf is not an active LSM ({}: {}), so LSM programs would never run",
            super::LSM_LIST,
            list.join(",")
        ));
    }
    Ok(())
}

/// Attaches the BPF LSM programs ([`programs::LSM_PROGRAMS`]), given how loading each
/// went (`loaded`, in that order); `Err` says why they are unavailable: the kernel
/// refused one (BPF LSM disabled by policy, a hook missing). Either all are attached or,
/// on an error, none stays attached.
fn attach_lsm(
    ebpf: &mut Ebpf,
    loaded: Vec<Result<(), BpfError>>,
) -> Result<Vec<(&'static str, LsmLinkId)>, String> {
    for ((name, hook), result) in programs::LSM_PROGRAMS.into_iter().zip(loaded) {
        if let Err(e) = result {
            tracing::debug!("loading {name} ({hook}): {e}");
            // The verifier's log goes to the debug log, not into the reason.
            let short = if let BpfError::LoadProgram {
                source: ProgramError::LoadError { io_error, .. },
                ..
            } = &e
            {
                io_error.to_string()
            } else if let BpfError::LoadProgram { source, .. } = &e {
                source.to_string()
            } else {
                e.to_string()
            };
            return Err(format!("loading {name} on {hook}: {short}"));
        }
    }
    let mut links = Vec::new();
    for (name, hook) in programs::LSM_PROGRAMS {
        let attached = program::<Lsm>(ebpf, name)
            .map_err(|e| e.to_string())
            .and_then(|p| {
                p.attach()
                    .map(|id| (name, id))
                    .map_err(|e| format!("attaching {name} ({hook}): {e}"))
            });
        match attached {
            Ok(link) => links.push(link),
            Err(e) => {
                for (name, id) in links {
                    if let Ok(p) = program::<Lsm>(ebpf, name) {
                        let _ = p.detach(id);
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(links)
}

/// How [`load_programs`] loads a program: its type, and for the programs attached
/// through BTF, the target the verifier checks them against.
#[derive(Debug, Clone, Copy)]
enum Load {
    TracePoint,
    /// tp_btf, on this BTF tracepoint.
    BtfTracePoint(&'static str),
    /// BPF LSM, on this hook.
    Lsm(&'static str),
    CgroupSockAddr,
    CgroupSock,
    CgroupSkb,
}

/// Every program the watch uses, as [`load_programs`] jobs, in the order they are
/// attached: the syscall tracepoints' (an entry program several calls share, the open
/// calls', once), the process tracepoints, the kill gate (attached only while agents are
/// watched), the BPF LSM programs when `lsm`, the cgroup programs (attached per agent).
fn load_jobs(
    tracepoints: &[(programs::SyscallTracepoint, i64)],
    sockaddr: &[(&'static str, &'static str)],
    signal: &[(&'static str, &'static str)],
    exit_program: &'static str,
    lsm: bool,
) -> Vec<(&'static str, Load)> {
    let mut entries: Vec<&'static str> = Vec::new();
    for (tp, _) in tracepoints {
        if !entries.contains(&tp.program) {
            entries.push(tp.program);
        }
    }
    let lsm = programs::LSM_PROGRAMS
        .into_iter()
        .filter(|_| lsm)
        .map(|(name, hook)| (name, Load::Lsm(hook)));
    entries
        .into_iter()
        .map(|name| (name, Load::TracePoint))
        .chain([(programs::SYS_EXIT, Load::TracePoint)])
        .chain(pair_jobs(sockaddr, programs::SYS_EXIT_SOCKADDR))
        .chain(pair_jobs(signal, programs::SYS_EXIT_SIGNAL))
        .chain(
            programs::PROCESS_TRACEPOINTS
                .into_iter()
                .chain([(exit_program, programs::PROCESS_EXIT)])
                .chain(programs::GATE_TRACEPOINTS)
                .map(|(name, tp)| (name, Load::BtfTracePoint(tp))),
        )
        .chain(lsm)
        .chain(
            programs::SOCK_ADDR_PROGRAMS
                .into_iter()
                .map(|(name, _)| (name, Load::CgroupSockAddr)),
        )
        .chain([
            (programs::SOCK_CREATE, Load::CgroupSock),
            (programs::INBOUND, Load::CgroupSkb),
            (programs::OUTBOUND, Load::CgroupSkb),
        ])
        .collect()
}

/// The most threads [`load_programs`] verifies on.
const MAX_LOAD_THREADS: usize = 8;

/// Loads (has the kernel verify) each program of `jobs`, (program, how), and returns each
/// one's result at its job's index. The verifier runs in the thread that loads and the
/// kernel does not serialize privileged loads, so the loads are spread over the
/// machine's cores (at most [`MAX_LOAD_THREADS`] threads, each taking the next job in
/// order until none is left). Nothing is attached here. The BPF LSM programs are used all
/// or none: once the kernel refused one, those not started yet are not loaded (their
/// result is `ProgramError::NotLoaded`; an earlier one in `jobs` has the refusal).
fn load_programs(
    ebpf: &mut Ebpf,
    jobs: &[(&'static str, Load)],
    btf: &Btf,
) -> Vec<Result<(), BpfError>> {
    let started = Instant::now();
    let mut results: Vec<Result<(), BpfError>> = jobs
        .iter()
        .map(|(name, _)| Err(BpfError::MissingProgram(name)))
        .collect();
    // `programs_mut` hands out each program once: the threads share none.
    let mut by_name: StdHashMap<&str, &mut Program> = ebpf.programs_mut().collect();
    let queue: Vec<_> = jobs
        .iter()
        .enumerate()
        .filter_map(|(i, &(name, how))| Some((i, name, how, by_name.remove(name)?)))
        .collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(MAX_LOAD_THREADS)
        .min(queue.len());
    let queue = Mutex::new(queue.into_iter());
    let lsm_refused = AtomicBool::new(false);
    let work = || {
        let mut done = Vec::new();
        loop {
            let Some((i, name, how, p)) = lock(&queue).next() else {
                return done;
            };
            let lsm = matches!(how, Load::Lsm(_));
            if lsm && lsm_refused.load(Ordering::Relaxed) {
                done.push((i, Err(load_err(name)(ProgramError::NotLoaded))));
                continue;
            }
            let t = Instant::now();
            let result = load_one(name, how, p, btf);
            tracing::trace!(program = name, us = t.elapsed().as_micros(), "loaded");
            if lsm && result.is_err() {
                lsm_refused.store(true, Ordering::Relaxed);
            }
            done.push((i, result));
        }
    };
    let done = std::thread::scope(|s| {
        // A thread that cannot be started leaves its share to the others.
        let helpers: Vec<_> = (1..threads)
            .filter_map(|n| {
                std::thread::Builder::new()
                    .name(format!("agentd-load-{n}"))
                    .spawn_scoped(s, work)
                    .ok()
            })
            .collect();
        let mut done = work();
        for h in helpers {
            done.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        done
    });
    for (i, result) in done {
        results[i] = result;
    }
    tracing::debug!(
        programs = jobs.len(),
        threads,
        ms = started.elapsed().as_millis(),
        "programs loaded"
    );
    results
}

/// Loads one program of [`load_programs`].
fn load_one(name: &'static str, how: Load, p: &mut Program, btf: &Btf) -> Result<(), BpfError> {
    fn typed<'a, T>(name: &'static str, p: &'a mut Program) -> Result<&'a mut T, BpfError>
    where
        &'a mut T: TryFrom<&'a mut Program>,
    {
        p.try_into().map_err(|_| BpfError::MissingProgram(name))
    }
    let loaded = match how {
        Load::TracePoint => typed::<TracePoint>(name, p)?.load(),
        Load::BtfTracePoint(tp) => typed::<BtfTracePoint>(name, p)?.load(tp, btf),
        Load::Lsm(hook) => typed::<Lsm>(name, p)?.load(hook, btf),
        Load::CgroupSockAddr => typed::<CgroupSockAddr>(name, p)?.load(),
        Load::CgroupSock => typed::<CgroupSock>(name, p)?.load(),
        Load::CgroupSkb => typed::<CgroupSkb>(name, p)?.load(),
    };
    loaded.map_err(load_err(name))
}

impl Watch {
    /// Mounts tracefs and bpffs if needed, loads the BPF object and attaches the
    /// tracepoints. No agent is watched yet: for every process the programs return after
    /// one failed lookup.
    pub fn load() -> Result<Watch, BpfError> {
        Self::load_with(None)
    }

    /// [`Watch::load`], with every map pinned by name under `maps` when given: a pin
    /// already there is used as the map, contents and all (see [`handover`]).
    fn load_with(maps: Option<&Path>) -> Result<Watch, BpfError> {
        let started = Instant::now();
        ensure_mounted(TRACEFS)?;
        ensure_mounted(BPFFS)?;
        let (mut loader, checked) = std::thread::scope(|s| {
            // aya's `EbpfLoader::new` parses the kernel's BTF, and aya 0.14 has no
            // constructor that does not: it runs beside the reads and checks below, which
            // parse the BTF once for everything the load needs (the loader's own parse is
            // then replaced by that one).
            let loader = std::thread::Builder::new()
                .name("agentd-loader".into())
                .spawn_scoped(s, EbpfLoader::new);
            let checked = Checked::read();
            let loader = match loader {
                Ok(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                Err(_) => EbpfLoader::new(),
            };
            (loader, checked)
        });
        let Checked {
            cgroup_mount,
            tracepoints,
            exit_only,
            sockaddr,
            signal,
            kernel,
        } = checked?;

        loader.btf(Some(&kernel.btf));
        let names = match maps {
            Some(_) => handover::map_names()?,
            None => Vec::new(),
        };
        if let Some(dir) = maps {
            for name in &names {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        for (name, value) in &kernel.globals {
            loader.override_global(name, value, true);
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(BpfError::Load)?;

        // Architecture syscall numbers -> agentd's, for the shared exit program.
        {
            let map = ebpf
                .map_mut("SYSCALLS")
                .ok_or(BpfError::MissingMap("SYSCALLS"))?;
            let mut table: Array<_, u32> = Array::try_from(map).map_err(map_err("SYSCALLS"))?;
            for (tp, nr) in &tracepoints {
                let nr = u32::try_from(*nr).map_err(|_| BpfError::TracepointFormat {
                    tracepoint: tp.tracepoint.into(),
                    reason: format!("syscall number {nr} out of range"),
                })?;
                table
                    .set(nr, tp.syscall as u32, 0)
                    .map_err(map_err("SYSCALLS"))?;
            }
            for (tp, nr) in &exit_only {
                table
                    .set(*nr, tp.syscall as u32 | SYSCALL_EXIT_ONLY, 0)
                    .map_err(map_err("SYSCALLS"))?;
            }
        }

        // Every program is loaded (verified: most of what a load costs) at once, and a
        // failure is reported in the order they are attached below. BPF LSM programs are
        // loaded only where they would run.
        let lsm_usable = lsm_usable(&kernel.lsm_missing);
        let exit_program = kernel.exit_program;
        tracing::debug!(program = exit_program, "process exit program");
        let jobs = load_jobs(
            &tracepoints,
            &sockaddr,
            &signal,
            exit_program,
            lsm_usable.is_ok(),
        );
        let mut lsm_loaded = Vec::new();
        for ((_, how), result) in jobs
            .iter()
            .zip(load_programs(&mut ebpf, &jobs, &kernel.btf))
        {
            match how {
                // Without BPF LSM the watch still runs (see below).
                Load::Lsm(_) => lsm_loaded.push(result),
                Load::TracePoint
                | Load::BtfTracePoint(_)
                | Load::CgroupSockAddr
                | Load::CgroupSock
                | Load::CgroupSkb => result?,
            }
        }

        // Entry programs, then the exit program: until an agent exists they all return
        // at the agent lookup.
        let mut tracepoint_links = Vec::new();
        for (tp, _) in &tracepoints {
            let p: &mut TracePoint = program(&mut ebpf, tp.program)?;
            let link = p
                .attach("syscalls", tp.tracepoint)
                .map_err(|source| BpfError::Attach {
                    program: tp.program,
                    target: format!("tracepoint syscalls/{}", tp.tracepoint),
                    source,
                })?;
            tracepoint_links.push((tp.program, link));
        }
        {
            let p: &mut TracePoint = program(&mut ebpf, programs::SYS_EXIT)?;
            for (tp, _) in &tracepoints {
                let name = format!("sys_exit_{}", tp.syscall.name());
                let link = p
                    .attach("syscalls", &name)
                    .map_err(|source| BpfError::Attach {
                        program: programs::SYS_EXIT,
                        target: format!("tracepoint syscalls/{name}"),
                        source,
                    })?;
                tracepoint_links.push((programs::SYS_EXIT, link));
            }
            // The calls watched at their exit only: a process outside every agent returns
            // before any hash lookup on success, after one on failure.
            for (tp, _) in &exit_only {
                let link =
                    p.attach("syscalls", &tp.tracepoint)
                        .map_err(|source| BpfError::Attach {
                            program: programs::SYS_EXIT,
                            target: format!("tracepoint syscalls/{}", tp.tracepoint),
                            source,
                        })?;
                tracepoint_links.push((programs::SYS_EXIT, link));
            }
        }
        // connect/bind: what Landlock refuses before the cgroup programs run; the signal
        // calls: the signals an agent is refused.
        for (pairs, exit) in [
            (&sockaddr, programs::SYS_EXIT_SOCKADDR),
            (&signal, programs::SYS_EXIT_SIGNAL),
        ] {
            attach_pairs(&mut ebpf, pairs, exit, &mut tracepoint_links)?;
        }
        let mut process_links = Vec::new();
        for (name, tp) in programs::PROCESS_TRACEPOINTS
            .into_iter()
            .chain([(exit_program, programs::PROCESS_EXIT)])
        {
            let p: &mut BtfTracePoint = program(&mut ebpf, name)?;
            let id = p.attach().map_err(|source| BpfError::Attach {
                program: name,
                target: format!("tp_btf {tp}"),
                source,
            })?;
            process_links.push((name, id));
        }
        // The kill gate (loaded) is attached only while agents are watched
        // (`Watch::gate_attach`): it runs on every system call of the host. The network
        // programs (loaded) are attached per agent.
        let lsm_attached = lsm_usable.and_then(|()| attach_lsm(&mut ebpf, lsm_loaded));
        let (lsm, lsm_links) = match lsm_attached {
            Ok(links) => (Ok(()), links),
            Err(why) => (Err(why), Vec::new()),
        };
        if let Err(reason) = &lsm {
            tracing::info!(
                "BPF LSM programs unavailable ({reason}): profiles with filesystem.protect \
                 are refused; an agent's exec of a memfd is killed at exec instead of refused"
            );
        }
        tracing::debug!(ms = started.elapsed().as_millis(), "kernel watch loaded");

        let agents = take_map(&mut ebpf, "AGENTS", HashMap::try_from)?;
        let net_allow = take_map(&mut ebpf, "NET_ALLOW", LpmTrie::try_from)?;
        let bind_allow = take_map(&mut ebpf, "BIND_ALLOW", HashMap::try_from)?;
        let admissions = Admissions::new(take_map(&mut ebpf, "DNS_ALLOW", HashMap::try_from)?);
        let dns_clients = DnsClients::new(take_map(&mut ebpf, "DNS_CLIENTS", HashMap::try_from)?);
        let exec_gate = ExecGate::new(
            take_map(&mut ebpf, "ASK_EXEC", HashMap::try_from)?,
            take_map(&mut ebpf, "EXEC_GRANT", HashMap::try_from)?,
        );
        let canaries = take_map(&mut ebpf, "CANARIES", HashMap::try_from)?;
        let canary_inodes = take_map(&mut ebpf, "CANARY_INODES", HashMap::try_from)?;
        let guarded = take_map(&mut ebpf, "GUARDED", HashMap::try_from)?;
        let guarded_names = take_map(&mut ebpf, "GUARDED_NAMES", HashMap::try_from)?;
        let config = take_map(&mut ebpf, "CONFIG", Array::try_from)?;
        let ring = take_map(&mut ebpf, "EVENTS", RingBuf::try_from)?;
        let lost = take_map(&mut ebpf, "LOST", PerCpuHashMap::try_from)?;
        Ok(Watch {
            ebpf,
            agents: Mutex::new(agents),
            net_allow,
            admissions,
            dns_clients,
            exec_gate,
            bind_allow,
            canaries,
            canary_inodes,
            guarded,
            guarded_names,
            lsm,
            config,
            stream: Some((ring, lost)),
            registry: Arc::default(),
            cgroup_mount,
            levels: BTreeMap::new(),
            next_policy_id: 1,
            shutdown: None,
            tracepoint_links,
            process_links,
            lsm_links,
            gate_links: Vec::new(),
            pin_dir: None,
            reaper: None,
        })
    }

    /// Starts watching an agent whose processes will live in `cgroup_dir` (a cgroup v2
    /// directory, created by the caller): writes its policy to the maps and attaches the
    /// network programs to the directory. Call it before the first process joins.
    pub fn add_agent(
        &mut self,
        agent_id: &str,
        cgroup_dir: &Path,
        policy: &CompiledPolicy,
        creds: Option<Creds>,
    ) -> Result<AgentHandle, BpfError> {
        let policy_id = self.next_policy_id;
        self.next_policy_id = self.next_policy_id.checked_add(1).unwrap_or(1);
        let handle = self.handle_for(agent_id, cgroup_dir, policy, policy_id, true)?;
        self.register(&handle, policy, creds);
        // No agent is in the maps without the gate that kills its processes once tripped.
        let mut handle = handle;
        if let Err(e) = self
            .gate_attach()
            .and_then(|()| self.write_entries(&handle))
            .and_then(|()| self.attach(&mut handle))
        {
            // Undo what was done; the first error is the one to report.
            if let Err(undo) = self.remove_agent(handle) {
                tracing::warn!(agent = agent_id, "cleanup after a failed add_agent: {undo}");
            }
            return Err(e);
        }
        Ok(handle)
    }

    /// What the decoder knows of an agent from now on.
    fn register(&self, handle: &AgentHandle, policy: &CompiledPolicy, creds: Option<Creds>) {
        let info = AgentInfo::new(&handle.agent_id, Arc::new(policy.with_real_paths()));
        if let Some(c) = creds {
            let _ = info.creds.set(c);
        }
        lock(&self.registry)
            .agents
            .insert(handle.cgroup_id, (info, None));
    }

    /// The agent's handle: its cgroup, and its map entries as `policy_id` encodes them
    /// (`fresh`: its cgroup must not be watched yet).
    fn handle_for(
        &self,
        agent_id: &str,
        cgroup_dir: &Path,
        policy: &CompiledPolicy,
        policy_id: u32,
        fresh: bool,
    ) -> Result<AgentHandle, BpfError> {
        let cg_err = |reason: String| BpfError::Cgroup {
            path: cgroup_dir.to_path_buf(),
            reason,
        };
        let dir = cgroup_dir
            .canonicalize()
            .map_err(|e| cg_err(format!("cannot resolve: {e}")))?;
        let fs = nix::sys::statfs::statfs(&dir).map_err(|e| cg_err(format!("statfs: {e}")))?;
        if fs.filesystem_type().0 as i64 != CGROUP2_MAGIC {
            return Err(cg_err("is not a cgroup v2 directory".into()));
        }
        let cgroup_id = std::fs::metadata(&dir)
            .map_err(|e| cg_err(format!("stat: {e}")))?
            .ino();
        let level = cgroup_level(&self.cgroup_mount, &dir).map_err(cg_err)?;
        if fresh && lock(&self.agents).get(&cgroup_id, 0).is_ok() {
            return Err(cg_err(format!("already watched (cgroup id {cgroup_id})")));
        }
        let mut entries = agent_entries(policy_id, policy).map_err(|reason| BpfError::Policy {
            agent: agent_id.to_owned(),
            reason,
        })?;
        // Which device each path's inodes show the kernel: read once for both.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo");
        entries.canary_inodes = canary_inodes(
            agent_id,
            policy_id,
            &policy.canaries,
            mountinfo.as_deref().ok(),
        );
        match &self.lsm {
            // Without BPF LSM the agent's mount namespace keeps protected paths read-only
            // and host sockets under /run out of its view (sandbox::mountns).
            Err(_) => {}
            Ok(()) => {
                let mountinfo = mountinfo
                    .as_deref()
                    .map_err(|e| format!("/proc/self/mountinfo: {e}"));
                mountinfo
                    .and_then(|m| guard_entries(agent_id, policy_id, policy, m, &mut entries))
                    .map_err(|reason| BpfError::Policy {
                        agent: agent_id.to_owned(),
                        reason,
                    })?
            }
        }

        Ok(AgentHandle {
            agent_id: agent_id.to_owned(),
            cgroup_dir: dir,
            cgroup_id,
            level,
            entries,
            links: Vec::new(),
        })
    }

    /// The addresses admitted from agents' DNS answers, for a resolver to add to.
    pub fn admissions(&self) -> Admissions {
        self.admissions.clone()
    }

    /// The programs agents are asked about and the approvals of their execs, for
    /// whoever answers held execs to write to.
    pub fn exec_gate(&self) -> ExecGate {
        self.exec_gate.clone()
    }

    /// Steers the DNS traffic of the agent in `handle` to its resolver on port `port` of
    /// 127.0.0.1 and ::1, and attaches the program that tells its sockets there from any
    /// other process's. Call it before the agent's first process joins its cgroup.
    pub fn steer_dns(&mut self, handle: &mut AgentHandle, port: u16) -> Result<(), BpfError> {
        let target = format!("cgroup {}", handle.cgroup_dir.display());
        let cgroup = File::open(&handle.cgroup_dir).map_err(|source| BpfError::Read {
            path: handle.cgroup_dir.clone(),
            source,
        })?;
        let name = programs::OUTBOUND;
        let p: &mut CgroupSkb = program(&mut self.ebpf, name)?;
        let attach_err = |source| BpfError::Attach {
            program: name,
            target: target.clone(),
            source,
        };
        let id = p
            .attach(
                &cgroup,
                CgroupSkbAttachType::Egress,
                CgroupAttachMode::Single,
            )
            .map_err(attach_err)?;
        let link = p.take_link(id).map_err(attach_err)?;
        let link = FdLink::try_from(link).map_err(|e| BpfError::Pin {
            path: PathBuf::from(&target),
            reason: format!("{name}: not a BPF link: {e}"),
        })?;
        self.hold_links(handle, vec![(name, link)])?;
        let mut agents = lock(&self.agents);
        let mut state = agents
            .get(&handle.cgroup_id, 0)
            .map_err(map_err("AGENTS"))?;
        state.dns_port = port;
        agents
            .insert(handle.cgroup_id, state, 0)
            .map_err(map_err("AGENTS"))
    }

    /// The resolver's check that a query came from its agent: the cgroup id of the agent
    /// whose socket (`proto`, IPv6 or not, local `port`) last sent to a resolver, and
    /// when (CLOCK_MONOTONIC ns).
    pub fn dns_clients(&self) -> DnsClients {
        self.dns_clients.clone()
    }

    fn write_entries(&mut self, h: &AgentHandle) -> Result<(), BpfError> {
        for (prefix, key) in &h.entries.net {
            self.net_allow
                .insert(&Key::new(*prefix, *key), 1, 0)
                .map_err(map_err("NET_ALLOW"))?;
        }
        for key in &h.entries.bind {
            self.bind_allow
                .insert(key, 1, 0)
                .map_err(map_err("BIND_ALLOW"))?;
        }
        for (key, path) in &h.entries.canaries {
            self.canaries
                .insert(key, path, 0)
                .map_err(map_err("CANARIES"))?;
        }
        for (key, index) in &h.entries.canary_inodes {
            self.canary_inodes
                .insert(key, index, 0)
                .map_err(map_err("CANARY_INODES"))?;
        }
        for (key, bits) in &h.entries.guarded {
            self.guarded
                .insert(key, bits, 0)
                .map_err(map_err("GUARDED"))?;
        }
        for (key, bits) in &h.entries.guarded_names {
            self.guarded_names
                .insert(key, bits, 0)
                .map_err(map_err("GUARDED_NAMES"))?;
        }
        lock(&self.agents)
            .insert(h.cgroup_id, h.entries.state, 0)
            .map_err(map_err("AGENTS"))?;
        *self.levels.entry(h.level).or_default() += 1;
        self.write_levels()
    }

    /// Publishes the levels agents sit at. The programs scan `MIN..=MAX` for levels in
    /// the mask, so the range is widened before the mask changes and narrowed after:
    /// no agent's level is ever outside the range while its bit is set.
    fn write_levels(&mut self) -> Result<(), BpfError> {
        let mask = self.levels.keys().fold(0u64, |m, l| m | (1 << l));
        let lo = self.levels.keys().next().copied().map_or(0, u64::from);
        let hi = self.levels.keys().next_back().copied().map_or(0, u64::from);
        let set =
            |config: &mut Array<MapData, u64>, i, v| config.set(i, v, 0).map_err(map_err("CONFIG"));
        let old_lo = self
            .config
            .get(&CONFIG_LEVEL_MIN, 0)
            .map_err(map_err("CONFIG"))?;
        let old_hi = self
            .config
            .get(&CONFIG_LEVEL_MAX, 0)
            .map_err(map_err("CONFIG"))?;
        let old_mask = self
            .config
            .get(&CONFIG_CGROUP_LEVELS, 0)
            .map_err(map_err("CONFIG"))?;
        if old_mask != 0 {
            set(&mut self.config, CONFIG_LEVEL_MIN, lo.min(old_lo))?;
            set(&mut self.config, CONFIG_LEVEL_MAX, hi.max(old_hi))?;
        } else {
            set(&mut self.config, CONFIG_LEVEL_MIN, lo)?;
            set(&mut self.config, CONFIG_LEVEL_MAX, hi)?;
        }
        set(&mut self.config, CONFIG_CGROUP_LEVELS, mask)?;
        set(&mut self.config, CONFIG_LEVEL_MIN, lo)?;
        set(&mut self.config, CONFIG_LEVEL_MAX, hi)
    }

    fn attach(&mut self, h: &mut AgentHandle) -> Result<(), BpfError> {
        let target = format!("cgroup {}", h.cgroup_dir.display());
        let attach_err = |program: &'static str| {
            let target = target.clone();
            move |source| BpfError::Attach {
                program,
                target,
                source,
            }
        };
        let cgroup = File::open(&h.cgroup_dir).map_err(|source| BpfError::Read {
            path: h.cgroup_dir.clone(),
            source,
        })?;
        // Single: a process of the agent cannot attach a program that overrides ours.
        let mode = CgroupAttachMode::Single;
        let mut links: Vec<(&'static str, FdLink)> = Vec::new();
        // A link aya made with BPF_PROG_ATTACH (kernels before 5.7) has no fd to hold.
        let fd_err = |program: &'static str| {
            let target = target.clone();
            move |e: aya::programs::links::LinkError| BpfError::Pin {
                path: PathBuf::from(&target),
                reason: format!("{program}: not a BPF link: {e}"),
            }
        };
        for (name, _) in programs::SOCK_ADDR_PROGRAMS {
            let p: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let id = p.attach(&cgroup, mode).map_err(attach_err(name))?;
            let link = p.take_link(id).map_err(attach_err(name))?;
            links.push((name, FdLink::try_from(link).map_err(fd_err(name))?));
        }
        let name = programs::SOCK_CREATE;
        let p: &mut CgroupSock = program(&mut self.ebpf, name)?;
        let id = p.attach(&cgroup, mode).map_err(attach_err(name))?;
        let link = p.take_link(id).map_err(attach_err(name))?;
        links.push((name, FdLink::try_from(link).map_err(fd_err(name))?));
        let name = programs::INBOUND;
        let p: &mut CgroupSkb = program(&mut self.ebpf, name)?;
        let id = p
            .attach(&cgroup, CgroupSkbAttachType::Ingress, mode)
            .map_err(attach_err(name))?;
        let link = p.take_link(id).map_err(attach_err(name))?;
        links.push((name, FdLink::try_from(link).map_err(fd_err(name))?));
        self.hold_links(h, links)
    }

    /// Keeps `links` of the agent in `h`: held by this process, or pinned (the daemon).
    fn hold_links(
        &self,
        h: &mut AgentHandle,
        links: Vec<(&'static str, FdLink)>,
    ) -> Result<(), BpfError> {
        for (program, link) in links {
            let link = match &self.pin_dir {
                None => HeldLink::Fd(link),
                Some(dir) => {
                    let dir = dir.join(h.cgroup_id.to_string());
                    std::fs::create_dir_all(&dir).map_err(|source| BpfError::Pin {
                        path: dir.clone(),
                        reason: source.to_string(),
                    })?;
                    let path = dir.join(program);
                    HeldLink::Pinned(link.pin(&path).map_err(|e| BpfError::Pin {
                        path,
                        reason: e.to_string(),
                    })?)
                }
            };
            h.links.push(CgroupLink { program, link });
        }
        Ok(())
    }

    /// Forks the reaper now instead of at drop: it holds a reference to every descriptor
    /// open at this point (the tracepoint attachments among them) until this Watch is
    /// dropped *or this process dies*. A daemon killed with SIGKILL then exits at once
    /// (its closes are not the last references), so whatever waits on its descriptors
    /// (its agents' supervisors) hears of it at once, not after seconds of detaching.
    pub fn hold_in_reaper(&mut self) {
        if self.reaper.is_none() {
            self.reaper = spawn_reaper();
        }
    }

    /// Pins the cgroup programs of every agent added from now on under `dir` (on bpffs),
    /// one directory per agent named by its cgroup id: they stay attached if this process
    /// dies, until [`Watch::remove_agent`] or [`unpin_stale`] removes them.
    pub fn pin_links_under(&mut self, dir: &Path) {
        self.pin_dir = Some(dir.to_path_buf());
    }

    /// Stops watching an agent: detaches its network programs, deletes its map entries.
    /// Its last events still decode with its id for a while.
    pub fn remove_agent(&mut self, handle: AgentHandle) -> Result<(), BpfError> {
        let mut first_err: Option<BpfError> = None;
        let mut keep = |r: Result<(), BpfError>| {
            if let Err(e) = r
                && first_err.is_none()
            {
                first_err = Some(e);
            }
        };
        for CgroupLink { program, link } in handle.links {
            // Dropping the link's fd detaches the program.
            match link {
                HeldLink::Fd(link) => drop(link),
                HeldLink::Pinned(link) => {
                    keep(link.unpin().map(drop).map_err(|e| BpfError::Detach {
                        program,
                        target: format!("cgroup {}", handle.cgroup_dir.display()),
                        source: ProgramError::IOError(e),
                    }))
                }
            }
        }
        if let Some(dir) = &self.pin_dir {
            let _ = std::fs::remove_dir(dir.join(handle.cgroup_id.to_string()));
        }
        // Entries that were never written (a failed add_agent) are not errors.
        let absent_ok = |map: &'static str, r: Result<(), MapError>| match r {
            Err(source) if !matches!(source, MapError::KeyNotFound | MapError::ElementNotFound) => {
                Err(BpfError::Map { map, source })
            }
            Ok(()) | Err(_) => Ok(()),
        };
        let was_present = lock(&self.agents).get(&handle.cgroup_id, 0).is_ok();
        self.admissions.forget_agent(handle.cgroup_id);
        keep(
            self.exec_gate
                .clear_agent(handle.cgroup_id)
                .map_err(BpfError::from),
        );
        keep(absent_ok(
            "AGENTS",
            lock(&self.agents).remove(&handle.cgroup_id),
        ));
        for (prefix, key) in &handle.entries.net {
            keep(absent_ok(
                "NET_ALLOW",
                self.net_allow.remove(&Key::new(*prefix, *key)),
            ));
        }
        for key in &handle.entries.bind {
            keep(absent_ok("BIND_ALLOW", self.bind_allow.remove(key)));
        }
        for (key, _) in &handle.entries.canaries {
            keep(absent_ok("CANARIES", self.canaries.remove(key)));
        }
        for (key, _) in &handle.entries.canary_inodes {
            keep(absent_ok("CANARY_INODES", self.canary_inodes.remove(key)));
        }
        for (key, _) in &handle.entries.guarded {
            keep(absent_ok("GUARDED", self.guarded.remove(key)));
        }
        for (key, _) in &handle.entries.guarded_names {
            keep(absent_ok("GUARDED_NAMES", self.guarded_names.remove(key)));
        }
        if was_present && let Some(n) = self.levels.get_mut(&handle.level) {
            *n -= 1;
            if *n == 0 {
                self.levels.remove(&handle.level);
            }
            keep(self.write_levels());
        }
        if let Some((_, removed)) = lock(&self.registry).agents.get_mut(&handle.cgroup_id) {
            *removed = Some(Instant::now());
        }
        keep(self.refresh_gate());
        if self.levels.is_empty() {
            // No agent left: the host's system calls no longer pay for the gate.
            self.gate_detach();
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Sets the agent's kill flag: from now on its cgroup programs refuse everything and
    /// its processes are SIGKILLed at their next covered syscall (the caller writes
    /// `cgroup.kill` first, which kills every process at once where the kernel has it).
    pub fn set_killed(&mut self, cgroup_id: u64) -> Result<(), BpfError> {
        let mut agents = lock(&self.agents);
        let mut state = agents.get(&cgroup_id, 0).map_err(|source| {
            if matches!(source, MapError::KeyNotFound) {
                BpfError::UnknownAgent {
                    agent: lock(&self.registry)
                        .agents
                        .get(&cgroup_id)
                        .map_or_else(String::new, |(a, _)| a.id.clone()),
                    cgroup_id,
                }
            } else {
                BpfError::Map {
                    map: "AGENTS",
                    source,
                }
            }
        })?;
        state.flags |= AGENT_FLAG_KILLED;
        agents
            .insert(cgroup_id, state, 0)
            .map_err(map_err("AGENTS"))?;
        self.config
            .set(CONFIG_KILL_GATE, 1, 0)
            .map_err(map_err("CONFIG"))
    }

    /// Whether the agent's kill flag is set (by the kernel, or [`Watch::set_killed`]).
    pub fn is_killed(&self, cgroup_id: u64) -> Result<bool, BpfError> {
        let state = lock(&self.agents)
            .get(&cgroup_id, 0)
            .map_err(map_err("AGENTS"))?;
        Ok(state.flags & AGENT_FLAG_KILLED != 0)
    }

    /// Attaches the kill gate (agentd-ebpf `gate`) if it is not.
    fn gate_attach(&mut self) -> Result<(), BpfError> {
        if !self.gate_links.is_empty() {
            return Ok(());
        }
        for (name, tp) in programs::GATE_TRACEPOINTS {
            let attached = program::<BtfTracePoint>(&mut self.ebpf, name).and_then(|p| {
                p.attach().map_err(|source| BpfError::Attach {
                    program: name,
                    target: format!("tp_btf {tp}"),
                    source,
                })
            });
            match attached {
                Ok(id) => self.gate_links.push((name, id)),
                Err(e) => {
                    self.gate_detach();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Detaches the kill gate.
    fn gate_detach(&mut self) {
        for (name, id) in std::mem::take(&mut self.gate_links) {
            if let Err(e) = program::<BtfTracePoint>(&mut self.ebpf, name).map(|p| p.detach(id)) {
                tracing::debug!("kill gate {name}: {e}");
            }
        }
    }

    /// Closes the kill gate unless an agent still has its kill flag (see
    /// `CONFIG_KILL_GATE`): cleared first, then set again if the scan finds one, so a
    /// program tripping an agent meanwhile (flag, then gate) cannot be lost.
    fn refresh_gate(&mut self) -> Result<(), BpfError> {
        self.config
            .set(CONFIG_KILL_GATE, 0, 0)
            .map_err(map_err("CONFIG"))?;
        let killed = lock(&self.agents)
            .iter()
            .filter_map(Result::ok)
            .any(|(_, state)| state.flags & AGENT_FLAG_KILLED != 0);
        if killed {
            self.config
                .set(CONFIG_KILL_GATE, 1, 0)
                .map_err(map_err("CONFIG"))?;
        }
        Ok(())
    }

    /// The decoded event stream. Spawns one task (on the current tokio runtime) that
    /// reads the ring buffer and reports lost events each second. Can be taken once; a
    /// second call, or a call outside a runtime, logs the error and returns a closed
    /// channel (see [`Watch::try_events`]).
    pub fn events(&mut self) -> mpsc::Receiver<Event> {
        match self.try_events() {
            Ok(rx) => rx,
            Err(e) => {
                tracing::error!("kernel watch events: {e}");
                mpsc::channel(1).1
            }
        }
    }

    /// [`Watch::events`], with the reason when it cannot start.
    pub fn try_events(&mut self) -> Result<mpsc::Receiver<Event>, BpfError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BpfError::NoRuntime)?;
        let (ring, lost) = self.stream.take().ok_or(BpfError::EventsTaken)?;
        let _guard = runtime.enter();
        // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, until it is
        // dropped, which only happens when the AsyncFd is.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| BpfError::Poll(e.into_parts().1))?;
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        self.shutdown = Some(stop);
        runtime.spawn(pump(
            ring,
            lost,
            Arc::clone(&self.registry),
            self.admissions.clone(),
            tx,
            stopped,
        ));
        Ok(rx)
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .ok_or(BpfError::MissingProgram(name))?
        .try_into()
        .map_err(|_| BpfError::MissingProgram(name))
}

/// The cgroup v2 mount, checked to show the whole hierarchy (its root's cgroup id is 1):
/// agent levels are counted from it.
fn cgroup2_root() -> Result<PathBuf, BpfError> {
    let mounts = crate::host::mounts().map_err(|source| BpfError::Read {
        path: "/proc/self/mountinfo".into(),
        source,
    })?;
    let mount = crate::host::cgroup2_mount(&mounts).ok_or_else(|| BpfError::Cgroup {
        path: "/sys/fs/cgroup".into(),
        reason: "no cgroup v2 hierarchy is mounted".into(),
    })?;
    let mount = mount.canonicalize().map_err(|source| BpfError::Read {
        path: mount.clone(),
        source,
    })?;
    let ino = std::fs::metadata(&mount)
        .map_err(|source| BpfError::Read {
            path: mount.clone(),
            source,
        })?
        .ino();
    if ino != 1 {
        return Err(BpfError::Cgroup {
            path: mount,
            reason: format!(
                "shows a sub-tree of the hierarchy (root inode {ino}, not 1): agentd must run \
                 in the host's cgroup namespace"
            ),
        });
    }
    Ok(mount)
}

/// `CANARY_INODES` entries for an agent's canaries, from their inodes now. A canary that
/// does not exist yet is matched by path string only (and so is one made later, or
/// replaced by another file). One the kernel cannot match by inode (btrfs) is reported.
fn canary_inodes(
    agent_id: &str,
    policy_id: u32,
    canaries: &[PathBuf],
    mountinfo: Option<&str>,
) -> Vec<(CanaryInode, u32)> {
    let mut out = Vec::new();
    for (index, path) in (0u32..).zip(canaries) {
        let md = match std::fs::metadata(path) {
            Ok(md) => md,
            Err(e) => {
                tracing::debug!(
                    agent = agent_id,
                    canary = %path.display(),
                    "canary not matched by inode (stat: {e}): by path only"
                );
                continue;
            }
        };
        let stat = inode_stat(path, &md, index, mountinfo);
        let keys = canary_inode_keys(policy_id, &stat);
        if !inode_matchable(&stat, &keys) {
            tracing::warn!(
                agent = agent_id,
                canary = %path.display(),
                fstype = stat.mount.as_ref().map(|(_, t)| t.as_str()),
                "canary on a filesystem whose inodes the kernel cannot match: it is caught \
                 only when opened by a path that starts with it"
            );
        }
        out.extend(keys);
    }
    out
}

/// `path` as found on disk (`md` is its metadata), for [`canary_inode_keys`], with
/// `index` as the entries' value.
fn inode_stat(
    path: &Path,
    md: &std::fs::Metadata,
    index: u32,
    mountinfo: Option<&str>,
) -> CanaryStat {
    let mount = mount_id(path)
        .zip(mountinfo)
        .and_then(|(id, text)| mountinfo_dev(text, id));
    CanaryStat {
        index,
        st_dev: md.dev(),
        st_ino: md.ino(),
        mount,
    }
}

/// The BPF LSM programs' entries for an agent, from the disk now: in `GUARDED` (bits
/// merged per inode), its write and exec paths (`GUARD_WRITE_ROOT`, `GUARD_EXEC_ROOT`:
/// what may be mapped executable), its protected paths and their ancestors (see
/// [`guard_plan`]); in `GUARDED_NAMES`, the names of missing protected paths
/// (`NAME_FORBID`) and the `network.unix` sockets (`NAME_UNIX_PEER`). Fails, naming the
/// path, when a protected path cannot be protected: it cannot be resolved, or lies on a
/// filesystem whose inodes the kernel cannot match (btrfs). A write or exec path that
/// does not exist has no entry (Landlock has no rule for it either), nor has a unix
/// socket whose directory does not exist (a warning: connecting to it is refused).
fn guard_entries(
    agent_id: &str,
    policy_id: u32,
    policy: &CompiledPolicy,
    mountinfo: &str,
    entries: &mut AgentEntries,
) -> Result<(), String> {
    let mut flags: StdHashMap<CanaryInode, u32> = StdHashMap::new();
    let mut names: StdHashMap<GuardedName, u8> = StdHashMap::new();
    for rule in &policy.landlock.rules {
        let bits = if rule.access.write {
            GUARD_WRITE_ROOT
        } else {
            0
        } | if rule.access.exec { GUARD_EXEC_ROOT } else { 0 };
        if bits == 0 {
            continue;
        }
        let Ok(md) = std::fs::metadata(&rule.path) else {
            continue;
        };
        let stat = inode_stat(&rule.path, &md, bits, Some(mountinfo));
        let keys = canary_inode_keys(policy_id, &stat);
        if !inode_matchable(&stat, &keys) {
            tracing::warn!(
                agent = agent_id,
                path = %rule.path.display(),
                "on a filesystem whose inodes the kernel cannot match: files beneath it \
                 are not recognised as writable or executable when mapped"
            );
        }
        for (k, b) in keys {
            *flags.entry(k).or_default() |= b;
        }
    }
    for path in &policy.protect {
        let mut existing = path.as_path();
        let mut missing = Vec::new();
        let real = loop {
            match std::fs::canonicalize(existing) {
                Ok(real) => break real,
                // ENOTDIR: a file where a directory should be (a git worktree's `.git`).
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        || e.raw_os_error() == Some(libc::ENOTDIR) =>
                {
                    let (Some(name), Some(parent)) = (existing.file_name(), existing.parent())
                    else {
                        return Err(format!("cannot protect {}: {e}", path.display()));
                    };
                    missing.push(name.to_owned());
                    existing = parent;
                }
                Err(e) => {
                    return Err(format!(
                        "cannot protect {}: {}: {e}",
                        path.display(),
                        existing.display()
                    ));
                }
            }
        };
        missing.reverse();
        if !missing.is_empty() && !real.is_dir() {
            // That file is what is protected (as in the agent's view, sandbox::mountns).
            missing.clear();
        }
        let plan = guard_plan(&real, &missing);
        for (p, bits) in plan.inodes {
            let md = std::fs::metadata(&p)
                .map_err(|e| format!("cannot protect {}: {}: {e}", path.display(), p.display()))?;
            let stat = inode_stat(&p, &md, bits, Some(mountinfo));
            let keys = canary_inode_keys(policy_id, &stat);
            if !inode_matchable(&stat, &keys) {
                return Err(format!(
                    "cannot protect {}: {} is on a filesystem ({}) whose inodes the kernel \
                     cannot match",
                    path.display(),
                    p.display(),
                    stat.mount.as_ref().map_or("unknown", |(_, t)| t.as_str())
                ));
            }
            if let Some((dir, n)) = &plan.forbid
                && *dir == p
            {
                for (k, _) in &keys {
                    if let Some(name) = guarded_name(*k, n) {
                        *names.entry(name).or_default() |= NAME_FORBID;
                    }
                }
            }
            for (k, b) in keys {
                *flags.entry(k).or_default() |= b;
            }
        }
    }
    for socket in &policy.network.unix {
        match unix_peer_names(socket, policy, policy_id, mountinfo) {
            Ok(keys) => {
                for key in keys {
                    *names.entry(key).or_default() |= NAME_UNIX_PEER;
                }
            }
            Err(why) => tracing::warn!(
                agent = agent_id,
                socket = %socket.display(),
                "network.unix: {why}; connecting to this socket is refused"
            ),
        }
    }
    entries.guarded = flags.into_iter().collect();
    entries.guarded_names = names.into_iter().collect();
    Ok(())
}

/// The `GUARDED_NAMES` keys of a `network.unix` socket: its name in its directory (see
/// [`unix_peer_dir`]), by each key the kernel may see the directory's inode by.
fn unix_peer_names(
    socket: &Path,
    policy: &CompiledPolicy,
    policy_id: u32,
    mountinfo: &str,
) -> Result<Vec<GuardedName>, String> {
    let dir = unix_peer_dir(socket, policy)?;
    let name = socket
        .file_name()
        .ok_or_else(|| format!("{} names no socket", socket.display()))?;
    let md = std::fs::metadata(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let stat = inode_stat(&dir, &md, 0, Some(mountinfo));
    let keys = canary_inode_keys(policy_id, &stat);
    if !inode_matchable(&stat, &keys) {
        return Err(format!(
            "{} is on a filesystem whose inodes the kernel cannot match",
            dir.display()
        ));
    }
    Ok(keys
        .iter()
        .filter_map(|(k, _)| guarded_name(*k, name.as_encoded_bytes()))
        .collect())
}

/// The directory of a `network.unix` socket as the kernel finds it (its symbolic links
/// resolved), refusing what the agent could have redirected: the socket's own name may
/// not be a symbolic link (the kernel matches the socket a server bound, never a link to
/// it; following one here would let a link planted in the workspace grant
/// `/run/docker.sock`), nor may the path pass through a symbolic link in a directory the
/// agent may write (where it could have made or replaced the link).
fn unix_peer_dir(socket: &Path, policy: &CompiledPolicy) -> Result<PathBuf, String> {
    if std::fs::symlink_metadata(socket).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(format!(
            "{} is a symbolic link, not a socket (list the socket's own path)",
            socket.display()
        ));
    }
    let dir = socket
        .parent()
        .ok_or_else(|| format!("{} has no directory", socket.display()))?;
    for prefix in dir.ancestors() {
        if std::fs::symlink_metadata(prefix).is_ok_and(|m| m.file_type().is_symlink())
            && prefix
                .parent()
                .is_some_and(|parent| policy.fs_allows(parent, |a| a.write))
        {
            return Err(format!(
                "{} is a symbolic link the agent may have made (it may write its directory)",
                prefix.display()
            ));
        }
    }
    std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

/// The mount id of the mount `path` is on (statx `STATX_MNT_ID`, Linux 5.8).
fn mount_id(path: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `stx` a writable statx.
    let rc = unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), 0, libc::STATX_MNT_ID, &mut stx) };
    (rc == 0 && stx.stx_mask & libc::STATX_MNT_ID != 0).then_some(stx.stx_mnt_id)
}

/// Resolves a path argument as the kernel did (see [`crate::bpf::decode::Resolver`]):
/// a relative one through /proc while the process lives (`path` empty: the path of fd
/// `dfd` itself), then its symbolic links, on the host's view of the filesystem (the
/// agent shares it). A link changed since the call is resolved as it is now.
fn proc_resolve(pid: u32, dfd: i32, path: &str, follow: bool) -> Option<PathBuf> {
    let joined = if path.starts_with('/') {
        own_proc(pid, Path::new(path))
    } else {
        let base = if dfd == AT_FDCWD {
            format!("/proc/{pid}/cwd")
        } else {
            format!("/proc/{pid}/fd/{dfd}")
        };
        let dir = std::fs::read_link(base).ok()?;
        if !dir.is_absolute() {
            // "socket:[..]", "pipe:[..]", "anon_inode:..": no path.
            return None;
        }
        if path.is_empty() {
            return Some(dir);
        }
        dir.join(path)
    };
    Some(real_path(&joined, follow))
}

/// Signal targets, through /proc: the pid behind a pidfd (`Pid:` of its fdinfo), and a
/// process's real and saved uids.
const PROC_TARGETS: Targets<'static> = Targets {
    fd_pid: &|pid, fd| {
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("Pid:"))
            .and_then(|v| v.trim().parse().ok())
    },
    creds: &|pid| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let mut ids = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))?
            .split_whitespace()
            .filter_map(|v| v.parse::<u32>().ok());
        let uid = ids.next()?;
        let suid = ids.nth(1)?;
        Some(TargetCreds { uid, suid })
    },
};

/// `path` as process `pid` sees it: `/proc/self` and `/proc/thread-self` name the
/// process that made the call, not agentd (its `exe`, its `fd/N`, its `cwd`). A path under
/// `/proc/thread-self` is taken to be under the process's main thread.
fn own_proc(pid: u32, path: &Path) -> PathBuf {
    let mut parts = path.components();
    let (Some(Component::RootDir), Some(Component::Normal(proc)), Some(Component::Normal(this))) =
        (parts.next(), parts.next(), parts.next())
    else {
        return path.to_path_buf();
    };
    if proc != "proc" {
        return path.to_path_buf();
    }
    let base = if this == "self" {
        PathBuf::from(format!("/proc/{pid}"))
    } else if this == "thread-self" {
        PathBuf::from(format!("/proc/{pid}/task/{pid}"))
    } else {
        return path.to_path_buf();
    };
    base.join(parts.as_path())
}

/// `path` with the symbolic links of its directories resolved (and `..` after them, as
/// the kernel walks), and of its last component when `follow`; lexically where a
/// directory does not exist.
fn real_path(path: &Path, follow: bool) -> PathBuf {
    if follow && let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => match std::fs::canonicalize(dir) {
            Ok(dir) => dir.join(name),
            Err(_) => normalize(path),
        },
        // "/", or a last component of ".." or ".": the whole path is a directory.
        _ => std::fs::canonicalize(path).unwrap_or_else(|_| normalize(path)),
    }
}

fn clock_offset() -> ClockOffset {
    let ns = |id| {
        // SAFETY: timespec is plain data; clock_gettime only writes it.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: `ts` is a valid, writable timespec.
        if unsafe { libc::clock_gettime(id, &mut ts) } != 0 {
            return 0;
        }
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    };
    ClockOffset(ns(libc::CLOCK_REALTIME) - ns(libc::CLOCK_MONOTONIC))
}

/// Records decoded per pass of [`pump`]: between passes it hands the events on and lets the
/// runtime run other tasks (a daemon's requests), however fast agents make events.
const DRAIN_BATCH: usize = 512;

/// Decodes at most [`DRAIN_BATCH`] records into `out`; returns whether the ring is empty.
fn drain(ring: &mut RingBuf<MapData>, registry: &Mutex<Registry>, out: &mut Vec<Event>) -> bool {
    let clock = clock_offset();
    let registry = lock(registry);
    for _ in 0..DRAIN_BATCH {
        let Some(item) = ring.next() else {
            return true;
        };
        if item.len() < size_of::<RawEvent>() {
            tracing::warn!(len = item.len(), "short ring-buffer record ignored");
            continue;
        }
        // SAFETY: the record holds at least size_of::<RawEvent>() bytes written by the
        // BPF programs as a RawEvent; RawEvent is plain data (any bit pattern is valid)
        // and the read is unaligned-safe.
        let raw: RawEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        let agent = registry.agents.get(&raw.agent_cgroup).map(|(a, _)| a);
        match decode(&raw, agent, clock, &proc_resolve, &PROC_TARGETS) {
            Some(e) => out.push(e),
            None if agentd_common::EventKind::from_raw(raw.kind).is_none() => {
                tracing::warn!(kind = raw.kind, "ring-buffer record of unknown kind");
            }
            // A canary candidate that resolved to no canary.
            None => {}
        }
    }
    false
}

/// Lost-event counts that grew since the last report, as `lost` events; forgets the
/// counters of agents no longer known.
fn lost_events(
    lost: &mut PerCpuHashMap<MapData, u64, u64>,
    registry: &Mutex<Registry>,
    reported: &mut StdHashMap<u64, u64>,
    out: &mut Vec<Event>,
) {
    let counts: Vec<(u64, u64)> = lost
        .iter()
        .filter_map(Result::ok)
        .map(|(cg, per_cpu)| (cg, per_cpu.iter().sum()))
        .collect();
    let registry = lock(registry);
    for (cg, total) in counts {
        let before = reported.insert(cg, total).unwrap_or(0);
        if total > before {
            let agent = registry
                .agents
                .get(&cg)
                .map_or_else(|| format!("cgroup:{cg}"), |(a, _)| a.id.clone());
            out.push(
                Event::new(&agent, 0, "", Kind::Lost, Verdict::None, Layer::Bpf)
                    .with("count", total - before),
            );
        }
        if !registry.agents.contains_key(&cg) {
            let _ = lost.remove(&cg);
            reported.remove(&cg);
        }
    }
}

/// The event task: drains the ring buffer when it is readable, reports lost events each
/// second, ends when the receiver is dropped or the Watch is.
async fn pump(
    mut ring: AsyncFd<RingBuf<MapData>>,
    mut lost: PerCpuHashMap<MapData, u64, u64>,
    registry: Arc<Mutex<Registry>>,
    admissions: Admissions,
    tx: mpsc::Sender<Event>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(LOST_POLL);
    let mut reported = StdHashMap::new();
    let mut batch = Vec::new();
    loop {
        let mut stop = false;
        tokio::select! {
            ready = ring.readable_mut() => match ready {
                Ok(mut guard) => {
                    // Not ready again until emptied: a full batch comes back at once.
                    if drain(guard.get_inner_mut(), &registry, &mut batch) {
                        guard.clear_ready();
                    }
                }
                Err(e) => {
                    tracing::error!("kernel watch: ring buffer poll failed: {e}");
                    stop = true;
                }
            },
            _ = tick.tick() => {
                lost_events(&mut lost, &registry, &mut reported, &mut batch);
                lock(&registry).purge(Instant::now());
                admissions.sweep();
            }
            _ = &mut stopped => {
                // The Watch is gone (programs detached): deliver what is left.
                while !drain(ring.get_mut(), &registry, &mut batch) {}
                lost_events(&mut lost, &registry, &mut reported, &mut batch);
                stop = true;
            }
        }
        for mut e in batch.drain(..) {
            name_admitted(&admissions, &mut e);
            if tx.send(e).await.is_err() {
                return;
            }
        }
        if stop {
            return;
        }
    }
}

/// Gives an allowed connect or send the name its address was admitted for, if it was.
fn name_admitted(admissions: &Admissions, e: &mut Event) {
    if !matches!(e.kind, Kind::Connect | Kind::Sendmsg) || e.verdict != Verdict::Allow {
        return;
    }
    let (Some(addr), Some(port)) = (e.addr, e.port) else {
        return;
    };
    let proto = match e.proto.as_deref() {
        Some("udp") => agentd_common::IPPROTO_UDP,
        _ => agentd_common::IPPROTO_TCP,
    };
    e.domain = admissions.domain_of(&e.agent, addr, port, proto);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_peers_are_not_found_through_links_the_agent_could_make() {
        let root = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(root.path()).unwrap();
        let ws = root.join("ws");
        let host = root.join("host");
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::create_dir_all(&host).unwrap();
        let p = crate::profile::parse(
            "t.toml",
            "[agent]\nname = \"t\"\n[filesystem]\nwrite = [\"{workspace}\"]\n",
        )
        .unwrap();
        let policy = crate::profile::compile(
            &p,
            &crate::profile::CompileContext {
                workspace: ws.clone(),
                home: "/nonexistent".into(),
            },
        );
        // A socket in a directory outside the agent's reach (it need not exist yet).
        assert_eq!(unix_peer_dir(&host.join("db.sock"), &policy).unwrap(), host);
        // A host-made link on the way (outside the write trees) is followed.
        std::os::unix::fs::symlink(&host, root.join("run")).unwrap();
        assert_eq!(
            unix_peer_dir(&root.join("run/db.sock"), &policy).unwrap(),
            host
        );
        // The socket's own name a link (to a host socket): refused.
        std::os::unix::fs::symlink(host.join("docker.sock"), ws.join("db.sock")).unwrap();
        let e = unix_peer_dir(&ws.join("db.sock"), &policy).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        // A directory link planted where the agent writes: refused.
        std::os::unix::fs::symlink(&host, ws.join(".dev")).unwrap();
        let e = unix_peer_dir(&ws.join(".dev/db.sock"), &policy).unwrap_err();
        assert!(e.contains(".dev") && e.contains("may write"), "{e}");
        // A real directory in the workspace: its own path.
        std::fs::create_dir(ws.join("sock")).unwrap();
        assert_eq!(
            unix_peer_dir(&ws.join("sock/db.sock"), &policy).unwrap(),
            ws.join("sock")
        );
    }

    #[test]
    fn proc_self_is_the_calling_process() {
        assert_eq!(
            own_proc(42, Path::new("/proc/self/exe")),
            PathBuf::from("/proc/42/exe")
        );
        assert_eq!(
            own_proc(42, Path::new("/proc/self/fd/3")),
            PathBuf::from("/proc/42/fd/3")
        );
        assert_eq!(
            own_proc(42, Path::new("/proc/thread-self/cwd")),
            PathBuf::from("/proc/42/task/42/cwd")
        );
        assert_eq!(
            own_proc(42, Path::new("/proc/self")),
            PathBuf::from("/proc/42")
        );
        for other in ["/proc/7/exe", "/procx/self/exe", "/home/self/exe", "/"] {
            assert_eq!(own_proc(42, Path::new(other)), PathBuf::from(other));
        }
    }

    #[test]
    fn watch_can_be_shared_with_the_breaker_task() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Watch>();
        send_sync::<AgentHandle>();
    }

    #[test]
    fn process_exit_program_follows_the_prototype() {
        // 6.16 and later: (p, group_dead); before: (p).
        assert_eq!(exit_program_for(2), Some("sched_process_exit"));
        assert_eq!(exit_program_for(1), Some("sched_process_exit_leader"));
        assert_eq!(exit_program_for(3), Some("sched_process_exit"));
        assert_eq!(exit_program_for(0), None);
    }

    /// A covered call the kernel does not have is skipped; missing syscall tracepoints
    /// altogether, or half of a call's pair, stay fatal.
    #[test]
    fn only_a_syscall_the_kernel_lacks_is_skipped() {
        let root = std::env::temp_dir().join(format!("agentd-tracefs-{}", std::process::id()));
        let events = root.join("events/syscalls");
        let add = |name: &str| {
            let dir = events.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("format"), "").unwrap();
        };
        std::fs::create_dir_all(&events).unwrap();
        let skip = |has_exit| {
            missing_syscall(&root, "sys_enter_fchmodat2", "sys_exit_fchmodat2", has_exit)
        };
        let e = skip(false).unwrap_err().to_string();
        assert!(e.contains("CONFIG_FTRACE_SYSCALLS"), "{e}");
        add(ANY_SYSCALL_TRACEPOINT);
        assert!(skip(false).is_ok());
        let e = skip(true).unwrap_err().to_string();
        assert!(e.contains("sys_exit_fchmodat2 does"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn canary_inodes_stat_what_exists_in_the_kernel_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let present = dir.path().join("secrets");
        std::fs::create_dir(&present).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&present, &link).unwrap();
        let missing = dir.path().join("nope");
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok();
        let keys = canary_inodes(
            "t",
            7,
            &[missing, present.clone(), link],
            mountinfo.as_deref(),
        );
        let md = std::fs::metadata(&present).unwrap();
        let dev = super::super::encode::kernel_dev_of_st_dev(md.dev()).unwrap();
        // The missing canary is skipped; the symlink is followed to the same inode.
        assert!(!keys.is_empty());
        for (k, index) in &keys {
            assert_eq!((k.ino, k.policy_id), (md.ino(), 7));
            assert!(*index == 1 || *index == 2, "{index}");
        }
        assert!(keys.contains(&(
            CanaryInode {
                ino: md.ino(),
                dev,
                policy_id: 7
            },
            1
        )));
    }

    #[test]
    fn registry_forgets_removed_agents_after_the_grace_period() {
        let policy = crate::profile::compile(
            &crate::profile::parse("t", "[agent]\nname = \"t\"\n")
                .unwrap_or_else(|e| panic!("{e}")),
            &crate::profile::CompileContext {
                workspace: "/w".into(),
                home: "/h".into(),
            },
        );
        let info = |id: &str| AgentInfo::new(id, Arc::new(policy.clone()));
        let now = Instant::now();
        let mut r = Registry::default();
        r.agents.insert(1, (info("live"), None));
        r.agents.insert(2, (info("recent"), Some(now)));
        r.agents
            .insert(3, (info("old"), now.checked_sub(REMOVED_GRACE * 2)));
        r.purge(now);
        let mut left: Vec<_> = r.agents.values().map(|(a, _)| a.id.clone()).collect();
        left.sort();
        assert_eq!(left, ["live", "recent"]);
    }
}
