//! Arbitrary bytes as one BPF ring-buffer record, decoded as the daemon decodes each
//! record: never panics, and the event it gives survives the control protocol
//! (agentd::fuzzing::kernel_record).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|record: &[u8]| agentd::fuzzing::kernel_record(record));
