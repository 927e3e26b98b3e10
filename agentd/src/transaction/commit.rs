//! Commit and undo (the rules are in the module documentation of `transaction`).

use std::{
    collections::{BTreeMap, HashSet},
    ffi::{OsStr, OsString},
    fs::File,
    io::{BufRead as _, Write as _},
    os::{
        fd::{AsFd as _, BorrowedFd, OwnedFd},
        unix::fs::DirBuilderExt as _,
    },
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{OFlag, readlinkat, renameat},
    sys::stat::{Mode as FileMode, SFlag, fchmod, mkdirat, mknodat},
    unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, symlinkat, unlinkat},
};
use serde::{Deserialize, Serialize};

use super::{
    COMMITS, State, Transaction, TxError,
    fsx::{self, Ctx as _, FileType, FsError, Stat},
    io_err, pathser,
    plan::{self, CHANGED, Clock, Item, PARENT_CHANGED, Sides, key, refusal},
    printable_path, selected,
};

/// What was at a path before a commit changed it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Before {
    Absent,
    /// A copy is in `saved/<index>`.
    Saved {
        file_type: FileType,
    },
    /// A directory kept (its mode or owner changed).
    Dir {
        mode: u32,
        uid: u32,
        gid: u32,
    },
}

/// What a commit left at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum After {
    Absent,
    Present {
        file_type: FileType,
        ino: u64,
        dev: u64,
        ctime: (i64, u32),
    },
}

impl After {
    fn of(st: Option<Stat>) -> After {
        match st {
            None => After::Absent,
            Some(st) => After::Present {
                file_type: st.kind,
                ino: st.ino,
                dev: st.dev,
                ctime: st.ctime,
            },
        }
    }

    /// Whether the current entry is still what the commit left (a directory's ctime moves
    /// with what it holds, so only its identity counts).
    fn matches(self, cur: Option<Stat>) -> bool {
        match (self, cur) {
            (After::Absent, None) => true,
            (
                After::Present {
                    file_type,
                    ino,
                    dev,
                    ctime,
                },
                Some(c),
            ) => {
                c.kind == file_type
                    && c.ino == ino
                    && c.dev == dev
                    && (file_type == FileType::Dir || c.ctime == ctime)
            }
            (After::Absent, Some(_)) | (After::Present { .. }, None) => false,
        }
    }
}

/// One path of a commit's manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    /// Names the saved copy: `saved/<index>`.
    index: usize,
    #[serde(with = "pathser")]
    path: PathBuf,
    before: Before,
    /// `None` in the journal line written before the change was made.
    after: Option<After>,
}

const MANIFEST: &str = "manifest.json";
const JOURNAL: &str = "manifest.jsonl";
const SAVED: &str = "saved";

/// What commit or undo did to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Created,
    Replaced,
    Deleted,
    /// A directory's mode or owner.
    Updated,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Created => "created",
            Action::Replaced => "replaced",
            Action::Deleted => "deleted",
            Action::Updated => "updated",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    #[serde(with = "pathser")]
    pub path: PathBuf,
    pub action: Action,
    pub file_type: FileType,
}

/// A path left alone, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Issue {
    #[serde(with = "pathser")]
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CommitReport {
    /// The commit's number (for undo), `None` when nothing was written.
    pub commit: Option<u32>,
    pub committed: Vec<Applied>,
    /// Left in the transaction: conflicts and refusals.
    pub conflicts: Vec<Issue>,
    /// Upper entries identical to the workspace, dropped.
    pub unchanged: usize,
    pub state: State,
}

