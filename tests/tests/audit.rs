//! `agentd audit verify` as an operator runs it, on logs the real binary wrote (through
//! `agentd-harness audit-sample`): exit statuses, the record and line it names, `--all` across
//! rotated files, `--json`, `--expect-head`. Needs no root.
#![expect(clippy::expect_used, clippy::unwrap_used, reason = "tests")]

use std::{
    fs,
    path::{Path, PathBuf},
    process::Output,
};

use agentd_tests::{agentd, harness, stderr, stdout};

const TAMPERED: i32 = 1;
const UNREADABLE: i32 = 2;
const INCOMPLETE: i32 = 3;

fn code(o: &Output) -> i32 {
    o.status.code().expect("agentd died of a signal")
}

fn explain(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        stdout(o),
        stderr(o)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// `agentd-harness audit-sample PATH ARGS...`; returns the head hash it prints.
fn sample(path: &Path, args: &[&str]) -> String {
    let mut all = vec!["audit-sample", s(path)];
    all.extend_from_slice(args);
    let o = harness(&all);
    assert_eq!(code(&o), 0, "{}", explain(&o));
    let out = stdout(&o);
    let head = out
        .split("head ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no head in {out:?}"));
    assert_eq!(head.len(), 64, "{out}");
    head.to_owned()
}

fn verify(args: &[&str]) -> Output {
    let mut all = vec!["audit", "verify"];
    all.extend_from_slice(args);
    agentd(&all)
}

fn log_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    (dir, path)
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

#[test]
fn an_intact_log_verifies_and_prints_its_head() {
    let (_dir, path) = log_dir();
    let head = sample(&path, &["--records", "30"]);
    let o = verify(&[s(&path)]);
    assert_eq!(code(&o), 0, "{}", explain(&o));
    assert!(
        stdout(&o).starts_with(&format!("ok: 31 records, head {head}")),
        "{}",
        explain(&o)
    );
    assert!(stderr(&o).is_empty(), "{}", explain(&o));
}

#[test]
fn editing_any_one_line_fails_naming_that_record() {
    let (_dir, path) = log_dir();
    sample(&path, &["--records", "30"]);
    let original = lines(&path);
    for (k, line) in original.iter().enumerate() {
        let n = k + 1;
        // One character of the record's timestamp.
        let mut copy = original.clone();
        copy[k] = line.replacen("\"ts\":\"2", "\"ts\":\"1", 1);
        assert_ne!(copy[k], *line);
        write_lines(&path, &copy);
        let o = verify(&[s(&path)]);
        assert_eq!(code(&o), TAMPERED, "line {n}: {}", explain(&o));
        let place = if n == 1 {
            "line 1: ".to_owned()
        } else {
            format!("record {n} (line {n}): ")
        };
        assert_eq!(
            stderr(&o),
            format!(
                "agentd: audit log {}: {place}altered: its content does not match its hash\n",
                path.display()
            ),
            "line {n}"
        );
    }
}

#[test]
fn deleted_and_reordered_records_are_named() {
    let (_dir, path) = log_dir();
    sample(&path, &["--records", "12"]);
    let original = lines(&path);

    let mut deleted = original.clone();
    deleted.remove(6);
    write_lines(&path, &deleted);
    let o = verify(&[s(&path)]);
    assert_eq!(code(&o), TAMPERED, "{}", explain(&o));
    assert!(
        stderr(&o).contains("record 8 (line 7): does not follow the record before it"),
        "{}",
        explain(&o)
    );

    let mut swapped = original.clone();
    swapped.swap(3, 4);
    write_lines(&path, &swapped);
    let o = verify(&[s(&path)]);
    assert_eq!(code(&o), TAMPERED, "{}", explain(&o));
    assert!(
        stderr(&o).contains("record 5 (line 4): does not follow"),
        "{}",
        explain(&o)
    );
}

#[test]
fn a_truncated_last_record_is_reported_as_incomplete() {
    let (_dir, path) = log_dir();
    sample(&path, &["--records", "5"]);
    let data = fs::read(&path).unwrap();
    fs::write(&path, &data[..data.len() - 40]).unwrap();
    let o = verify(&[s(&path)]);
    assert_eq!(code(&o), INCOMPLETE, "{}", explain(&o));
    assert!(
        stdout(&o).starts_with("incomplete: 5 records, head "),
        "{}",
        explain(&o)
    );
    assert!(
        stderr(&o).contains("record 6 (line 6): incomplete final record"),
        "{}",
        explain(&o)
    );

    // An edit before it is still tampering.
    let text = String::from_utf8(data[..data.len() - 40].to_vec()).unwrap();
    fs::write(&path, text.replacen("\"ts\":\"2", "\"ts\":\"1", 2)).unwrap();
    let o = verify(&[s(&path)]);
    assert_eq!(code(&o), TAMPERED, "{}", explain(&o));
}

