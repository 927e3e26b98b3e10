//! `agentd audit verify`: walks the chain line by line and names the first record that
//! breaks it.
//!
//! Each line is checked in this order, so that the record named is the one that was
//! changed whenever that can be told:
//! 1. its own hash (`hash` = SHA-256 of the line before `,"hash":"`): an edited byte
//!    anywhere in a line, `seq`, `prev` and `hash` included, names that line;
//! 2. its form (strict JSON, known kind, the body its kind names);
//! 3. its link: `prev` is the hash of the record before it and `seq` is one more, which
//!    names the first record after a removal, at an insertion or where records were
//!    swapped; and the record after a line that was rewritten and re-hashed;
//! 4. for a signed decision (a `control` record, `approve` or `deny`, with a
//!    `signature`): the signature holds over its `message` with its `key` in the
//!    `agentd-approval` namespace, and the message states the record's decision and
//!    request; with allowed signers, the key is listed there for that namespace at the
//!    record's `ts`. The chain alone cannot tell a decision rewritten and re-hashed from
//!    the last record on; the signature can: only the key's holder could have made it.
//!
//! Lines that are not records are accepted only as the remnant of an interrupted write,
//! when the next record notes exactly their bytes (`partial`). Bytes after the last newline
//! are an incomplete final record (a write cut short) when they could be one: a prefix of
//! `{"seq":` or more of a line, or NUL bytes a crash left; they never hide a bad record
//! before them, which is reported first.

use std::{
    fs::File,
    io::{self, BufRead, BufReader, Read as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use super::{
    record::{self, Hasher, Head, LineError, Parsed, RecordHash, RecordKind, SignedDecision},
    writer::MAX_LINE,
};
use crate::ask::sign::{self, AllowedSigners};

/// The first problem found, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit log {}: {}{fault}", path.display(), Where(*record, *line))]
pub struct Problem {
    pub path: PathBuf,
    /// The record: its `seq` when its own hash holds (so it was written with that seq),
    /// else the seq expected at that place in the chain, when known.
    pub record: Option<u64>,
    /// 1-based line number in `path`; `None` for a problem with the whole log.
    pub line: Option<u64>,
    pub fault: Fault,
}

/// `record N (line L): `.
struct Where(Option<u64>, Option<u64>);

impl std::fmt::Display for Where {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.0, self.1) {
            (Some(r), Some(l)) => write!(f, "record {r} (line {l}): "),
            (None, Some(l)) => write!(f, "line {l}: "),
            (Some(r), None) => write!(f, "record {r}: "),
            (None, None) => Ok(()),
        }
    }
}

/// What is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("{0}")]
    Line(LineError),
    #[error("longer than {MAX_LINE} bytes: not a record")]
    TooLong,
    #[error(
        "does not follow the record before it (prev {prev:#}, but that record's hash is {expected:#}): records were removed, inserted or reordered here, or the record before was rewritten"
    )]
    BrokenLink {
        prev: RecordHash,
        expected: RecordHash,
    },
    #[error("seq is {found}, expected {expected}")]
    WrongSeq { found: u64, expected: u64 },
    /// After a record of seq u64::MAX (a rotate record may begin a chain with any seq):
    /// a writer numbering a record a nanosecond would take 584 years to get there.
    #[error(
        "follows a record of seq {}, the last a log can number: the log was forged",
        u64::MAX
    )]
    NoSeqLeft,
    #[error("a log begins with an open or rotate record, not a {kind} record")]
    BadStart { kind: RecordKind },
    #[error(
        "an open record that begins a log has seq 1 and prev 000…0; this one (seq {seq}) continues a chain that is not here"
    )]
    BadOrigin { seq: u64 },
    #[error("a rotate record in the middle of a file (rotate records begin a file)")]
    RotateInMiddle,
    #[error("expected a rotate record linking this file to {}, found a {kind} record", previous.display())]
    ExpectedRotate { previous: PathBuf, kind: RecordKind },
    #[error(
        "does not follow the last record of {} (prev {prev:#}, hash there {expected:#}): a rotated file was removed, replaced or altered",
        previous.display()
    )]
    BrokenFileLink {
        previous: PathBuf,
        prev: RecordHash,
        expected: RecordHash,
    },
    #[error("notes an interrupted write before it, but there is none")]
    PartialMissing,
    #[error("followed by {bytes} bytes without a newline: the log was altered after it")]
    TrailingBytes { bytes: u64 },
    #[error(
        "ends in an incomplete record; a rotated file never does, since agentd rotates after a complete one"
    )]
    IncompleteRotated,
    #[error("empty; a rotated file always holds records")]
    EmptyRotated,
    #[error(
        "the expected head {hash} is not in the log: it was rolled back, replaced or rewritten (or the head is in an older, rotated file: use --all)"
    )]
    AnchorMissing { hash: RecordHash },
    #[error("a signed decision whose signature does not hold: {reason}")]
    BadSignature { reason: String },
    #[error("a signed decision that differs from the message signed: {what}")]
    NotAsSigned { what: String },
    #[error("a signed decision by a key the allowed signers do not admit: {reason}")]
    SignerNotAllowed { reason: String },
}

