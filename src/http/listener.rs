//! The HTTP listener: its own accept loop, so that what a hostile client can hold is bounded.
//!
//! - At most `http.max_connections` connections are open. At the bound the **oldest** one is
//!   closed to admit the new one: a flood of slow clients then churns through itself, and a
//!   health probe (which finishes in milliseconds) still gets its answer. Without a bound,
//!   idle sockets would use up the process's file descriptors, and with them the spool, the
//!   streams' reconnects and every later accept.
//! - A request's head must arrive within `http.header_timeout` (hyper's header deadline,
//!   which also limits how long a kept-alive connection may sit idle), so clients that trickle
//!   a byte at a time are cut off.
//! - A whole request, body included, must finish within `http.request_timeout` (408).
//! - A request head is at most [`MAX_HEAD_BYTES`] with [`MAX_HEADERS`] fields (431).
//! - On shutdown, connections in flight get [`SHUTDOWN_GRACE`] to finish.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Counter;

/// How long connections in flight may take to finish once the daemon stops.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Largest read buffer of one connection (bodies stream through it).
pub const READ_BUFFER_BYTES: usize = 32 * 1024;
/// Largest request head (start line and header fields); larger ones are answered 431.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header fields in one request head.
pub const MAX_HEADERS: usize = 64;

/// The listener's bounds, from `[http]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
}

impl Limits {
    pub fn of(c: &super::HttpConfig) -> Limits {
        Limits {
            max_connections: c.max_connections.max(1),
            header_timeout: c.header_timeout,
            request_timeout: c.request_timeout,
        }
    }
}

/// The listener's bounds and what they cost, for `/metrics`.
#[derive(Debug)]
pub struct Connections {
    pub limits: Limits,
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections accepted since the start.
    pub accepted: Counter,
    /// Connections closed to make room at `max_connections`.
    pub evicted: Counter,
    /// Connections closed because a request's head did not arrive in time (or a kept-alive
    /// connection sat idle too long).
    pub header_timeouts: Counter,
    /// Requests answered 408 because they took longer than `request_timeout`.
    pub request_timeouts: Counter,
    /// Failed accepts (out of file descriptors, say).
    pub accept_errors: Counter,
    /// Open connections by admission order; the first is the one evicted.
    book: Mutex<BTreeMap<u64, CancellationToken>>,
    next_id: AtomicU64,
}

impl Connections {
    pub fn new(limits: Limits) -> Connections {
        Connections {
            limits,
            open: AtomicU64::new(0),
            accepted: Counter::default(),
            evicted: Counter::default(),
            header_timeouts: Counter::default(),
            request_timeouts: Counter::default(),
            accept_errors: Counter::default(),
            book: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
        }
    }

    /// Books a new connection, closing the oldest ones past the bound. Returns the new
    /// connection's id and the token that closes it.
    fn admit(&self) -> (u64, CancellationToken) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        let mut book = self.book.lock().expect("connection book lock");
        while book.len() >= self.limits.max_connections {
            match book.pop_first() {
                Some((_, oldest)) => {
                    oldest.cancel();
                    self.evicted.inc();
                }
                None => break,
            }
        }
        book.insert(id, token.clone());
        (id, token)
    }

    fn release(&self, id: u64) {
        self.book.lock().expect("connection book lock").remove(&id);
    }

    /// Connections booked now (at most `max_connections`).
    pub fn booked(&self) -> usize {
        self.book.lock().expect("connection book lock").len()
    }
}

/// Counts one open connection for as long as it lives.
struct OpenGuard<'a>(&'a AtomicU64);

impl<'a> OpenGuard<'a> {
    fn new(open: &'a AtomicU64) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(open)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Middleware: a request that takes longer than `request_timeout` (reading its body
/// included) is answered 408.
pub async fn request_deadline(
    State(conns): State<Arc<Connections>>,
    req: Request,
    next: Next,
) -> Response {
    let limit = conns.limits.request_timeout;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            conns.request_timeouts.inc();
            (
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request took longer than http.request_timeout = {}",
                    humantime::format_duration(limit)
                ),
            )
                .into_response()
        }
    }
}

/// Accepts until `cancel`, then gives connections in flight [`SHUTDOWN_GRACE`].
pub async fn accept_loop(
    listener: TcpListener,
    app: Router,
    conns: Arc<Connections>,
    cancel: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let mut quiet_until = tokio::time::Instant::now();
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors or memory: say so at most every 10 s, back off a little
                // rather than spin, and keep serving.
                conns.accept_errors.inc();
                let now = tokio::time::Instant::now();
                if now >= quiet_until {
                    tracing::warn!(error = %e, "HTTP listener: accept failed.");
                    quiet_until = now + Duration::from_secs(10);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        conns.accepted.inc();
        let (id, close) = conns.admit();
        tracker.spawn(connection(
            stream,
            peer,
            app.clone(),
            conns.clone(),
            (id, close),
            cancel.clone(),
        ));
    }
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_millis(500), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("HTTP listener: connections still open after the shutdown grace.");
    }
}

/// Serves one connection until it ends, is evicted, or the daemon stops.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    conns: Arc<Connections>,
    (id, close): (u64, CancellationToken),
    stop: CancellationToken,
) {
    let _open = OpenGuard::new(&conns.open);
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut app = app.clone();
        async move {
            let req = req.map(axum::body::Body::new);
            tower_service::Service::call(&mut app, req).await
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(conns.limits.header_timeout)
        // A full house of connections holds at most 256 x 32 KiB of read buffers (hyper's
        // default is ~400 KiB each); a larger head is refused (431).
        .max_buf_size(READ_BUFFER_BYTES)
        .max_header_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => Some(r),
        // Evicted to make room: close at once.
        _ = close.cancelled() => None,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await.ok()
        }
    };
    conns.release(id);
    if let Some(Err(e)) = result {
        if e.is_timeout() {
            conns.header_timeouts.inc();
        } else {
            tracing::debug!(error = %e, "HTTP connection ended with an error.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_connections: usize) -> Limits {
        Limits {
            max_connections,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn past_the_bound_the_oldest_connections_are_closed_first() {
        let c = Connections::new(limits(2));
        let (a, ta) = c.admit();
        let (b, tb) = c.admit();
        assert_eq!((c.booked(), c.evicted.get()), (2, 0));
        let (_, tc) = c.admit();
        assert!(ta.is_cancelled() && !tb.is_cancelled() && !tc.is_cancelled());
        assert_eq!((c.booked(), c.evicted.get()), (2, 1));
        // A connection that ended on its own leaves room; releasing an evicted one is a no-op.
        c.release(b);
        c.release(a);
        assert_eq!(c.booked(), 1);
        let (_, td) = c.admit();
        assert!(!tc.is_cancelled() && !td.is_cancelled());
        assert_eq!((c.booked(), c.evicted.get()), (2, 1));
    }

    #[test]
    fn a_bound_of_one_still_admits_every_new_connection() {
        let c = Connections::new(limits(1));
        let tokens: Vec<_> = (0..5).map(|_| c.admit().1).collect();
        assert_eq!(tokens.iter().filter(|t| t.is_cancelled()).count(), 4);
        assert!(!tokens[4].is_cancelled());
        assert_eq!((c.booked(), c.evicted.get()), (1, 4));
    }
}
