//! The CUDA [`FaceDevice`]: the native engine ([`CudaEngine`]) and the fused crop kernel
//! (`crop_rgb_fp16`) in one context, on one stream. A frame is uploaded once into a reused
//! device buffer; its faces' maps go in one small copy; one launch crops them straight into
//! the bucket's input range of the engine's arena (fp16 NCHW, CLIP-normalised); the bucket's
//! CUDA graph encodes the batch.
//!
//! What only a GPU confirms (the crop against its CPU twin, speed) is `dfwatch bench gpu` and
//! `dfwatch gpu-check`, run by tools/gpu-check.sh.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::backend::{FaceDevice, Tower, rgb_view};
use super::crop::{CropParams, kernel_maps};
use super::vit::cuda::CudaEngine;
use super::vit::{Act, EngineError, Plan, VitShape};
use crate::crop::align::Affine;
use crate::model::ModelBundle;
use crate::model::safetensors::SafeTensors;
use crate::types::Frame;

fn dev(e: impl std::fmt::Debug) -> EngineError {
    EngineError::Device(format!("{e:?}"))
}

/// The engine and the crop on one GPU.
pub struct CudaFaceDevice {
    pub engine: CudaEngine,
    mean: [f32; 3],
    std: [f32; 3],
    /// The last frame's bytes (grown to the largest frame seen; 8K RGB is 100 MB at most,
    /// bounded by the ingest's frame size cap).
    frame: Option<CudaSlice<u8>>,
    maps: Option<CudaSlice<f32>>,
    plan: Option<Plan>,
    uploads: u64,
    /// Bytes uploaded (frames and maps), for the bench's upload share.
    pub uploaded_bytes: u64,
}

impl CudaFaceDevice {
    /// Loads the bundle's image tower onto device `ordinal` (weights uploaded; graphs are
    /// captured at each bucket's first batch, or by [`Self::warm`]).
    pub fn new(bundle: &ModelBundle, ordinal: usize) -> Result<Self, EngineError> {
        let (tower, src) = Tower::load(bundle)?;
        Self::from_source(&src, &tower, ordinal)
    }

    /// [`Self::new`] from a tower read already.
    pub fn from_source(
        src: &SafeTensors,
        tower: &Tower,
        ordinal: usize,
    ) -> Result<Self, EngineError> {
        Ok(CudaFaceDevice {
            engine: CudaEngine::from_source(src, tower.shape, ordinal)?,
            mean: tower.mean,
            std: tower.std,
            frame: None,
            maps: None,
            plan: None,
            uploads: 0,
            uploaded_bytes: 0,
        })
    }

    /// Runs each bucket up to the one `max_batch` falls in once (on whatever its input holds),
    /// so every CUDA graph the daemon will use is captured now, not at a live batch.
    pub fn warm(&mut self, max_batch: usize) -> Result<(), EngineError> {
        for &b in super::vit::BUCKETS {
            let plan = self.engine.bucket(b)?.clone();
            self.engine.run(&plan, true)?;
            if b >= max_batch {
                break;
            }
        }
        self.engine.ops.stream.synchronize().map_err(dev)
    }

    /// Copies the frame's pixels and the faces' maps to the device; returns the frame's width,
    /// height and row stride for [`Self::launch`].
    pub fn upload(
        &mut self,
        frame: &Frame,
        maps: &[Affine],
    ) -> Result<(usize, usize, usize), EngineError> {
        let view = rgb_view(frame)?;
        let bytes = view.stride * (view.height - 1) + 3 * view.width;
        let host = &view.data[..bytes];
        let values = kernel_maps(maps);
        Self::buffer(&self.engine, &mut self.frame, bytes)?;
        Self::buffer(&self.engine, &mut self.maps, values.len().max(1))?;
        let (Some(d_frame), Some(d_maps)) = (self.frame.as_mut(), self.maps.as_mut()) else {
            return Err(EngineError::Layout("device buffers missing".into()));
        };
        let stream = self.engine.ops.stream.clone();
        stream.memcpy_htod(host, d_frame).map_err(dev)?;
        if !values.is_empty() {
            stream.memcpy_htod(&values, d_maps).map_err(dev)?;
        }
        self.uploads += 1;
        self.uploaded_bytes += (bytes + 4 * values.len()) as u64;
        Ok((view.width, view.height, view.stride))
    }

