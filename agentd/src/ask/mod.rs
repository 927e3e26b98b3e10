//! Ask a person: calls a profile lists under `network.ask` or `filesystem.ask_exec` are
//! held in the kernel while someone decides.
//!
//! The seccomp filter routes `connect` (network ask rules) and `execve`/`execveat`
//! (`ask_exec`) to agentd over a user-notification listener ([`notify`]). For each call the
//! [`engine`] reads what the agent asked for out of its memory and decides at once:
//! - allowed outright (an address the profile or the agent's resolver allows, a program
//!   not on the ask list): the call continues and the kernel decides as for any agent;
//! - matching an ask rule: the call is **held** (the calling thread sleeps in the kernel)
//!   and a request is shown to whoever can answer: the agent's own terminal, the daemon's
//!   `agentd approvals --follow` subscribers. Nobody to ask, too many requests pending, no
//!   answer within `[ask] timeout`: denied.
//! - anything else continues, and the kernel refuses it as before (a `connect` violation).
//!
//! An approval is written to a kernel map **before** the call continues, and the kernel
//! then decides on what it really uses: the cgroup connect program on the address it
//! copied from the agent (an agent that swapped its sockaddr after agentd read it is
//! refused), the `sched_process_exec` hook on the file it loaded (a swapped program is
//! killed before its first instruction). So what the person approved is what happens.
//!
//! Requests and decisions are events (`ask`, `approval`) and, in the daemon, audit
//! records; a signed decision carries an SSH signature over [`message`] ([`sign`]).

pub mod engine;
pub mod maps;
pub mod notify;
pub mod sign;

use std::{
    fmt,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

/// What a held call asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum Target {
    /// A TCP connect or a UDP connect, to `addr` on `port`.
    Connect {
        addr: IpAddr,
        port: u16,
        /// "tcp" or "udp".
        proto: String,
        /// The name the agent's resolver answered with this address, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        domain: Option<String>,
    },
    /// An execve of the program at `path` (resolved in the agent's view, symbolic links
    /// followed).
    Exec {
        path: PathBuf,
        /// The path the agent gave, when it is another (a symbolic link, a relative path).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        named: Option<PathBuf>,
        /// The file's device (as stat gives it) and inode: what an approval is bound to.
        dev: u64,
        ino: u64,
        /// SHA-256 of the file when agentd read it, hex.
        sha256: String,
    },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Connect {
                addr,
                port,
                proto,
                domain,
            } => {
                let host = match addr {
                    IpAddr::V4(a) => a.to_string(),
                    IpAddr::V6(a) => format!("[{a}]"),
                };
                write!(f, "connect {proto} {host}:{port}")?;
                if let Some(d) = domain {
                    write!(f, " ({d})")?;
                }
                Ok(())
            }
            Target::Exec {
                path,
                named,
                sha256,
                ..
            } => {
                let short = sha256.get(..16).unwrap_or(sha256);
                write!(f, "exec {}", path.display())?;
                if let Some(n) = named {
                    write!(f, " (as {})", n.display())?;
                }
                write!(f, " (sha256 {short}…)")
            }
        }
    }
}

/// One process of the calling chain: the caller first, then its parents up to the
/// agent's first process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proc {
    pub pid: u32,
    /// Its command line, arguments joined by spaces (at most [`CMDLINE_MAX`] bytes).
    pub cmdline: String,
}

/// Longest command line a request shows.
pub const CMDLINE_MAX: usize = 512;

/// A held call waiting for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// `r-<agent>-<n>`.
    pub id: String,
    pub agent: String,
    pub profile: String,
    /// The thread whose call is held.
    pub tid: u32,
    /// The caller and its parents within the agent.
    pub chain: Vec<Proc>,
    pub target: Target,
    /// An exec's arguments as the agent passed them: shown, not bound to an approval
    /// (an approval lets the program run with any arguments).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    /// Wall clock when it was held, RFC 3339.
    pub since: String,
    /// Seconds it will wait for an answer in all; expiry is a denial.
    pub timeout_s: u64,
    /// Whether an approval must carry an SSH signature.
    pub require_signature: bool,
}

/// How long an approval lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// This call only: the next one is held again.
    Once,
    /// Calls to the same target for this many seconds.
    For(u64),
    /// Calls to the same target until the agent ends.
    Session,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Once => f.write_str("once"),
            Scope::For(s) => write!(f, "for {s}s"),
            Scope::Session => f.write_str("session"),
        }
    }
}

