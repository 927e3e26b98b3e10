//! agentd: the kernel, not the agent, decides what an AI agent may do.

mod ask;
mod audit;
mod bpf;
mod breaker;
mod cli;
mod daemon;
mod dns;
mod doctor;
mod event;
mod host;
mod profile;
mod report;
mod run;
mod sandbox;
mod transaction;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
