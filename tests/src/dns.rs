//! A DNS server for tests: it answers from a table, over UDP and TCP on one loopback
//! address and port, and records every question it is asked. It stands for the upstream
//! resolver agentd forwards to, and for the resolvers an agent addresses directly (which
//! must then see nothing).

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA, CNAME},
    },
};

/// What the server knows: records by owner name (lowercase, no trailing dot), all with
/// one TTL.
#[derive(Debug, Clone)]
pub struct Zone {
    ttl: u32,
    records: Vec<(String, Data)>,
}

#[derive(Debug, Clone)]
enum Data {
    Addr(IpAddr),
    Cname(String),
    /// A record of another owner added to every answer about this name: what an upstream
    /// (or a spoofer) may slip into an answer.
    Stray(String, IpAddr),
}

impl Zone {
    pub fn new(ttl: u32) -> Zone {
        Zone {
            ttl,
            records: Vec::new(),
        }
    }
    /// An A or AAAA record, after the address's family.
    pub fn addr(mut self, name: &str, addr: impl Into<IpAddr>) -> Zone {
        self.records
            .push((name.to_owned(), Data::Addr(addr.into())));
        self
    }
    pub fn cname(mut self, name: &str, target: &str) -> Zone {
        self.records
            .push((name.to_owned(), Data::Cname(target.to_owned())));
        self
    }
    /// Answers whose chain ends at `name` also carry `owner`'s address `addr`: a record
    /// whose owner is outside the chain.
    pub fn stray(mut self, name: &str, owner: &str, addr: impl Into<IpAddr>) -> Zone {
        self.records
            .push((name.to_owned(), Data::Stray(owner.to_owned(), addr.into())));
        self
    }

    /// The response to `query`: the CNAME chain from the question's name, then the
    /// records of the requested type of its last name; NXDOMAIN for a name not in the
    /// table.
    fn respond(&self, query: &Message) -> Message {
        let mut resp = Message::new();
        resp.set_id(query.id())
            .set_message_type(MessageType::Response)
            .set_op_code(query.op_code())
            .set_recursion_desired(query.recursion_desired())
            .set_recursion_available(true);
        let Some(q) = query.queries().first() else {
            resp.set_response_code(ResponseCode::FormErr);
            return resp;
        };
        resp.add_query(q.clone());
        let mut name = normal(q.name());
        let mut owner = q.name().clone();
        if !self.records.iter().any(|(n, _)| *n == name) {
            resp.set_response_code(ResponseCode::NXDomain);
            return resp;
        }
        // Bounded: a table may hold a CNAME loop.
        for _ in 0..8 {
            let here: Vec<&Data> = self
                .records
                .iter()
                .filter(|(n, _)| *n == name)
                .map(|(_, d)| d)
                .collect();
            if let Some(target) = here.iter().find_map(|d| match d {
                Data::Cname(t) => Some(t),
                Data::Addr(_) | Data::Stray(..) => None,
            }) {
                let target_name = fqdn(target);
                resp.add_answer(Record::from_rdata(
                    owner,
                    self.ttl,
                    RData::CNAME(CNAME(target_name.clone())),
                ));
                owner = target_name;
                name.clone_from(target);
                continue;
            }
            for d in here {
                let (record_owner, addr) = match d {
                    Data::Addr(a) => (owner.clone(), *a),
                    Data::Stray(o, a) => (fqdn(o), *a),
                    Data::Cname(_) => continue,
                };
                let rdata = match addr {
                    IpAddr::V4(a) if q.query_type() == RecordType::A => RData::A(A(a)),
                    IpAddr::V6(a) if q.query_type() == RecordType::AAAA => RData::AAAA(AAAA(a)),
                    IpAddr::V4(_) | IpAddr::V6(_) => continue,
                };
                resp.add_answer(Record::from_rdata(record_owner, self.ttl, rdata));
            }
            break;
        }
        resp
    }
}

fn fqdn(name: &str) -> Name {
    Name::from_ascii(format!("{name}.")).unwrap()
}

/// A name as the table holds it: lowercase, no trailing dot.
fn normal(name: &Name) -> String {
    name.to_ascii().trim_end_matches('.').to_ascii_lowercase()
}

/// One question the server was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    /// Lowercase, no trailing dot.
    pub name: String,
    /// "A", "AAAA"...
    pub qtype: String,
    pub tcp: bool,
}

