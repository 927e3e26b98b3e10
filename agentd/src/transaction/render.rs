//! Text output of changes: `agentd diff --stat` and `agentd diff`. Every file name, symlink
//! target and diff line goes through [`printable`] (or its content variant): a hostile name
//! or file cannot forge lines or drive the terminal.

use std::{fmt::Write as _, os::unix::ffi::OsStrExt as _, path::Path};

use super::{
    Change, ChangeKind, Entry, FileType, Transaction, TxError,
    plan::{DIFF_MAX, Sides, is_text},
};

/// Whether a character is escaped even in file contents: C0 controls (but tab), DEL, C1
/// controls, and the bidirectional overrides that reorder what a line shows.
fn dangerous(c: char) -> bool {
    let u = u32::from(c);
    (u < 0x20 && c != '\t')
        || u == 0x7f
        || (0x80..0xa0).contains(&u)
        || matches!(u, 0x200e | 0x200f | 0x202a..=0x202e | 0x2066..=0x2069)
}

fn escape_char(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\x1b' => out.push_str("\\x1b"),
        c if u32::from(c) < 0x80 => {
            let _ = write!(out, "\\x{:02x}", u32::from(c));
        }
        c => {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
    }
}

/// Bytes (a file name, a symlink target) as a single printable line: control characters as
/// `\n`, `\t`, `\x1b`, ..., backslash as `\\`, bytes that are not UTF-8 as `\xNN`.
pub fn printable(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else if dangerous(c) || c == '\t' {
                escape_char(&mut out, c);
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// [`printable`] for a path.
pub fn printable_path(p: &Path) -> String {
    printable(p.as_os_str().as_bytes())
}

/// One line of file contents, for a diff: tabs and backslashes kept, other controls
/// escaped.
fn printable_content(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    for c in line.chars() {
        if dangerous(c) {
            escape_char(&mut out, c);
        } else {
            out.push(c);
        }
    }
    out
}

fn marker(kind: &ChangeKind) -> char {
    match kind {
        ChangeKind::Added => 'A',
        ChangeKind::Modified => 'M',
        ChangeKind::Deleted => 'D',
        ChangeKind::Renamed { .. } => 'R',
        ChangeKind::ModeChanged { .. } => 'm',
        ChangeKind::OwnerChanged { .. } => 'o',
        ChangeKind::TypeChanged { .. } => 'T',
    }
}

fn suffix(t: FileType) -> &'static str {
    match t {
        FileType::Dir => "/",
        FileType::Symlink => "@",
        FileType::File
        | FileType::Whiteout
        | FileType::Fifo
        | FileType::Socket
        | FileType::CharDev
        | FileType::BlockDev => "",
    }
}

fn shown_path(c: &Change) -> String {
    let to = format!("{}{}", printable_path(&c.path), suffix(c.file_type));
    match &c.kind {
        ChangeKind::Renamed { from } => format!("{} => {to}", printable_path(from)),
        ChangeKind::Added
        | ChangeKind::Modified
        | ChangeKind::Deleted
        | ChangeKind::ModeChanged { .. }
        | ChangeKind::OwnerChanged { .. }
        | ChangeKind::TypeChanged { .. } => to,
    }
}

fn size_of(e: Option<&Entry>) -> String {
    e.map_or_else(|| "-".to_string(), |e| e.size.to_string())
}

fn stat_detail(c: &Change) -> String {
    let mut d = match (&c.kind, c.insertions, c.deletions) {
        (ChangeKind::ModeChanged { from, to }, _, _) => format!("mode {from:o} -> {to:o}"),
        (ChangeKind::OwnerChanged { from, to }, _, _) => {
            format!("owner {}:{} -> {}:{}", from.0, from.1, to.0, to.1)
        }
        (_, Some(i), Some(d)) => format!("+{i} -{d}"),
        (
            ChangeKind::Added
            | ChangeKind::Modified
            | ChangeKind::Deleted
            | ChangeKind::Renamed { .. }
            | ChangeKind::TypeChanged { .. },
            _,
            _,
        ) => match c.file_type {
            FileType::Dir => "directory".to_string(),
            FileType::Symlink => {
                let t = c
                    .new
                    .as_ref()
                    .or(c.old.as_ref())
                    .and_then(|e| e.target.as_deref())
                    .map(printable_path)
                    .unwrap_or_default();
                format!("-> {t}")
            }
            FileType::File
            | FileType::Whiteout
            | FileType::Fifo
            | FileType::Socket
            | FileType::CharDev
            | FileType::BlockDev => format!(
                "bin {} -> {} bytes",
                size_of(c.old.as_ref()),
                size_of(c.new.as_ref())
            ),
        },
    };
    if let ChangeKind::TypeChanged { from } = &c.kind {
        let _ = write!(d, " (was a {})", from.name());
    }
    if let Some(reason) = &c.conflict {
        let _ = write!(d, "  CONFLICT: {reason}");
    }
    d
}

/// Like `git diff --stat`: a kind marker (A added, M modified, D deleted, R renamed, m mode,
/// o owner, T type changed), the path (`/` after a directory, `@` after a symlink), lines
/// added and removed or the sizes, then a total line.
pub fn render_stat(changes: &[Change]) -> String {
    let rows: Vec<(char, String, String)> = changes
        .iter()
        .map(|c| (marker(&c.kind), shown_path(c), stat_detail(c)))
        .collect();
    let width = rows
        .iter()
        .map(|r| r.1.chars().count())
        .max()
        .unwrap_or(0)
        .min(60);
    let mut out = String::new();
    for (m, p, d) in &rows {
        let _ = writeln!(out, " {m} {p:<width$} | {d}");
    }
    let ins: u64 = changes.iter().filter_map(|c| c.insertions).sum();
    let del: u64 = changes.iter().filter_map(|c| c.deletions).sum();
    let conflicts = changes.iter().filter(|c| c.conflict.is_some()).count();
    let n = changes.len();
    let _ = write!(
        out,
        " {n} path{} changed, {ins} insertion{}(+), {del} deletion{}(-)",
        if n == 1 { "" } else { "s" },
        if ins == 1 { "" } else { "s" },
        if del == 1 { "" } else { "s" },
    );
    if conflicts > 0 {
        let _ = write!(
            out,
            ", {conflicts} conflict{}",
            if conflicts == 1 { "" } else { "s" }
        );
    }
    out.push('\n');
    out
}

fn binary_side(e: Option<&Entry>, sha: Option<String>) -> String {
    match (e, sha) {
        (Some(e), Some(sha)) => format!("{} bytes sha256 {sha}", e.size),
        (Some(e), None) => format!("{} bytes", e.size),
        (None, _) => "absent".to_string(),
    }
}

/// Unified diffs of the changes: text files with `similar` (3 lines of context), binary
/// files (a NUL or invalid UTF-8 in the first 8 KiB) and files over 1 MiB as sizes and
/// SHA-256, symlink targets, mode and owner changes, directories added and deleted.
pub fn render_diff(tx: &Transaction, changes: &[Change]) -> Result<String, TxError> {
    let sides = Sides::open(tx)?;
    let mut out = String::new();
    for c in changes {
        let p = printable_path(&c.path);
        let from = match &c.kind {
            ChangeKind::Renamed { from } => from.clone(),
            ChangeKind::Added
            | ChangeKind::Modified
            | ChangeKind::Deleted
            | ChangeKind::ModeChanged { .. }
            | ChangeKind::OwnerChanged { .. }
            | ChangeKind::TypeChanged { .. } => c.path.clone(),
        };
        let fp = printable_path(&from);
        let _ = writeln!(out, "diff agentd a/{fp} b/{p}");
        if let Some(reason) = &c.conflict {
            let _ = writeln!(out, "CONFLICT: {reason}");
        }
        let old_t = c.old.as_ref().map(|e| e.file_type);
        let new_t = c.new.as_ref().map(|e| e.file_type);
        match &c.kind {
            ChangeKind::Added => {
                let _ = writeln!(
                    out,
                    "new {} mode {:o}",
                    c.file_type.name(),
                    c.new.as_ref().map_or(0, |e| e.mode)
                );
            }
            ChangeKind::Deleted => {
                let _ = writeln!(
                    out,
                    "deleted {} mode {:o}",
                    c.file_type.name(),
                    c.old.as_ref().map_or(0, |e| e.mode)
                );
            }
            ChangeKind::Renamed { .. } => {
                let _ = writeln!(out, "rename from {fp}\nrename to {p}");
            }
            ChangeKind::TypeChanged { from } => {
                let _ = writeln!(
                    out,
                    "type changed: {} -> {}",
                    from.name(),
                    c.file_type.name()
                );
            }
            ChangeKind::OwnerChanged { from, to } => {
                let _ = writeln!(
                    out,
                    "old owner {}:{}\nnew owner {}:{}",
                    from.0, from.1, to.0, to.1
                );
            }
            ChangeKind::Modified | ChangeKind::ModeChanged { .. } => {}
        }
        if let (Some(o), Some(n)) = (&c.old, &c.new)
            && o.file_type == n.file_type
            && o.mode != n.mode
            && o.file_type != FileType::Symlink
        {
            let _ = writeln!(out, "old mode {:o}\nnew mode {:o}", o.mode, n.mode);
        }
        // Contents.
        let old_link = (old_t == Some(FileType::Symlink))
            .then(|| sides.old_target(&from))
            .transpose()?;
        let new_link = (new_t == Some(FileType::Symlink))
            .then(|| sides.new_target(&c.path))
            .transpose()?;
        if old_link != new_link {
            if let Some(t) = &old_link {
                let _ = writeln!(out, "-symlink to {}", printable_path(t));
            }
            if let Some(t) = &new_link {
                let _ = writeln!(out, "+symlink to {}", printable_path(t));
            }
        }
        let old_file = old_t == Some(FileType::File)
            && !matches!(c.kind, ChangeKind::Renamed { .. })
            && !matches!(
                c.kind,
                ChangeKind::ModeChanged { .. } | ChangeKind::OwnerChanged { .. }
            );
        let new_file = new_t == Some(FileType::File)
            && !matches!(c.kind, ChangeKind::Renamed { .. })
            && !matches!(
                c.kind,
                ChangeKind::ModeChanged { .. } | ChangeKind::OwnerChanged { .. }
            );
        if old_file || new_file {
            file_diff(&sides, c, old_file, new_file, &fp, &p, &mut out)?;
        }
    }
    Ok(out)
}

fn file_diff(
    sides: &Sides,
    c: &Change,
    old_file: bool,
    new_file: bool,
    fp: &str,
    p: &str,
    out: &mut String,
) -> Result<(), TxError> {
    let big = |e: &Option<Entry>| e.as_ref().is_some_and(|e| e.size > DIFF_MAX);
    let old = if old_file && !big(&c.old) && sides.may_show(c.old.as_ref()) {
        Some(sides.old_bytes(&c.path, DIFF_MAX)?)
    } else {
        None
    };
    let new = if new_file && !big(&c.new) {
        Some(sides.new_bytes(&c.path, DIFF_MAX)?)
    } else {
        None
    };
    let text = (!old_file || old.as_deref().is_some_and(is_text))
        && (!new_file || new.as_deref().is_some_and(is_text));
    if !text {
        let old_sha = if old_file {
            Some(sides.old_sha(&c.path)?)
        } else {
            None
        };
        let new_sha = if new_file {
            Some(sides.new_sha(&c.path)?)
        } else {
            None
        };
        let _ = writeln!(
            out,
            "binary: {} -> {}",
            binary_side(c.old.as_ref().filter(|_| old_file), old_sha),
            binary_side(c.new.as_ref().filter(|_| new_file), new_sha)
        );
        return Ok(());
    }
    let o = old
        .as_deref()
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let n = new
        .as_deref()
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "--- {}",
        if old_file {
            format!("a/{fp}")
        } else {
            "/dev/null".to_string()
        }
    );
    let _ = writeln!(
        out,
        "+++ {}",
        if new_file {
            format!("b/{p}")
        } else {
            "/dev/null".to_string()
        }
    );
    let diff = similar::TextDiff::from_lines(o.as_ref(), n.as_ref());
    let mut unified = diff.unified_diff();
    unified.context_radius(3);
    for hunk in unified.iter_hunks() {
        let _ = writeln!(out, "{}", hunk.header());
        for change in hunk.iter_changes() {
            let sign = match change.tag() {
                similar::ChangeTag::Delete => '-',
                similar::ChangeTag::Insert => '+',
                similar::ChangeTag::Equal => ' ',
            };
            let value = change.value();
            let line = value.strip_suffix('\n').unwrap_or(value);
            out.push(sign);
            out.push_str(&printable_content(line));
            out.push('\n');
            if !value.ends_with('\n') {
                out.push_str("\\ No newline at end of file\n");
            }
        }
    }
    Ok(())
}
