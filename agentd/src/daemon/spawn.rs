//! Starting an agent's supervisor: this binary's `agentd run`, with a socketpair to the
//! daemon as fd [`SUPERVISOR_FD`], the write end of its events pipe next to it and a copy
//! of the read end as [`SUPERVISOR_EVENTS_READ_FD`] (what it writes while no daemon reads,
//! a handover, waits in the pipe for the successor).
//!
//! The daemon keeps one supervisor started ahead of need ([`Warm`]): a launch hands it
//! its [`Launch`] (command line, environment, working directory, the client's stdio) on
//! the socketpair, so it does not wait for a process to fork and load this program. The
//! next one is started in the background once the agent runs (not during the launch: a
//! fork holds the daemon's memory map, which the launch's attach needs). When there is
//! none (two launches at once, or it died), the supervisor is started for the launch,
//! with the same command line, environment and descriptors.

use std::{
    os::{
        fd::{AsFd as _, AsRawFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::Path,
    process::Stdio,
    sync::Arc,
};

use crate::link::{
    self, Launch, SUPERVISOR_ENV, SUPERVISOR_ENV_PREFIX, SUPERVISOR_EVENTS_READ_ENV,
    SUPERVISOR_EVENTS_READ_FD, SUPERVISOR_FD, SUPERVISOR_SOCKET_ENV, SUPERVISOR_TERMINAL_ENV,
    SUPERVISOR_WARM_ENV,
};

/// A supervisor process, and the daemon's ends of its socketpair and events pipe.
#[derive(Debug)]
pub(super) struct Started {
    /// Not killed when dropped: during a handover the supervisor outlives this daemon.
    pub child: tokio::process::Child,
    pub ours: UnixStream,
    pub events_r: OwnedFd,
}

/// A supervisor started ahead of need, waiting for its [`Launch`]; killed when dropped
/// without one (the daemon stops, or it was replaced).
#[derive(Debug)]
pub(super) struct Warm(Option<Started>);

impl Drop for Warm {
    fn drop(&mut self) {
        if let Some(s) = self.0.as_mut() {
            // Reaped by tokio in the background once it has died.
            let _ = s.child.start_kill();
        }
    }
}

/// The supervisor's environment (besides the link's variables): of the client's `env`,
/// only what the profile passes to the agent (`pass`), never the dynamic linker's nor the
/// link's names (the supervisor runs as root: LD_PRELOAD, GCONV_PATH... must not reach
/// it); the invoking user as `SUDO_UID`/`SUDO_GID`: who connected (`peer`), or for root
/// the user sudo's variables name, as with `sudo agentd run`; and whether its stdin is the
/// agent's terminal.
pub(super) fn environment(
    env: &[(String, String)],
    pass: &[String],
    peer: (u32, u32),
    terminal: bool,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| {
            pass.iter().any(|p| p == k)
                && !k.starts_with("LD_")
                && !k.starts_with(SUPERVISOR_ENV_PREFIX)
                && k != "SUDO_UID"
                && k != "SUDO_GID"
        })
        .cloned()
        .collect();
    let (uid, gid) = if peer.0 == 0 {
        let var = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        match (var("SUDO_UID"), var("SUDO_GID")) {
            (Some(u), Some(g)) => (u, g),
            _ => ("0".into(), "0".into()),
        }
    } else {
        (peer.0.to_string(), peer.1.to_string())
    };
    out.push(("SUDO_UID".into(), uid));
    out.push(("SUDO_GID".into(), gid));
    if terminal {
        out.push((SUPERVISOR_TERMINAL_ENV.into(), "1".into()));
    }
    out
}

/// Starts the supervisor for `launch` now, with the client's `stdio`.
pub(super) fn start(
    socket: &Path,
    launch: &Launch,
    stdio: [OwnedFd; 3],
) -> std::io::Result<Started> {
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(launch.args.iter().skip(1))
        .current_dir(&launch.cwd)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)));
    let [stdin, stdout, stderr] = stdio;
    cmd.stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    spawn(cmd, socket)
}

