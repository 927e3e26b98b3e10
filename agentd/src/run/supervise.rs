//! The embedded supervisor: runs in a current-thread tokio runtime created after the agent
//! was spawned. It forwards signals, enforces the wall-time limit, writes events, and when
//! the agent's first process exits, kills whatever is left of the agent and removes its
//! cgroups.

use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    sync::Arc,
    time::Duration,
};

use nix::sys::{
    signal::{SigSet, SigmaskHow, Signal, pthread_sigmask},
    wait::WaitStatus,
};
use serde_json::json;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::Instant,
};

use super::{
    events::{self, Sink},
    hooks::{AgentHandle, AgentHooks},
    plan::Plan,
};
use crate::{
    event::{Event, Kind, Layer, Verdict},
    profile::{format_bytes, format_duration},
    sandbox::{Spawned, cgroup::AgentCgroup, landlock::Enforcement},
};

/// Signals `agentd run` forwards to the agent (to its process group: the agent leads a
/// session of its own). Without a terminal of the agent's own, the user's Ctrl-C reaches
/// agentd, which forwards it; with one, the agent's terminal sends it to the agent.
pub const FORWARDED: [Signal; 5] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGWINCH,
];

fn forwarded_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set
}

/// Blocks the forwarded signals until the supervisor's handlers exist (a Ctrl-C in that
/// window would otherwise kill agentd and leave the agent unsupervised). The child
/// unblocks them for itself before exec.
pub fn block_forwarded() -> nix::Result<()> {
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&forwarded_set()), None)
}

pub fn unblock_forwarded() -> nix::Result<()> {
    pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&forwarded_set()), None)
}

/// How the agent's first process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Code(i32),
    Signal { signal: i32, core_dumped: bool },
}

impl Ended {
    pub fn from_wait(status: WaitStatus) -> Option<Ended> {
        match status {
            WaitStatus::Exited(_, code) => Some(Ended::Code(code)),
            WaitStatus::Signaled(_, sig, core_dumped) => Some(Ended::Signal {
                signal: sig as i32,
                core_dumped,
            }),
            WaitStatus::Stopped(..)
            | WaitStatus::PtraceEvent(..)
            | WaitStatus::PtraceSyscall(_)
            | WaitStatus::Continued(_)
            | WaitStatus::StillAlive => None,
        }
    }

    /// `agentd run`'s exit status: the agent's, or 128+N when it died of signal N.
    pub fn exit_code(self) -> u8 {
        match self {
            Ended::Code(c) => u8::try_from(c & 0xff).unwrap_or(1),
            Ended::Signal { signal, .. } => u8::try_from(128 + (signal & 0x7f)).unwrap_or(255),
        }
    }

    /// Whether SIGKILL ended it: the breaker's or the kill switch's kill reached it (an
    /// agent that ended otherwise had finished before they acted).
    pub fn killed(self) -> bool {
        matches!(self, Ended::Signal { signal, .. } if signal == libc::SIGKILL)
    }

    /// `status 3` or `signal 15 (SIGTERM)`, for messages.
    pub fn describe(self) -> String {
        match self {
            Ended::Code(c) => format!("status {c}"),
            Ended::Signal { signal, .. } => {
                let name =
                    Signal::try_from(signal).map_or_else(|_| signal.to_string(), |s| s.to_string());
                format!("signal {signal} ({name})")
            }
        }
    }

    fn detail(self, e: Event) -> Event {
        match self {
            Ended::Code(c) => e.with("code", c),
            Ended::Signal {
                signal,
                core_dumped,
            } => {
                let name =
                    Signal::try_from(signal).map_or_else(|_| signal.to_string(), |s| s.to_string());
                e.with("signal", signal)
                    .with("signal_name", name)
                    .with("core_dumped", core_dumped)
            }
        }
    }
}

