//! A real agent CLI under agentd: OpenAI's Codex CLI (npm @openai/codex, pinned; installed
//! by scripts/setup.sh), under the built-in `codex` profile, driven by a scripted fake of
//! its model API on loopback (tests/fixtures/agents/fake_model.py), embedded and through
//! the daemon; then its TUI in a terminal (tmux). Host only: the guests carry no Node.js.
//!
//! The agent's user is `agentd-test` (see `TestUser`), whose home gets what `npm i -g`
//! with a user prefix would put there (`~/.npm-global`), a `~/.codex/config.toml` naming
//! the fake model server, a `~/.gitconfig`, and a canary key in `~/.ssh`.

use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use agentd_tests::{
    AgentRun, Daemon, Run, TestUser, agent_dir, agentd_bin, cgroups_named, profile_file,
    read_events, repo_root, require_root, wait_until_or,
};
use serde_json::Value;

const CODEX_VERSION: &str = "0.171.0";

/// Where scripts/setup.sh installed Codex CLI (an npm prefix).
fn codex_cache() -> PathBuf {
    let base = std::env::var_os("AGENTD_AGENT_CLIS").map_or_else(
        || {
            let cache = std::env::var_os("XDG_CACHE_HOME").map_or_else(
                || PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"),
                PathBuf::from,
            );
            cache.join("agentd/agent-clis")
        },
        PathBuf::from,
    );
    base.join(format!("codex-{CODEX_VERSION}"))
}

/// Removes a path on drop.
struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    let st = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

/// The agent's user's home, set up for Codex: the CLI under `~/.npm-global` (hard links
/// into the cache), `~/.codex/config.toml` for a model server on `model_port`, a
/// `~/.gitconfig`, and `~/.ssh/id_rsa` (a canary of the profile).
struct CodexHome {
    user: TestUser,
    codex_js: PathBuf,
    key: PathBuf,
    _made: Vec<Remove>,
}

impl CodexHome {
    fn new(model_port: u16) -> CodexHome {
        let cache = codex_cache();
        assert!(
            cache
                .join("node_modules/@openai/codex/bin/codex.js")
                .exists(),
            "Codex CLI {CODEX_VERSION} is not installed in {}: run scripts/setup.sh",
            cache.display()
        );
        let user = TestUser::get();
        let home = user.home.clone();
        let mut made = Vec::new();
        let prefix = home.join(".npm-global");
        made.push(Remove(prefix.clone()));
        std::fs::create_dir_all(prefix.join("lib")).unwrap();
        // Hard links: 424 MB copied in no time (a copy where they cannot be made).
        let modules = prefix.join("lib/node_modules");
        let linked = Command::new("cp")
            .arg("-al")
            .arg(cache.join("node_modules"))
            .arg(&modules)
            .status()
            .unwrap();
        if !linked.success() {
            let _ = std::fs::remove_dir_all(&modules);
            let st = Command::new("cp")
                .arg("-a")
                .arg(cache.join("node_modules"))
                .arg(&modules)
                .status()
                .unwrap();
            assert!(st.success(), "copying Codex CLI");
        }
        let dot_codex = home.join(".codex");
        made.push(Remove(dot_codex.clone()));
        std::fs::create_dir_all(&dot_codex).unwrap();
        std::fs::write(
            dot_codex.join("config.toml"),
            format!(
                r#"model = "fake-model"
model_provider = "fake"
disable_paste_burst = true
approval_policy = "never"
sandbox_mode = "danger-full-access"
allow_login_shell = false
check_for_update_on_startup = false
web_search = "disabled"
[analytics]
enabled = false
[feedback]
enabled = false
[history]
persistence = "none"
[features]
unbounded_connection_retries = false
plugins = false
shell_snapshot = false
daemon_auto_start = false
[model_providers.fake]
name = "fake"
base_url = "http://127.0.0.1:{model_port}/v1"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
"#
            ),
        )
        .unwrap();
        chown_tree(&dot_codex, user.uid, user.gid);
        let gitconfig = home.join(".gitconfig");
        made.push(Remove(gitconfig.clone()));
        std::fs::write(
            &gitconfig,
            "[user]\n\tname = agentd test\n\temail = agentd-test@localhost\n",
        )
        .unwrap();
        let ssh = home.join(".ssh");
        made.push(Remove(ssh.clone()));
        std::fs::create_dir_all(&ssh).unwrap();
        let key = ssh.join("id_rsa");
        std::fs::write(&key, "not a real key\n").unwrap();
        chown_tree(&ssh, user.uid, user.gid);
        CodexHome {
            codex_js: modules.join("@openai/codex/bin/codex.js"),
            user,
            key,
            _made: made,
        }
    }
}

