//! The one chain from a face in a frame to what the encoder takes: align, crop, measure the
//! crop's quality, CLIP-normalise. The daemon's face stage and `dfwatch analyze` both use it.
//! On the GPU backend the device crops and normalises; [`prepare_for_device`] is the part
//! that stays on the CPU (the crop's map and its quality).

use crate::crop::align::Affine;
use crate::crop::{self, CropError, CropMethod};
use crate::detect::Detection;
use crate::types::{BBox, FaceJob, Frame};

/// How faces are cropped and normalised for the loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct CropSpec {
    /// Side of the square crop the model takes.
    pub size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub method: CropMethod,
}

/// A face ready for the encoder.
#[derive(Debug, Clone)]
pub struct PreparedFace {
    /// `3 x size x size` CLIP-normalised values, CHW.
    pub pixels: Vec<f32>,
    /// `crop::quality::weight` of the crop, 0..=1.
    pub quality: f32,
    /// The crop as packed RGB8 (`size x size`).
    pub rgb: Vec<u8>,
}

/// A pre-crop quality for the tracker's cadence: face size and frontalness (blur needs the
/// crop, which exists only for due faces).
pub fn quick_quality(d: &Detection) -> f32 {
    let size = (d.bbox.width().min(d.bbox.height()) / 112.0).clamp(0.0, 1.0);
    match crop::align::sjedd_alignment(&d.landmarks) {
        Some(a) => size * crop::quality::frontalness(&a, &d.landmarks),
        None => 0.0,
    }
}

/// A face scheduled for scoring, before any crop: the seam where the CPU crop
/// ([`prepare_face`]) or a GPU crop kernel takes over. `None` when the landmarks admit no
/// alignment.
pub fn face_job(frame: std::sync::Arc<Frame>, face: &crate::track::TrackedFace) -> Option<FaceJob> {
    let alignment = crop::align::sjedd_alignment(&face.landmarks)?;
    Some(FaceJob {
        frame,
        track: face.track,
        bbox: face.bbox,
        landmarks: face.landmarks,
        det_score: face.score,
        alignment: alignment.0,
    })
}

/// Crops the face with `landmarks` and `bbox` from `frame`, measures the crop and normalises
/// it into `pixels` (reused: resized to `3 x size x size`).
pub fn prepare_face(
    frame: &Frame,
    bbox: &BBox,
    landmarks: &[[f32; 2]; 5],
    spec: &CropSpec,
    mut pixels: Vec<f32>,
) -> Result<PreparedFace, CropError> {
    let cropped = crop::crop_face(frame, landmarks, spec.size, spec.method)?;
    let q = crop::quality::measure(bbox, landmarks, &cropped.alignment, &cropped.rgb, spec.size);
    pixels.clear();
    pixels.resize(3 * spec.size * spec.size, 0.0);
    crate::encode::normalise_rgb(&cropped.rgb, spec.size, spec.mean, spec.std, &mut pixels);
    Ok(PreparedFace {
        pixels,
        quality: crop::quality::weight(&q),
        rgb: cropped.rgb,
    })
}

/// What the CPU keeps of a face the GPU crops.
#[derive(Debug, Clone)]
pub struct DeviceFace {
    /// Crop pixel -> frame pixel, for the device's fused crop (`crop::fused_inverse`).
    pub inverse: Affine,
    /// `crop::quality::weight` of the crop.
    pub quality: f32,
    /// The crop as packed RGB8, only when asked for (streams that publish face crops).
    pub rgb: Option<Vec<u8>>,
}

/// The GPU path's CPU share of a face: the map the device crops with (the fused crop, whatever
/// `spec.method` says: it is what the kernel does), and the quality, measured on a host copy
/// of only the pixels the blur measure reads ([`crop::quality::central_window`], a quarter of
/// the crop), so it equals the CPU fused crop's quality to rounding. With `keep_rgb` the whole
/// crop is made on the host as well, for the alert's image.
pub fn prepare_for_device(
    frame: &Frame,
    bbox: &BBox,
    landmarks: &[[f32; 2]; 5],
    spec: &CropSpec,
    keep_rgb: bool,
) -> Result<DeviceFace, CropError> {
    let alignment = crop::checked_alignment(landmarks, spec.size)?;
    let inverse = crop::fused_inverse(&alignment, spec.size).ok_or(CropError::Degenerate)?;
    let (first, side) = crop::quality::central_window(spec.size);
    let o = first as f64;
    let window_map = inverse.after(&Affine([[1.0, 0.0, o], [0.0, 1.0, o]]));
    // The device's own sampling (RGB, or NV12 converted per neighbour).
    let window = crop::fused_warp(frame, &window_map, side)?;
    let blur = crop::quality::blur_variance_window(&window, spec.size);
    let q = crop::quality::measure_with_blur(bbox, landmarks, &alignment, blur);
    let rgb = if keep_rgb {
        Some(crop::fused_warp(frame, &inverse, spec.size)?)
    } else {
        None
    };
    Ok(DeviceFace {
        inverse,
        quality: crop::quality::weight(&q),
        rgb,
    })
}
