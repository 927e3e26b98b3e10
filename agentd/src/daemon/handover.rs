//! Restarts without a gap (docs/daemon.md, "Restarts"): a daemon told to stop (SIGTERM)
//! while agents run hands them to the next daemon instead of killing them.
//!
//! The stopping daemon pins its kernel watch (`bpf::watch::handover`); refuses what was
//! held for a person and revokes what people granted (the next daemon cannot answer a
//! call it did not take, nor end a grant it does not know); writes [`HANDOVER_FILE`] in its
//! state directory (each agent, the profile text it was launched with, its supervisor);
//! tells each supervisor and `run` client; and exits. Throughout, Landlock, seccomp and the
//! pinned programs keep enforcing, and the programs keep reporting into the ring buffer.
//!
//! The next daemon takes the maps over when their layout is the one it was built with,
//! watches each agent again from that file, reads on from the ring buffer (what it could
//! not hold meanwhile is counted as lost, per agent), and waits for each supervisor to
//! reconnect (`resume`) and each client to follow (`reattach`). A supervisor that does not
//! reconnect within the grace period has its agent killed here; one whose daemon never
//! comes kills its agent itself. Either way no agent runs unwatched past the grace period.

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::unix::{OwnedReadHalf, OwnedWriteHalf},
    sync::{mpsc, oneshot},
};

use super::{
    Agent, AgentRecord, AgentState, Launch, Shared, ask, compile_launch, kill_agent, lock, proto,
    record_path, resolver_for, retire, send, session, this_actor,
};
use crate::{
    audit::record::{Action, Actor, Control},
    bpf::{Watch, watch as bpfwatch},
    daemon::proto::Reply,
    link::ToSupervisor,
};

/// In the state directory: what a daemon that stopped for a successor left running.
pub(super) const HANDOVER_FILE: &str = "handover.json";

/// [`HANDOVER_FILE`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Handover {
    /// The layout of the maps left pinned ([`bpfwatch::layout_stamp`]).
    stamp: String,
    /// The daemon that stopped.
    by: Actor,
    /// When (Unix ms); supervisors wait `grace_s` from then.
    at_ms: u64,
    grace_s: u64,
    agents: Vec<Handed>,
}

/// One agent handed over.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Handed {
    id: String,
    launch: Launch,
    owner: Actor,
    owner_uid: u32,
    cgroup: PathBuf,
    cgroup_id: u64,
    supervisor_pid: u32,
    /// The supervisor's start time (`/proc/PID/stat` field 22): a reused pid is not it.
    supervisor_start: u64,
    pid: u32,
    /// How long it had run, its counters.
    uptime_ms: u64,
    events: u64,
    denials: u64,
    lost: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A process's start time in clock ticks since boot, `/proc/PID/stat` field 22.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may hold spaces and parentheses: fields count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn links_dir(shared: &Shared) -> PathBuf {
    shared.pins.join(bpfwatch::LINKS_DIR)
}

