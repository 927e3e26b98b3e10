//! The workspace as a transaction, from `agentd run`'s side: the record made before launch,
//! the upper layer persisted when the last of the agent's processes is gone, and `auto`'s
//! commit or discard. The store itself (diff, commit, undo) is [`crate::transaction`].

use std::{
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use super::plan::Plan;
use crate::{
    profile::WorkspaceMode,
    sandbox::identity::Invoker,
    transaction::{self, Meta, Mode, State, Store, Transaction, TxError},
};

/// The transaction of a running agent, with its upper tmpfs.
#[derive(Debug)]
pub struct Open {
    tx: Transaction,
    mode: Mode,
    upper: OwnedFd,
    /// A `limit` event was sent for the tmpfs filling up.
    pub full_reported: bool,
}

/// Creates the transaction record of `plan`'s agent (`None` in direct mode). Transactions
/// a dead supervisor left behind are removed first (nothing of them was persisted).
pub fn begin(plan: &Plan, state_dir: &Path) -> Result<Option<Transaction>, TxError> {
    let mode = match plan.workspace_mode {
        WorkspaceMode::Direct => return Ok(None),
        WorkspaceMode::Transaction => Mode::Transaction,
        WorkspaceMode::Auto => Mode::Auto,
    };
    let store = Store::open(state_dir)?;
    match store.reap_stale() {
        Ok(gone) => {
            for id in gone {
                eprintln!(
                    "agentd: removed transaction {id}: its supervisor ended before the agent's changes were kept"
                );
            }
        }
        Err(e) => eprintln!("agentd: warning: transactions: {e}"),
    }
    let invoker = Invoker::current();
    let owner = invoker
        .sudo_uid
        .as_deref()
        .and_then(|u| u.parse().ok())
        .unwrap_or(invoker.uid);
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)
        .map(|t| (t.tv_sec(), u32::try_from(t.tv_nsec()).unwrap_or(0)))
        .unwrap_or((0, 0));
    let meta = Meta {
        id: plan.agent_id.clone(),
        owner_uid: owner,
        profile: plan.profile.clone(),
        workspace: plan.workspace.clone(),
        mode,
        limit_bytes: plan.policy.workspace_mode.limit,
        launched: now,
        supervisor_pid: i32::try_from(std::process::id()).unwrap_or(0),
        state: State::Running,
        exit: None,
        bytes: 0,
        commits: 0,
        protect: plan
            .policy
            .protect
            .iter()
            .filter_map(|p| p.strip_prefix(&plan.workspace).ok())
            .filter(|p| !p.as_os_str().is_empty())
            .map(std::path::Path::to_path_buf)
            .collect(),
        workspace_id: std::fs::metadata(&plan.workspace)
            .ok()
            .map(|m| (m.dev(), m.ino())),
    };
    store.create(meta).map(Some)
}

impl Open {
    pub fn new(tx: Transaction, upper: OwnedFd) -> Open {
        let mode = tx.meta().mode;
        Open {
            tx,
            mode,
            upper,
            full_reported: false,
        }
    }

    pub fn upper(&self) -> &OwnedFd {
        &self.upper
    }
}

/// A transaction whose agent has not started yet: dropped, it is removed (a launch that
/// fails leaves no record behind).
#[derive(Debug)]
pub struct Guard(Option<Open>);

impl Guard {
    pub fn new(open: Open) -> Guard {
        Guard(Some(open))
    }

    pub fn none() -> Guard {
        Guard(None)
    }

    /// The agent runs: the transaction is the supervisor's to end.
    pub fn release(mut self) -> Option<Open> {
        self.0.take()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(open) = self.0.take()
            && let Err(e) = open.tx.discard()
        {
            eprintln!("agentd: removing the transaction: {e}");
        }
    }
}

/// How the agent ended, as the transaction's end needs it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub exit_code: u8,
    /// The breaker tripped, or the kill switch or a limit killed it.
    pub stopped: bool,
    /// Its cgroup was emptied and removed: no process of it can still write.
    pub emptied: bool,
    /// For the record: `exit 0`, `tripped: ...`.
    pub describe: String,
}

