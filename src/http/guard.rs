//! Who may call what. The bearer token is checked in a middleware, before any request body is
//! read (the `bearer` scheme case-insensitively, the token in constant time); a client that
//! keeps failing is refused for a while without its token being looked at; every change made
//! through the API leaves an audit line with the caller's address.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::config::Cidr;
use crate::ingest::CredentialsConfig;
use crate::metrics::Counter;

/// What API callers may do, resolved from `[http]` at start.
#[derive(Debug, Clone)]
pub struct ApiPolicy {
    /// Bearer token of every call that needs one.
    pub token: String,
    /// URI schemes of streams added through the API (their child sources included).
    pub schemes: Vec<String>,
    /// Credential sets a caller may name.
    pub credentials: BTreeMap<String, CredentialsConfig>,
    /// Runtime-only streams at once.
    pub max_streams: usize,
    /// GET /api/streams and /api/alerts need the token too.
    pub reads_need_token: bool,
    /// Only `Host: <IP address>` or `localhost` is served ([`super::HttpConfig::loopback_hosts_only`]).
    pub loopback_hosts_only: bool,
    /// Proxies whose `X-Forwarded-For` names the client (`http.trusted_proxies`).
    pub trusted_proxies: Vec<Cidr>,
}

/// Who a request is from: the peer, or, when the peer is a trusted proxy, the last address
/// of `X-Forwarded-For` that is not a trusted proxy itself (each proxy appends the address
/// it heard from, so the right end is the one the nearest trusted proxy wrote). A header
/// that does not parse, or names only trusted proxies, leaves the peer.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.parse::<IpAddr>() else {
            return peer;
        };
        if !is_trusted(ip) {
            return ip;
        }
    }
    peer
}

/// Failed attempts before a client is throttled ...
pub const FAILURES_BEFORE_THROTTLE: u32 = 5;
/// ... within this window, and how long it then waits.
pub const THROTTLE_WINDOW: Duration = Duration::from_secs(60);
/// Clients whose failures are remembered at once.
pub const MAX_CLIENTS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    first: Instant,
    last: Instant,
}

/// The failed-attempt book and its counters.
#[derive(Debug, Default)]
pub struct Guard {
    clients: Mutex<HashMap<IpAddr, Failures>>,
    /// Requests refused for a missing or wrong token.
    pub auth_failures: Counter,
    /// Requests refused because their client failed too often.
    pub throttled: Counter,
    /// Clients forgotten because the book was full (the bound's cost).
    pub forgotten: Counter,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Unauthorised,
    Throttled { retry_after: Duration },
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Unauthorised => (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(serde_json::json!({"error": "unauthorised", "detail": "send Authorization: Bearer <token> (see http.token_file or the state directory's api-token)"})),
            )
                .into_response(),
            Refusal::Throttled { retry_after } => (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, retry_after.as_secs().max(1).to_string())],
                Json(serde_json::json!({"error": "throttled", "detail": "too many failed attempts from this address"})),
            )
                .into_response(),
        }
    }
}

impl Guard {
    /// Checks `headers` against `token` for a request from `ip` at `now`. Only a credential
    /// that is present and wrong is a guess: a request with no `Authorization` at all (a
    /// page not signed in, a cross-origin form, a stranger's script) is refused without
    /// counting, so nobody can lock the operator out by sending nothing.
    pub fn check(
        &self,
        ip: IpAddr,
        headers: &HeaderMap,
        token: &str,
        now: Instant,
    ) -> Result<(), Refusal> {
        if !headers.contains_key(header::AUTHORIZATION) {
            return Err(Refusal::Unauthorised);
        }
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = clients.get(&ip) {
            let until = f.last + THROTTLE_WINDOW;
            if f.count >= FAILURES_BEFORE_THROTTLE && now < until {
                self.throttled.inc();
                return Err(Refusal::Throttled {
                    retry_after: until - now,
                });
            }
        }
        if authorised(headers, token) {
            clients.remove(&ip);
            return Ok(());
        }
        self.auth_failures.inc();
        if !clients.contains_key(&ip) && clients.len() >= MAX_CLIENTS {
            clients.retain(|_, f| now.saturating_duration_since(f.last) < THROTTLE_WINDOW);
            if clients.len() >= MAX_CLIENTS
                && let Some(oldest) = clients.iter().min_by_key(|(_, f)| f.last).map(|(k, _)| *k)
            {
                clients.remove(&oldest);
                self.forgotten.inc();
            }
        }
        let f = clients.entry(ip).or_insert(Failures {
            count: 0,
            first: now,
            last: now,
        });
        if now.saturating_duration_since(f.first) >= THROTTLE_WINDOW {
            *f = Failures {
                count: 0,
                first: now,
                last: now,
            };
        }
        f.count += 1;
        f.last = now;
        Err(Refusal::Unauthorised)
    }

    /// Clients in the book now.
    pub fn clients(&self) -> usize {
        self.clients.lock().map(|c| c.len()).unwrap_or(0)
    }
}

/// `Authorization: Bearer <token>`, the scheme in any case, the token compared in constant
/// time.
pub fn authorised(headers: &HeaderMap, token: &str) -> bool {
    let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, given)) = v.trim_start().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One audit line per change made through the API.
