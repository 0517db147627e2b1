//! The MQTT publisher: alerts from the spool to the broker, QoS 1, with a last will.
//!
//! One tokio task owns the spool, the rumqttc client and its event loop.
//!
//! - [`PublisherHandle::publish_alert`] hands a payload to the task, which records it in the
//!   spool and passes the encoded records to the spool's writer thread; the call returns when
//!   that thread has fsynced them, and only then is the alert handed to rumqttc. The task never
//!   blocks on the disk: alerts arriving during one fsync are written together by the next
//!   (group commit), and PUBACKs keep flowing meanwhile.
//! - PUBACK matching: rumqttc does not say which publish a PUBACK answers, only the packet id
//!   it gave each outgoing publish (`Outgoing::Publish(pkid)`, in the order the publishes were
//!   handed to it). The task keeps a FIFO of spool sequence numbers in hand-over order, maps
//!   each `Outgoing::Publish(pkid)` to the next one, and acks the spool entry on
//!   `PubAck(pkid)`. Packet ids are reused, so the map is by live pkid only.
//! - Connection loss: the client and event loop are dropped (with them rumqttc's own queue of
//!   in-flight messages, whose re-sends would not be in the FIFO), and after a backoff with
//!   full jitter a fresh client connects and every pending spool entry is sent again. An
//!   alert whose PUBACK was lost is therefore sent twice: delivery to the broker is at least
//!   once, and consumers deduplicate by `alert_id`.
//! - Node status `<prefix>/<node>/status` is retained: `online` on connect, last will
//!   `offline`, `stopped` on a clean stop.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::spool::{EntryKind, LogDone, Spool, SpoolLimits, SpoolStats};
use crate::backoff::{Backoff, BackoffConfig};
use crate::types::NodeId;
use crate::validation::{Checker, ConfigError, ConfigErrors};

/// `keep_alive`: MQTT counts it in whole seconds (rumqttc refuses less than 1 s).
pub const KEEP_ALIVE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);
/// `spool_max_pending`.
pub const MAX_PENDING_RANGE: std::ops::RangeInclusive<u64> = 1..=1_000_000;
/// `spool_max_bytes`: 1 MiB to 64 GiB.
pub const MAX_BYTES_RANGE: std::ops::RangeInclusive<u64> = (1 << 20)..=(64 << 30);
/// `spool_max_age`: 1 minute to a year.
pub const MAX_AGE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(60)..=Duration::from_secs(365 * 24 * 3600);

/// `[mqtt]`: where alerts go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port`; no credentials in it.
    pub url: String,
    /// Client id; default `dfwatch-<node>`.
    pub client_id: Option<String>,
    /// Topic prefix (first level).
    pub prefix: String,
    pub username: Option<String>,
    pub password_env: Option<String>,
    pub password_file: Option<PathBuf>,
    /// PEM CA certificate for `mqtts://`.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for brokers that require them.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Reconnect timing.
    pub backoff: BackoffConfig,
    /// Spool directory (relative to the config file); default `var/spool`.
    pub spool_dir: Option<PathBuf>,
    /// Pending alerts past which updates are coalesced.
    pub spool_max_pending: usize,
    /// Bytes the spool may hold while the broker is away; past it, updates are dropped
    /// first, then ended alerts, the `new` of open alerts last (counted by reason).
    pub spool_max_bytes: u64,
    /// Alerts older than this leave the spool unpublished (counted).
    #[serde(with = "humantime_serde")]
    pub spool_max_age: Duration,
    /// Run an in-process broker (rumqttd, in memory) on `embedded_listen` and publish to it
    /// instead of `url`: zero set-up for a first run; use a real broker in production.
    pub embedded: bool,
    /// Loopback address of the embedded broker.
    pub embedded_listen: std::net::SocketAddr,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: "mqtt://127.0.0.1:1883".into(),
            client_id: None,
            prefix: "dfwatch".into(),
            username: None,
            password_env: None,
            password_file: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            keep_alive: Duration::from_secs(15),
            backoff: BackoffConfig {
                base: Duration::from_millis(250),
                cap: Duration::from_secs(15),
                reset_after: Duration::from_secs(30),
            },
            spool_dir: None,
            spool_max_pending: 10_000,
            spool_max_bytes: 256 << 20,
            spool_max_age: Duration::from_secs(7 * 24 * 3600),
            embedded: false,
            embedded_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 1883)),
        }
    }
}

