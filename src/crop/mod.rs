//! Crop: a face in a frame -> SJEDD's aligned crop, on the CPU (SJEDD.md section 1).
//!
//! Two methods, both from the five landmarks:
//! - [`CropMethod::Reference`]: the reference's steps. Landmarks truncated to integers, the
//!   least-squares similarity onto the 317 px template ([`align`]), OpenCV's fixed-point
//!   bilinear `warpAffine` into 317 x 317 with a black border ([`warp`]), then Pillow's
//!   antialiased bicubic down to the model size ([`resize`]).
//! - [`CropMethod::Fused`]: one bilinear warp straight from the frame to the model size (the
//!   alignment composed with the 317 -> S scaling). Cheaper, and what the GPU kernel does;
//!   it skips the antialiasing of the downscale, so it differs slightly (see its test).
//!
//! The output is packed RGB8, `S x S`; the encoder normalises it.

pub mod align;
pub mod quality;
pub mod resize;
pub mod warp;
pub mod yuv;

use crate::types::{Frame, PixelFormat};

use align::{Affine, WARP_SIZE, sjedd_alignment};
use warp::RgbView;

/// How a crop is made; see the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CropMethod {
    Reference,
    Fused,
}

/// Why a face could not be cropped.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CropError {
    #[error("the crop needs RGB8 frames, got {0:?} (set ingest.format = \"rgb8\")")]
    Format(PixelFormat),
    #[error("landmark {index} is not finite")]
    Landmark { index: usize },
    #[error("the landmarks coincide; no alignment exists")]
    Degenerate,
    #[error("output size {0} is out of range 16..=1024")]
    Size(usize),
    #[error("{width}x{height} frame with a row stride of {stride} in {len} bytes")]
    Frame {
        width: u32,
        height: u32,
        stride: usize,
        len: usize,
    },
}

/// The alignment of a face and its crop.
#[derive(Debug, Clone)]
pub struct Crop {
    /// Packed RGB8, `size x size`.
    pub rgb: Vec<u8>,
    pub size: usize,
    /// Frame pixels -> 317 x 317 warp pixels.
    pub alignment: Affine,
}

/// The pixels of an RGB8 `frame`, checked to hold its rows (its fields are public: a frame
/// built by hand may not).
pub fn rgb_view(frame: &Frame) -> Result<RgbView<'_>, CropError> {
    if frame.format != PixelFormat::Rgb8 {
        return Err(CropError::Format(frame.format));
    }
    let p = frame.planes[0];
    let (w, h) = (frame.width as usize, frame.height as usize);
    let end = p
        .stride
        .checked_mul(h.saturating_sub(1))
        .and_then(|v| v.checked_add(3 * w))
        .and_then(|v| v.checked_add(p.offset));
    match end {
        Some(end) if w > 0 && h > 0 && p.stride >= 3 * w && end <= frame.data.len() => {
            Ok(RgbView {
                data: &frame.data[p.offset..end],
                width: w,
                height: h,
                stride: p.stride,
            })
        }
        _ => Err(CropError::Frame {
            width: frame.width,
            height: frame.height,
            stride: p.stride,
            len: frame.data.len(),
        }),
    }
}

/// Crops the face with `landmarks` (frame pixels) from an RGB8 `frame` into `size x size`.
pub fn crop_face(
    frame: &Frame,
    landmarks: &[[f32; 2]; 5],
    size: usize,
    method: CropMethod,
) -> Result<Crop, CropError> {
    crop_rgb(rgb_view(frame)?, landmarks, size, method)
}

/// [`crop_face`] on a raw RGB8 image.
pub fn crop_rgb(
    src: RgbView<'_>,
    landmarks: &[[f32; 2]; 5],
    size: usize,
    method: CropMethod,
) -> Result<Crop, CropError> {
    let alignment = checked_alignment(landmarks, size)?;
    let rgb = match method {
        CropMethod::Reference => {
            let warped = warp::warp_affine_opencv(src, &alignment, WARP_SIZE, WARP_SIZE);
            if size == WARP_SIZE {
                warped
            } else {
                resize::resize_rgb_bicubic(&warped, WARP_SIZE, WARP_SIZE, size, size)
            }
        }
        CropMethod::Fused => {
            let inverse = fused_inverse(&alignment, size).ok_or(CropError::Degenerate)?;
            warp::warp_affine_bilinear(src, &inverse, size, size)
        }
    };
    Ok(Crop {
        rgb,
        size,
        alignment,
    })
}

/// The fused warp of an RGB8 or NV12 `frame` into `size x size` packed RGB8 through
/// `inverse` (crop pixel -> frame pixel): what the GPU crop kernels compute before
/// normalising (NV12: each neighbour converted, then interpolated).
pub fn fused_warp(frame: &Frame, inverse: &Affine, size: usize) -> Result<Vec<u8>, CropError> {
    match frame.format {
        PixelFormat::Nv12 => Ok(yuv::warp_affine_bilinear_nv12(
            &yuv::nv12_view(frame)?,
            inverse,
            size,
            size,
        )),
        PixelFormat::Rgb8 => Ok(warp::warp_affine_bilinear(
            rgb_view(frame)?,
            inverse,
            size,
            size,
        )),
    }
}

/// The alignment of a face for a crop of side `size`: the size in range, every landmark
/// finite, the landmarks not degenerate.
pub fn checked_alignment(landmarks: &[[f32; 2]; 5], size: usize) -> Result<Affine, CropError> {
    if !(16..=1024).contains(&size) {
        return Err(CropError::Size(size));
    }
    if let Some(index) = landmarks
        .iter()
        .position(|l| !(l[0].is_finite() && l[1].is_finite()))
    {
        return Err(CropError::Landmark { index });
    }
    sjedd_alignment(landmarks).ok_or(CropError::Degenerate)
}

/// Encodes a packed RGB8 crop as JPEG (for the opt-in face-crop topic).
pub fn encode_jpeg(rgb: &[u8], size: usize, quality: u8) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100))
        .encode(
            rgb,
            size as u32,
            size as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// Output pixel of the fused crop -> frame pixel: the output pixel centre in the 317 warp
/// (`(u + 0.5) * 317 / S - 0.5`), then back through the alignment.
pub fn fused_inverse(alignment: &Affine, size: usize) -> Option<Affine> {
    let r = WARP_SIZE as f64 / size as f64;
    let to_warp = Affine([[r, 0.0, 0.5 * r - 0.5], [0.0, r, 0.5 * r - 0.5]]);
    Some(alignment.inverse()?.after(&to_warp))
}
