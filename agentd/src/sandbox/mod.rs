//! The launch: everything between "agentd has a policy" and "the agent's program runs".
//!
//! One mechanism per file ([`cgroup`], [`identity`], [`landlock`], [`seccomp`] with
//! [`syscalls`], [`env`], [`command`]), and one linear sequence, [`launch_sequence`], that
//! applies them in the child between `fork` and `execve`, failing closed at every step.
//!
//! # Fork safety
//! After `fork` in a multi-threaded process only async-signal-safe calls are allowed. The
//! supervisor therefore stays **single-threaded until the child exists**: `agentd run`
//! creates its tokio runtime only after [`spawn`] returns, and [`spawn`] refuses to fork
//! when `/proc/self/status` shows more than one thread. Everything that allocates or
//! resolves names is done before fork as well: the cgroup directories are created and
//! their `cgroup.procs` opened, the Landlock ruleset is built (its fd is inherited), the
//! seccomp program is compiled, the command resolved and the `execve` argument arrays
//! built. The child makes system calls on prepared data; the only allocations left (the
//! `caps` crate's sets, `getgroups`) are safe because no other thread exists. The child
//! never runs a tokio runtime, never returns into the caller, and ends in `execve` or
//! `_exit(125)`.
//!
//! # Reports
//! The child tells the supervisor how far Landlock is enforced, hands over the seccomp
//! listener when there is one, and on failure which step failed and why, over a
//! close-on-exec socketpair ([`channel`]); end of file means `execve` succeeded.

pub mod cgroup;
pub mod channel;
pub mod command;
pub mod env;
pub mod identity;
pub mod landlock;
pub mod mountns;
pub mod seccomp;

use std::{
    convert::Infallible,
    ffi::CString,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
    time::Duration,
};

use ::landlock::RulesetCreated;

use self::{
    cgroup::AgentCgroup,
    channel::{ChildFailure, Step, Why},
    command::Exec,
    identity::{SwitchStep, VerifyFailure},
    landlock::{Enforcement, RestrictFailure},
};

/// How long the supervisor waits for the child to reach `execve`.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(
        "agentd has {0} threads: it forks the agent only while single-threaded (a bug in agentd)"
    )]
    Threads(usize),
    #[error("cannot read /proc/self/status: {0}")]
    Status(#[source] std::io::Error),
    #[error("{call}: {source}")]
    Syscall {
        call: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("workspace path contains a NUL byte")]
    Nul,
    #[error("cgroup: {0}")]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Receive(#[from] channel::ReceiveError),
    #[error(transparent)]
    Child(ChildFailure),
    #[error("the agent's process ended before exec without saying why ({0})")]
    Vanished(String),
}

impl SpawnError {
    /// The launch step this error belongs to, for `launch_failed` events.
    pub fn step(&self) -> &'static str {
        match self {
            SpawnError::Child(f) => f.step.name(),
            SpawnError::Cgroup(_) => "cgroup",
            SpawnError::Threads(_)
            | SpawnError::Status(_)
            | SpawnError::Syscall { .. }
            | SpawnError::Nul
            | SpawnError::Receive(_)
            | SpawnError::Vanished(_) => "fork",
        }
    }
}

/// Everything the child needs, built before fork.
#[derive(Debug)]
pub struct Prepared {
    /// The agent's v2 cgroup directory: the child is created in it (`CLONE_INTO_CGROUP`).
    cgroup_dir: OwnedFd,
    /// `cgroup.procs` of the agent's v1 directories (limits on a hybrid host), open for
    /// writing: the child joins them first thing.
    v1_procs: Vec<OwnedFd>,
    uid: u32,
    gid: u32,
    workspace: CString,
    /// Taken by the child: `restrict_self` consumes it.
    landlock: Option<RulesetCreated>,
    seccomp: seccomp::Filter,
    exec: Exec,
    /// The agent's terminal (a pseudo-terminal's slave side): its stdin, stdout, stderr
    /// and controlling terminal. `None`: the agent inherits agentd's stdio and has no
    /// controlling terminal.
    terminal: Option<OwnedFd>,
    /// The agent's mount namespace ([`mountns`]), entered first.
    mount_ns: Option<OwnedFd>,
}

