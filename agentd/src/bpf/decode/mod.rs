//! `RawEvent` (the ring-buffer record) -> [`Event`], once, and the attribution of a
//! failed file operation to the layer that refused it. Pure: the clock offset, the agent
//! table entry and the path resolver come in as arguments, so every rule is unit-tested
//! with hand-made records.
//!
//! How a record flows: [`raw_event`] reads the ring buffer's bytes as a [`RawEvent`];
//! [`decode`] fills in what every event has (agent, process, time, the kernel's flags),
//! then goes by kind: network, signal, process and the BPF programs' own refusals are
//! decoded here, with their details from `details`; a file operation goes to `file`,
//! which resolves its paths (`paths`), tells a canary from a plain open and asks
//! `attribute` which layer refused it.
//!
//! - this file: the entry points and what the caller passes in ([`AgentInfo`],
//!   [`ClockOffset`], [`Resolver`], [`Targets`]);
//! - `record`: the record's raw fields as values (C strings, addresses, the layer and
//!   verdict a program wrote, the directory the kernel read for a relative path);
//! - `paths`: a path argument resolved as the kernel did (through the [`Resolver`]),
//!   lexical normalisation, the canary a path is;
//! - `attribute`: which layer refused a file operation or a call seen at its exit only,
//!   and the verdict;
//! - `details`: what each kind carries besides (open flags, modes, exit status, a
//!   signal's target, a unix socket's name, an exec refusal's reason);
//! - `file`: a file operation's event, from its arguments to its layer.

mod attribute;
mod details;
mod file;
#[cfg(test)]
mod fixtures;
mod paths;
mod record;

use std::path::PathBuf;

use agentd_common::{
    EVENT_FLAG_HELD, EVENT_FLAG_MAPPED, EVENT_FLAG_MONITOR, EVENT_FLAG_PATH_TRUNCATED,
    EVENT_FLAG_PATH2_TRUNCATED, EVENT_FLAG_TRIPPED, EventKind, RawEvent, Syscall,
};

use self::{
    attribute::attribute_call,
    details::{
        exec_refusal, exit_detail, family_name, proto_name, signal_event, socket_type_name,
        unix_socket_event,
    },
    file::decode_file,
    record::{cstr, ip_of, kernel_dir, layer_of_raw, verdict_of_raw},
};
use crate::{
    event::{Event, HELD, Kind, Layer, TRIPPED_IN_KERNEL, Verdict, rfc3339},
    host::Creds,
    profile::CompiledPolicy,
};

#[cfg(test)]
pub(crate) use self::fixtures::sample_raw;
pub use self::paths::normalize;

const EPERM: i32 = libc::EPERM;
const EACCES: i32 = libc::EACCES;
const ENOSYS: i32 = libc::ENOSYS;
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

/// Resolves a path argument of process `pid` as the kernel did: a relative one against
/// directory fd `dfd` (`AT_FDCWD` = its working directory; an empty path: the path of
/// `dfd` itself), then the symbolic links of its directories, and of its last component
/// too when the call follows it (`follow`). Returns `None` when it cannot (the process is
/// gone).
pub type Resolver<'a> = &'a dyn Fn(u32, i32, &str, bool) -> Option<PathBuf>;

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

#[cfg(test)]
mod tests {
    use std::{net::Ipv6Addr, path::PathBuf, sync::Arc};

    use agentd_common::{IPPROTO_TCP, IPPROTO_UDP};

    use super::{
        fixtures::{CLOCK, agent, dec, decode, no_resolve, raw, set, set_dir},
        *,
    };

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
    fn unknown_cgroup_and_unknown_kind() {
        let r = raw(EventKind::Fork);
        let e = decode(&r, None, CLOCK, &no_resolve).unwrap();
        assert_eq!(e.agent, "cgroup:4242");
        let mut r = raw(EventKind::Fork);
        r.kind = 999;
        assert!(decode(&r, None, CLOCK, &no_resolve).is_none());
    }
}
