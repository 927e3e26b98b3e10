//! Types shared by agentd's BPF programs and its user space.
//!
//! Everything here crosses the kernel/user boundary as raw bytes (ring-buffer records, map
//! keys and values), so every type is `#[repr(C)]`, has no implicit padding (explicit `_pad`
//! fields instead), and has its size and field offsets asserted in the tests below. Change a
//! layout here and both sides change together; never define one of these twice.
#![no_std]

/// Longest path (with its NUL) carried in an event. Longer paths are truncated and flagged
/// with [`EVENT_FLAG_PATH_TRUNCATED`].
pub const PATH_LEN: usize = 256;
/// `sizeof(sockaddr_un.sun_path)`: a unix-socket connect or bind event carries this much
/// of the name in `path` (length in `aux`; abstract names start with a NUL).
pub const UNIX_PATH_MAX: usize = 108;
const _: () = assert!(UNIX_PATH_MAX < PATH_LEN);
/// `TASK_COMM_LEN` in the kernel.
pub const COMM_LEN: usize = 16;

/// What an event reports. The numbering is ABI: append, never renumber.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Exec = 1,
    Fork = 2,
    Exit = 3,
    /// open/openat/openat2/creat with write, create or truncate intent.
    OpenWrite = 4,
    Unlink = 5,
    Rename = 6,
    Mkdir = 7,
    Rmdir = 8,
    Link = 9,
    Symlink = 10,
    Chmod = 11,
    Chown = 12,
    Truncate = 13,
    Setxattr = 14,
    Connect = 15,
    Sendmsg = 16,
    Bind = 17,
    SocketCreate = 18,
    /// Opening a canary path, in any mode.
    Canary = 19,
    /// A refused call of the ones watched at their exit only ([`Syscall::exit_only`]):
    /// `syscall` names it, `ret` is its -errno. No arguments: seccomp refuses before the
    /// entry tracepoint, and these calls have no entry program.
    Syscall = 20,
    /// An inbound TCP connection (a SYN) to an agent's socket on a port its policy does not
    /// let it bind, dropped by the cgroup ingress program. `port` is the local port, `addr`
    /// the peer; no process context (`pid` 0).
    Inbound = 21,
    /// An open for reading only (no write, create or truncate intent; directories and
    /// `O_PATH` included) that was refused. Successful reads are not reported.
    OpenRead = 22,
    /// A signal the agent was refused (EPERM): `dfd` is the target as the call named it
    /// (a pid, 0 or negative for a process group; a pidfd of the caller with
    /// [`EVENT_FLAG_PIDFD`]), `aux` the signal.
    Signal = 23,
}

impl EventKind {
    /// Every kind, for exhaustive decoding and tests.
    pub const ALL: [EventKind; 23] = [
        EventKind::Exec,
        EventKind::Fork,
        EventKind::Exit,
        EventKind::OpenWrite,
        EventKind::Unlink,
        EventKind::Rename,
        EventKind::Mkdir,
        EventKind::Rmdir,
        EventKind::Link,
        EventKind::Symlink,
        EventKind::Chmod,
        EventKind::Chown,
        EventKind::Truncate,
        EventKind::Setxattr,
        EventKind::Connect,
        EventKind::Sendmsg,
        EventKind::Bind,
        EventKind::SocketCreate,
        EventKind::Canary,
        EventKind::Syscall,
        EventKind::Inbound,
        EventKind::OpenRead,
        EventKind::Signal,
    ];

    pub fn from_raw(raw: u16) -> Option<EventKind> {
        let mut i = 0;
        while i < Self::ALL.len() {
            if Self::ALL[i] as u16 == raw {
                return Some(Self::ALL[i]);
            }
            i += 1;
        }
        None
    }
}

/// Which mechanism decided.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// Observed by a tracepoint: the verdict is the syscall's own result.
    Observed = 0,
    Landlock = 1,
    Seccomp = 2,
    /// A cgroup BPF program of agentd.
    Bpf = 3,
    BpfLsm = 4,
}

/// The verdict recorded in an event.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow = 0,
    Deny = 1,
    /// Denied because the agent's kill flag is set (the breaker tripped).
    Killed = 2,
}

/// The event's path was longer than [`PATH_LEN`] and was cut.
pub const EVENT_FLAG_PATH_TRUNCATED: u16 = 1 << 0;
/// The agent is in monitor mode: a `Deny` verdict was recorded but not enforced.
pub const EVENT_FLAG_MONITOR: u16 = 1 << 1;