/// The log ends without a complete final record; everything before it is intact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Incomplete {
    pub path: PathBuf,
    /// The seq the record being written would have had.
    pub record: u64,
    pub line: u64,
    /// Bytes after the last newline (0: the file is empty).
    pub bytes: u64,
}

impl std::fmt::Display for Incomplete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = self.path.display();
        if self.bytes == 0 {
            write!(
                f,
                "audit log {path}: empty: agentd stopped before its first record reached the disk, or the file was emptied"
            )
        } else {
            write!(
                f,
                "audit log {path}: record {} (line {}): incomplete final record ({} bytes, no newline): a write was interrupted; agentd notes it and continues the chain when it next opens the log",
                self.record, self.line, self.bytes
            )
        }
    }
}

/// How verification ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Intact,
    /// Intact up to an incomplete final record (or an empty file).
    Incomplete(Incomplete),
    Tampered(Problem),
}

/// One file's part of the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileSummary {
    pub path: PathBuf,
    pub records: u64,
    /// Its first and last records.
    pub first: Option<Head>,
    pub last: Option<Head>,
}

/// Bytes of an interrupted write, accepted because the record after them notes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Remnant {
    pub path: PathBuf,
    pub line: u64,
    pub bytes: u64,
    /// The record that notes it.
    pub noted_by: u64,
}

/// What verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub files: Vec<FileSummary>,
    pub records: u64,
    /// The last intact record.
    pub head: Option<Head>,
    /// When the chain's first record here is a `rotate` record whose predecessor was not
    /// verified (rotated away, or not asked for without `--all`): that predecessor's seq.
    pub continues_from: Option<u64>,
    pub remnants: Vec<Remnant>,
    /// Signed decisions whose signature was checked and holds (before the outcome's
    /// problem, if any).
    pub signed_decisions: u64,
    pub outcome: Outcome,
}

/// Why a log could not be read (as opposed to read and found bad).
#[derive(Debug, thiserror::Error)]
#[error("audit log {}: cannot read: {source}", path.display())]
pub struct ReadError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Verifies one file. Its first record must begin a log (`open`, seq 1, prev 000…0) or
/// continue one from a rotated file (`rotate`, whose link is not checked here). With
/// `signers`, every signed decision's key must be listed there.
pub fn verify_file(
    path: &Path,
    expect_head: Option<RecordHash>,
    signers: Option<&AllowedSigners>,
) -> Result<Report, ReadError> {
    verify_files(&[path.to_path_buf()], expect_head, signers)
}

/// Verifies `PATH.N` … `PATH.1`, `PATH` as one chain, the links between files included.
/// Files are taken by number from the directory; a gap in the numbers is fine (a rotation
/// that stopped half-way), a missing or swapped file breaks a link.
pub fn verify_all(
    path: &Path,
    expect_head: Option<RecordHash>,
    signers: Option<&AllowedSigners>,
) -> Result<Report, ReadError> {
    let mut files = rotated_files(path)?;
    files.push(path.to_path_buf());
    verify_files(&files, expect_head, signers)
}

