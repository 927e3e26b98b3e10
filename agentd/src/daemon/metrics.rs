//! Prometheus metrics (`agentd daemon --metrics`): the classic text exposition format
//! (0.0.4) at GET /metrics, which every Prometheus scrapes and `promtool check metrics`
//! reads. Counters and histograms are fed as events are recorded ([`Metrics::event`]) and
//! as the audit log is appended to and made durable; gauges (agents, pending approvals,
//! the per-agent lost counts) are read from the daemon's state at each scrape. The
//! metrics and their labels are listed in docs/metrics.md.
//!
//! Every label takes values from a bounded set: the event enums, the agents' states, the
//! export destinations, breaker rules up to [`MAX_RULES`] besides agentd's own (the rest
//! are `other`), and agent ids only for the agents running at the scrape (an ended agent's
//! series goes with it; `agentd_lost_events_total` keeps its count). The series of a fixed
//! set of labels exist from the start, at 0: `increase()` sees their first count (a series
//! born at 1 has no earlier sample to increase from).
//!
//! What counts as an event and as a denial is [`counted`]: the same for `agentd ps`,
//! `agentd stats`, the web view and these metrics.

use std::{
    collections::HashSet,
    fmt,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    Extension,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse as _, Response},
};
use prometheus_client::{
    encoding::{EncodeLabelSet, LabelSetEncoder, prometheus_text},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, info::Info},
    registry::{Registry, Unit},
};

use super::{Shared, lock, outputs::Listening, proto::AgentState};
use crate::event::{Event, Kind, Layer, Verdict};

/// Distinct breaker rules counted by name besides [`fixed_rules`]; later ones are counted
/// as `other`. Rules are written in profiles (`trip_on:KIND`, `threshold:N/WINDOW`) or are
/// agentd's own (`manual`, `kernel`, `on_event_loss:kill`).
pub(super) const MAX_RULES: usize = 32;
/// How many [`fixed_rules`] there are: ten violation kinds, and agentd's three.
const FIXED_RULES: usize = 13;

/// The rules whose names no profile chooses: every `trip_on:KIND`, and agentd's own. Their
/// series exist from the start; only `threshold:N/WINDOW` rules are born at their first
/// trip.
fn fixed_rules() -> Vec<String> {
    use crate::profile::ViolationKind as V;
    // Exhaustive: a new violation kind does not compile until it is placed here.
    let next = |v: Option<V>| match v {
        None => Some(V::Canary),
        Some(V::Canary) => Some(V::Exec),
        Some(V::Exec) => Some(V::Connect),
        Some(V::Connect) => Some(V::Bind),
        Some(V::Bind) => Some(V::Write),
        Some(V::Write) => Some(V::Read),
        Some(V::Read) => Some(V::Socket),
        Some(V::Socket) => Some(V::Syscall),
        Some(V::Syscall) => Some(V::Dns),
        Some(V::Dns) => Some(V::Denied),
        Some(V::Denied) => None,
    };
    std::iter::successors(next(None), |v| next(Some(*v)))
        .map(|v| format!("trip_on:{}", v.as_str()))
        .chain(
            ["manual", "kernel", crate::breaker::ON_EVENT_LOSS_RULE]
                .into_iter()
                .map(str::to_owned),
        )
        .collect()
}

/// What one recorded event counts for: in `agentd ps` (its agent's EVENTS and DENIALS),
/// `agentd stats`, the web view and `agentd_events_total` alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counted {
    /// Events: 1, or for a burst's summary record the `repeated` refusals it stands for
    /// (its first was recorded, and counted, on its own). A breaker record is an event.
    pub events: u64,
    /// Of those, the ones with verdict `deny` or `killed` (a breaker record that killed,
    /// or denied, among them).
    pub denials: u64,
}

/// What `ev` counts for ([`Counted`]).
pub(super) fn counted(ev: &Event) -> Counted {
    let events = ev
        .detail
        .get("repeated")
        .and_then(serde_json::Value::as_u64)
        .filter(|&n| n > 0)
        .unwrap_or(1);
    let denials = match ev.verdict {
        Verdict::Deny | Verdict::Killed => events,
        Verdict::Allow | Verdict::None => 0,
    };
    Counted { events, denials }
}

