//! `agentd daemon --metrics`: a real Prometheus (Debian's `prometheus`, started here on a
//! loopback port) scrapes the daemon and sees an agent's denial counted; `promtool check
//! metrics` finds nothing to say about the text; the unix socket variant is root's (and
//! the group's) only.

use std::{
    io::Write as _,
    net::{TcpListener, TcpStream},
    os::unix::{
        fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
        net::UnixStream,
        process::CommandExt as _,
    },
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agentd_tests::{
    DEFAULT_LIMITS, Daemon, agent_dir, finish, profile_file, require, require_root, still_running,
    test_profile, wait_until,
};
use serde_json::Value;

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.0 GET of `path` for `host` on `stream` (the server closes after the
/// response): (status, headers, body).
fn get(
    mut stream: impl std::io::Read + std::io::Write,
    host: &str,
    path: &str,
) -> (u16, String, String) {
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: */*\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

/// A GET on 127.0.0.1:`port`, for Host `127.0.0.1:PORT` as Prometheus sends it.
fn get_tcp(port: u16, path: &str) -> Option<(u16, String, String)> {
    get_tcp_for(port, &format!("127.0.0.1:{port}"), path)
}

fn get_tcp_for(port: u16, host: &str, path: &str) -> Option<(u16, String, String)> {
    let s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    Some(get(s, host, path))
}

/// Scrapes the daemon's /metrics on `port` until `pred` holds for the text, and returns
/// it; panics with the last text (and `context()`) after `limit`.
fn scrape_until(
    port: u16,
    limit: Duration,
    what: &str,
    pred: impl Fn(&str) -> bool,
    context: impl Fn() -> String,
) -> String {
    let started = Instant::now();
    let mut text = String::new();
    loop {
        if let Some((status, head, body)) = get_tcp(port, "/metrics") {
            assert_eq!(status, 200, "{head}\n{body}");
            assert!(
                head.to_ascii_lowercase()
                    .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
                "{head}"
            );
            text = body;
            if pred(&text) {
                return text;
            }
        }
        assert!(
            started.elapsed() < limit,
            "timed out waiting for {what} in /metrics:\n{text}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of the sample `series` (name and labels, as written) in exposition `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A Prometheus of the test's, killed (by pid) and its files removed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `target` (HOST:PORT) every second as job `agentd`.
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("agentd-prometheus-test-")
            .tempdir()
            .unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: agentd\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        Prometheus { child, port, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The value of the instant query `q`'s first result, if it has one.
    fn query(&mut self, q: &str) -> Option<f64> {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!("prometheus exited: {st}\n{}", self.log());
        }
        let path = format!("/api/v1/query?query={}", percent_encode(q));
        let (status, _, body) = get_tcp(self.port, &path)?;
        if status != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SAFETY: kill takes a pid and a signal number; the pid is our child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let asked = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if asked.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Percent-encodes a query string value (RFC 3986 unreserved characters stay).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn require_prometheus() -> bool {
    require(
        Path::new(PROMETHEUS).exists() && Path::new(PROMTOOL).exists(),
        "prometheus and promtool (Debian's `prometheus`; scripts/setup.sh installs it)",
    )
}

/// A daemon with `--metrics 127.0.0.1:PORT`, an agent whose write outside its workspace
/// Landlock refuses, and a real Prometheus scraping the daemon: it sees the denial
/// counted and the target up; the series an alert watches are there at 0 before anything
/// happened; the agent's per-agent series goes when the kill switch ends it, and it counts
/// as an agent that ended tripped, no longer as a tripped one; the agent's counts in
/// `agentd ps`, `agentd events` and `agentd stats` agree with the metrics; `promtool
/// check metrics` passes the text.
#[test]
fn prometheus_scrapes_a_denial_and_promtool_finds_the_text_clean() {
    if !require_root() || !require_prometheus() {
        return;
    }
    let port = free_port();
    let mut d = Daemon::start_with_args(&["--metrics", &format!("127.0.0.1:{port}")]);
    // Before any agent: what alerts watch is there, at 0 (`increase()` needs a sample
    // before the first count).
    let text = scrape_until(
        port,
        Duration::from_secs(10),
        "the first scrape",
        |_| true,
        || d.log(),
    );
    for series in [
        "agentd_audit_errors_total{op=\"append\"}",
        "agentd_audit_errors_total{op=\"sync\"}",
        "agentd_dns_queries_total{verdict=\"deny\"}",
        "agentd_approval_wait_seconds_count{verdict=\"allow\"}",
        "agentd_containment_seconds_count{by=\"breaker\"}",
        "agentd_breaker_trips_total{rule=\"trip_on:canary\"}",
        "agentd_agents_ended_total{how=\"tripped\"}",
        "agentd_agents{state=\"tripped\"}",
    ] {
        assert_eq!(sample(&text, series), Some(0.0), "{series}:\n{text}");
    }
    let mut prometheus = Prometheus::start(&format!("127.0.0.1:{port}"));

    let ws = agent_dir(true);
    // Writable by the agent's user, granted by no profile: only Landlock refuses there.
    let outside = agent_dir(true);
    let (_p, profile) = profile_file(&test_profile(
        "metrics-denied",
        "invoker",
        DEFAULT_LIMITS,
        "",
    ));
    let script = format!(
        "echo x > {}/agentd-metrics-test 2>/dev/null; echo up; exec sleep 60",
        outside.path().display()
    );
    let mut agent = d.run(&profile, ws.path(), &["/bin/sh", "-c", &script]);
    let mut id = String::new();
    wait_until(Duration::from_secs(60), "the agent running", || {
        still_running(&mut agent, "the agent");
        let rows = d.ps();
        let row = rows
            .iter()
            .find(|r| r["profile"] == "metrics-denied" && r["state"] == "running");
        if let Some(r) = row {
            id = r["id"].as_str().unwrap().to_owned();
        }
        row.is_some()
    });

    // The daemon's own text: the denial, the running agent and its series.
    let denied = "agentd_events_total{kind=\"file_write\",verdict=\"deny\",layer=\"landlock\"}";
    let text = scrape_until(
        port,
        Duration::from_secs(30),
        "the denial",
        |t| sample(t, denied).is_some_and(|n| n >= 1.0),
        || d.log(),
    );
    assert_eq!(
        sample(&text, "agentd_agents{state=\"running\"}"),
        Some(1.0),
        "{text}"
    );
    let per_agent = format!("agentd_agent_lost_events_total{{agent=\"{id}\"}}");
    assert_eq!(sample(&text, &per_agent), Some(0.0), "{text}");
    assert!(
        sample(&text, "agentd_audit_records_total{type=\"event\"}").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    // Other paths are not served.
    assert_eq!(get_tcp(port, "/").unwrap().0, 404);
    // A page of another site whose name resolves here (DNS rebinding) sends its own name:
    // refused. localhost is this host's.
    for (host, status) in [
        (format!("rebind.example:{port}"), 403),
        ("127.0.0.1".to_owned(), 403),
        (format!("127.0.0.2:{port}"), 403),
        (String::new(), 403),
        (format!("localhost:{port}"), 200),
    ] {
        let (got, head, body) = get_tcp_for(port, &host, "/metrics").unwrap();
        assert_eq!(got, status, "Host `{host}`: {head}\n{body}");
        if status == 403 {
            assert!(!body.contains("agentd_"), "{body}");
        }
    }

    // `promtool check metrics` reads the text from stdin: silent and successful.
    let check = |text: &str| {
        let mut promtool = Command::new(PROMTOOL)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = promtool.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "promtool check metrics ({}): {said}\n{text}",
            out.status
        );
    };
    check(&text);

    // Prometheus scraped the target and counted the denial.
    let started = Instant::now();
    let mut last = (None, None);
    while last.0 != Some(1.0) || !last.1.is_some_and(|n| n >= 1.0) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "prometheus: up {:?}, denials {:?}\n{}",
            last.0,
            last.1,
            prometheus.log()
        );
        std::thread::sleep(Duration::from_millis(250));
        last = (
            prometheus.query("up{job=\"agentd\"}"),
            prometheus.query("sum(agentd_events_total{job=\"agentd\",verdict=\"deny\"})"),
        );
    }
    eprintln!(
        "prometheus saw the denial {:.1} s after it started",
        started.elapsed().as_secs_f64()
    );

    // The kill switch: a trip by rule `manual`, its containment time, and the agent's
    // series gone with it: an agent that ended, tripped, not one running.
    let (code, out, err) = d.client(&["kill", &id]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = finish(agent);
    assert_eq!(code, 137, "agentd run: {out}{err}");
    let text = scrape_until(
        port,
        Duration::from_secs(30),
        "the kill",
        |t| {
            sample(t, "agentd_breaker_trips_total{rule=\"manual\"}") == Some(1.0)
                && sample(t, &per_agent).is_none()
                && sample(t, "agentd_agents_ended_total{how=\"tripped\"}") == Some(1.0)
        },
        || d.log(),
    );
    assert_eq!(
        sample(
            &text,
            "agentd_containment_seconds_count{by=\"kill_switch\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "agentd_agents{state=\"running\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "agentd_agents{state=\"tripped\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "agentd_agents_ended_total{how=\"exited\"}"),
        Some(0.0),
        "{text}"
    );
    assert!(!text.contains("state=\"exited\""), "{text}");
    assert!(
        sample(&text, "agentd_audit_records_total{type=\"control\"}").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        sample(&text, "agentd_audit_durability_lag_seconds_count").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    check(&text);
    counts_agree(&d, port, &id);
    // What was counted was recorded: the audit log is intact.
    d.stop();
    d.audit_verified();
}

/// What one recorded event counts for (events, denials): 1, or a folded record's
/// `repeated`; a denial when its verdict is deny or killed.
fn counted(e: &Value) -> (u64, u64) {
    let n = e["detail"]["repeated"]
        .as_u64()
        .filter(|&n| n > 0)
        .unwrap_or(1);
    let denial = e["verdict"] == "deny" || e["verdict"] == "killed";
    (n, if denial { n } else { 0 })
}

/// The sum of every sample of `family` in `text` whose labels contain each of `with`.
fn sum_of(text: &str, family: &str, with: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) || l.starts_with(&format!("{family} ")))
        .filter(|l| with.iter().any(|w| l.contains(w)) || with.is_empty())
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The agent's EVENTS and DENIALS in `agentd ps` are its events in `agentd events` (the
/// kill switch's breaker record among them); `agentd stats` has the same totals as the
/// metrics: the commands count the same things. (Read again for a while: a record may
/// come between two reads.)
fn counts_agree(d: &Daemon, port: u16, id: &str) {
    let compare = || -> Result<(), String> {
        let rows = d.ps();
        let row = rows.iter().find(|r| r["id"] == id).ok_or("no row")?;
        let (mut events, mut denials) = (0, 0);
        let mut breaker = false;
        for e in d.events().iter().filter(|e| e["agent"] == id) {
            let (n, k) = counted(e);
            events += n;
            denials += k;
            breaker |= e["kind"] == "breaker";
        }
        if !breaker {
            return Err(format!("no breaker record of {id}"));
        }
        if (row["events"].as_u64(), row["denials"].as_u64()) != (Some(events), Some(denials)) {
            return Err(format!(
                "agentd ps {row} vs agentd events: {events} events, {denials} denials"
            ));
        }
        let (code, out, err) = d.client(&["stats", "--json"]);
        if code != 0 {
            return Err(format!("agentd stats: {out}{err}"));
        }
        let stats: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        let (_, _, text) = get_tcp(port, "/metrics").ok_or("no scrape")?;
        let refusals = ["verdict=\"deny\"", "verdict=\"killed\""];
        let metrics = [
            sum_of(&text, "agentd_events_total", &[]),
            sum_of(&text, "agentd_events_total", &refusals),
            sum_of(&text, "agentd_breaker_trips_total", &[]),
        ];
        let totals = ["events", "denials", "trips"].map(|k| stats[k].as_f64().unwrap_or(-1.0));
        if totals != metrics {
            return Err(format!(
                "agentd stats {stats} vs metrics (events, denials, trips) {metrics:?}"
            ));
        }
        Ok(())
    };
    let started = Instant::now();
    loop {
        match compare() {
            Ok(()) => return,
            Err(e) if started.elapsed() > Duration::from_secs(10) => panic!("{e}\n{}", d.log()),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// `--metrics unix:PATH`: a socket of mode 0660 owned by root, served to root; a user
/// outside the group cannot connect.
#[test]
fn metrics_on_a_unix_socket_are_for_root_and_the_group() {
    if !require_root() {
        return;
    }
    // Traversable by everyone: only the socket's own mode stands in the way.
    let dir = agent_dir(false);
    let socket = dir.path().join("metrics.sock");
    let d = Daemon::start_with_args(&["--metrics", &format!("unix:{}", socket.display())]);
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.uid(), 0);

    // No Host check on a unix socket: no browser reaches it.
    let (status, head, body) = get(
        UnixStream::connect(&socket).unwrap(),
        "anything",
        "/metrics",
    );
    assert_eq!(status, 200, "{head}\n{body}\n{}", d.log());
    assert_eq!(
        sample(&body, "agentd_agents{state=\"running\"}"),
        Some(0.0),
        "{body}"
    );
    assert!(body.contains("\nagentd_build_info{version="), "{body}");

    // nobody (uid and gid 65534, no supplementary groups: std drops them with the uid),
    // not in the daemon's group, is refused by the socket's mode.
    let out = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\nprint('connected')",
        ])
        .arg(&socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(13),
        "nobody connected to the metrics socket: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
