//! `agentd audit ...`: argument parsing and output. Exit status of `verify`: 0 intact, 1
//! tampered, 2 unreadable or bad usage, 3 intact up to an incomplete final record.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Subcommand;
use serde::Serialize;

use super::{
    record::{Head, RecordHash},
    verify::{self, FileSummary, Incomplete, Outcome, Remnant, Report},
};
use crate::ask::sign::AllowedSigners;

/// Where the daemon keeps its audit log.
pub const DEFAULT_PATH: &str = "/var/log/agentd/audit.log";

pub const EXIT_TAMPERED: u8 = 1;
pub const EXIT_UNREADABLE: u8 = 2;
pub const EXIT_INCOMPLETE: u8 = 3;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the audit log's hash chain; name the first bad record
    ///
    /// Each record holds the SHA-256 of its own line and the hash of the record before it:
    /// an edited, removed, inserted or reordered record breaks the chain, and the first
    /// bad record is named with its line. With --all the rotated files PATH.N ... PATH.1
    /// are verified too, with the links between them. The head printed (the last record's
    /// hash) can be kept elsewhere: --expect-head HASH later fails if the log no longer
    /// contains it (rolled back, replaced, or rewritten from before it).
    ///
    /// Signed approvals and denials are checked too: the SSH signature a person made
    /// (ssh-keygen -Y sign -n agentd-approval) must hold over the message recorded, with
    /// the key recorded, and that message must state the record's decision and request.
    /// With --allowed-signers, each such key must also be listed in that file for the
    /// agentd-approval namespace at the time of its record. A bad signature fails like
    /// any other tampering, naming the record.
    ///
    /// Exit status: 0 intact; 1 tampered, or the expected head is missing; 2 unreadable,
    /// or bad usage (an unreadable or invalid --allowed-signers file too); 3 intact up to
    /// an incomplete final record or empty (a write was interrupted: agentd notes it and
    /// continues the chain when it next opens the log).
    #[command(after_help = "Examples:\n  \
agentd audit verify                                  /var/log/agentd/audit.log\n  \
agentd audit verify --all /var/log/agentd/audit.log  with its rotated files\n  \
agentd audit verify --all --expect-head 3b1f...      fails if the log was rolled back\n  \
agentd audit verify --allowed-signers FILE           only keys listed in FILE may sign")]
    Verify {
        /// The log
        #[arg(value_name = "PATH", default_value = DEFAULT_PATH)]
        path: PathBuf,
        /// Verify the rotated files (PATH.N ... PATH.1) and the links between them too
        #[arg(long)]
        all: bool,
        /// Print one JSON object: status, records, head, files, remnants, signed_decisions,
        /// problem
        #[arg(long)]
        json: bool,
        /// Fail unless the record with this hash (a head printed earlier) is in the log
        #[arg(long, value_name = "HASH")]
        expect_head: Option<RecordHash>,
        /// Fail unless every signed decision's key is listed in this allowed-signers file
        /// (ssh-keygen(1) ALLOWED SIGNERS format) for the agentd-approval namespace, at
        /// the time of its record
        #[arg(long, value_name = "FILE")]
        allowed_signers: Option<PathBuf>,
    },
}

/// Runs an `agentd audit` command.
pub fn command(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify {
            path,
            all,
            json,
            expect_head,
            allowed_signers,
        } => Ok(verify(
            &path,
            all,
            json,
            expect_head,
            allowed_signers.as_deref(),
        )),
    }
}

#[derive(Debug, Serialize)]
struct JsonReport<'a> {
    path: &'a Path,
    /// `ok`, `incomplete`, `tampered` or `unreadable`.
    status: &'static str,
    records: u64,
    head: Option<Head>,
    continues_from: Option<u64>,
    files: &'a [FileSummary],
    remnants: &'a [Remnant],
    /// Signed decisions whose signature was checked and holds.
    signed_decisions: u64,
    /// The file their keys were checked against, if any.
    allowed_signers: Option<&'a Path>,
    problem: Option<JsonProblem<'a>>,
    incomplete: Option<&'a Incomplete>,
    message: Option<String>,
}

