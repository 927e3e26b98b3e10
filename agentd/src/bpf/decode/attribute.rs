//! Which layer refused a file operation (seccomp, Landlock, the file's permissions, the
//! agent's view, the kernel's own checks) or a call seen at its exit only, and the
//! verdict.

use std::path::Path;

use agentd_common::{EventKind, Syscall};

use super::{EACCES, ENOSYS, EPERM};
use crate::{
    event::{Layer, Verdict},
    host::FileAccess,
    profile::CompiledPolicy,
};

const EXDEV: i32 = libc::EXDEV;
const EROFS: i32 = libc::EROFS;
const EBUSY: i32 = libc::EBUSY;

/// The access a file operation needed, to compare with the policy's Landlock rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    Read,
    Write,
    Exec,
}

/// Facts about one failed (or not) file operation, for [`attribute`].
#[derive(Debug, Clone, Copy)]
pub(super) struct FileOutcome<'a> {
    pub kind: EventKind,
    pub syscall: Option<Syscall>,
    /// `Some(errno)` when the call failed.
    pub errno: Option<i32>,
    /// The exit was seen without the entry (refused before `sys_enter`).
    pub no_enter: bool,
    pub write_intent: bool,
    /// Absolute paths (resolved), when known: the operation's first and second path.
    pub path: Option<&'a Path>,
    pub path2: Option<&'a Path>,
}

/// Whether the agent's identity may, by the permissions of the files involved, do the
/// operation `kind` needing `need` on an absolute path: `Some(false)` when the owner,
/// group and mode bits refuse it (the kernel checks them before any security module),
/// `None` when it cannot tell (see [`crate::host::Creds::permits`]).
pub(super) type Dac<'a> = &'a dyn Fn(&Path, Need, EventKind) -> Option<bool>;

/// Which layer refused a file operation, and the verdict:
/// - success: the kernel allowed it;
/// - exit without entry, EPERM or ENOSYS: seccomp (its filter runs before the `sys_enter`
///   tracepoints; the `sys_exit` ones still fire);
/// - EPERM on a call the policy's seccomp allow-list lacks: seccomp;
/// - EACCES on a path the policy's Landlock rules do not grant the needed access to (or
///   EXDEV on a rename or link): Landlock; on a granted path: the kernel's own checks (a
///   real cross-filesystem EXDEV included); but EACCES where the agent's identity may not
///   do it by the file's permissions (`dac`): those, checked first by the kernel;
/// - anything else (ENOENT, EEXIST, ...): the call was allowed and failed on its own.
pub(super) fn attribute(
    o: &FileOutcome<'_>,
    policy: Option<&CompiledPolicy>,
    dac: Option<Dac<'_>>,
) -> (Layer, Verdict) {
    let Some(errno) = o.errno else {
        return (Layer::Kernel, Verdict::Allow);
    };
    if o.no_enter && (errno == EPERM || errno == ENOSYS) {
        return (Layer::Seccomp, Verdict::Deny);
    }
    match errno {
        EPERM => {
            let seccomp_refuses = match (policy, o.syscall) {
                (Some(p), Some(s)) => {
                    !p.seccomp.allow.contains(&s.name())
                        && !p.seccomp.allow_if.iter().any(|(n, _)| *n == s.name())
                }
                _ => false,
            };
            if seccomp_refuses {
                (Layer::Seccomp, Verdict::Deny)
            } else {
                (Layer::Kernel, Verdict::Deny)
            }
        }
        // Landlock answers EXDEV to a rename or link whose ends it cannot both grant.
        EACCES | EXDEV
            if errno == EACCES || matches!(o.kind, EventKind::Rename | EventKind::Link) =>
        {
            let Some(policy) = policy else {
                return (Layer::Kernel, Verdict::Deny);
            };
            let (need, paths): (Need, [Option<&Path>; 2]) = match o.kind {
                EventKind::Exec => (Need::Exec, [o.path, None]),
                EventKind::Canary | EventKind::OpenRead if !o.write_intent => {
                    (Need::Read, [o.path, None])
                }
                EventKind::Rename => (Need::Write, [o.path, o.path2]),
                // link and symlink create path2; symlink's path is the link's contents.
                EventKind::Link | EventKind::Symlink => (Need::Write, [o.path2, None]),
                EventKind::OpenWrite
                | EventKind::OpenRead
                | EventKind::Canary
                | EventKind::Unlink
                | EventKind::Mkdir
                | EventKind::Rmdir
                | EventKind::Chmod
                | EventKind::Chown
                | EventKind::Truncate
                | EventKind::Setxattr => (Need::Write, [o.path, None]),
                EventKind::Fork
                | EventKind::Exit
                | EventKind::Connect
                | EventKind::Sendmsg
                | EventKind::Bind
                | EventKind::Inbound
                | EventKind::SocketCreate
                | EventKind::Syscall
                | EventKind::Signal => return (Layer::Kernel, Verdict::Deny),
            };
            let want: fn(&crate::profile::FsAccess) -> bool = match need {
                Need::Read => |a| a.read,
                Need::Write => |a| a.write,
                Need::Exec => |a| a.exec,
            };
            let refused_by_rules = paths
                .iter()
                .flatten()
                .any(|p| p.is_absolute() && !policy.fs_allows(p, want));
            // The file's permissions are checked before any LSM: when they refuse, the
            // rules were never asked (a PATH search through a directory the agent's user
            // cannot enter is no exec outside the profile).
            let permission_refuses = errno == EACCES
                && dac.is_some_and(|dac| {
                    paths
                        .iter()
                        .flatten()
                        .any(|p| p.is_absolute() && dac(p, need, o.kind) == Some(false))
                });
            if permission_refuses {
                (Layer::Permission, Verdict::Deny)
            } else if refused_by_rules {
                (Layer::Landlock, Verdict::Deny)
            } else if errno == EXDEV && in_view(policy, [o.path, o.path2]) {
                (Layer::View, Verdict::Deny)
            } else {
                (Layer::Kernel, Verdict::Deny)
            }
        }
        // The agent's view: a protected path's read-only mount, the read-only /run; a
        // pinned ancestor of a protected path cannot be renamed or removed.
        EROFS if policy.is_some_and(|p| in_view(p, [o.path, o.path2])) => {
            (Layer::View, Verdict::Deny)
        }
        EBUSY
            if matches!(
                o.kind,
                EventKind::Rename | EventKind::Rmdir | EventKind::Unlink
            ) && policy.is_some_and(|p| in_view(p, [o.path, o.path2])) =>
        {
            (Layer::View, Verdict::Deny)
        }
        EROFS => (Layer::Kernel, Verdict::Deny),
        _ => (Layer::Kernel, Verdict::Allow),
    }
}