/// One ring-buffer record. Written by the BPF programs, decoded once in user space.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RawEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the event was made.
    pub ktime_ns: u64,
    /// cgroup id (v2 directory inode) of the agent the process belongs to.
    pub agent_cgroup: u64,
    /// Kind-specific: the syscall's return value (fd, 0 or -errno) for file and exec events,
    /// the child's pid for fork, the raw `task_struct.exit_code` (status << 8 | signal) for
    /// exit, the protocol for socket creation, the call's result for a connect or bind
    /// reported at its exit (unix sockets; inet calls a host security module refused before
    /// the cgroup programs), the file's inode number for an exec the exec program refused
    /// ([`EXEC_REFUSED_SHIFT`]); 0 for the other network events.
    pub ret: i64,
    /// Kind-specific extra: open flags (open, openat, openat2's `open_how.flags`; creat is
    /// `O_CREAT|O_WRONLY|O_TRUNC`), mode for chmod and mkdir, `uid | gid << 32` for chown
    /// (`u32::MAX` = unchanged), length for truncate, flags for unlinkat, renameat2, linkat,
    /// execveat and setxattr, the socket type for network events, the length of the name in
    /// `path` for unix-socket connect and bind, the reason and device of an exec the exec
    /// program refused ([`EXEC_REFUSED_SHIFT`]).
    pub aux: u64,
    /// Thread group id (the user-visible pid).
    pub pid: u32,
    pub tid: u32,
    /// [`EventKind`] as u16.
    pub kind: u16,
    /// `EVENT_FLAG_*` bits.
    pub flags: u16,
    /// [`Layer`] as u8.
    pub layer: u8,
    /// [`Verdict`] as u8.
    pub verdict: u8,
    /// IPPROTO_TCP / IPPROTO_UDP for network events, else 0.
    pub proto: u8,
    /// [`Syscall`] as u8 for events of the syscall tracepoints, else 0.
    pub syscall: u8,
    /// Network events: IPv6 address, IPv4 as IPv4-mapped (::ffff:a.b.c.d).
    pub addr: [u8; 16],
    /// Network events: port in host byte order.
    pub port: u16,
    /// Network and socket events: AF_INET, AF_INET6 or AF_UNIX as the program saw it.
    pub family: u16,
    /// File events: the directory fd a relative `path` is resolved against (`AT_FDCWD` =
    /// -100 for the working directory). The kernel reads that directory into `dir`; when
    /// it could not, user space resolves the path through /proc while the process lives.
    pub dfd: i32,
    pub comm: [u8; COMM_LEN],
    /// NUL-terminated: the file, the source of a rename or link, the target (contents) of
    /// a symlink, the program of an exec.
    pub path: [u8; PATH_LEN],
    /// NUL-terminated: the destination of a rename or link, the symlink created, the
    /// attribute name of setxattr; for exec, [`EXEC_ARGS`] slots of [`EXEC_ARG_LEN`] bytes,
    /// each a NUL-terminated argv entry (argv[0], argv[1], ...); else empty.
    pub path2: [u8; PATH_LEN],
    /// Canary events the kernel matched by inode (the opened file is a canary or beneath
    /// one, whatever path led there): 1 + the canary's `CanaryKey::index`; else 0.
    pub canary: u32,
    /// Components in `dir` when [`EVENT_FLAG_DIR`] is set, else 0.
    pub dir_parts: u32,
    /// With [`EVENT_FLAG_DIR`]: the directory a relative path argument is resolved against
    /// (the working directory for `AT_FDCWD`, else the directory of `dfd`), read by the
    /// kernel at the call's entry, as its components from the innermost outwards, each
    /// NUL-terminated: `/home/u` is `u\0home\0`, `/` is empty. Else empty.
    pub dir: [u8; PATH_LEN],
}

/// An open with write, create or truncate intent (set on OpenWrite and Canary events).
pub const EVENT_FLAG_WRITE_INTENT: u16 = 1 << 2;
/// The syscall's exit was seen without its entry. On Linux the seccomp filter runs before
/// the `sys_enter` tracepoints but the `sys_exit` tracepoints still fire, so this is how a
/// call refused by seccomp shows up (no path: the arguments were never read).
pub const EVENT_FLAG_NO_ENTER: u16 = 1 << 3;
/// `path2` (or an exec argument) was longer than its buffer and was cut.
pub const EVENT_FLAG_PATH2_TRUNCATED: u16 = 1 << 4;

/// A Canary event the kernel could not decide: a read-only open of an agent with
/// canaries, whose path did not match as written (relative, or spelt with `//`, `.` or
/// `..`), refused with EACCES (Landlock refuses reads of canaries outside the read
/// rules), or successful but deeper than the inode walk goes ([`MAX_WALK_DEPTH`]). User
/// space resolves the path and keeps the event only if it is a canary.
pub const EVENT_FLAG_CANARY_CANDIDATE: u16 = 1 << 5;

/// The first path could not be read from the process's memory (a page not resident:
/// tracepoints cannot fault pages in), so `path` is empty. For a successful open, user
/// space resolves the path from the new fd (`ret`) while the process has it open.
pub const EVENT_FLAG_PATH_UNREAD: u16 = 1 << 6;

/// An OpenWrite event whose Canary event the kernel sent just before (the same open):
/// user space must not report the canary twice.
pub const EVENT_FLAG_CANARY_SENT: u16 = 1 << 7;

/// `RawEvent::dir` holds the directory a relative path argument is resolved against,
/// complete (every component up to the process's root, each one whole). Without it the
/// directory was not needed (absolute path) or could not be read (deeper than the
/// kernel walks, longer than [`PATH_LEN`], or not under the process's root).
pub const EVENT_FLAG_DIR: u16 = 1 << 8;

/// An `exec` event from the BPF LSM programs' `mmap_file`/`file_mprotect`: a mapping
/// with `PROT_EXEC` was refused; `dir` holds the mapped file's whole path (with
/// [`EVENT_FLAG_DIR`]), `aux` says which hook (0 mmap, 1 mprotect).
pub const EVENT_FLAG_MAPPED: u16 = 1 << 9;

/// The event tripped the agent's breaker in the kernel, in the call it reports: the kill
/// flag is set, and the calling process was sent SIGKILL before the call returned to user
/// space. User space writes `cgroup.kill` and keeps the records.
pub const EVENT_FLAG_TRIPPED: u16 = 1 << 10;
/// The calling process was stopped (SIGSTOP) before its refused call returned to user
/// space: the refusal is of a kind in the profile's `trip_on`, but only user space can tell
/// which layer refused it (Landlock, or the file's permissions). User space kills the agent
/// or resumes the process (SIGCONT).
pub const EVENT_FLAG_HELD: u16 = 1 << 11;

/// A `Signal` event whose target (`dfd`) is a pidfd of the calling process.
pub const EVENT_FLAG_PIDFD: u16 = 1 << 12;

/// Exec events the `sched_process_exec` program refused (layer [`Layer::Bpf`], no
/// syscall): why, in `aux >> EXEC_REFUSED_SHIFT`; the loaded file's `i_sb->s_dev` (kernel
/// encoding) in the low 32 bits of `aux` and its `i_ino` in `ret` (as u64), except for
/// [`EXEC_REFUSED_PSEUDO`] (both 0).
pub const EXEC_REFUSED_SHIFT: u32 = 32;
/// The program exec'd is a file no path names (a memfd or another pseudo file).
pub const EXEC_REFUSED_PSEUDO: u64 = 0;
/// The exec a person approved once (`EXEC_GRANT`) loaded another file than the one
/// approved: the path was swapped between the approval and the exec.
pub const EXEC_REFUSED_SWAPPED: u64 = 1;
/// A program the profile asks about (`ASK_EXEC`) was run without a live approval.
pub const EXEC_REFUSED_NOT_APPROVED: u64 = 2;

