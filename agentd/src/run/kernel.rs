//! The kernel side of a supervised agent: the eBPF watch and the circuit breaker, plugged
//! into the supervisor as [`AgentHooks`].
//!
//! - `before_spawn`: load the BPF programs (once per `agentd run`) and attach them to the
//!   agent's cgroup with its policy, before its first process exists. Failing to load is
//!   a launch failure: an agent never runs without its network enforcement.
//! - `started`: one task reads the watch's events, feeds each to the breaker, forwards it
//!   to `--events`, and acts on a trip: `cgroup.kill` first, which kills every process of
//!   the cgroup at once, re-parented and `setsid` ones included, then the kill flag (from
//!   then on the cgroup programs refuse all network and the tracepoints SIGKILL any
//!   process of the agent at its next syscall).
//! - `finished`: drain the events up to the first process's own exit, so a violation made
//!   just before it exited still trips the breaker, then detach.

use std::{
    future::Future,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use nix::sys::signal::Signal;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use super::{
    bursts::Bursts,
    hooks::{AgentHandle, AgentHooks, AgentInfo, HookError},
};
use crate::{
    bpf::{self, Watch},
    breaker::{Breaker, Trip, kernel_lost},
    dns,
    event::{Event, Kind, Layer, Verdict},
    profile::{Action, BreakerPolicy, Mode, NameRule},
};

/// Exit status of `agentd run` after the breaker killed the agent (128 + SIGKILL).
pub const EXIT_TRIPPED: u8 = 137;
/// How often closed bursts of identical refusals are recorded (see `run::bursts`).
pub const BURST_TICK: Duration = Duration::from_millis(250);
/// How long `finished` waits for the first process's exit event before giving up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
enum KernelHookError {
    #[error("kernel watch: {0}")]
    Bpf(#[from] bpf::BpfError),
    #[error("the agent's resolver: {0}")]
    Resolver(String),
}

fn hook_error(hook: &'static str, e: KernelHookError) -> HookError {
    HookError {
        hook,
        source: Box::new(e),
    }
}

/// The watch and the breaker for one agent.
#[derive(Debug, Default)]
pub struct KernelHooks {
    watch: Option<Arc<Mutex<Watch>>>,
    agent: Option<bpf::AgentHandle>,
    breaker: Option<BreakerPolicy>,
    /// The trip that killed the agent, for the exit status and the one-line report.
    killed_by: Arc<Mutex<Option<String>>>,
    /// Set by the event task once it has handled the first process's exit event.
    drained: Option<watch::Receiver<bool>>,
    task: Option<JoinHandle<()>>,
    /// The `--events` channel, for the kill switch's report.
    events: Option<mpsc::Sender<Event>>,
    /// `--dns-upstream`.
    dns_upstream: Option<std::net::SocketAddr>,
    /// The agent's resolver (its profile names domains): bound before the agent starts,
    /// serving once it has.
    resolver: Option<Resolving>,
    /// What asking a person needs, when the profile has ask rules.
    ask: Option<AskContext>,
    /// Events from agentd's own sources (resolver, held calls), to the breaker.
    side_events: Option<mpsc::UnboundedSender<Event>>,
    /// The task answering held calls, and its requests.
    ask_task: Option<JoinHandle<()>>,
    ask_board: Option<Arc<crate::ask::engine::Board>>,
}

/// The part of the policy the held calls are decided with.
#[derive(Debug)]
struct AskContext {
    policy: crate::profile::AskPolicy,
    profile: String,
    allow: Vec<crate::profile::ConnectRule>,
    resolver: bool,
    asked: dns::AskedNames,
}

#[derive(Debug)]
enum Resolving {
    Bound {
        bound: dns::Bound,
        rules: Vec<NameRule>,
        ask: Vec<NameRule>,
        asked: dns::AskedNames,
        upstream: Result<std::net::SocketAddr, String>,
        monitor: bool,
    },
    /// Held until the agent is finished (dropping it stops the resolver).
    Serving { _resolver: dns::Resolver },
}

impl KernelHooks {
    pub fn new(dns_upstream: Option<std::net::SocketAddr>) -> KernelHooks {
        KernelHooks {
            dns_upstream,
            ..KernelHooks::default()
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        })
        .unwrap_or(0)
}

impl AgentHooks for KernelHooks {
    fn before_spawn(&mut self, agent: AgentInfo<'_>) -> Result<(), HookError> {
        let mut watch = Watch::load().map_err(|e| hook_error("kernel watch", e.into()))?;
        let mut handle = watch
            .add_agent(
                agent.agent_id,
                agent.cgroup_dir,
                agent.policy,
                Some(agent.creds()),
            )
            .map_err(|e| hook_error("kernel watch", e.into()))?;
        let names = &agent.policy.network.names;
        let ask_names = agent
            .policy
            .ask
            .as_ref()
            .map(|a| a.names.clone())
            .unwrap_or_default();
        let asked = dns::AskedNames::default();
        if let Some(policy) = &agent.policy.ask {
            self.ask = Some(AskContext {
                policy: policy.clone(),
                profile: agent.policy.name.clone(),
                allow: agent.policy.network.connect.clone(),
                resolver: !names.is_empty() || !ask_names.is_empty(),
                asked: asked.clone(),
            });
        }
        if !names.is_empty() || !ask_names.is_empty() {
            let up = dns::upstream(self.dns_upstream);
            if let Err(why) = &up {
                eprintln!("agentd: warning: {why}: the names the profile allows will not resolve");
            }
            let bound = match dns::Bound::new() {
                Err(e) => Err(KernelHookError::Resolver(format!("cannot bind: {e}"))),
                Ok(b) => match watch.steer_dns(&mut handle, b.port()) {
                    Err(e) => Err(KernelHookError::Bpf(e)),
                    Ok(()) => Ok((b, up)),
                },
            };
            match bound {
                Ok((bound, upstream)) => {
                    self.resolver = Some(Resolving::Bound {
                        bound,
                        rules: names.clone(),
                        ask: ask_names,
                        asked,
                        upstream,
                        monitor: agent.policy.mode == Mode::Monitor,
                    });
                }
                Err(e) => {
                    if let Err(undo) = watch.remove_agent(handle) {
                        tracing::warn!("detaching after a failed launch: {undo}");
                    }
                    return Err(hook_error("kernel watch", e));
                }
            }
        }
        self.agent = Some(handle);
        self.watch = Some(Arc::new(Mutex::new(watch)));
        self.breaker = Some(agent.policy.breaker.clone());
        Ok(())
    }

    fn started(&mut self, agent: &AgentHandle, events: &mpsc::Sender<Event>) {
        let (Some(watch), Some(policy), Some(bpf_agent)) = (
            self.watch.clone(),
            self.breaker.clone(),
            self.agent.as_ref(),
        ) else {
            // before_spawn did not run or failed: the launch was aborted already.
            return;
        };
        let cgroup_id = bpf_agent.cgroup_id();
        let rx = match lock(&watch).try_events() {
            Ok(rx) => rx,
            Err(e) => {
                // Enforcement is attached, but nothing would see or report what the agent
                // does: fail closed.
                eprintln!("agentd: {}; killing the agent", KernelHookError::Bpf(e));
                let _ = agent.kill();
                return;
            }
        };
        // The resolver's `dns` events join the kernel's, before the breaker.
        let (dns_tx, dns_rx) = mpsc::unbounded_channel();
        let (admissions, clients) = {
            let w = lock(&watch);
            (w.admissions(), w.dns_clients())
        };
        self.side_events = Some(dns_tx.clone());
        if let Some(Resolving::Bound {
            bound,
            rules,
            ask,
            asked,
            upstream,
            monitor,
        }) = self.resolver.take()
        {
            let served = bound.serve(dns::Agent {
                id: agent.agent_id.to_string(),
                cgroup_id,
                rules,
                ask,
                asked,
                upstream,
                admissions,
                clients,
                monitor,
                emit: Box::new(move |ev| {
                    let _ = dns_tx.send(ev);
                }),
            });
            match served {
                Ok(r) => self.resolver = Some(Resolving::Serving { _resolver: r }),
                Err(e) => {
                    // Its port is steered to: nothing answering is fail closed, but say so.
                    eprintln!("agentd: the agent's resolver cannot serve: {e}; killing the agent");
                    let _ = agent.kill();
                    return;
                }
            }
        }
        let (done_tx, done_rx) = watch::channel(false);
        self.drained = Some(done_rx);
        self.events = Some(events.clone());
        let task = EventTask {
            watch,
            cgroup_id,
            agent: agent.clone(),
            breaker: Breaker::new(policy),
            out: events.clone(),
            killed_by: Arc::clone(&self.killed_by),
            done: done_tx,
        };
        self.task = Some(tokio::spawn(task.run(rx, dns_rx)));
    }

    fn serve_asks(
        &mut self,
        agent: &AgentHandle,
        listener: std::os::fd::OwnedFd,
        prompter: Option<super::terminal::Prompter>,
    ) {
        let (Some(ctx), Some(watch), Some(bpf_agent), Some(events)) = (
            self.ask.take(),
            self.watch.as_ref(),
            self.agent.as_ref(),
            self.side_events.clone(),
        ) else {
            // Nothing to ask with: held calls fail (ENOSYS) once the listener closes.
            return;
        };
        let maps = {
            let w = lock(watch);
            crate::ask::maps::WatchMaps::new(
                &agent.agent_id,
                bpf_agent.cgroup_id(),
                w.admissions(),
                w.exec_gate(),
                ctx.asked,
            )
        };
        let board = Arc::new(crate::ask::engine::Board::default());
        self.ask_board = Some(Arc::clone(&board));
        let engine = Arc::new(crate::ask::engine::AgentAsk::new(
            &agent.agent_id,
            &ctx.profile,
            super::asking::invoking_uid(),
            agent.pid,
            ctx.policy,
            ctx.allow,
            ctx.resolver,
            Arc::new(maps),
            Arc::new(super::asking::TerminalFront {
                prompter,
                board: Arc::clone(&board),
            }),
            board,
            Arc::new(move |ev| {
                let _ = events.send(ev);
            }),
        ));
        if let Err(e) = engine.arm() {
            // An ask_exec file the kernel would not know: fail closed.
            eprintln!("agentd: cannot mark the programs to ask about: {e}; killing the agent");
            let _ = agent.signal_kill();
            return;
        }
        self.ask_task = Some(tokio::spawn(engine.serve(listener)));
    }

    fn finished<'a>(
        &'a mut self,
        agent: &'a AgentHandle,
    ) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        Box::pin(async move {
            if let Some(t) = self.ask_task.take() {
                t.abort();
            }
            if let Some(b) = self.ask_board.take() {
                b.cancel_agent(&agent.agent_id);
            }
            if let Some(mut drained) = self.drained.take() {
                let wait = drained.wait_for(|done| *done);
                if tokio::time::timeout(DRAIN_TIMEOUT, wait).await.is_err() {
                    tracing::warn!(
                        "the agent's exit event did not arrive within {DRAIN_TIMEOUT:?}"
                    );
                }
            }
            // The kernel tripped the breaker but its event never came (the ring buffer was
            // full): the trip is still recorded, and the run still says so.
            let killed = match (self.watch.as_ref(), self.agent.as_ref()) {
                (Some(w), Some(a)) => lock(w).is_killed(a.cgroup_id()).unwrap_or(false),
                _ => false,
            };
            if killed && lock(&self.killed_by).is_none() {
                let ev = lost_trip_event(&agent.agent_id, agent.pid);
                *lock(&self.killed_by) = Some(LOST_TRIP.to_owned());
                if let Some(out) = &self.events {
                    let _ = out.send(ev).await;
                }
            }
            // Stop resolving and reading (the task and `events` hold senders of the
            // --events writer), then detach.
            self.resolver = None;
            self.events = None;
            if let Some(task) = self.task.take() {
                task.abort();
                let _ = task.await;
            }
            if let (Some(watch), Some(agent)) = (self.watch.as_ref(), self.agent.take())
                && let Err(e) = lock(watch).remove_agent(agent)
            {
                eprintln!("agentd: detaching the kernel watch: {e}");
            }
        })
    }

    fn kill_switch<'a>(
        &'a mut self,
        agent: &'a AgentHandle,
        reason: &'a str,
    ) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        Box::pin(async move {
            let asked = monotonic_ns();
            let flag = self
                .watch
                .as_deref()
                .zip(self.agent.as_ref().map(|a| a.cgroup_id()));
            contain(agent, flag, "kill switch").await;
            let contain_ns = monotonic_ns().saturating_sub(asked);
            *lock(&self.killed_by) = Some(format!("killed by the kill switch ({reason})"));
            if let Some(out) = &self.events {
                let ev = manual_kill_event(&agent.agent_id, agent.pid, reason, contain_ns);
                let _ = out.send(ev).await;
            }
        })
    }

    fn verdict(&self) -> Option<(u8, String)> {
        lock(&self.killed_by)
            .clone()
            .map(|line| (EXIT_TRIPPED, line))
    }
}

