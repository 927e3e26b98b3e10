//! Maps shared by every hook family, the agent lookup every program starts with, and the
//! ring-buffer helpers. User space writes the policy maps (`AGENTS`, `NET_ALLOW`,
//! `BIND_ALLOW`, `CANARIES`, `CANARY_INODES`, `CONFIG`, `SYSCALLS`, `ASK_EXEC`); the
//! programs only read them. `DNS_ALLOW` and `EXEC_GRANT` entries a person approved once
//! are deleted by the program that uses them.

use agentd_common::{
    AGENT_FLAG_ARMED, AGENT_FLAG_KILL_ON_LOSS, AGENT_FLAG_KILLED, AgentState, BindKey,
    CONFIG_CGROUP_LEVELS, CONFIG_KILL_GATE, CONFIG_LEN, CONFIG_LEVEL_MAX, CanaryInode, CanaryKey,
    CanaryPath, DnsClient, DnsKey, DnsOrig, EVENT_FLAG_HELD, EVENT_FLAG_TRIPPED, ExecGrant,
    ExecKey, GuardedName, MAX_CGROUP_LEVEL, NetKey, PATH_LEN, RawEvent, SYSCALL_TABLE_LEN,
};
use aya_ebpf::{
    cty::c_void,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_ktime_get_ns, bpf_send_signal, generated,
    },
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};

use crate::net::NetCall;

/// Agents running at once.
const MAX_AGENTS: u32 = 1024;

/// Per-agent state by the agent's cgroup v2 id.
#[map]
pub static AGENTS: HashMap<u64, AgentState> = HashMap::with_max_entries(MAX_AGENTS, 0);

/// connect/sendmsg allow-list of every agent (the key starts with the policy id).
#[map]
pub static NET_ALLOW: LpmTrie<NetKey, u8> = LpmTrie::with_max_entries(64 * 1024, 0);

/// Addresses agents' resolvers admitted for the names their profiles allow, each the
/// agent's own (the key starts with its cgroup id) -> CLOCK_MONOTONIC ns of its expiry.
/// User space adds them before the answer reaches the agent and reclaims expired ones.
#[map]
pub static DNS_ALLOW: HashMap<DnsKey, u64> =
    HashMap::with_max_entries(MAX_AGENTS * 1024, BPF_F_NO_PREALLOC);

/// Entries are allocated as user space adds them (the map's bound is every agent's cap).
const BPF_F_NO_PREALLOC: u32 = 1;

/// Programs agents' profiles ask a person about (`filesystem.ask_exec`), by agent and
/// inode -> CLOCK_MONOTONIC ns until which they are approved (0: each exec needs its own
/// approval, an `EXEC_GRANT` entry). Written by user space; read at exec.
#[map]
pub static ASK_EXEC: HashMap<ExecKey, u64> = HashMap::with_max_entries(4096, 0);

/// Execs a person approved once, by the id of the thread whose exec was held -> the file
/// approved. Written by user space before the exec continues; deleted by the exec
/// program at that thread's next exec.
#[map]
pub static EXEC_GRANT: HashMap<u32, ExecGrant> = HashMap::with_max_entries(1024, 0);

/// Steered DNS sockets of agents by socket cookie -> the address they sent to, for
/// `recvmsg` to restore as the replies' source. LRU: closed sockets are never removed.
#[map]
pub static DNS_ORIG: LruHashMap<u64, DnsOrig> = LruHashMap::with_max_entries(16 * 1024, 0);

/// Sockets of agents that sent to their resolver, by `agentd_common::dns_client_key`:
/// the resolver serves a query only when the socket it came from is its agent's (any
/// other local process could send to its port). LRU: written per packet, never removed.
#[map]
pub static DNS_CLIENTS: LruHashMap<u32, DnsClient> = LruHashMap::with_max_entries(16 * 1024, 0);

/// Ports agents may bind.
#[map]
pub static BIND_ALLOW: HashMap<BindKey, u8> = HashMap::with_max_entries(16 * 1024, 0);

/// Canary paths of every agent.
#[map]
pub static CANARIES: HashMap<CanaryKey, CanaryPath> =
    HashMap::with_max_entries(MAX_AGENTS * agentd_common::MAX_CANARIES, 0);

/// Canary inodes of every agent -> the canary's `CanaryKey::index`. Up to two keys per
/// canary (see `agentd bpf::encode::canary_inode_keys`).
#[map]
pub static CANARY_INODES: HashMap<CanaryInode, u32> =
    HashMap::with_max_entries(2 * MAX_AGENTS * agentd_common::MAX_CANARIES, 0);

