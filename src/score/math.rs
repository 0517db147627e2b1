//! Numeric kernels for scoring, written so the compiler vectorises them (no libm calls in the
//! inner loops).

/// Cosine of two embeddings, in f64 (how two engines' outputs are compared).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// `exp(x)` for `x <= 0`, to about 1e-14 relative error; `0` below `-708`.
///
/// Range reduction `x = k ln2 + r` with `|r| <= ln2 / 2`, a degree-11 Taylor polynomial for
/// `e^r`, and `2^k` built from the bits of the rounding constant, so every step is plain
/// float and integer arithmetic that vectorises (std's `exp` is a library call per value).
#[inline(always)]
pub fn exp_nonpositive(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // 1.5 * 2^52: adding it rounds to an integer held in the low mantissa bits.
    const SHIFT: f64 = 6_755_399_441_055_744.0;
    let underflow = x < -708.0;
    let x = x.clamp(-708.0, 0.0);
    let t = x * LOG2E + SHIFT;
    let k = t - SHIFT;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    // Horner form of sum r^i / i!, i = 0..=11.
    let mut p = 1.0 / 39_916_800.0;
    p = p * r + 1.0 / 3_628_800.0;
    p = p * r + 1.0 / 362_880.0;
    p = p * r + 1.0 / 40_320.0;
    p = p * r + 1.0 / 5_040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // The low 12 bits of t's mantissa hold k (mod 4096); k + 1023 is in [1, 1023] here.
    let scale = f64::from_bits(t.to_bits().wrapping_add(1023) << 52);
    if underflow { 0.0 } else { p * scale }
}

/// Dot product with eight independent partial sums, so it vectorises (a single running sum
/// is a serial chain of additions the compiler may not reorder). On x86-64 CPUs with AVX2
/// and FMA (checked once at run time, then a cached flag) the same loop runs compiled for
/// them: four f64 lanes and fused multiply-adds instead of SSE2's two lanes.
#[inline]
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if simd::avx2_fma() {
        return simd::dot_avx2_fma(a, b);
    }
    dot_lanes::<f64, false>(a, b)
}

/// Dot product of two f32 vectors in f64: each product and the sums are those of the values
/// widened to f64 (as [`dot`] on widened copies, without the copies).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if simd::avx2_fma() {
        return simd::dot_f32_avx2_fma(a, b);
    }
    dot_lanes::<f32, false>(a, b)
}

/// The loop behind [`dot`] and [`dot_f32`]: values widened to f64, eight partial sums;
/// `FMA` fuses the multiply-adds (only where the hardware has them: without it `mul_add` is
/// a slow library call).
#[inline(always)]
fn dot_lanes<T: Copy + Into<f64>, const FMA: bool>(a: &[T], b: &[T]) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0.0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| (*x).into() * (*y).into())
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..LANES {
            let (x, y): (f64, f64) = (x[k].into(), y[k].into());
            acc[k] = if FMA {
                x.mul_add(y, acc[k])
            } else {
                acc[k] + x * y
            };
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// The one place with `unsafe` outside the GPU module: the dot product compiled for AVX2 and
/// FMA, called only after the CPU was seen to have both.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::sync::atomic::{AtomicU8, Ordering};

    /// 0: not checked yet, 1: no, 2: yes.
    static AVX2_FMA: AtomicU8 = AtomicU8::new(0);

    #[inline]
    pub fn avx2_fma() -> bool {
        match AVX2_FMA.load(Ordering::Relaxed) {
            2 => true,
            1 => false,
            _ => {
                let yes = std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma");
                AVX2_FMA.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
                yes
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn dot_avx2_fma_inner(a: &[f64], b: &[f64]) -> f64 {
        super::dot_lanes::<f64, true>(a, b)
    }

    #[target_feature(enable = "avx2,fma")]
    fn dot_f32_avx2_fma_inner(a: &[f32], b: &[f32]) -> f64 {
        super::dot_lanes::<f32, true>(a, b)
    }

    /// Callers check [`avx2_fma`] first.
    #[inline]
    pub fn dot_f32_avx2_fma(a: &[f32], b: &[f32]) -> f64 {
        debug_assert!(avx2_fma());
        // SAFETY: as for `dot_avx2_fma`.
        unsafe { dot_f32_avx2_fma_inner(a, b) }
    }

    /// Callers check [`avx2_fma`] first.
    #[inline]
    pub fn dot_avx2_fma(a: &[f64], b: &[f64]) -> f64 {
        debug_assert!(avx2_fma());
        // SAFETY: only reached when `avx2_fma()` saw both features on this CPU, so every
        // instruction the function was compiled with exists here; it reads only its slices.
        unsafe { dot_avx2_fma_inner(a, b) }
    }
}

/// `log(e^a + e^b)` without overflow.
#[inline]
pub fn log_add_exp(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_std_exp_across_the_range() {
        let mut worst: f64 = 0.0;
        let mut x: f64 = 0.0;
        while x > -708.0 {
            let want = x.exp();
            let got = exp_nonpositive(x);
            worst = worst.max(((got - want) / want).abs());
            x -= 0.001_37;
        }
        assert!(worst < 2e-14, "worst relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-800.0), 0.0);
        assert_eq!(exp_nonpositive(f64::NEG_INFINITY), 0.0);
    }

    #[test]
    fn dot_handles_tails_and_matches_the_plain_sum() {
        for n in [0usize, 1, 7, 8, 9, 512, 515] {
            let a: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
            let b: Vec<f64> = (0..n).map(|i| (i as f64 * 0.11).cos()).collect();
            let plain: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - plain).abs() < 1e-12, "n = {n}");
        }
    }

    /// Whichever path this CPU takes (AVX2+FMA or the portable loop), f32 and f64 inputs
    /// give the plain widened sum; the portable f32 loop is the f64 one on widened copies.
    #[test]
    fn every_dot_path_agrees() {
        for n in [0usize, 1, 7, 8, 9, 512, 515] {
            let a32: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let b32: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let a: Vec<f64> = a32.iter().map(|&v| f64::from(v)).collect();
            let b: Vec<f64> = b32.iter().map(|&v| f64::from(v)).collect();
            let portable = dot_lanes::<f64, false>(&a, &b);
            assert_eq!(dot_lanes::<f32, false>(&a32, &b32), portable, "n = {n}");
            assert!((dot(&a, &b) - portable).abs() < 1e-12, "n = {n}");
            assert!((dot_f32(&a32, &b32) - portable).abs() < 1e-12, "n = {n}");
        }
    }

    #[test]
    fn log_add_exp_is_stable() {
        assert!((log_add_exp(0.0, 0.0) - 2f64.ln()).abs() < 1e-15);
        assert_eq!(log_add_exp(1e4, 0.0), 1e4);
        assert!((log_add_exp(-1e4, 0.0)).abs() < 1e-300);
        assert_eq!(log_add_exp(3.0, f64::NEG_INFINITY), 3.0);
    }
}
