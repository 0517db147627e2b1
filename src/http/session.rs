//! Browser sessions for reads. A browser's `EventSource` and `<img>` cannot send an
//! `Authorization` header, so a page exchanges the bearer token once (`POST /api/session`,
//! bearer required) for two secrets that only together make a session:
//!
//! - a cookie, `dfwatch_session_<port>` (the listen port in its name, so two daemons on one
//!   host never share one), `HttpOnly` (scripts cannot read it), `SameSite=Strict` (other
//!   sites' pages cannot send it), `Path=/api/`;
//! - a tab secret, in the answer's body, kept in the page's memory and sent with each read
//!   as `X-Dfwatch-Tab`, or as the `tab` query parameter where no header can go (the SSE
//!   stream, evidence images).
//!
//! Cookies are not isolated by port: any program serving another port of this host sees
//! the cookie when the browser visits it, and can plant one of the same name. Neither is
//! enough here: the tab secret stays in this origin's page (the same-origin policy keeps it
//! from pages on other ports), every cookie of the name is checked against it, and a session
//! lives [`SESSION_TTL`] (the page renews it while it holds the token). The cookie and the
//! tab authorise reads only (`GET`/`HEAD`: streams, alerts, events, media, the SSE stream);
//! every change still needs the bearer token. Sessions live in memory: a restart ends them.
//! `DELETE /api/session` (cookie and tab) ends one.
//!
//! A browser keeps one cookie per name, so every tab of it, and every renewal, signs in under
//! the cookie it already has with a tab secret of its own ([`MAX_TABS`] per session): a
//! second tab never signs the first out.
//!
//! Bound: [`MAX_SESSIONS`] at once; the oldest goes first (counted).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, header};
use sha2::{Digest, Sha256};

use crate::metrics::Counter;

/// The cookie's name, before the listen port.
pub const COOKIE_PREFIX: &str = "dfwatch_session_";
/// The request header carrying the tab secret.
pub const TAB_HEADER: &str = "x-dfwatch-tab";
/// The query parameter carrying it where no header can go.
pub const TAB_QUERY: &str = "tab";
/// How long a session is valid (the page renews it at half that while it has the token).
pub const SESSION_TTL: Duration = Duration::from_secs(3600);
/// Sessions (browsers) kept at once.
pub const MAX_SESSIONS: usize = 256;
/// Tab secrets one session holds at once (tabs, and renewals before the old one expired);
/// past it the oldest goes.
pub const MAX_TABS: usize = 16;

/// One browser's session: its cookie's tabs (each tab of the browser, and each renewal,
/// signs in with a tab secret of its own under the one cookie the browser keeps).
#[derive(Debug, Clone, Default)]
struct Entry {
    /// Tab secrets' digests and when each expires, oldest first; at most [`MAX_TABS`].
    tabs: std::collections::VecDeque<([u8; 32], Instant)>,
}

impl Entry {
    fn expires(&self) -> Option<Instant> {
        self.tabs.iter().map(|(_, e)| *e).max()
    }
}

/// The live sessions, by the SHA-256 of their cookie secret (no secret itself is kept).
#[derive(Debug)]
pub struct Sessions {
    cookie: String,
    book: Mutex<HashMap<[u8; 32], Entry>>,
    /// Sessions created.
    pub created: Counter,
    /// Sessions ended early because the book was full.
    pub evicted: Counter,
}

/// A new session: the `Set-Cookie` value and the tab secret for the page.
#[derive(Debug)]
pub struct NewSession {
    pub set_cookie: HeaderValue,
    pub tab: String,
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 32 random bytes from the kernel, as 64 hex digits.
fn secret() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn well_formed(v: &str) -> bool {
    v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The tab secret of a request: its header, else its `tab` query parameter.
fn tab<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
    headers
        .get(TAB_HEADER)
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            query?
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == TAB_QUERY)
                .map(|(_, v)| v)
        })
        .map(str::trim)
        .filter(|v| well_formed(v))
}

impl Sessions {
    /// The sessions of the listener on `port`.
    pub fn new(port: u16) -> Sessions {
        Sessions {
            cookie: format!("{COOKIE_PREFIX}{port}"),
            book: Mutex::new(HashMap::new()),
            created: Counter::default(),
            evicted: Counter::default(),
        }
    }

