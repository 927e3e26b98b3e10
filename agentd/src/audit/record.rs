//! One record of the audit log: its line format, its hash, and strict parsing.
//!
//! A record is one line (no newline inside; JSON escapes every control character):
//!
//! ```text
//! {"seq":N,"ts":"…","prev":"<64 hex>","kind":"K","K":{…},"hash":"<64 hex>"}
//! └──────────────────────────── P ───────────────────────┘
//! ```
//!
//! `hash` is the SHA-256 of `P`, the line's exact bytes up to (not including)
//! `,"hash":"`, in lowercase hex; the line then ends with exactly `,"hash":"<hex>"}`.
//! `prev` is the `hash` of the record before it. Hashing bytes, not re-serialised JSON,
//! means there is nothing to canonicalise: any change to any byte of a line changes `P`
//! (and so its hash) or the stated hash itself.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::event::Event;

/// Version of the record format, in `open` and `rotate` records.
pub const FORMAT_VERSION: u32 = 1;

/// What separates `P` from the stated hash.
const HASH_KEY: &[u8] = br#","hash":""#;
/// What ends every record.
const LINE_END: &[u8] = br#""}"#;
/// Length of a hash in hex.
const HEX_LEN: usize = 64;
/// Length of `,"hash":"<hex>"}`.
const TRAILER_LEN: usize = HASH_KEY.len() + HEX_LEN + LINE_END.len();

/// A SHA-256 digest; shown and parsed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct RecordHash([u8; 32]);

impl RecordHash {
    /// The `prev` of the first record of a log: no predecessor.
    pub const GENESIS: RecordHash = RecordHash([0; 32]);

    /// SHA-256 of `bytes`.
    pub fn of(bytes: &[u8]) -> RecordHash {
        RecordHash(Sha256::digest(bytes).into())
    }

    fn from_hasher(hasher: Sha256) -> RecordHash {
        RecordHash(hasher.finalize().into())
    }

    /// Parses exactly 64 lowercase hex digits (uppercase is refused: a record states its
    /// hash in one spelling only).
    fn from_hex(hex: &[u8]) -> Option<RecordHash> {
        if hex.len() != HEX_LEN {
            return None;
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            *byte = (digit(pair[0])? << 4) | digit(pair[1])?;
        }
        Some(RecordHash(out))
    }
}

/// `{}`: 64 hex digits; `{:#}`: the first 16 and `…`, for messages.
impl fmt::Display for RecordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = if f.alternate() { 8 } else { 32 };
        for b in &self.0[..shown] {
            write!(f, "{b:02x}")?;
        }
        if f.alternate() {
            f.write_str("…")?;
        }
        Ok(())
    }
}

impl fmt::Debug for RecordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not a [`RecordHash`].
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a SHA-256 hash: write 64 lowercase hex digits")]
pub struct BadHash(String);

impl FromStr for RecordHash {
    type Err = BadHash;
    fn from_str(s: &str) -> Result<RecordHash, BadHash> {
        RecordHash::from_hex(s.as_bytes()).ok_or_else(|| BadHash(s.to_owned()))
    }
}

impl TryFrom<String> for RecordHash {
    type Error = BadHash;
    fn try_from(s: String) -> Result<RecordHash, BadHash> {
        s.parse()
    }
}

impl From<RecordHash> for String {
    fn from(h: RecordHash) -> String {
        h.to_string()
    }
}

/// A position in the chain: a record's `seq` and `hash`. An operator who keeps the head
/// elsewhere can later check that the log still contains it (`verify --expect-head`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Head {
    pub seq: u64,
    pub hash: RecordHash,
}

impl Head {
    /// Before the first record: the first record has seq 1 and prev [`RecordHash::GENESIS`].
    pub const GENESIS: Head = Head {
        seq: 0,
        hash: RecordHash::GENESIS,
    };
}

/// The kinds of record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// A writer opened the log (every start of agentd, every reopen after an I/O error).
    Open,
    /// First record of a file that continues the chain of the file rotated before it.
    Rotate,
    /// An [`Event`].
    Event,
    /// A control action: who launched, stopped or killed an agent; a call held for a
    /// person, and what they decided.
    Control,
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Open => "open",
            RecordKind::Rotate => "rotate",
            RecordKind::Event => "event",
            RecordKind::Control => "control",
        }
    }
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Body of an `open` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Open {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// The process that opened the log.
    pub pid: u32,
    /// The remnant of an interrupted write that this record follows, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<Partial>,
}

/// Body of a `rotate` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// File name the previous file got at rotation (`audit.log.1`); later rotations shift
    /// it to `.2`, `.3`…: the link is checked by hash, the name is for people.
    pub previous: String,
    /// The remnant of an interrupted write that this record follows, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<Partial>,
}

