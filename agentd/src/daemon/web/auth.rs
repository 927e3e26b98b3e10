//! Who may use the web view: access tokens (`agentd ui-url`), the sessions they become,
//! and the checks every request passes (its Host, its Origin). Pure code: the clock is a
//! parameter, so all of it is tested without a daemon.
//!
//! A token is 256 bits from the OS RNG, shown once (as hex, in the URL `agentd ui-url`
//! prints) and good for one login: `GET /?token=T` spends it and opens a session, whose
//! id (256 more random bits) the cookie carries. A token seen later (in a command line,
//! a shell's history) opens nothing. The daemon keeps only SHA-256 digests, compared in
//! constant time, with the user they were given to and their expiry (the wall clock:
//! what `agentd ui-url` tells the user).

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use sha2::Digest as _;
use subtle::ConstantTimeEq as _;

/// How long a token, and the session it opens, is valid (from the token's issue).
pub const TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);
/// Random bytes in a token or a session id.
const SECRET_BYTES: usize = 32;
/// Unused tokens and open sessions one uid holds at most: its oldest go first (another
/// user's are never touched).
pub const MAX_PER_USER: usize = 16;

/// The user a token was given to, as the control socket saw them when they asked: their
/// uid, primary gid, and supplementary groups (which decide `--group` and `--approvers`
/// membership for what they watch; an action looks the groups up again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// The first 4 bytes of a token's SHA-256, as 8 hex digits: names the token in the audit
/// log (its issue, its login, what its session did) without giving it away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 4]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

/// What a valid token or session stands for: its user, until when, and the token it
/// is (or was opened with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub user: WebUser,
    pub expires: SystemTime,
    pub token: Fingerprint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Given out by `agentd ui-url`, not yet used.
    Token,
    /// Opened with a token; the cookie carries its id.
    Session,
}

#[derive(Debug)]
struct Entry {
    kind: Kind,
    digest: [u8; 32],
    grant: Grant,
}

/// The tokens given out and the sessions open, while valid.
#[derive(Debug, Default)]
pub struct Credentials {
    entries: Mutex<Vec<Entry>>,
}

/// Why a token or a session could not be made.
#[derive(Debug, thiserror::Error)]
#[error("no random bytes for a web view token (getrandom: {0})")]
pub struct NoRandom(getrandom::Error);

/// A token just given out: the secret (shown once) and what it stands for.
#[derive(Debug)]
pub struct Issued {
    pub token: String,
    pub grant: Grant,
}

impl Credentials {
    /// A new token for `user`, valid [`TOKEN_TTL`] from `now` and for one login.
    pub fn issue(&self, user: WebUser, now: SystemTime) -> Result<Issued, NoRandom> {
        let token = secret()?;
        let grant = Grant {
            user,
            expires: now + TOKEN_TTL,
            token: fingerprint(&token),
        };
        let mut entries = super::super::lock(&self.entries);
        add(
            &mut entries,
            Entry {
                kind: Kind::Token,
                digest: digest(&token),
                grant: grant.clone(),
            },
            now,
        );
        Ok(Issued { token, grant })
    }

    /// Spends `token` for a new session: its id (for the cookie) and what it stands for
    /// (the token's user and expiry). `Ok(None)`: not a token of ours that is still
    /// valid and unused.
    pub fn login(&self, token: &str, now: SystemTime) -> Result<Option<(String, Grant)>, NoRandom> {
        if !well_formed(token) {
            return Ok(None);
        }
        // Drawn first: a failure spends nothing.
        let id = secret()?;
        let mut entries = super::super::lock(&self.entries);
        let Some(i) = find(&mut entries, Kind::Token, token, now) else {
            return Ok(None);
        };
        let spent = entries.remove(i);
        let grant = spent.grant;
        add(
            &mut entries,
            Entry {
                kind: Kind::Session,
                digest: digest(&id),
                grant: grant.clone(),
            },
            now,
        );
        Ok(Some((id, grant)))
    }

    /// What session `id` stands for, if it is open and has not expired at `now`.
    pub fn session(&self, id: &str, now: SystemTime) -> Option<Grant> {
        if !well_formed(id) {
            return None;
        }
        let mut entries = super::super::lock(&self.entries);
        let i = find(&mut entries, Kind::Session, id, now)?;
        entries.get(i).map(|e| e.grant.clone())
    }
}

/// Adds `entry`, first dropping what expired at `now` and, when its uid holds
/// [`MAX_PER_USER`] already, the oldest of its uid's.
fn add(entries: &mut Vec<Entry>, entry: Entry, now: SystemTime) {
    entries.retain(|e| e.grant.expires > now);
    let uid = entry.grant.user.uid;
    if entries.iter().filter(|e| e.grant.user.uid == uid).count() >= MAX_PER_USER
        && let Some(oldest) = entries.iter().position(|e| e.grant.user.uid == uid)
    {
        entries.remove(oldest);
    }
    entries.push(entry);
}

