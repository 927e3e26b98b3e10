//! Egress by domain name (issue #15): a profile's `network.connect` names DNS names; the
//! agent's DNS queries, whatever resolver they address, are answered by agentd, which
//! forwards the allowed names to its upstream and admits their addresses in the kernel
//! before answering, until their TTL runs out. Each test runs in a network namespace of
//! its own (`private_netns`), whose loopback also carries documentation addresses (agentd
//! admits no loopback address by name): a fake upstream answers `allowed.test` ->
//! 192.0.2.2, `other.test` -> 192.0.2.3 and `v6.test` -> 2001:db8::2 (and the other names
//! below), listeners on those addresses count what reaches them, and fake resolvers on
//! 127.0.0.5:53 and [::1]:53, the addresses the agents hard-code, must see nothing.

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Output},
    time::Duration,
};

use agentd_tests::{
    AgentRun, DEFAULT_LIMITS, Daemon, PY_ATTEMPT, Run, agent_dir,
    dns::{FakeDns, Zone},
    private_netns, profile_file, require_root, test_profile, wait_until, wait_until_or,
};
use serde_json::{Value, json};
use std::os::unix::process::CommandExt as _;

const EPERM: i64 = libc::EPERM as i64;
/// getaddrinfo's EAI_NONAME: what a program sees for a name agentd answers NXDOMAIN.
const EAI_NONAME: i64 = -2;
const ALLOWED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const OTHER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
const V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// The resolver addresses the agents' scripts hard-code.
const HARD_CODED_V4: &str = "127.0.0.5";
const HARD_CODED_V6: &str = "::1";

/// The upstream's table: every name these tests use.
fn upstream_zone(ttl: u32) -> Zone {
    Zone::new(ttl)
        .addr("allowed.test", ALLOWED)
        .addr("other.test", OTHER)
        .addr("v6.test", V6)
        .addr("a.wild.test", ALLOWED)
        .addr("b.c.wild.test", ALLOWED)
        .addr("wild.test", ALLOWED)
        .addr("notwild.test", ALLOWED)
        .cname("to-allowed.test", "allowed.test")
        .cname("to-other.test", "other.test")
        // An answer that also carries other.test's address.
        .addr("stray.test", ALLOWED)
        .stray("stray.test", "other.test", OTHER)
        // Addresses of this host or of none: answered, never admitted.
        .addr("loop.test", Ipv4Addr::LOCALHOST)
        .addr("zero.test", Ipv4Addr::UNSPECIFIED)
        .addr("mapped.test", Ipv4Addr::LOCALHOST.to_ipv6_mapped())
}

/// A TCP listener that counts the connections that reached it.
struct Listener(TcpListener);

impl Listener {
    fn bind(addr: SocketAddr) -> std::io::Result<Listener> {
        let l = TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok(Listener(l))
    }
    /// Connections accepted since the last call.
    fn accepted(&self) -> usize {
        let mut n = 0;
        loop {
            match self.0.accept() {
                Ok(_) => n += 1,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return n,
                Err(e) => panic!("accept: {e}"),
            }
        }
    }
}

/// What a test's agents talk to, in the test's own network namespace: listeners on one
/// port of 192.0.2.2, 192.0.2.3, 2001:db8::2 and 127.0.0.1, the upstream, and the fake
/// resolvers at the hard-coded addresses.
struct World {
    port: u16,
    allowed: Listener,
    other: Listener,
    v6: Listener,
    /// On 127.0.0.1: what loop.test, zero.test and mapped.test would reach if admitted.
    local: Listener,
    upstream: FakeDns,
    hard_coded: Vec<FakeDns>,
}

impl World {
    /// The upstream's answers carry `ttl`.
    fn new(ttl: u32) -> World {
        // First: everything below (sockets, threads, agentd and its agents) lives there.
        private_netns(&[ALLOWED, OTHER], &[V6]);
        let (port, allowed, other, v6, local) = (0..20)
            .find_map(|_| {
                let allowed = Listener::bind((ALLOWED, 0).into()).unwrap();
                let port = allowed.0.local_addr().unwrap().port();
                let other = Listener::bind((OTHER, port).into()).ok()?;
                let v6 = Listener::bind((V6, port).into()).ok()?;
                let local = Listener::bind((Ipv4Addr::LOCALHOST, port).into()).ok()?;
                Some((port, allowed, other, v6, local))
            })
            .expect("no port free on 192.0.2.2, 192.0.2.3, 2001:db8::2 and 127.0.0.1");
        // If agentd let a query through, these would answer it with other.test's address.
        let liar = || {
            Zone::new(60)
                .addr("allowed.test", OTHER)
                .addr("v6.test", OTHER)
        };
        let hard_coded = [HARD_CODED_V4, HARD_CODED_V6]
            .into_iter()
            .map(|ip| FakeDns::start(ip.parse().unwrap(), 53, liar()))
            .collect();
        World {
            port,
            allowed,
            other,
            v6,
            local,
            upstream: FakeDns::upstream(upstream_zone(ttl)),
            hard_coded,
        }
    }

    fn upstream_addr(&self) -> String {
        self.upstream.addr().to_string()
    }

