//! Write-side file operations and execs, observed by per-syscall tracepoints (never the
//! host-wide raw_syscalls ones): each `sys_enter_<call>` program (one for the four open
//! calls, `sys_enter_opens`) records the call's arguments in `PENDING` by thread id, the
//! shared `sys_exit` program completes the event with the kernel's verdict (the return
//! value) and sends it. Landlock and seccomp decide;
//! these programs only watch, except that they SIGKILL any process of a killed agent.
//!
//! The same exit program also watches calls at their exit only (`Syscall::exit_only`: the
//! dangerous calls the seccomp filter refuses, and socket/socketpair, which it allows for
//! some families only). Seccomp refuses before the `sys_enter` tracepoints run, so the exit
//! is all there is to see: an agent's call failing with EPERM, EACCES or ENOSYS becomes an
//! `EventKind::Syscall` event, without arguments.
//!
//! Canaries: the entry matches an absolute path against the canary paths as written; the
//! exit of a successful open of an agent with canaries matches the opened file by inode
//! (`vfs::canary_walk`), whatever path led there. A refused open keeps the path-string
//! route (user space resolves a relative or oddly spelt one). For a relative path of an
//! event that is sent, the exit also reads the directory it resolves against
//! (`vfs::read_dir`) into `RawEvent::dir`, so user space can attribute the refusal after
//! the process is gone. Processes outside every agent pay none of this: they return at
//! the agent lookup, as before.
//!
//! Tracepoint records of syscalls are `{ common fields: 8 bytes, int __syscall_nr, pad,
//! unsigned long args[6] }`, so argument `i` is at offset 16 + 8 * i; user space checks
//! every attached tracepoint's format file against this before attaching, and the exit
//! record's `long ret` at offset 16.

use agentd_common::{
    AGENT_FLAG_CANARIES, AGENT_FLAG_KILLED, AGENT_FLAG_TRIP_CANARY, AGENT_FLAG_TRIP_EXEC,
    AGENT_FLAG_TRIP_READ, AGENT_FLAG_TRIP_SOCKET, AGENT_FLAG_TRIP_SYSCALL, AGENT_FLAG_TRIP_WRITE,
    AT_REMOVEDIR, AgentState, CanaryKey, CanaryPath, EVENT_FLAG_CANARY_CANDIDATE,
    EVENT_FLAG_CANARY_SENT, EVENT_FLAG_DIR, EVENT_FLAG_HELD, EVENT_FLAG_MONITOR,
    EVENT_FLAG_NO_ENTER, EVENT_FLAG_PATH_TRUNCATED, EVENT_FLAG_PATH_UNREAD,
    EVENT_FLAG_PATH2_TRUNCATED, EVENT_FLAG_TRIPPED, EVENT_FLAG_WRITE_INTENT, EXEC_ARG_LEN,
    EXEC_ARGS, EventKind, Layer, MAX_CANARIES, PATH_LEN, RawEvent, SYSCALL_EXIT_ONLY, Syscall,
};
use aya_ebpf::{
    EbpfContext as _,
    cty::c_void,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_user,
        bpf_probe_read_user_str_bytes, bpf_send_signal, generated,
    },
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::{
    maps::{
        Act, CANARIES, PENDING, SCRATCH, SOCK_REFUSED, SYSCALLS, carry_out, current_agent,
        fill_header, output, trip_bits,
    },
    vfs::{self, Walk},
};

const SIGKILL: u32 = 9;
const EPERM: i64 = 1;
const EACCES: i64 = 13;
const EXDEV: i64 = 18;
const ENOSYS: i64 = 38;
const AT_FDCWD: i32 = -100;
const O_WRONLY: u64 = 0o1;
const O_RDWR: u64 = 0o2;
const O_CREAT: u64 = 0o100;
const O_TRUNC: u64 = 0o1000;
/// `creat(path, mode)` is `open(path, O_CREAT | O_WRONLY | O_TRUNC, mode)`.
const CREAT_FLAGS: u64 = O_CREAT | O_WRONLY | O_TRUNC;

/// Offset of argument 0 in a `sys_enter_*` record.
const ARGS_OFFSET: usize = 16;
/// Offsets in a `sys_exit_*` record.
const NR_OFFSET: usize = 8;
const RET_OFFSET: usize = 16;

