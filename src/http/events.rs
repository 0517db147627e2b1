//! The events API over the event store (`crate::events`).
//!
//! | route | method | auth | what |
//! |---|---|---|---|
//! | `/api/events` | GET | read | events, newest first, paged (`stream`, `verdict`, `since`, `until`, `limit`, `cursor`) |
//! | `/api/events/{id}` | GET | read | one event: its state, review and lifecycle (every payload) |
//! | `/api/events/{id}/snapshot.jpg` | GET | read | the strongest frame, face box drawn (`store_media` streams) |
//! | `/api/events/{id}/face.jpg` | GET | read | the aligned face crop (`store_media` streams) |
//! | `/api/events/{id}` | DELETE | bearer | deletes the event and its media |
//! | `/api/events/{id}/review` | POST | bearer | `{"review": "false_alarm" \| "confirmed", "note": "..."}` |
//! | `/api/events/export` | GET | read | JSON lines, oldest first (`since`) |
//! | `/api/events/stream` | GET | read | server-sent events of new and changed events |
//! | `/api/alerts` | GET | read | the newest alert payloads, newest last (`limit`, default 100) |
//!
//! `since` and `until` are RFC 3339 times or unix milliseconds and select by the time the
//! event started. `cursor` is the previous page's `next_cursor` (an alert id: ids grow with
//! time, so pages stay put while new events arrive). Every database call runs off the async
//! runtime.
//!
//! The SSE stream: each change is `event: new|update|end|review|delete`, `id: <seq>`, `data:`
//! `{"change", "seq", "alert_id", "event"}`. A client that reconnects with `Last-Event-ID`
//! first gets the events changed since, as `update` or `end` (deletions are not replayed); one that fell behind,
//! or missed more than a replay holds, gets `event: reset` and should reload the list.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::{ConnectInfo, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::state::AppState;
use super::{guard, places};
use crate::events::{DbError, Filter, MediaKind, Review, db::MAX_PAGE};

/// Live subscribers at once (each holds a connection), and for one client address; a new
/// one beyond either ends the oldest ([`places`]).
pub const MAX_SUBSCRIBERS: usize = 32;
pub const MAX_SUBSCRIBERS_PER_CLIENT: usize = 4;
/// Events a reconnecting subscriber is replayed at most.
pub const MAX_REPLAY: usize = 500;
/// Exports running at once, and for one client address (more are refused).
pub const MAX_EXPORTS: usize = 2;
pub const MAX_EXPORTS_PER_CLIENT: usize = 1;

/// The places of live subscribers.
pub fn subscriber_places() -> Arc<places::Places> {
    places::Places::new(
        MAX_SUBSCRIBERS,
        MAX_SUBSCRIBERS_PER_CLIENT,
        places::WhenFull::EvictOldest,
    )
}

/// The places of running exports.
pub fn export_places() -> Arc<places::Places> {
    places::Places::new(
        MAX_EXPORTS,
        MAX_EXPORTS_PER_CLIENT,
        places::WhenFull::Refuse,
    )
}
/// Longest review note.
pub const MAX_NOTE_CHARS: usize = 1000;
/// `/api/alerts`: default and largest `limit`.
pub const ALERTS_DEFAULT: usize = 100;
pub const ALERTS_MAX: usize = 1000;

fn bad(what: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({"error": "invalid", "detail": what.into()})),
    )
        .into_response()
}

/// 503 with `Retry-After`: a bounded number of places is taken.
fn busy(retry_after_s: &'static str, detail: String) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, retry_after_s)],
        Json(serde_json::json!({"error": "busy", "detail": detail})),
    )
        .into_response()
}

fn not_found(id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({"error": "not_found", "detail": format!("no event {id}")})),
    )
        .into_response()
}

fn store_failed(e: DbError) -> Response {
    tracing::warn!(error = %e, "The event store could not answer an API call.");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(serde_json::json!({"error": "event_store", "detail": "the event store could not answer (see the daemon's log)"})),
    )
        .into_response()
}

/// An alert id as the daemon makes them: a ULID, 26 characters of Crockford base 32.
fn alert_id(s: &str) -> Option<&str> {
    (s.len() == 26
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b.is_ascii_uppercase() && !b"ILOU".contains(&b))))
    .then_some(s)
}

/// Runs `f` on the database off the async runtime.
async fn on_db<T: Send + 'static>(
    s: &Arc<AppState>,
    f: impl FnOnce(&crate::events::Db) -> Result<T, DbError> + Send + 'static,
) -> Result<T, DbError> {
    let store = s.events.clone();
    blocking(move || store.read(f)).await
}

