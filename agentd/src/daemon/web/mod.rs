//! The live web view (`agentd daemon --ui [ADDR:]PORT`): one page that lists the agents,
//! streams their events (server-sent events; refusals and breaker trips stand out), shows
//! an agent's compiled profile, answers held calls, and has the kill switch. Everything
//! it shows or does goes through the functions the control socket uses (`ps_rows`,
//! `kill_as`, `ask::decide_via`), so it is checked and audited as the CLI is.
//!
//! Access is the Jupyter pattern: `agentd ui-url` asks the daemon over the control socket
//! (root and --group members only, never a process inside an agent) for a token bound to
//! the caller's uid and groups ([`auth`]); `GET /?token=T` turns it into a cookie
//! (HttpOnly, SameSite=Strict) and every other request needs that cookie (or `Authorization:
//! Bearer T`). Requests must name the view in `Host` (DNS rebinding) and, when they change
//! something, come from its own page (`Origin`: CSRF). The page and its script and style
//! are embedded in the binary; it loads nothing from elsewhere (its Content-Security-Policy
//! says so to the browser too).

mod api;
mod auth;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime},
};

use super::{
    Shared, agent_of, lock,
    outputs::Listen,
    proto::{Reply, UiUrl},
};
use crate::audit::record::Actor;

pub(super) use api::router;

/// Open pages (event streams) at most: each holds a subscription to the event stream.
const MAX_STREAMS: usize = 64;

/// What the web view keeps: where it listens, the tokens `agentd ui-url` gave out, and
/// the pages now open (each counts as someone to ask, for the requests its user may
/// answer).
#[derive(Debug, Default)]
pub(super) struct Ui {
    /// `--ui`; None when the view is off.
    listen: Option<SocketAddr>,
    tokens: auth::Tokens,
    streams: std::sync::Mutex<Vec<(u64, auth::WebUser)>>,
    next_stream: AtomicU64,
}

impl Ui {
    /// The view as `--ui` asks (`None`: off). A browser reaches TCP only, on a known port.
    pub fn new(listen: Option<&Listen>) -> anyhow::Result<Ui> {
        let listen = match listen {
            None => None,
            Some(Listen::Unix(p)) => anyhow::bail!(
                "--ui unix:{}: the web view listens on TCP, for a browser: give a port (8080, on loopback) or ADDR:PORT",
                p.display()
            ),
            Some(Listen::Tcp(a)) if a.port() == 0 => anyhow::bail!(
                "--ui {a}: give the port to listen on (the URL `agentd ui-url` prints names it)"
            ),
            Some(Listen::Tcp(a)) => Some(*a),
        };
        Ok(Ui {
            listen,
            ..Ui::default()
        })
    }
}

/// Registers an open page of `user`'s; it counts until the guard is dropped. None: too
/// many are open.
fn open_stream(shared: &Arc<Shared>, user: &auth::WebUser) -> Option<StreamGuard> {
    let ui = &shared.ui;
    let mut streams = lock(&ui.streams);
    if streams.len() >= MAX_STREAMS {
        return None;
    }
    let id = ui.next_stream.fetch_add(1, Ordering::Relaxed);
    streams.push((id, user.clone()));
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
    let users: Vec<auth::WebUser> = lock(&shared.ui.streams)
        .iter()
        .map(|(_, u)| u.clone())
        .collect();
    let now = SystemTime::now();
    users.iter().any(|u| {
        u.expires > now && super::ask::may_answer_via(shared, &actor(u), owner, via(u)).is_ok()
    })
}

/// Who acts for a page's user: their uid and gid, and the daemon's own pid (the process
/// that acts; as `agentd run` records its invoking user with its own pid).
fn actor(u: &auth::WebUser) -> Actor {
    Actor {
        uid: u.uid,
        gid: u.gid,
        pid: std::process::id(),
    }
}

fn via(u: &auth::WebUser) -> super::ask::Via<'_> {
    super::ask::Via::Web {
        gid: u.gid,
        groups: &u.groups,
    }
}

/// `agentd ui-url` from `who` (already known to be root or a --group member): a new token
/// for them, in the view's URL.
pub(super) fn url_for(shared: &Shared, who: &Actor) -> Reply {
    let Some(listen) = shared.ui.listen else {
        return Reply::Error(
            "this daemon serves no web view: start it with --ui [ADDR:]PORT (e.g. `agentd daemon --ui 8080`, on loopback; in the systemd unit, add it to ExecStart)".into(),
        );
    };
    // An agent runs as its owner's uid: only the cgroup tells its processes apart.
    if let Some(agent) = agent_of(who.pid) {
        return Reply::Error(format!(
            "permission denied: the caller (pid {}) is a process of agent {agent}: no process inside an agent may have a web view token",
            who.pid
        ));
    }
    let user = auth::WebUser {
        uid: who.uid,
        gid: who.gid,
        groups: auth::groups_of(who.pid),
        expires: SystemTime::UNIX_EPOCH,
    };
    let (token, user) = match shared
        .ui
        .tokens
        .issue(user, Instant::now(), SystemTime::now())
    {
        Ok(t) => t,
        Err(e) => return Reply::Error(e.to_string()),
    };
    Reply::UiUrl(UiUrl {
        url: format!("http://{}/?token={token}", browsable(listen)),
        uid: user.uid,
        expires: utc(user.expires),
        valid_s: auth::TOKEN_TTL.as_secs(),
    })
}

/// `t` as RFC 3339 UTC, to the second.
fn utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    crate::event::rfc3339(secs, 0).replace(".000000000Z", "Z")
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
    fn the_view_listens_on_tcp_at_a_known_port() {
        assert!(Ui::new(None).unwrap().listen.is_none());
        let ui = Ui::new(Some(&"8080".parse().unwrap())).unwrap();
        assert_eq!(ui.listen, Some("127.0.0.1:8080".parse().unwrap()));
        let e = Ui::new(Some(&"unix:/run/ui.sock".parse().unwrap())).unwrap_err();
        assert!(e.to_string().contains("listens on TCP"), "{e}");
        let e = Ui::new(Some(&"127.0.0.1:0".parse().unwrap())).unwrap_err();
        assert!(e.to_string().contains("give the port"), "{e}");
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
}