/// Where a call's `aux` value comes from.
#[derive(Clone, Copy)]
enum Aux {
    None,
    /// Argument `i` (flags, mode, length).
    Arg(usize),
    /// chown-like: uid in argument `.0`, gid in `.1`, packed `uid | gid << 32`.
    Owner(usize, usize),
}

/// What `path2` carries.
#[derive(Clone, Copy)]
enum Second {
    None,
    /// A path (or the xattr name) in argument `i`.
    Path(usize),
    /// execve's argv in argument `i`: the first [`EXEC_ARGS`] entries.
    Argv(usize),
}

/// The argument layout of one covered syscall. Programs pass a constant, so after
/// inlining each program keeps only its own reads.
#[derive(Clone, Copy)]
struct Layout {
    sys: Syscall,
    /// Argument holding the directory fd paths are relative to.
    dfd: Option<usize>,
    path: usize,
    second: Second,
    aux: Aux,
}

const fn layout(sys: Syscall, dfd: Option<usize>, path: usize, second: Second, aux: Aux) -> Layout {
    Layout {
        sys,
        dfd,
        path,
        second,
        aux,
    }
}

/// One `sys_enter_<call>` program per covered call but the open calls (see
/// [`sys_enter_opens`]); user space attaches each to the tracepoint of the same name.
macro_rules! enter_programs {
    ($($name:ident => $layout:expr;)*) => {
        $(
            #[tracepoint]
            pub fn $name(ctx: TracePointContext) -> u32 {
                try_enter(&ctx, $layout);
                0
            }
        )*
    };
}

use Aux::{Arg, Owner};
use Second::{Argv, Path};

enter_programs! {
    sys_enter_unlink => layout(Syscall::Unlink, None, 0, Second::None, Aux::None);
    sys_enter_unlinkat => layout(Syscall::Unlinkat, Some(0), 1, Second::None, Arg(2));
    sys_enter_rename => layout(Syscall::Rename, None, 0, Path(1), Aux::None);
    sys_enter_renameat => layout(Syscall::Renameat, Some(0), 1, Path(3), Aux::None);
    sys_enter_renameat2 => layout(Syscall::Renameat2, Some(0), 1, Path(3), Arg(4));
    sys_enter_mkdir => layout(Syscall::Mkdir, None, 0, Second::None, Arg(1));
    sys_enter_mkdirat => layout(Syscall::Mkdirat, Some(0), 1, Second::None, Arg(2));
    sys_enter_rmdir => layout(Syscall::Rmdir, None, 0, Second::None, Aux::None);
    sys_enter_link => layout(Syscall::Link, None, 0, Path(1), Aux::None);
    sys_enter_linkat => layout(Syscall::Linkat, Some(0), 1, Path(3), Arg(4));
    sys_enter_symlink => layout(Syscall::Symlink, None, 0, Path(1), Aux::None);
    // symlinkat(target, newdfd, linkpath): the fd applies to the link created (path2).
    sys_enter_symlinkat => layout(Syscall::Symlinkat, Some(1), 0, Path(2), Aux::None);
    sys_enter_chmod => layout(Syscall::Chmod, None, 0, Second::None, Arg(1));
    sys_enter_fchmodat => layout(Syscall::Fchmodat, Some(0), 1, Second::None, Arg(2));
    sys_enter_fchmodat2 => layout(Syscall::Fchmodat2, Some(0), 1, Second::None, Arg(2));
    sys_enter_chown => layout(Syscall::Chown, None, 0, Second::None, Owner(1, 2));
    sys_enter_fchownat => layout(Syscall::Fchownat, Some(0), 1, Second::None, Owner(2, 3));
    sys_enter_lchown => layout(Syscall::Lchown, None, 0, Second::None, Owner(1, 2));
    sys_enter_truncate => layout(Syscall::Truncate, None, 0, Second::None, Arg(1));
    sys_enter_setxattr => layout(Syscall::Setxattr, None, 0, Path(1), Arg(4));
    sys_enter_lsetxattr => layout(Syscall::Lsetxattr, None, 0, Path(1), Arg(4));
    sys_enter_execve => layout(Syscall::Execve, None, 0, Argv(1), Aux::None);
    sys_enter_execveat => layout(Syscall::Execveat, Some(0), 1, Argv(2), Arg(4));
}

