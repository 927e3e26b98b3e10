//! The probes behind `agentd doctor`. Each one does the thing (makes the syscall, loads and
//! attaches the program, writes the cgroup file) and turns the kernel's answer into a
//! [`Status`]; none reads a configuration file to guess.
//!
//! Side effects, all undone except the mounts: a scratch cgroup `agentd-doctor-<pid>` under
//! the v2 mount (removed before returning, also when a probe fails or panics); the probe
//! programs are attached for the duration of the probe (they allow everything and return
//! the previous verdict); tracefs and securityfs are mounted when they were not, which is
//! reported, and stay mounted as agentd needs them.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Btf, BtfError, Ebpf, EbpfError, EbpfLoader,
    maps::{MapError, RingBuf},
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSock, CgroupSockAddr, Lsm, Program, ProgramError,
        TracePoint, TracePointError,
    },
    sys::SyscallError,
};
use caps::{CapSet, Capability};
use nix::errno::Errno;

use super::{
    Bpf, Cgroup, Controller, Filesystem, Findings, Landlock, MountState, Mounts, Root, Seccomp,
    SeccompMode, Status, Unavailable,
};
use crate::{
    bpf::{self, BPFFS, EBPF_OBJECT, MountError, SECURITYFS, TRACEFS},
    host::{self, Mount},
};

/// `landlock_create_ruleset` flag: return the highest supported ABI version (uapi
/// linux/landlock.h; not in the libc crate).
const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1 << 0;

/// The tracepoint the tracepoint and tp_btf probes attach to: fires on every fork, costs
/// nothing measurable for a program that returns at once.
const TRACEPOINT: (&str, &str) = ("sched", "sched_process_fork");

/// The LSM hook the LSM probe attaches to.
const LSM_HOOK: &str = "file_open";

/// Runs every probe, in an order where each finds what it needs: mounts first (the LSM
/// list needs securityfs, tracepoints need tracefs), the scratch cgroup before the cgroup
/// and BPF probes, and the scratch cgroup removed after the BPF programs are gone.
pub fn probe_host() -> Findings {
    let mut notes = Vec::new();
    let root = root(&mut notes);
    let privileged = root.privileged();

    let securityfs = ensure_filesystem(SECURITYFS, privileged);
    let tracefs = ensure_filesystem(TRACEFS, privileged);
    let mounts = match host::mounts() {
        Ok(m) => m,
        Err(e) => {
            notes.push(format!("cannot read /proc/self/mountinfo: {e}"));
            Vec::new()
        }
    };
    let bpffs = Filesystem {
        path: BPFFS.1,
        state: if is_mounted(&mounts, BPFFS) {
            MountState::Mounted
        } else {
            MountState::NotMounted(None)
        },
    };
    let lsm = match bpf::active_lsms() {
        Ok(list) => Some(list),
        Err(e) => {
            notes.push(format!("cannot read {}: {e}", bpf::LSM_LIST));
            None
        }
    };

    let cgroup_mount = host::cgroup2_mount(&mounts);
    let scratch = match &cgroup_mount {
        Some(m) => ScratchCgroup::create(m, privileged),
        None => Err(Unavailable::Missing("cgroup v2 is not mounted".into())),
    };
    let cgroup = cgroup(cgroup_mount, &mounts, scratch.as_ref(), privileged);
    let bpf_lsm_active = lsm.as_ref().map(|l| l.iter().any(|m| m == "bpf"));
    let bpf = bpf(privileged, scratch.as_ref(), bpf_lsm_active);
    if let Ok(s) = scratch
        && let Err(e) = s.remove()
    {
        notes.push(e);
    }

    Findings {
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|s| s.trim().to_owned()),
        root,
        landlock: landlock(),
        seccomp: seccomp(),
        cgroup,
        bpf,
        mounts: Mounts {
            bpffs,
            tracefs,
            securityfs,
            lsm,
            overlay: fs::read_to_string("/proc/filesystems").is_ok_and(|t| {
                t.lines()
                    .any(|l| l.split_whitespace().last() == Some("overlay"))
            }),
        },
        notes,
    }
}

