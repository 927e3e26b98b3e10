//! Deciding held calls: one task per agent reads its seccomp notifications, lets through
//! what needs no person, holds what matches an ask rule until a [`Board`] decision, a
//! timeout or the agent's end, and binds each approval to a kernel map entry before the
//! call continues.
//!
//! The same code runs in the embedded `agentd run` (the person answers on the agent's
//! terminal) and in the daemon (the agent's terminal through its supervisor, and
//! `agentd approve`); what differs is the [`Front`] that shows requests and the
//! [`Kernel`] that writes the maps.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::IpAddr,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use serde_json::json;
use sha2::{Digest as _, Sha256};
use tokio::sync::{broadcast, oneshot};

use super::{
    Answer, CMDLINE_MAX, Decider, Decision, GrantRow, Proc, Request, Scope, Target,
    notify::{self, Listener, Notif},
};
use crate::{
    event::{Event, Kind, Layer, Verdict},
    profile::{AskPolicy, ConnectRule},
};

/// How long a once approval of a connect stays in the kernel map if the call it was made
/// for never uses it (the agent swapped its address): the next connect is asked again.
const ONCE_TTL: Duration = Duration::from_secs(10);
/// A session grant's kernel expiry: the agent's end removes it first.
const SESSION_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Longest path an exec request reads.
const PATH_MAX: usize = 4096;
/// Parents shown for a held call.
const CHAIN_MAX: usize = 8;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How long a kernel grant lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// One use (the program deletes the entry), if used within this long.
    Once(Duration),
    /// CLOCK_MONOTONIC ns.
    Ns(u64),
}

/// The kernel maps of one agent, as the engine uses them.
pub trait Kernel: Send + Sync {
    /// Whether the agent's resolver or a grant admitted (addr, port, proto) now.
    fn admitted(&self, addr: IpAddr, port: u16, proto: u8) -> bool;
    /// Admits (addr, port, proto) for the agent.
    fn allow_connect(
        &self,
        addr: IpAddr,
        port: u16,
        proto: u8,
        domain: Option<&str>,
        until: Until,
    ) -> Result<(), String>;
    /// Ends an admission now.
    fn revoke_connect(&self, addr: IpAddr, port: u16, proto: u8);
    /// The name an ask rule's lookup answered with `addr`, if any.
    fn ask_domain(&self, addr: IpAddr) -> Option<String>;
    /// Marks the file at `path` (stat's st_dev, inode) as one the agent may only exec
    /// when approved.
    fn set_ask_exec(&self, path: &Path, dev: u64, ino: u64) -> Result<(), String>;
    /// Lets thread `tid`'s next exec load exactly this file.
    fn exec_once(&self, tid: u32, dev: u64, ino: u64) -> Result<(), String>;
    /// Lets any exec of this file until `until_ns` (0: not any more).
    fn exec_until(&self, dev: u64, ino: u64, until_ns: u64) -> Result<(), String>;
    /// Takes back a once grant of thread `tid` its exec did not use.
    fn withdraw_once(&self, tid: u32);
}

/// Where requests are shown and what becomes of them is said.
pub trait Front: Send + Sync {
    /// Whether anyone can answer now (a terminal, a subscriber).
    fn can_ask(&self, agent: &str) -> bool;
    fn show(&self, request: &Request);
    /// The request ended: allowed, denied or expired.
    fn settled(&self, request: &Request, settled: &Settled);
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub answer: Answer,
    pub by: Decider,
    pub waited: Duration,
    /// The grant it created (`--for`, `--session`).
    pub grant: Option<String>,
    /// The signer, when the decision was signed.
    pub signed: Option<super::sign::Verified>,
    pub signature: Option<super::Signature>,
    /// The text the signature is over ([`super::message`] of the answer given).
    pub message: Option<String>,
}

/// Why a decision was not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecideError {
    #[error(
        "no pending request `{0}` (see `agentd approvals`; it may have been decided or expired)"
    )]
    Unknown(String),
    #[error(
        "request `{0}` needs a signed approval (its profile sets `require_signature`): \
         give `--sign KEY` or `--signature FILE`"
    )]
    Unsigned(String),
    #[error("no grant `{0}` (see `agentd grants`)")]
    UnknownGrant(String),
}

struct Pending {
    agent: String,
    /// None while it is being described (its slot is taken first).
    request: Option<Request>,
    /// The agent's owner (may answer).
    owner: u32,
    reply: Option<oneshot::Sender<Decision>>,
}

struct GrantEntry {
    row: GrantRow,
    owner: u32,
    revoke: Box<dyn Fn() + Send + Sync>,
}

/// Pending requests and grants of every agent this process serves.
pub struct Board {
    pending: Mutex<HashMap<String, Pending>>,
    grants: Mutex<HashMap<String, GrantEntry>>,
    changes: broadcast::Sender<Change>,
}

impl std::fmt::Debug for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Board").finish_non_exhaustive()
    }
}

/// What `agentd approvals --follow` sees.
#[derive(Debug, Clone)]
pub enum Change {
    Held(Request),
    Settled { request: Request, outcome: String },
}

