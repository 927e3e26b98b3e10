//! The control protocol: JSON Lines over a Unix stream socket.
//!
//! A client sends one [`Request`] line (at most [`MAX_LINE`] bytes); `run` passes its
//! stdin, stdout and stderr with it (`SCM_RIGHTS`) and may then send [`ClientLine`]s (the
//! signals it receives). The daemon answers with [`Reply`] lines and closes the
//! connection when the request is done (`events --follow`: when the client goes).
//!
//! The daemon and its supervisors speak their own protocol ([`crate::link`]), framed the
//! same way: every line is decoded by [`decode`], size-limited, strict (unknown fields are
//! errors), never panicking on any input; a bad line gets an error reply and the daemon
//! goes on.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::event::Event;
#[cfg(test)]
use crate::link::DecodeError;
pub use crate::link::{MAX_LINE, decode, encode};

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Launch an agent; stdin, stdout and stderr come with the request.
    Run(RunRequest),
    /// The agents the daemon supervises. (Empty braces: a unit variant would accept any
    /// extra field.)
    Ps {},
    /// Events across agents: the recent ones, then (with `follow`) the live stream.
    Events {
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        agent: Option<String>,
        /// An event kind as in the events (`net_connect`, `file_write`, ...).
        #[serde(default)]
        kind: Option<String>,
    },
    /// The kill switch.
    Kill { id: String },
    /// `agentd diff|commit|discard|undo|transactions` for a caller who is not root.
    Transaction(crate::transaction::cmd::TxRequest),
    /// Counters.
    Stats {},
    /// Held calls waiting for a person: the pending ones, then (with `follow`) each new
    /// one and how each ends. A follower counts as someone to ask.
    Approvals {
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        agent: Option<String>,
    },
    /// Answers a held call: allow it (`scope`) or deny it. `signature`: an armored
    /// `ssh-keygen -Y sign -n agentd-approval` signature over the request's message.
    Decide {
        request: String,
        answer: crate::ask::Answer,
        #[serde(default)]
        signature: Option<String>,
    },
    /// Grants (approvals `--for` or `--session`) still in force.
    Grants {
        #[serde(default)]
        agent: Option<String>,
    },
    /// Ends a grant now.
    Revoke { grant: String },
    /// A supervisor the previous daemon handed over ([`crate::link::ToSupervisor::Handover`])
    /// reconnects: from root, from the supervisor's own pid. The connection then carries
    /// the supervisor protocol.
    Resume { agent: String },
    /// A `run` client whose daemon handed its agent over ([`Reply::Handover`]) follows it
    /// again: its exit status, prompts and signals.
    Reattach { agent: String },
    /// `agentd ui-url`: the web view's address with an access token for the caller.
    UiUrl {},
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    pub profile: String,
    /// Absolute.
    pub workspace: PathBuf,
    pub command: Vec<String>,
    /// The client's environment (the profile decides what reaches the agent).
    pub env: Vec<(String, String)>,
    /// Stream the agent's events back (`agentd run --events`).
    #[serde(default)]
    pub events: bool,
    /// The client's stdin is the slave side of a pseudo-terminal it relays: the agent's
    /// stdio and controlling terminal. Its stderr is for agentd's own messages.
    #[serde(default)]
    pub terminal: bool,
    /// `agentd run --transaction`: the workspace is a transaction.
    #[serde(default)]
    pub transaction: bool,
}

/// What a `run` client sends after its request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientLine {
    /// A signal the client received, to forward to the agent (as `agentd run` does).
    Signal(i32),
    /// Freeze (`true`) or thaw the agent's cgroup: the user suspended the agent's terminal
    /// (Ctrl-Z) or resumed it (`fg`).
    Freeze(bool),
    /// The person at the agent's terminal answered a request shown there
    /// ([`Reply::Prompt`]).
    Answer {
        request: String,
        answer: crate::ask::Answer,
    },
}

/// The daemon's answer lines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    /// The request was refused or failed; the connection ends.
    Error(String),
    Ok(String),
    /// `run`: the agent was launched.
    Started {
        agent: String,
    },
    /// `run`: the answer to [`ClientLine::Freeze`]: whether the agent's cgroup is frozen
    /// now.
    Frozen(bool),
    /// `run`: the agent ended; `code` is `agentd run`'s exit status.
    Exit {
        code: u8,
    },
    Event(Box<Event>),
    Agents(Vec<AgentRow>),
    Stats(Stats),
    /// A transaction command's output.
    Transaction(crate::transaction::cmd::Output),
    /// `approvals`: the pending requests; with `follow`, `Held` and `Settled` follow.
    Approvals(Vec<crate::ask::Request>),
    Held(crate::ask::Request),
    /// `run` with a terminal: show this request there; the answer comes back as
    /// [`ClientLine::Answer`].
    Prompt(crate::ask::Request),
    /// A request ended (`approvals --follow`; `run`: one shown on its terminal).
    Settled {
        request: String,
        outcome: String,
    },
    Grants(Vec<crate::ask::GrantRow>),
    /// `run`: the daemon is stopping for a successor; the agent keeps running. When the
    /// connection closes, reconnect within `grace_s` seconds with a `reattach` request.
    Handover {
        grace_s: u64,
    },
    /// `ui-url`: the web view's address with a token for the caller.
    UiUrl(UiUrl),
}

