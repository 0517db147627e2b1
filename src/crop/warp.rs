//! Affine warps of packed RGB8 images with a black border.
//!
//! [`warp_affine_opencv`] reproduces OpenCV's `warpAffine(INTER_LINEAR, BORDER_CONSTANT)`
//! integer arithmetic: the inverse map evaluated in 1/1024 fixed point, sample positions
//! rounded to 1/32 pixel, bilinear weights in 15-bit fixed point, and the same handling of
//! samples whose neighbours fall outside the image. [`warp_affine_bilinear`] is the plain
//! float version used by the fused single-warp crop.

use super::align::Affine;

/// A packed RGB8 image: `height` rows of `stride` bytes, `width * 3` of them pixels.
#[derive(Debug, Clone, Copy)]
pub struct RgbView<'a> {
    pub data: &'a [u8],
    pub width: usize,
    pub height: usize,
    pub stride: usize,
}

impl RgbView<'_> {
    #[inline]
    fn px(&self, x: usize, y: usize, c: usize) -> u8 {
        self.data[y * self.stride + 3 * x + c]
    }
}

const AB_BITS: u32 = 10;
const INTER_BITS: u32 = 5;
const INTER_TAB: i64 = 1 << INTER_BITS;
const COEF_BITS: u32 = 15;

/// C's `saturate_cast<int>(double)`: round half to even, clamp to i32.
fn round_i32(v: f64) -> i64 {
    v.round_ties_even().clamp(i32::MIN as f64, i32::MAX as f64) as i64
}

/// OpenCV's `warpAffine(src, M, (out_w, out_h), INTER_LINEAR, BORDER_CONSTANT, 0)` where `M`
/// is `forward` (source -> destination). Returns packed RGB8, `3 * out_w` bytes per row.
pub fn warp_affine_opencv(
    src: RgbView<'_>,
    forward: &Affine,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    let mut out = vec![0u8; 3 * out_w * out_h];
    let Some(inv) = forward.inverse() else {
        return out;
    };
    let m = inv.0;
    let scale = f64::from(1u32 << AB_BITS);
    let round_delta = (1i64 << AB_BITS) / INTER_TAB / 2;
    let adelta: Vec<i64> = (0..out_w)
        .map(|x| round_i32(m[0][0] * x as f64 * scale))
        .collect();
    let bdelta: Vec<i64> = (0..out_w)
        .map(|x| round_i32(m[1][0] * x as f64 * scale))
        .collect();
    let (w, h) = (src.width as i64, src.height as i64);
    let shift = AB_BITS - INTER_BITS;
    for y in 0..out_h {
        let x0 = round_i32((m[0][1] * y as f64 + m[0][2]) * scale) + round_delta;
        let y0 = round_i32((m[1][1] * y as f64 + m[1][2]) * scale) + round_delta;
        let row = &mut out[3 * out_w * y..3 * out_w * (y + 1)];
        for x in 0..out_w {
            let xx = (x0 + adelta[x]) >> shift;
            let yy = (y0 + bdelta[x]) >> shift;
            let (sx, sy) = (xx >> INTER_BITS, yy >> INTER_BITS);
            let (ax, ay) = (xx & (INTER_TAB - 1), yy & (INTER_TAB - 1));
            // Weights (32 - a) * (32 - b) etc. in units of 2^-10, scaled to 2^-15.
            let wts = [
                (INTER_TAB - ay) * (INTER_TAB - ax),
                (INTER_TAB - ay) * ax,
                ay * (INTER_TAB - ax),
                ay * ax,
            ]
            .map(|v| v << (COEF_BITS - 2 * INTER_BITS));
            let dst = &mut row[3 * x..3 * x + 3];
            if sx >= 0 && sy >= 0 && sx + 1 < w && sy + 1 < h {
                // All four neighbours inside: the common case, without per-sample checks.
                let i00 = sy as usize * src.stride + 3 * sx as usize;
                let (i01, i10) = (i00 + 3, i00 + src.stride);
                let (a, b) = (&src.data[i00..i01 + 3], &src.data[i10..i10 + 6]);
                for c in 0..3 {
                    let acc = i64::from(a[c]) * wts[0]
                        + i64::from(a[3 + c]) * wts[1]
                        + i64::from(b[c]) * wts[2]
                        + i64::from(b[3 + c]) * wts[3];
                    dst[c] = ((acc + (1 << (COEF_BITS - 1))) >> COEF_BITS).clamp(0, 255) as u8;
                }
                continue;
            }
            if sx >= w || sx + 1 < 0 || sy >= h || sy + 1 < 0 {
                continue; // all four neighbours outside: the border value, 0
            }
            let inside = |px: i64, py: i64| px >= 0 && py >= 0 && px < w && py < h;
            for (c, d) in dst.iter_mut().enumerate() {
                let v = |px: i64, py: i64| {
                    if inside(px, py) {
                        i64::from(src.px(px as usize, py as usize, c))
                    } else {
                        0
                    }
                };
                let acc = v(sx, sy) * wts[0]
                    + v(sx + 1, sy) * wts[1]
                    + v(sx, sy + 1) * wts[2]
                    + v(sx + 1, sy + 1) * wts[3];
                *d = ((acc + (1 << (COEF_BITS - 1))) >> COEF_BITS).clamp(0, 255) as u8;
            }
        }
    }
    out
}

