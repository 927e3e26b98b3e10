//! agentd's resolver: the only DNS server an agent whose profile names domains can reach.
//!
//! The cgroup programs steer every DNS query of such an agent (UDP and TCP to port 53 on
//! any address) to the agent's own sockets here, on one port of 127.0.0.1 and ::1 (see
//! agentd-ebpf `net::steer_dns`): the socket a query arrives on says which agent asked,
//! so one process (the supervisor of `agentd run`, or the daemon for all its agents)
//! serves every agent without mixing them up.
//!
//! For a name a `network.connect` rule allows, the query goes to the upstream resolver;
//! before the answer goes back, each address of it (A and AAAA along the CNAME chain of
//! the name asked) is admitted into the agent's kernel allow-map with the rule's port and
//! protocol, for the answer's TTL clamped to [`agentd_dns::TTL_MIN`]..[`agentd_dns::TTL_MAX`].
//! Any other name gets NXDOMAIN (the program fails fast, without trying another server)
//! and a `dns` event with verdict `deny`, a breaker violation of kind `dns`.
//!
//! Bounds, per agent: [`RATE`] queries per second ([`BURST`] at once), [`IN_FLIGHT`]
//! queries waiting for the upstream, and [`crate::bpf::admit::MAX_PER_AGENT`] admitted
//! addresses. Beyond them a query is refused (REFUSED, SERVFAIL when full) and counted;
//! other agents have their own sockets and budgets.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agentd_dns::{Answer, Query, Rcode};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
    task::JoinHandle,
};

use crate::{
    bpf::admit::{Admissions, AdmitError, Grant},
    event::{Event, Kind, Layer, Verdict},
    profile::NameRule,
};

/// Queries per second an agent may send (refill rate of its budget).
pub const RATE: u32 = 50;
/// Queries an agent may send at once (its budget when full).
pub const BURST: u32 = 100;
/// Queries of one agent waiting for the upstream at once.
pub const IN_FLIGHT: usize = 32;
/// How long the upstream has to answer one try (there are two over UDP).
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP client may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The default upstream's resolver configuration.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Where allowed names are resolved: `--dns-upstream`, else the first `nameserver` of
/// /etc/resolv.conf (port 53).
pub fn upstream(flag: Option<SocketAddr>) -> Result<SocketAddr, String> {
    if let Some(a) = flag {
        return Ok(a);
    }
    let text = std::fs::read_to_string(RESOLV_CONF).map_err(|e| {
        format!("no DNS upstream: cannot read {RESOLV_CONF} ({e}); give --dns-upstream ADDR:PORT")
    })?;
    first_nameserver(&text).ok_or_else(|| {
        format!("no DNS upstream: {RESOLV_CONF} names no nameserver; give --dns-upstream ADDR:PORT")
    })
}

/// The first `nameserver` line of a resolv.conf text, on port 53 (a scoped IPv6 address
/// `fe80::1%eth0` is skipped: its scope cannot be carried here).
fn first_nameserver(text: &str) -> Option<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .find_map(|a| a.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
}

