//! Validated profile + launch context -> [`CompiledPolicy`]: every rule the privileged code
//! applies, resolved and merged. Pure: no I/O, no kernel; unit-tested without root.

use std::{
    collections::BTreeMap,
    net::Ipv6Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;

use super::{
    Action, BindRule, ConnectRule, Identity, Limits, Mode, NameRule, OnEventLoss, Profile,
    Threshold, ViolationKind, syscalls,
    values::{self, mapped_v6},
};

/// What `{workspace}` and `{home}` stand for in this launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileContext {
    /// Absolute; the agent's working directory.
    pub workspace: PathBuf,
    /// Absolute; the home directory of the user agentd runs the agent for.
    pub home: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompiledPolicy {
    pub name: String,
    pub mode: Mode,
    pub identity: Identity,
    pub workspace: PathBuf,
    /// What `{home}` was (the home of the user the agent runs for).
    pub home: PathBuf,
    pub landlock: LandlockPolicy,
    pub seccomp: SeccompPolicy,
    pub network: NetworkPolicy,
    /// Opening any of these, in any mode, is a breach.
    pub canaries: Vec<PathBuf>,
    /// Inside writable trees, read-only to the agent (and their ancestors pinned): needs
    /// BPF LSM; an agent whose policy has any is refused where the kernel lacks it.
    pub protect: Vec<PathBuf>,
    pub breaker: BreakerPolicy,
    pub limits: Limits,
    pub env: EnvPolicy,
    pub workspace_mode: crate::profile::Workspace,
    /// What is held for a person's decision, and how it waits; `None` without ask rules.
    pub ask: Option<AskPolicy>,
}

/// The calls held for a person (seccomp user notification: `connect` with network ask
/// rules, `execve` and `execveat` with ask_exec programs) and how they wait.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AskPolicy {
    /// `network.ask` rules by address.
    pub connect: Vec<ConnectRule>,
    /// `network.ask` rules by name, sorted: the agent's resolver answers for these names
    /// without admitting the addresses (a person does).
    pub names: Vec<NameRule>,
    /// `filesystem.ask_exec`, resolved and sorted; each has Landlock exec rights (unless a
    /// write rule covers it, see [`compile`]), so that an approved exec can run.
    pub exec: Vec<PathBuf>,
    /// How long a held call waits; expiry denies it.
    #[serde(with = "values::duration")]
    pub timeout: Duration,
    /// Most calls of the agent held at once; beyond it a call is denied.
    pub max_pending: u32,
    /// Decisions must carry an SSH signature of an allowed signer.
    pub require_signature: bool,
    /// The trees the agent may write, resolved: an `ask_exec` program found beneath one
    /// (after its symbolic links are followed, at launch) is refused, since the agent could
    /// change it after a person approved it.
    pub writable: Vec<PathBuf>,
}

/// Access granted beneath one path. Landlock rights, from the launch code's mapping:
/// read = READ_FILE | READ_DIR; write = WRITE_FILE | TRUNCATE | MAKE_REG | MAKE_DIR |
/// MAKE_SYM | MAKE_FIFO | MAKE_SOCK | REMOVE_FILE | REMOVE_DIR | REFER | IOCTL_DEV;
/// exec = EXECUTE | READ_FILE (a program must be read to be loaded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FsAccess {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FsRule {
    pub path: PathBuf,
    pub access: FsAccess,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LandlockPolicy {
    /// One rule per path, rights merged, sorted by path.
    pub rules: Vec<FsRule>,
    /// Rule paths the profile marks optional (`"path?"`): absent, they are not warned about.
    pub optional: Vec<PathBuf>,
    /// Signals only to processes of the agent's own Landlock domain (ABI 6).
    pub scope_signals: bool,
    /// Abstract unix sockets only within the agent's own domain (ABI 6).
    pub scope_abstract_unix: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeccompPolicy {
    /// Errno every call outside the allow-list gets.
    pub default_errno: &'static str,
    pub allow: Vec<&'static str>,
    /// (call, condition) pairs: allowed only when the condition holds.
    pub allow_if: Vec<(&'static str, &'static str)>,
    /// Answered with ENOSYS.
    pub enosys: Vec<&'static str>,
    /// Handed to the supervisor for a decision (seccomp user notification): `connect`
    /// with network ask rules, `execve` and `execveat` with ask_exec programs. Never also
    /// in `allow`.
    pub notify: Vec<&'static str>,
    /// Notable refusals and why.
    pub deny_notes: Vec<(&'static str, &'static str)>,
    /// The families `socket` may create (`socketpair`: AF_UNIX only), the same as
    /// `network.families`: the filter is the only layer that sees the families other than
    /// AF_INET and AF_INET6 (`cgroup/sock_create` never runs for them).
    pub socket_families: Vec<SocketFamily>,
}

/// Socket families an agent may create: decided by the seccomp filter (every family), and
/// again by `cgroup/sock_create` (AF_INET and AF_INET6, the only families the kernel runs
/// it for). Inet sockets are TCP or UDP only; raw and packet sockets are never allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SocketFamily {
    Unix,
    Inet,
    Inet6,
    /// NETLINK_ROUTE only: C libraries read interface addresses through it when resolving
    /// names (getaddrinfo with AI_ADDRCONFIG).
    NetlinkRoute,
}

