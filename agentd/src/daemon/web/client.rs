//! Which cgroup a web view client's connection comes from, asked of the kernel.
//!
//! An agent runs as its owner's uid and may share the host's network: whatever secret a
//! request carries, only the cgroup its socket was made in tells an agent's request from
//! its owner's (as `agent_of` tells them apart on the control socket). For a connection
//! accepted from CLIENT to SERVER, the client's own socket (local end CLIENT, remote end
//! SERVER) is looked up with sock_diag (`NETLINK_SOCK_DIAG`, `SOCK_DIAG_BY_FAMILY`: an
//! exact lookup by addresses and ports, no dump); the kernel's answer carries the cgroup
//! v2 id the socket was created in (`INET_DIAG_CGROUP_ID`, Linux 5.8). A client that is
//! not on this host has no such socket here: it cannot be checked, and is refused.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
    time::Duration,
};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla as _};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, TCP_LISTEN},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
};

/// `INET_DIAG_CGROUP_ID` (include/uapi/linux/inet_diag.h): a u64, the cgroup v2 id of the
/// cgroup the socket was created in. The crate has no variant for it: it arrives as
/// [`Nla::Other`].
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `sock_diag_check_cookie` skips the check for this cookie (`INET_DIAG_NOCOOKIE`, both
/// halves all ones).
const NO_COOKIE: [u8; 8] = [0xff; 8];
/// How long the kernel may take to answer (it answers at once: this is a bound only).
const ANSWER_WITHIN: Duration = Duration::from_secs(1);
/// Room for the answer: one socket's header and a few attributes.
const ANSWER_BYTES: usize = 8192;
/// Our request's sequence number, which the answer repeats.
const SEQUENCE: u32 = 1;

/// Why a connection's cgroup is not known: the request is refused.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("the server's own address of the connection is unknown")]
    NoLocalAddress,
    #[error("sock_diag: {call}: {source}")]
    Io {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "the kernel knows no socket {client} -> {server} on this host (the client is on another host, or it closed the connection)"
    )]
    NotFound {
        client: SocketAddr,
        server: SocketAddr,
    },
    #[error("sock_diag: the kernel refused the lookup: {0}")]
    Refused(io::Error),
    #[error("sock_diag: an answer that cannot be read: {0}")]
    Malformed(String),
    #[error("sock_diag: the answer describes another socket ({0})")]
    OtherSocket(String),
    #[error(
        "this kernel does not say which cgroup a socket was made in (INET_DIAG_CGROUP_ID: Linux 5.8 or later, with cgroup socket data)"
    )]
    NoCgroupId,
}

/// The cgroup v2 id of the socket of the client of a connection the view accepted from
/// `client` at its own address `server`.
pub fn cgroup_of(client: SocketAddr, server: SocketAddr) -> Result<u64, LookupError> {
    let wanted = socket_of(client, server);
    let mut socket =
        netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_SOCK_DIAG).map_err(|source| {
            LookupError::Io {
                call: "socket(AF_NETLINK, NETLINK_SOCK_DIAG)",
                source,
            }
        })?;
    socket.bind_auto().map_err(|source| LookupError::Io {
        call: "bind",
        source,
    })?;
    nix::sys::socket::setsockopt(
        &socket.as_fd(),
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(ANSWER_WITHIN.as_secs() as _, 0),
    )
    .map_err(|e| LookupError::Io {
        call: "setsockopt(SO_RCVTIMEO)",
        source: e.into(),
    })?;
    let request = encode(&wanted);
    socket
        .send_to(&request, &netlink_sys::SocketAddr::new(0, 0), 0)
        .map_err(|source| LookupError::Io {
            call: "sendto",
            source,
        })?;
    let mut answer = Vec::with_capacity(ANSWER_BYTES);
    let (n, _) = socket
        .recv_from(&mut answer, 0)
        .map_err(|source| LookupError::Io {
            call: "recvfrom",
            source,
        })?;
    let answer = answer.get(..n).unwrap_or(&answer);
    decode(answer, &wanted).map_err(|e| match e {
        Decoded::NotFound => LookupError::NotFound { client, server },
        Decoded::Failed(e) => e,
    })
}

