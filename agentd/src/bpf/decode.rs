//! `RawEvent` (the ring-buffer record) -> [`Event`], once, and the attribution of a
//! failed file operation to the layer that refused it. Pure: the clock offset, the agent
//! table entry and the path resolver come in as arguments, so every rule is unit-tested
//! with hand-made records.

use std::{
    net::{IpAddr, Ipv6Addr},
    os::unix::ffi::OsStrExt as _,
    path::{Component, Path, PathBuf},
};

use agentd_common::{
    EVENT_FLAG_CANARY_CANDIDATE, EVENT_FLAG_CANARY_SENT, EVENT_FLAG_DIR, EVENT_FLAG_HELD,
    EVENT_FLAG_MAPPED, EVENT_FLAG_MONITOR, EVENT_FLAG_NO_ENTER, EVENT_FLAG_PATH_TRUNCATED,
    EVENT_FLAG_PATH_UNREAD, EVENT_FLAG_PATH2_TRUNCATED, EVENT_FLAG_TRIPPED,
    EVENT_FLAG_WRITE_INTENT, EXEC_ARG_LEN, EXEC_ARGS, EXEC_REFUSED_NOT_APPROVED,
    EXEC_REFUSED_PSEUDO, EXEC_REFUSED_SHIFT, EXEC_REFUSED_SWAPPED, EventKind, IPPROTO_TCP,
    IPPROTO_UDP, RawEvent, Syscall,
};

use crate::{
    event::{Event, HELD, Kind, Layer, TRIPPED_IN_KERNEL, Verdict, rfc3339},
    host::{Creds, FileAccess},
    profile::CompiledPolicy,
};

const EPERM: i32 = libc::EPERM;
const EACCES: i32 = libc::EACCES;
const ENOSYS: i32 = libc::ENOSYS;
const EXDEV: i32 = libc::EXDEV;
const EROFS: i32 = libc::EROFS;
const EBUSY: i32 = libc::EBUSY;
const AF_UNIX: u32 = libc::AF_UNIX as u32;
/// `AT_FDCWD`: a relative path is resolved against the working directory.
pub const AT_FDCWD: i32 = -100;

/// What the decoder knows about the agent an event belongs to.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    pub id: String,
    pub policy: std::sync::Arc<CompiledPolicy>,
    /// The agent's identity, from its launch: with it, a refusal the file's permissions
    /// explain is told from one the profile's rules do.
    pub creds: std::sync::Arc<std::sync::OnceLock<Creds>>,
}

impl AgentInfo {
    pub fn new(id: &str, policy: std::sync::Arc<CompiledPolicy>) -> AgentInfo {
        AgentInfo {
            id: id.to_owned(),
            policy,
            creds: std::sync::Arc::default(),
        }
    }
}