/// `floor` as an integer without a library call (`f64::floor` is one on baseline x86-64).
#[inline(always)]
fn floor_i64(v: f64) -> i64 {
    let t = v as i64;
    if (t as f64) > v { t - 1 } else { t }
}

/// Bilinear warp in floating point with a black border: output pixel `(u, v)` samples the
/// source at `inverse_map([u, v])` (pixel centres at integer coordinates, as OpenCV). The
/// reference the GPU crop kernel is checked against.
pub fn warp_affine_bilinear(
    src: RgbView<'_>,
    inverse_map: &Affine,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    let mut out = vec![0u8; 3 * out_w * out_h];
    let (w, h) = (src.width as i64, src.height as i64);
    let m = inverse_map.0;
    for v in 0..out_h {
        // Walk the row incrementally: source position = row start + u * (m00, m10).
        let (mut sx, mut sy) = (m[0][1] * v as f64 + m[0][2], m[1][1] * v as f64 + m[1][2]);
        let row = &mut out[3 * out_w * v..3 * out_w * (v + 1)];
        for px in row.chunks_exact_mut(3) {
            let (x0, y0) = (floor_i64(sx), floor_i64(sy));
            let (ax, ay) = ((sx - x0 as f64) as f32, (sy - y0 as f64) as f32);
            let finite = sx.is_finite() && sy.is_finite();
            sx += m[0][0];
            sy += m[1][0];
            if x0 >= 0 && y0 >= 0 && x0 + 1 < w && y0 + 1 < h {
                let i = y0 as usize * src.stride + 3 * x0 as usize;
                let (a, b) = (
                    &src.data[i..i + 6],
                    &src.data[i + src.stride..i + src.stride + 6],
                );
                for c in 0..3 {
                    let top = (1.0 - ax) * f32::from(a[c]) + ax * f32::from(a[3 + c]);
                    let bottom = (1.0 - ax) * f32::from(b[c]) + ax * f32::from(b[3 + c]);
                    // Values are within 0..=255 here; adding 0.5 and truncating rounds them
                    // (f32::round is a library call on baseline x86-64).
                    px[c] = ((1.0 - ay) * top + ay * bottom + 0.5) as u8;
                }
                continue;
            }
            if x0 >= w || x0 + 1 < 0 || y0 >= h || y0 + 1 < 0 || !finite {
                continue;
            }
            for (c, d) in px.iter_mut().enumerate() {
                let p = |x: i64, y: i64| {
                    if x >= 0 && y >= 0 && x < w && y < h {
                        f32::from(src.px(x as usize, y as usize, c))
                    } else {
                        0.0
                    }
                };
                let val = (1.0 - ay) * ((1.0 - ax) * p(x0, y0) + ax * p(x0 + 1, y0))
                    + ay * ((1.0 - ax) * p(x0, y0 + 1) + ax * p(x0 + 1, y0 + 1));
                *d = val.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: usize, h: usize) -> Vec<u8> {
        (0..h)
            .flat_map(|y| (0..w).flat_map(move |x| [(x * 7 % 256) as u8, (y * 5 % 256) as u8, 128]))
            .collect()
    }

    #[test]
    fn an_integer_shift_copies_pixels_and_fills_black() {
        let src = gradient(20, 10);
        let view = RgbView {
            data: &src,
            width: 20,
            height: 10,
            stride: 60,
        };
        let shift = Affine([[1.0, 0.0, 3.0], [0.0, 1.0, 2.0]]);
        for out in [
            warp_affine_opencv(view, &shift, 20, 10),
            warp_affine_bilinear(view, &shift.inverse().unwrap(), 20, 10),
        ] {
            // dst(x, y) = src(x - 3, y - 2)
            assert_eq!(out[3 * (5 * 20 + 7)], src[3 * (3 * 20 + 4)]);
            assert_eq!(out[3 * (5 * 20 + 7) + 1], src[3 * (3 * 20 + 4) + 1]);
            assert_eq!(&out[..3], &[0, 0, 0], "left/top border is black");
        }
    }

    #[test]
    fn the_fixed_point_and_float_warps_agree_within_one_level_inside() {
        let src = gradient(64, 48);
        let view = RgbView {
            data: &src,
            width: 64,
            height: 48,
            stride: 192,
        };
        let m = Affine([[0.93, -0.21, 4.2], [0.21, 0.93, -3.7]]);
        let a = warp_affine_opencv(view, &m, 50, 40);
        let b = warp_affine_bilinear(view, &m.inverse().unwrap(), 50, 40);
        // Away from the border and from the gradient's wrap-around, they differ by rounding.
        let mut worst = 0;
        for y in 8..30 {
            for x in 8..30 {
                for c in 1..3 {
                    let i = 3 * (y * 50 + x) + c;
                    worst = worst.max((i32::from(a[i]) - i32::from(b[i])).abs());
                }
            }
        }
        assert!(worst <= 1, "{worst}");
    }
}
