//! Metric primitives and the Prometheus text format (exposition format 0.0.4).
//!
//! Counters and histograms are lock-free atomics that the stages update in place
//! ([`stage`] holds the stages' counters); the HTTP handler takes a snapshot of the daemon
//! and [`families`] writes every family with [`Exposition`]. Names follow Prometheus
//! conventions: `dfwatch_` prefix, base units (seconds, bytes), `_total` on counters, no
//! per-track labels.

pub mod families;
pub mod stage;

pub use stage::{AnalysisMetrics, StreamMetrics};

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram with fixed upper bounds (`le`), cumulative on output.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One per bound, plus +Inf.
    buckets: Vec<AtomicU64>,
    /// Sum as f64 bits, updated with a CAS loop.
    sum: AtomicU64,
}

/// Latency buckets in seconds, 1 ms to 10 s (finer around the 0.05 to 1 s of live analysis).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5,
    2.5, 5.0, 10.0,
];
/// Batch-size buckets.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let mut cur = self.sum.load(Ordering::Relaxed);
        loop {
            let new = (f64::from_bits(cur) + v).to_bits();
            match self
                .sum
                .compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Ordering::Relaxed))
    }

    /// The smallest bound under which at least `q` of the observations fall (an upper
    /// estimate of the quantile; +Inf when it lies in the last bucket).
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let want = (q * total as f64).ceil() as u64;
        let mut cum = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cum += b.load(Ordering::Relaxed);
            if cum >= want {
                return Some(self.bounds.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        Some(f64::INFINITY)
    }
}

/// Escapes a label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn num(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

/// Writes metric families in the text format; each family's HELP and TYPE once, then its
/// samples.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self
    }

    pub fn sample(&mut self, name: &str, label_pairs: &[(&str, &str)], v: f64) -> &mut Self {
        let _ = writeln!(self.out, "{name}{} {}", labels(label_pairs), num(v));
        self
    }

    /// A whole histogram family member (buckets, sum, count) with `label_pairs`.
    pub fn histogram(&mut self, name: &str, label_pairs: &[(&str, &str)], h: &Histogram) {
        let mut cum = 0u64;
        for (i, b) in h.buckets.iter().enumerate() {
            cum += b.load(Ordering::Relaxed);
            let le = h.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            let le = num(le);
            let mut with: Vec<(&str, &str)> = label_pairs.to_vec();
            with.push(("le", &le));
            let _ = writeln!(self.out, "{name}_bucket{} {cum}", labels(&with));
        }
        let _ = writeln!(
            self.out,
            "{name}_sum{} {}",
            labels(label_pairs),
            num(h.sum())
        );
        let _ = writeln!(self.out, "{name}_count{} {cum}", labels(label_pairs));
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.5, 0.7, 3.0] {
            h.observe(v);
        }
        let mut e = Exposition::new();
        e.family("x_seconds", "histogram", "test");
        e.histogram("x_seconds", &[("stream", "a\"b")], &h);
        let text = e.finish();
        assert!(
            text.contains("x_seconds_bucket{stream=\"a\\\"b\",le=\"0.1\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("x_seconds_bucket{stream=\"a\\\"b\",le=\"1\"} 3\n"));
        assert!(text.contains("x_seconds_bucket{stream=\"a\\\"b\",le=\"+Inf\"} 4\n"));
        assert!(text.contains("x_seconds_count{stream=\"a\\\"b\"} 4\n"));
        assert!((h.sum() - 4.25).abs() < 1e-12);
        assert_eq!(h.quantile_bound(0.5), Some(1.0));
        assert_eq!(h.quantile_bound(0.25), Some(0.1));
        assert_eq!(h.quantile_bound(1.0), Some(f64::INFINITY));
    }

    #[test]
    fn counters_add_up_across_threads() {
        let c = std::sync::Arc::new(Counter::default());
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| c.inc()))
            })
            .collect();
        hs.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(c.get(), 4000);
    }
}
