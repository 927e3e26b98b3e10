//! Reading the current task's files, working directory and dentries: what the file
//! programs need to match an opened file against the canaries by inode, and to capture the
//! directory a relative path is resolved against while the call is in flight.
//!
//! Tracepoints cannot call `bpf_d_path`, so both walk the dentry tree themselves with
//! `bpf_probe_read_kernel` (faults are safe and reported as `None`), at most
//! `MAX_WALK_DEPTH` levels. Rust BPF has no CO-RE relocations: every struct offset is a
//! global user space sets from the running kernel's BTF before loading (`agentd
//! bpf::watch::vfs_offsets`); nothing here assumes a layout.
//!
//! Each probe read costs about 50 ns here (a helper call with fault handling), far more
//! than the bytes it copies, so fields that sit close together are read at once: a
//! "window" of `WINDOW_WORDS` words at an offset user space chose, each field then taken
//! from its word (`*_WORD`), or read on its own where the layout put it outside
//! (`*_WORD` >= `WINDOW_WORDS`). Reads race with the process's
//! other threads (a close or dup2 of the fd, a chdir through a shared `fs_struct`) exactly
//! as any tracer's do: the result is the state at the moment of the read.

use agentd_common::{
    CanaryInode, GUARD_PROTECT, GUARDED_NAME_LEN, MAX_WALK_DEPTH, PATH_LEN, RawEvent,
};
use aya_ebpf::helpers::{
    bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_kernel_buf,
    generated::bpf_probe_read_kernel_str,
};

use crate::maps::{CANARY_INODES, GUARDED, NAMES};

macro_rules! offsets {
    ($($name:ident: $what:literal;)*) => {
        $(
            #[doc = concat!("`offsetof(", $what, ")`, from BTF.")]
            #[unsafe(no_mangle)]
            static $name: u64 = 0;
        )*
    };
}

offsets! {
    TASK_FILES_OFFSET: "struct task_struct, files";
    TASK_FS_OFFSET: "struct task_struct, fs";
    FILES_FDT_OFFSET: "struct files_struct, fdt";
    FDT_MAX_FDS_OFFSET: "struct fdtable, max_fds";
    FDT_FD_OFFSET: "struct fdtable, fd";
    FILE_F_PATH_OFFSET: "struct file, f_path";
    FILE_F_MODE_OFFSET: "struct file, f_mode";
    FILE_F_INODE_OFFSET: "struct file, f_inode";
    VMA_VM_FILE_OFFSET: "struct vm_area_struct, vm_file";
    FS_ROOT_OFFSET: "struct fs_struct, root";
    FS_PWD_OFFSET: "struct fs_struct, pwd";
    PATH_MNT_OFFSET: "struct path, mnt";
    PATH_DENTRY_OFFSET: "struct path, dentry";
    DENTRY_D_PARENT_OFFSET: "struct dentry, d_parent";
    DENTRY_D_NAME_OFFSET: "struct dentry, d_name";
    DENTRY_D_INODE_OFFSET: "struct dentry, d_inode";
    QSTR_NAME_OFFSET: "struct qstr, name";
    INODE_I_INO_OFFSET: "struct inode, i_ino";
    INODE_I_SB_OFFSET: "struct inode, i_sb";
    SB_S_DEV_OFFSET: "struct super_block, s_dev";
    MOUNT_MNT_OFFSET: "struct mount, mnt";
    MOUNT_MNT_PARENT_OFFSET: "struct mount, mnt_parent";
    MOUNT_MNT_MOUNTPOINT_OFFSET: "struct mount, mnt_mountpoint";
    VFSMOUNT_MNT_ROOT_OFFSET: "struct vfsmount, mnt_root";
    SOCKET_SK_OFFSET: "struct socket, sk";
    SOCK_SK_CGRP_DATA_OFFSET: "struct sock, sk_cgrp_data";
    SOCK_CGROUP_DATA_CGROUP_OFFSET: "struct sock_cgroup_data, cgroup";
    CGROUP_KN_OFFSET: "struct cgroup, kn";
    KERNFS_NODE_ID_OFFSET: "struct kernfs_node, id";
    UNIX_SOCK_ADDR_OFFSET: "struct unix_sock, addr";
    UNIX_SOCK_PATH_OFFSET: "struct unix_sock, path";
}

macro_rules! windows {
    ($($name:ident: $what:literal;)*) => {
        $(
            #[doc = $what]
            #[unsafe(no_mangle)]
            static $name: u64 = 0;
        )*
    };
}

