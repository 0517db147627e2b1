//! The publisher's task: the I/O around the spool ([`crate::publish::spool`]) and the outbox
//! ([`crate::publish::outbox`]). One tokio task owns the MQTT session
//! ([`crate::publish::mqtt::session`]), the retained messages
//! ([`crate::publish::mqtt::retained`]), the webhooks' workers ([`super::hooks`]) and the
//! spool's writer ([`super::writer`]), and tells the outbox what the broker and the webhooks
//! did.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{Event, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::hooks::{Hooks, sink_took};
use super::writer::{Writer, settle};
use super::{PublisherStats, Request};
use crate::backoff::Backoff;
use crate::publish::mqtt::config::{MAX_IN_FLIGHT, Prepared};
use crate::publish::mqtt::retained::{HA_DROP_GRACE, Retained, end_sweep, go_online};
use crate::publish::mqtt::session::Session;
use crate::publish::outbox::{Outbox, Sink, SinkConfig};
use crate::publish::spool::{LogDone, Spool};
use crate::publish::webhook::{Outcome, Webhook};

/// The MQTT sink's name in the spool's per-sink acknowledgements.
const MQTT_NAME: &str = crate::publish::spool::MQTT_SINK;

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
    /// The broker refused the sweep's subscriptions (an ACL that allows publishing only), or
    /// dropped the connection while one was under way (brokers that disconnect on a denied
    /// subscribe): no more sweeps this run, so the node still goes online at once.
    sweep_off: bool,
}

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
        sweep_off: false,
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
        sweep_off,
    } = kept;
    // This connection's sweep and when the node's `online` goes out without it.
    let mut sweep: Option<(crate::publish::mqtt::sweep::Sweep, tokio::time::Instant)> = None;
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
            name: crate::publish::outbox::webhook_sink_name(&h.cfg.name),
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
            mqtt_owed: outbox.stats(Sink::Mqtt.id()).owed,
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
                            let topic = crate::publish::mqtt::stream_topic(&p.node_prefix, &stream, "availability");
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
                        outbox.connected(Sink::Mqtt.id());
                        backoff.on_up(std::time::Instant::now());
                        last_failure = None;
                        tracing::info!("MQTT connected.");
                        if current.is_some() && !*sweep_off {
                            // What an earlier run left retained is read back first; the node
                            // goes online when the sweep is done (or after its timeout).
                            let s = crate::publish::mqtt::sweep::Sweep::new(&p.node_prefix, p.discovery.as_ref(), rng.u64(..));
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
                        outbox.tagged(Sink::Mqtt.id(), u64::from(pkid));
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        let took = outbox.acked_seq(Sink::Mqtt.id(), u64::from(ack.pkid));
                        if let Some((seq, _)) = took {
                            tally.acked += 1;
                            let _ = acks.send(seq);
                        }
                        sink_took(spool, took, MQTT_NAME);
                        session.drain_retained(&mut outbox, retained);
                        // Acks are made durable in batches: a lost ack only means a duplicate.
                        if outbox.stats(Sink::Mqtt.id()).in_flight == 0 || tally.acked % 1024 == 0 {
                            writer.flush(spool, Vec::new());
                        }
                        session.pump(&mut outbox, p, spool, &mut tally.published);
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack)))
                        if sweep.is_some()
                            && ack
                                .return_codes
                                .iter()
                                .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) =>
                    {
                        if let Some((s, _)) = sweep.take() {
                            tracing::warn!("The broker refused the subscriptions that read back what an earlier run left retained (an ACL?); going online without that sweep, and not sweeping again this run.");
                            for f in s.filters() {
                                let _ = session.client.try_unsubscribe(f);
                            }
                            *sweep_off = true;
                            go_online(&mut session, &mut outbox, p, retained, to_clear);
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(m))) => {
                        let complete = sweep
                            .as_mut()
                            .is_some_and(|(s, _)| s.on_message(&m.topic, &m.payload, m.retain));
                        if complete && let Some((s, _)) = sweep.take() {
                            end_sweep(&mut session, &mut outbox, p, s, current.as_ref(), retained, to_clear, deferred);
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
                        if sweep.take().is_some() && !*sweep_off {
                            tracing::warn!("The connection was lost during the sweep at connect; not sweeping again this run.");
                            *sweep_off = true;
                        }
                        outbox.disconnected(Sink::Mqtt.id());
                        // Durable answers and new alerts go on while it waits.
                        retry_at = Some(tokio::time::Instant::now() + wait);
                        publish_stats(&session, spool, tally, &outbox);
                    }
                }
                // Counters are cheap to read but waking watchers on every packet is not.
                if !session.connected
                    || outbox.stats(Sink::Mqtt.id()).in_flight == 0
                    || tally.acked % 256 == 0
                {
                    publish_stats(&session, spool, tally, &outbox);
                }
            }
        }
    }
}
