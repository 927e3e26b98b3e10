//! The audit log against its attacks: every kind of edit, deletion, insertion, reordering
//! and truncation, crashes at every point of a write, rotation, and concurrent writers.
//! No root needed: everything happens in a temporary directory.

use std::{
    fs,
    num::{NonZeroU32, NonZeroUsize},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use super::{
    AuditError, AuditLog, Options,
    record::{self, Action, Body, Control, RecordHash, RecordKind},
    sink,
    verify::{Fault, Outcome, Problem, Report, verify_all, verify_file},
    writer::{self, rotated},
};
use crate::{
    ask::sign::{self, AllowedSigners},
    event::{Event, Kind, Layer, Verdict},
};

/// Records in [`sample`]: one `open`, then this many events and control actions.
const N: usize = 20;

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("agentd-audit-")
        .tempdir()
        .unwrap()
}

fn event(i: usize) -> Event {
    Event::new(
        &format!("agent-{}", i % 3),
        1000 + i as u32,
        "sh",
        Kind::OpenWrite,
        Verdict::Deny,
        Layer::Landlock,
    )
    .with("n", i)
}

fn control(i: usize) -> Control {
    Control {
        action: if i.is_multiple_of(2) {
            Action::Launch
        } else {
            Action::Kill
        },
        agent: Some(format!("agent-{i}")),
        by: writer::this_process(),
        detail: serde_json::Map::new(),
    }
}

fn append(log: &mut AuditLog, i: usize) {
    if i % 5 == 4 {
        log.append_control(&control(i)).unwrap();
    } else {
        log.append_event(&event(i)).unwrap();
    }
}

/// A log of `1 + N` records at `dir/audit.log`.
fn sample(dir: &Path) -> PathBuf {
    let path = dir.join("audit.log");
    let mut log = AuditLog::open(&path).unwrap();
    for i in 0..N {
        append(&mut log, i);
    }
    path
}

/// The lines of a file, each without its newline (and a last, unterminated one if any).
fn lines(path: &Path) -> Vec<Vec<u8>> {
    let data = fs::read(path).unwrap();
    let mut lines: Vec<Vec<u8>> = data.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    if lines.last().is_some_and(Vec::is_empty) {
        lines.pop();
    }
    lines
}

/// Writes `lines`, each followed by a newline.
fn write_lines(path: &Path, lines: &[Vec<u8>]) {
    let mut data = Vec::new();
    for l in lines {
        data.extend_from_slice(l);
        data.push(b'\n');
    }
    fs::write(path, data).unwrap();
}

fn check(path: &Path) -> Report {
    verify_file(path, None, None).unwrap()
}

#[track_caller]
fn tampered(report: &Report) -> &Problem {
    match &report.outcome {
        Outcome::Tampered(p) => p,
        other @ (Outcome::Intact | Outcome::Incomplete(_)) => {
            panic!("expected tampering, got {other:?}")
        }
    }
}

/// Asserts that the problem is at `line` (1-based), in a record named `record` (the seq
/// it holds when its hash holds, else the seq expected there).
#[track_caller]
fn assert_at(report: &Report, line: usize, record: Option<usize>, what: &str) {
    let p = tampered(report);
    assert_eq!(
        (p.line, p.record),
        (Some(line as u64), record.map(|r| r as u64)),
        "{what}: {p}"
    );
}

/// Asserts that the problem is at `line`, a line that is no longer a valid record and is
/// named by the seq expected there (none on line 1, where no record precedes it).
#[track_caller]
fn assert_names(report: &Report, line: usize, what: &str) {
    assert_at(report, line, (line > 1).then_some(line), what);
}

/// Replaces the first occurrence of `from` in `line` by `to`.
fn replace(line: &[u8], from: &str, to: &str) -> Vec<u8> {
    let text = String::from_utf8(line.to_vec()).unwrap();
    assert!(text.contains(from), "{from} not in {text}");
    text.replacen(from, to, 1).into_bytes()
}

/// Changes one hex digit of the 64 after `key`.
fn flip_hex_after(line: &[u8], key: &str) -> Vec<u8> {
    let text = String::from_utf8(line.to_vec()).unwrap();
    let at = text.find(key).unwrap() + key.len() + 10;
    let mut bytes = line.to_vec();
    bytes[at] = if bytes[at] == b'a' { b'b' } else { b'a' };
    bytes
}

#[test]
fn intact_log_verifies_and_reports_its_head() {
    let dir = tempdir();
    let path = dir.path().join("audit.log");
    let mut log = AuditLog::open(&path).unwrap();
    for i in 0..N {
        append(&mut log, i);
    }
    let head = log.head();
    drop(log);
    let report = check(&path);
    assert_eq!(report.outcome, Outcome::Intact);
    assert_eq!(report.records, 1 + N as u64);
    assert_eq!(report.head, Some(head));
    assert_eq!(head.seq, 1 + N as u64);
    assert!(report.remnants.is_empty() && report.continues_from.is_none());
    // The anchor of any record in the log is found.
    assert_eq!(
        verify_file(&path, Some(head.hash), None).unwrap().outcome,
        Outcome::Intact
    );

    // The file is 0600, and its records are what the module docs say.
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let values: Vec<serde_json::Value> = lines(&path)
        .iter()
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(values[0]["kind"], "open");
    assert_eq!(values[0]["prev"], RecordHash::GENESIS.to_string());
    assert_eq!(values[0]["open"]["pid"], std::process::id());
    assert_eq!(values[1]["kind"], "event");
    assert_eq!(values[1]["event"]["kind"], "file_write");
    assert_eq!(values[5]["kind"], "control");
    assert_eq!(values[5]["control"]["action"], "launch");
    assert_eq!(values[5]["control"]["by"]["pid"], std::process::id());
    for (i, v) in values.iter().enumerate() {
        assert_eq!(v["seq"], i + 1);
        if i > 0 {
            assert_eq!(v["prev"], values[i - 1]["hash"]);
        }
    }
}