/// One agent's resolver: the tasks serving its sockets. Dropping it stops them.
#[derive(Debug)]
pub struct Resolver {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Resolver {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The sockets of one agent's resolver, bound before the agent starts (its port goes to
/// the kernel), served once a runtime runs ([`Bound::serve`]).
#[derive(Debug)]
pub struct Bound {
    port: u16,
    sockets: Vec<Listener>,
}

#[derive(Debug)]
enum Listener {
    Udp(std::net::UdpSocket),
    Tcp(std::net::TcpListener),
}

/// Who the resolver serves and how it reports.
pub struct Agent {
    pub id: String,
    pub cgroup_id: u64,
    pub rules: Vec<NameRule>,
    /// Where allowed names are resolved; why there is nowhere (their lookups then fail
    /// with SERVFAIL: nothing else is asked).
    pub upstream: Result<SocketAddr, String>,
    pub admissions: Admissions,
    /// Monitor mode: names no rule allows are reported, and resolved all the same.
    pub monitor: bool,
    /// Where `dns` events go (the breaker sees them there).
    pub emit: Box<dyn Fn(Event) + Send + Sync>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("id", &self.id)
            .field("cgroup_id", &self.cgroup_id)
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl Bound {
    /// Binds UDP and TCP on one free port of 127.0.0.1, and of ::1 when the host has it
    /// (without it, the agent's IPv6 queries find nothing listening: they fail).
    pub fn new() -> std::io::Result<Bound> {
        let mut last = None;
        for _ in 0..32 {
            match Self::try_bind() {
                Ok(b) => return Ok(b),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no free port for the resolver")))
    }

    fn try_bind() -> std::io::Result<Bound> {
        let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let udp = std::net::UdpSocket::bind(SocketAddr::new(v4, 0))?;
        let port = udp.local_addr()?.port();
        let mut sockets = vec![
            Listener::Udp(udp),
            Listener::Tcp(std::net::TcpListener::bind(SocketAddr::new(v4, port))?),
        ];
        let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port);
        match std::net::UdpSocket::bind(v6) {
            Ok(u) => {
                sockets.push(Listener::Udp(u));
                sockets.push(Listener::Tcp(std::net::TcpListener::bind(v6)?));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                tracing::debug!("no ::1 here: the agent's IPv6 DNS queries will fail");
            }
            Err(e) => return Err(e),
        }
        for s in &sockets {
            match s {
                Listener::Udp(u) => u.set_nonblocking(true)?,
                Listener::Tcp(t) => t.set_nonblocking(true)?,
            }
        }
        Ok(Bound { port, sockets })
    }

    /// The port the kernel steers the agent's DNS to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves `agent` on the current tokio runtime until the returned resolver drops.
    pub fn serve(self, agent: Agent) -> std::io::Result<Resolver> {
        let state = Arc::new(State {
            agent,
            budget: Mutex::new(Budget::new()),
            in_flight: Semaphore::new(IN_FLIGHT),
        });
        let mut tasks = Vec::new();
        for s in self.sockets {
            match s {
                Listener::Udp(u) => {
                    let u = Arc::new(UdpSocket::from_std(u)?);
                    tasks.push(tokio::spawn(serve_udp(u, Arc::clone(&state))));
                }
                Listener::Tcp(t) => {
                    let t = TcpListener::from_std(t)?;
                    tasks.push(tokio::spawn(serve_tcp(t, Arc::clone(&state))));
                }
            }
        }
        tasks.push(tokio::spawn(report_refusals(Arc::clone(&state))));
        Ok(Resolver { tasks })
    }
}

struct State {
    agent: Agent,
    budget: Mutex<Budget>,
    in_flight: Semaphore,
}

/// The agent's query budget (a token bucket), and the refusals not yet reported.
#[derive(Debug)]
struct Budget {
    tokens: f64,
    at: Instant,
    /// Refused since the last report.
    refused: u64,
}

impl Budget {
    fn new() -> Budget {
        Budget {
            tokens: f64::from(BURST),
            at: Instant::now(),
            refused: 0,
        }
    }

    /// Takes one query from the budget. `Err(first)`: refused; `first` when it is the
    /// first refusal since the last report (reported at once, the rest each second).
    fn take(&mut self, now: Instant) -> Result<(), bool> {
        let refill = now.duration_since(self.at).as_secs_f64() * f64::from(RATE);
        self.tokens = (self.tokens + refill).min(f64::from(BURST));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        self.refused = self.refused.saturating_add(1);
        Err(self.refused == 1)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn serve_udp(socket: Arc<UdpSocket>, state: Arc<State>) {
    let mut buf = vec![0u8; agentd_dns::MAX_MESSAGE];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("resolver: receive: {e}");
                continue;
            }
        };
        let Some(message) = buf.get(..n).map(<[u8]>::to_vec) else {
            continue;
        };
        let socket = Arc::clone(&socket);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            if let Some(reply) = answer(&state, &message, Transport::Udp).await {
                let _ = socket.send_to(&reply, peer).await;
            }
        });
    }
}

async fn serve_tcp(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(serve_tcp_client(stream, Arc::clone(&state)));
    }
}

