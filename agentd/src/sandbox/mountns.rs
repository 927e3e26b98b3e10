//! The agent's own view of the filesystem: a private mount namespace, prepared by the
//! supervisor before fork and entered by the agent's first process before it drops its
//! privileges. The agent has no capability and seccomp refuses `mount`, `umount2`,
//! `unshare`, `setns`, `open_tree`, `move_mount`, `fsopen` and `mount_setattr`, so it
//! cannot change the view. In it:
//!
//! - **noexec**: every writable tree the profile grants no `exec` on (`/tmp`,
//!   `{home}/.cache`, the workspace unless `exec` covers it) is bound onto itself
//!   `noexec`, so no file the agent wrote there can be mapped executable (`ld.so
//!   /tmp/payload` fails at `mmap`) or executed; `exec` trees inside them are bound again
//!   without `noexec`.
//! - **protect**: each `filesystem.protect` path is bound onto itself read-only, and each
//!   of its ancestors the agent could rename (its parent is writable) is bound onto
//!   itself: a mount point cannot be renamed, removed or replaced (EBUSY), so `mv .git
//!   .git2` and re-creating `.git` does not get around it.
//! - **/run**: a fresh read-only tmpfs holding only what the profile grants beneath /run,
//!   the sockets `network.unix` lists, and the file /etc/resolv.conf points to when it is
//!   there; every other host service socket (docker, D-Bus, systemd, ...) is absent.
//! - **transaction**: the workspace is an overlay whose upper layer is a tmpfs of the
//!   profile's size limit, detached from every directory tree: the agent's writes never
//!   reach the real workspace; the supervisor keeps the tmpfs (an fd) and persists it when
//!   the agent ends.
//!
//! The supervisor builds the view in a namespace of its own (single-threaded, before
//! fork), builds the Landlock ruleset there (so rules name the inodes the agent sees: an
//! overlay's, not the real workspace's), and returns to the host's namespace. Mounts need
//! no cleanup: the namespace ends with the agent's last process, and the tmpfs with the
//! supervisor's fd.

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use nix::{
    fcntl::{OFlag, open},
    mount::{MsFlags, mount},
    sched::CloneFlags,
    sys::stat::Mode,
};
use serde::Serialize;

use crate::profile::CompiledPolicy;

/// What the agent's view adds to the host's, decided before anything is mounted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ViewPlan {
    /// Writable trees without `exec`: bound `noexec`.
    pub noexec: Vec<PathBuf>,
    /// `exec` trees inside a `noexec` one: bound again without it.
    pub exec_again: Vec<PathBuf>,
    /// Ancestors of protected paths the agent could rename: pinned as mount points.
    pub pins: Vec<PathBuf>,
    /// Protected paths that exist: bound read-only.
    pub protect: Vec<PathBuf>,
    /// Protected paths that do not exist at launch: nothing to bind (BPF LSM, where it
    /// runs, forbids creating them).
    pub unprotected: Vec<PathBuf>,
    /// What the agent's /run holds (`None`: the host has no /run directory).
    pub run: Option<Vec<PathBuf>>,
    /// The workspace as a transaction.
    pub overlay: Option<OverlayPlan>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OverlayPlan {
    pub workspace: PathBuf,
    /// The upper layer's size (tmpfs `size=`).
    pub limit: u64,
    /// Canaries in the workspace: the real files, bound read-only over the overlay's, so
    /// that opening one opens the inode the kernel watch knows.
    pub canaries: Vec<PathBuf>,
}

