//! Encode: faces -> image embeddings, by the engine of the model's backend.
//!
//! Owns the `[encoder]` config section ([`EncoderConfig`]). Faces arrive one by one with
//! metadata; a [`Batcher`] groups them by size or deadline; one dedicated thread runs the
//! engine ([`BatchEncoder`]) on each batch and sends `(metadata, embedding)` on, never
//! dropping one (the output channel applies back-pressure). The queue may also carry items
//! that pass through in order with the faces ([`Queued::Pass`], e.g. a track's end): the
//! batch in hand is encoded and sent first, then the item, so nothing overtakes a face queued
//! before it.
//!
//! A face reaches the engine as [`FaceInput::Pixels`] (cropped and normalised on the CPU: the
//! ONNX Runtime engine here, [`CpuEncoder`]) or [`FaceInput::Aligned`] (the frame and the map
//! of the crop: the GPU backend crops on the device, `crate::gpu::backend`).
//!
//! Model contract (engines/SCHEMA.md): input `pixels`, `N x 3 x S x S` f32, CLIP-normalised;
//! output `embedding`, `N x D` f32, not normalised.

mod batcher;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use batcher::Batcher;

use crate::channel::{FullPolicy, QueueConfig, Receiver, RecvTimeoutError, Sender};
use crate::crop::align::Affine;
use crate::model::ModelBundle;
use crate::onnx::{self, OnnxError, Session};
use crate::types::Frame;

/// Input and output names of the ONNX image encoder.
pub const INPUT_NAME: &str = "pixels";
pub const OUTPUT_NAME: &str = "embedding";

/// `[encoder]`: batching of crops for the image encoder, and its queues.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncoderConfig {
    /// Largest batch handed to the model. Range 1 to 256.
    pub max_batch: NonZeroUsize,
    /// Longest a crop waits for its batch to fill. Range 0s to 5s.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Crops waiting for the encoder, from every stream. Default 32 with `drop_oldest`: when
    /// the encoder falls behind, the oldest crop goes (counted per stream) and the tracker
    /// schedules that face again. Track ends in this queue are never dropped. Capacity range
    /// 1 to 4096.
    pub queue: QueueConfig,
    /// Embeddings waiting for the decision stage. Never dropped: when full, the encoder waits.
    /// Range 1 to 65536.
    pub output_capacity: NonZeroUsize,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig {
            max_batch: NonZeroUsize::new(8).expect("non-zero literal"),
            max_wait: Duration::from_millis(20),
            queue: QueueConfig {
                capacity: NonZeroUsize::new(32).expect("non-zero literal"),
                policy: FullPolicy::DropOldest,
            },
            output_capacity: NonZeroUsize::new(256).expect("non-zero literal"),
        }
    }
}

impl EncoderConfig {
    pub(crate) fn validate(&self, path: &str, errors: &mut Vec<crate::validation::ConfigError>) {
        let mut c = crate::validation::Checker::new(path, errors);
        c.count("max_batch", self.max_batch.get() as u64, 1..=MAX_BATCH);
        c.duration(
            "max_wait",
            self.max_wait,
            Duration::ZERO..=Duration::from_secs(5),
        );
        c.count("queue.capacity", self.queue.capacity.get() as u64, 1..=4096);
        c.count(
            "output_capacity",
            self.output_capacity.get() as u64,
            1..=65_536,
        );
    }
}

/// Largest `encoder.max_batch` (256 crops of 3x224x224 f32 are 154 MB).
pub const MAX_BATCH: u64 = 256;

/// Why encoding failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    #[error("{model}: {what}")]
    Contract { model: String, what: String },
    #[error("batch holds {got} values; {n} crops of 3x{size}x{size} need {want}")]
    BatchShape {
        got: usize,
        n: usize,
        size: usize,
        want: usize,
    },
    #[error("inference failed: {0}")]
    Run(String),
    #[error("GPU engine: {0}")]
    Engine(String),
    #[error("{engine} cannot take {got}")]
    Input {
        engine: &'static str,
        got: &'static str,
    },
    /// The device failed (out of memory, lost, a sticky launch error): the engine is rebuilt
    /// before the next batch ([`BatchEncoder::recover`]).
    #[error("GPU device error: {0}")]
    Device(String),
}

