//! Evenly spaced frames of a whole video, for offline analysis (`dfwatch analyze`): the
//! protocol of the paper (N frames spread over the video, 64 by default).
//!
//! The video is opened paused, its duration queried, then each target time is reached with an
//! accurate flushing seek and the preroll sample taken: decoding only around the targets,
//! not the whole file. Sources without a duration (live streams) are refused clearly.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;

use super::rate::RateGate;
use super::source::Source;
use super::status::IngestError;
use crate::types::{Frame, StreamId};

/// Frames taken from one video.
#[derive(Debug)]
pub struct SampledVideo {
    pub duration: Duration,
    pub width: u32,
    pub height: u32,
    /// In time order; a target the decoder could not reach is left out.
    pub frames: Vec<Frame>,
}

fn wait_async_done(bus: &gst::Bus, what: &str) -> Result<(), IngestError> {
    let msg = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(30),
            &[gst::MessageType::AsyncDone, gst::MessageType::Error],
        )
        .ok_or_else(|| IngestError::Pipeline(format!("{what}: no answer within 30 s")))?;
    if let gst::MessageView::Error(e) = msg.view() {
        let text = super::source::redact_known(&format!("{}", e.error()));
        let debug = e
            .debug()
            .map(|d| super::source::redact_known(d.as_str()))
            .unwrap_or_default();
        return Err(IngestError::Pipeline(format!("{what}: {text} ({debug})")));
    }
    Ok(())
}

/// `uridecodebin ! videoconvert ! appsink` (packed RGB, never paced, never dropping: at most
/// `buffers` decoded frames wait) for the video at `uri` (a URI or a plain path, relative to
/// `base_dir`), not started.
fn rgb_pipeline(
    uri: &str,
    base_dir: &Path,
    buffers: u32,
) -> Result<(gst::Pipeline, gst_app::AppSink), IngestError> {
    super::init().map_err(IngestError::Pipeline)?;
    let source = Source::parse(uri, base_dir).map_err(|e| IngestError::Pipeline(e.to_string()))?;
    let location = source.uri().to_string();
    let pipeline = gst::Pipeline::new();
    let make = |name: &str| {
        gst::ElementFactory::make(name)
            .build()
            .map_err(|e| IngestError::Pipeline(format!("GStreamer element {name}: {e}")))
    };
    let decode = make("uridecodebin")?;
    decode.set_property("uri", &location);
    let convert = make("videoconvert")?;
    let sink = gst_app::AppSink::builder()
        .caps(
            &gst_video::VideoCapsBuilder::new()
                .format(gst_video::VideoFormat::Rgb)
                .build(),
        )
        .sync(false)
        .max_buffers(buffers)
        .build();
    pipeline
        .add_many([&decode, &convert, sink.upcast_ref()])
        .map_err(|e| IngestError::Pipeline(e.to_string()))?;
    convert
        .link(&sink)
        .map_err(|e| IngestError::Pipeline(e.to_string()))?;
    let conv = convert.downgrade();
    decode.connect_pad_added(move |_, pad| {
        let Some(conv) = conv.upgrade() else { return };
        let video = pad
            .current_caps()
            .or_else(|| Some(pad.query_caps(None)))
            .and_then(|c| c.structure(0).map(|s| s.name().starts_with("video/")))
            .unwrap_or(false);
        if let (true, Some(sinkpad)) = (video, conv.static_pad("sink"))
            && !sinkpad.is_linked()
        {
            let _ = pad.link(&sinkpad);
        }
    });
    Ok((pipeline, sink))
}

/// A decoded sample as a packed RGB frame (rows copied without padding); `mono` gives its
/// monotonic time from its timestamp.
fn rgb_frame(
    sample: &gst::Sample,
    stream: &StreamId,
    seq: u64,
    mono: impl FnOnce(Option<Duration>) -> Instant,
) -> Option<Frame> {
    let (buffer, caps) = (sample.buffer()?, sample.caps()?);
    let info = gst_video::VideoInfo::from_caps(caps).ok()?;
    let vf = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, &info).ok()?;
    let stride = vf.plane_stride()[0] as usize;
    let (w, h) = (info.width(), info.height());
    let row = 3 * w as usize;
    let plane = vf.plane_data(0).ok()?;
    let mut data = Vec::with_capacity(row * h as usize);
    for r in 0..h as usize {
        data.extend_from_slice(plane.get(r * stride..r * stride + row)?);
    }
    let pts = buffer.pts().map(|p| Duration::from_nanos(p.nseconds()));
    Frame::packed_rgb(stream.clone(), seq, pts, mono(pts), (w, h), Arc::from(data)).ok()
}

