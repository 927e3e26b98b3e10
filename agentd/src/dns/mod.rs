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

use agentd_common::{IPPROTO_TCP, IPPROTO_UDP};
use agentd_dns::{Query, Rcode};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{Semaphore, watch},
    task::JoinHandle,
};

use crate::{
    bpf::admit::{Admissions, AdmitError, DnsClients, Grant},
    event::{Event, Kind, Layer, Verdict},
    profile::NameRule,
};

/// Queries per second an agent may send (refill rate of its budget).
pub const RATE: u32 = 200;
/// Queries an agent may send at once (its budget when full).
pub const BURST: u32 = 400;
/// Queries of one agent waiting for the upstream at once.
pub const IN_FLIGHT: usize = 32;
/// TCP clients of one agent served at once.
pub const TCP_CLIENTS: usize = 16;
/// How recently a socket must have sent to the resolver to be found the agent's.
const CLIENT_RECENT: Duration = Duration::from_secs(2);
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

/// One agent's resolver: the tasks serving its sockets. Dropping it stops them, and the
/// queries and clients they were serving.
#[derive(Debug)]
pub struct Resolver {
    tasks: Vec<JoinHandle<()>>,
    _stop: watch::Sender<()>,
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

/// Addresses the resolver answered for names only an ask rule names, with the name and
/// until when (the answer's TTL): a connect to one is held and shows the name. Bounded
/// ([`ASKED_MAX`]); expired entries go first.
#[derive(Debug, Clone, Default)]
pub struct AskedNames(Arc<Mutex<std::collections::HashMap<IpAddr, (String, Instant)>>>);

/// Most addresses [`AskedNames`] keeps for one agent.
pub const ASKED_MAX: usize = 4096;

impl AskedNames {
    pub fn note(&self, addr: IpAddr, name: &str, ttl: Duration) {
        let mut m = lock(&self.0);
        let now = Instant::now();
        if m.len() >= ASKED_MAX {
            m.retain(|_, (_, until)| *until > now);
        }
        if m.len() < ASKED_MAX || m.contains_key(&addr) {
            m.insert(addr, (name.to_owned(), now + ttl));
        }
    }

    /// The name `addr` was answered for, while its TTL lasts.
    pub fn domain(&self, addr: IpAddr) -> Option<String> {
        lock(&self.0)
            .get(&addr)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(name, _)| name.clone())
    }
}

/// Who the resolver serves and how it reports.
pub struct Agent {
    pub id: String,
    pub cgroup_id: u64,
    pub rules: Vec<NameRule>,
    /// `network.ask` rules by name: such a name is resolved and answered, its addresses
    /// are not admitted but noted in `asked`, and a connect to one is held for a person.
    pub ask: Vec<NameRule>,
    pub asked: AskedNames,
    /// Where allowed names are resolved; why there is nowhere (their lookups then fail
    /// with SERVFAIL: nothing else is asked).
    pub upstream: Result<SocketAddr, String>,
    pub admissions: Admissions,
    /// Which agent's sockets sent to resolvers (the kernel's record).
    pub clients: DnsClients,
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
            match Self::try_bind(0) {
                Ok(b) => return Ok(b),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no free port for the resolver")))
    }

    /// Binds `port` again: the port a previous daemon's resolver of the same agent had,
    /// which the kernel still steers the agent's DNS to.
    pub fn on(port: u16) -> std::io::Result<Bound> {
        Self::try_bind(port)
    }