    /// A profile allowing `connect` (rules, `{port}` standing for this world's port),
    /// whose breaker trips on `trip_on` only.
    fn profile(&self, name: &str, connect: &[&str], trip_on: &str) -> (tempfile::TempDir, PathBuf) {
        let rules: Vec<String> = connect
            .iter()
            .map(|r| r.replace("{port}", &self.port.to_string()))
            .collect();
        profile_file(
            &test_profile(
                name,
                "invoker",
                DEFAULT_LIMITS,
                &format!("[breaker]\ntrip_on = [{trip_on}]\n"),
            )
            .replacen("connect = []", &format!("connect = {rules:?}"), 1),
        )
    }

    /// `agentd run --dns-upstream UPSTREAM` of `script` under `profile`.
    fn run(&self, profile: &std::path::Path, script: &str) -> Run {
        let ws = agent_dir(false);
        AgentRun::new(profile.to_str().unwrap(), ws.path())
            .arg("--dns-upstream")
            .arg(&self.upstream_addr())
            .python(&self.script(script))
            .run()
    }

    /// `script` after [`PY_ATTEMPT`] and [`PY_DNS`], with `P` this world's port and
    /// `UPSTREAM` the upstream's address.
    fn script(&self, script: &str) -> String {
        let up = self.upstream.addr();
        format!(
            "{PY_ATTEMPT}{PY_DNS}\nP = {}\nUPSTREAM = (\"{}\", {})\n{script}",
            self.port,
            up.ip(),
            up.port()
        )
    }

    /// The resolvers the agents addressed directly were never reached: agentd answered.
    fn assert_hard_coded_saw_nothing(&self) {
        for fake in &self.hard_coded {
            assert_eq!(
                fake.asked(),
                [],
                "the resolver at {} was asked",
                fake.addr()
            );
        }
    }
}

/// Python for the agents (after [`PY_ATTEMPT`]): `connect(host, port)` resolves with
/// glibc's getaddrinfo, which asks the nameserver of /etc/resolv.conf, whatever it is
/// (agentd steers it), and connects; `udp_query(server, name)` and `tcp_query(...)` send a
/// query built by hand to `server` port 53 and return what the answer says; `result(key,
/// f)` records f's value, or `{"errno": ...}`, in `out[key]`.
const PY_DNS: &str = r#"
import struct, time
def connect(host, port, family=0):
    fam, _, _, _, addr = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0]
    s = socket.socket(fam)
    s.settimeout(3)
    s.connect(addr)
    s.close()
QTYPE = {"A": 1, "AAAA": 28}
def question(name, qtype, qid=None):
    qid = int.from_bytes(os.urandom(2), "big") if qid is None else qid
    msg = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        msg += bytes([len(label)]) + label.encode()
    return qid, msg + b"\0" + struct.pack(">HH", QTYPE[qtype], 1)
def read_answer(qid, msg):
    rid, flags, qdcount, ancount = struct.unpack(">HHHH", msg[:8])
    if rid != qid:
        raise OSError(errno.EBADMSG, "answer id %d, query id %d" % (rid, qid))
    def skip_name(p):
        while True:
            if msg[p] == 0:
                return p + 1
            if msg[p] >= 0xC0:
                return p + 2
            p += 1 + msg[p]
    p = 12
    for _ in range(qdcount):
        p = skip_name(p) + 4
    addrs, ttls = [], []
    for _ in range(ancount):
        p = skip_name(p)
        rtype, _, ttl, n = struct.unpack(">HHIH", msg[p:p + 10])
        p += 10
        if rtype in (1, 28):
            family = socket.AF_INET if rtype == 1 else socket.AF_INET6
            addrs.append(socket.inet_ntop(family, msg[p:p + n]))
            ttls.append(ttl)
        p += n
    return {"rcode": flags & 0xF, "addrs": addrs, "ttls": ttls}
