//! Shared types that flow between stages.
//!
//! Stages exchange the types in this file over the channels of [`crate::channel`]; a stage
//! imports another only where it is made of it by design (the face stage of detect, track
//! and crop; the decision stage of evidence and score). No GStreamer, ONNX Runtime or CUDA
//! type appears here.
//!
//! Stability: later stages add their own types beside these; the fields below are a contract and
//! change only with a note to every stage that reads them.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The directory for state (spool, API token, TensorRT engines): systemd's
/// `$STATE_DIRECTORY`, else `var/state` under the working directory.
pub fn state_dir() -> std::path::PathBuf {
    std::env::var_os("STATE_DIRECTORY")
        .and_then(|v| {
            v.to_string_lossy()
                .split(':')
                .next()
                .map(std::path::PathBuf::from)
        })
        .unwrap_or_else(|| std::path::PathBuf::from("var/state"))
}

/// What an alert event is: its first (`new`), a later `update`, or its `end`. The one kind
/// enum: the decision stage's events carry it (`evidence::AlertKind::change`), the spool orders
/// its drops by it, webhooks filter on it, the event store records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertChange {
    /// The first event of an alert.
    New,
    /// A later `update`: may be coalesced or dropped first.
    Update,
    /// The alert's `end`.
    End,
}

impl AlertChange {
    /// `new`, `update` or `end`: the alert's `type`, the webhook's `events`, the spool's and
    /// the event store's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertChange::New => "new",
            AlertChange::Update => "update",
            AlertChange::End => "end",
        }
    }
}

/// Longest id accepted for nodes and streams.
pub const MAX_ID_LEN: usize = 64;

/// Why a string was refused as an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("is {len} characters long; at most {MAX_ID_LEN} are allowed")]
    TooLong { len: usize },
    #[error("contains {ch:?}; only ASCII letters, digits, '_' and '-' are allowed")]
    BadChar { ch: char },
}

/// Checks the id rule shared by nodes and streams: `[A-Za-z0-9_-]{1,64}`.
///
/// Ids become MQTT topic levels and Prometheus label values, so anything that could be a topic
/// wildcard (`+`, `#`), a level separator (`/`) or need escaping is refused.
pub fn check_id(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if let Some(ch) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(IdError::BadChar { ch });
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { len: s.len() });
    }
    Ok(())
}

macro_rules! validated_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates `s` against `[A-Za-z0-9_-]{1,64}`.
            pub fn new(s: &str) -> Result<Self, IdError> {
                check_id(s)?;
                Ok(Self(Arc::from(s)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(&s).map_err(|e| serde::de::Error::custom(format!("id {s:?} {e}")))
            }
        }
    };
}

validated_id!(
    /// Id of one dfwatch instance: the `<node>` level of every MQTT topic.
    NodeId
);
validated_id!(
    /// Id of one configured video stream: an MQTT topic level and a metric label.
    StreamId
);

/// Id of a face track, unique within its stream for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TrackId(pub u64);

impl fmt::Display for TrackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Pixel layout of a [`Frame`]. Ingest asks GStreamer for exactly one of these; nothing else
/// (I420, BGR, RGBx) ever travels downstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelFormat {
    /// Packed 8-bit R, G, B; one plane, rows of at least `3 * width` bytes.
    Rgb8,
    /// 8-bit Y plane, then an interleaved U/V plane at half width and half height.
    Nv12,
}

impl PixelFormat {
    /// Number of planes in this layout.
    pub fn plane_count(self) -> usize {
        match self {
            PixelFormat::Rgb8 => 1,
            PixelFormat::Nv12 => 2,
        }
    }

    /// Bytes of real pixel data in one row of plane `plane` (strides may add padding).
    pub fn row_bytes(self, plane: usize, width: u32) -> usize {
        match (self, plane) {
            (PixelFormat::Rgb8, _) => 3 * width as usize,
            // The UV plane holds width.div_ceil(2) pairs of bytes.
            (PixelFormat::Nv12, 0) => width as usize,
            (PixelFormat::Nv12, _) => 2 * (width as usize).div_ceil(2),
        }
    }

    /// Number of rows of plane `plane`.
    pub fn plane_rows(self, plane: usize, height: u32) -> usize {
        match (self, plane) {
            (PixelFormat::Nv12, 1) => (height as usize).div_ceil(2),
            _ => height as usize,
        }
    }
}

