//! `dfwatch calibrate LIST --model DIR --false-alarms-per-hour X`: the `[evidence]`
//! thresholds that keep false alarms on the user's real feeds within a budget, with the
//! shortest delay to an alert on their fakes.
//!
//! Not the paper's protocol: each video is decoded whole at the config's analysis rate and
//! goes through the daemon's own face stage ([`FaceStage`]: detection every
//! `track.detect_every` frames and around the tracks in between, the tracker and its scoring
//! cadence, the crop), the encoder and the scorer, once; the scored faces and track ends are
//! kept as a [`VideoTrace`] on the video's own time line. Each candidate `[evidence]` (a grid
//! of `enter_fake`, `exit_fake` and `window`, each checked by the same rules as `validate`)
//! then replays the traces through the daemon's [`Decider`]: every `new` alert on a real
//! video is a false alarm; on a fake video, the time from its first scored face to its first
//! `new` alert is the detection delay.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;

use super::analyze::Analyzer;
use super::eval::{Kind, Row};
use crate::channel::FullPolicy;
use crate::config::Config;
use crate::decide::{Decider, Output, Scoring};
use crate::evidence::{AlertKind, EvidenceConfig, UlidGenerator};
use crate::faces::{EncodeItem, FaceStage};
use crate::metrics::{AnalysisMetrics, StreamMetrics};
use crate::score::FaceScore;
use crate::types::{BBox, FaceEvent, FaceMeta, NodeId, StreamId, TrackId};

/// A scored face of a trace.
#[derive(Debug, Clone)]
pub struct TracedFace {
    /// On the video's time line.
    pub t: Duration,
    pub track: u64,
    pub bbox: BBox,
    pub quality: f32,
    pub score: FaceScore,
}

/// What the face stage said, in its order.
#[derive(Debug, Clone)]
pub enum TraceItem {
    Face(TracedFace),
    TrackEnded(u64),
    /// The stage restarted or the video ended: every track ended.
    StreamEnded,
}

/// One video through the daemon's chain, once.
#[derive(Debug, Clone)]
pub struct VideoTrace {
    pub path: String,
    pub fake: bool,
    /// The decoded length (first to last timestamp, plus one frame).
    pub duration: Duration,
    /// Frames the face stage analysed, and the detector's failures among them.
    pub frames: u64,
    pub detector_errors: u64,
    pub items: Vec<TraceItem>,
}

/// Faces kept per video at most (an hour at 5 fps with ten faces a frame) and over the whole
/// LIST (about 300 MB of traces); beyond, the video is refused rather than held in memory
/// without end.
pub const MAX_TRACE_FACES: usize = 180_000;
pub const MAX_TOTAL_FACES: usize = 2_000_000;

/// What the report says of each video.
#[derive(Debug, Clone, Serialize)]
pub struct VideoSummary {
    pub path: String,
    pub label: &'static str,
    pub duration_s: f64,
    pub frames: u64,
    pub faces_scored: usize,
    /// Track ids among its scored faces (a face that stays in view keeps one).
    pub tracks: usize,
    pub detector_errors: u64,
    /// Why the video is not in the calibration.
    pub error: Option<String>,
}

