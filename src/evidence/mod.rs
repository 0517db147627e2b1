//! Evidence: per-track decisions from a stream of per-face scores. Pure: monotonic time is
//! passed in, alert ids come from the caller's clock and randomness.
//!
//! Owns the `[evidence]` config section ([`EvidenceConfig`]).
//!
//! # The rule
//! Each track keeps the faces scored in the last `window`. Its statistic is the
//! quality-weighted **trimmed mean of logit(q0)**, each logit first clipped to
//! `+/- logit_clip`: the `trim` fraction of weight is cut from each end, the rest averaged.
//! Why this rule:
//! - logits, not q0: q0 saturates to exactly 1.0 for confident faces (SJEDD.md section 4),
//!   while the logit keeps growing; averaging log-odds is averaging evidence.
//! - clipped and trimmed: a single glitch (a blurred frame, a half-occluded face, a bad detection) moves
//!   the statistic by at most its trimmed weight, so one frame can neither raise nor clear an
//!   alarm;
//! - windowed: old evidence expires, so a face that turns fake mid-stream (onset) is alerted
//!   within one window, and a cleared one ends within one window.
//!
//! Faces whose quality weight (`crop::quality::weight`) is below `min_quality` are skipped
//! (counted, not used); the others count with their weight.
//!
//! # Verdicts, with hysteresis
//! `uncertain` until the window holds `min_frames` faces spanning `min_duration`; then
//! `fake` when the statistic reaches `enter_fake`, back out of `fake` only below
//! `exit_fake` (< `enter_fake`, so values hovering at the threshold do not flap); `real` at or
//! below `enter_real`. Worst-case alert delay after an onset: about `window` plus one scoring
//! period (the trimmed mean crosses once more than half the remaining weight is fake).
//!
//! # Alert lifecycle
//! Entering `fake` opens an alert (`new`); while open, `update` at most every `update_every`
//! and only when the statistic moved by `update_delta` or the leading attribute or region
//! changed; `end` when the verdict leaves `fake` (cleared), the track is lost, or the model is
//! swapped.

pub mod ulid;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

pub use ulid::{Ulid, UlidGenerator};

use crate::types::{BBox, StreamId, TrackId};
use crate::validation::{Checker, ConfigError};

/// `[evidence]`: the decision rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvidenceConfig {
    /// How far back scored faces count. Range 500ms to 10m; with the stream's cadence it
    /// must hold `min_frames` faces (config/cadence.rs checks it).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Fraction of the weight trimmed from each end before averaging. Range 0 to 0.49.
    pub trim: f64,
    /// Each face's logit is clipped to +/- this before averaging (8: q0 of 0.9997), so one
    /// absurdly confident frame counts no more than a confident one. Range above 0, at
    /// most 50.
    pub logit_clip: f64,
    /// Faces needed in the window before any verdict. Range 1 to 1000.
    pub min_frames: usize,
    /// Time the window's faces must span before any verdict. Range 0s to `window`.
    #[serde(with = "humantime_serde")]
    pub min_duration: Duration,
    /// Statistic (mean logit of q0) at which a face becomes `fake` (2.0: q0 ~ 0.88). Range
    /// -20 to 20.
    pub enter_fake: f64,
    /// ... and below which it stops being `fake`. Range -20 to 20, below `enter_fake`.
    pub exit_fake: f64,
    /// Statistic at or below which a face is `real`. Range -20 to 20, below `enter_fake`.
    pub enter_real: f64,
    /// Faces of lower quality weight are skipped. Range 0 to 1.
    pub min_quality: f32,
    /// Open alerts are updated at most this often ... Range 0s to 1h.
    #[serde(with = "humantime_serde")]
    pub update_every: Duration,
    /// ... and only if the statistic moved by this much (or the leading attribute or region
    /// changed). Range 0 to 100.
    pub update_delta: f64,
    /// Evidence frames kept per alert (the strongest). Range 0 to 32.
    pub top_frames: usize,
}

