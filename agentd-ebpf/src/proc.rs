//! The process tree: forks, execs and process exits of agents, from BTF tracepoints
//! (`tp_btf`), which hand over the `task_struct`s; at exec, the gate on memfds and on the
//! programs a person is asked about. Rust BPF has no CO-RE relocations, so the field
//! offsets are globals user space sets from the running kernel's BTF before loading.

use agentd_common::{
    AGENT_FLAG_KILLED, AgentState, EXEC_REFUSED_NOT_APPROVED, EXEC_REFUSED_PSEUDO,
    EXEC_REFUSED_SHIFT, EXEC_REFUSED_SWAPPED, EventKind, ExecKey, Layer, RawEvent, Verdict,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_send_signal},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::maps::{
    ASK_EXEC, EVENTS, EXEC_GRANT, NET_PENDING, PENDING, count_lost, current_agent, fill_header,
};

/// `offsetof(struct task_struct, pid)`, from BTF.
#[unsafe(no_mangle)]
static TASK_PID_OFFSET: u64 = 0;
/// `offsetof(struct task_struct, tgid)`, from BTF.
#[unsafe(no_mangle)]
static TASK_TGID_OFFSET: u64 = 0;
/// `offsetof(struct task_struct, exit_code)`, from BTF.
#[unsafe(no_mangle)]
static TASK_EXIT_CODE_OFFSET: u64 = 0;
/// `offsetof(struct linux_binprm, file)`, from BTF.
#[unsafe(no_mangle)]
static BPRM_FILE_OFFSET: u64 = 0;

const SIGKILL: u32 = 9;

#[inline(always)]
fn global(g: &u64) -> usize {
    // SAFETY: a read of a global in .rodata; volatile so the compiler does not fold the
    // build-time value 0 (user space overrides it at load).
    unsafe { core::ptr::read_volatile(g) as usize }
}

/// `bprm->file` of a `struct linux_binprm *`; `None` when unreadable or NULL.
#[inline(always)]
pub fn bprm_file(bprm: u64) -> Option<u64> {
    // SAFETY: a kernel read that faults safely; `bprm` is a linux_binprm the kernel
    // passed, the offset from this kernel's BTF.
    let file = unsafe {
        bpf_probe_read_kernel(
            (bprm as *const u8)
                .wrapping_add(global(&BPRM_FILE_OFFSET))
                .cast::<u64>(),
        )
    }
    .ok()?;
    (file != 0).then_some(file)
}

#[inline(always)]
fn read_task_i32(task: *const u8, offset: usize) -> Option<i32> {
    // SAFETY: bpf_probe_read_kernel faults safely; `task` is a task_struct the
    // tracepoint passed, `offset` a field offset from this kernel's BTF.
    unsafe { bpf_probe_read_kernel(task.wrapping_add(offset).cast::<i32>()) }.ok()
}

/// TP_PROTO(struct task_struct *parent, struct task_struct *child); runs in the parent.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    try_fork(&ctx);
    0
}

/// TP_PROTO(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm); runs in the
/// task that exec'd, after the new program is loaded and before it runs an instruction.
/// An agent's exec is answered with SIGKILL, delivered before the program starts, and
/// reported as a refused exec (`EXEC_REFUSED_*` says why) when:
/// - the file is one no path names (a memfd: code the agent wrote to memory, which
///   Landlock's `exec` rules cannot see);
/// - a person approved this thread's exec once (`EXEC_GRANT`), and the file loaded is
///   not the one approved (the path was swapped after the approval);
/// - else the profile asks about the file (`ASK_EXEC`, by inode whatever path led to it)
///   and no approval of it is live.
#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> i32 {
    try_exec(&ctx);
    0
}

#[inline(always)]
fn try_exec(ctx: &BtfTracePointContext) {
    let Some((cgroup, state)) = current_agent() else {
        return;
    };
    // SAFETY: `state` points into the AGENTS map value for the program's run.
    let flags = unsafe { (*state).flags };
    if flags & agentd_common::AGENT_FLAG_ARMED == 0 {
        // The agent's first exec: its program runs, the kernel side of its breaker is in
        // force from here (see `maps::trip_bits`).
        // SAFETY: as above; every writer only adds bits.
        unsafe { (*state).flags |= agentd_common::AGENT_FLAG_ARMED };
    }
    // `old_pid` is the global id of the thread that called exec (a thread other than the
    // leader takes the leader's id during the exec): the thread a held exec was of. A
    // once approval is used up by that thread's next exec, whatever it loaded.
    let old_pid: u64 = ctx.arg(1);
    let tid = old_pid as u32;
    // SAFETY: the value is copied out at once.
    let grant = unsafe { EXEC_GRANT.get(&tid) }.copied();
    if grant.is_some() {
        let _ = EXEC_GRANT.remove(&tid);
    }
    let Some(file) = bprm_file(ctx.arg(2)) else {
        return;
    };
    let (reason, dev, ino) = if crate::vfs::is_pseudo_file(file) == Some(true) {
        (EXEC_REFUSED_PSEUDO, 0, 0)
    } else {
        // (0, 0) when unreadable: it matches no approval, and no ask entry.
        let (dev, ino) = crate::vfs::file_dev_ino(file).map_or((0, 0), |(d, i)| (u64::from(d), i));
        match grant {
            // A grant of another agent is a stale one of a reused thread id: not this
            // exec's.
            Some(g) if g.cgroup_id == cgroup => {
                if ino != 0 && g.dev == dev && g.ino == ino {
                    return;
                }
                (EXEC_REFUSED_SWAPPED, dev, ino)
            }
            Some(_) | None => {
                let key = ExecKey {
                    cgroup_id: cgroup,
                    dev,
                    ino,
                };
                // SAFETY: the value is copied out at once.
                let Some(until) = (unsafe { ASK_EXEC.get(&key) }).copied() else {
                    return;
                };
                // SAFETY: the helper has no preconditions.
                if until > unsafe { bpf_ktime_get_ns() } {
                    return;
                }
                (EXEC_REFUSED_NOT_APPROVED, dev, ino)
            }
        }
    };
    refuse_exec(
        cgroup,
        state,
        flags,
        reason << EXEC_REFUSED_SHIFT | dev,
        ino,
    );
}

