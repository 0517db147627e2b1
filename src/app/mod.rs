//! The daemon: the only module that knows the whole graph. A [`Daemon`] is started (model,
//! publisher, the shared stages, HTTP, streams), serves its supervisor loop (signals, API
//! commands, watchdog), reloads, and stops.
//!
//! ```text
//! ingest (per stream, drop oldest) -> faces::FaceStage (one OS thread per stream)
//!   -> encode queue (shared, drop oldest; track ends never dropped)
//!   -> encoder (one OS thread: batches on the shared ONNX pool, or, with
//!      model.backend = "cuda", owns the GPU: upload, crop, encode)
//!   -> embeddings (bounded, blocks the encoder)
//!   -> decide::task (one tokio task around the Decider) -> publisher (back-pressure)
//! ```
//!
//! Shutdown (SIGTERM or SIGINT), bounded by `node.shutdown_grace`: ingest stops, the face
//! stages finish the frames they hold and send their streams' ends, the encoder its batch,
//! the decision task ends every open alert (`stream_stopped`) and hands it to the publisher,
//! which flushes what it can and publishes `stopped`; what the broker has not acknowledged
//! stays in the spool for the next start.
//!
//! Reload (SIGHUP or `POST /api/reload`): the config file is read and validated again; on any
//! error nothing changes. Streams that were added, removed or changed start, stop or restart;
//! the others are not touched. Streams added through the API are runtime-only and survive a
//! reload unless the file now defines the same id. New evidence thresholds apply at once. A
//! new model bundle is loaded and checked first, then swapped in: the encoder thread is
//! replaced and every open evidence window ends (`model_swapped`).

pub mod systemd;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::http::state::{AppState, Command, CommandError, ReloadReport, StreamView};

use crate::channel::{Receiver, Sender};
use crate::config::Config;
use crate::decide::Decider;
use crate::decide::task::{self as decision, Input};
use crate::detect::FaceDetector;
use crate::encode::BatchEncoder;
use crate::evidence::UlidGenerator;
use crate::faces::{CropSpec, EncodeItem, FaceStage};
use crate::ingest::{self, StreamConfig, StreamHandle};
use crate::metrics::{AnalysisMetrics, StreamMetrics};
use crate::publish::publisher::PublisherHandle;
use crate::types::{Frame, StreamId};

/// How often a summary line per stream is logged.
const STATUS_EVERY: Duration = Duration::from_secs(30);
/// How often an untrained model is announced again.
const UNTRAINED_EVERY: Duration = Duration::from_secs(600);
/// API requests waiting for the supervisor loop (callers wait for room; each is answered
/// within one loop turn, so the size only bounds memory).
const API_COMMANDS: usize = 16;
/// Model swaps and threshold changes waiting for the decision task (each is awaited).
const DECISION_COMMANDS: usize = 4;

use crate::runtime::{
    EngineChoice, LoadedModel, announce_untrained, bundle_dir, load_model_off_loop,
};
pub use crate::types::state_dir;

/// A running encoder thread.
struct EncoderThread {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

fn spawn_encoder(
    encoder: Box<dyn BatchEncoder>,
    cfg: &crate::encode::EncoderConfig,
    jobs: Receiver<EncodeItem>,
    out: Sender<Input>,
    metrics: Arc<AnalysisMetrics>,
) -> anyhow::Result<EncoderThread> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let cfg = cfg.clone();
    let thread = std::thread::Builder::new()
        .name("encoder".into())
        .spawn(move || {
            let failed = crate::encode::run_encoder_until(
                encoder,
                &cfg,
                jobs,
                out,
                &flag,
                &metrics.encoder_restarts,
                &mut |_, dt| metrics.inference_seconds.observe_duration(dt),
            );
            if failed > 0 {
                tracing::warn!(faces = failed, "Encoder batches failed during this run.");
            }
        })?;
    Ok(EncoderThread { stop, thread })
}

/// One running stream and its face stage.
struct RunningStream {
    config: StreamConfig,
    handle: StreamHandle,
    face_stop: Arc<AtomicBool>,
    face_thread: std::thread::JoinHandle<()>,
    forwarder: tokio::task::JoinHandle<()>,
}

/// What starting a stream needs, shared by all of them.
struct StreamFactory {
    config: Config,
    crop: CropSpec,
    /// Faces go to the encoder aligned, for its device to crop (GPU backend).
    device_crop: bool,
    encode: Sender<EncodeItem>,
    /// For the encoder of a swapped-in model.
    encode_rx: Receiver<EncodeItem>,
    publisher: Arc<PublisherHandle>,
}