/// The entry of the four open calls, open, openat, openat2 and creat: one program,
/// attached to each one's `sys_enter_*` tracepoint, that tells the call from the record's
/// `__syscall_nr` (through `SYSCALLS`, as [`sys_exit`] does) and takes its arguments where
/// that call has them. One program rather than one per call: the canary match is most of
/// what the verifier checks in each, and it then checks it once.
#[tracepoint]
pub fn sys_enter_opens(ctx: TracePointContext) -> u32 {
    try_enter_open(&ctx);
    0
}

/// The exit of every covered call (one program, attached to each `sys_exit_<call>`, of
/// the file/exec calls and of the calls watched at their exit only).
#[tracepoint]
pub fn sys_exit(ctx: TracePointContext) -> u32 {
    try_exit(&ctx);
    0
}

/// Argument `i` of a `sys_enter_*` record (0 if it cannot be read). Read with the helper,
/// not loaded from the context: the kernel refuses to attach a program to a tracepoint
/// whose record is shorter than the context it loads from, and [`sys_enter_opens`] reads
/// arguments creat's record does not have. The helper zeroes its destination on a
/// fault, so nothing branches on its result: with a branch (`read_at`, whose failure gave
/// 0) the verifier walked all that follows twice, for 0 and for any value.
#[inline(always)]
fn arg(ctx: &TracePointContext, i: usize) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: the helper writes at most 8 bytes, to `v`, and faults safely; the offset is
    // one of the record's arguments (user space checked the format).
    unsafe {
        generated::bpf_probe_read_kernel(
            (&raw mut v).cast(),
            8,
            ctx.as_ptr().cast::<u8>().add(ARGS_OFFSET + 8 * i).cast(),
        )
    };
    v
}

/// The u64 at `ptr` in user memory, 0 where it cannot be read. The helper zeroes its
/// destination on a fault, so nothing branches on its result (see [`arg`]).
#[inline(always)]
fn read_user_u64(ptr: u64) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: the helper writes at most 8 bytes, to `v`, and faults safely on a bad
    // pointer (zeroing `v`).
    unsafe { generated::bpf_probe_read_user((&raw mut v).cast(), 8, ptr as *const c_void) };
    v
}

/// What reading a user string gave.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    Whole,
    /// Filled the buffer: may have been cut.
    Cut,
    /// NULL pointer: nothing to read (an empty string in the event).
    Null,
    /// The read faulted (page not resident, or a bad pointer).
    Failed,
}

/// Reads a NUL-terminated user string into `dst` (empty on failure).
#[inline(always)]
fn read_str(ptr: u64, dst: &mut [u8]) -> Read {
    if ptr == 0 {
        if let Some(b) = dst.first_mut() {
            *b = 0;
        }
        return Read::Null;
    }
    let cap = dst.len();
    // SAFETY: the helper copies at most `dst.len()` bytes from user memory and faults
    // safely on a bad pointer.
    match unsafe { bpf_probe_read_user_str_bytes(ptr as *const u8, dst) } {
        Ok(s) if s.len() + 1 >= cap => Read::Cut,
        Ok(_) => Read::Whole,
        Err(_) => {
            if let Some(b) = dst.first_mut() {
                *b = 0;
            }
            Read::Failed
        }
    }
}

/// The calling task's agent, unless it is none or was killed (then the task is sent
/// SIGKILL: it dies on its way back to user space).
#[inline(always)]
fn entering_agent() -> Option<(u64, AgentState)> {
    let (cgroup, state) = current_agent()?;
    // SAFETY: `state` points into the AGENTS map value for the program's run.
    let state = unsafe { *state };
    if state.flags & AGENT_FLAG_KILLED != 0 {
        // The breaker tripped.
        // SAFETY: the helper has no memory preconditions.
        unsafe { bpf_send_signal(SIGKILL) };
        return None;
    }
    Some((cgroup, state))
}

/// A call's entry as [`record`] keeps it.
#[derive(Clone, Copy)]
struct Entry {
    /// `Syscall` as u8.
    syscall: u8,
    kind: EventKind,
    /// One of the open calls: reported at its exit only when it matters (see `record`).
    open: bool,
    dfd: i32,
    /// The user pointer of the first path.
    path: u64,
    second: Second,
    aux: u64,
}