/// One entry of the network allow LPM trie, before the agent's policy id is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct NetEntry {
    /// IPv6, IPv4 networks IPv4-mapped.
    pub addr: Ipv6Addr,
    /// Prefix length in IPv6 bits (an IPv4 /n is 96 + n).
    pub prefix: u8,
    pub proto: u8,
    /// 0 = any port.
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkPolicy {
    /// Rules by address: the trie entries below.
    pub connect: Vec<ConnectRule>,
    /// Rules by DNS name, sorted: the agent's DNS queries go to agentd's resolver, which
    /// admits the addresses of the names these allow for their TTL.
    pub names: Vec<NameRule>,
    pub bind: Vec<BindRule>,
    pub families: Vec<SocketFamily>,
    /// The `connect`/`sendmsg` allow-list as map entries.
    pub connect_entries: Vec<NetEntry>,
    /// Pathname unix sockets outside the agent it may connect to (BPF LSM decides).
    pub unix: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BreakerPolicy {
    /// `false` in monitor mode: count and report, never act.
    pub enforce: bool,
    pub trip_on: Vec<ViolationKind>,
    pub threshold: Option<Threshold>,
    pub action: Action,
    /// `report`: lost events are counted and reported; `kill`: the first one trips the
    /// agent (in the kernel, see `AGENT_FLAG_KILL_ON_LOSS`; recorded when user space
    /// reads the count). Only `report` in monitor mode (validation refuses `kill`).
    pub on_event_loss: OnEventLoss,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnvPolicy {
    pub pass: Vec<String>,
    pub set: Vec<(String, String)>,
}

pub fn compile(profile: &Profile, ctx: &CompileContext) -> CompiledPolicy {
    let fs = &profile.filesystem;
    let mut merged: BTreeMap<PathBuf, FsAccess> = BTreeMap::new();
    let mut grant = |paths: &[super::PathTemplate], f: fn(&mut FsAccess)| {
        for p in paths {
            f(merged.entry(p.resolve(ctx)).or_default());
        }
    };
    grant(&fs.read, |a| a.read = true);
    grant(&fs.write, |a| a.write = true);
    grant(&fs.exec, |a| a.exec = true);
    // An ask_exec program gets exec (and read) rights so that an approved exec can run;
    // the kernel kills an unapproved one at exec. Not where a write rule covers it
    // (validation refuses the cases it can see; `{home}` and `{workspace}` are only known
    // now): the agent could change the program after the approval, so it stays
    // unrunnable (fail closed).
    let mut ask_exec: Vec<PathBuf> = fs.ask_exec.iter().map(|p| p.resolve(ctx)).collect();
    ask_exec.sort();
    ask_exec.dedup();
    let writable: Vec<PathBuf> = merged
        .iter()
        .filter(|(_, a)| a.write)
        .map(|(p, _)| p.clone())
        .collect();
    for path in &ask_exec {
        if !writable.iter().any(|w| path.starts_with(w)) {
            merged.entry(path.clone()).or_default().exec = true;
        }
    }
    let rules = merged
        .into_iter()
        .map(|(path, access)| FsRule { path, access })
        .collect();

    let net = &profile.network;
    // TCP and UDP sockets for every agent: what they may reach is decided, address by
    // address, by the cgroup programs at connect, sendmsg and bind (and reported with the
    // address); a socket alone reaches nothing. NETLINK_ROUTE only with network rules.
    let mut families = vec![SocketFamily::Unix, SocketFamily::Inet, SocketFamily::Inet6];
    if !net.connect.is_empty()
        || !net.names.is_empty()
        || !net.bind.is_empty()
        || !net.ask.is_empty()
        || !net.ask_names.is_empty()
    {
        families.push(SocketFamily::NetlinkRoute);
    }
    let mut connect_entries: Vec<NetEntry> = net
        .connect
        .iter()
        .map(|r| {
            let (addr, prefix) = mapped_v6(r.net);
            NetEntry {
                addr,
                prefix,
                proto: r.proto.number(),
                port: r.port.unwrap_or(0),
            }
        })
        .collect();
    connect_entries.sort();
    let mut names = net.names.clone();
    names.sort();
    names.dedup();

    let mut canaries: Vec<PathBuf> = fs.canaries.iter().map(|p| p.resolve(ctx)).collect();
    canaries.sort();
    let mut protect: Vec<PathBuf> = fs.protect.iter().map(|p| p.resolve(ctx)).collect();
    protect.sort();
    let mut unix: Vec<PathBuf> = net.unix.iter().map(|p| p.resolve(ctx)).collect();
    unix.sort();
    unix.dedup();

    // Calls held for a person go to the supervisor (seccomp user notification) instead of
    // being allowed outright: a call in two lists of the filter is an error.
    let ask_network = !net.ask.is_empty() || !net.ask_names.is_empty();
    let mut notify: Vec<&'static str> = Vec::new();
    if ask_network {
        notify.push("connect");
    }
    if !ask_exec.is_empty() {
        notify.extend(["execve", "execveat"]);
    }
    let allow: Vec<&'static str> = syscalls::ALLOW
        .iter()
        .copied()
        .filter(|call| !notify.contains(call))
        .collect();
    let ask = (ask_network || !ask_exec.is_empty()).then(|| {
        let mut names = net.ask_names.clone();
        names.sort();
        names.dedup();
        AskPolicy {
            connect: net.ask.clone(),
            names,
            exec: ask_exec,
            timeout: profile.ask.timeout,
            max_pending: profile.ask.max_pending,
            require_signature: profile.ask.require_signature,
            writable: profile
                .filesystem
                .write
                .iter()
                .map(|w| w.resolve(ctx))
                .collect(),
        }
    });

    CompiledPolicy {
        name: profile.name.clone(),
        mode: profile.mode,
        identity: profile.identity.clone(),
        workspace: ctx.workspace.clone(),
        home: ctx.home.clone(),
        landlock: LandlockPolicy {
            rules,
            optional: fs.optional.iter().map(|p| p.resolve(ctx)).collect(),
            scope_signals: true,
            scope_abstract_unix: true,
        },
        seccomp: SeccompPolicy {
            default_errno: "EPERM",
            allow,
            allow_if: syscalls::ARG_RULES.to_vec(),
            enosys: syscalls::ENOSYS.to_vec(),
            notify,
            deny_notes: syscalls::DENY_NOTES.to_vec(),
            socket_families: families.clone(),
        },
        network: NetworkPolicy {
            connect: net.connect.clone(),
            names,
            bind: net.bind.clone(),
            families,
            connect_entries,
            unix,
        },
        canaries,
        protect,
        breaker: BreakerPolicy {
            enforce: profile.mode == Mode::Enforce,
            trip_on: profile.breaker.trip_on.clone(),
            threshold: profile.breaker.threshold,
            action: profile.breaker.action,
            on_event_loss: profile.breaker.on_event_loss,
        },
        limits: profile.limits.clone(),
        workspace_mode: profile.workspace.clone(),
        env: EnvPolicy {
            pass: profile.environment.pass.clone(),
            set: profile
                .environment
                .set
                .iter()
                .map(|(name, value)| (name.clone(), expand(value, ctx)))
                .collect(),
        },
        ask,
    }
}

/// An `environment.set` value with `{home}` and `{workspace}` replaced, wherever they are
/// (other braces are kept as they are).
fn expand(value: &str, ctx: &CompileContext) -> String {
    value
        .replace("{home}", &ctx.home.to_string_lossy())
        .replace("{workspace}", &ctx.workspace.to_string_lossy())
}

impl CompiledPolicy {
    /// The rule granting `access` to `path`, if any (Landlock semantics: a rule covers
    /// everything beneath its path).
    /// This policy with its rule and canary paths as the kernel finds them (symbolic
    /// links resolved, where they exist) added: what events, whose paths are resolved the
    /// same way, are matched against. Landlock opens rule paths, following links, so a
    /// rule for `/bin` is a rule for `/usr/bin` where one links to the other.
    ///
    /// Rules on paths that do not exist now are dropped: Landlock cannot open them, so the
    /// launch skipped them, and they grant nothing (a refusal beneath one is Landlock's).
    pub fn with_real_paths(&self) -> CompiledPolicy {
        let mut p = self.clone();
        p.landlock.rules.retain(|r| r.path.exists());
        let real = |path: &Path| std::fs::canonicalize(path).ok().filter(|r| r != path);
        let extra: Vec<FsRule> = p
            .landlock
            .rules
            .iter()
            .filter_map(|r| {
                real(&r.path).map(|path| FsRule {
                    path,
                    access: r.access,
                })
            })
            .collect();
        p.landlock.rules.extend(extra);
        let canaries: Vec<PathBuf> = p.canaries.iter().filter_map(|c| real(c)).collect();
        p.canaries.extend(canaries);
        let protect: Vec<PathBuf> = p.protect.iter().filter_map(|c| real(c)).collect();
        p.protect.extend(protect);
        p
    }

    pub fn fs_allows(&self, path: &Path, want: fn(&FsAccess) -> bool) -> bool {
        self.landlock
            .rules
            .iter()
            .any(|r| want(&r.access) && path.starts_with(&r.path))
    }
}
