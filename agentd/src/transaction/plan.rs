//! Reading the persisted upper layer against the real workspace: the list of upper entries
//! (with what the workspace has at the same path) and the changes they amount to.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::File,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use nix::{errno::Errno, fcntl::OFlag};
use serde::Serialize;

use super::{
    Transaction, TxError,
    fsx::{self, Ctx as _, FileType, Stat},
    pathser, selected,
};

/// Larger files are not diffed line by line.
pub(super) const DIFF_MAX: u64 = 1024 * 1024;
/// How much of a file decides whether it is text.
pub(super) const SNIFF: usize = 8 * 1024;

/// One entry of the upper layer, or a real entry an opaque directory hides.
#[derive(Debug, Clone)]
pub(super) struct Item {
    pub rel: PathBuf,
    /// Upper's entry; `None` for a real child of an opaque directory that upper does not
    /// have (it is deleted, like a whiteout).
    pub upper: Option<Stat>,
    /// The real entry at the same path when the walk saw it (`None`: absent, or below a
    /// directory the workspace does not have).
    pub real: Option<Stat>,
}

impl Item {
    pub fn upper_kind(&self) -> FileType {
        self.upper.map_or(FileType::Whiteout, |s| s.kind)
    }
}

/// The workspace, as an `O_PATH` fd, opened without following any symlink.
/// With `id`, the directory must be the one the agent ran in (device and inode at launch):
/// a path renamed since names another directory, and nothing is written there.
pub(super) fn open_workspace(workspace: &Path, id: Option<(u64, u64)>) -> Result<OwnedFd, TxError> {
    let fd = fsx::open_dir_nosymlinks(workspace).map_err(|e| TxError::Workspace {
        path: workspace.to_path_buf(),
        source: e.into(),
    })?;
    if let Some(want) = id {
        let st = fsx::stat_fd(fd.as_fd()).map_err(|e| TxError::Workspace {
            path: workspace.to_path_buf(),
            source: e.into(),
        })?;
        if (st.dev, st.ino) != want {
            return Err(TxError::Workspace {
                path: workspace.to_path_buf(),
                source: std::io::Error::other(
                    "this path names another directory than the one the agent ran in (moved or replaced since): nothing is written there",
                ),
            });
        }
    }
    Ok(fd)
}

/// The upper directory opened for reading, or `None` if there is none (nothing persisted,
/// or all committed).
pub(super) fn open_upper(upper: &Path) -> Result<Option<File>, TxError> {
    match File::open(upper) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TxError::io("open", upper, e)),
    }
}

/// Every upper entry in pre-order (a directory before what it holds), names sorted, with
/// the real entry at the same path.
pub(super) fn walk(upper: BorrowedFd<'_>, ws: BorrowedFd<'_>) -> Result<Vec<Item>, TxError> {
    let mut items = Vec::new();
    walk_dir(upper, Some(ws), Path::new(""), false, &mut items)?;
    Ok(items)
}