/// Protected paths of every agent and their ancestors, keyed like `CANARY_INODES`, ->
/// `GUARD_*` bits (see `agentd bpf::encode::guard_entries`). Read by the BPF LSM programs.
#[map]
pub static GUARDED: HashMap<CanaryInode, u32> = HashMap::with_max_entries(64 * 1024, 0);

/// Names in directories, with `NAME_*` bits: protected paths that did not exist when
/// their agent was added ((deepest existing ancestor, first missing name), a name the
/// agent may not create there), and the unix sockets of `network.unix`. Up to two keys
/// per entry, as for `CANARY_INODES`.
#[map]
pub static GUARDED_NAMES: HashMap<GuardedName, u8> = HashMap::with_max_entries(
    2 * MAX_AGENTS * (agentd_common::MAX_PROTECT + agentd_common::MAX_UNIX_PEERS),
    0,
);

/// Global settings, indexed by `CONFIG_*`.
#[map]
pub static CONFIG: Array<u64> = Array::with_max_entries(CONFIG_LEN, 0);

/// Architecture syscall number -> `agentd_common::Syscall` as u32 (0 = not covered), with
/// `SYSCALL_EXIT_ONLY` set for the calls watched at their exit only.
#[map]
pub static SYSCALLS: Array<u32> = Array::with_max_entries(SYSCALL_TABLE_LEN, 0);

/// Calls in flight: the entry program's event by thread id, completed by the exit program
/// with the return value. LRU so a thread that dies inside a call cannot leak its slot.
#[map]
pub static PENDING: LruHashMap<u32, RawEvent> = LruHashMap::with_max_entries(4096, 0);

/// Threads whose socket() the `sock_create` program just refused, and reported: the exit
/// program does not report the same refusal again. LRU: a marker never consumed (the exit
/// tracepoint missing) cannot fill the map.
#[map]
pub static SOCK_REFUSED: LruHashMap<u32, u8> = LruHashMap::with_max_entries(1024, 0);

/// connect() and bind() calls of agents in flight: the sockaddr their entry program read,
/// by thread id, for their exit program (see `net::NetCall`). LRU, like `PENDING`.
#[map]
pub static NET_PENDING: LruHashMap<u32, NetCall> = LruHashMap::with_max_entries(4096, 0);

/// Per-CPU scratch space: a `RawEvent` is larger than the 512-byte BPF stack.
#[map]
pub static SCRATCH: PerCpuArray<RawEvent> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space where `vfs::read_dir` assembles a directory's components: twice
/// `PATH_LEN`, so a whole component written at any offset below `PATH_LEN` fits, then the
/// bytes written so far as a u64 (see `vfs::read_dir` for why it lives here).
#[map]
pub static NAMES: PerCpuArray<[u8; NAMES_LEN]> = PerCpuArray::with_max_entries(1, 0);

/// Size of a `NAMES` entry.
pub const NAMES_LEN: usize = 2 * PATH_LEN + 8;

/// Every decision and observation, one `RawEvent` per record. 4 MiB holds about 4 800
/// events: a burst of that many between two reads of user space is lost and counted.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// Events that did not fit in `EVENTS`, by agent cgroup id, per CPU (so counting needs no
/// atomics, which the BPF target lacks). User space sums, reports and resets.
#[map]
pub static LOST: PerCpuHashMap<u64, u64> = PerCpuHashMap::with_max_entries(MAX_AGENTS, 0);

/// The agent the current task belongs to: the first ancestor of its cgroup (at a level
/// where some agent's cgroup sits, normally exactly one) that is in `AGENTS`. For any
/// other task on the host this is one inlined array read, one helper call and one hash
/// lookup that misses.
///
/// The levels are scanned in a `bpf_loop` ([`agent_level`]): every program starts here,
/// and the verifier checks the callback once where it walks a loop's 32 iterations one by
/// one (most of what it checks in a small program). The kernel inlines the loop.
#[inline(always)]
pub fn current_agent() -> Option<(u64, *mut AgentState)> {
    let levels = *CONFIG.get(CONFIG_CGROUP_LEVELS)?;
    if levels == 0 {
        return None;
    }
    let max = *CONFIG.get(CONFIG_LEVEL_MAX)?;
    let mut scan = LevelScan {
        levels,
        max,
        found: 0,
    };
    // SAFETY: `agent_level` is a static function of the kind the helper calls; `scan`
    // outlives the call.
    unsafe {
        generated::bpf_loop(
            MAX_CGROUP_LEVEL + 1,
            agent_level as *mut c_void,
            (&raw mut scan).cast(),
            0,
        )
    };
    if scan.found == 0 {
        return None;
    }
    // Looked up again for the pointer: the callback hands back plain values only.
    let state = AGENTS.get_ptr_mut(&scan.found)?;
    Some((scan.found, state))
}

