//! The HTTP surface (axum): health, metrics and the stream API.
//!
//! | route | method | auth | what |
//! |---|---|---|---|
//! | `/`, `/page.css`, `/page.js` | GET | - | the web page ([`page`]; its reads are the API's) |
//! | `/livez` | GET | - | 200 while the supervisor loop ticks |
//! | `/readyz` | GET | - | 200 once config, model, spool, publisher and HTTP are up; body: states |
//! | `/metrics` | GET | - | Prometheus text format |
//! | `/api/streams` | GET | read | every stream with status and counters (errors by kind only) |
//! | `/api/streams` | POST | bearer | add a runtime-only stream (JSON of a `[[streams]]` entry) |
//! | `/api/streams/{id}` | DELETE | bearer | remove a stream |
//! | `/api/alerts`, `/api/events...` | GET, DELETE, POST | read, bearer | alert history from the event store ([`events`]) |
//! | `/api/session` | POST | bearer | a session (cookie and tab secret) for a browser's reads ([`session`]) |
//! | `/api/session` | DELETE | session | ends that session |
//! | `/api/reload` | POST | bearer | re-read the config file (as SIGHUP) |
//!
//! Mutating calls need `Authorization: Bearer <token>`, loopback included; reads need it
//! (or a browser session) when `http.listen` is not loopback (`http.read_auth`). The token is checked before a body
//! is read; bodies are capped at 64 KiB; a client that keeps failing is throttled
//! ([`guard`]). API callers never name files or environment variables: a stream's
//! credentials are a set the operator defined in `[http.api_credentials]`.

pub mod config;
pub mod events;
pub mod guard;
pub mod listener;
pub mod metrics;
pub mod page;
pub mod places;
pub mod session;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use tokio::sync::oneshot;

pub use config::{HttpConfig, ReadAuth};
pub use guard::{ApiPolicy, Guard};
pub use listener::{Connections, Limits};

use crate::ingest::StreamConfig;
use state::{AppState, Command, CommandError};

/// Largest request body read.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

fn command_error(e: CommandError) -> Response {
    let code = match e {
        CommandError::Invalid(_) => StatusCode::BAD_REQUEST,
        CommandError::Exists(_) => StatusCode::CONFLICT,
        CommandError::NotFound(_) => StatusCode::NOT_FOUND,
        CommandError::Limit(_) => StatusCode::FORBIDDEN,
        CommandError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, Json(e)).into_response()
}

/// The loop did not answer: it is stopping.
fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({"error": "stopping"})),
    )
        .into_response()
}

async fn ask<T>(
    state: &AppState,
    make: impl FnOnce(oneshot::Sender<Result<T, CommandError>>) -> Command,
) -> Option<Result<T, CommandError>> {
    let (tx, rx) = oneshot::channel();
    state.commands.send(make(tx)).await.ok()?;
    rx.await.ok()
}

/// The token check, before the handler reads anything of the request.
async fn require_token(
    State(s): State<Arc<AppState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let client = guard::client_ip(addr.ip(), req.headers(), &s.api.trusted_proxies);
    match s
        .guard
        .check(client, req.headers(), &s.api.token, Instant::now())
    {
        Ok(()) => next.run(req).await,
        Err(refusal) => {
            tracing::debug!(caller = %addr, client = %client, path = %req.uri().path(), ?refusal, "API request refused.");
            refusal.into_response()
        }
    }
}

/// Reads: a browser session (its cookie and tab secret), else the token check.
async fn require_reader(
    State(s): State<Arc<AppState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let read = matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    if read
        && s.sessions
            .valid(req.headers(), req.uri().query(), Instant::now())
    {
        return next.run(req).await;
    }
    // (No token offered is no guess at one: the guard counts only wrong tokens.)
    require_token(State(s), ConnectInfo(addr), req, next).await
}