/// What the encoder gets for one face.
#[derive(Debug)]
pub enum FaceInput {
    /// `3 * S * S` CLIP-normalised values, CHW (cropped on the CPU).
    Pixels(Vec<f32>),
    /// The frame and the map from crop pixels to frame pixels (`crop::fused_inverse`): the
    /// engine crops and normalises it itself (on the GPU).
    Aligned { frame: Arc<Frame>, inverse: Affine },
}

impl FaceInput {
    fn kind(&self) -> &'static str {
        match self {
            FaceInput::Pixels(_) => "normalised pixels",
            FaceInput::Aligned { .. } => "an aligned face (the GPU crop's input)",
        }
    }
}

/// An engine the encoder loop drives: a batch of faces in, `n x dim` embeddings out.
pub trait BatchEncoder: Send {
    /// Length of one embedding.
    fn dim(&self) -> usize;
    /// Embeddings of the faces, in order.
    fn encode_inputs(&mut self, faces: &[&FaceInput]) -> Result<Vec<f32>, EncodeError>;
    /// After [`EncodeError::Device`]: rebuilds what the error broke (a GPU context, its
    /// weights and graphs). The loop retries with a backoff until it succeeds.
    fn recover(&mut self) -> Result<(), EncodeError> {
        Ok(())
    }
}

impl<E: BatchEncoder + ?Sized> BatchEncoder for Box<E> {
    fn dim(&self) -> usize {
        (**self).dim()
    }
    fn encode_inputs(&mut self, faces: &[&FaceInput]) -> Result<Vec<f32>, EncodeError> {
        (**self).encode_inputs(faces)
    }
    fn recover(&mut self) -> Result<(), EncodeError> {
        (**self).recover()
    }
}

/// The ONNX image encoder of a bundle on the CPU.
pub struct CpuEncoder {
    session: Session,
    /// The batch's values, reused.
    scratch: Vec<f32>,
    size: usize,
    dim: usize,
    mean: [f32; 3],
    std: [f32; 3],
}

impl std::fmt::Debug for CpuEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuEncoder")
            .field("size", &self.size)
            .field("dim", &self.dim)
            .finish()
    }
}

impl CpuEncoder {
    /// Loads `bundle`'s ONNX encoder on the shared runtime (call [`onnx::init`] first) and
    /// checks its inputs and outputs against the manifest.
    pub fn new(bundle: &ModelBundle) -> Result<Self, EncodeError> {
        // The bytes the bundle loader read and hashed, not the file opened again.
        let name = bundle.onnx_path.display().to_string();
        let session = onnx::session_from_memory(&name, &bundle.onnx_bytes)?;
        Self::with_session(bundle, session, name)
    }

    /// Like [`CpuEncoder::new`] with another ONNX file of the same model (e.g. int8).
    pub fn from_onnx(bundle: &ModelBundle, path: &std::path::Path) -> Result<Self, EncodeError> {
        let session = onnx::session(path)?;
        Self::with_session(bundle, session, path.display().to_string())
    }

