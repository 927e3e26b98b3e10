//! Profiles: what an agent may do.
//!
//! A profile goes through three stages, each a pure function testable without root:
//! 1. [`parse`]: TOML text -> [`schema::RawProfile`] (strict: unknown keys and wrong types
//!    are errors with line and column);
//! 2. validation: raw -> [`Profile`] (typed values; relative paths, bad CIDRs, contradictions
//!    are errors naming the key and saying what to write);
//! 3. [`compile`]: [`Profile`] + the launch context -> [`CompiledPolicy`], the exact
//!    Landlock rules, seccomp allow-list, BPF map entries, breaker rules and limits that the
//!    privileged code applies. Nothing downstream reads the profile itself.

mod builtin;
mod compile;
mod error;
mod schema;
mod syscalls;
mod validate;
mod values;

#[cfg(test)]
mod tests;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use builtin::{BUILTIN, builtin};
#[cfg(test)]
pub use compile::FsRule;
pub use compile::{
    AskPolicy, BreakerPolicy, CompileContext, CompiledPolicy, EnvPolicy, FsAccess, LandlockPolicy,
    NetEntry, SeccompPolicy, SocketFamily, compile,
};
pub use error::{LoadError, ProfileError, ProfileErrors};
pub use values::{BindRule, ConnectRule, NameRule, format_bytes, format_duration, parse_duration};

/// Where installed profiles live; a name given to `--profile` is looked up here first.
pub const SYSTEM_PROFILE_DIR: &str = "/etc/agentd/profiles";

/// A validated profile. Paths are still templates (`{workspace}`, `{home}`): they are
/// resolved by [`compile`], which knows the launch context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Profile {
    pub name: String,
    pub description: String,
    pub mode: Mode,
    pub identity: Identity,
    pub filesystem: Filesystem,
    pub network: Network,
    pub limits: Limits,
    pub breaker: Breaker,
    pub environment: Environment,
    pub workspace: Workspace,
    /// `[ask]`: how held calls wait for a person (defaults when the table is absent).
    pub ask: Ask,
}

/// `[ask]`: how a call held for a person (`network.ask`, `filesystem.ask_exec`) waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Ask {
    /// How long a held call waits for a decision; expiry denies it.
    #[serde(with = "values::duration")]
    pub timeout: Duration,
    /// Most calls of one agent held at once; beyond it a call is denied (and counted).
    pub max_pending: u32,
    /// Approvals (and denials) must carry an SSH signature of an allowed signer.
    pub require_signature: bool,
}

/// `ask.timeout` when the profile names none.
pub const DEFAULT_ASK_TIMEOUT: Duration = Duration::from_secs(60);
/// `ask.timeout` bounds.
pub const ASK_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(24 * 3600);
/// `ask.max_pending` when the profile names none.
pub const DEFAULT_ASK_MAX_PENDING: u32 = 4;
/// `ask.max_pending` bounds.
pub const ASK_MAX_PENDING_RANGE: std::ops::RangeInclusive<u32> = 1..=64;

impl Default for Ask {
    fn default() -> Ask {
        Ask {
            timeout: DEFAULT_ASK_TIMEOUT,
            max_pending: DEFAULT_ASK_MAX_PENDING,
            require_signature: false,
        }
    }
}

/// How the agent's writes reach its workspace (`[workspace]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkspaceMode {
    /// Writes land in the workspace at once.
    Direct,
    /// The agent writes to an overlay agentd keeps; a person commits or discards.
    Transaction,
    /// A transaction committed when the agent exits 0 without a trip, discarded when the
    /// breaker trips or the agent is killed.
    Auto,
}

/// `[workspace]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workspace {
    pub mode: WorkspaceMode,
    /// The most a transaction may hold (bytes of the files the agent changed); beyond it
    /// the agent's writes fail with ENOSPC.
    pub limit: u64,
}

