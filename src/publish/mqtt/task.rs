//! The publisher's task: the I/O around the spool ([`crate::publish::spool`]) and the
//! outbox ([`crate::publish::outbox`]). It owns the rumqttc client and event loop, hands the
//! spool's bytes to its writer thread, and tells the outbox what the broker did.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::MAX_CLEARED_SCOPES;
use super::config::{MAX_IN_FLIGHT, Prepared};
use super::{PublisherStats, Request};
use crate::backoff::Backoff;
use crate::publish::outbox::{Outbox, SinkConfig, SinkId};
use crate::publish::spool::{LogDone, Spool};
use crate::publish::webhook::{Delivery, Outcome, Webhook};

/// The MQTT sink's index in the outbox; webhook `i` is sink `1 + i`.
const MQTT: SinkId = 0;
/// The MQTT sink's name in the spool's per-sink acknowledgements.
const MQTT_NAME: &str = crate::publish::spool::MQTT_SINK;

/// The webhooks' side of the task: a worker per webhook (ended with the run that started it)
/// and the channel their outcomes come back on.
struct Hooks {
    hooks: Vec<Arc<Webhook>>,
    senders: Vec<mpsc::Sender<Delivery>>,
    results_tx: mpsc::Sender<(SinkId, u64, Outcome)>,
    results: mpsc::Receiver<(SinkId, u64, Outcome)>,
    /// Per webhook: the oldest event it still owes (its worker abandons anything below).
    floors: Vec<Arc<std::sync::atomic::AtomicU64>>,
    workers: Vec<AbortOnDrop>,
}

impl Hooks {
    fn start(hooks: &[Arc<Webhook>]) -> Hooks {
        let (results_tx, results) = mpsc::channel(hooks.len().max(1) * 2);
        let mut h = Hooks {
            hooks: hooks.to_vec(),
            senders: Vec::new(),
            results_tx,
            results,
            floors: Vec::new(),
            workers: Vec::new(),
        };
        for i in 0..hooks.len() {
            h.floors.push(Arc::default());
            let (tx, worker) = h.spawn_worker(i);
            h.senders.push(tx);
            h.workers.push(worker);
        }
        h
    }

    /// Webhook `i`'s worker: one delivery at a time (the outbox keeps the rest, oldest first).
    fn spawn_worker(&self, i: usize) -> (mpsc::Sender<Delivery>, AbortOnDrop) {
        let (tx, rx) = mpsc::channel(1);
        let worker = AbortOnDrop(tokio::spawn(crate::publish::webhook::worker(
            self.hooks[i].clone(),
            1 + i,
            rx,
            self.results_tx.clone(),
            self.floors[i].clone(),
        )));
        (tx, worker)
    }

    /// A durable alert joining the outbox: webhooks that take no events of its kind never owe
    /// it (so such events never count against their caps, and `pump` never sees them).
    fn settle_unwanted(&self, outbox: &mut Outbox, spool: &mut Spool, seq: u64) {
        let Some(kind) = spool.get(seq).map(|e| e.kind) else {
            return;
        };
        for (i, hook) in self.hooks.iter().enumerate() {
            if !hook.cfg.wants(kind)
                && let Some(done) = outbox.settled(1 + i, seq)
            {
                spool.ack(done);
            }
        }
    }

