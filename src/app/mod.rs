//! The daemon: the only module that knows the whole graph. It creates the channels, spawns
//! the stages, owns shutdown and (later) reload.
//!
//! Wired so far: ingest, and MQTT (the embedded broker when configured, the node's retained
//! status with its last will, each stream's retained status). The analysis stages (detect,
//! crop, encode, score, evidence) are built as modules but not yet wired, and the daemon says
//! so at start and in every status line: frames are decoded, counted and discarded.

pub mod score_images;

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ingest::{self, StreamHandle};
use crate::types::Frame;

/// How often a summary line per stream is logged.
const STATUS_EVERY: Duration = Duration::from_secs(30);

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    tracing::info!(
        node = %config.node.id,
        streams = config.streams.len(),
        "dfwatch starting."
    );
    tracing::warn!(
        "The analysis stages (detect, crop, encode, score, evidence) are not wired into the \
         daemon yet: this build decodes and counts frames, publishes statuses, and raises no \
         alerts."
    );
    let cancel = CancellationToken::new();
    let mut mqtt_cfg = config.mqtt.clone();
    if mqtt_cfg.embedded {
        let listen = mqtt_cfg.embedded_listen;
        if let Err(e) = crate::publish::broker::start_embedded(listen) {
            // Debian's mosquitto package starts a broker on 127.0.0.1:1883: publish to it
            // rather than fail, so the zero-set-up run still works and mosquitto_sub sees us.
            if std::net::TcpStream::connect(listen).is_ok() {
                tracing::warn!(
                    listen = %listen,
                    "A broker already listens there; publishing to it instead of starting the \
                     embedded one."
                );
            } else {
                return Err(e.into());
            }
        }
        mqtt_cfg.url = format!("mqtt://{listen}");
    }
    let spool_dir = match &mqtt_cfg.spool_dir {
        Some(p) if p.is_absolute() => p.clone(),
        Some(p) => config.base_dir.join(p),
        None => std::path::PathBuf::from("var/spool"),
    };
    let publisher = std::sync::Arc::new(
        crate::publish::mqtt::spawn(&mqtt_cfg, &config.node.id, &spool_dir)
            .context("starting the MQTT publisher")?,
    );
    tracing::info!(url = %mqtt_cfg.url, prefix = %mqtt_cfg.prefix, "MQTT publisher started.");
    let mut streams: Vec<StreamHandle> = Vec::new();
    let mut sinks = Vec::new();
    let mut forwarders = Vec::new();
    for s in &config.streams {
        let (tx, rx) = config
            .ingest
            .queue
            .channel::<Frame>(format!("frames-{}", s.id));
        let handle = ingest::spawn_stream(s, &config.ingest, &config.base_dir, tx)
            .with_context(|| format!("stream {}", s.id))?;
        // Each status change goes out retained on <prefix>/<node>/streams/<id>/status.
        let mut status = handle.subscribe();
        let publisher = publisher.clone();
        let topic = format!("streams/{}/status", s.id);
        forwarders.push(tokio::spawn(async move {
            loop {
                let json = serde_json::to_vec(&*status.borrow_and_update()).unwrap_or_default();
                if publisher.publish_retained(&topic, json).await.is_err()
                    || status.changed().await.is_err()
                {
                    break;
                }
            }
        }));
        // Stand-in for the detector until it exists: takes frames so the queue keeps moving.
        sinks.push(tokio::spawn(async move {
            while let Some(frame) = rx.recv_async().await {
                drop(frame);
            }
        }));
        streams.push(handle);
    }
    let mut every = tokio::time::interval(STATUS_EVERY);
    every.tick().await;
    let signal = shutdown_signal(cancel.clone());
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => break,
            _ = every.tick() => {
                for h in &streams {
                    let st = h.status();
                    let stats = h.stats();
                    tracing::info!(
                        stream = %h.id(),
                        state = st.state.as_str(),
                        decoder = st.decoder.as_deref().unwrap_or("-"),
                        reconnects = st.reconnects,
                        frames_delivered = stats.frames_delivered,
                        frames_dropped = stats.frames_dropped_queue_full + stats.frames_dropped_invalid,
                        last_error = st.last_error.as_ref().map(|e| e.message.as_str()).unwrap_or("-"),
                        "Stream status (frames are not analysed yet)."
                    );
                }
            }
        }
    }
    tracing::info!("Stopping streams.");
    for h in streams {
        h.stop().await;
    }
    for s in sinks {
        let _ = s.await;
    }
    // The streams are gone, so their status forwarders end (publishing the final status).
    for f in forwarders {
        let _ = f.await;
    }
    match std::sync::Arc::try_unwrap(publisher) {
        Ok(p) => p.stop(Duration::from_secs(3)).await,
        Err(_) => tracing::warn!("MQTT publisher still in use at shutdown."),
    }
    tracing::info!("dfwatch stopped.");
    Ok(())
}

async fn shutdown_signal(cancel: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot listen for SIGTERM.");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received."),
        _ = term => tracing::info!("SIGTERM received."),
        _ = cancel.cancelled() => {}
    }
}
