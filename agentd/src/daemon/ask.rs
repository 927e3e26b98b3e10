//! The daemon's side of asking a person: it answers every agent's held calls (the
//! supervisor hands over its seccomp listener), shows requests to `agentd approvals
//! --follow` subscribers and on the agent's terminal (through its supervisor), takes
//! decisions from `agentd approve`/`deny` and the terminal, and audits requests and
//! decisions.
//!
//! Who may answer: root, the agent's owner (who launched it, or the user `sudo` names),
//! and members of `--approvers GROUP`; never a process inside an agent (its cgroup is
//! checked: an agent runs as its owner's uid, so the uid alone would let it approve
//! itself). An approval of a request whose profile sets `require_signature` must carry an
//! SSH signature over the request's message from a key of `--allowed-signers`.

use std::{
    path::PathBuf,
    sync::{
        Arc, Weak,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    net::unix::{OwnedReadHalf, OwnedWriteHalf},
    sync::broadcast,
};

use super::{Refusal, Shared, handle_event, lock, peer::Peer, proto::Reply, send};
use crate::{
    ask::{
        self, Answer, Decider, Decision, Request,
        engine::{AgentAsk, Board, Change, DecideError, Front, Settled},
        maps::WatchMaps,
        sign::{self, AllowedSigners},
    },
    audit::record::{Action, Actor, Control},
    event::{Event, Kind, Layer, Verdict},
    profile::CompiledPolicy,
};

/// Default `--allowed-signers`.
pub const DEFAULT_ALLOWED_SIGNERS: &str = "/etc/agentd/allowed_signers";

/// `agentd approvals --follow` connections: each one's number, its peer, and the agent it
/// follows (all when `None`).
type Followers = std::sync::Mutex<Vec<(u64, Arc<Peer>, Option<String>)>>;

/// What the daemon keeps for asking.
#[derive(Debug)]
pub(super) struct Asking {
    pub board: Arc<Board>,
    /// `agentd approvals --follow` connections now: who, and which agent they follow.
    followers: Followers,
    next_follower: AtomicUsize,
    /// `--approvers` and its gid when the group exists.
    pub approvers: Option<String>,
    pub approvers_gid: Option<u32>,
    pub allowed_signers: PathBuf,
}

impl Asking {
    pub fn new(approvers: Option<String>, allowed_signers: PathBuf) -> Asking {
        let approvers_gid = approvers.as_deref().and_then(|g| {
            nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .map(|g| g.gid.as_raw())
        });
        Asking {
            board: Arc::new(Board::default()),
            followers: std::sync::Mutex::new(Vec::new()),
            next_follower: AtomicUsize::new(0),
            approvers,
            approvers_gid,
            allowed_signers,
        }
    }
}

/// One agent's asking, in its registry entry.
#[derive(Debug, Default)]
pub(super) struct AgentAsking {
    /// The `run` client relays the agent's terminal: requests are shown there.
    pub terminal: bool,
    /// Lines for the `run` client (prompts), written by its connection's task.
    pub to_client: Option<tokio::sync::mpsc::UnboundedSender<Reply>>,
    /// The task answering its held calls.
    pub task: Option<tokio::task::JoinHandle<()>>,
    /// Names its ask rules resolved (shared with its resolver).
    pub asked: crate::dns::AskedNames,
}

impl Drop for AgentAsking {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Shows requests and records what becomes of them.
struct DaemonFront {
    shared: Weak<Shared>,
}

pub(super) fn audit(
    shared: &Shared,
    action: Action,
    agent: &str,
    by: Actor,
    detail: serde_json::Value,
) {
    let detail = if let serde_json::Value::Object(m) = detail {
        m
    } else {
        serde_json::Map::new()
    };
    let control = Control {
        action,
        agent: Some(agent.to_owned()),
        by,
        detail,
    };
    super::audit_control(shared, &control);
}

impl Front for DaemonFront {
    fn can_ask(&self, agent: &str) -> bool {
        let Some(shared) = self.shared.upgrade() else {
            return false;
        };
        let (owner, terminal) = match lock(&shared.agents).get(agent) {
            Some(a) => (
                a.owner_uid,
                a.asking.terminal && a.asking.to_client.is_some(),
            ),
            None => return false,
        };
        // Someone who follows this agent's requests and may answer them: on the agent's
        // terminal, with `agentd approvals --follow`, or on an open web view page.
        terminal
            || lock(&shared.asking.followers).iter().any(|(_, who, only)| {
                only.as_deref().is_none_or(|a| a == agent)
                    && may_answer(&shared, who, owner).is_ok()
            })
            || super::web::can_answer(&shared, owner)
    }

    fn show(&self, request: &Request) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        audit(
            &shared,
            Action::Ask,
            &request.agent,
            super::this_actor(),
            serde_json::json!({
                "request": request.id,
                "what": request.target.to_string(),
                "target": request.target,
                "tid": request.tid,
                "chain": request.chain,
                "timeout_s": request.timeout_s,
                "require_signature": request.require_signature,
            }),
        );
        if let Some(a) = lock(&shared.agents).get(&request.agent)
            && a.asking.terminal
            && let Some(tx) = &a.asking.to_client
        {
            let _ = tx.send(Reply::Prompt(request.clone()));
        }
    }

    fn settled(&self, request: &Request, s: &Settled) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let action = match s.answer {
            Answer::Allow { .. } => Action::Approve,
            Answer::Deny { .. } => Action::Deny,
        };
        let mut detail = serde_json::json!({
            "request": request.id,
            "what": request.target.to_string(),
            "target": request.target,
            "answer": s.answer,
            "via": s.by.via,
            "waited_ms": u64::try_from(s.waited.as_millis()).unwrap_or(u64::MAX),
        });
        if let Some(g) = &s.grant {
            detail["grant"] = g.clone().into();
        }
        if let (Some(v), Some(sig), Some(m)) = (&s.signed, &s.signature, &s.message) {
            detail["message"] = m.clone().into();
            detail["signature"] = sig.armored.clone().into();
            detail["key"] = v.key.clone().into();
            detail["principal"] = v.principal.clone().into();
            detail["fingerprint"] = v.fingerprint.clone().into();
        }
        if let Some(w) = &s.by.web {
            detail["web"] = serde_json::json!(w);
        }
        let by = Actor {
            uid: s.by.uid,
            gid: 0,
            pid: s.by.pid,
        };
        audit(&shared, action, &request.agent, by, detail);
        if let Some(a) = lock(&shared.agents).get(&request.agent)
            && a.asking.terminal
            && let Some(tx) = &a.asking.to_client
        {
            let _ = tx.send(Reply::Settled {
                request: request.id.clone(),
                outcome: ask::engine::outcome_note(s),
            });
        }
    }
}

