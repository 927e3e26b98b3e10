//! The link between the daemon and an agent's supervisor (an `agentd run` the daemon
//! started, on a socketpair inherited as fd [`SUPERVISOR_FD`]): [`SupervisorLine`]s one
//! way, [`ToSupervisor`] the other, as JSON Lines. It sits below both: the daemon
//! ([`crate::daemon`]) drives the supervisor ([`crate::run::supervised`]), and neither
//! reaches into the other for it.
//!
//! The framing (one JSON value per line, at most [`MAX_LINE`] bytes, strict, never
//! panicking) is shared with the control protocol ([`crate::daemon::proto`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The longest line either side accepts (a `run` request with its environment).
pub const MAX_LINE: usize = 64 * 1024;
/// The supervisor's end of its socketpair to the daemon.
pub const SUPERVISOR_FD: i32 = 3;
/// What the names of the link's environment variables begin with: a client's variables
/// never reach a supervisor under these names.
pub const SUPERVISOR_ENV_PREFIX: &str = "AGENTD_SUPERVISOR_";
/// The environment variable that tells `agentd run` it is a daemon's supervisor.
pub const SUPERVISOR_ENV: &str = "AGENTD_SUPERVISOR_FD";
/// Set (to 1) in a supervisor's environment when its stdin is the agent's terminal: the
/// slave side of a pseudo-terminal the client made and relays.
pub const SUPERVISOR_TERMINAL_ENV: &str = "AGENTD_SUPERVISOR_TERMINAL";
/// A copy of the read end of the supervisor's events pipe (its events go to fd
/// `SUPERVISOR_FD + 1`): held so that a successor daemon can read on from it.
pub const SUPERVISOR_EVENTS_READ_FD: i32 = SUPERVISOR_FD + 2;
/// Set (to [`SUPERVISOR_EVENTS_READ_FD`]) when the daemon passed that descriptor.
pub const SUPERVISOR_EVENTS_READ_ENV: &str = "AGENTD_SUPERVISOR_EVENTS_READ_FD";
/// The daemon's control socket, where a supervisor reconnects after a handover
/// ([`ToSupervisor::Handover`]).
pub const SUPERVISOR_SOCKET_ENV: &str = "AGENTD_SUPERVISOR_SOCKET";
/// Set (to 1) in a supervisor the daemon starts ahead of need: before anything else it
/// waits on [`SUPERVISOR_FD`] for its [`Launch`], which says what it would otherwise have
/// been started with (the daemon then starts the next one). A launch through the daemon
/// so does not wait for a process to start.
pub const SUPERVISOR_WARM_ENV: &str = "AGENTD_SUPERVISOR_WARM";

/// What a supervisor started ahead of need is to run: one line, sent with the client's
/// stdin, stdout and stderr (`SCM_RIGHTS`), the first and only thing the daemon says
/// before the supervisor does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Launch {
    /// The command line, program name first (`agentd run ...`).
    pub args: Vec<String>,
    /// Set in its environment (which otherwise holds only the `SUPERVISOR_*` variables).
    pub env: Vec<(String, String)>,
    /// Its working directory.
    pub cwd: PathBuf,
}

/// What a supervisor tells the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SupervisorLine {
    /// The agent's cgroup exists, its process does not: attach the kernel watch.
    /// The agent runs as `uid`, with `gid` its only group; its sandbox was compiled with
    /// this `workspace` and `home` (`{workspace}`, `{home}`), and the watch must be too.
    Attach {
        agent: String,
        cgroup: PathBuf,
        uid: u32,
        gid: u32,
        workspace: PathBuf,
        home: PathBuf,
    },
    /// The agent's first process runs.
    Started { pid: u32 },
    /// Ctrl-C twice, or SIGUSR1: the kill switch.
    KillSwitch { reason: String },
    /// The first process exited: drain its events, detach, answer the verdict.
    Finished,
    /// The seccomp listener of the agent's held calls is this process's descriptor
    /// `fd`: the daemon takes a copy (`pidfd_getfd`) and answers them.
    Listener { fd: i32 },
}