    /// Checks `session` against the bundle's contract.
    fn with_session(
        bundle: &ModelBundle,
        session: Session,
        model: String,
    ) -> Result<Self, EncodeError> {
        let a = bundle.architecture();
        let contract = |what: String| EncodeError::Contract {
            model: model.clone(),
            what,
        };
        let size = a.image_size as usize;
        let dim = a.embed_dim as usize;
        let dims_of = |t: &ort::value::ValueType| match t {
            ort::value::ValueType::Tensor { ty, shape, .. }
                if *ty == ort::value::TensorElementType::Float32 =>
            {
                Some(shape.iter().copied().collect::<Vec<i64>>())
            }
            _ => None,
        };
        let input = session
            .inputs()
            .iter()
            .find(|i| i.name() == INPUT_NAME)
            .ok_or_else(|| contract(format!("no input named {INPUT_NAME:?}")))?;
        let want_in = [-1, 3, size as i64, size as i64];
        match dims_of(input.dtype()) {
            Some(d) if d.len() == 4 && d[1..] == want_in[1..] => {}
            other => {
                return Err(contract(format!(
                    "input {INPUT_NAME:?} is {other:?}; expected f32 [N, 3, {size}, {size}]"
                )));
            }
        }
        let output = session
            .outputs()
            .iter()
            .find(|o| o.name() == OUTPUT_NAME)
            .ok_or_else(|| contract(format!("no output named {OUTPUT_NAME:?}")))?;
        match dims_of(output.dtype()) {
            Some(d) if d.len() == 2 && d[1] == dim as i64 => {}
            other => {
                return Err(contract(format!(
                    "output {OUTPUT_NAME:?} is {other:?}; expected f32 [N, {dim}] \
                     (architecture.embed_dim)"
                )));
            }
        }
        Ok(CpuEncoder {
            session,
            scratch: Vec::new(),
            size,
            dim,
            mean: a.mean,
            std: a.std,
        })
    }

    /// Side of the square input crop.
    pub fn input_size(&self) -> usize {
        self.size
    }

    /// Length of one embedding.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Values of one normalised crop (`3 * S * S`).
    pub fn crop_len(&self) -> usize {
        3 * self.size * self.size
    }

    /// Writes an RGB8 crop (`S x S`, rows of `3 * S` bytes) into `out` (`3 * S * S`), CHW,
    /// `(v / 255 - mean) / std`.
    pub fn normalise_into(&self, rgb: &[u8], out: &mut [f32]) {
        normalise_rgb(rgb, self.size, self.mean, self.std, out);
    }

    /// Embeds `n` normalised crops laid out back to back in `pixels`.
    pub fn encode(&mut self, pixels: &[f32], n: usize) -> Result<Vec<f32>, EncodeError> {
        let want = n * self.crop_len();
        if pixels.len() != want || n == 0 {
            return Err(EncodeError::BatchShape {
                got: pixels.len(),
                n,
                size: self.size,
                want,
            });
        }
        let s = self.size as i64;
        let input = ort::value::TensorRef::from_array_view(([n as i64, 3, s, s], pixels))
            .map_err(|e| EncodeError::Run(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![INPUT_NAME => input])
            .map_err(|e| EncodeError::Run(e.to_string()))?;
        let (shape, data) = outputs[OUTPUT_NAME]
            .try_extract_tensor::<f32>()
            .map_err(|e| EncodeError::Run(e.to_string()))?;
        if shape.len() != 2 || shape[0] != n as i64 || shape[1] != self.dim as i64 {
            return Err(EncodeError::Run(format!(
                "output shape {shape:?}, expected [{n}, {}]",
                self.dim
            )));
        }
        Ok(data.to_vec())
    }
}

impl BatchEncoder for CpuEncoder {
    fn dim(&self) -> usize {
        self.dim
    }

    fn encode_inputs(&mut self, faces: &[&FaceInput]) -> Result<Vec<f32>, EncodeError> {
        let mut pixels = std::mem::take(&mut self.scratch);
        pixels.clear();
        for f in faces {
            match f {
                FaceInput::Pixels(p) => pixels.extend_from_slice(p),
                other => {
                    self.scratch = pixels;
                    return Err(EncodeError::Input {
                        engine: "the ONNX Runtime encoder",
                        got: other.kind(),
                    });
                }
            }
        }
        let out = self.encode(&pixels, faces.len());
        self.scratch = pixels;
        out
    }
}

/// `(v / 255 - mean) / std`, HWC u8 -> CHW f32, for a square crop of side `size`.
pub fn normalise_rgb(rgb: &[u8], size: usize, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let plane = size * size;
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| mean[c] / std[c]);
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, px) in rgb.chunks_exact(3).take(plane).enumerate() {
        r[i] = f32::from(px[0]) * scale[0] - shift[0];
        g[i] = f32::from(px[1]) * scale[1] - shift[1];
        b[i] = f32::from(px[2]) * scale[2] - shift[2];
    }
}

