//! Events sent out of the daemon to what operators already run: syslog (RFC 5424,
//! [`syslog`]) and OpenTelemetry logs (OTLP/HTTP JSON, [`otlp`]). Each destination has a
//! thread of its own behind a bounded queue: a slow or absent receiver never makes the
//! daemon wait; what does not fit is dropped and counted. docs/export.md is the
//! operator's guide.

pub mod otlp;
pub mod syslog;

use std::{
    borrow::Cow,
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::TrySendError,
    },
    time::{Duration, Instant},
};

use serde_json::{Map, Value};

use crate::event::{Event, Kind, Verdict};

/// How long a destination's thread keeps trying one record (syslog) or one batch (OTLP)
/// before it counts it as failed and goes on with the next.
pub const GIVE_UP: Duration = Duration::from_secs(30);
/// The first wait after a failure; each further failure doubles it, up to [`BACKOFF_MAX`].
pub const BACKOFF_FIRST: Duration = Duration::from_millis(250);
pub const BACKOFF_MAX: Duration = Duration::from_secs(8);

/// Which events a destination takes: those that match every criterion given (empty lists
/// and no severity take every kind, verdict, severity).
///
/// Kinds and verdicts combine with AND, so together they cannot say "the refusals, and the
/// canaries and breaker trips whatever their verdict" (a canary the kernel let open is
/// `allow`, a trip in monitor mode and a failed launch `none`): the severity can, as
/// `warning` takes exactly those ([`Severity::of`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub kinds: Vec<Kind>,
    pub verdicts: Vec<Verdict>,
    /// Only events this grave or graver.
    pub severity: Option<Severity>,
}

impl Selection {
    pub fn takes(&self, ev: &Event) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&ev.kind))
            && (self.verdicts.is_empty() || self.verdicts.contains(&ev.verdict))
            && self
                .severity
                .is_none_or(|min| Severity::of(ev).at_least(min))
    }
}

/// Whose an event's agent is, sent with each of its records: a SIEM ties a refusal to a
/// person without looking for the agent's `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// Its owner, as `agentd ps` shows it: the user who launched it (for root under
    /// `sudo`, the user `SUDO_UID` names). Not the uid its processes run as, which a
    /// profile may make a transient one (the `start` event's `uid`).
    pub owner_uid: u32,
    /// The name of its profile.
    pub profile: String,
}

/// An event on its way to a destination, with whose agent it is (`None` for an event of
/// no agent the daemon registered: a daemon-wide `lost`, a launch that failed before the
/// daemon watched it).
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub event: Arc<Event>,
    pub agent: Option<Arc<AgentInfo>>,
}

/// User names looked up in a destination's own thread (NSS may ask a directory server:
/// never in the daemon's recording thread), and kept: at most [`NAMES_KEPT`] uids, then
/// looked up afresh.
#[derive(Debug, Default)]
pub(crate) struct UserNames(HashMap<u32, Option<String>>);

/// Bound of [`UserNames`].
const NAMES_KEPT: usize = 256;

impl UserNames {
    /// The name of user `uid`, when it has one.
    pub(crate) fn of(&mut self, uid: u32) -> Option<&str> {
        if !self.0.contains_key(&uid) && self.0.len() >= NAMES_KEPT {
            self.0.clear();
        }
        self.0
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .as_deref()
    }
}

/// An event kind as the events name it (`exec`, `file_write`, `breaker`...).
pub fn parse_kind(s: &str) -> Result<Kind, String> {
    let kind =
        |name: &str| serde_json::from_value::<Kind>(serde_json::Value::String(name.to_owned()));
    kind(s).map_err(|_| {
        // A name without its family (`connect` for `net_connect`) is the likely slip.
        let hint = KIND_FAMILIES
            .iter()
            .map(|family| format!("{family}{s}"))
            .find(|name| kind(name).is_ok())
            .map_or_else(String::new, |name| format!(" (did you mean `{name}`?)"));
        format!(
            "`{s}` is not an event kind{hint}: give the `kind` field of `agentd events --json`, \
             e.g. {}",
            KIND_EXAMPLES.join(", ")
        )
    })
}

