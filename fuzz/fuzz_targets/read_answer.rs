//! read_answer of a fixed query against arbitrary bytes: never panics; an answer it
//! accepts reads back the same from the message it gives the agent, its TTLs in range and
//! its chain starting at the query name and bounded.
#![no_main]

use agentd_dns::{MAX_CNAME_HOPS, Query, TTL_MAX, TTL_MIN, parse_query, read_answer};
use libfuzzer_sys::fuzz_target;

/// `www.example.test` type A, id 0 (the target gives it the response's id), RD set.
#[rustfmt::skip]
const QUERY: &[u8] = &[
    0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, // header: RD, one question
    3, b'w', b'w', b'w',
    7, b'e', b'x', b'a', b'm', b'p', b'l', b'e',
    4, b't', b'e', b's', b't',
    0, // the root
    0, 1, 0, 1, // type A, class IN
];

fuzz_target!(|response: &[u8]| {
    let Ok(mut query) = parse_query(QUERY) else {
        panic!("the fixed query does not parse");
    };
    // Matching the id is one comparison; give it to the fuzzer so it explores the rest.
    if let Some(&[high, low]) = response
        .get(..2)
        .map(<&[u8; 2]>::try_from)
        .and_then(Result::ok)
    {
        query = Query {
            id: u16::from_be_bytes([high, low]),
            ..query
        };
    }
    let Ok(answer) = read_answer(&query, response) else {
        return;
    };
    assert_eq!(answer.chain.first(), Some(&query.name));
    assert!(answer.chain.len() <= MAX_CNAME_HOPS + 1);
    for (_, ttl) in &answer.addrs {
        assert!((TTL_MIN..=TTL_MAX).contains(ttl));
    }
    let again = match read_answer(&query, &answer.message) {
        Ok(again) => again,
        Err(e) => panic!("the message given to the agent does not read back: {e}"),
    };
    assert_eq!(again, answer);
});
