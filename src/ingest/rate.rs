//! Sampling a stream down to its analysis rate, decided per frame from its timestamp.
//!
//! Frames are admitted on a fixed grid of `1 / fps` so the average rate is exact even when the
//! source rate is not a multiple (29.97 fps sampled to 5 fps gives 5.000 fps, not 4.995). A
//! timestamp that jumps backwards (a file looping, a source reconnecting) or far forwards
//! (a gap) restarts the grid at that frame.

use std::time::Duration;

/// Decides which frames to keep. Pure: timestamps are passed in.
#[derive(Debug, Clone)]
pub struct RateGate {
    interval_ns: u64,
    tolerance_ns: u64,
    next_due_ns: Option<u64>,
    last_ns: Option<u64>,
}

impl RateGate {
    /// A gate admitting `fps` frames per second (`fps` > 0).
    pub fn new(fps: f64) -> Self {
        let interval_ns = (1e9 / fps).round().max(1.0) as u64;
        RateGate {
            interval_ns,
            // Absorbs rounding of timestamps; far below any frame period.
            tolerance_ns: (interval_ns / 20).min(1_000_000),
            next_due_ns: None,
            last_ns: None,
        }
    }

    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval_ns)
    }

    /// `true` if the frame at `t` (pts, or arrival time for sources without one) is kept.
    pub fn admit(&mut self, t: Duration) -> bool {
        let t = t.as_nanos().min(u64::MAX as u128) as u64;
        let i = self.interval_ns;
        let restart = match (self.next_due_ns, self.last_ns) {
            (None, _) | (_, None) => true,
            (Some(due), Some(last)) => t < last || t > due.saturating_add(4 * i),
        };
        self.last_ns = Some(t);
        if restart {
            self.next_due_ns = Some(t.saturating_add(i));
            return true;
        }
        let due = self.next_due_ns.unwrap_or(t);
        if t.saturating_add(self.tolerance_ns) < due {
            return false;
        }
        let mut next = due.saturating_add(i);
        // Source slower than the target rate: keep every frame, re-anchor the grid.
        if next.saturating_add(self.tolerance_ns) <= t {
            next = t.saturating_add(i);
        }
        self.next_due_ns = Some(next);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(gate: &mut RateGate, src_fps: f64, seconds: f64) -> usize {
        let n = (src_fps * seconds).round() as u64;
        (0..n)
            .filter(|k| gate.admit(Duration::from_nanos((*k as f64 * 1e9 / src_fps) as u64)))
            .count()
    }

    #[test]
    fn thirty_fps_sampled_to_five_keeps_every_sixth_frame() {
        let mut g = RateGate::new(5.0);
        let admitted: Vec<u64> = (0..30u64)
            .filter(|k| g.admit(Duration::from_nanos(k * 1_000_000_000 / 30)))
            .collect();
        assert_eq!(admitted, vec![0, 6, 12, 18, 24]);
    }

    #[test]
    fn non_multiple_rates_keep_the_exact_average() {
        assert_eq!(kept(&mut RateGate::new(5.0), 29.97, 100.0), 500);
        assert_eq!(kept(&mut RateGate::new(2.5), 25.0, 100.0), 250);
        assert_eq!(kept(&mut RateGate::new(7.0), 60.0, 10.0), 70);
    }

    #[test]
    fn slower_sources_pass_every_frame() {
        assert_eq!(kept(&mut RateGate::new(10.0), 4.0, 10.0), 40);
    }

    #[test]
    fn timestamps_going_backwards_restart_the_grid() {
        let mut g = RateGate::new(5.0);
        let ms = Duration::from_millis;
        assert!(g.admit(ms(9_000)));
        assert!(!g.admit(ms(9_100)));
        // File looped: pts back to 0, kept at once and sampled normally after.
        assert!(g.admit(ms(0)));
        assert!(!g.admit(ms(100)));
        assert!(g.admit(ms(200)));
        // A gap of seconds: kept at once.
        assert!(g.admit(ms(60_000)));
        assert!(!g.admit(ms(60_033)));
    }
}
