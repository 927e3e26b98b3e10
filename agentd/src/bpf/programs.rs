//! The programs of `agentd-ebpf` and where they attach.

use agentd_common::Syscall;
use aya::programs::CgroupSockAddrAttachType;

/// One covered syscall: its entry tracepoint (`sys_enter_<name>`) and the program attached
/// to it (of the same name, but [`OPEN_ENTRY`] for the open calls), the argument names its
/// format must list in order (checked before attaching), and its number on this
/// architecture.
#[derive(Debug, Clone, Copy)]
pub struct SyscallTracepoint {
    pub syscall: Syscall,
    pub tracepoint: &'static str,
    pub program: &'static str,
    pub args: &'static [&'static str],
    /// `None`: the call does not exist on this architecture (the legacy non-`at` calls on
    /// arm64), so there is nothing to attach.
    pub nr: Option<i64>,
}

/// `Some(libc::SYS_x)` where the architecture has the call.
macro_rules! legacy {
    ($sys:ident) => {{
        #[cfg(target_arch = "x86_64")]
        let nr = Some(libc::$sys);
        #[cfg(not(target_arch = "x86_64"))]
        let nr = None;
        nr
    }};
}

/// The entry program of the open calls (open, openat, openat2, creat), attached to each
/// one's `sys_enter_*` tracepoint: it tells them apart by the record's syscall number.
pub const OPEN_ENTRY: &str = "sys_enter_opens";

const fn tp(
    syscall: Syscall,
    tracepoint: &'static str,
    args: &'static [&'static str],
    nr: Option<i64>,
) -> SyscallTracepoint {
    // The calls not recorded at every entry are the open calls.
    let program = if syscall.records_every_call() {
        tracepoint
    } else {
        OPEN_ENTRY
    };
    SyscallTracepoint {
        syscall,
        tracepoint,
        program,
        args,
        nr,
    }
}

