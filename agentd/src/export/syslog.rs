//! Events as RFC 5424 syslog records with structured data, sent to a unix datagram socket
//! (`/dev/log`), a UDP address (RFC 5426) or a TCP address with octet-counting framing
//! (RFC 6587 §3.4.1). One record an event:
//!
//! ```text
//! <84>1 2026-11-23T21:41:21.362675Z host1 agentd 4242 net_connect [agentd@32473
//!   agent="analyze-only-1" profile="analyze-only" owner_uid="1000" owner="alice"
//!   kind="net_connect" verdict="deny" layer="bpf" pid="42" comm="python3"
//!   addr="127.0.0.1" port="8080" proto="tcp" errno="1"] DENY ...
//! ```
//! (one line; wrapped here). 32473 is the enterprise number RFC 5612 reserves for
//! documentation: the SD-ID is stable, but not a registered one.

use std::{
    fmt,
    io::{self, Write as _},
    net::{SocketAddr, TcpStream, ToSocketAddrs as _, UdpSocket},
    os::unix::net::UnixDatagram,
    path::PathBuf,
    str::FromStr,
    sync::{Arc, atomic::Ordering, mpsc::Receiver},
    time::{Duration, Instant},
};

use super::{AgentInfo, Backoff, Counters, GIVE_UP, Outgoing, Severity, UserNames};
use crate::event::Event;

/// The structured data element's SD-ID: `name@PEN`, with the private enterprise number
/// RFC 5612 reserves for documentation.
pub const SD_ID: &str = "agentd@32473";
/// APP-NAME of every record.
pub const APP_NAME: &str = "agentd";
/// How long connecting to a TCP target, or one write to any target, may take.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many bytes of `path` and `path2` as written (escaped), cut mark included.
pub const VALUE_MAX: usize = 1024;
/// `detail` is sent as compact JSON of at most this many bytes as written (escaped): its
/// strings are cut to [`VALUE_MAX`], entries that would not fit are left out, and
/// `"truncated": N` says how many.
pub const DETAIL_MAX: usize = 2048;

/// Where records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A unix datagram socket, e.g. `/dev/log`.
    Unix(PathBuf),
    /// UDP, one record a datagram (RFC 5426).
    Udp(HostPort),
    /// TCP, octet-counted records (RFC 6587 §3.4.1), reconnecting after a failure.
    Tcp(HostPort),
}

/// A host name or address, and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
            Target::Udp(a) => write!(f, "udp:{a}"),
            Target::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

const TARGET_FORMS: &str = "give unix:PATH (e.g. unix:/dev/log), udp:HOST:PORT or tcp:HOST:PORT (e.g. tcp:127.0.0.1:514, tcp:[::1]:514)";

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Target, String> {
        let Some((scheme, rest)) = s.split_once(':') else {
            return Err(format!("syslog target `{s}`: no transport; {TARGET_FORMS}"));
        };
        match scheme {
            "unix" => {
                let path = PathBuf::from(rest);
                if !path.is_absolute() {
                    return Err(format!(
                        "syslog target `{s}`: a unix socket needs an absolute path, e.g. unix:/dev/log"
                    ));
                }
                Ok(Target::Unix(path))
            }
            "udp" => host_port(s, rest).map(Target::Udp),
            "tcp" => host_port(s, rest).map(Target::Tcp),
            _ if rest.parse::<u16>().is_ok() => Err(format!(
                "syslog target `{s}`: no transport before the address; {TARGET_FORMS}"
            )),
            _ => Err(format!(
                "syslog target `{s}`: unknown transport `{scheme}`; {TARGET_FORMS}"
            )),
        }
    }
}

/// `HOST:PORT`, `[V6]:PORT`.
fn host_port(whole: &str, s: &str) -> Result<HostPort, String> {
    let bad = |why: &str| format!("syslog target `{whole}`: {why}; {TARGET_FORMS}");
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (host, port) = v6
            .split_once("]:")
            .ok_or_else(|| bad("an IPv6 address in brackets needs a port after it"))?;
        host.parse::<std::net::Ipv6Addr>()
            .map_err(|_| bad(&format!("`{host}` is not an IPv6 address")))?;
        (host, port)
    } else {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| bad("no port (HOST:PORT)"))?;
        if host.contains(':') {
            return Err(bad("write an IPv6 address in brackets"));
        }
        (host, port)
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(bad(&format!("`{host}` is not a host name or address")));
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad(&format!("`{port}` is not a port (1-65535)")))?;
    Ok(HostPort {
        host: host.to_owned(),
        port,
    })
}

