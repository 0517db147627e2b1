//! The decision stage: embeddings in, alert payloads and per-stream verdicts out.
//!
//! A stage runner: it drives `score` (label-graph scores of each embedding) and `evidence`
//! (per-track verdicts and the alert lifecycle), and dresses alerts as MQTT payloads
//! (`publish::payload`). [`Decider`] is sans-IO: it owns the per-track notes, the verdicts
//! and the open alerts, and each `on_*` method returns what to publish ([`Output`]). The
//! daemon's task ([`task::run`]) is a thin loop around it; `dfwatch analyze` drives it
//! directly.
//!
//! Order: a track's end ([`FaceEvent::TrackEnded`]) travels through the encode queue behind
//! the track's faces, so it can never overtake its last embedding, and an ended track is
//! simply forgotten.

pub mod task;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use crate::encode::Embedded;
use crate::events::AlertMedia;
use crate::evidence::{
    AlertEvent, AlertKind, EndReason, Evidence, EvidenceConfig, Observation, UlidGenerator, Verdict,
};
use crate::metrics::AnalysisMetrics;
use crate::publish::payload::{AlertPayload, ModelInfo};
use crate::score::Scorer;
use crate::types::{FaceEvent, FaceMeta, NodeId, StreamId, TrackId};

/// The model as the decision stage uses it.
#[derive(Debug, Clone)]
pub struct Scoring {
    pub scorer: Scorer,
    pub model: ModelInfo,
}

impl Scoring {
    /// Each label node's level, in the model's order (what the evidence needs).
    fn levels(&self) -> Vec<crate::score::Level> {
        self.scorer
            .graph()
            .nodes()
            .iter()
            .map(|n| n.level)
            .collect()
    }
}

/// The FF++ graph with identity text embeddings, so an embedding's values are its label
/// logits (tests of the decision stage and of calibration).
#[cfg(test)]
pub(crate) fn identity_scoring() -> Scoring {
    let g = crate::score::LabelGraph::ffpp();
    let n = g.len();
    let mut text = vec![0.0f32; n * n];
    for j in 0..n {
        text[j * n + j] = 1.0;
    }
    Scoring {
        scorer: Scorer::new(g, &text, n).expect("an identity scorer"),
        model: ModelInfo {
            name: "test".into(),
            version: "0".into(),
            manifest_sha256: "0".repeat(64),
            trained: false,
            backend: "cpu-onnxruntime".into(),
            precision: "fp32".into(),
        },
    }
}

/// Something to publish, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// An alert event: spooled, then published on `<prefix>/<node>/alerts`.
    Alert {
        alert_id: String,
        /// `new`, `update` or `end` with its reason.
        kind: AlertKind,
        stream: StreamId,
        track: TrackId,
        /// The payload JSON.
        payload: Vec<u8>,
        /// What the payload says, typed beside its bytes (for the event store and Home
        /// Assistant's event entity): the verdict, the explanation's sentence, the fake
        /// probability.
        verdict: &'static str,
        sentence: String,
        score: f64,
        /// The face crop as a JPEG, with a `new` alert of a stream that opted in.
        face_jpeg: Option<Vec<u8>>,
        /// For the event store (streams with `store_media`): the track's strongest face,
        /// when it is new to the store (with `new`, and whenever a stronger face came since).
        media: Option<AlertMedia>,
    },
    /// A stream's verdict summary changed: retained on `<prefix>/<node>/streams/<id>/verdict`
    /// (serialised there, at the sink), and on the verdict board for the HTTP API.
    Verdict(StreamVerdict),
}

