//! The programs agents' profiles ask a person about (`filesystem.ask_exec`): the
//! `ASK_EXEC` and `EXEC_GRANT` maps the exec program consults (agentd-ebpf
//! `proc::try_exec`), and how user space names a file the way that program does.
//!
//! The exec program names the file an exec loaded by `(i_sb->s_dev, i_ino)`, the device
//! in the kernel's encoding (`major << 20 | minor`). stat(2) reports `st_dev` in another
//! encoding (`encode::kernel_dev`), and on some filesystems another device altogether: overlayfs
//! (the workspace of a transaction) reports the underlying filesystem's, btrfs a
//! per-subvolume one. [`exec_file`] gives the superblock's.
//!
//! Map formats (agentd-common `ExecKey`, `ExecGrant`):
//! - `ASK_EXEC`: (agent cgroup id, dev, ino) -> CLOCK_MONOTONIC ns until which the agent
//!   may run the file without asking (0: every exec needs its own approval). An agent
//!   process that loads such a file with the value at or before now is killed at exec.
//! - `EXEC_GRANT`: the global id of the thread whose exec a person approved once ->
//!   (agent cgroup id, dev, ino) of the file approved. Deleted by the kernel at that
//!   thread's next exec, which is killed if it loaded another file.

use std::{
    io,
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::fs::OpenOptionsExt as _,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use agentd_common::{ExecGrant, ExecKey};
use aya::maps::{HashMap, MapData, MapError};

use super::encode::{PER_SUBVOLUME_INODES, kernel_dev as mkdev, mountinfo_dev};

#[derive(Debug, thiserror::Error)]
pub enum ExecGateError {
    #[error("cannot {action} BPF map {map}: {source}")]
    Map {
        map: &'static str,
        action: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{}: {call}: {source}", path.display())]
    File {
        path: PathBuf,
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{}: its mount (id {mnt_id}) is not in the mountinfo given (read the mountinfo of \
         a process in the mount namespace the path resolves in)",
        path.display()
    )]
    Mount { path: PathBuf, mnt_id: u64 },
    #[error("{}: device {major}:{minor} does not fit the kernel's encoding", path.display())]
    Device {
        path: PathBuf,
        major: u64,
        minor: u64,
    },
}

/// A file as the exec program names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExecFile {
    /// Its superblock's device (`i_sb->s_dev`), kernel encoding.
    pub dev: u64,
    /// Its inode number.
    pub ino: u64,
    /// The filesystem numbers inodes per subvolume under one superblock (btrfs,
    /// bcachefs): another subvolume's file may have the same `(dev, ino)`. An ask entry
    /// then also holds that file (its exec is killed unless approved), and a once grant
    /// also accepts it.
    pub ambiguous: bool,
}

/// The file at `path` (symbolic links followed, as exec does) as the exec program will
/// name it: its mount's superblock device from `mountinfo` (the text of
/// `/proc/<pid>/mountinfo` of a process in the mount namespace `path` resolves in; for a
/// path under `/proc/<pid>/root`, that pid's), and its inode number.
pub fn exec_file(path: &Path, mountinfo: &str) -> Result<ExecFile, ExecGateError> {
    let file_err = |call: &'static str| {
        move |source| ExecGateError::File {
            path: path.to_owned(),
            call,
            source,
        }
    };
    let fd: OwnedFd = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
        .map_err(file_err("open"))?
        .into();
    let (ino, mnt_id) = statx_ino_mnt(&fd).map_err(file_err("statx"))?;
    let ((major, minor), fstype) =
        mountinfo_dev(mountinfo, mnt_id).ok_or_else(|| ExecGateError::Mount {
            path: path.to_owned(),
            mnt_id,
        })?;
    let dev = mkdev(major, minor).ok_or_else(|| ExecGateError::Device {
        path: path.to_owned(),
        major,
        minor,
    })?;
    Ok(ExecFile {
        dev: u64::from(dev),
        ino,
        ambiguous: PER_SUBVOLUME_INODES.contains(&fstype.as_str()),
    })
}

