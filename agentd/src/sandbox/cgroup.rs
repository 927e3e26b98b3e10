//! The agent's cgroups: one cgroup v2 directory per agent (`<cgroup2>/agentd/<agent-id>`),
//! the unit agentd kills (`cgroup.kill`) and attaches BPF programs to; and, on hybrid hosts
//! whose v2 hierarchy lacks the `pids`/`memory` controllers, v1 directories
//! (`<v1 mount>/agentd/<agent-id>`) that carry those limits.
//!
//! The supervisor creates the directories and sets the limits before fork; the child joins
//! every one of them (writes `0` to `cgroup.procs`, through fds opened here) as its first
//! step, so no process of the agent ever runs outside them.
//!
//! [`plan`] is pure (mountinfo and `cgroup.controllers` in, directories and files out) and
//! unit-tested; [`AgentCgroup`] does the writes.

use std::{
    fs::OpenOptions,
    io::Write as _,
    os::{fd::OwnedFd, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    host::{self, Mount},
    profile::{Limits, format_bytes, format_duration},
};

/// Name of the directory agentd owns in each hierarchy; agents are its children.
pub const PARENT: &str = "agentd";

/// How long [`AgentCgroup::kill`] waits for the cgroup to empty.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 hierarchy is mounted: agentd needs one for the agent's cgroup (e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`)"
    )]
    NoCgroup2,
    #[error(
        "`{key}` is set but this host has no `{controller}` controller, neither in cgroup v2 nor in v1: remove the limit or enable the controller"
    )]
    NoController {
        key: &'static str,
        controller: &'static str,
    },
    #[error("cannot read /proc/self/mountinfo: {0}")]
    Mounts(#[source] std::io::Error),
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} still has processes {waited:?} after cgroup.kill (a process stuck in the kernel?)"
    )]
    NotEmpty { path: PathBuf, waited: Duration },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { op, path, source }
}

/// Which hierarchy enforces a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hierarchy {
    V2,
    V1,
}

/// One limit file to write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitPlan {
    /// The profile key (`limits.pids`).
    pub key: &'static str,
    pub controller: &'static str,
    pub hierarchy: Hierarchy,
    /// The file written, e.g. `/sys/fs/cgroup/pids/agentd/<id>/pids.max`.
    pub file: PathBuf,
    pub value: String,
    /// Human form of the value.
    pub shown: String,
}

/// Directories and files for one agent. Built without touching anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// `<cgroup2>/agentd/<id>`: the agent's cgroup.
    pub dir: PathBuf,
    /// v1 directories the agent also joins (one per v1 hierarchy that carries a limit).
    pub v1_dirs: Vec<PathBuf>,
    /// v2 controllers to enable for agentd's children (`+pids` in `cgroup.subtree_control`
    /// of the v2 root and of `agentd/`).
    pub enable_v2: Vec<&'static str>,
    pub limits: Vec<LimitPlan>,
    /// Enforced by the supervisor: the cgroup is killed at the deadline.
    #[serde(serialize_with = "ser_duration")]
    pub wall_time: Option<Duration>,
}

fn ser_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&format_duration(*d)),
        None => s.serialize_none(),
    }
}

impl Plan {
    fn v2_root(&self) -> Option<&Path> {
        self.dir.parent().and_then(Path::parent)
    }
}

/// Plans the cgroups of agent `agent_id` with `limits`, given the mounts and the v2 root's
/// `cgroup.controllers`. A limit goes to v2 when the controller is available there, else
/// to the v1 hierarchy carrying it; with neither, it is an error (never dropped silently).
pub fn plan(
    agent_id: &str,
    limits: &Limits,
    mounts: &[Mount],
    v2_controllers: &str,
) -> Result<Plan, CgroupError> {
    let v2 = host::cgroup2_mount(mounts).ok_or(CgroupError::NoCgroup2)?;
    let dir = v2.join(PARENT).join(agent_id);
    let available: Vec<&str> = v2_controllers.split_whitespace().collect();
    let mut plan = Plan {
        dir: dir.clone(),
        v1_dirs: Vec::new(),
        enable_v2: Vec::new(),
        limits: Vec::new(),
        wall_time: limits.wall_time,
    };
    // (profile key, controller, (value, shown), v2 file, v1 file)
    let pids = limits.pids.map(|n| (n.to_string(), n.to_string()));
    let memory = limits.memory.map(|b| (b.to_string(), format_bytes(b)));
    let wanted = [
        ("limits.pids", "pids", pids, "pids.max", "pids.max"),
        (
            "limits.memory",
            "memory",
            memory,
            "memory.max",
            "memory.limit_in_bytes",
        ),
    ];
    for (key, controller, value, v2_file, v1_file) in wanted {
        let Some((value, shown)) = value else {
            continue;
        };
        let (hierarchy, file) = if available.contains(&controller) {
            plan.enable_v2.push(controller);
            (Hierarchy::V2, dir.join(v2_file))
        } else if let Some(v1) = host::cgroup1_mount(mounts, controller) {
            let v1_dir = v1.join(PARENT).join(agent_id);
            if !plan.v1_dirs.contains(&v1_dir) {
                plan.v1_dirs.push(v1_dir.clone());
            }
            (Hierarchy::V1, v1_dir.join(v1_file))
        } else {
            return Err(CgroupError::NoController { key, controller });
        };
        plan.limits.push(LimitPlan {
            key,
            controller,
            hierarchy,
            file,
            value,
            shown,
        });
    }
    Ok(plan)
}