    /// Every well-formed value of this listener's cookie in the request (a planted one may
    /// stand beside the real one: each is tried).
    fn cookies<'a>(&'a self, headers: &'a HeaderMap) -> impl Iterator<Item = &'a str> + 'a {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .filter(|(k, _)| *k == self.cookie)
            .map(|(_, v)| v.trim())
            .filter(|v| well_formed(v))
    }

    /// A session for the request at `now`: a new tab secret under the browser's cookie when
    /// the request carries a live one of ours (another tab signing in, or a renewal: the
    /// browser keeps one cookie per port, so a new cookie would sign every other tab out),
    /// else a new cookie and tab.
    pub fn create(&self, headers: &HeaderMap, now: Instant) -> std::io::Result<NewSession> {
        let tab = secret()?;
        let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        for e in book.values_mut() {
            e.tabs.retain(|(_, exp)| *exp > now);
        }
        book.retain(|_, e| !e.tabs.is_empty());
        let live = self
            .cookies(headers)
            .find(|c| book.contains_key(&digest(c)))
            .map(str::to_string);
        let cookie = match live {
            Some(c) => c,
            None => {
                while book.len() >= MAX_SESSIONS {
                    let Some(oldest) = book
                        .iter()
                        .min_by_key(|(_, e)| e.expires())
                        .map(|(k, _)| *k)
                    else {
                        break;
                    };
                    book.remove(&oldest);
                    self.evicted.inc();
                }
                secret()?
            }
        };
        let entry = book.entry(digest(&cookie)).or_default();
        if entry.tabs.len() >= MAX_TABS {
            entry.tabs.pop_front();
        }
        entry.tabs.push_back((digest(&tab), now + SESSION_TTL));
        self.created.inc();
        let set_cookie = HeaderValue::from_str(&format!(
            "{}={cookie}; HttpOnly; SameSite=Strict; Path=/api/; Max-Age={}",
            self.cookie,
            SESSION_TTL.as_secs()
        ))
        .map_err(std::io::Error::other)?;
        Ok(NewSession { set_cookie, tab })
    }

    /// The session (its cookie's key) and the tab the request proves: one of its cookies
    /// names a session that holds its tab secret, unexpired.
    fn find(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        now: Instant,
    ) -> Option<([u8; 32], [u8; 32])> {
        let tab = digest(tab(headers, query)?);
        let book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        self.cookies(headers).map(digest).find_map(|key| {
            book.get(&key)?
                .tabs
                .iter()
                .any(|(t, exp)| *exp > now && same(t, &tab))
                .then_some((key, tab))
        })
    }

    /// The request carries a live session (cookie and tab secret).
    pub fn valid(&self, headers: &HeaderMap, query: Option<&str>, now: Instant) -> bool {
        self.find(headers, query, now).is_some()
    }

    /// Ends the request's tab; `None` when it had none, else whether the browser's whole
    /// session ended with it (its last tab: then its cookie may be cleared).
    pub fn end(&self, headers: &HeaderMap, query: Option<&str>, now: Instant) -> Option<bool> {
        let (key, tab) = self.find(headers, query, now)?;
        let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        let entry = book.get_mut(&key)?;
        entry.tabs.retain(|(t, _)| !same(t, &tab));
        let last = entry.tabs.is_empty();
        if last {
            book.remove(&key);
        }
        Some(last)
    }

    /// The `Set-Cookie` value that removes the cookie.
    pub fn cleared(&self) -> HeaderValue {
        HeaderValue::from_str(&format!(
            "{}=; HttpOnly; SameSite=Strict; Path=/api/; Max-Age=0",
            self.cookie
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("dfwatch_session=; Max-Age=0"))
    }

    /// Live sessions now.
    pub fn len(&self) -> usize {
        self.book.lock().map(|b| b.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request with the session's cookie (among others) and its tab header.
    fn with(s: &NewSession, tab: bool) -> HeaderMap {
        let pair = s.set_cookie.to_str().unwrap().split(';').next().unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("theme=dark; {pair}").parse().unwrap(),
        );
        if tab {
            h.insert(TAB_HEADER, s.tab.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_session_needs_its_cookie_and_its_tab_until_it_expires_or_ends() {
        let s = Sessions::new(8787);
        let t = Instant::now();
        let new = s.create(&HeaderMap::new(), t).unwrap();
        let text = new.set_cookie.to_str().unwrap();
        assert!(text.starts_with("dfwatch_session_8787="), "{text}");
        assert!(
            text.contains("HttpOnly") && text.contains("SameSite=Strict"),
            "{text}"
        );
        let h = with(&new, true);
        assert!(s.valid(&h, None, t));
        assert!(s.valid(&h, None, t + SESSION_TTL - Duration::from_secs(1)));
        assert!(!s.valid(&h, None, t + SESSION_TTL));
        // The cookie alone (what another port of this host can collect) reads nothing.
        let cookie_only = with(&new, false);
        assert!(!s.valid(&cookie_only, None, t));
        // Where no header can go, the tab comes as a query parameter.
        let q = format!("s=3&tab={}", new.tab);
        assert!(s.valid(&cookie_only, Some(&q), t));
        assert!(!s.valid(&cookie_only, Some("tab=nope"), t));
        // A made-up cookie, or another browser's tab, is no session.
        let other = s.create(&HeaderMap::new(), t).unwrap();
        let mut mixed = with(&new, false);
        mixed.insert(TAB_HEADER, other.tab.parse().unwrap());
        assert!(!s.valid(&mixed, None, t));
        let mut forged = HeaderMap::new();
        forged.insert(
            header::COOKIE,
            format!("dfwatch_session_8787={}", "a".repeat(64))
                .parse()
                .unwrap(),
        );
        forged.insert(TAB_HEADER, new.tab.parse().unwrap());
        assert!(!s.valid(&forged, None, t));
        assert!(!s.valid(&HeaderMap::new(), None, t));
        // Another port's daemon names its cookie apart.
        assert!(!Sessions::new(8788).valid(&h, None, t));
        assert_eq!(s.end(&h, None, t), Some(true), "its last tab");
        assert!(!s.valid(&h, None, t));
        assert_eq!(s.end(&h, None, t), None);
    }

    /// A second tab signing in, or a tab renewing its session, keeps the browser's one
    /// cookie: every other tab goes on reading.
    #[test]
    fn tabs_and_renewals_share_the_browsers_cookie_and_sign_no_one_out() {
        let s = Sessions::new(8787);
        let t = Instant::now();
        let first = s.create(&HeaderMap::new(), t).unwrap();
        let tab_a = with(&first, true);
        // Tab B signs in with the browser's cookie: the same cookie comes back.
        let second = s
            .create(&with(&first, false), t + Duration::from_secs(5))
            .unwrap();
        assert_eq!(
            second.set_cookie.to_str().unwrap().split(';').next(),
            first.set_cookie.to_str().unwrap().split(';').next()
        );
        assert_ne!(second.tab, first.tab);
        let tab_b = with(&second, true);
        assert!(s.valid(&tab_a, None, t + Duration::from_secs(6)));
        assert!(s.valid(&tab_b, None, t + Duration::from_secs(6)));
        assert_eq!(s.len(), 1, "one browser, one session");
        // A renewal of tab A before it expires: a fresh tab secret, tab B untouched.
        let renewed = s.create(&tab_a, t + SESSION_TTL / 2).unwrap();
        let tab_a2 = with(&renewed, true);
        assert!(s.valid(&tab_a2, None, t + SESSION_TTL + Duration::from_secs(1)));
        assert!(!s.valid(&tab_a, None, t + SESSION_TTL + Duration::from_secs(1)));
        // Signing tab B out leaves the others.
        assert_eq!(s.end(&tab_b, None, t + Duration::from_secs(7)), Some(false));
        assert!(s.valid(&tab_a2, None, t + Duration::from_secs(7)));
        // A session holds at most MAX_TABS tab secrets.
        for i in 0..MAX_TABS + 3 {
            s.create(&tab_a2, t + Duration::from_secs(8 + i as u64))
                .unwrap();
        }
        assert!(
            !s.valid(&tab_a2, None, t + Duration::from_secs(60)),
            "the oldest went"
        );
    }

    #[test]
    fn a_planted_cookie_of_the_same_name_does_not_hide_the_real_one() {
        let s = Sessions::new(8787);
        let t = Instant::now();
        let new = s.create(&HeaderMap::new(), t).unwrap();
        let pair = new.set_cookie.to_str().unwrap().split(';').next().unwrap();
        let mut h = HeaderMap::new();
        // Another port's page set a cookie of this name first (cookie tossing).
        h.insert(
            header::COOKIE,
            format!("dfwatch_session_8787={}; {pair}", "b".repeat(64))
                .parse()
                .unwrap(),
        );
        h.insert(TAB_HEADER, new.tab.parse().unwrap());
        assert!(s.valid(&h, None, t));
    }

    #[test]
    fn the_book_is_bounded_and_the_oldest_goes_first() {
        let s = Sessions::new(8787);
        let t = Instant::now();
        let first = with(&s.create(&HeaderMap::new(), t).unwrap(), true);
        for i in 1..MAX_SESSIONS {
            s.create(&HeaderMap::new(), t + Duration::from_millis(i as u64))
                .unwrap();
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(s.valid(&first, None, t));
        let newest = with(
            &s.create(&HeaderMap::new(), t + Duration::from_secs(1))
                .unwrap(),
            true,
        );
        assert_eq!(s.len(), MAX_SESSIONS);
        assert_eq!(s.evicted.get(), 1);
        assert!(!s.valid(&first, None, t));
        assert!(s.valid(&newest, None, t));
    }
}