#[test]
fn editing_any_line_names_that_record() {
    let dir = tempdir();
    let path = sample(dir.path());
    let original = lines(&path);
    assert_eq!(original.len(), 1 + N);
    for k in 0..original.len() {
        let seq = k + 1;
        let edits = [
            (
                "a byte of the body",
                replace(&original[k], "\"ts\":\"2", "\"ts\":\"3"),
            ),
            (
                "seq",
                replace(
                    &original[k],
                    &format!("{{\"seq\":{seq},"),
                    &format!("{{\"seq\":{},", seq + 1),
                ),
            ),
            ("prev", flip_hex_after(&original[k], "\"prev\":\"")),
            ("hash", flip_hex_after(&original[k], "\"hash\":\"")),
            ("hash in uppercase", {
                let mut l = original[k].clone();
                let n = l.len();
                l[n - 66..n - 2].make_ascii_uppercase();
                l
            }),
            ("the end of the body", {
                let mut l = original[k].clone();
                let n = l.len();
                l[n - 76] = b']';
                l
            }),
        ];
        for (what, edited) in edits {
            let mut copy = original.clone();
            copy[k] = edited;
            write_lines(&path, &copy);
            let report = check(&path);
            assert_names(&report, seq, what);
            // Nothing after the edited record counts as verified.
            assert_eq!(report.records, k as u64);
        }
    }
}

#[test]
fn a_rewritten_and_rehashed_record_is_caught_at_the_next() {
    let dir = tempdir();
    let path = sample(dir.path());
    let original = lines(&path);
    let rewrite = |k: usize| {
        let rec = record::parse(&original[k]).unwrap();
        let forged = event(999).with("forged", true);
        record::encode(
            rec.seq,
            "2026-01-01T00:00:00Z",
            rec.prev,
            Body::Event(&forged),
        )
        .unwrap()
        .0
    };
    for k in 1..original.len() - 1 {
        let mut copy = original.clone();
        copy[k] = rewrite(k);
        write_lines(&path, &copy);
        let report = check(&path);
        assert_names(&report, k + 2, "rehashed");
        assert!(matches!(tampered(&report).fault, Fault::BrokenLink { .. }));
    }
    // The last record rewritten: only a head kept elsewhere tells.
    let head = check(&path).head;
    let last = original.len() - 1;
    let mut copy = original.clone();
    copy[last] = rewrite(last);
    write_lines(&path, &copy);
    assert_eq!(check(&path).outcome, Outcome::Intact);
    let report = verify_file(&path, head.map(|h| h.hash), None).unwrap();
    assert!(matches!(
        tampered(&report).fault,
        Fault::AnchorMissing { .. }
    ));
}

#[test]
fn deleting_a_line_names_the_record_after_it() {
    let dir = tempdir();
    let path = sample(dir.path());
    let original = lines(&path);
    let full_head = check(&path).head.unwrap();
    for k in 1..original.len() - 1 {
        let mut copy = original.clone();
        copy.remove(k);
        write_lines(&path, &copy);
        let report = check(&path);
        assert_at(&report, k + 1, Some(k + 2), "deleted");
        assert!(matches!(tampered(&report).fault, Fault::BrokenLink { .. }));
    }
    // The first: the log no longer begins.
    let mut copy = original.clone();
    copy.remove(0);
    write_lines(&path, &copy);
    let report = check(&path);
    assert_eq!(
        tampered(&report).fault,
        Fault::BadStart {
            kind: RecordKind::Event
        }
    );
    // The last: a rollback, caught against a kept head.
    let mut copy = original.clone();
    copy.pop();
    write_lines(&path, &copy);
    assert_eq!(check(&path).outcome, Outcome::Intact);
    let report = verify_file(&path, Some(full_head.hash), None).unwrap();
    let p = tampered(&report);
    assert_eq!(
        (p.line, &p.fault),
        (
            None,
            &Fault::AnchorMissing {
                hash: full_head.hash
            }
        )
    );
}

#[test]
fn swapping_two_lines_names_the_first() {
    let dir = tempdir();
    let path = sample(dir.path());
    let original = lines(&path);
    for k in 1..original.len() - 1 {
        let mut copy = original.clone();
        copy.swap(k, k + 1);
        write_lines(&path, &copy);
        assert_at(&check(&path), k + 1, Some(k + 2), "swapped");
    }
}

#[test]
fn inserting_a_line_names_it() {
    let dir = tempdir();
    let path = sample(dir.path());
    let original = lines(&path);
    for k in 1..original.len() {
        // A replayed copy of an earlier record (named by its seq), and a line that is
        // no record (named by the seq expected there).
        for (inserted, record) in [
            (original[k - 1].clone(), k),
            (original[0].clone(), 1),
            (b"{}".to_vec(), k + 1),
        ] {
            let mut copy = original.clone();
            copy.insert(k, inserted);
            write_lines(&path, &copy);
            assert_at(&check(&path), k + 1, Some(record), "inserted");
        }
    }
    // At the end too.
    let mut copy = original.clone();
    copy.push(original[3].clone());
    write_lines(&path, &copy);
    assert_at(&check(&path), original.len() + 1, Some(4), "appended copy");
}

