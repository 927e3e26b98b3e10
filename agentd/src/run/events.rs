//! `--events PATH`: one JSON object per line, flushed per line, from every source (the
//! supervisor, hooks such as the eBPF watch, later the breaker) merged through one
//! `tokio::sync::mpsc` channel into one writer.

use std::{
    fs::File,
    io::{self, Write as _},
    path::PathBuf,
};

use tokio::{sync::mpsc, task::JoinHandle};

use super::summary::Tally;
use crate::event::Event;

/// Capacity of the event channel. Senders wait when the writer falls behind: events are
/// never dropped silently.
pub const CHANNEL_CAPACITY: usize = 1024;

/// Where events go.
#[derive(Debug)]
pub enum Sink {
    Stderr,
    File { path: PathBuf, file: File },
}

impl Sink {
    /// `-` is stderr; anything else a file, created or appended to (several runs may share
    /// one log).
    pub fn open(spec: &str) -> io::Result<Sink> {
        if spec == "-" {
            return Ok(Sink::Stderr);
        }
        let path = PathBuf::from(spec);
        let file = File::options().create(true).append(true).open(&path)?;
        Ok(Sink::File { path, file })
    }

    /// Writes one event as one line and flushes it.
    pub fn write(&mut self, event: &Event) -> io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(io::Error::other)?;
        line.push(b'\n');
        match self {
            Sink::Stderr => {
                let mut err = io::stderr().lock();
                err.write_all(&line)?;
                err.flush()
            }
            Sink::File { file, .. } => {
                // One write(2) per line on an O_APPEND file: lines from concurrent
                // writers do not interleave.
                file.write_all(&line)?;
                file.flush()
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Sink::Stderr => "stderr".into(),
            Sink::File { path, .. } => path.display().to_string(),
        }
    }
}

/// Starts the writer task (inside a tokio runtime). Events sent on the returned channel are
/// written in order; the task ends when every sender is dropped.
///
/// On a terminal (stderr), each refusal, kill and breaker trip is also printed as one
/// readable line as it happens (unless the events themselves go to stderr).
pub fn start_writer(mut sink: Option<Sink>) -> (mpsc::Sender<Event>, JoinHandle<Tally>) {
    use std::io::IsTerminal as _;
    let (tx, mut rx) = mpsc::channel::<Event>(CHANNEL_CAPACITY);
    let show = io::stderr().is_terminal() && !matches!(sink, Some(Sink::Stderr));
    let task = tokio::spawn(async move {
        let mut failed = false;
        let mut tally = Tally::default();
        while let Some(event) = rx.recv().await {
            tally.add(&event);
            if show && event.stands_out() {
                eprintln!("agentd: {}", event.line(true));
            }
            if let Some(s) = sink.as_mut() {
                if let Err(e) = s.write(&event) {
                    if !failed {
                        eprintln!("agentd: cannot write events to {}: {e}", s.describe());
                        failed = true;
                    }
                }
            }
        }
        tally
    });
    (tx, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Kind, Layer, Verdict};

    #[test]
    fn one_flushed_json_line_per_event() {
        let path = std::env::temp_dir().join(format!("agentd-events-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut sink = Sink::open(path.to_str().unwrap()).unwrap();
        let e =
            Event::new("a-1", 7, "sh", Kind::Start, Verdict::None, Layer::Agentd).with("uid", 1000);
        sink.write(&e).unwrap();
        sink.write(&e).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let back: Event = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(back, e);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn writer_drains_every_sender() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let path = std::env::temp_dir().join(format!("agentd-writer-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        rt.block_on(async {
            let (tx, task) = start_writer(Some(Sink::open(path.to_str().unwrap()).unwrap()));
            let other = tx.clone();
            for i in 0..10 {
                let e = Event::new("a", i, "x", Kind::Exec, Verdict::Allow, Layer::Kernel);
                if i % 2 == 0 { &tx } else { &other }.send(e).await.unwrap();
            }
            drop((tx, other));
            task.await.unwrap();
        });
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 10);
        std::fs::remove_file(&path).unwrap();
    }
}