/// fake_model.py on loopback, with its script; its log has every request.
struct ModelServer {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ModelServer {
    fn start(script: &Value) -> ModelServer {
        let dir = tempfile::tempdir().unwrap();
        let script_path = dir.path().join("script.json");
        std::fs::write(&script_path, script.to_string()).unwrap();
        let log = dir.path().join("requests.jsonl");
        let mut child = Command::new("python3")
            .arg(repo_root().join("tests/fixtures/agents/fake_model.py"))
            .arg(&script_path)
            .arg(&log)
            .arg("0")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let port = first.trim().parse().unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("fake_model.py printed {first:?}, not its port")
        });
        ModelServer {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    /// The requests so far, each with its `tool_outputs`.
    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The output of tool call `call` (`call_N`: answered to request N, from 0), as the
    /// model saw it.
    fn tool_output(&self, call: &str) -> Option<String> {
        self.requests().iter().find_map(|r| {
            r["tool_outputs"].as_array()?.iter().find_map(|o| {
                (o["call_id"] == call).then(|| o["output"].as_str().unwrap_or("").to_owned())
            })
        })
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback "forum" that counts the connections that reach it.
struct Forum {
    port: u16,
    arrived: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Forum {
    fn start() -> Forum {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let arrived = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (arrived.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok(_) => {
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Forum {
            port,
            arrived,
            stop,
        }
    }
}

impl Drop for Forum {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The built-in `codex` profile, with the fake model server's address where the profile
/// says to put the model API's.
fn codex_profile(model_port: u16) -> String {
    let text = std::fs::read_to_string(repo_root().join("profiles/codex.toml")).unwrap();
    let placeholder = "\"127.0.0.1/32:11434\"";
    assert!(
        text.contains(placeholder),
        "profiles/codex.toml names its model API here"
    );
    text.replace(placeholder, &format!("\"127.0.0.1/32:{model_port}\""))
}

fn events_of<'a>(run: &'a Run, kind: &str) -> Vec<&'a Value> {
    run.events.iter().filter(|e| e["kind"] == kind).collect()
}

/// Codex CLI, asked to analyze a question, reads it, drafts an answer, commits it with git,
/// then tries to post it to a forum and to read an SSH key: the first three work, the post
/// never arrives, the key read trips the breaker, and the events tell it.
#[test]
fn codex_works_in_scope_is_refused_outside_and_a_canary_stops_it() {
    if !require_root() {
        return;
    }
    let forum = Forum::start();
    let post = format!(
        "python3 -c \"import urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:{}/post', data=b'the answer'), timeout=5)\"",
        forum.port
    );
    let script = serde_json::json!([
        {"shell": "cat question.txt"},
        {"shell": "echo 'a draft answer' > draft.txt"},
        {"shell": "git init -q && git add . && git commit -qm draft && git log --oneline | wc -l"},
        {"shell": post},
        {"shell": "cat ~/.ssh/id_rsa"},
        {"say": "done"}
    ]);
    let mut daemon = Daemon::start();
    for through_daemon in [false, true] {
        let mode = if through_daemon { "daemon" } else { "embedded" };
        let model = ModelServer::start(&script);
        let home = CodexHome::new(model.port);
        // The user's own project (git refuses a repository its user does not own).
        let ws = agent_dir(true);
        std::fs::write(ws.path().join("question.txt"), "what is 6*7?\n").unwrap();
        chown_tree(ws.path(), home.user.uid, home.user.gid);
        let (_p, profile) = profile_file(&codex_profile(model.port));
        let mut run = AgentRun::new(profile.to_str().unwrap(), ws.path())
            .events_in(Path::new("/var/tmp"))
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("SUDO_UID", &home.user.uid.to_string())
            .env("SUDO_GID", &home.user.gid.to_string())
            .cmd(&[
                home.codex_js.to_str().unwrap(),
                "exec",
                "--strict-config",
                "--ephemeral",
                "--skip-git-repo-check",
                "--dangerously-bypass-approvals-and-sandbox",
                "--color",
                "never",
                "Analyze the question in question.txt.",
            ]);
        if through_daemon {
            run = run.arg("--socket").arg(daemon.socket().to_str().unwrap());
        }
        let run = run.run();
        let story = format!(
            "{mode}\n{}\nrequests: {:#?}",
            run.explain(),
            model.requests()
        );

        // In scope: read, write, git.
        let out = |n: u32| model.tool_output(&format!("call_{n}")).unwrap_or_default();
        assert!(
            out(0).contains("what is 6*7?"),
            "read the workspace: {story}"
        );
        assert!(out(1).contains("exited with code 0"), "wrote: {story}");
        assert_eq!(
            std::fs::read_to_string(ws.path().join("draft.txt")).unwrap(),
            "a draft answer\n",
            "{story}"
        );
        assert!(
            out(2).contains("exited with code 0") && out(2).contains("Output:\n1"),
            "git: {story}"
        );
        // Out of scope: the post is refused (the agent sees an error), nothing arrives.
        assert!(
            !out(3).contains("exited with code 0"),
            "post refused: {story}"
        );
        assert_eq!(
            forum.arrived.load(Ordering::SeqCst),
            0,
            "nothing reached the forum: {story}"
        );
        let refused = events_of(&run, "net_connect");
        assert!(
            refused
                .iter()
                .any(|e| e["port"] == forum.port && e["verdict"] == "deny" && e["layer"] == "bpf"),
            "the post's connect, refused by the cgroup program: {story}"
        );
        // The canary: the key's contents never reach the model, codex dies with its tree.
        assert!(
            out(4).is_empty(),
            "no result of the key read reached the model: {story}"
        );
        assert!(
            !model
                .requests()
                .iter()
                .any(|r| r["body"].to_string().contains("not a real key")),
            "{story}"
        );
        assert_eq!(run.code(), 137, "the breaker killed the agent: {story}");
        let canary = events_of(&run, "canary");
        assert!(
            canary
                .iter()
                .any(|e| e["path"] == home.key.to_str().unwrap()),
            "{story}"
        );
        assert_eq!(events_of(&run, "breaker").len(), 1, "{story}");
        // The story's beginning: codex's native binary ran, and bash for the commands.
        let execs: Vec<&str> = events_of(&run, "exec")
            .iter()
            .filter_map(|e| e["path"].as_str())
            .collect();
        assert!(
            execs.iter().any(|p| p.ends_with("/bin/codex")),
            "{execs:?}\n{story}"
        );
        assert!(
            execs.iter().any(|p| p.ends_with("/git")),
            "{execs:?}\n{story}"
        );
        let exit = run.event("exit").unwrap_or_else(|| panic!("{story}"));
        assert_eq!(exit["detail"]["exit_code"], 137, "{story}");
    }
    daemon.stop();
}

/// A tmux server of this test's own (`tmux -L NAME`), one window running an interactive
/// `sh` (dash: job control, and no line editor that would set the terminal's modes
/// itself, so what agentd leaves behind is what the test sees): the user's terminal.
/// Killed on drop.
struct Tmux {
    name: String,
}

impl Tmux {
    fn start(width: u16, height: u16) -> Tmux {
        let t = Tmux {
            name: format!("agentd-test-{}", std::process::id()),
        };
        let st = t
            .cmd()
            .args([
                "new-session",
                "-d",
                "-x",
                &width.to_string(),
                "-y",
                &height.to_string(),
            ])
            .args(["sh", "-i"])
            .status()
            .unwrap();
        assert!(st.success(), "tmux new-session");
        t.wait_for("the shell's prompt", Duration::from_secs(20), |s| {
            s.contains('$') || s.contains('#')
        });
        t
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.name]);
        c
    }

    fn keys(&self, keys: &[&str]) {
        let st = self
            .cmd()
            .args(["send-keys", "-t", "0"])
            .args(keys)
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn screen(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "0"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn format(&self, f: &str) -> String {
        let out = self
            .cmd()
            .args(["display-message", "-p", "-t", "0", f])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The terminal's modes (`stty -a` of the pane's tty, but its size) and tmux's view
    /// of its screen modes: alternate screen, cursor, keypad, mouse, bracketed paste.
    fn modes(&self) -> String {
        let tty = self.format("#{pane_tty}");
        let stty = Command::new("stty")
            .arg("-a")
            .arg("-F")
            .arg(&tty)
            .output()
            .unwrap();
        let stty = String::from_utf8_lossy(&stty.stdout)
            .lines()
            .skip(1)
            .collect::<Vec<_>>()
            .join("\n");
        let flags = self.format(
            "alternate=#{alternate_on} cursor=#{cursor_flag} keypad=#{keypad_flag},#{keypad_cursor_flag} mouse=#{mouse_any_flag},#{mouse_button_flag},#{mouse_standard_flag},#{mouse_sgr_flag},#{mouse_all_flag} paste=#{bracketed_paste_flag}",
        );
        format!("{stty}\n{flags}")
    }

    fn raw(&self) -> bool {
        self.modes().contains("-icanon")
    }

    fn wait_for(&self, what: &str, limit: Duration, mut pred: impl FnMut(&str) -> bool) {
        wait_until_or(
            limit,
            || pred(&self.screen()),
            || {
                format!(
                    "timed out waiting for {what}; the screen:\n{}",
                    self.screen()
                )
            },
        );
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

/// Codex CLI's TUI in a terminal (tmux), embedded and through the daemon: it renders,
/// follows a resize, answers a prompt with a tool call; Ctrl-Z gives the shell back with
/// the terminal as it was and the agent frozen, `fg` brings the TUI back; a canary read
/// gets it killed, and the terminal is again as it was before the run.
#[test]
fn codex_tui_in_a_terminal_job_control_and_restoration() {
    if !require_root() {
        return;
    }
    let mut daemon = Daemon::start();
    for through_daemon in [false, true] {
        let mode = if through_daemon { "daemon" } else { "embedded" };
        let model = ModelServer::start(&serde_json::json!([
            {"shell": "cat question.txt"},
            {"say": "The answer is 42."},
            {"shell": "cat ~/.ssh/id_rsa"},
            {"say": "unreachable"}
        ]));
        let home = CodexHome::new(model.port);
        let ws = agent_dir(true);
        std::fs::write(ws.path().join("question.txt"), "what is 6*7?\n").unwrap();
        chown_tree(ws.path(), home.user.uid, home.user.gid);
        let (_p, profile) = profile_file(&codex_profile(model.port));
        let events_dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let events = events_dir.path().join("events.jsonl");
        let tmux = Tmux::start(120, 35);
        let before = tmux.modes();
        let socket = daemon.socket();
        let via = if through_daemon {
            format!("--socket {} ", socket.display())
        } else {
            String::new()
        };
        tmux.keys(&[
            &format!(
                "cd {} && PATH=/usr/local/bin:/usr/bin:/bin SUDO_UID={} SUDO_GID={} {} run {via}--events {} --profile {} -- {} --no-daemon",
                ws.path().display(),
                home.user.uid,
                home.user.gid,
                agentd_bin().display(),
                events.display(),
                profile.display(),
                home.codex_js.display()
            ),
            "Enter",
        ]);
        let story = |what: &str| {
            format!(
                "{mode}: {what}\nscreen:\n{}\nevents:\n{}",
                tmux.screen(),
                std::fs::read_to_string(&events).unwrap_or_default()
            )
        };
        let prompt = |s: &str| s.contains("Ask Codex to do anything");
        tmux.wait_for(&format!("{mode}: the TUI"), Duration::from_secs(60), prompt);
        assert!(tmux.raw(), "{}", story("the user's terminal is raw"));

        // A resize reaches the agent's own terminal.
        let codex_pid = read_events(&events)
            .iter()
            .find(|e| {
                e["kind"] == "exec"
                    && e["path"]
                        .as_str()
                        .is_some_and(|p| p.ends_with("/bin/codex"))
            })
            .and_then(|e| e["pid"].as_u64())
            .unwrap_or_else(|| panic!("{}", story("codex's exec")));
        let agent_tty = std::fs::read_link(format!("/proc/{codex_pid}/fd/0")).unwrap();
        assert_ne!(
            agent_tty.to_string_lossy(),
            tmux.format("#{pane_tty}"),
            "{mode}: a terminal of its own"
        );
        let st = tmux
            .cmd()
            .args(["resize-window", "-t", "0", "-x", "100", "-y", "30"])
            .status()
            .unwrap();
        assert!(st.success());
        let size = || {
            let out = Command::new("stty")
                .arg("-F")
                .arg(&agent_tty)
                .arg("size")
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        wait_until_or(
            Duration::from_secs(10),
            || size() == "30 100",
            || story(&format!("resized: {}", size())),
        );
        tmux.wait_for(
            &format!("{mode}: the TUI after the resize"),
            Duration::from_secs(10),
            prompt,
        );

        // A prompt, a tool call, the answer.
        tmux.keys(&["What is in question.txt", "Enter"]);
        tmux.wait_for(
            &format!("{mode}: the answer"),
            Duration::from_secs(30),
            |s| s.contains("The answer is 42."),
        );
        assert!(
            model
                .tool_output("call_0")
                .is_some_and(|o| o.contains("what is 6*7?")),
            "{}",
            story("the tool call read the workspace")
        );

        // Ctrl-Z: the shell is back, the terminal as before the run, the agent frozen.
        tmux.keys(&["C-z"]);
        tmux.wait_for(
            &format!("{mode}: the job stopped"),
            Duration::from_secs(10),
            |s| s.contains("Stopped"),
        );
        assert_eq!(
            tmux.modes(),
            before,
            "{}",
            story("the terminal while suspended")
        );
        // The agent's v2 cgroup's `frozen` (None: no such cgroup).
        let frozen = || {
            cgroups_named("codex-")
                .into_iter()
                .find_map(|d| std::fs::read_to_string(d.join("cgroup.events")).ok())
                .map(|e| e.lines().any(|l| l == "frozen 1"))
        };
        wait_until_or(
            Duration::from_secs(10),
            || frozen() == Some(true),
            || story("the agent frozen"),
        );

        // fg: the TUI is back, raw mode and its screen, the agent thawed.
        tmux.keys(&["fg", "Enter"]);
        wait_until_or(
            Duration::from_secs(10),
            || tmux.format("#{alternate_on}") == "1" && prompt(&tmux.screen()),
            || story("the TUI after fg"),
        );
        assert!(
            tmux.raw() && frozen() == Some(false),
            "{}",
            story("raw and thawed after fg")
        );

        // A canary read: the breaker kills it; the terminal is as before the run.
        tmux.keys(&["Read my key", "Enter"]);
        tmux.wait_for(
            &format!("{mode}: the breaker's message"),
            Duration::from_secs(30),
            |s| s.contains("breaker tripped"),
        );
        assert_eq!(
            tmux.modes(),
            before,
            "{}",
            story("the terminal after the kill")
        );
        // The client may still be writing its last events when agentd's message shows.
        let has_exit = || {
            std::fs::read_to_string(&events)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .any(|e| e["kind"] == "exit")
        };
        wait_until_or(Duration::from_secs(10), has_exit, || story("an exit event"));
        let all = read_events(&events);
        let exit = all
            .iter()
            .find(|e| e["kind"] == "exit")
            .unwrap_or_else(|| panic!("{}", story("an exit event")));
        assert_eq!(exit["detail"]["exit_code"], 137, "{}", story("killed"));
        assert!(
            all.iter()
                .any(|e| e["kind"] == "canary" && e["path"] == home.key.to_str().unwrap()),
            "{}",
            story("the canary")
        );
        assert!(
            !model
                .requests()
                .iter()
                .any(|r| r["body"].to_string().contains("not a real key")),
            "{}",
            story("the key never reached the model")
        );
    }
    daemon.stop();
}
