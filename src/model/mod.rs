//! Model bundles (`engines/<name>/`): loading and checking everything before use.
//!
//! The schema is written down in `engines/SCHEMA.md`; `engines/example.manifest.toml` is a
//! commented example. A bundle is refused with an error naming the file and the field that is
//! wrong: a checksum, a shape, a non-finite value, a label level, an edge.
//!
//! The model's identity in alerts is the SHA-256 of `manifest.toml`, which pins every file.
//!
//! A bundle may come from anywhere, so every file is opened once ([`read_bundle_file`]): never
//! through a symbolic link, never blocking on a FIFO or device, a regular file no larger than
//! the cap of its kind; the bytes that are hashed are the bytes that are used (the ONNX
//! encoder is handed to ONNX Runtime from memory, not opened again by path).

pub mod safetensors;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::score::{GraphError, LabelGraph, LabelNode, Level};

/// Which engine runs the image encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// ONNX Runtime on the CPU.
    #[default]
    Cpu,
    /// The native engine on a CUDA GPU, with the crop on the device (`[gpu]`).
    Cuda,
}

/// `[model]`: which bundle scores faces, and on what.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Bundle directory (relative paths are relative to the config file).
    pub bundle: Option<PathBuf>,
    /// `cpu` (ONNX Runtime) or `cuda` (the native engine on the GPU of `[gpu] device`; needs a
    /// build with the `cuda` feature).
    pub backend: Backend,
}

impl ModelConfig {
    pub(crate) fn validate(&self, path: &str, errors: &mut Vec<crate::validation::ConfigError>) {
        // What the build lacks is known here; what the machine lacks is
        // `gpu::check_backend`'s, run by `validate` and at start.
        if self.backend == Backend::Cuda
            && let Err(e) = crate::gpu::availability()
        {
            errors.push(crate::validation::ConfigError::new(
                format!("{path}.backend"),
                format!("\"cuda\" is not available: {e}"),
            ));
        }
    }
}

/// The manifest schema version this build reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Why a bundle was refused. `file` is relative to the bundle directory.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{dir}: not a model bundle (no manifest.toml); make one with tools/model.py")]
    NoManifest { dir: PathBuf },
    #[error("{file}: cannot read: {reason}")]
    Io { file: PathBuf, reason: String },
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: PathBuf,
        field: String,
        message: String,
    },
    #[error("{file}: checksum mismatch: manifest says sha256 {expected}, the file has {actual}")]
    Checksum {
        file: PathBuf,
        expected: String,
        actual: String,
    },
}

fn invalid(file: &Path, field: impl Into<String>, message: impl Into<String>) -> BundleError {
    BundleError::Invalid {
        file: file.to_path_buf(),
        field: field.into(),
        message: message.into(),
    }
}

/// `manifest.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema_version: u32,
    pub model: ModelInfo,
    pub architecture: Architecture,
    /// Label nodes in the order of the text-embedding rows.
    pub labels: Vec<LabelEntry>,
    pub graph: GraphEntry,
    pub files: Files,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    /// `false` for synthetic bundles: announced at start-up and in every alert.
    pub trained: bool,
    pub source: ModelSource,
}

/// Where the weights came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ModelSource {
    /// Made from a seed by `tools/model.py synth`.
    Synth { seed: u64, shift: f64 },
    /// Imported from an SJEDD checkpoint by `tools/model.py import`.
    Import {
        checkpoint: String,
        checkpoint_sha256: String,
        labels: String,
    },
}

