//! parse_query on arbitrary bytes: never panics; what it accepts, `reply` answers with a
//! message of the same id that parses back to a response.
#![no_main]

use agentd_dns::{Rcode, parse_query, reply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    match parse_query(bytes) {
        Ok(query) => {
            assert_eq!(query.message, bytes);
            assert!(!query.name.ends_with('.'), "{:?}", query.name);
            assert!(
                !query.name.bytes().any(|b| b.is_ascii_uppercase()),
                "{:?}",
                query.name
            );
            for rcode in [Rcode::NxDomain, Rcode::Refused, Rcode::ServFail] {
                let answer = reply(&query, rcode);
                // A reply is never taken for a query (no resolver loops).
                let rejected = parse_query(&answer).unwrap_err();
                assert!(rejected.reply.is_none(), "{}", rejected.reason);
                assert_eq!(answer.get(..2), Some(&query.id.to_be_bytes()[..]));
            }
        }
        Err(rejected) => {
            if let Some(answer) = rejected.reply {
                assert_eq!(answer.get(..2), bytes.get(..2));
                assert!(parse_query(&answer).unwrap_err().reply.is_none());
            }
        }
    }
});
