//! The model at run time: the bundle the config asks for ([`bundle_dir`]), loaded with its
//! encoder (ONNX Runtime's on the CPU, or the GPU backend's native engine), its scorer, the
//! identity that goes into alerts and the crop it takes ([`load_model`]). The daemon loads
//! through it at start and on a reload; the offline commands (`analyze`, `eval`,
//! `calibrate`, `score`) load through it too, so they never depend on the daemon.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::Config;
use crate::crop::CropMethod;
use crate::decide::Scoring;
use crate::encode::{BatchEncoder, CpuEncoder};
use crate::faces::CropSpec;
use crate::model::ModelBundle;
use crate::publish::payload::ModelInfo;
use crate::score::Scorer;

/// Where the bundle comes from when `model.bundle` is not set: an imported SJEDD checkpoint
/// if one is installed, else the synthetic ViT-B/32 that tools/setup.sh makes.
pub const DEFAULT_TRAINED_BUNDLE: &str = "var/models/sjedd";
pub const DEFAULT_SYNTH_BUNDLE: &str = "var/models/vitb32-synth";

/// The bundle directory the config asks for.
pub fn bundle_dir(config: &Config) -> PathBuf {
    match &config.model.bundle {
        Some(p) => crate::files::resolve(&config.base_dir, p),
        // In a checkout: under the working directory, else beside the executable.
        None => [DEFAULT_TRAINED_BUNDLE, DEFAULT_SYNTH_BUNDLE]
            .into_iter()
            .flat_map(crate::files::in_checkout)
            .find(|d| d.join("manifest.toml").exists())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SYNTH_BUNDLE)),
    }
}

/// A loaded model: bundle, encoder, scorer and the identity that goes into alerts.
pub struct LoadedModel {
    pub bundle: ModelBundle,
    pub encoder: Box<dyn BatchEncoder>,
    pub scoring: Scoring,
    pub crop: CropSpec,
    /// The encoder crops on its device: faces go to it aligned (`model.backend = "cuda"`).
    pub device_crop: bool,
}

/// Which engine a model is loaded for: `[model] backend`, `[gpu] device`, and the largest
/// batch (the GPU engine captures a graph for each bucket up to it before it is used).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineChoice {
    pub backend: crate::model::Backend,
    pub device: u32,
    pub max_batch: usize,
}

impl EngineChoice {
    pub fn of(config: &Config) -> Self {
        EngineChoice {
            backend: config.model.backend,
            device: config.gpu.device,
            max_batch: config.encoder.max_batch.get(),
        }
    }

    /// The CPU engine with default batching (for tools that score offline).
    pub fn cpu() -> Self {
        EngineChoice {
            backend: crate::model::Backend::Cpu,
            device: 0,
            max_batch: 8,
        }
    }
}

/// Loads and checks the bundle in `dir` for the engine `choice` names.
pub fn load_model(dir: &Path, choice: EngineChoice) -> anyhow::Result<LoadedModel> {
    let bundle = ModelBundle::load(dir).with_context(|| {
        format!(
            "model bundle {} (make one with `tools/model.py synth` or import a checkpoint: see \
             docs/src/models.md)",
            dir.display()
        )
    })?;
    let a = bundle.architecture();
    let scorer = Scorer::new(
        bundle.graph.clone(),
        &bundle.text_embeddings,
        a.embed_dim as usize,
    )?;
    let (encoder, backend, precision, method): (Box<dyn BatchEncoder>, String, &str, _) =
        match choice.backend {
            crate::model::Backend::Cpu => {
                let encoder = CpuEncoder::new(&bundle)?;
                // The session CpuEncoder::new just built is named by the bundle's ONNX path.
                let (backend, precision) =
                    crate::onnx::session_backend(&bundle.onnx_path.display().to_string());
                (Box::new(encoder), backend, precision, CropMethod::Reference)
            }
            crate::model::Backend::Cuda => {
                let encoder = crate::gpu::backend::cuda_encoder(
                    &bundle,
                    choice.device as usize,
                    choice.max_batch,
                )
                .with_context(|| {
                    format!(
                        "model.backend = \"cuda\": the native engine on GPU {}",
                        choice.device
                    )
                })?;
                // The device crops with the fused warp (kernels/crop.cu).
                (encoder, "cuda".to_string(), "fp16", CropMethod::Fused)
            }
        };
    let model = ModelInfo {
        name: bundle.manifest.model.name.clone(),
        version: bundle.manifest.model.version.clone(),
        manifest_sha256: bundle.manifest_sha256.clone(),
        trained: bundle.trained(),
        backend,
        precision: precision.into(),
    };
    let crop = CropSpec {
        size: a.image_size as usize,
        mean: a.mean,
        std: a.std,
        method,
    };
    Ok(LoadedModel {
        bundle,
        encoder,
        scoring: Scoring { scorer, model },
        crop,
        device_crop: choice.backend == crate::model::Backend::Cuda,
    })
}

/// [`load_model`] on a blocking thread (it reads and hashes hundreds of MB), with a panic
/// in the loading code (a crafted file ONNX Runtime trips on) reported as an error instead
/// of taking the daemon down.
pub(crate) async fn load_model_off_loop(
    dir: PathBuf,
    choice: EngineChoice,
) -> anyhow::Result<LoadedModel> {
    let shown = dir.display().to_string();
    match tokio::task::spawn_blocking(move || load_model(&dir, choice)).await {
        Ok(r) => r,
        Err(e) => Err(anyhow::anyhow!(
            "model bundle {shown}: loading it failed ({})",
            if e.is_panic() {
                "the loader panicked: a malformed file"
            } else {
                "cancelled"
            }
        )),
    }
}

pub(crate) fn announce_untrained(model: &ModelInfo) {
    if !model.trained {
        tracing::warn!(
            model = %model.name,
            "The model bundle is SYNTHETIC (untrained): its scores mean nothing and every alert \
             says trained=false. Import the SJEDD checkpoint for real detection (docs/src/models.md)."
        );
    }
}
