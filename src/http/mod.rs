//! The HTTP surface (axum): health, metrics and the stream API.
//!
//! | route | method | auth | what |
//! |---|---|---|---|
//! | `/livez` | GET | - | 200 while the supervisor loop ticks |
//! | `/readyz` | GET | - | 200 once config, model, spool, publisher and HTTP are up; body: states |
//! | `/metrics` | GET | - | Prometheus text format |
//! | `/api/streams` | GET | - | every stream with status and counters |
//! | `/api/streams` | POST | bearer | add a runtime-only stream (JSON of a `[[streams]]` entry) |
//! | `/api/streams/{id}` | DELETE | bearer | remove a stream |
//! | `/api/alerts` | GET | - | recent alert payloads, newest last (`?limit=N`) |
//! | `/api/reload` | POST | bearer | re-read the config file (as SIGHUP) |
//!
//! Mutating calls need `Authorization: Bearer <token>`, loopback included.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::app::state::{AppState, Command, CommandError};
use crate::ingest::StreamConfig;

/// `[http]`: the health, metrics and API listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub enabled: bool,
    /// Listen address; keep it on loopback unless a reverse proxy guards it.
    pub listen: SocketAddr,
    /// Environment variable holding the API token.
    pub token_env: Option<String>,
    /// File holding the API token. With neither set, a token is generated at first start
    /// into the state directory (`$STATE_DIRECTORY`, else `var/state`) as `api-token`.
    pub token_file: Option<PathBuf>,
    /// URI schemes accepted for streams added through the API (local files are not, unless
    /// listed: an API caller should not read the daemon's disk).
    pub api_schemes: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8787)),
            token_env: None,
            token_file: None,
            api_schemes: ["rtsp", "rtsps", "srt", "http", "https"]
                .map(String::from)
                .to_vec(),
        }
    }
}

const KNOWN_SCHEMES: &[&str] = &["rtsp", "rtsps", "srt", "http", "https", "file", "v4l2"];

impl HttpConfig {
    pub(crate) fn validate(&self, path: &str, errors: &mut Vec<crate::validation::ConfigError>) {
        let mut c = crate::validation::Checker::new(path, errors);
        for (i, s) in self.api_schemes.iter().enumerate() {
            if !KNOWN_SCHEMES.contains(&s.as_str()) {
                c.error(
                    &format!("api_schemes[{i}]"),
                    format!("unknown scheme {s:?}; known: {}", KNOWN_SCHEMES.join(", ")),
                );
            }
        }
        if self.token_env.is_some() && self.token_file.is_some() {
            c.error("", "set one of token_env and token_file, not both");
        }
        c.env_name("token_env", self.token_env.as_deref());
    }

    /// The API token: from the environment, the file, or generated into `state_dir`.
    pub fn token(&self, base_dir: &Path, state_dir: &Path) -> anyhow::Result<String> {
        use anyhow::Context;
        if let Some(var) = &self.token_env {
            let t = std::env::var(var).with_context(|| {
                format!("http.token_env: environment variable {var} is not set")
            })?;
            return check_token(t.trim(), &format!("environment variable {var}"));
        }
        if let Some(p) = &self.token_file {
            let p = if p.is_absolute() {
                p.clone()
            } else {
                base_dir.join(p)
            };
            let t = std::fs::read_to_string(&p)
                .with_context(|| format!("http.token_file: cannot read {}", p.display()))?;
            return check_token(t.trim(), &p.display().to_string());
        }
        let p = state_dir.join("api-token");
        if let Ok(t) = std::fs::read_to_string(&p) {
            return check_token(t.trim(), &p.display().to_string());
        }
        std::fs::create_dir_all(state_dir).with_context(|| {
            format!("cannot create the state directory {}", state_dir.display())
        })?;
        let mut bytes = [0u8; 24];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
            .context("reading /dev/urandom for the API token")?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        write_private(&p, token.as_bytes())
            .with_context(|| format!("writing the API token to {}", p.display()))?;
        tracing::info!(path = %p.display(), "Generated the API token (mode 0600).");
        Ok(token)
    }
}

fn check_token(t: &str, from: &str) -> anyhow::Result<String> {
    if t.len() < 16 {
        anyhow::bail!("the API token in {from} is shorter than 16 characters");
    }
    Ok(t.to_string())
}

