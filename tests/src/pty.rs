//! A pseudo-terminal for the tests that drive `agentd run` as a person at a terminal
//! (`terminal.rs`, `ask_flows.rs`): the test owns the master, reads what is drawn on it and
//! types at it.

use std::{
    io::Read as _,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// A pseudo-terminal a test owns: it types at the master; the slave is what `agentd run`
/// gets as its terminal.
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

/// A new pseudo-terminal of `rows` x `cols`.
pub fn openpty(rows: u16, cols: u16) -> Pty {
    let (mut m, mut s) = (0, 0);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two fds; name and termios may be NULL; `ws` is valid.
    let rc = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty returned two new fds that nothing else owns.
    unsafe {
        Pty {
            master: OwnedFd::from_raw_fd(m),
            slave: OwnedFd::from_raw_fd(s),
        }
    }
}

/// What agentd wrote to the terminal so far (a thread reads the master).
#[derive(Clone)]
pub struct Screen(Arc<Mutex<Vec<u8>>>);

impl Screen {
    pub fn start(master: &OwnedFd) -> Screen {
        let text = Arc::new(Mutex::new(Vec::new()));
        let into = text.clone();
        let mut f = std::fs::File::from(master.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    return;
                }
                into.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Screen(text)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    pub fn wait_for(&self, what: &str, from: usize) -> usize {
        let started = Instant::now();
        loop {
            let text = self.text();
            if let Some(at) = text.get(from.min(text.len())..).and_then(|t| t.find(what)) {
                return from + at + what.len();
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "timed out waiting for {what:?} on the screen:\n{text:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Types `keys` at the master, as a person would.
pub fn type_keys(master: &OwnedFd, keys: &[u8]) {
    // SAFETY: writes `keys` to the master.
    let n = unsafe { libc::write(master.as_raw_fd(), keys.as_ptr().cast(), keys.len()) };
    assert_eq!(n, keys.len() as isize);
}

/// Starts `cmd` (an `agentd run`, as the nobody user sudo names) as the leader of a new
/// session whose controlling terminal is `pty`'s slave.
pub fn spawn_on(pty: &Pty, mut cmd: std::process::Command) -> std::process::Child {
    use std::{os::unix::process::CommandExt as _, process::Stdio};
    let slave = pty.slave.as_raw_fd();
    cmd.env("SUDO_UID", crate::NOBODY)
        .env("SUDO_GID", crate::NOBODY)
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::from(pty.slave.try_clone().unwrap()));
    // SAFETY: setsid and ioctl are async-signal-safe; run in the child before exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::ioctl(slave, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}
