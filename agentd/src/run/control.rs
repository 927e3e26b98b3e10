//! The manual kill switch without a daemon: each supervising `agentd run` registers its
//! pid under [`AGENTS_DIR`]; `agentd kill ID` asks that supervisor (SIGUSR1) to stop its
//! agent through the breaker's path (`cgroup.kill`, then the kill flag), and empties the
//! agent's cgroup itself if the supervisor does not answer in time.

use std::{
    fs,
    io::Write as _,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Where supervisors register: `<agent id>.pid`, root-only.
pub const AGENTS_DIR: &str = "/run/agentd/agents";
/// How long `agentd kill` waits for the supervisor before killing the cgroup itself.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// A supervisor's registration; removed when dropped.
#[derive(Debug)]
pub struct Registration(PathBuf);

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Registers this process as the supervisor of `agent_id`. A failure only costs the
/// `agentd kill` path (Ctrl-C twice still works): it is reported, not fatal.
pub fn register(agent_id: &str) -> Option<Registration> {
    let write = || -> std::io::Result<Registration> {
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(AGENTS_DIR)?;
        sweep(Path::new(AGENTS_DIR));
        let path = Path::new(AGENTS_DIR).join(format!("{agent_id}.pid"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        writeln!(f, "{}", std::process::id())?;
        Ok(Registration(path))
    };
    match write() {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!(
                "agentd: warning: `agentd kill {agent_id}` will not reach this supervisor: {e}"
            );
            None
        }
    }
}

/// Removes the registrations of supervisors that are gone: one killed (SIGKILL, a crash)
/// never removes its own. A registration counts as gone only when the pid it names is no
/// live process called agentd now (a supervisor of an older binary, after an upgrade, is
/// still one); one still being written (no pid yet) is left alone.
fn sweep(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for path in entries.flatten().map(|e| e.path()) {
        if path.extension().is_none_or(|x| x != "pid") {
            continue;
        }
        let Some(pid) = fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
        else {
            continue;
        };
        if !live_agentd(pid) {
            let _ = fs::remove_file(&path);
        }
    }
}

/// Whether `pid` is a live process (not a zombie) whose name is `agentd`.
fn live_agentd(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let comm = stat.get(open + 1..close).unwrap_or("");
    let state = stat
        .get(close + 1..)
        .and_then(|r| r.split_whitespace().next());
    comm == "agentd" && state.is_some_and(|st| st != "Z" && st != "X")
}

/// An agent id as agentd makes them: `[A-Za-z0-9_-]+`. Anything else could name a path
/// outside the registry.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("pidfd out of range"))?;
    // SAFETY: the descriptor was just returned to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `agentd kill ID`.
pub fn kill(id: &str) -> anyhow::Result<ExitCode> {
    if !valid_id(id) {
        bail!("`{id}` is not an agent id (see the `agent` field of its events)");
    }
    let mounts = crate::host::mounts().context("cannot read the mount table")?;
    let cgroup2 = crate::host::cgroup2_mount(&mounts).context("cgroup v2 is not mounted")?;
    let cgroup = cgroup2.join("agentd").join(id);
    if !cgroup.is_dir() {
        eprintln!("agentd: no running agent `{id}` (no {})", cgroup.display());
        return Ok(ExitCode::from(1));
    }
    let started = Instant::now();
    let asked = ask_supervisor(id);
    if let Err(e) = &asked {
        eprintln!(
            "agentd: the supervisor of `{id}` cannot be asked ({e:#}); killing its cgroup directly"
        );
    }
    if asked.is_ok() {
        while cgroup.is_dir() && started.elapsed() < ANSWER_TIMEOUT {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    if cgroup.is_dir() {
        // Fail closed: the supervisor is gone or stuck; the agent still dies.
        fs::write(cgroup.join("cgroup.kill"), "1")
            .with_context(|| format!("cannot write {}/cgroup.kill", cgroup.display()))?;
        println!(
            "agentd: killed every process of `{id}` (cgroup.kill); its supervisor did not answer"
        );
    } else {
        println!(
            "agentd: killed `{id}` in {:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Sends SIGUSR1 to the registered supervisor, after checking through a pidfd that the
/// pid is still an agentd (a stale registration must never signal an unrelated process).
fn ask_supervisor(id: &str) -> anyhow::Result<()> {
    let path = Path::new(AGENTS_DIR).join(format!("{id}.pid"));
    let pid: i32 = fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{} holds no pid", path.display()))?;
    let pidfd = pidfd_open(pid).with_context(|| format!("supervisor pid {pid}"))?;
    let theirs = fs::read_link(format!("/proc/{pid}/exe")).with_context(|| format!("pid {pid}"))?;
    let ours = fs::read_link("/proc/self/exe").context("/proc/self/exe")?;
    if theirs != ours {
        bail!(
            "pid {pid} is {}, not agentd: stale registration",
            theirs.display()
        );
    }
    // SAFETY: pidfd_send_signal with a NULL siginfo and no flags reads no memory; the pidfd
    // pins the process we checked.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGUSR1,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("pidfd_send_signal");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_removes_only_registrations_of_supervisors_that_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        // A live process called agentd: a copy of `sleep` under that name.
        let agentd = dir.path().join("agentd");
        fs::copy("/bin/sleep", &agentd).unwrap();
        let mut live = std::process::Command::new(&agentd)
            .arg("30")
            .spawn()
            .unwrap();
        let mine = dir.path().join("live-1.pid");
        fs::write(&mine, format!("{}\n", live.id())).unwrap();
        // pid 1 is no agentd.
        let gone = dir.path().join("gone-1.pid");
        fs::write(&gone, "1\n").unwrap();
        let unwritten = dir.path().join("new-1.pid");
        fs::write(&unwritten, "").unwrap();
        let other = dir.path().join("notes.txt");
        fs::write(&other, "1\n").unwrap();
        sweep(dir.path());
        assert!(
            mine.exists(),
            "a live supervisor's registration was removed"
        );
        assert!(!gone.exists(), "a dead supervisor's registration stayed");
        assert!(unwritten.exists() && other.exists());
        live.kill().unwrap();
        live.wait().unwrap();
        sweep(dir.path());
        assert!(!mine.exists(), "a dead supervisor's registration stayed");
    }

    #[test]
    fn ids_cannot_name_paths() {
        assert!(valid_id("analyze-only-1a2b3c4d"));
        for bad in ["", "../x", "a/b", "a b", ".", "x\0"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