#[test]
fn all_verifies_rotated_files_and_their_links() {
    let (dir, path) = log_dir();
    let head = sample(&path, &["--records", "30", "--rotate-every", "10"]);
    let rotated = |k: u32| dir.path().join(format!("audit.log.{k}"));
    assert!(rotated(2).exists() && !rotated(3).exists());

    let o = verify(&["--all", s(&path)]);
    assert_eq!(code(&o), 0, "{}", explain(&o));
    assert_eq!(
        stdout(&o),
        format!("ok: 33 records, head {head} (seq 33) across 3 files\n")
    );
    // Alone, the newest file verifies, and says it continues a chain.
    let o = verify(&[s(&path)]);
    assert_eq!(code(&o), 0, "{}", explain(&o));
    assert!(
        stderr(&o).contains("continues from record 22"),
        "{}",
        explain(&o)
    );

    // A line of the middle file edited.
    let middle = rotated(1);
    let original = lines(&middle);
    let mut copy = original.clone();
    copy[4] = copy[4].replacen("step", "stop", 1);
    write_lines(&middle, &copy);
    let o = verify(&["--all", s(&path)]);
    assert_eq!(code(&o), TAMPERED, "{}", explain(&o));
    assert!(
        stderr(&o).starts_with(&format!(
            "agentd: audit log {}: record 16 (line 5): altered",
            middle.display()
        )),
        "{}",
        explain(&o)
    );
    write_lines(&middle, &original);

    // The middle file removed.
    fs::remove_file(&middle).unwrap();
    let o = verify(&["--all", s(&path)]);
    assert_eq!(code(&o), TAMPERED, "{}", explain(&o));
    assert!(
        stderr(&o).contains(&format!(
            "audit log {}: record 23 (line 1): does not follow the last record of {}",
            path.display(),
            rotated(2).display()
        )),
        "{}",
        explain(&o)
    );
}

#[test]
fn expect_head_detects_a_rollback() {
    let (_dir, path) = log_dir();
    let head = sample(&path, &["--records", "8"]);
    let o = verify(&["--expect-head", &head, s(&path)]);
    assert_eq!(code(&o), 0, "{}", explain(&o));

    let mut rolled_back = lines(&path);
    rolled_back.truncate(5);
    write_lines(&path, &rolled_back);
    assert_eq!(
        code(&verify(&[s(&path)])),
        0,
        "a clean rollback verifies alone"
    );
    let o = verify(&["--expect-head", &head, s(&path)]);
    assert_eq!(code(&o), TAMPERED, "{}", explain(&o));
    assert!(
        stderr(&o).contains(&format!("the expected head {head} is not in the log")),
        "{}",
        explain(&o)
    );
}

#[test]
fn json_reports_status_and_problem() {
    let (_dir, path) = log_dir();
    sample(&path, &["--records", "6"]);
    let o = verify(&["--json", s(&path)]);
    assert_eq!(code(&o), 0, "{}", explain(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["records"], 7);
    assert_eq!(v["head"]["seq"], 7);

    let mut copy = lines(&path);
    copy[2] = copy[2].replacen("\"ts\":\"2", "\"ts\":\"1", 1);
    write_lines(&path, &copy);
    let o = verify(&["--json", s(&path)]);
    assert_eq!(code(&o), TAMPERED, "{}", explain(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["status"], "tampered");
    assert_eq!(v["problem"]["record"], 3);
    assert_eq!(v["problem"]["line"], 3);
    assert_eq!(v["records"], 2);
}

#[test]
fn unreadable_logs_and_bad_usage_exit_2() {
    let (dir, path) = log_dir();
    let o = verify(&[s(&path)]);
    assert_eq!(code(&o), UNREADABLE, "{}", explain(&o));
    assert!(stderr(&o).contains("cannot read"), "{}", explain(&o));
    let o = verify(&["--expect-head", "xyz", s(&path)]);
    assert_eq!(code(&o), UNREADABLE, "{}", explain(&o));
    let o = verify(&[s(dir.path())]);
    assert_eq!(code(&o), UNREADABLE, "{}", explain(&o));

    // `sample` never touches an existing log.
    fs::write(&path, "precious\n").unwrap();
    let o = harness(&["audit-sample", s(&path)]);
    assert_eq!(code(&o), UNREADABLE, "{}", explain(&o));
    assert_eq!(fs::read_to_string(&path).unwrap(), "precious\n");
}