/// What became of the transaction.
#[derive(Debug)]
pub struct Ended {
    pub id: String,
    pub state: &'static str,
    pub files: usize,
    pub bytes: u64,
    pub conflicts: Vec<PathBuf>,
    /// For a person: the `--stat` summary and what to do next (pending only).
    pub text: String,
    pub error: Option<String>,
}

/// Persists the upper layer (the agent has no process left), then: `auto` commits when it
/// exited 0 and was not stopped, discards when it was stopped; otherwise the transaction
/// waits for a person.
pub fn end(open: Open, outcome: &Outcome) -> Ended {
    let Open {
        mut tx,
        mode,
        upper,
        ..
    } = open;
    let id = tx.meta().id.clone();
    let failed = |state: &'static str, e: String| Ended {
        id: id.clone(),
        state,
        files: 0,
        bytes: 0,
        conflicts: Vec::new(),
        text: String::new(),
        error: Some(e),
    };
    let layer = PathBuf::from(format!(
        "/proc/self/fd/{}/{}",
        upper.as_raw_fd(),
        crate::sandbox::mountns::UPPER
    ));
    if let Err(e) = tx.persist(&layer, &outcome.describe) {
        // Nothing of it can be kept: the record goes too (the workspace is untouched).
        let removed = match tx.discard() {
            Ok(()) => String::new(),
            Err(d) => format!(" (and removing its record: {d})"),
        };
        return failed(
            "failed",
            format!(
                "the agent's changes could not be kept, the workspace is as it was: {e}{removed}"
            ),
        );
    }
    drop(upper);
    let bytes = tx.meta().bytes;
    let changes = match tx.changes(&[]) {
        Ok(c) => c,
        Err(e) => return failed("pending", format!("reading the agent's changes: {e}")),
    };
    let files = changes.len();
    let ended = |state, conflicts, text| Ended {
        id: id.clone(),
        state,
        files,
        bytes,
        conflicts,
        text,
        error: None,
    };
    if mode == Mode::Auto && outcome.stopped {
        return match tx.discard() {
            Ok(()) => ended("discarded", Vec::new(), String::new()),
            Err(e) => failed("pending", format!("discarding: {e}")),
        };
    }
    if mode == Mode::Auto && outcome.exit_code == 0 && outcome.emptied {
        return match tx.commit(&[]) {
            Ok(report) => {
                let conflicts = report.conflict_paths();
                if conflicts.is_empty() {
                    ended("committed", conflicts, String::new())
                } else {
                    let text = pending_text(&id, &changes, &conflicts);
                    ended("pending", conflicts, text)
                }
            }
            Err(e) => failed("pending", format!("committing: {e}")),
        };
    }
    let text = pending_text(&id, &changes, &[]);
    ended("pending", Vec::new(), text)
}

fn pending_text(id: &str, changes: &[transaction::Change], conflicts: &[PathBuf]) -> String {
    let mut s =
        format!("agentd: the agent's changes to the workspace are held in transaction {id}:\n");
    if changes.is_empty() {
        s.push_str("  (no changes)\n");
    } else {
        for line in transaction::render_stat(changes).lines() {
            s.push_str("  ");
            s.push_str(line);
            s.push('\n');
        }
    }
    if !conflicts.is_empty() {
        s.push_str(&format!(
            "  {} changed in the workspace since launch, left uncommitted:\n",
            conflicts.len()
        ));
        for c in conflicts {
            s.push_str(&format!(
                "    {}\n",
                transaction::printable(c.as_os_str().as_encoded_bytes())
            ));
        }
    }
    s.push_str(&format!(
        "  sudo agentd diff {id}      see them\n  sudo agentd commit {id}    apply them to the workspace\n  sudo agentd discard {id}   drop them\n"
    ));
    s
}
