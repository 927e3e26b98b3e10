//! The circuit breaker: per agent, classifies events into violations and decides, by the
//! profile's `[breaker]` rules, when the agent must be stopped.
//!
//! This module only decides. Acting on a trip (kill flag in the BPF map, `cgroup.kill`,
//! removing the cgroup) is the supervisor's job, so that the decision logic is pure and
//! tested without root.

use std::{collections::VecDeque, time::Duration};

use serde::Serialize;

use crate::{
    event::{Event, Kind, Layer, Verdict},
    profile::{Action, BreakerPolicy, OnEventLoss, ViolationKind},
};

/// The breaker's decision on one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Trip {
    /// The rule that tripped: `"trip_on:canary"`, `"threshold:10/60s"`, or
    /// [`ON_EVENT_LOSS_RULE`].
    pub rule: String,
    /// The violation that tripped it; `None` for a trip on lost events.
    pub violation: Option<ViolationKind>,
    /// What the profile says to do. In monitor mode the trip is reported with
    /// `enforced = false` and nothing is done.
    pub action: Action,
    pub enforced: bool,
}

/// What an event counts as, if it is a violation at all.
pub fn classify(ev: &Event) -> Option<ViolationKind> {
    if ev.kind == Kind::Canary {
        // Any attempt counts, whatever the verdict: the open may have been refused by
        // Landlock or file permissions, and it still reveals the intent.
        return Some(ViolationKind::Canary);
    }
    // A denial by an agentd layer is a violation; `Killed` verdicts come after a trip and
    // are not counted again; allowed operations are not violations.
    let denied_by_policy = match (ev.verdict, ev.layer) {
        (
            Verdict::Deny,
            Layer::Landlock
            | Layer::Seccomp
            | Layer::Bpf
            | Layer::BpfLsm
            | Layer::Resolver
            | Layer::View
            | Layer::Ask,
        ) => true,
        (Verdict::Deny, Layer::Agentd | Layer::Kernel | Layer::Permission) => false,
        (Verdict::Allow | Verdict::Killed | Verdict::None, _) => false,
    };
    if !denied_by_policy {
        return None;
    }
    if ev.layer == Layer::Seccomp {
        // The filter refuses socket families the profile does not allow before the cgroup
        // program sees them: that is the `socket` violation, not just any refused call.
        let call = ev.detail.get("syscall").and_then(|v| v.as_str());
        return Some(match call {
            Some("socket" | "socketpair") => ViolationKind::Socket,
            _ => ViolationKind::Syscall,
        });
    }
    match ev.kind {
        Kind::Exec => Some(ViolationKind::Exec),
        Kind::Connect | Kind::Sendmsg => Some(ViolationKind::Connect),
        Kind::Bind | Kind::Accept => Some(ViolationKind::Bind),
        Kind::Socket => Some(ViolationKind::Socket),
        Kind::OpenRead => Some(ViolationKind::Read),
        Kind::OpenWrite
        | Kind::Unlink
        | Kind::Rename
        | Kind::Mkdir
        | Kind::Rmdir
        | Kind::Link
        | Kind::Symlink
        | Kind::Chmod
        | Kind::Chown
        | Kind::Truncate
        | Kind::Setxattr => Some(ViolationKind::Write),
        // Attributed to seccomp (handled above) or to the kernel (not denied by policy);
        // any other denying layer would still be a refused call.
        Kind::Syscall => Some(ViolationKind::Syscall),
        // A name no rule allows; not a query refused for a bound of the resolver's (its
        // rate, queries in flight, admitted addresses) nor a message that is no query.
        Kind::Dns if ev.domain.is_some() && !ev.detail.contains_key("limit") => {
            Some(ViolationKind::Dns)
        }
        Kind::Dns => None,
        // A held call that ended refused: a person's denial, no answer in time, the cap.
        Kind::Approval => Some(ViolationKind::Denied),
        // Reported with the layer that refused it; no `trip_on` kind names signals.
        Kind::Signal
        | Kind::Start
        | Kind::Exit
        | Kind::LaunchFailed
        | Kind::Limit
        | Kind::Fork
        | Kind::ProcessExit
        | Kind::Canary
        | Kind::Breaker
        | Kind::Transaction
        | Kind::Ask
        | Kind::Lost => None,
    }
}

