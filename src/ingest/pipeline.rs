//! One GStreamer pipeline per stream attempt:
//!
//! ```text
//! uridecodebin (source + demux + decoder, chosen by GStreamer)
//!   -> [rate gate: pad probe drops frames above the analysis rate, before any conversion]
//!   -> videoscale -> capsfilter (at most `ingest.max_pixels`, aspect kept; passthrough below)
//!   -> videoconvert -> appsink (exactly RGB or NV12; callback try_sends)
//! ```
//!
//! Credentials reach the source element as properties in `source-setup`, never in the URI.
//! The appsink callback copies the frame once into an `Arc<[u8]>`, hands it to the bounded
//! queue with `try_send` and returns: it never waits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gstreamer as gst;
use gstreamer::glib;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;

use super::config::{DecoderPreference, RtspTransport};
use super::rate::RateGate;
use super::source::{Login, Redactor, Source, SourceKind};
use super::status::{IngestError, StreamCounters};
use crate::channel::{Sender, Sent, TrySendError};
use crate::types::{Frame, FrameMeta, PixelFormat, Plane, StreamId, YuvColor, YuvMatrix};

/// Everything needed to build one attempt's pipeline.
#[derive(Debug, Clone)]
pub(crate) struct PipelineSpec {
    pub stream: StreamId,
    pub source: Source,
    pub fps: f64,
    pub format: PixelFormat,
    pub decoder: DecoderPreference,
    /// Pace output at the stream's own clock (files played "live").
    pub sync: bool,
    pub rtsp_latency: Duration,
    pub rtsp_transport: RtspTransport,
    pub login: Login,
    /// Larger decoded frames are scaled down (aspect kept) before conversion.
    pub max_pixels: u64,
    /// Schemes the sources inside the stream may use (besides the stream's own URI).
    pub child_schemes: Vec<String>,
}

/// What the bus reported, already classified and redacted.
#[derive(Debug)]
pub(crate) enum BusEvent {
    Error(IngestError),
    Eos,
}

/// A running pipeline. Dropping it without [`Pipeline::shutdown`] also stops it.
pub(crate) struct Pipeline {
    pipeline: gst::Pipeline,
    bus: gst::Bus,
    decoder: Arc<Mutex<Option<String>>>,
    /// Frames this attempt handed to the queue (the stream's counters span all attempts).
    delivered: Arc<AtomicU64>,
    redactor: Redactor,
    /// Why a source inside the stream was refused, once one was.
    refused: Arc<Mutex<Option<String>>>,
}

