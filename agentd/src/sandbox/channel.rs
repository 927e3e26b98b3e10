//! The child -> supervisor report channel.
//!
//! A `SOCK_SEQPACKET` socketpair, close-on-exec on both ends. Between fork and exec the
//! child sends fixed-size records: the Landlock enforcement status, the seccomp listener
//! (as `SCM_RIGHTS`) when the filter has one, or the failure that stopped the launch (step
//! and errno). The supervisor reads until end of file, which the kernel delivers when the
//! child's end closes: at a successful `execve` (close-on-exec), or when the child dies.

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    time::Duration,
};

use nix::sys::{
    socket::{
        AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
        sendmsg, setsockopt, socketpair, sockopt,
    },
    time::TimeVal,
};

use super::landlock::Enforcement;

/// A step of the launch sequence (the order of `launch_sequence` in `sandbox/mod.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Step {
    Cgroup = 1,
    Signals,
    Capabilities,
    Setgroups,
    Setresgid,
    Setresuid,
    VerifyIdentity,
    NoNewPrivs,
    Setsid,
    Terminal,
    ParentDeathSignal,
    Workspace,
    Landlock,
    Fds,
    Seccomp,
    Report,
    Exec,
    MountNamespace,
}

impl Step {
    const ALL: [Step; 18] = [
        Step::Cgroup,
        Step::Signals,
        Step::Capabilities,
        Step::Setgroups,
        Step::Setresgid,
        Step::Setresuid,
        Step::VerifyIdentity,
        Step::NoNewPrivs,
        Step::Setsid,
        Step::Terminal,
        Step::ParentDeathSignal,
        Step::Workspace,
        Step::Landlock,
        Step::Fds,
        Step::Seccomp,
        Step::Report,
        Step::Exec,
        Step::MountNamespace,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::Cgroup => "cgroup",
            Step::Signals => "signals",
            Step::Capabilities => "capabilities",
            Step::Setgroups => "setgroups",
            Step::Setresgid => "setresgid",
            Step::Setresuid => "setresuid",
            Step::VerifyIdentity => "identity check",
            Step::NoNewPrivs => "no_new_privs",
            Step::Setsid => "setsid",
            Step::Terminal => "controlling terminal",
            Step::ParentDeathSignal => "parent-death signal",
            Step::Workspace => "workspace",
            Step::Landlock => "landlock",
            Step::Fds => "close fds",
            Step::Seccomp => "seccomp",
            Step::Report => "report",
            Step::Exec => "exec",
            Step::MountNamespace => "mount namespace",
        }
    }

    fn from_u32(v: u32) -> Option<Step> {
        Step::ALL.into_iter().find(|s| *s as u32 == v)
    }
}

/// Why a step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Errno(i32),
    /// A capability set is still not empty (index into `identity::CAP_SETS`).
    CapsRemain(u32),
    IdsMismatch,
    RegainedRoot,
    LandlockNotEnforced,
    /// The supervisor died before the child set its parent-death signal.
    SupervisorGone,
}

impl Why {
    fn encode(self) -> (u32, i32) {
        match self {
            Why::Errno(e) => (1, e),
            Why::CapsRemain(i) => (2, i32::try_from(i).unwrap_or(-1)),
            Why::IdsMismatch => (3, 0),
            Why::RegainedRoot => (4, 0),
            Why::LandlockNotEnforced => (5, 0),
            Why::SupervisorGone => (6, 0),
        }
    }

    fn decode(code: u32, value: i32) -> Why {
        match code {
            1 => Why::Errno(value),
            2 => Why::CapsRemain(u32::try_from(value).unwrap_or(u32::MAX)),
            3 => Why::IdsMismatch,
            4 => Why::RegainedRoot,
            5 => Why::LandlockNotEnforced,
            _ => Why::SupervisorGone,
        }
    }
}

/// What stopped the launch in the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}", step.name(), describe(*step, *why))]
pub struct ChildFailure {
    pub step: Step,
    pub why: Why,
}

impl ChildFailure {
    pub fn errno(&self) -> Option<i32> {
        match self.why {
            Why::Errno(e) => Some(e),
            Why::CapsRemain(_)
            | Why::IdsMismatch
            | Why::RegainedRoot
            | Why::LandlockNotEnforced
            | Why::SupervisorGone => None,
        }
    }
}

