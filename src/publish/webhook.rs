//! Webhooks (`[[webhooks]]`): every alert event POSTed as JSON to an HTTP(S) endpoint, through
//! the same durable spool and outbox as MQTT ([`crate::publish::outbox`]: each webhook is a
//! sink with its own acknowledgements, recorded in the spool, and its own cap), so a dead
//! webhook never holds MQTT back and a restart resends only what the webhook had not taken.
//!
//! Delivery is at least once, oldest first, one request at a time per webhook. Each request
//! carries `Idempotency-Key: <alert_id>:<kind>:<seq>` (the spool's sequence number: the same
//! for every retry and across restarts, distinct for distinct events), so a receiver drops
//! duplicates. A 2xx answer is a delivery; an answer about the event itself (400, 409, 413,
//! 415, 422) refuses it for good (counted and logged); anything else (a network error, a
//! timeout, a 5xx, 401/403/404 from a rotated token or a moved receiver, a redirect: never
//! followed) is retried after a backoff with full jitter, for at most `give_up_after` per
//! event, so one event the receiver keeps failing on cannot block the ones behind it forever. The bearer token (from an environment variable or a file) and the
//! URL's path and query (webhook URLs often hold secrets) never appear in logs or metrics: a
//! webhook is named by its `name` and host.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backoff::{Backoff, BackoffConfig};
use crate::types::AlertChange;
use crate::types::check_id;
use crate::validation::{Checker, ConfigError};

/// `timeout`: 100 ms to 1 min.
pub const TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(60);
/// `max_owed`.
pub const MAX_OWED_RANGE: std::ops::RangeInclusive<u64> = 1..=1_000_000;
/// Webhooks at most.
pub const MAX_WEBHOOKS: usize = 16;

/// Why a webhook cannot be prepared (its token, CA file or URL): named by its config key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct WebhookError {
    pub field: String,
    pub reason: String,
}

/// One `[[webhooks]]` entry.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `[A-Za-z0-9_-]{1,64}`: names it in logs, metrics and the spool.
    pub name: String,
    /// `http://` or `https://`; no credentials in it.
    pub url: String,
    /// Environment variable holding a bearer token (`Authorization: Bearer ...`).
    #[serde(default)]
    pub bearer_env: Option<String>,
    /// File holding a bearer token (relative to the config file).
    #[serde(default)]
    pub bearer_file: Option<PathBuf>,
    /// PEM CA certificate(s) for `https://` beyond the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// One request's limit, connect to answer. Range 100ms to 1m.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Which alert events it gets: any of `new`, `update`, `end`.
    #[serde(default = "default_events")]
    pub events: Vec<String>,
    /// Events it may owe at once; past it the oldest are given up (counted). 1 to 1000000,
    /// and below `mqtt.spool_max_pending` (the spool holds them for it).
    #[serde(default = "default_max_owed")]
    pub max_owed: usize,
    /// Retry timing.
    #[serde(default = "default_backoff")]
    pub backoff: BackoffConfig,
    /// How long one event is retried before it is given up (counted). Range 1m to 30d.
    #[serde(default = "default_give_up_after", with = "humantime_serde")]
    pub give_up_after: Duration,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL's path and query often hold a secret: only scheme, host and port.
        let url = WebhookUrl::parse(&self.url)
            .map(|u| u.shown())
            .unwrap_or_else(|_| "(invalid)".into());
        f.debug_struct("WebhookConfig")
            .field("name", &self.name)
            .field("url", &url)
            .field("events", &self.events)
            .field("timeout", &self.timeout)
            .field("max_owed", &self.max_owed)
            .field("give_up_after", &self.give_up_after)
            .finish_non_exhaustive()
    }
}

/// `give_up_after`: 1 min to 30 days.
pub const GIVE_UP_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(60)..=Duration::from_secs(30 * 86_400);

fn default_give_up_after() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_events() -> Vec<String> {
    vec!["new".into(), "update".into(), "end".into()]
}

fn default_max_owed() -> usize {
    1_000
}

fn default_backoff() -> BackoffConfig {
    BackoffConfig {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(60),
        reset_after: Duration::from_secs(60),
    }
}

/// A webhook URL, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    pub tls: bool,
    /// To connect to and name in TLS (IPv6 without brackets).
    pub host: String,
    /// As the `Host` header and logs write it (IPv6 in brackets).
    pub host_header: String,
    pub port: u16,
    /// Path and query, as sent in the request line.
    pub target: String,
}

