//! BPF LSM programs: decisions Landlock and the cgroup programs cannot take, loaded where
//! the kernel accepts LSM programs (user space probes by loading them; a kernel may list
//! `bpf` among its LSMs and still refuse them).
//!
//! - A profile's `protect` list: paths inside a writable tree (`.git/hooks`,
//!   `.git/config`) that the agent may not change. Landlock grants a whole tree or
//!   nothing, so these hooks refuse, for agents with `AGENT_FLAG_PROTECT`, every
//!   operation that would change a protected path or anything beneath it: open for
//!   write, create (file, directory, node, symlink, hard link), remove, rename in or out,
//!   chmod, chown, truncate. Protected paths and their ancestors are also pinned: they
//!   cannot be renamed, removed or replaced, so an agent cannot move `.git` away and
//!   rebuild it without the protection. A protected path that did not exist when the
//!   agent started cannot be created (its first missing component cannot be, see
//!   `GUARDED_NAMES`).
//! - exec of a file no path names (a memfd): refused with EACCES before the kernel loads
//!   it, for every agent (without BPF LSM, `proc::sched_process_exec` kills the process
//!   instead);
//! - mapping code the agent could have written: `mmap`/`mprotect` with `PROT_EXEC` of a
//!   file beneath one of its write paths and none of its exec paths, or of a file no path
//!   names, is refused for every agent (`ld.so ./file` runs a file Landlock's `exec`
//!   rules never see executed: the loader maps it). Files the agent cannot write (the
//!   system's libraries) map as before.
//! - unix sockets: a connect (stream, seqpacket, datagram) or datagram send of an agent
//!   reaches a socket its own cgroup created, an unnamed one (a socketpair it was
//!   handed), or a pathname socket its profile lists in `network.unix` (matched by
//!   directory inode and name, so a service that re-creates its socket stays reachable);
//!   any other socket — a host service's (docker.sock, D-Bus, systemd's), another
//!   agent's, an abstract name outside the agent — is refused with EACCES, for every
//!   agent. Landlock below ABI 9 cannot see pathname sockets at all.
//!
//! The `path_*` hooks (CONFIG_SECURITY_PATH) are used rather than the `inode_*` ones:
//! they pass a `struct path`, so the walk up to a protected ancestor can cross mounts.
//! Paths are matched by inode (see `vfs::inode_walk`), so symlinks, `..`, bind mounts and
//! hard links made after the agent started all reach the same decision. A walk that
//! cannot decide (a failed read, deeper than `MAX_WALK_DEPTH`) refuses.
//!
//! Every refusal marks the call's `PENDING` entry (the syscall tracepoints made it) with
//! `Layer::BpfLsm`, so the event the exit program sends says which layer refused.

use agentd_common::{
    AGENT_FLAG_MONITOR, AGENT_FLAG_PROTECT, AGENT_FLAG_TRIP_EXEC, EVENT_FLAG_DIR,
    EVENT_FLAG_MAPPED, EVENT_FLAG_MONITOR, EventKind, GUARD_EXEC_ROOT, GUARD_PIN, GUARD_PROTECT,
    GUARD_WRITE_ROOT, GUARDED_NAME_LEN, GuardedName, Layer, NAME_FORBID, NAME_UNIX_PEER,
    NET_LSM_MONITORED, NET_LSM_REFUSED, RawEvent,
};
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::lsm, programs::LsmContext};

use crate::{
    maps::{
        Act, EVENTS, GUARDED_NAMES, NET_PENDING, PENDING, carry_out, count_lost, current_agent,
        fill_header, trip_bits,
    },
    proc::bprm_file,
    vfs::{self, KPath, UnixName, Walk},
};

const EACCES: i32 = 13;
/// `FMODE_WRITE` in `file->f_mode`.
const FMODE_WRITE: u32 = 0x2;

/// What a hook answers.
enum Verdict {
    Allow,
    Refuse,
}

/// The agent of the current task, when it has a `protect` list: `(policy_id, flags)`.
#[inline(always)]
fn protecting_agent() -> Option<(u32, u32)> {
    let (_, state) = current_agent()?;
    // SAFETY: `state` points into the AGENTS map value for the program's run.
    let state = unsafe { *state };
    (state.flags & AGENT_FLAG_PROTECT != 0).then_some((state.policy_id, state.flags))
}

