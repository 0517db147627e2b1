//! Ingest: live video in, [`Frame`]s out. One GStreamer pipeline per stream, each under its own
//! supervisor.
//!
//! Owns the `[ingest]` and `[[streams]]` config sections ([`IngestConfig`], [`StreamConfig`]).
//!
//! - Sources: `rtsp://`, `rtsps://`, `srt://`, `http(s)://` (HLS and progressive), `file://` and
//!   plain paths, `v4l2:///dev/videoN` ([`source`]).
//! - GStreamer is asked for exactly RGB or NV12; frames above the analysis rate are skipped
//!   before colour conversion; the appsink callback copies the frame once and `try_send`s it
//!   into the queue the caller passed in (never blocking a streaming thread).
//! - Each stream has a supervisor ([`supervisor`]): states starting, online, stalled,
//!   reconnecting, offline, disabled; stall detection; reconnects with exponential backoff and
//!   full jitter; typed errors; counters ([`StreamCounters`]).
//! - Decoders: NVIDIA's nvcodec decoders are preferred when GStreamer registers them
//!   (`ingest.decoder = "auto"`), else software; each stream reports the decoder it runs.
//!
//! No GStreamer type leaves this module. Without the `gstreamer` cargo feature everything here
//! still compiles (config, supervisor, URIs), and [`spawn_stream`] fails with
//! [`IngestError::Unavailable`].

pub mod config;
pub mod rate;
pub mod source;
pub mod status;
pub mod supervisor;

#[cfg(feature = "gstreamer")]
mod gst_info;
#[cfg(feature = "gstreamer")]
mod pipeline;
#[cfg(feature = "gstreamer")]
mod runner;
#[cfg(feature = "gstreamer")]
pub mod sample;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::{
    BackoffConfig, CredentialsConfig, DecoderPreference, EosAction, IngestConfig, MAX_ANALYSIS_FPS,
    MIN_ANALYSIS_FPS, RtspTransport, StreamConfig,
};
pub use source::{Source, SourceKind};
pub use status::{IngestError, StreamCounters, StreamState, StreamStats, StreamStatus};

#[cfg(feature = "gstreamer")]
pub use gst_info::{DecoderInfo, GstInfo, info, init};

use crate::channel::Sender;
use crate::types::{Frame, PixelFormat, StreamId};
use supervisor::SupervisorSettings;

/// A stream's config resolved against the `[ingest]` defaults.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "gstreamer"), allow(dead_code))]
pub(crate) struct StreamSpec {
    pub config: StreamConfig,
    pub source: Source,
    pub fps: f64,
    pub format: PixelFormat,
    pub decoder: DecoderPreference,
    pub rtsp_latency: Duration,
    pub ingest: IngestConfig,
}

impl StreamSpec {
    fn resolve(
        cfg: &StreamConfig,
        ingest: &IngestConfig,
        base_dir: &Path,
    ) -> Result<Self, IngestError> {
        let source = Source::parse(&cfg.uri, base_dir)
            .map_err(|e| IngestError::Pipeline(format!("streams.{}.uri: {e}", cfg.id)))?;
        Ok(StreamSpec {
            config: cfg.clone(),
            source,
            fps: cfg.analysis_fps.unwrap_or(ingest.analysis_fps),
            format: cfg.format.unwrap_or(ingest.format),
            decoder: cfg.decoder.unwrap_or(ingest.decoder),
            rtsp_latency: ingest.rtsp_latency,
            ingest: ingest.clone(),
        })
    }

    #[cfg_attr(not(feature = "gstreamer"), allow(dead_code))]
    fn supervisor_settings(&self) -> SupervisorSettings {
        SupervisorSettings {
            stall_timeout: self.ingest.stall_timeout,
            connect_timeout: self.ingest.connect_timeout,
            backoff: self.ingest.backoff,
            live: self.source.kind.is_live(),
        }
    }
}

/// A running stream: its status, counters, and the means to stop it.
pub struct StreamHandle {
    id: StreamId,
    status: watch::Receiver<StreamStatus>,
    counters: Arc<StreamCounters>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl StreamHandle {
    pub fn id(&self) -> &StreamId {
        &self.id
    }

    /// The latest status.
    pub fn status(&self) -> StreamStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change (for the retained MQTT status, tests, ...).
    /// Clone what you read and drop the guard at once: a `watch::Ref` held across an await
    /// makes the stream's supervisor wait to publish.
    pub fn subscribe(&self) -> watch::Receiver<StreamStatus> {
        self.status.clone()
    }

    pub fn stats(&self) -> StreamStats {
        self.counters.snapshot()
    }

    pub fn counters(&self) -> &Arc<StreamCounters> {
        &self.counters
    }

    /// Stops the stream and waits for its supervisor to finish (the pipeline is torn down in
    /// the background).
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

/// Starts supervising one stream; frames go to `frames`. Must be called inside a tokio
/// runtime. Fails at once only when ingest is unavailable or the config is unusable; every
/// later failure shows in the stream's status.
pub fn spawn_stream(
    cfg: &StreamConfig,
    ingest: &IngestConfig,
    base_dir: &Path,
    frames: Sender<Frame>,
) -> Result<StreamHandle, IngestError> {
    let spec = StreamSpec::resolve(cfg, ingest, base_dir)?;
    let (tx, rx) = watch::channel(StreamStatus::new(StreamState::Starting, SystemTime::now()));
    let counters = Arc::new(StreamCounters::default());
    let cancel = CancellationToken::new();
    let task = spawn_runner(spec, frames, counters.clone(), tx, cancel.clone())?;
    Ok(StreamHandle {
        id: cfg.id.clone(),
        status: rx,
        counters,
        cancel,
        task,
    })
}

#[cfg(feature = "gstreamer")]
fn spawn_runner(
    spec: StreamSpec,
    frames: Sender<Frame>,
    counters: Arc<StreamCounters>,
    status: watch::Sender<StreamStatus>,
    cancel: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, IngestError> {
    init().map_err(IngestError::Pipeline)?;
    Ok(tokio::spawn(runner::run(
        spec, frames, counters, status, cancel,
    )))
}

#[cfg(not(feature = "gstreamer"))]
fn spawn_runner(
    _spec: StreamSpec,
    _frames: Sender<Frame>,
    _counters: Arc<StreamCounters>,
    _status: watch::Sender<StreamStatus>,
    _cancel: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, IngestError> {
    Err(IngestError::Unavailable)
}