windows! {
    PATH_WINDOW: "Window offset in `struct path` for `mnt` and `dentry`.";
    PATH_MNT_WORD: "Word of `path.mnt` in its window.";
    PATH_DENTRY_WORD: "Word of `path.dentry` in its window.";
    DENTRY_WINDOW: "Window offset in `struct dentry` for `d_parent`, `d_inode`, `d_name.name`.";
    DENTRY_PARENT_WORD: "Word of `dentry.d_parent` in its window.";
    DENTRY_INODE_WORD: "Word of `dentry.d_inode` in its window.";
    DENTRY_NAME_WORD: "Word of `dentry.d_name.name` in its window.";
    INODE_WINDOW: "Window offset in `struct inode` for `i_ino` and `i_sb`.";
    INODE_INO_WORD: "Word of `inode.i_ino` in its window.";
    INODE_SB_WORD: "Word of `inode.i_sb` in its window.";
}

/// Words read at once (see the module documentation); `agentd_common::WINDOW_WORDS`.
const WINDOW_WORDS: usize = agentd_common::WINDOW_WORDS;

/// One read of the window at `base + off(window)`.
#[inline(always)]
fn window(base: u64, window: &u64) -> Option<[u64; WINDOW_WORDS]> {
    // SAFETY: bpf_probe_read_kernel faults safely on any address.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off(window)) as *const [u64; WINDOW_WORDS]) }
        .ok()
}

/// A field from its window `w` when it is in it, else read on its own at `base +
/// off(offset)`; `None` if 0 (a NULL pointer, or inode number 0, which no inode has).
#[inline(always)]
fn field(base: u64, w: &[u64; WINDOW_WORDS], word: &u64, offset: &u64) -> Option<u64> {
    let v = match w.get(off(word) as usize) {
        Some(&v) => v,
        None => return ptr_at(base, off(offset)),
    };
    (v != 0).then_some(v)
}

#[inline(always)]
fn off(g: &u64) -> u64 {
    // SAFETY: a read of a global in .rodata; volatile so the compiler does not fold the
    // build-time value 0 (user space overrides it at load).
    unsafe { core::ptr::read_volatile(g) }
}

/// The kernel pointer at `base + offset`; `None` if the read faults or the pointer is NULL.
#[inline(always)]
fn ptr_at(base: u64, offset: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_kernel faults safely on any address.
    let p = unsafe { bpf_probe_read_kernel(base.wrapping_add(offset) as *const u64) }.ok()?;
    (p != 0).then_some(p)
}

/// A `struct path`: the `struct vfsmount *` and the `struct dentry *`.
#[derive(Clone, Copy)]
pub struct KPath {
    mnt: u64,
    dentry: u64,
}

impl KPath {
    /// `dentry` reached through the mount `mnt` (a `struct vfsmount *`).
    #[inline(always)]
    pub fn new(mnt: u64, dentry: u64) -> KPath {
        KPath { mnt, dentry }
    }

    pub fn mnt(&self) -> u64 {
        self.mnt
    }

    pub fn dentry(&self) -> u64 {
        self.dentry
    }
}

/// The `struct path` at `p` (a `struct path *`).
#[inline(always)]
pub fn path_at(p: u64) -> Option<KPath> {
    let w = window(p, &PATH_WINDOW)?;
    Some(KPath {
        mnt: field(p, &w, &PATH_MNT_WORD, &PATH_MNT_OFFSET)?,
        dentry: field(p, &w, &PATH_DENTRY_WORD, &PATH_DENTRY_OFFSET)?,
    })
}

/// The fields of a dentry the walks read.
struct Dentry {
    parent: u64,
    inode: u64,
    name: u64,
}

#[inline(always)]
fn dentry_at(d: u64) -> Option<Dentry> {
    let w = window(d, &DENTRY_WINDOW)?;
    Some(Dentry {
        parent: field(d, &w, &DENTRY_PARENT_WORD, &DENTRY_D_PARENT_OFFSET)?,
        inode: field(d, &w, &DENTRY_INODE_WORD, &DENTRY_D_INODE_OFFSET)?,
        name: field(
            d,
            &w,
            &DENTRY_NAME_WORD,
            &(off(&DENTRY_D_NAME_OFFSET) + off(&QSTR_NAME_OFFSET)),
        )?,
    })
}

#[inline(always)]
fn current_task() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_get_current_task() }
}

/// `current->fs`, the `struct fs_struct *` (NULL for a task that is exiting).
#[inline(always)]
fn current_fs() -> Option<u64> {
    ptr_at(current_task(), off(&TASK_FS_OFFSET))
}

