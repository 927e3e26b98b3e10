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
    Ok(ConnectRule { net, port, proto })
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
