//! Detection metrics for `dfwatch eval`: ROC, AUC, average precision, EER, accuracy, and
//! seeded bootstrap intervals. Label `true` is fake (the positive class); a higher score
//! means more likely fake.
//!
//! Definitions (the report repeats them):
//! - **ROC**: one point per distinct score, from the highest down, plus (0, 0): a sample is
//!   called fake when its score is at or above the threshold. Ties move together, so a tie
//!   between a real and a fake sample is a diagonal segment.
//! - **AUC**: the area under that ROC by the trapezoid rule, which equals the probability
//!   that a random fake scores above a random real, ties counting one half
//!   (scikit-learn's `roc_auc_score`).
//! - **AP**: `sum_k (R_k - R_(k-1)) P_k` over the distinct thresholds from the highest down,
//!   `R_0 = 0` (scikit-learn's `average_precision_score`: no interpolation).
//! - **EER**: walking the ROC points in order, the first segment where FPR - FNR (FNR =
//!   1 - TPR) goes from below zero to zero or above; the EER is the FPR where that
//!   difference is zero on the straight line between the two points (there FPR = FNR).
//! - **Accuracy at t**: the fraction of samples whose call at score >= t matches the label.
//! - **Bootstrap**: `B` resamples with replacement of the units (videos; for frame-level
//!   metrics, a resampled video brings all its frames), a resample holding one class only
//!   is skipped and counted; the interval is the 2.5th and 97.5th percentiles (linear
//!   interpolation between order statistics) of the metric over the kept resamples.

use serde::Serialize;

/// A sample: its score and whether it is fake.
pub type Sample = (f64, bool);

/// One ROC point.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RocPoint {
    pub threshold: f64,
    pub fpr: f64,
    pub tpr: f64,
}

/// Counts of each class; `None` from every metric when either is zero, or when a score is
/// not a finite number (no metric is made of a NaN).
fn class_counts(samples: &[Sample]) -> Option<(usize, usize)> {
    if samples.iter().any(|s| !s.0.is_finite()) {
        return None;
    }
    let pos = samples.iter().filter(|s| s.1).count();
    let neg = samples.len() - pos;
    (pos > 0 && neg > 0).then_some((pos, neg))
}

/// Cumulative (threshold, true positives, false positives) at each distinct score, highest
/// first. Scores must be finite (callers filter).
fn cumulative(samples: &[Sample]) -> Vec<(f64, usize, usize)> {
    let mut sorted: Vec<Sample> = samples.to_vec();
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut out: Vec<(f64, usize, usize)> = Vec::new();
    let (mut tp, mut fp) = (0usize, 0usize);
    for (i, &(score, fake)) in sorted.iter().enumerate() {
        if fake {
            tp += 1;
        } else {
            fp += 1;
        }
        let last_of_tie = sorted.get(i + 1).is_none_or(|next| next.0 != score);
        if last_of_tie {
            out.push((score, tp, fp));
        }
    }
    out
}

/// The ROC curve with its (0, 0) start (threshold +inf), or `None` without both classes.
pub fn roc(samples: &[Sample]) -> Option<Vec<RocPoint>> {
    let (pos, neg) = class_counts(samples)?;
    let mut pts = vec![RocPoint {
        threshold: f64::INFINITY,
        fpr: 0.0,
        tpr: 0.0,
    }];
    for (t, tp, fp) in cumulative(samples) {
        pts.push(RocPoint {
            threshold: t,
            fpr: fp as f64 / neg as f64,
            tpr: tp as f64 / pos as f64,
        });
    }
    Some(pts)
}

/// Area under the ROC curve.
pub fn auc(samples: &[Sample]) -> Option<f64> {
    let pts = roc(samples)?;
    Some(
        pts.windows(2)
            .map(|w| (w[1].fpr - w[0].fpr) * (w[1].tpr + w[0].tpr) / 2.0)
            .sum(),
    )
}

