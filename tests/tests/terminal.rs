//! The agent's terminal (`run::terminal`), driven as a user's terminal would drive it: this
//! test owns a pseudo-terminal and starts `agentd run` as the foreground job of a session
//! on it, then types, resizes, presses Ctrl-Z, continues agentd as a shell's `fg` does, and
//! makes the breaker kill the agent, checking the user's terminal modes after each step.
//! Embedded and through the daemon.

use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    process::{Child, Command},
    time::Duration,
};

use agentd_tests::{
    DEFAULT_LIMITS, Daemon, agent_dir, agentd_bin, cgroups_named, profile_file,
    pty::{Pty, Screen, openpty, type_keys},
    require_root, test_profile, wait_until, wait_until_or,
};

/// The agent: a small full-screen program. It reports its terminal, enters raw mode, the
/// alternate screen and a hidden cursor, redraws on SIGWINCH, echoes keys, and on `x`
/// opens the workspace's canary.
const TUI: &str = r#"
import os, shutil, signal, sys, tty
fd = sys.stdin.fileno()
def draw(*_):
    c, r = shutil.get_terminal_size()
    os.write(1, f"\x1b[2J\x1b[HTUI {c}x{r}\r\n".encode())
signal.signal(signal.SIGWINCH, draw)
os.close(os.open("/dev/tty", os.O_RDWR))  # ENXIO without a controlling terminal
os.write(1, f"ready tty={os.ttyname(fd)} \r\n".encode())
tty.setraw(fd)
os.write(1, b"\x1b[?1049h\x1b[?25l")
draw()
while True:
    ch = os.read(fd, 1)
    os.write(1, f"key {ch.decode()}\r\n".encode())
    if ch == b"x":
        open("secret").read()
"#;

/// The user's shell, as far as job control goes: the session leader on the terminal; it
/// runs the command as a job of its own (a process group, made the foreground one), prints
/// `job=PID`, and exits with the job's status (128+N for signal N). Stops it ignores: the
/// test continues the job itself, as `fg` would.
const SHELL: &str = r#"
import os, signal, sys
signal.signal(signal.SIGTTOU, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)
    while os.tcgetpgrp(0) != os.getpgrp():
        pass
    os.execv(sys.argv[1], sys.argv[1:])
os.setpgid(pid, pid)
os.tcsetpgrp(0, pid)
os.write(1, f"job={pid}\r\n".encode())
_, status = os.waitpid(pid, 0)
sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
"#;

/// The terminal's modes, as `stty -a` compares them.
fn modes(fd: &OwnedFd) -> (u32, u32, u32, u32, Vec<u8>) {
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a writable termios.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    (t.c_iflag, t.c_oflag, t.c_cflag, t.c_lflag, t.c_cc.to_vec())
}

fn raw(fd: &OwnedFd) -> bool {
    modes(fd).3 & libc::ICANON == 0
}

/// /proc/PID/stat's state letter.
fn state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(") ")
        .and_then(|(_, r)| r.chars().next())
        .unwrap_or('?')
}

/// `agentd run ARGS -- python3 -c TUI` as the foreground job of [`SHELL`], the leader of
/// a new session on `pty`; or, without a shell, as that leader itself (as under `ssh -t`).
fn spawn_on(
    pty: &Pty,
    shell: bool,
    args: &[&str],
    ws: &std::path::Path,
    profile: &std::path::Path,
) -> Child {
    let mut cmd = if shell {
        let mut c = Command::new("/usr/bin/python3");
        c.args(["-c", SHELL]).arg(agentd_bin());
        c
    } else {
        Command::new(agentd_bin())
    };
    cmd.arg("run")
        .args(args)
        .arg("--profile")
        .arg(profile)
        .arg("--workspace")
        .arg(ws)
        .args(["--", "/usr/bin/python3", "-c", TUI]);
    agentd_tests::pty::spawn_on(pty, cmd)
}