impl CommitReport {
    /// The paths left in the transaction.
    pub fn conflict_paths(&self) -> Vec<PathBuf> {
        self.conflicts.iter().map(|c| c.path.clone()).collect()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct UndoReport {
    pub commit: u32,
    pub restored: Vec<Applied>,
    /// Paths not restored (changed since the commit, ...); the commit keeps them.
    pub refused: Vec<Issue>,
    pub state: State,
}

enum Outcome {
    Done(Applied),
    Same,
    Conflict(String),
}

/// Directories of the workspace a commit or undo changed, and whether each was unchanged
/// since launch before (only then is its new ctime recorded as agentd's own).
#[derive(Default)]
struct Touched(BTreeMap<PathBuf, bool>);

impl Touched {
    /// Whether agentd changed `rel` in this run, and it had been unchanged before.
    fn is_clean(&self, rel: &Path) -> bool {
        self.0.get(rel) == Some(&true)
    }

    fn add(&mut self, rel: &Path, clean: bool) {
        self.0.entry(rel.to_path_buf()).or_insert(clean);
    }

    /// Records the touched directories' ctimes as agentd's.
    fn record(&self, ws: BorrowedFd<'_>, known: &mut BTreeMap<String, (i64, u32)>) {
        for (rel, clean) in &self.0 {
            if !clean {
                continue;
            }
            let st = fsx::open_beneath(ws, rel, OFlag::O_PATH | OFlag::O_DIRECTORY)
                .and_then(|fd| fsx::stat_fd(fd.as_fd()));
            if let Ok(st) = st {
                known.insert(key(rel), st.ctime);
            }
        }
    }
}

struct Committer<'a> {
    sides: &'a Sides,
    upper: BorrowedFd<'a>,
    clock: Clock<'a>,
    saved: OwnedFd,
    journal: File,
    journal_path: PathBuf,
    next_index: usize,
    records: Vec<Record>,
    touched: Touched,
}

/// Runs `f` with a fresh temporary name until the name was free.
/// Renames the temporary `tmp` (made ready: `ready`) over `name` in `pfd`, removing the
/// real directory there first (`real_is_dir`); on any failure the temporary is removed.
fn put_in_place(
    pfd: BorrowedFd<'_>,
    tmp: &OsStr,
    name: &OsStr,
    rel: &Path,
    real_is_dir: bool,
    ready: fsx::FsResult<()>,
) -> fsx::FsResult<()> {
    let moved = ready
        .and_then(|()| {
            if real_is_dir {
                fsx::remove_tree(pfd, name, rel)
            } else {
                Ok(())
            }
        })
        .and_then(|()| renameat(pfd, tmp, pfd, name).ctx("renameat", rel));
    if moved.is_err() {
        let _ = unlinkat(pfd, tmp, UnlinkatFlags::NoRemoveDir);
    }
    moved
}

fn with_temp<T>(mut f: impl FnMut(&OsStr) -> nix::Result<T>) -> nix::Result<(OsString, T)> {
    let mut last = Errno::EEXIST;
    for _ in 0..16 {
        let name = fsx::temp_name();
        match f(&name) {
            Ok(v) => return Ok((name, v)),
            Err(Errno::EEXIST) => last = Errno::EEXIST,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

impl Committer<'_> {
    fn ws(&self) -> BorrowedFd<'_> {
        self.sides.ws.as_fd()
    }

    fn journal(&mut self, rec: &Record) -> Result<(), TxError> {
        let mut line = serde_json::to_vec(rec).map_err(|source| TxError::Json {
            path: self.journal_path.clone(),
            source,
        })?;
        line.push(b'\n');
        self.journal
            .write_all(&line)
            .map_err(io_err("write", &self.journal_path))
    }

    /// Commits one upper entry.
    fn apply(&mut self, item: &Item) -> Result<Outcome, TxError> {
        let rel = item.rel.as_path();
        let (parent, name) = fsx::split(rel);
        let Some(u) = item.upper else {
            return Ok(Outcome::Same);
        };
        let pfd = match fsx::open_beneath(self.ws(), parent, OFlag::O_PATH | OFlag::O_DIRECTORY) {
            Ok(fd) => fd,
            Err(e) => {
                return Ok(Outcome::Conflict(refusal(&FsError::new(
                    "openat2", parent, e,
                ))));
            }
        };
        let pst = fsx::stat_fd(pfd.as_fd()).ctx("fstat", parent)?;
        let real = fsx::lstat_at(pfd.as_fd(), name).ctx("fstatat", rel)?;
        // A directory this commit already changed is not a conflict for what follows.
        let parent_changed = self.clock.changed(parent, &pst) && !self.touched.is_clean(parent);
        let now = Item {
            rel: rel.to_path_buf(),
            upper: Some(u),
            real,
        };
        if plan::classify(self.sides, &now)?.is_none() {
            return Ok(Outcome::Same);
        }
        match real {
            Some(r) if self.clock.changed(rel, &r) => {
                return Ok(Outcome::Conflict(CHANGED.to_string()));
            }
            Some(_) => {}
            None if parent_changed => {
                return Ok(Outcome::Conflict(PARENT_CHANGED.to_string()));
            }
            None => {}
        }
        match u.kind {
            FileType::File | FileType::Dir | FileType::Symlink | FileType::Whiteout => {}
            FileType::Fifo | FileType::Socket | FileType::CharDev | FileType::BlockDev => {
                return Ok(Outcome::Conflict(format!(
                    "a {} is not committed (only files, directories and symlinks are)",
                    u.kind.name()
                )));
            }
        }
        let parent_clean = !parent_changed;

        // Save what is there, for undo.
        let index = self.next_index;
        self.next_index += 1;
        let before = match real {
            None => Before::Absent,
            Some(r) if r.kind == FileType::Dir && u.kind == FileType::Dir => Before::Dir {
                mode: r.mode,
                uid: r.uid,
                gid: r.gid,
            },
            Some(r) => {
                let saved_name = OsString::from(index.to_string());
                let clock = &self.clock;
                let check = |sub: &Path, st: &Stat| {
                    if clock.changed(sub, st) {
                        Err(format!("{} {CHANGED}", printable_path(sub)))
                    } else {
                        Ok(())
                    }
                };
                let mut opts = fsx::CopyOpts {
                    opaque: false,
                    strip_setid: false,
                    fsync: true,
                    check: &check,
                    bytes: 0,
                    budget: None,
                    links: None,
                };
                let copied = fsx::copy_tree(
                    pfd.as_fd(),
                    name,
                    self.saved.as_fd(),
                    &saved_name,
                    rel,
                    &mut opts,
                );
                if let Err(e) = copied {
                    let _ = fsx::remove_tree(self.saved.as_fd(), &saved_name, rel);
                    return Ok(Outcome::Conflict(match e {
                        fsx::CopyError::Check(reason) => reason,
                        fsx::CopyError::Fs(e) => refusal(&e),
                    }));
                }
                Before::Saved { file_type: r.kind }
            }
        };
        let mut rec = Record {
            index,
            path: rel.to_path_buf(),
            before,
            after: None,
        };
        self.journal(&rec)?;

        let action = match self.perform(pfd.as_fd(), name, rel, &u, real) {
            Ok(a) => a,
            Err(e) => return Ok(Outcome::Conflict(refusal(&e))),
        };
        let after = fsx::lstat_at(pfd.as_fd(), name).ctx("fstatat", rel)?;
        rec.after = Some(After::of(after));
        self.journal(&rec)?;
        self.records.push(rec);
        self.touched.add(parent, parent_clean);
        if u.kind == FileType::Dir {
            self.touched.add(rel, true);
        }
        let file_type = match (u.kind, real) {
            (FileType::Whiteout, Some(r)) => r.kind,
            (k, _) => k,
        };
        Ok(Outcome::Done(Applied {
            path: rel.to_path_buf(),
            action,
            file_type,
        }))
    }

    /// Makes the real entry `name` (of `pfd`) what upper has.
    fn perform(
        &self,
        pfd: BorrowedFd<'_>,
        name: &OsStr,
        rel: &Path,
        u: &Stat,
        real: Option<Stat>,
    ) -> Result<Action, FsError> {
        let replaced_or_created = if real.is_some() {
            Action::Replaced
        } else {
            Action::Created
        };
        let real_is_dir = real.is_some_and(|r| r.kind == FileType::Dir);
        match u.kind {
            FileType::File => {
                let mut src = fsx::open_regular(self.upper, rel).ctx("openat2", rel)?;
                let (tmp, fd) = with_temp(|n| fsx::create_exclusive(pfd, n)).ctx("openat", rel)?;
                let mut dst = File::from(fd);
                let written = std::io::copy(&mut src, &mut dst)
                    .ctx("write", rel)
                    .and_then(|_| fsx::finish_file(&dst, u, true, true, rel));
                drop(dst);
                put_in_place(pfd, &tmp, name, rel, real_is_dir, written)?;
                Ok(replaced_or_created)
            }
            FileType::Symlink => {
                let target = {
                    let (up, un) = fsx::split(rel);
                    let ufd = fsx::open_beneath(self.upper, up, OFlag::O_PATH | OFlag::O_DIRECTORY)
                        .ctx("openat2", up)?;
                    readlinkat(ufd.as_fd(), un).ctx("readlinkat", rel)?
                };
                let (tmp, ()) =
                    with_temp(|n| symlinkat(target.as_os_str(), pfd, n)).ctx("symlinkat", rel)?;
                let owned = fchownat(
                    pfd,
                    tmp.as_os_str(),
                    Some(Uid::from_raw(u.uid)),
                    Some(Gid::from_raw(u.gid)),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .ctx("fchownat", rel);
                put_in_place(pfd, &tmp, name, rel, real_is_dir, owned)?;
                Ok(replaced_or_created)
            }
            FileType::Dir => {
                let action = match real {
                    Some(r) if r.kind == FileType::Dir => Action::Updated,
                    Some(_) => {
                        unlinkat(pfd, name, UnlinkatFlags::NoRemoveDir).ctx("unlinkat", rel)?;
                        mkdirat(pfd, name, FileMode::from_bits_truncate(0o700))
                            .ctx("mkdirat", rel)?;
                        Action::Replaced
                    }
                    None => {
                        mkdirat(pfd, name, FileMode::from_bits_truncate(0o700))
                            .ctx("mkdirat", rel)?;
                        Action::Created
                    }
                };
                let dfd = fsx::open_child_dir(pfd, name).ctx("openat2", rel)?;
                fchown(
                    dfd.as_fd(),
                    Some(Uid::from_raw(u.uid)),
                    Some(Gid::from_raw(u.gid)),
                )
                .ctx("fchown", rel)?;
                fchmod(dfd.as_fd(), FileMode::from_bits_truncate(u.mode)).ctx("fchmod", rel)?;
                Ok(action)
            }
            FileType::Whiteout => {
                fsx::remove_tree(pfd, name, rel)?;
                Ok(Action::Deleted)
            }
            FileType::Fifo | FileType::Socket | FileType::CharDev | FileType::BlockDev => {
                Err(FsError::new("commit", rel, Errno::EINVAL))
            }
        }
    }
}

/// Turns every opaque directory of upper into a plain one with a whiteout for each real
/// entry it hides, so that committed entries can leave upper without changing what the
/// rest means.
fn unopaque(upper: BorrowedFd<'_>, ws: BorrowedFd<'_>, rel: &Path) -> Result<(), TxError> {
    for name in fsx::list(upper).ctx("getdents", rel)? {
        let child = rel.join(&name);
        let Some(st) = fsx::lstat_at(upper, &name).ctx("fstatat", &child)? else {
            continue;
        };
        if st.kind != FileType::Dir {
            continue;
        }
        let sub = fsx::open_child_dir(upper, &name).ctx("openat2", &child)?;
        if fsx::is_opaque(sub.as_fd()).ctx("fgetxattr", &child)? {
            if let Ok(real) = fsx::open_beneath(ws, &child, OFlag::O_PATH | OFlag::O_DIRECTORY) {
                let have: HashSet<OsString> = fsx::list(sub.as_fd())
                    .ctx("getdents", &child)?
                    .into_iter()
                    .collect();
                for hidden in fsx::list(real.as_fd()).ctx("getdents", &child)? {
                    if !have.contains(&hidden) {
                        mknodat(
                            sub.as_fd(),
                            hidden.as_os_str(),
                            SFlag::S_IFCHR,
                            FileMode::empty(),
                            0,
                        )
                        .ctx("mknodat", &child.join(&hidden))?;
                    }
                }
            }
            fsx::clear_opaque(sub.as_fd()).ctx("fremovexattr", &child)?;
        }
        unopaque(sub.as_fd(), ws, &child)?;
    }
    Ok(())
}

/// Removes the upper entries commit is done with: files, symlinks and whiteouts, then
/// (deepest first) directories left empty.
fn prune_upper(upper: &Path, done: &[(PathBuf, bool)]) -> Result<(), TxError> {
    for (rel, is_dir) in done {
        if !is_dir {
            let p = upper.join(rel);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(TxError::io("unlink", &p, e)),
            }
        }
    }
    for (rel, is_dir) in done.iter().rev() {
        if *is_dir {
            let p = upper.join(rel);
            match std::fs::remove_dir(&p) {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::DirectoryNotEmpty
                    ) => {}
                Err(e) => return Err(TxError::io("rmdir", &p, e)),
            }
        }
    }
    Ok(())
}

fn read_records(cdir: &Path) -> Result<Option<Vec<Record>>, TxError> {
    let manifest = cdir.join(MANIFEST);
    match std::fs::read(&manifest) {
        Ok(data) => {
            return serde_json::from_slice(&data)
                .map(Some)
                .map_err(|source| TxError::Json {
                    path: manifest,
                    source,
                });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(TxError::io("read", &manifest, e)),
    }
    // An interrupted commit: its journal, the last line per path winning.
    let journal = cdir.join(JOURNAL);
    let f = match File::open(&journal) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TxError::io("open", &journal, e)),
    };
    let mut records: Vec<Record> = Vec::new();
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(io_err("read", &journal))?;
        // A torn last line is skipped.
        let Ok(rec) = serde_json::from_str::<Record>(&line) else {
            continue;
        };
        match records.last_mut() {
            Some(last) if last.index == rec.index => *last = rec,
            Some(_) | None => records.push(rec),
        }
    }
    Ok(Some(records))
}