pub fn syscall_tracepoints() -> [SyscallTracepoint; 27] {
    use Syscall as S;
    [
        tp(
            S::Open,
            "sys_enter_open",
            &["filename", "flags", "mode"],
            legacy!(SYS_open),
        ),
        tp(
            S::Openat,
            "sys_enter_openat",
            &["dfd", "filename", "flags", "mode"],
            Some(libc::SYS_openat),
        ),
        tp(
            S::Openat2,
            "sys_enter_openat2",
            &["dfd", "filename", "how", "usize"],
            Some(libc::SYS_openat2),
        ),
        tp(
            S::Creat,
            "sys_enter_creat",
            &["pathname", "mode"],
            legacy!(SYS_creat),
        ),
        tp(
            S::Unlink,
            "sys_enter_unlink",
            &["pathname"],
            legacy!(SYS_unlink),
        ),
        tp(
            S::Unlinkat,
            "sys_enter_unlinkat",
            &["dfd", "pathname", "flag"],
            Some(libc::SYS_unlinkat),
        ),
        tp(
            S::Rename,
            "sys_enter_rename",
            &["oldname", "newname"],
            legacy!(SYS_rename),
        ),
        tp(
            S::Renameat,
            "sys_enter_renameat",
            &["olddfd", "oldname", "newdfd", "newname"],
            Some(libc::SYS_renameat),
        ),
        tp(
            S::Renameat2,
            "sys_enter_renameat2",
            &["olddfd", "oldname", "newdfd", "newname", "flags"],
            Some(libc::SYS_renameat2),
        ),
        tp(
            S::Mkdir,
            "sys_enter_mkdir",
            &["pathname", "mode"],
            legacy!(SYS_mkdir),
        ),
        tp(
            S::Mkdirat,
            "sys_enter_mkdirat",
            &["dfd", "pathname", "mode"],
            Some(libc::SYS_mkdirat),
        ),
        tp(
            S::Rmdir,
            "sys_enter_rmdir",
            &["pathname"],
            legacy!(SYS_rmdir),
        ),
        tp(
            S::Link,
            "sys_enter_link",
            &["oldname", "newname"],
            legacy!(SYS_link),
        ),
        tp(
            S::Linkat,
            "sys_enter_linkat",
            &["olddfd", "oldname", "newdfd", "newname", "flags"],
            Some(libc::SYS_linkat),
        ),
        tp(
            S::Symlink,
            "sys_enter_symlink",
            &["oldname", "newname"],
            legacy!(SYS_symlink),
        ),
        tp(
            S::Symlinkat,
            "sys_enter_symlinkat",
            &["oldname", "newdfd", "newname"],
            Some(libc::SYS_symlinkat),
        ),
        tp(
            S::Chmod,
            "sys_enter_chmod",
            &["filename", "mode"],
            legacy!(SYS_chmod),
        ),
        tp(
            S::Fchmodat,
            "sys_enter_fchmodat",
            &["dfd", "filename", "mode"],
            Some(libc::SYS_fchmodat),
        ),
        tp(
            S::Fchmodat2,
            "sys_enter_fchmodat2",
            &["dfd", "filename", "mode", "flags"],
            Some(libc::SYS_fchmodat2),
        ),
        tp(
            S::Chown,
            "sys_enter_chown",
            &["filename", "user", "group"],
            legacy!(SYS_chown),
        ),
        tp(
            S::Fchownat,
            "sys_enter_fchownat",
            &["dfd", "filename", "user", "group", "flag"],
            Some(libc::SYS_fchownat),
        ),
        tp(
            S::Lchown,
            "sys_enter_lchown",
            &["filename", "user", "group"],
            legacy!(SYS_lchown),
        ),
        tp(
            S::Truncate,
            "sys_enter_truncate",
            &["path", "length"],
            Some(libc::SYS_truncate),
        ),
        tp(
            S::Setxattr,
            "sys_enter_setxattr",
            &["pathname", "name", "value", "size", "flags"],
            Some(libc::SYS_setxattr),
        ),
        tp(
            S::Lsetxattr,
            "sys_enter_lsetxattr",
            &["pathname", "name", "value", "size", "flags"],
            Some(libc::SYS_lsetxattr),
        ),
        tp(
            S::Execve,
            "sys_enter_execve",
            &["filename", "argv", "envp"],
            Some(libc::SYS_execve),
        ),
        tp(
            S::Execveat,
            "sys_enter_execveat",
            &["fd", "filename", "argv", "envp", "flags"],
            Some(libc::SYS_execveat),
        ),
    ]
}

/// One call watched at its exit only ([`Syscall::exit_only`]): the shared exit program is
/// attached to its `sys_exit_*` tracepoint and reports its refusals.
#[derive(Debug, Clone)]
pub struct ExitOnlyTracepoint {
    pub syscall: Syscall,
    /// `sys_exit_<name>`, named as the kernel defines the call (`umount2` is `umount`).
    pub tracepoint: String,
    /// Its number on this architecture, from the table the seccomp filter is built with;
    /// `None` where the call does not exist.
    pub nr: Option<i64>,
}

/// The calls watched at their exit only: the dangerous calls the seccomp filter refuses
/// (the profile's `DENY_NOTES`) and the socket calls it allows only for some families.
/// io_uring_enter and io_uring_register are left out: without io_uring_setup (watched and
/// refused) an agent has no ring to use them on, and they are hot paths for io_uring users
/// elsewhere on the host.
pub fn exit_only_tracepoints() -> Vec<ExitOnlyTracepoint> {
    Syscall::ALL
        .iter()
        .filter(|s| s.exit_only())
        .map(|&syscall| ExitOnlyTracepoint {
            syscall,
            tracepoint: format!("sys_exit_{}", syscall.tracepoint()),
            nr: crate::syscalls::number(syscall.name()),
        })
        .collect()
}

