//! Events as RFC 5424 syslog records with structured data.
//! (To be written: formatting, unix/udp/tcp transports.)

use std::sync::{Arc, mpsc::Receiver};

use crate::event::Event;

/// Where records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Target, String> {
        Err(format!("syslog target `{s}`: not implemented yet"))
    }
}

pub(super) fn start(
    _target: Target,
    _rx: Receiver<Arc<Event>>,
    _counters: Arc<super::Counters>,
) -> anyhow::Result<()> {
    anyhow::bail!("syslog export is not implemented yet")
}
