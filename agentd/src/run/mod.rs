//! `agentd run`: launch one agent under a profile and supervise it in-process (the
//! embedded supervisor, used when no daemon runs).
//!
//! 1. plan ([`plan::Plan::build`]): load and compile the profile, choose the agent id and
//!    identity, resolve the command, build the environment, plan the cgroups, check the
//!    Landlock rule paths, compile the seccomp filter. Nothing is created. `--dry-run`
//!    prints this and stops.
//! 2. launch ([`launch`]): create the cgroups, call the hooks (the eBPF watch attaches
//!    here), build the Landlock ruleset and the exec arguments, fork the agent through
//!    `sandbox::spawn`. Single-threaded until here.
//! 3. supervise ([`supervise`]): a current-thread tokio runtime forwards signals, enforces
//!    the wall-time limit, merges events into `--events`, and on exit kills what is left
//!    of the agent and removes its cgroups.
//!
//! Exit status: the agent's; 128+N when it died of signal N; 125 when agentd could not
//! launch it (one line on stderr: `agentd: cannot launch: STEP: ERROR`); 126 when the
//! program was found but cannot be executed; 127 when it was not found.

pub mod asking;
pub mod bursts;
pub mod control;
pub mod events;
pub mod hooks;
pub mod kernel;
pub mod plan;
pub mod summary;
pub mod supervise;
pub mod supervised;
pub mod terminal;
pub mod txn;
pub mod warm;

use std::{os::fd::AsFd as _, path::PathBuf, process::ExitCode, sync::Arc};

use self::{
    events::Sink,
    hooks::{AgentHooks, AgentInfo, HookError, NoHooks},
    plan::{Plan, Request},
    supervise::Supervision,
};
use crate::{
    event::{Event, Kind, Layer, Verdict},
    report,
    sandbox::{
        self, Prepared, SpawnError,
        cgroup::{AgentCgroup, CgroupError},
        command::{CommandError, Exec},
        identity::IdentityError,
        landlock::{self, LandlockError},
        mountns::{self, ViewError},
        seccomp::SeccompError,
    },
};

/// Exit status when agentd could not launch the agent.
pub const EXIT_CANNOT_LAUNCH: u8 = 125;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("profile: {0}")]
    Profile(String),
    #[error("workspace: {0}")]
    Workspace(String),
    #[error("--events {path}: {source}")]
    Events {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--events {path}: the agent may write there (its profile grants filesystem.write on {grant}), so it could edit its own record; put the events file where the profile grants no write (e.g. /var/log/agentd/, or a directory of yours outside the workspace), or use `--events -` for stderr"
    )]
    EventsInReach { path: String, grant: String },
    #[error("stdio: {0}")]
    Stdio(#[source] std::io::Error),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Landlock(#[from] LandlockError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(
        "privileges: agentd run must start as root (e.g. `sudo agentd run ...`): it creates the agent's cgroups and switches to the agent's own identity"
    )]
    NotRoot,
    #[error("hook {0}")]
    Hook(#[from] HookError),
    #[error("signals: cannot block the forwarded signals: {0}")]
    Signals(#[source] nix::Error),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("runtime: cannot start the supervisor's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("mount namespace: {0}")]
    View(#[source] ViewError),
    #[error("transaction: {0}")]
    Transaction(#[source] crate::transaction::TxError),
}

impl RunError {
    /// The launch step, for `launch_failed` events.
    pub fn step(&self) -> &'static str {
        match self {
            RunError::Profile(_) => "profile",
            RunError::Workspace(_) => "workspace",
            RunError::Events { .. } | RunError::EventsInReach { .. } => "events",
            RunError::Stdio(_) => "stdio",
            RunError::Identity(_) => "identity",
            RunError::Command(_) => "command",
            RunError::Cgroup(_) => "cgroup",
            RunError::Landlock(_) => "landlock",
            RunError::Seccomp(_) => "seccomp",
            RunError::NotRoot => "privileges",
            RunError::Hook(_) => "hook",
            RunError::Signals(_) => "signals",
            RunError::Spawn(e) => e.step(),
            RunError::Runtime(_) => "runtime",
            RunError::View(_) => "mount namespace",
            RunError::Transaction(_) => "transaction",
        }
    }

    /// 127 not found, 126 not executable, 125 everything else (as a shell, env(1) and
    /// container runtimes do).
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Command(e) => e.exit_code(),
            RunError::Spawn(SpawnError::Child(f)) if f.step == sandbox::channel::Step::Exec => {
                match f.errno() {
                    Some(libc::ENOENT) => 127,
                    Some(libc::EACCES | libc::ENOEXEC | libc::EISDIR) => 126,
                    _ => EXIT_CANNOT_LAUNCH,
                }
            }
            RunError::Profile(_)
            | RunError::Workspace(_)
            | RunError::Events { .. }
            | RunError::EventsInReach { .. }
            | RunError::Stdio(_)
            | RunError::Identity(_)
            | RunError::Cgroup(_)
            | RunError::Landlock(_)
            | RunError::Seccomp(_)
            | RunError::NotRoot
            | RunError::Hook(_)
            | RunError::Signals(_)
            | RunError::Spawn(_)
            | RunError::Runtime(_)
            | RunError::View(_)
            | RunError::Transaction(_) => EXIT_CANNOT_LAUNCH,
        }
    }
}

