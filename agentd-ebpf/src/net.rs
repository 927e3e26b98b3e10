//! Network enforcement: cgroup programs attached to each agent's own cgroup v2 directory.
//! They run for the sockets of that cgroup's processes only, so the rest of the host pays
//! nothing. Return 1 to allow, 0 to refuse (the syscall fails with EPERM). Every decision
//! is an event.
//!
//! agentd leaves the network rights of Landlock unhandled, so these programs decide every
//! inet connect, datagram and bind. The `sys_enter_connect`/`sys_enter_bind` tracepoints
//! record the agent's sockaddr ([`NetCall`]); the cgroup programs mark the call as seen
//! (they report it themselves, allowed or not); `sys_exit_sockaddr` reports
//! - an inet call refused without being seen: a security module of the host (AppArmor,
//!   SELinux) refused it before the cgroup hook;
//! - every unix-socket connect and bind, pathname or abstract, with its result: no cgroup
//!   hook of the kernels agentd supports decides them (Landlock's scoping refuses abstract
//!   sockets outside the agent's domain, its filesystem rules the creation of pathname
//!   sockets outside writable paths).

use agentd_common::{
    AGENT_FLAG_INET, AGENT_FLAG_INET6, AGENT_FLAG_KILLED, AGENT_FLAG_MONITOR,
    AGENT_FLAG_NETLINK_ROUTE, AGENT_FLAG_TRIP_BIND, AGENT_FLAG_TRIP_CONNECT,
    AGENT_FLAG_TRIP_SOCKET, AgentState, BindKey, DNS_ALLOW_ONCE, DnsClient, DnsKey, DnsOrig,
    EVENT_FLAG_MONITOR, EVENT_FLAG_TRIPPED, EventKind, IPPROTO_TCP, IPPROTO_UDP, Layer,
    NET_KEY_FIXED_BITS, NET_LSM_MONITORED, NET_LSM_REFUSED, NetKey, RawEvent, UNIX_PATH_MAX,
    Verdict,
};
use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_socket_cookie,
        bpf_ktime_get_ns, bpf_probe_read_user, bpf_probe_read_user_buf, bpf_send_signal,
        bpf_skb_ancestor_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, tracepoint},
    maps::lpm_trie::Key,
    programs::{SkBuffContext, SockAddrContext, SockContext, TracePointContext},
};

use crate::maps::{Act, carry_out, trip_bits};
use crate::maps::{
    BIND_ALLOW, DNS_ALLOW, DNS_CLIENTS, DNS_ORIG, EVENTS, NET_ALLOW, NET_PENDING, SOCK_REFUSED,
    agent_by_ancestor, count_lost, current_agent, fill_header, fill_header_without_task, trip,
};

const AF_UNIX: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const AF_NETLINK: u32 = 16;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const NETLINK_ROUTE: u32 = 0;

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

const SIGKILL: u32 = 9;
const EPERM: i64 = 1;
const EACCES: i64 = 13;
/// Offsets in a `sys_enter_*`/`sys_exit_*` record (user space checks both formats):
/// `__syscall_nr`, then argument 0 of the entry or `ret` of the exit.
const NR_OFFSET: usize = 8;
const ARGS_OFFSET: usize = 16;
const RET_OFFSET: usize = 16;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    try_sock_addr(&ctx, EventKind::Connect, false)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    try_sock_addr(&ctx, EventKind::Connect, true)
}

/// UDP `sendto`/`sendmsg` with a destination address (a connected socket was decided at
/// connect).
#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    try_sock_addr(&ctx, EventKind::Sendmsg, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    try_sock_addr(&ctx, EventKind::Sendmsg, true)
}

/// The source of a datagram an agent receives: a reply of its resolver to a steered
/// query gets the address the query was sent to back (glibc, for one, drops replies from
/// another address). Never refuses.
#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_dns_source(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_dns_source(&ctx, true);
    ALLOW
}

#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    try_sock_addr(&ctx, EventKind::Bind, false)
}

#[cgroup_sock_addr(bind6)]
pub fn bind6(ctx: SockAddrContext) -> i32 {
    try_sock_addr(&ctx, EventKind::Bind, true)
}

