//! A file operation's event: its paths resolved (against the directory the kernel read,
//! else through the caller's resolver), the canary it may be, and the layer that refused
//! it.

use std::path::{Path, PathBuf};

use agentd_common::{
    EVENT_FLAG_CANARY_CANDIDATE, EVENT_FLAG_CANARY_SENT, EVENT_FLAG_NO_ENTER,
    EVENT_FLAG_PATH_UNREAD, EVENT_FLAG_WRITE_INTENT, EXEC_ARG_LEN, EXEC_ARGS, EventKind, RawEvent,
    Syscall,
};

use super::{
    AT_FDCWD, AgentInfo, Resolver,
    attribute::{Dac, FileOutcome, Need, attribute, file_access},
    details::aux_detail,
    paths::{canary_of, follows_last, normalize, resolve_path},
    record::{cstr, kernel_dir, layer_of_raw, verdict_of_raw},
};
use crate::event::{Event, Kind, Layer};

pub(super) fn decode_file(
    raw: &RawEvent,
    kind: EventKind,
    mut e: Event,
    agent: Option<&AgentInfo>,
    resolve: Resolver<'_>,
) -> Option<Event> {
    let syscall = Syscall::from_raw(raw.syscall);
    if let Some(s) = syscall {
        e = e.with("syscall", s.name());
    }
    // A relative path resolves against the directory the kernel read during the call
    // (exact, and there after the process is gone); without it, through /proc while the
    // process lives.
    let dir = kernel_dir(raw);
    let with_dir = |pid: u32, dfd: i32, rel: &str, follow: bool| match &dir {
        Some(d) if dfd == raw.dfd && !rel.is_empty() && !rel.starts_with('/') => {
            let abs = d.join(rel);
            resolve(pid, AT_FDCWD, &abs.to_string_lossy(), follow).or(Some(abs))
        }
        _ => resolve(pid, dfd, rel, follow),
    };
    let resolve: Resolver<'_> = &with_dir;
    let no_enter = raw.flags & EVENT_FLAG_NO_ENTER != 0;
    if no_enter {
        // Refused before the entry tracepoint: the arguments were never read.
        e = e.with("entry_seen", false);
    }
    let write_intent = raw.flags & EVENT_FLAG_WRITE_INTENT != 0;
    let errno = (raw.ret < 0).then(|| i32::try_from(raw.ret.saturating_neg()).unwrap_or(i32::MAX));
    e.errno = errno;

    let path_arg = cstr(&raw.path);
    let follow = follows_last(kind, syscall, raw.aux);
    let (path, path2) = match kind {
        EventKind::Exec => {
            let argv: Vec<String> = (0..EXEC_ARGS)
                .map(|i| cstr(&raw.path2[i * EXEC_ARG_LEN..(i + 1) * EXEC_ARG_LEN]))
                .take_while(|a| !a.is_empty())
                .collect();
            if !argv.is_empty() {
                e = e.with("argv", argv);
            }
            let mut path = resolve_path(&path_arg, raw.pid, raw.dfd, follow, resolve);
            if raw.ret == 0 && (path_arg.starts_with("/proc/") || path.starts_with("/proc")) {
                // A program named by a magic link (`/proc/self/fd/N` of an fd closed at
                // exec, whose number the new program may have reused by now): the
                // process's own `exe` is the file the kernel ran.
                if let Some(exe) = resolve(raw.pid, AT_FDCWD, "/proc/self/exe", true) {
                    path = normalize(&exe);
                }
            }
            (path, None)
        }
        EventKind::Setxattr => {
            let name = cstr(&raw.path2);
            if !name.is_empty() {
                e = e.with("xattr", name);
            }
            (
                resolve_path(&path_arg, raw.pid, raw.dfd, follow, resolve),
                None,
            )
        }
        EventKind::Symlink => {
            // path is the link's contents, never resolved; dfd belongs to path2.
            let link = cstr(&raw.path2);
            (
                PathBuf::from(&path_arg),
                Some(resolve_path(&link, raw.pid, raw.dfd, false, resolve)),
            )
        }
        EventKind::Rename | EventKind::Link => {
            let second = cstr(&raw.path2);
            // The second directory fd of renameat/linkat is not recorded: resolve the
            // second path only for the calls without one.
            let dfd2 = match syscall {
                Some(Syscall::Rename | Syscall::Link) => AT_FDCWD,
                _ => i32::MIN,
            };
            let second = if dfd2 == AT_FDCWD || second.starts_with('/') {
                resolve_path(&second, raw.pid, AT_FDCWD, false, resolve)
            } else {
                PathBuf::from(second)
            };
            (
                resolve_path(&path_arg, raw.pid, raw.dfd, false, resolve),
                Some(second),
            )
        }
        EventKind::OpenWrite
        | EventKind::OpenRead
        | EventKind::Canary
        | EventKind::Unlink
        | EventKind::Mkdir
        | EventKind::Rmdir
        | EventKind::Chmod
        | EventKind::Chown
        | EventKind::Truncate
        | EventKind::Fork
        | EventKind::Exit
        | EventKind::Connect
        | EventKind::Sendmsg
        | EventKind::Bind
        | EventKind::Inbound
        | EventKind::SocketCreate
        | EventKind::Syscall
        | EventKind::Signal => (
            resolve_path(&path_arg, raw.pid, raw.dfd, follow, resolve),
            None,
        ),
    };
    // The first path, when known: not when the exit came without its entry; when the
    // entry could not read it, only for a successful open (from the new fd).
    let unread = raw.flags & EVENT_FLAG_PATH_UNREAD != 0;
    let path: Option<PathBuf> = if no_enter {
        None
    } else if unread {
        e = e.with("path_unread", true);
        let opened = matches!(
            syscall,
            Some(Syscall::Open | Syscall::Openat | Syscall::Openat2 | Syscall::Creat)
        );
        match i32::try_from(raw.ret) {
            Ok(fd) if opened && fd >= 0 => resolve(raw.pid, fd, "", false),
            Ok(_) | Err(_) => None,
        }
    } else {
        if path.as_os_str() != path_arg.as_str() && kind != EventKind::Symlink {
            e = e.with("path_arg", path_arg.as_str());
        }
        Some(path)
    };
    // Without the entry, the arguments (and so `aux`) were never read.
    if !no_enter {
        e = aux_detail(kind, raw.aux, e);
    }

    // A write-intent open the kernel could not match as written (relative, or spelt with
    // `//`, `.`, `..`) that resolves to a canary is reported as the canary breach it is.
    let mut kind = kind;
    if kind == EventKind::OpenWrite
        && raw.flags & EVENT_FLAG_CANARY_SENT == 0
        && agent
            .zip(path.as_deref())
            .and_then(|(a, p)| canary_of(&a.policy, p))
            .is_some()
    {
        kind = EventKind::Canary;
        e.kind = Kind::Canary;
    }
    if kind == EventKind::Canary {
        // Which canary: the kernel names it when it matched the opened file by inode
        // (the path may be a symlink or a hard link to it); else it matched the path as
        // written; a candidate (relative or spelt oddly) is matched here, after
        // resolving, and dropped if it is none.
        let by_inode = usize::try_from(raw.canary)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .zip(agent)
            .and_then(|(i, a)| a.policy.canaries.get(i))
            .map(PathBuf::as_path);
        let canary = by_inode.or_else(|| {
            agent
                .zip(path.as_deref())
                .and_then(|(a, p)| canary_of(&a.policy, p))
        });
        match canary {
            Some(c) => e = e.with("canary", c.to_string_lossy()),
            // A refused read-only open that is no canary: a refused read.
            None if raw.flags & EVENT_FLAG_CANARY_CANDIDATE != 0 && errno.is_some() => {
                kind = EventKind::OpenRead;
                e.kind = Kind::OpenRead;
            }
            // A successful one the kernel could not decide, and no canary either.
            None if raw.flags & EVENT_FLAG_CANARY_CANDIDATE != 0 => return None,
            None => {}
        }
    }

    let outcome = FileOutcome {
        kind,
        syscall,
        errno,
        no_enter,
        write_intent,
        path: path.as_deref(),
        path2: path2.as_deref(),
    };
    let creds = agent.and_then(|a| a.creds.get());
    let permits = |p: &Path, need: Need, kind: EventKind| {
        creds.and_then(|c| c.permits(p, file_access(need, kind)))
    };
    let dac: Option<Dac<'_>> = creds.map(|_| &permits as Dac<'_>);
    let (layer, verdict) = match layer_of_raw(raw.layer) {
        // A layer that decided in the kernel said so itself.
        Some(layer) => (layer, verdict_of_raw(raw.verdict)),
        None => attribute(&outcome, agent.map(|a| a.policy.as_ref()), dac),
    };
    e.layer = layer;
    e.verdict = verdict;
    if layer == Layer::BpfLsm {
        e = if kind == EventKind::Exec {
            e.with(
                "reason",
                "exec of a file no path names (memfd or another pseudo file)",
            )
        } else {
            {
                // The protected path the operation touched (or whose creation it was).
                let protected = agent.and_then(|a| {
                    a.policy.protect.iter().find(|p| {
                        [path.as_deref(), path2.as_deref()]
                            .into_iter()
                            .flatten()
                            .any(|q| q.starts_with(p) || p.starts_with(q))
                    })
                });
                match protected {
                    Some(p) => e.with("protected", p.to_string_lossy()),
                    None => e.with("reason", "a protected path or one of its parents"),
                }
            }
        };
    }
    e.path = path.map(|p| p.to_string_lossy().into_owned());
    if !no_enter {
        e.path2 = path2.map(|p| p.to_string_lossy().into_owned());
    }
    Some(e)
}

