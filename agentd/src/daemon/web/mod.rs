//! The live web view (`agentd daemon --ui [ADDR:]PORT`): one page that lists the agents,
//! streams their events (server-sent events; refusals and breaker trips stand out), shows
//! an agent's compiled profile, answers held calls, and has the kill switch. Everything
//! it shows or does goes through the functions the control socket uses (`ps_rows`,
//! `kill_as`, `ask::decide_via`), so it is checked and audited as the CLI is.
//!
//! Access is the Jupyter pattern, tightened: `agentd ui-url` asks the daemon over the
//! control socket (root and --group members only, never a process inside an agent) for a
//! token bound to the caller's uid and groups ([`auth`]); `GET /?token=T` spends it for a
//! session, whose id the cookie carries (HttpOnly, SameSite=Strict). Every request must
//! come from a socket of this host made outside every agent's cgroup ([`client`]: an
//! agent runs as its owner's uid, so a stolen cookie would otherwise act as its owner),
//! name the view in `Host` (DNS rebinding) and, when it changes something, come from its
//! own page (`Origin`: CSRF) of a user still root or in --group. The page and its script
//! and style are embedded in the binary; it loads nothing from elsewhere (its
//! Content-Security-Policy says so to the browser too).

mod api;
pub(super) mod auth;
mod client;

use std::{
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use super::{
    Shared, lock,
    proto::{Reply, UiUrl},
};
use crate::{
    ask::WebSession,
    audit::record::{Action, Actor, Control},
    event::{Event, Kind, Layer, Verdict},
};

pub(super) use api::router;

/// Open pages (event streams) of one uid at most: each holds a subscription to the event
/// stream.
const MAX_STREAMS_PER_USER: usize = 16;

/// What the web view keeps: where it listens, the tokens `agentd ui-url` gave out and the
/// sessions they opened, and the pages now open (each counts as someone to ask, for the
/// requests its user may answer).
#[derive(Debug, Default)]
pub(super) struct Ui {
    /// `--ui`; None when the view is off.
    listen: Option<SocketAddr>,
    credentials: auth::Credentials,
    streams: std::sync::Mutex<Vec<(u64, Caller)>>,
    next_stream: AtomicU64,
}

impl Ui {
    /// The view as `--ui` asks (`None`: off; `outputs::parse_ui` took a TCP address with
    /// a port, which a browser can reach and `agentd ui-url` names).
    pub fn new(listen: Option<SocketAddr>) -> Ui {
        Ui {
            listen,
            ..Ui::default()
        }
    }
}

/// Who a request comes from: its session's user and expiry, and the session as the
/// audit log names it (its token's fingerprint, the TCP peer).
#[derive(Debug, Clone)]
struct Caller {
    user: auth::WebUser,
    expires: SystemTime,
    web: WebSession,
}

impl Caller {
    fn of(grant: auth::Grant, peer: SocketAddr) -> Caller {
        Caller {
            web: WebSession {
                token: grant.token.to_string(),
                peer: peer.to_string(),
            },
            user: grant.user,
            expires: grant.expires,
        }
    }
}

/// Registers an open page of `caller`'s; it counts until the guard is dropped. None: its
/// uid has too many open.
fn open_stream(shared: &Arc<Shared>, caller: &Caller) -> Option<StreamGuard> {
    let ui = &shared.ui;
    let mut streams = lock(&ui.streams);
    let uid = caller.user.uid;
    if streams.iter().filter(|(_, c)| c.user.uid == uid).count() >= MAX_STREAMS_PER_USER {
        return None;
    }
    let id = ui.next_stream.fetch_add(1, Ordering::Relaxed);
    streams.push((id, caller.clone()));
    Some(StreamGuard {
        shared: Arc::clone(shared),
        id,
    })
}

/// An open page's place in [`Ui::streams`].
struct StreamGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        lock(&self.shared.ui.streams).retain(|(id, _)| *id != self.id);
    }
}

/// Whether an open page belongs to someone who may answer requests of an agent owned by
/// `owner` (then the agent's held calls wait for them).
pub(super) fn can_answer(shared: &Shared, owner: u32) -> bool {
    let callers: Vec<Caller> = lock(&shared.ui.streams)
        .iter()
        .map(|(_, c)| c.clone())
        .collect();
    let now = SystemTime::now();
    callers.iter().any(|c| {
        c.expires > now
            && super::ask::may_answer_via(shared, &actor(&c.user), owner, via(c)).is_ok()
    })
}

/// Who acts for a page's user: their uid and gid, and the daemon's own pid (the process
/// that acts; as `agentd run` records its invoking user with its own pid). Which process
/// sent the request is not known; that it is none inside an agent is ([`screen`]).
fn actor(u: &auth::WebUser) -> Actor {
    Actor {
        uid: u.uid,
        gid: u.gid,
        pid: std::process::id(),
    }
}

