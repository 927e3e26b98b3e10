//! `agentd diff`, `commit`, `discard`, `undo` and `transactions`: argument parsing and
//! output. Exit status: 0 done; 1 conflicts or refused paths remain (commit, undo); 2 the
//! command failed (unknown id, not allowed, unreadable store, bad path).

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{SystemTime, UNIX_EPOCH},
};

use clap::Subcommand;

use super::{
    Action, Applied, CommitReport, Issue, Meta, State, Store, Transaction, TxError, UndoReport,
    may_act, printable, printable_path, render_diff, render_stat,
};

pub const EXIT_CONFLICTS: u8 = 1;
pub const EXIT_FAILED: u8 = 2;

/// Where the transactions are.
#[derive(Debug, Clone, clap::Args)]
pub struct StateDirArg {
    /// The state directory: transactions are in DIR/transactions (as root; anyone else
    /// asks the daemon, whose own state directory applies)
    #[arg(long, value_name = "DIR", default_value = crate::daemon::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The daemon's control socket, for a caller who is not root (default:
    /// /run/agentd/agentd.sock, or AGENTD_SOCKET)
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum TxCommand {
    /// Show what an agent changed in its workspace, held back in its transaction
    ///
    /// An agent run in transaction mode writes to a layer over its workspace; nothing
    /// reaches the workspace until `agentd commit`. This shows the changes as unified
    /// diffs (binary files as sizes and SHA-256), with renames, symlinks, modes and
    /// directories; paths changed in the workspace since the agent started are marked
    /// CONFLICT. File names and contents are printed with control characters escaped.
    /// PATH limits the output to those paths (relative to the workspace, or absolute in it)
    /// and what is below them. Only root and the agent's owner may look.
    #[command(after_help = "Examples:\n  \
sudo agentd diff coding-agent-1a2b3c --stat\n  \
sudo agentd diff coding-agent-1a2b3c src/\n  \
sudo agentd diff coding-agent-1a2b3c --json | jq '.[] | select(.conflict)'")]
    Diff {
        #[arg(value_name = "ID")]
        id: String,
        /// One line per path (kind, lines added and removed or sizes) and a total
        #[arg(long)]
        stat: bool,
        /// Print the changes as one JSON array
        #[arg(long, conflicts_with = "stat")]
        json: bool,
        #[arg(value_name = "PATH")]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Apply a transaction's changes to the workspace
    ///
    /// Each file is written beside its target and renamed over it; nothing in the workspace
    /// is followed through a symlink. A path changed in the workspace since the agent
    /// started (or whose directory changed) is a conflict: it is left alone, stays in the
    /// transaction, and the rest is committed. What a commit replaces is saved:
    /// `agentd undo ID` restores it. PATH commits only those paths (and what is below them).
    ///
    /// Exit status: 0 everything committed; 1 conflicts remain; 2 failure.
    #[command(after_help = "Examples:\n  \
sudo agentd commit coding-agent-1a2b3c\n  \
sudo agentd commit coding-agent-1a2b3c src/ README.md")]
    Commit {
        #[arg(value_name = "ID")]
        id: String,
        #[arg(value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Print the report as JSON: commit, committed, conflicts, unchanged, state
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Throw a transaction away: its uncommitted changes and its undo history
    ///
    /// Commits already made stay in the workspace (and can no longer be undone).
    Discard {
        #[arg(value_name = "ID")]
        id: String,
        #[command(flatten)]
        state: StateDirArg,
    },
    /// Undo a transaction's last commit
    ///
    /// Restores what the commit replaced or deleted and removes what it created. A path
    /// changed since the commit is left alone and reported (the commit keeps it, for
    /// another try). Exit status: 0 all restored; 1 some refused; 2 failure.
    Undo {
        #[arg(value_name = "ID")]
        id: String,
        /// Print the report as JSON: commit, restored, refused, state
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateDirArg,
    },
    /// List transactions: id, owner, profile, state, size, age, workspace
    ///
    /// Transactions whose agent's supervisor died before keeping anything are removed
    /// first (when run as root).
    Transactions {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateDirArg,
    },
}

/// What a transaction command printed, and its exit status: made in-process, or by the
/// daemon for a caller who is not root.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub code: u8,
}

/// A transaction command as the daemon takes it: the daemon's own state directory
/// applies, and the caller is the peer of its socket.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum TxRequest {
    Diff {
        id: String,
        stat: bool,
        json: bool,
        paths: Vec<PathBuf>,
    },
    Commit {
        id: String,
        paths: Vec<PathBuf>,
        json: bool,
    },
    Discard {
        id: String,
    },
    Undo {
        id: String,
        json: bool,
    },
    Transactions {
        json: bool,
    },
}

impl TxCommand {
    /// The request without where it goes, and where it goes.
    pub fn split(self) -> (TxRequest, StateDirArg) {
        match self {
            TxCommand::Diff {
                id,
                stat,
                json,
                paths,
                state,
            } => (
                TxRequest::Diff {
                    id,
                    stat,
                    json,
                    paths,
                },
                state,
            ),
            TxCommand::Commit {
                id,
                paths,
                json,
                state,
            } => (TxRequest::Commit { id, paths, json }, state),
            TxCommand::Discard { id, state } => (TxRequest::Discard { id }, state),
            TxCommand::Undo { id, json, state } => (TxRequest::Undo { id, json }, state),
            TxCommand::Transactions { json, state } => (TxRequest::Transactions { json }, state),
        }
    }
}

/// `agentd diff|commit|discard|undo|transactions`. Root acts on the state directory
/// itself; anyone else asks the daemon (at `socket`, or the default one), which acts for
/// its socket's peer: only on the peer's own transactions, never for a process inside an
/// agent.
pub fn main(cmd: TxCommand) -> ExitCode {
    let (req, at) = cmd.split();
    let out = if nix::unistd::getuid().is_root() {
        execute(req, &at.state_dir, 0)
    } else {
        match crate::daemon::client::transaction(at.socket, req.clone()) {
            Ok(Some(out)) => out,
            // No daemon: the store itself (readable by root only, so this says to use
            // sudo).
            Ok(None) => execute(req, &at.state_dir, nix::unistd::getuid().as_raw()),
            Err(e) => Output {
                stdout: String::new(),
                stderr: format!("agentd: {e:#}\n"),
                code: EXIT_FAILED,
            },
        }
    };
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    ExitCode::from(out.code)
}

/// Runs `req` on the store in `state_dir` for the caller `uid` (root: any transaction;
/// anyone else: their own).
pub fn execute(req: TxRequest, state_dir: &std::path::Path, uid: u32) -> Output {
    let mut out = Output::default();
    match run(req, state_dir, uid, &mut out) {
        Ok(code) => out.code = code,
        Err(e) => {
            out.stderr.push_str(&format!("agentd: {e}\n"));
            out.code = EXIT_FAILED;
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
enum CmdError {
    #[error(transparent)]
    Tx(#[from] TxError),
    #[error(
        "transaction `{id}` belongs to uid {owner}; you are uid {uid} (only its owner and root may act on it)"
    )]
    NotOwner { id: String, owner: u32, uid: u32 },
    #[error("cannot write JSON: {0}")]
    Json(#[from] serde_json::Error),
}

fn open_checked(state_dir: &std::path::Path, id: &str, uid: u32) -> Result<Transaction, CmdError> {
    let store = Store::open(state_dir)?;
    let tx = store.get(id)?;
    if !may_act(tx.meta(), uid) {
        return Err(CmdError::NotOwner {
            id: printable(id.as_bytes()),
            owner: tx.meta().owner_uid,
            uid,
        });
    }
    Ok(tx)
}

fn run(
    req: TxRequest,
    state_dir: &std::path::Path,
    uid: u32,
    out: &mut Output,
) -> Result<u8, CmdError> {
    use std::fmt::Write as _;
    match req {
        TxRequest::Diff {
            id,
            stat,
            json,
            paths,
        } => {
            let tx = open_checked(state_dir, &id, uid)?;
            if tx.meta().state == State::Running {
                let _ = writeln!(
                    out.stderr,
                    "agentd: the agent of `{}` still runs: its changes are kept when it ends",
                    printable(id.as_bytes())
                );
                return Ok(0);
            }
            let changes = tx.changes(&paths)?;
            if json {
                let _ = writeln!(out.stdout, "{}", serde_json::to_string_pretty(&changes)?);
            } else if stat {
                let _ = write!(out.stdout, "{}", render_stat(&changes));
            } else {
                let _ = write!(out.stdout, "{}", render_diff(&tx, &changes)?);
            }
            Ok(0)
        }
        TxRequest::Commit { id, paths, json } => {
            let mut tx = open_checked(state_dir, &id, uid)?;
            let report = tx.commit(&paths)?;
            if json {
                let _ = writeln!(out.stdout, "{}", serde_json::to_string_pretty(&report)?);
            } else {
                let _ = write!(out.stdout, "{}", commit_text(&id, &tx, &report));
            }
            Ok(if report.conflicts.is_empty() {
                0
            } else {
                EXIT_CONFLICTS
            })
        }
        TxRequest::Discard { id } => {
            let tx = open_checked(state_dir, &id, uid)?;
            if tx.meta().state == State::Running {
                return Err(TxError::WrongState {
                    id: printable(id.as_bytes()),
                    state: State::Running,
                    hint: "the agent still runs (`agentd kill ID` first)",
                }
                .into());
            }
            tx.discard()?;
            let _ = writeln!(out.stdout, "discarded {}", printable(id.as_bytes()));
            Ok(0)
        }
        TxRequest::Undo { id, json } => {
            let mut tx = open_checked(state_dir, &id, uid)?;
            let report = tx.undo()?;
            if json {
                let _ = writeln!(out.stdout, "{}", serde_json::to_string_pretty(&report)?);
            } else {
                let _ = write!(out.stdout, "{}", undo_text(&id, &report));
            }
            Ok(if report.refused.is_empty() {
                0
            } else {
                EXIT_CONFLICTS
            })
        }
        TxRequest::Transactions { json } => {
            let store = Store::open(state_dir)?;
            if uid == 0 {
                for id in store.reap_stale()? {
                    let _ = writeln!(
                        out.stderr,
                        "agentd: removed transaction {} (its supervisor died before keeping anything)",
                        printable(id.as_bytes())
                    );
                }
            }
            let list: Vec<Meta> = store
                .list()?
                .into_iter()
                .filter(|m| may_act(m, uid))
                .collect();
            if json {
                let _ = writeln!(out.stdout, "{}", serde_json::to_string_pretty(&list)?);
            } else {
                let _ = write!(out.stdout, "{}", table(&list));
            }
            Ok(0)
        }
    }
}

fn applied_line(out: &mut String, word: &str, a: &Applied) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "  {word:<9} {}", printable_path(&a.path));
}

fn issue_line(out: &mut String, word: &str, i: &Issue) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "  {word:<9} {}: {}", printable_path(&i.path), i.reason);
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn commit_text(id: &str, tx: &Transaction, report: &CommitReport) -> String {
    use std::fmt::Write as _;
    let id = printable(id.as_bytes());
    let ws = printable_path(&tx.meta().workspace);
    let mut out = String::new();
    let n = report.committed.len();
    let _ = match report.commit {
        Some(c) => writeln!(
            out,
            "committed {n} path{} to {ws} (commit {c}; `agentd undo {id}` reverts it)",
            plural(n)
        ),
        None => writeln!(out, "nothing committed to {ws}"),
    };
    for a in &report.committed {
        applied_line(&mut out, a.action.name(), a);
    }
    if report.unchanged > 0 {
        let _ = writeln!(out, "  ({} unchanged, dropped)", report.unchanged);
    }
    if !report.conflicts.is_empty() {
        let _ = writeln!(out, "left in the transaction (`agentd diff {id}`):");
        for c in &report.conflicts {
            issue_line(&mut out, "conflict", c);
        }
    }
    let _ = writeln!(out, "state: {}", report.state);
    out
}

fn undo_text(id: &str, report: &UndoReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let n = report.restored.len();
    let _ = writeln!(
        out,
        "undid commit {} of {}: {n} path{} restored",
        report.commit,
        printable(id.as_bytes()),
        plural(n)
    );
    for a in &report.restored {
        let word = match a.action {
            Action::Deleted => "removed",
            Action::Created | Action::Replaced => "restored",
            Action::Updated => "reset",
        };
        applied_line(&mut out, word, a);
    }
    for r in &report.refused {
        issue_line(&mut out, "refused", r);
    }
    let _ = writeln!(out, "state: {}", report.state);
    out
}

fn owner_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(uid.into()) {
        Ok(Some(u)) => printable(u.name.as_bytes()),
        Ok(None) | Err(_) => uid.to_string(),
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS.get(u).copied().unwrap_or("B"))
    }
}

fn age(launched: (i64, u32)) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let s = now.saturating_sub(launched.0).max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn table(list: &[Meta]) -> String {
    use std::fmt::Write as _;
    let rows: Vec<[String; 7]> = list
        .iter()
        .map(|m| {
            let state = if m.commits > 0 {
                format!(
                    "{} ({} commit{})",
                    m.state,
                    m.commits,
                    if m.commits == 1 { "" } else { "s" }
                )
            } else {
                m.state.to_string()
            };
            [
                printable(m.id.as_bytes()),
                owner_name(m.owner_uid),
                printable(m.profile.as_bytes()),
                state,
                human_bytes(m.bytes),
                age(m.launched),
                printable_path(&m.workspace),
            ]
        })
        .collect();
    let head = [
        "ID",
        "OWNER",
        "PROFILE",
        "STATE",
        "SIZE",
        "AGE",
        "WORKSPACE",
    ];
    let mut widths = head.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: [&str; 7]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(widths.iter()).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let _ = write!(s, "{c:<w$}  ");
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut out, head);
    for r in &rows {
        line(&mut out, r.each_ref().map(String::as_str));
    }
    if rows.is_empty() {
        out.push_str("(no transactions)\n");
    }
    out
}
