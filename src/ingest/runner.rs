//! The loop that drives one stream: builds a pipeline per attempt, feeds the supervisor, and
//! publishes status changes. Runs as a tokio task (supervision only: no frame passes here).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::StreamSpec;
use super::config::EosAction;
use super::pipeline::{BusEvent, Pipeline, PipelineSpec};
use super::source::{Login, SourceKind, register_secrets};
use super::status::{IngestError, StreamCounters, StreamState, StreamStatus};
use super::supervisor::{Next, Supervisor};
use crate::channel::Sender;
use crate::types::Frame;

/// How often the runner looks at the bus, the frame counter and the clocks.
const TICK: Duration = Duration::from_millis(50);

pub(crate) async fn run(
    spec: StreamSpec,
    frames: Sender<Frame>,
    counters: Arc<StreamCounters>,
    status: watch::Sender<StreamStatus>,
    cancel: CancellationToken,
) {
    let id = spec.config.id.clone();
    let mut sup = Supervisor::new(spec.supervisor_settings(), SystemTime::now());
    let mut rng = fastrand::Rng::new();
    let publish = |sup: &Supervisor| {
        status.send_if_modified(|s| {
            if s != sup.status() {
                *s = sup.status().clone();
                true
            } else {
                false
            }
        });
    };
    if !spec.config.enabled {
        sup.disable(SystemTime::now());
        publish(&sup);
        tracing::info!(stream = %id, "Stream disabled in the config.");
        return;
    }
    let seq = Arc::new(AtomicU64::new(0));
    tracing::info!(stream = %id, source = %spec.source, "Stream starting.");
    loop {
        sup.on_attempt(Instant::now(), SystemTime::now());
        publish(&sup);
        let outcome =
            match attempt(&spec, &frames, &counters, &seq, &mut sup, &publish, &cancel).await {
                Ok(Ended::Cancelled) => {
                    sup.on_stopped(SystemTime::now());
                    publish(&sup);
                    return;
                }
                Ok(Ended::Finished) => {
                    sup.on_finished(SystemTime::now());
                    publish(&sup);
                    tracing::info!(stream = %id, "File finished; stream offline.");
                    return;
                }
                Err(e) => e,
            };
        let kind = outcome.kind();
        let message = outcome.to_string();
        match sup.on_failure(outcome, Instant::now(), SystemTime::now(), rng.f64()) {
            Next::GiveUp if sup.state() == StreamState::Failed => {
                publish(&sup);
                tracing::error!(
                    stream = %id, kind, error = %message,
                    "Stream refused by policy; failed, not retried (fix the config, then reload \
                     or re-add the stream)."
                );
                return;
            }
            Next::GiveUp => {
                publish(&sup);
                tracing::error!(stream = %id, kind, error = %message, "Stream failed for good; offline.");
                return;
            }
            Next::RetryAfter(wait) => {
                publish(&sup);
                tracing::warn!(
                    stream = %id, kind, error = %message,
                    retry_in_ms = wait.as_millis() as u64,
                    "Stream lost; reconnecting."
                );
                if sup.state() == StreamState::Stalled {
                    sup.on_retry_wait(SystemTime::now());
                    // Show "stalled" for a moment before "reconnecting".
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = tokio::time::sleep(TICK) => {}
                    }
                    publish(&sup);
                }
                tokio::select! {
                    _ = cancel.cancelled() => {
                        sup.on_stopped(SystemTime::now());
                        publish(&sup);
                        return;
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

enum Ended {
    Cancelled,
    Finished,
}

async fn attempt(
    spec: &StreamSpec,
    frames: &Sender<Frame>,
    counters: &Arc<StreamCounters>,
    seq: &Arc<AtomicU64>,
    sup: &mut Supervisor,
    publish: &impl Fn(&Supervisor),
    cancel: &CancellationToken,
) -> Result<Ended, IngestError> {
    let credentials = spec.config.credentials.clone();
    let login = tokio::task::spawn_blocking(move || Login::resolve(credentials.as_ref()))
        .await
        .map_err(|e| {
            IngestError::Credentials(crate::ingest::source::LoginError::File {
                path: "credentials".into(),
                reason: format!("the reader failed: {e}"),
            })
        })??;
    register_secrets(&login);
    let pspec = PipelineSpec {
        stream: spec.config.id.clone(),
        source: spec.source.clone(),
        fps: spec.fps,
        format: spec.format,
        decoder: spec.decoder,
        sync: spec.source.kind == SourceKind::File && spec.config.realtime,
        rtsp_latency: spec.rtsp_latency,
        rtsp_transport: spec.config.rtsp_transport,
        login,
        max_pixels: spec.ingest.max_pixels,
        child_schemes: spec.ingest.child_schemes.clone(),
    };
    let pipeline = Pipeline::start(pspec, frames.clone(), counters.clone(), seq.clone())?;
    let result = watch_pipeline(spec, &pipeline, sup, publish, cancel).await;
    // Dropping tears the pipeline down on a helper thread.
    drop(pipeline);
    result
}

async fn watch_pipeline(
    spec: &StreamSpec,
    pipeline: &Pipeline,
    sup: &mut Supervisor,
    publish: &impl Fn(&Supervisor),
    cancel: &CancellationToken,
) -> Result<Ended, IngestError> {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = pipeline.frames_delivered();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(Ended::Cancelled),
            _ = tick.tick() => {}
        }
        if let Some(d) = pipeline.decoder()
            && sup.status().decoder.as_deref() != Some(d.as_str())
        {
            tracing::info!(stream = %spec.config.id, decoder = %d, "Decoder chosen.");
            sup.on_decoder(&d);
        }
        let delivered = pipeline.frames_delivered();
        if delivered != seen {
            seen = delivered;
            let was = sup.state();
            sup.on_frame(Instant::now(), SystemTime::now());
            if was != StreamState::Online {
                tracing::info!(stream = %spec.config.id, "Stream online.");
            }
        }
        while let Some(ev) = pipeline.poll_bus() {
            match ev {
                BusEvent::Error(e) => return Err(e),
                BusEvent::Eos if spec.source.kind != SourceKind::File => {
                    return Err(IngestError::EndOfStream);
                }
                BusEvent::Eos => match spec.config.on_eos {
                    EosAction::Stop => return Ok(Ended::Finished),
                    EosAction::Loop => {
                        tracing::debug!(stream = %spec.config.id, "File ended; looping.");
                        pipeline.rewind()?;
                    }
                },
            }
        }
        if let Some(e) = sup.poll(Instant::now()) {
            return Err(e);
        }
        publish(sup);
    }
}