/// `agentd run`'s arguments.
#[derive(Debug, Clone)]
pub struct RunArgs {
    pub request: Request,
    pub events: Option<String>,
    pub dry_run: bool,
    pub json: bool,
    /// No summary of refusals at exit.
    pub quiet: bool,
    /// Where the agent's resolver asks for the names its profile allows (default: the
    /// first nameserver of /etc/resolv.conf).
    pub dns_upstream: Option<std::net::SocketAddr>,
    /// Where workspace transactions are kept.
    pub state_dir: PathBuf,
}

/// `agentd run`.
pub fn run(args: RunArgs) -> ExitCode {
    // The eBPF watch and the circuit breaker (`--dry-run` loads nothing).
    if args.dry_run {
        return run_with_hooks(args, &mut NoHooks);
    }
    if supervised::is_supervised() {
        // Started by a daemon, which owns the kernel watch and the breaker.
        return match supervised::DaemonHooks::from_env() {
            Ok(mut hooks) => run_with_hooks(args, &mut hooks),
            Err(e) => failed(&mut None, &RunError::Hook(e), None, ""),
        };
    }
    let upstream = args.dns_upstream;
    run_with_hooks(args, &mut kernel::KernelHooks::new(upstream))
}

/// `agentd run` with the given hooks.
pub fn run_with_hooks(args: RunArgs, hooks: &mut dyn AgentHooks) -> ExitCode {
    if let Err(e) = sandbox::sanitize_stdio() {
        return failed(&mut None, &RunError::Stdio(e), None, "");
    }
    let plan = Plan::build(&args.request);
    if let (Ok(plan), Some(path)) = (&plan, args.events.as_deref())
        && let Some(e) = events_in_reach(&plan.policy, path)
    {
        // Refused before the file is opened: nothing is created where the agent could
        // edit it.
        return failed(&mut None, &e, Some(&plan.agent_id), &plan.comm());
    }
    let mut sink = match args.events.as_deref().map(Sink::open).transpose() {
        Ok(s) => s,
        Err(source) => {
            let e = RunError::Events {
                path: args.events.clone().unwrap_or_default(),
                source,
            };
            return failed(&mut None, &e, None, "");
        }
    };
    let plan = match plan {
        Ok(p) => p,
        Err((e, agent)) => {
            let comm = args
                .request
                .command
                .first()
                .and_then(|c| std::path::Path::new(c).file_name())
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default();
            return failed(&mut sink, &e, agent.as_deref(), &comm);
        }
    };
    if args.dry_run {
        return dry_run(&plan, args.json);
    }
    for line in missing_grants(
        &plan.landlock,
        &plan.policy.landlock.optional,
        &plan.identity.home,
    ) {
        eprintln!("agentd: warning: {line}");
    }
    for path in &plan.view.unprotected {
        eprintln!(
            "agentd: warning: filesystem.protect names {}, which does not exist: there is nothing to make read-only; where BPF LSM runs, creating it is refused, elsewhere the agent may create it (`agentd doctor`, \"bpf lsm\")",
            path.display()
        );
    }
    let summary = summary::Said {
        quiet: args.quiet,
        events: args.events.clone().filter(|e| e != "-"),
    };
    match launch(&plan, hooks, sink, summary, &args.state_dir) {
        Ok(code) => ExitCode::from(code),
        Err((e, mut sink)) => failed(&mut sink, &e, Some(&plan.agent_id), &plan.comm()),
    }
}

