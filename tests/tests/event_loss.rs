//! `breaker.on_event_loss`: the kernel really loses events of an agent, and the profile
//! decides what follows — `kill` (the agent is tripped in the kernel at the first lost
//! event and the trip is recorded, exit 137) or `report` (the losses are counted against
//! the agent and it runs on). Embedded (`agentd run`) and through the daemon.
//!
//! How loss is forced, honestly: the agent writes a file in its workspace in a loop (one
//! `file_write` event per open), while the process that reads the kernel's ring buffer
//! (`agentd run`, or the daemon) is stopped with SIGSTOP — a consumer starved of CPU, as on
//! a loaded host. The 4 MiB ring buffer holds about 4 800 events; the reader stays stopped
//! until the agent has opened the file [`OVERFLOW`] times (it says how far it got), so the
//! kernel must have counted events as lost, against the agent's cgroup, however slow the
//! machine. Nothing in agentd is told or bent for the test.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdout},
    time::{Duration, Instant},
};

use agentd_tests::{
    AgentRun, DEFAULT_LIMITS, Daemon, agent_dir, assert_no_cgroup, profile_file, require_root,
    test_profile, wait_until, wait_until_or,
};
use serde_json::Value;

/// The agent: says it is up, waits for `go`, then opens a file for writing as fast as the
/// shell can (no other process: `:` and the redirection are the shell's own) until `stop`,
/// writing how many times it did into `count` every thousand.
const FLOOD: &str = "echo up; while [ ! -e go ]; do /bin/sleep 0.05; done; i=0; \
                     while [ ! -e stop ]; do : > flood; i=$((i+1)); \
                     if [ $((i % 1000)) -eq 0 ]; then echo $i > count; fi; done; echo done";

/// Opens (events) the agent makes while its reader is stopped: well over what the ring
/// buffer holds (about 4 800).
const OVERFLOW: u64 = 12_000;

/// How long a stopped reader waits for the agent to overflow the ring (or, with `kill`,
/// to be killed): generous, for emulated test guests.
const OVERFLOWED: Duration = Duration::from_secs(60);

/// How many times the agent in `ws` opened its file, as it last said.
fn flooded(ws: &Workspace) -> u64 {
    std::fs::read_to_string(ws.path().join("count"))
        .ok()
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or(0)
}

fn loss_profile(name: &str, on_event_loss: &str) -> String {
    test_profile(
        name,
        "invoker",
        DEFAULT_LIMITS,
        &format!("[breaker]\ntrip_on = [\"canary\"]\non_event_loss = \"{on_event_loss}\"\n"),
    )
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill takes a pid and a signal number; the pid is a child of this test.
    let r = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(r, 0, "kill({pid}, {sig})");
}

/// A process this test stopped: continued when dropped, so a failing test never leaves
/// it (and the agent it supervises) stopped.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Stopped {
        signal(pid, libc::SIGSTOP);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as in `signal`.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

/// The agent's workspace; `stop` is created in it when dropped, so the flood ends whatever
/// happens to the test.
struct Workspace(tempfile::TempDir);

impl Workspace {
    fn new() -> Workspace {
        Workspace(agent_dir(true))
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn touch(&self, name: &str) {
        std::fs::write(self.path().join(name), "").unwrap();
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path().join("stop"), "");
    }
}

/// Waits for the agent's `up` line.
fn wait_up(out: ChildStdout) -> BufReader<ChildStdout> {
    let mut r = BufReader::new(out);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "up", "the agent did not start");
    r
}

