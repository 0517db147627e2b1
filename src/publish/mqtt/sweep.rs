//! What this node left retained on the broker, read back at connect: a sans-IO state
//! machine the publisher's task drives.
//!
//! A daemon killed while it had a stream, or restarted without a stream its config no longer
//! names, leaves that stream's retained status, verdict and availability (and its Home
//! Assistant configs) on a persistent broker: Home Assistant would show a gone stream's "fake
//! face: on" with no end. At each connect the task subscribes to the node's stream topics
//! (`<prefix>/<node>/streams/+/+`) and its discovery configs, and publishes a marker to a
//! topic of its own that it subscribed to last: the broker sends a new subscription's
//! retained messages before it forwards anything published after, so when the marker comes
//! back every retained message has been seen. Then [`Sweep::finish`] says what to publish:
//! an empty retained message for each topic of a stream that is not the node's now, and
//! `offline` for the availability of a current stream that this run has not said yet (what
//! an earlier run left may say `online` while the stream is not). The node's `online` waits
//! for the sweep, so Home Assistant never sees a stale entity as available.

use std::collections::{BTreeMap, BTreeSet};

use crate::publish::homeassistant::Discovery;
use crate::types::StreamId;

/// Retained topics read back at most (the bound's cost: the rest are not swept this time;
/// the next connect sweeps again).
pub const MAX_FOUND: usize = 65_536;

/// One connect's sweep.
#[derive(Debug)]
pub struct Sweep {
    node_prefix: String,
    discovery: Option<Discovery>,
    nonce: String,
    /// Retained, non-empty topics seen so far.
    found: BTreeSet<String>,
    /// Topics seen beyond [`MAX_FOUND`].
    pub overflow: u64,
}

/// What a finished sweep publishes, retained: `(topic, payload)`.
pub type Publishes = Vec<(String, Vec<u8>)>;

impl Sweep {
    /// A sweep of `node_prefix` (`<prefix>/<node>/`) and, with `discovery`, of the node's
    /// discovery configs; `nonce` tells this sweep's marker from an earlier one's.
    pub fn new(node_prefix: &str, discovery: Option<&Discovery>, nonce: u64) -> Sweep {
        Sweep {
            node_prefix: node_prefix.to_string(),
            discovery: discovery.cloned(),
            nonce: format!("{nonce:016x}"),
            found: BTreeSet::new(),
            overflow: 0,
        }
    }

    /// The filters to subscribe to, the marker's topic last.
    pub fn filters(&self) -> Vec<String> {
        let mut f = vec![format!("{}streams/+/+", self.node_prefix)];
        if let Some(d) = &self.discovery {
            f.extend(d.config_filters());
        }
        f.push(self.marker_topic());
        f
    }

    /// Where the marker goes (not retained, QoS 1).
    pub fn marker_topic(&self) -> String {
        format!("{}sweep", self.node_prefix)
    }

    /// The marker's payload.
    pub fn marker(&self) -> Vec<u8> {
        self.nonce.as_bytes().to_vec()
    }

    /// A message from the broker; `true` when it is this sweep's marker (the sweep is
    /// complete). Only retained messages count: a live one is this run's own.
    pub fn on_message(&mut self, topic: &str, payload: &[u8], retain: bool) -> bool {
        if topic == self.marker_topic() {
            return payload == self.nonce.as_bytes();
        }
        if !retain || payload.is_empty() || !self.under(topic) {
            return false;
        }
        if self.found.len() >= MAX_FOUND {
            self.overflow += 1;
        } else {
            self.found.insert(topic.to_string());
        }
        false
    }

    fn under(&self, topic: &str) -> bool {
        crate::publish::mqtt::parse_stream_topic(&self.node_prefix, topic).is_some()
            || self.discovery.as_ref().is_some_and(|d| d.owns(topic))
    }

