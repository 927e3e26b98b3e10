//! The one event type: whatever produced it (the supervisor, a BPF program, the breaker),
//! an event is decoded once into [`Event`] and shared by `run --events`, the breaker, the
//! audit log and the daemon. Serialised as one JSON object per line.

use std::{
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Wall-clock time, RFC 3339 with nanoseconds, UTC.
    pub ts: String,
    /// CLOCK_MONOTONIC nanoseconds at the kernel decision, for latency figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ktime_ns: Option<u64>,
    /// Agent id.
    pub agent: String,
    pub pid: u32,
    pub comm: String,
    pub kind: Kind,
    pub verdict: Verdict,
    /// The mechanism that decided.
    pub layer: Layer,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Second path: the destination of rename, link and symlink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path2: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    /// The DNS name: of a `dns` query, or the one a connection's address was admitted for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// The errno the operation failed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    /// Kind-specific details: exit status, signal, breaker rule, lost-event count...
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub detail: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The agent's first process started.
    Start,
    /// The agent's first process ended (`detail.code` or `detail.signal`).
    Exit,
    /// agentd could not launch the agent (`detail.reason`).
    LaunchFailed,
    /// A limit was reached (`detail.limit`: wall_time, pids, memory).
    Limit,
    Exec,
    #[serde(rename = "process_start")]
    Fork,
    #[serde(rename = "process_exit")]
    ProcessExit,
    #[serde(rename = "file_write")]
    OpenWrite,
    /// A refused open for reading (a file, a directory listing, an `O_PATH` open).
    #[serde(rename = "file_read")]
    OpenRead,
    /// A signal the agent was refused (`detail.target`, `detail.signal`).
    #[serde(rename = "process_signal")]
    Signal,
    #[serde(rename = "file_unlink")]
    Unlink,
    #[serde(rename = "file_rename")]
    Rename,
    #[serde(rename = "file_mkdir")]
    Mkdir,
    #[serde(rename = "file_rmdir")]
    Rmdir,
    #[serde(rename = "file_link")]
    Link,
    #[serde(rename = "file_symlink")]
    Symlink,
    #[serde(rename = "file_chmod")]
    Chmod,
    #[serde(rename = "file_chown")]
    Chown,
    #[serde(rename = "file_truncate")]
    Truncate,
    #[serde(rename = "file_setxattr")]
    Setxattr,
    #[serde(rename = "net_connect")]
    Connect,
    #[serde(rename = "net_send")]
    Sendmsg,
    #[serde(rename = "net_bind")]
    Bind,
    #[serde(rename = "net_socket")]
    Socket,
    /// A canary was opened, in any mode.
    Canary,
    /// The circuit breaker tripped (`detail.rule`, `detail.trigger`, `detail.contain_ns`).
    Breaker,
    /// An inbound TCP connection to a port the profile does not let the agent bind,
    /// dropped by the cgroup ingress program (`port` local, `addr` the peer's).
    #[serde(rename = "net_accept")]
    Accept,
    /// Events the kernel could not deliver (`detail.count`).
    Lost,
    /// A DNS query of the agent, answered by agentd's resolver (`domain`; `detail.type`,
    /// `detail.rcode`, `detail.answers`, `detail.ttl`; `detail.reason` when refused).
    Dns,
    /// A refused call of the ones the watch sees at their exit only (`detail.syscall`;
    /// `errno`): the dangerous calls the seccomp filter refuses, and refused sockets.
    Syscall,
    /// The agent's workspace transaction when it ended (`detail.state`: pending,
    /// committed, discarded; `detail.files`, `detail.bytes`, `detail.conflicts`).
    Transaction,
    /// A call matching an ask rule is held for a person (`detail.request`, `detail.what`,
    /// `detail.chain`, `detail.timeout_s`; the destination or `path`).
    Ask,
    /// How a held call ended (`verdict` allow or deny; `detail.request`, `detail.via`,
    /// `detail.by_uid`, `detail.waited_ms`, `detail.scope` or `detail.reason`,
    /// `detail.signed_by` when signed). A denial is a breaker violation (`denied`).
    Approval,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
    /// Denied because the breaker had tripped.
    Killed,
    /// Nothing was decided (start, exit, informational).
    None,
}

impl Kind {
    /// The kind as in the JSON (`net_connect`, `file_write`, ...).
    pub fn name(self) -> String {
        wire_name(self)
    }
}

impl Verdict {
    /// The verdict as in the JSON: `allow`, `deny`, `killed` or `none`.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Killed => "killed",
            Verdict::None => "none",
        }
    }
}

