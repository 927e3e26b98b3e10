//! agentd's resolver logic, without I/O: whether an agent's DNS query is one to forward,
//! what to answer when it is not, and which addresses an upstream answer admits.
//!
//! Everything here reads bytes an agent or an upstream server chose, so nothing panics on
//! any input (the crate is fuzzed: `cargo xtask fuzz`). The wire format is hickory-proto's;
//! this crate adds the checks and the policy-facing view:
//!
//! - a name is rendered in lowercase without the trailing dot (the root is `""`); a label
//!   byte other than `a-z`, `0-9`, `-` and `_` is written `\DDD` (decimal, as in zone
//!   files), so a `.` in the text is always a label boundary and a suffix match on the
//!   text (`*.example.com`) is a match on whole labels;
//! - an answer admits the A and AAAA records of the CNAME chain that starts at the query
//!   name, and nothing else in the message.

use std::{collections::HashMap, net::IpAddr};

use hickory_proto::{
    op::{Header, Message, MessageType, OpCode, Query as Question, ResponseCode},
    rr::{DNSClass, Name, RData, RecordType},
    serialize::binary::{BinDecodable as _, BinDecoder},
};

/// The shortest time an admitted address stays admitted, and the least TTL an agent sees.
pub const TTL_MIN: u32 = 2;
/// The longest time an admitted address stays admitted, and the most TTL an agent sees.
pub const TTL_MAX: u32 = 3600;
/// The largest DNS message (the TCP length prefix is 16 bits; so is a UDP datagram's).
pub const MAX_MESSAGE: usize = 65_535;
/// How many CNAME records `read_answer` follows from the query name.
pub const MAX_CNAME_HOPS: usize = 16;
/// A DNS message's fixed header: anything shorter is no message.
pub const HEADER_LEN: usize = 12;

/// A query fit to forward: one question of class IN, opcode QUERY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// The question's name: lowercase, no trailing dot (see the crate docs).
    pub name: String,
    pub qtype: u16,
    /// `A`, `AAAA`, `HTTPS`..., or `TYPE<n>` for a type hickory-proto does not name.
    pub type_name: String,
    /// The query as received, to forward unchanged.
    pub message: Vec<u8>,
}

/// Why a query is not forwarded: `reply` is what to send back (None: drop silently).
#[derive(Debug)]
pub struct Rejected {
    pub reason: String,
    pub reply: Option<Vec<u8>>,
}

/// The response codes agentd answers with itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    /// The name is not allowed: the agent is told it does not exist.
    NxDomain,
    /// Over the agent's query rate, or a class other than IN.
    Refused,
    /// The upstream did not answer, or answered something unusable.
    ServFail,
    /// The query is malformed.
    FormErr,
    /// An opcode other than QUERY.
    NotImp,
}

impl Rcode {
    /// The name used in events: `NXDOMAIN`, `REFUSED`...
    pub fn name(self) -> &'static str {
        match self {
            Rcode::NxDomain => "NXDOMAIN",
            Rcode::Refused => "REFUSED",
            Rcode::ServFail => "SERVFAIL",
            Rcode::FormErr => "FORMERR",
            Rcode::NotImp => "NOTIMP",
        }
    }

    /// The RFC 1035 RCODE value (all fit the header's 4 bits).
    fn code(self) -> u8 {
        match self {
            Rcode::NxDomain => 3,
            Rcode::Refused => 5,
            Rcode::ServFail => 2,
            Rcode::FormErr => 1,
            Rcode::NotImp => 4,
        }
    }
}

impl From<Rcode> for ResponseCode {
    fn from(rcode: Rcode) -> Self {
        match rcode {
            Rcode::NxDomain => ResponseCode::NXDomain,
            Rcode::Refused => ResponseCode::Refused,
            Rcode::ServFail => ResponseCode::ServFail,
            Rcode::FormErr => ResponseCode::FormErr,
            Rcode::NotImp => ResponseCode::NotImp,
        }
    }
}

/// What an upstream response to a `Query` says, and what to give the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// `NOERROR`, `NXDOMAIN`, `SERVFAIL`..., `RCODE<n>` for an unnamed code.
    pub rcode: String,
    /// The query name, then each CNAME target followed from it, in order.
    pub chain: Vec<String>,
    /// Each distinct A/AAAA address owned by a name of `chain`, with its clamped TTL (the
    /// largest when the address appears more than once), in answer order.
    pub addrs: Vec<(IpAddr, u32)>,
    /// The response to give the agent: the upstream's, every answer TTL clamped to
    /// [TTL_MIN, TTL_MAX].
    pub message: Vec<u8>,
}

