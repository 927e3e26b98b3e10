//! `agentd-harness watch-test`: the kernel watch end to end, as root, on this host.
//!
//! Loads the programs, makes a cgroup, adds it as an agent with a policy compiled from
//! inline TOML, and runs a child in it (under its own Landlock ruleset and a seccomp
//! filter that refuses mkdir, unshare, mount and umount2) that connects, sends, binds,
//! creates sockets, writes, renames, unlinks, opens canaries, execs and makes the refused
//! calls. Then checks the events, that a process outside the cgroup is unaffected (and
//! unreported, its failing mount included), that the kill flag kills and refuses, and that
//! removing the agent detaches. Prints one JSON document ({ok, checks, facts, ...}) and
//! exits 0 when every check passed. The cgroup and temp files are always removed.
//!
//! Modes: `watch-test` (the test), `watch-test bench [N]` (costs, see `bench.rs`), and the
//! internal `child*` / `bench-loops` modes the test runs in its children.

use std::{
    collections::BTreeMap,
    ffi::CString,
    io::{BufRead as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _, process::ExitStatusExt as _},
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tokio::{io::AsyncBufReadExt as _, io::AsyncWriteExt as _, sync::mpsc};

use super::bench;
use crate::bpf::{AgentHandle, Watch, decode::normalize};
use crate::{
    event::{Event, Kind, Layer, Verdict},
    profile::{CompileContext, compile, parse},
};

pub fn watch_selftest(args: &[String]) -> anyhow::Result<ExitCode> {
    let rest = args.get(1..).unwrap_or_default();
    match args.first().map(String::as_str) {
        None | Some("run") => runtime()?.block_on(run()),
        Some("bench") => {
            let n = rest
                .first()
                .map(|s| s.parse())
                .transpose()?
                .unwrap_or(20_000);
            runtime()?.block_on(bench_all(n))
        }
        Some("child") => child(rest),
        Some("child-kill") => child_kill(rest),
        Some("child-connect") => child_connect(rest),
        Some("child-outside") => child_outside(),
        Some("child-flood") => child_flood(rest),
        Some("bench-loops") => {
            let n: u32 = rest.first().context("bench-loops N DIR")?.parse()?;
            let dir = PathBuf::from(rest.get(1).context("bench-loops N DIR")?);
            println!("{}", serde_json::to_string(&bench::run_loops(n, &dir)?)?);
            Ok(ExitCode::SUCCESS)
        }
        Some(other) => bail!("unknown watch-test mode `{other}`"),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

// ------------------------------------------------------------------ fixtures (parent)

/// Capability numbers (linux/capability.h).
const CAP_NET_RAW: libc::c_ulong = 13;
const CAP_SYS_ADMIN: libc::c_ulong = 21;

/// A cgroup v2 directory for the test; on drop, kills what is left in it and removes it.
struct TestCgroup {
    dir: PathBuf,
}

impl TestCgroup {
    fn create(name: &str) -> anyhow::Result<TestCgroup> {
        let mounts = crate::host::mounts()?;
        let root = crate::host::cgroup2_mount(&mounts).context("no cgroup v2 mount")?;
        let dir = root.join(name);
        if dir.exists() {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            let _ = std::fs::remove_dir(&dir);
        }
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(TestCgroup { dir })
    }

    fn id(&self) -> anyhow::Result<u64> {
        Ok(std::fs::metadata(&self.dir)?.ino())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("watch-test: could not remove {}", self.dir.display());
    }
}

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A command of this binary that starts inside `cgroup`: the child joins it between fork
/// and exec, so everything it runs (from the exec of agentd on) is the agent's.
fn in_cgroup(cgroup: &Path, args: &[String]) -> anyhow::Result<tokio::process::Command> {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())?;
    let mut cmd = tokio::process::Command::new("/proc/self/exe");
    cmd.arg("watch-test").args(args);
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe calls open, write and close on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
    Ok(cmd)
}

async fn run_child_json(cmd: &mut tokio::process::Command) -> anyhow::Result<(Value, String)> {
    let out = cmd.stdin(Stdio::null()).output().await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = serde_json::from_str(stdout.trim())
        .with_context(|| format!("child printed no JSON ({}): {stdout}", out.status))?;
    Ok((v, format!("{}", out.status)))
}

/// Collects events until none arrived for `quiet` (at most `max`).
async fn collect(rx: &mut mpsc::Receiver<Event>, quiet: Duration, max: Duration) -> Vec<Event> {
    let mut out = Vec::new();
    let end = Instant::now() + max;
    while Instant::now() < end {
        match tokio::time::timeout(quiet, rx.recv()).await {
            Ok(Some(e)) => out.push(e),
            Ok(None) | Err(_) => break,
        }
    }
    out
}

#[derive(Debug, Default)]
struct Checks {
    list: Vec<Value>,
    failed: usize,
}

impl Checks {
    fn check(&mut self, name: &str, ok: bool, detail: impl Into<Value>) {
        if !ok {
            self.failed += 1;
        }
        self.list
            .push(json!({"name": name, "ok": ok, "detail": detail.into()}));
    }
}

fn find(events: &[Event], pred: impl Fn(&Event) -> bool) -> Option<&Event> {
    events.iter().find(|e| pred(e))
}

fn summary(e: Option<&Event>) -> Value {
    e.map_or(Value::Null, |e| {
        serde_json::to_value(e).unwrap_or(Value::Null)
    })
}

fn policy_toml(tmp: &Path, allowed_tcp: u16, allowed_udp: u16, bind_ok: u16) -> String {
    let t = tmp.display();
    format!(
        r#"
[agent]
name = "watch-selftest"
mode = "enforce"

[filesystem]
read = ["/"]
write = ["{t}/allowed"]
exec = ["/"]
canaries = ["{t}/canary"]

[network]
connect = [
    "127.0.0.1/32:{allowed_tcp}",
    "::1/128:{allowed_tcp}",
    "127.0.0.1/32:{allowed_udp}/udp",
]
bind = [{bind_ok}]
"#
    )
}

async fn run() -> anyhow::Result<ExitCode> {
    let pid = std::process::id();
    let tmp = TempDir(PathBuf::from(format!("/tmp/agentd-watch-test-{pid}")));
    let t = &tmp.0;
    for d in ["allowed", "denied", "canary", "canaryfoo"] {
        std::fs::create_dir_all(t.join(d))?;
    }
    std::fs::write(t.join("canary/secret"), "s3cret\n")?;
    std::fs::write(t.join("canaryfoo/file"), "not a canary\n")?;
    std::fs::write(t.join("denied/existing"), "x\n")?;

    // Listeners: connections complete from the backlog, no accept needed.
    let allowed = TcpListener::bind("127.0.0.1:0")?;
    let denied = TcpListener::bind("127.0.0.1:0")?;
    let (port_a, port_b) = (allowed.local_addr()?.port(), denied.local_addr()?.port());
    let udp_sink = UdpSocket::bind("127.0.0.1:0")?;
    let port_c = udp_sink.local_addr()?.port();
    let (port_d, port_d2) = (free_port()?, free_port()?);

    let text = policy_toml(t, port_a, port_a, port_d2);
    let profile = parse("watch-selftest", &text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut policy = compile(
        &profile,
        &CompileContext {
            workspace: t.clone(),
            home: t.clone(),
        },
    );
    // The watch alone: its children make one refused call after another. The breaker,
    // and the trips the kernel decides for it, have tests of their own.
    policy.breaker.action = crate::profile::Action::Deny;

    let cgroup = TestCgroup::create(&format!("agentd-test-{pid}"))?;
    let cg_id = cgroup.id()?;

    let t0 = Instant::now();
    let mut watch = Watch::load().map_err(|e| anyhow::anyhow!("Watch::load: {e:#}"))?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut rx = watch.try_events()?;
    let t0 = Instant::now();
    let handle: AgentHandle = watch
        .add_agent("selftest", &cgroup.dir, &policy, None)
        .map_err(|e| anyhow::anyhow!("add_agent: {e:#}"))?;
    let add_ms = t0.elapsed().as_secs_f64() * 1e3;

    let mut checks = Checks::default();
    let mut facts = serde_json::Map::new();
    checks.check(
        "handle names the agent and its cgroup",
        handle.agent_id() == "selftest" && handle.cgroup_id() == cg_id,
        json!([handle.agent_id(), handle.cgroup_id(), cg_id]),
    );

    let under = |rel: &str| t.join(rel).display().to_string();

    // 1. The agent child.
    let child_args: Vec<String> = vec![
        "child".into(),
        t.display().to_string(),
        port_a.to_string(),
        port_b.to_string(),
        port_c.to_string(),
        port_d.to_string(),
        port_d2.to_string(),
    ];
    let (results, status) = run_child_json(&mut in_cgroup(&cgroup.dir, &child_args)?).await?;
    let r = |k: &str| results.get(k).cloned().unwrap_or(Value::Null);
    let eperm = json!(libc::EPERM);
    let eacces = json!(libc::EACCES);
    checks.check("child exited 0", status.contains("exit status: 0"), status);
    for (name, want) in [
        ("tcp_connect_allowed", json!("ok")),
        ("tcp_connect_denied", eperm.clone()),
        ("tcp6_connect_mapped_denied", eperm.clone()),
        ("udp_sendto_denied", eperm.clone()),
        ("udp_sendto_allowed", json!("ok")),
        ("udp_bind_ephemeral", json!("ok")),
        ("tcp_bind_denied", eperm.clone()),
        ("tcp_bind_allowed", json!("ok")),
        ("raw_socket", eperm.clone()),
        ("unix_socket", json!("ok")),
        ("write_allowed", json!("ok")),
        ("write_denied", eacces.clone()),
        ("rename", json!("ok")),
        ("symlink", json!("ok")),
        ("chmod", json!("ok")),
        ("truncate", json!("ok")),
        ("unlink", json!("ok")),
        ("unlink_denied", eacces.clone()),
        ("mkdir_seccomp", eperm.clone()),
        ("unshare_seccomp", eperm.clone()),
        ("mount_seccomp", eperm.clone()),
        ("umount2_seccomp", eperm.clone()),
        ("canary_read", json!("ok")),
        ("canary_missing", json!(libc::ENOENT)),
        ("exec_true", json!("ok")),
        ("canary_relative_read", json!("ok")),
        ("canary_symlink_read", json!("ok")),
        ("not_canary_relative", json!("ok")),
        ("exec_relative_noexec", eacces.clone()),
    ] {
        let got = r(name);
        checks.check(&format!("child: {name} -> {want}"), got == want, got);
    }
    // The kernel may refuse ping sockets itself (EACCES, net.ipv4.ping_group_range)
    // before the sock_create hook runs; either way the agent has none.
    let icmp = r("icmp_dgram_socket");
    checks.check("child: icmp_dgram_socket refused", icmp.is_number(), icmp);
    let v6 = r("tcp6_connect_v6_allowed");
    checks.check(
        "child: tcp6_connect_v6_allowed is not refused by the BPF program",
        v6 != eperm && !v6.is_null(),
        v6,
    );
    for k in [
        "netlink_route_socket",
        "netlink_uevent_socket",
        "packet_socket",
    ] {
        facts.insert(format!("child_{k}"), r(k));
    }

    // 2. A process outside the cgroup is unaffected (and unseen).
    let outside = TcpStream::connect(("127.0.0.1", port_b)).map(|_| ());
    checks.check(
        "outside process connects to the port the agent may not",
        outside.is_ok(),
        format!("{outside:?}"),
    );
    std::fs::write(t.join("denied/outside.txt"), "outside\n")?;
    std::fs::remove_file(t.join("denied/outside.txt"))?;
    let mut outside_cmd = tokio::process::Command::new("/proc/self/exe");
    outside_cmd.args(["watch-test", "child-outside"]);
    // SAFETY: runs in the forked child before exec; prctl is async-signal-safe and takes
    // no pointers. Without CAP_SYS_ADMIN and CAP_NET_RAW in its bounding set, the child
    // (still root, so it can run this binary wherever it is) fails mount and packet
    // sockets with EPERM, as a seccomp refusal would.
    unsafe {
        outside_cmd.pre_exec(|| {
            for cap in [CAP_SYS_ADMIN, CAP_NET_RAW] {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let (outside_calls, _) = run_child_json(&mut outside_cmd).await?;
    checks.check(
        "outside process (no CAP_SYS_ADMIN, CAP_NET_RAW): mount EPERM, personality ok, packet socket EPERM",
        outside_calls.get("mount") == Some(&eperm)
            && outside_calls.get("personality") == Some(&json!("ok"))
            && outside_calls.get("packet_socket") == Some(&eperm),
        outside_calls,
    );

    // 2b. Lost events are counted and reported, never silent: flood while nobody reads.
    const FLOOD: u32 = 20_000;
    let (flood, _) = run_child_json(&mut in_cgroup(
        &cgroup.dir,
        &[
            "child-flood".into(),
            t.display().to_string(),
            FLOOD.to_string(),
        ],
    )?)
    .await?;
    let burst = collect(
        &mut rx,
        Duration::from_millis(1500),
        Duration::from_secs(20),
    )
    .await;
    let writes = burst
        .iter()
        .filter(|e| e.kind == Kind::OpenWrite && e.agent == "selftest")
        .count() as u64;
    let lost: u64 = burst
        .iter()
        .filter(|e| e.kind == Kind::Lost && e.agent == "selftest")
        .filter_map(|e| e.detail.get("count").and_then(Value::as_u64))
        .sum();
    // Keep the other events (the agent child's) for the checks below.
    let flood_path = under("allowed/flood");
    let mut events: Vec<Event> = burst
        .into_iter()
        .filter(|e| e.kind != Kind::Lost && e.path.as_deref() != Some(flood_path.as_str()))
        .collect();
    facts.insert("flood_delivered".into(), json!(writes));
    facts.insert("flood_lost_reported".into(), json!(lost));
    checks.check(
        "flood: every write is delivered or counted as lost",
        flood.get("opened") == Some(&json!(FLOOD)) && writes + lost >= u64::from(FLOOD),
        json!({"delivered": writes, "lost": lost, "child": flood}),
    );

    // 3. A second agent, in monitor mode: a refused connect is recorded, not enforced.
    let monitor_cg = TestCgroup::create(&format!("agentd-test-{pid}-monitor"))?;
    let monitor_policy = compile(
        &parse(
            "watch-selftest-monitor",
            &text.replace("mode = \"enforce\"", "mode = \"monitor\""),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?,
        &CompileContext {
            workspace: t.clone(),
            home: t.clone(),
        },
    );
    let monitor = watch
        .add_agent("selftest-monitor", &monitor_cg.dir, &monitor_policy, None)
        .map_err(|e| anyhow::anyhow!("add_agent (monitor): {e:#}"))?;
    let (mon, _) = run_child_json(&mut in_cgroup(
        &monitor_cg.dir,
        &["child-connect".into(), port_b.to_string()],
    )?)
    .await?;
    checks.check(
        "monitor-mode agent: the refused connect goes through",
        mon.get("connect") == Some(&json!("ok")),
        mon,
    );

    // 4. The kill flag: a waiting child in the cgroup; set the flag, let it go on.
    let mut cmd = in_cgroup(
        &cgroup.dir,
        &[
            "child-kill".into(),
            t.display().to_string(),
            port_a.to_string(),
        ],
    )?;
    let mut kid = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("spawn child-kill")?;
    let killed_pid = kid.id().unwrap_or(0);
    let mut lines = tokio::io::BufReader::new(kid.stdout.take().context("stdout")?).lines();
    let ready = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await;
    checks.check(
        "kill child is ready",
        matches!(&ready, Ok(Ok(Some(l))) if l == "ready"),
        format!("{ready:?}"),
    );
    let t_kill = Instant::now();
    watch
        .set_killed(cg_id)
        .map_err(|e| anyhow::anyhow!("set_killed: {e:#}"))?;
    let mut stdin = kid.stdin.take().context("stdin")?;
    stdin.write_all(b"go\n").await?;
    stdin.flush().await?;
    let mut kill_out = Vec::new();
    while let Ok(Ok(Some(l))) =
        tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await
    {
        kill_out.push(l);
    }
    let st = tokio::time::timeout(Duration::from_secs(10), kid.wait()).await??;
    facts.insert(
        "kill_flag_to_reaped_ms".into(),
        json!(t_kill.elapsed().as_secs_f64() * 1e3),
    );
    checks.check(
        "killed agent's process is SIGKILLed by the kill gate",
        st.signal() == Some(libc::SIGKILL),
        format!("{st} output {kill_out:?}"),
    );
    // Asleep in read() when the flag was set: the gate kills it at that call's exit, so
    // it never connects nor prints again.
    checks.check(
        "killed agent's process completes no system call after the flag",
        kill_out.is_empty(),
        json!(kill_out),
    );

    // 5. Events.
    events.extend(collect(&mut rx, Duration::from_millis(400), Duration::from_secs(5)).await);
    let mine: Vec<Event> = events
        .iter()
        .filter(|e| e.agent == "selftest")
        .cloned()
        .collect();
    let strangers: Vec<&Event> = events
        .iter()
        .filter(|e| e.agent != "selftest" && e.agent != "selftest-monitor")
        .collect();
    checks.check(
        "every event names its agent",
        strangers.is_empty(),
        json!(strangers),
    );
    let e = find(&events, |e| {
        e.agent == "selftest-monitor" && e.kind == Kind::Connect && e.port == Some(port_b)
    });
    checks.check(
        "event: monitor-mode connect recorded as deny, flagged monitor, no errno",
        e.is_some_and(|e| {
            e.verdict == Verdict::Deny
                && e.errno.is_none()
                && e.detail.get("monitor") == Some(&json!(true))
        }),
        summary(e),
    );
    watch
        .remove_agent(monitor)
        .map_err(|e| anyhow::anyhow!("remove_agent (monitor): {e:#}"))?;
    drop(monitor_cg);
    let net = |kind: Kind, port: u16, verdict: Verdict| {
        find(&mine, |e| {
            e.kind == kind && e.port == Some(port) && e.verdict == verdict && e.layer == Layer::Bpf
        })
    };
    let v4: std::net::IpAddr = "127.0.0.1".parse()?;
    let e = net(Kind::Connect, port_a, Verdict::Allow);
    checks.check(
        "event: connect allowed (tcp, 127.0.0.1)",
        e.is_some_and(|e| e.addr == Some(v4) && e.proto.as_deref() == Some("tcp")),
        summary(e),
    );
    let e = net(Kind::Connect, port_b, Verdict::Deny);
    checks.check(
        "event: connect denied with EPERM",
        e.is_some_and(|e| e.errno == Some(libc::EPERM)),
        summary(e),
    );
    let e = find(&mine, |e| {
        e.kind == Kind::Connect
            && e.port == Some(port_b)
            && e.detail.get("family") == Some(&json!("inet6"))
    });
    checks.check(
        "event: IPv4-mapped IPv6 connect decided by the v4 rule",
        e.is_some_and(|e| e.verdict == Verdict::Deny && e.addr == Some(v4)),
        summary(e),
    );
    let e = net(Kind::Sendmsg, port_c, Verdict::Deny);
    checks.check(
        "event: UDP sendto denied",
        e.is_some_and(|e| e.proto.as_deref() == Some("udp")),
        summary(e),
    );
    let e = net(Kind::Sendmsg, port_a, Verdict::Allow);
    checks.check("event: UDP sendto allowed", e.is_some(), summary(e));
    let e = net(Kind::Bind, port_d, Verdict::Deny);
    checks.check("event: bind denied", e.is_some(), summary(e));
    let e = net(Kind::Bind, port_d2, Verdict::Allow);
    checks.check("event: bind allowed", e.is_some(), summary(e));
    let e = find(&mine, |e| {
        e.kind == Kind::Socket && e.detail.get("type") == Some(&json!("raw"))
    });
    checks.check(
        "event: raw socket refused",
        e.is_some_and(|e| e.verdict == Verdict::Deny && e.layer == Layer::Bpf),
        summary(e),
    );
    let unix_seen = find(&mine, |e| {
        e.kind == Kind::Socket && e.detail.get("family") == Some(&json!("unix"))
    });
    facts.insert(
        "sock_create_runs_for_af_unix".into(),
        json!(unix_seen.is_some()),
    );
    let packet_seen = find(&mine, |e| {
        e.kind == Kind::Socket && e.detail.get("family") == Some(&json!("packet"))
    });
    facts.insert(
        "sock_create_runs_for_af_packet".into(),
        json!(packet_seen.is_some()),
    );

    let file = |kind: Kind, rel: &str| {
        let p = under(rel);
        find(&mine, move |e| {
            e.kind == kind && e.path.as_deref() == Some(p.as_str())
        })
    };
    let e = file(Kind::OpenWrite, "allowed/a.txt");
    checks.check(
        "event: write in the writable dir, allowed",
        e.is_some_and(|e| e.verdict == Verdict::Allow && e.errno.is_none()),
        summary(e),
    );
    let e = file(Kind::OpenWrite, "denied/b.txt");
    checks.check(
        "event: write outside, denied by landlock with EACCES",
        e.is_some_and(|e| {
            e.verdict == Verdict::Deny
                && e.layer == Layer::Landlock
                && e.errno == Some(libc::EACCES)
        }),
        summary(e),
    );
    let e = file(Kind::Rename, "allowed/a.txt");
    checks.check(
        "event: rename with both paths",
        e.is_some_and(|e| e.path2.as_deref() == Some(under("allowed/c.txt").as_str())),
        summary(e),
    );
    let e = find(&mine, |e| {
        e.kind == Kind::Symlink && e.path2.as_deref() == Some(under("allowed/ln").as_str())
    });
    checks.check(
        "event: symlink (target, link)",
        e.is_some_and(|e| e.path.as_deref() == Some("/etc/hostname")),
        summary(e),
    );
    let e = file(Kind::Chmod, "allowed/c.txt");
    checks.check(
        "event: chmod with mode",
        e.is_some_and(|e| e.detail.get("mode") == Some(&json!("0600"))),
        summary(e),
    );
    let e = file(Kind::Truncate, "allowed/c.txt");
    checks.check("event: truncate", e.is_some(), summary(e));
    let e = file(Kind::Unlink, "allowed/c.txt");
    checks.check(
        "event: unlink allowed",
        e.is_some_and(|e| e.verdict == Verdict::Allow),
        summary(e),
    );
    let e = file(Kind::Unlink, "denied/existing");
    checks.check(
        "event: unlink denied by landlock",
        e.is_some_and(|e| e.layer == Layer::Landlock && e.verdict == Verdict::Deny),
        summary(e),
    );
    let e = find(&mine, |e| {
        e.kind == Kind::Mkdir && e.layer == Layer::Seccomp
    });
    checks.check(
        "event: mkdir refused by seccomp is reported (layer seccomp, EPERM)",
        e.is_some_and(|e| e.errno == Some(libc::EPERM) && e.verdict == Verdict::Deny),
        summary(e),
    );
    for call in ["unshare", "mount", "umount2"] {
        let e = find(&mine, |e| {
            e.kind == Kind::Syscall && e.detail.get("syscall") == Some(&json!(call))
        });
        checks.check(
            &format!("event: {call} refused by seccomp (kind syscall, layer seccomp, EPERM)"),
            e.is_some_and(|e| {
                e.layer == Layer::Seccomp
                    && e.verdict == Verdict::Deny
                    && e.errno == Some(libc::EPERM)
            }),
            summary(e),
        );
    }
    let e = find(&events, |e| {
        e.kind == Kind::Syscall && e.agent != "selftest"
    });
    checks.check(
        "no syscall event for a process outside the cgroup",
        e.is_none(),
        summary(e),
    );
    // The raw socket: refused and reported by the cgroup program, not again at its exit.
    let e = find(&mine, |e| {
        e.kind == Kind::Syscall
            && e.detail.get("syscall") == Some(&json!("socket"))
            && e.errno == Some(libc::EPERM)
    });
    checks.check(
        "no syscall event for the socket the cgroup program refused and reported",
        e.is_none(),
        summary(e),
    );
    // What this kernel does with a call seccomp refuses: the exit tracepoint fires, the
    // entry one does not (the filter runs first in syscall_trace_enter).
    let mkdir_any = find(&mine, |e| e.kind == Kind::Mkdir);
    facts.insert(
        "seccomp_refused_call_reaches_sys_enter".into(),
        json!(mkdir_any.map(|e| e.detail.get("entry_seen") != Some(&json!(false)))),
    );
    facts.insert(
        "seccomp_refused_call_reaches_sys_exit".into(),
        json!(mkdir_any.is_some()),
    );

    let e = file(Kind::Canary, "canary/secret");
    checks.check(
        "event: canary read (allowed open)",
        e.is_some_and(|e| e.errno.is_none()),
        summary(e),
    );
    let e = file(Kind::Canary, "canary/nonexistent");
    checks.check(
        "event: canary open that failed (ENOENT) still reported",
        e.is_some_and(|e| e.errno == Some(libc::ENOENT)),
        summary(e),
    );
    let e = file(Kind::Canary, "canary");
    checks.check(
        "event: opening the canary directory itself",
        e.is_some(),
        summary(e),
    );
    let e = find(&mine, |e| {
        e.kind == Kind::Canary
            && e.path
                .as_deref()
                .is_some_and(|p| p.starts_with(&under("canaryfoo")))
    });
    checks.check(
        "no canary event for a sibling sharing the prefix (canaryfoo)",
        e.is_none(),
        summary(e),
    );
    for (name, path) in [
        ("relative path", "canary/secret"),
        ("path spelt with // and .", "canary/secret"),
    ] {
        let p = under(path);
        let hits: Vec<&Event> = mine
            .iter()
            .filter(|e| {
                e.kind == Kind::Canary
                    && e.errno == Some(libc::EACCES)
                    && e.detail.get("canary") == Some(&json!(under("canary")))
                    && e.path.as_deref().map(|x| normalize(Path::new(x))) == Some(PathBuf::from(&p))
            })
            .collect();
        checks.check(
            &format!("event: canary opened by a {name}, refused, resolved"),
            !hits.is_empty() && hits.iter().all(|e| e.verdict == Verdict::Deny),
            json!(hits),
        );
    }
    for (name, path, arg) in [
        ("relative path", "canary/secret", "./secret"),
        // The event names the file the kernel opened, the spelling is `path_arg`.
        ("symlink", "canary/secret", "allowed/canary-link"),
    ] {
        let p = under(path);
        let e = find(&mine, |e| {
            e.kind == Kind::Canary
                && e.path.as_deref() == Some(p.as_str())
                && e.detail.get("path_arg") == Some(&json!(arg))
        });
        checks.check(
            &format!("event: canary opened by a {name}, allowed, matched by inode"),
            e.is_some_and(|e| {
                e.errno.is_none()
                    && e.verdict == Verdict::Allow
                    && e.detail.get("canary") == Some(&json!(under("canary")))
            }),
            summary(e),
        );
    }
    let p = under("allowed/noexec");
    let e = find(&mine, |e| {
        e.kind == Kind::Exec && e.errno == Some(libc::EACCES) && e.detail.get("path_arg").is_some()
    });
    checks.check(
        "event: relative exec refused by a process gone at once, path from the kernel's cwd",
        e.is_some_and(|e| {
            e.path.as_deref() == Some(p.as_str())
                && e.detail.get("path_arg") == Some(&json!("./allowed/noexec"))
        }),
        summary(e),
    );
    let p = under("canary/secret");
    // The path's page was not resident at the call's entry (a tracepoint cannot fault it
    // in); the exit reads it again, after the kernel copied it in.
    let e = find(&mine, |e| {
        e.kind == Kind::Canary && e.path.as_deref() == Some(p.as_str())
    });
    let unread = find(&mine, |e| e.detail.get("path_unread").is_some());
    checks.check(
        "event: canary opened through a path not resident at entry, read at the exit",
        e.is_some() && unread.is_none() && r("canary_unread_path") == json!("ok"),
        json!([summary(e), summary(unread), r("canary_unread_path")]),
    );
    let count = |kind: Kind, rel: &str| {
        let p = under(rel);
        mine.iter()
            .filter(|e| e.kind == kind && e.path.as_deref() == Some(p.as_str()))
            .count()
    };
    checks.check(
        "event: a write to a canary is one canary event and one write event",
        count(Kind::Canary, "canary/w.txt") == 1 && count(Kind::OpenWrite, "canary/w.txt") == 1,
        json!([
            count(Kind::Canary, "canary/w.txt"),
            count(Kind::OpenWrite, "canary/w.txt"),
            r("canary_write_absolute")
        ]),
    );
    checks.check(
        "event: a write to a canary by a relative path is a canary event",
        count(Kind::Canary, "canary/rel.txt") == 1,
        json!([
            count(Kind::Canary, "canary/rel.txt"),
            r("canary_write_relative")
        ]),
    );
    checks.check(
        "child: canary opens the kernel cannot match were refused (EACCES)",
        r("canary_relative") == eacces && r("canary_double_slash") == eacces,
        json!([r("canary_relative"), r("canary_double_slash")]),
    );
    let e = find(&mine, |e| {
        e.kind == Kind::Canary && e.path.as_deref().is_some_and(|p| p.contains("canaryfoo"))
    });
    checks.check(
        "no canary event for a refused read that is no canary",
        e.is_none() && r("read_refused_not_canary") == eacces,
        summary(e),
    );
    // As the kernel resolved it: /usr/bin/true where /bin is a link to usr/bin.
    let true_path = std::fs::canonicalize("/bin/true")?;
    let e = find(&mine, |e| {
        e.kind == Kind::Exec && e.path.as_deref() == true_path.to_str()
    });
    checks.check(
        "event: exec /bin/true with argv and the new comm",
        e.is_some_and(|e| {
            e.verdict == Verdict::Allow
                && e.comm == "true"
                && e.detail.get("argv") == Some(&json!(["/bin/true", "x"]))
        }),
        summary(e),
    );
    let e = find(&mine, |e| e.kind == Kind::Fork);
    checks.check("event: fork", e.is_some(), summary(e));
    let e = find(&mine, |e| {
        e.kind == Kind::ProcessExit && e.detail.get("signal") == Some(&json!(libc::SIGKILL))
    });
    checks.check(
        "event: exit of the killed process, signal 9",
        e.is_some(),
        summary(e),
    );
    // The killed child never reaches its connect (the gate kills it first).
    let e = find(&mine, |e| {
        e.pid == killed_pid && matches!(e.kind, Kind::Connect | Kind::Socket)
    });
    checks.check(
        "event: no network call of the killed process",
        e.is_none(),
        summary(e),
    );
    let e = find(&events, |e| {
        e.path.as_deref().is_some_and(|p| p.contains("outside.txt"))
    });
    checks.check(
        "no event for the process outside the cgroup",
        e.is_none(),
        summary(e),
    );
    let lost = find(&events, |e| e.kind == Kind::Lost);
    checks.check("no lost events", lost.is_none(), summary(lost));

    // 6. Removal detaches: a new process in the cgroup connects where the agent could not.
    watch
        .remove_agent(handle)
        .map_err(|e| anyhow::anyhow!("remove_agent: {e:#}"))?;
    let (after, _) = run_child_json(&mut in_cgroup(
        &cgroup.dir,
        &["child-connect".into(), port_b.to_string()],
    )?)
    .await?;
    checks.check(
        "after remove_agent the cgroup is no longer restricted",
        after.get("connect") == Some(&json!("ok")),
        after,
    );
    let late = collect(&mut rx, Duration::from_millis(200), Duration::from_secs(1)).await;
    checks.check(
        "no events after remove_agent",
        late.is_empty(),
        json!(late.len()),
    );
    drop(watch);

    let ok = checks.failed == 0;
    let doc = json!({
        "ok": ok,
        "failed": checks.failed,
        "checks": checks.list,
        "facts": facts,
        "timings_ms": {"load": load_ms, "add_agent": add_ms},
        "child": results,
        "events": events,
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    drop(udp_sink);
    drop((allowed, denied));
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

// ------------------------------------------------------------------ children

fn errno_of(r: std::io::Result<()>) -> Value {
    match r {
        Ok(()) => json!("ok"),
        Err(e) => e
            .raw_os_error()
            .map_or_else(|| json!(e.to_string()), |n| json!(n)),
    }
}

fn last_errno(rc: libc::c_int) -> Value {
    if rc >= 0 {
        json!("ok")
    } else {
        json!(std::io::Error::last_os_error().raw_os_error())
    }
}

fn socket(domain: i32, ty: i32, proto: i32) -> Value {
    // SAFETY: plain syscall; the fd is closed when valid.
    let fd = unsafe { libc::socket(domain, ty, proto) };
    let v = last_errno(fd);
    if fd >= 0 {
        // SAFETY: `fd` is ours.
        unsafe { libc::close(fd) };
    }
    v
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

/// Landlock: writes only beneath `allowed` (reads and execs are not restricted, so the
/// test's own plumbing keeps working).
fn restrict_writes(allowed: &Path) -> anyhow::Result<()> {
    use landlock::{
        ABI, AccessFs, Ruleset, RulesetAttr as _, RulesetCreatedAttr as _, RulesetStatus,
        path_beneath_rules,
    };
    // The write rights of ABI 3 (truncate), or of the kernel's older ABI: every kernel
    // then enforces the ruleset fully (the checks need no right newer than ABI 1).
    let abi = ABI::from(crate::sandbox::landlock::kernel_abi().clamp(1, 3));
    let status = Ruleset::default()
        .handle_access(AccessFs::from_write(abi))?
        .create()?
        .add_rules(path_beneath_rules([allowed], AccessFs::from_write(abi)))?
        .restrict_self()?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        bail!("landlock not fully enforced: {:?}", status.ruleset);
    }
    Ok(())
}

/// seccomp: mkdir, mkdirat, unshare, mount and umount2 fail with EPERM, everything else is
/// allowed.
fn refuse_some_calls() -> anyhow::Result<()> {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};
    let mut rules = BTreeMap::new();
    #[cfg(target_arch = "x86_64")]
    rules.insert(libc::SYS_mkdir, vec![]);
    rules.insert(libc::SYS_mkdirat, vec![]);
    rules.insert(libc::SYS_unshare, vec![]);
    rules.insert(libc::SYS_mount, vec![]);
    rules.insert(libc::SYS_umount2, vec![]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        std::env::consts::ARCH.try_into()?,
    )?;
    let prog: BpfProgram = filter.try_into()?;
    seccompiler::apply_filter(&prog)?;
    Ok(())
}

/// child TMP A B C D D2: the agent's actions; prints {action: "ok" | errno}.
fn child(args: &[String]) -> anyhow::Result<ExitCode> {
    let [tmp, a, b, c, d, d2] = args else {
        bail!("child TMP A B C D D2");
    };
    let t = PathBuf::from(tmp);
    let (a, b, c, d, d2): (u16, u16, u16, u16, u16) =
        (a.parse()?, b.parse()?, c.parse()?, d.parse()?, d2.parse()?);
    restrict_writes(&t.join("allowed"))?;
    refuse_some_calls()?;

    let mut r = serde_json::Map::new();
    let timeout = Duration::from_secs(2);
    let tcp = |addr: &str| {
        let addr: SocketAddr = addr.parse().map_err(std::io::Error::other)?;
        TcpStream::connect_timeout(&addr, timeout).map(|_| ())
    };
    r.insert(
        "tcp_connect_allowed".into(),
        errno_of(tcp(&format!("127.0.0.1:{a}"))),
    );
    r.insert(
        "tcp_connect_denied".into(),
        errno_of(tcp(&format!("127.0.0.1:{b}"))),
    );
    r.insert(
        "tcp6_connect_mapped_denied".into(),
        errno_of(tcp(&format!("[::ffff:127.0.0.1]:{b}"))),
    );
    r.insert(
        "tcp6_connect_v6_allowed".into(),
        errno_of(tcp(&format!("[::1]:{a}"))),
    );
    let sendto = |port: u16| {
        // SAFETY: plain socket calls on a sockaddr_in built here; the fd is closed.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            if fd < 0 {
                return last_errno(fd);
            }
            let mut sin: libc::sockaddr_in = std::mem::zeroed();
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = port.to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
            let n = libc::sendto(
                fd,
                b"x".as_ptr().cast(),
                1,
                0,
                (&raw const sin).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            let v = last_errno(n as libc::c_int);
            libc::close(fd);
            v
        }
    };
    r.insert("udp_sendto_denied".into(), sendto(c));
    r.insert("udp_sendto_allowed".into(), sendto(a));
    r.insert(
        "udp_bind_ephemeral".into(),
        errno_of(UdpSocket::bind("127.0.0.1:0").map(|_| ())),
    );
    r.insert(
        "tcp_bind_denied".into(),
        errno_of(TcpListener::bind(("127.0.0.1", d)).map(|_| ())),
    );
    r.insert(
        "tcp_bind_allowed".into(),
        errno_of(TcpListener::bind(("127.0.0.1", d2)).map(|_| ())),
    );
    r.insert(
        "raw_socket".into(),
        socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP),
    );
    r.insert(
        "icmp_dgram_socket".into(),
        socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP),
    );
    r.insert(
        "unix_socket".into(),
        socket(libc::AF_UNIX, libc::SOCK_STREAM, 0),
    );
    r.insert(
        "netlink_route_socket".into(),
        socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE),
    );
    r.insert(
        "netlink_uevent_socket".into(),
        socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM,
            libc::NETLINK_KOBJECT_UEVENT,
        ),
    );
    r.insert(
        "packet_socket".into(),
        socket(libc::AF_PACKET, libc::SOCK_RAW, 0),
    );

    let write = |p: PathBuf| {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(p)
            .map(|_| ())
    };
    r.insert(
        "write_allowed".into(),
        errno_of(write(t.join("allowed/a.txt"))),
    );
    r.insert(
        "write_denied".into(),
        errno_of(write(t.join("denied/b.txt"))),
    );
    r.insert(
        "rename".into(),
        errno_of(std::fs::rename(
            t.join("allowed/a.txt"),
            t.join("allowed/c.txt"),
        )),
    );
    r.insert(
        "symlink".into(),
        errno_of(std::os::unix::fs::symlink(
            "/etc/hostname",
            t.join("allowed/ln"),
        )),
    );
    // SAFETY: valid NUL-terminated paths.
    r.insert(
        "chmod".into(),
        last_errno(unsafe { libc::chmod(cpath(&t.join("allowed/c.txt")).as_ptr(), 0o600) }),
    );
    // SAFETY: as above.
    r.insert(
        "truncate".into(),
        last_errno(unsafe { libc::truncate(cpath(&t.join("allowed/c.txt")).as_ptr(), 1) }),
    );
    r.insert(
        "unlink".into(),
        errno_of(std::fs::remove_file(t.join("allowed/c.txt"))),
    );
    r.insert(
        "unlink_denied".into(),
        errno_of(std::fs::remove_file(t.join("denied/existing"))),
    );
    r.insert(
        "mkdir_seccomp".into(),
        errno_of(std::fs::create_dir(t.join("allowed/d"))),
    );
    // Calls the watch sees at their exit only. The child is root: without the filter,
    // unshare would succeed.
    // SAFETY: unshare takes no pointer.
    r.insert(
        "unshare_seccomp".into(),
        last_errno(unsafe { libc::unshare(libc::CLONE_NEWUSER) }),
    );
    let target = cpath(&t.join("allowed"));
    // SAFETY: valid NUL-terminated strings; the filter refuses before they are read.
    r.insert(
        "mount_seccomp".into(),
        last_errno(unsafe {
            libc::mount(
                c"none".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        }),
    );
    // SAFETY: as above.
    r.insert(
        "umount2_seccomp".into(),
        last_errno(unsafe { libc::umount2(target.as_ptr(), 0) }),
    );
    let read = |p: PathBuf| std::fs::File::open(p).map(|_| ());
    r.insert(
        "canary_read".into(),
        errno_of(read(t.join("canary/secret"))),
    );
    r.insert(
        "canary_missing".into(),
        errno_of(read(t.join("canary/nonexistent"))),
    );
    r.insert("canary_dir".into(), errno_of(read(t.join("canary"))));
    r.insert(
        "not_canary".into(),
        errno_of(read(t.join("canaryfoo/file"))),
    );
    r.insert(
        "exec_true".into(),
        errno_of(
            std::process::Command::new("/bin/true")
                .arg("x")
                .status()
                .and_then(|s| {
                    if s.success() {
                        Ok(())
                    } else {
                        Err(std::io::Error::other(s.to_string()))
                    }
                }),
        ),
    );
    // A canary path in a page the process never touched: the entry tracepoint cannot
    // read it (no faults there), the kernel can. Kept open so user space resolves it from
    // the fd.
    let unread_fd = open_untouched(&t.join("allowed/pathbuf"), &t.join("canary/secret"))?;
    r.insert("canary_unread_path".into(), last_errno(unread_fd));
    // Allowed opens of the canary by paths that do not start with it: the kernel matches
    // the opened file by inode. Then a relative exec refused by a process that is gone at
    // once: its path resolves from the directory the kernel read, not from /proc.
    std::env::set_current_dir(t.join("canary"))?;
    r.insert(
        "canary_relative_read".into(),
        errno_of(read(PathBuf::from("./secret"))),
    );
    std::env::set_current_dir(&t)?;
    std::os::unix::fs::symlink(t.join("canary/secret"), t.join("allowed/canary-link"))?;
    r.insert(
        "canary_symlink_read".into(),
        errno_of(read(PathBuf::from("allowed/canary-link"))),
    );
    r.insert(
        "not_canary_relative".into(),
        errno_of(read(PathBuf::from("canaryfoo/file"))),
    );
    std::fs::write(t.join("allowed/noexec"), "#!/bin/sh\n")?;
    r.insert(
        "exec_relative_noexec".into(),
        errno_of(
            std::process::Command::new("./allowed/noexec")
                .status()
                .map(|_| ()),
        ),
    );

    // Last, since it also restricts reads: canaries opened by paths the kernel cannot
    // match as written, refused by Landlock. User space resolves them (while this
    // process lives: hence the pause).
    restrict_reads(&t)?;
    std::env::set_current_dir(&t)?;
    r.insert(
        "canary_relative".into(),
        errno_of(read(PathBuf::from("canary/secret"))),
    );
    let mut odd = t.as_os_str().to_owned();
    odd.push("//canary/./secret");
    r.insert(
        "canary_double_slash".into(),
        errno_of(read(PathBuf::from(odd))),
    );
    r.insert(
        "canary_write_absolute".into(),
        errno_of(write(t.join("canary/w.txt"))),
    );
    r.insert(
        "canary_write_relative".into(),
        errno_of(write(PathBuf::from("canary/rel.txt"))),
    );
    r.insert(
        "read_refused_not_canary".into(),
        errno_of(read(PathBuf::from("canaryfoo/file"))),
    );
    std::thread::sleep(Duration::from_millis(300));
    if unread_fd >= 0 {
        // SAFETY: our fd.
        unsafe { libc::close(unread_fd) };
    }
    println!("{}", Value::Object(r));
    Ok(ExitCode::SUCCESS)
}

/// Writes `target` (NUL-terminated) to `buf_file`, maps the file without touching the
/// mapping, and opens `target` through the mapped string. Returns open's result.
fn open_untouched(buf_file: &Path, target: &Path) -> anyhow::Result<libc::c_int> {
    let mut bytes = target.as_os_str().as_bytes().to_vec();
    bytes.push(0);
    std::fs::write(buf_file, &bytes)?;
    let f = std::fs::File::open(buf_file)?;
    // SAFETY: a fresh private read-only mapping of a file we own, unmapped below; only
    // the kernel reads it (as open's path argument).
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        );
        if p == libc::MAP_FAILED {
            bail!("mmap: {}", std::io::Error::last_os_error());
        }
        let fd = libc::open(p.cast(), libc::O_RDONLY);
        libc::munmap(p, 4096);
        Ok(fd)
    }
}

/// A second Landlock layer: reads only beneath the system directories and `tmp/allowed`.
fn restrict_reads(tmp: &Path) -> anyhow::Result<()> {
    use landlock::{
        ABI, AccessFs, BitFlags, Ruleset, RulesetAttr as _, RulesetCreatedAttr as _, RulesetStatus,
        path_beneath_rules,
    };
    let read: BitFlags<AccessFs> = AccessFs::ReadFile | AccessFs::ReadDir;
    let status = Ruleset::default()
        .handle_access(read)?
        .create()?
        .add_rules(path_beneath_rules(
            ["/usr", "/lib", "/lib64", "/bin", "/etc", "/proc", "/dev"]
                .iter()
                .map(PathBuf::from)
                .chain([tmp.join("allowed")]),
            read,
        ))?
        .restrict_self()?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        bail!("landlock (reads) not fully enforced: {:?}", status.ruleset);
    }
    let _ = ABI::V3;
    Ok(())
}

/// child-kill TMP A: "ready", wait for a line, connect, then a covered syscall. With the
/// kill flag set while it waits, it dies at the exit of its read (the kill gate).
fn child_kill(args: &[String]) -> anyhow::Result<ExitCode> {
    let [tmp, a] = args else {
        bail!("child-kill TMP A");
    };
    let mut out = std::io::stdout();
    writeln!(out, "ready")?;
    out.flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let conn =
        TcpStream::connect_timeout(&format!("127.0.0.1:{a}").parse()?, Duration::from_secs(2));
    let v = match conn {
        Ok(_) => "ok".to_owned(),
        Err(e) => e.raw_os_error().unwrap_or(-1).to_string(),
    };
    writeln!(out, "connect={v}")?;
    out.flush()?;
    let _ = std::fs::File::create(Path::new(tmp).join("allowed/kill.txt"));
    writeln!(out, "survived")?;
    Ok(ExitCode::from(3))
}

/// child-flood TMP N: N write-opens as fast as possible; prints {opened: N}.
/// `child-flood TMP N [RATE]`: N opens for write of TMP/allowed/flood, at RATE per second
/// (paced every 100 calls) or as fast as it can.
fn child_flood(args: &[String]) -> anyhow::Result<ExitCode> {
    let (tmp, n, rate) = match args {
        [tmp, n] => (tmp, n, None),
        [tmp, n, rate] => (tmp, n, Some(rate.parse::<f64>()?)),
        _ => bail!("child-flood TMP N [RATE]"),
    };
    let n: u32 = n.parse()?;
    let path = cpath(&Path::new(tmp).join("allowed/flood"));
    let mut opened = 0u32;
    let start = Instant::now();
    for i in 0..n {
        if let Some(rate) = rate
            && i % 100 == 0
        {
            let due = Duration::from_secs_f64(f64::from(i) / rate);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        // SAFETY: valid NUL-terminated path; the fd is closed at once.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o600) };
        if fd >= 0 {
            opened += 1;
            // SAFETY: our fd.
            unsafe { libc::close(fd) };
        }
    }
    println!("{}", json!({"opened": opened}));
    Ok(ExitCode::SUCCESS)
}

/// child-outside: outside every agent, without CAP_SYS_ADMIN and CAP_NET_RAW: calls the
/// watch sees at their exit only, failing the way a seccomp refusal does (EPERM) and
/// succeeding; prints {call: "ok" | errno}.
fn child_outside() -> anyhow::Result<ExitCode> {
    let mut r = serde_json::Map::new();
    // SAFETY: valid NUL-terminated strings; mount fails (no CAP_SYS_ADMIN) before using
    // them beyond reading.
    r.insert(
        "mount".into(),
        last_errno(unsafe {
            libc::mount(
                c"none".as_ptr(),
                c"/tmp".as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        }),
    );
    // SAFETY: the query form reads and changes nothing.
    r.insert(
        "personality".into(),
        last_errno(unsafe { libc::personality(0xffff_ffff) }),
    );
    r.insert(
        "packet_socket".into(),
        socket(libc::AF_PACKET, libc::SOCK_RAW, 0),
    );
    println!("{}", Value::Object(r));
    Ok(ExitCode::SUCCESS)
}

/// child-connect PORT: prints {connect: "ok" | errno}.
fn child_connect(args: &[String]) -> anyhow::Result<ExitCode> {
    let [port] = args else {
        bail!("child-connect PORT");
    };
    let port: u16 = port.parse()?;
    let r = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))
        .map(|_| ());
    println!("{}", json!({"connect": errno_of(r)}));
    Ok(ExitCode::SUCCESS)
}

// ------------------------------------------------------------------ bench

/// Costs of the watch, in ns per operation: this process with no programs loaded, this
/// process (outside every agent) with the programs loaded and one agent watched, and a
/// process inside the agent.
async fn bench_all(n: u32) -> anyhow::Result<ExitCode> {
    let pid = std::process::id();
    let tmp = TempDir(PathBuf::from(format!("/tmp/agentd-watch-bench-{pid}")));
    std::fs::create_dir_all(&tmp.0)?;
    let cgroup = TestCgroup::create(&format!("agentd-bench-{pid}"))?;
    let t = tmp.0.display();
    let text = format!(
        r#"
[agent]
name = "bench"
[filesystem]
read = ["/"]
write = ["{t}"]
canaries = ["{t}/c1", "{t}/c2", "{t}/c3", "{t}/c4"]
[network]
connect = ["127.0.0.1/32:9/udp"]
"#
    );
    let profile = parse("bench", &text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut policy = compile(
        &profile,
        &CompileContext {
            workspace: tmp.0.clone(),
            home: tmp.0.clone(),
        },
    );
    // Costs of the watch, not of a trip.
    policy.breaker.action = crate::profile::Action::Deny;
    let inside = |cg: &Path| -> anyhow::Result<tokio::process::Command> {
        in_cgroup(cg, &["bench-loops".into(), n.to_string(), t.to_string()])
    };

    let outside_before = bench::run_loops(n, &tmp.0)?;
    let (inside_before, _) = run_child_json(&mut inside(&cgroup.dir)?).await?;

    let mut watch = Watch::load().map_err(|e| anyhow::anyhow!("Watch::load: {e:#}"))?;
    let outside_loaded_no_agent = bench::run_loops(n, &tmp.0)?;
    let mut rx = watch.events();
    // Counts what reaches user space, decoded: (events, lost, last arrival).
    let seen = std::sync::Arc::new(std::sync::Mutex::new((0u64, 0u64, Instant::now())));
    let tally = std::sync::Arc::clone(&seen);
    let drain = tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            let lost = if e.kind == Kind::Lost {
                e.detail.get("count").and_then(Value::as_u64).unwrap_or(0)
            } else {
                0
            };
            if let Ok(mut t) = tally.lock() {
                t.0 += 1;
                t.1 += lost;
                t.2 = Instant::now();
            }
        }
    });
    let snapshot = || seen.lock().map(|t| *t).unwrap_or((0, 0, Instant::now()));
    let handle = watch
        .add_agent("bench", &cgroup.dir, &policy, None)
        .map_err(|e| anyhow::anyhow!("add_agent: {e:#}"))?;
    let outside_after = bench::run_loops(n, &tmp.0)?;
    let (inside_after, _) = run_child_json(&mut inside(&cgroup.dir)?).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Throughput: an agent process opening a file for write, each call one event through
    // the ring buffer, the reader and the decoder; one second at each rate, then as fast
    // as two processes can. What reaches user space and what is lost are counted.
    std::fs::create_dir_all(tmp.0.join("allowed"))?;
    let mut steps = Vec::new();
    for (procs, rate) in [
        (1u32, Some(25_000u32)),
        (1, Some(50_000)),
        (1, Some(100_000)),
        (1, Some(200_000)),
        (2, None),
    ] {
        let calls = rate.unwrap_or(n.saturating_mul(10));
        let (before, lost_before, _) = snapshot();
        let t0 = Instant::now();
        let mut floods = Vec::new();
        for _ in 0..procs {
            let mut args = vec!["child-flood".into(), t.to_string(), calls.to_string()];
            args.extend(rate.map(|r| r.to_string()));
            floods.push(
                in_cgroup(&cgroup.dir, &args)?
                    .stdout(Stdio::null())
                    .spawn()?,
            );
        }
        for mut f in floods {
            f.wait().await?;
        }
        let producing_s = t0.elapsed().as_secs_f64();
        // Until the reader has caught up (nothing new for half a second).
        let mut last = snapshot();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = snapshot();
            if now.0 == last.0 {
                break;
            }
            last = now;
        }
        let (after, lost_after, last_arrival) = last;
        let received = after - before;
        let delivered_s = last_arrival.duration_since(t0).as_secs_f64();
        steps.push(json!({
            "processes": procs,
            "target_per_s": rate,
            "calls": u64::from(calls) * u64::from(procs),
            "events_received": received,
            "events_lost": lost_after - lost_before,
            "producing_s": producing_s,
            "events_per_s": received as f64 / delivered_s,
        }));
    }

    watch
        .remove_agent(handle)
        .map_err(|e| anyhow::anyhow!("remove_agent: {e:#}"))?;
    drop(watch);
    let (events, lost, _) = snapshot();
    drain.abort();

    let doc = json!({
        "iterations": n,
        "ns_per_op": {
            "outside_no_programs": outside_before,
            "outside_programs_loaded_no_agent": outside_loaded_no_agent,
            "outside_programs_loaded": outside_after,
            "inside_agent_cgroup_no_programs": inside_before,
            "inside_agent_watched": inside_after,
        },
        "events_received": events,
        "events_lost": lost,
        "throughput": steps,
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(ExitCode::SUCCESS)
}
