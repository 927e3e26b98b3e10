//! `agentd run` as one of a daemon's supervisors: the daemon started it (with the client's
//! stdio and identity) and owns the eBPF watch and the breaker; this process launches and
//! supervises the agent exactly as the embedded mode does, and asks the daemon, over the
//! socketpair it inherited as fd [`SUPERVISOR_FD`], to attach the watch before the agent's
//! first process exists and to settle when it ends.
//!
//! If the daemon goes away (its end of the socketpair closes), the agent is killed at once:
//! no agent runs without the daemon that watches it (the agent's cgroup programs are
//! pinned by the daemon and keep deciding its network meanwhile). Unless the daemon said
//! it hands over to a successor ([`ToSupervisor::Handover`]): then this process reconnects
//! to the control socket with a `resume` request, passing the read end of its events pipe
//! (which it holds, so nothing it writes meanwhile is lost), and goes on with the daemon
//! that answers; if none does within the grace period, it kills the agent.

use std::{
    future::Future,
    io::{BufRead as _, BufReader, Write as _},
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::net::UnixStream,
    },
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::unix::{OwnedReadHalf, OwnedWriteHalf},
    sync::mpsc,
};

use super::{
    hooks::{AgentHandle, AgentHooks, AgentInfo, HookError},
    kernel::EXIT_TRIPPED,
};
use crate::{
    daemon::proto::Request,
    event::Event,
    link::{
        self as proto, SUPERVISOR_ENV, SUPERVISOR_EVENTS_READ_ENV, SUPERVISOR_EVENTS_READ_FD,
        SUPERVISOR_FD, SUPERVISOR_SOCKET_ENV, SUPERVISOR_TERMINAL_ENV, SupervisorLine,
        ToSupervisor,
    },
};

/// How long `finished` waits for the daemon's verdict.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether this `agentd run` was started by a daemon as a supervisor.
pub fn is_supervised() -> bool {
    std::env::var_os(SUPERVISOR_ENV).is_some()
}

/// Whether this supervisor's stdin is the agent's terminal (the daemon's client made it).
pub fn terminal_is_stdin() -> bool {
    is_supervised() && std::env::var_os(SUPERVISOR_TERMINAL_ENV).is_some_and(|v| v == "1")
}

#[derive(Debug, thiserror::Error)]
enum SupervisedError {
    #[error("the daemon's socket (fd {SUPERVISOR_FD}): {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon refused: {0}")]
    Refused(String),
    #[error("the daemon answered {0:?}")]
    Unexpected(String),
}

fn hook_error(hook: &'static str, e: SupervisedError) -> HookError {
    HookError {
        hook,
        source: Box::new(e),
    }
}

/// The hooks of a supervised `agentd run`.
#[derive(Debug, Default)]
pub struct DaemonHooks {
    /// Until `started`: the blocking socket.
    blocking: Option<UnixStream>,
    /// After `started`: the socket's write half (shared with the task that hands over
    /// the seccomp listener).
    writer: Arc<tokio::sync::Mutex<Option<OwnedWriteHalf>>>,
    verdicts: Option<mpsc::Receiver<Option<String>>>,
    killed_by: Arc<Mutex<Option<String>>>,
    /// The seccomp listener: kept while a daemon answers held calls (a successor takes
    /// its copy from here), closed when none can.
    listener: Arc<Mutex<Option<OwnedFd>>>,
    /// The agent's id, once attached.
    agent_id: String,
    /// The read end of the events pipe, held for a successor daemon.
    events_read: Option<Arc<OwnedFd>>,
    /// Whether a daemon reads this supervisor's lines, after `started`.
    linked: Option<tokio::sync::watch::Receiver<Linked>>,
}

/// The state of the link to the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Linked {
    Up,
    /// The daemon handed the agent over: the next one has not taken it yet.
    HandingOver,
    /// No daemon, and none to come: the agent was killed.
    Down,
}