/// The one task that reads the agent's kernel events.
struct EventTask {
    watch: Arc<Mutex<Watch>>,
    cgroup_id: u64,
    agent: AgentHandle,
    breaker: Breaker,
    out: mpsc::Sender<Event>,
    killed_by: Arc<Mutex<Option<String>>>,
    done: watch::Sender<bool>,
}

impl EventTask {
    async fn run(mut self, mut rx: mpsc::Receiver<Event>, mut dns: mpsc::UnboundedReceiver<Event>) {
        // Identical refusals folded for the record (the breaker sees each one), until the
        // first process's exit: then what is open is recorded, and the rest passes as is
        // (the task is stopped soon after).
        let mut bursts = Some(Bursts::new());
        let mut tick = tokio::time::interval(BURST_TICK);
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => ev,
                    None => break,
                },
                Some(ev) = dns.recv() => ev,
                _ = tick.tick() => {
                    if let Some(b) = bursts.as_mut() {
                        self.record(b.expired(monotonic_ns())).await;
                    }
                    continue;
                }
            };
            let first_exit = ev.kind == Kind::ProcessExit && ev.pid == self.agent.pid;
            let now = ev.ktime_ns.unwrap_or_else(monotonic_ns);
            let trip = self.breaker.observe(&ev, now);
            // Act before anything else (the writer may be slow): a trip kills, a held
            // process the breaker lets go is resumed.
            let kill = trip
                .as_ref()
                .is_some_and(|t| t.enforced && t.action == Action::Kill);
            if ev.held() && !kill {
                // The breaker lets the held process go.
                release_held(ev.pid, self.agent.cgroup_dir());
            }
            let report = match &trip {
                Some(trip) => Some(self.act(trip, &ev).await),
                None => None,
            };
            let records = match bursts.as_mut() {
                Some(b) => b.push(ev, now),
                None => vec![ev],
            };
            self.record(records).await;
            if let Some(report) = report {
                self.record(vec![report]).await;
            }
            if first_exit {
                if let Some(mut b) = bursts.take() {
                    self.record(b.flush()).await;
                }
                let _ = self.done.send(true);
            }
        }
        if let Some(mut b) = bursts.take() {
            self.record(b.flush()).await;
        }
        let _ = self.done.send(true);
    }

    /// Sends events to `--events` (the writer only stops when every sender is gone).
    async fn record(&self, events: Vec<Event>) {
        for e in events {
            let _ = self.out.send(e).await;
        }
    }

    /// Carries out a trip and returns the `breaker` event.
    async fn act(&mut self, trip: &Trip, trigger: &Event) -> Event {
        let kill = trip.enforced && trip.action == Action::Kill;
        let mut contain_ns = None;
        if kill {
            contain(&self.agent, Some((&self.watch, self.cgroup_id)), "breaker").await;
            contain_ns = trigger.ktime_ns.map(|t| monotonic_ns().saturating_sub(t));
            *lock(&self.killed_by) = Some(trip_line(trip, trigger));
        }
        trip_event(trip, trigger, kill, self.breaker.violations(), contain_ns)
    }
}