/// `SupervisorLine::Listener`: takes a copy of the supervisor's descriptor `fd` and starts
/// answering the agent's held calls.
pub(super) fn take_listener(
    shared: &Arc<Shared>,
    agent: &str,
    supervisor_pid: u32,
    fd: i32,
    terminal: bool,
    policy: &CompiledPolicy,
) -> Result<(), String> {
    let Some(ask_policy) = policy.ask.clone() else {
        return Err("the agent's profile has no ask rules".into());
    };
    let listener = ask::notify::pidfd_getfd(supervisor_pid, fd)
        .map_err(|e| format!("taking the supervisor's listener: {e}"))?;
    let mut agents = lock(&shared.agents);
    let a = agents
        .get_mut(agent)
        .ok_or_else(|| format!("no agent {agent}"))?;
    let maps = {
        let w = lock(&shared.watch);
        WatchMaps::new(
            agent,
            a.cgroup_id,
            w.admissions(),
            w.exec_gate(),
            a.asking.asked.clone(),
        )
    };
    let weak = Arc::downgrade(shared);
    let emit_to = Weak::clone(&weak);
    let engine = Arc::new(AgentAsk::new(
        agent,
        &a.profile,
        a.owner_uid,
        a.pid,
        ask_policy,
        policy.network.connect.clone(),
        !policy.network.names.is_empty() || !policy.ask.as_ref().is_none_or(|p| p.names.is_empty()),
        Arc::new(maps),
        Arc::new(DaemonFront { shared: weak }),
        Arc::clone(&shared.asking.board),
        Arc::new(move |ev| {
            if let Some(shared) = emit_to.upgrade() {
                handle_event(&shared, ev);
            }
        }),
    ));
    engine.arm()?;
    a.asking.terminal = terminal;
    a.asking.task = Some(tokio::spawn(engine.serve(listener)));
    Ok(())
}

