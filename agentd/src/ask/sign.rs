//! Signed decisions: an SSH signature (`ssh-keygen -Y sign -n agentd-approval`) over the
//! exact text of a decision ([`super::message`]), checked against an allowed-signers file
//! in ssh-keygen's format (ALLOWED SIGNERS in ssh-keygen(1)).
//!
//! The SSHSIG format and the key types are RustCrypto's `ssh-key`; what is parsed here is
//! only the allowed-signers file, a line format of OpenSSH's:
//!
//! ```text
//! # comment
//! alice@example.com,*@ops.example.com namespaces="agentd-approval",valid-before="20271231Z" ssh-ed25519 AAAA... alice
//! └──── principals (patterns) ──────┘ └──────────────── options (optional) ──────────────┘ └─ key type, base64 ─┘ └ comment
//! ```
//!
//! Options: `namespaces="LIST"` (patterns; the line only counts for a namespace the list
//! admits), `valid-after="TIME"`, `valid-before="TIME"` (`YYYYMMDD[HHMM[SS]]`, UTC with a
//! `Z` suffix, else the system's local time, as ssh-keygen reads them). `cert-authority`
//! is refused: certificates are not supported, each signer's own key is listed.
//!
//! # Choices
//! - **The signer is whoever's listed key made the signature**: no principal is asked for.
//!   The first line listing the key whose options admit it at that time names the signer
//!   (its principals field as written, wildcards included: what `ssh-keygen -Y
//!   find-principals` prints).
//! - **Stricter than ssh-keygen where it costs nothing**: the whole file is parsed up front
//!   and any bad line refuses it (ssh-keygen stops at the first line that matches), dates
//!   must exist (no 31 February), a security key (FIDO, `sk-*`) signature must carry the
//!   user-presence flag (a touch: a person decided), DSA keys and RSA keys under 2048 bits
//!   are refused.

use std::{
    fmt, io,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use ssh_key::{HashAlg, PublicKey, SshSig, public::KeyData};

/// The SSHSIG namespace of a decision: `ssh-keygen -Y sign -n agentd-approval`.
pub const NAMESPACE: &str = "agentd-approval";

/// The user-presence bit of a security key signature's flags (OpenSSH's
/// `SSH_SK_USER_PRESENCE_REQD`).
const SK_USER_PRESENCE: u8 = 0x01;
/// A security key signature ends with its flags (1 byte) and counter (4 bytes).
const SK_TRAILER: usize = 5;

/// Who may sign decisions: the lines of an allowed-signers file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedSigners {
    /// Where the lines came from, for messages (the file's path).
    origin: String,
    entries: Vec<Entry>,
}

/// One line that lists a key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// 1-based line number.
    line: usize,
    /// The principals field as written.
    principals: String,
    /// The `namespaces=` pattern list, if any.
    namespaces: Option<String>,
    /// Unix seconds.
    valid_after: Option<u64>,
    valid_before: Option<u64>,
    key: KeyData,
}

/// A signature that holds, and whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The principals field of the allowed-signers line that admits the key.
    pub principal: String,
    /// The key's fingerprint, `SHA256:<base64>` (as `ssh-keygen -l` shows it).
    pub fingerprint: String,
    /// The key as an OpenSSH public key line, without comment (`ssh-ed25519 AAAA...`).
    pub key: String,
}

/// Why a signature or an allowed-signers file is refused.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("cannot read allowed signers {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("allowed signers {origin}, line {line}: {problem}")]
    Line {
        origin: String,
        line: usize,
        problem: LineProblem,
    },
    #[error(
        "allowed signers {origin} lists no keys: add a line `PRINCIPAL KEYTYPE BASE64` per signer (who it is, then the contents of their .pub file)"
    )]
    Empty { origin: String },
    #[error(
        "not an SSH signature ({source}): send the whole file `ssh-keygen -Y sign -n {NAMESPACE} -f KEY FILE` writes (FILE.sig), from -----BEGIN SSH SIGNATURE----- to -----END SSH SIGNATURE-----"
    )]
    Malformed {
        #[source]
        source: ssh_key::Error,
    },
    #[error(
        "the signature is for namespace `{found}`, not `{NAMESPACE}`: sign with `ssh-keygen -Y sign -n {NAMESPACE}`"
    )]
    Namespace { found: String },
    #[error(
        "the signing key {fingerprint} is not in allowed signers {origin}: sign with a listed key, or add a line `PRINCIPAL {key}` for it"
    )]
    UnknownKey {
        origin: String,
        fingerprint: String,
        key: String,
    },
    #[error(
        "allowed signers {origin}, line {line}, lists the signing key {fingerprint} but {refusal}"
    )]
    NotAllowed {
        origin: String,
        line: usize,
        fingerprint: String,
        refusal: Refusal,
    },
    #[error(
        "the signature does not match the message: it was made over other text (sign the message exactly as shown, byte for byte) or was altered"
    )]
    Mismatch,
    #[error(
        "the security key {fingerprint} signed without a touch (no user-presence flag): sign again and touch the key"
    )]
    NoPresence { fingerprint: String },
    #[error("the signature was made by key {found}, not by {expected}")]
    OtherKey { expected: String, found: String },
    #[error(
        "`{key}` is not an OpenSSH public key ({source}): write `KEYTYPE BASE64`, as in a .pub file"
    )]
    BadKey {
        key: String,
        #[source]
        source: ssh_key::Error,
    },
    #[error("{what} are not supported: sign with an ed25519, ecdsa or rsa (2048 bits or more) key")]
    Unsupported { what: String },
}