#[derive(Debug, Serialize)]
struct JsonProblem<'a> {
    path: &'a Path,
    record: Option<u64>,
    line: Option<u64>,
    message: String,
}

fn verify(
    path: &Path,
    all: bool,
    json: bool,
    expect_head: Option<RecordHash>,
    allowed_signers: Option<&Path>,
) -> ExitCode {
    let signers = match allowed_signers.map(AllowedSigners::load).transpose() {
        Ok(s) => s,
        Err(e) => {
            if json {
                print_json(&serde_json::json!({
                    "path": path,
                    "status": "unreadable",
                    "allowed_signers": allowed_signers,
                    "message": e.to_string(),
                }));
            } else {
                eprintln!("agentd: {e}");
            }
            return ExitCode::from(EXIT_UNREADABLE);
        }
    };
    let result = if all {
        verify::verify_all(path, expect_head, signers.as_ref())
    } else {
        verify::verify_file(path, expect_head, signers.as_ref())
    };
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            if json {
                print_json(&serde_json::json!({
                    "path": path,
                    "status": "unreadable",
                    "message": e.to_string(),
                }));
            } else {
                eprintln!("agentd: {e}");
            }
            return ExitCode::from(EXIT_UNREADABLE);
        }
    };
    let (status, code) = match &report.outcome {
        Outcome::Intact => ("ok", ExitCode::SUCCESS),
        Outcome::Incomplete(_) => ("incomplete", ExitCode::from(EXIT_INCOMPLETE)),
        Outcome::Tampered(_) => ("tampered", ExitCode::from(EXIT_TAMPERED)),
    };
    if json {
        let (problem, incomplete, message) = match &report.outcome {
            Outcome::Intact => (None, None, None),
            Outcome::Incomplete(i) => (None, Some(i), Some(i.to_string())),
            Outcome::Tampered(p) => (
                Some(JsonProblem {
                    path: &p.path,
                    record: p.record,
                    line: p.line,
                    message: p.fault.to_string(),
                }),
                None,
                Some(p.to_string()),
            ),
        };
        print_json(&JsonReport {
            path,
            status,
            records: report.records,
            head: report.head,
            continues_from: report.continues_from,
            files: &report.files,
            remnants: &report.remnants,
            signed_decisions: report.signed_decisions,
            allowed_signers,
            problem,
            incomplete,
            message,
        });
        return code;
    }
    print_text(&report, all, allowed_signers);
    code
}

fn print_text(report: &Report, all: bool, allowed_signers: Option<&Path>) {
    for r in &report.remnants {
        eprintln!(
            "agentd: audit log {}: line {}: note: {} bytes of an interrupted write, noted by record {}",
            r.path.display(),
            r.line,
            r.bytes,
            r.noted_by
        );
    }
    if let (Some(seq), Some(first)) = (report.continues_from, report.files.first()) {
        let how = if all {
            "the files before it were rotated away"
        } else {
            "--all verifies the link"
        };
        eprintln!(
            "agentd: audit log {}: note: the chain continues from record {seq} in a rotated file; {how}",
            first.path.display()
        );
    }
    let summary = match report.head {
        Some(h) => format!(
            "{} records, head {} (seq {})",
            report.records, h.hash, h.seq
        ),
        None => "0 records".to_owned(),
    };
    let mut files = if all {
        format!(" across {} files", report.files.len())
    } else {
        String::new()
    };
    let n = report.signed_decisions;
    let plural = if n == 1 { "" } else { "s" };
    match allowed_signers {
        Some(signers) => files.push_str(&format!(
            "; {n} signed decision{plural} verified, by keys in {}",
            signers.display()
        )),
        None if n > 0 => files.push_str(&format!("; {n} signed decision{plural} verified")),
        None => {}
    }
    match &report.outcome {
        Outcome::Intact => println!("ok: {summary}{files}"),
        Outcome::Incomplete(i) => {
            println!("incomplete: {summary}{files}");
            eprintln!("agentd: {i}");
        }
        Outcome::Tampered(p) => eprintln!("agentd: {p}"),
    }
}

fn print_json(value: &impl Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("agentd: cannot print JSON: {e}"),
    }
}
