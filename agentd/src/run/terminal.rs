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
//!
//! Prompts ([`Prompter`]): a call held for a person's decision can be asked about on this
//! terminal. While a prompt is up the relay holds the agent's output back (up to
//! [`HOLD_MAX`]; beyond it the relay stops reading the master and the agent blocks in
//! `write`, nothing is lost) and every keystroke goes to the prompt, none to the agent.
//! The prompt is not drawn into the agent's screen: the agent's screen modes are undone
//! first, as for Ctrl-Z (so the prompt appears on the user's normal screen, under their
//! shell's last lines, with the cursor shown and keys sent plainly), and redone after the
//! last answer, when the held output follows and the agent is made to redraw. Prompts
//! queue and are shown one at a time, in order; the output stays held until the queue is
//! empty. Ctrl-Z is ignored while a prompt is up (the person answers first), and so is
//! whatever is typed in the first [`PROMPT_GUARD`] after a prompt appears, and any read
//! that is not exactly one key (typing ahead, a paste): a key meant for the agent does not
//! answer a question the person has not read.

use std::{
    collections::VecDeque,
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
use tokio::sync::oneshot;

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
    /// Requests for prompts, from [`Prompter`]s.
    prompts: Arc<Prompts>,
}

/// A running relay; the user's modes come back when it finishes or is dropped.
pub struct Session {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Terminal {
    /// Puts the user's terminal in raw mode and starts the relay.
    pub fn start(self, on_stop: OnStop) -> io::Result<Session> {
        let shared = Arc::new(Shared {
            master: self.master,
            saved: self.saved.into(),
            wake: eventfd()?,
            on_stop,
            restored: AtomicBool::new(true),
            modes: Mutex::new(ScreenModes::default()),
            prompts: Arc::new(Prompts::new()?),
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

    /// A handle that asks the person at this terminal (see [`Prompter`]).
    pub fn prompter(&self) -> Prompter {
        Prompter {
            prompts: Arc::clone(&self.shared.prompts),
        }
    }

    /// Copies what the agent wrote and the relay has not yet, stops the relay, restores
    /// the user's modes.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        signal_eventfd(&self.shared.wake);
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

/// A new eventfd (close-on-exec, non-blocking) for waking the relay.
fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes two ints and returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: eventfd returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes an eventfd readable (adds one to its counter).
fn signal_eventfd(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to the eventfd.
    unsafe {
        libc::write(
            fd.as_raw_fd(),
            (&raw const one).cast(),
            std::mem::size_of::<u64>(),
        )
    };
}

/// Makes an eventfd unreadable again (resets its counter).
fn drain_eventfd(fd: &OwnedFd) {
    let mut count: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64; the fd is non-blocking.
    unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&raw mut count).cast(),
            std::mem::size_of::<u64>(),
        )
    };
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

    /// Copies between the user's terminal and the agent's until the session stops; then
    /// answers nothing more: prompts still up or queued are dropped (their waiters see the
    /// channel closed: no answer).
    fn relay(&self) {
        let mut out = Output {
            shared: self,
            parser: vte::Parser::new(),
            prompt: PromptState::default(),
        };
        self.relay_until_stopped(&mut out);
        let step = out.prompt.close();
        out.apply(step);
        self.prompts.close();
    }

    fn relay_until_stopped(&self, out: &mut Output<'_>) {
        let master = self.master.as_raw_fd();
        let mut pending: Vec<u8> = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let mut stdin_open = true;
        let mut master_open = true;
        loop {
            let prompting = out.prompt.prompting();
            // While a prompt is up the person's keys go to it, whether or not the agent
            // reads its input; the agent's output is read until the hold is full.
            let mut master_events = 0;
            if master_open {
                if !out.prompt.hold_full() {
                    master_events |= libc::POLLIN;
                }
                if !pending.is_empty() {
                    master_events |= libc::POLLOUT;
                }
            }
            let mut fds = [
                pollfd(
                    0,
                    if stdin_open && (prompting || pending.is_empty()) {
                        libc::POLLIN
                    } else {
                        0
                    },
                ),
                pollfd(master, master_events),
                pollfd(self.wake.as_raw_fd(), libc::POLLIN),
                pollfd(self.prompts.wake.as_raw_fd(), libc::POLLIN),
            ];
            // SAFETY: `fds` is a valid array of four pollfd.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 4, -1) };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            let revents = fds[1].revents;
            if revents != 0 && master_open {
                let gone = revents & (libc::POLLHUP | libc::POLLERR) != 0;
                if master_events & libc::POLLIN != 0
                    && revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
                {
                    master_open = copy_out(master, &mut buf, out);
                } else if gone {
                    // The hold is full and the agent's side hung up: its input is moot,
                    // and polling for it would spin.
                    pending.clear();
                }
                if revents & libc::POLLOUT != 0 && !pending.is_empty() {
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
                // The run is over: a prompt still up goes away, and what the agent wrote
                // last still reaches the user.
                let step = out.prompt.close();
                out.apply(step);
                while master_open && !read_would_block(master) {
                    master_open = copy_out(master, &mut buf, out);
                }
                return;
            }
            // Keys already typed go where they were meant for before a new prompt shows.
            if fds[0].revents != 0 {
                match io::stdin().lock().read(&mut buf) {
                    Ok(0) | Err(_) => stdin_open = false,
                    Ok(n) if out.prompt.prompting() => {
                        // Ctrl-Z included: a prompt is answered before anything else.
                        let step = out.prompt.input(&buf[..n], Instant::now());
                        out.apply(step);
                    }
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
            if fds[3].revents != 0 {
                drain_eventfd(&self.prompts.wake);
                for request in self.prompts.take() {
                    let step = match request {
                        PromptRequest::Ask(asked) => out.prompt.ask(asked, Instant::now()),
                        PromptRequest::Cancel { id, note } => {
                            out.prompt.cancel(&id, &note, Instant::now())
                        }
                    };
                    out.apply(step);
                }
            }
        }
    }
}

/// The agent's output on its way to the user's terminal, its screen modes noted; held
/// back while a prompt is up.
struct Output<'a> {
    shared: &'a Shared,
    parser: vte::Parser,
    prompt: PromptState,
}

impl Output<'_> {
    /// The agent's output to the user's terminal, its screen modes noted (on the way out,
    /// not when held: the modes are what the user's terminal has).
    fn pass(&mut self, data: &[u8]) -> io::Result<()> {
        {
            let mut modes = self
                .shared
                .modes
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.parser.advance(&mut *modes, data);
        }
        io::stdout().lock().write_all(data)
    }

    /// Does what the prompt's state asks of the user's terminal.
    fn apply(&mut self, step: Step) {
        if !step.leave && step.text.is_empty() && step.resume.is_none() {
            return;
        }
        let mut bytes = Vec::new();
        if step.leave {
            // CAN ends an escape sequence the agent's output may have left half-written,
            // then the agent's screen modes are undone (as for Ctrl-Z, raw mode kept): the
            // prompt shows on the normal screen, with a cursor and plain keys.
            bytes.push(0x18);
            bytes.extend(self.modes().undo());
        }
        bytes.extend_from_slice(step.text.as_bytes());
        let mut redraw = false;
        if step.resume.is_some() {
            let modes = self.modes();
            bytes.extend(modes.redo());
            redraw = modes.alternate();
        }
        let mut result = io::stdout().lock().write_all(&bytes);
        if let Some(held) = step.resume {
            result = result.and_then(|()| self.pass(&held));
        }
        let _ = result.and_then(|()| io::stdout().lock().flush());
        if redraw {
            // Entering the alternate screen again cleared it.
            self.shared.redraw();
        }
    }

    fn modes(&self) -> std::sync::MutexGuard<'_, ScreenModes> {
        self.shared
            .modes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl io::Write for Output<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.prompt.prompting() {
            self.prompt.hold(data);
        } else {
            self.pass(data)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().lock().flush()
    }
}

/// A person's answer at a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKey {
    /// `y`: this call.
    Once,
    /// `t`: this call, and the same calls for ten minutes.
    TenMinutes,
    /// `s`: this call, and the same calls while the agent runs.
    Session,
    /// `n`, or Ctrl-C.
    Deny,
}

impl PromptKey {
    /// The answer a key gives: `y`, `t`, `s`, `n` in either case.
    fn from_letter(c: u8) -> Option<PromptKey> {
        match c.to_ascii_lowercase() {
            b'y' => Some(PromptKey::Once),
            b't' => Some(PromptKey::TenMinutes),
            b's' => Some(PromptKey::Session),
            b'n' => Some(PromptKey::Deny),
            _ => None,
        }
    }

