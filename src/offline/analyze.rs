//! `dfwatch analyze FILE|URL --model DIR`: an offline verdict for one video.
//!
//! Two readings of the same frames:
//! - the paper's protocol: `frames` evenly spaced frames (64 by default), the largest face of
//!   each scored, the video's score is the mean q0 over the frames where a face was found, fake
//!   at 0.5 and above; the explanation comes from the mean marginals of those faces;
//! - the daemon's own rules: every face goes through the daemon's own chain (the tracker,
//!   [`prepare_face`], the [`Decider`] with `[track]`, `[evidence]` of `--config`, or their
//!   defaults) on the frames' real time line
//!   (compressed to a third of `track.patience` per frame when the sampling is sparser, so a
//!   face is not lost between two samples); each track's verdict and the alert events it would
//!   have raised are listed. Sparse samples of a moving face can split it into several tracks.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use serde::Serialize;

use super::score_images::ModelIdentity;
use crate::config::Config;
use crate::decide::{Decider, Output};
use crate::detect::FaceDetector;
use crate::encode::Embedded;
use crate::encode::FaceInput;
use crate::evidence::{AlertKind, UlidGenerator, Verdict};
use crate::faces::{prepare_face, quick_quality};
use crate::metrics::{AnalysisMetrics, StreamMetrics};
use crate::score::{Explanation, FaceScore};
use crate::track::Tracker;
use crate::types::{BBox, FaceMeta, NodeId, StreamId, TrackId};

/// One sampled frame.
#[derive(Debug, Clone, Serialize)]
pub struct FrameResult {
    pub index: usize,
    pub pts_ms: Option<u64>,
    pub faces: usize,
    /// q0 of the frame's largest face (the paper's per-frame score).
    pub q0: Option<f64>,
    pub bbox: Option<BBox>,
    /// Quality weight of that face's crop (0..1).
    pub quality: Option<f32>,
}