/// State-changing requests a browser sends on behalf of another site are refused before the
/// token is looked at (so they cannot count as guesses either): `Sec-Fetch-Site` other than
/// `same-origin` or `none` (typed by the user), or, from browsers that do not send it, an
/// `Origin` that is not this listener's own. Requests with neither header (curl, scripts,
/// services) are not a browser's and pass to the token check.
async fn refuse_cross_site(req: Request, next: Next) -> Response {
    use axum::http::Method;
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    if let Some(why) = cross_site(req.headers()) {
        return (
            StatusCode::FORBIDDEN,
            Json(serde_json::json!({"error": "cross_site", "detail": why})),
        )
            .into_response();
    }
    next.run(req).await
}

/// Why a request's own headers say another site sent it, if they do.
fn cross_site(headers: &axum::http::HeaderMap) -> Option<String> {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    if let Some(site) = text("sec-fetch-site") {
        return (!matches!(site, "same-origin" | "none")).then(|| {
            format!("Sec-Fetch-Site: {site}: changes are taken only from this daemon's own page")
        });
    }
    let origin = text("origin")?;
    let host = text("host").unwrap_or("");
    let own = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|h| !host.is_empty() && h.eq_ignore_ascii_case(host));
    (!own).then(|| {
        format!("Origin {origin:?} is not this listener ({host:?}): changes are taken only from this daemon's own page")
    })
}

/// Every answer is what its `Content-Type` says: browsers must not guess (a JSON error read
/// as HTML, say).
async fn no_sniff(mut r: Response) -> Response {
    r.headers_mut().insert(
        axum::http::header::X_CONTENT_TYPE_OPTIONS,
        axum::http::HeaderValue::from_static("nosniff"),
    );
    r
}

/// `Host` must name this machine by address or as `localhost` where reads are open on a
/// loopback listener (see [`HttpConfig::loopback_hosts_only`]).
async fn require_local_host(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if s.api.loopback_hosts_only && !local_host(req.headers()) {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            Json(serde_json::json!({"error": "host", "detail": "this listener answers only to its address or localhost in Host (reads are open on loopback; set http.read_auth = \"token\" to serve other names)"})),
        )
            .into_response();
    }
    next.run(req).await
}