/// The hook's return value for `v`, marking the call's event. In monitor mode the
/// refusal is recorded and not enforced.
#[inline(always)]
fn answer(v: Verdict, agent_flags: u32) -> i32 {
    if let Verdict::Allow = v {
        return 0;
    }
    let monitor = agent_flags & AGENT_FLAG_MONITOR != 0;
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(ev) = PENDING.get_ptr_mut(&tid) {
        // SAFETY: `ev` points into the PENDING map value; only this thread uses its entry.
        unsafe {
            (*ev).layer = Layer::BpfLsm as u8;
            (*ev).verdict = agentd_common::Verdict::Deny as u8;
            if monitor {
                (*ev).flags |= EVENT_FLAG_MONITOR;
            }
        }
    }
    if monitor { 0 } else { -EACCES }
}

/// Refuses when `p` is protected or the walk cannot tell.
#[inline(always)]
fn beneath_protected(policy_id: u32, p: KPath) -> bool {
    vfs::protect_walk(policy_id, p) != Walk::Miss
}

/// The `GUARDED_NAMES` bits of the name `dentry` in the directory `dir` (a dentry):
/// `None` when the directory cannot be read, 0 when the name is not listed (or is longer
/// than any listed name).
#[inline(always)]
fn name_bits(policy_id: u32, dir: u64, dentry: u64) -> Option<u8> {
    let dir_inode = vfs::dentry_inode(dir)?;
    let key = vfs::inode_key(dir_inode, policy_id)?;
    let mut name = GuardedName {
        dir: key,
        name: [0; GUARDED_NAME_LEN],
    };
    if !vfs::dentry_name(dentry, &mut name.name) {
        return Some(0);
    }
    // SAFETY: the value is copied out at once.
    Some(unsafe { GUARDED_NAMES.get(&name) }.copied().unwrap_or(0))
}

/// Whether the agent may create `dentry` (a new name) in the directory `dir`.
#[inline(always)]
fn may_create(policy_id: u32, dir: KPath, dentry: u64) -> Verdict {
    if beneath_protected(policy_id, dir) {
        return Verdict::Refuse;
    }
    match name_bits(policy_id, dir.dentry(), dentry) {
        Some(bits) if bits & NAME_FORBID == 0 => Verdict::Allow,
        _ => Verdict::Refuse,
    }
}

/// Whether the agent may remove (or rename away, or replace) `dentry` in `dir`.
#[inline(always)]
fn may_remove(policy_id: u32, dir: KPath, dentry: u64) -> Verdict {
    if beneath_protected(policy_id, dir) {
        return Verdict::Refuse;
    }
    match vfs::guard_flags(policy_id, dentry) {
        Some(flags) if flags & (GUARD_PIN | GUARD_PROTECT) != 0 => Verdict::Refuse,
        Some(_) | None => Verdict::Allow,
    }
}

/// Whether the agent may change the file at `p` (its data or attributes).
#[inline(always)]
fn may_change(policy_id: u32, p: Option<KPath>) -> Verdict {
    match p {
        Some(p) if !beneath_protected(policy_id, p) => Verdict::Allow,
        _ => Verdict::Refuse,
    }
}

/// Runs `decide` for an agent with a `protect` list; 0 for anyone else.
#[inline(always)]
fn guard(decide: impl FnOnce(u32) -> Verdict) -> i32 {
    match protecting_agent() {
        Some((policy_id, flags)) => answer(decide(policy_id), flags),
        None => 0,
    }
}

/// `struct path *` argument `n` of the hook.
#[inline(always)]
fn path_arg(ctx: &LsmContext, n: usize) -> Option<KPath> {
    vfs::path_at(ctx.arg::<u64>(n))
}

/// file_open(struct file *file): opens for writing.
#[lsm(hook = "file_open")]
pub fn lsm_file_open(ctx: LsmContext) -> i32 {
    guard(|policy_id| {
        let file: u64 = ctx.arg(0);
        match vfs::file_mode(file) {
            Some(mode) if mode & FMODE_WRITE == 0 => Verdict::Allow,
            Some(_) => may_change(policy_id, vfs::file_path(file)),
            None => Verdict::Refuse,
        }
    })
}