/// Shape numbers of the image tower (OpenAI CLIP ViT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Architecture {
    /// `vit-b-32`, `tiny`, or another name for a custom shape.
    pub name: String,
    pub image_size: u32,
    pub patch_size: u32,
    pub width: u32,
    pub layers: u32,
    pub heads: u32,
    pub mlp_width: u32,
    pub embed_dim: u32,
    /// Per-channel normalisation of RGB in [0, 1].
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelEntry {
    pub name: String,
    pub level: Level,
    pub prompt: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphEntry {
    /// `[parent, child]` pairs by label name: root -> global, global -> local.
    pub edges: Vec<[String; 2]>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Files {
    pub image_encoder_onnx: FileEntry,
    pub image_encoder_safetensors: Option<FileEntry>,
    pub text_embeddings: FileEntry,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative to the bundle directory, without `..`.
    pub path: String,
    /// Lower-case hex SHA-256 of the file.
    pub sha256: String,
}

/// Largest `manifest.toml`.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Largest text-embeddings file (a few hundred labels of 768 floats is under 1 MB).
pub const MAX_TEXT_EMBEDDINGS_BYTES: u64 = 64 << 20;
/// Largest image encoder, ONNX or safetensors (ViT-L/14 in fp32 is 1.2 GB).
pub const MAX_ENCODER_BYTES: u64 = 4 << 30;

/// Reads a bundle file once: never through a symbolic link (`O_NOFOLLOW`), never blocking
/// on a FIFO or device (`O_NONBLOCK`, then only regular files), at most `cap` bytes.
pub fn read_bundle_file(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    crate::files::read_capped(path, cap, crate::files::Links::Refuse)
}

/// SHA-256 of `dir`'s `manifest.toml`, read as [`ModelBundle::load`] reads it: the identity
/// of the bundle there now.
pub fn manifest_sha256(dir: &Path) -> std::io::Result<String> {
    read_bundle_file(&dir.join("manifest.toml"), MAX_MANIFEST_BYTES).map(|b| hex_sha256(&b))
}

/// A loaded, fully checked bundle.
#[derive(Debug, Clone)]
pub struct ModelBundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// SHA-256 of `manifest.toml`: the model's identity.
    pub manifest_sha256: String,
    pub graph: LabelGraph,
    /// Raw text embeddings, `labels x embed_dim`, row-major.
    pub text_embeddings: Vec<f32>,
    /// Absolute path of the ONNX image encoder (for reports; the encoder is built from
    /// `onnx_bytes`).
    pub onnx_path: PathBuf,
    /// The ONNX image encoder as read and hashed.
    pub onnx_bytes: std::sync::Arc<[u8]>,
    /// Absolute path of the safetensors image encoder, when the bundle has one.
    pub safetensors_path: Option<PathBuf>,
}

pub fn hex_sha256(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

impl ModelBundle {
    /// Loads and checks the bundle in `dir`.
    pub fn load(dir: &Path) -> Result<Self, BundleError> {
        let mpath = dir.join("manifest.toml");
        let mfile = PathBuf::from("manifest.toml");
        let text = match read_bundle_file(&mpath, MAX_MANIFEST_BYTES) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BundleError::NoManifest {
                    dir: dir.to_path_buf(),
                });
            }
            Err(e) => {
                return Err(BundleError::Io {
                    file: mpath,
                    reason: e.to_string(),
                });
            }
        };
        let manifest_sha256 = hex_sha256(&text);
        let text = String::from_utf8(text).map_err(|_| invalid(&mfile, "", "not UTF-8"))?;
        let manifest: Manifest = toml::from_str(&text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}")
                })
                .unwrap_or_default();
            invalid(&mfile, at, e.message().trim())
        })?;
        if manifest.schema_version != SCHEMA_VERSION {
            return Err(invalid(
                &mfile,
                "schema_version",
                format!(
                    "{} is not supported; this build reads version {SCHEMA_VERSION}",
                    manifest.schema_version
                ),
            ));
        }
        check_architecture(&manifest.architecture, &mfile)?;
        let graph = build_graph(&manifest, &mfile)?;

        // Each listed file: a plain name in the bundle directory, read once, its bytes
        // checked against the manifest.
        let file_of =
            |key: &str, entry: &FileEntry, cap: u64| -> Result<(PathBuf, Vec<u8>), BundleError> {
                let field = format!("files.{key}");
                let rel = Path::new(&entry.path);
                let mut parts = rel.components();
                if !matches!(
                    (parts.next(), parts.next()),
                    (Some(std::path::Component::Normal(_)), None)
                ) {
                    return Err(invalid(
                        &mfile,
                        format!("{field}.path"),
                        format!(
                            "{:?} must be a file name inside the bundle directory (no directories, \
                         no ..)",
                            entry.path
                        ),
                    ));
                }
                let want = entry.sha256.to_ascii_lowercase();
                if want.len() != 64 || !want.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(invalid(
                        &mfile,
                        format!("{field}.sha256"),
                        "must be 64 hex digits",
                    ));
                }
                let full = dir.join(rel);
                let bytes = read_bundle_file(&full, cap).map_err(|e| BundleError::Io {
                    file: rel.to_path_buf(),
                    reason: format!("{e} (listed as {field})"),
                })?;
                let actual = hex_sha256(&bytes);
                if actual != want {
                    return Err(BundleError::Checksum {
                        file: rel.to_path_buf(),
                        expected: want,
                        actual,
                    });
                }
                let abs = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
                Ok((abs.join(rel), bytes))
            };
        let f = &manifest.files;
        let (onnx_path, onnx_bytes) = file_of(
            "image_encoder_onnx",
            &f.image_encoder_onnx,
            MAX_ENCODER_BYTES,
        )?;
        // Checked completely now; the GPU engine reads it again through read_bundle_file
        // and the same checksum when it loads.
        let safetensors_path = f
            .image_encoder_safetensors
            .as_ref()
            .map(|e| file_of("image_encoder_safetensors", e, MAX_ENCODER_BYTES).map(|(p, _)| p))
            .transpose()?;
        let (_, text_bytes) = file_of(
            "text_embeddings",
            &f.text_embeddings,
            MAX_TEXT_EMBEDDINGS_BYTES,
        )?;
        let text_embeddings = read_text_embeddings(
            text_bytes,
            Path::new(&f.text_embeddings.path),
            graph.len(),
            manifest.architecture.embed_dim as usize,
        )?;
        Ok(ModelBundle {
            dir: dir.to_path_buf(),
            manifest,
            manifest_sha256,
            graph,
            text_embeddings,
            onnx_path,
            onnx_bytes: onnx_bytes.into(),
            safetensors_path,
        })
    }

    pub fn trained(&self) -> bool {
        self.manifest.model.trained
    }

    pub fn architecture(&self) -> &Architecture {
        &self.manifest.architecture
    }
}

