//! What each kind of event carries besides its path and layer: open flags, modes and
//! owners (`aux`), exit status, an exec refusal's reason, a refused signal's target, a
//! unix socket's name, socket families and types.

use std::path::Path;

use agentd_common::{
    EXEC_REFUSED_NOT_APPROVED, EXEC_REFUSED_PSEUDO, EXEC_REFUSED_SHIFT, EXEC_REFUSED_SWAPPED,
    EventKind, IPPROTO_TCP, IPPROTO_UDP, RawEvent,
};

use super::{AT_FDCWD, AgentInfo, EACCES, EPERM, Resolver, Targets, paths::resolve_path};
use crate::event::{Event, Layer, Verdict};

/// Details carried in `aux`, by kind (see `RawEvent::aux`).
pub(super) fn aux_detail(kind: EventKind, aux: u64, mut e: Event) -> Event {
    match kind {
        EventKind::OpenWrite | EventKind::OpenRead | EventKind::Canary => {
            e = e.with("flags", open_flags(aux));
        }
        EventKind::Chmod | EventKind::Mkdir => {
            e = e.with("mode", format!("{:04o}", aux & 0o7777));
        }
        EventKind::Chown => {
            let uid = aux & 0xffff_ffff;
            let gid = aux >> 32;
            if uid != 0xffff_ffff {
                e = e.with("uid", uid);
            }
            if gid != 0xffff_ffff {
                e = e.with("gid", gid);
            }
        }
        EventKind::Truncate => {
            e = e.with("length", aux);
        }
        EventKind::Rename
        | EventKind::Link
        | EventKind::Unlink
        | EventKind::Exec
        | EventKind::Setxattr
            if aux != 0 =>
        {
            e = e.with("flags", aux);
        }
        EventKind::Exec
        | EventKind::Unlink
        | EventKind::Rename
        | EventKind::Rmdir
        | EventKind::Link
        | EventKind::Symlink
        | EventKind::Setxattr
        | EventKind::Fork
        | EventKind::Exit
        | EventKind::Connect
        | EventKind::Sendmsg
        | EventKind::Bind
        | EventKind::Inbound
        | EventKind::SocketCreate
        | EventKind::Syscall
        | EventKind::Signal => {}
    }
    e
}

/// Open flags as `O_WRONLY|O_CREAT|...` (the ones that say what an open may change).
pub(super) fn open_flags(flags: u64) -> String {
    let f = i32::try_from(flags & 0xffff_ffff).unwrap_or(0);
    let mut out = vec![match f & libc::O_ACCMODE {
        libc::O_WRONLY => "O_WRONLY",
        libc::O_RDWR => "O_RDWR",
        _ => "O_RDONLY",
    }];
    for (bit, name) in [
        (libc::O_CREAT, "O_CREAT"),
        (libc::O_EXCL, "O_EXCL"),
        (libc::O_TRUNC, "O_TRUNC"),
        (libc::O_APPEND, "O_APPEND"),
        (libc::O_DIRECTORY, "O_DIRECTORY"),
        (libc::O_NOFOLLOW, "O_NOFOLLOW"),
        (libc::O_PATH, "O_PATH"),
    ] {
        if f & bit == bit {
            out.push(name);
        }
    }
    if f & libc::O_TMPFILE == libc::O_TMPFILE {
        out.retain(|n| *n != "O_DIRECTORY");
        out.push("O_TMPFILE");
    }
    out.join("|")
}

/// Exit status from `task_struct.exit_code`: ("signal", n) or ("code", n).
pub(super) fn exit_detail(code: i64, e: Event) -> Event {
    let sig = code & 0x7f;
    if sig != 0 {
        let e = e.with("signal", sig);
        if code & 0x80 != 0 {
            e.with("core_dumped", true)
        } else {
            e
        }
    } else {
        e.with("code", (code >> 8) & 0xff)
    }
}

