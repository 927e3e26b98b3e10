//! The launch plan: every decision `agentd run` makes before touching anything (agent id,
//! identity, policy, command, environment, cgroups and limits, Landlock rules, seccomp
//! filter). `--dry-run` prints it; a real run executes exactly it.

use std::{ffi::OsString, fmt::Write as _, path::PathBuf};

use serde::Serialize;

use super::RunError;
use crate::{
    host,
    profile::{
        self, CompileContext, CompiledPolicy, LoadError, Mode, OnEventLoss, WorkspaceMode,
        format_duration,
    },
    sandbox::{
        cgroup, command, env,
        identity::{self, Invoker, SystemUserDb},
        landlock, mountns, seccomp,
    },
};

#[derive(Debug, Serialize)]
pub struct Plan {
    pub agent_id: String,
    /// Where the profile came from (`builtin:analyze-only`, a path).
    pub profile: String,
    pub mode: Mode,
    pub workspace: PathBuf,
    pub command: command::Resolved,
    pub identity: identity::Resolved,
    pub cgroup: cgroup::Plan,
    pub landlock: landlock::Plan,
    pub seccomp: seccomp::Summary,
    pub env: Vec<env::Var>,
    /// How the agent's writes reach the workspace.
    pub workspace_mode: WorkspaceMode,
    /// The agent's own view of the filesystem (its mount namespace).
    pub view: mountns::ViewPlan,
    #[serde(skip)]
    pub policy: CompiledPolicy,
    #[serde(skip)]
    pub filter: seccomp::Filter,
    #[serde(skip)]
    pub argv: Vec<OsString>,
}

/// What `agentd run` was asked to do.
#[derive(Debug, Clone)]
pub struct Request {
    pub profile: String,
    pub workspace: Option<PathBuf>,
    pub command: Vec<OsString>,
    /// `--transaction`: the workspace is a transaction whatever the profile says (`auto`
    /// stays `auto`).
    pub transaction: bool,
}

/// The Landlock ABI that handles truncation (`LANDLOCK_ACCESS_FS_TRUNCATE`).
const TRUNCATE_ABI: i32 = 3;

/// `<profile name>-<8 hex digits from getrandom>`.
pub fn agent_id(profile_name: &str) -> String {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 4 {
        // Without randomness, time and pid still make a collision unlikely; the cgroup
        // mkdir refuses an existing id anyway.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        b = (t ^ std::process::id().rotate_left(16)).to_ne_bytes();
    }
    format!("{profile_name}-{:08x}", u32::from_ne_bytes(b))
}

/// One line for a profile that does not load: the first problem, and where to see all.
fn profile_error(spec: &str, e: &LoadError) -> String {
    match e {
        LoadError::Invalid(errs) => {
            let mut s = String::new();
            if let Some(first) = errs.0.first() {
                let _ = write!(s, "{}", first.origin);
                if let Some(l) = first.line {
                    let _ = write!(s, ":{l}");
                }
                let _ = write!(s, ": ");
                if let Some(k) = &first.key {
                    let _ = write!(s, "`{k}`: ");
                }
                let _ = write!(s, "{}", first.message);
                if let Some(h) = &first.hint {
                    let _ = write!(s, " (hint: {h})");
                }
            }
            if errs.0.len() > 1 {
                let _ = write!(
                    s,
                    "; {} more problems: see `agentd profile check {spec}`",
                    errs.0.len() - 1
                );
            }
            s
        }
        LoadError::Read { .. } | LoadError::UnknownName { .. } => e.to_string(),
    }
}

