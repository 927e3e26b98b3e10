//! [`AuditLog`]: appends records to the log, continues its chain across restarts and
//! crashes, and rotates it.
//!
//! - The file is opened `O_APPEND|O_CREAT|O_NOFOLLOW|O_CLOEXEC`, mode 0600, must be a
//!   regular file owned by this process's user and writable by no one else, and is held
//!   under an exclusive `flock` (two writers would fork the chain).
//! - Each record is one `write(2)` of its line and newline, then `fdatasync` (every
//!   [`Options::sync_every`] records; 1 by default, so a crash loses at most the record
//!   being written).
//! - Opening reads the file backwards to its last valid record and continues the chain
//!   from it with an `open` record. Bytes after that record (an interrupted write) are
//!   left in place and noted in the `open` record (`partial`: length and SHA-256), which
//!   starts on a line of its own; `verify` accepts exactly those bytes there.
//! - An I/O error poisons the handle: the next append reopens the log as above, so the
//!   chain continues from whatever reached the disk.
//! - [`AuditLog::rotate`] renames `PATH.k` to `PATH.k+1` (dropping `PATH.keep`), `PATH` to
//!   `PATH.1`, and starts a new `PATH` with a `rotate` record whose `prev` is the hash of
//!   the last record of `PATH.1`. If agentd stops between the rename and that record, the
//!   next open finds `PATH` without records and writes the `rotate` record then.

use std::{
    ffi::OsString,
    fs::{File, OpenOptions},
    io::{self, Write as _},
    num::{NonZeroU32, NonZeroUsize},
    os::unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

use super::record::{self, Actor, Body, Control, FORMAT_VERSION, Head, Open, Partial, Rotate};
use crate::event::{Event, rfc3339_now};

/// Records longer than this are refused by the writer and by `verify`: an event is a few
/// hundred bytes, and a bound keeps a corrupt file from exhausting memory.
pub const MAX_LINE: usize = 1 << 20;

/// How far back [`last_record`] reads at first; it doubles until it finds a record.
const TAIL_CHUNK: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {}: cannot open: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("audit log {}: is a symbolic link; give the real path", path.display())]
    Symlink { path: PathBuf },
    #[error("audit log {}: not a regular file", path.display())]
    NotRegular { path: PathBuf },
    #[error(
        "audit log {}: owned by uid {owner}, not by this process's uid {uid}: another user could rewrite it",
        path.display()
    )]
    Owner { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "audit log {}: mode {mode:04o} lets other users write it (hint: chmod 600 {})",
        path.display(),
        path.display()
    )]
    Writable { path: PathBuf, mode: u32 },
    #[error("audit log {}: locked by another process (is another agentd writing it?)", path.display())]
    Locked { path: PathBuf },
    #[error("audit log {}: cannot lock (flock): {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("audit log {}: cannot read its last record: {source}", path.display())]
    ReadTail {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("audit log {}: record {seq}: cannot encode: {source}", path.display())]
    Encode {
        path: PathBuf,
        seq: u64,
        #[source]
        source: serde_json::Error,
    },
    #[error("audit log {}: record {seq} is {len} bytes, more than {MAX_LINE}", path.display())]
    TooLarge { path: PathBuf, seq: u64, len: usize },
    #[error("audit log {}: record {seq}: cannot write: {source}", path.display())]
    Write {
        path: PathBuf,
        seq: u64,
        #[source]
        source: io::Error,
    },
    #[error("audit log {}: cannot sync to disk (fdatasync): {source}", path.display())]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("audit log {}: cannot sync its directory (fsync): {source}", path.display())]
    SyncDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("audit log {}: cannot rotate: {op} {}: {source}", path.display(), file.display())]
    Rotate {
        path: PathBuf,
        op: &'static str,
        file: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Durability and retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// `fdatasync` after this many records (and on rotation, [`AuditLog::sync`] and drop).
    /// 1, the default, loses at most the record being written in a crash; N loses at most
    /// the last N.
    pub sync_every: NonZeroU32,
    /// Rotated files kept: `PATH.1` … `PATH.keep`; rotation deletes `PATH.keep`.
    pub keep: NonZeroUsize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            sync_every: NonZeroU32::MIN,
            keep: NonZeroUsize::new(10).unwrap_or(NonZeroUsize::MIN),
        }
    }
}

/// Records written to an [`AuditLog`] and not yet on disk: [`PendingSync::sync`] makes
/// them durable (a descriptor of the log's file, so no lock is needed for it).
#[derive(Debug)]
pub struct PendingSync {
    file: File,
    path: PathBuf,
    records: u32,
}

