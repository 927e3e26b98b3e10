//! Parsers for the value syntaxes of profiles (sizes, durations, network rules, paths), and
//! their canonical formatting. Each parser returns a message and an optional hint; the
//! validator adds the location.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Component, Path, PathBuf},
    time::Duration,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Serialize;

use super::{PathBase, PathTemplate};

/// A parse failure: what is wrong, and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub message: String,
    pub hint: Option<String>,
}

fn invalid(message: impl Into<String>, hint: impl Into<Option<String>>) -> Invalid {
    Invalid {
        message: message.into(),
        hint: hint.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// IPPROTO_* number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => agentd_common::IPPROTO_TCP,
            Protocol::Udp => agentd_common::IPPROTO_UDP,
        }
    }

    fn parse(s: &str) -> Option<Protocol> {
        match s {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            _ => None,
        }
    }
}

/// `network.connect` entry: outbound connections (TCP connect, UDP send) to `net`, on
/// `port` (None = every port), with `proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectRule {
    pub net: IpNet,
    pub port: Option<u16>,
    pub proto: Protocol,
}

impl fmt::Display for ConnectRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}/{}", self.net, self.proto.as_str()),
            None => write!(f, "{}:*/{}", self.net, self.proto.as_str()),
        }
    }
}

impl ConnectRule {
    /// Whether this rule allows every destination `other` names: the same protocol, a
    /// network containing `other`'s (IPv4 compared in its IPv4-mapped form, as the trie
    /// matches it), and every port or `other`'s one.
    pub fn covers(&self, other: &ConnectRule) -> bool {
        let (net, prefix) = mapped_v6(self.net);
        let (inner, inner_prefix) = mapped_v6(other.net);
        self.proto == other.proto
            && self.port.is_none_or(|p| other.port == Some(p))
            && prefix <= inner_prefix
            && Ipv6Net::new(inner, prefix).is_ok_and(|n| n.trunc().network() == net)
    }
}

impl Serialize for ConnectRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `network.bind` entry: the agent may bind (listen on) this port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BindRule {
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for BindRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.proto.as_str())
    }
}

impl Serialize for BindRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

const CONNECT_SYNTAX: &str = "write CIDR:PORT[/tcp|/udp], e.g. \"10.0.0.0/8:443\", \"127.0.0.1/32:8080\", \"::1/128:53/udp\", or PORT `*` for every port";

/// Parses `CIDR:PORT[/PROTO]`. The CIDR must carry its prefix length and no host bits,
/// so that what is written is exactly what is allowed.
pub fn parse_connect(s: &str) -> Result<ConnectRule, Invalid> {
    let Some((addr, rest)) = s.split_once('/') else {
        let hint = match s.rsplit_once(':') {
            Some((a, p)) if a.parse::<Ipv4Addr>().is_ok() => format!("write \"{a}/32:{p}\""),
            _ => CONNECT_SYNTAX.to_owned(),
        };
        return Err(invalid(
            format!("`{s}` has no prefix length: the CIDR must say how many addresses it allows"),
            hint,
        ));
    };
    let addr: IpAddr = addr
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| {
            invalid(
                format!("`{addr}` is not an IPv4 or IPv6 address"),
                CONNECT_SYNTAX.to_owned(),
            )
        })?;
    let Some((prefix, port_proto)) = rest.split_once(':') else {
        return Err(invalid(
            format!("`{s}` has no port"),
            CONNECT_SYNTAX.to_owned(),
        ));
    };
    let prefix: u8 = prefix.parse().map_err(|_| {
        invalid(
            format!("`{prefix}` is not a prefix length"),
            CONNECT_SYNTAX.to_owned(),
        )
    })?;
    let net = match addr {
        IpAddr::V4(a) => Ipv4Net::new(a, prefix).map(IpNet::V4).map_err(|_| {
            invalid(
                format!("prefix length /{prefix} is longer than 32 bits"),
                None,
            )
        })?,
        IpAddr::V6(a) => Ipv6Net::new(a, prefix).map(IpNet::V6).map_err(|_| {
            invalid(
                format!("prefix length /{prefix} is longer than 128 bits"),
                None,
            )
        })?,
    };
    if net.trunc() != net {
        return Err(invalid(
            format!("`{net}` has host bits set below its prefix length"),
            format!(
                "write `{}` (the network), or a longer prefix for one host",
                net.trunc()
            ),
        ));
    }
    let (port, proto) = parse_port_proto(port_proto)?;
    Ok(ConnectRule { net, port, proto })
}