    /// The key, as echoed after the prompt.
    fn echo(self) -> &'static str {
        match self {
            PromptKey::Once => "y",
            PromptKey::TenMinutes => "t",
            PromptKey::Session => "s",
            PromptKey::Deny => "n",
        }
    }

    fn said(self) -> &'static str {
        match self {
            PromptKey::Once => "allowed once",
            PromptKey::TenMinutes => "allowed for 10 minutes",
            PromptKey::Session => "allowed for this session",
            PromptKey::Deny => "denied",
        }
    }
}

/// Asks the person at the agent's terminal; cloned freely, used from any thread.
///
/// Prompts show one at a time in the order asked. The answer comes on the returned
/// channel; a closed channel (the sender dropped) means no answer: the prompt was
/// cancelled, or the terminal's relay stopped (the agent ended, or the relay never ran
/// again), or the request was dropped before it was shown.
#[derive(Clone)]
pub struct Prompter {
    prompts: Arc<Prompts>,
}

impl std::fmt::Debug for Prompter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prompter").finish_non_exhaustive()
    }
}

impl Prompter {
    /// Queues a prompt, shown as `[agentd] <id>: <text>` and a line of keys. `text` may
    /// hold strings the agent chose (a command line, a name): control and invisible
    /// characters are shown as `?`, and it is cut at [`PROMPT_TEXT_MAX`] characters.
    pub fn ask(&self, id: String, text: String) -> oneshot::Receiver<PromptKey> {
        let (reply, answer) = oneshot::channel();
        let mut inbox = self.prompts.lock();
        // Once the relay has stopped, `reply` is dropped here: no answer.
        if !inbox.closed {
            inbox
                .requests
                .push(PromptRequest::Ask(Asked { id, text, reply }));
            drop(inbox);
            signal_eventfd(&self.prompts.wake);
        }
        answer
    }

