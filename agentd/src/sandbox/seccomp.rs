//! The seccomp allow-list filter: compiled from the policy in the supervisor (pure, before
//! fork), installed by the child as the last step before `execve`.
//!
//! # Program layout
//! `seccompiler` compiles one match action and one mismatch action per filter, and has no
//! user-notification action. The filter agentd installs therefore is up to three
//! seccompiler programs laid end to end, each one checked in turn:
//!
//! ```text
//! block 1  ENOSYS calls (clone3)  -> RET ERRNO(ENOSYS)        else fall through
//! block 2  notify calls           -> RET USER_NOTIF           else fall through  (only if any)
//! block 3  allow-list             -> RET ALLOW                else RET ERRNO(EPERM)
//! ```
//!
//! Blocks 1 and 2 are compiled with sentinel errno values that no real call returns:
//! [`SENTINEL_NEXT`] as their mismatch action (patched into a jump to the next block) and
//! [`SENTINEL_NOTIFY`] as block 2's match action (patched into `SECCOMP_RET_USER_NOTIF`).
//! Every block starts with seccompiler's architecture check (a call through another ABI,
//! e.g. 32-bit `int 0x80`, kills the process). x32 calls (`nr | 0x40000000`) match no
//! allow-list entry and get EPERM.
//!
//! Routing a call to the supervisor later is a policy change only: put its name in
//! `SeccompPolicy::notify`; [`install`] then asks the kernel for a listener and the launch
//! hands it to the supervisor.

use std::{collections::BTreeMap, os::fd::OwnedFd};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, sock_filter,
};
use serde::Serialize;

use crate::{
    profile::{SeccompPolicy, SocketFamily},
    syscalls,
};

/// Errno data of block 2's match action before patching: becomes `SECCOMP_RET_USER_NOTIF`.
const SENTINEL_NOTIFY: u32 = 0xfff;
/// Errno data of blocks 1 and 2's mismatch action before patching: becomes a jump past the
/// end of the block.
const SENTINEL_NEXT: u32 = 0xffe;

/// `clone` namespace flags: an agent may not create namespaces (new user namespaces are
/// the first step of many kernel exploits; the others would escape the agent's view).
/// CLONE_NEWTIME is not a `clone` flag (its bit is part of CSIGNAL there); `unshare` and
/// `clone3`, the only ways to it, are refused.
const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;

/// ioctl requests refused on every fd: they push input into a terminal (TIOCSTI, and
/// TIOCLINUX's selection paste), i.e. type commands into the caller's shell.
const DENIED_IOCTLS: [(u64, &str); 2] =
    [(libc::TIOCSTI, "TIOCSTI"), (libc::TIOCLINUX, "TIOCLINUX")];

/// `socket`'s `type & SOCK_TYPE_MASK` is the type the kernel creates; the bits above it may
/// only be SOCK_NONBLOCK and SOCK_CLOEXEC (any other is EINVAL), so they are masked off.
const SOCK_TYPE_MASK: u64 = 0xf;

/// The (type, protocol) pairs an inet socket may have: TCP and UDP, as `cgroup/sock_create`
/// allows (protocol 0 is the type's default). An allow-list, not a refusal of SOCK_RAW: the
/// kernel also turns `socket(AF_INET, SOCK_PACKET, ..)` into a packet socket.
const INET_SOCKETS: [(i32, i32); 4] = [
    (libc::SOCK_STREAM, 0),
    (libc::SOCK_STREAM, libc::IPPROTO_TCP),
    (libc::SOCK_DGRAM, 0),
    (libc::SOCK_DGRAM, libc::IPPROTO_UDP),
];

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error(
        "seccomp: system call `{0}` is unknown on this architecture (add it to agentd/src/syscalls.rs)"
    )]
    UnknownSyscall(String),
    #[error("seccomp: agentd has no system call table for this architecture")]
    UnsupportedArch,
    #[error(
        "seccomp: `{0}` has an argument rule agentd cannot build (known: clone, ioctl, socket, socketpair)"
    )]
    UnknownArgRule(String),
    #[error("seccomp: the default action `{0}` is not an errno agentd knows")]
    UnknownErrno(String),
    #[error("seccomp: `{0}` is in more than one list (allow, allow_if, enosys, notify)")]
    Duplicate(String),
    #[error("seccomp: cannot compile the filter: {0}")]
    Compile(#[from] seccompiler::BackendError),
    #[error("seccomp: the filter has {0} instructions, more than the kernel accepts")]
    TooLong(usize),
}