/// What the daemon tells a supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ToSupervisor {
    Attached,
    Refused(String),
    /// After `finished`: the line `agentd run` prints and exit 137, when the agent was
    /// killed by the breaker or the kill switch.
    Verdict(Option<String>),
    /// After `listener`: whether the daemon took it (the supervisor keeps its copy for a
    /// successor when it did, closes it when it did not).
    Listening(bool),
    /// The daemon is stopping for a successor: keep the agent, and when this socket
    /// closes, reconnect to the control socket ([`SUPERVISOR_SOCKET_ENV`]) with a
    /// `resume` request within `grace_s` seconds, or kill the agent.
    Handover {
        grace_s: u64,
    },
    /// The answer to a `resume`: the daemon watches the agent again. The write end of a
    /// new pipe for the supervisor's own events comes with it (`SCM_RIGHTS`), to take
    /// the place of the one the previous daemon read.
    Adopted,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("request longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("request is not UTF-8")]
    NotUtf8,
    #[error("bad request: {0}")]
    Json(String),
}

/// Sends one encoded line over a Unix stream socket with `fds` (`SCM_RIGHTS`; none when
/// empty), whole: a line the kernel cut is an error.
pub fn send_with_fds(
    sock: std::os::fd::BorrowedFd<'_>,
    line: &[u8],
    fds: &[std::os::fd::RawFd],
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let rights = [nix::sys::socket::ControlMessage::ScmRights(fds)];
    let cmsgs: &[nix::sys::socket::ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    let sent = nix::sys::socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &[std::io::IoSlice::new(line)],
        cmsgs,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )?;
    if sent != line.len() {
        return Err(std::io::Error::other(format!(
            "the line was cut ({sent} of {} bytes)",
            line.len()
        )));
    }
    Ok(())
}

/// One `recvmsg`: bytes into `buf`, `SCM_RIGHTS` descriptors appended to `fds` (owned from
/// here: closed if unused).
pub fn recv_with_fds(
    fd: std::os::fd::RawFd,
    buf: &mut [u8],
    fds: &mut Vec<std::os::fd::OwnedFd>,
) -> nix::Result<usize> {
    use std::os::fd::FromRawFd as _;

    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 8]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = c {
            for r in received {
                // SAFETY: the kernel installed these descriptors in this process for this
                // message; nothing else refers to them.
                fds.push(unsafe { std::os::fd::OwnedFd::from_raw_fd(r) });
            }
        }
    }
    Ok(msg.bytes)
}

/// Decodes one line (without its newline).
pub fn decode<T: DeserializeOwned>(line: &[u8]) -> Result<T, DecodeError> {
    if line.len() > MAX_LINE {
        return Err(DecodeError::TooLong);
    }
    let text = std::str::from_utf8(line).map_err(|_| DecodeError::NotUtf8)?;
    serde_json::from_str(text).map_err(|e| DecodeError::Json(e.to_string()))
}

/// One line, newline included.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec(msg).unwrap_or_else(|e| {
        // Only non-string map keys fail, and these types have none.
        format!("{{\"error\":\"cannot encode: {e}\"}}").into_bytes()
    });
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_strangers_are_refused() {
        for line in [
            ToSupervisor::Attached,
            ToSupervisor::Handover { grace_s: 30 },
            ToSupervisor::Adopted,
            ToSupervisor::Listening(true),
            ToSupervisor::Verdict(Some("tripped".into())),
        ] {
            let bytes = encode(&line);
            let back: ToSupervisor = decode(&bytes[..bytes.len() - 1]).unwrap();
            assert_eq!(back, line);
        }
        assert!(decode::<ToSupervisor>(br#"{"handover":{"grace_s":1,"x":2}}"#).is_err());
        assert!(decode::<ToSupervisor>(br#"{"handover":{"grace_s":-1}}"#).is_err());
    }
}