    /// The request was decided elsewhere, or expired: its prompt goes away (if it is
    /// showing, `[agentd] <id>: <note>` takes its place, e.g. note = "approved by alice
    /// (agentd approve)"; if it is still queued, it goes silently). Its channel closes.
    pub fn cancel(&self, id: &str, note: &str) {
        let mut inbox = self.prompts.lock();
        if !inbox.closed {
            inbox.requests.push(PromptRequest::Cancel {
                id: id.to_owned(),
                note: note.to_owned(),
            });
            drop(inbox);
            signal_eventfd(&self.prompts.wake);
        }
    }
}

/// Prompt requests on their way to the relay thread, which the eventfd wakes.
struct Prompts {
    inbox: Mutex<Inbox>,
    wake: OwnedFd,
}

#[derive(Default)]
struct Inbox {
    requests: Vec<PromptRequest>,
    /// The relay has stopped: requests are dropped at once.
    closed: bool,
}

enum PromptRequest {
    Ask(Asked),
    Cancel { id: String, note: String },
}

impl Prompts {
    fn new() -> io::Result<Prompts> {
        Ok(Prompts {
            inbox: Mutex::new(Inbox::default()),
            wake: eventfd()?,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take(&self) -> Vec<PromptRequest> {
        std::mem::take(&mut self.lock().requests)
    }

    /// No more requests: those not yet taken are dropped (their channels close).
    fn close(&self) {
        let mut inbox = self.lock();
        inbox.closed = true;
        inbox.requests.clear();
    }
}

/// A prompt asked for, queued or showing.
struct Asked {
    id: String,
    text: String,
    reply: oneshot::Sender<PromptKey>,
}

/// How much of the agent's output is held while a prompt is up (then it blocks).
pub const HOLD_MAX: usize = 1024 * 1024;
/// Keys typed this soon after a prompt appears are ignored: they were meant for the agent.
pub const PROMPT_GUARD: Duration = Duration::from_millis(400);
/// A prompt's text is cut after this many characters.
pub const PROMPT_TEXT_MAX: usize = 1000;

/// What the relay does to the user's terminal after the prompts' state changed, in order.
#[derive(Debug, Default, PartialEq)]
struct Step {
    /// A prompt appears where there was none: the agent's screen modes are undone first.
    leave: bool,
    /// agentd's lines.
    text: String,
    /// The last prompt is gone: the agent's screen modes are redone, then what it wrote
    /// meanwhile follows.
    resume: Option<Vec<u8>>,
}

/// Written before each prompt: plain text attributes (the agent may have left its output
/// concealed, or coloured like the background, to hide the prompt and show its own), the
/// ASCII character set and shift-in.
const PROMPT_RESET: &str = "\x1b[0m\x1b(B\x0f";

/// The prompts at the agent's terminal, without the terminal: fed requests, the person's
/// keys and the agent's output, it says what to write (see [`Step`]).
#[derive(Default)]
struct PromptState {
    /// The front is showing.
    queue: VecDeque<Asked>,
    /// When the front appeared.
    shown_at: Option<Instant>,
    /// The agent's output since the first prompt appeared.
    held: Vec<u8>,
    /// Inside a bracketed paste (`CSI 200 ~` .. `CSI 201 ~`): nothing answers.
    in_paste: bool,
}

impl PromptState {
    fn prompting(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Whether the relay stops reading the agent's output until the prompts are over.
    fn hold_full(&self) -> bool {
        self.held.len() >= HOLD_MAX
    }

    fn hold(&mut self, data: &[u8]) {
        self.held.extend_from_slice(data);
    }

    fn ask(&mut self, asked: Asked, now: Instant) -> Step {
        self.queue.push_back(asked);
        if self.queue.len() > 1 {
            return Step::default();
        }
        let mut step = Step {
            leave: true,
            ..Step::default()
        };
        self.show_next(&mut step, now);
        step
    }

    fn cancel(&mut self, id: &str, note: &str, now: Instant) -> Step {
        let mut step = Step::default();
        let Some(at) = self.queue.iter().position(|a| a.id == id) else {
            return step;
        };
        // Dropping its sender closes the waiter's channel.
        self.queue.remove(at);
        if at == 0 {
            // The keys line is replaced by the note.
            step.text = format!("\r\x1b[2K[agentd] {}: {}\r\n", clean(id), clean(note));
            self.show_next(&mut step, now);
        }
        step
    }

    /// The person's keys (one read of the user's terminal).
    fn input(&mut self, input: &[u8], now: Instant) -> Step {
        let mut step = Step::default();
        let key = answer(input, &mut self.in_paste);
        let Some(shown) = self.shown_at else {
            return step;
        };
        if now.saturating_duration_since(shown) < PROMPT_GUARD {
            return step;
        }
        let Some(key) = key else {
            return step;
        };
        let Some(asked) = self.queue.pop_front() else {
            return step;
        };
        let said = match asked.reply.send(key) {
            Ok(()) => key.said(),
            Err(_) => "no longer waiting for an answer",
        };
        step.text = format!(
            "{}\r\n[agentd] {}: {said}\r\n",
            key.echo(),
            clean(&asked.id)
        );
        self.show_next(&mut step, now);
        step
    }

    /// The relay stops: the prompts go unanswered, what was held is let out.
    fn close(&mut self) -> Step {
        if self.queue.is_empty() {
            return Step::default();
        }
        self.queue.clear();
        self.shown_at = None;
        Step {
            leave: false,
            text: "\r\n".to_owned(),
            resume: Some(std::mem::take(&mut self.held)),
        }
    }

    /// Shows the next prompt, or ends the prompts.
    fn show_next(&mut self, step: &mut Step, now: Instant) {
        match self.queue.front() {
            Some(next) => {
                step.text.push_str(&format!(
                    "{PROMPT_RESET}\r\n[agentd] {}: {}\r\n[agentd] allow? y = once, t = 10 minutes, s = this session, n = deny: ",
                    clean(&next.id),
                    clean(&next.text)
                ));
                self.shown_at = Some(now);
            }
            None => {
                self.shown_at = None;
                step.resume = Some(std::mem::take(&mut self.held));
            }
        }
    }
}

/// `text` as it can be shown on a terminal: control characters (C0, DEL, C1) and
/// characters that hide or reorder text (zero-width, bidirectional controls, tags) become
/// `?`; at most [`PROMPT_TEXT_MAX`] characters, the rest counted.
fn clean(text: &str) -> String {
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n == PROMPT_TEXT_MAX {
            let more = text.chars().count() - n;
            out.push_str(&format!(" [{more} more characters]"));
            break;
        }
        out.push(if c.is_control() || invisible(c) {
            '?'
        } else {
            c
        });
    }
    out
}

fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}'                       // soft hyphen
        | '\u{061C}'                     // Arabic letter mark
        | '\u{180E}'                     // Mongolian vowel separator
        | '\u{200B}'..='\u{200F}'        // zero-width space, joiners, LRM, RLM
        | '\u{2028}'..='\u{202E}'        // line/paragraph separators, bidi embeddings
        | '\u{2060}'..='\u{206F}'        // word joiner, invisible operators, bidi isolates
        | '\u{FEFF}'                     // zero-width no-break space
        | '\u{FFF9}'..='\u{FFFB}'        // interlinear annotation
        | '\u{E0000}'..='\u{E007F}'      // tags
    )
}

