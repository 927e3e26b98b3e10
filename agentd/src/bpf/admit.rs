//! Addresses admitted from agents' DNS answers, and destinations a person approved (`ask`):
//! the `DNS_ALLOW` map the cgroup programs consult at connect and sendmsg, and what user
//! space remembers of each entry (the name it was admitted for, to put in the
//! `net_connect` events it allows). An approval for one connection carries
//! `DNS_ALLOW_ONCE`: the program that uses it deletes it, and user space drops it from its
//! count when it finds it gone.

use std::{
    collections::HashMap as StdHashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use agentd_common::{DNS_ALLOW_ONCE, DnsClient, DnsKey};
use aya::maps::{HashMap, MapData, MapError};

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

/// A person's approval of connections to one destination (a held `connect` of an `ask`
/// rule): `addr` on `port` (None: every port) with `proto`, for `ttl` from now; `domain`,
/// the name the agent asked for, when known.
#[derive(Debug, Clone, Copy)]
pub struct Approval<'a> {
    pub addr: IpAddr,
    pub port: Option<u16>,
    pub proto: u8,
    pub domain: Option<&'a str>,
    pub ttl: Duration,
}

/// One admission in user space's copy.
#[derive(Debug, Clone)]
struct Entry {
    /// The name it was admitted for; None for an approved address no name led to.
    domain: Option<String>,
    /// CLOCK_MONOTONIC ns, as in the map (without [`DNS_ALLOW_ONCE`]).
    expires: u64,
    /// For one connection: the kernel deletes the entry when it uses it.
    once: bool,
}

impl Entry {
    /// The `DNS_ALLOW` value.
    fn value(&self) -> u64 {
        if self.once {
            self.expires | DNS_ALLOW_ONCE
        } else {
            self.expires
        }
    }
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
        self.insert(
            agent,
            cgroup_id,
            key(cgroup_id, addr, port, proto),
            Some(domain),
            ttl,
            false,
        )
    }

    /// Lets agent `agent` (cgroup `cgroup_id`) make every connection `approval` names
    /// until its `ttl` ends (a person's "allow for" or "for the session": a far `ttl`).
    /// Written to the kernel map before it returns: the caller lets the held call go on
    /// after.
    pub fn admit_for(
        &self,
        agent: &str,
        cgroup_id: u64,
        approval: &Approval<'_>,
    ) -> Result<(), AdmitError> {
        self.approve(agent, cgroup_id, approval, false)
    }

    /// Lets agent `agent` (cgroup `cgroup_id`) make one connection (or send one datagram)
    /// as `approval` says, within its `ttl`: the program that allows it deletes the
    /// entry. Where a live entry for every connection to it exists, that one stays (it
    /// allows this connection too). Written to the kernel map before it returns.
    pub fn admit_once(
        &self,
        agent: &str,
        cgroup_id: u64,
        approval: &Approval<'_>,
    ) -> Result<(), AdmitError> {
        self.approve(agent, cgroup_id, approval, true)
    }

    fn approve(
        &self,
        agent: &str,
        cgroup_id: u64,
        approval: &Approval<'_>,
        once: bool,
    ) -> Result<(), AdmitError> {
        let Approval {
            addr,
            port,
            proto,
            domain,
            ttl,
        } = *approval;
        self.insert(
            agent,
            cgroup_id,
            key(cgroup_id, addr, port, proto),
            domain,
            ttl,
            once,
        )
    }

    /// Adds or extends admission `k` of agent `agent` for `ttl` from now, for one
    /// connection (`once`) or every one.
    fn insert(
        &self,
        agent: &str,
        cgroup_id: u64,
        k: DnsKey,
        domain: Option<&str>,
        ttl: Duration,
        once: bool,
    ) -> Result<(), AdmitError> {
        let now = monotonic_ns();
        let expires = now.saturating_add(nanos(ttl)).min(DNS_ALLOW_ONCE - 1);
        let mut t = lock(&self.0);
        let known = t.live.get(&k).cloned();
        if known.is_none() && held(&t, cgroup_id) >= MAX_PER_AGENT {
            // Entries for one connection the kernel used up no longer count.
            reclaim_used(&mut t, Some(cgroup_id), now);
            if held(&t, cgroup_id) >= MAX_PER_AGENT {
                return Err(AdmitError::Full);
            }
        }
        let entry = merge(known.as_ref(), domain, expires, once, now);
        t.map
            .insert(k, entry.value(), 0)
            .map_err(|e| AdmitError::Map(e.to_string()))?;
        if known.is_none() {
            *t.per_agent.entry(cgroup_id).or_default() += 1;
        }
        t.cgroups.insert(agent.to_owned(), cgroup_id);
        t.live.insert(k, entry);
        Ok(())
    }

    /// Whether the agent in cgroup `cgroup_id` may connect to `addr` on `port` with
    /// `proto` now by an admission (for that port or every port), as the kernel map holds
    /// it: what the connect program would decide, without using up an admission for one
    /// connection.
    pub fn is_admitted(&self, cgroup_id: u64, addr: IpAddr, port: u16, proto: u8) -> bool {
        let now = monotonic_ns();
        let t = lock(&self.0);
        [Some(port), None].into_iter().any(|p| {
            t.map
                .get(&key(cgroup_id, addr, p, proto), 0)
                .is_ok_and(|v| now < v & !DNS_ALLOW_ONCE)
        })
    }

    /// Removes the admission of `addr` on `port` (None: the every-port one) with `proto`
    /// of the agent in cgroup `cgroup_id` now, from the kernel map first (a person's
    /// approval revoked). Its name is kept for the agent's last events, like an expired
    /// one's. Absent: nothing to do.
    pub fn revoke(
        &self,
        cgroup_id: u64,
        addr: IpAddr,
        port: Option<u16>,
        proto: u8,
    ) -> Result<(), AdmitError> {
        let k = key(cgroup_id, addr, port, proto);
        let mut t = lock(&self.0);
        match t.map.remove(&k) {
            Ok(()) | Err(MapError::KeyNotFound | MapError::ElementNotFound) => {}
            Err(e) => return Err(AdmitError::Map(e.to_string())),
        }
        retire(&mut t, k, monotonic_ns());
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
                .and_then(|e| e.domain.clone())
                .or_else(|| t.expired.get(&k).map(|(d, _)| d.clone()))
        })
    }

    /// Deletes the expired admissions from the map, and forgets those for one connection
    /// the kernel used up; their names are kept for a while.
    pub fn sweep(&self) {
        let now = monotonic_ns();
        let mut t = lock(&self.0);
        reclaim_used(&mut t, None, now);
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
    // Gone already if the map was cleared some other way (or the kernel used it up):
    // nothing to undo.
    let _ = t.map.remove(&k);
    let Some(e) = t.live.remove(&k) else {
        return;
    };
    if let Some(n) = t.per_agent.get_mut(&k.cgroup_id) {
        *n = n.saturating_sub(1);
    }
    if let Some(domain) = e.domain
        && t.expired.len() < EXPIRED_KEPT
    {
        t.expired.insert(k, (domain, now));
    }
}