/// What a test started on its terminal, ended even when the test fails (a failure while
/// the job is stopped would leave it, and its frozen agent, behind): the agent's cgroup,
/// then the job (continued first), then the shell, each by pid.
struct OnTerminal {
    child: Child,
    agent: &'static str,
}

impl std::ops::Deref for OnTerminal {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl std::ops::DerefMut for OnTerminal {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for OnTerminal {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        for dir in cgroups_named(self.agent) {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
        let shell = self.child.id();
        let jobs: Vec<i32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
                    st.rsplit_once(") ")
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                        .is_some_and(|ppid| ppid == shell.to_string())
                })
            })
            .collect();
        for job in jobs {
            // SAFETY: signals to the pid of a child of the shell this test started.
            unsafe {
                libc::kill(job, libc::SIGCONT);
                libc::kill(job, libc::SIGKILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its supervisor killed, nobody removes the agent's (now empty) cgroup but us.
        for dir in cgroups_named(self.agent) {
            for _ in 0..50 {
                if std::fs::remove_dir(&dir).is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// A workspace with a canary (`secret`) and a profile `name` for [`TUI`]: its terminal
/// (`/dev/tty`) granted, the breaker tripping on the canary.
fn tui_workspace(name: &str) -> (tempfile::TempDir, tempfile::TempDir, std::path::PathBuf) {
    let ws = agent_dir(true);
    std::fs::write(ws.path().join("secret"), "canary\n").unwrap();
    let (dir, profile) = profile_file(
        &test_profile(
            name,
            "invoker",
            DEFAULT_LIMITS,
            "[breaker]\ntrip_on = [\"canary\"]\n",
        )
        .replace(
            "write = [\"{workspace}\", \"/dev/null\"]",
            "write = [\"{workspace}\", \"/dev/null\", \"/dev/tty\"]",
        )
        .replace(
            "\"/dev/null\", \"/dev/urandom\"]",
            "\"/dev/null\", \"/dev/urandom\", \"/dev/tty\"]",
        )
        .replace(
            "[network]",
            "canaries = [\"{workspace}/secret\"]\n\n[network]",
        ),
    );
    (ws, dir, profile)
}

fn frozen(agent_prefix: &str) -> Option<bool> {
    let dir = cgroups_named(agent_prefix)
        .into_iter()
        .find(|d| d.join("cgroup.freeze").exists())?;
    let events = std::fs::read_to_string(dir.join("cgroup.events")).ok()?;
    Some(events.lines().any(|l| l == "frozen 1"))
}

#[test]
fn terminal_relay_job_control_and_restoration_in_both_modes() {
    if !require_root() {
        return;
    }
    let mut daemon = Daemon::start();
    for through_daemon in [false, true] {
        let mode = if through_daemon { "daemon" } else { "embedded" };
        let name = if through_daemon {
            "tty-daemon"
        } else {
            "tty-embedded"
        };
        let (ws, _p, profile) = tui_workspace(name);
        let pty = openpty(30, 100);
        let before = modes(&pty.slave);
        let screen = Screen::start(&pty.master);
        let socket = daemon.socket();
        let args: Vec<&str> = if through_daemon {
            vec!["--socket", socket.to_str().unwrap()]
        } else {
            Vec::new()
        };
        let mut child = OnTerminal {
            child: spawn_on(&pty, true, &args, ws.path(), &profile),
            agent: name,
        };
        let at = screen.wait_for("job=", 0);
        let pid: u32 = screen.text()[at..]
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{mode}: the job's pid: {}", screen.text()));

        // Its own terminal (not ours), and its controlling one (/dev/tty opens).
        let at = screen.wait_for("ready tty=", at);
        let line = screen.text()[at..].lines().next().unwrap_or("").to_owned();
        let ours = {
            let mut n: u32 = 0;
            // SAFETY: TIOCGPTN writes the pty's number to a valid u32.
            let rc = unsafe { libc::ioctl(pty.master.as_raw_fd(), libc::TIOCGPTN, &mut n) };
            assert_eq!(rc, 0);
            format!("/dev/pts/{n}")
        };
        let theirs = line.split_whitespace().next().unwrap_or("");
        assert!(
            theirs.starts_with("/dev/pts/") && theirs != ours,
            "{mode}: {line} (ours {ours})"
        );
        let at = screen.wait_for("TUI 100x30", at);
        assert!(
            raw(&pty.slave),
            "{mode}: the user's terminal is raw while the agent runs"
        );

        // Keys reach it; a resize reaches it.
        type_keys(&pty.master, b"a");
        let at = screen.wait_for("key a", at);
        let ws80 = libc::winsize {
            ws_row: 20,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a valid winsize; the kernel sends SIGWINCH to agentd.
        let rc = unsafe { libc::ioctl(pty.master.as_raw_fd(), libc::TIOCSWINSZ, &ws80) };
        assert_eq!(rc, 0);
        let at = screen.wait_for("TUI 80x20", at);

        // Ctrl-Z: agentd stops, the user's modes and screen are back, the agent is frozen.
        type_keys(&pty.master, &[0x1a]);
        wait_until(
            Duration::from_secs(60),
            &format!("{mode}: agentd stopped"),
            || state(pid) == 'T',
        );
        assert_eq!(
            modes(&pty.slave),
            before,
            "{mode}: modes restored while suspended"
        );
        // Written before agentd stopped itself; the screen's reader may not have them yet.
        wait_until_or(
            Duration::from_secs(10),
            || {
                let suspended = screen.text();
                suspended[at..].contains("\x1b[?25h") && suspended[at..].contains("\x1b[?1049l")
            },
            || format!("{mode}: screen modes undone: {:?}", &screen.text()[at..]),
        );
        wait_until(
            Duration::from_secs(60),
            &format!("{mode}: the agent frozen"),
            || frozen(name) == Some(true),
        );
        let at = screen.text().len();

        // `fg`: continued, raw again, the agent thawed and redrawn.
        // SAFETY: kill with our child's pid.
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        let at = screen.wait_for("TUI 80x20", at);
        assert!(raw(&pty.slave), "{mode}: raw again after fg");
        assert_eq!(frozen(name), Some(false), "{mode}: thawed");
        type_keys(&pty.master, b"b");
        let at = screen.wait_for("key b", at);

        // The breaker kills it in raw mode: the user's terminal is as before the run.
        type_keys(&pty.master, b"x");
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(137), "{mode}: {}", screen.text());
        assert_eq!(
            modes(&pty.slave),
            before,
            "{mode}: modes restored after the kill"
        );
        let end = screen.wait_for("breaker tripped", at);
        let text = screen.text();
        let undo = text[at..].rfind("\x1b[?1049l").map(|i| i + at);
        assert!(
            undo.is_some_and(|u| u < end),
            "{mode}: the screen is restored before agentd's message: {:?}",
            &text[at..]
        );
        assert!(cgroups_named(name).is_empty(), "{mode}: no cgroup left");
    }
    daemon.stop();
}

/// Without a shell that could continue it (agentd leads the terminal's session, as under
/// `ssh -t` or `setsid`), Ctrl-Z is no suspend: it reaches the agent as a key.
#[test]
fn terminal_ctrl_z_without_job_control_reaches_the_agent() {
    if !require_root() {
        return;
    }
    let (ws, _p, profile) = tui_workspace("tty-nojobs");
    let pty = openpty(30, 100);
    let screen = Screen::start(&pty.master);
    let mut child = OnTerminal {
        child: spawn_on(&pty, false, &[], ws.path(), &profile),
        agent: "tty-nojobs",
    };
    let at = screen.wait_for("TUI 100x30", 0);
    type_keys(&pty.master, &[0x1a]);
    let at = screen.wait_for("key \u{1a}", at);
    assert_ne!(state(child.id()), 'T', "agentd did not stop");
    type_keys(&pty.master, b"x");
    screen.wait_for("breaker tripped", at);
    assert_eq!(child.wait().unwrap().code(), Some(137));
}