#[inline(always)]
fn try_enter(ctx: &TracePointContext, l: Layout) {
    let Some((cgroup, state)) = entering_agent() else {
        return;
    };
    let aux = match l.aux {
        Aux::None => 0,
        Aux::Arg(i) => arg(ctx, i),
        Aux::Owner(u, g) => (arg(ctx, u) & 0xffff_ffff) | (arg(ctx, g) << 32),
    };
    let kind = if matches!(l.sys, Syscall::Unlinkat) && aux & AT_REMOVEDIR != 0 {
        EventKind::Rmdir
    } else {
        l.sys.kind()
    };
    let entry = Entry {
        syscall: l.sys as u8,
        kind,
        open: !l.sys.records_every_call(),
        dfd: match l.dfd {
            Some(i) => arg(ctx, i) as i32,
            None => AT_FDCWD,
        },
        path: arg(ctx, l.path),
        second: l.second,
        aux,
    };
    record(ctx, cgroup, state, entry);
}

/// The entry of an open call ([`sys_enter_opens`]).
#[inline(always)]
fn try_enter_open(ctx: &TracePointContext) {
    let Some((cgroup, state)) = entering_agent() else {
        return;
    };
    // SAFETY: `ctx` points to the tracepoint record; `__syscall_nr` is a fixed field of
    // every sys_enter record at this offset (user space checked each format), and the
    // verifier checks the (constant, aligned) context read.
    let nr =
        unsafe { core::ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(NR_OFFSET).cast::<i32>()) };
    let Some(&raw) = SYSCALLS.get(nr as u32) else {
        return;
    };
    let raw = raw as u8;
    // (dfd, path, flags) where each call has them:
    // open(filename, flags, mode), openat(dfd, filename, flags, mode),
    // openat2(dfd, filename, how, usize) with the flags first in `*how`,
    // creat(pathname, mode), which is open with O_CREAT | O_WRONLY | O_TRUNC.
    let (dfd, path, aux) = if raw == Syscall::Openat as u8 {
        (arg(ctx, 0) as i32, arg(ctx, 1), arg(ctx, 2))
    } else if raw == Syscall::Openat2 as u8 {
        (arg(ctx, 0) as i32, arg(ctx, 1), read_user_u64(arg(ctx, 2)))
    } else if raw == Syscall::Open as u8 {
        (AT_FDCWD, arg(ctx, 0), arg(ctx, 1))
    } else if raw == Syscall::Creat as u8 {
        (AT_FDCWD, arg(ctx, 0), CREAT_FLAGS)
    } else {
        // Not an open call: the program is attached to those only.
        return;
    };
    let entry = Entry {
        syscall: raw,
        kind: EventKind::OpenWrite,
        open: true,
        dfd,
        path,
        second: Second::None,
        aux,
    };
    record(ctx, cgroup, state, entry);
}

/// Records a call's entry in `PENDING`, for the exit program to complete.
#[inline(always)]
fn record(ctx: &TracePointContext, cgroup: u64, state: AgentState, e: Entry) {
    let has_canaries = state.flags & AGENT_FLAG_CANARIES != 0;
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: `ev` is this CPU's scratch RawEvent in map memory; nothing else uses it
    // while this program runs (programs do not nest on a CPU for these hooks).
    let ev = unsafe {
        fill_header(ev, cgroup, e.kind as u16, 0);
        &mut *ev
    };
    ev.syscall = e.syscall;
    ev.layer = Layer::Observed as u8;
    ev.aux = e.aux;
    ev.dfd = e.dfd;
    let path_ptr = e.path;
    match read_str(path_ptr, &mut ev.path) {
        Read::Cut => ev.flags |= EVENT_FLAG_PATH_TRUNCATED,
        Read::Failed => {
            // The page holding the name is not resident (a tracepoint cannot fault it in).
            // The kernel copies the name in during the call, so the exit reads it again
            // from the pointer, kept in `dir` until then (`dir` is filled at the exit).
            ev.flags |= EVENT_FLAG_PATH_UNREAD;
            ev.dir[..8].copy_from_slice(&path_ptr.to_le_bytes());
        }
        Read::Whole | Read::Null => {}
    }
    match e.second {
        Second::None => ev.path2[0] = 0,
        Second::Path(i) => {
            if read_str(arg(ctx, i), &mut ev.path2) == Read::Cut {
                ev.flags |= EVENT_FLAG_PATH2_TRUNCATED;
            }
        }
        Second::Argv(i) => read_argv(arg(ctx, i), ev),
    }

    if e.open {
        // Matched before the open's intent is looked at (its flag set only now): the
        // verifier then checks the canary match once, not once per intent (half the
        // instructions it checks in this program).
        let canary = has_canaries && ev.path[0] == b'/' && canary_match(state.policy_id, &ev.path);
        let write_intent = e.aux & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC) != 0;
        if write_intent {
            ev.flags |= EVENT_FLAG_WRITE_INTENT;
        }
        if canary {
            ev.kind = EventKind::Canary as u16;
        } else if !write_intent && has_canaries {
            // A read-only open that did not match as written. Kept until the exit: if
            // it succeeds, the opened file's inode decides; if it is refused with
            // EACCES, user space resolves the path (relative, or spelt with `//`, `.`,
            // `..`) and decides whether it was a canary, else it is a refused read.
            ev.kind = EventKind::Canary as u16;
            ev.flags |= EVENT_FLAG_CANARY_CANDIDATE;
        } else if !write_intent {
            // A read-only open of an agent without canaries: reported if refused.
            ev.kind = EventKind::OpenRead as u16;
        }
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    // On failure (map full of live entries) the exit finds nothing and reports the call
    // without its path: never silent.
    let _ = PENDING.insert(&tid, &*ev, 0);
}

