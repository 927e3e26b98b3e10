//! Events sent out of the daemon to what operators already run: syslog (RFC 5424,
//! [`syslog`]) and OpenTelemetry logs (OTLP/HTTP JSON, [`otlp`]). Each destination has a
//! thread of its own behind a bounded queue: a slow or absent receiver never makes the
//! daemon wait; what does not fit is dropped and counted. docs/export.md is the
//! operator's guide.

pub mod otlp;
pub mod syslog;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::TrySendError,
    },
    time::{Duration, Instant},
};

use crate::event::{Event, Kind, Verdict};

/// How long a destination's thread keeps trying one record (syslog) or one batch (OTLP)
/// before it counts it as failed and goes on with the next.
pub const GIVE_UP: Duration = Duration::from_secs(30);
/// The first wait after a failure; each further failure doubles it, up to [`BACKOFF_MAX`].
pub const BACKOFF_FIRST: Duration = Duration::from_millis(250);
pub const BACKOFF_MAX: Duration = Duration::from_secs(8);

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
    /// Whether the daemon's log was told that the queue overflowed (once a run: the
    /// metrics count every drop).
    told_full: AtomicBool,
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
        syslog: Option<(syslog::Target, syslog::Facility, Selection)>,
        otlp: Option<(otlp::Endpoint, Selection)>,
    ) -> anyhow::Result<Exporters> {
        let mut sinks = Vec::new();
        if let Some((target, facility, selection)) = syslog {
            let (queue, rx) = std::sync::mpsc::sync_channel(QUEUE);
            let counters = Arc::new(Counters::default());
            syslog::start(target, facility, rx, Arc::clone(&counters))?;
            sinks.push(Sink {
                name: "syslog",
                selection,
                queue,
                counters,
                told_full: AtomicBool::new(false),
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
                told_full: AtomicBool::new(false),
            });
        }
        Ok(Exporters { sinks })
    }

    /// Offers `ev` to every destination that takes it; never waits.
    pub fn send(&self, ev: &Arc<Event>) {
        for s in &self.sinks {
            if !s.selection.takes(ev) {
                continue;
            }
            let why = match s.queue.try_send(Arc::clone(ev)) {
                Ok(()) => continue,
                Err(TrySendError::Full(_)) => "its queue is full",
                Err(TrySendError::Disconnected(_)) => "its thread has ended",
            };
            s.counters.dropped.fetch_add(1, Ordering::Relaxed);
            if !s.told_full.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "agentd daemon: {}: {why} ({QUEUE} events at most): events are dropped \
                     (counted in agentd_export_events_total; told once)",
                    s.name
                );
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

/// How grave an event is, in syslog's terms (RFC 5424 §6.2.1); the OTLP export maps it to
/// an OpenTelemetry severity number. docs/export.md has the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// A breaker trip, a canary opened: someone should look now.
    Alert,
    /// agentd could not launch an agent.
    Err,
    /// A refusal (deny, killed), and events the kernel could not deliver.
    Warning,
    /// Lifecycle and informational events (verdict none).
    Notice,
    /// What an agent was allowed to do.
    Info,
}

impl Severity {
    pub fn of(ev: &Event) -> Severity {
        let by_verdict = match ev.verdict {
            Verdict::Deny | Verdict::Killed => Severity::Warning,
            Verdict::None => Severity::Notice,
            Verdict::Allow => Severity::Info,
        };
        match ev.kind {
            Kind::Breaker | Kind::Canary => Severity::Alert,
            Kind::LaunchFailed => Severity::Err,
            Kind::Lost => Severity::Warning,
            Kind::Start
            | Kind::Exit
            | Kind::Limit
            | Kind::Exec
            | Kind::Fork
            | Kind::ProcessExit
            | Kind::OpenWrite
            | Kind::OpenRead
            | Kind::Signal
            | Kind::Unlink
            | Kind::Rename
            | Kind::Mkdir
            | Kind::Rmdir
            | Kind::Link
            | Kind::Symlink
            | Kind::Chmod
            | Kind::Chown
            | Kind::Truncate
            | Kind::Setxattr
            | Kind::Connect
            | Kind::Sendmsg
            | Kind::Bind
            | Kind::Socket
            | Kind::Accept
            | Kind::Dns
            | Kind::Syscall
            | Kind::Transaction
            | Kind::Ask
            | Kind::Approval => by_verdict,
        }
    }