/// `Host` is an IP address or `localhost`, with or without a port.
fn local_host(headers: &axum::http::HeaderMap) -> bool {
    // No Host (HTTP/1.0), or one that is not text: not a name this machine answers to.
    let Some(host) = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
    else {
        return false;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, port)) if port.is_empty() || port.strip_prefix(':').is_some() => h,
            _ => return false,
        }
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// `POST /api/session` (bearer): a session cookie and the tab secret that goes with it,
/// for reads from a browser ([`session`]): `{"tab": "<hex>", "expires_in_s": N}`.
async fn create_session(
    State(s): State<Arc<AppState>>,
    ConnectInfo(caller): ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
) -> Response {
    match s.sessions.create(&headers, Instant::now()) {
        Ok(new) => {
            guard::audit(caller, "create_session", "-", "created");
            (
                StatusCode::OK,
                [
                    (axum::http::header::SET_COOKIE, new.set_cookie),
                    (
                        axum::http::header::CACHE_CONTROL,
                        axum::http::HeaderValue::from_static("no-store"),
                    ),
                ],
                Json(serde_json::json!({
                    "tab": new.tab,
                    "expires_in_s": session::SESSION_TTL.as_secs(),
                })),
            )
                .into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "No session: reading /dev/urandom failed.");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// `DELETE /api/session`: ends the caller's tab (its cookie and tab secret are the
/// credential); the cookie is cleared only with the browser's last tab.
async fn end_session(State(s): State<Arc<AppState>>, req: Request) -> Response {
    match s
        .sessions
        .end(req.headers(), req.uri().query(), Instant::now())
    {
        None => StatusCode::NOT_FOUND.into_response(),
        Some(false) => StatusCode::NO_CONTENT.into_response(),
        Some(true) => (
            StatusCode::NO_CONTENT,
            [(axum::http::header::SET_COOKIE, s.sessions.cleared())],
        )
            .into_response(),
    }
}

async fn livez(State(s): State<Arc<AppState>>) -> Response {
    let age = s.heartbeat_age();
    if age < Duration::from_secs(10) {
        "ok\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("supervisor loop silent for {:.1} s\n", age.as_secs_f64()),
        )
            .into_response()
    }
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    let ready = s.ready.load(Ordering::Relaxed);
    let model = s.model.read().expect("model lock").clone();
    let p = s.publisher.stats();
    let streams: Vec<serde_json::Value> = s
        .stream_reports()
        .into_iter()
        .map(|r| serde_json::json!({"id": r.id, "state": r.status.state.as_str()}))
        .collect();
    // Degraded, still serving: what an operator should look at.
    let degraded = s.degraded();
    let body = serde_json::json!({
        "ready": ready,
        "degraded": degraded,
        "model": {"name": model.name, "version": model.version, "manifest_sha256": model.manifest_sha256, "trained": model.trained, "backend": model.backend},
        "publisher": {"connected": p.connected, "spool_pending": p.pending, "spool_durable": p.durable},
        "streams": streams,
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.render_metrics(),
    )
        .into_response()
}

/// Every stream; a stream's last error by its kind only (its message can name hosts, ports
/// and reasons an API caller could use to probe the daemon's network with streams of its
/// own).
async fn list_streams(State(s): State<Arc<AppState>>) -> Response {
    let mut reports = s.stream_reports();
    for r in &mut reports {
        if let Some(e) = &mut r.status.last_error {
            e.message = e.kind.to_string();
        }
    }
    Json(reports).into_response()
}

/// The stream a POST /api/streams body describes. `credentials` may only name a set from
/// `[http.api_credentials]`; the scheme must be one of `http.api_schemes`.
pub fn api_stream(body: &[u8], api: &ApiPolicy) -> Result<StreamConfig, CommandError> {
    let invalid = |m: String| CommandError::Invalid(vec![m]);
    let mut value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| invalid(format!("body: {e}")))?;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| invalid("body: expected a JSON object (one [[streams]] entry)".into()))?;
    let credentials = match obj.remove("credentials") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(name)) => match api.credentials.get(&name) {
            Some(set) => Some(set.clone()),
            None => {
                let shown = if crate::types::check_id(&name).is_ok() {
                    format!("{name:?}")
                } else {
                    "(not a set name)".into()
                };
                return Err(invalid(format!(
                    "credentials: no set {shown} in http.api_credentials"
                )));
            }
        },
        Some(_) => {
            return Err(invalid(
                "credentials: through the API, name a set the operator defined in \
                 http.api_credentials (\"credentials\": \"<name>\"); files and environment \
                 variables cannot be named here"
                    .into(),
            ));
        }
    };
    let mut stream: StreamConfig = serde_path_to_error::deserialize(value).map_err(|e| {
        let at = e.path().to_string();
        invalid(format!(
            "{}: {}",
            if at == "." { "body".to_string() } else { at },
            e.into_inner()
        ))
    })?;
    stream.credentials = credentials;
    let scheme = stream
        .uri
        .split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_else(|| "file".into());
    if !api.schemes.contains(&scheme) {
        return Err(invalid(format!(
            "uri: scheme {scheme:?} is not allowed through the API (http.api_schemes: {})",
            api.schemes.join(", ")
        )));
    }
    Ok(stream)
}

async fn add_stream(
    State(s): State<Arc<AppState>>,
    ConnectInfo(caller): ConnectInfo<SocketAddr>,
    body: axum::body::Bytes,
) -> Response {
    let stream = match api_stream(&body, &s.api) {
        Ok(st) => st,
        Err(e) => {
            guard::audit(caller, "add_stream", "-", "refused: invalid");
            return command_error(e);
        }
    };
    let id = stream.id.to_string();
    let r = ask(&s, |reply| Command::AddStream {
        stream: Box::new(stream),
        reply,
    })
    .await;
    match r {
        Some(Ok(())) => {
            guard::audit(caller, "add_stream", &id, "added");
            (
                StatusCode::CREATED,
                Json(serde_json::json!({"added": id, "runtime_only": true})),
            )
                .into_response()
        }
        Some(Err(e)) => {
            guard::audit(caller, "add_stream", &id, &format!("refused: {}", e.kind()));
            command_error(e)
        }
        None => unavailable(),
    }
}