/// Reads the host's mounts and v2 controllers and plans (no writes).
pub fn plan_for_host(agent_id: &str, limits: &Limits) -> Result<Plan, CgroupError> {
    let mounts = host::mounts().map_err(CgroupError::Mounts)?;
    let v2 = host::cgroup2_mount(&mounts).ok_or(CgroupError::NoCgroup2)?;
    let controllers_file = v2.join("cgroup.controllers");
    let controllers =
        std::fs::read_to_string(&controllers_file).map_err(io_err("read", &controllers_file))?;
    plan(agent_id, limits, &mounts, &controllers)
}

/// Writes `value` to an existing cgroup file (never creates one).
fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(io_err("write", path))
}

/// The agent's cgroups, created. Dropping it kills whatever runs in them and removes the
/// directories (best effort; [`AgentCgroup::destroy`] reports errors).
#[derive(Debug)]
pub struct AgentCgroup {
    plan: Plan,
    /// Directories this instance created, in creation order.
    created: Vec<PathBuf>,
    destroyed: AtomicBool,
}

impl AgentCgroup {
    /// Creates the directories and writes the limits. On error, removes what it created.
    pub fn create(plan: Plan) -> Result<AgentCgroup, CgroupError> {
        let mut cg = AgentCgroup {
            plan,
            created: Vec::new(),
            destroyed: AtomicBool::new(false),
        };
        let v2_parent = cg.plan.dir.parent().map(Path::to_path_buf);
        if let Some(parent) = &v2_parent {
            std::fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        }
        // Controllers for agentd's children: enabled in the root and in agentd/ (a
        // controller reaches a cgroup only when every ancestor enables it).
        if let (Some(root), Some(parent)) = (cg.plan.v2_root(), &v2_parent) {
            for controller in &cg.plan.enable_v2 {
                for dir in [root, parent.as_path()] {
                    write_file(
                        &dir.join("cgroup.subtree_control"),
                        &format!("+{controller}"),
                    )?;
                }
            }
        }
        let dir = cg.plan.dir.clone();
        std::fs::create_dir(&dir).map_err(io_err("create", &dir))?;
        cg.created.push(dir);
        for v1 in cg.plan.v1_dirs.clone() {
            if let Some(parent) = v1.parent() {
                std::fs::create_dir_all(parent).map_err(io_err("create", parent))?;
            }
            std::fs::create_dir(&v1).map_err(io_err("create", &v1))?;
            cg.created.push(v1);
        }
        for limit in &cg.plan.limits {
            write_file(&limit.file, &limit.value)?;
        }
        Ok(cg)
    }

    /// The cgroups a previous agentd left behind for `agent_id` (it died before cleaning
    /// up), to kill and remove with [`AgentCgroup::destroy`] (or by dropping it); `None`
    /// when there are none.
    pub fn leftover(agent_id: &str) -> Result<Option<AgentCgroup>, CgroupError> {
        if agent_id.is_empty() || agent_id.contains('/') || agent_id.starts_with('.') {
            return Ok(None);
        }
        let mounts = host::mounts().map_err(CgroupError::Mounts)?;
        let v2 = host::cgroup2_mount(&mounts).ok_or(CgroupError::NoCgroup2)?;
        let dir = v2.join(PARENT).join(agent_id);
        let v1_dirs: Vec<PathBuf> = ["pids", "memory"]
            .iter()
            .filter_map(|c| host::cgroup1_mount(&mounts, c))
            .map(|m| m.join(PARENT).join(agent_id))
            .filter(|d| d.is_dir())
            .collect();
        let mut created: Vec<PathBuf> = Vec::new();
        if dir.is_dir() {
            created.push(dir.clone());
        }
        created.extend(v1_dirs.iter().cloned());
        if created.is_empty() {
            return Ok(None);
        }
        Ok(Some(AgentCgroup {
            plan: Plan {
                dir,
                v1_dirs,
                enable_v2: Vec::new(),
                limits: Vec::new(),
                wall_time: None,
            },
            created,
            destroyed: AtomicBool::new(false),
        }))
    }