/// An errno from a call that may need privilege: EPERM and EACCES mean "needs root" when
/// agentd is not privileged, and the kernel's refusal when it is.
fn refusal(call: &'static str, errno: Errno, privileged: bool) -> Unavailable {
    let denied = errno == Errno::EPERM || errno == Errno::EACCES;
    if denied && !privileged {
        Unavailable::NeedsRoot { call, errno }
    } else {
        Unavailable::Refused { call, errno }
    }
}

fn io_refusal(call: &'static str, e: &io::Error, privileged: bool) -> Unavailable {
    match e.raw_os_error() {
        Some(n) => refusal(call, Errno::from_raw(n), privileged),
        None => Unavailable::Failed(format!("{call}: {e}")),
    }
}

fn root(notes: &mut Vec<String>) -> Root {
    let mut effective = |cap: Capability| match caps::has_cap(None, CapSet::Effective, cap) {
        Ok(has) => has,
        Err(e) => {
            notes.push(format!("cannot read the effective capabilities: {e}"));
            false
        }
    };
    Root {
        euid: nix::unistd::geteuid().as_raw(),
        cap_sys_admin: effective(Capability::CAP_SYS_ADMIN),
        cap_bpf: effective(Capability::CAP_BPF),
    }
}

fn is_mounted(mounts: &[Mount], (fstype, dir): (&str, &str)) -> bool {
    mounts
        .iter()
        .any(|m| m.mount_point == Path::new(dir) && m.fstype == fstype)
}

/// Mounts the filesystem when it is not mounted (agentd needs it to run) and says so.
fn ensure_filesystem(fs: (&'static str, &'static str), privileged: bool) -> Filesystem {
    let state = match bpf::ensure_mounted(fs) {
        Ok(false) => MountState::Mounted,
        Ok(true) => MountState::MountedByDoctor,
        Err(MountError::Mount { source, .. }) => {
            MountState::NotMounted(Some(refusal("mount", source, privileged)))
        }
        Err(e @ MountError::MountInfo(_)) => {
            MountState::NotMounted(Some(Unavailable::Failed(e.to_string())))
        }
    };
    Filesystem { path: fs.1, state }
}

fn landlock() -> Landlock {
    // SAFETY: with a null attribute pointer, size 0 and LANDLOCK_CREATE_RULESET_VERSION the
    // kernel reads no memory, creates nothing and returns the ABI version or an error.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if ret < 0 {
        return Landlock {
            abi: None,
            status: Status::Unusable(Unavailable::Refused {
                call: "landlock_create_ruleset",
                errno: Errno::last(),
            }),
        };
    }
    match u32::try_from(ret) {
        Ok(abi) if abi >= 1 => Landlock {
            abi: Some(abi),
            status: Status::Usable,
        },
        Ok(_) | Err(_) => Landlock {
            abi: None,
            status: Status::Unusable(Unavailable::Failed(format!(
                "landlock_create_ruleset returned ABI {ret}"
            ))),
        },
    }
}

/// Asks the kernel whether it knows a seccomp filter return action.
fn seccomp_action(action: u32, name: &'static str) -> Result<(), Unavailable> {
    // SAFETY: SECCOMP_GET_ACTION_AVAIL reads one u32 through the pointer, which points to
    // a live local for the whole call; flags must be 0.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0u32,
            &raw const action,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(Unavailable::Refused {
            call: name,
            errno: Errno::last(),
        })
    }
}