/// Everything the supervisor works with.
pub struct Supervision<'a> {
    pub plan: &'a Plan,
    pub spawned: Spawned,
    pub cgroup: Arc<AgentCgroup>,
    pub hooks: &'a mut dyn AgentHooks,
    pub sink: Option<Sink>,
    /// The agent's terminal, when agentd relays one: it takes the window size.
    pub terminal: Option<&'a super::terminal::Session>,
    /// The summary of refusals at exit.
    pub summary: super::summary::Said,
    /// The workspace transaction, when the workspace is one.
    pub transaction: Option<super::txn::Open>,
    /// How long making the agent's mount namespace took.
    pub view: Duration,
}

fn event(plan: &Plan, pid: i32, kind: Kind) -> Event {
    Event::new(
        &plan.agent_id,
        u32::try_from(pid).unwrap_or(0),
        &plan.comm(),
        kind,
        Verdict::None,
        Layer::Agentd,
    )
}

/// The start event: what the agent runs under.
pub fn start_event(plan: &Plan, spawned: &Spawned, view: Duration) -> Event {
    let ll = &plan.landlock;
    let limits = &plan.policy.limits;
    event(plan, spawned.pid, Kind::Start)
        .with("profile", plan.profile.clone())
        .with("mode", format!("{:?}", plan.mode).to_lowercase())
        .with("argv", plan.command.argv.clone())
        .with("exe", plan.command.real_path.display().to_string())
        .with("workspace", plan.workspace.display().to_string())
        .with("cgroup", plan.cgroup.dir.display().to_string())
        .with(
            "cgroups_v1",
            plan.cgroup
                .v1_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>(),
        )
        .with("uid", plan.identity.uid)
        .with("gid", plan.identity.gid)
        .with("user", plan.identity.user.clone())
        .with(
            "landlock",
            match spawned.landlock {
                Enforcement::Full => "full",
                Enforcement::Partial => "partial",
            },
        )
        .with("landlock_abi", ll.kernel_abi)
        .with("landlock_missing", ll.missing.clone())
        .with(
            "landlock_skipped",
            ll.skipped()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>(),
        )
        .with("seccomp_allowed", plan.seccomp.allowed)
        .with("seccomp_listener", spawned.seccomp_listener.is_some())
        .with(
            "workspace_mode",
            format!("{:?}", plan.workspace_mode).to_lowercase(),
        )
        // What making the agent's mount namespace took, Landlock's ruleset aside.
        .with(
            "view_us",
            u64::try_from(view.as_micros()).unwrap_or(u64::MAX),
        )
        .with(
            "limits",
            json!({
                "pids": limits.pids,
                "memory": limits.memory,
                "wall_time": limits.wall_time.map(format_duration),
            }),
        )
}

/// Sends a signal to the agent's process group, or to its first process through the pidfd
/// when the group is gone.
fn forward(pid: i32, pidfd: &OwnedFd, sig: Signal) {
    // SAFETY: kill takes no pointers; the group is the agent's own (its leader is our
    // unreaped child, so the id cannot have been reused).
    if unsafe { libc::kill(-pid, sig as i32) } == 0 {
        return;
    }
    // SAFETY: pidfd_send_signal with a NULL siginfo and no flags reads no memory.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig as i32,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
}

async fn send(tx: &mpsc::Sender<Event>, e: Event) {
    // The writer only stops when every sender is gone.
    let _ = tx.send(e).await;
}