def family_of(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET
def udp_query(server, name, qtype="A"):
    # sendto without connect; the answer must come from where the query went.
    qid, q = question(name, qtype)
    s = socket.socket(family_of(server), socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(q, (server, 53))
    msg, source = s.recvfrom(65535)
    r = read_answer(qid, msg)
    r["from"] = [source[0], source[1]]
    return r
def tcp_query(server, name, qtype="A"):
    qid, q = question(name, qtype)
    s = socket.create_connection((server, 53), timeout=3)
    s.sendall(struct.pack(">H", len(q)) + q)
    def exactly(n):
        b = b""
        while len(b) < n:
            chunk = s.recv(n - len(b))
            if not chunk:
                raise OSError(errno.ECONNRESET, "closed after %d bytes" % len(b))
            b += chunk
        return b
    (n,) = struct.unpack(">H", exactly(2))
    return read_answer(qid, exactly(n))
def result(key, f):
    try:
        out[key] = f()
    except OSError as e:
        out[key] = {"errno": e.errno, "error": str(e)}
"#;

/// A test's events, with what to show when an assertion about them fails.
struct Events<'a> {
    list: &'a [Value],
    context: String,
}

impl<'a> Events<'a> {
    fn of(run: &'a Run) -> Events<'a> {
        Events {
            list: &run.events,
            context: run.explain(),
        }
    }

    /// The `dns` events of queries for `domain` of type `qtype`.
    fn dns(&self, domain: &str, qtype: &str) -> Vec<&'a Value> {
        self.list
            .iter()
            .filter(|e| e["kind"] == "dns" && e["domain"] == domain && e["detail"]["type"] == qtype)
            .collect()
    }

    /// The `net_connect` events to `addr`:`port` with `verdict`.
    fn connects(&self, verdict: &str, addr: &str, port: u16) -> Vec<&'a Value> {
        self.list
            .iter()
            .filter(|e| {
                e["kind"] == "net_connect"
                    && e["verdict"] == verdict
                    && e["addr"] == addr
                    && e["port"] == port
            })
            .collect()
    }

    /// `domain` (type `qtype`) was answered by agentd with `answers` and `ttl`.
    fn assert_answered(&self, domain: &str, qtype: &str, answers: &[&str], ttl: u64) {
        let e = self
            .dns(domain, qtype)
            .into_iter()
            .find(|e| e["verdict"] == "allow")
            .unwrap_or_else(|| panic!("no dns allow event for {domain} {qtype}\n{}", self.context));
        assert_eq!(
            (
                &e["layer"],
                &e["detail"]["rcode"],
                &e["detail"]["answers"],
                &e["detail"]["ttl"]
            ),
            (
                &json!("resolver"),
                &json!("NOERROR"),
                &json!(answers),
                &json!(ttl)
            ),
            "{e}\n{}",
            self.context
        );
    }

    /// `domain` was refused at resolution: a `dns` deny event, NXDOMAIN.
    fn assert_refused(&self, domain: &str) {
        let e = self
            .list
            .iter()
            .find(|e| e["kind"] == "dns" && e["domain"] == domain)
            .unwrap_or_else(|| panic!("no dns event for {domain}\n{}", self.context));
        assert_eq!(
            (&e["verdict"], &e["layer"], &e["detail"]["rcode"]),
            (&json!("deny"), &json!("resolver"), &json!("NXDOMAIN")),
            "{e}\n{}",
            self.context
        );
    }

    /// Connects to `addr`:`port` were allowed, and reported with the name the address
    /// was admitted for.
    fn assert_connect_named(&self, addr: &str, port: u16, domain: &str) {
        let evs = self.connects("allow", addr, port);
        assert!(
            !evs.is_empty(),
            "no allowed net_connect to {addr}:{port}\n{}",
            self.context
        );
        for e in evs {
            assert_eq!(
                (&e["layer"], &e["domain"]),
                (&json!("bpf"), &json!(domain)),
                "{e}\n{}",
                self.context
            );
        }
    }

    /// A connect to `addr`:`port` was refused in the kernel.
    fn assert_connect_refused(&self, addr: &str, port: u16) {
        let evs = self.connects("deny", addr, port);
        let e = evs
            .first()
            .unwrap_or_else(|| panic!("no refused net_connect to {addr}:{port}\n{}", self.context));
        assert_eq!(
            (&e["layer"], &e["errno"]),
            (&json!("bpf"), &json!(EPERM)),
            "{e}\n{}",
            self.context
        );
    }

    fn assert_no_breaker(&self) {
        assert!(
            self.list.iter().all(|e| e["kind"] != "breaker"),
            "the breaker tripped\n{}",
            self.context
        );
    }
}

/// `allowed.test:PORT` lets the agent reach allowed.test by name — through glibc, a raw
/// UDP query and a TCP query, each addressed to a resolver the agent hard-codes, which
/// agentd answers in its place — and nothing else: not the address before it is
/// resolved, not another port or UDP, not other.test (refused at resolution, never
/// forwarded) nor its address, nor the upstream itself.
#[test]
fn dns_allowed_name_is_reached_and_nothing_else() {
    if !require_root() {
        return;
    }
    let w = World::new(60);
    let (_p, profile) = w.profile("dns-allowed", &["allowed.test:{port}"], "\"canary\"");
    let run = w.run(
        &profile,
        r#"
attempt("before", lambda: connect("192.0.2.2", P))
attempt("by_name", lambda: connect("allowed.test", P))
result("udp", lambda: udp_query("127.0.0.5", "allowed.test"))
result("tcp", lambda: tcp_query("127.0.0.5", "allowed.test"))
attempt("by_addr", lambda: connect("192.0.2.2", P))
attempt("other_port", lambda: connect("192.0.2.2", 1))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt("udp_send", lambda: udp.sendto(b"x", ("192.0.2.2", P)))
attempt("other_name", lambda: connect("other.test", P))
result("other_udp", lambda: udp_query("127.0.0.5", "other.test"))
attempt("other_addr", lambda: connect("192.0.2.3", P))
attempt("upstream_udp", lambda: udp.sendto(question("other.test", "A")[1], UPSTREAM))
attempt("upstream_tcp", lambda: socket.create_connection(UPSTREAM, timeout=3))
print(json.dumps(out))
"#,
    );
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    for (key, want) in [
        ("before", EPERM),
        ("upstream_udp", EPERM),
        ("upstream_tcp", EPERM),
        ("by_name", 0),
        ("by_addr", 0),
        ("other_port", EPERM),
        ("udp_send", EPERM),
        ("other_name", EAI_NONAME),
        ("other_addr", EPERM),
    ] {
        assert_eq!(r[key], want, "{key}: {r}");
    }
    assert_eq!(
        r["udp"],
        json!({"rcode": 0, "addrs": ["192.0.2.2"], "ttls": [60], "from": [HARD_CODED_V4, 53]}),
        "{r}"
    );
    assert_eq!(
        r["tcp"],
        json!({"rcode": 0, "addrs": ["192.0.2.2"], "ttls": [60]}),
        "{r}"
    );
    assert_eq!(
        r["other_udp"],
        json!({"rcode": 3, "addrs": [], "ttls": [], "from": [HARD_CODED_V4, 53]}),
        "{r}"
    );
    assert_eq!(w.allowed.accepted(), 2, "connections to allowed.test");
    assert_eq!(w.other.accepted(), 0, "connections to other.test's address");
    w.assert_hard_coded_saw_nothing();
    assert_eq!(
        w.upstream.names(),
        ["allowed.test"],
        "{:?}",
        w.upstream.asked()
    );

    let evs = Events::of(&run);
    evs.assert_answered("allowed.test", "A", &["192.0.2.2"], 60);
    evs.assert_refused("other.test");
    evs.assert_connect_named("192.0.2.2", w.port, "allowed.test");
    evs.assert_connect_refused("192.0.2.3", w.port);
    evs.assert_no_breaker();
}