/// Hands the running agents over; `Ok`: their ids. On an error nothing is handed over
/// (the caller stops every agent, as without a successor).
pub(super) async fn hand_over(
    shared: &Arc<Shared>,
    grace: Duration,
) -> Result<Vec<String>, String> {
    let stamp = bpfwatch::layout_stamp().map_err(|e| e.to_string())?;
    let agents: Vec<Handed> = lock(&shared.agents)
        .values()
        .filter(|a| a.state == AgentState::Running && a.bpf.is_some())
        .filter_map(|a| {
            Some(Handed {
                id: a.id.clone(),
                launch: a.launch.clone(),
                owner: a.owner,
                owner_uid: a.owner_uid,
                cgroup: a.cgroup.clone(),
                cgroup_id: a.cgroup_id,
                supervisor_pid: a.supervisor_pid,
                supervisor_start: start_time(a.supervisor_pid)?,
                pid: a.pid,
                uptime_ms: u64::try_from(a.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                events: a.events,
                denials: a.denials,
                lost: a.lost,
            })
        })
        .collect();
    if agents.is_empty() {
        return Ok(Vec::new());
    }
    let links = links_dir(shared);
    if let Err(e) = lock(&shared.watch).hand_over(&links) {
        if let Err(undo) = bpfwatch::release_previous(&links) {
            eprintln!("agentd daemon: unpinning {}: {undo}", links.display());
        }
        return Err(format!("pinning the kernel watch: {e}"));
    }
    for a in &agents {
        // What waits for a person is refused now, and grants end: the next daemon can
        // answer neither.
        shared.asking.board.cancel_agent(&a.id);
        for (grant, _) in shared.asking.board.grants(Some(&a.id)) {
            if shared.asking.board.revoke(&grant.id).is_ok() {
                ask::audit(
                    shared,
                    Action::Revoke,
                    &a.id,
                    this_actor(),
                    serde_json::json!({
                        "grant": grant.id,
                        "what": grant.target.to_string(),
                        "reason": "the daemon handed its agents over",
                    }),
                );
            }
        }
    }
    // The calls just refused are answered by their tasks (woken by the refusal) once
    // this one yields; the kernel must have the answers before this process exits, or
    // they would wait for a listener that never reads them again.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let grace_s = grace.as_secs().max(1);
    let handover = Handover {
        stamp,
        by: this_actor(),
        at_ms: now_ms(),
        grace_s,
        agents,
    };
    write_file(&shared.state_dir.join(HANDOVER_FILE), &handover)
        .map_err(|e| format!("writing {HANDOVER_FILE}: {e}"))?;
    let ids: Vec<String> = handover.agents.iter().map(|a| a.id.clone()).collect();
    let mut detail = serde_json::Map::new();
    detail.insert("agents".into(), ids.clone().into());
    detail.insert("grace_s".into(), grace_s.into());
    super::audit_control(
        shared,
        &Control {
            action: Action::Handover,
            agent: None,
            by: this_actor(),
            detail,
        },
    );
    // Each session tells its supervisor and client; wait until they have (or a bound).
    let (done_tx, mut done_rx) = mpsc::channel(ids.len().max(1));
    shared
        .handover
        .send_replace(Some((grace_s, Arc::new(ids.clone()), done_tx)));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    for _ in 0..ids.len() {
        if tokio::time::timeout_at(deadline, done_rx.recv())
            .await
            .is_err()
        {
            break;
        }
    }
    eprintln!(
        "agentd daemon: handed {} over (a daemon started within {grace_s} s takes them)",
        ids.join(", ")
    );
    Ok(ids)
}

/// Written beside, synced, renamed into place: the successor reads all of it or nothing.
fn write_file(path: &Path, handover: &Handover) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec(handover).map_err(std::io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The handover a previous daemon left, if any (removed: it is read once), and whether
/// this daemon can take its maps over.
pub(super) fn take_file(state_dir: &Path) -> Option<(Handover, bool)> {
    let path = state_dir.join(HANDOVER_FILE);
    let bytes = std::fs::read(&path).ok()?;
    let _ = std::fs::remove_file(&path);
    let handover: Handover = match serde_json::from_slice(&bytes) {
        Ok(h) => h,
        Err(e) => {
            eprintln!(
                "agentd daemon: {}: {e}; its agents are reaped",
                path.display()
            );
            return None;
        }
    };
    let same = match bpfwatch::layout_stamp() {
        Ok(stamp) => stamp == handover.stamp,
        Err(e) => {
            eprintln!("agentd daemon: {e}");
            false
        }
    };
    if !same {
        eprintln!(
            "agentd daemon: the previous daemon's kernel maps differ from this one's: its agents cannot be taken over and are reaped"
        );
    }
    Some((handover, same))
}

impl Handover {
    /// The agents' ids.
    pub(super) fn ids(&self) -> impl Iterator<Item = &str> {
        self.agents.iter().map(|a| a.id.as_str())
    }

    /// The agents' cgroup ids (their pin directories).
    pub(super) fn cgroup_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.agents.iter().map(|a| a.cgroup_id)
    }
}

/// Watches each handed-over agent again, before the event reader starts (so that what
/// the ring buffer holds decodes as theirs), and waits for their supervisors. An agent
/// that cannot be taken over is killed.
pub(super) fn adopt_all(shared: &Arc<Shared>, handover: Handover) {
    let deadline = Instant::now()
        + Duration::from_millis(
            (handover.at_ms + handover.grace_s * 1000).saturating_sub(now_ms()),
        );
    let gap_ms = now_ms().saturating_sub(handover.at_ms);
    for h in handover.agents {
        let id = h.id.clone();
        match adopt(shared, h, deadline) {
            Ok(()) => {
                ask::audit(
                    shared,
                    Action::Adopt,
                    &id,
                    this_actor(),
                    serde_json::json!({ "previous_daemon": handover.by.pid, "gap_ms": gap_ms }),
                );
                eprintln!("agentd daemon: took {id} over (handed over {gap_ms} ms ago)");
            }
            Err(e) => eprintln!("agentd daemon: cannot take {id} over: {e}; it was killed"),
        }
    }
}

/// Kills what is left of an agent that cannot be taken over, and records it.
fn reap(shared: &Shared, h: &Handed, reason: &str) {
    let (control, _, _) = super::reap_agent(&shared.pins, &h.id, h.cgroup_id, reason);
    super::forget_record(&shared.state_dir, &h.id);
    super::audit_control(shared, &control);
}

fn adopt(shared: &Arc<Shared>, h: Handed, deadline: Instant) -> Result<(), String> {
    let fail = |why: String| {
        reap(
            shared,
            &h,
            &format!("handed over, but not taken over: {why}"),
        );
        Err(why)
    };
    if start_time(h.supervisor_pid) != Some(h.supervisor_start) {
        return fail("its supervisor is gone".into());
    }
    if !record_path(&shared.state_dir, &h.id).exists() {
        return fail("no record of it in the state directory".into());
    }
    let policy = match compile_launch(&h.launch) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let creds = crate::host::Creds {
        uid: h.launch.uid,
        gid: h.launch.gid,
        groups: vec![h.launch.gid],
    };
    let taken = lock(&shared.watch).adopt_agent(&h.id, &h.cgroup, &policy, Some(creds));
    let mut handle = match taken {
        Ok(handle) => handle,
        Err(e) => return fail(format!("kernel watch: {e}")),
    };
    let asked = crate::dns::AskedNames::default();
    let resolver = match resolver_for(shared, &h.id, &mut handle, &policy, &asked, true) {
        Ok(r) => r,
        Err(e) => {
            let _ = lock(&shared.watch).remove_agent(handle);
            return fail(e);
        }
    };
    let (resume_tx, resume_rx) = oneshot::channel();
    let (reattach_tx, reattach_rx) = mpsc::unbounded_channel();
    let mut agent = Agent::new(
        &h.id,
        &policy,
        (h.owner, h.owner_uid),
        (handle, &h.cgroup),
        (resolver, asked),
        h.launch,
        h.supervisor_pid,
    );
    // Running since before the handover, with what it had done.
    agent.pid = h.pid;
    agent.state = AgentState::Running;
    agent.started = Instant::now()
        .checked_sub(Duration::from_millis(h.uptime_ms))
        .unwrap_or_else(Instant::now);
    (agent.events, agent.denials, agent.lost) = (h.events, h.denials, h.lost);
    agent.resume = Some(resume_tx);
    agent.reattach = Some(reattach_tx);
    lock(&shared.agents).insert(h.id.clone(), agent);
    lock(&shared.counters).agents_total += 1;
    tokio::spawn(adopted(
        Arc::clone(shared),
        h.id,
        resume_rx,
        reattach_rx,
        deadline,
    ));
    Ok(())
}

/// An agent taken over: waits for its supervisor, then serves it as `run` does.
async fn adopted(
    shared: Arc<Shared>,
    id: String,
    resume: oneshot::Receiver<session::Supervisor>,
    late: mpsc::UnboundedReceiver<session::Client>,
    deadline: Instant,
) {
    let wait = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
    let sup = match tokio::time::timeout(wait, resume).await {
        Ok(Ok(sup)) => sup,
        _ => {
            kill_agent(
                &shared,
                &id,
                "its supervisor did not come back after the handover",
                this_actor(),
            );
            retire(&shared, &id);
            return;
        }
    };
    let Some((who, request)) = lock(&shared.agents)
        .get(&id)
        .map(|a| (a.owner, a.launch.request.clone()))
    else {
        return;
    };
    let mut session = session::Session {
        shared: Arc::clone(&shared),
        who,
        req: request,
        agent_id: Some(id),
        sup,
        client: None,
        client_events: None,
        exit_code: None,
    };
    let handover = shared.handover.subscribe();
    session.serve(None, Some(late), handover).await;
}

/// `resume`: a supervisor the previous daemon handed over reconnects. Only root, from the
/// pid the handover named; the read end of its events pipe comes with the request.
pub(super) async fn resume(
    shared: &Arc<Shared>,
    who: Actor,
    agent: &str,
    mut fds: Vec<OwnedFd>,
    read: OwnedReadHalf,
    mut write: OwnedWriteHalf,
) -> anyhow::Result<()> {
    let refuse = |why: String| proto::encode(&ToSupervisor::Refused(why));
    let checked = match lock(&shared.agents).get(agent) {
        None => Err(format!("no agent {agent} was handed over to this daemon")),
        Some(a) if who.uid != 0 || who.pid != a.supervisor_pid => Err(format!(
            "permission denied: only agent {agent}'s supervisor (pid {}) may resume it",
            a.supervisor_pid
        )),
        Some(a) if a.resume.is_none() => {
            Err(format!("agent {agent}'s supervisor has already resumed"))
        }
        Some(_) if fds.len() != 1 => {
            Err("resume needs the events pipe's read end, and only it".to_owned())
        }
        Some(_) => Ok(()),
    };
    if let Err(why) = checked {
        write.write_all(&refuse(why)).await?;
        return Ok(());
    }
    // Answered first: a supervisor that gave up on this connection leaves the agent's
    // slot for its next one.
    write
        .write_all(&proto::encode(&ToSupervisor::Adopted))
        .await?;
    let (Some(slot), Some(events)) = (
        lock(&shared.agents)
            .get_mut(agent)
            .and_then(|a| a.resume.take()),
        fds.pop(),
    ) else {
        return Ok(());
    };
    let events = tokio::net::unix::pipe::Receiver::from_owned_fd(events)?;
    let sup = session::Supervisor {
        lines: BufReader::new(read).lines(),
        write,
        events: BufReader::new(events).lines(),
        pid: who.pid,
    };
    if slot.send(sup).is_err() {
        tracing::warn!(agent, "the agent's session is gone");
    }
    Ok(())
}

/// `reattach`: a `run` client follows its agent to this daemon. Its owner or root.
pub(super) async fn reattach(
    shared: &Arc<Shared>,
    who: Actor,
    agent: &str,
    read: OwnedReadHalf,
    rest: Vec<u8>,
    mut write: OwnedWriteHalf,
) -> anyhow::Result<()> {
    let slot = {
        let agents = lock(&shared.agents);
        match agents.get(agent) {
            None => Err(format!("no running agent {agent} (see `agentd ps`)")),
            Some(a) if who.uid != 0 && who.uid != a.owner.uid && who.uid != a.owner_uid => {
                Err(format!(
                    "permission denied: agent {agent} belongs to uid {}",
                    a.owner_uid
                ))
            }
            Some(a) => a.reattach.clone().ok_or_else(|| {
                format!("agent {agent} was not handed over: nothing to reattach to")
            }),
        }
    };
    match slot {
        Ok(tx) => {
            if tx.send(session::Client::new(read, rest, write)).is_err() {
                tracing::warn!(agent, "the agent's session is gone");
            }
        }
        Err(why) => send(&mut write, &Reply::Error(why)).await?,
    }
    Ok(())
}

/// At start: the previous daemon's handover, checked; what to keep of its pins.
pub(super) fn previous(state_dir: &Path, pins: &Path) -> Option<Handover> {
    let (handover, usable) = take_file(state_dir)?;
    if usable {
        return Some(handover);
    }
    // The maps cannot be taken over: its global attachments go now; its agents are
    // reaped with the rest (their records).
    if let Err(e) = bpfwatch::release_previous(&pins.join(bpfwatch::LINKS_DIR)) {
        eprintln!("agentd daemon: {e}");
    }
    None
}

/// Loads the watch: on the previous daemon's maps when it handed over, on fresh ones
/// otherwise (whatever a daemon that died left pinned goes first).
pub(super) fn load_watch(pins: &Path, handover: Option<&Handover>) -> anyhow::Result<Watch> {
    let maps = pins.join(bpfwatch::MAPS_DIR);
    if handover.is_none() {
        if let Err(e) = bpfwatch::release_previous(&pins.join(bpfwatch::LINKS_DIR)) {
            eprintln!("agentd daemon: {e}");
        }
        if maps.exists() {
            std::fs::remove_dir_all(&maps)
                .map_err(|e| anyhow::anyhow!("removing {}: {e}", maps.display()))?;
        }
    }
    Watch::load_pinned(&maps).map_err(|e| {
        // Maps pinned before the failure go, unless they are what agents depend on.
        if handover.is_none() {
            let _ = std::fs::remove_dir_all(&maps);
        }
        anyhow::anyhow!("loading the kernel watch: {e}")
    })
}

/// Once this daemon's programs run: the previous daemon's stop.
pub(super) fn release_previous(pins: &Path) {
    match bpfwatch::release_previous(&pins.join(bpfwatch::LINKS_DIR)) {
        Ok(0) => {}
        Ok(n) => tracing::info!("released {n} attachments of the previous daemon"),
        Err(e) => eprintln!("agentd daemon: unpinning the previous daemon's watch: {e}"),
    }
}

/// At a stop without a successor: the maps go with the programs.
pub(super) fn unpin_maps(pins: &Path) {
    let _ = std::fs::remove_dir_all(pins.join(bpfwatch::MAPS_DIR));
}

/// The record a handed-over agent keeps meanwhile (reaped like any other if the next
/// daemon cannot take it over).
pub(super) fn keeps_record(record: &AgentRecord, handover: Option<&Handover>) -> bool {
    handover.is_some_and(|h| h.ids().any(|id| id == record.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_time_is_read_past_a_command_with_spaces_and_parentheses() {
        let me = std::process::id();
        let t = start_time(me).unwrap();
        assert_eq!(start_time(me), Some(t), "stable");
        assert!(t > 0);
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn the_layout_stamp_is_stable_and_names_no_global_data() {
        let a = bpfwatch::layout_stamp().unwrap();
        assert_eq!(a, bpfwatch::layout_stamp().unwrap());
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn a_handover_file_is_read_once_and_a_bad_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let handover = Handover {
            stamp: bpfwatch::layout_stamp().unwrap(),
            by: this_actor(),
            at_ms: now_ms(),
            grace_s: 30,
            agents: Vec::new(),
        };
        write_file(&dir.path().join(HANDOVER_FILE), &handover).unwrap();
        let (read, usable) = take_file(dir.path()).unwrap();
        assert!(usable);
        assert_eq!(read.grace_s, 30);
        assert!(take_file(dir.path()).is_none(), "read once");
        // Another layout: not usable.
        let other = Handover {
            stamp: "0".repeat(64),
            ..handover
        };
        write_file(&dir.path().join(HANDOVER_FILE), &other).unwrap();
        assert!(!take_file(dir.path()).unwrap().1);
        std::fs::write(dir.path().join(HANDOVER_FILE), b"{not json").unwrap();
        assert!(take_file(dir.path()).is_none());
    }
}