    /// Moves each worker's floor up to the oldest event its webhook still owes.
    fn share_floors(&self, outbox: &Outbox) {
        for (i, f) in self.floors.iter().enumerate() {
            let first = outbox.first_owed(1 + i).unwrap_or(u64::MAX);
            f.store(first, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn sink_name(&self, sink: SinkId) -> String {
        match sink {
            MQTT => MQTT_NAME.to_string(),
            n => format!("webhook:{}", self.hooks[n - 1].cfg.name),
        }
    }

    /// Hands each webhook what the outbox says is next (one at a time).
    fn pump(&mut self, outbox: &mut Outbox, spool: &mut Spool) {
        let mut restart = Vec::new();
        for (i, hook) in self.hooks.iter().enumerate() {
            let sink = 1 + i;
            while let Some(seq) = outbox.next(sink) {
                let Some(entry) = spool.get(seq) else {
                    outbox.forget(seq);
                    continue;
                };
                let d = Delivery {
                    seq,
                    alert_id: entry.key.clone(),
                    kind: entry.kind,
                    payload: entry.payload.clone(),
                };
                match self.senders[i].try_send(d) {
                    Ok(()) => {
                        outbox.handed(sink, Some(seq));
                        outbox.tagged(sink, seq);
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        outbox.refused(sink, seq);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        // The worker is gone (a panic): what it held is forgotten and sent
                        // again by a new one.
                        tracing::error!(webhook = %hook.cfg.name, "Webhook worker stopped; starting it again.");
                        outbox.disconnected(sink);
                        outbox.connected(sink);
                        restart.push(i);
                        break;
                    }
                }
            }
        }
        for i in restart {
            let (tx, worker) = self.spawn_worker(i);
            self.senders[i] = tx;
            self.workers[i] = worker;
        }
    }
}

/// A sink has its copy of `seq`: the spool lets it go when no sink owes it, else records the
/// sink's copy (so a restart does not send it to that sink again).
fn sink_took(spool: &mut Spool, acked: Option<(u64, bool)>, name: &str) {
    match acked {
        Some((seq, true)) => {
            spool.ack(seq);
        }
        Some((seq, false)) => {
            spool.sink_ack(seq, name);
        }
        None => {}
    }
}

/// The connection-scoped state: dropped whole on a loss (with rumqttc's own queue of in-flight
/// messages, whose re-sends the outbox could not match).
struct Session {
    client: AsyncClient,
    /// rumqttc's event loop until the session starts (it waits out its backoff first).
    idle: Option<Box<EventLoop>>,
    /// Then its events, from a task of its own that drives it. rumqttc's `poll` is not
    /// cancel-safe while it connects: polled in the publisher's `select!`, every other event
    /// (a request, a written batch, the tick) dropped the connect in progress, so a broker
    /// slower to answer than the gap between two events was never reached, and a silent one
    /// was retried at once, for ever, without its connect timeout running out.
    running: Option<(EventRx, AbortOnDrop)>,
    connected: bool,
    /// Retained topics still to (re)send on this connection: what rumqttc's request queue
    /// had no room for (a reconnect or Home Assistant's birth sends many at once), sent as
    /// room frees. At most one entry per retained topic.
    retained_due: VecDeque<String>,
}

type EventRx = mpsc::Receiver<Result<Event, rumqttc::ConnectionError>>;

/// Aborts the task when dropped (a session dropped on a loss takes its driver with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Events a driver may read ahead of the publisher task.
const EVENTS_AHEAD: usize = 64;

/// Polls the event loop until it fails or nobody listens; the error is the last event.
async fn drive(
    mut events: Box<EventLoop>,
    tx: mpsc::Sender<Result<Event, rumqttc::ConnectionError>>,
) {
    loop {
        let ev = events.poll().await;
        let failed = ev.is_err();
        if tx.send(ev).await.is_err() || failed {
            return;
        }
    }
}

impl Session {
    fn new(p: &Prepared) -> Session {
        let (client, events) = AsyncClient::new(p.options.clone(), 256);
        Session {
            client,
            idle: Some(Box::new(events)),
            running: None,
            connected: false,
            retained_due: VecDeque::new(),
        }
    }

    /// Queues retained `topics` to be sent on this connection, then sends what fits.
    fn send_retained<'a>(
        &mut self,
        outbox: &mut Outbox,
        retained: &std::collections::BTreeMap<String, Vec<u8>>,
        topics: impl IntoIterator<Item = &'a String>,
    ) {
        for t in topics {
            if !self.retained_due.contains(t) {
                self.retained_due.push_back(t.clone());
            }
        }
        self.drain_retained(outbox, retained);
    }

    /// Sends the due retained messages (their current payloads) while rumqttc takes them.
    fn drain_retained(
        &mut self,
        outbox: &mut Outbox,
        retained: &std::collections::BTreeMap<String, Vec<u8>>,
    ) {
        if !self.connected {
            self.retained_due.clear();
            return;
        }
        while let Some(topic) = self.retained_due.front() {
            let Some(payload) = retained.get(topic) else {
                self.retained_due.pop_front(); // cleared meanwhile
                continue;
            };
            if self
                .client
                .try_publish(topic.as_str(), QoS::AtLeastOnce, true, payload.clone())
                .is_err()
            {
                return;
            }
            outbox.handed(MQTT, None);
            self.retained_due.pop_front();
        }
    }

    /// The next event of this connection, starting its driver (and so the connect) on the
    /// first call. Cancel-safe: the connect goes on whatever else the caller does meanwhile.
    async fn next_event(&mut self) -> Result<Event, rumqttc::ConnectionError> {
        if let Some(events) = self.idle.take() {
            let (tx, rx) = mpsc::channel(EVENTS_AHEAD);
            self.running = Some((rx, AbortOnDrop(tokio::spawn(drive(events, tx)))));
        }
        match &mut self.running {
            Some((rx, _)) => match rx.recv().await {
                Some(ev) => ev,
                // The driver ended after its error was taken: nothing more will come.
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    /// Hands a message that is not in the spool (statuses, retained messages, face crops) to
    /// rumqttc when connected. It takes a packet id too, so the outbox records its place in
    /// the hand-over order, only if rumqttc took it.
    fn send_unspooled(&mut self, outbox: &mut Outbox, topic: &str, retain: bool, payload: Vec<u8>) {
        if self.connected
            && self
                .client
                .try_publish(topic, QoS::AtLeastOnce, retain, payload)
                .is_ok()
        {
            outbox.handed(MQTT, None);
        }
    }

    /// Hands the alerts the outbox says are next to rumqttc while its request queue has room.
    fn pump(&mut self, outbox: &mut Outbox, p: &Prepared, spool: &Spool, published: &mut u64) {
        if !self.connected {
            return;
        }
        while let Some(seq) = outbox.next(MQTT) {
            let Some(entry) = spool.get(seq) else {
                outbox.forget(seq); // coalesced or dropped by a cap meanwhile
                continue;
            };
            match self
                .client
                .try_publish(&p.alerts, QoS::AtLeastOnce, false, entry.payload.clone())
            {
                Ok(()) => {
                    outbox.handed(MQTT, Some(seq));
                    *published += 1;
                }
                Err(_) => {
                    outbox.refused(MQTT, seq);
                    break;
                }
            }
        }
    }
}

/// The task's retained messages, by full topic, and the scopes cleared on the broker.
struct Retained<'a> {
    map: &'a mut std::collections::BTreeMap<String, Vec<u8>>,
    /// Cleared scopes (full topic prefixes), oldest first: retained messages under them are
    /// dropped until allowed again.
    cleared: &'a mut VecDeque<String>,
    /// Topics whose clearing waits for a connection.
    to_clear: &'a mut std::collections::BTreeSet<String>,
    /// Topics whose clearing waits for a time ([`HA_DROP_GRACE`]).
    deferred: &'a mut VecDeque<(tokio::time::Instant, String)>,
}

impl Retained<'_> {
    /// Clears every retained message under `scope` on the broker (an empty retained message
    /// each, now or at the next connect; after `grace` when given, so Home Assistant has
    /// dropped the entities that read them) and refuses later ones under it.
    fn clear(
        &mut self,
        session: &mut Session,
        outbox: &mut Outbox,
        scope: String,
        grace: Option<Duration>,
    ) {
        let gone: Vec<String> = self
            .map
            .range(scope.clone()..)
            .take_while(|(t, _)| t.starts_with(scope.as_str()))
            .map(|(t, _)| t.clone())
            .collect();
        for topic in gone {
            self.map.remove(&topic);
            if let Some(g) = grace {
                self.deferred
                    .push_back((tokio::time::Instant::now() + g, topic));
            } else if session.connected {
                session.send_unspooled(outbox, &topic, true, Vec::new());
            } else {
                self.to_clear.insert(topic);
            }
        }
        if !self.cleared.contains(&scope) {
            self.cleared.push_back(scope);
            if self.cleared.len() > MAX_CLEARED_SCOPES {
                self.cleared.pop_front();
            }
        }
    }

    /// Retained messages under `scope` may be published again.
    fn allow(&mut self, scope: &str) {
        self.cleared.retain(|c| c != scope);
        self.to_clear.retain(|t| !t.starts_with(scope));
        self.deferred.retain(|(_, t)| !t.starts_with(scope));
    }

    /// Sets a retained message (unless its scope was cleared) and sends it.
    fn set(&mut self, session: &mut Session, outbox: &mut Outbox, topic: String, payload: Vec<u8>) {
        if self.cleared.iter().any(|c| topic.starts_with(c.as_str())) {
            return;
        }
        if self.map.get(&topic) == Some(&payload) {
            return;
        }
        self.to_clear.remove(&topic);
        self.map.insert(topic.clone(), payload);
        session.send_retained(outbox, self.map, [&topic]);
    }
}

/// The node's `online`, Home Assistant's status subscribed to (its births re-announce), and
/// every retained message and pending clear of this run sent.
fn go_online(
    session: &mut Session,
    outbox: &mut Outbox,
    p: &Prepared,
    retained: &std::collections::BTreeMap<String, Vec<u8>>,
    to_clear: &mut std::collections::BTreeSet<String>,
) {
    session.send_unspooled(outbox, &p.status, true, b"online".to_vec());
    if let Some(d) = &p.discovery {
        let _ = session
            .client
            .try_subscribe(d.birth_topic(), QoS::AtLeastOnce);
    }
    session.send_retained(outbox, retained, retained.keys());
    for topic in std::mem::take(to_clear) {
        session.send_unspooled(outbox, &topic, true, Vec::new());
    }
}

/// The sweep saw everything retained: what it says to clear (or set offline) goes out, its
/// subscriptions end, and the node goes online.
fn end_sweep(
    session: &mut Session,
    outbox: &mut Outbox,
    p: &Prepared,
    s: super::sweep::Sweep,
    current: Option<&std::collections::BTreeSet<crate::types::StreamId>>,
    retained: &std::collections::BTreeMap<String, Vec<u8>>,
    to_clear: &mut std::collections::BTreeSet<String>,
) {
    for f in s.filters() {
        let _ = session.client.try_unsubscribe(f);
    }
    if s.overflow > 0 {
        tracing::warn!(
            beyond = s.overflow,
            "More retained topics than the sweep reads at once; the rest wait for the next connect."
        );
    }
    let empty = std::collections::BTreeSet::new();
    let publishes = s.finish(current.unwrap_or(&empty), retained);
    let cleared = publishes.iter().filter(|(_, v)| v.is_empty()).count();
    if cleared > 0 {
        tracing::info!(
            cleared,
            "Cleared what an earlier run left retained for streams this node no longer has."
        );
    }
    for (topic, payload) in publishes {
        to_clear.remove(&topic);
        session.send_unspooled(outbox, &topic, true, payload);
    }
    go_online(session, outbox, p, retained, to_clear);
}

/// What the publisher task counts.
#[derive(Debug, Default)]
struct Tally {
    published: u64,
    acked: u64,
    reconnects: u64,
    connect_failures: u64,
    durable: bool,
    write_errors: u64,
}

/// The spool's writer thread, seen from the publisher task.
struct Writer {
    commands: std::sync::mpsc::Sender<crate::publish::spool::LogCommand>,
    done: mpsc::UnboundedReceiver<LogDone>,
    thread: std::thread::JoinHandle<()>,
    next_batch: u64,
    awaiting: Awaiting,
}

impl Writer {
    /// Sends what the spool buffered since the last call; `alerts` are answered once durable.
    fn flush(
        &mut self,
        spool: &mut Spool,
        alerts: Vec<(u64, oneshot::Sender<std::io::Result<u64>>)>,
    ) {
        spool.enforce_limits(crate::publish::spool::now_ms());
        let bytes = spool.take_buffer();
        if bytes.is_empty() && alerts.is_empty() {
            // Nothing new, but a rewrite may be due (a failed write or compaction).
            if let Some(snapshot) = spool.compaction_snapshot() {
                let _ = self
                    .commands
                    .send(crate::publish::spool::LogCommand::Compact(snapshot));
            }
            return;
        }
        self.next_batch += 1;
        let batch = self.next_batch;
        if self
            .commands
            .send(crate::publish::spool::LogCommand::Write { batch, bytes })
            .is_err()
        {
            tracing::error!("Spool writer thread is gone; alerts are not durable.");
            for (_, tx) in alerts {
                let _ = tx.send(Err(std::io::Error::other(
                    "the spool writer thread is gone",
                )));
            }
            return;
        }
        if !alerts.is_empty() {
            self.awaiting.push_back((batch, alerts));
        }
        if let Some(snapshot) = spool.compaction_snapshot() {
            let _ = self
                .commands
                .send(crate::publish::spool::LogCommand::Compact(snapshot));
        }
    }

    /// Writes what is left, waits for the thread and answers everyone.
    async fn finish(mut self, spool: &mut Spool) {
        self.flush(spool, Vec::new());
        drop(self.commands);
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        while let Ok(d) = self.done.try_recv() {
            if let LogDone::Written { through, result } = d {
                settle(&mut self.awaiting, through, &result);
            }
        }
    }
}

/// Alerts waiting for the fsync of their batch, in batch order.
type Awaiting = VecDeque<(u64, Vec<(u64, oneshot::Sender<std::io::Result<u64>>)>)>;

/// Answers the alerts of every batch through `through` with `result`; returns their sequence
/// numbers, to be published (durable or not: while the disk refuses writes, alerts still go
/// to the broker).
fn settle(awaiting: &mut Awaiting, through: u64, result: &std::io::Result<()>) -> Vec<u64> {
    let mut settled = Vec::new();
    while awaiting.front().is_some_and(|(batch, _)| *batch <= through) {
        let (_, alerts) = awaiting.pop_front().expect("front exists");
        for (seq, tx) in alerts {
            let _ = tx.send(match result {
                Ok(()) => Ok(seq),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            });
            settled.push(seq);
        }
    }
    settled
}

/// What the publisher keeps across a restart of its task after a panic: the spool and its
/// writer, the request queue, the counters, the retained messages.
pub(super) struct Kept {
    spool: Spool,
    writer: Writer,
    rx: mpsc::Receiver<Request>,
    tally: Tally,
    retained: std::collections::BTreeMap<String, Vec<u8>>,
    /// Cleared scopes (full topic prefixes), oldest first.
    cleared: VecDeque<String>,
    /// Topics whose clearing waits for a connection.
    to_clear: std::collections::BTreeSet<String>,
    /// State topics of removed streams, cleared at the time given: after Home Assistant has
    /// dropped the entities that read them.
    deferred: VecDeque<(tokio::time::Instant, String)>,
    /// The node's streams, once the daemon has said ([`Request::Streams`]).
    current: Option<std::collections::BTreeSet<crate::types::StreamId>>,
    /// A stop began: availability only goes `offline`.
    stopping: bool,
}

/// How long a removed stream's state topics stay after its discovery configs were cleared.
const HA_DROP_GRACE: Duration = Duration::from_secs(5);
/// Home Assistant's birth messages within this are answered once.
const BIRTH_DEBOUNCE: Duration = Duration::from_secs(2);
/// How long the node's `online` waits for the sweep at connect.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the publisher until `cancel` (or every handle is gone), supervised: a panic in the
/// task is caught, counted in `restarts` and reported, and the task starts again after a
/// backoff with a fresh connection, keeping the spool (everything pending is sent again),
/// the counters and the retained messages. The alerts of the request batch in hand when it
/// panicked are lost if their write had not been started.
#[allow(clippy::too_many_arguments)]
pub(super) async fn supervise(
    p: Prepared,
    webhooks: Vec<Arc<Webhook>>,
    sinks: Arc<std::sync::Mutex<Vec<(String, crate::publish::outbox::SinkStats)>>>,
    mut spool: Spool,
    rx: mpsc::Receiver<Request>,
    stats: tokio::sync::watch::Sender<PublisherStats>,
    acks: tokio::sync::broadcast::Sender<u64>,
    cancel: CancellationToken,
    restarts: Arc<crate::fault::Restarts>,
) {
    use futures_util::FutureExt;
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let log = spool
        .detach_log()
        .expect("a freshly opened spool has its log");
    let (commands, thread) = match crate::publish::spool::spawn_writer(log, done_tx) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "Cannot start the spool writer thread; the publisher stops.");
            return;
        }
    };
    let mut kept = Kept {
        spool,
        writer: Writer {
            commands,
            done: done_rx,
            thread,
            next_batch: 0,
            awaiting: VecDeque::new(),
        },
        rx,
        tally: Tally {
            durable: true,
            ..Tally::default()
        },
        retained: Default::default(),
        cleared: VecDeque::new(),
        to_clear: Default::default(),
        deferred: VecDeque::new(),
        current: None,
        stopping: false,
    };
    loop {
        let run = std::panic::AssertUnwindSafe(run(
            &p, &webhooks, &sinks, &mut kept, &stats, &acks, &cancel,
        ));
        match run.catch_unwind().await {
            Ok(()) => break,
            Err(panic) => {
                let why = crate::fault::panic_message(&*panic);
                let wait = restarts.record("publisher", &format!("a panic: {why}"));
                tokio::time::sleep(wait).await;
                if cancel.is_cancelled() {
                    break;
                }
            }
        }
    }
    kept.writer.finish(&mut kept.spool).await;
}