/// Supervises the agent until its first process exits; returns `agentd run`'s exit code.
pub async fn supervise(s: Supervision<'_>) -> u8 {
    let Supervision {
        plan,
        spawned,
        cgroup,
        hooks,
        sink,
        terminal,
        summary,
        mut transaction,
        view,
    } = s;
    let (tx, writer) = events::start_writer(sink);
    let pid = spawned.pid;
    let handle = AgentHandle::new(
        &plan.agent_id,
        u32::try_from(pid).unwrap_or(0),
        cgroup.clone(),
    );

    // Handlers first, then unblock: a signal that arrived meanwhile is delivered now.
    let mut streams = Vec::new();
    for sig in FORWARDED {
        match signal(SignalKind::from_raw(sig as i32)) {
            Ok(st) => streams.push((sig, st)),
            Err(e) => eprintln!("agentd: warning: cannot forward {sig}: {e}"),
        }
    }
    if streams.len() == FORWARDED.len() {
        if let Err(e) = unblock_forwarded() {
            eprintln!("agentd: warning: cannot unblock forwarded signals: {e}");
        }
    }

    // The kill switch: `agentd kill ID` (SIGUSR1 through the registration) and a second
    // Ctrl-C within DOUBLE_INTERRUPT of the first.
    let mut kill_requests = match signal(SignalKind::user_defined1()) {
        Ok(st) => Some(st),
        Err(e) => {
            eprintln!("agentd: warning: `agentd kill` cannot reach this supervisor: {e}");
            None
        }
    };
    let _registration = kill_requests
        .as_ref()
        .and_then(|_| super::control::register(&plan.agent_id));
    let mut last_interrupt: Option<Instant> = None;

    if spawned.landlock == Enforcement::Partial {
        eprintln!(
            "agentd: warning: landlock is only partially enforced: this kernel (ABI {}) lacks {}",
            plan.landlock.kernel_abi,
            plan.landlock.missing.join(", ")
        );
    }
    send(&tx, start_event(plan, &spawned, view)).await;
    hooks.started(&handle, &tx);
    // Held calls (the profile's ask rules): the hooks answer them (the kernel hooks here,
    // the daemon through its own); a hook that cannot drops the listener, and held calls
    // fail with ENOSYS instead of waiting for nobody.
    if let Some(listener) = spawned.seccomp_listener {
        hooks.serve_asks(&handle, listener, terminal.map(|t| t.prompter()));
    }

    // SAFETY: the pidfd is an OwnedFd moved into the AsyncFd: it stays open, the same file
    // description, for the AsyncFd's whole life.
    let exited = match unsafe { AsyncFd::register_with_interest(spawned.pidfd, Interest::READABLE) }
    {
        Ok(fd) => fd,
        Err(e) => {
            let (_pidfd, e) = e.into_parts();
            // Cannot watch the agent: fail closed, kill it.
            eprintln!("agentd: cannot watch the agent's process: {e}; killing it");
            let _ = cgroup.kill();
            let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None)
                .ok()
                .and_then(Ended::from_wait);
            return finish(
                plan,
                pid,
                status,
                &cgroup,
                hooks,
                &handle,
                tx,
                writer,
                &summary,
                transaction,
            )
            .await;
        }
    };
    let deadline = plan.cgroup.wall_time.map(|d| Instant::now() + d);
    let mut deadline_passed = false;
    let (mut int, mut term, mut hup, mut quit, mut winch) = split(streams);
    let mut fill_check = tokio::time::interval(FILL_CHECK);
    loop {
        tokio::select! {
            _ = fill_check.tick(), if transaction.as_ref().is_some_and(|t| !t.full_reported) => {
                if let Some(t) = transaction.as_mut()
                    && crate::sandbox::mountns::is_full(t.upper())
                {
                    t.full_reported = true;
                    send(&tx, event(plan, pid, Kind::Limit)
                        .with("limit", "transaction")
                        .with("transaction", format_bytes(plan.policy.workspace_mode.limit))
                        .with("action", "ENOSPC: the agent's writes to the workspace fail")).await;
                }
            }
            r = exited.readable() => {
                match r {
                    Ok(_) => break,
                    Err(e) => {
                        eprintln!("agentd: waiting for the agent: {e}; killing it");
                        let _ = cgroup.kill();
                        break;
                    }
                }
            }
            Some(sig) = next(&mut int) => {
                let now = Instant::now();
                if last_interrupt.is_some_and(|t| now.duration_since(t) < DOUBLE_INTERRUPT) {
                    eprintln!("agentd: second interrupt: killing the agent");
                    hooks.kill_switch(&handle, "interrupted twice").await;
                } else {
                    last_interrupt = Some(now);
                    forward(pid, exited.get_ref(), sig);
                }
            }
            Some(()) = recv_opt(&mut kill_requests) => {
                hooks.kill_switch(&handle, "agentd kill").await;
            }
            Some(sig) = next(&mut term) => forward(pid, exited.get_ref(), sig),
            Some(sig) = next(&mut hup) => forward(pid, exited.get_ref(), sig),
            Some(sig) = next(&mut quit) => forward(pid, exited.get_ref(), sig),
            Some(sig) = next(&mut winch) => match terminal {
                // The kernel tells the agent's foreground job (SIGWINCH) itself.
                Some(t) => t.resize(),
                None => forward(pid, exited.get_ref(), sig),
            },
            () = sleep_until(deadline), if !deadline_passed => {
                deadline_passed = true;
                let limit = plan.cgroup.wall_time.unwrap_or_default();
                send(&tx, event(plan, pid, Kind::Limit)
                    .with("limit", "wall_time")
                    .with("wall_time", format_duration(limit))
                    .with("action", "kill")).await;
                // The same kill the breaker uses.
                let agent = handle.clone();
                match tokio::task::spawn_blocking(move || agent.kill()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => eprintln!("agentd: wall-time limit: {e}"),
                    Err(e) => eprintln!("agentd: wall-time limit: {e}"),
                }
            }
        }
    }
    let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None)
        .ok()
        .and_then(Ended::from_wait);
    finish(
        plan,
        pid,
        status,
        &cgroup,
        hooks,
        &handle,
        tx,
        writer,
        &summary,
        transaction,
    )
    .await
}