/// An admission lasts the answer's TTL, clamped to at least 2 s (the upstream says 1 s;
/// the answer the agent gets says 2): then a new connect to the address is refused, until
/// the agent resolves the name again.
#[test]
fn dns_admission_expires_with_the_ttl_until_resolved_again() {
    if !require_root() {
        return;
    }
    let w = World::new(1);
    let (_p, profile) = w.profile("dns-ttl", &["allowed.test:{port}"], "\"canary\"");
    let run = w.run(
        &profile,
        r#"
result("udp", lambda: udp_query("127.0.0.5", "allowed.test"))
attempt("fresh", lambda: connect("192.0.2.2", P))
# Past the TTL, then until a connect is refused (at most 30 s more).
time.sleep(2.5)
out["meanwhile"] = 0
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        connect("192.0.2.2", P)
        out["meanwhile"] += 1
    except OSError as e:
        out["expired"] = e.errno
        break
    time.sleep(0.5)
attempt("resolved_again", lambda: connect("allowed.test", P))
print(json.dumps(out))
"#,
    );
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    assert_eq!(r["udp"]["addrs"], json!(["192.0.2.2"]), "{r}");
    assert_eq!(r["udp"]["ttls"], json!([2]), "the TTL the agent sees: {r}");
    assert_eq!(r["fresh"], 0, "{r}");
    assert_eq!(r["expired"], EPERM, "{r}");
    assert_eq!(r["resolved_again"], 0, "{r}");
    let meanwhile = usize::try_from(r["meanwhile"].as_u64().unwrap()).unwrap();
    assert_eq!(w.allowed.accepted(), 2 + meanwhile, "{r}");
    w.assert_hard_coded_saw_nothing();

    let evs = Events::of(&run);
    evs.assert_answered("allowed.test", "A", &["192.0.2.2"], 2);
    evs.assert_connect_named("192.0.2.2", w.port, "allowed.test");
    evs.assert_connect_refused("192.0.2.2", w.port);
}

/// `*.wild.test` matches every name strictly below wild.test, whatever its case, and
/// neither wild.test itself nor a name that merely ends with the same letters.
#[test]
fn dns_wildcard_rule_matches_names_strictly_below() {
    if !require_root() {
        return;
    }
    let w = World::new(60);
    let (_p, profile) = w.profile("dns-wild", &["*.wild.test:{port}"], "\"canary\"");
    let run = w.run(
        &profile,
        r#"
for name in ["a.wild.test", "b.c.wild.test", "A.Wild.TEST", "wild.test", "notwild.test"]:
    attempt(name, lambda: connect(name, P))
print(json.dumps(out))
"#,
    );
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    assert_eq!(
        r,
        json!({"a.wild.test": 0, "b.c.wild.test": 0, "A.Wild.TEST": 0,
               "wild.test": EAI_NONAME, "notwild.test": EAI_NONAME}),
        "{}",
        run.explain()
    );
    assert_eq!(w.allowed.accepted(), 3);
    assert_eq!(
        w.upstream.names(),
        ["a.wild.test", "b.c.wild.test"],
        "{:?}",
        w.upstream.asked()
    );
    let evs = Events::of(&run);
    evs.assert_answered("b.c.wild.test", "A", &["192.0.2.2"], 60);
    evs.assert_refused("wild.test");
    evs.assert_refused("notwild.test");
    // Each connect is reported with a name its address was admitted for.
    let allowed = evs.connects("allow", "192.0.2.2", w.port);
    assert!(!allowed.is_empty(), "{}", evs.context);
    for e in allowed {
        let domain = e["domain"].as_str().unwrap_or("");
        assert!(
            ["a.wild.test", "b.c.wild.test"].contains(&domain),
            "{e}\n{}",
            evs.context
        );
    }
}