fn seccomp() -> Seccomp {
    // SAFETY: PR_GET_SECCOMP reads no arguments and returns this thread's seccomp mode.
    let mode = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) };
    let own_mode = match mode {
        0 => Ok(SeccompMode::Disabled),
        1 => Ok(SeccompMode::Strict),
        2 => Ok(SeccompMode::Filter),
        m if m < 0 => Err(Unavailable::Refused {
            call: "prctl(PR_GET_SECCOMP)",
            errno: Errno::last(),
        }),
        m => Err(Unavailable::Failed(format!(
            "prctl(PR_GET_SECCOMP) returned unknown mode {m}"
        ))),
    };
    let filter = own_mode.clone().and_then(|_| {
        seccomp_action(
            libc::SECCOMP_RET_KILL_PROCESS,
            "seccomp(GET_ACTION_AVAIL, KILL_PROCESS)",
        )?;
        seccomp_action(libc::SECCOMP_RET_ERRNO, "seccomp(GET_ACTION_AVAIL, ERRNO)")
    });
    let user_notif = seccomp_action(
        libc::SECCOMP_RET_USER_NOTIF,
        "seccomp(GET_ACTION_AVAIL, USER_NOTIF)",
    );
    Seccomp {
        own_mode: own_mode.ok(),
        filter: filter.into(),
        user_notif: user_notif.into(),
    }
}

/// A cgroup v2 directory of doctor's own, for `cgroup.kill` and the cgroup program
/// probes. Removed by [`ScratchCgroup::remove`], or on drop when a probe bailed out.
#[derive(Debug)]
struct ScratchCgroup {
    path: PathBuf,
    removed: bool,
}

impl ScratchCgroup {
    fn create(mount: &Path, privileged: bool) -> Result<Self, Unavailable> {
        let path = mount.join(format!("agentd-doctor-{}", std::process::id()));
        match fs::create_dir(&path) {
            Ok(()) => Ok(Self {
                path,
                removed: false,
            }),
            Err(e) => Err(match io_refusal("mkdir", &e, privileged) {
                why @ Unavailable::NeedsRoot { .. } => why,
                Unavailable::Refused { .. } | Unavailable::Missing(_) | Unavailable::Failed(_) => {
                    Unavailable::Failed(format!("cannot create cgroup {}: {e}", path.display()))
                }
            }),
        }
    }

    /// Removes the directory; the error names it, for the report.
    fn remove(mut self) -> Result<(), String> {
        self.removed = true;
        fs::remove_dir(&self.path)
            .map_err(|e| format!("cannot remove cgroup {}: {e}", self.path.display()))
    }
}

impl Drop for ScratchCgroup {
    fn drop(&mut self) {
        if !self.removed
            && let Err(e) = fs::remove_dir(&self.path)
        {
            tracing::warn!("cannot remove cgroup {}: {e}", self.path.display());
        }
    }
}

/// This process's cgroup v2 path relative to the mount, from /proc/self/cgroup's `0::`
/// line.
fn own_cgroup2(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// Whether `cgroup.kill` works: written to the empty scratch cgroup (kills nothing).
/// Without one (no root), its presence in this process's own cgroup answers, since the
/// root cgroup has none; it is never written there.
fn cgroup_kill(
    mount: &Path,
    scratch: Result<&ScratchCgroup, &Unavailable>,
    privileged: bool,
) -> Status {
    let scratch = match scratch {
        Ok(s) => s,
        Err(why) => {
            let own = fs::read_to_string("/proc/self/cgroup")
                .ok()
                .and_then(|t| own_cgroup2(&t).map(|p| p.trim_start_matches('/').to_owned()))
                .filter(|p| !p.is_empty());
            return match own {
                Some(p) if mount.join(&p).join("cgroup.kill").exists() => Status::Usable,
                Some(_) | None => Status::Unusable(why.clone()),
            };
        }
    };
    let kill = scratch.path.join("cgroup.kill");
    if !kill.exists() {
        return Status::Unusable(Unavailable::Missing(format!(
            "{} does not exist",
            kill.display()
        )));
    }
    match fs::write(&kill, "1") {
        Ok(()) => Status::Usable,
        Err(e) => Status::Unusable(io_refusal("write cgroup.kill", &e, privileged)),
    }
}

/// The controller list in `cgroup.controllers` or `cgroup.subtree_control`.
fn parse_controllers(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_owned).collect()
}