/// The bytes an interrupted write left between the last complete record and the record
/// noting them (without the newline just before that record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partial {
    pub bytes: u64,
    pub sha256: RecordHash,
}

impl Partial {
    pub fn of(remnant: &[u8]) -> Partial {
        Partial {
            bytes: remnant.len() as u64,
            sha256: RecordHash::of(remnant),
        }
    }
}

/// Body of a `control` record: a control action and who asked for it (for a decision:
/// who answered).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    pub action: Action,
    /// The agent acted on, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    pub by: Actor,
    /// Action-specific details: profile, command line, signal, reason...
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub detail: serde_json::Map<String, serde_json::Value>,
}

/// A control action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// An agent was launched.
    Launch,
    /// An agent was asked to stop (SIGTERM, then the wall-time grace).
    Stop,
    /// An agent was killed (its cgroup killed).
    Kill,
    /// A call of an agent was held for a person to decide (`detail`: the request id,
    /// what was asked, the calling process...).
    Ask,
    /// A person allowed a held call (`detail`: `request`, `scope`, `expires`,
    /// `waited_ms`; when signed, `message`, `signature`, `key`, `principal`,
    /// `fingerprint`: see [`SignedDecision`]).
    Approve,
    /// A held call was refused: by a person (`detail` as for [`Action::Approve`]), or on
    /// timeout or the pending cap.
    Deny,
    /// A person revoked a grant (an approval that outlived its call).
    Revoke,
    /// A daemon stopped for a successor and left its agents running (`detail`: the
    /// agents, the grace period).
    Handover,
    /// A daemon took over an agent a previous one handed over (`detail`: the previous
    /// daemon's pid, the gap).
    Adopt,
    /// `agentd ui-url` gave out a web view token (`detail`: `token`, the first 8 hex
    /// digits of its SHA-256; the `uid`, `gid` and `groups` it acts for; `expires`).
    UiToken,
    /// A web view token was spent for a session (`detail`: `token`, `peer`, the client's
    /// address, `expires`). What the session then does names it in `detail.web`.
    UiLogin,
}

/// Who asked: the peer credentials of a control-socket client (`SO_PEERCRED`), or the
/// invoking user and agentd's own pid for `agentd run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Actor {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// A record's body, to encode.
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    Open(&'a Open),
    Rotate(&'a Rotate),
    Event(&'a Event),
    Control(&'a Control),
}

impl Body<'_> {
    pub fn kind(&self) -> RecordKind {
        match self {
            Body::Open(_) => RecordKind::Open,
            Body::Rotate(_) => RecordKind::Rotate,
            Body::Event(_) => RecordKind::Event,
            Body::Control(_) => RecordKind::Control,
        }
    }

    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        match self {
            Body::Open(b) => serde_json::to_writer(out, b),
            Body::Rotate(b) => serde_json::to_writer(out, b),
            Body::Event(b) => serde_json::to_writer(out, b),
            Body::Control(b) => serde_json::to_writer(out, b),
        }
    }
}

/// Encodes one record as its line (without the newline) and returns its hash.
pub fn encode(
    seq: u64,
    ts: &str,
    prev: RecordHash,
    body: Body<'_>,
) -> serde_json::Result<(Vec<u8>, RecordHash)> {
    let kind = body.kind().as_str();
    let mut line = Vec::with_capacity(384);
    line.extend_from_slice(format!("{{\"seq\":{seq},\"ts\":").as_bytes());
    serde_json::to_writer(&mut line, ts)?;
    line.extend_from_slice(
        format!(",\"prev\":\"{prev}\",\"kind\":\"{kind}\",\"{kind}\":").as_bytes(),
    );
    body.write_json(&mut line)?;
    let hash = RecordHash::of(&line);
    line.extend_from_slice(HASH_KEY);
    line.extend_from_slice(hash.to_string().as_bytes());
    line.extend_from_slice(LINE_END);
    Ok((line, hash))
}

/// What [`parse`] checked and verification needs of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub seq: u64,
    pub prev: RecordHash,
    pub hash: RecordHash,
    pub kind: RecordKind,
    /// The remnant an `open` or `rotate` record notes.
    pub partial: Option<Partial>,
    /// The signature of a signed decision, to check.
    pub signed: Option<SignedDecision>,
}

/// What was decided, as a decision record's action says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// [`Action::Approve`].
    Allow,
    /// [`Action::Deny`].
    Deny,
}

impl Decision {
    /// How the signed message states it: `decision: allow`.
    pub fn word(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        }
    }
}