    /// Binds `port`, or a free one when 0.
    fn try_bind(port: u16) -> std::io::Result<Bound> {
        let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let udp = std::net::UdpSocket::bind(SocketAddr::new(v4, port))?;
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
        let (stop, stopped) = watch::channel(());
        let state = Arc::new(State {
            agent,
            budget: Mutex::new(Budget::new()),
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
            tcp_clients: Arc::new(Semaphore::new(TCP_CLIENTS)),
            stopped,
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
        Ok(Resolver { tasks, _stop: stop })
    }
}

struct State {
    agent: Agent,
    budget: Mutex<Budget>,
    /// Queries waiting for the upstream ([`IN_FLIGHT`]).
    in_flight: Arc<Semaphore>,
    /// TCP clients served at once ([`TCP_CLIENTS`]).
    tcp_clients: Arc<Semaphore>,
    /// Closed when the resolver is dropped: the tasks serving queries and clients end.
    stopped: watch::Receiver<()>,
}

impl State {
    /// Runs `work` until it ends or the resolver is dropped (then nothing more is admitted
    /// or answered for an agent that is gone).
    fn spawn(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut stopped = self.stopped.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = work => {}
                _ = stopped.changed() => {}
            }
        });
    }

    /// Whether the query from `peer` over `proto` came from a socket of this agent's (the
    /// `outbound` program recorded it): any local process can send to the resolver's
    /// port, and only the agent's queries may admit, count or trip for it.
    fn is_agents(&self, proto: u8, peer: SocketAddr) -> bool {
        let agent = &self.agent;
        agent.clients.is_agents(
            agent.cgroup_id,
            proto,
            peer.is_ipv6(),
            peer.port(),
            CLIENT_RECENT,
        )
    }
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
        if !state.is_agents(IPPROTO_UDP, peer) {
            tracing::debug!(agent = %state.agent.id, %peer, "resolver: a datagram not from the agent, dropped");
            continue;
        }
        let Some(message) = buf.get(..n) else {
            continue;
        };
        // Screened here, in order, before anything is spawned: a flood costs a parse and
        // a refusal each, and at most IN_FLIGHT queries wait for the upstream.
        match screen(&state, message) {
            Screened::Reply(reply) => {
                let _ = socket.send_to(&reply, peer).await;
            }
            Screened::Drop => {}
            Screened::Forward(asked) => {
                let socket = Arc::clone(&socket);
                let task = Arc::clone(&state);
                state.spawn(async move {
                    let reply = resolve(&task, asked, Transport::Udp).await;
                    let _ = socket.send_to(&reply, peer).await;
                });
            }
        }
    }
}

async fn serve_tcp(listener: TcpListener, state: Arc<State>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, most likely: do not spin.
                tracing::debug!("resolver: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !state.is_agents(IPPROTO_TCP, peer) {
            tracing::debug!(agent = %state.agent.id, %peer, "resolver: a connection not from the agent, closed");
            continue;
        }
        let Ok(slot) = Arc::clone(&state.tcp_clients).try_acquire_owned() else {
            // As many clients as it may have: this one is closed at once.
            continue;
        };
        let task = Arc::clone(&state);
        state.spawn(async move {
            serve_tcp_client(stream, &task).await;
            drop(slot);
        });
    }
}

