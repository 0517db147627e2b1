//! The outbox: which durable alert each sink still owes an acknowledgement for, what to hand
//! to each sink's transport next, and when an alert may leave the spool. Sans-IO: the
//! publisher's task tells it what happened (an alert became durable, a sink connected, the
//! transport took or tagged or acknowledged a message) and does what it answers.
//!
//! - Each sink has its own acknowledgement book: an alert leaves the spool once every sink
//!   has acknowledged it (or given it up, below).
//! - Transports that only say *which packet* they acknowledge (MQTT: rumqttc reports the packet
//!   id it gave each outgoing publish, in hand-over order, then PUBACKs by packet id) are
//!   matched here: messages handed over wait in order for their tag, tags map to alerts.
//!   Messages outside the spool (statuses) take tags too and are matched as `None`.
//! - A connection loss forgets what was in flight; on the next connection everything the sink
//!   still owes is sent again, oldest first (delivery is at least once).
//! - Each sink is capped on its own (`max_owed`): past it, the sink gives up its oldest
//!   alerts (counted), so a dead sink never pins alerts for the others.

use std::collections::{BTreeSet, HashMap, VecDeque};

/// A sink's index in the outbox.
pub type SinkId = usize;

/// The publisher's sinks, typed: MQTT, or the config's webhook `i`. The outbox numbers them
/// ([`Sink::id`]: MQTT first, then the webhooks in order); the spool names them
/// ([`Sink::name`]) in its per-sink acknowledgements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Mqtt,
    Webhook(usize),
}

impl Sink {
    /// The sink's index in the outbox.
    pub fn id(self) -> SinkId {
        match self {
            Sink::Mqtt => 0,
            Sink::Webhook(i) => 1 + i,
        }
    }

    /// The sink of an outbox index.
    pub fn of(id: SinkId) -> Sink {
        match id {
            0 => Sink::Mqtt,
            n => Sink::Webhook(n - 1),
        }
    }

    /// Its name in the spool's acknowledgements and in the outbox's counters: `mqtt`, or
    /// `webhook:<name>` for the webhook named `webhook`.
    pub fn name(self, webhook: impl FnOnce(usize) -> String) -> String {
        match self {
            Sink::Mqtt => crate::publish::spool::MQTT_SINK.to_string(),
            Sink::Webhook(i) => webhook_sink_name(&webhook(i)),
        }
    }
}

/// A webhook's sink name (`webhook:<name>`).
pub fn webhook_sink_name(name: &str) -> String {
    format!("webhook:{name}")
}

/// One sink's settings.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub name: String,
    /// Messages handed to the transport and not yet acknowledged, at most.
    pub max_in_flight: usize,
    /// Alerts this sink may owe at once; past it the oldest are given up (counted).
    pub max_owed: usize,
}

#[derive(Debug)]
struct SinkState {
    cfg: SinkConfig,
    connected: bool,
    /// Every alert this sink owes an acknowledgement for, oldest first.
    owed: BTreeSet<u64>,
    /// Owed, not yet handed over this connection, oldest first.
    queue: VecDeque<u64>,
    /// Handed to the transport, waiting for its tag, in hand-over order.
    handed: VecDeque<Option<u64>>,
    /// Live tag -> alert.
    inflight: HashMap<u64, u64>,
    /// Alerts given up by the cap.
    given_up: u64,
}

/// Counters of one sink.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkStats {
    pub connected: bool,
    pub owed: usize,
    pub in_flight: usize,
    pub given_up: u64,
}

/// The outbox of every sink.
#[derive(Debug)]
pub struct Outbox {
    sinks: Vec<SinkState>,
    /// Alert -> sinks that still owe it.
    holds: HashMap<u64, usize>,
    /// `(sink, alert)` given up by a cap since [`Outbox::take_given_up`] (to record, so a
    /// restart does not owe them again).
    given_up: Vec<(SinkId, u64)>,
}

impl Outbox {
    pub fn new(sinks: Vec<SinkConfig>) -> Self {
        Outbox {
            sinks: sinks
                .into_iter()
                .map(|cfg| SinkState {
                    cfg,
                    connected: false,
                    owed: BTreeSet::new(),
                    queue: VecDeque::new(),
                    handed: VecDeque::new(),
                    inflight: HashMap::new(),
                    given_up: 0,
                })
                .collect(),
            holds: HashMap::new(),
            given_up: Vec::new(),
        }
    }