impl Layer {
    /// The layer as in the JSON (`landlock`, `bpf-lsm`, ...).
    pub fn name(self) -> String {
        wire_name(self)
    }
}

/// The name a unit variant has in the JSON form.
fn wire_name(v: impl Serialize) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layer {
    /// agentd's own supervisor (launch, exit, limits, breaker).
    Agentd,
    Landlock,
    Seccomp,
    /// A cgroup BPF program.
    Bpf,
    BpfLsm,
    /// Seen by a tracepoint; the verdict is the syscall's own result (ENOENT, a real
    /// cross-device rename, a busy file...).
    Kernel,
    /// The file's permissions refused it (owner, group and mode bits for the agent's
    /// identity), before any layer of agentd's was asked: not a violation of the profile.
    Permission,
    /// agentd's resolver: the names the profile allows, and the addresses it admits.
    Resolver,
    /// The agent's own view of the filesystem (its mount namespace): a protected path's
    /// read-only mount (EROFS), its pinned ancestors (EBUSY), a link or rename across its
    /// mounts (EXDEV), the private read-only /run.
    View,
    /// agentd's hold of a call an ask rule matches (seccomp user notification), and the
    /// person's answer.
    Ask,
}

/// Detail key: the kernel tripped the agent's breaker in the call this event reports
/// (the calling process was killed before the call returned; the kill flag is set).
pub const TRIPPED_IN_KERNEL: &str = "tripped_in_kernel";
/// Detail key: the kernel stopped the calling process before its refused call returned,
/// for the breaker to decide (kill the agent, or resume the process).
pub const HELD: &str = "held";

impl Event {
    /// Whether the kernel stopped the calling process for the breaker to decide.
    pub fn held(&self) -> bool {
        self.detail.get(HELD).and_then(serde_json::Value::as_bool) == Some(true)
    }

    /// Whether the kernel already tripped the breaker on this event.
    pub fn tripped_in_kernel(&self) -> bool {
        self.detail
            .get(TRIPPED_IN_KERNEL)
            .and_then(serde_json::Value::as_bool)
            == Some(true)
    }

    /// An event stamped now, with no kind-specific fields.
    pub fn new(
        agent: &str,
        pid: u32,
        comm: &str,
        kind: Kind,
        verdict: Verdict,
        layer: Layer,
    ) -> Event {
        Event {
            ts: rfc3339_now(),
            ktime_ns: None,
            agent: agent.to_owned(),
            pid,
            comm: comm.to_owned(),
            kind,
            verdict,
            layer,
            path: None,
            path2: None,
            addr: None,
            port: None,
            proto: None,
            domain: None,
            errno: None,
            detail: serde_json::Map::new(),
        }
    }

    /// Adds a `detail` entry.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Event {
        self.detail.insert(key.to_owned(), value.into());
        self
    }

    /// The kind as in the JSON (`net_connect`, `file_write`, ...).
    pub fn kind_name(&self) -> String {
        self.kind.name()
    }

    /// Whether a person watching should see it: a refusal, a kill or a breaker trip.
    pub fn stands_out(&self) -> bool {
        matches!(self.verdict, Verdict::Deny | Verdict::Killed) || self.kind == Kind::Breaker
    }

    /// One readable line: time, verdict, kind, target, process, layer and errno, agent.
    /// With `color`, refusals are red and breaker trips bold red on a terminal.
    pub fn line(&self, color: bool) -> String {
        let time = self.ts.get(11..23).unwrap_or(&self.ts);
        let verdict = match self.verdict {
            Verdict::Allow => "allow",
            Verdict::Deny => "DENY",
            Verdict::Killed => "KILLED",
            Verdict::None => "-",
        };
        let target = self.target();
        let layer = self.layer_name();
        let errno = self
            .errno
            .map(|e| format!(" {:?}", nix::errno::Errno::from_raw(e)))
            .unwrap_or_default();
        let text = format!(
            "{time} {verdict:<6} {:<13} {target}  {}[{}]  {layer}{errno}  {}",
            self.kind_name(),
            self.comm,
            self.pid,
            self.agent
        );
        if !color {
            return text;
        }
        if self.kind == Kind::Breaker {
            format!("\x1b[1;31m{text}\x1b[0m")
        } else if self.stands_out() {
            format!("\x1b[31m{text}\x1b[0m")
        } else {
            format!("\x1b[2m{text}\x1b[0m")
        }
    }

    /// What the event is about: its path(s), its address (and the name it was admitted
    /// for), the name asked, or the rule, call or reason.
    pub fn target(&self) -> String {
        let what = self.what();
        match (&self.domain, self.kind) {
            (Some(d), Kind::Dns) => {
                let t = self.detail.get("type").and_then(|v| v.as_str());
                t.map_or_else(|| d.clone(), |t| format!("{d} {t}"))
            }
            (Some(d), _) => format!("{what} ({d})"),
            (None, _) => what,
        }
    }

    fn what(&self) -> String {
        match (&self.path, self.addr, self.port) {
            (Some(p), _, _) => match &self.path2 {
                Some(p2) => format!("{p} -> {p2}"),
                None => p.clone(),
            },
            (None, Some(a), Some(port)) => format!(
                "{a}:{port}{}",
                self.proto
                    .as_deref()
                    .map(|p| format!("/{p}"))
                    .unwrap_or_default()
            ),
            (None, Some(a), None) => a.to_string(),
            (None, None, _) => self
                .detail
                .get("rule")
                .or_else(|| self.detail.get("syscall"))
                .or_else(|| self.detail.get("reason"))
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned(),
        }
    }

    /// The layer's name, as in the JSON form (`landlock`, `bpf`, ...).
    pub fn layer_name(&self) -> String {
        self.layer.name()
    }
}

