//! The CUDA [`FaceDevice`]: the native engine ([`CudaEngine`]) and the fused crop kernel
//! (`crop_rgb_fp16`) in one context, on one stream. A frame is uploaded once into a reused
//! device buffer; its faces' maps go in one small copy; one launch crops them straight into
//! the bucket's input range of the engine's arena (fp16 NCHW, CLIP-normalised); the bucket's
//! CUDA graph encodes the batch.
//!
//! What only a GPU confirms (the crop against its CPU twin, speed) is `dfwatch bench gpu` and
//! `dfwatch gpu-check`, run by tools/gpu-check.sh.

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};

use super::crop::{CropParams, kernel_maps};
use super::face::{FaceDevice, Tower};
use super::vit::cuda::CudaEngine;
use super::vit::{Act, EngineError, Plan, VitShape};
use crate::crop::align::Affine;
use crate::model::ModelBundle;
use crate::model::safetensors::SafeTensors;
use crate::types::{Frame, PixelFormat};

fn dev(e: impl std::fmt::Debug) -> EngineError {
    EngineError::Device(format!("{e:?}"))
}

/// Where the uploaded frame's pixels lie in the device buffer.
#[derive(Debug, Clone, Copy)]
pub enum Planes {
    Rgb {
        stride: usize,
    },
    Nv12 {
        luma: usize,
        luma_stride: usize,
        chroma: usize,
        chroma_stride: usize,
        k: YuvArgs,
    },
}

/// The YUV coefficients as the kernel's `YuvParams` (passed by value).
#[repr(transparent)]
#[derive(Debug, Clone, Copy)]
pub struct YuvArgs(pub crate::crop::yuv::YuvCoefficients);

// SAFETY: a #[repr(C)] struct of seven f32, the layout of `struct YuvParams` in kernels/crop.cu.
unsafe impl DeviceRepr for YuvArgs {}

/// A frame on the device, for [`CudaFaceDevice::launch`].
#[derive(Debug, Clone, Copy)]
pub struct Uploaded {
    pub width: usize,
    pub height: usize,
    pub planes: Planes,
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
    /// Bytes of the last upload in `frame`.
    uploaded_len: usize,
    uploads: u64,
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
            uploaded_len: 0,
            uploads: 0,
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

    /// Copies the frame's pixels (RGB8, or both NV12 planes) and the faces' maps to the
    /// device; returns what [`Self::launch`] needs of the frame.
    pub fn upload(&mut self, frame: &Frame, maps: &[Affine]) -> Result<Uploaded, EngineError> {
        // The bytes from the first plane's start to the last plane's end, and the layout.
        let (start, end, up) = match frame.format {
            PixelFormat::Rgb8 => {
                let v = crate::crop::rgb_view(frame)?;
                let p = frame.planes[0];
                let bytes = v.stride * (v.height - 1) + 3 * v.width;
                let up = Uploaded {
                    width: v.width,
                    height: v.height,
                    planes: Planes::Rgb { stride: v.stride },
                };
                (p.offset, p.offset + bytes, up)
            }
            PixelFormat::Nv12 => {
                let v = crate::crop::yuv::nv12_view(frame)?;
                let (l, c) = (frame.planes[0], frame.planes[1]);
                let start = l.offset.min(c.offset);
                let end = (l.offset + v.luma.len()).max(c.offset + v.chroma.len());
                let up = Uploaded {
                    width: v.width,
                    height: v.height,
                    planes: Planes::Nv12 {
                        luma: l.offset - start,
                        luma_stride: v.luma_stride,
                        chroma: c.offset - start,
                        chroma_stride: v.chroma_stride,
                        k: YuvArgs(v.k),
                    },
                };
                (start, end, up)
            }
        };
        let host = &frame.data[start..end];
        let values = kernel_maps(maps);
        Self::buffer(&self.engine, &mut self.frame, host.len())?;
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
        self.uploaded_len = host.len();
        Ok(up)
    }

    /// One launch of the crop kernel of the uploaded frame's format over its first `faces`
    /// maps, into the batch's slots from `first` on.
    pub fn launch(&mut self, up: &Uploaded, faces: usize, first: usize) -> Result<(), EngineError> {
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
        // What the kernel reads of the frame buffer must lie in what was uploaded.
        let need = match up.planes {
            Planes::Rgb { stride } => stride * (up.height.max(1) - 1) + 3 * up.width,
            Planes::Nv12 {
                luma,
                luma_stride,
                chroma,
                chroma_stride,
                ..
            } => (luma + luma_stride * (up.height.max(1) - 1) + up.width).max(
                chroma
                    + chroma_stride * (up.height.div_ceil(2).max(1) - 1)
                    + 2 * up.width.div_ceil(2),
            ),
        };
        if self.uploaded_len < need {
            return Err(EngineError::Layout("no frame uploaded for the crop".into()));
        }
        let (Some(d_frame), Some(d_maps)) = (self.frame.as_ref(), self.maps.as_ref()) else {
            return Err(EngineError::Layout("device buffers missing".into()));
        };
        // The bucket's input range, from slot `first` on (fp16: 2 bytes a value).
        let out =
            self.engine.ops.ptr(plan.buf(Act::Crops))? + 2 * (first * shape.crop_len()) as u64;
        let params = CropParams::new(up.width, up.height, shape.image_size, self.mean, self.std)
            .map_err(|e| EngineError::Layout(e.to_string()))?;
        let int = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| EngineError::Layout(format!("{what} {v}")))
        };
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
        let base = {
            let (p, _sync) = d_frame.device_ptr(&stream);
            p
        };
        match up.planes {
            Planes::Rgb { stride } => {
                let stride = int(stride, "row stride")?;
                let mut b = stream.launch_builder(&self.engine.ops.crop_rgb);
                b.arg(&base).arg(&stride).arg(d_maps).arg(&params).arg(&out);
                // SAFETY: the arguments follow crop_rgb_fp16's signature (frame bytes, row
                // stride, maps, params by value, output as a device address); the frame buffer
                // holds the uploaded rows (checked above), the maps buffer 6 floats for each
                // of `faces`, and `out` the faces' 3 x S x S halves inside the bucket's input
                // (first + faces <= the bucket).
                unsafe { b.launch(cfg) }.map_err(dev)?;
            }
            Planes::Nv12 {
                luma,
                luma_stride,
                chroma,
                chroma_stride,
                k,
            } => {
                let (l, c) = (base + luma as u64, base + chroma as u64);
                let (ls, cs) = (
                    int(luma_stride, "luma stride")?,
                    int(chroma_stride, "chroma stride")?,
                );
                let mut b = stream.launch_builder(&self.engine.ops.crop_nv12);
                b.arg(&l)
                    .arg(&ls)
                    .arg(&c)
                    .arg(&cs)
                    .arg(d_maps)
                    .arg(&params)
                    .arg(&k)
                    .arg(&out);
                // SAFETY: the arguments follow crop_nv12_fp16's signature (luma plane and its
                // stride, chroma plane and its stride, maps, CropParams and YuvParams by value,
                // output); both planes lie in the uploaded bytes (checked above), the maps and
                // the output as for the RGB kernel.
                unsafe { b.launch(cfg) }.map_err(dev)?;
            }
        }
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
        let up = self.upload(frame, maps)?;
        self.launch(&up, maps.len(), first)
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