impl Pipeline {
    /// Builds the pipeline and sets it playing. Frames go to `frames`; `seq` numbers them
    /// across attempts.
    pub fn start(
        spec: PipelineSpec,
        frames: Sender<Frame>,
        counters: Arc<StreamCounters>,
        seq: Arc<AtomicU64>,
    ) -> Result<Pipeline, IngestError> {
        let redactor = Redactor::for_login(&spec.login);
        let err = |what: &str, e: glib::BoolError| {
            IngestError::Pipeline(redactor.redact(&format!("{what}: {e}")))
        };
        let pipeline = gst::Pipeline::with_name(&format!("stream-{}", spec.stream));
        let decodebin = gst::ElementFactory::make("uridecodebin")
            .property("uri", spec.source.uri())
            .build()
            .map_err(|e| err("uridecodebin", e))?;
        let scale = gst::ElementFactory::make("videoscale")
            .build()
            .map_err(|e| err("videoscale", e))?;
        let limit = gst::ElementFactory::make("capsfilter")
            .property("caps", gst::Caps::new_empty_simple("video/x-raw"))
            .build()
            .map_err(|e| err("capsfilter", e))?;
        let convert = gst::ElementFactory::make("videoconvert")
            .build()
            .map_err(|e| err("videoconvert", e))?;
        let caps = gst::Caps::builder("video/x-raw")
            .field(
                "format",
                match spec.format {
                    PixelFormat::Rgb8 => "RGB",
                    PixelFormat::Nv12 => "NV12",
                },
            )
            .build();
        let appsink = gst_app::AppSink::builder()
            .caps(&caps)
            .max_buffers(2)
            .drop(true)
            .sync(spec.sync)
            .build();
        pipeline
            .add_many([&decodebin, &scale, &limit, &convert, appsink.upcast_ref()])
            .map_err(|e| err("add", e))?;
        gst::Element::link_many([&scale, &limit, &convert, appsink.upcast_ref()])
            .map_err(|e| err("link videoscale ! capsfilter ! videoconvert ! appsink", e))?;

        install_source_setup(&decodebin, &spec);
        if spec.decoder != DecoderPreference::Auto {
            install_decoder_filter(&decodebin, spec.decoder);
        }
        let decoder = Arc::new(Mutex::new(None));
        watch_decoder(&pipeline, decoder.clone());
        let refused = Arc::new(Mutex::new(None));
        guard_child_sources(
            &pipeline,
            &decodebin,
            &spec,
            redactor.clone(),
            refused.clone(),
        );
        install_rate_gate(&scale, spec.fps, counters.clone())?;
        install_size_limit(&scale, &limit, spec.max_pixels, &spec.stream)?;
        link_video_pad(&decodebin, &scale);
        let delivered = Arc::new(AtomicU64::new(0));
        install_appsink(&appsink, &spec, frames, counters, seq, delivered.clone());

        let bus = pipeline
            .bus()
            .ok_or_else(|| IngestError::Pipeline("pipeline has no bus".into()))?;
        let p = Pipeline {
            pipeline,
            bus,
            decoder,
            delivered,
            redactor,
            refused,
        };
        if let Err(e) = p.pipeline.set_state(gst::State::Playing) {
            // The reason is posted on the bus, possibly a moment later from a streaming
            // thread; the runner's bus polling picks it up (or the connect timeout fires).
            tracing::debug!(stream = %spec.stream, error = %e, "Pipeline refused to start.");
        }
        Ok(p)
    }

    /// Next error or end-of-stream waiting on the bus, if any (never blocks).
    pub fn poll_bus(&self) -> Option<BusEvent> {
        while let Some(msg) = self.bus.pop() {
            if let Some(ev) = self.classify(&msg) {
                return Some(ev);
            }
        }
        None
    }

    fn classify(&self, msg: &gst::Message) -> Option<BusEvent> {
        use gst::MessageView;
        match msg.view() {
            MessageView::Error(e) => {
                if let Some(why) = self.refused.lock().ok().and_then(|r| r.clone()) {
                    return Some(BusEvent::Error(IngestError::SourceNotAllowed(why)));
                }
                let debug = e.debug().map(|d| d.to_string());
                Some(BusEvent::Error(classify_error(
                    &e.error(),
                    debug.as_deref(),
                    &self.redactor,
                )))
            }
            MessageView::Eos(_) => Some(BusEvent::Eos),
            MessageView::Warning(w) => {
                tracing::debug!(
                    pipeline = %self.pipeline.name(),
                    warning = %self.redactor.redact(&w.error().to_string()),
                    "GStreamer warning."
                );
                None
            }
            _ => None,
        }
    }

    /// Frames this attempt has delivered so far.
    pub fn frames_delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Name of the video decoder element, once GStreamer has chosen it.
    pub fn decoder(&self) -> Option<String> {
        self.decoder.lock().ok().and_then(|d| d.clone())
    }

    /// Seeks a file back to its start (for `on_eos = "loop"`).
    pub fn rewind(&self) -> Result<(), IngestError> {
        self.pipeline
            .seek_simple(
                gst::SeekFlags::FLUSH | gst::SeekFlags::KEY_UNIT,
                gst::ClockTime::ZERO,
            )
            .map_err(|e| IngestError::Pipeline(format!("seek to start failed: {e}")))
    }
}

impl Drop for Pipeline {
    /// Stops the pipeline on a helper thread: tearing down a network source can take seconds
    /// (TCP timeouts), and the supervisor, a tokio task, must never block on it (a blocked
    /// worker would stall every other stream's supervision).
    fn drop(&mut self) {
        let pipeline = self.pipeline.clone();
        let spawned = std::thread::Builder::new()
            .name("gst-teardown".into())
            .spawn(move || {
                let _ = pipeline.set_state(gst::State::Null);
            });
        if spawned.is_err() {
            let _ = self.pipeline.set_state(gst::State::Null);
        }
    }
}