#[test]
fn cutting_out_the_middle_names_the_cut() {
    let dir = tempdir();
    let path = sample(dir.path());
    let data = fs::read(&path).unwrap();
    let starts: Vec<usize> = std::iter::once(0)
        .chain(
            data.iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1),
        )
        .collect();
    // From the middle of line 5 to the middle of line 8, and whole lines 5 to 7.
    for (from, to, record) in [
        (starts[4] + 30, starts[7] + 40, 5),
        (starts[4], starts[7], 8),
    ] {
        let mut cut = data[..from].to_vec();
        cut.extend_from_slice(&data[to..]);
        fs::write(&path, cut).unwrap();
        assert_at(&check(&path), 5, Some(record), "cut");
    }
}

#[test]
fn a_truncated_last_line_is_an_incomplete_record_not_tampering() {
    let dir = tempdir();
    let path = sample(dir.path());
    let data = fs::read(&path).unwrap();
    let last_start = data[..data.len() - 1]
        .iter()
        .rposition(|&b| b == b'\n')
        .unwrap()
        + 1;
    let last_len = data.len() - 1 - last_start;
    for keep in [1, 5, 7, 30, last_len / 2, last_len - 1, last_len] {
        fs::write(&path, &data[..last_start + keep]).unwrap();
        let report = check(&path);
        let Outcome::Incomplete(i) = &report.outcome else {
            panic!("cut to {keep}: {:?}", report.outcome);
        };
        assert_eq!(
            (i.record, i.line, i.bytes),
            (1 + N as u64, 1 + N as u64, keep as u64)
        );
        assert_eq!(report.records, N as u64);
    }
    // NUL bytes where a crash allocated blocks it never wrote.
    let mut zeros = data[..last_start].to_vec();
    zeros.extend_from_slice(&[0; 4096]);
    fs::write(&path, &zeros).unwrap();
    assert!(matches!(check(&path).outcome, Outcome::Incomplete(_)));
    // An empty file.
    fs::write(&path, b"").unwrap();
    let report = check(&path);
    assert!(matches!(&report.outcome, Outcome::Incomplete(i) if i.bytes == 0));

    // Not hidden by an incomplete end: an earlier edit, a replaced final newline, bytes
    // that could not start a record.
    let mut edited = data[..last_start + 9].to_vec();
    edited[40] ^= 1;
    fs::write(&path, &edited).unwrap();
    assert_names(&check(&path), 1, "edit before an incomplete end");
    let mut newline_replaced = data.clone();
    *newline_replaced.last_mut().unwrap() = b' ';
    fs::write(&path, &newline_replaced).unwrap();
    let report = check(&path);
    assert_names(&report, 1 + N, "final newline replaced");
    assert_eq!(tampered(&report).fault, Fault::TrailingBytes { bytes: 1 });
    let mut garbage = data[..last_start].to_vec();
    garbage.extend_from_slice(b"hello");
    fs::write(&path, &garbage).unwrap();
    assert_names(&check(&path), 1 + N, "garbage end");
}

#[test]
fn the_writer_notes_an_interrupted_write_and_continues_the_chain() {
    let dir = tempdir();
    let path = sample(dir.path());
    let data = fs::read(&path).unwrap();
    let last_start = data[..data.len() - 1]
        .iter()
        .rposition(|&b| b == b'\n')
        .unwrap()
        + 1;
    // Crash states: a cut record; a cut record and the newline of a cut recovery; a
    // second cut after it; NUL blocks; a lone newline.
    let remnants: [&[u8]; 5] = [
        &data[last_start..last_start + 50],
        b"{\"seq\":21,\"ts\n",
        b"{\"seq\":21,\"ts\n{\"seq\":21,\"ts\":\"20",
        &[0; 100],
        b"\n",
    ];
    for remnant in remnants {
        let mut crashed = data[..last_start].to_vec();
        crashed.extend_from_slice(remnant);
        fs::write(&path, &crashed).unwrap();
        let mut log = AuditLog::open(&path).unwrap();
        assert_eq!(
            log.head().seq,
            1 + N as u64,
            "the open record takes the lost seq"
        );
        log.append_event(&event(100)).unwrap();
        drop(log);
        let report = check(&path);
        assert_eq!(
            report.outcome,
            Outcome::Intact,
            "{:?}",
            String::from_utf8_lossy(remnant)
        );
        assert_eq!(report.records, 2 + N as u64);
        let noted = remnant.strip_suffix(b"\n").unwrap_or(remnant);
        assert_eq!(report.remnants.len(), 1);
        assert_eq!(report.remnants[0].line, 1 + N as u64);
        assert_eq!(report.remnants[0].bytes, noted.len() as u64);
        assert_eq!(report.remnants[0].noted_by, 1 + N as u64);

        // The remnant is covered too: changing it is detected.
        let mut tampered_remnant = fs::read(&path).unwrap();
        tampered_remnant[last_start] ^= 0x20;
        fs::write(&path, &tampered_remnant).unwrap();
        assert_names(&check(&path), 1 + N, "remnant edited");
    }
}