/// path_mknod(const struct path *dir, struct dentry *dentry, umode_t mode, unsigned int
/// dev): also every open with O_CREAT of a name that does not exist.
#[lsm(hook = "path_mknod")]
pub fn lsm_path_mknod(ctx: LsmContext) -> i32 {
    guard(|policy_id| create(&ctx, policy_id))
}

/// path_mkdir(const struct path *dir, struct dentry *dentry, umode_t mode).
#[lsm(hook = "path_mkdir")]
pub fn lsm_path_mkdir(ctx: LsmContext) -> i32 {
    guard(|policy_id| create(&ctx, policy_id))
}

/// path_symlink(const struct path *dir, struct dentry *dentry, const char *old_name).
#[lsm(hook = "path_symlink")]
pub fn lsm_path_symlink(ctx: LsmContext) -> i32 {
    guard(|policy_id| create(&ctx, policy_id))
}

/// The hooks whose arguments start with (dir, new dentry).
#[inline(always)]
fn create(ctx: &LsmContext, policy_id: u32) -> Verdict {
    match path_arg(ctx, 0) {
        Some(dir) => may_create(policy_id, dir, ctx.arg(1)),
        None => Verdict::Refuse,
    }
}

/// path_link(struct dentry *old_dentry, const struct path *new_dir, struct dentry
/// *new_dentry): a new name in a protected directory, or a new name for a protected file
/// (writes through it would change the protected file).
#[lsm(hook = "path_link")]
pub fn lsm_path_link(ctx: LsmContext) -> i32 {
    guard(|policy_id| {
        let Some(new_dir) = path_arg(&ctx, 1) else {
            return Verdict::Refuse;
        };
        // A hard link stays on one mount: the old dentry is reached through new_dir's.
        let old = KPath::new(new_dir.mnt(), ctx.arg(0));
        if beneath_protected(policy_id, old) {
            return Verdict::Refuse;
        }
        may_create(policy_id, new_dir, ctx.arg(2))
    })
}

/// path_unlink(const struct path *dir, struct dentry *dentry).
#[lsm(hook = "path_unlink")]
pub fn lsm_path_unlink(ctx: LsmContext) -> i32 {
    guard(|policy_id| remove(&ctx, policy_id))
}

/// path_rmdir(const struct path *dir, struct dentry *dentry).
#[lsm(hook = "path_rmdir")]
pub fn lsm_path_rmdir(ctx: LsmContext) -> i32 {
    guard(|policy_id| remove(&ctx, policy_id))
}

#[inline(always)]
fn remove(ctx: &LsmContext, policy_id: u32) -> Verdict {
    match path_arg(ctx, 0) {
        Some(dir) => may_remove(policy_id, dir, ctx.arg(1)),
        None => Verdict::Refuse,
    }
}

/// path_rename(const struct path *old_dir, struct dentry *old_dentry, const struct path
/// *new_dir, struct dentry *new_dentry, unsigned int flags): the old name goes away, the
/// new one is created or replaced (with RENAME_EXCHANGE both happen on both sides, which
/// these checks cover too: each side is removed from a directory that must not be
/// protected, and neither entry may be pinned).
#[lsm(hook = "path_rename")]
pub fn lsm_path_rename(ctx: LsmContext) -> i32 {
    guard(|policy_id| {
        let (Some(old_dir), Some(new_dir)) = (path_arg(&ctx, 0), path_arg(&ctx, 2)) else {
            return Verdict::Refuse;
        };
        let new_dentry: u64 = ctx.arg(3);
        if let Verdict::Refuse = may_remove(policy_id, old_dir, ctx.arg(1)) {
            return Verdict::Refuse;
        }
        if let Verdict::Refuse = may_remove(policy_id, new_dir, new_dentry) {
            return Verdict::Refuse;
        }
        may_create(policy_id, new_dir, new_dentry)
    })
}

/// path_truncate(const struct path *path).
#[lsm(hook = "path_truncate")]
pub fn lsm_path_truncate(ctx: LsmContext) -> i32 {
    guard(|policy_id| may_change(policy_id, path_arg(&ctx, 0)))
}

