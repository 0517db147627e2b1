//! `dfwatch score IMAGE... --model DIR`: scores aligned face crops from image files.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

use crate::crop::resize::resize_rgb_bicubic;
use crate::encode::CpuEncoder;
use crate::model::ModelBundle;
use crate::onnx::{self, OnnxConfig};
use crate::score::{Explanation, Level, Scorer};

/// The model that produced a set of scores, as alerts name it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelIdentity {
    pub name: String,
    pub version: String,
    pub manifest_sha256: String,
    pub trained: bool,
    pub backend: &'static str,
}

/// Scores of one image.
#[derive(Debug, Clone, Serialize)]
pub struct ImageScore {
    pub image: String,
    pub q0: f64,
    pub logit_q0: f64,
    pub log_z: f64,
    /// Every label node in the model's order, with its logit `f_j` and marginal `q_j`.
    pub labels: Vec<LabelScore>,
    pub explanation: Explanation,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding: Option<Vec<f32>>,
}

/// One label node's scores.
#[derive(Debug, Clone, Serialize)]
pub struct LabelScore {
    pub name: String,
    pub level: Level,
    pub logit: f64,
    pub q: f64,
}

/// One image's result: scores or the reason it could not be scored.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum ImageResult {
    Scored(Box<ImageScore>),
    Failed { image: String, error: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct ScoreReport {
    pub model: ModelIdentity,
    pub results: Vec<ImageResult>,
}

/// Reads an image and brings it to the model's square input size (Pillow-exact antialiased
/// bicubic when larger). Errors say what is wrong with the file.
pub fn load_crop(path: &Path, size: usize) -> anyhow::Result<Vec<u8>> {
    let img = image::open(path)
        .with_context(|| format!("{}: cannot read as an image", path.display()))?
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w != h {
        anyhow::bail!(
            "{}: {w}x{h} is not square; `score` takes aligned square face crops",
            path.display()
        );
    }
    if w < size {
        anyhow::bail!(
            "{}: {w}x{h} is smaller than the model's {size}x{size} input; crops are never \
             upscaled",
            path.display()
        );
    }
    let raw = img.into_raw();
    Ok(if w == size {
        raw
    } else {
        resize_rgb_bicubic(&raw, w, h, size, size)
    })
}

/// Scores `images` with the bundle in `model_dir`.
pub fn score_images(
    model_dir: &Path,
    images: &[PathBuf],
    onnx_cfg: &OnnxConfig,
    with_embeddings: bool,
) -> anyhow::Result<ScoreReport> {
    let bundle = ModelBundle::load(model_dir)?;
    onnx::init(onnx_cfg)?;
    let mut encoder = CpuEncoder::new(&bundle)?;
    let scorer = Scorer::new(
        bundle.graph.clone(),
        &bundle.text_embeddings,
        bundle.architecture().embed_dim as usize,
    )?;
    let size = encoder.input_size();
    let labels = |s: &crate::score::FaceScore| -> Vec<LabelScore> {
        bundle
            .graph
            .nodes()
            .iter()
            .zip(s.logits.iter().zip(&s.marginals))
            .map(|(n, (&logit, &q))| LabelScore {
                name: n.name.clone(),
                level: n.level,
                logit,
                q,
            })
            .collect()
    };
    let mut results = Vec::with_capacity(images.len());
    let mut pixels = vec![0.0f32; encoder.crop_len()];
    for path in images {
        let image = path.display().to_string();
        let scored = load_crop(path, size).and_then(|rgb| {
            encoder.normalise_into(&rgb, &mut pixels);
            let e = encoder.encode(&pixels, 1)?;
            let s = scorer.score(&e)?;
            Ok(ImageScore {
                image: image.clone(),
                q0: s.q0,
                logit_q0: s.logit_q0,
                log_z: s.log_z,
                labels: labels(&s),
                explanation: scorer.explain(&s),
                embedding: with_embeddings.then_some(e),
            })
        });
        results.push(match scored {
            Ok(s) => ImageResult::Scored(Box::new(s)),
            Err(e) => ImageResult::Failed {
                image,
                error: format!("{e:#}"),
            },
        });
    }
    Ok(ScoreReport {
        model: ModelIdentity {
            name: bundle.manifest.model.name.clone(),
            version: bundle.manifest.model.version.clone(),
            manifest_sha256: bundle.manifest_sha256.clone(),
            trained: bundle.trained(),
            backend: "cpu-onnxruntime",
        },
        results,
    })
}
