//! `agentd daemon`: the privileged service. It loads and attaches the eBPF programs once,
//! serves the control socket, runs one breaker per agent, fans events out to clients and
//! appends every event and control action to the audit log.
//!
//! Each agent is launched and supervised by an `agentd run` process the daemon starts
//! ([`crate::run::supervised`]): the client's stdio file descriptors (passed over the
//! socket) become its stdio, the client's uid its invoking user, and it runs the same
//! launch sequence as the embedded mode. It asks the daemon to attach the watch before
//! the agent's first process exists ([`crate::link::SupervisorLine::Attach`]), writes its own
//! events (start, exit, limits) to a pipe the daemon reads, and exits with the agent's
//! status, which the daemon relays to the client.
//!
//! # Faults (docs/daemon.md)
//! The agents' cgroup programs are pinned in bpffs, so their network stays decided if the
//! daemon dies. Every supervisor watches its socket to the daemon and kills its agent the
//! moment it closes. A daemon that starts finds the agents a previous instance recorded in
//! its state directory, kills and removes whatever is left of them, unpins their
//! programs, and records that in the audit log.

mod ask;
pub mod client;
mod handover;
mod metrics;
mod outputs;
pub use outputs::Outputs;
mod peer;
pub mod proto;
mod session;
mod spawn;
mod web;

pub use ask::DEFAULT_ALLOWED_SIGNERS;

use std::{
    collections::{HashMap, VecDeque},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::fs::PermissionsExt as _,
    },
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream, unix::OwnedWriteHalf},
    sync::{broadcast, watch},
};

use self::peer::Peer;
use self::proto::{AgentRow, AgentState, MAX_LINE, Reply, Request, RunRequest, Stats};
use crate::link::{SUPERVISOR_FD, SupervisorLine, ToSupervisor};
use crate::{
    audit::{
        AuditLog,
        record::{Action, Actor, Control},
    },
    bpf::{self, Watch},
    breaker::{Breaker, kernel_lost},
    event::{Event, Kind, Layer, Verdict},
    profile::{self, CompileContext, CompiledPolicy, Profile},
    run::{
        bursts::Bursts,
        kernel::{
            BURST_TICK, LOST_TRIP, lost_trip_event, manual_kill_event, monotonic_ns, release_held,
            trip_event, trip_line,
        },
    },
    sandbox::cgroup::AgentCgroup,
};

/// Defaults (the systemd unit in dist/ uses them).
pub const DEFAULT_SOCKET: &str = "/run/agentd/agentd.sock";
pub use crate::host::DEFAULT_STATE_DIR;
pub const DEFAULT_AUDIT_LOG: &str = crate::audit::cmd::DEFAULT_PATH;
/// Members of this group (when it exists) may launch and watch agents.
pub const DEFAULT_GROUP: &str = "agentd";
/// Where agents' cgroup programs are pinned: one directory per daemon (by state
/// directory), one per agent below it.
const PIN_ROOT: &str = "/sys/fs/bpf/agentd";
/// Events kept for `agentd events` without `--follow`.
const RECENT: usize = 1000;
/// Exited agents kept for `agentd ps`.
const EXITED_KEPT: usize = 100;
/// How long an agent's verdict waits for the report of the loss that killed it (see
/// `supervisor_line`): the LOST counters are read each second, and a loaded daemon may
/// take seconds more to handle what they say.
const LOSS_REPORT_WAIT: Duration = Duration::from_secs(5);
/// How long `finished` waits for the first process's exit event.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Signals a `run` client may forward to its agent (as `agentd run` forwards them).
const FORWARDABLE: [i32; 5] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGWINCH,
];

#[derive(Debug, Clone)]
pub struct DaemonArgs {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub audit_log: PathBuf,
    /// Group whose members may launch and watch (besides root).
    pub group: String,
    /// `--dns-upstream`: where the agents' resolver asks.
    pub dns_upstream: Option<std::net::SocketAddr>,
    /// `--approvers`: members may answer any agent's requests.
    pub approvers: Option<String>,
    /// `--allowed-signers`: the keys whose signatures approvals may carry.
    pub allowed_signers: PathBuf,
    /// `--handover-grace`: how long agents wait for the next daemon after a SIGTERM (0:
    /// they are stopped with the daemon).
    pub handover_grace: Duration,
    /// Metrics, the web view and event export (each off by default).
    pub outputs: Outputs,
}

/// One agent the daemon knows.
struct Agent {
    id: String,
    profile: String,
    owner: Actor,
    pid: u32,
    state: AgentState,
    started: Instant,
    events: u64,
    denials: u64,
    /// Events of the agent the kernel could not report.
    lost: u64,
    cgroup: PathBuf,
    cgroup_id: u64,
    bpf: Option<bpf::AgentHandle>,
    breaker: Breaker,
    killed_by: Option<String>,
    /// Set once the first process's exit event was handled.
    drained: watch::Sender<bool>,
    /// Processes seen exiting before the supervisor named the first one (a short-lived
    /// agent's exit event can overtake its `started` line); at most [`EARLY_EXITS`].
    early_exits: Vec<u32>,
    /// The agent's resolver, when its profile names domains (dropping it stops it).
    resolver: Option<crate::dns::Resolver>,
    /// The invoking user (the peer, or the user `sudo` names for root).
    owner_uid: u32,
    /// The `agentd run` that supervises it.
    supervisor_pid: u32,
    /// Its compiled policy (asking needs its rules).
    policy: CompiledPolicy,
    asking: ask::AgentAsking,
    /// What it was launched with.
    launch: Launch,
    /// Taken over from a previous daemon: where its supervisor's reconnection goes, until
    /// it comes (handover.rs).
    resume: Option<tokio::sync::oneshot::Sender<session::Supervisor>>,
    /// Taken over: where a `run` client that follows it again goes.
    reattach: Option<tokio::sync::mpsc::UnboundedSender<session::Client>>,
}

impl Agent {
    /// An agent just attached (`starting`, nothing counted yet) in `cgroup`, watched
    /// through `handle`, with its resolver and the names it was asked about.
    fn new(
        id: &str,
        policy: &CompiledPolicy,
        (owner, owner_uid): (Actor, u32),
        (handle, cgroup): (bpf::AgentHandle, &Path),
        (resolver, asked): (Option<crate::dns::Resolver>, crate::dns::AskedNames),
        launch: Launch,
        supervisor_pid: u32,
    ) -> Agent {
        Agent {
            id: id.to_owned(),
            profile: policy.name.clone(),
            owner,
            pid: 0,
            state: AgentState::Starting,
            started: Instant::now(),
            events: 0,
            denials: 0,
            lost: 0,
            cgroup: cgroup.to_path_buf(),
            cgroup_id: handle.cgroup_id(),
            bpf: Some(handle),
            breaker: Breaker::new(policy.breaker.clone()),
            killed_by: None,
            drained: watch::channel(false).0,
            early_exits: Vec::new(),
            resolver,
            owner_uid,
            supervisor_pid,
            policy: policy.clone(),
            asking: ask::AgentAsking {
                terminal: false,
                to_client: None,
                task: None,
                asked,
            },
            launch,
            resume: None,
            reattach: None,
        }
    }
}

/// Bound of [`Agent::early_exits`].
const EARLY_EXITS: usize = 64;

/// The daemon's totals (`agentd stats`, the metrics). Events and denials count as each
/// agent's do in `agentd ps` ([`metrics::counted`]); trips are the breaker records (trips,
/// kill switch uses), as `agentd_breaker_trips_total` counts them.
#[derive(Default)]
struct Counters {
    events: u64,
    lost: u64,
    denials: u64,
    trips: u64,
    agents_total: u64,
    /// Agents that ended on their own, and those the breaker or the kill switch killed.
    agents_exited: u64,
    agents_tripped: u64,
    /// (second, events in it) for the last seconds.
    per_second: VecDeque<(u64, u64)>,
}