/// What is wrong with a line of an allowed-signers file.
#[derive(Debug, thiserror::Error)]
pub enum LineProblem {
    #[error(
        "no key: write `PRINCIPALS [OPTIONS] KEYTYPE BASE64 [COMMENT]`, e.g. `alice@example.com ssh-ed25519 AAAA...`"
    )]
    NoKey,
    #[error("the {0} have an unterminated quote: close it with \"")]
    Quote(&'static str),
    #[error("empty principals: write who the key belongs to, e.g. `alice@example.com`")]
    NoPrincipals,
    #[error(
        "cert-authority: certificates are not supported; list each signer's own public key (their .pub file) instead"
    )]
    CertAuthority,
    #[error(
        "{0} is a certificate, which is not supported: list the signer's own public key (the .pub file, not the -cert.pub)"
    )]
    Certificate(String),
    #[error(
        "unknown option `{0}`: the options are namespaces=\"...\", valid-after=\"...\" and valid-before=\"...\""
    )]
    UnknownOption(String),
    #[error("{0} needs a quoted value: write {0}=\"...\"")]
    Unquoted(&'static str),
    #[error("{0} is given twice: keep one")]
    Duplicate(&'static str),
    #[error(
        "bad option list at `{0}`: separate options with commas, without spaces (spaces only inside quotes)"
    )]
    OptionSyntax(String),
    #[error(
        "namespaces=\"{0}\": write comma-separated names without spaces or empty entries, e.g. namespaces=\"git,{NAMESPACE}\""
    )]
    Namespaces(String),
    #[error(
        "{option}=\"{value}\" is not a time: write YYYYMMDD, YYYYMMDDHHMM or YYYYMMDDHHMMSS from 1970 on, with a Z for UTC (e.g. {option}=\"20270101Z\"), without it for local time"
    )]
    Time { option: &'static str, value: String },
    #[error("valid-before is not after valid-after: the key would never be valid")]
    NeverValid,
    #[error(
        "`{0}` is neither an option (namespaces=, valid-after=, valid-before=) nor a key type (ssh-ed25519, ecdsa-sha2-nistp256, ssh-rsa, ...)"
    )]
    NotKeyType(String),
    #[error(
        "not a valid {keytype} public key ({source}): copy the line from the signer's .pub file"
    )]
    Key {
        keytype: String,
        #[source]
        source: ssh_key::Error,
    },
    #[error("{0} are not supported: list an ed25519, ecdsa or rsa (2048 bits or more) key")]
    Unsupported(String),
}

/// Why a line that lists the signing key does not admit this signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "its namespaces=\"{0}\" does not admit {NAMESPACE}: add it, e.g. namespaces=\"{0},{NAMESPACE}\""
    )]
    Namespace(String),
    #[error("it is not valid before {} (valid-after)", Time(*.0))]
    NotYet(u64),
    #[error("it expired at {} (valid-before)", Time(*.0))]
    Expired(u64),
}

/// Unix seconds, shown as RFC 3339 UTC.
struct Time(u64);

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::event::rfc3339_secs(self.0))
    }
}

impl AllowedSigners {
    /// Reads and parses an allowed-signers file.
    pub fn load(path: &Path) -> Result<Self, SignError> {
        let text = std::fs::read_to_string(path).map_err(|source| SignError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses the text of an allowed-signers file; `origin` names it in messages. Refuses
    /// any bad line, and a file that lists no key.
    pub fn parse(origin: &str, text: &str) -> Result<Self, SignError> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let problem = |problem| SignError::Line {
                origin: origin.to_owned(),
                line: i + 1,
                problem,
            };
            if let Some(entry) = parse_line(i + 1, line).map_err(problem)? {
                entries.push(entry);
            }
        }
        if entries.is_empty() {
            return Err(SignError::Empty {
                origin: origin.to_owned(),
            });
        }
        Ok(AllowedSigners {
            origin: origin.to_owned(),
            entries,
        })
    }

    /// The principals of the first line that lists `key` and admits a signature in
    /// [`NAMESPACE`] at `at` (for a record, the time it was written).
    pub fn principal_for(&self, key_openssh: &str, at: SystemTime) -> Result<String, SignError> {
        let key = parse_key(key_openssh)?;
        self.lookup(&key, unix_seconds(at))
            .map(|e| e.principals.clone())
    }

    /// The first line that lists `key` and admits it at `at` (Unix seconds).
    fn lookup(&self, key: &KeyData, at: u64) -> Result<&Entry, SignError> {
        let mut refused = None;
        for entry in self.entries.iter().filter(|e| e.key == *key) {
            match entry.admits(at) {
                Ok(()) => return Ok(entry),
                Err(refusal) => {
                    refused.get_or_insert((entry.line, refusal));
                }
            }
        }
        let fingerprint = fingerprint(key);
        Err(match refused {
            Some((line, refusal)) => SignError::NotAllowed {
                origin: self.origin.clone(),
                line,
                fingerprint,
                refusal,
            },
            None => SignError::UnknownKey {
                origin: self.origin.clone(),
                fingerprint,
                key: openssh(key),
            },
        })
    }
}

impl Entry {
    fn admits(&self, at: u64) -> Result<(), Refusal> {
        if let Some(list) = &self.namespaces
            && !matches_list(NAMESPACE, list)
        {
            return Err(Refusal::Namespace(list.clone()));
        }
        if let Some(after) = self.valid_after
            && at < after
        {
            return Err(Refusal::NotYet(after));
        }
        if let Some(before) = self.valid_before
            && at > before
        {
            return Err(Refusal::Expired(before));
        }
        Ok(())
    }
}

/// Verifies `armored` (an `ssh-keygen -Y sign -n agentd-approval` signature) over
/// `message`: its namespace is [`NAMESPACE`], its key is listed in `signers` by a line that
/// admits it at `now`, and it holds over `message`. Returns who signed.
pub fn verify(
    signers: &AllowedSigners,
    message: &[u8],
    armored: &str,
    now: SystemTime,
) -> Result<Verified, SignError> {
    let sig = decode(armored)?;
    let entry = signers.lookup(sig.public_key(), unix_seconds(now))?;
    check(&entry.key, message, &sig)?;
    Ok(Verified {
        principal: entry.principals.clone(),
        fingerprint: fingerprint(&entry.key),
        key: openssh(&entry.key),
    })
}