impl Default for Board {
    fn default() -> Board {
        Board {
            pending: Mutex::new(HashMap::new()),
            grants: Mutex::new(HashMap::new()),
            changes: broadcast::channel(256).0,
        }
    }
}

impl Board {
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Pending requests, oldest first, of `agent` or all, with each agent's owner.
    pub fn pending(&self, agent: Option<&str>) -> Vec<(Request, u32)> {
        let mut v: Vec<(Request, u32)> = lock(&self.pending)
            .values()
            .filter(|p| agent.is_none_or(|a| p.agent == a))
            .filter_map(|p| p.request.clone().map(|r| (r, p.owner)))
            .collect();
        v.sort_by(|a, b| a.0.since.cmp(&b.0.since).then(a.0.id.cmp(&b.0.id)));
        v
    }

    /// How many requests wait for an answer (what `pending(None)` lists), without copying
    /// them.
    pub fn pending_count(&self) -> usize {
        lock(&self.pending)
            .values()
            .filter(|p| p.request.is_some())
            .count()
    }

    /// A pending request and its agent's owner.
    pub fn request(&self, id: &str) -> Option<(Request, u32)> {
        lock(&self.pending)
            .get(id)
            .and_then(|p| p.request.clone().map(|r| (r, p.owner)))
    }

    /// The agent ended: whatever of it still waits is answered "no answer" (its
    /// processes are gone; nothing is granted).
    pub fn cancel_agent(&self, agent: &str) {
        lock(&self.pending).retain(|_, p| p.agent != agent);
    }

    /// Answers a pending request. An approval of a request that needs a signature must
    /// carry a verified one.
    pub fn decide(&self, id: &str, decision: Decision) -> Result<(), DecideError> {
        let mut pending = lock(&self.pending);
        let Some(Pending {
            request: Some(request),
            reply,
            ..
        }) = pending.get_mut(id)
        else {
            return Err(DecideError::Unknown(id.to_owned()));
        };
        if request.require_signature
            && matches!(decision.answer, Answer::Allow { .. })
            && decision.signed.is_none()
        {
            return Err(DecideError::Unsigned(id.to_owned()));
        }
        let reply = reply.take();
        pending.remove(id);
        // The waiter may have timed out at this very moment: then its own denial stands.
        reply
            .ok_or_else(|| DecideError::Unknown(id.to_owned()))?
            .send(decision)
            .map_err(|_| DecideError::Unknown(id.to_owned()))
    }

    /// Grants of `agent` or all, with each agent's owner.
    pub fn grants(&self, agent: Option<&str>) -> Vec<(GrantRow, u32)> {
        let mut v: Vec<(GrantRow, u32)> = lock(&self.grants)
            .values()
            .filter(|g| agent.is_none_or(|a| g.row.agent == a))
            .filter(|g| g.row.expires.is_none_or(|e| e > super::unix_now()))
            .map(|g| (g.row.clone(), g.owner))
            .collect();
        v.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        v
    }

    /// Ends a grant now (its kernel entry first).
    pub fn revoke(&self, id: &str) -> Result<GrantRow, DecideError> {
        let g = lock(&self.grants)
            .remove(id)
            .ok_or_else(|| DecideError::UnknownGrant(id.to_owned()))?;
        (g.revoke)();
        Ok(g.row)
    }

    /// The owner of grant `id`.
    pub fn grant_owner(&self, id: &str) -> Option<(GrantRow, u32)> {
        lock(&self.grants).get(id).map(|g| (g.row.clone(), g.owner))
    }

    /// The agent ended: its grants go (the kernel forgets its entries with it).
    pub fn forget_agent(&self, agent: &str) {
        lock(&self.grants).retain(|_, g| g.row.agent != agent);
    }
}