/// Modifier bits of a key reported as an escape sequence (the encoded value minus one),
/// Caps Lock and Num Lock left out.
const MOD_SHIFT: u32 = 1;
const MOD_CTRL: u32 = 4;
const MOD_LOCKS: u32 = 64 | 128;

/// One key or sequence in what the user's terminal sent.
#[derive(Debug, PartialEq)]
enum Key {
    /// A byte outside escape sequences.
    Byte(u8),
    /// A key press (or repeat) sent as an escape sequence: kitty's keyboard protocol
    /// (`CSI code ; mods u`) or xterm's modifyOtherKeys (`CSI 27 ; mods ; code ~`).
    Press {
        code: u32,
        mods: u32,
    },
    PasteStart,
    PasteEnd,
    /// Any other sequence: cursor and function keys, focus and mouse reports, key
    /// releases, Alt with a key, a lone Escape, a sequence cut off at the end of the read.
    Other,
}

/// The keys in one read of the user's terminal.
fn keys(input: &[u8]) -> Vec<Key> {
    let mut keys = Vec::new();
    let mut i = 0;
    while i < input.len() {
        if input[i] != 0x1b {
            keys.push(Key::Byte(input[i]));
            i += 1;
            continue;
        }
        match input.get(i + 1) {
            Some(b'[') => {
                let start = i + 2;
                let mut j = start;
                while j < input.len() && (0x20..=0x3f).contains(&input[j]) {
                    j += 1;
                }
                match input.get(j) {
                    Some(&fin) if (0x40..=0x7e).contains(&fin) => {
                        keys.push(csi_key(&input[start..j], fin));
                        i = j + 1;
                    }
                    // Cut off, or broken by another byte: that byte is read next.
                    Some(_) | None => {
                        keys.push(Key::Other);
                        i = j;
                    }
                }
            }
            // SS3 (`ESC O P`: F1, or a cursor key) and Alt with a key.
            Some(b'O') => {
                keys.push(Key::Other);
                i = (i + 3).min(input.len());
            }
            Some(_) | None => {
                keys.push(Key::Other);
                i = (i + 2).min(input.len());
            }
        }
    }
    keys
}