type Stream = Option<(Signal, tokio::signal::unix::Signal)>;

fn split(
    streams: Vec<(Signal, tokio::signal::unix::Signal)>,
) -> (Stream, Stream, Stream, Stream, Stream) {
    let mut it = streams.into_iter();
    let mut take = |want: Signal| {
        // streams are in FORWARDED order, possibly with gaps
        it.by_ref().find(|(s, _)| *s == want)
    };
    (
        take(Signal::SIGINT),
        take(Signal::SIGTERM),
        take(Signal::SIGHUP),
        take(Signal::SIGQUIT),
        take(Signal::SIGWINCH),
    )
}

async fn next(stream: &mut Stream) -> Option<Signal> {
    match stream {
        Some((sig, st)) => st.recv().await.map(|()| *sig),
        None => std::future::pending().await,
    }
}

/// How often a transaction's upper tmpfs is checked for being full.
const FILL_CHECK: Duration = Duration::from_millis(500);

/// A second SIGINT within this long of the first is the kill switch.
const DOUBLE_INTERRUPT: Duration = Duration::from_secs(2);

async fn recv_opt(stream: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match stream {
        Some(st) => st.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// After the first process ended: report, kill what is left, remove the cgroups.
#[expect(
    clippy::too_many_arguments,
    reason = "the supervisor's whole state, once"
)]
async fn finish(
    plan: &Plan,
    pid: i32,
    status: Option<Ended>,
    cgroup: &Arc<AgentCgroup>,
    hooks: &mut dyn AgentHooks,
    handle: &AgentHandle,
    tx: mpsc::Sender<Event>,
    writer: tokio::task::JoinHandle<super::summary::Tally>,
    summary: &super::summary::Said,
    transaction: Option<super::txn::Open>,
) -> u8 {
    for (limit, count) in cgroup.limit_hits() {
        send(
            &tx,
            event(plan, pid, Kind::Limit)
                .with("limit", limit)
                .with("count", count),
        )
        .await;
    }
    // The hooks settle first (the breaker drains the agent's last kernel events, which
    // may trip it), so the exit event is the last one and carries the final status.
    hooks.finished(handle).await;
    let left_behind = cgroup.pids().map(|p| p.len()).unwrap_or(0);
    let mut code = status.map_or(125, Ended::exit_code);
    let exit = event(plan, pid, Kind::Exit).with("left_behind", left_behind);
    let mut exit = match status {
        Some(s) => s.detail(exit),
        None => exit.with("reason", "the agent's exit status is unknown"),
    };
    let mut stopped = false;
    if let Some((verdict, line)) = hooks.verdict() {
        stopped = true;
        match status.filter(|s| !s.killed()) {
            // Killed (SIGKILL: the kill reached it), or unknown: the trip's status.
            None => {
                eprintln!("agentd: {line}");
                exit = exit.with("agent_status", code).with("verdict", line);
                code = verdict;
            }
            // The first process had ended on its own before the kill reached it: that is
            // the run's status, and the trip is reported as late.
            Some(ended) => {
                eprintln!(
                    "agentd: the agent had already exited ({}) when the breaker acted; {line}",
                    ended.describe()
                );
                exit = exit.with("late_trip", line);
            }
        }
    }
    send(&tx, exit.with("exit_code", code)).await;

    // No process of the agent survives agentd run: kill, wait until empty, rmdir.
    let cg = cgroup.clone();
    let emptied = match tokio::task::spawn_blocking(move || cg.destroy()).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            eprintln!("agentd: cleaning up the agent: {e}");
            false
        }
        Err(e) => {
            eprintln!("agentd: cleaning up the agent: {e}");
            false
        }
    };
    // The transaction, now that no process of the agent can write to it.
    if let Some(open) = transaction {
        let outcome = super::txn::Outcome {
            exit_code: code,
            stopped: stopped || status.is_none_or(Ended::killed),
            emptied,
            describe: match status {
                Some(s) if stopped => format!("stopped ({})", s.describe()),
                Some(s) => s.describe(),
                None => "unknown".into(),
            },
        };
        let ended = match tokio::task::spawn_blocking(move || super::txn::end(open, &outcome)).await
        {
            Ok(e) => Some(e),
            Err(e) => {
                eprintln!("agentd: the transaction: {e}");
                None
            }
        };
        if let Some(ended) = ended {
            let mut ev = event(plan, pid, Kind::Transaction)
                .with("transaction", ended.id.as_str())
                .with("state", ended.state)
                .with("files", ended.files)
                .with("bytes", ended.bytes);
            if !ended.conflicts.is_empty() {
                ev = ev.with("conflicts", ended.conflicts.len());
            }
            if let Some(e) = &ended.error {
                eprintln!("agentd: transaction {}: {e}", ended.id);
                ev = ev.with("reason", e.as_str());
            }
            send(&tx, ev).await;
            if !ended.text.is_empty() {
                eprint!("{}", ended.text);
            }
        }
    }
    drop(tx);
    let tally = tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .ok()
        .and_then(Result::ok);
    if !summary.quiet
        && let Some(text) = tally.and_then(|t| t.render(summary.events.as_deref()))
    {
        eprint!("{text}");
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::Pid;

    #[test]
    fn only_a_sigkill_is_the_breakers_doing() {
        assert!(
            Ended::Signal {
                signal: libc::SIGKILL,
                core_dumped: false
            }
            .killed()
        );
        assert!(!Ended::Code(0).killed(), "finished on its own first");
        assert!(!Ended::Code(137).killed(), "an exit status is not a signal");
        assert!(
            !Ended::Signal {
                signal: libc::SIGTERM,
                core_dumped: false
            }
            .killed()
        );
        assert_eq!(Ended::Code(3).describe(), "status 3");
        assert_eq!(
            Ended::Signal {
                signal: libc::SIGTERM,
                core_dumped: false
            }
            .describe(),
            "signal 15 (SIGTERM)"
        );
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        let p = Pid::from_raw(1);
        let code = |s| Ended::from_wait(s).unwrap().exit_code();
        assert_eq!(code(WaitStatus::Exited(p, 0)), 0);
        assert_eq!(code(WaitStatus::Exited(p, 3)), 3);
        assert_eq!(code(WaitStatus::Signaled(p, Signal::SIGKILL, false)), 137);
        assert_eq!(code(WaitStatus::Signaled(p, Signal::SIGSEGV, true)), 139);
        assert_eq!(code(WaitStatus::Signaled(p, Signal::SIGTERM, false)), 143);
        assert!(Ended::from_wait(WaitStatus::StillAlive).is_none());
    }

    #[test]
    fn exit_events_carry_code_or_signal() {
        let base = || Event::new("a", 1, "sh", Kind::Exit, Verdict::None, Layer::Agentd);
        let e = Ended::Code(3).detail(base());
        assert_eq!(e.detail["code"], 3);
        let e = Ended::Signal {
            signal: 9,
            core_dumped: false,
        }
        .detail(base());
        assert_eq!(e.detail["signal"], 9);
        assert_eq!(e.detail["signal_name"], "SIGKILL");
    }
}