/// Starts a supervisor ahead of need: no command line, stdio on /dev/null, nothing but
/// the link's variables in its environment; it waits for its launch.
pub(super) fn warm(socket: &Path) -> std::io::Result<Warm> {
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    // The argument only names it in `ps`: its command line comes with its launch.
    cmd.arg("(supervisor-waiting-for-a-launch)")
        .current_dir("/")
        .env_clear()
        .env(SUPERVISOR_WARM_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    spawn(cmd, socket).map(|s| Warm(Some(s)))
}

impl Warm {
    /// Hands the supervisor its launch and the client's stdio. On an error (it died
    /// meanwhile) it is dropped, hence killed; the caller starts another.
    pub fn launch(mut self, launch: &Launch, stdio: &[OwnedFd; 3]) -> std::io::Result<Started> {
        let fds = stdio.each_ref().map(AsRawFd::as_raw_fd);
        let started = self
            .0
            .as_ref()
            .ok_or_else(|| std::io::Error::other("already launched"))?;
        link::send_with_fds(started.ours.as_fd(), &link::encode(launch), &fds)?;
        // From here on it is an agent's supervisor: it ends with its agent, never
        // because the daemon let go of this handle.
        self.0
            .take()
            .ok_or_else(|| std::io::Error::other("already launched"))
    }
}

/// Keeps one supervisor ahead of need in `slot`: starts it in the background unless one
/// waits already.
pub(super) fn replenish(slot: &Arc<std::sync::Mutex<Option<Warm>>>, socket: &Path) {
    let slot = Arc::clone(slot);
    let socket = socket.to_owned();
    tokio::task::spawn_blocking(move || {
        if super::lock(&slot).is_some() {
            return;
        }
        match warm(&socket) {
            // Another launch may have filled it meanwhile: the one replaced is killed.
            Ok(w) => drop(super::lock(&slot).replace(w)),
            Err(e) => tracing::warn!("starting a supervisor ahead of need: {e}"),
        }
    });
}

/// Spawns `cmd` as a supervisor: the socketpair, the events pipe and the link's
/// variables.
fn spawn(mut cmd: tokio::process::Command, socket: &Path) -> std::io::Result<Started> {
    let (ours, theirs) = UnixStream::pair()?;
    let (events_r, events_w) = nix::unistd::pipe()?;
    cmd.env(SUPERVISOR_ENV, SUPERVISOR_FD.to_string())
        .env(
            SUPERVISOR_EVENTS_READ_ENV,
            SUPERVISOR_EVENTS_READ_FD.to_string(),
        )
        .env(SUPERVISOR_SOCKET_ENV, socket);
    // The supervisor holds a copy of the pipe's read end: what it writes while no daemon
    // reads (a handover) waits in the pipe for the successor.
    let events_r_copy = events_r.try_clone()?;
    let sock_fd = theirs.as_raw_fd();
    let pipe_fd = events_w.as_raw_fd();
    let read_fd = events_r_copy.as_raw_fd();
    // SAFETY: runs in the forked child before exec and only calls dup2 and fcntl, which
    // are async-signal-safe, on descriptors that are open in the child (inherited copies
    // of `theirs`, `events_w` and `events_r_copy`, alive in the parent until spawn
    // returns).
    unsafe {
        cmd.pre_exec(move || {
            // Out of the way of 3 to 5 first, then into place (dup2 clears CLOEXEC).
            let s = libc::fcntl(sock_fd, libc::F_DUPFD_CLOEXEC, 10);
            let p = libc::fcntl(pipe_fd, libc::F_DUPFD_CLOEXEC, 10);
            let r = libc::fcntl(read_fd, libc::F_DUPFD_CLOEXEC, 10);
            if s < 0
                || p < 0
                || r < 0
                || libc::dup2(s, SUPERVISOR_FD) < 0
                || libc::dup2(p, SUPERVISOR_FD + 1) < 0
                || libc::dup2(r, SUPERVISOR_EVENTS_READ_FD) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop((theirs, events_w, events_r_copy));
    Ok(Started {
        child,
        ours,
        events_r,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn only_passed_variables_reach_the_supervisor_never_the_linkers_or_the_links() {
        let client = env(&[
            ("PATH", "/usr/bin"),
            ("LD_PRELOAD", "/tmp/evil.so"),
            ("AGENTD_SUPERVISOR_SOCKET", "/tmp/evil.sock"),
            ("AGENTD_SUPERVISOR_TERMINAL", "1"),
            ("SUDO_UID", "1000"),
            ("SUDO_GID", "1000"),
            ("NOT_PASSED", "x"),
        ]);
        // A profile that passes all of them by name.
        let pass: Vec<String> = client.iter().map(|(k, _)| k.clone()).collect();
        let got = environment(&client, &pass, (1000, 1000), false);
        assert_eq!(
            got,
            env(&[
                ("PATH", "/usr/bin"),
                ("NOT_PASSED", "x"),
                ("SUDO_UID", "1000"),
                ("SUDO_GID", "1000"),
            ])
        );
        let got = environment(&client, &["PATH".to_owned()], (1000, 1000), true);
        assert_eq!(
            got,
            env(&[
                ("PATH", "/usr/bin"),
                ("SUDO_UID", "1000"),
                ("SUDO_GID", "1000"),
                ("AGENTD_SUPERVISOR_TERMINAL", "1"),
            ])
        );
    }

    #[test]
    fn the_invoking_user_is_the_peer_or_for_root_whom_sudo_names() {
        let sudo = env(&[("SUDO_UID", "65534"), ("SUDO_GID", "65533")]);
        let user = |e: &[(String, String)]| {
            e.iter()
                .filter(|(k, _)| k.starts_with("SUDO_"))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            user(&environment(&sudo, &[], (0, 0), false)),
            env(&[("SUDO_UID", "65534"), ("SUDO_GID", "65533")])
        );
        // Anyone else is themselves, whatever their variables say.
        assert_eq!(
            user(&environment(&sudo, &[], (1000, 100), false)),
            env(&[("SUDO_UID", "1000"), ("SUDO_GID", "100")])
        );
        assert_eq!(
            user(&environment(&[], &[], (0, 0), false)),
            env(&[("SUDO_UID", "0"), ("SUDO_GID", "0")])
        );
    }
}