/// Decodes the whole video at `uri` in order, as fast as it decodes, keeping `fps` frames a
/// second of its own time line (the daemon's [`RateGate`] on the timestamps). Each kept
/// frame's `mono` is `t0` plus its time since the first frame, so trackers and evidence
/// windows see the video's time, not the decoding speed. `on_frame` returns `false` to stop
/// early. Returns the length decoded: from the first frame's timestamp to the last's, plus
/// one frame (recordings often start at a non-zero timestamp).
pub fn decode_at_rate(
    uri: &str,
    base_dir: &Path,
    fps: f64,
    t0: Instant,
    on_frame: &mut dyn FnMut(Frame) -> bool,
) -> Result<Duration, IngestError> {
    let (pipeline, sink) = rgb_pipeline(uri, base_dir, 4)?;
    let bus = pipeline.bus().expect("a pipeline has a bus");
    let stream = StreamId::new("calibrate").expect("literal id");
    let mut gate = RateGate::new(fps);
    let result = (|| {
        pipeline
            .set_state(gst::State::Playing)
            .map_err(|_| IngestError::Pipeline("the video could not be opened".into()))?;
        let mut seq = 0u64;
        let mut first: Option<Duration> = None;
        let mut last = Duration::ZERO;
        let mut decoded = 0u64;
        let mut waited = Duration::ZERO;
        let tick = Duration::from_millis(200);
        loop {
            let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_mseconds(200)) else {
                if sink.is_eos() {
                    break;
                }
                if let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error])
                    && let gst::MessageView::Error(e) = msg.view()
                {
                    return Err(IngestError::Pipeline(super::source::redact_known(
                        &format!("decoding: {}", e.error()),
                    )));
                }
                waited += tick;
                if waited >= Duration::from_secs(30) {
                    return Err(IngestError::Pipeline(
                        "decoding: no frame within 30 s".into(),
                    ));
                }
                continue;
            };
            waited = Duration::ZERO;
            let pts = sample
                .buffer()
                .and_then(|b| b.pts())
                .map(|p| Duration::from_nanos(p.nseconds()));
            let Some(pts) = pts else { continue };
            let start = *first.get_or_insert(pts);
            last = last.max(pts);
            decoded += 1;
            if !gate.admit(pts) {
                continue;
            }
            let since = |p: Option<Duration>| t0 + p.unwrap_or_default().saturating_sub(start);
            if let Some(f) = rgb_frame(&sample, &stream, seq, since) {
                seq += 1;
                if !on_frame(f) {
                    break;
                }
            }
        }
        let span = last.saturating_sub(first.unwrap_or_default());
        let one = if decoded > 1 {
            span / (decoded - 1).min(u64::from(u32::MAX)) as u32
        } else {
            Duration::ZERO
        };
        Ok(span + one)
    })();
    let _ = pipeline.set_state(gst::State::Null);
    result
}

/// Decodes `count` frames evenly spread over the video at `uri` (a URI or a plain path,
/// relative to `base_dir`) as packed RGB.
pub fn sample_frames(
    uri: &str,
    base_dir: &Path,
    count: usize,
) -> Result<SampledVideo, IngestError> {
    let (pipeline, sink) = rgb_pipeline(uri, base_dir, 1)?;
    let bus = pipeline.bus().expect("a pipeline has a bus");
    let result = (|| {
        pipeline
            .set_state(gst::State::Paused)
            .map_err(|_| IngestError::Pipeline("the video could not be opened".into()))?;
        wait_async_done(&bus, "opening the video")?;
        let duration = pipeline
            .query_duration::<gst::ClockTime>()
            .filter(|d| d.nseconds() > 0)
            .ok_or_else(|| {
                IngestError::Pipeline(
                    "the source has no known duration (a live stream?): evenly spaced frames \
                     need a file or a seekable recording"
                        .into(),
                )
            })?;
        let d = Duration::from_nanos(duration.nseconds());
        let stream = StreamId::new("analyze").expect("literal id");
        let seq = AtomicU64::new(0);
        let mut frames = Vec::with_capacity(count);
        let (mut width, mut height) = (0, 0);
        for i in 0..count {
            // Centres of `count` equal slices: never the very last instant, which may not
            // hold a frame.
            let t = d.mul_f64((i as f64 + 0.5) / count as f64);
            if pipeline
                .seek_simple(
                    gst::SeekFlags::FLUSH | gst::SeekFlags::ACCURATE,
                    gst::ClockTime::from_nseconds(t.as_nanos() as u64),
                )
                .is_err()
            {
                return Err(IngestError::Pipeline(format!(
                    "seeking to {:.3} s failed (the container may not be seekable)",
                    t.as_secs_f64()
                )));
            }
            wait_async_done(&bus, "seeking")?;
            let Ok(sample) = sink.pull_preroll() else {
                continue;
            };
            let n = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Some(f) = rgb_frame(&sample, &stream, n, |_| Instant::now()) {
                (width, height) = (f.width, f.height);
                frames.push(f);
            }
        }
        Ok(SampledVideo {
            duration: d,
            width,
            height,
            frames,
        })
    })();
    let _ = pipeline.set_state(gst::State::Null);
    result
}
