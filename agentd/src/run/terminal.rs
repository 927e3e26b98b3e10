//! A terminal of the agent's own.
//!
//! When `agentd run`'s stdin is a terminal and agentd is its foreground job, the agent gets
//! a pseudo-terminal: the slave side is its stdin, stdout, stderr and controlling terminal
//! (step 4 of the launch sequence), and agentd keeps the master side. A relay thread copies
//! bytes between the user's terminal, which is in raw mode for the duration, and the
//! master; the user's modes come back on every way out (exit, signal, breaker kill,
//! agentd's own error). The agent never holds the user's terminal: it cannot push input
//! into it (TIOCSTI) nor leave it raw.
//!
//! Job control: Ctrl-Z stops the agent and gives the user their shell, as with any program.
//! The relay keeps that byte from the agent: the agent's processes lead a session of their
//! own whose parent is in another, so their process groups are orphaned and the kernel
//! discards the SIGTSTP a terminal (or a TUI suspending itself) would send them. Instead
//! the agent's cgroup is frozen (by agentd, or by the daemon at its client's request), the
//! user's terminal is put back as it was (modes, and the screen modes the agent's output
//! changed: alternate screen, hidden cursor, mouse reporting), and agentd stops itself.
//! `fg` continues agentd, which takes raw mode and the agent's screen modes again, thaws
//! the agent and has it redraw. A literal Ctrl-Z never reaches the agent.
//!
//! agentd's own messages must not draw into the agent's screen: [`Held`] keeps what is
//! written to a descriptor (agentd's stderr) until the terminal is restored.

