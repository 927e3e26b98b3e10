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
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = parse_ui, help_heading = "Outputs")]
    pub ui: Option<SocketAddr>,
    /// Send events to syslog as RFC 5424 records with structured data: unix:PATH (a
    /// datagram socket, e.g. unix:/dev/log), udp:HOST:PORT or tcp:HOST:PORT (octet-counted,
    /// RFC 6587); see docs/export.md
    #[arg(long, value_name = "TARGET", help_heading = "Outputs")]
    pub syslog: Option<crate::export::syslog::Target>,
    /// Only events of these kinds go to syslog (e.g. exec,net_connect,breaker; default: all)
    #[arg(long, value_name = "KIND,...", value_delimiter = ',', value_parser = crate::export::parse_kind, requires = "syslog", help_heading = "Outputs")]
    pub syslog_kinds: Vec<crate::event::Kind>,
    /// Only events with these verdicts go to syslog (allow, deny, killed, none; default:
    /// all)
    #[arg(long, value_name = "VERDICT,...", value_delimiter = ',', value_parser = crate::export::parse_verdict, requires = "syslog", help_heading = "Outputs")]
    pub syslog_verdicts: Vec<crate::event::Verdict>,
    /// Only events this grave or graver go to syslog: alert, err, warning (every refusal,
    /// breaker trip, canary, failed launch and lost event, whatever its verdict), notice or
    /// info (default: all); see docs/export.md
    #[arg(
        long,
        value_enum,
        value_name = "SEVERITY",
        hide_possible_values = true,
        requires = "syslog",
        help_heading = "Outputs"
    )]
    pub syslog_severity: Option<crate::export::Severity>,
    /// The syslog facility of the records: authpriv (private security messages; Debian's
    /// rsyslog writes them to /var/log/auth.log), daemon, auth, user or local0-local7
    #[arg(
        long,
        value_enum,
        default_value_t,
        value_name = "FACILITY",
        hide_possible_values = true,
        requires = "syslog",
        help_heading = "Outputs"
    )]
    pub syslog_facility: crate::export::syslog::Facility,
    /// Export events as OpenTelemetry logs (OTLP/HTTP, JSON encoding) to this collector
    /// URL, e.g. http://127.0.0.1:4318/v1/logs (plain HTTP: https is refused, use a local
    /// collector); see docs/export.md
    #[arg(long, value_name = "URL", help_heading = "Outputs")]
    pub otlp: Option<crate::export::otlp::Endpoint>,
    /// Only events of these kinds go to the collector (default: all)
    #[arg(long, value_name = "KIND,...", value_delimiter = ',', value_parser = crate::export::parse_kind, requires = "otlp", help_heading = "Outputs")]
    pub otlp_kinds: Vec<crate::event::Kind>,
    /// Only events with these verdicts go to the collector (default: all)
    #[arg(long, value_name = "VERDICT,...", value_delimiter = ',', value_parser = crate::export::parse_verdict, requires = "otlp", help_heading = "Outputs")]
    pub otlp_verdicts: Vec<crate::event::Verdict>,
    /// Only events this grave or graver go to the collector: alert, err, warning, notice or
    /// info, as --syslog-severity (default: all)
    #[arg(
        long,
        value_enum,
        value_name = "SEVERITY",
        hide_possible_values = true,
        requires = "otlp",
        help_heading = "Outputs"
    )]
    pub otlp_severity: Option<crate::export::Severity>,
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
        let addr = match s.parse::<u16>() {
            Ok(port) => SocketAddr::from(([127, 0, 0, 1], port)),
            Err(_) => s.parse::<SocketAddr>().map_err(|_| {
                format!(
                    "`{s}` is not a listening address: give a port (9464, on loopback), an \
                     ADDR:PORT (127.0.0.1:9464, [::1]:9464) or unix:PATH"
                )
            })?,
        };
        // Port 0 would be one the kernel picks, which the daemon's messages and `agentd
        // ui-url` would not name: nobody could find it.
        if addr.port() == 0 {
            return Err(format!(
                "`{s}`: give the port to listen on (0 would be a random one nobody is told)"
            ));
        }
        Ok(Listen::Tcp(addr))
    }
}

