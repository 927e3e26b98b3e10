//! The agent's network scope, decided in the kernel by the cgroup programs attached to its
//! cgroup: every connect, datagram, bind and inbound connection of an agent under a
//! profile, allowed and refused. Each test asserts the errno the agent got, what reached
//! the other end (listeners on loopback that count), and the event with its fields.

use std::{
    io::{BufRead as _, BufReader, ErrorKind},
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::net::UnixListener,
    process::Stdio,
    time::Duration,
};

use agentd_tests::{
    AgentRun, DEFAULT_LIMITS, PY_ATTEMPT, Run, agent_dir, assert_no_cgroup, profile_file,
    read_events, require_root, test_profile,
};
use serde_json::Value;

const EPERM: i64 = libc::EPERM as i64;
const EACCES: i64 = libc::EACCES as i64;

/// A loopback TCP listener on both families (IPv6 socket, not v6-only), and a UDP socket:
/// they count what reaches them.
struct Outside {
    tcp: TcpListener,
    udp: UdpSocket,
}

impl Outside {
    fn new() -> Outside {
        let tcp = dual_stack_listener();
        tcp.set_nonblocking(true).unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_nonblocking(true).unwrap();
        Outside { tcp, udp }
    }
    fn tcp_port(&self) -> u16 {
        self.tcp.local_addr().unwrap().port()
    }
    fn udp_port(&self) -> u16 {
        self.udp.local_addr().unwrap().port()
    }
    /// Connections accepted so far.
    fn connections(&self) -> usize {
        let mut n = 0;
        loop {
            match self.tcp.accept() {
                Ok(_) => n += 1,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return n,
                Err(e) => panic!("accept: {e}"),
            }
        }
    }
    fn datagrams(&self) -> usize {
        let mut buf = [0u8; 64];
        let mut n = 0;
        loop {
            match self.udp.recv(&mut buf) {
                Ok(_) => n += 1,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return n,
                Err(e) => panic!("recv: {e}"),
            }
        }
    }
}

/// `[::]:0` with IPV6_V6ONLY off, so that IPv4 (as IPv4-mapped) and IPv6 clients both
/// reach it; only loopback clients exist in these tests.
fn dual_stack_listener() -> TcpListener {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain socket calls on a descriptor this function owns; the address is a
    // valid sockaddr_in6 of the size passed; the fd is handed to TcpListener only on success.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let off: libc::c_int = 0;
        let rc = libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&raw const off).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "IPV6_V6ONLY: {}", std::io::Error::last_os_error());
        let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        let rc = libc::bind(
            fd,
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        assert_eq!(libc::listen(fd, 16), 0);
        TcpListener::from_raw_fd(fd)
    }
}

/// A profile without network rules (as analyze-only) and without a breaker on network
/// violations, so that every attempt below is made and refused on its own.
fn no_network_profile() -> (tempfile::TempDir, std::path::PathBuf) {
    profile_file(&test_profile(
        "net",
        "invoker",
        DEFAULT_LIMITS,
        "[breaker]\ntrip_on = [\"canary\"]\n",
    ))
}

fn events_of<'a>(run: &'a Run, kind: &str) -> Vec<&'a Value> {
    run.events.iter().filter(|e| e["kind"] == kind).collect()
}