fn via(c: &Caller) -> super::ask::Via<'_> {
    super::ask::Via::Web {
        groups: &c.user.groups,
        session: &c.web,
    }
}

/// Whether `user` may use the view at all, as `may_watch` decides for the control
/// socket: root, or a member of --group.
fn may_watch(shared: &Shared, user: &auth::WebUser) -> bool {
    user.uid == 0
        || shared
            .group_gid
            .is_some_and(|g| user.gid == g || user.groups.contains(&g))
}

/// `user` with their groups as the system has them now: the primary group of their
/// passwd entry and the groups that list them (getgrouplist). A user removed from
/// --group or --approvers loses what that gave them at their next action, not when their
/// token ends. Blocking (NSS may ask a directory server).
fn regrouped(user: &auth::WebUser) -> Result<auth::WebUser, String> {
    let uid = nix::unistd::Uid::from_raw(user.uid);
    let entry = nix::unistd::User::from_uid(uid)
        .map_err(|e| format!("looking up uid {}: {e}", user.uid))?
        .ok_or_else(|| format!("uid {} is no user of this host any more", user.uid))?;
    let name = std::ffi::CString::new(entry.name.as_bytes())
        .map_err(|_| format!("uid {}: a user name with a NUL", user.uid))?;
    let groups = nix::unistd::getgrouplist(&name, entry.gid)
        .map_err(|e| format!("the groups of user {}: getgrouplist: {e}", entry.name))?;
    Ok(auth::WebUser {
        uid: user.uid,
        gid: entry.gid.as_raw(),
        groups: groups.into_iter().map(|g| g.as_raw()).collect(),
    })
}

/// `agentd ui-url` from `who`, with supplementary `groups` (already known to be root or a
/// --group member, and no process inside an agent: the control connection's peer was
/// checked): a new token for them, in the view's URL; its issue is audited (`ui_token`).
pub(super) fn url_for(shared: &Shared, who: &Actor, groups: &[u32]) -> Reply {
    let Some(listen) = shared.ui.listen else {
        return Reply::Error(
            "this daemon serves no web view: start it with --ui [ADDR:]PORT (e.g. `agentd daemon --ui 8080`, on loopback; in the systemd unit, add it to ExecStart)".into(),
        );
    };
    let user = auth::WebUser {
        uid: who.uid,
        gid: who.gid,
        groups: groups.to_vec(),
    };
    let issued = match shared.ui.credentials.issue(user, SystemTime::now()) {
        Ok(t) => t,
        Err(e) => return Reply::Error(e.to_string()),
    };
    let grant = &issued.grant;
    audit(
        shared,
        Action::UiToken,
        *who,
        serde_json::json!({
            "token": grant.token.to_string(),
            "uid": grant.user.uid,
            "gid": grant.user.gid,
            "groups": grant.user.groups,
            "expires": utc(grant.expires),
        }),
    );
    Reply::UiUrl(UiUrl {
        url: format!("http://{}/?token={}", browsable(listen), issued.token),
        uid: grant.user.uid,
        expires: utc(grant.expires),
        valid_s: auth::TOKEN_TTL.as_secs(),
    })
}

/// A control record of the view's (no agent).
fn audit(shared: &Shared, action: Action, by: Actor, detail: serde_json::Value) {
    let detail = if let serde_json::Value::Object(m) = detail {
        m
    } else {
        serde_json::Map::new()
    };
    let control = Control {
        action,
        agent: None,
        by,
        detail,
    };
    super::audit_control(shared, &control);
}

/// Where a connection comes from, as far as the view may serve it.
#[derive(Debug)]
enum Source {
    /// A socket of this host, made outside every agent.
    Host,
    /// A socket made inside this agent (or a cgroup below its).
    Agent(String),
    /// Unknown: refused.
    Unknown(String),
}

/// Where the connection from `peer` to the view's `local` address comes from. Fails
/// closed: an unknown local address, a failed lookup, a socket the kernel does not know
/// (another host's), an agent's cgroup that cannot be read.
fn screen(shared: &Shared, peer: SocketAddr, local: Option<SocketAddr>) -> Source {
    let Some(local) = local else {
        return Source::Unknown(client::LookupError::NoLocalAddress.to_string());
    };
    match client::cgroup_of(peer, local) {
        Ok(cgroup) => match agent_with_cgroup(shared, cgroup) {
            Some(agent) => Source::Agent(agent),
            None => Source::Host,
        },
        Err(e) => Source::Unknown(e.to_string()),
    }
}

/// The agent whose cgroup, or a cgroup below it, has id `cgroup`. An agent's cgroup
/// directory that cannot be read counts as a match (fail closed).
fn agent_with_cgroup(shared: &Shared, cgroup: u64) -> Option<String> {
    let agents: Vec<(String, u64, std::path::PathBuf)> = lock(&shared.agents)
        .values()
        .map(|a| (a.id.clone(), a.cgroup_id, a.cgroup.clone()))
        .collect();
    if let Some((id, _, _)) = agents.iter().find(|(_, c, _)| *c == cgroup) {
        return Some(id.clone());
    }
    agents
        .into_iter()
        .find(|(_, _, dir)| !matches!(below(dir, cgroup), Ok(false)))
        .map(|(id, _, _)| id)
}