impl MqttConfig {
    /// Every rule of `[mqtt]`, including the TLS ones: the publisher runs the same checks
    /// at start ([`spawn`]), so what `validate` accepts it accepts.
    pub(crate) fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        let mut c = Checker::new(path, errors);
        let tls = match BrokerUrl::parse(&self.url) {
            Ok(u) => Some(u.tls),
            Err(e) => {
                let msg = e.to_string();
                c.error("url", msg.trim_start_matches("mqtt.url: "));
                None
            }
        };
        if self.prefix.is_empty() || self.prefix.len() > 256 || self.prefix.contains(['+', '#']) {
            c.error(
                "prefix",
                format!(
                    "{:?} is not a usable topic level (1 to 256 bytes, no + or #)",
                    self.prefix
                ),
            );
        }
        if let Some(id) = &self.client_id
            && (id.is_empty() || id.len() > 256 || id.contains('\0'))
        {
            c.error("client_id", "must be 1 to 256 bytes without NUL");
        }
        c.duration("keep_alive", self.keep_alive, KEEP_ALIVE_RANGE);
        c.count(
            "spool_max_pending",
            self.spool_max_pending as u64,
            MAX_PENDING_RANGE,
        );
        c.count("spool_max_bytes", self.spool_max_bytes, MAX_BYTES_RANGE);
        c.duration("spool_max_age", self.spool_max_age, MAX_AGE_RANGE);
        self.backoff.validate(&mut c.table("backoff"));
        if self.embedded && !self.embedded_listen.ip().is_loopback() {
            c.error(
                "embedded_listen",
                format!("{} is not a loopback address", self.embedded_listen),
            );
        }
        if self.password_env.is_some() && self.password_file.is_some() {
            c.error("", "set one of password_env and password_file, not both");
        }
        c.env_name("password_env", self.password_env.as_deref());
        // TLS: mqtts:// needs the CA; a client identity is a pair; TLS files on a plain
        // connection mean the operator believes it is encrypted when it is not.
        let identity = (&self.client_cert_file, &self.client_key_file);
        if tls == Some(true) && self.ca_file.is_none() {
            c.error(
                "ca_file",
                "mqtts:// needs mqtt.ca_file (the broker's CA certificate, PEM)",
            );
        }
        if matches!(identity, (Some(_), None) | (None, Some(_))) {
            c.error(
                if self.client_key_file.is_none() {
                    "client_key_file"
                } else {
                    "client_cert_file"
                },
                "set both mqtt.client_cert_file and mqtt.client_key_file, or neither",
            );
        }
        let tls_files = self.ca_file.is_some() || identity != (&None, &None);
        if tls == Some(false) && tls_files {
            c.error(
                "url",
                format!(
                    "{:?} is a plain connection but TLS files are set; use mqtts://",
                    self.url
                ),
            );
        }
    }

    /// The problems [`MqttConfig::validate`] finds, as one error.
    pub fn check(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        self.validate("mqtt", &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

/// Why the publisher could not start.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Config(ConfigErrors),
    #[error("mqtt.url: {0}")]
    Url(String),
    #[error("mqtt.{field}: cannot read {path}: {reason}")]
    File {
        field: &'static str,
        path: String,
        reason: String,
    },
    #[error("mqtt.password_env: environment variable {0} is not set")]
    MissingEnv(String),
    #[error("spool {path}: {reason}")]
    Spool { path: String, reason: String },
    #[error("the publisher has stopped")]
    Stopped,
}

/// A broker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl BrokerUrl {
    pub fn parse(s: &str) -> Result<Self, PublishError> {
        let u = url::Url::parse(s).map_err(|e| PublishError::Url(format!("{s:?}: {e}")))?;
        let tls = match u.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            other => {
                return Err(PublishError::Url(format!(
                    "unsupported scheme {other:?}; use mqtt:// or mqtts://"
                )));
            }
        };
        if !u.username().is_empty() || u.password().is_some() {
            return Err(PublishError::Url(
                "credentials in the URL are refused; use mqtt.username and mqtt.password_env \
                 or mqtt.password_file"
                    .into(),
            ));
        }
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| PublishError::Url(format!("{s:?} has no host")))?
            .trim_matches(['[', ']'])
            .to_string();
        Ok(BrokerUrl {
            tls,
            host,
            port: u.port().unwrap_or(if tls { 8883 } else { 1883 }),
        })
    }
}

