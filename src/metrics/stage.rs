//! The counters the analysis stages update in place: one [`StreamMetrics`] per stream (face
//! stage and decision stage), one [`AnalysisMetrics`] for the shared encoder and decision.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use super::{BATCH_BUCKETS, Counter, Histogram, LATENCY_BUCKETS};

/// Counters of one stream's analysis.
#[derive(Debug, Default)]
pub struct StreamMetrics {
    pub frames_analysed: Counter,
    /// Full searches of a frame, and searches only around the tracks' predictions.
    pub detector_runs: Counter,
    pub detector_around_runs: Counter,
    pub detector_errors: Counter,
    pub faces_detected: Counter,
    /// Faces the tracker asked to have scored.
    pub faces_due: Counter,
    /// Due faces that could not be cropped (degenerate landmarks, wrong pixel format).
    pub faces_crop_failed: Counter,
    /// Due faces evicted from the full encode queue.
    pub faces_dropped_encode_queue: Counter,
    pub faces_scored: Counter,
    pub tracks_live: AtomicU64,
    /// CPU time spent in detection and in crop + quality + normalisation, nanoseconds
    /// (thread CPU time of the face stage).
    pub detect_ns: Counter,
    pub crop_ns: Counter,
    /// Panics the face stage caught and went on from.
    pub restarts: crate::fault::Restarts,
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

/// Counters of the shared stages (encoder, decision).
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
    /// Panics the encoder and the decision stage caught and went on from.
    pub encoder_restarts: crate::fault::Restarts,
    pub decide_restarts: crate::fault::Restarts,
    /// Frames the decision stage holds for evidence snapshots, and tracks that got none
    /// because `[events] held_frames` were already held.
    pub held_frames: std::sync::atomic::AtomicU64,
    pub held_frames_refused: Counter,
}

impl Default for AnalysisMetrics {
    fn default() -> Self {
        AnalysisMetrics {
            batch_size: Histogram::new(BATCH_BUCKETS),
            inference_seconds: Histogram::new(LATENCY_BUCKETS),
            decode_to_publish_seconds: Histogram::new(LATENCY_BUCKETS),
            score_errors: Counter::default(),
            alerts: Default::default(),
            encoder_restarts: Default::default(),
            decide_restarts: Default::default(),
            held_frames: Default::default(),
            held_frames_refused: Counter::default(),
        }
    }
}

impl AnalysisMetrics {
    /// One alert event of `kind` (new, update, end) and `verdict` handed to the publisher.
    pub fn count_alert(&self, kind: &'static str, verdict: &'static str) {
        *self
            .alerts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((kind, verdict))
            .or_default() += 1;
    }
}
