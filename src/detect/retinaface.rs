//! RetinaFace, the detector SJEDD's reference preprocessing used, for users who bring its
//! weights as ONNX (none ship on a package registry).
//!
//! Expected ONNX layout (the common `Pytorch_Retinaface` export):
//! - input: one tensor `[1, 3, H, W]` f32, **BGR**, minus the mean `(104, 117, 123)`, not
//!   scaled; `H` and `W` may be fixed (the image is resized to them) or dynamic;
//! - outputs, in this order: `loc` `[1, P, 4]` box offsets, `conf` `[1, P, 2]` softmaxed
//!   (background, face), `landms` `[1, P, 10]` landmark offsets;
//! - priors: feature strides 8, 16, 32 with anchor sizes (16, 32), (64, 128), (256, 512), two
//!   anchors per cell in that order, cells row-major; variances (0.1, 0.2).
//!
//! [`decode`] turns the outputs into boxes and five landmarks (left eye, right eye, nose,
//! left and right mouth corner, image-left/right as MTCNN's).

use std::path::Path;

use super::image::{RgbF32, resize_area};
use super::nms::{Nms, nms};
use super::{DetectError, Detection};
use crate::onnx::{self, Session};
use crate::types::BBox;

const STEPS: [usize; 3] = [8, 16, 32];
const MIN_SIZES: [[f32; 2]; 3] = [[16.0, 32.0], [64.0, 128.0], [256.0, 512.0]];
const VARIANCE: [f32; 2] = [0.1, 0.2];
const MEAN_BGR: [f32; 3] = [104.0, 117.0, 123.0];

/// Anchor boxes `[cx, cy, w, h]`, normalised to the input size.
pub fn priors(width: usize, height: usize) -> Vec<[f32; 4]> {
    let mut out = Vec::new();
    for (step, sizes) in STEPS.iter().zip(MIN_SIZES) {
        let (fw, fh) = (width.div_ceil(*step), height.div_ceil(*step));
        for i in 0..fh {
            for j in 0..fw {
                for s in sizes {
                    out.push([
                        (j as f32 + 0.5) * *step as f32 / width as f32,
                        (i as f32 + 0.5) * *step as f32 / height as f32,
                        s / width as f32,
                        s / height as f32,
                    ]);
                }
            }
        }
    }
    out
}

/// Decodes raw outputs (`loc` 4, `conf` 2, `landms` 10 values per prior) for an input of
/// `width x height`: boxes and landmarks in input pixels, scores above `threshold`, NMS at
/// `nms_iou`.
pub fn decode(
    loc: &[f32],
    conf: &[f32],
    landms: &[f32],
    priors: &[[f32; 4]],
    (width, height): (usize, usize),
    threshold: f32,
    nms_iou: f32,
) -> Vec<Detection> {
    let (w, h) = (width as f32, height as f32);
    let mut found = Vec::new();
    for (k, p) in priors.iter().enumerate() {
        let (Some(c), Some(l), Some(m)) = (
            conf.get(2 * k..2 * k + 2),
            loc.get(4 * k..4 * k + 4),
            landms.get(10 * k..10 * k + 10),
        ) else {
            break;
        };
        if c[1] < threshold {
            continue;
        }
        let cx = p[0] + l[0] * VARIANCE[0] * p[2];
        let cy = p[1] + l[1] * VARIANCE[0] * p[3];
        let bw = p[2] * (l[2] * VARIANCE[1]).exp();
        let bh = p[3] * (l[3] * VARIANCE[1]).exp();
        let bbox = BBox {
            x0: (cx - bw / 2.0) * w,
            y0: (cy - bh / 2.0) * h,
            x1: (cx + bw / 2.0) * w,
            y1: (cy + bh / 2.0) * h,
        };
        let landmarks = std::array::from_fn(|i| {
            [
                (p[0] + m[2 * i] * VARIANCE[0] * p[2]) * w,
                (p[1] + m[2 * i + 1] * VARIANCE[0] * p[3]) * h,
            ]
        });
        found.push(Detection {
            bbox,
            landmarks,
            score: c[1],
        });
    }
    let boxes: Vec<BBox> = found.iter().map(|d| d.bbox).collect();
    let scores: Vec<f32> = found.iter().map(|d| d.score).collect();
    nms(&boxes, &scores, nms_iou, Nms::Union, false)
        .into_iter()
        .map(|i| found[i])
        .collect()
}

/// The model's file in `detect.model_dir`.
pub const FILE: &str = "retinaface.onnx";

/// RetinaFace through ONNX Runtime.
pub struct RetinaFace {
    session: Session,
    /// Fixed input size, when the model has one.
    fixed: Option<(usize, usize)>,
}

impl std::fmt::Debug for RetinaFace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetinaFace")
            .field("fixed", &self.fixed)
            .finish()
    }
}