/// One track under the daemon's rules.
#[derive(Debug, Clone, Serialize)]
pub struct TrackResult {
    pub track_id: u64,
    pub faces_scored: usize,
    pub mean_q0: f64,
    /// `fake`, `real`, `uncertain`, or `undecided` (too few faces for the evidence rule).
    pub verdict: String,
    /// Alert events the daemon would have published, in order (`new`, `update`, `end`).
    pub alert_events: Vec<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct AnalyzeReport {
    pub input: String,
    pub duration_s: f64,
    pub width: u32,
    pub height: u32,
    pub frames_requested: usize,
    pub frames_decoded: usize,
    pub frames_with_face: usize,
    pub model: ModelIdentity,
    /// `fake`, `real`, or `no_face`.
    pub verdict: String,
    /// Mean q0 over the frames with a face (the paper's video-level score).
    pub score: Option<f64>,
    pub threshold: f64,
    pub explanation: Option<Explanation>,
    pub frames: Vec<FrameResult>,
    pub tracks: Vec<TrackResult>,
}

/// Runs the analysis; `progress` is told each frame done.
pub fn analyze(
    input: &str,
    model_dir: &Path,
    frames: usize,
    config: &Config,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<AnalyzeReport> {
    anyhow::ensure!(frames > 0, "--frames must be at least 1");
    crate::onnx::init(&config.onnx).context("ONNX Runtime ([onnx] library)")?;
    // Offline analysis runs the CPU engine whatever the config's backend.
    let mut model = crate::app::load_model(model_dir, crate::app::EngineChoice::cpu())?;
    let mut detector = FaceDetector::load(&config.detect, &config.base_dir)
        .context("face detector ([detect] model_dir; run ./tools/setup.sh)")?;
    let cwd = std::env::current_dir().context("the working directory")?;
    let video = crate::ingest::sample::sample_frames(input, &cwd, frames)
        .with_context(|| format!("reading {}", crate::ingest::source::redact_known(input)))?;
    // The paper's per-frame score uses the same scorer as the decider.
    let scorer = model.scoring.scorer.clone();
    let graph = scorer.graph().clone();
    let identity = model.scoring.model.clone();
    let spec = model.crop.clone();
    // The frames' real spacing, unless it is so sparse that every track would time out
    // between two frames: then the time line is compressed to a third of the patience.
    let spacing = video.duration.div_f64(frames as f64);
    let step = spacing.min(config.track.patience / 3);
    let mut tracker = Tracker::new(config.track.clone(), 1.0 / step.as_secs_f64().max(1e-3));
    let stream = StreamId::new("analyze").expect("literal id");
    let mut decider = Decider::new(
        NodeId::new("analyze").expect("literal id"),
        model.scoring,
        config.evidence.clone(),
        Arc::new(AnalysisMetrics::default()),
        UlidGenerator::new(),
    );
    let counters = Arc::new(StreamMetrics::default());
    let t0 = Instant::now();
    let wall0 = SystemTime::now();
    let mut per_frame = Vec::with_capacity(video.frames.len());
    let mut largest_scores: Vec<FaceScore> = Vec::new();
    let mut tracks: BTreeMap<u64, (usize, f64, Vec<String>)> = BTreeMap::new();
    let total = video.frames.len();
    let mut pixels = Vec::new();
    for (i, frame) in video.frames.iter().enumerate() {
        let at = t0 + step * i as u32;
        let dets = detector.detect_frame(frame)?;
        let with_q: Vec<_> = dets.iter().map(|d| (*d, quick_quality(d))).collect();
        let (faces, _) = tracker.update(&with_q, at);
        // One face through the daemon's chain: crop, quality, normalise, encode.
        let mut embed = |bbox: &BBox, landmarks: &[[f32; 2]; 5]| -> Option<(Vec<f32>, f32)> {
            let p =
                prepare_face(frame, bbox, landmarks, &spec, std::mem::take(&mut pixels)).ok()?;
            let input = FaceInput::Pixels(p.pixels);
            let emb = model.encoder.encode_inputs(&[&input]).ok();
            if let FaceInput::Pixels(v) = input {
                pixels = v;
            }
            Some((emb?, p.quality))
        };
        let mut best: Option<(f64, BBox, f32)> = None;
        // Tracked faces (born tracks) go to the decider; the largest detection is the paper's.
        let largest = dets
            .iter()
            .max_by(|a, b| a.bbox.area().total_cmp(&b.bbox.area()));
        if let Some(d) = largest
            && let Some((emb, quality)) = embed(&d.bbox, &d.landmarks)
            && let Ok(s) = scorer.score(&emb)
        {
            best = Some((s.q0, d.bbox, quality));
            largest_scores.push(s);
        }
        for f in &faces {
            let Some((emb, quality)) = embed(&f.bbox, &f.landmarks) else {
                continue;
            };
            let Ok(s) = scorer.score(&emb) else {
                continue;
            };
            let entry = tracks.entry(f.track.0).or_default();
            entry.0 += 1;
            entry.1 += s.q0;
            let item = Embedded {
                meta: FaceMeta {
                    stream: stream.clone(),
                    track: f.track,
                    mono: at,
                    capture_time: wall0 + step * i as u32,
                    pts: frame.pts,
                    bbox: f.bbox,
                    quality,
                    crop: None,
                    publish_crop: false,
                    frame: None,
                    metrics: counters.clone(),
                },
                embedding: emb,
                batch_size: 1,
                batch_time: Duration::ZERO,
            };
            record(&mut tracks, decider.on_embedding(item, SystemTime::now()));
        }
        per_frame.push(FrameResult {
            index: i,
            pts_ms: frame.pts.map(|p| p.as_millis() as u64),
            faces: dets.len(),
            q0: best.map(|b| b.0),
            bbox: best.map(|b| b.1),
            quality: best.map(|b| b.2),
        });
        progress(i + 1, total);
    }
    let verdicts: BTreeMap<u64, Option<Verdict>> = tracks
        .keys()
        .map(|id| (*id, decider.verdict(&stream, TrackId(*id))))
        .collect();
    // The video ends: open alerts end as they would when a stream stops.
    record(&mut tracks, decider.finish(SystemTime::now()));
    let tracks: Vec<TrackResult> = tracks
        .into_iter()
        .map(|(id, (n, sum, events))| {
            let verdict = verdicts
                .get(&id)
                .copied()
                .flatten()
                .map(|v| match v {
                    Verdict::Fake => "fake",
                    Verdict::Real => "real",
                    Verdict::Uncertain => "uncertain",
                })
                .unwrap_or("undecided")
                .to_string();
            TrackResult {
                track_id: id,
                faces_scored: n,
                mean_q0: sum / n.max(1) as f64,
                verdict,
                alert_events: events,
            }
        })
        .collect();
    let with_face = largest_scores.len();
    let (score, explanation) = if with_face == 0 {
        (None, None)
    } else {
        let n = with_face as f64;
        let q0 = largest_scores.iter().map(|s| s.q0).sum::<f64>() / n;
        let k = largest_scores[0].marginals.len();
        let marginals: Vec<f64> = (0..k)
            .map(|j| largest_scores.iter().map(|s| s.marginals[j]).sum::<f64>() / n)
            .collect();
        let mean = FaceScore {
            logits: vec![],
            log_z: 0.0,
            logit_q0: (q0 / (1.0 - q0).max(1e-12)).max(1e-12).ln(),
            q0,
            marginals,
        };
        (Some(q0), Some(Explanation::new(&graph, &mean)))
    };
    let verdict = match score {
        None => "no_face",
        Some(q) if q >= 0.5 => "fake",
        Some(_) => "real",
    };
    let m = &identity;
    Ok(AnalyzeReport {
        input: crate::ingest::source::redact_known(input),
        duration_s: video.duration.as_secs_f64(),
        width: video.width,
        height: video.height,
        frames_requested: frames,
        frames_decoded: total,
        frames_with_face: with_face,
        model: ModelIdentity {
            name: m.name.clone(),
            version: m.version.clone(),
            manifest_sha256: m.manifest_sha256.clone(),
            trained: m.trained,
            backend: "cpu-onnxruntime",
        },
        verdict: verdict.into(),
        score,
        threshold: 0.5,
        explanation,
        frames: per_frame,
        tracks,
    })
}

/// Adds the decider's alert events to their tracks' lists.
fn record(tracks: &mut BTreeMap<u64, (usize, f64, Vec<String>)>, outputs: Vec<Output>) {
    for o in outputs {
        if let Output::Alert { kind, track, .. } = o
            && let Some(t) = tracks.get_mut(&track.0)
        {
            t.2.push(alert_kind(&kind));
        }
    }
}

fn alert_kind(k: &AlertKind) -> String {
    match k {
        AlertKind::New => "new".into(),
        AlertKind::Update => "update".into(),
        AlertKind::End { reason } => format!(
            "end:{}",
            serde_json::to_value(reason)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        ),
    }
}