/// Stops the agent the breaker's way and waits for its cgroup to empty. `cgroup.kill`
/// first: one pass of the kernel sends SIGKILL to every process of the cgroup, oldest
/// first, so a parent dies before its child's death could wake it. Setting the kill flag
/// first would kill processes one by one at their next traced syscall, and a parent woken
/// by its child's death could run on until `cgroup.kill` arrives. The flag (`watch`: the
/// watch and the agent's cgroup id) then refuses the network to sockets that outlive
/// their processes, and is the only fast kill on kernels without `cgroup.kill`. `what`
/// prefixes errors.
async fn contain(agent: &AgentHandle, watch: Option<(&Mutex<Watch>, u64)>, what: &str) {
    if let Err(e) = agent.signal_kill() {
        eprintln!("agentd: {what}: {e}");
    }
    if let Some((watch, cgroup_id)) = watch
        && let Err(e) = lock(watch).set_killed(cgroup_id)
    {
        eprintln!("agentd: {what}: setting the kill flag: {e}");
    }
    agent.kill_and_wait(what).await;
}

/// Resumes process `pid`, which the kernel stopped before its refused call returned (a
/// `held` event) and the breaker lets go: the refusal was the file's permissions', not
/// the profile's. Only while the process is still in the agent's cgroup (`cgroup_dir`):
/// a stopped process cannot exit, so its pid is not reused unless something killed it.
pub fn release_held(pid: u32, cgroup_dir: &Path) {
    let Ok(own) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return;
    };
    // The cgroup v2 line, `0::/path`, relative to the v2 mount.
    let in_agent = own
        .lines()
        .filter_map(|l| l.strip_prefix("0::"))
        .any(|rel| {
            !rel.is_empty() && rel != "/" && cgroup_dir.ends_with(rel.trim_start_matches('/'))
        });
    if !in_agent {
        return;
    }
    let Ok(pid) = i32::try_from(pid) else {
        return;
    };
    if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGCONT) {
        eprintln!("agentd: resuming held process {pid}: {e}");
    }
}

