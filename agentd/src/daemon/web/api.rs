//! The web view's routes: the page and its assets, a JSON API, the live event stream, and
//! the guard every request passes first ([`guard`]: the client's cgroup, Host, session,
//! Origin, and for an action the user's groups now).
//!
//! | route                              | what                                           |
//! |------------------------------------|------------------------------------------------|
//! | `GET /?token=T`                    | spends the token for a session (the cookie)    |
//! | `GET /`, `/app.js`, `/style.css`,  | the page (embedded)                            |
//! | `/favicon.svg`                     |                                                |
//! | `GET /api/me`                      | whom the token acts as, until when             |
//! | `GET /api/agents`                  | `agentd ps`                                    |
//! | `GET /api/agents/{id}`             | one agent: its row, compiled profile, events   |
//! | `POST /api/agents/{id}/kill`       | the kill switch (`agentd kill`)                |
//! | `GET /api/approvals`               | held calls the user may answer                 |
//! | `GET /api/approvals/{id}/message`  | the text to sign for an answer (`?scope=`)     |
//! | `POST /api/approvals/{id}`         | answer one (`agentd approve` / `deny`)         |
//! | `GET /api/events`                  | server-sent events: events, state, approvals   |

use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Extension, Json, Router,
    extract::{ConnectInfo, Path, Query, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{
        IntoResponse as _, Response,
        sse::{Event as SseEvent, KeepAlive, Sse},
    },
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::{
    super::{Refusal, Shared, ask, lock, outputs::LocalAddr},
    Caller, Source, actor, auth, via,
};
use crate::{
    ask::{Answer, Request as Held, Scope, engine::Change, printable},
    event::{Event, Kind},
};

type App = Arc<Shared>;

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");
const ICON: &str = include_str!("favicon.svg");

/// The page may load only its own script and style and talk only to its own origin; no
/// other site may frame it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// What a request without a valid session is told.
const NO_SESSION: &str = "agentd web view: this needs an access token. Run `agentd ui-url` on \
                          the daemon's host (as root or a member of its group) and open the URL it prints.\n";

/// How often an open page is sent the agents and the pending requests.
const STATE_EVERY: Duration = Duration::from_secs(1);
/// Events of one agent its detail shows from the daemon's recent ones.
const DETAIL_EVENTS: usize = 200;

/// The web view's pages and API, every route behind [`guard`].
pub(in crate::daemon) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(script))
        .route("/style.css", get(style))
        .route("/favicon.svg", get(icon))
        .route("/api/me", get(me))
        .route("/api/agents", get(agents))
        .route("/api/agents/{id}", get(agent))
        .route("/api/agents/{id}/kill", post(kill))
        .route("/api/approvals", get(approvals))
        .route("/api/approvals/{id}/message", get(message))
        .route("/api/approvals/{id}", post(decide))
        .route("/api/events", get(events))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(Arc::clone(&shared), guard))
        .with_state(shared)
}

// ---- the guard ----------------------------------------------------------------------------