/// Socket creation. Linux runs this hook from `inet_create`/`inet6_create` only: it
/// decides AF_INET and AF_INET6 sockets (no raw sockets, TCP and UDP only, the family only
/// when the policy has network rules); other families never reach it.
#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    try_sock_create(&ctx)
}

/// Inbound TCP connections. A socket that listens without bind() gets an ephemeral port
/// from the kernel (autobind), and no cgroup hook decides that: the bind programs never
/// run. So every connection request (SYN without ACK) addressed to a socket of the agent
/// is checked here against the bind allow-list, whatever bound its port; the others are
/// dropped (the peer sees a timeout) and reported. Replies to the agent's own connections
/// carry ACK and pass. Runs in the receive path, for the agent's sockets only.
#[cgroup_skb(ingress)]
pub fn inbound(ctx: SkBuffContext) -> i32 {
    try_inbound(&ctx)
}

/// Outbound packets of agents: those to the agent's own resolver on loopback record the
/// socket they came from (protocol, family, local port) as the agent's, for the resolver
/// to tell its agent's queries from another local process's. Never drops.
#[cgroup_skb(egress)]
pub fn outbound(ctx: SkBuffContext) -> i32 {
    note_dns_client(&ctx);
    1
}

#[inline(always)]
fn note_dns_client(ctx: &SkBuffContext) {
    let Ok(first) = ctx.load::<u8>(0) else {
        return;
    };
    let (v6, proto, l4) = match first >> 4 {
        4 => {
            let Ok(h) = ctx.load::<[u8; 20]>(0) else {
                return;
            };
            // 127.0.0.1, where the resolver listens.
            if h[16] != 127 || h[17] != 0 || h[18] != 0 || h[19] != 1 {
                return;
            }
            (false, h[9], usize::from(h[0] & 0x0f) * 4)
        }
        6 => {
            let Ok(h) = ctx.load::<[u8; 40]>(0) else {
                return;
            };
            // ::1.
            let mut i = 24;
            while i < 39 {
                if h[i] != 0 {
                    return;
                }
                i += 1;
            }
            if h[39] != 1 {
                return;
            }
            (true, h[6], 40)
        }
        _ => return,
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return;
    }
    let Ok(ports) = ctx.load::<[u8; 4]>(l4) else {
        return;
    };
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    let Some((cgroup, state)) = skb_agent(ctx) else {
        return;
    };
    // SAFETY: `state` points into the AGENTS map value for the program's run.
    if unsafe { (*state).dns_port } != dport || dport == 0 {
        return;
    }
    let client = DnsClient {
        cgroup_id: cgroup,
        // SAFETY: the helper has no preconditions.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
    };
    let _ = DNS_CLIENTS.insert(&agentd_common::dns_client_key(proto, v6, sport), &client, 0);
}

/// The agent whose cgroup (or a cgroup below it) owns the packet's socket.
#[inline(always)]
fn skb_agent(ctx: &SkBuffContext) -> Option<(u64, *mut AgentState)> {
    // SAFETY: `skb` is the program's context; the helper returns 0 when the socket's
    // cgroup is shallower than `level`.
    agent_by_ancestor(|level| unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, level) })
}