/// The inode number and mount id of the file open at `fd` (statx, Linux 5.8).
fn statx_ino_mnt(fd: &OwnedFd) -> io::Result<(u64, u64)> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open, the path is an empty NUL-terminated string (AT_EMPTY_PATH:
    // the file of `fd` itself), and `stx` a writable statx.
    let rc = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_INO | libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let want = libc::STATX_INO | libc::STATX_MNT_ID;
    if stx.stx_mask & want != want {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the kernel reported no inode number or mount id",
        ));
    }
    Ok((stx.stx_ino, stx.stx_mnt_id))
}

const ASK_EXEC: &str = "ASK_EXEC";
const EXEC_GRANT: &str = "EXEC_GRANT";

#[derive(Debug)]
struct Maps {
    ask: HashMap<MapData, ExecKey, u64>,
    grants: HashMap<MapData, u32, ExecGrant>,
}

/// A handle on the exec gate's maps, shared by whoever answers held execs and the
/// watch (which clears an agent's entries when it removes the agent).
#[derive(Debug, Clone)]
pub struct ExecGate(Arc<Mutex<Maps>>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn map_err(map: &'static str, action: &'static str) -> impl FnOnce(MapError) -> ExecGateError {
    move |source| ExecGateError::Map {
        map,
        action,
        source,
    }
}

fn absent(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound | MapError::ElementNotFound)
}

/// The value of `key` in `ASK_EXEC`, None when it has none.
fn ask_entry(m: &Maps, key: &ExecKey) -> Result<Option<u64>, ExecGateError> {
    match m.ask.get(key, 0) {
        Ok(v) => Ok(Some(v)),
        Err(e) if absent(&e) => Ok(None),
        Err(e) => Err(map_err(ASK_EXEC, "look up an entry of")(e)),
    }
}

impl ExecGate {
    pub(super) fn new(
        ask: HashMap<MapData, ExecKey, u64>,
        grants: HashMap<MapData, u32, ExecGrant>,
    ) -> ExecGate {
        ExecGate(Arc::new(Mutex::new(Maps { ask, grants })))
    }

    /// Makes the file `(dev, ino)` (kernel encoding, see [`exec_file`]) one the agent in
    /// cgroup `cgroup_id` may run only with a person's approval. An approval it already
    /// has stays. Call it before the agent's first process runs.
    pub fn set_ask(&self, cgroup_id: u64, dev: u64, ino: u64) -> Result<(), ExecGateError> {
        let key = ExecKey {
            cgroup_id,
            dev,
            ino,
        };
        let mut m = lock(&self.0);
        if ask_entry(&m, &key)?.is_some() {
            return Ok(());
        }
        m.ask
            .insert(key, 0, 0)
            .map_err(map_err(ASK_EXEC, "insert into"))
    }

    /// Lets the agent in cgroup `cgroup_id` run the file `(dev, ino)` without asking
    /// until `expires_ns` (CLOCK_MONOTONIC ns; `u64::MAX` for its whole session). A
    /// later approval it already has stays.
    pub fn grant_until(
        &self,
        cgroup_id: u64,
        dev: u64,
        ino: u64,
        expires_ns: u64,
    ) -> Result<(), ExecGateError> {
        let key = ExecKey {
            cgroup_id,
            dev,
            ino,
        };
        let mut m = lock(&self.0);
        let until = ask_entry(&m, &key)?.map_or(expires_ns, |v| v.max(expires_ns));
        m.ask
            .insert(key, until, 0)
            .map_err(map_err(ASK_EXEC, "insert into"))
    }

    /// Takes back the approvals of the file `(dev, ino)` given with
    /// [`ExecGate::grant_until`]: the agent is asked again at its next exec of it.
    pub fn revoke(&self, cgroup_id: u64, dev: u64, ino: u64) -> Result<(), ExecGateError> {
        let key = ExecKey {
            cgroup_id,
            dev,
            ino,
        };
        let mut m = lock(&self.0);
        if ask_entry(&m, &key)?.is_none() {
            return Ok(());
        }
        m.ask
            .insert(key, 0, 0)
            .map_err(map_err(ASK_EXEC, "insert into"))
    }