/// A compiled filter, ready to install.
#[derive(Debug, Clone)]
pub struct Filter {
    program: BpfProgram,
    /// Some calls go to the supervisor: install with a listener.
    notify: bool,
    pub summary: Summary,
}

/// What the filter does, for `--dry-run` and the start event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub default_errno: &'static str,
    pub allowed: usize,
    pub allowed_if: Vec<(&'static str, String)>,
    pub enosys: Vec<&'static str>,
    pub notify: Vec<&'static str>,
    pub instructions: usize,
}

/// Compiles `policy` for the architecture agentd was built for.
pub fn compile(policy: &SeccompPolicy) -> Result<Filter, SeccompError> {
    let arch = syscalls::TARGET_ARCH.ok_or(SeccompError::UnsupportedArch)?;
    let default_errno = match policy.default_errno {
        "EPERM" => libc::EPERM,
        "EACCES" => libc::EACCES,
        "ENOSYS" => libc::ENOSYS,
        other => return Err(SeccompError::UnknownErrno(other.to_owned())),
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut nr = |name: &str| -> Result<i64, SeccompError> {
        if !seen.insert(name.to_owned()) {
            return Err(SeccompError::Duplicate(name.to_owned()));
        }
        syscalls::number(name).ok_or_else(|| SeccompError::UnknownSyscall(name.to_owned()))
    };

    let mut enosys = BTreeMap::new();
    for name in &policy.enosys {
        enosys.insert(nr(name)?, Vec::new());
    }
    let mut notify = BTreeMap::new();
    for name in &policy.notify {
        notify.insert(nr(name)?, Vec::new());
    }
    let mut allow: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for name in &policy.allow {
        allow.insert(nr(name)?, Vec::new());
    }
    let mut allowed_if = Vec::new();
    for (name, _) in &policy.allow_if {
        let (rules, shown) = arg_rules(name, policy)?;
        let nr = nr(name)?;
        // seccompiler reads an empty rule list as "always": a call whose conditions
        // cannot hold is left out, i.e. refused.
        if !rules.is_empty() {
            allow.insert(nr, rules);
        }
        allowed_if.push((*name, shown));
    }

    let mut program = Vec::new();
    if !enosys.is_empty() {
        let block = SeccompFilter::new(
            enosys,
            SeccompAction::Errno(SENTINEL_NEXT),
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )?;
        program.extend(patch_block(block.try_into()?));
    }
    if !notify.is_empty() {
        let block = SeccompFilter::new(
            notify,
            SeccompAction::Errno(SENTINEL_NEXT),
            SeccompAction::Errno(SENTINEL_NOTIFY),
            arch,
        )?;
        program.extend(patch_block(block.try_into()?));
    }
    let block = SeccompFilter::new(
        allow,
        SeccompAction::Errno(default_errno as u32),
        SeccompAction::Allow,
        arch,
    )?;
    let block: BpfProgram = block.try_into()?;
    program.extend(block);
    // BPF_MAXINSNS: the kernel refuses longer classic-BPF programs.
    if program.len() > 4096 {
        return Err(SeccompError::TooLong(program.len()));
    }

    Ok(Filter {
        notify: !policy.notify.is_empty(),
        summary: Summary {
            default_errno: policy.default_errno,
            allowed: policy.allow.len() + policy.allow_if.len(),
            allowed_if,
            enosys: policy.enosys.clone(),
            notify: policy.notify.clone(),
            instructions: program.len(),
        },
        program,
    })
}

/// The conditions under which `name` is allowed (any one rule; all conditions of a rule),
/// and how `--dry-run` shows them. No rule: never allowed.
fn arg_rules(
    name: &str,
    policy: &SeccompPolicy,
) -> Result<(Vec<SeccompRule>, String), SeccompError> {
    let cond = |arg, len, op, value| SeccompCondition::new(arg, len, op, value);
    // socket(domain, type, protocol) and socketpair(domain, type, protocol, sv): the three
    // are ints, so only their low 32 bits are compared (the kernel reads a domain of
    // 0x1_0000_0002 as AF_INET).
    let int_arg = |arg, value: i32| {
        cond(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            u64::from(value.cast_unsigned()),
        )
    };
    let sock_type = |value: i32| {
        cond(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(SOCK_TYPE_MASK),
            u64::from(value.cast_unsigned()),
        )
    };
    let unix_allowed = policy.socket_families.contains(&SocketFamily::Unix);
    match name {
        // Families other than AF_INET and AF_INET6 never reach cgroup/sock_create: this is
        // the only check of AF_UNIX, AF_NETLINK, AF_PACKET, ...
        "socket" => {
            let mut rules = Vec::new();
            let mut shown = Vec::new();
            for family in &policy.socket_families {
                match family {
                    SocketFamily::Unix => {
                        rules.push(SeccompRule::new(vec![int_arg(0, libc::AF_UNIX)?])?);
                        shown.push("AF_UNIX");
                    }
                    SocketFamily::Inet => {
                        for (ty, protocol) in INET_SOCKETS {
                            rules.push(SeccompRule::new(vec![
                                int_arg(0, libc::AF_INET)?,
                                sock_type(ty)?,
                                int_arg(2, protocol)?,
                            ])?);
                        }
                        shown.push("AF_INET (TCP, UDP)");
                    }
                    SocketFamily::Inet6 => {
                        for (ty, protocol) in INET_SOCKETS {
                            rules.push(SeccompRule::new(vec![
                                int_arg(0, libc::AF_INET6)?,
                                sock_type(ty)?,
                                int_arg(2, protocol)?,
                            ])?);
                        }
                        shown.push("AF_INET6 (TCP, UDP)");
                    }
                    SocketFamily::NetlinkRoute => {
                        rules.push(SeccompRule::new(vec![
                            int_arg(0, libc::AF_NETLINK)?,
                            int_arg(2, libc::NETLINK_ROUTE)?,
                        ])?);
                        shown.push("AF_NETLINK (NETLINK_ROUTE)");
                    }
                }
            }
            let shown = if shown.is_empty() {
                "never (no socket family allowed)".to_owned()
            } else {
                format!(
                    "domain {}; every other family and type refused",
                    shown.join(", ")
                )
            };
            Ok((rules, shown))
        }
        "socketpair" if unix_allowed => Ok((
            vec![SeccompRule::new(vec![int_arg(0, libc::AF_UNIX)?])?],
            "domain AF_UNIX".to_owned(),
        )),
        "socketpair" => Ok((Vec::new(), "never (AF_UNIX not allowed)".to_owned())),
        // clone(flags, ...): flags is an unsigned long; all namespace bits must be clear.
        "clone" => Ok((
            vec![SeccompRule::new(vec![cond(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(CLONE_NAMESPACE_FLAGS),
                0,
            )?])?],
            format!("flags & {CLONE_NAMESPACE_FLAGS:#x} == 0 (no namespaces)"),
        )),
        // ioctl(fd, request, ...): the kernel reads `request` as an unsigned int, so only
        // the low 32 bits are compared (comparing 64 bits would let 0x1_0000_5412 through
        // as TIOCSTI).
        "ioctl" => {
            let mut conditions = Vec::new();
            for (request, _) in DENIED_IOCTLS {
                conditions.push(cond(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, request)?);
            }
            Ok((
                vec![SeccompRule::new(conditions)?],
                format!("request not {}", DENIED_IOCTLS.map(|(_, n)| n).join(" or ")),
            ))
        }
        other => Err(SeccompError::UnknownArgRule(other.to_owned())),
    }
}

/// Rewrites a block's sentinel returns: `RET ERRNO(SENTINEL_NEXT)` becomes a jump to the
/// first instruction after the block, `RET ERRNO(SENTINEL_NOTIFY)` becomes
/// `RET USER_NOTIF`. Jumps inside a seccompiler block are forward and stay inside it, so
/// the block can be placed in front of another one.
fn patch_block(mut block: BpfProgram) -> BpfProgram {
    let ret_k = (libc::BPF_RET | libc::BPF_K) as u16;
    let len = block.len();
    for (i, ins) in block.iter_mut().enumerate() {
        if ins.code != ret_k {
            continue;
        }
        if ins.k == libc::SECCOMP_RET_ERRNO | SENTINEL_NEXT {
            // BPF_JA: pc += 1 + k; land on index `len`, the next block's first instruction.
            *ins = sock_filter {
                code: (libc::BPF_JMP | libc::BPF_JA) as u16,
                jt: 0,
                jf: 0,
                k: u32::try_from(len - 1 - i).unwrap_or(0),
            };
        } else if ins.k == libc::SECCOMP_RET_ERRNO | SENTINEL_NOTIFY {
            ins.k = libc::SECCOMP_RET_USER_NOTIF;
        }
    }
    block
}

impl Filter {
    /// Whether `execve` goes to the listener (the launch's own exec then waits for it).
    pub fn holds_exec(&self) -> bool {
        self.summary.notify.contains(&"execve")
    }
}

/// One call the filter handed to the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notif {
    pub id: u64,
    /// The calling thread.
    pub tid: u32,
    pub nr: i64,
    pub args: [u64; 6],
}