impl StreamFactory {
    /// The face detector for a new stream (a few ONNX sessions: not on the async runtime's
    /// hot path for API calls, see [`Daemon::begin_add_stream`]).
    fn detector(&self, id: &StreamId) -> anyhow::Result<FaceDetector> {
        FaceDetector::load(&self.config.detect, &self.config.base_dir)
            .with_context(|| format!("stream {id}: face detector"))
    }

    fn start(
        &self,
        s: &StreamConfig,
        state: &AppState,
        runtime_only: bool,
    ) -> anyhow::Result<RunningStream> {
        let detector = self.detector(&s.id)?;
        self.start_with(s, detector, state, runtime_only)
    }

    fn start_with(
        &self,
        s: &StreamConfig,
        detector: FaceDetector,
        state: &AppState,
        runtime_only: bool,
    ) -> anyhow::Result<RunningStream> {
        let (tx, rx) = self
            .config
            .ingest
            .queue
            .channel::<Frame>(format!("frames-{}", s.id));
        // Counters through a receiver: a sender kept here would hold the channel open.
        let frames_stats = {
            let rx = rx.clone();
            Box::new(move || rx.stats()) as Box<dyn Fn() -> _ + Send + Sync>
        };
        // An API stream's inner sources are held to the API's schemes, not the operator's.
        let ingest_cfg = if runtime_only {
            ingest::IngestConfig {
                child_schemes: self.config.http.api_schemes.clone(),
                ..self.config.ingest.clone()
            }
        } else {
            self.config.ingest.clone()
        };
        let handle = ingest::spawn_stream(s, &ingest_cfg, &self.config.base_dir, tx)
            .with_context(|| format!("stream {}", s.id))?;
        let metrics = Arc::new(StreamMetrics::default());
        let stage = FaceStage {
            stream: s.id.clone(),
            frames: rx,
            detector,
            track: self.config.track.clone(),
            fps: s.analysis_fps.unwrap_or(self.config.ingest.analysis_fps),
            crop: self.crop.clone(),
            publish_crops: s.publish_face_crops,
            keep_media: s.store_media,
            device_crop: self.device_crop,
            encode: self.encode.clone(),
            metrics: metrics.clone(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let face_stop = stage.stop.clone();
        let face_thread = stage.spawn()?;

        // Each status change goes out retained on <prefix>/<node>/streams/<id>/status, and
        // the stream's availability follows whether it is online.
        let mut status = handle.subscribe();
        let publisher = self.publisher.clone();
        let topic = crate::publish::mqtt::stream_suffix(&s.id, "status");
        let scope = crate::publish::mqtt::stream_scope(&s.id);
        let id = s.id.clone();
        // Until this run has judged a face, the verdict is unknown (never what an earlier
        // run left).
        let unknown = crate::decide::StreamVerdict::unknown(
            &s.id,
            state.model.read().expect("model lock").trained,
        );
        let forwarder = tokio::spawn(async move {
            // A stream of this id may have been removed before: its topics are ours again.
            let _ = publisher.allow_retained(&scope).await;
            if let Ok(v) = serde_json::to_vec(&unknown) {
                let _ = publisher
                    .publish_retained(&crate::publish::mqtt::stream_suffix(&id, "verdict"), v)
                    .await;
            }
            let _ = publisher.announce_stream(&id).await;
            let mut was_online = None;
            loop {
                let (json, online) = {
                    let st = status.borrow_and_update();
                    let online = st.state == ingest::StreamState::Online;
                    (serde_json::to_vec(&*st).unwrap_or_default(), online)
                };
                if publisher.publish_retained(&topic, json).await.is_err() {
                    break;
                }
                if was_online != Some(online) {
                    was_online = Some(online);
                    let _ = publisher.stream_online(&id, online).await;
                }
                if status.changed().await.is_err() {
                    break;
                }
            }
        });
        state.streams.write().expect("streams lock").insert(
            s.id.clone(),
            StreamView {
                config: s.clone(),
                runtime_only,
                status: handle.subscribe(),
                counters: handle.counters().clone(),
                analysis: metrics,
                frames: frames_stats,
            },
        );
        tracing::info!(stream = %s.id, uri = %crate::ingest::source::redact_known(&s.uri), runtime_only, "Stream started.");
        Ok(RunningStream {
            config: s.clone(),
            handle,
            face_stop,
            face_thread,
            forwarder,
        })
    }
}

impl RunningStream {
    /// Stops the stream for good: as [`RunningStream::stop`], then its retained status and
    /// verdict are cleared on the broker and never published again.
    async fn remove(self, state: &AppState, publisher: &PublisherHandle) {
        let scope = crate::publish::mqtt::stream_scope(&self.config.id);
        let id = self.config.id.clone();
        self.stop(state).await;
        // Home Assistant forgets the entities before their state topics empty.
        let _ = publisher.retract_stream(&id).await;
        let _ = publisher.clear_retained(&scope).await;
    }

    /// Stops ingest and the face stage; the stage's last words (its tracks' ends and the
    /// stream's end) go through the encode queue, so the decision stage ends the stream's
    /// open alerts after its last faces.
    async fn stop(self, state: &AppState) {
        let id = self.config.id.clone();
        self.handle.stop().await;
        self.face_stop.store(true, Ordering::Relaxed);
        let face = self.face_thread;
        let _ = tokio::task::spawn_blocking(move || face.join()).await;
        let _ = self.forwarder.await;
        state.streams.write().expect("streams lock").remove(&id);
        state.verdicts.remove(id.as_str());
        tracing::info!(stream = %id, "Stream stopped.");
    }
}

fn same_stream_config(a: &StreamConfig, b: &StreamConfig) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

/// An API stream whose detector was loaded off the supervisor loop.
struct PreparedStream {
    stream: StreamConfig,
    detector: anyhow::Result<FaceDetector>,
    reply: tokio::sync::oneshot::Sender<Result<(), CommandError>>,
}

/// The running daemon.
pub struct Daemon {
    config: Config,
    config_path: PathBuf,
    notifier: systemd::Notifier,
    state: Arc<AppState>,
    publisher: Arc<PublisherHandle>,
    spool_dir: PathBuf,
    metrics: Arc<AnalysisMetrics>,
    factory: StreamFactory,
    running: BTreeMap<StreamId, RunningStream>,
    encoder: Option<EncoderThread>,
    /// The encoder's output (kept to give a swapped-in encoder the same one).
    embeddings: Sender<Input>,
    decision: mpsc::Sender<decision::Command>,
    decision_task: tokio::task::JoinHandle<()>,
    commands: mpsc::Receiver<Command>,
    /// API streams whose detector is being loaded off the loop, and where they report back.
    adding: std::collections::BTreeSet<StreamId>,
    added_tx: mpsc::Sender<PreparedStream>,
    added_rx: mpsc::Receiver<PreparedStream>,
    http_cancel: CancellationToken,
    http_task: Option<tokio::task::JoinHandle<()>>,
    model_dir: PathBuf,
    model_sha: String,
}

/// Runs the daemon on `config` (read from `config_path`, re-read on reload) until SIGINT or
/// SIGTERM.
pub async fn run(config: Config, config_path: PathBuf) -> anyhow::Result<()> {
    run_until(config, config_path, CancellationToken::new()).await
}

/// [`run`] that also stops when `stop` is cancelled (benchmarks, embedding).
pub async fn run_until(
    config: Config,
    config_path: PathBuf,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut daemon = Daemon::start(config, config_path).await?;
    daemon.serve(stop).await?;
    daemon.stop().await;
    Ok(())
}

impl Daemon {
    /// Starts everything in order: model (a bad bundle stops the start with a clear error),
    /// publisher (and the embedded broker), the shared stages, HTTP, the face detector check,
    /// then the streams (one that cannot start is logged and left out); READY=1 at the end.
    pub async fn start(config: Config, config_path: PathBuf) -> anyhow::Result<Daemon> {
        let notifier = systemd::Notifier::from_env();
        tracing::info!(node = %config.node.id, streams = config.streams.len(), config = %config_path.display(), "dfwatch starting.");
        let state_dir = state_dir();

        crate::onnx::init(&config.onnx).context("ONNX Runtime ([onnx] library)")?;
        let model_dir = bundle_dir(&config);
        let LoadedModel {
            encoder,
            scoring,
            crop,
            device_crop,
            ..
        } = load_model_off_loop(model_dir.clone(), EngineChoice::of(&config)).await?;
        let model_info = scoring.model.clone();
        tracing::info!(
            model = %model_info.name,
            version = %model_info.version,
            sha256 = %model_info.manifest_sha256,
            trained = model_info.trained,
            dir = %model_dir.display(),
            "Model loaded."
        );
        announce_untrained(&model_info);

        let (publisher, spool_dir) = start_publisher(&config, &state_dir)?;
        // Before it connects: the sweep at connect keeps these streams' retained messages.
        let _ = publisher
            .set_streams(
                config
                    .streams
                    .iter()
                    .filter(|s| s.enabled)
                    .map(|s| s.id.clone())
                    .collect(),
            )
            .await;
        let events_file = config.events.file(&config.base_dir, &state_dir);
        let store = crate::events::EventStore::open(&config.events, &events_file)?;

        // The shared stages: encode queue -> encoder -> embeddings -> decision task.
        let metrics = Arc::new(AnalysisMetrics::default());
        let (encode_tx, encode_rx) = config
            .encoder
            .queue
            .channel_keeping("encode", EncodeItem::must_keep);
        let (emb_tx, emb_rx) = crate::channel::bounded::<Input>(
            "embeddings",
            config.encoder.output_capacity,
            crate::channel::FullPolicy::Block,
        );
        let encoder_thread = spawn_encoder(
            encoder,
            &config.encoder,
            encode_rx.clone(),
            emb_tx.clone(),
            metrics.clone(),
        )?;
        let (decision_tx, decision_rx) = mpsc::channel(DECISION_COMMANDS);
        let mut decider = Decider::new(
            config.node.id.clone(),
            scoring,
            config.evidence.clone(),
            metrics.clone(),
            UlidGenerator::new(),
        );
        decider.set_held_frames(config.events.held_frames);
        let verdicts = Arc::new(crate::decide::VerdictBoard::default());
        let decision_task = tokio::spawn(decision::run(
            decider,
            emb_rx,
            decision_rx,
            decision::Sinks {
                publisher: publisher.clone(),
                store: store.clone(),
                verdicts: verdicts.clone(),
            },
            metrics.clone(),
        ));

        // HTTP and the shared state.
        let (commands_tx, commands) = mpsc::channel::<Command>(API_COMMANDS);
        let token = config
            .http
            .token(&config.base_dir, &state_dir)
            .context("[http] API token")?;
        // Counters through a receiver: a sender kept here would keep the encoder from seeing
        // the end of its input at shutdown.
        let encode_stats = {
            let rx = encode_rx.clone();
            Box::new(move || rx.stats()) as Box<dyn Fn() -> _ + Send + Sync>
        };
        let state = Arc::new(AppState {
            started: Instant::now(),
            heartbeat_ms: Default::default(),
            ready: AtomicBool::new(false),
            model: std::sync::RwLock::new(model_info.clone()),
            publisher: publisher.clone(),
            events: store,
            sessions: crate::http::session::Sessions::new(config.http.listen.port()),
            verdicts,
            analysis: metrics.clone(),
            streams: Default::default(),
            commands: commands_tx,
            api: crate::http::ApiPolicy {
                token,
                schemes: config.http.api_schemes.clone(),
                credentials: config.http.api_credentials.clone(),
                max_streams: config.http.api_max_streams,
                reads_need_token: config.http.reads_need_token(),
                loopback_hosts_only: config.http.loopback_hosts_only(),
                trusted_proxies: config.http.trusted_proxies.clone(),
            },
            guard: Default::default(),
            connections: Arc::new(crate::http::Connections::new(crate::http::Limits::of(
                &config.http,
            ))),
            subscribers: crate::http::events::subscriber_places(),
            exports: crate::http::events::export_places(),
            encode_queue: encode_stats,
        });
        state.beat();
        let http_cancel = CancellationToken::new();
        let http_task = if config.http.enabled {
            let (addr, task) =
                crate::http::serve(config.http.listen, state.clone(), http_cancel.clone()).await?;
            tracing::info!(listen = %addr, "HTTP API listening (/livez /readyz /metrics /api/streams /api/alerts).");
            Some(task)
        } else {
            None
        };

        // The detector once up front: a missing model is a start-up error, not a silent stream.
        drop(
            FaceDetector::load(&config.detect, &config.base_dir).with_context(|| {
                format!(
                    "face detector ({}; run ./tools/setup.sh or set [detect] model_dir)",
                    config.detect.model_dir(&config.base_dir).display()
                )
            })?,
        );

        let factory = StreamFactory {
            config: config.clone(),
            crop,
            device_crop,
            encode: encode_tx,
            encode_rx,
            publisher: publisher.clone(),
        };
        let (added_tx, added_rx) = mpsc::channel(API_COMMANDS);
        let mut daemon = Daemon {
            adding: Default::default(),
            added_tx,
            added_rx,
            config,
            config_path,
            notifier,
            state,
            publisher,
            spool_dir,
            metrics,
            factory,
            running: BTreeMap::new(),
            encoder: Some(encoder_thread),
            embeddings: emb_tx,
            decision: decision_tx,
            decision_task,
            commands,
            http_cancel,
            http_task,
            model_dir,
            model_sha: model_info.manifest_sha256.clone(),
        };
        let streams: Vec<StreamConfig> = daemon
            .config
            .streams
            .iter()
            .filter(|s| s.enabled)
            .cloned()
            .collect();
        for s in &streams {
            daemon.start_stream(s, false);
        }
        daemon.state.ready.store(true, Ordering::Relaxed);
        daemon.notifier.ready(&daemon.status_line());
        tracing::info!("dfwatch ready.");
        Ok(daemon)
    }

    /// Starts one stream; a failure is logged and the stream left out.
    fn start_stream(&mut self, s: &StreamConfig, runtime_only: bool) -> bool {
        match self.factory.start(s, &self.state, runtime_only) {
            Ok(r) => {
                self.running.insert(s.id.clone(), r);
                true
            }
            Err(e) => {
                tracing::error!(stream = %s.id, error = format!("{e:#}"), "Stream not started.");
                false
            }
        }
    }

    fn status_line(&self) -> String {
        let online = self
            .running
            .values()
            .filter(|r| r.handle.status().state == ingest::StreamState::Online)
            .count();
        format!("{online}/{} streams online", self.running.len())
    }

    /// The supervisor loop: heartbeat and watchdog, periodic status, SIGHUP and API commands,
    /// until SIGINT, SIGTERM or `stop`.
    pub async fn serve(&mut self, stop: CancellationToken) -> anyhow::Result<()> {
        let signal = shutdown_signal(stop);
        tokio::pin!(signal);
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("listening for SIGHUP")?;
        let watchdog_every = self.notifier.watchdog_interval();
        let mut tick = tokio::time::interval(
            watchdog_every
                .unwrap_or(Duration::from_secs(1))
                .clamp(Duration::from_millis(100), Duration::from_secs(1)),
        );
        let mut last_watchdog = Instant::now();
        let mut last_status = Instant::now();
        let mut last_untrained = Instant::now();
        loop {
            tokio::select! {
                _ = &mut signal => return Ok(()),
                _ = tick.tick() => {
                    self.state.beat();
                    if let Some(every) = watchdog_every
                        && last_watchdog.elapsed() >= every
                    {
                        self.notifier.watchdog();
                        last_watchdog = Instant::now();
                    }
                    if last_status.elapsed() >= STATUS_EVERY {
                        last_status = Instant::now();
                        self.notifier.status(&self.status_line());
                        self.log_status();
                    }
                    let model = self.state.model.read().expect("model lock").clone();
                    if !model.trained && last_untrained.elapsed() >= UNTRAINED_EVERY {
                        last_untrained = Instant::now();
                        announce_untrained(&model);
                    }
                }
                _ = hup.recv() => {
                    tracing::info!(config = %self.config_path.display(), "SIGHUP: reloading the config.");
                    match self.reload().await {
                        Ok(r) => tracing::info!(report = ?r, "Reload applied."),
                        Err(e) => tracing::error!(error = %e, "Reload refused; nothing changed."),
                    }
                }
                Some(p) = self.added_rx.recv() => {
                    self.finish_add_stream(p);
                    self.tell_streams().await;
                }
                cmd = self.commands.recv() => {
                    let Some(cmd) = cmd else { continue };
                    match cmd {
                        Command::AddStream { stream, reply } => self.begin_add_stream(*stream, reply),
                        Command::RemoveStream { id, reply } => {
                            let r = match self.running.remove(&id) {
                                Some(rs) => {
                                    rs.remove(&self.state, &self.publisher).await;
                                    self.tell_streams().await;
                                    Ok(())
                                }
                                None => Err(CommandError::NotFound(id.to_string())),
                            };
                            let _ = reply.send(r);
                        }
                        Command::Reload { reply } => {
                            let _ = reply.send(self.reload().await);
                        }
                    }
                }
            }
        }
    }

    fn log_status(&self) {
        for r in self.state.stream_reports() {
            tracing::info!(
                stream = %r.id,
                state = r.status.state.as_str(),
                reconnects = r.status.reconnects,
                frames_delivered = r.frames_delivered,
                frames_dropped = r.frames_dropped,
                faces_scored = r.faces_scored,
                tracks = r.tracks,
                coverage = format!("{:.2}", r.coverage),
                "Stream status."
            );
        }
    }

    /// A runtime-only stream from the API, checked by the same rules as the file's streams
    /// and capped by `http.api_max_streams`. Its detector loads on a blocking thread; the
    /// loop goes on meanwhile and [`Daemon::finish_add_stream`] completes it.
    fn begin_add_stream(
        &mut self,
        stream: StreamConfig,
        reply: tokio::sync::oneshot::Sender<Result<(), CommandError>>,
    ) {
        if let Err(e) = self.check_api_stream(&stream) {
            let _ = reply.send(Err(e));
            return;
        }
        self.adding.insert(stream.id.clone());
        let factory_cfg = (
            self.factory.config.detect.clone(),
            self.factory.config.base_dir.clone(),
        );
        let done = self.added_tx.clone();
        tokio::spawn(async move {
            let id = stream.id.clone();
            let detector = tokio::task::spawn_blocking(move || {
                FaceDetector::load(&factory_cfg.0, &factory_cfg.1)
                    .with_context(|| format!("stream {id}: face detector"))
            })
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("loading the face detector failed: {e}")));
            let _ = done
                .send(PreparedStream {
                    stream,
                    detector,
                    reply,
                })
                .await;
        });
    }

