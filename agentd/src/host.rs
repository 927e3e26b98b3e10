//! Facts about the host and the invoking user that several commands need.

use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use nix::unistd::{Uid, User};

/// Where agentd keeps its state (agents' records, transactions), embedded or as a daemon
/// (`--state-dir`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/agentd";

/// The directory `{workspace}` stands for: `dir`, or the current directory; absolute and
/// with symlinks resolved, so Landlock rules name the real directory.
pub fn workspace_dir(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = match dir {
        Some(d) => d,
        None => std::env::current_dir().context("cannot read the current directory")?,
    };
    let real = dir
        .canonicalize()
        .with_context(|| format!("workspace {} does not exist", dir.display()))?;
    anyhow::ensure!(
        real.is_dir(),
        "workspace {} is not a directory",
        real.display()
    );
    Ok(real)
}

/// The uid agentd acts for: `SUDO_UID` when agentd was started through sudo, else the
/// real uid.
pub fn invoker_uid() -> Uid {
    std::env::var("SUDO_UID")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .map_or_else(Uid::current, Uid::from_raw)
}

/// Home directory of the invoking user, from the password database; `/nonexistent` when
/// the user has none (so `{home}` rules match nothing rather than something unintended).
pub fn invoker_home() -> PathBuf {
    match User::from_uid(invoker_uid()) {
        Ok(Some(u)) => u.dir,
        _ => PathBuf::from("/nonexistent"),
    }
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fstype: String,
    /// Per-superblock options; for cgroup v1 these name the controllers.
    pub super_options: String,
}

/// Parses mountinfo text (see proc(5)): fields up to ` - ` are per mount, then fstype,
/// source and superblock options. Octal escapes (`\040`) in paths are decoded.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fstype = post.next()?.to_owned();
            let _source = post.next()?;
            let super_options = post.next().unwrap_or("").to_owned();
            Some(Mount {
                mount_point: PathBuf::from(unescape_octal(mount_point)),
                fstype,
                super_options,
            })
        })
        .collect()
}

fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            out.push(
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'),
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mounts of this process's mount namespace.
pub fn mounts() -> std::io::Result<Vec<Mount>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// Where cgroup v2 is mounted: the unified hierarchy at /sys/fs/cgroup, or the hybrid
/// layout's /sys/fs/cgroup/unified, or wherever else it is.
pub fn cgroup2_mount(mounts: &[Mount]) -> Option<PathBuf> {
    let v2: Vec<&Mount> = mounts.iter().filter(|m| m.fstype == "cgroup2").collect();
    for preferred in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if let Some(m) = v2
            .iter()
            .find(|m| m.mount_point == std::path::Path::new(preferred))
        {
            return Some(m.mount_point.clone());
        }
    }
    v2.first().map(|m| m.mount_point.clone())
}

/// Where the cgroup v1 hierarchy carrying `controller` (e.g. `pids`, `memory`) is mounted.
pub fn cgroup1_mount(mounts: &[Mount], controller: &str) -> Option<PathBuf> {
    mounts
        .iter()
        .find(|m| m.fstype == "cgroup" && m.super_options.split(',').any(|o| o == controller))
        .map(|m| m.mount_point.clone())
}

/// An agent's identity as the kernel's permission checks see it: its filesystem uid,
/// gid and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// What an operation needs of the files on its path, for [`Creds::permits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileAccess {
    /// Read the file (or list the directory).
    Read,
    /// Change the file's contents or attributes; when it does not exist, create it.
    Write,
    /// Execute the file.
    Exec,
    /// Create, remove or rename the name in its directory.
    Entry,
}

impl Creds {
    /// Whether these creds may do `access` on the absolute path `path` by the permissions
    /// of the files on the way, as the kernel checks them before any security module:
    /// search (x) on every directory from `/` to the parent, then what `access` needs of
    /// the file (or, to create or remove a name, write and search on its directory).
    /// `Some(false)`: the owner, group and mode bits refuse it. `None` when it cannot tell
    /// (a component missing or unreadable, a POSIX ACL on the way, whose entries are not
    /// read here): the caller then does not blame the permissions.
    pub fn permits(&self, path: &Path, access: FileAccess) -> Option<bool> {
        if !path.is_absolute() {
            return None;
        }
        let parent = path.parent();
        for dir in path.ancestors().skip(1) {
            let meta = std::fs::metadata(dir).ok()?;
            if has_acl(dir) {
                return None;
            }
            if !self.mode_allows(&meta, 0o1) {
                return Some(false);
            }
        }
        let target = match std::fs::metadata(path) {
            Ok(meta) => Some(meta),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(_) => return None,
        };
        let (file, bits) = match (access, target) {
            (FileAccess::Read, Some(m)) => (m, 0o4),
            (FileAccess::Write, Some(m)) => (m, 0o2),
            (FileAccess::Exec, Some(m)) => (m, 0o1),
            (FileAccess::Entry | FileAccess::Write, _) => {
                let dir = parent?;
                (std::fs::metadata(dir).ok()?, 0o3)
            }
            // Nothing to read or run: the call failed on its own (ENOENT).
            (FileAccess::Read | FileAccess::Exec, None) => return None,
        };
        let checked = if bits == 0o3 { parent? } else { path };
        if has_acl(checked) {
            return None;
        }
        Some(self.mode_allows(&file, bits))
    }

