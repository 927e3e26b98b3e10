//! Errors in a profile, located in its source: file, line, column, key, and what to write
//! instead.

use std::{fmt, ops::Range, path::PathBuf};

/// One problem found in a profile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
pub struct ProfileError {
    /// Where the profile came from (a path, or `builtin:NAME`).
    #[serde(rename = "file")]
    pub origin: String,
    /// 1-based line and column; `None` when the problem has no single place (a missing
    /// section, an unreadable file).
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted key (`filesystem.read[2]`), when the problem belongs to one.
    pub key: Option<String>,
    pub message: String,
    /// What to write instead.
    pub hint: Option<String>,
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": ")?;
        if let Some(key) = &self.key {
            write!(f, "`{key}`: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// All the problems found in one profile (validation reports every one, not just the
/// first, so a user fixes a file in one pass).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ProfileErrors(pub Vec<ProfileError>);

impl fmt::Display for ProfileErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Failure to find or read a profile before parsing it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read profile {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no profile named `{name}`: not in /etc/agentd/profiles and not built in (built-in: {builtin})"
    )]
    UnknownName { name: String, builtin: String },
    #[error("{0}")]
    Invalid(#[from] ProfileErrors),
}

/// Turns byte offsets into line/column for one source text.
#[derive(Debug)]
pub(crate) struct Locator<'a> {
    pub origin: &'a str,
    pub source: &'a str,
}

impl Locator<'_> {
    /// 1-based (line, column) of a byte offset; the column counts characters.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.source.len());
        let before = self.source.get(..offset).unwrap_or(self.source);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
        (line, column)
    }

    pub fn error(
        &self,
        span: Option<Range<usize>>,
        key: Option<String>,
        message: impl Into<String>,
        hint: Option<String>,
    ) -> ProfileError {
        let (line, column) = match span {
            Some(span) => {
                let (l, c) = self.position(span.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        ProfileError {
            origin: self.origin.to_owned(),
            line,
            column,
            key,
            message: message.into(),
            hint,
        }
    }
}

/// The candidate closest to `word` by edit distance, if it is close enough to be a typo.
pub(crate) fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_lines_and_columns() {
        let loc = Locator {
            origin: "x.toml",
            source: "a = 1\nbb = 2\n",
        };
        assert_eq!(loc.position(0), (1, 1));
        assert_eq!(loc.position(6), (2, 1));
        assert_eq!(loc.position(8), (2, 3));
    }

    #[test]
    fn closest_finds_typos_only() {
        let keys = ["read", "write", "exec", "canaries"];
        assert_eq!(closest("raed", &keys), Some("read"));
        assert_eq!(closest("canaris", &keys), Some("canaries"));
        assert_eq!(closest("network", &keys), None);
    }
}