/// Where the unexpired entry of `kind` whose secret is `secret` is. Every entry is
/// compared, in constant time each: how long this takes says nothing about how much of
/// a guess was right.
fn find(entries: &mut Vec<Entry>, kind: Kind, secret: &str, now: SystemTime) -> Option<usize> {
    entries.retain(|e| e.grant.expires > now);
    let d = digest(secret);
    let mut found = None;
    for (i, e) in entries.iter().enumerate() {
        if bool::from(e.digest.ct_eq(&d)) && e.kind == kind {
            found = Some(i);
        }
    }
    found
}

/// 256 random bits as 64 lowercase hex digits.
fn secret() -> Result<String, NoRandom> {
    let mut raw = [0u8; SECRET_BYTES];
    getrandom::fill(&mut raw).map_err(NoRandom)?;
    Ok(hex(&raw))
}

/// A secret as [`secret`] writes them.
fn well_formed(secret: &str) -> bool {
    secret.len() == SECRET_BYTES * 2
        && secret
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn digest(secret: &str) -> [u8; 32] {
    sha2::Sha256::digest(secret.as_bytes()).into()
}

/// The fingerprint of `token`.
pub fn fingerprint(token: &str) -> Fingerprint {
    let d = digest(token);
    Fingerprint([d[0], d[1], d[2], d[3]])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cookie's name: one per port, since browsers share cookies between the ports of a
/// host (two daemons on one host must not overwrite each other's).
pub fn cookie_name(port: u16) -> String {
    format!("agentd_ui_{port}")
}

/// The `Set-Cookie` value that carries session `id`: sent back only to this host, never
/// to scripts, never on a request another site starts.
pub fn set_cookie(port: u16, id: &str, max_age: Duration) -> String {
    format!(
        "{}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn user(uid: u32) -> WebUser {
        WebUser {
            uid,
            gid: uid,
            groups: vec![27, 100],
        }
    }

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)
    }

    #[test]
    fn a_token_opens_one_session_which_lasts_until_the_token_would_have_expired() {
        let c = Credentials::default();
        let now = t0();
        let a = c.issue(user(1000), now).unwrap();
        let b = c.issue(user(1001), now).unwrap();
        assert_ne!(a.token, b.token);
        assert_eq!(a.token.len(), 64);
        assert!(well_formed(&a.token), "{}", a.token);
        assert_eq!(a.grant.expires, now + TOKEN_TTL);
        assert_eq!(a.grant.token, fingerprint(&a.token));
        assert_eq!(a.grant.token.to_string().len(), 8);
        // A token is no session, and a session id no token.
        assert_eq!(c.session(&a.token, now), None);
        let later = now + Duration::from_secs(60);
        let (sa, ga) = c.login(&a.token, later).unwrap().unwrap();
        assert_ne!(sa, a.token);
        assert_eq!(ga, a.grant);
        // Spent: the same token again opens nothing.
        assert_eq!(c.login(&a.token, later).unwrap(), None);
        assert_eq!(c.login(&sa, later).unwrap(), None);
        assert_eq!(c.session(&sa, later).map(|g| g.user.uid), Some(1000));
        let last = now + TOKEN_TTL - Duration::from_secs(1);
        assert_eq!(
            c.session(&sa, last).map(|g| g.user.groups),
            Some(vec![27, 100])
        );
        // Expired: gone for good, the unused token too.
        assert_eq!(c.session(&sa, now + TOKEN_TTL), None);
        assert_eq!(c.session(&sa, later), None);
        assert_eq!(c.login(&b.token, now + TOKEN_TTL).unwrap(), None);
    }

    #[test]
    fn near_misses_and_malformed_secrets_are_refused() {
        let c = Credentials::default();
        let now = t0();
        let t = c.issue(user(0), now).unwrap().token;
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
            assert_eq!(c.login(bad, now).unwrap(), None, "{bad:?}");
            assert_eq!(c.session(bad, now), None, "{bad:?}");
        }
        assert!(c.login(&t, now).unwrap().is_some());
    }

    #[test]
    fn each_user_keeps_a_bounded_number_and_cannot_evict_anothers() {
        let c = Credentials::default();
        let now = t0();
        let other = c.issue(user(1), now).unwrap().token;
        let first = c.issue(user(2), now).unwrap().token;
        let (session, _) = c.login(&first, now).unwrap().unwrap();
        let mut last = String::new();
        for _ in 0..MAX_PER_USER {
            last = c.issue(user(2), now).unwrap().token;
        }
        // uid 2's oldest (its session) went; uid 1's token is untouched.
        assert_eq!(c.session(&session, now), None);
        assert!(c.login(&last, now).unwrap().is_some());
        assert!(c.login(&other, now).unwrap().is_some());
        let entries = super::super::super::lock(&c.entries);
        assert_eq!(
            entries.iter().filter(|e| e.grant.user.uid == 2).count(),
            MAX_PER_USER
        );
    }

    #[test]
    fn cookies() {
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
    }

    #[test]
    fn fingerprints_are_the_digests_first_bytes() {
        // SHA-256("abc") = ba7816bf...
        assert_eq!(fingerprint("abc").to_string(), "ba7816bf");
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
}
