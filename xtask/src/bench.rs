//! `cargo xtask bench`: agentd's costs, each as a ratio to a baseline measured in the same
//! run on the same machine (never as absolute pass/fail thresholds).
//!
//! 1. The kernel watch's cost to processes outside agents and inside one (`agentd-harness
//!    watch-test bench`): syscall loops with no programs, with programs loaded, inside.
//! 2. Launch: `agentd run -- /bin/true` against `/bin/true`.
//! 3. The breaker: time from the violating syscall (kernel timestamp) to an empty cgroup,
//!    over 100 trips (median, p99), idle; then under load (both cores busy, other agents
//!    producing events, the tripping agent busy), through the daemon, for a trip decided in
//!    the kernel and one decided in user space.
//! 4. The agent's terminal: keystroke round trips and output throughput through agentd's
//!    pseudo-terminal relay (embedded and through the daemon) against the same program
//!    on a pseudo-terminal directly; idle, and with both cores busy.
//! 5. A real agent client: Codex CLI (`codex exec`, a loop of three tool calls against a
//!    scripted model server on loopback) as the agent's user directly, and under the
//!    built-in `codex` profile embedded and through the daemon; idle and loaded.
//! 6. Egress by domain name: DNS lookups through agentd's resolver and connects to the
//!    addresses it admitted, against lookups straight to the upstream and connects allowed
//!    by a CIDR rule; embedded and through the daemon, idle and loaded.
//! 7. The workspace as a transaction (`--only transaction`).
//! 8. Asking a person (`--only ask`): an allowed connect with and without ask rules in the
//!    profile (with them, every connect goes to agentd's seccomp listener first), idle and
//!    with both cores busy; and the time from a person's `agentd approve` to the held
//!    connect returning in the agent.
//! 9. A build (`--only build`): Python's standard library copied, compiled and archived,
//!    and a Rust project (serde, serde_json) built offline with Debian's cargo, as uid
//!    65534 bare, embedded and through a daemon with its audit log, interleaved; with the
//!    events one build makes, the daemon's CPU time and the time in its BPF programs.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context as _, bail};

const TRIPS: usize = 100;
const LAUNCHES: usize = 30;

/// One part of the bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Watch,
    Launch,
    Breaker,
    Load,
    Terminal,
    Client,
    Dns,
    /// The workspace as a transaction, and the agent's mount namespace.
    Transaction,
    /// Asking a person: an allowed connect's cost when the profile has ask rules, and
    /// the time from a decision to the held call going on.
    Ask,
    /// A realistic build bare, embedded and through the daemon, and where agentd's share
    /// of it goes.
    Build,
}

pub fn bench(root: &Path, only: Option<Part>) -> anyhow::Result<()> {
    let part = |p: Part| only.is_none_or(|o| o == p);
    crate::run(
        root,
        "cargo",
        &["build", "--release", "--locked", "--package", "agentd"],
        &[],
    )?;
    let agentd = root.join("target/release/agentd");
    let work = root.join("target/bench");
    std::fs::create_dir_all(&work)?;

    if part(Part::Watch) {
        watch_costs(&agentd)?;
    }
    let ws = work.join("workspace");
    std::fs::create_dir_all(ws.join("secrets"))?;
    std::fs::write(ws.join("secrets/key"), "canary\n")?;
    let status = Command::new("chmod")
        .arg("-R")
        .arg("a+rwX")
        .arg(&work)
        .status()?;
    anyhow::ensure!(status.success(), "chmod failed");
    let profile = work.join("bench.toml");
    std::fs::write(&profile, PROFILE)?;
    if part(Part::Launch) {
        launch_cost(&agentd, &profile, &ws)?;
    }
    if part(Part::Breaker) {
        breaker_latency(&agentd, &profile, &ws, &work)?;
    }
    if part(Part::Terminal) {
        terminal_costs(root, &agentd, &ws, &work)?;
    }
    if part(Part::Client) {
        client_costs(root, &agentd, &ws, &work)?;
    }
    if part(Part::Dns) {
        dns_costs(root, &agentd, &ws, &work)?;
    }
    if part(Part::Transaction) {
        transaction_costs(&agentd, &work)?;
    }
    if part(Part::Ask) {
        ask_costs(&agentd, &work)?;
    }
    if part(Part::Build) {
        build_costs(&agentd)?;
    }
    if part(Part::Load) {
        let threshold = work.join("bench-threshold.toml");
        std::fs::write(&threshold, PROFILE_THRESHOLD)?;
        breaker_under_load(&agentd, &profile, &threshold, &ws, &work)?;
    }
    Ok(())
}

/// The threshold path (the breaker in user space): one write outside the workspace trips.
const PROFILE_THRESHOLD: &str = r#"[agent]
name = "bench-threshold"
[filesystem]
read = ["{workspace}", "/usr", "/lib", "/lib64", "/bin", "/etc", "/proc", "/dev/null"]
write = ["{workspace}", "/dev/null"]
exec = ["/usr/bin", "/bin", "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"]
[breaker]
trip_on = []
threshold = 1
window = "60s"
action = "kill"
[environment]
pass = ["PATH"]
"#;