/// The path of the current task's open file `fd`: `current->files->fdt->fd[fd]->f_path`.
/// `opened`: `fd` was just returned by this thread's open, so it is within the table (the
/// table only grows) and the bound is not read; else (a directory fd argument, any
/// number) it is checked against `max_fds`.
#[inline(always)]
pub fn fd_path(fd: i64, opened: bool) -> Option<KPath> {
    if fd < 0 {
        return None;
    }
    let files = ptr_at(current_task(), off(&TASK_FILES_OFFSET))?;
    let fdt = ptr_at(files, off(&FILES_FDT_OFFSET))?;
    if !opened {
        // SAFETY: as in `ptr_at`.
        let max_fds = unsafe {
            bpf_probe_read_kernel(fdt.wrapping_add(off(&FDT_MAX_FDS_OFFSET)) as *const u32)
        }
        .ok()?;
        if fd as u64 >= u64::from(max_fds) {
            return None;
        }
    }
    let fds = ptr_at(fdt, off(&FDT_FD_OFFSET))?;
    let file = ptr_at(fds, 8 * fd as u64)?;
    path_at(file.wrapping_add(off(&FILE_F_PATH_OFFSET)))
}

/// Whether `file` (a `struct file *`) is on no filesystem a path can name: its dentry is
/// its own parent and not a mount's root, as for memfd and other pseudo files. (A regular
/// file, even deleted or made with O_TMPFILE, has a parent directory.)
#[inline(always)]
pub fn is_pseudo_file(file: u64) -> Option<bool> {
    is_pseudo_path(file_path(file)?)
}

/// [`is_pseudo_file`] for a file's `f_path` already read.
#[inline(always)]
pub fn is_pseudo_path(path: KPath) -> Option<bool> {
    let parent = ptr_at(path.dentry, off(&DENTRY_D_PARENT_OFFSET))?;
    if parent != path.dentry {
        return Some(false);
    }
    // A mount's root directory is its own parent too, but it is no file to exec.
    let root = ptr_at(path.mnt, off(&VFSMOUNT_MNT_ROOT_OFFSET))?;
    Some(root != path.dentry)
}

/// The current task's working directory, `current->fs->pwd`.
#[inline(always)]
pub fn cwd() -> Option<KPath> {
    path_at(current_fs()?.wrapping_add(off(&FS_PWD_OFFSET)))
}

/// `sb->s_dev` (kernel encoding, `major << 20 | minor`).
#[inline(always)]
fn sb_dev(sb: u64) -> Option<u32> {
    // SAFETY: as in `ptr_at`.
    unsafe { bpf_probe_read_kernel(sb.wrapping_add(off(&SB_S_DEV_OFFSET)) as *const u32) }.ok()
}

/// The `struct mount` a `struct vfsmount *` is embedded in (`real_mount()`).
#[inline(always)]
fn real_mount(mnt: u64) -> u64 {
    mnt.wrapping_sub(off(&MOUNT_MNT_OFFSET))
}

/// Where the mount of `mnt` is mounted: the parent mount's vfsmount and the mountpoint
/// dentry. `None` at the top of the mount tree (the mount is its own parent).
#[inline(always)]
fn mounted_on(mnt: u64) -> Option<KPath> {
    let m = real_mount(mnt);
    let parent = ptr_at(m, off(&MOUNT_MNT_PARENT_OFFSET))?;
    if parent == m {
        return None;
    }
    Some(KPath {
        mnt: parent.wrapping_add(off(&MOUNT_MNT_OFFSET)),
        dentry: ptr_at(m, off(&MOUNT_MNT_MOUNTPOINT_OFFSET))?,
    })
}

/// What the canary walk found.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// The file or one of its ancestors is in the map, with this value (a canary's
    /// `CanaryKey::index`, `GUARDED` flags).
    Hit(u32),
    /// Walked to the top of the mount tree: no canary.
    Miss,
    /// A read failed or the walk was deeper than `MAX_WALK_DEPTH`: undecided.
    Unknown,
}

/// Matches the opened file `p` against the agent's canary inodes (see [`inode_walk`]).
#[inline(always)]
pub fn canary_walk(policy_id: u32, p: KPath) -> Walk {
    // SAFETY: the value is copied out at once.
    inode_walk(policy_id, p, |key| {
        unsafe { CANARY_INODES.get(key) }.copied()
    })
}

