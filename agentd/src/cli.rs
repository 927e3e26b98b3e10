//! Command-line interface: argument parsing and dispatch. Each command returns the process
//! exit code; `main` adds nothing but error printing.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::{
    doctor, host,
    profile::{self, CompileContext, CompiledPolicy, LoadError, ProfileError},
    report,
};

/// Exit status of `profile check` when a profile is invalid, and of any command given bad
/// input.
const EXIT_INVALID: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "agentd",
    version,
    about = "Sandbox AI agents: the kernel, not the agent, decides what it may do",
    long_about = "agentd launches AI agents under Landlock and seccomp, in a cgroup of their own, \
with an identity and capabilities of their own; eBPF programs enforce each agent's network \
scope and report its file writes, execs and processes; a circuit breaker kills an agent \
that steps out of scope.\n\n\
Start with `agentd doctor` to see what this host can enforce, and \
`agentd profile check analyze-only` to see what a profile compiles to. The manuals named \
docs/NAME.md below are in the source tree, and in /usr/share/doc/agentd/ where the package \
is installed.",
    after_help = "Examples:\n  \
agentd doctor                              what this host offers\n  \
agentd profile list                        the built-in profiles\n  \
agentd profile check profiles/*.toml       validate profiles, print the compiled policy\n  \
sudo agentd run -- python3 agent.py        run an agent under the analyze-only profile"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Probe this host: Landlock, seccomp, BPF program types, cgroups, mounts
    ///
    /// Every line comes from a probe (a program loaded, a syscall made), not from reading
    /// configuration. Exits 1 when something agentd needs for enforcement is missing.
    Doctor {
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Kill an agent now: the manual kill switch
    ///
    /// Asks the agent's supervisor to stop it the way the breaker does (every process of its
    /// cgroup, then the kill flag: no more network, SIGKILL at the next syscall), and kills
    /// the cgroup directly if the supervisor does not answer within 3 s. ID is the `agent`
    /// field of the agent's events (e.g. `analyze-only-1a2b3c4d`). Two SIGINTs to `agentd
    /// run` within 2 s do the same (Ctrl-C twice, when the agent has no terminal of its
    /// own; with one, Ctrl-C is the agent's). Root only.
    Kill {
        #[arg(value_name = "ID")]
        id: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Run the privileged service: one eBPF watch for many agents, a control socket
    ///
    /// Loads and attaches the BPF programs once, serves `agentd run`, `ps`, `events`,
    /// `kill` and `stats` on a Unix socket (peer credentials checked: root and members of
    /// --group may launch and watch; only root and an agent's owner may kill it), runs a
    /// breaker per agent, and appends every event and control action to a hash-chained
    /// audit log. Runs until SIGTERM, which hands the agents it supervises over to the
    /// next daemon (`systemctl restart`: they keep running, enforced throughout; with
    /// no daemon within --handover-grace they are killed), or SIGINT, which kills them.
    /// If it dies, each agent's supervisor kills its agent, and the next daemon reaps
    /// what is left (docs/daemon.md). A systemd unit is in dist/agentd.service.
    #[command(after_help = "Examples:\n  \
sudo agentd daemon\n  \
sudo agentd daemon --socket /tmp/a.sock --state-dir /tmp/a --audit-log /tmp/a/audit.jsonl\n  \
sudo agentd daemon --metrics 9464 --ui 8080 --syslog unix:/dev/log --syslog-severity warning")]
    Daemon {
        /// The control socket
        #[arg(long, value_name = "PATH", default_value = crate::daemon::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Where the daemon records running agents (to reap them after a crash)
        #[arg(long, value_name = "DIR", default_value = crate::daemon::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// The append-only, hash-chained audit log (`agentd audit verify PATH`)
        #[arg(long, value_name = "PATH", default_value = crate::daemon::DEFAULT_AUDIT_LOG)]
        audit_log: PathBuf,
        /// Members of this group may launch and watch agents (root always may)
        #[arg(long, value_name = "NAME", default_value = crate::daemon::DEFAULT_GROUP)]
        group: String,
        /// Where the agents' resolver asks for the names their profiles allow (default:
        /// the first nameserver of /etc/resolv.conf)
        #[arg(long, value_name = "ADDR:PORT")]
        dns_upstream: Option<std::net::SocketAddr>,
        /// Members of this group may answer any agent's held calls (root and each
        /// agent's owner always may; no process inside an agent ever may)
        #[arg(long, value_name = "NAME")]
        approvers: Option<String>,
        /// The keys approvals may be signed with, in ssh-keygen's ALLOWED SIGNERS format
        /// (needed by profiles that set `[ask] require_signature`)
        #[arg(long, value_name = "PATH", default_value = crate::daemon::DEFAULT_ALLOWED_SIGNERS)]
        allowed_signers: PathBuf,
        /// After SIGTERM, how long the agents wait for the next daemon to take them over
        /// before their supervisors kill them; 0: SIGTERM kills them, as SIGINT does
        #[arg(long, value_name = "SECONDS", default_value_t = 30,
              value_parser = clap::value_parser!(u64).range(0..=3600))]
        handover_grace: u64,
        // Boxed: the outputs' options would make this variant much larger than the others.
        #[command(flatten)]
        outputs: Box<crate::daemon::Outputs>,
    },
    /// List the agents a daemon supervises
    ///
    /// Columns: id, profile, first process, state (starting, running, tripped, exited),
    /// uptime, events, denials, lost, owner uid (for a root launch, the user SUDO_UID
    /// names), cgroup. Events are the agent's in `agentd events` (the breaker's records
    /// among them; a folded record counts its `repeated`), denials those with verdict deny
    /// or killed, counted as `agentd stats` and the metrics count them.
    Ps {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Show events across a daemon's agents: the recent ones, then (--follow) live
    ///
    /// On a terminal each event is one line, refusals in red and breaker trips in bold.
    #[command(after_help = "Examples:\n  \
agentd events --follow                         everything, live\n  \
agentd events --follow --agent coding-agent-1a2b3c4d --kind net_connect\n  \
agentd events --json | jq 'select(.verdict == \"deny\")'")]
    Events {
        /// Keep streaming until interrupted
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only this agent's events
        #[arg(long, value_name = "ID")]
        agent: Option<String>,
        /// Only events of this kind (file_write, net_connect, exec, breaker, ...)
        #[arg(long, value_name = "KIND", value_parser = parse_kind_name)]
        kind: Option<String>,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// A daemon's counters: agents, events and events/s, lost events, denials, trips
    Stats {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Print the address of the daemon's live web view, with an access token for you
    ///
    /// The daemon must run with `--ui [ADDR:]PORT` (e.g. `agentd daemon --ui 8080`: on
    /// loopback). It answers root and members of its --group, never a process inside an
    /// agent, with `http://ADDR:PORT/?token=T`: open that in a browser on this host (from
    /// another, through `ssh -L PORT:127.0.0.1:PORT HOST`). The page lists the agents,
    /// streams their events live (refusals and breaker trips stand out), shows an agent's
    /// compiled profile, answers held calls and has the kill switch.
    ///
    /// The token acts as you (your uid and groups as the daemon saw them now): everything
    /// done through the page is checked and audited as the same command would be. It opens
    /// one session, in the first browser that uses it, lasting 12 hours from now or until
    /// the daemon stops; each call makes a new one. Keep it and the session's cookie
    /// secret: whoever has them may do what you may. See docs/ui.md.
    #[command(after_help = "Examples:\n  \
agentd ui-url                          the URL, on stdout\n  \
agentd ui-url --json                   {url, uid, expires, valid_s}\n\n\
Paste the URL into the browser: on a command line (xdg-open URL) the token would show in \
/proc/PID/cmdline to every process on the host.")]
    UiUrl {
        /// Print {url, uid, expires, valid_s} as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Calls held for a person: list them, or follow them live
    ///
    /// A profile's `network.ask` and `filesystem.ask_exec` rules hold the agent's
    /// `connect` or `execve` in the kernel until someone answers (`agentd approve`,
    /// `agentd deny`, or the prompt on the agent's own terminal). Each request shows the
    /// agent, the calling process and its command line, and what it asks for: the
    /// destination and the name it was resolved from, or the program and its SHA-256.
    /// While at least one `agentd approvals --follow` runs, the daemon holds such calls;
    /// with nobody to ask (no follower, no terminal) they are denied at once. Only root,
    /// the agent's owner and members of the daemon's --approvers group see requests; no
    /// process inside an agent does.
    #[command(after_help = "Examples:\n  \
agentd approvals                     what waits now\n  \
agentd approvals --follow            each new request and how it ends, live\n  \
agentd approvals --message r-analyze-only-1a2b3c4d-1 > msg\n  \
ssh-keygen -Y sign -n agentd-approval -f ~/.ssh/id_ed25519 msg\n  \
agentd approve r-analyze-only-1a2b3c4d-1 --signature msg.sig")]
    Approvals {
        /// Keep streaming new requests and their outcomes; counts as someone to ask
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only this agent's requests
        #[arg(long, value_name = "ID")]
        agent: Option<String>,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
        /// Print the exact text to sign for `approve REQ --once` (see `ssh-keygen -Y sign`)
        #[arg(long, value_name = "REQ", conflicts_with = "follow")]
        message: Option<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Allow a held call: once, for a while, or for the agent's session
    ///
    /// The approval is written to the agent's kernel allow-map (a connect: the exact
    /// address, port and protocol; an exec: the exact file, by device and inode) before
    /// the call continues, so the kernel decides on what it really uses. `--for` and
    /// `--session` create a grant (`agentd grants`, `agentd revoke`). When the agent's
    /// profile sets `require_signature`, the approval must be signed with a key listed in
    /// the daemon's --allowed-signers file.
    #[command(after_help = "Examples:\n  \
agentd approve r-coding-agent-1a2b3c4d-3               this call only\n  \
agentd approve r-coding-agent-1a2b3c4d-3 --for 10m     and the same calls for 10 minutes\n  \
agentd approve r-coding-agent-1a2b3c4d-3 --session --sign ~/.ssh/id_ed25519")]
    Approve {
        #[arg(value_name = "REQ")]
        request: String,
        /// This call only (the default): the next one is held again
        #[arg(long, conflicts_with_all = ["for_", "session"])]
        once: bool,
        /// Calls to the same destination or program for this long (e.g. 30s, 10m; at
        /// most 24h)
        #[arg(long = "for", value_name = "DURATION", value_parser = parse_for)]
        for_: Option<u64>,
        /// Calls to the same destination or program until the agent ends
        #[arg(long, conflicts_with = "for_")]
        session: bool,
        #[command(flatten)]
        signing: SigningArgs,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Refuse a held call: it fails (EPERM for a connect, EACCES for an exec)
    ///
    /// A denial is a breaker violation of kind `denied`: a profile whose breaker trips on
    /// it stops an agent that keeps asking for what it was refused.
    Deny {
        #[arg(value_name = "REQ")]
        request: String,
        /// Why, for the audit log and the agent's events
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        #[command(flatten)]
        signing: SigningArgs,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Approvals still in force (`approve --for`, `--session`)
    Grants {
        /// Only this agent's grants
        #[arg(long, value_name = "ID")]
        agent: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// End a grant now: the next such call is held again
    Revoke {
        #[arg(value_name = "GRANT")]
        grant: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Validate, list and show profiles
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Launch a program as an agent under a profile, and supervise it
    ///
    /// The agent runs in a cgroup of its own, as its own unprivileged user with no
    /// capabilities, in a new session, under Landlock (files, TCP ports, signals) and a
    /// seccomp allow-list, with only the environment the profile passes. agentd stays in
    /// the foreground: it forwards SIGINT, SIGTERM, SIGHUP, SIGQUIT and SIGWINCH to the
    /// agent, enforces the wall-time limit, and when the program exits kills every process
    /// the agent left behind. Needs root (sudo); the agent runs as the sudo user unless the
    /// profile says otherwise.
    ///
    /// On a terminal (stdin and stdout) the agent gets one of its own (a pseudo-terminal
    /// agentd relays, in raw mode, always restored): Ctrl-C reaches the agent, Ctrl-Z
    /// suspends it (and agentd; `fg` resumes both), and agentd's messages wait until the
    /// agent's screen is gone; `agentd kill ID` is the kill switch. At exit agentd sums up
    /// what was refused (--quiet: not).
    ///
    /// With `agentd daemon` running (socket /run/agentd/agentd.sock, or --socket), the
    /// launch goes through it and takes milliseconds instead of a few hundred: the daemon
    /// keeps the kernel watch loaded.
    ///
    /// Exit status: the program's; 128+N if it died of signal N; 137 when the breaker killed
    /// it; 125 if agentd could not launch it; 126 if it cannot be executed; 127 if it was not
    /// found.
    #[command(after_help = "Examples:\n  \
sudo agentd run -- python3 agent.py                    analyze-only, in the current directory\n  \
sudo agentd run --profile coding-agent --workspace ~/src/app -- make test\n  \
sudo agentd run --profile codex -- codex               Codex CLI's TUI (see docs/agents.md)\n  \
sudo agentd run --profile ./my.toml --events - -- ./agent.sh    events (JSON lines) on stderr\n  \
agentd run --dry-run -- python3 agent.py               print the plan; change nothing")]
    Run {
        /// Profile name (built-in or in /etc/agentd/profiles) or path to a .toml file
        #[arg(long, short = 'p', value_name = "NAME|PATH", default_value = crate::run::DEFAULT_PROFILE)]
        profile: String,
        /// The agent's working directory, `{workspace}` in the profile (default: the current directory)
        #[arg(long, short = 'w', value_name = "DIR")]
        workspace: Option<PathBuf>,
        /// Write events as JSON lines to PATH (appended; `-` for stderr)
        #[arg(long, value_name = "PATH")]
        events: Option<String>,
        /// Print what would be done (agent id, identity, cgroups, limits, Landlock rules,
        /// seccomp, environment, the kernel watch's network rules and canaries, what BPF
        /// LSM decides and whether it runs here) and exit without creating anything: 0, or
        /// 125 when the launch would be refused (a profile that protects paths where BPF
        /// LSM does not run)
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: print the plan as JSON
        #[arg(long, requires = "dry_run")]
        json: bool,
        /// No summary of what was refused when the agent exits (the events file still has
        /// every refusal)
        #[arg(long, short = 'q')]
        quiet: bool,
        /// Where the agent's resolver asks for the names the profile allows (default: the
        /// first nameserver of /etc/resolv.conf). Through the daemon, the daemon's own
        /// --dns-upstream applies
        #[arg(long, value_name = "ADDR:PORT")]
        dns_upstream: Option<std::net::SocketAddr>,
        /// The workspace is a transaction (whatever the profile's [workspace] mode, but
        /// `auto` stays `auto`): the agent's writes go to an overlay agentd keeps, and
        /// nothing reaches the workspace until `agentd commit ID`; see `agentd diff`
        #[arg(long)]
        transaction: bool,
        /// Where transactions are kept (an embedded run; through the daemon, the daemon's
        /// --state-dir applies)
        #[arg(long, value_name = "DIR", default_value = crate::daemon::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// The program and its arguments, after `--`
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<std::ffi::OsString>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Verify the tamper-evident audit log
    #[command(subcommand)]
    Audit(crate::audit::AuditCommand),
    #[command(flatten)]
    Transaction(crate::transaction::cmd::TxCommand),
}

/// How a decision is signed.
#[derive(Debug, clap::Args)]
struct SigningArgs {
    /// Sign the decision with this SSH private key (runs `ssh-keygen -Y sign -n
    /// agentd-approval`)
    #[arg(long, value_name = "KEY", conflicts_with = "signature")]
    sign: Option<PathBuf>,
    /// A signature made beforehand over the text `agentd approvals --message REQ` prints
    #[arg(long, value_name = "FILE")]
    signature: Option<PathBuf>,
}

impl SigningArgs {
    fn signing(self) -> crate::daemon::client::Signing {
        match (self.sign, self.signature) {
            (Some(k), _) => crate::daemon::client::Signing::Key(k),
            (None, Some(f)) => crate::daemon::client::Signing::File(f),
            (None, None) => crate::daemon::client::Signing::None,
        }
    }
}

/// `--for`: a duration as profiles write them, in whole seconds.
fn parse_for(s: &str) -> Result<u64, String> {
    let d = crate::profile::parse_duration(s).map_err(|e| match e.hint {
        Some(h) => format!("{}; {h}", e.message),
        None => e.message,
    })?;
    if d.is_zero() || d > crate::ask::Scope::MAX_FOR {
        return Err(
            "give between 1s and 24h (a standing permission belongs in the profile)".into(),
        );
    }
    Ok(d.as_secs().max(1))
}

/// `events --kind`: a kind's name as the events carry it, checked (a typo would match
/// nothing, silently).
fn parse_kind_name(s: &str) -> Result<String, String> {
    crate::export::parse_kind(s).map(|_| s.to_owned())
}

/// The daemon's control socket, for the client commands.
#[derive(Debug, clap::Args)]
struct SocketArg {
    /// The daemon's control socket (default: $AGENTD_SOCKET, else /run/agentd/agentd.sock)
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum ProfileCommand {
    /// Validate profiles and print what each compiles to
    ///
    /// PROFILE is a path (contains `/` or ends in .toml) or a name, looked up in
    /// /etc/agentd/profiles, then among the built-in profiles. Exits 0 when every profile
    /// is valid, 2 otherwise; errors name the file, line, key and what to write instead.
    #[command(after_help = "Examples:\n  \
agentd profile check profiles/*.toml\n  \
agentd profile check analyze-only --workspace ~/project --json")]
    Check {
        #[arg(required = true, value_name = "PROFILE")]
        profiles: Vec<String>,
        /// Directory `{workspace}` stands for (default: the current directory)
        #[arg(long, value_name = "DIR")]
        workspace: Option<PathBuf>,
        /// Print one JSON document: a list of {profile, valid, errors, policy}
        #[arg(long)]
        json: bool,
    },
    /// List the built-in profiles and those installed in /etc/agentd/profiles
    List {
        #[arg(long)]
        json: bool,
    },
    /// Print a profile's TOML source (built-in or installed), to copy and adapt
    Show {
        #[arg(value_name = "NAME")]
        name: String,
    },
}

/// The command-line definition, for what is generated from it: the man pages and shell
/// completions of the Debian package (examples/gen-docs.rs).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// agentd's diagnostics on stderr, filtered by `AGENTD_LOG` (default: warnings).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AGENTD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
}

pub fn main() -> ExitCode {
    let cli = if crate::run::warm::is_warm() {
        // A supervisor the daemon started ahead of need: its command line comes with its
        // launch.
        match crate::run::warm::take_launch() {
            Ok(args) => Cli::parse_from(args),
            Err(crate::run::warm::WarmError::Closed) => return ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("agentd: {e}");
                return ExitCode::from(125);
            }
        }
    } else {
        Cli::parse()
    };
    init_logging();
    let result = match cli.command {
        Command::Doctor { json } => doctor::run(json),
        Command::Kill { id, socket } => match crate::daemon::client::kill(socket.socket, &id) {
            Ok(Some(code)) => Ok(code),
            Ok(None) => crate::run::control::kill(&id),
            Err(e) => Err(e),
        },
        Command::Daemon {
            socket,
            state_dir,
            audit_log,
            group,
            dns_upstream,
            approvers,
            allowed_signers,
            handover_grace,
            outputs,
        } => crate::daemon::daemon(crate::daemon::DaemonArgs {
            socket,
            state_dir,
            audit_log,
            group,
            dns_upstream,
            approvers,
            allowed_signers,
            handover_grace: std::time::Duration::from_secs(handover_grace),
            outputs: *outputs,
        }),
        Command::Ps { json, socket } => crate::daemon::client::ps(socket.socket, json),
        Command::Events {
            follow,
            agent,
            kind,
            json,
            socket,
        } => crate::daemon::client::events(socket.socket, follow, agent, kind, json),
        Command::Stats { json, socket } => crate::daemon::client::stats(socket.socket, json),
        Command::UiUrl { json, socket } => crate::daemon::client::ui_url(socket.socket, json),
        Command::Approvals {
            follow,
            agent,
            json,
            message,
            socket,
        } => crate::daemon::client::approvals(socket.socket, follow, agent, json, message),
        Command::Approve {
            request,
            once: _,
            for_,
            session,
            signing,
            socket,
        } => {
            let scope = match (for_, session) {
                (Some(s), _) => crate::ask::Scope::For(s),
                (None, true) => crate::ask::Scope::Session,
                (None, false) => crate::ask::Scope::Once,
            };
            crate::daemon::client::decide(
                socket.socket,
                &request,
                crate::ask::Answer::Allow { scope },
                &signing.signing(),
            )
        }
        Command::Deny {
            request,
            reason,
            signing,
            socket,
        } => crate::daemon::client::decide(
            socket.socket,
            &request,
            crate::ask::Answer::Deny { reason },
            &signing.signing(),
        ),
        Command::Grants {
            agent,
            json,
            socket,
        } => crate::daemon::client::grants(socket.socket, agent, json),
        Command::Revoke { grant, socket } => crate::daemon::client::revoke(socket.socket, &grant),
        Command::Profile(ProfileCommand::Check {
            profiles,
            workspace,
            json,
        }) => profile_check(&profiles, workspace, json),
        Command::Profile(ProfileCommand::List { json }) => profile_list(json),
        Command::Profile(ProfileCommand::Show { name }) => profile_show(&name),
        Command::Audit(cmd) => crate::audit::command(cmd),
        Command::Transaction(cmd) => Ok(crate::transaction::cmd::main(cmd)),
        Command::Run {
            profile,
            workspace,
            events,
            dry_run,
            json,
            quiet,
            dns_upstream,
            transaction,
            state_dir,
            command,
            socket,
        } => {
            if dns_upstream.is_some() && socket.socket.is_some() {
                eprintln!(
                    "agentd: cannot launch: --dns-upstream is for an embedded run; through the \
                     daemon its own applies (agentd daemon --dns-upstream ADDR:PORT)"
                );
                return ExitCode::from(crate::run::EXIT_CANNOT_LAUNCH);
            }
            // --dns-upstream asks for an embedded run, whether a daemon runs or not.
            if !dry_run && !crate::run::supervised::is_supervised() && dns_upstream.is_none() {
                match daemon_run(
                    socket.socket,
                    &profile,
                    workspace.clone(),
                    events.clone(),
                    quiet,
                    transaction,
                    &command,
                ) {
                    Ok(Some(code)) => return code,
                    Ok(None) => {}
                    Err(e) => {
                        eprintln!("agentd: cannot launch: {e:#}");
                        return ExitCode::from(crate::run::EXIT_CANNOT_LAUNCH);
                    }
                }
            }
            let mut args = crate::run::args(profile, workspace, events, dry_run, json, command);
            args.quiet = quiet;
            args.dns_upstream = dns_upstream;
            args.state_dir = state_dir;
            args.request.transaction = transaction;
            Ok(crate::run::run(args))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agentd: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `agentd run` through a daemon, when one answers (`None`: run embedded).
fn daemon_run(
    socket: Option<PathBuf>,
    profile: &str,
    workspace: Option<PathBuf>,
    events: Option<String>,
    quiet: bool,
    transaction: bool,
    command: &[std::ffi::OsString],
) -> anyhow::Result<Option<ExitCode>> {
    let (path, explicit) = crate::daemon::client::socket_path(socket.clone());
    if !explicit && !path.exists() {
        return Ok(None);
    }
    let command = command
        .iter()
        .map(|a| {
            a.to_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow::anyhow!("the command line is not UTF-8: {a:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let request = crate::daemon::proto::RunRequest {
        // A path, made absolute here: the daemon resolves nothing against its own or the
        // supervisor's working directory.
        profile: if crate::profile::is_path(profile) {
            std::path::absolute(profile)
                .map_err(|e| anyhow::anyhow!("profile {profile}: {e}"))?
                .to_string_lossy()
                .into_owned()
        } else {
            profile.to_owned()
        },
        workspace: host::workspace_dir(workspace)?,
        command,
        env,
        // Always: the client counts the refusals for its summary.
        events: true,
        // The client decides, when it makes the agent's terminal.
        terminal: false,
        transaction,
    };
    Ok(crate::daemon::client::run(socket, request, events, quiet))
}

#[derive(Debug, Serialize)]
struct CheckResult {
    profile: String,
    valid: bool,
    errors: Vec<ProfileError>,
    policy: Option<CompiledPolicy>,
}

fn profile_check(
    specs: &[String],
    workspace: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let ctx = CompileContext {
        workspace: host::workspace_dir(workspace)?,
        home: host::invoker_home(),
    };
    let mut results = Vec::new();
    for spec in specs {
        let result = match profile::load(spec) {
            Ok((p, origin)) => CheckResult {
                profile: origin,
                valid: true,
                errors: Vec::new(),
                policy: Some(profile::compile(&p, &ctx)),
            },
            Err(LoadError::Invalid(errs)) => CheckResult {
                profile: spec.clone(),
                valid: false,
                errors: errs.0,
                policy: None,
            },
            Err(e) => CheckResult {
                profile: spec.clone(),
                valid: false,
                errors: vec![ProfileError {
                    origin: spec.clone(),
                    line: None,
                    column: None,
                    key: None,
                    message: e.to_string(),
                    hint: None,
                }],
                policy: None,
            },
        };
        results.push(result);
    }
    let all_valid = results.iter().all(|r| r.valid);
    if json {
        report::print_json(&results)?;
    } else {
        for r in &results {
            match &r.policy {
                Some(policy) => print!("{}", report::render_policy(&r.profile, policy)),
                None => {
                    for e in &r.errors {
                        eprintln!("{e}");
                    }
                }
            }
        }
        let bad = results.iter().filter(|r| !r.valid).count();
        if bad > 0 {
            eprintln!("agentd: {bad} of {} profiles invalid", results.len());
        }
    }
    Ok(if all_valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVALID)
    })
}

fn profile_list(json: bool) -> anyhow::Result<ExitCode> {
    #[derive(Debug, Serialize)]
    struct Entry {
        name: String,
        source: String,
        description: String,
    }
    let mut entries = Vec::new();
    if let Ok(dir) = std::fs::read_dir(profile::SYSTEM_PROFILE_DIR) {
        for e in dir.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "toml") {
                let (description, source) = match profile::load(&path.to_string_lossy()) {
                    Ok((p, _)) => (p.description, path.display().to_string()),
                    Err(err) => (format!("INVALID: {err}"), path.display().to_string()),
                };
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                entries.push(Entry {
                    name,
                    source,
                    description,
                });
            }
        }
    }
    for (name, text) in profile::BUILTIN {
        let description = match profile::parse(&format!("builtin:{name}"), text) {
            Ok(p) => p.description,
            Err(e) => format!("INVALID: {e}"),
        };
        entries.push(Entry {
            name: (*name).to_owned(),
            source: "built-in".to_owned(),
            description,
        });
    }
    if json {
        report::print_json(&entries)?;
    } else {
        for e in &entries {
            println!("{:<16} {:<34} {}", e.name, e.source, e.description);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn profile_show(name: &str) -> anyhow::Result<ExitCode> {
    let installed = std::path::Path::new(profile::SYSTEM_PROFILE_DIR).join(format!("{name}.toml"));
    if installed.exists() {
        print!("{}", std::fs::read_to_string(&installed)?);
        return Ok(ExitCode::SUCCESS);
    }
    match profile::builtin(name) {
        Some(text) => {
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!("agentd: no profile named `{name}` (see `agentd profile list`)");
            Ok(ExitCode::from(EXIT_INVALID))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::{Cli, Command};

    /// `agentd ARGS`, as clap takes or refuses it (the refusal as clap prints it).
    fn parse(args: &[&str]) -> Result<Command, String> {
        Cli::try_parse_from(std::iter::once("agentd").chain(args.iter().copied()))
            .map(|cli| cli.command)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn an_output_option_without_its_output_is_refused() {
        for (option, value, needs) in [
            ("--syslog-kinds", "exec", "--syslog"),
            ("--syslog-verdicts", "deny", "--syslog"),
            ("--syslog-severity", "warning", "--syslog"),
            ("--syslog-facility", "daemon", "--syslog"),
            ("--syslog-severity", "warning", "--syslog"),
            ("--otlp-kinds", "exec", "--otlp"),
            ("--otlp-verdicts", "deny", "--otlp"),
            ("--otlp-severity", "warning", "--otlp"),
            ("--otlp-severity", "alert", "--otlp"),
        ] {
            let e = parse(&["daemon", option, value]).unwrap_err();
            assert!(e.contains(needs) && e.contains("required"), "{option}: {e}");
            let with = match needs {
                "--syslog" => ["--syslog", "unix:/dev/log"],
                _ => ["--otlp", "http://127.0.0.1:4318/v1/logs"],
            };
            let args = [&["daemon", option, value][..], &with[..]].concat();
            assert!(parse(&args).is_ok(), "{args:?}");
        }
        // The facility's default asks for nothing.
        assert!(parse(&["daemon"]).is_ok());
    }

    #[test]
    fn listeners_are_checked_before_the_daemon_starts() {
        for (args, says) in [
            (&["--ui", "0"][..], "give the port"),
            (&["--ui", "unix:/run/ui.sock"], "listens on TCP"),
            (&["--metrics", "0"], "give the port"),
            (&["--metrics", "[::1]:0"], "give the port"),
            (
                &["--otlp", "http://127.0.0.1:99999/v1/logs"],
                "`99999` is not a port",
            ),
            (
                &["--otlp", "http://127.0.0.1:0/v1/logs"],
                "`0` is not a port",
            ),
            (&["--otlp", "http://[::1]:/v1/logs"], "`` is not a port"),
        ] {
            let e = parse(&[&["daemon"][..], args].concat()).unwrap_err();
            assert!(e.contains(says), "{args:?}: {e}");
        }
        for args in [
            &["--ui", "8080"][..],
            &["--metrics", "unix:/run/agentd/metrics.sock"],
            &["--otlp", "http://[::1]:4318/v1/logs"],
            &["--otlp", "http://collector/v1/logs"],
        ] {
            assert!(parse(&[&["daemon"][..], args].concat()).is_ok(), "{args:?}");
        }
    }

    #[test]
    fn event_kinds_are_real_ones() {
        let e = parse(&["events", "--kind", "connect"]).unwrap_err();
        assert!(e.contains("did you mean `net_connect`?"), "{e}");
        let e = parse(&[
            "daemon",
            "--syslog",
            "unix:/dev/log",
            "--syslog-kinds",
            "exec,connect",
        ])
        .unwrap_err();
        assert!(e.contains("did you mean `net_connect`?"), "{e}");
        match parse(&["events", "--kind", "net_connect"]) {
            Ok(Command::Events { kind, .. }) => assert_eq!(kind.as_deref(), Some("net_connect")),
            other => panic!("{other:?}"),
        }
    }
}