/// Done-when of the kernel watch: under the built-in analyze-only profile, a TCP connect
/// to a loopback listener is refused in the kernel, nothing reaches the listener, and the
/// events hold the refusal with its port and `layer: bpf`. (The breaker then kills the
/// agent: connecting is off an analyze-only agent's task.)
#[test]
fn net_analyze_only_refuses_a_loopback_connect_in_the_kernel() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let outside = Outside::new();
    let port = outside.tcp_port();
    let run = AgentRun::new("analyze-only", ws.path())
        .python(&format!(
            "import socket\ns = socket.socket()\ns.settimeout(3)\ns.connect(('127.0.0.1', {port}))\nprint('connected')"
        ))
        .run();
    assert_eq!(run.code(), 137, "the breaker kills it\n{}", run.explain());
    assert!(!run.stdout().contains("connected"), "{}", run.explain());
    assert_eq!(
        outside.connections(),
        0,
        "a connection reached the listener"
    );
    let refused: Vec<_> = events_of(&run, "net_connect")
        .into_iter()
        .filter(|e| e["verdict"] == "deny")
        .collect();
    assert_eq!(refused.len(), 1, "{}", run.explain());
    let e = refused[0];
    assert_eq!(e["layer"], "bpf", "{e}");
    assert_eq!(e["errno"], EPERM, "{e}");
    assert_eq!(e["port"], port, "{e}");
    assert_eq!(e["addr"], "127.0.0.1", "{e}");
    assert_eq!(e["proto"], "tcp", "{e}");
    assert!(e["pid"].as_u64().is_some_and(|p| p > 0), "{e}");
    assert_eq!(e["comm"], "python3", "{e}");
    let b = run.event("breaker").expect("breaker event");
    assert_eq!(b["detail"]["trigger"]["kind"], "net_connect", "{b}");
}

/// Every way out of a no-network profile: IPv4, IPv6 and IPv4-mapped IPv6 connects, UDP
/// `sendto` without connect, a raw socket, binds; each refused with the errno the agent
/// sees, nothing reaching the listeners, and one event per attempt naming the layer.
#[test]
fn net_connects_datagrams_and_binds_are_refused_and_reported() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let outside = Outside::new();
    let (tcp, udp) = (outside.tcp_port(), outside.udp_port());
    let script = format!(
        r#"{PY_ATTEMPT}
def connect(family, addr):
    s = socket.socket(family)
    s.settimeout(3)
    s.connect(addr)
attempt("tcp4", lambda: connect(socket.AF_INET, ("127.0.0.1", {tcp})))
attempt("tcp6", lambda: connect(socket.AF_INET6, ("::1", {tcp})))
attempt("mapped", lambda: connect(socket.AF_INET6, ("::ffff:127.0.0.1", {tcp})))
attempt("udp_sendto", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", {udp})))
attempt("udp6_sendto_mapped", lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).sendto(b"x", ("::ffff:127.0.0.1", {udp})))
attempt("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt("tcp_bind", lambda: socket.socket().bind(("127.0.0.1", 0)))
attempt("udp_bind_ephemeral", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).bind(("127.0.0.1", 0)))
print(json.dumps(out))
"#
    );
    let (_p, profile) = no_network_profile();
    let run = AgentRun::new(profile.to_str().unwrap(), ws.path())
        .python(&script)
        .run();
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    for name in [
        "tcp4",
        "tcp6",
        "mapped",
        "udp_sendto",
        "udp6_sendto_mapped",
        "raw",
        "tcp_bind",
    ] {
        assert_eq!(r[name], EPERM, "{name}: {r}");
    }
    // Port 0 for UDP is what every client does before sending; it can receive nothing
    // unsolicited on a port nobody knows.
    assert_eq!(r["udp_bind_ephemeral"], 0, "{r}");
    assert_eq!(
        outside.connections(),
        0,
        "a connection reached the listener"
    );
    assert_eq!(outside.datagrams(), 0, "a datagram reached the UDP socket");

    let find = |kind: &str, family: &str, addr: &str, port: u16| {
        run.events.iter().find(|e| {
            e["kind"] == kind
                && e["detail"]["family"] == family
                && e["addr"] == addr
                && e["port"] == port
        })
    };
    for (kind, family, addr, port, proto) in [
        ("net_connect", "inet", "127.0.0.1", tcp, "tcp"),
        ("net_connect", "inet6", "::1", tcp, "tcp"),
        // IPv4-mapped: decided (and shown) as the IPv4 address it is.
        ("net_connect", "inet6", "127.0.0.1", tcp, "tcp"),
        ("net_send", "inet", "127.0.0.1", udp, "udp"),
        ("net_bind", "inet", "127.0.0.1", 0, "tcp"),
    ] {
        let e = find(kind, family, addr, port)
            .unwrap_or_else(|| panic!("no {kind} {family} {addr}:{port}\n{}", run.explain()));
        assert_eq!(
            (&e["verdict"], &e["layer"], &e["errno"], &e["proto"]),
            (
                &Value::from("deny"),
                &Value::from("bpf"),
                &Value::from(EPERM),
                &Value::from(proto)
            ),
            "{e}"
        );
    }
    // A datagram from an IPv6 socket to an IPv4-mapped address is sent by the IPv4 path
    // of the kernel, so the IPv4 program decides it: two refusals, both `inet`.
    // (Identical refusals within a second are one record with their count.)
    let sends = agentd_tests::counted(
        run.events
            .iter()
            .filter(|e| e["kind"] == "net_send" && e["port"] == udp && e["verdict"] == "deny"),
    );
    assert_eq!(sends, 2, "{}", run.explain());
    let e = run
        .events
        .iter()
        .find(|e| e["kind"] == "net_bind" && e["proto"] == "udp" && e["verdict"] == "allow");
    assert!(
        e.is_some(),
        "the UDP ephemeral bind is an event\n{}",
        run.explain()
    );
    // The raw socket never exists: the seccomp filter refuses it (the cgroup sock_create
    // program would too).
    let raw = run.events.iter().find(|e| {
        e["kind"] == "syscall" && e["detail"]["syscall"] == "socket" && e["layer"] == "seccomp"
    });
    assert!(
        raw.is_some_and(|e| e["errno"] == EPERM),
        "{}",
        run.explain()
    );
    assert!(run.event("breaker").is_none(), "{}", run.explain());
}