impl ViewPlan {
    /// One line per thing the view changes, for `--dry-run`.
    pub fn describe(&self) -> Vec<String> {
        let paths = |v: &[PathBuf]| {
            v.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut out = vec!["a mount namespace of its own, which it cannot change".to_owned()];
        if let Some(o) = &self.overlay {
            out.push(format!(
                "{}: an overlay; the agent's writes go to a tmpfs of {} agentd keeps",
                o.workspace.display(),
                crate::profile::format_bytes(o.limit)
            ));
            if !o.canaries.is_empty() {
                out.push(format!(
                    "canaries in it, the real files, read-only: {}",
                    paths(&o.canaries)
                ));
            }
        }
        if !self.noexec.is_empty() {
            out.push(format!(
                "noexec (no exec grant; nothing written there can be executed or mapped executable): {}",
                paths(&self.noexec)
            ));
        }
        if !self.exec_again.is_empty() {
            out.push(format!(
                "exec again inside those: {}",
                paths(&self.exec_again)
            ));
        }
        if !self.protect.is_empty() {
            out.push(format!(
                "read-only (filesystem.protect): {}",
                paths(&self.protect)
            ));
        }
        if !self.pins.is_empty() {
            out.push(format!(
                "pinned as mount points (cannot be renamed or replaced): {}",
                paths(&self.pins)
            ));
        }
        if !self.unprotected.is_empty() {
            out.push(format!(
                "NOT protected, missing at launch (only BPF LSM forbids creating them): {}",
                paths(&self.unprotected)
            ));
        }
        match &self.run {
            Some(keep) if keep.is_empty() => {
                out.push("/run: an empty read-only tmpfs (no host service sockets)".into());
            }
            Some(keep) => out.push(format!(
                "/run: a read-only tmpfs holding only {}",
                paths(keep)
            )),
            None => {}
        }
        out
    }
}

/// The filesystem as [`plan`] sees it: a seam for tests.
pub trait Lookup {
    /// The path with symbolic links resolved, if it exists.
    fn real(&self, path: &Path) -> Option<PathBuf>;
    fn is_dir(&self, path: &Path) -> bool;
}

/// The host's filesystem.
#[derive(Debug)]
pub struct Host;

impl Lookup for Host {
    fn real(&self, path: &Path) -> Option<PathBuf> {
        std::fs::canonicalize(path).ok()
    }
    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }
}

const RUN: &str = "/run";
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Decides the view for `policy` (pure but for `fs`). `overlay`: the transaction's size
/// limit when the workspace is a transaction.
pub fn plan(policy: &CompiledPolicy, overlay: Option<u64>, fs: &dyn Lookup) -> ViewPlan {
    let rules = &policy.landlock.rules;
    let real_of = |want: fn(&crate::profile::FsAccess) -> bool| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = rules
            .iter()
            .filter(|r| want(&r.access))
            .filter_map(|r| fs.real(&r.path))
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let write = real_of(|a| a.write);
    let exec = real_of(|a| a.exec);

    // noexec: writable directories no exec grant covers; outermost only.
    let mut noexec: Vec<PathBuf> = write
        .iter()
        .filter(|w| fs.is_dir(w) && !exec.iter().any(|e| w.starts_with(e)))
        .cloned()
        .collect();
    let outer = noexec.clone();
    noexec.retain(|w| !outer.iter().any(|o| o != w && w.starts_with(o)));
    let exec_again: Vec<PathBuf> = exec
        .iter()
        .filter(|e| noexec.iter().any(|n| e.starts_with(n) && *e != n))
        .cloned()
        .collect();

    // protect: each existing path, and its renamable ancestors.
    let mut pins = Vec::new();
    let mut protect = Vec::new();
    let mut unprotected = Vec::new();
    for p in &policy.protect {
        let real = match fs.real(p) {
            Some(real) => real,
            // Missing: where its deepest existing ancestor is a file where a directory
            // should be (a git worktree's or submodule's `.git` file, which names the
            // repository), that file is what is protected.
            None => match p.ancestors().skip(1).find_map(|a| fs.real(a)) {
                Some(file) if !fs.is_dir(&file) && write.iter().any(|w| file.starts_with(w)) => {
                    file
                }
                Some(_) | None => {
                    unprotected.push(p.clone());
                    continue;
                }
            },
        };
        for a in real.ancestors().skip(1) {
            let Some(parent) = a.parent() else { break };
            if write.iter().any(|w| parent.starts_with(w)) && !pins.contains(&a.to_path_buf()) {
                pins.push(a.to_path_buf());
            }
        }
        if !protect.contains(&real) {
            protect.push(real);
        }
    }
    // Shallowest first: a bind covers what was bound beneath it before.
    pins.sort_by_key(|p| p.components().count());
    protect.sort_by_key(|p| p.components().count());

    // /run: what the profile grants there, the listed sockets, resolv.conf's target.
    let run = fs.is_dir(Path::new(RUN)).then(|| {
        let mut keep: Vec<PathBuf> = rules
            .iter()
            .map(|r| r.path.clone())
            .chain(policy.network.unix.iter().cloned())
            .chain(std::iter::once(PathBuf::from(RESOLV_CONF)))
            .filter_map(|p| fs.real(&p))
            .filter(|p| p.starts_with(RUN) && p != Path::new(RUN))
            .collect();
        keep.sort();
        keep.dedup();
        let all = keep.clone();
        keep.retain(|k| !all.iter().any(|o| o != k && k.starts_with(o)));
        keep
    });

    let overlay = overlay.map(|limit| {
        let workspace = fs
            .real(&policy.workspace)
            .unwrap_or_else(|| policy.workspace.clone());
        let mut canaries: Vec<PathBuf> = policy
            .canaries
            .iter()
            .filter_map(|c| fs.real(c))
            .filter(|c| c.starts_with(&workspace) && *c != workspace)
            .collect();
        canaries.sort();
        canaries.dedup();
        OverlayPlan {
            workspace,
            limit,
            canaries,
        }
    });
    ViewPlan {
        noexec,
        exec_again,
        pins,
        protect,
        unprotected,
        run,
        overlay,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("{call} {}: {source}", path.display())]
    Call {
        call: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(
        "agentd has {0} threads: it prepares the agent's mount namespace only while single-threaded (a bug in agentd)"
    )]
    Threads(usize),
    #[error("path contains a NUL byte: {}", .0.display())]
    Nul(PathBuf),
    #[error(
        "cannot return to the host's mount namespace ({0}): agentd stops rather than supervise from the agent's view"
    )]
    Return(nix::Error),
    #[error("the transaction's upper layer was not made (a bug in agentd)")]
    NoUpper,
}