/// Verifies `armored` over `message` for the key `key_openssh` (`KEYTYPE BASE64 [COMMENT]`),
/// as recorded with a decision: the namespace is [`NAMESPACE`], the signature was made by
/// that key and holds. Returns the key's fingerprint.
pub fn verify_with_key(
    key_openssh: &str,
    message: &[u8],
    armored: &str,
) -> Result<String, SignError> {
    let key = parse_key(key_openssh)?;
    let sig = decode(armored)?;
    check(&key, message, &sig)?;
    Ok(fingerprint(&key))
}

fn decode(armored: &str) -> Result<SshSig, SignError> {
    let sig = SshSig::from_pem(armored.trim()).map_err(|source| SignError::Malformed { source })?;
    if sig.namespace() != NAMESPACE {
        return Err(SignError::Namespace {
            found: sig.namespace().to_owned(),
        });
    }
    Ok(sig)
}

/// `sig` was made by `key` in [`NAMESPACE`] over `message` (and, for a security key, with
/// a touch).
fn check(key: &KeyData, message: &[u8], sig: &SshSig) -> Result<(), SignError> {
    if sig.public_key() != key {
        return Err(SignError::OtherKey {
            expected: fingerprint(key),
            found: fingerprint(sig.public_key()),
        });
    }
    supported(key).map_err(|what| SignError::Unsupported { what })?;
    PublicKey::from(key.clone())
        .verify(NAMESPACE, message, sig)
        .map_err(|_| SignError::Mismatch)?;
    if matches!(key, KeyData::SkEd25519(_) | KeyData::SkEcdsaSha2NistP256(_)) {
        let bytes = sig.signature_bytes();
        let flags = bytes
            .len()
            .checked_sub(SK_TRAILER)
            .and_then(|at| bytes.get(at))
            .copied()
            .unwrap_or(0);
        if flags & SK_USER_PRESENCE == 0 {
            return Err(SignError::NoPresence {
                fingerprint: fingerprint(key),
            });
        }
    }
    Ok(())
}

fn parse_key(key_openssh: &str) -> Result<KeyData, SignError> {
    let key = PublicKey::from_openssh(key_openssh.trim()).map_err(|source| SignError::BadKey {
        key: key_openssh.to_owned(),
        source,
    })?;
    let key = key.key_data().clone();
    supported(&key).map_err(|what| SignError::Unsupported { what })?;
    Ok(key)
}

/// Smallest RSA modulus ssh-key verifies with.
const RSA_MIN_BITS: usize = 2048;

/// Whether a signature may be made with `key`; else what it is, for a message.
fn supported(key: &KeyData) -> Result<(), String> {
    if let KeyData::Rsa(rsa) = key {
        let bits = rsa.n.as_positive_bytes().map_or(0, |n| {
            let lead = n.first().map_or(0, |b| b.leading_zeros() as usize);
            n.len() * 8 - lead
        });
        if bits < RSA_MIN_BITS {
            return Err(format!(
                "ssh-rsa keys of {bits} bits (under {RSA_MIN_BITS})"
            ));
        }
    }
    if matches!(
        key,
        KeyData::Ed25519(_)
            | KeyData::Ecdsa(_)
            | KeyData::Rsa(_)
            | KeyData::SkEd25519(_)
            | KeyData::SkEcdsaSha2NistP256(_)
    ) {
        Ok(())
    } else {
        Err(format!("{} keys", key.algorithm().as_str()))
    }
}

fn fingerprint(key: &KeyData) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// `KEYTYPE BASE64`, without comment.
fn openssh(key: &KeyData) -> String {
    PublicKey::from(key.clone())
        .to_openssh()
        .unwrap_or_else(|e| format!("({} key: {e})", key.algorithm().as_str()))
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

// ---- the allowed-signers line format ----

/// Key types OpenSSH writes in .pub files and ssh-key verifies.
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

const CERT_SUFFIX: &str = "-cert-v01@openssh.com";

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// One line: `None` for a blank or comment line.
fn parse_line(line_no: usize, line: &str) -> Result<Option<Entry>, LineProblem> {
    let rest = line.trim_start_matches(is_blank);
    if rest.is_empty() || rest.starts_with('#') {
        return Ok(None);
    }
    let (principals, rest) = principals_field(rest)?;
    let rest = rest.trim_start_matches(is_blank);
    let (first, _) = split_word(rest);
    let (options, rest) = if is_options(first) {
        let (field, rest) = options_field(rest)?;
        (parse_options(field)?, rest.trim_start_matches(is_blank))
    } else {
        (Options::default(), rest)
    };
    let (keytype, rest) = split_word(rest);
    let (base64, _comment) = split_word(rest.trim_start_matches(is_blank));
    if keytype.is_empty() {
        return Err(LineProblem::NoKey);
    }
    if keytype.ends_with(CERT_SUFFIX) {
        return Err(LineProblem::Certificate(keytype.to_owned()));
    }
    if keytype == "ssh-dss" {
        return Err(LineProblem::Unsupported("ssh-dss keys".to_owned()));
    }
    if !KEY_TYPES.contains(&keytype) {
        return Err(LineProblem::NotKeyType(keytype.to_owned()));
    }
    if base64.is_empty() {
        return Err(LineProblem::NoKey);
    }
    let key = PublicKey::from_openssh(&format!("{keytype} {base64}")).map_err(|source| {
        LineProblem::Key {
            keytype: keytype.to_owned(),
            source,
        }
    })?;
    let key = key.key_data().clone();
    supported(&key).map_err(LineProblem::Unsupported)?;
    Ok(Some(Entry {
        line: line_no,
        principals: principals.to_owned(),
        namespaces: options.namespaces,
        valid_after: options.valid_after,
        valid_before: options.valid_before,
        key,
    }))
}

/// The first word and what follows it.
fn split_word(s: &str) -> (&str, &str) {
    s.split_at(s.find(is_blank).unwrap_or(s.len()))
}

/// The principals (a word, or a double-quoted string) and what follows.
fn principals_field(s: &str) -> Result<(&str, &str), LineProblem> {
    let (principals, rest) = match s.strip_prefix('"') {
        Some(quoted) => {
            let end = quoted.find('"').ok_or(LineProblem::Quote("principals"))?;
            let rest = &quoted[end + 1..];
            if !rest.is_empty() && !rest.starts_with(is_blank) {
                return Err(LineProblem::Quote("principals"));
            }
            (&quoted[..end], rest)
        }
        None => split_word(s),
    };
    if principals.is_empty() {
        return Err(LineProblem::NoPrincipals);
    }
    if rest.trim_start_matches(is_blank).is_empty() {
        return Err(LineProblem::NoKey);
    }
    Ok((principals, rest))
}

/// Whether the word after the principals is an option list (else it is the key type).
fn is_options(word: &str) -> bool {
    let name = word.split([',', '=']).next().unwrap_or(word);
    word.contains(['=', ',', '"']) || name.eq_ignore_ascii_case("cert-authority")
}

/// The option list (up to a blank outside quotes) and what follows.
fn options_field(s: &str) -> Result<(&str, &str), LineProblem> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if is_blank(c) && !quoted => return Ok(s.split_at(i)),
            _ => {}
        }
    }
    if quoted {
        return Err(LineProblem::Quote("options"));
    }
    Ok((s, ""))
}

