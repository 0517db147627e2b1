//! Track: stable ids for faces across frames, and when each face is due for scoring.
//!
//! Owns the `[track]` config section ([`TrackConfig`]). A plain state machine: detections and
//! the monotonic time go in, updates and events come out; no I/O, no clock of its own.
//!
//! - Association: each track predicts where it is now (constant velocity of its box and
//!   landmarks); a detection matches a track when the IoU with the prediction is at least
//!   `iou_min` or the mean landmark distance is under `landmark_gate` face sizes. Pairs are
//!   taken greedily by the lowest cost `(1 - IoU) + mean landmark distance / face size`.
//! - Life: a track is born after `birth_hits` matches (a single false detection never becomes
//!   a track) and dies when unmatched for `patience`.
//! - Landmarks are smoothed (exponential, weight `smoothing` on the new value).
//! - Scoring cadence: due at birth, then every `score_every` rounded up to whole analysed
//!   frames (less half a frame, so arrival times jittered by up to a quarter frame either
//!   way never cost a frame), and
//!   sooner when the face's quality has grown by `rescore_gain` since it was last scored.
//! - The detector searches a frame whole every `detect_every` frames; in between, the face
//!   stage re-detects the tracks around [`Tracker::regions`] (their predicted boxes), and
//!   [`Tracker::predict`] bridges frames with nothing to detect.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::detect::Detection;
use crate::detect::nms::iou;
use crate::types::{BBox, TrackId};
use crate::validation::{Checker, ConfigError};

/// `[track]`: face tracking and scoring cadence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackConfig {
    /// Matches needed before a track is born. Range 1 to 30.
    pub birth_hits: u32,
    /// A track unmatched for this long ends. Range 100ms to 1m.
    #[serde(with = "humantime_serde")]
    pub patience: Duration,
    /// Smallest IoU for a match (unless the landmarks are close). Range 0 to 1.
    pub iou_min: f32,
    /// Landmark distance, in face sizes, under which a match is accepted. Range 0 to 5.
    pub landmark_gate: f32,
    /// Weight of a new observation in the landmark smoothing (1 = no smoothing). Range
    /// above 0, at most 1.
    pub smoothing: f32,
    /// A track is scored again after this long, rounded up to whole analysed frames (and to
    /// detection frames: faces are scored only where the detector ran). Range 100ms to 1m.
    #[serde(with = "humantime_serde")]
    pub score_every: Duration,
    /// ... or sooner when its quality grew by this factor since its last scoring. Range 1
    /// to 100.
    pub rescore_gain: f32,
    /// Run the detector on every Nth analysed frame; the tracker bridges the others. Range
    /// 1 to 100.
    pub detect_every: u32,
}

impl Default for TrackConfig {
    fn default() -> Self {
        TrackConfig {
            birth_hits: 2,
            patience: Duration::from_millis(1500),
            iou_min: 0.3,
            landmark_gate: 0.35,
            smoothing: 0.6,
            score_every: Duration::from_millis(500),
            rescore_gain: 1.25,
            // Measured (bench e2e, 2 cores, 720p, 5 fps): detect+track+crop 0.39 CPU s/s per
            // stream at 1, 0.16 at 3, 0.11 at 5; a new face waits at most 1 s at 5 fps.
            detect_every: 5,
        }
    }
}

impl TrackConfig {
    pub(crate) fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        let mut c = Checker::new(path, errors);
        c.count("birth_hits", self.birth_hits.into(), 1..=30);
        c.duration(
            "patience",
            self.patience,
            Duration::from_millis(100)..=Duration::from_secs(60),
        );
        c.number("iou_min", self.iou_min.into(), 0.0..=1.0);
        c.number("landmark_gate", self.landmark_gate.into(), 0.0..=5.0);
        c.number_above("smoothing", self.smoothing.into(), 0.0, 1.0);
        c.duration(
            "score_every",
            self.score_every,
            Duration::from_millis(100)..=Duration::from_secs(60),
        );
        c.number("rescore_gain", self.rescore_gain.into(), 1.0..=100.0);
        c.count("detect_every", self.detect_every.into(), 1..=100);
    }

    /// Analysed frames between two scorings of a steady face at `fps`, as the tracker
    /// delivers them: `score_every` rounded up to whole frames. (Live tracks are detected on
    /// every frame, whole or around their predictions, whatever `detect_every` is.)
    pub fn frames_per_score(&self, fps: f64) -> u64 {
        frames_in(self.score_every, fps)
    }
}

/// `span` in whole frames at `fps`, rounded up, at least 1 (a hair of slack absorbs the
/// float error of exact multiples).
fn frames_in(span: Duration, fps: f64) -> u64 {
    let f = (span.as_secs_f64() * fps - 1e-6).ceil();
    if f.is_finite() && f >= 1.0 {
        f.min(1e9) as u64
    } else {
        1
    }
}