fn walk_dir(
    upper: BorrowedFd<'_>,
    real: Option<BorrowedFd<'_>>,
    rel: &Path,
    opaque: bool,
    items: &mut Vec<Item>,
) -> Result<(), TxError> {
    let names = fsx::list(upper).ctx("getdents", rel)?;
    for name in &names {
        let child_rel = rel.join(name);
        let Some(ust) = fsx::lstat_at(upper, name).ctx("fstatat", &child_rel)? else {
            continue;
        };
        let rst = match real {
            Some(r) => fsx::lstat_at(r, name).ctx("fstatat", &child_rel)?,
            None => None,
        };
        items.push(Item {
            rel: child_rel.clone(),
            upper: Some(ust),
            real: rst,
        });
        if ust.kind == FileType::Dir {
            let sub = fsx::open_child_dir(upper, name).ctx("openat2", &child_rel)?;
            let sub_opaque = fsx::is_opaque(sub.as_fd()).ctx("fgetxattr", &child_rel)?;
            let sub_real = match (real, rst) {
                (Some(r), Some(st)) if st.kind == FileType::Dir => Some(
                    fsx::open_beneath(r, Path::new(name), OFlag::O_PATH | OFlag::O_DIRECTORY)
                        .ctx("openat2", &child_rel)?,
                ),
                _ => None,
            };
            walk_dir(
                sub.as_fd(),
                sub_real.as_ref().map(|f| f.as_fd()),
                &child_rel,
                sub_opaque,
                items,
            )?;
        }
    }
    if let (true, Some(r)) = (opaque, real) {
        let have: HashSet<&std::ffi::OsString> = names.iter().collect();
        for name in fsx::list(r).ctx("getdents", rel)? {
            if have.contains(&name) {
                continue;
            }
            let child_rel = rel.join(&name);
            let rst = fsx::lstat_at(r, &name).ctx("fstatat", &child_rel)?;
            if rst.is_some() {
                items.push(Item {
                    rel: child_rel,
                    upper: None,
                    real: rst,
                });
            }
        }
    }
    Ok(())
}

/// One side of a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub file_type: FileType,
    /// Permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Bytes (a symlink: its target's length).
    pub size: u64,
    /// SHA-256 of a regular file, when it was computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// A symlink's target.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "pathser::opt::serialize"
    )]
    pub target: Option<PathBuf>,
}

impl Entry {
    fn new(st: &Stat) -> Entry {
        Entry {
            file_type: st.kind,
            mode: st.mode,
            uid: st.uid,
            gid: st.gid,
            size: st.size,
            sha256: None,
            target: None,
        }
    }
}

/// What happened to a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChangeKind {
    Added,
    /// Contents (or a symlink's target) changed; the mode may have too.
    Modified,
    Deleted,
    /// A deleted file and an added one with the same contents.
    Renamed {
        #[serde(with = "pathser")]
        from: PathBuf,
    },
    /// Only the permission bits changed.
    ModeChanged {
        from: u32,
        to: u32,
    },
    /// Only the owner changed: (uid, gid).
    OwnerChanged {
        from: (u32, u32),
        to: (u32, u32),
    },
    /// Something of another type replaced it.
    TypeChanged {
        from: FileType,
    },
}

/// One changed path of a transaction.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// Relative to the workspace.
    #[serde(with = "pathser")]
    pub path: PathBuf,
    #[serde(flatten)]
    pub kind: ChangeKind,
    /// The type after the change (before it, for a deletion).
    pub file_type: FileType,
    /// What the workspace has (`None`: absent).
    pub old: Option<Entry>,
    /// What the agent left (`None`: deleted).
    pub new: Option<Entry>,
    /// Lines added and removed, for text files small enough to diff.
    pub insertions: Option<u64>,
    pub deletions: Option<u64>,
    /// Why commit would leave this path alone, if it would.
    pub conflict: Option<String>,
}

/// Reads both sides of changes: the workspace (old) and the persisted upper (new).
pub(super) struct Sides {
    pub ws: OwnedFd,
    pub upper: Option<File>,
    /// The transaction's owner: the workspace's files are shown only as far as they
    /// could read them (the store reads them as root).
    pub owner: u32,
}

impl Sides {
    pub fn open(tx: &Transaction) -> Result<Sides, TxError> {
        Ok(Sides {
            ws: open_workspace(&tx.meta.workspace, tx.meta.workspace_id)?,
            upper: open_upper(&tx.upper())?,
            owner: tx.meta.owner_uid,
        })
    }

    /// Whether the workspace file `old` may be shown (its contents) to the owner: owned by
    /// them and readable by its owner, or readable by anyone. Group permissions are not
    /// counted (the owner's groups are not known here): such a file shows as sizes and
    /// hashes only.
    pub fn may_show(&self, old: Option<&Entry>) -> bool {
        old.is_none_or(|e| {
            self.owner == 0 || (e.uid == self.owner && e.mode & 0o400 != 0) || e.mode & 0o004 != 0
        })
    }