/// Reads an agent's query: one question, class IN, opcode QUERY, QR clear.
///
/// A rejected query carries the reply to send when the message has a header and is not
/// itself a response (FORMERR, NOTIMP or REFUSED); a response is never answered, so two
/// resolvers cannot be made to bounce messages between them.
pub fn parse_query(bytes: &[u8]) -> Result<Query, Rejected> {
    let Ok(header) = Header::read(&mut BinDecoder::new(bytes)) else {
        return Err(Rejected::drop(
            "message shorter than a dns header (12 bytes)",
        ));
    };
    if header.message_type() == MessageType::Response {
        return Err(Rejected::drop(
            "message is a response (QR set), not a query",
        ));
    }
    if bytes.len() > MAX_MESSAGE {
        return Err(Rejected::answer(
            format!("query of {} bytes is over {MAX_MESSAGE}", bytes.len()),
            error_reply(&header, None, Rcode::FormErr),
        ));
    }
    if header.op_code() != OpCode::Query {
        return Err(Rejected::answer(
            format!("opcode {} is not QUERY", u8::from(header.op_code())),
            error_reply(&header, None, Rcode::NotImp),
        ));
    }
    if header.query_count() != 1 {
        return Err(Rejected::answer(
            format!("{} questions, not 1", header.query_count()),
            error_reply(&header, None, Rcode::FormErr),
        ));
    }
    let message = match Message::from_vec(bytes) {
        Ok(message) => message,
        Err(e) => {
            return Err(Rejected::answer(
                format!("malformed query: {e}"),
                error_reply(&header, None, Rcode::FormErr),
            ));
        }
    };
    let Some(question) = message.queries().first() else {
        return Err(Rejected::answer(
            "query has no question".to_owned(),
            error_reply(&header, None, Rcode::FormErr),
        ));
    };
    if question.query_class() != DNSClass::IN {
        return Err(Rejected::answer(
            format!("class {} is not IN", u16::from(question.query_class())),
            error_reply(&header, Some(question), Rcode::Refused),
        ));
    }
    Ok(Query {
        id: header.id(),
        name: name_text(question.name()),
        qtype: u16::from(question.query_type()),
        type_name: type_name(question.query_type()),
        message: bytes.to_vec(),
    })
}

/// A response to `query` carrying only `rcode`: the same id and question, RD copied, RA set.
pub fn reply(query: &Query, rcode: Rcode) -> Vec<u8> {
    let mut header = Header::new();
    header.set_id(query.id);
    // `query.message` is what parse_query accepted, so it parses; were it replaced, the
    // reply still answers the id, without a question.
    let parsed = Message::from_vec(&query.message).ok();
    if let Some(parsed) = &parsed {
        header.set_recursion_desired(parsed.recursion_desired());
    }
    error_reply(
        &header,
        parsed.as_ref().and_then(|m| m.queries().first()),
        rcode,
    )
}

/// The query agentd sends the upstream for `query`: a message of its own with id `id`
/// (not the agent's: the agent does not choose what an off-path spoofer must guess), the
/// one question, RD, and EDNS with a 1232-byte payload and the agent's DO bit — nothing
/// else of the agent's message (no other sections, options or flags) reaches the
/// upstream. The returned [`Query`] is what to read the upstream's response against.
pub fn upstream_query(query: &Query, id: u16) -> Result<Query, String> {
    let asked = Message::from_vec(&query.message).map_err(|e| format!("query: {e}"))?;
    let [question] = asked.queries() else {
        return Err("the query has no single question".to_owned());
    };
    let mut message = Message::new();
    message
        .set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(question.clone());
    let mut edns = hickory_proto::op::Edns::new();
    edns.set_max_payload(UPSTREAM_PAYLOAD);
    edns.set_dnssec_ok(
        asked
            .extensions()
            .as_ref()
            .is_some_and(|e| e.flags().dnssec_ok),
    );
    message.set_edns(edns);
    let bytes = message.to_vec().map_err(|e| format!("query: {e}"))?;
    Ok(Query {
        id,
        message: bytes,
        ..query.clone()
    })
}

/// The EDNS payload size agentd offers the upstream (the DNS flag day 2020 value).
pub const UPSTREAM_PAYLOAD: u16 = 1232;

/// `message` with its id replaced by `id` (a response to the agent's query, from one to
/// agentd's). A message shorter than its id is left alone.
pub fn with_id(mut message: Vec<u8>, id: u16) -> Vec<u8> {
    if let Some(head) = message.get_mut(..2) {
        head.copy_from_slice(&id.to_be_bytes());
    }
    message
}

/// `message` (an answer to `query`) as it may go back over UDP: itself when it fits the
/// size the query allows (512 bytes, or its EDNS payload size), else its header with TC
/// set and its question only, so the agent asks again over TCP (RFC 1035 4.2.1, RFC 6891).
pub fn fit_udp(query: &Query, message: Vec<u8>) -> Vec<u8> {
    let limit = Message::from_vec(&query.message).map_or(512, |q| q.max_payload());
    if message.len() <= usize::from(limit) {
        return message;
    }
    let truncated = Message::from_vec(&message).ok().and_then(|mut m| {
        m.take_answers();
        m.take_name_servers();
        m.take_additionals();
        m.set_truncated(true);
        m.to_vec().ok()
    });
    truncated.unwrap_or_else(|| reply(query, Rcode::ServFail))
}