/// A DNS name pattern of `network.connect`, in lowercase ASCII (A-labels, `xn--...`),
/// without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamePattern {
    /// Exactly this name.
    Exact(String),
    /// Any name strictly below this one (`*.example.com`: `a.example.com`,
    /// `a.b.example.com`, not `example.com`).
    Below(String),
}

impl NamePattern {
    /// Whether `name` (lowercase, no trailing dot, as the resolver normalises a query's
    /// name) is one this pattern allows.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Exact(exact) => name == exact,
            NamePattern::Below(suffix) => name
                .strip_suffix(suffix.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|head| !head.is_empty()),
        }
    }
}

impl NamePattern {
    /// Whether every name `other` matches is one this pattern matches.
    pub fn covers(&self, other: &NamePattern) -> bool {
        match (self, other) {
            (NamePattern::Exact(a), NamePattern::Exact(b)) => a == b,
            (NamePattern::Exact(_), NamePattern::Below(_)) => false,
            (NamePattern::Below(_), NamePattern::Exact(b)) => self.matches(b),
            (NamePattern::Below(a), NamePattern::Below(b)) => a == b || self.matches(b),
        }
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamePattern::Exact(name) => f.write_str(name),
            NamePattern::Below(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// `network.connect` entry by name: outbound connections (TCP connect, UDP send) to the
/// addresses the agent's own DNS answers give for a name `pattern` matches, on `port`
/// (None = every port), with `proto`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NameRule {
    pub pattern: NamePattern,
    pub port: Option<u16>,
    pub proto: Protocol,
}

impl fmt::Display for NameRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}/{}", self.pattern, self.proto.as_str()),
            None => write!(f, "{}:*/{}", self.pattern, self.proto.as_str()),
        }
    }
}

impl NameRule {
    /// Whether this rule allows every destination `other` names: the same protocol, a
    /// pattern covering `other`'s, and every port or `other`'s one.
    pub fn covers(&self, other: &NameRule) -> bool {
        self.proto == other.proto
            && self.port.is_none_or(|p| other.port == Some(p))
            && self.pattern.covers(&other.pattern)
    }
}

impl Serialize for NameRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A `network.connect` entry: by address or by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectEntry {
    Cidr(ConnectRule),
    Name(NameRule),
}

const NAME_SYNTAX: &str = "write NAME:PORT[/tcp|/udp] or *.SUFFIX:PORT[/tcp|/udp], e.g. \"api.example.com:443\", \"*.example.com:443\", or PORT `*` for every port";

/// Longest DNS name in text form, without the trailing dot (RFC 1035: 255 octets on the
/// wire).
const MAX_NAME: usize = 253;
/// Longest label (RFC 1035).
const MAX_LABEL: usize = 63;

/// Parses a `network.connect` entry: `CIDR:PORT[/PROTO]` ([`parse_connect`]), or
/// `NAME:PORT[/PROTO]` / `*.SUFFIX:PORT[/PROTO]` ([`parse_name_rule`]) when it reads as a
/// name. What reads as an address (an all-digit last label, as in `10.0.0.1:80`; more
/// than one `:`, as in IPv6; a `/` before the port) gets the CIDR errors.
pub fn parse_connect_entry(s: &str) -> Result<ConnectEntry, Invalid> {
    if looks_like_name(s) {
        parse_name_rule(s).map(ConnectEntry::Name)
    } else {
        parse_connect(s).map(ConnectEntry::Cidr)
    }
}

