//! Events as OpenTelemetry logs, OTLP/HTTP with JSON encoding: batches POSTed to a
//! collector as an `ExportLogsServiceRequest`, in the proto3 JSON mapping the OTLP
//! specification fixes (lowerCamelCase field names, 64-bit integers as decimal strings,
//! enums as integers). Failed posts are retried with exponential backoff (connection
//! errors, 429 and 5xx; `Retry-After` in seconds is honoured) for up to
//! [`super::GIVE_UP`], then the batch is counted as failed.

use std::{
    fmt,
    str::FromStr,
    sync::{
        Arc,
        atomic::Ordering,
        mpsc::{Receiver, RecvTimeoutError},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use super::{AgentInfo, Backoff, Counters, GIVE_UP, Outgoing, Severity, UserNames};
use crate::event::Event;

/// Records in one request at most.
pub const BATCH_MAX: usize = 512;
/// How long the first record of a batch waits for others before the batch is sent.
pub const BATCH_WAIT: Duration = Duration::from_secs(1);
/// How long one request may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The path a collector's OTLP/HTTP receiver takes logs on, when the URL has none.
const LOGS_PATH: &str = "/v1/logs";
/// At most this many bytes of `agentd.path`, `agentd.path2` and each string in
/// `agentd.detail` (a whole path: Linux's PATH_MAX); longer ones are cut and marked
/// ([`super::cut`]). Attributes carry the exact text otherwise (JSON escapes it).
pub const VALUE_MAX: usize = 4096;
/// `agentd.detail` as compact JSON at most: entries that would not fit are left out, and
/// `truncated` says how many.
pub const DETAIL_MAX: usize = 8192;

/// Where records go: an http:// URL (plain HTTP: the client has no TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    url: String,
}

impl Endpoint {
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Endpoint, String> {
        let scheme = s
            .split_once("://")
            .map(|(scheme, _)| scheme.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "OTLP endpoint `{s}`: https is not supported: agentd's OTLP client has no \
                     TLS; send to a collector on this host (e.g. \
                     http://127.0.0.1:4318/v1/logs) and let it forward over TLS"
                ));
            }
            _ => {
                return Err(format!(
                    "OTLP endpoint `{s}`: not an http:// URL, e.g. http://127.0.0.1:4318/v1/logs"
                ));
            }
        }
        let uri: ureq::http::Uri = s
            .parse()
            .map_err(|e| format!("OTLP endpoint `{s}`: {e}, e.g. http://127.0.0.1:4318/v1/logs"))?;
        let Some(authority) = uri.authority() else {
            return Err(format!(
                "OTLP endpoint `{s}`: no host, e.g. http://127.0.0.1:4318/v1/logs"
            ));
        };
        if authority.as_str().contains('@') {
            return Err(format!(
                "OTLP endpoint `{s}`: credentials in the URL are not supported (they would \
                 show in logs and `ps`); use a local collector that adds them"
            ));
        }
        if authority.host().is_empty() {
            return Err(format!(
                "OTLP endpoint `{s}`: no host, e.g. http://127.0.0.1:4318/v1/logs"
            ));
        }
        // The URL parser takes any digits after the host; a send could not.
        if let Some(port) = authority
            .as_str()
            .get(authority.host().len()..)
            .and_then(|rest| rest.strip_prefix(':'))
            && !matches!(port.parse::<u16>(), Ok(1..))
        {
            return Err(format!(
                "OTLP endpoint `{s}`: `{port}` is not a port (1-65535), e.g. \
                 http://127.0.0.1:4318/v1/logs"
            ));
        }
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("" | "/") => LOGS_PATH,
            Some(p) => p,
        };
        Ok(Endpoint {
            url: format!("http://{authority}{path}"),
        })
    }
}