impl WebhookUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let u = url::Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
        let tls = match u.scheme() {
            "http" => false,
            "https" => true,
            other => return Err(format!("scheme {other:?}; use http:// or https://")),
        };
        if !u.username().is_empty() || u.password().is_some() {
            return Err("credentials in the URL are refused; use bearer_env or bearer_file".into());
        }
        if u.fragment().is_some() {
            return Err("a fragment (#...) is never sent; remove it".into());
        }
        let host_header = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("no host")?
            .to_string();
        let host = host_header.trim_matches(['[', ']']).to_string();
        if tls && rustls::pki_types::ServerName::try_from(host.clone()).is_err() {
            return Err(format!("{host:?} is not a name TLS can verify"));
        }
        let mut target = u.path().to_string();
        if let Some(q) = u.query() {
            target.push('?');
            target.push_str(q);
        }
        if target.parse::<hyper::Uri>().is_err() {
            return Err("its path and query do not make a request target".into());
        }
        Ok(WebhookUrl {
            tls,
            port: u.port().unwrap_or(if tls { 443 } else { 80 }),
            host,
            host_header,
            target,
        })
    }

    /// What logs may show: scheme, host and port, never the path or query.
    pub fn shown(&self) -> String {
        format!(
            "{}://{}:{}",
            if self.tls { "https" } else { "http" },
            self.host_header,
            self.port
        )
    }
}

impl WebhookConfig {
    /// Every rule of one entry (`path` is e.g. `webhooks[0]`).
    pub fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        let mut c = Checker::new(path, errors);
        if let Err(e) = check_id(&self.name) {
            c.error("name", format!("{:?} {e}", self.name));
        }
        let url = WebhookUrl::parse(&self.url);
        match &url {
            Err(e) => c.error("url", e.clone()),
            Ok(u) if !u.tls && self.ca_file.is_some() => c.error(
                "ca_file",
                "set for an http:// URL: the connection would not be encrypted; use https://",
            ),
            Ok(_) => {}
        }
        if self.bearer_env.is_some() && self.bearer_file.is_some() {
            c.error("", "set one of bearer_env and bearer_file, not both");
        }
        c.env_name("bearer_env", self.bearer_env.as_deref());
        c.duration("timeout", self.timeout, TIMEOUT_RANGE);
        c.count("max_owed", self.max_owed as u64, MAX_OWED_RANGE);
        c.duration("give_up_after", self.give_up_after, GIVE_UP_RANGE);
        let known = ["new", "update", "end"];
        if self.events.is_empty() {
            c.error("events", "empty: list any of \"new\", \"update\", \"end\"");
        }
        for (i, e) in self.events.iter().enumerate() {
            if !known.contains(&e.as_str()) {
                c.error(
                    &format!("events[{i}]"),
                    format!("{e:?} is not an event; use \"new\", \"update\" or \"end\""),
                );
            } else if self.events[..i].contains(e) {
                c.error(&format!("events[{i}]"), format!("{e:?} is listed twice"));
            }
        }
        self.backoff.validate(&mut c.table("backoff"));
    }

    /// Whether this webhook takes events of `kind`.
    pub fn wants(&self, kind: AlertChange) -> bool {
        self.events.iter().any(|e| e == kind.as_str())
    }
}

/// What one request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer.
    Delivered,
    /// Worth trying again (network error, timeout, 408, 425, 429, 5xx).
    Retry(String),
    /// Refused for good (another answer): the event is given up.
    Refused(String),
}

/// Counters of one webhook.
#[derive(Debug, Default)]
pub struct WebhookCounters {
    pub delivered: AtomicU64,
    /// Attempts that failed and were retried.
    pub retried: AtomicU64,
    /// Events the receiver refused for good.
    pub refused: AtomicU64,
}

/// One webhook ready to deliver: its URL, TLS, token and counters.
pub struct Webhook {
    pub cfg: WebhookConfig,
    pub url: WebhookUrl,
    tls: Option<tokio_rustls::TlsConnector>,
    bearer: Option<String>,
    pub counters: Arc<WebhookCounters>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token or the URL's path.
        f.debug_struct("Webhook")
            .field("name", &self.cfg.name)
            .field("url", &self.url.shown())
            .finish()
    }
}

