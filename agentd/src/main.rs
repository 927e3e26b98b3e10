//! agentd: the kernel, not the agent, decides what an AI agent may do.

use std::process::ExitCode;

fn main() -> ExitCode {
    agentd::cli::main()
}