fn looks_like_name(s: &str) -> bool {
    let (host, port_proto) = s.split_once(':').unwrap_or((s, ""));
    if host.is_empty() || host.contains(['/', '[', ']']) || port_proto.contains(':') {
        return false;
    }
    let last = host
        .trim_end_matches('.')
        .rsplit('.')
        .next()
        .unwrap_or(host);
    !last.is_empty() && !last.bytes().all(|b| b.is_ascii_digit())
}

/// Parses `NAME:PORT[/PROTO]` or `*.SUFFIX:PORT[/PROTO]`. The name must be written as the
/// resolver will see it: lowercase ASCII (an internationalised name in its `xn--` form),
/// without a trailing dot, so that what is written is exactly what is matched.
pub fn parse_name_rule(s: &str) -> Result<NameRule, Invalid> {
    let Some((host, port_proto)) = s.split_once(':') else {
        return Err(invalid(
            format!("`{s}` has no port"),
            format!("write \"{s}:443\" for HTTPS, or PORT `*` for every port"),
        ));
    };
    let pattern = parse_name_pattern(host, port_proto)?;
    let (port, proto) = parse_port_proto(port_proto)?;
    Ok(NameRule {
        pattern,
        port,
        proto,
    })
}

/// `host` as a pattern; `port_proto` only completes the hints.
fn parse_name_pattern(host: &str, port_proto: &str) -> Result<NamePattern, Invalid> {
    // What to write instead, when lowercasing, dropping the trailing dot and IDNA (UTS 46)
    // give a name that is valid.
    let fixed = || {
        let (star, rest) = match host.strip_prefix("*.") {
            Some(rest) => ("*.", rest),
            None => ("", host),
        };
        idna::domain_to_ascii(rest.trim_end_matches('.'))
            .ok()
            .map(|ascii| format!("{star}{ascii}"))
            .filter(|name| check_pattern(name).is_ok())
            .map(|name| format!("write \"{name}:{port_proto}\""))
    };
    // Where `*` stands is checked first: the other fixes are for the name below it.
    wildcard(host)?;
    if !host.is_ascii() {
        return Err(invalid(
            format!(
                "`{host}` is not ASCII: DNS carries internationalised names in their `xn--` form"
            ),
            fixed().or_else(|| Some(NAME_SYNTAX.to_owned())),
        ));
    }
    if host.ends_with('.') {
        return Err(invalid(
            format!("`{host}` ends with a dot"),
            fixed().or_else(|| Some(NAME_SYNTAX.to_owned())),
        ));
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(invalid(
            format!("`{host}` has uppercase letters: names are matched in lowercase"),
            fixed().or_else(|| Some(NAME_SYNTAX.to_owned())),
        ));
    }
    check_pattern(host)
}

/// Splits a leading `*.` off `host`: the name, and whether the pattern is of the names
/// below it. `*` may only start a pattern, and must be followed by a name.
fn wildcard(host: &str) -> Result<(&str, bool), Invalid> {
    let (name, below) = match host.strip_prefix("*.") {
        Some(suffix) => (suffix, true),
        None => (host, false),
    };
    if name.contains('*') {
        return Err(invalid(
            format!("`{host}`: `*` may only start a name, as `*.`"),
            "write \"*.example.com:443\" for every name below example.com".to_owned(),
        ));
    }
    if name.is_empty() {
        return Err(invalid(
            format!("`{host}` names no domain below which to match"),
            "write \"*.example.com:443\" for every name below example.com".to_owned(),
        ));
    }
    Ok((name, below))
}