    fn upper_fd(&self, rel: &Path) -> Result<BorrowedFd<'_>, TxError> {
        self.upper
            .as_ref()
            .map(|f| f.as_fd())
            .ok_or_else(|| TxError::io("open", rel, std::io::Error::from(Errno::ENOENT)))
    }

    pub fn old_bytes(&self, rel: &Path, max: u64) -> Result<Vec<u8>, TxError> {
        Ok(fsx::read_at(self.ws.as_fd(), rel, max)?)
    }

    pub fn new_bytes(&self, rel: &Path, max: u64) -> Result<Vec<u8>, TxError> {
        Ok(fsx::read_at(self.upper_fd(rel)?, rel, max)?)
    }

    pub fn old_sha(&self, rel: &Path) -> Result<String, TxError> {
        Ok(fsx::sha256_at(self.ws.as_fd(), rel)?)
    }

    pub fn new_sha(&self, rel: &Path) -> Result<String, TxError> {
        Ok(fsx::sha256_at(self.upper_fd(rel)?, rel)?)
    }

    fn link_at(dir: BorrowedFd<'_>, rel: &Path) -> Result<PathBuf, TxError> {
        let (parent, name) = fsx::split(rel);
        let pfd = fsx::open_beneath(dir, parent, OFlag::O_PATH | OFlag::O_DIRECTORY)
            .ctx("openat2", parent)?;
        let t = nix::fcntl::readlinkat(pfd.as_fd(), name).ctx("readlinkat", rel)?;
        Ok(PathBuf::from(t))
    }

    pub fn old_target(&self, rel: &Path) -> Result<PathBuf, TxError> {
        Self::link_at(self.ws.as_fd(), rel)
    }

    pub fn new_target(&self, rel: &Path) -> Result<PathBuf, TxError> {
        Self::link_at(self.upper_fd(rel)?, rel)
    }

    /// The real entry at `rel` and its parent's stat (`None` when the parent cannot be
    /// reached without a symlink or is missing: the error says why).
    pub fn real_parent(&self, rel: &Path) -> Result<Stat, fsx::FsError> {
        let (parent, _) = fsx::split(rel);
        let pfd = fsx::open_beneath(self.ws.as_fd(), parent, OFlag::O_PATH | OFlag::O_DIRECTORY)
            .ctx("openat2", parent)?;
        fsx::stat_fd(pfd.as_fd()).ctx("fstat", parent)
    }
}

/// Decides conflicts: `launched` and the ctimes agentd itself gave directories.
pub(super) struct Clock<'a> {
    pub launched: (i64, u32),
    pub known: &'a BTreeMap<String, (i64, u32)>,
}

pub(super) fn key(rel: &Path) -> String {
    super::printable_path(rel)
}

impl Clock<'_> {
    /// Whether `st` (the entry at `rel`) changed since launch, not by agentd.
    pub fn changed(&self, rel: &Path, st: &Stat) -> bool {
        st.ctime > self.launched && self.known.get(&key(rel)) != Some(&st.ctime)
    }
}

pub(super) const CHANGED: &str = "changed in the workspace since launch";
pub(super) const PARENT_CHANGED: &str =
    "its directory changed in the workspace since launch (it may have been deleted there)";

/// Why an item conflicts, seen before committing: `None` when commit would apply it.
fn conflict_of(sides: &Sides, clock: &Clock<'_>, item: &Item) -> Option<String> {
    match item.real {
        Some(r) => clock.changed(&item.rel, &r).then(|| CHANGED.to_string()),
        None if item.upper_kind() == FileType::Whiteout => None,
        None => match sides.real_parent(&item.rel) {
            Ok(pst) => clock
                .changed(fsx::split(&item.rel).0, &pst)
                .then(|| PARENT_CHANGED.to_string()),
            // The parent is missing because upper creates it: decided there.
            Err(e) if e.errno == Errno::ENOENT => None,
            Err(e) => Some(refusal(&e)),
        },
    }
}