/// Maps a GStreamer error to the typed error of the supervisor.
pub(crate) fn classify_error(
    e: &glib::Error,
    debug: Option<&str>,
    redactor: &Redactor,
) -> IngestError {
    let raw = match debug {
        Some(d) => format!("{} ({})", e.message(), d),
        None => e.message().to_string(),
    };
    let mut text = redactor.redact(&raw);
    if text.len() > 600 {
        let mut cut = 600;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    let lower = text.to_ascii_lowercase();
    let has = |s: &str| lower.contains(s);
    if let Some(k) = e.kind::<gst::ResourceError>() {
        return match k {
            gst::ResourceError::NotAuthorized => IngestError::AuthFailed(text),
            gst::ResourceError::NotFound => IngestError::NotFound(text),
            _ if has("401") || has("unauthorized") || has("authenticat") => {
                IngestError::AuthFailed(text)
            }
            _ if has("404") || has("not found") || has("no such file") => {
                IngestError::NotFound(text)
            }
            _ if has("refused") => IngestError::Refused(text),
            _ => IngestError::Network(text),
        };
    }
    if let Some(k) = e.kind::<gst::StreamError>() {
        return match k {
            gst::StreamError::CodecNotFound
            | gst::StreamError::TypeNotFound
            | gst::StreamError::WrongType
            | gst::StreamError::Format
            | gst::StreamError::NotImplemented => IngestError::UnsupportedCodec(text),
            _ => IngestError::Decode(text),
        };
    }
    if let Some(k) = e.kind::<gst::CoreError>() {
        return match k {
            gst::CoreError::MissingPlugin | gst::CoreError::Negotiation => {
                IngestError::UnsupportedCodec(text)
            }
            _ => IngestError::Pipeline(text),
        };
    }
    IngestError::Pipeline(text)
}

/// Refuses every source element created inside the pipeline (by an HLS or DASH demuxer, ...)
/// whose URI scheme the stream may not use: the element is locked in the NULL state, so it
/// never opens its file or device, and an error on the bus ends the attempt.
///
/// The stream's own source is recognised by what it is, not by its URI's spelling (a file
/// source reports its path normalised, an SRT source its options reordered): the URI handler
/// that `decodebin` (the stream's uridecodebin) adds to itself. Sources inside it (a
/// demuxer's downloads, in bins of their own) are children of other bins. RTSP's RTP
/// receivers (`udp`) are allowed.
fn guard_child_sources(
    pipeline: &gst::Pipeline,
    decodebin: &gst::Element,
    spec: &PipelineSpec,
    redactor: Redactor,
    refused: Arc<Mutex<Option<String>>>,
) {
    let allowed = spec.child_schemes.clone();
    let rtsp = spec.source.kind == SourceKind::Rtsp;
    let stream = spec.stream.clone();
    // Straight to the pipeline's bus: a demuxer catches its sources' own errors (and
    // retries the download), so an error posted by the element might never arrive.
    let bus = pipeline.bus();
    let own_parent = decodebin.downgrade();
    let check = move |element: &gst::Element| {
        let Some(handler) = element.dynamic_cast_ref::<gst::URIHandler>() else {
            return;
        };
        if handler.uri_type() != gst::URIType::Src {
            return;
        }
        if is_own_source(element, &own_parent) {
            return;
        }
        let uri = handler.uri().map(|u| u.to_string()).unwrap_or_default();
        let scheme = uri
            .split_once(':')
            .map(|(s, _)| s.to_ascii_lowercase())
            .unwrap_or_default();
        if allowed.contains(&scheme) || (rtsp && scheme == "udp") {
            return;
        }
        let _ = element.set_locked_state(true);
        let why = redactor.redact(&format!(
            "a source inside the stream wanted {uri:?} ({scheme}://), which this stream may \
             not open (allowed: {})",
            allowed.join(", ")
        ));
        tracing::warn!(stream = %stream, reason = %why, "Source refused.");
        if let Ok(mut r) = refused.lock() {
            r.get_or_insert(why.clone());
        }
        let msg = gst::message::Error::builder(gst::ResourceError::OpenRead, &why)
            .src(element)
            .build();
        if let Some(bus) = &bus {
            let _ = bus.post(msg);
        }
    };
    pipeline.connect_deep_element_added(move |_, _, element| {
        check(element);
        // A demuxer may fill a bin of its own and add the bin whole: its children arrive
        // without an element-added of their own.
        if let Some(bin) = element.downcast_ref::<gst::Bin>() {
            for child in bin.iterate_recurse().into_iter().flatten() {
                check(&child);
            }
        }
    });
}

/// Whether `element` is the source the stream's uridecodebin made for the stream's URI: an
/// element whose parent is that uridecodebin itself.
fn is_own_source(element: &gst::Element, decodebin: &glib::WeakRef<gst::Element>) -> bool {
    let Some(decodebin) = decodebin.upgrade() else {
        return false;
    };
    element
        .parent()
        .is_some_and(|p| &p == decodebin.upcast_ref::<gst::Object>())
}

/// Sets credentials and transport options on the source element uridecodebin creates.
fn install_source_setup(decodebin: &gst::Element, spec: &PipelineSpec) {
    let login = spec.login.clone();
    let kind = spec.source.kind;
    let latency_ms = spec.rtsp_latency.as_millis().min(u32::MAX as u128) as u32;
    let transport = spec.rtsp_transport;
    decodebin.connect("source-setup", false, move |args| {
        let src = args.get(1).and_then(|v| v.get::<gst::Element>().ok())?;
        let set_str = |name: &str, v: &str| {
            if src.has_property(name) {
                src.set_property(name, v);
            }
        };
        match kind {
            SourceKind::Rtsp => {
                if src.has_property("latency") {
                    src.set_property("latency", latency_ms);
                }
                match transport {
                    RtspTransport::Auto => {}
                    RtspTransport::Tcp => src.set_property_from_str("protocols", "tcp"),
                    RtspTransport::Udp => src.set_property_from_str("protocols", "udp"),
                }
                if src.has_property("add-reference-timestamp-meta") {
                    src.set_property("add-reference-timestamp-meta", true);
                }
                if let Some(u) = &login.username {
                    set_str("user-id", u.expose());
                }
                if let Some(p) = &login.password {
                    set_str("user-pw", p.expose());
                }
            }
            SourceKind::Http => {
                if let Some(u) = &login.username {
                    set_str("user-id", u.expose());
                }
                if let Some(p) = &login.password {
                    set_str("user-pw", p.expose());
                }
            }
            SourceKind::Srt => {
                if let Some(p) = &login.password {
                    set_str("passphrase", p.expose());
                }
            }
            SourceKind::File | SourceKind::V4l2 => {}
        }
        None
    });
}

/// `software`: skip hardware decoders; `nvidia`: skip every other video decoder.
fn install_decoder_filter(decodebin: &gst::Element, pref: DecoderPreference) {
    let Some(result_type) = glib::Type::from_name("GstAutoplugSelectResult") else {
        tracing::warn!("GstAutoplugSelectResult is not registered; decoder preference ignored.");
        return;
    };
    decodebin.connect("autoplug-select", false, move |args| {
        // TRY = 0, SKIP = 2.
        let factory = args
            .get(3)
            .and_then(|v| v.get::<gst::ElementFactory>().ok());
        let skip = factory.is_some_and(|f| {
            let video_decoder = is_video_decoder(&f);
            let hardware = is_hardware(&f);
            match pref {
                DecoderPreference::Software => hardware,
                DecoderPreference::Nvidia => video_decoder && !is_nvidia(&f),
                DecoderPreference::Auto => false,
            }
        });
        glib::EnumClass::with_type(result_type).and_then(|c| c.to_value(if skip { 2 } else { 0 }))
    });
}

pub(crate) fn is_video_decoder(f: &gst::ElementFactory) -> bool {
    let klass = f.metadata(gst::ELEMENT_METADATA_KLASS).unwrap_or_default();
    klass.contains("Decoder") && klass.contains("Video")
}

pub(crate) fn is_hardware(f: &gst::ElementFactory) -> bool {
    let klass = f.metadata(gst::ELEMENT_METADATA_KLASS).unwrap_or_default();
    klass.contains("Hardware") || is_nvidia(f)
}

pub(crate) fn is_nvidia(f: &gst::ElementFactory) -> bool {
    f.name().starts_with("nv")
}

fn watch_decoder(pipeline: &gst::Pipeline, slot: Arc<Mutex<Option<String>>>) {
    pipeline.connect_deep_element_added(move |_, _, element| {
        if let Some(f) = element.factory()
            && is_video_decoder(&f)
            && let Ok(mut s) = slot.lock()
        {
            *s = Some(f.name().to_string());
        }
    });
}

/// Drops frames above the analysis rate on the first element's sink pad, before any scaling,
/// conversion or copy, counting decoded and skipped frames.
fn install_rate_gate(
    first: &gst::Element,
    fps: f64,
    counters: Arc<StreamCounters>,
) -> Result<(), IngestError> {
    let pad = first
        .static_pad("sink")
        .ok_or_else(|| IngestError::Pipeline("videoscale has no sink pad".into()))?;
    let gate = Mutex::new(RateGate::new(fps));
    let started = Instant::now();
    pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
        let Some(buffer) = info.buffer() else {
            return gst::PadProbeReturn::Ok;
        };
        counters.frames_decoded.fetch_add(1, Ordering::Relaxed);
        let t = buffer
            .pts()
            .map(|p| Duration::from_nanos(p.nseconds()))
            .unwrap_or_else(|| started.elapsed());
        let keep = gate.lock().map(|mut g| g.admit(t)).unwrap_or(true);
        if keep {
            gst::PadProbeReturn::Ok
        } else {
            counters.frames_sampled_out.fetch_add(1, Ordering::Relaxed);
            // `Handled` consumes the buffer. (`Drop` makes gstreamer-rs 0.25 release the buffer
            // itself and GStreamer 1.22 then unrefs a NULL pointer: a CRITICAL per frame.)
            gst::PadProbeReturn::Handled
        }
    });
    Ok(())
}

