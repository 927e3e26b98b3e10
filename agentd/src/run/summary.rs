//! What `agentd run` says at exit when anything was refused: how many refusals, by kind and
//! by the layer that refused, the first few paths or destinations of each, and where the
//! whole record is. A run whose agent exits 0 after a refusal it swallowed is then no
//! longer silent (`--quiet` turns it off).

use std::{collections::BTreeMap, fmt::Write as _};

use crate::event::{Event, Verdict};

/// Whether and how the summary is said.
#[derive(Debug, Clone, Default)]
pub struct Said {
    /// `--quiet`: not at all.
    pub quiet: bool,
    /// Where the events are, as the user named the file.
    pub events: Option<String>,
}

/// How many paths or destinations are named per kind and layer.
const NAMED: usize = 3;

#[derive(Debug, Default)]
struct Group {
    count: u64,
    targets: Vec<String>,
}

/// The refusals of one run, counted as they are written.
#[derive(Debug, Default)]
pub struct Tally {
    /// By (kind, layer), in that order.
    groups: BTreeMap<(String, String), Group>,
}

impl Tally {
    pub fn add(&mut self, e: &Event) {
        if e.verdict != Verdict::Deny {
            return;
        }
        // A summary of identical refusals counts those it stands for.
        let count = e
            .detail
            .get("repeated")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(1);
        let g = self
            .groups
            .entry((e.kind_name().to_owned(), e.layer_name()))
            .or_default();
        g.count += count;
        let target = e.target();
        if g.targets.len() < NAMED && !target.is_empty() && !g.targets.contains(&target) {
            g.targets.push(target);
        }
    }

    pub fn refusals(&self) -> u64 {
        self.groups.values().map(|g| g.count).sum()
    }

    /// The summary, or `None` when nothing was refused. `events`: where the events were
    /// written (a file's path), if anywhere.
    pub fn render(&self, events: Option<&str>) -> Option<String> {
        let total = self.refusals();
        if total == 0 {
            return None;
        }
        let mut s = format!(
            "agentd: {total} refused {}:\n",
            if total == 1 { "call" } else { "calls" }
        );
        for ((kind, layer), g) in &self.groups {
            let more = if u64::try_from(g.targets.len()).is_ok_and(|n| n < g.count) {
                ", ..."
            } else {
                ""
            };
            // A held call a person (or nobody in time) refused.
            let what = if kind == "approval" {
                "held call denied (ask)".to_owned()
            } else {
                format!("{kind} by {layer}")
            };
            let _ = writeln!(s, "  {} {what}: {}{more}", g.count, g.targets.join(", "));
        }
        let _ = match events {
            Some(path) => writeln!(s, "  every event is in {path}"),
            None => writeln!(
                s,
                "  (`--events FILE` keeps every event; `--quiet` omits this summary)"
            ),
        };
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Kind, Layer};

    fn refused(kind: Kind, layer: Layer, path: &str) -> Event {
        let mut e = Event::new("a", 7, "sh", kind, Verdict::Deny, layer);
        e.path = Some(path.to_owned());
        e
    }

    #[test]
    fn refusals_by_kind_and_layer_with_the_first_paths() {
        let mut t = Tally::default();
        assert_eq!(t.render(None), None, "nothing refused, nothing said");
        t.add(&Event::new(
            "a",
            7,
            "sh",
            Kind::Exec,
            Verdict::Allow,
            Layer::Kernel,
        ));
        assert_eq!(t.render(None), None);
        for p in ["/etc/shadow", "/root/.bashrc", "/etc/shadow", "/a", "/b"] {
            t.add(&refused(Kind::OpenRead, Layer::Landlock, p));
        }
        // A burst summary stands for the refusals it folded.
        t.add(&refused(Kind::OpenWrite, Layer::Landlock, "/usr/x").with("repeated", 40));
        let text = t.render(Some("/var/log/agentd/run.jsonl")).unwrap();
        assert_eq!(
            text,
            "agentd: 45 refused calls:\n  \
             5 file_read by landlock: /etc/shadow, /root/.bashrc, /a, ...\n  \
             40 file_write by landlock: /usr/x, ...\n  \
             every event is in /var/log/agentd/run.jsonl\n"
        );
    }
}
