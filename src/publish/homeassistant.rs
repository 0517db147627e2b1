//! Home Assistant MQTT discovery (`[mqtt] homeassistant = true`): the retained config
//! messages that make each stream a device in Home Assistant.
//!
//! Per stream, on `<ha>/<component>/dfwatch_<node>/<stream>_<key>/config` (Home Assistant's
//! `<discovery_prefix>/<component>/[<node_id>/]<object_id>/config`; keys hold no `_`, so a
//! topic names one stream, and the node has a level of its own, so nodes never share one),
//! one device per stream with four entities:
//! - `binary_sensor/.../fake`: on while a fake face is on screen (the stream's retained
//!   verdict says `fake`), off while the faces are judged real (or there are none), unknown
//!   until this run has judged (the verdict says `unknown`), with the verdict's fields as
//!   attributes;
//! - `sensor/.../score`: the leading track's fake probability in percent (unknown without
//!   tracks);
//! - `event/.../alert`: an event per alert (`new`, `update`, `end`) with its plain-language
//!   explanation, score and id as attributes (sent when connected, never retained);
//! - `sensor/.../state`: the stream's state (`online`, `reconnecting`, ...), a diagnostic.
//!
//! Availability: every entity needs the node's status `online` (the last will says
//! `offline`, a clean stop `stopped`); all but the state sensor also need the stream's own
//! `<prefix>/<node>/streams/<id>/availability` to say `online`, which the publisher sends
//! while the stream is online and sets `offline` when it is not, at the start of a stop and,
//! for what an earlier run left, at connect. Templates read a payload only when it is JSON, so
//! an emptied topic never trips one. The publisher sends the configs retained when a stream
//! starts, clears them (empty retained messages) when it is removed and only then, after a
//! grace, its state topics, and sends them again (once for a burst) when Home Assistant's
//! birth message (`<ha>/status` = `online`) arrives. Payloads follow Home Assistant's MQTT
//! discovery schema (abbreviations unused).

use serde_json::json;

use crate::types::{NodeId, StreamId};

/// Home Assistant's birth and will payloads on `<ha>/status`.
pub const BIRTH: &[u8] = b"online";

/// The components a stream's entities use.
const COMPONENTS: [&str; 3] = ["binary_sensor", "sensor", "event"];

/// The kinds of alert event the event entity carries.
pub const EVENT_TYPES: [&str; 3] = ["new", "update", "end"];

/// The discovery settings of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    ha_prefix: String,
    /// `<prefix>/<node>/`.
    node_prefix: String,
    node: NodeId,
    /// The web page as Home Assistant's users reach it (each device's `configuration_url`).
    page: Option<String>,
}

/// A value read from the payload only when it is JSON (`value_json` is undefined for an
/// emptied topic), else `None` (which Home Assistant takes as unknown).
fn guarded(expr: &str) -> String {
    format!("{{% if value_json is defined %}}{{{{ {expr} }}}}{{% else %}}None{{% endif %}}")
}

impl Discovery {
    pub fn new(ha_prefix: &str, mqtt_prefix: &str, node: &NodeId, page: Option<String>) -> Self {
        Discovery {
            ha_prefix: ha_prefix.to_string(),
            node_prefix: format!("{mqtt_prefix}/{node}/"),
            node: node.clone(),
            page,
        }
    }

    /// Home Assistant's status topic (its birth message).
    pub fn birth_topic(&self) -> String {
        format!("{}/status", self.ha_prefix)
    }

    /// The filters under which this node's discovery configs lie (one per component).
    pub fn config_filters(&self) -> Vec<String> {
        COMPONENTS
            .iter()
            .map(|c| format!("{}/{c}/dfwatch_{}/+/config", self.ha_prefix, self.node))
            .collect()
    }

    /// Whether `topic` is one of the discovery configs this node publishes.
    pub fn owns(&self, topic: &str) -> bool {
        self.stream_of(topic).is_some()
    }

    /// The stream a discovery config topic of this node is for.
    pub fn stream_of(&self, topic: &str) -> Option<StreamId> {
        let rest = topic.strip_prefix(&format!("{}/", self.ha_prefix))?;
        let (component, rest) = rest.split_once('/')?;
        if !COMPONENTS.contains(&component) {
            return None;
        }
        let object = rest
            .strip_prefix(&format!("dfwatch_{}/", self.node))?
            .strip_suffix("/config")?;
        // Keys hold no `_`: the stream is everything before the last one.
        let (stream, _key) = object.rsplit_once('_')?;
        StreamId::new(stream).ok()
    }

    /// The event entity's topic of a stream (`<prefix>/<node>/streams/<id>/event`).
    pub fn event_topic(&self, stream: &StreamId) -> String {
        crate::publish::mqtt::stream_topic(&self.node_prefix, stream, "event")
    }