/// A transaction's size limit when the profile names none.
pub const DEFAULT_TRANSACTION_LIMIT: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deny, count, and let the breaker act.
    Enforce,
    /// Allow, record and count: for writing profiles. Never kills.
    Monitor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunAs {
    /// The user who invoked agentd (`SUDO_UID`, or the peer of the daemon's socket).
    Invoker,
    /// A named system user (`identity.user`).
    User,
    /// A fresh uid/gid no other process uses, allocated per agent.
    Transient,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub run_as: RunAs,
    /// Set exactly when `run_as` is [`RunAs::User`].
    pub user: Option<String>,
}

/// A path as written in a profile: absolute, or under `{workspace}` or `{home}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PathTemplate {
    pub base: PathBase,
    /// Normalised remainder below the base, without a leading `/` (empty = the base itself).
    pub rest: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathBase {
    Root,
    Workspace,
    Home,
}

impl PathTemplate {
    /// Whether every path this template can name lies at or beneath what `outer` names:
    /// false when that cannot be known before the paths are resolved (different bases).
    pub fn surely_within(&self, outer: &PathTemplate) -> bool {
        self.base == outer.base && self.rest.starts_with(&outer.rest)
    }

    /// Whether this template may name a path at or beneath what `outer` names.
    pub fn maybe_within(&self, outer: &PathTemplate) -> bool {
        self.base != outer.base || self.rest.starts_with(&outer.rest)
    }

    pub fn resolve(&self, ctx: &CompileContext) -> PathBuf {
        let base: &Path = match self.base {
            PathBase::Root => Path::new("/"),
            PathBase::Workspace => &ctx.workspace,
            PathBase::Home => &ctx.home,
        };
        if self.rest.as_os_str().is_empty() {
            base.to_path_buf()
        } else {
            base.join(&self.rest)
        }
    }
}

impl std::fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let base = match self.base {
            PathBase::Root => "",
            PathBase::Workspace => "{workspace}",
            PathBase::Home => "{home}",
        };
        if self.rest.as_os_str().is_empty() {
            if base.is_empty() {
                f.write_str("/")
            } else {
                f.write_str(base)
            }
        } else {
            write!(f, "{base}/{}", self.rest.display())
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Filesystem {
    pub read: Vec<PathTemplate>,
    pub write: Vec<PathTemplate>,
    pub exec: Vec<PathTemplate>,
    pub canaries: Vec<PathTemplate>,
    /// Paths inside writable trees the agent may not change (BPF LSM).
    pub protect: Vec<PathTemplate>,
    /// Programs whose exec is held for a person's decision (`filesystem.ask_exec`).
    pub ask_exec: Vec<PathTemplate>,
    /// Grants marked optional (`"path?"`) wherever they are listed: they may not exist.
    pub optional: Vec<PathTemplate>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Network {
    /// Rules by address.
    pub connect: Vec<ConnectRule>,
    /// Rules by DNS name (`network.connect` entries that name a domain), sorted.
    pub names: Vec<NameRule>,
    pub bind: Vec<BindRule>,
    /// Pathname unix sockets outside the agent it may connect to (host services).
    pub unix: Vec<PathTemplate>,
    /// `network.ask` rules by address: a connect there is held for a person.
    pub ask: Vec<ConnectRule>,
    /// `network.ask` rules by DNS name, sorted.
    pub ask_names: Vec<NameRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub pids: Option<u32>,
    /// Bytes.
    pub memory: Option<u64>,
    #[serde(with = "values::duration_opt")]
    pub wall_time: Option<Duration>,
}

/// What the breaker counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ViolationKind {
    /// Opening a canary path, in any mode.
    Canary,
    /// Executing a program outside `filesystem.exec`.
    Exec,
    /// Connecting or sending outside `network.connect`.
    Connect,
    /// Binding outside `network.bind`.
    Bind,
    /// Writing outside `filesystem.write`.
    Write,
    /// Reading outside `filesystem.read`.
    Read,
    /// Creating a socket of a family or type the profile does not allow.
    Socket,
    /// A system call the seccomp filter refuses.
    Syscall,
    /// A DNS query for a name no `network.connect` rule allows (answered NXDOMAIN).
    Dns,
    /// A call held for a person (`network.ask`, `filesystem.ask_exec`) that ended refused:
    /// a person's denial, a wait past `ask.timeout`, or one beyond `ask.max_pending`.
    Denied,
}

impl ViolationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ViolationKind::Canary => "canary",
            ViolationKind::Exec => "exec",
            ViolationKind::Connect => "connect",
            ViolationKind::Bind => "bind",
            ViolationKind::Write => "write",
            ViolationKind::Read => "read",
            ViolationKind::Socket => "socket",
            ViolationKind::Syscall => "syscall",
            ViolationKind::Dns => "dns",
            ViolationKind::Denied => "denied",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Kill the agent's whole cgroup, then set its kill flag.
    Kill,
    /// Keep denying; report the trip but let the agent run.
    Deny,
}