impl Transaction {
    /// Commits the changes (all, or those at and below `only`) to the workspace.
    pub fn commit(&mut self, only: &[PathBuf]) -> Result<CommitReport, TxError> {
        self.lock()?;
        match self.meta.state {
            State::Pending | State::Committed | State::Undone => {}
            State::Running => {
                return Err(TxError::WrongState {
                    id: self.meta.id.clone(),
                    state: self.meta.state,
                    hint: "the agent still runs: its changes are kept when it ends",
                });
            }
            State::Discarded => {
                return Err(TxError::WrongState {
                    id: self.meta.id.clone(),
                    state: self.meta.state,
                    hint: "nothing is left to commit",
                });
            }
        }
        let only = self.relative_paths(only)?;
        let n = self.meta.commits + 1;
        let commits = self.dir.join(COMMITS);
        let cdir = commits.join(n.to_string());
        if cdir.exists() && read_records(&cdir)?.is_none() {
            // A commit that failed before it changed anything (no journal): nothing to
            // undo, so nothing to keep.
            std::fs::remove_dir_all(&cdir).map_err(io_err("remove", &cdir))?;
        }
        if cdir.exists() {
            // A commit that never finished: make it the last one, so undo sees it.
            self.meta.commits = n;
            self.save_meta()?;
            return Err(TxError::WrongState {
                id: self.meta.id.clone(),
                state: self.meta.state,
                hint: "its last commit was interrupted: `agentd undo ID` restores what it changed, then commit again",
            });
        }
        let sides = Sides::open(self)?;
        let Some(upper_file) = sides.upper.as_ref() else {
            return Ok(CommitReport {
                commit: None,
                committed: Vec::new(),
                conflicts: Vec::new(),
                unchanged: 0,
                state: self.meta.state,
            });
        };
        let upper = upper_file.as_fd();
        unopaque(upper, sides.ws.as_fd(), Path::new(""))?;
        let items = plan::walk(upper, sides.ws.as_fd())?;

        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(cdir.join(SAVED))
            .map_err(io_err("mkdir", &cdir))?;
        let saved = fsx::open_dir_nosymlinks(&cdir.join(SAVED))
            .and_then(|fd| {
                fsx::open_beneath(
                    fd.as_fd(),
                    Path::new(""),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                )
            })
            .map_err(|e| TxError::io("open", &cdir.join(SAVED), e.into()))?;
        let journal_path = cdir.join(JOURNAL);
        let journal = File::create(&journal_path).map_err(io_err("create", &journal_path))?;
        let known = self.known_ctimes();
        let mut c = Committer {
            sides: &sides,
            upper,
            clock: Clock {
                launched: self.meta.launched,
                known: &known,
            },
            saved,
            journal,
            journal_path: journal_path.clone(),
            next_index: 0,
            records: Vec::new(),
            touched: Touched::default(),
        };

        let mut committed = Vec::new();
        let mut conflicts = Vec::new();
        let mut unchanged = 0;
        let mut failed_dirs: Vec<PathBuf> = Vec::new();
        let mut done: Vec<(PathBuf, bool)> = Vec::new();
        for item in &items {
            let is_dir = item.upper_kind() == FileType::Dir;
            let wanted = selected(&only, &item.rel)
                || (is_dir && only.iter().any(|o| o.starts_with(&item.rel)));
            if !wanted {
                continue;
            }
            if let Some(f) = failed_dirs.iter().find(|f| item.rel.starts_with(f)) {
                conflicts.push(Issue {
                    path: item.rel.clone(),
                    reason: format!("left alone: {} was not committed", printable_path(f)),
                });
                continue;
            }
            // Inside a protected path, or replacing or removing one of its ancestors.
            if let Some(p) = self.meta.protect.iter().find(|p| {
                item.rel.starts_with(p)
                    || (p.starts_with(&item.rel) && item.upper_kind() != FileType::Dir)
            }) {
                conflicts.push(Issue {
                    path: item.rel.clone(),
                    reason: format!(
                        "protected by the profile ({}): never committed",
                        printable_path(p)
                    ),
                });
                continue;
            }
            match c.apply(item)? {
                Outcome::Done(applied) => {
                    committed.push(applied);
                    done.push((item.rel.clone(), is_dir));
                }
                Outcome::Same => {
                    unchanged += 1;
                    done.push((item.rel.clone(), is_dir));
                }
                Outcome::Conflict(reason) => {
                    if is_dir {
                        failed_dirs.push(item.rel.clone());
                    }
                    conflicts.push(Issue {
                        path: item.rel.clone(),
                        reason,
                    });
                }
            }
        }
        let records = std::mem::take(&mut c.records);
        let touched = std::mem::take(&mut c.touched);
        drop(c);

        let mut known = known;
        touched.record(sides.ws.as_fd(), &mut known);
        self.save_known_ctimes(&known)?;
        let commit = if records.is_empty() {
            std::fs::remove_dir_all(&cdir).map_err(io_err("remove", &cdir))?;
            None
        } else {
            super::write_json(&cdir.join(MANIFEST), &records)?;
            std::fs::remove_file(&journal_path).map_err(io_err("remove", &journal_path))?;
            self.meta.commits = n;
            Some(n)
        };
        prune_upper(&self.upper(), &done)?;
        self.meta.state = if self.changes(&[])?.is_empty() {
            State::Committed
        } else {
            State::Pending
        };
        self.save_meta()?;
        Ok(CommitReport {
            commit,
            committed,
            conflicts,
            unchanged,
            state: self.meta.state,
        })
    }