/// One line per grant of the profile on a path that does not exist at launch: Landlock can
/// only grant what exists, so it grants nothing there (a first-run agent's config
/// directory is often such a path). Grants under a home the user does not have are one
/// line. Grants the profile marks optional (`"path?"`) are not.
fn missing_grants(
    landlock: &sandbox::landlock::Plan,
    optional: &[PathBuf],
    home: &std::path::Path,
) -> Vec<String> {
    let no_home = !home.exists();
    let mut under_home = 0;
    let mut lines = Vec::new();
    for rule in landlock
        .rules
        .iter()
        .filter(|r| !r.exists && !optional.contains(&r.path))
    {
        if no_home && rule.path.starts_with(home) {
            under_home += 1;
            continue;
        }
        let keys: Vec<String> = rule
            .access
            .split_whitespace()
            .map(|a| format!("filesystem.{a}"))
            .collect();
        lines.push(format!(
            "{} grants {}, which does not exist: the agent gets no access there (Landlock grants only paths that exist at launch; create it first)",
            keys.join(" and "),
            rule.path.display()
        ));
    }
    if under_home > 0 {
        lines.push(format!(
            "the agent's user has no home directory ({} does not exist): {under_home} {} under {{home}} {} nothing",
            home.display(),
            if under_home == 1 { "grant" } else { "grants" },
            if under_home == 1 { "grants" } else { "grant" },
        ));
    }
    lines
}

/// The refusal of an `--events` file the agent could write (beneath a `filesystem.write`
/// path of its policy): the agent could edit its own record. `-` (stderr) is fine.
fn events_in_reach(policy: &crate::profile::CompiledPolicy, path: &str) -> Option<RunError> {
    if path == "-" {
        return None;
    }
    let given = std::path::Path::new(path);
    let absolute = std::path::absolute(given).ok()?;
    // The file may not exist yet: resolve its directory.
    let real = match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => dir
            .canonicalize()
            .map_or(absolute.clone(), |d| d.join(name)),
        _ => absolute.clone(),
    };
    let rule =
        policy.landlock.rules.iter().find(|r| {
            r.access.write && (real.starts_with(&r.path) || absolute.starts_with(&r.path))
        })?;
    Some(RunError::EventsInReach {
        path: path.to_owned(),
        grant: rule.path.display().to_string(),
    })
}

/// `--dry-run`: prints the plan and what the kernel watch will enforce (probing BPF LSM
/// as `agentd doctor` does). Exits 125, as the launch would, when the kernel lacks what
/// the profile requires.
fn dry_run(plan: &Plan, json: bool) -> ExitCode {
    use crate::doctor::{Status, Unavailable};
    let root = nix::unistd::geteuid().is_root();
    let lsm = match crate::doctor::bpf_lsm(root) {
        Status::Usable => plan::BpfLsm::Runs,
        Status::Unusable(why @ Unavailable::NeedsRoot { .. }) => {
            plan::BpfLsm::Unknown(why.to_string())
        }
        Status::Unusable(why) => plan::BpfLsm::Absent(why.to_string()),
    };
    let kernel = plan::KernelPlan::new(&plan.policy, lsm);
    if json {
        let shown = serde_json::to_value(plan).map(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "kernel".into(),
                    serde_json::to_value(&kernel).unwrap_or_default(),
                );
            }
            v
        });
        if let Err(e) = shown
            .map_err(anyhow::Error::from)
            .and_then(|v| report::print_json(&v))
        {
            eprintln!("agentd: {e:#}");
            return ExitCode::from(1);
        }
    } else {
        print!("{}{}", plan.render(), kernel.render());
    }
    ExitCode::SUCCESS
}

/// Prints `agentd: cannot launch: ...`, writes a `launch_failed` event when the agent id is
/// known, and returns the exit code.
fn failed(sink: &mut Option<Sink>, e: &RunError, agent: Option<&str>, comm: &str) -> ExitCode {
    eprintln!("agentd: cannot launch: {e}");
    if let (Some(s), Some(agent)) = (sink.as_mut(), agent) {
        let ev = Event::new(
            agent,
            0,
            comm,
            Kind::LaunchFailed,
            Verdict::None,
            Layer::Agentd,
        )
        .with("step", e.step())
        .with("reason", e.to_string())
        .with("exit_code", e.exit_code());
        if let Err(err) = s.write(&ev) {
            eprintln!("agentd: cannot write events: {err}");
        }
    }
    ExitCode::from(e.exit_code())
}

type LaunchResult = Result<u8, (RunError, Option<Sink>)>;

