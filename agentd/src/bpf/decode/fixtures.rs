//! What the decoder's tests start from: a policy, an agent, a sample record, and
//! `decode` with nothing known of the host.

use std::{path::PathBuf, sync::Arc};

use agentd_common::{EVENT_FLAG_DIR, EventKind, RawEvent};

use super::{AT_FDCWD, AgentInfo, ClockOffset, Resolver, Targets};
use crate::{
    event::Event,
    profile::{CompileContext, CompiledPolicy, compile, parse},
};

/// A record as the BPF programs write it, with defaults the tests (and the fuzz seeds)
/// start from: agent cgroup 4242, `bash`, pid 100, allowed, observed.
pub(crate) fn sample_raw(kind: EventKind) -> RawEvent {
    let mut comm = [0u8; agentd_common::COMM_LEN];
    comm[..4].copy_from_slice(b"bash");
    RawEvent {
        ktime_ns: 5_000_000_123,
        agent_cgroup: 4242,
        ret: 0,
        aux: 0,
        pid: 100,
        tid: 100,
        kind: kind as u16,
        flags: 0,
        layer: agentd_common::Layer::Observed as u8,
        verdict: 0,
        proto: 0,
        syscall: 0,
        addr: [0; 16],
        port: 0,
        family: 0,
        dfd: AT_FDCWD,
        comm,
        path: [0; agentd_common::PATH_LEN],
        path2: [0; agentd_common::PATH_LEN],
        canary: 0,
        dir_parts: 0,
        dir: [0; agentd_common::PATH_LEN],
    }
}

pub(super) fn policy() -> Arc<CompiledPolicy> {
    let text = r#"
[agent]
name = "t"
[filesystem]
read = ["/usr", "/home/u/project"]
write = ["/home/u/project", "/tmp"]
exec = ["/usr/bin"]
canaries = ["/home/u/.ssh"]
[network]
connect = ["127.0.0.1/32:8080"]
"#;
    let p = parse("test", text).unwrap();
    Arc::new(compile(
        &p,
        &CompileContext {
            workspace: "/home/u/project".into(),
            home: "/home/u".into(),
        },
    ))
}

pub(super) fn agent() -> AgentInfo {
    AgentInfo::new("agent-1", policy())
}

pub(super) fn raw(kind: EventKind) -> RawEvent {
    sample_raw(kind)
}

pub(super) fn set(buf: &mut [u8], s: &str) {
    buf[..s.len()].copy_from_slice(s.as_bytes());
    buf[s.len()] = 0;
}

/// `RawEvent::dir` as the kernel writes it: components innermost first.
pub(super) fn set_dir(r: &mut RawEvent, dir: &str) {
    let mut at = 0;
    let parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).rev().collect();
    for p in &parts {
        set(&mut r.dir[at..], p);
        at += p.len() + 1;
    }
    r.dir_parts = parts.len() as u32;
    r.flags |= EVENT_FLAG_DIR;
}

pub(super) fn no_resolve(_: u32, _: i32, _: &str, _: bool) -> Option<PathBuf> {
    None
}

/// Nothing known of any signal's target.
pub(super) const UNKNOWN: Targets<'static> = Targets {
    fd_pid: &|_, _| None,
    creds: &|_| None,
};

pub(super) fn decode(
    raw: &RawEvent,
    agent: Option<&AgentInfo>,
    clock: ClockOffset,
    resolve: Resolver<'_>,
) -> Option<Event> {
    super::decode(raw, agent, clock, resolve, &UNKNOWN)
}

pub(super) const CLOCK: ClockOffset = ClockOffset(1_000_000_000_000_000_000);

pub(super) fn dec(r: &RawEvent) -> Event {
    decode(r, Some(&agent()), CLOCK, &no_resolve).unwrap()
}
