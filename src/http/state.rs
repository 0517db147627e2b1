//! What the daemon shares with its HTTP surface, owned here: stream views, counters, model
//! and publisher, the HTTP surface's own parts (guard, listener bounds, places, sessions), and
//! the command queue into the supervisor loop (add, remove, reload), which `app` serves.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::channel::ChannelStats;
use crate::ingest::{StreamConfig, StreamCounters, StreamStatus};
use crate::metrics::families::{NodeSample, StreamSample};
use crate::metrics::{AnalysisMetrics, StreamMetrics};
use crate::publish::payload::ModelInfo;
use crate::publish::publisher::PublisherHandle;
use crate::types::StreamId;

/// A request to the supervisor loop, answered on `reply`.
#[derive(Debug)]
pub enum Command {
    /// Add a runtime-only stream (not written to the config file).
    AddStream {
        stream: Box<StreamConfig>,
        reply: oneshot::Sender<Result<(), CommandError>>,
    },
    RemoveStream {
        id: StreamId,
        reply: oneshot::Sender<Result<(), CommandError>>,
    },
    /// Re-read the config file and apply what changed.
    Reload {
        reply: oneshot::Sender<Result<ReloadReport, CommandError>>,
    },
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "error", content = "detail", rename_all = "snake_case")]
pub enum CommandError {
    #[error("invalid: {}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("stream {0:?} already exists")]
    Exists(String),
    #[error("no stream {0:?}")]
    NotFound(String),
    /// A configured limit was reached (e.g. `http.api_max_streams`).
    #[error("limit: {0}")]
    Limit(String),
    #[error("{0}")]
    Failed(String),
}

impl CommandError {
    /// A one-word name, for audit lines.
    pub fn kind(&self) -> &'static str {
        match self {
            CommandError::Invalid(_) => "invalid",
            CommandError::Exists(_) => "exists",
            CommandError::NotFound(_) => "not_found",
            CommandError::Limit(_) => "limit",
            CommandError::Failed(_) => "failed",
        }
    }
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub restarted: Vec<String>,
    pub unchanged: Vec<String>,
    pub evidence_changed: bool,
    pub model_swapped: bool,
    /// Settings that changed in the file but apply only at the next start.
    pub needs_restart: Vec<String>,
}

/// One stream as the HTTP API and metrics see it.
pub struct StreamView {
    pub config: StreamConfig,
    /// `true` for streams added through the API (not in the config file).
    pub runtime_only: bool,
    pub status: watch::Receiver<StreamStatus>,
    pub counters: Arc<StreamCounters>,
    pub analysis: Arc<StreamMetrics>,
    pub frames: Box<dyn Fn() -> ChannelStats + Send + Sync>,
}

/// The JSON of `/api/streams`.
#[derive(Debug, Serialize)]
pub struct StreamReport {
    pub id: String,
    /// With credentials never present (they are refused in URIs).
    pub uri: String,
    pub runtime_only: bool,
    pub status: StreamStatus,
    pub frames_decoded: u64,
    pub frames_delivered: u64,
    pub frames_dropped: u64,
    pub frames_analysed: u64,
    pub faces_detected: u64,
    pub faces_scored: u64,
    pub tracks: u64,
    pub coverage: f64,
    /// Panics the stream's face stage caught and went on from, and the last one's reason.
    pub analysis_restarts: u64,
    pub analysis_error: Option<String>,
    /// The stream's verdict summary, as on MQTT `.../streams/<id>/verdict`; `null` before
    /// its first scored face.
    pub verdict: Option<crate::decide::StreamVerdict>,
}

/// Shared by the supervisor loop, the stages and the HTTP handlers.
pub struct AppState {
    pub started: Instant,
    /// Milliseconds after `started` of the supervisor loop's last tick.
    pub heartbeat_ms: AtomicU64,
    pub ready: AtomicBool,
    pub model: RwLock<ModelInfo>,
    pub publisher: Arc<PublisherHandle>,
    /// Alert history and evidence media (`/api/events`, `/api/alerts`).
    pub events: crate::events::EventStore,
    /// Browser sessions from `POST /api/session` (reads only, e.g. the SSE endpoint).
    pub sessions: super::session::Sessions,
    /// Each stream's latest verdict summary (as on `.../streams/<id>/verdict`).
    pub verdicts: Arc<crate::decide::VerdictBoard>,
    pub analysis: Arc<AnalysisMetrics>,
    pub streams: RwLock<BTreeMap<StreamId, StreamView>>,
    pub commands: mpsc::Sender<Command>,
    /// What API callers may do (token, schemes, credential sets, limits).
    pub api: super::guard::ApiPolicy,
    /// Failed-attempt throttle and its counters.
    pub guard: super::guard::Guard,
    /// The HTTP listener's bounds and their counters.
    pub connections: Arc<super::listener::Connections>,
    /// Live subscribers of `/api/events/stream` and running exports: bounded in all and
    /// per client ([`super::places`]).
    pub subscribers: Arc<super::places::Places>,
    pub exports: Arc<super::places::Places>,
    pub encode_queue: Box<dyn Fn() -> ChannelStats + Send + Sync>,
}