/// Copies argv[0..EXEC_ARGS] into the fixed slots of `path2`.
#[inline(always)]
fn read_argv(argv: u64, ev: &mut RawEvent) {
    let mut done = argv == 0;
    let mut i = 0;
    while i < EXEC_ARGS {
        let slot = &mut ev.path2[i * EXEC_ARG_LEN..(i + 1) * EXEC_ARG_LEN];
        if done {
            slot[0] = 0;
        } else {
            // SAFETY: reads one user pointer of the argv array; faults safely.
            let p =
                unsafe { bpf_probe_read_user((argv + 8 * i as u64) as *const u64) }.unwrap_or(0);
            if p == 0 {
                done = true;
                slot[0] = 0;
            } else if read_str(p, slot) == Read::Cut {
                ev.flags |= EVENT_FLAG_PATH2_TRUNCATED;
            }
        }
        i += 1;
    }
}

/// What [`canary_step`] scans: the path, the agent's policy, and whether a canary matched.
#[repr(C)]
struct CanaryScan {
    path: *const [u8; PATH_LEN],
    policy_id: u32,
    found: u32,
}

/// Whether `path` (absolute) is one of the agent's canaries or beneath one. The canaries
/// are tried in a `bpf_loop`: the verifier checks the callback once, where a loop in the
/// program it walks once per canary (16 times the prefix comparison).
#[inline(always)]
fn canary_match(policy_id: u32, path: &[u8; PATH_LEN]) -> bool {
    let mut scan = CanaryScan {
        path,
        policy_id,
        found: 0,
    };
    // SAFETY: `canary_step` is a static function of the kind the helper calls; `scan`
    // outlives the call.
    unsafe {
        generated::bpf_loop(
            MAX_CANARIES,
            canary_step as *mut c_void,
            (&raw mut scan).cast(),
            0,
        )
    };
    scan.found != 0
}

/// One canary of [`canary_match`]: 1 (stop) when canary `index` is absent (the last one
/// was passed) or matches.
#[inline(never)]
extern "C" fn canary_step(index: u64, scan: *mut c_void) -> i64 {
    // SAFETY: `scan` is the `CanaryScan` `canary_match` passed to bpf_loop.
    let scan = unsafe { &mut *scan.cast::<CanaryScan>() };
    let key = CanaryKey {
        policy_id: scan.policy_id,
        index: index as u32,
    };
    // SAFETY: the value is read, never kept beyond this call.
    let Some(canary) = (unsafe { CANARIES.get(&key) }) else {
        return 1;
    };
    // SAFETY: `path` points to the event's path, in map memory, for the program's run.
    if prefix_match(unsafe { &*scan.path }, canary) {
        scan.found = 1;
        return 1;
    }
    0
}