/// Decodes `row`'s video at the config's analysis rate and runs it through the face stage,
/// the encoder and the scorer.
pub fn trace_video(an: &mut Analyzer, row: &Row, max_faces: usize) -> anyhow::Result<VideoTrace> {
    anyhow::ensure!(
        row.kind == Kind::Video,
        "line {}: {} is a face crop; calibrate replays videos through the tracker",
        row.line,
        row.path
    );
    let file = row.regular_file()?;
    let config = an.config().clone();
    let fps = config.ingest.analysis_fps;
    let detector = crate::detect::FaceDetector::load(&config.detect, &config.base_dir)
        .context("face detector ([detect] model_dir; run ./tools/setup.sh)")?;
    let cap = |n: usize| std::num::NonZeroUsize::new(n).expect("non-zero");
    let (frames_tx, frames_rx) =
        crate::channel::bounded("calibrate-frames", cap(4), FullPolicy::Block);
    let (encode_tx, encode_rx) = crate::channel::bounded_keeping::<EncodeItem>(
        "calibrate-encode",
        cap(64),
        FullPolicy::Block,
        EncodeItem::must_keep,
    );
    let stream = StreamId::new("calibrate").expect("literal id");
    let metrics = Arc::new(StreamMetrics::default());
    let stop = Arc::new(AtomicBool::new(false));
    let stage = FaceStage {
        stream,
        frames: frames_rx,
        detector,
        track: config.track.clone(),
        fps,
        crop: an.model().crop.clone(),
        publish_crops: false,
        keep_media: false,
        device_crop: false,
        encode: encode_tx,
        metrics: metrics.clone(),
        stop: stop.clone(),
    };
    let stage = stage.spawn().context("starting the face stage")?;
    let uri = file
        .to_str()
        .with_context(|| format!("line {}: the path is not UTF-8", row.line))?
        .to_string();
    let base = config.base_dir.clone();
    let t0 = Instant::now();
    let decoder = std::thread::Builder::new()
        .name("calibrate-decode".into())
        .spawn(move || {
            crate::ingest::sample::decode_at_rate(&uri, &base, fps, t0, &mut |f| {
                frames_tx.send(f).is_ok()
            })
        })
        .context("starting the decoder")?;
    let model = an.model_mut();
    let mut items = Vec::new();
    let mut faces = 0usize;
    let mut failure: Option<anyhow::Error> = None;
    let cap = MAX_TRACE_FACES.min(max_faces);
    while let Some(item) = encode_rx.recv() {
        if failure.is_some() {
            // The stage stops within 100 ms (and with it the decoder): drained until then.
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            continue;
        }
        match item {
            crate::encode::Queued::Face(job) => {
                faces += 1;
                if faces > cap {
                    failure = Some(anyhow::anyhow!(
                        "more than {cap} faces to score (at most {MAX_TRACE_FACES} a video, \
                         {MAX_TOTAL_FACES} a LIST); split the video or the LIST"
                    ));
                    continue;
                }
                let scored = model
                    .encoder
                    .encode_inputs(&[&job.input])
                    .map_err(anyhow::Error::from)
                    .and_then(|e| Ok(model.scoring.scorer.score(&e)?));
                match scored {
                    // Deciding needs only logit(q0) and the marginals: the label logits go.
                    Ok(mut score) => items.push(TraceItem::Face(TracedFace {
                        t: job.meta.mono.saturating_duration_since(t0),
                        track: job.meta.track.0,
                        bbox: job.meta.bbox,
                        quality: job.meta.quality,
                        score: {
                            score.logits = Vec::new();
                            score
                        },
                    })),
                    Err(e) => failure = Some(e.context("encoding a face")),
                }
            }
            crate::encode::Queued::Pass(FaceEvent::TrackEnded { track, .. }) => {
                items.push(TraceItem::TrackEnded(track.0))
            }
            crate::encode::Queued::Pass(FaceEvent::StreamEnded { .. }) => {
                items.push(TraceItem::StreamEnded)
            }
        }
    }
    let _ = stage.join();
    let decoded = decoder
        .join()
        .map_err(|_| anyhow::anyhow!("the decoder panicked"))?
        .with_context(|| format!("line {}: {}", row.line, row.path))?;
    if let Some(e) = failure {
        return Err(e.context(format!("line {}: {}", row.line, row.path)));
    }
    let frames = metrics.frames_analysed.get();
    anyhow::ensure!(
        frames > 0,
        "line {}: {}: no frame decoded",
        row.line,
        row.path
    );
    Ok(VideoTrace {
        path: row.path.clone(),
        fake: row.fake,
        duration: decoded,
        frames,
        detector_errors: metrics.detector_errors.get(),
        items,
    })
}

/// One candidate of the grid and what it gave.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub enter_fake: f64,
    pub exit_fake: f64,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// `new` alerts on the real videos.
    pub false_alarms: usize,
    pub false_alarms_per_hour: f64,
    /// The rate's 95% upper bound (Poisson, exact): what this much real footage can vouch for.
    pub false_alarms_per_hour_upper_95: f64,
    pub fakes: usize,
    pub fakes_detected: usize,
    /// Median and mean delay over the detected fakes, seconds.
    pub median_delay_s: Option<f64>,
    pub mean_delay_s: Option<f64>,
    pub meets_budget: bool,
}

