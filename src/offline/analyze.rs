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
    /// The mean marginals behind the explanation, in the model's node order.
    #[serde(skip)]
    pub mean_marginals: Option<Vec<f64>>,
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
    Analyzer::new(model_dir, config)?.video(input, frames, Rules::PaperAndDaemon, progress)
}

/// Frames a video may be sampled at (the paper: 32 or 64); each is held decoded.
pub const MAX_FRAMES: usize = 1024;

/// Which readings [`Analyzer::video`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rules {
    /// The paper's protocol only (what `dfwatch eval` needs).
    Paper,
    /// The paper's protocol and the daemon's per-track rules (`dfwatch analyze`).
    PaperAndDaemon,
}

/// The model and detector loaded once, for any number of videos and crops (`analyze` runs one
/// video; `eval` a whole list through the same chain).
pub struct Analyzer {
    model: crate::runtime::LoadedModel,
    detector: FaceDetector,
    config: Config,
    pixels: Vec<f32>,
}

impl Analyzer {
    /// Loads the bundle in `model_dir` (CPU engine, whatever the config's backend) and the
    /// config's detector.
    pub fn new(model_dir: &Path, config: &Config) -> anyhow::Result<Analyzer> {
        crate::onnx::init(&config.onnx).context("ONNX Runtime ([onnx] library)")?;
        let model = crate::runtime::load_model(model_dir, crate::runtime::EngineChoice::cpu())?;
        let detector = FaceDetector::load(&config.detect, &config.base_dir)
            .context("face detector ([detect] model_dir; run ./tools/setup.sh)")?;
        Ok(Analyzer {
            model,
            detector,
            config: config.clone(),
            pixels: Vec::new(),
        })
    }

