//! `[ingest]` and `[[streams]]`: what to watch and how.

use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use super::source::CredentialsConfig;
use super::source::Source;
pub use crate::backoff::BackoffConfig;
use crate::channel::{FullPolicy, QueueConfig};
use crate::types::{PixelFormat, StreamId};
use crate::validation::{Checker, ConfigError};

/// Highest analysis rate accepted: more than this is video decoding, not face analysis.
pub const MAX_ANALYSIS_FPS: f64 = 60.0;
/// Lowest analysis rate accepted (one frame every 10 s).
pub const MIN_ANALYSIS_FPS: f64 = 0.1;
/// Frames a stream's queue may hold (a 1080p RGB frame is 6 MB).
pub const MAX_FRAME_QUEUE: u64 = 64;

/// `[ingest]`: defaults for every stream, and the supervisor's timing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Frames per second handed downstream from each stream (frames in between are skipped
    /// before colour conversion, so they cost only their decode). A stream may override it.
    pub analysis_fps: f64,
    /// Pixel layout asked of GStreamer: `rgb8`, or `nv12` with `model.backend = "cuda"` (the
    /// device crops it; detection converts the frames it runs on).
    pub format: PixelFormat,
    /// Which decoders to use: `auto` prefers NVIDIA's nvcodec decoders when GStreamer has
    /// them and falls back to software; `software` never uses hardware decoders; `nvidia`
    /// fails a stream whose codec nvcodec cannot decode.
    pub decoder: DecoderPreference,
    /// Queue between each stream's appsink and the detector. Its policy must be `drop_oldest`
    /// or `drop_newest`: a GStreamer thread never waits.
    pub queue: QueueConfig,
    /// An online stream that delivers no frame for this long is declared stalled and
    /// reconnected.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// An attempt that has not delivered its first frame after this long has failed.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Retry timing after a stream fails.
    pub backoff: BackoffConfig,
    /// RTSP: jitter-buffer latency.
    #[serde(with = "humantime_serde")]
    pub rtsp_latency: Duration,
    /// Decoded frames larger than this many pixels are scaled down in GStreamer (aspect
    /// kept) before conversion and analysis: an 8K stream costs a 4K frame's memory. Default
    /// 3840 x 2160. Range 4096 (64 x 64) to 67108864 (8192 x 8192).
    pub max_pixels: u64,
    /// URI schemes the sources inside a stream may use (an HLS playlist's segments, say):
    /// a network stream must not make GStreamer open local files or devices. RTSP's own RTP
    /// receivers (`udp`) are always allowed. Streams added through the API are held to
    /// `http.api_schemes` instead.
    pub child_schemes: Vec<String>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            analysis_fps: 5.0,
            format: PixelFormat::Rgb8,
            decoder: DecoderPreference::Auto,
            queue: QueueConfig {
                capacity: NonZeroUsize::new(4).expect("non-zero literal"),
                policy: FullPolicy::DropOldest,
            },
            stall_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(20),
            backoff: BackoffConfig::default(),
            rtsp_latency: Duration::from_millis(200),
            max_pixels: 3840 * 2160,
            child_schemes: ["rtsp", "rtsps", "srt", "http", "https"]
                .map(String::from)
                .to_vec(),
        }
    }
}

impl IngestConfig {
    pub(crate) fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        let mut c = Checker::new(path, errors);
        check_fps(&mut c, "analysis_fps", self.analysis_fps);
        c.count(
            "queue.capacity",
            self.queue.capacity.get() as u64,
            1..=MAX_FRAME_QUEUE,
        );
        if self.queue.policy == FullPolicy::Block {
            c.error(
                "queue.policy",
                "\"block\" is not allowed here: the appsink runs on a GStreamer streaming \
                 thread, which must never wait; use \"drop_oldest\" (newest frame wins) or \
                 \"drop_newest\"",
            );
        }
        let timeouts = Duration::from_millis(100)..=Duration::from_secs(3600);
        c.duration("stall_timeout", self.stall_timeout, timeouts.clone());
        c.duration("connect_timeout", self.connect_timeout, timeouts);
        c.duration(
            "rtsp_latency",
            self.rtsp_latency,
            Duration::ZERO..=Duration::from_secs(10),
        );
        c.count("max_pixels", self.max_pixels, MAX_PIXELS_RANGE);
        for (i, s) in self.child_schemes.iter().enumerate() {
            if !super::source::SUPPORTED_SCHEMES.contains(&s.as_str()) {
                c.error(
                    &format!("child_schemes[{i}]"),
                    format!(
                        "unknown scheme {s:?}; known: {}",
                        super::source::SUPPORTED_SCHEMES.join(", ")
                    ),
                );
            }
        }
        self.backoff.validate(&mut c.table("backoff"));
    }
}

