//! What a GPU device does with faces ([`FaceDevice`]: the CUDA device and its CPU twin) and
//! the image tower one is built from ([`Tower`]). A leaf of `gpu`: the backend (which drives
//! a device) and the CUDA device (which implements one) both build on it.

use std::path::PathBuf;

use super::vit::{EngineError, VitShape};
use crate::crop::align::Affine;
use crate::model::ModelBundle;
use crate::model::safetensors::SafeTensors;
use crate::types::Frame;

/// What the GPU encoder does with a batch, step by step. Used only on the thread that built
/// it (`backend::DeviceEncoder`).
pub trait FaceDevice {
    fn shape(&self) -> &VitShape;
    /// Starts a batch of `n` faces (chooses the bucket).
    fn begin(&mut self, n: usize) -> Result<(), EngineError>;
    /// Crops the faces of `frame` (one map each, crop pixel -> frame pixel) into the batch's
    /// slots `first..first + maps.len()`, normalised.
    fn crop(&mut self, frame: &Frame, maps: &[Affine], first: usize) -> Result<(), EngineError>;
    /// Embeddings of the batch's `n` faces (`n x embed_dim`).
    fn encode(&mut self, n: usize) -> Result<Vec<f32>, EngineError>;
    /// Frames uploaded so far.
    fn uploads(&self) -> u64;
    /// Device memory in use, where the device can say.
    fn used_bytes(&self) -> Option<usize> {
        None
    }
}

/// The image tower a device engine is built from. A rebuild after a device error reads the
/// file again and refuses it if it is not the one first loaded (SHA-256), so the rebuilt
/// engine always matches the text embeddings the decision stage scores with.
#[derive(Debug, Clone)]
pub struct Tower {
    pub path: PathBuf,
    pub sha256: String,
    pub shape: VitShape,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Tower {
    /// The bundle's tower, read and hashed.
    pub fn load(bundle: &ModelBundle) -> Result<(Tower, SafeTensors), EngineError> {
        let path = bundle.safetensors_path.clone().ok_or_else(|| {
            EngineError::Bundle(format!(
                "{}: the manifest names no image_encoder_safetensors (the GPU backend needs it)",
                bundle.dir.display()
            ))
        })?;
        let a = bundle.architecture();
        let shape = VitShape::new(a)?;
        // The file the manifest pins, checked again as read now.
        let pinned = bundle
            .manifest
            .files
            .image_encoder_safetensors
            .as_ref()
            .map(|e| e.sha256.to_ascii_lowercase());
        let (src, sha256) = read_hashed(&path, pinned.as_deref())?;
        Ok((
            Tower {
                path,
                sha256,
                shape,
                mean: a.mean,
                std: a.std,
            },
            src,
        ))
    }

    /// The same file again, checked against the first read.
    pub fn reread(&self) -> Result<SafeTensors, EngineError> {
        read_hashed(&self.path, Some(&self.sha256)).map(|(s, _)| s)
    }
}

fn read_hashed(
    path: &std::path::Path,
    want: Option<&str>,
) -> Result<(SafeTensors, String), EngineError> {
    let bytes = crate::model::read_bundle_file(path, super::vit::MAX_SAFETENSORS_BYTES)
        .map_err(|e| EngineError::Bundle(format!("{}: {e}", path.display())))?;
    let sha = crate::model::hex_sha256(&bytes);
    if let Some(w) = want
        && w != sha
    {
        return Err(EngineError::Bundle(format!(
            "{}: changed on disk since the model was loaded (SHA-256 {sha}, expected {w}); \
             reload the model",
            path.display()
        )));
    }
    let src = SafeTensors::parse(bytes)
        .map_err(|e| EngineError::Bundle(format!("{}: {e}", path.display())))?;
    Ok((src, sha))
}
