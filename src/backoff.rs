//! Retry timing shared by stream reconnects (`[ingest.backoff]`) and broker reconnects
//! (`[mqtt.backoff]`). A leaf: it imports only the config error types.
//!
//! Exponential backoff with full jitter ("Exponential Backoff And Jitter", AWS architecture
//! blog): failure `n` (from 0) waits `uniform(0, min(cap, base * 2^n))`. Full jitter spreads
//! the reconnects of many cameras (or many daemons) that failed together instead of having
//! them retry in lock step. A connection that stayed up for `reset_after` starts again from
//! `base` at its next failure.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::validation::Checker;

/// `base`: 10 ms to 1 min.
pub const BASE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(60);
/// `cap`: at least `base`, at most 1 h.
pub const CAP_MAX: Duration = Duration::from_secs(3600);
/// `reset_after`: 1 s to 1 day.
pub const RESET_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(86_400);

/// Retry timing: attempt `n` waits `uniform(0, min(cap, base * 2^n))`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffConfig {
    /// First ceiling. Range 10ms to 1m.
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    /// Largest ceiling. Range `base` to 1h.
    #[serde(with = "humantime_serde")]
    pub cap: Duration,
    /// A connection that stays up this long starts its next failure from `base` again.
    /// Range 1s to 1d.
    #[serde(with = "humantime_serde")]
    pub reset_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
        }
    }
}

impl BackoffConfig {
    /// Checks the ranges; `c` is the table's checker (e.g. `mqtt.backoff`).
    pub fn validate(&self, c: &mut Checker<'_>) {
        c.duration("base", self.base, BASE_RANGE);
        c.duration("cap", self.cap, self.base.min(CAP_MAX)..=CAP_MAX);
        c.duration("reset_after", self.reset_after, RESET_RANGE);
    }
}

/// The backoff state of one connection. Pure: time and randomness are passed in.
#[derive(Debug, Clone)]
pub struct Backoff {
    cfg: BackoffConfig,
    failures: u32,
    up_since: Option<Instant>,
}

impl Backoff {
    pub fn new(cfg: BackoffConfig) -> Self {
        Backoff {
            cfg,
            failures: 0,
            up_since: None,
        }
    }

    /// The ceiling of the next wait, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.cfg.base.saturating_mul(factor).min(self.cfg.cap)
    }

    /// The connection came up at `now` (a first frame, a CONNACK).
    pub fn on_up(&mut self, now: Instant) {
        self.up_since.get_or_insert(now);
    }

    /// The connection failed (or an attempt did) at `now`: the wait before the next attempt.
    /// `unit` is a uniform random number in `[0, 1)`.
    pub fn on_failure(&mut self, now: Instant, unit: f64) -> Duration {
        if let Some(since) = self.up_since.take()
            && now.saturating_duration_since(since) >= self.cfg.reset_after
        {
            self.failures = 0;
        }
        let d = self.ceiling().mul_f64(unit.clamp(0.0, 1.0));
        self.failures = self.failures.saturating_add(1);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BackoffConfig {
        BackoffConfig {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
            reset_after: Duration::from_secs(10),
        }
    }

    #[test]
    fn doubles_up_to_the_cap_with_full_jitter() {
        let mut b = Backoff::new(cfg());
        let t = Instant::now();
        let ceilings: Vec<u128> = (0..6)
            .map(|_| {
                let c = b.ceiling().as_millis();
                assert_eq!(b.on_failure(t, 0.5).as_millis(), c / 2);
                c
            })
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.on_failure(t, 0.0), Duration::ZERO);
        assert_eq!(b.on_failure(t, 7.0), Duration::from_secs(1), "unit clamped");
        for _ in 0..100 {
            b.on_failure(t, 0.99);
        }
        assert_eq!(b.ceiling(), Duration::from_secs(1), "no overflow");
    }

    #[test]
    fn resets_only_after_staying_up_for_reset_after() {
        let mut b = Backoff::new(cfg());
        let t0 = Instant::now();
        for _ in 0..3 {
            b.on_failure(t0, 0.5);
        }
        assert_eq!(b.ceiling(), Duration::from_millis(800));
        // Up for 9 s: not long enough, the backoff keeps growing.
        b.on_up(t0);
        b.on_failure(t0 + Duration::from_secs(9), 0.5);
        assert_eq!(b.ceiling(), Duration::from_secs(1));
        // Up for 10 s: the next failure starts from base.
        let t1 = t0 + Duration::from_secs(20);
        b.on_up(t1);
        let wait = b.on_failure(t1 + Duration::from_secs(10), 1.0);
        assert_eq!(wait, Duration::from_millis(100));
        // A failure without coming up does not reset.
        b.on_failure(t1 + Duration::from_secs(60), 1.0);
        assert_eq!(b.ceiling(), Duration::from_millis(400));
    }

    #[test]
    fn validate_refuses_a_zero_base_a_cap_below_base_and_huge_values() {
        let check = |c: BackoffConfig| {
            let mut errors = Vec::new();
            c.validate(&mut Checker::new("mqtt.backoff", &mut errors));
            errors.iter().map(|e| e.path.clone()).collect::<Vec<_>>()
        };
        assert!(check(cfg()).is_empty());
        let zero = BackoffConfig {
            base: Duration::ZERO,
            ..cfg()
        };
        assert_eq!(check(zero), ["mqtt.backoff.base"]);
        let below = BackoffConfig {
            cap: Duration::from_millis(50),
            ..cfg()
        };
        assert_eq!(check(below), ["mqtt.backoff.cap"]);
        let huge = BackoffConfig {
            cap: Duration::from_secs(u64::MAX / 4),
            reset_after: Duration::ZERO,
            ..cfg()
        };
        assert_eq!(
            check(huge),
            ["mqtt.backoff.cap", "mqtt.backoff.reset_after"]
        );
        // The edges are accepted.
        let edges = BackoffConfig {
            base: *BASE_RANGE.end(),
            cap: CAP_MAX,
            reset_after: *RESET_RANGE.start(),
        };
        assert!(check(edges).is_empty());
    }
}
