//! Quality of a face crop: how much its score can be trusted.
//!
//! - `face_px`: shorter side of the detected box, in frame pixels.
//! - `blur_var`: variance of the 3x3 Laplacian of the crop's luma over its central half
//!   (the face without hair and background); low values mean blur.
//! - `frontalness`: 1 for a frontal face, towards 0 as the head turns: in the aligned crop
//!   (roll removed), how far the nose sits from the midpoint of the eyes, relative to half the
//!   eye distance.
//! - `alignment_residual`: mean distance of the aligned landmarks from the template, in warp
//!   pixels; large when the landmarks do not fit the template (a profile face, a bad
//!   detection, or a detector whose landmark convention differs).
//!
//! [`FaceQuality::weight`] folds them into one number in 0..=1 for scheduling and evidence.

use super::align::{Affine, alignment_residual};
use crate::types::{BBox, FaceQuality};

/// Luma of packed RGB8 (BT.601 weights).
fn luma(rgb: &[u8]) -> Vec<f32> {
    rgb.chunks_exact(3)
        .map(|p| 0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2]))
        .collect()
}

/// Variance of the Laplacian over the central half of a square RGB8 crop of side `size`.
pub fn blur_variance(rgb: &[u8], size: usize) -> f32 {
    let (a, b) = (size / 4, size - size / 4);
    laplacian_variance(&luma(rgb), size, a.max(1)..b.min(size - 1))
}

/// The only pixels [`blur_variance`] reads of a crop of side `size` (16 or more): the square
/// from `(first, first)` of side `side` (the central half and a one-pixel rim, about a
/// quarter of the crop). The GPU path crops just this on the host to measure quality.
pub fn central_window(size: usize) -> (usize, usize) {
    let (a, b) = (size / 4, size - size / 4);
    (a - 1, b - a + 2)
}

/// [`blur_variance`] of a crop of side `size` from its [`central_window`] alone (packed RGB8,
/// `side x side`).
pub fn blur_variance_window(window: &[u8], size: usize) -> f32 {
    let (_, side) = central_window(size);
    laplacian_variance(&luma(window), side, 1..side - 1)
}

/// Variance of the 3x3 Laplacian of `y` (rows of `stride`) over the rows and columns `range`.
fn laplacian_variance(y: &[f32], stride: usize, range: std::ops::Range<usize>) -> f32 {
    let mut vals = Vec::with_capacity(range.len() * range.len());
    for r in range.clone() {
        for c in range.clone() {
            let i = r * stride + c;
            vals.push(y[i - stride] + y[i + stride] + y[i - 1] + y[i + 1] - 4.0 * y[i]);
        }
    }
    if vals.is_empty() {
        return 0.0;
    }
    let n = vals.len() as f32;
    let mean = vals.iter().sum::<f32>() / n;
    vals.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n
}

/// 1 for a frontal face, 0 when the nose sits at (or beyond) an eye, in the aligned frame.
pub fn frontalness(alignment: &Affine, landmarks: &[[f32; 2]; 5]) -> f32 {
    let p = landmarks.map(|[x, y]| alignment.apply([f64::from(x), f64::from(y)]));
    let mid = (p[0][0] + p[1][0]) / 2.0;
    let half = ((p[1][0] - p[0][0]) / 2.0).abs().max(1e-6);
    (1.0 - ((p[2][0] - mid).abs() / half)).clamp(0.0, 1.0) as f32
}

/// All measures of one crop.
pub fn measure(
    bbox: &BBox,
    landmarks: &[[f32; 2]; 5],
    alignment: &Affine,
    crop_rgb: &[u8],
    crop_size: usize,
) -> FaceQuality {
    measure_with_blur(
        bbox,
        landmarks,
        alignment,
        blur_variance(crop_rgb, crop_size),
    )
}

/// [`measure`] with the crop's blur measured already (e.g. by [`blur_variance_window`]).
pub fn measure_with_blur(
    bbox: &BBox,
    landmarks: &[[f32; 2]; 5],
    alignment: &Affine,
    blur_var: f32,
) -> FaceQuality {
    FaceQuality {
        face_px: bbox.width().min(bbox.height()),
        blur_var,
        frontalness: frontalness(alignment, landmarks),
        alignment_residual: alignment_residual(alignment, landmarks) as f32,
    }
}

/// One number in 0..=1: size (full weight from 112 px, the template's own scale), sharpness
/// (saturating around a Laplacian variance of 100) and frontalness, multiplied.
pub fn weight(q: &FaceQuality) -> f32 {
    let size = (q.face_px / 112.0).clamp(0.0, 1.0);
    let sharp = 1.0 - (-q.blur_var / 100.0).exp();
    (size * sharp * q.frontalness).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crop::align::{sjedd_alignment, sjedd_template};

    #[test]
    fn a_flat_crop_has_no_sharpness_and_edges_have_some() {
        let flat = vec![120u8; 3 * 64 * 64];
        assert_eq!(blur_variance(&flat, 64), 0.0);
        let stripes: Vec<u8> = (0..64 * 64)
            .flat_map(|i| [((i % 2) * 255) as u8; 3])
            .collect();
        assert!(blur_variance(&stripes, 64) > 1000.0);
    }

    #[test]
    fn the_central_window_alone_gives_the_whole_crops_blur() {
        for size in [16usize, 32, 112, 224] {
            let crop: Vec<u8> = (0..size * size)
                .flat_map(|i| {
                    let (x, y) = (i % size, i / size);
                    [(x * x + 3 * y) as u8, (x * y) as u8, (7 * x + y * y) as u8]
                })
                .collect();
            let (first, side) = central_window(size);
            let window: Vec<u8> = (first..first + side)
                .flat_map(|r| crop[3 * (r * size + first)..3 * (r * size + first + side)].to_vec())
                .collect();
            let whole = blur_variance(&crop, size);
            assert!(whole > 0.0);
            assert_eq!(blur_variance_window(&window, size), whole, "size {size}");
        }
    }

    #[test]
    fn the_template_itself_is_frontal_and_fits_exactly() {
        let t = sjedd_template().map(|[x, y]| [x as f32, y as f32]);
        let id = Affine::identity();
        assert!(
            (frontalness(&id, &t) - 0.96).abs() < 0.05,
            "{}",
            frontalness(&id, &t)
        );
        assert!(alignment_residual(&id, &t) < 1e-4);
        // A turned head: the nose moves towards one eye.
        let mut turned = t;
        turned[2][0] += 25.0;
        assert!(frontalness(&id, &turned) < 0.6);
        let a = sjedd_alignment(&turned).unwrap();
        assert!(alignment_residual(&a, &turned) > 2.0);
    }

    #[test]
    fn weight_grows_with_size_sharpness_and_frontalness() {
        let q = |px: f32, blur: f32, front: f32| FaceQuality {
            face_px: px,
            blur_var: blur,
            frontalness: front,
            alignment_residual: 0.0,
        };
        assert!(weight(&q(40.0, 200.0, 1.0)) < weight(&q(120.0, 200.0, 1.0)));
        assert!(weight(&q(120.0, 10.0, 1.0)) < weight(&q(120.0, 300.0, 1.0)));
        assert!(weight(&q(120.0, 300.0, 0.3)) < weight(&q(120.0, 300.0, 0.9)));
        assert_eq!(weight(&q(0.0, 0.0, 0.0)), 0.0);
    }
}
