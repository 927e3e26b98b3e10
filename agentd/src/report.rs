//! Output helpers shared by the commands: JSON to stdout, and one-line errors to stderr.

use serde::Serialize;

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    println!("{text}");
    Ok(())
}

use std::fmt::Write as _;

use crate::profile::{CompiledPolicy, format_bytes, format_duration};

/// What a profile's ask rules hold, and how long a person has.
pub fn ask_line(a: &crate::profile::AskPolicy) -> String {
    let mut what: Vec<String> = a.connect.iter().map(|r| format!("connect {r}")).collect();
    what.extend(a.names.iter().map(|r| format!("connect {r} (by name)")));
    what.extend(a.exec.iter().map(|e| format!("exec {}", e.display())));
    format!(
        "{} (held for a person; denied after {}, beyond {} pending, or with nobody to ask{})",
        what.join(", "),
        format_duration(a.timeout),
        a.max_pending,
        if a.require_signature {
            "; approvals must be signed"
        } else {
            ""
        }
    )
}

/// The compiled policy as `profile check` and `run --dry-run` show it.
pub fn render_policy(origin: &str, p: &CompiledPolicy) -> String {
    let mut s = String::new();
    let mut line = |label: &str, value: String| {
        let _ = writeln!(s, "  {label:<10} {value}");
    };
    let header = format!("{} ({origin}): valid\n", p.name);
    line("mode", format!("{:?}", p.mode).to_lowercase());
    line(
        "identity",
        match &p.identity.user {
            Some(u) => format!("user {u}"),
            None => format!("{:?}", p.identity.run_as).to_lowercase(),
        },
    );
    line("workspace", p.workspace.display().to_string());
    for (i, r) in p.landlock.rules.iter().enumerate() {
        let mut rights = Vec::new();
        if r.access.read {
            rights.push("read");
        }
        if r.access.write {
            rights.push("write");
        }
        if r.access.exec {
            rights.push("exec");
        }
        // Landlock can only grant what exists when the agent starts.
        let missing = if r.path.exists() {
            ""
        } else if p.landlock.optional.contains(&r.path) {
            "  (optional; absent now)"
        } else {
            "  (does not exist now: grants nothing unless created before the run)"
        };
        line(
            if i == 0 { "landlock" } else { "" },
            format!("{:<40} {}{missing}", r.path.display(), rights.join(" ")),
        );
    }
    if p.landlock.rules.is_empty() {
        line("landlock", "no path is accessible".into());
    }
    let list = |v: Vec<String>| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    let names = &p.network.names;
    if !p.network.connect.is_empty() || names.is_empty() {
        line(
            "connect",
            list(p.network.connect.iter().map(ToString::to_string).collect()),
        );
    }
    if !names.is_empty() {
        line(
            if p.network.connect.is_empty() {
                "connect"
            } else {
                ""
            },
            format!(
                "{} (by name: addresses admitted from the agent's own DNS answers)",
                names
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    line(
        "bind",
        list(p.network.bind.iter().map(ToString::to_string).collect()),
    );
    line(
        "sockets",
        p.network
            .families
            .iter()
            .map(|f| format!("{f:?}").to_lowercase())
            .collect::<Vec<_>>()
            .join(", "),
    );
    line(
        "canaries",
        list(p.canaries.iter().map(|c| c.display().to_string()).collect()),
    );
    line(
        "seccomp",
        format!(
            "allow-list of {} calls, {} with argument checks ({}); {} -> ENOSYS; {}all else -> {} (e.g. {})",
            p.seccomp.allow.len(),
            p.seccomp.allow_if.len(),
            p.seccomp
                .allow_if
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", "),
            p.seccomp.enosys.join(", "),
            if p.seccomp.notify.is_empty() {
                String::new()
            } else {
                format!(
                    "{} -> agentd (held or let through); ",
                    p.seccomp.notify.join(", ")
                )
            },
            p.seccomp.default_errno,
            p.seccomp
                .deny_notes
                .iter()
                .take(8)
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", "),
        ),
    );
    if let Some(a) = &p.ask {
        line("ask", ask_line(a));
    }
    line(
        "limits",
        format!(
            "pids {}, memory {}, wall time {}",
            p.limits.pids.map_or("unlimited".into(), |n| n.to_string()),
            p.limits.memory.map_or("unlimited".into(), format_bytes),
            p.limits
                .wall_time
                .map_or("unlimited".into(), format_duration),
        ),
    );
    line(
        "breaker",
        format!(
            "{}trips at once on {}; {}; action {}; lost events: {}",
            if p.breaker.enforce {
                ""
            } else {
                "monitor mode, never acts; "
            },
            list(
                p.breaker
                    .trip_on
                    .iter()
                    .map(|k| k.as_str().to_owned())
                    .collect()
            ),
            match p.breaker.threshold {
                Some(t) => format!(
                    "other violations: {} within {}",
                    t.count,
                    format_duration(t.window)
                ),
                None => "other violations: counted, no threshold".into(),
            },
            format!("{:?}", p.breaker.action).to_lowercase(),
            match p.breaker.on_event_loss {
                crate::profile::OnEventLoss::Report => "reported",
                crate::profile::OnEventLoss::Kill => "kill the agent (on_event_loss)",
            },
        ),
    );
    line(
        "env",
        format!(
            "pass {}; set {}",
            list(p.env.pass.clone()),
            list(p.env.set.iter().map(|(k, v)| format!("{k}={v}")).collect())
        ),
    );
    format!("{header}{s}")
}
