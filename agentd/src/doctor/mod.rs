//! `agentd doctor` (being written).
use std::process::ExitCode;

pub fn run(_json: bool) -> anyhow::Result<ExitCode> {
    anyhow::bail!("doctor is not implemented yet")
}