/// The rotated files of `path`, oldest (highest number) first.
pub fn rotated_files(path: &Path) -> Result<Vec<PathBuf>, ReadError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        Some(_) | None => Path::new("."),
    };
    let read_err = |source| ReadError {
        path: dir.to_path_buf(),
        source,
    };
    let Some(base) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let mut numbered = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name();
        let Some(k) = name
            .to_str()
            .and_then(|n| n.strip_prefix(base))
            .and_then(|n| n.strip_prefix('.'))
            .filter(|k| !k.starts_with('0') && k.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|k| k.parse::<u64>().ok())
        else {
            continue;
        };
        numbered.push((k, super::writer::rotated(path, k)));
    }
    numbered.sort_by_key(|(k, _)| std::cmp::Reverse(*k));
    Ok(numbered.into_iter().map(|(_, p)| p).collect())
}

/// Verifies contents held in memory as [`verify_all`] verifies files: `files` oldest first,
/// each the name problems give it and its bytes (what `agentd audit verify` would read).
pub fn verify_contents(
    files: &[(PathBuf, &[u8])],
    expect_head: Option<RecordHash>,
    signers: Option<&AllowedSigners>,
) -> Result<Report, ReadError> {
    let paths: Vec<PathBuf> = files.iter().map(|(path, _)| path.clone()).collect();
    verify_sources(&paths, expect_head, signers, |i, _| {
        files
            .get(i)
            .map(|(_, bytes)| *bytes)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    })
}

fn verify_files(
    files: &[PathBuf],
    expect_head: Option<RecordHash>,
    signers: Option<&AllowedSigners>,
) -> Result<Report, ReadError> {
    verify_sources(files, expect_head, signers, |_, path| File::open(path))
}

/// Verifies `files` as one chain, reading the `i`th through `open(i, path)` when the
/// chain reaches it.
fn verify_sources<R: io::Read>(
    files: &[PathBuf],
    expect_head: Option<RecordHash>,
    signers: Option<&AllowedSigners>,
    mut open: impl FnMut(usize, &Path) -> io::Result<R>,
) -> Result<Report, ReadError> {
    let mut v = Verifier {
        report: Report {
            files: Vec::new(),
            records: 0,
            head: None,
            continues_from: None,
            remnants: Vec::new(),
            signed_decisions: 0,
            outcome: Outcome::Intact,
        },
        anchor: expect_head,
        anchor_seen: false,
        signers,
    };
    let mut previous: Option<&Path> = None;
    for (i, path) in files.iter().enumerate() {
        let last_file = i + 1 == files.len();
        let file = open(i, path).map_err(|source| ReadError {
            path: path.clone(),
            source,
        })?;
        let outcome = v
            .file(path, previous, file, last_file)
            .map_err(|source| ReadError {
                path: path.clone(),
                source,
            })?;
        if let Some(outcome) = outcome {
            v.report.outcome = outcome;
            break;
        }
        previous = Some(path);
    }
    let tampered = matches!(v.report.outcome, Outcome::Tampered(_));
    if let (Some(hash), false, false) = (v.anchor, v.anchor_seen, tampered) {
        v.report.outcome = Outcome::Tampered(Problem {
            path: files.last().cloned().unwrap_or_default(),
            record: None,
            line: None,
            fault: Fault::AnchorMissing { hash },
        });
    }
    Ok(v.report)
}

struct Verifier<'a> {
    report: Report,
    anchor: Option<RecordHash>,
    anchor_seen: bool,
    signers: Option<&'a AllowedSigners>,
}

/// Lines that are not records, held until the next record says whether they are the
/// remnant of an interrupted write.
struct Pending {
    line: u64,
    record: Option<u64>,
    error: Fault,
    bytes: u64,
    hasher: Hasher,
}

/// One line as read.
enum Line {
    Terminated,
    /// Bytes after the last newline.
    Fragment,
    TooLong,
    Eof,
}

fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Line> {
    buf.clear();
    let n = r.take(MAX_LINE as u64 + 1).read_until(b'\n', buf)?;
    Ok(if n == 0 {
        Line::Eof
    } else if buf.last() == Some(&b'\n') {
        buf.pop();
        Line::Terminated
    } else if buf.len() > MAX_LINE {
        Line::TooLong
    } else {
        Line::Fragment
    })
}