#[test]
fn a_remnant_without_its_note_is_tampering() {
    let dir = tempdir();
    let path = sample(dir.path());
    let mut copy = lines(&path);
    copy.insert(5, b"{\"seq\":6,\"ts".to_vec());
    write_lines(&path, &copy);
    assert_names(&check(&path), 6, "unnoted remnant");
    // A note with no remnant before it.
    let path2 = dir.path().join("b.log");
    fs::write(&path2, b"{\"seq\":1,\"ts").unwrap();
    fs::set_permissions(&path2, fs::Permissions::from_mode(0o600)).unwrap();
    drop(AuditLog::open(&path2).unwrap());
    let mut copy = lines(&path2);
    assert_eq!(check(&path2).outcome, Outcome::Intact);
    copy.remove(0);
    write_lines(&path2, &copy);
    let report = check(&path2);
    assert_eq!(
        (tampered(&report).line, &tampered(&report).fault),
        (Some(1), &Fault::PartialMissing)
    );
}

#[test]
fn a_first_record_cut_short_is_noted_by_the_open_record() {
    let dir = tempdir();
    let path = dir.path().join("audit.log");
    fs::write(&path, b"{\"seq\":1,\"ts\":\"2026").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(matches!(check(&path).outcome, Outcome::Incomplete(_)));
    let mut log = AuditLog::open(&path).unwrap();
    log.append_event(&event(1)).unwrap();
    drop(log);
    let report = check(&path);
    assert_eq!(report.outcome, Outcome::Intact);
    assert_eq!((report.records, report.remnants.len()), (2, 1));
}

#[test]
fn a_large_remnant_is_found_behind_the_tail_chunk() {
    let dir = tempdir();
    let path = dir.path().join("audit.log");
    let mut log = AuditLog::open_with(
        &path,
        Options {
            sync_every: NonZeroU32::new(1000).unwrap(),
            ..Options::default()
        },
    )
    .unwrap();
    for i in 0..500 {
        append(&mut log, i);
    }
    drop(log);
    let mut data = fs::read(&path).unwrap();
    data.extend_from_slice(b"{\"seq\":502,");
    data.extend(std::iter::repeat_n(b'x', 200_000));
    fs::write(&path, &data).unwrap();
    let mut log = AuditLog::open(&path).unwrap();
    assert_eq!(log.head().seq, 502);
    log.append_event(&event(0)).unwrap();
    drop(log);
    let report = check(&path);
    assert_eq!(report.outcome, Outcome::Intact);
    assert_eq!(report.remnants[0].bytes, 200_011);
}

/// A log rotated twice: `PATH.2`, `PATH.1`, `PATH`, each with its records.
fn rotated_sample(dir: &Path, keep: usize, rotations: usize) -> (PathBuf, AuditLog) {
    let path = dir.join("audit.log");
    let mut log = AuditLog::open_with(
        &path,
        Options {
            keep: NonZeroUsize::new(keep).unwrap(),
            ..Options::default()
        },
    )
    .unwrap();
    for r in 0..=rotations {
        for i in 0..7 {
            append(&mut log, r * 7 + i);
        }
        if r < rotations {
            log.rotate().unwrap();
        }
    }
    (path, log)
}

#[test]
fn rotation_keeps_one_chain_across_files() {
    let dir = tempdir();
    let (path, log) = rotated_sample(dir.path(), 5, 2);
    let head = log.head();
    drop(log);
    assert!(rotated(&path, 2).exists() && !rotated(&path, 3).exists());
    let report = verify_all(&path, None, None).unwrap();
    assert_eq!(report.outcome, Outcome::Intact);
    assert_eq!(report.files.len(), 3);
    assert_eq!(report.records, 1 + 3 * 7 + 2);
    assert_eq!(report.head, Some(head));
    assert_eq!(report.continues_from, None);
    // Each file alone: the newer ones continue a chain from the file before.
    let alone = check(&path);
    assert_eq!(alone.outcome, Outcome::Intact);
    assert_eq!(
        alone.continues_from,
        Some(report.files[1].last.unwrap().seq)
    );
    let first: serde_json::Value = serde_json::from_slice(&lines(&path)[0]).unwrap();
    assert_eq!(first["kind"], "rotate");
    assert_eq!(first["rotate"]["previous"], "audit.log.1");
    // The head kept before a rotation is still found with --all, not in the new file.
    let old_head = report.files[0].last.unwrap().hash;
    assert_eq!(
        verify_all(&path, Some(old_head), None).unwrap().outcome,
        Outcome::Intact
    );
    assert!(matches!(
        verify_file(&path, Some(old_head), None).unwrap().outcome,
        Outcome::Tampered(_)
    ));
}