/// What a profile allows goes through, and is an event too: a connect to the allowed
/// address and port reaches the listener; the same listener on an address the rule does
/// not cover (::1 against a 127.0.0.1 rule) stays refused.
#[test]
fn net_allowed_connect_reaches_the_listener_and_is_reported() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let outside = Outside::new();
    let tcp = outside.tcp_port();
    let text = test_profile(
        "net-allow",
        "invoker",
        DEFAULT_LIMITS,
        "[breaker]\ntrip_on = [\"canary\"]\n",
    )
    .replacen(
        "connect = []",
        &format!("connect = [\"127.0.0.1/32:{tcp}\"]"),
        1,
    );
    let (_p, profile) = profile_file(&text);
    let script = format!(
        r#"
import json, socket
out = {{}}
for name, family, addr in [("v4", socket.AF_INET, "127.0.0.1"), ("v6", socket.AF_INET6, "::1")]:
    s = socket.socket(family)
    s.settimeout(3)
    try:
        s.connect((addr, {tcp}))
        out[name] = 0
    except OSError as e:
        out[name] = e.errno
print(json.dumps(out))
"#
    );
    let run = AgentRun::new(profile.to_str().unwrap(), ws.path())
        .python(&script)
        .run();
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    assert_eq!(r["v4"], 0, "{r}");
    assert_eq!(r["v6"], EPERM, "{r}");
    assert_eq!(
        outside.connections(),
        1,
        "exactly the allowed connection arrived"
    );
    let verdict = |addr: &str| {
        run.events
            .iter()
            .find(|e| e["kind"] == "net_connect" && e["addr"] == addr && e["port"] == tcp)
            .map(|e| (e["verdict"].clone(), e["layer"].clone()))
    };
    assert_eq!(
        verdict("127.0.0.1"),
        Some(("allow".into(), "bpf".into())),
        "{}",
        run.explain()
    );
    assert_eq!(
        verdict("::1"),
        Some(("deny".into(), "bpf".into())),
        "{}",
        run.explain()
    );
}