/// Replays the traces through a [`Decider`] under `evidence`: (false alarms on the real
/// videos, per fake video its delay to the first `new` alert or `None`).
pub fn replay(
    scoring: &Scoring,
    evidence: &EvidenceConfig,
    traces: &[VideoTrace],
) -> (usize, Vec<Option<Duration>>) {
    let mut false_alarms = 0;
    let mut delays = Vec::new();
    let metrics = Arc::new(StreamMetrics::default());
    let node = NodeId::new("calibrate").expect("literal id");
    for (i, v) in traces.iter().enumerate() {
        let stream = StreamId::new(&format!("v{i}")).expect("valid id");
        let mut decider = Decider::new(
            node.clone(),
            scoring.clone(),
            evidence.clone(),
            Arc::new(AnalysisMetrics::default()),
            UlidGenerator::with_seed(i as u64),
        );
        let t0 = Instant::now();
        let mut first_face: Option<Duration> = None;
        let mut first_alert: Option<Duration> = None;
        let mut news = 0usize;
        let mut count = |out: Vec<Output>, t: Duration| {
            for o in out {
                if let Output::Alert {
                    kind: AlertKind::New,
                    ..
                } = o
                {
                    news += 1;
                    first_alert.get_or_insert(t);
                }
            }
        };
        let mut last = Duration::ZERO;
        for item in &v.items {
            match item {
                TraceItem::Face(f) => {
                    last = f.t;
                    first_face.get_or_insert(f.t);
                    let meta = FaceMeta {
                        stream: stream.clone(),
                        track: TrackId(f.track),
                        mono: t0 + f.t,
                        capture_time: UNIX_EPOCH + f.t,
                        pts: Some(f.t),
                        bbox: f.bbox,
                        quality: f.quality,
                        crop: None,
                        publish_crop: false,
                        frame: None,
                        metrics: metrics.clone(),
                    };
                    let out = decider.on_scored(meta, f.score.clone(), UNIX_EPOCH + f.t);
                    count(out, f.t);
                }
                TraceItem::TrackEnded(track) => {
                    count(
                        decider.on_track_end(&stream, TrackId(*track), UNIX_EPOCH + last),
                        last,
                    );
                }
                TraceItem::StreamEnded => {
                    count(decider.on_stream_removed(&stream, UNIX_EPOCH + last), last);
                }
            }
        }
        if v.fake {
            delays.push(match (first_face, first_alert) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                _ => None,
            });
        } else {
            false_alarms += news;
        }
    }
    (false_alarms, delays)
}

/// The grid: `enter_fake` x hysteresis (`enter_fake - exit_fake`) x `window`.
pub const ENTER_FAKE: [f64; 11] = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0];
pub const HYSTERESIS: [f64; 3] = [0.5, 1.5, 3.0];
pub const WINDOW_S: [u64; 6] = [2, 3, 4, 6, 8, 12];

/// What calibration found.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    pub budget_per_hour: f64,
    pub real_videos: usize,
    pub real_hours: f64,
    pub fake_videos: usize,
    /// How the choice is made among the candidates within the budget.
    pub rule: &'static str,
    pub chosen: Option<Outcome>,
    /// The `[evidence]` section (TOML) of the chosen candidate.
    pub evidence_toml: Option<String>,
    /// Candidates `validate` refused under this config, with the first reason.
    pub refused: Vec<String>,
    /// Every candidate checked, in grid order.
    pub curve: Vec<Outcome>,
    /// Each video of the LIST, and why one is left out.
    pub videos: Vec<VideoSummary>,
    /// The engine the faces were scored with (the daemon's may differ: a GPU engine in fp16
    /// scores a little differently).
    pub engine: &'static str,
}

const RULE: &str = "within the budget (false alarms per hour of real video <= X): most fakes \
                    detected, then the shortest median delay, then the fewest false alarms, \
                    then the highest enter_fake";