    /// Whether the permission class these creds fall in (owner, group, other) has every
    /// bit of `want` (r=4, w=2, x=1).
    fn mode_allows(&self, meta: &std::fs::Metadata, want: u32) -> bool {
        let mode = meta.mode();
        let class = if meta.uid() == self.uid {
            mode >> 6
        } else if meta.gid() == self.gid || self.groups.contains(&meta.gid()) {
            mode >> 3
        } else {
            mode
        };
        class & want == want
    }
}

/// Whether `path` carries a POSIX access ACL (the mode's group bits are then its mask,
/// and named entries may grant more).
fn has_acl(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return true;
    };
    // SAFETY: both strings are NUL-terminated and live across the call; a NULL buffer of
    // size 0 asks only for the value's size.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    n >= 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:22 / /sys rw,nosuid - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
35 31 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
36 31 0:31 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
37 31 0:32 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
40 25 0:35 / /mnt/with\\040space rw - tmpfs tmpfs rw
";

    #[test]
    fn hybrid_layout() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(
            cgroup2_mount(&m),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup1_mount(&m, "pids"),
            Some(PathBuf::from("/sys/fs/cgroup/pids"))
        );
        assert_eq!(
            cgroup1_mount(&m, "cpu"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(cgroup1_mount(&m, "cpuset"), None);
        assert!(
            m.iter()
                .any(|x| x.mount_point == std::path::Path::new("/mnt/with space"))
        );
    }

    #[test]
    fn permits_checks_search_on_the_way_and_the_files_bits() {
        use std::os::unix::fs::PermissionsExt as _;
        let chmod = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        let dir = tempfile::tempdir().unwrap();
        let meta = std::fs::metadata(dir.path()).unwrap();
        // A stranger to the directory's owner and group.
        let other = Creds {
            uid: meta.uid().wrapping_add(4242),
            gid: meta.gid().wrapping_add(4242),
            groups: vec![],
        };
        let owner = Creds {
            uid: meta.uid(),
            gid: meta.gid(),
            groups: vec![],
        };
        let file = dir.path().join("tool");
        std::fs::write(&file, "x").unwrap();
        chmod(&file, 0o755);
        chmod(dir.path(), 0o700);
        assert_eq!(
            other.permits(&file, FileAccess::Exec),
            Some(false),
            "its directory cannot be searched"
        );
        assert_eq!(owner.permits(&file, FileAccess::Exec), Some(true));
        chmod(dir.path(), 0o755);
        assert_eq!(other.permits(&file, FileAccess::Exec), Some(true));
        assert_eq!(other.permits(&file, FileAccess::Read), Some(true));
        assert_eq!(other.permits(&file, FileAccess::Write), Some(false));
        assert_eq!(
            other.permits(&dir.path().join("new"), FileAccess::Write),
            Some(false),
            "creating needs write on the directory"
        );
        assert_eq!(other.permits(&file, FileAccess::Entry), Some(false));
        chmod(dir.path(), 0o777);
        assert_eq!(other.permits(&file, FileAccess::Entry), Some(true));
        chmod(&file, 0o600);
        assert_eq!(other.permits(&file, FileAccess::Read), Some(false));
        let in_group = Creds {
            groups: vec![meta.gid()],
            ..other.clone()
        };
        chmod(&file, 0o640);
        assert_eq!(in_group.permits(&file, FileAccess::Read), Some(true));
        assert_eq!(
            other.permits(&dir.path().join("missing/x"), FileAccess::Read),
            None,
            "a missing directory: the call failed on its own"
        );
        assert_eq!(other.permits(Path::new("relative"), FileAccess::Read), None);
    }

    #[test]
    fn unified_layout_prefers_sys_fs_cgroup() {
        let m = parse_mountinfo("30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        assert_eq!(cgroup2_mount(&m), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup1_mount(&m, "memory"), None);
    }
}