/// Whether a directory below `dir` has inode `ino` (a cgroup's id is its directory's
/// inode). A `dir` that is gone has nothing below it; another error is an error.
fn below(dir: &Path, ino: u64) -> std::io::Result<bool> {
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            if entry.metadata()?.ino() == ino {
                return Ok(true);
            }
            todo.push(entry.path());
        }
    }
    Ok(false)
}

/// A process inside `agent` used the web view: refused, and reported as that agent's
/// denial (a breaker violation; audited with the other events): an `approval` denial
/// when it tried to answer a request (as an answer through the control socket is), a
/// `net_connect` denial by agentd otherwise.
fn agent_refused(
    shared: &Shared,
    agent: &str,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    what: &str,
) {
    let answering = what
        .strip_prefix("POST /api/approvals/")
        .filter(|r| !r.is_empty() && !r.contains('/'));
    let ev = match answering {
        Some(request) => Event::new(agent, 0, "", Kind::Approval, Verdict::Deny, Layer::Ask)
            .with("request", request.to_owned())
            .with(
                "reason",
                "a process inside an agent tried to answer a request through the web view",
            ),
        None => {
            let mut ev = Event::new(agent, 0, "", Kind::Connect, Verdict::Deny, Layer::Agentd)
                .with("reason", "a process inside an agent used the web view");
            ev.addr = local.map(|l| l.ip());
            ev.port = local.map(|l| l.port());
            ev.proto = Some("tcp".into());
            ev
        }
    };
    let ev = ev
        .with("request_line", crate::ask::printable(what))
        .with("peer", peer.to_string());
    super::handle_event(shared, ev);
}

/// `t` as RFC 3339 UTC, to the second.
fn utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    crate::event::rfc3339_secs(secs)
}

/// The address a browser on this host uses for a view bound to `listen`: loopback when
/// bound to every address.
fn browsable(listen: SocketAddr) -> SocketAddr {
    if !listen.ip().is_unspecified() {
        return listen;
    }
    let loopback = match listen.ip() {
        std::net::IpAddr::V4(_) => std::net::IpAddr::from([127, 0, 0, 1]),
        std::net::IpAddr::V6(_) => std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
    };
    SocketAddr::new(loopback, listen.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_listens_where_ui_says() {
        assert!(Ui::new(None).listen.is_none());
        let ui = Ui::new(Some(super::super::outputs::parse_ui("8080").unwrap()));
        assert_eq!(ui.listen, Some("127.0.0.1:8080".parse().unwrap()));
    }

    #[test]
    fn expiries_read_to_the_second() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(86_400 + 61);
        assert_eq!(utc(t), "1970-01-02T00:01:01Z");
    }

    #[test]
    fn a_view_on_every_address_is_browsed_on_loopback() {
        let b = |s: &str| browsable(s.parse().unwrap()).to_string();
        assert_eq!(b("0.0.0.0:80"), "127.0.0.1:80");
        assert_eq!(b("[::]:80"), "[::1]:80");
        assert_eq!(b("192.0.2.1:8080"), "192.0.2.1:8080");
        assert_eq!(b("[::1]:8080"), "[::1]:8080");
    }

    #[test]
    fn cgroups_below_a_directory_are_found_by_inode() {
        let top = tempfile::tempdir().unwrap();
        let deep = top.path().join("a/b/c");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(top.path().join("a/file"), "").unwrap();
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert!(below(top.path(), ino(&deep)).unwrap());
        assert!(below(top.path(), ino(&top.path().join("a"))).unwrap());
        // Files are no cgroups; the directory itself is not below itself.
        assert!(!below(top.path(), ino(&top.path().join("a/file"))).unwrap());
        assert!(!below(top.path(), ino(top.path())).unwrap());
        assert!(!below(&top.path().join("gone"), ino(&deep)).unwrap());
    }

    #[test]
    fn current_groups_come_from_the_system() {
        let root = auth::WebUser {
            uid: 0,
            gid: 12345,
            groups: vec![777],
        };
        let now = regrouped(&root).unwrap();
        assert_eq!(now.uid, 0);
        assert_eq!(now.gid, 0, "the passwd entry's primary group");
        assert!(now.groups.contains(&0), "{:?}", now.groups);
        assert!(!now.groups.contains(&777), "{:?}", now.groups);
        let gone = auth::WebUser {
            uid: 4_000_000_000,
            gid: 0,
            groups: Vec::new(),
        };
        assert!(regrouped(&gone).unwrap_err().contains("no user"));
    }
}
