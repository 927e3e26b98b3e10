//! The web view's routes: the page and its assets, a JSON API, the live event stream, and
//! the guard every request passes first ([`guard`]: Host, token, Origin).
//!
//! | route                              | what                                           |
//! |------------------------------------|------------------------------------------------|
//! | `GET /?token=T`                    | the token becomes a cookie; redirect to `/`    |
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
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Extension, Json, Router,
    extract::{Path, Query, Request, State},
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
    super::{Shared, ask, lock, proto::Reply},
    actor, auth, via,
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

/// What a request without a valid token is told.
const NO_TOKEN: &str = "agentd web view: this needs an access token. Run `agentd ui-url` on \
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

/// Every request: its `Host` must name the view (DNS rebinding); `/?token=T` logs in;
/// anything else needs a valid token, from the cookie or `Authorization: Bearer`; a
/// request that changes something with the cookie must come from the page itself
/// (`Origin`, `Sec-Fetch-Site`: CSRF). The user is then the request's `WebUser`.
async fn guard(State(shared): State<App>, mut req: Request, next: Next) -> Response {
    let mut resp = match admit(&shared, &req) {
        Admit::Answer(r) => r,
        Admit::User(user) => {
            req.extensions_mut().insert(user);
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
    User(auth::WebUser),
    /// Answered here: refused, or a login.
    Answer(Response),
}

fn admit(shared: &Shared, req: &Request) -> Admit {
    let Some(bound) = shared.ui.listen else {
        return Admit::Answer(text(StatusCode::NOT_FOUND, "the web view is off\n"));
    };
    let headers = req.headers();
    let host = header_str(headers, header::HOST).unwrap_or("");
    if !auth::host_allowed(bound, host) {
        return Admit::Answer(text(
            StatusCode::FORBIDDEN,
            "agentd web view: this page is not served under that name (its Host must be the \
             address `agentd ui-url` prints, or localhost)\n",
        ));
    }
    let now = Instant::now();
    if req.uri().path() == "/" && req.uri().query().is_some() {
        return Admit::Answer(login(shared, req, bound.port(), now));
    }
    let name = auth::cookie_name(bound.port());
    let from_cookie = header_str(headers, header::COOKIE).and_then(|c| auth::cookie(c, &name));
    let from_bearer = header_str(headers, header::AUTHORIZATION).and_then(auth::bearer);
    // A header a script set is no ambient credential: only the cookie needs the CSRF checks.
    let (token, by_cookie) = match (from_bearer, from_cookie) {
        (Some(t), _) => (Some(t), false),
        (None, c) => (c, true),
    };
    let Some(user) = token.and_then(|t| shared.ui.tokens.check(t, now)) else {
        return Admit::Answer(text(StatusCode::UNAUTHORIZED, NO_TOKEN));
    };
    if by_cookie && !matches!(*req.method(), Method::GET | Method::HEAD) {
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
    }
    Admit::User(user)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    token: String,
}

/// `GET /?token=T`: a valid token becomes the cookie, and the browser goes to `/` (the
/// token leaves the address bar and the history).
fn login(shared: &Shared, req: &Request, port: u16, now: Instant) -> Response {
    let Ok(Query(l)) = Query::<Login>::try_from_uri(req.uri()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "agentd web view: the only query this page takes is ?token=T (from `agentd ui-url`)\n",
        );
    };
    let Some(user) = shared.ui.tokens.check(&l.token, now) else {
        return text(
            StatusCode::UNAUTHORIZED,
            "agentd web view: this token is not valid (it expired, or the daemon restarted): run \
             `agentd ui-url` for a new one\n",
        );
    };
    let left = user
        .expires
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    let mut resp = StatusCode::SEE_OTHER.into_response();
    let h = resp.headers_mut();
    h.insert(header::LOCATION, HeaderValue::from_static("/"));
    match HeaderValue::from_str(&auth::set_cookie(port, &l.token, left)) {
        Ok(v) => {
            h.insert(header::SET_COOKIE, v);
        }
        Err(_) => return text(StatusCode::BAD_REQUEST, "agentd web view: a bad token\n"),
    }
    resp
}

fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn text(status: StatusCode, body: &'static str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
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

/// A reply of the daemon's, as the API answers it: `{"ok": ...}` or `{"error": ...}`
/// with a status that says what kind of refusal.
fn answer(reply: Reply) -> Response {
    match reply {
        Reply::Ok(m) => Json(json!({ "ok": m })).into_response(),
        Reply::Error(e) => {
            let status = if e.starts_with("permission denied") {
                StatusCode::FORBIDDEN
            } else if e.starts_with("no running agent") || e.starts_with("no pending request") {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::BAD_REQUEST
            };
            (status, Json(json!({ "error": e }))).into_response()
        }
        other @ (Reply::Started { .. }
        | Reply::Frozen(_)
        | Reply::Exit { .. }
        | Reply::Event(_)
        | Reply::Agents(_)
        | Reply::Stats(_)
        | Reply::Transaction(_)
        | Reply::Approvals(_)
        | Reply::Held(_)
        | Reply::Prompt(_)
        | Reply::Settled { .. }
        | Reply::Grants(_)
        | Reply::Handover { .. }
        | Reply::UiUrl(_)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": format!("unexpected reply {other:?}") })),
        )
            .into_response(),
    }
}

fn error(status: StatusCode, e: String) -> Response {
    (status, Json(json!({ "error": e }))).into_response()
}

async fn me(Extension(user): Extension<auth::WebUser>) -> Json<Value> {
    Json(me_view(&user))
}

fn me_view(user: &auth::WebUser) -> Value {
    json!({
        "uid": user.uid,
        "gid": user.gid,
        "groups": user.groups,
        "expires": super::utc(user.expires),
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
    let policy = lock(&shared.agents)
        .get(&id)
        .map(|a| crate::report::render_policy(&a.launch.origin, &a.policy));
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
/// page's user.
async fn kill(
    State(shared): State<App>,
    Extension(user): Extension<auth::WebUser>,
    Path(id): Path<String>,
) -> Response {
    answer(super::super::kill_as(
        &shared,
        actor(&user),
        &id,
        "web view kill",
    ))
}

/// Pending requests the user may answer.
async fn approvals(
    State(shared): State<App>,
    Extension(user): Extension<auth::WebUser>,
) -> Json<Value> {
    Json(json!(pending(&shared, &user)))
}

fn pending(shared: &Shared, user: &auth::WebUser) -> Vec<Value> {
    shared
        .asking
        .board
        .pending(None)
        .into_iter()
        .filter(|(_, owner)| may_answer(shared, user, *owner))
        .map(|(r, _)| held_view(&r))
        .collect()
}

fn may_answer(shared: &Shared, user: &auth::WebUser, owner: u32) -> bool {
    ask::may_answer_via(shared, &actor(user), owner, via(user)).is_ok()
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
    Extension(user): Extension<auth::WebUser>,
    Path(id): Path<String>,
    Query(q): Query<MessageQuery>,
) -> Response {
    let answer = match answer_of(&q.scope) {
        Ok(a) => a,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match shared.asking.board.request(&id) {
        Some((r, owner)) if may_answer(&shared, &user, owner) => (
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
/// is "web view").
async fn decide(
    State(shared): State<App>,
    Extension(user): Extension<auth::WebUser>,
    Path(id): Path<String>,
    Json(body): Json<DecideBody>,
) -> Response {
    let signature = body.signature.filter(|s| !s.trim().is_empty());
    answer(ask::decide_via(
        &shared,
        &actor(&user),
        &id,
        body.answer,
        signature,
        via(&user),
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

fn state(shared: &Shared, user: &auth::WebUser) -> SseEvent {
    sse(
        "state",
        &json!({
            "agents": super::super::ps_rows(shared),
            "approvals": pending(shared, user),
        }),
    )
}

/// One open page's stream: first `hello` (the user), the recent events and `state`
/// (agents and requests), then each event (`ev`), held call (`held`) and ended request
/// (`settled`) as it comes, `state` every second, `lost` when the page fell behind, and
/// `expired` when the token ends (the stream ends then).
struct Stream {
    shared: Arc<Shared>,
    user: auth::WebUser,
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
            if SystemTime::now() >= self.user.expires {
                self.done = true;
                return Some(sse(
                    "expired",
                    &json!({ "why": "the token expired: run `agentd ui-url` for a new one" }),
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
                        if owner.is_some_and(|o| may_answer(&self.shared, &self.user, o)) {
                            return Some(sse("held", &held_view(&req)));
                        }
                    }
                    Ok(Change::Settled { request, .. }) => {
                        // Its card goes from every page that has it: the id is all it takes
                        // (the outcome is an `approval` event, for those who may watch).
                        return Some(sse("settled", &json!({ "id": request.id })));
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        return Some(state(&self.shared, &self.user));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = self.tick.tick() => return Some(state(&self.shared, &self.user)),
            }
        }
    }
}

async fn events(State(shared): State<App>, Extension(user): Extension<auth::WebUser>) -> Response {
    let Some(open) = super::open_stream(&shared, &user) else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "agentd web view: too many pages are open; close some\n",
        );
    };
    // Subscribe first, so nothing falls between the backlog and the stream.
    let events = shared.events.subscribe();
    let changes = shared.asking.board.subscribe();
    let mut queue = VecDeque::new();
    queue.push_back(sse("hello", &me_view(&user)));
    let backlog: Vec<Arc<Event>> = lock(&shared.recent).iter().cloned().collect();
    queue.extend(backlog.iter().map(|e| sse("ev", &event_view(e))));
    // After the backlog: the page takes what follows as live.
    queue.push_back(state(&shared, &user));
    let mut tick = tokio::time::interval(STATE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is now: `state` was just queued.
    tick.reset();
    let stream = Stream {
        shared,
        user,
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
