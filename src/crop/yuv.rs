//! NV12 frames on the CPU: the twin of `crop_nv12_fp16` in kernels/crop.cu (each of a sample's
//! four neighbours converted to RGB with its nearest chroma sample, then interpolated), and a
//! whole-frame conversion for the face detector. The GPU backend takes NV12 frames
//! (`ingest.format = "nv12"`): detection converts the frames it runs on, the crop's quality
//! window and the CPU twin of the device use this warp, the device its kernel.

use super::CropError;
use super::align::Affine;
use crate::types::{Frame, PixelFormat, YuvColor, YuvMatrix};

/// YUV -> RGB on 8-bit values: `r = (y - y_offset) * y_scale + kr_v * v'`, ... with
/// `u' = (u - 128) * c_scale`. Mirrors `struct YuvParams` in kernels/crop.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct YuvCoefficients {
    pub y_offset: f32,
    pub y_scale: f32,
    pub c_scale: f32,
    pub kr_v: f32,
    pub kg_u: f32,
    pub kg_v: f32,
    pub kb_u: f32,
}

impl YuvCoefficients {
    /// For a frame's colour description (BT.601 limited range when the caps said nothing).
    pub fn of(color: Option<YuvColor>) -> Self {
        let c = color.unwrap_or(YuvColor {
            matrix: YuvMatrix::Bt601,
            full_range: false,
        });
        // Kr and Kb of each matrix; the rest follows from them.
        let (kr, kb) = match c.matrix {
            YuvMatrix::Bt601 => (0.299f32, 0.114f32),
            YuvMatrix::Bt709 => (0.2126, 0.0722),
            YuvMatrix::Bt2020 => (0.2627, 0.0593),
        };
        let kg = 1.0 - kr - kb;
        let (y_offset, y_scale, c_scale) = if c.full_range {
            (0.0, 1.0, 1.0)
        } else {
            (16.0, 255.0 / 219.0, 255.0 / 224.0)
        };
        YuvCoefficients {
            y_offset,
            y_scale,
            c_scale,
            kr_v: 2.0 * (1.0 - kr),
            kg_u: 2.0 * kb * (1.0 - kb) / kg,
            kg_v: 2.0 * kr * (1.0 - kr) / kg,
            kb_u: 2.0 * (1.0 - kb),
        }
    }
}

/// The planes of an NV12 frame, checked to hold their rows.
#[derive(Debug, Clone, Copy)]
pub struct Nv12View<'a> {
    pub luma: &'a [u8],
    pub luma_stride: usize,
    pub chroma: &'a [u8],
    pub chroma_stride: usize,
    pub width: usize,
    pub height: usize,
    pub k: YuvCoefficients,
}

/// The planes of an NV12 `frame` (its fields are public: a frame built by hand may not hold
/// what it claims).
pub fn nv12_view(frame: &Frame) -> Result<Nv12View<'_>, CropError> {
    if frame.format != PixelFormat::Nv12 {
        return Err(CropError::Format(frame.format));
    }
    let (w, h) = (frame.width as usize, frame.height as usize);
    let bad = || CropError::Frame {
        width: frame.width,
        height: frame.height,
        stride: frame.planes[0].stride,
        len: frame.data.len(),
    };
    let plane = |i: usize| -> Result<&[u8], CropError> {
        let p = frame.planes[i];
        let rows = PixelFormat::Nv12.plane_rows(i, frame.height);
        let row = PixelFormat::Nv12.row_bytes(i, frame.width);
        let end = p
            .stride
            .checked_mul(rows.saturating_sub(1))
            .and_then(|v| v.checked_add(row))
            .and_then(|v| v.checked_add(p.offset))
            .ok_or_else(bad)?;
        if w == 0 || h == 0 || p.stride < row || end > frame.data.len() {
            return Err(bad());
        }
        Ok(&frame.data[p.offset..end])
    };
    Ok(Nv12View {
        luma: plane(0)?,
        luma_stride: frame.planes[0].stride,
        chroma: plane(1)?,
        chroma_stride: frame.planes[1].stride,
        width: w,
        height: h,
        k: YuvCoefficients::of(frame.color),
    })
}

/// Rounded to 0..=255 as the kernel does (`rintf`: halves to even).
#[inline]
fn round_u8(v: f32) -> f32 {
    v.round_ties_even().clamp(0.0, 255.0)
}

impl Nv12View<'_> {
    /// RGB of pixel `(x, y)` (inside the frame), each channel rounded to 0..=255.
    #[inline]
    pub fn rgb(&self, x: usize, y: usize) -> [f32; 3] {
        let k = &self.k;
        let yy = (f32::from(self.luma[y * self.luma_stride + x]) - k.y_offset) * k.y_scale;
        let ci = (y >> 1) * self.chroma_stride + 2 * (x >> 1);
        let cu = (f32::from(self.chroma[ci]) - 128.0) * k.c_scale;
        let cv = (f32::from(self.chroma[ci + 1]) - 128.0) * k.c_scale;
        [
            round_u8(yy + k.kr_v * cv),
            round_u8(yy - k.kg_u * cu - k.kg_v * cv),
            round_u8(yy + k.kb_u * cu),
        ]
    }

    /// The whole frame as packed RGB8 (rows of `3 * width`), for the face detector.
    pub fn to_rgb(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(3 * self.width * self.height);
        for y in 0..self.height {
            for x in 0..self.width {
                out.extend(self.rgb(x, y).map(|v| v as u8));
            }
        }
        out
    }
}