/// Exec events: argv entries carried in `path2`.
pub const EXEC_ARGS: usize = 4;
/// Exec events: bytes per argv slot in `path2`, with the NUL.
pub const EXEC_ARG_LEN: usize = PATH_LEN / EXEC_ARGS;

/// The system calls the tracepoints cover: the file/exec calls, observed at entry and
/// exit, and the calls watched at their exit only ([`Syscall::exit_only`]), whose refusals
/// are reported as [`EventKind::Syscall`]. The numbering is agentd's own (the same on every
/// architecture) and ABI: append, never renumber. This is the one place a call's name is
/// kept; user space maps the architecture's syscall numbers to these in the `SYSCALLS`
/// table.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syscall {
    Open = 1,
    Openat = 2,
    Openat2 = 3,
    Creat = 4,
    Unlink = 5,
    Unlinkat = 6,
    Rename = 7,
    Renameat = 8,
    Renameat2 = 9,
    Mkdir = 10,
    Mkdirat = 11,
    Rmdir = 12,
    Link = 13,
    Linkat = 14,
    Symlink = 15,
    Symlinkat = 16,
    Chmod = 17,
    Fchmodat = 18,
    Fchmodat2 = 19,
    Chown = 20,
    Fchownat = 21,
    Lchown = 22,
    Truncate = 23,
    Setxattr = 24,
    Lsetxattr = 25,
    Execve = 26,
    Execveat = 27,
    // Watched at their exit only (see `exit_only`): calls the seccomp filter refuses
    // (profile `DENY_NOTES`) or allows only under argument conditions (socket, socketpair).
    Ptrace = 28,
    ProcessVmReadv = 29,
    ProcessVmWritev = 30,
    PidfdGetfd = 31,
    Bpf = 32,
    PerfEventOpen = 33,
    Mount = 34,
    Umount2 = 35,
    PivotRoot = 36,
    Chroot = 37,
    OpenTree = 38,
    MoveMount = 39,
    Fsopen = 40,
    Fsmount = 41,
    Fsconfig = 42,
    Fspick = 43,
    MountSetattr = 44,
    Unshare = 45,
    Setns = 46,
    Keyctl = 47,
    AddKey = 48,
    RequestKey = 49,
    Userfaultfd = 50,
    IoUringSetup = 51,
    OpenByHandleAt = 52,
    NameToHandleAt = 53,
    KexecLoad = 54,
    KexecFileLoad = 55,
    InitModule = 56,
    FinitModule = 57,
    DeleteModule = 58,
    Personality = 59,
    ModifyLdt = 60,
    Iopl = 61,
    Ioperm = 62,
    Syslog = 63,
    Acct = 64,
    Swapon = 65,
    Swapoff = 66,
    Reboot = 67,
    Sethostname = 68,
    Setdomainname = 69,
    Settimeofday = 70,
    ClockSettime = 71,
    ClockAdjtime = 72,
    Adjtimex = 73,
    Quotactl = 74,
    FanotifyInit = 75,
    Kcmp = 76,
    MovePages = 77,
    MigratePages = 78,
    MemfdSecret = 79,
    ProcessMadvise = 80,
    LsmSetSelfAttr = 81,
    Vhangup = 82,
    Socket = 83,
    Socketpair = 84,
}

impl Syscall {
    pub const ALL: [Syscall; 84] = [
        Syscall::Open,
        Syscall::Openat,
        Syscall::Openat2,
        Syscall::Creat,
        Syscall::Unlink,
        Syscall::Unlinkat,
        Syscall::Rename,
        Syscall::Renameat,
        Syscall::Renameat2,
        Syscall::Mkdir,
        Syscall::Mkdirat,
        Syscall::Rmdir,
        Syscall::Link,
        Syscall::Linkat,
        Syscall::Symlink,
        Syscall::Symlinkat,
        Syscall::Chmod,
        Syscall::Fchmodat,
        Syscall::Fchmodat2,
        Syscall::Chown,
        Syscall::Fchownat,
        Syscall::Lchown,
        Syscall::Truncate,
        Syscall::Setxattr,
        Syscall::Lsetxattr,
        Syscall::Execve,
        Syscall::Execveat,
        Syscall::Ptrace,
        Syscall::ProcessVmReadv,
        Syscall::ProcessVmWritev,
        Syscall::PidfdGetfd,
        Syscall::Bpf,
        Syscall::PerfEventOpen,
        Syscall::Mount,
        Syscall::Umount2,
        Syscall::PivotRoot,
        Syscall::Chroot,
        Syscall::OpenTree,
        Syscall::MoveMount,
        Syscall::Fsopen,
        Syscall::Fsmount,
        Syscall::Fsconfig,
        Syscall::Fspick,
        Syscall::MountSetattr,
        Syscall::Unshare,
        Syscall::Setns,
        Syscall::Keyctl,
        Syscall::AddKey,
        Syscall::RequestKey,
        Syscall::Userfaultfd,
        Syscall::IoUringSetup,
        Syscall::OpenByHandleAt,
        Syscall::NameToHandleAt,
        Syscall::KexecLoad,
        Syscall::KexecFileLoad,
        Syscall::InitModule,
        Syscall::FinitModule,
        Syscall::DeleteModule,
        Syscall::Personality,
        Syscall::ModifyLdt,
        Syscall::Iopl,
        Syscall::Ioperm,
        Syscall::Syslog,
        Syscall::Acct,
        Syscall::Swapon,
        Syscall::Swapoff,
        Syscall::Reboot,
        Syscall::Sethostname,
        Syscall::Setdomainname,
        Syscall::Settimeofday,
        Syscall::ClockSettime,
        Syscall::ClockAdjtime,
        Syscall::Adjtimex,
        Syscall::Quotactl,
        Syscall::FanotifyInit,
        Syscall::Kcmp,
        Syscall::MovePages,
        Syscall::MigratePages,
        Syscall::MemfdSecret,
        Syscall::ProcessMadvise,
        Syscall::LsmSetSelfAttr,
        Syscall::Vhangup,
        Syscall::Socket,
        Syscall::Socketpair,
    ];