/// The user-notification listener (`SECCOMP_FILTER_FLAG_NEW_LISTENER`): a held call
/// sleeps in the kernel until it is answered, continue or fail.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
}

impl std::os::fd::AsRawFd for Listener {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.raw()
    }
}

impl Listener {
    pub fn new(fd: OwnedFd) -> Listener {
        Listener { fd }
    }

    pub fn raw(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }

    /// The next notification. Blocks when there is none (poll first); ENOENT means the
    /// caller died before it could be received: call again.
    pub fn recv(&self) -> std::io::Result<Notif> {
        // SAFETY: seccomp_notif is plain data; the kernel requires it zeroed.
        let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: SECCOMP_IOCTL_NOTIF_RECV writes one seccomp_notif to the pointer, which
        // points at a live one of the right size.
        let r = unsafe { libc::ioctl(self.raw(), libc::SECCOMP_IOCTL_NOTIF_RECV, &raw mut n) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Notif {
            id: n.id,
            tid: n.pid,
            nr: i64::from(n.data.nr),
            args: n.data.args,
        })
    }

    /// Asks for synchronous wake-ups (`SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP`, Linux 6.6):
    /// the calling thread and the one answering hand over on one CPU. Whether the kernel
    /// took it.
    pub fn sync_wake_up(&self) -> bool {
        /// `SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP` (include/uapi/linux/seccomp.h).
        const SYNC_WAKE_UP: u64 = 1;
        // SAFETY: SECCOMP_IOCTL_NOTIF_SET_FLAGS takes the flags as its argument, no pointer.
        unsafe {
            libc::ioctl(
                self.raw(),
                libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS,
                SYNC_WAKE_UP,
            ) == 0
        }
    }

