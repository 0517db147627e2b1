//! The one chain from a face in a frame to what the encoder takes: align, crop, measure the
//! crop's quality, CLIP-normalise. The daemon's face stage and `dfwatch analyze` both use it.

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
