//! The publisher's retained messages, by full topic, and the scopes cleared on the broker
//! ([`Retained`]), and what a connect publishes around the sweep ([`go_online`],
//! [`end_sweep`]).

use std::collections::VecDeque;
use std::time::Duration;

use rumqttc::QoS;

use super::config::Prepared;
use super::session::Session;
use crate::publish::outbox::Outbox;

/// Scopes cleared at once (removed streams); past it the oldest is forgotten (its late
/// retained messages, if any, are published again).
pub(crate) const MAX_CLEARED_SCOPES: usize = 1024;

/// How long a removed stream's state topics stay after its discovery configs were cleared.
pub(crate) const HA_DROP_GRACE: Duration = Duration::from_secs(5);

/// The task's retained messages, by full topic, and the scopes cleared on the broker.
pub(crate) struct Retained<'a> {
    pub(crate) map: &'a mut std::collections::BTreeMap<String, Vec<u8>>,
    /// Cleared scopes (full topic prefixes), oldest first: retained messages under them are
    /// dropped until allowed again.
    pub(crate) cleared: &'a mut VecDeque<String>,
    /// Topics whose clearing waits for a connection.
    pub(crate) to_clear: &'a mut std::collections::BTreeSet<String>,
    /// Topics whose clearing waits for a time ([`HA_DROP_GRACE`]).
    pub(crate) deferred: &'a mut VecDeque<(tokio::time::Instant, String)>,
}

impl Retained<'_> {
    /// Clears every retained message under `scope` on the broker (an empty retained message
    /// each, now or at the next connect; after `grace` when given, so Home Assistant has
    /// dropped the entities that read them) and refuses later ones under it.
    pub(crate) fn clear(
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
    pub(crate) fn allow(&mut self, scope: &str) {
        self.cleared.retain(|c| c != scope);
        self.to_clear.retain(|t| !t.starts_with(scope));
        self.deferred.retain(|(_, t)| !t.starts_with(scope));
    }

    /// Sets a retained message (unless its scope was cleared) and sends it.
    pub(crate) fn set(
        &mut self,
        session: &mut Session,
        outbox: &mut Outbox,
        topic: String,
        payload: Vec<u8>,
    ) {
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
pub(crate) fn go_online(
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
/// subscriptions end, and the node goes online. With Home Assistant, a gone stream's
/// discovery configs are cleared now and its state topics after [`HA_DROP_GRACE`] (into
/// `deferred`), so no entity that still exists reads an emptied topic.
#[allow(clippy::too_many_arguments)]
pub(crate) fn end_sweep(
    session: &mut Session,
    outbox: &mut Outbox,
    p: &Prepared,
    s: super::sweep::Sweep,
    current: Option<&std::collections::BTreeSet<crate::types::StreamId>>,
    retained: &std::collections::BTreeMap<String, Vec<u8>>,
    to_clear: &mut std::collections::BTreeSet<String>,
    deferred: &mut VecDeque<(tokio::time::Instant, String)>,
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
    let later = tokio::time::Instant::now() + HA_DROP_GRACE;
    for (topic, payload) in publishes {
        to_clear.remove(&topic);
        let state_topic = super::parse_stream_topic(&p.node_prefix, &topic).is_some();
        if payload.is_empty() && state_topic && p.discovery.is_some() {
            deferred.push_back((later, topic));
        } else {
            session.send_unspooled(outbox, &topic, true, payload);
        }
    }
    go_online(session, outbox, p, retained, to_clear);
}