#[cfg(test)]
mod tests {
    use super::{
        super::fixtures::{CLOCK, agent, dec, decode, no_resolve, raw, set, set_dir},
        *,
    };
    use crate::event::Verdict;

    #[test]
    fn open_write_allowed_in_workspace() {
        let mut r = raw(EventKind::OpenWrite);
        r.syscall = Syscall::Openat as u8;
        r.flags = EVENT_FLAG_WRITE_INTENT;
        r.aux = (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC) as u64;
        r.ret = 3;
        set(&mut r.path, "/home/u/project/out.txt");
        let e = dec(&r);
        assert_eq!(e.kind, Kind::OpenWrite);
        assert_eq!(e.verdict, Verdict::Allow);
        assert_eq!(e.layer, Layer::Kernel);
        assert_eq!(e.errno, None);
        assert_eq!(e.path.as_deref(), Some("/home/u/project/out.txt"));
        assert_eq!(e.detail["flags"], "O_WRONLY|O_CREAT|O_TRUNC");
        assert_eq!(e.detail["syscall"], "openat");
    }

    #[test]
    fn exec_argv_and_comm() {
        let mut r = raw(EventKind::Exec);
        r.syscall = Syscall::Execve as u8;
        set(&mut r.path, "/bin/true");
        set(&mut r.path2[0..], "true");
        set(&mut r.path2[EXEC_ARG_LEN..], "--version");
        let e = dec(&r);
        assert_eq!(e.kind, Kind::Exec);
        assert_eq!(e.verdict, Verdict::Allow);
        assert_eq!(e.detail["argv"], serde_json::json!(["true", "--version"]));
        assert_eq!(e.path2, None);
    }