    /// One alert event for the event entity: its type and what an automation or a
    /// notification needs (the sentence, the score, the alert's id and its page).
    pub fn event_payload(&self, kind: &str, alert_id: &str, sentence: &str, score: f64) -> Vec<u8> {
        let mut v = json!({
            "event_type": kind,
            "alert_id": alert_id,
            "explanation": sentence,
            "score": (score * 1000.0).round() / 1000.0,
        });
        if let Some(page) = &self.page {
            extend(&mut v, json!({"url": format!("{page}#ev-{alert_id}")}));
        }
        serde_json::to_vec(&v).unwrap_or_default()
    }

    fn device(&self, stream: &StreamId) -> serde_json::Value {
        let mut d = json!({
            // `:` is in no id, so node `a_b` with stream `c` is not node `a` with `b_c`.
            "identifiers": [format!("dfwatch:{}:{stream}", self.node)],
            "name": format!("dfwatch {stream}"),
            "manufacturer": "dfwatch",
            "model": format!("DeepFake face watch on node {}", self.node),
            "sw_version": env!("CARGO_PKG_VERSION"),
        });
        if let Some(page) = &self.page {
            extend(&mut d, json!({"configuration_url": page}));
        }
        d
    }

    /// The node's status, and with `stream` that stream's own availability too.
    fn availability(&self, stream: Option<&StreamId>) -> serde_json::Value {
        let mut list = vec![json!({
            "topic": format!("{}status", self.node_prefix),
            // `online`, or `offline` (last will) / `stopped` (clean stop): both unavailable.
            "value_template": "{{ 'online' if value == 'online' else 'offline' }}",
            "payload_available": "online",
            "payload_not_available": "offline",
        })];
        if let Some(s) = stream {
            list.push(json!({
                "topic": crate::publish::mqtt::stream_topic(&self.node_prefix, s, "availability"),
                "payload_available": "online",
                "payload_not_available": "offline",
            }));
        }
        serde_json::Value::Array(list)
    }

    /// The retained config messages of one stream: `(topic, payload)`.
    pub fn stream_configs(&self, stream: &StreamId) -> Vec<(String, Vec<u8>)> {
        let node_level = format!("dfwatch_{}", self.node);
        let topic = |leaf| crate::publish::mqtt::stream_topic(&self.node_prefix, stream, leaf);
        let (verdict, status) = (topic("verdict"), topic("status"));
        let base = |name: &str, key: &str, own_availability: bool| {
            json!({
                "name": name,
                // `:` is in no id: distinct for every node, stream and entity.
                "unique_id": format!("dfwatch:{}:{stream}:{key}", self.node),
                "device": self.device(stream),
                "origin": {"name": "dfwatch", "sw_version": env!("CARGO_PKG_VERSION")},
                "availability": self.availability(own_availability.then_some(stream)),
                "availability_mode": "all",
            })
        };
        let mut fake = base("Fake face", "fake", true);
        extend(
            &mut fake,
            json!({
                "state_topic": verdict,
                "value_template": guarded(
                    "'ON' if value_json.verdict == 'fake' else ('OFF' if value_json.verdict in \
                     ['real', 'uncertain', 'none'] else None)"
                ),
                "payload_on": "ON",
                "payload_off": "OFF",
                "device_class": "problem",
                "json_attributes_topic": verdict,
                // The verdict's fields without the score (a state row per score change
                // would fill Home Assistant's recorder; the score has its own sensor).
                "json_attributes_template": "{% if value_json is defined %}{{ {'verdict': value_json.verdict, 'tracks': value_json.tracks, 'fake_tracks': value_json.fake_tracks, 'open_alerts': value_json.open_alerts, 'model_trained': value_json.model_trained} | tojson }}{% else %}{}{% endif %}",
                "icon": "mdi:face-recognition",
            }),
        );
        let mut score = base("Fake score", "score", true);
        extend(
            &mut score,
            json!({
                "state_topic": verdict,
                // A null score (no tracks) is unknown.
                "value_template": guarded(
                    "(value_json.score * 100) | round(0) if value_json.score is number else None"
                ),
                "unit_of_measurement": "%",
                "state_class": "measurement",
                "suggested_display_precision": 0,
                "icon": "mdi:gauge",
            }),
        );
        let mut alert = base("Alert", "alert", true);
        extend(
            &mut alert,
            json!({
                "state_topic": self.event_topic(stream),
                "event_types": EVENT_TYPES,
                "icon": "mdi:alert-octagon",
            }),
        );
        let mut state = base("Stream state", "state", false);
        extend(
            &mut state,
            json!({
                "state_topic": status,
                "value_template": guarded("value_json.state"),
                "device_class": "enum",
                "options": crate::ingest::StreamState::ALL.map(|s| s.as_str()),
                "entity_category": "diagnostic",
                "json_attributes_topic": status,
                "json_attributes_template": "{% if value_json is defined %}{{ value_json | tojson }}{% else %}{}{% endif %}",
                "icon": "mdi:cctv",
            }),
        );
        [
            ("binary_sensor", "fake", fake),
            ("sensor", "score", score),
            ("event", "alert", alert),
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