impl Webhook {
    /// Resolves the token and TLS roots (relative files against `base_dir`). Fails on what
    /// the daemon cannot start with: a missing variable, an unreadable file, a bad CA.
    pub fn prepare(cfg: &WebhookConfig, base_dir: &Path) -> Result<Webhook, WebhookError> {
        let field = |f: &str| format!("webhooks.{}.{f}", cfg.name);
        let url = WebhookUrl::parse(&cfg.url).map_err(|e| WebhookError {
            field: field("url"),
            reason: e,
        })?;
        let bearer = match (&cfg.bearer_env, &cfg.bearer_file) {
            (Some(var), _) => Some(std::env::var(var).map_err(|_| WebhookError {
                field: field("bearer_env"),
                reason: format!("environment variable {var} is not set"),
            })?),
            (None, Some(p)) => {
                let p = crate::files::resolve(base_dir, p);
                Some(
                    crate::files::read_secret_file(&p).map_err(|e| WebhookError {
                        field: field("bearer_file"),
                        reason: format!("cannot read {}: {e}", p.display()),
                    })?,
                )
            }
            (None, None) => None,
        };
        if let Some(b) = &bearer
            && (b.is_empty()
                || hyper::header::HeaderValue::from_str(&format!("Bearer {b}")).is_err())
        {
            return Err(WebhookError {
                field: field(if cfg.bearer_env.is_some() {
                    "bearer_env"
                } else {
                    "bearer_file"
                }),
                reason: "the token is empty or holds a line break or another control character"
                    .into(),
            });
        }
        if bearer.is_some() && !url.tls && !is_loopback(&url.host) {
            tracing::warn!(webhook = %cfg.name, to = %url.shown(), "Webhook: a bearer token goes over plain http:// to a host that is not this machine; use https://.");
        }
        let tls = if url.tls {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() && cfg.ca_file.is_none() {
                return Err(WebhookError {
                    field: field("url"),
                    reason: "https:// needs CA certificates: the system has none (install \
                             ca-certificates) and no ca_file is set"
                        .into(),
                });
            }
            if let Some(p) = &cfg.ca_file {
                let p = crate::files::resolve(base_dir, p);
                let pem = crate::files::read_capped(&p, 1 << 20, crate::files::Links::Follow)
                    .map_err(|e| WebhookError {
                        field: field("ca_file"),
                        reason: format!("cannot read {}: {e}", p.display()),
                    })?;
                let mut added = 0;
                use rustls::pki_types::pem::PemObject;
                for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| WebhookError {
                        field: field("ca_file"),
                        reason: format!("{}: {e}", p.display()),
                    })?;
                    roots.add(cert).map_err(|e| WebhookError {
                        field: field("ca_file"),
                        reason: format!("{}: {e}", p.display()),
                    })?;
                    added += 1;
                }
                if added == 0 {
                    return Err(WebhookError {
                        field: field("ca_file"),
                        reason: format!("{}: no PEM certificate in it", p.display()),
                    });
                }
            }
            let config = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        Ok(Webhook {
            cfg: cfg.clone(),
            url,
            tls,
            bearer,
            counters: Arc::default(),
        })
    }

    /// One POST of `body`, within the webhook's timeout.
    pub async fn post(&self, key: &str, event: &str, body: &[u8]) -> Outcome {
        match tokio::time::timeout(self.cfg.timeout, self.post_inner(key, event, body)).await {
            Ok(o) => o,
            Err(_) => Outcome::Retry(format!("no answer within {:?}", self.cfg.timeout)),
        }
    }

    async fn post_inner(&self, key: &str, event: &str, body: &[u8]) -> Outcome {
        let tcp =
            match tokio::net::TcpStream::connect((self.url.host.as_str(), self.url.port)).await {
                Ok(t) => t,
                Err(e) => return Outcome::Retry(format!("connect: {e}")),
            };
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some(tls) => {
                let name = match rustls::pki_types::ServerName::try_from(self.url.host.clone()) {
                    Ok(n) => n,
                    Err(e) => return Outcome::Refused(format!("host name: {e}")),
                };
                match tls.connect(name, tcp).await {
                    Ok(s) => self.exchange(s, key, event, body).await,
                    Err(e) => Outcome::Retry(format!("TLS: {e}")),
                }
            }
            None => self.exchange(tcp, key, event, body).await,
        }
    }

    async fn exchange<S>(&self, io: S, key: &str, event: &str, body: &[u8]) -> Outcome
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await {
                Ok(x) => x,
                Err(e) => return Outcome::Retry(format!("HTTP: {e}")),
            };
        // Drives the connection until the answer's head is in; dropped with this call.
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let host =
            if (self.url.tls && self.url.port == 443) || (!self.url.tls && self.url.port == 80) {
                self.url.host_header.clone()
            } else {
                format!("{}:{}", self.url.host_header, self.url.port)
            };
        let mut req = hyper::Request::post(self.url.target.as_str())
            .header(hyper::header::HOST, host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("dfwatch/", env!("CARGO_PKG_VERSION")),
            )
            .header("Idempotency-Key", key)
            .header("X-Dfwatch-Event", event);
        if let Some(b) = &self.bearer {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {b}"));
        }
        let req = match req.body(http_body_util::Full::new(bytes::Bytes::copy_from_slice(
            body,
        ))) {
            Ok(r) => r,
            Err(e) => {
                driver.abort();
                return Outcome::Refused(format!("request: {e}"));
            }
        };
        let answer = sender.send_request(req).await;
        driver.abort();
        match answer {
            Ok(resp) => classify(resp.status().as_u16()),
            Err(e) => Outcome::Retry(format!("HTTP: {e}")),
        }
    }
}

