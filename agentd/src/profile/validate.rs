//! Raw profile -> validated [`Profile`]. Every problem is reported with its place, and all
//! of them at once.

use std::ops::Range;

use toml::Spanned;

use super::{
    ASK_MAX_PENDING_RANGE, ASK_TIMEOUT_RANGE, Action, Ask, Breaker, DEFAULT_TRIP_ON, Environment,
    Filesystem, Identity, Limits, Mode, Network, OnEventLoss, PathTemplate, Profile, ProfileError,
    ProfileErrors, RunAs, Threshold, Workspace, WorkspaceMode,
    error::{Locator, closest},
    schema::RawProfile,
    values::{self, Invalid},
};

/// Environment variables a profile may never pass or set: they change how every program
/// the agent runs is loaded or behaves, before any of its own code runs.
const FORBIDDEN_ENV_PREFIXES: [&str; 2] = ["LD_", "GCONV_"];
const FORBIDDEN_ENV: [&str; 6] = [
    "BASH_ENV",
    "ENV",
    "PYTHONSTARTUP",
    "PERL5OPT",
    "NODE_OPTIONS",
    "MALLOC_CHECK_",
];

struct Checker<'a> {
    loc: Locator<'a>,
    errors: Vec<ProfileError>,
}

impl Checker<'_> {
    fn push(&mut self, span: Range<usize>, key: impl Into<String>, e: Invalid) {
        let err = self
            .loc
            .error(Some(span), Some(key.into()), e.message, e.hint);
        self.errors.push(err);
    }

    fn fail(
        &mut self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
        hint: Option<String>,
    ) {
        self.push(
            span,
            key,
            Invalid {
                message: message.into(),
                hint,
            },
        );
    }

    /// Reports the entry of `list` (valid entries of `items`, under `key`) past the first
    /// `max`: "at most `max` `what` per profile".
    fn at_most<T>(
        &mut self,
        key: &str,
        items: &[Spanned<impl AsRef<str>>],
        list: &[(T, Range<usize>)],
        max: u32,
        what: &str,
        hint: &str,
    ) {
        if let Some((_, span)) = list.get(max as usize) {
            self.fail(
                span.clone(),
                entry_key(key, items, span),
                format!("at most {max} {what} per profile"),
                Some(hint.into()),
            );
        }
    }

    /// Validates each entry with `parse`, reporting failures and duplicates.
    fn list<T: PartialEq>(
        &mut self,
        key: &str,
        items: &[Spanned<impl AsRef<str>>],
        parse: impl Fn(&str) -> Result<T, Invalid>,
    ) -> Vec<(T, Range<usize>)> {
        let mut out: Vec<(T, Range<usize>)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let k = format!("{key}[{i}]");
            match parse(item.get_ref().as_ref()) {
                Ok(v) => {
                    if out.iter().any(|(seen, _)| *seen == v) {
                        self.fail(
                            item.span(),
                            k,
                            format!("`{}` is listed twice", item.get_ref().as_ref()),
                            Some("remove the repeated entry".into()),
                        );
                    } else {
                        out.push((v, item.span()));
                    }
                }
                Err(e) => self.push(item.span(), k, e),
            }
        }
        out
    }
}

