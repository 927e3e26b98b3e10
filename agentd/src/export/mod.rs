//! Events sent out of the daemon to what operators already run: syslog (RFC 5424,
//! [`syslog`]) and OpenTelemetry logs (OTLP/HTTP JSON, [`otlp`]). Each destination has a
//! thread of its own behind a bounded queue: a slow or absent receiver never makes the
//! daemon wait; what does not fit is dropped and counted.

pub mod otlp;
pub mod syslog;

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use crate::event::{Event, Kind, Verdict};

/// Which events a destination takes: empty lists take every kind / verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub kinds: Vec<Kind>,
    pub verdicts: Vec<Verdict>,
}

impl Selection {
    pub fn takes(&self, ev: &Event) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&ev.kind))
            && (self.verdicts.is_empty() || self.verdicts.contains(&ev.verdict))
    }
}

/// An event kind as the events name it (`exec`, `file_write`, `breaker`...).
pub fn parse_kind(s: &str) -> Result<Kind, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
        format!("`{s}` is not an event kind (the `kind` field of `agentd events --json`: exec, connect, file_write, dns, breaker...)")
    })
}

/// A verdict: allow, deny, killed or none.
pub fn parse_verdict(s: &str) -> Result<Verdict, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("`{s}` is not a verdict: allow, deny, killed or none"))
}

/// What one destination did, for the metrics.
#[derive(Debug, Clone, Default)]
pub struct SinkCounts {
    /// `syslog` or `otlp`.
    pub name: &'static str,
    /// Events delivered.
    pub sent: u64,
    /// Events dropped because the queue was full.
    pub dropped: u64,
    /// Events given up on after the destination failed (and retries ran out).
    pub failed: u64,
}

/// The counters a destination's thread and the daemon share.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
    pub failed: AtomicU64,
}

/// One destination: its selection and the queue to its thread.
#[derive(Debug)]
struct Sink {
    name: &'static str,
    selection: Selection,
    queue: std::sync::mpsc::SyncSender<Arc<Event>>,
    counters: Arc<Counters>,
}

/// The daemon's destinations (none by default).
#[derive(Debug, Default)]
pub struct Exporters {
    sinks: Vec<Sink>,
}

/// Events queued for one destination before new ones are dropped (and counted).
pub const QUEUE: usize = 8192;

impl Exporters {
    /// Starts a thread per destination given.
    pub fn start(
        syslog: Option<(syslog::Target, Selection)>,
        otlp: Option<(otlp::Endpoint, Selection)>,
    ) -> anyhow::Result<Exporters> {
        let mut sinks = Vec::new();
        if let Some((target, selection)) = syslog {
            let (queue, rx) = std::sync::mpsc::sync_channel(QUEUE);
            let counters = Arc::new(Counters::default());
            syslog::start(target, rx, Arc::clone(&counters))?;
            sinks.push(Sink {
                name: "syslog",
                selection,
                queue,
                counters,
            });
        }
        if let Some((endpoint, selection)) = otlp {
            let (queue, rx) = std::sync::mpsc::sync_channel(QUEUE);
            let counters = Arc::new(Counters::default());
            otlp::start(endpoint, rx, Arc::clone(&counters))?;
            sinks.push(Sink {
                name: "otlp",
                selection,
                queue,
                counters,
            });
        }
        Ok(Exporters { sinks })
    }

    /// Offers `ev` to every destination that takes it; never waits.
    pub fn send(&self, ev: &Arc<Event>) {
        for s in &self.sinks {
            if s.selection.takes(ev) && s.queue.try_send(Arc::clone(ev)).is_err() {
                s.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn counts(&self) -> Vec<SinkCounts> {
        self.sinks
            .iter()
            .map(|s| SinkCounts {
                name: s.name,
                sent: s.counters.sent.load(Ordering::Relaxed),
                dropped: s.counters.dropped.load(Ordering::Relaxed),
                failed: s.counters.failed.load(Ordering::Relaxed),
            })
            .collect()
    }
}