    #[test]
    fn relative_paths_are_resolved_then_attributed() {
        let mut r = raw(EventKind::Mkdir);
        r.syscall = Syscall::Mkdirat as u8;
        r.ret = -i64::from(libc::EACCES);
        r.dfd = 7;
        r.aux = 0o755;
        set(&mut r.path, "sub/dir");
        let resolver = |pid: u32, dfd: i32, p: &str, _: bool| {
            assert_eq!((pid, dfd), (100, 7));
            Some(PathBuf::from("/etc").join(p))
        };
        let e = decode(&r, Some(&agent()), CLOCK, &resolver).unwrap();
        assert_eq!(e.path.as_deref(), Some("/etc/sub/dir"));
        assert_eq!(e.detail["path_arg"], "sub/dir");
        assert_eq!(e.detail["mode"], "0755");
        assert_eq!(e.layer, Layer::Landlock);
        // Unresolvable: the path stays relative and nothing is blamed on Landlock.
        let e = dec(&r);
        assert_eq!(e.path.as_deref(), Some("sub/dir"));
        assert_eq!((e.layer, e.verdict), (Layer::Kernel, Verdict::Deny));
    }

    #[test]
    fn relative_exec_of_a_gone_process_resolves_from_the_kernel_dir() {
        // `./tool` refused with EACCES, the process already gone (no /proc): the
        // directory the kernel read decides, so Landlock is blamed (exec only in
        // /usr/bin).
        let mut r = raw(EventKind::Exec);
        r.syscall = Syscall::Execve as u8;
        r.ret = -i64::from(libc::EACCES);
        set(&mut r.path, "./tool");
        set_dir(&mut r, "/home/u/project");
        let e = dec(&r);
        assert_eq!(e.path.as_deref(), Some("/home/u/project/tool"));
        assert_eq!(e.detail["path_arg"], "./tool");
        assert_eq!((e.layer, e.verdict), (Layer::Landlock, Verdict::Deny));
        // The kernel's directory wins over /proc (the process may have moved since).
        let elsewhere = |_: u32, _: i32, p: &str, _: bool| Some(PathBuf::from("/usr/bin").join(p));
        let e = decode(&r, Some(&agent()), CLOCK, &elsewhere).unwrap();
        assert_eq!(e.path.as_deref(), Some("/home/u/project/tool"));
        // `..` is resolved lexically against it.
        set(&mut r.path, "../../../usr/bin/x");
        let e = dec(&r);
        assert_eq!(e.path.as_deref(), Some("/usr/bin/x"));
        assert_eq!(e.layer, Layer::Kernel);
        // A write-side call with a directory fd: the kernel read that fd's directory.
        let mut r = raw(EventKind::Unlink);
        r.syscall = Syscall::Unlinkat as u8;
        r.ret = -i64::from(libc::EACCES);
        r.dfd = 5;
        set(&mut r.path, "passwd");
        set_dir(&mut r, "/etc");
        let e = dec(&r);
        assert_eq!(e.path.as_deref(), Some("/etc/passwd"));
        assert_eq!(e.layer, Layer::Landlock);
    }