/// One agent, as the engine serves it.
pub struct AgentAsk {
    pub agent: String,
    pub profile: String,
    /// The agent's owner (the invoking user): may answer its requests.
    pub owner: u32,
    /// The agent's first process: the end of a held call's parent chain.
    pub first_pid: u32,
    pub policy: AskPolicy,
    /// The profile's connect rules by address (allowed outright).
    pub allow: Vec<ConnectRule>,
    /// Whether the agent's DNS goes to agentd's resolver (port 53 is steered, never held).
    pub resolver: bool,
    pub kernel: Arc<dyn Kernel>,
    pub front: Arc<dyn Front>,
    pub board: Arc<Board>,
    pub emit: Arc<dyn Fn(Event) + Send + Sync>,
    /// Files of `ask_exec` (stat's st_dev, inode), and timed exec grants (until when).
    exec: Arc<Mutex<ExecState>>,
    seq: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct ExecState {
    ask: HashSet<(u64, u64)>,
    /// Until when (CLOCK_MONOTONIC ns, the kernel's clock and value).
    granted: HashMap<(u64, u64), u64>,
}

impl std::fmt::Debug for AgentAsk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentAsk")
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

/// What to do with one notification.
enum Step {
    Resume,
    Fail(i32),
    /// With the program's file and the arguments as the agent passed them, for an exec.
    Hold(Target, Option<(OwnedFd, Vec<String>)>),
}

impl AgentAsk {
    #[expect(clippy::too_many_arguments, reason = "one agent's whole context, once")]
    pub fn new(
        agent: &str,
        profile: &str,
        owner: u32,
        first_pid: u32,
        policy: AskPolicy,
        allow: Vec<ConnectRule>,
        resolver: bool,
        kernel: Arc<dyn Kernel>,
        front: Arc<dyn Front>,
        board: Arc<Board>,
        emit: Arc<dyn Fn(Event) + Send + Sync>,
    ) -> AgentAsk {
        AgentAsk {
            agent: agent.to_owned(),
            profile: profile.to_owned(),
            owner,
            first_pid,
            policy,
            allow,
            resolver,
            kernel,
            front,
            board,
            emit,
            exec: Arc::new(Mutex::new(ExecState::default())),
            seq: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Marks the `ask_exec` programs in the kernel, and the ELF interpreters (program
    /// loaders) they name: running a loader directly (`ld.so /usr/bin/git`) loads the
    /// program without an exec of it, so it is asked about too. Refuses what an approval
    /// could not be bound to: a script (its interpreter is what the kernel runs), a file
    /// with several hard links, one the agent may write (symbolic links followed). A
    /// missing one is warned about (nothing can run it).
    pub fn arm(&self) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt as _;
        let writable: Vec<PathBuf> = self
            .policy
            .writable
            .iter()
            .map(|w| std::fs::canonicalize(w).unwrap_or_else(|_| w.clone()))
            .collect();
        let mut loaders = std::collections::BTreeSet::new();
        for path in &self.policy.exec {
            let bytes = match std::fs::read(path) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    eprintln!(
                        "agentd: warning: filesystem.ask_exec `{}`: it does not exist; nothing to ask about",
                        path.display()
                    );
                    continue;
                }
                Err(e) => return Err(format!("filesystem.ask_exec `{}`: {e}", path.display())),
            };
            let m = std::fs::metadata(path)
                .map_err(|e| format!("filesystem.ask_exec `{}`: {e}", path.display()))?;
            let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
            let shown = path.display();
            if m.nlink() > 1 {
                return Err(format!(
                    "filesystem.ask_exec `{shown}` has {} hard links: a link elsewhere would be the same program under another name; ask about a file with one link",
                    m.nlink()
                ));
            }
            if let Some(w) = writable.iter().find(|w| real.starts_with(w)) {
                return Err(format!(
                    "filesystem.ask_exec `{shown}` is `{}`, which the agent may write (beneath `{}`): it could change the program after a person approved it",
                    real.display(),
                    w.display()
                ));
            }
            match goblin::elf::Elf::parse(&bytes) {
                Ok(elf) => {
                    if let Some(interp) = elf.interpreter {
                        loaders.insert(PathBuf::from(interp));
                    }
                }
                Err(_) => {
                    let hint = script_interpreter(&bytes).map_or_else(String::new, |i| {
                        format!(
                            " (a script: the kernel runs its interpreter `{}`, which may be asked about instead)",
                            i.display()
                        )
                    });
                    return Err(format!(
                        "filesystem.ask_exec `{shown}` is not an ELF program{hint}"
                    ));
                }
            }
            self.kernel.set_ask_exec(path, m.dev(), m.ino())?;
            lock(&self.exec).ask.insert((m.dev(), m.ino()));
        }
        for loader in loaders {
            if let Ok(m) = std::fs::metadata(&loader) {
                self.kernel.set_ask_exec(&loader, m.dev(), m.ino())?;
                lock(&self.exec).ask.insert((m.dev(), m.ino()));
            }
        }
        Ok(())
    }

    /// Serves the agent's notifications until its last process is gone.
    pub async fn serve(self: Arc<Self>, listener: OwnedFd) {
        let listener = Arc::new(Listener::new(listener));
        // A thread of its own takes the calls: every connect of the agent waits for it, so
        // the path is two ioctls and a poll, not a wake-up of the runtime. Held calls go to
        // the runtime.
        let runtime = tokio::runtime::Handle::current();
        let (done, ended) = oneshot::channel::<()>();
        let (me, l) = (Arc::clone(&self), Arc::clone(&listener));
        let started = std::thread::Builder::new()
            .name("agentd-ask".into())
            .spawn(move || {
                me.take_calls(&l, &runtime);
                let _ = done.send(());
            });
        if let Err(e) = started {
            // Nothing answers: held calls would wait forever. Fail closed: the listener
            // closes and they fail (ENOSYS).
            eprintln!("agentd: cannot wait for held calls: {e}; they are refused");
            return;
        }
        let _ = ended.await;
        // Whatever still waits belonged to processes that are gone.
        let ids: Vec<String> = self
            .board
            .pending(Some(&self.agent))
            .into_iter()
            .map(|(r, _)| r.id)
            .collect();
        for id in ids {
            let _ = self.board.decide(
                &id,
                Decision {
                    answer: Answer::Deny {
                        reason: Some("the agent ended".into()),
                    },
                    by: agentd_decider("agent ended"),
                    signed: None,
                    signature: None,
                },
            );
        }
    }