fn read_file(field: &'static str, p: &Path) -> Result<Vec<u8>, PublishError> {
    std::fs::read(p).map_err(|e| PublishError::File {
        field,
        path: p.display().to_string(),
        reason: e.to_string(),
    })
}

/// QoS 1 publishes awaiting their PUBACK at once.
const MAX_IN_FLIGHT: usize = 200;

/// Topic of the node's retained status.
pub fn status_topic(prefix: &str, node: &NodeId) -> String {
    format!("{prefix}/{node}/status")
}

/// Topic of alerts.
pub fn alerts_topic(prefix: &str, node: &NodeId) -> String {
    format!("{prefix}/{node}/alerts")
}

/// Everything resolved at start, so the task itself cannot fail on configuration.
#[derive(Clone)]
struct Prepared {
    options: MqttOptions,
    status: String,
    alerts: String,
    /// `<prefix>/<node>/`, for retained messages.
    node_prefix: String,
    backoff: BackoffConfig,
}

fn prepare(cfg: &MqttConfig, node: &NodeId) -> Result<Prepared, PublishError> {
    cfg.check().map_err(PublishError::Config)?;
    let url = BrokerUrl::parse(&cfg.url)?;
    let id = cfg
        .client_id
        .clone()
        .unwrap_or_else(|| format!("dfwatch-{node}"));
    let mut o = MqttOptions::new(id, url.host.clone(), url.port);
    o.set_keep_alive(cfg.keep_alive);
    o.set_clean_session(true);
    o.set_inflight(MAX_IN_FLIGHT as u16);
    // Face-crop JPEGs are tens of kB; rumqttc's default limit is 10 kB.
    o.set_max_packet_size(1 << 20, 1 << 20);
    let status = status_topic(&cfg.prefix, node);
    o.set_last_will(LastWill::new(&status, "offline", QoS::AtLeastOnce, true));
    let password = match (&cfg.password_env, &cfg.password_file) {
        (Some(var), _) => {
            Some(std::env::var(var).map_err(|_| PublishError::MissingEnv(var.clone()))?)
        }
        (None, Some(p)) => {
            Some(
                crate::secret::read_secret_file(p).map_err(|e| PublishError::File {
                    field: "password_file",
                    path: p.display().to_string(),
                    reason: e.to_string(),
                })?,
            )
        }
        (None, None) => None,
    };
    if let Some(user) = &cfg.username {
        o.set_credentials(user.clone(), password.unwrap_or_default());
    }
    if url.tls {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Checked above: TLS has its CA, and a client identity is a whole pair.
        let ca = match &cfg.ca_file {
            Some(p) => read_file("ca_file", p)?,
            None => Vec::new(),
        };
        let client_auth = match (&cfg.client_cert_file, &cfg.client_key_file) {
            (Some(c), Some(k)) => Some((
                read_file("client_cert_file", c)?,
                read_file("client_key_file", k)?,
            )),
            _ => None,
        };
        o.set_transport(rumqttc::Transport::tls(ca, client_auth, None));
    }
    Ok(Prepared {
        options: o,
        alerts: alerts_topic(&cfg.prefix, node),
        node_prefix: format!("{}/{node}/", cfg.prefix),
        status,
        backoff: cfg.backoff,
    })
}

enum Request {
    Alert {
        alert_id: String,
        kind: EntryKind,
        payload: Vec<u8>,
        done: oneshot::Sender<std::io::Result<u64>>,
    },
    /// A retained message (stream status, verdict): not spooled, the latest per topic is
    /// kept and published again after every reconnect.
    Retained { topic: String, payload: Vec<u8> },
    /// A face-crop JPEG: biometric data, so never retained and never spooled (sent when
    /// connected, dropped otherwise).
    FaceCrop { alert_id: String, jpeg: Vec<u8> },
    /// Clears every retained message under `<prefix>/<node>/<scope>` on the broker (an empty
    /// retained message each) and refuses later ones under it until [`Request::AllowRetained`].
    ClearRetained { scope: String },
    /// Retained messages under the scope may be published again.
    AllowRetained { scope: String },
}

