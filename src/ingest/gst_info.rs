//! GStreamer start-up and what it can decode.

use std::sync::OnceLock;

use gstreamer as gst;
use gstreamer::prelude::*;
use serde::Serialize;

use super::pipeline::{is_hardware, is_nvidia, is_video_decoder};
use super::source::redact_known;

/// Rank given to nvcodec decoders so decodebin picks them over software ones.
const NVCODEC_RANK_BOOST: i32 = 10;

/// Initialises GStreamer once per process: raises nvcodec decoders above software decoders
/// when they are registered, and routes GStreamer's own debug log (enabled as usual with
/// `GST_DEBUG`) through the credential redactor into `tracing` at debug level, target
/// `gstreamer` (see it with `DFWATCH_LOG=info,gstreamer=debug`). Nothing GStreamer logs
/// reaches stderr unredacted.
pub fn init() -> Result<(), String> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        gst::init().map_err(|e| format!("GStreamer failed to initialise: {e}"))?;
        prefer_nvcodec();
        {
            gst::log::remove_default_log_function();
            gst::log::add_log_function(|cat, level, file, _func, line, _obj, msg| {
                let Some(text) = msg.get() else { return };
                let text = redact_known(text.as_str());
                tracing::debug!(
                    target: "gstreamer",
                    category = cat.name(),
                    level = ?level,
                    at = %format!("{file}:{line}"),
                    "{text}"
                );
            });
        }
        Ok(())
    })
    .clone()
}

fn prefer_nvcodec() {
    let registry = gst::Registry::get();
    for f in gst::ElementFactory::factories_with_type(
        gst::ElementFactoryType::DECODER | gst::ElementFactoryType::MEDIA_VIDEO,
        gst::Rank::NONE,
    ) {
        if is_nvidia(&f) {
            let boosted = gst::Rank::PRIMARY + NVCODEC_RANK_BOOST;
            if f.rank() < boosted {
                f.set_rank(boosted);
                tracing::info!(decoder = %f.name(), "Preferring NVIDIA decoder.");
            }
        }
    }
    drop(registry);
}

/// One video decoder GStreamer can use.
#[derive(Debug, Clone, Serialize)]
pub struct DecoderInfo {
    pub name: String,
    /// Input caps it accepts, e.g. `video/x-h264`.
    pub codecs: Vec<String>,
    pub rank: i32,
    pub hardware: bool,
}

/// What the local GStreamer offers.
#[derive(Debug, Clone, Serialize)]
pub struct GstInfo {
    pub version: String,
    /// Video decoders by descending rank (the order decodebin tries them in).
    pub decoders: Vec<DecoderInfo>,
    /// Whether NVIDIA's nvcodec decoders are registered.
    pub nvcodec: bool,
}

/// Lists GStreamer's version and video decoders.
pub fn info() -> Result<GstInfo, String> {
    init()?;
    let mut decoders: Vec<DecoderInfo> = gst::ElementFactory::factories_with_type(
        gst::ElementFactoryType::DECODER | gst::ElementFactoryType::MEDIA_VIDEO,
        gst::Rank::MARGINAL,
    )
    .into_iter()
    .filter(is_video_decoder)
    .map(|f| {
        let codecs = f
            .static_pad_templates()
            .iter()
            .filter(|t| t.direction() == gst::PadDirection::Sink)
            .flat_map(|t| {
                let caps = t.caps();
                caps.iter()
                    .map(|s| s.name().to_string())
                    .collect::<Vec<_>>()
            })
            .collect();
        DecoderInfo {
            name: f.name().to_string(),
            codecs,
            rank: i32::from(f.rank()),
            hardware: is_hardware(&f),
        }
    })
    .collect();
    decoders.sort_by(|a, b| b.rank.cmp(&a.rank).then(a.name.cmp(&b.name)));
    let nvcodec = decoders.iter().any(|d| d.name.starts_with("nv"));
    Ok(GstInfo {
        version: gst::version_string().to_string(),
        decoders,
        nvcodec,
    })
}