    fn check_api_stream(&self, stream: &StreamConfig) -> Result<(), CommandError> {
        if self.running.contains_key(&stream.id) || self.adding.contains(&stream.id) {
            return Err(CommandError::Exists(stream.id.to_string()));
        }
        let api_streams = self
            .state
            .streams
            .read()
            .expect("streams lock")
            .values()
            .filter(|v| v.runtime_only)
            .count()
            + self.adding.len();
        let max = self.state.api.max_streams;
        if api_streams >= max {
            return Err(CommandError::Limit(format!(
                "{api_streams} streams added through the API already (http.api_max_streams = \
                 {max}); remove one first"
            )));
        }
        let mut errors = Vec::new();
        self.factory
            .config
            .validate_stream(stream, "stream", &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(CommandError::Invalid(
                errors.iter().map(|e| e.to_string()).collect(),
            ))
        }
    }

    fn finish_add_stream(&mut self, p: PreparedStream) {
        self.adding.remove(&p.stream.id);
        // A reload may have started a stream of that id meanwhile.
        if self.running.contains_key(&p.stream.id) {
            let _ = p
                .reply
                .send(Err(CommandError::Exists(p.stream.id.to_string())));
            return;
        }
        let r = p
            .detector
            .and_then(|d| self.factory.start_with(&p.stream, d, &self.state, true))
            .map(|r| {
                self.running.insert(p.stream.id.clone(), r);
            })
            .map_err(|e| CommandError::Failed(format!("{e:#}")));
        let _ = p.reply.send(r);
    }