/// Checks a lowercase ASCII pattern without a trailing dot.
fn check_pattern(host: &str) -> Result<NamePattern, Invalid> {
    let (name, below) = wildcard(host)?;
    if host.len() > MAX_NAME {
        return Err(invalid(
            format!(
                "`{host}` is {} characters long: a DNS name has at most {MAX_NAME}",
                host.len()
            ),
            None,
        ));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(invalid(
                format!("`{host}` has an empty label (`..`)"),
                NAME_SYNTAX.to_owned(),
            ));
        }
        if label.len() > MAX_LABEL {
            return Err(invalid(
                format!("the label `{label}` is longer than {MAX_LABEL} characters"),
                None,
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(invalid(
                format!("`{host}` contains `{c}`: a name has only letters, digits, `-` and `.`"),
                NAME_SYNTAX.to_owned(),
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid(
                format!("the label `{label}` starts or ends with `-`"),
                None,
            ));
        }
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(
            format!("`{host}` ends in an all-digit label: no DNS name does"),
            CONNECT_SYNTAX.to_owned(),
        ));
    }
    Ok(if below {
        NamePattern::Below(name.to_owned())
    } else {
        NamePattern::Exact(name.to_owned())
    })
}

/// `PORT[/PROTO]`: PORT `*` is every port; PROTO defaults to tcp.
fn parse_port_proto(port_proto: &str) -> Result<(Option<u16>, Protocol), Invalid> {
    let (port, proto) = match port_proto.split_once('/') {
        Some((p, proto)) => (
            p,
            Protocol::parse(proto).ok_or_else(|| {
                invalid(
                    format!("unknown protocol `{proto}`"),
                    "write /tcp or /udp".to_owned(),
                )
            })?,
        ),
        None => (port_proto, Protocol::Tcp),
    };
    let port = match port {
        "*" => None,
        p => Some(parse_port(p)?),
    };
    Ok((port, proto))
}

fn parse_port(p: &str) -> Result<u16, Invalid> {
    match p.parse::<u16>() {
        Ok(0) => Err(invalid(
            "port 0 is not a port",
            "write a port from 1 to 65535".to_owned(),
        )),
        Ok(n) => Ok(n),
        Err(_) => Err(invalid(
            format!("`{p}` is not a port"),
            "write a port from 1 to 65535 (or `*` in network.connect)".to_owned(),
        )),
    }
}

/// A bind entry: a number (TCP) or `"PORT/tcp"`, `"PORT/udp"`.
pub fn parse_bind(raw: &super::schema::RawPort) -> Result<BindRule, Invalid> {
    match raw {
        super::schema::RawPort::Number(n) => {
            let port = u16::try_from(*n).ok().filter(|p| *p != 0).ok_or_else(|| {
                invalid(
                    format!("{n} is not a port"),
                    "write a port from 1 to 65535".to_owned(),
                )
            })?;
            Ok(BindRule {
                port,
                proto: Protocol::Tcp,
            })
        }
        super::schema::RawPort::Text(s) => {
            let (port, proto) = match s.split_once('/') {
                Some((p, proto)) => (
                    p,
                    Protocol::parse(proto).ok_or_else(|| {
                        invalid(
                            format!("unknown protocol `{proto}`"),
                            "write /tcp or /udp".to_owned(),
                        )
                    })?,
                ),
                None => (s.as_str(), Protocol::Tcp),
            };
            Ok(BindRule {
                port: parse_port(port)?,
                proto,
            })
        }
    }
}

/// A size with a unit: `512MiB`, `2GiB`, `1GB`. The unit is required.
pub fn parse_bytes(s: &str) -> Result<u64, Invalid> {
    let hint = || {
        "write a number and a unit: B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB), e.g. \"2GiB\""
            .to_owned()
    };
    let digits = s
        .trim()
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(s.len());
    let (num, unit) = s.trim().split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| invalid(format!("`{s}` is not a size"), hint()))?;
    let mult: u64 = match unit.trim() {
        "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "" => return Err(invalid(format!("`{s}` has no unit"), hint())),
        u => return Err(invalid(format!("unknown size unit `{u}`"), hint())),
    };
    match n.checked_mul(mult) {
        Some(0) => Err(invalid(
            "a limit of 0 bytes would stop the agent at once",
            hint(),
        )),
        Some(v) => Ok(v),
        None => Err(invalid(format!("`{s}` is too large"), hint())),
    }
}