/// Containment (violating call or kill request to a contained agent): the breaker's
/// headline figure is in milliseconds.
const CONTAINMENT_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// A person's answer: seconds to an hour.
const APPROVAL_BUCKETS: [f64; 12] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];
/// From a record's append to the `fdatasync` that made it durable.
const DURABILITY_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// The daemon's metrics: counters fed by every recorded event and audit record, gauges
/// read at scrape time ([`Snapshot`]).
#[derive(Debug)]
pub(super) struct Metrics {
    registry: Registry,
    events: Family<EventLabels, Counter>,
    dns: Family<VerdictLabel, Counter>,
    trips: Family<RuleLabel, Counter>,
    /// The rules counted by name so far: [`fixed_rules`] and at most [`MAX_RULES`] more.
    rules: Mutex<HashSet<String>>,
    containment: Family<ByLabel, Histogram, fn() -> Histogram>,
    approval_wait: Family<VerdictLabel, Histogram, fn() -> Histogram>,
    audit_records: Family<AuditLabel, Counter>,
    audit_errors: Family<AuditOpLabel, Counter>,
    durability_lag: Histogram,
    /// When the oldest record not yet made durable was appended.
    unsynced_since: Mutex<Option<Instant>>,
}

/// An audit record, by what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum AuditRecord {
    Event,
    Control,
}

/// What failed on the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum AuditOp {
    Append,
    Sync,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("agentd");
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "events",
            "Events recorded, by kind, verdict and deciding layer (identical refusals folded into one record count each)",
            events.clone(),
        );
        let dns = Family::<VerdictLabel, Counter>::default();
        registry.register(
            "dns_queries",
            "DNS queries of the agents answered by agentd's resolver, by verdict",
            dns.clone(),
        );
        let trips = Family::<RuleLabel, Counter>::default();
        registry.register(
            "breaker_trips",
            format!("Circuit breaker trips and kill switch uses, by rule (rules past the first {MAX_RULES} are `other`)"),
            trips.clone(),
        );
        let containment: Family<ByLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(CONTAINMENT_BUCKETS));
        registry.register_with_unit(
            "containment",
            "Time from a breaker's violating call, or a kill switch request, to the agent contained (cgroup.kill written, kill flag set)",
            Unit::Seconds,
            containment.clone(),
        );
        let approval_wait: Family<VerdictLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(APPROVAL_BUCKETS));
        registry.register_with_unit(
            "approval_wait",
            "Time a held call waited for its answer (a person's, or the denial at its timeout), by the answer",
            Unit::Seconds,
            approval_wait.clone(),
        );
        let audit_records = Family::<AuditLabel, Counter>::default();
        registry.register(
            "audit_records",
            "Records this daemon appended to the audit log, by type (event or control)",
            audit_records.clone(),
        );
        let audit_errors = Family::<AuditOpLabel, Counter>::default();
        registry.register(
            "audit_errors",
            "Audit log operations that failed (append or sync); the daemon's log says why",
            audit_errors.clone(),
        );
        let durability_lag = Histogram::new(DURABILITY_BUCKETS);
        registry.register_with_unit(
            "audit_durability_lag",
            "Per group commit: time from the oldest record's append to the fdatasync that made it durable",
            Unit::Seconds,
            durability_lag.clone(),
        );
        registry.register(
            "build",
            "The agentd that serves these metrics",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        // Every series of a fixed label set, at 0 from the start (`drop`: the guard the
        // family returns is not needed).
        for verdict in [Verdict::Allow, Verdict::Deny] {
            drop(dns.get_or_create(&VerdictLabel(verdict)));
            drop(approval_wait.get_or_create(&VerdictLabel(verdict)));
        }
        for by in ["breaker", "kill_switch"] {
            drop(containment.get_or_create(&ByLabel(by)));
        }
        for record in [AuditRecord::Event, AuditRecord::Control] {
            drop(audit_records.get_or_create(&AuditLabel(record)));
        }
        for op in [AuditOp::Append, AuditOp::Sync] {
            drop(audit_errors.get_or_create(&AuditOpLabel(op)));
        }
        let rules = fixed_rules();
        for rule in &rules {
            drop(trips.get_or_create(&RuleLabel(rule.clone())));
        }
        Metrics {
            registry,
            events,
            dns,
            trips,
            rules: Mutex::new(rules.into_iter().collect()),
            containment,
            approval_wait,
            audit_records,
            audit_errors,
            durability_lag,
            unsynced_since: Mutex::new(None),
        }
    }
}

impl Metrics {
    /// Counts one recorded event.
    pub fn event(&self, ev: &Event) {
        let n = counted(ev).events;
        let labels = EventLabels {
            kind: ev.kind,
            verdict: ev.verdict,
            layer: ev.layer,
        };
        self.events.get_or_create(&labels).inc_by(n);
        let detail_u64 = |key: &str| ev.detail.get(key).and_then(serde_json::Value::as_u64);
        if ev.kind == Kind::Dns {
            self.dns.get_or_create(&VerdictLabel(ev.verdict)).inc_by(n);
        } else if ev.kind == Kind::Breaker {
            let rule = ev.detail.get("rule").and_then(serde_json::Value::as_str);
            let rule = self.rule_label(rule.unwrap_or("unknown"));
            if let Some(ns) = detail_u64("contain_ns") {
                let by = if rule == "manual" {
                    "kill_switch"
                } else {
                    "breaker"
                };
                self.containment
                    .get_or_create(&ByLabel(by))
                    .observe(ns as f64 / 1e9);
            }
            self.trips.get_or_create(&RuleLabel(rule)).inc();
        } else if ev.kind == Kind::Approval
            && let Some(ms) = detail_u64("waited_ms")
        {
            self.approval_wait
                .get_or_create(&VerdictLabel(ev.verdict))
                .observe(ms as f64 / 1e3);
        }
    }

