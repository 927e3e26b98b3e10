//! Who may use the web view: access tokens (`agentd ui-url`), the cookie a token becomes,
//! and the checks every request passes (its Host, its Origin). Pure code: the clock is a
//! parameter, so all of it is tested without a daemon.
//!
//! A token is 256 bits from the OS RNG, shown once (as hex, in the URL `agentd ui-url`
//! prints); the daemon keeps only its SHA-256, compared in constant time, with the user it
//! was given to and its expiry.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use sha2::Digest as _;
use subtle::ConstantTimeEq as _;

/// How long a token (and the cookie it becomes) is valid.
pub const TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);
/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;
/// Tokens kept at most (each `agentd ui-url` makes one): the oldest go first.
const MAX_TOKENS: usize = 256;

/// The user a token was given to, as the control socket saw them when they asked: their
/// uid, primary gid, and supplementary groups (which decide `--group` and `--approvers`
/// membership for what they do through the page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// When the token ends.
    pub expires: SystemTime,
}

#[derive(Debug)]
struct Grant {
    digest: [u8; 32],
    user: WebUser,
    until: Instant,
}

/// The tokens given out and still valid.
#[derive(Debug, Default)]
pub struct Tokens {
    grants: Mutex<Vec<Grant>>,
}

/// Why a token could not be made.
#[derive(Debug, thiserror::Error)]
#[error("no random bytes for a web view token (getrandom: {0})")]
pub struct NoRandom(getrandom::Error);