/// The prefixes of the kinds' families: `net_connect`, `file_write`, `process_start`.
const KIND_FAMILIES: [&str; 3] = ["net_", "file_", "process_"];
/// Kinds [`parse_kind`]'s error names (a test parses each).
const KIND_EXAMPLES: [&str; 8] = [
    "exec",
    "net_connect",
    "file_write",
    "file_read",
    "process_start",
    "dns",
    "breaker",
    "canary",
];

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
    queue: std::sync::mpsc::SyncSender<Outgoing>,
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

    /// Whether no destination was given (the daemon then need not say whose an event is).
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    /// Offers `ev`, of the agent `agent` describes, to every destination that takes it;
    /// never waits.
    pub fn send(&self, ev: &Arc<Event>, agent: Option<AgentInfo>) {
        let agent = agent.map(Arc::new);
        for s in &self.sinks {
            if !s.selection.takes(ev) {
                continue;
            }
            let out = Outgoing {
                event: Arc::clone(ev),
                agent: agent.clone(),
            };
            let why = match s.queue.try_send(out) {
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
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
    /// Whether this is `min` or graver (alert is the gravest).
    pub fn at_least(self, min: Severity) -> bool {
        self.code() <= min.code()
    }

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

/// At most this many bytes of the agent id, `comm`, `proto` and `domain` go into a record
/// (they are short: a longer one is cut, see [`cut`]).
pub const SHORT_MAX: usize = 256;
/// At most this many bytes of the readable line (syslog's MSG, the OTLP body).
pub const MESSAGE_MAX: usize = 1024;

/// The event as one readable line, without its time (the records carry it in a field of
/// their own): `DENY   net_connect   127.0.0.1:8080/tcp  python3[42]  bpf EPERM  agent-1`.
/// What the agent chose (a path, a name) has its control and format characters escaped
/// (`\u{a}`, `\u{202e}`: [`crate::ask::printable`]): it cannot add lines to a log file,
/// act on a terminal, or reorder what a person reads. At most [`MESSAGE_MAX`] bytes.
pub fn summary(ev: &Event) -> String {
    let line = ev.line(false);
    let line = match line.split_once(' ') {
        Some((_, rest)) => rest,
        None => &line,
    };
    cut(&crate::ask::printable(line), MESSAGE_MAX, char::len_utf8).into_owned()
}

/// `s` in at most `max` bytes as `size` counts each character (its UTF-8 length, or more
/// where the text is escaped later): when longer, cut on a character boundary and marked
/// `…[+N]`, N being the bytes of `s` left out (the mark counts toward `max`).
pub fn cut(s: &str, max: usize, size: impl Fn(char) -> usize) -> Cow<'_, str> {
    if s.chars().map(&size).sum::<usize>() <= max {
        return Cow::Borrowed(s);
    }
    // Room for the longest mark `s` can need.
    let mark: usize = format!("…[+{}]", s.len()).chars().map(&size).sum();
    let room = max.saturating_sub(mark);
    let (mut used, mut end) = (0, 0);
    for (i, c) in s.char_indices() {
        used += size(c);
        if used > room {
            break;
        }
        end = i + c.len_utf8();
    }
    Cow::Owned(format!("{}…[+{}]", &s[..end], s.len() - end))
}

/// `v` with every string in it (object keys aside) cut to `max` bytes ([`cut`]).
pub fn cut_strings(v: &Value, max: usize) -> Value {
    match v {
        Value::String(s) => Value::String(cut(s, max, char::len_utf8).into_owned()),
        Value::Array(a) => Value::Array(a.iter().map(|v| cut_strings(v, max)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), cut_strings(v, max)))
                .collect(),
        ),
        Value::Null | Value::Bool(_) | Value::Number(_) => v.clone(),
    }
}

