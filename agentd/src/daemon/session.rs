//! One supervised agent as the daemon serves it: its supervisor's lines, the supervisor's
//! own events (a pipe), and the `run` client following it — the one that launched it, or
//! one that reattached after a handover (`handover.rs`).

use std::{io::Cursor, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader, Lines},
    net::unix::{OwnedReadHalf, OwnedWriteHalf},
    sync::{broadcast, mpsc, watch},
};

use super::{
    FORWARDABLE, Shared, ask, forward_event, handle_event, lock, proto, recorded, retire, send,
    supervisor_line,
};
use crate::{
    audit::record::Actor,
    daemon::proto::{ClientLine, Reply, RunRequest},
    event::{Event, Kind},
    link::ToSupervisor,
};

/// How long an agent taken over that has ended waits for its `run` client to reattach,
/// to give it the exit status.
const LATE_CLIENT: Duration = Duration::from_secs(10);

/// A `run` client's lines: what came with its request, then the socket.
pub(super) type ClientReader = tokio::io::Chain<Cursor<Vec<u8>>, OwnedReadHalf>;

/// The `run` client of an agent.
pub(super) struct Client {
    lines: Lines<BufReader<ClientReader>>,
    write: OwnedWriteHalf,
}

impl Client {
    pub(super) fn new(read: OwnedReadHalf, rest: Vec<u8>, write: OwnedWriteHalf) -> Client {
        Client {
            lines: BufReader::new(Cursor::new(rest).chain(read)).lines(),
            write,
        }
    }
}

/// The supervisor's ends: its socket and its events pipe.
pub(super) struct Supervisor {
    pub lines: Lines<BufReader<OwnedReadHalf>>,
    pub write: OwnedWriteHalf,
    pub events: Lines<BufReader<tokio::net::unix::pipe::Receiver>>,
    pub pid: u32,
}

/// A daemon stopping for a successor tells each session: the grace period, the agents
/// handed over, and where to say it has passed the word on.
pub(super) type HandoverSignal = Option<(u64, Arc<Vec<String>>, mpsc::Sender<()>)>;

pub(super) struct Session {
    pub shared: Arc<Shared>,
    /// Who launched the agent.
    pub who: Actor,
    pub req: RunRequest,
    pub agent_id: Option<String>,
    pub sup: Supervisor,
    pub client: Option<Client>,
    /// The agent's events for the client, with `run --events`.
    pub client_events: Option<broadcast::Receiver<Arc<Event>>>,
    /// The `exit_code` of the agent's exit event, as its supervisor reported it.
    pub exit_code: Option<u8>,
}

/// How a session ended.
pub(super) enum Ended {
    /// The supervisor (the daemon's child) exited with this status.
    Child(std::io::Result<std::process::ExitStatus>),
    /// The supervisor closed its socket and pipe (a supervisor taken over from a previous
    /// daemon is not this one's child).
    Closed,
}