/// A name's AAAA records are admitted as its A records are: 2001:db8::2 is refused until
/// v6.test is resolved, by glibc or by queries over IPv6 to a hard-coded [::1]:53 (UDP and
/// TCP), which agentd answers from that address.
#[test]
fn dns_ipv6_addresses_are_admitted_by_name() {
    if !require_root() {
        return;
    }
    let w = World::new(60);
    let (_p, profile) = w.profile("dns-v6", &["v6.test:{port}"], "\"canary\"");
    let run = w.run(
        &profile,
        r#"
attempt("before", lambda: connect("2001:db8::2", P))
attempt("by_name", lambda: connect("v6.test", P, socket.AF_INET6))
result("udp6", lambda: udp_query("::1", "v6.test", "AAAA"))
result("tcp6", lambda: tcp_query("::1", "v6.test", "AAAA"))
attempt("by_addr", lambda: connect("2001:db8::2", P))
attempt("v4", lambda: connect("192.0.2.2", P))
print(json.dumps(out))
"#,
    );
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    for (key, want) in [
        ("before", EPERM),
        ("by_name", 0),
        ("by_addr", 0),
        ("v4", EPERM),
    ] {
        assert_eq!(r[key], want, "{key}: {r}");
    }
    assert_eq!(
        r["udp6"],
        json!({"rcode": 0, "addrs": ["2001:db8::2"], "ttls": [60], "from": [HARD_CODED_V6, 53]}),
        "{r}"
    );
    assert_eq!(
        r["tcp6"],
        json!({"rcode": 0, "addrs": ["2001:db8::2"], "ttls": [60]}),
        "{r}"
    );
    assert_eq!(w.v6.accepted(), 2, "connections to [2001:db8::2]");
    assert_eq!(w.allowed.accepted(), 0);
    w.assert_hard_coded_saw_nothing();
    let evs = Events::of(&run);
    evs.assert_answered("v6.test", "AAAA", &["2001:db8::2"], 60);
    evs.assert_connect_named("2001:db8::2", w.port, "v6.test");
    evs.assert_connect_refused("2001:db8::2", w.port);
}

/// A CNAME chain admits the addresses at its end for the name asked, whether the target
/// is itself allowed (to-allowed.test -> allowed.test) or not (to-other.test ->
/// other.test, which stays refused when asked directly); an address the answer carries
/// for an owner outside the chain (stray.test's answer holding other.test's) is not
/// admitted.
#[test]
fn dns_cname_chain_admits_its_end_and_nothing_beside() {
    if !require_root() {
        return;
    }
    let w = World::new(60);
    let rules = [
        "allowed.test:{port}",
        "to-allowed.test:{port}",
        "to-other.test:{port}",
        "stray.test:{port}",
    ];
    let (_p, profile) = w.profile("dns-cname", &rules, "\"canary\"");
    let run = w.run(
        &profile,
        r#"
result("stray", lambda: udp_query("127.0.0.5", "stray.test"))
attempt("stray_other_addr", lambda: connect("192.0.2.3", P))
attempt("to_allowed", lambda: connect("to-allowed.test", P))
attempt("other_name", lambda: connect("other.test", P))
attempt("to_other", lambda: connect("to-other.test", P))
print(json.dumps(out))
"#,
    );
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    assert!(
        r["stray"]["addrs"]
            .as_array()
            .is_some_and(|a| a.contains(&json!("192.0.2.2"))),
        "{r}"
    );
    for (key, want) in [
        ("stray_other_addr", EPERM),
        ("to_allowed", 0),
        ("other_name", EAI_NONAME),
        ("to_other", 0),
    ] {
        assert_eq!(r[key], want, "{key}: {r}");
    }
    assert_eq!(
        w.allowed.accepted(),
        1,
        "connections to allowed.test's address"
    );
    assert_eq!(w.other.accepted(), 1, "connections to other.test's address");
    w.assert_hard_coded_saw_nothing();
    let evs = Events::of(&run);
    evs.assert_answered("to-allowed.test", "A", &["192.0.2.2"], 60);
    evs.assert_answered("to-other.test", "A", &["192.0.2.3"], 60);
    evs.assert_refused("other.test");
    evs.assert_connect_refused("192.0.2.3", w.port);
    evs.assert_connect_named("192.0.2.3", w.port, "to-other.test");
}