struct Shared {
    watch: Mutex<Watch>,
    agents: Mutex<HashMap<String, Agent>>,
    /// Agents that ended, for `ps` (the last [`EXITED_KEPT`]).
    exited: Mutex<VecDeque<AgentRow>>,
    events: broadcast::Sender<Arc<Event>>,
    recent: Mutex<VecDeque<Arc<Event>>>,
    audit: Mutex<AuditLog>,
    counters: Mutex<Counters>,
    /// Identical refusals folded for the record (`run::bursts`).
    bursts: Mutex<Bursts>,
    /// The queue of the thread that records events (audit log, counters, subscribers):
    /// the breaker never waits for a record's `fdatasync`. `None` once stopping.
    records: Mutex<Option<std::sync::mpsc::SyncSender<Queued>>>,
    started: Instant,
    /// `--group`, and its gid when the group exists.
    group: String,
    group_gid: Option<u32>,
    state_dir: PathBuf,
    /// This daemon's directory of pinned cgroup programs.
    pins: PathBuf,
    /// `--dns-upstream`.
    dns_upstream: Option<std::net::SocketAddr>,
    asking: ask::Asking,
    /// The control socket (absolute): where supervisors reconnect after a handover.
    socket: PathBuf,
    /// Set when stopping for a successor: every session tells its supervisor and client.
    handover: watch::Sender<session::HandoverSignal>,
    /// A supervisor started ahead of need, for the next launch (`spawn`).
    warm: Arc<Mutex<Option<spawn::Warm>>>,
    /// `--metrics`: counted as events are recorded.
    metrics: metrics::Metrics,
    /// `--syslog`, `--otlp`: where recorded events are sent.
    export: crate::export::Exporters,
    /// `--ui`: the web view's access tokens.
    ui: web::Ui,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the daemon records about a running agent in its state directory, for the next
/// instance to reap if this one dies.
#[derive(Debug, Serialize, Deserialize)]
struct AgentRecord {
    id: String,
    cgroup: PathBuf,
    cgroup_id: u64,
}

/// `agentd daemon`.
pub fn daemon(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    sanitize_self()?;
    if !nix::unistd::geteuid().is_root() {
        bail!("agentd daemon must run as root (it loads BPF programs and creates cgroups)");
    }
    for fs in [bpf::TRACEFS, bpf::BPFFS] {
        bpf::ensure_mounted(fs).with_context(|| format!("mounting {}", fs.1))?;
    }
    // securityfs only tells which LSMs are active (for `agentd doctor`): not required.
    if let Err(e) = bpf::ensure_mounted(bpf::SECURITYFS) {
        eprintln!("agentd daemon: warning: {e}");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve(args))
}

/// Closes inherited descriptors, makes the process non-dumpable and core-less, and sets a
/// strict umask: what a privileged service owes its host.
fn sanitize_self() -> anyhow::Result<()> {
    // SAFETY: close_range only closes descriptors; none above 2 is owned by Rust code yet
    // (main has opened nothing but stdio).
    if unsafe { libc::close_range(3, u32::MAX, 0) } != 0 {
        bail!("close_range: {}", std::io::Error::last_os_error());
    }
    nix::sys::prctl::set_dumpable(false).context("prctl(PR_SET_DUMPABLE)")?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)
        .context("setrlimit(RLIMIT_CORE)")?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    Ok(())
}

/// Opens the audit log, waiting for a previous daemon that still holds it: a daemon killed
/// with SIGKILL keeps its descriptors until the kernel has detached its tracepoints, which
/// takes seconds.
async fn open_audit(path: &Path) -> anyhow::Result<AuditLog> {
    let waited = Instant::now();
    let mut said = false;
    loop {
        // Events are made durable in groups (the thread that records them); control
        // records at once (`audit_control`).
        let options = crate::audit::Options {
            sync_every: std::num::NonZeroU32::MAX,
            ..crate::audit::Options::default()
        };
        match AuditLog::open_with(path, options) {
            Err(crate::audit::AuditError::Locked { .. })
                if waited.elapsed() < Duration::from_secs(60) =>
            {
                if !said {
                    eprintln!(
                        "agentd daemon: {} is locked by another process (a previous daemon still exiting?): waiting up to 60 s",
                        path.display()
                    );
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => return r.with_context(|| format!("audit log {}", path.display())),
        }
    }
}

fn pin_dir(state_dir: &Path) -> PathBuf {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(state_dir.as_os_str().as_encoded_bytes());
    let tag: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    Path::new(PIN_ROOT).join(tag)
}

async fn serve(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    for dir in [
        args.state_dir.join("agents"),
        args.audit_log
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
        args.socket
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
    ] {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut audit = open_audit(&args.audit_log).await?;
    // What can be refused without the kernel is, before anything is loaded or pinned: a
    // start that fails here leaves nothing behind. (After the audit log: a previous daemon
    // still exiting holds its socket and ports until it is gone, as it holds the log.)
    let socket_abs = std::path::absolute(&args.socket)
        .with_context(|| format!("resolving {}", args.socket.display()))?;
    refuse_live_socket(&args.socket)?;
    let group_gid = nix::unistd::Group::from_name(&args.group)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw());
    let o = &args.outputs;
    let metrics_at = match &o.metrics {
        Some(l) => Some(outputs::Bound::bind(l, "metrics", group_gid).await?),
        None => None,
    };
    let ui_at = match o.ui {
        Some(a) => {
            Some(outputs::Bound::bind(&outputs::Listen::Tcp(a), "web view", group_gid).await?)
        }
        None => None,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;

    let pins = pin_dir(&args.state_dir);
    let previous = handover::previous(&args.state_dir, &pins);
    reap_previous(&args.state_dir, &pins, &mut audit, previous.as_ref());
    let pinned = Pinned {
        pins: &pins,
        armed: previous.is_none(),
    };
    let mut watch = handover::load_watch(&pins, previous.as_ref())?;
    watch.hold_in_reaper();
    std::fs::create_dir_all(&pins).with_context(|| format!("creating {}", pins.display()))?;
    watch.pin_links_under(&pins);

    let (events, _) = broadcast::channel(4096);
    let export = crate::export::Exporters::start(
        o.syslog.clone().map(|t| {
            let s = crate::export::Selection {
                kinds: o.syslog_kinds.clone(),
                verdicts: o.syslog_verdicts.clone(),
                severity: o.syslog_severity,
            };
            (t, o.syslog_facility, s)
        }),
        o.otlp.clone().map(|e| {
            let s = crate::export::Selection {
                kinds: o.otlp_kinds.clone(),
                verdicts: o.otlp_verdicts.clone(),
                severity: o.otlp_severity,
            };
            (e, s)
        }),
    )?;
    let (records_tx, records_rx) = std::sync::mpsc::sync_channel::<Queued>(RECORD_QUEUE);
    let shared = Arc::new(Shared {
        watch: Mutex::new(watch),
        agents: Mutex::new(HashMap::new()),
        exited: Mutex::new(VecDeque::new()),
        events,
        recent: Mutex::new(VecDeque::new()),
        audit: Mutex::new(audit),
        counters: Mutex::new(Counters::default()),
        bursts: Mutex::new(Bursts::new()),
        records: Mutex::new(Some(records_tx)),
        started: Instant::now(),
        group: args.group.clone(),
        group_gid,
        state_dir: args.state_dir.clone(),
        pins: pins.clone(),
        dns_upstream: args.dns_upstream,
        asking: ask::Asking::new(args.approvers.clone(), args.allowed_signers.clone()),
        socket: socket_abs,
        handover: watch::channel(None).0,
        warm: Arc::default(),
        metrics: metrics::Metrics::default(),
        export,
        ui: web::Ui::new(o.ui),
    });
    let recorder = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("agentd-records".into())
            .spawn(move || {
                // Group commit: what is queued is recorded (at most GROUP_COMMIT records),
                // then made durable with one fdatasync, outside the log's lock; whoever
                // waits on a barrier is told after that.
                let mut barriers = Vec::new();
                while let Ok(first) = records_rx.recv() {
                    // A group: what comes within GROUP_WINDOW of its first record, at most
                    // GROUP_COMMIT records, and no longer once someone waits on it.
                    let deadline = Instant::now() + GROUP_WINDOW;
                    let mut next = Some(first);
                    let mut stop = false;
                    let mut n = 0;
                    while let Some(q) = next.take() {
                        match q {
                            Queued::Event(ev) => record(&shared, *ev),
                            Queued::Barrier(done) => barriers.push(done),
                            Queued::Stop => {
                                stop = true;
                                break;
                            }
                        }
                        n += 1;
                        if n >= GROUP_COMMIT {
                            break;
                        }
                        next = match records_rx.try_recv() {
                            Ok(q) => Some(q),
                            Err(std::sync::mpsc::TryRecvError::Empty) if barriers.is_empty() => {
                                let left = deadline.saturating_duration_since(Instant::now());
                                records_rx.recv_timeout(left).ok()
                            }
                            Err(_) => None,
                        };
                    }
                    make_durable(&shared);
                    for done in barriers.drain(..) {
                        let _ = done.send(());
                    }
                    if stop {
                        break;
                    }
                }
            })
            .context("starting the thread that records events")?
    };
    // Agents a previous daemon handed over are watched again before the reader starts:
    // what the ring buffer kept for them decodes as theirs. Then the previous daemon's
    // programs stop (ours run).
    if let Some(h) = previous {
        handover::adopt_all(&shared, h);
    }
    handover::release_previous(&pins);
    let rx = lock(&shared.watch)
        .try_events()
        .context("the kernel watch's events")?;
    // The kernel's events on a thread of their own: a flood of them (100 agents at full
    // speed) must not queue `ps` and `kill` behind it (tests/tests/storm.rs). It says when
    // their stream ends; that is news only while the daemon runs (it ends as it stops).
    let (stream_ended, mut stream_end) = tokio::sync::oneshot::channel::<()>();
    {
        let shared = Arc::clone(&shared);
        let events = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime of the kernel's events")?;
        std::thread::Builder::new()
            .name("agentd-events".into())
            .spawn(move || {
                events.block_on(kernel_events(shared, rx));
                let _ = stream_ended.send(());
            })
            .context("starting the thread of the kernel's events")?;
    }
    // Bound last: a supervisor reconnecting after a handover finds its agent taken over.
    let listener = bind_socket(&args.socket)?;
    // Nothing fails from here on: what this start pinned is the running daemon's.
    pinned.disarm();
    spawn::replenish(&shared.warm, &shared.socket);
    if let (Some(bound), Some(l)) = (metrics_at, &o.metrics) {
        bound.serve(metrics::router(Arc::clone(&shared)));
        eprintln!("agentd daemon: metrics at {l}/metrics");
    }
    if let (Some(bound), Some(a)) = (ui_at, o.ui) {
        bound.serve(web::router(Arc::clone(&shared)));
        eprintln!(
            "agentd daemon: web view at http://{a} (`agentd ui-url` prints its address with a token)"
        );
    }
    eprintln!(
        "agentd daemon: listening on {} (group {}: {}), audit log {}",
        args.socket.display(),
        args.group,
        group_gid.map_or_else(|| "absent: root only".to_owned(), |g| format!("gid {g}")),
        args.audit_log.display()
    );

    let mut stream_open = true;
    let hand_over = loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move {
                        if let Err(e) = connection(shared, stream).await {
                            tracing::info!("connection: {e:#}");
                        }
                    });
                }
                Err(e) => tracing::warn!("accept: {e}"),
            },
            _ = &mut stream_end, if stream_open => {
                stream_open = false;
                eprintln!("agentd daemon: the kernel event stream ended: the agents' kernel events are no longer read");
            }
            _ = term.recv() => break true,
            _ = int.recv() => break false,
        }
    };
    // SIGTERM with agents running: hand them over to the next daemon (SIGINT, or a
    // grace of 0: stop them).
    let _ = std::fs::remove_file(&args.socket);
    // The supervisor started ahead of need has no agent: it goes now.
    drop(lock(&shared.warm).take());
    let handed = if hand_over && !args.handover_grace.is_zero() {
        handover::hand_over(&shared, args.handover_grace)
            .await
            .unwrap_or_else(|e| {
                eprintln!("agentd daemon: cannot hand the agents over ({e}): they are stopped");
                Vec::new()
            })
    } else {
        Vec::new()
    };
    shutdown(&shared, &handed).await;
    // Every queued event is recorded before the log is synced and closed. (Tasks the
    // runtime no longer runs may hold senders: the thread is told, not left waiting.)
    if let Some(q) = lock(&shared.records).take() {
        let _ = q.send(Queued::Stop);
    }
    if recorder.join().is_err() {
        eprintln!("agentd daemon: the thread that records events panicked");
    }
    if let Err(e) = lock(&shared.audit).sync() {
        eprintln!("agentd daemon: audit log: {e}");
    }
    eprintln!("agentd daemon: stopped");
    Ok(ExitCode::SUCCESS)
}