/// The exact 95% upper confidence bound of a Poisson mean after `k` events: the mean at
/// which seeing `k` or fewer has probability 0.05 (about 3.0 for none).
pub fn poisson_upper_95(k: u64) -> f64 {
    let cdf = |lambda: f64| {
        let mut term = (-lambda).exp();
        let mut sum = term;
        for i in 1..=k {
            term *= lambda / i as f64;
            sum += term;
        }
        sum
    };
    let (mut lo, mut hi) = (k as f64, k as f64 + 10.0 * (k as f64 + 1.0).sqrt() + 10.0);
    for _ in 0..200 {
        let mid = (lo + hi) / 2.0;
        if cdf(mid) > 0.05 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (lo + hi) / 2.0
}

fn median(sorted: &[f64]) -> Option<f64> {
    super::metrics::quantile(sorted, 0.5)
}

/// The config's `[evidence]` with one grid point's thresholds and window.
fn grid_point(base: &EvidenceConfig, enter: f64, exit: f64, window: Duration) -> EvidenceConfig {
    EvidenceConfig {
        enter_fake: enter,
        exit_fake: exit,
        window,
        ..base.clone()
    }
}

/// Replays every grid point over the traces and picks the best within `budget`.
pub fn calibrate(
    config: &Config,
    scoring: &Scoring,
    traces: &[VideoTrace],
    budget: f64,
) -> anyhow::Result<Calibration> {
    anyhow::ensure!(
        budget.is_finite() && budget >= 0.0,
        "--false-alarms-per-hour must be a number at or above 0 (got {budget})"
    );
    let real: Vec<&VideoTrace> = traces.iter().filter(|t| !t.fake).collect();
    let real_hours: f64 = real.iter().map(|t| t.duration.as_secs_f64()).sum::<f64>() / 3600.0;
    anyhow::ensure!(
        real_hours > 0.0,
        "no real video with a length in the LIST: false alarms per hour need real footage"
    );
    let fake_videos = traces.len() - real.len();
    let mut curve = Vec::new();
    let mut refused = Vec::new();
    for &enter in &ENTER_FAKE {
        for &gap in &HYSTERESIS {
            for &w in &WINDOW_S {
                let mut candidate = config.clone();
                candidate.evidence =
                    grid_point(&config.evidence, enter, enter - gap, Duration::from_secs(w));
                let errors = candidate.check();
                if let Some(e) = errors.first() {
                    refused.push(format!(
                        "enter_fake {enter}, exit_fake {}, window {w}s: {}: {}",
                        enter - gap,
                        e.path,
                        e.message
                    ));
                    continue;
                }
                let (fa, delays) = replay(scoring, &candidate.evidence, traces);
                let mut got: Vec<f64> = delays.iter().flatten().map(|d| d.as_secs_f64()).collect();
                got.sort_by(f64::total_cmp);
                let per_hour = fa as f64 / real_hours;
                curve.push(Outcome {
                    enter_fake: enter,
                    exit_fake: enter - gap,
                    window: Duration::from_secs(w),
                    false_alarms: fa,
                    false_alarms_per_hour: per_hour,
                    false_alarms_per_hour_upper_95: poisson_upper_95(fa as u64) / real_hours,
                    fakes: delays.len(),
                    fakes_detected: got.len(),
                    median_delay_s: median(&got),
                    mean_delay_s: (!got.is_empty())
                        .then(|| got.iter().sum::<f64>() / got.len() as f64),
                    meets_budget: per_hour <= budget,
                });
            }
        }
    }
    let chosen = curve
        .iter()
        .filter(|o| o.meets_budget)
        .min_by(|a, b| {
            b.fakes_detected
                .cmp(&a.fakes_detected)
                .then(
                    a.median_delay_s
                        .unwrap_or(f64::INFINITY)
                        .total_cmp(&b.median_delay_s.unwrap_or(f64::INFINITY)),
                )
                .then(a.false_alarms.cmp(&b.false_alarms))
                .then(b.enter_fake.total_cmp(&a.enter_fake))
        })
        .cloned();
    let evidence_toml = match &chosen {
        Some(c) => {
            let e = grid_point(&config.evidence, c.enter_fake, c.exit_fake, c.window);
            let mut section = toml::Value::try_from(&e).context("writing [evidence]")?;
            // The f32 as written in a config (0.1), not its f64 widening (0.10000000149...).
            if let Some(t) = section.as_table_mut()
                && let Ok(q) = e.min_quality.to_string().parse::<f64>()
            {
                t.insert("min_quality".into(), toml::Value::Float(q));
            }
            let mut table = toml::Table::new();
            table.insert("evidence".into(), section);
            Some(toml::to_string(&table).context("writing [evidence]")?)
        }
        None => None,
    };
    Ok(Calibration {
        budget_per_hour: budget,
        real_videos: real.len(),
        real_hours,
        fake_videos,
        rule: RULE,
        chosen,
        evidence_toml,
        refused,
        curve,
        videos: traces
            .iter()
            .map(|t| VideoSummary {
                path: t.path.clone(),
                label: if t.fake { "fake" } else { "real" },
                duration_s: t.duration.as_secs_f64(),
                frames: t.frames,
                faces_scored: t
                    .items
                    .iter()
                    .filter(|i| matches!(i, TraceItem::Face(_)))
                    .count(),
                tracks: t
                    .items
                    .iter()
                    .filter_map(|i| match i {
                        TraceItem::Face(f) => Some(f.track),
                        _ => None,
                    })
                    .collect::<std::collections::BTreeSet<_>>()
                    .len(),
                detector_errors: t.detector_errors,
                error: None,
            })
            .collect(),
        engine: "cpu-onnxruntime fp32",
    })
}

/// Traces every row of the LIST (videos only) with a progress callback. A video that cannot
/// be read is left out and said (a summary with its error); the others go on.
pub fn trace_list(
    an: &mut Analyzer,
    rows: &[Row],
    progress: &mut dyn FnMut(usize, usize, &str),
) -> anyhow::Result<(Vec<VideoTrace>, Vec<VideoSummary>)> {
    if let Some(crop) = rows.iter().find(|r| r.kind != Kind::Video) {
        anyhow::bail!(
            "line {}: {} is a face crop; calibrate replays videos through the tracker (list \
             videos only)",
            crop.line,
            crop.path
        );
    }
    let mut traces = Vec::with_capacity(rows.len());
    let mut failed = Vec::new();
    let mut faces = 0usize;
    for (i, row) in rows.iter().enumerate() {
        progress(i, rows.len(), &row.path);
        match trace_video(an, row, MAX_TOTAL_FACES.saturating_sub(faces)) {
            Ok(t) => {
                faces += t.items.len();
                if t.detector_errors > 0 {
                    tracing::warn!(video = %row.path, errors = t.detector_errors, frames = t.frames, "The detector failed on some frames: the faces there are missing from the calibration.");
                }
                traces.push(t);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "A video is left out of the calibration.");
                failed.push(VideoSummary {
                    path: row.path.clone(),
                    label: if row.fake { "fake" } else { "real" },
                    duration_s: 0.0,
                    frames: 0,
                    faces_scored: 0,
                    tracks: 0,
                    detector_errors: 0,
                    error: Some(format!("{e:#}")),
                });
            }
        }
    }
    progress(rows.len(), rows.len(), "replaying the grid");
    Ok((traces, failed))
}