#[derive(Debug, Default)]
struct Options {
    namespaces: Option<String>,
    valid_after: Option<u64>,
    valid_before: Option<u64>,
}

/// `opt[,opt...]`, as ssh-keygen reads them: names case-insensitive, values quoted.
fn parse_options(field: &str) -> Result<Options, LineProblem> {
    let mut options = Options::default();
    let mut s = field;
    loop {
        let name_end = s.find([',', '=']).unwrap_or(s.len());
        let (name, after) = s.split_at(name_end);
        let rest = if name.eq_ignore_ascii_case("cert-authority") {
            return Err(LineProblem::CertAuthority);
        } else if let Some(value) = after.strip_prefix('=') {
            let option = ["namespaces", "valid-after", "valid-before"]
                .into_iter()
                .find(|o| name.eq_ignore_ascii_case(o))
                .ok_or_else(|| LineProblem::UnknownOption(name.to_owned()))?;
            let (value, rest) = dequote(option, value)?;
            match option {
                "namespaces" => {
                    if options.namespaces.is_some() {
                        return Err(LineProblem::Duplicate("namespaces"));
                    }
                    if value.is_empty()
                        || value
                            .split(',')
                            .any(|p| p.is_empty() || p.contains(char::is_whitespace))
                    {
                        return Err(LineProblem::Namespaces(value));
                    }
                    options.namespaces = Some(value);
                }
                "valid-after" | "valid-before" => {
                    let slot = if option == "valid-after" {
                        &mut options.valid_after
                    } else {
                        &mut options.valid_before
                    };
                    if slot.is_some() {
                        return Err(LineProblem::Duplicate(option));
                    }
                    *slot = Some(parse_time(&value).ok_or_else(|| LineProblem::Time {
                        option,
                        value: value.clone(),
                    })?);
                }
                _ => return Err(LineProblem::UnknownOption(name.to_owned())),
            }
            rest
        } else {
            return Err(LineProblem::UnknownOption(name.to_owned()));
        };
        if rest.is_empty() {
            break;
        }
        match rest.strip_prefix(',') {
            Some(next) if !next.is_empty() => s = next,
            Some(_) | None => return Err(LineProblem::OptionSyntax(rest.to_owned())),
        }
    }
    if let (Some(after), Some(before)) = (options.valid_after, options.valid_before)
        && before <= after
    {
        return Err(LineProblem::NeverValid);
    }
    Ok(options)
}

/// `"value"rest` -> (value, rest); `\"` inside is a quote.
fn dequote<'a>(option: &'static str, s: &'a str) -> Result<(String, &'a str), LineProblem> {
    let Some(inner) = s.strip_prefix('"') else {
        return Err(LineProblem::Unquoted(option));
    };
    let mut value = String::new();
    let mut chars = inner.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' if inner[i + 1..].starts_with('"') => {
                value.push('"');
                chars.next();
            }
            '"' => return Ok((value, &inner[i + 1..])),
            c => value.push(c),
        }
    }
    Err(LineProblem::Quote("options"))
}

/// `YYYYMMDD[HHMM[SS]]` with a `Z` (or `UTC`) suffix for UTC, else local time, as
/// ssh-keygen's `parse_absolute_time`; Unix seconds, from 1970 on.
fn parse_time(s: &str) -> Option<u64> {
    let upper = s.to_ascii_uppercase();
    let (digits, utc) = match upper
        .strip_suffix('Z')
        .or_else(|| upper.strip_suffix("UTC"))
    {
        Some(d) => (d, true),
        None => (upper.as_str(), false),
    };
    if !matches!(digits.len(), 8 | 12 | 14) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let field =
        |at: usize, len: usize| digits.get(at..at + len).and_then(|f| f.parse::<u32>().ok());
    let (year, month, day) = (field(0, 4)?, field(4, 2)?, field(6, 2)?);
    let (hour, minute, second) = match digits.len() {
        8 => (0, 0, 0),
        12 => (field(8, 2)?, field(10, 2)?, 0),
        _ => (field(8, 2)?, field(10, 2)?, field(12, 2)?),
    };
    if !is_civil(year, month, day, hour, minute, second) {
        return None;
    }
    let t = if utc {
        unix_utc(year, month, day, hour, minute, second)?
    } else {
        unix_local(year, month, day, hour, minute, second)?
    };
    (t > 0).then_some(t)
}