/// path_chmod(const struct path *path, umode_t mode).
#[lsm(hook = "path_chmod")]
pub fn lsm_path_chmod(ctx: LsmContext) -> i32 {
    guard(|policy_id| may_change(policy_id, path_arg(&ctx, 0)))
}

/// path_chown(const struct path *path, kuid_t uid, kgid_t gid).
#[lsm(hook = "path_chown")]
pub fn lsm_path_chown(ctx: LsmContext) -> i32 {
    guard(|policy_id| may_change(policy_id, path_arg(&ctx, 0)))
}

/// bprm_check_security(struct linux_binprm *bprm): an agent's exec of a file no path
/// names (a memfd) is refused before the kernel loads it.
#[lsm(hook = "bprm_check_security")]
pub fn lsm_bprm_check(ctx: LsmContext) -> i32 {
    let Some((_, state)) = current_agent() else {
        return 0;
    };
    // SAFETY: `state` points into the AGENTS map value for the program's run.
    let flags = unsafe { (*state).flags };
    let file = bprm_file(ctx.arg::<u64>(0));
    let verdict = match file.map(vfs::is_pseudo_file) {
        Some(Some(false)) => Verdict::Allow,
        // A pseudo file, or one that cannot be read: refused.
        _ => Verdict::Refuse,
    };
    answer(verdict, flags)
}

/// `PROT_EXEC`.
const PROT_EXEC: u64 = 0x4;

/// mmap_file(struct file *file, unsigned long reqprot, unsigned long prot, unsigned long
/// flags): `prot` is what the mapping gets (`READ_IMPLIES_EXEC` included). An anonymous
/// mapping has no file and is not decided here.
#[lsm(hook = "mmap_file")]
pub fn lsm_mmap_file(ctx: LsmContext) -> i32 {
    let prot: u64 = ctx.arg(2);
    let file: u64 = ctx.arg(0);
    if prot & PROT_EXEC == 0 || file == 0 {
        return 0;
    }
    map_exec(file, 0)
}

/// file_mprotect(struct vm_area_struct *vma, unsigned long reqprot, unsigned long prot):
/// making an existing file mapping executable.
#[lsm(hook = "file_mprotect")]
pub fn lsm_file_mprotect(ctx: LsmContext) -> i32 {
    let prot: u64 = ctx.arg(2);
    if prot & PROT_EXEC == 0 {
        return 0;
    }
    match vfs::vma_file(ctx.arg(0)) {
        Some(file) => map_exec(file, 1),
        None => 0,
    }
}

/// Whether an agent may map `file` executable; `hook` (0 mmap, 1 mprotect) goes into the
/// event of a refusal.
#[inline(always)]
fn map_exec(file: u64, hook: u64) -> i32 {
    let Some((cgroup, state)) = current_agent() else {
        return 0;
    };
    let state_ptr = state;
    // SAFETY: `state` points into the AGENTS map value for the program's run.
    let state = unsafe { *state };
    let path = vfs::file_path(file);
    let verdict = match path.map(|p| (vfs::is_pseudo_path(p), p)) {
        Some((Some(false), p)) => match vfs::guard_bits_walk(state.policy_id, p) {
            Some(bits) if bits & GUARD_WRITE_ROOT == 0 || bits & GUARD_EXEC_ROOT != 0 => {
                Verdict::Allow
            }
            // Beneath a write path and no exec path, or undecided.
            Some(_) | None => Verdict::Refuse,
        },
        // A pseudo file (memfd), or one that cannot be read.
        _ => Verdict::Refuse,
    };
    if let Verdict::Allow = verdict {
        return 0;
    }
    let monitor = state.flags & AGENT_FLAG_MONITOR != 0;
    // A refusal of agentd's own: it trips a breaker that trips on `exec`.
    let act = if !monitor && trip_bits(state.flags) & AGENT_FLAG_TRIP_EXEC != 0 {
        Act::Trip
    } else {
        Act::Nothing
    };
    let sent = report_mapping(cgroup, monitor, path, hook, act);
    carry_out(act, state_ptr, sent);
    if monitor { 0 } else { -EACCES }
}

