//! The live web view (`agentd daemon --ui`) in a real browser: Debian's headless Chromium,
//! driven by playwright-core (tests/support/web_ui.js; both installed by scripts/setup.sh).
//! The page refuses a browser without a token and takes one with it; an agent started
//! through the daemon appears; its denial arrives live, highlighted; its kill button kills
//! it, which `agentd ps`, /proc and the audit log (by the token's uid) confirm. Requests
//! forged with another Host (DNS rebinding) or Origin (CSRF) are refused meanwhile. Then
//! another agent's held calls, with only the page open to answer them: an unsigned
//! approval is refused, one signed with `ssh-keygen -Y sign` over the text the page shows
//! lets the call through, a denial refuses the next; both audited as "web view", with
//! the session's token fingerprint and address. A token opens one session, and a session
//! is a cookie only (no bearer header).
//!
//! Without the browser: a process inside an agent, with the view's port open to it and a
//! valid session, is refused everything (and `agentd ui-url`); a member of --group who
//! is not root watches every agent, acts only as `agentd kill` would let them, and not
//! at all once removed from the group.
//!
//! Screenshots go to `$AGENTD_ARTIFACTS/web-ui/` (default `target/ci-artifacts/web-ui/`).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use agentd_tests::{
    DEFAULT_LIMITS, Daemon, TEST_USER, TestUser, agent_dir, agentd_bin,
    ask::{CONNECTS, Counted, EPERM, Follower, ask_profile, json_out},
    finish, process_gone, profile_file, repo_root, require, require_root, still_running,
    test_profile, wait_until,
};
use serde_json::Value;

const CHROMIUM: &str = "/usr/bin/chromium";
/// What web_ui.js saves.
const SHOTS: [&str; 5] = [
    "00-refused.png",
    "01-loaded.png",
    "02-denial.png",
    "03-killed.png",
    "04-approval.png",
];
/// How long one step of the browser may take.
const STEP: Duration = Duration::from_secs(20);

/// Where scripts/setup.sh installs playwright-core: `$AGENTD_PLAYWRIGHT`, else root's
/// cache directory.
fn playwright_prefix() -> PathBuf {
    if let Some(p) = std::env::var_os("AGENTD_PLAYWRIGHT") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache"),
        PathBuf::from,
    );
    cache.join("agentd/playwright")
}

