//! Types shared by agentd's BPF programs and its user space.
//!
//! Everything here crosses the kernel/user boundary as raw bytes (ring-buffer records, map
//! keys and values), so every type is `#[repr(C)]`, has no implicit padding (explicit `_pad`
//! fields instead), and has its size and field offsets asserted in the tests below. Change a
//! layout here and both sides change together; never define one of these twice.
#![no_std]

/// Longest path (with its NUL) carried in an event. Longer paths are truncated and flagged
/// with [`EVENT_FLAG_PATH_TRUNCATED`].
pub const PATH_LEN: usize = 256;
/// `TASK_COMM_LEN` in the kernel.
pub const COMM_LEN: usize = 16;

/// What an event reports. The numbering is ABI: append, never renumber.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Exec = 1,
    Fork = 2,
    Exit = 3,
    /// open/openat/openat2/creat with write, create or truncate intent.
    OpenWrite = 4,
    Unlink = 5,
    Rename = 6,
    Mkdir = 7,
    Rmdir = 8,
    Link = 9,
    Symlink = 10,
    Chmod = 11,
    Chown = 12,
    Truncate = 13,
    Setxattr = 14,
    Connect = 15,
    Sendmsg = 16,
    Bind = 17,
    SocketCreate = 18,
    /// Opening a canary path, in any mode.
    Canary = 19,
}

impl EventKind {
    /// Every kind, for exhaustive decoding and tests.
    pub const ALL: [EventKind; 19] = [
        EventKind::Exec,
        EventKind::Fork,
        EventKind::Exit,
        EventKind::OpenWrite,
        EventKind::Unlink,
        EventKind::Rename,
        EventKind::Mkdir,
        EventKind::Rmdir,
        EventKind::Link,
        EventKind::Symlink,
        EventKind::Chmod,
        EventKind::Chown,
        EventKind::Truncate,
        EventKind::Setxattr,
        EventKind::Connect,
        EventKind::Sendmsg,
        EventKind::Bind,
        EventKind::SocketCreate,
        EventKind::Canary,
    ];

    pub fn from_raw(raw: u16) -> Option<EventKind> {
        let mut i = 0;
        while i < Self::ALL.len() {
            if Self::ALL[i] as u16 == raw {
                return Some(Self::ALL[i]);
            }
            i += 1;
        }
        None
    }
}

/// Which mechanism decided.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// Observed by a tracepoint: the verdict is the syscall's own result.
    Observed = 0,
    Landlock = 1,
    Seccomp = 2,
    /// A cgroup BPF program of agentd.
    Bpf = 3,
    BpfLsm = 4,
}

/// The verdict recorded in an event.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow = 0,
    Deny = 1,
    /// Denied because the agent's kill flag is set (the breaker tripped).
    Killed = 2,
}

/// The event's path was longer than [`PATH_LEN`] and was cut.
pub const EVENT_FLAG_PATH_TRUNCATED: u16 = 1 << 0;
/// The agent is in monitor mode: a `Deny` verdict was recorded but not enforced.
pub const EVENT_FLAG_MONITOR: u16 = 1 << 1;

/// One ring-buffer record. Written by the BPF programs, decoded once in user space.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RawEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the event was made.
    pub ktime_ns: u64,
    /// cgroup id (v2 directory inode) of the agent the process belongs to.
    pub agent_cgroup: u64,
    /// Kind-specific: the syscall's return value for file ops, child pid for fork,
    /// exit code for exit, socket type/protocol for socket creation.
    pub ret: i64,
    /// Kind-specific extra: open flags, mode for chmod, uid/gid for chown, family/type for
    /// socket creation.
    pub aux: u64,
    /// Thread group id (the user-visible pid).
    pub pid: u32,
    pub tid: u32,
    /// [`EventKind`] as u16.
    pub kind: u16,
    /// `EVENT_FLAG_*` bits.
    pub flags: u16,
    /// [`Layer`] as u8.
    pub layer: u8,
    /// [`Verdict`] as u8.
    pub verdict: u8,
    /// IPPROTO_TCP / IPPROTO_UDP for network events, else 0.
    pub proto: u8,
    pub _pad0: u8,
    /// Network events: IPv6 address, IPv4 as IPv4-mapped (::ffff:a.b.c.d).
    pub addr: [u8; 16],
    /// Network events: port in host byte order.
    pub port: u16,
    /// Network events: AF_INET / AF_INET6 as the program saw it.
    pub family: u16,
    pub _pad1: u32,
    pub comm: [u8; COMM_LEN],
    /// NUL-terminated: the file, or the source of a rename/link/symlink.
    pub path: [u8; PATH_LEN],
    /// NUL-terminated: the destination of a rename/link/symlink, else empty.
    pub path2: [u8; PATH_LEN],
}