/// What [`agent_level`] scans: `CONFIG_CGROUP_LEVELS` and `CONFIG_LEVEL_MAX`, and the id
/// of the agent's cgroup once found (0 until then).
#[repr(C)]
struct LevelScan {
    levels: u64,
    max: u64,
    found: u64,
}

/// One level of [`current_agent`]'s scan: 1 (stop) past the highest level or at the
/// agent's cgroup.
#[inline(never)]
extern "C" fn agent_level(level: u64, scan: *mut c_void) -> i64 {
    // SAFETY: `scan` is the `LevelScan` `current_agent` passed to bpf_loop.
    let scan = unsafe { &mut *scan.cast::<LevelScan>() };
    // The second bound never stops the scan (the loop runs MAX_CGROUP_LEVEL + 1 times):
    // it keeps the shift below in range for the compiler and the verifier.
    if level > scan.max || level > u64::from(MAX_CGROUP_LEVEL) {
        return 1;
    }
    if scan.levels & (1u64 << level) == 0 {
        return 0;
    }
    // SAFETY: the helper has no preconditions; it returns 0 when the task's cgroup is
    // shallower than `level`.
    let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
    // SAFETY: the value is not read.
    if id != 0 && unsafe { AGENTS.get(&id) }.is_some() {
        scan.found = id;
        return 1;
    }
    0
}

/// The agent whose cgroup is the ancestor `ancestor(level)` returns (0: none at that
/// level), scanning the levels where agents live.
#[inline(always)]
pub fn agent_by_ancestor(ancestor: impl Fn(i32) -> u64) -> Option<(u64, *mut AgentState)> {
    let levels = *CONFIG.get(CONFIG_CGROUP_LEVELS)?;
    if levels == 0 {
        return None;
    }
    let max = *CONFIG.get(CONFIG_LEVEL_MAX)?;
    // The scan starts at the constant 0, not at CONFIG_LEVEL_MIN (the mask has no bit
    // below it anyway): with a start loaded from a map, the verifier of older kernels
    // (6.1) loses the bound of `level + 1` and fails every program ("the sequence of 8193
    // jumps is too complex"). From a constant it walks at most 32 known iterations.
    let mut level: u32 = 0;
    while level <= MAX_CGROUP_LEVEL {
        if u64::from(level) > max {
            break;
        }
        if levels & (1u64 << level) != 0 {
            let id = ancestor(level as i32);
            if id != 0
                && let Some(state) = AGENTS.get_ptr_mut(&id)
            {
                return Some((id, state));
            }
        }
        level += 1;
    }
    None
}

/// Trips the agent's breaker in the kernel, from the program that saw the violation: sets
/// its kill flag (from then on its cgroup programs refuse everything, and `gate` SIGKILLs
/// each of its processes at its next system call's entry, and at the exit of the one it is
/// in), then opens the gate. The caller sends SIGKILL to the violating process where its
/// hook allows (tracepoints, LSM); elsewhere (cgroup programs) the gate does it at the
/// call's exit. User space writes `cgroup.kill` when it reads the event.
#[inline(always)]
pub fn trip(state: *mut AgentState) {
    // SAFETY: `state` points into the AGENTS map value for the program's run. Every writer
    // only ever adds this bit, so a concurrent update cannot lose it.
    unsafe { (*state).flags |= AGENT_FLAG_KILLED };
    if let Some(gate) = CONFIG.get_ptr_mut(CONFIG_KILL_GATE) {
        // SAFETY: `gate` points into the CONFIG array; a u64 store.
        unsafe { *gate = 1 };
    }
}

/// What a program does, before the call returns to user space, about a refusal it reports.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Nothing,
    /// Trip the breaker ([`trip`]) and kill the calling process: the refusal is of a kind
    /// in the profile's `trip_on`, and agentd's own programs decided it (or it is a canary,
    /// a violation whatever the verdict).
    Trip,
    /// Stop the calling process (SIGSTOP): the refusal is of a kind in `trip_on`, but only
    /// user space can tell whether a policy layer refused it (Landlock, seccomp) or the
    /// file's permissions. User space then kills the agent or resumes the process.
    Hold,
}

impl Act {
    /// The event flag that tells user space what was done.
    #[inline(always)]
    pub fn flag(self) -> u16 {
        match self {
            Act::Nothing => 0,
            Act::Trip => EVENT_FLAG_TRIPPED,
            Act::Hold => EVENT_FLAG_HELD,
        }
    }
}