    /// The agent's cgroup v2 directory.
    pub fn dir(&self) -> &Path {
        &self.plan.dir
    }

    /// Every directory the agent joins, v2 first.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.plan.dir.as_path())
            .chain(self.plan.v1_dirs.iter().map(PathBuf::as_path))
    }

    /// The v2 directory, open, for `clone3(CLONE_INTO_CGROUP)`: the agent's first process
    /// is born in its cgroup (no migration, which waits for an RCU grace period).
    pub fn v2_dir_fd(&self) -> Result<OwnedFd, CgroupError> {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&self.plan.dir)
            .map(OwnedFd::from)
            .map_err(io_err("open", &self.plan.dir))
    }

    /// `cgroup.procs` of each v1 directory, opened for writing (close-on-exec), for the
    /// child to join by writing `0`: no path lookup happens between fork and exec.
    pub fn v1_procs_fds(&self) -> Result<Vec<OwnedFd>, CgroupError> {
        self.plan
            .v1_dirs
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&p)
                    .map(OwnedFd::from)
                    .map_err(io_err("open", &p))
            })
            .collect()
    }

    /// Pids in the v2 cgroup.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        read_pids(&self.plan.dir.join("cgroup.procs"))
    }

    /// Kills every process of the agent, wherever it forked to (`cgroup.kill` reaches
    /// double-forked and `setsid` children), and waits until the cgroup is empty. Where
    /// the kernel has no `cgroup.kill` (before 5.14), SIGKILLs the listed pids until none
    /// is left. For the supervisor's exit path, the wall-time limit and the breaker.
    /// Writes `cgroup.kill` (when the kernel has it) and returns at once: every process
    /// of the cgroup has been sent SIGKILL. [`AgentCgroup::kill`] also waits for them.
    pub fn signal_kill(&self) -> Result<(), CgroupError> {
        let kill_file = self.plan.dir.join("cgroup.kill");
        if kill_file.exists() {
            write_file(&kill_file, "1")?;
        }
        Ok(())
    }

    /// Freezes (`true`) or thaws the agent's v2 cgroup (`cgroup.freeze`, Linux 5.2): a
    /// frozen process runs nothing until thawed, and a SIGKILL still ends it.
    pub fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        write_file(
            &self.plan.dir.join("cgroup.freeze"),
            if frozen { "1" } else { "0" },
        )
    }

    pub fn kill(&self) -> Result<(), CgroupError> {
        let kill_file = self.plan.dir.join("cgroup.kill");
        let has_kill = kill_file.exists();
        if has_kill {
            write_file(&kill_file, "1")?;
        }
        let started = Instant::now();
        let mut pause = Duration::from_micros(200);
        loop {
            let mut left = 0;
            for d in self.dirs() {
                let pids = read_pids(&d.join("cgroup.procs"))?;
                left += pids.len();
                if !has_kill {
                    for pid in pids {
                        // SAFETY: kill has no memory arguments; a pid that exited meanwhile
                        // gives ESRCH, which is fine.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            if left == 0 {
                return Ok(());
            }
            let waited = started.elapsed();
            if waited > KILL_TIMEOUT {
                return Err(CgroupError::NotEmpty {
                    path: self.plan.dir.clone(),
                    waited,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Limits the kernel enforced during the run: `(limit, times)` from `pids.events`
    /// (`max`) and the memory controller's OOM-kill counter.
    pub fn limit_hits(&self) -> Vec<(&'static str, u64)> {
        let mut hits = Vec::new();
        for l in &self.plan.limits {
            let Some(dir) = l.file.parent() else { continue };
            let (file, key) = match (l.controller, l.hierarchy) {
                ("pids", _) => ("pids.events", "max"),
                ("memory", Hierarchy::V2) => ("memory.events", "oom_kill"),
                ("memory", Hierarchy::V1) => ("memory.oom_control", "oom_kill"),
                _ => continue,
            };
            let n = std::fs::read_to_string(dir.join(file))
                .ok()
                .and_then(|t| counter(&t, key))
                .unwrap_or(0);
            if n > 0 {
                hits.push((l.controller, n));
            }
        }
        hits
    }

    /// Kills what is left, then removes the directories (v1 ones first, the v2 one last).
    /// Idempotent.
    pub fn destroy(&self) -> Result<(), CgroupError> {
        if self.destroyed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let killed = self.kill();
        let mut result = killed;
        for dir in self.created.iter().rev() {
            if let Err(e) = remove_dir(dir) {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result
    }
}

impl Drop for AgentCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.destroy() {
            tracing::warn!("cleaning up the agent's cgroup: {e}");
        }
    }
}

/// rmdir, retried briefly: a v1 cgroup can stay busy for a moment after its last task
/// exited.
fn remove_dir(dir: &Path) -> Result<(), CgroupError> {
    let started = Instant::now();
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e)
                if started.elapsed() < Duration::from_secs(2)
                    && e.raw_os_error() == Some(libc::EBUSY) =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io_err("remove", dir)(e)),
        }
    }
}

fn read_pids(procs: &Path) -> Result<Vec<i32>, CgroupError> {
    match std::fs::read_to_string(procs) {
        Ok(text) => Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        // The directory is already gone: nothing runs in it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err("read", procs)(e)),
    }
}

/// The value of `key` in a flat-keyed cgroup file (`key value` lines).
pub fn counter(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 25 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
35 31 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
36 31 0:31 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
";
    const UNIFIED: &str = "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";

    fn limits(pids: Option<u32>, memory: Option<u64>) -> Limits {
        Limits {
            pids,
            memory,
            wall_time: Some(Duration::from_secs(60)),
        }
    }

    #[test]
    fn hybrid_host_takes_limits_from_v1() {
        let m = host::parse_mountinfo(HYBRID);
        let p = plan("a-1", &limits(Some(64), Some(1 << 30)), &m, "hugetlb\n").unwrap();
        assert_eq!(p.dir, Path::new("/sys/fs/cgroup/unified/agentd/a-1"));
        assert_eq!(
            p.v1_dirs,
            vec![
                PathBuf::from("/sys/fs/cgroup/pids/agentd/a-1"),
                PathBuf::from("/sys/fs/cgroup/memory/agentd/a-1")
            ]
        );
        assert!(p.enable_v2.is_empty());
        assert_eq!(
            p.limits[0].file,
            Path::new("/sys/fs/cgroup/pids/agentd/a-1/pids.max")
        );
        assert_eq!(p.limits[0].value, "64");
        assert_eq!(
            p.limits[1].file,
            Path::new("/sys/fs/cgroup/memory/agentd/a-1/memory.limit_in_bytes")
        );
        assert_eq!(p.limits[1].value, "1073741824");
        assert_eq!(p.v2_root(), Some(Path::new("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn unified_host_takes_limits_from_v2() {
        let m = host::parse_mountinfo(UNIFIED);
        let p = plan(
            "a-1",
            &limits(Some(8), Some(1 << 20)),
            &m,
            "cpu memory pids\n",
        )
        .unwrap();
        assert_eq!(p.enable_v2, vec!["pids", "memory"]);
        assert!(p.v1_dirs.is_empty());
        assert_eq!(
            p.limits[0].file,
            Path::new("/sys/fs/cgroup/agentd/a-1/pids.max")
        );
        assert_eq!(
            p.limits[1].file,
            Path::new("/sys/fs/cgroup/agentd/a-1/memory.max")
        );
        assert_eq!(p.limits[1].hierarchy, Hierarchy::V2);
    }

    #[test]
    fn no_limits_no_v1_and_no_controllers_needed() {
        let m = host::parse_mountinfo(UNIFIED);
        let p = plan("a-1", &limits(None, None), &m, "").unwrap();
        assert!(p.limits.is_empty() && p.v1_dirs.is_empty() && p.enable_v2.is_empty());
    }

    #[test]
    fn a_limit_nothing_can_enforce_is_an_error() {
        let m = host::parse_mountinfo(UNIFIED);
        let e = plan("a-1", &limits(None, Some(1 << 20)), &m, "pids").unwrap_err();
        assert!(matches!(
            e,
            CgroupError::NoController {
                key: "limits.memory",
                controller: "memory"
            }
        ));
        assert!(e.to_string().contains("limits.memory"));
        let none = host::parse_mountinfo(HYBRID.lines().next().unwrap());
        assert!(matches!(
            plan("a-1", &limits(None, None), &none, ""),
            Err(CgroupError::NoCgroup2)
        ));
    }

    #[test]
    fn counters() {
        assert_eq!(counter("max 3\n", "max"), Some(3));
        assert_eq!(
            counter("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n", "oom_kill"),
            Some(2)
        );
        assert_eq!(counter("low 0\nhigh 0\n", "oom_kill"), None);
    }
}