/// The retained per-stream summary on `<prefix>/<node>/streams/<id>/verdict`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StreamVerdict {
    pub stream: StreamId,
    /// `fake` when any live track is fake, else `uncertain` when any is, else `real` when
    /// any track has a verdict, else `none`; `unknown` until this run has judged a face of
    /// the stream ([`StreamVerdict::unknown`]).
    pub verdict: &'static str,
    pub tracks: usize,
    pub fake_tracks: usize,
    pub open_alerts: Vec<String>,
    pub model_trained: bool,
    /// The leading track's fake probability over its evidence window (the highest of the
    /// live tracks, to 0.01; republished when it moves by 0.05), `null` without one.
    pub score: Option<f64>,
}

impl StreamVerdict {
    /// A stream this run has not judged yet (published at its start, so what an earlier run
    /// left retained is not taken for its state): verdict `unknown`, no tracks.
    pub fn unknown(stream: &StreamId, model_trained: bool) -> Self {
        StreamVerdict {
            stream: stream.clone(),
            verdict: "unknown",
            tracks: 0,
            fake_tracks: 0,
            open_alerts: Vec::new(),
            model_trained,
            score: None,
        }
    }
}

/// The latest [`StreamVerdict`] of each stream, for the HTTP API (`/api/streams`, the page);
/// MQTT has the same as retained messages. At most [`VerdictBoard::MAX`] streams (a stream's
/// entry goes when the stream is removed).
#[derive(Debug, Default)]
pub struct VerdictBoard {
    map: std::sync::Mutex<BTreeMap<String, StreamVerdict>>,
}

impl VerdictBoard {
    pub const MAX: usize = 4096;

    pub fn set(&self, verdict: &StreamVerdict) {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let stream = verdict.stream.as_str();
        if m.len() >= Self::MAX && !m.contains_key(stream) {
            return;
        }
        m.insert(stream.to_string(), verdict.clone());
    }

    pub fn get(&self, stream: &str) -> Option<StreamVerdict> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(stream)
            .cloned()
    }

    pub fn remove(&self, stream: &str) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(stream);
    }
}

/// Per-track bookkeeping the payload needs beyond the evidence state.
#[derive(Debug, Clone, Copy)]
struct TrackNote {
    last_capture: SystemTime,
    mean_quality: f32,
    seen: u32,
}

/// The strongest face of a track on a stream that stores media.
struct Held {
    media: AlertMedia,
    /// Stronger than what the store was last given.
    fresh: bool,
}

/// Frames held for snapshots unless [`Decider::set_held_frames`] says otherwise.
pub const DEFAULT_HELD_FRAMES: usize = 32;

/// The sans-IO decision stage for any number of streams.
pub struct Decider {
    node: NodeId,
    scoring: Scoring,
    evidence: Evidence,
    ids: UlidGenerator,
    metrics: Arc<AnalysisMetrics>,
    notes: HashMap<(StreamId, TrackId), TrackNote>,
    verdicts: BTreeMap<StreamId, BTreeMap<TrackId, Verdict>>,
    open: BTreeMap<StreamId, BTreeMap<TrackId, String>>,
    /// The last summary published per stream (published again only when it changes).
    published: HashMap<StreamId, StreamVerdict>,
    /// Per track of a `store_media` stream: the frame of its strongest face, at most
    /// `max_held` of them (a frame is megabytes).
    held: HashMap<(StreamId, TrackId), Held>,
    max_held: usize,
}

fn verdict_str(v: Verdict) -> &'static str {
    match v {
        Verdict::Fake => "fake",
        Verdict::Real => "real",
        Verdict::Uncertain => "uncertain",
    }
}

impl Decider {
    /// `ids` makes alert ids (seed it in tests for reproducible ids).
    pub fn new(
        node: NodeId,
        scoring: Scoring,
        evidence: EvidenceConfig,
        metrics: Arc<AnalysisMetrics>,
        ids: UlidGenerator,
    ) -> Self {
        Decider {
            node,
            evidence: Evidence::new(evidence, scoring.levels()),
            scoring,
            ids,
            metrics,
            notes: HashMap::new(),
            verdicts: BTreeMap::new(),
            open: BTreeMap::new(),
            published: HashMap::new(),
            held: HashMap::new(),
            max_held: DEFAULT_HELD_FRAMES,
        }
    }