/// Addresses of this host or of no host are never admitted by name (DNS rebinding to
/// the host's own services): allowed names answered 127.0.0.1 (loop.test), 0.0.0.0
/// (zero.test) or, as an IPv4-mapped AAAA, ::ffff:127.0.0.1 (mapped.test) get the agent
/// the upstream's answer, but its connects to those addresses are refused and nothing
/// reaches the listener on 127.0.0.1; the `dns` events list them as refused answers.
#[test]
fn dns_answers_of_this_host_are_answered_not_admitted() {
    if !require_root() {
        return;
    }
    let w = World::new(60);
    let rules = ["loop.test:{port}", "zero.test:{port}", "mapped.test:{port}"];
    let (_p, profile) = w.profile("dns-special", &rules, "\"canary\"");
    let run = w.run(
        &profile,
        r#"
result("loop", lambda: udp_query("127.0.0.5", "loop.test"))
result("zero", lambda: tcp_query("127.0.0.5", "zero.test"))
result("mapped", lambda: udp_query("::1", "mapped.test", "AAAA"))
attempt("loop_name", lambda: connect("loop.test", P))
attempt("loop_addr", lambda: connect("127.0.0.1", P))
attempt("zero_name", lambda: connect("zero.test", P))
attempt("zero_addr", lambda: connect("0.0.0.0", P))
attempt("mapped_name", lambda: connect("mapped.test", P, socket.AF_INET6))
attempt("mapped_addr", lambda: connect("::ffff:127.0.0.1", P))
print(json.dumps(out))
"#,
    );
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    // The agent gets the upstream's answers, unchanged.
    assert_eq!(
        r["loop"],
        json!({"rcode": 0, "addrs": ["127.0.0.1"], "ttls": [60], "from": [HARD_CODED_V4, 53]}),
        "{r}"
    );
    assert_eq!(
        r["zero"],
        json!({"rcode": 0, "addrs": ["0.0.0.0"], "ttls": [60]}),
        "{r}"
    );
    assert_eq!(
        r["mapped"],
        json!({"rcode": 0, "addrs": ["::ffff:127.0.0.1"], "ttls": [60], "from": ["::1", 53]}),
        "{r}"
    );
    for key in [
        "loop_name",
        "loop_addr",
        "zero_name",
        "zero_addr",
        "mapped_name",
        "mapped_addr",
    ] {
        assert_eq!(r[key], EPERM, "{key}: {r}");
    }
    assert_eq!(w.local.accepted(), 0, "connections to 127.0.0.1");
    w.assert_hard_coded_saw_nothing();
    assert_eq!(
        w.upstream.names(),
        ["loop.test", "zero.test", "mapped.test"],
        "{:?}",
        w.upstream.asked()
    );

    let evs = Events::of(&run);
    for (domain, qtype, refused) in [
        ("loop.test", "A", "127.0.0.1"),
        ("zero.test", "A", "0.0.0.0"),
        ("mapped.test", "AAAA", "::ffff:127.0.0.1"),
    ] {
        let answered = evs.dns(domain, qtype);
        assert!(
            !answered.is_empty(),
            "no dns event for {domain} {qtype}\n{}",
            evs.context
        );
        for e in answered {
            assert_eq!(
                (
                    &e["verdict"],
                    &e["detail"]["rcode"],
                    &e["detail"]["answers"],
                    &e["detail"]["refused_answers"]
                ),
                (
                    &json!("allow"),
                    &json!("NOERROR"),
                    &json!([]),
                    &json!([refused])
                ),
                "{e}\n{}",
                evs.context
            );
        }
    }
    evs.assert_connect_refused("127.0.0.1", w.port);
    evs.assert_connect_refused("0.0.0.0", w.port);
    // The IPv4-mapped address too, reported as its IPv4 address.
    assert!(
        evs.connects("deny", "127.0.0.1", w.port)
            .iter()
            .any(|e| e["detail"]["family"] == "inet6"),
        "no refused IPv6 connect to ::ffff:127.0.0.1\n{}",
        evs.context
    );
    let allowed: Vec<&Value> = evs
        .list
        .iter()
        .filter(|e| e["kind"] == "net_connect" && e["verdict"] == "allow" && e["port"] == w.port)
        .collect();
    assert_eq!(allowed, [] as [&Value; 0], "{}", evs.context);
    evs.assert_no_breaker();
}

/// `trip_on = ["dns"]`: a refused name trips the breaker (an allowed one does not).
#[test]
fn dns_refused_name_trips_the_breaker() {
    if !require_root() {
        return;
    }
    let w = World::new(60);
    let (_p, profile) = w.profile("dns-trip", &["allowed.test:{port}"], "\"dns\"");
    let run = w.run(
        &profile,
        r#"
connect("allowed.test", P)
print("allowed", flush=True)
attempt("other_name", lambda: connect("other.test", P))
time.sleep(20)
print("survived")
"#,
    );
    assert_eq!(run.code(), 137, "{}", run.explain());
    assert!(run.stdout().contains("allowed"), "{}", run.explain());
    assert!(!run.stdout().contains("survived"), "{}", run.explain());
    let b = run
        .event("breaker")
        .unwrap_or_else(|| panic!("no breaker event\n{}", run.explain()));
    assert_eq!(b["detail"]["rule"], "trip_on:dns", "{b}");
    let trigger = &b["detail"]["trigger"];
    assert_eq!(
        (&trigger["kind"], &trigger["domain"]),
        (&json!("dns"), &json!("other.test")),
        "{b}"
    );
    assert_eq!(w.allowed.accepted(), 1);
}

