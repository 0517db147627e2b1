//! Evidence media: the strongest frame of an alert's track with the face box drawn, and the
//! aligned face crop, as JPEGs. Drawn on the event store's writer thread, never on the
//! decision path.

use std::sync::Arc;

use super::MediaKind;
use crate::types::{BBox, Frame, PixelFormat};

/// Longest side of a stored snapshot: larger frames are scaled down (a 4K frame would cost
/// megabytes per event and show no more of the face than the crop).
pub const SNAPSHOT_MAX_SIDE: usize = 1280;
/// JPEG quality of snapshots and crops.
pub const JPEG_QUALITY: u8 = 85;

/// What an alert's media are made from: the frame its track's strongest face (highest
/// logit(q0)) was scored on, that face's box, and its aligned crop.
#[derive(Debug, Clone)]
pub struct AlertMedia {
    pub frame: Arc<Frame>,
    pub bbox: BBox,
    /// Packed RGB, `size x size`.
    pub crop: Option<(Vec<u8>, usize)>,
    /// The face's logit(q0).
    pub logit: f64,
}

/// The same face of the same frame (frames compare by identity: they are megabytes).
impl PartialEq for AlertMedia {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.frame, &other.frame)
            && self.bbox == other.bbox
            && self.crop == other.crop
            && self.logit.to_bits() == other.logit.to_bits()
    }
}

impl AlertMedia {
    /// The snapshot and the face crop as JPEGs (each may fail on its own).
    pub fn render(&self) -> Vec<(MediaKind, Result<Vec<u8>, String>)> {
        let mut out = vec![(MediaKind::Snapshot, snapshot(&self.frame, &self.bbox))];
        if let Some((rgb, size)) = &self.crop {
            out.push((
                MediaKind::Face,
                crate::crop::encode_jpeg(rgb, *size, JPEG_QUALITY),
            ));
        }
        out
    }
}

/// The frame as packed RGB, `width x height`.
fn frame_rgb(frame: &Frame) -> Result<Vec<u8>, String> {
    match frame.format {
        PixelFormat::Rgb8 => {
            let v = crate::crop::rgb_view(frame).map_err(|e| e.to_string())?;
            let mut out = Vec::with_capacity(3 * v.width * v.height);
            for y in 0..v.height {
                let row = y * v.stride;
                out.extend_from_slice(&v.data[row..row + 3 * v.width]);
            }
            Ok(out)
        }
        PixelFormat::Nv12 => Ok(crate::crop::yuv::nv12_view(frame)
            .map_err(|e| e.to_string())?
            .to_rgb()),
    }
}

/// The frame, scaled to at most [`SNAPSHOT_MAX_SIDE`], with `bbox` drawn, as a JPEG.
pub fn snapshot(frame: &Frame, bbox: &BBox) -> Result<Vec<u8>, String> {
    let (w, h) = (frame.width as usize, frame.height as usize);
    let mut rgb = frame_rgb(frame)?;
    let side = w.max(h);
    let (mut ow, mut oh, mut scale) = (w, h, 1.0f32);
    if side > SNAPSHOT_MAX_SIDE {
        scale = SNAPSHOT_MAX_SIDE as f32 / side as f32;
        ow = ((w as f32 * scale).round() as usize).max(1);
        oh = ((h as f32 * scale).round() as usize).max(1);
        rgb = crate::crop::resize::resize_rgb_bicubic(&rgb, w, h, ow, oh);
    }
    let scaled = BBox {
        x0: bbox.x0 * scale,
        y0: bbox.y0 * scale,
        x1: bbox.x1 * scale,
        y1: bbox.y1 * scale,
    };
    let thickness = (ow.max(oh) / 320).clamp(2, 6);
    draw_box(&mut rgb, ow, oh, &scaled, thickness, [255, 40, 40]);
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY)
        .encode(&rgb, ow as u32, oh as u32, image::ExtendedColorType::Rgb8)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// Draws the outline of `b` (clipped to the image), `t` pixels thick, just outside the box.
pub fn draw_box(rgb: &mut [u8], w: usize, h: usize, b: &BBox, t: usize, colour: [u8; 3]) {
    if w == 0
        || h == 0
        || !(b.x0.is_finite() && b.y0.is_finite() && b.x1.is_finite() && b.y1.is_finite())
    {
        return;
    }
    let clamp = |v: f32, hi: usize| -> usize { v.round().clamp(0.0, hi as f32) as usize };
    let ti = t as f32;
    let (x0, x1) = (clamp(b.x0 - ti, w - 1), clamp(b.x1 + ti, w - 1));
    let (y0, y1) = (clamp(b.y0 - ti, h - 1), clamp(b.y1 + ti, h - 1));
    if x0 >= x1 || y0 >= y1 {
        return;
    }
    let mut paint = |x: usize, y: usize| {
        let i = 3 * (y * w + x);
        rgb[i..i + 3].copy_from_slice(&colour);
    };
    for y in y0..=y1 {
        for k in 0..t {
            if x0 + k <= x1 {
                paint(x0 + k, y);
            }
            if x1 >= k && x1 - k >= x0 {
                paint(x1 - k, y);
            }
        }
    }
    for x in x0..=x1 {
        for k in 0..t {
            if y0 + k <= y1 {
                paint(x, y0 + k);
            }
            if y1 >= k && y1 - k >= y0 {
                paint(x, y1 - k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_box_is_drawn_around_the_face_and_clipped_at_the_edges() {
        let (w, h) = (40, 30);
        let mut rgb = vec![0u8; 3 * w * h];
        let b = BBox {
            x0: 10.0,
            y0: 10.0,
            x1: 20.0,
            y1: 20.0,
        };
        draw_box(&mut rgb, w, h, &b, 2, [255, 0, 0]);
        let px = |x: usize, y: usize| rgb[3 * (y * w + x)];
        // The outline sits just outside the box; the face inside stays untouched.
        assert_eq!(px(8, 15), 255);
        assert_eq!(px(22, 15), 255);
        assert_eq!(px(15, 8), 255);
        assert_eq!(px(15, 22), 255);
        assert_eq!(px(15, 15), 0);
        assert_eq!(px(11, 11), 0);
        assert_eq!(px(2, 2), 0);
        // A box past the edges and a box of NaNs do not panic.
        let wild = BBox {
            x0: -50.0,
            y0: -5.0,
            x1: 500.0,
            y1: 29.0,
        };
        draw_box(&mut rgb, w, h, &wild, 3, [0, 255, 0]);
        assert_eq!(rgb[1], 255);
        let nan = BBox {
            x0: f32::NAN,
            ..wild
        };
        draw_box(&mut rgb, w, h, &nan, 3, [0, 0, 255]);
    }
}