/// One crop to encode, with whatever the caller needs back.
#[derive(Debug)]
pub struct EncodeJob<M> {
    pub input: FaceInput,
    pub meta: M,
}

/// An embedding with its job's metadata.
#[derive(Debug)]
pub struct Embedded<M> {
    pub meta: M,
    pub embedding: Vec<f32>,
    /// Size of the batch it ran in, and how long that batch took.
    pub batch_size: usize,
    pub batch_time: Duration,
}

/// An item of the encoder's queue: a crop to encode, or something that passes through to the
/// output in order with the crops.
#[derive(Debug)]
pub enum Queued<M, E> {
    Face(EncodeJob<M>),
    Pass(E),
}

impl<M, E> Queued<M, E> {
    /// Pass-through items are never dropped by the queue (see
    /// [`crate::channel::bounded_keeping`]).
    pub fn must_keep(&self) -> bool {
        matches!(self, Queued::Pass(_))
    }
}

/// An item of the encoder's output: an embedding, or a pass-through item in its place in the
/// order.
#[derive(Debug)]
pub enum Encoded<M, E> {
    Face(Embedded<M>),
    Pass(E),
}

/// What the encoder loop reads: plain jobs, or [`Queued`] items.
pub trait EncoderInput<M>: Send {
    /// What passes through unencoded.
    type Pass;
    fn split(self) -> Result<EncodeJob<M>, Self::Pass>;
}

impl<M: Send> EncoderInput<M> for EncodeJob<M> {
    type Pass = std::convert::Infallible;
    fn split(self) -> Result<EncodeJob<M>, Self::Pass> {
        Ok(self)
    }
}

impl<M: Send, E: Send> EncoderInput<M> for Queued<M, E> {
    type Pass = E;
    fn split(self) -> Result<EncodeJob<M>, E> {
        match self {
            Queued::Face(j) => Ok(j),
            Queued::Pass(e) => Err(e),
        }
    }
}

/// What the encoder loop writes: plain embeddings, or [`Encoded`] items.
pub trait EncoderOutput<M, P>: Send {
    fn face(e: Embedded<M>) -> Self;
    fn pass(p: P) -> Self;
}

impl<M: Send> EncoderOutput<M, std::convert::Infallible> for Embedded<M> {
    fn face(e: Embedded<M>) -> Self {
        e
    }
    fn pass(p: std::convert::Infallible) -> Self {
        match p {}
    }
}

impl<M: Send, E: Send> EncoderOutput<M, E> for Encoded<M, E> {
    fn face(e: Embedded<M>) -> Self {
        Encoded::Face(e)
    }
    fn pass(p: E) -> Self {
        Encoded::Pass(p)
    }
}

/// Runs the encoder on this thread until `jobs` closes: batches by size or deadline, sends
/// every embedding to `out` (waiting when `out` is full). A failed batch is logged with its
/// size and its jobs are dropped with a count (returned at the end).
pub fn run_encoder<M: Send, E: BatchEncoder>(
    encoder: E,
    cfg: &EncoderConfig,
    jobs: Receiver<EncodeJob<M>>,
    out: Sender<Embedded<M>>,
) -> u64 {
    run_encoder_until(
        encoder,
        cfg,
        jobs,
        out,
        &AtomicBool::new(false),
        &crate::fault::Restarts::default(),
        &mut |_, _| {},
    )
}