/// Whether `p` is a protected path of the agent or lies beneath one: its inode or an
/// ancestor's is in `GUARDED` with `GUARD_PROTECT` (see [`inode_walk`]).
#[inline(always)]
pub fn protect_walk(policy_id: u32, p: KPath) -> Walk {
    inode_walk(policy_id, p, |key| {
        // SAFETY: the value is copied out at once.
        let flags = unsafe { GUARDED.get(key) }.copied()?;
        (flags & GUARD_PROTECT != 0).then_some(flags)
    })
}

/// The `GUARDED` flags of the inode `dentry` names (0 when it has none); `None` for a
/// negative dentry (a name being created) or a failed read.
#[inline(always)]
pub fn guard_flags(policy_id: u32, dentry: u64) -> Option<u32> {
    let inode = dentry_inode(dentry)?;
    let key = inode_key(inode, policy_id)?;
    // SAFETY: the value is copied out at once.
    Some(unsafe { GUARDED.get(&key) }.copied().unwrap_or(0))
}

/// `(i_ino, i_sb->s_dev)` of `inode` as a map key of `policy_id`.
#[inline(always)]
pub fn inode_key(inode: u64, policy_id: u32) -> Option<CanaryInode> {
    let (dev, ino) = inode_dev_ino(inode)?;
    Some(CanaryInode {
        ino,
        dev,
        policy_id,
    })
}

/// `(i_sb->s_dev, i_ino)` of `inode` (a `struct inode *`).
#[inline(always)]
fn inode_dev_ino(inode: u64) -> Option<(u32, u64)> {
    let w = window(inode, &INODE_WINDOW)?;
    let ino = field(inode, &w, &INODE_INO_WORD, &INODE_I_INO_OFFSET)?;
    let sb = field(inode, &w, &INODE_SB_WORD, &INODE_I_SB_OFFSET)?;
    Some((sb_dev(sb)?, ino))
}

/// `(i_sb->s_dev, i_ino)` of `file->f_inode` (a `struct file *`), the device in the
/// kernel's encoding `major << 20 | minor`.
#[inline(always)]
pub fn file_dev_ino(file: u64) -> Option<(u32, u64)> {
    inode_dev_ino(ptr_at(file, off(&FILE_F_INODE_OFFSET))?)
}

/// The inode of `dentry` (NULL for a negative dentry: `None`).
#[inline(always)]
pub fn dentry_inode(dentry: u64) -> Option<u64> {
    ptr_at(dentry, off(&DENTRY_D_INODE_OFFSET))
}

/// Copies the name of `dentry` (`d_name.name`) into `out`, which must be zeroed. False
/// when it cannot be read or has `GUARDED_NAME_LEN - 1` bytes or more (the helper cuts
/// such a name, so it could match a shorter protected name; none is that long).
#[inline(always)]
pub fn dentry_name(dentry: u64, out: &mut [u8; GUARDED_NAME_LEN]) -> bool {
    let Some(name) = ptr_at(dentry, off(&DENTRY_D_NAME_OFFSET) + off(&QSTR_NAME_OFFSET)) else {
        return false;
    };
    // SAFETY: `out` is GUARDED_NAME_LEN writable bytes; the helper faults safely on
    // `name` and writes at most that many bytes, NUL included.
    let n = unsafe {
        bpf_probe_read_kernel_str(
            out.as_mut_ptr().cast(),
            GUARDED_NAME_LEN as u32,
            name as *const _,
        )
    };
    n > 1 && n < GUARDED_NAME_LEN as i64
}

/// `socket->sk` of a `struct socket *`.
#[inline(always)]
pub fn socket_sk(socket: u64) -> Option<u64> {
    ptr_at(socket, off(&SOCKET_SK_OFFSET))
}

/// The id of the cgroup v2 whose process created the socket `sk` (a `struct sock *`):
/// `sk->sk_cgrp_data.cgroup->kn->id`, what `bpf_get_current_cgroup_id` returns for it.
#[inline(always)]
pub fn sock_cgroup_id(sk: u64) -> Option<u64> {
    let cgroup = ptr_at(
        sk,
        off(&SOCK_SK_CGRP_DATA_OFFSET) + off(&SOCK_CGROUP_DATA_CGROUP_OFFSET),
    )?;
    let kn = ptr_at(cgroup, off(&CGROUP_KN_OFFSET))?;
    ptr_at(kn, off(&KERNFS_NODE_ID_OFFSET))
}