    /// Undoes the last commit (see the module documentation).
    pub fn undo(&mut self) -> Result<UndoReport, TxError> {
        self.lock()?;
        let n = self.meta.commits;
        let cdir = self.dir.join(COMMITS).join(n.to_string());
        let records = match (n, read_records(&cdir)?) {
            (1.., None) if cdir.exists() => {
                // A commit that failed before it changed anything: forget it.
                std::fs::remove_dir_all(&cdir).map_err(io_err("remove", &cdir))?;
                self.meta.commits = n - 1;
                self.save_meta()?;
                return Ok(UndoReport {
                    commit: n,
                    restored: Vec::new(),
                    refused: Vec::new(),
                    state: self.meta.state,
                });
            }
            (0, _) | (_, None) => {
                return Err(TxError::NoManifest {
                    id: self.meta.id.clone(),
                    commit: n,
                });
            }
            (_, Some(r)) => r,
        };
        let ws = plan::open_workspace(&self.meta.workspace, self.meta.workspace_id)?;
        let saved = fsx::open_dir_nosymlinks(&cdir.join(SAVED))
            .and_then(|fd| {
                fsx::open_beneath(
                    fd.as_fd(),
                    Path::new(""),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                )
            })
            .map_err(|e| TxError::io("open", &cdir.join(SAVED), e.into()))?;
        let known = self.known_ctimes();
        let clock = Clock {
            launched: self.meta.launched,
            known: &known,
        };
        let mut touched = Touched::default();
        let mut restored = Vec::new();
        let mut refused = Vec::new();
        let mut keep = Vec::new();
        for rec in records.iter().rev() {
            match undo_one(ws.as_fd(), saved.as_fd(), rec, &clock, &mut touched) {
                Ok(applied) => restored.push(applied),
                Err(reason) => {
                    refused.push(Issue {
                        path: rec.path.clone(),
                        reason,
                    });
                    keep.push(rec.clone());
                }
            }
        }
        let mut known = known.clone();
        touched.record(ws.as_fd(), &mut known);
        self.save_known_ctimes(&known)?;
        if keep.is_empty() {
            std::fs::remove_dir_all(&cdir).map_err(io_err("remove", &cdir))?;
            self.meta.commits = n - 1;
        } else {
            keep.reverse();
            super::write_json(&cdir.join(MANIFEST), &keep)?;
            let journal = cdir.join(JOURNAL);
            if journal.exists() {
                std::fs::remove_file(&journal).map_err(io_err("remove", &journal))?;
            }
        }
        self.meta.state = if !self.changes(&[])?.is_empty() {
            State::Pending
        } else if self.meta.commits > 0 {
            State::Committed
        } else {
            State::Undone
        };
        self.save_meta()?;
        Ok(UndoReport {
            commit: n,
            restored,
            refused,
            state: self.meta.state,
        })
    }
}