/// Sends the `exec` event of a refused executable mapping: no syscall tracepoint records
/// mmap or mprotect, so this program reports it itself, with the file's path read from
/// its dentries (`vfs::read_dir`; its scratch buffer is per CPU, and an LSM program can be
/// preempted, so under heavy load a path can come out garbled: the decision is not).
#[inline(always)]
fn report_mapping(cgroup: u64, monitor: bool, path: Option<KPath>, hook: u64, act: Act) -> bool {
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        count_lost(cgroup);
        return false;
    };
    let ev = entry.as_mut_ptr();
    let mut flags = EVENT_FLAG_MAPPED | act.flag();
    if monitor {
        flags |= EVENT_FLAG_MONITOR;
    }
    // SAFETY: `ev` is the reserved ring-buffer record, writable and RawEvent-sized.
    unsafe {
        fill_header(ev, cgroup, EventKind::Exec as u16, flags);
        (*ev).layer = Layer::BpfLsm as u8;
        (*ev).verdict = agentd_common::Verdict::Deny as u8;
        (*ev).ret = -i64::from(EACCES);
        (*ev).aux = hook;
        (*ev).path[0] = 0;
        (*ev).path2[0] = 0;
        if let Some(p) = path
            && vfs::read_dir(p, &mut *ev)
        {
            (*ev).flags |= EVENT_FLAG_DIR;
        }
    }
    entry.submit(0);
    true
}

/// unix_stream_connect(struct sock *sock, struct sock *other, struct sock *newsk): a
/// stream or seqpacket connect to the listening socket `other`.
#[lsm(hook = "unix_stream_connect")]
pub fn lsm_unix_stream_connect(ctx: LsmContext) -> i32 {
    unix_peer(ctx.arg::<u64>(1))
}

/// unix_may_send(struct socket *sock, struct socket *other): a datagram connect, and
/// every datagram sent (to its address or the connected peer).
#[lsm(hook = "unix_may_send")]
pub fn lsm_unix_may_send(ctx: LsmContext) -> i32 {
    let other = vfs::socket_sk(ctx.arg::<u64>(1)).unwrap_or(0);
    unix_peer(other)
}

/// Whether an agent may reach the unix socket `other` (a `struct sock *`; 0 when it could
/// not be read, which refuses).
#[inline(always)]
fn unix_peer(other: u64) -> i32 {
    let Some((cgroup, state)) = current_agent() else {
        return 0;
    };
    // SAFETY: `state` points into the AGENTS map value for the program's run.
    let state = unsafe { *state };
    let verdict = if other == 0 {
        Verdict::Refuse
    } else if vfs::sock_cgroup_id(other) == Some(cgroup) {
        // Its own socket: made by a process in the agent's cgroup (the socket records
        // its creator's own cgroup, not an ancestor; agents live in their cgroup itself
        // and cannot make sub-cgroups, so a socket of theirs is never refused as a
        // stranger's).
        Verdict::Allow
    } else {
        match vfs::unix_name(other) {
            // Handed to it: nothing can address an unnamed socket.
            Some(UnixName::Unnamed) => Verdict::Allow,
            Some(UnixName::Path(dentry)) => {
                match vfs::dentry_parent(dentry)
                    .and_then(|dir| name_bits(state.policy_id, dir, dentry))
                {
                    Some(bits) if bits & NAME_UNIX_PEER != 0 => Verdict::Allow,
                    _ => Verdict::Refuse,
                }
            }
            Some(UnixName::Abstract) | None => Verdict::Refuse,
        }
    };
    if let Verdict::Allow = verdict {
        return 0;
    }
    let monitor = state.flags & AGENT_FLAG_MONITOR != 0;
    // The connect's exit program reports it (a datagram send is not reported).
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(call) = NET_PENDING.get_ptr_mut(&tid) {
        // SAFETY: `call` points into the NET_PENDING map value; only this thread uses it.
        unsafe {
            (*call).lsm = if monitor {
                NET_LSM_MONITORED
            } else {
                NET_LSM_REFUSED
            };
        }
    }
    if monitor { 0 } else { -EACCES }
}
