//! Who is at the other end of a control connection, as the kernel recorded it at
//! `connect(2)` — not whoever holds that pid by the time the daemon looks.
//!
//! `SO_PEERCRED` gives the peer's uid, gid and pid as they were at connect. The uid and gid
//! stay true; the pid does not: the process may exit, leave the socket to a child it
//! forked, and its pid go to another process before the request is read (the client
//! chooses when to send it). So [`Peer`] keeps, from the moment the connection is
//! accepted:
//! - a pidfd for the peer's process: `SO_PEERPIDFD` (Linux 6.5), the very process that
//!   connected; on older kernels `pidfd_open(pid)` at accept, before the request is read,
//!   which leaves one window: a peer that exits between its `connect` and the daemon's
//!   `accept` and whose pid is taken meanwhile (docs/daemon.md, "Access");
//! - its supplementary groups, `SO_PEERGROUPS` (Linux 4.13), recorded at connect.
//!
//! What must be read from /proc (the peer's cgroup: is it inside an agent?) is read, then
//! confirmed through the pidfd: if the pidfd's process no longer holds the pid (it exited
//! and was reaped: the pid may be another process's now), what was read is not trusted
//! and the peer counts as inside an agent. Failing closed refuses a client that exits
//! before its request is answered, which agentd's own clients never do.

use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};

use crate::audit::record::Actor;

/// What [`Peer::agent`] says of a peer whose process is gone (or was never known).
pub(super) const GONE: &str = "unknown (the process that connected has exited)";

/// Supplementary groups a peer may have (the kernel's NGROUPS_MAX is 65536).
const MAX_GROUPS: usize = 65_536;

/// The process at the other end of a control connection.
#[derive(Debug)]
pub(super) struct Peer {
    /// Uid, gid and pid from `SO_PEERCRED` (pid 0: not visible from here).
    pub actor: Actor,
    /// The peer's process; `None`: it had exited by the accept, or its pid is not
    /// visible here (every check that needs the process fails closed).
    pidfd: Option<OwnedFd>,
    /// Its supplementary groups at connect; `None` when the kernel would not say (fewer
    /// rights, never more).
    groups: Option<Vec<u32>>,
}

impl Peer {
    /// The peer of a connection just accepted: call it before reading the request.
    pub fn of(stream: &tokio::net::UnixStream) -> std::io::Result<Peer> {
        let cred = stream.peer_cred()?;
        let actor = Actor {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
        };
        let fd = stream.as_fd();
        let pidfd = if actor.pid == 0 {
            None
        } else {
            match nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerPidfd) {
                Ok(pidfd) => Some(pidfd),
                // Before Linux 6.5: the pid's process now, before the request is read.
                Err(nix::errno::Errno::ENOPROTOOPT) => pidfd_open(actor.pid),
                // EINVAL, ESRCH: the peer has exited already.
                Err(_) => None,
            }
        };
        Ok(Peer {
            actor,
            pidfd,
            groups: peer_groups(fd),
        })
    }

    /// Whether the process that connected still holds its pid (running, or a zombie not
    /// yet reaped): then /proc/PID is still its own.
    fn is_there(&self) -> bool {
        let Some(pidfd) = &self.pidfd else {
            return false;
        };
        std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))
            .ok()
            .and_then(|text| fdinfo_pid(&text))
            .is_some_and(|pid| pid > 0 && i64::from(self.actor.pid) == pid)
    }

    /// The agent whose cgroup the peer's process is in, if any. Fails closed: a process
    /// whose cgroup cannot be read, or that is gone (what was read may be another
    /// process's), counts as an agent's ([`GONE`]).
    pub fn agent(&self) -> Option<String> {
        if self.pidfd.is_none() {
            return Some(GONE.to_owned());
        }
        let found = super::agent_of(self.actor.pid);
        if !self.is_there() {
            return Some(GONE.to_owned());
        }
        found
    }

    /// Whether the peer's primary or supplementary groups (at connect) include `gid`.
    pub fn in_group(&self, gid: u32) -> bool {
        in_groups(self.actor.gid, self.groups.as_deref(), gid)
    }

    /// Its supplementary groups at connect; none when unknown (fewer rights, never more).
    pub fn groups(&self) -> &[u32] {
        self.groups.as_deref().unwrap_or_default()
    }
}