fn write_private(p: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Constant-time comparison of the presented bearer token.
fn authorised(headers: &HeaderMap, token: &str) -> bool {
    let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(given) = v.strip_prefix("Bearer ") else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unauthorised() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(serde_json::json!({"error": "unauthorised", "detail": "send Authorization: Bearer <token> (see http.token_file or the state directory's api-token)"})),
    )
        .into_response()
}

fn command_error(e: CommandError) -> Response {
    let code = match e {
        CommandError::Invalid(_) => StatusCode::BAD_REQUEST,
        CommandError::Exists(_) => StatusCode::CONFLICT,
        CommandError::NotFound(_) => StatusCode::NOT_FOUND,
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
    let body = serde_json::json!({
        "ready": ready,
        "model": {"name": model.name, "version": model.version, "manifest_sha256": model.manifest_sha256, "trained": model.trained, "backend": model.backend},
        "publisher": {"connected": p.connected, "spool_pending": p.pending},
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
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.render_metrics(),
    )
        .into_response()
}

async fn list_streams(State(s): State<Arc<AppState>>) -> Response {
    Json(s.stream_reports()).into_response()
}

async fn add_stream(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !authorised(&headers, &s.token) {
        return unauthorised();
    }
    let mut de = serde_json::Deserializer::from_slice(&body);
    let stream: StreamConfig = match serde_path_to_error::deserialize(&mut de) {
        Ok(c) => c,
        Err(e) => {
            let at = e.path().to_string();
            return command_error(CommandError::Invalid(vec![format!(
                "{}: {}",
                if at == "." { "body".to_string() } else { at },
                e.into_inner()
            )]));
        }
    };
    let scheme = stream
        .uri
        .split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_else(|| "file".into());
    if !s.api_schemes.contains(&scheme) {
        return command_error(CommandError::Invalid(vec![format!(
            "uri: scheme {scheme:?} is not allowed through the API (http.api_schemes: {})",
            s.api_schemes.join(", ")
        )]));
    }
    let id = stream.id.to_string();
    match ask(&s, |reply| Command::AddStream {
        stream: Box::new(stream),
        reply,
    })
    .await
    {
        Some(Ok(())) => (
            StatusCode::CREATED,
            Json(serde_json::json!({"added": id, "runtime_only": true})),
        )
            .into_response(),
        Some(Err(e)) => command_error(e),
        None => unavailable(),
    }
}

async fn remove_stream(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    if !authorised(&headers, &s.token) {
        return unauthorised();
    }
    let Ok(id) = crate::types::StreamId::new(&id) else {
        return command_error(CommandError::NotFound(id));
    };
    match ask(&s, |reply| Command::RemoveStream { id, reply }).await {
        Some(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Some(Err(e)) => command_error(e),
        None => unavailable(),
    }
}

async fn reload(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if !authorised(&headers, &s.token) {
        return unauthorised();
    }
    match ask(&s, |reply| Command::Reload { reply }).await {
        Some(Ok(report)) => Json(report).into_response(),
        Some(Err(e)) => command_error(e),
        None => unavailable(),
    }
}

#[derive(Deserialize)]
struct AlertsQuery {
    limit: Option<usize>,
}

async fn alerts(State(s): State<Arc<AppState>>, Query(q): Query<AlertsQuery>) -> Response {
    let all = s.publisher.recent_alerts();
    let limit = q.limit.unwrap_or(all.len()).min(all.len());
    let items: Vec<serde_json::Value> = all[all.len() - limit..]
        .iter()
        .filter_map(|p| serde_json::from_slice(p).ok())
        .collect();
    Json(items).into_response()
}

/// The router over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/streams", get(list_streams).post(add_stream))
        .route("/api/streams/{id}", delete(remove_stream))
        .route("/api/alerts", get(alerts))
        .route("/api/reload", post(reload))
        .with_state(state)
}

/// Binds `listen` (failing at once if it cannot) and serves until `cancel`.
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
    let app = router(state);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await
        {
            tracing::error!(error = %e, "HTTP server failed.");
        }
    });
    Ok((addr, task))
}

#[cfg(test)]
mod tests {
    use super::*;

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