/// What happens when the kernel could not report an event of the agent (the ring buffer
/// was full: the reader fell behind).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnEventLoss {
    /// Count the lost events against the agent and report them (`lost` events, `agentd
    /// ps`); the agent runs on.
    #[default]
    Report,
    /// Fail closed: the first lost event trips the breaker in the kernel (every process of
    /// the agent is killed at its next system call), and the trip is recorded.
    Kill,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Breaker {
    /// Violations that trip at the first occurrence.
    pub trip_on: Vec<ViolationKind>,
    /// Any other violations: trip when this many happen within `window`.
    pub threshold: Option<Threshold>,
    pub action: Action,
    /// Events the kernel could not report: counted and reported, or a kill.
    pub on_event_loss: OnEventLoss,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Threshold {
    pub count: u32,
    #[serde(with = "values::duration")]
    pub window: Duration,
}

/// Defaults of `[breaker]`: the violations that reveal an agent off its task.
pub const DEFAULT_TRIP_ON: [ViolationKind; 3] = [
    ViolationKind::Canary,
    ViolationKind::Exec,
    ViolationKind::Connect,
];

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Environment {
    /// Variables copied from agentd's environment when set there.
    pub pass: Vec<String>,
    /// Variables set to fixed values.
    pub set: Vec<(String, String)>,
}

/// Parses and validates profile text. `origin` names the source in errors.
pub fn parse(origin: &str, text: &str) -> Result<Profile, ProfileErrors> {
    validate::parse_and_validate(origin, text)
}

/// Whether `--profile SPEC` names a file (contains `/` or ends in `.toml`), not a name.
pub fn is_path(spec: &str) -> bool {
    spec.contains('/') || spec.ends_with(".toml")
}

/// Loads a profile given as `--profile`: a path (contains `/` or ends in `.toml`), else a
/// name looked up in [`SYSTEM_PROFILE_DIR`], then among the built-in profiles.
pub fn load(spec: &str) -> Result<(Profile, String), LoadError> {
    load_from(spec, Path::new(SYSTEM_PROFILE_DIR))
}

/// [`load`] with the system directory given (tests use a temporary one).
pub fn load_from(spec: &str, system_dir: &Path) -> Result<(Profile, String), LoadError> {
    let (origin, text) = source_from(spec, system_dir)?;
    let profile = parse(&origin, &text)?;
    Ok((profile, origin))
}

/// The text `--profile SPEC` names, and where it came from, as [`load`] finds it: a
/// daemon keeps it, so that a successor compiles the very profile an agent was launched
/// with whatever happened to the file since.
pub fn source(spec: &str) -> Result<(String, String), LoadError> {
    source_from(spec, Path::new(SYSTEM_PROFILE_DIR))
}

fn source_from(spec: &str, system_dir: &Path) -> Result<(String, String), LoadError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    if is_path(spec) {
        let path = Path::new(spec);
        return Ok((path.display().to_string(), read(path)?));
    }
    let installed = system_dir.join(format!("{spec}.toml"));
    if installed.exists() {
        return Ok((installed.display().to_string(), read(&installed)?));
    }
    match builtin(spec) {
        Some(text) => Ok((format!("builtin:{spec}"), text.to_owned())),
        None => Err(LoadError::UnknownName {
            name: spec.to_owned(),
            builtin: BUILTIN
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}