    /// What to publish now that every retained message was seen: `current` are the node's
    /// streams, `ours` the retained messages this run holds (by full topic; it sends them all
    /// again after the sweep).
    pub fn finish(
        self,
        current: &BTreeSet<StreamId>,
        ours: &BTreeMap<String, Vec<u8>>,
    ) -> Publishes {
        let mut out = Vec::new();
        for topic in &self.found {
            if ours.contains_key(topic) {
                continue;
            }
            let stream = crate::publish::mqtt::parse_stream_topic(&self.node_prefix, topic)
                .map(|(s, leaf)| (s, Some(leaf)))
                .or_else(|| {
                    self.discovery
                        .as_ref()
                        .and_then(|d| d.stream_of(topic))
                        .map(|s| (s, None))
                });
            match stream {
                Some((s, _)) if !current.contains(&s) => out.push((topic.clone(), Vec::new())),
                Some((_, Some("availability"))) => out.push((topic.clone(), b"offline".to_vec())),
                // A current stream's status and verdict: the stream says its own soon (its
                // verdict starts `unknown`); its configs are announced again.
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::NodeId;

    fn ids(v: &[&str]) -> BTreeSet<StreamId> {
        v.iter().map(|s| StreamId::new(s).unwrap()).collect()
    }

    #[test]
    fn what_no_current_stream_owns_is_cleared_and_stale_availability_goes_offline() {
        let node = NodeId::new("edge").unwrap();
        let d = Discovery::new("homeassistant", "dfwatch", &node, None);
        let mut s = Sweep::new("dfwatch/edge/", Some(&d), 7);
        let filters = s.filters();
        assert_eq!(filters[0], "dfwatch/edge/streams/+/+");
        assert_eq!(filters.last().unwrap(), "dfwatch/edge/sweep");
        assert!(
            filters
                .iter()
                .any(|f| f == "homeassistant/binary_sensor/dfwatch_edge/+/config")
        );
        let gone_configs = d.stream_configs(&StreamId::new("gone").unwrap());
        for (t, p) in &gone_configs {
            assert!(!s.on_message(t, p, true));
        }
        for t in [
            "dfwatch/edge/streams/gone/status",
            "dfwatch/edge/streams/gone/verdict",
            "dfwatch/edge/streams/gone/availability",
            "dfwatch/edge/streams/cam/status",
            "dfwatch/edge/streams/cam/verdict",
            "dfwatch/edge/streams/cam/availability",
            "dfwatch/edge/streams/kept/availability",
        ] {
            assert!(!s.on_message(t, b"x", true));
        }
        // Not retained (this run's own), emptied, another node's, another prefix: ignored.
        assert!(!s.on_message("dfwatch/edge/streams/other/status", b"x", false));
        assert!(!s.on_message("dfwatch/edge/streams/empty/status", b"", true));
        assert!(!s.on_message("dfwatch/edge2/streams/x/status", b"x", true));
        assert!(!s.on_message(
            "homeassistant/sensor/dfwatch_edge2/x_score/config",
            b"x",
            true
        ));
        // An older sweep's marker does not end this one; its own does.
        assert!(!s.on_message("dfwatch/edge/sweep", b"0000000000000006", false));
        let marker = s.marker();
        assert!(s.on_message(&s.marker_topic(), &marker, false));
        let mut ours = BTreeMap::new();
        ours.insert(
            "dfwatch/edge/streams/kept/availability".to_string(),
            b"online".to_vec(),
        );
        let out = s.finish(&ids(&["cam", "kept"]), &ours);
        let mut cleared: Vec<&str> = out
            .iter()
            .filter(|(_, p)| p.is_empty())
            .map(|(t, _)| t.as_str())
            .collect();
        cleared.sort();
        let mut want: Vec<String> = gone_configs.iter().map(|(t, _)| t.clone()).collect();
        want.extend(
            ["status", "verdict", "availability"].map(|l| format!("dfwatch/edge/streams/gone/{l}")),
        );
        want.sort();
        assert_eq!(cleared, want);
        let offline: Vec<&str> = out
            .iter()
            .filter(|(_, p)| p.as_slice() == b"offline")
            .map(|(t, _)| t.as_str())
            .collect();
        // cam's stale availability goes offline; kept's is this run's own.
        assert_eq!(offline, ["dfwatch/edge/streams/cam/availability"]);
        assert_eq!(out.len(), want.len() + 1);
    }

    #[test]
    fn what_is_read_back_is_bounded() {
        let mut s = Sweep::new("p/n/", None, 1);
        for i in 0..MAX_FOUND + 5 {
            s.on_message(&format!("p/n/streams/s{i}/status"), b"x", true);
        }
        assert_eq!(s.overflow, 5);
    }
}
