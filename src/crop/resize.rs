//! Pillow's `Image.resize(size, BICUBIC)` for 8-bit RGB, reproduced in its integer arithmetic.
//!
//! SJEDD's crops go through torchvision `Resize(224, BICUBIC)` on a PIL image, which is
//! Pillow's separable resampler: for each output pixel, a bicubic kernel (a = -0.5) stretched
//! by the downscale factor (antialiasing), weights normalised to sum 1 and turned into 22-bit
//! fixed point, a horizontal pass into an 8-bit intermediate, then a vertical pass, each
//! rounded and clipped to 0..255. Doing the same integer steps gives the same bytes (see the
//! test against a Pillow output in tests/fixtures/resize).

/// Fixed-point precision of the weights (Pillow: 32 - 8 - 2).
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output index: the first input index and the fixed-point weights.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) cast truncates towards zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin);
            let mut k: Vec<f64> = (0..n)
                .map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = k.iter().sum();
            if total != 0.0 {
                for w in k.iter_mut() {
                    *w /= total;
                }
            }
            let fixed = k
                .iter()
                .map(|&w| {
                    let v = w * f64::from(1u32 << PRECISION_BITS);
                    if w < 0.0 {
                        (v - 0.5) as i32
                    } else {
                        (v + 0.5) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

/// Rounding offset added before the final shift.
const HALF: i64 = 1 << (PRECISION_BITS - 1);

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes packed RGB8 `src` (`w x h`, rows of `3 * w` bytes) to `out_w x out_h`.
pub fn resize_rgb_bicubic(src: &[u8], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    assert_eq!(src.len(), 3 * w * h, "source is not {w}x{h} RGB");
    // Horizontal pass (skipped when the width does not change, as Pillow does).
    let horizontal: Vec<u8> = if out_w == w {
        src.to_vec()
    } else {
        let cx = coefficients(w, out_w);
        let mut tmp = vec![0u8; 3 * out_w * h];
        for (row, out) in src.chunks_exact(3 * w).zip(tmp.chunks_exact_mut(3 * out_w)) {
            for ((xmin, k), px) in cx.iter().zip(out.chunks_exact_mut(3)) {
                let taps = &row[3 * xmin..3 * (xmin + k.len())];
                let mut acc = [HALF; 3];
                for (p, &kw) in taps.chunks_exact(3).zip(k) {
                    let kw = i64::from(kw);
                    acc[0] += i64::from(p[0]) * kw;
                    acc[1] += i64::from(p[1]) * kw;
                    acc[2] += i64::from(p[2]) * kw;
                }
                px.copy_from_slice(&acc.map(clip8));
            }
        }
        tmp
    };
    if out_h == h {
        return horizontal;
    }
    // Vertical pass: whole rows at a time, so the inner loop runs over contiguous bytes.
    let cy = coefficients(h, out_h);
    let row_len = 3 * out_w;
    let mut out = vec![0u8; row_len * out_h];
    let mut acc = vec![0i32; row_len];
    for ((ymin, k), dst) in cy.iter().zip(out.chunks_exact_mut(row_len)) {
        acc.fill(HALF as i32);
        for (i, &kw) in k.iter().enumerate() {
            let row = &horizontal[row_len * (ymin + i)..row_len * (ymin + i + 1)];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += i32::from(p) * kw;
            }
        }
        for (d, &a) in dst.iter_mut().zip(&acc) {
            *d = clip8(i64::from(a));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(317, 224), (224, 224), (100, 37), (37, 100)] {
            for (_, k) in coefficients(i, o) {
                let s: i64 = k.iter().map(|&v| i64::from(v)).sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{i}->{o}: {s}"
                );
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat_and_same_size_is_identity() {
        let src = vec![77u8; 3 * 50 * 40];
        assert!(
            resize_rgb_bicubic(&src, 50, 40, 20, 17)
                .iter()
                .all(|&v| v == 77)
        );
        let ramp: Vec<u8> = (0..3 * 9 * 9).map(|i| (i * 3 % 256) as u8).collect();
        assert_eq!(resize_rgb_bicubic(&ramp, 9, 9, 9, 9), ramp);
    }

    #[test]
    fn matches_pillow_byte_for_byte() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/resize");
        let load = |name: &str| {
            let img = image::open(format!("{dir}/{name}"))
                .expect("fixture")
                .to_rgb8();
            let (w, h) = img.dimensions();
            (img.into_raw(), w as usize, h as usize)
        };
        let (src, w, h) = load("input_317.png");
        let (want, ow, oh) = load("pillow_bicubic_224.png");
        let got = resize_rgb_bicubic(&src, w, h, ow, oh);
        let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "{diff} of {} bytes differ from Pillow", want.len());
    }
}