impl Session {
    /// Serves until the supervisor is done. `child`: the supervisor, when this daemon
    /// started it; `late`: clients that reattach after a handover.
    pub(super) async fn serve(
        &mut self,
        mut child: Option<&mut tokio::process::Child>,
        mut late: Option<mpsc::UnboundedReceiver<Client>>,
        mut handover: watch::Receiver<HandoverSignal>,
    ) -> Ended {
        let shared = Arc::clone(&self.shared);
        // Requests to show on the agent's terminal (the client relays it), and what
        // became of them.
        let (prompts_tx, mut prompts_rx) = mpsc::unbounded_channel::<Reply>();
        if let Some(id) = &self.agent_id
            && let Some(a) = lock(&shared.agents).get_mut(id)
        {
            a.asking.to_client = Some(prompts_tx.clone());
        }
        let (mut sup_open, mut events_open) = (true, true);
        loop {
            let client_open = self.client.is_some();
            tokio::select! {
                Some(reply) = prompts_rx.recv(), if client_open => self.tell_client(&reply).await,
                line = self.sup.lines.next_line(), if sup_open => match line {
                    Ok(Some(line)) => {
                        let reply = supervisor_line(&shared, &self.who, &self.req, &line, &mut self.agent_id, self.sup.pid).await;
                        if let Some(reply) = reply {
                            if matches!(reply, ToSupervisor::Attached)
                                && let Some(id) = self.agent_id.clone()
                            {
                                if let Some(a) = lock(&shared.agents).get_mut(&id) {
                                    a.asking.to_client = Some(prompts_tx.clone());
                                }
                                self.started(&id).await;
                            }
                            if self.sup.write.write_all(&proto::encode(&reply)).await.is_err() {
                                sup_open = false;
                            }
                        }
                    }
                    Ok(None) | Err(_) => sup_open = false,
                },
                line = self.sup.events.next_line(), if events_open => match line {
                    Ok(Some(line)) => self.supervisor_event(&line),
                    Ok(None) | Err(_) => events_open = false,
                },
                ev = async {
                    match self.client_events.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let agent = self.agent_id.clone();
                    let forwarded = match self.client.as_mut() {
                        Some(c) => forward_event(&mut c.write, agent.as_deref(), ev).await,
                        None => false,
                    };
                    if !forwarded {
                        self.client_events = None;
                    }
                },
                line = async {
                    match self.client.as_mut() {
                        Some(c) => c.lines.next_line().await,
                        None => std::future::pending().await,
                    }
                } => self.client_line(line).await,
                Some(client) = async {
                    match late.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.client = Some(client);
                    if let Some(id) = self.agent_id.clone() {
                        self.started(&id).await;
                    }
                },
                Ok(()) = handover.changed() => {
                    let signal = handover.borrow_and_update().clone();
                    if let Some((grace_s, handed, done)) = signal
                        && self.agent_id.as_ref().is_some_and(|id| handed.contains(id))
                    {
                        let line = proto::encode(&ToSupervisor::Handover { grace_s });
                        let _ = self.sup.write.write_all(&line).await;
                        self.tell_client(&Reply::Handover { grace_s }).await;
                        let _ = done.send(()).await;
                    }
                },
                st = async {
                    match child.as_mut() {
                        Some(c) => c.wait().await,
                        None => std::future::pending().await,
                    }
                } => return self.finish(Ended::Child(st)).await,
            }
            if child.is_none() && !sup_open && !events_open {
                // An agent taken over that ended before its client followed it: the
                // client is on its way (it retries every 100 ms once its daemon went).
                if self.client.is_none()
                    && let Some(rx) = late.as_mut()
                    && let Ok(Some(client)) = tokio::time::timeout(LATE_CLIENT, rx.recv()).await
                {
                    self.client = Some(client);
                    if let Some(id) = self.agent_id.clone() {
                        self.started(&id).await;
                    }
                }
                return self.finish(Ended::Closed).await;
            }
        }
    }

    /// The client learns the agent runs (and, with `--events`, follows its events).
    async fn started(&mut self, id: &str) {
        let events = self.req.events;
        let shared = Arc::clone(&self.shared);
        if let Some(c) = self.client.as_mut() {
            if events {
                self.client_events = Some(shared.events.subscribe());
            }
            let _ = send(
                &mut c.write,
                &Reply::Started {
                    agent: id.to_owned(),
                },
            )
            .await;
        }
    }

    async fn tell_client(&mut self, reply: &Reply) {
        if let Some(c) = self.client.as_mut() {
            let _ = send(&mut c.write, reply).await;
        }
    }

    fn supervisor_event(&mut self, line: &str) {
        match serde_json::from_str::<Event>(line) {
            Ok(ev) => {
                if ev.kind == Kind::Exit
                    && let Some(code) = ev
                        .detail
                        .get("exit_code")
                        .and_then(serde_json::Value::as_u64)
                {
                    self.exit_code = u8::try_from(code).ok();
                }
                handle_event(&self.shared, ev);
            }
            Err(e) => tracing::warn!("bad event line from the supervisor: {e}"),
        }
    }

