//! The GPU backend of the daemon (`model.backend = "cuda"`): the encoder thread drives a
//! [`FaceDevice`] through a [`DeviceEncoder`].
//!
//! Per batch of faces (each a frame and the map of its crop, `FaceInput::Aligned`): every
//! frame is uploaded once, all its faces in the batch are cropped by one launch of the fused
//! crop kernel straight into the engine's input (fp16, CLIP-normalised), then the batch is
//! encoded (the bucket's CUDA graph) and the embeddings go to the decision stage like the CPU
//! path's. The crop's quality is measured on the CPU, from a quarter of the crop
//! (`faces::prepare_for_device`).
//!
//! Two devices implement the trait: the CUDA one (`cuda` feature, [`super::device`]), and
//! [`CpuTwinDevice`], the same steps with the CPU twins (the fused crop of `crop::warp` and
//! the engine's [`CpuEngine`] with fp16 storage), which CI runs end to end in place of a GPU.
//! One named thread (`gpu-N`) owns the device (on CUDA: the context, the weights, the graphs)
//! and the encoder thread hands it one batch at a time; a device error rebuilds the device on
//! that thread (weights uploaded and graphs captured again) through the encoder loop's
//! supervision.

use std::sync::Arc;

pub use super::face::{FaceDevice, Tower};
use super::vit::cpu::{CpuEngine, Precision};
use super::vit::{EngineError, VitShape};
use crate::crop::align::Affine;
use crate::encode::{BatchEncoder, EncodeError, FaceInput};
use crate::model::ModelBundle;
use crate::model::safetensors::SafeTensors;
use crate::types::Frame;

/// What the device thread is asked.
enum Request {
    /// Crop and encode these faces (frame, map), in order.
    Encode(Vec<(Arc<Frame>, Affine)>),
    /// Drop the device and build it again.
    Rebuild,
    /// Counters and memory.
    Stats,
}

enum Reply {
    Encoded(Result<Vec<f32>, EncodeError>),
    Rebuilt(Result<(), EncodeError>),
    Stats(DeviceStats),
}

/// What the device thread has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Frames uploaded (each frame once per run of its faces in a batch).
    pub uploads: u64,
    /// Faces whose frame had been uploaded already in the same batch (a frame's faces are
    /// consecutive in the queue, so this stays 0 unless streams interleave).
    pub reuploads: u64,
    /// Device memory in use, where the device says.
    pub used_bytes: Option<usize>,
}

/// The encoder over a [`FaceDevice`] that one named thread owns (on CUDA: the context, the
/// weights, the graphs; none of it leaves that thread). `make` builds the device on that
/// thread, at once (a start-up error names what is missing) and again after a device error.
/// The encoder loop talks to it through this handle, one batch at a time.
pub struct DeviceEncoder {
    requests: Option<std::sync::mpsc::SyncSender<Request>>,
    replies: std::sync::mpsc::Receiver<Reply>,
    thread: Option<std::thread::JoinHandle<()>>,
    dim: usize,
}

impl DeviceEncoder {
    /// Starts the thread `name` and builds the device on it.
    pub fn spawn<D: FaceDevice + 'static>(
        name: &str,
        make: Box<dyn FnMut() -> Result<D, EngineError> + Send>,
    ) -> Result<Self, EngineError> {
        let (req_tx, req_rx) = std::sync::mpsc::sync_channel::<Request>(1);
        let (rep_tx, rep_rx) = std::sync::mpsc::sync_channel::<Reply>(1);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<usize, EngineError>>(1);
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || device_thread(make, req_rx, rep_tx, ready_tx))
            .map_err(|e| EngineError::Device(format!("cannot start the {name} thread: {e}")))?;
        let dim = match ready_rx.recv() {
            Ok(Ok(dim)) => dim,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(EngineError::Device(format!(
                    "the {name} thread ended while building the device"
                )));
            }
        };
        Ok(DeviceEncoder {
            requests: Some(req_tx),
            replies: rep_rx,
            thread: Some(thread),
            dim,
        })
    }

    fn ask(&self, r: Request) -> Result<Reply, EncodeError> {
        let gone = || EncodeError::Device("the device thread is gone".into());
        self.requests
            .as_ref()
            .ok_or_else(gone)?
            .send(r)
            .map_err(|_| gone())?;
        self.replies.recv().map_err(|_| gone())
    }

    /// The device thread's counters.
    pub fn stats(&self) -> Result<DeviceStats, EncodeError> {
        match self.ask(Request::Stats)? {
            Reply::Stats(s) => Ok(s),
            _ => Err(EncodeError::Device(
                "the device thread answered out of turn".into(),
            )),
        }
    }
}

