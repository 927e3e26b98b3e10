//! agentd's test harnesses (see `agentd::harness`): built beside agentd, never packaged.

use std::process::ExitCode;

fn main() -> ExitCode {
    agentd::harness::main()
}