    pub fn from_raw(raw: u8) -> Option<Syscall> {
        let mut i = 0;
        while i < Self::ALL.len() {
            if Self::ALL[i] as u8 == raw {
                return Some(Self::ALL[i]);
            }
            i += 1;
        }
        None
    }

    /// The call's name, as in the seccomp lists and events; the tracepoints are named
    /// after it except where [`Syscall::tracepoint`] says otherwise.
    pub const fn name(self) -> &'static str {
        match self {
            Syscall::Open => "open",
            Syscall::Openat => "openat",
            Syscall::Openat2 => "openat2",
            Syscall::Creat => "creat",
            Syscall::Unlink => "unlink",
            Syscall::Unlinkat => "unlinkat",
            Syscall::Rename => "rename",
            Syscall::Renameat => "renameat",
            Syscall::Renameat2 => "renameat2",
            Syscall::Mkdir => "mkdir",
            Syscall::Mkdirat => "mkdirat",
            Syscall::Rmdir => "rmdir",
            Syscall::Link => "link",
            Syscall::Linkat => "linkat",
            Syscall::Symlink => "symlink",
            Syscall::Symlinkat => "symlinkat",
            Syscall::Chmod => "chmod",
            Syscall::Fchmodat => "fchmodat",
            Syscall::Fchmodat2 => "fchmodat2",
            Syscall::Chown => "chown",
            Syscall::Fchownat => "fchownat",
            Syscall::Lchown => "lchown",
            Syscall::Truncate => "truncate",
            Syscall::Setxattr => "setxattr",
            Syscall::Lsetxattr => "lsetxattr",
            Syscall::Execve => "execve",
            Syscall::Execveat => "execveat",
            Syscall::Ptrace => "ptrace",
            Syscall::ProcessVmReadv => "process_vm_readv",
            Syscall::ProcessVmWritev => "process_vm_writev",
            Syscall::PidfdGetfd => "pidfd_getfd",
            Syscall::Bpf => "bpf",
            Syscall::PerfEventOpen => "perf_event_open",
            Syscall::Mount => "mount",
            Syscall::Umount2 => "umount2",
            Syscall::PivotRoot => "pivot_root",
            Syscall::Chroot => "chroot",
            Syscall::OpenTree => "open_tree",
            Syscall::MoveMount => "move_mount",
            Syscall::Fsopen => "fsopen",
            Syscall::Fsmount => "fsmount",
            Syscall::Fsconfig => "fsconfig",
            Syscall::Fspick => "fspick",
            Syscall::MountSetattr => "mount_setattr",
            Syscall::Unshare => "unshare",
            Syscall::Setns => "setns",
            Syscall::Keyctl => "keyctl",
            Syscall::AddKey => "add_key",
            Syscall::RequestKey => "request_key",
            Syscall::Userfaultfd => "userfaultfd",
            Syscall::IoUringSetup => "io_uring_setup",
            Syscall::OpenByHandleAt => "open_by_handle_at",
            Syscall::NameToHandleAt => "name_to_handle_at",
            Syscall::KexecLoad => "kexec_load",
            Syscall::KexecFileLoad => "kexec_file_load",
            Syscall::InitModule => "init_module",
            Syscall::FinitModule => "finit_module",
            Syscall::DeleteModule => "delete_module",
            Syscall::Personality => "personality",
            Syscall::ModifyLdt => "modify_ldt",
            Syscall::Iopl => "iopl",
            Syscall::Ioperm => "ioperm",
            Syscall::Syslog => "syslog",
            Syscall::Acct => "acct",
            Syscall::Swapon => "swapon",
            Syscall::Swapoff => "swapoff",
            Syscall::Reboot => "reboot",
            Syscall::Sethostname => "sethostname",
            Syscall::Setdomainname => "setdomainname",
            Syscall::Settimeofday => "settimeofday",
            Syscall::ClockSettime => "clock_settime",
            Syscall::ClockAdjtime => "clock_adjtime",
            Syscall::Adjtimex => "adjtimex",
            Syscall::Quotactl => "quotactl",
            Syscall::FanotifyInit => "fanotify_init",
            Syscall::Kcmp => "kcmp",
            Syscall::MovePages => "move_pages",
            Syscall::MigratePages => "migrate_pages",
            Syscall::MemfdSecret => "memfd_secret",
            Syscall::ProcessMadvise => "process_madvise",
            Syscall::LsmSetSelfAttr => "lsm_set_self_attr",
            Syscall::Vhangup => "vhangup",
            Syscall::Socket => "socket",
            Syscall::Socketpair => "socketpair",
        }
    }

    /// The event kind a call reports (the BPF program refines: an open that hits a canary
    /// is [`EventKind::Canary`], `unlinkat(AT_REMOVEDIR)` is [`EventKind::Rmdir`]).
    pub const fn kind(self) -> EventKind {
        match self {
            Syscall::Open | Syscall::Openat | Syscall::Openat2 | Syscall::Creat => {
                EventKind::OpenWrite
            }
            Syscall::Unlink | Syscall::Unlinkat => EventKind::Unlink,
            Syscall::Rename | Syscall::Renameat | Syscall::Renameat2 => EventKind::Rename,
            Syscall::Mkdir | Syscall::Mkdirat => EventKind::Mkdir,
            Syscall::Rmdir => EventKind::Rmdir,
            Syscall::Link | Syscall::Linkat => EventKind::Link,
            Syscall::Symlink | Syscall::Symlinkat => EventKind::Symlink,
            Syscall::Chmod | Syscall::Fchmodat | Syscall::Fchmodat2 => EventKind::Chmod,
            Syscall::Chown | Syscall::Fchownat | Syscall::Lchown => EventKind::Chown,
            Syscall::Truncate => EventKind::Truncate,
            Syscall::Setxattr | Syscall::Lsetxattr => EventKind::Setxattr,
            Syscall::Execve | Syscall::Execveat => EventKind::Exec,
            Syscall::Ptrace
            | Syscall::ProcessVmReadv
            | Syscall::ProcessVmWritev
            | Syscall::PidfdGetfd
            | Syscall::Bpf
            | Syscall::PerfEventOpen
            | Syscall::Mount
            | Syscall::Umount2
            | Syscall::PivotRoot
            | Syscall::Chroot
            | Syscall::OpenTree
            | Syscall::MoveMount
            | Syscall::Fsopen
            | Syscall::Fsmount
            | Syscall::Fsconfig
            | Syscall::Fspick
            | Syscall::MountSetattr
            | Syscall::Unshare
            | Syscall::Setns
            | Syscall::Keyctl
            | Syscall::AddKey
            | Syscall::RequestKey
            | Syscall::Userfaultfd
            | Syscall::IoUringSetup
            | Syscall::OpenByHandleAt
            | Syscall::NameToHandleAt
            | Syscall::KexecLoad
            | Syscall::KexecFileLoad
            | Syscall::InitModule
            | Syscall::FinitModule
            | Syscall::DeleteModule
            | Syscall::Personality
            | Syscall::ModifyLdt
            | Syscall::Iopl
            | Syscall::Ioperm
            | Syscall::Syslog
            | Syscall::Acct
            | Syscall::Swapon
            | Syscall::Swapoff
            | Syscall::Reboot
            | Syscall::Sethostname
            | Syscall::Setdomainname
            | Syscall::Settimeofday
            | Syscall::ClockSettime
            | Syscall::ClockAdjtime
            | Syscall::Adjtimex
            | Syscall::Quotactl
            | Syscall::FanotifyInit
            | Syscall::Kcmp
            | Syscall::MovePages
            | Syscall::MigratePages
            | Syscall::MemfdSecret
            | Syscall::ProcessMadvise
            | Syscall::LsmSetSelfAttr
            | Syscall::Vhangup
            | Syscall::Socket
            | Syscall::Socketpair => EventKind::Syscall,
        }
    }

    /// Whether the entry program records every call of an agent. Opens are recorded only
    /// with write intent or on a canary, so for them a missing entry at exit means nothing.
    pub const fn records_every_call(self) -> bool {
        !matches!(
            self,
            Syscall::Open | Syscall::Openat | Syscall::Openat2 | Syscall::Creat
        )
    }

    /// Watched at the exit only: no entry program; the shared exit program reports the
    /// call when it fails with EPERM, EACCES or ENOSYS (what a seccomp filter answers).
    pub const fn exit_only(self) -> bool {
        matches!(self.kind(), EventKind::Syscall)
    }

    /// The kernel's name for the call's tracepoints (`syscalls/sys_exit_<tracepoint>`),
    /// which is the `SYSCALL_DEFINE` name: `umount2` is defined as `umount`.
    pub const fn tracepoint(self) -> &'static str {
        if matches!(self, Syscall::Umount2) {
            "umount"
        } else {
            self.name()
        }
    }
}

