//! Home Assistant MQTT discovery (`[mqtt] homeassistant = true`): the retained config
//! messages that make each stream appear in Home Assistant, under one device per node.
//!
//! Per stream, on `<ha>/<component>/dfwatch_<node>/<stream>_<key>/config` (Home Assistant's
//! `<discovery_prefix>/<component>/[<node_id>/]<object_id>/config`; keys hold no `_`, so a
//! topic names one stream, and the node has a level of its own, so nodes never share one):
//! - `binary_sensor/.../fake`: on while a fake face is on screen (the stream's retained
//!   verdict says `fake`), with the verdict's fields as attributes;
//! - `sensor/.../score`: the leading track's fake probability (0 to 1; unknown without tracks);
//! - `sensor/.../state`: the stream's state (`online`, `stalled`, ...).
//!
//! Every entity is available while the node's status is `online` (the last will says
//! `offline`, a clean stop `stopped`: both unavailable). The publisher sends the configs
//! retained when a stream starts, clears them (empty retained messages) when it is removed,
//! and sends them again when Home Assistant's birth message (`<ha>/status` = `online`)
//! arrives. Payloads follow Home Assistant's MQTT discovery schema (abbreviations unused).

use serde_json::json;

use crate::types::{NodeId, StreamId};

/// Home Assistant's birth and will payloads on `<ha>/status`.
pub const BIRTH: &[u8] = b"online";

/// The discovery settings of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    ha_prefix: String,
    /// `<prefix>/<node>/`.
    node_prefix: String,
    node: NodeId,
}

/// The components a stream's entities use.
const COMPONENTS: [&str; 2] = ["binary_sensor", "sensor"];

impl Discovery {
    pub fn new(ha_prefix: &str, mqtt_prefix: &str, node: &NodeId) -> Self {
        Discovery {
            ha_prefix: ha_prefix.to_string(),
            node_prefix: format!("{mqtt_prefix}/{node}/"),
            node: node.clone(),
        }
    }

    /// Home Assistant's status topic (its birth message).
    pub fn birth_topic(&self) -> String {
        format!("{}/status", self.ha_prefix)
    }

    /// Whether `topic` is one of the discovery configs this node publishes.
    pub fn owns(&self, topic: &str) -> bool {
        COMPONENTS.iter().any(|c| {
            topic.starts_with(&format!("{}/{c}/dfwatch_{}/", self.ha_prefix, self.node))
                && topic.ends_with("/config")
        })
    }

    fn device(&self) -> serde_json::Value {
        json!({
            "identifiers": [format!("dfwatch_{}", self.node)],
            "name": format!("dfwatch {}", self.node),
            "manufacturer": "dfwatch",
            "model": "DeepFake face watch",
            "sw_version": env!("CARGO_PKG_VERSION"),
        })
    }

    fn availability(&self) -> serde_json::Value {
        json!([{
            "topic": format!("{}status", self.node_prefix),
            // `online`, or `offline` (last will) / `stopped` (clean stop): both unavailable.
            "value_template": "{{ 'online' if value == 'online' else 'offline' }}",
            "payload_available": "online",
            "payload_not_available": "offline",
        }])
    }

    /// The retained config messages of one stream: `(topic, payload)`.
    pub fn stream_configs(&self, stream: &StreamId) -> Vec<(String, Vec<u8>)> {
        let node_level = format!("dfwatch_{}", self.node);
        let verdict = format!("{}streams/{stream}/verdict", self.node_prefix);
        let status = format!("{}streams/{stream}/status", self.node_prefix);
        let base = |name: &str, key: &str| {
            json!({
                "name": name,
                // `:` is in no id: distinct for every node, stream and entity.
                "unique_id": format!("dfwatch:{}:{stream}:{key}", self.node),
                "device": self.device(),
                "availability": self.availability(),
                "availability_mode": "all",
            })
        };
        let mut fake = base(&format!("{stream} fake face"), "fake");
        extend(
            &mut fake,
            json!({
                "state_topic": verdict,
                "value_template": "{{ 'ON' if value_json.verdict == 'fake' else 'OFF' }}",
                "payload_on": "ON",
                "payload_off": "OFF",
                "device_class": "problem",
                "json_attributes_topic": verdict,
                // The verdict's fields without the score (a state row per score change
                // would fill Home Assistant's recorder; the score has its own sensor).
                "json_attributes_template": "{{ {'verdict': value_json.verdict, 'tracks': value_json.tracks, 'fake_tracks': value_json.fake_tracks, 'open_alerts': value_json.open_alerts, 'model_trained': value_json.model_trained} | tojson }}",
                "icon": "mdi:face-recognition",
            }),
        );
        let mut score = base(&format!("{stream} fake score"), "score");
        extend(
            &mut score,
            json!({
                "state_topic": verdict,
                // A null score renders as `None`, which Home Assistant shows as unknown.
                "value_template": "{{ value_json.score }}",
                "state_class": "measurement",
                "suggested_display_precision": 2,
                "icon": "mdi:percent",
            }),
        );
        let mut state = base(&format!("{stream} stream state"), "state");
        extend(
            &mut state,
            json!({
                "state_topic": status,
                "value_template": "{{ value_json.state }}",
                "device_class": "enum",
                "options": crate::ingest::StreamState::ALL.map(|s| s.as_str()),
                "json_attributes_topic": status,
                "icon": "mdi:cctv",
            }),
        );
        [
            ("binary_sensor", "fake", fake),
            ("sensor", "score", score),
            ("sensor", "state", state),
        ]
        .into_iter()
        .map(|(component, key, v)| {
            (
                format!(
                    "{}/{component}/{node_level}/{stream}_{key}/config",
                    self.ha_prefix
                ),
                serde_json::to_vec(&v).unwrap_or_default(),
            )
        })
        .collect()
    }
}

fn extend(v: &mut serde_json::Value, more: serde_json::Value) {
    if let (Some(a), serde_json::Value::Object(b)) = (v.as_object_mut(), more) {
        a.extend(b);
    }
}

#[cfg(test)]
mod tests;