    /// Tells the publisher the node's streams now (the sweep at each connect keeps theirs).
    async fn tell_streams(&self) {
        let ids = self.running.keys().cloned().collect();
        let _ = self.publisher.set_streams(ids).await;
    }

    /// Re-reads the config file and applies what changed (see the module doc); on any error
    /// nothing changes.
    pub async fn reload(&mut self) -> Result<ReloadReport, CommandError> {
        self.notifier.reloading();
        let r = self.apply_reload().await;
        self.tell_streams().await;
        self.notifier.reloaded(&self.status_line());
        r
    }

    async fn apply_reload(&mut self) -> Result<ReloadReport, CommandError> {
        let new = Config::load(&self.config_path)
            .map_err(|e| CommandError::Invalid(e.0.iter().map(|x| x.to_string()).collect()))?;
        let mut report = ReloadReport::default();
        // Settings that need a restart: say so rather than pretend.
        let current = &self.config;
        let section = |a: &dyn erased::Json, b: &dyn erased::Json| a.json() != b.json();
        for (name, changed) in [
            ("node", section(&current.node, &new.node)),
            ("ingest", section(&current.ingest, &new.ingest)),
            ("encoder", section(&current.encoder, &new.encoder)),
            ("onnx", section(&current.onnx, &new.onnx)),
            ("detect", section(&current.detect, &new.detect)),
            ("track", section(&current.track, &new.track)),
            ("mqtt", section(&current.mqtt, &new.mqtt)),
            ("http", section(&current.http, &new.http)),
            ("gpu", section(&current.gpu, &new.gpu)),
            ("webhooks", section(&current.webhooks, &new.webhooks)),
            ("events", section(&current.events, &new.events)),
            ("model.backend", current.model.backend != new.model.backend),
        ] {
            if changed {
                report.needs_restart.push(name.to_string());
            }
        }
        // The model: load and check the new bundle before anything changes.
        let new_dir = bundle_dir(&new);
        let new_model = {
            let manifest_sha = crate::model::manifest_sha256(&new_dir).ok();
            if new_dir != self.model_dir || manifest_sha.as_deref() != Some(self.model_sha.as_str())
            {
                let loaded = load_model_off_loop(new_dir.clone(), EngineChoice::of(&self.config))
                    .await
                    .map_err(|e| CommandError::Invalid(vec![format!("model: {e:#}")]))?;
                let (a, b) = (&loaded.crop, &self.factory.crop);
                let refused =
                    if loaded.device_crop != self.factory.device_crop || a.method != b.method {
                        Some(format!(
                            "model: {} was loaded for another backend than the running one",
                            new_dir.display()
                        ))
                    } else if a.size != b.size || a.mean != b.mean || a.std != b.std {
                        Some(format!(
                            "model: {} takes {} px crops with other normalisation than the running \
                         model; restart the daemon to change the input geometry",
                            new_dir.display(),
                            a.size
                        ))
                    } else {
                        None
                    };
                if let Some(why) = refused {
                    // A GPU engine's drop joins its device thread: off the async runtime.
                    let _ = tokio::task::spawn_blocking(move || drop(loaded)).await;
                    return Err(CommandError::Invalid(vec![why]));
                }
                Some(loaded)
            } else {
                None
            }
        };
        // Streams: the file's streams, plus runtime-only ones the file does not redefine.
        let wanted: BTreeMap<StreamId, StreamConfig> = new
            .streams
            .iter()
            .filter(|s| s.enabled)
            .map(|s| (s.id.clone(), s.clone()))
            .collect();
        let runtime_only: Vec<StreamId> = self
            .state
            .streams
            .read()
            .expect("streams lock")
            .iter()
            .filter(|(id, v)| v.runtime_only && !wanted.contains_key(*id))
            .map(|(id, _)| id.clone())
            .collect();
        let ids: Vec<StreamId> = self.running.keys().cloned().collect();
        for id in ids {
            if runtime_only.contains(&id) {
                report.unchanged.push(id.to_string());
                continue;
            }
            let running = &self.running[&id];
            // A stream failed by policy is tried again on a reload, changed or not.
            let failed = running.handle.status().state == ingest::StreamState::Failed;
            match wanted.get(&id) {
                Some(w) if same_stream_config(w, &running.config) && !failed => {
                    report.unchanged.push(id.to_string())
                }
                Some(_) => {
                    let r = self.running.remove(&id).expect("listed");
                    r.stop(&self.state).await;
                    report.restarted.push(id.to_string());
                }
                None => {
                    let r = self.running.remove(&id).expect("listed");
                    r.remove(&self.state, &self.publisher).await;
                    report.removed.push(id.to_string());
                }
            }
        }
        // Apply the model swap before new streams start producing faces for it.
        if let Some(m) = new_model {
            self.swap_model(m, new_dir).await?;
            report.model_swapped = true;
        }
        if self.config.evidence != new.evidence {
            let _ = self
                .decision
                .send(decision::Command::Evidence(new.evidence.clone()))
                .await;
            report.evidence_changed = true;
        }
        self.config = Config {
            streams: new.streams.clone(),
            evidence: new.evidence.clone(),
            // The backend (like [gpu]) applies at the next start; the bundle now.
            model: crate::model::ModelConfig {
                backend: self.config.model.backend,
                ..new.model.clone()
            },
            ..self.config.clone()
        };
        self.factory.config.streams = self.config.streams.clone();
        for (id, s) in &wanted {
            if self.running.contains_key(id) {
                continue;
            }
            if self.start_stream(s, false) && !report.restarted.contains(&id.to_string()) {
                report.added.push(id.to_string());
            }
        }
        Ok(report)
    }