/// The entries of `detail` whose compact JSON fits in `max` bytes as `size` counts text,
/// in order; when some do not fit, `"truncated": N` says how many were left out.
pub fn detail_within(
    detail: &Map<String, Value>,
    max: usize,
    size: impl Fn(&str) -> usize,
) -> Map<String, Value> {
    if size(&Value::Object(detail.clone()).to_string()) <= max {
        return detail.clone();
    }
    let mut kept = Map::new();
    // The braces, and room for the `truncated` entry.
    let mut used = size(r#"{"truncated":18446744073709551615}"#);
    for (k, v) in detail {
        // The entry and the comma before the next one.
        let entry = size(&format!("{}:{v},", Value::String(k.clone())));
        if used + entry <= max {
            used += entry;
            kept.insert(k.clone(), v.clone());
        }
    }
    let left_out = detail.len() - kept.len();
    kept.insert("truncated".to_owned(), left_out.into());
    kept
}

/// An event's `ts` as seconds and nanoseconds since the Unix epoch; `None` unless it is
/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z` naming a time that exists (as
/// [`crate::event::rfc3339`] writes it; an event from an agent's supervisor carries the
/// supervisor's text).
pub fn parse_ts(ts: &str) -> Option<(u64, u32)> {
    let b = ts.as_bytes();
    let num = |from: usize, to: usize| -> Option<u32> {
        let digits = b.get(from..to)?;
        digits.iter().try_fold(0u32, |n, d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    let seps = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if seps.iter().any(|&(i, c)| b.get(i) != Some(&c)) || b.last() != Some(&b'Z') {
        return None;
    }
    let nanos = match b.get(19..b.len() - 1)? {
        [] => 0,
        [b'.', frac @ ..] if (1..=9).contains(&frac.len()) => {
            num(20, 20 + frac.len())? * 10u32.pow(9 - frac.len() as u32)
        }
        _ => return None,
    };
    // Strict: no February 31st, no leap second (this daemon's clock writes none).
    let secs = crate::ask::sign::unix_utc(
        num(0, 4)?,
        num(5, 7)?,
        num(8, 10)?,
        num(11, 13)?,
        num(14, 16)?,
        num(17, 19)?,
    )?;
    Some((secs, nanos))
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
        assert_eq!(parse_ts("2024-02-29T00:00:00Z"), Some((1_709_164_800, 0)));
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
            "2026-02-31T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2100-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-11-23T24:00:00Z",
            "2026-11-23T21:41:60Z",
            "2026-11-23T21:41:21.+5Z",
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
    fn the_summary_escapes_what_the_agent_chose() {
        let mut e = Event::new(
            "a-1",
            42,
            "sh\x1b[2J",
            Kind::Rename,
            Verdict::Deny,
            Layer::Landlock,
        );
        e.path = Some("/tmp/a\nFAKE LINE\x1b[31m]\"\\x\u{202e}txt.exe".into());
        e.path2 = Some("/tmp/\u{200b}b\r\u{7f}".into());
        let s = summary(&e);
        assert_eq!(
            s,
            "DENY   file_rename   /tmp/a\\u{a}FAKE LINE\\u{1b}[31m]\"\\x\\u{202e}txt.exe -> \
             /tmp/\\u{200b}b\\u{d}\\u{7f}  sh\\u{1b}[2J[42]  landlock  a-1"
        );
        assert!(
            !s.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{s:?}"
        );
    }

    #[test]
    fn long_text_is_cut_on_a_char_boundary_and_marked() {
        assert_eq!(cut("short", 10, char::len_utf8), "short");
        let long = "é".repeat(100);
        let c = cut(&long, 50, char::len_utf8);
        assert!(c.len() <= 50, "{c}");
        let (kept, mark) = c.split_once('…').unwrap();
        assert_eq!(
            format!("…{mark}"),
            format!("…[+{}]", long.len() - kept.len())
        );
        assert!(kept.chars().all(|ch| ch == 'é') && !kept.is_empty());
        // Sizes as escaping counts them: a `"` takes two.
        let quotes = "\"".repeat(40);
        let esc = |ch: char| ch.len_utf8() + usize::from(ch == '"');
        let c = cut(&quotes, 40, esc);
        assert!(c.chars().map(esc).sum::<usize>() <= 40, "{c}");
        assert!(
            c.ends_with(&format!("[+{}]", 40 - c.matches('"').count())),
            "{c}"
        );
        // Too little room for any of it: the mark alone.
        assert_eq!(cut(&long, 3, char::len_utf8), "…[+200]");
        assert_eq!(
            cut_strings(&serde_json::json!({"k": ["abcdefghijklmnop", 1]}), 12),
            serde_json::json!({"k": ["abcd…[+12]", 1]})
        );
    }

    #[test]
    fn a_large_detail_keeps_whole_entries_and_says_how_many_went() {
        let mut detail = Map::new();
        for i in 0..100 {
            detail.insert(format!("k{i:03}"), Value::String("v".repeat(40)));
        }
        assert_eq!(detail_within(&detail, 1 << 20, str::len), detail);
        let kept = detail_within(&detail, 2048, str::len);
        let json = Value::Object(kept.clone()).to_string();
        assert!(json.len() <= 2048, "{}", json.len());
        let n = kept.len() - 1;
        assert!(n > 30, "{n}");
        assert_eq!(kept["truncated"], 100 - n as u64);
    }

    #[test]
    fn selections_take_what_they_list() {
        let e = Event::new("a", 1, "sh", Kind::Connect, Verdict::Deny, Layer::Bpf);
        assert!(Selection::default().takes(&e));
        let s = Selection {
            kinds: vec![parse_kind("net_connect").unwrap()],
            verdicts: vec![parse_verdict("deny").unwrap()],
            severity: None,
        };
        assert!(s.takes(&e));
        let s = Selection {
            verdicts: vec![Verdict::Allow],
            ..Selection::default()
        };
        assert!(!s.takes(&e));
        assert!(
            parse_kind("connect")
                .unwrap_err()
                .contains("not an event kind")
        );
        assert!(parse_verdict("denied").is_err());
    }

    #[test]
    fn a_kind_refused_names_real_kinds() {
        for name in KIND_EXAMPLES {
            assert!(parse_kind(name).is_ok(), "{name}");
        }
        let e = parse_kind("connect").unwrap_err();
        assert!(e.contains("did you mean `net_connect`?"), "{e}");
        assert!(e.contains("e.g. exec, net_connect, file_write"), "{e}");
        assert!(parse_kind("write").unwrap_err().contains("`file_write`?"));
        assert!(parse_kind("start").is_ok(), "a kind of its own");
        let e = parse_kind("nonsense").unwrap_err();
        assert!(!e.contains("did you mean"), "{e}");
    }

    /// What a SIEM wants (refusals, trips, canaries, failed launches, lost events, whatever
    /// their verdict) is `warning` and graver; kinds AND verdicts cannot say it.
    #[test]
    fn a_severity_takes_the_refusals_and_the_alerts_whatever_their_verdict() {
        let ev = |kind, verdict| Event::new("a", 1, "sh", kind, verdict, Layer::Agentd);
        let warning = Selection {
            severity: Some(Severity::Warning),
            ..Selection::default()
        };
        let refusals = Selection {
            verdicts: vec![Verdict::Deny, Verdict::Killed],
            ..Selection::default()
        };
        for (e, siem_wants) in [
            (ev(Kind::OpenWrite, Verdict::Deny), true),
            (ev(Kind::Connect, Verdict::Killed), true),
            (ev(Kind::Canary, Verdict::Allow), true),
            (ev(Kind::Canary, Verdict::Deny), true),
            (ev(Kind::Breaker, Verdict::None), true),
            (ev(Kind::Breaker, Verdict::Killed), true),
            (ev(Kind::LaunchFailed, Verdict::None), true),
            (ev(Kind::Lost, Verdict::None), true),
            (ev(Kind::Exec, Verdict::Allow), false),
            (ev(Kind::Start, Verdict::None), false),
            (ev(Kind::Exit, Verdict::None), false),
        ] {
            assert_eq!(warning.takes(&e), siem_wants, "{e:?}");
        }
        // The verdicts alone leave out the canary the kernel let open, a trip in monitor
        // mode, a failed launch.
        assert!(!refusals.takes(&ev(Kind::Canary, Verdict::Allow)));
        assert!(!refusals.takes(&ev(Kind::Breaker, Verdict::None)));
        assert!(!refusals.takes(&ev(Kind::LaunchFailed, Verdict::None)));
        // Criteria combine: breaker records that killed, at alert.
        let s = Selection {
            kinds: vec![Kind::Breaker],
            verdicts: vec![Verdict::Killed],
            severity: Some(Severity::Alert),
        };
        assert!(s.takes(&ev(Kind::Breaker, Verdict::Killed)));
        assert!(!s.takes(&ev(Kind::Breaker, Verdict::None)));
        assert!(!s.takes(&ev(Kind::Canary, Verdict::Deny)));
        assert!(Severity::Alert.at_least(Severity::Info));
        assert!(Severity::Warning.at_least(Severity::Warning));
        assert!(!Severity::Notice.at_least(Severity::Warning));
    }

    #[test]
    fn user_names_are_looked_up_and_kept() {
        let mut names = UserNames::default();
        assert_eq!(names.of(0), Some("root"));
        // No user has this uid (the kernel's invalid uid).
        assert_eq!(names.of(u32::MAX), None);
        assert_eq!(names.0.len(), 2);
        for uid in 0..NAMES_KEPT as u32 + 10 {
            names.of(4_000_000_000 + uid);
        }
        assert!(names.0.len() <= NAMES_KEPT);
    }
}