fn call(call: &'static str, path: &Path) -> impl Fn(nix::Error) -> ViewError {
    let path = path.to_path_buf();
    move |source| ViewError::Call {
        call,
        path: path.clone(),
        source,
    }
}

/// The agent's mount namespace, built.
#[derive(Debug)]
pub struct View {
    /// `/proc/self/ns/mnt` of the namespace; the agent's first process enters it.
    pub ns: OwnedFd,
    /// The transaction's upper tmpfs (a detached mount): its `upper` directory is what
    /// the agent changed.
    pub upper: Option<OwnedFd>,
}

/// Builds the view of `plan` in a new mount namespace, runs `inside` there (the Landlock
/// ruleset is built by it), and returns to the host's namespace and working directory.
/// The process must be single-threaded (`setns` of a mount namespace requires it).
pub fn build<R, E>(
    plan: &ViewPlan,
    threads: usize,
    inside: impl FnOnce() -> Result<R, E>,
) -> Result<(View, Result<R, E>), ViewError> {
    if threads != 1 {
        return Err(ViewError::Threads(threads));
    }
    let self_ns = Path::new("/proc/self/ns/mnt");
    let host = open(self_ns, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(call("open", self_ns))?;
    let cwd = open(
        ".",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(call("open", Path::new(".")))?;
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(call("unshare", Path::new("/")))?;
    // From here, every return goes back to the host's namespace first.
    let built = apply(plan).and_then(|upper| {
        let r = inside();
        let ns = open(self_ns, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(call("open", self_ns))?;
        Ok((View { ns, upper }, r))
    });
    nix::sched::setns(&host, CloneFlags::CLONE_NEWNS).map_err(ViewError::Return)?;
    nix::unistd::fchdir(&cwd).map_err(ViewError::Return)?;
    built
}

fn cpath(path: &Path) -> Result<CString, ViewError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| ViewError::Nul(path.to_path_buf()))
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Sets and clears mount attributes of the mount at `path` and every mount beneath it.
fn setattr(path: &Path, set: u64, clr: u64) -> Result<(), ViewError> {
    let c = cpath(path)?;
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clr,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: c is a NUL-terminated path and attr a mount_attr of the size passed; the
    // kernel reads both and writes nothing.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_RECURSIVE | libc::AT_SYMLINK_NOFOLLOW,
            &raw const attr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        return Err(call("mount_setattr", path)(nix::Error::last()));
    }
    Ok(())
}

/// Binds `path` onto itself (with the mounts beneath it). The path is opened without
/// following a final symbolic link, and bound through its fd: a link swapped in since the
/// plan is bound as the link, never as what it points to.
fn bind_onto_itself(path: &Path) -> Result<(), ViewError> {
    let fd = open(
        path,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(call("open", path))?;
    let at = fd_path(fd.as_raw_fd());
    mount(
        Some(at.as_path()),
        at.as_path(),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(call("bind mount", path))
}

fn fd_path(fd: RawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{fd}"))
}

/// Makes the mounts of `plan` in the current (new) namespace. Returns the transaction's
/// upper tmpfs.
fn apply(plan: &ViewPlan) -> Result<Option<OwnedFd>, ViewError> {
    let root = Path::new("/");
    // Nothing made here propagates back to the host.
    mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(call("make private", root))?;

    let upper = plan.overlay.as_ref().map(overlay).transpose()?;
    if let Some(keep) = &plan.run {
        private_run(keep)?;
    }
    for n in &plan.noexec {
        bind_onto_itself(n)?;
        setattr(n, MOUNT_ATTR_NOEXEC, 0)?;
    }
    for e in &plan.exec_again {
        bind_onto_itself(e)?;
        setattr(e, 0, MOUNT_ATTR_NOEXEC)?;
    }
    for p in &plan.pins {
        bind_onto_itself(p)?;
    }
    for p in &plan.protect {
        bind_onto_itself(p)?;
        setattr(p, MOUNT_ATTR_RDONLY, 0)?;
    }
    Ok(upper)
}

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;

/// A new tmpfs as a detached mount (`fsopen`, `fsconfig`, `fsmount`): reachable only
/// through the returned fd.
fn detached_tmpfs(options: &[(&str, String)]) -> Result<OwnedFd, ViewError> {
    let at = Path::new("tmpfs");
    let name = c"tmpfs";
    // SAFETY: fsopen takes a NUL-terminated name and flags.
    let fs = unsafe { libc::syscall(libc::SYS_fsopen, name.as_ptr(), FSOPEN_CLOEXEC) };
    if fs < 0 {
        return Err(call("fsopen", at)(nix::Error::last()));
    }
    let fs = owned(fs, "fsopen")?;
    for (key, value) in options {
        let k = CString::new(*key).map_err(|_| ViewError::Nul(PathBuf::from(key)))?;
        let v = CString::new(value.as_str()).map_err(|_| ViewError::Nul(PathBuf::from(value)))?;
        // SAFETY: fs is an fs context fd; key and value are NUL-terminated strings.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                FSCONFIG_SET_STRING,
                k.as_ptr(),
                v.as_ptr(),
                0,
            )
        };
        if rc != 0 {
            return Err(call("fsconfig", Path::new(key))(nix::Error::last()));
        }
    }
    // SAFETY: FSCONFIG_CMD_CREATE takes no key or value.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if rc != 0 {
        return Err(call("fsconfig create", at)(nix::Error::last()));
    }
    // SAFETY: fsmount takes the fs context fd and flags.
    let mnt = unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, 0) };
    if mnt < 0 {
        return Err(call("fsmount", at)(nix::Error::last()));
    }
    owned(mnt, "fsmount")
}