impl AppState {
    /// The supervisor loop is alive.
    pub fn beat(&self) {
        self.heartbeat_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the last heartbeat.
    pub fn heartbeat_age(&self) -> Duration {
        let last = Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    pub fn stream_reports(&self) -> Vec<StreamReport> {
        let streams = self.streams.read().expect("streams lock");
        streams
            .iter()
            .map(|(id, v)| {
                let st = v.counters.snapshot();
                StreamReport {
                    id: id.to_string(),
                    uri: crate::ingest::source::redact_known(&v.config.uri),
                    runtime_only: v.runtime_only,
                    status: v.status.borrow().clone(),
                    frames_decoded: st.frames_decoded,
                    frames_delivered: st.frames_delivered,
                    frames_dropped: st.frames_dropped_queue_full + st.frames_dropped_invalid,
                    frames_analysed: v.analysis.frames_analysed.get(),
                    faces_detected: v.analysis.faces_detected.get(),
                    faces_scored: v.analysis.faces_scored.get(),
                    tracks: v.analysis.tracks_live.load(Ordering::Relaxed),
                    coverage: v.analysis.coverage(),
                    analysis_restarts: v.analysis.restarts.count(),
                    analysis_error: v.analysis.restarts.last_reason(),
                    verdict: self.verdicts.get(id.as_str()),
                }
            })
            .collect()
    }

    /// What an operator should look at while the daemon still serves: a spool that is not
    /// durable, stages that panicked and went on in the last few minutes, streams failed by
    /// policy.
    pub fn degraded(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.publisher.stats().durable {
            out.push(
                "spool not durable: the disk refuses its writes (alerts still go to the broker)"
                    .to_string(),
            );
        }
        let stages = [
            ("publisher", self.publisher.restarts()),
            ("encoder", &self.analysis.encoder_restarts),
            ("decision stage", &self.analysis.decide_restarts),
        ];
        for (stage, r) in stages {
            if let Some(why) = r.recent() {
                out.push(format!("{stage} restarted after {why}"));
            }
        }
        if let Some(why) = self.events.metrics().recent_reset() {
            out.push(format!("event store reset: {why}"));
        }
        for (id, v) in self.streams.read().expect("streams lock").iter() {
            if let Some(why) = v.analysis.restarts.recent() {
                out.push(format!("stream {id}: face stage restarted after {why}"));
            }
            let status = v.status.borrow();
            if status.state == crate::ingest::StreamState::Failed {
                let why = status.last_error.as_ref().map(|e| e.message.as_str());
                out.push(format!(
                    "stream {id} failed: {} (not retried until a reload or an API change)",
                    why.unwrap_or("refused")
                ));
            }
        }
        out
    }

    /// `/metrics` in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        let model = self.model.read().expect("model lock").clone();
        let streams = self.streams.read().expect("streams lock");
        let sample = NodeSample {
            model: &model,
            uptime: self.started.elapsed(),
            streams: streams
                .iter()
                .map(|(id, v)| StreamSample {
                    id: id.to_string(),
                    status: v.status.borrow().clone(),
                    stats: v.counters.snapshot(),
                    analysis_behind: (v.frames)().dropped_oldest,
                    analysis: &v.analysis,
                })
                .collect(),
            analysis: &self.analysis,
            encode_queue_len: (self.encode_queue)().len,
            publisher: self.publisher.stats(),
            publisher_restarts: self.publisher.restarts().count(),
            webhooks: self.publisher.webhook_stats(),
            events: self.events.metrics(),
        };
        let mut e = crate::metrics::Exposition::new();
        crate::metrics::families::render(&mut e, &sample);
        super::metrics::render(
            &mut e,
            &super::metrics::HttpSample {
                guard: &self.guard,
                connections: &self.connections,
                subscribers: &self.subscribers,
                exports: &self.exports,
                sessions: &self.sessions,
            },
        );
        e.finish()
    }
}