    /// Takes the agent's calls until its last process is gone (the listener hangs up).
    fn take_calls(self: &Arc<Self>, listener: &Arc<Listener>, runtime: &tokio::runtime::Handle) {
        // The caller and this thread hand over on one CPU instead of waking each other
        // across CPUs (Linux 6.6; older kernels refuse the flag and keep the usual wake-up).
        listener.sync_wake_up();
        loop {
            match listener.wait(None) {
                Ok(Some(true)) => {}
                // Hung up: the filter has no task left.
                Ok(Some(false) | None) => return,
                Err(e) => {
                    eprintln!("agentd: waiting for held calls: {e}");
                    return;
                }
            }
            match listener.recv() {
                Ok(n) => Arc::clone(self).handle(listener, n, runtime),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINTR)) => {}
                Err(e) => {
                    eprintln!("agentd: reading a held call: {e}");
                    return;
                }
            }
        }
    }

    fn handle(
        self: Arc<Self>,
        listener: &Arc<Listener>,
        n: Notif,
        runtime: &tokio::runtime::Handle,
    ) {
        let step = match n.nr {
            libc::SYS_connect => self.classify_connect(listener, &n),
            libc::SYS_execve | libc::SYS_execveat => self.classify_exec(listener, &n),
            // The filter routes nothing else here.
            _ => Step::Fail(libc::ENOSYS),
        };
        let done = match step {
            Step::Resume => listener.resume(n.id),
            Step::Fail(errno) => listener.fail(n.id, errno),
            Step::Hold(target, file) => {
                let listener = Arc::clone(listener);
                runtime.spawn(async move { self.hold(&listener, n, target, file).await });
                Ok(())
            }
        };
        if let Err(e) = done
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            eprintln!("agentd: answering a held call: {e}");
        }
    }

    fn classify_connect(&self, listener: &Listener, n: &Notif) -> Step {
        // Every connect of the agent comes here: the common case (a destination no ask rule
        // names, allowed or not) is let through after one read of the sockaddr, and the
        // kernel decides it as for any agent. Only a destination an ask rule may name costs
        // more (the socket's protocol, the agent's admissions).
        let len = usize::try_from(n.args[2]).unwrap_or(0).min(128);
        let Ok(bytes) = notify::read_mem(n.tid, n.args[1], len) else {
            // The kernel reads it again and decides (EFAULT, or its rules).
            return Step::Resume;
        };
        let Some((addr, port)) = notify::inet_sockaddr(&bytes) else {
            return Step::Resume;
        };
        if port == 53 && self.resolver {
            // Steered to the agent's resolver by the kernel.
            return Step::Resume;
        }
        let names_it = |r: &ConnectRule| r.net.contains(&addr) && r.port.is_none_or(|p| p == port);
        let domain = if self.policy.names.is_empty() {
            None
        } else {
            self.kernel.ask_domain(addr)
        };
        let named = |proto: Option<u8>| {
            domain.as_deref().is_some_and(|d| {
                self.policy.names.iter().any(|r| {
                    r.pattern.matches(d)
                        && r.port.is_none_or(|p| p == port)
                        && proto.is_none_or(|p| r.proto.number() == p)
                })
            })
        };
        if !named(None) && !self.policy.connect.iter().any(names_it) {
            return Step::Resume;
        }
        let proto = match notify::tgid_of(n.tid)
            .and_then(|tgid| notify::socket_protocol(tgid, n.args[0]))
        {
            Ok(Some(p)) => p,
            // Not an inet socket, or unreadable: the kernel decides as for any agent.
            Ok(None) | Err(_) => return Step::Resume,
        };
        let rule_has = |r: &ConnectRule| names_it(r) && r.proto.number() == proto;
        if self.allow.iter().any(rule_has) || self.kernel.admitted(addr, port, proto) {
            // What is allowed outright is never held.
            return Step::Resume;
        }
        if !named(Some(proto)) && !self.policy.connect.iter().any(rule_has) {
            // Neither allowed nor askable: the kernel refuses it, as for any agent.
            return Step::Resume;
        }
        if !listener.valid(n.id) {
            // What was read may belong to another process now.
            return Step::Resume;
        }
        Step::Hold(
            Target::Connect {
                addr,
                port,
                proto: proto_name(proto).to_owned(),
                domain,
            },
            None,
        )
    }

    fn classify_exec(&self, listener: &Listener, n: &Notif) -> Step {
        if lock(&self.exec).ask.is_empty() {
            return Step::Resume;
        }
        // A once approval this thread's last exec did not use (the exec failed) must not
        // meet this one: the kernel would take a different file for a swap and kill it.
        self.kernel.withdraw_once(n.tid);
        let (dirfd, path_ptr, flags) = if n.nr == libc::SYS_execve {
            (libc::AT_FDCWD, n.args[0], 0)
        } else {
            // execveat(dirfd, path, argv, envp, flags): dirfd is an int in a register.
            (n.args[0] as u32 as i32, n.args[1], n.args[4])
        };
        let Ok(path) = notify::read_cstr(n.tid, path_ptr, PATH_MAX) else {
            return Step::Resume;
        };
        let Some(file) = resolve_exec(n.tid, dirfd, &path, flags) else {
            // The kernel cannot find it either, or it is a file the exec hook checks.
            return Step::Resume;
        };
        if !listener.valid(n.id) {
            return Step::Resume;
        }
        // A script runs its interpreter: that is the program the kernel loads, and the
        // one an approval binds to.
        let file = if lock(&self.exec).ask.contains(&file.id) {
            file
        } else {
            match script_of(n.tid, file) {
                Some(interpreter) => interpreter,
                None => return Step::Resume,
            }
        };
        let (dev, ino) = file.id;
        {
            let exec = lock(&self.exec);
            if !exec.ask.contains(&(dev, ino)) {
                return Step::Resume;
            }
            if exec
                .granted
                .get(&(dev, ino))
                .is_some_and(|until| *until > crate::run::kernel::monotonic_ns())
            {
                return Step::Resume;
            }
        }
        let argv_ptr = if n.nr == libc::SYS_execve {
            n.args[1]
        } else {
            n.args[2]
        };
        let named = (file.named != file.real).then_some(file.named);
        Step::Hold(
            Target::Exec {
                path: file.real,
                named,
                dev,
                ino,
                sha256: String::new(),
            },
            Some((file.fd, read_argv(n.tid, argv_ptr))),
        )
    }

    async fn hold(
        self: Arc<Self>,
        listener: &Listener,
        n: Notif,
        mut target: Target,
        file: Option<(OwnedFd, Vec<String>)>,
    ) {
        let held = Instant::now();
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let id = format!("r-{}-{seq}", self.agent);
        // Refused at once, before any work: nobody to ask, or too many waiting (the slot
        // is taken under the same lock as the count).
        let (tx, rx) = oneshot::channel();
        let refusal = if !self.front.can_ask(&self.agent) {
            Some((
                "no one to ask: no terminal, no `agentd approvals --follow`",
                "no one to ask",
            ))
        } else {
            let mut pending = lock(&self.board.pending);
            let waiting = pending.values().filter(|p| p.agent == self.agent).count();
            if waiting >= self.policy.max_pending as usize {
                Some(("too many requests pending (ask.max_pending)", "pending cap"))
            } else {
                pending.insert(
                    id.clone(),
                    Pending {
                        agent: self.agent.clone(),
                        request: None,
                        owner: self.owner,
                        reply: Some(tx),
                    },
                );
                None
            }
        };
        let mut argv = Vec::new();
        if let (Target::Exec { sha256, .. }, Some((fd, args))) = (&mut target, file) {
            argv = args;
            *sha256 = if refusal.is_some() {
                "not read (refused at once)".into()
            } else {
                tokio::task::spawn_blocking(move || hash_file(&fd))
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| "unreadable".into())
            };
        }
        let request = Request {
            id: id.clone(),
            agent: self.agent.clone(),
            profile: self.profile.clone(),
            tid: n.tid,
            chain: chain(n.tid, self.first_pid),
            target,
            argv,
            since: crate::event::rfc3339_now(),
            timeout_s: self.policy.timeout.as_secs(),
            require_signature: self.policy.require_signature,
        };
        (self.emit)(ask_event(&request, n.tid));

        let (decision, waited) = if let Some((reason, via)) = refusal {
            (
                Decision {
                    answer: Answer::Deny {
                        reason: Some(reason.into()),
                    },
                    by: agentd_decider(via),
                    signed: None,
                    signature: None,
                },
                Duration::ZERO,
            )
        } else {
            if let Some(p) = lock(&self.board.pending).get_mut(&id) {
                p.request = Some(request.clone());
            }
            let _ = self.board.changes.send(Change::Held(request.clone()));
            self.front.show(&request);
            let decided = tokio::time::timeout(self.policy.timeout, rx).await;
            lock(&self.board.pending).remove(&id);
            let d = match decided {
                Ok(Ok(d)) => d,
                Ok(Err(_)) => Decision {
                    answer: Answer::Deny {
                        reason: Some("no answer".into()),
                    },
                    by: agentd_decider("no answer"),
                    signed: None,
                    signature: None,
                },
                Err(_) => Decision {
                    answer: Answer::Deny {
                        reason: Some(format!(
                            "no answer within {}s (ask.timeout)",
                            self.policy.timeout.as_secs()
                        )),
                    },
                    by: agentd_decider("timeout"),
                    signed: None,
                    signature: None,
                },
            };
            (d, held.elapsed())
        };
        let settled = self.apply(listener, &n, &request, decision, waited);
        let outcome = outcome_line(&request, &settled);
        let _ = self.board.changes.send(Change::Settled {
            request: request.clone(),
            outcome,
        });
        (self.emit)(approval_event(&request, &settled));
        self.front.settled(&request, &settled);
    }

    /// Writes the kernel grant for an approval, then lets the call go on; or fails it.
    fn apply(
        &self,
        listener: &Listener,
        n: &Notif,
        request: &Request,
        decision: Decision,
        waited: Duration,
    ) -> Settled {
        let Decision {
            mut answer,
            mut by,
            signed,
            signature,
        } = decision;
        let message = signature.as_ref().map(|_| super::message(request, &answer));
        let mut grant = None;
        if matches!(answer, Answer::Allow { .. }) && !listener.valid(n.id) {
            // The thread is gone (killed, or its process ended): nothing to let through, and
            // no grant is written for a call nobody makes.
            answer = Answer::Deny {
                reason: Some("the held call's thread is gone".into()),
            };
            by = agentd_decider("gone");
        }
        if let Answer::Allow { scope } = answer {
            match self.grant(n.tid, request, scope, &by) {
                Ok(g) => grant = g,
                Err(e) => {
                    // Nothing in the kernel lets it through: refuse rather than continue.
                    eprintln!("agentd: approving {}: {e}; refused", request.id);
                    answer = Answer::Deny {
                        reason: Some(format!("the approval could not be applied: {e}")),
                    };
                    by = agentd_decider("kernel map");
                }
            }
        }
        let sent = match &answer {
            Answer::Allow { .. } => listener.resume(n.id),
            Answer::Deny { .. } => listener.fail(
                n.id,
                match request.target {
                    Target::Connect { .. } => libc::EPERM,
                    Target::Exec { .. } => libc::EACCES,
                },
            ),
        };
        if let Err(e) = sent {
            if e.raw_os_error() != Some(libc::ENOENT) {
                eprintln!("agentd: answering {}: {e}", request.id);
            }
            // The call will not use a once grant: take it back.
            if matches!(answer, Answer::Allow { scope: Scope::Once }) {
                match &request.target {
                    Target::Connect {
                        addr, port, proto, ..
                    } => self
                        .kernel
                        .revoke_connect(*addr, *port, proto_number(proto)),
                    Target::Exec { .. } => self.kernel.withdraw_once(n.tid),
                }
            }
        }
        Settled {
            answer,
            by,
            waited,
            grant,
            signed,
            signature,
            message,
        }
    }

    /// The kernel entry an approval makes; a grant row for `--for` and `--session`.
    fn grant(
        &self,
        tid: u32,
        request: &Request,
        scope: Scope,
        by: &Decider,
    ) -> Result<Option<String>, String> {
        let now = crate::run::kernel::monotonic_ns();
        let lasts = match scope {
            Scope::Once => None,
            Scope::For(s) => Some(Duration::from_secs(s)),
            Scope::Session => Some(SESSION_TTL),
        };
        let until_ns = lasts.map(|d| now.saturating_add(nanos(d)));
        let revoke: Box<dyn Fn() + Send + Sync> = match &request.target {
            Target::Connect {
                addr,
                port,
                proto,
                domain,
            } => {
                let proto = proto_number(proto);
                let until = match until_ns {
                    None => Until::Once(ONCE_TTL),
                    Some(ns) => Until::Ns(ns),
                };
                self.kernel
                    .allow_connect(*addr, *port, proto, domain.as_deref(), until)?;
                let (k, a, p) = (Arc::clone(&self.kernel), *addr, *port);
                Box::new(move || k.revoke_connect(a, p, proto))
            }
            Target::Exec { dev, ino, .. } => {
                self.kernel.exec_once(tid, *dev, *ino)?;
                if let Some(ns) = until_ns {
                    self.kernel.exec_until(*dev, *ino, ns)?;
                    // The same expiry as the kernel's: a call let through here is never
                    // one the kernel then refuses.
                    lock(&self.exec).granted.insert((*dev, *ino), ns);
                }
                let (k, d, i) = (Arc::clone(&self.kernel), *dev, *ino);
                Box::new(move || {
                    let _ = k.exec_until(d, i, 0);
                })
            }
        };
        if scope == Scope::Once {
            return Ok(None);
        }
        let gid = format!("g-{}", request.id.trim_start_matches("r-"));
        let row = GrantRow {
            id: gid.clone(),
            agent: self.agent.clone(),
            target: request.target.clone(),
            scope,
            expires: match scope {
                Scope::For(s) => Some(super::unix_now() + s),
                Scope::Once | Scope::Session => None,
            },
            request: request.id.clone(),
            by: by.clone(),
        };
        // A revoked exec grant must also leave the user-space copy.
        let revoke: Box<dyn Fn() + Send + Sync> = match &request.target {
            Target::Exec { dev, ino, .. } => {
                let exec = Arc::new((*dev, *ino));
                let me = self.exec_handle();
                Box::new(move || {
                    revoke();
                    lock(&me).granted.remove(&*exec);
                })
            }
            Target::Connect { .. } => revoke,
        };
        lock(&self.board.grants).insert(
            gid.clone(),
            GrantEntry {
                row,
                owner: self.owner,
                revoke,
            },
        );
        Ok(Some(gid))
    }

    fn exec_handle(&self) -> Arc<Mutex<ExecState>> {
        // A grant's revoke may run after the engine is gone: share the state.
        Arc::clone(&self.exec)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn agentd_decider(via: &str) -> Decider {
    Decider {
        uid: 0,
        pid: std::process::id(),
        via: via.to_owned(),
        web: None,
    }
}

fn proto_name(proto: u8) -> &'static str {
    if proto == agentd_common::IPPROTO_UDP {
        "udp"
    } else {
        "tcp"
    }
}