    /// How many frames may be held for snapshots (`[events] held_frames`).
    pub fn set_held_frames(&mut self, n: usize) {
        self.max_held = n.max(1);
    }

    #[cfg(test)]
    pub fn model(&self) -> &ModelInfo {
        &self.scoring.model
    }

    /// The current verdict of a track, if it has one.
    // Read by `analyze` (which needs GStreamer) and the tests.
    #[cfg_attr(not(feature = "gstreamer"), allow(dead_code))]
    pub fn verdict(&self, stream: &StreamId, track: TrackId) -> Option<Verdict> {
        self.evidence.verdict(stream, track)
    }

    /// One embedding: scored, added to its track's evidence; returns any alert event and the
    /// stream's summary when it changed. `wall` is the clock for alert ids and payloads.
    pub fn on_embedding(&mut self, item: Embedded<FaceMeta>, wall: SystemTime) -> Vec<Output> {
        self.metrics.batch_size.observe(item.batch_size as f64);
        let meta = item.meta;
        let score = match self.scoring.scorer.score(&item.embedding) {
            Ok(s) => s,
            Err(e) => {
                self.metrics.score_errors.inc();
                tracing::warn!(stream = %meta.stream, error = %e, "A face could not be scored.");
                return Vec::new();
            }
        };
        self.on_scored(meta, score, wall)
    }

    /// One face already scored (by this decider's scorer): what [`Decider::on_embedding`]
    /// does after scoring. `dfwatch calibrate` replays recorded faces through it.
    pub fn on_scored(
        &mut self,
        meta: FaceMeta,
        score: crate::score::FaceScore,
        wall: SystemTime,
    ) -> Vec<Output> {
        meta.metrics.faces_scored.inc();
        let key = (meta.stream.clone(), meta.track);
        let note = self.notes.entry(key).or_insert(TrackNote {
            last_capture: meta.capture_time,
            mean_quality: meta.quality,
            seen: 0,
        });
        note.seen += 1;
        note.last_capture = meta.capture_time;
        note.mean_quality += (meta.quality - note.mean_quality) / note.seen.min(32) as f32;
        let obs = Observation {
            stream: meta.stream.clone(),
            track: meta.track,
            at: meta.mono,
            capture_time: meta.capture_time,
            pts: meta.pts,
            bbox: meta.bbox,
            logit_q0: score.logit_q0,
            marginals: score.marginals,
            quality: meta.quality,
        };
        let mut out = Vec::new();
        let mut crop = meta.crop;
        if let Some(frame) = meta.frame {
            self.hold(
                &meta.stream,
                meta.track,
                score.logit_q0,
                frame,
                meta.bbox,
                &crop,
            );
        }
        if let Some(ev) = self.evidence.observe(obs, wall, &mut self.ids) {
            // Present only for streams that opted in (publish_face_crops).
            let crop = if ev.kind == AlertKind::New && meta.publish_crop {
                crop.take()
            } else {
                None
            };
            self.dress(ev, crop, wall, &mut out);
        }
        if let Some(v) = self.evidence.verdict(&meta.stream, meta.track) {
            self.verdicts
                .entry(meta.stream.clone())
                .or_default()
                .insert(meta.track, v);
        }
        self.summarise(&meta.stream, &mut out);
        out
    }

    /// A face stage's event, in order with its faces.
    pub fn on_face_event(&mut self, ev: FaceEvent, wall: SystemTime) -> Vec<Output> {
        match ev {
            FaceEvent::TrackEnded { stream, track } => self.on_track_end(&stream, track, wall),
            FaceEvent::StreamEnded { stream } => self.on_stream_removed(&stream, wall),
        }
    }