/// The largest size of `max_pixels` or fewer with the aspect of `w x h` (even sides, at
/// least 2), or `None` when `w x h` is within the limit.
pub(crate) fn limited_size(w: u32, h: u32, max_pixels: u64) -> Option<(u32, u32)> {
    let pixels = u64::from(w) * u64::from(h);
    if pixels <= max_pixels || w == 0 || h == 0 {
        return None;
    }
    let s = (max_pixels as f64 / pixels as f64).sqrt();
    let even = |v: u32| ((f64::from(v) * s) as u32 & !1).max(2);
    let (mut nw, mut nh) = (even(w), even(h));
    while u64::from(nw) * u64::from(nh) > max_pixels && nw > 2 && nh > 2 {
        nw -= 2;
        nh = ((u64::from(nw) * u64::from(h) / u64::from(w)) as u32 & !1).max(2);
    }
    Some((nw, nh))
}

/// Caps the decoded size at `max_pixels`: when the decoder announces its caps, the capsfilter
/// after videoscale is set to the largest size within the limit (aspect kept), before the
/// caps reach it; below the limit it passes frames through untouched.
fn install_size_limit(
    scale: &gst::Element,
    limit: &gst::Element,
    max_pixels: u64,
    stream: &StreamId,
) -> Result<(), IngestError> {
    let pad = scale
        .static_pad("sink")
        .ok_or_else(|| IngestError::Pipeline("videoscale has no sink pad".into()))?;
    let limit = limit.downgrade();
    let stream = stream.clone();
    pad.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |_, info| {
        let Some(gst::PadProbeData::Event(ev)) = &info.data else {
            return gst::PadProbeReturn::Ok;
        };
        let gst::EventView::Caps(c) = ev.view() else {
            return gst::PadProbeReturn::Ok;
        };
        let Some(s) = c.caps().structure(0) else {
            return gst::PadProbeReturn::Ok;
        };
        let (Ok(w), Ok(h)) = (s.get::<i32>("width"), s.get::<i32>("height")) else {
            return gst::PadProbeReturn::Ok;
        };
        let (w, h) = (w.max(0) as u32, h.max(0) as u32);
        let caps = match limited_size(w, h, max_pixels) {
            Some((nw, nh)) => {
                tracing::info!(stream = %stream, from = format!("{w}x{h}"), to = format!("{nw}x{nh}"), max_pixels, "Decoded frames are above ingest.max_pixels; scaling them down before analysis.");
                gst::Caps::builder("video/x-raw")
                    .field("width", nw as i32)
                    .field("height", nh as i32)
                    .build()
            }
            None => gst::Caps::new_empty_simple("video/x-raw"),
        };
        if let Some(limit) = limit.upgrade() {
            limit.set_property("caps", &caps);
        }
        gst::PadProbeReturn::Ok
    });
    Ok(())
}