    /// The model, as reports name it.
    pub fn identity(&self) -> ModelIdentity {
        let m = &self.model.scoring.model;
        ModelIdentity {
            name: m.name.clone(),
            version: m.version.clone(),
            manifest_sha256: m.manifest_sha256.clone(),
            trained: m.trained,
            backend: "cpu-onnxruntime",
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn model(&self) -> &crate::runtime::LoadedModel {
        &self.model
    }

    pub fn model_mut(&mut self) -> &mut crate::runtime::LoadedModel {
        &mut self.model
    }

    pub fn graph(&self) -> &crate::score::LabelGraph {
        self.model.scoring.scorer.graph()
    }

    /// The detector's model, as reports name it (`mtcnn`, `retinaface`).
    pub fn detector_name(&self) -> String {
        format!("{:?}", self.config.detect.model).to_lowercase()
    }

    /// Everything that changes what the detector finds (`[detect]` as JSON), for cache keys.
    pub fn detector_settings(&self) -> String {
        serde_json::to_string(&self.config.detect).unwrap_or_default()
    }

    /// Scores an aligned square face crop (PNG/JPEG) as `dfwatch score` does: brought to the
    /// model's size, normalised, encoded, scored.
    pub fn crop(&mut self, path: &Path) -> anyhow::Result<FaceScore> {
        let spec = &self.model.crop;
        let rgb = super::score_images::load_crop(path, spec.size)?;
        let mut pixels = std::mem::take(&mut self.pixels);
        pixels.clear();
        pixels.resize(3 * spec.size * spec.size, 0.0);
        crate::encode::normalise_rgb(&rgb, spec.size, spec.mean, spec.std, &mut pixels);
        let input = FaceInput::Pixels(pixels);
        let emb = self.model.encoder.encode_inputs(&[&input]);
        if let FaceInput::Pixels(v) = input {
            self.pixels = v;
        }
        let emb = emb.with_context(|| format!("{}: encoding the crop", path.display()))?;
        Ok(self.model.scoring.scorer.score(&emb)?)
    }

    /// One video: `frames` evenly spaced frames under `rules`.
    pub fn video(
        &mut self,
        input: &str,
        frames: usize,
        rules: Rules,
        progress: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<AnalyzeReport> {
        anyhow::ensure!(
            (1..=MAX_FRAMES).contains(&frames),
            "--frames must be 1 to {MAX_FRAMES} (every sampled frame is held decoded)"
        );
        let config = &self.config;
        let cwd = std::env::current_dir().context("the working directory")?;
        let video = crate::ingest::sample::sample_frames(input, &cwd, frames)
            .with_context(|| format!("reading {}", crate::ingest::source::redact_known(input)))?;
        // The paper's per-frame score uses the same scorer as the decider.
        let scorer = self.model.scoring.scorer.clone();
        let graph = scorer.graph().clone();
        let spec = self.model.crop.clone();
        // The frames' real spacing, unless it is so sparse that every track would time out
        // between two frames: then the time line is compressed to a third of the patience.
        let spacing = video.duration.div_f64(frames as f64);
        let step = spacing.min(config.track.patience / 3);
        let mut tracker = Tracker::new(config.track.clone(), 1.0 / step.as_secs_f64().max(1e-3));
        let stream = StreamId::new("analyze").expect("literal id");
        let mut decider = Decider::new(
            NodeId::new("analyze").expect("literal id"),
            self.model.scoring.clone(),
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
        let encoder = &mut self.model.encoder;
        let pixels = &mut self.pixels;
        for (i, frame) in video.frames.iter().enumerate() {
            let at = t0 + step * i as u32;
            let dets = self.detector.detect_frame(frame)?;
            // One face through the daemon's chain: crop, quality, normalise, encode.
            let mut embed = |bbox: &BBox, landmarks: &[[f32; 2]; 5]| -> Option<(Vec<f32>, f32)> {
                let p = prepare_face(frame, bbox, landmarks, &spec, std::mem::take(pixels)).ok()?;
                let input = FaceInput::Pixels(p.pixels);
                let emb = encoder.encode_inputs(&[&input]).ok();
                if let FaceInput::Pixels(v) = input {
                    *pixels = v;
                }
                Some((emb?, p.quality))
            };
            let mut best: Option<(f64, BBox, f32)> = None;
            // Tracked faces (born tracks) go to the decider; the largest detection is the
            // paper's.
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
            if rules == Rules::PaperAndDaemon {
                let with_q: Vec<_> = dets.iter().map(|d| (*d, quick_quality(d))).collect();
                let (faces, _) = tracker.update(&with_q, at);
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
        let mean = mean_score(&largest_scores);
        let score = mean.as_ref().map(|m| m.q0);
        let explanation = mean.as_ref().map(|m| Explanation::new(&graph, m));
        let verdict = match score {
            None => "no_face",
            Some(q) if q >= 0.5 => "fake",
            Some(_) => "real",
        };
        Ok(AnalyzeReport {
            input: crate::ingest::source::redact_known(input),
            duration_s: video.duration.as_secs_f64(),
            width: video.width,
            height: video.height,
            frames_requested: frames,
            frames_decoded: total,
            frames_with_face: with_face,
            model: self.identity(),
            verdict: verdict.into(),
            score,
            threshold: 0.5,
            explanation,
            mean_marginals: mean.map(|m| m.marginals),
            frames: per_frame,
            tracks,
        })
    }
}

/// The mean of each column of equal-length rows (the first row sets the length); `None`
/// without a row.
pub fn column_means<'a>(rows: impl Iterator<Item = &'a [f64]> + Clone) -> Option<Vec<f64>> {
    let width = rows.clone().next()?.len();
    let mut sums = vec![0.0f64; width];
    let mut n = 0usize;
    for row in rows {
        for (s, v) in sums.iter_mut().zip(row) {
            *s += v;
        }
        n += 1;
    }
    Some(sums.into_iter().map(|s| s / n as f64).collect())
}

/// The paper's video-level reading of several faces: mean q0 and mean marginals (`None`
/// without a face). Only `q0`, its logit and the marginals are meaningful in the result.
pub fn mean_score(scores: &[FaceScore]) -> Option<FaceScore> {
    let n = scores.len() as f64;
    let marginals = column_means(scores.iter().map(|s| s.marginals.as_slice()))?;
    let q0 = scores.iter().map(|s| s.q0).sum::<f64>() / n;
    Some(FaceScore {
        logits: vec![],
        log_z: 0.0,
        logit_q0: (q0 / (1.0 - q0).max(1e-12)).max(1e-12).ln(),
        q0,
        marginals,
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