impl DaemonHooks {
    /// Takes the inherited socket. Call once, in a process the daemon started.
    pub fn from_env() -> Result<DaemonHooks, HookError> {
        let fd = std::env::var(SUPERVISOR_ENV)
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .filter(|fd| *fd == SUPERVISOR_FD)
            .ok_or_else(|| {
                hook_error(
                    "daemon",
                    SupervisedError::Unexpected(format!("{SUPERVISOR_ENV} is not {SUPERVISOR_FD}")),
                )
            })?;
        // SAFETY: the daemon passes its end of a socketpair as this fd, and nothing else in
        // this process owns it; the launch closes it in the agent (close_range).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // Never inherited by the agent, whatever the launch closes.
        nix::fcntl::fcntl(
            &owned,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(|e| hook_error("daemon", SupervisedError::Io(e.into())))?;
        // The read end of the events pipe (a copy of the daemon's), when it passed one.
        let passed = std::env::var(SUPERVISOR_EVENTS_READ_ENV)
            .is_ok_and(|v| v == SUPERVISOR_EVENTS_READ_FD.to_string());
        // SAFETY: fcntl on an integer descriptor, no pointers; it fails (EBADF) when the
        // descriptor is not open.
        let open = passed
            && unsafe { libc::fcntl(SUPERVISOR_EVENTS_READ_FD, libc::F_SETFD, libc::FD_CLOEXEC) }
                == 0;
        let events_read = open.then(|| {
            // SAFETY: the daemon passes the read end of its events pipe as this fd (its
            // environment says so, and it is open), and nothing else in this process
            // owns it.
            Arc::new(unsafe { OwnedFd::from_raw_fd(SUPERVISOR_EVENTS_READ_FD) })
        });
        Ok(DaemonHooks {
            blocking: Some(UnixStream::from(owned)),
            events_read,
            ..DaemonHooks::default()
        })
    }

    fn ask(&mut self, line: &SupervisorLine) -> Result<ToSupervisor, SupervisedError> {
        let sock = self
            .blocking
            .as_mut()
            .ok_or_else(|| SupervisedError::Unexpected("no socket".into()))?;
        sock.write_all(&proto::encode(line))?;
        let mut reply = Vec::new();
        BufReader::new(&*sock).read_until(b'\n', &mut reply)?;
        if reply.last() != Some(&b'\n') {
            return Err(SupervisedError::Io(
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        reply.pop();
        proto::decode(&reply).map_err(|e| SupervisedError::Unexpected(e.to_string()))
    }

    async fn tell(&mut self, line: &SupervisorLine) {
        // During a handover the line waits for the next daemon (the link gives up, and
        // says so, once the grace period is over).
        if let Some(linked) = self.linked.as_mut() {
            let _ = linked.wait_for(|l| *l != Linked::HandingOver).await;
        }
        if let Some(w) = self.writer.lock().await.as_mut()
            && let Err(e) = w.write_all(&proto::encode(line)).await
        {
            eprintln!("agentd: telling the daemon: {e}");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How often a handed-over supervisor tries the control socket again.
const RESUME_RETRY: Duration = Duration::from_millis(100);

/// The task that reads the daemon's lines, and follows the agent to a successor daemon.
struct Link {
    linked: tokio::sync::watch::Sender<Linked>,
    agent: AgentHandle,
    agent_id: String,
    killed_by: Arc<Mutex<Option<String>>>,
    listener: Arc<Mutex<Option<OwnedFd>>>,
    writer: Arc<tokio::sync::Mutex<Option<OwnedWriteHalf>>>,
    events_read: Option<Arc<OwnedFd>>,
    verdicts: mpsc::Sender<Option<String>>,
}

/// Why a `resume` did not go through.
enum ResumeError {
    /// A daemon answered, and said no.
    Refused(String),
    /// None answered (yet).
    Unreachable(String),
}

impl Link {
    async fn follow(self, read: OwnedReadHalf) {
        let mut lines = tokio::io::BufReader::new(read).lines();
        let mut handover: Option<tokio::time::Instant> = None;
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => match proto::decode::<ToSupervisor>(line.as_bytes()) {
                    Ok(ToSupervisor::Verdict(v)) => {
                        let _ = self.verdicts.send(v).await;
                    }
                    Ok(ToSupervisor::Listening(true)) => {}
                    Ok(ToSupervisor::Listening(false)) => {
                        // Nobody will answer: held calls fail (ENOSYS) once no copy of
                        // the listener is open, instead of waiting forever.
                        eprintln!("agentd: the daemon cannot answer held calls; they are refused");
                        lock(&self.listener).take();
                    }
                    Ok(ToSupervisor::Handover { grace_s }) => {
                        handover = Some(tokio::time::Instant::now() + Duration::from_secs(grace_s));
                        self.linked.send_replace(Linked::HandingOver);
                    }
                    Ok(other) => tracing::warn!("unexpected from the daemon: {other:?}"),
                    Err(e) => tracing::warn!("bad line from the daemon: {e}"),
                },
                Ok(None) | Err(_) => {
                    // The daemon is gone. Unless it handed the agent over, nothing watches
                    // the agent any more: fail closed.
                    let Some(deadline) = handover.take() else {
                        self.fail_closed(
                            "the agentd daemon went away; the agent was killed (fail closed)",
                        );
                        return;
                    };
                    match self.resume(deadline).await {
                        Ok(read) => {
                            lines = tokio::io::BufReader::new(read).lines();
                            self.linked.send_replace(Linked::Up);
                        }
                        Err(why) => {
                            self.fail_closed(&format!(
                                "the agentd daemon handed the agent over and {why}; the agent was killed (fail closed)"
                            ));
                            return;
                        }
                    }
                }
            }
        }
    }

    fn fail_closed(&self, why: &str) {
        self.linked.send_replace(Linked::Down);
        *lock(&self.killed_by) = Some(why.to_owned());
        if let Err(e) = self.agent.signal_kill() {
            eprintln!("agentd: killing the agent: {e}");
        }
    }

    /// Reconnects to the daemon that took over, until the deadline: a `resume` request
    /// with the events pipe's read end, answered `adopted`. Then the held listener goes to
    /// the new daemon as it went to the old one.
    async fn resume(&self, deadline: tokio::time::Instant) -> Result<OwnedReadHalf, String> {
        let path = std::env::var_os(SUPERVISOR_SOCKET_ENV)
            .map(std::path::PathBuf::from)
            .ok_or_else(|| format!("no socket to reconnect to ({SUPERVISOR_SOCKET_ENV})"))?;
        let line = proto::encode(&Request::Resume {
            agent: self.agent_id.clone(),
        });
        loop {
            let (path, line, events) = (path.clone(), line.clone(), self.events_read.clone());
            // A daemon that accepted the connection answers once it is ready: wait for
            // that as long as the grace period lasts.
            let patience = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .max(RESUME_RETRY);
            let tried =
                tokio::task::spawn_blocking(move || try_resume(&path, &line, events, patience))
                    .await
                    .unwrap_or_else(|e| Err(ResumeError::Unreachable(e.to_string())));
            let last = match tried {
                Ok(stream) => {
                    let stream = stream
                        .set_nonblocking(true)
                        .and_then(|()| tokio::net::UnixStream::from_std(stream))
                        .map_err(|e| format!("the new daemon's socket: {e}"))?;
                    let (read, write) = stream.into_split();
                    *self.writer.lock().await = Some(write);
                    let fd = lock(&self.listener)
                        .as_ref()
                        .map(std::os::fd::AsRawFd::as_raw_fd);
                    if let Some(fd) = fd
                        && let Some(w) = self.writer.lock().await.as_mut()
                        && let Err(e) = w
                            .write_all(&proto::encode(&SupervisorLine::Listener { fd }))
                            .await
                    {
                        eprintln!("agentd: telling the daemon: {e}; held calls are refused");
                        lock(&self.listener).take();
                    }
                    return Ok(read);
                }
                Err(ResumeError::Refused(why)) => {
                    return Err(format!("the new daemon refused it: {why}"));
                }
                Err(ResumeError::Unreachable(why)) => why,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "no daemon took it within the grace period ({last})"
                ));
            }
            tokio::time::sleep(RESUME_RETRY).await;
        }
    }
}

/// One `resume` attempt: connect, send the request with the events pipe's read end, read
/// the answer.
fn try_resume(
    path: &std::path::Path,
    line: &[u8],
    events: Option<Arc<OwnedFd>>,
    patience: Duration,
) -> Result<UnixStream, ResumeError> {
    use std::os::fd::AsRawFd as _;
    let unreachable = |e: std::io::Error| ResumeError::Unreachable(e.to_string());
    let sock = UnixStream::connect(path).map_err(unreachable)?;
    let fds: Vec<i32> = events.iter().map(|fd| fd.as_raw_fd()).collect();
    proto::send_with_fds(std::os::fd::AsFd::as_fd(&sock), line, &fds).map_err(unreachable)?;
    // Not waited for past the grace period.
    sock.set_read_timeout(Some(patience)).map_err(unreachable)?;
    let mut reply = Vec::new();
    BufReader::new(&sock)
        .read_until(b'\n', &mut reply)
        .map_err(unreachable)?;
    if reply.pop() != Some(b'\n') {
        return Err(ResumeError::Unreachable(
            "the daemon closed the connection".into(),
        ));
    }
    sock.set_read_timeout(None).map_err(unreachable)?;
    match proto::decode::<ToSupervisor>(&reply) {
        Ok(ToSupervisor::Adopted) => Ok(sock),
        Ok(ToSupervisor::Refused(why)) => Err(ResumeError::Refused(why)),
        // An error reply of the control protocol (the daemon is still starting, ...).
        _ => Err(ResumeError::Refused(
            String::from_utf8_lossy(&reply).into_owned(),
        )),
    }
}

impl AgentHooks for DaemonHooks {
    fn before_spawn(&mut self, agent: AgentInfo<'_>) -> Result<(), HookError> {
        self.agent_id = agent.agent_id.to_owned();
        let reply = self
            .ask(&SupervisorLine::Attach {
                agent: agent.agent_id.to_owned(),
                cgroup: agent.cgroup_dir.to_path_buf(),
                uid: agent.uid,
                gid: agent.gid,
                workspace: agent.policy.workspace.clone(),
                home: agent.policy.home.clone(),
            })
            .map_err(|e| hook_error("kernel watch (daemon)", e))?;
        match reply {
            ToSupervisor::Attached => Ok(()),
            ToSupervisor::Refused(why) => Err(hook_error(
                "kernel watch (daemon)",
                SupervisedError::Refused(why),
            )),
            other @ (ToSupervisor::Verdict(_)
            | ToSupervisor::Listening(_)
            | ToSupervisor::Handover { .. }
            | ToSupervisor::Adopted) => Err(hook_error(
                "kernel watch (daemon)",
                SupervisedError::Unexpected(format!("{other:?}")),
            )),
        }
    }

    fn started(&mut self, agent: &AgentHandle, _events: &mpsc::Sender<Event>) {
        let Some(mut std_sock) = self.blocking.take() else {
            return;
        };
        // The daemon counts the agent as running from here (a blocking write of one short
        // line, before the socket goes to the runtime).
        if let Err(e) =
            std_sock.write_all(&proto::encode(&SupervisorLine::Started { pid: agent.pid }))
        {
            eprintln!("agentd: telling the daemon: {e}");
        }
        let sock = match std_sock
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(std_sock))
        {
            Ok(s) => s,
            Err(e) => {
                eprintln!("agentd: cannot watch the daemon's socket: {e}; killing the agent");
                let _ = agent.signal_kill();
                return;
            }
        };
        let (read, write) = sock.into_split();
        self.writer = Arc::new(tokio::sync::Mutex::new(Some(write)));
        let (tx, rx) = mpsc::channel(1);
        self.verdicts = Some(rx);
        let (linked, linked_rx) = tokio::sync::watch::channel(Linked::Up);
        self.linked = Some(linked_rx);
        let link = Link {
            linked,
            agent: agent.clone(),
            agent_id: self.agent_id.clone(),
            killed_by: Arc::clone(&self.killed_by),
            listener: Arc::clone(&self.listener),
            writer: Arc::clone(&self.writer),
            events_read: self.events_read.clone(),
            verdicts: tx,
        };
        tokio::spawn(link.follow(read));
    }

    fn serve_asks(
        &mut self,
        _agent: &AgentHandle,
        listener: OwnedFd,
        _prompter: Option<super::terminal::Prompter>,
    ) {
        // The daemon answers (and the client relaying the agent's terminal prompts): it
        // takes a copy of the descriptor from this process, which keeps it until then.
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        *lock(&self.listener) = Some(listener);
        let line = proto::encode(&SupervisorLine::Listener { fd });
        let writer = Arc::clone(&self.writer);
        let slot = Arc::clone(&self.listener);
        tokio::spawn(async move {
            let sent = match writer.lock().await.as_mut() {
                Some(w) => w.write_all(&line).await,
                None => Err(std::io::ErrorKind::NotConnected.into()),
            };
            if let Err(e) = sent {
                eprintln!("agentd: telling the daemon: {e}; held calls are refused");
                lock(&slot).take();
            }
        });
    }

    fn finished<'a>(
        &'a mut self,
        _agent: &'a AgentHandle,
    ) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        Box::pin(async move {
            self.tell(&SupervisorLine::Finished).await;
            let Some(rx) = self.verdicts.as_mut() else {
                return;
            };
            match tokio::time::timeout(VERDICT_TIMEOUT, rx.recv()).await {
                Ok(Some(Some(line))) => *lock(&self.killed_by) = Some(line),
                Ok(Some(None)) => {}
                Ok(None) => {} // the daemon went away; the reader said so
                Err(_) => eprintln!("agentd: the daemon did not answer within {VERDICT_TIMEOUT:?}"),
            }
        })
    }

    fn kill_switch<'a>(
        &'a mut self,
        agent: &'a AgentHandle,
        reason: &'a str,
    ) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        Box::pin(async move {
            // The daemon sets the kill flag and kills the cgroup; the kill is made sure of
            // here too, at once (during a handover the line waits for the next daemon).
            let line = SupervisorLine::KillSwitch {
                reason: reason.to_owned(),
            };
            tokio::join!(self.tell(&line), agent.kill_and_wait("kill switch"));
            let mut k = lock(&self.killed_by);
            if k.is_none() {
                *k = Some(format!("killed by the kill switch ({reason})"));
            }
        })
    }

    fn verdict(&self) -> Option<(u8, String)> {
        lock(&self.killed_by)
            .clone()
            .map(|line| (EXIT_TRIPPED, line))
    }
}
