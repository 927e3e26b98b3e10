//! File-system primitives of the transaction store. In the real workspace every path is
//! resolved beneath an `O_PATH` fd of the workspace with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`, and every change is made
//! with `*at()` calls on the parent directory's fd with the final component never followed.
//! The same primitives are used in the store itself (persisted upper, saved copies), so a
//! tree is copied the same way in every direction.

use std::{
    collections::hash_map::RandomState,
    ffi::{OsStr, OsString},
    fs::File,
    hash::BuildHasher as _,
    io::{Read as _, Write as _},
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use nix::{
    errno::Errno,
    fcntl::{OFlag, OpenHow, ResolveFlag, openat, openat2, readlinkat},
    sys::{
        stat::{FileStat, Mode as FileMode, SFlag, fstat, fstatat, futimens, mkdirat, mknodat},
        time::TimeSpec,
    },
    unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, symlinkat, unlinkat},
};
use serde::{Deserialize, Serialize};

/// Prefix of the temporary names commit and undo create next to their targets.
pub const TEMP_PREFIX: &str = ".agentd-commit-";

/// A file's type as the store sees it. `Whiteout` is overlayfs's deletion marker (a
/// character device 0:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    File,
    Dir,
    Symlink,
    Whiteout,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl FileType {
    pub fn name(self) -> &'static str {
        match self {
            FileType::File => "file",
            FileType::Dir => "directory",
            FileType::Symlink => "symlink",
            FileType::Whiteout => "whiteout",
            FileType::Fifo => "fifo",
            FileType::Socket => "socket",
            FileType::CharDev => "character device",
            FileType::BlockDev => "block device",
        }
    }
}

/// What `fstatat(AT_SYMLINK_NOFOLLOW)` says about an entry, trimmed to what the store uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub kind: FileType,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub ino: u64,
    pub dev: u64,
    pub nlink: u64,
    pub rdev: u64,
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
}