/// A process outside the agent (another user's, in no agent) that sends to the agent's
/// resolver port gets nothing from it: no answer, no admission, no event in the agent's
/// name, no breaker trip (the profile trips on `dns`), nothing asked upstream.
#[test]
fn dns_resolver_answers_its_agent_only() {
    if !require_root() {
        return;
    }
    let w = World::new(60);
    let (_p, profile) = w.profile("dns-outsider", &["allowed.test:{port}"], "\"dns\"");
    let ws = agent_dir(false);
    let agent = AgentRun::new(profile.to_str().unwrap(), ws.path())
        .arg("--dns-upstream")
        .arg(&w.upstream_addr())
        .python(&w.script(
            r#"
connect("allowed.test", P)
# Until the test has finished with its outsider (a slow machine's minutes at most).
for _ in range(1200):
    if os.path.exists("go"):
        break
    time.sleep(0.1)
print("survived")
"#,
        ));
    // A thread of this test's: the agent is in this test's network namespace.
    let running = std::thread::spawn(move || agent.run());
    // The resolver's port: the one UDP socket listening on 127.0.0.1 besides the upstream.
    let upstream_port = w.upstream.addr().port();
    let mut port = None;
    wait_until(Duration::from_secs(120), "the agent's resolver", || {
        port = listening_udp_127_0_0_1()
            .into_iter()
            .find(|p| *p != upstream_port);
        port.is_some()
    });
    let port = port.unwrap();
    let outsider = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(format!(
            r#"
import json, socket, struct
def q(name):
    return struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"".join(
        bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
out = {{}}
for name in ["other.test", "allowed.test"]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    s.sendto(q(name), ("127.0.0.1", {port}))
    try:
        out["udp " + name] = len(s.recv(512))
    except OSError as e:
        out["udp " + name] = type(e).__name__
    try:
        t = socket.create_connection(("127.0.0.1", {port}), timeout=1)
        t.sendall(struct.pack(">H", len(q(name))) + q(name))
        out["tcp " + name] = len(t.recv(512))
    except OSError as e:
        out["tcp " + name] = type(e).__name__
print(json.dumps(out))
"#
        ))
        .uid(65533)
        .gid(65533)
        .output()
        .unwrap();
    // The agent may end now.
    std::fs::write(ws.path().join("go"), "").unwrap();
    let got: Value = serde_json::from_slice(&outsider.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&outsider.stderr)));
    for (what, answer) in got.as_object().unwrap() {
        // UDP: no answer (a timeout); TCP: closed at once (0 bytes, or reset while the
        // query was on its way).
        assert!(
            answer == "TimeoutError"
                || answer == 0
                || answer == "ConnectionResetError"
                || answer == "BrokenPipeError",
            "the outsider got an answer to {what}: {got}"
        );
    }
    let run = running.join().unwrap();
    assert_eq!(run.code(), 0, "the agent lives\n{}", run.explain());
    assert!(run.stdout().contains("survived"), "{}", run.explain());
    let names: Vec<&Value> = run
        .events
        .iter()
        .filter(|e| e["kind"] == "dns")
        .map(|e| &e["domain"])
        .collect();
    assert!(
        names.iter().all(|n| *n == "allowed.test"),
        "only the agent's own lookups are its events: {names:?}"
    );
    assert!(
        !w.upstream.names().contains(&"other.test".to_owned()),
        "{:?}",
        w.upstream.asked()
    );
    assert_eq!(
        w.upstream
            .asked()
            .iter()
            .filter(|a| a.name == "allowed.test" && a.qtype == "A")
            .count(),
        1,
        "the agent's one lookup of allowed.test, not the outsider's: {:?}",
        w.upstream.asked()
    );
}

/// Ports of the UDP sockets listening on 127.0.0.1 (in this thread's network namespace:
/// /proc/thread-self/net is its own).
fn listening_udp_127_0_0_1() -> Vec<u16> {
    let table = std::fs::read_to_string("/proc/thread-self/net/udp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (local, remote) = (f.nth(1)?, f.next()?);
            let (addr, port) = local.split_once(':')?;
            (addr == "0100007F" && remote == "00000000:0000")
                .then(|| u16::from_str_radix(port, 16).ok())
                .flatten()
        })
        .collect()
}

/// A flood of queries is refused past the resolver's bounds — its rate (200/s, burst
/// 400) or the queries already waiting for the upstream (32), whichever a machine's speed
/// reaches first — answered REFUSED, not forwarded, and every refusal counted in `dns`
/// denials that say which bound. (The budget's arithmetic is unit-tested in `dns/`.)
#[test]
fn dns_query_flood_is_refused_past_the_resolvers_bounds() {
    if !require_root() {
        return;
    }
    let w = World::new(60);
    let (_p, profile) = w.profile("dns-rate", &["allowed.test:{port}"], "\"canary\"");
    let run = w.run(
        &profile,
        r#"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
import time
# In chunks, so the resolver's socket buffer takes them all: past the burst, the rate.
for qid in range(1000):
    s.sendto(question("allowed.test", "A", qid)[1], ("127.0.0.5", 53))
    if qid % 100 == 99:
        time.sleep(0.01)
s.settimeout(3)
rcodes = {}
try:
    while True:
        msg = s.recv(65535)
        rcode = str(struct.unpack(">H", msg[2:4])[0] & 0xF)
        rcodes[rcode] = rcodes.get(rcode, 0) + 1
except socket.timeout:
    pass
out["rcodes"] = rcodes
print(json.dumps(out))
"#,
    );
    assert_eq!(run.code(), 0, "{}", run.explain());
    let r = run.json();
    let refused = r["rcodes"]["5"].as_u64().unwrap_or(0);
    assert!(refused > 0, "no REFUSED answer: {r}");
    let forwarded = w.upstream.asked().len() as u64;
    assert!(
        forwarded + refused <= 1000,
        "forwarded {forwarded}, refused {refused}"
    );
    // Every refusal is counted and says its bound: for the rate, the first when it
    // happens and the rest of the second in one event (`detail.limit: "rate"`, `count`);
    // for queries already waiting on the upstream (`in_flight`), each as it happens,
    // identical ones folded (`repeated`).
    let counted: u64 = run
        .events
        .iter()
        .filter(|e| e["kind"] == "dns" && e["verdict"] == "deny")
        .map(|e| {
            let d = &e["detail"];
            d["count"].as_u64().or(d["repeated"].as_u64()).unwrap_or(1)
        })
        .sum();
    assert!(
        counted >= refused,
        "{refused} REFUSED answers, {counted} counted\n{}",
        run.explain()
    );
    let refusals: Vec<&Value> = run
        .events
        .iter()
        .filter(|e| e["kind"] == "dns" && e["verdict"] == "deny")
        .collect();
    assert!(
        refusals
            .iter()
            .all(|e| e["detail"]["limit"] == "rate" || e["detail"]["limit"] == "in_flight"),
        "a refusal that names no bound\n{}",
        run.explain()
    );
    w.assert_hard_coded_saw_nothing();
}