/// The web view's address for one user (`agentd ui-url`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UiUrl {
    /// `http://ADDR:PORT/?token=T`.
    pub url: String,
    /// The user the token acts as.
    pub uid: u32,
    /// When the token ends, RFC 3339 UTC.
    pub expires: String,
    /// Seconds it is valid from now.
    pub valid_s: u64,
}

/// One agent in `agentd ps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRow {
    pub id: String,
    pub profile: String,
    /// The agent's first process (0 until it runs).
    pub pid: u32,
    pub state: AgentState,
    pub uptime_s: u64,
    pub events: u64,
    pub denials: u64,
    /// Events of the agent the kernel could not report (ring buffer full); `Stats::lost`
    /// is the sum over every agent the daemon ran.
    #[serde(default)]
    pub lost: u64,
    pub cgroup: PathBuf,
    /// Who launched it.
    pub owner_uid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    Starting,
    Running,
    Tripped,
    Exited,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    pub agents_running: u64,
    pub agents_total: u64,
    pub events: u64,
    /// Over the last ten seconds.
    pub events_per_s: f64,
    /// Events the kernel could not report, counted as the daemon learns of them (each
    /// second), each also against its agent (`AgentRow::lost`).
    pub lost: u64,
    pub denials: u64,
    pub trips: u64,
    pub uptime_s: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::SupervisorLine;

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Request::Ps {},
            Request::Stats {},
            Request::Kill { id: "a-1".into() },
            Request::Transaction(crate::transaction::cmd::TxRequest::Diff {
                id: "a-1".into(),
                stat: true,
                json: false,
                paths: Vec::new(),
            }),
            Request::Transaction(crate::transaction::cmd::TxRequest::Transactions { json: true }),
            Request::Resume {
                agent: "a-1".into(),
            },
            Request::Reattach {
                agent: "a-1".into(),
            },
            Request::UiUrl {},
            Request::Events {
                follow: true,
                agent: Some("a-1".into()),
                kind: Some("net_connect".into()),
            },
            Request::Run(RunRequest {
                profile: "analyze-only".into(),
                workspace: "/w".into(),
                command: vec!["true".into()],
                env: vec![("PATH".into(), "/bin".into())],
                events: false,
                terminal: true,
                transaction: true,
            }),
        ];
        for r in reqs {
            let line = encode(&r);
            assert_eq!(line.last(), Some(&b'\n'));
            let back: Request = decode(&line[..line.len() - 1]).unwrap();
            assert_eq!(back, r);
        }
        let r: Request = decode(br#"{"op":"events"}"#).unwrap();
        assert_eq!(
            r,
            Request::Events {
                follow: false,
                agent: None,
                kind: None
            }
        );
    }

    #[test]
    fn bad_requests_are_errors() {
        for bad in [
            &b""[..],
            b"{",
            b"null",
            b"[]",
            b"{\"op\":\"launch\"}",
            b"{\"op\":\"ps\",\"extra\":1}",
            b"{\"op\":\"kill\"}",
            b"{\"op\":\"kill\",\"id\":7}",
            b"{\"op\":\"run\",\"profile\":\"p\"}",
            b"\xff\xfe",
        ] {
            assert!(decode::<Request>(bad).is_err(), "{bad:?}");
        }
        let long = vec![b' '; MAX_LINE + 1];
        assert_eq!(decode::<Request>(&long), Err(DecodeError::TooLong));
    }

    /// A deterministic xorshift generator: the fuzz cases are the same on every run, and a
    /// failure names its seed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Random bytes, and valid requests with random bytes changed, inserted or cut: the
    /// decoder answers each with a value or an error, never a panic.
    #[test]
    fn the_decoder_survives_hostile_input() {
        let valid: Vec<Vec<u8>> = [
            encode(&Request::Ps {}),
            encode(&Request::Kill { id: "x".into() }),
            encode(&Request::Transaction(
                crate::transaction::cmd::TxRequest::Commit {
                    id: "t-1".into(),
                    paths: vec!["src".into()],
                    json: false,
                },
            )),
            encode(&Request::Run(RunRequest {
                profile: "p".into(),
                workspace: "/w".into(),
                command: vec!["a".into(), "b".into()],
                env: vec![("K".into(), "V".into())],
                events: true,
                terminal: false,
                transaction: false,
            })),
            encode(&SupervisorLine::Attach {
                agent: "a".into(),
                cgroup: "/c".into(),
                uid: 1000,
                gid: 1000,
                workspace: "/w".into(),
                home: "/home/u".into(),
            }),
        ]
        .into_iter()
        .collect();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut decoded_ok = 0;
        for case in 0..20_000 {
            let mut line = if case % 4 == 0 {
                (0..rng.below(256)).map(|_| rng.next() as u8).collect()
            } else {
                valid[rng.below(valid.len())].clone()
            };
            for _ in 0..=rng.below(4) {
                if line.is_empty() {
                    break;
                }
                let i = rng.below(line.len());
                match rng.below(3) {
                    0 => line[i] = rng.next() as u8,
                    1 => {
                        const BITS: &[u8] = b"{}[]\",:\\0";
                        line.insert(i, BITS[rng.below(BITS.len())]);
                    }
                    _ => line.truncate(i),
                }
            }
            let ok = decode::<Request>(&line).is_ok();
            let _ = decode::<SupervisorLine>(&line);
            let _ = decode::<ClientLine>(&line);
            let _ = decode::<Reply>(&line);
            decoded_ok += usize::from(ok);
        }
        // Some mutations leave a valid request (a changed letter in a string value).
        assert!(decoded_ok > 0);
    }
}