/// `unlinkat` flag: remove a directory.
pub const AT_REMOVEDIR: u64 = 0x200;

/// Per-agent state, value of the `AGENTS` map keyed by the agent's cgroup id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentState {
    /// Small id of the agent's policy in the network tries (see [`NetKey`]).
    pub policy_id: u32,
    /// `AGENT_FLAG_*` bits.
    pub flags: u32,
    /// The port of the agent's resolver on 127.0.0.1 and ::1, host byte order: its DNS
    /// traffic (port 53, any address) is steered there. 0: the profile names no domains,
    /// DNS is decided like any other traffic.
    pub dns_port: u16,
    pub _pad: u16,
}

/// The breaker tripped: deny all network, SIGKILL any process of the agent on a syscall.
pub const AGENT_FLAG_KILLED: u32 = 1 << 0;
/// Monitor mode: record denials, do not enforce them.
pub const AGENT_FLAG_MONITOR: u32 = 1 << 1;
/// `socket(AF_INET, ...)` allowed (TCP and UDP only; never SOCK_RAW).
pub const AGENT_FLAG_INET: u32 = 1 << 2;
/// `socket(AF_INET6, ...)` allowed (TCP and UDP only; never SOCK_RAW).
pub const AGENT_FLAG_INET6: u32 = 1 << 3;
/// `socket(AF_NETLINK, ..., NETLINK_ROUTE)` allowed. Recorded for completeness: Linux runs
/// `cgroup/sock_create` for AF_INET and AF_INET6 only, so netlink (like AF_PACKET) must be
/// refused by the seccomp filter.
pub const AGENT_FLAG_NETLINK_ROUTE: u32 = 1 << 4;
/// The agent has entries in `CANARIES`: open programs compare paths.
pub const AGENT_FLAG_CANARIES: u32 = 1 << 5;
/// The agent has a `protect` list: the BPF LSM programs check its file operations.
pub const AGENT_FLAG_PROTECT: u32 = 1 << 6;

/// The `trip_on` kinds of a profile whose breaker kills (enforced, `action = "kill"`), for
/// the kernel to act on in the violating call itself (see agentd-ebpf `maps::trip`). Set
/// at most for the kinds the profile lists; none in monitor mode.
pub const AGENT_FLAG_TRIP_CANARY: u32 = 1 << 8;
pub const AGENT_FLAG_TRIP_CONNECT: u32 = 1 << 9;
pub const AGENT_FLAG_TRIP_BIND: u32 = 1 << 10;
pub const AGENT_FLAG_TRIP_SOCKET: u32 = 1 << 11;
pub const AGENT_FLAG_TRIP_EXEC: u32 = 1 << 12;
pub const AGENT_FLAG_TRIP_WRITE: u32 = 1 << 13;
pub const AGENT_FLAG_TRIP_READ: u32 = 1 << 14;
pub const AGENT_FLAG_TRIP_SYSCALL: u32 = 1 << 15;
/// Set by the kernel at the agent's first successful exec (its program runs): the
/// `AGENT_FLAG_TRIP_*` bits count from then on. Before, a refusal is the launch sequence's
/// own (an exec the profile refuses fails the launch), not the agent's.
pub const AGENT_FLAG_ARMED: u32 = 1 << 16;
/// `breaker.on_event_loss = "kill"` (enforced): an event of the agent that does not fit in
/// the ring buffer trips it in the kernel at once (see agentd-ebpf `maps::count_lost`),
/// armed or not: from the first loss on, nothing the agent does goes unreported.
pub const AGENT_FLAG_KILL_ON_LOSS: u32 = 1 << 17;