/// Unix sockets, which no cgroup program decides on these kernels: Landlock's scoping
/// refuses an abstract socket of the host (EPERM) and its filesystem rules the creation
/// of a pathname socket outside the writable paths (EACCES); a pathname socket of the host
/// that file permissions let the agent reach is reached (documented: only the BPF LSM
/// backend can refuse that, see SECURITY.md). Every call is an event with the socket's name.
#[test]
fn net_unix_sockets_pathname_and_abstract() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(true);
    let host = agent_dir(true);
    let host_sock = host.path().join("service.sock");
    let service = UnixListener::bind(&host_sock).unwrap();
    service.set_nonblocking(true).unwrap();
    std::fs::set_permissions(
        &host_sock,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let abstract_name = format!("agentd-test-{}", std::process::id());
    let abstract_addr = {
        use std::os::linux::net::SocketAddrExt as _;
        std::os::unix::net::SocketAddr::from_abstract_name(&abstract_name).unwrap()
    };
    let host_abstract = UnixListener::bind_addr(&abstract_addr).unwrap();
    host_abstract.set_nonblocking(true).unwrap();
    let outside_bind = host.path().join("agent.sock");
    let script = format!(
        r#"{PY_ATTEMPT}
def connect(addr):
    socket.socket(socket.AF_UNIX).connect(addr)
def bind(addr):
    socket.socket(socket.AF_UNIX).bind(addr)
attempt("abstract_host", lambda: connect("\0{abstract_name}"))
attempt("pathname_host", lambda: connect({host_sock:?}))
attempt("bind_outside", lambda: bind({outside_bind:?}))
attempt("bind_workspace", lambda: bind("own.sock"))
attempt("abstract_own", lambda: bind("\0{abstract_name}-own"))
print(json.dumps(out))
"#,
        host_sock = host_sock.to_str().unwrap(),
        outside_bind = outside_bind.to_str().unwrap(),
    );
    let (_p, profile) = no_network_profile();
    let run = AgentRun::new(profile.to_str().unwrap(), ws.path())
        .python(&script)
        .run();
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    let scoped = agentd_tests::landlock_abi() >= 6;
    // Where BPF LSM runs, its programs refuse a peer outside the agent and its
    // network.unix list (EACCES); Landlock's scoping, where the kernel has it, refuses an
    // abstract one first (EPERM).
    let lsm = agentd_tests::bpf_lsm_usable();
    eprintln!("Landlock scoping: {scoped}, BPF LSM: {lsm}");
    assert_eq!(
        r["abstract_host"],
        if scoped {
            EPERM
        } else if lsm {
            EACCES
        } else {
            0
        },
        "abstract connect to the host: {r}"
    );
    assert_eq!(r["pathname_host"], if lsm { EACCES } else { 0 }, "{r}");
    assert_eq!(r["bind_outside"], EACCES, "{r}");
    assert!(!outside_bind.exists(), "the agent made a socket outside");
    assert_eq!(r["bind_workspace"], 0, "{r}");
    assert_eq!(r["abstract_own"], 0, "{r}");
    assert_eq!(
        service.accept().is_ok(),
        !lsm,
        "the pathname connect reached the host service (BPF LSM: {lsm})"
    );
    if scoped || lsm {
        assert!(
            host_abstract.accept().is_err(),
            "the abstract connect reached the host"
        );
    }

    let find = |kind: &str, path: &str| {
        run.events
            .iter()
            .find(|e| e["kind"] == kind && e["path"] == path && e["detail"]["family"] == "unix")
            .unwrap_or_else(|| panic!("no {kind} {path}\n{}", run.explain()))
    };
    let e = find("net_connect", &format!("@{abstract_name}"));
    assert_eq!(e["detail"]["abstract"], true, "{e}");
    if scoped {
        assert_eq!(
            (&e["verdict"], &e["layer"]),
            (&"deny".into(), &"landlock".into()),
            "{e}"
        );
        assert_eq!(e["errno"], EPERM, "{e}");
    } else if lsm {
        assert_unix_peer_event(e, lsm);
    }
    assert_unix_peer_event(find("net_connect", host_sock.to_str().unwrap()), lsm);
    let e = find("net_bind", outside_bind.to_str().unwrap());
    assert_eq!(
        (&e["verdict"], &e["layer"]),
        (&"deny".into(), &"landlock".into()),
        "{e}"
    );
    assert_eq!(e["errno"], EACCES, "{e}");
    // The relative name, resolved against the agent's working directory.
    let own = ws.path().canonicalize().unwrap().join("own.sock");
    let e = find("net_bind", own.to_str().unwrap());
    assert_eq!(e["verdict"], "allow", "{e}");
}