/// Creates the agent and supervises it to the end. Single-threaded until the fork.
fn launch(
    plan: &Plan,
    hooks: &mut dyn AgentHooks,
    sink: Option<Sink>,
    summary: summary::Said,
    state_dir: &std::path::Path,
) -> LaunchResult {
    let fail = |e: RunError, sink: Option<Sink>| Err((e, sink));
    if !nix::unistd::geteuid().is_root() {
        return fail(RunError::NotRoot, sink);
    }

    // The agent's cgroups: created now, removed when `cgroup` is dropped on any error
    // below, and by the supervisor at the end.
    let cgroup = match AgentCgroup::create(plan.cgroup.clone()) {
        Ok(c) => c,
        Err(e) => return fail(e.into(), sink),
    };

    // ---- HOOK: before the agent's first process exists (the eBPF watch attaches its
    // ---- cgroup programs and writes the agent's policy maps here).
    if let Err(e) = hooks.before_spawn(AgentInfo {
        agent_id: &plan.agent_id,
        cgroup_dir: cgroup.dir(),
        policy: &plan.policy,
        uid: plan.identity.uid,
        gid: plan.identity.gid,
    }) {
        return fail(e.into(), sink);
    }

    // Everything the child needs, allocated and opened before fork. The agent's mount
    // namespace first, and the Landlock ruleset inside it: its rules name the inodes the
    // agent will see (an overlay's, in a transaction).
    let transaction = match txn::begin(plan, state_dir) {
        Ok(t) => t,
        Err(e) => return fail(RunError::Transaction(e), sink),
    };
    // Until the agent runs, a failure removes the transaction's record.
    let abandon = |t: Option<crate::transaction::Transaction>| {
        if let Some(t) = t
            && let Err(e) = t.discard()
        {
            eprintln!("agentd: removing the transaction: {e}");
        }
    };
    let threads = match sandbox::thread_count_now() {
        Ok(n) => n,
        Err(e) => {
            abandon(transaction);
            return fail(e.into(), sink);
        }
    };
    let began = std::time::Instant::now();
    let mut ruleset_took = std::time::Duration::ZERO;
    let (view, ruleset) = match mountns::build(&plan.view, threads, || {
        let t = std::time::Instant::now();
        let r = landlock::prepare(&plan.policy.landlock);
        ruleset_took = t.elapsed();
        r
    }) {
        Ok((view, Ok(r))) => (view, r),
        Ok((_, Err(e))) => {
            abandon(transaction);
            return fail(e.into(), sink);
        }
        Err(e) => {
            abandon(transaction);
            return fail(RunError::View(e), sink);
        }
    };
    let view_took = began.elapsed().saturating_sub(ruleset_took);
    let transaction = match (transaction, view.upper) {
        (Some(t), Some(upper)) => txn::Guard::new(txn::Open::new(t, upper)),
        (None, None) => txn::Guard::none(),
        (t, _) => {
            abandon(t);
            return fail(RunError::View(ViewError::NoUpper), sink);
        }
    };
    let exec = match Exec::new(&plan.command.path, &plan.argv, &plan.env) {
        Ok(x) => x,
        Err(e) => return fail(e.into(), sink),
    };
    let mut prepared = match Prepared::new(
        &cgroup,
        plan.identity.uid,
        plan.identity.gid,
        &plan.workspace,
        ruleset,
        plan.filter.clone(),
        exec,
    ) {
        Ok(p) => p.with_mount_ns(view.ns),
        Err(e) => return fail(e.into(), sink),
    };
    // The agent's terminal: made here when stdin is the user's, and relayed below; through
    // a daemon, its client made it and relays it, and it is this supervisor's stdin.
    let mut relay = None;
    if supervised::is_supervised() {
        if supervised::terminal_is_stdin() {
            match std::io::stdin().as_fd().try_clone_to_owned() {
                Ok(slave) => prepared = prepared.with_terminal(slave),
                Err(e) => return fail(RunError::Stdio(e), sink),
            }
        }
    } else {
        match terminal::open() {
            Ok(Some((t, slave))) => {
                prepared = prepared.with_terminal(slave);
                relay = Some(t);
            }
            Ok(None) => {}
            Err(e) => eprintln!(
                "agentd: warning: no terminal for the agent (stdin is one, but a pseudo-terminal cannot be made: {e}); it shares agentd's stdio"
            ),
        }
    }

    if let Err(e) = supervise::block_forwarded() {
        return fail(RunError::Signals(e), sink);
    }
    let spawned = match sandbox::spawn(prepared) {
        Ok(s) => s,
        Err(e) => return fail(e.into(), sink),
    };

    // The agent runs. From here on the supervisor may be multi-threaded.
    let cgroup = Arc::new(cgroup);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            // Fail closed: an agent agentd cannot supervise does not keep running.
            let _ = cgroup.destroy();
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(spawned.pid), None);
            return fail(RunError::Runtime(e), sink);
        }
    };
    // While the agent's terminal is relayed, agentd's own messages wait until the user's is
    // restored; Ctrl-Z freezes the whole agent while agentd is stopped.
    // (Held is dropped after the session: a panic's message prints once the user's
    // terminal is back.)
    let (held, session) = match relay {
        Some(t) => {
            let frozen = Arc::clone(&cgroup);
            let session = t.start(Box::new(move |stop| {
                if let Err(e) = frozen.freeze(stop) {
                    eprintln!(
                        "agentd: cannot {} the agent: {e}",
                        if stop { "freeze" } else { "thaw" }
                    );
                }
            }));
            match session {
                Ok(s) => (terminal::Held::stderr().ok(), Some(s)),
                Err(e) => {
                    // The agent has its terminal, nobody relays it: stop rather than run
                    // it half-attached.
                    eprintln!("agentd: cannot relay the agent's terminal ({e}); killing it");
                    let _ = cgroup.kill();
                    (None, None)
                }
            }
        }
        None => (None, None),
    };
    let code = runtime.block_on(supervise::supervise(Supervision {
        plan,
        spawned,
        cgroup,
        hooks,
        sink,
        terminal: session.as_ref(),
        summary,
        transaction: transaction.release(),
        view: view_took,
    }));
    drop(runtime);
    if let Some(s) = session {
        s.finish();
    }
    if let Some(h) = held {
        h.print(HELD_WAIT);
    }
    Ok(code)
}

