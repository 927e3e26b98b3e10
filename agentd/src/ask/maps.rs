//! [`Kernel`] over the watch's maps: network approvals are admissions of `DNS_ALLOW` (the
//! map the cgroup connect programs consult for names), exec approvals entries of the exec
//! gate the `sched_process_exec` hook checks.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use super::engine::{Kernel, Until};
use crate::{
    bpf::{
        admit::{Admissions, Approval},
        ask::{ExecGate, exec_file},
    },
    dns::AskedNames,
    run::kernel::monotonic_ns,
};

/// One agent's maps.
#[derive(Debug, Clone)]
pub struct WatchMaps {
    pub agent: String,
    pub cgroup_id: u64,
    pub admissions: Admissions,
    pub gate: ExecGate,
    pub asked: AskedNames,
    /// The kernel's device of each ask_exec file, by stat's (st_dev, inode): they differ
    /// on some filesystems (overlayfs).
    devices: Devices,
}

/// stat's (st_dev, inode) -> the kernel's (device, inode), of the ask_exec files.
type Devices = Arc<Mutex<HashMap<(u64, u64), (u64, u64)>>>;

impl WatchMaps {
    pub fn new(
        agent: &str,
        cgroup_id: u64,
        admissions: Admissions,
        gate: ExecGate,
        asked: AskedNames,
    ) -> WatchMaps {
        WatchMaps {
            agent: agent.to_owned(),
            cgroup_id,
            admissions,
            gate,
            asked,
            devices: Arc::default(),
        }
    }

    fn kernel_file(&self, dev: u64, ino: u64) -> Result<(u64, u64), String> {
        self.devices
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(dev, ino))
            .copied()
            .ok_or_else(|| format!("file {dev}:{ino} is not one the profile asks about"))
    }
}

impl Kernel for WatchMaps {
    fn admitted(&self, addr: IpAddr, port: u16, proto: u8) -> bool {
        self.admissions
            .is_admitted(self.cgroup_id, addr, port, proto)
    }

    fn allow_connect(
        &self,
        addr: IpAddr,
        port: u16,
        proto: u8,
        domain: Option<&str>,
        until: Until,
    ) -> Result<(), String> {
        let now = monotonic_ns();
        let approval = |ttl| Approval {
            addr,
            port: Some(port),
            proto,
            domain,
            ttl,
        };
        match until {
            Until::Once(ttl) => {
                self.admissions
                    .admit_once(&self.agent, self.cgroup_id, &approval(ttl))
            }
            Until::Ns(ns) => self.admissions.admit_for(
                &self.agent,
                self.cgroup_id,
                &approval(Duration::from_nanos(ns.saturating_sub(now))),
            ),
        }
        .map_err(|e| e.to_string())
    }

    fn revoke_connect(&self, addr: IpAddr, port: u16, proto: u8) {
        if let Err(e) = self
            .admissions
            .revoke(self.cgroup_id, addr, Some(port), proto)
        {
            eprintln!("agentd: revoking {addr}:{port}: {e}");
        }
    }

    fn ask_domain(&self, addr: IpAddr) -> Option<String> {
        self.asked.domain(addr)
    }

    fn set_ask_exec(&self, path: &Path, dev: u64, ino: u64) -> Result<(), String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
        let file = exec_file(path, &mountinfo).map_err(|e| e.to_string())?;
        if file.ambiguous {
            // Inode numbers repeat across subvolumes there: an approval could match
            // another file.
            return Err(format!(
                "{}: its filesystem reuses inode numbers across subvolumes; ask_exec cannot bind an approval to it",
                path.display()
            ));
        }
        self.gate
            .set_ask(self.cgroup_id, file.dev, file.ino)
            .map_err(|e| e.to_string())?;
        self.devices
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((dev, ino), (file.dev, file.ino));
        Ok(())
    }

    fn exec_once(&self, tid: u32, dev: u64, ino: u64) -> Result<(), String> {
        let (kdev, kino) = self.kernel_file(dev, ino)?;
        self.gate
            .grant_once(self.cgroup_id, tid, kdev, kino)
            .map_err(|e| e.to_string())
    }

    fn exec_until(&self, dev: u64, ino: u64, until_ns: u64) -> Result<(), String> {
        let (kdev, kino) = self.kernel_file(dev, ino)?;
        let r = if until_ns == 0 {
            self.gate.revoke(self.cgroup_id, kdev, kino)
        } else {
            self.gate.grant_until(self.cgroup_id, kdev, kino, until_ns)
        };
        r.map_err(|e| e.to_string())
    }

    fn withdraw_once(&self, tid: u32) {
        let _ = self.gate.revoke_once(tid);
    }
}
