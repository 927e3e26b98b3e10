//! `cargo xtask demo`: the incident, replayed under agentd. An agent asked only to analyze
//! a forum question tries to post an answer; under `analyze-only` the kernel refuses the
//! write and the network, and the breaker kills the agent at its first attempt to reach
//! the network. A local "forum" on loopback counts what reached it.

use std::{
    io::Read as _,
    net::TcpListener,
    path::Path,
    process::Command,
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
    Ok(())
}