    /// Stops the old encoder (after its batch in hand; queued crops stay), lets the decision
    /// stage decide what the old model left and swap its scorer, then starts the new encoder
    /// on the same queue.
    async fn swap_model(&mut self, m: LoadedModel, dir: PathBuf) -> Result<(), CommandError> {
        let old = self.encoder.take().expect("an encoder runs");
        old.stop.store(true, Ordering::Relaxed);
        let _ = tokio::task::spawn_blocking(move || old.thread.join()).await;
        let (done, swapped) = tokio::sync::oneshot::channel();
        let info = m.scoring.model.clone();
        let _ = self
            .decision
            .send(decision::Command::ModelSwapped {
                scoring: Box::new(m.scoring),
                done,
            })
            .await;
        let _ = swapped.await;
        self.encoder = Some(
            spawn_encoder(
                m.encoder,
                &self.config.encoder,
                self.factory.encode_rx.clone(),
                self.embeddings.clone(),
                self.metrics.clone(),
            )
            .map_err(|e| CommandError::Failed(format!("encoder thread: {e:#}")))?,
        );
        *self.state.model.write().expect("model lock") = info.clone();
        self.model_dir = dir;
        self.model_sha = info.manifest_sha256.clone();
        announce_untrained(&info);
        Ok(())
    }