    /// A track ended: its open alert ends (`track_lost`) and the track is forgotten.
    pub fn on_track_end(
        &mut self,
        stream: &StreamId,
        track: TrackId,
        wall: SystemTime,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        if let Some(ev) = self.evidence.track_lost(stream, track) {
            self.dress(ev, None, wall, &mut out);
        }
        self.notes.remove(&(stream.clone(), track));
        self.held.remove(&(stream.clone(), track));
        self.count_held();
        if let Some(v) = self.verdicts.get_mut(stream) {
            v.remove(&track);
        }
        self.summarise(stream, &mut out);
        out
    }

    /// A stream's face stage stopped (removed, restarted, shutdown): its open alerts end
    /// (`stream_stopped`) and its tracks are forgotten.
    pub fn on_stream_removed(&mut self, stream: &StreamId, wall: SystemTime) -> Vec<Output> {
        let mut out = Vec::new();
        for ev in self
            .evidence
            .end_all(Some(stream), EndReason::StreamStopped)
        {
            self.dress(ev, None, wall, &mut out);
        }
        self.notes.retain(|(s, _), _| s != stream);
        self.held.retain(|(s, _), _| s != stream);
        self.count_held();
        self.verdicts.remove(stream);
        self.open.remove(stream);
        self.published.remove(stream);
        out
    }

    /// A new model: every open alert ends (`model_swapped`), every track starts afresh under
    /// the new scorer.
    pub fn on_model_swap(&mut self, scoring: Scoring, wall: SystemTime) -> Vec<Output> {
        let mut out = Vec::new();
        for ev in self.evidence.end_all(None, EndReason::ModelSwapped) {
            self.dress(ev, None, wall, &mut out);
        }
        self.notes.clear();
        self.held.clear();
        self.count_held();
        self.verdicts.clear();
        self.evidence = Evidence::new(self.evidence.config().clone(), scoring.levels());
        self.scoring = scoring;
        out
    }

    /// New decision thresholds for every track from now on.
    pub fn set_evidence(&mut self, cfg: EvidenceConfig) {
        self.evidence.set_config(cfg);
    }

    /// The daemon stops: every open alert ends (`stream_stopped`).
    pub fn finish(&mut self, wall: SystemTime) -> Vec<Output> {
        let mut out = Vec::new();
        for ev in self.evidence.end_all(None, EndReason::StreamStopped) {
            self.dress(ev, None, wall, &mut out);
        }
        out
    }

    /// Keeps the face's frame when it is its track's strongest so far (and a frame may be
    /// held).
    fn hold(
        &mut self,
        stream: &StreamId,
        track: TrackId,
        logit: f64,
        frame: Arc<crate::types::Frame>,
        bbox: crate::types::BBox,
        crop: &Option<Vec<u8>>,
    ) {
        let media = || AlertMedia {
            frame,
            bbox,
            crop: crop.as_ref().map(|c| {
                let size = (c.len() as f64 / 3.0).sqrt() as usize;
                (c.clone(), size)
            }),
            logit,
        };
        let key = (stream.clone(), track);
        let room = self.held.len() < self.max_held;
        match self.held.get_mut(&key) {
            Some(h) if logit > h.media.logit => {
                h.media = media();
                h.fresh = true;
            }
            Some(_) => {}
            None if room => {
                self.held.insert(
                    key,
                    Held {
                        media: media(),
                        fresh: true,
                    },
                );
                self.count_held();
            }
            None => self.metrics.held_frames_refused.inc(),
        }
    }