fn nsec(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

impl From<&FileStat> for Stat {
    fn from(st: &FileStat) -> Stat {
        let fmt = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        let rdev = st.st_rdev;
        let kind = if fmt == SFlag::S_IFDIR {
            FileType::Dir
        } else if fmt == SFlag::S_IFLNK {
            FileType::Symlink
        } else if fmt == SFlag::S_IFCHR {
            if rdev == 0 {
                FileType::Whiteout
            } else {
                FileType::CharDev
            }
        } else if fmt == SFlag::S_IFBLK {
            FileType::BlockDev
        } else if fmt == SFlag::S_IFIFO {
            FileType::Fifo
        } else if fmt == SFlag::S_IFSOCK {
            FileType::Socket
        } else {
            FileType::File
        };
        Stat {
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: u64::try_from(st.st_size).unwrap_or(0),
            ino: st.st_ino,
            dev: st.st_dev,
            nlink: st.st_nlink,
            rdev,
            atime: (st.st_atime, nsec(st.st_atime_nsec)),
            mtime: (st.st_mtime, nsec(st.st_mtime_nsec)),
            ctime: (st.st_ctime, nsec(st.st_ctime_nsec)),
        }
    }
}

/// A failed system call and the path it was about.
#[derive(Debug)]
pub struct FsError {
    pub op: &'static str,
    pub path: PathBuf,
    pub errno: Errno,
}

impl FsError {
    pub fn new(op: &'static str, path: &Path, errno: Errno) -> FsError {
        FsError {
            op,
            path: path.to_path_buf(),
            errno,
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;

/// Adds the syscall name and path to a nix result.
pub trait Ctx<T> {
    fn ctx(self, op: &'static str, path: &Path) -> FsResult<T>;
}

impl<T> Ctx<T> for nix::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> FsResult<T> {
        self.map_err(|errno| FsError::new(op, path, errno))
    }
}

impl<T> Ctx<T> for std::io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> FsResult<T> {
        self.map_err(|e| {
            let errno = e.raw_os_error().map_or(Errno::EIO, Errno::from_raw);
            FsError::new(op, path, errno)
        })
    }
}

/// The resolution every workspace lookup uses: beneath the starting directory, no symlink
/// (hence no magic link) anywhere, not across a mount point.
fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
        | ResolveFlag::RESOLVE_NO_XDEV
}

/// Opens `rel` (relative; empty = `dir` itself) beneath `dir`, following no symlink, not
/// leaving `dir`, not crossing a mount. `O_CLOEXEC` is always added.
pub fn open_beneath(dir: BorrowedFd<'_>, rel: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(beneath());
    openat2(dir, rel, how)
}

/// Opens an absolute path (the workspace, the store) as an `O_PATH` directory, refusing
/// symlinks on the way: a canonical path has none, so one means something was swapped.
pub fn open_dir_nosymlinks(path: &Path) -> nix::Result<OwnedFd> {
    let root = openat(
        nix::fcntl::AT_FDCWD,
        "/",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        FileMode::empty(),
    )?;
    let rel = path.strip_prefix("/").map_err(|_| Errno::EINVAL)?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    openat2(root.as_fd(), rel, how)
}

/// Opens the child directory `name` of `dir` for reading, never through a symlink and never
/// onto another mount.
pub fn open_child_dir(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OwnedFd> {
    open_beneath(
        dir,
        Path::new(name),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
    )
}

/// `fstatat(AT_SYMLINK_NOFOLLOW)`; `None` when the entry does not exist.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<Option<Stat>> {
    match fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(Stat::from(&st))),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn stat_fd(fd: BorrowedFd<'_>) -> nix::Result<Stat> {
    fstat(fd).map(|st| Stat::from(&st))
}

/// Splits a relative path into its parent (possibly empty) and final component.
pub fn split(rel: &Path) -> (&Path, &OsStr) {
    let parent = rel.parent().unwrap_or(Path::new(""));
    let name = rel.file_name().unwrap_or(OsStr::new(""));
    (parent, name)
}

/// The names in a directory (no `.` and `..`), sorted by bytes.
pub fn list(dir: BorrowedFd<'_>) -> nix::Result<Vec<OsString>> {
    // A fresh open file description: reading must not share (or move) an offset.
    let fd = openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        FileMode::empty(),
    )?;
    let mut d = nix::dir::Dir::from_fd(fd)?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Whether a directory (opened for reading) carries `trusted.overlay.opaque = "y"`.
pub fn is_opaque(dir: BorrowedFd<'_>) -> nix::Result<bool> {
    let mut buf = [0_u8; 8];
    // SAFETY: the name is a NUL-terminated C string literal, `buf` is a live buffer of the
    // length passed, and the fd is borrowed for the duration of the call.
    let n = unsafe {
        libc::fgetxattr(
            dir.as_raw_fd(),
            c"trusted.overlay.opaque".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = Errno::last();
        return if e == Errno::ENODATA || e == Errno::ENOTSUP {
            Ok(false)
        } else {
            Err(e)
        };
    }
    let n = usize::try_from(n).unwrap_or(0);
    Ok(buf.get(..n) == Some(b"y".as_slice()))
}

/// Sets `trusted.overlay.opaque = "y"` on a directory opened for reading.
pub fn set_opaque(dir: BorrowedFd<'_>) -> nix::Result<()> {
    // SAFETY: name and value are live buffers of the lengths passed; the fd is borrowed.
    let r = unsafe {
        libc::fsetxattr(
            dir.as_raw_fd(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    Errno::result(r).map(drop)
}

/// Removes the opaque xattr (absent is fine).
pub fn clear_opaque(dir: BorrowedFd<'_>) -> nix::Result<()> {
    // SAFETY: the name is a NUL-terminated C string literal; the fd is borrowed.
    let r = unsafe { libc::fremovexattr(dir.as_raw_fd(), c"trusted.overlay.opaque".as_ptr()) };
    match Errno::result(r) {
        Ok(_) | Err(Errno::ENODATA) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A name for a temporary entry: unpredictable enough, and always created with `O_EXCL`
/// (or `mkdirat`/`symlinkat`, which fail on an existing name) and retried.
pub fn temp_name() -> OsString {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let r = RandomState::new().hash_one((n, std::process::id()));
    OsString::from(format!("{TEMP_PREFIX}{r:016x}"))
}

fn ts(t: (i64, u32)) -> TimeSpec {
    TimeSpec::new(t.0, i64::from(t.1))
}

/// Opens a regular file beneath `dir` for reading: never a symlink, never blocking on a
/// FIFO, and checked to be a regular file once open.
pub fn open_regular(dir: BorrowedFd<'_>, rel: &Path) -> nix::Result<File> {
    let fd = open_beneath(
        dir,
        rel,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
    )?;
    if stat_fd(fd.as_fd())?.kind != FileType::File {
        return Err(Errno::EINVAL);
    }
    Ok(File::from(fd))
}

/// SHA-256 of a regular file beneath `dir`, hex.
pub fn sha256_at(dir: BorrowedFd<'_>, rel: &Path) -> FsResult<String> {
    use sha2::Digest as _;
    let mut f = open_regular(dir, rel).ctx("openat2", rel)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0_u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).ctx("read", rel)?;
        if n == 0 {
            break;
        }
        h.update(buf.get(..n).unwrap_or_default());
    }
    Ok(hex(&h.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Reads at most `max` bytes of a regular file beneath `dir`.
pub fn read_at(dir: BorrowedFd<'_>, rel: &Path, max: u64) -> FsResult<Vec<u8>> {
    let f = open_regular(dir, rel).ctx("openat2", rel)?;
    let mut out = Vec::new();
    f.take(max).read_to_end(&mut out).ctx("read", rel)?;
    Ok(out)
}

/// A new regular file `name` in `dir`, 0600 until its owner and mode are set: never an
/// existing file, never through a symlink.
pub fn create_exclusive(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        FileMode::from_bits_truncate(0o600),
    )
}

/// Options of [`copy_tree`].
pub struct CopyOpts<'a> {
    /// Copy the opaque xattr of directories (persisting an upper tree).
    pub opaque: bool,
    /// Remove setuid/setgid bits from copied regular files.
    pub strip_setid: bool,
    /// fsync each regular file copied (persist syncs the whole file system once instead).
    pub fsync: bool,
    /// Called with each source entry (relative to the copy's root) before it is copied; an
    /// `Err` aborts the copy with that reason.
    pub check: &'a dyn Fn(&Path, &Stat) -> Result<(), String>,
    /// Bytes copied (regular files' sizes and symlink targets' lengths).
    pub bytes: u64,
    /// The most `bytes` may reach: beyond it the copy stops (a sparse file or hard links
    /// the source holds in little space must not fill the destination's disk).
    pub budget: Option<u64>,
    /// Hard links kept as hard links: each source file with more than one link is copied
    /// once, and linked to its first copy (`rel` paths, below `root` on the destination,
    /// which are the same as on the source).
    pub links: Option<Links<'a>>,
}

/// The hard links of a copy (see [`CopyOpts::links`]).
#[derive(Debug)]
pub struct Links<'a> {
    pub root: BorrowedFd<'a>,
    pub first: std::collections::HashMap<(u64, u64), std::path::PathBuf>,
}

impl std::fmt::Debug for CopyOpts<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOpts")
            .field("bytes", &self.bytes)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

/// Why a copy stopped.
#[derive(Debug)]
pub enum CopyError {
    Fs(FsError),
    Check(String),
}

impl From<FsError> for CopyError {
    fn from(e: FsError) -> CopyError {
        CopyError::Fs(e)
    }
}

/// Copies the entry `src_name` of `src_dir` to the new name `dst_name` in `dst_dir`,
/// recursively, never following a symlink: regular files, directories, symlinks, whiteouts,
/// FIFOs and devices (`mknodat`), with mode, owner and times. Sockets are skipped. Hard links
/// become separate files unless `opts.links` keeps them. `rel` is the source's path for
/// messages, `check` and `opts.links`.
pub fn copy_tree(
    src_dir: BorrowedFd<'_>,
    src_name: &OsStr,
    dst_dir: BorrowedFd<'_>,
    dst_name: &OsStr,
    rel: &Path,
    opts: &mut CopyOpts<'_>,
) -> Result<(), CopyError> {
    let Some(st) = lstat_at(src_dir, src_name).ctx("fstatat", rel)? else {
        return Err(CopyError::Fs(FsError::new("fstatat", rel, Errno::ENOENT)));
    };
    (opts.check)(rel, &st).map_err(CopyError::Check)?;
    match st.kind {
        FileType::File => {
            if st.nlink > 1
                && let Some(links) = opts.links.as_ref()
                && let Some(first) = links.first.get(&(st.dev, st.ino))
            {
                nix::unistd::linkat(
                    links.root,
                    first.as_path(),
                    dst_dir,
                    dst_name,
                    nix::fcntl::AtFlags::empty(),
                )
                .ctx("linkat", rel)?;
                return Ok(());
            }
            if let Some(budget) = opts.budget
                && opts.bytes.saturating_add(st.size) > budget
            {
                return Err(CopyError::Check(format!(
                    "{}: more than {budget} bytes in all, the transaction's limit",
                    rel.display()
                )));
            }
            let src = open_regular(src_dir, Path::new(src_name)).ctx("openat2", rel)?;
            let dst = create_exclusive(dst_dir, dst_name).ctx("openat", rel)?;
            let mut dst = File::from(dst);
            let mut src = src;
            // No more than the size it had: a file that grows meanwhile stops there.
            let n = std::io::copy(&mut std::io::Read::take(&mut src, st.size), &mut dst)
                .ctx("copy", rel)?;
            opts.bytes = opts.bytes.saturating_add(n);
            finish_file(&dst, &st, opts.strip_setid, opts.fsync, rel)?;
            if st.nlink > 1
                && let Some(links) = opts.links.as_mut()
            {
                links.first.insert((st.dev, st.ino), rel.to_path_buf());
            }
            Ok(())
        }
        FileType::Dir => {
            mkdirat(dst_dir, dst_name, FileMode::from_bits_truncate(0o700)).ctx("mkdirat", rel)?;
            let dst = open_child_dir(dst_dir, dst_name).ctx("openat2", rel)?;
            let src = open_child_dir(src_dir, src_name).ctx("openat2", rel)?;
            if stat_fd(src.as_fd()).ctx("fstat", rel)?.dev != st.dev {
                return Err(CopyError::Fs(FsError::new("openat2", rel, Errno::EXDEV)));
            }
            if opts.opaque && is_opaque(src.as_fd()).ctx("fgetxattr", rel)? {
                set_opaque(dst.as_fd()).ctx("fsetxattr", rel)?;
            }
            for name in list(src.as_fd()).ctx("getdents", rel)? {
                copy_tree(
                    src.as_fd(),
                    &name,
                    dst.as_fd(),
                    &name,
                    &rel.join(&name),
                    opts,
                )?;
            }
            fchown(
                dst.as_fd(),
                Some(Uid::from_raw(st.uid)),
                Some(Gid::from_raw(st.gid)),
            )
            .ctx("fchown", rel)?;
            nix::sys::stat::fchmod(dst.as_fd(), FileMode::from_bits_truncate(st.mode))
                .ctx("fchmod", rel)?;
            futimens(dst.as_fd(), &ts(st.atime), &ts(st.mtime)).ctx("futimens", rel)?;
            Ok(())
        }
        FileType::Symlink => {
            let target = readlinkat(src_dir, src_name).ctx("readlinkat", rel)?;
            symlinkat(target.as_os_str(), dst_dir, dst_name).ctx("symlinkat", rel)?;
            opts.bytes = opts
                .bytes
                .saturating_add(u64::try_from(target.len()).unwrap_or(0));
            set_link_meta(dst_dir, dst_name, &st, rel)?;
            Ok(())
        }
        FileType::Whiteout | FileType::Fifo | FileType::CharDev | FileType::BlockDev => {
            let kind = match st.kind {
                FileType::Fifo => SFlag::S_IFIFO,
                FileType::BlockDev => SFlag::S_IFBLK,
                FileType::Whiteout
                | FileType::CharDev
                | FileType::File
                | FileType::Dir
                | FileType::Symlink
                | FileType::Socket => SFlag::S_IFCHR,
            };
            mknodat(
                dst_dir,
                dst_name,
                kind,
                FileMode::from_bits_truncate(st.mode & 0o777),
                st.rdev,
            )
            .ctx("mknodat", rel)?;
            set_link_meta(dst_dir, dst_name, &st, rel)?;
            Ok(())
        }
        FileType::Socket => {
            tracing::warn!(path = %rel.display(), "socket not copied");
            Ok(())
        }
    }
}

/// Owner and times of a just-created entry that is not opened (symlink, node), by name and
/// without following it.
fn set_link_meta(dir: BorrowedFd<'_>, name: &OsStr, st: &Stat, rel: &Path) -> FsResult<()> {
    fchownat(
        dir,
        name,
        Some(Uid::from_raw(st.uid)),
        Some(Gid::from_raw(st.gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .ctx("fchownat", rel)?;
    nix::sys::stat::utimensat(
        dir,
        name,
        &ts(st.atime),
        &ts(st.mtime),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .ctx("utimensat", rel)
}

/// Owner, mode, times and (`fsync`) fsync of a regular file just written. The owner first:
/// `fchown` clears setuid bits.
pub fn finish_file(
    f: &File,
    st: &Stat,
    strip_setid: bool,
    fsync: bool,
    rel: &Path,
) -> FsResult<()> {
    fchown(
        f.as_fd(),
        Some(Uid::from_raw(st.uid)),
        Some(Gid::from_raw(st.gid)),
    )
    .ctx("fchown", rel)?;
    let mode = if strip_setid {
        st.mode & !(libc::S_ISUID | libc::S_ISGID)
    } else {
        st.mode
    };
    nix::sys::stat::fchmod(f.as_fd(), FileMode::from_bits_truncate(mode)).ctx("fchmod", rel)?;
    futimens(f.as_fd(), &ts(st.atime), &ts(st.mtime)).ctx("futimens", rel)?;
    if fsync {
        f.sync_all().ctx("fsync", rel)?;
    }
    Ok(())
}

/// Removes the entry `name` of `dir`, recursively for a directory, never following a symlink
/// and never descending onto another mount.
pub fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr, rel: &Path) -> FsResult<()> {
    let Some(st) = lstat_at(dir, name).ctx("fstatat", rel)? else {
        return Ok(());
    };
    if st.kind == FileType::Dir {
        let sub = open_child_dir(dir, name).ctx("openat2", rel)?;
        for child in list(sub.as_fd()).ctx("getdents", rel)? {
            remove_tree(sub.as_fd(), &child, &rel.join(&child))?;
        }
        unlinkat(dir, name, UnlinkatFlags::RemoveDir).ctx("unlinkat", rel)
    } else {
        unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).ctx("unlinkat", rel)
    }
}

/// Writes `data` to `path` (in the store) through a temporary file and a rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