    /// `rule` as a label value: itself while fewer than [`MAX_RULES`] rules besides
    /// [`fixed_rules`] were seen.
    fn rule_label(&self, rule: &str) -> String {
        let mut seen = lock(&self.rules);
        if seen.contains(rule) {
            return rule.to_owned();
        }
        if seen.len() < FIXED_RULES + MAX_RULES {
            seen.insert(rule.to_owned());
            return rule.to_owned();
        }
        "other".to_owned()
    }

    /// One record was appended to the audit log. Called with the log's lock held, so that
    /// [`Metrics::take_unsynced`] sees exactly the records the sync it goes with covers.
    pub fn audit_appended(&self, record: AuditRecord) {
        self.audit_records.get_or_create(&AuditLabel(record)).inc();
        lock(&self.unsynced_since).get_or_insert_with(Instant::now);
    }

    /// An audit log operation failed.
    pub fn audit_failed(&self, op: AuditOp) {
        self.audit_errors.get_or_create(&AuditOpLabel(op)).inc();
    }

    /// When the oldest record not yet made durable was appended (taken: the caller is
    /// about to sync). Called with the log's lock held.
    pub fn take_unsynced(&self) -> Option<Instant> {
        lock(&self.unsynced_since).take()
    }

    /// An `fdatasync` just made durable what was appended since `appended`.
    pub fn audit_durable(&self, appended: Option<Instant>) {
        if let Some(t) = appended {
            self.durability_lag.observe(t.elapsed().as_secs_f64());
        }
    }

    /// The exposition text: what was counted, then `snapshot`'s gauges and counters.
    pub fn render(&self, snapshot: &Snapshot) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_text::encode(&mut text, &snapshot.registry())?;
        prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// What a scrape reads from the daemon's state.
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    /// Agents running now, by state ([`state_slot`]).
    agents: [u64; 3],
    /// Agents started (or taken over) since the daemon started.
    agents_started: u64,
    /// Agents that ended since the daemon started: exited, tripped ([`ENDED`]).
    agents_ended: [u64; 2],
    /// Events the kernel could not report, of each running agent.
    lost_by_agent: Vec<(String, u64)>,
    /// Events the kernel could not report, of every agent since the daemon started.
    lost: u64,
    pending_approvals: u64,
    export: Vec<crate::export::SinkCounts>,
    /// When the daemon started, in Unix seconds.
    start_time: f64,
}

/// The index of a running agent's `state` in [`Snapshot::agents`], and its label value;
/// `None` for `exited`, which no running agent is (an ended one counts in
/// `agentd_agents_ended_total`).
fn state_slot(state: AgentState) -> Option<(usize, &'static str)> {
    match state {
        AgentState::Starting => Some((0, "starting")),
        AgentState::Running => Some((1, "running")),
        AgentState::Tripped => Some((2, "tripped")),
        AgentState::Exited => None,
    }
}

const STATES: [AgentState; 3] = [
    AgentState::Starting,
    AgentState::Running,
    AgentState::Tripped,
];

/// How an agent ended, as [`Snapshot::agents_ended`] counts it: `exited` (on its own),
/// `tripped` (the breaker or the kill switch killed it).
const ENDED: [&str; 2] = ["exited", "tripped"];

impl Snapshot {
    /// Reads the daemon's state now.
    fn of(shared: &Shared) -> Snapshot {
        let mut s = Snapshot::default();
        for a in lock(&shared.agents).values() {
            if let Some((slot, _)) = state_slot(a.state) {
                s.agents[slot] += 1;
            }
            s.lost_by_agent.push((a.id.clone(), a.lost));
        }
        {
            let c = lock(&shared.counters);
            s.agents_started = c.agents_total;
            s.agents_ended = [c.agents_exited, c.agents_tripped];
            s.lost = c.lost;
        }
        s.pending_approvals = shared.asking.board.pending_count() as u64;
        s.export = shared.export.counts();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        s.start_time = now.saturating_sub(shared.started.elapsed()).as_secs_f64();
        s
    }