/// Through what a person answers, and so how their groups are known.
#[derive(Debug, Clone, Copy)]
pub(super) enum Via<'a> {
    /// `agentd approve`/`deny`, `agentd approvals`: the peer of a control connection, its
    /// groups as the kernel recorded them at connect, its cgroup read from its process
    /// (confirmed to be the one that connected: peer.rs).
    Cli(&'a Peer),
    /// The web view, for its session's user (the actor's gid is their primary group):
    /// `groups` as they were when `agentd ui-url` asked, or for an action as they are now
    /// (the daemon itself is the process that acts; the session is named in the records).
    Web {
        groups: &'a [u32],
        session: &'a crate::ask::WebSession,
    },
}

/// Whether `who` may answer requests of an agent owned by `owner`; why not.
fn may_answer(shared: &Shared, who: &Peer, owner: u32) -> Result<(), String> {
    may_answer_via(shared, &who.actor, owner, Via::Cli(who))
}

/// The agent whose process the caller through `via` is, if any (fails closed).
fn caller_agent(via: Via<'_>) -> Option<String> {
    match via {
        Via::Cli(peer) => peer.agent(),
        // The daemon's own process acts for the web view's user; the view refused every
        // connection made inside an agent before (web/client.rs).
        Via::Web { .. } => None,
    }
}

/// [`may_answer`], for a caller that comes through `via`.
pub(super) fn may_answer_via(
    shared: &Shared,
    who: &Actor,
    owner: u32,
    via: Via<'_>,
) -> Result<(), String> {
    if let Some(agent) = caller_agent(via) {
        return Err(format!(
            "permission denied: the caller (pid {}) is a process of agent {agent}: no process inside an agent may answer requests",
            who.pid
        ));
    }
    if who.uid == 0 || who.uid == owner {
        return Ok(());
    }
    if let Some(gid) = shared.asking.approvers_gid
        && match via {
            Via::Cli(peer) => peer.in_group(gid),
            Via::Web { groups, .. } => who.gid == gid || groups.contains(&gid),
        }
    {
        return Ok(());
    }
    Err(format!(
        "permission denied: uid {} is not root, not the agent's owner (uid {owner}){}",
        who.uid,
        match &shared.asking.approvers {
            Some(g) => format!(", and not in the approvers group `{g}`"),
            None => ", and the daemon has no --approvers group".to_owned(),
        }
    ))
}

/// An agent's process tried to answer: refused, and reported as that agent's `approval`
/// denial (a breaker violation).
fn self_approval_event(shared: &Shared, who: &Actor, via: Via<'_>, request: &str) {
    let Some(agent) = caller_agent(via) else {
        return;
    };
    let ev = Event::new(
        &agent,
        who.pid,
        "",
        Kind::Approval,
        Verdict::Deny,
        Layer::Ask,
    )
    .with("request", request.to_owned())
    .with(
        "reason",
        "a process inside an agent tried to answer a request through the control socket",
    )
    .with("by_uid", who.uid)
    .with("by_pid", who.pid);
    handle_event(shared, ev);
}

/// `agentd approve` / `agentd deny`.
pub(super) fn decide(
    shared: &Shared,
    who: &Peer,
    request: &str,
    answer: Answer,
    signature: Option<String>,
) -> Reply {
    super::reply_of(decide_via(
        shared,
        &who.actor,
        request,
        answer,
        signature,
        Via::Cli(who),
    ))
}

