//! The publisher: every alert event through the durable spool to its sinks (MQTT, each
//! webhook), with the retained statuses, verdicts and Home Assistant configs beside them.
//!
//! - [`PublisherHandle::publish_alert`] hands a payload to the task, which records it in the
//!   spool and passes the encoded records to the spool's writer thread; once written the
//!   alert joins the outbox ([`crate::publish::outbox`]) and goes to the sinks. The task never
//!   blocks on the disk: alerts arriving during one fsync are written together by the next
//!   (group commit), and acknowledgements keep flowing meanwhile.
//! - Each sink has its own acknowledgement cursor in the outbox ([`crate::publish::outbox::Sink`]:
//!   MQTT, or webhook `i`); an alert leaves the spool when no sink owes it.
//! - The MQTT side ([`crate::publish::mqtt`]: its config, the connection's session, the
//!   retained messages and the sweep at connect) and the webhooks ([`hooks`],
//!   [`crate::publish::webhook`]) are driven by one task ([`task`]); [`writer`] is the spool's
//!   writer thread as the task sees it.

mod hooks;
mod task;
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::publish::mqtt::MqttConfig;
use crate::publish::spool::{Spool, SpoolLimits, SpoolStats};
use crate::types::{AlertChange, NodeId};

/// Why the publisher could not start, or a request could not be handed to it.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// `[mqtt]`: the config, the broker URL, a TLS or password file, the environment.
    #[error(transparent)]
    Mqtt(#[from] crate::publish::mqtt::MqttError),
    #[error("spool {path}: {reason}")]
    Spool { path: String, reason: String },
    #[error("the publisher has stopped")]
    Stopped,
    #[error(transparent)]
    Webhook(#[from] crate::publish::webhook::WebhookError),
}

pub(crate) enum Request {
    Alert {
        alert_id: String,
        kind: AlertChange,
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
    /// A stream's Home Assistant discovery configs (when `homeassistant` is on): published
    /// retained and kept for reconnects and Home Assistant's births.
    Announce { stream: crate::types::StreamId },
    /// A removed stream's discovery configs are cleared on the broker.
    Retract { stream: crate::types::StreamId },
    /// The node's streams now (at start, and after each change): what the sweep at connect
    /// keeps ([`sweep`]).
    Streams {
        ids: std::collections::BTreeSet<crate::types::StreamId>,
    },
    /// A stream came online or left it: its retained `availability`.
    StreamOnline {
        stream: crate::types::StreamId,
        online: bool,
    },
    /// The daemon is stopping: every stream's availability goes `offline` at once, before
    /// the streams wind down (Home Assistant shows them unavailable, not their last moves).
    Stopping,
    /// An alert event for Home Assistant's event entity (when `homeassistant` is on): sent
    /// when connected, never retained, never spooled (the alert itself is).
    AlertEvent {
        stream: crate::types::StreamId,
        kind: AlertChange,
        alert_id: String,
        sentence: String,
        score: f64,
    },
}

/// Counters of the publisher, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublisherStats {
    pub connected: bool,
    /// Alerts in the spool that a sink (MQTT or a webhook) still owes.
    pub pending: usize,
    /// Of those, the ones the broker has not acknowledged.
    pub mqtt_owed: usize,
    pub published: u64,
    pub acked: u64,
    pub reconnects: u64,
    /// Connection attempts that ended before the broker's CONNACK (refused, timed out,
    /// malformed answers).
    pub connect_failures: u64,
    /// `false` while the disk refuses the spool's writes (alerts still go to the broker).
    pub durable: bool,
    /// Failed spool writes and compactions.
    pub spool_write_errors: u64,
    pub spool: SpoolStats,
}

/// One webhook's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookStats {
    pub name: String,
    pub delivered: u64,
    /// Attempts that failed and were tried again.
    pub retried: u64,
    /// Events the receiver refused for good.
    pub refused: u64,
    /// Events it owes now.
    pub owed: usize,
    /// Events given up by its cap (`max_owed`).
    pub given_up: u64,
}

