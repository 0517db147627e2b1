//! The analysis graph behind ingest:
//!
//! ```text
//! frames (per stream, drop oldest)
//!   -> face stage: one OS thread per stream (detect every Nth frame, track, crop, quality,
//!      normalise)                                  -> encode queue (shared, drop oldest)
//!   -> encoder: one OS thread, batches by size or deadline on the shared ONNX thread pool
//!                                                  -> embeddings (bounded, blocks the encoder)
//!   -> decision: one tokio task (score, evidence, alert payloads) -> publisher (back-pressure)
//! ```
//!
//! Face stages never block on the encoder: a full encode queue evicts its oldest crop (counted
//! per stream), and the tracker schedules that face again at its next cadence. The decision
//! task hands alerts to the publisher without waiting for each fsync; the publisher's queue
//! applies back-pressure when the disk cannot keep up.
//!
//! Track ends travel beside the embeddings (a control channel), so the decision task may see
//! a track's end before that track's last embeddings: ended tracks are remembered for a while
//! and their late embeddings are counted and ignored, so no alert is reopened for a face that
//! has gone.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use crate::channel::{Receiver, Sender, Sent};
use crate::crop::{self, CropMethod};
use crate::detect::FaceDetector;
use crate::encode::{Embedded, EncodeJob};
use crate::evidence::{AlertEvent, AlertKind, EndReason, Evidence, Observation, Verdict};
use crate::metrics::{BATCH_BUCKETS, Counter, Histogram, LATENCY_BUCKETS};
use crate::publish::mqtt::PublisherHandle;
use crate::publish::payload::{AlertPayload, ModelInfo};
use crate::score::Scorer;
use crate::track::{TrackConfig, TrackEvent, Tracker};
use crate::types::{BBox, Frame, NodeId, StreamId, TrackId};

/// Counters of one stream's analysis.
#[derive(Debug, Default)]
pub struct StreamMetrics {
    pub frames_analysed: Counter,
    pub detector_runs: Counter,
    pub detector_errors: Counter,
    pub faces_detected: Counter,
    /// Faces the tracker asked to have scored.
    pub faces_due: Counter,
    /// Due faces that could not be cropped (degenerate landmarks, wrong pixel format).
    pub faces_crop_failed: Counter,
    /// Due faces evicted from the full encode queue.
    pub faces_dropped_encode_queue: Counter,
    pub faces_scored: Counter,
    /// Embeddings that arrived after their track had ended.
    pub faces_late: Counter,
    pub tracks_live: AtomicU64,
    /// CPU time spent in detection and in crop + quality + normalisation, nanoseconds
    /// (thread CPU time of the face stage).
    pub detect_ns: Counter,
    pub crop_ns: Counter,
}

impl StreamMetrics {
    /// Faces scored / faces due (1 when none were due yet).
    pub fn coverage(&self) -> f64 {
        let due = self.faces_due.get();
        if due == 0 {
            1.0
        } else {
            self.faces_scored.get() as f64 / due as f64
        }
    }
}

