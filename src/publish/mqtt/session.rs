//! One MQTT connection's state ([`Session`]): rumqttc's client and event loop, driven by a
//! task of its own, and the retained messages still to send on it. Dropped whole on a loss.

use std::collections::VecDeque;

use rumqttc::{AsyncClient, Event, EventLoop, QoS};
use tokio::sync::mpsc;

use super::config::Prepared;
use crate::publish::outbox::{Outbox, Sink};
use crate::publish::spool::Spool;

/// The connection-scoped state: dropped whole on a loss (with rumqttc's own queue of in-flight
/// messages, whose re-sends the outbox could not match).
pub(crate) struct Session {
    pub(crate) client: AsyncClient,
    /// rumqttc's event loop until the session starts (it waits out its backoff first).
    pub(crate) idle: Option<Box<EventLoop>>,
    /// Then its events, from a task of its own that drives it. rumqttc's `poll` is not
    /// cancel-safe while it connects: polled in the publisher's `select!`, every other event
    /// (a request, a written batch, the tick) dropped the connect in progress, so a broker
    /// slower to answer than the gap between two events was never reached, and a silent one
    /// was retried at once, for ever, without its connect timeout running out.
    pub(crate) running: Option<(EventRx, AbortOnDrop)>,
    pub(crate) connected: bool,
    /// Retained topics still to (re)send on this connection: what rumqttc's request queue
    /// had no room for (a reconnect or Home Assistant's birth sends many at once), sent as
    /// room frees. At most one entry per retained topic.
    pub(crate) retained_due: VecDeque<String>,
}

type EventRx = mpsc::Receiver<Result<Event, rumqttc::ConnectionError>>;

/// Aborts the task when dropped (a session dropped on a loss takes its driver with it).
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

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
    pub(crate) fn new(p: &Prepared) -> Session {
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
    pub(crate) fn send_retained<'a>(
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
    pub(crate) fn drain_retained(
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
            outbox.handed(Sink::Mqtt.id(), None);
            self.retained_due.pop_front();
        }
    }

    /// The next event of this connection, starting its driver (and so the connect) on the
    /// first call. Cancel-safe: the connect goes on whatever else the caller does meanwhile.
    pub(crate) async fn next_event(&mut self) -> Result<Event, rumqttc::ConnectionError> {
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
    pub(crate) fn send_unspooled(
        &mut self,
        outbox: &mut Outbox,
        topic: &str,
        retain: bool,
        payload: Vec<u8>,
    ) {
        if self.connected
            && self
                .client
                .try_publish(topic, QoS::AtLeastOnce, retain, payload)
                .is_ok()
        {
            outbox.handed(Sink::Mqtt.id(), None);
        }
    }

    /// Hands the alerts the outbox says are next to rumqttc while its request queue has room.
    pub(crate) fn pump(
        &mut self,
        outbox: &mut Outbox,
        p: &Prepared,
        spool: &Spool,
        published: &mut u64,
    ) {
        if !self.connected {
            return;
        }
        while let Some(seq) = outbox.next(Sink::Mqtt.id()) {
            let Some(entry) = spool.get(seq) else {
                outbox.forget(seq); // coalesced or dropped by a cap meanwhile
                continue;
            };
            match self
                .client
                .try_publish(&p.alerts, QoS::AtLeastOnce, false, entry.payload.clone())
            {
                Ok(()) => {
                    outbox.handed(Sink::Mqtt.id(), Some(seq));
                    *published += 1;
                }
                Err(_) => {
                    outbox.refused(Sink::Mqtt.id(), seq);
                    break;
                }
            }
        }
    }
}
