//! A supervisor the daemon started ahead of need ([`SUPERVISOR_WARM_ENV`]): the process
//! exists, its program is loaded and linked, and it waits on its socket to the daemon for
//! the [`Launch`] that says what it is to run. It then takes the client's stdin, stdout
//! and stderr, the working directory and the environment it would otherwise have been
//! started with, and goes on as that `agentd run`.
//!
//! It runs nothing of its own before the launch, holds nothing of a client's, and only
//! its daemon holds the other end of its socket. When the daemon goes away first, it
//! reads end of file and exits.

use std::{
    ffi::OsString,
    os::fd::{AsRawFd as _, OwnedFd},
};

use crate::link::{
    self, Launch, MAX_LINE, SUPERVISOR_ENV_PREFIX, SUPERVISOR_FD, SUPERVISOR_TERMINAL_ENV,
    SUPERVISOR_WARM_ENV,
};

/// Why a warm supervisor could not take its launch.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    /// The daemon went away (or stopped) before it had a launch for this process.
    #[error("the daemon closed the socket before a launch")]
    Closed,
    #[error("reading the launch from fd {SUPERVISOR_FD}: {0}")]
    Read(nix::Error),
    #[error("the launch: {0}")]
    Bad(String),
    #[error("the launch came with {0} descriptors (stdin, stdout and stderr expected)")]
    Descriptors(usize),
    #[error("taking the client's {what}: {source}")]
    Stdio {
        what: &'static str,
        source: nix::Error,
    },
    #[error("entering {}: {source}", .dir.display())]
    Chdir {
        dir: std::path::PathBuf,
        source: nix::Error,
    },
    #[error("{0} threads before the launch (one expected): a bug in agentd")]
    Threads(usize),
}

/// Whether this process is a supervisor started ahead of need.
pub fn is_warm() -> bool {
    std::env::var_os(SUPERVISOR_WARM_ENV).is_some()
}

/// Waits for the launch, takes on its stdio, working directory and environment, and
/// returns its command line. Call first thing in `main`, while single-threaded.
pub fn take_launch() -> Result<Vec<OsString>, WarmError> {
    let (line, fds) = read_launch()?;
    let launch: Launch = link::decode(&line).map_err(|e| WarmError::Bad(e.to_string()))?;
    check_env(&launch.env)?;
    let [stdin, stdout, stderr]: [OwnedFd; 3] = fds
        .try_into()
        .map_err(|fds: Vec<OwnedFd>| WarmError::Descriptors(fds.len()))?;
    for (fd, target, what) in [
        (&stdin, 0, "stdin"),
        (&stdout, 1, "stdout"),
        (&stderr, 2, "stderr"),
    ] {
        // SAFETY: dup2 on two integer descriptors, no pointers: `fd` is open (owned
        // here), and 0-2 are this process's stdio, which it replaces (they were
        // /dev/null while it waited).
        if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
            return Err(WarmError::Stdio {
                what,
                source: nix::Error::last(),
            });
        }
    }
    drop((stdin, stdout, stderr));
    nix::unistd::chdir(&launch.cwd).map_err(|source| WarmError::Chdir {
        dir: launch.cwd.clone(),
        source,
    })?;
    let threads = crate::sandbox::thread_count_now().unwrap_or(usize::MAX);
    if threads != 1 {
        return Err(WarmError::Threads(threads));
    }
    // SAFETY: the environment is changed while this process has one thread (checked just
    // above), before anything reads it on another.
    unsafe {
        std::env::remove_var(SUPERVISOR_WARM_ENV);
        for (k, v) in &launch.env {
            std::env::set_var(k, v);
        }
    }
    Ok(launch.args.into_iter().map(OsString::from).collect())
}

/// The link's own variables were set when this process started; a launch only says
/// whether stdin is the agent's terminal, and names nothing `setenv` could not set.
fn check_env(env: &[(String, String)]) -> Result<(), WarmError> {
    let refused = |(k, v): &&(String, String)| {
        (k.starts_with(SUPERVISOR_ENV_PREFIX) && k != SUPERVISOR_TERMINAL_ENV)
            || k.is_empty()
            || k.contains(['=', '\0'])
            || v.contains('\0')
    };
    match env.iter().find(refused) {
        Some((k, _)) => Err(WarmError::Bad(format!("it may not set {k:?}"))),
        None => Ok(()),
    }
}

/// Reads the launch's line (up to its newline, which ends the daemon's first message:
/// nothing may follow it) and the descriptors that came with it.
fn read_launch() -> Result<(Vec<u8>, Vec<OwnedFd>), WarmError> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = match link::recv_with_fds(SUPERVISOR_FD, &mut chunk, &mut fds) {
            Ok(0) => return Err(WarmError::Closed),
            Ok(n) => n,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(WarmError::Read(e)),
        };
        line.extend_from_slice(&chunk[..n]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            if end + 1 != line.len() {
                return Err(WarmError::Bad("more than one line".into()));
            }
            line.truncate(end);
            return Ok((line, fds));
        }
        if line.len() > MAX_LINE {
            return Err(WarmError::Bad(format!("longer than {MAX_LINE} bytes")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    #[test]
    fn a_launch_sets_no_link_variable_but_the_terminals() {
        assert!(check_env(&[var("PATH", "/usr/bin"), var("SUDO_UID", "1000")]).is_ok());
        assert!(check_env(&[var(SUPERVISOR_TERMINAL_ENV, "1")]).is_ok());
        for bad in [
            var("AGENTD_SUPERVISOR_SOCKET", "/tmp/evil.sock"),
            var(SUPERVISOR_WARM_ENV, "1"),
            var("", "x"),
            var("A=B", "x"),
            var("A", "x\0y"),
        ] {
            assert!(
                matches!(
                    check_env(std::slice::from_ref(&bad)),
                    Err(WarmError::Bad(_))
                ),
                "{bad:?}"
            );
        }
    }
}