#[test]
fn an_edited_or_removed_middle_file_is_detected() {
    let dir = tempdir();
    let (path, log) = rotated_sample(dir.path(), 5, 2);
    drop(log);
    let middle = rotated(&path, 1);
    let original = lines(&middle);

    // One line of the middle file edited.
    let mut copy = original.clone();
    copy[3] = replace(&copy[3], "\"ts\":\"2", "\"ts\":\"1");
    write_lines(&middle, &copy);
    let report = verify_all(&path, None, None).unwrap();
    let p = tampered(&report);
    assert_eq!(
        (p.path.as_path(), p.line),
        (middle.as_path(), Some(4)),
        "{p}"
    );
    write_lines(&middle, &original);
    assert_eq!(
        verify_all(&path, None, None).unwrap().outcome,
        Outcome::Intact
    );

    // The middle file's last record removed: the next file's link breaks.
    let mut copy = original.clone();
    copy.pop();
    write_lines(&middle, &copy);
    let report = verify_all(&path, None, None).unwrap();
    let p = tampered(&report);
    assert_eq!((p.path.as_path(), p.line), (path.as_path(), Some(1)), "{p}");
    assert!(matches!(p.fault, Fault::BrokenFileLink { .. }));
    write_lines(&middle, &original);

    // The middle file removed.
    fs::rename(&middle, dir.path().join("elsewhere")).unwrap();
    let p = verify_all(&path, None, None).unwrap();
    assert!(
        matches!(tampered(&p).fault, Fault::BrokenFileLink { .. }),
        "{:?}",
        p.outcome
    );

    // Two files swapped.
    fs::rename(rotated(&path, 2), &middle).unwrap();
    fs::rename(dir.path().join("elsewhere"), rotated(&path, 2)).unwrap();
    let p = verify_all(&path, None, None).unwrap();
    assert!(
        matches!(tampered(&p).fault, Fault::ExpectedRotate { .. }),
        "{:?}",
        p.outcome
    );
}

#[test]
fn retention_drops_the_oldest_files_and_the_rest_still_verify() {
    let dir = tempdir();
    let (path, log) = rotated_sample(dir.path(), 2, 4);
    drop(log);
    assert!(rotated(&path, 2).exists() && !rotated(&path, 3).exists());
    let report = verify_all(&path, None, None).unwrap();
    assert_eq!(report.outcome, Outcome::Intact);
    assert_eq!(report.files.len(), 3);
    // The chain starts after what retention removed.
    assert_eq!(report.continues_from, Some(1 + 2 * 7 + 1));
}

#[test]
fn a_rotation_interrupted_after_the_rename_is_completed_on_open() {
    for empty_file in [false, true] {
        let dir = tempdir();
        let path = sample(dir.path());
        fs::rename(&path, rotated(&path, 1)).unwrap();
        if empty_file {
            fs::write(&path, b"").unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        }
        let mut log = AuditLog::open(&path).unwrap();
        log.append_event(&event(1)).unwrap();
        drop(log);
        let report = verify_all(&path, None, None).unwrap();
        assert_eq!(report.outcome, Outcome::Intact);
        assert_eq!(report.records, 1 + N as u64 + 3, "rotate, open, event");
    }
}

#[test]
fn concurrent_appends_through_one_log_stay_one_chain() {
    let dir = tempdir();
    let path = dir.path().join("audit.log");
    let log = Arc::new(Mutex::new(AuditLog::open(&path).unwrap()));
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for i in 0..100 {
                    let mut log = log.lock().unwrap();
                    append(&mut log, t * 1000 + i);
                    if t == 1 && i == 50 {
                        log.rotate().unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    drop(log);
    let report = verify_all(&path, None, None).unwrap();
    assert_eq!(report.outcome, Outcome::Intact);
    assert_eq!(report.records, 1 + 200 + 1);
}

#[test]
fn one_writer_per_file() {
    let dir = tempdir();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path).unwrap();
    assert!(matches!(
        AuditLog::open(&path),
        Err(AuditError::Locked { .. })
    ));
    drop(log);
    drop(AuditLog::open(&path).unwrap());
    assert_eq!(check(&path).records, 2, "one open record per writer");
}

#[test]
fn unsafe_files_are_refused() {
    let dir = tempdir();
    let path = sample(dir.path());
    let link = dir.path().join("link.log");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    assert!(matches!(
        AuditLog::open(&link),
        Err(AuditError::Symlink { .. })
    ));
    fs::set_permissions(&path, fs::Permissions::from_mode(0o620)).unwrap();
    let err = AuditLog::open(&path).unwrap_err();
    assert!(matches!(err, AuditError::Writable { mode: 0o620, .. }));
    assert!(err.to_string().contains("chmod 600"), "{err}");
    assert!(matches!(
        AuditLog::open(dir.path()),
        Err(AuditError::Open { .. } | AuditError::NotRegular { .. })
    ));
}

#[test]
fn the_sink_appends_events() {
    let dir = tempdir();
    let path = dir.path().join("audit.log");
    let mut sink = sink(&path).unwrap();
    for i in 0..5 {
        sink(&event(i)).unwrap();
    }
    drop(sink);
    let report = check(&path);
    assert_eq!((report.outcome, report.records), (Outcome::Intact, 6));
}

#[test]
fn batched_syncs_write_the_same_chain() {
    let dir = tempdir();
    let path = dir.path().join("audit.log");
    let mut log = AuditLog::open_with(
        &path,
        Options {
            sync_every: NonZeroU32::new(8).unwrap(),
            ..Options::default()
        },
    )
    .unwrap();
    for i in 0..20 {
        append(&mut log, i);
    }
    log.sync().unwrap();
    drop(log);
    assert_eq!(check(&path).outcome, Outcome::Intact);
}

/// xorshift64*: a seeded generator, so that a failure is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn every_random_single_byte_change_is_detected_at_its_line() {
    let dir = tempdir();
    let path = sample(dir.path());
    let data = fs::read(&path).unwrap();
    // The line (1-based) of each byte; a newline belongs to the line it ends.
    let line_of: Vec<usize> = data
        .iter()
        .scan(1, |line, &b| {
            let this = *line;
            *line += usize::from(b == b'\n');
            Some(this)
        })
        .collect();
    let mut rng = Rng(0x5eed_a0d1_7c4a_1b2d);
    for round in 0..3000 {
        let at = rng.below(data.len());
        let mut edited = data.clone();
        let what = if round % 3 == 2 {
            edited.remove(at);
            format!("byte {at} deleted")
        } else {
            let byte = loop {
                // Mostly characters a JSON line holds, sometimes anything.
                let b = if round % 2 == 0 {
                    b"0123456789abcdef\"{}:,\n "
                        .get(rng.below(23))
                        .copied()
                        .unwrap_or(b'x')
                } else {
                    (rng.next() & 0xff) as u8
                };
                if b != data[at] {
                    break b;
                }
            };
            edited[at] = byte;
            format!("byte {at} {:?} -> {:?}", data[at] as char, byte as char)
        };
        fs::write(&path, &edited).unwrap();
        let report = check(&path);
        if what.contains("deleted") && at == data.len() - 1 {
            // The final newline deleted: a whole record without its newline, as a crash
            // between its last byte and the newline would leave.
            assert!(matches!(report.outcome, Outcome::Incomplete(_)), "{what}");
            continue;
        }
        let p = tampered(&report);
        assert_eq!(p.line, Some(line_of[at] as u64), "{what}: {p}");
    }
}

