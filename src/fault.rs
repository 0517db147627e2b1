//! Supervision of the daemon's stages, and the switch that tests use to prove it.
//!
//! A panic in a stage (a face stage, the encoder, the decision stage, the publisher) is caught
//! where the stage loops, counted in its [`Restarts`], reported (log, `/readyz` degraded,
//! `/api/streams`, metrics), and the stage goes on after a backoff with fresh per-item state.
//!
//! [`inject`] is a test switch, compiled only into builds with debug assertions (the tests';
//! never a release build) and off unless `DFWATCH_FAULT_INJECT` is set in the daemon's
//! environment: `faces=3,encoder=5` makes the 3rd call at the `faces` point and the 5th at
//! `encoder` panic (once each). Points: `faces` (per analysed frame), `encoder` (per batch),
//! `decide` (per embedding), `publisher` (per request). A leaf: it imports nothing of the
//! crate.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The environment variable of [`inject`].
pub const ENV: &str = "DFWATCH_FAULT_INJECT";

#[cfg(debug_assertions)]
type Plan = std::collections::HashMap<String, (u64, AtomicU64)>;

#[cfg(debug_assertions)]
fn plan() -> &'static Plan {
    static PLAN: std::sync::OnceLock<Plan> = std::sync::OnceLock::new();
    PLAN.get_or_init(|| {
        std::env::var(ENV)
            .unwrap_or_default()
            .split(',')
            .filter_map(|p| {
                let (name, n) = p.split_once('=')?;
                Some((
                    name.trim().to_string(),
                    (n.trim().parse().ok()?, AtomicU64::new(0)),
                ))
            })
            .collect()
    })
}

/// Panics at the configured call of `point` (see the module doc); nothing otherwise. Only in
/// builds with debug assertions (the tests'): a release build (what users run, `cargo run
/// --release` and the Debian package) compiles it to nothing, whatever the environment says.
#[inline]
pub fn inject(point: &str) {
    #[cfg(debug_assertions)]
    {
        let plan = plan();
        if plan.is_empty() {
            return;
        }
        if let Some((at, seen)) = plan.get(point)
            && seen.fetch_add(1, Ordering::Relaxed) + 1 == *at
        {
            panic!("fault injected at {point} ({ENV})");
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

/// The text of a caught panic.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// How a stage has been restarted: a count, the last reason and when.
#[derive(Debug, Default)]
pub struct Restarts {
    count: AtomicU64,
    last: Mutex<Option<(Instant, String)>>,
}

/// How long after a restart the daemon reports itself degraded.
pub const DEGRADED_FOR: Duration = Duration::from_secs(300);

impl Restarts {
    /// Records a restart for `reason` ("a panic: ...", "a device error: ...": it completes
    /// "restarted after"); returns the wait before the stage goes on (doubling
    /// from 100 ms with each restart in quick succession, at most 5 s).
    pub fn record(&self, stage: &str, reason: &str) -> Duration {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let quick = last
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < Duration::from_secs(60));
        *last = Some((Instant::now(), reason.to_string()));
        tracing::error!(
            stage,
            restarts = n,
            reason,
            "A stage failed; it goes on after a backoff."
        );
        if quick {
            Duration::from_millis(100)
                .saturating_mul(1u32 << n.min(6))
                .min(Duration::from_secs(5))
        } else {
            Duration::from_millis(100)
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The last reason, while it is recent enough to call the daemon degraded.
    pub fn recent(&self) -> Option<String> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref()
            .filter(|(at, _)| at.elapsed() < DEGRADED_FOR)
            .map(|(_, why)| why.clone())
    }

    /// The last reason, however old.
    pub fn last_reason(&self) -> Option<String> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref().map(|(_, why)| why.clone())
    }
}

/// Runs `f`, catching a panic: `Err(message)` then.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| panic_message(&*p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_and_stay_reported_for_a_while() {
        let r = Restarts::default();
        assert_eq!(r.recent(), None);
        assert_eq!(r.record("test", "boom"), Duration::from_millis(100));
        let second = r.record("test", "boom again");
        assert!(second > Duration::from_millis(100), "{second:?}");
        assert_eq!(r.count(), 2);
        assert_eq!(r.recent().as_deref(), Some("boom again"));
        assert_eq!(catch(|| 7), Ok(7));
        let e = catch(|| -> u32 { panic!("in a stage") }).unwrap_err();
        assert_eq!(e, "in a stage");
    }
}