/// The permission check a file operation of `kind` needing `need` is subject to.
fn file_access(need: Need, kind: EventKind) -> FileAccess {
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

/// Resolves a path argument of process `pid` as the kernel did: a relative one against
/// directory fd `dfd` (`AT_FDCWD` = its working directory; an empty path: the path of
/// `dfd` itself), then the symbolic links of its directories, and of its last component
/// too when the call follows it (`follow`). Returns `None` when it cannot (the process is
/// gone).
pub type Resolver<'a> = &'a dyn Fn(u32, i32, &str, bool) -> Option<PathBuf>;

/// Whether the agent's identity may, by the permissions of the files involved, do the
/// operation `kind` needing `need` on an absolute path: `Some(false)` when the owner,
/// group and mode bits refuse it (the kernel checks them before any security module),
/// `None` when it cannot tell (see [`crate::host::Creds::permits`]).
pub type Dac<'a> = &'a dyn Fn(&Path, Need, EventKind) -> Option<bool>;

/// CLOCK_REALTIME minus CLOCK_MONOTONIC, in nanoseconds: turns a `bpf_ktime_get_ns()`
/// stamp into wall-clock time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockOffset(pub i128);

impl ClockOffset {
    pub fn wall(self, ktime_ns: u64) -> String {
        let ns = i128::from(ktime_ns) + self.0;
        let ns = u128::try_from(ns).unwrap_or(0);
        let secs = u64::try_from(ns / 1_000_000_000).unwrap_or(u64::MAX);
        rfc3339(secs, (ns % 1_000_000_000) as u32)
    }
}

/// The bytes of a NUL-terminated buffer before the NUL, lossily as UTF-8.
pub fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn kind_of(k: EventKind) -> Kind {
    match k {
        EventKind::Exec => Kind::Exec,
        EventKind::Fork => Kind::Fork,
        EventKind::Exit => Kind::ProcessExit,
        EventKind::OpenWrite => Kind::OpenWrite,
        EventKind::OpenRead => Kind::OpenRead,
        EventKind::Signal => Kind::Signal,
        EventKind::Unlink => Kind::Unlink,
        EventKind::Rename => Kind::Rename,
        EventKind::Mkdir => Kind::Mkdir,
        EventKind::Rmdir => Kind::Rmdir,
        EventKind::Link => Kind::Link,
        EventKind::Symlink => Kind::Symlink,
        EventKind::Chmod => Kind::Chmod,
        EventKind::Chown => Kind::Chown,
        EventKind::Truncate => Kind::Truncate,
        EventKind::Setxattr => Kind::Setxattr,
        EventKind::Connect => Kind::Connect,
        EventKind::Sendmsg => Kind::Sendmsg,
        EventKind::Bind => Kind::Bind,
        EventKind::Inbound => Kind::Accept,
        EventKind::SocketCreate => Kind::Socket,
        EventKind::Canary => Kind::Canary,
        EventKind::Syscall => Kind::Syscall,
    }
}

/// The access a file operation needed, to compare with the policy's Landlock rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Read,
    Write,
    Exec,
}