pub(super) fn parse_and_validate(origin: &str, text: &str) -> Result<Profile, ProfileErrors> {
    let loc = Locator {
        origin,
        source: text,
    };
    let raw: RawProfile =
        toml::from_str(text).map_err(|e| ProfileErrors(vec![toml_error(&loc, &e)]))?;
    let mut c = Checker {
        loc,
        errors: Vec::new(),
    };

    // [agent]
    let agent = raw.agent.into_inner();
    let name = agent.name.get_ref().clone();
    if name.is_empty()
        || !name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
    {
        c.fail(
            agent.name.span(),
            "agent.name",
            format!("`{name}` is not a valid agent name"),
            Some("use letters, digits, `-` and `_` (it names cgroups and events)".into()),
        );
    }
    let mode = agent.mode.as_ref().map_or(Mode::Enforce, |m| *m.get_ref());

    // [identity]
    let identity = match raw.identity.map(Spanned::into_inner) {
        None => Identity {
            run_as: RunAs::Invoker,
            user: None,
        },
        Some(id) => {
            let run_as = *id.run_as.get_ref();
            match (run_as, &id.user) {
                (RunAs::User, None) => c.fail(
                    id.run_as.span(),
                    "identity.run_as",
                    "`run_as = \"user\"` needs the user's name",
                    Some("add `user = \"NAME\"` to [identity]".into()),
                ),
                (RunAs::Invoker | RunAs::Transient, Some(u)) => c.fail(
                    u.span(),
                    "identity.user",
                    "`user` is only read with `run_as = \"user\"`",
                    Some("remove `user`, or set `run_as = \"user\"`".into()),
                ),
                (RunAs::User, Some(u)) if u.get_ref() == "root" || u.get_ref().is_empty() => c
                    .fail(
                        u.span(),
                        "identity.user",
                        "an agent never runs as root",
                        Some("name an unprivileged user, or use `run_as = \"transient\"`".into()),
                    ),
                _ => {}
            }
            Identity {
                run_as,
                user: id.user.map(Spanned::into_inner),
            }
        }
    };

    // [filesystem]
    let fs = raw.filesystem.map(Spanned::into_inner).unwrap_or_default();
    let read = c.list("filesystem.read", &fs.read, values::parse_grant);
    let write = c.list("filesystem.write", &fs.write, values::parse_grant);
    let exec = c.list("filesystem.exec", &fs.exec, values::parse_grant);
    let ask_exec_raw: &[Spanned<String>] = fs.ask_exec.as_ref().map_or(&[], |l| l.get_ref());
    let ask_exec = c.list("filesystem.ask_exec", ask_exec_raw, values::parse_grant);
    // Optional: marked so in every list that names it.
    let mut optional: Vec<PathTemplate> = Vec::new();
    for ((path, opt), _) in read.iter().chain(&write).chain(&exec).chain(&ask_exec) {
        if *opt && !optional.contains(path) {
            optional.push(path.clone());
        }
    }
    optional.retain(|o| {
        !read
            .iter()
            .chain(&write)
            .chain(&exec)
            .chain(&ask_exec)
            .any(|((p, opt), _)| p == o && !*opt)
    });
    let unmark = |v: Vec<((PathTemplate, bool), Range<usize>)>| {
        v.into_iter()
            .map(|((p, _), span)| (p, span))
            .collect::<Vec<_>>()
    };
    let (read, write, exec) = (unmark(read), unmark(write), unmark(exec));
    let ask_exec = unmark(ask_exec);
    let canaries = c.list("filesystem.canaries", &fs.canaries, values::parse_path);
    for (canary, span) in &canaries {
        for (list, granted) in [
            ("read", &read),
            ("write", &write),
            ("exec", &exec),
            ("ask_exec", &ask_exec),
        ] {
            if granted.iter().any(|(p, _)| p == canary) {
                c.fail(span.clone(), entry_key("filesystem.canaries", &fs.canaries, span), format!("`{canary}` is both a canary and granted in filesystem.{list}"), Some("a canary is a path the agent has no business opening: remove it from one of the two lists".into()));
            }
        }
    }
    let protect = c.list("filesystem.protect", &fs.protect, values::parse_path);
    c.at_most(
        "filesystem.protect",
        &fs.protect,
        &protect,
        agentd_common::MAX_PROTECT,
        "protected paths",
        "protect a common parent directory instead",
    );
    for (path, span) in &protect {
        let key = entry_key("filesystem.protect", &fs.protect, span);
        if !write.iter().any(|(w, _)| path.maybe_within(w)) {
            c.fail(
                span.clone(),
                key.clone(),
                format!("`{path}` is not inside any filesystem.write path, so it is read-only to the agent already"),
                Some("add its tree to filesystem.write, or remove the entry".into()),
            );
        }
        if write.iter().any(|(w, _)| w.surely_within(path)) {
            c.fail(
                span.clone(),
                key.clone(),
                format!(
                    "`{path}` contains a filesystem.write path, which protect would make read-only"
                ),
                Some(
                    "protect only sub-paths of the writable trees, or remove the write entry"
                        .into(),
                ),
            );
        }
        let long = path
            .rest
            .components()
            .find(|part| part.as_os_str().len() >= agentd_common::GUARDED_NAME_LEN - 1);
        if let Some(part) = long {
            c.fail(
                span.clone(),
                key,
                format!(
                    "the component `{}` is longer than {} bytes",
                    part.as_os_str().to_string_lossy(),
                    agentd_common::GUARDED_NAME_LEN - 2
                ),
                Some("protect its parent directory instead".into()),
            );
        }
    }
    // ask_exec: programs whose exec is held for a person. A program the agent may run
    // anyway would never be held; one it may write could be changed after the approval.
    for (path, span) in &ask_exec {
        let key = entry_key("filesystem.ask_exec", ask_exec_raw, span);
        if path.rest.as_os_str().is_empty() {
            c.fail(
                span.clone(),
                key.clone(),
                format!("`{path}` is a directory: filesystem.ask_exec lists programs"),
                Some("list each program file, e.g. \"/usr/bin/git\"".into()),
            );
        }
        if let Some((tree, _)) = exec.iter().find(|(e, _)| path.surely_within(e)) {
            let message = if tree == path {
                format!(
                    "`{path}` is also in filesystem.exec, so running it would never be held for a person"
                )
            } else {
                format!(
                    "`{path}` is already allowed by filesystem.exec `{tree}`, so running it would never be held for a person"
                )
            };
            c.fail(
                span.clone(),
                key.clone(),
                message,
                Some("remove it from one of the two lists".into()),
            );
        }
        if let Some((tree, _)) = write.iter().find(|(w, _)| path.surely_within(w)) {
            c.fail(
                span.clone(),
                key,
                format!(
                    "`{path}` is inside filesystem.write `{tree}`: the agent could change the program after a person approved it"
                ),
                Some(
                    "ask about programs outside the writable trees, or remove the write grant"
                        .into(),
                ),
            );
        }
    }
    // A copy of an ask_exec program is another file: where the agent may both write and
    // run programs, it could copy the program there and run the copy without asking.
    let overlap = write.iter().find_map(|(w, _)| {
        exec.iter()
            .find(|(e, _)| e.surely_within(w) || w.surely_within(e))
            .map(|(e, _)| (w.clone(), e.clone()))
    });
    if let (Some(list), Some((w, e))) = (
        fs.ask_exec.as_ref().filter(|l| !l.get_ref().is_empty()),
        overlap,
    ) {
        c.fail(
            list.span(),
            "filesystem.ask_exec",
            format!(
                "the agent may write `{w}` and run programs from `{e}`: a copy of a program to ask about, made there, would run without asking"
            ),
            Some(
                "ask about programs only in profiles whose writable trees are not executable (remove the overlap of filesystem.write and filesystem.exec)"
                    .into(),
            ),
        );
    }
    if let (Mode::Monitor, Some(list)) = (mode, &fs.ask_exec)
        && !list.get_ref().is_empty()
    {
        c.fail(
            list.span(),
            "filesystem.ask_exec",
            "`mode = \"monitor\"` lets every program run, so nothing would be held for a person",
            Some("remove filesystem.ask_exec, or set `mode = \"enforce\"` in [agent]".into()),
        );
    }
    let paths =
        |v: Vec<(PathTemplate, Range<usize>)>| v.into_iter().map(|(p, _)| p).collect::<Vec<_>>();
    let filesystem = Filesystem {
        read: paths(read),
        write: paths(write),
        exec: paths(exec),
        canaries: paths(canaries),
        protect: paths(protect),
        ask_exec: paths(ask_exec),
        optional,
    };

    // [network]
    let net = raw.network.map(Spanned::into_inner).unwrap_or_default();
    let connect = c.list("network.connect", &net.connect, values::parse_connect_entry);
    let mut by_address = Vec::new();
    let mut names = Vec::new();
    for (entry, _) in connect {
        match entry {
            values::ConnectEntry::Cidr(rule) => by_address.push(rule),
            values::ConnectEntry::Name(rule) => names.push(rule),
        }
    }
    names.sort();
    let mut bind = Vec::new();
    for (i, b) in net.bind.iter().enumerate() {
        match values::parse_bind(b.get_ref()) {
            Ok(rule) if bind.contains(&rule) => c.fail(
                b.span(),
                format!("network.bind[{i}]"),
                format!("`{rule}` is listed twice"),
                Some("remove the repeated entry".into()),
            ),
            Ok(rule) => bind.push(rule),
            Err(e) => c.push(b.span(), format!("network.bind[{i}]"), e),
        }
    }
    let unix = c.list("network.unix", &net.unix, values::parse_path);
    c.at_most(
        "network.unix",
        &net.unix,
        &unix,
        agentd_common::MAX_UNIX_PEERS,
        "unix sockets",
        "list only the services this agent needs",
    );
    for (path, span) in &unix {
        let name = path.rest.file_name().map_or(0, |n| n.len());
        if name == 0 || name >= agentd_common::GUARDED_NAME_LEN - 1 {
            c.fail(
                span.clone(),
                entry_key("network.unix", &net.unix, span),
                format!(
                    "`{path}` does not end in a socket's name of 1 to {} bytes",
                    agentd_common::GUARDED_NAME_LEN - 2
                ),
                Some("name the socket file itself, e.g. \"/run/docker.sock\"".into()),
            );
        }
    }
    // network.ask: destinations whose connect is held for a person. One network.connect
    // allows already would never be held.
    let ask_raw: &[Spanned<String>] = net.ask.as_ref().map_or(&[], |l| l.get_ref());
    let mut ask = Vec::new();
    let mut ask_names = Vec::new();
    for (entry, span) in c.list("network.ask", ask_raw, values::parse_connect_entry) {
        let (written, allowed_by) = match entry {
            values::ConnectEntry::Cidr(rule) => {
                let by = by_address
                    .iter()
                    .find(|c| c.covers(&rule))
                    .map(|c| c.to_string());
                if by.is_none() {
                    ask.push(rule);
                }
                (rule.to_string(), by)
            }
            values::ConnectEntry::Name(rule) => {
                let by = names
                    .iter()
                    .find(|c| c.covers(&rule))
                    .map(|c| c.to_string());
                let written = rule.to_string();
                if by.is_none() {
                    ask_names.push(rule);
                }
                (written, by)
            }
        };
        if let Some(by) = allowed_by {
            let message = if by == written {
                format!(
                    "`{written}` is also in network.connect, so a connect to it would never be held for a person"
                )
            } else {
                format!(
                    "`{written}` is already allowed by network.connect `{by}`, so a connect to it would never be held for a person"
                )
            };
            let key = entry_key("network.ask", ask_raw, &span);
            c.fail(
                span,
                key,
                message,
                Some("remove it from one of the two lists".into()),
            );
        }
    }
    ask_names.sort();
    if let (Mode::Monitor, Some(list)) = (mode, &net.ask)
        && !list.get_ref().is_empty()
    {
        c.fail(
            list.span(),
            "network.ask",
            "`mode = \"monitor\"` allows every connect, so nothing would be held for a person",
            Some("remove network.ask, or set `mode = \"enforce\"` in [agent]".into()),
        );
    }
    let network = Network {
        connect: by_address,
        names,
        bind,
        unix: paths(unix),
        ask,
        ask_names,
    };

    // [ask]: only with something to ask about.
    let ask = match raw.ask {
        None => Ask::default(),
        Some(table) => {
            let span = table.span();
            let table = table.into_inner();
            if ask_raw.is_empty() && ask_exec_raw.is_empty() {
                c.fail(
                    span,
                    "ask",
                    "nothing to ask about: [ask] sets how calls held for a person wait, and no rule holds any",
                    Some("add network.ask or filesystem.ask_exec, or remove [ask]".into()),
                );
            }
            let timeout = table.timeout.as_ref().and_then(|t| {
                match values::parse_duration(t.get_ref()) {
                    Err(e) => {
                        c.push(t.span(), "ask.timeout", e);
                        None
                    }
                    Ok(d) if !ASK_TIMEOUT_RANGE.contains(&d) => {
                        c.fail(
                            t.span(),
                            "ask.timeout",
                            format!("`{}` is not between 1s and 24h", t.get_ref()),
                            Some("write a duration from \"1s\" to \"24h\": when it runs out, the call is denied".into()),
                        );
                        None
                    }
                    Ok(d) => Some(d),
                }
            });
            let max_pending = table.max_pending.as_ref().and_then(|m| {
                match u32::try_from(*m.get_ref()) {
                    Ok(n) if ASK_MAX_PENDING_RANGE.contains(&n) => Some(n),
                    _ => {
                        c.fail(
                            m.span(),
                            "ask.max_pending",
                            format!("{} is not between 1 and 64", m.get_ref()),
                            Some("write how many calls of the agent may wait for a person at once, 1 to 64".into()),
                        );
                        None
                    }
                }
            });
            let defaults = Ask::default();
            Ask {
                timeout: timeout.unwrap_or(defaults.timeout),
                max_pending: max_pending.unwrap_or(defaults.max_pending),
                require_signature: table
                    .require_signature
                    .as_ref()
                    .map_or(defaults.require_signature, |r| *r.get_ref()),
            }
        }
    };

    // [limits]
    let lim = raw.limits.map(Spanned::into_inner).unwrap_or_default();
    let pids = lim
        .pids
        .as_ref()
        .and_then(|p| match u32::try_from(*p.get_ref()) {
            Ok(n) if n >= 1 => Some(n),
            _ => {
                c.fail(
                    p.span(),
                    "limits.pids",
                    format!("{} is not a process limit", p.get_ref()),
                    Some("write a number of processes of at least 1".into()),
                );
                None
            }
        });
    let memory = lim.memory.as_ref().and_then(|m| {
        values::parse_bytes(m.get_ref())
            .map_err(|e| c.push(m.span(), "limits.memory", e))
            .ok()
    });
    let wall_time = lim.wall_time.as_ref().and_then(|w| {
        values::parse_duration(w.get_ref())
            .map_err(|e| c.push(w.span(), "limits.wall_time", e))
            .ok()
    });
    if let (Some(m), Some(span)) = (memory, lim.memory.as_ref().map(Spanned::span))
        && m < 1 << 20
    {
        c.fail(
            span,
            "limits.memory",
            format!(
                "{} is too little memory to start a program",
                values::format_bytes(m)
            ),
            Some("write at least \"1MiB\"".into()),
        );
    }
    let limits = Limits {
        pids,
        memory,
        wall_time,
    };

    // [breaker]
    let br = raw.breaker.map(Spanned::into_inner).unwrap_or_default();
    let mut trip_on = Vec::new();
    match &br.trip_on {
        None => trip_on.extend(DEFAULT_TRIP_ON),
        Some(kinds) => {
            for (i, k) in kinds.iter().enumerate() {
                if trip_on.contains(k.get_ref()) {
                    c.fail(
                        k.span(),
                        format!("breaker.trip_on[{i}]"),
                        format!("`{}` is listed twice", k.get_ref().as_str()),
                        Some("remove the repeated entry".into()),
                    );
                } else {
                    trip_on.push(*k.get_ref());
                }
            }
        }
    }
    let threshold = match (&br.threshold, &br.window) {
        (None, None) => None,
        (Some(t), None) => {
            c.fail(
                t.span(),
                "breaker.threshold",
                "a threshold needs a window",
                Some("add `window = \"60s\"`: the threshold counts violations within it".into()),
            );
            None
        }
        (None, Some(w)) => {
            c.fail(
                w.span(),
                "breaker.window",
                "a window needs a threshold",
                Some("add `threshold = N`: trip after N violations within the window".into()),
            );
            None
        }
        (Some(t), Some(w)) => {
            let count = match u32::try_from(*t.get_ref()) {
                Ok(n) if n >= 1 => Some(n),
                _ => {
                    c.fail(
                        t.span(),
                        "breaker.threshold",
                        format!("{} is not a count", t.get_ref()),
                        Some("write a number of violations of at least 1".into()),
                    );
                    None
                }
            };
            let window = values::parse_duration(w.get_ref())
                .map_err(|e| c.push(w.span(), "breaker.window", e))
                .ok();
            count
                .zip(window)
                .map(|(count, window)| Threshold { count, window })
        }
    };
    let action = br.action.as_ref().map_or(Action::Kill, |a| *a.get_ref());
    if let (Mode::Monitor, Some(a)) = (mode, &br.action)
        && *a.get_ref() == Action::Kill
    {
        c.fail(a.span(), "breaker.action", "`action = \"kill\"` contradicts `mode = \"monitor\"`: monitor mode records and never kills", Some("write `action = \"deny\"`, or `mode = \"enforce\"` in [agent]".into()));
    }
    let on_event_loss = br
        .on_event_loss
        .as_ref()
        .map_or(OnEventLoss::Report, |l| *l.get_ref());
    if let (Mode::Monitor, Some(l)) = (mode, &br.on_event_loss)
        && *l.get_ref() == OnEventLoss::Kill
    {
        c.fail(
            l.span(),
            "breaker.on_event_loss",
            "`on_event_loss = \"kill\"` contradicts `mode = \"monitor\"`: monitor mode records and never kills",
            Some("write `on_event_loss = \"report\"`, or `mode = \"enforce\"` in [agent]".into()),
        );
    }
    let breaker = Breaker {
        trip_on,
        threshold,
        action,
        on_event_loss,
    };

    // [environment]
    let env = raw.environment.map(Spanned::into_inner).unwrap_or_default();
    let check_name = |c: &mut Checker<'_>, key: String, name: &Spanned<String>| {
        let n = name.get_ref();
        if n.is_empty() || n.contains('=') || n.contains('\0') {
            c.fail(
                name.span(),
                key,
                format!("`{n}` is not an environment variable name"),
                None,
            );
            false
        } else if FORBIDDEN_ENV_PREFIXES.iter().any(|p| n.starts_with(p))
            || FORBIDDEN_ENV.contains(&n.as_str())
        {
            c.fail(name.span(), key, format!("`{n}` changes how programs are loaded or started, so an agent may not receive it"), Some("remove it; agentd scrubs it from every agent's environment".into()));
            false
        } else {
            true
        }
    };
    let mut pass = Vec::new();
    for (i, name) in env.pass.iter().enumerate() {
        if check_name(&mut c, format!("environment.pass[{i}]"), name) {
            if pass.contains(name.get_ref()) {
                c.fail(
                    name.span(),
                    format!("environment.pass[{i}]"),
                    format!("`{}` is listed twice", name.get_ref()),
                    Some("remove the repeated entry".into()),
                );
            } else {
                pass.push(name.get_ref().clone());
            }
        }
    }
    let mut set = Vec::new();
    for (name, value) in &env.set {
        if check_name(&mut c, format!("environment.set.{}", name.get_ref()), name) {
            if pass.contains(name.get_ref()) {
                c.fail(
                    name.span(),
                    format!("environment.set.{}", name.get_ref()),
                    format!("`{}` is both passed and set", name.get_ref()),
                    Some("keep it in one of `pass` and `set`".into()),
                );
            }
            if value.get_ref().contains('\0') {
                c.fail(
                    value.span(),
                    format!("environment.set.{}", name.get_ref()),
                    "value contains a NUL byte",
                    None,
                );
            }
            set.push((name.get_ref().clone(), value.get_ref().clone()));
        }
    }
    let environment = Environment { pass, set };

    // [workspace]
    let ws = raw.workspace.map(Spanned::into_inner).unwrap_or_default();
    let ws_mode = ws
        .mode
        .as_ref()
        .map_or(WorkspaceMode::Direct, |m| *m.get_ref());
    let limit = ws.limit.as_ref().and_then(|l| {
        values::parse_bytes(l.get_ref())
            .map_err(|e| c.push(l.span(), "workspace.limit", e))
            .ok()
    });
    if let (Some(l), Some(span)) = (limit, ws.limit.as_ref().map(Spanned::span))
        && l < 1 << 20
    {
        c.fail(
            span,
            "workspace.limit",
            format!("{} is too small for a transaction", values::format_bytes(l)),
            Some("write at least \"1MiB\"".into()),
        );
    }
    if let (WorkspaceMode::Direct, Some(l)) = (ws_mode, &ws.limit) {
        c.fail(
            l.span(),
            "workspace.limit",
            "a limit bounds a transaction, and `mode = \"direct\"` has none",
            Some("remove `limit`, or set `mode = \"transaction\"` or `\"auto\"`".into()),
        );
    }
    // `auto` discards what a tripped agent wrote; an agent that is not stopped at a trip
    // (monitor mode, or `action = "deny"`) could exit 0 after it and be committed.
    if let Some(m) = &ws.mode
        && ws_mode == WorkspaceMode::Auto
        && (mode == Mode::Monitor || action == Action::Deny)
    {
        c.fail(
            m.span(),
            "workspace.mode",
            "`mode = \"auto\"` commits when the agent exits 0 without a trip, and with monitor mode or `action = \"deny\"` a trip does not stop it",
            Some("use `mode = \"transaction\"` (a person commits), or `action = \"kill\"` in enforce mode".into()),
        );
    }
    let workspace = Workspace {
        mode: ws_mode,
        limit: limit.unwrap_or(super::DEFAULT_TRANSACTION_LIMIT),
    };

    if !c.errors.is_empty() {
        c.errors.sort_by_key(|e| (e.line, e.column));
        return Err(ProfileErrors(c.errors));
    }
    let description = agent
        .description
        .map(Spanned::into_inner)
        .unwrap_or_default();
    Ok(Profile {
        name,
        description,
        mode,
        identity,
        filesystem,
        network,
        limits,
        breaker,
        environment,
        workspace,
        ask,
    })
}