pub fn audit(caller: SocketAddr, action: &str, target: &str, outcome: &str) {
    tracing::info!(target: "dfwatch::audit", caller = %caller, action, target, outcome, "API change.");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    const TOKEN: &str = "secret-token-0123456789";

    #[test]
    fn bearer_tokens_must_match_exactly_in_any_scheme_case() {
        assert!(!authorised(&HeaderMap::new(), TOKEN));
        assert!(authorised(&bearer("Bearer secret-token-0123456789"), TOKEN));
        assert!(authorised(&bearer("bearer secret-token-0123456789"), TOKEN));
        assert!(authorised(&bearer("BEARER secret-token-0123456789"), TOKEN));
        assert!(!authorised(
            &bearer("Bearer secret-token-0123456788"),
            TOKEN
        ));
        assert!(!authorised(&bearer("Bearer secret-token-012345678"), TOKEN));
        assert!(!authorised(&bearer("Basic secret-token-0123456789"), TOKEN));
        assert!(!authorised(&bearer("Bearersecret-token-0123456789"), TOKEN));
    }

    #[test]
    fn a_client_that_keeps_failing_is_throttled_then_let_back() {
        let g = Guard::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let t = Instant::now();
        let wrong = bearer("Bearer nope");
        for i in 0..FAILURES_BEFORE_THROTTLE {
            let at = t + Duration::from_secs(i.into());
            assert_eq!(g.check(ip, &wrong, TOKEN, at), Err(Refusal::Unauthorised));
        }
        // Now even the right token is refused for a while, without being looked at.
        let right = bearer("Bearer secret-token-0123456789");
        let at = t + Duration::from_secs(10);
        assert!(matches!(
            g.check(ip, &right, TOKEN, at),
            Err(Refusal::Throttled { .. })
        ));
        // Another client is not affected.
        assert_eq!(g.check(other, &right, TOKEN, at), Ok(()));
        // After the window from its last failure, it may try again.
        let later = t + Duration::from_secs(4) + THROTTLE_WINDOW;
        assert_eq!(g.check(ip, &right, TOKEN, later), Ok(()));
        assert_eq!(g.auth_failures.get(), 5);
        assert_eq!(g.throttled.get(), 1);
    }

    #[test]
    fn requests_without_a_credential_never_count_as_guesses() {
        let g = Guard::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let t = Instant::now();
        for _ in 0..100 {
            assert_eq!(
                g.check(ip, &HeaderMap::new(), TOKEN, t),
                Err(Refusal::Unauthorised)
            );
        }
        assert_eq!(g.clients(), 0);
        assert_eq!(g.auth_failures.get(), 0);
        let right = bearer("Bearer secret-token-0123456789");
        assert_eq!(g.check(ip, &right, TOKEN, t), Ok(()));
    }

    fn forwarded(v: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for x in v {
            h.append("x-forwarded-for", x.parse().unwrap());
        }
        h
    }

    #[test]
    fn forwarded_for_names_the_client_only_behind_a_trusted_proxy() {
        let cidr = |s: &str| Cidr::try_from(s.to_string()).unwrap();
        let trusted = [cidr("10.0.0.0/8"), cidr("::1")];
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // From a stranger, the header is anyone's words.
        let stranger = ip("192.0.2.9");
        assert_eq!(
            client_ip(stranger, &forwarded(&["198.51.100.1"]), &trusted),
            stranger
        );
        // Behind the proxy: the rightmost address that is not a trusted proxy.
        let h = forwarded(&["203.0.113.5, 198.51.100.1", "10.9.9.9"]);
        assert_eq!(client_ip(proxy, &h, &trusted), ip("198.51.100.1"));
        assert_eq!(
            client_ip(ip("::1"), &forwarded(&["2001:db8::7"]), &trusted),
            ip("2001:db8::7")
        );
        // Garbage, or nothing but proxies: the peer itself.
        assert_eq!(
            client_ip(proxy, &forwarded(&["198.51.100.1, not-an-ip"]), &trusted),
            proxy
        );
        assert_eq!(client_ip(proxy, &forwarded(&["10.0.0.1"]), &trusted), proxy);
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted), proxy);
        // Clients behind one proxy are throttled one by one, not as one address.
        let g = Guard::default();
        let t = Instant::now();
        let wrong = bearer("Bearer nope");
        let a = client_ip(proxy, &forwarded(&["198.51.100.1"]), &trusted);
        for _ in 0..FAILURES_BEFORE_THROTTLE + 1 {
            let _ = g.check(a, &wrong, TOKEN, t);
        }
        let b = client_ip(proxy, &forwarded(&["198.51.100.2"]), &trusted);
        let right = bearer("Bearer secret-token-0123456789");
        assert_eq!(g.check(b, &right, TOKEN, t), Ok(()));
        assert!(matches!(
            g.check(a, &right, TOKEN, t),
            Err(Refusal::Throttled { .. })
        ));
    }

    #[test]
    fn cidr_blocks_parse_and_contain() {
        let c = |s: &str| Cidr::try_from(s.to_string());
        let net = c("192.168.0.0/16").unwrap();
        assert!(net.contains("192.168.44.1".parse().unwrap()));
        assert!(!net.contains("192.169.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:192.168.1.1".parse().unwrap()));
        assert!(c("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!(c("::/0").unwrap().contains("2001:db8::1".parse().unwrap()));
        assert!(!c("::1").unwrap().contains("::2".parse().unwrap()));
        let mapped = c("::ffff:10.0.0.0/104").unwrap();
        assert!(mapped.contains("10.1.2.3".parse().unwrap()));
        assert!(mapped.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!mapped.contains("11.0.0.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "::/129", "example.com", "10.0.0.0/x", ""] {
            assert!(c(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_book_of_failing_clients_is_bounded() {
        let g = Guard::default();
        let t = Instant::now();
        let wrong = bearer("Bearer nope");
        for i in 0..(MAX_CLIENTS as u32 + 10) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let _ = g.check(ip, &wrong, TOKEN, t);
        }
        assert_eq!(g.clients(), MAX_CLIENTS);
        assert_eq!(g.forgotten.get(), 10);
    }
}