/// The exit program shared by every covered call.
pub const SYS_EXIT: &str = "sys_exit";
/// tp_btf programs: (program, BTF tracepoint). The exit program is one of
/// [`PROCESS_EXIT_PROGRAMS`], chosen by the tracepoint's prototype.
pub const PROCESS_TRACEPOINTS: [(&str, &str); 2] = [
    ("sched_process_fork", "sched_process_fork"),
    ("sched_process_exec", "sched_process_exec"),
];
/// The kill gate (agentd-ebpf `gate`): tp_btf programs on every system call's entry and
/// exit, (program, BTF tracepoint).
pub const GATE_TRACEPOINTS: [(&str, &str); 2] = [
    ("gate_sys_enter", "sys_enter"),
    ("gate_sys_exit", "sys_exit"),
];
/// The BTF tracepoint of process exits.
pub const PROCESS_EXIT: &str = "sched_process_exit";
/// Its programs: (program, arguments of the tracepoint it reads). Kernels from 6.16 pass
/// `(p, group_dead)`, older ones `(p)`; the verifier refuses a program that reads an
/// argument the prototype lacks, so the loader picks the one the kernel's BTF matches.
pub const PROCESS_EXIT_PROGRAMS: [(&str, usize); 2] =
    [("sched_process_exit", 2), ("sched_process_exit_leader", 1)];

/// connect() and bind(), watched for unix sockets and for what a host security module
/// refuses before the cgroup programs run (see agentd-ebpf's `net`): (call, entry program attached to `sys_enter_<call>`,
/// the argument names its format must list in order). Their exit program is
/// [`SYS_EXIT_SOCKADDR`], attached to `sys_exit_<call>`.
pub const SOCKADDR_TRACEPOINTS: [(&str, &str, &[&str]); 2] = [
    (
        "connect",
        "sys_enter_connect",
        &["fd", "uservaddr", "addrlen"],
    ),
    ("bind", "sys_enter_bind", &["fd", "umyaddr", "addrlen"]),
];
/// The exit program of [`SOCKADDR_TRACEPOINTS`].
pub const SYS_EXIT_SOCKADDR: &str = "sys_exit_sockaddr";

/// The signal calls, watched for the signals an agent is refused (agentd-ebpf's
/// `signal`): (call, entry program, argument names), as [`SOCKADDR_TRACEPOINTS`]. Their
/// exit program is [`SYS_EXIT_SIGNAL`].
pub const SIGNAL_TRACEPOINTS: [(&str, &str, &[&str]); 6] = [
    ("kill", "sys_enter_kill", &["pid", "sig"]),
    ("tkill", "sys_enter_tkill", &["pid", "sig"]),
    ("tgkill", "sys_enter_tgkill", &["tgid", "pid", "sig"]),
    (
        "rt_sigqueueinfo",
        "sys_enter_rt_sigqueueinfo",
        &["pid", "sig", "uinfo"],
    ),
    (
        "rt_tgsigqueueinfo",
        "sys_enter_rt_tgsigqueueinfo",
        &["tgid", "pid", "sig", "uinfo"],
    ),
    (
        "pidfd_send_signal",
        "sys_enter_pidfd_send_signal",
        &["pidfd", "sig", "info", "flags"],
    ),
];
/// The exit program of [`SIGNAL_TRACEPOINTS`].
pub const SYS_EXIT_SIGNAL: &str = "sys_exit_signal";

/// cgroup/sock_addr programs attached to each agent's cgroup.
pub const SOCK_ADDR_PROGRAMS: [(&str, CgroupSockAddrAttachType); 8] = [
    ("connect4", CgroupSockAddrAttachType::Connect4),
    ("connect6", CgroupSockAddrAttachType::Connect6),
    ("sendmsg4", CgroupSockAddrAttachType::UDPSendMsg4),
    ("sendmsg6", CgroupSockAddrAttachType::UDPSendMsg6),
    ("bind4", CgroupSockAddrAttachType::Bind4),
    ("bind6", CgroupSockAddrAttachType::Bind6),
    ("recvmsg4", CgroupSockAddrAttachType::UDPRecvMsg4),
    ("recvmsg6", CgroupSockAddrAttachType::UDPRecvMsg6),
];
/// cgroup/sock_create, attached to each agent's cgroup.
pub const SOCK_CREATE: &str = "sock_create";
/// The `cgroup_skb/ingress` program that drops inbound TCP connection requests to ports
/// the agent may not bind (attached per agent, like the others).
pub const INBOUND: &str = "inbound";
/// The `cgroup_skb/egress` program that records which sockets of agents send to their
/// resolvers (attached per agent).
pub const OUTBOUND: &str = "outbound";