/// The lines of an events file written so far (a last line still being written is left
/// out).
fn events_so_far(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn lost_of(events: &[Value], agent: &str) -> u64 {
    events
        .iter()
        .filter(|e| e["kind"] == "lost" && e["agent"] == agent && e["layer"] == "bpf")
        .map(|e| e["detail"]["count"].as_u64().unwrap())
        .sum()
}

/// The processes in the agent's cgroup v2 (none once it is gone).
fn cgroup_procs(agent: &str) -> Vec<u32> {
    let dir = PathBuf::from("/sys/fs/cgroup/unified/agentd").join(agent);
    let dir = if dir.exists() {
        dir
    } else {
        PathBuf::from("/sys/fs/cgroup/agentd").join(agent)
    };
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

fn wait_exit(child: &mut Child, limit: Duration) -> i32 {
    let started = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        assert!(started.elapsed() < limit, "agentd run did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut s);
    }
    s
}

/// Lost events: summed over `agentd ps`'s rows, and the daemon's counter (`agentd stats`).
fn lost_counts(d: &Daemon) -> (u64, u64) {
    let per_agent = d.ps().iter().map(|r| r["lost"].as_u64().unwrap()).sum();
    let (code, out, err) = d.client(&["stats", "--json"]);
    assert_eq!(code, 0, "stats: {err}");
    let stats: Value = serde_json::from_str(&out).unwrap();
    (per_agent, stats["lost"].as_u64().unwrap())
}

/// The breaker event of a trip on lost events, as both modes record it.
fn assert_loss_trip(b: &Value, agent: &str) {
    assert_eq!(b["agent"], agent, "{b}");
    assert_eq!(b["verdict"], "killed", "{b}");
    assert_eq!(b["detail"]["rule"], "on_event_loss:kill", "{b}");
    assert_eq!(b["detail"]["action"], "kill", "{b}");
    assert!(b["detail"]["lost"].as_u64().unwrap() > 0, "{b}");
    assert!(
        b["detail"]["decided"]
            .as_str()
            .unwrap()
            .starts_with("kernel"),
        "{b}"
    );
}

/// Embedded: one `agentd run` (the reader of its own ring buffer) stopped while its agent
/// floods.
fn embedded(on_event_loss: &str) -> (i32, String, Vec<Value>, String) {
    let ws = Workspace::new();
    let events_dir = tempfile::tempdir().unwrap();
    let events = events_dir.path().join("events.jsonl");
    let (_p, profile) = profile_file(&loss_profile(
        &format!("loss-{on_event_loss}"),
        on_event_loss,
    ));
    let mut child = AgentRun::new(profile.to_str().unwrap(), ws.path())
        .sh(FLOOD)
        .command(&events)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = wait_up(child.stdout.take().unwrap());
    let mut agent = String::new();
    wait_until(Duration::from_secs(10), "the start event", || {
        let evs = events_so_far(&events);
        match evs.iter().find(|e| e["kind"] == "start") {
            Some(e) => {
                agent = e["agent"].as_str().unwrap().to_owned();
                true
            }
            None => false,
        }
    });
    assert!(!cgroup_procs(&agent).is_empty());
    {
        let _stopped = Stopped::new(child.id());
        ws.touch("go");
        if on_event_loss == "kill" {
            // Decided in the kernel: the agent is gone while its reader is still stopped,
            // once the ring is full (it got that far, not much farther).
            wait_until_or(
                OVERFLOWED,
                || cgroup_procs(&agent).is_empty(),
                || format!("the agent still runs after {} opens", flooded(&ws)),
            );
            assert!(flooded(&ws) < OVERFLOW, "killed at {}", flooded(&ws));
        } else {
            wait_until(OVERFLOWED, "the agent to overflow the ring", || {
                flooded(&ws) >= OVERFLOW
            });
            assert!(
                !cgroup_procs(&agent).is_empty(),
                "`report` leaves the agent running"
            );
        }
    }
    if on_event_loss == "report" {
        // The count is read each second; then the agent ends by itself.
        wait_until(Duration::from_secs(10), "the lost events reported", || {
            lost_of(&events_so_far(&events), &agent) > 0
        });
        ws.touch("stop");
    }
    let code = wait_exit(&mut child, Duration::from_secs(30));
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut out, &mut rest);
    let err = stderr_of(&mut child);
    assert_no_cgroup(&agent);
    let evs = agentd_tests::read_events(&events);
    (code, agent, evs, format!("{rest}\n--- stderr\n{err}"))
}

#[test]
fn embedded_on_event_loss_kill_trips_the_agent_in_the_kernel() {
    if !require_root() {
        return;
    }
    let (code, agent, evs, out) = embedded("kill");
    assert_eq!(code, 137, "{out}");
    assert!(out.contains("breaker tripped: on_event_loss:kill"), "{out}");
    assert!(lost_of(&evs, &agent) > 0, "a lost event for the agent");
    let b = evs
        .iter()
        .find(|e| e["kind"] == "breaker")
        .unwrap_or_else(|| panic!("no breaker event: {out}"));
    assert_loss_trip(b, &agent);
    let exit = evs.iter().find(|e| e["kind"] == "exit").unwrap();
    assert_eq!(exit["detail"]["exit_code"], 137, "{exit}");
}

#[test]
fn embedded_on_event_loss_report_counts_and_lets_the_agent_run() {
    if !require_root() {
        return;
    }
    let (code, agent, evs, out) = embedded("report");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("done"), "the agent finished its loop: {out}");
    assert!(lost_of(&evs, &agent) > 0);
    assert!(
        !evs.iter().any(|e| e["kind"] == "breaker"),
        "no trip: {out}"
    );
}

