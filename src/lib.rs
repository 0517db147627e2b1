//! dfwatch: watches live video for DeepFake faces and raises explained alerts.
//!
//! Data flows one way through bounded channels (docs/src/architecture.md):
//! ingest -> detect + track -> crop -> encode -> score -> evidence -> publish.
//! Stages meet through [`types`] and [`channel`]; two compose the leaf modules they are made
//! of by design (the face stage: detect, track, crop; the decision stage: evidence, score, and
//! it hands its outputs to the publisher and the event store). [`app`] is the only module that
//! knows the whole graph. No two files import each other around a circle
//! (`tools/import_cycles.py`, run by CI).

pub mod app;
pub mod backoff;
pub mod channel;
pub mod config;
pub mod crop;
pub(crate) mod decide;
pub mod detect;
pub mod encode;
pub mod events;
pub mod evidence;
pub(crate) mod faces;
pub mod fault;
pub(crate) mod files;
pub mod gpu;
pub mod http;
pub mod ingest;
pub(crate) mod metrics;
pub mod model;
pub mod offline;
pub mod onnx;
pub mod preflight;
pub mod progress;
pub mod publish;
pub mod runtime;
pub mod score;
pub mod telemetry;
pub mod track;
pub mod types;
pub mod validation;