/// A reason for an entry commit cannot reach.
pub(super) fn refusal(e: &fsx::FsError) -> String {
    let path = super::printable_path(&e.path);
    if e.errno == Errno::ELOOP {
        format!("{path} in the workspace is or contains a symlink: refusing to follow it")
    } else if e.errno == Errno::EXDEV {
        format!("{path} in the workspace crosses a mount point: refusing")
    } else if e.errno == Errno::ENOTDIR {
        format!("{path} in the workspace is not a directory")
    } else if e.errno == Errno::ENOENT {
        format!("{path} is missing in the workspace")
    } else {
        format!("cannot {} {path}: {}", e.op, std::io::Error::from(e.errno))
    }
}

/// Whether a regular file of upper has the same contents as the real one.
pub(super) fn same_contents(
    sides: &Sides,
    rel: &Path,
    u: &Stat,
    r: &Stat,
) -> Result<bool, TxError> {
    Ok(u.size == r.size && sides.new_sha(rel)? == sides.old_sha(rel)?)
}

/// The change an item amounts to, or `None` when upper's entry equals the real one.
pub(super) fn classify(sides: &Sides, item: &Item) -> Result<Option<ChangeKind>, TxError> {
    let Some(u) = item.upper else {
        return Ok(item.real.map(|_| ChangeKind::Deleted));
    };
    let Some(r) = item.real else {
        return Ok(match u.kind {
            FileType::Whiteout => None,
            FileType::File
            | FileType::Dir
            | FileType::Symlink
            | FileType::Fifo
            | FileType::Socket
            | FileType::CharDev
            | FileType::BlockDev => Some(ChangeKind::Added),
        });
    };
    if u.kind == FileType::Whiteout {
        return Ok(Some(ChangeKind::Deleted));
    }
    if u.kind != r.kind {
        return Ok(Some(ChangeKind::TypeChanged { from: r.kind }));
    }
    let meta = |modified: bool| {
        if modified {
            Some(ChangeKind::Modified)
        } else if u.mode != r.mode {
            Some(ChangeKind::ModeChanged {
                from: r.mode,
                to: u.mode,
            })
        } else if (u.uid, u.gid) != (r.uid, r.gid) {
            Some(ChangeKind::OwnerChanged {
                from: (r.uid, r.gid),
                to: (u.uid, u.gid),
            })
        } else {
            None
        }
    };
    Ok(match u.kind {
        FileType::File => meta(!same_contents(sides, &item.rel, &u, &r)?),
        FileType::Symlink => {
            let changed = sides.new_target(&item.rel)? != sides.old_target(&item.rel)?;
            // A symlink's mode means nothing; its owner is kept.
            changed.then_some(ChangeKind::Modified)
        }
        FileType::Dir => meta(false),
        FileType::Fifo | FileType::CharDev | FileType::BlockDev => meta(u.rdev != r.rdev),
        FileType::Socket | FileType::Whiteout => None,
    })
}

/// Every entry below a real directory (pre-order), for listing what deleting it deletes.
fn real_subtree(
    ws: BorrowedFd<'_>,
    rel: &Path,
    out: &mut Vec<(PathBuf, Stat)>,
) -> Result<(), TxError> {
    let dir =
        fsx::open_beneath(ws, rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY).ctx("openat2", rel)?;
    for name in fsx::list(dir.as_fd()).ctx("getdents", rel)? {
        let child = rel.join(&name);
        if let Some(st) = fsx::lstat_at(dir.as_fd(), &name).ctx("fstatat", &child)? {
            out.push((child.clone(), st));
            if st.kind == FileType::Dir {
                real_subtree(ws, &child, out)?;
            }
        }
    }
    Ok(())
}