async fn remove_stream(
    State(s): State<Arc<AppState>>,
    ConnectInfo(caller): ConnectInfo<SocketAddr>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let Ok(id) = crate::types::StreamId::new(&id) else {
        guard::audit(caller, "remove_stream", "-", "refused: not a stream id");
        return command_error(CommandError::NotFound("(not a stream id)".into()));
    };
    let shown = id.to_string();
    match ask(&s, |reply| Command::RemoveStream { id, reply }).await {
        Some(Ok(())) => {
            guard::audit(caller, "remove_stream", &shown, "removed");
            StatusCode::NO_CONTENT.into_response()
        }
        Some(Err(e)) => {
            guard::audit(
                caller,
                "remove_stream",
                &shown,
                &format!("refused: {}", e.kind()),
            );
            command_error(e)
        }
        None => unavailable(),
    }
}

async fn reload(
    State(s): State<Arc<AppState>>,
    ConnectInfo(caller): ConnectInfo<SocketAddr>,
) -> Response {
    match ask(&s, |reply| Command::Reload { reply }).await {
        Some(Ok(report)) => {
            guard::audit(caller, "reload", "config", "applied");
            Json(report).into_response()
        }
        Some(Err(e)) => {
            guard::audit(
                caller,
                "reload",
                "config",
                &format!("refused: {}", e.kind()),
            );
            command_error(e)
        }
        None => unavailable(),
    }
}

/// The router over `state`; serve it with the callers' addresses
/// (`into_make_service_with_connect_info::<SocketAddr>()`, as [`serve`] does).
pub fn router(state: Arc<AppState>) -> Router {
    let token = from_fn_with_state(state.clone(), require_token);
    let reader = from_fn_with_state(state.clone(), require_reader);
    let reads_need_token = state.api.reads_need_token;
    let read = |r: MethodRouter<Arc<AppState>>| {
        if reads_need_token {
            r.route_layer(reader.clone())
        } else {
            r
        }
    };
    Router::new()
        .route("/", get(page::index))
        .route("/page.css", get(page::css))
        .route("/page.js", get(page::js))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/api/streams",
            read(get(list_streams)).merge(post(add_stream).route_layer(token.clone())),
        )
        .route(
            "/api/streams/{id}",
            delete(remove_stream).route_layer(token.clone()),
        )
        .route("/api/alerts", read(get(events::alerts)))
        .route("/api/events", read(get(events::list)))
        .route("/api/events/export", read(get(events::export)))
        .route("/api/events/stream", read(get(events::stream)))
        .route(
            "/api/events/{id}",
            read(get(events::get_one)).merge(delete(events::delete).route_layer(token.clone())),
        )
        .route("/api/events/{id}/snapshot.jpg", read(get(events::snapshot)))
        .route("/api/events/{id}/face.jpg", read(get(events::face)))
        .route(
            "/api/events/{id}/review",
            post(events::review).route_layer(token.clone()),
        )
        .route(
            "/api/session",
            post(create_session)
                .route_layer(token.clone())
                .merge(delete(end_session)),
        )
        .route("/api/reload", post(reload).route_layer(token))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(refuse_cross_site))
        .layer(axum::middleware::map_response(no_sniff))
        .layer(from_fn_with_state(state.clone(), require_local_host))
        .layer(from_fn_with_state(
            state.connections.clone(),
            listener::request_deadline,
        ))
        .with_state(state)
}

