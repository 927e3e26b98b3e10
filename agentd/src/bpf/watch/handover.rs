//! Handing the kernel watch from a daemon that stops to the one that starts next, while
//! its agents run (docs/daemon.md, "Restarts").
//!
//! A daemon loads the watch with every map pinned by name under [`MAPS_DIR`] of its pin
//! directory ([`Watch::load_pinned`]). When it stops with agents running it pins its global
//! attachments too, under [`LINKS_DIR`] ([`Watch::hand_over`]), and leaves each agent's map
//! entries and cgroup programs where they are: every program goes on deciding, and
//! reporting into the same ring buffer, with nobody reading it.
//!
//! The daemon that starts next loads its own programs on the same maps, but only when
//! their layout is the one it was built with ([`layout_stamp`]); it attaches them, takes
//! the agents back ([`Watch::adopt_agent`]), then removes the previous attachments
//! ([`release_previous`]). For that instant both sets of programs report (an event may
//! appear twice) and none is missed. Its reader goes on where the previous one stopped
//! (the ring buffer's consumer position lives in the map); what the buffer could not hold
//! meanwhile is counted as lost, per agent, as always.

use std::{os::unix::fs::MetadataExt as _, path::Path};

use aya::programs::{
    BtfTracePoint, Lsm, TracePoint,
    links::{FdLink, PinnedLink},
};
use sha2::Digest as _;

use super::{
    AgentHandle, BpfError, CgroupLink, EBPF_OBJECT, HeldLink, Watch, lock, map_err, program,
};
use crate::{host::Creds, profile::CompiledPolicy};

use super::super::programs;

/// Under a daemon's pin directory: the watch's maps, pinned by name.
pub const MAPS_DIR: &str = "watch-maps";
/// Under a daemon's pin directory: the global attachments of a daemon that handed over.
pub const LINKS_DIR: &str = "watch-links";

/// Bumped whenever what a map's entries mean changes while its layout does not: a daemon
/// never takes over maps whose contents it would misread.
const MAP_FORMAT: u32 = 1;

fn object() -> Result<aya_obj::Object, BpfError> {
    aya_obj::Object::parse(EBPF_OBJECT)
        .map_err(|e| BpfError::Handover(format!("cannot parse the BPF object: {e}")))
}

/// The names of the BPF object's maps (not its global data sections, `.rodata` and the
/// like: each load has its own).
pub(super) fn map_names() -> Result<Vec<String>, BpfError> {
    let mut names: Vec<String> = object()?
        .maps
        .into_keys()
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}