fn entry_with_detail(sides: &Sides, rel: &Path, st: &Stat, new: bool) -> Result<Entry, TxError> {
    let mut e = Entry::new(st);
    match st.kind {
        FileType::Symlink => {
            e.target = Some(if new {
                sides.new_target(rel)?
            } else {
                sides.old_target(rel)?
            });
        }
        FileType::File if new => e.sha256 = Some(sides.new_sha(rel)?),
        FileType::File
        | FileType::Dir
        | FileType::Whiteout
        | FileType::Fifo
        | FileType::Socket
        | FileType::CharDev
        | FileType::BlockDev => {}
    }
    Ok(e)
}

/// Whether bytes (the start of a file) are text: no NUL, valid UTF-8 (a character cut at
/// the end of the sample is fine).
pub(super) fn is_text(bytes: &[u8]) -> bool {
    let sample = bytes.get(..SNIFF.min(bytes.len())).unwrap_or_default();
    if sample.contains(&0) {
        return false;
    }
    match std::str::from_utf8(sample) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none() && sample.len() == SNIFF,
    }
}

fn count_lines(b: &[u8]) -> u64 {
    let n = b.iter().filter(|&&c| c == b'\n').count();
    let extra = usize::from(!b.is_empty() && b.last() != Some(&b'\n'));
    u64::try_from(n + extra).unwrap_or(u64::MAX)
}

/// Lines added and removed between two files' contents, when both are text.
fn line_stats(old: Option<&[u8]>, new: Option<&[u8]>) -> Option<(u64, u64)> {
    if old.is_some_and(|b| !is_text(b)) || new.is_some_and(|b| !is_text(b)) {
        return None;
    }
    match (old, new) {
        (None, None) => None,
        (None, Some(n)) => Some((count_lines(n), 0)),
        (Some(o), None) => Some((0, count_lines(o))),
        (Some(o), Some(n)) => {
            let o = String::from_utf8_lossy(o);
            let n = String::from_utf8_lossy(n);
            let diff = similar::TextDiff::from_lines(o.as_ref(), n.as_ref());
            let (mut ins, mut del) = (0_u64, 0_u64);
            for op in diff.ops() {
                for change in diff.iter_changes(op) {
                    match change.tag() {
                        similar::ChangeTag::Insert => ins += 1,
                        similar::ChangeTag::Delete => del += 1,
                        similar::ChangeTag::Equal => {}
                    }
                }
            }
            Some((ins, del))
        }
    }
}

