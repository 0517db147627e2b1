use std::collections::BTreeSet;

use super::*;

fn discovery() -> Discovery {
    Discovery::new("homeassistant", "dfwatch", &NodeId::new("edge-1").unwrap())
}

/// Options Home Assistant's MQTT discovery documents for each component that we may use
/// (https://www.home-assistant.io/integrations/binary_sensor.mqtt/, .../sensor.mqtt/);
/// anything else would be ignored or refused by Home Assistant.
fn documented(component: &str) -> BTreeSet<&'static str> {
    let common = [
        "availability",
        "availability_mode",
        "device",
        "device_class",
        "icon",
        "json_attributes_template",
        "json_attributes_topic",
        "name",
        "state_topic",
        "unique_id",
        "value_template",
    ];
    let own: &[&str] = match component {
        "binary_sensor" => &["payload_on", "payload_off"],
        "sensor" => &["options", "state_class", "suggested_display_precision"],
        other => panic!("unexpected component {other}"),
    };
    common.iter().chain(own).copied().collect()
}

#[test]
fn each_stream_has_three_entities_that_follow_the_discovery_schema() {
    let d = discovery();
    let cam = StreamId::new("lobby").unwrap();
    let configs = d.stream_configs(&cam);
    assert_eq!(configs.len(), 3);
    let mut unique = BTreeSet::new();
    for (topic, payload) in &configs {
        // <discovery_prefix>/<component>/<node_id>/<object_id>/config, ids of [a-zA-Z0-9_-].
        let levels: Vec<&str> = topic.split('/').collect();
        assert_eq!(levels.len(), 5, "{topic}");
        assert_eq!(levels[0], "homeassistant");
        assert_eq!(levels[4], "config");
        for id in &levels[2..4] {
            assert!(
                id.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "{topic}"
            );
        }
        assert!(d.owns(topic), "{topic}");
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let allowed = documented(levels[1]);
        assert!(
            keys.is_subset(&allowed),
            "{topic}: {:?}",
            keys.difference(&allowed)
        );
        for required in ["unique_id", "state_topic", "availability", "device", "name"] {
            assert!(keys.contains(required), "{topic} lacks {required}");
        }
        assert!(unique.insert(v["unique_id"].as_str().unwrap().to_string()));
        assert_eq!(
            v["device"]["identifiers"],
            serde_json::json!(["dfwatch_edge-1"])
        );
        let avail = &v["availability"][0];
        assert_eq!(avail["topic"], "dfwatch/edge-1/status");
        assert_eq!(avail["payload_available"], "online");
        let state = v["state_topic"].as_str().unwrap();
        assert!(
            state.starts_with("dfwatch/edge-1/streams/lobby/"),
            "{state}"
        );
    }
}

#[test]
fn the_templates_read_fields_the_daemon_publishes() {
    // The retained verdict and status payloads, as the daemon serialises them.
    let verdict = serde_json::to_value(crate::decide::StreamVerdict {
        stream: "lobby".into(),
        verdict: "fake",
        tracks: 1,
        fake_tracks: 1,
        open_alerts: vec!["01ALERT".into()],
        model_trained: false,
        score: Some(0.97),
    })
    .unwrap();
    let status = serde_json::to_value(crate::ingest::StreamStatus::new(
        crate::ingest::StreamState::Online,
        std::time::SystemTime::now(),
    ))
    .unwrap();
    let d = discovery();
    for (topic, payload) in d.stream_configs(&StreamId::new("lobby").unwrap()) {
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        let template = v["value_template"].as_str().unwrap();
        let field = template
            .split("value_json.")
            .nth(1)
            .and_then(|r| r.split(|c: char| !(c.is_alphanumeric() || c == '_')).next())
            .unwrap_or_else(|| panic!("{topic}: {template}"));
        let source = if v["state_topic"].as_str().unwrap().ends_with("/verdict") {
            &verdict
        } else {
            &status
        };
        assert!(
            source.get(field).is_some(),
            "{topic}: {field} not in {source}"
        );
        if let Some(options) = v["options"].as_array() {
            // Every state the stream can be in is an option of the enum sensor.
            assert_eq!(options.len(), crate::ingest::StreamState::ALL.len());
            for state in crate::ingest::StreamState::ALL {
                assert!(options.contains(&state.as_str().into()), "{state:?}");
            }
            assert!(options.contains(&status["state"]));
        }
    }
}

/// Ids may hold `_`: node `a_b` with stream `c` and node `a` with stream `b_c`, or streams
/// `cam` and `cam_fake` of one node, must never share a topic or a unique id.
#[test]
fn topics_and_unique_ids_never_collide_across_nodes_and_streams() {
    let pairs = [
        (("a_b", "c"), ("a", "b_c")),
        (("edge", "cam"), ("edge", "cam_fake")),
        (("edge", "cam"), ("edge", "cam_2")),
        (("edge", "cam"), ("edge_1", "cam")),
    ];
    let ids = |node: &str, stream: &str| {
        let d = Discovery::new("homeassistant", "dfwatch", &NodeId::new(node).unwrap());
        d.stream_configs(&StreamId::new(stream).unwrap())
            .into_iter()
            .flat_map(|(topic, payload)| {
                let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                [topic, v["unique_id"].as_str().unwrap().to_string()]
            })
            .collect::<BTreeSet<_>>()
    };
    for ((n1, s1), (n2, s2)) in pairs {
        let (a, b) = (ids(n1, s1), ids(n2, s2));
        assert!(
            a.is_disjoint(&b),
            "{n1}/{s1} and {n2}/{s2}: {:?}",
            a.intersection(&b)
        );
    }
    let edge = Discovery::new("homeassistant", "dfwatch", &NodeId::new("edge").unwrap());
    let edge_1 = Discovery::new("homeassistant", "dfwatch", &NodeId::new("edge_1").unwrap());
    for (topic, _) in edge_1.stream_configs(&StreamId::new("cam").unwrap()) {
        assert!(!edge.owns(&topic), "{topic}");
        assert!(edge_1.owns(&topic), "{topic}");
    }
    assert_eq!(edge.birth_topic(), "homeassistant/status");
}