impl Prepared {
    /// Launches the agent in the mount namespace `ns` (see [`mountns::build`]).
    pub fn with_mount_ns(mut self, ns: OwnedFd) -> Prepared {
        self.mount_ns = Some(ns);
        self
    }

    /// Gives the agent `slave` as its terminal (see [`Prepared::terminal`]).
    pub fn with_terminal(mut self, slave: OwnedFd) -> Prepared {
        self.terminal = Some(slave);
        self
    }

    pub fn new(
        cgroup: &AgentCgroup,
        uid: u32,
        gid: u32,
        workspace: &Path,
        landlock: RulesetCreated,
        seccomp: seccomp::Filter,
        exec: Exec,
    ) -> Result<Prepared, SpawnError> {
        Ok(Prepared {
            cgroup_dir: cgroup.v2_dir_fd()?,
            v1_procs: cgroup.v1_procs_fds()?,
            uid,
            gid,
            workspace: CString::new(workspace.as_os_str().as_bytes())
                .map_err(|_| SpawnError::Nul)?,
            landlock: Some(landlock),
            seccomp,
            exec,
            terminal: None,
            mount_ns: None,
        })
    }
}

/// The agent's first process, running its program.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    /// Refers to the agent's first process for as long as the supervisor has not reaped
    /// it: signals sent through it never reach a recycled pid.
    pub pidfd: OwnedFd,
    pub landlock: Enforcement,
    /// The seccomp user-notification listener, when the filter routes calls to the
    /// supervisor.
    pub seccomp_listener: Option<OwnedFd>,
}