fn artifacts() -> PathBuf {
    std::env::var_os("AGENTD_ARTIFACTS")
        .map_or_else(|| repo_root().join("target/ci-artifacts"), PathBuf::from)
        .join("web-ui")
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// node and the Chromium it starts, in a process group of their own: killed together by
/// that group's id on drop.
struct Browser {
    child: Child,
    /// Chromium's profile directory.
    _profile: tempfile::TempDir,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Browser {
    fn start(node_modules: &Path, base: &str, url: &str, shots: &Path) -> Browser {
        let profile = tempfile::Builder::new()
            .prefix("agentd-web-ui-chromium-")
            .tempdir()
            .unwrap();
        let mut child = Command::new("node")
            .arg(repo_root().join("tests/support/web_ui.js"))
            .args([base, url])
            .arg(shots)
            .arg(profile.path())
            .env("NODE_PATH", node_modules)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot run node (scripts/setup.sh installs it)");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Browser {
            _profile: profile,
            stdin: child.stdin.take(),
            child,
            lines,
        }
    }

    /// Waits for `step NAME JSON` and returns the JSON; a `fail` line fails the test.
    fn step(&mut self, name: &str) -> Value {
        let started = Instant::now();
        loop {
            let left = STEP.saturating_sub(started.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(why) = l.strip_prefix("fail ") {
                        panic!("the browser, before `{name}`: {why}");
                    }
                    let Some(rest) = l.strip_prefix("step ") else {
                        eprintln!("web_ui.js: {l}");
                        continue;
                    };
                    let (got, json) = rest.split_once(' ').unwrap();
                    assert_eq!(got, name, "the browser's steps: {l}");
                    eprintln!("browser: {name} {json}");
                    return serde_json::from_str(json).unwrap();
                }
                Err(RecvTimeoutError::Timeout) => panic!("the browser did not reach `{name}`"),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the browser exited before `{name}`")
                }
            }
        }
    }

    fn tell(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    fn finish(mut self) {
        self.stdin.take();
        let started = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let said: Vec<String> = self.lines.try_iter().collect();
                assert!(st.success(), "web_ui.js: {st}: {}", said.join("\n"));
                return;
            }
            assert!(started.elapsed() < STEP, "the browser did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill with the negated id of the process group our child leads.
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// What an HTTP request got back.
struct Answer {
    status: u16,
    /// The status line and the headers.
    head: String,
    body: String,
}

/// One HTTP/1.1 request on loopback (it should say `Connection: close`).
fn http(port: u16, request: &str) -> Answer {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// The token in a URL `agentd ui-url` printed.
fn token_of(url: &str) -> String {
    let (_, token) = url
        .trim()
        .split_once("/?token=")
        .unwrap_or_else(|| panic!("a URL with a token: {url}"));
    assert_eq!(token.len(), 64, "{url}");
    token.to_owned()
}

/// `GET /?token=T` as a browser would: the session id of the cookie it sets.
fn login(port: u16, token: &str) -> String {
    let a = http(
        port,
        &format!(
            "GET /?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(a.status, 303, "login: {}{}", a.head, a.body);
    let cookie = a
        .head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("set-cookie")
                .then(|| value.trim())
        })
        .unwrap_or_else(|| panic!("no cookie: {}", a.head));
    let (value, _) = cookie.split_once(';').unwrap();
    let (name, session) = value.split_once('=').unwrap();
    assert_eq!(name, format!("agentd_ui_{port}"));
    assert_ne!(
        session, token,
        "the cookie carries a session, not the token"
    );
    assert_eq!(session.len(), 64, "{cookie}");
    session.to_owned()
}

/// The audit log's fingerprint of a token: the first 8 hex digits of its SHA-256.
fn fingerprint(token: &str) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(token.as_bytes());
    d[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// The `control` bodies of the audit log whose action is `action`.
fn controls(log: &str, action: &str) -> Vec<Value> {
    log.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["kind"] == "control" && r["control"]["action"] == action)
        .map(|mut r| r["control"].take())
        .collect()
}

#[test]
fn web_view_in_chromium_lists_streams_and_kills() {
    if !require_root() {
        return;
    }
    let node_modules = playwright_prefix().join("node_modules");
    let node = Command::new("node").arg("--version").output();
    if !require(
        Path::new(CHROMIUM).exists(),
        "Debian's chromium at /usr/bin/chromium (scripts/setup.sh installs it)",
    ) || !require(
        node.is_ok_and(|o| o.status.success()) && node_modules.join("playwright-core").exists(),
        &format!(
            "node and playwright-core in {} (scripts/setup.sh installs them)",
            node_modules.display()
        ),
    ) {
        return;
    }
    let started = Instant::now();
    let port = free_port();
    // alice's key signs approvals.
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("alice");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "alice", "-f"])
        .arg(&key)
        .output()
        .expect("ssh-keygen (openssh-client)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let signers = keys.path().join("allowed_signers");
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    std::fs::write(
        &signers,
        format!("alice@example.org namespaces=\"agentd-approval\" {public}"),
    )
    .unwrap();
    let mut d = Daemon::start_with_args(&[
        "--ui",
        &format!("127.0.0.1:{port}"),
        "--allowed-signers",
        signers.to_str().unwrap(),
    ]);
    let base = format!("http://127.0.0.1:{port}");

    // The URL: only for an authorised user.
    let out = Command::new(agentd_bin())
        .args(["ui-url", "--socket"])
        .arg(d.socket())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "ui-url as nobody: {err}");
    assert!(err.contains("permission denied"), "{err}");
    assert!(out.stdout.is_empty());
    let (code, out, err) = d.client(&["ui-url", "--json"]);
    assert_eq!(code, 0, "ui-url: {err}");
    let given: Value = serde_json::from_str(&out).unwrap();
    let url = given["url"].as_str().unwrap().to_owned();
    assert_eq!(given["uid"], 0, "{given}");
    assert_eq!(given["valid_s"], 12 * 3600, "{given}");
    let token = url
        .strip_prefix(&format!("{base}/?token="))
        .unwrap_or_else(|| panic!("the URL: {url}"))
        .to_owned();
    assert_eq!(token.len(), 64, "{url}");
    let (code, plain, _) = d.client(&["ui-url"]);
    assert_eq!(code, 0);
    assert!(
        plain.trim().starts_with(&format!("{base}/?token=")),
        "{plain}"
    );
    assert_ne!(plain.trim(), url, "each call makes a new token");
    // The test's own session (for the forged requests below); its token is spent.
    let spent = token_of(&plain);
    let session = login(port, &spent);
    let again = http(
        port,
        &format!(
            "GET /?token={spent} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(
        again.status, 401,
        "a token opens one session: {}",
        again.body
    );

    let shots = artifacts();
    std::fs::create_dir_all(&shots).unwrap();
    for old in SHOTS {
        let _ = std::fs::remove_file(shots.join(old));
    }
    let mut browser = Browser::start(&node_modules, &base, &url, &shots);
    browser.step("refused");
    browser.step("loaded");

    // An agent that waits for the test's word, then writes outside its workspace
    // (refused by Landlock) and goes on living.
    let ws = agent_dir(true);
    let outside = agent_dir(true);
    let go = ws.path().join("go");
    let script = format!(
        "echo up; while [ ! -e {go} ]; do sleep 0.05; done; echo x > {out}/agentd-web-ui 2>/dev/null; echo wrote; while true; do sleep 1; done",
        go = go.display(),
        out = outside.path().display()
    );
    let (_p, profile) = profile_file(&test_profile(
        "web-ui-test",
        "invoker",
        DEFAULT_LIMITS,
        "[breaker]\ntrip_on = [\"canary\"]\n",
    ));
    let mut run = d.run(&profile, ws.path(), &["/bin/sh", "-c", &script]);
    let mut row = Value::Null;
    wait_until(Duration::from_secs(20), "the agent running", || {
        still_running(&mut run, "the agent");
        row = d
            .ps()
            .into_iter()
            .find(|r| r["profile"] == "web-ui-test" && r["state"] == "running")
            .unwrap_or(Value::Null);
        row["pid"].as_u64().is_some_and(|p| p > 0)
    });
    let id = row["id"].as_str().unwrap().to_owned();
    let pid = row["pid"].as_u64().unwrap() as u32;
    browser.tell(&format!("agent {id}"));
    let listed = browser.step("listed");
    assert!(
        listed["row"].as_str().unwrap().contains("web-ui-test"),
        "{listed}"
    );
    let detail = browser.step("detail");
    assert!(
        detail["policy"].as_str().unwrap().contains("web-ui-test"),
        "{detail}"
    );

    std::fs::write(&go, "").unwrap();
    browser.tell("go");
    let denial = browser.step("denial");
    let text = denial["text"].as_str().unwrap();
    assert!(
        text.contains("DENY") && text.contains("agentd-web-ui"),
        "{denial}"
    );

    // Forged requests, with a valid session: another site's name (DNS rebinding), another
    // site's page (CSRF, with and without an Origin), no session at all, a session as a
    // bearer header, a token as a cookie. None kills.
    let kill = format!("/api/agents/{id}/kill");
    let cookie = format!("Cookie: agentd_ui_{port}={session}");
    for (what, req, want) in [
        (
            "another Host",
            format!(
                "GET /api/agents HTTP/1.1\r\nHost: attacker.example:{port}\r\n{cookie}\r\nConnection: close\r\n\r\n"
            ),
            403,
        ),
        (
            "a kill from another Origin",
            format!(
                "POST {kill} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://attacker.example\r\n{cookie}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
            403,
        ),
        (
            "a kill with the cookie and no Origin",
            format!(
                "POST {kill} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{cookie}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
            403,
        ),
        (
            "a kill without a session",
            format!(
                "POST {kill} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: {base}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
            401,
        ),
        (
            "the agents with a made-up session",
            format!(
                "GET /api/agents HTTP/1.1\r\nHost: localhost:{port}\r\nCookie: agentd_ui_{port}={}\r\nConnection: close\r\n\r\n",
                "a".repeat(64)
            ),
            401,
        ),
        (
            "a kill with the session as a bearer header",
            format!(
                "POST {kill} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: {base}\r\nAuthorization: Bearer {session}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
            401,
        ),
        (
            "the agents with a spent token as the cookie",
            format!(
                "GET /api/agents HTTP/1.1\r\nHost: localhost:{port}\r\nCookie: agentd_ui_{port}={spent}\r\nConnection: close\r\n\r\n"
            ),
            401,
        ),
    ] {
        let a = http(port, &req);
        assert_eq!(a.status, want, "{what}: {}", a.body);
    }
    let a = http(
        port,
        &format!(
            "GET /api/agents/{id} HTTP/1.1\r\nHost: localhost:{port}\r\n{cookie}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(
        a.body.contains("\"policy\"") && a.body.contains(&id),
        "{}",
        a.body
    );
    still_running(&mut run, "the agent, after the forged requests");
    assert!(!process_gone(pid), "a forged request killed the agent");
    browser.tell("forged");

    let killed = browser.step("killed");
    assert!(killed["toast"].as_str().unwrap().contains(&id), "{killed}");

    // Held calls, answered on the page alone (no `agentd approvals --follow` runs): a
    // signed approval once, then a denial.
    let l = Counted::on("127.0.0.1");
    let (_pa, asking) = profile_file(&ask_profile(
        "web-ui-ask",
        &format!("\"127.0.0.1/32:{}\"", l.port),
        "",
        "timeout = \"20s\"\nrequire_signature = true",
        "trip_on = [\"canary\"]",
    ));
    let ask_ws = agent_dir(false);
    let port_arg = l.port.to_string();
    let asker = d.run(
        &asking,
        ask_ws.path(),
        &["/usr/bin/python3", "-c", CONNECTS, &port_arg, "s0", "s0"],
    );
    let mut asker_id = String::new();
    wait_until(Duration::from_secs(20), "the asking agent", || {
        asker_id = d
            .ps()
            .into_iter()
            .find(|r| r["profile"] == "web-ui-ask")
            .and_then(|r| r["id"].as_str().map(str::to_owned))
            .unwrap_or_default();
        !asker_id.is_empty()
    });
    browser.tell(&format!("ask {asker_id}"));
    let held = browser.step("held");
    let message = held["message"].as_str().unwrap();
    assert!(
        message.starts_with("agentd-approval v1\n") && message.contains("scope: once"),
        "{held}"
    );
    assert!(
        held["command"]
            .as_str()
            .unwrap()
            .contains("ssh-keygen -q -Y sign -n agentd-approval"),
        "{held}"
    );
    assert_eq!(l.count(), 0, "nothing reached the listener while held");
    let msg = keys.path().join("msg");
    std::fs::write(&msg, message).unwrap();
    let signed = Command::new("ssh-keygen")
        .args(["-q", "-Y", "sign", "-n", "agentd-approval", "-f"])
        .arg(&key)
        .arg(&msg)
        .output()
        .unwrap();
    assert!(
        signed.status.success(),
        "{}",
        String::from_utf8_lossy(&signed.stderr)
    );
    let sig = std::fs::read_to_string(msg.with_extension("sig")).unwrap();
    browser.tell(&format!("sig {}", Value::from(sig)));
    browser.step("approved");
    browser.step("denied");
    browser.finish();
    let (code, out, err) = finish(asker);
    assert_eq!(code, 0, "the asking agent: {out}{err}");
    assert_eq!(json_out(&out, &err), serde_json::json!([0, EPERM]));
    assert_eq!(
        l.count(),
        1,
        "exactly the approved connection reached the listener"
    );

    // Gone: its client says so, ps, /proc; the audit log has the kill by the token's uid.
    let (code, out, err) = finish(run);
    assert_eq!(code, 137, "the agent's agentd run: {out}{err}");
    assert!(
        out.contains("wrote"),
        "the agent wrote (and was refused): {out}"
    );
    assert!(err.contains("web view kill by uid 0"), "{err}");
    let rows = d.ps();
    let row = rows.iter().find(|r| r["id"] == id.as_str()).unwrap();
    assert_ne!(row["state"], "running", "{row}");
    assert!(process_gone(pid), "the agent's process {pid} is alive");
    let events = d.events();
    let via: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "approval" && e["agent"] == asker_id.as_str())
        .map(|e| &e["detail"]["via"])
        .collect();
    assert_eq!(via, ["web view", "web view"], "the approval events");
    let denied = events
        .iter()
        .any(|e| e["agent"] == id.as_str() && e["kind"] == "file_write" && e["verdict"] == "deny");
    assert!(denied, "the denial is an event");
    d.stop();
    let log = d.audit_verified();
    let kill: Value = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| {
            r["kind"] == "control"
                && r["control"]["action"] == "kill"
                && r["control"]["agent"] == id.as_str()
        })
        .unwrap_or_else(|| panic!("no kill of {id} in the audit log:\n{log}"));
    let c = &kill["control"];
    assert_eq!(c["by"]["uid"], 0, "{kill}");
    assert_eq!(c["detail"]["reason"], "web view kill by uid 0", "{kill}");
    // The browser's session: its token's fingerprint, given out, spent, and named by
    // what the session did, with the address it came from.
    let browser_token = fingerprint(&token);
    assert_eq!(
        c["detail"]["web"]["token"],
        browser_token.as_str(),
        "{kill}"
    );
    let peer = c["detail"]["web"]["peer"].as_str().unwrap();
    assert!(peer.starts_with("127.0.0.1:"), "{kill}");
    let given = controls(&log, "ui_token");
    assert_eq!(given.len(), 2, "{given:?}");
    for (g, t) in given.iter().zip([&token, &spent]) {
        assert_eq!(g["detail"]["token"], fingerprint(t).as_str(), "{g}");
        assert_eq!(g["detail"]["uid"], 0, "{g}");
        assert!(g["detail"]["groups"].is_array(), "{g}");
        assert!(
            g["detail"]["expires"].as_str().unwrap().ends_with('Z'),
            "{g}"
        );
    }
    let logins = controls(&log, "ui_login");
    let logged: Vec<&Value> = logins.iter().map(|l| &l["detail"]["token"]).collect();
    assert_eq!(logged.len(), 2, "{logins:?}");
    assert!(
        logged.contains(&&Value::from(browser_token.as_str())),
        "{logins:?}"
    );
    assert!(
        logged.contains(&&Value::from(fingerprint(&spent))),
        "{logins:?}"
    );
    let decisions: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["kind"] == "control" && r["control"]["agent"] == asker_id.as_str())
        .map(|mut r| r["control"].take())
        .filter(|c| c["action"] == "approve" || c["action"] == "deny")
        .collect();
    assert_eq!(decisions.len(), 2, "{decisions:?}");
    for c in &decisions {
        assert_eq!(c["detail"]["via"], "web view", "{c}");
        assert_eq!(c["by"]["uid"], 0, "{c}");
        assert_eq!(c["detail"]["web"]["token"], browser_token.as_str(), "{c}");
        assert!(c["detail"]["web"]["peer"].is_string(), "{c}");
    }
    assert_eq!(decisions[0]["action"], "approve");
    assert_eq!(
        decisions[0]["detail"]["principal"], "alice@example.org",
        "{}",
        decisions[0]
    );
    assert_eq!(
        decisions[1]["detail"]["answer"]["reason"], "not from the web view",
        "{}",
        decisions[1]
    );
    for shot in SHOTS {
        let len = std::fs::metadata(shots.join(shot)).map_or(0, |m| m.len());
        assert!(len > 1000, "screenshot {shot}: {len} bytes");
    }
    eprintln!(
        "web view test: {:.1} s; screenshots in {}",
        started.elapsed().as_secs_f64(),
        shots.display()
    );
}

/// Without `--ui`, `agentd ui-url` prints no URL and says how to turn the view on.
#[test]
fn ui_url_tells_how_to_enable_the_view() {
    if !require_root() {
        return;
    }
    let d = Daemon::start();
    let (code, out, err) = d.client(&["ui-url"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("serves no web view") && err.contains("--ui [ADDR:]PORT"),
        "{err}"
    );
}

/// Starts an agent that lives until killed (launched by root, running as nobody: as
/// `Daemon::run` launches it); returns its client, id and first pid.
fn long_lived_agent(d: &Daemon, profile: &Path, ws: &Path, name: &str) -> (Child, String, u32) {
    let mut run = d.run(profile, ws, &["/bin/sleep", "120"]);
    let mut row = Value::Null;
    wait_until(Duration::from_secs(20), "the agent running", || {
        still_running(&mut run, "the agent");
        row = d
            .ps()
            .into_iter()
            .find(|r| r["profile"] == name && r["state"] == "running")
            .unwrap_or(Value::Null);
        row["pid"].as_u64().is_some_and(|p| p > 0)
    });
    let id = row["id"].as_str().unwrap().to_owned();
    let pid = row["pid"].as_u64().unwrap() as u32;
    (run, id, pid)
}

/// A request with root's session cookie, from this test (no agent's process).
fn with_session(port: u16, session: &str, method: &str, path: &str) -> Answer {
    http(
        port,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}\r\nCookie: agentd_ui_{port}={session}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    )
}

/// What a process inside an agent tries, with the view's port open to it and root's
/// session and an unused token in hand (as a cookie could leak: browsers send it to every
/// port of the host): the agents, the kill switch, an answer to its own held call, a
/// login, and `agentd ui-url`. Prints what each got.
const INSIDE: &str = r#"
import http.client, json, socket, subprocess, sys, threading, time
port, session, token, victim, held_port, agentd, sock = sys.argv[1:8]
port, held_port = int(port), int(held_port)
agent = [l for l in open("/proc/self/cgroup").read().split("/") if l.strip()][-1].strip()
res = {"agent": agent}
def held():
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", held_port)); res["connect"] = 0
    except OSError as e:
        res["connect"] = e.errno
t = threading.Thread(target=held); t.start()
time.sleep(1.0)
def ask(method, path, body=None, cookie=True):
    h = {"Host": f"127.0.0.1:{port}", "Origin": f"http://127.0.0.1:{port}",
         "Content-Type": "application/json"}
    if cookie:
        h["Cookie"] = f"agentd_ui_{port}={session}"
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    return [r.status, r.read().decode()]
res["agents"] = ask("GET", "/api/agents")
res["kill"] = ask("POST", f"/api/agents/{victim}/kill", b"")
allow = json.dumps({"answer": {"answer": "allow", "scope": "once"}}).encode()
res["approve"] = ask("POST", f"/api/approvals/r-{agent}-1", allow)
res["login"] = ask("GET", f"/?token={token}", cookie=False)
out = subprocess.run([agentd, "ui-url", "--socket", sock], capture_output=True, text=True)
res["ui_url"] = [out.returncode, out.stdout, out.stderr]
t.join()
print(json.dumps(res), flush=True)
"#;

/// An agent runs as its owner's uid and may reach the view's port: the view tells its
/// connections apart by the cgroup their socket was made in (sock_diag), and refuses
/// them all, whatever they carry; each refusal is an event of the agent's. `agentd
/// ui-url` from inside it is refused too. Nothing it tried was spent or done.
#[test]
fn nothing_inside_an_agent_may_use_the_web_view() {
    use std::os::unix::fs::PermissionsExt as _;
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let port = free_port();
    // The daemon's group is the agents' (nobody's): their uid alone would let them in.
    let mut d =
        Daemon::start_with_group_and_args("nogroup", &["--ui", &format!("127.0.0.1:{port}")]);
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let follower = Follower::start(&d);
    let (code, out, err) = d.client(&["ui-url"]);
    assert_eq!(code, 0, "{err}");
    let session = login(port, &token_of(&out));
    let (code, out, err) = d.client(&["ui-url"]);
    assert_eq!(code, 0, "{err}");
    let unused = token_of(&out);

    let ws = agent_dir(false);
    let (_pv, victim_profile) = profile_file(&test_profile(
        "web-ui-victim",
        "invoker",
        DEFAULT_LIMITS,
        "",
    ));
    let (victim, victim_id, victim_pid) =
        long_lived_agent(&d, &victim_profile, ws.path(), "web-ui-victim");

    let l = Counted::on("127.0.0.1");
    let agentd = std::fs::canonicalize(agentd_bin()).unwrap();
    let agentd = agentd.to_str().unwrap();
    let socket = d.socket();
    let socket = socket.to_str().unwrap();
    let text = ask_profile(
        "web-ui-inside",
        &format!("\"127.0.0.1/32:{}\"", l.port),
        "",
        "timeout = \"5s\"",
        "trip_on = [\"canary\"]",
    )
    .replace(
        "connect = []",
        &format!("connect = [\"127.0.0.1/32:{port}\"]"),
    )
    .replace("bind = []", &format!("bind = []\nunix = [\"{socket}\"]"))
    .replace("read = [\"", &format!("read = [\"{agentd}\", \""))
    .replace("exec = [\"", &format!("exec = [\"{agentd}\", \""));
    let (_pi, inside_profile) = profile_file(&text);
    let args = [
        port.to_string(),
        session.clone(),
        unused.clone(),
        victim_id.clone(),
        l.port.to_string(),
        agentd.to_owned(),
        socket.to_owned(),
    ];
    let mut cmd = vec!["/usr/bin/python3", "-c", INSIDE];
    cmd.extend(args.iter().map(String::as_str));
    let inside = d.run(&inside_profile, ws.path(), &cmd);
    let held = follower.next(Duration::from_secs(30));
    let (code, out, err) = finish(inside);
    assert_eq!(code, 0, "the agent's script: {out}{err}");
    let res = json_out(&out, &err);
    let agent = res["agent"].as_str().unwrap();
    assert_eq!(held["agent"], agent, "{held}");
    for what in ["agents", "kill", "approve", "login"] {
        let got = &res[what];
        assert_eq!(got[0], 403, "{what} from inside an agent: {got}");
        assert!(
            got[1]
                .as_str()
                .unwrap()
                .contains(&format!("inside agent {agent}")),
            "{what}: {got}"
        );
    }
    let ui_url = &res["ui_url"];
    assert_ne!(ui_url[0], 0, "ui-url from inside an agent: {ui_url}");
    assert_eq!(ui_url[1], "", "{ui_url}");
    assert!(
        ui_url[2]
            .as_str()
            .unwrap()
            .contains("is a process of agent"),
        "{ui_url}"
    );
    assert_eq!(
        res["connect"], EPERM,
        "its held call was not approved: {res}"
    );
    assert_eq!(l.count(), 0);
    assert!(!process_gone(victim_pid), "the agent killed another");

    // Each refusal is an event of the agent's; its attempt to answer is an approval
    // denial, as through the control socket.
    let events = d.events();
    let mine: Vec<&Value> = events
        .iter()
        .filter(|e| e["agent"] == agent && e["verdict"] == "deny")
        .collect();
    let reason = |e: &Value| e["detail"]["reason"].as_str().unwrap_or("").to_owned();
    let connects = mine
        .iter()
        .filter(|e| e["kind"] == "net_connect" && reason(e).contains("used the web view"))
        .count();
    assert_eq!(connects, 3, "GET agents, POST kill, GET /?token: {mine:?}");
    assert!(
        mine.iter().any(|e| e["kind"] == "approval"
            && e["detail"]["request"] == held["id"]
            && reason(e).contains("through the web view")),
        "{mine:?}"
    );

    // Nothing was spent: the token opens a session, root's session still works, here.
    login(port, &unused);
    let a = with_session(port, &session, "GET", "/api/agents");
    assert_eq!(a.status, 200, "{}", a.body);
    let a = with_session(
        port,
        &session,
        "POST",
        &format!("/api/agents/{victim_id}/kill"),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let (code, _, _) = finish(victim);
    assert_eq!(code, 137, "the victim, killed from the host");
    d.stop();
    d.audit_verified();
    eprintln!(
        "agent refusal test: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A group the test adds (groupadd) and removes on drop (groupdel).
struct TempGroup(&'static str);

impl TempGroup {
    fn add(name: &'static str) -> TempGroup {
        // A previous run's, if it failed before its cleanup.
        let _ = Command::new("groupdel").arg(name).output();
        let out = Command::new("groupadd")
            .arg(name)
            .output()
            .expect("groupadd");
        assert!(
            out.status.success(),
            "groupadd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TempGroup(name)
    }

    /// `gpasswd -a|-d USER GROUP`.
    fn member(&self, user: &str, add: bool) {
        let out = Command::new("gpasswd")
            .arg(if add { "-a" } else { "-d" })
            .args([user, self.0])
            .output()
            .expect("gpasswd");
        assert!(
            out.status.success(),
            "gpasswd {user} {}: {}",
            self.0,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for TempGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(self.0).output();
    }
}

/// A member of --group who is not root: their token watches every agent, but kills only
/// their own (another user's agent is refused, as `agentd kill` refuses it); removed from
/// the group, they can act no more, before their session ends.
#[test]
fn a_group_member_watches_all_acts_on_their_own_and_loses_actions_with_the_group() {
    use std::os::unix::fs::PermissionsExt as _;
    if !require_root() {
        return;
    }
    let user = TestUser::get();
    let group = TempGroup::add("agentd-test-web");
    group.member(TEST_USER, true);
    let port = free_port();
    let d = Daemon::start_with_group_and_args(group.0, &["--ui", &format!("127.0.0.1:{port}")]);
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ws = agent_dir(false);
    let (_pv, profile) = profile_file(&test_profile(
        "web-ui-others",
        "invoker",
        DEFAULT_LIMITS,
        "",
    ));
    // An agent root launched for nobody (SUDO_UID): nobody's.
    let (victim, id, pid) = long_lived_agent(&d, &profile, ws.path(), "web-ui-others");
    // And one root launched for the member: theirs, in `ps` as for the kill switch.
    let mut mine = Command::new(agentd_bin())
        .arg("run")
        .arg("--socket")
        .arg(d.socket())
        .arg("--profile")
        .arg(&profile)
        .arg("--workspace")
        .arg(ws.path())
        .args(["--", "/bin/sleep", "120"])
        .env("SUDO_UID", user.uid.to_string())
        .env("SUDO_GID", user.gid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut my_row = Value::Null;
    wait_until(
        Duration::from_secs(20),
        "the member's agent running",
        || {
            still_running(&mut mine, "the member's agent");
            my_row = d
                .ps()
                .into_iter()
                .find(|r| {
                    r["profile"] == "web-ui-others"
                        && r["id"] != id.as_str()
                        && r["state"] == "running"
                })
                .unwrap_or(Value::Null);
            my_row["pid"].as_u64().is_some_and(|p| p > 0)
        },
    );
    assert_eq!(my_row["owner_uid"], user.uid, "{my_row}");
    let my_id = my_row["id"].as_str().unwrap().to_owned();

    // The member's own URL: `agentd ui-url` with their uid and groups.
    let out = Command::new("setpriv")
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg("--init-groups")
        .arg(agentd_bin())
        .args(["ui-url", "--json", "--socket"])
        .arg(d.socket())
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "ui-url as {TEST_USER}: {err}");
    let given: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(given["uid"], user.uid, "{given}");
    let session = login(port, &token_of(given["url"].as_str().unwrap()));

    // Watching: every agent, theirs or not.
    let me = with_session(port, &session, "GET", "/api/me");
    assert_eq!(me.status, 200, "{}", me.body);
    let me: Value = serde_json::from_str(&me.body).unwrap();
    assert_eq!(me["uid"], user.uid, "{me}");
    let listed = with_session(port, &session, "GET", "/api/agents");
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert!(listed.body.contains(&id), "{}", listed.body);
    // Acting: not on another user's agent.
    let kill = format!("/api/agents/{id}/kill");
    let a = with_session(port, &session, "POST", &kill);
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("belongs to uid 65534;"), "{}", a.body);
    // Their own: killed.
    let a = with_session(port, &session, "POST", &format!("/api/agents/{my_id}/kill"));
    assert_eq!(a.status, 200, "{}", a.body);
    let (code, _, _) = finish(mine);
    assert_eq!(code, 137);
    // Out of the group: no action at all, with the same session.
    group.member(TEST_USER, false);
    let a = with_session(port, &session, "POST", &kill);
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("no longer root or in group"), "{}", a.body);
    assert!(!process_gone(pid), "the member killed another user's agent");

    let (code, _, err) = d.client(&["kill", &id]);
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = finish(victim);
    assert_eq!(code, 137);
}