/// Runs a store call off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DbError> + Send + 'static,
) -> Result<T, DbError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(DbError::Path {
            path: "-".into(),
            what: e.to_string(),
        })
    })
}

/// A time bound: RFC 3339 or unix milliseconds.
fn time_ms(key: &str, v: Option<&str>) -> Result<Option<i64>, String> {
    let Some(v) = v else { return Ok(None) };
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(Some(ms));
    }
    humantime::parse_rfc3339_weak(v)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| Some(d.as_millis() as i64))
        .ok_or_else(|| {
            format!("{key}: expected an RFC 3339 time (2026-11-30T12:00:00Z) or unix milliseconds")
        })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    stream: Option<String>,
    verdict: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

pub async fn list(State(s): State<Arc<AppState>>, Query(q): Query<ListQuery>) -> Response {
    let stream = match q.stream {
        Some(st) => match crate::types::StreamId::new(&st) {
            Ok(id) => Some(id.to_string()),
            Err(_) => return bad("stream: not a stream id"),
        },
        None => None,
    };
    if let Some(v) = &q.verdict
        && !["fake", "real", "uncertain"].contains(&v.as_str())
    {
        return bad("verdict: one of fake, real, uncertain");
    }
    let limit = q.limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return bad(format!("limit: 1 to {MAX_PAGE}"));
    }
    let before = match q.cursor.as_deref() {
        Some(c) => match alert_id(c) {
            Some(c) => Some(c.to_string()),
            None => return bad("cursor: not a cursor (use next_cursor of the previous page)"),
        },
        None => None,
    };
    let since_ms = match time_ms("since", q.since.as_deref()) {
        Ok(v) => v,
        Err(why) => return bad(why),
    };
    let until_ms = match time_ms("until", q.until.as_deref()) {
        Ok(v) => v,
        Err(why) => return bad(why),
    };
    let filter = Filter {
        stream,
        verdict: q.verdict,
        since_ms,
        until_ms,
        before,
        limit,
    };
    match on_db(&s, move |db| db.list(&filter)).await {
        Ok((events, next)) => {
            Json(serde_json::json!({"events": events, "next_cursor": next})).into_response()
        }
        Err(e) => store_failed(e),
    }
}

/// One event with its lifecycle.
fn detail(db: &crate::events::Db, id: &str) -> Result<Option<serde_json::Value>, DbError> {
    let Some(summary) = db.get(id)? else {
        return Ok(None);
    };
    let lifecycle: Vec<serde_json::Value> = db
        .lifecycle(id)?
        .into_iter()
        .map(|(change, at_ms, payload)| {
            serde_json::json!({
                "change": change,
                "at": humantime::format_rfc3339_millis(
                    std::time::UNIX_EPOCH + Duration::from_millis(at_ms.max(0) as u64)
                ).to_string(),
                "payload": serde_json::from_str::<serde_json::Value>(&payload).unwrap_or_default(),
            })
        })
        .collect();
    let mut v = serde_json::to_value(summary).unwrap_or_default();
    v["lifecycle"] = serde_json::Value::Array(lifecycle);
    Ok(Some(v))
}

pub async fn get_one(State(s): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> Response {
    let Some(id) = alert_id(&id).map(str::to_string) else {
        return not_found("(not an alert id)");
    };
    let key = id.clone();
    match on_db(&s, move |db| detail(db, &key)).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => not_found(&id),
        Err(e) => store_failed(e),
    }
}

async fn media(s: Arc<AppState>, id: String, kind: MediaKind) -> Response {
    let Some(id) = alert_id(&id).map(str::to_string) else {
        return not_found("(not an alert id)");
    };
    let key = id.clone();
    match on_db(&s, move |db| db.media(&key, kind)).await {
        Ok(Some(jpeg)) => (
            [
                (header::CONTENT_TYPE, "image/jpeg"),
                // Biometric data: never kept by a browser's or a proxy's cache.
                (header::CACHE_CONTROL, "private, no-store"),
            ],
            jpeg,
        )
            .into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "not_found", "detail": format!("no {} for event {id} (media are kept for streams with store_media = true, within [events] max_media_bytes)", match kind { MediaKind::Snapshot => "snapshot", MediaKind::Face => "face crop" })})),
        )
            .into_response(),
        Err(e) => store_failed(e),
    }
}