/// Every request: it must come from a socket of this host made outside every agent
/// (the client's cgroup); its `Host` must name the view (DNS rebinding); `/?token=T`
/// logs in; anything else needs an open session (the cookie); a request that changes
/// something must come from the page itself (`Origin`, `Sec-Fetch-Site`: CSRF) of a user
/// who is, now, root or in --group. The caller is then the request's [`Caller`].
async fn guard(State(shared): State<App>, mut req: Request, next: Next) -> Response {
    let admitted = match admit(&shared, &req) {
        Admit::Answer(r) => Err(r),
        Admit::Caller(caller) => Ok(caller),
        Admit::Acting(caller) => regrouped(&shared, caller).await,
    };
    let mut resp = match admitted {
        Err(r) => r,
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
    };
    let h = resp.headers_mut();
    for (k, v) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
        (
            header::HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
        (
            header::HeaderName::from_static("cross-origin-resource-policy"),
            "same-origin",
        ),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    resp
}

enum Admit {
    Caller(Caller),
    /// About to change something: its user's groups are looked up again first.
    Acting(Caller),
    /// Answered here: refused, or a login.
    Answer(Response),
}

fn admit(shared: &App, req: &Request) -> Admit {
    let Some(bound) = shared.ui.listen else {
        return Admit::Answer(text(StatusCode::NOT_FOUND, "the web view is off\n"));
    };
    // Which process is at the other end, first: nothing is served to an agent, whatever
    // credential it holds (it runs as its owner's uid).
    let Some(peer) = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
    else {
        return Admit::Answer(text(
            StatusCode::FORBIDDEN,
            "agentd web view: refused: the client's address is unknown\n",
        ));
    };
    let local = req.extensions().get::<LocalAddr>().map(|l| l.0);
    match super::screen(shared, peer, local) {
        Source::Host => {}
        Source::Agent(agent) => {
            let what = format!("{} {}", req.method(), req.uri().path());
            super::agent_refused(shared, &agent, peer, local, &what);
            return Admit::Answer(text(
                StatusCode::FORBIDDEN,
                format!(
                    "agentd web view: permission denied: this connection comes from inside agent {agent}: no process inside an agent may use the web view\n"
                ),
            ));
        }
        Source::Unknown(why) => {
            return Admit::Answer(text(
                StatusCode::FORBIDDEN,
                format!(
                    "agentd web view: refused: which process this connection comes from cannot be checked ({why}); the view serves this host's processes outside agents only (from elsewhere: `ssh -L`)\n"
                ),
            ));
        }
    }
    let headers = req.headers();
    let host = header_str(headers, header::HOST).unwrap_or("");
    if !auth::host_allowed(bound, host) {
        return Admit::Answer(text(
            StatusCode::FORBIDDEN,
            "agentd web view: this page is not served under that name (its Host must be the \
             address `agentd ui-url` prints, or localhost)\n",
        ));
    }
    let now = SystemTime::now();
    if req.uri().path() == "/" && req.uri().query().is_some() {
        return Admit::Answer(login(shared, req, bound.port(), peer, now));
    }
    let name = auth::cookie_name(bound.port());
    let session = header_str(headers, header::COOKIE).and_then(|c| auth::cookie(c, &name));
    let Some(grant) = session.and_then(|id| shared.ui.credentials.session(id, now)) else {
        return Admit::Answer(text(StatusCode::UNAUTHORIZED, NO_SESSION));
    };
    let caller = Caller::of(grant, peer);
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return Admit::Caller(caller);
    }
    let origin = header_str(headers, header::ORIGIN);
    let site = header_str(headers, "sec-fetch-site");
    if !origin.is_some_and(|o| auth::origin_matches(host, o))
        || site.is_some_and(|s| s != "same-origin")
    {
        return Admit::Answer(text(
            StatusCode::FORBIDDEN,
            "agentd web view: refused: an action must come from the view's own page (Origin)\n",
        ));
    }
    Admit::Acting(caller)
}

/// `caller` with their groups as they are now, not as when the token was given (an
/// action: a user removed from --group or --approvers has lost what it gave); refused
/// when they are no longer root or in --group.
async fn regrouped(shared: &Shared, mut caller: Caller) -> Result<Caller, Response> {
    let user = caller.user.clone();
    let now = tokio::task::spawn_blocking(move || super::regrouped(&user))
        .await
        .map_err(|e| format!("looking up the user's groups: {e}"))
        .and_then(|r| r);
    match now {
        Ok(user) if super::may_watch(shared, &user) => {
            caller.user = user;
            Ok(caller)
        }
        Ok(user) => Err(text(
            StatusCode::FORBIDDEN,
            format!(
                "agentd web view: permission denied: uid {} is no longer root or in group `{}`\n",
                user.uid, shared.group
            ),
        )),
        Err(e) => Err(text(
            StatusCode::FORBIDDEN,
            format!("agentd web view: refused: {e}\n"),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    token: String,
}

/// `GET /?token=T`: a valid, unused token is spent for a session, whose id the cookie
/// carries, and the browser goes to `/` (the token leaves the address bar; it opens
/// nothing again). Audited (`ui_login`).
fn login(shared: &Shared, req: &Request, port: u16, peer: SocketAddr, now: SystemTime) -> Response {
    let Ok(Query(l)) = Query::<Login>::try_from_uri(req.uri()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "agentd web view: the only query this page takes is ?token=T (from `agentd ui-url`)\n",
        );
    };
    let (id, grant) = match shared.ui.credentials.login(&l.token, now) {
        Ok(Some(session)) => session,
        Ok(None) => {
            return text(
                StatusCode::UNAUTHORIZED,
                "agentd web view: this token is not valid (a token opens one session; it expired; \
                 or the daemon restarted): run `agentd ui-url` for a new one\n",
            );
        }
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    };
    super::audit(
        shared,
        crate::audit::record::Action::UiLogin,
        actor(&grant.user),
        json!({
            "token": grant.token.to_string(),
            "peer": peer.to_string(),
            "expires": super::utc(grant.expires),
        }),
    );
    let left = grant.expires.duration_since(now).unwrap_or_default();
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/".to_owned()),
            (header::SET_COOKIE, auth::set_cookie(port, &id, left)),
        ],
    )
        .into_response()
}

fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

// ---- the page -----------------------------------------------------------------------------

async fn index() -> Response {
    asset(INDEX, "text/html; charset=utf-8")
}

async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

async fn icon() -> Response {
    asset(ICON, "image/svg+xml")
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

async fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "agentd web view: no such page\n")
}

// ---- the API ------------------------------------------------------------------------------

/// An action's outcome, as the API answers it: `{"ok": ...}`, or `{"error": ...}` with a
/// status that says what kind of refusal.
fn answer(outcome: Result<String, Refusal>) -> Response {
    match outcome {
        Ok(m) => Json(json!({ "ok": m })).into_response(),
        Err(e) => {
            let status = match &e {
                Refusal::Denied(_) => StatusCode::FORBIDDEN,
                Refusal::NotFound(_) => StatusCode::NOT_FOUND,
                Refusal::Invalid(_) => StatusCode::BAD_REQUEST,
                Refusal::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            error(status, e.to_string())
        }
    }
}

fn error(status: StatusCode, e: String) -> Response {
    (status, Json(json!({ "error": e }))).into_response()
}

async fn me(Extension(caller): Extension<Caller>) -> Json<Value> {
    Json(me_view(&caller))
}

fn me_view(caller: &Caller) -> Value {
    json!({
        "uid": caller.user.uid,
        "gid": caller.user.gid,
        "groups": caller.user.groups,
        "expires": super::utc(caller.expires),
    })
}

async fn agents(State(shared): State<App>) -> Json<Value> {
    Json(json!(super::super::ps_rows(&shared)))
}

/// One agent: its `ps` row, its profile as compiled (while it runs: the daemon keeps no
/// policy of an agent that ended), and its recent events.
async fn agent(State(shared): State<App>, Path(id): Path<String>) -> Response {
    let Some(row) = super::super::ps_rows(&shared)
        .into_iter()
        .rev()
        .find(|r| r.id == id)
    else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no agent {id} (see `agentd ps`)"),
        );
    };
    // Copied out: the registry's lock is not held while it is written out.
    let compiled = lock(&shared.agents)
        .get(&id)
        .map(|a| (a.launch.origin.clone(), a.policy.clone()));
    let policy = compiled.map(|(origin, p)| crate::report::render_policy(&origin, &p));
    let mut events: Vec<Value> = lock(&shared.recent)
        .iter()
        .rev()
        .filter(|e| e.agent == id)
        .take(DETAIL_EVENTS)
        .map(|e| event_view(e))
        .collect();
    events.reverse();
    Json(json!({
        "row": row,
        "policy": policy.map(|p| printable_lines(&p)),
        "events": events,
    }))
    .into_response()
}

/// The kill switch, as `agentd kill` (only root and the agent's owner), audited with the
/// page's user and its session.
async fn kill(
    State(shared): State<App>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    answer(super::super::kill_as(
        &shared,
        actor(&caller.user),
        &id,
        "web view kill",
        Some(&caller.web),
    ))
}

/// Pending requests the user may answer.
async fn approvals(State(shared): State<App>, Extension(caller): Extension<Caller>) -> Json<Value> {
    Json(json!(pending(&shared, &caller)))
}