fn proto_number(name: &str) -> u8 {
    if name == "udp" {
        agentd_common::IPPROTO_UDP
    } else {
        agentd_common::IPPROTO_TCP
    }
}

/// A program as an exec names it: its (st_dev, inode), the file itself (`O_PATH`), the
/// path it really is and the one the agent gave.
struct ExecFile {
    id: (u64, u64),
    fd: OwnedFd,
    real: PathBuf,
    named: PathBuf,
}

/// Finds the file an exec names, in the caller's view (its root, its working directory,
/// its descriptors), following symbolic links as exec does. None when it cannot be found:
/// the kernel will fail the exec too, or run a file the exec hook checks.
fn resolve_exec(tid: u32, dirfd: i32, path: &[u8], flags: u64) -> Option<ExecFile> {
    use std::os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _};
    let named = Path::new(std::ffi::OsStr::from_bytes(path));
    let empty_path = flags & libc::AT_EMPTY_PATH as u64 != 0 && path.is_empty();
    let o_path = || {
        nix::fcntl::OpenHow::new().flags(nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC)
    };
    let (fd, named) = if empty_path {
        let p = format!("/proc/{tid}/fd/{dirfd}");
        let fd = nix::fcntl::openat2(nix::fcntl::AT_FDCWD, p.as_str(), o_path()).ok()?;
        (fd, std::fs::read_link(&p).ok()?)
    } else if let Some(magic) = magic_path(tid, named) {
        // The caller's own /proc/self, /dev/fd...: the magic links of its process, which
        // only its pid names from here.
        (
            nix::fcntl::openat2(nix::fcntl::AT_FDCWD, &magic, o_path()).ok()?,
            named.to_path_buf(),
        )
    } else {
        // In the caller's root, so that absolute symbolic links resolve in its view too; a
        // relative path from its working directory (or `dirfd`) as it sees it.
        let full = if named.is_absolute() {
            named.to_path_buf()
        } else {
            let base = if dirfd == libc::AT_FDCWD {
                format!("/proc/{tid}/cwd")
            } else {
                format!("/proc/{tid}/fd/{dirfd}")
            };
            std::fs::read_link(&base).ok()?.join(named)
        };
        let root = std::fs::File::open(format!("/proc/{tid}/root")).ok()?;
        let how = o_path().resolve(nix::fcntl::ResolveFlag::RESOLVE_IN_ROOT);
        (nix::fcntl::openat2(&root, &full, how).ok()?, full)
    };
    let me = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let meta = std::fs::metadata(&me).ok()?;
    let real = std::fs::read_link(&me).unwrap_or_else(|_| named.clone());
    meta.is_file().then(|| ExecFile {
        id: (meta.dev(), meta.ino()),
        fd,
        real,
        named,
    })
}