/// The reason (`EXEC_REFUSED_*`) an exec program's refusal carries in `aux`, and the
/// file's device and inode when it names one.
pub(super) fn exec_refusal(raw: &RawEvent, e: Event) -> Event {
    let file = |e: Event| {
        let dev = raw.aux & 0xffff_ffff;
        e.with("dev", format!("{}:{}", dev >> 20, dev & 0xf_ffff))
            .with("ino", raw.ret as u64)
    };
    match raw.aux >> EXEC_REFUSED_SHIFT {
        EXEC_REFUSED_PSEUDO => e.with(
            "reason",
            "exec of a file no path names (memfd or another pseudo file)",
        ),
        // The program loaded is not the one a person approved (swapped after).
        EXEC_REFUSED_SWAPPED => file(e.with("reason", "swapped")),
        // A program the profile asks about, run with no approval.
        EXEC_REFUSED_NOT_APPROVED => file(e.with("reason", "not approved")),
        other => file(e.with("reason", format!("unknown ({other})"))),
    }
}

/// A signal the agent was refused (EPERM), with the layer that refused it: the kernel
/// lets a process signal one whose real or saved uid is its own uid, so a refusal of such
/// a target is Landlock's (signal scoping: outside the agent's domain); of any other, the
/// permission check's. A process group, or a target gone, cannot be told: the kernel's.
pub(super) fn signal_event(
    raw: &RawEvent,
    mut e: Event,
    agent: Option<&AgentInfo>,
    targets: &Targets<'_>,
) -> Event {
    let pidfd = raw.flags & agentd_common::EVENT_FLAG_PIDFD != 0;
    let target = if pidfd {
        e = e.with("pidfd", raw.dfd);
        (targets.fd_pid)(raw.pid, raw.dfd)
    } else {
        Some(raw.dfd)
    };
    let sig = i32::try_from(raw.aux).unwrap_or(0);
    let name =
        nix::sys::signal::Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.to_string());
    e = e.with("signal", sig).with("signal_name", name);
    e.errno = (raw.ret < 0).then(|| i32::try_from(raw.ret.saturating_neg()).unwrap_or(i32::MAX));
    e.verdict = Verdict::Deny;
    let own = agent.and_then(|a| a.creds.get());
    e.layer = match (target, own) {
        (Some(t), Some(own)) if t > 0 => {
            e = e.with("target", t);
            match (targets.creds)(t) {
                Some(c) if c.uid == own.uid || c.suid == own.uid => Layer::Landlock,
                Some(_) => Layer::Permission,
                None => Layer::Kernel,
            }
        }
        (Some(t), _) => {
            e = e.with("target", t);
            Layer::Kernel
        }
        (None, _) => Layer::Kernel,
    };
    e
}

/// A unix-socket connect or bind, reported at its exit with the call's result. The
/// socket's name is `path` (absolute, as resolved) or, for an abstract socket, `@name`
/// (`abstract: true`). A refusal is BPF LSM's when its program marked the call (a peer
/// that is neither the agent's nor in `network.unix`); Landlock's when its rules explain
/// it: an abstract socket outside the agent's domain (EPERM, scoping), a pathname socket
/// created where the agent may not write (EACCES); else the kernel's own (file
/// permissions, no listener).
pub(super) fn unix_socket_event(
    raw: &RawEvent,
    kind: EventKind,
    mut e: Event,
    agent: Option<&AgentInfo>,
    resolve: Resolver<'_>,
) -> Event {
    let len = usize::try_from(raw.aux)
        .unwrap_or(0)
        .min(agentd_common::UNIX_PATH_MAX);
    let name = &raw.path[..len];
    let abstract_name = name.first() == Some(&0);
    let path = if abstract_name {
        let rest = &name[1..];
        // Abstract names are bytes; NULs are shown escaped.
        format!("@{}", String::from_utf8_lossy(rest).replace('\0', "\\0"))
    } else {
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        let text = String::from_utf8_lossy(&name[..end]).into_owned();
        resolve_path(&text, raw.pid, AT_FDCWD, false, resolve)
            .to_string_lossy()
            .into_owned()
    };
    let errno = (raw.ret < 0).then(|| i32::try_from(raw.ret.saturating_neg()).unwrap_or(i32::MAX));
    let policy = agent.map(|a| a.policy.as_ref());
    let landlock = match (errno, kind) {
        (Some(EPERM), EventKind::Connect) => abstract_name,
        (Some(EACCES), EventKind::Bind) => {
            !abstract_name
                && policy.is_some_and(|p| {
                    let path = Path::new(&path);
                    path.is_absolute() && !p.fs_allows(path, |a| a.write)
                })
        }
        _ => false,
    };
    let lsm = raw.layer == agentd_common::Layer::BpfLsm as u8;
    (e.layer, e.verdict) = match errno {
        // The peer is no socket of the agent's and not in `network.unix` (EACCES; in
        // monitor mode the call went on).
        _ if lsm => (Layer::BpfLsm, Verdict::Deny),
        None => (Layer::Kernel, Verdict::Allow),
        Some(_) if landlock => (Layer::Landlock, Verdict::Deny),
        Some(EPERM | EACCES) => (Layer::Kernel, Verdict::Deny),
        // ENOENT, ECONNREFUSED, EADDRINUSE: allowed, and failed on its own.
        Some(_) => (Layer::Kernel, Verdict::Allow),
    };
    e.errno = errno;
    e.path = Some(path);
    e = e.with("family", "unix");
    if abstract_name {
        e = e.with("abstract", true);
    }
    e
}

