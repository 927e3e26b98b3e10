//! The transaction store: what an agent wrote, held back until a person commits it.
//!
//! An agent in `transaction` mode sees its workspace through an overlayfs whose upper layer
//! agentd keeps (mounted with `redirect_dir=off,metacopy=off,index=off`). When the agent
//! ends, its supervisor copies that upper directory into the store ([`Transaction::persist`]);
//! from then on everything here is plain user space: [`Transaction::changes`] (what
//! `agentd diff` shows), [`Transaction::commit`], [`Transaction::undo`], discard, list.
//!
//! # Layout
//! ```text
//! <state>/transactions/            0700 root
//!   <id>/                          0700 root
//!     meta.json                    Meta
//!     supervisor                   start time of the supervisor (for reap_stale)
//!     upper/                       the persisted upper layer (entries not yet committed)
//!     known-ctimes.json            ctimes agentd itself gave workspace directories
//!     commits/<n>/manifest.json    what commit n replaced (manifest.jsonl while it runs)
//!     commits/<n>/saved/<i>        copies of what commit n replaced or deleted
//! ```
//!
//! # Reading the upper layer
//! A regular file, symlink or directory in upper was created or copied up (a copy-up that is
//! byte-, mode- and owner-identical to the real file is no change); a character device 0:0
//! (whiteout) deletes the path; a directory with `trusted.overlay.opaque=y` replaces the real
//! one (what the real one has and upper does not is deleted); other directories merge. A
//! deleted regular file and an added one with the same SHA-256 (and a size above 0) are
//! reported as one rename.
//!
//! # Conflicts (commit runs as root in a user-owned workspace)
//! `Meta::launched` is when the agent's overlay was mounted. For each upper entry P, at the
//! moment it is committed:
//! - the real P is identical to upper's: nothing to do (the entry is dropped);
//! - the real P exists and its ctime is later than `launched` → conflict "changed in the
//!   workspace since launch"; for a directory that is replaced or deleted, any entry below it
//!   with a later ctime is a conflict too;
//! - the real P is absent and its real parent's ctime is later than `launched` → conflict
//!   (it may have been deleted there since launch); a whiteout whose path is already gone is
//!   done either way;
//! - a component of P's parent in the workspace is a symlink, or a mount point → refused;
//! - a ctime agentd itself gave a directory (by committing into it, or undoing) does not
//!   count as a change: those are kept in `known-ctimes.json`.
//!
//! Conflicting entries are left alone and stay in upper (so do entries below a directory
//! that could not be committed); the rest is committed. A type change (a file where the
//! workspace has a directory, ...) is a change like any other: the old entry is saved for
//! undo and replaced.
//!
//! Timestamps are compared at the file system's granularity: a change in the workspace
//! within one clock tick of `launched` may look older than the launch.
//!
//! # Applying
//! Every workspace path is resolved beneath an `O_PATH` fd of the workspace with `openat2`
//! and `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV`;
//! changes are `*at()` calls on the parent's fd. A file is written to `.agentd-commit-<random>`
//! next to its target (`O_CREAT|O_EXCL`, owner and mode of upper's file, without
//! setuid/setgid bits, fsync) and renamed over it; a symlink is created under a temporary
//! name and renamed; a directory is created with `mkdirat` and given upper's owner and mode;
//! deletions are `unlinkat`, recursive for directories.
//!
//! # Undo
//! Before commit n replaces or deletes anything it saves a copy in `commits/<n>/saved/` and
//! records, per path, the before-state and (once written) the after-state (type, inode,
//! ctime). [`Transaction::undo`] restores each path of the last commit, refusing paths whose
//! current state is not the recorded after-state. Committed entries leave upper for good:
//! undo restores the workspace and puts nothing back into upper. After a full undo the
//! commit's directory is removed and `commits` goes down by one; the state becomes `pending`
//! if upper still holds changes, `committed` if earlier commits remain, `undone` otherwise.
//! After a partial undo the commit keeps only the refused paths, and can be undone again.

pub mod cmd;
mod commit;
mod fsx;
mod plan;
mod render;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    fs::File,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Component, Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