/// `/proc/self/...`, `/proc/thread-self/...`, `/dev/fd/N`, `/proc/PID/...` of the caller
/// as a path from here (its pid in place of `self`); None for any other path.
fn magic_path(tid: u32, named: &Path) -> Option<PathBuf> {
    let tgid = notify::tgid_of(tid).ok()?;
    let me = PathBuf::from(format!("/proc/{tgid}"));
    if let Ok(rest) = named.strip_prefix("/proc/self") {
        return Some(me.join(rest));
    }
    if let Ok(rest) = named.strip_prefix("/proc/thread-self") {
        return Some(me.join("task").join(tid.to_string()).join(rest));
    }
    if let Ok(rest) = named.strip_prefix("/dev/fd") {
        return Some(me.join("fd").join(rest));
    }
    // Another pid's /proc entry: the same path from here (no pid namespace between).
    let mut parts = named.strip_prefix("/proc").ok()?.components();
    let pid = parts.next()?.as_os_str().to_str()?;
    pid.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| named.to_path_buf())
}

/// The interpreter a `#!` script names (its first word), if `head` starts one.
fn script_interpreter(head: &[u8]) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt as _;
    let line = head.strip_prefix(b"#!")?;
    let line = line.split(|b| *b == b'\n').next()?;
    let word = line
        .split(|b| *b == b' ' || *b == b'\t')
        .find(|w| !w.is_empty())?;
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(word)))
}