/// The fused crop from an NV12 frame: output pixel `(u, v)` samples the frame at
/// `inverse_map([u, v])`, each of the four neighbours converted to RGB (black outside), then
/// interpolated and rounded: what `crop_nv12_fp16` computes before normalising.
pub fn warp_affine_bilinear_nv12(
    src: &Nv12View<'_>,
    inverse_map: &Affine,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    let mut out = vec![0u8; 3 * out_w * out_h];
    let (w, h) = (src.width as i64, src.height as i64);
    let m = inverse_map.0;
    for v in 0..out_h {
        for u in 0..out_w {
            // In f32, as the kernel computes it.
            let sx = m[0][0] as f32 * u as f32 + m[0][1] as f32 * v as f32 + m[0][2] as f32;
            let sy = m[1][0] as f32 * u as f32 + m[1][1] as f32 * v as f32 + m[1][2] as f32;
            if !(sx.is_finite() && sy.is_finite()) {
                continue;
            }
            let (fx, fy) = (sx.floor(), sy.floor());
            let (x0, y0) = (fx as i64, fy as i64);
            if x0 >= w || x0 + 1 < 0 || y0 >= h || y0 + 1 < 0 {
                continue;
            }
            let (ax, ay) = (sx - fx, sy - fy);
            let q = |dx: i64, dy: i64| {
                let (x, y) = (x0 + dx, y0 + dy);
                if x >= 0 && y >= 0 && x < w && y < h {
                    src.rgb(x as usize, y as usize)
                } else {
                    [0.0; 3]
                }
            };
            let (a, b, c, d) = (q(0, 0), q(1, 0), q(0, 1), q(1, 1));
            let px = &mut out[3 * (v * out_w + u)..3 * (v * out_w + u) + 3];
            for ch in 0..3 {
                let top = (1.0 - ax) * a[ch] + ax * b[ch];
                let bottom = (1.0 - ax) * c[ch] + ax * d[ch];
                px[ch] = round_u8((1.0 - ay) * top + ay * bottom) as u8;
            }
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::types::{FrameMeta, Plane, StreamId};
    use std::sync::Arc;

    /// An NV12 frame of `w x h` with texture in both planes.
    pub(crate) fn nv12_frame(w: u32, h: u32, color: YuvColor) -> Frame {
        let (cw, ch) = (2 * w.div_ceil(2) as usize, h.div_ceil(2) as usize);
        let luma: Vec<u8> = (0..(w * h) as usize)
            .map(|i| (16 + (i % w as usize) * 3 + (i / w as usize) * 2) as u8)
            .collect();
        let chroma: Vec<u8> = (0..cw * ch).map(|i| (60 + (i * 7) % 120) as u8).collect();
        let mut data = luma;
        data.extend(chroma);
        Frame::new(
            FrameMeta {
                stream: StreamId::new("cam").unwrap(),
                seq: 0,
                pts: None,
                capture_time: std::time::SystemTime::now(),
                capture_time_from_sender: false,
                mono: std::time::Instant::now(),
                width: w,
                height: h,
                format: PixelFormat::Nv12,
                color: Some(color),
            },
            &[
                Plane {
                    offset: 0,
                    stride: w as usize,
                },
                Plane {
                    offset: (w * h) as usize,
                    stride: cw,
                },
            ],
            Arc::from(data),
        )
        .unwrap()
    }

    #[test]
    fn the_matrices_give_the_published_coefficients() {
        let k = YuvCoefficients::of(Some(YuvColor {
            matrix: YuvMatrix::Bt709,
            full_range: false,
        }));
        assert!((k.kr_v - 1.5748).abs() < 1e-4, "{k:?}");
        assert!((k.kb_u - 1.8556).abs() < 1e-4);
        assert!((k.kg_u - 0.187_324).abs() < 1e-4);
        assert!((k.kg_v - 0.468_124).abs() < 1e-4);
        let k = YuvCoefficients::of(None);
        assert!((k.kr_v - 1.402).abs() < 1e-4 && (k.kb_u - 1.772).abs() < 1e-4);
        assert_eq!((k.y_offset, k.y_scale), (16.0, 255.0 / 219.0));
        // Limited-range white and black.
        let frame = nv12_frame(
            4,
            2,
            YuvColor {
                matrix: YuvMatrix::Bt601,
                full_range: false,
            },
        );
        let v = nv12_view(&frame).unwrap();
        assert_eq!(v.rgb(0, 0)[0], 0.0, "luma 16 is black");
    }

    /// The NV12 warp equals the RGB warp of the converted frame, to the rounding of halves.
    #[test]
    fn the_nv12_crop_is_the_rgb_crop_of_the_converted_frame() {
        for color in [
            YuvColor {
                matrix: YuvMatrix::Bt601,
                full_range: false,
            },
            YuvColor {
                matrix: YuvMatrix::Bt709,
                full_range: true,
            },
        ] {
            let frame = nv12_frame(61, 47, color);
            let view = nv12_view(&frame).unwrap();
            let rgb = view.to_rgb();
            let rgb_view = super::super::warp::RgbView {
                data: &rgb,
                width: 61,
                height: 47,
                stride: 3 * 61,
            };
            let map = Affine([[0.31, -0.05, 7.3], [0.05, 0.31, 3.9]]);
            let a = warp_affine_bilinear_nv12(&view, &map, 40, 40);
            let b = super::super::warp::warp_affine_bilinear(rgb_view, &map, 40, 40);
            let worst = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
            assert!(worst <= 1, "{color:?}: largest difference {worst}");
        }
    }

    #[test]
    fn a_frame_too_short_for_its_planes_is_refused() {
        let mut f = nv12_frame(
            8,
            8,
            YuvColor {
                matrix: YuvMatrix::Bt601,
                full_range: true,
            },
        );
        f.height = 64;
        assert!(matches!(nv12_view(&f), Err(CropError::Frame { .. })));
    }
}