/// A duration: one or more `<number><unit>` with units ms, s, m, h: `30m`, `1h30m`, `90s`.
pub fn parse_duration(s: &str) -> Result<Duration, Invalid> {
    let hint = || "write a number and a unit (ms, s, m, h), e.g. \"30m\" or \"1h30m\"".to_owned();
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(invalid("empty duration", hint()));
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(invalid(format!("`{s}` is not a duration"), hint()));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| invalid(format!("`{s}` is too large"), hint()))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "" => return Err(invalid(format!("`{s}` has no unit"), hint())),
            u => return Err(invalid(format!("unknown duration unit `{u}`"), hint())),
        };
        total = total.saturating_add(part);
        rest = &rest[unit_len..];
    }
    if total.is_zero() {
        return Err(invalid("a duration of 0 is not a limit", hint()));
    }
    Ok(total)
}

/// A grant's path ([`parse_path`]); a trailing `?` makes it optional: a path that may
/// not exist (one of several places a program may be installed), granted when it does and
/// not warned about when it does not. Returns the path and whether it is optional.
pub fn parse_grant(s: &str) -> Result<(PathTemplate, bool), Invalid> {
    match s.strip_suffix('?') {
        Some(path) => Ok((parse_path(path)?, true)),
        None => Ok((parse_path(s)?, false)),
    }
}

/// A profile path: `/abs/path`, `{workspace}[/...]` or `{home}[/...]`. No `.` or `..`
/// components (they would make the rule mean something other than what it reads as), no
/// other `{placeholder}`.
pub fn parse_path(s: &str) -> Result<PathTemplate, Invalid> {
    let placeholders = "paths start with `/`, `{workspace}` or `{home}`";
    let (base, rest) = if let Some(r) = s.strip_prefix("{workspace}") {
        (PathBase::Workspace, r)
    } else if let Some(r) = s.strip_prefix("{home}") {
        (PathBase::Home, r)
    } else if s.starts_with('/') {
        (PathBase::Root, s)
    } else if s.starts_with('{') {
        let name = s.split('}').next().unwrap_or(s);
        let hint = super::error::closest(name.trim_start_matches('{'), &["workspace", "home"])
            .map_or_else(
                || placeholders.to_owned(),
                |c| format!("did you mean `{{{c}}}`?"),
            );
        return Err(invalid(format!("unknown placeholder `{name}}}`"), hint));
    } else if s.is_empty() {
        return Err(invalid("empty path", placeholders.to_owned()));
    } else {
        return Err(invalid(
            format!("`{s}` is a relative path: it would depend on agentd's working directory"),
            format!(
                "write `{{workspace}}/{s}` for a path in the agent's workspace, or an absolute path"
            ),
        ));
    };
    if !rest.is_empty() && !rest.starts_with('/') {
        return Err(invalid(
            format!("`{s}`: a placeholder must be followed by `/` or end the path"),
            None,
        ));
    }
    if s.contains('\0') {
        return Err(invalid("path contains a NUL byte", None));
    }
    if rest.contains('{') || rest.contains('}') {
        return Err(invalid(
            format!("`{s}`: placeholders may only start a path"),
            placeholders.to_owned(),
        ));
    }
    // Path::components drops interior `.` silently: check the segments as written.
    if rest.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(invalid(
            format!("`{s}` contains `.` or `..`"),
            "write the path without `.` and `..` components".to_owned(),
        ));
    }
    let mut norm = PathBuf::new();
    for c in Path::new(rest).components() {
        match c {
            Component::RootDir => {}
            Component::Normal(p) => norm.push(p),
            Component::CurDir | Component::ParentDir | Component::Prefix(_) => {
                return Err(invalid(
                    format!("`{s}` contains `.` or `..`"),
                    "write the path without `.` and `..` components".to_owned(),
                ));
            }
        }
    }
    Ok(PathTemplate { base, rest: norm })
}