    /// The snapshot as metrics.
    fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("agentd");
        let agents = Family::<[(&str, &str); 1], Gauge>::default();
        for (slot, name) in STATES.into_iter().filter_map(state_slot) {
            let n = i64::try_from(self.agents[slot]).unwrap_or(i64::MAX);
            agents.get_or_create(&[("state", name)]).set(n);
        }
        r.register(
            "agents",
            "Agents running now, by state (tripped: being killed by the breaker or the kill switch)",
            agents,
        );
        let started = Counter::<u64>::default();
        started.inc_by(self.agents_started);
        r.register(
            "agents_started",
            "Agents launched or taken over since the daemon started",
            started,
        );
        let ended = Family::<[(&str, &str); 1], Counter>::default();
        for (how, n) in ENDED.into_iter().zip(self.agents_ended) {
            ended.get_or_create(&[("how", how)]).inc_by(n);
        }
        r.register(
            "agents_ended",
            "Agents that ended since the daemon started, by how: exited (on their own), tripped (killed by the breaker or the kill switch)",
            ended,
        );
        let by_agent = Family::<[(&str, String); 1], Counter>::default();
        for (id, n) in &self.lost_by_agent {
            by_agent.get_or_create(&[("agent", id.clone())]).inc_by(*n);
        }
        r.register(
            "agent_lost_events",
            "Events of a running agent the kernel could not report (the series ends with the agent)",
            by_agent,
        );
        let lost = Counter::<u64>::default();
        lost.inc_by(self.lost);
        r.register(
            "lost_events",
            "Events of every agent the kernel could not report, since the daemon started",
            lost,
        );
        let pending = Gauge::<i64>::default();
        pending.set(i64::try_from(self.pending_approvals).unwrap_or(i64::MAX));
        r.register(
            "approvals_pending",
            "Held calls waiting for a person's answer",
            pending,
        );
        let export = Family::<[(&str, &str); 2], Counter>::default();
        for c in &self.export {
            for (outcome, n) in [
                ("sent", c.sent),
                ("dropped", c.dropped),
                ("failed", c.failed),
            ] {
                export
                    .get_or_create(&[("destination", c.name), ("outcome", outcome)])
                    .inc_by(n);
            }
        }
        r.register(
            "export_events",
            "Events for --syslog and --otlp, by destination and outcome (sent; dropped: the queue was full; failed: retries ran out)",
            export,
        );
        let start = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        start.set(self.start_time);
        r.register_with_unit(
            "start_time",
            "When the daemon started, in seconds since the Unix epoch",
            Unit::Seconds,
            start,
        );
        r
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct EventLabels {
    kind: Kind,
    verdict: Verdict,
    layer: Layer,
}

impl EncodeLabelSet for EventLabels {
    fn encode(&self, e: &mut LabelSetEncoder) -> fmt::Result {
        [
            ("kind", self.kind.name().as_str()),
            ("verdict", self.verdict.name()),
            ("layer", self.layer.name().as_str()),
        ]
        .encode(e)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct VerdictLabel(Verdict);

impl EncodeLabelSet for VerdictLabel {
    fn encode(&self, e: &mut LabelSetEncoder) -> fmt::Result {
        [("verdict", self.0.name())].encode(e)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RuleLabel(String);

impl EncodeLabelSet for RuleLabel {
    fn encode(&self, e: &mut LabelSetEncoder) -> fmt::Result {
        [("rule", self.0.as_str())].encode(e)
    }
}

/// What contained the agent: `breaker` or `kill_switch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ByLabel(&'static str);

impl EncodeLabelSet for ByLabel {
    fn encode(&self, e: &mut LabelSetEncoder) -> fmt::Result {
        [("by", self.0)].encode(e)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct AuditLabel(AuditRecord);

impl EncodeLabelSet for AuditLabel {
    fn encode(&self, e: &mut LabelSetEncoder) -> fmt::Result {
        let t = match self.0 {
            AuditRecord::Event => "event",
            AuditRecord::Control => "control",
        };
        [("type", t)].encode(e)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct AuditOpLabel(AuditOp);

impl EncodeLabelSet for AuditOpLabel {
    fn encode(&self, e: &mut LabelSetEncoder) -> fmt::Result {
        let op = match self.0 {
            AuditOp::Append => "append",
            AuditOp::Sync => "sync",
        };
        [("op", op)].encode(e)
    }
}

/// The /metrics endpoint (GET; HEAD too).
pub(super) fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(shared)
}

async fn scrape(
    State(shared): State<Arc<Shared>>,
    listening: Option<Extension<Listening>>,
    headers: HeaderMap,
) -> Response {
    // On TCP, a page in a browser could reach the endpoint under a name of its own site
    // made to resolve here (DNS rebinding): its Host gives it away. Prometheus sends the
    // target's address.
    if let Some(Extension(Listening(bound))) = listening {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !super::web::auth::host_allowed(bound, host) {
            return (
                StatusCode::FORBIDDEN,
                format!(
                    "metrics: refused a request for Host `{}`: scrape the address --metrics \
                     listens on ({bound}), or localhost:{} when that is loopback\n",
                    crate::ask::printable(host),
                    bound.port()
                ),
            )
                .into_response();
        }
    }
    let snapshot = Snapshot::of(&shared);
    match shared.metrics.render(&snapshot) {
        Ok(text) => (
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(fmt::Error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics: encoding the exposition text failed\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: Kind, verdict: Verdict, layer: Layer) -> Event {
        Event::new("a1", 7, "sh", kind, verdict, layer)
    }

    /// The value of the sample `series` (name and labels, as written) in `text`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    fn rendered(m: &Metrics, s: &Snapshot) -> String {
        m.render(s).unwrap()
    }

    #[test]
    fn events_are_counted_by_kind_verdict_and_layer_and_bursts_by_their_size() {
        let m = Metrics::default();
        m.event(&ev(Kind::OpenWrite, Verdict::Deny, Layer::Landlock));
        m.event(&ev(Kind::OpenWrite, Verdict::Deny, Layer::Landlock).with("repeated", 4));
        m.event(&ev(Kind::Connect, Verdict::Deny, Layer::Bpf));
        m.event(&ev(Kind::Exec, Verdict::Allow, Layer::Kernel));
        m.event(&ev(Kind::Exec, Verdict::Deny, Layer::BpfLsm));
        let t = rendered(&m, &Snapshot::default());
        assert!(t.contains("# TYPE agentd_events_total counter\n"), "{t}");
        assert!(
            t.contains("# HELP agentd_events_total Events recorded"),
            "{t}"
        );
        let series =
            |k, v, l| format!("agentd_events_total{{kind=\"{k}\",verdict=\"{v}\",layer=\"{l}\"}}");
        assert_eq!(
            sample(&t, &series("file_write", "deny", "landlock")),
            Some(5.0)
        );
        assert_eq!(sample(&t, &series("net_connect", "deny", "bpf")), Some(1.0));
        assert_eq!(sample(&t, &series("exec", "allow", "kernel")), Some(1.0));
        assert_eq!(sample(&t, &series("exec", "deny", "bpf-lsm")), Some(1.0));
    }

    #[test]
    fn dns_trips_containment_and_approval_wait() {
        let m = Metrics::default();
        let mut q = ev(Kind::Dns, Verdict::Deny, Layer::Resolver);
        q.domain = Some("other.test".into());
        m.event(&q);
        m.event(&ev(Kind::Dns, Verdict::Allow, Layer::Resolver));
        m.event(
            &ev(Kind::Breaker, Verdict::Killed, Layer::Agentd)
                .with("rule", "trip_on:canary")
                .with("contain_ns", 2_000_000u64),
        );
        m.event(
            &crate::run::kernel::manual_kill_event("a1", 7, "test", 40_000_000).with("by_uid", 0),
        );
        m.event(
            &ev(Kind::Approval, Verdict::Allow, Layer::Ask)
                .with("waited_ms", 3_000u64)
                .with("request", "r1"),
        );
        // A process of the agent answering itself: a denial that waited for nothing.
        m.event(&ev(Kind::Approval, Verdict::Deny, Layer::Ask));
        let t = rendered(&m, &Snapshot::default());
        assert_eq!(
            sample(&t, "agentd_dns_queries_total{verdict=\"deny\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "agentd_dns_queries_total{verdict=\"allow\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "agentd_breaker_trips_total{rule=\"trip_on:canary\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "agentd_breaker_trips_total{rule=\"manual\"}"),
            Some(1.0)
        );
        assert!(
            t.contains("# TYPE agentd_containment_seconds histogram\n"),
            "{t}"
        );
        assert_eq!(
            sample(
                &t,
                "agentd_containment_seconds_bucket{by=\"breaker\",le=\"0.0025\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &t,
                "agentd_containment_seconds_bucket{by=\"breaker\",le=\"0.001\"}"
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(&t, "agentd_containment_seconds_sum{by=\"kill_switch\"}"),
            Some(0.04)
        );
        assert_eq!(
            sample(&t, "agentd_approval_wait_seconds_count{verdict=\"allow\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "agentd_approval_wait_seconds_sum{verdict=\"allow\"}"),
            Some(3.0)
        );
        assert_eq!(
            sample(&t, "agentd_approval_wait_seconds_count{verdict=\"deny\"}"),
            Some(0.0)
        );
    }

    /// Every series of a fixed label set is there from the start, at 0: an alert on
    /// `increase(agentd_audit_errors_total[5m]) > 0` sees the first error.
    #[test]
    fn a_fresh_daemon_has_every_fixed_series_at_zero() {
        let t = rendered(&Metrics::default(), &Snapshot::default());
        let mut zero = vec![
            "agentd_audit_errors_total{op=\"append\"}".to_owned(),
            "agentd_audit_errors_total{op=\"sync\"}".to_owned(),
            "agentd_audit_records_total{type=\"event\"}".to_owned(),
            "agentd_audit_records_total{type=\"control\"}".to_owned(),
            "agentd_dns_queries_total{verdict=\"allow\"}".to_owned(),
            "agentd_dns_queries_total{verdict=\"deny\"}".to_owned(),
            "agentd_approval_wait_seconds_count{verdict=\"allow\"}".to_owned(),
            "agentd_approval_wait_seconds_count{verdict=\"deny\"}".to_owned(),
            "agentd_approval_wait_seconds_bucket{verdict=\"deny\",le=\"+Inf\"}".to_owned(),
            "agentd_containment_seconds_count{by=\"breaker\"}".to_owned(),
            "agentd_containment_seconds_count{by=\"kill_switch\"}".to_owned(),
            "agentd_agents{state=\"starting\"}".to_owned(),
            "agentd_agents{state=\"running\"}".to_owned(),
            "agentd_agents{state=\"tripped\"}".to_owned(),
            "agentd_agents_ended_total{how=\"exited\"}".to_owned(),
            "agentd_agents_ended_total{how=\"tripped\"}".to_owned(),
            "agentd_agents_started_total".to_owned(),
            "agentd_lost_events_total".to_owned(),
            "agentd_approvals_pending".to_owned(),
        ];
        let rules = fixed_rules();
        assert_eq!(rules.len(), FIXED_RULES);
        for rule in [
            "trip_on:canary",
            "trip_on:denied",
            "manual",
            "kernel",
            "on_event_loss:kill",
        ] {
            assert!(rules.iter().any(|r| r == rule), "{rule}: {rules:?}");
        }
        zero.extend(
            rules
                .iter()
                .map(|r| format!("agentd_breaker_trips_total{{rule=\"{r}\"}}")),
        );
        for series in &zero {
            assert_eq!(sample(&t, series), Some(0.0), "{series}:\n{t}");
        }
        // `exited` is no running agent's state.
        assert!(!t.contains("state=\"exited\""), "{t}");
        check_exposition(&t).unwrap_or_else(|e| panic!("{e}\n{t}"));
    }

    #[test]
    fn an_event_counts_once_a_burst_for_its_repeats_and_denials_by_verdict() {
        let c = |e: &Event| {
            let n = counted(e);
            (n.events, n.denials)
        };
        assert_eq!(c(&ev(Kind::Exec, Verdict::Allow, Layer::Kernel)), (1, 0));
        assert_eq!(c(&ev(Kind::Start, Verdict::None, Layer::Agentd)), (1, 0));
        assert_eq!(
            c(&ev(Kind::OpenWrite, Verdict::Deny, Layer::Landlock)),
            (1, 1)
        );
        assert_eq!(
            c(&ev(Kind::OpenWrite, Verdict::Deny, Layer::Landlock).with("repeated", 4)),
            (4, 4)
        );
        // The breaker's record is an event; one that killed, a denial.
        assert_eq!(
            c(&crate::run::kernel::manual_kill_event("a1", 7, "test", 1)),
            (1, 1)
        );
        assert_eq!(c(&ev(Kind::Breaker, Verdict::None, Layer::Agentd)), (1, 0));
    }

    #[test]
    fn breaker_rules_past_the_cap_are_other() {
        let m = Metrics::default();
        for i in 0..MAX_RULES + 5 {
            m.event(
                &ev(Kind::Breaker, Verdict::Deny, Layer::Agentd)
                    .with("rule", format!("threshold:{i}/1s")),
            );
        }
        m.event(&ev(Kind::Breaker, Verdict::Deny, Layer::Agentd).with("rule", "threshold:0/1s"));
        let t = rendered(&m, &Snapshot::default());
        let series = t
            .lines()
            .filter(|l| l.starts_with("agentd_breaker_trips_total{"))
            .count();
        assert_eq!(series, FIXED_RULES + MAX_RULES + 1, "{t}");
        // agentd's own rules are counted by name past the cap.
        m.event(&ev(Kind::Breaker, Verdict::Killed, Layer::Agentd).with("rule", "kernel"));
        let t = rendered(&m, &Snapshot::default());
        assert_eq!(
            sample(&t, "agentd_breaker_trips_total{rule=\"kernel\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "agentd_breaker_trips_total{rule=\"other\"}"),
            Some(5.0)
        );
        assert_eq!(
            sample(&t, "agentd_breaker_trips_total{rule=\"threshold:0/1s\"}"),
            Some(2.0)
        );
    }

    #[test]
    fn audit_records_and_their_durability_lag() {
        let m = Metrics::default();
        assert_eq!(m.take_unsynced(), None);
        m.audit_appended(AuditRecord::Event);
        m.audit_appended(AuditRecord::Event);
        m.audit_appended(AuditRecord::Control);
        let since = m.take_unsynced();
        assert!(since.is_some());
        assert_eq!(m.take_unsynced(), None);
        m.audit_durable(since);
        // Nothing appended since: a sync observes nothing.
        m.audit_durable(m.take_unsynced());
        m.audit_failed(AuditOp::Sync);
        let t = rendered(&m, &Snapshot::default());
        assert_eq!(
            sample(&t, "agentd_audit_records_total{type=\"event\"}"),
            Some(2.0)
        );
        assert_eq!(
            sample(&t, "agentd_audit_records_total{type=\"control\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "agentd_audit_durability_lag_seconds_count"),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "agentd_audit_errors_total{op=\"sync\"}"),
            Some(1.0)
        );
    }

    #[test]
    fn the_scraped_state_agents_lost_events_approvals_and_exports() {
        let m = Metrics::default();
        let mut s = Snapshot {
            agents_started: 5,
            agents_ended: [2, 1],
            lost_by_agent: vec![("a1".into(), 3), ("a2".into(), 0)],
            lost: 10,
            pending_approvals: 2,
            export: vec![crate::export::SinkCounts {
                name: "syslog",
                sent: 4,
                dropped: 1,
                failed: 0,
            }],
            start_time: 1_700_000_000.5,
            ..Snapshot::default()
        };
        s.agents[state_slot(AgentState::Running).unwrap().0] = 2;
        s.agents[state_slot(AgentState::Tripped).unwrap().0] = 1;
        let t = rendered(&m, &s);
        assert!(t.contains("# TYPE agentd_agents gauge\n"), "{t}");
        for (state, n) in [("starting", 0.0), ("running", 2.0), ("tripped", 1.0)] {
            assert_eq!(
                sample(&t, &format!("agentd_agents{{state=\"{state}\"}}")),
                Some(n),
                "{state}: {t}"
            );
        }
        assert_eq!(sample(&t, "agentd_agents_started_total"), Some(5.0));
        assert!(
            t.contains("# TYPE agentd_agents_ended_total counter\n"),
            "{t}"
        );
        assert_eq!(
            sample(&t, "agentd_agents_ended_total{how=\"exited\"}"),
            Some(2.0)
        );
        assert_eq!(
            sample(&t, "agentd_agents_ended_total{how=\"tripped\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "agentd_agent_lost_events_total{agent=\"a1\"}"),
            Some(3.0)
        );
        assert_eq!(
            sample(&t, "agentd_agent_lost_events_total{agent=\"a2\"}"),
            Some(0.0)
        );
        assert_eq!(sample(&t, "agentd_lost_events_total"), Some(10.0));
        assert_eq!(sample(&t, "agentd_approvals_pending"), Some(2.0));
        assert_eq!(
            sample(
                &t,
                "agentd_export_events_total{destination=\"syslog\",outcome=\"dropped\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "agentd_start_time_seconds"),
            Some(1_700_000_000.5)
        );
        assert!(
            t.contains(&format!(
                "agentd_build_info{{version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{t}"
        );
        // An ended agent's series is gone from the next scrape; the total keeps it.
        s.lost_by_agent.retain(|(id, _)| id != "a1");
        let t = rendered(&m, &s);
        assert!(!t.contains("agent=\"a1\""), "{t}");
        assert_eq!(sample(&t, "agentd_lost_events_total"), Some(10.0));
    }

    /// Whether `text` is exposition text as Prometheus reads it (format 0.0.4): comment
    /// lines, and samples `name{label="value",...} number` whose label values have no escape but
    /// `\\`, `\"` and `\n`.
    fn check_exposition(text: &str) -> Result<(), String> {
        let name_char = |c: char, first: bool| {
            c.is_ascii_alphabetic() || c == '_' || c == ':' || (!first && c.is_ascii_digit())
        };
        for line in text
            .strip_suffix('\n')
            .ok_or("no final newline")?
            .split('\n')
        {
            if line.starts_with('#') {
                continue;
            }
            let bad = || format!("not a sample: {line:?}");
            let mut it = line.chars().peekable();
            let mut first = true;
            while it.next_if(|&c| name_char(c, first)).is_some() {
                first = false;
            }
            if first {
                return Err(bad());
            }
            if it.next_if_eq(&'{').is_some() {
                loop {
                    let mut first = true;
                    while it.next_if(|&c| c != ':' && name_char(c, first)).is_some() {
                        first = false;
                    }
                    if first || it.next() != Some('=') || it.next() != Some('"') {
                        return Err(bad());
                    }
                    loop {
                        match it.next().ok_or_else(bad)? {
                            '"' => break,
                            '\\' => match it.next() {
                                Some('\\' | '"' | 'n') => {}
                                _ => return Err(bad()),
                            },
                            _ => {}
                        }
                    }
                    match it.next() {
                        Some(',') => {}
                        Some('}') => break,
                        _ => return Err(bad()),
                    }
                }
            }
            if it.next() != Some(' ') {
                return Err(bad());
            }
            let value: String = it.collect();
            if !matches!(value.as_str(), "+Inf" | "-Inf" | "NaN") && value.parse::<f64>().is_err() {
                return Err(bad());
            }
        }
        Ok(())
    }

    #[test]
    fn hostile_label_values_are_escaped_not_new_series() {
        let m = Metrics::default();
        let rule = "a\"b\\c\nagentd_forged_total 1\n}";
        m.event(&ev(Kind::Breaker, Verdict::Killed, Layer::Agentd).with("rule", rule));
        let s = Snapshot {
            lost_by_agent: vec![("x\"} 9\n\\y".into(), 1)],
            ..Snapshot::default()
        };
        let t = rendered(&m, &s);
        check_exposition(&t).unwrap_or_else(|e| panic!("{e}\n{t}"));
        assert!(!t.contains("\nagentd_forged_total"), "{t}");
        assert_eq!(
            sample(
                &t,
                r#"agentd_breaker_trips_total{rule="a\"b\\c\nagentd_forged_total 1\n}"}"#
            ),
            Some(1.0),
            "{t}"
        );
        assert_eq!(
            sample(&t, r#"agentd_agent_lost_events_total{agent="x\"} 9\n\\y"}"#),
            Some(1.0),
            "{t}"
        );
        // And the checker does catch what would be wrong.
        assert!(check_exposition("a{rule=\"x\ny\"} 1\n").is_err());
        assert!(check_exposition("a{rule=\"x\\ty\"} 1\n").is_err());
        assert!(check_exposition("a{rule=\"x\"} 1\n").is_ok());
    }

    #[test]
    fn every_family_has_help_and_type_and_every_sample_a_family() {
        let m = Metrics::default();
        // (A family with no series yet is left out of the text.)
        m.event(&ev(Kind::Exec, Verdict::Allow, Layer::Kernel));
        m.event(&ev(Kind::Dns, Verdict::Allow, Layer::Resolver));
        m.event(&crate::run::kernel::manual_kill_event("a1", 7, "test", 1));
        m.event(&ev(Kind::Approval, Verdict::Deny, Layer::Ask).with("waited_ms", 1u64));
        m.audit_appended(AuditRecord::Event);
        m.audit_durable(m.take_unsynced());
        m.audit_failed(AuditOp::Append);
        let s = Snapshot {
            lost_by_agent: vec![("a1".into(), 0)],
            export: vec![crate::export::SinkCounts {
                name: "otlp",
                ..crate::export::SinkCounts::default()
            }],
            ..Snapshot::default()
        };
        let t = rendered(&m, &s);
        check_exposition(&t).unwrap_or_else(|e| panic!("{e}\n{t}"));
        let mut typed = Vec::new();
        for l in t.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let (name, _) = rest.split_once(' ').unwrap();
                assert!(name.starts_with("agentd_"), "{l}");
                assert!(t.contains(&format!("# HELP {name} ")), "{name} has no HELP");
                typed.push(name.to_owned());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        name.strip_suffix(s)
                            .filter(|f| typed.iter().any(|t| t == f))
                    })
                    .unwrap_or(name);
                assert!(typed.iter().any(|t| t == family), "{l}: no TYPE");
            }
        }
        for family in [
            "agentd_agents",
            "agentd_events_total",
            "agentd_lost_events_total",
            "agentd_agent_lost_events_total",
            "agentd_breaker_trips_total",
            "agentd_containment_seconds",
            "agentd_approval_wait_seconds",
            "agentd_approvals_pending",
            "agentd_dns_queries_total",
            "agentd_audit_records_total",
            "agentd_audit_durability_lag_seconds",
            "agentd_export_events_total",
            "agentd_audit_errors_total",
            "agentd_agents_started_total",
            "agentd_agents_ended_total",
            "agentd_start_time_seconds",
            "agentd_build_info",
        ] {
            assert!(typed.iter().any(|t| t == family), "{family} missing: {t}");
        }
    }
}