/// What a daemon's maps look like: the SHA-256 of [`MAP_FORMAT`] and each map's name,
/// type, key and value sizes, capacity and flags. A daemon takes over the maps of the one
/// before only when its stamp is the same (an upgrade that changed none of them does).
pub fn layout_stamp() -> Result<String, BpfError> {
    let obj = object()?;
    let mut maps: Vec<_> = obj
        .maps
        .iter()
        .filter(|(n, _)| !n.starts_with('.'))
        .collect();
    maps.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = sha2::Sha256::new();
    h.update(MAP_FORMAT.to_le_bytes());
    for (name, m) in maps {
        h.update(name.as_bytes());
        h.update([0]);
        for v in [
            m.map_type(),
            m.key_size(),
            m.value_size(),
            m.max_entries(),
            m.map_flags(),
        ] {
            h.update(v.to_le_bytes());
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Unpins the attachments a previous daemon handed over (its programs then stop, once
/// this daemon's own run); `Ok(n)`: how many there were.
pub fn release_previous(links: &Path) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(links) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for e in entries {
        std::fs::remove_file(e?.path())?;
        n += 1;
    }
    std::fs::remove_dir(links)?;
    Ok(n)
}

/// The cgroup program a pin under an agent's directory names (the file is the program's
/// name, as [`Watch::hold_links`] pins it).
fn cgroup_program(name: &str) -> Option<&'static str> {
    programs::SOCK_ADDR_PROGRAMS
        .iter()
        .map(|(n, _)| *n)
        .chain([programs::SOCK_CREATE, programs::INBOUND, programs::OUTBOUND])
        .find(|n| *n == name)
}

impl Watch {
    /// [`Watch::load`] with every map pinned by name under `maps`, a directory on bpffs:
    /// a map already pinned there is used, contents and all. Give it a directory a
    /// handover left (the caller checked [`layout_stamp`]) or an empty one.
    pub fn load_pinned(maps: &Path) -> Result<Watch, BpfError> {
        std::fs::create_dir_all(maps).map_err(|e| BpfError::Pin {
            path: maps.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::load_with(Some(maps))
    }

    /// Pins the global attachments (syscall and process tracepoints, BPF LSM, the kill
    /// gate) under `links`, so they outlive this process for the next daemon; returns how
    /// many. On an error the caller unpins what was pinned ([`release_previous`]) and
    /// falls back to stopping its agents.
    pub fn hand_over(&mut self, links: &Path) -> Result<usize, BpfError> {
        let pin_err = |path: &Path, reason: String| BpfError::Pin {
            path: path.to_path_buf(),
            reason,
        };
        std::fs::create_dir_all(links).map_err(|e| pin_err(links, e.to_string()))?;
        let mut n = 0usize;
        let mut pin = |program: &str, link: Result<FdLink, String>| {
            let path = links.join(format!("{n:03}-{program}"));
            n += 1;
            let link = link.map_err(|reason| pin_err(&path, format!("{program}: {reason}")))?;
            link.pin(&path)
                .map(drop)
                .map_err(|e| pin_err(&path, e.to_string()))
        };
        for (name, id) in std::mem::take(&mut self.tracepoint_links) {
            let link = program::<TracePoint>(&mut self.ebpf, name)?
                .take_link(id)
                .map_err(|e| e.to_string())
                .and_then(|l| FdLink::try_from(l).map_err(|e| e.to_string()));
            pin(name, link)?;
        }
        let btf = std::mem::take(&mut self.process_links)
            .into_iter()
            .chain(std::mem::take(&mut self.gate_links));
        for (name, id) in btf {
            let link = program::<BtfTracePoint>(&mut self.ebpf, name)?
                .take_link(id)
                .map(FdLink::from)
                .map_err(|e| e.to_string());
            pin(name, link)?;
        }
        for (name, id) in std::mem::take(&mut self.lsm_links) {
            let link = program::<Lsm>(&mut self.ebpf, name)?
                .take_link(id)
                .map(FdLink::from)
                .map_err(|e| e.to_string());
            pin(name, link)?;
        }
        Ok(n)
    }

    /// Watches again an agent a previous daemon handed over: its entries are in the maps
    /// and its cgroup programs pinned under this daemon's pin directory (the same
    /// directory, by state directory). Nothing is written to the maps but the cgroup
    /// levels; the handle this returns removes the agent as [`Watch::add_agent`]'s does.
    pub fn adopt_agent(
        &mut self,
        agent_id: &str,
        cgroup_dir: &Path,
        policy: &CompiledPolicy,
        creds: Option<Creds>,
    ) -> Result<AgentHandle, BpfError> {
        let cgroup_id = std::fs::metadata(cgroup_dir)
            .map_err(|e| BpfError::Cgroup {
                path: cgroup_dir.to_path_buf(),
                reason: format!("stat: {e}"),
            })?
            .ino();
        let state = lock(&self.agents)
            .get(&cgroup_id, 0)
            .map_err(|_| BpfError::UnknownAgent {
                agent: agent_id.to_owned(),
                cgroup_id,
            })?;
        let mut handle = self.handle_for(agent_id, cgroup_dir, policy, state.policy_id, false)?;
        let dir = self
            .pin_dir
            .as_ref()
            .ok_or_else(|| BpfError::Handover("no pin directory".into()))?
            .join(cgroup_id.to_string());
        let entries = std::fs::read_dir(&dir).map_err(|source| BpfError::Read {
            path: dir.clone(),
            source,
        })?;
        for e in entries.flatten() {
            let file = e.file_name();
            let Some(program) = file.to_str().and_then(cgroup_program) else {
                continue;
            };
            let link = PinnedLink::from_pin(e.path()).map_err(|err| BpfError::Pin {
                path: e.path(),
                reason: err.to_string(),
            })?;
            handle.links.push(CgroupLink {
                program,
                link: HeldLink::Pinned(link),
            });
        }
        self.register(&handle, policy, creds);
        self.next_policy_id = self
            .next_policy_id
            .max(state.policy_id.checked_add(1).unwrap_or(1));
        *self.levels.entry(handle.level).or_default() += 1;
        self.write_levels()?;
        self.gate_attach()?;
        // The kill flag may have been set while nobody watched: the gate stays open.
        self.refresh_gate()?;
        Ok(handle)
    }

    /// The port the kernel steers the agent's DNS to (0: none).
    pub fn dns_port(&self, cgroup_id: u64) -> Result<u16, BpfError> {
        Ok(lock(&self.agents)
            .get(&cgroup_id, 0)
            .map_err(map_err("AGENTS"))?
            .dns_port)
    }

    /// Steers the agent's DNS to `port` from now on (its resolver moved).
    pub fn set_dns_port(&self, cgroup_id: u64, port: u16) -> Result<(), BpfError> {
        let mut agents = lock(&self.agents);
        let mut state = agents.get(&cgroup_id, 0).map_err(map_err("AGENTS"))?;
        state.dns_port = port;
        agents
            .insert(cgroup_id, state, 0)
            .map_err(map_err("AGENTS"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_map_is_pinned_by_name_and_no_global_data_section() {
        let names = map_names().unwrap();
        for wanted in ["AGENTS", "EVENTS", "LOST", "DNS_ALLOW", "CONFIG"] {
            assert!(names.iter().any(|n| n == wanted), "{wanted} in {names:?}");
        }
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }

    #[test]
    fn pins_name_the_cgroup_programs_they_hold() {
        assert_eq!(cgroup_program(programs::INBOUND), Some(programs::INBOUND));
        assert_eq!(cgroup_program("watch-maps"), None);
    }
}