pub use self::{
    commit::{Action, Applied, CommitReport, Issue, UndoReport},
    fsx::FileType,
    plan::{Change, ChangeKind, Entry},
    render::{printable, printable_path, render_diff, render_stat},
};

/// The store's directory under the state directory.
pub const TRANSACTIONS_DIR: &str = "transactions";
const META: &str = "meta.json";
const UPPER: &str = "upper";
const COMMITS: &str = "commits";
const SUPERVISOR: &str = "supervisor";
const KNOWN_CTIMES: &str = "known-ctimes.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Writes are held in the store until committed.
    Transaction,
    /// Writes are committed when the agent ends (conflicts stay pending).
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// The agent runs; nothing is persisted yet.
    Running,
    /// Persisted; changes wait for commit or discard (also after a partial commit).
    Pending,
    /// Every change is committed.
    Committed,
    /// Discarded (the directory is being removed).
    Discarded,
    /// Every commit was undone and nothing is pending.
    Undone,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Pending => "pending",
            State::Committed => "committed",
            State::Discarded => "discarded",
            State::Undone => "undone",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// The agent id, e.g. "coding-agent-1a2b3c".
    pub id: String,
    /// The agent's owner: only this uid or root may diff/commit/discard/undo.
    pub owner_uid: u32,
    pub profile: String,
    /// The real workspace, canonical, absolute.
    #[serde(with = "pathser")]
    pub workspace: PathBuf,
    pub mode: Mode,
    pub limit_bytes: u64,
    /// CLOCK_REALTIME at launch (secs, nanos): files whose ctime is later changed in the
    /// real workspace since launch.
    pub launched: (i64, u32),
    /// The process that persists the upper at the end.
    pub supervisor_pid: i32,
    pub state: State,
    /// How the agent ended, free text (e.g. "exit 0", "tripped: canary").
    pub exit: Option<String>,
    /// Size of the persisted upper (regular files and symlink targets).
    pub bytes: u64,
    #[serde(default)]
    pub commits: u32,
    /// The profile's `filesystem.protect` paths inside the workspace (relative): never
    /// committed, whatever the agent did to them (a protected path missing at launch has
    /// no read-only mount in the agent's view).
    #[serde(default)]
    pub protect: Vec<PathBuf>,
    /// The workspace's (device, inode) at launch: a commit or undo refuses a workspace
    /// path that names another directory now.
    #[serde(default)]
    pub workspace_id: Option<(u64, u64)>,
}

/// Root or the agent's owner.
pub fn may_act(meta: &Meta, uid: u32) -> bool {
    uid == 0 || uid == meta.owner_uid
}

#[derive(Debug, thiserror::Error)]
pub enum TxError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot {op} {path}: permission denied (the transaction store is root's: run the command with sudo)"
    )]
    PermissionDenied { op: &'static str, path: PathBuf },
    #[error("cannot parse {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no transaction `{0}` (`agentd transactions` lists them)")]
    Unknown(String),
    #[error(
        "invalid transaction id `{0}`: an id is an agent id such as coding-agent-1a2b3c (no `/`, no `..`)"
    )]
    BadId(String),
    #[error("transaction `{0}` already exists")]
    Exists(String),
    #[error("transaction `{id}` is {state}: {hint}")]
    WrongState {
        id: String,
        state: State,
        hint: &'static str,
    },
    #[error("transaction `{0}` is busy: another agentd command is working on it (try again)")]
    Busy(String),
    #[error("{path} is not inside the workspace {workspace}")]
    OutsideWorkspace { path: PathBuf, workspace: PathBuf },
    #[error(
        "cannot open the workspace {path}: {source} (was it moved, removed, or replaced by a symlink?)"
    )]
    Workspace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("commit {commit} of `{id}` has no manifest: nothing to undo")]
    NoManifest { id: String, commit: u32 },
}