/// Where one plane starts inside [`Frame::data`] and how many bytes separate its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plane {
    pub offset: usize,
    pub stride: usize,
}

/// Colour description of YUV frames, from the stream's caps. RGB frames carry `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct YuvColor {
    pub matrix: YuvMatrix,
    /// `true` for full range (0..255), `false` for limited/TV range (16..235 luma).
    pub full_range: bool,
}

/// YUV -> RGB matrix coefficients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum YuvMatrix {
    Bt601,
    Bt709,
    Bt2020,
}

/// Why a [`Frame`] was refused by [`Frame::new`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame is empty ({width}x{height})")]
    Empty { width: u32, height: u32 },
    #[error("{format:?} needs {expected} plane(s), got {got}")]
    PlaneCount {
        format: PixelFormat,
        expected: usize,
        got: usize,
    },
    #[error("plane {plane}: stride {stride} is shorter than a row of {row_bytes} bytes")]
    StrideTooSmall {
        plane: usize,
        stride: usize,
        row_bytes: usize,
    },
    #[error("plane {plane}: needs bytes up to {end}, but the buffer holds {len}")]
    OutOfBounds {
        plane: usize,
        end: usize,
        len: usize,
    },
}

/// One decoded video frame, already sampled down to the stream's analysis rate.
///
/// Cheap to clone (the pixels sit behind an `Arc`); stages pass `Arc<Frame>` when several faces
/// of one frame travel separately.
#[derive(Clone)]
pub struct Frame {
    pub stream: StreamId,
    /// Per-stream counter of frames handed downstream, starting at 0 for the stream's lifetime
    /// in this process (it does not reset on reconnect).
    pub seq: u64,
    /// Presentation timestamp from the source. It resets when a source reconnects or a file
    /// loops: never use it to measure elapsed time (use `mono`).
    pub pts: Option<Duration>,
    /// Wall-clock capture time: the sender's NTP time when the source carries it (RTCP sender
    /// reports), otherwise the time the frame arrived here. See `capture_time_from_sender`.
    pub capture_time: SystemTime,
    /// `true` when `capture_time` came from the sender rather than from the arrival time.
    pub capture_time_from_sender: bool,
    /// Monotonic arrival time, for every duration computed downstream.
    pub mono: Instant,
    pub width: u32,
    pub height: u32,
    pub format: PixelFormat,
    /// One entry per plane of `format` (see [`PixelFormat::plane_count`]).
    pub planes: [Plane; 2],
    /// YUV colour description for `Nv12`, `None` for `Rgb8`.
    pub color: Option<YuvColor>,
    pub data: Arc<[u8]>,
}

/// Everything of a [`Frame`] except the pixels, for building one.
#[derive(Debug, Clone)]
pub struct FrameMeta {
    pub stream: StreamId,
    pub seq: u64,
    pub pts: Option<Duration>,
    pub capture_time: SystemTime,
    pub capture_time_from_sender: bool,
    pub mono: Instant,
    pub width: u32,
    pub height: u32,
    pub format: PixelFormat,
    pub color: Option<YuvColor>,
}

impl Frame {
    /// A packed RGB8 frame (rows of `3 * width` bytes, no padding) that arrived at `mono`, its
    /// capture time the arrival (what tools, benchmarks and tests make).
    pub fn packed_rgb(
        stream: StreamId,
        seq: u64,
        pts: Option<Duration>,
        mono: Instant,
        (width, height): (u32, u32),
        data: Arc<[u8]>,
    ) -> Result<Frame, FrameError> {
        let meta = FrameMeta {
            stream,
            seq,
            pts,
            capture_time: SystemTime::now(),
            capture_time_from_sender: false,
            mono,
            width,
            height,
            format: PixelFormat::Rgb8,
            color: None,
        };
        let stride = PixelFormat::Rgb8.row_bytes(0, width);
        Frame::new(meta, &[Plane { offset: 0, stride }], data)
    }