/// Where `name` lives: the v2 hierarchy when the v2 root offers it, else a v1 hierarchy
/// that carries it, else nowhere.
fn place_controller(
    name: &str,
    controllers: &[String],
    subtree_control: &[String],
    mounts: &[Mount],
) -> Controller {
    if controllers.iter().any(|c| c == name) {
        Controller::V2 {
            enabled: subtree_control.iter().any(|c| c == name),
        }
    } else if let Some(mount) = host::cgroup1_mount(mounts, name) {
        Controller::V1 { mount }
    } else {
        Controller::Missing
    }
}

fn cgroup(
    mount: Option<PathBuf>,
    mounts: &[Mount],
    scratch: Result<&ScratchCgroup, &Unavailable>,
    privileged: bool,
) -> Cgroup {
    let Some(mount) = mount else {
        return Cgroup {
            mount: None,
            controllers: Vec::new(),
            kill: Status::Unusable(Unavailable::Missing("cgroup v2 is not mounted".into())),
            pids: place_controller("pids", &[], &[], mounts),
            memory: place_controller("memory", &[], &[], mounts),
        };
    };
    let read = |file: &str| {
        fs::read_to_string(mount.join(file))
            .map(|t| parse_controllers(&t))
            .unwrap_or_default()
    };
    let controllers = read("cgroup.controllers");
    let subtree = read("cgroup.subtree_control");
    Cgroup {
        kill: cgroup_kill(&mount, scratch, privileged),
        pids: place_controller("pids", &controllers, &subtree, mounts),
        memory: place_controller("memory", &controllers, &subtree, mounts),
        controllers,
        mount: Some(mount),
    }
}

/// What a failed program load or attach says: the syscall and errno where there is one.
fn program_error(stage: &'static str, e: &ProgramError, privileged: bool) -> Unavailable {
    if let ProgramError::LoadError { io_error, .. } = e {
        return io_refusal("BPF_PROG_LOAD", io_error, privileged);
    }
    if let ProgramError::SyscallError(SyscallError { call, io_error }) = e {
        return io_refusal(call, io_error, privileged);
    }
    if let ProgramError::TracePointError(TracePointError::FileError { filename, io_error }) = e {
        return Unavailable::Missing(format!(
            "cannot read {}: {io_error} (is tracefs mounted?)",
            filename.display()
        ));
    }
    Unavailable::Failed(format!("{stage}: {e}"))
}

/// Why the BPF object as a whole did not load (then no probe program can).
fn loader_error(e: &EbpfError, privileged: bool) -> Unavailable {
    if let EbpfError::MapError(MapError::CreateError { io_error, .. }) = e {
        return io_refusal("BPF_MAP_CREATE", io_error, privileged);
    }
    if let EbpfError::BtfError(BtfError::LoadError { io_error, .. }) = e {
        return io_refusal("BPF_BTF_LOAD", io_error, privileged);
    }
    if let EbpfError::ProgramError(pe) = e {
        return program_error("load", pe, privileged);
    }
    Unavailable::Failed(format!("cannot load the BPF object: {e}"))
}

/// The program `name` of the embedded object as type `T`.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, Unavailable>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| Unavailable::Failed(format!("the BPF object has no program {name}")))?
        .try_into()
        .map_err(|e: ProgramError| Unavailable::Failed(format!("program {name}: {e}")))
}

