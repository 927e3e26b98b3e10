//! `agentd-harness audit-sample`: a synthetic audit log for tests/tests/audit.rs.

use std::{
    num::{NonZeroU64, NonZeroUsize},
    path::Path,
    process::ExitCode,
};

use crate::{
    audit::{
        AuditLog, Options,
        cmd::EXIT_UNREADABLE,
        record::{Action, Control},
        writer,
    },
    event::{Event, Kind, Layer, Verdict},
};

/// Writes a log of `records` synthetic event and control records, rotating every
/// `rotate_every`. Refuses to touch an existing log: it is for tests and demonstrations.
pub fn sample(
    path: &Path,
    records: u64,
    rotate_every: Option<NonZeroU64>,
    keep: NonZeroUsize,
) -> anyhow::Result<ExitCode> {
    if let Some(existing) = [path.to_path_buf(), writer::rotated(path, 1)]
        .into_iter()
        .find(|p| p.symlink_metadata().is_ok())
    {
        eprintln!(
            "agentd: {} exists: `agentd-harness audit-sample` only writes new logs",
            existing.display()
        );
        return Ok(ExitCode::from(EXIT_UNREADABLE));
    }
    let mut log = AuditLog::open_with(
        path,
        Options {
            keep,
            ..Options::default()
        },
    )?;
    for i in 1..=records {
        if i % 4 == 0 {
            let action = if i % 8 == 0 {
                Action::Kill
            } else {
                Action::Launch
            };
            log.append_control(&Control {
                action,
                agent: Some(format!("sample-{}", i / 8)),
                by: writer::this_process(),
                detail: serde_json::Map::new(),
            })?;
        } else {
            let pid = u32::try_from(1000 + i).unwrap_or(u32::MAX);
            let event = Event::new(
                &format!("sample-{}", i / 8),
                pid,
                "sh",
                Kind::Exec,
                Verdict::Allow,
                Layer::Kernel,
            )
            .with("argv", format!("sh -c 'step {i}'"));
            log.append_event(&event)?;
        }
        if rotate_every.is_some_and(|n| i % n.get() == 0) && i < records {
            log.rotate()?;
        }
    }
    let head = log.head();
    println!(
        "wrote {records} records to {}, head {} (seq {})",
        path.display(),
        head.hash,
        head.seq
    );
    Ok(ExitCode::SUCCESS)
}
