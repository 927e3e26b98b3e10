//! One line of the control protocol or the daemon–supervisor link, decoded as each
//! message type: never panics, and what decodes encodes back to itself
//! (agentd::fuzzing::control_line).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| agentd::fuzzing::control_line(line));