/// What a start pinned (the watch's maps), unpinned if the start fails: a daemon that
/// could not start leaves no kernel state behind. Not armed when a previous daemon's
/// handover is taken over: those maps are its agents' (their policies, kill flags and
/// unread events, which their pinned programs go on using while their supervisors wait
/// for a daemon). They are left as they were; the supervisors kill their agents when the
/// grace period ends, and the next start reaps them by their records, maps and all.
struct Pinned<'a> {
    pins: &'a Path,
    armed: bool,
}

impl Pinned<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        if self.armed {
            handover::unpin_maps(self.pins);
            let _ = std::fs::remove_dir(self.pins);
            let _ = std::fs::remove_dir(PIN_ROOT);
        }
    }
}

/// How long a stopping daemon waits for the sessions of the agents it killed to end: each
/// relays the kill and the agent's exit status to its supervisor and `run` client, as for
/// a kill switch. (A supervisor's verdict can wait [`DRAIN_TIMEOUT`] for the exit event.)
const STOP_WAIT: Duration = Duration::from_secs(3);

/// Stopping: every agent not handed over is killed (no agent outlives its watch), then its
/// programs detached. Without a successor the maps are unpinned too.
async fn shutdown(shared: &Shared, handed: &[String]) {
    let ids: Vec<String> = lock(&shared.agents)
        .keys()
        .filter(|id| !handed.contains(id))
        .cloned()
        .collect();
    for id in &ids {
        kill_agent(shared, id, "the daemon is stopping", this_actor());
    }
    // Their sessions end once their supervisors have their verdicts and exit statuses
    // (the session then retires the agent): a planned stop reads as the kill it is, not as
    // a daemon that died. Agents taken over whose supervisors have not come back have no
    // session to wait for.
    let deadline = tokio::time::Instant::now() + STOP_WAIT;
    let in_session = |id: &String| {
        lock(&shared.agents)
            .get(id)
            .is_some_and(|a| a.resume.is_none())
    };
    while ids.iter().any(in_session) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in ids {
        if let Some(a) = lock(&shared.agents).get_mut(&id)
            && let Some(h) = a.bpf.take()
            && let Err(e) = lock(&shared.watch).remove_agent(h)
        {
            eprintln!("agentd daemon: detaching {id}: {e}");
        }
        forget_record(&shared.state_dir, &id);
    }
    if handed.is_empty() {
        handover::unpin_maps(&shared.pins);
    }
    // Every agent's pins are gone with it: the directories go too (when empty).
    let _ = std::fs::remove_dir(&shared.pins);
    let _ = std::fs::remove_dir(PIN_ROOT);
}

fn this_actor() -> Actor {
    crate::audit::writer::this_process()
}

/// Refuses a control socket another daemon answers on.
fn refuse_live_socket(path: &Path) -> anyhow::Result<()> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "{} is in use: another agentd daemon is running (stop it, or give --socket)",
            path.display()
        );
    }
    Ok(())
}

/// Binds the control socket: a stale socket file (nobody listening) is replaced, a live
/// one is an error (another daemon, checked at the start and again here). Mode 0666:
/// every local user may connect and is told, by peer credentials, what it may do.
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        refuse_live_socket(path)?;
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

/// Makes a unix socket of an output reachable by root and `group_gid` only (0660): its
/// protocol (HTTP) carries no peer credentials.
fn restrict_socket(path: &Path, group_gid: Option<u32>) -> anyhow::Result<()> {
    nix::unistd::chown(path, None, group_gid.map(nix::unistd::Gid::from_raw))
        .with_context(|| format!("chown {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", path.display()))
}

/// What a previous instance left: its recorded agents are killed, their cgroups removed,
/// their pinned programs unpinned; each reaped agent is a control record.
fn reap_previous(
    state_dir: &Path,
    pins: &Path,
    audit: &mut AuditLog,
    handover: Option<&handover::Handover>,
) {
    let dir = state_dir.join("agents");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let record: Option<AgentRecord> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let Some(record) = record else {
            let _ = std::fs::remove_file(&path);
            continue;
        };
        if handover::keeps_record(&record, handover) {
            continue;
        }
        let (control, found, unpinned) = reap_agent(
            pins,
            &record.id,
            record.cgroup_id,
            "left by a daemon that died",
        );
        if let Err(e) = audit.append_control(&control).and_then(|_| audit.sync()) {
            eprintln!("agentd daemon: audit log: {e}");
        }
        eprintln!(
            "agentd daemon: reaped {} (left by a daemon that died; cgroup {}, programs {})",
            record.id,
            if found {
                "killed and removed"
            } else {
                "already gone"
            },
            if unpinned { "unpinned" } else { "already gone" }
        );
        let _ = std::fs::remove_file(&path);
    }
    // Pins of agents no record names (a crash between pinning and recording); the
    // watch's own and the handed-over agents' stay (handover.rs decides).
    let kept: Vec<String> = handover
        .map(|h| h.cgroup_ids().map(|c| c.to_string()).collect())
        .unwrap_or_default();
    if let Ok(stale) = std::fs::read_dir(pins) {
        for e in stale.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == bpf::watch::MAPS_DIR || name == bpf::watch::LINKS_DIR || kept.contains(&name)
            {
                continue;
            }
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Kills and removes what is left of agent `id`: its cgroup, its pinned programs. Returns
/// the `control` record `kill` that says so (with `reason`), and whether there was a
/// cgroup left and pins to remove.
fn reap_agent(pins: &Path, id: &str, cgroup_id: u64, reason: &str) -> (Control, bool, bool) {
    let mut found = false;
    match AgentCgroup::leftover(id) {
        Ok(Some(cg)) => {
            found = true;
            if let Err(e) = cg.destroy() {
                eprintln!("agentd daemon: reaping {id}: {e}");
            }
        }
        Ok(None) => {}
        Err(e) => eprintln!("agentd daemon: reaping {id}: {e}"),
    }
    let unpinned = std::fs::remove_dir_all(pins.join(cgroup_id.to_string())).is_ok();
    let mut detail = serde_json::Map::new();
    detail.insert("reason".into(), reason.into());
    detail.insert("cgroup_left".into(), found.into());
    detail.insert("pins_removed".into(), unpinned.into());
    let control = Control {
        action: Action::Kill,
        agent: Some(id.to_owned()),
        by: this_actor(),
        detail,
    };
    (control, found, unpinned)
}

fn record_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("agents").join(format!("{id}.json"))
}