/// Links uridecodebin's video pad (the first one) to the first element; other pads (audio)
/// are left unlinked, which uridecodebin tolerates once one pad is linked.
fn link_video_pad(decodebin: &gst::Element, first: &gst::Element) {
    let first = first.downgrade();
    decodebin.connect_pad_added(move |_, pad| {
        let Some(first) = first.upgrade() else {
            return;
        };
        let is_video = pad
            .current_caps()
            .or_else(|| Some(pad.query_caps(None)))
            .and_then(|c| c.structure(0).map(|s| s.name().starts_with("video/")))
            .unwrap_or(false);
        if !is_video {
            return;
        }
        let Some(sink) = first.static_pad("sink") else {
            return;
        };
        if sink.is_linked() {
            return;
        }
        if let Err(e) = pad.link(&sink) {
            tracing::warn!(error = ?e, "Could not link the decoded video pad.");
        }
    });
}

/// Caps-derived layout, computed once per caps change.
struct Layout {
    caps: gst::Caps,
    info: gst_video::VideoInfo,
    color: Option<YuvColor>,
}

fn install_appsink(
    appsink: &gst_app::AppSink,
    spec: &PipelineSpec,
    frames: Sender<Frame>,
    counters: Arc<StreamCounters>,
    seq: Arc<AtomicU64>,
    delivered: Arc<AtomicU64>,
) {
    let stream = spec.stream.clone();
    let format = spec.format;
    let layout: Mutex<Option<Layout>> = Mutex::new(None);
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let sample = sink.pull_sample().map_err(|_| gst::FlowError::Flushing)?;
                let now = Instant::now();
                let wall = SystemTime::now();
                let (Some(buffer), Some(caps)) = (sample.buffer(), sample.caps()) else {
                    counters
                        .frames_dropped_invalid
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(gst::FlowSuccess::Ok);
                };
                let mut guard = layout.lock().map_err(|_| gst::FlowError::Error)?;
                if guard.as_ref().is_none_or(|l| l.caps.as_ref() != caps) {
                    *guard = gst_video::VideoInfo::from_caps(caps)
                        .ok()
                        .map(|info| Layout {
                            caps: caps.to_owned(),
                            color: yuv_color(&info, format),
                            info,
                        });
                }
                let Some(l) = guard.as_ref() else {
                    counters
                        .frames_dropped_invalid
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(gst::FlowSuccess::Ok);
                };
                let (from_sender, capture_time) = match sender_ntp_time(buffer) {
                    Some(t) => (true, t),
                    None => (false, wall),
                };
                let meta = FrameMeta {
                    stream: stream.clone(),
                    seq: 0,
                    pts: buffer.pts().map(|p| Duration::from_nanos(p.nseconds())),
                    capture_time,
                    capture_time_from_sender: from_sender,
                    mono: now,
                    width: l.info.width(),
                    height: l.info.height(),
                    format,
                    color: l.color,
                };
                let Some(frame) = copy_frame(buffer, &l.info, meta, &seq) else {
                    counters
                        .frames_dropped_invalid
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(gst::FlowSuccess::Ok);
                };
                drop(guard);
                counters.mark_frame(now);
                match frames.try_send(frame) {
                    Ok(Sent::Queued) => {
                        counters.frames_delivered.fetch_add(1, Ordering::Relaxed);
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Sent::DroppedOldest(_)) => {
                        counters.frames_delivered.fetch_add(1, Ordering::Relaxed);
                        delivered.fetch_add(1, Ordering::Relaxed);
                        counters
                            .frames_dropped_queue_full
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Sent::DroppedNewest(_)) | Err(TrySendError::Full(_)) => {
                        counters
                            .frames_dropped_queue_full
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    // Nobody consumes frames any more: the daemon is stopping.
                    Err(TrySendError::Closed(_)) => return Err(gst::FlowError::Flushing),
                }
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
}

/// Copies the planes of `buffer` into one allocation, keeping GStreamer's strides.
fn copy_frame(
    buffer: &gst::BufferRef,
    info: &gst_video::VideoInfo,
    mut meta: FrameMeta,
    seq: &AtomicU64,
) -> Option<Frame> {
    let vf = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, info).ok()?;
    let n = meta.format.plane_count();
    if vf.n_planes() as usize != n {
        return None;
    }
    let mut spans: [&[u8]; 2] = [&[], &[]];
    let mut planes = [Plane {
        offset: 0,
        stride: 0,
    }; 2];
    let mut offset = 0;
    for (i, span) in spans.iter_mut().enumerate().take(n) {
        let stride = usize::try_from(*vf.plane_stride().get(i)?).ok()?;
        let rows = meta.format.plane_rows(i, meta.height);
        let need = stride * (rows - 1) + meta.format.row_bytes(i, meta.width);
        let data = vf.plane_data(i as u32).ok()?;
        *span = data.get(..need)?;
        planes[i] = Plane { offset, stride };
        offset += need;
    }
    // One allocation, written once: a chain of slice iterators has an exact length.
    let data: Arc<[u8]> = spans[0].iter().chain(spans[1].iter()).copied().collect();
    meta.seq = seq.fetch_add(1, Ordering::Relaxed);
    Frame::new(meta, &planes[..n], data).ok()
}