impl Default for EvidenceConfig {
    fn default() -> Self {
        EvidenceConfig {
            window: Duration::from_secs(4),
            trim: 0.2,
            logit_clip: 8.0,
            min_frames: 5,
            min_duration: Duration::from_secs(1),
            enter_fake: 2.0,
            exit_fake: 0.5,
            enter_real: -1.0,
            min_quality: 0.1,
            update_every: Duration::from_secs(5),
            update_delta: 0.5,
            top_frames: 3,
        }
    }
}

impl EvidenceConfig {
    pub(crate) fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        let mut c = Checker::new(path, errors);
        c.duration(
            "window",
            self.window,
            Duration::from_millis(500)..=Duration::from_secs(600),
        );
        c.number("trim", self.trim, 0.0..=0.49);
        c.number_above("logit_clip", self.logit_clip, 0.0, 50.0);
        c.count("min_frames", self.min_frames as u64, 1..=1000);
        if self.min_duration > self.window {
            c.error(
                "min_duration",
                format!(
                    "{} is longer than the window {}, so no verdict could ever form",
                    crate::validation::human(self.min_duration),
                    crate::validation::human(self.window)
                ),
            );
        }
        for (key, v) in [
            ("enter_fake", self.enter_fake),
            ("exit_fake", self.exit_fake),
            ("enter_real", self.enter_real),
        ] {
            c.number(key, v, -20.0..=20.0);
        }
        if self.exit_fake.partial_cmp(&self.enter_fake) != Some(std::cmp::Ordering::Less) {
            c.error(
                "exit_fake",
                format!(
                    "{} must be below enter_fake {} (hysteresis)",
                    self.exit_fake, self.enter_fake
                ),
            );
        }
        if self.enter_real.partial_cmp(&self.enter_fake) != Some(std::cmp::Ordering::Less) {
            c.error("enter_real", "must be below enter_fake");
        }
        c.number("min_quality", self.min_quality.into(), 0.0..=1.0);
        c.duration(
            "update_every",
            self.update_every,
            Duration::ZERO..=Duration::from_secs(3600),
        );
        c.number("update_delta", self.update_delta, 0.0..=100.0);
        c.count("top_frames", self.top_frames as u64, 0..=32);
    }
}

/// A track's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Fake,
    Real,
    Uncertain,
}

/// One scored face.
#[derive(Debug, Clone)]
pub struct Observation {
    pub stream: StreamId,
    pub track: TrackId,
    /// Monotonic time of the frame.
    pub at: Instant,
    /// Wall-clock capture time of the frame.
    pub capture_time: SystemTime,
    pub pts: Option<Duration>,
    pub bbox: BBox,
    pub logit_q0: f64,
    /// Marginals of every label node, in the model's order.
    pub marginals: Vec<f64>,
    /// `crop::quality::weight`, 0..=1.
    pub quality: f32,
}

/// A frame kept as evidence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvidenceFrame {
    #[serde(serialize_with = "ser_time")]
    pub capture_time: SystemTime,
    pub pts_ms: Option<u64>,
    pub bbox: BBox,
    pub logit_q0: f64,
    pub quality: f32,
}

fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string())
}

/// Why an alert ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The evidence fell below `exit_fake`.
    Cleared,
    /// The track ended.
    TrackLost,
    /// A new model was swapped in.
    ModelSwapped,
    /// The stream was removed or the daemon stopped.
    StreamStopped,
}

impl EndReason {
    /// The reason's word in alerts, the event store and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Cleared => "cleared",
            EndReason::TrackLost => "track_lost",
            EndReason::ModelSwapped => "model_swapped",
            EndReason::StreamStopped => "stream_stopped",
        }
    }
}

/// What happened to an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum AlertKind {
    New,
    Update,
    End { reason: EndReason },
}