/// The event of a unix connect to a peer outside the agent and its `network.unix`: refused
/// by BPF LSM (EACCES) where it runs, else allowed (file permissions decide).
fn assert_unix_peer_event(e: &Value, lsm: bool) {
    if lsm {
        assert_eq!(
            (&e["verdict"], &e["layer"], &e["errno"]),
            (&"deny".into(), &"bpf-lsm".into(), &EACCES.into()),
            "{e}"
        );
    } else {
        assert_eq!(e["verdict"], "allow", "{e}");
    }
}

/// Sends `fd` over `stream` (SCM_RIGHTS) with one byte of data.
fn send_fd(stream: &std::os::unix::net::UnixStream, fd: std::os::fd::RawFd) {
    use std::os::fd::AsRawFd as _;
    let mut byte = [b'x'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) } as usize;
    assert!(space <= size_of_val(&control));
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: msg_control points to `space` writable, aligned bytes, so the first header
    // and its data (one c_int) lie inside it; sendmsg reads only what msg describes.
    let rc = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::c_int>() as u32) as usize;
        libc::CMSG_DATA(cmsg)
            .cast::<libc::c_int>()
            .write_unaligned(fd);
        libc::sendmsg(stream.as_raw_fd(), &raw const msg, 0)
    };
    assert_eq!(rc, 1, "sendmsg: {}", std::io::Error::last_os_error());
}

