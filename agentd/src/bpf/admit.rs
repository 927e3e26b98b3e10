//! Addresses admitted from agents' DNS answers: the `DNS_ALLOW` map the cgroup programs
//! consult at connect and sendmsg, and what user space remembers of each entry (the name
//! it was admitted for, to put in the `net_connect` events it allows).

use std::{
    collections::HashMap as StdHashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use agentd_common::{DnsClient, DnsKey};
use aya::maps::{HashMap, MapData};

use crate::run::kernel::monotonic_ns;

/// Addresses one agent may have admitted at once (distinct address, port and protocol).
pub const MAX_PER_AGENT: usize = 1024;
/// How long an expired admission's name is still known, for the events of connections
/// made just before it expired (their records may be decoded later).
const NAME_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error(
        "the agent has {MAX_PER_AGENT} addresses admitted, the most one agent may have \
         (they are reclaimed as they expire)"
    )]
    Full,
    /// The kernel map refused the entry.
    #[error("DNS_ALLOW: {0}")]
    Map(String),
}

/// What one answer admits for one rule: `addr` on `port` (None: every port) with
/// `proto`, for `ttl`, as an address of `domain`.
#[derive(Debug, Clone, Copy)]
pub struct Grant<'a> {
    pub addr: IpAddr,
    pub port: Option<u16>,
    pub proto: u8,
    pub domain: &'a str,
    pub ttl: Duration,
}

/// One admission in user space's copy.
#[derive(Debug, Clone)]
struct Entry {
    domain: String,
    /// CLOCK_MONOTONIC ns, as in the map.
    expires: u64,
}

/// What user space keeps of the admissions: the live ones (in the kernel map too), how
/// many each agent has, and the names of expired ones for a while.
#[derive(Debug)]
struct Table {
    map: HashMap<MapData, DnsKey, u64>,
    live: StdHashMap<DnsKey, Entry>,
    per_agent: StdHashMap<u64, usize>,
    /// The cgroup id of each agent that has admissions, by agent id (events name agents).
    cgroups: StdHashMap<String, u64>,
    /// Names of admissions that expired or whose agent is gone, until their grace ends
    /// (at most [`EXPIRED_KEPT`]).
    expired: StdHashMap<DnsKey, (String, u64)>,
}

/// Expired admissions whose names are kept at once (their events may still be decoded).
const EXPIRED_KEPT: usize = 64 * 1024;

/// A handle on the admissions, shared by the resolvers and the event reader.
#[derive(Debug, Clone)]
pub struct Admissions(Arc<Mutex<Table>>);

