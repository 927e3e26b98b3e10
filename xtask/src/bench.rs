//! `cargo xtask bench`: agentd's costs, each as a ratio to a baseline measured in the same
//! run on the same machine (never as absolute pass/fail thresholds).
//!
//! 1. The kernel watch's cost to processes outside agents and inside one (`agentd
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
    let out = Command::new(agentd)
        .args(["watch-test", "bench", "20000"])
        .output()?;
    if !out.status.success() {
        bail!(
            "agentd watch-test bench failed: {}",
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