/// Counters of the shared stages.
#[derive(Debug)]
pub struct AnalysisMetrics {
    pub batch_size: Histogram,
    pub inference_seconds: Histogram,
    /// From a frame leaving the decoder to its face's score being decided (and any alert
    /// handed to the publisher).
    pub decode_to_publish_seconds: Histogram,
    pub score_errors: Counter,
    /// Alerts by (type, verdict).
    pub alerts: std::sync::Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl Default for AnalysisMetrics {
    fn default() -> Self {
        AnalysisMetrics {
            batch_size: Histogram::new(BATCH_BUCKETS),
            inference_seconds: Histogram::new(LATENCY_BUCKETS),
            decode_to_publish_seconds: Histogram::new(LATENCY_BUCKETS),
            score_errors: Counter::default(),
            alerts: Default::default(),
        }
    }
}

/// What travels with each crop through the encoder.
#[derive(Debug)]
pub struct FaceMeta {
    pub stream: StreamId,
    pub track: TrackId,
    pub mono: Instant,
    pub capture_time: SystemTime,
    pub pts: Option<Duration>,
    pub bbox: BBox,
    /// `crop::quality::weight`.
    pub quality: f32,
    /// The RGB crop, kept only for streams that publish face crops.
    pub crop: Option<Vec<u8>>,
    pub metrics: Arc<StreamMetrics>,
}

/// Messages to the decision task beside the embeddings.
#[derive(Debug)]
pub enum Control {
    TrackLost {
        stream: StreamId,
        track: TrackId,
    },
    /// The stream was removed or the daemon stops: its open alerts end.
    StreamStopped(StreamId),
    /// A new model: every open evidence window ends and the scorer is replaced; `done` is
    /// answered once every embedding of the old model that was queued is scored.
    ModelSwapped {
        scoring: Box<Scoring>,
        levels: Vec<crate::score::Level>,
        done: tokio::sync::oneshot::Sender<()>,
    },
    /// New decision thresholds.
    Evidence(crate::evidence::EvidenceConfig),
}

/// How a stream's face stage crops and normalises.
#[derive(Debug, Clone)]
pub struct CropSpec {
    pub size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub method: CropMethod,
}

/// Per-thread CPU time (for the stage breakdown of `bench e2e`).
fn thread_cpu_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// A pre-crop quality for the tracker's cadence: face size and frontalness (blur needs the
/// crop, which exists only for due faces).
pub(crate) fn quick_quality(d: &crate::detect::Detection) -> f32 {
    let size = (d.bbox.width().min(d.bbox.height()) / 112.0).clamp(0.0, 1.0);
    match crop::align::sjedd_alignment(&d.landmarks) {
        Some(a) => size * crop::quality::frontalness(&a, &d.landmarks),
        None => 0.0,
    }
}

/// Everything a face stage needs.
pub struct FaceStage {
    pub stream: StreamId,
    pub frames: Receiver<Frame>,
    pub detector: FaceDetector,
    pub track: TrackConfig,
    /// The stream's analysis rate (the tracker's cadence is in whole frames of it).
    pub fps: f64,
    pub crop: CropSpec,
    pub keep_crops: bool,
    pub encode: Sender<EncodeJob<FaceMeta>>,
    pub control: mpsc::UnboundedSender<Control>,
    pub metrics: Arc<StreamMetrics>,
    /// Set when the stream is removed: the stage ends within 100 ms.
    pub stop: Arc<std::sync::atomic::AtomicBool>,
}

impl FaceStage {
    /// Runs on a thread of its own until the frame channel closes (the stream stopped);
    /// then ends the stream's tracks.
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("faces-{}", self.stream))
            .spawn(move || self.run())
    }

    fn run(mut self) {
        let mut tracker = Tracker::new(self.track.clone(), self.fps);
        let every = self.track.detect_every.max(1) as u64;
        let mut n = 0u64;
        let mut pixels = Vec::new();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let frame = match self.frames.recv_timeout(Duration::from_millis(100)) {
                Ok(f) => f,
                Err(crate::channel::RecvTimeoutError::Timeout) => continue,
                Err(_) => break,
            };
            let m = &self.metrics;
            m.frames_analysed.inc();
            let now = frame.mono;
            let (faces, events) = if n % every == 0 {
                let t0 = thread_cpu_ns();
                let found = self.detector.detect_frame(&frame);
                m.detect_ns.add(thread_cpu_ns().saturating_sub(t0));
                m.detector_runs.inc();
                match found {
                    Ok(dets) => {
                        m.faces_detected.add(dets.len() as u64);
                        let with_q: Vec<_> = dets.iter().map(|d| (*d, quick_quality(d))).collect();
                        tracker.update(&with_q, now)
                    }
                    Err(e) => {
                        let errors = m.detector_errors.get();
                        m.detector_errors.inc();
                        if errors.is_power_of_two() || errors == 0 {
                            tracing::warn!(stream = %self.stream, error = %e, errors = errors + 1, "Face detection failed on a frame.");
                        }
                        tracker.predict(now)
                    }
                }
            } else {
                tracker.predict(now)
            };
            n += 1;
            self.report_lost(events);
            m.tracks_live.store(tracker.len() as u64, Ordering::Relaxed);
            let frame = Arc::new(frame);
            for face in faces.iter().filter(|f| f.due) {
                m.faces_due.inc();
                let t0 = thread_cpu_ns();
                let job = self.prepare(&frame, face, &mut pixels);
                m.crop_ns.add(thread_cpu_ns().saturating_sub(t0));
                let Some(job) = job else {
                    m.faces_crop_failed.inc();
                    continue;
                };
                match self.encode.send(job) {
                    Ok(Sent::Queued) => {}
                    Ok(Sent::DroppedOldest(old)) | Ok(Sent::DroppedNewest(old)) => {
                        old.meta.metrics.faces_dropped_encode_queue.inc();
                    }
                    Err(_) => return, // the encoder is gone: shutting down
                }
            }
        }
        self.report_lost(tracker.clear());
        self.metrics.tracks_live.store(0, Ordering::Relaxed);
    }

    /// Tells the decision task about every track that ended.
    fn report_lost(&self, events: Vec<TrackEvent>) {
        for ev in events {
            if let TrackEvent::Lost(track) = ev {
                let _ = self.control.send(Control::TrackLost {
                    stream: self.stream.clone(),
                    track,
                });
            }
        }
    }

    fn prepare(
        &self,
        frame: &Frame,
        face: &crate::track::TrackedFace,
        pixels: &mut Vec<f32>,
    ) -> Option<EncodeJob<FaceMeta>> {
        let c = &self.crop;
        let cropped = match crop::crop_face(frame, &face.landmarks, c.size, c.method) {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(stream = %self.stream, track = face.track.0, error = %e, "Face not cropped.");
                return None;
            }
        };
        let q = crop::quality::measure(
            &face.bbox,
            &face.landmarks,
            &cropped.alignment,
            &cropped.rgb,
            c.size,
        );
        pixels.clear();
        pixels.resize(3 * c.size * c.size, 0.0);
        crate::encode::normalise_rgb(&cropped.rgb, c.size, c.mean, c.std, pixels);
        Some(EncodeJob {
            pixels: std::mem::take(pixels),
            meta: FaceMeta {
                stream: self.stream.clone(),
                track: face.track,
                mono: frame.mono,
                capture_time: frame.capture_time,
                pts: frame.pts,
                bbox: face.bbox,
                quality: crop::quality::weight(&q),
                crop: self.keep_crops.then_some(cropped.rgb),
                metrics: self.metrics.clone(),
            },
        })
    }
}