fn forget_record(state_dir: &Path, id: &str) {
    let _ = std::fs::remove_file(record_path(state_dir, id));
}

// ---- events -----------------------------------------------------------------------------

async fn kernel_events(shared: Arc<Shared>, mut rx: tokio::sync::mpsc::Receiver<Event>) {
    let mut tick = tokio::time::interval(BURST_TICK);
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => handle_event(&shared, ev),
                None => break,
            },
            _ = tick.tick() => {
                let closed = lock(&shared.bursts).expired(monotonic_ns());
                for e in closed {
                    publish(&shared, e);
                }
            }
        }
    }
    let open = lock(&shared.bursts).flush();
    for e in open {
        publish(&shared, e);
    }
}

/// Every event, whatever its source: counted, fed to its agent's breaker, audited, kept
/// for `agentd events`, broadcast.
fn handle_event(shared: &Shared, ev: Event) {
    let now_ns = ev.ktime_ns.unwrap_or_else(monotonic_ns);
    let mut extra = None;
    // Counted as they are learnt, with the agent's: the audit log can be far behind.
    let lost = kernel_lost(&ev);
    if let Some(n) = lost {
        lock(&shared.counters).lost += n;
    }
    {
        let mut agents = lock(&shared.agents);
        if let Some(a) = agents.get_mut(&ev.agent) {
            // Its events and denials are counted as they are recorded (`record`).
            a.lost += lost.unwrap_or(0);
            let trip = a.breaker.observe(&ev, now_ns);
            let kill = trip
                .as_ref()
                .is_some_and(|t| t.enforced && t.action == crate::profile::Action::Kill);
            if ev.held() && !kill {
                // The breaker lets the held process go: its refusal was no violation.
                release_held(ev.pid, &a.cgroup);
            }
            if let Some(trip) = trip {
                let mut contain_ns = None;
                if kill {
                    contain(shared, a, "breaker");
                    contain_ns = Some(monotonic_ns().saturating_sub(now_ns));
                    a.killed_by = Some(trip_line(&trip, &ev));
                    a.state = AgentState::Tripped;
                }
                extra = Some(trip_event(
                    &trip,
                    &ev,
                    kill,
                    a.breaker.violations(),
                    contain_ns,
                ));
            }
            if ev.kind == Kind::ProcessExit {
                if a.pid == 0 {
                    if a.early_exits.len() < EARLY_EXITS {
                        a.early_exits.push(ev.pid);
                    }
                } else if ev.pid == a.pid {
                    a.drained.send_replace(true);
                }
            }
        } else if let Some(n) = lost
            && let Some(r) = lock(&shared.exited)
                .iter_mut()
                .rev()
                .find(|r| r.id == ev.agent)
        {
            // Lost counts are read each second: the last can come after the agent ended.
            r.lost += n;
        }
    }
    let records = lock(&shared.bursts).push(ev, now_ns);
    for e in records {
        publish(shared, e);
    }
    if let Some(e) = extra {
        publish(shared, e);
    }
}

/// Events queued for the recording thread before a burst makes the breaker wait.
const RECORD_QUEUE: usize = 65_536;

/// What the recording thread takes, in order.
enum Queued {
    Event(Box<Event>),
    /// Answered once every event queued before it is recorded.
    Barrier(tokio::sync::oneshot::Sender<()>),
    /// Stopping: the thread ends after what was queued before.
    Stop,
}

/// Queues one event for the recording thread ([`record`]), in order; records it here when
/// the thread is gone (stopping).
fn publish(shared: &Shared, ev: Event) {
    let queue = lock(&shared.records).clone();
    match queue {
        Some(q) => {
            if let Err(std::sync::mpsc::SendError(Queued::Event(ev))) =
                q.send(Queued::Event(Box::new(ev)))
            {
                record(shared, *ev);
            }
        }
        None => record(shared, ev),
    }
}

/// Waits until every event published so far is recorded (and so sent to subscribers).
async fn recorded(shared: &Shared) {
    let queue = lock(&shared.records).clone();
    let Some(q) = queue else {
        return;
    };
    let (done, wait) = tokio::sync::oneshot::channel();
    let sent = q.send(Queued::Barrier(done)).is_ok();
    drop(q);
    if sent {
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, wait).await;
    }
}

/// Audits, counts, keeps and broadcasts one event.
/// Most records one `fdatasync` makes durable: a crash loses at most this many events
/// (those recorded since the last one), never a control record.
const GROUP_COMMIT: usize = 1024;
/// How long a group gathers records after its first, unless someone waits on it (a
/// barrier: a verdict, a stop): a crash loses at most what was recorded this long before
/// it. Events come in trickles (a build: hundreds a second): a sync for each few of them
/// was a tenth of the daemon's time.
const GROUP_WINDOW: Duration = Duration::from_millis(20);

/// Makes what was recorded durable, without holding the log's lock during `fdatasync`.
fn make_durable(shared: &Shared) {
    // The metrics' durability lag: from the oldest record this sync covers (taken with
    // the records, under the log's lock) to the end of the sync.
    let (pending, appended) = {
        let mut log = lock(&shared.audit);
        (log.pending_sync(), shared.metrics.take_unsynced())
    };
    match pending.and_then(|p| p.map(crate::audit::writer::PendingSync::sync).transpose()) {
        Ok(Some(_)) => shared.metrics.audit_durable(appended),
        Ok(None) => {}
        Err(e) => {
            shared.metrics.audit_failed(metrics::AuditOp::Sync);
            eprintln!("agentd daemon: audit log: {e}");
        }
    }
}

/// Appends a control record and makes it durable, with the events recorded before it,
/// before returning: a control action is on disk before its reply.
fn audit_control(shared: &Shared, control: &Control) {
    audited(shared, metrics::AuditRecord::Control, |log| {
        log.append_control(control)
    });
    make_durable(shared);
}

/// Appends one record with `append`, counted in the metrics under the log's lock (the
/// durability lag takes its time with the records a sync covers).
fn audited<T>(
    shared: &Shared,
    what: metrics::AuditRecord,
    append: impl FnOnce(&mut AuditLog) -> Result<T, crate::audit::AuditError>,
) {
    let mut log = lock(&shared.audit);
    match append(&mut log) {
        Ok(_) => shared.metrics.audit_appended(what),
        Err(e) => {
            drop(log);
            shared.metrics.audit_failed(metrics::AuditOp::Append);
            eprintln!("agentd daemon: audit log: {e}");
        }
    }
}

fn record(shared: &Shared, ev: Event) {
    audited(shared, metrics::AuditRecord::Event, |log| {
        log.append_event(&ev)
    });
    let n = metrics::counted(&ev);
    {
        let mut c = lock(&shared.counters);
        c.events += n.events;
        c.denials += n.denials;
        if ev.kind == Kind::Breaker {
            c.trips += 1;
        }
        let sec = shared.started.elapsed().as_secs();
        match c.per_second.back_mut() {
            Some((s, k)) if *s == sec => *k += n.events,
            _ => c.per_second.push_back((sec, n.events)),
        }
        while c.per_second.front().is_some_and(|(s, _)| *s + 10 < sec) {
            c.per_second.pop_front();
        }
    }
    let ev = Arc::new(ev);
    {
        let mut r = lock(&shared.recent);
        if r.len() == RECENT {
            r.pop_front();
        }
        r.push_back(Arc::clone(&ev));
    }
    let agent = count_for_agent(shared, &ev, n);
    shared.metrics.event(&ev);
    shared.export.send(&ev, agent);
    // No subscriber is not an error.
    let _ = shared.events.send(ev);
}