impl Transaction {
    /// The changes the persisted upper makes to the workspace: `only` (paths relative to
    /// the workspace, or absolute inside it) limits them; empty = all. Sorted by path, a
    /// directory before what it holds.
    pub fn changes(&self, only: &[PathBuf]) -> Result<Vec<Change>, TxError> {
        let only = self.relative_paths(only)?;
        let sides = Sides::open(self)?;
        let Some(upper) = sides.upper.as_ref() else {
            return Ok(Vec::new());
        };
        let items = walk(upper.as_fd(), sides.ws.as_fd())?;
        let known = self.known_ctimes();
        let clock = Clock {
            launched: self.meta.launched,
            known: &known,
        };
        let mut out: Vec<Change> = Vec::new();
        for item in &items {
            let Some(kind) = classify(&sides, item)? else {
                continue;
            };
            let conflict = conflict_of(&sides, &clock, item);
            let old = match item.real {
                Some(r) => Some(entry_with_detail(&sides, &item.rel, &r, false)?),
                None => None,
            };
            let new = match item.upper {
                Some(u) if u.kind != FileType::Whiteout => {
                    Some(entry_with_detail(&sides, &item.rel, &u, true)?)
                }
                Some(_) | None => None,
            };
            let file_type = new
                .as_ref()
                .or(old.as_ref())
                .map_or(FileType::File, |e| e.file_type);
            let real_dir_goes = item.real.is_some_and(|r| r.kind == FileType::Dir)
                && new.as_ref().is_none_or(|n| n.file_type != FileType::Dir);
            out.push(Change {
                path: item.rel.clone(),
                kind,
                file_type,
                old,
                new,
                insertions: None,
                deletions: None,
                conflict: conflict.clone(),
            });
            if real_dir_goes {
                let mut sub = Vec::new();
                real_subtree(sides.ws.as_fd(), &item.rel, &mut sub)?;
                for (rel, st) in sub {
                    let child_conflict = if clock.changed(&rel, &st) {
                        Some(CHANGED.to_string())
                    } else {
                        conflict.clone()
                    };
                    out.push(Change {
                        kind: ChangeKind::Deleted,
                        file_type: st.kind,
                        old: Some(entry_with_detail(&sides, &rel, &st, false)?),
                        new: None,
                        insertions: None,
                        deletions: None,
                        conflict: child_conflict,
                        path: rel,
                    });
                }
            }
        }
        detect_renames(&sides, &mut out)?;
        out.retain(|c| {
            selected(&only, &c.path)
                || matches!(&c.kind, ChangeKind::Renamed { from } if selected(&only, from))
        });
        for c in &mut out {
            if matches!(c.kind, ChangeKind::Renamed { .. }) {
                // Same contents by construction.
                (c.insertions, c.deletions) = (Some(0), Some(0));
                continue;
            }
            let old_file = c
                .old
                .as_ref()
                .is_some_and(|o| o.file_type == FileType::File);
            let new_file = c
                .new
                .as_ref()
                .is_some_and(|n| n.file_type == FileType::File);
            let small = |e: &Option<Entry>| e.as_ref().is_none_or(|e| e.size <= DIFF_MAX);
            if !(old_file || new_file)
                || !small(&c.old)
                || !small(&c.new)
                || !sides.may_show(c.old.as_ref())
            {
                continue;
            }
            let old = if old_file {
                Some(sides.old_bytes(&c.path, DIFF_MAX)?)
            } else {
                None
            };
            let new = if new_file {
                Some(sides.new_bytes(&c.path, DIFF_MAX)?)
            } else {
                None
            };
            if let Some((i, d)) = line_stats(old.as_deref(), new.as_deref()) {
                (c.insertions, c.deletions) = (Some(i), Some(d));
            }
        }
        Ok(out)
    }
}

/// Pairs a deleted regular file with an added one of the same size and SHA-256 (size > 0)
/// into one `Renamed` change at the new path.
fn detect_renames(sides: &Sides, changes: &mut Vec<Change>) -> Result<(), TxError> {
    let mut added: HashMap<(u64, String), Vec<usize>> = HashMap::new();
    for (i, c) in changes.iter().enumerate() {
        if c.kind == ChangeKind::Added
            && let Some(n) = &c.new
            && n.file_type == FileType::File
            && n.size > 0
            && let Some(sha) = &n.sha256
        {
            added.entry((n.size, sha.clone())).or_default().push(i);
        }
    }
    if added.is_empty() {
        return Ok(());
    }
    let sizes: HashSet<u64> = added.keys().map(|k| k.0).collect();
    let mut remove = HashSet::new();
    for i in 0..changes.len() {
        let Some(c) = changes.get(i) else { continue };
        let Some(old) = c.old.as_ref() else { continue };
        if c.kind != ChangeKind::Deleted
            || old.file_type != FileType::File
            || !sizes.contains(&old.size)
        {
            continue;
        }
        let sha = sides.old_sha(&c.path)?;
        let size = old.size;
        let from = c.path.clone();
        let conflict = c.conflict.clone();
        let mut old_entry = old.clone();
        old_entry.sha256 = Some(sha.clone());
        let Some(targets) = added.get_mut(&(size, sha)) else {
            continue;
        };
        if targets.is_empty() {
            continue;
        }
        let t = targets.remove(0);
        if let Some(target) = changes.get_mut(t) {
            target.kind = ChangeKind::Renamed { from };
            target.old = Some(old_entry);
            if target.conflict.is_none() {
                target.conflict = conflict;
            }
            remove.insert(i);
        }
    }
    let mut i = 0;
    changes.retain(|_| {
        let keep = !remove.contains(&i);
        i += 1;
        keep
    });
    Ok(())
}