/// `decided` of a breaker event the kernel tripped in the violating call.
const DECIDED_IN_KERNEL: &str = "kernel: the violating call never returned";
/// `decided` of a trip on lost events (`AGENT_FLAG_KILL_ON_LOSS`).
const DECIDED_AT_LOSS: &str = "kernel: at the first event that did not fit in the ring buffer; each process of the agent was killed at its next system call";

/// What `agentd run` says of a trip the kernel made whose event was lost.
pub const LOST_TRIP: &str = "breaker tripped in the kernel; the event that tripped it did not arrive (lost to a full ring buffer, see the `lost` events, or behind one; under `on_event_loss = \"kill\"` the loss itself trips it); the agent's processes were killed";

/// The `breaker` event of a trip the kernel made whose triggering event was lost.
pub fn lost_trip_event(agent: &str, pid: u32) -> Event {
    Event::new(
        agent,
        pid,
        "",
        Kind::Breaker,
        Verdict::Killed,
        Layer::Agentd,
    )
    .with("rule", "kernel")
    .with("action", "kill")
    .with("enforced", true)
    .with("decided", DECIDED_IN_KERNEL)
    .with("reason", "the triggering event did not arrive")
}

/// The `breaker` event of the manual kill switch (`rule: manual`), `contain_ns` from the
/// request to an empty cgroup.
pub fn manual_kill_event(agent: &str, pid: u32, reason: &str, contain_ns: u64) -> Event {
    Event::new(
        agent,
        pid,
        "",
        Kind::Breaker,
        Verdict::Killed,
        Layer::Agentd,
    )
    .with("rule", "manual")
    .with("reason", reason)
    .with("action", "kill")
    .with("enforced", true)
    .with("contain_ns", contain_ns)
}

