//! Profile parsing, validation and compilation, end to end on text. No root needed.

use std::path::{Path, PathBuf};

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