    /// Waits up to `timeout` (None: for ever) for a call to take: `Some(true)` when one
    /// waits, `Some(false)` when the filter has no task left (hung up), None on timeout.
    pub fn wait(&self, timeout: Option<std::time::Duration>) -> std::io::Result<Option<bool>> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            let ms = deadline.map_or(-1, |d| {
                let left = d.saturating_duration_since(std::time::Instant::now());
                i32::try_from(left.as_millis()).unwrap_or(i32::MAX)
            });
            let mut pfd = libc::pollfd {
                fd: self.raw(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll reads and writes one pollfd, which is live.
            let r = unsafe { libc::poll(&raw mut pfd, 1, ms) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Ok(None);
            }
            return Ok(Some(pfd.revents & libc::POLLIN != 0));
        }
    }

    /// Whether the call `id` still waits (its thread is alive and the same).
    pub fn valid(&self, id: u64) -> bool {
        // SAFETY: SECCOMP_IOCTL_NOTIF_ID_VALID reads one u64 from the pointer.
        unsafe {
            libc::ioctl(
                self.raw(),
                libc::SECCOMP_IOCTL_NOTIF_ID_VALID,
                &raw const id,
            ) == 0
        }
    }

    fn send(&self, id: u64, error: i32, flags: u32) -> std::io::Result<()> {
        let mut resp = libc::seccomp_notif_resp {
            id,
            val: 0,
            error,
            flags,
        };
        // SAFETY: SECCOMP_IOCTL_NOTIF_SEND reads one seccomp_notif_resp from the pointer.
        let r = unsafe { libc::ioctl(self.raw(), libc::SECCOMP_IOCTL_NOTIF_SEND, &raw mut resp) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Lets the kernel run the call (every other check still applies to it).
    pub fn resume(&self, id: u64) -> std::io::Result<()> {
        // The flag is 1; the field is a u32.
        self.send(id, 0, libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32)
    }

    /// Fails the call with `errno` without running it.
    pub fn fail(&self, id: u64, errno: i32) -> std::io::Result<()> {
        self.send(id, -errno, 0)
    }
}

/// Lets through the launch's own `execve` of the agent's command (process `child`): the
/// first call the filter holds. Anything else held before it is refused.
pub fn let_launch_exec(
    listener: &OwnedFd,
    child: i32,
    timeout: std::time::Duration,
) -> std::io::Result<()> {
    let fd = listener.try_clone()?;
    let l = Listener::new(fd);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match l.wait(Some(left))? {
            Some(true) => {}
            // Hung up: the child died; its report (or EOF) tells why.
            Some(false) => return Ok(()),
            None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no exec within the launch timeout",
                ));
            }
        }
        let n = match l.recv() {
            Ok(n) => n,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINTR)) => continue,
            Err(e) => return Err(e),
        };
        let ours = i32::try_from(n.tid).is_ok_and(|t| t == child);
        if ours && (n.nr == libc::SYS_execve || n.nr == libc::SYS_execveat) {
            return l.resume(n.id);
        }
        l.fail(n.id, libc::ENOSYS)?;
    }
}