/// The rule of a trip on events the kernel could not report (`on_event_loss = "kill"`).
pub const ON_EVENT_LOSS_RULE: &str = "on_event_loss:kill";

/// How many of the agent's events the kernel could not report, if `ev` says so: a `lost`
/// event of the kernel watch. (A subscriber of the daemon that falls behind is told with
/// a `lost` event of agentd's own, which is not about the agent and never reaches a
/// breaker.)
pub fn kernel_lost(ev: &Event) -> Option<u64> {
    if ev.kind != Kind::Lost || ev.layer != Layer::Bpf {
        return None;
    }
    ev.detail
        .get("count")
        .and_then(serde_json::Value::as_u64)
        .filter(|&n| n > 0)
}

/// Per-agent breaker state.
#[derive(Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    /// Monotonic times (ns) of recent violations not in `trip_on`, oldest first.
    recent: VecDeque<u64>,
    violations: u64,
    tripped: bool,
    /// A trip that kills was returned: later events change nothing.
    killing: bool,
}

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Breaker {
        Breaker {
            policy,
            recent: VecDeque::new(),
            violations: 0,
            tripped: false,
            killing: false,
        }
    }

    /// Violations counted so far.
    pub fn violations(&self) -> u64 {
        self.violations
    }

    /// Feeds one event seen at monotonic time `now_ns`. Returns the trip, once: after a trip
    /// that kills (`action = "kill"`, or a lost event with `on_event_loss = "kill"`) the
    /// agent is being killed and later events change nothing; with `action = "deny"` (or
    /// in monitor mode) later violations are counted and may report again.
    pub fn observe(&mut self, ev: &Event, now_ns: u64) -> Option<Trip> {
        if kernel_lost(ev).is_some() {
            return self.lost();
        }
        let violation = classify(ev)?;
        self.violations += 1;
        if self.killing {
            return None;
        }
        let rule = if self.policy.trip_on.contains(&violation) {
            Some(format!("trip_on:{}", violation.as_str()))
        } else if let Some(t) = self.policy.threshold {
            let window = window_ns(t.window);
            self.recent.push_back(now_ns);
            while self
                .recent
                .front()
                .is_some_and(|&t0| now_ns.saturating_sub(t0) >= window)
            {
                self.recent.pop_front();
            }
            (self.recent.len() >= t.count as usize).then(|| {
                self.recent.clear();
                format!(
                    "threshold:{}/{}",
                    t.count,
                    crate::profile::format_duration(t.window)
                )
            })
        } else {
            None
        }?;
        self.tripped = true;
        self.killing = self.policy.enforce && self.policy.action == Action::Kill;
        Some(Trip {
            rule,
            violation: Some(violation),
            action: self.policy.action,
            enforced: self.policy.enforce,
        })
    }

    /// The kernel lost events of the agent: a trip that kills when the profile says
    /// `on_event_loss = "kill"` (the kernel has tripped the agent already, at the first
    /// loss); nothing more when it says `report` (the `lost` event is the report).
    /// The kernel killed the agent and the event that says why never came (its trigger
    /// was lost, or is still behind a full ring buffer): the trip is recorded as the
    /// kernel's, and what arrives later trips nothing more (one kill, one trip).
    pub fn tripped_in_kernel(&mut self) {
        self.tripped = true;
        self.killing = true;
    }

    /// Whether a loss of the agent's events kills it (`on_event_loss = "kill"`, enforced):
    /// the kernel then trips it at the first event that does not fit.
    pub fn kills_on_loss(&self) -> bool {
        self.policy.enforce && self.policy.on_event_loss == OnEventLoss::Kill
    }

    fn lost(&mut self) -> Option<Trip> {
        if !self.kills_on_loss() || self.killing {
            return None;
        }
        self.tripped = true;
        self.killing = true;
        Some(Trip {
            rule: ON_EVENT_LOSS_RULE.to_owned(),
            violation: None,
            action: Action::Kill,
            enforced: true,
        })
    }
}