fn lock<T>(t: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `addr` as the programs see it: IPv6, IPv4 as ::ffff:a.b.c.d.
pub fn mapped(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

fn key(cgroup_id: u64, addr: IpAddr, port: Option<u16>, proto: u8) -> DnsKey {
    DnsKey {
        cgroup_id,
        addr: mapped(addr),
        port_be: port.unwrap_or(0).to_be(),
        proto,
        _pad: [0; 5],
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Admissions {
    pub(super) fn new(map: HashMap<MapData, DnsKey, u64>) -> Admissions {
        Admissions(Arc::new(Mutex::new(Table {
            map,
            live: StdHashMap::new(),
            per_agent: StdHashMap::new(),
            cgroups: StdHashMap::new(),
            expired: StdHashMap::new(),
        })))
    }

    /// Lets agent `agent` (cgroup `cgroup_id`) connect as `grant` says. Written to the
    /// kernel map before it returns: the caller answers the agent after.
    pub fn admit(&self, agent: &str, cgroup_id: u64, grant: &Grant<'_>) -> Result<(), AdmitError> {
        let Grant {
            addr,
            port,
            proto,
            domain,
            ttl,
        } = *grant;
        let expires = monotonic_ns().saturating_add(nanos(ttl));
        let k = key(cgroup_id, addr, port, proto);
        let mut t = lock(&self.0);
        let held = t.per_agent.get(&cgroup_id).copied().unwrap_or(0);
        let known = t.live.get(&k).map(|e| e.expires);
        if known.is_none() && held >= MAX_PER_AGENT {
            return Err(AdmitError::Full);
        }
        // A longer admission for the same address (another name, a longer TTL) stays.
        let expires = known.map_or(expires, |e| e.max(expires));
        t.map
            .insert(k, expires, 0)
            .map_err(|e| AdmitError::Map(e.to_string()))?;
        if known.is_none() {
            *t.per_agent.entry(cgroup_id).or_default() += 1;
        }
        t.cgroups.insert(agent.to_owned(), cgroup_id);
        t.live.insert(
            k,
            Entry {
                domain: domain.to_owned(),
                expires,
            },
        );
        Ok(())
    }

    /// The name `addr` was admitted for to `agent` on `port` (or every port) and
    /// `proto`, if it was (recently: an event is decoded after the connect it records).
    pub fn domain_of(&self, agent: &str, addr: IpAddr, port: u16, proto: u8) -> Option<String> {
        let t = lock(&self.0);
        let cgroup_id = *t.cgroups.get(agent)?;
        [Some(port), None].into_iter().find_map(|p| {
            let k = key(cgroup_id, addr, p, proto);
            t.live
                .get(&k)
                .map(|e| e.domain.clone())
                .or_else(|| t.expired.get(&k).map(|(d, _)| d.clone()))
        })
    }

    /// Deletes the expired admissions from the map; their names are kept for a while.
    pub fn sweep(&self) {
        let now = monotonic_ns();
        let mut t = lock(&self.0);
        let gone: Vec<DnsKey> = t
            .live
            .iter()
            .filter(|(_, e)| e.expires <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            retire(&mut t, k, now);
        }
        let grace = nanos(NAME_GRACE);
        t.expired
            .retain(|_, (_, at)| at.saturating_add(grace) > now);
    }

    /// Removes every admission of the agent in cgroup `cgroup_id` (it is gone); their
    /// names are kept for its last events, like expired ones.
    pub fn forget_agent(&self, cgroup_id: u64) {
        let now = monotonic_ns();
        let mut t = lock(&self.0);
        let keys: Vec<DnsKey> = t
            .live
            .keys()
            .filter(|k| k.cgroup_id == cgroup_id)
            .copied()
            .collect();
        for k in keys {
            retire(&mut t, k, now);
        }
        t.per_agent.remove(&cgroup_id);
    }
}

/// Moves admission `k` from the map and the live set to the expired names.
fn retire(t: &mut Table, k: DnsKey, now: u64) {
    // Gone already if the map was cleared some other way: nothing to undo.
    let _ = t.map.remove(&k);
    let Some(e) = t.live.remove(&k) else {
        return;
    };
    if let Some(n) = t.per_agent.get_mut(&k.cgroup_id) {
        *n = n.saturating_sub(1);
    }
    if t.expired.len() < EXPIRED_KEPT {
        t.expired.insert(k, (e.domain, now));
    }
}

/// A handle on `DNS_CLIENTS`: which agent's socket last sent to a resolver from a local
/// port (written by the `outbound` program).
#[derive(Debug, Clone)]
pub struct DnsClients(Arc<Mutex<HashMap<MapData, u32, DnsClient>>>);

impl DnsClients {
    pub(super) fn new(map: HashMap<MapData, u32, DnsClient>) -> DnsClients {
        DnsClients(Arc::new(Mutex::new(map)))
    }

    /// Whether the socket (`proto`, IPv6 or not, local `port`) that sent a query to the
    /// resolver of the agent in cgroup `cgroup_id` is that agent's, and sent within
    /// `recent` (a socket closed since and its port reused by another process would
    /// still be found; the window bounds it).
    pub fn is_agents(
        &self,
        cgroup_id: u64,
        proto: u8,
        v6: bool,
        port: u16,
        recent: Duration,
    ) -> bool {
        let key = agentd_common::dns_client_key(proto, v6, port);
        let found = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key, 0)
            .ok();
        let recent = u64::try_from(recent.as_nanos()).unwrap_or(u64::MAX);
        found.is_some_and(|c| {
            c.cgroup_id == cgroup_id && monotonic_ns().saturating_sub(c.ktime_ns) <= recent
        })
    }
}
