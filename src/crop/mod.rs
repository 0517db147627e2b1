//! Crop: faces in frames -> aligned, normalised model inputs (SJEDD.md section 1).
//!
//! So far this module holds the resampler the reference pipeline uses after its warp
//! (Pillow's antialiased bicubic, reproduced exactly); the alignment, warp and batch
//! assembly come with the faces stage.

pub mod resize;
