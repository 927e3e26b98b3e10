//! The profile file as written: serde types that mirror the TOML one to one, with the source
//! span of every value kept for error messages. Unknown keys are errors everywhere
//! (`deny_unknown_fields`): a misspelt key must fail, never be ignored, since an ignored
//! `raed = [...]` or `conect = [...]` would silently change what the agent may do.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::{Action, Mode, OnEventLoss, RunAs, ViolationKind, WorkspaceMode};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    pub agent: Spanned<RawAgent>,
    pub identity: Option<Spanned<RawIdentity>>,
    pub filesystem: Option<Spanned<RawFilesystem>>,
    pub network: Option<Spanned<RawNetwork>>,
    pub limits: Option<Spanned<RawLimits>>,
    pub breaker: Option<Spanned<RawBreaker>>,
    pub environment: Option<Spanned<RawEnvironment>>,
    pub workspace: Option<Spanned<RawWorkspace>>,
    pub ask: Option<Spanned<RawAsk>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub name: Spanned<String>,
    pub description: Option<Spanned<String>>,
    pub mode: Option<Spanned<Mode>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    pub run_as: Spanned<RunAs>,
    pub user: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFilesystem {
    #[serde(default)]
    pub read: Vec<Spanned<String>>,
    #[serde(default)]
    pub write: Vec<Spanned<String>>,
    #[serde(default)]
    pub exec: Vec<Spanned<String>>,
    #[serde(default)]
    pub canaries: Vec<Spanned<String>>,
    #[serde(default)]
    pub protect: Vec<Spanned<String>>,
    /// Spanned as a whole, so that errors about the list itself point at it.
    pub ask_exec: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNetwork {
    #[serde(default)]
    pub connect: Vec<Spanned<String>>,
    #[serde(default)]
    pub bind: Vec<Spanned<RawPort>>,
    #[serde(default)]
    pub unix: Vec<Spanned<String>>,
    /// Spanned as a whole, so that errors about the list itself point at it.
    pub ask: Option<Spanned<Vec<Spanned<String>>>>,
}

/// A bind entry: `8080` (TCP) or `"5353/udp"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawPort {
    Number(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawPort {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RawPort;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a port number (8080) or a string \"PORT/tcp\" or \"PORT/udp\"")
            }
            fn visit_i64<E>(self, v: i64) -> Result<RawPort, E> {
                Ok(RawPort::Number(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<RawPort, E> {
                Ok(RawPort::Text(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub pids: Option<Spanned<i64>>,
    pub memory: Option<Spanned<String>>,
    pub wall_time: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    pub trip_on: Option<Vec<Spanned<ViolationKind>>>,
    pub threshold: Option<Spanned<i64>>,
    pub window: Option<Spanned<String>>,
    pub action: Option<Spanned<Action>>,
    pub on_event_loss: Option<Spanned<OnEventLoss>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEnvironment {
    #[serde(default)]
    pub pass: Vec<Spanned<String>>,
    #[serde(default)]
    pub set: BTreeMap<Spanned<String>, Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorkspace {
    pub mode: Option<Spanned<WorkspaceMode>>,
    pub limit: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAsk {
    pub timeout: Option<Spanned<String>>,
    pub max_pending: Option<Spanned<i64>>,
    pub require_signature: Option<Spanned<bool>>,
}