/// Loads every probe program on its own and records each type's answer. Everything loaded
/// is unloaded (and detached) when this returns, before the scratch cgroup is removed.
fn bpf(
    privileged: bool,
    scratch: Result<&ScratchCgroup, &Unavailable>,
    bpf_lsm_active: Option<bool>,
) -> Bpf {
    let btf = Btf::from_sys_fs()
        .map_err(|e| Unavailable::Failed(format!("/sys/kernel/btf/vmlinux does not parse: {e}")));
    let btf_status = Status::from(btf.as_ref().map(|_| ()).map_err(Clone::clone));

    let mut ebpf = match EbpfLoader::new().load(EBPF_OBJECT) {
        Ok(ebpf) => ebpf,
        Err(e) => {
            let all = Status::Unusable(loader_error(&e, privileged));
            return Bpf {
                btf: btf_status,
                ring_buffer: all.clone(),
                cgroup_sock_addr: all.clone(),
                cgroup_sock: all.clone(),
                tracepoint: all.clone(),
                tp_btf: all.clone(),
                lsm: all,
            };
        }
    };
    let ebpf = &mut ebpf;
    let cgroup_dir = scratch.map_err(Clone::clone).and_then(|s| {
        fs::File::open(&s.path)
            .map_err(|e| Unavailable::Failed(format!("cannot open {}: {e}", s.path.display())))
    });
    let btf = btf.as_ref().map_err(|_| {
        Unavailable::Missing("no BTF (/sys/kernel/btf/vmlinux does not parse)".into())
    });

    let ring_buffer = match ebpf.map("PROBE_RING") {
        Some(map) => RingBuf::try_from(map).map(drop).map_err(|e| {
            Unavailable::Failed(format!("PROBE_RING cannot be used as a ring buffer: {e}"))
        }),
        None => Err(Unavailable::Failed(
            "the BPF object has no PROBE_RING map".into(),
        )),
    };

    let cgroup_sock_addr = (|| {
        let cg = cgroup_dir.as_ref().map_err(Clone::clone)?;
        let p: &mut CgroupSockAddr = program(ebpf, "probe_connect4")?;
        p.load()
            .map_err(|e| program_error("load", &e, privileged))?;
        p.attach(cg, CgroupAttachMode::Single)
            .map_err(|e| program_error("attach", &e, privileged))?;
        Ok(())
    })();
    let cgroup_sock = (|| {
        let cg = cgroup_dir.as_ref().map_err(Clone::clone)?;
        let p: &mut CgroupSock = program(ebpf, "probe_sock_create")?;
        p.load()
            .map_err(|e| program_error("load", &e, privileged))?;
        p.attach(cg, CgroupAttachMode::Single)
            .map_err(|e| program_error("attach", &e, privileged))?;
        Ok(())
    })();
    let tracepoint = (|| {
        let p: &mut TracePoint = program(ebpf, "probe_tracepoint")?;
        p.load()
            .map_err(|e| program_error("load", &e, privileged))?;
        p.attach(TRACEPOINT.0, TRACEPOINT.1)
            .map_err(|e| program_error("attach", &e, privileged))?;
        Ok(())
    })();
    let tp_btf = (|| {
        let btf = btf.clone()?;
        let p: &mut BtfTracePoint = program(ebpf, "probe_tp_btf")?;
        p.load(TRACEPOINT.1, btf)
            .map_err(|e| program_error("load", &e, privileged))?;
        p.attach()
            .map_err(|e| program_error("attach", &e, privileged))?;
        Ok(())
    })();
    let lsm = lsm_probe(ebpf, btf.clone(), privileged, bpf_lsm_active);

    Bpf {
        btf: btf_status,
        ring_buffer: ring_buffer.into(),
        cgroup_sock_addr: cgroup_sock_addr.into(),
        cgroup_sock: cgroup_sock.into(),
        tracepoint: tracepoint.into(),
        tp_btf: tp_btf.into(),
        lsm: lsm.into(),
    }
}

/// Whether agentd's BPF LSM programs would run here, decided as `agentd doctor` does:
/// what `agentd run --dry-run` reports for the protections that need them.
pub fn bpf_lsm(privileged: bool) -> Status {
    let active = bpf::active_lsms()
        .ok()
        .map(|l| l.iter().any(|m| m == "bpf"));
    let btf = Btf::from_sys_fs()
        .map_err(|e| Unavailable::Missing(format!("no BTF (/sys/kernel/btf/vmlinux: {e})")));
    let mut ebpf = match EbpfLoader::new().load(EBPF_OBJECT) {
        Ok(ebpf) => ebpf,
        Err(e) => return Status::Unusable(loader_error(&e, privileged)),
    };
    lsm_probe(
        &mut ebpf,
        btf.as_ref().map_err(Clone::clone),
        privileged,
        active,
    )
    .into()
}