/// `dfwatch calibrate` as the command line gives it.
#[derive(Debug, Clone)]
pub struct CalibrateArgs {
    pub list: std::path::PathBuf,
    pub model: std::path::PathBuf,
    pub config: Config,
    pub budget: f64,
    /// The `[evidence]` section (standard output when `None`).
    pub out: Option<std::path::PathBuf>,
    /// The curve as JSON (default: beside `out` with `.curve.json`).
    pub curve: Option<std::path::PathBuf>,
}

/// Runs `dfwatch calibrate`: traces the LIST's videos, replays the grid, writes the chosen
/// `[evidence]` section and the curve. Fails (after writing the curve) when no candidate
/// meets the budget.
pub fn run(args: CalibrateArgs) -> anyhow::Result<()> {
    let rows = super::eval::read_list(&args.list)?;
    let mut analyzer = Analyzer::new(&args.model, &args.config)?;
    let bar = crate::progress::bar(rows.len() as u64, "calibrate");
    let traces = trace_list(&mut analyzer, &rows, &mut |done, total, what| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(what.to_string());
    });
    bar.finish_and_clear();
    let (traces, failed) = traces?;
    let mut c = calibrate(
        &args.config,
        &analyzer.model().scoring,
        &traces,
        args.budget,
    )?;
    c.videos.extend(failed);
    // The curve is always written: beside --out, or in the working directory.
    let curve_path = args.curve.clone().unwrap_or_else(|| match &args.out {
        Some(o) => o.with_extension("curve.json"),
        None => std::path::PathBuf::from("dfwatch-calibrate.curve.json"),
    });
    std::fs::write(&curve_path, serde_json::to_string_pretty(&c)? + "\n")
        .with_context(|| format!("writing {}", curve_path.display()))?;
    let curve_path = Some(curve_path);
    let (Some(chosen), Some(section)) = (&c.chosen, &c.evidence_toml) else {
        let best = c
            .curve
            .iter()
            .map(|o| o.false_alarms_per_hour)
            .min_by(f64::total_cmp);
        anyhow::bail!(
            "no [evidence] setting of the grid keeps false alarms within {} per hour on {} of \
             real video (the fewest: {}); the curve is in {}",
            args.budget,
            crate::validation::human(Duration::from_secs((c.real_hours * 3600.0).round() as u64)),
            best.map(|b| format!("{b:.2} per hour"))
                .unwrap_or("none checked".into()),
            curve_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
    };
    let model = &analyzer.model().scoring.model;
    let text = format!(
        "# Written by `dfwatch calibrate` for model {} {} (manifest {}).\n\
         # {} real videos ({}), {} fake; budget {} false alarms per stream-hour.\n\
         # This setting: {:.2} false alarms per hour ({} in all; 95% upper bound {:.2}); fakes \
         detected {} of {}, median delay {}.\n# Chosen {}.\n# Scored with the CPU engine \
         (fp32); a GPU engine in fp16 scores a little differently.\n{section}",
        model.name,
        model.version,
        &model.manifest_sha256[..model.manifest_sha256.len().min(12)],
        c.real_videos,
        crate::validation::human(Duration::from_secs((c.real_hours * 3600.0).round() as u64)),
        c.fake_videos,
        c.budget_per_hour,
        chosen.false_alarms_per_hour,
        chosen.false_alarms,
        chosen.false_alarms_per_hour_upper_95,
        chosen.fakes_detected,
        chosen.fakes,
        chosen
            .median_delay_s
            .map(|d| format!("{d:.1} s"))
            .unwrap_or_else(|| if chosen.fakes == 0 {
                "- (no fake video)".into()
            } else {
                "- (none detected)".into()
            }),
        c.rule,
    );
    match &args.out {
        Some(p) => std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?,
        None => print!("{text}"),
    }
    if chosen.false_alarms_per_hour_upper_95 > args.budget {
        eprintln!(
            "warning: {} of real video cannot vouch for {} false alarms per hour: with {} seen, \
             the rate may be as high as {:.2} per hour (95% upper bound); at least {:.1} hours \
             without an alarm are needed",
            crate::validation::human(Duration::from_secs((c.real_hours * 3600.0).round() as u64)),
            args.budget,
            chosen.false_alarms,
            chosen.false_alarms_per_hour_upper_95,
            poisson_upper_95(0) / args.budget.max(1e-9)
        );
    }
    if chosen.fakes > 0 && chosen.fakes_detected == 0 {
        eprintln!(
            "warning: no setting within the budget detects any of the {} fake videos; the \
             section is the strictest of them",
            chosen.fakes
        );
    }
    eprintln!(
        "enter_fake {} exit_fake {} window {}: {:.2} false alarms per hour, {} of {} fakes \
         detected{}",
        chosen.enter_fake,
        chosen.exit_fake,
        crate::validation::human(chosen.window),
        chosen.false_alarms_per_hour,
        chosen.fakes_detected,
        chosen.fakes,
        curve_path
            .map(|p| format!("; curve: {}", p.display()))
            .unwrap_or_default()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scoring() -> Scoring {
        crate::decide::identity_scoring()
    }

    /// Every label logit `c`: the resulting logit(q0) rises with `c`.
    fn face(s: &Scoring, t_ms: u64, c: f64) -> TraceItem {
        let n = s.scorer.graph().len();
        TraceItem::Face(TracedFace {
            t: Duration::from_millis(t_ms),
            track: 1,
            bbox: BBox {
                x0: 0.0,
                y0: 0.0,
                x1: 100.0,
                y1: 100.0,
            },
            quality: 1.0,
            score: s.scorer.score_logits(vec![c; n]),
        })
    }

    fn logit_q0(s: &Scoring, c: f64) -> f64 {
        s.scorer
            .score_logits(vec![c; s.scorer.graph().len()])
            .logit_q0
    }

    /// Label logit `c` whose logit(q0) is `target` (bisection; logit(q0) rises with `c`).
    fn c_for(s: &Scoring, target: f64) -> f64 {
        let (mut lo, mut hi) = (-20.0, 20.0);
        for _ in 0..100 {
            let mid = (lo + hi) / 2.0;
            if logit_q0(s, mid) < target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        (lo + hi) / 2.0
    }

    /// Real feeds: five minutes each at 2 scored faces a second, clearly real except one
    /// 20-second burst at logit(q0) 2.2 per video. Fakes: a face whose logit(q0) climbs
    /// from -2 by 1 per second (a slowly worsening fake). The only settings without a
    /// false alarm have enter_fake above 2.2; on the ramp the lowest such threshold, 2.5,
    /// alerts first. With a budget of 1 per hour (the bursts make 12 per hour), the answer is
    /// enter_fake 2.5 and the shortest window the config accepts.
    #[test]
    fn calibration_finds_the_known_answer_on_synthetic_score_streams() {
        let s = scoring();
        let (calm, burst) = (c_for(&s, -4.0), c_for(&s, 2.2));
        let mut traces = Vec::new();
        for v in 0..3 {
            let mut items = Vec::new();
            for k in 0..600u64 {
                let t = k * 500;
                let hot = (100_000 + v * 60_000..120_000 + v * 60_000).contains(&t);
                items.push(face(&s, t, if hot { burst } else { calm }));
            }
            items.push(TraceItem::StreamEnded);
            traces.push(VideoTrace {
                path: format!("real{v}.mp4"),
                fake: false,
                duration: Duration::from_secs(300),
                frames: 1500,
                detector_errors: 0,
                items,
            });
        }
        for v in 0..2u64 {
            let mut items = Vec::new();
            for k in 0..60u64 {
                let t = 1000 * v + k * 500;
                items.push(face(&s, t, c_for(&s, -2.0 + k as f64 * 0.5)));
            }
            items.push(TraceItem::StreamEnded);
            traces.push(VideoTrace {
                path: format!("fake{v}.mp4"),
                fake: true,
                duration: Duration::from_secs(31),
                frames: 150,
                detector_errors: 0,
                items,
            });
        }
        let config = Config::default();
        let c = calibrate(&config, &s, &traces, 1.0).unwrap();
        assert_eq!(c.real_videos, 3);
        assert!((c.real_hours - 0.25).abs() < 1e-9);
        let chosen = c.chosen.clone().expect("a candidate meets the budget");
        assert_eq!(chosen.enter_fake, 2.5, "{chosen:?}");
        assert_eq!(chosen.false_alarms, 0);
        assert_eq!(chosen.fakes_detected, 2);
        let shortest = c
            .curve
            .iter()
            .filter(|o| o.enter_fake == 2.5)
            .map(|o| o.window)
            .min()
            .unwrap();
        assert_eq!(chosen.window, shortest);
        // Every threshold at or below the burst raises one alarm per real video.
        for o in c.curve.iter().filter(|o| o.enter_fake <= 2.0) {
            assert_eq!(o.false_alarms, 3, "{o:?}");
            assert!(!o.meets_budget);
        }
        // Higher thresholds detect later.
        let delay = |enter: f64| {
            c.curve
                .iter()
                .find(|o| o.enter_fake == enter && o.window == chosen.window)
                .and_then(|o| o.median_delay_s)
                .unwrap()
        };
        assert!(delay(2.5) < delay(4.0) && delay(4.0) < delay(6.0));
        let toml = c.evidence_toml.unwrap();
        assert!(toml.starts_with("[evidence]"), "{toml}");
        assert!(toml.contains("enter_fake = 2.5"), "{toml}");
        // What it wrote is a valid config.
        Config::parse(&toml, std::path::Path::new(".")).unwrap();
        // A budget of 12 per hour (three alarms in a quarter hour) admits the burst's
        // thresholds, which alert sooner.
        let loose = calibrate(&config, &s, &traces, 12.0).unwrap();
        assert!(loose.chosen.unwrap().enter_fake <= 2.0);
        // The window the default cadence cannot fill is refused, as validate would.
        assert!(
            c.refused.iter().any(|r| r.contains("window 2s")),
            "{:?}",
            c.refused
        );
    }

    #[test]
    fn poisson_bounds_match_the_tables() {
        // The exact 95% upper bounds (chi-square / 2 at 2(k+1) degrees of freedom).
        for (k, want) in [(0, 2.9957), (1, 4.7439), (3, 7.7537), (10, 16.9622)] {
            let got = poisson_upper_95(k);
            assert!((got - want).abs() < 1e-3, "{k}: {got} vs {want}");
        }
    }

    #[test]
    fn no_real_footage_is_refused() {
        let e = calibrate(&Config::default(), &scoring(), &[], 1.0).unwrap_err();
        assert!(e.to_string().contains("no real video"), "{e}");
    }
}