/// Whether `gid` is the primary group or one of `groups` (`None`: unknown, so only the
/// primary group counts).
fn in_groups(primary: u32, groups: Option<&[u32]>, gid: u32) -> bool {
    primary == gid || groups.is_some_and(|g| g.contains(&gid))
}

/// The `Pid:` of a pidfd's fdinfo: the process's pid here, -1 once it has been reaped,
/// 0 when it is not visible in this pid namespace. `None`: no such line (not a pidfd).
fn fdinfo_pid(text: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// `pidfd_open(pid, 0)`; `None` when the process is gone (or the kernel predates 5.3).
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags, no pointers; it returns a new descriptor
    // or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: the kernel just returned this descriptor, open and owned by nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `SO_PEERGROUPS`: the peer's supplementary groups as they were at connect.
fn peer_groups(fd: BorrowedFd<'_>) -> Option<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * size_of::<libc::gid_t>()).ok()?;
        // SAFETY: the buffer is `len` bytes of gid_t, writable; the kernel writes at most
        // `len` bytes and sets `len` to what it wrote (or, with ERANGE, to what it needs).
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = usize::try_from(len).ok()? / size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return Some(groups);
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE)
            || n <= groups.len()
            || n > MAX_GROUPS
        {
            return None;
        }
        groups.resize(n, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfd_fdinfo_says_which_pid_or_that_the_process_is_gone() {
        let live = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nPid:\t4242\nNSpid:\t4242\n";
        assert_eq!(fdinfo_pid(live), Some(4242));
        assert_eq!(fdinfo_pid("pos:\t0\nPid:\t-1\nNSpid:\t-1\n"), Some(-1));
        assert_eq!(fdinfo_pid("pos:\t0\nPid:\t0\n"), Some(0));
        assert_eq!(fdinfo_pid("pos:\t0\nflags:\t02\n"), None);
        assert_eq!(fdinfo_pid("Pid:\tfour\n"), None);
    }

    #[test]
    fn groups_count_only_when_known() {
        assert!(in_groups(100, None, 100));
        assert!(!in_groups(100, None, 200));
        assert!(in_groups(100, Some(&[300, 200]), 200));
        assert!(!in_groups(100, Some(&[]), 200));
    }

    /// A connection from this very process: its pidfd names it, its groups are its own,
    /// and it is in no agent's cgroup.
    #[tokio::test]
    async fn a_peer_is_the_process_that_connected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let peer = Peer::of(&stream).unwrap();
        assert_eq!(peer.actor.pid, std::process::id());
        assert!(peer.pidfd.is_some());
        assert!(peer.is_there());
        assert!(peer.in_group(nix::unistd::getgid().as_raw()));
        let mine = nix::unistd::getgroups().unwrap();
        for g in mine {
            assert!(peer.in_group(g.as_raw()), "group {g}");
        }
    }

    /// A peer whose process has exited (and been reaped) counts as inside an agent.
    #[tokio::test]
    async fn a_peer_that_exited_counts_as_inside_an_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 0"])
            .spawn()
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let mut peer = Peer::of(&stream).unwrap();
        assert!(peer.agent().is_none(), "{:?}", peer.agent());
        // As if the child had connected: its pidfd, its pid; then it exits and is reaped.
        peer.pidfd = pidfd_open(child.id());
        peer.actor.pid = child.id();
        // Running, or a zombie not yet reaped: its pid is still its own.
        assert!(peer.is_there());
        child.wait().unwrap();
        assert!(!peer.is_there());
        assert_eq!(peer.agent().as_deref(), Some(GONE));
        peer.pidfd = None;
        assert_eq!(peer.agent().as_deref(), Some(GONE));
    }
}