/// Restores one path of a commit; `Err` says why not.
fn undo_one(
    ws: BorrowedFd<'_>,
    saved: BorrowedFd<'_>,
    rec: &Record,
    clock: &Clock<'_>,
    touched: &mut Touched,
) -> Result<Applied, String> {
    let rel = rec.path.as_path();
    let (parent, name) = fsx::split(rel);
    let pfd = fsx::open_beneath(ws, parent, OFlag::O_PATH | OFlag::O_DIRECTORY)
        .map_err(|e| refusal(&FsError::new("openat2", parent, e)))?;
    let pfd = pfd.as_fd();
    let pst = fsx::stat_fd(pfd).map_err(|e| refusal(&FsError::new("fstat", parent, e)))?;
    let cur = fsx::lstat_at(pfd, name).map_err(|e| refusal(&FsError::new("fstatat", rel, e)))?;
    let Some(after) = rec.after else {
        return Err(format!(
            "the commit was interrupted here, what it left is unknown (the previous version is in saved/{})",
            rec.index
        ));
    };
    if !after.matches(cur) {
        return Err("changed since the commit".to_string());
    }
    let fail = |e: FsError| refusal(&e);
    let cur_kind = cur.map(|c| c.kind);
    let remove_cur = || -> Result<(), String> {
        match cur_kind {
            None => Ok(()),
            Some(FileType::Dir) => match unlinkat(pfd, name, UnlinkatFlags::RemoveDir) {
                Ok(()) => Ok(()),
                Err(Errno::ENOTEMPTY | Errno::EEXIST) => Err(
                    "directory not empty: it holds entries the commit did not create".to_string(),
                ),
                Err(e) => Err(refusal(&FsError::new("unlinkat", rel, e))),
            },
            Some(_) => unlinkat(pfd, name, UnlinkatFlags::NoRemoveDir)
                .map_err(|e| refusal(&FsError::new("unlinkat", rel, e))),
        }
    };
    let ok_check = |_: &Path, _: &Stat| Ok(());
    let mut opts = fsx::CopyOpts {
        opaque: false,
        strip_setid: false,
        fsync: true,
        check: &ok_check,
        bytes: 0,
        budget: None,
        links: None,
    };
    let saved_name = OsString::from(rec.index.to_string());
    let (action, file_type) = match &rec.before {
        Before::Absent => {
            remove_cur()?;
            (Action::Deleted, cur_kind.unwrap_or(FileType::File))
        }
        Before::Dir { mode, uid, gid } => {
            let dfd = fsx::open_child_dir(pfd, name)
                .map_err(|e| refusal(&FsError::new("openat2", rel, e)))?;
            fchown(
                dfd.as_fd(),
                Some(Uid::from_raw(*uid)),
                Some(Gid::from_raw(*gid)),
            )
            .ctx("fchown", rel)
            .map_err(fail)?;
            fchmod(dfd.as_fd(), FileMode::from_bits_truncate(*mode))
                .ctx("fchmod", rel)
                .map_err(fail)?;
            (Action::Updated, FileType::Dir)
        }
        Before::Saved { file_type } => {
            let in_place = *file_type != FileType::Dir && cur_kind != Some(FileType::Dir);
            if in_place {
                // Copy beside, then rename over what the commit left.
                let (tmp, ()) = with_temp(|n| {
                    match fsx::copy_tree(saved, &saved_name, pfd, n, rel, &mut opts) {
                        Ok(()) => Ok(()),
                        Err(fsx::CopyError::Fs(e)) => Err(e.errno),
                        Err(fsx::CopyError::Check(_)) => Err(Errno::EINVAL),
                    }
                })
                .map_err(|e| refusal(&FsError::new("copy", rel, e)))?;
                if let Err(e) = renameat(pfd, tmp.as_os_str(), pfd, name) {
                    let _ = fsx::remove_tree(pfd, &tmp, rel);
                    return Err(refusal(&FsError::new("renameat", rel, e)));
                }
            } else {
                remove_cur()?;
                fsx::copy_tree(saved, &saved_name, pfd, name, rel, &mut opts).map_err(
                    |e| match e {
                        fsx::CopyError::Fs(e) => refusal(&e),
                        fsx::CopyError::Check(reason) => reason,
                    },
                )?;
            }
            let action = if cur.is_some() {
                Action::Replaced
            } else {
                Action::Created
            };
            (action, *file_type)
        }
    };
    let clean = !clock.changed(parent, &pst) || touched.is_clean(parent);
    touched.add(parent, clean);
    if file_type == FileType::Dir && !matches!(rec.before, Before::Absent) {
        touched.add(rel, true);
    }
    Ok(Applied {
        path: rel.to_path_buf(),
        action,
        file_type,
    })
}