impl Tokens {
    /// A new token for `user` (its `expires` is set here), valid [`TOKEN_TTL`] from `now`.
    pub fn issue(
        &self,
        mut user: WebUser,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(String, WebUser), NoRandom> {
        let mut raw = [0u8; TOKEN_BYTES];
        getrandom::fill(&mut raw).map_err(NoRandom)?;
        let token = hex(&raw);
        user.expires = wall + TOKEN_TTL;
        let mut grants = super::super::lock(&self.grants);
        grants.retain(|g| g.until > now);
        if grants.len() >= MAX_TOKENS {
            grants.remove(0);
        }
        grants.push(Grant {
            digest: digest(&token),
            user: user.clone(),
            until: now + TOKEN_TTL,
        });
        Ok((token, user))
    }

    /// The user `token` was given to, if it is one of ours and has not expired at `now`.
    pub fn check(&self, token: &str, now: Instant) -> Option<WebUser> {
        if !well_formed(token) {
            return None;
        }
        let d = digest(token);
        let mut grants = super::super::lock(&self.grants);
        grants.retain(|g| g.until > now);
        // Every grant is compared, in constant time each: how long this takes says nothing
        // about how much of a guess was right.
        let mut found = None;
        for g in grants.iter() {
            if bool::from(g.digest.ct_eq(&d)) {
                found = Some(g.user.clone());
            }
        }
        found
    }
}

/// A token as `issue` writes them: 64 lowercase hex digits.
fn well_formed(token: &str) -> bool {
    token.len() == TOKEN_BYTES * 2
        && token
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn digest(token: &str) -> [u8; 32] {
    sha2::Sha256::digest(token.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cookie's name: one per port, since browsers share cookies between the ports of a
/// host (two daemons on one host must not overwrite each other's).
pub fn cookie_name(port: u16) -> String {
    format!("agentd_ui_{port}")
}

/// The `Set-Cookie` value that carries `token`: sent back only to this host, never to
/// scripts, never on a request another site starts.
pub fn set_cookie(port: u16, token: &str, max_age: Duration) -> String {
    format!(
        "{}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        cookie_name(port),
        max_age.as_secs()
    )
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// The token of an `Authorization: Bearer T` header.
pub fn bearer(header: &str) -> Option<&str> {
    header.strip_prefix("Bearer ").map(str::trim)
}

/// A `Host` header's host and port (80 when absent). `None`: not a valid authority.
fn authority(host: &str, default_port: u16) -> Option<(String, u16)> {
    if host.is_empty()
        || host
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b == b'/' || b == b'@')
    {
        return None;
    }
    // [v6]:port, [v6], v4:port, name:port, v4, name.
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (format!("[{}]", v6.to_ascii_lowercase()), port)
    } else {
        match host.rsplit_once(':') {
            Some((n, p)) => (n.to_ascii_lowercase(), Some(p)),
            None => (host.to_ascii_lowercase(), None),
        }
    };
    let port = match port {
        None => default_port,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok()?,
        Some(_) => return None,
    };
    Some((name, port))
}

/// The IP address of a host as `authority` gives it (`[::1]` or `127.0.0.1`).
fn ip_of(name: &str) -> Option<IpAddr> {
    let bare = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    let ip: IpAddr = bare.parse().ok()?;
    // An IPv6 literal must be bracketed, an IPv4 one must not.
    (ip.is_ipv6() == name.starts_with('[')).then_some(ip)
}

/// Whether a request's `Host` names the web view itself, against DNS rebinding: a page
/// of another site whose name was made to resolve to this address sends its own name.
/// Allowed: the port the view listens on, with the address it is bound to (any address
/// of this host's when bound to all of them: an address is no name another site can
/// hold), or `localhost` when it listens on loopback (or all addresses).
pub fn host_allowed(bound: SocketAddr, host: &str) -> bool {
    let Some((name, port)) = authority(host, 80) else {
        return false;
    };
    if port != bound.port() {
        return false;
    }
    let any = bound.ip().is_unspecified();
    match ip_of(&name) {
        Some(ip) => any || ip == bound.ip(),
        None => name == "localhost" && (any || bound.ip().is_loopback()),
    }
}

/// Whether a state-changing request comes from the view's own page: its `Origin` is the
/// scheme and authority of the `Host` it was sent to (CSRF; the cookie's SameSite=Strict
/// is the other half).
pub fn origin_matches(host: &str, origin: &str) -> bool {
    let Some(rest) = origin.strip_prefix("http://") else {
        return false;
    };
    match (authority(host, 80), authority(rest, 80)) {
        (Some(h), Some(o)) => h == o,
        _ => false,
    }
}

/// The supplementary groups of process `pid` (its `Groups:` line in /proc); empty when
/// it cannot be read (fewer rights, never more).
pub fn groups_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Groups:").map(str::to_owned))
        })
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(uid: u32) -> WebUser {
        WebUser {
            uid,
            gid: uid,
            groups: vec![27, 100],
            expires: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_token_is_its_users_until_it_expires() {
        let tokens = Tokens::default();
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let (a, ua) = tokens.issue(user(1000), t0, wall).unwrap();
        let (b, _) = tokens.issue(user(1001), t0, wall).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(well_formed(&a), "{a}");
        assert_eq!(ua.expires, wall + TOKEN_TTL);
        assert_eq!(tokens.check(&a, t0).map(|u| u.uid), Some(1000));
        assert_eq!(tokens.check(&b, t0).map(|u| u.uid), Some(1001));
        let later = t0 + TOKEN_TTL - Duration::from_secs(1);
        assert_eq!(
            tokens.check(&a, later).map(|u| u.groups),
            Some(vec![27, 100])
        );
        // Expired: gone for good.
        assert_eq!(tokens.check(&a, t0 + TOKEN_TTL), None);
        assert_eq!(tokens.check(&a, t0), None);
    }

    #[test]
    fn near_misses_and_malformed_tokens_are_refused() {
        let tokens = Tokens::default();
        let t0 = Instant::now();
        let (t, _) = tokens.issue(user(0), t0, SystemTime::now()).unwrap();
        let mut flipped = t.clone().into_bytes();
        flipped[63] = if flipped[63] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        for bad in [
            "",
            &t[..63],
            &format!("{t}0"),
            &t.to_uppercase(),
            &flipped,
            &format!(" {}", &t[1..]),
            &"g".repeat(64),
        ] {
            assert_eq!(tokens.check(bad, t0), None, "{bad:?}");
        }
        assert!(tokens.check(&t, t0).is_some());
    }

    #[test]
    fn tokens_are_bounded_and_the_oldest_go_first() {
        let tokens = Tokens::default();
        let t0 = Instant::now();
        let first = tokens.issue(user(1), t0, SystemTime::now()).unwrap().0;
        let mut last = String::new();
        for _ in 0..MAX_TOKENS {
            last = tokens.issue(user(2), t0, SystemTime::now()).unwrap().0;
        }
        assert_eq!(tokens.check(&first, t0), None);
        assert!(tokens.check(&last, t0).is_some());
        assert!(super::super::super::lock(&tokens.grants).len() <= MAX_TOKENS);
    }

    #[test]
    fn cookies_and_bearer_headers() {
        assert_eq!(cookie_name(8080), "agentd_ui_8080");
        let c = set_cookie(8080, "ab", TOKEN_TTL);
        for part in [
            "agentd_ui_8080=ab",
            "HttpOnly",
            "SameSite=Strict",
            "Path=/",
            "Max-Age=43200",
        ] {
            assert!(c.contains(part), "{c}");
        }
        let h = "x=1; agentd_ui_8081=other; agentd_ui_8080=tok; y";
        assert_eq!(cookie(h, "agentd_ui_8080"), Some("tok"));
        assert_eq!(cookie(h, "agentd_ui_9"), None);
        assert_eq!(cookie("agentd_ui_80800=t", "agentd_ui_8080"), None);
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
    }

    #[test]
    fn host_must_name_the_view_not_another_site() {
        let lo: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        for ok in ["127.0.0.1:8080", "localhost:8080", "LOCALHOST:8080"] {
            assert!(host_allowed(lo, ok), "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "127.0.0.1",
            "127.0.0.1:8081",
            "127.0.0.2:8080",
            "localhost.evil.example:8080",
            "127.0.0.1.nip.io:8080",
            "[::1]:8080",
            "",
            "127.0.0.1:",
            "127.0.0.1:8080/",
            "user@127.0.0.1:8080",
            "127.0.0.1:+8080",
        ] {
            assert!(!host_allowed(lo, bad), "{bad}");
        }
        let v6: SocketAddr = "[::1]:9000".parse().unwrap();
        assert!(host_allowed(v6, "[::1]:9000"));
        assert!(host_allowed(v6, "localhost:9000"));
        assert!(!host_allowed(v6, "::1:9000"));
        assert!(!host_allowed(v6, "127.0.0.1:9000"));
        // Bound to every address: any address literal, never a name but localhost.
        let any: SocketAddr = "0.0.0.0:80".parse().unwrap();
        assert!(host_allowed(any, "192.0.2.7"));
        assert!(host_allowed(any, "192.0.2.7:80"));
        assert!(host_allowed(any, "localhost"));
        assert!(!host_allowed(any, "attacker.example"));
        // Bound to one outside address: that address only.
        let one: SocketAddr = "192.0.2.7:8080".parse().unwrap();
        assert!(host_allowed(one, "192.0.2.7:8080"));
        assert!(!host_allowed(one, "localhost:8080"));
        assert!(!host_allowed(one, "127.0.0.1:8080"));
    }

    #[test]
    fn origin_must_be_the_pages_own() {
        assert!(origin_matches("127.0.0.1:8080", "http://127.0.0.1:8080"));
        assert!(origin_matches("localhost:8080", "http://LOCALHOST:8080"));
        assert!(origin_matches("127.0.0.1", "http://127.0.0.1:80"));
        for bad in [
            "http://evil.example",
            "http://localhost:8080",
            "https://127.0.0.1:8080",
            "null",
            "",
            "http://127.0.0.1:8081",
            "http://127.0.0.1:8080/path",
        ] {
            assert!(!origin_matches("127.0.0.1:8080", bad), "{bad}");
        }
    }

    #[test]
    fn groups_of_this_process() {
        let mine = groups_of(std::process::id());
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
        assert_eq!(mine.len(), line.split_whitespace().count() - 1);
        assert!(groups_of(u32::MAX).is_empty());
    }
}