/// Whether `host` is this machine (a bearer token over plain HTTP stays on it).
fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// What an HTTP status means for the event. Only answers about the event itself refuse it
/// (400, 409, 413, 415, 422); anything that would refuse every event (401, 403, 404, a
/// redirect, ...) means the webhook is down for now and is retried, so a rotated token or a
/// moved receiver never throws the backlog away.
pub fn classify(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Delivered,
        400 | 409 | 413 | 415 | 422 => Outcome::Refused(format!("HTTP {status}")),
        300..=399 => Outcome::Retry(format!("HTTP {status} (redirects are not followed)")),
        _ => Outcome::Retry(format!("HTTP {status}")),
    }
}

/// One event for a webhook's worker.
#[derive(Debug)]
pub struct Delivery {
    pub seq: u64,
    pub alert_id: String,
    pub kind: AlertChange,
    pub payload: Vec<u8>,
}

impl Delivery {
    /// `<alert_id>:<kind>:<seq>`: the same for every attempt of this event.
    pub fn key(&self) -> String {
        format!("{}:{}:{}", self.alert_id, self.kind.as_str(), self.seq)
    }
}

/// A webhook's worker: takes one delivery at a time and tries it until the receiver takes or
/// refuses it (retries after the backoff), then reports `(sink, seq, outcome)`.
///
/// `floor` is the oldest event the webhook still owes (the publisher moves it up when its cap
/// or the spool gives events up): a delivery below it is abandoned rather than retried on.
pub async fn worker(
    hook: Arc<Webhook>,
    sink: usize,
    mut deliveries: tokio::sync::mpsc::Receiver<Delivery>,
    results: tokio::sync::mpsc::Sender<(usize, u64, Outcome)>,
    floor: Arc<AtomicU64>,
) {
    let mut backoff = Backoff::new(hook.cfg.backoff);
    let mut rng = fastrand::Rng::new();
    let mut last_failure: Option<String> = None;
    while let Some(d) = deliveries.recv().await {
        let key = d.key();
        let event = d.kind.as_str();
        let first_try = std::time::Instant::now();
        let outcome = loop {
            match hook.post(&key, event, &d.payload).await {
                Outcome::Retry(why) if first_try.elapsed() >= hook.cfg.give_up_after => {
                    break Outcome::Refused(format!(
                        "still failing after {} ({why}); given up",
                        humantime::format_duration(hook.cfg.give_up_after)
                    ));
                }
                Outcome::Retry(_) if d.seq < floor.load(Ordering::Relaxed) => {
                    break Outcome::Retry("given up by the webhook's cap or the spool".into());
                }
                Outcome::Retry(why) => {
                    hook.counters.retried.fetch_add(1, Ordering::Relaxed);
                    let wait = backoff.on_failure(std::time::Instant::now(), rng.f64());
                    if last_failure.as_deref() != Some(why.as_str()) {
                        tracing::warn!(webhook = %hook.cfg.name, to = %hook.url.shown(), error = %why, retry_in_ms = wait.as_millis() as u64, "Webhook delivery failed; retrying with backoff.");
                        last_failure = Some(why);
                    }
                    tokio::time::sleep(wait).await;
                }
                other => break other,
            }
        };
        match &outcome {
            Outcome::Delivered => {
                hook.counters.delivered.fetch_add(1, Ordering::Relaxed);
                backoff.on_up(std::time::Instant::now());
                if last_failure.take().is_some() {
                    tracing::info!(webhook = %hook.cfg.name, "Webhook delivering again.");
                }
            }
            Outcome::Refused(why) => {
                hook.counters.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(webhook = %hook.cfg.name, to = %hook.url.shown(), alert_id = %d.alert_id, event, error = %why, "Webhook refused an event; it is given up.");
            }
            Outcome::Retry(_) => {}
        }
        if results.send((sink, d.seq, outcome)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