/// The address a unix socket is bound to.
pub enum UnixName {
    /// Not bound (one end of a socketpair, or a socket that never bound).
    Unnamed,
    /// An abstract name.
    Abstract,
    /// A file in the filesystem: its dentry.
    Path(u64),
}

/// The name `sk` (the `struct sock` of a `struct unix_sock`) is bound to: `path.dentry`
/// when bound to a file, else abstract when it has an address, else unnamed.
#[inline(always)]
pub fn unix_name(sk: u64) -> Option<UnixName> {
    let path = sk.wrapping_add(off(&UNIX_SOCK_PATH_OFFSET));
    // SAFETY: bpf_probe_read_kernel faults safely on any address.
    let dentry =
        unsafe { bpf_probe_read_kernel(path.wrapping_add(off(&PATH_DENTRY_OFFSET)) as *const u64) }
            .ok()?;
    if dentry != 0 {
        return Some(UnixName::Path(dentry));
    }
    // SAFETY: as above.
    let addr = unsafe {
        bpf_probe_read_kernel(sk.wrapping_add(off(&UNIX_SOCK_ADDR_OFFSET)) as *const u64)
    }
    .ok()?;
    Some(if addr == 0 {
        UnixName::Unnamed
    } else {
        UnixName::Abstract
    })
}

/// The parent of `dentry` (`d_parent`).
#[inline(always)]
pub fn dentry_parent(dentry: u64) -> Option<u64> {
    ptr_at(dentry, off(&DENTRY_D_PARENT_OFFSET))
}

/// `file->f_mode` of a `struct file *`.
#[inline(always)]
pub fn file_mode(file: u64) -> Option<u32> {
    // SAFETY: as in `ptr_at`.
    unsafe { bpf_probe_read_kernel(file.wrapping_add(off(&FILE_F_MODE_OFFSET)) as *const u32) }.ok()
}

/// `file->f_path` of a `struct file *`.
#[inline(always)]
pub fn file_path(file: u64) -> Option<KPath> {
    path_at(file.wrapping_add(off(&FILE_F_PATH_OFFSET)))
}

/// `vma->vm_file` of a `struct vm_area_struct *`; `None` for an anonymous mapping.
#[inline(always)]
pub fn vma_file(vma: u64) -> Option<u64> {
    ptr_at(vma, off(&VMA_VM_FILE_OFFSET))
}

/// The `GUARDED` bits of `p` and of every ancestor up to the top of the mount tree, or'd
/// together; `None` when the walk cannot decide (see [`inode_walk`]).
#[inline(always)]
pub fn guard_bits_walk(policy_id: u32, p: KPath) -> Option<u32> {
    // The bits are collected in a map-free way: the lookup never reports a hit, so the
    // walk goes to the top, and the closure or's what it sees into a cell.
    let bits = core::cell::Cell::new(0u32);
    let walk = inode_walk(policy_id, p, |key| {
        // SAFETY: the value is copied out at once.
        if let Some(b) = unsafe { GUARDED.get(key) } {
            bits.set(bits.get() | *b);
        }
        None
    });
    (walk == Walk::Miss).then(|| bits.get())
}

/// Walks from `p` up to the top of the mount tree looking each inode up with `lookup`:
/// `(i_sb->s_dev, i_ino)` of the file, then of each `d_parent` up to its filesystem's
/// root, then on from the mountpoint its mount sits on (so an entry above a mountpoint
/// covers the mounted files too). Walking `d_parent` rather than the path the process
/// used means a bind mount or symlink into a listed directory still finds it. One hash
/// lookup per level; the first hit ends the walk.
#[inline(always)]
fn inode_walk(policy_id: u32, p: KPath, lookup: impl Fn(&CanaryInode) -> Option<u32>) -> Walk {
    let KPath {
        mut mnt,
        mut dentry,
    } = p;
    // The device is the same for every dentry up to the filesystem's root: read once
    // per filesystem.
    let mut dev: Option<u32> = None;
    let mut level = 0;
    while level < MAX_WALK_DEPTH {
        let Some(d) = dentry_at(dentry) else {
            return Walk::Unknown;
        };
        let Some(w) = window(d.inode, &INODE_WINDOW) else {
            return Walk::Unknown;
        };
        let Some(ino) = field(d.inode, &w, &INODE_INO_WORD, &INODE_I_INO_OFFSET) else {
            return Walk::Unknown;
        };
        let s_dev = match dev {
            Some(s_dev) => s_dev,
            None => {
                let Some(sb) = field(d.inode, &w, &INODE_SB_WORD, &INODE_I_SB_OFFSET) else {
                    return Walk::Unknown;
                };
                let Some(s_dev) = sb_dev(sb) else {
                    return Walk::Unknown;
                };
                dev = Some(s_dev);
                s_dev
            }
        };
        let key = CanaryInode {
            ino,
            dev: s_dev,
            policy_id,
        };
        if let Some(value) = lookup(&key) {
            return Walk::Hit(value);
        }
        if d.parent == dentry {
            // The root of this filesystem: go on from the mountpoint.
            let Some(up) = mounted_on(mnt) else {
                return Walk::Miss;
            };
            (mnt, dentry, dev) = (up.mnt, up.dentry, None);
        } else {
            dentry = d.parent;
        }
        level += 1;
    }
    Walk::Unknown
}