/// Loads and attaches the probe LSM program whatever the LSM list says: a kernel may list
/// `bpf` and refuse the programs (this project's machines), or accept programs that never
/// run because `bpf` is not an active LSM (`bpf_lsm_active`). Then checks that every hook
/// agentd's own programs need exists. The program is detached when `ebpf` is dropped.
fn lsm_probe(
    ebpf: &mut Ebpf,
    btf: Result<&Btf, Unavailable>,
    privileged: bool,
    bpf_lsm_active: Option<bool>,
) -> Result<(), Unavailable> {
    let btf = btf?;
    let p: &mut Lsm = program(ebpf, "probe_lsm")?;
    p.load(LSM_HOOK, btf)
        .map_err(|e| program_error("load", &e, privileged))?;
    p.attach()
        .map_err(|e| program_error("attach", &e, privileged))?;
    // agentd's own programs need these hooks (the `path_*` ones exist only with
    // CONFIG_SECURITY_PATH).
    let missing = bpf::missing_lsm_support().map_err(Unavailable::Failed)?;
    if !missing.is_empty() {
        return Err(Unavailable::Missing(format!(
            "this kernel's BTF lacks {} (CONFIG_SECURITY_PATH? unix sockets as a module?)",
            missing.join(", ")
        )));
    }
    match bpf_lsm_active {
        Some(true) => Ok(()),
        Some(false) => Err(Unavailable::Missing(
            "programs load, but bpf is not an active LSM so they never run (boot with lsm=...,bpf)"
                .into(),
        )),
        None => Err(Unavailable::Missing(
            "programs load, but the active LSMs cannot be read to tell whether they run".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eperm_means_needs_root_only_when_unprivileged() {
        assert_eq!(
            refusal("BPF_PROG_LOAD", Errno::EPERM, false),
            Unavailable::NeedsRoot {
                call: "BPF_PROG_LOAD",
                errno: Errno::EPERM
            }
        );
        assert_eq!(
            refusal("BPF_PROG_LOAD", Errno::EPERM, true),
            Unavailable::Refused {
                call: "BPF_PROG_LOAD",
                errno: Errno::EPERM
            }
        );
        assert_eq!(
            refusal("BPF_PROG_LOAD", Errno::EINVAL, false),
            Unavailable::Refused {
                call: "BPF_PROG_LOAD",
                errno: Errno::EINVAL
            }
        );
    }

    #[test]
    fn own_cgroup_from_proc_self_cgroup() {
        let hybrid =
            "12:pids:/user.slice\n1:name=systemd:/user.slice\n0::/user.slice/session-1.scope\n";
        assert_eq!(own_cgroup2(hybrid), Some("/user.slice/session-1.scope"));
        assert_eq!(own_cgroup2("3:memory:/\n"), None);
    }

    #[test]
    fn controllers_on_a_hybrid_host() {
        let mounts = host::parse_mountinfo(
            "32 31 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n\
             35 31 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
             36 31 0:31 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n",
        );
        let controllers = parse_controllers("hugetlb\n");
        assert_eq!(
            place_controller("pids", &controllers, &[], &mounts),
            Controller::V1 {
                mount: "/sys/fs/cgroup/pids".into()
            }
        );
        assert_eq!(
            place_controller("cpuset", &controllers, &[], &mounts),
            Controller::Missing
        );
        let controllers = parse_controllers("cpu memory pids\n");
        let subtree = parse_controllers("pids\n");
        assert_eq!(
            place_controller("pids", &controllers, &subtree, &mounts),
            Controller::V2 { enabled: true }
        );
        assert_eq!(
            place_controller("memory", &controllers, &subtree, &mounts),
            Controller::V2 { enabled: false }
        );
    }
}
