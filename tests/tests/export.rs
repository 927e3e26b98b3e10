//! Events out of the daemon to what operators run (docs/export.md): a real rsyslogd
//! receives the syslog export (RFC 5424 over TCP and over a unix datagram socket) and
//! parses its structured data; an OTLP/HTTP receiver decodes the OTLP export with the
//! official OpenTelemetry protobuf definitions. Each test starts what it talks to on
//! loopback (or a socket in its temporary directory) and stops it by pid.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agentd_tests::{
    DEFAULT_LIMITS, Daemon, agent_dir, finish, profile_file, repo_root, require, require_root,
    test_profile, wait_until_or,
};
use serde_json::Value;

const RSYSLOGD: &str = "/usr/sbin/rsyslogd";
/// Where scripts/setup.sh installs the OpenTelemetry protobuf definitions (keep in step).
const OTEL_PROTO_DIR: &str = "agentd/python/opentelemetry-proto-1.45.2";

/// A loopback port free now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Stops a child the test started: SIGTERM by its pid, then reaps it.
fn stop(child: &mut Child) {
    // SAFETY: kill takes a pid and a signal number; the pid is our own child's, not yet
    // reaped, so it names no other process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

/// The file the writer tries to create: a name an attacker would pick, with a newline
/// (a forged line in a log file), a terminal escape, a right-to-left override, and what
/// RFC 5424 escapes.
const HOSTILE_NAME: &str = "agentd-export-test\n\x1b[31m\u{202e}\"]x";
/// How the syslog records and the OTLP body write it.
const HOSTILE_ESCAPED: &str = "agentd-export-test\\u{a}\\u{1b}[31m\\u{202e}\"]x";

/// The writer's profile: every record of its agent names it.
const WRITER_PROFILE: &str = "export-writer";
/// Who the test's `agentd run` (root, SUDO_UID=65534) launches agents for: every record
/// of its agents names this owner.
const OWNER_UID: u32 = 65534;
const OWNER: &str = "nobody";

/// A profile whose agent writes outside its workspace a few times (refused by Landlock:
/// the directory is writable by the agent's user, granted by no profile) and ends; the
/// script writes to its first argument.
fn writer() -> (tempfile::TempDir, PathBuf, String) {
    let (dir, profile) = profile_file(&test_profile(
        WRITER_PROFILE,
        "invoker",
        DEFAULT_LIMITS,
        "[breaker]\ntrip_on = [\"canary\"]\n",
    ));
    let script =
        "for i in 1 2 3; do echo x > \"$1\" 2>/dev/null; sleep 0.1; done; echo done".to_owned();
    (dir, profile, script)
}

/// Runs the writer through `d` to its end; returns the agent's id, read from the
/// daemon's events (its `file_write` denial, which the test then looks for downstream).
fn run_writer(d: &Daemon) -> String {
    let ws = agent_dir(true);
    let outside = agent_dir(true);
    let (_p, profile, script) = writer();
    let target = outside.path().join(HOSTILE_NAME);
    let child = d.run(
        &profile,
        ws.path(),
        &["/bin/sh", "-c", &script, "sh", target.to_str().unwrap()],
    );
    let (code, out, err) = finish(child);
    assert_eq!(code, 0, "agentd run: {out}{err}\n{}", d.log());
    assert!(out.contains("done"), "{out}{err}");
    let mut id = None;
    wait_until_or(
        Duration::from_secs(20),
        || {
            id = d
                .events()
                .iter()
                .find(|e| {
                    e["kind"] == "file_write" && e["verdict"] == "deny" && e["layer"] == "landlock"
                })
                .and_then(|e| e["agent"].as_str().map(str::to_owned));
            id.is_some()
        },
        || format!("the daemon's events: no file_write denial\n{}", d.log()),
    );
    id.unwrap()
}

// ---------------------------------------------------------------------------------------
// syslog

/// A real rsyslogd with a configuration of the test's own: no system socket; imtcp on
/// a loopback port and imuxsock on a socket in its directory; every record written as a
/// JSON line of the fields rsyslog parsed (RFC 5424 header, structured data raw and as
/// parsed by mmpstrucdata, message).
struct Rsyslog {
    child: Child,
    dir: tempfile::TempDir,
    tcp_port: u16,
}

impl Rsyslog {
    fn start() -> Rsyslog {
        let dir = tempfile::Builder::new()
            .prefix("agentd-rsyslog-test-")
            .tempdir()
            .unwrap();
        let tcp_port = free_port();
        let d = dir.path().display();
        let conf = format!(
            r#"global(workDirectory="{d}")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="{tcp_port}")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{d}/log.sock" UseSpecialParser="off" ParseHostname="on")
module(load="mmpstrucdata")
template(name="fields" type="list" option.jsonf="on") {{
  property(outname="app" name="app-name" format="jsonf")
  property(outname="procid" name="procid" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="host" name="hostname" format="jsonf")
  property(outname="facility" name="syslogfacility-text" format="jsonf")
  property(outname="severity" name="syslogseverity-text" format="jsonf")
  property(outname="input" name="inputname" format="jsonf")
  property(outname="sd" name="structured-data" format="jsonf")
  property(outname="parsed" name="$!rfc5424-sd" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
}}
action(type="mmpstrucdata")
action(type="omfile" file="{d}/received.jsonl" template="fields")
"#
        );
        let conf_path = dir.path().join("rsyslog.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(RSYSLOGD)
            .arg("-n")
            .arg("-f")
            .arg(&conf_path)
            .arg("-i")
            .arg(dir.path().join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("rsyslogd.log")).unwrap())
            .spawn()
            .unwrap();
        let mut r = Rsyslog {
            child,
            dir,
            tcp_port,
        };
        let socket = r.socket();
        wait_until_or(
            Duration::from_secs(10),
            || {
                if let Some(st) = r.child.try_wait().unwrap() {
                    panic!("rsyslogd exited: {st}\n{}", r.log());
                }
                TcpStream::connect(("127.0.0.1", tcp_port)).is_ok() && socket.exists()
            },
            || format!("rsyslogd listening on {tcp_port} and {socket:?}"),
        );
        r
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("log.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("rsyslogd.log")).unwrap_or_default()
    }

    /// What it received from agentd, with `parsed` (mmpstrucdata's JSON, a string in the
    /// line) parsed.
    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("received.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let mut v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
                if let Some(p) = v["parsed"].as_str() {
                    v["parsed"] = serde_json::from_str(p).unwrap_or_else(|e| panic!("{e}: {p}"));
                }
                v
            })
            .filter(|v| v["app"] == "agentd")
            .collect()
    }

    /// Waits for a record of `agent`'s of `kind`.
    fn wait_for(&self, agent: &str, kind: &str, d: &Daemon) -> Value {
        let mut found = None;
        wait_until_or(
            Duration::from_secs(20),
            || {
                found = self
                    .records()
                    .into_iter()
                    .find(|r| r["msgid"] == kind && r["parsed"]["agentd@32473"]["agent"] == agent);
                found.is_some()
            },
            || {
                format!(
                    "rsyslogd received no {kind} record of {agent}: {:#?}\nrsyslogd: {}\ndaemon: {}",
                    self.records(),
                    self.log(),
                    d.log()
                )
            },
        );
        found.unwrap()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}

/// `--syslog tcp:` with `--syslog-verdicts deny`: rsyslogd receives the agent's write
/// denial as an RFC 5424 record whose structured data it parses (agent, its profile and
/// owner, kind, verdict, layer, path), with agentd's pid, the host's name,
/// authpriv.warning; the agent's start (verdict none) is not sent. Then `--syslog unix:`
/// to rsyslogd's imuxsock socket with `--syslog-kinds file_write,exit`,
/// `--syslog-severity warning` and `--syslog-facility local3`: the denial arrives, the
/// exit (notice) does not, nor anything of another kind.
#[test]
fn rsyslog_receives_denials_as_structured_records() {
    if !require_root()
        || !require(
            Path::new(RSYSLOGD).exists(),
            "rsyslogd (Debian's rsyslog; scripts/setup.sh installs it)",
        )
    {
        return;
    }
    let started = Instant::now();
    let rs = Rsyslog::start();

    // TCP, octet-counted.
    let target = format!("tcp:127.0.0.1:{}", rs.tcp_port);
    let mut d = Daemon::start_with_args(&["--syslog", &target, "--syslog-verdicts", "deny"]);
    let id = run_writer(&d);
    let r = rs.wait_for(&id, "file_write", &d);
    eprintln!("rsyslogd parsed: {r}");
    let sd = &r["parsed"]["agentd@32473"];
    assert_eq!(sd["agent"], id.as_str(), "{r:#}");
    assert_eq!(sd["kind"], "file_write", "{r:#}");
    assert_eq!(sd["verdict"], "deny", "{r:#}");
    assert_eq!(sd["layer"], "landlock", "{r:#}");
    // Whose agent it is: on the refusal itself (the start, which says it too, was not
    // sent).
    assert_eq!(sd["profile"], WRITER_PROFILE, "{r:#}");
    assert_eq!(sd["owner_uid"], OWNER_UID.to_string(), "{r:#}");
    assert_eq!(sd["owner"], OWNER, "{r:#}");
    // What the agent chose arrives escaped: one line, nothing for a terminal.
    assert!(
        sd["path"]
            .as_str()
            .is_some_and(|p| p.ends_with(&format!("/{HOSTILE_ESCAPED}"))),
        "{r:#}"
    );
    let msg = r["msg"].as_str().unwrap();
    assert!(msg.contains(&format!("/{HOSTILE_ESCAPED}  sh[")), "{r:#}");
    assert!(!msg.contains(['\n', '\x1b', '\u{202e}']), "{r:#}");
    assert!(
        sd["pid"].as_str().unwrap().parse::<u32>().unwrap() > 0,
        "{r:#}"
    );
    assert_eq!(r["input"], "imtcp", "{r:#}");
    assert_eq!(r["procid"], d.pid().to_string(), "{r:#}");
    assert_eq!(r["host"], hostname(), "{r:#}");
    assert_eq!(
        (r["facility"].as_str(), r["severity"].as_str()),
        (Some("authpriv"), Some("warning")),
        "{r:#}"
    );
    assert!(
        r["msg"].as_str().unwrap().contains("DENY") && r["msg"].as_str().unwrap().contains(&id),
        "{r:#}"
    );
    // The start happened (the daemon has it) and went before the denial on the same
    // connection: had it been sent, it would be there.
    assert!(
        d.events()
            .iter()
            .any(|e| e["agent"] == id.as_str() && e["kind"] == "start"),
        "no start event of {id}"
    );
    let records = rs.records();
    let not_denials: Vec<&Value> = records
        .iter()
        .filter(|r| r["parsed"]["agentd@32473"]["verdict"] != "deny")
        .collect();
    assert!(
        not_denials.is_empty(),
        "sent though not a denial: {not_denials:#?}"
    );
    d.stop();

    // A unix datagram socket (as /dev/log), another selection and facility.
    let target = format!("unix:{}", rs.socket().display());
    let mut d = Daemon::start_with_args(&[
        "--syslog",
        &target,
        "--syslog-kinds",
        "file_write,exit",
        "--syslog-severity",
        "warning",
        "--syslog-facility",
        "local3",
    ]);
    let id2 = run_writer(&d);
    assert_ne!(id, id2);
    let r = rs.wait_for(&id2, "file_write", &d);
    assert_eq!(r["input"], "imuxsock", "{r:#}");
    assert_eq!(r["parsed"]["agentd@32473"]["verdict"], "deny", "{r:#}");
    assert_eq!(
        r["parsed"]["agentd@32473"]["owner_uid"],
        OWNER_UID.to_string(),
        "{r:#}"
    );
    // The exit (a notice, below the severity asked for) happened before the record of the
    // denials that followed the first (folded: written when their window closed, a second
    // after the first), and records arrive in order: had it been sent, it would be there.
    assert!(
        d.events()
            .iter()
            .any(|e| e["agent"] == id2.as_str() && e["kind"] == "exit"),
        "no exit event of {id2}"
    );
    wait_until_or(
        Duration::from_secs(20),
        || {
            rs.records().iter().any(|r| {
                let sd = &r["parsed"]["agentd@32473"];
                sd["agent"] == id2.as_str()
                    && sd["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("\"repeated\""))
            })
        },
        || format!("no record of {id2}'s repeated denials: {:#?}", rs.records()),
    );
    assert_eq!(r["facility"], "local3", "{r:#}");
    assert_eq!(r["procid"], d.pid().to_string(), "{r:#}");
    let other_kinds: Vec<Value> = rs
        .records()
        .into_iter()
        .filter(|r| r["input"] == "imuxsock" && r["msgid"] != "file_write")
        .collect();
    assert!(other_kinds.is_empty(), "{other_kinds:#?}");
    // Every record is of a registered agent: each says whose.
    for r in rs.records() {
        let sd = &r["parsed"]["agentd@32473"];
        assert_eq!(sd["profile"], WRITER_PROFILE, "{r:#}");
        assert_eq!(sd["owner_uid"], OWNER_UID.to_string(), "{r:#}");
    }
    d.stop();
    eprintln!("rsyslog test: {:?}", started.elapsed());
}

/// An agent a restarted daemon took over (no `start` event reaches the new daemon): its
/// refusals after the takeover still say whose agent it is, from what the handover
/// passed on.
#[test]
fn records_of_an_agent_taken_over_say_whose_it_is() {
    if !require_root()
        || !require(
            Path::new(RSYSLOGD).exists(),
            "rsyslogd (Debian's rsyslog; scripts/setup.sh installs it)",
        )
    {
        return;
    }
    let started = Instant::now();
    let rs = Rsyslog::start();
    let target = format!("tcp:127.0.0.1:{}", rs.tcp_port);
    let mut d = Daemon::start_with_args(&[
        "--syslog",
        &target,
        "--syslog-verdicts",
        "deny",
        "--handover-grace",
        "300",
    ]);
    let ws = agent_dir(true);
    let outside = agent_dir(true);
    let (_p, profile, _) = writer();
    // Refused writes, each to a new name (none folded), until `stop` exists.
    let script = "i=0; while [ ! -e stop ]; do i=$((i+1)); echo x > \"$1/f$i\" 2>/dev/null; \
                  sleep 0.2; done; echo done";
    let child = d.run(
        &profile,
        ws.path(),
        &[
            "/bin/sh",
            "-c",
            script,
            "sh",
            outside.path().to_str().unwrap(),
        ],
    );
    let mut id = String::new();
    wait_until_or(
        Duration::from_secs(60),
        || {
            let row = d.ps().into_iter().find(|r| {
                r["profile"] == WRITER_PROFILE && r["state"] == "running" && r["pid"] != 0
            });
            if let Some(r) = row {
                id = r["id"].as_str().unwrap_or_default().to_owned();
            }
            !id.is_empty()
        },
        || format!("the writer running\n{}", d.log()),
    );
    rs.wait_for(&id, "file_write", &d);

    // SIGTERM: the agent is handed over; the next daemon takes it over.
    // SAFETY: kill with our child's pid and SIGTERM.
    unsafe { libc::kill(d.pid() as i32, libc::SIGTERM) };
    let status = d.child.take().unwrap().wait().unwrap();
    assert!(status.success(), "the daemon's stop: {status}\n{}", d.log());
    d.spawn();
    let new_pid = d.pid().to_string();
    let mut taken_over = None;
    wait_until_or(
        Duration::from_secs(60),
        || {
            taken_over = rs.records().into_iter().find(|r| {
                r["procid"] == new_pid.as_str()
                    && r["parsed"]["agentd@32473"]["agent"] == id.as_str()
            });
            taken_over.is_some()
        },
        || {
            format!(
                "no record of {id} from the new daemon: {:#?}\ndaemon: {}",
                rs.records(),
                d.log()
            )
        },
    );
    let r = taken_over.unwrap();
    let sd = &r["parsed"]["agentd@32473"];
    assert_eq!(sd["verdict"], "deny", "{r:#}");
    assert_eq!(sd["profile"], WRITER_PROFILE, "{r:#}");
    assert_eq!(sd["owner_uid"], OWNER_UID.to_string(), "{r:#}");
    assert_eq!(sd["owner"], OWNER, "{r:#}");
    std::fs::write(ws.path().join("stop"), "").unwrap();
    let (code, out, err) = finish(child);
    assert_eq!(code, 0, "agentd run: {out}{err}\n{}", d.log());
    d.stop();
    eprintln!("takeover test: {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------
// OTLP

/// The directory of the OpenTelemetry protobuf definitions for python3.
fn otel_proto() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"),
        PathBuf::from,
    );
    cache.join(OTEL_PROTO_DIR)
}

/// Whether python3 imports the definitions from [`otel_proto`].
fn otel_proto_usable() -> bool {
    Command::new("python3")
        .env("PYTHONPATH", otel_proto())
        .args([
            "-c",
            "import google.protobuf.json_format, opentelemetry.proto.collector.logs.v1.logs_service_pb2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// tests/support/otlp_receiver.py on a loopback port of its choosing.
struct Receiver {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Receiver {
    fn start(args: &[&str]) -> Receiver {
        let dir = tempfile::Builder::new()
            .prefix("agentd-otlp-test-")
            .tempdir()
            .unwrap();
        let port_file = dir.path().join("port");
        let child = Command::new("python3")
            .arg(repo_root().join("tests/support/otlp_receiver.py"))
            .arg("--out")
            .arg(dir.path().join("requests.jsonl"))
            .arg("--port-file")
            .arg(&port_file)
            .args(args)
            .env("PYTHONPATH", otel_proto())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("receiver.log")).unwrap())
            .spawn()
            .unwrap();
        let mut r = Receiver {
            child,
            dir,
            port: 0,
        };
        wait_until_or(
            Duration::from_secs(10),
            || {
                if let Some(st) = r.child.try_wait().unwrap() {
                    panic!("the receiver exited: {st}\n{}", r.log());
                }
                std::fs::read_to_string(&port_file)
                    .ok()
                    .and_then(|p| p.parse().ok())
                    .is_some_and(|p| {
                        r.port = p;
                        true
                    })
            },
            || "the OTLP receiver's port".into(),
        );
        r
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/logs", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("receiver.log")).unwrap_or_default()
    }

    /// One line per request: number, status answered, what it decoded or why not.
    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("requests.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// A decoded record's attribute, as its JSON value (`{"stringValue": ...}`).
fn attr<'a>(record: &'a Value, key: &str) -> &'a Value {
    record["attributes"]
        .as_array()
        .and_then(|a| a.iter().find(|kv| kv["key"] == key))
        .map_or(&Value::Null, |kv| &kv["value"])
}

fn log_records(request: &Value) -> Vec<&Value> {
    request["decoded"]["resourceLogs"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|rl| rl["scopeLogs"].as_array().into_iter().flatten())
        .flat_map(|sl| sl["logRecords"].as_array().into_iter().flatten())
        .collect()
}

/// `--otlp URL`: the receiver decodes every request with the official definitions
/// (strictly, and finds it canonical proto3 JSON); its first answer is 503 and the same
/// batch comes again; the agent's write denial is among the records with its attributes;
/// nothing was given up on.
#[test]
fn otlp_export_decodes_with_the_official_definitions_and_is_retried() {
    if !require_root()
        || !require(
            otel_proto_usable(),
            &format!(
                "python3 with opentelemetry-proto in {} (scripts/setup.sh installs it)",
                otel_proto().display()
            ),
        )
    {
        return;
    }
    let started = Instant::now();
    let rx = Receiver::start(&["--fail-first", "1"]);
    let metrics = free_port();
    let mut d = Daemon::start_with_args(&["--otlp", &rx.url(), "--metrics", &metrics.to_string()]);
    let id = run_writer(&d);
    let mut denial = None;
    wait_until_or(
        Duration::from_secs(30),
        || {
            denial = rx
                .requests()
                .iter()
                .filter(|r| r["status"] == 200)
                .flat_map(log_records)
                .find(|r| {
                    attr(r, "agentd.agent")["stringValue"] == id.as_str()
                        && attr(r, "agentd.kind")["stringValue"] == "file_write"
                })
                .cloned();
            denial.is_some()
        },
        || {
            format!(
                "no file_write record of {id} accepted: {:#?}\nreceiver: {}\ndaemon: {}",
                rx.requests(),
                rx.log(),
                d.log()
            )
        },
    );
    let requests = rx.requests();
    for r in &requests {
        assert!(r.get("error").is_none(), "not decoded: {r:#}");
        assert_eq!(r["canonical"], true, "not canonical proto3 JSON: {r:#}");
        assert_eq!(r["path"], "/v1/logs");
        assert_eq!(r["content_type"], "application/json");
        let res = &r["decoded"]["resourceLogs"][0];
        let res_attrs = &res["resource"];
        assert_eq!(
            attr(res_attrs, "service.name")["stringValue"],
            "agentd",
            "{r:#}"
        );
        assert_eq!(
            attr(res_attrs, "host.name")["stringValue"],
            hostname(),
            "{r:#}"
        );
        assert_eq!(res["scopeLogs"][0]["scope"]["name"], "agentd", "{r:#}");
    }
    // The retry: the first request was answered 503, the second carried the same batch.
    assert_eq!(requests[0]["status"], 503, "{requests:#?}");
    assert_eq!(requests[1]["status"], 200, "{requests:#?}");
    assert_eq!(requests[0]["decoded"], requests[1]["decoded"]);

    let r = denial.unwrap();
    eprintln!("the receiver decoded: {r}");
    assert_eq!(attr(&r, "agentd.verdict")["stringValue"], "deny", "{r:#}");
    // Whose agent it is, in agentd's attributes and the semantic conventions' user.
    assert_eq!(
        attr(&r, "agentd.profile")["stringValue"],
        WRITER_PROFILE,
        "{r:#}"
    );
    assert_eq!(
        attr(&r, "agentd.owner_uid")["intValue"],
        OWNER_UID.to_string(),
        "{r:#}"
    );
    assert_eq!(
        attr(&r, "user.id")["stringValue"],
        OWNER_UID.to_string(),
        "{r:#}"
    );
    assert_eq!(attr(&r, "user.name")["stringValue"], OWNER, "{r:#}");
    assert_eq!(attr(&r, "agentd.layer")["stringValue"], "landlock", "{r:#}");
    // The attribute has the exact path; the body, the escaped line.
    assert!(
        attr(&r, "agentd.path")["stringValue"]
            .as_str()
            .is_some_and(|p| p.ends_with(&format!("/{HOSTILE_NAME}"))),
        "{r:#}"
    );
    let body = r["body"]["stringValue"].as_str().unwrap();
    assert!(body.contains(&format!("/{HOSTILE_ESCAPED}  sh[")), "{r:#}");
    assert!(!body.contains(['\n', '\x1b', '\u{202e}']), "{r:#}");
    let pid: u32 = attr(&r, "agentd.pid")["intValue"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pid > 0, "{r:#}");
    assert_eq!(r["severityNumber"], 13, "WARN: {r:#}");
    assert_eq!(r["severityText"], "warning", "{r:#}");
    assert!(
        r["body"]["stringValue"]
            .as_str()
            .is_some_and(|b| b.contains("DENY") && b.contains("file_write")),
        "{r:#}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let t: u128 = r["timeUnixNano"].as_str().unwrap().parse().unwrap();
    assert!(t <= now && now - t < 300_000_000_000, "{t} vs {now}");
    // The agent's start went too (no selection), with the severity of a verdict none.
    let start = requests
        .iter()
        .flat_map(log_records)
        .find(|r| {
            attr(r, "agentd.agent")["stringValue"] == id.as_str()
                && attr(r, "agentd.kind")["stringValue"] == "start"
        })
        .unwrap_or_else(|| panic!("no start record: {requests:#?}"));
    assert_eq!(start["severityNumber"], 10, "{start:#}");
    // Counted: what the receiver accepted as sent, nothing failed or dropped.
    let accepted = requests
        .iter()
        .filter(|r| r["status"] == 200)
        .map(|r| log_records(r).len())
        .sum::<usize>();
    let series = |outcome: &str| {
        metric(
            metrics,
            &format!(r#"agentd_export_events_total{{destination="otlp",outcome="{outcome}"}}"#),
        )
    };
    wait_until_or(
        Duration::from_secs(10),
        || series("sent") >= accepted as f64,
        || format!("sent {} < accepted {accepted}", series("sent")),
    );
    assert_eq!((series("failed"), series("dropped")), (0.0, 0.0));
    d.stop();
    let log = d.log();
    assert!(log.contains("otlp"), "{log}");
    assert!(!log.contains("gave up"), "a batch failed: {log}");
    eprintln!("OTLP test: {:?}", started.elapsed());
}

/// What the daemon's `--metrics` serves now.
fn metrics_text(port: u16) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(c, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    text
}

/// A counter of the daemon's `--metrics` (0 when absent).
fn metric(port: u16, series: &str) -> f64 {
    metrics_text(port)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// A collector that accepts connections and never answers does not slow the daemon: an
/// agent makes more refusals than the export's queue holds, and ends; `agentd ps` answers
/// at once; the overflow is counted (`agentd_export_events_total{outcome="dropped"}`) and
/// told in the daemon's log; the daemon stops promptly.
#[test]
fn a_collector_that_never_answers_does_not_slow_the_daemon() {
    if !require_root()
        || !require(
            otel_proto_usable(),
            "python3 with opentelemetry-proto (scripts/setup.sh installs it)",
        )
    {
        return;
    }
    let rx = Receiver::start(&["--hang"]);
    let metrics = free_port();
    let mut d = Daemon::start_with_args(&["--otlp", &rx.url(), "--metrics", &metrics.to_string()]);
    let ws = agent_dir(true);
    let outside = agent_dir(true);
    let (_p, profile, _) = writer();
    // Distinct paths: identical refusals would be folded into one event. In bursts of
    // 1000, which the kernel's ring buffer holds: more at once would be lost (counted).
    let script = format!(
        "import time\nfor i in range(12000):\n    try:\n        open('{}/f%d' % i, 'w')\n    except OSError:\n        pass\n    if i % 1000 == 999:\n        time.sleep(0.05)\nprint('done')",
        outside.path().display()
    );
    let t = Instant::now();
    let child = d.run(&profile, ws.path(), &["/usr/bin/python3", "-c", &script]);
    let (code, out, err) = finish(child);
    assert_eq!(code, 0, "agentd run: {out}{err}\n{}", d.log());
    let run_took = t.elapsed();
    assert!(run_took < Duration::from_secs(30), "{run_took:?}");
    let t = Instant::now();
    let _ = d.ps();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "ps took {:?}",
        t.elapsed()
    );
    let dropped = r#"agentd_export_events_total{destination="otlp",outcome="dropped"}"#;
    wait_until_or(
        Duration::from_secs(20),
        || metric(metrics, dropped) > 0.0,
        || {
            format!(
                "nothing counted as dropped: {}\n{}",
                metrics_text(metrics)
                    .lines()
                    .filter(|l| l.starts_with("agentd_export")
                        || l.starts_with("agentd_lost")
                        || l.starts_with("agentd_events_total"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                d.log()
            )
        },
    );
    assert!(d.log().contains("otlp: its queue is full"), "{}", d.log());
    eprintln!(
        "12000 refusals in {run_took:?}: {} dropped",
        metric(metrics, dropped)
    );
    let t = Instant::now();
    d.stop();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the daemon took {:?} to stop",
        t.elapsed()
    );
}