/// Kills the current process at its exec (unless the agent is in monitor mode) and
/// reports the refusal: `aux` and `ino` as `EXEC_REFUSED_SHIFT` says.
#[inline(always)]
fn refuse_exec(cgroup: u64, state: *mut AgentState, flags: u32, aux: u64, ino: u64) {
    let monitor = flags & agentd_common::AGENT_FLAG_MONITOR != 0;
    // An exec outside the profile, decided here: it trips a breaker that trips on `exec`.
    let tripped =
        !monitor && crate::maps::trip_bits(flags) & agentd_common::AGENT_FLAG_TRIP_EXEC != 0;
    if tripped {
        crate::maps::trip(state);
    }
    if !monitor {
        // SAFETY: the helper has no memory preconditions.
        unsafe { bpf_send_signal(SIGKILL) };
    }
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        count_lost(cgroup);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved ring-buffer record, writable and RawEvent-sized.
    unsafe {
        fill_header(
            ev,
            cgroup,
            EventKind::Exec as u16,
            if monitor {
                agentd_common::EVENT_FLAG_MONITOR
            } else if tripped {
                agentd_common::EVENT_FLAG_TRIPPED
            } else {
                0
            },
        );
        (*ev).layer = Layer::Bpf as u8;
        (*ev).verdict = Verdict::Deny as u8;
        (*ev).aux = aux;
        (*ev).ret = ino as i64;
        (*ev).path[0] = 0;
        (*ev).path2[0] = 0;
    }
    entry.submit(0);
}

/// TP_PROTO(struct task_struct *p, bool group_dead); runs in the exiting task. Kernels
/// from 6.16 pass `group_dead` (the last thread of the process exits).
#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> i32 {
    let group_dead: u64 = ctx.arg(1);
    try_process_exit(&ctx, group_dead & 0xff != 0);
    0
}

/// TP_PROTO(struct task_struct *p): the same tracepoint on kernels before 6.16, which do
/// not pass `group_dead` (the verifier refuses a program reading it). User space loads
/// this variant when the kernel's BTF prototype has one argument. The process's exit is
/// taken to be its thread-group leader's: exact for single-threaded processes and for
/// every exit_group(); a leader that ends before its other threads (pthread_exit in
/// main) is reported then, and an exec from a non-leader thread reports the old leader.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit_leader(ctx: BtfTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    try_process_exit(&ctx, pid_tgid >> 32 == pid_tgid & 0xffff_ffff);
    0
}

#[inline(always)]
fn try_fork(ctx: &BtfTracePointContext) {
    let Some((cgroup, state)) = current_agent() else {
        return;
    };
    // SAFETY: `state` points into the AGENTS map value for the program's run.
    if unsafe { (*state).flags } & AGENT_FLAG_KILLED != 0 {
        // SAFETY: the helper has no memory preconditions.
        unsafe { bpf_send_signal(SIGKILL) };
        return;
    }
    let child: *const u8 = ctx.arg(1);
    let (Some(pid), Some(tgid)) = (
        read_task_i32(child, global(&TASK_PID_OFFSET)),
        read_task_i32(child, global(&TASK_TGID_OFFSET)),
    ) else {
        return;
    };
    if pid != tgid {
        // A new thread, not a new process.
        return;
    }
    emit(cgroup, EventKind::Fork, i64::from(tgid));
}

/// `process_ends`: this thread's exit is its process's (see the two entry points).
#[inline(always)]
fn try_process_exit(ctx: &BtfTracePointContext, process_ends: bool) {
    let Some((cgroup, _)) = current_agent() else {
        return;
    };
    // The thread's in-flight call (if any) never returns.
    let tid = bpf_get_current_pid_tgid() as u32;
    let _ = PENDING.remove(&tid);
    let _ = NET_PENDING.remove(&tid);
    if !process_ends {
        // Not the last thread of the process.
        return;
    }
    let task: *const u8 = ctx.arg(0);
    let code = read_task_i32(task, global(&TASK_EXIT_CODE_OFFSET)).unwrap_or(0);
    emit(cgroup, EventKind::Exit, i64::from(code));
}

#[inline(always)]
fn emit(cgroup: u64, kind: EventKind, ret: i64) {
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        count_lost(cgroup);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved ring-buffer record, writable and RawEvent-sized.
    unsafe {
        fill_header(ev, cgroup, kind as u16, 0);
        (*ev).layer = Layer::Observed as u8;
        (*ev).verdict = Verdict::Allow as u8;
        (*ev).ret = ret;
        (*ev).path[0] = 0;
        (*ev).path2[0] = 0;
    }
    entry.submit(0);
}