/// Whether the date exists and the time is on a clock (no leap seconds).
fn is_civil(year: u32, month: u32, day: u32, hour: u32, minute: u32, second: u32) -> bool {
    (1..=12).contains(&month)
        && (1..=days_in_month(year, month)).contains(&day)
        && hour < 24
        && minute < 60
        && second < 60
}

fn days_in_month(year: u32, month: u32) -> u32 {
    let leap = (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Unix seconds of a UTC calendar time (proleptic Gregorian; H. Hinnant's
/// `days_from_civil`); `None` before 1970 or for a time that does not exist.
pub fn unix_utc(
    year: u32,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
) -> Option<u64> {
    if !is_civil(year, month, day, hour, minute, second) {
        return None;
    }
    let (y, m, d) = (i64::from(year), i64::from(month), i64::from(day));
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second);
    u64::try_from(secs).ok()
}

/// Unix seconds of a wall-clock time in the system's time zone (`mktime`, daylight saving
/// time as it applies on that date).
fn unix_local(year: u32, month: u32, day: u32, hour: u32, minute: u32, second: u32) -> Option<u64> {
    let int = |v: u32| libc::c_int::try_from(v).ok();
    // SAFETY: `libc::tm` is integers and, on glibc, a `tm_zone` pointer for which null is
    // valid (mktime does not read it); all-zero bytes are a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    tm.tm_year = int(year)? - 1900;
    tm.tm_mon = int(month)? - 1;
    tm.tm_mday = int(day)?;
    tm.tm_hour = int(hour)?;
    tm.tm_min = int(minute)?;
    tm.tm_sec = int(second)?;
    tm.tm_isdst = -1;
    // SAFETY: `tm` is a valid, exclusively borrowed `struct tm` that mktime reads and
    // normalises; it returns -1 on failure, refused below.
    let t = unsafe { libc::mktime(&mut tm) };
    u64::try_from(t).ok()
}

/// OpenSSH's `match_pattern_list`: `s` matches the comma-separated patterns (`*`, `?`) if
/// one matches and no negated one (`!pattern`) does.
fn matches_list(s: &str, list: &str) -> bool {
    let mut matched = false;
    for pattern in list.split(',') {
        let (negated, pattern) = match pattern.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, pattern),
        };
        if glob(s.as_bytes(), pattern.as_bytes()) {
            if negated {
                return false;
            }
            matched = true;
        }
    }
    matched
}

