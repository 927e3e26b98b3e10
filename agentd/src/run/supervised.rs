//! `agentd run` as one of a daemon's supervisors: the daemon started it (with the client's
//! stdio and identity) and owns the eBPF watch and the breaker; this process launches and
//! supervises the agent exactly as the embedded mode does, and asks the daemon, over the
//! socketpair it inherited as fd [`SUPERVISOR_FD`], to attach the watch before the agent's
//! first process exists and to settle when it ends.
//!
//! If the daemon goes away (its end of the socketpair closes), the agent is killed at once:
//! no agent runs without the daemon that watches it (the agent's cgroup programs are
//! pinned by the daemon and keep deciding its network meanwhile).

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
    net::unix::OwnedWriteHalf,
    sync::mpsc,
};

use super::{
    hooks::{AgentHandle, AgentHooks, AgentInfo, HookError},
    kernel::EXIT_TRIPPED,
};
use crate::{
    event::Event,
    link::{
        self as proto, SUPERVISOR_ENV, SUPERVISOR_FD, SUPERVISOR_TERMINAL_ENV, SupervisorLine,
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
    /// The seccomp listener, until the daemon said it has its copy.
    listener: Arc<Mutex<Option<OwnedFd>>>,
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
        Ok(DaemonHooks {
            blocking: Some(UnixStream::from(owned)),
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

impl AgentHooks for DaemonHooks {
    fn before_spawn(&mut self, agent: AgentInfo<'_>) -> Result<(), HookError> {
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
            other @ (ToSupervisor::Verdict(_) | ToSupervisor::Listening(_)) => Err(hook_error(
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
        let agent = agent.clone();
        let killed_by = Arc::clone(&self.killed_by);
        let listener = Arc::clone(&self.listener);
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(read).lines();
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) => match proto::decode::<ToSupervisor>(line.as_bytes()) {
                        Ok(ToSupervisor::Verdict(v)) => {
                            let _ = tx.send(v).await;
                        }
                        Ok(ToSupervisor::Listening(took)) => {
                            // The daemon has its copy, or will never answer: either way
                            // this one goes (held calls fail if nobody holds one).
                            if !took {
                                eprintln!(
                                    "agentd: the daemon cannot answer held calls; they are refused"
                                );
                            }
                            lock(&listener).take();
                        }
                        Ok(other) => tracing::warn!("unexpected from the daemon: {other:?}"),
                        Err(e) => tracing::warn!("bad line from the daemon: {e}"),
                    },
                    Ok(None) | Err(_) => {
                        // The daemon is gone: nothing watches the agent any more. Fail
                        // closed.
                        *lock(&killed_by) = Some(
                            "the agentd daemon went away; the agent was killed (fail closed)"
                                .into(),
                        );
                        if let Err(e) = agent.signal_kill() {
                            eprintln!("agentd: killing the agent: {e}");
                        }
                        return;
                    }
                }
            }
        });
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
            self.tell(&SupervisorLine::KillSwitch {
                reason: reason.to_owned(),
            })
            .await;
            // The daemon sets the kill flag and kills the cgroup; make sure of the latter.
            agent.kill_and_wait("kill switch").await;
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