/// Checks that this process has one thread. A thread that was joined (the watch's load
/// verifies programs on scoped threads) may still be counted for a moment: the kernel
/// wakes its joiner before it unhashes the thread, so the count is read again for up to
/// [`THREADS_SETTLE`] before a second thread is an error.
fn single_threaded() -> Result<(), SpawnError> {
    let deadline = std::time::Instant::now() + THREADS_SETTLE;
    loop {
        let threads = thread_count_now()?;
        if threads == 1 {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(SpawnError::Threads(threads));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How long [`single_threaded`] waits for joined threads to be gone.
const THREADS_SETTLE: Duration = Duration::from_millis(100);

/// How many threads this process has now (`/proc/self/status`).
pub fn thread_count_now() -> Result<usize, SpawnError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(SpawnError::Status)?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(usize::MAX))
}

/// Forks the agent's first process, which runs [`launch_sequence`] and execs the command,
/// and waits until it has exec'd or failed. The caller keeps the cgroup (and removes it if
/// this fails).
pub fn spawn(mut prepared: Prepared) -> Result<Spawned, SpawnError> {
    single_threaded()?;
    let (reports, child_end) = channel::pair().map_err(|source| SpawnError::Syscall {
        call: "socketpair",
        source,
    })?;
    let supervisor = nix::unistd::getpid().as_raw();

    let Forked::Parent { pid, pidfd } = clone_into_cgroup(prepared.cgroup_dir.as_fd())? else {
        child_main(&mut prepared, child_end.as_fd(), supervisor);
    };

    // Supervisor. Close our copy of the child's end, or EOF would never come; drop the
    // ruleset and the cgroup fds, which only the child needs.
    drop(child_end);
    let prepared_holds_exec = prepared.seccomp.holds_exec();
    drop(prepared);

    // With `execve` held for a person, the launch's own exec of the agent's command (the
    // very next call the child makes after handing over the listener) is held too: it is
    // agentd's code, not the agent's, and is let through here; nothing else runs in the
    // child yet.
    let holds_exec = prepared_holds_exec;
    let first_exec = |listener: &OwnedFd| {
        if !holds_exec {
            return Ok(());
        }
        seccomp::let_launch_exec(listener, pid, LAUNCH_TIMEOUT)
            .map_err(|e| channel::ReceiveError::FirstExec(e.to_string()))
    };
    let got = match channel::receive(&reports, LAUNCH_TIMEOUT, first_exec) {
        Ok(r) => r,
        Err(e) => {
            kill_and_reap(pid);
            return Err(e.into());
        }
    };
    if let Some(failure) = got.failure {
        kill_and_reap(pid);
        return Err(SpawnError::Child(failure));
    }
    let Some(landlock) = got.landlock else {
        let status = kill_and_reap(pid);
        return Err(SpawnError::Vanished(status));
    };
    // The child began its session (step 4) before it reported: its autogroup is its own.
    lowest_session_priority(pid);
    Ok(Spawned {
        pid,
        pidfd,
        landlock,
        seccomp_listener: got.listener,
    })
}

/// `struct clone_args` of `clone3(2)`, up to `cgroup` (`CLONE_ARGS_SIZE_VER2`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (Linux 5.7; every kernel with Landlock has it).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Which side of [`clone_into_cgroup`] this is.
enum Forked {
    Child,
    Parent { pid: i32, pidfd: OwnedFd },
}

/// Forks (a new process, copied memory, SIGCHLD to the parent) straight into the cgroup
/// `dir`, with a pidfd for the child. Being born in the
/// cgroup spares the launch a migration, which takes the cgroup threadgroup lock for
/// writing and waits for an RCU grace period (about 10 ms here), and the child never runs
/// outside its cgroup at all.
///
/// Like `fork`, only while the process is single-threaded ([`spawn`] checks).
fn clone_into_cgroup(dir: BorrowedFd<'_>) -> Result<Forked, SpawnError> {
    let mut pidfd: libc::c_int = -1;
    let args = CloneArgs {
        flags: libc::CLONE_PIDFD as u64 | CLONE_INTO_CGROUP,
        pidfd: std::ptr::addr_of_mut!(pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: u64::try_from(dir.as_raw_fd()).unwrap_or(u64::MAX),
        ..CloneArgs::default()
    };
    // SAFETY: `args` is a valid clone_args of the size given, whose `pidfd` points to a
    // live c_int; without CLONE_VM the child gets a copy of this (single-threaded)
    // process, as with fork, and runs only `child_main`, which never returns.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::addr_of!(args),
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid < 0 {
        return Err(SpawnError::Syscall {
            call: "clone3 (into the agent's cgroup)",
            source: nix::Error::last(),
        });
    }
    if pid == 0 {
        return Ok(Forked::Child);
    }
    let pid = i32::try_from(pid).unwrap_or(-1);
    // SAFETY: with CLONE_PIDFD the kernel stored a new descriptor, owned by nothing else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(Forked::Parent { pid, pidfd })
}

/// SIGKILLs and reaps a child that failed to launch; describes how it ended.
fn kill_and_reap(pid: i32) -> String {
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    match nix::sys::wait::waitpid(pid, None) {
        Ok(status) => format!("{status:?}"),
        Err(e) => e.to_string(),
    }
}

/// The child's entry point: runs the launch sequence; on failure reports it and exits 125.
fn child_main(p: &mut Prepared, chan: BorrowedFd<'_>, supervisor: i32) -> ! {
    // A panic must not unwind into the supervisor's code, which this copy of the process
    // must never run.
    let failure =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            match launch_sequence(p, chan, supervisor) {
                Ok(never) => match never {},
                Err(f) => f,
            }
        }))
        .unwrap_or(ChildFailure {
            step: Step::Report,
            why: Why::Errno(libc::EFAULT),
        });
    channel::send_failure(chan, failure);
    // SAFETY: _exit ends the process without running the supervisor's destructors or
    // atexit handlers, which belong to the parent.
    unsafe { libc::_exit(125) }
}

fn at(step: Step) -> impl Fn(nix::Error) -> ChildFailure {
    move |e| ChildFailure {
        step,
        why: Why::Errno(e as i32),
    }
}

