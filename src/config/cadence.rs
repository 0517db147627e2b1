//! Can a stream's scoring cadence ever fill the evidence window? A cross-section rule
//! (`[ingest]` or the stream's rate, `[track]`, `[evidence]`), so it lives here, beside the
//! sections it reads.
//!
//! A steady face is scored every `track.frames_per_score(fps)` analysed frames (see
//! [`TrackConfig::frames_per_score`]). A verdict needs `min_frames` faces spanning
//! `min_duration`, all inside `window`. So the span the first verdict needs is
//! `max((min_frames - 1) x period, min_duration rounded up to whole periods)`, and with one
//! analysed frame of margin (arrival jitter, a late frame) it must fit in `window`.

use std::time::Duration;

use crate::evidence::EvidenceConfig;
use crate::track::TrackConfig;
use crate::validation::human;

/// The cadence of one analysis rate under `[track]` and `[evidence]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cadence {
    pub fps: f64,
    /// One analysed frame.
    pub frame: Duration,
    /// Analysed frames between two scorings of a steady face.
    pub frames_per_score: u64,
    /// `frames_per_score` frames.
    pub scoring_period: Duration,
    /// The span of faces the first verdict needs.
    pub span_needed: Duration,
    /// One analysed frame: arrival jitter and a late frame.
    pub margin: Duration,
    pub window: Duration,
}

impl Cadence {
    pub fn new(fps: f64, track: &TrackConfig, evidence: &EvidenceConfig) -> Cadence {
        // Any rate, even one validation refuses (NaN, 0, infinite), gives a finite frame.
        let rate = if fps.is_finite() {
            fps.clamp(1e-3, 1e6)
        } else {
            1e6
        };
        let frame = Duration::try_from_secs_f64(1.0 / rate).unwrap_or(Duration::from_secs(1000));
        let frames_per_score = track.frames_per_score(fps).min(u64::from(u32::MAX));
        let scoring_period = frame.saturating_mul(frames_per_score as u32);
        let by_count = scoring_period.saturating_mul(evidence.min_frames.saturating_sub(1) as u32);
        let by_duration = if scoring_period.is_zero() {
            evidence.min_duration
        } else {
            let periods = evidence
                .min_duration
                .as_nanos()
                .div_ceil(scoring_period.as_nanos());
            scoring_period.saturating_mul(periods.min(u128::from(u32::MAX)) as u32)
        };
        Cadence {
            fps,
            frame,
            frames_per_score,
            scoring_period,
            span_needed: by_count.max(by_duration),
            margin: frame,
            window: evidence.window,
        }
    }

    /// The window can hold what the first verdict needs.
    pub fn fits(&self) -> bool {
        self.span_needed.saturating_add(self.margin) <= self.window
    }

    /// Worst case from a steadily fake face appearing to its `new` alert, before the
    /// pipeline's own latency (encode, score, publish): waiting for the next full search
    /// (`detect_every` frames), `birth_hits - 1` more frames (the track is re-detected on
    /// each around its prediction), the span the verdict needs, the margin.
    pub fn alert_delay(&self, track: &TrackConfig) -> Duration {
        self.frame
            .saturating_mul(track.detect_every.max(1))
            .saturating_add(
                self.frame
                    .saturating_mul(track.birth_hits.max(1).saturating_sub(1)),
            )
            .saturating_add(self.span_needed)
            .saturating_add(self.margin)
    }

