//! dfwatch: watches live video for DeepFake faces and raises explained alerts.
//!
//! Data flows one way through bounded channels (see DESIGN.md):
//! ingest -> detect + track -> crop -> encode -> score -> evidence -> publish.
//! Stages share only [`types`] and [`channel`]; [`app`] is the only module that knows the
//! whole graph.

pub mod app;
pub mod backoff;
pub mod channel;
pub mod config;
pub mod crop;
pub mod decide;
pub mod detect;
pub mod encode;
pub mod events;
pub mod evidence;
pub mod faces;
pub mod fault;
pub mod files;
pub mod gpu;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod offline;
pub mod onnx;
pub mod preflight;
pub mod progress;
pub mod publish;
pub mod score;
pub mod telemetry;
pub mod track;
pub mod types;
pub mod validation;