/// Scopes cleared at once (removed streams); past it the oldest is forgotten (its late
/// retained messages, if any, are published again).
const MAX_CLEARED_SCOPES: usize = 1024;

/// Counters of the publisher, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublisherStats {
    pub connected: bool,
    pub pending: usize,
    pub published: u64,
    pub acked: u64,
    pub reconnects: u64,
    /// `false` while the disk refuses the spool's writes (alerts still go to the broker).
    pub durable: bool,
    /// Failed spool writes and compactions.
    pub spool_write_errors: u64,
    pub spool: SpoolStats,
}

/// Recent alert payloads, oldest first (for `/api/alerts`); replayed from the spool at start.
type History = Arc<std::sync::Mutex<VecDeque<Arc<[u8]>>>>;

/// Alert payloads kept for `/api/alerts`.
pub const HISTORY_LEN: usize = 200;

/// The running publisher.
pub struct PublisherHandle {
    tx: mpsc::Sender<Request>,
    history: History,
    acks: tokio::sync::broadcast::Sender<u64>,
    stats: tokio::sync::watch::Receiver<PublisherStats>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl PublisherHandle {
    /// Spools `payload` (an alert event of `alert_id`; `update` marks coalescible updates,
    /// anything else counts as a `new`) and returns once it is fsynced. Publishing and
    /// acknowledgement follow in the background.
    pub async fn publish_alert(
        &self,
        alert_id: &str,
        update: bool,
        payload: Vec<u8>,
    ) -> Result<u64, PublishError> {
        let kind = if update {
            EntryKind::Update
        } else {
            EntryKind::New
        };
        let rx = self.enqueue_alert(alert_id, kind, payload).await?;
        match rx.await {
            Ok(Ok(seq)) => Ok(seq),
            Ok(Err(e)) => Err(PublishError::Spool {
                path: "spool".into(),
                reason: e.to_string(),
            }),
            Err(_) => Err(PublishError::Stopped),
        }
    }

    /// Hands an alert event of `kind` to the publisher without waiting for its fsync
    /// (waiting only for room in the publisher's queue, which is the back-pressure). Events
    /// of one caller stay in order. The receiver says when the alert is durable (or why
    /// not: it is published anyway); dropping it is fine: a failed write is logged.
    pub async fn enqueue_alert(
        &self,
        alert_id: &str,
        kind: EntryKind,
        payload: Vec<u8>,
    ) -> Result<oneshot::Receiver<std::io::Result<u64>>, PublishError> {
        let (done, rx) = oneshot::channel();
        self.send(Request::Alert {
            alert_id: alert_id.to_string(),
            kind,
            payload,
            done,
        })
        .await?;
        Ok(rx)
    }

    /// Hands a request to the task, waiting for room in its queue.
    async fn send(&self, request: Request) -> Result<(), PublishError> {
        self.tx
            .send(request)
            .await
            .map_err(|_| PublishError::Stopped)
    }

    /// Publishes a retained message under `<prefix>/<node>/<suffix>` (e.g.
    /// `streams/lobby/status`); the latest per topic is re-published after reconnects.
    pub async fn publish_retained(
        &self,
        suffix: &str,
        payload: Vec<u8>,
    ) -> Result<(), PublishError> {
        self.send(Request::Retained {
            topic: suffix.to_string(),
            payload,
        })
        .await
    }

    /// Clears the retained messages under `<prefix>/<node>/<scope>` (e.g. `streams/lobby/`
    /// when that stream is removed): each gets an empty retained message (now, or after the
    /// next connect), and later retained messages under the scope are dropped, never
    /// re-published after a reconnect, until [`PublisherHandle::allow_retained`].
    pub async fn clear_retained(&self, scope: &str) -> Result<(), PublishError> {
        self.send(Request::ClearRetained {
            scope: scope.to_string(),
        })
        .await
    }

    /// Retained messages under `scope` may be published again (a stream of that id starts).
    pub async fn allow_retained(&self, scope: &str) -> Result<(), PublishError> {
        self.send(Request::AllowRetained {
            scope: scope.to_string(),
        })
        .await
    }

    /// Publishes a face-crop JPEG of an alert on `<prefix>/<node>/alerts/<alert_id>/face`
    /// (QoS 1, never retained, never written to disk; dropped while disconnected). Only for
    /// streams that opted in (`publish_face_crops`): face crops are biometric data.
    pub async fn publish_face_crop(
        &self,
        alert_id: &str,
        jpeg: Vec<u8>,
    ) -> Result<(), PublishError> {
        self.send(Request::FaceCrop {
            alert_id: alert_id.to_string(),
            jpeg,
        })
        .await
    }

    pub fn stats(&self) -> PublisherStats {
        *self.stats.borrow()
    }

    /// The most recent alert payloads (JSON), newest last, at most [`HISTORY_LEN`].
    pub fn recent_alerts(&self) -> Vec<Arc<[u8]>> {
        self.history
            .lock()
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Spool sequence numbers as the broker acknowledges them (for latency measurements;
    /// a slow receiver loses the oldest).
    pub fn acks(&self) -> tokio::sync::broadcast::Receiver<u64> {
        self.acks.subscribe()
    }

    /// A receiver of the counters, e.g. to wait until the spool is empty.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<PublisherStats> {
        self.stats.clone()
    }

    /// Publishes `stopped` (when connected) and ends the task, within `grace`; what is not
    /// acknowledged by then stays in the spool for the next start.
    pub async fn stop(self, grace: Duration) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(grace, self.task).await;
    }

    /// Ends the task at once without a clean disconnect, as a crash would (the broker then
    /// publishes the last will).
    pub fn abort(self) {
        self.task.abort();
    }
}

/// Starts the publisher. Fails at once on configuration mistakes (URL, unreadable files,
/// missing environment) and on a spool that cannot be opened.
pub fn spawn(
    cfg: &MqttConfig,
    node: &NodeId,
    spool_dir: &Path,
) -> Result<PublisherHandle, PublishError> {
    let prepared = prepare(cfg, node)?;
    let limits = SpoolLimits {
        max_pending: cfg.spool_max_pending,
        max_bytes: cfg.spool_max_bytes,
        max_age: cfg.spool_max_age,
    };
    let spool = Spool::open(spool_dir, limits, HISTORY_LEN).map_err(|e| PublishError::Spool {
        path: spool_dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let history: History = Arc::new(std::sync::Mutex::new(
        spool.history().map(Arc::from).collect(),
    ));
    let (tx, rx) = mpsc::channel(1024);
    let (stats_tx, stats_rx) = tokio::sync::watch::channel(PublisherStats {
        pending: spool.len(),
        durable: true,
        spool: spool.stats(),
        ..Default::default()
    });
    let cancel = CancellationToken::new();
    let (acks, _) = tokio::sync::broadcast::channel(65_536);
    let task = tokio::spawn(run(
        prepared,
        spool,
        rx,
        stats_tx,
        acks.clone(),
        history.clone(),
        cancel.clone(),
    ));
    Ok(PublisherHandle {
        tx,
        history,
        acks,
        stats: stats_rx,
        cancel,
        task,
    })
}

/// The connection-scoped state: dropped whole on a loss.
struct Session {
    client: AsyncClient,
    events: EventLoop,
    connected: bool,
    /// Spool sequence numbers (None: a status) in hand-over order, awaiting their pkid.
    handed: VecDeque<Option<u64>>,
    /// Live packet id -> spool sequence number.
    inflight: HashMap<u16, u64>,
    /// Spool entries not yet handed to this client.
    to_send: VecDeque<u64>,
}

impl Session {
    fn new(p: &Prepared) -> Session {
        let (client, events) = AsyncClient::new(p.options.clone(), 256);
        Session {
            client,
            events,
            connected: false,
            handed: VecDeque::new(),
            inflight: HashMap::new(),
            to_send: VecDeque::new(),
        }
    }

    /// Hands a message that is not in the spool (statuses, retained messages, face crops) to
    /// rumqttc when connected. Its place in the hand-over FIFO is recorded only if rumqttc
    /// took it, so the pkid of every later publish still maps to the right spool entry.
    fn send_unspooled(&mut self, topic: &str, retain: bool, payload: Vec<u8>) {
        if self.connected
            && self
                .client
                .try_publish(topic, QoS::AtLeastOnce, retain, payload)
                .is_ok()
        {
            self.handed.push_back(None);
        }
    }

    /// Hands queued entries to rumqttc while its request queue has room.
    fn pump(&mut self, p: &Prepared, spool: &Spool, published: &mut u64) {
        while self.connected && self.inflight.len() + self.handed.len() < MAX_IN_FLIGHT {
            let Some(seq) = self.to_send.pop_front() else {
                break;
            };
            let Some(entry) = spool.get(seq) else {
                continue; // acked or coalesced meanwhile
            };
            match self
                .client
                .try_publish(&p.alerts, QoS::AtLeastOnce, false, entry.payload.clone())
            {
                Ok(()) => {
                    self.handed.push_back(Some(seq));
                    *published += 1;
                }
                Err(_) => {
                    self.to_send.push_front(seq);
                    break;
                }
            }
        }
    }
}

/// What the publisher task counts.
#[derive(Debug, Default)]
struct Tally {
    published: u64,
    acked: u64,
    reconnects: u64,
    durable: bool,
    write_errors: u64,
}

/// The spool's writer thread, seen from the publisher task.
struct Writer {
    commands: std::sync::mpsc::Sender<super::spool::LogCommand>,
    done: mpsc::UnboundedReceiver<LogDone>,
    thread: std::thread::JoinHandle<()>,
    next_batch: u64,
    awaiting: Awaiting,
}

impl Writer {
    /// Sends what the spool buffered since the last call; `alerts` are answered once durable.
    fn flush(
        &mut self,
        spool: &mut Spool,
        alerts: Vec<(u64, oneshot::Sender<std::io::Result<u64>>)>,
    ) {
        spool.enforce_limits(super::spool::now_ms());
        let bytes = spool.take_buffer();
        if bytes.is_empty() && alerts.is_empty() {
            // Nothing new, but a rewrite may be due (a failed write or compaction).
            if let Some(snapshot) = spool.compaction_snapshot() {
                let _ = self
                    .commands
                    .send(super::spool::LogCommand::Compact(snapshot));
            }
            return;
        }
        self.next_batch += 1;
        let batch = self.next_batch;
        if self
            .commands
            .send(super::spool::LogCommand::Write { batch, bytes })
            .is_err()
        {
            tracing::error!("Spool writer thread is gone; alerts are not durable.");
            for (_, tx) in alerts {
                let _ = tx.send(Err(std::io::Error::other(
                    "the spool writer thread is gone",
                )));
            }
            return;
        }
        if !alerts.is_empty() {
            self.awaiting.push_back((batch, alerts));
        }
        if let Some(snapshot) = spool.compaction_snapshot() {
            let _ = self
                .commands
                .send(super::spool::LogCommand::Compact(snapshot));
        }
    }

    /// Writes what is left, waits for the thread and answers everyone.
    async fn finish(mut self, spool: &mut Spool) {
        self.flush(spool, Vec::new());
        drop(self.commands);
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        while let Ok(d) = self.done.try_recv() {
            if let LogDone::Written { through, result } = d {
                settle(&mut self.awaiting, through, &result);
            }
        }
    }
}

/// Alerts waiting for the fsync of their batch, in batch order.
type Awaiting = VecDeque<(u64, Vec<(u64, oneshot::Sender<std::io::Result<u64>>)>)>;

/// Answers the alerts of every batch through `through` with `result`; returns their sequence
/// numbers, to be published (durable or not: while the disk refuses writes, alerts still go
/// to the broker).
fn settle(awaiting: &mut Awaiting, through: u64, result: &std::io::Result<()>) -> Vec<u64> {
    let mut settled = Vec::new();
    while awaiting.front().is_some_and(|(batch, _)| *batch <= through) {
        let (_, alerts) = awaiting.pop_front().expect("front exists");
        for (seq, tx) in alerts {
            let _ = tx.send(match result {
                Ok(()) => Ok(seq),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            });
            settled.push(seq);
        }
    }
    settled
}

async fn run(
    p: Prepared,
    mut spool: Spool,
    mut rx: mpsc::Receiver<Request>,
    stats: tokio::sync::watch::Sender<PublisherStats>,
    acks: tokio::sync::broadcast::Sender<u64>,
    history: History,
    cancel: CancellationToken,
) {
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let log = spool
        .detach_log()
        .expect("a freshly opened spool has its log");
    let (commands, thread) = match super::spool::spawn_writer(log, done_tx) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "Cannot start the spool writer thread; the publisher stops.");
            return;
        }
    };
    let mut writer = Writer {
        commands,
        done: done_rx,
        thread,
        next_batch: 0,
        awaiting: VecDeque::new(),
    };
    let mut backoff = Backoff::new(p.backoff);
    let mut session = Session::new(&p);
    // While set, the next connection attempt waits (backoff after a loss or failure).
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut last_failure: Option<String> = None;
    let mut tally = Tally {
        durable: true,
        ..Tally::default()
    };
    let mut retained: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    // Cleared scopes (full topic prefixes), oldest first, and topics whose clearing waits
    // for a connection.
    let mut cleared: VecDeque<String> = VecDeque::new();
    let mut to_clear: std::collections::BTreeSet<String> = Default::default();
    let mut rng = fastrand::Rng::new();
    let publish_stats = |s: &Session, spool: &Spool, t: &Tally| {
        stats.send_replace(PublisherStats {
            connected: s.connected,
            pending: spool.len(),
            published: t.published,
            acked: t.acked,
            reconnects: t.reconnects,
            durable: t.durable,
            spool_write_errors: t.write_errors,
            spool: spool.stats(),
        });
    };
    // A rewrite after a failed write, and the age cap, also run when nothing else happens.
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                if session.connected {
                    let _ = session.client.try_publish(&p.status, QoS::AtLeastOnce, true, "stopped");
                    let _ = session.client.try_disconnect();
                    // Let the event loop send them.
                    let _ = tokio::time::timeout(Duration::from_millis(500), async {
                        while let Ok(ev) = session.events.poll().await {
                            if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                                break;
                            }
                        }
                    })
                    .await;
                }
                writer.finish(&mut spool).await;
                return;
            }
            first = rx.recv() => {
                let Some(first) = first else {
                    cancel.cancel();
                    continue;
                };
                // Everything waiting now goes to the writer as one batch; batches queued
                // during an fsync share the next one.
                let mut batch = vec![first];
                while let Ok(r) = rx.try_recv() {
                    batch.push(r);
                    if batch.len() >= 1024 {
                        break;
                    }
                }
                let mut alerts = Vec::new();
                for r in batch {
                    match r {
                        Request::Retained { topic, payload } => {
                            let topic = format!("{}{topic}", p.node_prefix);
                            if cleared.iter().any(|c| topic.starts_with(c.as_str())) {
                                continue;
                            }
                            session.send_unspooled(&topic, true, payload.clone());
                            retained.insert(topic, payload);
                        }
                        Request::ClearRetained { scope } => {
                            let scope = format!("{}{scope}", p.node_prefix);
                            let gone: Vec<String> = retained
                                .range(scope.clone()..)
                                .take_while(|(t, _)| t.starts_with(scope.as_str()))
                                .map(|(t, _)| t.clone())
                                .collect();
                            for topic in gone {
                                retained.remove(&topic);
                                if session.connected {
                                    session.send_unspooled(&topic, true, Vec::new());
                                } else {
                                    to_clear.insert(topic);
                                }
                            }
                            if !cleared.contains(&scope) {
                                cleared.push_back(scope);
                                if cleared.len() > MAX_CLEARED_SCOPES {
                                    cleared.pop_front();
                                }
                            }
                        }
                        Request::AllowRetained { scope } => {
                            let scope = format!("{}{scope}", p.node_prefix);
                            cleared.retain(|c| *c != scope);
                            to_clear.retain(|t| !t.starts_with(scope.as_str()));
                        }
                        Request::FaceCrop { alert_id, jpeg } => {
                            let topic = format!("{}/{alert_id}/face", p.alerts);
                            session.send_unspooled(&topic, false, jpeg);
                        }
                        Request::Alert { alert_id, kind, payload, done } => {
                            if let Ok(mut h) = history.lock() {
                                h.push_back(Arc::from(payload.as_slice()));
                                while h.len() > HISTORY_LEN {
                                    h.pop_front();
                                }
                            }
                            let seq = spool
                                .append(&alert_id, kind, super::spool::now_ms(), payload)
                                .seq();
                            alerts.push((seq, done));
                        }
                    }
                }
                if !alerts.is_empty() {
                    writer.flush(&mut spool, alerts);
                }
                publish_stats(&session, &spool, &tally);
            }
            Some(done) = writer.done.recv() => {
                match done {
                    LogDone::Written { through, result } => {
                        // Published once written: a crash can lose an alert nobody saw, never
                        // one the broker delivered without a spool record. While the disk
                        // refuses writes they go out anyway, and the spool says it is not
                        // durable until everything pending is rewritten.
                        if result.is_err() {
                            tally.write_errors += 1;
                            if tally.durable {
                                tracing::error!("Spool: not durable; alerts still go to the broker while the disk refuses writes.");
                            }
                            tally.durable = false;
                            spool.rewrite_all();
                        }
                        for seq in settle(&mut writer.awaiting, through, &result) {
                            session.to_send.push_back(seq);
                        }
                        session.pump(&p, &spool, &mut tally.published);
                    }
                    LogDone::Compacted { result: Ok(()) } => {
                        if !tally.durable {
                            tracing::info!("Spool: durable again (everything pending rewritten).");
                        }
                        tally.durable = true;
                    }
                    LogDone::Compacted { result: Err(_) } => {
                        tally.write_errors += 1;
                        spool.compaction_failed();
                    }
                }
                publish_stats(&session, &spool, &tally);
            }
            _ = tick.tick() => {
                writer.flush(&mut spool, Vec::new());
                publish_stats(&session, &spool, &tally);
            }
            _ = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => {
                retry_at = None;
            }
            ev = session.events.poll(), if retry_at.is_none() => {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if session.connected {
                            continue;
                        }
                        session.connected = true;
                        backoff.on_up(std::time::Instant::now());
                        last_failure = None;
                        tracing::info!("MQTT connected.");
                        session.send_unspooled(&p.status, true, b"online".to_vec());
                        for (topic, payload) in &retained {
                            session.send_unspooled(topic, true, payload.clone());
                        }
                        for topic in std::mem::take(&mut to_clear) {
                            session.send_unspooled(&topic, true, Vec::new());
                        }
                        // Entries whose fsync is still running join when it completes.
                        let not_yet: std::collections::HashSet<u64> = writer
                            .awaiting
                            .iter()
                            .flat_map(|(_, a)| a.iter().map(|(seq, _)| *seq))
                            .collect();
                        session.to_send = spool
                            .pending()
                            .map(|e| e.seq)
                            .filter(|s| !not_yet.contains(s))
                            .collect();
                        session.pump(&p, &spool, &mut tally.published);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(Some(seq)) = session.handed.pop_front() {
                            session.inflight.insert(pkid, seq);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(seq) = session.inflight.remove(&ack.pkid)
                            && spool.ack(seq)
                        {
                            tally.acked += 1;
                            let _ = acks.send(seq);
                        }
                        // Acks are made durable in batches: a lost ack only means a duplicate.
                        if session.inflight.is_empty() || tally.acked % 1024 == 0 {
                            writer.flush(&mut spool, Vec::new());
                        }
                        session.pump(&p, &spool, &mut tally.published);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let wait = backoff.on_failure(std::time::Instant::now(), rng.f64());
                        if session.connected {
                            tally.reconnects += 1;
                            tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "MQTT connection lost.");
                        } else {
                            // Said once per distinct reason (a wrong CA or a refused login
                            // must be visible), then quietly while it keeps failing the same way.
                            let reason = e.to_string();
                            if last_failure.as_deref() != Some(reason.as_str()) {
                                tracing::warn!(error = %reason, retry_in_ms = wait.as_millis() as u64, "MQTT connect failed; retrying with backoff.");
                                last_failure = Some(reason);
                            } else {
                                tracing::debug!(error = %reason, retry_in_ms = wait.as_millis() as u64, "MQTT connect failed.");
                            }
                        }
                        writer.flush(&mut spool, Vec::new());
                        session = Session::new(&p);
                        // Durable answers and new alerts go on while it waits.
                        retry_at = Some(tokio::time::Instant::now() + wait);
                        publish_stats(&session, &spool, &tally);
                    }
                }
                // Counters are cheap to read but waking watchers on every packet is not.
                if !session.connected || session.inflight.is_empty() || tally.acked % 256 == 0 {
                    publish_stats(&session, &spool, &tally);
                }
            }
        }
    }
}