/// The model as the decision task uses it.
#[derive(Debug)]
pub struct Scoring {
    pub scorer: Scorer,
    pub model: ModelInfo,
}

/// Per-track bookkeeping the payload needs beyond the evidence state.
#[derive(Debug, Clone, Copy)]
struct TrackNote {
    last_capture: SystemTime,
    mean_quality: f32,
    seen: u32,
}

/// The retained per-stream summary on `<prefix>/<node>/streams/<id>/verdict`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StreamVerdict {
    pub stream: String,
    /// `fake` when any live track is fake, else `uncertain` when any is, else `real` when
    /// any track has a verdict, else `none`.
    pub verdict: &'static str,
    pub tracks: usize,
    pub fake_tracks: usize,
    pub open_alerts: Vec<String>,
    pub model_trained: bool,
}

/// The decision task: scores embeddings, keeps evidence, hands alerts to the publisher.
pub struct Decision {
    pub node: NodeId,
    pub scoring: Scoring,
    pub evidence: Evidence,
    pub publisher: Arc<PublisherHandle>,
    pub metrics: Arc<AnalysisMetrics>,
}

/// How long an ended track is remembered to ignore its late embeddings.
const LOST_MEMORY: Duration = Duration::from_secs(120);

impl Decision {
    /// Runs until both inputs close; then ends every open alert (`stream_stopped`).
    pub async fn run(
        mut self,
        embeddings: Receiver<Embedded<FaceMeta>>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let mut notes: HashMap<(StreamId, TrackId), TrackNote> = HashMap::new();
        let mut lost: HashMap<(StreamId, TrackId), Instant> = HashMap::new();
        let mut verdicts: BTreeMap<StreamId, BTreeMap<TrackId, Verdict>> = BTreeMap::new();
        let mut open: BTreeMap<StreamId, BTreeMap<TrackId, String>> = BTreeMap::new();
        let mut published: HashMap<StreamId, StreamVerdict> = HashMap::new();
        let mut ids = crate::evidence::UlidGenerator::new();
        let mut control_open = true;
        let mut late_old_model = 0u64;
        loop {
            let mut touched: Option<StreamId> = None;
            let mut events: Vec<(AlertEvent, Option<Vec<u8>>)> = Vec::new();
            tokio::select! {
                // Embeddings first: a track's end and a model swap come after the faces
                // already queued.
                biased;
                item = embeddings.recv_async() => {
                    let Some(item) = item else { break };
                    let meta = &item.meta;
                    self.metrics.batch_size.observe(item.batch_size as f64);
                    let key = (meta.stream.clone(), meta.track);
                    if lost.contains_key(&key) {
                        meta.metrics.faces_late.inc();
                        continue;
                    }
                    let score = match self.scoring.scorer.score(&item.embedding) {
                        Ok(s) => s,
                        Err(e) => {
                            self.metrics.score_errors.inc();
                            tracing::warn!(stream = %meta.stream, error = %e, "A face could not be scored.");
                            continue;
                        }
                    };
                    meta.metrics.faces_scored.inc();
                    let note = notes.entry(key.clone()).or_insert(TrackNote {
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
                    if let Some(ev) = self.evidence.observe(obs, SystemTime::now(), &mut ids) {
                        let crop = match ev.kind {
                            // Present only for streams that opted in (publish_face_crops).
                            AlertKind::New => item.meta.crop.clone(),
                            _ => None,
                        };
                        events.push((ev, crop));
                    }
                    if let Some(v) = self.evidence.verdict(&meta.stream, meta.track) {
                        verdicts.entry(meta.stream.clone()).or_default().insert(meta.track, v);
                    }
                    touched = Some(meta.stream.clone());
                    // Measured once the alert (if any) is handed over, below.
                    let mono = meta.mono;
                    self.hand_over(&mut events, &notes, &mut open).await;
                    self.metrics.decode_to_publish_seconds.observe_duration(mono.elapsed());
                }
                msg = control.recv(), if control_open => {
                    let Some(msg) = msg else {
                        control_open = false;
                        continue;
                    };
                    match msg {
                        Control::TrackLost { stream, track } => {
                            let key = (stream.clone(), track);
                            if let Some(ev) = self.evidence.track_lost(&stream, track) {
                                events.push((ev, None));
                            }
                            self.hand_over(&mut events, &notes, &mut open).await;
                            notes.remove(&key);
                            if let Some(v) = verdicts.get_mut(&stream) {
                                v.remove(&track);
                            }
                            lost.insert(key, Instant::now());
                            touched = Some(stream);
                        }
                        Control::StreamStopped(stream) => {
                            for ev in self.evidence.end_all(Some(&stream), EndReason::StreamStopped) {
                                events.push((ev, None));
                            }
                            self.hand_over(&mut events, &notes, &mut open).await;
                            notes.retain(|(s, _), _| *s != stream);
                            verdicts.remove(&stream);
                            published.remove(&stream);
                        }
                        Control::ModelSwapped { scoring, levels, done } => {
                            // The old encoder has stopped and biased polling took its queued
                            // embeddings first; anything left is counted and dropped.
                            while let Some(item) = embeddings.try_recv() {
                                self.metrics.batch_size.observe(item.batch_size as f64);
                                late_old_model += 1;
                                drop(item);
                            }
                            for ev in self.evidence.end_all(None, EndReason::ModelSwapped) {
                                events.push((ev, None));
                            }
                            self.hand_over(&mut events, &notes, &mut open).await;
                            notes.clear();
                            verdicts.clear();
                            tracing::info!(model = %scoring.model.name, sha256 = %scoring.model.manifest_sha256, dropped_old_model_faces = late_old_model, "Model swapped in; open evidence windows ended.");
                            late_old_model = 0;
                            let cfg = self.evidence.config().clone();
                            self.evidence = Evidence::new(cfg, levels);
                            self.scoring = *scoring;
                            let _ = done.send(());
                        }
                        Control::Evidence(cfg) => {
                            self.evidence.set_config(cfg);
                            tracing::info!("Evidence thresholds updated.");
                        }
                    }
                }
            }
            let cutoff = Instant::now();
            lost.retain(|_, at| cutoff.saturating_duration_since(*at) < LOST_MEMORY);
            if let Some(stream) = touched {
                let summary = self.summary(&stream, verdicts.get(&stream), open.get(&stream));
                if published.get(&stream) != Some(&summary) {
                    let json = serde_json::to_vec(&summary).unwrap_or_default();
                    let _ = self
                        .publisher
                        .publish_retained(&format!("streams/{stream}/verdict"), json)
                        .await;
                    published.insert(stream, summary);
                }
            }
        }
        let mut events: Vec<(AlertEvent, Option<Vec<u8>>)> = self
            .evidence
            .end_all(None, EndReason::StreamStopped)
            .into_iter()
            .map(|e| (e, None))
            .collect();
        self.hand_over(&mut events, &notes, &mut open).await;
    }

    fn summary(
        &self,
        stream: &StreamId,
        verdicts: Option<&BTreeMap<TrackId, Verdict>>,
        open: Option<&BTreeMap<TrackId, String>>,
    ) -> StreamVerdict {
        let v: Vec<Verdict> = verdicts
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
        StreamVerdict {
            stream: stream.to_string(),
            verdict,
            tracks: v.len(),
            fake_tracks: fake,
            open_alerts: open
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default(),
            model_trained: self.scoring.model.trained,
        }
    }

    /// Dresses events as payloads and hands them to the publisher in order (waiting only for
    /// room in its queue, not for the fsync).
    async fn hand_over(
        &self,
        events: &mut Vec<(AlertEvent, Option<Vec<u8>>)>,
        notes: &HashMap<(StreamId, TrackId), TrackNote>,
        open: &mut BTreeMap<StreamId, BTreeMap<TrackId, String>>,
    ) {
        for (ev, crop) in events.drain(..) {
            let note = notes.get(&(ev.stream.clone(), ev.track));
            let now = SystemTime::now();
            let payload = AlertPayload::from_event(
                &ev,
                &self.node,
                self.scoring.scorer.graph(),
                &self.scoring.model,
                note.map(|n| n.last_capture).unwrap_or(now),
                note.map(|n| n.mean_quality).unwrap_or(0.0),
                now,
            );
            let (kind, update) = match ev.kind {
                AlertKind::New => ("new", false),
                AlertKind::Update => ("update", true),
                AlertKind::End { .. } => ("end", false),
            };
            let verdict = match ev.verdict {
                Verdict::Fake => "fake",
                Verdict::Real => "real",
                Verdict::Uncertain => "uncertain",
            };
            *self
                .metrics
                .alerts
                .lock()
                .expect("alerts counter lock")
                .entry((kind, verdict))
                .or_default() += 1;
            let id = ev.alert_id.to_string();
            match ev.kind {
                AlertKind::End { .. } => {
                    if let Some(m) = open.get_mut(&ev.stream) {
                        m.remove(&ev.track);
                    }
                }
                _ => {
                    open.entry(ev.stream.clone())
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
                    continue;
                }
            };
            if let Err(e) = self.publisher.enqueue_alert(&id, update, json).await {
                tracing::error!(alert_id = %id, error = %e, "Alert not handed to the publisher.");
            }
            if let Some(rgb) = crop {
                let size = (rgb.len() as f64 / 3.0).sqrt() as usize;
                match crop::encode_jpeg(&rgb, size, 90) {
                    Ok(jpeg) => {
                        tracing::debug!(alert_id = %id, bytes = jpeg.len(), "Face crop handed to the publisher.");
                        let _ = self.publisher.publish_face_crop(&id, jpeg).await;
                    }
                    Err(e) => tracing::warn!(error = %e, "Face crop not encoded."),
                }
            }
        }
    }
}