impl Plan {
    /// Builds the plan. Reads the profile, the password database, the mounts and the
    /// filesystem; writes nothing. On error, also returns the agent id when one was chosen.
    pub fn build(req: &Request) -> Result<Plan, (RunError, Option<String>)> {
        let (profile, origin) = profile::load(&req.profile)
            .map_err(|e| (RunError::Profile(profile_error(&req.profile, &e)), None))?;
        let agent_id = agent_id(&profile.name);
        let fail = |e: RunError| (e, Some(agent_id.clone()));

        let identity = identity::resolve(
            &profile.identity,
            &Invoker::current(),
            &agent_id,
            &SystemUserDb,
        )
        .map_err(|e| fail(e.into()))?;
        let workspace = host::workspace_dir(req.workspace.clone())
            .map_err(|e| fail(RunError::Workspace(format!("{e:#}"))))?;
        let mut policy = profile::compile(
            &profile,
            &CompileContext {
                workspace: workspace.clone(),
                home: identity.home.clone(),
            },
        );
        let env = env::build(&policy.env, |n| std::env::var_os(n), &identity, &agent_id);
        let command =
            command::resolve(&req.command, &env, &policy, &origin).map_err(|e| fail(e.into()))?;
        let cgroup =
            cgroup::plan_for_host(&agent_id, &policy.limits).map_err(|e| fail(e.into()))?;
        let landlock = landlock::plan(&policy.landlock);
        if landlock.kernel_abi < 1 {
            return Err(fail(
                landlock::LandlockError::Unavailable(landlock.kernel_abi).into(),
            ));
        }
        if landlock.kernel_abi < TRUNCATE_ABI {
            // Landlock checks truncation by path only from ABI 3: below it, truncate(2)
            // could shorten any file the agent's uid may write, inside its write scope or
            // not. ftruncate(2) stays: its fd was opened for writing, which Landlock checked.
            policy.seccomp.allow.retain(|name| *name != "truncate");
            policy.seccomp.deny_notes.push((
                "truncate",
                "truncation by path (Landlock checks it only from ABI 3; use ftruncate)",
            ));
        }
        let filter = seccomp::compile(&policy.seccomp).map_err(|e| fail(e.into()))?;
        let workspace_mode = match (req.transaction, policy.workspace_mode.mode) {
            (true, WorkspaceMode::Direct) => WorkspaceMode::Transaction,
            (_, mode) => mode,
        };
        let view = mountns::plan(
            &policy,
            (workspace_mode != WorkspaceMode::Direct).then_some(policy.workspace_mode.limit),
            &mountns::Host,
        );
        Ok(Plan {
            agent_id,
            profile: origin,
            mode: profile.mode,
            workspace,
            command,
            identity,
            cgroup,
            landlock,
            seccomp: filter.summary.clone(),
            env,
            workspace_mode,
            view,
            policy,
            filter,
            argv: req.command.clone(),
        })
    }

    /// The comm the kernel will show for the agent's first process: the program's file
    /// name, at most 15 bytes.
    pub fn comm(&self) -> String {
        let name = self
            .command
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        name.chars()
            .scan(0, |len, c| {
                *len += c.len_utf8();
                (*len <= 15).then_some(c)
            })
            .collect()
    }

