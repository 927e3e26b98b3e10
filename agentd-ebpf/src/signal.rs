//! Signals an agent was refused: kill(), tkill(), tgkill(), rt_sigqueueinfo(),
//! rt_tgsigqueueinfo() and pidfd_send_signal(). Each entry program records the target and
//! the signal by thread id (`SIG_PENDING`); the shared exit program reports the call when
//! it failed with EPERM: a process outside the agent's Landlock domain (signal scoping,
//! Landlock ABI 6), or one the agent's user may not signal (the permission check). User
//! space tells the two apart by the target's identity.
//!
//! The records are `{ common: 8, int __syscall_nr, pad, unsigned long args[6] }` (user
//! space checks each format against the argument names it expects).

use agentd_common::{EVENT_FLAG_PIDFD, EventKind, Layer};
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
};

use crate::maps::{SCRATCH, current_agent, fill_header, output};

const EPERM: i64 = 1;
const NR_OFFSET: usize = 8;
const ARGS_OFFSET: usize = 16;
const RET_OFFSET: usize = 16;

/// A signal call of an agent in flight, by thread id.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SigCall {
    /// `__syscall_nr` of the entry: the exit of another call never completes it.
    pub nr: i32,
    /// The target: a pid (a thread id for tkill/tgkill), or a pidfd (`pidfd`).
    pub target: i32,
    pub sig: i32,
    pub pidfd: u32,
}

#[map]
static SIG_PENDING: LruHashMap<u32, SigCall> = LruHashMap::with_max_entries(1024, 0);

/// Argument indexes: the target, the signal, and whether the target is a pidfd.
#[derive(Clone, Copy)]
struct Args {
    target: usize,
    sig: usize,
    pidfd: bool,
}

macro_rules! enter_programs {
    ($($name:ident => ($target:expr, $sig:expr, $pidfd:expr);)*) => {
        $(
            #[tracepoint]
            pub fn $name(ctx: TracePointContext) -> u32 {
                try_enter(&ctx, Args { target: $target, sig: $sig, pidfd: $pidfd });
                0
            }
        )*
    };
}

enter_programs! {
    sys_enter_kill => (0, 1, false);
    sys_enter_tkill => (0, 1, false);
    sys_enter_tgkill => (1, 2, false);
    sys_enter_rt_sigqueueinfo => (0, 1, false);
    sys_enter_rt_tgsigqueueinfo => (1, 2, false);
    sys_enter_pidfd_send_signal => (0, 1, true);
}

/// The exit of every signal call.
#[tracepoint]
pub fn sys_exit_signal(ctx: TracePointContext) -> u32 {
    try_exit(&ctx);
    0
}

#[inline(always)]
fn arg(ctx: &TracePointContext, i: usize) -> i64 {
    // SAFETY: reads 8 bytes of the tracepoint record through bpf_probe_read_kernel, at an
    // argument offset user space checked against the format.
    unsafe { ctx.read_at::<i64>(ARGS_OFFSET + 8 * i) }.unwrap_or(0)
}

#[inline(always)]
fn try_enter(ctx: &TracePointContext, a: Args) {
    if current_agent().is_none() {
        return;
    }
    // SAFETY: `__syscall_nr` of the record, a fixed field user space checked.
    let nr = unsafe { ctx.read_at::<i32>(NR_OFFSET) }.unwrap_or(-1);
    let call = SigCall {
        nr,
        target: arg(ctx, a.target) as i32,
        sig: arg(ctx, a.sig) as i32,
        pidfd: u32::from(a.pidfd),
    };
    let tid = bpf_get_current_pid_tgid() as u32;
    let _ = SIG_PENDING.insert(&tid, &call, 0);
}

#[inline(always)]
fn try_exit(ctx: &TracePointContext) {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: the value is copied out before the entry is removed.
    let Some(call) = (unsafe { SIG_PENDING.get(&tid) }).copied() else {
        return;
    };
    let _ = SIG_PENDING.remove(&tid);
    // SAFETY: `ctx` points to the tracepoint record; `__syscall_nr` and `ret` are fixed
    // fields of every sys_exit record at these offsets (user space checked the formats).
    let (nr, ret) = unsafe {
        (
            ctx.read_at::<i32>(NR_OFFSET).unwrap_or(-1),
            ctx.read_at::<i64>(RET_OFFSET).unwrap_or(0),
        )
    };
    if nr != call.nr || ret != -EPERM {
        return;
    }
    let Some((cgroup, _)) = current_agent() else {
        return;
    };
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch RawEvent in map memory.
    let ev = unsafe {
        fill_header(
            ev,
            cgroup,
            EventKind::Signal as u16,
            if call.pidfd != 0 { EVENT_FLAG_PIDFD } else { 0 },
        );
        &mut *ev
    };
    ev.layer = Layer::Observed as u8;
    ev.ret = ret;
    ev.aux = call.sig as u32 as u64;
    ev.dfd = call.target;
    ev.path[0] = 0;
    ev.path2[0] = 0;
    output(ev);
}