/// [`decide`], for a caller that comes through `via` (the decision's `via` says which).
pub(super) fn decide_via(
    shared: &Shared,
    who: &Actor,
    request: &str,
    answer: Answer,
    signature: Option<String>,
    via: Via<'_>,
) -> Result<String, Refusal> {
    let Some((req, owner)) = shared.asking.board.request(request) else {
        return Err(Refusal::NotFound(format!(
            "no pending request `{request}` (see `agentd approvals`; it may have been decided or expired)"
        )));
    };
    if let Err(e) = may_answer_via(shared, who, owner, via) {
        self_approval_event(shared, who, via, request);
        return Err(Refusal::Denied(e));
    }
    if let Answer::Allow {
        scope: ask::Scope::For(s),
    } = answer
        && (s == 0 || s > ask::Scope::MAX_FOR.as_secs())
    {
        return Err(Refusal::Invalid(format!(
            "--for must be between 1 s and {} s (a standing permission belongs in the profile)",
            ask::Scope::MAX_FOR.as_secs()
        )));
    }
    let (signed, signature) = match signature {
        None => (None, None),
        Some(armored) => {
            let signers = match AllowedSigners::load(&shared.asking.allowed_signers) {
                Ok(s) => s,
                Err(e) => return Err(Refusal::Failed(e.to_string())),
            };
            let message = ask::message(&req, &answer);
            match sign::verify(
                &signers,
                message.as_bytes(),
                &armored,
                std::time::SystemTime::now(),
            ) {
                Ok(v) => (Some(v), Some(ask::Signature { armored })),
                Err(e) => {
                    return Err(Refusal::Denied(format!(
                        "the signature does not verify: {e}; the decision is refused"
                    )));
                }
            }
        }
    };
    let decision_answer_word = match &answer {
        Answer::Allow { .. } => "allow",
        Answer::Deny { .. } => "deny",
    };
    let line = match &answer {
        Answer::Allow { scope } => format!("{request}: allowed {scope}"),
        Answer::Deny { .. } => format!("{request}: denied"),
    };
    let decision = Decision {
        answer,
        by: Decider {
            uid: who.uid,
            pid: who.pid,
            via: match (via, decision_answer_word) {
                (Via::Web { .. }, _) => "web view".into(),
                (Via::Cli(_), "allow") => "agentd approve".into(),
                (Via::Cli(_), _) => "agentd deny".into(),
            },
            web: match via {
                Via::Web { session, .. } => Some(session.clone()),
                Via::Cli(_) => None,
            },
        },
        signed,
        signature,
    };
    match shared.asking.board.decide(request, decision) {
        Ok(()) => Ok(line),
        Err(e @ (DecideError::Unknown(_) | DecideError::UnknownGrant(_))) => {
            Err(Refusal::NotFound(e.to_string()))
        }
        Err(e @ DecideError::Unsigned(_)) => Err(Refusal::Denied(e.to_string())),
    }
}

/// The person at the agent's terminal answered (through its supervisor).
pub(super) fn terminal_answer(shared: &Shared, agent: &str, request: &str, answer: Answer) {
    let Some((req, _)) = shared.asking.board.request(request) else {
        return;
    };
    if req.agent != agent {
        return;
    }
    let (uid, pid) = lock(&shared.agents)
        .get(agent)
        .map_or((0, 0), |a| (a.owner_uid, a.supervisor_pid));
    let decision = Decision {
        answer,
        by: Decider {
            uid,
            pid,
            via: "terminal".into(),
            web: None,
        },
        signed: None,
        signature: None,
    };
    if let Err(e) = shared.asking.board.decide(request, decision)
        && let Some(tx) = lock(&shared.agents)
            .get(agent)
            .and_then(|a| a.asking.to_client.clone())
    {
        let _ = tx.send(Reply::Settled {
            request: request.to_owned(),
            outcome: e.to_string(),
        });
    }
}