/// How many admissions the agent in cgroup `cgroup_id` has in user space's count.
fn held(t: &Table, cgroup_id: u64) -> usize {
    t.per_agent.get(&cgroup_id).copied().unwrap_or(0)
}

/// Retires the admissions for one connection (of the agent in cgroup `only`, or of
/// every agent) that are no longer in the kernel map: the program that allowed their
/// connection deleted them.
fn reclaim_used(t: &mut Table, only: Option<u64>, now: u64) {
    let once: Vec<DnsKey> = t
        .live
        .iter()
        .filter(|(k, e)| e.once && only.is_none_or(|c| c == k.cgroup_id))
        .map(|(k, _)| *k)
        .collect();
    for k in once {
        if matches!(
            t.map.get(&k, 0),
            Err(MapError::KeyNotFound | MapError::ElementNotFound)
        ) {
            retire(t, k, now);
        }
    }
}

/// The entry for admission `known` (if any) admitted again for `domain` until
/// `expires`, for one connection (`once`) or every one, at `now`. An entry for every
/// connection is kept by a new one for one connection while it is live (it allows that
/// connection too), and replaces an entry for one connection; two of a kind merge to the
/// later expiry.
fn merge(known: Option<&Entry>, domain: Option<&str>, expires: u64, once: bool, now: u64) -> Entry {
    let domain = domain.map(str::to_owned);
    let Some(old) = known else {
        return Entry {
            domain,
            expires,
            once,
        };
    };
    let domain = domain.or_else(|| old.domain.clone());
    match (old.once, once) {
        (false, true) if old.expires > now => Entry {
            domain: old.domain.clone().or(domain),
            expires: old.expires,
            once: false,
        },
        (false, true) | (true, false) => Entry {
            domain,
            expires,
            once,
        },
        (false, false) | (true, true) => Entry {
            domain,
            expires: old.expires.max(expires),
            once,
        },
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(domain: Option<&str>, expires: u64, once: bool) -> Entry {
        Entry {
            domain: domain.map(str::to_owned),
            expires,
            once,
        }
    }

    fn parts(e: &Entry) -> (Option<&str>, u64, bool) {
        (e.domain.as_deref(), e.expires, e.once)
    }

    #[test]
    fn the_once_bit_rides_on_the_expiry() {
        assert_eq!(entry(None, 500, false).value(), 500);
        assert_eq!(entry(None, 500, true).value(), 500 | 1 << 63);
        assert_eq!(entry(None, 500, true).value() & !DNS_ALLOW_ONCE, 500);
    }

    #[test]
    fn admissions_merge_by_kind() {
        let now = 100;
        // New.
        assert_eq!(
            parts(&merge(None, Some("a"), 200, true, now)),
            (Some("a"), 200, true)
        );
        // Every connection, twice: the later expiry, the newer name.
        let timed = entry(Some("a"), 300, false);
        assert_eq!(
            parts(&merge(Some(&timed), Some("b"), 200, false, now)),
            (Some("b"), 300, false)
        );
        // A live entry for every connection keeps a new one for one connection.
        assert_eq!(
            parts(&merge(Some(&timed), None, 900, true, now)),
            (Some("a"), 300, false)
        );
        // An expired one (not yet swept) does not.
        let stale = entry(Some("a"), 50, false);
        assert_eq!(
            parts(&merge(Some(&stale), None, 900, true, now)),
            (Some("a"), 900, true)
        );
        // One connection, then every connection: replaced, not extended to the once's.
        let once = entry(None, 900, true);
        assert_eq!(
            parts(&merge(Some(&once), Some("d"), 200, false, now)),
            (Some("d"), 200, false)
        );
        // One connection, twice: still one, the later expiry.
        assert_eq!(
            parts(&merge(Some(&once), None, 400, true, now)),
            (None, 900, true)
        );
    }
}