pub(super) fn family_name(f: u16) -> serde_json::Value {
    match i32::from(f) {
        libc::AF_UNIX => "unix".into(),
        libc::AF_INET => "inet".into(),
        libc::AF_INET6 => "inet6".into(),
        libc::AF_NETLINK => "netlink".into(),
        libc::AF_PACKET => "packet".into(),
        other => other.into(),
    }
}

pub(super) fn socket_type_name(t: u64) -> serde_json::Value {
    match i32::try_from(t).unwrap_or(-1) {
        libc::SOCK_STREAM => "stream".into(),
        libc::SOCK_DGRAM => "dgram".into(),
        libc::SOCK_RAW => "raw".into(),
        libc::SOCK_SEQPACKET => "seqpacket".into(),
        _ => t.into(),
    }
}

pub(super) fn proto_name(p: u8) -> Option<String> {
    match p {
        IPPROTO_TCP => Some("tcp".into()),
        IPPROTO_UDP => Some("udp".into()),
        0 => None,
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use agentd_common::{EVENT_FLAG_PATH_TRUNCATED, Syscall};

    use super::{
        super::{
            Creds, TargetCreds,
            fixtures::{CLOCK, agent, dec, decode, no_resolve, raw, set},
        },
        *,
    };
    use crate::event::Kind;

    #[test]
    fn open_flag_names() {
        assert_eq!(open_flags(0), "O_RDONLY");
        assert_eq!(
            open_flags((libc::O_RDWR | libc::O_APPEND | libc::O_EXCL | libc::O_CREAT) as u64),
            "O_RDWR|O_CREAT|O_EXCL|O_APPEND"
        );
        assert_eq!(
            open_flags((libc::O_TMPFILE | libc::O_WRONLY) as u64),
            "O_WRONLY|O_TMPFILE"
        );
    }

    #[test]
    fn symlink_chown_setxattr_truncate_details() {
        let mut r = raw(EventKind::Symlink);
        r.syscall = Syscall::Symlinkat as u8;
        set(&mut r.path, "../../etc/shadow");
        set(&mut r.path2, "/tmp/link");
        let e = dec(&r);
        assert_eq!(e.path.as_deref(), Some("../../etc/shadow"));
        assert_eq!(e.path2.as_deref(), Some("/tmp/link"));
        assert!(e.detail.get("path_arg").is_none());

        let mut r = raw(EventKind::Chown);
        r.aux = 1000 | (0xffff_ffffu64 << 32);
        set(&mut r.path, "/tmp/f");
        let e = dec(&r);
        assert_eq!(e.detail["uid"], 1000);
        assert!(e.detail.get("gid").is_none());

        let mut r = raw(EventKind::Setxattr);
        set(&mut r.path, "/tmp/f");
        set(&mut r.path2, "user.x");
        assert_eq!(dec(&r).detail["xattr"], "user.x");

        let mut r = raw(EventKind::Truncate);
        r.aux = 4096;
        set(&mut r.path, "/tmp/f");
        r.flags = EVENT_FLAG_PATH_TRUNCATED;
        let e = dec(&r);
        assert_eq!(e.detail["length"], 4096);
        assert_eq!(e.detail["path_truncated"], true);
    }

    #[test]
    fn fork_and_exit_details() {
        let mut r = raw(EventKind::Fork);
        r.ret = 4321;
        let e = dec(&r);
        assert_eq!((e.kind, e.verdict), (Kind::Fork, Verdict::None));
        assert_eq!(e.detail["child"], 4321);
        let mut r = raw(EventKind::Exit);
        r.ret = 3 << 8;
        assert_eq!(dec(&r).detail["code"], 3);
        r.ret = 9;
        let e = dec(&r);
        assert_eq!(e.kind, Kind::ProcessExit);
        assert_eq!(e.detail["signal"], 9);
        r.ret = 11 | 0x80;
        assert_eq!(dec(&r).detail["core_dumped"], true);
    }

    #[test]
    fn exec_refusals_of_the_gate_say_why_and_which_file() {
        let mut r = raw(EventKind::Exec);
        r.layer = agentd_common::Layer::Bpf as u8;
        r.verdict = agentd_common::Verdict::Deny as u8;
        r.aux = EXEC_REFUSED_SWAPPED << EXEC_REFUSED_SHIFT | (254 << 20 | 3);
        r.ret = 1234;
        let e = dec(&r);
        assert_eq!(
            (e.kind, e.layer, e.verdict, e.errno),
            (Kind::Exec, Layer::Bpf, Verdict::Deny, None)
        );
        assert_eq!(e.detail["reason"], "swapped");
        assert_eq!(e.detail["dev"], "254:3");
        assert_eq!(e.detail["ino"], 1234);
        assert_eq!(e.detail["action"], "the process was killed at exec");
        r.aux = EXEC_REFUSED_NOT_APPROVED << EXEC_REFUSED_SHIFT | 27;
        // Inode numbers use all 64 bits (overlayfs with xino).
        r.ret = (1u64 << 63 | 5) as i64;
        let e = dec(&r);
        assert_eq!(e.detail["reason"], "not approved");
        assert_eq!(e.detail["dev"], "0:27");
        assert_eq!(e.detail["ino"], 1u64 << 63 | 5);
        r.aux = 9 << EXEC_REFUSED_SHIFT;
        assert_eq!(dec(&r).detail["reason"], "unknown (9)");
        // A memfd names no file.
        r.aux = 0;
        assert!(!dec(&r).detail.contains_key("ino"));
    }

    #[test]
    fn a_refused_signal_is_landlocks_for_a_target_of_the_same_user() {
        let a = agent();
        let _ = a.creds.set(Creds {
            uid: 1000,
            gid: 1000,
            groups: vec![],
        });
        let mut r = raw(EventKind::Signal);
        r.ret = -i64::from(libc::EPERM);
        r.aux = libc::SIGTERM as u64;
        let targets = Targets {
            fd_pid: &|pid, fd| (pid == 100 && fd == 5).then_some(77),
            creds: &|pid| match pid {
                // Same user, outside the agent: only Landlock's scoping refuses.
                42 => Some(TargetCreds {
                    uid: 1000,
                    suid: 1000,
                }),
                // A setuid program the user started: its real uid is the user's.
                43 => Some(TargetCreds { uid: 1000, suid: 0 }),
                77 => Some(TargetCreds { uid: 0, suid: 0 }),
                _ => None,
            },
        };
        let dec_t =
            |r: &RawEvent| super::super::decode(r, Some(&a), CLOCK, &no_resolve, &targets).unwrap();
        r.dfd = 42;
        let e = dec_t(&r);
        assert_eq!(e.kind, Kind::Signal);
        assert_eq!((e.layer, e.verdict), (Layer::Landlock, Verdict::Deny));
        assert_eq!(
            (e.detail["target"].clone(), e.detail["signal_name"].clone()),
            (42.into(), "SIGTERM".into())
        );
        r.dfd = 43;
        assert_eq!(dec_t(&r).layer, Layer::Landlock);
        // A target whose identity cannot be read (gone): cannot tell.
        r.dfd = 1;
        assert_eq!(
            dec_t(&r).layer,
            Layer::Kernel,
            "gone, or unreadable: cannot tell"
        );
        // Through a pidfd, to root's process: the permission check refuses first.
        r.flags = agentd_common::EVENT_FLAG_PIDFD;
        r.dfd = 5;
        let e = dec_t(&r);
        assert_eq!(
            (e.layer, e.detail["target"].clone()),
            (Layer::Permission, 77.into())
        );
        // A process group: cannot tell.
        r.flags = 0;
        r.dfd = -42;
        assert_eq!(dec_t(&r).layer, Layer::Kernel);
    }

    fn unix_raw(kind: EventKind, name: &[u8], ret: i32) -> RawEvent {
        let mut r = raw(kind);
        r.family = libc::AF_UNIX as u16;
        r.ret = i64::from(ret);
        r.path[..name.len()].copy_from_slice(name);
        r.aux = name.len() as u64;
        r
    }

    #[test]
    fn unix_socket_calls_name_the_socket_and_the_layer() {
        // Abstract, refused by Landlock's scoping.
        let e = dec(&unix_raw(EventKind::Connect, b"\0bus\0x", -libc::EPERM));
        assert_eq!(
            (e.kind, e.layer, e.verdict, e.errno),
            (
                Kind::Connect,
                Layer::Landlock,
                Verdict::Deny,
                Some(libc::EPERM)
            )
        );
        assert_eq!(e.path.as_deref(), Some("@bus\\0x"));
        assert_eq!(e.detail.get("abstract"), Some(&serde_json::json!(true)));
        assert_eq!(e.addr, None);
        // A pathname socket created where the agent may not write: Landlock's.
        let e = dec(&unix_raw(EventKind::Bind, b"/etc/s.sock\0", -libc::EACCES));
        assert_eq!((e.layer, e.verdict), (Layer::Landlock, Verdict::Deny));
        assert_eq!(e.path.as_deref(), Some("/etc/s.sock"));
        // Where it may: the kernel's own permission check.
        let e = dec(&unix_raw(EventKind::Bind, b"/tmp/s.sock", -libc::EACCES));
        assert_eq!((e.layer, e.verdict), (Layer::Kernel, Verdict::Deny));
        // Connected; and allowed but nobody listening.
        let e = dec(&unix_raw(EventKind::Connect, b"/run/x.sock\0", 0));
        assert_eq!(
            (e.layer, e.verdict, e.errno),
            (Layer::Kernel, Verdict::Allow, None)
        );
        let e = dec(&unix_raw(
            EventKind::Connect,
            b"/run/x.sock",
            -libc::ECONNREFUSED,
        ));
        assert_eq!(
            (e.verdict, e.errno),
            (Verdict::Allow, Some(libc::ECONNREFUSED))
        );
        // Refused by the BPF LSM program (a peer outside the agent and network.unix):
        // its mark decides the layer, for a pathname and an abstract socket alike; in
        // monitor mode the call went on and the event still says what would have been.
        for name in [&b"/run/docker.sock"[..], b"\0bus"] {
            let mut r = unix_raw(EventKind::Connect, name, -libc::EACCES);
            r.layer = agentd_common::Layer::BpfLsm as u8;
            let e = dec(&r);
            assert_eq!(
                (e.layer, e.verdict, e.errno),
                (Layer::BpfLsm, Verdict::Deny, Some(libc::EACCES))
            );
            r.ret = 0;
            r.flags |= agentd_common::EVENT_FLAG_MONITOR;
            let e = dec(&r);
            assert_eq!(
                (e.layer, e.verdict, e.errno),
                (Layer::BpfLsm, Verdict::Deny, None)
            );
            assert_eq!(e.detail.get("monitor"), Some(&serde_json::json!(true)));
        }
        // A relative name is resolved against the process's working directory.
        let cwd = |_pid: u32, dfd: i32, p: &str, _follow: bool| {
            (dfd == AT_FDCWD).then(|| PathBuf::from("/home/u/project").join(p))
        };
        let e = decode(
            &unix_raw(EventKind::Bind, b"../s.sock", -libc::EACCES),
            Some(&agent()),
            CLOCK,
            &cwd,
        )
        .unwrap();
        assert_eq!(e.path.as_deref(), Some("/home/u/s.sock"));
        assert_eq!(e.layer, Layer::Landlock);
    }
}