    /// Why the window cannot hold the first verdict, with the arithmetic; `rate_key` names
    /// where the rate comes from.
    pub fn explain(
        &self,
        rate_key: &str,
        track: &TrackConfig,
        evidence: &EvidenceConfig,
    ) -> String {
        let needed = self.span_needed.saturating_add(self.margin);
        format!(
            "at {fps} fps ({rate_key}) a steady face is scored at best every {period} \
             (track.score_every = {every} rounded up to {n} whole frame(s) of {frame}); a \
             verdict needs evidence.min_frames = {m} faces \
             spanning at least evidence.min_duration = {md}: {span}, plus one frame of \
             margin for jitter = {needed}, more than evidence.window = {window}. Raise \
             evidence.window to at least {needed}, lower evidence.min_frames or \
             track.score_every, or raise the analysis rate",
            fps = self.fps,
            period = human(self.scoring_period),
            every = human(track.score_every),
            n = self.frames_per_score,
            frame = human(self.frame),
            m = evidence.min_frames,
            md = human(evidence.min_duration),
            span = human(self.span_needed),
            needed = human(needed),
            window = human(self.window),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn the_shipped_defaults_fill_the_window_from_1_5_to_60_fps() {
        let (t, e) = (TrackConfig::default(), EvidenceConfig::default());
        for fps in [
            1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 25.0, 30.0, 60.0,
        ] {
            let c = Cadence::new(fps, &t, &e);
            assert!(c.fits(), "{fps} fps: {c:?}");
        }
        // At the default 5 fps: every 3rd frame (600 ms), 5 faces span 2.4 s.
        let c = Cadence::new(5.0, &t, &e);
        assert_eq!(
            (
                c.frames_per_score,
                c.scoring_period,
                c.span_needed,
                c.margin
            ),
            (3, ms(600), ms(2400), ms(200))
        );
        // The next full search (5 frames, 1 s), birth on the second hit (the next frame,
        // searched around the prediction), 2.4 s of faces, one frame of margin.
        assert_eq!(c.alert_delay(&t), ms(3800));
    }

    #[test]
    fn the_old_defaults_are_refused_with_the_arithmetic() {
        // The defaults before this check: 1 s cadence, 3 s window, 4 faces. At 5 fps a face
        // is scored every 5 frames: 4 faces need 3 s plus a frame, more than the window.
        let t = TrackConfig {
            score_every: Duration::from_secs(1),
            ..TrackConfig::default()
        };
        let e = EvidenceConfig {
            window: Duration::from_secs(3),
            min_frames: 4,
            ..EvidenceConfig::default()
        };
        let c = Cadence::new(5.0, &t, &e);
        assert!(!c.fits());
        let why = c.explain("ingest.analysis_fps", &t, &e);
        assert!(
            why.starts_with("at 5 fps (ingest.analysis_fps) a steady face is scored at best every 1s")
                && why.contains("evidence.min_frames = 4 faces")
                && why.contains(": 3s, plus one frame of margin for jitter = 3s 200ms, more than evidence.window = 3s"),
            "{why}"
        );
    }

    #[test]
    fn min_duration_stretches_the_span_and_detect_every_does_not() {
        let t = TrackConfig {
            score_every: ms(300),
            detect_every: 3,
            ..TrackConfig::default()
        };
        let e = EvidenceConfig {
            min_frames: 2,
            min_duration: ms(2500),
            ..EvidenceConfig::default()
        };
        // 300 ms at 10 fps is 3 frames: 300 ms; min_duration 2.5 s rounds up to 9 periods =
        // 2.7 s, more than 1 period for 2 faces.
        let c = Cadence::new(10.0, &t, &e);
        assert_eq!((c.scoring_period, c.span_needed), (ms(300), ms(2700)));
        assert!(c.fits());
        // At 1 fps: one frame, 1 s (tracks are re-detected around their predictions between
        // full searches, so detect_every does not stretch it); min_duration rounds up to 3
        // periods; 3 s + 1 s of margin fits the 4 s window exactly.
        let c = Cadence::new(1.0, &t, &e);
        assert_eq!((c.scoring_period, c.span_needed), (ms(1000), ms(3000)));
        assert!(c.fits());
        // The full search's cadence is in the alert delay: 3 frames until a new face is
        // found, 1 more for its birth, the span, the margin.
        assert_eq!(c.alert_delay(&t), ms(3000 + 1000 + 3000 + 1000));
        let e5 = EvidenceConfig { min_frames: 5, ..e };
        assert!(!Cadence::new(1.0, &t, &e5).fits());
        // Below 1.5 fps the shipped defaults need a longer window.
        let defaults = (TrackConfig::default(), EvidenceConfig::default());
        assert!(!Cadence::new(1.0, &defaults.0, &defaults.1).fits());
    }

    #[test]
    fn any_rate_gives_a_finite_cadence_without_panicking() {
        // Found by tests/properties.rs: a NaN rate used to panic in Duration::from_secs_f64.
        let (t, e) = (TrackConfig::default(), EvidenceConfig::default());
        for fps in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            0.0,
            -5.0,
            1e300,
            1e-300,
        ] {
            let c = Cadence::new(fps, &t, &e);
            assert!(
                !c.frame.is_zero() && c.frame <= Duration::from_secs(1000),
                "{fps}: {c:?}"
            );
            let _ = (c.fits(), c.alert_delay(&t), c.explain("x", &t, &e));
        }
    }
}