/// The syslog facility of the records (RFC 5424 table 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Facility {
    User,
    Daemon,
    Auth,
    // Security and authorisation messages that are private: the default (Debian's rsyslog
    // writes them to /var/log/auth.log, readable by root and adm).
    #[default]
    Authpriv,
    Local0,
    Local1,
    Local2,
    Local3,
    Local4,
    Local5,
    Local6,
    Local7,
}

impl Facility {
    pub fn code(self) -> u8 {
        match self {
            Facility::User => 1,
            Facility::Daemon => 3,
            Facility::Auth => 4,
            Facility::Authpriv => 10,
            Facility::Local0 => 16,
            Facility::Local1 => 17,
            Facility::Local2 => 18,
            Facility::Local3 => 19,
            Facility::Local4 => 20,
            Facility::Local5 => 21,
            Facility::Local6 => 22,
            Facility::Local7 => 23,
        }
    }
}

/// What every record of this daemon has in common.
#[derive(Debug, Clone)]
pub struct Origin {
    pub facility: Facility,
    /// This host's name (`-` when it has none: [`super::hostname`]).
    pub hostname: String,
    /// The daemon's pid: PROCID.
    pub procid: u32,
}

/// `ev` as one RFC 5424 record (without transport framing), with whose agent it is of
/// (`agent`, and its owner's name when it has one), at most 8 KiB: rsyslog's
/// default `maxMessageSize`, so none is cut on the way (the caps of [`VALUE_MAX`],
/// [`DETAIL_MAX`], [`super::SHORT_MAX`] and [`super::MESSAGE_MAX`] keep it under; a test
/// checks the worst case). Most are a few hundred bytes.
/// Text the agent chose is escaped: in PARAM-VALUEs and MSG, control and format
/// characters as `\u{a}` ([`crate::ask::printable`]); in `detail`, as JSON escapes (the
/// JSON keeps its exact value).
pub fn format(
    origin: &Origin,
    ev: &Event,
    agent: Option<&AgentInfo>,
    owner_name: Option<&str>,
) -> Vec<u8> {
    let pri = u16::from(origin.facility.code()) * 8 + u16::from(Severity::of(ev).code());
    // TIME-SECFRAC has at most 6 digits: microseconds.
    let timestamp = super::parse_ts(&ev.ts).map_or_else(
        || "-".to_owned(),
        |(secs, nanos)| {
            let ts = crate::event::rfc3339(secs, nanos);
            format!("{}Z", ts.get(..26).unwrap_or(&ts))
        },
    );
    let kind = ev.kind_name();
    let mut out = format!(
        "<{pri}>1 {timestamp} {} {APP_NAME} {} {} [{SD_ID}",
        origin.hostname,
        origin.procid,
        header_field(&kind, 32)
    );
    // `value` is printable already; at most `max` bytes once escaped.
    let mut param = |name: &str, value: &str, max: usize| {
        out.push(' ');
        out.push_str(name);
        out.push_str("=\"");
        escape_into(&mut out, &super::cut(value, max, escaped_size));
        out.push('"');
    };
    let text = crate::ask::printable;
    let short = super::SHORT_MAX;
    param("agent", &text(&ev.agent), short);
    if let Some(a) = agent {
        param("profile", &text(&a.profile), short);
        param("owner_uid", &a.owner_uid.to_string(), short);
        if let Some(name) = owner_name {
            param("owner", &text(name), short);
        }
    }
    param("kind", &kind, short);
    param("verdict", ev.verdict.name(), short);
    param("layer", &ev.layer_name(), short);
    param("pid", &ev.pid.to_string(), short);
    param("comm", &text(&ev.comm), short);
    if let Some(p) = &ev.path {
        param("path", &text(p), VALUE_MAX);
    }
    if let Some(p) = &ev.path2 {
        param("path2", &text(p), VALUE_MAX);
    }
    if let Some(a) = ev.addr {
        param("addr", &a.to_string(), short);
    }
    if let Some(p) = ev.port {
        param("port", &p.to_string(), short);
    }
    if let Some(p) = &ev.proto {
        param("proto", &text(p), short);
    }
    if let Some(d) = &ev.domain {
        param("domain", &text(d), short);
    }
    if let Some(e) = ev.errno {
        param("errno", &e.to_string(), short);
    }
    if !ev.detail.is_empty() {
        param("detail", &detail_json(&ev.detail), DETAIL_MAX);
    }
    out.push_str("] ");
    let msg = super::summary(ev);
    // MSG in UTF-8 starts with a BOM (§6.4); an ASCII one is sent as it is (MSG-ANY).
    if !msg.is_ascii() {
        out.push('\u{feff}');
    }
    out.push_str(&msg);
    out.into_bytes()
}