// The OTLP logs request, as the proto3 JSON mapping writes it
// (opentelemetry/proto/collector/logs/v1/logs_service.proto and the messages it uses).
// Fields left at their default value are left out, as the mapping's canonical form does.

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportLogsServiceRequest {
    pub resource_logs: Vec<ResourceLogs>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceLogs {
    pub resource: Resource,
    pub scope_logs: Vec<ScopeLogs>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Resource {
    pub attributes: Vec<KeyValue>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScopeLogs {
    pub scope: InstrumentationScope,
    pub log_records: Vec<LogRecord>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstrumentationScope {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LogRecord {
    /// fixed64 nanoseconds since the epoch: a decimal string.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_unix_nano: Option<String>,
    pub observed_time_unix_nano: String,
    /// The `SeverityNumber` enum, as its integer.
    pub severity_number: i32,
    pub severity_text: String,
    pub body: AnyValue,
    pub attributes: Vec<KeyValue>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyValue {
    pub key: String,
    pub value: AnyValue,
}

/// `AnyValue`: one of its fields, or none (an empty value).
#[derive(Debug, Clone, Serialize)]
pub struct AnyValue {
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

/// The field of `AnyValue` that is set (the proto's `oneof value`).
#[derive(Debug, Clone, Serialize)]
pub enum Value {
    #[serde(rename = "stringValue")]
    String(String),
    #[serde(rename = "boolValue")]
    Bool(bool),
    /// int64: a decimal string.
    #[serde(rename = "intValue")]
    Int(String),
    #[serde(rename = "doubleValue")]
    Double(f64),
    #[serde(rename = "arrayValue")]
    Array(ArrayValue),
    #[serde(rename = "kvlistValue")]
    Kvlist(KeyValueList),
}

#[derive(Debug, Clone, Serialize)]
pub struct ArrayValue {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<AnyValue>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyValueList {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<KeyValue>,
}

impl AnyValue {
    fn of(v: Value) -> AnyValue {
        AnyValue { value: Some(v) }
    }
    fn string(s: impl Into<String>) -> AnyValue {
        AnyValue::of(Value::String(s.into()))
    }
    fn int(i: impl Into<i64>) -> AnyValue {
        AnyValue::of(Value::Int(i.into().to_string()))
    }

    /// A JSON value of an event's `detail`, as the like value (objects as key-value
    /// lists; integers beyond int64 as strings; null as an empty value).
    fn from_json(v: &serde_json::Value) -> AnyValue {
        match v {
            serde_json::Value::Null => AnyValue { value: None },
            serde_json::Value::Bool(b) => AnyValue::of(Value::Bool(*b)),
            serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => AnyValue::int(i),
                (None, Some(f)) if !n.is_u64() => AnyValue::of(Value::Double(f)),
                _ => AnyValue::string(n.to_string()),
            },
            serde_json::Value::String(s) => AnyValue::string(s.clone()),
            serde_json::Value::Array(a) => AnyValue::of(Value::Array(ArrayValue {
                values: a.iter().map(AnyValue::from_json).collect(),
            })),
            serde_json::Value::Object(o) => AnyValue::of(Value::Kvlist(KeyValueList {
                values: o
                    .iter()
                    .map(|(k, v)| KeyValue {
                        key: k.clone(),
                        value: AnyValue::from_json(v),
                    })
                    .collect(),
            })),
        }
    }
}

fn kv(key: &str, value: AnyValue) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value,
    }
}

/// The resource every record comes from: this daemon on this host.
pub fn resource(hostname: &str) -> Resource {
    let mut attributes = vec![
        kv("service.name", AnyValue::string("agentd")),
        kv(
            "service.version",
            AnyValue::string(env!("CARGO_PKG_VERSION")),
        ),
        kv("process.pid", AnyValue::int(std::process::id())),
    ];
    if hostname != "-" {
        attributes.push(kv("host.name", AnyValue::string(hostname)));
    }
    Resource { attributes }
}

/// `ev` as a log record, with whose agent it is of (`agent`, and its owner's name when it
/// has one); `observed` is when the exporter took it (ns since the epoch).
pub fn record(
    ev: &Event,
    agent: Option<&AgentInfo>,
    owner_name: Option<&str>,
    observed: u128,
) -> LogRecord {
    let severity = Severity::of(ev);
    let short = |s: &str| AnyValue::string(super::cut(s, super::SHORT_MAX, char::len_utf8));
    let long = |s: &str| AnyValue::string(super::cut(s, VALUE_MAX, char::len_utf8));
    let mut attributes = vec![kv("agentd.agent", short(&ev.agent))];
    if let Some(a) = agent {
        attributes.push(kv("agentd.profile", short(&a.profile)));
        attributes.push(kv("agentd.owner_uid", AnyValue::int(a.owner_uid)));
        // The semantic conventions' user: the person the agent acts for (`user.id` is a
        // string there).
        attributes.push(kv("user.id", AnyValue::string(a.owner_uid.to_string())));
        if let Some(name) = owner_name {
            attributes.push(kv("user.name", short(name)));
        }
    }
    attributes.extend([
        kv("agentd.kind", AnyValue::string(ev.kind_name())),
        kv("agentd.verdict", AnyValue::string(ev.verdict.name())),
        kv("agentd.layer", AnyValue::string(ev.layer_name())),
        kv("agentd.pid", AnyValue::int(ev.pid)),
        kv("agentd.comm", short(&ev.comm)),
    ]);
    if let Some(p) = &ev.path {
        attributes.push(kv("agentd.path", long(p)));
    }
    if let Some(p) = &ev.path2 {
        attributes.push(kv("agentd.path2", long(p)));
    }
    if let Some(a) = ev.addr {
        attributes.push(kv("agentd.addr", AnyValue::string(a.to_string())));
    }
    if let Some(p) = ev.port {
        attributes.push(kv("agentd.port", AnyValue::int(p)));
    }
    if let Some(p) = &ev.proto {
        attributes.push(kv("agentd.proto", short(p)));
    }
    if let Some(d) = &ev.domain {
        attributes.push(kv("agentd.domain", short(d)));
    }
    if let Some(e) = ev.errno {
        attributes.push(kv("agentd.errno", AnyValue::int(e)));
    }
    if !ev.detail.is_empty() {
        let detail = super::cut_strings(&serde_json::Value::Object(ev.detail.clone()), VALUE_MAX);
        let detail = match detail {
            serde_json::Value::Object(d) => super::detail_within(&d, DETAIL_MAX, str::len),
            serde_json::Value::Null
            | serde_json::Value::Bool(_)
            | serde_json::Value::Number(_)
            | serde_json::Value::String(_)
            | serde_json::Value::Array(_) => serde_json::Map::new(),
        };
        let detail = serde_json::Value::Object(detail);
        attributes.push(kv("agentd.detail", AnyValue::from_json(&detail)));
    }
    LogRecord {
        time_unix_nano: super::parse_ts(&ev.ts)
            .map(|(s, n)| (u128::from(s) * 1_000_000_000 + u128::from(n)).to_string()),
        observed_time_unix_nano: observed.to_string(),
        severity_number: severity.otel_number(),
        severity_text: severity.name().to_owned(),
        body: AnyValue::string(super::summary(ev)),
        attributes,
    }
}

/// One request carrying `records`.
pub fn request(resource: &Resource, records: Vec<LogRecord>) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: resource.clone(),
            scope_logs: vec![ScopeLogs {
                scope: InstrumentationScope {
                    name: "agentd".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                },
                log_records: records,
            }],
        }],
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// Starts the thread that batches what `rx` brings and posts it to `endpoint`.
pub(super) fn start(
    endpoint: Endpoint,
    rx: Receiver<Outgoing>,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    let resource = resource(&super::hostname());
    eprintln!("agentd daemon: otlp: exporting events to {endpoint}");
    let client: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(REQUEST_TIMEOUT))
        .max_redirects(0)
        // The collector is local (see docs/export.md): no proxy from the environment.
        .proxy(None)
        .user_agent(concat!("agentd/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let mut backoff = Backoff::new(format!("otlp {endpoint}"));
    std::thread::Builder::new()
        .name("agentd-otlp".into())
        .spawn(move || {
            let mut names = UserNames::default();
            while let Some(batch) = next_batch(&rx) {
                let n = batch.len() as u64;
                let observed = now_ns();
                let records = batch
                    .iter()
                    .map(|out| {
                        let agent = out.agent.as_deref();
                        let owner = agent.and_then(|a| names.of(a.owner_uid));
                        record(&out.event, agent, owner, observed)
                    })
                    .collect();
                let body = match serde_json::to_vec(&request(&resource, records)) {
                    Ok(b) => b,
                    Err(e) => {
                        backoff.gave_up(batch.len(), &e);
                        counters.failed.fetch_add(n, Ordering::Relaxed);
                        continue;
                    }
                };
                let rejected = post(&client, &endpoint, &body, &mut backoff, batch.len());
                let rejected = rejected.min(n);
                counters.sent.fetch_add(n - rejected, Ordering::Relaxed);
                counters.failed.fetch_add(rejected, Ordering::Relaxed);
            }
        })
        .map_err(|e| anyhow::anyhow!("otlp: starting its thread: {e}"))?;
    Ok(())
}

/// Waits for a record, then for more until [`BATCH_MAX`] or [`BATCH_WAIT`]; `None` when
/// the daemon is gone.
fn next_batch(rx: &Receiver<Outgoing>) -> Option<Vec<Outgoing>> {
    let first = rx.recv().ok()?;
    let until = Instant::now() + BATCH_WAIT;
    let mut batch = vec![first];
    while batch.len() < BATCH_MAX {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(ev) => batch.push(ev),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
    Some(batch)
}

/// What became of one attempt.
enum Outcome {
    /// 2xx: how many records the collector rejected (partial success).
    Accepted(u64),
    /// Worth another try after the wait (at least the backoff's).
    Retry(String, Option<Duration>),
    /// Refused for good (400, 401...).
    Refused(String),
}

/// Posts `body` (`records` records), again and again with backoff for up to
/// [`GIVE_UP`]; returns how many records did not arrive (all, after giving up).
fn post(
    client: &ureq::Agent,
    endpoint: &Endpoint,
    body: &[u8],
    backoff: &mut Backoff,
    records: usize,
) -> u64 {
    let deadline = Instant::now() + GIVE_UP;
    let all = records as u64;
    loop {
        let (error, asked) = match attempt(client, endpoint, body) {
            Outcome::Accepted(rejected) => {
                backoff.worked();
                return rejected;
            }
            Outcome::Refused(e) => {
                backoff.gave_up(records, &e);
                return all;
            }
            Outcome::Retry(e, asked) => (e, asked),
        };
        let wait = backoff.failed(&error).max(asked.unwrap_or_default());
        if Instant::now() + wait >= deadline {
            backoff.gave_up(records, &error);
            return all;
        }
        std::thread::sleep(wait);
    }
}

fn attempt(client: &ureq::Agent, endpoint: &Endpoint, body: &[u8]) -> Outcome {
    let mut resp = match client
        .post(endpoint.url())
        .header("Content-Type", "application/json")
        .send(body)
    {
        Ok(r) => r,
        Err(e) => return Outcome::Retry(format!("posting: {e}"), None),
    };
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(GIVE_UP.as_secs())));
    let text = resp
        .body_mut()
        .with_config()
        .limit(64 * 1024)
        .read_to_string()
        .unwrap_or_default();
    match status {
        200..=299 => Outcome::Accepted(rejected_records(&text)),
        429 | 500..=599 => Outcome::Retry(
            format!("the collector answered {status}: {}", snippet(&text)),
            retry_after,
        ),
        _ => Outcome::Refused(format!(
            "the collector answered {status}: {} (not retried)",
            snippet(&text)
        )),
    }
}

/// `partialSuccess.rejectedLogRecords` of an `ExportLogsServiceResponse` (0 when absent).
fn rejected_records(body: &str) -> u64 {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return 0;
    };
    match &v["partialSuccess"]["rejectedLogRecords"] {
        serde_json::Value::String(s) => s.parse().unwrap_or(0),
        serde_json::Value::Number(n) => n.as_u64().unwrap_or(0),
        serde_json::Value::Null
        | serde_json::Value::Bool(_)
        | serde_json::Value::Array(_)
        | serde_json::Value::Object(_) => 0,
    }
}

fn snippet(s: &str) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &one_line[..i]),
        None => one_line,
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Read as _, Write as _},
        net::TcpListener,
    };

    use serde_json::json;

    use super::*;
    use crate::event::{Kind, Layer, Verdict};

    #[test]
    fn endpoints_are_http_urls() {
        let e: Endpoint = "http://127.0.0.1:4318/v1/logs".parse().unwrap();
        assert_eq!(e.url(), "http://127.0.0.1:4318/v1/logs");
        let e: Endpoint = "HTTP://collector:4318".parse().unwrap();
        assert_eq!(e.url(), "http://collector:4318/v1/logs");
        let e: Endpoint = "http://[::1]:4318/".parse().unwrap();
        assert_eq!(e.to_string(), "http://[::1]:4318/v1/logs");
        let e = "https://otel.example:4318/v1/logs"
            .parse::<Endpoint>()
            .unwrap_err();
        assert!(
            e.contains("no TLS") && e.contains("http://127.0.0.1:4318"),
            "{e}"
        );
        for (bad, says) in [
            ("127.0.0.1:4318", "not an http:// URL"),
            ("grpc://127.0.0.1:4317", "not an http:// URL"),
            ("http://", "http://"),
            ("http://user:pw@127.0.0.1:4318/v1/logs", "credentials"),
            ("http://127.0.0.1:4318 /v1/logs", "e.g."),
        ] {
            let e = bad.parse::<Endpoint>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    fn denial() -> Event {
        let mut e = Event::new(
            "writer-1",
            42,
            "sh",
            Kind::OpenWrite,
            Verdict::Deny,
            Layer::Landlock,
        )
        .with("flags", "O_WRONLY|O_CREAT")
        .with("big", u64::MAX)
        .with("list", json!([1, 2.5, null, {"x": true}]));
        e.ts = "2026-11-23T21:41:21.362675057Z".into();
        e.path = Some("/etc/x".into());
        e.errno = Some(libc::EACCES);
        e
    }

    #[test]
    fn a_request_is_the_proto3_json_of_export_logs_service_request() {
        let agent = AgentInfo {
            owner_uid: 1000,
            profile: "writer".into(),
        };
        let req = request(
            &resource("host1"),
            vec![record(&denial(), Some(&agent), Some("alice"), 7)],
        );
        let v = serde_json::to_value(&req).unwrap();
        let rl = &v["resourceLogs"][0];
        let res = &rl["resource"]["attributes"];
        assert_eq!(
            res[0],
            json!({"key": "service.name", "value": {"stringValue": "agentd"}})
        );
        assert!(
            res.as_array()
                .unwrap()
                .contains(&json!({"key": "host.name", "value": {"stringValue": "host1"}})),
            "{res}"
        );
        let scope = &rl["scopeLogs"][0];
        assert_eq!(scope["scope"]["name"], "agentd");
        let r = &scope["logRecords"][0];
        assert_eq!(r["timeUnixNano"], "1795470081362675057");
        assert_eq!(r["observedTimeUnixNano"], "7");
        assert_eq!(r["severityNumber"], 13);
        assert_eq!(r["severityText"], "warning");
        assert_eq!(
            r["body"],
            json!({"stringValue": "DENY   file_write    /etc/x  sh[42]  landlock EACCES  writer-1"})
        );
        let attr = |k: &str| {
            r["attributes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["key"] == k)
                .map(|a| a["value"].clone())
                .unwrap_or_else(|| panic!("no {k} in {r}"))
        };
        assert_eq!(attr("agentd.agent"), json!({"stringValue": "writer-1"}));
        assert_eq!(attr("agentd.profile"), json!({"stringValue": "writer"}));
        assert_eq!(attr("agentd.owner_uid"), json!({"intValue": "1000"}));
        assert_eq!(attr("user.id"), json!({"stringValue": "1000"}));
        assert_eq!(attr("user.name"), json!({"stringValue": "alice"}));
        assert_eq!(attr("agentd.kind"), json!({"stringValue": "file_write"}));
        assert_eq!(attr("agentd.verdict"), json!({"stringValue": "deny"}));
        assert_eq!(attr("agentd.layer"), json!({"stringValue": "landlock"}));
        assert_eq!(attr("agentd.pid"), json!({"intValue": "42"}));
        assert_eq!(attr("agentd.errno"), json!({"intValue": "13"}));
        assert_eq!(attr("agentd.path"), json!({"stringValue": "/etc/x"}));
        assert_eq!(
            attr("agentd.detail"),
            json!({"kvlistValue": {"values": [
                {"key": "big", "value": {"stringValue": "18446744073709551615"}},
                {"key": "flags", "value": {"stringValue": "O_WRONLY|O_CREAT"}},
                {"key": "list", "value": {"arrayValue": {"values": [
                    {"intValue": "1"},
                    {"doubleValue": 2.5},
                    {},
                    {"kvlistValue": {"values": [{"key": "x", "value": {"boolValue": true}}]}},
                ]}}},
            ]}})
        );
        // No snake_case name anywhere: the proto3 JSON names are lowerCamelCase.
        fn keys(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(o) => {
                    for (k, v) in o {
                        out.push(k.clone());
                        keys(v, out);
                    }
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| keys(v, out)),
                serde_json::Value::Null
                | serde_json::Value::Bool(_)
                | serde_json::Value::Number(_)
                | serde_json::Value::String(_) => {}
            }
        }
        let mut all = Vec::new();
        keys(&v, &mut all);
        assert!(all.iter().all(|k| !k.contains('_')), "{all:?}");
    }

    #[test]
    fn the_body_is_escaped_and_long_values_are_cut() {
        let nasty = "/a\n\x1b\u{202e}é".repeat(3000);
        let mut e = denial().with("argv", json!([nasty.clone(), "ls"]));
        for i in 0..100 {
            e = e.with(&format!("z{i:03}"), "v".repeat(200));
        }
        e.path = Some(nasty.clone());
        e.agent = "x".repeat(1000);
        let agent = AgentInfo {
            owner_uid: 0,
            profile: nasty.clone(),
        };
        let r = serde_json::to_value(record(&e, Some(&agent), Some(&nasty), 1)).unwrap();
        let body = r["body"]["stringValue"].as_str().unwrap();
        assert!(body.len() <= super::super::MESSAGE_MAX, "{}", body.len());
        assert!(
            body.starts_with("DENY   file_write    /a\\u{a}\\u{1b}\\u{202e}é/a"),
            "{body}"
        );
        assert_eq!(crate::ask::printable(body), body);
        let attr = |k: &str| {
            r["attributes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["key"] == k)
                .map(|a| a["value"].clone())
                .unwrap()
        };
        // Attributes keep the exact text, cut.
        let path = attr("agentd.path")["stringValue"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(path.len() <= VALUE_MAX, "{}", path.len());
        let (kept, mark) = path.rsplit_once('…').unwrap();
        assert!(nasty.starts_with(kept) && kept.len() > VALUE_MAX - 16);
        assert_eq!(mark, format!("[+{}]", nasty.len() - kept.len()));
        let agent = attr("agentd.agent")["stringValue"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            agent.len() <= super::super::SHORT_MAX && agent.ends_with("…[+754]"),
            "{agent}"
        );
        for key in ["agentd.profile", "user.name"] {
            let v = attr(key)["stringValue"].as_str().unwrap().to_owned();
            assert!(
                v.len() <= super::super::SHORT_MAX
                    && nasty.starts_with(v.split('…').next().unwrap()),
                "{key}: {v}"
            );
        }
        let detail = &attr("agentd.detail")["kvlistValue"]["values"];
        let entry = |k: &str| {
            detail
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["key"] == k)
                .map(|a| a["value"].clone())
        };
        let argv = entry("argv").unwrap();
        let first = argv["arrayValue"]["values"][0]["stringValue"]
            .as_str()
            .unwrap();
        assert!(
            first.len() <= VALUE_MAX && first.contains('…'),
            "{}",
            first.len()
        );
        assert_eq!(argv["arrayValue"]["values"][1]["stringValue"], "ls");
        let left_out = entry("truncated").unwrap()["intValue"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(left_out.parse::<u32>().unwrap() > 50, "{left_out}");
        assert!(serde_json::to_string(detail).unwrap().len() < 2 * DETAIL_MAX);
    }

    #[test]
    fn partial_success_counts_rejected_records() {
        assert_eq!(rejected_records("{}"), 0);
        assert_eq!(rejected_records(""), 0);
        assert_eq!(
            rejected_records(r#"{"partialSuccess":{"rejectedLogRecords":"3"}}"#),
            3
        );
        assert_eq!(
            rejected_records(r#"{"partialSuccess":{"rejectedLogRecords":2}}"#),
            2
        );
    }

    /// A collector on a loopback port answering `statuses` in turn; returns its port and
    /// a channel of (content type, body) per request.
    fn collector(
        statuses: Vec<&'static str>,
    ) -> (u16, std::sync::mpsc::Receiver<(String, String)>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for status in statuses {
                let (c, _) = l.accept().unwrap();
                let mut r = BufReader::new(c);
                let mut len = 0;
                let mut ctype = String::new();
                loop {
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    let line = line.trim_end().to_ascii_lowercase();
                    if line.is_empty() {
                        break;
                    }
                    if let Some(v) = line.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if let Some(v) = line.strip_prefix("content-type:") {
                        ctype = v.trim().to_owned();
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                tx.send((ctype, String::from_utf8(body).unwrap())).unwrap();
                let mut c = r.into_inner();
                write!(
                    c,
                    "HTTP/1.1 {status}\r\nContent-Length: 2\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{{}}"
                )
                .unwrap();
            }
        });
        (port, rx)
    }

    #[test]
    fn a_503_is_retried_and_a_400_is_not() {
        let (port, got) = collector(vec!["503 Service Unavailable", "200 OK", "400 Bad Request"]);
        let endpoint: Endpoint = format!("http://127.0.0.1:{port}/v1/logs").parse().unwrap();
        let client: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .build()
            .into();
        let mut backoff = Backoff::new("otlp test".into());
        let started = Instant::now();
        assert_eq!(post(&client, &endpoint, b"{\"a\":1}", &mut backoff, 4), 0);
        assert!(started.elapsed() >= super::super::BACKOFF_FIRST);
        let (ctype, body) = got.recv().unwrap();
        assert_eq!(
            (ctype.as_str(), body.as_str()),
            ("application/json", "{\"a\":1}")
        );
        assert_eq!(got.recv().unwrap().1, "{\"a\":1}");
        assert_eq!(post(&client, &endpoint, b"{}", &mut backoff, 4), 4);
    }
}