/// The client's socket: its own end is the connection's remote one. An IPv4 client of a
/// view on `[::]` shows as an IPv4-mapped IPv6 address; its socket is an IPv4 one.
fn socket_of(client: SocketAddr, server: SocketAddr) -> (u8, SocketId) {
    let unmapped = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    };
    let (c, s) = (unmapped(client.ip()), unmapped(server.ip()));
    let (c, s) = if c.is_ipv4() == s.is_ipv4() {
        (c, s)
    } else {
        (client.ip(), server.ip())
    };
    let family = if c.is_ipv4() { AF_INET } else { AF_INET6 };
    let id = SocketId {
        source_port: client.port(),
        destination_port: server.port(),
        source_address: c,
        destination_address: s,
        interface_id: 0,
        cookie: NO_COOKIE,
    };
    (family, id)
}

/// The `SOCK_DIAG_BY_FAMILY` request for exactly the socket `wanted` (no `NLM_F_DUMP`),
/// with no extensions: the cgroup id comes with every answer.
fn encode(wanted: &(u8, SocketId)) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = SEQUENCE;
    let mut message = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family: wanted.0,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: wanted.1.clone(),
        })
        .into(),
    );
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

#[derive(Debug)]
enum Decoded {
    /// ENOENT: no such socket.
    NotFound,
    Failed(LookupError),
}

/// The cgroup id in the kernel's answer to the request for `wanted`.
fn decode(answer: &[u8], wanted: &(u8, SocketId)) -> Result<u64, Decoded> {
    let malformed = |e: String| Decoded::Failed(LookupError::Malformed(e));
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(answer)
        .map_err(|e| malformed(e.to_string()))?;
    if message.header.sequence_number != SEQUENCE {
        return Err(malformed(format!(
            "sequence number {}, not {SEQUENCE}",
            message.header.sequence_number
        )));
    }
    if let NetlinkPayload::Error(e) = &message.payload {
        let errno = e.raw_code().checked_neg().unwrap_or(0);
        if errno == libc::ENOENT {
            return Err(Decoded::NotFound);
        }
        return Err(Decoded::Failed(LookupError::Refused(
            io::Error::from_raw_os_error(errno),
        )));
    }
    let NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) = message.payload
    else {
        return Err(malformed(format!(
            "a message of type {}, not an inet socket's description",
            message.header.message_type
        )));
    };
    cgroup_in(&response, wanted).map_err(Decoded::Failed)
}