/// Counts `ev` (as `n`) for its agent, running or ended (a record can come after its agent
/// ended: a burst's summary); returns whose agent it is, for the export (`None` when
/// nothing is exported, or the agent is not known). Takes the registry's locks only:
/// nothing that waits on I/O holds them.
fn count_for_agent(
    shared: &Shared,
    ev: &Event,
    n: metrics::Counted,
) -> Option<crate::export::AgentInfo> {
    if ev.agent.is_empty() {
        return None;
    }
    let exported = !shared.export.is_empty();
    let info = |owner_uid: u32, profile: &str| crate::export::AgentInfo {
        owner_uid,
        profile: profile.to_owned(),
    };
    // Agents, then ended agents: the order the daemon takes these locks in.
    let mut agents = lock(&shared.agents);
    if let Some(a) = agents.get_mut(&ev.agent) {
        a.events += n.events;
        a.denials += n.denials;
        return exported.then(|| info(a.owner_uid, &a.profile));
    }
    let mut exited = lock(&shared.exited);
    let r = exited.iter_mut().rev().find(|r| r.id == ev.agent)?;
    r.events += n.events;
    r.denials += n.denials;
    exported.then(|| info(r.owner_uid, &r.profile))
}

/// Stops agent `a` as the breaker does (see `run::kernel`): `cgroup.kill` first, then the
/// kill flag. Returns at once: the agent's supervisor waits for the cgroup to empty.
fn contain(shared: &Shared, a: &Agent, what: &str) {
    if let Err(e) = std::fs::write(a.cgroup.join("cgroup.kill"), "1") {
        eprintln!(
            "agentd daemon: {what}: cgroup.kill in {}: {e}",
            a.cgroup.display()
        );
    }
    if let Err(e) = lock(&shared.watch).set_killed(a.cgroup_id) {
        eprintln!("agentd daemon: {what}: kill flag of {}: {e}", a.id);
    }
}

/// The kill switch: the cgroup, then the kill flag; reported as a `breaker` event with rule
/// `manual` and recorded. Returns false when no such running agent exists.
fn kill_agent(shared: &Shared, id: &str, reason: &str, by: Actor) -> bool {
    kill_agent_with(shared, id, reason, by, serde_json::Map::new())
}

/// [`kill_agent`], with more `detail` for its audit record.
fn kill_agent_with(
    shared: &Shared,
    id: &str,
    reason: &str,
    by: Actor,
    mut detail: serde_json::Map<String, serde_json::Value>,
) -> bool {
    let asked = monotonic_ns();
    let (pid, agent_id) = {
        let mut agents = lock(&shared.agents);
        let Some(a) = agents.get_mut(id) else {
            return false;
        };
        contain(shared, a, "kill switch");
        a.killed_by = Some(format!("killed by the kill switch ({reason})"));
        a.state = AgentState::Tripped;
        (a.pid, a.id.clone())
    };
    detail.insert("reason".into(), reason.into());
    let control = Control {
        action: Action::Kill,
        agent: Some(id.to_owned()),
        by,
        detail,
    };
    audit_control(shared, &control);
    let contain_ns = monotonic_ns().saturating_sub(asked);
    publish(
        shared,
        manual_kill_event(&agent_id, pid, reason, contain_ns).with("by_uid", by.uid),
    );
    true
}

// ---- connections ---------------------------------------------------------------------

/// Reads the first line of a connection with the descriptors that came with it.
async fn read_request(stream: &UnixStream) -> anyhow::Result<(Vec<u8>, Vec<OwnedFd>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut fds = Vec::new();
    loop {
        stream.readable().await?;
        let mut chunk = [0u8; 8192];
        let got = stream.try_io(tokio::io::Interest::READABLE, || {
            crate::link::recv_with_fds(stream.as_raw_fd(), &mut chunk, &mut fds)
                .map_err(std::io::Error::from)
        });
        match got {
            Ok(0) => bail!("the client closed the connection before a request"),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.iter().position(|&b| b == b'\n') {
                    let rest = buf.split_off(i + 1);
                    buf.pop();
                    return Ok((buf, fds, rest));
                }
                if buf.len() > MAX_LINE {
                    return Ok((buf, fds, Vec::new()));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Passes one event of the published stream to a client that follows agent `agent`:
/// its own events, and a `lost` record when it fell behind. False when the stream is
/// done (closed, or the client gone).
async fn forward_event(
    write: &mut OwnedWriteHalf,
    agent: Option<&str>,
    ev: Result<Arc<Event>, broadcast::error::RecvError>,
) -> bool {
    match ev {
        Ok(ev) if Some(ev.agent.as_str()) == agent => {
            send(write, &Reply::Event(Box::new((*ev).clone())))
                .await
                .is_ok()
        }
        Ok(_) => true,
        Err(broadcast::error::RecvError::Lagged(n)) => {
            let ev = Event::new(
                agent.unwrap_or(""),
                0,
                "",
                Kind::Lost,
                Verdict::None,
                Layer::Agentd,
            )
            .with("count", n)
            .with("reason", "the client fell behind the event stream");
            send(write, &Reply::Event(Box::new(ev))).await.is_ok()
        }
        Err(broadcast::error::RecvError::Closed) => false,
    }
}

async fn send(w: &mut OwnedWriteHalf, reply: &Reply) -> std::io::Result<()> {
    w.write_all(&proto::encode(reply)).await
}

fn may_watch(shared: &Shared, peer: &Peer) -> bool {
    if peer.actor.uid == 0 {
        return true;
    }
    let Some(gid) = shared.group_gid else {
        return false;
    };
    peer.in_group(gid)
}

async fn connection(shared: Arc<Shared>, stream: UnixStream) -> anyhow::Result<()> {
    // Who connected, kept before the request is read: the client chooses when to send it,
    // and its pid may be another process's by then (peer.rs).
    let peer = Arc::new(Peer::of(&stream).context("the peer's credentials")?);
    let who = peer.actor;
    let (line, fds, rest) = read_request(&stream).await?;
    let (read, mut write) = stream.into_split();
    let request: Request = match proto::decode(&line) {
        Ok(r) => r,
        Err(e) => {
            send(&mut write, &Reply::Error(e.to_string())).await?;
            return Ok(());
        }
    };
    if !may_watch(&shared, &peer) {
        let (uid, group) = (who.uid, &shared.group);
        let why = if shared.group_gid.is_some() {
            format!(
                "permission denied: uid {uid} is neither root nor in group `{group}`; ask an administrator to add you (usermod -aG {group} USER)"
            )
        } else {
            format!(
                "permission denied: uid {uid} is neither root nor in group `{group}`, which does not exist on this host: only root may use this daemon (create the group, or start the daemon with --group)"
            )
        };
        send(&mut write, &Reply::Error(why)).await?;
        return Ok(());
    }
    match request {
        Request::Ps {} => {
            let rows = ps_rows(&shared);
            send(&mut write, &Reply::Agents(rows)).await?;
        }
        Request::Stats {} => {
            let stats = stats(&shared);
            send(&mut write, &Reply::Stats(stats)).await?;
        }
        Request::Kill { id } => {
            let reply = reply_of(kill_as(&shared, who, &id, "agentd kill", None));
            send(&mut write, &reply).await?;
        }
        Request::UiUrl {} => {
            // An agent runs as its owner's uid: only its cgroup tells its processes apart
            // (read, then confirmed to be the connecting process's); its groups are those
            // recorded at connect.
            let reply = match peer.agent() {
                Some(agent) => Reply::Error(format!(
                    "permission denied: the caller (pid {}) is a process of agent {agent}: no process inside an agent may have a web view token",
                    who.pid
                )),
                None => web::url_for(&shared, &who, peer.groups()),
            };
            send(&mut write, &reply).await?;
        }
        Request::Events {
            follow,
            agent,
            kind,
        } => events(&shared, &mut write, read, follow, agent, kind).await?,
        Request::Run(req) => run(shared, who, req, fds, read, rest, write).await?,
        Request::Approvals { follow, agent } => {
            ask::approvals(&shared, &peer, &mut write, read, follow, agent).await?;
        }
        Request::Decide {
            request,
            answer,
            signature,
        } => {
            let reply = ask::decide(&shared, &peer, &request, answer, signature);
            send(&mut write, &reply).await?;
        }
        Request::Grants { agent } => {
            let reply = ask::grants(&shared, &peer, agent.as_deref());
            send(&mut write, &reply).await?;
        }
        Request::Revoke { grant } => {
            let reply = ask::revoke(&shared, &peer, &grant);
            send(&mut write, &reply).await?;
        }
        Request::Resume { agent } => {
            handover::resume(&shared, who, &agent, fds, read, write).await?;
        }
        Request::Reattach { agent } => {
            handover::reattach(&shared, who, &agent, read, rest, write).await?;
        }
        Request::Transaction(req) => {
            // An agent runs as its owner's uid: its own processes must not commit what a
            // person has to review.
            let reply = match peer.agent() {
                Some(agent) => Reply::Error(format!(
                    "permission denied: the caller (pid {}) is a process of agent {agent}: agents may not act on transactions",
                    who.pid
                )),
                None => {
                    let state = shared.state_dir.clone();
                    let uid = who.uid;
                    match tokio::task::spawn_blocking(move || {
                        crate::transaction::cmd::execute(req, &state, uid)
                    })
                    .await
                    {
                        Ok(out) => Reply::Transaction(out),
                        Err(e) => Reply::Error(format!("transaction: {e}")),
                    }
                }
            };
            send(&mut write, &reply).await?;
        }
    }
    Ok(())
}

/// Why the daemon refused an action (a kill, an answer): which kind of refusal, and what
/// the caller is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Refusal {
    /// The caller may not (`permission denied: ...`).
    #[error("{0}")]
    Denied(String),
    /// No such agent or request (any more).
    #[error("{0}")]
    NotFound(String),
    /// The request itself is wrong (a duration out of range...).
    #[error("{0}")]
    Invalid(String),
    /// The daemon could not do it (its allowed-signers file cannot be read...).
    #[error("{0}")]
    Failed(String),
}

/// An action's outcome as the control socket replies it.
fn reply_of(outcome: Result<String, Refusal>) -> Reply {
    match outcome {
        Ok(m) => Reply::Ok(m),
        Err(e) => Reply::Error(e.to_string()),
    }
}

/// The kill switch for `who` (through `via`: `agentd kill`, the web view, whose session
/// the audit record names): only root and the agent's owner may.
fn kill_as(
    shared: &Shared,
    who: Actor,
    id: &str,
    via: &str,
    web: Option<&crate::ask::WebSession>,
) -> Result<String, Refusal> {
    // The owner approvals know too: for a root request, the user `SUDO_UID` names.
    let owner = lock(&shared.agents).get(id).map(|a| a.owner_uid);
    match owner {
        None => Err(Refusal::NotFound(format!(
            "no running agent {id} (see `agentd ps`)"
        ))),
        Some(owner) if who.uid != 0 && who.uid != owner => Err(Refusal::Denied(format!(
            "permission denied: agent {id} belongs to uid {owner}; only it and root may kill it"
        ))),
        Some(_) => {
            let mut detail = serde_json::Map::new();
            if let Some(w) = web {
                detail.insert("web".into(), serde_json::json!(w));
            }
            let reason = format!("{via} by uid {}", who.uid);
            if kill_agent_with(shared, id, &reason, who, detail) {
                Ok(format!("{id} killed"))
            } else {
                Err(Refusal::NotFound(format!("no running agent {id}")))
            }
        }
    }
}

/// The agent whose cgroup `pid` is in, if any; fails closed: a process whose cgroup
/// cannot be read counts as an agent's. Of a control connection's peer, ask
/// [`Peer::agent`]: a pid read from `SO_PEERCRED` may be another process's by now.
fn agent_of(pid: u32) -> Option<String> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return Some("unknown (its cgroup cannot be read)".into());
    };
    text.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        let mut parts = path.split('/');
        parts.find(|p| *p == crate::sandbox::cgroup::PARENT)?;
        parts.next().filter(|p| !p.is_empty()).map(str::to_owned)
    })
}