impl Scope {
    /// `--for 10m`: at most a day (a standing permission belongs in the profile).
    pub const MAX_FOR: Duration = Duration::from_secs(24 * 3600);
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "answer", deny_unknown_fields)]
pub enum Answer {
    Allow {
        scope: Scope,
    },
    Deny {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

impl Answer {
    fn word(&self) -> &'static str {
        match self {
            Answer::Allow { .. } => "allow",
            Answer::Deny { .. } => "deny",
        }
    }
}

/// Who answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decider {
    pub uid: u32,
    pub pid: u32,
    /// How: "terminal", "agentd approve", "timeout", "no one to ask", "pending cap".
    pub via: String,
    /// A decision made in the web view: its session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web: Option<WebSession>,
}

/// A web view session, as the audit log names it: the fingerprint of the token that
/// opened it (its `ui_token` record's) and the address the request came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSession {
    /// 8 hex digits: the start of the token's SHA-256.
    pub token: String,
    pub peer: String,
}

/// A signature over [`message`] (`ssh-keygen -Y sign -n agentd-approval`), as sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// The armored `-----BEGIN SSH SIGNATURE-----` text.
    pub armored: String,
}

/// A decision, as it reaches the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub answer: Answer,
    pub by: Decider,
    /// Checked against the allowed signers, when the request needs it.
    pub signed: Option<sign::Verified>,
    pub signature: Option<Signature>,
}

/// The exact text an approver signs for `answer` to `request`. It names the request, the
/// agent, what is approved and for how long, so a signature cannot be replayed for
/// another request or stretched to another scope.
pub fn message(request: &Request, answer: &Answer) -> String {
    let scope = match answer {
        Answer::Allow { scope } => scope.to_string(),
        Answer::Deny { .. } => "-".to_owned(),
    };
    format!(
        "agentd-approval v1\nrequest: {}\nagent: {}\nprofile: {}\nwhat: {}\ndecision: {}\nscope: {scope}\n",
        printable(&request.id),
        printable(&request.agent),
        printable(&request.profile),
        printable(&request.target.to_string()),
        answer.word(),
    )
}

/// `text` with control and format characters escaped (`\u{a}`): a path or name the agent
/// chose cannot add lines to the text a person signs, nor act on a terminal it is shown on.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() || is_format(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Characters that reorder or hide text (bidirectional controls, zero-width and other
/// format characters, tags): a path could otherwise read differently from what it is.
fn is_format(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x061C | 0x180E | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064
        | 0x2066..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB | 0xE0000..=0xE007F)
}

/// Seconds since the epoch, for grant expiries shown to people.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A grant: an approval that outlives its call (`--for`, `--session`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRow {
    /// `g-<agent>-<n>`.
    pub id: String,
    pub agent: String,
    pub target: Target,
    pub scope: Scope,
    /// Unix seconds it ends at; None: when the agent ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    /// The request it came from.
    pub request: String,
    pub by: Decider,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            id: "r-ab12-3".into(),
            agent: "ab12".into(),
            profile: "analyze-only".into(),
            tid: 7,
            chain: vec![],
            argv: vec![],
            target: Target::Connect {
                addr: "93.184.216.34".parse().unwrap(),
                port: 443,
                proto: "tcp".into(),
                domain: Some("forum.example.com".into()),
            },
            since: "2026-12-07T00:00:00Z".into(),
            timeout_s: 60,
            require_signature: true,
        }
    }

    #[test]
    fn the_signed_message_names_request_target_decision_and_scope() {
        let m = message(
            &request(),
            &Answer::Allow {
                scope: Scope::For(600),
            },
        );
        assert_eq!(
            m,
            "agentd-approval v1\nrequest: r-ab12-3\nagent: ab12\nprofile: analyze-only\n\
             what: connect tcp 93.184.216.34:443 (forum.example.com)\ndecision: allow\n\
             scope: for 600s\n"
        );
        let d = message(&request(), &Answer::Deny { reason: None });
        assert!(d.ends_with("decision: deny\nscope: -\n"), "{d}");
        assert_ne!(
            message(&request(), &Answer::Allow { scope: Scope::Once }),
            message(
                &request(),
                &Answer::Allow {
                    scope: Scope::Session
                }
            )
        );
    }

    #[test]
    fn agent_chosen_text_cannot_add_lines() {
        let mut r = request();
        r.target = Target::Exec {
            path: "/tmp/x\ndecision: allow".into(),
            named: None,
            dev: 1,
            ino: 2,
            sha256: "ab".into(),
        };
        let m = message(&r, &Answer::Deny { reason: None });
        assert_eq!(
            m.lines().filter(|l| l.starts_with("decision:")).count(),
            1,
            "{m}"
        );
        assert!(m.contains("/tmp/x\\u{a}decision: allow"), "{m}");
    }

    #[test]
    fn v6_targets_are_bracketed() {
        let t = Target::Connect {
            addr: "::1".parse().unwrap(),
            port: 8080,
            proto: "tcp".into(),
            domain: None,
        };
        assert_eq!(t.to_string(), "connect tcp [::1]:8080");
    }
}
