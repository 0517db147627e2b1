//! The alert payload, schema version 1: what consumers of `dfwatch/<node>/alerts` receive.
//!
//! The JSON Schema is `src/publish/alert-v1.schema.json`; a complete example is
//! `tests/fixtures/alert-v1.example.json` (checked against both the schema and these types).
//! Fields are only ever added within a version; consumers must ignore fields they do not know
//! and deduplicate by `alert_id` (delivery is at least once).

use serde::{Deserialize, Serialize};

use crate::evidence::{AlertEvent, Verdict};
use crate::score::{Explanation, FaceScore, LabelGraph};
use crate::types::{BBox, NodeId};

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = 1;

/// The JSON Schema of [`AlertPayload`].
pub const SCHEMA: &str = include_str!("alert-v1.schema.json");

/// The model that produced an alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    /// SHA-256 of the bundle's manifest.toml: the model's identity.
    pub manifest_sha256: String,
    /// `false` for synthetic bundles, whose scores mean nothing.
    pub trained: bool,
    /// `cpu-onnxruntime` or `cuda`.
    pub backend: String,
    /// `fp32`, `int8`, `fp16`, ...
    pub precision: String,
}

/// When things happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Times {
    /// RFC 3339: when the alert opened.
    pub started: String,
    /// RFC 3339: capture time of the newest frame behind this event.
    pub observed: String,
    /// Stream timestamps of the oldest and newest frame of the evidence window, in ms (they
    /// reset when a source reconnects or a file loops).
    pub first_pts_ms: Option<u64>,
    pub last_pts_ms: Option<u64>,
}

/// A frame kept as evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopFrame {
    pub capture_time: String,
    pub pts_ms: Option<u64>,
    pub bbox: BBox,
    pub logit: f64,
    pub quality: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceInfo {
    pub frames_scored: usize,
    pub frames_skipped_low_quality: usize,
    pub window_s: f64,
    pub top_frames: Vec<TopFrame>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Marginal {
    pub name: String,
    pub q: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplanationInfo {
    pub sentence: String,
    /// Global attributes, most probable first (window means).
    pub attributes: Vec<Marginal>,
    /// Face regions, most probable first (window means).
    pub regions: Vec<Marginal>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityInfo {
    /// Mean quality weight (0..=1) of the faces in the window.
    pub mean_weight: f32,
}

/// The alert JSON, schema version 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertPayload {
    pub schema_version: u32,
    /// ULID: unique per alert, shared by its new/update/end events; deduplicate on it
    /// together with `type` and `times.observed`.
    pub alert_id: String,
    #[serde(rename = "type")]
    pub event: crate::types::AlertChange,
    /// For `end`: `cleared`, `track_lost`, `model_swapped` or `stream_stopped`.
    pub end_reason: Option<String>,
    pub node: String,
    pub stream: String,
    pub track_id: u64,
    pub times: Times,
    pub verdict: Verdict,
    /// Probability that the face is fake, from the evidence statistic.
    pub score: f64,
    /// The evidence statistic: trimmed mean of logit(q0) over the window.
    pub logit: f64,
    /// The statistic at which a face becomes fake.
    pub threshold: f64,
    pub evidence: EvidenceInfo,
    pub explanation: ExplanationInfo,
    pub quality: QualityInfo,
    pub model: ModelInfo,
    /// From the capture of the newest frame to this payload's creation.
    pub latency_ms: Option<f64>,
}

fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl AlertPayload {
    /// Dresses an evidence event for publishing. `observed` is the capture time of the
    /// newest frame, `mean_quality` the window's mean quality weight, `now` the wall clock.
    pub fn from_event(
        ev: &AlertEvent,
        node: &NodeId,
        graph: &LabelGraph,
        model: &ModelInfo,
        observed: std::time::SystemTime,
        mean_quality: f32,
        now: std::time::SystemTime,
    ) -> Self {
        let event = ev.kind.change();
        let end_reason = ev.kind.end_reason().map(|r| r.as_str().to_string());
        let score = FaceScore {
            logits: vec![],
            log_z: 0.0,
            logit_q0: ev.logit,
            q0: ev.score,
            marginals: ev.mean_marginals.clone(),
        };
        let e = Explanation::new(graph, &score);
        let marg = |v: Vec<crate::score::NodeMarginal>| {
            v.into_iter()
                .map(|m| Marginal {
                    name: m.name,
                    q: m.q,
                })
                .collect()
        };
        let pts: Vec<u64> = ev.top_frames.iter().filter_map(|f| f.pts_ms).collect();
        AlertPayload {
            schema_version: SCHEMA_VERSION,
            alert_id: ev.alert_id.to_string(),
            event,
            end_reason,
            node: node.to_string(),
            stream: ev.stream.to_string(),
            track_id: ev.track.0,
            times: Times {
                started: rfc3339(ev.started),
                observed: rfc3339(observed),
                first_pts_ms: pts.iter().min().copied(),
                last_pts_ms: pts.iter().max().copied(),
            },
            verdict: ev.verdict,
            score: ev.score,
            logit: ev.logit,
            threshold: ev.threshold,
            evidence: EvidenceInfo {
                frames_scored: ev.frames_scored,
                frames_skipped_low_quality: ev.frames_skipped_low_quality,
                window_s: ev.window_s,
                top_frames: ev
                    .top_frames
                    .iter()
                    .map(|f| TopFrame {
                        capture_time: rfc3339(f.capture_time),
                        pts_ms: f.pts_ms,
                        bbox: f.bbox,
                        logit: f.logit_q0,
                        quality: f.quality,
                    })
                    .collect(),
            },
            explanation: ExplanationInfo {
                sentence: e.sentence,
                attributes: marg(e.attributes),
                regions: marg(e.regions),
            },
            quality: QualityInfo {
                mean_weight: mean_quality,
            },
            model: model.clone(),
            latency_ms: now
                .duration_since(observed)
                .ok()
                .map(|d| d.as_secs_f64() * 1e3),
        }
    }
}

#[cfg(test)]
mod tests;