/// A signed decision: a `control` record whose action is `approve` or `deny` and whose
/// `detail` carries a `signature` (then `message` and `key` too). The signature is an
/// `ssh-keygen -Y sign -n agentd-approval` signature over `message`, the exact text the
/// person signed, by `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedDecision {
    pub decision: Decision,
    /// The record's `ts`: when the decision was recorded.
    pub ts: String,
    /// `detail.request`: the request it answers, when stated.
    pub request: Option<String>,
    /// `detail.message`: the text signed.
    pub message: String,
    /// `detail.signature`: armored (`-----BEGIN SSH SIGNATURE-----`).
    pub signature: String,
    /// `detail.key`: the signer's public key, OpenSSH format.
    pub key: String,
    /// `detail.fingerprint`: the key's `SHA256:` fingerprint, when stated.
    pub fingerprint: Option<String>,
}

impl Parsed {
    pub fn head(&self) -> Head {
        Head {
            seq: self.seq,
            hash: self.hash,
        }
    }
}

/// Why a line is not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("not a record: it does not end in a \"hash\" field")]
    NoHash,
    #[error("altered: its content does not match its hash")]
    Altered,
    #[error("malformed, though its hash matches (written so, or re-hashed): {0}")]
    Malformed(String),
}

/// The record as it is on disk. The bodies verification does not look into (`event`,
/// `control`) are kept as JSON objects, so that logs stay verifiable when those types
/// gain fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecord {
    seq: u64,
    ts: String,
    prev: RecordHash,
    kind: RecordKind,
    open: Option<Open>,
    rotate: Option<Rotate>,
    event: Option<serde_json::Map<String, serde_json::Value>>,
    control: Option<serde_json::Map<String, serde_json::Value>>,
    hash: RecordHash,
}

/// Parses one line (without its newline): the trailer, then the hash, then the JSON.
pub fn parse(line: &[u8]) -> Result<Parsed, LineError> {
    let Some(split) = line.len().checked_sub(TRAILER_LEN) else {
        return Err(LineError::NoHash);
    };
    let (p, trailer) = line.split_at(split);
    let (key, rest) = trailer.split_at(HASH_KEY.len());
    let (hex, end) = rest.split_at(HEX_LEN);
    if key != HASH_KEY || end != LINE_END {
        return Err(LineError::NoHash);
    }
    let Some(stated) = RecordHash::from_hex(hex) else {
        return Err(LineError::NoHash);
    };
    if RecordHash::of(p) != stated {
        return Err(LineError::Altered);
    }
    let raw: RawRecord =
        serde_json::from_slice(line).map_err(|e| LineError::Malformed(e.to_string()))?;
    if raw.hash != stated {
        return Err(LineError::Malformed("two \"hash\" fields".into()));
    }
    let present = [
        (RecordKind::Open, raw.open.is_some()),
        (RecordKind::Rotate, raw.rotate.is_some()),
        (RecordKind::Event, raw.event.is_some()),
        (RecordKind::Control, raw.control.is_some()),
    ];
    for (kind, is_present) in present {
        if is_present != (kind == raw.kind) {
            return Err(LineError::Malformed(if is_present {
                format!("a {} record with a \"{kind}\" field", raw.kind)
            } else {
                format!("a {kind} record without its \"{kind}\" field")
            }));
        }
    }
    let (version, partial) = match (&raw.open, &raw.rotate) {
        (Some(o), _) => (Some(o.version), o.partial),
        (None, Some(r)) => (Some(r.version), r.partial),
        (None, None) => (None, None),
    };
    if let Some(v) = version.filter(|v| *v != FORMAT_VERSION) {
        return Err(LineError::Malformed(format!(
            "format version {v}; this agentd reads version {FORMAT_VERSION}"
        )));
    }
    let signed = match &raw.control {
        Some(control) => signed_decision(control, &raw.ts)?,
        None => None,
    };
    Ok(Parsed {
        seq: raw.seq,
        prev: raw.prev,
        hash: stated,
        kind: raw.kind,
        partial,
        signed,
    })
}