/// `canary` is a prefix of `path` ending at a component boundary. Compares eight bytes at
/// a time (little-endian words, as `CanaryPath::words` is laid out).
#[inline(always)]
fn prefix_match(path: &[u8; PATH_LEN], canary: &CanaryPath) -> bool {
    let len = canary.len as usize;
    if len == 0 || len >= PATH_LEN {
        return false;
    }
    let word = |i: usize| -> u64 {
        match path.get(8 * i..8 * i + 8) {
            Some(b) => u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            None => 0,
        }
    };
    let full = len / 8;
    let mut i = 0;
    while i < PATH_LEN / 8 {
        if i >= full {
            break;
        }
        if word(i) != canary.words.get(i).copied().unwrap_or(!0) {
            return false;
        }
        i += 1;
    }
    let rem = len % 8;
    if rem != 0 {
        let mask = (1u64 << (8 * rem)) - 1;
        if word(full) & mask != canary.words.get(full).copied().unwrap_or(!0) {
            return false;
        }
    }
    // The byte after the prefix ends the path or starts its next component.
    let next = path.get(len).copied().unwrap_or(1);
    next == 0 || next == b'/'
}

#[inline(always)]
fn try_exit(ctx: &TracePointContext) {
    // Plain loads from the record, no helper call: this runs at every covered exit of
    // every process on the host.
    // SAFETY: `ctx` points to the tracepoint record; `__syscall_nr` and `ret` are fixed
    // fields of every sys_exit record at these offsets (user space checked each format),
    // and the verifier checks the (constant, aligned) context reads.
    let (nr, ret) = unsafe {
        let record = ctx.as_ptr().cast::<u8>();
        (
            core::ptr::read_volatile(record.add(NR_OFFSET).cast::<i32>()),
            core::ptr::read_volatile(record.add(RET_OFFSET).cast::<i64>()),
        )
    };
    // An array lookup, which the verifier inlines: no hashing.
    let Some(&entry) = SYSCALLS.get(nr as u32) else {
        return;
    };
    if entry & SYSCALL_EXIT_ONLY != 0 {
        try_exit_only(entry, ret);
        return;
    }
    let Some((cgroup, state)) = current_agent() else {
        return;
    };
    let Some(sys) = syscall_of(entry as u8) else {
        return;
    };
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(ev) = PENDING.get_ptr_mut(&tid) {
        // SAFETY: `ev` points into the PENDING map value; this thread is the only one
        // that reads or writes its own entry.
        let ev = unsafe { &mut *ev };
        if ev.syscall == sys as u8 {
            let state_ptr = state;
            // SAFETY: `state` points into the AGENTS map value for the program's run.
            let state = unsafe { *state };
            if ev.flags & EVENT_FLAG_PATH_UNREAD != 0 {
                reread_path(ev);
            }
            let walk = if !sys.records_every_call()
                && ret >= 0
                && state.flags & AGENT_FLAG_CANARIES != 0
                && (ev.kind != EventKind::Canary as u16
                    || ev.flags & EVENT_FLAG_CANARY_CANDIDATE != 0)
            {
                // A successful open the path string did not show to be a canary: the file
                // it opened decides, whatever path led there.
                vfs::fd_path(ret, true)
                    .map_or(Walk::Unknown, |p| vfs::canary_walk(state.policy_id, p))
            } else {
                Walk::Miss
            };
            if let Walk::Hit(index) = walk {
                ev.kind = EventKind::Canary as u16;
                ev.flags &= !EVENT_FLAG_CANARY_CANDIDATE;
                ev.canary = index + 1;
            }
            let candidate = ev.flags & EVENT_FLAG_CANARY_CANDIDATE != 0;
            if (candidate && ret != -EACCES && !(ret >= 0 && walk == Walk::Unknown))
                || (ev.kind == EventKind::OpenRead as u16 && ret != -EACCES)
            {
                // An ordinary read-only open. Kept for user space to decide: a refusal
                // (the path string is all there is), and a success the inode walk could
                // not decide (user space resolves the path, or reads it from the new fd).
                let _ = PENDING.remove(&tid);
                return;
            }
            ev.ret = ret;
            if needs_dir(sys, ev) {
                // Read now rather than at the entry: only for events that are sent. The
                // directory is the same (the call is still in flight in this thread).
                let dir = if ev.dfd == AT_FDCWD {
                    vfs::cwd()
                } else {
                    vfs::fd_path(i64::from(ev.dfd), false)
                };
                if dir.is_some_and(|d| vfs::read_dir(d, ev)) {
                    ev.flags |= EVENT_FLAG_DIR;
                }
            }
            if matches!(sys.kind(), EventKind::Exec) && ret == 0 {
                // The new program's name.
                ev.comm = bpf_get_current_comm().unwrap_or(ev.comm);
            }
            let act = file_act(state.flags, ev, ret);
            ev.flags |= act.flag();
            let mut sent = output(ev);
            if ev.kind == EventKind::Canary as u16 && ev.flags & EVENT_FLAG_WRITE_INTENT != 0 {
                // A canary opened for writing is also a write.
                ev.kind = EventKind::OpenWrite as u16;
                ev.flags |= EVENT_FLAG_CANARY_SENT;
                ev.flags &= !(EVENT_FLAG_TRIPPED | EVENT_FLAG_HELD);
                sent = output(ev) && sent;
            }
            let _ = PENDING.remove(&tid);
            carry_out(act, state_ptr, sent);
            return;
        }
        // Left over from a call whose exit was never seen: drop it.
        let _ = PENDING.remove(&tid);
    }
    // No entry for this call. Opens are entered only when worth recording, so nothing is
    // missing. Any other call was refused before its sys_enter tracepoint ran, which is
    // what seccomp does; report failures, and execs (a successful exec from a non-leader
    // thread exits under the leader's thread id).
    if !sys.records_every_call() || (ret >= 0 && !matches!(sys.kind(), EventKind::Exec)) {
        return;
    }
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch RawEvent in map memory.
    let ev = unsafe {
        fill_header(ev, cgroup, sys.kind() as u16, EVENT_FLAG_NO_ENTER);
        &mut *ev
    };
    ev.syscall = sys as u8;
    ev.layer = Layer::Observed as u8;
    ev.ret = ret;
    ev.dfd = AT_FDCWD;
    ev.path[0] = 0;
    ev.path2[0] = 0;
    output(ev);
}

