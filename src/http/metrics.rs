//! The HTTP surface's metric families: the API's guard, the listener's bounds, the long
//! answers' places and browser sessions. `/metrics` is the stages' families
//! (`metrics::families`) followed by these.

use std::sync::atomic::Ordering;

use super::guard::Guard;
use super::listener::Connections;
use super::places::Places;
use super::session::Sessions;
use crate::metrics::Exposition;

/// What the HTTP families read.
pub struct HttpSample<'a> {
    pub guard: &'a Guard,
    pub connections: &'a Connections,
    pub subscribers: &'a Places,
    pub exports: &'a Places,
    pub sessions: &'a Sessions,
}

/// Adds the HTTP families to `e`.
pub fn render(e: &mut Exposition, s: &HttpSample<'_>) {
    let c = s.connections;
    for (name, help, v) in [
        (
            "dfwatch_api_auth_failures_total",
            "API requests refused for a wrong token (a request without one is not counted).",
            s.guard.auth_failures.get(),
        ),
        (
            "dfwatch_api_throttled_total",
            "API requests refused because their client failed the token too often.",
            s.guard.throttled.get(),
        ),
        (
            "dfwatch_api_clients_forgotten_total",
            "Failing API clients forgotten because the throttle's book was full.",
            s.guard.forgotten.get(),
        ),
        (
            "dfwatch_http_connections_accepted_total",
            "HTTP connections accepted.",
            c.accepted.get(),
        ),
        (
            "dfwatch_http_connections_evicted_total",
            "HTTP connections closed to make room at http.max_connections (the oldest first).",
            c.evicted.get(),
        ),
        (
            "dfwatch_http_header_timeouts_total",
            "HTTP connections closed because a request head took longer than http.header_timeout (or the connection sat idle that long).",
            c.header_timeouts.get(),
        ),
        (
            "dfwatch_http_request_timeouts_total",
            "HTTP requests answered 408 for taking longer than http.request_timeout.",
            c.request_timeouts.get(),
        ),
        (
            "dfwatch_http_accept_errors_total",
            "Failed accepts on the HTTP listener (out of file descriptors, say).",
            c.accept_errors.get(),
        ),
        (
            "dfwatch_events_subscribers_evicted_total",
            "Subscribers of /api/events/stream ended to make room for newer ones (in all, or of one client).",
            s.subscribers.evicted.get(),
        ),
        (
            "dfwatch_events_exports_refused_total",
            "Exports of /api/events/export refused because the most were running (in all, or for one client).",
            s.exports.refused.get(),
        ),
        (
            "dfwatch_http_bodies_stalled_total",
            "Long answers (events stream, exports) abandoned because the client stopped reading them.",
            s.subscribers.stalled.get() + s.exports.stalled.get(),
        ),
        (
            "dfwatch_api_sessions_evicted_total",
            "Browser sessions ended early to stay within the sessions' bound.",
            s.sessions.evicted.get(),
        ),
    ] {
        e.family(name, "counter", help).sample(name, &[], v as f64);
    }
    for (name, help, v) in [
        (
            "dfwatch_http_connections",
            "HTTP connections open now (at most http.max_connections).",
            c.open.load(Ordering::Relaxed),
        ),
        (
            "dfwatch_events_subscribers",
            "Live subscribers of /api/events/stream.",
            s.subscribers.held.load(Ordering::Relaxed),
        ),
        (
            "dfwatch_api_sessions",
            "Browser sessions (POST /api/session) live now.",
            s.sessions.len() as u64,
        ),
    ] {
        e.family(name, "gauge", help).sample(name, &[], v as f64);
    }
}
