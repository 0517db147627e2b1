//! The offline commands, on the daemon's own chain:
//! - `dfwatch analyze` (one video, through the face stage's [`crate::faces::prepare_face`]
//!   and the [`crate::decide::Decider`]) and `dfwatch score` (aligned crops from image files);
//! - `dfwatch eval` (the paper's protocol over a labelled LIST: `eval`, its page `eval_html`,
//!   the metrics in `metrics`);
//! - `dfwatch calibrate` (`[evidence]` for a false-alarm budget, replaying the LIST's videos
//!   through the daemon's face stage and Decider) and `dfwatch export-false-alarms`
//!   (`false_alarms`: reviewed events as a LIST).

#[cfg(feature = "gstreamer")]
pub mod analyze;
#[cfg(feature = "gstreamer")]
pub mod calibrate;
#[cfg(feature = "gstreamer")]
pub mod eval;
#[cfg(feature = "gstreamer")]
pub mod eval_html;
pub mod eval_report;
pub mod false_alarms;
pub mod metrics;
pub mod score_images;