    /// The bounded shutdown (see the module doc).
    pub async fn stop(self) {
        let Daemon {
            config,
            notifier,
            state,
            publisher,
            spool_dir,
            factory,
            mut running,
            mut encoder,
            embeddings,
            decision,
            decision_task,
            http_cancel,
            http_task,
            ..
        } = self;
        notifier.stopping();
        state.ready.store(false, Ordering::Relaxed);
        // Home Assistant shows the streams unavailable now, not their verdicts winding down.
        let _ = publisher.stopping().await;
        let grace = config.node.shutdown_grace;
        let deadline = Instant::now() + grace;
        tracing::info!(
            grace_s = grace.as_secs_f64(),
            "Stopping: ingest, then in-flight work, then the spool."
        );
        let drain = async {
            for (_, r) in std::mem::take(&mut running) {
                r.stop(&state).await;
            }
            // With every face stage gone, closing the encoder's input ends it after its batch.
            drop(factory);
            if let Some(enc) = encoder.take() {
                let _ = tokio::task::spawn_blocking(move || enc.thread.join()).await;
            }
            drop(embeddings);
            drop(decision);
            let _ = decision_task.await;
        };
        if tokio::time::timeout(grace.mul_f64(0.6), drain)
            .await
            .is_err()
        {
            tracing::warn!("In-flight work did not drain in time; continuing the stop.");
        }
        http_cancel.cancel();
        if let Some(t) = http_task {
            let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
        }
        // The alerts' ends reach the event store's file before the process goes.
        let store = state.events.clone();
        let flushed = tokio::task::spawn_blocking(move || store.flush(Duration::from_secs(2)))
            .await
            .unwrap_or(false);
        if !flushed {
            tracing::warn!("The event store did not take every alert event before the stop.");
        }
        drop(state);
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(500));
        match Arc::try_unwrap(publisher) {
            Ok(p) => {
                let mut stats = p.subscribe();
                let _ = tokio::time::timeout(
                    left.mul_f64(0.8),
                    // The broker's share; webhooks owe theirs across restarts anyway.
                    stats.wait_for(|s| s.mqtt_owed == 0 || !s.connected),
                )
                .await;
                let pending = p.stats().mqtt_owed;
                p.stop(left.mul_f64(0.2).max(Duration::from_millis(300)))
                    .await;
                if pending > 0 {
                    tracing::warn!(pending, spool = %spool_dir.display(), "Alerts not yet acknowledged stay in the spool for the next start.");
                }
            }
            Err(p) => {
                tracing::warn!("MQTT publisher still in use at shutdown; stopping it anyway.");
                drop(p);
            }
        }
        tracing::info!("dfwatch stopped.");
    }
}