/// Queries of one TCP client, each with its two-byte length, answered in order.
async fn serve_tcp_client(mut stream: TcpStream, state: &State) {
    loop {
        // The whole message within TCP_IDLE, not just its first bytes.
        let read = async {
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await.ok()?;
            let len = usize::from(u16::from_be_bytes(len));
            if len < agentd_dns::HEADER_LEN {
                return None;
            }
            let mut message = vec![0u8; len];
            stream.read_exact(&mut message).await.ok()?;
            Some(message)
        };
        let Ok(Some(message)) = tokio::time::timeout(TCP_IDLE, read).await else {
            return;
        };
        let reply = match screen(state, &message) {
            Screened::Reply(reply) => reply,
            Screened::Drop => return,
            Screened::Forward(asked) => resolve(state, asked, Transport::Tcp).await,
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

/// What becomes of one message from the agent.
enum Screened {
    /// Answered at once (refused, or not a query).
    Reply(Vec<u8>),
    /// Not answered (a response, or too short to answer).
    Drop,
    /// To resolve: an allowed name (or any name, in monitor mode).
    Forward(Asked),
}

/// A query to resolve, with the rules that allow its name and its slot among the
/// queries waiting for the upstream.
struct Asked {
    query: Query,
    rules: Vec<NameRule>,
    /// Named by an ask rule only: nothing is admitted.
    ask: bool,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// Decides a message from the agent without waiting: parses it, takes it from the
/// budget, matches its name against the rules and gives it a slot.
fn screen(state: &State, message: &[u8]) -> Screened {
    let agent = &state.agent;
    let query = match agentd_dns::parse_query(message) {
        Ok(q) => q,
        Err(rejected) => {
            (agent.emit)(
                dns_event(agent, None, Verdict::Deny).with("reason", rejected.reason.clone()),
            );
            return rejected.reply.map_or(Screened::Drop, Screened::Reply);
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
        return Screened::Reply(agentd_dns::reply(&query, Rcode::Refused));
    }
    let rules: Vec<NameRule> = agent
        .rules
        .iter()
        .filter(|r| r.pattern.matches(&query.name))
        .cloned()
        .collect();
    // A name only an ask rule names: answered, its connects held for a person.
    let ask = rules.is_empty() && agent.ask.iter().any(|r| r.pattern.matches(&query.name));
    if rules.is_empty() && !ask {
        let ev = dns_event(agent, Some(&query), Verdict::Deny)
            .with("reason", "no network.connect rule names it");
        if !agent.monitor {
            (agent.emit)(ev.with("rcode", "NXDOMAIN"));
            return Screened::Reply(agentd_dns::reply(&query, Rcode::NxDomain));
        }
        // Monitor mode: reported, and answered (its connects are not refused either).
        (agent.emit)(ev.with("monitor", true));
    }
    let Ok(slot) = Arc::clone(&state.in_flight).try_acquire_owned() else {
        (agent.emit)(
            dns_event(agent, Some(&query), Verdict::Deny)
                .with("rcode", "REFUSED")
                .with("limit", "in_flight")
                .with(
                    "reason",
                    format!("{IN_FLIGHT} queries already wait for the upstream"),
                ),
        );
        return Screened::Reply(agentd_dns::reply(&query, Rcode::Refused));
    };
    Screened::Forward(Asked {
        query,
        rules,
        ask,
        _slot: slot,
    })
}

/// Asks the upstream for an allowed name, admits the answer's addresses, and gives the
/// reply for the agent.
async fn resolve(state: &State, asked: Asked, transport: Transport) -> Vec<u8> {
    let agent = &state.agent;
    let Asked {
        query, rules, ask, ..
    } = &asked;
    let rules: Vec<&NameRule> = rules.iter().collect();
    let query = query.clone();
    let servfail = |why: String| {
        (agent.emit)(
            dns_event(agent, Some(&query), Verdict::Allow)
                .with("rcode", "SERVFAIL")
                .with("error", why),
        );
        agentd_dns::reply(&query, Rcode::ServFail)
    };
    let upstream = match &agent.upstream {
        Ok(u) => *u,
        Err(why) => return servfail(why.clone()),
    };
    let Some(id) = random_id() else {
        return servfail("no random id for the upstream query (getrandom)".to_owned());
    };
    let sent = match agentd_dns::upstream_query(&query, id) {
        Ok(q) => q,
        Err(e) => return servfail(e),
    };
    let response = match ask_upstream(upstream, &sent).await {
        Ok(r) => r,
        Err(e) => return servfail(format!("upstream {upstream}: {e}")),
    };
    let mut answer = match agentd_dns::read_answer(&sent, &response) {
        Ok(a) => a,
        Err(e) => return servfail(format!("upstream {upstream}: {e}")),
    };
    answer.message = agentd_dns::with_id(answer.message, query.id);
    // Addresses of the host itself and of no host are never admitted by name (DNS
    // rebinding to the host's loopback services, a metadata endpoint): the agent gets
    // them in the answer, and its connects to them are decided by its CIDR rules alone.
    let (admissible, refused): (Vec<Addr>, Vec<Addr>) = answer
        .addrs
        .iter()
        .partition(|(a, _)| special(*a).is_none());
    // Admitted before the agent has the answer: its connect finds them.
    if let Err(e) = admit(agent, &query, &admissible, &rules) {
        let ev = dns_event(agent, Some(&query), Verdict::Deny)
            .with("rcode", "SERVFAIL")
            .with("limit", "addresses");
        (agent.emit)(match e {
            AdmitError::Full => ev.with("reason", e.to_string()),
            AdmitError::Map(_) => ev.with("error", e.to_string()),
        });
        return agentd_dns::reply(&query, Rcode::ServFail);
    }
    if *ask {
        for (addr, ttl) in &admissible {
            agent
                .asked
                .note(*addr, &query.name, Duration::from_secs(u64::from(*ttl)));
        }
    }
    let text = |list: &[Addr]| list.iter().map(|(a, _)| a.to_string()).collect::<Vec<_>>();
    let mut ev = dns_event(agent, Some(&query), Verdict::Allow)
        .with("rcode", answer.rcode.clone())
        .with("answers", text(&admissible));
    if *ask {
        ev = ev.with("ask", true);
    }
    if !refused.is_empty() {
        ev = ev.with("refused_answers", text(&refused)).with(
            "reason",
            "addresses of this host or of no host are not admitted by name",
        );
    }
    if let Some(ttl) = admissible.iter().map(|(_, t)| *t).min() {
        ev = ev.with("ttl", ttl);
    }
    if answer.chain.len() > 1 {
        ev = ev.with("cnames", answer.chain.get(1..).unwrap_or_default().to_vec());
    }
    (agent.emit)(ev);
    match transport {
        Transport::Udp => agentd_dns::fit_udp(&query, answer.message),
        Transport::Tcp => answer.message,
    }
}

/// An address of an answer, with its (clamped) TTL.
type Addr = (IpAddr, u32);

/// Why `addr` is never admitted by name, if it is not: the host's own (loopback), no
/// host's (unspecified, broadcast, multicast), the link's (link-local, cloud metadata at
/// 169.254.169.254 among them); an IPv4-mapped or -compatible IPv6 address as its IPv4.
pub fn special(addr: IpAddr) -> Option<&'static str> {
    let v4 = match addr {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => {
            if let Some(mapped) = a.to_ipv4_mapped() {
                mapped
            } else if a.is_unspecified() {
                return Some("unspecified");
            } else if a.is_loopback() {
                return Some("loopback");
            } else if a.is_multicast() {
                return Some("multicast");
            } else if a.segments().first().is_some_and(|s| s & 0xffc0 == 0xfe80) {
                return Some("link-local");
            } else if a.segments().get(..6) == Some(&[0; 6]) {
                return Some("IPv4-compatible");
            } else {
                return None;
            }
        }
    };
    if v4.is_unspecified() || v4.octets()[0] == 0 {
        Some("unspecified")
    } else if v4.is_loopback() {
        Some("loopback")
    } else if v4.is_link_local() {
        Some("link-local")
    } else if v4.is_multicast() {
        Some("multicast")
    } else if v4.is_broadcast() {
        Some("broadcast")
    } else {
        None
    }
}

fn admit(
    agent: &Agent,
    query: &Query,
    addrs: &[Addr],
    rules: &[&NameRule],
) -> Result<(), AdmitError> {
    for (addr, ttl) in addrs {
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

/// A fresh DNS message id from the kernel's random pool (None if it gives none: then
/// nothing is sent, rather than an id an off-path spoofer could guess).
fn random_id() -> Option<u16> {
    let mut id = [0u8; 2];
    // SAFETY: getrandom writes at most `id.len()` bytes into the buffer it is given.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    (n == 2).then(|| u16::from_be_bytes(id))
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
    fn addresses_of_this_host_or_of_none_are_special() {
        for a in [
            "127.0.0.1",
            "127.3.2.1",
            "0.0.0.0",
            "0.1.2.3",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "fe80::1",
            "ff02::1",
        ] {
            assert!(special(a.parse().unwrap()).is_some(), "{a}");
        }
        for a in [
            "192.0.2.2",
            "10.1.2.3",
            "2001:db8::2",
            "::ffff:192.0.2.2",
            "fd00::1",
        ] {
            assert_eq!(special(a.parse().unwrap()), None, "{a}");
        }
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
