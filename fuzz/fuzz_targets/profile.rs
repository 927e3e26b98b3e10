//! A profile file's contents, as `agentd profile check` takes them: parsed, validated,
//! compiled and rendered; never panics, and what compiles keeps the policy's promises
//! (agentd::fuzzing::profile).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| agentd::fuzzing::profile(bytes));