impl PendingSync {
    /// `fdatasync`: returns how many records it made durable.
    pub fn sync(self) -> Result<u32, AuditError> {
        self.file.sync_data().map_err(|source| AuditError::Sync {
            path: self.path,
            source,
        })?;
        Ok(self.records)
    }
}

/// The append-only, hash-chained audit log. One per file per host (it holds a `flock`);
/// share it between threads behind a `Mutex`: each append is one record, in chain order.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    options: Options,
    /// `None` after an I/O error: the next append reopens the log.
    file: Option<Flock<File>>,
    /// The last record written.
    head: Head,
    /// Records written since the last `fdatasync`.
    unsynced: u32,
}

impl AuditLog {
    /// Opens (or creates) the log at `path` with the default [`Options`], and writes an
    /// `open` record.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        AuditLog::open_with(path, Options::default())
    }

    pub fn open_with(path: &Path, options: Options) -> Result<AuditLog, AuditError> {
        let mut log = AuditLog {
            path: path.to_path_buf(),
            options,
            file: None,
            head: Head::GENESIS,
            unsynced: 0,
        };
        log.reopen()?;
        Ok(log)
    }

    /// The last record written (operators may keep it, for `verify --expect-head`).
    pub fn head(&self) -> Head {
        self.head
    }

    /// Appends an event; returns its position in the chain.
    pub fn append_event(&mut self, event: &Event) -> Result<Head, AuditError> {
        self.append(Body::Event(event))
    }

    /// Appends a control action: `action` on `agent`, asked for by `by`.
    pub fn append_control(&mut self, control: &Control) -> Result<Head, AuditError> {
        self.append(Body::Control(control))
    }

    /// Forces what was written to disk (with [`Options::sync_every`] > 1).
    pub fn sync(&mut self) -> Result<(), AuditError> {
        if self.unsynced == 0 {
            return Ok(());
        }
        let Some(file) = &self.file else {
            return Ok(());
        };
        if let Err(source) = file.sync_data() {
            self.file = None;
            return Err(AuditError::Sync {
                path: self.path.clone(),
                source,
            });
        }
        self.unsynced = 0;
        Ok(())
    }

    /// What was written so far, to be made durable by the caller after it lets go of
    /// this log (group commit: one `fdatasync` for many records, and none under the lock
    /// others wait on). Another thread's sync may have taken the records this one wrote:
    /// syncing anyway is what makes them durable before this caller goes on. `None`: the
    /// log is not open (an I/O error; the next append reopens it).
    pub fn pending_sync(&mut self) -> Result<Option<PendingSync>, AuditError> {
        let Some(file) = &self.file else {
            return Ok(None);
        };
        let file = file.try_clone().map_err(|source| AuditError::Sync {
            path: self.path.clone(),
            source,
        })?;
        let records = std::mem::take(&mut self.unsynced);
        Ok(Some(PendingSync {
            file,
            path: self.path.clone(),
            records,
        }))
    }

    /// Rotates: `PATH` becomes `PATH.1` (older files shift up, `PATH.keep` is deleted) and
    /// a new `PATH` begins with a `rotate` record linking it to the last record of `PATH.1`.
    pub fn rotate(&mut self) -> Result<Head, AuditError> {
        if self.file.is_none() {
            self.reopen()?;
        }
        self.unsynced = self.unsynced.max(1);
        self.sync()?;
        let result = self.rotate_files();
        if result.is_err() {
            // Whatever happened on disk, the next append finds the chain there.
            self.file = None;
        }
        result
    }

    fn rotate_files(&mut self) -> Result<Head, AuditError> {
        let keep = self.options.keep.get();
        let rotate_err = |op, file: &Path| {
            let path = self.path.clone();
            let file = file.to_path_buf();
            move |source| AuditError::Rotate {
                path,
                op,
                file,
                source,
            }
        };
        let oldest = rotated(&self.path, keep);
        match std::fs::remove_file(&oldest) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(rotate_err("remove", &oldest)(e));
            }
            Ok(()) | Err(_) => {}
        }
        // Oldest first, so that no file is overwritten. A missing file (a rotation that
        // stopped half-way) is skipped: verification follows the hashes, not the names.
        for k in (1..keep).rev() {
            let from = rotated(&self.path, k);
            match std::fs::rename(&from, rotated(&self.path, k + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(rotate_err("rename", &from)(e));
                }
                Ok(()) | Err(_) => {}
            }
        }
        let first = rotated(&self.path, 1);
        std::fs::rename(&self.path, &first).map_err(rotate_err("rename", &self.path))?;
        sync_dir(&self.path)?;
        self.file = Some(open_locked(&self.path, true)?);
        let rotate = Rotate {
            version: FORMAT_VERSION,
            previous: file_name(&first),
            partial: None,
        };
        let head = self.write(Body::Rotate(&rotate), false)?;
        self.unsynced = self.unsynced.max(1);
        self.sync()?;
        sync_dir(&self.path)?;
        Ok(head)
    }

    fn append(&mut self, body: Body<'_>) -> Result<Head, AuditError> {
        if self.file.is_none() {
            self.reopen()?;
        }
        let head = self.write(body, false)?;
        if self.unsynced >= self.options.sync_every.get() {
            self.sync()?;
        }
        Ok(head)
    }

    /// Opens the file and continues its chain: finds the last valid record, notes any
    /// remnant after it, and writes an `open` record (after a `rotate` record if the file
    /// has no record yet and `PATH.1` exists).
    fn reopen(&mut self) -> Result<(), AuditError> {
        self.file = None;
        let file = open_locked(&self.path, false)?;
        let read_err = |source| AuditError::ReadTail {
            path: self.path.clone(),
            source,
        };
        let tail = last_record(&file).map_err(read_err)?;
        let remnant = read_from(&file, tail.end).map_err(read_err)?;
        let was_empty = tail.end == 0 && remnant.is_empty();
        self.file = Some(file);
        self.unsynced = 0;
        // The remnant stays; the next record starts on a line of its own and notes it
        // (without the newline before that record).
        let (newline, partial) = match remnant.strip_suffix(b"\n") {
            _ if remnant.is_empty() => (false, None),
            Some(r) => (false, Some(Partial::of(r))),
            None => (true, Some(Partial::of(&remnant))),
        };
        let open = |partial| Open {
            version: FORMAT_VERSION,
            pid: std::process::id(),
            partial,
        };
        match tail.head {
            Some(head) => {
                self.head = head;
                self.write(Body::Open(&open(partial)), newline)?;
            }
            None => {
                let previous = rotated(&self.path, 1);
                match last_record_of(&previous).map_err(read_err)? {
                    Some(head) => {
                        self.head = head;
                        let rotate = Rotate {
                            version: FORMAT_VERSION,
                            previous: file_name(&previous),
                            partial,
                        };
                        self.write(Body::Rotate(&rotate), newline)?;
                        self.write(Body::Open(&open(None)), false)?;
                    }
                    None => {
                        self.head = Head::GENESIS;
                        self.write(Body::Open(&open(partial)), newline)?;
                    }
                }
            }
        }
        self.sync()?;
        if was_empty {
            sync_dir(&self.path)?;
        }
        Ok(())
    }

    /// Writes one record (and a newline before it if `newline`) in one `write(2)`.
    fn write(&mut self, body: Body<'_>, newline: bool) -> Result<Head, AuditError> {
        let seq = self.head.seq + 1;
        let (line, hash) =
            record::encode(seq, &rfc3339_now(), self.head.hash, body).map_err(|source| {
                AuditError::Encode {
                    path: self.path.clone(),
                    seq,
                    source,
                }
            })?;
        if line.len() > MAX_LINE {
            return Err(AuditError::TooLarge {
                path: self.path.clone(),
                seq,
                len: line.len(),
            });
        }
        let mut buf = Vec::with_capacity(line.len() + 2);
        if newline {
            buf.push(b'\n');
        }
        buf.extend_from_slice(&line);
        buf.push(b'\n');
        let Some(file) = &self.file else {
            return Err(AuditError::Write {
                path: self.path.clone(),
                seq,
                source: io::Error::from(io::ErrorKind::NotConnected),
            });
        };
        // One write(2) on an O_APPEND file; write_all issues another only after a short
        // write (a full disk), and then the handle is poisoned below if that fails.
        if let Err(source) = (&**file).write_all(&buf) {
            self.file = None;
            return Err(AuditError::Write {
                path: self.path.clone(),
                seq,
                source,
            });
        }
        self.head = Head { seq, hash };
        self.unsynced += 1;
        Ok(self.head)
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        if let Err(e) = self.sync() {
            tracing::warn!("{e}");
        }
    }
}

