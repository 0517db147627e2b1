//! Small image helpers for detectors: area downscaling and region extraction, in f32.

use crate::crop::warp::RgbView;

/// An RGB image in f32, rows of `3 * width` values.
#[derive(Debug, Clone)]
pub struct RgbF32 {
    pub data: Vec<f32>,
    pub width: usize,
    pub height: usize,
}

impl RgbF32 {
    pub fn from_view(v: RgbView<'_>) -> Self {
        let mut data = Vec::with_capacity(3 * v.width * v.height);
        for y in 0..v.height {
            let row = &v.data[y * v.stride..y * v.stride + 3 * v.width];
            data.extend(row.iter().map(|&b| f32::from(b)));
        }
        RgbF32 {
            data,
            width: v.width,
            height: v.height,
        }
    }

    #[inline]
    pub fn px(&self, x: usize, y: usize, c: usize) -> f32 {
        self.data[3 * (y * self.width + x) + c]
    }
}

/// For resampling one axis: each output index takes a weighted sum of input indices.
fn axis_weights(in_len: usize, out_len: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = in_len as f64 / out_len as f64;
    (0..out_len)
        .map(|o| {
            if scale >= 1.0 {
                // Area: the output cell covers [o * scale, (o + 1) * scale) of the input.
                let (a, b) = (o as f64 * scale, (o as f64 + 1.0) * scale);
                let mut w = Vec::new();
                let mut i = a.floor() as usize;
                while (i as f64) < b && i < in_len {
                    let lo = a.max(i as f64);
                    let hi = b.min(i as f64 + 1.0);
                    if hi > lo {
                        w.push((i, ((hi - lo) / scale) as f32));
                    }
                    i += 1;
                }
                w
            } else {
                // Upscaling: bilinear with pixel centres aligned.
                let x = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
                let i = (x.floor() as usize).min(in_len - 1);
                let f = (x - i as f64) as f32;
                if i + 1 < in_len && f > 0.0 {
                    vec![(i, 1.0 - f), (i + 1, f)]
                } else {
                    vec![(i, 1.0)]
                }
            }
        })
        .collect()
}

/// Resizes with area averaging when shrinking (bilinear when growing), separably.
pub fn resize_area(src: &RgbF32, out_w: usize, out_h: usize) -> RgbF32 {
    let (out_w, out_h) = (out_w.max(1), out_h.max(1));
    let wx = axis_weights(src.width, out_w);
    let wy = axis_weights(src.height, out_h);
    let mut tmp = vec![0.0f32; 3 * out_w * src.height];
    for y in 0..src.height {
        let row = &src.data[3 * src.width * y..3 * src.width * (y + 1)];
        let out = &mut tmp[3 * out_w * y..3 * out_w * (y + 1)];
        for (ox, ws) in wx.iter().enumerate() {
            let mut acc = [0.0f32; 3];
            for &(i, w) in ws {
                for c in 0..3 {
                    acc[c] += row[3 * i + c] * w;
                }
            }
            out[3 * ox..3 * ox + 3].copy_from_slice(&acc);
        }
    }
    let mut data = vec![0.0f32; 3 * out_w * out_h];
    for (oy, ws) in wy.iter().enumerate() {
        let out = &mut data[3 * out_w * oy..3 * out_w * (oy + 1)];
        for &(i, w) in ws {
            let row = &tmp[3 * out_w * i..3 * out_w * (i + 1)];
            for (o, r) in out.iter_mut().zip(row) {
                *o += r * w;
            }
        }
    }
    RgbF32 {
        data,
        width: out_w,
        height: out_h,
    }
}

/// The inclusive pixel box `[x0, x1] x [y0, y1]` of `src` (may extend past the image: the
/// outside is black), resized to `size x size`.
pub fn region(src: &RgbF32, x0: i64, y0: i64, x1: i64, y1: i64, size: usize) -> RgbF32 {
    let (w, h) = ((x1 - x0 + 1).max(1) as usize, (y1 - y0 + 1).max(1) as usize);
    let mut data = vec![0.0f32; 3 * w * h];
    for ry in 0..h {
        let sy = y0 + ry as i64;
        if sy < 0 || sy >= src.height as i64 {
            continue;
        }
        for rx in 0..w {
            let sx = x0 + rx as i64;
            if sx < 0 || sx >= src.width as i64 {
                continue;
            }
            for c in 0..3 {
                data[3 * (ry * w + rx) + c] = src.px(sx as usize, sy as usize, c);
            }
        }
    }
    resize_area(
        &RgbF32 {
            data,
            width: w,
            height: h,
        },
        size,
        size,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_downscale_averages_blocks_and_keeps_flat_fields() {
        let src = RgbF32 {
            data: (0..4 * 4).flat_map(|i| [i as f32; 3]).collect(),
            width: 4,
            height: 4,
        };
        let half = resize_area(&src, 2, 2);
        // Top-left 2x2 block: 0, 1, 4, 5.
        assert!((half.px(0, 0, 0) - 2.5).abs() < 1e-6);
        assert!((half.px(1, 1, 2) - 12.5).abs() < 1e-6);
        let flat = RgbF32 {
            data: vec![9.0; 3 * 7 * 5],
            width: 7,
            height: 5,
        };
        let r = resize_area(&flat, 3, 2);
        assert!(r.data.iter().all(|v| (v - 9.0).abs() < 1e-5));
        let up = resize_area(&flat, 14, 10);
        assert!(up.data.iter().all(|v| (v - 9.0).abs() < 1e-5));
    }

    #[test]
    fn regions_outside_the_image_are_black() {
        let src = RgbF32 {
            data: vec![100.0; 3 * 10 * 10],
            width: 10,
            height: 10,
        };
        let r = region(&src, -10, -10, -1, -1, 4);
        assert!(r.data.iter().all(|v| *v == 0.0));
        let half = region(&src, 5, 0, 14, 9, 2);
        assert!(half.px(0, 0, 0) > 99.0 && half.px(1, 0, 0) < 1.0);
    }
}