fn pending(shared: &Shared, caller: &Caller) -> Vec<Value> {
    shared
        .asking
        .board
        .pending(None)
        .into_iter()
        .filter(|(_, owner)| may_answer(shared, caller, *owner))
        .map(|(r, _)| held_view(&r))
        .collect()
}

fn may_answer(shared: &Shared, caller: &Caller, owner: u32) -> bool {
    ask::may_answer_via(shared, &actor(&caller.user), owner, via(caller)).is_ok()
}

/// A held call as the page shows it: what the agent's processes chose (paths, names,
/// command lines) with control and format characters escaped.
fn held_view(r: &Held) -> Value {
    json!({
        "id": r.id,
        "agent": r.agent,
        "profile": printable(&r.profile),
        "what": printable(&r.target.to_string()),
        "chain": r.chain.iter().map(|p| json!({ "pid": p.pid, "cmdline": printable(&p.cmdline) })).collect::<Vec<_>>(),
        "argv": r.argv.iter().map(|a| printable(a)).collect::<Vec<_>>(),
        "since": r.since,
        "timeout_s": r.timeout_s,
        "require_signature": r.require_signature,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageQuery {
    /// `once`, `session`, a number of seconds (`--for`), or `deny`.
    scope: String,
}

/// The answer a `?scope=` names.
fn answer_of(scope: &str) -> Result<Answer, String> {
    match scope {
        "once" => Ok(Answer::Allow { scope: Scope::Once }),
        "session" => Ok(Answer::Allow {
            scope: Scope::Session,
        }),
        "deny" => Ok(Answer::Deny { reason: None }),
        s => match s.parse::<u64>() {
            Ok(n) if n > 0 && n <= Scope::MAX_FOR.as_secs() => Ok(Answer::Allow {
                scope: Scope::For(n),
            }),
            _ => Err(format!(
                "scope `{s}`: give once, session, deny, or seconds between 1 and {}",
                Scope::MAX_FOR.as_secs()
            )),
        },
    }
}

/// The exact text to sign (`ssh-keygen -Y sign -n agentd-approval`) for an answer.
async fn message(
    State(shared): State<App>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<MessageQuery>,
) -> Response {
    let answer = match answer_of(&q.scope) {
        Ok(a) => a,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match shared.asking.board.request(&id) {
        Some((r, owner)) if may_answer(&shared, &caller, owner) => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            crate::ask::message(&r, &answer),
        )
            .into_response(),
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no pending request `{id}` you may answer"),
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideBody {
    answer: Answer,
    /// An armored `ssh-keygen -Y sign -n agentd-approval` signature over the message.
    #[serde(default)]
    signature: Option<String>,
}

/// Answers a held call, as `agentd approve` / `deny` (same checks; the decision's `via`
/// is "web view", its record names the session).
async fn decide(
    State(shared): State<App>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Json(body): Json<DecideBody>,
) -> Response {
    let signature = body.signature.filter(|s| !s.trim().is_empty());
    answer(ask::decide_via(
        &shared,
        &actor(&caller.user),
        &id,
        body.answer,
        signature,
        via(&caller),
    ))
}

// ---- the live stream ----------------------------------------------------------------------

/// An event as the page shows it: the event, whether it stands out, and its target and
/// process name with control and format characters escaped.
fn event_view(ev: &Event) -> Value {
    json!({
        "event": ev,
        "stands_out": ev.stands_out(),
        "trip": ev.kind == Kind::Breaker,
        "kind": ev.kind_name(),
        "layer": ev.layer_name(),
        "target": printable(&ev.target()),
        "comm": printable(&ev.comm),
    })
}

/// `text` with each line made printable (the policy names paths the profile chose).
fn printable_lines(text: &str) -> String {
    text.lines().map(|l| printable(l) + "\n").collect()
}

fn sse(name: &str, data: &Value) -> SseEvent {
    SseEvent::default().event(name).data(data.to_string())
}

fn state(shared: &Shared, caller: &Caller) -> SseEvent {
    sse(
        "state",
        &json!({
            "agents": super::super::ps_rows(shared),
            "approvals": pending(shared, caller),
        }),
    )
}

/// One open page's stream: first `hello` (the user), the recent events and `state`
/// (agents and requests), then each event (`ev`), held call (`held`) and ended request
/// (`settled`) as it comes, `state` every second, `lost` when the page fell behind, and
/// `expired` when the session ends (the stream ends then).
struct Stream {
    shared: Arc<Shared>,
    caller: Caller,
    events: broadcast::Receiver<Arc<Event>>,
    changes: broadcast::Receiver<Change>,
    tick: tokio::time::Interval,
    queue: VecDeque<SseEvent>,
    done: bool,
    _open: super::StreamGuard,
}

impl Stream {
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(e) = self.queue.pop_front() {
                return Some(e);
            }
            if self.done {
                return None;
            }
            if SystemTime::now() >= self.caller.expires {
                self.done = true;
                return Some(sse(
                    "expired",
                    &json!({ "why": "the session expired: run `agentd ui-url` for a new token" }),
                ));
            }
            tokio::select! {
                r = self.events.recv() => match r {
                    Ok(ev) => return Some(sse("ev", &event_view(&ev))),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        return Some(sse("lost", &json!({ "count": n })));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                c = self.changes.recv() => match c {
                    Ok(Change::Held(req)) => {
                        let owner = self.shared.asking.board.request(&req.id).map(|(_, o)| o);
                        if owner.is_some_and(|o| may_answer(&self.shared, &self.caller, o)) {
                            return Some(sse("held", &held_view(&req)));
                        }
                    }
                    Ok(Change::Settled { request, .. }) => {
                        // Its card goes from every page that has it: the id is all it takes
                        // (the outcome is an `approval` event, for those who may watch).
                        return Some(sse("settled", &json!({ "id": request.id })));
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        return Some(state(&self.shared, &self.caller));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = self.tick.tick() => return Some(state(&self.shared, &self.caller)),
            }
        }
    }
}

async fn events(State(shared): State<App>, Extension(caller): Extension<Caller>) -> Response {
    let Some(open) = super::open_stream(&shared, &caller) else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "agentd web view: you have too many pages open; close some\n",
        );
    };
    // Subscribe first, so nothing falls between the backlog and the stream.
    let events = shared.events.subscribe();
    let changes = shared.asking.board.subscribe();
    let mut queue = VecDeque::new();
    queue.push_back(sse("hello", &me_view(&caller)));
    let backlog: Vec<Arc<Event>> = lock(&shared.recent).iter().cloned().collect();
    queue.extend(backlog.iter().map(|e| sse("ev", &event_view(e))));
    // After the backlog: the page takes what follows as live.
    queue.push_back(state(&shared, &caller));
    let mut tick = tokio::time::interval(STATE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is now: `state` was just queued.
    tick.reset();
    let stream = Stream {
        shared,
        caller,
        events,
        changes,
        tick,
        queue,
        done: false,
        _open: open,
    };
    let items = futures_util::stream::unfold(stream, |mut s| async move {
        let e = s.next().await?;
        Some((Ok::<_, Infallible>(e), s))
    });
    Sse::new(items)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_of_the_message_query() {
        assert_eq!(answer_of("once"), Ok(Answer::Allow { scope: Scope::Once }));
        assert_eq!(
            answer_of("600"),
            Ok(Answer::Allow {
                scope: Scope::For(600)
            })
        );
        assert_eq!(answer_of("deny"), Ok(Answer::Deny { reason: None }));
        for bad in ["0", "86401", "-1", "forever", ""] {
            assert!(answer_of(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn events_show_escaped_and_marked() {
        let ev = Event::new(
            "a-1",
            7,
            "sh\u{202e}x",
            Kind::OpenWrite,
            crate::event::Verdict::Deny,
            crate::event::Layer::Landlock,
        );
        let mut ev = ev;
        ev.path = Some("/etc/\u{1b}[31mx".into());
        let v = event_view(&ev);
        assert_eq!(v["stands_out"], true);
        assert_eq!(v["trip"], false);
        assert_eq!(v["kind"], "file_write");
        let target = v["target"].as_str().unwrap();
        assert!(!target.contains('\u{1b}'), "{target}");
        assert!(!v["comm"].as_str().unwrap().contains('\u{202e}'));
        assert_eq!(printable_lines("a\nb\u{7}\n"), "a\nb\\u{7}\n");
    }
}