/// The line `agentd run` prints when the breaker killed the agent.
pub fn trip_line(trip: &Trip, trigger: &Event) -> String {
    if let Some(n) = kernel_lost(trigger) {
        return format!(
            "breaker tripped: {} (the kernel could not report {n} events of the agent: the ring buffer was full); the agent's processes were killed",
            trip.rule
        );
    }
    format!(
        "breaker tripped: {} ({} {}) by pid {} ({}); the agent's processes were killed",
        trip.rule,
        trigger.kind_name(),
        describe_target(trigger),
        trigger.pid,
        trigger.comm,
    )
}

/// The `breaker` event of a trip (`kill`: the agent was killed; `contain_ns`: from the
/// violating call to an empty cgroup).
pub fn trip_event(
    trip: &Trip,
    trigger: &Event,
    kill: bool,
    violations: u64,
    contain_ns: Option<u64>,
) -> Event {
    let verdict = match (kill, trip.enforced) {
        (true, _) => Verdict::Killed,
        (false, true) => Verdict::Deny,
        (false, false) => Verdict::None,
    };
    let lost = kernel_lost(trigger);
    let mut ev = Event::new(
        &trigger.agent,
        trigger.pid,
        &trigger.comm,
        Kind::Breaker,
        verdict,
        Layer::Agentd,
    )
    .with("rule", trip.rule.clone())
    .with(
        "action",
        if kill {
            "kill"
        } else if trip.enforced {
            "deny"
        } else {
            "none (monitor mode)"
        },
    )
    .with("enforced", trip.enforced)
    .with(
        "decided",
        if lost.is_some() {
            DECIDED_AT_LOSS
        } else if trigger.tripped_in_kernel() {
            DECIDED_IN_KERNEL
        } else if trigger.held() {
            "agentd, while the kernel held the violating process"
        } else {
            "agentd, from the event"
        },
    )
    .with("violations", violations)
    .with("trigger", serde_json::to_value(trigger).unwrap_or_default());
    if let Some(v) = trip.violation {
        ev = ev.with("violation", v.as_str());
    }
    if let Some(n) = lost {
        ev = ev.with("lost", n).with(
            "reason",
            "the kernel could not report events of the agent (on_event_loss = \"kill\")",
        );
    }
    ev.ktime_ns = trigger.ktime_ns;
    if let Some(ns) = contain_ns {
        ev = ev.with("contain_ns", ns);
    }
    ev
}

/// What an event was about, for the one-line trip report.
fn describe_target(ev: &Event) -> String {
    let detail = |k: &str| ev.detail.get(k).and_then(|v| v.as_str()).unwrap_or("?");
    match (&ev.path, ev.addr, ev.port) {
        (Some(p), _, _) => p.clone(),
        (None, Some(a), Some(port)) => format!("{a}:{port}"),
        (None, Some(a), None) => a.to_string(),
        (None, None, _) if ev.kind == Kind::Socket => {
            format!("{} {}", detail("family"), detail("type"))
        }
        (None, None, _) if ev.kind == Kind::Syscall => detail("syscall").to_owned(),
        (None, None, _) => String::new(),
    }
}