/// `Permission denied` -> `permission denied (EACCES)`.
pub fn errno_text(e: i32) -> String {
    let errno = nix::Error::from_raw(e);
    format!("{} ({errno:?})", errno.desc().to_lowercase())
}

fn describe(step: Step, why: Why) -> String {
    match why {
        Why::Errno(e) => {
            let hint = match (step, e) {
                (Step::Exec, libc::EACCES) => {
                    " (Landlock refused it: the program, its #! interpreter and the dynamic loader must be under filesystem.exec)"
                }
                (Step::Workspace, libc::EACCES) => {
                    " (the agent's user cannot enter the workspace: check its permissions)"
                }
                (Step::Cgroup, _) => " (joining the agent's cgroup)",
                _ => "",
            };
            format!("{}{hint}", errno_text(e))
        }
        Why::CapsRemain(i) => format!(
            "the {} capability set is not empty after dropping every capability",
            super::identity::CAP_SETS
                .get(i as usize)
                .copied()
                .unwrap_or("unknown")
        ),
        Why::IdsMismatch => "the process's ids or groups are not the requested ones".into(),
        Why::RegainedRoot => "setuid(0) succeeded after the switch: refusing to run".into(),
        Why::LandlockNotEnforced => {
            "the kernel enforces none of the ruleset (is Landlock enabled? see `agentd doctor`)"
                .into()
        }
        Why::SupervisorGone => "agentd exited while the agent was starting".into(),
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Record {
    kind: u32,
    step: u32,
    code: u32,
    value: i32,
}

const KIND_FAILURE: u32 = 1;
const KIND_LANDLOCK: u32 = 2;
const KIND_LISTENER: u32 = 3;
const RECORD_LEN: usize = size_of::<Record>();

impl Record {
    fn bytes(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[0..4].copy_from_slice(&self.kind.to_ne_bytes());
        b[4..8].copy_from_slice(&self.step.to_ne_bytes());
        b[8..12].copy_from_slice(&self.code.to_ne_bytes());
        b[12..16].copy_from_slice(&self.value.to_ne_bytes());
        b
    }

    fn parse(b: &[u8]) -> Option<Record> {
        let word = |i: usize| b.get(i..i + 4).and_then(|s| s.try_into().ok());
        Some(Record {
            kind: u32::from_ne_bytes(word(0)?),
            step: u32::from_ne_bytes(word(4)?),
            code: u32::from_ne_bytes(word(8)?),
            value: i32::from_ne_bytes(word(12)?),
        })
    }
}

/// The two ends: (supervisor's, child's).
pub fn pair() -> nix::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
}

fn send(chan: BorrowedFd<'_>, r: Record, fd: Option<BorrowedFd<'_>>) -> nix::Result<()> {
    let bytes = r.bytes();
    let iov = [IoSlice::new(&bytes)];
    let fds;
    let cmsgs: &[ControlMessage<'_>] = match fd {
        Some(fd) => {
            fds = [fd.as_raw_fd()];
            &[ControlMessage::ScmRights(&fds)]
        }
        None => &[],
    };
    loop {
        match sendmsg::<()>(chan.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(nix::Error::EINTR) => {}
            other => return other.map(|_| ()),
        }
    }
}

/// Child: reports the failure that stops the launch (best effort: the child exits next).
pub fn send_failure(chan: BorrowedFd<'_>, f: ChildFailure) {
    let (code, value) = f.why.encode();
    let r = Record {
        kind: KIND_FAILURE,
        step: f.step as u32,
        code,
        value,
    };
    let _ = send(chan, r, None);
}

/// Child: reports how far Landlock is enforced.
pub fn send_landlock(chan: BorrowedFd<'_>, e: Enforcement) -> nix::Result<()> {
    let code = match e {
        Enforcement::Full => 1,
        Enforcement::Partial => 2,
    };
    send(
        chan,
        Record {
            kind: KIND_LANDLOCK,
            code,
            ..Record::default()
        },
        None,
    )
}

/// Child: hands the seccomp user-notification listener to the supervisor.
pub fn send_listener(chan: BorrowedFd<'_>, listener: BorrowedFd<'_>) -> nix::Result<()> {
    send(
        chan,
        Record {
            kind: KIND_LISTENER,
            ..Record::default()
        },
        Some(listener),
    )
}

/// Everything the child reported before exec (or before it failed).
#[derive(Debug, Default)]
pub struct Reports {
    pub landlock: Option<Enforcement>,
    pub listener: Option<OwnedFd>,
    pub failure: Option<ChildFailure>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("the agent's process reported nothing for {0:?} (stuck before exec?)")]
    Timeout(Duration),
    #[error("reading the launch reports: {0}")]
    Recv(#[source] nix::Error),
    #[error("a malformed launch report ({0} bytes)")]
    Malformed(usize),
    #[error("the agent's own exec was not held as it should be: {0}")]
    FirstExec(String),
}

/// Supervisor: reads reports until the child's end closes. Each read waits at most
/// `timeout`.
pub fn receive(
    chan: &OwnedFd,
    timeout: Duration,
    mut on_listener: impl FnMut(&OwnedFd) -> Result<(), ReceiveError>,
) -> Result<Reports, ReceiveError> {
    let tv = TimeVal::new(
        i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        i64::from(timeout.subsec_micros()),
    );
    setsockopt(chan, sockopt::ReceiveTimeout, &tv).map_err(ReceiveError::Recv)?;
    let mut reports = Reports::default();
    loop {
        let mut buf = [0u8; RECORD_LEN];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let (len, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<()>(
                chan.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) => return Err(ReceiveError::Timeout(timeout)),
                Err(e) => return Err(ReceiveError::Recv(e)),
            };
            let mut fds = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(v) = c {
                        fds.extend(v);
                    }
                }
            }
            (msg.bytes, fds)
        };
        // SAFETY: SCM_RIGHTS fds were just installed in this process by the kernel and
        // belong to no one else.
        let mut fds: Vec<OwnedFd> = fds
            .into_iter()
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if len == 0 {
            return Ok(reports);
        }
        let r = buf
            .get(..len)
            .and_then(Record::parse)
            .ok_or(ReceiveError::Malformed(len))?;
        match r.kind {
            KIND_LANDLOCK => {
                reports.landlock = Some(if r.code == 2 {
                    Enforcement::Partial
                } else {
                    Enforcement::Full
                });
            }
            KIND_LISTENER => {
                reports.listener = fds.pop();
                if let Some(l) = &reports.listener {
                    on_listener(l)?;
                }
            }
            KIND_FAILURE => {
                reports.failure = Some(ChildFailure {
                    step: Step::from_u32(r.step).unwrap_or(Step::Report),
                    why: Why::decode(r.code, r.value),
                });
            }
            _ => return Err(ReceiveError::Malformed(len)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd as _;

    #[test]
    fn records_round_trip_and_eof_ends_the_stream() {
        let (sup, child) = pair().unwrap();
        send_landlock(child.as_fd(), Enforcement::Partial).unwrap();
        let (listener, _other) = pair().unwrap();
        send_listener(child.as_fd(), listener.as_fd()).unwrap();
        send_failure(
            child.as_fd(),
            ChildFailure {
                step: Step::Exec,
                why: Why::Errno(libc::EACCES),
            },
        );
        drop(child);
        let r = receive(&sup, Duration::from_secs(5), |_| Ok(())).unwrap();
        assert_eq!(r.landlock, Some(Enforcement::Partial));
        assert!(r.listener.is_some());
        let f = r.failure.unwrap();
        assert_eq!(f.step, Step::Exec);
        assert_eq!(f.errno(), Some(libc::EACCES));
        assert!(
            f.to_string()
                .starts_with("exec: permission denied (EACCES)")
        );
    }

    #[test]
    fn a_silent_child_times_out() {
        let (sup, _child) = pair().unwrap();
        assert!(matches!(
            receive(&sup, Duration::from_millis(20), |_| Ok(())),
            Err(ReceiveError::Timeout(_))
        ));
    }

    #[test]
    fn steps_round_trip() {
        for s in Step::ALL {
            assert_eq!(Step::from_u32(s as u32), Some(s));
        }
        for w in [
            Why::Errno(5),
            Why::CapsRemain(4),
            Why::IdsMismatch,
            Why::RegainedRoot,
            Why::LandlockNotEnforced,
            Why::SupervisorGone,
        ] {
            let (c, v) = w.encode();
            assert_eq!(Why::decode(c, v), w);
        }
    }
}