/// `ingest.max_pixels`.
pub const MAX_PIXELS_RANGE: std::ops::RangeInclusive<u64> = 4096..=8192 * 8192;

/// The analysis rate of `[ingest]` or of one stream.
fn check_fps(c: &mut Checker<'_>, key: &str, fps: f64) {
    c.number(key, fps, MIN_ANALYSIS_FPS..=MAX_ANALYSIS_FPS);
}

/// Decoder choice; see [`IngestConfig::decoder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecoderPreference {
    Auto,
    Software,
    Nvidia,
}

/// What a file stream does at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EosAction {
    /// Seek back to the start and keep going.
    Loop,
    /// Stop; the stream goes offline with state "finished".
    #[default]
    Stop,
}

/// RTSP lower transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RtspTransport {
    /// UDP first, then TCP (rtspsrc's own order).
    #[default]
    Auto,
    Tcp,
    Udp,
}

/// `[[streams]]`: one video source.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// `[A-Za-z0-9_-]{1,64}`, unique: an MQTT topic level and a metric label.
    pub id: StreamId,
    /// `rtsp://`, `rtsps://`, `srt://`, `http(s)://` (HLS or progressive), `file:///abs/path`,
    /// `v4l2:///dev/videoN`, or a plain file path (relative to the config file). Never with
    /// a user name or password in it: see `credentials`.
    pub uri: String,
    /// A disabled stream is listed with state "disabled" and not opened.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Overrides `ingest.analysis_fps`.
    pub analysis_fps: Option<f64>,
    /// Overrides `ingest.format`.
    pub format: Option<PixelFormat>,
    /// Overrides `ingest.decoder`.
    pub decoder: Option<DecoderPreference>,
    /// Files only: what to do at the end.
    #[serde(default)]
    pub on_eos: EosAction,
    /// Files only: `true` plays at the file's own frame rate, as a camera would; `false`
    /// decodes as fast as possible.
    #[serde(default = "default_true")]
    pub realtime: bool,
    /// RTSP only.
    #[serde(default)]
    pub rtsp_transport: RtspTransport,
    /// Login for the source, from the environment or a file.
    pub credentials: Option<CredentialsConfig>,
    /// Publish a JPEG of the face with each alert (on `.../alerts/<id>/face`, never
    /// retained, never spooled). Off by default: face crops are biometric data.
    #[serde(default)]
    pub publish_face_crops: bool,
    /// Keep evidence media in the event store with this stream's alerts: the frame the
    /// track's strongest face was scored on (face box drawn) and the aligned face crop
    /// (`GET /api/events/<id>/snapshot.jpg`, `.../face.jpg`; retention in `[events]`).
    /// Off by default: frames and face crops are biometric data.
    #[serde(default)]
    pub store_media: bool,
}

fn default_true() -> bool {
    true
}

impl StreamConfig {
    /// A stream with every option at its default.
    pub fn new(id: StreamId, uri: impl Into<String>) -> Self {
        StreamConfig {
            id,
            uri: uri.into(),
            enabled: true,
            analysis_fps: None,
            format: None,
            decoder: None,
            on_eos: EosAction::default(),
            realtime: true,
            rtsp_transport: RtspTransport::default(),
            credentials: None,
            publish_face_crops: false,
            store_media: false,
        }
    }

    pub(crate) fn validate(&self, path: &str, base_dir: &Path, errors: &mut Vec<ConfigError>) {
        if let Err(e) = Source::parse(&self.uri, base_dir) {
            errors.push(ConfigError::new(format!("{path}.uri"), e.to_string()));
        }
        if let Some(fps) = self.analysis_fps {
            check_fps(&mut Checker::new(path, errors), "analysis_fps", fps);
        }
        if let Some(c) = &self.credentials {
            c.validate(&format!("{path}.credentials"), errors);
        }
    }
}