// ---- signed decisions ----

/// What a person signs to approve request r-ab12cd-3 (the format of `ask::message`).
const SIGNED: &str = "agentd-approval v1\nrequest: r-ab12cd-3\nagent: ab12cd\nprofile: analyze-only\n\
what: connect tcp 93.184.216.34:443 (forum.example.com)\ndecision: allow\nscope: for 600s\n";

/// Makes an ed25519 key `dir/name` with ssh-keygen; returns its public key line.
fn keygen(dir: &Path, name: &str) -> String {
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(dir.join(name))
        .status()
        .unwrap();
    assert!(status.success());
    let line = fs::read_to_string(dir.join(format!("{name}.pub"))).unwrap();
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `ssh-keygen -Y sign -n agentd-approval` over `message` with key `dir/name`.
fn ssh_sign(dir: &Path, name: &str, message: &str) -> String {
    let file = dir.join(format!("message-{name}"));
    fs::write(&file, message).unwrap();
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-Y", "sign", "-n", sign::NAMESPACE, "-f"])
        .arg(dir.join(name))
        .arg(&file)
        .status()
        .unwrap();
    assert!(status.success());
    fs::read_to_string(file.with_extension("sig")).unwrap()
}

/// A decision record as the daemon writes it; signed when `signature` is given.
fn decision(action: Action, signed: Option<(&str, &str, &str)>) -> Control {
    let mut detail = serde_json::json!({
        "request": "r-ab12cd-3",
        "what": "connect tcp 93.184.216.34:443 (forum.example.com)",
        "scope": "for 600s",
        "expires": 1_800_000_600u64,
        "waited_ms": 4200,
    });
    if let Some((message, signature, key)) = signed {
        detail["message"] = message.into();
        detail["signature"] = signature.into();
        detail["key"] = key.into();
        detail["principal"] = "alice@example.com".into();
        let fingerprint = sign::verify_with_key(key, message.as_bytes(), signature)
            .unwrap_or_else(|_| "SHA256:(does not verify)".into());
        detail["fingerprint"] = fingerprint.into();
    }
    Control {
        action,
        agent: Some("ab12cd".into()),
        by: writer::this_process(),
        detail: detail.as_object().unwrap().clone(),
    }
}

/// A log of events, a held call and its signed approval, and an unsigned denial; the
/// approval's line (0-based) and seq.
fn signed_sample(dir: &Path, approval: &Control) -> (PathBuf, usize, u64) {
    let path = dir.join("audit.log");
    let mut log = AuditLog::open(&path).unwrap();
    for i in 0..3 {
        log.append_event(&event(i)).unwrap();
    }
    let mut ask = decision(Action::Ask, None);
    ask.detail.remove("scope");
    log.append_control(&ask).unwrap();
    log.append_control(approval).unwrap();
    let seq = log.head().seq;
    log.append_control(&decision(Action::Deny, None)).unwrap();
    log.append_event(&event(9)).unwrap();
    (path, usize::try_from(seq).unwrap() - 1, seq)
}

/// Rewrites line `k` (a control record) through `edit` and re-hashes it, as someone with
/// write access to the log would.
fn rewrite_control(path: &Path, k: usize, edit: impl FnOnce(&mut Control)) {
    let mut copy = lines(path);
    let rec = record::parse(&copy[k]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&copy[k]).unwrap();
    let mut control: Control = serde_json::from_value(v["control"].clone()).unwrap();
    edit(&mut control);
    copy[k] = record::encode(
        rec.seq,
        v["ts"].as_str().unwrap(),
        rec.prev,
        Body::Control(&control),
    )
    .unwrap()
    .0;
    write_lines(path, &copy);
}

fn signers(text: &str) -> AllowedSigners {
    AllowedSigners::parse("allowed_signers", text).unwrap()
}

#[test]
fn a_signed_decision_verifies_and_is_counted() {
    let dir = tempdir();
    let alice = keygen(dir.path(), "alice");
    let other = keygen(dir.path(), "other");
    let sig = ssh_sign(dir.path(), "alice", SIGNED);
    let approval = decision(Action::Approve, Some((SIGNED, &sig, &alice)));
    let (path, k, seq) = signed_sample(dir.path(), &approval);

    let report = check(&path);
    assert_eq!(report.outcome, Outcome::Intact);
    assert_eq!((report.records, report.signed_decisions), (1 + 7, 1));
    let v: serde_json::Value = serde_json::from_slice(&lines(&path)[k]).unwrap();
    assert_eq!(v["control"]["action"], "approve");
    assert_eq!(v["control"]["detail"]["principal"], "alice@example.com");
    let values: Vec<serde_json::Value> = lines(&path)
        .iter()
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(values[4]["control"]["action"], "ask");
    assert_eq!(values[6]["control"]["action"], "deny");

    // Against allowed signers: listed, for the namespace, at the record's time.
    let listed = signers(&format!("alice@example.com {alice}\n"));
    let report = verify_file(&path, None, Some(&listed)).unwrap();
    assert_eq!(
        (report.outcome, report.signed_decisions),
        (Outcome::Intact, 1)
    );
    for refused in [
        format!("bob@example.com {other}\n"),
        format!("alice@example.com namespaces=\"git\" {alice}\n"),
        format!("alice@example.com valid-before=\"20200101Z\" {alice}\n"),
        format!("alice@example.com valid-after=\"29990101Z\" {alice}\n"),
    ] {
        let report = verify_file(&path, None, Some(&signers(&refused))).unwrap();
        assert_at(&report, k + 1, Some(seq as usize), &refused);
        assert!(
            matches!(tampered(&report).fault, Fault::SignerNotAllowed { .. }),
            "{refused}: {}",
            tampered(&report)
        );
        assert_eq!(report.signed_decisions, 0);
        assert_eq!(report.records, seq - 1);
    }
    let report = verify_all(&path, None, Some(&signers(&format!("x {other}")))).unwrap();
    let shown = tampered(&report).to_string();
    assert!(
        shown.contains(&format!("record {seq} (line {})", k + 1))
            && shown.contains("is not in allowed signers"),
        "{shown}"
    );
}

#[test]
fn a_signed_decision_altered_and_rehashed_fails_on_its_signature() {
    let dir = tempdir();
    let alice = keygen(dir.path(), "alice");
    let sig = ssh_sign(dir.path(), "alice", SIGNED);
    let approval = decision(Action::Approve, Some((SIGNED, &sig, &alice)));
    let (path, k, seq) = signed_sample(dir.path(), &approval);
    let original = lines(&path);

    // The approval stretched from 600 s to the whole session, message and all: the record's
    // hash holds, its signature does not.
    rewrite_control(&path, k, |c| {
        let stretched = SIGNED.replace("scope: for 600s", "scope: session");
        c.detail["message"] = stretched.into();
        c.detail["scope"] = "session".into();
    });
    let report = check(&path);
    assert_at(&report, k + 1, Some(seq as usize), "stretched");
    let p = tampered(&report);
    assert!(matches!(p.fault, Fault::BadSignature { .. }), "{p}");
    assert!(p.to_string().contains("does not match the message"), "{p}");

    // The same as the last record, where the chain alone tells nothing.
    let mut cut = original.clone();
    cut.truncate(k + 1);
    write_lines(&path, &cut);
    assert_eq!(check(&path).outcome, Outcome::Intact);
    rewrite_control(&path, k, |c| {
        c.detail["message"] = SIGNED.replace("for 600s", "for 86400s").into();
    });
    let report = check(&path);
    assert!(matches!(
        tampered(&report).fault,
        Fault::BadSignature { .. }
    ));
    assert_at(&report, k + 1, Some(seq as usize), "stretched, last");

    // The signed message kept, the record around it changed: a signed approval passed off
    // for another request, or as a denial.
    for (what, edit) in [
        (
            "other request",
            Box::new(|c: &mut Control| c.detail["request"] = "r-ab12cd-4".into())
                as Box<dyn Fn(&mut Control)>,
        ),
        (
            "denial",
            Box::new(|c: &mut Control| c.action = Action::Deny),
        ),
        (
            "other fingerprint",
            Box::new(|c: &mut Control| c.detail["fingerprint"] = "SHA256:AAAA".into()),
        ),
    ] {
        write_lines(&path, &original);
        rewrite_control(&path, k, edit);
        let report = check(&path);
        assert_at(&report, k + 1, Some(seq as usize), what);
        assert!(
            matches!(tampered(&report).fault, Fault::NotAsSigned { .. }),
            "{what}: {}",
            tampered(&report)
        );
    }

    // A signed decision missing its message is malformed, though its hash holds.
    write_lines(&path, &original);
    rewrite_control(&path, k, |c| {
        c.detail.remove("message");
    });
    let report = check(&path);
    assert_at(&report, k + 1, Some(seq as usize), "no message");
    assert!(
        tampered(&report)
            .to_string()
            .contains("without its \"message\""),
        "{}",
        tampered(&report)
    );
}

#[test]
fn a_signature_by_another_key_fails() {
    let dir = tempdir();
    let alice = keygen(dir.path(), "alice");
    let mallory = keygen(dir.path(), "mallory");
    let forged = ssh_sign(dir.path(), "mallory", SIGNED);

    // Alice's key recorded, Mallory's signature.
    let approval = decision(Action::Approve, Some((SIGNED, &forged, &alice)));
    let (path, k, seq) = signed_sample(dir.path(), &approval);
    let report = check(&path);
    assert_at(&report, k + 1, Some(seq as usize), "other key");
    let p = tampered(&report);
    assert!(matches!(p.fault, Fault::BadSignature { .. }), "{p}");
    assert!(p.to_string().contains("made by key"), "{p}");

    // Mallory's key and signature throughout: it holds, and only the allowed signers
    // tell that Mallory may not decide.
    let dir = tempdir();
    let approval = decision(Action::Approve, Some((SIGNED, &forged, &mallory)));
    let (path, k, seq) = signed_sample(dir.path(), &approval);
    assert_eq!(check(&path).outcome, Outcome::Intact);
    let only_alice = signers(&format!("alice@example.com {alice}"));
    let report = verify_file(&path, None, Some(&only_alice)).unwrap();
    assert_at(&report, k + 1, Some(seq as usize), "unlisted signer");
    assert!(matches!(
        tampered(&report).fault,
        Fault::SignerNotAllowed { .. }
    ));

    // A signature for another namespace (`-n git`) over the same text.
    let dir = tempdir();
    let alice = keygen(dir.path(), "alice");
    let file = dir.path().join("m");
    fs::write(&file, SIGNED).unwrap();
    assert!(
        std::process::Command::new("ssh-keygen")
            .args(["-q", "-Y", "sign", "-n", "git", "-f"])
            .arg(dir.path().join("alice"))
            .arg(&file)
            .status()
            .unwrap()
            .success()
    );
    let git = fs::read_to_string(file.with_extension("sig")).unwrap();
    let approval = decision(Action::Approve, Some((SIGNED, &git, &alice)));
    let (path, _, _) = signed_sample(dir.path(), &approval);
    let report = check(&path);
    assert!(
        tampered(&report).to_string().contains("namespace `git`"),
        "{}",
        tampered(&report)
    );
}

#[test]
fn record_times_parse_to_the_second() {
    let at = |ts| {
        super::verify::record_time(ts)
            .map(|t| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs())
    };
    assert_eq!(at("2026-01-02T03:04:05.123456789Z"), Some(1_767_323_045));
    assert_eq!(at("2026-01-02T03:04:05Z"), Some(1_767_323_045));
    for bad in [
        "2026-01-02T03:04:05",
        "2026-01-02 03:04:05Z",
        "2026-02-30T03:04:05Z",
        "2026-01-02T03:04:05.Z",
        "2026-01-02T03:04:05+01:00",
        "",
    ] {
        assert_eq!(at(bad), None, "{bad}");
    }
}

/// Found while writing the audit_log fuzz target (which reproduces it): a log forged to
/// begin with a rotate record of seq u64::MAX, after which no seq is left, is refused at
/// the next record (the seq that would follow overflowed); a line that is no record, or
/// one cut short, after it is reported as after any record.
#[test]
fn no_record_follows_the_last_seq() {
    let dir = tempdir();
    let path = dir.path().join("audit.log");
    let ts = "2026-01-01T00:00:00Z";
    let rotate = record::Rotate {
        version: record::FORMAT_VERSION,
        previous: "audit.log.1".into(),
        partial: None,
    };
    let (last, hash) =
        record::encode(u64::MAX, ts, RecordHash::GENESIS, Body::Rotate(&rotate)).unwrap();
    let (next, _) = record::encode(0, ts, hash, Body::Event(&event(1))).unwrap();
    write_lines(&path, &[last.clone(), next]);
    let report = check(&path);
    assert_eq!(tampered(&report).fault, Fault::NoSeqLeft);
    assert_eq!(
        (tampered(&report).line, tampered(&report).record),
        (Some(2), Some(0))
    );

    write_lines(&path, &[last.clone(), b"not a record".to_vec()]);
    let report = check(&path);
    assert_eq!(
        (tampered(&report).line, tampered(&report).record),
        (Some(2), None)
    );

    let mut cut = last;
    cut.extend_from_slice(b"\n{\"seq\":");
    fs::write(&path, cut).unwrap();
    assert!(matches!(check(&path).outcome, Outcome::Incomplete(_)));
}

/// Group commit: records written without a sync are made durable by a handle taken under
/// the log and used after it, which counts them; another handle counts none but still
/// syncs (another thread's records may be in flight).
#[test]
fn a_pending_sync_makes_what_was_written_durable_outside_the_log() {
    let dir = tempdir();
    let path = dir.path().join("audit.log");
    let mut log = AuditLog::open_with(
        &path,
        Options {
            sync_every: NonZeroU32::MAX,
            ..Options::default()
        },
    )
    .unwrap();
    for i in 0..10 {
        append(&mut log, i);
    }
    let pending = log.pending_sync().unwrap().unwrap();
    // The log goes on while the handle syncs.
    append(&mut log, 10);
    // The ten events (the open record was synced when written), not the one after.
    assert_eq!(pending.sync().unwrap(), 10);
    assert_eq!(log.pending_sync().unwrap().unwrap().sync().unwrap(), 1);
    assert_eq!(log.pending_sync().unwrap().unwrap().sync().unwrap(), 0);
    drop(log);
    let report = check(&path);
    assert_eq!(report.outcome, Outcome::Intact);
    assert_eq!(report.records, 12);
}