fn verify_failure(step: Step) -> impl Fn(VerifyFailure) -> ChildFailure {
    move |v| ChildFailure {
        step,
        why: match v {
            VerifyFailure::CapsRemain(i) => Why::CapsRemain(u32::try_from(i).unwrap_or(u32::MAX)),
            VerifyFailure::IdsMismatch => Why::IdsMismatch,
            VerifyFailure::RegainedRoot => Why::RegainedRoot,
            VerifyFailure::Errno(e) => Why::Errno(e),
        },
    }
}

/// THE LAUNCH SEQUENCE, in the child, between fork and exec. Each step fails closed: the
/// first error ends the child before exec. The order is the security argument:
///
/// 1. cgroup first, so that nothing the agent ever runs is outside its cgroups; then the
///    agent's mount namespace (entering one needs the capabilities dropped next);
/// 2. signals reset (the supervisor blocks some while it starts);
/// 3. identity: capabilities that need privilege to drop (bounding set) go while still
///    root; then groups, gid, uid; then the remaining sets, and a check that all five are
///    empty and root cannot be regained;
/// 4. no_new_privs (no setuid binary or file capability can give any back), a new session
///    (no controlling terminal: TIOCSTI into the caller's terminal is impossible; or, with
///    a terminal, the pseudo-terminal agentd relays, never the caller's own), a
///    parent-death signal (agentd killed -> the agent is killed);
/// 5. the working directory, as the agent's user (proves it may enter the workspace);
/// 6. Landlock, after the last path lookup agentd itself needs;
/// 7. fd hygiene: every fd above 2 is close-on-exec, so only stdin, stdout and stderr
///    reach the program;
/// 8. seccomp last: it would refuse some of the calls above;
/// 9. execve, with the scrubbed environment built before fork.
fn launch_sequence(
    p: &mut Prepared,
    chan: BorrowedFd<'_>,
    supervisor: i32,
) -> Result<Infallible, ChildFailure> {
    // 1. cgroup: born in the agent's v2 cgroup (clone3); join its v1 cgroups ("0" = the
    // writer).
    for procs in &p.v1_procs {
        nix::unistd::write(procs, b"0").map_err(at(Step::Cgroup))?;
    }
    if let Some(ns) = p.mount_ns.take() {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNS)
            .map_err(at(Step::MountNamespace))?;
    }

    // 2. signals: default dispositions (Rust ignores SIGPIPE; an ignored signal stays
    //    ignored across exec) and an empty mask (the supervisor blocks the signals it
    //    forwards until its handlers exist).
    reset_signals().map_err(at(Step::Signals))?;

    // 3. identity and capabilities.
    identity::drop_bounding_and_inheritable().map_err(verify_failure(Step::Capabilities))?;
    identity::switch(p.uid, p.gid).map_err(|(step, e)| {
        at(match step {
            SwitchStep::Setgroups => Step::Setgroups,
            SwitchStep::Setresgid => Step::Setresgid,
            SwitchStep::Setresuid => Step::Setresuid,
        })(e)
    })?;
    identity::clear_and_verify(p.uid, p.gid).map_err(verify_failure(Step::VerifyIdentity))?;

    // 4. no_new_privs, new session, parent-death signal (set after the id switch, which
    //    clears it); if the supervisor died before that, stop.
    nix::sys::prctl::set_no_new_privs().map_err(at(Step::NoNewPrivs))?;
    nix::unistd::setsid().map_err(at(Step::Setsid))?;
    // SAFETY: setpriority takes integers; async-signal-safe. Raising one's own nice needs
    // no privilege; a failure leaves the default priority (not a security decision).
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, AGENT_NICE) };
    if let Some(tty) = p.terminal.take() {
        // The pseudo-terminal agentd relays: the session's controlling terminal (never
        // stolen from another session: argument 0), and the agent's stdio.
        // SAFETY: TIOCSCTTY takes an int argument, no pointer.
        if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSCTTY, 0) } != 0 {
            return Err(at(Step::Terminal)(nix::Error::last()));
        }
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors of a descriptor this block owns
            // (closed at its end; the copies on 0-2 stay).
            if unsafe { libc::dup2(tty.as_raw_fd(), fd) } < 0 {
                return Err(at(Step::Terminal)(nix::Error::last()));
            }
        }
    }
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(at(Step::ParentDeathSignal))?;
    if nix::unistd::getppid().as_raw() != supervisor {
        return Err(ChildFailure {
            step: Step::ParentDeathSignal,
            why: Why::SupervisorGone,
        });
    }

    // 5. working directory: the workspace.
    nix::unistd::chdir(p.workspace.as_c_str()).map_err(at(Step::Workspace))?;

    // 6. Landlock: enforce the ruleset built before fork; report how far it is enforced.
    let ruleset = p.landlock.take().ok_or(ChildFailure {
        step: Step::Landlock,
        why: Why::LandlockNotEnforced,
    })?;
    let enforcement = landlock::restrict(ruleset).map_err(|f| ChildFailure {
        step: Step::Landlock,
        why: match f {
            RestrictFailure::NotEnforced => Why::LandlockNotEnforced,
            RestrictFailure::Errno(e) => Why::Errno(e),
        },
    })?;
    channel::send_landlock(chan, enforcement).map_err(at(Step::Report))?;

    // 7. fds: everything above stderr is close-on-exec (the report channel already is, and
    //    must stay open until exec).
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only changes fd flags.
    let rc = unsafe { libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) };
    if rc != 0 {
        return Err(at(Step::Fds)(nix::Error::last()));
    }

    // 8. seccomp, last: the allow-list filter; hand over the listener if it has one.
    if let Some(listener) = seccomp::install(&p.seccomp).map_err(at(Step::Seccomp))? {
        channel::send_listener(chan, listener.as_fd()).map_err(at(Step::Report))?;
    }

    // 9. exec: returns only on failure.
    Err(at(Step::Exec)(p.exec.exec()))
}