/// Whether one of `paths` is where the agent's view refuses changes: a protected path,
/// beneath one, or one of its ancestors (pinned as mount points); the private /run.
fn in_view(policy: &CompiledPolicy, paths: [Option<&Path>; 2]) -> bool {
    // Only absolute paths: an unresolved relative or empty one would match any ancestor.
    paths.iter().flatten().filter(|p| p.is_absolute()).any(|p| {
        p.starts_with("/run")
            || policy
                .protect
                .iter()
                .any(|guarded| p.starts_with(guarded) || guarded.starts_with(p))
    })
}

/// The permission check a file operation of `kind` needing `need` is subject to.
pub(super) fn file_access(need: Need, kind: EventKind) -> FileAccess {
    match need {
        Need::Read => FileAccess::Read,
        Need::Exec => FileAccess::Exec,
        Need::Write => match kind {
            EventKind::Unlink
            | EventKind::Mkdir
            | EventKind::Rmdir
            | EventKind::Rename
            | EventKind::Link
            | EventKind::Symlink => FileAccess::Entry,
            EventKind::OpenWrite
            | EventKind::OpenRead
            | EventKind::Canary
            | EventKind::Chmod
            | EventKind::Chown
            | EventKind::Truncate
            | EventKind::Setxattr
            | EventKind::Exec
            | EventKind::Fork
            | EventKind::Exit
            | EventKind::Connect
            | EventKind::Sendmsg
            | EventKind::Bind
            | EventKind::Inbound
            | EventKind::SocketCreate
            | EventKind::Syscall
            | EventKind::Signal => FileAccess::Write,
        },
    }
}

/// Which layer refused a call watched at its exit only ([`EventKind::Syscall`], reported
/// when it failed with EPERM, EACCES or ENOSYS). Its arguments are unknown (seccomp
/// refuses before the entry tracepoint), so the policy decides:
/// - the call is not allowed unconditionally by the policy's filter (absent from its
///   lists, on its ENOSYS list, or allowed only when its arguments pass a check) and failed
///   with the errno the filter answers it with: seccomp. (A socket the `sock_create`
///   program refused is reported by that program, not here.)
/// - without the agent's policy: EPERM or ENOSYS is seccomp, as for file calls seen
///   without their entry;
/// - otherwise the filter let the call through and the kernel refused it.
pub(super) fn attribute_call(
    name: &str,
    errno: i32,
    policy: Option<&CompiledPolicy>,
) -> (Layer, Verdict) {
    let Some(policy) = policy else {
        return if errno == EPERM || errno == ENOSYS {
            (Layer::Seccomp, Verdict::Deny)
        } else {
            (Layer::Kernel, Verdict::Deny)
        };
    };
    let s = &policy.seccomp;
    let filter_answer = if s.enosys.contains(&name) {
        Some(ENOSYS)
    } else if s.allow.contains(&name) || s.notify.contains(&name) {
        // Allowed, or decided by the supervisor: the filter itself answers nothing.
        None
    } else {
        errno_named(s.default_errno)
    };
    if filter_answer == Some(errno) {
        (Layer::Seccomp, Verdict::Deny)
    } else {
        (Layer::Kernel, Verdict::Deny)
    }
}