    /// The plan as `--dry-run` prints it.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut line = |label: &str, value: String| {
            let _ = writeln!(s, "{label:<10} {value}");
        };
        line("agent", self.agent_id.clone());
        line(
            "profile",
            format!(
                "{} ({})",
                self.profile,
                format!("{:?}", self.mode).to_lowercase()
            ),
        );
        line(
            "command",
            format!(
                "{} -> {} (under filesystem.exec)",
                self.command.argv.join(" "),
                self.command.real_path.display()
            ),
        );
        line(
            "workspace",
            match self.workspace_mode {
                WorkspaceMode::Direct => {
                    format!("{} (direct: writes land at once)", self.workspace.display())
                }
                WorkspaceMode::Transaction => format!(
                    "{} (transaction: the agent writes to an overlay of at most {}; `agentd diff|commit|discard ID` after it ends)",
                    self.workspace.display(),
                    profile::format_bytes(self.policy.workspace_mode.limit)
                ),
                WorkspaceMode::Auto => format!(
                    "{} (auto: a transaction of at most {}, committed when the agent exits 0 without a trip, discarded when the breaker trips or it is killed)",
                    self.workspace.display(),
                    profile::format_bytes(self.policy.workspace_mode.limit)
                ),
            },
        );
        for (i, text) in self.view.describe().into_iter().enumerate() {
            line(if i == 0 { "view" } else { "" }, text);
        }
        let id = &self.identity;
        line(
            "identity",
            format!(
                "uid {} gid {} ({}, home {}): {}; no supplementary groups, no capabilities, no_new_privs",
                id.uid,
                id.gid,
                id.user,
                id.home.display(),
                id.how
            ),
        );
        line(
            "cgroup",
            format!(
                "{} (v2: joined before exec, killed with cgroup.kill)",
                self.cgroup.dir.display()
            ),
        );
        for d in &self.cgroup.v1_dirs {
            line("", format!("{} (v1, for limits)", d.display()));
        }
        let mut first = true;
        for l in &self.cgroup.limits {
            line(
                if first { "limits" } else { "" },
                format!(
                    "{} = {} -> {} ({})",
                    l.key,
                    l.shown,
                    l.file.display(),
                    match l.hierarchy {
                        cgroup::Hierarchy::V2 => "v2",
                        cgroup::Hierarchy::V1 => "v1",
                    }
                ),
            );
            first = false;
        }
        line(
            if first { "limits" } else { "" },
            match self.cgroup.wall_time {
                Some(d) => format!(
                    "limits.wall_time = {} (the supervisor kills the cgroup at the deadline)",
                    format_duration(d)
                ),
                None => "no wall-time limit".into(),
            },
        );
        let ll = &self.landlock;
        line(
            "landlock",
            format!(
                "kernel ABI {}, agentd targets ABI {}{}",
                ll.kernel_abi,
                ll.target_abi,
                if ll.missing.is_empty() {
                    ": fully enforced".to_owned()
                } else {
                    format!(": PARTIAL, the kernel lacks {}", ll.missing.join(", "))
                }
            ),
        );
        for r in &ll.rules {
            line(
                "",
                format!(
                    "{:<40} {:<16} {}",
                    r.path.display(),
                    r.access,
                    if r.exists {
                        r.rights.clone()
                    } else {
                        "(does not exist: skipped)".into()
                    }
                ),
            );
        }
        line(
            "",
            format!(
                "network: not Landlock's (the cgroup programs decide); scoped: {}",
                match (ll.scope_signals, ll.scope_abstract_unix) {
                    (true, true) => "signals, abstract unix sockets",
                    (true, false) => "signals",
                    (false, true) => "abstract unix sockets",
                    (false, false) => "nothing",
                }
            ),
        );
        let sc = &self.seccomp;
        line(
            "seccomp",
            format!(
                "{} calls allowed; {}; {} -> ENOSYS; {}everything else -> {} ({} BPF instructions)",
                sc.allowed,
                sc.allowed_if
                    .iter()
                    .map(|(n, c)| format!("{n} only if {c}"))
                    .collect::<Vec<_>>()
                    .join("; "),
                sc.enosys.join(", "),
                if sc.notify.is_empty() {
                    String::new()
                } else {
                    format!("{} -> agentd; ", sc.notify.join(", "))
                },
                sc.default_errno,
                sc.instructions
            ),
        );
        let mut first = true;
        for v in &self.env {
            let shown = match v.source {
                env::Source::Passed => format!("{} (from agentd's environment)", v.name),
                env::Source::Set | env::Source::Identity | env::Source::Agentd => {
                    format!("{}={}", v.name, v.value.to_string_lossy())
                }
            };
            line(if first { "env" } else { "" }, shown);
            first = false;
        }
        s
    }
}

/// What the kernel watch will enforce for the plan's agent, as `--dry-run` shows it: the
/// cgroup programs' network rules, the canaries, and what needs BPF LSM with whether the
/// kernel runs it (probed as `agentd doctor` does: a program is loaded and unloaded).
#[derive(Debug, Serialize)]
pub struct KernelPlan {
    /// Rules by address.
    pub connect: Vec<String>,
    /// Rules by DNS name.
    pub names: Vec<String>,
    /// Monitor mode: names no rule allows are resolved too (and reported).
    #[serde(skip)]
    pub monitor: bool,
    pub bind: Vec<String>,
    pub canaries: Vec<PathBuf>,
    pub protect: Vec<PathBuf>,
    pub unix: Vec<PathBuf>,
    pub bpf_lsm: BpfLsm,
    /// `breaker.on_event_loss`.
    pub on_event_loss: OnEventLoss,
    /// What is held for a person (the profile's ask rules), as `profile check` says it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ask: Option<String>,
}