/// Average precision (no interpolation).
pub fn average_precision(samples: &[Sample]) -> Option<f64> {
    let (pos, _) = class_counts(samples)?;
    let mut ap = 0.0;
    let mut prev_recall = 0.0;
    for (_, tp, fp) in cumulative(samples) {
        let recall = tp as f64 / pos as f64;
        let precision = tp as f64 / (tp + fp) as f64;
        ap += (recall - prev_recall) * precision;
        prev_recall = recall;
    }
    Some(ap)
}

/// Equal error rate (see the module's definition).
pub fn eer(samples: &[Sample]) -> Option<f64> {
    let pts = roc(samples)?;
    let diff = |p: &RocPoint| p.fpr - (1.0 - p.tpr);
    for w in pts.windows(2) {
        let (a, b) = (diff(&w[0]), diff(&w[1]));
        if a < 0.0 && b >= 0.0 {
            let t = a / (a - b);
            return Some(w[0].fpr + t * (w[1].fpr - w[0].fpr));
        }
    }
    // The first point has FPR - FNR = -1 and the last +1, so a crossing always exists.
    None
}

/// Fraction of samples whose call at `score >= threshold` matches the label.
pub fn accuracy(samples: &[Sample], threshold: f64) -> Option<f64> {
    if samples.is_empty() || samples.iter().any(|s| !s.0.is_finite()) {
        return None;
    }
    let right = samples
        .iter()
        .filter(|(s, fake)| (*s >= threshold) == *fake)
        .count();
    Some(right as f64 / samples.len() as f64)
}

/// SplitMix64: a tiny generator whose sequence is fixed by its seed on every platform and
/// version, so a report's intervals can be reproduced from the seed it states.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0), by the multiply-shift map.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// The `p`-quantile (0..=1) of sorted values, linear between order statistics.
pub fn quantile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let h = (sorted.len() - 1) as f64 * p.clamp(0.0, 1.0);
    let lo = h.floor() as usize;
    let hi = h.ceil() as usize;
    Some(sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo]))
}

/// A metric with its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    pub value: f64,
    /// 2.5th percentile over the resamples.
    pub low: f64,
    /// 97.5th percentile.
    pub high: f64,
    /// Resamples the interval is made of (those with both classes).
    pub resamples: usize,
}

/// Bootstrap settings.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Bootstrap {
    pub resamples: usize,
    pub seed: u64,
}

/// `metric` over the samples of every unit, with its interval from resampling units: each
/// unit is a group of samples (a video's frames, or one sample). The same seed gives the same
/// resamples for every metric of a report.
pub fn estimate(
    units: &[Vec<Sample>],
    metric: fn(&[Sample]) -> Option<f64>,
    boot: Bootstrap,
) -> Option<Estimate> {
    let all: Vec<Sample> = units.iter().flatten().copied().collect();
    let value = metric(&all)?;
    let mut rng = SplitMix64::new(boot.seed);
    let mut values = Vec::with_capacity(boot.resamples);
    let mut pool: Vec<Sample> = Vec::with_capacity(all.len());
    for _ in 0..boot.resamples {
        pool.clear();
        for _ in 0..units.len() {
            pool.extend_from_slice(&units[rng.below(units.len())]);
        }
        if let Some(v) = metric(&pool) {
            values.push(v);
        }
    }
    values.sort_by(f64::total_cmp);
    Some(Estimate {
        value,
        low: quantile(&values, 0.025).unwrap_or(f64::NAN),
        high: quantile(&values, 0.975).unwrap_or(f64::NAN),
        resamples: values.len(),
    })
}