/// A CSI sequence from the terminal: its parameter and intermediate bytes, its final byte.
fn csi_key(params: &[u8], fin: u8) -> Key {
    let Ok(params) = std::str::from_utf8(params) else {
        return Key::Other;
    };
    let fields: Vec<Vec<Option<u32>>> = params
        .split(';')
        .map(|f| f.split(':').map(|n| n.parse().ok()).collect())
        .collect();
    let field = |n: usize, sub: usize, default: u32| -> Option<u32> {
        match fields.get(n).and_then(|f| f.get(sub)) {
            Some(value) => *value,
            None => Some(default),
        }
    };
    let mods = |encoded: u32| encoded.saturating_sub(1) & !MOD_LOCKS;
    match (fin, params) {
        (b'~', "200") => Key::PasteStart,
        (b'~', "201") => Key::PasteEnd,
        (b'~', _) if field(0, 0, 0) == Some(27) && fields.len() == 3 => {
            match (field(1, 0, 1), field(2, 0, 0)) {
                (Some(m), Some(code)) => Key::Press {
                    code,
                    mods: mods(m),
                },
                (None, _) | (_, None) => Key::Other,
            }
        }
        (b'u', _) if params.starts_with(|c: char| c.is_ascii_digit()) => {
            match (field(0, 0, 0), field(1, 0, 1), field(1, 1, 1)) {
                // Event type 3 is a release.
                (Some(code), Some(m), Some(1 | 2)) => Key::Press {
                    code,
                    mods: mods(m),
                },
                (Some(_) | None, _, _) => Key::Other,
            }
        }
        _ => Key::Other,
    }
}