/// An event sink for the supervisor's event writer (`run/events.rs`) and the daemon: every
/// event it is given is appended to the audit log at `path`, which is opened (and its
/// chain continued) now. The log's `flock` is held as long as the closure lives.
///
/// ```ignore
/// let mut audit = audit::sink(Path::new("/var/log/agentd/audit.log"))?;
/// while let Some(event) = rx.recv().await {
///     audit(&event)?; // one record, fdatasync'd
/// }
/// ```
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "for run/events.rs and the daemon, which plug it in"
    )
)]
pub fn sink(
    path: &Path,
) -> Result<impl FnMut(&Event) -> io::Result<()> + Send + 'static, AuditError> {
    let mut log = AuditLog::open(path)?;
    Ok(move |event: &Event| log.append_event(event).map(drop).map_err(io::Error::other))
}

/// This process as the [`Actor`] of a control action it takes on its own behalf.
pub fn this_process() -> Actor {
    Actor {
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        pid: std::process::id(),
    }
}

/// `PATH.k`.
pub fn rotated(path: &Path, k: impl std::fmt::Display) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(format!(".{k}"));
    PathBuf::from(name)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Opens the log for appending, checks what it is, and locks it.
fn open_locked(path: &Path, create_new: bool) -> Result<Flock<File>, AuditError> {
    let mut options = OpenOptions::new();
    options
        .read(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if create_new {
        options.create_new(true);
    } else {
        options.create(true);
    }
    let file = options.open(path).map_err(|source| {
        if source.raw_os_error() == Some(libc::ELOOP) {
            AuditError::Symlink {
                path: path.to_path_buf(),
            }
        } else {
            AuditError::Open {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let meta = file.metadata().map_err(|source| AuditError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(AuditError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(AuditError::Owner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            uid,
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(AuditError::Writable {
            path: path.to_path_buf(),
            mode: meta.mode() & 0o7777,
        });
    }
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            AuditError::Locked {
                path: path.to_path_buf(),
            }
        } else {
            AuditError::Lock {
                path: path.to_path_buf(),
                source: errno,
            }
        }
    })
}

/// `fsync` of the directory holding `path`, so that a created or renamed file survives a
/// crash.
fn sync_dir(path: &Path) -> Result<(), AuditError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        Some(_) | None => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| AuditError::SyncDir {
            path: path.to_path_buf(),
            source,
        })
}

/// The last valid record of a file and where the bytes after it begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tail {
    /// The last line (newline-terminated) that is a valid record; `None` if none is.
    pub head: Option<Head>,
    /// Offset just after that record's newline (0 without a record).
    pub end: u64,
}

/// Finds the last valid record by reading backwards, [`TAIL_CHUNK`] bytes and doubling.
/// Only the record's own hash and form are checked; its link to the records before it is
/// `verify`'s business.
pub fn last_record(file: &File) -> io::Result<Tail> {
    let len = file.metadata()?.len();
    let mut chunk = TAIL_CHUNK;
    loop {
        let start = len.saturating_sub(chunk);
        let buf = read_range(file, start, len)?;
        // Lines wholly inside the buffer: skip the (possibly cut) first one unless the
        // buffer starts the file.
        let skip = if start == 0 {
            0
        } else {
            match buf.iter().position(|&b| b == b'\n') {
                Some(i) => i + 1,
                None => {
                    chunk = chunk.saturating_mul(2);
                    continue;
                }
            }
        };
        let region = &buf[skip..];
        // `region[..end]` ends with a newline; its last line is `region[begin..end - 1]`.
        let mut end = match region.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None => 0,
        };
        while end > 0 {
            let begin = region[..end - 1]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            if let Ok(rec) = record::parse(&region[begin..end - 1]) {
                return Ok(Tail {
                    head: Some(rec.head()),
                    end: start + (skip + end) as u64,
                });
            }
            end = begin;
        }
        if start == 0 {
            return Ok(Tail { head: None, end: 0 });
        }
        chunk = chunk.saturating_mul(2);
    }
}

/// The last valid record of the file at `path`, if it exists.
fn last_record_of(path: &Path) -> io::Result<Option<Head>> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => Ok(last_record(&f)?.head),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn read_from(file: &File, start: u64) -> io::Result<Vec<u8>> {
    read_range(file, start, file.metadata()?.len())
}

fn read_range(file: &File, start: u64, end: u64) -> io::Result<Vec<u8>> {
    let len = usize::try_from(end.saturating_sub(start)).map_err(io::Error::other)?;
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, start)?;
    Ok(buf)
}