/// Through the daemon: two agents, one per choice, flood while the daemon (the one reader
/// of the shared ring buffer) is stopped. `kill` is tripped in the kernel and recorded;
/// `report` runs on with its losses counted in `agentd ps`; the counts add up with
/// `agentd stats`, and the audit log verifies.
#[test]
fn daemon_on_event_loss_kill_and_report_side_by_side() {
    if !require_root() {
        return;
    }
    let d = Daemon::start();
    let (_pk, kill_profile) = profile_file(&loss_profile("daemon-loss-kill", "kill"));
    let (_pr, report_profile) = profile_file(&loss_profile("daemon-loss-report", "report"));
    let ws_kill = Workspace::new();
    let ws_report = Workspace::new();
    let mut kill = d.run(&kill_profile, ws_kill.path(), &["/bin/sh", "-c", FLOOD]);
    let mut report = d.run(&report_profile, ws_report.path(), &["/bin/sh", "-c", FLOOD]);
    let _out_kill = wait_up(kill.stdout.take().unwrap());
    let mut out_report = wait_up(report.stdout.take().unwrap());
    let id_of = |profile: &str| {
        d.ps()
            .iter()
            .find(|r| r["profile"] == profile && r["state"] == "running")
            .map(|r| r["id"].as_str().unwrap().to_owned())
    };
    let mut ids = (None, None);
    wait_until(Duration::from_secs(30), "both agents running", || {
        ids = (id_of("daemon-loss-kill"), id_of("daemon-loss-report"));
        ids.0.is_some() && ids.1.is_some()
    });
    let (id_kill, id_report) = (ids.0.unwrap(), ids.1.unwrap());
    {
        let _stopped = Stopped::new(d.pid());
        ws_kill.touch("go");
        ws_report.touch("go");
        wait_until(
            OVERFLOWED,
            "the `report` agent to overflow the ring",
            || flooded(&ws_report) >= OVERFLOW,
        );
        wait_until_or(
            OVERFLOWED,
            || cgroup_procs(&id_kill).is_empty(),
            || format!("the `kill` agent still runs: {:?}", cgroup_procs(&id_kill)),
        );
        assert!(
            !cgroup_procs(&id_report).is_empty(),
            "the `report` agent runs on"
        );
    }
    // The `report` agent was running all along; it ends its loop now (so the daemon's
    // recording does not have a long flood to catch up with).
    ws_report.touch("stop");
    let code = wait_exit(&mut kill, Duration::from_secs(30));
    let err = stderr_of(&mut kill);
    assert_eq!(code, 137, "{err}");
    let row = |id: &str| {
        d.ps()
            .into_iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("{id} not in ps"))
    };
    let tripped = row(&id_kill);
    assert_eq!(tripped["state"], "tripped", "{tripped}");
    assert!(tripped["lost"].as_u64().unwrap() > 0, "{tripped}");
    assert_eq!(wait_exit(&mut report, Duration::from_secs(30)), 0);
    wait_until(Duration::from_secs(10), "the report agent's losses", || {
        row(&id_report)["lost"].as_u64().unwrap() > 0
    });
    assert_eq!(row(&id_report)["state"], "exited");
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut out_report, &mut rest);
    assert!(rest.contains("done"), "{rest}");
    // Every lost event is counted against its agent: the rows add up to the daemon's
    // counter (the last counts are read within a second; the counter moves as events are
    // recorded, each with an fdatasync of the audit log, behind the breaker).
    let converging = Instant::now();
    wait_until_or(
        Duration::from_secs(60),
        || {
            let (per_agent, total) = lost_counts(&d);
            per_agent == total
        },
        || format!("(per agent, stats): {:?}", lost_counts(&d)),
    );
    assert!(lost_counts(&d).0 > 0);
    eprintln!(
        "lost (per agent, stats) {:?}, equal after {:?}",
        lost_counts(&d),
        converging.elapsed()
    );
    for id in [&id_kill, &id_report] {
        assert_no_cgroup(id);
    }
    // The audit log has the trip and the losses, and verifies.
    let mut d = d;
    d.stop();
    let events = d.audit_events();
    let trips: Vec<&Value> = events.iter().filter(|e| e["kind"] == "breaker").collect();
    assert_eq!(trips.len(), 1, "one trip, of the `kill` agent: {trips:?}");
    assert_loss_trip(trips[0], &id_kill);
    for id in [&id_kill, &id_report] {
        assert!(
            events
                .iter()
                .any(|e| e["kind"] == "lost" && e["agent"] == id.as_str()),
            "the audit log has {id}'s losses"
        );
    }
    d.audit_verified();
}