impl Verifier<'_> {
    /// Verifies one file, continuing the chain from the files before it. `Some` ends the
    /// verification (a problem, or an incomplete final record).
    fn file(
        &mut self,
        path: &Path,
        previous: Option<&Path>,
        file: impl io::Read,
        last_file: bool,
    ) -> io::Result<Option<Outcome>> {
        let mut reader = BufReader::new(file);
        let mut summary = FileSummary {
            path: path.to_path_buf(),
            records: 0,
            first: None,
            last: None,
        };
        let mut pending: Option<Pending> = None;
        let mut buf = Vec::new();
        let mut line_no = 0u64;
        let problem = |record, line, fault| {
            Some(Outcome::Tampered(Problem {
                path: path.to_path_buf(),
                record,
                line: Some(line),
                fault,
            }))
        };
        // None after seq u64::MAX, which leaves no seq (see `check_seq`).
        let expected = |head: Option<Head>| head.and_then(|h| h.seq.checked_add(1));
        let end = loop {
            let kind = read_line(&mut reader, &mut buf)?;
            line_no += 1;
            match kind {
                Line::Terminated => {}
                Line::TooLong => {
                    if let Some(p) = pending {
                        break problem(p.record, p.line, p.error);
                    }
                    break problem(expected(self.report.head), line_no, Fault::TooLong);
                }
                Line::Eof | Line::Fragment => {
                    line_no -= u64::from(matches!(kind, Line::Eof));
                    // A bad line before the end is reported first, whatever the end is.
                    if let Some(p) = pending {
                        break problem(p.record, p.line, p.error);
                    }
                    break self.end_of_file(
                        path,
                        &summary,
                        matches!(kind, Line::Fragment).then_some(&buf[..]),
                        line_no,
                        previous,
                        last_file,
                    );
                }
            }
            let rec = match record::parse(&buf) {
                Ok(rec) => rec,
                Err(e) => {
                    match &mut pending {
                        Some(p) => {
                            p.hasher.update(b"\n");
                            p.hasher.update(&buf);
                            p.bytes += 1 + buf.len() as u64;
                        }
                        None => {
                            let mut hasher = Hasher::default();
                            hasher.update(&buf);
                            pending = Some(Pending {
                                line: line_no,
                                record: expected(self.report.head),
                                error: Fault::Line(e),
                                bytes: buf.len() as u64,
                                hasher,
                            });
                        }
                    }
                    continue;
                }
            };
            // A record whose own hash holds is named by its seq; a line that is none,
            // by the seq expected there.
            let record_no = rec.seq;
            match (pending.take(), rec.partial) {
                (None, None) => {}
                (Some(p), Some(note))
                    if note.bytes == p.bytes && note.sha256 == p.hasher.clone().finish() =>
                {
                    self.report.remnants.push(Remnant {
                        path: path.to_path_buf(),
                        line: p.line,
                        bytes: p.bytes,
                        noted_by: record_no,
                    });
                }
                (Some(p), Some(_) | None) => break problem(p.record, p.line, p.error),
                (None, Some(_)) => break problem(Some(record_no), line_no, Fault::PartialMissing),
            }
            if let Err(fault) = self.link(&rec, &summary, previous) {
                break problem(Some(record_no), line_no, fault);
            }
            if let Some(signed) = &rec.signed {
                if let Err(fault) = self.signed(signed) {
                    break problem(Some(record_no), line_no, fault);
                }
                self.report.signed_decisions += 1;
            }
            self.accept(&rec, &mut summary);
        };
        self.report.files.push(summary);
        Ok(end)
    }

    /// Whether `rec` may come next.
    fn link(
        &self,
        rec: &Parsed,
        summary: &FileSummary,
        previous: Option<&Path>,
    ) -> Result<(), Fault> {
        match (summary.records, self.report.head) {
            // The first record of the first file: it begins the log, or continues one
            // from files not verified.
            (0, None) => match rec.kind {
                RecordKind::Open if rec.seq == 1 && rec.prev == RecordHash::GENESIS => Ok(()),
                RecordKind::Open => Err(Fault::BadOrigin { seq: rec.seq }),
                RecordKind::Rotate => Ok(()),
                kind @ (RecordKind::Event | RecordKind::Control) => Err(Fault::BadStart { kind }),
            },
            // The first record of a later file: a rotate record linked to the last
            // record of the file before.
            (0, Some(head)) => {
                let previous = previous.map(Path::to_path_buf).unwrap_or_default();
                match rec.kind {
                    RecordKind::Rotate if rec.prev != head.hash => Err(Fault::BrokenFileLink {
                        previous,
                        prev: rec.prev,
                        expected: head.hash,
                    }),
                    RecordKind::Rotate => check_seq(rec, head),
                    kind @ (RecordKind::Open | RecordKind::Event | RecordKind::Control) => {
                        Err(Fault::ExpectedRotate { previous, kind })
                    }
                }
            }
            (_, head) => {
                let head = head.unwrap_or(Head::GENESIS);
                if rec.prev != head.hash {
                    return Err(Fault::BrokenLink {
                        prev: rec.prev,
                        expected: head.hash,
                    });
                }
                check_seq(rec, head)?;
                match rec.kind {
                    RecordKind::Rotate => Err(Fault::RotateInMiddle),
                    RecordKind::Open | RecordKind::Event | RecordKind::Control => Ok(()),
                }
            }
        }
    }

    /// Whether a signed decision is what its signer signed.
    fn signed(&self, d: &SignedDecision) -> Result<(), Fault> {
        let fingerprint = sign::verify_with_key(&d.key, d.message.as_bytes(), &d.signature)
            .map_err(|e| Fault::BadSignature {
                reason: e.to_string(),
            })?;
        let not_as_signed = |what: String| Err(Fault::NotAsSigned { what });
        if let Some(stated) = d.fingerprint.as_ref().filter(|f| **f != fingerprint) {
            return not_as_signed(format!(
                "it names key {stated}, but its key is {fingerprint}"
            ));
        }
        if d.message.lines().next() != Some(MESSAGE_HEADER) {
            return not_as_signed(format!(
                "the message signed does not begin `{MESSAGE_HEADER}`"
            ));
        }
        // `name: value`, on exactly one line of the message.
        let field = |name: &str| -> Result<&str, Fault> {
            let mut values = d
                .message
                .lines()
                .filter_map(|l| l.strip_prefix(name)?.strip_prefix(": "));
            match (values.next(), values.next()) {
                (Some(value), None) => Ok(value),
                (None, _) => Err(Fault::NotAsSigned {
                    what: format!("the message signed has no `{name}:` line"),
                }),
                (Some(_), Some(_)) => Err(Fault::NotAsSigned {
                    what: format!("the message signed has more than one `{name}:` line"),
                }),
            }
        };
        let word = d.decision.word();
        let signed = field("decision")?;
        if signed != word {
            return not_as_signed(format!(
                "the record says {word}, the message signed says {signed}"
            ));
        }
        if let Some(request) = &d.request {
            let signed = field("request")?;
            if signed != request {
                return not_as_signed(format!(
                    "the record answers {request}, the message signed answers {signed}"
                ));
            }
        }
        if let Some(signers) = self.signers {
            let Some(at) = record_time(&d.ts) else {
                return Err(Fault::SignerNotAllowed {
                    reason: format!("its ts `{}` is not an RFC 3339 UTC time", d.ts),
                });
            };
            signers
                .principal_for(&d.key, at)
                .map_err(|e| Fault::SignerNotAllowed {
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }

    fn accept(&mut self, rec: &Parsed, summary: &mut FileSummary) {
        if self.report.head.is_none() && rec.kind == RecordKind::Rotate {
            self.report.continues_from = Some(rec.seq.saturating_sub(1));
        }
        if summary.first.is_none() {
            summary.first = Some(rec.head());
        }
        summary.last = Some(rec.head());
        summary.records += 1;
        self.report.records += 1;
        self.report.head = Some(rec.head());
        if self.anchor == Some(rec.hash) {
            self.anchor_seen = true;
        }
    }

    /// The end of a file, after `line_no` lines; `fragment` is what follows the last
    /// newline, if anything.
    fn end_of_file(
        &mut self,
        path: &Path,
        summary: &FileSummary,
        fragment: Option<&[u8]>,
        line_no: u64,
        previous: Option<&Path>,
        last_file: bool,
    ) -> Option<Outcome> {
        // What names the place (after seq u64::MAX, a record that is complete is refused
        // by `check_seq`).
        let record = self.report.head.map_or(1, |h| h.seq.saturating_add(1));
        let problem = |record, line, fault| {
            Some(Outcome::Tampered(Problem {
                path: path.to_path_buf(),
                record,
                line,
                fault,
            }))
        };
        let Some(fragment) = fragment else {
            return match (summary.records, last_file) {
                (0, false) => problem(None, None, Fault::EmptyRotated),
                // An empty log: nothing in it is wrong, and nothing is in it.
                (0, true) if line_no == 0 => Some(Outcome::Incomplete(Incomplete {
                    path: path.to_path_buf(),
                    record,
                    line: 1,
                    bytes: 0,
                })),
                _ => None,
            };
        };
        let incomplete = Some(Outcome::Incomplete(Incomplete {
            path: path.to_path_buf(),
            record,
            line: line_no,
            bytes: fragment.len() as u64,
        }));
        let record = Some(record);
        match record::parse(fragment) {
            // A whole record whose newline did not make it: the writer notes it as a
            // remnant when it reopens, so it is incomplete too, if it fits the chain.
            Ok(rec) => match (rec.partial, self.link(&rec, summary, previous)) {
                (Some(_), _) => problem(Some(rec.seq), Some(line_no), Fault::PartialMissing),
                (None, Err(fault)) => problem(Some(rec.seq), Some(line_no), fault),
                (None, Ok(())) if !last_file => {
                    problem(Some(rec.seq), Some(line_no), Fault::IncompleteRotated)
                }
                (None, Ok(())) => incomplete,
            },
            Err(e @ (LineError::Altered | LineError::Malformed(_))) => {
                problem(record, Some(line_no), Fault::Line(e))
            }
            Err(LineError::NoHash) => {
                if let Some(bytes) = bytes_after_record(fragment) {
                    problem(record, Some(line_no), Fault::TrailingBytes { bytes })
                } else if !cut_short(fragment) {
                    problem(record, Some(line_no), Fault::Line(LineError::NoHash))
                } else if !last_file {
                    problem(record, Some(line_no), Fault::IncompleteRotated)
                } else {
                    incomplete
                }
            }
        }
    }
}

/// The first line of every message a decision's signer signs (`ask::message`).
const MESSAGE_HEADER: &str = "agentd-approval v1";

/// A record's `ts`, `YYYY-MM-DDTHH:MM:SS[.frac]Z`, to the second.
pub(super) fn record_time(ts: &str) -> Option<SystemTime> {
    let number = |from: usize, to: usize| {
        ts.get(from..to)
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u32>().ok())
    };
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    let fraction = ts.get(19..)?.strip_suffix('Z')?;
    let fraction_ok = fraction.is_empty()
        || fraction
            .strip_prefix('.')
            .is_some_and(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()));
    if !fraction_ok
        || separators
            .iter()
            .any(|&(at, c)| ts.as_bytes().get(at) != Some(&c))
    {
        return None;
    }
    let secs = sign::unix_utc(
        number(0, 4)?,
        number(5, 7)?,
        number(8, 10)?,
        number(11, 13)?,
        number(14, 16)?,
        number(17, 19)?,
    )?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

fn check_seq(rec: &Parsed, head: Head) -> Result<(), Fault> {
    match head.seq.checked_add(1) {
        Some(expected) if rec.seq == expected => Ok(()),
        Some(expected) => Err(Fault::WrongSeq {
            found: rec.seq,
            expected,
        }),
        None => Err(Fault::NoSeqLeft),
    }
}

/// Whether `fragment` could be the start of a record a crash cut short: a prefix of
/// `{"seq":` or longer, or NUL bytes (blocks a crash allocated but never wrote).
fn cut_short(fragment: &[u8]) -> bool {
    const START: &[u8] = br#"{"seq":"#;
    fragment.iter().all(|&b| b == 0) || START.starts_with(fragment) || fragment.starts_with(START)
}

/// If `fragment` is a whole record followed by more bytes, how many: no crash leaves that
/// (the newline was replaced).
fn bytes_after_record(fragment: &[u8]) -> Option<u64> {
    fragment
        .windows(2)
        .enumerate()
        .filter(|(_, w)| *w == b"\"}")
        .map(|(i, _)| i + 2)
        .find(|&end| end < fragment.len() && record::parse(&fragment[..end]).is_ok())
        .map(|end| (fragment.len() - end) as u64)
}