/// A face being followed.
#[derive(Debug, Clone)]
struct Track {
    id: TrackId,
    bbox: BBox,
    landmarks: [[f32; 2]; 5],
    /// Box-centre velocity in pixels per second.
    velocity: [f32; 2],
    hits: u32,
    born: bool,
    last_seen: Instant,
    last_scored: Option<Instant>,
    quality_at_score: f32,
    quality: f32,
}

impl Track {
    fn predicted(&self, now: Instant) -> (BBox, [[f32; 2]; 5]) {
        let dt = now.saturating_duration_since(self.last_seen).as_secs_f32();
        let (dx, dy) = (self.velocity[0] * dt, self.velocity[1] * dt);
        (
            BBox {
                x0: self.bbox.x0 + dx,
                y0: self.bbox.y0 + dy,
                x1: self.bbox.x1 + dx,
                y1: self.bbox.y1 + dy,
            },
            self.landmarks.map(|[x, y]| [x + dx, y + dy]),
        )
    }
}

/// A face of this frame, with its track.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackedFace {
    pub track: TrackId,
    pub bbox: BBox,
    /// Smoothed landmarks.
    pub landmarks: [[f32; 2]; 5],
    pub score: f32,
    /// The tracker wants this face scored now.
    pub due: bool,
}

/// Something that happened to a track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackEvent {
    Born(TrackId),
    /// Unmatched for `patience`: the face left or was lost.
    Lost(TrackId),
}

fn mean_landmark_distance(a: &[[f32; 2]; 5], b: &[[f32; 2]; 5]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(p, q)| ((p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2)).sqrt())
        .sum::<f32>()
        / 5.0
}

fn centre(b: &BBox) -> [f32; 2] {
    [(b.x0 + b.x1) / 2.0, (b.y0 + b.y1) / 2.0]
}

/// The tracker of one stream.
#[derive(Debug)]
pub struct Tracker {
    cfg: TrackConfig,
    tracks: Vec<Track>,
    next_id: u64,
    /// Time since the last scoring after which a face is due again: `score_every` rounded
    /// up to whole frames, less half a frame (jitter of a quarter frame either way is free).
    rescore_after: Duration,
    /// When [`Tracker::update`] last ran.
    last_update: Option<Instant>,
}

impl Tracker {
    /// A tracker for a stream analysed at `fps` frames per second.
    pub fn new(cfg: TrackConfig, fps: f64) -> Self {
        let frame = if fps.is_finite() && fps > 0.0 {
            Duration::from_secs_f64(1.0 / fps.max(1e-3))
        } else {
            Duration::ZERO
        };
        let whole = if frame.is_zero() {
            cfg.score_every
        } else {
            frame.saturating_mul(frames_in(cfg.score_every, fps).min(u64::from(u32::MAX)) as u32)
        };
        Tracker {
            rescore_after: whole.saturating_sub(frame / 2),
            cfg,
            tracks: Vec::new(),
            next_id: 1,
            last_update: None,
        }
    }