impl AlertKind {
    /// Why the alert ended, for an end.
    pub fn end_reason(&self) -> Option<EndReason> {
        match self {
            AlertKind::End { reason } => Some(*reason),
            _ => None,
        }
    }

    /// The kind without the end's reason.
    pub fn change(&self) -> crate::types::AlertChange {
        match self {
            AlertKind::New => crate::types::AlertChange::New,
            AlertKind::Update => crate::types::AlertChange::Update,
            AlertKind::End { .. } => crate::types::AlertChange::End,
        }
    }
}

/// An alert event, before it is dressed as the MQTT payload.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertEvent {
    pub alert_id: Ulid,
    pub kind: AlertKind,
    pub stream: StreamId,
    pub track: TrackId,
    pub verdict: Verdict,
    /// The statistic: trimmed mean of logit(q0) over the window.
    pub logit: f64,
    /// `sigmoid(logit)`.
    pub score: f64,
    pub threshold: f64,
    pub frames_scored: usize,
    pub frames_skipped_low_quality: usize,
    pub window_s: f64,
    /// Quality-weighted mean marginal of every label node over the window.
    pub mean_marginals: Vec<f64>,
    pub top_frames: Vec<EvidenceFrame>,
    #[serde(serialize_with = "ser_time")]
    pub started: SystemTime,
}

#[derive(Debug, Clone)]
struct OpenAlert {
    id: Ulid,
    started: SystemTime,
    last_sent: Instant,
    last_logit: f64,
    leaders: (usize, usize),
    top: Vec<EvidenceFrame>,
}

#[derive(Debug)]
struct TrackState {
    stream: StreamId,
    window: Vec<Observation>,
    skipped: usize,
    verdict: Verdict,
    alert: Option<OpenAlert>,
}

