//! The audit log: every event and every control action (who launched, stopped or killed
//! an agent), appended to a JSON Lines file in which each record carries the hash of the
//! one before it, so that editing, deleting, inserting or reordering records is detected
//! by `agentd audit verify`. The full description, for operators, is docs/audit.md.
//!
//! # Record format
//! One JSON object per line, fields in this order (see [`record`]):
//!
//! ```text
//! {"seq":7,"ts":"2026-…Z","prev":"<hex>","kind":"event","event":{…},"hash":"<hex>"}
//! ```
//!
//! - `seq`: 1 for the first record of a log, then +1 per record, across rotated files;
//! - `ts`: when the record was written (RFC 3339, UTC; the event has its own `ts`);
//! - `prev`: the `hash` of the record before; 64 zeros for the first record of a log;
//! - `kind` and the body it names: `open` (a writer opened the log: `version`, `pid`,
//!   optional `partial`), `rotate` (first record of a file continuing the chain of the
//!   file rotated before it: `version`, `previous` file name, optional `partial`), `event`
//!   (an [`crate::event::Event`]), `control` (`action`, `agent`, `by` {uid, gid, pid},
//!   `detail`);
//! - `hash`: SHA-256 of the line's exact bytes before `,"hash":"`, lowercase hex; the
//!   line ends `,"hash":"<hex>"}`.
//!
//! # Choices
//! - **Each record hashes itself, and links to the previous hash**, rather than only
//!   hashing the previous line: a record whose bytes were edited (content, `seq`, `prev`
//!   or `hash`) is itself the one named, not the one after it. A record rewritten *and*
//!   re-hashed is caught at the next record's `prev`; a log rewritten from some record on
//!   to its end can only be caught against a head kept elsewhere (`--expect-head`), as
//!   with any unkeyed chain.
//! - **Crash safety**: one `write(2)` of line + newline per record, `fdatasync` after each
//!   (configurable: [`writer::Options::sync_every`]; the daemon commits in groups through
//!   [`writer::AuditLog::pending_sync`]). After a crash the file may end in a
//!   partial line; `verify` reports it as an incomplete final record (exit 3) and the
//!   next writer leaves it in place, starting a new line with an `open` record whose
//!   `partial` gives the length and SHA-256 of those bytes, so the chain stays verifiable
//!   and the remnant stays visible.
//! - **Rotation** renames `PATH` to `PATH.1` (shifting `PATH.k` to `PATH.k+1`, keeping
//!   [`writer::Options::keep`]) and begins a new `PATH` with a `rotate` record whose
//!   `prev` is the last hash of `PATH.1`; `verify --all` checks those links, so a removed,
//!   replaced or reordered rotated file is detected. Removing the *oldest* files is what
//!   retention does and is not detected, except by `--expect-head`.
//!
//! # Use
//! [`AuditLog::open`] then [`AuditLog::append_event`] / [`AuditLog::append_control`];
//! share one `AuditLog` between threads behind a `Mutex` (it holds an exclusive `flock`,
//! so a second writer fails to open). [`sink`] adapts it to a `FnMut(&Event)` for the
//! supervisor's event writer.

pub mod cmd;
pub mod record;
pub mod verify;
pub mod writer;

#[cfg(test)]
mod tests;

pub use cmd::{AuditCommand, command};
#[cfg_attr(
    not(test),
    expect(
        unused_imports,
        reason = "for run/ and the daemon, which plug the log in"
    )
)]
pub use writer::{AuditError, AuditLog, Options, sink};
