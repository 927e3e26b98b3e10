//! Bursts of identical refusals, folded for the record: an agent that retries a refused
//! call in a loop would otherwise fill `--events`, the daemon's subscribers and the audit
//! log with the same line. The first refusal of a kind is recorded at once; identical ones
//! (same agent, kind, layer, verdict, errno, target and details, whatever the process)
//! within [`WINDOW_NS`] of it are counted, and recorded as one event when the window
//! closes: the first's copy with `detail.repeated` (how many more) and `detail.last_ts`.
//!
//! The breaker sees every event before this: a threshold counts each refusal, and a held
//! process is decided one by one. Pure: the caller passes the clock.

use std::collections::HashMap;

use crate::event::{Event, Kind, Verdict};

/// How long identical refusals are folded into one record.
pub const WINDOW_NS: u64 = 1_000_000_000;

/// What makes two refusals identical.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    agent: String,
    kind: Kind,
    layer: crate::event::Layer,
    verdict: Verdict,
    errno: Option<i32>,
    target: String,
}

#[derive(Debug)]
struct Burst {
    first: Event,
    /// When the window opened (the first's monotonic time).
    opened_ns: u64,
    repeated: u64,
    last_ts: String,
}

/// The open windows of every agent.
#[derive(Debug, Default)]
pub struct Bursts {
    open: HashMap<Key, Burst>,
}

impl Bursts {
    pub fn new() -> Bursts {
        Bursts::default()
    }

    /// Takes one event at monotonic time `now_ns` and returns what to record now, in
    /// order: the summaries of windows that closed, then the event unless it was folded
    /// into an open window.
    pub fn push(&mut self, ev: Event, now_ns: u64) -> Vec<Event> {
        let mut out = self.expired(now_ns);
        let Some(key) = key_of(&ev) else {
            out.push(ev);
            return out;
        };
        match self.open.get_mut(&key) {
            Some(b) => {
                b.repeated += 1;
                b.last_ts.clone_from(&ev.ts);
            }
            None => {
                self.open.insert(
                    key,
                    Burst {
                        first: ev.clone(),
                        opened_ns: now_ns,
                        repeated: 0,
                        last_ts: ev.ts.clone(),
                    },
                );
                out.push(ev);
            }
        }
        out
    }

    /// The summaries of the windows that closed by `now_ns` (call it now and then, so a
    /// burst that stopped is recorded without waiting for the next event).
    pub fn expired(&mut self, now_ns: u64) -> Vec<Event> {
        let closed: Vec<Key> = self
            .open
            .iter()
            .filter(|(_, b)| now_ns.saturating_sub(b.opened_ns) >= WINDOW_NS)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out: Vec<Burst> = closed
            .into_iter()
            .filter_map(|k| self.open.remove(&k))
            .collect();
        out.sort_by_key(|b| b.opened_ns);
        out.into_iter().filter_map(summary).collect()
    }

    /// Every open window's summary, at the end.
    pub fn flush(&mut self) -> Vec<Event> {
        self.expired(u64::MAX)
    }
}

/// The one record of a burst's repeats; none when the first had no repeat.
fn summary(b: Burst) -> Option<Event> {
    if b.repeated == 0 {
        return None;
    }
    Some(
        b.first
            .with("repeated", b.repeated)
            .with("last_ts", b.last_ts),
    )
}