/// An `agentd run` client in the background; ended (SIGTERM, which it forwards to its
/// agent) if the test fails before it finishes.
struct Client(Option<Child>);

impl Client {
    fn finish(mut self) -> Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
    fn still_running(&mut self, what: &str) {
        if let Some(st) = self.0.as_mut().unwrap().try_wait().unwrap() {
            let out = self.0.take().unwrap().wait_with_output().unwrap();
            panic!(
                "{what} exited early ({st}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            // SAFETY: kill takes a pid and a signal number; the pid is our child's.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

/// Through the daemon (`agentd daemon --dns-upstream`), one resolver for two agents with
/// different names: each reaches its own name and neither the other's name nor the
/// address admitted for the other, while that admission is live.
#[test]
fn dns_daemon_two_agents_no_cross_admission() {
    if !require_root() {
        return;
    }
    let w = World::new(60);
    let d = Daemon::start_with_args(&["--dns-upstream", &w.upstream_addr()]);
    let agent = |name: &str, own: (&str, &str), other: (&str, &str)| {
        let ws = agent_dir(true);
        let (_p, profile) = w.profile(name, &[&format!("{}:{{port}}", own.0)], "\"canary\"");
        let script = w.script(&format!(
            r#"
attempt("own", lambda: connect("{own_name}", P))
attempt("other_name", lambda: connect("{other_name}", P))
open("ready", "w").close()
for _ in range(1200):
    if os.path.exists("go"):
        break
    time.sleep(0.05)
attempt("other_addr", lambda: connect("{other_addr}", P))
attempt("own_again", lambda: connect("{own_addr}", P))
print(json.dumps(out))
"#,
            own_name = own.0,
            own_addr = own.1,
            other_name = other.0,
            other_addr = other.1,
        ));
        let client = Client(Some(d.run(
            &profile,
            ws.path(),
            &["/usr/bin/python3", "-c", &script],
        )));
        (client, ws, _p)
    };
    let (mut a, ws_a, _pa) = agent(
        "dns-daemon-a",
        ("allowed.test", "192.0.2.2"),
        ("other.test", "192.0.2.3"),
    );
    let (mut b, ws_b, _pb) = agent(
        "dns-daemon-b",
        ("other.test", "192.0.2.3"),
        ("allowed.test", "192.0.2.2"),
    );
    let ready = |ws: &tempfile::TempDir| ws.path().join("ready").exists();
    wait_until_or(
        Duration::from_secs(120),
        || {
            a.still_running("agent A");
            b.still_running("agent B");
            ready(&ws_a) && ready(&ws_b)
        },
        || format!("both agents resolved their names\n{}", d.log()),
    );
    // Both admissions are live: now each tries the other's address.
    for ws in [&ws_a, &ws_b] {
        std::fs::write(ws.path().join("go"), "").unwrap();
    }
    let results: Vec<Value> = [a, b]
        .into_iter()
        .map(|c| {
            let out = c.finish();
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "{e}: {:?}\n{}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        })
        .collect();
    for r in &results {
        assert_eq!(
            r,
            &json!({"own": 0, "other_name": EAI_NONAME, "other_addr": EPERM, "own_again": 0}),
            "{results:?}\n{}",
            d.log()
        );
    }
    assert_eq!(w.allowed.accepted(), 2, "connections to allowed.test");
    assert_eq!(w.other.accepted(), 2, "connections to other.test");
    w.assert_hard_coded_saw_nothing();

    let all = d.events();
    let agent_of = |domain: &str| {
        all.iter()
            .find(|e| e["kind"] == "dns" && e["domain"] == domain && e["verdict"] == "allow")
            .and_then(|e| e["agent"].as_str())
            .unwrap_or_else(|| panic!("no dns allow event for {domain}: {all:?}"))
            .to_owned()
    };
    let (id_a, id_b) = (agent_of("allowed.test"), agent_of("other.test"));
    assert_ne!(id_a, id_b);
    for (id, own, other, own_addr, other_addr) in [
        (
            &id_a,
            "allowed.test",
            "other.test",
            "192.0.2.2",
            "192.0.2.3",
        ),
        (
            &id_b,
            "other.test",
            "allowed.test",
            "192.0.2.3",
            "192.0.2.2",
        ),
    ] {
        let list: Vec<Value> = all
            .iter()
            .filter(|e| e["agent"] == id.as_str())
            .cloned()
            .collect();
        let evs = Events {
            list: &list,
            context: format!("agent {id}: {list:?}"),
        };
        evs.assert_answered(own, "A", &[own_addr], 60);
        evs.assert_refused(other);
        evs.assert_connect_named(own_addr, w.port, own);
        evs.assert_connect_refused(other_addr, w.port);
    }
}