/// Checks that `response` answers `query` (same id and question, a response to a QUERY),
/// follows the CNAME chain from the query name (at most MAX_CNAME_HOPS, stopping at a
/// loop), collects the A/AAAA addresses of the chain's names and clamps the answer TTLs.
pub fn read_answer(query: &Query, response: &[u8]) -> Result<Answer, String> {
    if response.len() > MAX_MESSAGE {
        return Err(format!(
            "response of {} bytes is over {MAX_MESSAGE}",
            response.len()
        ));
    }
    let mut message =
        Message::from_vec(response).map_err(|e| format!("malformed response: {e}"))?;
    if message.message_type() != MessageType::Response {
        return Err("upstream message is a query, not a response".to_owned());
    }
    if message.op_code() != OpCode::Query {
        return Err(format!(
            "response opcode {} is not QUERY",
            u8::from(message.op_code())
        ));
    }
    if message.id() != query.id {
        return Err(format!(
            "response id {} is not the query's {}",
            message.id(),
            query.id
        ));
    }
    let [question] = message.queries() else {
        return Err(format!(
            "response has {} questions, not 1",
            message.queries().len()
        ));
    };
    let name = name_text(question.name());
    let qtype = u16::from(question.query_type());
    if name != query.name || qtype != query.qtype || question.query_class() != DNSClass::IN {
        return Err(format!(
            "response question ({name:?}, type {qtype}, class {}) is not the query's \
             ({:?}, type {})",
            u16::from(question.query_class()),
            query.name,
            query.qtype
        ));
    }

    let owners: Vec<String> = message
        .answers()
        .iter()
        .map(|r| name_text(r.name()))
        .collect();
    let chain = cname_chain(&message, &owners, &query.name);

    let mut addrs: Vec<(IpAddr, u32)> = Vec::new();
    let mut seen: HashMap<IpAddr, usize> = HashMap::new();
    for (record, owner) in message.answers().iter().zip(&owners) {
        if record.dns_class() != DNSClass::IN || !chain.contains(owner) {
            continue;
        }
        let Some(addr) = record.data().ip_addr() else {
            continue;
        };
        let ttl = clamp_ttl(record.ttl());
        match seen.get(&addr).and_then(|&i| addrs.get_mut(i)) {
            Some(entry) => entry.1 = entry.1.max(ttl),
            None => {
                seen.insert(addr, addrs.len());
                addrs.push((addr, ttl));
            }
        }
    }

    for record in message.answers_mut() {
        record.set_ttl(clamp_ttl(record.ttl()));
    }
    let rcode = rcode_text(u16::from(message.response_code()));
    let encoded = message
        .to_vec()
        .map_err(|e| format!("cannot re-encode the response: {e}"))?;
    // Re-encoding may compress differently than the upstream did.
    if encoded.len() > MAX_MESSAGE {
        return Err(format!(
            "re-encoded response of {} bytes is over {MAX_MESSAGE}",
            encoded.len()
        ));
    }
    Ok(Answer {
        rcode,
        chain,
        addrs,
        message: encoded,
    })
}

/// The query name, then each CNAME target of the answer section in turn. `owners` holds
/// the rendered owner name of each answer record.
fn cname_chain(message: &Message, owners: &[String], start: &str) -> Vec<String> {
    let mut chain = vec![start.to_owned()];
    for _ in 0..MAX_CNAME_HOPS {
        let Some(current) = chain.last() else {
            break;
        };
        let target = message
            .answers()
            .iter()
            .zip(owners)
            .find_map(|(record, owner)| {
                if record.dns_class() != DNSClass::IN || owner != current {
                    return None;
                }
                if let RData::CNAME(cname) = record.data() {
                    Some(name_text(&cname.0))
                } else {
                    None
                }
            });
        match target {
            Some(target) if !chain.contains(&target) => chain.push(target),
            // The end of the chain, or a loop.
            Some(_) | None => break,
        }
    }
    chain
}

fn clamp_ttl(ttl: u32) -> u32 {
    ttl.clamp(TTL_MIN, TTL_MAX)
}

/// A response with the request's id, opcode and RD, RA set, `question` if any, and `rcode`.
fn error_reply(request: &Header, question: Option<&Question>, rcode: Rcode) -> Vec<u8> {
    let mut message = Message::error_msg(request.id(), request.op_code(), rcode.into());
    message
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true);
    if let Some(question) = question {
        message.add_query(question.clone());
    }
    match message.to_vec() {
        Ok(bytes) => bytes,
        Err(_) => bare_header(request, rcode),
    }
}

/// The 12-byte header of `error_reply` with no question, for when hickory-proto cannot
/// encode the question back (RFC 1035 4.1.1): id; QR=1, opcode, RD; RA=1, rcode; four
/// zero counts.
fn bare_header(request: &Header, rcode: Rcode) -> Vec<u8> {
    let [id_high, id_low] = request.id().to_be_bytes();
    let opcode = (u8::from(request.op_code()) & 0x0f) << 3;
    let rd = u8::from(request.recursion_desired());
    let mut bytes = vec![id_high, id_low, 0x80 | opcode | rd, 0x80 | rcode.code()];
    bytes.resize(12, 0);
    bytes
}

/// `name` in lowercase, without the trailing dot, each byte outside `a-z0-9-_` as `\DDD`.
fn name_text(name: &Name) -> String {
    let mut text = String::with_capacity(name.len());
    for (i, label) in name.iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        for byte in label.iter().map(u8::to_ascii_lowercase) {
            if byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'_' {
                text.push(char::from(byte));
            } else {
                text.push_str(&format!("\\{byte:03}"));
            }
        }
    }
    text
}

fn type_name(rtype: RecordType) -> String {
    if let RecordType::Unknown(code) = rtype {
        format!("TYPE{code}")
    } else {
        <&str>::from(rtype).to_owned()
    }
}