/// The publisher, with the embedded broker when configured; returns it with its spool
/// directory.
fn start_publisher(
    config: &Config,
    state_dir: &Path,
) -> anyhow::Result<(Arc<PublisherHandle>, PathBuf)> {
    let mut mqtt_cfg = config.mqtt.clone();
    if mqtt_cfg.homeassistant_page_url.is_none()
        && config.http.enabled
        && !config.http.listen.ip().is_unspecified()
    {
        mqtt_cfg.homeassistant_page_url = Some(format!("http://{}/", config.http.listen));
    }
    if mqtt_cfg.embedded {
        let listen = mqtt_cfg.embedded_listen;
        if let Err(e) = crate::publish::broker::start_embedded(listen) {
            // Debian's mosquitto package starts a broker on 127.0.0.1:1883: publish to it
            // rather than fail, so the zero-set-up run still works and mosquitto_sub sees us.
            if std::net::TcpStream::connect(listen).is_ok() {
                tracing::warn!(listen = %listen, "A broker already listens there; publishing to it instead of starting the embedded one.");
            } else {
                return Err(e.into());
            }
        }
        mqtt_cfg.url = format!("mqtt://{listen}");
    }
    let spool_dir = match &mqtt_cfg.spool_dir {
        Some(p) => crate::files::resolve(&config.base_dir, p),
        None if std::env::var_os("STATE_DIRECTORY").is_some() => state_dir.join("spool"),
        None => PathBuf::from("var/spool"),
    };
    let publisher = Arc::new({
        let webhooks = config
            .webhooks
            .iter()
            .map(|w| crate::publish::webhook::Webhook::prepare(w, &config.base_dir).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .context("webhooks")?;
        for w in &webhooks {
            tracing::info!(webhook = %w.cfg.name, to = %w.url.shown(), events = ?w.cfg.events, "Webhook configured.");
        }
        crate::publish::publisher::spawn_with_webhooks(
            &mqtt_cfg,
            &config.node.id,
            &spool_dir,
            webhooks,
        )
        .context("starting the MQTT publisher")?
    });
    tracing::info!(url = %mqtt_cfg.url, prefix = %mqtt_cfg.prefix, spool = %spool_dir.display(), "MQTT publisher started.");
    Ok((publisher, spool_dir))
}

/// Comparing config sections by their JSON form (they need no PartialEq of their own).
mod erased {
    pub trait Json {
        fn json(&self) -> Option<serde_json::Value>;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> Option<serde_json::Value> {
            serde_json::to_value(self).ok()
        }
    }
}

async fn shutdown_signal(cancel: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
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
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received."),
        _ = term => tracing::info!("SIGTERM received."),
        _ = cancel.cancelled() => {}
    }
}