/// Installs `filter` on the calling thread (the child, single-threaded, after
/// `PR_SET_NO_NEW_PRIVS`). Returns the user-notification listener when the filter routes
/// calls to the supervisor. Called between fork and exec: no allocation.
///
/// seccompiler's `apply_filter` is not used because it cannot ask for a listener
/// (`SECCOMP_FILTER_FLAG_NEW_LISTENER`); the call is the same otherwise.
pub fn install(filter: &Filter) -> Result<Option<OwnedFd>, nix::Error> {
    let len = u16::try_from(filter.program.len()).map_err(|_| nix::Error::E2BIG)?;
    let prog = libc::sock_fprog {
        len,
        // seccompiler's sock_filter is #[repr(C)] with the kernel's layout (u16, u8, u8,
        // u32), identical to libc's.
        filter: filter
            .program
            .as_ptr()
            .cast::<libc::sock_filter>()
            .cast_mut(),
    };
    let flags = if filter.notify {
        libc::SECCOMP_FILTER_FLAG_NEW_LISTENER
    } else {
        0
    };
    // SAFETY: `prog` points to `len` valid instructions that outlive the call; the kernel
    // copies the program and does not keep the pointer.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &raw const prog,
        )
    };
    if rc < 0 {
        return Err(nix::Error::last());
    }
    if !filter.notify {
        return Ok(None);
    }
    let fd = i32::try_from(rc).map_err(|_| nix::Error::EBADF)?;
    // SAFETY: with NEW_LISTENER the kernel returned a fresh fd (O_CLOEXEC) that nothing
    // else owns.
    Ok(Some(unsafe {
        <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{CompileContext, compile as compile_policy, parse};

    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const AUDIT_ARCH_I386: u32 = 0x4000_0003;

    /// A classic-BPF interpreter for the instructions seccompiler emits, over a
    /// `struct seccomp_data` (nr, arch, ip, args[6]), so the filter's decisions are tested
    /// without installing it.
    fn eval(prog: &[sock_filter], arch: u32, nr: i64, args: [u64; 6]) -> u32 {
        let mut data = Vec::new();
        data.extend_from_slice(&(nr as i32).to_le_bytes());
        data.extend_from_slice(&arch.to_le_bytes());
        data.extend_from_slice(&0u64.to_le_bytes());
        for a in args {
            data.extend_from_slice(&a.to_le_bytes());
        }
        let word = |off: u32| {
            let o = off as usize;
            u32::from_le_bytes(data[o..o + 4].try_into().unwrap())
        };
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let ins = &prog[pc];
            let code = u32::from(ins.code);
            pc += 1;
            match code {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => acc = word(ins.k),
                c if c == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K => acc &= ins.k,
                c if c == libc::BPF_RET | libc::BPF_K => return ins.k,
                c if c == libc::BPF_JMP | libc::BPF_JA => pc += ins.k as usize,
                c if c & 0x07 == libc::BPF_JMP => {
                    let taken = match c & 0xf0 {
                        x if x == libc::BPF_JEQ => acc == ins.k,
                        x if x == libc::BPF_JGT => acc > ins.k,
                        x if x == libc::BPF_JGE => acc >= ins.k,
                        x if x == libc::BPF_JSET => acc & ins.k != 0,
                        other => panic!("unexpected jump {other:#x}"),
                    };
                    pc += usize::from(if taken { ins.jt } else { ins.jf });
                }
                other => panic!("unexpected instruction {other:#x}"),
            }
        }
    }

    fn policy() -> SeccompPolicy {
        let p = parse("t", crate::profile::builtin("analyze-only").unwrap()).unwrap();
        compile_policy(
            &p,
            &CompileContext {
                workspace: "/w".into(),
                home: "/h".into(),
            },
        )
        .seccomp
    }

    fn decide(f: &Filter, name: &str, args: [u64; 6]) -> u32 {
        eval(
            &f.program,
            AUDIT_ARCH_X86_64,
            syscalls::number(name).unwrap(),
            args,
        )
    }

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

    #[test]
    fn allow_list_and_default_eperm() {
        let f = compile(&policy()).unwrap();
        assert!(!f.notify);
        for name in ["read", "write", "openat", "execve", "exit_group", "futex"] {
            assert_eq!(decide(&f, name, [0; 6]), ALLOW, "{name}");
        }
        for name in [
            "ptrace",
            "mount",
            "unshare",
            "setns",
            "bpf",
            "io_uring_setup",
            "keyctl",
            "perf_event_open",
            "kexec_load",
            "init_module",
            "userfaultfd",
            "process_vm_readv",
            "open_by_handle_at",
        ] {
            assert_eq!(decide(&f, name, [0; 6]), EPERM, "{name}");
        }
        // a number no table names
        assert_eq!(eval(&f.program, AUDIT_ARCH_X86_64, 1000, [0; 6]), EPERM);
    }

    #[test]
    fn x32_and_other_abis_are_refused() {
        let f = compile(&policy()).unwrap();
        let read_x32 = 0x4000_0000 | syscalls::number("read").unwrap();
        assert_eq!(eval(&f.program, AUDIT_ARCH_X86_64, read_x32, [0; 6]), EPERM);
        assert_eq!(
            eval(&f.program, AUDIT_ARCH_I386, 3, [0; 6]),
            libc::SECCOMP_RET_KILL_PROCESS
        );
    }

    #[test]
    fn clone3_gets_enosys_and_clone_no_namespaces() {
        let f = compile(&policy()).unwrap();
        assert_eq!(decide(&f, "clone3", [0; 6]), ENOSYS);
        let fork_like = (libc::CLONE_CHILD_SETTID | libc::SIGCHLD) as u64;
        let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
        assert_eq!(decide(&f, "clone", [fork_like, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(decide(&f, "clone", [thread, 0, 0, 0, 0, 0]), ALLOW);
        for ns in [
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWNS,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWCGROUP,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUTS,
        ] {
            let flags = fork_like | ns as u64;
            assert_eq!(
                decide(&f, "clone", [flags, 0, 0, 0, 0, 0]),
                EPERM,
                "{ns:#x}"
            );
        }
    }

    #[test]
    fn ioctl_refuses_tiocsti_even_with_high_bits() {
        let f = compile(&policy()).unwrap();
        let tiocsti = libc::TIOCSTI;
        assert_eq!(decide(&f, "ioctl", [0, libc::TCGETS, 0, 0, 0, 0]), ALLOW);
        assert_eq!(decide(&f, "ioctl", [0, tiocsti, 0, 0, 0, 0]), EPERM);
        assert_eq!(
            decide(&f, "ioctl", [0, 1 << 32 | tiocsti, 0, 0, 0, 0]),
            EPERM
        );
        assert_eq!(decide(&f, "ioctl", [0, libc::TIOCLINUX, 0, 0, 0, 0]), EPERM);
    }

    /// The seccomp policy of a profile with a network rule: AF_UNIX, AF_INET, AF_INET6 and
    /// NETLINK_ROUTE sockets (`policy()`, analyze-only, has no NETLINK_ROUTE).
    fn networked() -> SeccompPolicy {
        let p = parse(
            "t",
            "[agent]\nname = \"t\"\n[network]\nconnect = [\"10.0.0.0/8:443\"]\n",
        )
        .unwrap();
        let ctx = CompileContext {
            workspace: "/w".into(),
            home: "/h".into(),
        };
        let c = compile_policy(&p, &ctx);
        assert_eq!(c.seccomp.socket_families, c.network.families);
        c.seccomp
    }

    const AF_UNIX: u64 = libc::AF_UNIX as u64;
    const AF_INET: u64 = libc::AF_INET as u64;
    const AF_INET6: u64 = libc::AF_INET6 as u64;
    const AF_NETLINK: u64 = libc::AF_NETLINK as u64;
    const AF_PACKET: u64 = libc::AF_PACKET as u64;
    const STREAM: u64 = libc::SOCK_STREAM as u64;
    const DGRAM: u64 = libc::SOCK_DGRAM as u64;
    const RAW: u64 = libc::SOCK_RAW as u64;
    const FLAGS: u64 = (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64;
    const TCP: u64 = libc::IPPROTO_TCP as u64;
    const UDP: u64 = libc::IPPROTO_UDP as u64;
    /// linux/net.h (deprecated in libc, still honoured by the kernel).
    const SOCK_PACKET: u64 = 10;
    const NETLINK_KOBJECT_UEVENT: u64 = libc::NETLINK_KOBJECT_UEVENT as u64;
    const ETH_P_ALL_BE: u64 = (libc::ETH_P_ALL as u16).to_be() as u64;

    fn socket(f: &Filter, domain: u64, ty: u64, protocol: u64) -> u32 {
        decide(f, "socket", [domain, ty, protocol, 0, 0, 0])
    }

    #[test]
    fn socket_families_without_network_rules_are_unix_tcp_udp() {
        let f = compile(&policy()).unwrap();
        assert_eq!(socket(&f, AF_UNIX, STREAM, 0), ALLOW);
        assert_eq!(socket(&f, AF_UNIX, DGRAM | FLAGS, 0), ALLOW);
        assert_eq!(socket(&f, AF_PACKET, RAW, ETH_P_ALL_BE), EPERM);
        assert_eq!(socket(&f, AF_NETLINK, RAW, NETLINK_KOBJECT_UEVENT), EPERM);
        assert_eq!(socket(&f, AF_NETLINK, RAW, 0), EPERM, "no NETLINK_ROUTE");
        // TCP and UDP sockets: their connects, datagrams and binds are the cgroup
        // programs' to refuse.
        assert_eq!(socket(&f, AF_INET, STREAM, 0), ALLOW);
        assert_eq!(socket(&f, AF_INET6, DGRAM, 0), ALLOW);
        assert_eq!(socket(&f, AF_INET, RAW, 0), EPERM);
        // The kernel reads the domain as an int: high bits change nothing.
        assert_eq!(socket(&f, 1 << 32 | AF_INET, RAW, 0), EPERM);
        assert_eq!(socket(&f, 1 << 32 | AF_UNIX, STREAM, 0), ALLOW);
        let pair = |domain| decide(&f, "socketpair", [domain, STREAM, 0, 0, 0, 0]);
        assert_eq!(pair(AF_UNIX), ALLOW);
        assert_eq!(pair(AF_INET), EPERM);
        assert_eq!(pair(AF_NETLINK), EPERM);
    }

    #[test]
    fn socket_families_with_network_rules_are_tcp_udp_and_netlink_route() {
        let f = compile(&networked()).unwrap();
        assert_eq!(socket(&f, AF_UNIX, STREAM, 0), ALLOW);
        for af in [AF_INET, AF_INET6] {
            assert_eq!(socket(&f, af, STREAM, 0), ALLOW, "{af}");
            assert_eq!(socket(&f, af, STREAM | FLAGS, TCP), ALLOW, "{af}");
            assert_eq!(socket(&f, af, DGRAM | libc::SOCK_CLOEXEC as u64, 0), ALLOW);
            assert_eq!(socket(&f, af, DGRAM, UDP), ALLOW, "{af}");
            // Raw sockets, in every spelling: refused here as by cgroup/sock_create.
            for protocol in [0, libc::IPPROTO_ICMP as u64, libc::IPPROTO_RAW as u64, TCP] {
                assert_eq!(socket(&f, af, RAW, protocol), EPERM, "{af} {protocol}");
                assert_eq!(socket(&f, af, RAW | FLAGS, protocol), EPERM);
            }
            // (AF_INET, SOCK_PACKET) is a packet socket to the kernel.
            assert_eq!(socket(&f, af, SOCK_PACKET, 0), EPERM);
            // Other protocols (ping sockets, SCTP) and mismatched pairs.
            assert_eq!(socket(&f, af, DGRAM, libc::IPPROTO_ICMP as u64), EPERM);
            assert_eq!(socket(&f, af, STREAM, libc::IPPROTO_SCTP as u64), EPERM);
            assert_eq!(socket(&f, af, STREAM, UDP), EPERM);
            assert_eq!(socket(&f, af, libc::SOCK_SEQPACKET as u64, 0), EPERM);
            // Protocol is an int too.
            assert_eq!(socket(&f, af, STREAM, 1 << 32 | TCP), ALLOW);
        }
        assert_eq!(socket(&f, AF_NETLINK, RAW, 0), ALLOW);
        assert_eq!(socket(&f, AF_NETLINK, DGRAM | FLAGS, 0), ALLOW);
        assert_eq!(socket(&f, AF_NETLINK, RAW, NETLINK_KOBJECT_UEVENT), EPERM);
        assert_eq!(socket(&f, AF_PACKET, RAW, ETH_P_ALL_BE), EPERM);
        assert_eq!(socket(&f, AF_PACKET, DGRAM, 0), EPERM);
        assert_eq!(socket(&f, libc::AF_BLUETOOTH as u64, STREAM, 0), EPERM);
        assert_eq!(
            socket(&f, libc::AF_ALG as u64, libc::SOCK_SEQPACKET as u64, 0),
            EPERM
        );
        let pair = |domain| decide(&f, "socketpair", [domain, STREAM, 0, 0, 0, 0]);
        assert_eq!(pair(AF_UNIX), ALLOW);
        assert_eq!(pair(AF_INET), EPERM);
        // The summary says what is allowed.
        let shown = |name| {
            f.summary
                .allowed_if
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, s)| s.clone())
                .unwrap()
        };
        assert!(
            shown("socket").contains("AF_NETLINK (NETLINK_ROUTE)"),
            "{}",
            shown("socket")
        );
        assert_eq!(shown("socketpair"), "domain AF_UNIX");
    }

    #[test]
    fn without_any_family_socket_calls_are_refused_not_allowed() {
        // An empty rule list would mean "always" to seccompiler: compile leaves the call
        // out instead.
        let mut p = policy();
        p.socket_families.clear();
        let f = compile(&p).unwrap();
        assert_eq!(socket(&f, AF_UNIX, STREAM, 0), EPERM);
        assert_eq!(
            decide(&f, "socketpair", [AF_UNIX, STREAM, 0, 0, 0, 0]),
            EPERM
        );
        assert_eq!(decide(&f, "read", [0; 6]), ALLOW);
    }

    #[test]
    fn notify_calls_go_to_the_listener_and_the_rest_is_unchanged() {
        let mut p = policy();
        p.allow.retain(|n| *n != "mkdir" && *n != "mkdirat");
        p.notify = vec!["mkdir", "mkdirat"];
        let f = compile(&p).unwrap();
        assert!(f.notify);
        assert_eq!(decide(&f, "mkdir", [0; 6]), libc::SECCOMP_RET_USER_NOTIF);
        assert_eq!(decide(&f, "mkdirat", [0; 6]), libc::SECCOMP_RET_USER_NOTIF);
        assert_eq!(decide(&f, "read", [0; 6]), ALLOW);
        assert_eq!(decide(&f, "clone3", [0; 6]), ENOSYS);
        assert_eq!(decide(&f, "ptrace", [0; 6]), EPERM);
        // no sentinel survives patching
        let ret = (libc::BPF_RET | libc::BPF_K) as u16;
        for ins in f.program.iter().filter(|i| i.code == ret) {
            assert_ne!(ins.k, libc::SECCOMP_RET_ERRNO | SENTINEL_NEXT, "{ins:?}");
            assert_ne!(ins.k, libc::SECCOMP_RET_ERRNO | SENTINEL_NOTIFY, "{ins:?}");
        }
    }

    #[test]
    fn unknown_names_and_duplicates_fail_closed() {
        let mut p = policy();
        p.allow.push("no_such_call");
        assert!(matches!(
            compile(&p),
            Err(SeccompError::UnknownSyscall(n)) if n == "no_such_call"
        ));
        let mut p = policy();
        p.allow.push("read");
        assert!(matches!(compile(&p), Err(SeccompError::Duplicate(_))));
        let mut p = policy();
        p.allow_if.push(("openat", "some condition"));
        p.allow.retain(|n| *n != "openat");
        assert!(matches!(compile(&p), Err(SeccompError::UnknownArgRule(_))));
    }
}