/// Trips measured under load, the realistic case: both cores busy with loops outside any
/// agent, two other agents of the same daemon at work (files written and processes
/// started, events for the daemon to fan out and audit), and the tripping agent busy (a sibling
/// process computing in a loop) when it violates. From the kernel's timestamps in the
/// run's events: the violating call to the violator's exit, and to the last exit of the
/// agent's processes (its cgroup empty). Both paths: an immediate trip decided in the
/// kernel (canary), and a threshold trip decided in user space (a refused write).
fn breaker_under_load(
    agentd: &Path,
    immediate: &Path,
    threshold: &Path,
    ws: &Path,
    work: &Path,
) -> anyhow::Result<()> {
    const LOADED_TRIPS: usize = 40;
    let daemon_dir = work
        .parent()
        .map_or_else(|| work.join("load-daemon"), |t| t.join("bench-load-daemon"));
    let daemon = BenchDaemon::start(agentd, &daemon_dir)?;
    let mut load = Load::busy(2)?;
    let noisy_ws = work.join("noisy");
    std::fs::create_dir_all(&noisy_ws)?;
    let st = Command::new("chmod").arg("a+rwx").arg(&noisy_ws).status()?;
    anyhow::ensure!(st.success(), "chmod failed");
    for _ in 0..2 {
        let mut c = agent_command(agentd, immediate, &noisy_ws);
        c.arg("--socket").arg(&daemon.socket).args([
            "--",
            "/bin/sh",
            "-c",
            // About 600 events a second each: writes, and a process every 10 ms.
            "while :; do : > \"noise.$$\"; : > \"noise.$$\"; : > \"noise.$$\"; /bin/sleep 0.01; done",
        ]);
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        load.spawn(&mut c)?;
    }
    // Let the noise start.
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Busy computing (a loop of shell built-ins: no system call for the kill gate to
    // catch it at), so only `cgroup.kill` stops it.
    let busy = "(while :; do :; done) & /bin/sleep 0.05; ";
    let scenarios: [(&str, &Path, String); 2] = [
        (
            "immediate (canary, decided in the kernel)",
            immediate,
            format!("{busy}/bin/cat \"$PWD/secrets/key\" >/dev/null; /bin/sleep 10"),
        ),
        (
            "threshold (refused write, decided in user space)",
            threshold,
            // The bench directory: writable by the agent's user, granted by no rule.
            // `echo`, not `:`: a failed redirection of a special built-in ends the shell.
            format!("{busy}echo > \"$PWD/../refused.$$\" 2>/dev/null; /bin/sleep 10"),
        ),
    ];
    eprintln!(
        "\n[bench] breaker under load (2 busy loops outside agents, 2 noisy agents, a busy agent), through the daemon, {LOADED_TRIPS} trips each:"
    );
    for (label, profile, script) in scenarios {
        let mut violator = Vec::new();
        let mut empty = Vec::new();
        let mut incomplete = 0;
        for i in 0..LOADED_TRIPS {
            let events = work.join("trip-load.jsonl");
            let _ = std::fs::remove_file(&events);
            let mut c = agent_command(agentd, profile, ws);
            c.arg("--socket")
                .arg(&daemon.socket)
                .arg("--events")
                .arg(&events)
                .args(["--", "/bin/sh", "-c", &script]);
            let out = c.output()?;
            anyhow::ensure!(
                out.status.code() == Some(137),
                "{label}, trip {i}: exit {:?}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            let evs: Vec<serde_json::Value> = std::fs::read_to_string(&events)?
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            // Under this load the run's copy of the daemon's events can miss some (its
            // subscription lags): such trips are counted, and said, not measured.
            let Some(trigger) = evs
                .iter()
                .find(|e| e["kind"] == "breaker")
                .map(|e| &e["detail"]["trigger"])
            else {
                incomplete += 1;
                continue;
            };
            let Some(t0) = trigger["ktime_ns"].as_u64() else {
                incomplete += 1;
                continue;
            };
            let pid = &trigger["pid"];
            let exits = evs
                .iter()
                .filter(|e| e["kind"] == "process_exit")
                .filter_map(|e| Some((e["pid"].clone(), e["ktime_ns"].as_u64()?)));
            let mut last = None;
            let mut own = None;
            for (p, t) in exits {
                if &p == pid {
                    own = Some(t);
                }
                last = last.max(Some(t));
            }
            let (Some(own), Some(last)) = (own, last) else {
                // Said below, not hidden: under this load the run's record can miss them.
                incomplete += 1;
                continue;
            };
            violator.push(own.saturating_sub(t0) as f64 / 1e6);
            empty.push(last.saturating_sub(t0) as f64 / 1e6);
        }
        violator.sort_by(f64::total_cmp);
        empty.sort_by(f64::total_cmp);
        eprintln!("  {label}:");
        if incomplete > 0 {
            eprintln!(
                "    {incomplete} of {LOADED_TRIPS} trips left out: the run's copy of the events lacks the breaker event or the exits"
            );
        }
        eprintln!(
            "    violating call -> violator exited:  median {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            percentile(&violator, 0.5),
            percentile(&violator, 0.99),
            violator.last().copied().unwrap_or(f64::NAN)
        );
        eprintln!(
            "    violating call -> cgroup empty:      median {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            percentile(&empty, 0.5),
            percentile(&empty, 0.99),
            empty.last().copied().unwrap_or(f64::NAN)
        );
    }
    drop(load);
    drop(daemon);
    Ok(())
}

/// Processes the bench started to make load; killed (by pid) and reaped on drop.
#[derive(Default)]
struct Load(Vec<std::process::Child>);

impl Load {
    /// `n` shell loops spinning outside any agent.
    fn busy(n: usize) -> anyhow::Result<Load> {
        let mut load = Load::default();
        for _ in 0..n {
            load.spawn(Command::new("/bin/sh").args(["-c", "while :; do :; done"]))?;
        }
        Ok(load)
    }

    fn spawn(&mut self, c: &mut Command) -> anyhow::Result<()> {
        self.0.push(c.spawn().with_context(|| format!("{c:?}"))?);
        Ok(())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

const PROFILE: &str = r#"[agent]
name = "bench"
[filesystem]
read = ["{workspace}", "/usr", "/lib", "/lib64", "/bin", "/etc", "/proc", "/dev/null"]
write = ["{workspace}", "/dev/null"]
exec = ["/usr/bin", "/bin", "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"]
canaries = ["{workspace}/secrets"]
[breaker]
trip_on = ["canary"]
action = "kill"
[environment]
pass = ["PATH"]
"#;

/// A build: 300 sources written, 20 of them compiled, all read back into an archive.
const BUILD: &str = "rm -rf src out; mkdir src out; \
    for i in $(seq 1 300); do printf 'int f%d(int x) { return x * %d; }\\n' $i $i > src/f$i.c; done; \
    for i in $(seq 1 20); do cc -pipe -O1 -c src/f$i.c -o out/f$i.o; done; \
    tar cf out/src.tar src";

/// The build's profile: the compiler's trees executable, the workspace writable.
const PROFILE_BUILD: &str = r#"[agent]
name = "bench-build"
[filesystem]
read = ["{workspace}", "/usr", "/lib", "/lib64", "/bin", "/etc", "/proc", "/dev/null"]
write = ["{workspace}", "/dev/null"]
exec = ["/usr/bin", "/bin", "/usr/lib", "/usr/libexec"]
[breaker]
trip_on = ["canary"]
[environment]
pass = ["PATH"]
"#;

/// The workspace as a transaction against writing it directly: a build-like workload
/// ([`BUILD`]), each `agentd run` whole (launch, build, the transaction persisted); then
/// `agentd commit` and `agentd undo` of 10 000 files, per file; and what the agent's
/// mount namespace costs a launch (the start event's `view_us`).
fn transaction_costs(agentd: &Path, work: &Path) -> anyhow::Result<()> {
    const RUNS: usize = 7;
    const FILES: usize = 10_000;
    let dir = work.join("transaction");
    let _ = std::fs::remove_dir_all(&dir);
    let ws = dir.join("workspace");
    let state = dir.join("state");
    let bare_dir = dir.join("bare");
    std::fs::create_dir_all(&ws)?;
    std::fs::create_dir_all(&bare_dir)?;
    let status = Command::new("chmod")
        .arg("-R")
        .arg("a+rwX")
        .arg(&dir)
        .status()?;
    anyhow::ensure!(status.success(), "chmod failed");
    let profile = dir.join("build.toml");
    std::fs::write(&profile, PROFILE_BUILD)?;
    // A daemon of this run, outside the world-writable bench directory (it refuses an audit
    // log others may write): the same runs without loading the BPF programs each time.
    let daemon_dir = work
        .parent()
        .map_or_else(|| work.join("daemon-tx"), |t| t.join("bench-daemon-tx"));
    let daemon = BenchDaemon::start(agentd, &daemon_dir)?;
    let daemon_state = daemon_dir.join("state");
    let run_at = |socket: Option<&Path>,
                  transaction: bool,
                  script: &str,
                  events: Option<&Path>|
     -> anyhow::Result<f64> {
        let mut c = agent_command(agentd, &profile, &ws);
        c.arg("--quiet").arg("--state-dir").arg(&state);
        if let Some(s) = socket {
            c.arg("--socket").arg(s);
        }
        if transaction {
            c.arg("--transaction");
        }
        if let Some(e) = events {
            c.arg("--events").arg(e);
        }
        c.args(["--", "/bin/sh", "-c", script])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let t = Instant::now();
        let st = c.status()?;
        anyhow::ensure!(st.success(), "{c:?} failed: {st}");
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let run = |transaction: bool, script: &str, events: Option<&Path>| {
        run_at(None, transaction, script, events)
    };
    let discard_in = |state: &Path| -> anyhow::Result<()> {
        let out = Command::new(agentd)
            .args(["transactions", "--json", "--state-dir"])
            .arg(state)
            .output()?;
        let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        for t in list.as_array().into_iter().flatten() {
            if let Some(id) = t["id"].as_str() {
                let st = Command::new(agentd)
                    .args(["discard", id, "--state-dir"])
                    .arg(state)
                    .stdout(std::process::Stdio::null())
                    .status()?;
                anyhow::ensure!(st.success(), "agentd discard {id} failed");
            }
        }
        Ok(())
    };
    let discard_all = || discard_in(&state);
    let bare = || -> anyhow::Result<f64> {
        let t = Instant::now();
        let st = Command::new("/bin/sh")
            .args(["-c", BUILD])
            .current_dir(&bare_dir)
            .status()?;
        anyhow::ensure!(st.success(), "the bare build failed");
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let (mut b, mut direct, mut tx) = (Vec::new(), Vec::new(), Vec::new());
    let (mut d_direct, mut d_tx) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        b.push(bare()?);
        direct.push(run(false, BUILD, None)?);
        tx.push(run(true, BUILD, None)?);
        d_direct.push(run_at(Some(&daemon.socket), false, BUILD, None)?);
        d_tx.push(run_at(Some(&daemon.socket), true, BUILD, None)?);
        discard_all()?;
        discard_in(&daemon_state)?;
    }
    for v in [&mut b, &mut direct, &mut tx, &mut d_direct, &mut d_tx] {
        v.sort_by(f64::total_cmp);
    }
    let (dd, dt) = (percentile(&d_direct, 0.5), percentile(&d_tx, 0.5));
    let (b, d, t) = (
        percentile(&b, 0.5),
        percentile(&direct, 0.5),
        percentile(&tx, 0.5),
    );
    eprintln!(
        "\n[bench] transaction: a build (300 sources written, 20 compiled, archived), median of {RUNS}:"
    );
    eprintln!("  bare                             {b:>8.1} ms");
    eprintln!(
        "  agentd run, direct               {d:>8.1} ms ({:.2}x bare)",
        d / b
    );
    eprintln!(
        "  agentd run --transaction         {t:>8.1} ms ({:.2}x direct; the changes kept when it ends)",
        t / d
    );
    eprintln!(
        "  through the daemon, direct       {dd:>8.1} ms ({:.2}x bare)",
        dd / b
    );
    eprintln!(
        "  through the daemon, transaction  {dt:>8.1} ms ({:.2}x direct)",
        dt / dd
    );

    // The mount namespace's share of a launch.
    let mut launches = Vec::new();
    let mut views = Vec::new();
    for i in 0..RUNS {
        let events = dir.join(format!("launch-{i}.jsonl"));
        launches.push(run(false, "true", Some(&events))?);
        let text = std::fs::read_to_string(&events)?;
        let view = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["kind"] == "start")
            .and_then(|e| e["detail"]["view_us"].as_f64())
            .ok_or_else(|| anyhow::anyhow!("no view_us in the start event"))?;
        views.push(view / 1e3);
    }
    launches.sort_by(f64::total_cmp);
    views.sort_by(f64::total_cmp);
    let (l, v) = (percentile(&launches, 0.5), percentile(&views, 0.5));
    eprintln!(
        "  the agent's mount namespace      {v:>8.2} ms of a {l:.1} ms launch ({:.1}%; without it a launch is {:.3}x as long)",
        v / l * 100.0,
        (l - v) / l
    );

    // Commit and undo of many files.
    let many =
        format!("mkdir many && cd many && seq 1 {FILES} | while read i; do echo $i > f$i; done");
    run(true, &many, None)?;
    let out = Command::new(agentd)
        .args(["transactions", "--json", "--state-dir"])
        .arg(&state)
        .output()?;
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let id = list[0]["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no transaction after the run"))?
        .to_owned();
    let timed = |args: &[&str]| -> anyhow::Result<f64> {
        let t = Instant::now();
        let st = Command::new(agentd)
            .args(args)
            .arg("--state-dir")
            .arg(&state)
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(st.success(), "agentd {args:?} failed: {st}");
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let c = timed(&["commit", &id])?;
    let u = timed(&["undo", &id])?;
    eprintln!(
        "  agentd commit, {FILES} files      {c:>8.1} ms ({:.1} µs per file)",
        c * 1e3 / FILES as f64
    );
    eprintln!(
        "  agentd undo, {FILES} files        {u:>8.1} ms ({:.1} µs per file)",
        u * 1e3 / FILES as f64
    );
    discard_all()?;
    Ok(())
}

fn agent_command(agentd: &Path, profile: &Path, ws: &Path) -> Command {
    let mut c = Command::new(agentd);
    c.arg("run")
        .arg("--profile")
        .arg(profile)
        .arg("--workspace")
        .arg(ws);
    c.env("SUDO_UID", "65534").env("SUDO_GID", "65534");
    c
}

fn watch_costs(agentd: &Path) -> anyhow::Result<()> {
    eprintln!("\n[bench] kernel watch: ns per operation (best of 5 rounds of 20000)");
    // The test harnesses' program, built beside agentd.
    let out = Command::new(agentd.with_file_name("agentd-harness"))
        .args(["watch-test", "bench", "20000"])
        .output()?;
    if !out.status.success() {
        bail!(
            "agentd-harness watch-test bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).context("bench output")?;
    let series = [
        ("outside_no_programs", "outside, no programs (baseline)"),
        (
            "outside_programs_loaded_no_agent",
            "outside, programs loaded, no agent",
        ),
        (
            "outside_programs_loaded",
            "outside, programs loaded, one agent",
        ),
        ("inside_agent_watched", "inside a watched agent"),
    ];
    let base = &doc["ns_per_op"]["outside_no_programs"];
    let names: Vec<&str> = base
        .as_array()
        .context("bench output")?
        .iter()
        .filter_map(|l| l["name"].as_str())
        .collect();
    eprint!("  {:<38}", "");
    for n in &names {
        eprint!(" {n:>22}");
    }
    eprintln!();
    for (key, label) in series {
        eprint!("  {label:<38}");
        for (i, _) in names.iter().enumerate() {
            let ns = doc["ns_per_op"][key][i]["ns_per_op"]
                .as_f64()
                .unwrap_or(f64::NAN);
            let b = base[i]["ns_per_op"].as_f64().unwrap_or(f64::NAN);
            eprint!(" {:>12.0} ns ({:>4.2}x)", ns, ns / b);
        }
        eprintln!();
    }
    eprintln!(
        "  events received {}, lost {}",
        doc["events_received"], doc["events_lost"]
    );
    eprintln!("  event pipeline (open-for-write calls of agent processes -> decoded events):");
    let mut sustained = None;
    for t in doc["throughput"]
        .as_array()
        .context("bench output: throughput")?
    {
        let lost = t["events_lost"].as_u64().unwrap_or(u64::MAX);
        // Each process's start and exit are events too: at least one per call.
        let whole = t["events_received"].as_u64() >= t["calls"].as_u64() && lost == 0;
        let rate = t["events_per_s"].as_f64().unwrap_or(f64::NAN);
        if whole {
            sustained = Some(rate);
        }
        eprintln!(
            "    {} process(es) at {:>9}: {:>7} calls, {:>7} decoded, {:>7} lost, {:>9.0} events/s",
            t["processes"],
            t["target_per_s"]
                .as_u64()
                .map_or("full speed".to_owned(), |r| format!("{r}/s")),
            t["calls"],
            t["events_received"],
            lost,
            rate
        );
    }
    match sustained {
        Some(r) => eprintln!("  sustained without loss: {r:.0} events/s"),
        None => eprintln!("  sustained without loss: none of the rates (every step lost events)"),
    }
    Ok(())
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn launch_cost(agentd: &Path, profile: &Path, ws: &Path) -> anyhow::Result<()> {
    let time = |mut c: Command| -> anyhow::Result<f64> {
        let t = Instant::now();
        let st = c.status()?;
        anyhow::ensure!(st.success(), "{c:?} failed: {st}");
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    // bubblewrap with comparable isolation: new namespaces (mount, pid, net, ipc, uts,
    // user, cgroup), a read-only system, no capabilities, a new session.
    let bwrap = which("bwrap").or_else(|| {
        let st = Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "bubblewrap",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .ok()?;
        st.success().then(|| which("bwrap")).flatten()
    });
    // A daemon of this run (its own socket, state and audit log): the watch is loaded once.
    // Outside the (world-writable) bench directory: the daemon refuses an audit log others
    // may write.
    let daemon_dir = ws
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| ws.with_file_name("daemon"), |t| t.join("bench-daemon"));
    let daemon = BenchDaemon::start(agentd, &daemon_dir)?;
    let mut direct = Vec::new();
    let mut confined = Vec::new();
    let mut via_daemon = Vec::new();
    let mut bubblewrap = Vec::new();
    for _ in 0..LAUNCHES {
        direct.push(time(Command::new("/bin/true"))?);
        let mut c = agent_command(agentd, profile, ws);
        c.args(["--", "/bin/true"]);
        confined.push(time(c)?);
        let mut c = agent_command(agentd, profile, ws);
        c.arg("--socket")
            .arg(&daemon.socket)
            .args(["--", "/bin/true"]);
        via_daemon.push(time(c)?);
        if let Some(b) = &bwrap {
            let mut c = Command::new(b);
            c.args([
                "--ro-bind",
                "/usr",
                "/usr",
                "--symlink",
                "usr/bin",
                "/bin",
                "--symlink",
                "usr/lib",
                "/lib",
                "--symlink",
                "usr/lib64",
                "/lib64",
                "--proc",
                "/proc",
                "--dev",
                "/dev",
                "--unshare-all",
                "--new-session",
                "--die-with-parent",
                "--cap-drop",
                "ALL",
                "/bin/true",
            ]);
            bubblewrap.push(time(c)?);
        }
    }
    drop(daemon);
    for v in [&mut direct, &mut confined, &mut via_daemon, &mut bubblewrap] {
        v.sort_by(f64::total_cmp);
    }
    let (d, c) = (percentile(&direct, 0.5), percentile(&confined, 0.5));
    eprintln!("\n[bench] launch, median of {LAUNCHES}:");
    eprintln!("  /bin/true                    {d:>8.2} ms (1x)");
    if !bubblewrap.is_empty() {
        let b = percentile(&bubblewrap, 0.5);
        eprintln!("  bwrap ... /bin/true          {b:>8.2} ms ({:.0}x)", b / d);
    } else {
        eprintln!("  bwrap: not available (apt-get install bubblewrap failed)");
    }
    eprintln!(
        "  agentd run -- /bin/true      {c:>8.2} ms ({:.0}x; includes loading and attaching the BPF programs)",
        c / d
    );
    let v = percentile(&via_daemon, 0.5);
    eprintln!(
        "  agentd run (daemon) -- true  {v:>8.2} ms ({:.0}x; the daemon's watch is loaded once)",
        v / d
    );
    Ok(())
}

/// Keystroke round trips and output throughput through the agent's terminal
/// (xtask/bench/terminal.py drives a pseudo-terminal as a user's terminal would): the
/// program alone on a pseudo-terminal, then under `agentd run` (embedded, and through a
/// daemon), whose relay sits between; idle, then with both cores busy outside any agent.
fn terminal_costs(root: &Path, agentd: &Path, ws: &Path, work: &Path) -> anyhow::Result<()> {
    const ROUNDS: &str = "2000";
    const MIB: &str = "128";
    let harness = root.join("xtask/bench/terminal.py");
    let agent = Command::new("python3")
        .arg(&harness)
        .arg("--agent")
        .output()?;
    anyhow::ensure!(agent.status.success(), "terminal.py --agent failed");
    let agent = String::from_utf8(agent.stdout)?;
    let profile = work.join("bench-terminal.toml");
    std::fs::write(&profile, PROFILE_TERMINAL)?;
    let daemon_dir = work.parent().map_or_else(
        || work.join("terminal-daemon"),
        |t| t.join("bench-terminal-daemon"),
    );
    let daemon = BenchDaemon::start(agentd, &daemon_dir)?;
    let measure = |prefix: &[&std::ffi::OsStr]| -> anyhow::Result<serde_json::Value> {
        let out = Command::new("python3")
            .arg(&harness)
            .args([ROUNDS, MIB, "--"])
            .args(prefix)
            .args(["/usr/bin/python3", "-c", &agent])
            .env("SUDO_UID", "65534")
            .env("SUDO_GID", "65534")
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "terminal.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let run_args = |socket: Option<&Path>| -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = vec![agentd.into(), "run".into()];
        if let Some(s) = socket {
            v.push("--socket".into());
            v.push(s.into());
        }
        v.extend(["--quiet".into(), "--profile".into(), profile.clone().into()]);
        v.extend(["--workspace".into(), ws.into(), "--".into()]);
        v
    };
    for loaded in [false, true] {
        let _load = if loaded { Some(Load::busy(2)?) } else { None };
        let direct = measure(&[])?;
        let embedded = run_args(None);
        let embedded = measure(&embedded.iter().map(|s| s.as_os_str()).collect::<Vec<_>>())?;
        let via = run_args(Some(&daemon.socket));
        let via = measure(&via.iter().map(|s| s.as_os_str()).collect::<Vec<_>>())?;
        let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "\n[bench] the agent's terminal, {}: keystroke round trip median (p99), output throughput",
            if loaded { "both cores busy" } else { "idle" }
        );
        for (name, v) in [
            ("pty alone", &direct),
            ("agentd run", &embedded),
            ("agentd run (daemon)", &via),
        ] {
            eprintln!(
                "  {name:<22} {:>8.1} us ({:.2}x) p99 {:>8.1} us ({:.2}x)   {:>8.1} MiB/s ({:.2}x)",
                f(v, "rtt_median_us"),
                f(v, "rtt_median_us") / f(&direct, "rtt_median_us"),
                f(v, "rtt_p99_us"),
                f(v, "rtt_p99_us") / f(&direct, "rtt_p99_us"),
                f(v, "mib_per_s"),
                f(v, "mib_per_s") / f(&direct, "mib_per_s"),
            );
        }
    }
    drop(daemon);
    Ok(())
}

/// Codex CLI's pinned version, as scripts/setup.sh installs it.
const CODEX_VERSION: &str = "0.171.0";
const CLIENT_RUNS: usize = 7;

/// `codex exec` through three tool calls (read the workspace, write in it, run git) and an
/// answer, against tests/fixtures/agents/fake_model.py: as the agent's user (nobody)
/// directly, then under the built-in `codex` profile (its model address set to the fake
/// server's, and the bench's Codex home and install granted, as a user's would be under
/// `{home}`), embedded and through a daemon; idle, then with both cores busy. Wall time of
/// the whole client run, median and worst of CLIENT_RUNS.
fn client_costs(root: &Path, agentd: &Path, ws: &Path, work: &Path) -> anyhow::Result<()> {
    let cache = std::env::var_os("AGENTD_AGENT_CLIS")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/agentd/agent-clis"))
        })
        .context("no HOME")?
        .join(format!("codex-{CODEX_VERSION}"));
    if !cache
        .join("node_modules/@openai/codex/bin/codex.js")
        .exists()
    {
        bail!(
            "Codex CLI {CODEX_VERSION} is not installed in {}: run scripts/setup.sh",
            cache.display()
        );
    }
    // The CLI where nobody can run it (root's cache is 0700), hard-linked; a Codex home.
    let client = work.join("client");
    let _ = std::fs::remove_dir_all(&client);
    std::fs::create_dir_all(&client)?;
    let modules = client.join("node_modules");
    let linked = Command::new("cp")
        .arg("-al")
        .arg(cache.join("node_modules"))
        .arg(&modules)
        .status()?;
    if !linked.success() {
        let _ = std::fs::remove_dir_all(&modules);
        let st = Command::new("cp")
            .arg("-a")
            .arg(cache.join("node_modules"))
            .arg(&modules)
            .status()?;
        anyhow::ensure!(st.success(), "copying Codex CLI");
    }
    let codex_js = modules.join("@openai/codex/bin/codex.js");
    let codex_home = client.join("codex-home");
    let cws = client.join("ws");
    let profile = client.join("codex.toml");
    let harness = root.join("tests/fixtures/agents/fake_model.py");
    let script = client.join("script.json");
    std::fs::write(
        &script,
        r#"[{"shell": "cat question.txt"}, {"shell": "echo draft > draft.txt"},
            {"shell": "git init -q && git add . && git -c user.name=b -c user.email=b@l commit -qm d"},
            {"say": "done"}]"#,
    )?;
    let base = std::fs::read_to_string(root.join("profiles/codex.toml"))?;
    let placeholder = "\"127.0.0.1/32:11434\"";
    anyhow::ensure!(
        base.contains(placeholder),
        "profiles/codex.toml: no model address"
    );
    let run_once = |how: &str, daemon: &Path| -> anyhow::Result<f64> {
        // A fresh workspace, Codex home and model server each run.
        for d in [&codex_home, &cws] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(cws.join("question.txt"), "what is 6*7?\n")?;
        let mut server = Load::default();
        let mut child = Command::new("python3")
            .arg(&harness)
            .arg(&script)
            .arg(client.join("requests.jsonl"))
            .arg("0")
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut port = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().context("stdout")?),
            &mut port,
        )?;
        server.0.push(child);
        let port = port.trim();
        std::fs::write(
            codex_home.join("config.toml"),
            format!(
                "model = \"fake-model\"\nmodel_provider = \"fake\"\napproval_policy = \"never\"\n\
                 sandbox_mode = \"danger-full-access\"\n[analytics]\nenabled = false\n\
                 [features]\nunbounded_connection_retries = false\nplugins = false\n\
                 shell_snapshot = false\n[model_providers.fake]\nname = \"fake\"\n\
                 base_url = \"http://127.0.0.1:{port}/v1\"\nwire_api = \"responses\"\n\
                 request_max_retries = 0\nstream_max_retries = 0\n"
            ),
        )?;
        let granted = base
            .replace(placeholder, &format!("\"127.0.0.1/32:{port}\""))
            .replace(
                "\"{home}/.codex\", \"/tmp\",",
                &format!(
                    "\"{}\", \"{}\", \"/tmp\",",
                    codex_home.display(),
                    modules.display()
                ),
            )
            .replace(
                "    \"{home}/.codex\",\n",
                &format!("    \"{}\",\n", codex_home.display()),
            )
            .replace(
                "    # programs the agent builds",
                &format!(
                    "    \"{}\",\n    # programs the agent builds",
                    modules.display()
                ),
            );
        anyhow::ensure!(
            granted.matches(&*codex_home.to_string_lossy()).count() == 2
                && granted.matches(&*modules.to_string_lossy()).count() == 2,
            "profiles/codex.toml changed: the bench cannot grant its Codex home and install"
        );
        std::fs::write(&profile, granted)?;
        let status = Command::new("chmod")
            .args(["-R", "a+rwX"])
            .arg(&codex_home)
            .arg(&cws)
            .status()?;
        anyhow::ensure!(status.success(), "chmod");
        let prompt = "Analyze the question in question.txt.";
        let exec = [
            "exec",
            "--skip-git-repo-check",
            "--dangerously-bypass-approvals-and-sandbox",
            prompt,
        ];
        let mut c = match how {
            "direct" => {
                let mut c = Command::new("setpriv");
                c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                    .arg(&codex_js)
                    .args(exec);
                c
            }
            _ => {
                let mut c = Command::new(agentd);
                c.arg("run");
                if how == "daemon" {
                    c.arg("--socket").arg(daemon);
                }
                c.args(["--quiet", "--profile"])
                    .arg(&profile)
                    .arg("--workspace")
                    .arg(&cws)
                    .arg("--")
                    .arg(&codex_js)
                    .args(exec);
                c.env("SUDO_UID", "65534").env("SUDO_GID", "65534");
                c
            }
        };
        c.current_dir(&cws)
            .env("CODEX_HOME", &codex_home)
            .env("HOME", &client)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let t = Instant::now();
        let st = c.status()?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(st.success(), "codex exec ({how}) failed: {st}");
        anyhow::ensure!(
            std::fs::read_to_string(cws.join("draft.txt")).is_ok_and(|d| d == "draft\n"),
            "codex exec ({how}) did not do its work"
        );
        Ok(ms)
    };
    let daemon_dir = work.parent().map_or_else(
        || work.join("client-daemon"),
        |t| t.join("bench-client-daemon"),
    );
    let daemon = BenchDaemon::start(agentd, &daemon_dir)?;
    let _ = ws;
    for loaded in [false, true] {
        let _load = if loaded { Some(Load::busy(2)?) } else { None };
        eprintln!(
            "\n[bench] a real client, Codex CLI {CODEX_VERSION} `codex exec` (3 tool calls), {}: median (worst) of {CLIENT_RUNS}",
            if loaded { "both cores busy" } else { "idle" }
        );
        let mut base_ms = f64::NAN;
        for how in ["direct", "embedded", "daemon"] {
            let mut v = Vec::new();
            for _ in 0..CLIENT_RUNS {
                v.push(run_once(how, &daemon.socket)?);
            }
            v.sort_by(f64::total_cmp);
            let m = percentile(&v, 0.5);
            if how == "direct" {
                base_ms = m;
            }
            eprintln!(
                "  {how:<10} {m:>8.0} ms ({:.2}x)  worst {:>8.0} ms",
                m / base_ms,
                v.last().copied().unwrap_or(f64::NAN)
            );
        }
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(&client);
    Ok(())
}

/// The terminal bench's agent: python3, reading and writing its terminal.
const PROFILE_TERMINAL: &str = r#"[agent]
name = "bench-terminal"
[filesystem]
read = ["{workspace}", "/usr", "/lib", "/lib64", "/bin", "/etc", "/proc", "/dev/null", "/dev/tty"]
write = ["{workspace}", "/dev/null", "/dev/tty"]
exec = ["/usr/bin", "/bin", "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"]
[environment]
pass = ["PATH"]
"#;

/// Agents per case of the DNS bench, by name and by CIDR in turn (a run's state, such as
/// the core it lands on, weighs on all its figures: several runs spread it).
const DNS_RUNS: usize = 5;
/// Lookups, and connects, timed in each agent: with the one not timed, within the 400
/// queries agentd's resolver lets an agent send at once (200 a second after that; beyond,
/// it answers REFUSED), so they go back to back.
const DNS_PER_RUN: usize = 60;
/// The bench's upstream resolver: port 53 (the port the kernel steers), on a loopback
/// address of its own; its answers last an hour (agentd's longest admission).
const DNS_UPSTREAM_ADDR: &str = "127.0.0.153";
const DNS_UPSTREAM_TTL: &str = "3600";
/// allowed.test's address, on the loopback of the bench's namespace (a documentation
/// address: agentd admits no loopback address by name).
const BENCH_DNS_ADDR: &str = "192.0.2.2";
/// Set in the dns part's own network namespace.
const DNS_NETNS_ENV: &str = "AGENTD_BENCH_DNS_NETNS";

/// Egress by domain name: what agentd's resolver costs an agent's lookups, and what an
/// address admitted from an answer costs its connects, each against the same operation
/// allowed by a CIDR rule instead. xtask/bench/dns_upstream.py stands in for the host's
/// resolver (port 53 of 127.0.0.153, allowed.test -> 192.0.2.2); a listener of the bench
/// on 192.0.2.2 takes the connects (in a network namespace of the part's own). Inside each agent xtask/bench/dns_agent.py makes
/// [`DNS_PER_RUN`] raw UDP queries for allowed.test addressed to the upstream (a fresh
/// socket each, as a stub resolver makes them; not getaddrinfo, whose server is the
/// host's), then as many TCP connects to the listener, [`DNS_RUNS`] agents each way:
/// * by name: the profile allows `allowed.test:PORT`; the kernel steers the queries to
///   agentd's resolver, which asks the upstream and admits 192.0.2.2 before it answers;
///   the connects find the admitted address;
/// * by CIDR (the baseline): the profile allows the upstream's and the listener's
///   addresses; the queries go straight to the upstream.
///
/// Embedded (`agentd run --dns-upstream`) and through a daemon of the bench (`agentd
/// daemon --dns-upstream`), idle and with both cores busy outside any agent.
fn dns_costs(root: &Path, agentd: &Path, ws: &Path, work: &Path) -> anyhow::Result<()> {
    // agentd admits no loopback address by name (DNS rebinding): the listener's address
    // must be another, and the bench adds none to the host. So the part runs again in a
    // network namespace of its own, with BENCH_DNS_ADDR on its loopback.
    if std::env::var_os(DNS_NETNS_ENV).is_none() {
        let status = Command::new("unshare")
            .args(["--net", "--"])
            .arg(std::env::current_exe()?)
            .args(["bench", "--only", "dns"])
            .env(DNS_NETNS_ENV, "1")
            .current_dir(root)
            .status()
            .context("unshare --net (util-linux)")?;
        anyhow::ensure!(
            status.success(),
            "the dns bench failed in its namespace: {status}"
        );
        return Ok(());
    }
    for args in [
        &["link", "set", "lo", "up"][..],
        &["addr", "add", &format!("{BENCH_DNS_ADDR}/32"), "dev", "lo"],
    ] {
        let status = Command::new("ip")
            .args(args)
            .status()
            .context("ip (iproute2)")?;
        anyhow::ensure!(status.success(), "ip {}: {status}", args.join(" "));
    }
    let agent = std::fs::read_to_string(root.join("xtask/bench/dns_agent.py"))
        .context("xtask/bench/dns_agent.py")?;
    let upstream_at = format!("{DNS_UPSTREAM_ADDR}:53");
    let dir = work.join("dns");
    let daemon_dir = work
        .parent()
        .map_or_else(|| work.join("dns-daemon"), |t| t.join("bench-dns-daemon"));
    // Declared before the processes, dropped after them: the files go once they are gone.
    let _files = RemoveOnDrop(vec![dir.clone(), daemon_dir.clone()]);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    let mut upstream = Load::default();
    let mut child = Command::new("python3")
        .arg(root.join("xtask/bench/dns_upstream.py"))
        .args([DNS_UPSTREAM_ADDR, "53", DNS_UPSTREAM_TTL])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("python3 xtask/bench/dns_upstream.py")?;
    let stdout = child.stdout.take().context("dns_upstream.py: no stdout")?;
    upstream.0.push(child);
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut ready)?;
    anyhow::ensure!(
        ready.trim() == "ready",
        "dns_upstream.py did not start on {upstream_at} (is port 53 there taken?)"
    );
    let listener = AcceptLoop::start(&format!("{BENCH_DNS_ADDR}:0"))?;
    let port = listener.addr.port();

    let by_name = dir.join("dns-names.toml");
    std::fs::write(
        &by_name,
        PROFILE_DNS
            .replace("{name}", "bench-dns-names")
            .replace("{connect}", &format!("\"allowed.test:{port}\"")),
    )?;
    let by_cidr = dir.join("dns-cidr.toml");
    std::fs::write(
        &by_cidr,
        PROFILE_DNS.replace("{name}", "bench-dns-cidr").replace(
            "{connect}",
            &format!("\"{DNS_UPSTREAM_ADDR}/32:53/udp\", \"{BENCH_DNS_ADDR}/32:{port}\""),
        ),
    )?;
    let daemon = BenchDaemon::start_with(agentd, &daemon_dir, &["--dns-upstream", &upstream_at])?;

    let per_run = DNS_PER_RUN.to_string();
    let port = port.to_string();
    let measure = |profile: &Path, socket: Option<&Path>, into: &mut DnsSample| {
        let mut c = Command::new(agentd);
        c.args(["run", "--quiet"]);
        match socket {
            Some(s) => c.arg("--socket").arg(s),
            // The flag also makes the run embedded, whether a daemon runs or not.
            None => c.args(["--dns-upstream", &upstream_at]),
        };
        c.arg("--profile")
            .arg(profile)
            .arg("--workspace")
            .arg(ws)
            .args(["--", "/usr/bin/python3", "-c", &agent])
            .args([DNS_UPSTREAM_ADDR, "53", &per_run, BENCH_DNS_ADDR, &port])
            .env("SUDO_UID", "65534")
            .env("SUDO_GID", "65534");
        let out = c.output()?;
        anyhow::ensure!(
            out.status.success(),
            "dns_agent.py under {}: {}: {}",
            profile.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value = String::from_utf8_lossy(&out.stdout)
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .context("dns_agent.py printed no result")?;
        into.add(&doc);
        anyhow::Ok(())
    };
    for loaded in [false, true] {
        let _load = if loaded { Some(Load::busy(2)?) } else { None };
        eprintln!(
            "\n[bench] egress by name, {}: lookups (UDP, a fresh socket each) and TCP connects inside agents, \
             {DNS_RUNS} x {DNS_PER_RUN} each; median (p99) per operation",
            if loaded { "both cores busy" } else { "idle" }
        );
        eprintln!(
            "  {:<30} {:>38}   {:>38}",
            "", "lookup allowed.test", "connect 192.0.2.2"
        );
        let mut failures = Vec::new();
        for (how, socket) in [
            ("embedded", None),
            ("daemon", Some(daemon.socket.as_path())),
        ] {
            let mut base = DnsSample::default();
            let mut named = DnsSample::default();
            for _ in 0..DNS_RUNS {
                measure(&by_cidr, socket, &mut base)?;
                measure(&by_name, socket, &mut named)?;
            }
            base.sort();
            named.sort();
            for (label, s) in [("by CIDR (baseline)", &base), ("by name", &named)] {
                let lm = percentile(&s.lookup, 0.5);
                let lp = percentile(&s.lookup, 0.99);
                let cm = percentile(&s.connect, 0.5);
                let cp = percentile(&s.connect, 0.99);
                eprintln!(
                    "  {how:<9} {label:<20} {lm:>7.1} us ({:.2}x) p99 {lp:>7.1} us ({:.2}x)   {cm:>7.1} us ({:.2}x) p99 {cp:>7.1} us ({:.2}x)",
                    lm / percentile(&base.lookup, 0.5),
                    lp / percentile(&base.lookup, 0.99),
                    cm / percentile(&base.connect, 0.5),
                    cp / percentile(&base.connect, 0.99),
                );
                if !s.failures.is_empty() {
                    let f: Vec<String> = s
                        .failures
                        .iter()
                        .map(|(why, n)| format!("{n} {why}"))
                        .collect();
                    failures.push(format!("{how} {label}: {}", f.join(", ")));
                }
            }
        }
        for f in failures {
            eprintln!("  failed (left out of the figures): {f}");
        }
    }
    drop(daemon);
    drop(listener);
    drop(upstream);
    Ok(())
}

/// An agent's profile for the DNS bench: python3, and `{connect}`.
const PROFILE_DNS: &str = r#"[agent]
name = "{name}"
[filesystem]
read = ["{workspace}", "/usr", "/lib", "/lib64", "/bin", "/etc", "/proc", "/dev/null"]
write = ["{workspace}", "/dev/null"]
exec = ["/usr/bin", "/bin", "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"]
[network]
connect = [{connect}]
[environment]
pass = ["PATH"]
"#;

/// Runs of dns_agent.py: the times (us) of the lookups and connects that succeeded, and
/// how many did not, by what and why.
#[derive(Default)]
struct DnsSample {
    lookup: Vec<f64>,
    connect: Vec<f64>,
    failures: std::collections::BTreeMap<String, u64>,
}

impl DnsSample {
    /// Adds one run's output.
    fn add(&mut self, doc: &serde_json::Value) {
        for (times, key) in [
            (&mut self.lookup, "lookup_us"),
            (&mut self.connect, "connect_us"),
        ] {
            if let Some(a) = doc[key].as_array() {
                times.extend(a.iter().filter_map(serde_json::Value::as_f64));
            }
        }
        for (what, key) in [
            ("lookups", "lookup_failures"),
            ("connects", "connect_failures"),
        ] {
            for (why, n) in doc[key].as_object().into_iter().flatten() {
                *self.failures.entry(format!("{what} {why}")).or_default() +=
                    n.as_u64().unwrap_or(0);
            }
        }
    }

    /// Sorts the times, for [`percentile`].
    fn sort(&mut self) {
        self.lookup.sort_by(f64::total_cmp);
        self.connect.sort_by(f64::total_cmp);
    }
}

/// A TCP listener on a thread that accepts connections and closes them at once; stopped
/// (and joined) on drop.
struct AcceptLoop {
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AcceptLoop {
    fn start(at: &str) -> anyhow::Result<AcceptLoop> {
        let listener =
            std::net::TcpListener::bind(at).with_context(|| format!("listening on {at}"))?;
        let addr = listener.local_addr()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                drop(conn);
                if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
            }
        });
        Ok(AcceptLoop {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for AcceptLoop {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wakes the accept, which then sees the flag.
        let _ = std::net::TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Directories the bench made, removed on drop.
struct RemoveOnDrop(Vec<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// `agentd daemon` with its own socket, state directory and audit log under `dir`;
/// stopped (SIGTERM) on drop.
struct BenchDaemon {
    child: std::process::Child,
    socket: std::path::PathBuf,
}

impl BenchDaemon {
    fn start(agentd: &Path, dir: &Path) -> anyhow::Result<BenchDaemon> {
        BenchDaemon::start_with(agentd, dir, &[])
    }

    /// As [`BenchDaemon::start`], with more arguments for `agentd daemon`.
    fn start_with(agentd: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<BenchDaemon> {
        // A fresh state and audit log each run.
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("agentd.sock");
        let child = Command::new(agentd)
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--audit-log")
            .arg(dir.join("audit.log"))
            .args(["--group", "agentd-bench-no-such-group"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("daemon.log")).map(std::process::Stdio::from)?)
            .spawn()?;
        let d = BenchDaemon { child, socket };
        let started = Instant::now();
        loop {
            let ok = Command::new(agentd)
                .arg("stats")
                .arg("--socket")
                .arg(&d.socket)
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return Ok(d);
            }
            anyhow::ensure!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "the bench's daemon did not answer (see {})",
                dir.join("daemon.log").display()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for BenchDaemon {
    fn drop(&mut self) {
        // SIGTERM: the daemon kills its agents, detaches and removes its socket.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn breaker_latency(agentd: &Path, profile: &Path, ws: &Path, work: &Path) -> anyhow::Result<()> {
    let mut contain = Vec::new();
    for i in 0..TRIPS {
        let events = work.join("trip.jsonl");
        let _ = std::fs::remove_file(&events);
        let mut c = agent_command(agentd, profile, ws);
        c.arg("--events").arg(&events);
        c.args([
            "--",
            "/bin/sh",
            "-c",
            "/bin/cat \"$PWD/secrets/key\" >/dev/null; /bin/sleep 10",
        ]);
        let out = c.output()?;
        anyhow::ensure!(
            out.status.code() == Some(137),
            "trip {i}: exit {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&events)?;
        let ns = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["kind"] == "breaker")
            .and_then(|e| e["detail"]["contain_ns"].as_u64())
            .with_context(|| format!("trip {i}: no breaker event with contain_ns"))?;
        contain.push(ns as f64 / 1e6);
    }
    contain.sort_by(f64::total_cmp);
    eprintln!(
        "\n[bench] breaker, violating syscall -> empty cgroup, {TRIPS} trips: median {:.3} ms, p99 {:.3} ms, min {:.3} ms, max {:.3} ms",
        percentile(&contain, 0.5),
        percentile(&contain, 0.99),
        contain.first().copied().unwrap_or(f64::NAN),
        contain.last().copied().unwrap_or(f64::NAN),
    );
    Ok(())
}

/// The agent of the ask bench: `N` connects to 127.0.0.1:PORT, each timed (µs).
const ASK_CONNECTS: &str = r#"
import json, socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
t = []
for _ in range(n):
    s = socket.socket()
    a = time.perf_counter_ns()
    s.connect(("127.0.0.1", port))
    t.append((time.perf_counter_ns() - a) / 1000)
    s.close()
print(json.dumps(t), flush=True)
"#;

/// The agent of the decision bench: `N` connects to a destination it must ask about, each
/// printed with the wall-clock time it returned.
const ASK_HELD: &str = r#"
import json, socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    s = socket.socket()
    try:
        s.connect(("127.0.0.2", port)); r = 0
    except OSError as e:
        r = e.errno
    print(json.dumps({"i": i, "t": time.time(), "r": r}), flush=True)
    s.close()
"#;

fn ask_profile(name: &str, port: u16, ask: &str) -> String {
    format!(
        r#"[agent]
name = "{name}"
[filesystem]
read = ["{{workspace}}", "/usr", "/lib", "/lib64", "/bin", "/etc", "/proc", "/dev/null", "/dev/urandom"]
write = ["/dev/null"]
exec = ["/usr/bin", "/bin", "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"]
[network]
connect = ["127.0.0.1/32:{port}"]
{ask}
[breaker]
trip_on = ["canary"]
"#
    )
}

/// Part 8: what ask rules cost an allowed connect, and how fast an approval lets a held
/// call go on.
fn ask_costs(agentd: &Path, work: &Path) -> anyhow::Result<()> {
    const CONNECTS: usize = 2000;
    const ROUNDS: usize = 3;
    const DECISIONS: usize = 20;
    let dir = work.join("ask");
    let _files = RemoveOnDrop(vec![dir.clone()]);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let status = Command::new("chmod").arg("a+rx").arg(&dir).status()?;
    anyhow::ensure!(status.success(), "chmod failed");
    let allowed = AcceptLoop::start("127.0.0.1:0")?;
    let asked = AcceptLoop::start("127.0.0.2:0")?;
    let port = allowed.addr.port();
    let plain = dir.join("plain.toml");
    let with_ask = dir.join("ask.toml");
    std::fs::write(&plain, ask_profile("bench-plain", port, ""))?;
    std::fs::write(
        &with_ask,
        ask_profile(
            "bench-ask",
            port,
            &format!("ask = [\"127.0.0.2/32:{}\"]", asked.addr.port()),
        ),
    )?;
    let connects = |profile: Option<&Path>| -> anyhow::Result<Vec<f64>> {
        let mut c = match profile {
            None => {
                let mut c = Command::new("setpriv");
                c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
                c
            }
            Some(p) => {
                let mut c = Command::new(agentd);
                c.args(["run", "--quiet", "--profile"])
                    .arg(p)
                    .arg("--workspace")
                    .arg(&dir)
                    .arg("--")
                    .env("SUDO_UID", "65534")
                    .env("SUDO_GID", "65534");
                c
            }
        };
        let out = c
            .args(["/usr/bin/python3", "-c", ASK_CONNECTS])
            .arg(port.to_string())
            .arg(CONNECTS.to_string())
            .current_dir(&dir)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "the connect loop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut t: Vec<f64> = serde_json::from_slice(&out.stdout)?;
        t.sort_by(f64::total_cmp);
        Ok(t)
    };
    for loaded in [false, true] {
        let _load = if loaded { Some(Load::busy(2)?) } else { None };
        let (mut bare, mut plain_t, mut ask_t) = (Vec::new(), Vec::new(), Vec::new());
        // Interleaved rounds: drift on a shared machine falls on all three alike.
        for _ in 0..ROUNDS {
            bare.extend(connects(None)?);
            plain_t.extend(connects(Some(&plain))?);
            ask_t.extend(connects(Some(&with_ask))?);
        }
        for v in [&mut bare, &mut plain_t, &mut ask_t] {
            v.sort_by(f64::total_cmp);
        }
        let (b50, p50, a50) = (
            percentile(&bare, 0.5),
            percentile(&plain_t, 0.5),
            percentile(&ask_t, 0.5),
        );
        let (b99, p99, a99) = (
            percentile(&bare, 0.99),
            percentile(&plain_t, 0.99),
            percentile(&ask_t, 0.99),
        );
        eprintln!(
            "ask: an allowed TCP connect on loopback{} ({} per case, median / p99):",
            if loaded {
                ", both cores busy"
            } else {
                ", idle"
            },
            ROUNDS * CONNECTS
        );
        eprintln!("  bare (no agentd)          {b50:8.1} µs / {b99:8.1} µs");
        eprintln!(
            "  agent, no ask rules       {p50:8.1} µs / {p99:8.1} µs   ({:.2}x bare)",
            p50 / b50
        );
        eprintln!(
            "  agent with ask rules      {a50:8.1} µs / {a99:8.1} µs   ({:.2}x bare, {:.2}x the same agent without ask rules)",
            a50 / b50,
            a50 / p50
        );
    }

    // The decision: from the person's `agentd approve` to the held connect returning.
    let daemon = BenchDaemon::start(agentd, &dir.join("daemon"))?;
    let mut follower = Command::new(agentd)
        .args(["approvals", "--follow", "--json", "--socket"])
        .arg(&daemon.socket)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let requests = std::io::BufReader::new(follower.stdout.take().context("follower stdout")?);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut agent = Command::new(agentd)
        .arg("run")
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("--quiet")
        .arg("--profile")
        .arg(&with_ask)
        .arg("--workspace")
        .arg(&dir)
        .args(["--", "/usr/bin/python3", "-c", ASK_HELD])
        .arg(asked.addr.port().to_string())
        .arg(DECISIONS.to_string())
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut returned = std::io::BufReader::new(agent.stdout.take().context("agent stdout")?);
    let mut requests = std::io::BufRead::lines(requests);
    let (mut to_return, mut cli) = (Vec::new(), Vec::new());
    for _ in 0..DECISIONS {
        let id = loop {
            let line = requests.next().context("the follower ended")??;
            let v: serde_json::Value = serde_json::from_str(&line)?;
            if let Some(id) = v["held"]["id"].as_str() {
                break id.to_owned();
            }
        };
        let asked_at = std::time::SystemTime::now();
        let started = Instant::now();
        let out = Command::new(agentd)
            .args(["approve", &id, "--socket"])
            .arg(&daemon.socket)
            .output()?;
        cli.push(started.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            out.status.success(),
            "approve: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut line = String::new();
        std::io::BufRead::read_line(&mut returned, &mut line)?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        anyhow::ensure!(v["r"] == 0, "the approved connect failed: {line}");
        let at = v["t"].as_f64().context("the agent's time")?;
        let asked_s = asked_at
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64();
        to_return.push((at - asked_s) * 1e3);
    }
    let _ = agent.wait();
    let _ = follower.kill();
    let _ = follower.wait();
    drop(daemon);
    to_return.sort_by(f64::total_cmp);
    cli.sort_by(f64::total_cmp);
    eprintln!(
        "ask: a person's decision to the held connect returning, through the daemon ({DECISIONS} decisions):"
    );
    eprintln!(
        "  `agentd approve` started -> connect returned in the agent   median {:6.2} ms, p99 {:6.2} ms",
        percentile(&to_return, 0.5),
        percentile(&to_return, 0.99)
    );
    eprintln!(
        "  of which `agentd approve` itself (start to exit)            median {:6.2} ms",
        percentile(&cli, 0.5)
    );
    Ok(())
}

/// The build part's Rust project: serde with its derive macros, and serde_json; a dozen
/// crates with proc macros and build scripts (run from the workspace), vendored from
/// root's cargo registry, where a build of agentd (which depends on them) put them.
const BUILD_MANIFEST: &str = r#"[package]
name = "bench-build"
version = "0.1.0"
edition = "2021"
publish = false

[dependencies]
serde = { version = "1", features = ["derive"] }
serde_json = "1"

# A workspace of its own: cargo looks for none above it.
[workspace]
"#;

const BUILD_MAIN: &str = r#"use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Rule {
    pattern: String,
    hits: u64,
}

fn main() {
    let rule = Rule { pattern: "src/**".into(), hits: 3 };
    let text = serde_json::to_string(&rule).unwrap_or_default();
    let back: Option<Rule> = serde_json::from_str(&text).ok();
    println!("{}", if back.as_ref() == Some(&rule) { "ok" } else { "mismatch" });
}
"#;

/// The build, in the workspace as uid 65534: a copy of Python's standard library
/// (`{python}`) compiled to bytecode and archived, then the Rust project built (debug,
/// offline, Debian's cargo and rustc) and its program run. Everything it makes goes to
/// `out/`, which must not exist.
const BUILD_SCRIPT: &str = r#"set -e
export PATH=/usr/bin:/bin HOME="$PWD/out" TMPDIR="$PWD/out" RUSTC=/usr/bin/rustc \
    CARGO_HOME="$PWD/out/cargo-home" CARGO_TARGET_DIR="$PWD/out/target"
mkdir out
cp -r '{python}' out/python
/usr/bin/python3 -m compileall -q out/python >&2
tar cf out/python.tar out/python
cd rust
/usr/bin/cargo build --offline --locked --quiet
test "$("$CARGO_TARGET_DIR/debug/bench-build")" = ok"#;

/// The build's profile: what `profiles/offline-build.toml` grants a build, without the
/// home directory (uid 65534 has none): the system readable, the compilers' trees and the
/// workspace (build scripts) executable, the workspace writable.
const PROFILE_MACRO: &str = r#"[agent]
name = "bench-macro"
[filesystem]
read = ["{workspace}", "/usr", "/lib", "/lib64", "/bin", "/etc", "/proc",
    "/sys/devices/system/cpu", "/dev/null", "/dev/zero", "/dev/urandom"]
write = ["{workspace}", "/dev/null"]
exec = ["/usr/bin", "/bin", "/usr/lib", "/usr/libexec", "{workspace}"]
[breaker]
trip_on = ["canary"]
[environment]
pass = ["PATH"]
"#;

/// Runs `sh -c "$1"` as uid/gid 65534 without agentd but at the priority agentd gives its
/// agents (a session of its own, nice 19 for the processes and the session's autogroup),
/// so that other work on the host weighs on the bare build as on the agent's.
const AT_AGENT_PRIORITY: &str = "if [ -e /proc/self/autogroup ]; then echo 19 > /proc/self/autogroup || exit 1; fi; \
    exec /usr/bin/nice -n 19 /usr/bin/setpriv --reuid 65534 --regid 65534 --clear-groups -- /bin/sh -c \"$1\"";

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled` set to 1 (the kernel then counts each program's runs and
/// time); its previous value written back on drop.
struct BpfStatsOn {
    previous: String,
}

impl BpfStatsOn {
    fn enable() -> anyhow::Result<BpfStatsOn> {
        let previous = std::fs::read_to_string(BPF_STATS_SYSCTL)
            .with_context(|| format!("reading {BPF_STATS_SYSCTL}"))?
            .trim()
            .to_owned();
        std::fs::write(BPF_STATS_SYSCTL, "1")
            .with_context(|| format!("writing 1 to {BPF_STATS_SYSCTL}"))?;
        Ok(BpfStatsOn { previous })
    }
}

impl Drop for BpfStatsOn {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(BPF_STATS_SYSCTL, &self.previous) {
            eprintln!(
                "[bench] could not restore {BPF_STATS_SYSCTL} to {}: {e}",
                self.previous
            );
        }
    }
}

/// Run counts and times of the BPF programs process `pid` holds, by program id, from
/// `/proc/PID/fdinfo` (`run_time_ns` and `run_cnt`: zero unless `bpf_stats_enabled`).
fn bpf_prog_stats(pid: u32) -> anyhow::Result<std::collections::BTreeMap<u64, (u64, u64)>> {
    let mut progs = std::collections::BTreeMap::new();
    let fds = Path::new("/proc").join(pid.to_string());
    for entry in std::fs::read_dir(fds.join("fd")).with_context(|| format!("{pid}'s fds"))? {
        let entry = entry?;
        let is_prog =
            std::fs::read_link(entry.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:bpf-prog");
        if !is_prog {
            continue;
        }
        // Gone since the listing: not a program of the daemon's watch any more.
        let Ok(info) = std::fs::read_to_string(fds.join("fdinfo").join(entry.file_name())) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(ns), Some(runs)) =
            (field("prog_id"), field("run_time_ns"), field("run_cnt"))
        else {
            bail!("fdinfo of a BPF program of {pid} lacks prog_id, run_time_ns or run_cnt: {info}");
        };
        progs.insert(id, (ns, runs));
    }
    Ok(progs)
}

/// Time (ns) and runs of the programs in `after`, less what they had in `before`.
fn bpf_delta(
    before: &std::collections::BTreeMap<u64, (u64, u64)>,
    after: &std::collections::BTreeMap<u64, (u64, u64)>,
) -> (u64, u64) {
    after.iter().fold((0, 0), |(ns, runs), (id, (n, r))| {
        let (n0, r0) = before.get(id).copied().unwrap_or((0, 0));
        (ns + n.saturating_sub(n0), runs + r.saturating_sub(r0))
    })
}

/// What a daemon of the bench has counted, recorded and spent so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DaemonCounters {
    /// Events received (`agentd stats`), and lost.
    events: u64,
    lost: u64,
    /// The audit log's records (lines) and bytes.
    records: u64,
    bytes: u64,
    /// The daemon's own CPU time (its threads: user, system), and that of its children it
    /// has waited for (the agents' supervisors, with the agents), in clock ticks.
    user_ticks: u64,
    system_ticks: u64,
    children_ticks: u64,
}

impl DaemonCounters {
    fn read(agentd: &Path, daemon: &BenchDaemon, audit: &Path) -> anyhow::Result<Self> {
        let out = Command::new(agentd)
            .args(["stats", "--json", "--socket"])
            .arg(&daemon.socket)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "agentd stats: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stats: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let log = std::fs::read(audit).with_context(|| format!("{}", audit.display()))?;
        let [user_ticks, system_ticks, children_ticks] = cpu_ticks(&daemon.child.id().to_string())?;
        Ok(DaemonCounters {
            events: stats["events"].as_u64().context("agentd stats: events")?,
            lost: stats["lost"].as_u64().context("agentd stats: lost")?,
            records: log.iter().filter(|&&b| b == b'\n').count() as u64,
            bytes: log.len() as u64,
            user_ticks,
            system_ticks,
            children_ticks,
        })
    }

    /// What the daemon counted, recorded and spent since `before`.
    fn since(self, before: DaemonCounters) -> DaemonCounters {
        DaemonCounters {
            events: self.events.saturating_sub(before.events),
            lost: self.lost.saturating_sub(before.lost),
            records: self.records.saturating_sub(before.records),
            bytes: self.bytes.saturating_sub(before.bytes),
            user_ticks: self.user_ticks.saturating_sub(before.user_ticks),
            system_ticks: self.system_ticks.saturating_sub(before.system_ticks),
            children_ticks: self.children_ticks.saturating_sub(before.children_ticks),
        }
    }

    /// The counters once the daemon has recorded everything: the same twice in a row.
    fn settled(agentd: &Path, daemon: &BenchDaemon, audit: &Path) -> anyhow::Result<Self> {
        let started = Instant::now();
        let mut last = DaemonCounters::read(agentd, daemon, audit)?;
        loop {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let now = DaemonCounters::read(agentd, daemon, audit)?;
            let same = (now.events, now.lost, now.records, now.bytes)
                == (last.events, last.lost, last.records, last.bytes);
            if same {
                return Ok(now);
            }
            anyhow::ensure!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "the bench's daemon was still recording a minute after the build ended"
            );
            last = now;
        }
    }
}

/// CPU time in clock ticks of process `pid` (a number or `self`): its own threads' (user,
/// system), and its children's that it has waited for, with theirs (user and system).
fn cpu_ticks(pid: &str) -> anyhow::Result<[u64; 3]> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command's closing parenthesis, from the third (state): utime,
    // stime, cutime and cstime are the 14th to 17th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let (Some(utime), Some(stime), Some(cutime), Some(cstime)) =
        (tick(11), tick(12), tick(13), tick(14))
    else {
        bail!("/proc/{pid}/stat: no utime, stime, cutime and cstime in {stat}");
    };
    Ok([utime, stime, cutime + cstime])
}

/// Bytes and regular files under `dir` (symbolic links not followed).
fn tree_size(dir: &Path) -> anyhow::Result<(u64, u64)> {
    let mut total = (0, 0);
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            let (b, f) = tree_size(&entry.path())?;
            total = (total.0 + b, total.1 + f);
        } else if meta.is_file() {
            total = (total.0 + meta.len(), total.1 + 1);
        }
    }
    Ok(total)
}

/// Where the build part works: outside the repository, whose `.cargo/config.toml` (the
/// xtask alias) cargo would read, as it reads every one above its directory, and which the
/// agent's profile does not grant.
const BUILD_DIR: &str = "/var/tmp/agentd-bench-build";

/// One build's wall time and CPU time (user and system, all its processes), in seconds.
#[derive(Debug, Clone, Copy)]
struct BuildTime {
    wall: f64,
    cpu: f64,
}

/// Medians of a mode's runs, with the range of the wall times.
#[derive(Debug, Clone, Copy)]
struct BuildMedians {
    wall: f64,
    cpu: f64,
    fastest: f64,
    slowest: f64,
}

impl BuildMedians {
    fn of(runs: &[BuildTime]) -> BuildMedians {
        let mut wall: Vec<f64> = runs.iter().map(|r| r.wall).collect();
        let mut cpu: Vec<f64> = runs.iter().map(|r| r.cpu).collect();
        wall.sort_by(f64::total_cmp);
        cpu.sort_by(f64::total_cmp);
        BuildMedians {
            wall: percentile(&wall, 0.5),
            cpu: percentile(&cpu, 0.5),
            fastest: wall.first().copied().unwrap_or(f64::NAN),
            slowest: wall.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// Part 9: a build ([`BUILD_SCRIPT`]) as uid 65534 bare (at an agent's priority), under
/// `agentd run` embedded, and through a daemon with its audit log on (a fresh daemon for
/// each such run, so that none is loaded during the others), interleaved over rounds, with
/// `agentd run -- /bin/true` in both modes each round for the launch: wall time, and CPU
/// time, which other work on the host disturbs less. Before the rounds (warming the caches),
/// the breakdown: one build through a daemon with `bpf_stats_enabled`, then one bare while
/// an idle agent of that daemon keeps its watch attached: the time in its BPF programs and
/// the daemon's own CPU in each.
fn build_costs(agentd: &Path) -> anyhow::Result<()> {
    const ROUNDS: usize = 7;
    let part_started = Instant::now();
    let dir = Path::new(BUILD_DIR);
    let _ = std::fs::remove_dir_all(dir);
    let _files = RemoveOnDrop(vec![dir.to_owned()]);
    let ws = dir.join("workspace");
    let project = ws.join("rust");
    std::fs::create_dir_all(project.join("src"))?;
    std::fs::create_dir_all(project.join(".cargo"))?;
    std::fs::write(project.join("Cargo.toml"), BUILD_MANIFEST)?;
    std::fs::write(project.join("src/main.rs"), BUILD_MAIN)?;
    // As root, before the runs: the dependencies' sources from root's registry, and the
    // configuration that makes cargo take them from there (cargo vendor prints it).
    let vendor = Command::new("/usr/bin/cargo")
        .args(["vendor", "--offline", "vendor"])
        .current_dir(&project)
        .output()
        .context("/usr/bin/cargo vendor (Debian's cargo)")?;
    anyhow::ensure!(
        vendor.status.success(),
        "cargo vendor --offline failed (are serde and serde_json in root's cargo registry? \
         a build of agentd puts them there): {}",
        String::from_utf8_lossy(&vendor.stderr)
    );
    anyhow::ensure!(
        String::from_utf8_lossy(&vendor.stdout).contains("[source.crates-io]"),
        "cargo vendor printed no source configuration: {}",
        String::from_utf8_lossy(&vendor.stdout)
    );
    std::fs::write(project.join(".cargo/config.toml"), &vendor.stdout)?;
    let crates = std::fs::read_dir(project.join("vendor"))?.count() + 1;
    let python = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
        ])
        .output()
        .context("/usr/bin/python3")?;
    anyhow::ensure!(python.status.success(), "/usr/bin/python3: no stdlib path");
    let python = String::from_utf8(python.stdout)?.trim().to_owned();
    let (py_bytes, py_files) = tree_size(Path::new(&python))?;
    let script = BUILD_SCRIPT.replace("{python}", &python);
    let status = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&ws)
        .status()?;
    anyhow::ensure!(status.success(), "chown of the build's workspace failed");
    let profile = dir.join("build.toml");
    std::fs::write(&profile, PROFILE_MACRO)?;
    let daemon_dir = dir.join("daemon");
    let audit = daemon_dir.join("audit.log");
    let tck = Command::new("getconf").arg("CLK_TCK").output()?;
    let tck: f64 = String::from_utf8(tck.stdout)?
        .trim()
        .parse()
        .context("getconf CLK_TCK")?;

    // Each build starts from the sources alone: its predecessor's output removed and the
    // removal written back to disk, outside the time.
    let prepare = || -> anyhow::Result<()> {
        match std::fs::remove_dir_all(ws.join("out")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let st = Command::new("sync").status()?;
        anyhow::ensure!(st.success(), "sync failed");
        Ok(())
    };
    // Wall time, and the CPU time of the processes this one waited for (the command's
    // tree, each process waited for by its parent).
    let timed = |what: &str, mut c: Command| -> anyhow::Result<BuildTime> {
        let [_, _, cpu0] = cpu_ticks("self")?;
        let t = Instant::now();
        let out = c.output().with_context(|| format!("{c:?}"))?;
        let wall = t.elapsed().as_secs_f64();
        let [_, _, cpu1] = cpu_ticks("self")?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let mut tail: Vec<&str> = err.lines().rev().take(30).collect();
            tail.reverse();
            bail!(
                "the build ({what}) failed: {}\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                tail.join("\n")
            );
        }
        Ok(BuildTime {
            wall,
            cpu: cpu1.saturating_sub(cpu0) as f64 / tck,
        })
    };
    let bare = || -> anyhow::Result<BuildTime> {
        prepare()?;
        let mut c = Command::new("setsid");
        c.args(["--wait", "/bin/sh", "-c", AT_AGENT_PRIORITY, "sh", &script])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .current_dir(&ws);
        timed("bare", c)
    };
    let embedded = |program: &[&str]| -> anyhow::Result<BuildTime> {
        prepare()?;
        let mut c = agent_command(agentd, &profile, &ws);
        c.arg("--quiet").arg("--").args(program);
        timed("embedded", c)
    };
    // Through `daemon`: the client's time and CPU, with the daemon's CPU since `before`
    // (its own, and its supervisor's and agent's, which it waited for).
    let via = |daemon: &BenchDaemon, program: &[&str]| {
        prepare()?;
        let before = DaemonCounters::read(agentd, daemon, &audit)?;
        let mut c = agent_command(agentd, &profile, &ws);
        c.arg("--socket")
            .arg(&daemon.socket)
            .arg("--quiet")
            .arg("--")
            .args(program);
        let mut t = timed("through the daemon", c)?;
        let spent = DaemonCounters::settled(agentd, daemon, &audit)?.since(before);
        t.cpu += (spent.user_ticks + spent.system_ticks + spent.children_ticks) as f64 / tck;
        anyhow::Ok((t, spent))
    };
    let build = ["/bin/sh", "-c", &script];

    eprintln!(
        "\n[bench] a build as uid 65534: {python} copied ({:.0} MB, {py_files} files), compiled (compileall) and archived (tar); \
         a Rust project of {crates} crates (serde, serde_json: proc macros, build scripts) built offline, debug, by /usr/bin/cargo",
        py_bytes as f64 / 1e6
    );
    eprintln!(
        "  bare runs at the priority agentd gives an agent (a session of its own, nice 19), so that other work on the host \
         weighs on both alike; wall times still follow that work, CPU times far less"
    );

    // The breakdown, first: it warms the page cache and the toolchain's files for the
    // rounds. The kernel counts the programs' time only with bpf_stats_enabled, which costs
    // two clock reads per run: not during the rounds. (`prepare` before each window, so
    // that the removal of the last output falls outside it.)
    let daemon = BenchDaemon::start(agentd, &daemon_dir)?;
    let pid = daemon.child.id();
    let stats_on = BpfStatsOn::enable()?;
    prepare()?;
    let progs0 = bpf_prog_stats(pid)?;
    let (in_agent, spent) = via(&daemon, &build)?;
    let progs1 = bpf_prog_stats(pid)?;
    // Then a bare build while an idle agent keeps the watch attached: the programs that run
    // for every process on the host while any agent runs (the kill gate), outside agents.
    let mut sleeper = Load::default();
    let mut c = agent_command(agentd, &profile, &ws);
    c.arg("--socket")
        .arg(&daemon.socket)
        .args(["--quiet", "--", "/bin/sleep", "3600"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    sleeper.spawn(&mut c)?;
    let started = Instant::now();
    loop {
        let out = Command::new(agentd)
            .args(["stats", "--json", "--socket"])
            .arg(&daemon.socket)
            .output()?;
        let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if stats["agents_running"].as_u64() >= Some(1) {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the idle agent did not start through the bench's daemon"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    prepare()?;
    let progs_idle = bpf_prog_stats(pid)?;
    let idle0 = DaemonCounters::read(agentd, &daemon, &audit)?;
    let outside = bare()?;
    let idle = DaemonCounters::read(agentd, &daemon, &audit)?.since(idle0);
    let progs2 = bpf_prog_stats(pid)?;
    drop(stats_on);
    // The daemon kills its agents as it stops; the idle agent's client then ends.
    drop(daemon);
    drop(sleeper);
    let (agent_ns, agent_runs) = bpf_delta(&progs0, &progs1);
    let (outside_ns, outside_runs) = bpf_delta(&progs_idle, &progs2);
    anyhow::ensure!(
        agent_runs > 0,
        "the daemon's {} BPF programs counted no run with bpf_stats_enabled on",
        progs1.len()
    );

    let (mut b, mut e, mut e_true, mut d, mut d_true) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut per_build: Vec<DaemonCounters> = Vec::new();
    eprintln!("  wall / CPU of each run:");
    for round in 1..=ROUNDS {
        let bare_t = bare()?;
        let embedded_t = embedded(&build)?;
        e_true.push(embedded(&["/bin/true"])?);
        let daemon = BenchDaemon::start(agentd, &daemon_dir)?;
        let (daemon_t, spent) = via(&daemon, &build)?;
        per_build.push(spent);
        d_true.push(via(&daemon, &["/bin/true"])?.0);
        drop(daemon);
        eprintln!(
            "    round {round}: bare {:>6.2} / {:>6.2} s   embedded {:>6.2} / {:>6.2} s   daemon {:>6.2} / {:>6.2} s",
            bare_t.wall, bare_t.cpu, embedded_t.wall, embedded_t.cpu, daemon_t.wall, daemon_t.cpu
        );
        b.push(bare_t);
        e.push(embedded_t);
        d.push(daemon_t);
    }
    let (b, e, e_true, d, d_true) = (
        BuildMedians::of(&b),
        BuildMedians::of(&e),
        BuildMedians::of(&e_true),
        BuildMedians::of(&d),
        BuildMedians::of(&d_true),
    );
    let median_of = |f: fn(&DaemonCounters) -> u64| {
        let mut v: Vec<f64> = per_build.iter().map(|c| f(c) as f64).collect();
        v.sort_by(f64::total_cmp);
        percentile(&v, 0.5)
    };

    eprintln!(
        "  median of {ROUNDS} interleaved rounds   wall (fastest-slowest)            CPU, user+system of all its processes"
    );
    let row = |label: &str, wall: f64, cpu: f64, range: Option<&BuildMedians>| {
        let range = range.map_or(String::new(), |m| {
            format!("({:.2}-{:.2} s)", m.fastest, m.slowest)
        });
        eprintln!(
            "  {label:<36} {wall:>7.2} s ({:.2}x) {range:<17}  {cpu:>7.2} s ({:.2}x)",
            wall / b.wall,
            cpu / b.cpu
        );
    };
    row("bare (own session, nice 19)", b.wall, b.cpu, Some(&b));
    row("agentd run, embedded", e.wall, e.cpu, Some(&e));
    row(
        &format!("  minus its launch ({:.0} ms)", e_true.wall * 1e3),
        e.wall - e_true.wall,
        e.cpu - e_true.cpu,
        None,
    );
    row("through the daemon, audit log on", d.wall, d.cpu, Some(&d));
    row(
        &format!("  minus its launch ({:.0} ms)", d_true.wall * 1e3),
        d.wall - d_true.wall,
        d.cpu - d_true.cpu,
        None,
    );
    let events = median_of(|c| c.events);
    let (user, system) = (
        median_of(|c| c.user_ticks) / tck,
        median_of(|c| c.system_ticks) / tck,
    );
    eprintln!(
        "  one build through the daemon: {events:.0} events ({:.0} lost), {:.0} audit records ({:.2} MiB); \
         the daemon's own CPU (decoding, breaker, audit, fan-out): user {user:.2} s, system {system:.2} s ({:.0} µs an event)",
        median_of(|c| c.lost),
        median_of(|c| c.records),
        median_of(|c| c.bytes) / 1048576.0,
        (user + system) * 1e6 / events.max(1.0),
    );
    eprintln!("  where agentd's share goes:");
    eprintln!(
        "    the daemon with its audit log against embedded (no audit), launches subtracted: wall {:+.2} s, CPU {:+.2} s",
        (d.wall - d_true.wall) - (e.wall - e_true.wall),
        (d.cpu - d_true.cpu) - (e.cpu - e_true.cpu),
    );
    let cols = |label: &str, a: String, b: String| eprintln!("      {label:<38} {a:>24} {b:>30}");
    eprintln!("    one more build each way, a daemon loaded, bpf_stats_enabled on:");
    cols(
        "",
        "through the daemon".into(),
        "bare, an idle agent attached".into(),
    );
    cols(
        "wall",
        format!("{:.2} s", in_agent.wall),
        format!("{:.2} s", outside.wall),
    );
    cols(
        &format!("the watch's {} BPF programs, CPU", progs1.len()),
        format!("{:.1} ms", agent_ns as f64 / 1e6),
        format!("{:.1} ms", outside_ns as f64 / 1e6),
    );
    cols(
        "  runs (ns a run)",
        format!("{agent_runs} ({:.0})", agent_ns as f64 / agent_runs as f64),
        format!(
            "{outside_runs} ({:.0})",
            outside_ns as f64 / outside_runs.max(1) as f64
        ),
    );
    let cpu = |c: &DaemonCounters| {
        format!(
            "{:.2} / {:.2} s",
            c.user_ticks as f64 / tck,
            c.system_ticks as f64 / tck
        )
    };
    cols(
        "the daemon's own CPU, user / system",
        cpu(&spent),
        cpu(&idle),
    );
    let volume = |c: &DaemonCounters| {
        format!(
            "{} ({}), {}, {:.2} MiB",
            c.events,
            c.lost,
            c.records,
            c.bytes as f64 / 1048576.0
        )
    };
    cols(
        "events (lost), audit records, bytes",
        volume(&spent),
        volume(&idle),
    );
    eprintln!(
        "      (while an agent runs, some of the programs run for every process on the host: both columns include any other work there)"
    );
    eprintln!(
        "    Landlock and seccomp without the watch: not measured (no option or profile setting of agentd runs an agent without the watch)"
    );
    eprintln!(
        "  (the part took {:.1} min)",
        part_started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}
