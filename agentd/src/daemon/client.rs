//! The client side of the control socket: `agentd run` through a daemon, `ps`, `events`,
//! `kill`, `stats`. The socket is `--socket PATH`, else `$AGENTD_SOCKET`, else
//! [`DEFAULT_SOCKET`].

use std::{
    io::{BufRead as _, BufReader, IoSlice, IsTerminal as _, Write as _},
    os::{fd::AsRawFd as _, unix::net::UnixStream},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

use super::{
    DEFAULT_SOCKET,
    proto::{self, AgentRow, ClientLine, Reply, Request, RunRequest},
};
use crate::run::{events::Sink, terminal};

/// Exit status when the daemon refused or failed a `run` (as a launch failure).
const EXIT_REFUSED: u8 = 125;

/// Which socket, and whether the user chose it (then a missing daemon is an error, not a
/// reason to fall back to the embedded supervisor).
pub fn socket_path(arg: Option<PathBuf>) -> (PathBuf, bool) {
    match arg {
        Some(p) => (p, true),
        None => match std::env::var_os("AGENTD_SOCKET") {
            Some(p) if !p.is_empty() => (PathBuf::from(p), true),
            _ => (PathBuf::from(DEFAULT_SOCKET), false),
        },
    }
}

fn connect(path: &std::path::Path) -> anyhow::Result<UnixStream> {
    UnixStream::connect(path).with_context(|| {
        format!(
            "cannot reach the agentd daemon at {} (is `agentd daemon` running? --socket and AGENTD_SOCKET choose another)",
            path.display()
        )
    })
}

/// Sends one request and returns a reader of the reply lines.
fn request(path: &std::path::Path, req: &Request) -> anyhow::Result<BufReader<UnixStream>> {
    let mut s = connect(path)?;
    s.write_all(&proto::encode(req))?;
    Ok(BufReader::new(s))
}

fn next_reply(r: &mut BufReader<UnixStream>) -> anyhow::Result<Option<Reply>> {
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line)? == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    Ok(Some(proto::decode(&line).context("the daemon's reply")?))
}