/// The signature of a `control` body to check, if it is a signed decision.
fn signed_decision(
    control: &serde_json::Map<String, serde_json::Value>,
    ts: &str,
) -> Result<Option<SignedDecision>, LineError> {
    let decision = match control.get("action").and_then(serde_json::Value::as_str) {
        Some("approve") => Decision::Allow,
        Some("deny") => Decision::Deny,
        // Other actions carry no signature; an unknown action is a later agentd's.
        Some(_) | None => return Ok(None),
    };
    let Some(detail) = control.get("detail").and_then(serde_json::Value::as_object) else {
        return Ok(None);
    };
    if !detail.contains_key("signature") {
        return Ok(None);
    }
    let text = |name: &str| match detail.get(name) {
        None => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(LineError::Malformed(format!(
            "a signed decision whose \"{name}\" is not a string"
        ))),
    };
    let required = |name: &str| {
        text(name)?.ok_or_else(|| {
            LineError::Malformed(format!("a signed decision without its \"{name}\""))
        })
    };
    Ok(Some(SignedDecision {
        decision,
        ts: ts.to_owned(),
        request: text("request")?,
        message: required("message")?,
        signature: required("signature")?,
        key: required("key")?,
        fingerprint: text("fingerprint")?,
    }))
}

/// An incremental SHA-256, for remnants that span several lines.
#[derive(Debug, Clone, Default)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub fn finish(self) -> RecordHash {
        RecordHash::from_hasher(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Kind, Layer, Verdict};

    fn event() -> Event {
        Event::new("a-1", 7, "sh", Kind::Exec, Verdict::Allow, Layer::Kernel)
            .with("argv", "sh -c x")
    }

    #[test]
    fn encoded_lines_parse_back_and_hash_their_prefix() {
        let e = event();
        let (line, hash) = encode(
            3,
            "2026-01-01T00:00:00.000000000Z",
            RecordHash::GENESIS,
            Body::Event(&e),
        )
        .unwrap();
        let text = std::str::from_utf8(&line).unwrap();
        assert!(
            text.starts_with(
                "{\"seq\":3,\"ts\":\"2026-01-01T00:00:00.000000000Z\",\"prev\":\"0000"
            )
        );
        assert!(text.ends_with(&format!(",\"hash\":\"{hash}\"}}")));
        let prefix = &line[..line.len() - TRAILER_LEN];
        assert_eq!(RecordHash::of(prefix), hash);
        // The line is plain JSON that names its kind and carries the event as is.
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["kind"], "event");
        assert_eq!(
            serde_json::from_value::<Event>(v["event"].clone()).unwrap(),
            e
        );
        let p = parse(&line).unwrap();
        assert_eq!(
            (p.seq, p.prev, p.hash, p.kind),
            (3, RecordHash::GENESIS, hash, RecordKind::Event)
        );
    }

    #[test]
    fn hashes_are_strict_lowercase_hex() {
        let h = RecordHash::of(b"x");
        let s = h.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<RecordHash>().unwrap(), h);
        assert_eq!(format!("{h:#}"), format!("{}…", &s[..16]));
        assert!(s.to_uppercase().parse::<RecordHash>().is_err());
        assert!(s[1..].parse::<RecordHash>().is_err());
        assert!(format!("{s}0").parse::<RecordHash>().is_err());
    }

    #[test]
    fn strict_parsing_refuses_what_a_writer_never_writes() {
        // Valid hashes over content the writer would not produce: still refused.
        let rehash = |p: &str| {
            let h = RecordHash::of(p.as_bytes());
            format!("{p},\"hash\":\"{h}\"}}")
        };
        let zero = RecordHash::GENESIS;
        let cases = [
            (
                format!(
                    "{{\"seq\":1,\"ts\":\"t\",\"prev\":\"{zero}\",\"kind\":\"event\",\"control\":{{}}"
                ),
                "without its \"event\"",
            ),
            (
                format!(
                    "{{\"seq\":1,\"ts\":\"t\",\"prev\":\"{zero}\",\"kind\":\"event\",\"event\":{{}},\"extra\":1"
                ),
                "unknown field",
            ),
            (
                format!(
                    "{{\"seq\":1,\"ts\":\"t\",\"prev\":\"{zero}\",\"kind\":\"open\",\"open\":{{\"version\":9,\"pid\":1}}"
                ),
                "format version 9",
            ),
            (
                format!(
                    "{{\"seq\":1,\"ts\":\"t\",\"prev\":\"{zero}\",\"kind\":\"event\",\"event\":[]"
                ),
                "invalid type",
            ),
            (
                format!(
                    "{{\"seq\":1,\"ts\":\"t\",\"prev\":\"{zero}\",\"kind\":\"event\",\"event\":{{}},\"hash\":\"{zero}\""
                ),
                "duplicate field",
            ),
        ];
        for (p, want) in cases {
            match parse(rehash(&p).as_bytes()) {
                Err(LineError::Malformed(m)) => assert!(m.contains(want), "{p}: {m}"),
                other => panic!("{p}: {other:?}"),
            }
        }
        assert_eq!(parse(b""), Err(LineError::NoHash));
        assert_eq!(parse(b"{\"seq\":1}"), Err(LineError::NoHash));
    }
}