/// `agentd approvals [--follow]`.
pub(super) async fn approvals(
    shared: &Shared,
    who: &Arc<Peer>,
    write: &mut OwnedWriteHalf,
    read: OwnedReadHalf,
    follow: bool,
    agent: Option<String>,
) -> anyhow::Result<()> {
    if let Some(a) = who.agent() {
        send(
            write,
            &Reply::Error(format!(
                "permission denied: the caller (pid {}) is a process of agent {a}: no process inside an agent may see or answer requests",
                who.actor.pid
            )),
        )
        .await?;
        return Ok(());
    }
    let visible = |owner: u32| may_answer(shared, who, owner).is_ok();
    let owner_of = |agent: &str| lock(&shared.agents).get(agent).map(|a| a.owner_uid);
    let mut rx = shared.asking.board.subscribe();
    let pending: Vec<Request> = shared
        .asking
        .board
        .pending(agent.as_deref())
        .into_iter()
        .filter(|(_, owner)| visible(*owner))
        .map(|(r, _)| r)
        .collect();
    send(write, &Reply::Approvals(pending)).await?;
    if !follow {
        return Ok(());
    }
    let me = shared.asking.next_follower.fetch_add(1, Ordering::SeqCst) as u64;
    lock(&shared.asking.followers).push((me, Arc::clone(who), agent.clone()));
    let _count = Follower(&shared.asking.followers, me);
    let mut gone = BufReader::new(read).lines();
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Ok(Change::Held(req)) => {
                    let owner = shared.asking.board.request(&req.id).map_or(u32::MAX, |(_, o)| o);
                    if agent.as_deref().is_none_or(|a| a == req.agent) && visible(owner) {
                        send(write, &Reply::Held(req)).await?;
                    }
                }
                Ok(Change::Settled { request, outcome }) => {
                    if agent.as_deref().is_none_or(|a| a == request.agent)
                        && owner_of(&request.agent).is_some_and(visible)
                    {
                        send(write, &Reply::Settled { request: request.id, outcome }).await?;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    send(write, &Reply::Error(format!("{n} changes were missed: run `agentd approvals` again"))).await?;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
            l = gone.next_line() => {
                if !matches!(l, Ok(Some(_))) {
                    return Ok(());
                }
            }
        }
    }
}

/// A follower, listed while it lives.
struct Follower<'a>(&'a Followers, u64);

impl Drop for Follower<'_> {
    fn drop(&mut self) {
        lock(self.0).retain(|(id, _, _)| *id != self.1);
    }
}

/// `agentd grants`.
pub(super) fn grants(shared: &Shared, who: &Peer, agent: Option<&str>) -> Reply {
    if let Some(a) = who.agent() {
        return Reply::Error(format!(
            "permission denied: the caller (pid {}) is a process of agent {a}",
            who.actor.pid
        ));
    }
    Reply::Grants(
        shared
            .asking
            .board
            .grants(agent)
            .into_iter()
            .filter(|(_, owner)| may_answer(shared, who, *owner).is_ok())
            .map(|(g, _)| g)
            .collect(),
    )
}

/// `agentd revoke GRANT`.
pub(super) fn revoke(shared: &Shared, who: &Peer, grant: &str) -> Reply {
    let Some((_, owner)) = shared.asking.board.grant_owner(grant) else {
        return Reply::Error(format!("no grant `{grant}` (see `agentd grants`)"));
    };
    if let Err(e) = may_answer(shared, who, owner) {
        return Reply::Error(e);
    }
    match shared.asking.board.revoke(grant) {
        Ok(row) => {
            audit(
                shared,
                Action::Revoke,
                &row.agent,
                who.actor,
                serde_json::json!({ "grant": row.id, "what": row.target.to_string() }),
            );
            Reply::Ok(format!("{grant} revoked: {} is asked again", row.target))
        }
        Err(e) => Reply::Error(e.to_string()),
    }
}
