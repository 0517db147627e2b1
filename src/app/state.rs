//! What the daemon shares with its HTTP surface: stream views, counters, model and publisher,
//! and the command queue into the supervisor loop (add, remove, reload).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use super::analysis::{AnalysisMetrics, StreamMetrics};
use crate::channel::ChannelStats;
use crate::ingest::{StreamConfig, StreamCounters, StreamStatus};
use crate::metrics::Exposition;
use crate::publish::mqtt::PublisherHandle;
use crate::publish::payload::ModelInfo;
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
    #[error("{0}")]
    Failed(String),
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
}

/// One stream's numbers, read once per `/metrics` request.
struct StreamRow<'a> {
    id: String,
    status: StreamStatus,
    stats: crate::ingest::StreamStats,
    view: &'a StreamView,
}

/// Shared by the supervisor loop, the stages and the HTTP handlers.
pub struct AppState {
    pub started: Instant,
    /// Milliseconds after `started` of the supervisor loop's last tick.
    pub heartbeat_ms: AtomicU64,
    pub ready: AtomicBool,
    pub model: RwLock<ModelInfo>,
    pub publisher: Arc<PublisherHandle>,
    pub analysis: Arc<AnalysisMetrics>,
    pub streams: RwLock<BTreeMap<StreamId, StreamView>>,
    pub commands: mpsc::Sender<Command>,
    /// Bearer token of mutating API calls.
    pub token: String,
    /// URI schemes accepted for streams added through the API.
    pub api_schemes: Vec<String>,
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
                }
            })
            .collect()
    }

    /// `/metrics` in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        let mut e = Exposition::new();
        let model = self.model.read().expect("model lock").clone();
        e.family(
            "dfwatch_build_info",
            "gauge",
            "Build and model identity (value 1).",
        )
        .sample(
            "dfwatch_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("model", &model.name),
                ("model_version", &model.version),
                ("model_sha256", &model.manifest_sha256),
                ("trained", if model.trained { "true" } else { "false" }),
                ("backend", &model.backend),
            ],
            1.0,
        );
        e.family(
            "dfwatch_uptime_seconds",
            "gauge",
            "Seconds since the daemon started.",
        )
        .sample(
            "dfwatch_uptime_seconds",
            &[],
            self.started.elapsed().as_secs_f64(),
        );
        let streams = self.streams.read().expect("streams lock");
        let rows: Vec<StreamRow> = streams
            .iter()
            .map(|(id, v)| StreamRow {
                id: id.to_string(),
                status: v.status.borrow().clone(),
                stats: v.counters.snapshot(),
                view: v,
            })
            .collect();
        e.family(
            "dfwatch_stream_up",
            "gauge",
            "1 while the stream delivers frames (state online).",
        );
        for r in &rows {
            let up = r.status.state == crate::ingest::StreamState::Online;
            e.sample(
                "dfwatch_stream_up",
                &[("stream", &r.id), ("state", r.status.state.as_str())],
                if up { 1.0 } else { 0.0 },
            );
        }
        e.family(
            "dfwatch_frames_dropped_total",
            "counter",
            "Frames lost, by reason.",
        );
        for r in &rows {
            for (reason, n) in r.stats.drops() {
                e.sample(
                    "dfwatch_frames_dropped_total",
                    &[("stream", &r.id), ("reason", reason)],
                    n as f64,
                );
            }
            e.sample(
                "dfwatch_frames_dropped_total",
                &[("stream", &r.id), ("reason", "analysis_behind")],
                (r.view.frames)().dropped_oldest as f64,
            );
        }
        // One value per stream: (name, help, value). Kind: counter for `_total`, else gauge.
        type Pick = fn(&StreamRow) -> f64;
        let per_stream: [(&str, &str, Pick); 13] = [
            (
                "dfwatch_stream_reconnects_total",
                "Re-establishments after a loss.",
                |r| r.status.reconnects as f64,
            ),
            (
                "dfwatch_frames_decoded_total",
                "Frames out of the decoder.",
                |r| r.stats.frames_decoded as f64,
            ),
            (
                "dfwatch_frames_sampled_out_total",
                "Frames skipped by the analysis rate (by design, not a loss).",
                |r| r.stats.frames_sampled_out as f64,
            ),
            (
                "dfwatch_frames_analysed_total",
                "Frames the face stage processed.",
                |r| r.view.analysis.frames_analysed.get() as f64,
            ),
            (
                "dfwatch_faces_detected_total",
                "Faces found by the detector.",
                |r| r.view.analysis.faces_detected.get() as f64,
            ),
            (
                "dfwatch_faces_due_total",
                "Faces the tracker scheduled for scoring.",
                |r| r.view.analysis.faces_due.get() as f64,
            ),
            ("dfwatch_faces_scored_total", "Faces scored.", |r| {
                r.view.analysis.faces_scored.get() as f64
            }),
            (
                "dfwatch_faces_dropped_total",
                "Due faces evicted from the full encode queue.",
                |r| r.view.analysis.faces_dropped_encode_queue.get() as f64,
            ),
            (
                "dfwatch_faces_crop_failed_total",
                "Due faces that could not be cropped.",
                |r| r.view.analysis.faces_crop_failed.get() as f64,
            ),
            (
                "dfwatch_detector_errors_total",
                "Frames on which face detection failed.",
                |r| r.view.analysis.detector_errors.get() as f64,
            ),
            (
                "dfwatch_faces_late_total",
                "Embeddings that arrived after their track had ended (ignored).",
                |r| r.view.analysis.faces_late.get() as f64,
            ),
            ("dfwatch_tracks", "Live face tracks.", |r| {
                r.view.analysis.tracks_live.load(Ordering::Relaxed) as f64
            }),
            (
                "dfwatch_coverage_ratio",
                "Faces scored / faces due for scoring, since start.",
                |r| r.view.analysis.coverage(),
            ),
        ];
        for (name, help, pick) in per_stream {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            e.family(name, kind, help);
            for r in &rows {
                e.sample(name, &[("stream", &r.id)], pick(r));
            }
        }
        e.family(
            "dfwatch_stage_cpu_seconds_total",
            "counter",
            "CPU time of the face stage, by step.",
        );
        for r in &rows {
            for (stage, ns) in [
                ("detect", r.view.analysis.detect_ns.get()),
                ("crop", r.view.analysis.crop_ns.get()),
            ] {
                e.sample(
                    "dfwatch_stage_cpu_seconds_total",
                    &[("stream", &r.id), ("stage", stage)],
                    ns as f64 * 1e-9,
                );
            }
        }
        drop(streams);
        let a = &self.analysis;
        e.family(
            "dfwatch_encode_batch_size",
            "histogram",
            "Crops per encoder batch (one observation per face).",
        );
        e.histogram("dfwatch_encode_batch_size", &[], &a.batch_size);
        e.family(
            "dfwatch_inference_seconds",
            "histogram",
            "Wall time of one encoder batch.",
        );
        e.histogram("dfwatch_inference_seconds", &[], &a.inference_seconds);
        e.family(
            "dfwatch_decode_to_publish_seconds",
            "histogram",
            "From a frame leaving the decoder to its face's decision (alerts handed to the publisher).",
        );
        e.histogram(
            "dfwatch_decode_to_publish_seconds",
            &[],
            &a.decode_to_publish_seconds,
        );
        let q = (self.encode_queue)();
        e.family(
            "dfwatch_encode_queue_length",
            "gauge",
            "Crops waiting for the encoder.",
        )
        .sample("dfwatch_encode_queue_length", &[], q.len as f64);
        e.family(
            "dfwatch_score_errors_total",
            "counter",
            "Embeddings the scorer refused.",
        )
        .sample(
            "dfwatch_score_errors_total",
            &[],
            a.score_errors.get() as f64,
        );
        e.family(
            "dfwatch_alerts_total",
            "counter",
            "Alert events handed to the publisher, by type and verdict.",
        );
        for ((kind, verdict), n) in a.alerts.lock().expect("alerts lock").iter() {
            e.sample(
                "dfwatch_alerts_total",
                &[("type", kind), ("verdict", verdict)],
                *n as f64,
            );
        }
        let p = self.publisher.stats();
        e.family(
            "dfwatch_broker_connected",
            "gauge",
            "1 while connected to the MQTT broker.",
        )
        .sample(
            "dfwatch_broker_connected",
            &[],
            if p.connected { 1.0 } else { 0.0 },
        );
        e.family(
            "dfwatch_spool_pending",
            "gauge",
            "Alerts in the durable spool awaiting the broker's acknowledgement.",
        )
        .sample("dfwatch_spool_pending", &[], p.pending as f64);
        e.family(
            "dfwatch_mqtt_published_total",
            "counter",
            "Alert publishes handed to the broker connection (re-sends included).",
        )
        .sample("dfwatch_mqtt_published_total", &[], p.published as f64);
        e.family(
            "dfwatch_mqtt_acked_total",
            "counter",
            "Alerts the broker acknowledged.",
        )
        .sample("dfwatch_mqtt_acked_total", &[], p.acked as f64);
        e.family(
            "dfwatch_mqtt_reconnects_total",
            "counter",
            "Broker connection losses followed by a retry.",
        )
        .sample("dfwatch_mqtt_reconnects_total", &[], p.reconnects as f64);
        e.finish()
    }
}