fn check_architecture(a: &Architecture, file: &Path) -> Result<(), BundleError> {
    let field = |k: &str| format!("architecture.{k}");
    for (k, v) in [
        ("image_size", a.image_size),
        ("patch_size", a.patch_size),
        ("width", a.width),
        ("layers", a.layers),
        ("heads", a.heads),
        ("mlp_width", a.mlp_width),
        ("embed_dim", a.embed_dim),
    ] {
        if v == 0 {
            return Err(invalid(file, field(k), "must be above 0"));
        }
    }
    if !a.image_size.is_multiple_of(a.patch_size) {
        return Err(invalid(
            file,
            field("patch_size"),
            format!(
                "{} does not divide image_size {}",
                a.patch_size, a.image_size
            ),
        ));
    }
    if !a.width.is_multiple_of(a.heads) {
        return Err(invalid(
            file,
            field("heads"),
            format!("{} does not divide width {}", a.heads, a.width),
        ));
    }
    for (i, (m, s)) in a.mean.iter().zip(&a.std).enumerate() {
        if !m.is_finite() {
            return Err(invalid(
                file,
                format!("architecture.mean[{i}]"),
                "not finite",
            ));
        }
        if !(s.is_finite() && *s > 0.0) {
            return Err(invalid(
                file,
                format!("architecture.std[{i}]"),
                "must be finite and above 0",
            ));
        }
    }
    Ok(())
}

fn build_graph(m: &Manifest, file: &Path) -> Result<LabelGraph, BundleError> {
    for (i, l) in m.labels.iter().enumerate() {
        let field = |k: &str| format!("labels[{i}].{k}");
        if l.name.trim().is_empty() {
            return Err(invalid(file, field("name"), "must not be empty"));
        }
        if l.prompt.trim().is_empty() {
            return Err(invalid(file, field("prompt"), "must not be empty"));
        }
        if l.level != Level::Root && !l.prompt.contains(&l.name) {
            return Err(invalid(
                file,
                field("prompt"),
                format!(
                    "{:?} does not mention the label {:?}; rows and prompts are out of step",
                    l.prompt, l.name
                ),
            ));
        }
    }
    let index = |name: &str, i: usize, side: usize| {
        m.labels.iter().position(|l| l.name == name).ok_or_else(|| {
            invalid(
                file,
                format!("graph.edges[{i}][{side}]"),
                format!("no label named {name:?}"),
            )
        })
    };
    let mut edges = Vec::with_capacity(m.graph.edges.len());
    for (i, [a, b]) in m.graph.edges.iter().enumerate() {
        edges.push((index(a, i, 0)?, index(b, i, 1)?));
    }
    let nodes = m
        .labels
        .iter()
        .map(|l| LabelNode {
            name: l.name.clone(),
            level: l.level,
        })
        .collect();
    LabelGraph::new(nodes, edges).map_err(|e| {
        let field = match &e {
            GraphError::Size(_) | GraphError::RootFirst(_) | GraphError::SecondRoot { .. } => {
                "labels".to_string()
            }
            GraphError::DuplicateName(_) => "labels".to_string(),
            GraphError::EdgeOutOfRange { index, .. }
            | GraphError::EdgeLevels { index, .. }
            | GraphError::DuplicateEdge { index, .. } => format!("graph.edges[{index}]"),
            GraphError::ChildlessGlobal(_) | GraphError::Orphan(_) => "graph.edges".to_string(),
        };
        invalid(file, field, e.to_string())
    })
}

fn read_text_embeddings(
    bytes: Vec<u8>,
    rel: &Path,
    nodes: usize,
    dim: usize,
) -> Result<Vec<f32>, BundleError> {
    let st = safetensors::SafeTensors::parse(bytes).map_err(|e| invalid(rel, "header", e))?;
    let (shape, values) = st
        .f32("text_embeddings")
        .map_err(|e| invalid(rel, "text_embeddings", e))?;
    if shape != [nodes, dim] {
        return Err(invalid(
            rel,
            "text_embeddings",
            format!("shape {shape:?}, expected [{nodes}, {dim}] (labels x architecture.embed_dim)"),
        ));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(invalid(
            rel,
            "text_embeddings",
            format!("non-finite value at row {}, column {}", i / dim, i % dim),
        ));
    }
    Ok(values)
}

#[cfg(test)]
mod tests;