/// Whether BPF LSM programs run here, as far as the dry run could tell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "why", rename_all = "snake_case")]
pub enum BpfLsm {
    Runs,
    /// They do not, and why.
    Absent(String),
    /// The probe needs root.
    Unknown(String),
}

impl KernelPlan {
    pub fn new(policy: &CompiledPolicy, bpf_lsm: BpfLsm) -> KernelPlan {
        KernelPlan {
            connect: policy
                .network
                .connect
                .iter()
                .map(|r| r.to_string())
                .collect(),
            names: policy.network.names.iter().map(|r| r.to_string()).collect(),
            ask: policy.ask.as_ref().map(crate::report::ask_line),
            monitor: policy.mode == Mode::Monitor,
            bind: policy.network.bind.iter().map(|r| r.to_string()).collect(),
            canaries: policy.canaries.clone(),
            protect: policy.protect.clone(),
            unix: policy.network.unix.clone(),
            bpf_lsm,
            on_event_loss: policy.breaker.on_event_loss,
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut line = |label: &str, value: String| {
            let _ = writeln!(s, "{label:<10} {value}");
        };
        let list = |v: &[String]| {
            if v.is_empty() {
                "nothing".to_owned()
            } else {
                v.join(", ")
            }
        };
        let paths = |v: &[PathBuf]| {
            v.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
        };
        let by_name = self.names.iter().map(|n| format!("{n} (by name)"));
        let connect: Vec<String> = self.connect.iter().cloned().chain(by_name).collect();
        line(
            "network",
            format!(
                "connect {}; bind {} (cgroup programs; anything else EPERM)",
                list(&connect),
                list(&self.bind)
            ),
        );
        if !self.names.is_empty() {
            line(
                "dns",
                format!(
                    "every DNS query of the agent (port 53, any address, UDP and TCP) is steered to agentd's resolver; addresses of allowed names admitted for their TTL (2 s .. 1 h); other names: {}",
                    if self.monitor {
                        "resolved and reported (monitor mode)"
                    } else {
                        "NXDOMAIN"
                    }
                ),
            );
        }
        if let Some(ask) = &self.ask {
            line("ask", ask.clone());
        }
        if !self.canaries.is_empty() {
            line("canaries", paths(&self.canaries).join(", "));
        }
        line(
            "event loss",
            match self.on_event_loss {
                OnEventLoss::Report => "events the kernel cannot report (ring buffer full) are counted against the agent and reported; it runs on (breaker.on_event_loss = \"report\")",
                OnEventLoss::Kill => "the first event the kernel cannot report (ring buffer full) trips the agent in the kernel: each of its processes is killed at its next system call (breaker.on_event_loss = \"kill\")",
            }
            .into(),
        );
        let unix = if self.unix.is_empty() {
            "its own sockets and unnamed ones it is handed, only".to_owned()
        } else {
            format!(
                "its own sockets, unnamed ones it is handed, and {}",
                paths(&self.unix).join(", ")
            )
        };
        match &self.bpf_lsm {
            BpfLsm::Unknown(why) => line(
                "bpf lsm",
                format!(
                    "cannot tell without root ({why}): run the dry run as root, or `agentd doctor`"
                ),
            ),
            BpfLsm::Runs => {
                line(
                    "bpf lsm",
                    "runs here: memfd exec and executable mappings of files the agent could write are refused".into(),
                );
                if !self.protect.is_empty() {
                    line(
                        "",
                        format!(
                            "protected (also by the read-only mounts of the agent's view): {}",
                            paths(&self.protect).join(", ")
                        ),
                    );
                }
                line("", format!("unix connects: {unix}"));
            }
            BpfLsm::Absent(why) => {
                line(
                    "bpf lsm",
                    format!(
                        "does not run here ({why}): memfd exec is killed at exec; the agent's view alone keeps protected paths read-only, its writable trees noexec, and host sockets under /run out of reach (but those network.unix lists)"
                    ),
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_plan(toml: &str, lsm: BpfLsm) -> KernelPlan {
        let p = profile::parse("t.toml", toml).unwrap();
        let policy = profile::compile(
            &p,
            &CompileContext {
                workspace: "/w".into(),
                home: "/h".into(),
            },
        );
        KernelPlan::new(&policy, lsm)
    }

    #[test]
    fn the_kernel_plan_says_what_bpf_lsm_decides_and_what_the_view_does_without_it() {
        let toml = "[agent]\nname = \"t\"\n[filesystem]\nwrite = [\"{workspace}\"]\nprotect = [\"{workspace}/.git/hooks\"]\n[network]\nconnect = [\"10.0.0.0/8:443\"]\nunix = [\"/run/docker.sock\"]\n";
        let k = kernel_plan(toml, BpfLsm::Runs);
        let text = k.render();
        assert!(text.contains("connect 10.0.0.0/8:443"), "{text}");
        assert!(!text.contains("dns"), "{text}");
        assert!(text.contains("bind nothing"), "{text}");
        assert!(text.contains("/w/.git/hooks"), "{text}");
        assert!(
            text.contains(
                "unix connects: its own sockets, unnamed ones it is handed, and /run/docker.sock"
            ),
            "{text}"
        );

        let k = kernel_plan(
            toml,
            BpfLsm::Absent("refused (EPERM at BPF_PROG_LOAD)".into()),
        );
        let text = k.render();
        assert!(
            text.contains("the agent's view alone keeps protected paths read-only"),
            "{text}"
        );
        assert!(!text.contains("REFUSED"), "{text}");
        // Without root the probe cannot tell, and it says so.
        let k = kernel_plan(toml, BpfLsm::Unknown("needs root".into()));
        assert!(k.render().contains("cannot tell without root"));
    }

    #[test]
    fn the_kernel_plan_shows_name_rules_and_how_they_are_enforced() {
        let toml = "[agent]\nname = \"t\"\n[network]\nconnect = [\"10.0.0.0/8:443\", \"api.example.com:443\", \"*.example.org:*/udp\"]\n";
        let k = kernel_plan(toml, BpfLsm::Runs);
        assert_eq!(k.connect, ["10.0.0.0/8:443/tcp"]);
        assert_eq!(k.names, ["api.example.com:443/tcp", "*.example.org:*/udp"]);
        let text = k.render();
        assert!(
            text.contains("connect 10.0.0.0/8:443/tcp, api.example.com:443/tcp (by name), *.example.org:*/udp (by name);"),
            "{text}"
        );
        assert!(text.contains("steered to agentd's resolver"), "{text}");
        assert!(text.contains("other names: NXDOMAIN"), "{text}");
        let json = serde_json::to_value(&k).unwrap();
        assert_eq!(json["names"][1], "*.example.org:*/udp");
        let monitor = toml.replace("name = \"t\"\n", "name = \"t\"\nmode = \"monitor\"\n");
        let text = kernel_plan(&monitor, BpfLsm::Runs).render();
        assert!(
            text.contains("other names: resolved and reported"),
            "{text}"
        );
    }

    #[test]
    fn agent_ids_are_profile_name_and_8_hex_digits() {
        let a = agent_id("analyze-only");
        let (name, hex) = a.rsplit_once('-').unwrap();
        assert_eq!(name, "analyze-only");
        assert_eq!(hex.len(), 8);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(agent_id("x"), agent_id("x"));
    }

    #[test]
    fn invalid_profiles_make_one_line() {
        let e = profile::parse("p.toml", "[agent]\nname = \"x\"\nbogus = 1\n[bad]\n").unwrap_err();
        let s = profile_error("p.toml", &LoadError::Invalid(e));
        assert!(!s.contains('\n'), "{s}");
        assert!(s.starts_with("p.toml:"), "{s}");
    }
}
