//! Every metric family of `/metrics`, written from a snapshot of the daemon
//! ([`NodeSample`]) that the HTTP handler takes under its locks.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{AnalysisMetrics, Exposition, StreamMetrics};
use crate::ingest::{StreamStats, StreamStatus};
use crate::publish::payload::ModelInfo;
use crate::publish::publisher::PublisherStats;

/// One stream's numbers, read once per request.
pub struct StreamSample<'a> {
    pub id: String,
    pub status: StreamStatus,
    pub stats: StreamStats,
    /// Frames evicted from the stream's queue because the face stage fell behind.
    pub analysis_behind: u64,
    pub analysis: &'a StreamMetrics,
}

/// The daemon's numbers, read once per request.
pub struct NodeSample<'a> {
    pub model: &'a ModelInfo,
    pub uptime: Duration,
    pub streams: Vec<StreamSample<'a>>,
    pub analysis: &'a AnalysisMetrics,
    pub encode_queue_len: usize,
    pub publisher: PublisherStats,
    pub publisher_restarts: u64,
    /// Each webhook's counters.
    pub webhooks: Vec<crate::publish::publisher::WebhookStats>,
    /// The event store's counters and gauges.
    pub events: &'a crate::events::StoreMetrics,
}

/// Every family of the node's stages, added to `e` (the HTTP surface adds its own:
/// `http::metrics`).
pub fn render(e: &mut Exposition, n: &NodeSample<'_>) {
    let model = n.model;
    e.family(
        "dfwatch_build_info",
        "gauge",
        "Build and model identity (value 1).",
    )
    .sample(
        "dfwatch_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("model", &model.name),
            ("model_version", &model.version),
            ("model_sha256", &model.manifest_sha256),
            ("trained", if model.trained { "true" } else { "false" }),
            ("backend", &model.backend),
        ],
        1.0,
    );
    e.family(
        "dfwatch_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
    )
    .sample("dfwatch_uptime_seconds", &[], n.uptime.as_secs_f64());
    let rows = &n.streams;
    e.family(
        "dfwatch_stream_up",
        "gauge",
        "1 while the stream delivers frames (state online).",
    );
    for r in rows {
        let up = r.status.state == crate::ingest::StreamState::Online;
        e.sample(
            "dfwatch_stream_up",
            &[("stream", &r.id), ("state", r.status.state.as_str())],
            if up { 1.0 } else { 0.0 },
        );
    }
    e.family(
        "dfwatch_frames_dropped_total",
        "counter",
        "Frames lost, by reason.",
    );
    for r in rows {
        for (reason, n) in r.stats.drops() {
            e.sample(
                "dfwatch_frames_dropped_total",
                &[("stream", &r.id), ("reason", reason)],
                n as f64,
            );
        }
        e.sample(
            "dfwatch_frames_dropped_total",
            &[("stream", &r.id), ("reason", "analysis_behind")],
            r.analysis_behind as f64,
        );
    }
    // One value per stream: (name, help, value). Kind: counter for `_total`, else gauge.
    type Pick = fn(&StreamSample) -> f64;
    let per_stream: [(&str, &str, Pick); 14] = [
        (
            "dfwatch_stream_reconnects_total",
            "Re-establishments after a loss.",
            |r| r.status.reconnects as f64,
        ),
        (
            "dfwatch_frames_decoded_total",
            "Frames out of the decoder.",
            |r| r.stats.frames_decoded as f64,
        ),
        (
            "dfwatch_frames_sampled_out_total",
            "Frames skipped by the analysis rate (by design, not a loss).",
            |r| r.stats.frames_sampled_out as f64,
        ),
        (
            "dfwatch_frames_analysed_total",
            "Frames the face stage processed.",
            |r| r.analysis.frames_analysed.get() as f64,
        ),
        (
            "dfwatch_detector_full_runs_total",
            "Frames the detector searched whole (every track.detect_every analysed frames, and after a track was not found where predicted).",
            |r| r.analysis.detector_runs.get() as f64,
        ),
        (
            "dfwatch_detector_around_runs_total",
            "Frames the detector searched only around the tracks' predicted positions.",
            |r| r.analysis.detector_around_runs.get() as f64,
        ),
        (
            "dfwatch_faces_detected_total",
            "Faces found by the detector.",
            |r| r.analysis.faces_detected.get() as f64,
        ),
        (
            "dfwatch_faces_due_total",
            "Faces the tracker scheduled for scoring.",
            |r| r.analysis.faces_due.get() as f64,
        ),
        ("dfwatch_faces_scored_total", "Faces scored.", |r| {
            r.analysis.faces_scored.get() as f64
        }),
        (
            "dfwatch_faces_dropped_total",
            "Due faces evicted from the full encode queue.",
            |r| r.analysis.faces_dropped_encode_queue.get() as f64,
        ),
        (
            "dfwatch_faces_crop_failed_total",
            "Due faces that could not be cropped.",
            |r| r.analysis.faces_crop_failed.get() as f64,
        ),
        (
            "dfwatch_detector_errors_total",
            "Frames on which face detection failed.",
            |r| r.analysis.detector_errors.get() as f64,
        ),
        ("dfwatch_tracks", "Live face tracks.", |r| {
            r.analysis.tracks_live.load(Ordering::Relaxed) as f64
        }),
        (
            "dfwatch_coverage_ratio",
            "Faces scored / faces due for scoring, since start.",
            |r| r.analysis.coverage(),
        ),
    ];
    for (name, help, pick) in per_stream {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        e.family(name, kind, help);
        for r in rows {
            e.sample(name, &[("stream", &r.id)], pick(r));
        }
    }
    e.family(
        "dfwatch_stage_cpu_seconds_total",
        "counter",
        "CPU time of the face stage, by step.",
    );
    for r in rows {
        for (stage, ns) in [
            ("detect", r.analysis.detect_ns.get()),
            ("crop", r.analysis.crop_ns.get()),
        ] {
            e.sample(
                "dfwatch_stage_cpu_seconds_total",
                &[("stream", &r.id), ("stage", stage)],
                ns as f64 * 1e-9,
            );
        }
    }
    let a = n.analysis;
    e.family(
        "dfwatch_encode_batch_size",
        "histogram",
        "Crops per encoder batch (one observation per face).",
    );
    e.histogram("dfwatch_encode_batch_size", &[], &a.batch_size);
    e.family(
        "dfwatch_inference_seconds",
        "histogram",
        "Wall time of one encoder batch.",
    );
    e.histogram("dfwatch_inference_seconds", &[], &a.inference_seconds);
    e.family(
        "dfwatch_decode_to_publish_seconds",
        "histogram",
        "From a frame leaving the decoder to its face's decision (alerts handed to the publisher).",
    );
    e.histogram(
        "dfwatch_decode_to_publish_seconds",
        &[],
        &a.decode_to_publish_seconds,
    );
    e.family(
        "dfwatch_encode_queue_length",
        "gauge",
        "Crops waiting for the encoder.",
    )
    .sample(
        "dfwatch_encode_queue_length",
        &[],
        n.encode_queue_len as f64,
    );
    e.family(
        "dfwatch_score_errors_total",
        "counter",
        "Embeddings the scorer refused.",
    )
    .sample(
        "dfwatch_score_errors_total",
        &[],
        a.score_errors.get() as f64,
    );
    e.family(
        "dfwatch_alerts_total",
        "counter",
        "Alert events handed to the publisher, by type and verdict.",
    );
    for ((kind, verdict), count) in a.alerts.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        e.sample(
            "dfwatch_alerts_total",
            &[("type", kind), ("verdict", verdict)],
            *count as f64,
        );
    }
    let p = &n.publisher;
    e.family(
        "dfwatch_broker_connected",
        "gauge",
        "1 while connected to the MQTT broker.",
    )
    .sample(
        "dfwatch_broker_connected",
        &[],
        if p.connected { 1.0 } else { 0.0 },
    );
    e.family(
        "dfwatch_spool_pending",
        "gauge",
        "Alerts in the durable spool awaiting the broker's acknowledgement.",
    )
    .sample("dfwatch_spool_pending", &[], p.pending as f64);
    e.family(
        "dfwatch_mqtt_published_total",
        "counter",
        "Alert publishes handed to the broker connection (re-sends included).",
    )
    .sample("dfwatch_mqtt_published_total", &[], p.published as f64);
    e.family(
        "dfwatch_mqtt_acked_total",
        "counter",
        "Alerts the broker acknowledged.",
    )
    .sample("dfwatch_mqtt_acked_total", &[], p.acked as f64);
    e.family(
        "dfwatch_mqtt_reconnects_total",
        "counter",
        "Broker connection losses followed by a retry.",
    )
    .sample("dfwatch_mqtt_reconnects_total", &[], p.reconnects as f64);
    e.family(
        "dfwatch_mqtt_connect_failures_total",
        "counter",
        "Broker connection attempts that failed before the CONNACK (refused, timed out, malformed answers).",
    )
    .sample(
        "dfwatch_mqtt_connect_failures_total",
        &[],
        p.connect_failures as f64,
    );
    e.family(
        "dfwatch_stage_restarts_total",
        "counter",
        "Panics a stage caught and went on from (after a backoff), by stage.",
    );
    for (stage, count) in [
        ("publisher", n.publisher_restarts),
        ("encoder", a.encoder_restarts.count()),
        ("decide", a.decide_restarts.count()),
    ] {
        e.sample(
            "dfwatch_stage_restarts_total",
            &[("stage", stage)],
            count as f64,
        );
    }
    for r in rows {
        e.sample(
            "dfwatch_stage_restarts_total",
            &[("stage", "faces"), ("stream", &r.id)],
            r.analysis.restarts.count() as f64,
        );
    }
    let sp = &p.spool;
    e.family(
        "dfwatch_spool_durable",
        "gauge",
        "1 while the spool's writes reach the disk; 0 while the disk refuses them (alerts still go to the broker).",
    )
    .sample(
        "dfwatch_spool_durable",
        &[],
        if p.durable { 1.0 } else { 0.0 },
    );
    e.family(
        "dfwatch_spool_bytes",
        "gauge",
        "Bytes held by alerts awaiting the broker (capped by mqtt.spool_max_bytes).",
    )
    .sample("dfwatch_spool_bytes", &[], sp.bytes as f64);
    e.family(
        "dfwatch_spool_dropped_total",
        "counter",
        "Alert events dropped from the spool before the broker took them, by reason (update, ended_alert, open_new: over the byte cap, in that order; age).",
    );
    for (reason, n) in sp.dropped() {
        e.sample(
            "dfwatch_spool_dropped_total",
            &[("reason", reason.as_str())],
            n as f64,
        );
    }
    for (name, help, v) in [
        (
            "dfwatch_spool_write_errors_total",
            "Spool writes and compactions the disk refused.",
            p.spool_write_errors,
        ),
        (
            "dfwatch_spool_coalesced_total",
            "Updates that replaced an older pending update of the same alert.",
            sp.coalesced,
        ),
        (
            "dfwatch_spool_damaged_bytes_total",
            "Damaged bytes skipped when the spool was replayed at start (intact records around them were recovered).",
            sp.damaged_bytes_skipped,
        ),
    ] {
        e.family(name, "counter", help).sample(name, &[], v as f64);
    }
    type PickHook = fn(&crate::publish::publisher::WebhookStats) -> f64;
    let hooks: [(&str, &str, &str, PickHook); 5] = [
        (
            "dfwatch_webhook_delivered_total",
            "counter",
            "Alert events a webhook took (2xx).",
            |w| w.delivered as f64,
        ),
        (
            "dfwatch_webhook_retries_total",
            "counter",
            "Webhook attempts that failed and were tried again (network, timeout, 5xx, 401/403/404, redirects: anything but 2xx and the refusals).",
            |w| w.retried as f64,
        ),
        (
            "dfwatch_webhook_refused_total",
            "counter",
            "Alert events given up for good: refused by the receiver (400, 409, 413, 415, 422) or still failing after give_up_after.",
            |w| w.refused as f64,
        ),
        (
            "dfwatch_webhook_given_up_total",
            "counter",
            "Alert events a webhook's cap (max_owed) gave up unsent.",
            |w| w.given_up as f64,
        ),
        (
            "dfwatch_webhook_owed",
            "gauge",
            "Alert events a webhook still owes.",
            |w| w.owed as f64,
        ),
    ];
    for (name, kind, help, pick) in hooks {
        e.family(name, kind, help);
        for w in &n.webhooks {
            e.sample(name, &[("webhook", &w.name)], pick(w));
        }
    }
    let ev = n.events;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    for (name, kind, help, v) in [
        (
            "dfwatch_events_written_total",
            "counter",
            "Alert events written to the event store.",
            ev.written.get() as f64,
        ),
        (
            "dfwatch_events_dropped_total",
            "counter",
            "Alert events not in the event store because its writer's queue was full.",
            ev.dropped.get() as f64,
        ),
        (
            "dfwatch_events_write_errors_total",
            "counter",
            "Event store database calls that failed, writes and API reads alike (full disk, I/O error, damage).",
            ev.write_errors.get() as f64,
        ),
        (
            "dfwatch_events_db_resets_total",
            "counter",
            "Times a damaged event database was moved aside and a fresh one started.",
            ev.resets.get() as f64,
        ),
        (
            "dfwatch_events_deleted_total",
            "counter",
            "Events deleted through the API.",
            ev.deleted.get() as f64,
        ),
        (
            "dfwatch_events_media_written_total",
            "counter",
            "Evidence media (snapshots, face crops) stored.",
            ev.media_written.get() as f64,
        ),
        (
            "dfwatch_events",
            "gauge",
            "Events in the event store.",
            load(&ev.events),
        ),
        (
            "dfwatch_events_media_bytes",
            "gauge",
            "Bytes of evidence media in the event store (at most events.max_media_bytes).",
            load(&ev.media_bytes),
        ),
        (
            "dfwatch_events_held_frames",
            "gauge",
            "Frames the decision stage holds for snapshots (at most events.held_frames).",
            load(&n.analysis.held_frames),
        ),
    ] {
        e.family(name, kind, help).sample(name, &[], v);
    }
    e.family(
        "dfwatch_events_pruned_total",
        "counter",
        "What the event store's bounds removed: age (events past events.max_age), count (events past events.max_events), media (snapshots and crops of the oldest events, for events.max_media_bytes), too_large (one item larger than the cap), updates (old updates of long alerts, past events.max_updates), size (the oldest events, for events.max_db_bytes).",
    );
    for (reason, a) in [
        ("age", &ev.pruned_age),
        ("count", &ev.pruned_count),
        ("media", &ev.pruned_media),
        ("too_large", &ev.pruned_media_too_large),
        ("updates", &ev.pruned_updates),
        ("size", &ev.pruned_size),
    ] {
        e.sample(
            "dfwatch_events_pruned_total",
            &[("reason", reason)],
            load(a),
        );
    }
    e.family(
        "dfwatch_events_media_dropped_total",
        "counter",
        "Evidence media not stored: held_frames (a track got no held frame: events.held_frames were held), queue (too many frames waiting for the writer), encode (the JPEG failed).",
    );
    for (reason, v) in [
        ("held_frames", n.analysis.held_frames_refused.get()),
        ("queue", ev.media_dropped_queue.get()),
        ("encode", ev.media_dropped_encode.get()),
    ] {
        e.sample(
            "dfwatch_events_media_dropped_total",
            &[("reason", reason)],
            v as f64,
        );
    }
}