    /// Lets thread `tid` (its global id, as a seccomp notification names it to a
    /// supervisor in the initial pid namespace) of the agent in cgroup `cgroup_id` run
    /// the file `(dev, ino)` once: its next exec, which must load that file or is killed.
    /// Written before it returns: the caller lets the held exec go on after. Replaces a
    /// grant of the thread not used.
    pub fn grant_once(
        &self,
        cgroup_id: u64,
        tid: u32,
        dev: u64,
        ino: u64,
    ) -> Result<(), ExecGateError> {
        let grant = ExecGrant {
            cgroup_id,
            dev,
            ino,
        };
        lock(&self.0)
            .grants
            .insert(tid, grant, 0)
            .map_err(map_err(EXEC_GRANT, "insert into"))
    }

    /// Withdraws a once grant of thread `tid` that no exec used (the approved exec failed
    /// before loading anything, or the thread's next exec is not the one approved).
    /// Absent: nothing to do.
    pub fn revoke_once(&self, tid: u32) -> Result<(), ExecGateError> {
        match lock(&self.0).grants.remove(&tid) {
            Ok(()) => Ok(()),
            Err(e) if absent(&e) => Ok(()),
            Err(e) => Err(map_err(EXEC_GRANT, "remove from")(e)),
        }
    }

    /// Removes every entry of the agent in cgroup `cgroup_id` (it ended), from both maps.
    pub fn clear_agent(&self, cgroup_id: u64) -> Result<(), ExecGateError> {
        let mut m = lock(&self.0);
        // Collected first: deleting while walking a BPF hash map can restart the walk.
        let asks: Vec<ExecKey> = m
            .ask
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(ASK_EXEC, "list the keys of"))?
            .into_iter()
            .filter(|k| k.cgroup_id == cgroup_id)
            .collect();
        let grants: Vec<u32> = m
            .grants
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(EXEC_GRANT, "list the entries of"))?
            .into_iter()
            .filter(|(_, g)| g.cgroup_id == cgroup_id)
            .map(|(tid, _)| tid)
            .collect();
        for k in &asks {
            match m.ask.remove(k) {
                Ok(()) => {}
                Err(e) if absent(&e) => {}
                Err(e) => return Err(map_err(ASK_EXEC, "remove from")(e)),
            }
        }
        for tid in &grants {
            match m.grants.remove(tid) {
                Ok(()) => {}
                Err(e) if absent(&e) => {}
                Err(e) => return Err(map_err(EXEC_GRANT, "remove from")(e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_file_names_the_mounts_superblock() {
        // The file's mount from this process's own mountinfo: its superblock device
        // agrees with stat(2) on the filesystems tests run on, except overlayfs and
        // btrfs, where it is the one the kernel reads.
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let exe = std::env::current_exe().unwrap();
        let f = exec_file(&exe, &text).unwrap();
        let md = std::fs::metadata(&exe).unwrap();
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(f.ino, md.ino());
        let (_, fstype) = mountinfo_dev(
            &text,
            statx_ino_mnt(&std::fs::File::open(&exe).unwrap().into())
                .unwrap()
                .1,
        )
        .unwrap();
        if !["overlay", "btrfs", "bcachefs"].contains(&fstype.as_str()) {
            assert_eq!(
                Some(f.dev),
                super::super::encode::kernel_dev_of_st_dev(md.dev()).map(u64::from)
            );
        }
        // A mount the text does not list: said, not guessed.
        assert!(matches!(
            exec_file(&exe, ""),
            Err(ExecGateError::Mount { .. })
        ));
        assert!(matches!(
            exec_file(Path::new("/nonexistent/agentd"), &text),
            Err(ExecGateError::File { call: "open", .. })
        ));
    }
}