/// Now, as RFC 3339 UTC with nanoseconds.
pub fn rfc3339_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs(), d.subsec_nanos())
}

/// Unix seconds + nanoseconds as `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
pub fn rfc3339(secs: u64, nanos: u32) -> String {
    format!("{}.{nanos:09}Z", date_time(secs))
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`: a time shown to people (an expiry), to the
/// second.
pub fn rfc3339_secs(secs: u64) -> String {
    format!("{}Z", date_time(secs))
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SS` (UTC).
fn date_time(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 -> (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(rfc3339(1_795_478_399, 0), "2026-11-23T23:59:59.000000000Z");
        assert_eq!(rfc3339_secs(1_795_478_399), "2026-11-23T23:59:59Z");
    }

    #[test]
    fn events_serialise_as_flat_json() {
        let e =
            Event::new("a1", 42, "sh", Kind::Exit, Verdict::None, Layer::Agentd).with("code", 3);
        assert!(!e.stands_out());
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["kind"], "exit");
        assert_eq!(v["layer"], "agentd");
        assert_eq!(v["detail"]["code"], 3);
        assert!(v.get("path").is_none());
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
        let v = serde_json::to_value(Event::new(
            "a1",
            42,
            "sh",
            Kind::Syscall,
            Verdict::Deny,
            Layer::Seccomp,
        ))
        .unwrap();
        assert_eq!(v["kind"], "syscall");
        assert_eq!(v["layer"], "seccomp");
    }

    #[test]
    fn names_are_the_json_ones() {
        for v in [
            Verdict::Allow,
            Verdict::Deny,
            Verdict::Killed,
            Verdict::None,
        ] {
            assert_eq!(serde_json::to_value(v).unwrap(), v.name(), "{v:?}");
        }
        assert_eq!(Kind::Connect.name(), "net_connect");
        assert_eq!(Layer::BpfLsm.name(), "bpf-lsm");
    }

    #[test]
    fn names_show_in_the_target_of_dns_and_connect_events() {
        let mut q =
            Event::new("a1", 0, "", Kind::Dns, Verdict::Deny, Layer::Resolver).with("type", "AAAA");
        q.domain = Some("other.test".into());
        assert_eq!(q.target(), "other.test AAAA");
        let json = serde_json::to_value(&q).unwrap();
        assert_eq!(json["domain"], "other.test");
        assert_eq!(json["layer"], "resolver");
        assert_eq!(json["kind"], "dns");
        let mut c = Event::new("a1", 9, "curl", Kind::Connect, Verdict::Allow, Layer::Bpf);
        c.addr = Some("127.0.0.2".parse().unwrap());
        c.port = Some(443);
        c.proto = Some("tcp".into());
        c.domain = Some("allowed.test".into());
        assert_eq!(c.target(), "127.0.0.2:443/tcp (allowed.test)");
        c.domain = None;
        assert_eq!(c.target(), "127.0.0.2:443/tcp");
        assert!(serde_json::to_value(&c).unwrap().get("domain").is_none());
    }

    #[test]
    fn a_denial_is_one_readable_line() {
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
        assert!(e.stands_out());
        assert_eq!(
            e.line(false),
            "21:41:21.362 DENY   net_connect   127.0.0.1:8080/tcp  python3[42]  bpf EPERM  analyze-only-1"
        );
        assert!(e.line(true).starts_with("\x1b[31m"));
    }
}