    /// The syslog severity code (RFC 5424 table 2).
    pub fn code(self) -> u8 {
        match self {
            Severity::Alert => 1,
            Severity::Err => 3,
            Severity::Warning => 4,
            Severity::Notice => 5,
            Severity::Info => 6,
        }
    }

    /// The syslog keyword (`alert`, `err`, `warning`, `notice`, `info`), the OTLP
    /// records' `severityText`.
    pub fn name(self) -> &'static str {
        match self {
            Severity::Alert => "alert",
            Severity::Err => "err",
            Severity::Warning => "warning",
            Severity::Notice => "notice",
            Severity::Info => "info",
        }
    }

    /// The OpenTelemetry `SeverityNumber` the logs data model maps the syslog severity
    /// to (its appendix B): ERROR3, ERROR, WARN, INFO2, INFO.
    pub fn otel_number(self) -> i32 {
        match self {
            Severity::Alert => 19,
            Severity::Err => 17,
            Severity::Warning => 13,
            Severity::Notice => 10,
            Severity::Info => 9,
        }
    }
}

/// The event as one readable line, without its time (the records carry it in a field of
/// their own): `DENY   net_connect   127.0.0.1:8080/tcp  python3[42]  bpf EPERM  agent-1`.
pub fn summary(ev: &Event) -> String {
    let line = ev.line(false);
    match line.split_once(' ') {
        Some((_, rest)) => rest.to_owned(),
        None => line,
    }
}

/// An event's `ts` (`YYYY-MM-DDTHH:MM:SS[.fraction]Z`, as [`crate::event::rfc3339`]
/// writes it) as seconds and nanoseconds since the Unix epoch; `None` when it is not
/// that form.
pub fn parse_ts(ts: &str) -> Option<(u64, u32)> {
    let b = ts.as_bytes();
    let num = |from: usize, to: usize| -> Option<u64> {
        let digits = b.get(from..to)?;
        digits.iter().try_fold(0u64, |n, d| {
            d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
        })
    };
    let seps = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if seps.iter().any(|&(i, c)| b.get(i) != Some(&c)) || b.last() != Some(&b'Z') {
        return None;
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, s) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    if h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let nanos = match b.get(19..b.len() - 1)? {
        [] => 0,
        [b'.', frac @ ..] if (1..=9).contains(&frac.len()) => {
            let n = num(20, 20 + frac.len())?;
            u32::try_from(n * 10u64.pow(9 - frac.len() as u32)).ok()?
        }
        _ => return None,
    };
    // Days since 1970-01-01 (H. Hinnant's `days_from_civil`, the inverse of event.rs's
    // `civil_from_days`).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some((days * 86_400 + h * 3600 + mi * 60 + s, nanos))
}

/// This host's name, for the records (`-` when it has none that can be sent).
pub fn hostname() -> String {
    let name = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    // RFC 5424's HOSTNAME: 1 to 255 printable US-ASCII characters.
    if name.is_empty() || name.len() > 255 || !name.bytes().all(|c| (33..=126).contains(&c)) {
        return "-".to_owned();
    }
    name
}

/// Exponential backoff between attempts, and the destination's health for the daemon's
/// log: a failure is told once when it starts, not once a record.
#[derive(Debug)]
pub(crate) struct Backoff {
    /// `syslog tcp:127.0.0.1:514`, `otlp http://...`: what the log lines name.
    what: String,
    next: Duration,
    /// Since when the destination fails (told once).
    down_since: Option<Instant>,
    /// Whether a give-up was told in this failure.
    told_give_up: bool,
}

impl Backoff {
    pub(crate) fn new(what: String) -> Backoff {
        Backoff {
            what,
            next: BACKOFF_FIRST,
            down_since: None,
            told_give_up: false,
        }
    }

    /// An attempt failed: tells the log (the first time), and returns how long to wait
    /// before the next one.
    pub(crate) fn failed(&mut self, error: &dyn std::fmt::Display) -> Duration {
        if self.down_since.is_none() {
            eprintln!(
                "agentd daemon: {}: {error}; retrying with backoff for up to {}s, then \
                 what waits is counted as failed",
                self.what,
                GIVE_UP.as_secs()
            );
            self.down_since = Some(Instant::now());
        }
        let wait = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        wait
    }

