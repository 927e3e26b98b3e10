//! Extension points of the supervisor, for the subsystems that watch and act on a running
//! agent (the eBPF watch, the circuit breaker, later the daemon's registry).
//!
//! The supervisor calls, in this order:
//! 1. [`AgentHooks::before_spawn`]: the agent's cgroup exists, no process of the agent does
//!    yet. The eBPF watch attaches its cgroup programs and writes the agent's policy into
//!    its maps here (`crate::bpf::Watch::add_agent(agent_id, cgroup_dir, policy)`), so the
//!    agent's first instruction already runs under them. An error aborts the launch (exit
//!    125). **The supervisor is still single-threaded here and must stay so** (it forks
//!    next; see `sandbox` on fork safety): do not start threads or a runtime in this hook.
//! 2. [`AgentHooks::started`]: inside the tokio runtime, once the agent's program runs.
//!    Start event sources here (e.g. a ring-buffer reader task) that send into `events`,
//!    the channel `--events` is written from, and keep the [`AgentHandle`] to act on the
//!    agent (the breaker's kill).
//! 3. [`AgentHooks::finished`]: the agent's first process has exited and the supervisor is
//!    about to kill what is left and remove the cgroup. Settle here (the breaker drains the
//!    agent's last kernel events) and detach. Then [`AgentHooks::verdict`] may replace the
//!    agent's exit status (the breaker's 137).

use std::{future::Future, path::Path, pin::Pin, sync::Arc};

use tokio::sync::mpsc;

use crate::{
    event::Event,
    profile::CompiledPolicy,
    sandbox::cgroup::{AgentCgroup, CgroupError},
};

/// An error from a hook: which hook, and why.
#[derive(Debug, thiserror::Error)]
#[error("{hook}: {source}")]
pub struct HookError {
    pub hook: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// The agent as [`AgentHooks::before_spawn`] sees it: no process yet.
#[derive(Debug, Clone, Copy)]
pub struct AgentInfo<'a> {
    pub agent_id: &'a str,
    /// The agent's cgroup v2 directory (for BPF attachment; its inode number is the cgroup
    /// id `bpf_get_current_cgroup_id()` returns).
    pub cgroup_dir: &'a Path,
    pub policy: &'a CompiledPolicy,
    /// The identity the agent runs as (its only group is `gid`): the watch tells refusals
    /// of the file permissions from the profile's with it.
    pub uid: u32,
    pub gid: u32,
}

impl AgentInfo<'_> {
    /// The agent's identity as the permission checks see it.
    pub fn creds(&self) -> crate::host::Creds {
        crate::host::Creds {
            uid: self.uid,
            gid: self.gid,
            groups: vec![self.gid],
        }
    }
}

/// A running agent, shared with whatever needs to act on it.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    pub agent_id: Arc<str>,
    /// The agent's first process.
    pub pid: u32,
    cgroup: Arc<AgentCgroup>,
}

impl AgentHandle {
    pub fn new(agent_id: &str, pid: u32, cgroup: Arc<AgentCgroup>) -> AgentHandle {
        AgentHandle {
            agent_id: agent_id.into(),
            pid,
            cgroup,
        }
    }

    /// The agent's cgroup v2 directory.
    pub fn cgroup_dir(&self) -> &Path {
        self.cgroup.dir()
    }

    /// Sends SIGKILL to every process of the agent (`cgroup.kill`) and returns at once; a
    /// single write to cgroupfs, fine to call from async code.
    pub fn signal_kill(&self) -> Result<(), CgroupError> {
        self.cgroup.signal_kill()
    }

    /// Kills every process of the agent (`cgroup.kill`) and waits until the cgroup is
    /// empty. Blocks (typically well under a millisecond, at most a few seconds): call it
    /// from `tokio::task::spawn_blocking` in async code.
    pub fn kill(&self) -> Result<(), CgroupError> {
        self.cgroup.kill()
    }

    /// [`AgentHandle::kill`] off the runtime's thread, for async code; a failure is
    /// printed as `agentd: WHAT: ERROR` (the agent is being killed either way).
    pub async fn kill_and_wait(&self, what: &str) {
        let agent = self.clone();
        match tokio::task::spawn_blocking(move || agent.kill()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("agentd: {what}: {e}"),
            Err(e) => eprintln!("agentd: {what}: {e}"),
        }
    }
}

/// Hooks into the supervisor's life cycle. Every method has a no-op default.
pub trait AgentHooks {
    /// The cgroup exists; the agent's process does not. Single-threaded context.
    fn before_spawn(&mut self, agent: AgentInfo<'_>) -> Result<(), HookError> {
        let _ = agent;
        Ok(())
    }

    /// The agent runs; called inside the tokio runtime.
    fn started(&mut self, agent: &AgentHandle, events: &mpsc::Sender<Event>) {
        let _ = (agent, events);
    }

    /// The seccomp listener of the agent's held calls (its profile has ask rules), with
    /// the agent's terminal to ask on, if agentd relays one. The default drops it: held
    /// calls then fail (ENOSYS) instead of waiting for nobody.
    fn serve_asks(
        &mut self,
        agent: &AgentHandle,
        listener: std::os::fd::OwnedFd,
        prompter: Option<super::terminal::Prompter>,
    ) {
        let _ = (agent, listener, prompter);
    }

    /// The agent's first process has exited; its cgroup is about to be emptied and removed.
    /// The supervisor awaits the returned future before it reports the exit.
    fn finished<'a>(
        &'a mut self,
        agent: &'a AgentHandle,
    ) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        let _ = agent;
        Box::pin(std::future::ready(()))
    }

    /// The manual kill switch (`agentd kill ID`, Ctrl-C twice): stop the agent now. The
    /// default empties its cgroup; the kernel hooks also set the kill flag, as the breaker
    /// does, and report it.
    fn kill_switch<'a>(
        &'a mut self,
        agent: &'a AgentHandle,
        reason: &'a str,
    ) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        let _ = reason;
        let agent = agent.clone();
        Box::pin(async move { agent.kill_and_wait("kill switch").await })
    }

    /// An exit status that replaces the agent's, with the one line `agentd run` prints
    /// (e.g. the breaker: `(137, "breaker tripped: ...")`).
    fn verdict(&self) -> Option<(u8, String)> {
        None
    }
}

/// No hooks: the embedded supervisor on its own.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl AgentHooks for NoHooks {}