    /// Builds a frame, checking that every plane of `format` fits inside `data` with its stride.
    /// `planes` lists the planes in order; only the first `format.plane_count()` are read.
    pub fn new(meta: FrameMeta, planes: &[Plane], data: Arc<[u8]>) -> Result<Frame, FrameError> {
        let FrameMeta {
            stream,
            seq,
            pts,
            capture_time,
            capture_time_from_sender,
            mono,
            width,
            height,
            format,
            color,
        } = meta;
        if width == 0 || height == 0 {
            return Err(FrameError::Empty { width, height });
        }
        let n = format.plane_count();
        if planes.len() < n {
            return Err(FrameError::PlaneCount {
                format,
                expected: n,
                got: planes.len(),
            });
        }
        let mut fixed = [Plane {
            offset: 0,
            stride: 0,
        }; 2];
        for (i, p) in planes.iter().take(n).enumerate() {
            let row_bytes = format.row_bytes(i, width);
            if p.stride < row_bytes {
                return Err(FrameError::StrideTooSmall {
                    plane: i,
                    stride: p.stride,
                    row_bytes,
                });
            }
            let rows = format.plane_rows(i, height);
            // Last row needs only its real bytes, not a full stride.
            let end = p
                .offset
                .checked_add((rows - 1).saturating_mul(p.stride))
                .and_then(|v| v.checked_add(row_bytes))
                .unwrap_or(usize::MAX);
            if end > data.len() {
                return Err(FrameError::OutOfBounds {
                    plane: i,
                    end,
                    len: data.len(),
                });
            }
            fixed[i] = *p;
        }
        Ok(Frame {
            stream,
            seq,
            pts,
            capture_time,
            capture_time_from_sender,
            mono,
            width,
            height,
            format,
            planes: fixed,
            color,
            data,
        })
    }

    /// Row `y` of plane `plane`, without stride padding. Panics only if `plane`/`y` are out of
    /// range for this frame's format and size (the bounds were checked at construction).
    pub fn row(&self, plane: usize, y: usize) -> &[u8] {
        let p = self.planes[plane];
        let start = p.offset + y * p.stride;
        &self.data[start..start + self.format.row_bytes(plane, self.width)]
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("stream", &self.stream)
            .field("seq", &self.seq)
            .field("pts", &self.pts)
            .field("width", &self.width)
            .field("height", &self.height)
            .field("format", &self.format)
            .field("planes", &&self.planes[..self.format.plane_count()])
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// Axis-aligned box in frame pixels, `x0 <= x1`, `y0 <= y1`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BBox {
    pub x0: f32,
    pub y0: f32,
    pub x1: f32,
    pub y1: f32,
}

impl BBox {
    pub fn width(&self) -> f32 {
        (self.x1 - self.x0).max(0.0)
    }
    pub fn height(&self) -> f32 {
        (self.y1 - self.y0).max(0.0)
    }
    pub fn area(&self) -> f32 {
        self.width() * self.height()
    }
}

/// Per-crop quality measures, filled by the faces stage.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct FaceQuality {
    /// Shorter side of the face box in frame pixels.
    pub face_px: f32,
    /// Variance of the Laplacian of the face region (higher = sharper).
    pub blur_var: f32,
    /// 1.0 for a frontal face, falling towards 0 as the head turns (from landmarks).
    pub frontalness: f32,
    /// Mean distance of the aligned landmarks from the template, in crop pixels.
    pub alignment_residual: f32,
}

/// One face of one frame that the tracker scheduled for scoring, before any crop: the frame
/// and the alignment a crop samples with. The CPU path crops it in the face stage; a GPU
/// path takes it as it is (the frame is uploaded once for all its faces).
#[derive(Debug, Clone)]
pub struct FaceJob {
    pub frame: Arc<Frame>,
    pub track: TrackId,
    pub bbox: BBox,
    /// Image-left eye, image-right eye, nose tip, image-left and image-right mouth corner, in
    /// frame pixels (smoothed by the tracker).
    pub landmarks: [[f32; 2]; 5],
    pub det_score: f32,
    /// Frame pixels -> SJEDD's 317 px template: the least-squares similarity from the
    /// landmarks, as a 2x3 matrix.
    pub alignment: [[f64; 3]; 2],
}

/// What travels with each crop through the encoder to the decision stage.
#[derive(Debug)]
pub struct FaceMeta {
    pub stream: StreamId,
    pub track: TrackId,
    /// Monotonic time of the frame.
    pub mono: Instant,
    pub capture_time: SystemTime,
    pub pts: Option<Duration>,
    pub bbox: BBox,
    /// `crop::quality::weight` of the crop, 0..=1.
    pub quality: f32,
    /// The RGB crop, kept only for streams that publish face crops or store media.
    pub crop: Option<Vec<u8>>,
    /// Publish the crop with a `new` alert (`publish_face_crops`).
    pub publish_crop: bool,
    /// The frame the face was scored on, kept only for streams that store evidence media
    /// (`store_media`): the decision stage holds the strongest one per track.
    pub frame: Option<Arc<Frame>>,
    /// The stream's counters (the decision stage counts scored faces there).
    pub metrics: Arc<crate::metrics::StreamMetrics>,
}