/// Facts about one failed (or not) file operation, for [`attribute`].
#[derive(Debug, Clone, Copy)]
pub struct FileOutcome<'a> {
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
pub fn attribute(
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

/// The errno a seccomp policy's `default_errno` names.
fn errno_named(name: &str) -> Option<i32> {
    match name {
        "EPERM" => Some(EPERM),
        "EACCES" => Some(EACCES),
        "ENOSYS" => Some(ENOSYS),
        _ => None,
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
pub fn attribute_call(name: &str, errno: i32, policy: Option<&CompiledPolicy>) -> (Layer, Verdict) {
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

/// An event's address: IPv4-mapped IPv6 shown as IPv4.
fn ip_of(raw: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(raw);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn layer_of_raw(raw: u8) -> Option<Layer> {
    match raw {
        x if x == agentd_common::Layer::Observed as u8 => None,
        x if x == agentd_common::Layer::Landlock as u8 => Some(Layer::Landlock),
        x if x == agentd_common::Layer::Seccomp as u8 => Some(Layer::Seccomp),
        x if x == agentd_common::Layer::Bpf as u8 => Some(Layer::Bpf),
        x if x == agentd_common::Layer::BpfLsm as u8 => Some(Layer::BpfLsm),
        _ => None,
    }
}

fn verdict_of_raw(raw: u8) -> Verdict {
    match raw {
        x if x == agentd_common::Verdict::Allow as u8 => Verdict::Allow,
        x if x == agentd_common::Verdict::Killed as u8 => Verdict::Killed,
        // Deny, and anything unknown: never report an unknown verdict as allowed.
        _ => Verdict::Deny,
    }
}

fn proto_name(p: u8) -> Option<String> {
    match p {
        IPPROTO_TCP => Some("tcp".into()),
        IPPROTO_UDP => Some("udp".into()),
        0 => None,
        other => Some(other.to_string()),
    }
}

fn family_name(f: u16) -> serde_json::Value {
    match i32::from(f) {
        libc::AF_UNIX => "unix".into(),
        libc::AF_INET => "inet".into(),
        libc::AF_INET6 => "inet6".into(),
        libc::AF_NETLINK => "netlink".into(),
        libc::AF_PACKET => "packet".into(),
        other => other.into(),
    }
}

fn socket_type_name(t: u64) -> serde_json::Value {
    match i32::try_from(t).unwrap_or(-1) {
        libc::SOCK_STREAM => "stream".into(),
        libc::SOCK_DGRAM => "dgram".into(),
        libc::SOCK_RAW => "raw".into(),
        libc::SOCK_SEQPACKET => "seqpacket".into(),
        _ => t.into(),
    }
}

/// Open flags as `O_WRONLY|O_CREAT|...` (the ones that say what an open may change).
pub fn open_flags(flags: u64) -> String {
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
fn exit_detail(code: i64, e: Event) -> Event {
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

/// The path `raw` (an argument of process `pid`) names, as the resolver finds it (see
/// [`Resolver`]), or `raw` itself.
fn resolve_path(raw: &str, pid: u32, dfd: i32, follow: bool, resolve: Resolver<'_>) -> PathBuf {
    if raw.is_empty() {
        return PathBuf::new();
    }
    resolve(pid, dfd, raw, follow).map_or_else(|| PathBuf::from(raw), |p| normalize(&p))
}

/// Whether the call follows a symbolic link in the last component of its (first) path.
fn follows_last(kind: EventKind, syscall: Option<Syscall>, aux: u64) -> bool {
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

/// The directory the kernel read for a relative path of this event ([`EVENT_FLAG_DIR`]:
/// `RawEvent::dir`, components innermost first), as an absolute path. `None` without the
/// flag, or when the record does not hold `dir_parts` plain components.
pub fn kernel_dir(raw: &RawEvent) -> Option<PathBuf> {
    if raw.flags & EVENT_FLAG_DIR == 0 {
        return None;
    }
    let mut parts: Vec<&[u8]> = raw.dir.split(|&b| b == 0).collect();
    let n = usize::try_from(raw.dir_parts).ok()?;
    // n components, then what follows the last NUL (at least an empty piece).
    if parts.len() <= n {
        return None;
    }
    parts.truncate(n);
    let mut dir = PathBuf::from("/");
    for part in parts.iter().rev() {
        if part.is_empty() || *part == b"." || *part == b".." || part.contains(&b'/') {
            return None;
        }
        dir.push(std::ffi::OsStr::from_bytes(part));
    }
    Some(dir)
}

/// The [`RawEvent`] a ring-buffer record holds: its first `size_of::<RawEvent>()` bytes;
/// `None` when it is shorter.
pub fn raw_event(record: &[u8]) -> Option<RawEvent> {
    if record.len() < size_of::<RawEvent>() {
        return None;
    }
    // SAFETY: `record` holds at least size_of::<RawEvent>() bytes; RawEvent is plain data
    // (integers and byte arrays, no padding: any bit pattern is valid) and the read is
    // unaligned-safe.
    Some(unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) })
}

/// Decodes one ring-buffer record. `None` for a record of an unknown kind (a newer BPF
/// object than this binary: never happens with the embedded object), and for a successful
/// read-only open the kernel could not decide that resolves to no canary. `targets` looks
/// up what attributes a refused signal.
pub fn decode(
    raw: &RawEvent,
    agent: Option<&AgentInfo>,
    clock: ClockOffset,
    resolve: Resolver<'_>,
    targets: &Targets<'_>,
) -> Option<Event> {
    let raw_kind = EventKind::from_raw(raw.kind)?;
    let kind = kind_of(raw_kind);
    let agent_id = agent.map_or_else(|| format!("cgroup:{}", raw.agent_cgroup), |a| a.id.clone());
    let mut e = Event::new(
        &agent_id,
        raw.pid,
        &cstr(&raw.comm),
        kind,
        Verdict::None,
        Layer::Kernel,
    );
    e.ts = clock.wall(raw.ktime_ns);
    e.ktime_ns = Some(raw.ktime_ns);
    if raw.tid != raw.pid {
        e = e.with("tid", raw.tid);
    }
    let monitor = raw.flags & EVENT_FLAG_MONITOR != 0;
    if monitor {
        e = e.with("monitor", true);
    }
    if raw.flags & EVENT_FLAG_PATH_TRUNCATED != 0 {
        e = e.with("path_truncated", true);
    }
    if raw.flags & EVENT_FLAG_PATH2_TRUNCATED != 0 {
        e = e.with("path2_truncated", true);
    }
    if raw.flags & EVENT_FLAG_TRIPPED != 0 {
        // The kernel tripped the breaker in this very call (see `Event::tripped_in_kernel`).
        e = e.with(TRIPPED_IN_KERNEL, true);
    }
    if raw.flags & EVENT_FLAG_HELD != 0 {
        e = e.with(HELD, true);
    }

    match raw_kind {
        EventKind::Connect | EventKind::Sendmsg | EventKind::Bind
            if u32::from(raw.family) == AF_UNIX =>
        {
            e = unix_socket_event(raw, raw_kind, e, agent, resolve);
        }
        EventKind::Connect | EventKind::Sendmsg | EventKind::Bind => {
            e.addr = Some(ip_of(raw.addr));
            e.port = Some(raw.port);
            match layer_of_raw(raw.layer) {
                Some(layer) => {
                    // A cgroup program's decision: EPERM when it refused.
                    e.layer = layer;
                    e.verdict = verdict_of_raw(raw.verdict);
                    e.proto = proto_name(raw.proto);
                    if e.verdict != Verdict::Allow && !monitor {
                        e.errno = Some(EPERM);
                    }
                }
                None => {
                    // Reported at the call's exit: refused before any cgroup program saw
                    // it, by a security module of the host (agentd's Landlock ruleset
                    // handles no network right).
                    e.layer = Layer::Kernel;
                    e.verdict = Verdict::Deny;
                    e.errno = Some(i32::try_from(raw.ret.saturating_neg()).unwrap_or(i32::MAX));
                }
            }
            e = e.with("family", family_name(raw.family));
        }
        EventKind::Inbound => {
            // Dropped in the receive path: the peer's connection request never reached the
            // agent, so the agent saw no errno.
            e.layer = Layer::Bpf;
            e.verdict = verdict_of_raw(raw.verdict);
            e.addr = Some(ip_of(raw.addr));
            e.port = Some(raw.port);
            e.proto = proto_name(raw.proto);
            e = e.with("peer_port", raw.aux);
        }
        EventKind::SocketCreate => {
            e.layer = layer_of_raw(raw.layer).unwrap_or(Layer::Bpf);
            e.verdict = verdict_of_raw(raw.verdict);
            e.proto = proto_name(raw.proto);
            if e.verdict != Verdict::Allow && !monitor {
                e.errno = Some(EPERM);
            }
            e = e
                .with("family", family_name(raw.family))
                .with("type", socket_type_name(raw.aux))
                .with("protocol", raw.ret);
        }
        EventKind::Signal => {
            e = signal_event(raw, e, agent, targets);
        }
        EventKind::Fork => {
            e = e.with("child", raw.ret);
        }
        EventKind::Exit => {
            e = exit_detail(raw.ret, e);
        }
        EventKind::Syscall => {
            let errno =
                (raw.ret < 0).then(|| i32::try_from(raw.ret.saturating_neg()).unwrap_or(i32::MAX));
            e.errno = errno;
            let policy = agent.map(|a| a.policy.as_ref());
            (e.layer, e.verdict) = match (Syscall::from_raw(raw.syscall), errno) {
                (Some(s), Some(errno)) => {
                    e = e.with("syscall", s.name());
                    attribute_call(s.name(), errno, policy)
                }
                // Never sent by the embedded programs: a success, or an unknown call.
                (Some(s), None) => {
                    e = e.with("syscall", s.name());
                    (Layer::Kernel, Verdict::Allow)
                }
                (None, _) => {
                    e = e.with("syscall", raw.syscall);
                    (Layer::Kernel, Verdict::Deny)
                }
            };
        }
        EventKind::Exec if raw.flags & EVENT_FLAG_MAPPED != 0 => {
            // From the BPF LSM programs: a mapping with PROT_EXEC of code the agent could
            // have written (or of a memfd) was refused; no syscall recorded it.
            e.layer = Layer::BpfLsm;
            e.verdict = verdict_of_raw(raw.verdict);
            if !monitor {
                e.errno = Some(EACCES);
            }
            e.path = kernel_dir(raw).map(|p| p.to_string_lossy().into_owned());
            e = e
                .with("call", if raw.aux == 1 { "mprotect" } else { "mmap" })
                .with(
                    "reason",
                    "executable mapping of a file beneath a write path and no exec path, \
                     or of a file no path names (memfd)",
                );
        }
        EventKind::Exec if layer_of_raw(raw.layer) == Some(Layer::Bpf) => {
            // From `sched_process_exec`: the program exec'd is no file a path names (a
            // memfd), or not the one a person approved, or one the profile asks about
            // that no one approved; the process was killed before its first instruction.
            e.layer = Layer::Bpf;
            e.verdict = verdict_of_raw(raw.verdict);
            e = exec_refusal(raw, e).with(
                "action",
                if monitor {
                    "none (monitor mode)"
                } else {
                    "the process was killed at exec"
                },
            );
        }
        EventKind::Exec
        | EventKind::OpenWrite
        | EventKind::OpenRead
        | EventKind::Canary
        | EventKind::Unlink
        | EventKind::Rename
        | EventKind::Mkdir
        | EventKind::Rmdir
        | EventKind::Link
        | EventKind::Symlink
        | EventKind::Chmod
        | EventKind::Chown
        | EventKind::Truncate
        | EventKind::Setxattr => {
            return decode_file(raw, raw_kind, e, agent, resolve);
        }
    }
    Some(e)
}

/// The reason (`EXEC_REFUSED_*`) an exec program's refusal carries in `aux`, and the
/// file's device and inode when it names one.
fn exec_refusal(raw: &RawEvent, e: Event) -> Event {
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

fn decode_file(
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

/// What the decoder can learn of a signal's target while it runs: the pid a pidfd of a
/// process refers to (`fd_pid(pid, fd)`), and a process's identity (`creds(pid)`).
pub struct Targets<'a> {
    pub fd_pid: &'a dyn Fn(u32, i32) -> Option<i32>,
    pub creds: &'a dyn Fn(i32) -> Option<TargetCreds>,
}

/// A signal target's user ids, as the kernel's permission check compares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetCreds {
    pub uid: u32,
    pub suid: u32,
}

/// A signal the agent was refused (EPERM), with the layer that refused it: the kernel
/// lets a process signal one whose real or saved uid is its own uid, so a refusal of such
/// a target is Landlock's (signal scoping: outside the agent's domain); of any other, the
/// permission check's. A process group, or a target gone, cannot be told: the kernel's.
fn signal_event(
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
fn unix_socket_event(
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
pub fn canary_of<'a>(policy: &'a CompiledPolicy, path: &Path) -> Option<&'a Path> {
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

/// Details carried in `aux`, by kind (see `RawEvent::aux`).
fn aux_detail(kind: EventKind, aux: u64, mut e: Event) -> Event {
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

/// A record as the BPF programs write it, with defaults the tests (and the fuzz seeds)
/// start from: agent cgroup 4242, `bash`, pid 100, allowed, observed.
#[cfg(test)]
pub(crate) fn sample_raw(kind: EventKind) -> RawEvent {
    let mut comm = [0u8; agentd_common::COMM_LEN];
    comm[..4].copy_from_slice(b"bash");
    RawEvent {
        ktime_ns: 5_000_000_123,
        agent_cgroup: 4242,
        ret: 0,
        aux: 0,
        pid: 100,
        tid: 100,
        kind: kind as u16,
        flags: 0,
        layer: agentd_common::Layer::Observed as u8,
        verdict: 0,
        proto: 0,
        syscall: 0,
        addr: [0; 16],
        port: 0,
        family: 0,
        dfd: AT_FDCWD,
        comm,
        path: [0; agentd_common::PATH_LEN],
        path2: [0; agentd_common::PATH_LEN],
        canary: 0,
        dir_parts: 0,
        dir: [0; agentd_common::PATH_LEN],
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::profile::{CompileContext, compile, parse};

    fn policy() -> Arc<CompiledPolicy> {
        let text = r#"
[agent]
name = "t"
[filesystem]
read = ["/usr", "/home/u/project"]
write = ["/home/u/project", "/tmp"]
exec = ["/usr/bin"]
canaries = ["/home/u/.ssh"]
[network]
connect = ["127.0.0.1/32:8080"]
"#;
        let p = parse("test", text).unwrap();
        Arc::new(compile(
            &p,
            &CompileContext {
                workspace: "/home/u/project".into(),
                home: "/home/u".into(),
            },
        ))
    }

    fn agent() -> AgentInfo {
        AgentInfo::new("agent-1", policy())
    }

    fn raw(kind: EventKind) -> RawEvent {
        sample_raw(kind)
    }

    fn set(buf: &mut [u8], s: &str) {
        buf[..s.len()].copy_from_slice(s.as_bytes());
        buf[s.len()] = 0;
    }

    fn no_resolve(_: u32, _: i32, _: &str, _: bool) -> Option<PathBuf> {
        None
    }

    /// Nothing known of any signal's target.
    const UNKNOWN: Targets<'static> = Targets {
        fd_pid: &|_, _| None,
        creds: &|_| None,
    };

    fn decode(
        raw: &RawEvent,
        agent: Option<&AgentInfo>,
        clock: ClockOffset,
        resolve: Resolver<'_>,
    ) -> Option<Event> {
        super::decode(raw, agent, clock, resolve, &UNKNOWN)
    }

    const CLOCK: ClockOffset = ClockOffset(1_000_000_000_000_000_000);

    fn dec(r: &RawEvent) -> Event {
        decode(r, Some(&agent()), CLOCK, &no_resolve).unwrap()
    }

    #[test]
    fn connect_denied_by_bpf_with_mapped_v4() {
        let mut r = raw(EventKind::Connect);
        r.layer = agentd_common::Layer::Bpf as u8;
        r.verdict = agentd_common::Verdict::Deny as u8;
        r.proto = IPPROTO_TCP;
        r.addr = Ipv6Addr::from([0, 0, 0, 0, 0, 0xffff, 0x7f00, 1]).octets();
        r.port = 9;
        r.family = libc::AF_INET as u16;
        let e = dec(&r);
        assert_eq!(e.kind, Kind::Connect);
        assert_eq!(e.layer, Layer::Bpf);
        assert_eq!(e.verdict, Verdict::Deny);
        assert_eq!(e.addr, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(e.port, Some(9));
        assert_eq!(e.proto.as_deref(), Some("tcp"));
        assert_eq!(e.errno, Some(libc::EPERM));
        assert_eq!(e.agent, "agent-1");
        assert_eq!(e.comm, "bash");
        assert_eq!(e.ts, "2001-09-09T01:46:45.000000123Z");
        assert_eq!(e.ktime_ns, Some(5_000_000_123));
    }

    /// Found by the kernel_record fuzz target: a return value of i64::MIN, whose negation
    /// overflows, is an errno beyond any (i32::MAX), not a panic.
    #[test]
    fn the_most_negative_return_value_decodes() {
        let cases = [
            (EventKind::Connect, libc::AF_INET as u16),
            (EventKind::Connect, libc::AF_UNIX as u16),
            (EventKind::Syscall, 0),
            (EventKind::Signal, 0),
            (EventKind::OpenWrite, 0),
        ];
        for (kind, family) in cases {
            let mut r = raw(kind);
            r.family = family;
            r.ret = i64::MIN;
            assert_eq!(dec(&r).errno, Some(i32::MAX), "{kind:?}");
        }
    }

    /// The connect/bind exit's report of an inet call refused before the cgroup programs:
    /// agentd's Landlock handles no network right, so a security module of the host did.
    #[test]
    fn inet_call_refused_before_the_cgroup_programs_is_the_kernels() {
        let mut r = raw(EventKind::Connect);
        r.ret = -i64::from(libc::EACCES);
        r.addr = Ipv6Addr::from([0, 0, 0, 0, 0, 0xffff, 0x7f00, 1]).octets();
        r.port = 8081;
        r.family = libc::AF_INET as u16;
        let e = dec(&r);
        assert_eq!(
            (e.kind, e.layer, e.verdict, e.errno),
            (
                Kind::Connect,
                Layer::Kernel,
                Verdict::Deny,
                Some(libc::EACCES)
            )
        );
        assert_eq!(e.addr, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(e.port, Some(8081));
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

    #[test]
    fn a_refused_executable_mapping_names_the_file_and_the_call() {
        let mut r = raw(EventKind::Exec);
        r.layer = agentd_common::Layer::BpfLsm as u8;
        r.verdict = agentd_common::Verdict::Deny as u8;
        r.flags = EVENT_FLAG_MAPPED;
        r.aux = 1;
        set_dir(&mut r, "/w/payload");
        let e = dec(&r);
        assert_eq!(
            (e.kind, e.layer, e.verdict, e.errno),
            (Kind::Exec, Layer::BpfLsm, Verdict::Deny, Some(libc::EACCES))
        );
        assert_eq!(e.path.as_deref(), Some("/w/payload"));
        assert_eq!(e.detail["call"], "mprotect");
        // A protected path's refusal, marked by the LSM program on the pending call.
        let mut w = raw(EventKind::OpenWrite);
        w.layer = agentd_common::Layer::BpfLsm as u8;
        w.verdict = agentd_common::Verdict::Deny as u8;
        w.ret = -i64::from(libc::EACCES);
        w.path[..22].copy_from_slice(b"/w/.git/hooks/pre-push");
        let mut info = agent();
        Arc::make_mut(&mut info.policy).protect = vec![PathBuf::from("/w/.git/hooks")];
        let e = decode(&w, Some(&info), CLOCK, &|_, _, _, _| None).unwrap();
        assert_eq!((e.layer, e.verdict), (Layer::BpfLsm, Verdict::Deny));
        assert_eq!(e.detail["protected"], "/w/.git/hooks");
    }

    #[test]
    fn exec_of_a_memfd_is_a_refusal_by_the_exec_program() {
        let mut r = raw(EventKind::Exec);
        r.layer = agentd_common::Layer::Bpf as u8;
        r.verdict = agentd_common::Verdict::Deny as u8;
        let e = dec(&r);
        assert_eq!(
            (e.kind, e.layer, e.verdict, e.errno),
            (Kind::Exec, Layer::Bpf, Verdict::Deny, None)
        );
        assert_eq!(e.path, None);
        assert_eq!(
            e.detail.get("action"),
            Some(&serde_json::json!("the process was killed at exec"))
        );
        r.flags = EVENT_FLAG_MONITOR;
        assert_eq!(
            dec(&r).detail.get("action"),
            Some(&serde_json::json!("none (monitor mode)"))
        );
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
    fn inbound_connection_dropped_has_the_local_port_and_the_peer() {
        let mut r = raw(EventKind::Inbound);
        r.layer = agentd_common::Layer::Bpf as u8;
        r.verdict = agentd_common::Verdict::Deny as u8;
        r.proto = IPPROTO_TCP;
        r.addr = Ipv6Addr::LOCALHOST.octets();
        r.port = 41000;
        r.aux = 55555;
        let e = dec(&r);
        assert_eq!(
            (e.kind, e.layer, e.verdict, e.errno),
            (Kind::Accept, Layer::Bpf, Verdict::Deny, None)
        );
        assert_eq!(e.addr, Some("::1".parse().unwrap()));
        assert_eq!(e.port, Some(41000));
        assert_eq!(e.detail.get("peer_port"), Some(&serde_json::json!(55555)));
        assert_eq!(
            serde_json::to_value(&e).unwrap()["kind"],
            serde_json::json!("net_accept")
        );
    }

    #[test]
    fn monitor_mode_deny_has_no_errno_and_says_monitor() {
        let mut r = raw(EventKind::Sendmsg);
        r.layer = agentd_common::Layer::Bpf as u8;
        r.verdict = agentd_common::Verdict::Deny as u8;
        r.flags = EVENT_FLAG_MONITOR;
        r.proto = IPPROTO_UDP;
        r.addr = Ipv6Addr::LOCALHOST.octets();
        let e = dec(&r);
        assert_eq!(e.verdict, Verdict::Deny);
        assert_eq!(e.errno, None);
        assert_eq!(e.detail["monitor"], true);
        assert_eq!(e.addr, Some("::1".parse().unwrap()));
    }

    #[test]
    fn killed_verdict_and_socket_details() {
        let mut r = raw(EventKind::SocketCreate);
        r.layer = agentd_common::Layer::Bpf as u8;
        r.verdict = agentd_common::Verdict::Killed as u8;
        r.family = libc::AF_INET as u16;
        r.aux = libc::SOCK_RAW as u64;
        r.ret = 1;
        let e = dec(&r);
        assert_eq!(e.kind, Kind::Socket);
        assert_eq!(e.verdict, Verdict::Killed);
        assert_eq!(e.detail["type"], "raw");
        assert_eq!(e.detail["family"], "inet");
        assert_eq!(e.detail["protocol"], 1);
    }

    #[test]
    fn unknown_cgroup_and_unknown_kind() {
        let r = raw(EventKind::Fork);
        let e = decode(&r, None, CLOCK, &no_resolve).unwrap();
        assert_eq!(e.agent, "cgroup:4242");
        let mut r = raw(EventKind::Fork);
        r.kind = 999;
        assert!(decode(&r, None, CLOCK, &no_resolve).is_none());
    }

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

    /// `RawEvent::dir` as the kernel writes it: components innermost first.
    fn set_dir(r: &mut RawEvent, dir: &str) {
        let mut at = 0;
        let parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).rev().collect();
        for p in &parts {
            set(&mut r.dir[at..], p);
            at += p.len() + 1;
        }
        r.dir_parts = parts.len() as u32;
        r.flags |= EVENT_FLAG_DIR;
    }

    #[test]
    fn kernel_dir_reverses_the_components() {
        let mut r = raw(EventKind::Exec);
        assert_eq!(kernel_dir(&r), None);
        set_dir(&mut r, "/home/u/project");
        assert_eq!(kernel_dir(&r), Some(PathBuf::from("/home/u/project")));
        // Stale bytes after the last component are ignored.
        r.dir[20] = b'x';
        assert_eq!(kernel_dir(&r), Some(PathBuf::from("/home/u/project")));
        let mut root = raw(EventKind::Exec);
        set_dir(&mut root, "/");
        assert_eq!(kernel_dir(&root), Some(PathBuf::from("/")));
        // More components claimed than the buffer holds, or odd ones: not trusted.
        r.dir_parts = 200;
        assert_eq!(kernel_dir(&r), None);
        let mut dots = raw(EventKind::Exec);
        set_dir(&mut dots, "/a/../b");
        assert_eq!(kernel_dir(&dots), None);
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
            |r: &RawEvent| super::decode(r, Some(&a), CLOCK, &no_resolve, &targets).unwrap();
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

    #[test]
    fn what_the_kernel_did_is_in_the_event() {
        let mut r = raw(EventKind::Connect);
        r.layer = agentd_common::Layer::Bpf as u8;
        r.verdict = agentd_common::Verdict::Deny as u8;
        r.flags = agentd_common::EVENT_FLAG_TRIPPED;
        let e = dec(&r);
        assert!(e.tripped_in_kernel() && !e.held());
        let mut r = raw(EventKind::Exec);
        r.syscall = Syscall::Execve as u8;
        r.ret = -i64::from(libc::EACCES);
        r.flags = agentd_common::EVENT_FLAG_HELD;
        set(&mut r.path, "/opt/x");
        let e = dec(&r);
        assert!(e.held() && !e.tripped_in_kernel());
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
}
