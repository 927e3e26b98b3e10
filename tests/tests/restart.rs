//! `agentd daemon` restarted while agents run (SIGTERM, then a new daemon, from another
//! binary, on the same state directory): the agents keep running and stay enforced through the gap, the new
//! daemon takes them over (ps lists them, their events resume with what happened in the
//! gap, their breakers are armed), their `run` clients follow them and get their exit
//! status, and the audit chain verifies across it. (SIGKILL keeps failing closed:
//! daemon.rs.)

use std::{
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agentd_tests::{
    Daemon, agent_dir, agentd_bin, finish, process_gone, profile_file, require_root, still_running,
    test_profile, wait_until,
};
use serde_json::Value;

/// Long enough for a daemon to load its programs twice under emulation.
const LIMITS: &str = "pids = 64\nmemory = \"512MiB\"\nwall_time = \"600s\"";

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// An event's `ts` (RFC 3339, UTC, `2026-12-07T12:18:43.123456789Z`) in Unix seconds.
fn unix_seconds(ts: &str) -> f64 {
    let (date, time) = ts.trim_end_matches('Z').split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
    let (y, m, day) = (d[0], d[1], d[2]);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let t: Vec<f64> = time.split(':').map(|x| x.parse().unwrap()).collect();
    days as f64 * 86_400.0 + t[0] * 3600.0 + t[1] * 60.0 + t[2]
}

fn running_ids(d: &Daemon) -> Vec<String> {
    d.ps()
        .iter()
        .filter(|r| r["state"] == "running")
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

fn row(d: &Daemon, profile: &str) -> Option<Value> {
    d.ps()
        .into_iter()
        .find(|r| r["profile"] == profile && r["state"] == "running")
}

/// Unix times of the agent's connection attempts, and whether one got through.
fn attempts(ws: &Path) -> (Vec<f64>, bool) {
    let log = std::fs::read_to_string(ws.join("log")).unwrap_or_default();
    let mut times = Vec::new();
    let mut through = false;
    for line in log.lines() {
        let (t, r) = line.split_once(' ').unwrap_or((line, ""));
        if let Ok(t) = t.parse() {
            times.push(t);
        }
        through |= r == "connected";
    }
    (times, through)
}

#[test]
fn a_restart_hands_running_agents_over_without_a_gap() {
    if !require_root() {
        return;
    }
    // A daemon loads its programs in about a second here, in tens of seconds under
    // emulation (the guests): the grace period must outlast that.
    let mut d = Daemon::start_with_args(&["--handover-grace", "300"]);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();

    // A: tries to connect out of scope every 50 ms (its breaker ignores that), logging
    // each attempt's time and result; exits 0 once `stop` exists.
    let (_pa, profile_a) = profile_file(&test_profile(
        "restart-a",
        "invoker",
        LIMITS,
        "[breaker]\ntrip_on = [\"canary\"]\n",
    ));
    let ws_a = agent_dir(true);
    let script_a = format!(
        "import os, socket, time\nwhile not os.path.exists('stop'):\n    try:\n        socket.create_connection(('127.0.0.1', {port}), timeout=1)\n        r = 'connected'\n    except OSError as e:\n        r = str(e.errno)\n    with open('log', 'a') as f:\n        f.write('%f %s\\n' % (time.time(), r))\n    time.sleep(0.05)\n"
    );
    // B: idles until `go` exists, then connects: its breaker trips on that.
    let (_pb, profile_b) = profile_file(&test_profile(
        "restart-b",
        "invoker",
        LIMITS,
        "[breaker]\ntrip_on = [\"connect\"]\n",
    ));
    let ws_b = agent_dir(true);
    let script_b = format!(
        "import os, socket, time\nwhile not os.path.exists('go'):\n    time.sleep(0.05)\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\ntime.sleep(30)\n"
    );
    // C: ends on its own (status 3) while no daemon runs, once `end` exists.
    let (_pc, profile_c) = profile_file(&test_profile("restart-c", "invoker", LIMITS, ""));
    let ws_c = agent_dir(true);
    let script_c = "import os, sys, time\nwhile not os.path.exists('end'):\n    time.sleep(0.05)\nsys.exit(3)\n";
    let mut c = d.run(
        &profile_c,
        ws_c.path(),
        &["/usr/bin/python3", "-c", script_c],
    );
    let mut a = d.run(
        &profile_a,
        ws_a.path(),
        &["/usr/bin/python3", "-c", &script_a],
    );
    let mut b = d.run(
        &profile_b,
        ws_b.path(),
        &["/usr/bin/python3", "-c", &script_b],
    );
    wait_until(Duration::from_secs(120), "the agents at work", || {
        still_running(&mut a, "A");
        still_running(&mut b, "B");
        still_running(&mut c, "C");
        row(&d, "restart-a").is_some()
            && row(&d, "restart-b").is_some()
            && row(&d, "restart-c").is_some()
            && attempts(ws_a.path()).0.len() >= 3
    });
    let (ra, rb) = (row(&d, "restart-a").unwrap(), row(&d, "restart-b").unwrap());
    let rc = row(&d, "restart-c").unwrap();
    let id_c = rc["id"].as_str().unwrap().to_owned();
    let pid_c = rc["pid"].as_u64().unwrap() as u32;
    let id_a = ra["id"].as_str().unwrap().to_owned();
    let id_b = rb["id"].as_str().unwrap().to_owned();
    let pid_a = ra["pid"].as_u64().unwrap() as u32;
    let pid_b = rb["pid"].as_u64().unwrap() as u32;

    // SIGTERM: the daemon hands them over and exits.
    // SAFETY: kill with our child's pid and SIGTERM.
    unsafe { libc::kill(d.pid() as i32, libc::SIGTERM) };
    let status = d.child.take().unwrap().wait().unwrap();
    assert!(status.success(), "the daemon's stop: {status}\n{}", d.log());
    let stopped = now();
    assert!(d.log().contains("handed"), "{}", d.log());

    // No daemon: the agents run on, and what they may not do stays refused; C ends.
    std::fs::write(ws_c.path().join("end"), "").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(process_gone(pid_c), "C ended in the gap");
    still_running(&mut a, "A in the gap");
    still_running(&mut b, "B in the gap");
    assert!(
        !process_gone(pid_a) && !process_gone(pid_b),
        "an agent died in the gap\n{}",
        d.log()
    );
    let in_gap = attempts(ws_a.path())
        .0
        .iter()
        .filter(|t| **t > stopped)
        .count();
    assert!(in_gap > 0, "A kept trying while no daemon ran");

    // The next daemon, from another binary (as an upgrade installs it), takes them over.
    let upgrade = tempfile::tempdir().unwrap();
    let new_bin = upgrade.path().join("agentd");
    std::fs::copy(agentd_bin(), &new_bin).unwrap();
    d.spawn_from(&new_bin);
    let ready = now();
    assert_eq!(
        {
            // C ended in the gap: its supervisor reports that to the new daemon.
            let mut ids = running_ids(&d);
            ids.retain(|id| *id != id_c);
            ids.sort();
            ids
        },
        {
            let mut ids = vec![id_a.clone(), id_b.clone()];
            ids.sort();
            ids
        },
        "ps lists both agents, running\n{}",
        d.log()
    );
    let log = d.log();
    assert!(log.contains(&format!("took {id_a} over")), "{log}");
    // C's client, following it, gets the status it ended with while no daemon ran.
    let (code_c, _, err_c) = finish(c);
    assert_eq!(code_c, 3, "C's client: {err_c}\n{}", d.log());
    // Events resume, with what the kernel reported while no daemon read: A's refused
    // connects from the gap reach the new daemon.
    wait_until(Duration::from_secs(60), "A's refusals from the gap", || {
        d.events().iter().any(|e| {
            e["agent"] == id_a.as_str()
                && e["kind"] == "net_connect"
                && e["verdict"] == "deny"
                && e["ts"]
                    .as_str()
                    .map(unix_seconds)
                    .is_some_and(|t| t > stopped + 0.1 && t < ready - 0.1)
        })
    });
    still_running(&mut a, "A after the restart");

    // B's breaker is armed: its connect trips it, and its client (following it to the
    // new daemon) gets 137.
    std::fs::write(ws_b.path().join("go"), "").unwrap();
    let started = Instant::now();
    wait_until(Duration::from_secs(60), "B killed by its breaker", || {
        process_gone(pid_b)
    });
    eprintln!("B contained {:?} after its trigger", started.elapsed());
    let (code_b, _, err_b) = finish(b);
    assert_eq!(code_b, 137, "B's client: {err_b}");
    still_running(&mut a, "A after B's trip");

    // A ends on its own: its client gets its status through the new daemon.
    std::fs::write(ws_a.path().join("stop"), "").unwrap();
    let (code_a, _, err_a) = finish(a);
    assert_eq!(code_a, 0, "A's client: {err_a}");

    // Nothing got through, before, during or after the gap.
    let (times, through) = attempts(ws_a.path());
    assert!(!through, "A connected");
    assert!(listener.accept().is_err(), "a connection got through");
    eprintln!(
        "A: {} attempts, {in_gap} in the first second of the gap; gap {:.2} s",
        times.len(),
        ready - stopped
    );

    // The audit chain continues across the restart, with the handover and takeover.
    d.stop();
    let text = d.audit_verified();
    assert!(
        text.contains("\"action\":\"handover\""),
        "no handover record"
    );
    for id in [&id_a, &id_b, &id_c] {
        assert!(
            text.lines()
                .any(|l| l.contains("\"action\":\"adopt\"") && l.contains(id.as_str())),
            "no adopt record of {id}"
        );
    }
}
