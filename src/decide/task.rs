//! The decision stage's task: a thin loop that feeds the [`Decider`] and hands what it
//! returns to the publisher, in order (waiting only for room in the publisher's queue, not
//! for each fsync).

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot};

use super::{Decider, Output, Scoring};
use crate::channel::Receiver;
use crate::encode::Encoded;
use crate::events::{Change, EventStore, Incoming};
use crate::evidence::EvidenceConfig;
use crate::metrics::AnalysisMetrics;
use crate::publish::publisher::PublisherHandle;
use crate::types::{FaceEvent, FaceMeta};

/// What the decision stage reads: embeddings and face-stage events, in queue order.
pub type Input = Encoded<FaceMeta, FaceEvent>;

/// Requests from the daemon beside the ordered input.
#[derive(Debug)]
pub enum Command {
    /// A new model. The old encoder has stopped: what it left in the input is decided with
    /// the old model first, then every open alert ends (`model_swapped`) and the scorer is
    /// replaced; `done` is answered after, so the new encoder starts only then.
    ModelSwapped {
        scoring: Box<Scoring>,
        done: oneshot::Sender<()>,
    },
    /// New decision thresholds.
    Evidence(EvidenceConfig),
}

/// Runs until the input closes (every encoder and face stage gone); then ends every open
/// alert (`stream_stopped`).
pub async fn run(
    mut decider: Decider,
    input: Receiver<Input>,
    mut commands: mpsc::Receiver<Command>,
    sinks: Sinks,
    metrics: Arc<AnalysisMetrics>,
) {
    let publisher = &sinks;
    let mut commands_open = true;
    loop {
        tokio::select! {
            // The ordered input first: a model swap waits for what is already queued.
            biased;
            item = input.recv_async() => {
                let Some(item) = item else { break };
                decide(&mut decider, item, publisher, &metrics).await;
            }
            cmd = commands.recv(), if commands_open => {
                match cmd {
                    None => commands_open = false,
                    Some(Command::ModelSwapped { scoring, done }) => {
                        while let Some(item) = input.try_recv() {
                            decide(&mut decider, item, publisher, &metrics).await;
                        }
                        let (name, sha) = (scoring.model.name.clone(), scoring.model.manifest_sha256.clone());
                        hand_over(publisher, decider.on_model_swap(*scoring, SystemTime::now())).await;
                        tracing::info!(model = %name, sha256 = %sha, "Model swapped in; open evidence windows ended.");
                        let _ = done.send(());
                    }
                    Some(Command::Evidence(cfg)) => {
                        decider.set_evidence(cfg);
                        tracing::info!("Evidence thresholds updated.");
                    }
                }
            }
        }
    }
    hand_over(publisher, decider.finish(SystemTime::now())).await;
}

/// One input item through the decider; the latency of a face is measured once its outputs
/// are handed over.
async fn decide(decider: &mut Decider, item: Input, publisher: &Sinks, metrics: &AnalysisMetrics) {
    // Supervised per item: a panic costs that item (counted, reported) and the stage goes on
    // with its state.
    let mono = match &item {
        Encoded::Face(e) => Some(e.meta.mono),
        Encoded::Pass(_) => None,
    };
    let out = crate::fault::catch(|| {
        crate::fault::inject("decide");
        match item {
            Encoded::Face(e) => decider.on_embedding(e, SystemTime::now()),
            Encoded::Pass(ev) => decider.on_face_event(ev, SystemTime::now()),
        }
    });
    match out {
        Ok(out) => hand_over(publisher, out).await,
        Err(why) => {
            let wait = metrics
                .decide_restarts
                .record("decide", &format!("a panic: {why}"));
            tokio::time::sleep(wait).await;
            return;
        }
    }
    if let Some(mono) = mono {
        metrics
            .decode_to_publish_seconds
            .observe_duration(mono.elapsed());
    }
}

/// Where the decision stage's outputs go: the publisher (spool, MQTT, webhooks) and the
/// event store (history and media).
pub struct Sinks {
    pub publisher: Arc<PublisherHandle>,
    pub store: EventStore,
    /// Each stream's latest verdict summary, for the HTTP API.
    pub verdicts: Arc<super::VerdictBoard>,
}

/// Hands outputs to the publisher in order, and alert events to the event store (which
/// never blocks).
pub async fn hand_over(sinks: &Sinks, outputs: Vec<Output>) {
    let publisher = &sinks.publisher;
    for o in outputs {
        match o {
            Output::Alert {
                alert_id,
                kind,
                stream,
                track,
                payload,
                verdict,
                sentence,
                score,
                face_jpeg,
                media,
            } => {
                let facts = crate::events::Facts {
                    verdict,
                    score,
                    sentence: sentence.clone(),
                    end_reason: kind.end_reason().map(|r| r.as_str()),
                };
                let kind = kind.change();
                let change = Change::from(kind);
                sinks.store.record(Incoming {
                    alert_id: alert_id.clone(),
                    change,
                    stream: stream.to_string(),
                    track: track.0,
                    at: SystemTime::now(),
                    payload: payload.clone(),
                    facts,
                    media,
                });
                if let Err(e) = publisher.enqueue_alert(&alert_id, kind, payload).await {
                    tracing::error!(alert_id = %alert_id, error = %e, "Alert not handed to the publisher.");
                }
                let _ = publisher
                    .publish_alert_event(&stream, kind, &alert_id, &sentence, score)
                    .await;
                if let Some(jpeg) = face_jpeg {
                    tracing::debug!(alert_id = %alert_id, bytes = jpeg.len(), "Face crop handed to the publisher.");
                    let _ = publisher.publish_face_crop(&alert_id, jpeg).await;
                }
            }
            Output::Verdict(v) => {
                sinks.verdicts.set(&v);
                let topic = crate::publish::mqtt::stream_suffix(&v.stream, "verdict");
                match serde_json::to_vec(&v) {
                    Ok(payload) => {
                        let _ = publisher.publish_retained(&topic, payload).await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "Verdict summary could not be serialised.")
                    }
                }
            }
        }
    }
}