/// An agent's CPU priority: the lowest, nice 19, for its processes (set by the child after
/// `setsid`) and for its session (the kernel's autogroup, which decides between sessions:
/// [`lowest_session_priority`]). On a busy host everything else goes first: the
/// operator's shell, and agentd's own control plane (`ps` and `kill` answer with 100
/// agents at full speed: tests/tests/storm.rs). An idle CPU is still the agent's.
const AGENT_NICE: i32 = 19;

/// Sets the autogroup of the agent's session (it began one) to [`AGENT_NICE`]. From the
/// supervisor: the agent, no longer dumpable after its identity switch, may not open its
/// own file. Where the kernel has no autogroups there is no file, and the process nice is
/// what counts.
fn lowest_session_priority(pid: i32) {
    let path = format!("/proc/{pid}/autogroup");
    if let Err(e) = std::fs::write(&path, AGENT_NICE.to_string())
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::debug!("{path}: {e}");
    }
}

/// Default disposition for every catchable signal, and an empty signal mask.
fn reset_signals() -> nix::Result<()> {
    use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, signal, sigprocmask};
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing SIG_DFL runs no handler code.
        unsafe { signal(sig, SigHandler::SigDfl) }?;
    }
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
}

/// Whether `fd` is open (for the stdio sanitising `agentd run` does at start).
pub fn fd_is_open(fd: i32) -> bool {
    // SAFETY: F_GETFD reads the fd's flags; EBADF for a closed fd.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// Opens /dev/null on any of fds 0, 1, 2 that is closed, so that fds agentd opens later
/// never land on 0-2 (and get inherited by the agent as its stdio).
pub fn sanitize_stdio() -> std::io::Result<()> {
    for fd in 0..3 {
        if !fd_is_open(fd) {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")?;
            // open returns the lowest free fd, which is `fd`: keep it open.
            let raw = f.as_raw_fd();
            std::mem::forget(f);
            if raw != fd {
                return Err(std::io::Error::other(format!(
                    "/dev/null opened as fd {raw}, not {fd}"
                )));
            }
        }
    }
    Ok(())
}