/// The answer in one read of the user's terminal: exactly one key, `y`, `t`, `s` or `n`
/// (either case, Shift allowed), or Ctrl-C (deny). Anything else, or more than one key (a
/// paste, keys typed ahead), answers nothing; sequences that are not keys are ignored.
fn answer(input: &[u8], in_paste: &mut bool) -> Option<PromptKey> {
    let mut count = 0;
    let mut found = None;
    for key in keys(input) {
        match key {
            Key::PasteStart => *in_paste = true,
            Key::PasteEnd => *in_paste = false,
            Key::Other => {}
            Key::Byte(_) | Key::Press { .. } if *in_paste => {}
            Key::Byte(b) => {
                count += 1;
                found = if b == 0x03 {
                    Some(PromptKey::Deny)
                } else {
                    PromptKey::from_letter(b)
                };
            }
            Key::Press { code, mods } => {
                count += 1;
                let letter = u8::try_from(code).ok();
                found = match (letter, mods) {
                    (Some(b'c' | b'C'), MOD_CTRL) => Some(PromptKey::Deny),
                    (Some(c), 0 | MOD_SHIFT) => PromptKey::from_letter(c),
                    (Some(_) | None, _) => None,
                };
            }
        }
    }
    if count == 1 { found } else { None }
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

    /// Whether the agent is on the alternate screen.
    fn alternate(&self) -> bool {
        self.modes
            .iter()
            .any(|&(mode, set)| set && matches!(mode, 47 | 1047 | 1049))
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

    fn asked(id: &str, text: &str) -> (Asked, oneshot::Receiver<PromptKey>) {
        let (reply, answer) = oneshot::channel();
        let asked = Asked {
            id: id.to_owned(),
            text: text.to_owned(),
            reply,
        };
        (asked, answer)
    }

    fn prompt_line(id: &str, text: &str) -> String {
        format!(
            "{PROMPT_RESET}\r\n[agentd] {id}: {text}\r\n[agentd] allow? y = once, t = 10 minutes, s = this session, n = deny: "
        )
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn prompt_keys_in_either_case_and_ctrl_c() {
        let key = |input: &[u8]| answer(input, &mut false);
        for (input, expected) in [
            (&b"y"[..], PromptKey::Once),
            (b"Y", PromptKey::Once),
            (b"t", PromptKey::TenMinutes),
            (b"T", PromptKey::TenMinutes),
            (b"s", PromptKey::Session),
            (b"S", PromptKey::Session),
            (b"n", PromptKey::Deny),
            (b"N", PromptKey::Deny),
            (b"\x03", PromptKey::Deny),
            // Kitty's keyboard protocol: Ctrl-C (also with an event type), `y` with all
            // keys as escape codes, with Shift, with Caps Lock; modifyOtherKeys' Ctrl-C.
            (b"\x1b[99;5u", PromptKey::Deny),
            (b"\x1b[99;5:1u", PromptKey::Deny),
            (b"\x1b[27;5;99~", PromptKey::Deny),
            (b"\x1b[121u", PromptKey::Once),
            (b"\x1b[121;2u", PromptKey::Once),
            (b"\x1b[115;65u", PromptKey::Session),
            // Sequences that are not keys (focus in, a mouse click) are ignored.
            (b"\x1b[Iy", PromptKey::Once),
            (b"\x1b[<0;10;5Mn", PromptKey::Deny),
            (b"\x1b[121;1:3ut", PromptKey::TenMinutes),
        ] {
            assert_eq!(key(input), Some(expected), "{input:?}");
        }
        for input in [
            &b"x"[..],
            b"\r",
            b"\x1a",
            // More than one key: typed ahead, or pasted.
            b"yy",
            b"yes",
            b"ny",
            // Escape sequences answer nothing: cursor keys, F1, Alt-y, a lone Escape,
            // key releases, Ctrl-y, Alt-y in kitty's protocol, a cut-off sequence.
            b"\x1b[A",
            b"\x1bOP",
            b"\x1bOy",
            b"\x1by",
            b"\x1b",
            b"\x1b[121;1:3u",
            b"\x1b[121;5u",
            b"\x1b[121;3u",
            b"\x1b[12",
            b"\x1b[1;5s",
        ] {
            assert_eq!(key(input), None, "{input:?}");
        }
    }

    #[test]
    fn a_paste_answers_nothing() {
        let mut in_paste = false;
        assert_eq!(answer(b"\x1b[200~y\x1b[201~", &mut in_paste), None);
        assert!(!in_paste);
        // A paste across reads.
        assert_eq!(answer(b"\x1b[200~ab", &mut in_paste), None);
        assert_eq!(answer(b"y", &mut in_paste), None);
        assert_eq!(answer(b"\x1b[201~", &mut in_paste), None);
        assert_eq!(answer(b"y", &mut in_paste), Some(PromptKey::Once));
    }

    #[test]
    fn prompt_text_is_cleaned() {
        // Escape sequences, line ends, DEL, C1 controls, tabs.
        assert_eq!(
            clean("curl \x1b[2J\x1b]0;x\x07https://a\r\nb\x7f\u{9b}31m\tc"),
            "curl ?[2J?]0;x?https://a??b??31m?c"
        );
        // Text that reorders or hides itself.
        assert_eq!(
            clean("ls \u{202e}txt.exe\u{200b}\u{2066}x\u{feff}\u{e0041}"),
            "ls ?txt.exe??x??"
        );
        assert_eq!(clean("café ✓ 日本"), "café ✓ 日本");
        let long = "a".repeat(PROMPT_TEXT_MAX + 5);
        assert_eq!(
            clean(&long),
            format!("{} [5 more characters]", "a".repeat(PROMPT_TEXT_MAX))
        );
        assert_eq!(clean(&long[..PROMPT_TEXT_MAX]), "a".repeat(PROMPT_TEXT_MAX));
    }

    #[test]
    fn a_prompt_holds_the_output_and_takes_the_keys() {
        let t0 = Instant::now();
        let mut state = PromptState::default();
        assert!(!state.prompting());
        let (a, mut answer) = asked("r-ab12-1", "connect tcp 1.2.3.4:443 (\x1b]x)");
        let step = state.ask(a, t0);
        assert_eq!(
            step,
            Step {
                leave: true,
                text: prompt_line("r-ab12-1", "connect tcp 1.2.3.4:443 (?]x)"),
                resume: None,
            }
        );
        assert!(state.prompting());
        state.hold(b"agent ");
        state.hold(b"output");
        // Keys too soon after the prompt appeared were meant for the agent.
        assert_eq!(state.input(b"y", t0 + ms(100)), Step::default());
        let later = t0 + PROMPT_GUARD;
        // Other keys, Ctrl-Z included, change nothing.
        for input in [&b"x"[..], b"\x1a", b"yes", b"\x1b[A"] {
            assert_eq!(state.input(input, later), Step::default());
        }
        assert_eq!(answer.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        assert_eq!(
            state.input(b"T", later),
            Step {
                leave: false,
                text: "t\r\n[agentd] r-ab12-1: allowed for 10 minutes\r\n".into(),
                resume: Some(b"agent output".to_vec()),
            }
        );
        assert_eq!(answer.try_recv(), Ok(PromptKey::TenMinutes));
        assert!(!state.prompting());
        assert_eq!(state.input(b"y", later), Step::default());
    }

    #[test]
    fn prompts_queue_and_the_output_stays_held_until_the_last() {
        let t0 = Instant::now();
        let mut state = PromptState::default();
        let (a, mut first) = asked("r-ab12-1", "one");
        let (b, mut second) = asked("r-ab12-2", "two");
        assert!(state.ask(a, t0).leave);
        assert_eq!(state.ask(b, t0 + ms(10)), Step::default());
        state.hold(b"held");
        let t1 = t0 + PROMPT_GUARD;
        assert_eq!(
            state.input(b"\x03", t1),
            Step {
                leave: false,
                text: format!(
                    "n\r\n[agentd] r-ab12-1: denied\r\n{}",
                    prompt_line("r-ab12-2", "two")
                ),
                resume: None,
            }
        );
        assert_eq!(first.try_recv(), Ok(PromptKey::Deny));
        // The second prompt has a guard of its own.
        assert_eq!(state.input(b"s", t1 + ms(10)), Step::default());
        assert_eq!(second.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        state.hold(b" more");
        let step = state.input(b"s", t1 + PROMPT_GUARD);
        assert_eq!(
            step.text,
            "s\r\n[agentd] r-ab12-2: allowed for this session\r\n"
        );
        assert_eq!(step.resume, Some(b"held more".to_vec()));
        assert_eq!(second.try_recv(), Ok(PromptKey::Session));
        // The next prompt starts afresh: the screen is left again.
        let (c, _third) = asked("r-ab12-3", "three");
        assert!(state.ask(c, t1).leave);
    }

    #[test]
    fn a_cancelled_prompt_goes_away() {
        let t0 = Instant::now();
        let mut state = PromptState::default();
        let (a, mut first) = asked("r-ab12-1", "one");
        let (b, mut second) = asked("r-ab12-2", "two");
        let (c, mut third) = asked("r-ab12-3", "three");
        state.ask(a, t0);
        state.ask(b, t0);
        state.ask(c, t0);
        state.hold(b"held");
        // Queued, not yet shown: it goes silently.
        assert_eq!(state.cancel("r-ab12-2", "expired", t0), Step::default());
        assert_eq!(second.try_recv(), Err(oneshot::error::TryRecvError::Closed));
        assert_eq!(state.cancel("r-ab12-9", "expired", t0), Step::default());
        // Showing: the note replaces its keys line, and the next one shows.
        let t1 = t0 + ms(5);
        assert_eq!(
            state.cancel("r-ab12-1", "approved by alice (agentd approve)", t1),
            Step {
                leave: false,
                text: format!(
                    "\r\x1b[2K[agentd] r-ab12-1: approved by alice (agentd approve)\r\n{}",
                    prompt_line("r-ab12-3", "three")
                ),
                resume: None,
            }
        );
        assert_eq!(first.try_recv(), Err(oneshot::error::TryRecvError::Closed));
        // Its guard runs from when it showed.
        assert_eq!(state.input(b"y", t0 + PROMPT_GUARD), Step::default());
        let step = state.cancel("r-ab12-3", "timed out\x1b[2J", t1);
        assert_eq!(step.text, "\r\x1b[2K[agentd] r-ab12-3: timed out?[2J\r\n");
        assert_eq!(step.resume, Some(b"held".to_vec()));
        assert_eq!(third.try_recv(), Err(oneshot::error::TryRecvError::Closed));
        assert!(!state.prompting());
    }

    #[test]
    fn an_answer_nobody_waits_for_is_said() {
        let t0 = Instant::now();
        let mut state = PromptState::default();
        let (a, answer) = asked("r-ab12-1", "one");
        state.ask(a, t0);
        drop(answer);
        assert_eq!(
            state.input(b"y", t0 + PROMPT_GUARD).text,
            "y\r\n[agentd] r-ab12-1: no longer waiting for an answer\r\n"
        );
    }

    #[test]
    fn closing_ends_the_prompts_unanswered() {
        let t0 = Instant::now();
        let mut state = PromptState::default();
        assert_eq!(state.close(), Step::default());
        let (a, mut first) = asked("r-ab12-1", "one");
        let (b, mut second) = asked("r-ab12-2", "two");
        state.ask(a, t0);
        state.ask(b, t0);
        state.hold(b"held");
        assert_eq!(
            state.close(),
            Step {
                leave: false,
                text: "\r\n".into(),
                resume: Some(b"held".to_vec()),
            }
        );
        assert_eq!(first.try_recv(), Err(oneshot::error::TryRecvError::Closed));
        assert_eq!(second.try_recv(), Err(oneshot::error::TryRecvError::Closed));
        assert!(!state.prompting());
    }

    #[test]
    fn the_hold_is_bounded() {
        let mut state = PromptState::default();
        let (a, _answer) = asked("r-ab12-1", "one");
        state.ask(a, Instant::now());
        state.hold(&vec![b'x'; HOLD_MAX - 1]);
        assert!(!state.hold_full());
        state.hold(b"x");
        assert!(state.hold_full());
    }

    #[test]
    fn prompter_requests_wake_the_relay_until_it_stops() {
        fn shareable<T: Send + Sync + Clone>() {}
        shareable::<Prompter>();
        let prompts = Arc::new(Prompts::new().unwrap());
        let prompter = Prompter {
            prompts: Arc::clone(&prompts),
        };
        let wake = prompts.wake.as_raw_fd();
        assert!(read_would_block(wake));
        let mut answer = prompter.clone().ask("r-ab12-1".into(), "one".into());
        prompter.cancel("r-ab12-1", "expired");
        assert!(!read_would_block(wake));
        drain_eventfd(&prompts.wake);
        assert!(read_would_block(wake));
        let requests = prompts.take();
        assert!(matches!(
            requests.as_slice(),
            [PromptRequest::Ask(a), PromptRequest::Cancel { id, note }]
                if a.id == "r-ab12-1" && a.text == "one" && id == "r-ab12-1" && note == "expired"
        ));
        assert_eq!(answer.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        // Dropped by a relay that stops: no answer.
        drop(requests);
        assert_eq!(answer.try_recv(), Err(oneshot::error::TryRecvError::Closed));
        // After it stopped, requests get no answer at once and wake nothing.
        let mut queued = prompter.ask("r-ab12-2".into(), "two".into());
        prompts.close();
        assert_eq!(queued.try_recv(), Err(oneshot::error::TryRecvError::Closed));
        let mut late = prompter.ask("r-ab12-3".into(), "three".into());
        assert_eq!(late.try_recv(), Err(oneshot::error::TryRecvError::Closed));
        drain_eventfd(&prompts.wake);
        prompter.cancel("r-ab12-3", "expired");
        assert!(read_would_block(wake));
        assert!(prompts.take().is_empty());
    }

    #[test]
    fn the_alternate_screen_is_noted() {
        let mut modes = ScreenModes::default();
        let mut parser = vte::Parser::new();
        assert!(!modes.alternate());
        parser.advance(&mut modes, b"\x1b[?1049h");
        assert!(modes.alternate());
        parser.advance(&mut modes, b"\x1b[?1049l");
        assert!(!modes.alternate());
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