use std::{
    io::{self, IsTerminal as _, Read as _, Write as _},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::{
    pty::{Winsize, openpty},
    sys::termios::{SetArg, Termios, cfmakeraw, tcgetattr, tcsetattr},
    unistd::{getpgrp, tcgetpgrp},
};

/// Between the two window sizes that make the agent redraw after `fg`.
const REDRAW_GAP: Duration = Duration::from_millis(50);
/// Ctrl-Z as terminals send it: the suspend character; under the kitty keyboard protocol
/// (which the agent may have pushed: `CSI 122 ; 5 u`, and with event types `:1`); under
/// xterm's modifyOtherKeys (`CSI 27 ; 5 ; 122 ~`).
const CTRL_Z: [&[u8]; 4] = [b"\x1a", b"\x1b[122;5u", b"\x1b[122;5:1u", b"\x1b[27;5;122~"];

/// The first Ctrl-Z in `input`: where it starts and how long it is.
fn find_ctrl_z(input: &[u8]) -> Option<(usize, usize)> {
    CTRL_Z
        .iter()
        .filter_map(|key| {
            input
                .windows(key.len())
                .position(|w| w == *key)
                .map(|at| (at, key.len()))
        })
        .min()
}

/// The user's terminal (agentd's stdin) and the pseudo-terminal made for the agent.
pub struct Terminal {
    master: OwnedFd,
    /// The user's modes before the run.
    saved: Termios,
}

/// Opens a pseudo-terminal for the agent when stdin and stdout are terminals and agentd is
/// the foreground job; `None` otherwise (stdio passes through, and the agent has no
/// terminal: `agentd run -- cmd > file` keeps its output plain). The pseudo-terminal
/// starts with the user's modes and window size. Returns the slave side, for the launch.
pub fn open() -> io::Result<Option<(Terminal, OwnedFd)>> {
    let stdin = io::stdin();
    if !stdin.is_terminal() || !io::stdout().is_terminal() {
        return Ok(None);
    }
    // In the background (`agentd run ... &`) reading the terminal would stop agentd.
    if tcgetpgrp(stdin.as_fd()).ok() != Some(getpgrp()) {
        return Ok(None);
    }
    let saved = tcgetattr(stdin.as_fd())?;
    let size = window_size(stdin.as_raw_fd());
    let pty = openpty(size.as_ref(), Some(&saved))?;
    for fd in [&pty.master, &pty.slave] {
        set_flags(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC)?;
    }
    set_flags(pty.master.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK)?;
    Ok(Some((
        Terminal {
            master: pty.master,
            saved,
        },
        pty.slave,
    )))
}

fn set_flags(fd: RawFd, cmd: i32, flag: i32) -> io::Result<()> {
    let get = if cmd == libc::F_SETFD {
        libc::F_GETFD
    } else {
        libc::F_GETFL
    };
    // SAFETY: F_GETFD/F_GETFL and F_SETFD/F_SETFL take and return plain ints.
    let rc = unsafe {
        let old = libc::fcntl(fd, get);
        if old < 0 {
            old
        } else {
            libc::fcntl(fd, cmd, old | flag)
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn window_size(fd: RawFd) -> Option<Winsize> {
    let mut ws = Winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` to the pointer, which is valid.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some(ws)
}

/// What to do when the user suspends the agent and resumes it (the embedded supervisor
/// freezes the agent's cgroup while agentd itself is stopped): called with `true` before
/// agentd stops, `false` after it continued, before the agent's job does.
pub type OnStop = Box<dyn Fn(bool) + Send + Sync>;

struct Shared {
    master: OwnedFd,
    /// The user's modes before the run (nix's `Termios` is not `Sync`).
    saved: libc::termios,
    /// Written once to end the relay.
    wake: OwnedFd,
    on_stop: OnStop,
    restored: AtomicBool,
    /// The screen modes the agent's output set on the user's terminal.
    modes: Mutex<ScreenModes>,
}

/// A running relay; the user's modes come back when it finishes or is dropped.
pub struct Session {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Terminal {
    /// Puts the user's terminal in raw mode and starts the relay.
    pub fn start(self, on_stop: OnStop) -> io::Result<Session> {
        // SAFETY: eventfd takes two ints and returns a new fd or -1.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: eventfd returned a new fd that nothing else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };
        let shared = Arc::new(Shared {
            master: self.master,
            saved: self.saved.into(),
            wake,
            on_stop,
            restored: AtomicBool::new(true),
            modes: Mutex::new(ScreenModes::default()),
        });
        count_continues()?;
        shared.make_raw()?;
        let relay = Arc::clone(&shared);
        let thread = match std::thread::Builder::new()
            .name("agentd-terminal".into())
            .spawn(move || relay.relay())
        {
            Ok(t) => t,
            Err(e) => {
                shared.restore();
                return Err(e);
            }
        };
        Ok(Session {
            shared,
            thread: Some(thread),
        })
    }
}

impl Session {
    /// The user's window changed size (SIGWINCH): the agent's terminal takes it, and the
    /// kernel tells the agent's foreground job.
    pub fn resize(&self) {
        self.shared.resize();
    }

    /// Copies what the agent wrote and the relay has not yet, stops the relay, restores
    /// the user's modes.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to the eventfd.
        unsafe {
            libc::write(
                self.shared.wake.as_raw_fd(),
                (&raw const one).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.shared.restore();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop();
    }
}

fn stdin() -> BorrowedFd<'static> {
    // SAFETY: fd 0 stays open for the life of the process (`sanitize_stdio`).
    unsafe { BorrowedFd::borrow_raw(0) }
}

impl Shared {
    fn make_raw(&self) -> io::Result<()> {
        let mut raw = Termios::from(self.saved);
        cfmakeraw(&mut raw);
        tcsetattr(stdin(), SetArg::TCSADRAIN, &raw)?;
        self.restored.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// The user's terminal as before the run: the screen modes the agent set undone, the
    /// saved modes back.
    fn restore(&self) {
        if !self.restored.swap(true, Ordering::SeqCst) {
            let undo = self
                .modes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .undo();
            let mut out = io::stdout().lock();
            let _ = out.write_all(&undo).and_then(|()| out.flush());
            let _ = tcsetattr(stdin(), SetArg::TCSADRAIN, &Termios::from(self.saved));
        }
    }

    fn resize(&self) {
        if let Some(ws) = window_size(0) {
            // SAFETY: TIOCSWINSZ reads one `struct winsize` from the pointer.
            unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &raw const ws) };
        }
    }

    /// Ctrl-Z: the agent is frozen and agentd stops, the user has their shell; on `fg`,
    /// agentd takes the terminal back, thaws the agent and has it redraw.
    fn suspend(&self) {
        (self.on_stop)(true);
        self.restore();
        stop_until_continued();
        // In the background (`bg`) tcsetattr stops agentd again (SIGTTOU) until `fg`.
        if let Err(e) = self.make_raw() {
            eprintln!("agentd: terminal: {e}");
        }
        let redo = self
            .modes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .redo();
        let mut out = io::stdout().lock();
        let _ = out.write_all(&redo).and_then(|()| out.flush());
        (self.on_stop)(false);
        self.redraw();
    }

    /// Has the agent's foreground job redraw: the kernel sends SIGWINCH when the window
    /// size changes (TIOCSIG only sends SIGINT, SIGQUIT and SIGTSTP), so it changes twice.
    fn redraw(&self) {
        if let Some(mut ws) = window_size(0) {
            let set = |ws: &Winsize| {
                // SAFETY: TIOCSWINSZ reads one `struct winsize` from the pointer.
                unsafe {
                    libc::ioctl(
                        self.master.as_raw_fd(),
                        libc::TIOCSWINSZ,
                        ws as *const Winsize,
                    )
                };
            };
            let rows = ws.ws_row;
            ws.ws_row = rows.saturating_sub(1).max(1);
            set(&ws);
            // Time to see the first size: a program that handles both signals at once sees
            // no change, and draws nothing.
            std::thread::sleep(REDRAW_GAP);
            ws.ws_row = rows;
            set(&ws);
        }
    }

    fn relay(&self) {
        let master = self.master.as_raw_fd();
        let mut out = Output {
            shared: self,
            parser: vte::Parser::new(),
        };
        let mut pending: Vec<u8> = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let mut stdin_open = true;
        let mut master_open = true;
        loop {
            let mut fds = [
                pollfd(
                    0,
                    if stdin_open && pending.is_empty() {
                        libc::POLLIN
                    } else {
                        0
                    },
                ),
                pollfd(
                    master,
                    match (master_open, pending.is_empty()) {
                        (false, _) => 0,
                        (true, true) => libc::POLLIN,
                        (true, false) => libc::POLLIN | libc::POLLOUT,
                    },
                ),
                pollfd(self.wake.as_raw_fd(), libc::POLLIN),
            ];
            // SAFETY: `fds` is a valid array of three pollfd.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if fds[1].revents != 0 && master_open {
                if fds[1].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    master_open = copy_out(master, &mut buf, &mut out);
                }
                if fds[1].revents & libc::POLLOUT != 0 && !pending.is_empty() {
                    match write_fd(master, &pending) {
                        Ok(n) => {
                            pending.drain(..n);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => pending.clear(),
                    }
                }
            }
            if fds[2].revents != 0 {
                // The run is over: what the agent wrote last still reaches the user.
                while master_open && !read_would_block(master) {
                    master_open = copy_out(master, &mut buf, &mut out);
                }
                return;
            }
            if fds[0].revents != 0 {
                match io::stdin().lock().read(&mut buf) {
                    Ok(0) | Err(_) => stdin_open = false,
                    Ok(n) => {
                        let mut input = &buf[..n];
                        while job_control()
                            && let Some((at, len)) = find_ctrl_z(input)
                        {
                            // What came before reaches the agent first.
                            pending.extend_from_slice(&input[..at]);
                            flush_blocking(master, &mut pending);
                            self.suspend();
                            input = &input[at + len..];
                        }
                        pending.extend_from_slice(input);
                    }
                }
            }
        }
    }
}

/// The agent's output on its way to the user's terminal, its screen modes noted.
struct Output<'a> {
    shared: &'a Shared,
    parser: vte::Parser,
}

impl io::Write for Output<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        {
            let mut modes = self
                .shared
                .modes
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.parser.advance(&mut *modes, data);
        }
        let mut out = io::stdout().lock();
        out.write_all(data)?;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().lock().flush()
    }
}

/// Writes `pending` to the (non-blocking) master, waiting while it is full (at most a
/// second: an agent that reads nothing does not hold the user's Ctrl-Z).
fn flush_blocking(master: RawFd, pending: &mut Vec<u8>) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while !pending.is_empty() && Instant::now() < deadline {
        match write_fd(master, pending) {
            Ok(n) => {
                pending.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => pending.clear(),
        }
    }
}

/// What an agent's output sets on the user's terminal that would outlive it: DEC private
/// modes (`CSI ? N h` / `l`: the alternate screen, a hidden cursor, mouse and focus
/// reporting, bracketed paste, synchronized output, application cursor keys), the kitty
/// keyboard protocol's stack of flags (`CSI > F u` pushes, `CSI < N u` pops) and xterm's
/// modifyOtherKeys (`CSI > 4 ; N m`). Each is noted as the agent left it, to be undone
/// when the agent is suspended or ends, and redone when it resumes.
#[derive(Debug, Default)]
struct ScreenModes {
    /// (mode, set) in the order first seen.
    modes: Vec<(u16, bool)>,
    /// The kitty keyboard flags the agent pushed and has not popped.
    kitty: Vec<u16>,
    /// modifyOtherKeys as the agent set it (`None`: never, or reset).
    modify_other_keys: Option<u16>,
}

/// Modes whose default is set (`h`): the cursor is visible.
const SET_BY_DEFAULT: [u16; 1] = [25];
/// Modes that change what the user's terminal does after the agent.
const TRACKED: [u16; 15] = [
    1, 25, 47, 1000, 1002, 1003, 1004, 1005, 1006, 1007, 1015, 1047, 1049, 2004, 2026,
];

impl ScreenModes {
    fn note(&mut self, mode: u16, set: bool) {
        if !TRACKED.contains(&mode) {
            return;
        }
        match self.modes.iter_mut().find(|(m, _)| *m == mode) {
            Some(entry) => entry.1 = set,
            None => self.modes.push((mode, set)),
        }
    }

    /// The sequences that put everything back to the terminal's defaults (in reverse
    /// order: the alternate screen is left after what was set inside it).
    fn undo(&self) -> Vec<u8> {
        let mut out = String::new();
        if !self.kitty.is_empty() {
            out.push_str(&format!("\x1b[<{}u", self.kitty.len()));
        }
        if self.modify_other_keys.is_some() {
            out.push_str("\x1b[>4m");
        }
        for &(mode, set) in self.modes.iter().rev() {
            let default = SET_BY_DEFAULT.contains(&mode);
            if set != default {
                out.push_str(&format!("\x1b[?{mode}{}", if default { 'h' } else { 'l' }));
            }
        }
        out.into_bytes()
    }

    /// The sequences that put the agent's settings back.
    fn redo(&self) -> Vec<u8> {
        let mut out = String::new();
        for &(mode, set) in &self.modes {
            if set != SET_BY_DEFAULT.contains(&mode) {
                out.push_str(&format!("\x1b[?{mode}{}", if set { 'h' } else { 'l' }));
            }
        }
        if let Some(n) = self.modify_other_keys {
            out.push_str(&format!("\x1b[>4;{n}m"));
        }
        for flags in &self.kitty {
            out.push_str(&format!("\x1b[>{flags}u"));
        }
        out.into_bytes()
    }
}

impl vte::Perform for ScreenModes {
    fn csi_dispatch(
        &mut self,
        params: &vte::Params,
        intermediates: &[u8],
        ignore: bool,
        action: char,
    ) {
        if ignore {
            return;
        }
        let mut values = params.iter().map(|p| p.first().copied().unwrap_or(0));
        match (intermediates, action) {
            (b"?", 'h' | 'l') => {
                for param in params.iter() {
                    for &mode in param {
                        self.note(mode, action == 'h');
                    }
                }
            }
            (b">", 'u') => self.kitty.push(values.next().unwrap_or(0)),
            (b"<", 'u') => {
                let n = usize::from(values.next().unwrap_or(1).max(1));
                let keep = self.kitty.len().saturating_sub(n);
                self.kitty.truncate(keep);
            }
            (b">", 'm') if values.next() == Some(4) => {
                self.modify_other_keys = values.next().filter(|&n| n != 0);
            }
            _ => {}
        }
    }
}

/// Whether a shell with job control could continue agentd once it stops: its parent is in
/// its session and another process group (a shell's job). Under `ssh -t`, `setsid` or
/// `systemd-run --pty` nothing would, and Ctrl-Z goes to the agent as any other byte.
fn job_control() -> bool {
    let parent = nix::unistd::getppid();
    let same_session = nix::unistd::getsid(Some(parent)).ok() == nix::unistd::getsid(None).ok();
    same_session && nix::unistd::getpgid(Some(parent)).ok() != Some(getpgrp())
}

/// SIGCONTs received since the relay started (see [`stop_until_continued`]).
static CONTINUED: AtomicU64 = AtomicU64::new(0);

extern "C" fn count_continue(_: libc::c_int) {
    CONTINUED.fetch_add(1, Ordering::SeqCst);
}

/// Stops agentd (SIGSTOP: the shell sees its job stopped) and returns once it has been
/// continued. The stop of a process with several threads is not immediate for the thread
/// that asks for it: without waiting for the SIGCONT it could go on, and take raw mode back
/// before the shell restores its own.
fn stop_until_continued() {
    let before = CONTINUED.load(Ordering::SeqCst);
    // SAFETY: kill with our own pid and SIGSTOP; no pointers.
    unsafe { libc::kill(libc::getpid(), libc::SIGSTOP) };
    while CONTINUED.load(Ordering::SeqCst) == before {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Counts SIGCONTs (the default action, continuing, still happens).
fn count_continues() -> io::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(count_continue),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only increments an atomic, which is async-signal-safe.
    unsafe { sigaction(Signal::SIGCONT, &action) }?;
    Ok(())
}

/// A pollfd; one that asks for nothing is left out (a negative fd), or a hung-up terminal
/// would report POLLHUP on every turn.
fn pollfd(fd: RawFd, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd: if events == 0 { -1 } else { fd },
        events,
        revents: 0,
    }
}

/// One read from the master to the user's stdout; false when the agent's side is closed.
fn copy_out(master: RawFd, buf: &mut [u8], out: &mut impl io::Write) -> bool {
    // SAFETY: reads at most buf.len() bytes into `buf`.
    let n = unsafe { libc::read(master, buf.as_mut_ptr().cast(), buf.len()) };
    match usize::try_from(n) {
        Ok(0) => false,
        Ok(n) => {
            let _ = out.write_all(&buf[..n]).and_then(|()| out.flush());
            true
        }
        // EAGAIN: nothing now; EIO: every slave descriptor is closed.
        Err(_) => io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock,
    }
}

fn read_would_block(fd: RawFd) -> bool {
    let mut p = [pollfd(fd, libc::POLLIN)];
    // SAFETY: one valid pollfd, no wait.
    unsafe { libc::poll(p.as_mut_ptr(), 1, 0) == 0 }
}

fn write_fd(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: writes at most data.len() bytes from `data`.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// What is written to a descriptor, held in memory until it is printed (up to
/// [`HELD_MAX`] bytes; beyond that, counted).
pub struct Held {
    text: Arc<Mutex<(Vec<u8>, usize)>>,
    thread: Option<JoinHandle<()>>,
    /// agentd's own stderr while it is held (see [`Held::stderr`]).
    saved_stderr: Option<OwnedFd>,
}

pub const HELD_MAX: usize = 256 * 1024;

impl Held {
    /// Holds everything read from `read` (the read end of a pipe) until its writers close.
    pub fn reading(read: OwnedFd) -> io::Result<Held> {
        let text = Arc::new(Mutex::new((Vec::new(), 0usize)));
        let into = Arc::clone(&text);
        let thread = std::thread::Builder::new()
            .name("agentd-held".into())
            .spawn(move || {
                let mut r = std::fs::File::from(read);
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    let mut t = into.lock().unwrap_or_else(PoisonError::into_inner);
                    let room = HELD_MAX.saturating_sub(t.0.len()).min(n);
                    t.0.extend_from_slice(&buf[..room]);
                    t.1 += n - room;
                }
            })?;
        Ok(Held {
            text,
            thread: Some(thread),
            saved_stderr: None,
        })
    }

    /// Holds what agentd itself writes to its stderr from now on.
    pub fn stderr() -> io::Result<Held> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let saved = io::stderr().as_fd().try_clone_to_owned()?;
        set_flags(saved.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC)?;
        // The reader first: fd 2 never becomes a pipe nobody reads.
        let mut held = Held::reading(read)?;
        // SAFETY: dup2 onto fd 2; `write` stays owned and is closed below, leaving fd 2
        // the pipe's only write end.
        if unsafe { libc::dup2(write.as_raw_fd(), 2) } < 0 {
            return Err(io::Error::last_os_error());
        }
        drop(write);
        held.saved_stderr = Some(saved);
        Ok(held)
    }

    /// Waits (at most `wait`) for the writers to close, then returns what was held and
    /// how many bytes beyond [`HELD_MAX`] were dropped. Gives agentd its stderr back first
    /// when it was held.
    fn take(&mut self, wait: Duration) -> (Vec<u8>, usize) {
        if let Some(saved) = self.saved_stderr.take() {
            // SAFETY: dup2 of a descriptor we own onto fd 2; this closes the pipe's
            // write end, so the reader sees end of file.
            unsafe { libc::dup2(saved.as_raw_fd(), 2) };
        }
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + wait;
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        let mut t = self.text.lock().unwrap_or_else(PoisonError::into_inner);
        (std::mem::take(&mut t.0), std::mem::take(&mut t.1))
    }

    /// [`Held::take`], written to stderr.
    pub fn print(mut self, wait: Duration) {
        self.emit(wait);
    }

    fn emit(&mut self, wait: Duration) {
        let (text, dropped) = self.take(wait);
        let mut err = io::stderr().lock();
        let _ = err.write_all(&text);
        if dropped > 0 {
            let _ = writeln!(
                err,
                "agentd: ({dropped} more bytes of messages were dropped)"
            );
        }
    }
}

impl Drop for Held {
    /// Whatever way agentd leaves, what it held is printed.
    fn drop(&mut self) {
        self.emit(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn screen_modes_the_agent_left_are_undone_and_redone() {
        let mut modes = ScreenModes::default();
        let mut parser = vte::Parser::new();
        // Alternate screen, hidden cursor, mouse on, split across two reads; a mode the
        // agent set and reset again is left alone, as is one agentd does not track.
        parser.advance(&mut modes, b"\x1b[?1049h\x1b[?25l\x1b[?10");
        parser.advance(&mut modes, b"00;1006h\x1b[?2004h\x1b[?2004l\x1b[?7lhello");
        assert_eq!(
            String::from_utf8(modes.undo()).unwrap(),
            "\x1b[?1006l\x1b[?1000l\x1b[?25h\x1b[?1049l"
        );
        assert_eq!(
            String::from_utf8(modes.redo()).unwrap(),
            "\x1b[?1049h\x1b[?25l\x1b[?1000h\x1b[?1006h"
        );
        // A TUI that cleaned up after itself leaves nothing to undo.
        parser.advance(&mut modes, b"\x1b[?1000l\x1b[?1006l\x1b[?25h\x1b[?1049l");
        assert!(modes.undo().is_empty());
    }

    #[test]
    fn kitty_keyboard_and_modify_other_keys_are_undone() {
        let mut modes = ScreenModes::default();
        let mut parser = vte::Parser::new();
        // Codex's TUI: kitty flags pushed twice and popped once, modifyOtherKeys, sync.
        parser.advance(&mut modes, b"\x1b[>7u\x1b[>1u\x1b[<u\x1b[>4;2m\x1b[?2026h");
        assert_eq!(
            String::from_utf8(modes.undo()).unwrap(),
            "\x1b[<1u\x1b[>4m\x1b[?2026l"
        );
        assert_eq!(
            String::from_utf8(modes.redo()).unwrap(),
            "\x1b[?2026h\x1b[>4;2m\x1b[>7u"
        );
        parser.advance(&mut modes, b"\x1b[<u\x1b[>4;0m\x1b[?2026l");
        assert!(modes.undo().is_empty());
    }

    #[test]
    fn ctrl_z_in_every_encoding_a_terminal_sends() {
        assert_eq!(find_ctrl_z(b"ab\x1acd"), Some((2, 1)));
        assert_eq!(find_ctrl_z(b"a\x1b[122;5ub"), Some((1, 8)));
        assert_eq!(find_ctrl_z(b"\x1b[122;5:1u"), Some((0, 10)));
        assert_eq!(find_ctrl_z(b"x\x1b[27;5;122~"), Some((1, 11)));
        // The first of several; a plain `z` or Ctrl-Y is none.
        assert_eq!(find_ctrl_z(b"\x1b[122;5u\x1a"), Some((0, 8)));
        assert_eq!(find_ctrl_z(b"z\x1b[122u\x1b[121;5u\x19"), None);
    }

    #[test]
    fn held_text_is_kept_until_release_and_bounded() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut held = Held::reading(r).unwrap();
        let mut w = std::fs::File::from(w);
        w.write_all(b"agentd: refused\n").unwrap();
        w.write_all(&vec![b'x'; HELD_MAX]).unwrap();
        drop(w);
        let (text, dropped) = held.take(Duration::from_secs(5));
        assert!(text.starts_with(b"agentd: refused\n"));
        assert_eq!(text.len(), HELD_MAX);
        assert_eq!(dropped, "agentd: refused\n".len());
    }
}