    /// The `(sink, alert)` pairs caps gave up since the last call.
    pub fn take_given_up(&mut self) -> Vec<(SinkId, u64)> {
        std::mem::take(&mut self.given_up)
    }

    /// An alert became durable: every sink owes it. Returns the alerts no sink owes any
    /// more because a sink's cap made it give them up (to be acknowledged in the spool).
    pub fn add(&mut self, seq: u64) -> Vec<u64> {
        if self.holds.contains_key(&seq) {
            return Vec::new();
        }
        self.holds.insert(seq, self.sinks.len());
        let mut released = Vec::new();
        for id in 0..self.sinks.len() {
            let s = &mut self.sinks[id];
            s.owed.insert(seq);
            if s.connected {
                s.queue.push_back(seq);
                // Alerts no longer owed leave the queue lazily (`next` skips them); the
                // queue stays within a constant factor of what is owed.
                if s.queue.len() > 2 * s.owed.len() + 64 {
                    let owed = &s.owed;
                    s.queue.retain(|q| owed.contains(q));
                }
            }
            while s.owed.len() > s.cfg.max_owed {
                let Some(oldest) = s.owed.pop_first() else {
                    break;
                };
                s.given_up += 1;
                self.given_up.push((id, oldest));
                if Self::release(&mut self.holds, oldest) {
                    released.push(oldest);
                }
            }
        }
        released
    }

