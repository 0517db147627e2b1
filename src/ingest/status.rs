//! What a stream reports: its state, typed errors and counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::source::LoginError;

/// Life cycle of one stream, as shown in `/api/streams` and the retained MQTT stream status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamState {
    /// First connection attempt, nothing received yet.
    Starting,
    /// Frames are arriving.
    Online,
    /// Was online, but no frame came for `ingest.stall_timeout`; about to reconnect.
    Stalled,
    /// Lost or failed; waiting out the backoff or trying again.
    Reconnecting,
    /// Stopped for good: a file ended (`on_eos = "stop"`), a file cannot be decoded, or the
    /// daemon is shutting down. `last_error` says which.
    Offline,
    /// `enabled = false` in the config.
    Disabled,
    /// Refused by policy (a source the stream may not open): a configuration error, not a
    /// network fault, so it is not retried; `last_error` says what was refused. A reload or
    /// an API change tries it again.
    Failed,
}

impl StreamState {
    /// Every state, in the order of the life cycle (Home Assistant's enum sensor lists them).
    pub const ALL: [StreamState; 7] = [
        StreamState::Starting,
        StreamState::Online,
        StreamState::Stalled,
        StreamState::Reconnecting,
        StreamState::Offline,
        StreamState::Disabled,
        StreamState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StreamState::Starting => "starting",
            StreamState::Online => "online",
            StreamState::Stalled => "stalled",
            StreamState::Reconnecting => "reconnecting",
            StreamState::Offline => "offline",
            StreamState::Disabled => "disabled",
            StreamState::Failed => "failed",
        }
    }
}

/// Why a stream failed. Messages are already redacted (no credentials).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    #[error("connection refused: {0}")]
    Refused(String),
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("unsupported codec or container: {0}")]
    UnsupportedCodec(String),
    #[error("decode error: {0}")]
    Decode(String),
    #[error("network error: {0}")]
    Network(String),
    #[error("no frame within {} of connecting", humantime::format_duration(*.0))]
    ConnectTimeout(Duration),
    #[error("no frame for {}", humantime::format_duration(*.0))]
    Stalled(Duration),
    #[error("the source ended the stream")]
    EndOfStream,
    #[error("credentials: {0}")]
    Credentials(#[from] LoginError),
    #[error("pipeline: {0}")]
    Pipeline(String),
    /// A source inside the stream (an HLS segment, say) used a scheme the stream may not
    /// open (`ingest.child_schemes`, or `http.api_schemes` for API streams).
    #[error("source not allowed: {0}")]
    SourceNotAllowed(String),
    #[error(
        "ingest is unavailable: dfwatch was built without the `gstreamer` feature \
         (rebuild with default features)"
    )]
    Unavailable,
}

impl IngestError {
    /// Short label for metrics and the `last_error.kind` field.
    pub fn kind(&self) -> &'static str {
        match self {
            IngestError::Refused(_) => "refused",
            IngestError::AuthFailed(_) => "auth_failed",
            IngestError::NotFound(_) => "not_found",
            IngestError::UnsupportedCodec(_) => "unsupported_codec",
            IngestError::Decode(_) => "decode_error",
            IngestError::Network(_) => "network",
            IngestError::ConnectTimeout(_) => "connect_timeout",
            IngestError::Stalled(_) => "stalled",
            IngestError::EndOfStream => "end_of_stream",
            IngestError::Credentials(_) => "credentials",
            IngestError::Pipeline(_) => "pipeline",
            IngestError::SourceNotAllowed(_) => "source_not_allowed",
            IngestError::Unavailable => "unavailable",
        }
    }

    /// A refusal by policy: the config must change before trying again can help.
    pub fn is_policy(&self) -> bool {
        matches!(self, IngestError::SourceNotAllowed(_))
    }

    /// Whether trying again can help. Live sources retry everything that can change on the
    /// other side (a camera reboots, a password is rotated); a file whose content cannot be
    /// decoded will not decode next time either.
    pub fn is_retryable(&self, live: bool) -> bool {
        match self {
            IngestError::Unavailable | IngestError::SourceNotAllowed(_) => false,
            IngestError::UnsupportedCodec(_)
            | IngestError::Decode(_)
            | IngestError::NotFound(_) => live,
            _ => true,
        }
    }
}