/// Per-agent state, value of the `AGENTS` map keyed by the agent's cgroup id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentState {
    /// Small id of the agent's policy in the network tries (see [`NetKey`]).
    pub policy_id: u32,
    /// `AGENT_FLAG_*` bits.
    pub flags: u32,
}

/// The breaker tripped: deny all network, SIGKILL any process of the agent on a syscall.
pub const AGENT_FLAG_KILLED: u32 = 1 << 0;
/// Monitor mode: record denials, do not enforce them.
pub const AGENT_FLAG_MONITOR: u32 = 1 << 1;

/// Data part of a network-allow LPM-trie key. The kernel matches the first `prefixlen`
/// bits of this struct in memory order, so the exact-match fields come first and the
/// address last: `prefixlen = NET_KEY_FIXED_BITS + cidr bits` (an IPv4 CIDR is stored
/// IPv4-mapped, so its cidr bits are `96 + n`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetKey {
    /// [`AgentState::policy_id`], big-endian so the trie compares it as a number.
    pub policy_id_be: u32,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    pub _pad: u8,
    /// Port in network byte order; 0 stands for "any port" (a second lookup).
    pub port_be: u16,
    /// IPv6 address; IPv4 as ::ffff:a.b.c.d.
    pub addr: [u8; 16],
}

/// Bits of [`NetKey`] before the address: always matched exactly.
pub const NET_KEY_FIXED_BITS: u32 = 64;

/// Key of the `BIND_ALLOW` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindKey {
    pub policy_id: u32,
    pub proto: u8,
    pub _pad: u8,
    /// Host byte order.
    pub port: u16,
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], made only of integers and byte arrays, with explicit
    // padding fields, so every bit pattern is a valid value and no byte is uninitialised.
    unsafe impl aya::Pod for super::RawEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AgentState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BindKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn raw_event_layout() {
        assert_eq!(offset_of!(RawEvent, ktime_ns), 0);
        assert_eq!(offset_of!(RawEvent, agent_cgroup), 8);
        assert_eq!(offset_of!(RawEvent, ret), 16);
        assert_eq!(offset_of!(RawEvent, aux), 24);
        assert_eq!(offset_of!(RawEvent, pid), 32);
        assert_eq!(offset_of!(RawEvent, tid), 36);
        assert_eq!(offset_of!(RawEvent, kind), 40);
        assert_eq!(offset_of!(RawEvent, flags), 42);
        assert_eq!(offset_of!(RawEvent, layer), 44);
        assert_eq!(offset_of!(RawEvent, verdict), 45);
        assert_eq!(offset_of!(RawEvent, proto), 46);
        assert_eq!(offset_of!(RawEvent, addr), 48);
        assert_eq!(offset_of!(RawEvent, port), 64);
        assert_eq!(offset_of!(RawEvent, family), 66);
        assert_eq!(offset_of!(RawEvent, comm), 72);
        assert_eq!(offset_of!(RawEvent, path), 88);
        assert_eq!(offset_of!(RawEvent, path2), 88 + PATH_LEN);
        assert_eq!(size_of::<RawEvent>(), 88 + 2 * PATH_LEN);
    }

    #[test]
    fn map_type_layouts() {
        assert_eq!(size_of::<AgentState>(), 8);
        assert_eq!(offset_of!(NetKey, proto), 4);
        assert_eq!(offset_of!(NetKey, port_be), 6);
        assert_eq!(offset_of!(NetKey, addr), 8);
        assert_eq!(size_of::<NetKey>(), 24);
        assert_eq!(NET_KEY_FIXED_BITS as usize, offset_of!(NetKey, addr) * 8);
        assert_eq!(size_of::<BindKey>(), 8);
    }

    #[test]
    fn event_kinds_round_trip() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::from_raw(k as u16), Some(k));
        }
        assert_eq!(EventKind::from_raw(0), None);
        assert_eq!(EventKind::from_raw(EventKind::ALL.len() as u16 + 1), None);
    }
}