/// [`run_encoder`] over any [`EncoderInput`] and [`EncoderOutput`] (pass-through items go
/// out after the batch in hand), that also ends when `stop` is set (within 100 ms, after the
/// batch in hand; queued jobs stay for whoever reads `jobs` next, e.g. the encoder of a new
/// model), and reports each batch's size and wall time to `on_batch`.
///
/// Supervised: a panic while a batch runs is caught and recorded in `restarts`, and so is a
/// device error ([`EncodeError::Device`]); after one, the engine is rebuilt
/// ([`BatchEncoder::recover`]) before a later batch, tried again after the restarts' backoff
/// while it fails, and batches meanwhile fail at once. Either way those faces are lost
/// (counted with the failed ones; their tracks schedule them again) and the loop keeps
/// reading its queue: items that pass through are never held up or lost.
pub fn run_encoder_until<M: Send, I: EncoderInput<M>, O: EncoderOutput<M, I::Pass>, E>(
    mut encoder: E,
    cfg: &EncoderConfig,
    jobs: Receiver<I>,
    out: Sender<O>,
    stop: &AtomicBool,
    restarts: &crate::fault::Restarts,
    on_batch: &mut dyn FnMut(usize, Duration),
) -> u64
where
    E: BatchEncoder,
{
    let mut batcher = Batcher::new(cfg.max_batch.get(), cfg.max_wait);
    let mut failed = 0u64;
    // After a device error: when the next rebuild may be tried. Meanwhile batches fail at
    // once (their faces counted) and pass-through items keep flowing.
    let mut broken: Option<Instant> = None;
    let mut run = |batch: Vec<EncodeJob<M>>| -> bool {
        let n = batch.len();
        if let Some(retry_at) = broken {
            if Instant::now() < retry_at {
                failed += n as u64;
                return true;
            }
            match encoder.recover() {
                Ok(()) => {
                    tracing::info!("Encoder engine rebuilt after a device error.");
                    broken = None;
                }
                Err(e) => {
                    let wait =
                        restarts.record("encoder", &format!("a failed rebuild of the engine: {e}"));
                    broken = Some(Instant::now() + wait);
                    failed += n as u64;
                    return true;
                }
            }
        }
        let t0 = Instant::now();
        let encoded = crate::fault::catch(|| {
            crate::fault::inject("encoder");
            let faces: Vec<&FaceInput> = batch.iter().map(|j| &j.input).collect();
            encoder.encode_inputs(&faces)
        });
        let encoded = match encoded {
            Ok(r) => r,
            Err(why) => {
                failed += n as u64;
                std::thread::sleep(restarts.record("encoder", &format!("a panic: {why}")));
                return true;
            }
        };
        let dim = encoder.dim();
        match encoded {
            Ok(emb) if emb.len() == n * dim => {
                let dt = t0.elapsed();
                on_batch(n, dt);
                for (job, e) in batch.into_iter().zip(emb.chunks_exact(dim)) {
                    let item = Embedded {
                        meta: job.meta,
                        embedding: e.to_vec(),
                        batch_size: n,
                        batch_time: dt,
                    };
                    if out.send(O::face(item)).is_err() {
                        return false;
                    }
                }
            }
            Ok(emb) => {
                failed += n as u64;
                tracing::error!(
                    batch = n,
                    values = emb.len(),
                    dim,
                    "Encoder returned the wrong number of values; the batch's faces are not scored."
                );
            }
            Err(EncodeError::Device(why)) => {
                failed += n as u64;
                let wait = restarts.record("encoder", &format!("a device error: {why}"));
                broken = Some(Instant::now() + wait);
            }
            Err(e) => {
                failed += n as u64;
                tracing::error!(batch = n, error = %e, "Encoder batch failed; its faces are not scored.");
            }
        }
        true
    };
    loop {
        if stop.load(Ordering::Relaxed) {
            if let Some(batch) = batcher.flush() {
                run(batch);
            }
            break;
        }
        let wait = batcher
            .deadline()
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600))
            .min(Duration::from_millis(100));
        match jobs.recv_timeout(wait).map(EncoderInput::split) {
            Ok(Ok(job)) => {
                if let Some(batch) = batcher.push(job, Instant::now())
                    && !run(batch)
                {
                    break;
                }
            }
            Ok(Err(pass)) => {
                // Everything queued before it goes out first.
                if let Some(batch) = batcher.flush()
                    && !run(batch)
                {
                    break;
                }
                if out.send(O::pass(pass)).is_err() {
                    break;
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if let Some(batch) = batcher.poll(Instant::now())
                    && !run(batch)
                {
                    break;
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                if let Some(batch) = batcher.flush() {
                    run(batch);
                }
                break;
            }
        }
    }
    failed
}