/// Reads the first path again at the call's exit, when the entry could not (see
/// `try_enter`): the kernel has copied the name in by now, so its page is resident.
#[inline(always)]
fn reread_path(ev: &mut RawEvent) {
    let b = &ev.dir;
    let ptr = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    ev.dir[0] = 0;
    match read_str(ptr, &mut ev.path) {
        Read::Whole => ev.flags &= !EVENT_FLAG_PATH_UNREAD,
        Read::Cut => {
            ev.flags &= !EVENT_FLAG_PATH_UNREAD;
            ev.flags |= EVENT_FLAG_PATH_TRUNCATED;
        }
        Read::Null | Read::Failed => {}
    }
}

/// What the exit program does about a file event it sends (see [`Act`]):
/// - a canary the kernel matched (by its path as written, or by the opened file's inode),
///   whatever the verdict: trip, when `canary` is in `trip_on`;
/// - a refusal by agentd's BPF LSM programs: trip, when its kind is in `trip_on`;
/// - a refusal with what Landlock answers (EACCES; EXDEV for rename and link): hold, when
///   its kind (or, for a read-only open that may be a canary, `canary`) is in `trip_on`:
///   the file's permissions answer the same.
#[inline(always)]
fn file_act(flags: u32, ev: &RawEvent, ret: i64) -> Act {
    if flags & AGENT_FLAG_KILLED != 0 || ev.flags & EVENT_FLAG_MONITOR != 0 {
        return Act::Nothing;
    }
    let kind = ev.kind;
    let candidate = ev.flags & EVENT_FLAG_CANARY_CANDIDATE != 0;
    let flags = trip_bits(flags);
    if kind == EventKind::Canary as u16 && !candidate {
        return if flags & AGENT_FLAG_TRIP_CANARY != 0 {
            Act::Trip
        } else {
            Act::Nothing
        };
    }
    if ret >= 0 {
        return Act::Nothing;
    }
    let bit = if kind == EventKind::Exec as u16 {
        AGENT_FLAG_TRIP_EXEC
    } else if kind == EventKind::OpenRead as u16 {
        AGENT_FLAG_TRIP_READ
    } else if candidate {
        AGENT_FLAG_TRIP_READ | AGENT_FLAG_TRIP_CANARY
    } else {
        AGENT_FLAG_TRIP_WRITE
    };
    if flags & bit == 0 {
        return Act::Nothing;
    }
    if ev.layer == Layer::BpfLsm as u8 {
        return Act::Trip;
    }
    let landlock_errno = ret == -EACCES
        || (ret == -EXDEV && (kind == EventKind::Rename as u16 || kind == EventKind::Link as u16));
    if landlock_errno && ev.flags & EVENT_FLAG_NO_ENTER == 0 {
        Act::Hold
    } else {
        Act::Nothing
    }
}