/// `agentd ps`.
pub fn ps(socket: Option<PathBuf>, json: bool) -> anyhow::Result<ExitCode> {
    let (path, _) = socket_path(socket);
    let mut r = request(&path, &Request::Ps {})?;
    match next_reply(&mut r)? {
        Some(Reply::Agents(rows)) => {
            if json {
                crate::report::print_json(&rows)?;
            } else {
                print!("{}", ps_table(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(Reply::Error(e)) => bail!("{e}"),
        other => bail!("unexpected reply from the daemon: {other:?}"),
    }
}

fn ps_table(rows: &[AgentRow]) -> String {
    use std::fmt::Write as _;
    let mut s = format!(
        "{:<28} {:<16} {:>8} {:<8} {:>8} {:>8} {:>8} {:>6}  CGROUP\n",
        "ID", "PROFILE", "PID", "STATE", "UPTIME", "EVENTS", "DENIALS", "OWNER"
    );
    for r in rows {
        let state = serde_json::to_value(r.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "{:<28} {:<16} {:>8} {:<8} {:>7}s {:>8} {:>8} {:>6}  {}",
            r.id,
            r.profile,
            r.pid,
            state,
            r.uptime_s,
            r.events,
            r.denials,
            r.owner_uid,
            r.cgroup.display()
        );
    }
    if rows.is_empty() {
        s.push_str("(no agents)\n");
    }
    s
}

/// `agentd stats`.
pub fn stats(socket: Option<PathBuf>, json: bool) -> anyhow::Result<ExitCode> {
    let (path, _) = socket_path(socket);
    let mut r = request(&path, &Request::Stats {})?;
    match next_reply(&mut r)? {
        Some(Reply::Stats(s)) => {
            if json {
                crate::report::print_json(&s)?;
            } else {
                println!(
                    "agents running {}  launched {}  events {} ({:.1}/s over 10 s)  lost {}  denials {}  trips {}  uptime {}s",
                    s.agents_running,
                    s.agents_total,
                    s.events,
                    s.events_per_s,
                    s.lost,
                    s.denials,
                    s.trips,
                    s.uptime_s
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(Reply::Error(e)) => bail!("{e}"),
        other => bail!("unexpected reply from the daemon: {other:?}"),
    }
}

/// `agentd events`.
pub fn events(
    socket: Option<PathBuf>,
    follow: bool,
    agent: Option<String>,
    kind: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let (path, _) = socket_path(socket);
    let mut r = request(
        &path,
        &Request::Events {
            follow,
            agent,
            kind,
        },
    )?;
    let color = !json && std::io::stdout().is_terminal();
    let mut out = std::io::stdout().lock();
    while let Some(reply) = next_reply(&mut r)? {
        match reply {
            Reply::Event(ev) => {
                let line = if json {
                    serde_json::to_string(&ev)?
                } else {
                    ev.line(color)
                };
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    // The reader went away (a closed pipe): done.
                    return Ok(ExitCode::SUCCESS);
                }
            }
            Reply::Error(e) => bail!("{e}"),
            other @ (Reply::Ok(_)
            | Reply::Started { .. }
            | Reply::Exit { .. }
            | Reply::Frozen(_)
            | Reply::Agents(_)
            | Reply::Stats(_)
            | Reply::Transaction(_)) => bail!("unexpected reply from the daemon: {other:?}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `agentd kill ID` through the daemon. `None` when no daemon answers at the default
/// socket, or it has no such agent (the caller tries an embedded `agentd run`).
pub fn kill(socket: Option<PathBuf>, id: &str) -> anyhow::Result<Option<ExitCode>> {
    let (path, explicit) = socket_path(socket);
    let mut r = match request(&path, &Request::Kill { id: id.to_owned() }) {
        Ok(r) => r,
        Err(_) if !explicit => return Ok(None),
        Err(e) => return Err(e),
    };
    match next_reply(&mut r)? {
        Some(Reply::Ok(msg)) => {
            println!("agentd: {msg}");
            Ok(Some(ExitCode::SUCCESS))
        }
        Some(Reply::Error(e)) if e.starts_with("no running agent") && !explicit => Ok(None),
        Some(Reply::Error(e)) => bail!("{e}"),
        other => bail!("unexpected reply from the daemon: {other:?}"),
    }
}

/// A transaction command through the daemon: `None` when none answers at the default
/// socket.
pub fn transaction(
    socket: Option<PathBuf>,
    req: crate::transaction::cmd::TxRequest,
) -> anyhow::Result<Option<crate::transaction::cmd::Output>> {
    let (path, explicit) = socket_path(socket);
    let mut r = match request(&path, &Request::Transaction(req)) {
        Ok(r) => r,
        Err(_) if !explicit => return Ok(None),
        Err(e) => return Err(e),
    };
    match next_reply(&mut r)? {
        Some(Reply::Transaction(out)) => Ok(Some(out)),
        Some(Reply::Error(e)) => bail!("{e}"),
        other => bail!("unexpected reply from the daemon: {other:?}"),
    }
}

/// `agentd run` through the daemon: `None` when none answers at the default socket (the
/// embedded supervisor runs the agent instead).
pub fn run(
    socket: Option<PathBuf>,
    request: RunRequest,
    events: Option<String>,
    quiet: bool,
) -> Option<ExitCode> {
    let (path, explicit) = socket_path(socket);
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(_) if !explicit => return None,
        Err(e) => {
            eprintln!(
                "agentd: cannot reach the agentd daemon at {}: {e}",
                path.display()
            );
            return Some(ExitCode::from(EXIT_REFUSED));
        }
    };
    Some(match run_with(stream, request, events, quiet) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("agentd: {e:#}");
            ExitCode::from(EXIT_REFUSED)
        }
    })
}

fn run_with(
    stream: UnixStream,
    mut req: RunRequest,
    events: Option<String>,
    quiet: bool,
) -> anyhow::Result<u8> {
    let said = crate::run::summary::Said {
        quiet,
        events: events.clone().filter(|e| e != "-"),
    };
    let mut tally = crate::run::summary::Tally::default();
    let mut sink = events
        .as_deref()
        .map(Sink::open)
        .transpose()
        .context("--events")?;
    // With a terminal, the agent gets a pseudo-terminal this client relays (see
    // `run::terminal`), and the messages of agentd (the supervisor's and this client's)
    // are held until the user's terminal is restored. Without one, the request carries
    // our stdin, stdout and stderr.
    let terminal = terminal::open().unwrap_or_else(|e| {
        eprintln!(
            "agentd: warning: no terminal for the agent (stdin is one, but a pseudo-terminal cannot be made: {e}); it shares agentd's stdio"
        );
        None
    });
    let held = match terminal {
        Some(_) => Some(terminal::Held::stderr().context("holding agentd's messages")?),
        None => None,
    };
    req.terminal = terminal.is_some();
    let fds = match &terminal {
        Some((_, slave)) => [slave.as_raw_fd(), slave.as_raw_fd(), 2],
        None => [0, 1, 2],
    };
    let line = proto::encode(&Request::Run(req));
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(&line)];
    let sent = nix::sys::socket::sendmsg::<()>(
        stream.as_raw_fd(),
        &iov,
        &cmsg,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .context("sending the request")?;
    if sent != line.len() {
        bail!("the request was cut ({sent} of {} bytes)", line.len());
    }
    // The daemon has it now: the pseudo-terminal's master sees the agent's side close when
    // the agent and its supervisor are gone.
    let terminal = terminal.map(|(t, _slave)| t);
    crate::run::supervise::block_forwarded().context("blocking the forwarded signals")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Ctrl-Z: the daemon freezes the agent before this client stops, and thaws it before
    // the agent is asked to redraw (the relay waits for the daemon's answer).
    let (freeze_tx, mut freeze_rx) =
        tokio::sync::mpsc::unbounded_channel::<(bool, std::sync::mpsc::SyncSender<()>)>();
    let session = terminal
        .map(|t| {
            t.start(Box::new(move |frozen| {
                let (done, written) = std::sync::mpsc::sync_channel(1);
                if freeze_tx.send((frozen, done)).is_ok() {
                    let _ = written.recv_timeout(std::time::Duration::from_secs(1));
                }
            }))
        })
        .transpose()
        .context("relaying the agent's terminal")?;
    let code = runtime.block_on(async {
        stream.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(stream)?;
        let (read, mut write) = stream.into_split();
        let mut lines = tokio::io::BufReader::new(read).lines();
        let mut signals = Vec::new();
        for sig in crate::run::supervise::FORWARDED {
            signals.push((
                sig as i32,
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(
                    sig as i32,
                ))?,
            ));
        }
        crate::run::supervise::unblock_forwarded().context("unblocking signals")?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<i32>(16);
        for (n, mut st) in signals {
            let tx = tx.clone();
            tokio::spawn(async move {
                while st.recv().await.is_some() {
                    if tx.send(n).await.is_err() {
                        return;
                    }
                }
            });
        }
        let mut freeze_done: Option<(bool, std::sync::mpsc::SyncSender<()>)> = None;
        loop {
            tokio::select! {
                line = lines.next_line() => {
                    let Some(line) = line? else {
                        bail!("the daemon went away before the agent's exit status came (its supervisor kills the agent when the daemon dies)");
                    };
                    match proto::decode::<Reply>(line.as_bytes()).context("the daemon's reply")? {
                        Reply::Exit { code } => return Ok(code),
                        Reply::Error(e) => {
                            eprintln!("agentd: cannot launch: {e}");
                            return Ok(EXIT_REFUSED);
                        }
                        Reply::Event(ev) => {
                            tally.add(&ev);
                            if let Some(s) = sink.as_mut()
                                && let Err(e) = s.write(&ev)
                            {
                                eprintln!("agentd: cannot write events: {e}");
                                sink = None;
                            }
                        }
                        Reply::Started { agent } => tracing::info!(%agent, "launched by the daemon"),
                        Reply::Frozen(now) => {
                            if let Some((asked, done)) = freeze_done.take() {
                                if now != asked {
                                    eprintln!(
                                        "agentd: the daemon could not {} the agent",
                                        if asked { "freeze" } else { "thaw" }
                                    );
                                }
                                let _ = done.try_send(());
                            }
                        }
                        other @ (Reply::Ok(_)
                        | Reply::Agents(_)
                        | Reply::Stats(_)
                        | Reply::Transaction(_)) => {
                            tracing::warn!("unexpected reply: {other:?}");
                        }
                    }
                }
                Some(sig) = rx.recv() => match &session {
                    // The kernel tells the agent's foreground job (SIGWINCH) itself.
                    Some(t) if sig == libc::SIGWINCH => t.resize(),
                    _ => write.write_all(&proto::encode(&ClientLine::Signal(sig))).await?,
                },
                Some((frozen, done)) = freeze_rx.recv() => {
                    write.write_all(&proto::encode(&ClientLine::Freeze(frozen))).await?;
                    freeze_done = Some((frozen, done));
                }
            }
        }
    });
    drop(runtime);
    if let Some(s) = session {
        s.finish();
    }
    if let Some(h) = held {
        h.print(HELD_WAIT);
    }
    if !said.quiet
        && let Some(text) = tally.render(said.events.as_deref())
    {
        eprint!("{text}");
    }
    code
}

/// How long the client waits for the supervisor's last messages once the agent's terminal
/// is restored.
const HELD_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