/// Canary paths per agent (`CanaryKey::index` is dense from 0).
pub const MAX_CANARIES: u32 = 16;

/// Key of the `CANARIES` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CanaryKey {
    pub policy_id: u32,
    pub index: u32,
}

/// Value of the `CANARIES` map: an absolute path, matched as a prefix that ends at a
/// component boundary (`/a/b` matches `/a/b` and `/a/b/c`, not `/a/bc`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CanaryPath {
    /// Bytes of the path, without NUL; `1..PATH_LEN`.
    pub len: u32,
    pub _pad: u32,
    /// The path's bytes in memory order, zero-padded, as words so the program compares
    /// eight bytes at a time (little-endian: byte `i` is bits `8 * (i % 8)..` of word
    /// `i / 8`).
    pub words: [u64; PATH_LEN / 8],
}

/// Key of the `CANARY_INODES` map (value: the canary's `CanaryKey::index`): one inode of
/// a canary that existed when the agent was added. The exit of a successful open walks
/// from the opened dentry up its parents and looks each one up, so a canary is found
/// whatever path (relative, `..`, symlink, bind mount) the process opened it by.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CanaryInode {
    /// `inode.i_ino`.
    pub ino: u64,
    /// `inode.i_sb->s_dev`, in the kernel's internal encoding `major << 20 | minor`
    /// (not the `st_dev` encoding of stat(2)).
    pub dev: u32,
    /// [`AgentState::policy_id`].
    pub policy_id: u32,
}

/// Value bit of the `GUARDED` map (keyed like `CANARY_INODES`): this inode is a path of
/// the agent's `protect` list, so it and everything beneath it is read-only to the agent
/// (no open for write, create, remove, rename in or out, link, chmod, chown, truncate).
pub const GUARD_PROTECT: u32 = 1 << 0;
/// Value bit of the `GUARDED` map: this inode is a protected path or one of its
/// ancestors, and may not be renamed, removed or replaced (moving `.git` away and
/// rebuilding it would shed the protection of `.git/hooks`).
pub const GUARD_PIN: u32 = 1 << 1;

/// Paths a profile's `filesystem.protect` may list.
pub const MAX_PROTECT: u32 = 16;

/// Value bit of the `GUARDED` map: a `filesystem.write` path of the agent (it may write
/// beneath it).
pub const GUARD_WRITE_ROOT: u32 = 1 << 2;
/// Value bit of the `GUARDED` map: a `filesystem.exec` path of the agent. A file beneath
/// a write path and no exec path is code the agent could have written: BPF LSM refuses
/// to map it executable (`ld.so ./file`).
pub const GUARD_EXEC_ROOT: u32 = 1 << 3;

/// Bytes of a [`GuardedName`]'s name, NUL included: longer protected names are refused
/// when the profile is compiled.
pub const GUARDED_NAME_LEN: usize = 64;

/// Key of the `GUARDED_NAMES` map (value: `NAME_*` bits): a name `name` (NUL-padded) in
/// the directory `dir`.
/// - [`NAME_FORBID`]: a protected path that did not exist when the agent was added, as
///   its deepest existing ancestor and first missing component. The agent may not create
///   that name in that directory, so it cannot create the protected path either.
/// - [`NAME_UNIX_PEER`]: a pathname unix socket of the profile's `network.unix` list,
///   which the agent may connect to (matched by directory and name, so the socket a
///   service re-creates is the same).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuardedName {
    pub dir: CanaryInode,
    pub name: [u8; GUARDED_NAME_LEN],
}

/// Value bit of `GUARDED_NAMES`: the agent may not create this name.
pub const NAME_FORBID: u8 = 1 << 0;
/// Value bit of `GUARDED_NAMES`: a unix socket bound to this name is one the agent may
/// connect (and send datagrams) to.
pub const NAME_UNIX_PEER: u8 = 1 << 1;
/// Pathname unix sockets a profile's `network.unix` may list.
pub const MAX_UNIX_PEERS: u32 = 16;
/// A BPF LSM program refused an agent's unix-socket connect (agentd-ebpf `NetCall::lsm`).
pub const NET_LSM_REFUSED: u8 = 1;
/// A BPF LSM program would have refused it; the agent is in monitor mode.
pub const NET_LSM_MONITORED: u8 = 2;

/// Words (u64) the kernel reads at once from a struct whose neighbouring fields it needs
/// (a "window", see agentd-ebpf `vfs`): user space places each window and tells the
/// program which word holds which field.
pub const WINDOW_WORDS: usize = 4;

/// Levels the kernel walks up from a dentry: to match an opened file against
/// `CANARY_INODES`, and to read a relative path's directory into `RawEvent::dir`
/// (crossing a mount takes one level too). Deeper paths are not matched by inode, and
/// their directory is not captured.
pub const MAX_WALK_DEPTH: u32 = 32;

/// Index in the `CONFIG` array: bit `n` set = some agent's cgroup is at level `n` of the
/// cgroup v2 hierarchy (the root is level 0). The programs look up the current task's
/// ancestor at each such level, normally exactly one.
pub const CONFIG_CGROUP_LEVELS: u32 = 0;
/// Index in `CONFIG`: the lowest level set in `CONFIG_CGROUP_LEVELS`.
pub const CONFIG_LEVEL_MIN: u32 = 1;
/// Index in `CONFIG`: the highest level set in `CONFIG_CGROUP_LEVELS` (the programs scan
/// `MIN..=MAX` only: one level when all agents sit at the same depth).
pub const CONFIG_LEVEL_MAX: u32 = 2;
/// Index in `CONFIG`: non-zero while some agent may have its kill flag set. The programs on
/// every system call's entry and exit (`gate`) return at this one array read otherwise.
/// Set by the program that trips an agent (after the flag), and by user space; user space
/// clears it, then sets it again if an agent in `AGENTS` still has the flag.
pub const CONFIG_KILL_GATE: u32 = 3;
pub const CONFIG_LEN: u32 = 4;
/// Deepest agent cgroup level the programs check.
pub const MAX_CGROUP_LEVEL: u32 = 31;
/// Entries of the `SYSCALLS` array (architecture syscall number -> [`Syscall`] as u32,
/// with [`SYSCALL_EXIT_ONLY`] for the calls watched at their exit only).
pub const SYSCALL_TABLE_LEN: u32 = 1024;
/// Bit of a `SYSCALLS` value: the call is [`Syscall::exit_only`], so the exit program can
/// return at once on success without decoding the value or looking the task up.
pub const SYSCALL_EXIT_ONLY: u32 = 1 << 8;