/// The mnemonic of a response code (RFC 1035, 2136, 6891, 2845, 2930, 4635, 7873), or
/// `RCODE<n>` for one without.
fn rcode_text(code: u16) -> String {
    let mnemonic = match code {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        16 => "BADVERS",
        17 => "BADKEY",
        18 => "BADTIME",
        19 => "BADMODE",
        20 => "BADNAME",
        21 => "BADALG",
        22 => "BADTRUNC",
        23 => "BADCOOKIE",
        _ => return format!("RCODE{code}"),
    };
    mnemonic.to_owned()
}

impl Rejected {
    fn drop(reason: &str) -> Self {
        Self {
            reason: reason.to_owned(),
            reply: None,
        }
    }

    fn answer(reason: String, reply: Vec<u8>) -> Self {
        Self {
            reason,
            reply: Some(reply),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr},
        str::FromStr as _,
    };

    use hickory_proto::rr::{
        Record,
        rdata::{A, AAAA, CNAME},
    };

    use super::*;

    const ID: u16 = 0x1234;

    fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    fn question(text: &str, rtype: RecordType) -> Question {
        Question::query(name(text), rtype)
    }

    fn query_message(text: &str, rtype: RecordType) -> Message {
        let mut message = Message::new();
        message
            .set_id(ID)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(question(text, rtype));
        message
    }

    fn query(text: &str, rtype: RecordType) -> Query {
        parse_query(&query_message(text, rtype).to_vec().unwrap()).unwrap()
    }

