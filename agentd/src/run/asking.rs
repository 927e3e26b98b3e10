//! Asking on the agent's own terminal: the [`Front`] of the embedded `agentd run`, and the
//! prompt a daemon's `run` client shows for the daemon.
//!
//! A request is shown as a prompt on the terminal agentd relays for the agent (see
//! [`terminal::Prompter`]): while it is shown the agent's output waits and the person's
//! keys answer it (y once, t ten minutes, s this session, n deny), never reaching the
//! agent. Without a terminal nobody can be asked: the engine denies at once.

use std::sync::Arc;

use super::terminal::{PromptKey, Prompter};
use crate::ask::{
    Answer, Decider, Decision, Request, Scope,
    engine::{Board, Front, Settled, outcome_note},
};

/// How long `t` allows.
pub const TEN_MINUTES: u64 = 600;

/// The answer a key stands for.
pub fn answer_of(key: PromptKey) -> Answer {
    match key {
        PromptKey::Once => Answer::Allow { scope: Scope::Once },
        PromptKey::TenMinutes => Answer::Allow {
            scope: Scope::For(TEN_MINUTES),
        },
        PromptKey::Session => Answer::Allow {
            scope: Scope::Session,
        },
        PromptKey::Deny => Answer::Deny {
            reason: Some("denied at the agent's terminal".into()),
        },
    }
}

/// The prompt's text: who asks for what.
pub fn prompt_text(r: &Request) -> String {
    let caller = r
        .chain
        .first()
        .map_or_else(String::new, |p| format!(" (pid {}: {})", p.pid, p.cmdline));
    let mut text = format!(
        "agent {} [{}]{caller} wants: {}; denied in {} s without an answer",
        r.agent, r.profile, r.target, r.timeout_s
    );
    if r.require_signature {
        text.push_str(&format!(
            ". Approving needs a signature: `agentd approve {} --sign KEY` (n here denies)",
            r.id
        ));
    }
    text
}

/// The invoking user, who answers at the terminal (`SUDO_UID` under sudo).
pub fn invoking_uid() -> u32 {
    std::env::var("SUDO_UID")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| nix::unistd::getuid().as_raw())
}

/// The embedded `agentd run`'s front: the agent's terminal, when it has one.
pub struct TerminalFront {
    pub prompter: Option<Prompter>,
    pub board: Arc<Board>,
}

impl std::fmt::Debug for TerminalFront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TerminalFront")
            .field("terminal", &self.prompter.is_some())
            .finish_non_exhaustive()
    }
}

impl Front for TerminalFront {
    fn can_ask(&self, _agent: &str) -> bool {
        self.prompter.is_some()
    }

    fn show(&self, request: &Request) {
        let Some(p) = &self.prompter else {
            return;
        };
        let key = p.ask(request.id.clone(), prompt_text(request));
        let board = Arc::clone(&self.board);
        let id = request.id.clone();
        let prompter = p.clone();
        tokio::spawn(async move {
            // A closed channel: the relay stopped; the request times out.
            let Ok(key) = key.await else {
                return;
            };
            let decision = Decision {
                answer: answer_of(key),
                by: Decider {
                    uid: invoking_uid(),
                    pid: std::process::id(),
                    via: "terminal".into(),
                    web: None,
                },
                signed: None,
                signature: None,
            };
            if let Err(e) = board.decide(&id, decision) {
                prompter.cancel(&id, &e.to_string());
            }
        });
    }

    fn settled(&self, request: &Request, settled: &Settled) {
        if let Some(p) = &self.prompter {
            p.cancel(&request.id, &outcome_note(settled));
        }
    }
}