impl TxError {
    fn io(op: &'static str, path: &Path, source: std::io::Error) -> TxError {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            TxError::PermissionDenied {
                op,
                path: path.to_path_buf(),
            }
        } else {
            TxError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

impl From<fsx::FsError> for TxError {
    fn from(e: fsx::FsError) -> TxError {
        TxError::io(e.op, &e.path, std::io::Error::from(e.errno))
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TxError {
    let path = path.to_path_buf();
    move |source| TxError::io(op, &path, source)
}

/// The store: `<state>/transactions`.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
}

/// One transaction: its directory and metadata. Commands that change it take an exclusive
/// lock on its directory first (and re-read the metadata).
#[derive(Debug)]
pub struct Transaction {
    dir: PathBuf,
    meta: Meta,
    lock: Option<Flock<File>>,
}

fn check_id(id: &str) -> Result<(), TxError> {
    let ok = !id.is_empty()
        && id != "."
        && !id.contains('/')
        && !id.contains("..")
        && !id.contains('\0')
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(TxError::BadId(id.to_string()))
    }
}

fn read_meta(dir: &Path) -> Result<Meta, TxError> {
    let path = dir.join(META);
    let data = std::fs::read(&path).map_err(io_err("read", &path))?;
    serde_json::from_slice(&data).map_err(|source| TxError::Json { path, source })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), TxError> {
    let data = serde_json::to_vec_pretty(value).map_err(|source| TxError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    fsx::write_atomic(path, &data).map_err(io_err("write", path))
}

impl Store {
    /// Opens the store under `state_dir`, creating `transactions/` (0700) if missing.
    pub fn open(state_dir: &Path) -> Result<Store, TxError> {
        let root = state_dir.join(TRANSACTIONS_DIR);
        match std::fs::symlink_metadata(&root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(TxError::io(
                    "open",
                    &root,
                    std::io::Error::from(std::io::ErrorKind::NotADirectory),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&root)
                    .map_err(io_err("create", &root))?;
                std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
                    .map_err(io_err("chmod", &root))?;
            }
            Err(e) => return Err(TxError::io("stat", &root, e)),
        }
        // Non-root callers fail here rather than later, with the hint to use sudo.
        std::fs::read_dir(&root).map_err(io_err("read", &root))?;
        // Absolute, without symbolic links: paths below it are opened from `/` refusing
        // any link (`fsx::open_dir_nosymlinks`), and `--state-dir` may be relative.
        let root = std::fs::canonicalize(&root).map_err(io_err("resolve", &root))?;
        Ok(Store { root })
    }

    /// A new transaction directory with `meta.json` (state `Running`); an error if it
    /// exists.
    pub fn create(&self, mut meta: Meta) -> Result<Transaction, TxError> {
        check_id(&meta.id)?;
        let dir = self.root.join(&meta.id);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(TxError::Exists(meta.id));
            }
            Err(e) => return Err(TxError::io("mkdir", &dir, e)),
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod", &dir))?;
        meta.state = State::Running;
        meta.commits = 0;
        if let Some(start) = process_start(meta.supervisor_pid) {
            let path = dir.join(SUPERVISOR);
            fsx::write_atomic(&path, start.to_string().as_bytes())
                .map_err(io_err("write", &path))?;
        }
        write_json(&dir.join(META), &meta)?;
        Ok(Transaction {
            dir,
            meta,
            lock: None,
        })
    }

    /// The transaction `id`.
    pub fn get(&self, id: &str) -> Result<Transaction, TxError> {
        check_id(id)?;
        let dir = self.root.join(id);
        match std::fs::symlink_metadata(dir.join(META)) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TxError::Unknown(id.to_string()));
            }
            Err(e) => return Err(TxError::io("stat", &dir.join(META), e)),
        }
        let meta = read_meta(&dir)?;
        Ok(Transaction {
            dir,
            meta,
            lock: None,
        })
    }

    /// Every transaction's metadata, by id. Directories without readable metadata are
    /// skipped (with a warning).
    pub fn list(&self) -> Result<Vec<Meta>, TxError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.root).map_err(io_err("read", &self.root))?;
        for entry in entries {
            let entry = entry.map_err(io_err("read", &self.root))?;
            let dir = entry.path();
            if !entry.file_type().map_err(io_err("stat", &dir))?.is_dir() {
                continue;
            }
            match read_meta(&dir) {
                Ok(meta) => out.push(meta),
                Err(e) => tracing::warn!("skipping {}: {e}", dir.display()),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Transactions left `Running` by a supervisor that no longer exists (its pid gone, a
    /// zombie, or another process by now): nothing was persisted, so they are removed.
    /// Returns the ids removed.
    pub fn reap_stale(&self) -> Result<Vec<String>, TxError> {
        let mut removed = Vec::new();
        for meta in self.list()? {
            if meta.state != State::Running {
                continue;
            }
            let dir = self.root.join(&meta.id);
            let recorded = std::fs::read_to_string(dir.join(SUPERVISOR))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok());
            let alive = match (process_start(meta.supervisor_pid), recorded) {
                (None, _) => false,
                (Some(now), Some(then)) => now == then,
                (Some(_), None) => true,
            };
            if alive {
                continue;
            }
            let mut tx = Transaction {
                dir: dir.clone(),
                meta,
                lock: None,
            };
            match tx.lock() {
                Ok(()) => {}
                Err(TxError::Busy(_)) => continue,
                Err(e) => return Err(e),
            }
            if tx.meta.state != State::Running {
                continue;
            }
            std::fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))?;
            removed.push(tx.meta.id.clone());
        }
        Ok(removed)
    }
}