/// Carries out `act` on the current process, whose event was sent (`sent`) or lost. A
/// hold whose event was lost would never be released: it trips instead (fail closed). For
/// tracepoint and LSM programs only (cgroup programs may not send signals).
#[inline(always)]
pub fn carry_out(act: Act, state: *mut AgentState, sent: bool) {
    match act {
        Act::Nothing => {}
        // SAFETY: the helper has no memory preconditions; it signals the current process.
        Act::Hold if sent => unsafe {
            bpf_send_signal(SIGSTOP);
        },
        Act::Trip | Act::Hold => {
            trip(state);
            // SAFETY: as above.
            unsafe { bpf_send_signal(SIGKILL) };
        }
    }
}

const SIGKILL: u32 = 9;
const SIGSTOP: u32 = 19;

/// The `AGENT_FLAG_TRIP_*` bits of `flags` that are in force: none until the agent's
/// first exec ([`AGENT_FLAG_ARMED`]).
#[inline(always)]
pub fn trip_bits(flags: u32) -> u32 {
    if flags & AGENT_FLAG_ARMED != 0 {
        flags
    } else {
        0
    }
}

/// Whether the kill gate is open (some agent may have its kill flag set): one array
/// read, which the verifier inlines.
#[inline(always)]
pub fn gate_open() -> bool {
    CONFIG.get(CONFIG_KILL_GATE).is_some_and(|g| *g != 0)
}

/// Counts an event the ring buffer had no room for, against its agent; trips the agent
/// whose profile says `on_event_loss = "kill"` ([`AGENT_FLAG_KILL_ON_LOSS`]): the kill gate
/// then stops each of its processes at its next system call, so nothing more it does goes
/// unreported. User space reports the count (and records the trip) when it reads `LOST`.
#[inline(always)]
pub fn count_lost(cgroup: u64) {
    match LOST.get_ptr_mut(&cgroup) {
        // SAFETY: `n` points into this CPU's copy of the map value; programs on one CPU
        // do not run concurrently, so a plain add is exact.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = LOST.insert(&cgroup, &1, 0);
        }
    }
    if let Some(state) = AGENTS.get_ptr_mut(&cgroup)
        // SAFETY: `state` points into the AGENTS map value for the program's run.
        && unsafe { (*state).flags } & AGENT_FLAG_KILL_ON_LOSS != 0
    {
        trip(state);
    }
}

/// Fills the fields every event has. `ev` points to a `RawEvent` in map or ring-buffer
/// memory; the paths are left for the caller (at least their first byte must be set).
///
/// # Safety
/// `ev` must be valid for writes of a whole `RawEvent`.
#[inline(always)]
pub unsafe fn fill_header(ev: *mut RawEvent, cgroup: u64, kind: u16, flags: u16) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: the caller's guarantee; every field is plain data. The helpers have no
    // preconditions.
    unsafe {
        fill_header_without_task(ev, cgroup, kind, flags);
        (*ev).pid = (pid_tgid >> 32) as u32;
        (*ev).tid = pid_tgid as u32;
        (*ev).comm = bpf_get_current_comm().unwrap_or([0; agentd_common::COMM_LEN]);
    }
}

/// [`fill_header`] for programs that run outside any task's context (the receive path of
/// a cgroup_skb program) and may not call the current-task helpers (6.1 refuses them
/// there): pid, tid and comm are 0.
///
/// # Safety
/// `ev` must be valid for writes of a whole `RawEvent`.
#[inline(always)]
pub unsafe fn fill_header_without_task(ev: *mut RawEvent, cgroup: u64, kind: u16, flags: u16) {
    // SAFETY: the caller guarantees `ev` is writable; every field is plain data. The
    // helper has no preconditions.
    unsafe {
        (*ev).ktime_ns = bpf_ktime_get_ns();
        (*ev).agent_cgroup = cgroup;
        (*ev).ret = 0;
        (*ev).aux = 0;
        (*ev).pid = 0;
        (*ev).tid = 0;
        (*ev).kind = kind;
        (*ev).flags = flags;
        (*ev).layer = 0;
        (*ev).verdict = 0;
        (*ev).proto = 0;
        (*ev).syscall = 0;
        (*ev).addr = [0; 16];
        (*ev).port = 0;
        (*ev).family = 0;
        (*ev).dfd = 0;
        (*ev).canary = 0;
        (*ev).dir_parts = 0;
        (*ev).dir[0] = 0;
        (*ev).comm = [0; agentd_common::COMM_LEN];
    }
}

/// Sends a finished event (in map memory) to user space, counting it as lost if the ring
/// buffer is full. Returns whether it was sent.
#[inline(always)]
pub fn output(ev: &RawEvent) -> bool {
    if EVENTS.output::<RawEvent>(ev, 0).is_err() {
        count_lost(ev.agent_cgroup);
        return false;
    }
    true
}