/// The BPF LSM programs and their hooks (agentd-ebpf `lsm`): attached where the kernel
/// accepts LSM programs, all or none.
pub const LSM_PROGRAMS: [(&str, &str); 16] = [
    ("lsm_file_open", "file_open"),
    ("lsm_path_mknod", "path_mknod"),
    ("lsm_path_mkdir", "path_mkdir"),
    ("lsm_path_symlink", "path_symlink"),
    ("lsm_path_link", "path_link"),
    ("lsm_path_unlink", "path_unlink"),
    ("lsm_path_rmdir", "path_rmdir"),
    ("lsm_path_rename", "path_rename"),
    ("lsm_path_truncate", "path_truncate"),
    ("lsm_path_chmod", "path_chmod"),
    ("lsm_path_chown", "path_chown"),
    ("lsm_bprm_check", "bprm_check_security"),
    ("lsm_mmap_file", "mmap_file"),
    ("lsm_file_mprotect", "file_mprotect"),
    ("lsm_unix_stream_connect", "unix_stream_connect"),
    ("lsm_unix_may_send", "unix_may_send"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_syscall_has_one_tracepoint_named_after_it() {
        let tps = syscall_tracepoints();
        for s in Syscall::ALL.into_iter().filter(|s| !s.exit_only()) {
            let t: Vec<_> = tps.iter().filter(|t| t.syscall == s).collect();
            assert_eq!(t.len(), 1, "{s:?}");
            assert_eq!(t[0].tracepoint, format!("sys_enter_{}", s.name()));
            // The open calls share their entry program; every other call has its own.
            let program = if s.records_every_call() {
                t[0].tracepoint
            } else {
                OPEN_ENTRY
            };
            assert_eq!(t[0].program, program, "{s:?}");
        }
    }

    #[test]
    fn syscall_numbers_fit_the_table() {
        let nrs = syscall_tracepoints()
            .into_iter()
            .filter_map(|t| t.nr)
            .chain(exit_only_tracepoints().into_iter().filter_map(|t| t.nr));
        for nr in nrs {
            assert!((0..i64::from(agentd_common::SYSCALL_TABLE_LEN)).contains(&nr));
        }
    }

    /// The exit-only calls are the profile's documented refusals (but the two io_uring
    /// calls) and the socket calls with argument rules, and nothing else.
    #[test]
    fn exit_only_calls_match_the_seccomp_policy() {
        let profile =
            crate::profile::parse("t", "[agent]\nname = \"t\"\n").unwrap_or_else(|e| panic!("{e}"));
        let policy = crate::profile::compile(
            &profile,
            &crate::profile::CompileContext {
                workspace: "/w".into(),
                home: "/h".into(),
            },
        )
        .seccomp;
        let watched: Vec<&str> = exit_only_tracepoints()
            .iter()
            .map(|t| t.syscall.name())
            .collect();
        for (name, _) in &policy.deny_notes {
            let left_out = matches!(*name, "io_uring_enter" | "io_uring_register");
            assert_eq!(watched.contains(name), !left_out, "{name}");
        }
        for name in &watched {
            let documented = policy.deny_notes.iter().any(|(n, _)| n == name);
            let conditional = policy.allow_if.iter().any(|(n, _)| n == name);
            assert!(
                documented || conditional,
                "{name} is watched but not refused"
            );
            assert!(!policy.allow.contains(name), "{name} is allowed outright");
        }
        assert!(watched.contains(&"socket") && watched.contains(&"socketpair"));
        #[cfg(target_arch = "x86_64")]
        {
            for t in exit_only_tracepoints() {
                assert!(t.nr.is_some(), "{} has no number", t.syscall.name());
            }
            let umount = exit_only_tracepoints()
                .into_iter()
                .find(|t| t.syscall == Syscall::Umount2)
                .map(|t| (t.tracepoint, t.nr));
            assert_eq!(
                umount,
                Some(("sys_exit_umount".into(), Some(libc::SYS_umount2)))
            );
        }
    }
}