/// Accuracy at 0.5, as a metric function (one class is enough: on real videos only it is
/// 1 - FPR at 0.5).
pub fn accuracy_at_half(samples: &[Sample]) -> Option<f64> {
    accuracy(samples, 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_and_inverted_rankings() {
        let s = [(0.9, true), (0.8, true), (0.2, false), (0.1, false)];
        assert_eq!(auc(&s), Some(1.0));
        assert_eq!(average_precision(&s), Some(1.0));
        assert_eq!(eer(&s), Some(0.0));
        let inv: Vec<Sample> = s.iter().map(|&(x, f)| (x, !f)).collect();
        assert_eq!(auc(&inv), Some(0.0));
        assert_eq!(eer(&inv), Some(1.0));
    }

    #[test]
    fn all_tied_scores_are_chance() {
        let s = [(0.5, true), (0.5, false), (0.5, true), (0.5, false)];
        assert_eq!(auc(&s), Some(0.5));
        assert_eq!(eer(&s), Some(0.5));
        assert_eq!(average_precision(&s), Some(0.5));
    }

    #[test]
    fn one_class_has_no_metric() {
        let s = [(0.9, true), (0.1, true)];
        assert_eq!(auc(&s), None);
        assert_eq!(eer(&s), None);
        assert_eq!(average_precision(&s), None);
        assert_eq!(accuracy(&s, 0.5), Some(0.5));
        assert_eq!(accuracy_at_half(&s), Some(0.5));
    }

    #[test]
    fn a_nan_score_gives_no_metric() {
        let s = [(0.9, true), (f64::NAN, false), (0.1, false)];
        assert_eq!(auc(&s), None);
        assert_eq!(average_precision(&s), None);
        assert_eq!(eer(&s), None);
        assert_eq!(accuracy(&s, 0.5), None);
    }

    #[test]
    fn bootstrap_is_reproducible_and_brackets_the_value() {
        let mut rng = SplitMix64::new(1);
        let units: Vec<Vec<Sample>> = (0..60)
            .map(|i| {
                let fake = i % 2 == 0;
                let x = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                vec![(x + if fake { 0.3 } else { 0.0 }, fake)]
            })
            .collect();
        let boot = Bootstrap {
            resamples: 200,
            seed: 9,
        };
        let a = estimate(&units, auc, boot).unwrap();
        let b = estimate(&units, auc, boot).unwrap();
        assert_eq!(a, b);
        assert!(a.low <= a.value && a.value <= a.high, "{a:?}");
        assert!(a.high - a.low > 0.01, "{a:?}");
        assert_eq!(a.resamples, 200);
        let c = estimate(&units, auc, Bootstrap { seed: 10, ..boot }).unwrap();
        assert_ne!(a.low, c.low);
    }

    /// Golden values from scikit-learn (tools/eval_golden.py): random, separated, tied,
    /// imbalanced and all-tied scores.
    #[test]
    fn metrics_match_scikit_learn_to_1e9() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/eval/golden.json"
        );
        let golden: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let cases = golden["cases"].as_array().unwrap();
        assert!(cases.len() >= 7);
        for c in cases {
            let name = c["name"].as_str().unwrap();
            let samples: Vec<Sample> = c["scores"]
                .as_array()
                .unwrap()
                .iter()
                .zip(c["labels"].as_array().unwrap())
                .map(|(s, l)| (s.as_f64().unwrap(), l.as_i64().unwrap() == 1))
                .collect();
            for (key, got) in [
                ("auc", auc(&samples)),
                ("ap", average_precision(&samples)),
                ("eer", eer(&samples)),
                ("accuracy", accuracy(&samples, 0.5)),
            ] {
                let want = c[key].as_f64().unwrap();
                let got = got.unwrap();
                assert!(
                    (got - want).abs() <= 1e-9,
                    "{name}: {key} {got} against scikit-learn's {want}"
                );
            }
        }
    }

    #[test]
    fn quantile_interpolates_like_numpy() {
        let v = [1.0, 2.0, 4.0, 8.0];
        assert_eq!(quantile(&v, 0.0), Some(1.0));
        assert_eq!(quantile(&v, 1.0), Some(8.0));
        assert_eq!(quantile(&v, 0.5), Some(3.0));
        assert!((quantile(&v, 0.025).unwrap() - 1.075).abs() < 1e-12);
    }
}