    /// Live (born) tracks.
    pub fn len(&self) -> usize {
        self.tracks.iter().filter(|t| t.born).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Feeds the detections of a frame seen at `now`, each with a quality (higher is better;
    /// see `crop::quality`). Returns the born tracks' faces of this frame and what happened.
    pub fn update(
        &mut self,
        detections: &[(Detection, f32)],
        now: Instant,
    ) -> (Vec<TrackedFace>, Vec<TrackEvent>) {
        self.last_update = Some(now);
        let mut events = Vec::new();
        // Candidate pairs under the gates, cheapest first.
        let mut pairs: Vec<(f32, usize, usize)> = Vec::new();
        for (ti, t) in self.tracks.iter().enumerate() {
            let (pb, pl) = t.predicted(now);
            let size = pb.width().max(pb.height()).max(1.0);
            for (di, (d, _)) in detections.iter().enumerate() {
                let o = iou(&pb, &d.bbox);
                let ld = mean_landmark_distance(&pl, &d.landmarks) / size;
                if o >= self.cfg.iou_min || ld < self.cfg.landmark_gate {
                    pairs.push(((1.0 - o) + ld, ti, di));
                }
            }
        }
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut track_used = vec![false; self.tracks.len()];
        let mut det_used = vec![false; detections.len()];
        let mut faces = Vec::new();
        let alpha = self.cfg.smoothing;
        for (_, ti, di) in pairs {
            if track_used[ti] || det_used[di] {
                continue;
            }
            track_used[ti] = true;
            det_used[di] = true;
            let (d, q) = &detections[di];
            let t = &mut self.tracks[ti];
            let dt = now.saturating_duration_since(t.last_seen).as_secs_f32();
            if dt > 0.0 {
                let (c0, c1) = (centre(&t.bbox), centre(&d.bbox));
                let v = [(c1[0] - c0[0]) / dt, (c1[1] - c0[1]) / dt];
                t.velocity = if t.hits == 1 {
                    v
                } else {
                    [
                        0.5 * t.velocity[0] + 0.5 * v[0],
                        0.5 * t.velocity[1] + 0.5 * v[1],
                    ]
                };
            }
            let (_, predicted) = t.predicted(now);
            t.landmarks = std::array::from_fn(|k| {
                [
                    alpha * d.landmarks[k][0] + (1.0 - alpha) * predicted[k][0],
                    alpha * d.landmarks[k][1] + (1.0 - alpha) * predicted[k][1],
                ]
            });
            t.bbox = d.bbox;
            t.last_seen = now;
            t.hits += 1;
            t.quality = *q;
            if !t.born && t.hits >= self.cfg.birth_hits {
                t.born = true;
                events.push(TrackEvent::Born(t.id));
            }
            if t.born {
                faces.push(self.face(ti, d.score, now));
            }
        }
        // Unmatched detections start tentative tracks.
        for (di, (d, q)) in detections.iter().enumerate() {
            if det_used[di] {
                continue;
            }
            let id = TrackId(self.next_id);
            self.next_id += 1;
            let born = self.cfg.birth_hits <= 1;
            self.tracks.push(Track {
                id,
                bbox: d.bbox,
                landmarks: d.landmarks,
                velocity: [0.0, 0.0],
                hits: 1,
                born,
                last_seen: now,
                last_scored: None,
                quality_at_score: 0.0,
                quality: *q,
            });
            if born {
                events.push(TrackEvent::Born(id));
                let ti = self.tracks.len() - 1;
                faces.push(self.face(ti, d.score, now));
            }
        }
        // Tentative tracks that missed die quietly; born ones after `patience`.
        let patience = self.cfg.patience;
        self.tracks.retain(|t| {
            let missed = t.last_seen != now;
            if !missed {
                return true;
            }
            if !t.born {
                return false;
            }
            if now.saturating_duration_since(t.last_seen) >= patience {
                events.push(TrackEvent::Lost(t.id));
                return false;
            }
            true
        });
        (faces, events)
    }

    fn face(&mut self, ti: usize, score: f32, now: Instant) -> TrackedFace {
        let cfg = &self.cfg;
        let t = &mut self.tracks[ti];
        let due = match t.last_scored {
            None => true,
            Some(at) => {
                now.saturating_duration_since(at) >= self.rescore_after
                    || t.quality >= t.quality_at_score * cfg.rescore_gain
            }
        };
        if due {
            t.last_scored = Some(now);
            t.quality_at_score = t.quality;
        }
        TrackedFace {
            track: t.id,
            bbox: t.bbox,
            landmarks: t.landmarks,
            score,
            due,
        }
    }

    /// Born tracks' predicted faces at `now`, for frames without detection. None is due: a
    /// face is scored on detected positions only. Also ends tracks past their patience.
    pub fn predict(&mut self, now: Instant) -> (Vec<TrackedFace>, Vec<TrackEvent>) {
        let mut events = Vec::new();
        let patience = self.cfg.patience;
        self.tracks.retain(|t| {
            let gone = now.saturating_duration_since(t.last_seen) >= patience;
            if gone && t.born {
                events.push(TrackEvent::Lost(t.id));
            }
            !gone
        });
        let faces = self
            .tracks
            .iter()
            .filter(|t| t.born)
            .map(|t| {
                let (bbox, landmarks) = t.predicted(now);
                TrackedFace {
                    track: t.id,
                    bbox,
                    landmarks,
                    score: 0.0,
                    due: false,
                }
            })
            .collect();
        (faces, events)
    }

    /// Where the tracks found by the last [`Tracker::update`] (tentative ones included) are
    /// predicted at `now`: the regions a detector re-detects them in between full searches.
    /// A track that update missed is left to the next full search, which comes at once (the
    /// miss makes the face stage search the next frame whole).
    pub fn regions(&self, now: Instant) -> Vec<BBox> {
        self.tracks
            .iter()
            .filter(|t| Some(t.last_seen) == self.last_update)
            .map(|t| t.predicted(now).0)
            .collect()
    }

    /// Ends every track (stream stopped or model swapped).
    pub fn clear(&mut self) -> Vec<TrackEvent> {
        self.tracks
            .drain(..)
            .filter(|t| t.born)
            .map(|t| TrackEvent::Lost(t.id))
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests;