/// `Syscall::from_raw` without its search loop. Each iteration of that loop returns its
/// own constant, and the verifier follows each return through the rest of the program
/// separately: with the dentry walks after it, that is more than the million instructions
/// older verifiers (6.1) check. Here the value stays one bounded scalar.
#[inline(always)]
fn syscall_of(raw: u8) -> Option<Syscall> {
    if raw == 0 || usize::from(raw) > Syscall::ALL.len() {
        return None;
    }
    // SAFETY: `Syscall` is `repr(u8)` and numbered densely from 1 to `Syscall::ALL.len()`
    // (agentd-common asserts it: `syscall_numbering_is_dense_and_fits_the_flag`), so every
    // value in that range is a variant.
    Some(unsafe { core::mem::transmute::<u8, Syscall>(raw) })
}

/// Whether the event has a relative path argument that `dfd` (or the working directory)
/// resolves: the first path, except for symlinks (whose first path is the link's contents
/// and whose `dfd` is the link's); for rename and link, also their second path (both are
/// relative to the working directory).
#[inline(always)]
fn needs_dir(sys: Syscall, ev: &RawEvent) -> bool {
    let relative = |p: &[u8; PATH_LEN]| p[0] != 0 && p[0] != b'/';
    match sys {
        Syscall::Symlink | Syscall::Symlinkat => relative(&ev.path2),
        Syscall::Rename | Syscall::Link => relative(&ev.path) || relative(&ev.path2),
        _ => ev.flags & EVENT_FLAG_PATH_UNREAD == 0 && relative(&ev.path),
    }
}

/// A call watched at its exit only (no entry program): an agent's call that failed with
/// what a seccomp filter answers (EPERM, EACCES, ENOSYS) is reported as
/// [`EventKind::Syscall`]; user space attributes it. Any other result returns before the
/// agent lookup, so a process outside every agent pays at most that one lookup, and only
/// for a failed call.
#[inline(always)]
fn try_exit_only(entry: u32, ret: i64) {
    if ret != -EPERM && ret != -EACCES && ret != -ENOSYS {
        return;
    }
    let Some((cgroup, state)) = current_agent() else {
        return;
    };
    // SAFETY: `state` points into the AGENTS map value for the program's run.
    let flags = unsafe { (*state).flags };
    if flags & AGENT_FLAG_KILLED != 0 {
        // The breaker tripped and the agent is being killed: its refusals are not counted
        // again (and a socket the cgroup program refused as killed was reported there).
        return;
    }
    let Some(sys) = Syscall::from_raw(entry as u8) else {
        return;
    };
    if matches!(sys, Syscall::Socket) {
        let tid = bpf_get_current_pid_tgid() as u32;
        if SOCK_REFUSED.remove(&tid).is_ok() {
            // The sock_create program refused this socket and reported it.
            return;
        }
    }
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch RawEvent in map memory.
    let ev = unsafe {
        fill_header(ev, cgroup, EventKind::Syscall as u16, 0);
        &mut *ev
    };
    ev.syscall = sys as u8;
    ev.layer = Layer::Observed as u8;
    ev.ret = ret;
    ev.dfd = AT_FDCWD;
    ev.path[0] = 0;
    ev.path2[0] = 0;
    // Seccomp's refusal or the kernel's own: user space tells them apart by the policy.
    let trip_bit = if matches!(sys, Syscall::Socket | Syscall::Socketpair) {
        AGENT_FLAG_TRIP_SOCKET
    } else {
        AGENT_FLAG_TRIP_SYSCALL
    };
    let act = if trip_bits(flags) & trip_bit != 0 {
        Act::Hold
    } else {
        Act::Nothing
    };
    ev.flags |= act.flag();
    let sent = output(ev);
    carry_out(act, state, sent);
}