/// Reads directory `dir` into `ev.dir` (its components innermost first, each
/// NUL-terminated; see `RawEvent::dir`) and sets `ev.dir_parts`. Walks the way `d_path`
/// does: up `d_parent` to the mount's root, across to the mountpoint in the parent mount,
/// until the task's root (`current->fs->root`). Returns false, leaving `ev.dir` unset,
/// when the directory is not under that root (a detached mount, a disconnected dentry),
/// is deeper than `MAX_WALK_DEPTH` levels, or does not fit in `PATH_LEN` bytes.
#[inline(always)]
pub fn read_dir(dir: KPath, ev: &mut RawEvent) -> bool {
    let Some(fs) = current_fs() else {
        return false;
    };
    let Some(root) = path_at(fs.wrapping_add(off(&FS_ROOT_OFFSET))) else {
        return false;
    };
    let Some(buf) = NAMES.get_ptr_mut(0) else {
        return false;
    };
    let buf = buf.cast::<u8>();
    // The bytes written so far are kept in the map, not in a register, and read back each
    // time (volatile, so LLVM does not keep a copy): the verifier tracks a register's
    // range through every iteration and checks the loop again for each range it meets
    // (over a million instructions for 6.1's verifier), while a value loaded from a map
    // is simply unknown. The mask below bounds it where it is used.
    // SAFETY: the entry is NAMES_LEN bytes; the slot is its last, 8-aligned, u64.
    let len_slot = unsafe { buf.add(2 * PATH_LEN) }.cast::<u64>();
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(len_slot, 0) };
    let KPath {
        mut mnt,
        mut dentry,
    } = dir;
    let mut parts: u32 = 0;
    let mut level = 0;
    let mut complete = false;
    while level < MAX_WALK_DEPTH {
        if dentry == root.dentry && mnt == root.mnt {
            complete = true;
            break;
        }
        let Some(mnt_root) = ptr_at(mnt, off(&VFSMOUNT_MNT_ROOT_OFFSET)) else {
            return false;
        };
        if dentry == mnt_root {
            let Some(up) = mounted_on(mnt) else {
                // The top of the mount tree without passing the task's root.
                return false;
            };
            (mnt, dentry) = (up.mnt, up.dentry);
        } else {
            let Some(Dentry { parent, name, .. }) = dentry_at(dentry) else {
                return false;
            };
            // SAFETY: as above.
            let len = unsafe { core::ptr::read_volatile(len_slot) };
            if parent == dentry || len >= PATH_LEN as u64 {
                return false;
            }
            // The buffer holds 2 * PATH_LEN bytes: a name of up to PATH_LEN bytes (a
            // component is at most NAME_MAX = 255 plus the NUL) written at an offset
            // below PATH_LEN stays inside it; the mask shows the verifier that bound.
            let at = len as usize & (PATH_LEN - 1);
            // SAFETY: `buf` is this CPU's NAMES entry; the destination range is inside
            // it (see above); the helper faults safely on `name`.
            let n = unsafe {
                bpf_probe_read_kernel_str(buf.add(at).cast(), PATH_LEN as u32, name as *const _)
            };
            if n <= 1 || n > PATH_LEN as i64 {
                return false;
            }
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile(len_slot, len + n as u64) };
            parts += 1;
            dentry = parent;
        }
        level += 1;
    }
    // SAFETY: as above.
    if !complete || unsafe { core::ptr::read_volatile(len_slot) } > PATH_LEN as u64 {
        return false;
    }
    // SAFETY: `buf` holds at least PATH_LEN bytes; `ev.dir` is PATH_LEN bytes of map
    // memory.
    if unsafe { bpf_probe_read_kernel_buf(buf, &mut ev.dir) }.is_err() {
        return false;
    }
    ev.dir_parts = parts;
    true
}