pub fn format_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, size) in UNITS {
        if b >= size && b.is_multiple_of(size) {
            return format!("{}{name}", b / size);
        }
    }
    format!("{b}B")
}

pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    let (h, m, sec) = (s / 3600, (s % 3600) / 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out += &format!("{h}h");
    }
    if m > 0 {
        out += &format!("{m}m");
    }
    if sec > 0 || out.is_empty() {
        out += &format!("{sec}s");
    }
    out
}

/// serde helpers: durations serialise in the profile syntax (`"30m"`).
pub mod duration {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&super::format_duration(*d))
    }
}

pub mod duration_opt {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&super::format_duration(*d)),
            None => s.serialize_none(),
        }
    }
}

/// An IPv6 view of a network: IPv4 networks become IPv4-mapped (::ffff:0:0/96 + n).
pub fn mapped_v6(net: IpNet) -> (Ipv6Addr, u8) {
    match net {
        IpNet::V4(n) => (n.network().to_ipv6_mapped(), 96 + n.prefix_len()),
        IpNet::V6(n) => (n.network(), n.prefix_len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_rules() {
        let r = parse_connect("10.0.0.0/8:443").unwrap();
        assert_eq!(r.to_string(), "10.0.0.0/8:443/tcp");
        let r = parse_connect("::1/128:53/udp").unwrap();
        assert_eq!(r.to_string(), "::1/128:53/udp");
        assert_eq!(r.proto, Protocol::Udp);
        let r = parse_connect("[2001:db8::]/32:*").unwrap();
        assert_eq!(r.port, None);
        let e = parse_connect("10.0.0.1/8:443").unwrap_err();
        assert!(e.hint.unwrap().contains("10.0.0.0/8"));
        let e = parse_connect("127.0.0.1:8080").unwrap_err();
        assert!(e.hint.unwrap().contains("127.0.0.1/32:8080"));
        assert!(parse_connect("10.0.0.0/33:1").is_err());
        assert!(parse_connect("10.0.0.0/8").is_err());
        assert!(parse_connect("10.0.0.0/8:0").is_err());
        assert!(parse_connect("10.0.0.0/8:70000").is_err());
        assert!(parse_connect("10.0.0.0/8:53/icmp").is_err());
        assert!(parse_connect("example.com/32:443").is_err());
    }

    fn name(s: &str) -> NameRule {
        match parse_connect_entry(s) {
            Ok(ConnectEntry::Name(rule)) => rule,
            other => panic!("{s}: {other:?}"),
        }
    }

    fn hint(s: &str) -> String {
        let e = parse_connect_entry(s).unwrap_err();
        e.hint
            .unwrap_or_else(|| panic!("{s}: {} (no hint)", e.message))
    }

    #[test]
    fn name_rules() {
        let r = name("api.example.com:443");
        assert_eq!(r.pattern, NamePattern::Exact("api.example.com".into()));
        assert_eq!((r.port, r.proto), (Some(443), Protocol::Tcp));
        assert_eq!(r.to_string(), "api.example.com:443/tcp");
        let r = name("*.example.com:*/udp");
        assert_eq!(r.pattern, NamePattern::Below("example.com".into()));
        assert_eq!((r.port, r.proto), (None, Protocol::Udp));
        assert_eq!(r.to_string(), "*.example.com:*/udp");
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!("*.example.com:*/udp")
        );
        assert_eq!(
            name("localhost:8080").pattern,
            NamePattern::Exact("localhost".into())
        );
        assert_eq!(
            name("xn--bcher-kva.example:443").to_string(),
            "xn--bcher-kva.example:443/tcp"
        );
        assert_eq!(
            name("a-1.b2.example:443").to_string(),
            "a-1.b2.example:443/tcp"
        );
        // Addresses stay CIDR rules.
        assert!(matches!(
            parse_connect_entry("10.0.0.0/8:443"),
            Ok(ConnectEntry::Cidr(_))
        ));
        assert!(matches!(
            parse_connect_entry("::1/128:53/udp"),
            Ok(ConnectEntry::Cidr(_))
        ));
    }

    #[test]
    fn name_rules_are_written_as_they_are_matched() {
        assert_eq!(hint("API.Example.com:443"), "write \"api.example.com:443\"");
        assert_eq!(
            hint("api.example.com.:443"),
            "write \"api.example.com:443\""
        );
        assert_eq!(
            hint("*.Example.COM.:443/udp"),
            "write \"*.example.com:443/udp\""
        );
        assert_eq!(
            hint("bücher.example:443"),
            "write \"xn--bcher-kva.example:443\""
        );
        assert_eq!(
            hint("*.bücher.example:*"),
            "write \"*.xn--bcher-kva.example:*\""
        );
        let e = parse_connect_entry("bücher.example:443").unwrap_err();
        assert!(e.message.contains("not ASCII"), "{}", e.message);
    }

    #[test]
    fn bad_names_are_errors() {
        for bad in [
            "*:443",
            "*.:443",
            "a.*.example.com:443",
            "*foo.example.com:443",
            "foo*.example.com:443",
            "*.*.example.com:443",
            "a..example.com:443",
            ".example.com:443",
            "-a.example.com:443",
            "a-.example.com:443",
            "a_b.example.com:443",
            "api.example.com:0",
            "api.example.com:443/icmp",
            "api.example.com:https",
            "api.example.com",
        ] {
            assert!(parse_connect_entry(bad).is_err(), "{bad}");
        }
        let long_label = format!("{}.example:443", "a".repeat(64));
        assert!(parse_connect_entry(&long_label).is_err());
        assert!(parse_connect_entry(&format!("{}.example:443", "a".repeat(63))).is_ok());
        // 4 labels of 63 + 3 dots = 255 > 253.
        let long_name = format!("{0}.{0}.{0}.{0}:443", "a".repeat(63));
        let e = parse_connect_entry(&long_name).unwrap_err();
        assert!(e.message.contains("at most 253"), "{}", e.message);
        assert!(
            parse_connect_entry("*:443")
                .unwrap_err()
                .message
                .contains("`*`")
        );
        assert!(
            parse_connect_entry("*.:443")
                .unwrap_err()
                .message
                .contains("no domain")
        );
        assert!(hint("api.example.com").contains("api.example.com:443"));
    }

    #[test]
    fn what_reads_as_an_address_keeps_the_cidr_errors() {
        assert!(hint("10.0.0.1:80").contains("10.0.0.1/32:80"));
        assert!(hint("10.0.0.1.:80").contains("CIDR"));
        assert!(hint("fe80::1:443").contains("CIDR"));
        assert!(hint("[fe80::1]:443").contains("CIDR"));
        assert!(hint("example.123:443").contains("CIDR"));
        assert!(parse_connect_entry("example.com/32:443").is_err());
    }

    #[test]
    fn name_patterns_match_exactly_or_strictly_below() {
        let exact = NamePattern::Exact("api.example.com".into());
        assert!(exact.matches("api.example.com"));
        assert!(!exact.matches("x.api.example.com"));
        assert!(!exact.matches("example.com"));
        assert!(!exact.matches("api.example.co"));
        let below = NamePattern::Below("example.com".into());
        assert!(below.matches("a.example.com"));
        assert!(below.matches("a.b.example.com"));
        assert!(!below.matches("example.com"), "not the suffix itself");
        assert!(!below.matches(".example.com"));
        assert!(!below.matches("xexample.com"));
        assert!(!below.matches("a.xexample.com"));
        assert!(!below.matches("example.com.evil.net"));
        assert!(!below.matches("a.example.co"));
    }

    #[test]
    fn connect_rules_cover_narrower_ones_of_the_same_protocol() {
        let covers =
            |a: &str, b: &str| parse_connect(a).unwrap().covers(&parse_connect(b).unwrap());
        assert!(covers("10.0.0.0/8:443", "10.0.0.0/8:443"));
        assert!(covers("10.0.0.0/8:*", "10.1.0.0/16:443"));
        assert!(covers("10.0.0.0/8:443", "10.1.2.3/32:443"));
        assert!(
            covers("0.0.0.0/0:*", "::ffff:10.0.0.0/104:80"),
            "IPv4-mapped"
        );
        assert!(!covers("10.0.0.0/8:443", "10.0.0.0/8:*"), "narrower port");
        assert!(!covers("10.0.0.0/8:443", "10.0.0.0/8:80"));
        assert!(!covers("10.0.0.0/8:443", "10.0.0.0/8:443/udp"));
        assert!(!covers("10.1.0.0/16:*", "10.0.0.0/8:443"), "wider network");
        assert!(!covers("10.0.0.0/8:*", "11.0.0.0/8:443"));
        assert!(
            covers("::/0:*", "10.0.0.0/8:443"),
            "the trie holds IPv4 networks IPv4-mapped, so ::/0 matches them"
        );
    }

    #[test]
    fn name_rules_cover_the_names_they_match() {
        let covers = |a: &str, b: &str| name(a).covers(&name(b));
        assert!(covers("api.example.com:443", "api.example.com:443"));
        assert!(covers("*.example.com:443", "api.example.com:443"));
        assert!(covers("*.example.com:*", "*.a.example.com:443"));
        assert!(covers("*.example.com:443", "*.example.com:443"));
        assert!(
            !covers("*.example.com:443", "example.com:443"),
            "not the suffix"
        );
        assert!(!covers("api.example.com:443", "*.api.example.com:443"));
        assert!(!covers("*.example.com:443", "api.example.com:*"));
        assert!(!covers("*.example.com:443", "api.example.com:443/udp"));
        assert!(!covers("*.a.example.com:443", "*.example.com:443"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1GB").unwrap(), 1_000_000_000);
        assert!(parse_bytes("2").unwrap_err().message.contains("no unit"));
        assert!(parse_bytes("2gb").is_err());
        assert!(parse_bytes("0MiB").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
        assert_eq!(format_bytes(2 << 30), "2GiB");
        assert_eq!(format_bytes(1000), "1000B");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("0s").is_err());
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn paths() {
        let p = parse_path("{workspace}/src//lib/").unwrap();
        assert_eq!(p.base, PathBase::Workspace);
        assert_eq!(p.rest, PathBuf::from("src/lib"));
        assert_eq!(p.to_string(), "{workspace}/src/lib");
        assert_eq!(parse_path("/").unwrap().to_string(), "/");
        assert_eq!(parse_path("{home}").unwrap().to_string(), "{home}");
        assert!(
            parse_path("src")
                .unwrap_err()
                .hint
                .unwrap()
                .contains("{workspace}/src")
        );
        assert!(
            parse_path("{worksapce}/x")
                .unwrap_err()
                .hint
                .unwrap()
                .contains("{workspace}")
        );
        assert!(parse_path("/usr/../etc").is_err());
        assert!(parse_path("/usr/./lib").is_err());
        assert!(parse_path("{workspace}x").is_err());
        assert!(parse_path("/a/{home}").is_err());
        assert!(parse_path("").is_err());
    }

    #[test]
    fn v4_networks_map_into_v6() {
        let (a, p) = mapped_v6("10.0.0.0/8".parse().unwrap());
        assert_eq!(a.to_string(), "::ffff:10.0.0.0");
        assert_eq!(p, 104);
    }
}