/// Where BPF LSM runs, an agent reaches the unix sockets it created, ones it was handed,
/// and the pathname sockets its profile lists in `network.unix` — also one created after
/// it started (a service that re-creates its socket) — and no other: a host service's
/// socket, stream or datagram, connected or addressed per datagram, is refused with
/// EACCES and an event of `layer: bpf-lsm`. Where it does not (this project's hosts),
/// every connect goes through (file permissions decide), as documented.
#[test]
fn net_unix_connects_reach_own_and_listed_sockets_only() {
    if !require_root() {
        return;
    }
    let lsm = agentd_tests::bpf_lsm_usable();
    eprintln!("BPF LSM: {lsm}");
    let ws = agent_dir(true);
    let host = agent_dir(true);
    let open_to_all = |p: &std::path::Path| {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    };
    let listed = host.path().join("listed.sock");
    let other = host.path().join("other.sock");
    let listed_dgram = host.path().join("listed-dgram.sock");
    let dgram = host.path().join("dgram.sock");
    let late = host.path().join("late.sock");
    let listed_l = UnixListener::bind(&listed).unwrap();
    let other_l = UnixListener::bind(&other).unwrap();
    let listed_d = std::os::unix::net::UnixDatagram::bind(&listed_dgram).unwrap();
    let dgram_d = std::os::unix::net::UnixDatagram::bind(&dgram).unwrap();
    for (p, nb) in [(&listed, &listed_l), (&other, &other_l)] {
        nb.set_nonblocking(true).unwrap();
        open_to_all(p);
    }
    // The listed service hands the agent one end of a datagram socketpair it made (an
    // unnamed socket of another cgroup), and reports what the agent sent on it.
    let listed_service = std::thread::spawn(move || {
        use std::os::fd::AsRawFd as _;
        let conn = (0..600).find_map(|_| match listed_l.accept() {
            Ok((c, _)) => Some(c),
            Err(_) => {
                std::thread::sleep(Duration::from_millis(50));
                None
            }
        })?;
        conn.set_nonblocking(false).unwrap();
        let (mine, theirs) = std::os::unix::net::UnixDatagram::pair().unwrap();
        send_fd(&conn, theirs.as_raw_fd());
        drop(theirs);
        mine.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = [0u8; 16];
        let n = mine.recv(&mut buf).ok()?;
        Some(buf[..n].to_vec())
    });
    for (p, d) in [(&listed_dgram, &listed_d), (&dgram, &dgram_d)] {
        d.set_nonblocking(true).unwrap();
        open_to_all(p);
    }
    let profile = test_profile(
        "unix",
        "invoker",
        DEFAULT_LIMITS,
        "[breaker]\ntrip_on = [\"canary\"]\n",
    )
    .replace(
        "bind = []\n",
        &format!("bind = []\nunix = [{listed:?}, {listed_dgram:?}, {late:?}]\n"),
    );
    let (_p, profile) = profile_file(&profile);
    let script = format!(
        r#"{PY_ATTEMPT}
import time
def stream(addr):
    s = socket.socket(socket.AF_UNIX)
    s.connect(addr)
    s.close()
def dgram_connect(addr):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.connect(addr)
    s.close()
def dgram_sendto(addr):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(b"x", addr)
    s.close()
def own():
    l = socket.socket(socket.AF_UNIX)
    l.bind("own.sock")
    l.listen()
    c = socket.socket(socket.AF_UNIX)
    c.connect("own.sock")
    c.close()
    l.close()
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.send(b"x")
    assert b.recv(1) == b"x"
def listed():
    s = socket.socket(socket.AF_UNIX)
    s.connect({listed:?})
    msg, fds, flags, addr = socket.recv_fds(s, 16, 1)
    h = socket.socket(fileno=fds[0])
    attempt("handed", lambda: h.send(b"handed"))
    s.close()
attempt("listed", listed)
attempt("other", lambda: stream({other:?}))
attempt("listed_dgram", lambda: dgram_connect({listed_dgram:?}))
attempt("dgram", lambda: dgram_connect({dgram:?}))
attempt("dgram_sendto", lambda: dgram_sendto({dgram:?}))
attempt("own", own)
attempt("pair", pair)
open("ready", "w").close()
for _ in range(400):
    if os.path.exists({late:?}):
        break
    time.sleep(0.05)
attempt("late", lambda: stream({late:?}))
print(json.dumps(out))
"#
    );
    // The late socket appears once the agent runs (its entries are made at launch).
    let ready = ws.path().join("ready");
    let late_path = late.clone();
    let late_service = std::thread::spawn(move || {
        for _ in 0..600 {
            if ready.exists() {
                let l = UnixListener::bind(&late_path).unwrap();
                std::fs::set_permissions(
                    &late_path,
                    std::os::unix::fs::PermissionsExt::from_mode(0o777),
                )
                .unwrap();
                return Some(l);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    });
    let run = AgentRun::new(profile.to_str().unwrap(), ws.path())
        .python(&script)
        .run();
    let late_l = late_service.join().unwrap();
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    let refused = if lsm { EACCES } else { 0 };
    for (name, want) in [
        ("listed", 0),
        ("handed", 0),
        ("listed_dgram", 0),
        ("own", 0),
        ("pair", 0),
        ("late", 0),
        ("other", refused),
        ("dgram", refused),
        ("dgram_sendto", refused),
    ] {
        assert_eq!(r[name], want, "{name}: {r}");
    }
    assert_eq!(
        listed_service.join().unwrap().as_deref(),
        Some(&b"handed"[..]),
        "the datagram on the handed socket"
    );
    let late_l = late_l.expect("the agent never became ready");
    late_l.set_nonblocking(true).unwrap();
    assert!(late_l.accept().is_ok(), "the late service got nothing");
    assert_eq!(
        other_l.accept().is_ok(),
        !lsm,
        "the unlisted service was reached (BPF LSM: {lsm})"
    );
    let mut buf = [0u8; 8];
    assert_eq!(
        dgram_d.recv(&mut buf).is_ok(),
        !lsm,
        "a datagram reached the unlisted socket (BPF LSM: {lsm})"
    );

    let connects = |path: &std::path::Path| -> Vec<&Value> {
        run.events
            .iter()
            .filter(|e| e["kind"] == "net_connect" && e["path"] == path.to_str().unwrap())
            .collect()
    };
    for path in [&other, &dgram] {
        let evs = connects(path);
        assert_eq!(evs.len(), 1, "{}\n{}", path.display(), run.explain());
        assert_unix_peer_event(evs[0], lsm);
    }
    for path in [&listed, &listed_dgram, &late] {
        let evs = connects(path);
        assert_eq!(evs.len(), 1, "{}\n{}", path.display(), run.explain());
        assert_eq!(evs[0]["verdict"], "allow", "{}", evs[0]);
    }
}

/// A TCP socket that listens without bind() gets an ephemeral port from the kernel, and
/// no bind program runs for it: the ingress program drops connection requests to any port
/// the profile does not let the agent bind. Meanwhile a process outside the agent, on the
/// same host, connects where the agent may not, and produces no event.
#[test]
fn net_inbound_connection_to_an_autobound_listener_is_dropped() {
    if !require_root() {
        return;
    }
    let ws = agent_dir(false);
    let outside = Outside::new();
    let (_p, profile) = no_network_profile();
    let events_dir = tempfile::tempdir().unwrap();
    let events = events_dir.path().join("events.jsonl");
    // The agent listens (autobind), prints its port, and waits for stdin to close.
    let mut child = AgentRun::new(profile.to_str().unwrap(), ws.path())
        .python(
            "import socket, sys\nl = socket.socket()\nl.listen()\nprint(l.getsockname()[1], flush=True)\nsys.stdin.read()\nl.setblocking(False)\ntry:\n    l.accept()\n    print('accepted')\nexcept BlockingIOError:\n    print('nobody')\n",
        )
        .command(&events)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let port: u16 = line
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{e}: agent printed {line:?}"));

    let attempt = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(1500),
    );
    assert!(
        attempt.is_err(),
        "an outside process connected to the agent's listener"
    );
    // The outsider, meanwhile, is not the agent: nothing refuses it.
    let me = TcpStream::connect((Ipv6Addr::LOCALHOST, outside.tcp_port()));
    assert!(me.is_ok(), "outside connect: {me:?}");
    assert_eq!(outside.connections(), 1);

    drop(child.stdin.take());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status} {rest}");
    assert_eq!(rest.trim(), "nobody", "the agent accepted a connection");

    let evs = read_events(&events);
    let dropped: Vec<_> = evs.iter().filter(|e| e["kind"] == "net_accept").collect();
    assert!(!dropped.is_empty(), "no net_accept event: {evs:?}");
    for e in &dropped {
        assert_eq!(
            (&e["verdict"], &e["layer"]),
            (&"deny".into(), &"bpf".into()),
            "{e}"
        );
        assert_eq!(e["port"], port, "{e}");
        assert_eq!(e["addr"], "127.0.0.1", "{e}");
    }
    let me = i64::from(std::process::id());
    assert!(
        evs.iter().all(|e| e["pid"] != me),
        "an event of the test process (outside any agent): {evs:?}"
    );
    assert!(
        evs.iter()
            .all(|e| e["kind"] != "net_connect" || e["port"] != outside.tcp_port()),
        "the outsider's connect is an event: {evs:?}"
    );
    if let Some(id) = evs.iter().find_map(|e| e["agent"].as_str()) {
        assert_no_cgroup(id);
    }
}