pub async fn snapshot(State(s): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> Response {
    media(s, id, MediaKind::Snapshot).await
}

pub async fn face(State(s): State<Arc<AppState>>, UrlPath(id): UrlPath<String>) -> Response {
    media(s, id, MediaKind::Face).await
}

pub async fn delete(
    State(s): State<Arc<AppState>>,
    ConnectInfo(caller): ConnectInfo<std::net::SocketAddr>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let Some(id) = alert_id(&id).map(str::to_string) else {
        guard::audit(caller, "delete_event", "-", "refused: not an alert id");
        return not_found("(not an alert id)");
    };
    let store = s.events.clone();
    let key = id.clone();
    match blocking(move || store.delete(&key)).await {
        Ok(true) => {
            guard::audit(caller, "delete_event", &id, "deleted");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => {
            guard::audit(caller, "delete_event", &id, "refused: not found");
            not_found(&id)
        }
        Err(e) => store_failed(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewBody {
    review: Review,
    note: Option<String>,
}

pub async fn review(
    State(s): State<Arc<AppState>>,
    ConnectInfo(caller): ConnectInfo<std::net::SocketAddr>,
    UrlPath(id): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(id) = alert_id(&id).map(str::to_string) else {
        guard::audit(caller, "review_event", "-", "refused: not an alert id");
        return not_found("(not an alert id)");
    };
    let mut de = serde_json::Deserializer::from_slice(&body);
    let parsed: ReviewBody = match serde_path_to_error::deserialize(&mut de) {
        // One JSON object and nothing after it (trailing bytes are no review).
        Ok(b) if de.end().is_ok() => b,
        Ok(_) => {
            guard::audit(caller, "review_event", &id, "refused: invalid");
            return bad("body: trailing characters after the JSON object");
        }
        Err(e) => {
            guard::audit(caller, "review_event", &id, "refused: invalid");
            let at = e.path().to_string();
            return bad(format!(
                "{}: {} (expected {{\"review\": \"false_alarm\" | \"confirmed\", \"note\": \"...\"}})",
                if at == "." { "body".into() } else { at },
                e.into_inner()
            ));
        }
    };
    if let Some(n) = &parsed.note
        && n.chars().count() > MAX_NOTE_CHARS
    {
        return bad(format!("note: longer than {MAX_NOTE_CHARS} characters"));
    }
    let store = s.events.clone();
    let key = id.clone();
    let r = blocking(move || store.review(&key, parsed.review, parsed.note.as_deref())).await;
    match r {
        Ok(Some(summary)) => {
            guard::audit(caller, "review_event", &id, "reviewed");
            Json(summary).into_response()
        }
        Ok(None) => not_found(&id),
        Err(e) => store_failed(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    since: Option<String>,
}

/// The client a request counts against for the places' caps.
fn client(s: &AppState, peer: std::net::SocketAddr, headers: &HeaderMap) -> std::net::IpAddr {
    guard::client_ip(peer.ip(), headers, &s.api.trusted_proxies)
}

/// JSON lines, oldest first, read a page at a time while the body streams; a client that
/// stops reading for `http.request_timeout` loses it ([`places::stall_guarded`]).
pub async fn export(
    State(s): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<ExportQuery>,
) -> Response {
    let since = match time_ms("since", q.since.as_deref()) {
        Ok(v) => v,
        Err(why) => return bad(why),
    };
    // A page of events with their lifecycles is at most PAGE * 258 payloads.
    const PAGE: usize = 20;
    let Some(place) = s.exports.take(client(&s, peer, &headers)) else {
        return busy(
            "30",
            format!(
                "{MAX_EXPORTS} exports running already, or {MAX_EXPORTS_PER_CLIENT} from this \
                 client"
            ),
        );
    };
    let stall = s.connections.limits.request_timeout;
    let pages = futures_util::stream::unfold(
        (s, None::<String>, false),
        move |(s, after, done)| async move {
            if done {
                return None;
            }
            let from = after.clone();
            let page = on_db(&s, move |db| {
                let events = db.export_page(since, from.as_deref(), PAGE)?;
                let mut out = Vec::new();
                let mut last = None;
                for e in &events {
                    if let Some(v) = detail(db, &e.alert_id)? {
                        serde_json::to_writer(&mut out, &v).map_err(|e| DbError::Path {
                            path: "-".into(),
                            what: e.to_string(),
                        })?;
                        out.push(b'\n');
                    }
                    last = Some(e.alert_id.clone());
                }
                Ok((out, last, events.len() < PAGE))
            })
            .await;
            match page {
                Ok((bytes, last, end)) => Some((
                    Ok::<_, std::io::Error>(bytes::Bytes::from(bytes)),
                    (s, last.or(after), end),
                )),
                // The body is already under way: the error aborts the response (no final
                // chunk), so the client sees an incomplete transfer, not a short export that
                // looks whole; the log says why.
                Err(e) => {
                    tracing::warn!(error = %e, "The events export stopped early.");
                    Some((Err(std::io::Error::other(e.to_string())), (s, after, true)))
                }
            }
        },
    );
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "private, no-store"),
        ],
        axum::body::Body::from_stream(places::stall_guarded(pages, place, stall)),
    )
        .into_response()
}

fn sse_of(live: &crate::events::Live) -> SseEvent {
    let change = serde_json::to_value(live.change)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "change".into());
    SseEvent::default()
        .event(change)
        .id(live.seq.to_string())
        .json_data(live)
        .unwrap_or_else(|_| SseEvent::default().event("reset").data("{}"))
}

fn reset(why: &str) -> SseEvent {
    SseEvent::default()
        .event("reset")
        .data(serde_json::json!({"reason": why}).to_string())
}

/// Server-sent events of every change committed to the store. The newest subscribers win
/// a place: past the caps the oldest (of the same client first) is ended, and a client that
/// stops reading for `http.request_timeout` while an event waits for it loses its place.
pub async fn stream(
    State(s): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let Some(place) = s.subscribers.take(client(&s, peer, &headers)) else {
        return busy("10", format!("{MAX_SUBSCRIBERS} live subscribers already"));
    };
    let stall = s.connections.limits.request_timeout;
    // Subscribe before the replay is read: nothing committed in between is missed (a change
    // may come twice; its seq tells).
    let rx = s.events.subscribe();
    let last: Option<u64> = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let mut first: Vec<SseEvent> = Vec::new();
    let mut replayed_to = 0u64;
    if let Some(last) = last {
        match on_db(&s, move |db| {
            Ok((db.seq()?, db.changed_since(last, MAX_REPLAY + 1)?))
        })
        .await
        {
            // An id from the future: the database was started afresh (or the client made it
            // up): what it holds cannot be patched, only reloaded.
            Ok((now, _)) if last > now => first.push(reset("unknown_last_event_id")),
            Ok((_, events)) if events.len() > MAX_REPLAY => first.push(reset("too_many_missed")),
            Ok((_, events)) => {
                for e in events {
                    replayed_to = replayed_to.max(e.seq);
                    let change = if e.state == "open" {
                        crate::events::Change::Update
                    } else {
                        crate::events::Change::End
                    };
                    first.push(sse_of(&crate::events::Live {
                        change,
                        seq: e.seq,
                        alert_id: e.alert_id.clone(),
                        event: Some(e),
                    }));
                }
            }
            Err(e) => return store_failed(e),
        }
    }
    let state = s.clone();
    let live = futures_util::stream::unfold(
        (rx, state, replayed_to),
        |(mut rx, state, replayed_to)| async move {
            loop {
                if !state.ready.load(Ordering::Relaxed) {
                    // The daemon stops: the stream ends rather than hold the stop up.
                    return None;
                }
                let got = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await;
                let ev = match got {
                    Err(_) => continue,
                    Ok(Ok(live)) if live.seq <= replayed_to => continue,
                    Ok(Ok(live)) => sse_of(&live),
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => reset("lagged"),
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return None,
                };
                return Some((Ok::<_, std::io::Error>(ev), (rx, state, replayed_to)));
            }
        },
    );
    let all = futures_util::StreamExt::chain(
        futures_util::stream::iter(first.into_iter().map(Ok::<_, std::io::Error>)),
        live,
    );
    Sse::new(places::stall_guarded(all, place, stall))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsQuery {
    limit: Option<usize>,
}

/// The newest alert payloads from the store, newest last.
pub async fn alerts(State(s): State<Arc<AppState>>, Query(q): Query<AlertsQuery>) -> Response {
    let limit = q.limit.unwrap_or(ALERTS_DEFAULT);
    if limit > ALERTS_MAX {
        return bad(format!("limit: at most {ALERTS_MAX}"));
    }
    match on_db(&s, move |db| db.recent_payloads(limit)).await {
        Ok(rows) => {
            let items: Vec<serde_json::Value> = rows
                .iter()
                .filter_map(|p| serde_json::from_str(p).ok())
                .collect();
            Json(items).into_response()
        }
        Err(e) => store_failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::alert_id;

    #[test]
    fn only_ulids_are_alert_ids() {
        assert!(alert_id("01JDF0A7Z3K9Q8R6T5V4W3X2Y1").is_some());
        assert!(alert_id("01jdf0a7z3k9q8r6t5v4w3x2y1").is_none());
        assert!(alert_id("01JDF0A7Z3K9Q8R6T5V4W3X2YI").is_none());
        assert!(alert_id("../../etc/passwd").is_none());
        assert!(alert_id("").is_none());
        assert!(alert_id("01JDF0A7Z3K9Q8R6T5V4W3X2Y1A").is_none());
    }
}