fn yuv_color(info: &gst_video::VideoInfo, format: PixelFormat) -> Option<YuvColor> {
    if format != PixelFormat::Nv12 {
        return None;
    }
    let c = info.colorimetry();
    let matrix = match c.matrix() {
        gst_video::VideoColorMatrix::Bt709 => YuvMatrix::Bt709,
        gst_video::VideoColorMatrix::Bt2020 => YuvMatrix::Bt2020,
        _ => YuvMatrix::Bt601,
    };
    Some(YuvColor {
        matrix,
        full_range: c.range() == gst_video::VideoColorRange::Range0_255,
    })
}

/// Seconds between the NTP epoch (1900) and the Unix epoch (1970).
const NTP_UNIX_OFFSET_S: u64 = 2_208_988_800;

/// Sender capture time from a reference-timestamp meta in NTP time, when the source added one.
fn sender_ntp_time(buffer: &gst::BufferRef) -> Option<SystemTime> {
    buffer
        .iter_meta::<gst::ReferenceTimestampMeta>()
        .find(|m| {
            m.reference()
                .structure(0)
                .is_some_and(|s| s.name() == "timestamp/x-ntp")
        })
        .and_then(|m| {
            m.timestamp()
                .nseconds()
                .checked_sub(NTP_UNIX_OFFSET_S * 1_000_000_000)
        })
        .map(|ns| UNIX_EPOCH + Duration::from_nanos(ns))
}

#[cfg(test)]
mod tests {
    use super::limited_size;

    #[test]
    fn frames_over_the_pixel_cap_shrink_to_it_with_their_aspect() {
        let cap = 3840 * 2160;
        assert_eq!(limited_size(1920, 1080, cap), None);
        assert_eq!(limited_size(3840, 2160, cap), None);
        assert_eq!(limited_size(7680, 4320, cap), Some((3840, 2160)));
        let (w, h) = limited_size(8192, 8192, cap).unwrap();
        assert!(
            u64::from(w) * u64::from(h) <= cap && w == h && w % 2 == 0,
            "{w}x{h}"
        );
        let (w, h) = limited_size(10_000, 31, 4096).unwrap();
        assert!(u64::from(w) * u64::from(h) <= 4096 && h >= 2, "{w}x{h}");
        let (w, h) = limited_size(641, 481, 64 * 64).unwrap();
        assert!(u64::from(w) * u64::from(h) <= 4096, "{w}x{h}");
        assert!((f64::from(w) / f64::from(h) - 641.0 / 481.0).abs() < 0.1);
    }
}