    async fn client_line(&mut self, line: std::io::Result<Option<String>>) {
        let shared = Arc::clone(&self.shared);
        let pid = self.sup.pid;
        let cgroup = || {
            self.agent_id
                .as_ref()
                .and_then(|id| lock(&shared.agents).get(id).map(|a| a.cgroup.clone()))
        };
        let Some(c) = self.client.as_mut() else {
            return;
        };
        match line {
            Ok(Some(line)) => match proto::decode::<ClientLine>(line.as_bytes()) {
                Ok(ClientLine::Signal(sig)) if FORWARDABLE.contains(&sig) && pid != 0 => {
                    // SAFETY: kill takes a pid and a signal number, no pointers.
                    unsafe { libc::kill(pid as i32, sig) };
                }
                Ok(ClientLine::Signal(sig)) => {
                    let _ = send(
                        &mut c.write,
                        &Reply::Error(format!("signal {sig} is not forwarded")),
                    )
                    .await;
                }
                Ok(ClientLine::Freeze(frozen)) => {
                    // The answer is the state the cgroup is in now, whatever happened.
                    let now = cgroup().is_some_and(|dir| {
                        let file = dir.join("cgroup.freeze");
                        if let Err(e) = std::fs::write(&file, if frozen { "1" } else { "0" }) {
                            eprintln!("agentd daemon: {}: {e}", file.display());
                        }
                        std::fs::read_to_string(&file).is_ok_and(|v| v.trim() == "1")
                    });
                    let _ = send(&mut c.write, &Reply::Frozen(now)).await;
                }
                Ok(ClientLine::Answer { request, answer }) => {
                    if let Some(id) = self.agent_id.as_ref() {
                        ask::terminal_answer(&shared, id, &request, answer);
                    }
                }
                Err(e) => {
                    let _ = send(&mut c.write, &Reply::Error(e.to_string())).await;
                }
            },
            Ok(None) | Err(_) => {
                // The client went away: its terminal hung up. An agent it had frozen
                // (Ctrl-Z) is thawed first, or the hangup would wait forever.
                self.client = None;
                self.client_events = None;
                if let Some(dir) = cgroup() {
                    let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
                }
                if pid != 0 {
                    // SAFETY: as above.
                    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
                }
            }
        }
    }

    /// The supervisor is done: its last events, then the client's, then the exit status.
    async fn finish(&mut self, ended: Ended) -> Ended {
        // The supervisor's last events (exit) are in the pipe.
        while let Ok(Ok(Some(line))) =
            tokio::time::timeout(Duration::from_secs(2), self.sup.events.next_line()).await
        {
            self.supervisor_event(&line);
        }
        // The supervisor's exit can win the race with the event stream above: wait until
        // all it said is recorded (published to subscribers), then forward what this
        // client has not had yet, its exit event among it.
        recorded(&self.shared).await;
        let agent = self.agent_id.clone();
        if let Some(c) = self.client.as_mut()
            && let Some(mut rx) = self.client_events.take()
        {
            loop {
                let ev = match rx.try_recv() {
                    Ok(ev) => Ok(ev),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        Err(broadcast::error::RecvError::Lagged(n))
                    }
                    Err(_) => break,
                };
                if !forward_event(&mut c.write, agent.as_deref(), ev).await {
                    break;
                }
            }
        }
        let code = match &ended {
            Ended::Child(Ok(st)) => {
                st.code()
                    .and_then(|c| u8::try_from(c).ok())
                    .unwrap_or_else(|| {
                        std::os::unix::process::ExitStatusExt::signal(st)
                            .map_or(125, |s| 128u8.saturating_add(s as u8))
                    })
            }
            Ended::Child(Err(_)) => 125,
            Ended::Closed => self.exit_code.unwrap_or(125),
        };
        if let Some(id) = &agent {
            retire(&self.shared, id);
        }
        self.tell_client(&Reply::Exit { code }).await;
        ended
    }
}