#[inline(always)]
fn try_inbound(ctx: &SkBuffContext) -> i32 {
    const PASS: i32 = 1;
    const DROP: i32 = 0;
    const TCP_SYN: u8 = 0x02;
    const TCP_ACK: u8 = 0x10;
    // The program sees the packet from its network header.
    let Ok(first) = ctx.load::<u8>(0) else {
        return PASS;
    };
    let mut addr = [0u8; 16];
    let (proto, l4) = match first >> 4 {
        4 => {
            let Ok(h) = ctx.load::<[u8; 20]>(0) else {
                return PASS;
            };
            addr[10] = 0xff;
            addr[11] = 0xff;
            addr[12] = h[12];
            addr[13] = h[13];
            addr[14] = h[14];
            addr[15] = h[15];
            (h[9], usize::from(h[0] & 0x0f) * 4)
        }
        6 => {
            let Ok(h) = ctx.load::<[u8; 40]>(0) else {
                return PASS;
            };
            let mut i = 0;
            while i < 16 {
                addr[i] = h[8 + i];
                i += 1;
            }
            (h[6], 40)
        }
        _ => return PASS,
    };
    if proto != IPPROTO_TCP {
        // IPv6 extension headers before TCP (reassembly has removed fragment headers by
        // now; hop-by-hop and destination options are rare on connection requests) are
        // not walked: such a packet is dropped below if it is TCP at all, which the kernel
        // only tells here by the socket, so it is let through only when not TCP.
        return PASS;
    }
    let Ok(tcp) = ctx.load::<[u8; 14]>(l4) else {
        return PASS;
    };
    let flags = tcp[13];
    if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
        return PASS;
    }
    let port = u16::from_be_bytes([tcp[2], tcp[3]]);
    let peer_port = u16::from_be_bytes([tcp[0], tcp[1]]);
    let Some((cgroup, state)) = skb_agent(ctx) else {
        // The socket is in the agent's cgroup subtree (that is why the program runs) but no
        // agent is registered for it any more: refuse.
        return DROP;
    };
    // SAFETY: `state` points into the AGENTS map value for the program's run.
    let state = unsafe { *state };
    let key = BindKey {
        policy_id: state.policy_id,
        proto: IPPROTO_TCP,
        _pad: 0,
        port,
    };
    let killed = state.flags & AGENT_FLAG_KILLED != 0;
    // SAFETY: the value is only tested for presence.
    if !killed && unsafe { BIND_ALLOW.get(&key) }.is_some() {
        return PASS;
    }
    let monitor = !killed && state.flags & AGENT_FLAG_MONITOR != 0;
    if let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) {
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` is the reserved ring-buffer record, writable and RawEvent-sized.
        unsafe {
            // Softirq context: the current task is whoever was interrupted.
            fill_header_without_task(ev, cgroup, EventKind::Inbound as u16, 0);
            if monitor {
                (*ev).flags = EVENT_FLAG_MONITOR;
            }
            (*ev).layer = Layer::Bpf as u8;
            (*ev).verdict = if killed {
                Verdict::Killed as u8
            } else {
                Verdict::Deny as u8
            };
            (*ev).proto = IPPROTO_TCP;
            (*ev).addr = addr;
            (*ev).port = port;
            (*ev).aux = u64::from(peer_port);
            (*ev).path[0] = 0;
            (*ev).path2[0] = 0;
        }
        entry.submit(0);
    } else {
        count_lost(cgroup);
    }
    if monitor { PASS } else { DROP }
}

/// The agent's verdict on an operation the policy allows or not: (return value, verdict,
/// event flags, agent cgroup). A refusal of a kind in the profile's `trip_on`
/// (`trip_bit`, an `AGENT_FLAG_TRIP_*`) trips the breaker here, in the call: the caller
/// dies at the call's exit (`gate`), before it returns to user space.
#[inline(always)]
fn decide(trip_bit: u32, allowed: impl FnOnce(u64, u32, u32) -> bool) -> (i32, Verdict, u16, u64) {
    let Some((cgroup, state)) = current_agent() else {
        // The program runs because the socket belongs to an agent's cgroup, but the
        // calling task is in no agent (a socket handed out of the sandbox): refuse.
        // SAFETY: the helper has no preconditions.
        let cgroup = unsafe { bpf_get_current_cgroup_id() };
        return (REFUSE, Verdict::Deny, 0, cgroup);
    };
    let state_ptr = state;
    // SAFETY: `state` points into the AGENTS map value for the program's run.
    let state = unsafe { *state };
    if state.flags & AGENT_FLAG_KILLED != 0 {
        return (REFUSE, Verdict::Killed, 0, cgroup);
    }
    if allowed(cgroup, state.policy_id, state.flags) {
        (ALLOW, Verdict::Allow, 0, cgroup)
    } else if state.flags & AGENT_FLAG_MONITOR != 0 {
        (ALLOW, Verdict::Deny, EVENT_FLAG_MONITOR, cgroup)
    } else if trip_bits(state.flags) & trip_bit != 0 {
        trip(state_ptr);
        (REFUSE, Verdict::Deny, EVENT_FLAG_TRIPPED, cgroup)
    } else {
        (REFUSE, Verdict::Deny, 0, cgroup)
    }
}

/// Whether the connect/sendmsg allow-list of `policy_id` has (proto, addr, port), or
/// (proto, addr, any port).
#[inline(always)]
fn net_allowed(policy_id: u32, proto: u8, port_be: u16, addr: [u8; 16]) -> bool {
    let mut key = Key::new(
        NET_KEY_FIXED_BITS + 128,
        NetKey {
            policy_id_be: policy_id.to_be(),
            proto,
            _pad: 0,
            port_be,
            addr,
        },
    );
    if NET_ALLOW.get(&key).is_some() {
        return true;
    }
    key.data.port_be = 0;
    NET_ALLOW.get(&key).is_some()
}

/// Whether the agent's resolver admitted (proto, addr, port), or (proto, addr, any
/// port), for an allowed name, or a person approved it, and the admission has not
/// expired. An approval for one connection ([`DNS_ALLOW_ONCE`]) is used up here.
#[inline(always)]
fn dns_admitted(cgroup: u64, proto: u8, port_be: u16, addr: [u8; 16]) -> bool {
    let mut key = DnsKey {
        cgroup_id: cgroup,
        addr,
        port_be,
        proto,
        _pad: [0; 5],
    };
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if admitted_by(&key, now) {
        return true;
    }
    key.port_be = 0;
    admitted_by(&key, now)
}

/// Whether the `DNS_ALLOW` entry `key` admits a connection at `now`. An entry for one
/// connection is deleted, and admits only if this program's delete is the one that
/// succeeded: of two connects racing on two CPUs, one gets it.
#[inline(always)]
fn admitted_by(key: &DnsKey, now: u64) -> bool {
    // SAFETY: the value is copied out at once.
    let Some(value) = (unsafe { DNS_ALLOW.get(key) }).copied() else {
        return false;
    };
    if now >= value & !DNS_ALLOW_ONCE {
        return false;
    }
    value & DNS_ALLOW_ONCE == 0 || DNS_ALLOW.remove(key).is_ok()
}

const DNS_PORT: u16 = 53;
/// 127.0.0.1 as `user_ip4` holds it (network byte order in memory).
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// Sends a DNS query of an agent whose profile names domains (its `dns_port` set) to the
/// agent's resolver on loopback, whatever address it was meant for: 127.0.0.1 for IPv4
/// and IPv4-mapped destinations, ::1 for IPv6 ones. Remembers the destination by socket
/// cookie for `recvmsg`. False when the agent has no resolver (or is being killed: then
/// the usual decision refuses).
#[inline(always)]
fn steer_dns(ctx: &SockAddrContext, v6: bool, addr: [u8; 16], port_be: u16) -> bool {
    let Some((_, state)) = current_agent() else {
        return false;
    };
    // SAFETY: `state` points into the AGENTS map value for the program's run.
    let state = unsafe { *state };
    if state.dns_port == 0 || state.flags & AGENT_FLAG_KILLED != 0 {
        return false;
    }
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the program's context; the helper reads the socket it names.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let orig = DnsOrig {
        addr,
        port_be,
        _pad: [0; 6],
    };
    let _ = DNS_ORIG.insert(&cookie, &orig, 0);
    let mapped = addr[10] == 0xff && addr[11] == 0xff && is_zero(&addr, 10);
    // SAFETY: writes of the destination fields of this program's own context, with the
    // 4-byte stores the verifier accepts for them.
    unsafe {
        if !v6 {
            core::ptr::write_volatile(&raw mut (*sa).user_ip4, LOOPBACK4);
        } else if mapped {
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], 0);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], 0);
            core::ptr::write_volatile(
                &raw mut (*sa).user_ip6[2],
                u32::from_ne_bytes([0, 0, 0xff, 0xff]),
            );
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], LOOPBACK4);
        } else {
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], 0);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], 0);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], 0);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], u32::from_ne_bytes([0, 0, 0, 1]));
        }
        core::ptr::write_volatile(&raw mut (*sa).user_port, u32::from(state.dns_port.to_be()));
    }
    true
}

/// Whether the first `n` bytes of `addr` are zero.
#[inline(always)]
fn is_zero(addr: &[u8; 16], n: usize) -> bool {
    let mut i = 0;
    while i < n && i < 16 {
        if addr[i] != 0 {
            return false;
        }
        i += 1;
    }
    true
}

#[inline(always)]
fn restore_dns_source(ctx: &SockAddrContext, v6: bool) {
    let Some((_, state)) = current_agent() else {
        return;
    };
    // SAFETY: `state` points into the AGENTS map value for the program's run.
    let dns_port = unsafe { (*state).dns_port };
    if dns_port == 0 {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: reads of this program's context fields, 4 bytes wide.
    let (port, from_resolver) = unsafe {
        let port = u16::from_be(core::ptr::read_volatile(&raw const (*sa).user_port) as u16);
        let from = if v6 {
            let w0 = core::ptr::read_volatile(&raw const (*sa).user_ip6[0]);
            let w1 = core::ptr::read_volatile(&raw const (*sa).user_ip6[1]);
            let w2 = core::ptr::read_volatile(&raw const (*sa).user_ip6[2]);
            let w3 = core::ptr::read_volatile(&raw const (*sa).user_ip6[3]);
            w0 == 0
                && w1 == 0
                && ((w2 == 0 && w3 == u32::from_ne_bytes([0, 0, 0, 1]))
                    || (w2 == u32::from_ne_bytes([0, 0, 0xff, 0xff]) && w3 == LOOPBACK4))
        } else {
            core::ptr::read_volatile(&raw const (*sa).user_ip4) == LOOPBACK4
        };
        (port, from)
    };
    if port != dns_port || !from_resolver {
        return;
    }
    // SAFETY: the helper reads the socket the context names.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    // SAFETY: the value is copied out at once.
    let Some(orig) = (unsafe { DNS_ORIG.get(&cookie) }).copied() else {
        return;
    };
    let a = orig.addr;
    // SAFETY: writes of this program's own context fields, 4 bytes wide.
    unsafe {
        if v6 {
            let mut i = 0;
            while i < 4 {
                let w = u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]);
                core::ptr::write_volatile(&raw mut (*sa).user_ip6[i], w);
                i += 1;
            }
        } else {
            core::ptr::write_volatile(
                &raw mut (*sa).user_ip4,
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            );
        }
        core::ptr::write_volatile(&raw mut (*sa).user_port, u32::from(orig.port_be));
    }
}

#[inline(always)]
fn try_sock_addr(ctx: &SockAddrContext, kind: EventKind, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    // Context fields are read with 4-byte loads, the only width the verifier accepts for
    // user_ip6.
    // SAFETY: `sa` is the program's context; the verifier checks each field access.
    let (addr, user_port, protocol, sock_type) = unsafe {
        let mut addr = [0u8; 16];
        if v6 {
            let mut i = 0;
            while i < 4 {
                let w = core::ptr::read_volatile(&raw const (*sa).user_ip6[i]);
                let b = w.to_ne_bytes();
                addr[4 * i] = b[0];
                addr[4 * i + 1] = b[1];
                addr[4 * i + 2] = b[2];
                addr[4 * i + 3] = b[3];
                i += 1;
            }
        } else {
            // IPv4 as ::ffff:a.b.c.d, the form the trie stores it in.
            let b = core::ptr::read_volatile(&raw const (*sa).user_ip4).to_ne_bytes();
            addr[10] = 0xff;
            addr[11] = 0xff;
            addr[12] = b[0];
            addr[13] = b[1];
            addr[14] = b[2];
            addr[15] = b[3];
        }
        (
            addr,
            core::ptr::read_volatile(&raw const (*sa).user_port),
            core::ptr::read_volatile(&raw const (*sa).protocol),
            core::ptr::read_volatile(&raw const (*sa).type_),
        )
    };
    // user_port holds the port in network byte order in its first two bytes.
    let port_be = user_port as u16;
    let port = u16::from_be(port_be);
    let proto = if protocol < 256 { protocol as u8 } else { 0 };
    if matches!(kind, EventKind::Connect | EventKind::Bind) {
        mark_seen(kind);
    }
    if port == DNS_PORT
        && matches!(kind, EventKind::Connect | EventKind::Sendmsg)
        && (proto == IPPROTO_UDP || proto == IPPROTO_TCP)
        && steer_dns(ctx, v6, addr, port_be)
    {
        // The agent's resolver reports the query itself.
        return ALLOW;
    }
    let trip_bit = match kind {
        EventKind::Bind => AGENT_FLAG_TRIP_BIND,
        _ => AGENT_FLAG_TRIP_CONNECT,
    };
    let (ret, verdict, flags, cgroup) = decide(trip_bit, |cgroup, policy_id, _| match kind {
        // Port 0 picks an ephemeral port: what UDP clients do before sending (and cannot
        // receive unsolicited traffic on a port nobody knows). A TCP socket could listen
        // on it, so TCP port 0 needs a rule like any other port.
        EventKind::Bind if port == 0 && proto == IPPROTO_UDP => true,
        EventKind::Bind => {
            let key = BindKey {
                policy_id,
                proto,
                _pad: 0,
                port,
            };
            // SAFETY: the value is only tested for presence.
            unsafe { BIND_ALLOW.get(&key) }.is_some()
        }
        _ => {
            net_allowed(policy_id, proto, port_be, addr)
                || dns_admitted(cgroup, proto, port_be, addr)
        }
    });
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        count_lost(cgroup);
        return ret;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved ring-buffer record, writable and RawEvent-sized.
    unsafe {
        fill_header(ev, cgroup, kind as u16, flags);
        (*ev).layer = Layer::Bpf as u8;
        (*ev).verdict = verdict as u8;
        (*ev).proto = proto;
        (*ev).addr = addr;
        (*ev).port = port;
        (*ev).family = if v6 { AF_INET6 as u16 } else { AF_INET as u16 };
        (*ev).aux = u64::from(sock_type);
        (*ev).path[0] = 0;
        (*ev).path2[0] = 0;
    }
    entry.submit(0);
    ret
}

#[inline(always)]
fn try_sock_create(ctx: &SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: `sk` is the program's context; the verifier checks each field access.
    let (family, sock_type, protocol) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*sk).family),
            core::ptr::read_volatile(&raw const (*sk).type_),
            core::ptr::read_volatile(&raw const (*sk).protocol),
        )
    };
    let (ret, verdict, flags, cgroup) = decide(AGENT_FLAG_TRIP_SOCKET, |_, _, agent_flags| {
        let inet_ok = (sock_type == SOCK_STREAM
            && (protocol == 0 || protocol == u32::from(IPPROTO_TCP)))
            || (sock_type == SOCK_DGRAM && (protocol == 0 || protocol == u32::from(IPPROTO_UDP)));
        match family {
            AF_UNIX => true,
            AF_INET => agent_flags & AGENT_FLAG_INET != 0 && inet_ok,
            AF_INET6 => agent_flags & AGENT_FLAG_INET6 != 0 && inet_ok,
            AF_NETLINK => agent_flags & AGENT_FLAG_NETLINK_ROUTE != 0 && protocol == NETLINK_ROUTE,
            _ => false,
        }
    });
    if ret == REFUSE && matches!(verdict, Verdict::Deny) {
        // Reported here: the exit of socket() must not report the refusal again.
        let tid = bpf_get_current_pid_tgid() as u32;
        let _ = SOCK_REFUSED.insert(&tid, &1, 0);
    }
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        count_lost(cgroup);
        return ret;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved ring-buffer record, writable and RawEvent-sized.
    unsafe {
        fill_header(ev, cgroup, EventKind::SocketCreate as u16, flags);
        (*ev).layer = Layer::Bpf as u8;
        (*ev).verdict = verdict as u8;
        (*ev).proto = if protocol < 256 { protocol as u8 } else { 0 };
        (*ev).family = family as u16;
        (*ev).aux = u64::from(sock_type);
        (*ev).ret = i64::from(protocol);
        (*ev).path[0] = 0;
        (*ev).path2[0] = 0;
    }
    entry.submit(0);
    ret
}

/// A connect() or bind() of an agent between its entry and exit tracepoints. Kept in
/// `NET_PENDING` by thread id; local to the programs (user space never reads it).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NetCall {
    /// AF_UNIX: `sun_path` as the call gave it (`path_len` bytes; abstract names start
    /// with a NUL).
    pub path: [u8; UNIX_PATH_MAX],
    pub path_len: u32,
    /// The address as the call gave it: IPv6, IPv4 as ::ffff:a.b.c.d.
    pub addr: [u8; 16],
    /// `__syscall_nr` of the entry: the exit of another call never completes it.
    pub nr: i32,
    /// Host byte order.
    pub port: u16,
    /// `sa_family` as the call gave it (0 when unreadable).
    pub family: u16,
    /// [`EventKind::Connect`] or [`EventKind::Bind`] as u16.
    pub kind: u16,
    /// Set by the cgroup program that decided this call (and reported it).
    pub seen: u8,
    /// `NET_LSM_*`: a BPF LSM program refused the unix-socket connect (or would have, in
    /// monitor mode); 0 otherwise.
    pub lsm: u8,
}

/// connect(fd, uservaddr, addrlen); attached to `syscalls/sys_enter_connect`.
#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    try_enter_sockaddr(&ctx, EventKind::Connect);
    0
}

/// bind(fd, umyaddr, addrlen); attached to `syscalls/sys_enter_bind`.
#[tracepoint]
pub fn sys_enter_bind(ctx: TracePointContext) -> u32 {
    try_enter_sockaddr(&ctx, EventKind::Bind);
    0
}

/// The exit of connect() and bind(); attached to `sys_exit_connect` and `sys_exit_bind`.
#[tracepoint]
pub fn sys_exit_sockaddr(ctx: TracePointContext) -> u32 {
    try_exit_sockaddr(&ctx);
    0
}

/// Marks the calling thread's connect()/bind() in flight (if any) as decided by a cgroup
/// program, which reports it: its exit must not report it again.
#[inline(always)]
fn mark_seen(kind: EventKind) {
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(call) = NET_PENDING.get_ptr_mut(&tid) {
        // SAFETY: `call` points into the NET_PENDING map value; only this thread reads or
        // writes its own entry.
        unsafe {
            if (*call).kind == kind as u16 {
                (*call).seen = 1;
            }
        }
    }
}

#[inline(always)]
fn try_enter_sockaddr(ctx: &TracePointContext, kind: EventKind) {
    let Some((_, state)) = current_agent() else {
        return;
    };
    // SAFETY: `state` points into the AGENTS map value for the program's run.
    if unsafe { (*state).flags } & AGENT_FLAG_KILLED != 0 {
        // The breaker tripped: this process dies on its way back to user space.
        // SAFETY: the helper has no memory preconditions.
        unsafe { bpf_send_signal(SIGKILL) };
        return;
    }
    // SAFETY: reads of the tracepoint record through bpf_probe_read_kernel, at offsets
    // user space checked against the format (`__syscall_nr`, arguments 1 and 2).
    let (nr, uaddr, addrlen) = unsafe {
        (
            ctx.read_at::<i32>(NR_OFFSET).unwrap_or(-1),
            ctx.read_at::<u64>(ARGS_OFFSET + 8).unwrap_or(0),
            ctx.read_at::<u64>(ARGS_OFFSET + 16).unwrap_or(0) as u32 as i32,
        )
    };
    let mut call = NetCall {
        path: [0; UNIX_PATH_MAX],
        path_len: 0,
        addr: [0; 16],
        nr,
        port: 0,
        family: 0,
        kind: kind as u16,
        seen: 0,
        lsm: 0,
    };
    // sockaddr_in: family, port (big-endian), address; sockaddr_in6: family, port,
    // flowinfo, address. Read only as much as the call passed (the kernel copies
    // `addrlen` bytes); a fault leaves the family 0 and the exit reports nothing.
    if uaddr != 0 && addrlen >= 2 {
        // SAFETY: a user-memory read that faults safely.
        call.family = unsafe { bpf_probe_read_user(uaddr as *const u16) }.unwrap_or(0);
    }
    if u32::from(call.family) == AF_INET && addrlen >= 8 {
        // SAFETY: as above; 8 bytes the call passed.
        if let Ok(b) = unsafe { bpf_probe_read_user(uaddr as *const [u8; 8]) } {
            call.port = u16::from_be_bytes([b[2], b[3]]);
            call.addr[10] = 0xff;
            call.addr[11] = 0xff;
            call.addr[12] = b[4];
            call.addr[13] = b[5];
            call.addr[14] = b[6];
            call.addr[15] = b[7];
        }
    } else if u32::from(call.family) == AF_INET6 && addrlen >= 24 {
        // SAFETY: as above; 24 bytes the call passed (SIN6_LEN_RFC2133).
        if let Ok(b) = unsafe { bpf_probe_read_user(uaddr as *const [u8; 24]) } {
            call.port = u16::from_be_bytes([b[2], b[3]]);
            let mut i = 0;
            while i < 16 {
                call.addr[i] = b[8 + i];
                i += 1;
            }
        }
    } else if u32::from(call.family) == AF_UNIX && addrlen > 2 {
        let len = (addrlen as usize - 2).min(UNIX_PATH_MAX);
        // SAFETY: as above; `len` bytes of `sun_path` the call passed.
        if unsafe { bpf_probe_read_user_buf((uaddr + 2) as *const u8, &mut call.path[..len]) }
            .is_ok()
        {
            call.path_len = len as u32;
        }
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    // Recorded whatever the family: a stale entry of an earlier call is replaced.
    let _ = NET_PENDING.insert(&tid, &call, 0);
}

#[inline(always)]
fn try_exit_sockaddr(ctx: &TracePointContext) {
    let Some((cgroup, state)) = current_agent() else {
        return;
    };
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: the value is copied out before the entry is removed.
    let Some(call) = (unsafe { NET_PENDING.get(&tid) }).copied() else {
        return;
    };
    let _ = NET_PENDING.remove(&tid);
    // SAFETY: `ctx` points to the tracepoint record; `__syscall_nr` and `ret` are fixed
    // fields of every sys_exit record at these offsets (user space checked the formats),
    // and the verifier checks the (constant, aligned) context reads.
    let (nr, ret) = unsafe {
        let record = ctx.as_ptr().cast::<u8>();
        (
            core::ptr::read_volatile(record.add(NR_OFFSET).cast::<i32>()),
            core::ptr::read_volatile(record.add(RET_OFFSET).cast::<i64>()),
        )
    };
    if call.nr != nr {
        return;
    }
    let family = u32::from(call.family);
    let report = match family {
        // A refusal no cgroup program saw (theirs is EPERM, reported by them).
        AF_INET | AF_INET6 => call.seen == 0 && (ret == -EACCES || ret == -EPERM),
        AF_UNIX => call.path_len > 0,
        _ => false,
    };
    if !report {
        return;
    }
    // SAFETY: `state` points into the AGENTS map value for the program's run.
    let flags = unsafe { (*state).flags };
    if flags & AGENT_FLAG_KILLED != 0 {
        // Being killed: its refusals are not counted again.
        return;
    }
    // A unix-socket connect refused by agentd's BPF LSM program trips a breaker that
    // trips on `connect`; one refused with what Landlock's scoping or the socket file's
    // permissions answer is held for user space to attribute.
    let act = if trip_bits(flags) & AGENT_FLAG_TRIP_CONNECT == 0
        || family != AF_UNIX
        || kind_of(call.kind) != Some(EventKind::Connect)
        || call.lsm == NET_LSM_MONITORED
    {
        Act::Nothing
    } else if call.lsm == NET_LSM_REFUSED {
        Act::Trip
    } else if ret == -EPERM || ret == -EACCES {
        Act::Hold
    } else {
        Act::Nothing
    };
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        count_lost(cgroup);
        carry_out(act, state, false);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved ring-buffer record, writable and RawEvent-sized.
    unsafe {
        let monitor = call.lsm == NET_LSM_MONITORED;
        fill_header(
            ev,
            cgroup,
            call.kind,
            if monitor { EVENT_FLAG_MONITOR } else { 0 } | act.flag(),
        );
        if call.lsm == 0 {
            // The verdict is the call's result; user space attributes a refusal.
            (*ev).layer = Layer::Observed as u8;
        } else {
            (*ev).layer = Layer::BpfLsm as u8;
            (*ev).verdict = Verdict::Deny as u8;
        }
        (*ev).ret = ret;
        (*ev).addr = call.addr;
        (*ev).port = call.port;
        (*ev).family = call.family;
        (*ev).aux = u64::from(call.path_len);
        let mut i = 0;
        while i < UNIX_PATH_MAX {
            (*ev).path[i] = call.path[i];
            i += 1;
        }
        (*ev).path[UNIX_PATH_MAX] = 0;
        (*ev).path2[0] = 0;
    }
    entry.submit(0);
    carry_out(act, state, true);
}

/// `NetCall::kind` as an [`EventKind`] (connect or bind).
#[inline(always)]
fn kind_of(raw: u16) -> Option<EventKind> {
    if raw == EventKind::Connect as u16 {
        Some(EventKind::Connect)
    } else if raw == EventKind::Bind as u16 {
        Some(EventKind::Bind)
    } else {
        None
    }
}