/// The errno a seccomp policy's `default_errno` names.
fn errno_named(name: &str) -> Option<i32> {
    match name {
        "EPERM" => Some(EPERM),
        "EACCES" => Some(EACCES),
        "ENOSYS" => Some(ENOSYS),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use agentd_common::{EVENT_FLAG_NO_ENTER, EVENT_FLAG_WRITE_INTENT};

    use super::{
        super::{
            Creds,
            fixtures::{CLOCK, agent, dec, decode, no_resolve, policy, raw, set},
        },
        *,
    };
    use crate::event::Kind;

    #[test]
    fn eacces_outside_write_rules_is_landlock() {
        let mut r = raw(EventKind::OpenWrite);
        r.syscall = Syscall::Openat as u8;
        r.flags = EVENT_FLAG_WRITE_INTENT;
        r.aux = libc::O_WRONLY as u64;
        r.ret = -i64::from(libc::EACCES);
        set(&mut r.path, "/etc/passwd");
        let e = dec(&r);
        assert_eq!((e.layer, e.verdict), (Layer::Landlock, Verdict::Deny));
        assert_eq!(e.errno, Some(libc::EACCES));
    }

    #[test]
    fn eacces_inside_write_rules_is_the_kernel() {
        let mut r = raw(EventKind::Unlink);
        r.syscall = Syscall::Unlink as u8;
        r.ret = -i64::from(libc::EACCES);
        set(&mut r.path, "/tmp/someone-elses-file");
        let e = dec(&r);
        assert_eq!((e.layer, e.verdict), (Layer::Kernel, Verdict::Deny));
    }

    #[test]
    fn rename_checks_both_paths() {
        let mut r = raw(EventKind::Rename);
        r.syscall = Syscall::Rename as u8;
        r.ret = -i64::from(libc::EACCES);
        set(&mut r.path, "/tmp/a");
        set(&mut r.path2, "/etc/a");
        let e = dec(&r);
        assert_eq!(e.layer, Layer::Landlock);
        assert_eq!(e.path.as_deref(), Some("/tmp/a"));
        assert_eq!(e.path2.as_deref(), Some("/etc/a"));
        set(&mut r.path2, "/tmp/b");
        assert_eq!(dec(&r).layer, Layer::Kernel);
        // Landlock's EXDEV for a rename out of the writable tree is a refusal too; a real
        // cross-filesystem EXDEV inside it is not Landlock's.
        r.ret = -i64::from(libc::EXDEV);
        set(&mut r.path2, "/etc/a");
        assert_eq!(
            (dec(&r).layer, dec(&r).verdict),
            (Layer::Landlock, Verdict::Deny)
        );
        set(&mut r.path2, "/tmp/b");
        assert_eq!(dec(&r).layer, Layer::Kernel);
    }

    #[test]
    fn exec_and_canary_reads_check_their_own_access() {
        let exec = FileOutcome {
            kind: EventKind::Exec,
            syscall: Some(Syscall::Execve),
            errno: Some(libc::EACCES),
            no_enter: false,
            write_intent: false,
            path: Some(Path::new("/home/u/project/a.out")),
            path2: None,
        };
        assert_eq!(attribute(&exec, Some(&policy()), None).0, Layer::Landlock);
        let usr = FileOutcome {
            path: Some(Path::new("/usr/bin/true")),
            ..exec
        };
        assert_eq!(attribute(&usr, Some(&policy()), None).0, Layer::Kernel);
        let canary = FileOutcome {
            kind: EventKind::Canary,
            syscall: Some(Syscall::Openat),
            path: Some(Path::new("/home/u/.ssh/id_rsa")),
            ..exec
        };
        assert_eq!(attribute(&canary, Some(&policy()), None).0, Layer::Landlock);
    }

    #[test]
    fn a_refusal_the_file_permissions_explain_is_the_permission_layers() {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tool");
        std::fs::write(&file, "x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let owner = std::fs::metadata(dir.path()).unwrap().uid();
        let a = agent();
        let _ = a.creds.set(Creds {
            uid: owner.wrapping_add(4242),
            gid: 4242,
            groups: vec![],
        });
        let mut r = raw(EventKind::Exec);
        r.syscall = Syscall::Execve as u8;
        r.ret = -i64::from(libc::EACCES);
        set(&mut r.path, file.to_str().unwrap());
        let e = decode(&r, Some(&a), CLOCK, &no_resolve).unwrap();
        assert_eq!(
            (e.layer, e.verdict),
            (Layer::Permission, Verdict::Deny),
            "the agent's user cannot enter the directory: no exec outside the profile"
        );
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = decode(&r, Some(&a), CLOCK, &no_resolve).unwrap();
        assert_eq!((e.layer, e.verdict), (Layer::Landlock, Verdict::Deny));
        // Without the agent's identity, the rules decide alone.
        let e = dec(&r);
        assert_eq!(e.layer, Layer::Landlock);
    }

    #[test]
    fn exit_without_entry_with_eperm_is_seccomp() {
        let mut r = raw(EventKind::Chmod);
        r.syscall = Syscall::Fchmodat as u8;
        r.flags = EVENT_FLAG_NO_ENTER;
        r.ret = -i64::from(libc::EPERM);
        let e = dec(&r);
        assert_eq!((e.layer, e.verdict), (Layer::Seccomp, Verdict::Deny));
        assert_eq!(e.path, None);
        assert_eq!(e.detail["entry_seen"], false);
        assert!(e.detail.get("mode").is_none(), "no arguments were read");
    }

    #[test]
    fn eperm_on_a_call_outside_the_allow_list_is_seccomp() {
        let mut pol = (*policy()).clone();
        pol.seccomp.allow.retain(|n| *n != "lchown");
        let o = FileOutcome {
            kind: EventKind::Chown,
            syscall: Some(Syscall::Lchown),
            errno: Some(libc::EPERM),
            no_enter: false,
            write_intent: false,
            path: Some(Path::new("/tmp/x")),
            path2: None,
        };
        assert_eq!(
            attribute(&o, Some(&pol), None),
            (Layer::Seccomp, Verdict::Deny)
        );
        // Allowed call, EPERM: the kernel (e.g. chown by a non-owner).
        assert_eq!(
            attribute(&o, Some(&policy()), None),
            (Layer::Kernel, Verdict::Deny)
        );
    }

    #[test]
    fn other_errors_are_allowed_calls_that_failed() {
        let o = FileOutcome {
            kind: EventKind::Unlink,
            syscall: Some(Syscall::Unlinkat),
            errno: Some(libc::ENOENT),
            no_enter: false,
            write_intent: false,
            path: Some(Path::new("/etc/nope")),
            path2: None,
        };
        assert_eq!(
            attribute(&o, Some(&policy()), None),
            (Layer::Kernel, Verdict::Allow)
        );
    }

    #[test]
    fn refused_calls_seen_at_exit_only_are_attributed_by_the_policy() {
        let mut r = raw(EventKind::Syscall);
        r.syscall = Syscall::Unshare as u8;
        r.ret = -i64::from(libc::EPERM);
        let e = dec(&r);
        assert_eq!(e.kind, Kind::Syscall);
        assert_eq!((e.layer, e.verdict), (Layer::Seccomp, Verdict::Deny));
        assert_eq!(e.errno, Some(libc::EPERM));
        assert_eq!(e.detail["syscall"], "unshare");
        assert_eq!(e.path, None);
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["kind"], "syscall");
        // umount2's tracepoint is sys_exit_umount; the event names the call.
        r.syscall = Syscall::Umount2 as u8;
        assert_eq!(dec(&r).detail["syscall"], "umount2");
        // socket is allowed only for some families: EPERM is the filter's answer.
        r.syscall = Syscall::Socket as u8;
        assert_eq!(dec(&r).layer, Layer::Seccomp);
        // EACCES from socket (e.g. ping sockets outside ping_group_range): the kernel.
        r.ret = -i64::from(libc::EACCES);
        assert_eq!(
            (dec(&r).layer, dec(&r).verdict),
            (Layer::Kernel, Verdict::Deny)
        );
        // A call the filter allows, refused with EPERM: the kernel.
        let mut pol = (*policy()).clone();
        pol.seccomp.allow.push("personality");
        assert_eq!(
            attribute_call("personality", libc::EPERM, Some(&pol)),
            (Layer::Kernel, Verdict::Deny)
        );
        assert_eq!(
            attribute_call("personality", libc::EPERM, Some(&policy())),
            (Layer::Seccomp, Verdict::Deny)
        );
        // The ENOSYS list is answered ENOSYS.
        assert_eq!(
            attribute_call("clone3", libc::ENOSYS, Some(&policy())),
            (Layer::Seccomp, Verdict::Deny)
        );
        // Unknown agent: EPERM and ENOSYS are what seccomp answers.
        assert_eq!(
            attribute_call("mount", libc::EPERM, None),
            (Layer::Seccomp, Verdict::Deny)
        );
        assert_eq!(
            attribute_call("mount", libc::EACCES, None),
            (Layer::Kernel, Verdict::Deny)
        );
    }
}