/// The key of the entry of `items` (listed under `key`) at `span`: `key[i]`, `i` its
/// index as written (the lists [`Checker::list`] returns leave invalid entries out).
fn entry_key(key: &str, items: &[Spanned<impl AsRef<str>>], span: &Range<usize>) -> String {
    match items.iter().position(|item| item.span() == *span) {
        Some(i) => format!("{key}[{i}]"),
        None => key.to_owned(),
    }
}

/// A TOML or schema error (unknown key, wrong type, missing key), with the table it is in
/// and a "did you mean" where the key looks like a typo.
fn toml_error(loc: &Locator<'_>, e: &toml::de::Error) -> ProfileError {
    let message = e.message().trim().to_owned();
    let span = e.span();
    let section = span.as_ref().and_then(|s| section_at(loc.source, s.start));
    let (key, hint) = if let Some(rest) = message.strip_prefix("unknown field `") {
        let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        let key = match &section {
            Some(s) => format!("{s}.{field}"),
            None => field.to_owned(),
        };
        let hint = match closest(field, &candidates) {
            Some(c) => format!(
                "did you mean `{c}`? (unknown keys are refused so that a typo never changes what an agent may do)"
            ),
            None => format!("valid keys here: {}", candidates.join(", ")),
        };
        (Some(key), Some(hint))
    } else {
        let line_key = span.as_ref().and_then(|s| key_at(loc.source, s.start));
        let key = match (section, line_key) {
            (Some(s), Some(k)) => Some(format!("{s}.{k}")),
            (s, k) => k.or(s),
        };
        (key, None)
    };
    loc.error(span, key, message, hint)
}

/// The key assigned on the line holding a byte offset (`mode` in `mode = "x"`).
fn key_at(source: &str, offset: usize) -> Option<String> {
    let start = source.get(..offset)?.rfind('\n').map_or(0, |i| i + 1);
    let line = source.get(start..)?.lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
    .then(|| key.to_owned())
}

/// The `[table]` header in force at a byte offset.
fn section_at(source: &str, offset: usize) -> Option<String> {
    let before = source.get(..offset)?;
    before.lines().rev().find_map(|l| {
        let l = l.trim();
        let inner = l.strip_prefix('[')?.strip_suffix(']')?;
        Some(
            inner
                .trim_matches(|ch| ch == '[' || ch == ']')
                .trim()
                .to_owned(),
        )
    })
}