/// A header field (MSGID): 1 to `max` printable US-ASCII characters, else `-`.
fn header_field(s: &str, max: usize) -> &str {
    if s.is_empty() || s.len() > max || !s.bytes().all(|c| (33..=126).contains(&c)) {
        return "-";
    }
    s
}

/// A PARAM-VALUE: `"`, `\\` and `]` escaped with a backslash (RFC 5424 §6.3.3).
fn escape_into(out: &mut String, value: &str) {
    for c in value.chars() {
        if needs_escape(c) {
            out.push('\\');
        }
        out.push(c);
    }
}

fn needs_escape(c: char) -> bool {
    matches!(c, '"' | '\\' | ']')
}

/// The bytes `c` takes in a PARAM-VALUE.
fn escaped_size(c: char) -> usize {
    c.len_utf8() + usize::from(needs_escape(c))
}

/// `detail` as compact JSON of at most [`DETAIL_MAX`] bytes once escaped, control and
/// format characters written as JSON escapes.
fn detail_json(detail: &serde_json::Map<String, serde_json::Value>) -> String {
    let cut = super::cut_strings(&serde_json::Value::Object(detail.clone()), VALUE_MAX);
    let serde_json::Value::Object(cut) = cut else {
        return String::new();
    };
    let size = |json: &str| json_printable(json).chars().map(escaped_size).sum();
    let kept = super::detail_within(&cut, DETAIL_MAX, size);
    json_printable(&serde_json::Value::Object(kept).to_string())
}