/// How long agentd waits for its held messages once the agent's terminal is restored.
const HELD_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The default profile when `--profile` is not given: the most restrictive built-in one.
pub const DEFAULT_PROFILE: &str = "analyze-only";

/// Arguments as `cli` collects them.
pub fn args(
    profile: String,
    workspace: Option<PathBuf>,
    events: Option<String>,
    dry_run: bool,
    json: bool,
    command: Vec<std::ffi::OsString>,
) -> RunArgs {
    RunArgs {
        request: Request {
            profile,
            workspace,
            command,
            transaction: false,
        },
        events,
        dry_run,
        json,
        quiet: false,
        dns_upstream: None,
        state_dir: PathBuf::from(crate::host::DEFAULT_STATE_DIR),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_on_missing_paths_are_named_with_their_keys() {
        let rule = |path: &str, access: &str, exists: bool| sandbox::landlock::RulePlan {
            path: path.into(),
            access: access.into(),
            exists,
            rights: String::new(),
        };
        let plan = sandbox::landlock::Plan {
            kernel_abi: 7,
            target_abi: 7,
            missing: Vec::new(),
            rules: vec![
                rule("/usr", "read exec", true),
                rule("/home/u/.claude", "read write", false),
                rule("/nonexistent/.cargo", "read", false),
                rule("/nonexistent/.cache", "write", false),
            ],
            scope_signals: true,
            scope_abstract_unix: true,
        };
        let lines = missing_grants(&plan, &[], std::path::Path::new("/nonexistent"));
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with(
                "filesystem.read and filesystem.write grants /home/u/.claude, which does not exist"
            ),
            "{lines:?}"
        );
        assert!(lines[1].contains("no home directory (/nonexistent does not exist): 2 grants"));
        assert!(missing_grants(&plan, &[], std::path::Path::new("/")).len() == 3);
        // Optional grants are not warned about.
        let optional = [PathBuf::from("/home/u/.claude")];
        assert!(missing_grants(&plan, &optional, std::path::Path::new("/")).len() == 2);
    }
    use crate::sandbox::channel::{ChildFailure, Step, Why};

    #[test]
    fn launch_exit_codes() {
        let child = |step, errno| {
            RunError::Spawn(SpawnError::Child(ChildFailure {
                step,
                why: Why::Errno(errno),
            }))
            .exit_code()
        };
        assert_eq!(child(Step::Exec, libc::ENOENT), 127);
        assert_eq!(child(Step::Exec, libc::EACCES), 126);
        assert_eq!(child(Step::Landlock, libc::EINVAL), 125);
        assert_eq!(RunError::NotRoot.exit_code(), 125);
        assert_eq!(
            RunError::Command(CommandError::NotFound("x".into(), String::new())).exit_code(),
            127
        );
        assert_eq!(RunError::Profile("p".into()).exit_code(), 125);
    }

    #[test]
    fn messages_name_their_step_once() {
        let e = RunError::Spawn(SpawnError::Child(ChildFailure {
            step: Step::Setresuid,
            why: Why::Errno(libc::EPERM),
        }));
        assert_eq!(e.step(), "setresuid");
        assert_eq!(e.to_string(), "setresuid: operation not permitted (EPERM)");
        let e = RunError::Identity(IdentityError::InvokerIsRoot);
        assert!(e.to_string().starts_with("identity: "));
    }
}