/// What a face stage tells the decision stage in order with its faces (through the encode
/// queue, which never drops these): a track ended, or the stream's face stage stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaceEvent {
    /// Unmatched for the tracker's patience: the face left or was lost.
    TrackEnded { stream: StreamId, track: TrackId },
    /// The stream was removed or restarted, or the daemon stops: its tracks are gone.
    StreamEnded { stream: StreamId },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(format: PixelFormat, width: u32, height: u32) -> FrameMeta {
        FrameMeta {
            stream: StreamId::new("cam-1").unwrap(),
            seq: 0,
            pts: None,
            capture_time: SystemTime::now(),
            capture_time_from_sender: false,
            mono: Instant::now(),
            width,
            height,
            format,
            color: None,
        }
    }

    #[test]
    fn ids_accept_the_documented_alphabet_only() {
        assert!(StreamId::new("Cam_01-east").is_ok());
        assert!(StreamId::new(&"a".repeat(64)).is_ok());
        assert_eq!(
            StreamId::new(&"a".repeat(65)),
            Err(IdError::TooLong { len: 65 })
        );
        assert_eq!(StreamId::new(""), Err(IdError::Empty));
        for bad in ["a/b", "a+b", "a#", "a b", "é", "a.b"] {
            assert!(
                matches!(StreamId::new(bad), Err(IdError::BadChar { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn ids_deserialize_with_validation() {
        #[derive(Deserialize)]
        struct T {
            id: StreamId,
        }
        assert_eq!(
            toml::from_str::<T>("id = \"ok\"").unwrap().id.as_str(),
            "ok"
        );
        let err = toml::from_str::<T>("id = \"no/slash\"").err().unwrap();
        assert!(err.to_string().contains("'/'"), "{err}");
    }

    #[test]
    fn frame_checks_planes_against_buffer() {
        // 5x3 RGB with 16-byte stride: last row needs 15 bytes.
        let data: Arc<[u8]> = vec![0u8; 16 * 2 + 15].into();
        let p = [Plane {
            offset: 0,
            stride: 16,
        }];
        let f = Frame::new(meta(PixelFormat::Rgb8, 5, 3), &p, data.clone()).unwrap();
        assert_eq!(f.row(0, 2).len(), 15);
        let short: Arc<[u8]> = vec![0u8; 16 * 2 + 14].into();
        assert!(matches!(
            Frame::new(meta(PixelFormat::Rgb8, 5, 3), &p, short),
            Err(FrameError::OutOfBounds { plane: 0, .. })
        ));
        let narrow = [Plane {
            offset: 0,
            stride: 14,
        }];
        assert!(matches!(
            Frame::new(meta(PixelFormat::Rgb8, 5, 3), &narrow, data.clone()),
            Err(FrameError::StrideTooSmall { .. })
        ));
        assert!(matches!(
            Frame::new(meta(PixelFormat::Rgb8, 0, 3), &p, data),
            Err(FrameError::Empty { .. })
        ));
    }

    #[test]
    fn nv12_odd_sizes_round_chroma_up() {
        // 5x3 NV12: Y 5x3, UV 3 pairs (6 bytes) x 2 rows.
        let y = Plane {
            offset: 0,
            stride: 5,
        };
        let uv = Plane {
            offset: 15,
            stride: 6,
        };
        let data: Arc<[u8]> = vec![0u8; 15 + 12].into();
        let f = Frame::new(meta(PixelFormat::Nv12, 5, 3), &[y, uv], data.clone()).unwrap();
        assert_eq!(f.row(1, 1).len(), 6);
        assert!(matches!(
            Frame::new(meta(PixelFormat::Nv12, 5, 3), &[y], data.clone()),
            Err(FrameError::PlaneCount { .. })
        ));
        let small: Arc<[u8]> = vec![0u8; 26].into();
        assert!(Frame::new(meta(PixelFormat::Nv12, 5, 3), &[y, uv], small).is_err());
    }
}