/// Queries of one TCP client, each with its two-byte length, answered in order.
async fn serve_tcp_client(mut stream: TcpStream, state: Arc<State>) {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut message).await.is_err() {
            return;
        }
        let Some(reply) = answer(&state, &message, Transport::Tcp).await else {
            continue;
        };
        let Ok(n) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = n.to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

/// Reports each second the refusals of the budget not reported yet.
async fn report_refusals(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let refused = std::mem::take(&mut lock(&state.budget).refused);
        // The first one was reported when it happened.
        if refused > 1 {
            let ev = rate_refusal(dns_event(&state.agent, None, Verdict::Deny), refused - 1);
            (state.agent.emit)(ev);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

fn dns_event(agent: &Agent, query: Option<&Query>, verdict: Verdict) -> Event {
    let mut ev = Event::new(&agent.id, 0, "", Kind::Dns, verdict, Layer::Resolver);
    if let Some(q) = query {
        ev.domain = Some(q.name.clone());
        ev = ev.with("type", q.type_name.clone());
    }
    ev
}

/// `ev` as the record of `count` queries refused for the rate (`detail.limit: "rate"`).
fn rate_refusal(ev: Event, count: u64) -> Event {
    ev.with("rcode", "REFUSED")
        .with("limit", "rate")
        .with("reason", format!("more than {RATE} queries per second"))
        .with("count", count)
}

/// The reply to one query (None: no reply, the message was not a query at all).
async fn answer(state: &State, message: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let agent = &state.agent;
    let query = match agentd_dns::parse_query(message) {
        Ok(q) => q,
        Err(rejected) => {
            (agent.emit)(
                dns_event(agent, None, Verdict::Deny).with("reason", rejected.reason.clone()),
            );
            return rejected.reply;
        }
    };
    let refused = lock(&state.budget).take(Instant::now());
    if let Err(first) = refused {
        if first {
            (agent.emit)(rate_refusal(
                dns_event(agent, Some(&query), Verdict::Deny),
                1,
            ));
        }
        return Some(agentd_dns::reply(&query, Rcode::Refused));
    }
    let rules: Vec<&NameRule> = agent
        .rules
        .iter()
        .filter(|r| r.pattern.matches(&query.name))
        .collect();
    if rules.is_empty() {
        let ev = dns_event(agent, Some(&query), Verdict::Deny)
            .with("reason", "no network.connect rule names it");
        if !agent.monitor {
            (agent.emit)(ev.with("rcode", "NXDOMAIN"));
            return Some(agentd_dns::reply(&query, Rcode::NxDomain));
        }
        // Monitor mode: reported, and answered (its connects are not refused either).
        (agent.emit)(ev.with("monitor", true));
    }
    let Ok(_slot) = state.in_flight.try_acquire() else {
        (agent.emit)(
            dns_event(agent, Some(&query), Verdict::Deny)
                .with("rcode", "REFUSED")
                .with("limit", "in_flight")
                .with(
                    "reason",
                    format!("{IN_FLIGHT} queries already wait for the upstream"),
                ),
        );
        return Some(agentd_dns::reply(&query, Rcode::Refused));
    };
    let servfail = |why: String| {
        (agent.emit)(
            dns_event(agent, Some(&query), Verdict::Allow)
                .with("rcode", "SERVFAIL")
                .with("error", why),
        );
        Some(agentd_dns::reply(&query, Rcode::ServFail))
    };
    let upstream = match &agent.upstream {
        Ok(u) => *u,
        Err(why) => return servfail(why.clone()),
    };
    let response = match ask_upstream(upstream, &query).await {
        Ok(r) => r,
        Err(e) => return servfail(format!("upstream {upstream}: {e}")),
    };
    let answer = match agentd_dns::read_answer(&query, &response) {
        Ok(a) => a,
        Err(e) => return servfail(format!("upstream {upstream}: {e}")),
    };
    // Admitted before the agent has the answer: its connect finds them.
    if let Err(e) = admit(agent, &query, &answer, &rules) {
        let ev = dns_event(agent, Some(&query), Verdict::Deny).with("rcode", "SERVFAIL");
        (agent.emit)(match e {
            AdmitError::Full => ev.with("reason", e.to_string()),
            AdmitError::Map(_) => ev.with("error", e.to_string()),
        });
        return Some(agentd_dns::reply(&query, Rcode::ServFail));
    }
    let mut ev = dns_event(agent, Some(&query), Verdict::Allow)
        .with("rcode", answer.rcode.clone())
        .with(
            "answers",
            answer
                .addrs
                .iter()
                .map(|(a, _)| a.to_string())
                .collect::<Vec<_>>(),
        );
    if let Some(ttl) = answer.addrs.iter().map(|(_, t)| *t).min() {
        ev = ev.with("ttl", ttl);
    }
    if answer.chain.len() > 1 {
        ev = ev.with("cnames", answer.chain.get(1..).unwrap_or_default().to_vec());
    }
    (agent.emit)(ev);
    Some(match transport {
        Transport::Udp => agentd_dns::fit_udp(&query, answer.message),
        Transport::Tcp => answer.message,
    })
}

fn admit(
    agent: &Agent,
    query: &Query,
    answer: &Answer,
    rules: &[&NameRule],
) -> Result<(), AdmitError> {
    for (addr, ttl) in &answer.addrs {
        for r in rules {
            agent.admissions.admit(
                &agent.id,
                agent.cgroup_id,
                &Grant {
                    addr: *addr,
                    port: r.port,
                    proto: r.proto.number(),
                    domain: &query.name,
                    ttl: Duration::from_secs(u64::from(*ttl)),
                },
            )?;
        }
    }
    Ok(())
}

/// The upstream's answer to `query`: over UDP (two tries), again over TCP when the answer
/// was truncated (whichever way the agent asked: upstreams without TCP exist).
async fn ask_upstream(upstream: SocketAddr, query: &Query) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    let mut buf = vec![0u8; agentd_dns::MAX_MESSAGE];
    let mut truncated = false;
    for _ in 0..2 {
        socket.send(&query.message).await?;
        let Ok(got) = tokio::time::timeout(UPSTREAM_TIMEOUT, socket.recv(&mut buf)).await else {
            continue;
        };
        let reply = buf.get(..got?).unwrap_or_default();
        // TC, in the header's third byte: the whole answer is to be had over TCP.
        if reply.get(2).is_none_or(|flags| flags & 0x02 == 0) {
            return Ok(reply.to_vec());
        }
        truncated = true;
        break;
    }
    if !truncated {
        return Err(std::io::Error::from(std::io::ErrorKind::TimedOut));
    }
    let ask = async {
        let mut stream = TcpStream::connect(upstream).await?;
        let len = u16::try_from(query.message.len()).map_err(std::io::Error::other)?;
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(&query.message);
        stream.write_all(&framed).await?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, ask)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_nameserver_is_the_upstream() {
        let conf = "# comment\nsearch example\nnameserver fe80::1%eth0\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n";
        assert_eq!(first_nameserver(conf), Some("10.0.0.2:53".parse().unwrap()));
        assert_eq!(first_nameserver("search x\n"), None);
        assert_eq!(
            first_nameserver("nameserver ::1\n"),
            Some("[::1]:53".parse().unwrap())
        );
    }

    #[test]
    fn the_budget_refuses_beyond_the_burst_and_refills() {
        let mut b = Budget::new();
        let t = Instant::now();
        for _ in 0..BURST {
            assert_eq!(b.take(t), Ok(()));
        }
        assert_eq!(b.take(t), Err(true));
        assert_eq!(b.take(t), Err(false));
        assert_eq!(b.refused, 2);
        // A second refills RATE queries.
        let later = t + Duration::from_secs(1);
        for _ in 0..RATE {
            assert_eq!(b.take(later), Ok(()));
        }
        assert!(b.take(later).is_err());
    }
}
