//! Arbitrary bytes as an audit log (up to three rotated files, separated by a form
//! feed), verified as `agentd audit verify --all` does, as they are and re-hashed: never
//! panics (agentd::fuzzing::audit_log).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|contents: &[u8]| agentd::fuzzing::audit_log(contents));