/// Quality-weighted trimmed mean: sorts by value, cuts `trim` of the total weight from each
/// end (partially cutting the boundary items), averages the rest.
pub fn trimmed_mean(values: &[(f64, f64)], trim: f64) -> Option<f64> {
    let mut v: Vec<(f64, f64)> = values.iter().copied().filter(|(_, w)| *w > 0.0).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = v.iter().map(|(_, w)| w).sum();
    let (lo, hi) = (trim * total, (1.0 - trim) * total);
    let (mut acc, mut wsum, mut cum) = (0.0, 0.0, 0.0);
    for (x, w) in v {
        let (a, b) = (cum, cum + w);
        cum = b;
        let kept = (b.min(hi) - a.max(lo)).max(0.0);
        acc += x * kept;
        wsum += kept;
    }
    (wsum > 0.0).then(|| acc / wsum)
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Per-track evidence for any number of streams.
#[derive(Debug)]
pub struct Evidence {
    cfg: EvidenceConfig,
    /// Level of each label node (to find the leading attribute and region).
    levels: Vec<crate::score::Level>,
    tracks: HashMap<(StreamId, TrackId), TrackState>,
}

impl Evidence {
    /// `levels` lists each label node's level in the model's order.
    pub fn new(cfg: EvidenceConfig, levels: Vec<crate::score::Level>) -> Self {
        Evidence {
            cfg,
            levels,
            tracks: HashMap::new(),
        }
    }

    pub fn config(&self) -> &EvidenceConfig {
        &self.cfg
    }

    /// New thresholds for every track from now on (open windows keep their observations).
    pub fn set_config(&mut self, cfg: EvidenceConfig) {
        self.cfg = cfg;
    }

    /// A track's fake probability over its window (the sigmoid of the rule's statistic), once
    /// its window holds a face.
    pub fn probability(&self, stream: &StreamId, track: TrackId) -> Option<f64> {
        let t = self.tracks.get(&(stream.clone(), track))?;
        let stat = window_statistic(&t.window, &self.cfg)?;
        Some(1.0 / (1.0 + (-stat).exp()))
    }

    /// The current verdict of a track.
    pub fn verdict(&self, stream: &StreamId, track: TrackId) -> Option<Verdict> {
        self.tracks.get(&(stream.clone(), track)).map(|t| t.verdict)
    }

    /// Feeds one scored face. An alert opened now takes its id from `ids` at `wall`.
    pub fn observe(
        &mut self,
        obs: Observation,
        wall: SystemTime,
        ids: &mut UlidGenerator,
    ) -> Option<AlertEvent> {
        let key = (obs.stream.clone(), obs.track);
        let now = obs.at;
        let cfg = &self.cfg;
        let state = self.tracks.entry(key).or_insert_with(|| TrackState {
            stream: obs.stream.clone(),
            window: Vec::new(),
            skipped: 0,
            verdict: Verdict::Uncertain,
            alert: None,
        });
        if obs.quality < cfg.min_quality {
            state.skipped += 1;
        } else {
            state.window.push(obs);
        }
        state
            .window
            .retain(|o| now.saturating_duration_since(o.at) <= cfg.window);
        let stat = window_statistic(&state.window, cfg)?;
        let span = match (state.window.first(), state.window.last()) {
            (Some(a), Some(b)) => b.at.saturating_duration_since(a.at),
            _ => Duration::ZERO,
        };
        let enough = state.window.len() >= cfg.min_frames && span >= cfg.min_duration;
        if !enough {
            return None;
        }
        let next = match state.verdict {
            Verdict::Fake if stat >= cfg.exit_fake => Verdict::Fake,
            _ if stat >= cfg.enter_fake => Verdict::Fake,
            _ if stat <= cfg.enter_real => Verdict::Real,
            _ => Verdict::Uncertain,
        };
        let prev = std::mem::replace(&mut state.verdict, next);
        let levels = &self.levels;
        let marg = mean_marginals(&state.window);
        let leaders = (
            leader(&marg, levels, crate::score::Level::Global),
            leader(&marg, levels, crate::score::Level::Local),
        );
        let top = top_frames(&state.window, cfg.top_frames);
        match (prev == Verdict::Fake, next == Verdict::Fake) {
            (false, true) => {
                let alert = OpenAlert {
                    id: ids.next(wall),
                    started: wall,
                    last_sent: now,
                    last_logit: stat,
                    leaders,
                    top,
                };
                let ev = Self::event(cfg, state, &alert, AlertKind::New, stat, marg);
                state.alert = Some(alert);
                Some(ev)
            }
            (true, true) => {
                let alert = state.alert.as_mut()?;
                // Keep the strongest frames seen over the alert's life.
                let mut merged = alert.top.clone();
                merged.extend(top);
                merged.sort_by(|a, b| b.logit_q0.total_cmp(&a.logit_q0));
                merged.dedup_by(|a, b| a.capture_time == b.capture_time);
                merged.truncate(cfg.top_frames);
                alert.top = merged;
                let changed =
                    (stat - alert.last_logit).abs() >= cfg.update_delta || leaders != alert.leaders;
                if changed && now.saturating_duration_since(alert.last_sent) >= cfg.update_every {
                    alert.last_sent = now;
                    alert.last_logit = stat;
                    alert.leaders = leaders;
                    let alert = alert.clone();
                    Some(Self::event(
                        cfg,
                        state,
                        &alert,
                        AlertKind::Update,
                        stat,
                        marg,
                    ))
                } else {
                    None
                }
            }
            (true, false) => {
                let alert = state.alert.take()?;
                let kind = AlertKind::End {
                    reason: EndReason::Cleared,
                };
                Some(Self::event(cfg, state, &alert, kind, stat, marg))
            }
            (false, false) => None,
        }
    }

    fn event(
        cfg: &EvidenceConfig,
        state: &TrackState,
        alert: &OpenAlert,
        kind: AlertKind,
        stat: f64,
        mean_marginals: Vec<f64>,
    ) -> AlertEvent {
        AlertEvent {
            alert_id: alert.id,
            kind,
            stream: state.stream.clone(),
            track: state.window.last().map(|o| o.track).unwrap_or(TrackId(0)),
            verdict: state.verdict,
            logit: stat,
            score: sigmoid(stat),
            threshold: cfg.enter_fake,
            frames_scored: state.window.len(),
            frames_skipped_low_quality: state.skipped,
            window_s: cfg.window.as_secs_f64(),
            mean_marginals,
            top_frames: alert.top.clone(),
            started: alert.started,
        }
    }

    /// A track ended: closes its alert, if one is open, and forgets the track.
    pub fn track_lost(&mut self, stream: &StreamId, track: TrackId) -> Option<AlertEvent> {
        let state = self.tracks.remove(&(stream.clone(), track))?;
        self.end(state, track, EndReason::TrackLost)
    }

    fn end(&self, mut state: TrackState, track: TrackId, reason: EndReason) -> Option<AlertEvent> {
        let alert = state.alert.take()?;
        let stat = window_statistic(&state.window, &self.cfg).unwrap_or(alert.last_logit);
        let marg = mean_marginals(&state.window);
        let mut ev = Self::event(
            &self.cfg,
            &state,
            &alert,
            AlertKind::End { reason },
            stat,
            marg,
        );
        ev.track = track;
        Some(ev)
    }

    /// Ends every open alert (model swap, shutdown) and forgets every track of `stream`, or
    /// of all streams when `stream` is `None`.
    pub fn end_all(&mut self, stream: Option<&StreamId>, reason: EndReason) -> Vec<AlertEvent> {
        let keys: Vec<(StreamId, TrackId)> = self
            .tracks
            .keys()
            .filter(|(s, _)| stream.is_none_or(|x| x == s))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for key in keys {
            if let Some(state) = self.tracks.remove(&key)
                && let Some(ev) = self.end(state, key.1, reason)
            {
                out.push(ev);
            }
        }
        out.sort_by_key(|e| (e.stream.clone(), e.track));
        out
    }
}

/// The rule's statistic over a window: clipped, quality-weighted, trimmed mean of logits.
fn window_statistic(window: &[Observation], cfg: &EvidenceConfig) -> Option<f64> {
    let values: Vec<(f64, f64)> = window
        .iter()
        .map(|o| {
            (
                o.logit_q0.clamp(-cfg.logit_clip, cfg.logit_clip),
                f64::from(o.quality),
            )
        })
        .collect();
    trimmed_mean(&values, cfg.trim)
}

fn mean_marginals(window: &[Observation]) -> Vec<f64> {
    let n = window.first().map_or(0, |o| o.marginals.len());
    let mut acc = vec![0.0; n];
    let mut wsum = 0.0;
    for o in window {
        let w = f64::from(o.quality);
        for (a, m) in acc.iter_mut().zip(&o.marginals) {
            *a += w * m;
        }
        wsum += w;
    }
    if wsum > 0.0 {
        acc.iter_mut().for_each(|a| *a /= wsum);
    }
    acc
}

fn leader(marg: &[f64], levels: &[crate::score::Level], level: crate::score::Level) -> usize {
    marg.iter()
        .zip(levels)
        .enumerate()
        .filter(|(_, (_, l))| **l == level)
        .max_by(|a, b| a.1.0.total_cmp(b.1.0))
        .map_or(usize::MAX, |(i, _)| i)
}

fn top_frames(window: &[Observation], k: usize) -> Vec<EvidenceFrame> {
    let mut v: Vec<EvidenceFrame> = window
        .iter()
        .map(|o| EvidenceFrame {
            capture_time: o.capture_time,
            pts_ms: o.pts.map(|p| p.as_millis() as u64),
            bbox: o.bbox,
            logit_q0: o.logit_q0,
            quality: o.quality,
        })
        .collect();
    v.sort_by(|a, b| b.logit_q0.total_cmp(&a.logit_q0));
    v.truncate(k);
    v
}

#[cfg(test)]
mod tests;