    /// One sink fewer owes `seq`; `true` when none does any more.
    fn release(holds: &mut HashMap<u64, usize>, seq: u64) -> bool {
        match holds.get_mut(&seq) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                holds.remove(&seq);
                true
            }
            None => false,
        }
    }

    /// The sink's transport connected: everything it owes is sent again, oldest first.
    pub fn connected(&mut self, sink: SinkId) {
        let s = &mut self.sinks[sink];
        s.connected = true;
        s.handed.clear();
        s.inflight.clear();
        s.queue = s.owed.iter().copied().collect();
    }

    /// The sink's transport lost its connection: what was in flight is forgotten (it is
    /// owed still, and sent again on the next connection).
    pub fn disconnected(&mut self, sink: SinkId) {
        let s = &mut self.sinks[sink];
        s.connected = false;
        s.handed.clear();
        s.inflight.clear();
        s.queue.clear();
    }

    /// The next alert to hand to the sink's transport, within its in-flight window. Alerts
    /// the sink stopped owing while queued (given up, settled, forgotten) are skipped here,
    /// which keeps those operations free of queue scans.
    pub fn next(&mut self, sink: SinkId) -> Option<u64> {
        let s = &mut self.sinks[sink];
        if !s.connected || s.handed.len() + s.inflight.len() >= s.cfg.max_in_flight {
            return None;
        }
        while let Some(seq) = s.queue.pop_front() {
            if s.owed.contains(&seq) {
                return Some(seq);
            }
        }
        None
    }

    /// The oldest alert the sink owes.
    pub fn first_owed(&self, sink: SinkId) -> Option<u64> {
        self.sinks[sink].owed.first().copied()
    }

    /// The transport took a message: an alert (`Some`) or one outside the spool (`None`).
    pub fn handed(&mut self, sink: SinkId, seq: Option<u64>) {
        self.sinks[sink].handed.push_back(seq);
    }

    /// The transport could not take `seq` now (its queue is full): it goes first next time.
    pub fn refused(&mut self, sink: SinkId, seq: u64) {
        self.sinks[sink].queue.push_front(seq);
    }

    /// The transport gave the oldest handed message the tag `tag` (MQTT: its packet id).
    pub fn tagged(&mut self, sink: SinkId, tag: u64) {
        let s = &mut self.sinks[sink];
        if let Some(Some(seq)) = s.handed.pop_front() {
            s.inflight.insert(tag, seq);
        }
    }

    /// The transport acknowledged `tag`: returns the alert if no sink owes it any more (to
    /// be acknowledged in the spool).
    pub fn acked(&mut self, sink: SinkId, tag: u64) -> Option<u64> {
        match self.acked_seq(sink, tag)? {
            (seq, true) => Some(seq),
            (_, false) => None,
        }
    }

    /// [`Outbox::acked`], saying which alert the sink had and whether no sink owes it any
    /// more (`true`: leave the spool; `false`: record the sink's copy, others still owe it).
    pub fn acked_seq(&mut self, sink: SinkId, tag: u64) -> Option<(u64, bool)> {
        let s = &mut self.sinks[sink];
        let seq = s.inflight.remove(&tag)?;
        if !s.owed.remove(&seq) {
            return None;
        }
        Some((seq, Self::release(&mut self.holds, seq)))
    }

    /// The sink does not owe `seq` (it had it before a restart, or takes no events of its
    /// kind): returns the alert if no sink owes it any more.
    pub fn settled(&mut self, sink: SinkId, seq: u64) -> Option<u64> {
        let s = &mut self.sinks[sink];
        if !s.owed.remove(&seq) {
            return None;
        }
        Self::release(&mut self.holds, seq).then_some(seq)
    }

    /// The number of sinks.
    pub fn len(&self) -> usize {
        self.sinks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    /// The alert left the spool for another reason (coalesced, dropped by a cap): no sink
    /// owes it any more.
    pub fn forget(&mut self, seq: u64) {
        if self.holds.remove(&seq).is_none() {
            return;
        }
        for s in &mut self.sinks {
            s.owed.remove(&seq);
        }
    }

    pub fn stats(&self, sink: SinkId) -> SinkStats {
        let s = &self.sinks[sink];
        SinkStats {
            connected: s.connected,
            owed: s.owed.len(),
            in_flight: s.handed.len() + s.inflight.len(),
            given_up: s.given_up,
        }
    }

    pub fn name(&self, sink: SinkId) -> &str {
        &self.sinks[sink].cfg.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(name: &str, max_in_flight: usize, max_owed: usize) -> SinkConfig {
        SinkConfig {
            name: name.into(),
            max_in_flight,
            max_owed,
        }
    }

    /// Hands everything the window allows to `sink`, tagging each with `tag0 + i`.
    fn send_all(o: &mut Outbox, sink: SinkId, tag0: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        while let Some(seq) = o.next(sink) {
            o.handed(sink, Some(seq));
            let tag = tag0 + out.len() as u64;
            o.tagged(sink, tag);
            out.push((seq, tag));
        }
        out
    }

    #[test]
    fn acknowledgements_match_by_tag_in_hand_over_order_with_unspooled_messages_between() {
        let mut o = Outbox::new(vec![sink("mqtt", 10, 100)]);
        o.connected(0);
        for seq in [1, 2, 3] {
            assert!(o.add(seq).is_empty());
        }
        // A status goes out first and takes a packet id too.
        o.handed(0, None);
        o.tagged(0, 7);
        let mut sent = Vec::new();
        while let Some(seq) = o.next(0) {
            o.handed(0, Some(seq));
            sent.push(seq);
        }
        assert_eq!(sent, [1, 2, 3]);
        for tag in [8, 9, 10] {
            o.tagged(0, tag);
        }
        assert_eq!(o.acked(0, 7), None, "the status is not an alert");
        // Out of order, and a duplicate ack.
        assert_eq!(o.acked(0, 10), Some(3));
        assert_eq!(o.acked(0, 10), None);
        assert_eq!(o.acked(0, 8), Some(1));
        assert_eq!(o.stats(0).owed, 1);
    }

    #[test]
    fn a_reconnect_sends_again_everything_still_owed_oldest_first() {
        let mut o = Outbox::new(vec![sink("mqtt", 2, 100)]);
        for seq in 1..=5 {
            o.add(seq);
        }
        assert_eq!(o.next(0), None, "nothing goes out while disconnected");
        o.connected(0);
        let first = send_all(&mut o, 0, 100);
        assert_eq!(first, [(1, 100), (2, 101)], "the in-flight window is 2");
        assert_eq!(o.acked(0, 100), Some(1));
        assert_eq!(send_all(&mut o, 0, 200), [(3, 200)]);
        // Lost: 2 and 3 were in flight; 4 and 5 never left.
        o.disconnected(0);
        assert_eq!(o.acked(0, 101), None, "a stale tag of the old connection");
        o.connected(0);
        let again = send_all(&mut o, 0, 300);
        assert_eq!(again.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(o.acked(0, 300), Some(2));
        assert_eq!(o.acked(0, 301), Some(3));
        let rest: Vec<u64> = send_all(&mut o, 0, 400).iter().map(|(s, _)| *s).collect();
        assert_eq!(rest, [4, 5]);
    }

    #[test]
    fn an_alert_leaves_only_when_every_sink_acknowledged_it() {
        let mut o = Outbox::new(vec![sink("mqtt", 10, 100), sink("webhook", 10, 100)]);
        o.connected(0);
        o.connected(1);
        o.add(1);
        send_all(&mut o, 0, 0);
        send_all(&mut o, 1, 0);
        assert_eq!(o.acked(0, 0), None, "the webhook still owes it");
        assert_eq!(o.acked(1, 0), Some(1));
    }

    #[test]
    fn a_dead_sink_gives_up_its_oldest_alerts_on_its_own_and_pins_nothing() {
        // The webhook never connects; it may owe 3 alerts at most.
        let mut o = Outbox::new(vec![sink("mqtt", 10, 1000), sink("webhook", 10, 3)]);
        o.connected(0);
        let mut released = Vec::new();
        for seq in 1..=5 {
            released.extend(o.add(seq));
        }
        assert!(released.is_empty(), "MQTT still owes them");
        assert_eq!(o.stats(1).given_up, 2);
        assert_eq!(o.stats(1).owed, 3);
        // MQTT acknowledges all five: 1 and 2 leave at once (the webhook gave them up), the
        // rest wait for the webhook.
        let sent = send_all(&mut o, 0, 0);
        let done: Vec<u64> = sent.iter().filter_map(|(_, t)| o.acked(0, *t)).collect();
        assert_eq!(done, [1, 2]);
        // Past its cap, the webhook gives up 3, which MQTT has acknowledged: it leaves now.
        assert_eq!(o.add(6), vec![3]);
        let sent = send_all(&mut o, 0, 100);
        assert_eq!(sent.iter().filter_map(|(_, t)| o.acked(0, *t)).count(), 0);
        assert_eq!(o.add(7), vec![4]);
        assert_eq!(o.stats(1).given_up, 4);
    }

    #[test]
    fn a_forgotten_alert_is_never_sent() {
        let mut o = Outbox::new(vec![sink("mqtt", 10, 100)]);
        o.connected(0);
        o.add(1);
        o.add(2);
        o.forget(1);
        assert_eq!(send_all(&mut o, 0, 0), [(2, 0)]);
        assert_eq!(o.stats(0).owed, 1);
        assert_eq!(o.name(0), "mqtt");
    }

    #[test]
    fn a_sink_settles_what_it_had_and_skips_what_it_stopped_owing() {
        let mut o = Outbox::new(vec![sink("mqtt", 10, 100), sink("hook", 1, 2)]);
        o.connected(0);
        o.connected(1);
        for seq in [1, 2] {
            assert!(o.add(seq).is_empty());
        }
        // The hook had 1 before a restart: settled, MQTT still owes it.
        assert_eq!(o.settled(1, 1), None);
        assert_eq!(o.next(1), Some(2), "1 is skipped: not owed any more");
        o.handed(1, Some(2));
        o.tagged(1, 2);
        assert_eq!(o.next(1), None, "one in flight at a time");
        // MQTT takes both: 1 is released (nobody owes it), 2 the hook still owes.
        let sent = send_all(&mut o, 0, 100);
        assert_eq!(o.acked_seq(0, sent[0].1), Some((1, true)));
        assert_eq!(o.acked_seq(0, sent[1].1), Some((2, false)));
        assert_eq!(o.acked_seq(1, 2), Some((2, true)));
        // The cap gives up the oldest; the hook's floor moves past it.
        for seq in [3, 4, 5] {
            let released = o.add(seq);
            assert!(released.is_empty() || released == [3]);
        }
        assert_eq!(o.first_owed(1), Some(4));
        assert_eq!(o.stats(1).given_up, 1);
    }
}
