//! `agentd profile check` against the shipped profiles and broken ones, through the binary.

use agentd_tests::{agentd, repo_root, stderr, stdout};

#[test]
fn every_shipped_profile_passes_check() {
    let dir = repo_root().join("profiles");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "expected the shipped profiles in {}",
        dir.display()
    );
    let mut args = vec!["profile", "check", "--json"];
    args.extend(files.iter().map(String::as_str));
    let out = agentd(&args);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let results: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let results = results.as_array().unwrap();
    assert_eq!(results.len(), files.len());
    for r in results {
        assert_eq!(r["valid"], true, "{r}");
        assert!(r["policy"]["landlock"]["rules"].as_array().unwrap().len() > 3);
    }
}

#[test]
fn builtin_names_resolve_without_files() {
    for name in ["analyze-only", "coding-agent", "offline-build"] {
        let out = agentd(&["profile", "check", name]);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", stderr(&out));
        assert!(stdout(&out).contains(&format!("{name} (builtin:{name}): valid")));
    }
}

#[test]
fn misspelt_key_fails_with_exit_2_naming_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.toml");
    std::fs::write(
        &path,
        "[agent]\nname = \"typo\"\n\n[filesystem]\nread = [\"/usr\"]\nwrtie = [\"/\"]\n",
    )
    .unwrap();
    let out = agentd(&["profile", "check", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains(&format!("{}:6:1", path.display())), "{err}");
    assert!(err.contains("filesystem.wrtie"), "{err}");
    assert!(err.contains("did you mean `write`?"), "{err}");
    assert!(
        stdout(&out).is_empty(),
        "an invalid profile must print no policy"
    );
}

#[test]
fn one_bad_profile_among_good_ones_still_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[agent]\nname = \"bad\"\n[network]\nconnect = [\"10.0.0.1/8:443\"]\n",
    )
    .unwrap();
    let out = agentd(&[
        "profile",
        "check",
        "--json",
        "analyze-only",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v[0]["valid"], true);
    assert_eq!(v[1]["valid"], false);
    assert_eq!(v[1]["errors"][0]["line"], 4);
    assert_eq!(v[1]["errors"][0]["key"], "network.connect[0]");
    assert!(
        v[1]["errors"][0]["hint"]
            .as_str()
            .unwrap()
            .contains("10.0.0.0/8")
    );
}

#[test]
fn unknown_profile_name_is_an_error() {
    let out = agentd(&["profile", "check", "no-such-profile"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("analyze-only"),
        "the error lists the built-in names"
    );
}