/// The interpreter of `file` when it is a `#!` script (found in the caller's view, as
/// the kernel finds it), None otherwise.
fn script_of(tid: u32, file: ExecFile) -> Option<ExecFile> {
    use std::{io::Read as _, os::unix::ffi::OsStrExt as _};
    let mut f = std::fs::File::open(format!("/proc/self/fd/{}", file.fd.as_raw_fd())).ok()?;
    let mut head = [0u8; 256];
    let n = f.read(&mut head).ok()?;
    let interpreter = script_interpreter(head.get(..n)?)?;
    let mut found = resolve_exec(tid, libc::AT_FDCWD, interpreter.as_os_str().as_bytes(), 0)?;
    found.named = file.real;
    Some(found)
}

/// The arguments of a held exec as the agent passed them (at most 32, each at most
/// 256 bytes): shown to the person, not bound to the approval (the agent can change them).
fn read_argv(tid: u32, argv: u64) -> Vec<String> {
    const MAX_ARGS: u64 = 32;
    const MAX_ARG: usize = 256;
    let mut out = Vec::new();
    if argv == 0 {
        return out;
    }
    for i in 0..MAX_ARGS {
        let Ok(ptr) = notify::read_mem(tid, argv + i * 8, 8) else {
            break;
        };
        let Ok(bytes) = <[u8; 8]>::try_from(ptr.as_slice()) else {
            break;
        };
        let p = u64::from_ne_bytes(bytes);
        if p == 0 {
            return out;
        }
        match notify::read_cstr(tid, p, MAX_ARG) {
            Ok(a) => out.push(String::from_utf8_lossy(&a).into_owned()),
            Err(_) => out.push("…".into()),
        }
    }
    out.push("…".into());
    out
}