impl Drop for DeviceEncoder {
    fn drop(&mut self) {
        // Closing the requests ends the thread, which drops the device on itself.
        self.requests = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The device thread: builds the device, then serves requests until the handle is dropped.
fn device_thread<D: FaceDevice>(
    mut make: Box<dyn FnMut() -> Result<D, EngineError> + Send>,
    requests: std::sync::mpsc::Receiver<Request>,
    replies: std::sync::mpsc::SyncSender<Reply>,
    ready: std::sync::mpsc::SyncSender<Result<usize, EngineError>>,
) {
    let first = crate::fault::catch(&mut make).unwrap_or_else(|why| {
        Err(EngineError::Device(format!(
            "building the device panicked: {why}"
        )))
    });
    let mut device = match first {
        Ok(d) => {
            let _ = ready.send(Ok(d.shape().embed_dim));
            Some(d)
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut stats = DeviceStats::default();
    while let Ok(r) = requests.recv() {
        let reply = match r {
            Request::Encode(faces) => {
                let out = match device.as_mut() {
                    Some(d) => crate::fault::catch(|| run_batch(d, &faces, &mut stats))
                        .unwrap_or_else(|why| {
                            Err(EncodeError::Device(format!(
                                "the device thread panicked: {why}"
                            )))
                        }),
                    None => Err(EncodeError::Device("the engine is being rebuilt".into())),
                };
                if matches!(out, Err(EncodeError::Device(_))) {
                    // Whatever the context holds is suspect now: drop it before rebuilding.
                    device = None;
                }
                Reply::Encoded(out)
            }
            Request::Rebuild => {
                device = None;
                let built = crate::fault::catch(&mut make).unwrap_or_else(|why| {
                    Err(EngineError::Device(format!(
                        "building the device panicked: {why}"
                    )))
                });
                Reply::Rebuilt(built.map(|d| device = Some(d)).map_err(to_encode))
            }
            Request::Stats => {
                if let Some(d) = &device {
                    stats.uploads = d.uploads();
                    stats.used_bytes = d.used_bytes();
                }
                Reply::Stats(stats)
            }
        };
        if replies.send(reply).is_err() {
            break;
        }
    }
}

/// One batch on the device: each run of consecutive faces of one frame is one upload and one
/// crop launch into consecutive slots, then one encode.
fn run_batch<D: FaceDevice>(
    device: &mut D,
    faces: &[(Arc<Frame>, Affine)],
    stats: &mut DeviceStats,
) -> Result<Vec<f32>, EncodeError> {
    let n = faces.len();
    device.begin(n).map_err(to_encode)?;
    let mut maps = Vec::with_capacity(n);
    let mut seen: Vec<*const Frame> = Vec::new();
    let mut i = 0;
    while i < n {
        let frame = &faces[i].0;
        maps.clear();
        let mut j = i;
        while j < n && Arc::ptr_eq(&faces[j].0, frame) {
            maps.push(faces[j].1);
            j += 1;
        }
        if seen.contains(&Arc::as_ptr(frame)) {
            stats.reuploads += maps.len() as u64;
        }
        seen.push(Arc::as_ptr(frame));
        device.crop(frame, &maps, i).map_err(to_encode)?;
        i = j;
    }
    device.encode(n).map_err(to_encode)
}

/// A device failure is [`EncodeError::Device`] (the engine is rebuilt); a bad frame or batch
/// is a plain failure of that batch.
fn to_encode(e: EngineError) -> EncodeError {
    match e {
        EngineError::Device(why) => EncodeError::Device(why),
        other => EncodeError::Engine(other.to_string()),
    }
}

impl BatchEncoder for DeviceEncoder {
    fn dim(&self) -> usize {
        self.dim
    }

    fn encode_inputs(&mut self, faces: &[&FaceInput]) -> Result<Vec<f32>, EncodeError> {
        let mut owned = Vec::with_capacity(faces.len());
        for f in faces {
            match f {
                FaceInput::Aligned { frame, inverse } => owned.push((frame.clone(), *inverse)),
                FaceInput::Pixels(_) => {
                    return Err(EncodeError::Input {
                        engine: "the GPU encoder",
                        got: "normalised pixels (it crops on the device)",
                    });
                }
            }
        }
        match self.ask(Request::Encode(owned))? {
            Reply::Encoded(r) => r,
            _ => Err(EncodeError::Device(
                "the device thread answered out of turn".into(),
            )),
        }
    }

    fn recover(&mut self) -> Result<(), EncodeError> {
        match self.ask(Request::Rebuild)? {
            Reply::Rebuilt(r) => r,
            _ => Err(EncodeError::Device(
                "the device thread answered out of turn".into(),
            )),
        }
    }
}

/// The encoder of `model.backend = "cuda"` on device `ordinal`: built, and each bucket up to
/// `max_batch` run once so its CUDA graph is captured, before it is handed over (at start and
/// before a reload swaps models). Needs the `cuda` feature.
pub fn cuda_encoder(
    bundle: &ModelBundle,
    ordinal: usize,
    max_batch: usize,
) -> Result<Box<dyn BatchEncoder>, EngineError> {
    #[cfg(feature = "cuda")]
    {
        let (tower, src) = Tower::load(bundle)?;
        let mut first = Some(src);
        let make = move || -> Result<super::device::CudaFaceDevice, EngineError> {
            let src = match first.take() {
                Some(s) => s,
                None => tower.reread()?,
            };
            let mut d = super::device::CudaFaceDevice::from_source(&src, &tower, ordinal)?;
            d.warm(max_batch)?;
            Ok(d)
        };
        Ok(Box::new(DeviceEncoder::spawn(
            &format!("gpu-{ordinal}"),
            Box::new(make),
        )?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (bundle, ordinal, max_batch);
        Err(EngineError::Device(
            super::GpuError::FeatureDisabled.to_string(),
        ))
    }
}

/// [`cuda_encoder`]'s wiring with [`CpuTwinDevice`] in place of the GPU (tests, CI).
pub fn twin_encoder(bundle: &ModelBundle) -> Result<DeviceEncoder, EngineError> {
    let (tower, src) = Tower::load(bundle)?;
    let mut first = Some(src);
    let make = move || -> Result<CpuTwinDevice, EngineError> {
        let src = match first.take() {
            Some(s) => s,
            None => tower.reread()?,
        };
        CpuTwinDevice::from_source(&src, &tower)
    };
    DeviceEncoder::spawn("gpu-twin", Box::new(make))
}

/// The GPU path's steps on the CPU: the fused crop of `crop::warp` (what `kernels/crop.cu`
/// computes) normalised into the batch, and the native engine's CPU twin with fp16 storage.
/// It stands in for the device in CI (no GPU there), so the daemon's GPU wiring runs end to end.
pub struct CpuTwinDevice {
    engine: CpuEngine,
    mean: [f32; 3],
    std: [f32; 3],
    pixels: Vec<f32>,
    batch: usize,
    uploads: u64,
}

impl CpuTwinDevice {
    pub fn from_source(src: &SafeTensors, tower: &Tower) -> Result<Self, EngineError> {
        Ok(CpuTwinDevice {
            engine: CpuEngine::from_source(src, tower.shape, Precision::F16)?,
            mean: tower.mean,
            std: tower.std,
            pixels: Vec::new(),
            batch: 0,
            uploads: 0,
        })
    }
}

impl FaceDevice for CpuTwinDevice {
    fn shape(&self) -> &VitShape {
        self.engine.shape()
    }

    fn begin(&mut self, n: usize) -> Result<(), EngineError> {
        let len = n
            .checked_mul(self.engine.shape().crop_len())
            .ok_or_else(|| EngineError::Layout(format!("a batch of {n}")))?;
        self.pixels.clear();
        self.pixels.resize(len, 0.0);
        self.batch = n;
        Ok(())
    }

    fn crop(&mut self, frame: &Frame, maps: &[Affine], first: usize) -> Result<(), EngineError> {
        if first + maps.len() > self.batch {
            return Err(EngineError::Layout(format!(
                "faces {first}..{} of a batch of {}",
                first + maps.len(),
                self.batch
            )));
        }
        self.uploads += 1;
        let size = self.engine.shape().image_size;
        let len = self.engine.shape().crop_len();
        for (k, m) in maps.iter().enumerate() {
            let rgb = crate::crop::fused_warp(frame, m, size)?;
            let slot = &mut self.pixels[(first + k) * len..(first + k + 1) * len];
            crate::encode::normalise_rgb(&rgb, size, self.mean, self.std, slot);
        }
        Ok(())
    }

    fn encode(&mut self, n: usize) -> Result<Vec<f32>, EngineError> {
        if n != self.batch {
            return Err(EngineError::Layout(format!(
                "encode {n} of a batch of {}",
                self.batch
            )));
        }
        self.engine.encode(&self.pixels, n)
    }

    fn uploads(&self) -> u64 {
        self.uploads
    }
}

#[cfg(test)]
mod tests;