/// The error part of a [`StreamStatus`], in a form that serialises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LastError {
    pub kind: &'static str,
    pub message: String,
    #[serde(serialize_with = "ser_time")]
    pub at: SystemTime,
}

/// A stream's published status (retained on MQTT, listed by the HTTP API).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamStatus {
    pub state: StreamState,
    /// When `state` was entered.
    #[serde(serialize_with = "ser_time")]
    pub since: SystemTime,
    /// Successful re-establishments after a loss (a file looping is not one).
    pub reconnects: u64,
    /// Connection attempts, the first one included.
    pub attempts: u64,
    pub last_error: Option<LastError>,
    /// Video decoder element in use (e.g. `avdec_h264`, `nvh264dec`), once known.
    pub decoder: Option<String>,
    /// `true` after a file stream reached its end with `on_eos = "stop"`.
    pub finished: bool,
}

impl StreamStatus {
    pub fn new(state: StreamState, now: SystemTime) -> Self {
        StreamStatus {
            state,
            since: now,
            reconnects: 0,
            attempts: 0,
            last_error: None,
            decoder: None,
            finished: false,
        }
    }
}

fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string())
}

/// Frame counters of one stream, updated from GStreamer's streaming thread without locks.
#[derive(Debug)]
pub struct StreamCounters {
    epoch: Instant,
    /// Frames out of the decoder.
    pub frames_decoded: AtomicU64,
    /// Frames skipped to keep to the analysis rate (before colour conversion).
    pub frames_sampled_out: AtomicU64,
    /// Frames handed to the queue.
    pub frames_delivered: AtomicU64,
    /// Frames evicted from the full queue (its policy decides which).
    pub frames_dropped_queue_full: AtomicU64,
    /// Frames whose buffer did not match their caps.
    pub frames_dropped_invalid: AtomicU64,
    /// Nanoseconds after `epoch` of the last delivered frame, 0 before the first.
    last_frame_ns: AtomicU64,
}

impl Default for StreamCounters {
    fn default() -> Self {
        StreamCounters {
            epoch: Instant::now(),
            frames_decoded: AtomicU64::new(0),
            frames_sampled_out: AtomicU64::new(0),
            frames_delivered: AtomicU64::new(0),
            frames_dropped_queue_full: AtomicU64::new(0),
            frames_dropped_invalid: AtomicU64::new(0),
            last_frame_ns: AtomicU64::new(0),
        }
    }
}

impl StreamCounters {
    pub fn mark_frame(&self, at: Instant) {
        let ns = at.saturating_duration_since(self.epoch).as_nanos() as u64;
        self.last_frame_ns.store(ns.max(1), Ordering::Relaxed);
    }

    pub fn last_frame(&self) -> Option<Instant> {
        match self.last_frame_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(self.epoch + Duration::from_nanos(ns)),
        }
    }

    pub fn snapshot(&self) -> StreamStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StreamStats {
            frames_decoded: l(&self.frames_decoded),
            frames_sampled_out: l(&self.frames_sampled_out),
            frames_delivered: l(&self.frames_delivered),
            frames_dropped_queue_full: l(&self.frames_dropped_queue_full),
            frames_dropped_invalid: l(&self.frames_dropped_invalid),
            last_frame_age: self.last_frame().map(|t| t.elapsed()),
        }
    }
}

/// A copy of [`StreamCounters`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct StreamStats {
    /// How long ago the last frame was delivered (`None` before the first).
    pub last_frame_age: Option<Duration>,
    pub frames_decoded: u64,
    pub frames_sampled_out: u64,
    pub frames_delivered: u64,
    pub frames_dropped_queue_full: u64,
    pub frames_dropped_invalid: u64,
}

impl StreamStats {
    /// Dropped frames by reason label, for metrics.
    pub fn drops(&self) -> [(&'static str, u64); 2] {
        [
            ("queue_full", self.frames_dropped_queue_full),
            ("invalid_frame", self.frames_dropped_invalid),
        ]
    }
}