/// `--ui`: a [`Listen`] on TCP only (a browser reaches no unix socket).
pub fn parse_ui(s: &str) -> Result<SocketAddr, String> {
    match s.parse::<Listen>()? {
        Listen::Tcp(addr) => Ok(addr),
        Listen::Unix(_) => Err(format!(
            "`{s}`: the web view listens on TCP, for a browser: give a port (8080, on \
             loopback) or ADDR:PORT"
        )),
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

/// An output's listener, bound before the daemon loads anything (a port in use or a bad
/// path fails the start with nothing to undo) and served once the daemon is ready.
pub(super) enum Bound {
    Tcp(tokio::net::TcpListener, Listening),
    Unix(tokio::net::UnixListener, SocketFile),
}

/// The file of an output's unix socket: removed if the daemon stops before serving it (its
/// start failed later on).
pub(super) struct SocketFile(Option<PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Bound {
    /// Binds `listen` for the output `what`. A unix socket is made reachable by root and
    /// `group_gid` only (as the control socket is).
    pub(super) async fn bind(
        listen: &Listen,
        what: &str,
        group_gid: Option<u32>,
    ) -> anyhow::Result<Bound> {
        Ok(match listen {
            Listen::Tcp(addr) => {
                let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                    let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                        " (another program listens there: give another port)"
                    } else {
                        ""
                    };
                    anyhow::anyhow!("{what}: binding {addr}: {e}{hint}")
                })?;
                let bound = l
                    .local_addr()
                    .with_context(|| format!("{what}: the address bound for {addr}"))?;
                Bound::Tcp(l, Listening(bound))
            }
            Listen::Unix(path) => {
                let _ = std::fs::remove_file(path);
                let l = tokio::net::UnixListener::bind(path).map_err(|e| {
                    let hint = if e.kind() == std::io::ErrorKind::NotFound {
                        " (its directory must exist)"
                    } else {
                        ""
                    };
                    anyhow::anyhow!("{what}: binding {}: {e}{hint}", path.display())
                })?;
                let file = SocketFile(Some(path.clone()));
                super::restrict_socket(path, group_gid)
                    .with_context(|| format!("{what}: {}", path.display()))?;
                Bound::Unix(l, file)
            }
        })
    }

    /// Serves `app` until the daemon stops.
    pub(super) fn serve(self, app: axum::Router) -> tokio::task::JoinHandle<()> {
        match self {
            Bound::Tcp(l, listening) => tokio::spawn(run(l, app, LIMITS, Some(listening))),
            Bound::Unix(l, mut file) => {
                // Served: the file stays (the next daemon replaces it).
                file.0 = None;
                tokio::spawn(run(l, app, LIMITS, None))
            }
        }
    }
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

    #[test]
    fn port_0_is_refused_and_the_view_takes_tcp_only() {
        for zero in ["0", "127.0.0.1:0", "[::1]:0"] {
            let e = zero.parse::<Listen>().unwrap_err();
            assert!(e.contains("give the port"), "{zero}: {e}");
            assert!(
                parse_ui(zero).unwrap_err().contains("give the port"),
                "{zero}"
            );
        }
        assert_eq!(parse_ui("8080"), Ok("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(parse_ui("[::1]:8080"), Ok("[::1]:8080".parse().unwrap()));
        let e = parse_ui("unix:/run/ui.sock").unwrap_err();
        assert!(e.contains("listens on TCP"), "{e}");
        assert!(parse_ui("nonsense").unwrap_err().contains("ADDR:PORT"));
    }

    #[tokio::test]
    async fn a_port_in_use_and_a_missing_directory_are_refused_with_a_hint() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let Err(e) = Bound::bind(&Listen::Tcp(addr), "metrics", None).await else {
            panic!("bound {addr} twice");
        };
        let e = e.to_string();
        assert!(e.starts_with(&format!("metrics: binding {addr}: ")), "{e}");
        assert!(e.contains("another program listens there"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let missing = Listen::Unix(dir.path().join("missing/m.sock"));
        let Err(e) = Bound::bind(&missing, "metrics", None).await else {
            panic!("bound in a missing directory");
        };
        assert!(e.to_string().contains("its directory must exist"), "{e}");

        // A socket bound and never served is removed; one served stays.
        let path = dir.path().join("m.sock");
        let listen = Listen::Unix(path.clone());
        drop(Bound::bind(&listen, "metrics", None).await.unwrap());
        assert!(!path.exists());
        let served = Bound::bind(&listen, "metrics", None)
            .await
            .unwrap()
            .serve(axum::Router::new());
        assert!(path.exists());
        served.abort();
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