/// `json` (serde_json's compact text: control and format characters can only be in its
/// strings) with each character [`crate::ask::printable`] would escape written as a JSON
/// `\uXXXX` escape: the same JSON value, no such character in the text.
fn json_printable(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut one = [0u8; 4];
    for c in json.chars() {
        let plain = (c.is_ascii() && !c.is_ascii_control()) || {
            let s = c.encode_utf8(&mut one);
            crate::ask::printable(s) == *s
        };
        if plain {
            out.push(c);
        } else {
            for unit in c.encode_utf16(&mut [0u16; 2]) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// Starts the thread that sends what `rx` brings to `target`.
pub(super) fn start(
    target: Target,
    facility: Facility,
    rx: Receiver<Outgoing>,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    let origin = Origin {
        facility,
        hostname: super::hostname(),
        procid: std::process::id(),
    };
    let facility_name = clap::ValueEnum::to_possible_value(&facility)
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default();
    eprintln!("agentd daemon: syslog: sending events to {target} (facility {facility_name})");
    let mut sender = Sender::new(target);
    std::thread::Builder::new()
        .name("agentd-syslog".into())
        .spawn(move || {
            let mut names = UserNames::default();
            while let Ok(out) = rx.recv() {
                let agent = out.agent.as_deref();
                let owner = agent.and_then(|a| names.of(a.owner_uid));
                if sender.send(&format(&origin, &out.event, agent, owner)) {
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                } else {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .map_err(|e| anyhow::anyhow!("syslog: starting its thread: {e}"))?;
    Ok(())
}

/// A connection to the target, made again after a failure, with backoff.
pub struct Sender {
    target: Target,
    tcp: Option<TcpStream>,
    udp: Option<UdpSocket>,
    unix: Option<UnixDatagram>,
    backoff: Backoff,
}

impl Sender {
    pub fn new(target: Target) -> Sender {
        Sender {
            backoff: Backoff::new(format!("syslog {target}")),
            target,
            tcp: None,
            udp: None,
            unix: None,
        }
    }

    /// Sends one record, trying again with backoff for up to [`GIVE_UP`]; false when it
    /// was given up on.
    pub fn send(&mut self, record: &[u8]) -> bool {
        let deadline = Instant::now() + GIVE_UP;
        loop {
            let error = match self.attempt(record) {
                Ok(()) => {
                    self.backoff.worked();
                    return true;
                }
                Err(e) => e,
            };
            // Too large for a datagram: no retry helps.
            if error.raw_os_error() == Some(libc::EMSGSIZE) {
                self.backoff.gave_up(1, &error);
                return false;
            }
            let wait = self.backoff.failed(&error);
            let now = Instant::now();
            if now + wait >= deadline {
                self.backoff.gave_up(1, &error);
                return false;
            }
            std::thread::sleep(wait);
        }
    }

    fn attempt(&mut self, record: &[u8]) -> io::Result<()> {
        match &self.target {
            Target::Unix(path) => {
                let sock = match &self.unix {
                    Some(s) => s,
                    None => {
                        let s = UnixDatagram::unbound()?;
                        s.set_write_timeout(Some(IO_TIMEOUT))?;
                        self.unix.insert(s)
                    }
                };
                sock.send_to(record, path).map(drop)
            }
            Target::Udp(hp) => {
                if self.udp.is_none() {
                    let addr = resolve(hp)?;
                    let local: SocketAddr = if addr.is_ipv4() {
                        ([0, 0, 0, 0], 0).into()
                    } else {
                        ([0u16; 8], 0).into()
                    };
                    let s = UdpSocket::bind(local)?;
                    s.connect(addr)?;
                    s.set_write_timeout(Some(IO_TIMEOUT))?;
                    self.udp = Some(s);
                }
                let r = self.udp.as_ref().map_or(Ok(0), |s| s.send(record));
                // Resolved again at the next attempt.
                if r.is_err() {
                    self.udp = None;
                }
                r.map(drop)
            }
            Target::Tcp(hp) => {
                if self.tcp.as_ref().is_some_and(peer_closed) {
                    self.tcp = None;
                }
                if self.tcp.is_none() {
                    let s = TcpStream::connect_timeout(&resolve(hp)?, IO_TIMEOUT)?;
                    s.set_write_timeout(Some(IO_TIMEOUT))?;
                    s.set_nodelay(true)?;
                    self.tcp = Some(s);
                }
                let r = match &mut self.tcp {
                    Some(s) => s.write_all(&octet_counted(record)),
                    None => Ok(()),
                };
                if r.is_err() {
                    self.tcp = None;
                }
                r
            }
        }
    }
}

/// RFC 6587 §3.4.1: `MSG-LEN SP SYSLOG-MSG`.
pub fn octet_counted(record: &[u8]) -> Vec<u8> {
    let mut framed = format!("{} ", record.len()).into_bytes();
    framed.extend_from_slice(record);
    framed
}

fn resolve(hp: &HostPort) -> io::Result<SocketAddr> {
    (hp.host.as_str(), hp.port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other(format!("{} resolves to no address", hp.host)))
}

/// Whether the receiver closed the connection (a syslog receiver never sends anything, so
/// a readable end of stream, or an error, means it is gone): checked before each write,
/// so a receiver's restart does not swallow the record written into the dead connection.
fn peer_closed(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return true;
    }
    let mut b = [0u8; 1];
    let r = s.peek(&mut b);
    if s.set_nonblocking(false).is_err() {
        return true;
    }
    match r {
        Ok(n) => n == 0,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;
    use crate::event::{Kind, Layer, Verdict};

    fn origin() -> Origin {
        Origin {
            facility: Facility::Authpriv,
            hostname: "host1".into(),
            procid: 4242,
        }
    }

    fn denial() -> Event {
        let mut e = Event::new(
            "analyze-only-1",
            42,
            "python3",
            Kind::Connect,
            Verdict::Deny,
            Layer::Bpf,
        );
        e.ts = "2026-11-23T21:41:21.362675057Z".into();
        e.addr = Some("127.0.0.1".parse().unwrap());
        e.port = Some(8080);
        e.proto = Some("tcp".into());
        e.errno = Some(libc::EPERM);
        e
    }

    #[test]
    fn a_denial_is_one_rfc5424_record() {
        let record = format(&origin(), &denial(), None, None);
        assert_eq!(
            String::from_utf8(record).unwrap(),
            "<84>1 2026-11-23T21:41:21.362675Z host1 agentd 4242 net_connect \
             [agentd@32473 agent=\"analyze-only-1\" kind=\"net_connect\" verdict=\"deny\" \
             layer=\"bpf\" pid=\"42\" comm=\"python3\" addr=\"127.0.0.1\" port=\"8080\" \
             proto=\"tcp\" errno=\"1\"] \
             DENY   net_connect   127.0.0.1:8080/tcp  python3[42]  bpf EPERM  analyze-only-1"
        );
    }

    #[test]
    fn the_record_says_whose_agent_it_is_of() {
        let agent = AgentInfo {
            owner_uid: 1000,
            profile: "analyze-only".into(),
        };
        let record = format(&origin(), &denial(), Some(&agent), Some("alice"));
        assert_eq!(
            String::from_utf8(record).unwrap(),
            "<84>1 2026-11-23T21:41:21.362675Z host1 agentd 4242 net_connect \
             [agentd@32473 agent=\"analyze-only-1\" profile=\"analyze-only\" \
             owner_uid=\"1000\" owner=\"alice\" kind=\"net_connect\" verdict=\"deny\" \
             layer=\"bpf\" pid=\"42\" comm=\"python3\" addr=\"127.0.0.1\" port=\"8080\" \
             proto=\"tcp\" errno=\"1\"] \
             DENY   net_connect   127.0.0.1:8080/tcp  python3[42]  bpf EPERM  analyze-only-1"
        );
        // An owner without a name: its uid alone.
        let record = String::from_utf8(format(&origin(), &denial(), Some(&agent), None)).unwrap();
        assert!(
            record.contains(" profile=\"analyze-only\" owner_uid=\"1000\" kind="),
            "{record}"
        );
    }

    #[test]
    fn param_values_are_escaped_and_detail_is_compact_json() {
        let mut e = Event::new("a", 7, "sh", Kind::Breaker, Verdict::Killed, Layer::Agentd)
            .with("rule", "canary")
            .with("note", "say \"hi\" [x]");
        e.ts = "2026-01-02T03:04:05.000000001Z".into();
        e.path = Some(r#"/tmp/a"b\c]d"#.into());
        let o = Origin {
            facility: Facility::Local3,
            ..origin()
        };
        let record = String::from_utf8(format(&o, &e, None, None)).unwrap();
        // local3 (19) * 8 + alert (1)
        assert!(
            record.starts_with("<153>1 2026-01-02T03:04:05.000000Z host1 agentd 4242 breaker "),
            "{record}"
        );
        assert!(record.contains(r#" path="/tmp/a\"b\\c\]d""#), "{record}");
        assert!(
            record.contains(r#" detail="{\"note\":\"say \\\"hi\\\" [x\]\",\"rule\":\"canary\"}"]"#),
            "{record}"
        );
    }

    #[test]
    fn a_utf8_message_starts_with_a_bom_and_bad_headers_are_nil() {
        let mut e = denial();
        e.comm = "café".into();
        e.ts = "yesterday".into();
        let record = String::from_utf8(format(&origin(), &e, None, None)).unwrap();
        assert!(record.starts_with("<84>1 - host1 "), "{record}");
        assert!(record.contains("] \u{feff}DENY "), "{record}");
        assert_eq!(header_field("a b", 32), "-");
        assert_eq!(header_field(&"x".repeat(33), 32), "-");
        assert_eq!(header_field("process_signal", 32), "process_signal");
    }

    #[test]
    fn a_large_detail_is_cut_to_whole_entries() {
        let mut e = denial();
        for i in 0..100 {
            e = e.with(&format!("k{i:03}"), "v".repeat(40));
        }
        let json = detail_json(&e.detail);
        assert!(json.len() <= DETAIL_MAX, "{}", json.len());
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let kept = v.as_object().unwrap().len() - 1;
        assert_eq!(v["truncated"], 100 - kept as u64);
        assert!(kept > 30, "{kept}");
    }

    /// The SD-ELEMENT of `record` read back by RFC 5424's grammar: its SD-ID and its
    /// parameters, values unescaped.
    fn read_sd(record: &str) -> (String, Vec<(String, String)>) {
        let mut it = record[record.find('[').unwrap() + 1..].chars().peekable();
        let name = |it: &mut std::iter::Peekable<std::str::Chars>| {
            let mut n = String::new();
            while let Some(c) = it.next_if(|c| !matches!(c, ' ' | '=' | ']' | '"')) {
                n.push(c);
            }
            n
        };
        let id = name(&mut it);
        let mut params = Vec::new();
        while it.next() == Some(' ') {
            let n = name(&mut it);
            assert_eq!((it.next(), it.next()), (Some('='), Some('"')), "{record}");
            let mut v = String::new();
            loop {
                match it.next().unwrap() {
                    '\\' => v.push(it.next().unwrap()),
                    '"' => break,
                    ']' => panic!("unescaped ] in {record}"),
                    c => v.push(c),
                }
            }
            params.push((n, v));
        }
        (id, params)
    }

    #[test]
    fn sd_names_are_valid_and_values_read_back() {
        let mut e = denial().with("why", "a \"quoted\" [thing]");
        e.path = Some(r#"/a"b\c]d e"#.into());
        let agent = AgentInfo {
            owner_uid: 0,
            profile: "p]\"x".into(),
        };
        let record = String::from_utf8(format(&origin(), &e, Some(&agent), Some("root"))).unwrap();
        let (id, params) = read_sd(&record);
        assert_eq!(id, SD_ID);
        // SD-NAME: 1 to 32 printable US-ASCII characters but `=`, space, `]` and `"`.
        for n in std::iter::once(&id).chain(params.iter().map(|(n, _)| n)) {
            assert!((1..=32).contains(&n.len()), "{n}");
            assert!(
                n.bytes()
                    .all(|c| (33..=126).contains(&c) && !b"= ]\"".contains(&c)),
                "{n}"
            );
        }
        let get = |k: &str| params.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert_eq!(get("path"), r#"/a"b\c]d e"#);
        assert_eq!(get("detail"), r#"{"why":"a \"quoted\" [thing]"}"#);
        assert_eq!(get("profile"), "p]\"x");
        let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "agent",
                "profile",
                "owner_uid",
                "owner",
                "kind",
                "verdict",
                "layer",
                "pid",
                "comm",
                "path",
                "addr",
                "port",
                "proto",
                "errno",
                "detail"
            ]
        );
    }

    #[test]
    fn hostile_text_is_escaped_and_detail_keeps_its_exact_value() {
        let mut e = denial().with("note", "a\u{202e}b\nc\u{85}d\u{7f}");
        e.path = Some("/tmp/x\nFAKE agentd: ok\x1b[2J]\"\\\u{202e}".into());
        let record = String::from_utf8(format(&origin(), &e, None, None)).unwrap();
        // One line, nothing for a terminal, nothing reordered (the BOM aside).
        let plain = record.replacen('\u{feff}', "", 1);
        assert_eq!(crate::ask::printable(&plain), plain, "{record:?}");
        let (_, params) = read_sd(&record);
        let get = |k: &str| params.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert_eq!(
            get("path"),
            r#"/tmp/x\u{a}FAKE agentd: ok\u{1b}[2J]"\\u{202e}"#
        );
        let detail: serde_json::Value = serde_json::from_str(&get("detail")).unwrap();
        assert_eq!(detail["note"], "a\u{202e}b\nc\u{85}d\u{7f}");
        assert!(
            record.contains(
                r#" DENY   net_connect   /tmp/x\u{a}FAKE agentd: ok\u{1b}[2J]"\\u{202e}  "#
            ),
            "{record}"
        );
    }

    /// The bound docs/export.md states.
    const RECORD_MAX: usize = 8192;

    #[test]
    fn the_largest_record_fits_and_keeps_its_structure() {
        let nasty = "/a\n\x1b\u{202e}\"\\]é".repeat(2000);
        let mut e = denial();
        e.agent = nasty.clone();
        e.comm = nasty.clone();
        e.path = Some(nasty.clone());
        e.path2 = Some(nasty.clone());
        e.proto = Some(nasty.clone());
        e.domain = Some(nasty.clone());
        e.addr = Some(
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
                .parse()
                .unwrap(),
        );
        e.errno = Some(i32::MIN);
        e.pid = u32::MAX;
        for i in 0..300 {
            e = e.with(&format!("k{i:03}"), serde_json::json!([nasty.clone(), i]));
            // Small ones, to fill what the large ones leave.
            e = e.with(&format!("z{i:03}"), "\u{202e}\"]");
        }
        let o = Origin {
            facility: Facility::Local7,
            hostname: "h".repeat(255),
            procid: u32::MAX,
        };
        let agent = AgentInfo {
            owner_uid: u32::MAX,
            profile: nasty.clone(),
        };
        let record = String::from_utf8(format(&o, &e, Some(&agent), Some(&nasty))).unwrap();
        assert!(record.len() <= RECORD_MAX, "{}", record.len());
        eprintln!("the largest record: {} bytes", record.len());
        let (id, params) = read_sd(&record);
        assert_eq!(id, SD_ID);
        for (name, max) in [
            ("agent", super::super::SHORT_MAX),
            ("profile", super::super::SHORT_MAX),
            ("owner", super::super::SHORT_MAX),
            ("comm", super::super::SHORT_MAX),
            ("proto", super::super::SHORT_MAX),
            ("domain", super::super::SHORT_MAX),
            ("path", VALUE_MAX),
            ("path2", VALUE_MAX),
            ("detail", DETAIL_MAX),
        ] {
            let v = &params.iter().find(|(n, _)| n == name).unwrap().1;
            assert!(
                v.chars().map(escaped_size).sum::<usize>() <= max,
                "{name}: {v}"
            );
            if name != "detail" {
                let (kept, mark) = v.rsplit_once('…').unwrap();
                assert!(
                    mark.starts_with("[+") && mark.ends_with(']'),
                    "{name}: {mark}"
                );
                assert!(crate::ask::printable(&nasty).starts_with(kept), "{name}");
            }
        }
        let detail = &params.iter().find(|(n, _)| n == "detail").unwrap().1;
        let detail: serde_json::Value = serde_json::from_str(detail).unwrap();
        assert!(detail["truncated"].as_u64().unwrap() > 250, "{detail}");
        assert_eq!(detail["z000"], "\u{202e}\"]");
        let msg = record.split_once("] \u{feff}").unwrap().1;
        assert!(msg.len() <= super::super::MESSAGE_MAX, "{}", msg.len());
        assert!(msg.starts_with("DENY   net_connect   /a\\u{a}"), "{msg}");
    }

    #[test]
    fn targets_parse_strictly() {
        assert_eq!(
            "unix:/dev/log".parse::<Target>(),
            Ok(Target::Unix("/dev/log".into()))
        );
        let tcp: Target = "tcp:127.0.0.1:514".parse().unwrap();
        assert_eq!(tcp.to_string(), "tcp:127.0.0.1:514");
        let udp: Target = "udp:[::1]:514".parse().unwrap();
        assert_eq!(
            udp,
            Target::Udp(HostPort {
                host: "::1".into(),
                port: 514
            })
        );
        assert_eq!(udp.to_string(), "udp:[::1]:514");
        assert!("tcp:logs.example:6514".parse::<Target>().is_ok());
        for (bad, says) in [
            ("127.0.0.1:514", "no transport before the address"),
            ("/dev/log", "no transport"),
            ("file:/var/log/x", "unknown transport `file`"),
            ("unix:", "absolute path"),
            ("unix:dev/log", "absolute path"),
            ("tcp:127.0.0.1", "no port"),
            ("tcp:127.0.0.1:0", "not a port"),
            ("udp:127.0.0.1:65536", "not a port"),
            ("udp::514", "not a host name"),
            ("tcp:::1:514", "in brackets"),
            ("tcp:[::1]", "needs a port"),
            ("tcp:[nope]:514", "not an IPv6 address"),
        ] {
            let e = bad.parse::<Target>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(e.starts_with(&format!("syslog target `{bad}`: ")), "{e}");
            assert!(e.contains("unix:/dev/log"), "{bad}: {e}");
        }
    }

    #[test]
    fn tcp_records_are_octet_counted_and_a_closed_connection_is_made_again() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut sender = Sender::new(format!("tcp:127.0.0.1:{port}").parse().unwrap());
        assert!(sender.send(b"first"));
        let (mut c, _) = listener.accept().unwrap();
        let mut got = [0u8; 7];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"5 first");
        // The receiver goes away (a restart): the next record goes on a new connection.
        drop(c);
        std::thread::sleep(Duration::from_millis(50));
        assert!(sender.send(b"second record"));
        let (mut c, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        while got.len() < 16 {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"13 second record");
    }

    #[test]
    fn unix_datagrams_carry_one_record_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let rx = UnixDatagram::bind(&path).unwrap();
        let mut sender = Sender::new(Target::Unix(path));
        assert!(sender.send(b"one"));
        assert!(sender.send(b"two"));
        let mut buf = [0u8; 16];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"one");
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"two");
    }
}