/// Data part of a network-allow LPM-trie key. The kernel matches the first `prefixlen`
/// bits of this struct in memory order, so the exact-match fields come first and the
/// address last: `prefixlen = NET_KEY_FIXED_BITS + cidr bits` (an IPv4 CIDR is stored
/// IPv4-mapped, so its cidr bits are `96 + n`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetKey {
    /// [`AgentState::policy_id`], big-endian so the trie compares it as a number.
    pub policy_id_be: u32,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    pub _pad: u8,
    /// Port in network byte order; 0 stands for "any port" (a second lookup).
    pub port_be: u16,
    /// IPv6 address; IPv4 as ::ffff:a.b.c.d.
    pub addr: [u8; 16],
}

/// Bits of [`NetKey`] before the address: always matched exactly.
pub const NET_KEY_FIXED_BITS: u32 = 64;

/// Key of the `DNS_ALLOW` map: an address the agent's resolver admitted for a name the
/// profile allows, with the rule's protocol and port. The value is the CLOCK_MONOTONIC
/// nanosecond at which the admission expires.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DnsKey {
    /// The agent's cgroup id: admissions are the agent's own, never its policy's.
    pub cgroup_id: u64,
    /// IPv6 address; IPv4 as ::ffff:a.b.c.d.
    pub addr: [u8; 16],
    /// Port in network byte order; 0 stands for "any port" (a second lookup).
    pub port_be: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    pub _pad: [u8; 5],
}

/// Bit of a `DNS_ALLOW` value: the entry admits one connection (or one datagram) only,
/// a person's approval "once". The program that allows by it deletes it, and allows only
/// if its delete succeeded (two racing connects cannot both use it). The rest of the
/// value is the expiry as for any entry (CLOCK_MONOTONIC ns never reach 2^63).
pub const DNS_ALLOW_ONCE: u64 = 1 << 63;

/// Key of the `ASK_EXEC` map: a program (by inode) the agent's profile asks a person
/// about (`filesystem.ask_exec`). The value is the CLOCK_MONOTONIC ns until which the
/// agent may run it without asking again (0: every exec needs its own approval, given as
/// an [`ExecGrant`]). At exec the kernel kills an agent process that loaded such a file
/// with no live approval.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExecKey {
    /// The agent's cgroup id.
    pub cgroup_id: u64,
    /// `inode.i_sb->s_dev` in the kernel's encoding `major << 20 | minor` (not stat(2)'s
    /// `st_dev` encoding).
    pub dev: u64,
    /// `inode.i_ino`.
    pub ino: u64,
}

/// Value of the `EXEC_GRANT` map, keyed by the id (global tid) of the thread whose exec a
/// person approved once: the file approved. The kernel deletes it at that thread's next
/// exec, and kills the process if the file loaded is another one. A grant of another
/// agent than the exec's (a thread id reused) is deleted unused.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExecGrant {
    /// The agent's cgroup id.
    pub cgroup_id: u64,
    /// As [`ExecKey::dev`].
    pub dev: u64,
    /// As [`ExecKey::ino`].
    pub ino: u64,
}

/// Where a steered DNS socket of an agent meant to send (`DNS_ORIG`, by socket cookie),
/// for `recvmsg` to give its replies that source back.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsOrig {
    /// IPv6 address; IPv4 as ::ffff:a.b.c.d.
    pub addr: [u8; 16],
    /// Network byte order.
    pub port_be: u16,
    pub _pad: [u8; 6],
}

/// A socket of an agent that sent to the agent's resolver (`DNS_CLIENTS`, keyed by
/// [`dns_client_key`]): the resolver answers a query only from a socket its agent owns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsClient {
    /// The agent's cgroup id.
    pub cgroup_id: u64,
    /// CLOCK_MONOTONIC ns of the socket's last packet to the resolver.
    pub ktime_ns: u64,
}

/// `DNS_CLIENTS` key of the local socket (`proto`, IPv6 or not, `port` host order) that
/// sent to an agent's resolver on loopback.
pub const fn dns_client_key(proto: u8, v6: bool, port: u16) -> u32 {
    (proto as u32) | ((v6 as u32) << 8) | ((port as u32) << 16)
}