fn ps_rows(shared: &Shared) -> Vec<AgentRow> {
    let mut rows: Vec<AgentRow> = lock(&shared.exited).iter().cloned().collect();
    rows.extend(lock(&shared.agents).values().map(row));
    rows
}

fn row(a: &Agent) -> AgentRow {
    AgentRow {
        id: a.id.clone(),
        profile: a.profile.clone(),
        pid: a.pid,
        state: a.state,
        uptime_s: a.started.elapsed().as_secs(),
        events: a.events,
        denials: a.denials,
        lost: a.lost,
        cgroup: a.cgroup.clone(),
        owner_uid: a.owner_uid,
    }
}

fn stats(shared: &Shared) -> Stats {
    let c = lock(&shared.counters);
    let window: u64 = c.per_second.iter().map(|(_, n)| n).sum();
    let secs = shared.started.elapsed().as_secs_f64().clamp(1.0, 10.0);
    Stats {
        agents_running: lock(&shared.agents).len() as u64,
        agents_total: c.agents_total,
        events: c.events,
        events_per_s: window as f64 / secs,
        lost: c.lost,
        denials: c.denials,
        trips: c.trips,
        uptime_s: shared.started.elapsed().as_secs(),
    }
}

fn wanted(ev: &Event, agent: Option<&str>, kind: Option<&str>) -> bool {
    agent.is_none_or(|a| ev.agent == a) && kind.is_none_or(|k| ev.kind_name() == k)
}

