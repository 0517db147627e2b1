//! Small image helpers for detectors: area downscaling and region extraction, in f32. Frames
//! are downscaled from their 8-bit pixels ([`resize_area_u8`]) before anything is converted
//! to floats.

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

/// [`resize_area`] straight from 8-bit pixels: the same weights and the same order of
/// additions (so the same values as converting to f32 first), but no full-size float copy
/// and one output row of scratch: an 8K frame costs its pixels once, not 400 MB of floats.
pub fn resize_area_u8(src: RgbView<'_>, out_w: usize, out_h: usize) -> RgbF32 {
    let (out_w, out_h) = (out_w.max(1), out_h.max(1));
    let wx = axis_weights(src.width, out_w);
    let wy = axis_weights(src.height, out_h);
    // For each input row, the output rows it feeds and with what weight, in output order.
    let mut feeds: Vec<Vec<(usize, f32)>> = vec![Vec::new(); src.height];
    for (oy, ws) in wy.iter().enumerate() {
        for &(i, w) in ws {
            feeds[i].push((oy, w));
        }
    }
    let mut data = vec![0.0f32; 3 * out_w * out_h];
    let mut tmp = vec![0.0f32; 3 * out_w];
    for (y, outs) in feeds.iter().enumerate() {
        if outs.is_empty() {
            continue;
        }
        let row = &src.data[y * src.stride..y * src.stride + 3 * src.width];
        for (ox, ws) in wx.iter().enumerate() {
            let mut acc = [0.0f32; 3];
            for &(i, w) in ws {
                for c in 0..3 {
                    acc[c] += f32::from(row[3 * i + c]) * w;
                }
            }
            tmp[3 * ox..3 * ox + 3].copy_from_slice(&acc);
        }
        for &(oy, w) in outs {
            let out = &mut data[3 * out_w * oy..3 * out_w * (oy + 1)];
            for (o, r) in out.iter_mut().zip(&tmp) {
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

/// The inclusive pixel box `[x0, x1] x [y0, y1]` of an 8-bit frame, area-resized to
/// `size x size` straight from its pixels: the cost is the box's pixels, not the frame's, and
/// nothing of the frame is copied. The part of the box outside the frame is black; the part
/// inside is resized into the share of the patch it covers.
pub fn region_u8(src: RgbView<'_>, x0: i64, y0: i64, x1: i64, y1: i64, size: usize) -> RgbF32 {
    let size = size.max(1);
    let mut out = RgbF32 {
        data: vec![0.0f32; 3 * size * size],
        width: size,
        height: size,
    };
    let (bw, bh) = ((x1 - x0 + 1).max(1), (y1 - y0 + 1).max(1));
    // The box clipped to the frame, and where that lands in the patch.
    let (cx0, cy0) = (x0.max(0), y0.max(0));
    let (cx1, cy1) = (x1.min(src.width as i64 - 1), y1.min(src.height as i64 - 1));
    if cx0 > cx1 || cy0 > cy1 {
        return out;
    }
    let place = |from: i64, to: i64, origin: i64, len: i64| -> (usize, usize) {
        let at = |v: i64| ((v - origin) as f64 * size as f64 / len as f64).round() as usize;
        let (a, b) = (at(from).min(size - 1), at(to + 1).min(size));
        (a, b.max(a + 1))
    };
    let (ox0, ox1) = place(cx0, cx1, x0, bw);
    let (oy0, oy1) = place(cy0, cy1, y0, bh);
    let (cx0, cy0, cx1, cy1) = (cx0 as usize, cy0 as usize, cx1 as usize, cy1 as usize);
    let inside = RgbView {
        data: &src.data[cy0 * src.stride + 3 * cx0..],
        width: cx1 - cx0 + 1,
        height: cy1 - cy0 + 1,
        stride: src.stride,
    };
    let part = resize_area_u8(inside, ox1 - ox0, oy1 - oy0);
    for (r, row) in part.data.chunks_exact(3 * part.width).enumerate() {
        let at = 3 * ((oy0 + r) * size + ox0);
        out.data[at..at + row.len()].copy_from_slice(row);
    }
    out
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
    fn the_u8_downscale_equals_converting_first_bit_for_bit() {
        // A pseudo-random 301 x 173 image with row padding, down to sizes that do and do not
        // divide it.
        let (w, h, stride) = (301usize, 173usize, 301 * 3 + 5);
        let mut state = 0x2545_f491u32;
        let bytes: Vec<u8> = (0..stride * h)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state >> 24) as u8
            })
            .collect();
        let view = RgbView {
            data: &bytes,
            width: w,
            height: h,
            stride,
        };
        for (ow, oh) in [(150, 86), (64, 40), (301, 173), (17, 9)] {
            let a = resize_area(&RgbF32::from_view(view), ow, oh);
            let b = resize_area_u8(view, ow, oh);
            assert_eq!((a.width, a.height), (b.width, b.height));
            assert!(
                a.data
                    .iter()
                    .zip(&b.data)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{ow}x{oh}"
            );
        }
    }

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

    /// A box cut from the 8-bit frame is what `region` cuts from its float copy: bit for
    /// bit inside the frame, black outside it, and nothing for a box off the frame.
    #[test]
    fn regions_cut_from_the_frame_match_the_float_copy() {
        let (w, h, stride) = (97usize, 61usize, 97 * 3 + 2);
        let bytes: Vec<u8> = (0..stride * h).map(|i| (i * 37 % 251) as u8).collect();
        let view = RgbView {
            data: &bytes,
            width: w,
            height: h,
            stride,
        };
        let float = RgbF32::from_view(view);
        for (x0, y0, x1, y1, size) in [
            (10, 5, 57, 52, 24),
            (0, 0, 96, 60, 48),
            (40, 20, 41, 21, 24),
        ] {
            let a = region(&float, x0, y0, x1, y1, size);
            let b = region_u8(view, x0, y0, x1, y1, size);
            assert!(
                a.data
                    .iter()
                    .zip(&b.data)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{x0},{y0},{x1},{y1}"
            );
        }
        // Half off the frame's right edge: the right half of the patch is black.
        let half = region_u8(view, 49, 10, 144, 57, 24);
        assert!((12..24).all(|x| (0..24).all(|y| half.px(x, y, 0) == 0.0)));
        assert!((0..11).any(|x| half.px(x, 12, 1) > 0.0));
        // Straddling the top-left corner, the inside lands in the bottom-right quarter, as
        // `region` places it (within a grey level: the padded box is averaged in one pass).
        let a = region(&float, -20, -20, 19, 19, 8);
        let b = region_u8(view, -20, -20, 19, 19, 8);
        assert!((0..8).all(|y| (0..4).all(|x| b.px(x, y, 0) == 0.0 && b.px(y, x, 2) == 0.0)));
        for (x, y) in [(4, 4), (6, 5), (7, 7)] {
            assert!((a.px(x, y, 0) - b.px(x, y, 0)).abs() < 1.0, "{x},{y}");
        }
        let off = region_u8(view, 200, 0, 260, 60, 24);
        assert!(off.data.iter().all(|v| *v == 0.0));
    }
}