/// The key of a refusal that may be folded; `None` for anything else (allowed calls,
/// breaker, exit, lost and launch records, held and tripping events: each of those is
/// recorded as it is).
fn key_of(ev: &Event) -> Option<Key> {
    if !matches!(ev.verdict, Verdict::Deny | Verdict::Killed)
        || ev.held()
        || ev.tripped_in_kernel()
        || matches!(
            ev.kind,
            Kind::Breaker
                | Kind::Lost
                | Kind::Exit
                | Kind::LaunchFailed
                | Kind::Limit
                | Kind::Transaction
                | Kind::Ask
                | Kind::Approval
        )
    {
        return None;
    }
    // Everything the event says but who made the call: paths, address, and the details
    // (flags, family, syscall...), the thread id aside.
    let mut detail = ev.detail.clone();
    detail.remove("tid");
    let target = format!(
        "{}\0{}\0{:?}\0{:?}\0{:?}\0{:?}\0{}",
        ev.path.as_deref().unwrap_or(""),
        ev.path2.as_deref().unwrap_or(""),
        ev.addr,
        ev.port,
        ev.proto,
        ev.domain,
        serde_json::Value::Object(detail)
    );
    Some(Key {
        agent: ev.agent.clone(),
        kind: ev.kind,
        layer: ev.layer,
        verdict: ev.verdict,
        errno: ev.errno,
        target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Layer;

    fn refusal(path: &str, pid: u32) -> Event {
        let mut e = Event::new(
            "a",
            pid,
            "sh",
            Kind::OpenWrite,
            Verdict::Deny,
            Layer::Landlock,
        );
        e.path = Some(path.into());
        e.errno = Some(13);
        e
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn a_loop_of_one_refusal_is_the_first_then_one_summary() {
        let mut b = Bursts::new();
        assert_eq!(
            b.push(refusal("/etc/x", 1), 0).len(),
            1,
            "the first at once"
        );
        for i in 1..=99 {
            // Another process of the same loop: still the same refusal.
            assert!(b.push(refusal("/etc/x", 1 + i as u32), i * MS).is_empty());
        }
        assert!(b.expired(500 * MS).is_empty(), "the window is open");
        let s = b.expired(1000 * MS);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].detail["repeated"], 99);
        assert_eq!(s[0].path.as_deref(), Some("/etc/x"));
        // The next one opens a new window.
        assert_eq!(b.push(refusal("/etc/x", 1), 1001 * MS).len(), 1);
    }

    #[test]
    fn different_refusals_and_other_events_pass_through() {
        let mut b = Bursts::new();
        assert_eq!(b.push(refusal("/etc/x", 1), 0).len(), 1);
        assert_eq!(b.push(refusal("/etc/y", 1), 1).len(), 1, "another target");
        let allowed = Event::new("a", 1, "sh", Kind::OpenWrite, Verdict::Allow, Layer::Kernel);
        assert_eq!(b.push(allowed.clone(), 2).len(), 1);
        assert_eq!(b.push(allowed, 3).len(), 1, "only refusals fold");
        let held = refusal("/etc/x", 1).with(crate::event::HELD, true);
        assert_eq!(b.push(held, 4).len(), 1, "a held refusal is its own record");
        let other_flags = refusal("/etc/x", 1).with("flags", "O_WRONLY|O_APPEND");
        assert_eq!(b.push(other_flags, 5).len(), 1, "another call");
        let mut other_agent = refusal("/etc/x", 1);
        other_agent.agent = "b".into();
        assert_eq!(b.push(other_agent, 5).len(), 1);
        // Names refused one after the other: each is a record (what was asked is the data).
        let name = |n: &str| {
            let mut e = Event::new("a", 0, "", Kind::Dns, Verdict::Deny, Layer::Resolver);
            e.domain = Some(n.into());
            e
        };
        assert_eq!(b.push(name("secret-part-1.evil.test"), 6).len(), 1);
        assert_eq!(b.push(name("secret-part-2.evil.test"), 7).len(), 1);
        assert!(b.flush().is_empty(), "nothing repeated: no summary");
    }

    #[test]
    fn flush_records_what_is_still_open() {
        let mut b = Bursts::new();
        b.push(refusal("/etc/x", 1), 0);
        b.push(refusal("/etc/x", 1), 1);
        b.push(refusal("/etc/x", 1), 2);
        let s = b.flush();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].detail["repeated"], 2);
        assert!(b.flush().is_empty());
    }
}
