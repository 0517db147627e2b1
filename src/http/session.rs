//! Browser sessions for reads. A browser's `EventSource` cannot send an `Authorization`
//! header, so a page exchanges the bearer token once (`POST /api/session`, bearer required)
//! for a session cookie: `dfwatch_session`, `HttpOnly` (scripts cannot read it),
//! `SameSite=Strict` (other sites' pages cannot send it), `Path=/api/`, valid for
//! [`SESSION_TTL`]. The cookie authorises reads only (`GET`: streams, alerts, events, media,
//! the SSE stream); every change still needs the bearer token, so a cookie can never be
//! turned into a change from another origin. Sessions live in memory: a restart ends them.
//! `DELETE /api/session` ends one.
//!
//! Bound: [`MAX_SESSIONS`] at once; the oldest goes first (counted).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, header};
use sha2::{Digest, Sha256};

use crate::metrics::Counter;

/// The cookie's name.
pub const COOKIE: &str = "dfwatch_session";
/// How long a session is valid.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once.
pub const MAX_SESSIONS: usize = 256;

/// The live sessions, by the SHA-256 of their secret (the secret itself is not kept).
#[derive(Debug, Default)]
pub struct Sessions {
    book: Mutex<HashMap<[u8; 32], Instant>>,
    /// Sessions created.
    pub created: Counter,
    /// Sessions ended early because the book was full.
    pub evicted: Counter,
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The session secret of a request's `Cookie` header, if it carries one.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl Sessions {
    /// A new session at `now`: its `Set-Cookie` value.
    pub fn create(&self, now: Instant) -> std::io::Result<HeaderValue> {
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))?;
        let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        book.retain(|_, expires| *expires > now);
        while book.len() >= MAX_SESSIONS {
            let Some(oldest) = book.iter().min_by_key(|(_, e)| **e).map(|(k, _)| *k) else {
                break;
            };
            book.remove(&oldest);
            self.evicted.inc();
        }
        book.insert(digest(&secret), now + SESSION_TTL);
        self.created.inc();
        HeaderValue::from_str(&format!(
            "{COOKIE}={secret}; HttpOnly; SameSite=Strict; Path=/api/; Max-Age={}",
            SESSION_TTL.as_secs()
        ))
        .map_err(std::io::Error::other)
    }

    /// The request carries a live session.
    pub fn valid(&self, headers: &HeaderMap, now: Instant) -> bool {
        let Some(secret) = cookie(headers) else {
            return false;
        };
        let book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        book.get(&digest(secret)).is_some_and(|e| *e > now)
    }

    /// Ends the request's session; `true` when there was one.
    pub fn end(&self, headers: &HeaderMap) -> bool {
        let Some(secret) = cookie(headers) else {
            return false;
        };
        let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        book.remove(&digest(secret)).is_some()
    }

    /// Live sessions now.
    pub fn len(&self) -> usize {
        self.book.lock().map(|b| b.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The `Set-Cookie` value that removes the cookie.
pub fn cleared() -> HeaderValue {
    HeaderValue::from_static("dfwatch_session=; HttpOnly; SameSite=Strict; Path=/api/; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(set_cookie: &HeaderValue) -> HeaderMap {
        let pair = set_cookie.to_str().unwrap().split(';').next().unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("theme=dark; {pair}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn a_session_reads_until_it_expires_or_ends() {
        let s = Sessions::default();
        let t = Instant::now();
        let set = s.create(t).unwrap();
        let text = set.to_str().unwrap();
        assert!(
            text.contains("HttpOnly") && text.contains("SameSite=Strict"),
            "{text}"
        );
        let h = with_cookie(&set);
        assert!(s.valid(&h, t));
        assert!(s.valid(&h, t + SESSION_TTL - Duration::from_secs(1)));
        assert!(!s.valid(&h, t + SESSION_TTL));
        // A made-up or altered secret is no session.
        let mut forged = HeaderMap::new();
        forged.insert(
            header::COOKIE,
            format!("{COOKIE}={}", "a".repeat(64)).parse().unwrap(),
        );
        assert!(!s.valid(&forged, t));
        assert!(!s.valid(&HeaderMap::new(), t));
        assert!(s.end(&h));
        assert!(!s.valid(&h, t));
        assert!(!s.end(&h));
    }

    #[test]
    fn the_book_is_bounded_and_the_oldest_goes_first() {
        let s = Sessions::default();
        let t = Instant::now();
        let first = with_cookie(&s.create(t).unwrap());
        for i in 1..MAX_SESSIONS {
            s.create(t + Duration::from_millis(i as u64)).unwrap();
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(s.valid(&first, t));
        let newest = with_cookie(&s.create(t + Duration::from_secs(1)).unwrap());
        assert_eq!(s.len(), MAX_SESSIONS);
        assert_eq!(s.evicted.get(), 1);
        assert!(!s.valid(&first, t));
        assert!(s.valid(&newest, t));
    }
}