/// Key of the `BIND_ALLOW` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindKey {
    pub policy_id: u32,
    pub proto: u8,
    pub _pad: u8,
    /// Host byte order.
    pub port: u16,
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], made only of integers and byte arrays, with explicit
    // padding fields, so every bit pattern is a valid value and no byte is uninitialised.
    unsafe impl aya::Pod for super::RawEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AgentState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BindKey {}
    // SAFETY: repr(C), integers and byte arrays only, explicit padding.
    unsafe impl aya::Pod for super::DnsKey {}
    // SAFETY: repr(C), integers and byte arrays only, explicit padding.
    unsafe impl aya::Pod for super::DnsOrig {}
    // SAFETY: repr(C), two u64s, no padding.
    unsafe impl aya::Pod for super::DnsClient {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CanaryKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CanaryPath {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CanaryInode {}
    // SAFETY: as above (16 + 64 bytes, no padding).
    unsafe impl aya::Pod for super::GuardedName {}
    // SAFETY: repr(C), three u64s, no padding.
    unsafe impl aya::Pod for super::ExecKey {}
    // SAFETY: repr(C), three u64s, no padding.
    unsafe impl aya::Pod for super::ExecGrant {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn raw_event_layout() {
        assert_eq!(offset_of!(RawEvent, ktime_ns), 0);
        assert_eq!(offset_of!(RawEvent, agent_cgroup), 8);
        assert_eq!(offset_of!(RawEvent, ret), 16);
        assert_eq!(offset_of!(RawEvent, aux), 24);
        assert_eq!(offset_of!(RawEvent, pid), 32);
        assert_eq!(offset_of!(RawEvent, tid), 36);
        assert_eq!(offset_of!(RawEvent, kind), 40);
        assert_eq!(offset_of!(RawEvent, flags), 42);
        assert_eq!(offset_of!(RawEvent, layer), 44);
        assert_eq!(offset_of!(RawEvent, verdict), 45);
        assert_eq!(offset_of!(RawEvent, proto), 46);
        assert_eq!(offset_of!(RawEvent, addr), 48);
        assert_eq!(offset_of!(RawEvent, port), 64);
        assert_eq!(offset_of!(RawEvent, family), 66);
        assert_eq!(offset_of!(RawEvent, comm), 72);
        assert_eq!(offset_of!(RawEvent, path), 88);
        assert_eq!(offset_of!(RawEvent, path2), 88 + PATH_LEN);
        assert_eq!(offset_of!(RawEvent, canary), 88 + 2 * PATH_LEN);
        assert_eq!(offset_of!(RawEvent, dir_parts), 92 + 2 * PATH_LEN);
        assert_eq!(offset_of!(RawEvent, dir), 96 + 2 * PATH_LEN);
        assert_eq!(size_of::<RawEvent>(), 96 + 3 * PATH_LEN);
    }

    #[test]
    fn map_type_layouts() {
        assert_eq!(offset_of!(AgentState, dns_port), 8);
        assert_eq!(size_of::<AgentState>(), 12);
        assert_eq!(offset_of!(DnsKey, addr), 8);
        assert_eq!(offset_of!(DnsKey, port_be), 24);
        assert_eq!(offset_of!(DnsKey, proto), 26);
        assert_eq!(size_of::<DnsKey>(), 32);
        assert_eq!(offset_of!(DnsOrig, port_be), 16);
        assert_eq!(size_of::<DnsOrig>(), 24);
        assert_eq!(size_of::<DnsClient>(), 16);
        assert_eq!(dns_client_key(17, true, 0x1234), 17 | 1 << 8 | 0x1234 << 16);
        assert_eq!(offset_of!(NetKey, proto), 4);
        assert_eq!(offset_of!(NetKey, port_be), 6);
        assert_eq!(offset_of!(NetKey, addr), 8);
        assert_eq!(size_of::<NetKey>(), 24);
        assert_eq!(NET_KEY_FIXED_BITS as usize, offset_of!(NetKey, addr) * 8);
        assert_eq!(size_of::<BindKey>(), 8);
        assert_eq!(offset_of!(BindKey, port), 6);
        assert_eq!(size_of::<CanaryKey>(), 8);
        assert_eq!(offset_of!(CanaryPath, words), 8);
        assert_eq!(size_of::<CanaryPath>(), 8 + PATH_LEN);
        assert_eq!(offset_of!(CanaryInode, dev), 8);
        assert_eq!(offset_of!(CanaryInode, policy_id), 12);
        assert_eq!(size_of::<CanaryInode>(), 16);
        assert_eq!(offset_of!(ExecKey, dev), 8);
        assert_eq!(offset_of!(ExecKey, ino), 16);
        assert_eq!(size_of::<ExecKey>(), 24);
        assert_eq!(offset_of!(ExecGrant, dev), 8);
        assert_eq!(offset_of!(ExecGrant, ino), 16);
        assert_eq!(size_of::<ExecGrant>(), 24);
    }

    #[test]
    fn once_bit_and_exec_reasons_fit() {
        // CLOCK_MONOTONIC ns reach 2^63 after 292 years of uptime.
        assert_eq!(DNS_ALLOW_ONCE, 1 << 63);
        // The reason sits above a 32-bit s_dev.
        for r in [
            EXEC_REFUSED_PSEUDO,
            EXEC_REFUSED_SWAPPED,
            EXEC_REFUSED_NOT_APPROVED,
        ] {
            assert_eq!(
                (r << EXEC_REFUSED_SHIFT | u64::from(u32::MAX)) >> EXEC_REFUSED_SHIFT,
                r
            );
        }
    }

    #[test]
    fn raw_event_new_fields_fill_former_padding() {
        assert_eq!(offset_of!(RawEvent, syscall), 47);
        assert_eq!(offset_of!(RawEvent, dfd), 68);
        assert_eq!(
            offset_of!(RawEvent, path) % 8,
            0,
            "canary compare reads words"
        );
        assert_eq!(EXEC_ARGS * EXEC_ARG_LEN, PATH_LEN);
    }

    #[test]
    fn syscalls_round_trip_and_classify() {
        for s in Syscall::ALL {
            assert_eq!(Syscall::from_raw(s as u8), Some(s));
            assert!(!s.name().is_empty());
        }
        assert_eq!(Syscall::from_raw(0), None);
        assert_eq!(Syscall::Renameat2.kind(), EventKind::Rename);
        assert_eq!(Syscall::Execveat.kind(), EventKind::Exec);
        assert!(!Syscall::Openat2.records_every_call());
        assert!(Syscall::Unlinkat.records_every_call());
        assert_eq!(Syscall::Unshare.kind(), EventKind::Syscall);
        assert!(Syscall::Socket.exit_only() && !Syscall::Execve.exit_only());
        assert_eq!(Syscall::Umount2.name(), "umount2");
        assert_eq!(Syscall::Umount2.tracepoint(), "umount");
        assert_eq!(Syscall::Mount.tracepoint(), "mount");
    }

    #[test]
    fn syscall_numbering_is_dense_and_fits_the_flag() {
        for (i, s) in Syscall::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i + 1, "{s:?}");
            assert!((*s as u32) < SYSCALL_EXIT_ONLY);
        }
        // The numbering is ABI: these must never move.
        assert_eq!(Syscall::Execveat as u8, 27);
        assert_eq!(Syscall::Ptrace as u8, 28);
        assert_eq!(Syscall::Socketpair as u8, 84);
        assert_eq!(EventKind::Syscall as u16, 20);
    }

    #[test]
    fn event_kinds_round_trip() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::from_raw(k as u16), Some(k));
        }
        assert_eq!(EventKind::from_raw(0), None);
        assert_eq!(EventKind::from_raw(EventKind::ALL.len() as u16 + 1), None);
    }
}
