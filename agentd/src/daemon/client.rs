//! The client side of the control socket: `agentd run` through a daemon, `ps`, `events`,
//! `kill`, `stats`. The socket is `--socket PATH`, else `$AGENTD_SOCKET`, else
//! [`DEFAULT_SOCKET`].

use std::{
    io::{BufRead as _, BufReader, IsTerminal as _, Write as _},
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
        "{:<28} {:<16} {:>8} {:<8} {:>8} {:>8} {:>8} {:>6} {:>6}  CGROUP\n",
        "ID", "PROFILE", "PID", "STATE", "UPTIME", "EVENTS", "DENIALS", "LOST", "OWNER"
    );
    for r in rows {
        let state = serde_json::to_value(r.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "{:<28} {:<16} {:>8} {:<8} {:>7}s {:>8} {:>8} {:>6} {:>6}  {}",
            r.id,
            r.profile,
            r.pid,
            state,
            r.uptime_s,
            r.events,
            r.denials,
            r.lost,
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
            | Reply::Transaction(_)
            | Reply::Approvals(_)
            | Reply::Held(_)
            | Reply::Prompt(_)
            | Reply::Settled { .. }
            | Reply::Grants(_)
            | Reply::Handover { .. }
            | Reply::UiUrl(_)) => bail!("unexpected reply from the daemon: {other:?}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `agentd ui-url`: the web view's address with a token for the caller.
pub fn ui_url(socket: Option<PathBuf>, json: bool) -> anyhow::Result<ExitCode> {
    let (path, _) = socket_path(socket);
    let mut r = request(&path, &Request::UiUrl {})?;
    match next_reply(&mut r)? {
        Some(Reply::UiUrl(u)) => {
            if json {
                crate::report::print_json(&u)?;
            } else {
                println!("{}", u.url);
                eprintln!(
                    "agentd: open it in a browser on this host; it opens one session, acting as uid {} until {} (keep it secret until used: whoever has it may do what you may)",
                    u.uid, u.expires
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(Reply::Error(e)) => bail!("{e}"),
        other => bail!("unexpected reply from the daemon: {other:?}"),
    }
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
    Some(match run_with(&path, stream, request, events, quiet) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("agentd: {e:#}");
            ExitCode::from(EXIT_REFUSED)
        }
    })
}

fn run_with(
    path: &std::path::Path,
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
    crate::link::send_with_fds(std::os::fd::AsFd::as_fd(&stream), &line, &fds)
        .context("sending the request")?;
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
        // The agent's id, once launched; the deadline for following it to the next daemon,
        // once this one said it hands over.
        let mut agent_id: Option<String> = None;
        let mut handover: Option<tokio::time::Instant> = None;
        // Answers given at the agent's terminal to the daemon's requests.
        let prompter = session.as_ref().map(crate::run::terminal::Session::prompter);
        let (answer_tx, mut answer_rx) = tokio::sync::mpsc::unbounded_channel::<ClientLine>();
        loop {
            tokio::select! {
                Some(answer) = answer_rx.recv() => {
                    write.write_all(&proto::encode(&answer)).await?;
                }
                line = lines.next_line() => {
                    let line = match line {
                        Ok(Some(line)) => line,
                        Ok(None) | Err(_) => {
                            let (Some(agent), Some(deadline)) = (agent_id.as_ref(), handover) else {
                                bail!("the daemon went away before the agent's exit status came (its supervisor kills the agent when the daemon dies)");
                            };
                            let stream = reattach(path, agent, deadline).await?;
                            let (r, w) = stream.into_split();
                            lines = tokio::io::BufReader::new(r).lines();
                            write = w;
                            handover = None;
                            continue;
                        }
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
                        Reply::Started { agent } => {
                            tracing::info!(%agent, "launched by the daemon");
                            agent_id = Some(agent);
                        }
                        Reply::Handover { grace_s } => {
                            tracing::info!("the daemon hands the agent over to its successor");
                            handover = Some(tokio::time::Instant::now() + std::time::Duration::from_secs(grace_s));
                        }
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
                        Reply::Prompt(request) => match &prompter {
                            Some(p) => {
                                let key = p.ask(request.id.clone(), crate::run::asking::prompt_text(&request));
                                let tx = answer_tx.clone();
                                tokio::spawn(async move {
                                    if let Ok(key) = key.await {
                                        let _ = tx.send(ClientLine::Answer {
                                            request: request.id,
                                            answer: crate::run::asking::answer_of(key),
                                        });
                                    }
                                });
                            }
                            None => tracing::warn!("a request to show, and no terminal: {}", request.id),
                        },
                        Reply::Settled { request, outcome } => {
                            if let Some(p) = &prompter {
                                p.cancel(&request, &outcome);
                            }
                        }
                        other @ (Reply::Ok(_)
                        | Reply::Agents(_)
                        | Reply::Stats(_)
                        | Reply::Transaction(_)
                        | Reply::Approvals(_)
                        | Reply::Held(_)
                        | Reply::Grants(_)
                        | Reply::UiUrl(_)) => {
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

/// Follows an agent to the daemon that took it over: connects to the socket again until
/// one answers a `reattach`, or the deadline passes (the agent's supervisor then kills
/// it, and says so).
async fn reattach(
    path: &std::path::Path,
    agent: &str,
    deadline: tokio::time::Instant,
) -> anyhow::Result<tokio::net::UnixStream> {
    let line = proto::encode(&Request::Reattach {
        agent: agent.to_owned(),
    });
    loop {
        if let Ok(mut s) = tokio::net::UnixStream::connect(path).await
            && s.write_all(&line).await.is_ok()
        {
            return Ok(s);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the daemon handed agent {agent} over and no daemon took it within the grace period (its supervisor kills it)"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// How long the client waits for the supervisor's last messages once the agent's terminal
/// is restored.
const HELD_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

// ---- asking a person -----------------------------------------------------------------

/// How `agentd approve` or `deny` signs its decision.
#[derive(Debug, Clone)]
pub enum Signing {
    None,
    /// Sign with this SSH private key (`ssh-keygen -Y sign`; an agent-held key through
    /// its public key file works too).
    Key(PathBuf),
    /// A signature made beforehand over the message `agentd approvals --message REQ`
    /// prints.
    File(PathBuf),
}

/// The pending requests a caller may see (and answer).
fn pending(
    path: &std::path::Path,
    agent: Option<String>,
) -> anyhow::Result<Vec<crate::ask::Request>> {
    let mut r = request(
        path,
        &Request::Approvals {
            follow: false,
            agent,
        },
    )?;
    match next_reply(&mut r)? {
        Some(Reply::Approvals(list)) => Ok(list),
        Some(Reply::Error(e)) => bail!("{e}"),
        other => bail!("unexpected reply from the daemon: {other:?}"),
    }
}

fn request_line(r: &crate::ask::Request) -> String {
    let caller = r.chain.first().map_or_else(String::new, |p| {
        format!(" by pid {} `{}`", p.pid, crate::ask::printable(&p.cmdline))
    });
    format!(
        "{}  agent {} ({}): {}{caller}; since {}, waits {} s{}",
        r.id,
        r.agent,
        r.profile,
        crate::ask::printable(&r.target.to_string()),
        r.since,
        r.timeout_s,
        if r.require_signature {
            "; needs a signed approval"
        } else {
            ""
        }
    )
}

/// `agentd approvals [--follow] [--json] [--message REQ]`.
pub fn approvals(
    socket: Option<PathBuf>,
    follow: bool,
    agent: Option<String>,
    json: bool,
    message_of: Option<String>,
) -> anyhow::Result<ExitCode> {
    let (path, _) = socket_path(socket);
    if let Some(id) = message_of {
        let list = pending(&path, agent)?;
        let Some(r) = list.iter().find(|r| r.id == id) else {
            bail!("no pending request `{id}` (see `agentd approvals`)");
        };
        print!(
            "{}",
            crate::ask::message(
                r,
                &crate::ask::Answer::Allow {
                    scope: crate::ask::Scope::Once
                }
            )
        );
        eprintln!(
            "agentd: this is the message for `approve {id} --once`; the scope line differs for --for and --session, and a denial says `decision: deny` and `scope: -`"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut r = request(&path, &Request::Approvals { follow, agent })?;
    let mut out = std::io::stdout().lock();
    while let Some(reply) = next_reply(&mut r)? {
        let line = match reply {
            Reply::Approvals(list) => {
                if json {
                    list.iter()
                        .map(serde_json::to_string)
                        .collect::<Result<Vec<_>, _>>()?
                        .join("\n")
                } else if list.is_empty() && !follow {
                    "no pending requests".to_owned()
                } else {
                    list.iter().map(request_line).collect::<Vec<_>>().join("\n")
                }
            }
            Reply::Held(req) => {
                if json {
                    serde_json::to_string(&serde_json::json!({ "held": req }))?
                } else {
                    format!("held     {}", request_line(&req))
                }
            }
            Reply::Settled { request, outcome } => {
                if json {
                    serde_json::to_string(
                        &serde_json::json!({ "settled": request, "outcome": outcome }),
                    )?
                } else {
                    format!("settled  {}", crate::ask::printable(&outcome))
                }
            }
            Reply::Error(e) => bail!("{e}"),
            other @ (Reply::Ok(_)
            | Reply::Started { .. }
            | Reply::Frozen(_)
            | Reply::Exit { .. }
            | Reply::Event(_)
            | Reply::Agents(_)
            | Reply::Stats(_)
            | Reply::Transaction(_)
            | Reply::Prompt(_)
            | Reply::Grants(_)
            | Reply::Handover { .. }
            | Reply::UiUrl(_)) => bail!("unexpected reply from the daemon: {other:?}"),
        };
        if line.is_empty() {
            continue;
        }
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return Ok(ExitCode::SUCCESS);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The signature for `answer` to `id`, as `signing` says.
fn signature(
    path: &std::path::Path,
    id: &str,
    answer: &crate::ask::Answer,
    signing: &Signing,
) -> anyhow::Result<Option<String>> {
    match signing {
        Signing::None => Ok(None),
        Signing::File(f) => Ok(Some(
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        )),
        Signing::Key(key) => {
            let list = pending(path, None)?;
            let Some(r) = list.iter().find(|r| r.id == id) else {
                bail!("no pending request `{id}` (see `agentd approvals`)");
            };
            let message = crate::ask::message(r, answer);
            let mut child = std::process::Command::new("ssh-keygen")
                .args(["-q", "-Y", "sign", "-n", crate::ask::sign::NAMESPACE, "-f"])
                .arg(key)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .context("running ssh-keygen -Y sign (is openssh-client installed?)")?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(message.as_bytes())?;
            }
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!(
                    "ssh-keygen -Y sign -f {} failed ({})",
                    key.display(),
                    out.status
                );
            }
            Ok(Some(
                String::from_utf8(out.stdout).context("ssh-keygen's signature")?,
            ))
        }
    }
}

/// `agentd approve REQ` / `agentd deny REQ`.
pub fn decide(
    socket: Option<PathBuf>,
    id: &str,
    answer: crate::ask::Answer,
    signing: &Signing,
) -> anyhow::Result<ExitCode> {
    let (path, _) = socket_path(socket);
    let signature = signature(&path, id, &answer, signing)?;
    said_ok(
        &path,
        &Request::Decide {
            request: id.to_owned(),
            answer,
            signature,
        },
    )
}

/// Sends `req`, whose answer is one `Ok` line, and prints it.
fn said_ok(path: &std::path::Path, req: &Request) -> anyhow::Result<ExitCode> {
    let mut r = request(path, req)?;
    match next_reply(&mut r)? {
        Some(Reply::Ok(msg)) => {
            println!("agentd: {msg}");
            Ok(ExitCode::SUCCESS)
        }
        Some(Reply::Error(e)) => bail!("{e}"),
        other => bail!("unexpected reply from the daemon: {other:?}"),
    }
}

/// `agentd grants`.
pub fn grants(
    socket: Option<PathBuf>,
    agent: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let (path, _) = socket_path(socket);
    let mut r = request(&path, &Request::Grants { agent })?;
    match next_reply(&mut r)? {
        Some(Reply::Grants(rows)) => {
            if json {
                crate::report::print_json(&rows)?;
            } else if rows.is_empty() {
                println!("no grants");
            } else {
                for g in rows {
                    let ends = match g.expires {
                        Some(t) => {
                            format!("ends in {} s", t.saturating_sub(crate::ask::unix_now()))
                        }
                        None => "until the agent ends".to_owned(),
                    };
                    println!(
                        "{}  agent {}: {} ({}, {ends}; from {} by uid {} via {})",
                        g.id,
                        g.agent,
                        crate::ask::printable(&g.target.to_string()),
                        g.scope,
                        g.request,
                        g.by.uid,
                        g.by.via
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(Reply::Error(e)) => bail!("{e}"),
        other => bail!("unexpected reply from the daemon: {other:?}"),
    }
}

/// `agentd revoke GRANT`.
pub fn revoke(socket: Option<PathBuf>, grant: &str) -> anyhow::Result<ExitCode> {
    let (path, _) = socket_path(socket);
    said_ok(
        &path,
        &Request::Revoke {
            grant: grant.to_owned(),
        },
    )
}
