//! Profile parsing, validation and compilation, end to end on text. No root needed.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::*;

fn ctx() -> CompileContext {
    CompileContext {
        workspace: PathBuf::from("/w/proj"),
        home: PathBuf::from("/home/u"),
    }
}

fn errors(text: &str) -> Vec<ProfileError> {
    parse("t.toml", text)
        .expect_err("profile should be invalid")
        .0
}

const MINIMAL: &str = "[agent]\nname = \"t\"\n";

#[test]
fn every_builtin_parses_compiles_and_is_named_after_its_file() {
    for (name, text) in BUILTIN {
        let p = parse(&format!("builtin:{name}"), text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(p.name, *name);
        let c = compile(&p, &ctx());
        assert!(
            c.fs_allows(Path::new("/w/proj/src/main.rs"), |a| a.read),
            "{name} reads the workspace"
        );
        assert!(c.breaker.enforce);
    }
}

#[test]
fn analyze_only_writes_nothing_and_reaches_no_network() {
    let p = parse("a", builtin("analyze-only").unwrap()).unwrap();
    let c = compile(&p, &ctx());
    let writable: Vec<&Path> = c
        .landlock
        .rules
        .iter()
        .filter(|r| r.access.write)
        .map(|r| r.path.as_path())
        .collect();
    assert_eq!(writable, [Path::new("/dev/null")]);
    assert!(c.network.connect.is_empty() && c.network.connect_entries.is_empty());
    assert!(c.network.bind.is_empty());
    assert_eq!(
        c.network.families,
        [SocketFamily::Unix, SocketFamily::Inet, SocketFamily::Inet6],
        "TCP and UDP sockets, so the cgroup programs decide (and report) each connect"
    );
    assert!(c.breaker.trip_on.contains(&ViolationKind::Connect));
    assert!(c.canaries.contains(&PathBuf::from("/home/u/.ssh")));
}

#[test]
fn minimal_profile_denies_everything_by_default() {
    let c = compile(&parse("t", MINIMAL).unwrap(), &ctx());
    assert!(c.landlock.rules.is_empty());
    assert!(c.network.connect_entries.is_empty());
    assert_eq!(c.mode, Mode::Enforce);
    assert_eq!(c.identity.run_as, RunAs::Invoker);
    assert_eq!(c.breaker.trip_on, DEFAULT_TRIP_ON);
    assert_eq!(c.breaker.action, Action::Kill);
}

#[test]
fn misspelt_keys_are_errors_in_every_section() {
    for (section, typo, want) in [
        ("agent", "nmae = \"x\"", "name"),
        ("filesystem", "raed = [\"/\"]", "read"),
        ("network", "conect = [\"0.0.0.0/0:*\"]", "connect"),
        ("limits", "pid = 3", "pids"),
        ("breaker", "actoin = \"deny\"", "action"),
        ("environment", "pas = [\"PATH\"]", "pass"),
    ] {
        let text = if section == "agent" {
            format!("[agent]\nname = \"t\"\n{typo}\n")
        } else {
            format!("{MINIMAL}[{section}]\n{typo}\n")
        };
        let e = &errors(&text)[0];
        let line = if section == "agent" { 3 } else { 4 };
        assert_eq!(e.line, Some(line), "{section}: {e}");
        let key = typo.split(' ').next().unwrap();
        assert_eq!(
            e.key.as_deref(),
            Some(format!("{section}.{key}").as_str()),
            "{e}"
        );
        assert!(
            e.hint.as_deref().unwrap().contains(&format!("`{want}`")),
            "{e}"
        );
    }
}

#[test]
fn unknown_section_is_an_error() {
    let e = &errors(&format!("{MINIMAL}[netwrok]\nconnect = []\n"))[0];
    assert_eq!(e.line, Some(3));
    assert!(e.hint.as_deref().unwrap().contains("`network`"), "{e}");
}

#[test]
fn wrong_types_name_line_and_key() {
    let e = &errors(&format!("{MINIMAL}[filesystem]\nread = \"/usr\"\n"))[0];
    assert_eq!(e.line, Some(4));
    assert_eq!(e.key.as_deref(), Some("filesystem.read"));
    let e = &errors(&format!("{MINIMAL}[limits]\npids = \"many\"\n"))[0];
    assert_eq!(e.key.as_deref(), Some("limits.pids"));
}

#[test]
fn all_problems_are_reported_at_once_in_source_order() {
    let errs = errors(&format!(
        "{MINIMAL}[filesystem]\nread = [\"rel\", \"/ok\", \"/ok\"]\n[network]\nconnect = [\"10.0.0.1/8:1\"]\nbind = [0]\n[limits]\npids = 0\nmemory = \"12\"\nwall_time = \"5 minutes\"\n"
    ));
    let keys: Vec<&str> = errs.iter().map(|e| e.key.as_deref().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "filesystem.read[0]",
            "filesystem.read[2]",
            "network.connect[0]",
            "network.bind[0]",
            "limits.pids",
            "limits.memory",
            "limits.wall_time"
        ]
    );
    let lines: Vec<usize> = errs.iter().map(|e| e.line.unwrap()).collect();
    assert!(lines.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn contradictions_are_errors() {
    let e = errors(&format!(
        "{MINIMAL}[filesystem]\nread = [\"{{home}}/.ssh\"]\ncanaries = [\"{{home}}/.ssh\"]\n"
    ));
    assert_eq!(e[0].key.as_deref(), Some("filesystem.canaries[0]"));
    let e = errors("[agent]\nname = \"t\"\nmode = \"monitor\"\n[breaker]\naction = \"kill\"\n");
    assert_eq!(e[0].key.as_deref(), Some("breaker.action"));
    let e = errors(&format!("{MINIMAL}[identity]\nrun_as = \"user\"\n"));
    assert!(e[0].hint.as_deref().unwrap().contains("user = "));
    let e = errors(&format!(
        "{MINIMAL}[identity]\nrun_as = \"user\"\nuser = \"root\"\n"
    ));
    assert!(e[0].message.contains("never runs as root"));
    let e = errors(&format!("{MINIMAL}[breaker]\nwindow = \"1m\"\n"));
    assert_eq!(e[0].key.as_deref(), Some("breaker.window"));
    let e = errors(&format!(
        "{MINIMAL}[environment]\npass = [\"HOME\"]\nset = {{ HOME = \"/x\" }}\n"
    ));
    assert_eq!(e[0].key.as_deref(), Some("environment.set.HOME"));
}

#[test]
fn loader_variables_are_refused() {
    for name in ["LD_PRELOAD", "LD_LIBRARY_PATH", "BASH_ENV"] {
        let e = errors(&format!("{MINIMAL}[environment]\npass = [\"{name}\"]\n"));
        assert!(e[0].message.contains(name));
        let e = errors(&format!(
            "{MINIMAL}[environment]\nset = {{ {name} = \"x\" }}\n"
        ));
        assert!(e[0].message.contains(name));
    }
}

#[test]
fn compile_merges_rights_and_resolves_templates() {
    let p = parse(
        "t",
        &format!("{MINIMAL}[filesystem]\nread = [\"{{workspace}}\", \"/usr\"]\nwrite = [\"{{workspace}}\"]\nexec = [\"/usr/bin\"]\ncanaries = [\"{{home}}/.aws\"]\n"),
    )
    .unwrap();
    let c = compile(&p, &ctx());
    let rule = |path: &str| {
        c.landlock
            .rules
            .iter()
            .find(|r| r.path == Path::new(path))
            .unwrap()
            .access
    };
    assert_eq!(
        rule("/w/proj"),
        FsAccess {
            read: true,
            write: true,
            exec: false
        }
    );
    assert_eq!(
        rule("/usr"),
        FsAccess {
            read: true,
            write: false,
            exec: false
        }
    );
    assert_eq!(
        rule("/usr/bin"),
        FsAccess {
            read: false,
            write: false,
            exec: true
        }
    );
    assert_eq!(c.canaries, [PathBuf::from("/home/u/.aws")]);
    assert!(c.fs_allows(Path::new("/usr/bin/ls"), |a| a.exec));
    assert!(
        !c.fs_allows(Path::new("/usrx/bin"), |a| a.read),
        "prefixes match whole components"
    );
}

#[test]
fn a_grant_marked_with_a_question_mark_is_optional() {
    let p = parse(
        "t",
        &format!(
            "{MINIMAL}[filesystem]\nread = [\"{{home}}/.nvm?\", \"/usr?\", \"/opt?\"]\nexec = [\"{{home}}/.nvm?\", \"/usr\"]\n"
        ),
    )
    .unwrap();
    let c = compile(&p, &ctx());
    // Granted as any other; optional only where every mention says so.
    assert!(c.fs_allows(Path::new("/home/u/.nvm/bin/node"), |a| a.exec));
    assert_eq!(
        c.landlock.optional,
        [PathBuf::from("/home/u/.nvm"), PathBuf::from("/opt")]
    );
}

#[test]
fn environment_set_expands_home_and_workspace() {
    let p = parse(
        "t",
        &format!(
            "{MINIMAL}[environment]\nset = {{ CLAUDE_CONFIG_DIR = \"{{home}}/.claude\", OUT = \"{{workspace}}/out:{{home}}\", JSON = \"{{\\\"a\\\": 1}}\" }}\n"
        ),
    )
    .unwrap();
    let c = compile(&p, &ctx());
    let set: std::collections::BTreeMap<&str, &str> = c
        .env
        .set
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(set["CLAUDE_CONFIG_DIR"], "/home/u/.claude");
    assert_eq!(set["OUT"], "/w/proj/out:/home/u");
    assert_eq!(set["JSON"], "{\"a\": 1}", "other braces are kept");
}

#[test]
fn network_rules_compile_to_trie_entries() {
    let p = parse(
        "t",
        &format!("{MINIMAL}[network]\nconnect = [\"10.0.0.0/8:443\", \"::1/128:8080\", \"127.0.0.53/32:53/udp\"]\nbind = [8080, \"5353/udp\"]\n"),
    )
    .unwrap();
    let c = compile(&p, &ctx());
    assert!(c.network.families.contains(&SocketFamily::NetlinkRoute));
    let e = c
        .network
        .connect_entries
        .iter()
        .find(|e| e.port == 443)
        .unwrap();
    assert_eq!(
        (e.addr.to_string().as_str(), e.prefix, e.proto),
        ("::ffff:10.0.0.0", 104, 6)
    );
    let any = parse(
        "t",
        &format!("{MINIMAL}[network]\nconnect = [\"10.0.0.0/8:*\"]\n"),
    )
    .unwrap();
    let c = compile(&any, &ctx());
    assert_eq!(c.network.connect_entries[0].port, 0);
}

#[test]
fn load_prefers_installed_profiles_over_builtins() {
    let dir = std::env::temp_dir().join(format!("agentd-profile-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("analyze-only.toml"),
        "[agent]\nname = \"analyze-only\"\ndescription = \"site\"\n",
    )
    .unwrap();
    let (p, origin) = load_from("analyze-only", &dir).unwrap();
    assert_eq!(p.description, "site");
    assert!(origin.ends_with("analyze-only.toml"));
    let (_, origin) = load_from("coding-agent", &dir).unwrap();
    assert_eq!(origin, "builtin:coding-agent");
    assert!(matches!(
        load_from("nope", &dir),
        Err(LoadError::UnknownName { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn protect_lists_paths_inside_writable_trees() {
    let p = parse(
        "t.toml",
        &format!(
            "{MINIMAL}[filesystem]\nwrite = [\"{{workspace}}\", \"/tmp\"]\nprotect = [\"{{workspace}}/.git/hooks\", \"{{workspace}}/.git/config\"]\n"
        ),
    )
    .unwrap();
    let c = compile(&p, &ctx());
    assert_eq!(
        c.protect,
        [
            PathBuf::from("/w/proj/.git/config"),
            PathBuf::from("/w/proj/.git/hooks")
        ]
    );
    // A path under another base may resolve inside a writable tree: accepted here,
    // resolved at launch.
    assert!(
        parse(
            "t.toml",
            &format!(
                "{MINIMAL}[filesystem]\nwrite = [\"{{workspace}}\"]\nprotect = [\"/srv/repo/.git\"]\n"
            ),
        )
        .is_ok()
    );
}

#[test]
fn protect_outside_the_writable_trees_or_around_one_is_an_error() {
    let e = errors(&format!(
        "{MINIMAL}[filesystem]\nwrite = [\"{{workspace}}/out\"]\nprotect = [\"{{workspace}}/.git\"]\n"
    ));
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].key.as_deref(), Some("filesystem.protect[0]"));
    assert!(
        e[0].message.contains("not inside any filesystem.write"),
        "{e:?}"
    );
    assert_eq!(e[0].line, Some(5));

    let e = errors(&format!(
        "{MINIMAL}[filesystem]\nwrite = [\"{{workspace}}/src\"]\nprotect = [\"{{workspace}}\"]\n"
    ));
    assert!(
        e.iter()
            .any(|e| e.message.contains("contains a filesystem.write path")),
        "{e:?}"
    );

    let long = "x".repeat(agentd_common::GUARDED_NAME_LEN);
    let e = errors(&format!(
        "{MINIMAL}[filesystem]\nwrite = [\"{{workspace}}\"]\nprotect = [\"{{workspace}}/{long}\"]\n"
    ));
    assert!(e[0].message.contains("longer than"), "{e:?}");

    let many: Vec<String> = (0..=agentd_common::MAX_PROTECT)
        .map(|i| format!("\"{{workspace}}/p{i}\""))
        .collect();
    let e = errors(&format!(
        "{MINIMAL}[filesystem]\nwrite = [\"{{workspace}}\"]\nprotect = [{}]\n",
        many.join(", ")
    ));
    assert!(e[0].message.contains("at most"), "{e:?}");
}

#[test]
fn network_unix_lists_sockets_by_path() {
    let p = parse(
        "t.toml",
        &format!(
            "{MINIMAL}[network]\nunix = [\"/run/docker.sock\", \"{{workspace}}/.dev/db.sock\"]\n"
        ),
    )
    .unwrap();
    let c = compile(&p, &ctx());
    assert_eq!(
        c.network.unix,
        [
            PathBuf::from("/run/docker.sock"),
            PathBuf::from("/w/proj/.dev/db.sock")
        ]
    );
    assert!(
        compile(&parse("t.toml", MINIMAL).unwrap(), &ctx())
            .network
            .unix
            .is_empty()
    );
}

#[test]
fn network_unix_entries_must_name_a_socket() {
    let e = errors(&format!("{MINIMAL}[network]\nunix = [\"run/x.sock\"]\n"));
    assert_eq!(e[0].key.as_deref(), Some("network.unix[0]"), "{e:?}");
    assert!(e[0].message.contains("relative path"), "{e:?}");
    assert_eq!(e[0].line, Some(4), "{e:?}");

    for bad in ["/", "{workspace}"] {
        let e = errors(&format!("{MINIMAL}[network]\nunix = [\"{bad}\"]\n"));
        assert!(e[0].message.contains("socket's name"), "{bad}: {e:?}");
    }
    let long = "x".repeat(agentd_common::GUARDED_NAME_LEN);
    let e = errors(&format!("{MINIMAL}[network]\nunix = [\"/run/{long}\"]\n"));
    assert!(e[0].message.contains("socket's name"), "{e:?}");

    let many: Vec<String> = (0..=agentd_common::MAX_UNIX_PEERS)
        .map(|i| format!("\"/run/s{i}.sock\""))
        .collect();
    let e = errors(&format!(
        "{MINIMAL}[network]\nunix = [{}]\n",
        many.join(", ")
    ));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].message.contains("at most"), "{e:?}");
}

#[test]
fn network_connect_names_compile_apart_from_addresses() {
    let p = parse(
        "t",
        &format!(
            "{MINIMAL}[network]\nconnect = [\"*.example.org:443\", \"api.example.com:443\", \"127.0.0.1/32:8080\", \"api.example.com:53/udp\"]\n[breaker]\ntrip_on = [\"dns\"]\n"
        ),
    )
    .unwrap();
    let c = compile(&p, &ctx());
    assert_eq!(
        c.network
            .connect
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["127.0.0.1/32:8080/tcp"]
    );
    assert_eq!(
        c.network
            .names
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        [
            "api.example.com:53/udp",
            "api.example.com:443/tcp",
            "*.example.org:443/tcp"
        ]
    );
    assert_eq!(
        c.network.connect_entries.len(),
        1,
        "names make no trie entry"
    );
    assert_eq!(c.breaker.trip_on, [ViolationKind::Dns]);
    assert_eq!(ViolationKind::Dns.as_str(), "dns");
    let json = serde_json::to_value(&c.network).unwrap();
    assert_eq!(json["names"][2], "*.example.org:443/tcp");

    // A name rule alone opens NETLINK_ROUTE, as any network rule does.
    let only = parse(
        "t",
        &format!("{MINIMAL}[network]\nconnect = [\"localhost:8080\"]\n"),
    )
    .unwrap();
    let c = compile(&only, &ctx());
    assert!(c.network.families.contains(&SocketFamily::NetlinkRoute));
    assert!(c.network.connect.is_empty() && c.network.connect_entries.is_empty());
}

#[test]
fn network_connect_name_errors_name_line_key_and_fix() {
    let errs = errors(&format!(
        "{MINIMAL}[network]\nconnect = [\n  \"Api.Example.com:443\",\n  \"a.*.example.com:443\",\n  \"api.example.com:443\",\n  \"api.example.com:443/tcp\",\n]\n"
    ));
    let keys: Vec<(&str, usize)> = errs
        .iter()
        .map(|e| (e.key.as_deref().unwrap(), e.line.unwrap()))
        .collect();
    assert_eq!(
        keys,
        [
            ("network.connect[0]", 5),
            ("network.connect[1]", 6),
            ("network.connect[3]", 8)
        ]
    );
    assert_eq!(
        errs[0].hint.as_deref(),
        Some("write \"api.example.com:443\"")
    );
    assert!(errs[2].message.contains("listed twice"), "{}", errs[2]);
}

const ASKING: &str = "[agent]\nname = \"t\"\n[filesystem]\nread = [\"/usr\"]\nwrite = [\"{workspace}\"]\nexec = [\"/usr/lib\"]\nask_exec = [\"/usr/bin/git\", \"{home}/.local/bin/tool?\"]\n[network]\nconnect = [\"api.example.com:443\", \"10.1.0.0/16:443\"]\nask = [\"*.example.org:443\", \"10.0.0.0/8:*\", \"forum.example.com:443\"]\n[ask]\ntimeout = \"5m\"\nmax_pending = 8\nrequire_signature = true\n";

#[test]
fn ask_rules_parse_and_compile() {
    let p = parse("t.toml", ASKING).unwrap();
    assert_eq!(
        p.ask,
        Ask {
            timeout: Duration::from_secs(300),
            max_pending: 8,
            require_signature: true
        }
    );
    let c = compile(&p, &ctx());
    let ask = c.ask.as_ref().expect("ask rules compile to an ask policy");
    assert_eq!(
        ask.connect
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["10.0.0.0/8:*/tcp"]
    );
    assert_eq!(
        ask.names
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["forum.example.com:443/tcp", "*.example.org:443/tcp"]
    );
    assert_eq!(
        ask.exec,
        [
            PathBuf::from("/home/u/.local/bin/tool"),
            PathBuf::from("/usr/bin/git")
        ]
    );
    assert_eq!(
        (ask.timeout, ask.max_pending, ask.require_signature),
        (Duration::from_secs(300), 8, true)
    );
    // Ask rules are not allow rules: no trie entry, no name the resolver admits for.
    assert_eq!(
        c.network
            .connect
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["10.1.0.0/16:443/tcp"]
    );
    assert_eq!(c.network.connect_entries.len(), 1);
    assert_eq!(
        c.network
            .names
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["api.example.com:443/tcp"]
    );
    // The optional mark carries over, as for any grant.
    assert_eq!(
        c.landlock.optional,
        [PathBuf::from("/home/u/.local/bin/tool")]
    );
    let json = serde_json::to_value(&c).unwrap();
    assert_eq!(json["ask"]["timeout"], "5m");
    assert_eq!(json["ask"]["names"][1], "*.example.org:443/tcp");
    assert_eq!(json["ask"]["exec"][1], "/usr/bin/git");
}

#[test]
fn held_calls_go_to_notify_and_leave_the_allow_list() {
    let notify_of = |toml: &str| {
        let c = compile(&parse("t.toml", toml).unwrap(), &ctx());
        for call in &c.seccomp.notify {
            assert!(
                !c.seccomp.allow.contains(call),
                "{call} is both allowed and notified"
            );
        }
        (c.seccomp.notify.clone(), c.seccomp.allow.len())
    };
    let (notify, plain) = notify_of(MINIMAL);
    assert!(notify.is_empty());
    assert!(compile(&parse("t", MINIMAL).unwrap(), &ctx()).ask.is_none());

    let (notify, allowed) = notify_of(ASKING);
    assert_eq!(notify, ["connect", "execve", "execveat"]);
    assert_eq!(allowed, plain - 3);
    // The filter builds: no call is in two lists.
    let c = compile(&parse("t.toml", ASKING).unwrap(), &ctx());
    let filter = crate::sandbox::seccomp::compile(&c.seccomp).unwrap();
    assert_eq!(filter.summary.notify, ["connect", "execve", "execveat"]);

    let (notify, allowed) = notify_of(&format!(
        "{MINIMAL}[network]\nask = [\"forum.example.com:443\"]\n"
    ));
    assert_eq!(notify, ["connect"]);
    assert_eq!(allowed, plain - 1);

    let (notify, allowed) = notify_of(&format!(
        "{MINIMAL}[filesystem]\nask_exec = [\"/usr/bin/git\"]\n"
    ));
    assert_eq!(notify, ["execve", "execveat"]);
    assert_eq!(allowed, plain - 2);
}

#[test]
fn ask_exec_programs_get_landlock_exec_rights() {
    let c = compile(&parse("t.toml", ASKING).unwrap(), &ctx());
    let rule = |path: &str| {
        c.landlock
            .rules
            .iter()
            .find(|r| r.path == Path::new(path))
            .unwrap_or_else(|| panic!("no rule for {path}"))
            .access
    };
    // exec = EXECUTE | READ_FILE in the launch's mapping.
    assert_eq!(
        rule("/usr/bin/git"),
        FsAccess {
            read: false,
            write: false,
            exec: true
        }
    );
    assert!(rule("/home/u/.local/bin/tool").exec);
    assert!(c.fs_allows(Path::new("/usr/bin/git"), |a| a.exec));
    assert!(!c.fs_allows(Path::new("/usr/bin/ls"), |a| a.exec));
    // Merged with the path's other rights.
    let c = compile(
        &parse(
            "t.toml",
            &format!(
                "{MINIMAL}[filesystem]\nread = [\"/opt/t/run\"]\nask_exec = [\"/opt/t/run\"]\n"
            ),
        )
        .unwrap(),
        &ctx(),
    );
    assert_eq!(
        c.landlock.rules,
        [FsRule {
            path: PathBuf::from("/opt/t/run"),
            access: FsAccess {
                read: true,
                write: false,
                exec: true
            }
        }]
    );
}

#[test]
fn an_ask_exec_program_the_agent_could_write_gets_no_exec_right() {
    // Different bases: only the launch context tells that {home}/bin lies in /home.
    let p = parse(
        "t.toml",
        &format!(
            "{MINIMAL}[filesystem]\nwrite = [\"/home\"]\nask_exec = [\"{{home}}/bin/tool\"]\n"
        ),
    )
    .unwrap();
    let c = compile(&p, &ctx());
    assert!(!c.fs_allows(Path::new("/home/u/bin/tool"), |a| a.exec));
    assert_eq!(
        c.ask.unwrap().exec,
        [PathBuf::from("/home/u/bin/tool")],
        "still held (and refused): never run without a person"
    );
}

#[test]
fn ask_defaults() {
    let p = parse(
        "t.toml",
        &format!("{MINIMAL}[network]\nask = [\"10.0.0.0/8:443\"]\n"),
    )
    .unwrap();
    assert_eq!(p.ask, Ask::default());
    assert_eq!(
        Ask::default(),
        Ask {
            timeout: Duration::from_secs(60),
            max_pending: 4,
            require_signature: false
        }
    );
    let c = compile(&p, &ctx());
    let ask = c.ask.unwrap();
    assert_eq!(
        (ask.timeout, ask.max_pending, ask.require_signature),
        (Duration::from_secs(60), 4, false)
    );
    assert!(ask.names.is_empty() && ask.exec.is_empty());
    assert!(c.network.families.contains(&SocketFamily::NetlinkRoute));
    // Bounds are inclusive.
    let p = parse(
        "t.toml",
        &format!(
            "{MINIMAL}[network]\nask = [\"10.0.0.0/8:443\"]\n[ask]\ntimeout = \"24h\"\nmax_pending = 64\n"
        ),
    )
    .unwrap();
    assert_eq!(
        (p.ask.timeout, p.ask.max_pending),
        (Duration::from_secs(86400), 64)
    );
    let p = parse(
        "t.toml",
        &format!(
            "{MINIMAL}[network]\nask = [\"10.0.0.0/8:443\"]\n[ask]\ntimeout = \"1s\"\nmax_pending = 1\n"
        ),
    )
    .unwrap();
    assert_eq!(
        (p.ask.timeout, p.ask.max_pending),
        (Duration::from_secs(1), 1)
    );
}

/// (key, line) of each error.
fn located(text: &str) -> Vec<(String, usize)> {
    errors(text)
        .into_iter()
        .map(|e| (e.key.unwrap_or_default(), e.line.unwrap_or(0)))
        .collect()
}

#[test]
fn an_ask_rule_network_connect_allows_already_is_an_error() {
    let text = format!(
        "{MINIMAL}[network]\nconnect = [\"api.example.com:443\", \"*.example.net:*\", \"10.0.0.0/8:443\", \"0.0.0.0/0:*/udp\"]\nask = [\n  \"api.example.com:443\",\n  \"a.example.net:443\",\n  \"10.0.0.0/8:443\",\n  \"10.1.0.0/16:443\",\n  \"10.0.0.0/8:80\",\n  \"10.0.0.0/8:*\",\n  \"192.168.0.0/16:53/udp\",\n  \"example.net:443\",\n]\n"
    );
    let errs = errors(&text);
    assert_eq!(
        errs.iter()
            .map(|e| (e.key.as_deref().unwrap(), e.line.unwrap()))
            .collect::<Vec<_>>(),
        [
            ("network.ask[0]", 6),
            ("network.ask[1]", 7),
            ("network.ask[2]", 8),
            ("network.ask[3]", 9),
            ("network.ask[6]", 12),
        ],
        "{errs:?}"
    );
    assert!(
        errs[0]
            .message
            .contains("`api.example.com:443/tcp` is also in network.connect"),
        "{}",
        errs[0]
    );
    assert!(
        errs[1]
            .message
            .contains("already allowed by network.connect `*.example.net:*/tcp`"),
        "{}",
        errs[1]
    );
    assert!(
        errs[2].message.contains("also in network.connect"),
        "{}",
        errs[2]
    );
    assert!(
        errs[3].message.contains("`10.0.0.0/8:443/tcp`"),
        "{}",
        errs[3]
    );
    assert!(errs[4].message.contains("`0.0.0.0/0:*/udp`"), "{}", errs[4]);
    for e in &errs {
        assert!(e.message.contains("never be held for a person"), "{e}");
        assert_eq!(
            e.hint.as_deref(),
            Some("remove it from one of the two lists")
        );
    }
}

#[test]
fn ask_entries_get_the_connect_syntax_errors() {
    let errs = errors(&format!(
        "{MINIMAL}[network]\nask = [\"Forum.Example.com:443\", \"10.0.0.1/8:443\", \"x.example.com:443\", \"x.example.com:443/tcp\"]\n"
    ));
    assert_eq!(
        errs.iter()
            .map(|e| e.key.as_deref().unwrap())
            .collect::<Vec<_>>(),
        ["network.ask[0]", "network.ask[1]", "network.ask[3]"]
    );
    assert!(errs.iter().all(|e| e.line == Some(4)));
    assert_eq!(
        errs[0].hint.as_deref(),
        Some("write \"forum.example.com:443\"")
    );
    assert!(errs[1].hint.as_deref().unwrap().contains("10.0.0.0/8"));
    assert!(errs[2].message.contains("listed twice"));
}

#[test]
fn an_ask_exec_program_exec_allows_already_is_an_error() {
    let text = format!(
        "{MINIMAL}[filesystem]\nexec = [\"/usr/bin/git\", \"/opt/tools\"]\nask_exec = [\n  \"/usr/bin/git\",\n  \"/opt/tools/bin/x\",\n  \"/usr/bin/gitk\",\n  \"{{home}}/tools/x\",\n]\n"
    );
    let errs = errors(&text);
    assert_eq!(
        errs.iter()
            .map(|e| (e.key.as_deref().unwrap(), e.line.unwrap()))
            .collect::<Vec<_>>(),
        [("filesystem.ask_exec[0]", 6), ("filesystem.ask_exec[1]", 7)],
        "{errs:?}"
    );
    assert!(
        errs[0]
            .message
            .contains("`/usr/bin/git` is also in filesystem.exec"),
        "{}",
        errs[0]
    );
    assert!(
        errs[1]
            .message
            .contains("already allowed by filesystem.exec `/opt/tools`"),
        "{}",
        errs[1]
    );
    for e in &errs {
        assert!(e.message.contains("never be held for a person"), "{e}");
        assert_eq!(
            e.hint.as_deref(),
            Some("remove it from one of the two lists")
        );
    }
}

#[test]
fn ask_exec_paths_are_checked_as_exec_paths() {
    let errs = errors(&format!(
        "{MINIMAL}[filesystem]\nwrite = [\"{{workspace}}\"]\ncanaries = [\"{{home}}/.ssh/x\"]\nask_exec = [\n  \"bin/git\",\n  \"/usr/../bin/sh\",\n  \"/usr/bin/git\",\n  \"/usr/bin/git\",\n  \"/\",\n  \"{{workspace}}/run.sh\",\n  \"{{home}}/.ssh/x\",\n]\n"
    ));
    assert_eq!(
        errs.iter()
            .map(|e| (e.key.as_deref().unwrap(), e.line.unwrap()))
            .collect::<Vec<_>>(),
        [
            ("filesystem.canaries[0]", 5),
            ("filesystem.ask_exec[0]", 7),
            ("filesystem.ask_exec[1]", 8),
            ("filesystem.ask_exec[3]", 10),
            ("filesystem.ask_exec[4]", 11),
            ("filesystem.ask_exec[5]", 12),
        ],
        "{errs:?}"
    );
    assert!(
        errs[0].message.contains("granted in filesystem.ask_exec"),
        "{}",
        errs[0]
    );
    assert!(errs[1].message.contains("relative path"), "{}", errs[1]);
    assert!(errs[2].message.contains("`..`"), "{}", errs[2]);
    assert!(errs[3].message.contains("listed twice"), "{}", errs[3]);
    assert!(errs[4].message.contains("is a directory"), "{}", errs[4]);
    assert!(
        errs[5]
            .message
            .contains("inside filesystem.write `{workspace}`: the agent could change the program"),
        "{}",
        errs[5]
    );
}

#[test]
fn ask_rules_in_monitor_mode_are_errors() {
    let text = "[agent]\nname = \"t\"\nmode = \"monitor\"\n[filesystem]\nask_exec = [\"/usr/bin/git\"]\n[network]\nask = [\"10.0.0.0/8:443\"]\n[breaker]\naction = \"deny\"\n";
    let errs = errors(text);
    assert_eq!(
        errs.iter()
            .map(|e| (e.key.as_deref().unwrap(), e.line.unwrap()))
            .collect::<Vec<_>>(),
        [("filesystem.ask_exec", 5), ("network.ask", 7)],
        "{errs:?}"
    );
    assert!(errs[0].message.contains("monitor"), "{}", errs[0]);
    assert!(
        errs[0]
            .hint
            .as_deref()
            .unwrap()
            .contains("mode = \"enforce\"")
    );
    // Empty lists hold nothing: no contradiction.
    assert!(
        parse(
            "t.toml",
            "[agent]\nname = \"t\"\nmode = \"monitor\"\n[network]\nask = []\n[breaker]\naction = \"deny\"\n"
        )
        .is_ok()
    );
}

#[test]
fn an_ask_table_without_ask_rules_is_an_error() {
    for text in [
        format!("{MINIMAL}[ask]\ntimeout = \"30s\"\n"),
        format!("{MINIMAL}[network]\nask = []\n[ask]\ntimeout = \"30s\"\n"),
    ] {
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].key.as_deref(), Some("ask"));
        assert!(
            errs[0].message.contains("nothing to ask about"),
            "{}",
            errs[0]
        );
        assert!(
            errs[0]
                .hint
                .as_deref()
                .unwrap()
                .contains("add network.ask or filesystem.ask_exec")
        );
        let header = text.lines().position(|l| l == "[ask]").unwrap() + 1;
        assert_eq!(errs[0].line, Some(header), "the [ask] header");
    }
}

#[test]
fn ask_settings_out_of_range_are_errors() {
    let base = format!("{MINIMAL}[network]\nask = [\"10.0.0.0/8:443\"]\n[ask]\n");
    for (setting, key, needle) in [
        ("timeout = \"500ms\"", "ask.timeout", "between 1s and 24h"),
        ("timeout = \"25h\"", "ask.timeout", "between 1s and 24h"),
        ("timeout = \"0s\"", "ask.timeout", "0"),
        ("timeout = \"soon\"", "ask.timeout", "not a duration"),
        ("max_pending = 0", "ask.max_pending", "between 1 and 64"),
        ("max_pending = 65", "ask.max_pending", "between 1 and 64"),
        ("max_pending = -1", "ask.max_pending", "between 1 and 64"),
    ] {
        let errs = errors(&format!("{base}{setting}\n"));
        assert_eq!(errs.len(), 1, "{setting}: {errs:?}");
        assert_eq!(errs[0].key.as_deref(), Some(key), "{setting}");
        assert_eq!(errs[0].line, Some(6), "{setting}");
        assert!(errs[0].message.contains(needle), "{setting}: {}", errs[0]);
        assert!(errs[0].hint.is_some(), "{setting}");
    }
    // Wrong types and unknown keys, as everywhere.
    assert_eq!(
        located(&format!("{base}require_signature = \"yes\"\n")),
        [("ask.require_signature".to_owned(), 6)]
    );
    let e = &errors(&format!("{base}max_pendng = 2\n"))[0];
    assert_eq!(e.key.as_deref(), Some("ask.max_pendng"));
    assert!(e.hint.as_deref().unwrap().contains("`max_pending`"), "{e}");
}

#[test]
fn denied_is_a_breaker_kind() {
    let p = parse(
        "t.toml",
        &format!(
            "{MINIMAL}[network]\nask = [\"10.0.0.0/8:443\"]\n[breaker]\ntrip_on = [\"denied\", \"canary\"]\n"
        ),
    )
    .unwrap();
    assert_eq!(
        p.breaker.trip_on,
        [ViolationKind::Denied, ViolationKind::Canary]
    );
    assert_eq!(ViolationKind::Denied.as_str(), "denied");
    assert_eq!(
        serde_json::to_value(ViolationKind::Denied).unwrap(),
        "denied"
    );
    assert!(!DEFAULT_TRIP_ON.contains(&ViolationKind::Denied));
}

#[test]
fn entry_keys_count_every_entry_as_written() {
    // An invalid entry before another does not shift the other's index.
    assert_eq!(
        located(&format!(
            "{MINIMAL}[network]\nunix = [\"rel.sock\", \"/\"]\n"
        )),
        [
            ("network.unix[0]".to_owned(), 4),
            ("network.unix[1]".to_owned(), 4)
        ]
    );
    assert_eq!(
        located(&format!(
            "{MINIMAL}[filesystem]\nwrite = [\"{{workspace}}/out\"]\nprotect = [\"rel\", \"{{workspace}}/.git\"]\n"
        )),
        [
            ("filesystem.protect[0]".to_owned(), 5),
            ("filesystem.protect[1]".to_owned(), 5)
        ]
    );
}

#[test]
fn ask_exec_with_a_writable_tree_that_runs_programs_is_an_error() {
    // The agent could copy the program into {workspace} and run the copy unasked.
    let text = format!(
        "{MINIMAL}[filesystem]\nwrite = [\"{{workspace}}\"]\nexec = [\"{{workspace}}/bin\", \"/usr/lib\"]\nask_exec = [\"/usr/bin/git\"]\n"
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].key.as_deref(), Some("filesystem.ask_exec"));
    assert!(
        errs[0]
            .message
            .contains("may write `{workspace}` and run programs from `{workspace}/bin`"),
        "{}",
        errs[0]
    );
    // Writable and executable trees apart: fine.
    let text = format!(
        "{MINIMAL}[filesystem]\nwrite = [\"{{workspace}}\"]\nexec = [\"/usr/lib\"]\nask_exec = [\"/usr/bin/git\"]\n"
    );
    assert!(parse("t.toml", &text).is_ok());
}

#[test]
fn on_event_loss_reports_by_default_and_kill_is_a_choice() {
    let c = compile(&parse("t", MINIMAL).unwrap(), &ctx());
    assert_eq!(c.breaker.on_event_loss, OnEventLoss::Report);
    for (value, want) in [("report", OnEventLoss::Report), ("kill", OnEventLoss::Kill)] {
        let text = format!("{MINIMAL}[breaker]\non_event_loss = \"{value}\"\n");
        let c = compile(&parse("t", &text).unwrap(), &ctx());
        assert_eq!(c.breaker.on_event_loss, want, "{value}");
    }
    // Independent of what violations do: a breaker that only denies may still kill on loss.
    let text = format!("{MINIMAL}[breaker]\naction = \"deny\"\non_event_loss = \"kill\"\n");
    let c = compile(&parse("t", &text).unwrap(), &ctx());
    assert_eq!(
        (c.breaker.action, c.breaker.on_event_loss),
        (Action::Deny, OnEventLoss::Kill)
    );
    let shown = crate::report::render_policy("t", &c);
    assert!(shown.contains("lost events: kill the agent"), "{shown}");
}

#[test]
fn on_event_loss_is_parsed_strictly() {
    for bad in ["\"ignore\"", "\"Kill\"", "true", "[\"kill\"]"] {
        let e = &errors(&format!("{MINIMAL}[breaker]\non_event_loss = {bad}\n"))[0];
        assert_eq!(e.line, Some(4), "{bad}: {e}");
        assert_eq!(
            e.key.as_deref(),
            Some("breaker.on_event_loss"),
            "{bad}: {e}"
        );
    }
    let e = &errors(&format!("{MINIMAL}[breaker]\non_event_los = \"kill\"\n"))[0];
    assert!(
        e.hint.as_deref().unwrap().contains("`on_event_loss`"),
        "a typo is named: {e}"
    );
}

#[test]
fn on_event_loss_kill_contradicts_monitor_mode() {
    let monitor = "[agent]\nname = \"t\"\nmode = \"monitor\"\n[breaker]\naction = \"deny\"\n";
    let e = errors(&format!("{monitor}on_event_loss = \"kill\"\n"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].key.as_deref(), Some("breaker.on_event_loss"));
    assert_eq!(e[0].line, Some(6));
    assert!(
        e[0].message
            .contains("monitor mode records and never kills"),
        "{}",
        e[0]
    );
    assert!(
        e[0].hint.as_deref().unwrap().contains("\"report\""),
        "{}",
        e[0]
    );
    let c = compile(
        &parse("t", &format!("{monitor}on_event_loss = \"report\"\n")).unwrap(),
        &ctx(),
    );
    assert_eq!(c.breaker.on_event_loss, OnEventLoss::Report);
}