/// The task's loop over one connection's life and the ones after it, until `cancel` or every
/// handle is gone.
#[allow(clippy::too_many_arguments)]
async fn run(
    p: &Prepared,
    webhooks: &[Arc<Webhook>],
    sinks: &std::sync::Mutex<Vec<(String, crate::publish::outbox::SinkStats)>>,
    kept: &mut Kept,
    stats: &tokio::sync::watch::Sender<PublisherStats>,
    acks: &tokio::sync::broadcast::Sender<u64>,
    cancel: &CancellationToken,
) {
    let Kept {
        spool,
        writer,
        rx,
        tally,
        retained,
        cleared,
        to_clear,
        deferred,
        current,
        stopping,
    } = kept;
    // This connection's sweep and when the node's `online` goes out without it.
    let mut sweep: Option<(super::sweep::Sweep, tokio::time::Instant)> = None;
    // When Home Assistant's (last) birth is answered.
    let mut birth_due: Option<tokio::time::Instant> = None;
    let mut backoff = Backoff::new(p.backoff);
    let mut session = Session::new(p);
    // What survived the last run is durable already: the broker owes an ack for each.
    let mut hooks = Hooks::start(webhooks);
    let mut sink_configs = vec![SinkConfig {
        name: MQTT_NAME.into(),
        max_in_flight: MAX_IN_FLIGHT,
        // The spool's own bounds (bytes, age) govern; MQTT never gives alerts up itself.
        max_owed: usize::MAX,
    }];
    for h in webhooks {
        sink_configs.push(SinkConfig {
            name: format!("webhook:{}", h.cfg.name),
            max_in_flight: 1,
            max_owed: h.cfg.max_owed,
        });
    }
    let mut outbox = Outbox::new(sink_configs);
    // Webhooks are always "connected": their workers retry on their own.
    for sink in 1..outbox.len() {
        outbox.connected(sink);
    }
    let pending: Vec<(u64, Vec<String>)> = spool
        .pending()
        .map(|e| (e.seq, e.acked_by.clone()))
        .collect();
    for (seq, acked_by) in pending {
        for gone in outbox.add(seq) {
            spool.ack(gone);
        }
        hooks.settle_unwanted(&mut outbox, spool, seq);
        // What a sink took before the restart, it does not get again.
        for name in acked_by {
            if let Some(sink) = (0..outbox.len()).find(|s| hooks.sink_name(*s) == name)
                && let Some(done) = outbox.settled(sink, seq)
            {
                spool.ack(done);
            }
        }
    }
    for (sink, seq) in outbox.take_given_up() {
        spool.sink_ack(seq, &hooks.sink_name(sink));
    }
    hooks.pump(&mut outbox, spool);
    let share_sinks = |outbox: &Outbox, hooks: &Hooks| {
        hooks.share_floors(outbox);
        if let Ok(mut s) = sinks.lock() {
            *s = (0..outbox.len())
                .map(|i| (outbox.name(i).to_string(), outbox.stats(i)))
                .collect();
        }
    };
    // While set, the next connection attempt waits (backoff after a loss or failure).
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut last_failure: Option<String> = None;
    let mut rng = fastrand::Rng::new();
    let publish_stats = |s: &Session, spool: &Spool, t: &Tally, outbox: &Outbox| {
        stats.send_replace(PublisherStats {
            connected: s.connected,
            pending: spool.len(),
            mqtt_owed: outbox.stats(MQTT).owed,
            published: t.published,
            acked: t.acked,
            reconnects: t.reconnects,
            connect_failures: t.connect_failures,
            durable: t.durable,
            spool_write_errors: t.write_errors,
            spool: spool.stats(),
        });
    };
    // A rewrite after a failed write, and the age cap, also run when nothing else happens.
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The next timer: the sweep's timeout, a birth to answer, a deferred clear.
        let wake = [
            sweep.as_ref().map(|(_, at)| *at),
            birth_due,
            deferred.front().map(|(at, _)| *at),
        ]
        .into_iter()
        .flatten()
        .min();
        tokio::select! {
            _ = cancel.cancelled() => {
                if session.connected {
                    let _ = session.client.try_publish(&p.status, QoS::AtLeastOnce, true, "stopped");
                    let _ = session.client.try_disconnect();
                    // Let the event loop send them.
                    let _ = tokio::time::timeout(Duration::from_millis(500), async {
                        while let Ok(ev) = session.next_event().await {
                            if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                                break;
                            }
                        }
                    })
                    .await;
                }
                return;
            }
            first = rx.recv() => {
                let Some(first) = first else {
                    cancel.cancel();
                    continue;
                };
                crate::fault::inject("publisher");
                // Everything waiting now goes to the writer as one batch; batches queued
                // during an fsync share the next one.
                let mut batch = vec![first];
                while let Ok(r) = rx.try_recv() {
                    batch.push(r);
                    if batch.len() >= 1024 {
                        break;
                    }
                }
                let mut alerts = Vec::new();
                for r in batch {
                    match r {
                        Request::Retained { topic, payload } => {
                            let topic = format!("{}{topic}", p.node_prefix);
                            let mut r = Retained { map: retained, cleared, to_clear, deferred };
                            r.set(&mut session, &mut outbox, topic, payload);
                        }
                        Request::ClearRetained { scope } => {
                            let scope = format!("{}{scope}", p.node_prefix);
                            // With Home Assistant, the state topics go after its entities.
                            let grace = p.discovery.as_ref().map(|_| HA_DROP_GRACE);
                            let mut r = Retained { map: retained, cleared, to_clear, deferred };
                            r.clear(&mut session, &mut outbox, scope, grace);
                        }
                        Request::AllowRetained { scope } => {
                            let scope = format!("{}{scope}", p.node_prefix);
                            let mut r = Retained { map: retained, cleared, to_clear, deferred };
                            r.allow(&scope);
                        }
                        Request::Streams { ids } => {
                            *current = Some(ids);
                        }
                        Request::StreamOnline { stream, online } => {
                            if *stopping && online {
                                continue;
                            }
                            let topic = super::stream_topic(&p.node_prefix, &stream, "availability");
                            let payload = if online { "online" } else { "offline" };
                            let mut r = Retained { map: retained, cleared, to_clear, deferred };
                            r.set(&mut session, &mut outbox, topic, payload.as_bytes().to_vec());
                        }
                        Request::Stopping => {
                            *stopping = true;
                            let streams: Vec<String> = retained
                                .keys()
                                .filter(|t| t.ends_with("/availability"))
                                .cloned()
                                .collect();
                            let mut r = Retained { map: retained, cleared, to_clear, deferred };
                            for topic in streams {
                                r.set(&mut session, &mut outbox, topic, b"offline".to_vec());
                            }
                        }
                        Request::AlertEvent { stream, kind, alert_id, sentence, score } => {
                            if let Some(d) = &p.discovery {
                                let payload = d.event_payload(kind.as_str(), &alert_id, &sentence, score);
                                session.send_unspooled(&mut outbox, &d.event_topic(&stream), false, payload);
                            }
                        }
                        Request::Announce { stream } => {
                            if let Some(d) = &p.discovery {
                                let configs = d.stream_configs(&stream);
                                for (topic, payload) in &configs {
                                    to_clear.remove(topic);
                                    retained.insert(topic.clone(), payload.clone());
                                }
                                session.send_retained(
                                    &mut outbox,
                                    retained,
                                    configs.iter().map(|(t, _)| t),
                                );
                            }
                        }
                        Request::Retract { stream } => {
                            // Exact topics: nothing to refuse later (a re-added stream
                            // announces again), so no cleared scope is kept.
                            if let Some(d) = &p.discovery {
                                for (topic, _) in d.stream_configs(&stream) {
                                    if retained.remove(&topic).is_none() {
                                        continue;
                                    }
                                    if session.connected {
                                        session.send_unspooled(&mut outbox, &topic, true, Vec::new());
                                    } else {
                                        to_clear.insert(topic);
                                    }
                                }
                            }
                        }
                        Request::FaceCrop { alert_id, jpeg } => {
                            let topic = format!("{}/{alert_id}/face", p.alerts);
                            session.send_unspooled(&mut outbox, &topic, false, jpeg);
                        }
                        Request::Alert { alert_id, kind, payload, done } => {
                            let seq = spool
                                .append(&alert_id, kind, crate::publish::spool::now_ms(), payload)
                                .seq();
                            alerts.push((seq, done));
                        }
                    }
                }
                if !alerts.is_empty() {
                    writer.flush(spool, alerts);
                }
                publish_stats(&session, spool, tally, &outbox);
            }
            Some(done) = writer.done.recv() => {
                match done {
                    LogDone::Written { through, result } => {
                        // Published once written: a crash can lose an alert nobody saw, never
                        // one the broker delivered without a spool record. While the disk
                        // refuses writes they go out anyway, and the spool says it is not
                        // durable until everything pending is rewritten.
                        if result.is_err() {
                            tally.write_errors += 1;
                            if tally.durable {
                                tracing::error!("Spool: not durable; alerts still go to the broker while the disk refuses writes.");
                            }
                            tally.durable = false;
                            spool.rewrite_all();
                        }
                        for seq in settle(&mut writer.awaiting, through, &result) {
                            for gone in outbox.add(seq) {
                                spool.ack(gone);
                            }
                            hooks.settle_unwanted(&mut outbox, spool, seq);
                        }
                        // What a webhook's cap gave up stays given up after a restart.
                        for (sink, seq) in outbox.take_given_up() {
                            spool.sink_ack(seq, &hooks.sink_name(sink));
                        }
                        session.pump(&mut outbox, p, spool, &mut tally.published);
                        hooks.pump(&mut outbox, spool);
                        share_sinks(&outbox, &hooks);
                    }
                    LogDone::Compacted { result: Ok(()) } => {
                        if !tally.durable {
                            tracing::info!("Spool: durable again (everything pending rewritten).");
                        }
                        tally.durable = true;
                    }
                    LogDone::Compacted { result: Err(_) } => {
                        tally.write_errors += 1;
                        spool.compaction_failed();
                    }
                }
                publish_stats(&session, spool, tally, &outbox);
            }
            Some((sink, seq, outcome)) = hooks.results.recv() => {
                // Delivered, or refused for good (counted by the worker): either way the
                // webhook does not owe it any more.
                if !matches!(outcome, Outcome::Retry(_)) {
                    let took = outbox.acked_seq(sink, seq);
                    sink_took(spool, took, &hooks.sink_name(sink));
                }
                hooks.pump(&mut outbox, spool);
                if outbox.stats(sink).in_flight == 0 {
                    writer.flush(spool, Vec::new());
                }
                share_sinks(&outbox, &hooks);
                publish_stats(&session, spool, tally, &outbox);
            }
            _ = async { tokio::time::sleep_until(wake.expect("guarded")).await }, if wake.is_some() => {
                let now = tokio::time::Instant::now();
                if sweep.as_ref().is_some_and(|(_, at)| *at <= now)
                    && let Some((s, _)) = sweep.take()
                {
                    tracing::warn!("The broker did not return the sweep's marker in time; going online without clearing what an earlier run left retained.");
                    for f in s.filters() {
                        let _ = session.client.try_unsubscribe(f);
                    }
                    go_online(&mut session, &mut outbox, p, retained, to_clear);
                }
                if birth_due.is_some_and(|at| at <= now) {
                    birth_due = None;
                    if let Some(d) = &p.discovery {
                        tracing::info!("Home Assistant is online; discovery configs sent again.");
                        session.send_retained(
                            &mut outbox,
                            retained,
                            retained.keys().filter(|t| d.owns(t)),
                        );
                    }
                }
                while deferred.front().is_some_and(|(at, _)| *at <= now) {
                    let (_, topic) = deferred.pop_front().expect("front exists");
                    if session.connected {
                        session.send_unspooled(&mut outbox, &topic, true, Vec::new());
                    } else {
                        to_clear.insert(topic);
                    }
                }
            }
            _ = tick.tick() => {
                session.drain_retained(&mut outbox, retained);
                writer.flush(spool, Vec::new());
                share_sinks(&outbox, &hooks);
                publish_stats(&session, spool, tally, &outbox);
            }
            _ = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => {
                retry_at = None;
            }
            ev = session.next_event(), if retry_at.is_none() => {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if session.connected {
                            continue;
                        }
                        session.connected = true;
                        outbox.connected(MQTT);
                        backoff.on_up(std::time::Instant::now());
                        last_failure = None;
                        tracing::info!("MQTT connected.");
                        if current.is_some() {
                            // What an earlier run left retained is read back first; the node
                            // goes online when the sweep is done (or after its timeout).
                            let s = super::sweep::Sweep::new(&p.node_prefix, p.discovery.as_ref(), rng.u64(..));
                            for f in s.filters() {
                                let _ = session.client.try_subscribe(f, QoS::AtLeastOnce);
                            }
                            let _ = session.client.try_publish(s.marker_topic(), QoS::AtLeastOnce, false, s.marker());
                            sweep = Some((s, tokio::time::Instant::now() + SWEEP_TIMEOUT));
                        } else {
                            go_online(&mut session, &mut outbox, p, retained, to_clear);
                        }
                        // Entries whose write is still running join the outbox when it settles.
                        session.pump(&mut outbox, p, spool, &mut tally.published);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        outbox.tagged(MQTT, u64::from(pkid));
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        let took = outbox.acked_seq(MQTT, u64::from(ack.pkid));
                        if let Some((seq, _)) = took {
                            tally.acked += 1;
                            let _ = acks.send(seq);
                        }
                        sink_took(spool, took, MQTT_NAME);
                        session.drain_retained(&mut outbox, retained);
                        // Acks are made durable in batches: a lost ack only means a duplicate.
                        if outbox.stats(MQTT).in_flight == 0 || tally.acked % 1024 == 0 {
                            writer.flush(spool, Vec::new());
                        }
                        session.pump(&mut outbox, p, spool, &mut tally.published);
                    }
                    Ok(Event::Incoming(Packet::Publish(m))) => {
                        let complete = sweep
                            .as_mut()
                            .is_some_and(|(s, _)| s.on_message(&m.topic, &m.payload, m.retain));
                        if complete && let Some((s, _)) = sweep.take() {
                            end_sweep(&mut session, &mut outbox, p, s, current.as_ref(), retained, to_clear);
                        }
                        if let Some(d) = &p.discovery
                            && m.topic == d.birth_topic()
                            && m.payload.as_ref() == crate::publish::homeassistant::BIRTH
                        {
                            // A burst of births (or a flapping Home Assistant) is answered once.
                            birth_due.get_or_insert(tokio::time::Instant::now() + BIRTH_DEBOUNCE);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let wait = backoff.on_failure(std::time::Instant::now(), rng.f64());
                        if session.connected {
                            tally.reconnects += 1;
                            tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "MQTT connection lost.");
                        } else {
                            tally.connect_failures += 1;
                            // Said once per distinct reason (a wrong CA or a refused login
                            // must be visible), then quietly while it keeps failing the same way.
                            let reason = e.to_string();
                            if last_failure.as_deref() != Some(reason.as_str()) {
                                tracing::warn!(error = %reason, retry_in_ms = wait.as_millis() as u64, "MQTT connect failed; retrying with backoff.");
                                last_failure = Some(reason);
                            } else {
                                tracing::debug!(error = %reason, retry_in_ms = wait.as_millis() as u64, "MQTT connect failed.");
                            }
                        }
                        writer.flush(spool, Vec::new());
                        session = Session::new(p);
                        sweep = None;
                        outbox.disconnected(MQTT);
                        // Durable answers and new alerts go on while it waits.
                        retry_at = Some(tokio::time::Instant::now() + wait);
                        publish_stats(&session, spool, tally, &outbox);
                    }
                }
                // Counters are cheap to read but waking watchers on every packet is not.
                if !session.connected
                    || outbox.stats(MQTT).in_flight == 0
                    || tally.acked % 256 == 0
                {
                    publish_stats(&session, spool, tally, &outbox);
                }
            }
        }
    }
}