    /// Records were given up on (counted as failed).
    pub(crate) fn gave_up(&mut self, records: usize, error: &dyn std::fmt::Display) {
        if !self.told_give_up {
            eprintln!(
                "agentd daemon: {}: gave up on {records} record(s) after {}s: {error} \
                 (counted as failed; told once until it works again)",
                self.what,
                GIVE_UP.as_secs()
            );
            self.told_give_up = true;
        }
    }

    /// An attempt worked: the next failure starts from the first wait again.
    pub(crate) fn worked(&mut self) {
        if let Some(since) = self.down_since.take() {
            eprintln!(
                "agentd daemon: {}: delivering again after {}s",
                self.what,
                since.elapsed().as_secs()
            );
        }
        self.next = BACKOFF_FIRST;
        self.told_give_up = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Layer;

    #[test]
    fn timestamps_parse_back_to_what_event_rs_writes() {
        for (secs, nanos) in [
            (0, 0),
            (951_782_400, 5),
            (1_795_478_399, 999_999_999),
            (4_102_444_800, 1),
        ] {
            let ts = crate::event::rfc3339(secs, nanos);
            assert_eq!(parse_ts(&ts), Some((secs, nanos)), "{ts}");
        }
        assert_eq!(parse_ts("2026-11-23T21:41:21Z"), Some((1_795_470_081, 0)));
        assert_eq!(
            parse_ts("2026-11-23T21:41:21.5Z"),
            Some((1_795_470_081, 500_000_000))
        );
        for bad in [
            "",
            "2026-11-23 21:41:21Z",
            "2026-11-23T21:41:21",
            "2026-11-23T21:41:21.Z",
            "2026-11-23T21:41:21.1234567890Z",
            "2026-13-23T21:41:21Z",
            "2026-11-23T21:41:21+01:00",
            "1969-12-31T23:59:59Z",
            "2026-11-23T2a:41:21Z",
        ] {
            assert_eq!(parse_ts(bad), None, "{bad}");
        }
    }

    #[test]
    fn severity_follows_the_verdict_and_trips_stand_out() {
        let ev = |kind, verdict| Event::new("a", 1, "sh", kind, verdict, Layer::Agentd);
        let cases = [
            (ev(Kind::OpenWrite, Verdict::Deny), Severity::Warning, 4, 13),
            (ev(Kind::Connect, Verdict::Killed), Severity::Warning, 4, 13),
            (ev(Kind::Exec, Verdict::Allow), Severity::Info, 6, 9),
            (ev(Kind::Start, Verdict::None), Severity::Notice, 5, 10),
            (ev(Kind::Breaker, Verdict::Killed), Severity::Alert, 1, 19),
            (ev(Kind::Canary, Verdict::Allow), Severity::Alert, 1, 19),
            (ev(Kind::LaunchFailed, Verdict::None), Severity::Err, 3, 17),
            (ev(Kind::Lost, Verdict::None), Severity::Warning, 4, 13),
        ];
        for (e, sev, code, otel) in cases {
            assert_eq!(Severity::of(&e), sev, "{e:?}");
            assert_eq!((sev.code(), sev.otel_number()), (code, otel));
        }
    }

    #[test]
    fn the_summary_is_the_readable_line_without_its_time() {
        let mut e = Event::new(
            "a-1",
            42,
            "sh",
            Kind::OpenWrite,
            Verdict::Deny,
            Layer::Landlock,
        );
        e.ts = "2026-11-23T21:41:21.362675057Z".into();
        e.path = Some("/etc/x".into());
        assert_eq!(
            summary(&e),
            "DENY   file_write    /etc/x  sh[42]  landlock  a-1"
        );
    }

    #[test]
    fn selections_take_what_they_list() {
        let e = Event::new("a", 1, "sh", Kind::Connect, Verdict::Deny, Layer::Bpf);
        assert!(Selection::default().takes(&e));
        let s = Selection {
            kinds: vec![parse_kind("net_connect").unwrap()],
            verdicts: vec![parse_verdict("deny").unwrap()],
        };
        assert!(s.takes(&e));
        let s = Selection {
            kinds: vec![],
            verdicts: vec![Verdict::Allow],
        };
        assert!(!s.takes(&e));
        assert!(
            parse_kind("connect")
                .unwrap_err()
                .contains("not an event kind")
        );
        assert!(parse_verdict("denied").is_err());
    }
}
