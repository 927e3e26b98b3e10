//! What the daemon offers beside its control socket, each off until asked for: Prometheus
//! metrics (`--metrics`), a live web view (`--ui`), and its events sent to syslog
//! (`--syslog`) and to an OpenTelemetry collector (`--otlp`).

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr};

use anyhow::Context as _;

/// The daemon's outputs, as `agentd daemon` takes them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Outputs {
    /// Serve Prometheus metrics at /metrics on this address: a port (loopback), an
    /// ADDR:PORT, or unix:PATH (a socket only root and --group may connect to)
    #[arg(long, value_name = "[ADDR:]PORT|unix:PATH", help_heading = "Outputs")]
    pub metrics: Option<Listen>,
    /// Serve the live web view on this address: a port (loopback) or ADDR:PORT; `agentd
    /// ui-url` prints the address with an access token
    #[arg(long, value_name = "[ADDR:]PORT", help_heading = "Outputs")]
    pub ui: Option<Listen>,
    /// Send events to syslog as RFC 5424 records with structured data: unix:PATH (a
    /// datagram socket, e.g. unix:/dev/log), udp:HOST:PORT or tcp:HOST:PORT (octet-counted,
    /// RFC 6587); see docs/export.md
    #[arg(long, value_name = "TARGET", help_heading = "Outputs")]
    pub syslog: Option<crate::export::syslog::Target>,
    /// Only events of these kinds go to syslog (e.g. exec,net_connect,breaker; default: all)
    #[arg(long, value_name = "KIND,...", value_delimiter = ',', value_parser = crate::export::parse_kind, help_heading = "Outputs")]
    pub syslog_kinds: Vec<crate::event::Kind>,
    /// Only events with these verdicts go to syslog (allow, deny, killed, none; default:
    /// all)
    #[arg(long, value_name = "VERDICT,...", value_delimiter = ',', value_parser = crate::export::parse_verdict, help_heading = "Outputs")]
    pub syslog_verdicts: Vec<crate::event::Verdict>,
    /// The syslog facility of the records: authpriv (private security messages; Debian's
    /// rsyslog writes them to /var/log/auth.log), daemon, auth, user or local0-local7
    #[arg(
        long,
        value_enum,
        default_value_t,
        value_name = "FACILITY",
        hide_possible_values = true,
        help_heading = "Outputs"
    )]
    pub syslog_facility: crate::export::syslog::Facility,
    /// Export events as OpenTelemetry logs (OTLP/HTTP, JSON encoding) to this collector
    /// URL, e.g. http://127.0.0.1:4318/v1/logs (plain HTTP: https is refused, use a local
    /// collector); see docs/export.md
    #[arg(long, value_name = "URL", help_heading = "Outputs")]
    pub otlp: Option<crate::export::otlp::Endpoint>,
    /// Only events of these kinds go to the collector (default: all)
    #[arg(long, value_name = "KIND,...", value_delimiter = ',', value_parser = crate::export::parse_kind, help_heading = "Outputs")]
    pub otlp_kinds: Vec<crate::event::Kind>,
    /// Only events with these verdicts go to the collector (default: all)
    #[arg(long, value_name = "VERDICT,...", value_delimiter = ',', value_parser = crate::export::parse_verdict, help_heading = "Outputs")]
    pub otlp_verdicts: Vec<crate::event::Verdict>,
}

/// Where an HTTP output listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Listen, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path, e.g. unix:/run/agentd/metrics.sock".into());
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        if let Ok(port) = s.parse::<u16>() {
            return Ok(Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
        }
        s.parse::<SocketAddr>().map(Listen::Tcp).map_err(|_| {
            format!(
                "`{s}` is not a listening address: give a port (9464, on loopback), an \
                 ADDR:PORT (127.0.0.1:9464, [::1]:9464) or unix:PATH"
            )
        })
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "http://{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Binds `listen` and serves `app` on it until the daemon stops. A unix socket is made
/// reachable by root and `group_gid` only (as the control socket is).
pub(super) async fn serve(
    listen: &Listen,
    app: axum::Router,
    what: &str,
    group_gid: Option<u32>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let what = what.to_owned();
    match listen {
        Listen::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("{what}: binding {addr}"))?;
            Ok(tokio::spawn(async move {
                if let Err(e) = axum::serve(l, app).await {
                    eprintln!("agentd daemon: {what}: {e}");
                }
            }))
        }
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("{what}: binding {}", path.display()))?;
            super::restrict_socket(path, group_gid)
                .with_context(|| format!("{what}: {}", path.display()))?;
            Ok(tokio::spawn(async move {
                if let Err(e) = axum::serve(l, app).await {
                    eprintln!("agentd daemon: {what}: {e}");
                }
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_alone_listens_on_loopback() {
        assert_eq!(
            "9464".parse::<Listen>(),
            Ok(Listen::Tcp("127.0.0.1:9464".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:80".parse::<Listen>(),
            Ok(Listen::Tcp("[::1]:80".parse().unwrap()))
        );
        assert_eq!(
            "unix:/run/m.sock".parse::<Listen>(),
            Ok(Listen::Unix("/run/m.sock".into()))
        );
        let e = "localhost:80".parse::<Listen>().unwrap_err();
        assert!(e.contains("ADDR:PORT"), "{e}");
        assert!("unix:".parse::<Listen>().is_err());
    }
}
