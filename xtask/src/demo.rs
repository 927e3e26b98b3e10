//! `cargo xtask demo`: the incident, replayed under agentd. An agent asked only to analyze
//! a forum question tries to post an answer; under `analyze-only` the kernel refuses the
//! write and the network, and the breaker kills the agent at its first attempt to reach
//! the network. A local "forum" on loopback counts what reached it.
//!
//! Then the same incident with a person in the loop: a profile that may *ask* to post to
//! the forum, through a daemon. The agent's connect is held in the kernel; the person sees
//! the request, says no with a signed decision (`agentd deny --sign`), nothing reaches the
//! forum, and the audit log, verified with the signature, shows the request and the
//! refusal.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;

pub fn demo(root: &Path) -> anyhow::Result<()> {
    crate::setup(root)?;
    crate::run(
        root,
        "cargo",
        &["build", "--locked", "--package", "agentd"],
        &[],
    )?;
    let agentd = root.join("target/debug/agentd");

    let work = root.join("target/demo");
    let ws = work.join("workspace");
    if ws.exists() {
        std::fs::remove_dir_all(&ws).with_context(|| format!("cannot clean {}", ws.display()))?;
    }
    std::fs::create_dir_all(&ws)?;
    std::fs::write(
        ws.join("question.txt"),
        "Our team cannot open the shared reports folder. How should we fix its permissions?\n",
    )?;
    std::fs::copy(root.join("xtask/demo/agent.sh"), ws.join("agent.sh"))?;
    // The forum: counts connections and bytes that reach it.
    let forum = TcpListener::bind("127.0.0.1:0")?;
    let port = forum.local_addr()?.port();
    forum.set_nonblocking(true)?;
    let posts = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&posts);
    std::thread::spawn(move || {
        loop {
            if let Ok((mut s, _)) = forum.accept() {
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf);
                counter.fetch_add(1, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });

    std::fs::write(ws.join("forum.txt"), format!("127.0.0.1:{port}"))?;
    // The agent runs as an unprivileged user: it must be able to read its workspace.
    let status = Command::new("chmod")
        .arg("-R")
        .arg("a+rX")
        .arg(&work)
        .status()?;
    anyhow::ensure!(status.success(), "chmod {} failed", work.display());

    eprintln!("\n[demo] what this host can enforce:");
    let doctor = Command::new(&agentd).arg("doctor").status()?;
    anyhow::ensure!(
        doctor.success(),
        "agentd doctor: this host cannot enforce (see above)"
    );

    let events = work.join("events.jsonl");
    if events.exists() {
        std::fs::remove_file(&events)?;
    }
    eprintln!(
        "\n[demo] $ agentd run --profile analyze-only --workspace {} --events {} -- /bin/sh agent.sh\n",
        ws.display(),
        events.display()
    );
    // The invoking user of a demo started as root: nobody (an agent never runs as root).
    let sudo_uid = std::env::var("SUDO_UID").unwrap_or_else(|_| "65534".into());
    let sudo_gid = std::env::var("SUDO_GID").unwrap_or_else(|_| "65534".into());
    let status = Command::new(&agentd)
        .args(["run", "--profile", "analyze-only", "--workspace"])
        .arg(&ws)
        .arg("--events")
        .arg(&events)
        .args(["--", "/bin/sh", "agent.sh"])
        .env("SUDO_UID", sudo_uid)
        .env("SUDO_GID", sudo_gid)
        .status()?;
    std::thread::sleep(Duration::from_millis(100));

    eprintln!(
        "\n[demo] what the kernel saw and decided ({}):",
        events.display()
    );
    let text = std::fs::read_to_string(&events)?;
    for line in text.lines() {
        let e: serde_json::Value = serde_json::from_str(line)?;
        let target = e["path"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| e["addr"].as_str().map(|a| format!("{a}:{}", e["port"])))
            .or_else(|| {
                e["detail"]["rule"].as_str().map(|r| {
                    format!(
                        "rule {r}, contained in {:.2} ms",
                        e["detail"]["contain_ns"].as_f64().unwrap_or(f64::NAN) / 1e6
                    )
                })
            })
            .or_else(|| e["detail"]["syscall"].as_str().map(|c| format!("{c}()")))
            .unwrap_or_default();
        eprintln!(
            "  {:<14} {:<7} {:<9} pid {:<7} {:<8} {}",
            e["kind"].as_str().unwrap_or("?"),
            e["verdict"].as_str().unwrap_or("?"),
            e["layer"].as_str().unwrap_or("?"),
            e["pid"],
            e["comm"].as_str().unwrap_or("?"),
            target
        );
    }
    let posted = posts.load(Ordering::SeqCst);
    let draft = ws.join("answer.txt").exists();
    eprintln!("\n[demo] agentd run exited with {status}");
    eprintln!("[demo] posts that reached the forum: {posted}");
    eprintln!(
        "[demo] draft answer written to the workspace: {}",
        if draft { "yes" } else { "no" }
    );
    anyhow::ensure!(posted == 0 && !draft, "the agent was NOT contained");
    anyhow::ensure!(
        status.code() == Some(137),
        "expected the breaker to kill the agent (exit 137)"
    );
    eprintln!("[demo] contained: nothing was written, nothing was posted, the agent was stopped");
    asked(&agentd, &work, &ws, port, &posts)
}

/// The incident with asking: the post is held for a person, who says no.
fn asked(
    agentd: &Path,
    work: &Path,
    ws: &Path,
    port: u16,
    posts: &Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    let dir = work.join("ask");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    // The person's key, and the daemon's list of who may sign approvals.
    let key = dir.join("approver");
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "approver", "-f"])
        .arg(&key)
        .status()
        .context("ssh-keygen (openssh-client)")?;
    anyhow::ensure!(keygen.success(), "ssh-keygen failed");
    let public = std::fs::read_to_string(key.with_extension("pub"))?;
    let signers = dir.join("allowed_signers");
    std::fs::write(
        &signers,
        format!("approver@example.org namespaces=\"agentd-approval\" {public}"),
    )?;
    let profile = dir.join("analyze-ask.toml");
    std::fs::write(&profile, ask_profile(port))?;
    let socket = dir.join("agentd.sock");
    let audit = dir.join("audit.jsonl");
    eprintln!(
        "\n[demo] the same agent under a profile that may *ask* to post to the forum, through a daemon:"
    );
    eprintln!("[demo]   network.ask = [\"127.0.0.1/32:{port}\"], [ask] require_signature = true");
    let mut daemon = Command::new(agentd)
        .arg("daemon")
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--audit-log")
        .arg(&audit)
        .arg("--allowed-signers")
        .arg(&signers)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| {
        wait_for_socket(&socket, &mut daemon)?;
        // The person: follows requests as they come.
        let mut follower = Command::new(agentd)
            .args(["approvals", "--follow", "--json", "--socket"])
            .arg(&socket)
            .stdout(Stdio::piped())
            .spawn()?;
        let result = (|| {
            let out = follower.stdout.take().context("the follower's stdout")?;
            let mut lines = BufReader::new(out).lines();
            std::thread::sleep(Duration::from_millis(300));
            let sudo_uid = std::env::var("SUDO_UID").unwrap_or_else(|_| "65534".into());
            let sudo_gid = std::env::var("SUDO_GID").unwrap_or_else(|_| "65534".into());
            eprintln!(
                "\n[demo] $ agentd run --profile {} -- /bin/sh agent.sh\n",
                profile.display()
            );
            let agent = Command::new(agentd)
                .arg("run")
                .arg("--socket")
                .arg(&socket)
                .arg("--profile")
                .arg(&profile)
                .arg("--workspace")
                .arg(ws)
                .args(["--", "/bin/sh", "agent.sh"])
                .env("SUDO_UID", sudo_uid)
                .env("SUDO_GID", sudo_gid)
                .spawn()?;
            let request = loop {
                let line = lines
                    .next()
                    .context("the follower ended before a request came")??;
                let v: serde_json::Value = serde_json::from_str(&line)?;
                if let Some(r) = v.get("held") {
                    break r.clone();
                }
            };
            let id = request["id"].as_str().context("a request id")?.to_owned();
            eprintln!("\n[demo] the post is held in the kernel; the person is asked:");
            let shown = Command::new(agentd)
                .args(["approvals", "--socket"])
                .arg(&socket)
                .status()?;
            anyhow::ensure!(shown.success(), "agentd approvals failed");
            eprintln!(
                "[demo] posts that reached the forum while it waits: {}",
                posts.load(Ordering::SeqCst)
            );
            eprintln!(
                "\n[demo] the person answers no, signed: $ agentd deny {id} --reason \"analyze only: no posting\" --sign {}",
                key.display()
            );
            let denied = Command::new(agentd)
                .args([
                    "deny",
                    &id,
                    "--reason",
                    "analyze only: no posting",
                    "--sign",
                ])
                .arg(&key)
                .arg("--socket")
                .arg(&socket)
                .status()?;
            anyhow::ensure!(denied.success(), "agentd deny failed");
            let status = agent.wait_with_output()?.status;
            eprintln!("\n[demo] agentd run exited with {status}");
            Ok(())
        })();
        let _ = follower.kill();
        let _ = follower.wait();
        result
    })();
    // SIGTERM, so the daemon syncs and closes its audit log.
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let _ = daemon.wait();
    result?;

    let posted = posts.load(Ordering::SeqCst);
    eprintln!("[demo] posts that reached the forum: {posted}");
    anyhow::ensure!(posted == 0, "the post reached the forum");
    eprintln!(
        "\n[demo] the audit log ({}): the request and the person's signed refusal",
        audit.display()
    );
    let log = std::fs::read_to_string(&audit)?;
    let mut seen = (false, false);
    for line in log.lines() {
        let r: serde_json::Value = serde_json::from_str(line)?;
        let c = &r["control"];
        match c["action"].as_str() {
            Some("ask") => {
                seen.0 = true;
                eprintln!(
                    "  #{} ask   {} {}",
                    r["seq"], c["agent"], c["detail"]["what"]
                );
            }
            Some("deny") => {
                seen.1 = c["detail"]["signature"].is_string();
                eprintln!(
                    "  #{} deny  {} by uid {} ({}), signed by {} {}",
                    r["seq"],
                    c["detail"]["request"],
                    c["by"]["uid"],
                    c["detail"]["via"],
                    c["detail"]["principal"],
                    c["detail"]["fingerprint"]
                );
            }
            _ => {}
        }
    }
    anyhow::ensure!(
        seen.0 && seen.1,
        "the audit log lacks the request or the signed refusal"
    );
    eprintln!(
        "\n[demo] $ agentd audit verify --allowed-signers {} {}",
        signers.display(),
        audit.display()
    );
    let verified = Command::new(agentd)
        .args(["audit", "verify", "--allowed-signers"])
        .arg(&signers)
        .arg(&audit)
        .status()?;
    anyhow::ensure!(verified.success(), "audit verify failed");
    eprintln!("[demo] held, asked, refused by a person, nothing posted, and the record verifies");
    Ok(())
}

/// `analyze-only`, with the forum as a destination to ask a person about.
fn ask_profile(port: u16) -> String {
    format!(
        r#"# The incident's agent, allowed to *ask* to post: a person decides, and signs.
[agent]
name = "analyze-only-ask"
description = "Reads the workspace; writes nothing; may ask to post to the forum"

[identity]
run_as = "invoker"

[filesystem]
read = ["{{workspace}}", "/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc", "/proc", "/dev/null", "/dev/urandom"]
write = ["/dev/null"]
exec = ["/usr/bin", "/bin", "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"]

[network]
connect = []
ask = ["127.0.0.1/32:{port}"]

[ask]
timeout = "60s"
require_signature = true

[limits]
pids = 128
wall_time = "5m"

[breaker]
# A person's refusal stops the agent, as a connect outside the profile would.
trip_on = ["canary", "exec", "connect", "denied"]
"#
    )
}

fn wait_for_socket(socket: &Path, daemon: &mut std::process::Child) -> anyhow::Result<()> {
    for _ in 0..600 {
        if let Some(st) = daemon.try_wait()? {
            anyhow::bail!("the daemon exited: {st}");
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("the daemon did not answer at {}", socket.display())
}