    /// One launch of the crop kernel over the uploaded frame (`width x height`, rows of
    /// `stride` bytes) and its first `faces` maps, into the batch's slots from `first` on.
    pub fn launch(
        &mut self,
        width: usize,
        height: usize,
        stride: usize,
        faces: usize,
        first: usize,
    ) -> Result<(), EngineError> {
        let plan = self
            .plan
            .as_ref()
            .ok_or_else(|| EngineError::Layout("crop before begin".into()))?;
        let shape = *self.engine.shape();
        let maps_held = self.maps.as_ref().map_or(0, |m| m.len() / 6);
        if first + faces > plan.batch || faces == 0 || faces > maps_held {
            return Err(EngineError::Layout(format!(
                "faces {first}..{} of a bucket of {} ({maps_held} maps uploaded)",
                first + faces,
                plan.batch
            )));
        }
        let frame_len = self.frame.as_ref().map_or(0, |f| f.len());
        if frame_len < stride * (height.max(1) - 1) + 3 * width {
            return Err(EngineError::Layout("no frame uploaded for the crop".into()));
        }
        let (Some(d_frame), Some(d_maps)) = (self.frame.as_ref(), self.maps.as_ref()) else {
            return Err(EngineError::Layout("device buffers missing".into()));
        };
        // The bucket's input range, from slot `first` on (fp16: 2 bytes a value).
        let out =
            self.engine.ops.ptr(plan.buf(Act::Crops))? + 2 * (first * shape.crop_len()) as u64;
        let params = CropParams::new(width, height, shape.image_size, self.mean, self.std)
            .map_err(|e| EngineError::Layout(e.to_string()))?;
        let stride = i32::try_from(stride)
            .map_err(|_| EngineError::Layout(format!("row stride {stride}")))?;
        let plane = shape.image_size * shape.image_size;
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(plane.div_ceil(256))
                    .map_err(|_| EngineError::Layout("crop grid".into()))?,
                faces as u32,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = self.engine.ops.stream.clone();
        let mut b = stream.launch_builder(&self.engine.ops.crop_rgb);
        b.arg(d_frame)
            .arg(&stride)
            .arg(d_maps)
            .arg(&params)
            .arg(&out);
        // SAFETY: the arguments follow crop_rgb_fp16's signature (frame bytes, row stride, maps,
        // params by value, output as a device address); the frame buffer holds the uploaded
        // frame's rows (checked above), the maps buffer 6 floats for each of `faces`, and `out`
        // the faces' 3 x S x S halves inside the bucket's input (first + faces <= the bucket).
        unsafe { b.launch(cfg) }.map_err(dev)?;
        Ok(())
    }

    /// A device buffer of at least `len` values, reusing `slot`'s.
    fn buffer<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        engine: &CudaEngine,
        slot: &mut Option<CudaSlice<T>>,
        len: usize,
    ) -> Result<(), EngineError> {
        if slot.as_ref().is_none_or(|b| b.len() < len) {
            *slot = None;
            *slot = Some(engine.ops.stream.alloc_zeros::<T>(len).map_err(dev)?);
        }
        Ok(())
    }
}

impl FaceDevice for CudaFaceDevice {
    fn shape(&self) -> &VitShape {
        self.engine.shape()
    }

    fn begin(&mut self, n: usize) -> Result<(), EngineError> {
        self.plan = Some(self.engine.bucket(n)?.clone());
        Ok(())
    }

    fn crop(&mut self, frame: &Frame, maps: &[Affine], first: usize) -> Result<(), EngineError> {
        let (width, height, stride) = self.upload(frame, maps)?;
        self.launch(width, height, stride, maps.len(), first)
    }

    fn encode(&mut self, n: usize) -> Result<Vec<f32>, EngineError> {
        let plan = self
            .plan
            .take()
            .ok_or_else(|| EngineError::Layout("encode before begin".into()))?;
        if n == 0 || n > plan.batch {
            return Err(EngineError::Layout(format!(
                "{n} faces in a bucket of {}",
                plan.batch
            )));
        }
        self.engine.run(&plan, true)?;
        let dim = self.engine.shape().embed_dim;
        self.engine.ops.download(plan.buf(Act::Embedding), n * dim)
    }

    fn uploads(&self) -> u64 {
        self.uploads
    }

    fn used_bytes(&self) -> Option<usize> {
        self.engine.device_used_bytes().ok()
    }
}
