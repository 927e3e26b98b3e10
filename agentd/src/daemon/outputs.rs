//! What the daemon offers beside its control socket, each off until asked for: Prometheus
//! metrics (`--metrics`), a live web view (`--ui`), and its events sent to syslog
//! (`--syslog`) and to an OpenTelemetry collector (`--otlp`).

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::{extract::ConnectInfo, http::Request, serve::Listener};
use hyper::{body::Incoming, service::Service as _, service::service_fn};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::sync::Semaphore;

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

/// Connections one output serves at once. More wait in the kernel's listen backlog until
/// one closes: connections are accepted before any check, so a local user opening many
/// must not take the daemon's file descriptors.
pub(super) const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send a request's headers, counted from the connection's start
/// or the end of its previous response: a slow or idle connection is closed after it. A
/// response being sent (the web view's event stream) is not limited.
pub(super) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

// What a request on TCP carries in its extensions: `ConnectInfo<SocketAddr>` (the
// client's address), [`LocalAddr`] and [`Listening`].

/// Where a TCP output listens (its port as bound), for the checks of a request's `Host`
/// header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Listening(pub SocketAddr);

/// The server's end of a TCP connection: the address the client connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LocalAddr(pub SocketAddr);

/// What one output's connections may take.
#[derive(Debug, Clone, Copy)]
struct Limits {
    connections: usize,
    header_read: Duration,
}

const LIMITS: Limits = Limits {
    connections: MAX_CONNECTIONS,
    header_read: HEADER_READ_TIMEOUT,
};

/// Binds `listen` and serves `app` on it until the daemon stops. A unix socket is made
/// reachable by root and `group_gid` only (as the control socket is).
pub(super) async fn serve(
    listen: &Listen,
    app: axum::Router,
    what: &str,
    group_gid: Option<u32>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    Ok(match listen {
        Listen::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("{what}: binding {addr}"))?;
            let bound = l
                .local_addr()
                .with_context(|| format!("{what}: the address bound for {addr}"))?;
            tokio::spawn(run(l, app, LIMITS, Some(Listening(bound))))
        }
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("{what}: binding {}", path.display()))?;
            super::restrict_socket(path, group_gid)
                .with_context(|| format!("{what}: {}", path.display()))?;
            tokio::spawn(run(l, app, LIMITS, None))
        }
    })
}

/// Serves `app` on the connections `listener` accepts, `limits.connections` at a time.
async fn run<L>(mut listener: L, app: axum::Router, limits: Limits, listening: Option<Listening>)
where
    L: Listener,
    L::Io: Ends,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read);
    let slots = Arc::new(Semaphore::new(limits.connections));
    loop {
        // A free slot first: until one is, connections wait in the backlog.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        // (Accept errors are retried inside, after a pause when descriptors run out.)
        let (io, _) = listener.accept().await;
        let (local, peer) = io.tcp_ends();
        let router = TowerToHyperService::new(app.clone());
        let service = service_fn(move |mut req: Request<Incoming>| {
            let ext = req.extensions_mut();
            if let Some(peer) = peer {
                ext.insert(ConnectInfo(peer));
            }
            if let Some(local) = local {
                ext.insert(LocalAddr(local));
            }
            if let Some(l) = listening {
                ext.insert(l);
            }
            router.call(req)
        });
        let conn = http.serve_connection(TokioIo::new(io), service);
        tokio::spawn(async move {
            // A failed connection is the client's doing (a reset, a timeout): nothing for
            // the daemon's log.
            let _ = conn.await;
            drop(slot);
        });
    }
}

/// A connection's two ends, (local, peer), when it is a TCP one.
trait Ends {
    fn tcp_ends(&self) -> (Option<SocketAddr>, Option<SocketAddr>);
}

impl Ends for tokio::net::TcpStream {
    fn tcp_ends(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        (self.local_addr().ok(), self.peer_addr().ok())
    }
}

impl Ends for tokio::net::UnixStream {
    fn tcp_ends(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        (None, None)
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

    /// What one request on a new connection gets back (the server closes after it).
    async fn fetch(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn idle_connections_are_closed_and_those_past_the_cap_wait_their_turn() {
        use std::time::Instant;

        use axum::{Extension, body::Body, routing::get};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let app = axum::Router::new()
            .route(
                "/",
                get(
                    |ConnectInfo(peer): ConnectInfo<SocketAddr>,
                     Extension(LocalAddr(local)): Extension<LocalAddr>,
                     Extension(Listening(at)): Extension<Listening>| async move {
                        format!("from {} to {local} on {at}", peer.ip())
                    },
                ),
            )
            // Three parts 150 ms apart: longer than the header timeout.
            .route(
                "/slow",
                get(|| async {
                    let parts = futures_util::stream::unfold(0, |i| async move {
                        if i == 3 {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(150)).await;
                        Some((Ok::<_, std::convert::Infallible>(i.to_string()), i + 1))
                    });
                    Body::from_stream(parts)
                }),
            );
        let limits = Limits {
            connections: 2,
            header_read: Duration::from_millis(300),
        };
        let server = tokio::spawn(run(l, app, limits, Some(Listening(addr))));

        // Two connections that send nothing take both slots.
        let mut idle = [
            tokio::net::TcpStream::connect(addr).await.unwrap(),
            tokio::net::TcpStream::connect(addr).await.unwrap(),
        ];
        let started = Instant::now();
        // A third waits in the backlog until the server closes them, then is answered.
        let answer = fetch(addr, "/").await;
        let waited = started.elapsed();
        assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
        assert!(
            answer.ends_with(&format!("from 127.0.0.1 to {addr} on {addr}")),
            "{answer}"
        );
        assert!(
            waited >= limits.header_read && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        for c in &mut idle {
            let mut b = [0u8; 16];
            assert_eq!(
                c.read(&mut b).await.unwrap(),
                0,
                "an idle connection stays open"
            );
        }

        // A keep-alive connection is closed once idle that long after its response.
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut all = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut all)).await;
        assert!(matches!(read, Ok(Ok(_))), "{read:?}");
        assert!(all.starts_with(b"HTTP/1.1 200 OK\r\n"));

        // A response that takes longer than the timeout is sent whole.
        let answer = fetch(addr, "/slow").await;
        assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\n012"), "{answer}");
        server.abort();
    }
}