/// A window in nanoseconds, saturating.
fn window_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Threshold;

    fn policy(
        trip_on: &[ViolationKind],
        threshold: Option<(u32, u64)>,
        action: Action,
        enforce: bool,
    ) -> BreakerPolicy {
        BreakerPolicy {
            enforce,
            trip_on: trip_on.to_vec(),
            threshold: threshold.map(|(count, secs)| Threshold {
                count,
                window: Duration::from_secs(secs),
            }),
            action,
            on_event_loss: OnEventLoss::Report,
        }
    }

    fn ev(kind: Kind, verdict: Verdict, layer: Layer) -> Event {
        Event::new("a", 1, "x", kind, verdict, layer)
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_refused_name_is_a_violation_a_resolver_bound_is_not() {
        let mut name = ev(Kind::Dns, Verdict::Deny, Layer::Resolver);
        name.domain = Some("evil.test".into());
        assert_eq!(classify(&name), Some(ViolationKind::Dns));
        let rate = name.clone().with("limit", "rate");
        assert_eq!(classify(&rate), None);
        let malformed = ev(Kind::Dns, Verdict::Deny, Layer::Resolver);
        assert_eq!(classify(&malformed), None);
        let mut allowed = ev(Kind::Dns, Verdict::Allow, Layer::Resolver);
        allowed.domain = Some("ok.test".into());
        assert_eq!(classify(&allowed), None);
    }

    #[test]
    fn classification() {
        assert_eq!(
            classify(&ev(Kind::Canary, Verdict::Deny, Layer::Landlock)),
            Some(ViolationKind::Canary)
        );
        assert_eq!(
            classify(&ev(Kind::Canary, Verdict::Allow, Layer::Kernel)),
            Some(ViolationKind::Canary)
        );
        assert_eq!(
            classify(&ev(Kind::Connect, Verdict::Deny, Layer::Bpf)),
            Some(ViolationKind::Connect)
        );
        assert_eq!(
            classify(&ev(Kind::Sendmsg, Verdict::Deny, Layer::Bpf)),
            Some(ViolationKind::Connect)
        );
        assert_eq!(
            classify(&ev(Kind::Exec, Verdict::Deny, Layer::Landlock)),
            Some(ViolationKind::Exec)
        );
        assert_eq!(
            classify(&ev(Kind::Rename, Verdict::Deny, Layer::Landlock)),
            Some(ViolationKind::Write)
        );
        assert_eq!(
            classify(&ev(Kind::Connect, Verdict::Deny, Layer::Seccomp)),
            Some(ViolationKind::Syscall)
        );
        assert_eq!(
            classify(&ev(Kind::Connect, Verdict::Allow, Layer::Bpf)),
            None
        );
        assert_eq!(
            classify(&ev(Kind::OpenWrite, Verdict::Deny, Layer::Kernel)),
            None,
            "the kernel's own refusals are not the profile"
        );
        assert_eq!(
            classify(&ev(Kind::Exec, Verdict::Deny, Layer::Permission)),
            None,
            "file permissions are not the profile"
        );
        assert_eq!(
            classify(&ev(Kind::OpenRead, Verdict::Deny, Layer::Landlock)),
            Some(ViolationKind::Read)
        );
        assert_eq!(
            classify(&ev(Kind::OpenRead, Verdict::Deny, Layer::Permission)),
            None
        );
        assert_eq!(
            classify(&ev(Kind::Connect, Verdict::Killed, Layer::Bpf)),
            None
        );
        // A refused call seen at its exit only (unshare, mount, socket, ...).
        assert_eq!(
            classify(&ev(Kind::Syscall, Verdict::Deny, Layer::Seccomp)),
            Some(ViolationKind::Syscall)
        );
        assert_eq!(
            classify(&ev(Kind::Syscall, Verdict::Deny, Layer::Kernel)),
            None,
            "the kernel's own refusal of an allowed call is not the profile"
        );
        assert_eq!(
            classify(&ev(Kind::Syscall, Verdict::Killed, Layer::Seccomp)),
            None
        );
    }

    #[test]
    fn refused_socket_families_are_socket_violations() {
        let sock = ev(Kind::Syscall, Verdict::Deny, Layer::Seccomp).with("syscall", "socket");
        assert_eq!(classify(&sock), Some(ViolationKind::Socket));
        let mount = ev(Kind::Syscall, Verdict::Deny, Layer::Seccomp).with("syscall", "mount");
        assert_eq!(classify(&mount), Some(ViolationKind::Syscall));
    }

    #[test]
    fn immediate_kinds_trip_at_once() {
        let mut b = Breaker::new(policy(&[ViolationKind::Canary], None, Action::Kill, true));
        let t = b
            .observe(&ev(Kind::Canary, Verdict::Deny, Layer::Landlock), 0)
            .unwrap();
        assert_eq!(t.rule, "trip_on:canary");
        assert!(t.enforced);
        assert!(b.tripped);
        assert_eq!(
            b.observe(&ev(Kind::Canary, Verdict::Deny, Layer::Landlock), 1),
            None,
            "a kill trips once"
        );
    }

    #[test]
    fn threshold_trips_on_the_nth_within_the_window_and_not_before() {
        let mut b = Breaker::new(policy(&[], Some((3, 10)), Action::Kill, true));
        let w = || ev(Kind::OpenWrite, Verdict::Deny, Layer::Landlock);
        assert_eq!(b.observe(&w(), 0), None);
        assert_eq!(b.observe(&w(), S), None);
        let t = b.observe(&w(), 2 * S).unwrap();
        assert_eq!(t.rule, "threshold:3/10s");
        assert_eq!(t.violation, Some(ViolationKind::Write));
    }

    #[test]
    fn violations_outside_the_window_expire() {
        let mut b = Breaker::new(policy(&[], Some((3, 10)), Action::Kill, true));
        let w = || ev(Kind::Bind, Verdict::Deny, Layer::Bpf);
        assert_eq!(b.observe(&w(), 0), None);
        assert_eq!(b.observe(&w(), 5 * S), None);
        assert_eq!(b.observe(&w(), 10 * S), None, "the first one expired");
        assert!(b.observe(&w(), 11 * S).is_some());
        assert_eq!(b.violations(), 4);
    }

    #[test]
    fn without_threshold_lesser_violations_only_count() {
        let mut b = Breaker::new(policy(&[ViolationKind::Canary], None, Action::Kill, true));
        for i in 0..100 {
            assert_eq!(
                b.observe(&ev(Kind::Unlink, Verdict::Deny, Layer::Landlock), i),
                None
            );
        }
        assert_eq!(b.violations(), 100);
        assert!(!b.tripped);
    }

    #[test]
    fn monitor_mode_reports_but_does_not_enforce() {
        let mut b = Breaker::new(policy(&[ViolationKind::Connect], None, Action::Deny, false));
        let t = b
            .observe(&ev(Kind::Connect, Verdict::Deny, Layer::Bpf), 0)
            .unwrap();
        assert!(!t.enforced);
        assert!(
            b.observe(&ev(Kind::Connect, Verdict::Deny, Layer::Bpf), 1)
                .is_some(),
            "monitor keeps reporting"
        );
    }

    #[test]
    fn deny_action_keeps_reporting() {
        let mut b = Breaker::new(policy(&[ViolationKind::Exec], None, Action::Deny, true));
        assert!(
            b.observe(&ev(Kind::Exec, Verdict::Deny, Layer::Landlock), 0)
                .is_some()
        );
        assert!(
            b.observe(&ev(Kind::Exec, Verdict::Deny, Layer::Landlock), 1)
                .is_some()
        );
    }

    fn lost(n: u64) -> Event {
        ev(Kind::Lost, Verdict::None, Layer::Bpf).with("count", n)
    }

    #[test]
    fn lost_events_kill_when_the_profile_says_so() {
        let mut p = policy(&[ViolationKind::Canary], None, Action::Deny, true);
        p.on_event_loss = OnEventLoss::Kill;
        let mut b = Breaker::new(p);
        let t = b.observe(&lost(3), 0).unwrap();
        assert_eq!(t.rule, ON_EVENT_LOSS_RULE);
        assert_eq!(t.violation, None);
        assert_eq!(t.action, Action::Kill, "whatever the violations' action");
        assert!(t.enforced);
        assert_eq!(b.violations(), 0, "a loss is no violation of the agent's");
        assert_eq!(b.observe(&lost(5), 1), None, "a kill trips once");
        assert_eq!(
            b.observe(&ev(Kind::Canary, Verdict::Deny, Layer::Landlock), 2),
            None,
            "the agent is being killed"
        );
    }

    #[test]
    fn after_a_trip_in_the_kernel_nothing_trips_again() {
        let mut p = policy(&[ViolationKind::Canary], None, Action::Kill, true);
        p.on_event_loss = OnEventLoss::Kill;
        let mut b = Breaker::new(p);
        assert!(b.kills_on_loss());
        b.tripped_in_kernel();
        assert_eq!(b.observe(&lost(3), 0), None, "the late loss");
        assert_eq!(
            b.observe(&ev(Kind::Canary, Verdict::Deny, Layer::Landlock), 1),
            None,
            "the late trigger"
        );
    }

    #[test]
    fn lost_events_are_only_reported_by_default_and_in_monitor_mode() {
        let mut b = Breaker::new(policy(&[ViolationKind::Canary], None, Action::Kill, true));
        assert_eq!(b.observe(&lost(3), 0), None);
        assert!(
            b.observe(&ev(Kind::Canary, Verdict::Deny, Layer::Landlock), 1)
                .is_some(),
            "a reported loss changes nothing else"
        );
        let mut p = policy(&[], None, Action::Deny, false);
        p.on_event_loss = OnEventLoss::Kill;
        assert_eq!(
            Breaker::new(p).observe(&lost(3), 0),
            None,
            "monitor never acts"
        );
    }

    #[test]
    fn only_the_kernels_losses_count() {
        let mut p = policy(&[], None, Action::Kill, true);
        p.on_event_loss = OnEventLoss::Kill;
        let mut b = Breaker::new(p);
        let lagged = ev(Kind::Lost, Verdict::None, Layer::Agentd).with("count", 7);
        assert_eq!(b.observe(&lagged, 0), None, "a subscriber fell behind");
        assert_eq!(b.observe(&lost(0), 0), None);
        assert!(b.observe(&lost(1), 0).is_some());
    }

    #[test]
    fn a_deny_trip_does_not_spare_a_later_loss() {
        let mut p = policy(&[ViolationKind::Exec], None, Action::Deny, true);
        p.on_event_loss = OnEventLoss::Kill;
        let mut b = Breaker::new(p);
        assert!(
            b.observe(&ev(Kind::Exec, Verdict::Deny, Layer::Landlock), 0)
                .is_some()
        );
        let t = b.observe(&lost(1), 1).unwrap();
        assert_eq!(t.rule, ON_EVENT_LOSS_RULE);
    }
}
