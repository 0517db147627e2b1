//! The offline commands, on the daemon's own chain: `dfwatch analyze` (one video, through
//! the face stage's [`crate::faces::prepare_face`] and the [`crate::decide::Decider`]) and
//! `dfwatch score` (aligned crops from image files).

#[cfg(feature = "gstreamer")]
pub mod analyze;
pub mod score_images;