    #[test]
    fn an_exec_through_a_magic_link_names_the_program_the_kernel_ran() {
        // `execv("/proc/self/fd/3")` of an fd closed at exec: by the time the event is
        // read, the new program may have opened something else as fd 3.
        let mut r = raw(EventKind::Exec);
        r.syscall = Syscall::Execve as u8;
        set(&mut r.path, "/proc/self/fd/3");
        let proc = |_: u32, _: i32, p: &str, _: bool| {
            Some(PathBuf::from(match p {
                "/proc/self/exe" => "/usr/bin/sleep",
                _ => "/usr/lib/x86_64-linux-gnu/libc.so.6",
            }))
        };
        let e = decode(&r, Some(&agent()), CLOCK, &proc).unwrap();
        assert_eq!(e.path.as_deref(), Some("/usr/bin/sleep"));
        assert_eq!(e.detail["path_arg"], "/proc/self/fd/3");
        // A failed exec ran nothing: the argument's own resolution stands.
        r.ret = -i64::from(libc::EACCES);
        let e = decode(&r, Some(&agent()), CLOCK, &proc).unwrap();
        assert_eq!(
            e.path.as_deref(),
            Some("/usr/lib/x86_64-linux-gnu/libc.so.6")
        );
    }

    #[test]
    fn unread_path_of_a_successful_open_comes_from_the_fd() {
        let mut r = raw(EventKind::Canary);
        r.syscall = Syscall::Openat as u8;
        r.flags = EVENT_FLAG_CANARY_CANDIDATE | EVENT_FLAG_PATH_UNREAD;
        r.ret = 5;
        let by_fd = |target: &'static str| {
            move |pid: u32, fd: i32, rel: &str, _: bool| {
                assert_eq!((pid, fd, rel), (100, 5, ""));
                Some(PathBuf::from(target))
            }
        };
        let e = decode(&r, Some(&agent()), CLOCK, &by_fd("/home/u/.ssh/id_rsa")).unwrap();
        assert_eq!(e.path.as_deref(), Some("/home/u/.ssh/id_rsa"));
        assert_eq!(e.detail["path_unread"], true);
        assert_eq!(e.detail["canary"], "/home/u/.ssh");
        // Resolves to no canary: dropped.
        assert!(decode(&r, Some(&agent()), CLOCK, &by_fd("/usr/lib/x")).is_none());
        // A failed call with an unread path: no path at all.
        let mut r = raw(EventKind::Unlink);
        r.flags = EVENT_FLAG_PATH_UNREAD;
        r.ret = -2;
        let e = dec(&r);
        assert_eq!(e.path, None);
        assert_eq!(e.detail["path_unread"], true);
    }

    #[test]
    fn canary_read_that_failed_still_is_a_canary() {
        let mut r = raw(EventKind::Canary);
        r.syscall = Syscall::Openat as u8;
        r.ret = -i64::from(libc::ENOENT);
        set(&mut r.path, "/home/u/.ssh/id_ed25519");
        let e = dec(&r);
        assert_eq!(e.kind, Kind::Canary);
        assert_eq!(e.errno, Some(libc::ENOENT));
        assert_eq!(e.detail["flags"], "O_RDONLY");
    }

    #[test]
    fn canary_matched_by_inode_names_it_whatever_the_path() {
        // `cat link` where link -> .ssh/id_rsa: the kernel found the canary by inode.
        let mut r = raw(EventKind::Canary);
        r.syscall = Syscall::Openat as u8;
        r.ret = 3;
        r.canary = 1;
        set(&mut r.path, "link");
        set_dir(&mut r, "/home/u/project");
        let e = dec(&r);
        assert_eq!(e.kind, Kind::Canary);
        assert_eq!(e.path.as_deref(), Some("/home/u/project/link"));
        assert_eq!(e.detail["canary"], "/home/u/.ssh");
        assert_eq!((e.layer, e.verdict), (Layer::Kernel, Verdict::Allow));
        // An index the policy does not have: still a canary event (the kernel said so),
        // without the name.
        r.canary = 9;
        let e = dec(&r);
        assert_eq!(e.kind, Kind::Canary);
        assert!(e.detail.get("canary").is_none());
    }

    #[test]
    fn canary_candidates_are_resolved_and_kept_only_when_canaries() {
        let mut r = raw(EventKind::Canary);
        r.syscall = Syscall::Openat as u8;
        r.flags = EVENT_FLAG_CANARY_CANDIDATE;
        r.ret = -i64::from(libc::EACCES);
        set(&mut r.path, ".ssh/id_rsa");
        let in_home = |_: u32, dfd: i32, p: &str, _: bool| {
            assert_eq!(dfd, AT_FDCWD);
            Some(PathBuf::from("/home/u").join(p))
        };
        let e = decode(&r, Some(&agent()), CLOCK, &in_home).unwrap();
        assert_eq!(e.kind, Kind::Canary);
        assert_eq!(e.path.as_deref(), Some("/home/u/.ssh/id_rsa"));
        assert_eq!(e.detail["canary"], "/home/u/.ssh");
        assert_eq!((e.layer, e.verdict), (Layer::Landlock, Verdict::Deny));
        // Spelt with `//` and `..`, absolute: resolved lexically.
        set(&mut r.path, "/tmp/..//home/u/./.ssh/config");
        let e = dec(&r);
        assert_eq!(e.detail["canary"], "/home/u/.ssh");
        // Not a canary: a refused read.
        set(&mut r.path, "/etc/shadow");
        let e = dec(&r);
        assert_eq!((e.kind, e.layer), (Kind::OpenRead, Layer::Landlock));
        // Relative and unresolvable (process gone): nothing to match it with; reported
        // as a refused read of the path as written.
        set(&mut r.path, ".ssh/id_rsa");
        let e = decode(&r, Some(&agent()), CLOCK, &no_resolve).unwrap();
        assert_eq!(e.kind, Kind::OpenRead);
        assert_eq!(e.path.as_deref(), Some(".ssh/id_rsa"));
    }

    #[test]
    fn a_refused_read_only_open_that_is_no_canary_is_a_refused_read() {
        let mut r = raw(EventKind::Canary);
        r.syscall = Syscall::Openat as u8;
        r.flags = EVENT_FLAG_CANARY_CANDIDATE;
        r.ret = -i64::from(libc::EACCES);
        set(&mut r.path, "/etc/hostname");
        let e = dec(&r);
        assert_eq!(e.kind, Kind::OpenRead);
        assert_eq!((e.layer, e.verdict), (Layer::Landlock, Verdict::Deny));
        // Beneath a read rule: the kernel's own refusal, not the profile's.
        set(&mut r.path, "/usr/share/x");
        let e = dec(&r);
        assert_eq!((e.kind, e.layer), (Kind::OpenRead, Layer::Kernel));
        // A successful open the kernel could not decide, and no canary: nothing to say.
        r.ret = 3;
        assert!(decode(&r, Some(&agent()), CLOCK, &no_resolve).is_none());
        // Of an agent without canaries, the kernel sends refused reads as such.
        let mut r = raw(EventKind::OpenRead);
        r.syscall = Syscall::Openat as u8;
        r.ret = -i64::from(libc::EACCES);
        r.aux = libc::O_RDONLY as u64 | libc::O_DIRECTORY as u64;
        set(&mut r.path, "/srv/data");
        let e = dec(&r);
        assert_eq!(e.kind, Kind::OpenRead);
        assert_eq!((e.layer, e.verdict), (Layer::Landlock, Verdict::Deny));
        assert!(
            e.detail["flags"]
                .as_str()
                .unwrap_or("")
                .contains("O_DIRECTORY"),
            "{e:?}"
        );
    }

    #[test]
    fn relative_write_to_a_canary_is_a_canary() {
        let mut r = raw(EventKind::OpenWrite);
        r.syscall = Syscall::Openat as u8;
        r.flags = EVENT_FLAG_WRITE_INTENT;
        r.aux = (libc::O_WRONLY | libc::O_APPEND) as u64;
        r.ret = -i64::from(libc::EACCES);
        set(&mut r.path, ".ssh/authorized_keys");
        let home = |_: u32, _: i32, p: &str, _: bool| Some(PathBuf::from("/home/u").join(p));
        let e = decode(&r, Some(&agent()), CLOCK, &home).unwrap();
        assert_eq!(e.kind, Kind::Canary);
        assert_eq!(e.detail["canary"], "/home/u/.ssh");
        assert_eq!(e.detail["flags"], "O_WRONLY|O_APPEND");
        assert_eq!(e.layer, Layer::Landlock);
        // The kernel matched it and sent the Canary first: this one stays a write.
        r.flags |= EVENT_FLAG_CANARY_SENT;
        assert_eq!(
            decode(&r, Some(&agent()), CLOCK, &home).unwrap().kind,
            Kind::OpenWrite
        );
    }
}