/// The start time (field 22 of /proc/PID/stat) of a live, non-zombie process.
fn process_start(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); starttime is field 22.
    let state = *fields.first()?;
    if state == "Z" || state == "X" || state == "x" {
        return None;
    }
    fields.get(19)?.parse().ok()
}

impl Transaction {
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn upper(&self) -> PathBuf {
        self.dir().join(UPPER)
    }

    /// Takes the exclusive lock (non-blocking) and re-reads the metadata.
    fn lock(&mut self) -> Result<(), TxError> {
        if self.lock.is_some() {
            return Ok(());
        }
        let f = File::open(&self.dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                TxError::Unknown(self.meta.id.clone())
            } else {
                TxError::io("open", &self.dir, e)
            }
        })?;
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => self.lock = Some(l),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(TxError::Busy(self.meta.id.clone()));
            }
            Err((_, e)) => return Err(TxError::io("flock", &self.dir, e.into())),
        }
        self.meta = read_meta(&self.dir)?;
        Ok(())
    }

    fn save_meta(&self) -> Result<(), TxError> {
        write_json(&self.dir.join(META), &self.meta)
    }

    fn known_ctimes(&self) -> BTreeMap<String, (i64, u32)> {
        std::fs::read(self.dir.join(KNOWN_CTIMES))
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .unwrap_or_default()
    }

    fn save_known_ctimes(&self, known: &BTreeMap<String, (i64, u32)>) -> Result<(), TxError> {
        write_json(&self.dir.join(KNOWN_CTIMES), known)
    }

    /// Copies an overlay upper tree into `<id>/upper` (see [`fsx::copy_tree`]: files, dirs,
    /// symlinks, whiteouts, the opaque xattr, mode, owner, times; never following a
    /// symlink of the source), then records `bytes`, `exit` and state `Pending`. `upper`
    /// may be `/proc/self/fd/N`. A previous partial copy is replaced.
    pub fn persist(&mut self, upper: &Path, exit: &str) -> Result<(), TxError> {
        self.lock()?;
        if self.meta.state != State::Running {
            return Err(TxError::WrongState {
                id: self.meta.id.clone(),
                state: self.meta.state,
                hint: "only a running transaction is persisted",
            });
        }
        let bytes = self.persist_tree(upper)?;
        self.meta.bytes = bytes;
        self.meta.exit = Some(exit.to_string());
        self.meta.state = State::Pending;
        self.save_meta()
    }

    fn persist_tree(&self, upper: &Path) -> Result<u64, TxError> {
        use std::os::fd::AsFd as _;
        let tmp = self.dir.join("upper.tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err("remove", &tmp))?;
        }
        // The source root is opened following links (it may be a /proc/self/fd magic
        // link); nothing below it is.
        let src = File::open(upper).map_err(io_err("open", upper))?;
        // Copy the root's children into a fresh directory, synced once at the end.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io_err("mkdir", &tmp))?;
        let dst = File::open(&tmp).map_err(io_err("open", &tmp))?;
        // The layer fit in `limit_bytes` of tmpfs: its copy fits in as many bytes, hard
        // links kept (a file linked a thousand times is not copied a thousand times) and
        // sparse files counted whole.
        let mut opts = fsx::CopyOpts {
            opaque: true,
            strip_setid: false,
            fsync: false,
            check: &|_, _| Ok(()),
            bytes: 0,
            budget: Some(self.meta.limit_bytes),
            links: Some(fsx::Links {
                root: dst.as_fd(),
                first: std::collections::HashMap::new(),
            }),
        };
        let names = fsx::list(src.as_fd()).map_err(|e| TxError::io("getdents", upper, e.into()))?;
        for name in names {
            fsx::copy_tree(
                src.as_fd(),
                &name,
                dst.as_fd(),
                &name,
                Path::new(&name),
                &mut opts,
            )
            .map_err(|e| match e {
                fsx::CopyError::Fs(e) => {
                    TxError::io(e.op, &upper.join(&e.path), std::io::Error::from(e.errno))
                }
                fsx::CopyError::Check(reason) => {
                    TxError::io("copy", upper, std::io::Error::other(reason))
                }
            })?;
        }
        nix::unistd::syncfs(dst.as_fd()).map_err(|e| TxError::io("syncfs", &tmp, e.into()))?;
        let final_path = self.upper();
        if final_path.exists() {
            std::fs::remove_dir_all(&final_path).map_err(io_err("remove", &final_path))?;
        }
        std::fs::rename(&tmp, &final_path).map_err(io_err("rename", &tmp))?;
        Ok(opts.bytes)
    }

    /// Removes the transaction's directory entirely, whatever its state (the launcher
    /// discards a `Running` one it could not start; `agentd discard` refuses those).
    pub fn discard(mut self) -> Result<(), TxError> {
        self.lock()?;
        self.meta.state = State::Discarded;
        self.save_meta()?;
        std::fs::remove_dir_all(&self.dir).map_err(io_err("remove", &self.dir))
    }

    /// `only` as plain relative paths: relative ones as they are, absolute ones inside the
    /// workspace made relative; `..` and anything outside the workspace refused.
    fn relative_paths(&self, only: &[PathBuf]) -> Result<Vec<PathBuf>, TxError> {
        let mut out = Vec::with_capacity(only.len());
        for p in only {
            let rel = if p.is_absolute() {
                p.strip_prefix(&self.meta.workspace)
                    .map(Path::to_path_buf)
                    .map_err(|_| TxError::OutsideWorkspace {
                        path: p.clone(),
                        workspace: self.meta.workspace.clone(),
                    })?
            } else {
                p.clone()
            };
            let mut clean = PathBuf::new();
            for c in rel.components() {
                match c {
                    Component::Normal(n) => clean.push(n),
                    Component::CurDir => {}
                    Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                        return Err(TxError::OutsideWorkspace {
                            path: p.clone(),
                            workspace: self.meta.workspace.clone(),
                        });
                    }
                }
            }
            out.push(clean);
        }
        Ok(out)
    }
}

/// Whether `path` is selected by `only` (empty selects everything): equal to or below one of
/// its paths (an empty path selects everything too).
fn selected(only: &[PathBuf], path: &Path) -> bool {
    only.is_empty() || only.iter().any(|o| path.starts_with(o))
}

/// Paths as JSON: a string when valid UTF-8, otherwise an array of bytes (lossless).
mod pathser {
    use std::{
        ffi::OsString,
        os::unix::ffi::{OsStrExt as _, OsStringExt as _},
        path::{Path, PathBuf},
    };

    use serde::{Deserialize, Deserializer, Serialize as _, Serializer};

    pub fn serialize<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
        match path.to_str() {
            Some(p) => s.serialize_str(p),
            None => path.as_os_str().as_bytes().serialize(s),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Str(String),
        Bytes(Vec<u8>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        Ok(match Raw::deserialize(d)? {
            Raw::Str(s) => PathBuf::from(s),
            Raw::Bytes(b) => PathBuf::from(OsString::from_vec(b)),
        })
    }

    pub mod opt {
        use std::path::PathBuf;

        use serde::Serializer;

        pub fn serialize<S: Serializer>(path: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
            match path {
                Some(p) => super::serialize(p, s),
                None => s.serialize_none(),
            }
        }
    }
}