    fn count_held(&self) {
        self.metrics
            .held_frames
            .store(self.held.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Dresses an evidence event as a payload, counts it and tracks the open alerts.
    fn dress(
        &mut self,
        ev: AlertEvent,
        crop: Option<Vec<u8>>,
        wall: SystemTime,
        out: &mut Vec<Output>,
    ) {
        let note = self.notes.get(&(ev.stream.clone(), ev.track));
        let payload = AlertPayload::from_event(
            &ev,
            &self.node,
            self.scoring.scorer.graph(),
            &self.scoring.model,
            note.map(|n| n.last_capture).unwrap_or(wall),
            note.map(|n| n.mean_quality).unwrap_or(0.0),
            wall,
        );
        let kind = ev.kind.change().as_str();
        let verdict = verdict_str(ev.verdict);
        self.metrics.count_alert(kind, verdict);
        let id = ev.alert_id.to_string();
        match ev.kind {
            AlertKind::End { .. } => {
                if let Some(m) = self.open.get_mut(&ev.stream) {
                    m.remove(&ev.track);
                }
            }
            _ => {
                self.open
                    .entry(ev.stream.clone())
                    .or_default()
                    .insert(ev.track, id.clone());
            }
        }
        tracing::info!(
            stream = %ev.stream,
            track = ev.track.0,
            alert_id = %id,
            kind,
            verdict,
            score = format!("{:.3}", ev.score),
            "{}",
            payload.explanation.sentence
        );
        let json = match serde_json::to_vec(&payload) {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(error = %e, "Alert payload could not be serialised.");
                return;
            }
        };
        let face_jpeg = crop.and_then(|rgb| {
            let size = (rgb.len() as f64 / 3.0).sqrt() as usize;
            match crate::crop::encode_jpeg(&rgb, size, 90) {
                Ok(jpeg) => Some(jpeg),
                Err(e) => {
                    tracing::warn!(error = %e, "Face crop not encoded.");
                    None
                }
            }
        });
        // The store gets the strongest face with every new alert (a track can raise a second
        // one after the first cleared), and again when a stronger one came since.
        let is_new = ev.kind == AlertKind::New;
        let media = self
            .held
            .get_mut(&(ev.stream.clone(), ev.track))
            .filter(|h| h.fresh || is_new)
            .map(|h| {
                h.fresh = false;
                h.media.clone()
            });
        out.push(Output::Alert {
            alert_id: id,
            kind: ev.kind,
            stream: ev.stream,
            track: ev.track,
            payload: json,
            verdict,
            sentence: payload.explanation.sentence,
            score: ev.score,
            face_jpeg,
            media,
        });
    }

    /// The stream's summary, when it changed since it was last published.
    fn summarise(&mut self, stream: &StreamId, out: &mut Vec<Output>) {
        let v: Vec<Verdict> = self
            .verdicts
            .get(stream)
            .map(|m| m.values().copied().collect())
            .unwrap_or_default();
        let fake = v.iter().filter(|x| **x == Verdict::Fake).count();
        let verdict = if fake > 0 {
            "fake"
        } else if v.contains(&Verdict::Uncertain) {
            "uncertain"
        } else if v.is_empty() {
            "none"
        } else {
            "real"
        };
        let summary = StreamVerdict {
            stream: stream.clone(),
            verdict,
            tracks: v.len(),
            fake_tracks: fake,
            open_alerts: self
                .open
                .get(stream)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default(),
            model_trained: self.scoring.model.trained,
            score: self
                .verdicts
                .get(stream)
                .into_iter()
                .flat_map(|m| m.keys())
                .filter_map(|t| self.evidence.probability(stream, *t))
                .max_by(f64::total_cmp)
                .map(|p| (p * 100.0).round() / 100.0),
        };
        // Published when anything but the score changes, or the score by 0.05 or more: a
        // retained message per scored face would churn every subscriber.
        if let Some(last) = self.published.get(stream) {
            let moved = match (last.score, summary.score) {
                (Some(a), Some(b)) => (a - b).abs() >= 0.05 - 1e-9,
                (a, b) => a.is_some() != b.is_some(),
            };
            let same_but_score = StreamVerdict {
                score: last.score,
                ..summary.clone()
            } == *last;
            if same_but_score && !moved {
                return;
            }
        }
        out.push(Output::Verdict(summary.clone()));
        self.published.insert(stream.clone(), summary);
    }
}

#[cfg(test)]
mod tests;