/// SHA-256 of a held program, read through the descriptor it was found by.
fn hash_file(fd: &OwnedFd) -> Option<String> {
    let mut f = std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).ok()?;
    Some(
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
    )
}

/// The caller and its parents up to the agent's first process.
fn chain(tid: u32, first: u32) -> Vec<Proc> {
    let mut out = Vec::new();
    let mut pid = notify::tgid_of(tid).unwrap_or(tid);
    for _ in 0..CHAIN_MAX {
        out.push(Proc {
            pid,
            cmdline: notify::cmdline(pid, CMDLINE_MAX),
        });
        if pid == first {
            break;
        }
        match notify::parent_of(pid) {
            Some(p) if p > 1 => pid = p,
            _ => break,
        }
    }
    out
}

fn comm(tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{tid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default()
}

fn with_target(mut ev: Event, target: &Target) -> Event {
    match target {
        Target::Connect {
            addr,
            port,
            proto,
            domain,
        } => {
            ev.addr = Some(*addr);
            ev.port = Some(*port);
            ev.proto = Some(proto.clone());
            ev.domain.clone_from(domain);
        }
        Target::Exec { path, sha256, .. } => {
            ev.path = Some(path.display().to_string());
            ev = ev.with("sha256", sha256.clone());
        }
    }
    ev
}

/// The `ask` event: a call is held.
fn ask_event(r: &Request, tid: u32) -> Event {
    let ev = Event::new(
        &r.agent,
        r.chain.first().map_or(tid, |p| p.pid),
        &comm(tid),
        Kind::Ask,
        Verdict::None,
        Layer::Ask,
    )
    .with("request", r.id.clone())
    .with("tid", tid)
    .with("what", r.target.to_string())
    .with("timeout_s", r.timeout_s)
    .with("chain", json!(r.chain));
    with_target(ev, &r.target)
}

/// The `approval` event: how a held call ended.
fn approval_event(r: &Request, s: &Settled) -> Event {
    let verdict = match s.answer {
        Answer::Allow { .. } => Verdict::Allow,
        Answer::Deny { .. } => Verdict::Deny,
    };
    let mut ev = Event::new(
        &r.agent,
        r.chain.first().map_or(r.tid, |p| p.pid),
        &comm(r.tid),
        Kind::Approval,
        verdict,
        Layer::Ask,
    )
    .with("request", r.id.clone())
    .with("what", r.target.to_string())
    .with("by_uid", s.by.uid)
    .with("by_pid", s.by.pid)
    .with("via", s.by.via.clone())
    .with(
        "waited_ms",
        u64::try_from(s.waited.as_millis()).unwrap_or(u64::MAX),
    );
    match &s.answer {
        Answer::Allow { scope } => ev = ev.with("scope", scope.to_string()),
        Answer::Deny { reason } => {
            if let Some(r) = reason {
                ev = ev.with("reason", r.clone());
            }
        }
    }
    if let Some(g) = &s.grant {
        ev = ev.with("grant", g.clone());
    }
    if let Some(v) = &s.signed {
        ev = ev
            .with("signed_by", v.principal.clone())
            .with("fingerprint", v.fingerprint.clone());
    }
    with_target(ev, &r.target)
}

/// One line for people: `r-ab-1: allowed once by uid 1000 (terminal) after 2.1 s`.
pub fn outcome_line(r: &Request, s: &Settled) -> String {
    format!("{}: {}", r.id, outcome_note(s))
}

/// [`outcome_line`] without the request id.
pub fn outcome_note(s: &Settled) -> String {
    let what = match &s.answer {
        Answer::Allow { scope } => format!("allowed {scope}"),
        Answer::Deny { reason: Some(why) } => format!("denied ({why})"),
        Answer::Deny { reason: None } => "denied".to_owned(),
    };
    let signed = s
        .signed
        .as_ref()
        .map(|v| format!(", signed by {}", v.principal))
        .unwrap_or_default();
    format!(
        "{what} by uid {} ({}{signed}) after {:.1} s",
        s.by.uid,
        s.by.via,
        s.waited.as_secs_f64()
    )
}