/// The fd a system call returned (non-negative), owned.
fn owned(ret: libc::c_long, call_name: &'static str) -> Result<OwnedFd, ViewError> {
    let fd =
        RawFd::try_from(ret).map_err(|_| call(call_name, Path::new("tmpfs"))(nix::Error::EBADF))?;
    // SAFETY: the system call returned this new fd (checked non-negative by the caller,
    // and in range above), and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The directory of the upper tmpfs that holds what the agent changed.
pub const UPPER: &str = "upper";
const WORK: &str = "work";

/// The workspace as an overlay: the real workspace below, a detached tmpfs of `limit`
/// bytes above. Returns the tmpfs.
fn overlay(o: &OverlayPlan) -> Result<OwnedFd, ViewError> {
    let ws = &o.workspace;
    let lower = open(
        ws,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(call("open", ws))?;
    let meta = std::fs::metadata(fd_path(lower.as_raw_fd())).map_err(|e| ViewError::Call {
        call: "stat",
        path: ws.clone(),
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    // The real canaries, opened before the overlay covers them.
    let mut canaries = Vec::new();
    for c in &o.canaries {
        match open(
            c.as_path(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => canaries.push((c, fd)),
            Err(nix::Error::ENOENT) => {}
            Err(e) => return Err(call("open", c)(e)),
        }
    }
    // One inode per 4 KiB of the limit: what is kept is bounded in files as in bytes.
    let inodes = (o.limit / 4096).max(1024);
    let tmpfs = detached_tmpfs(&[
        ("size", o.limit.to_string()),
        ("nr_inodes", inodes.to_string()),
        ("mode", "0700".into()),
    ])?;
    let top = fd_path(tmpfs.as_raw_fd());
    let upper = top.join(UPPER);
    let work = top.join(WORK);
    // The upper root carries the workspace root's owner and mode: the merged root shows
    // them.
    nix::unistd::mkdir(&upper, Mode::from_bits_truncate(meta.mode() & 0o7777))
        .map_err(call("mkdir", &upper))?;
    nix::unistd::chown(
        &upper,
        Some(nix::unistd::Uid::from_raw(meta.uid())),
        Some(nix::unistd::Gid::from_raw(meta.gid())),
    )
    .map_err(call("chown", &upper))?;
    nix::sys::stat::fchmodat(
        nix::fcntl::AT_FDCWD,
        &upper,
        Mode::from_bits_truncate(meta.mode() & 0o7777),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .map_err(call("chmod", &upper))?;
    nix::unistd::mkdir(&work, Mode::from_bits_truncate(0o700)).map_err(call("mkdir", &work))?;
    // redirect_dir, metacopy and index off: the upper layer is plain files, directories
    // and whiteouts, which `agentd diff` reads (a renamed directory is copied).
    let data = format!(
        "lowerdir={},upperdir={},workdir={},redirect_dir=off,metacopy=off,index=off,xino=off",
        fd_path(lower.as_raw_fd()).display(),
        upper.display(),
        work.display()
    );
    mount(
        Some("agentd-transaction"),
        ws.as_path(),
        Some("overlay"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(call("mount overlay on", ws))?;
    for (c, fd) in &canaries {
        mount(
            Some(fd_path(fd.as_raw_fd()).as_path()),
            c.as_path(),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(call("bind mount", c))?;
        setattr(c, MOUNT_ATTR_RDONLY, 0)?;
    }
    Ok(tmpfs)
}

/// /run as a fresh tmpfs holding `keep`, each bound from the host's, then read-only.
fn private_run(keep: &[PathBuf]) -> Result<(), ViewError> {
    let run = Path::new(RUN);
    // The host's directories on the way to each kept path, with their owner and mode:
    // the private /run has the same, so a kept path is no easier to reach than on the
    // host (a user's 0700 /run/user/UID stays closed to others).
    let mut dirs: Vec<(PathBuf, std::fs::Metadata)> = Vec::new();
    for k in keep {
        let mut at = PathBuf::from(RUN);
        if let Ok(rest) = k.strip_prefix(RUN)
            && let Some(parent) = rest.parent()
        {
            for part in parent.components() {
                at.push(part);
                if dirs.iter().any(|(d, _)| *d == at) {
                    continue;
                }
                let m = std::fs::symlink_metadata(&at).map_err(|e| {
                    call("stat", &at)(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
                })?;
                if !m.is_dir() {
                    return Err(call("stat", &at)(nix::Error::ENOTDIR));
                }
                dirs.push((at.clone(), m));
            }
        }
    }
    let run_meta = std::fs::metadata(run).map_err(|e| {
        call("stat", run)(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
    })?;
    // Opened before the tmpfs hides them.
    let mut sources = Vec::new();
    for k in keep {
        match open(
            k.as_path(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => sources.push((k, fd, k.is_dir())),
            // Gone since the plan: nothing to keep.
            Err(nix::Error::ENOENT) => {}
            Err(e) => return Err(call("open", k)(e)),
        }
    }
    mount(
        Some("agentd-run"),
        run,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=1m"),
    )
    .map_err(call("mount tmpfs on", run))?;
    for (k, fd, is_dir) in &sources {
        for (dir, meta) in dirs.iter().filter(|(d, _)| k.starts_with(d)) {
            make_dir(dir, Some(meta))?;
        }
        if *is_dir {
            // A mount point: what is bound over it shows its own owner and mode.
            make_dir(k, None)?;
        } else {
            open(
                k.as_path(),
                OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o644),
            )
            .map_err(call("create", k))?;
        }
        mount(
            Some(fd_path(fd.as_raw_fd()).as_path()),
            k.as_path(),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(call("bind mount", k))?;
    }
    set_owner_mode(run, &run_meta)?;
    // Read-only: the tmpfs itself only (what is bound into it keeps its own flags).
    mount(
        None::<&str>,
        run,
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(call("remount read-only", run))?;
    Ok(())
}

/// A directory of the private /run: with the owner and mode of the host's directory it
/// stands for, or 0755 root (whatever the umask: the daemon's is 077).
fn make_dir(dir: &Path, like: Option<&std::fs::Metadata>) -> Result<(), ViewError> {
    match nix::unistd::mkdir(dir, Mode::from_bits_truncate(0o700)) {
        Ok(()) => {}
        // Made for an earlier kept path: already right.
        Err(nix::Error::EEXIST) => return Ok(()),
        Err(e) => return Err(call("mkdir", dir)(e)),
    }
    match like {
        Some(m) => set_owner_mode(dir, m),
        None => nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            dir,
            Mode::from_bits_truncate(0o755),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(call("chmod", dir)),
    }
}

/// Gives `path` (in the private /run) the owner and mode of `like`.
fn set_owner_mode(path: &Path, like: &std::fs::Metadata) -> Result<(), ViewError> {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(like.uid())),
        Some(nix::unistd::Gid::from_raw(like.gid())),
    )
    .map_err(call("chown", path))?;
    nix::sys::stat::fchmodat(
        nix::fcntl::AT_FDCWD,
        path,
        Mode::from_bits_truncate(like.mode() & 0o7777),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .map_err(call("chmod", path))
}

/// Whether an overlay upper tmpfs is full (no block or no inode free): the agent's writes
/// fail with ENOSPC.
pub fn is_full(upper: &OwnedFd) -> bool {
    nix::sys::statfs::fstatfs(upper).is_ok_and(|s| s.blocks_available() == 0 || s.files_free() == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{CompileContext, compile, parse};

    /// A filesystem where every path exists as itself, directories unless they end in a
    /// file-looking name; `links` maps paths to their targets.
    struct Fake {
        missing: Vec<PathBuf>,
        links: Vec<(PathBuf, PathBuf)>,
    }

    impl Lookup for Fake {
        fn real(&self, path: &Path) -> Option<PathBuf> {
            if self.missing.iter().any(|m| path.starts_with(m)) {
                return None;
            }
            for (from, to) in &self.links {
                if let Ok(rest) = path.strip_prefix(from) {
                    return Some(to.join(rest));
                }
            }
            Some(path.to_path_buf())
        }
        fn is_dir(&self, path: &Path) -> bool {
            !path.starts_with("/dev") && path.extension().is_none() && !path.ends_with("config")
        }
    }

    fn policy(toml: &str) -> CompiledPolicy {
        let profile = parse("t", toml).expect("profile");
        compile(
            &profile,
            &CompileContext {
                workspace: "/w".into(),
                home: "/home/u".into(),
            },
        )
    }

    #[test]
    fn writable_trees_without_exec_are_noexec_and_exec_inside_them_is_not() {
        let p = policy(
            "[agent]\nname = \"t\"\n[filesystem]\nread = [\"/usr\"]\nwrite = [\"{workspace}\", \"/tmp\", \"/tmp/x\", \"/dev/null\", \"{home}/.cache\"]\nexec = [\"/usr\", \"{workspace}\", \"{home}/.cache/tools\"]\n",
        );
        let fs = Fake {
            missing: vec![],
            links: vec![],
        };
        let v = plan(&p, None, &fs);
        assert_eq!(
            v.noexec,
            vec![PathBuf::from("/home/u/.cache"), PathBuf::from("/tmp")]
        );
        assert_eq!(v.exec_again, vec![PathBuf::from("/home/u/.cache/tools")]);
        assert!(v.overlay.is_none());
    }

    #[test]
    fn protected_paths_are_bound_read_only_with_their_renamable_ancestors_pinned() {
        let p = policy(
            "[agent]\nname = \"t\"\n[filesystem]\nwrite = [\"{workspace}\"]\nprotect = [\"{workspace}/.git/hooks\", \"{workspace}/.git/config\", \"{workspace}/sub/deep/x\"]\n",
        );
        let fs = Fake {
            missing: vec![PathBuf::from("/w/sub")],
            links: vec![],
        };
        let v = plan(&p, None, &fs);
        assert_eq!(v.pins, vec![PathBuf::from("/w/.git")]);
        assert_eq!(
            v.protect,
            vec![
                PathBuf::from("/w/.git/config"),
                PathBuf::from("/w/.git/hooks")
            ]
        );
        assert_eq!(v.unprotected, vec![PathBuf::from("/w/sub/deep/x")]);
    }

    #[test]
    fn a_file_where_a_protected_directory_should_be_is_protected_itself() {
        // A git worktree: `.git` is a file naming the repository.
        let p = policy(
            "[agent]\nname = \"t\"\n[filesystem]\nwrite = [\"{workspace}\"]\nprotect = [\"{workspace}/.git/hooks\", \"{workspace}/.git/config\"]\n",
        );
        struct Worktree;
        impl Lookup for Worktree {
            fn real(&self, path: &Path) -> Option<PathBuf> {
                // Nothing below the `.git` file.
                (path.parent() != Some(Path::new("/w/.git"))).then(|| path.to_path_buf())
            }
            fn is_dir(&self, path: &Path) -> bool {
                path != Path::new("/w/.git")
            }
        }
        let v = plan(&p, None, &Worktree);
        assert_eq!(v.protect, vec![PathBuf::from("/w/.git")]);
        assert!(v.unprotected.is_empty(), "{v:?}");
    }

    #[test]
    fn the_private_run_keeps_grants_listed_sockets_and_resolv_conf_only() {
        let p = policy(
            "[agent]\nname = \"t\"\n[filesystem]\nread = [\"/run/user/1000\", \"/run/user/1000/bus\", \"/etc\"]\n[network]\nunix = [\"/run/docker.sock\", \"/var/run/x.sock\"]\n",
        );
        let fs = Fake {
            missing: vec![],
            links: vec![
                (
                    PathBuf::from("/etc/resolv.conf"),
                    PathBuf::from("/run/systemd/resolve/stub-resolv.conf"),
                ),
                (PathBuf::from("/var/run"), PathBuf::from("/run")),
            ],
        };
        let v = plan(&p, Some(1 << 20), &fs);
        assert_eq!(
            v.run,
            Some(vec![
                PathBuf::from("/run/docker.sock"),
                PathBuf::from("/run/systemd/resolve/stub-resolv.conf"),
                PathBuf::from("/run/user/1000"),
                PathBuf::from("/run/x.sock"),
            ])
        );
        assert_eq!(
            v.overlay,
            Some(OverlayPlan {
                workspace: "/w".into(),
                limit: 1 << 20,
                canaries: Vec::new(),
            })
        );
    }
}