/// The running publisher.
pub struct PublisherHandle {
    tx: mpsc::Sender<Request>,
    /// Each webhook's name and counters.
    webhooks: Vec<(String, Arc<crate::publish::webhook::WebhookCounters>)>,
    /// The outbox's counters per sink (`mqtt`, then `webhook:<name>`), as the task last saw.
    sinks: Arc<std::sync::Mutex<Vec<(String, crate::publish::outbox::SinkStats)>>>,
    acks: tokio::sync::broadcast::Sender<u64>,
    stats: tokio::sync::watch::Receiver<PublisherStats>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// Panics the publisher's task caught and went on from.
    restarts: Arc<crate::fault::Restarts>,
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
            AlertChange::Update
        } else {
            AlertChange::New
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
        kind: AlertChange,
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

    /// Announces a stream to Home Assistant (`mqtt.homeassistant`; nothing otherwise): its
    /// discovery configs go out retained, again after reconnects and Home Assistant's births.
    pub async fn announce_stream(
        &self,
        stream: &crate::types::StreamId,
    ) -> Result<(), PublishError> {
        self.send(Request::Announce {
            stream: stream.clone(),
        })
        .await
    }

    /// Removes a stream from Home Assistant: its discovery configs are cleared on the broker.
    pub async fn retract_stream(
        &self,
        stream: &crate::types::StreamId,
    ) -> Result<(), PublishError> {
        self.send(Request::Retract {
            stream: stream.clone(),
        })
        .await
    }

    /// The node's streams now: the sweep at each connect clears what an earlier run left
    /// retained for any other ([`sweep`]). Until it is told, the publisher sweeps nothing.
    pub async fn set_streams(
        &self,
        ids: std::collections::BTreeSet<crate::types::StreamId>,
    ) -> Result<(), PublishError> {
        self.send(Request::Streams { ids }).await
    }

    /// A stream came online (`true`) or left it: its entities' availability follows.
    pub async fn stream_online(
        &self,
        stream: &crate::types::StreamId,
        online: bool,
    ) -> Result<(), PublishError> {
        self.send(Request::StreamOnline {
            stream: stream.clone(),
            online,
        })
        .await
    }

    /// The daemon begins to stop: every stream's availability goes `offline` now.
    pub async fn stopping(&self) -> Result<(), PublishError> {
        self.send(Request::Stopping).await
    }

    /// An alert event for Home Assistant's event entity of `stream` (nothing without
    /// `homeassistant`).
    pub async fn publish_alert_event(
        &self,
        stream: &crate::types::StreamId,
        kind: AlertChange,
        alert_id: &str,
        sentence: &str,
        score: f64,
    ) -> Result<(), PublishError> {
        self.send(Request::AlertEvent {
            stream: stream.clone(),
            kind,
            alert_id: alert_id.to_string(),
            sentence: sentence.to_string(),
            score,
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

    /// Each webhook: its name, counters and what it owes (for metrics).
    pub fn webhook_stats(&self) -> Vec<WebhookStats> {
        let sinks = self.sinks.lock().map(|s| s.clone()).unwrap_or_default();
        self.webhooks
            .iter()
            .map(|(name, c)| {
                let sink = sinks
                    .iter()
                    .find(|(n, _)| *n == format!("webhook:{name}"))
                    .map(|(_, s)| *s)
                    .unwrap_or_default();
                WebhookStats {
                    name: name.clone(),
                    delivered: c.delivered.load(std::sync::atomic::Ordering::Relaxed),
                    retried: c.retried.load(std::sync::atomic::Ordering::Relaxed),
                    refused: c.refused.load(std::sync::atomic::Ordering::Relaxed),
                    owed: sink.owed,
                    given_up: sink.given_up,
                }
            })
            .collect()
    }

    /// The publisher's restarts after panics.
    pub fn restarts(&self) -> &crate::fault::Restarts {
        &self.restarts
    }

    pub fn stats(&self) -> PublisherStats {
        *self.stats.borrow()
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
    spawn_with_webhooks(cfg, node, spool_dir, Vec::new())
}

/// [`spawn`], with webhooks as further sinks of the spool ([`crate::publish::webhook`]).
pub fn spawn_with_webhooks(
    cfg: &MqttConfig,
    node: &NodeId,
    spool_dir: &Path,
    webhooks: Vec<Arc<crate::publish::webhook::Webhook>>,
) -> Result<PublisherHandle, PublishError> {
    let prepared = crate::publish::mqtt::config::prepare(cfg, node)?;
    let limits = SpoolLimits {
        max_pending: cfg.spool_max_pending,
        max_bytes: cfg.spool_max_bytes,
        max_age: cfg.spool_max_age,
    };
    let spool = Spool::open(spool_dir, limits).map_err(|e| PublishError::Spool {
        path: spool_dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let (tx, rx) = mpsc::channel(1024);
    let (stats_tx, stats_rx) = tokio::sync::watch::channel(PublisherStats {
        pending: spool.len(),
        durable: true,
        spool: spool.stats(),
        ..Default::default()
    });
    let cancel = CancellationToken::new();
    let (acks, _) = tokio::sync::broadcast::channel(65_536);
    let restarts = Arc::new(crate::fault::Restarts::default());
    let hooks: Vec<(String, Arc<crate::publish::webhook::WebhookCounters>)> = webhooks
        .iter()
        .map(|w| (w.cfg.name.clone(), w.counters.clone()))
        .collect();
    let sinks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let task = tokio::spawn(task::supervise(
        prepared,
        webhooks,
        sinks.clone(),
        spool,
        rx,
        stats_tx,
        acks.clone(),
        cancel.clone(),
        restarts.clone(),
    ));
    Ok(PublisherHandle {
        tx,
        webhooks: hooks,
        sinks,
        acks,
        stats: stats_rx,
        cancel,
        task,
        restarts,
    })
}