/// `*` any run of bytes, `?` one byte, anything else itself.
fn glob(s: &[u8], pattern: &[u8]) -> bool {
    let (mut si, mut pi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match pattern.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == s[si] => {
                si += 1;
                pi += 1;
            }
            Some(_) | None => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    pattern[pi.min(pattern.len())..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        io::Write as _,
        process::{Command, Stdio},
        time::Duration,
    };

    use super::*;

    const MESSAGE: &str = "agentd-approval v1\nrequest: r-ab12cd-3\nagent: ab12cd\nprofile: analyze-only\n\
what: connect tcp 93.184.216.34:443 (forum.example.com)\ndecision: allow\nscope: for 600s\n";

    /// Keys made with ssh-keygen in a temporary directory.
    struct Lab {
        dir: tempfile::TempDir,
        n: std::cell::Cell<u32>,
    }

    impl Lab {
        fn new() -> Lab {
            Lab {
                dir: tempfile::Builder::new()
                    .prefix("agentd-sign-")
                    .tempdir()
                    .unwrap(),
                n: std::cell::Cell::new(0),
            }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn fresh(&self, what: &str) -> PathBuf {
            self.n.set(self.n.get() + 1);
            self.path(&format!("{what}-{}", self.n.get()))
        }

        /// Makes key `name` (`ssh-keygen -t ...`); returns its public key line.
        fn keygen(&self, name: &str, args: &[&str]) -> String {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-N", "", "-C", &format!("{name}@test"), "-f"])
                .arg(self.path(name))
                .args(args)
                .stdin(Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "ssh-keygen {args:?}");
            fs::read_to_string(self.path(&format!("{name}.pub")))
                .unwrap()
                .trim()
                .to_owned()
        }

        /// `ssh-keygen -Y sign -n namespace -f key` over `message`: the armored signature.
        fn sign(&self, key: &str, namespace: &str, message: &str) -> String {
            let file = self.fresh("msg");
            fs::write(&file, message).unwrap();
            let out = Command::new("ssh-keygen")
                .args(["-q", "-Y", "sign", "-n", namespace, "-f"])
                .arg(self.path(key))
                .arg(&file)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            fs::read_to_string(file.with_extension("sig")).unwrap()
        }

        /// `ssh-keygen -Y verify`'s verdict on the same question.
        fn ssh_verify(&self, allowed: &str, principal: &str, armored: &str, message: &str) -> bool {
            let allowed_file = self.fresh("allowed");
            fs::write(&allowed_file, allowed).unwrap();
            let sig = self.fresh("sig");
            fs::write(&sig, armored).unwrap();
            let mut child = Command::new("ssh-keygen")
                .args(["-Y", "verify", "-f"])
                .arg(&allowed_file)
                .args(["-I", principal, "-n", NAMESPACE, "-s"])
                .arg(&sig)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(message.as_bytes())
                .unwrap();
            child.wait().unwrap().success()
        }

        /// `ssh-keygen -lf key.pub`'s fingerprint.
        fn ssh_fingerprint(&self, key: &str) -> String {
            let out = Command::new("ssh-keygen")
                .args(["-l", "-E", "sha256", "-f"])
                .arg(self.path(&format!("{key}.pub")))
                .output()
                .unwrap();
            String::from_utf8(out.stdout)
                .unwrap()
                .split_whitespace()
                .nth(1)
                .unwrap()
                .to_owned()
        }
    }

    fn without_comment(line: &str) -> String {
        line.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn signers(text: &str) -> AllowedSigners {
        AllowedSigners::parse("test", text).unwrap()
    }

    fn now() -> SystemTime {
        SystemTime::now()
    }

    #[test]
    fn good_signatures_verify_and_name_the_signer() {
        let lab = Lab::new();
        let keys = [
            ("ed", lab.keygen("ed", &["-t", "ed25519"])),
            ("ec256", lab.keygen("ec256", &["-t", "ecdsa", "-b", "256"])),
            ("ec384", lab.keygen("ec384", &["-t", "ecdsa", "-b", "384"])),
            ("ec521", lab.keygen("ec521", &["-t", "ecdsa", "-b", "521"])),
            ("rsa", lab.keygen("rsa", &["-t", "rsa", "-b", "2048"])),
        ];
        let allowed: String = keys
            .iter()
            .map(|(name, key)| format!("{name}@example.com {key}\n"))
            .collect();
        let signers = signers(&allowed);
        for (name, key) in &keys {
            let sig = lab.sign(name, NAMESPACE, MESSAGE);
            let v = verify(&signers, MESSAGE.as_bytes(), &sig, now()).unwrap();
            assert_eq!(v.principal, format!("{name}@example.com"));
            assert_eq!(v.fingerprint, lab.ssh_fingerprint(name), "{name}");
            assert_eq!(v.key, without_comment(key));
            assert_eq!(
                verify_with_key(key, MESSAGE.as_bytes(), &sig).unwrap(),
                v.fingerprint
            );
            assert_eq!(fingerprint(&parse_key(&v.key).unwrap()), v.fingerprint);
        }
    }

    #[test]
    fn tampered_messages_other_namespaces_and_other_keys_are_refused() {
        let lab = Lab::new();
        let alice = lab.keygen("alice", &["-t", "ed25519"]);
        let mallory = lab.keygen("mallory", &["-t", "ed25519"]);
        let signers = signers(&format!("alice@example.com {alice}\n"));
        let sig = lab.sign("alice", NAMESPACE, MESSAGE);

        // Another scope: the same signature does not stretch to it.
        let stretched = MESSAGE.replace("for 600s", "session");
        let err = verify(&signers, stretched.as_bytes(), &sig, now()).unwrap_err();
        assert!(matches!(err, SignError::Mismatch), "{err}");
        assert!(matches!(
            verify_with_key(&alice, stretched.as_bytes(), &sig),
            Err(SignError::Mismatch)
        ));

        // A signature for git (another namespace) over the same text.
        let git = lab.sign("alice", "git", MESSAGE);
        let err = verify(&signers, MESSAGE.as_bytes(), &git, now()).unwrap_err();
        assert!(
            matches!(&err, SignError::Namespace { found } if found == "git"),
            "{err}"
        );
        assert!(err.to_string().contains("-n agentd-approval"), "{err}");

        // A key nobody listed.
        let forged = lab.sign("mallory", NAMESPACE, MESSAGE);
        let err = verify(&signers, MESSAGE.as_bytes(), &forged, now()).unwrap_err();
        assert!(matches!(err, SignError::UnknownKey { .. }), "{err}");
        assert!(
            err.to_string().contains(&lab.ssh_fingerprint("mallory")),
            "{err}"
        );
        // ... nor passes for the recorded key of another.
        let err = verify_with_key(&alice, MESSAGE.as_bytes(), &forged).unwrap_err();
        assert!(matches!(err, SignError::OtherKey { .. }), "{err}");
        assert!(verify_with_key(&mallory, MESSAGE.as_bytes(), &forged).is_ok());

        // Not a signature at all; a signature cut short.
        for bad in ["", "hello", &sig[..sig.len() / 2]] {
            let err = verify(&signers, MESSAGE.as_bytes(), bad, now()).unwrap_err();
            assert!(matches!(err, SignError::Malformed { .. }), "{err}");
        }
    }

    #[test]
    fn line_options_decide_whether_a_listed_key_may_sign() {
        let lab = Lab::new();
        let key = lab.keygen("k", &["-t", "ed25519"]);
        let sig = lab.sign("k", NAMESPACE, MESSAGE);
        let check = |line: String| verify(&signers(&line), MESSAGE.as_bytes(), &sig, now());

        assert!(check(format!("a namespaces=\"git,agentd-approval\" {key}")).is_ok());
        assert!(check(format!("a namespaces=\"agentd-*\" {key}")).is_ok());
        assert!(check(format!("a NAMESPACES=\"*\" {key}")).is_ok());
        for refused in ["git", "*,!agentd-approval", "agentd"] {
            let err = check(format!("a namespaces=\"{refused}\" {key}")).unwrap_err();
            assert!(
                matches!(&err, SignError::NotAllowed { line: 1, refusal: Refusal::Namespace(l), .. } if l == refused),
                "{err}"
            );
        }

        let err = check(format!("a valid-before=\"20200101Z\" {key}")).unwrap_err();
        assert!(
            matches!(
                err,
                SignError::NotAllowed {
                    refusal: Refusal::Expired(1_577_836_800),
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("expired at 2020-01-01T00:00:00Z"),
            "{err}"
        );
        let err = check(format!("a valid-after=\"29990101\" {key}")).unwrap_err();
        assert!(
            matches!(
                err,
                SignError::NotAllowed {
                    refusal: Refusal::NotYet(_),
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            check(format!(
                "a valid-after=\"20200101\",valid-before=\"29990101Z\" {key}"
            ))
            .is_ok()
        );

        // Listed twice: the first line that admits it names the signer.
        let both = format!("old valid-before=\"20200101Z\" {key}\nnew {key}\nlater {key}\n");
        assert_eq!(check(both).unwrap().principal, "new");

        // Checked at the time given, not now.
        let signers = signers(&format!("a valid-before=\"20300101Z\" {key}"));
        let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        assert!(verify(&signers, MESSAGE.as_bytes(), &sig, at(1_800_000_000)).is_ok());
        assert!(verify(&signers, MESSAGE.as_bytes(), &sig, at(1_900_000_000)).is_err());
        assert_eq!(signers.principal_for(&key, at(1_800_000_000)).unwrap(), "a");
        assert!(signers.principal_for(&key, at(1_900_000_000)).is_err());
    }

    #[test]
    fn verdicts_agree_with_ssh_keygen() {
        let lab = Lab::new();
        let key = lab.keygen("k", &["-t", "ed25519"]);
        let ec = lab.keygen("ec", &["-t", "ecdsa"]);
        let other = lab.keygen("other", &["-t", "ed25519"]);
        let good = lab.sign("k", NAMESPACE, MESSAGE);
        let git = lab.sign("k", "git", MESSAGE);
        let by_ec = lab.sign("ec", NAMESPACE, MESSAGE);
        let by_other = lab.sign("other", NAMESPACE, MESSAGE);
        let tampered = MESSAGE.replace("allow", "deny");
        let plain = format!("alice@example.com {key}\nbob@example.com {ec}\n");
        let cases: Vec<(String, &str, &str, bool)> = vec![
            (plain.clone(), good.as_str(), MESSAGE, true),
            (plain.clone(), by_ec.as_str(), MESSAGE, true),
            (plain.clone(), good.as_str(), tampered.as_str(), false),
            (plain.clone(), git.as_str(), MESSAGE, false),
            (plain.clone(), by_other.as_str(), MESSAGE, false),
            (
                format!("alice@example.com {other}\n"),
                good.as_str(),
                MESSAGE,
                false,
            ),
            (
                format!("alice@example.com namespaces=\"git\" {key}\n"),
                good.as_str(),
                MESSAGE,
                false,
            ),
            (
                format!("alice@example.com namespaces=\"git,agentd-approval\" {key}\n"),
                good.as_str(),
                MESSAGE,
                true,
            ),
            (
                format!("alice@example.com valid-before=\"20200101Z\" {key}\n"),
                good.as_str(),
                MESSAGE,
                false,
            ),
            (
                format!("alice@example.com valid-after=\"29990101Z\" {key}\n"),
                good.as_str(),
                MESSAGE,
                false,
            ),
            (
                format!("alice@example.com valid-after=\"20200101\" {key}\n"),
                good.as_str(),
                MESSAGE,
                true,
            ),
            (
                format!(
                    "alice@example.com valid-before=\"20200101Z\" {key}\nalice@example.com {key}\n"
                ),
                good.as_str(),
                MESSAGE,
                true,
            ),
        ];
        for (allowed, sig, message, want) in cases {
            let ours = verify(&signers(&allowed), message.as_bytes(), sig, now());
            let principal = ours
                .as_ref()
                .map_or("alice@example.com".to_owned(), |v| v.principal.clone());
            let theirs = lab.ssh_verify(&allowed, &principal, sig, message);
            assert_eq!(ours.is_ok(), want, "{allowed}: {ours:?}");
            assert_eq!(theirs, want, "ssh-keygen on {allowed}");
        }
    }

    #[test]
    fn security_key_signatures_need_a_touch() {
        use sha2::{Digest as _, Sha256};
        use ssh_key::{
            Algorithm, LineEnding, Signature, SigningKey, private::Ed25519Keypair,
            public::SkEd25519,
        };

        fn raw_sign<K: SigningKey>(key: &K, data: &[u8]) -> Signature {
            key.try_sign(data).unwrap()
        }

        let keypair = Ed25519Keypair::from_seed(&[7; 32]);
        let key = KeyData::SkEd25519(SkEd25519::new(keypair.public, "ssh:"));
        let private = ssh_key::PrivateKey::from(keypair);
        let line = openssh(&key);
        let signers = signers(&format!("yubi {line}"));
        // What a FIDO authenticator signs (OpenSSH PROTOCOL.u2f): the application's and
        // the data's SHA-256 around the flags and counter.
        let sign = |flags: u8, message: &str| {
            let data = SshSig::signed_data(NAMESPACE, HashAlg::Sha512, message.as_bytes()).unwrap();
            let counter = 1u32.to_be_bytes();
            let mut blob = Sha256::digest(b"ssh:").to_vec();
            blob.push(flags);
            blob.extend_from_slice(&counter);
            blob.extend_from_slice(&Sha256::digest(&data));
            let mut bytes = raw_sign(&private, &blob).as_bytes().to_vec();
            bytes.push(flags);
            bytes.extend_from_slice(&counter);
            let sig = Signature::new(Algorithm::SkEd25519, bytes).unwrap();
            SshSig::new(key.clone(), NAMESPACE, HashAlg::Sha512, sig)
                .unwrap()
                .to_pem(LineEnding::LF)
                .unwrap()
        };
        let touched = sign(SK_USER_PRESENCE, MESSAGE);
        assert_eq!(
            verify(&signers, MESSAGE.as_bytes(), &touched, now())
                .unwrap()
                .principal,
            "yubi"
        );
        let untouched = sign(0, MESSAGE);
        let err = verify(&signers, MESSAGE.as_bytes(), &untouched, now()).unwrap_err();
        assert!(matches!(err, SignError::NoPresence { .. }), "{err}");
        assert!(matches!(
            verify_with_key(&line, MESSAGE.as_bytes(), &untouched),
            Err(SignError::NoPresence { .. })
        ));
        assert!(matches!(
            verify(&signers, b"other", &touched, now()),
            Err(SignError::Mismatch)
        ));
    }

    #[track_caller]
    fn line_error(text: &str) -> (usize, LineProblem, String) {
        match AllowedSigners::parse("/etc/agentd/allowed_signers", text) {
            Err(e @ SignError::Line { .. }) => {
                let shown = e.to_string();
                let SignError::Line { line, problem, .. } = e else {
                    unreachable!()
                };
                (line, problem, shown)
            }
            other => panic!("{text}: {other:?}"),
        }
    }

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILM+rvN+ot98qgEN796jTiQfZfG1KaT0PtFDJ/XFSqti";

    #[test]
    fn the_parser_keeps_principals_comments_and_options() {
        let s = signers(&format!(
            "# who may approve\n\n   \t\n*@ops.example.com,alice? {KEY} alice's laptop key\n\
             \"bob smith\" namespaces=\"a,agentd-approval\" {KEY}\n  carol {KEY}\n"
        ));
        let lines: Vec<_> = s
            .entries
            .iter()
            .map(|e| (e.line, e.principals.as_str()))
            .collect();
        assert_eq!(
            lines,
            [
                (4, "*@ops.example.com,alice?"),
                (5, "bob smith"),
                (6, "carol")
            ]
        );
        assert_eq!(
            s.entries[1].namespaces.as_deref(),
            Some("a,agentd-approval")
        );
        assert_eq!(
            s.principal_for(KEY, now()).unwrap(),
            "*@ops.example.com,alice?"
        );

        // Times: UTC with Z (or UTC), else local; escaped quotes in values.
        let t = signers(&format!(
            "a valid-after=\"20260102030405Z\",Valid-Before=\"20270101utc\" {KEY}\nb namespaces=\"x\\\"y,z\" {KEY}"
        ));
        assert_eq!(t.entries[0].valid_after, Some(1_767_323_045));
        assert_eq!(t.entries[0].valid_before, Some(1_798_761_600));
        assert_eq!(t.entries[1].namespaces.as_deref(), Some("x\"y,z"));
        assert_eq!(parse_time("202601020304Z"), Some(1_767_323_040));
        assert_eq!(parse_time("20240229Z"), Some(1_709_164_800));
        for bad in [
            "20230229Z",
            "20261301",
            "2026010",
            "20260101T0000",
            "19691231Z",
            "2026-01-01",
            "20260101246000Z",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
        // Local time: what mktime says for that wall clock.
        assert!(parse_time("20260615").is_some());
    }

    #[test]
    fn parse_errors_name_the_line_and_say_what_to_write() {
        let lab = Lab::new();
        let rsa1024 = lab.keygen("rsa1024", &["-t", "rsa", "-b", "1024"]);
        let (line, problem, shown) =
            line_error(&format!("# ok\na {KEY}\nb cert-authority {KEY}\n"));
        assert_eq!(line, 3);
        assert!(matches!(problem, LineProblem::CertAuthority));
        assert!(
            shown.starts_with("allowed signers /etc/agentd/allowed_signers, line 3: cert-authority: certificates are not supported"),
            "{shown}"
        );
        let cases: Vec<(String, &str)> = vec![
            ("alice".into(), "no key"),
            ("alice   ".into(), "no key"),
            (format!("a namespaces=\"x\" {}", "ssh-ed25519"), "no key"),
            (
                format!("a cert-authority,namespaces=\"x\" {KEY}"),
                "certificates are not supported",
            ),
            (
                "a ssh-ed25519-cert-v01@openssh.com AAAA".into(),
                "is a certificate",
            ),
            (format!("a no-touch-required {KEY}"), "neither an option"),
            (
                format!("a verify-required=\"x\" {KEY}"),
                "unknown option `verify-required`",
            ),
            (
                format!("a namespaces=git {KEY}"),
                "namespaces needs a quoted value: write namespaces=\"...\"",
            ),
            (format!("a namespaces=\"git {KEY}"), "unterminated quote"),
            (format!("\"a {KEY}"), "unterminated quote"),
            (
                format!("a namespaces=\"git, agentd-approval\" {KEY}"),
                "without spaces",
            ),
            (format!("a namespaces=\"\" {KEY}"), "without spaces"),
            (
                format!("a namespaces=\"x\",namespaces=\"y\" {KEY}"),
                "namespaces is given twice",
            ),
            (format!("a namespaces=\"x\", {KEY}"), "bad option list"),
            (format!("a namespaces=\"x\"y {KEY}"), "bad option list"),
            (
                format!("a valid-before=\"2026\" {KEY}"),
                "valid-before=\"2026\" is not a time",
            ),
            (
                format!("a valid-after=\"20270101Z\",valid-before=\"20260101Z\" {KEY}"),
                "never be valid",
            ),
            (
                "a ssh-ed25519 AAAAnotbase64!".into(),
                "not a valid ssh-ed25519 public key",
            ),
            (
                format!("a ssh-rsa {}", &KEY[12..]),
                "not a valid ssh-rsa public key",
            ),
            (
                "a ssh-dss AAAAB3NzaC1kc3M=".into(),
                "ssh-dss keys are not supported",
            ),
            ("a foo-key AAAA".into(), "neither an option"),
            (
                format!("a {rsa1024}"),
                "ssh-rsa keys of 1024 bits (under 2048) are not supported",
            ),
        ];
        for (text, want) in cases {
            let (line, _, shown) = line_error(&format!("\n{text}\n"));
            assert_eq!(line, 2, "{text}");
            assert!(shown.contains(want), "{text}: {shown}");
        }
        for empty in ["", "# nobody\n\n"] {
            let err = AllowedSigners::parse("f", empty).unwrap_err();
            assert!(matches!(err, SignError::Empty { .. }), "{err}");
        }
        let err = AllowedSigners::load(Path::new("/nonexistent/allowed_signers")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read allowed signers /nonexistent/allowed_signers"),
            "{err}"
        );
    }

    #[test]
    fn patterns_match_as_openssh_does() {
        for (s, list, want) in [
            ("agentd-approval", "agentd-approval", true),
            ("agentd-approval", "git,agentd-approval", true),
            ("agentd-approval", "agentd-*", true),
            ("agentd-approval", "agentd-approva?", true),
            ("agentd-approval", "*a*p*l", true),
            ("agentd-approval", "agentd", false),
            ("agentd-approval", "*,!agentd-*", false),
            ("agentd-approval", "!git", false),
            ("agentd-approval", "", false),
            ("", "*", true),
        ] {
            assert_eq!(matches_list(s, list), want, "{s} in {list}");
        }
    }
}