/// The cgroup id of `response`, once it is known to describe the socket `wanted`: a
/// connected one (an exact lookup falls back to a listening socket on the client's
/// address and port; that one is not the client's).
fn cgroup_in(response: &InetResponse, wanted: &(u8, SocketId)) -> Result<u64, LookupError> {
    let h = &response.header;
    let got = &h.socket_id;
    let w = &wanted.1;
    if h.family != wanted.0
        || h.state == TCP_LISTEN
        || got.source_port != w.source_port
        || got.destination_port != w.destination_port
        || got.source_address != w.source_address
        || got.destination_address != w.destination_address
    {
        return Err(LookupError::OtherSocket(format!(
            "state {}, {}:{} -> {}:{}",
            h.state,
            got.source_address,
            got.source_port,
            got.destination_address,
            got.destination_port
        )));
    }
    let attribute = response.nlas.iter().find_map(|nla| {
        if let Nla::Other(a) = nla
            && a.kind() == INET_DIAG_CGROUP_ID
        {
            Some(a)
        } else {
            None
        }
    });
    let Some(a) = attribute else {
        return Err(LookupError::NoCgroupId);
    };
    let mut value = [0u8; 8];
    if a.value_len() != value.len() {
        return Err(LookupError::Malformed(format!(
            "INET_DIAG_CGROUP_ID of {} bytes, not 8",
            a.value_len()
        )));
    }
    a.emit_value(&mut value);
    Ok(u64::from_ne_bytes(value))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use netlink_packet_core::DefaultNla;
    use netlink_packet_sock_diag::inet::InetResponseHeader;

    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_clients_socket_is_looked_up_from_its_own_end() {
        let (family, id) = socket_of(addr("127.0.0.1:40000"), addr("127.0.0.1:8080"));
        assert_eq!(family, AF_INET);
        assert_eq!((id.source_port, id.destination_port), (40000, 8080));
        assert_eq!(id.cookie, NO_COOKIE);
        // An IPv4 client of a view on [::]: an IPv4 socket.
        let (family, id) = socket_of(
            addr("[::ffff:127.0.0.1]:40000"),
            addr("[::ffff:127.0.0.2]:8080"),
        );
        assert_eq!(family, AF_INET);
        assert_eq!(id.destination_address, addr("127.0.0.2:1").ip());
        let (family, _) = socket_of(addr("[::1]:40000"), addr("[::1]:8080"));
        assert_eq!(family, AF_INET6);
        // The request: no dump, the ports in network order at the socket id's start.
        let bytes = encode(&socket_of(addr("127.0.0.1:40000"), addr("127.0.0.1:8080")));
        let flags = u16::from_ne_bytes([bytes[6], bytes[7]]);
        assert_eq!(flags, NLM_F_REQUEST);
        assert_eq!(&bytes[16 + 8..16 + 12], &[0x9c, 0x40, 0x1f, 0x90]);
    }

    fn response(state: u8, id: &SocketId, nlas: Vec<Nla>) -> InetResponse {
        let header = InetResponseHeader {
            family: AF_INET,
            state,
            timer: None,
            socket_id: id.clone(),
            recv_queue: 0,
            send_queue: 0,
            uid: 0,
            inode: 1,
        };
        InetResponse {
            header,
            nlas: nlas.into_iter().collect(),
        }
    }

    #[test]
    fn the_answer_must_be_the_connected_socket_asked_for() {
        let wanted = socket_of(addr("127.0.0.1:40000"), addr("127.0.0.1:8080"));
        let cgroup = Nla::Other(DefaultNla::new(
            INET_DIAG_CGROUP_ID,
            4242u64.to_ne_bytes().to_vec(),
        ));
        let established = 1;
        let ok = response(
            established,
            &wanted.1,
            vec![Nla::Shutdown(0), cgroup.clone()],
        );
        assert_eq!(cgroup_in(&ok, &wanted).unwrap(), 4242);
        // Through the netlink framing, as the kernel sends it.
        let mut header = NetlinkHeader::default();
        header.sequence_number = SEQUENCE;
        let mut m = NetlinkMessage::new(header, SockDiagMessage::InetResponse(Box::new(ok)).into());
        m.finalize();
        let mut bytes = vec![0; m.buffer_len()];
        m.serialize(&mut bytes);
        assert_eq!(decode(&bytes, &wanted).unwrap(), 4242);

        let listening = response(TCP_LISTEN, &wanted.1, vec![cgroup.clone()]);
        assert!(matches!(
            cgroup_in(&listening, &wanted),
            Err(LookupError::OtherSocket(_))
        ));
        let mut other = wanted.1.clone();
        other.source_port = 40001;
        let elsewhere = response(established, &other, vec![cgroup]);
        assert!(matches!(
            cgroup_in(&elsewhere, &wanted),
            Err(LookupError::OtherSocket(_))
        ));
        let old_kernel = response(established, &wanted.1, vec![Nla::Shutdown(0)]);
        assert!(matches!(
            cgroup_in(&old_kernel, &wanted),
            Err(LookupError::NoCgroupId)
        ));
        let short = response(
            established,
            &wanted.1,
            vec![Nla::Other(DefaultNla::new(INET_DIAG_CGROUP_ID, vec![1, 2]))],
        );
        assert!(matches!(
            cgroup_in(&short, &wanted),
            Err(LookupError::Malformed(_))
        ));
    }

    /// The cgroup v2 directory this process is in.
    fn my_cgroup_dir() -> std::path::PathBuf {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root = mounts
            .lines()
            .find(|l| {
                l.split(" - ")
                    .nth(1)
                    .is_some_and(|t| t.starts_with("cgroup2 "))
            })
            .and_then(|l| l.split(' ').nth(4))
            .expect("a cgroup2 mount");
        let me = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let path = me
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup v2 line");
        std::path::Path::new(root).join(path.trim_start_matches('/'))
    }

    /// A real connection of this process's: the kernel finds the client's socket and
    /// names this process's cgroup; once the client is gone, it finds nothing.
    #[test]
    fn the_kernel_names_the_cgroup_of_a_clients_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, from) = l.accept().unwrap();
        let at = server.local_addr().unwrap();
        assert_eq!(from, client.local_addr().unwrap());
        let want = std::fs::metadata(my_cgroup_dir()).unwrap().ino();
        assert_eq!(cgroup_of(from, at).unwrap(), want);
        // A made-up client port is nobody's.
        let nobody = SocketAddr::new(from.ip(), if from.port() == 1 { 2 } else { 1 });
        assert!(
            matches!(cgroup_of(nobody, at), Err(LookupError::NotFound { .. })),
            "{:?}",
            cgroup_of(nobody, at)
        );
        drop(client);
        drop(server);
    }
}