impl RetinaFace {
    /// Loads `retinaface.onnx` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, DetectError> {
        let path = dir.join(FILE);
        if !path.exists() {
            return Err(DetectError::Model(format!(
                "{} is missing: RetinaFace weights are not on any package registry; export \
                 them to ONNX with the layout documented in src/detect/retinaface.rs",
                path.display()
            )));
        }
        let session = onnx::session(&path).map_err(|e| DetectError::Model(e.to_string()))?;
        let fixed = match session.inputs().first().map(|i| i.dtype()) {
            Some(ort::value::ValueType::Tensor { shape, .. }) if shape.len() == 4 => {
                (shape[2] > 0 && shape[3] > 0).then(|| (shape[3] as usize, shape[2] as usize))
            }
            _ => {
                return Err(DetectError::Model(format!(
                    "{}: input is not a [1, 3, H, W] tensor",
                    path.display()
                )));
            }
        };
        if session.outputs().len() != 3 {
            return Err(DetectError::Model(format!(
                "{}: expected 3 outputs (loc, conf, landms), found {}",
                path.display(),
                session.outputs().len()
            )));
        }
        Ok(RetinaFace { session, fixed })
    }
}

impl super::Detector for RetinaFace {
    fn detect(&mut self, img: &RgbF32, _min_face: f32) -> Result<Vec<Detection>, DetectError> {
        let (w, h) = self.fixed.unwrap_or((img.width, img.height));
        let input_img = if (w, h) == (img.width, img.height) {
            img.clone()
        } else {
            resize_area(img, w, h)
        };
        let plane = w * h;
        let mut input = vec![0.0f32; 3 * plane];
        for y in 0..h {
            for x in 0..w {
                for (c, bgr) in [2usize, 1, 0].into_iter().enumerate() {
                    input[c * plane + y * w + x] = input_img.px(x, y, bgr) - MEAN_BGR[c];
                }
            }
        }
        let name = self.session.inputs()[0].name().to_string();
        let t = ort::value::TensorRef::from_array_view(([1i64, 3, h as i64, w as i64], &input[..]))
            .map_err(|e| DetectError::Run(e.to_string()))?;
        let outs = self
            .session
            .run(ort::inputs![name => t])
            .map_err(|e| DetectError::Run(e.to_string()))?;
        let get = |i: usize| -> Result<Vec<f32>, DetectError> {
            outs[i]
                .try_extract_tensor::<f32>()
                .map(|(_, d)| d.to_vec())
                .map_err(|e| DetectError::Run(e.to_string()))
        };
        let (loc, conf, landms) = (get(0)?, get(1)?, get(2)?);
        let (sx, sy) = (img.width as f32 / w as f32, img.height as f32 / h as f32);
        Ok(
            decode(&loc, &conf, &landms, &priors(w, h), (w, h), 0.02, 0.4)
                .into_iter()
                .map(|d| Detection {
                    bbox: BBox {
                        x0: d.bbox.x0 * sx,
                        y0: d.bbox.y0 * sy,
                        x1: d.bbox.x1 * sx,
                        y1: d.bbox.y1 * sy,
                    },
                    landmarks: d.landmarks.map(|[x, y]| [x * sx, y * sy]),
                    score: d.score,
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priors_cover_every_cell_of_every_stride() {
        // 640 x 480: (80*60 + 40*30 + 20*15) cells, two anchors each.
        let p = priors(640, 480);
        assert_eq!(p.len(), 2 * (80 * 60 + 40 * 30 + 20 * 15));
        assert_eq!(p[0], [4.0 / 640.0, 4.0 / 480.0, 16.0 / 640.0, 16.0 / 480.0]);
        assert_eq!(p[1][2], 32.0 / 640.0);
        let last = p.last().unwrap();
        assert_eq!(last[2], 512.0 / 640.0);
        assert!((last[0] - (19.5 * 32.0) / 640.0).abs() < 1e-6);
    }

    #[test]
    fn decoding_matches_a_hand_computed_case() {
        let pri = vec![[0.5, 0.5, 0.1, 0.2]];
        // dx = 1 -> cx = 0.5 + 0.1 * 0.1 = 0.51; dw = ln 2 / 0.2 -> w = 0.2.
        let loc = [1.0, -1.0, std::f32::consts::LN_2 / 0.2, 0.0];
        let conf = [0.1, 0.9];
        let landms = [0.0, 0.0, 10.0, 0.0, 0.0, 10.0, -10.0, 0.0, 0.0, -10.0];
        let d = decode(&loc, &conf, &landms, &pri, (100, 200), 0.5, 0.4);
        assert_eq!(d.len(), 1);
        let b = d[0].bbox;
        assert!(
            (b.x0 - (0.51 - 0.1) * 100.0).abs() < 1e-3
                && (b.x1 - (0.51 + 0.1) * 100.0).abs() < 1e-3
        );
        // cy = 0.5 - 0.1 * 0.2 = 0.48; h = 0.2.
        assert!((b.y0 - (0.48 - 0.1) * 200.0).abs() < 1e-3);
        assert_eq!(d[0].landmarks[0], [50.0, 100.0]);
        assert!((d[0].landmarks[1][0] - (0.5 + 10.0 * 0.1 * 0.1) * 100.0).abs() < 1e-3);
        assert!((d[0].landmarks[2][1] - (0.5 + 10.0 * 0.1 * 0.2) * 200.0).abs() < 1e-3);
        assert!(decode(&loc, &[0.9, 0.1], &landms, &pri, (100, 200), 0.5, 0.4).is_empty());
    }
}