/// Binds `listen` (failing at once if it cannot) and serves until `cancel`, under the
/// bounds of [`listener`].
pub async fn serve(
    listen: SocketAddr,
    state: Arc<AppState>,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("http.listen: cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let app = router(state.clone());
    let task = tokio::spawn(listener::accept_loop(
        listener,
        app,
        state.connections.clone(),
        cancel,
    ));
    Ok((addr, task))
}

#[cfg(test)]
mod tests {
    use super::guard::authorised;
    use super::*;
    use axum::http::{HeaderMap, header};

    #[test]
    fn bearer_tokens_must_match_exactly() {
        let mut h = HeaderMap::new();
        assert!(!authorised(&h, "secret-token-0123456789"));
        h.insert(
            header::AUTHORIZATION,
            "Bearer secret-token-0123456789".parse().unwrap(),
        );
        assert!(authorised(&h, "secret-token-0123456789"));
        assert!(!authorised(&h, "secret-token-0123456788"));
        assert!(!authorised(&h, "secret-token-012345678"));
        h.insert(
            header::AUTHORIZATION,
            "Basic secret-token-0123456789".parse().unwrap(),
        );
        assert!(!authorised(&h, "secret-token-0123456789"));
    }

    #[test]
    fn only_addresses_and_localhost_are_local_hosts() {
        let with = |h: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, h.parse().unwrap());
            local_host(&m)
        };
        for ok in [
            "127.0.0.1:8787",
            "127.0.0.1",
            "localhost:8787",
            "LOCALHOST",
            "[::1]:8787",
            "[::1]",
        ] {
            assert!(with(ok), "{ok}");
        }
        for bad in [
            "evil.example:8787",
            "evil.example",
            "127.0.0.1.nip.io:8787",
            "localhost.evil:80",
            "[::1",
            "[::1]junk",
        ] {
            assert!(!with(bad), "{bad}");
        }
        assert!(!local_host(&HeaderMap::new()), "no Host at all");
        let mut m = HeaderMap::new();
        m.insert(
            header::HOST,
            axum::http::HeaderValue::from_bytes(b"127.0.0.1\xff").unwrap(),
        );
        assert!(!local_host(&m), "a Host that is not UTF-8");
    }

    #[test]
    fn changes_sent_by_another_site_are_told_apart_from_the_page_and_from_scripts() {
        let with = |pairs: &[(&'static str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, v.parse().unwrap());
            }
            cross_site(&m)
        };
        // The page itself, and a person typing the address.
        assert_eq!(with(&[("sec-fetch-site", "same-origin")]), None);
        assert_eq!(with(&[("sec-fetch-site", "none")]), None);
        assert_eq!(
            with(&[
                ("origin", "http://127.0.0.1:8787"),
                ("host", "127.0.0.1:8787")
            ]),
            None
        );
        // curl and services send neither header.
        assert_eq!(with(&[("host", "127.0.0.1:8787")]), None);
        // Another site's page, with or without Fetch Metadata.
        for bad in [
            vec![("sec-fetch-site", "cross-site")],
            vec![("sec-fetch-site", "same-site")],
            vec![
                ("sec-fetch-site", "cross-site"),
                ("origin", "http://127.0.0.1:8787"),
                ("host", "127.0.0.1:8787"),
            ],
            vec![
                ("origin", "http://evil.example"),
                ("host", "127.0.0.1:8787"),
            ],
            vec![("origin", "null"), ("host", "127.0.0.1:8787")],
            vec![
                ("origin", "http://127.0.0.1:9999"),
                ("host", "127.0.0.1:8787"),
            ],
            vec![("origin", "http://127.0.0.1:8787")],
        ] {
            assert!(with(&bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn a_generated_token_is_kept_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cfg = HttpConfig::default();
        let a = cfg.token(dir.path(), dir.path()).unwrap();
        let b = cfg.token(dir.path(), dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 48);
        let mode = std::fs::metadata(dir.path().join("api-token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.path().join("short"), "abc").unwrap();
        let cfg = HttpConfig {
            token_file: Some("short".into()),
            ..HttpConfig::default()
        };
        let err = cfg.token(dir.path(), dir.path()).unwrap_err().to_string();
        assert!(err.contains("shorter than 16"), "{err}");
    }
}
