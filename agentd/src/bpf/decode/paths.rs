//! A path argument resolved as the kernel resolved it (through the caller's
//! [`Resolver`]), lexical normalisation, and the canary a path is.

use std::path::{Component, Path, PathBuf};

use agentd_common::{EventKind, Syscall};

use super::Resolver;
use crate::profile::CompiledPolicy;

/// The path `raw` (an argument of process `pid`) names, as the resolver finds it (see
/// [`Resolver`]), or `raw` itself.
pub(super) fn resolve_path(
    raw: &str,
    pid: u32,
    dfd: i32,
    follow: bool,
    resolve: Resolver<'_>,
) -> PathBuf {
    if raw.is_empty() {
        return PathBuf::new();
    }
    resolve(pid, dfd, raw, follow).map_or_else(|| PathBuf::from(raw), |p| normalize(&p))
}

/// Whether the call follows a symbolic link in the last component of its (first) path.
pub(super) fn follows_last(kind: EventKind, syscall: Option<Syscall>, aux: u64) -> bool {
    match kind {
        EventKind::OpenWrite | EventKind::OpenRead | EventKind::Canary => {
            let flags = aux as i32;
            let excl = libc::O_CREAT | libc::O_EXCL;
            flags & libc::O_NOFOLLOW == 0 && flags & excl != excl
        }
        EventKind::Chown => syscall != Some(Syscall::Lchown),
        EventKind::Setxattr => syscall != Some(Syscall::Lsetxattr),
        EventKind::Exec | EventKind::Chmod | EventKind::Truncate => true,
        // These act on the link itself (or have no path).
        EventKind::Unlink
        | EventKind::Rename
        | EventKind::Mkdir
        | EventKind::Rmdir
        | EventKind::Link
        | EventKind::Symlink
        | EventKind::Fork
        | EventKind::Exit
        | EventKind::Connect
        | EventKind::Sendmsg
        | EventKind::Bind
        | EventKind::Inbound
        | EventKind::SocketCreate
        | EventKind::Syscall
        | EventKind::Signal => false,
    }
}

/// `p` with `.`, `..` and repeated `/` resolved lexically (symlinks are not followed).
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => out.push(c.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    out
}

/// The policy's canary `path` is, or is beneath, if any.
pub(super) fn canary_of<'a>(policy: &'a CompiledPolicy, path: &Path) -> Option<&'a Path> {
    if !path.is_absolute() {
        return None;
    }
    let path = normalize(path);
    policy
        .canaries
        .iter()
        .find(|c| path.starts_with(c))
        .map(PathBuf::as_path)
}

#[cfg(test)]
mod tests {
    use super::{super::fixtures::policy, *};

    #[test]
    fn normalize_is_lexical() {
        assert_eq!(
            normalize(Path::new("/a//b/./c/../d")),
            PathBuf::from("/a/b/d")
        );
        assert_eq!(normalize(Path::new("/../a")), PathBuf::from("/a"));
        assert!(canary_of(&policy(), Path::new("/home/u/.sshx")).is_none());
        assert!(canary_of(&policy(), Path::new("/home/u/.ssh")).is_some());
    }
}