    fn a(owner: &str, ttl: u32, ip: [u8; 4]) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(ip))))
    }

    fn aaaa(owner: &str, ttl: u32, ip: &str) -> Record {
        let ip = Ipv6Addr::from_str(ip).unwrap();
        Record::from_rdata(name(owner), ttl, RData::AAAA(AAAA(ip)))
    }

    fn cname(owner: &str, ttl: u32, target: &str) -> Record {
        Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
    }

    /// A NOERROR response to `query_message(text, rtype)` with these answers.
    fn response(text: &str, rtype: RecordType, answers: Vec<Record>) -> Message {
        let mut message = query_message(text, rtype);
        message
            .set_message_type(MessageType::Response)
            .set_recursion_available(true)
            .insert_answers(answers);
        message
    }

    fn answer(rtype: RecordType, answers: Vec<Record>) -> Result<Answer, String> {
        let q = query("www.example.test", rtype);
        read_answer(
            &q,
            &response("www.example.test", rtype, answers)
                .to_vec()
                .unwrap(),
        )
    }

    fn v4(ip: [u8; 4]) -> IpAddr {
        IpAddr::from(ip)
    }

    #[test]
    fn the_upstream_gets_a_query_of_agentds_own() {
        // The agent's query carries an answer section, an odd id and CD.
        let mut m = query_message("Www.Example.test", RecordType::AAAA);
        m.add_answer(a("www.example.test", 60, [10, 0, 0, 1]));
        m.set_checking_disabled(true);
        let agent = parse_query(&m.to_vec().unwrap()).unwrap();
        let up = upstream_query(&agent, 0xbeef).unwrap();
        assert_eq!(up.id, 0xbeef);
        assert_eq!(
            (up.name.as_str(), up.qtype),
            (agent.name.as_str(), agent.qtype)
        );
        let sent = Message::from_vec(&up.message).unwrap();
        assert_eq!(sent.id(), 0xbeef);
        assert!(sent.answers().is_empty());
        assert!(!sent.checking_disabled());
        assert!(sent.recursion_desired());
        assert_eq!(sent.queries().len(), 1);
        assert_eq!(sent.max_payload(), UPSTREAM_PAYLOAD);
        // The response to it reads against it, and goes back with the agent's id.
        let mut r = sent.clone();
        r.set_message_type(MessageType::Response).add_answer(aaaa(
            "www.example.test",
            60,
            "2001:db8::1",
        ));
        let answer = read_answer(&up, &r.to_vec().unwrap()).unwrap();
        assert_eq!(answer.addrs.len(), 1);
        let back = with_id(answer.message, agent.id);
        assert_eq!(Message::from_vec(&back).unwrap().id(), ID);
        assert_eq!(with_id(vec![1], 7), vec![1]);
    }

    #[test]
    fn an_answer_too_large_for_udp_goes_back_truncated() {
        let q = query("www.example.test", RecordType::A);
        let many: Vec<Record> = (0..60u8)
            .map(|i| a("www.example.test", 60, [10, 0, 0, i]))
            .collect();
        let big = response("www.example.test", RecordType::A, many)
            .to_vec()
            .unwrap();
        assert!(big.len() > 512);
        let fitted = fit_udp(&q, big);
        assert!(fitted.len() <= 512);
        let m = Message::from_vec(&fitted).unwrap();
        assert!(m.truncated());
        assert_eq!(m.id(), ID);
        assert!(m.answers().is_empty());
        assert_eq!(m.queries().len(), 1);
        // One that fits is given as it is.
        let small = response(
            "www.example.test",
            RecordType::A,
            vec![a("www.example.test", 60, [10, 0, 0, 1])],
        )
        .to_vec()
        .unwrap();
        assert_eq!(fit_udp(&q, small.clone()), small);
        // An EDNS payload size lets more through.
        let mut edns_query = query_message("www.example.test", RecordType::A);
        let mut edns = hickory_proto::op::Edns::new();
        edns.set_max_payload(4096);
        edns_query.set_edns(edns);
        let q = parse_query(&edns_query.to_vec().unwrap()).unwrap();
        let many: Vec<Record> = (0..60u8)
            .map(|i| a("www.example.test", 60, [10, 0, 0, i]))
            .collect();
        let big = response("www.example.test", RecordType::A, many)
            .to_vec()
            .unwrap();
        assert_eq!(fit_udp(&q, big.clone()), big);
    }

    /// A 12-byte header with QR=0, opcode QUERY, RD, and these counts.
    fn header(qd: u16, an: u16) -> Vec<u8> {
        let mut bytes = vec![0x12, 0x34, 0x01, 0x00];
        bytes.extend_from_slice(&qd.to_be_bytes());
        bytes.extend_from_slice(&an.to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, 0]);
        bytes
    }

    fn rejected(bytes: &[u8]) -> Rejected {
        parse_query(bytes).unwrap_err()
    }

    /// The reply of a rejection, parsed.
    fn reply_of(rejected: &Rejected) -> Message {
        Message::from_vec(rejected.reply.as_ref().unwrap()).unwrap()
    }

    // parse_query

    #[test]
    fn a_query_is_read_lowercase_without_the_trailing_dot() {
        let q = query("WWW.Example.TEST.", RecordType::A);
        assert_eq!(q.id, ID);
        assert_eq!(q.name, "www.example.test");
        assert_eq!(q.qtype, 1);
        assert_eq!(q.type_name, "A");
        assert_eq!(
            q.message,
            query_message("WWW.Example.TEST.", RecordType::A)
                .to_vec()
                .unwrap()
        );
    }

    #[test]
    fn type_names_are_mnemonics_or_type_n() {
        assert_eq!(query("x.test", RecordType::AAAA).type_name, "AAAA");
        assert_eq!(query("x.test", RecordType::HTTPS).type_name, "HTTPS");
        let q = query("x.test", RecordType::Unknown(65_280));
        assert_eq!((q.qtype, q.type_name.as_str()), (65_280, "TYPE65280"));
    }

    #[test]
    fn the_root_name_is_empty() {
        assert_eq!(query(".", RecordType::NS).name, "");
    }

    #[test]
    fn label_bytes_outside_ldh_are_escaped_so_dots_are_label_boundaries() {
        // One label "evil.example" under "com": not below example.com.
        let odd = Name::from_labels([&b"evil.example"[..], b"com"]).unwrap();
        let mut message = query_message("x.test", RecordType::A);
        message.queries_mut()[0].set_name(odd);
        let q = parse_query(&message.to_vec().unwrap()).unwrap();
        assert_eq!(q.name, "evil\\046example.com");
        assert!(!q.name.ends_with(".example.com"));

        let odd = Name::from_labels([&b"A\\ \xff*"[..], b"test"]).unwrap();
        assert_eq!(name_text(&odd), "a\\092\\032\\255\\042.test");
    }

    #[test]
    fn short_messages_are_dropped() {
        for len in 0..12 {
            let r = rejected(&header(1, 0)[..len]);
            assert!(r.reply.is_none(), "{len} bytes");
            assert!(r.reason.contains("shorter"), "{}", r.reason);
        }
    }

    #[test]
    fn responses_are_dropped_never_answered() {
        let mut message = query_message("x.test", RecordType::A);
        message.set_message_type(MessageType::Response);
        let r = rejected(&message.to_vec().unwrap());
        assert!(r.reply.is_none());
        assert!(r.reason.contains("response"), "{}", r.reason);
    }

    #[test]
    fn an_oversized_query_gets_formerr() {
        let mut bytes = query_message("x.test", RecordType::A).to_vec().unwrap();
        bytes.resize(MAX_MESSAGE + 1, 0);
        let r = rejected(&bytes);
        let reply = reply_of(&r);
        assert_eq!(reply.id(), ID);
        assert_eq!(reply.response_code(), ResponseCode::FormErr);
        assert!(r.reason.contains("over 65535"), "{}", r.reason);
        // Trailing bytes up to the limit are ignored.
        bytes.truncate(MAX_MESSAGE);
        assert_eq!(parse_query(&bytes).unwrap().name, "x.test");
    }

    #[test]
    fn opcodes_other_than_query_get_notimp_with_the_opcode_echoed() {
        for op_code in [
            OpCode::Update,
            OpCode::Notify,
            OpCode::Status,
            OpCode::Unknown(1),
        ] {
            let mut message = query_message("x.test", RecordType::A);
            message.set_op_code(op_code);
            let r = rejected(&message.to_vec().unwrap());
            let reply = reply_of(&r);
            assert_eq!(reply.response_code(), ResponseCode::NotImp);
            assert_eq!(reply.op_code(), op_code);
            assert_eq!(reply.message_type(), MessageType::Response);
        }
    }

    #[test]
    fn zero_or_two_questions_get_formerr() {
        let mut bytes = header(0, 0);
        let r = rejected(&bytes);
        assert_eq!(reply_of(&r).response_code(), ResponseCode::FormErr);

        let mut message = query_message("x.test", RecordType::A);
        message.add_query(question("y.test", RecordType::A));
        let r = rejected(&message.to_vec().unwrap());
        assert_eq!(reply_of(&r).response_code(), ResponseCode::FormErr);
        assert!(r.reason.contains("2 questions"), "{}", r.reason);

        bytes[5] = 0xff; // 255 questions, none present
        assert_eq!(
            reply_of(&rejected(&bytes)).response_code(),
            ResponseCode::FormErr
        );
    }

    #[test]
    fn a_class_other_than_in_is_refused_with_the_question_echoed() {
        let mut message = query_message("version.bind", RecordType::TXT);
        message.queries_mut()[0].set_query_class(DNSClass::CH);
        let r = rejected(&message.to_vec().unwrap());
        let reply = reply_of(&r);
        assert_eq!(reply.response_code(), ResponseCode::Refused);
        assert_eq!(reply.queries()[0].query_class(), DNSClass::CH);
        assert_eq!(reply.queries()[0].name().to_ascii(), "version.bind.");
        assert!(r.reason.contains("class 3"), "{}", r.reason);
    }

    #[test]
    fn every_truncation_of_a_query_is_rejected_without_panic() {
        let bytes = query_message("www.example.test", RecordType::AAAA)
            .to_vec()
            .unwrap();
        for len in 0..bytes.len() {
            let r = rejected(&bytes[..len]);
            if len >= 12 {
                assert_eq!(reply_of(&r).response_code(), ResponseCode::FormErr, "{len}");
            }
        }
    }

    #[test]
    fn compression_pointer_loops_are_formerr() {
        // The question name is a pointer to itself (offset 12).
        let mut bytes = header(1, 0);
        bytes.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(
            reply_of(&rejected(&bytes)).response_code(),
            ResponseCode::FormErr
        );
        // Two labels' worth, each pointing at the other.
        let mut bytes = header(1, 0);
        bytes.extend_from_slice(&[1, b'a', 0xc0, 16, 1, b'b', 0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(
            reply_of(&rejected(&bytes)).response_code(),
            ResponseCode::FormErr
        );
        // A pointer past the end.
        let mut bytes = header(1, 0);
        bytes.extend_from_slice(&[0xc0, 0xff, 0, 1, 0, 1]);
        assert_eq!(
            reply_of(&rejected(&bytes)).response_code(),
            ResponseCode::FormErr
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut state: u32 = 0x2545_f491;
        for len in 0..600 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    state.to_le_bytes()[0]
                })
                .collect();
            let _ = parse_query(&bytes);
            let _ = read_answer(&query("x.test", RecordType::A), &bytes);
        }
    }

    // reply

    #[test]
    fn reply_keeps_id_and_question_copies_rd_and_sets_ra() {
        let q = query("WWW.Example.test", RecordType::AAAA);
        for (rcode, code, text) in [
            (Rcode::NxDomain, ResponseCode::NXDomain, "NXDOMAIN"),
            (Rcode::Refused, ResponseCode::Refused, "REFUSED"),
            (Rcode::ServFail, ResponseCode::ServFail, "SERVFAIL"),
            (Rcode::FormErr, ResponseCode::FormErr, "FORMERR"),
            (Rcode::NotImp, ResponseCode::NotImp, "NOTIMP"),
        ] {
            let reply = Message::from_vec(&reply(&q, rcode)).unwrap();
            assert_eq!(reply.id(), ID);
            assert_eq!(reply.message_type(), MessageType::Response);
            assert_eq!(reply.op_code(), OpCode::Query);
            assert!(reply.recursion_desired());
            assert!(reply.recursion_available());
            assert_eq!(reply.response_code(), code);
            assert_eq!(rcode.name(), text);
            // The question as asked, case included (resolvers may check 0x20 case).
            assert_eq!(reply.queries().len(), 1);
            assert_eq!(reply.queries()[0].name().to_ascii(), "WWW.Example.test.");
            assert_eq!(reply.queries()[0].query_type(), RecordType::AAAA);
            assert!(reply.answers().is_empty());
        }

        let mut no_rd = query_message("x.test", RecordType::A);
        no_rd.set_recursion_desired(false);
        let q = parse_query(&no_rd.to_vec().unwrap()).unwrap();
        assert!(
            !Message::from_vec(&reply(&q, Rcode::Refused))
                .unwrap()
                .recursion_desired()
        );
    }

    #[test]
    fn reply_to_a_query_whose_message_does_not_parse_is_a_bare_header() {
        let mut q = query("x.test", RecordType::A);
        q.message = vec![1, 2, 3];
        let reply = Message::from_vec(&reply(&q, Rcode::ServFail)).unwrap();
        assert_eq!(reply.id(), ID);
        assert_eq!(reply.response_code(), ResponseCode::ServFail);
        assert!(reply.queries().is_empty());
        assert!(reply.recursion_available());
    }

    #[test]
    fn bare_header_encodes_the_reply_header() {
        let mut header = Header::new();
        header
            .set_id(ID)
            .set_op_code(OpCode::Update)
            .set_recursion_desired(true);
        let bytes = bare_header(&header, Rcode::NotImp);
        assert_eq!(
            bytes,
            [
                0x12,
                0x34,
                0x80 | (5 << 3) | 1,
                0x80 | 4,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0
            ]
        );
        let parsed = Message::from_vec(&bytes).unwrap();
        assert_eq!(parsed.op_code(), OpCode::Update);
        assert_eq!(parsed.response_code(), ResponseCode::NotImp);
    }

    // read_answer

    #[test]
    fn an_a_answer_gives_its_address() {
        let got = answer(
            RecordType::A,
            vec![a("www.example.test", 300, [192, 0, 2, 1])],
        )
        .unwrap();
        assert_eq!(got.rcode, "NOERROR");
        assert_eq!(got.chain, ["www.example.test"]);
        assert_eq!(got.addrs, [(v4([192, 0, 2, 1]), 300)]);
        let message = Message::from_vec(&got.message).unwrap();
        assert_eq!(message.id(), ID);
        assert_eq!(message.answers().len(), 1);
    }

    #[test]
    fn an_aaaa_answer_gives_its_address() {
        let got = answer(
            RecordType::AAAA,
            vec![aaaa("www.example.test", 60, "2001:db8::7")],
        )
        .unwrap();
        assert_eq!(got.addrs, [(IpAddr::from_str("2001:db8::7").unwrap(), 60)]);
    }

    #[test]
    fn the_cname_chain_is_followed_to_other_names() {
        let got = answer(
            RecordType::A,
            vec![
                cname("www.example.test", 300, "edge.cdn.test"),
                cname("edge.cdn.test", 300, "e1.cdn.test"),
                a("e1.cdn.test", 20, [198, 51, 100, 1]),
                aaaa("e1.cdn.test", 20, "2001:db8::1"),
            ],
        )
        .unwrap();
        assert_eq!(
            got.chain,
            ["www.example.test", "edge.cdn.test", "e1.cdn.test"]
        );
        assert_eq!(
            got.addrs,
            [
                (v4([198, 51, 100, 1]), 20),
                (IpAddr::from_str("2001:db8::1").unwrap(), 20)
            ]
        );
    }

    #[test]
    fn records_of_names_outside_the_chain_are_ignored() {
        let mut message = response(
            "www.example.test",
            RecordType::A,
            vec![
                a("attacker.test", 300, [203, 0, 113, 66]),
                cname("other.test", 300, "www.example.test"),
                a("other.test", 300, [203, 0, 113, 67]),
                a("www.example.test", 300, [192, 0, 2, 1]),
                cname("unrelated.test", 300, "attacker.test"),
            ],
        );
        message.add_additional(a("www.example.test", 300, [203, 0, 113, 68]));
        message.add_name_server(a("www.example.test", 300, [203, 0, 113, 69]));
        let mut in_chaos = a("www.example.test", 300, [203, 0, 113, 70]);
        in_chaos.set_dns_class(DNSClass::CH);
        message.add_answer(in_chaos);
        let q = query("www.example.test", RecordType::A);
        let got = read_answer(&q, &message.to_vec().unwrap()).unwrap();
        assert_eq!(got.chain, ["www.example.test"]);
        assert_eq!(got.addrs, [(v4([192, 0, 2, 1]), 300)]);
    }

    #[test]
    fn names_compare_case_insensitively() {
        // An upstream echoing 0x20-randomised case, records in other cases.
        let mut message = response(
            "wWw.ExAmPlE.test",
            RecordType::A,
            vec![
                cname("WWW.example.TEST", 300, "Edge.CDN.test"),
                a("edge.cdn.TEST.", 300, [192, 0, 2, 9]),
            ],
        );
        message.set_id(ID);
        let q = query("www.example.test", RecordType::A);
        let got = read_answer(&q, &message.to_vec().unwrap()).unwrap();
        assert_eq!(got.chain, ["www.example.test", "edge.cdn.test"]);
        assert_eq!(got.addrs, [(v4([192, 0, 2, 9]), 300)]);
    }

    #[test]
    fn cname_loops_stop() {
        let got = answer(
            RecordType::A,
            vec![
                cname("www.example.test", 300, "b.test"),
                cname("b.test", 300, "WWW.example.test"),
                a("b.test", 300, [192, 0, 2, 2]),
            ],
        )
        .unwrap();
        assert_eq!(got.chain, ["www.example.test", "b.test"]);
        assert_eq!(got.addrs, [(v4([192, 0, 2, 2]), 300)]);

        let got = answer(
            RecordType::A,
            vec![cname("www.example.test", 300, "www.example.test")],
        );
        assert_eq!(got.unwrap().chain, ["www.example.test"]);
    }

    #[test]
    fn the_chain_stops_after_16_hops() {
        let mut records = vec![cname("www.example.test", 300, "n1.test")];
        for i in 1..40 {
            records.push(cname(
                &format!("n{i}.test"),
                300,
                &format!("n{}.test", i + 1),
            ));
            records.push(a(&format!("n{i}.test"), 300, [10, 0, 0, i]));
        }
        let got = answer(RecordType::A, records).unwrap();
        assert_eq!(got.chain.len(), MAX_CNAME_HOPS + 1);
        assert_eq!(got.chain.last().unwrap(), "n16.test");
        let last: Vec<IpAddr> = got.addrs.iter().map(|&(ip, _)| ip).collect();
        assert_eq!(last.len(), 16);
        assert_eq!(last.last(), Some(&v4([10, 0, 0, 16])));
    }

    #[test]
    fn ttls_are_clamped_in_addrs_and_in_the_message() {
        let got = answer(
            RecordType::A,
            vec![
                cname("www.example.test", 0, "x.test"),
                a("x.test", 0, [192, 0, 2, 1]),
                a("x.test", 86_400, [192, 0, 2, 2]),
                a("x.test", 100, [192, 0, 2, 3]),
                a("x.test", u32::MAX, [192, 0, 2, 4]),
                a("elsewhere.test", 1, [192, 0, 2, 5]),
            ],
        )
        .unwrap();
        assert_eq!(
            got.addrs,
            [
                (v4([192, 0, 2, 1]), TTL_MIN),
                (v4([192, 0, 2, 2]), TTL_MAX),
                (v4([192, 0, 2, 3]), 100),
                (v4([192, 0, 2, 4]), TTL_MAX),
            ]
        );
        let ttls: Vec<u32> = Message::from_vec(&got.message)
            .unwrap()
            .answers()
            .iter()
            .map(|r| r.ttl())
            .collect();
        assert_eq!(ttls, [TTL_MIN, TTL_MIN, TTL_MAX, 100, TTL_MAX, TTL_MIN]);
    }

    #[test]
    fn a_repeated_address_is_listed_once_with_its_longest_ttl() {
        let got = answer(
            RecordType::A,
            vec![
                cname("www.example.test", 300, "x.test"),
                a("www.example.test", 30, [192, 0, 2, 1]),
                a("x.test", 90, [192, 0, 2, 1]),
            ],
        )
        .unwrap();
        assert_eq!(got.addrs, [(v4([192, 0, 2, 1]), 90)]);
    }

    #[test]
    fn the_rcode_is_named() {
        let q = query("www.example.test", RecordType::A);
        for (code, text) in [
            (ResponseCode::NXDomain, "NXDOMAIN"),
            (ResponseCode::ServFail, "SERVFAIL"),
            (ResponseCode::Refused, "REFUSED"),
            (ResponseCode::Unknown(12), "RCODE12"),
        ] {
            let mut message = response("www.example.test", RecordType::A, vec![]);
            message.set_response_code(code);
            let got = read_answer(&q, &message.to_vec().unwrap()).unwrap();
            assert_eq!(got.rcode, text);
            assert!(got.addrs.is_empty());
        }
    }

    #[test]
    fn a_response_to_another_query_is_an_error() {
        let q = query("www.example.test", RecordType::A);
        let good = || response("www.example.test", RecordType::A, vec![]);

        let mut other_id = good();
        other_id.set_id(ID ^ 1);
        let mut other_name = response("www.example.test.evil", RecordType::A, vec![]);
        other_name.set_id(ID);
        let other_type = response("www.example.test", RecordType::AAAA, vec![]);
        let mut other_class = good();
        other_class.queries_mut()[0].set_query_class(DNSClass::CH);
        let mut no_question = good();
        no_question.take_queries();
        let mut two_questions = good();
        two_questions.add_query(question("www.example.test", RecordType::A));
        let mut a_query = good();
        a_query.set_message_type(MessageType::Query);
        let mut an_update = good();
        an_update.set_op_code(OpCode::Update);
        for (what, message) in [
            ("id", other_id),
            ("name", other_name),
            ("type", other_type),
            ("class", other_class),
            ("no question", no_question),
            ("two questions", two_questions),
            ("query", a_query),
            ("update", an_update),
        ] {
            let err = read_answer(&q, &message.to_vec().unwrap()).unwrap_err();
            assert!(!err.is_empty(), "{what}");
        }
        assert!(read_answer(&q, &good().to_vec().unwrap()).is_ok());
    }

    #[test]
    fn malformed_truncated_and_oversized_responses_are_errors() {
        let q = query("www.example.test", RecordType::A);
        let bytes = response(
            "www.example.test",
            RecordType::A,
            vec![
                cname("www.example.test", 300, "x.test"),
                a("x.test", 300, [192, 0, 2, 1]),
            ],
        )
        .to_vec()
        .unwrap();
        for len in 0..bytes.len() {
            assert!(read_answer(&q, &bytes[..len]).is_err(), "{len} bytes");
        }
        assert!(read_answer(&q, &bytes).is_ok());

        let mut oversized = bytes.clone();
        oversized.resize(MAX_MESSAGE + 1, 0);
        assert!(
            read_answer(&q, &oversized)
                .unwrap_err()
                .contains("over 65535")
        );

        // An answer owner name pointing at itself.
        let mut looped = header(1, 1);
        looped[2] = 0x81; // QR, RD
        looped.extend_from_slice(&bytes[12..12 + 18 + 4]); // the question
        let at = u8::try_from(looped.len()).unwrap();
        looped.extend_from_slice(&[0xc0, at, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
        assert!(read_answer(&q, &looped).unwrap_err().contains("malformed"));
        // The same record named by a pointer to the question name reads fine.
        let question_at = looped.len() - 16;
        looped[question_at + 1] = 12;
        assert_eq!(
            read_answer(&q, &looped).unwrap().addrs,
            [(v4([192, 0, 2, 1]), 60)]
        );
    }

    #[test]
    fn the_message_given_to_the_agent_reads_back_the_same() {
        let got = answer(
            RecordType::A,
            vec![
                cname("www.example.test", 7200, "x.test"),
                a("x.test", 1, [192, 0, 2, 1]),
            ],
        )
        .unwrap();
        let q = query("www.example.test", RecordType::A);
        let again = read_answer(&q, &got.message).unwrap();
        assert_eq!(again, got);
    }
}