async fn events(
    shared: &Shared,
    write: &mut OwnedWriteHalf,
    read: tokio::net::unix::OwnedReadHalf,
    follow: bool,
    agent: Option<String>,
    kind: Option<String>,
) -> anyhow::Result<()> {
    // Subscribe first, so nothing falls between the backlog and the stream.
    let mut rx = shared.events.subscribe();
    let backlog: Vec<Arc<Event>> = lock(&shared.recent).iter().cloned().collect();
    for ev in backlog {
        if wanted(&ev, agent.as_deref(), kind.as_deref()) {
            send(write, &Reply::Event(Box::new((*ev).clone()))).await?;
        }
    }
    if !follow {
        return Ok(());
    }
    let mut gone = BufReader::new(read).lines();
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Ok(ev) => {
                    if wanted(&ev, agent.as_deref(), kind.as_deref()) {
                        send(write, &Reply::Event(Box::new((*ev).clone()))).await?;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // The subscriber fell behind: say so, never skip silently.
                    let ev = Event::new("", 0, "", Kind::Lost, Verdict::None, Layer::Agentd)
                        .with("count", n)
                        .with("reason", "this subscriber fell behind the event stream");
                    send(write, &Reply::Event(Box::new(ev))).await?;
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

// ---- run ----------------------------------------------------------------------------------

/// The client may name a profile file only if it can read it itself: the daemon reads it
/// as root, and its errors quote it.
fn check_profile_access(spec: &str, who: &Actor) -> Result<(), String> {
    if !profile::is_path(spec) || who.uid == 0 {
        return Ok(());
    }
    let meta = std::fs::metadata(spec).map_err(|e| format!("profile {spec}: {e}"))?;
    let mode = meta.permissions().mode();
    use std::os::unix::fs::MetadataExt as _;
    let readable = (meta.uid() == who.uid && mode & 0o400 != 0)
        || (meta.gid() == who.gid && mode & 0o040 != 0)
        || mode & 0o004 != 0;
    if readable {
        Ok(())
    } else {
        Err(format!(
            "profile {spec}: uid {} cannot read it (the daemon only uses profiles their requester can read)",
            who.uid
        ))
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "one linear conversation with a client and a supervisor"
)]
async fn run(
    shared: Arc<Shared>,
    who: Actor,
    req: RunRequest,
    fds: Vec<OwnedFd>,
    read: tokio::net::unix::OwnedReadHalf,
    rest: Vec<u8>,
    mut write: OwnedWriteHalf,
) -> anyhow::Result<()> {
    if fds.len() != 3 {
        send(
            &mut write,
            &Reply::Error(format!(
                "run needs the client's stdin, stdout and stderr with the request ({} descriptors came)",
                fds.len()
            )),
        )
        .await?;
        return Ok(());
    }
    if req.command.is_empty() || !req.workspace.is_absolute() {
        send(
            &mut write,
            &Reply::Error("run needs a command and an absolute workspace".into()),
        )
        .await?;
        return Ok(());
    }
    if profile::is_path(&req.profile) && !Path::new(&req.profile).is_absolute() {
        // The daemon and the supervisor (in the workspace) would read different files.
        send(
            &mut write,
            &Reply::Error(format!(
                "profile {}: a relative path; give the daemon an absolute one",
                req.profile
            )),
        )
        .await?;
        return Ok(());
    }
    if let Err(e) = check_profile_access(&req.profile, &who) {
        send(&mut write, &Reply::Error(e)).await?;
        return Ok(());
    }
    let profile = match profile::load(&req.profile) {
        Ok((p, _origin)) => p,
        Err(e) => {
            send(&mut write, &Reply::Error(format!("profile: {e}"))).await?;
            return Ok(());
        }
    };
    if let Err(e) = check_identity(&profile, &who) {
        send(&mut write, &Reply::Error(e)).await?;
        return Ok(());
    }

    // The supervisor: this binary's `run`, with the client's stdio and environment, the
    // client as its invoking user, a socketpair to us and a pipe for its own events.
    let mut args = vec![
        "agentd".to_owned(),
        "run".to_owned(),
        "--profile".to_owned(),
        req.profile.clone(),
        "--workspace".to_owned(),
        req.workspace.to_string_lossy().into_owned(),
        "--events".to_owned(),
        format!("/proc/self/fd/{}", SUPERVISOR_FD + 1),
        // The client says the summary: the supervisor does not see the kernel's events.
        "--quiet".to_owned(),
        "--state-dir".to_owned(),
        shared.state_dir.to_string_lossy().into_owned(),
    ];
    if req.transaction {
        args.push("--transaction".to_owned());
    }
    args.push("--".to_owned());
    args.extend(req.command.iter().cloned());
    let env = spawn::environment(
        &req.env,
        &profile.environment.pass,
        (who.uid, who.gid),
        req.terminal,
    );
    let launch = crate::link::Launch {
        args,
        env,
        cwd: req.workspace.clone(),
    };
    let mut fds = fds.into_iter();
    let (Some(stdin), Some(stdout), Some(stderr)) = (fds.next(), fds.next(), fds.next()) else {
        bail!("descriptors vanished");
    };
    let stdio = [stdin, stdout, stderr];
    let waiting = lock(&shared.warm).take();
    let started = match waiting.map(|w| w.launch(&launch, &stdio)) {
        Some(Ok(s)) => Ok(s),
        Some(Err(e)) => {
            tracing::info!("the supervisor started ahead of need is gone ({e}): starting one");
            spawn::start(&shared.socket, &launch, stdio)
        }
        None => spawn::start(&shared.socket, &launch, stdio),
    };
    let spawn::Started {
        mut child,
        ours,
        events_r,
    } = match started {
        Ok(s) => s,
        Err(e) => {
            send(
                &mut write,
                &Reply::Error(format!("cannot start the supervisor: {e}")),
            )
            .await?;
            return Ok(());
        }
    };
    let supervisor_pid = child.id().unwrap_or(0);

    ours.set_nonblocking(true)?;
    let ours = UnixStream::from_std(ours)?;
    let (sup_read, sup_write) = ours.into_split();
    // Polled, not read in the runtime's blocking pool: a pending read there would hold up
    // the daemon's exit for as long as the supervisor lives (a handover).
    let events_file = tokio::net::unix::pipe::Receiver::from_owned_fd(events_r)?;
    let mut session = session::Session {
        shared: Arc::clone(&shared),
        who,
        req,
        agent_id: None,
        sup: session::Supervisor {
            lines: BufReader::new(sup_read).lines(),
            write: sup_write,
            events: BufReader::new(events_file).lines(),
            pid: supervisor_pid,
        },
        client: Some(session::Client::new(read, rest, write)),
        client_events: None,
        exit_code: None,
    };
    let handover = shared.handover.subscribe();
    session.serve(Some(&mut child), None, handover).await;
    Ok(())
}

/// The user an agent is launched for: the peer, or for root the user `sudo` names.
fn invoking_uid(who: &Actor, req: &RunRequest) -> u32 {
    if who.uid != 0 {
        return who.uid;
    }
    req.env
        .iter()
        .find(|(k, _)| k == "SUDO_UID")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Who may launch under which identity: root as anyone the profile says; anyone else as
/// themselves (`invoker`), a transient uid, or a named user that is themselves.
fn check_identity(profile: &Profile, who: &Actor) -> Result<(), String> {
    if who.uid == 0 {
        return Ok(());
    }
    let Some(name) = &profile.identity.user else {
        return Ok(());
    };
    let uid = nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw());
    if uid == Some(who.uid) {
        Ok(())
    } else {
        Err(format!(
            "permission denied: profile {} runs the agent as user {name}; only root may launch an agent as another user (use run_as = \"invoker\" or \"transient\")",
            profile.name
        ))
    }
}

/// The agent's policy compiled from `profile` in `ctx`.
/// Compiles the profile text an agent was launched with, as the supervisor did.
fn compile_launch(launch: &Launch) -> Result<CompiledPolicy, String> {
    let p = profile::parse(&launch.origin, &launch.text).map_err(|e| format!("profile: {e}"))?;
    let ctx = CompileContext {
        workspace: launch.workspace.clone(),
        home: launch.home.clone(),
    };
    Ok(profile::compile(&p, &ctx))
}

/// What an agent was launched with: what a successor daemon needs to watch it the same
/// way (handover.rs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Launch {
    /// The request, without its environment.
    request: RunRequest,
    /// The profile's text and where it came from.
    origin: String,
    text: String,
    uid: u32,
    gid: u32,
    workspace: PathBuf,
    home: PathBuf,
}

/// One line from a supervisor; the reply to send back, if any.
async fn supervisor_line(
    shared: &Arc<Shared>,
    who: &Actor,
    req: &RunRequest,
    line: &str,
    agent_id: &mut Option<String>,
    supervisor_pid: u32,
) -> Option<ToSupervisor> {
    let msg = match proto::decode::<SupervisorLine>(line.as_bytes()) {
        Ok(m) => m,
        Err(e) => return Some(ToSupervisor::Refused(e.to_string())),
    };
    match msg {
        SupervisorLine::Attach {
            agent,
            cgroup,
            uid,
            gid,
            workspace,
            home,
        } => {
            if agent_id.is_some() {
                return Some(ToSupervisor::Refused("already attached".into()));
            }
            // The identity the supervisor resolved, checked again: the profile it read may
            // not be the one checked before the launch (the file can change in between).
            if who.uid != 0 && uid != who.uid && !crate::sandbox::identity::is_transient(uid) {
                return Some(ToSupervisor::Refused(format!(
                    "permission denied: the agent would run as uid {uid}; uid {} may launch agents only as itself or a transient uid",
                    who.uid
                )));
            }
            // The watch matches what the sandbox enforces: the same `{workspace}` and
            // `{home}` (the invoking user's, not the socket peer's: root under sudo).
            let (origin, text) = match profile::source(&req.profile) {
                Ok(s) => s,
                Err(e) => return Some(ToSupervisor::Refused(format!("profile: {e}"))),
            };
            let launch = Launch {
                request: RunRequest {
                    env: Vec::new(),
                    ..req.clone()
                },
                origin,
                text,
                uid,
                gid,
                workspace,
                home,
            };
            let policy = match compile_launch(&launch) {
                Ok(p) => p,
                Err(e) => return Some(ToSupervisor::Refused(e)),
            };
            // The owner, from the request as the client sent it (the launch keeps no
            // environment, so no `SUDO_UID`).
            let owner_uid = invoking_uid(who, req);
            Some(
                match attach(
                    shared,
                    (who, owner_uid),
                    &policy,
                    &agent,
                    &cgroup,
                    launch,
                    supervisor_pid,
                ) {
                    Ok(()) => {
                        *agent_id = Some(agent);
                        ToSupervisor::Attached
                    }
                    Err(e) => ToSupervisor::Refused(e),
                },
            )
        }
        SupervisorLine::Started { pid } => {
            if let Some(id) = agent_id.as_ref()
                && let Some(a) = lock(&shared.agents).get_mut(id)
            {
                a.pid = pid;
                if a.state == AgentState::Starting {
                    a.state = AgentState::Running;
                }
                if a.early_exits.contains(&pid) {
                    a.drained.send_replace(true);
                }
            }
            // The next launch's supervisor, now that this one's launch is done: forking
            // holds the daemon's memory map, which the launch's attach needs.
            spawn::replenish(&shared.warm, &shared.socket);
            None
        }
        SupervisorLine::Listener { fd } => {
            let Some(id) = agent_id.as_ref() else {
                return Some(ToSupervisor::Listening(false));
            };
            let policy = lock(&shared.agents).get(id).map(|a| a.policy.clone());
            let taken = match policy {
                Some(p) => ask::take_listener(shared, id, supervisor_pid, fd, req.terminal, &p),
                None => Err(format!("no agent {id}")),
            };
            if let Err(e) = &taken {
                // The supervisor closes its copy: held calls then fail (ENOSYS), never
                // wait for an answer nobody can give.
                eprintln!("agentd daemon: {id}: {e}; its held calls are refused");
            }
            Some(ToSupervisor::Listening(taken.is_ok()))
        }
        SupervisorLine::KillSwitch { reason } => {
            if let Some(id) = agent_id.as_ref() {
                kill_agent(shared, id, &reason, *who);
            }
            None
        }
        SupervisorLine::Finished => {
            let Some(id) = agent_id.clone() else {
                return Some(ToSupervisor::Verdict(None));
            };
            let drained = lock(&shared.agents).get(&id).map(|a| a.drained.subscribe());
            if let Some(mut d) = drained
                && tokio::time::timeout(DRAIN_TIMEOUT, d.wait_for(|done| *done))
                    .await
                    .is_err()
            {
                tracing::warn!(agent = %id, "the first process's exit event did not arrive");
            }
            // Killed in the kernel with no trip recorded yet, under `on_event_loss =
            // "kill"`: the loss that killed it is reported within a second or two (the
            // LOST counters are read each second), and then trips its breaker with the
            // loss as the reason. Wait for it before recording a trip without a cause.
            let by_loss_pending = |agents: &HashMap<String, Agent>| {
                agents.get(&id).is_some_and(|a| {
                    a.killed_by.is_none()
                        && a.breaker.kills_on_loss()
                        && lock(&shared.watch).is_killed(a.cgroup_id).unwrap_or(false)
                })
            };
            let waiting = tokio::time::Instant::now();
            while by_loss_pending(&lock(&shared.agents)) && waiting.elapsed() < LOSS_REPORT_WAIT {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let mut lost_trip = None;
            let verdict = {
                let mut agents = lock(&shared.agents);
                agents.get_mut(&id).and_then(|a| {
                    // A kernel trip whose event was lost is still recorded.
                    if a.killed_by.is_none()
                        && lock(&shared.watch).is_killed(a.cgroup_id).unwrap_or(false)
                    {
                        a.killed_by = Some(LOST_TRIP.to_owned());
                        a.state = AgentState::Tripped;
                        a.breaker.tripped_in_kernel();
                        lost_trip = Some(lost_trip_event(&a.id, a.pid));
                    }
                    a.resolver = None;
                    if let Some(h) = a.bpf.take()
                        && let Err(e) = lock(&shared.watch).remove_agent(h)
                    {
                        eprintln!("agentd daemon: detaching {id}: {e}");
                    }
                    a.killed_by.clone()
                })
            };
            if let Some(e) = lost_trip {
                publish(shared, e);
            }
            // The supervisor has every event of its agent before its verdict.
            recorded(shared).await;
            forget_record(&shared.state_dir, &id);
            Some(ToSupervisor::Verdict(verdict))
        }
    }
}

/// The agent's resolver, steered to, when its profile names domains: one more socket set
/// of the daemon's, whose queries are this agent's.
fn resolver_for(
    shared: &Arc<Shared>,
    agent: &str,
    handle: &mut bpf::AgentHandle,
    policy: &CompiledPolicy,
    asked: &crate::dns::AskedNames,
    adopted: bool,
) -> Result<Option<crate::dns::Resolver>, String> {
    let ask_names = policy
        .ask
        .as_ref()
        .map(|a| a.names.clone())
        .unwrap_or_default();
    if policy.network.names.is_empty() && ask_names.is_empty() {
        return Ok(None);
    }
    let upstream = crate::dns::upstream(shared.dns_upstream);
    if let Err(why) = &upstream {
        eprintln!("agentd daemon: {agent}: {why}: the names its profile allows will not resolve");
    }
    let cannot_bind = |e: std::io::Error| format!("the agent's resolver cannot bind: {e}");
    let bound = if adopted {
        // The kernel steers the agent's DNS to the port its resolver had: bind it again,
        // or move the steering to a new one.
        let port = lock(&shared.watch)
            .dns_port(handle.cgroup_id())
            .map_err(|e| format!("kernel watch: {e}"))?;
        match crate::dns::Bound::on(port) {
            Ok(b) => b,
            Err(e) => {
                tracing::info!(agent, "port {port} of the previous resolver: {e}; moving");
                let b = crate::dns::Bound::new().map_err(cannot_bind)?;
                lock(&shared.watch)
                    .set_dns_port(handle.cgroup_id(), b.port())
                    .map_err(|e| format!("kernel watch: {e}"))?;
                b
            }
        }
    } else {
        let b = crate::dns::Bound::new().map_err(cannot_bind)?;
        lock(&shared.watch)
            .steer_dns(handle, b.port())
            .map_err(|e| format!("kernel watch: {e}"))?;
        b
    };
    let (admissions, clients) = {
        let w = lock(&shared.watch);
        (w.admissions(), w.dns_clients())
    };
    // Weak: the agent's entry holds the resolver, which must not keep the daemon alive.
    let weak = Arc::downgrade(shared);
    let served = bound.serve(crate::dns::Agent {
        id: agent.to_owned(),
        cgroup_id: handle.cgroup_id(),
        rules: policy.network.names.clone(),
        ask: ask_names,
        asked: asked.clone(),
        upstream,
        admissions,
        clients,
        monitor: policy.mode == crate::profile::Mode::Monitor,
        emit: Box::new(move |ev| {
            if let Some(shared) = weak.upgrade() {
                handle_event(&shared, ev);
            }
        }),
    });
    served
        .map(Some)
        .map_err(|e| format!("the agent's resolver cannot serve: {e}"))
}

/// Attaches the watch to the agent's cgroup and registers it (state file first: if the
/// daemon dies from here on, the next one reaps the agent), for `who` and its owner
/// ([`invoking_uid`]).
fn attach(
    shared: &Arc<Shared>,
    (who, owner_uid): (&Actor, u32),
    policy: &CompiledPolicy,
    agent: &str,
    cgroup: &Path,
    launch: Launch,
    supervisor_pid: u32,
) -> Result<(), String> {
    let req = &launch.request.clone();
    let creds = crate::host::Creds {
        uid: launch.uid,
        gid: launch.gid,
        groups: vec![launch.gid],
    };
    if agent.is_empty() || agent.contains('/') || lock(&shared.agents).contains_key(agent) {
        return Err(format!("bad or duplicate agent id {agent:?}"));
    }
    let mut handle = lock(&shared.watch)
        .add_agent(agent, cgroup, policy, Some(creds))
        .map_err(|e| format!("kernel watch: {e}"))?;
    let asked = crate::dns::AskedNames::default();
    let resolver = match resolver_for(shared, agent, &mut handle, policy, &asked, false) {
        Ok(r) => r,
        Err(e) => {
            let _ = lock(&shared.watch).remove_agent(handle);
            return Err(e);
        }
    };
    let record = AgentRecord {
        id: agent.to_owned(),
        cgroup: cgroup.to_path_buf(),
        cgroup_id: handle.cgroup_id(),
    };
    if let Err(e) = serde_json::to_vec(&record)
        .map_err(std::io::Error::other)
        .and_then(|b| std::fs::write(record_path(&shared.state_dir, agent), b))
    {
        let _ = lock(&shared.watch).remove_agent(handle);
        return Err(format!("state directory: {e}"));
    }
    let entry = Agent::new(
        agent,
        policy,
        (*who, owner_uid),
        (handle, cgroup),
        (resolver, asked),
        launch,
        supervisor_pid,
    );
    lock(&shared.agents).insert(agent.to_owned(), entry);
    lock(&shared.counters).agents_total += 1;
    let mut detail = serde_json::Map::new();
    detail.insert("profile".into(), req.profile.clone().into());
    detail.insert(
        "workspace".into(),
        req.workspace.display().to_string().into(),
    );
    detail.insert("command".into(), req.command.clone().into());
    let control = Control {
        action: Action::Launch,
        agent: Some(agent.to_owned()),
        by: *who,
        detail,
    };
    audit_control(shared, &control);
    Ok(())
}

/// The agent ended: kept for `ps` as exited (or tripped), forgotten by the registry.
fn retire(shared: &Shared, id: &str) {
    // From the registry to the ended rows under the registry's lock: a record of the agent
    // that comes late is counted in one or the other (`count_for_agent`).
    let (mut a, tripped) = {
        let mut agents = lock(&shared.agents);
        let Some(mut a) = agents.remove(id) else {
            return;
        };
        let tripped = a.state == AgentState::Tripped;
        if !tripped {
            a.state = AgentState::Exited;
        }
        let mut exited = lock(&shared.exited);
        if exited.len() == EXITED_KEPT {
            exited.pop_front();
        }
        exited.push_back(row(&a));
        (a, tripped)
    };
    {
        let mut c = lock(&shared.counters);
        if tripped {
            c.agents_tripped += 1;
        } else {
            c.agents_exited += 1;
        }
    }
    if let Some(h) = a.bpf.take()
        && let Err(e) = lock(&shared.watch).remove_agent(h)
    {
        eprintln!("agentd daemon: detaching {id}: {e}");
    }
    forget_record(&shared.state_dir, id);
    // Its grants end with it (the kernel forgot its entries with its cgroup), and what it
    // still had held goes.
    shared.asking.board.forget_agent(id);
    shared.asking.board.cancel_agent(id);
}