/// The server: UDP and TCP on one address and port, until dropped.
pub struct FakeDns {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<Asked>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl FakeDns {
    /// Serves `zone` on `ip`:`port` (0: a port free for both UDP and TCP).
    pub fn start(ip: IpAddr, port: u16, zone: Zone) -> FakeDns {
        let (udp, tcp) = bind_both(ip, port);
        let addr = udp.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let zone = Arc::new(zone);
        let udp_thread = {
            let (zone, asked, stop) = (zone.clone(), asked.clone(), stop.clone());
            std::thread::spawn(move || serve_udp(&udp, &zone, &asked, &stop))
        };
        let tcp_thread = {
            let (zone, asked, stop) = (zone.clone(), asked.clone(), stop.clone());
            std::thread::spawn(move || serve_tcp(&tcp, &zone, &asked, &stop))
        };
        FakeDns {
            addr,
            asked,
            stop,
            threads: vec![udp_thread, tcp_thread],
        }
    }

    /// On 127.0.0.1, a port from the OS.
    pub fn upstream(zone: Zone) -> FakeDns {
        FakeDns::start(Ipv4Addr::LOCALHOST.into(), 0, zone)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every question so far, in order.
    pub fn asked(&self) -> Vec<Asked> {
        self.asked.lock().unwrap().clone()
    }

    /// The names asked so far, deduplicated, in the order first asked.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for a in self.asked() {
            if !names.contains(&a.name) {
                names.push(a.name);
            }
        }
        names
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A UDP socket and a TCP listener on the same address and port.
fn bind_both(ip: IpAddr, port: u16) -> (UdpSocket, TcpListener) {
    for _ in 0..20 {
        let udp = UdpSocket::bind((ip, port))
            .unwrap_or_else(|e| panic!("cannot bind UDP {ip}:{port}: {e}"));
        let bound = udp.local_addr().unwrap();
        match TcpListener::bind(bound) {
            Ok(tcp) => return (udp, tcp),
            // The port the OS chose for UDP is taken for TCP: choose again.
            Err(e) if port == 0 && e.kind() == ErrorKind::AddrInUse => {}
            Err(e) => panic!("cannot bind TCP {bound}: {e}"),
        }
    }
    panic!("no port free for both UDP and TCP on {ip}");
}

const POLL: Duration = Duration::from_millis(50);

/// Parses a query, records it, and encodes the response (None: not a DNS query).
fn handle(bytes: &[u8], zone: &Zone, asked: &Mutex<Vec<Asked>>, tcp: bool) -> Option<Vec<u8>> {
    let query = Message::from_vec(bytes).ok()?;
    if let Some(q) = query.queries().first() {
        asked.lock().unwrap().push(Asked {
            name: normal(q.name()),
            qtype: q.query_type().to_string(),
            tcp,
        });
    }
    zone.respond(&query).to_vec().ok()
}

fn serve_udp(sock: &UdpSocket, zone: &Zone, asked: &Mutex<Vec<Asked>>, stop: &AtomicBool) {
    sock.set_read_timeout(Some(POLL)).unwrap();
    let mut buf = vec![0u8; 65_535];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Some(resp) = handle(&buf[..n], zone, asked, false) {
            let _ = sock.send_to(&resp, peer);
        }
    }
}

fn serve_tcp(
    listener: &TcpListener,
    zone: &Arc<Zone>,
    asked: &Arc<Mutex<Vec<Asked>>>,
    stop: &AtomicBool,
) {
    listener.set_nonblocking(true).unwrap();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                let (zone, asked) = (zone.clone(), asked.clone());
                // Ends when the client closes or goes quiet.
                std::thread::spawn(move || serve_tcp_conn(conn, &zone, &asked));
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// Messages on a TCP connection, each after its two-byte length (RFC 1035 4.2.2).
fn serve_tcp_conn(mut conn: TcpStream, zone: &Zone, asked: &Mutex<Vec<Asked>>) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    loop {
        let mut len = [0u8; 2];
        if conn.read_exact(&mut len).is_err() {
            return;
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if conn.read_exact(&mut msg).is_err() {
            return;
        }
        let Some(resp) = handle(&msg, zone, asked, true) else {
            return;
        };
        let Ok(len) = u16::try_from(resp.len()) else {
            return;
        };
        if conn.write_all(&len.to_be_bytes()).is_err() || conn.write_all(&resp).is_err() {
            return;
        }
    }
}
