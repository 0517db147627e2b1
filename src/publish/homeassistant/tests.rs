use std::collections::BTreeSet;

use super::*;

fn discovery() -> Discovery {
    Discovery::new(
        "homeassistant",
        "dfwatch",
        &NodeId::new("edge-1").unwrap(),
        Some("http://127.0.0.1:8787/".into()),
    )
}

/// Options Home Assistant's MQTT discovery documents for each component that we may use
/// (https://www.home-assistant.io/integrations/binary_sensor.mqtt/, .../sensor.mqtt/,
/// .../event.mqtt/); anything else would be ignored or refused by Home Assistant.
fn documented(component: &str) -> BTreeSet<&'static str> {
    let common = [
        "availability",
        "availability_mode",
        "device",
        "device_class",
        "entity_category",
        "icon",
        "json_attributes_template",
        "json_attributes_topic",
        "name",
        "origin",
        "state_topic",
        "unique_id",
        "value_template",
    ];
    let own: &[&str] = match component {
        "binary_sensor" => &["payload_on", "payload_off"],
        "sensor" => &[
            "options",
            "state_class",
            "suggested_display_precision",
            "unit_of_measurement",
        ],
        "event" => &["event_types"],
        other => panic!("unexpected component {other}"),
    };
    common.iter().chain(own).copied().collect()
}

#[test]
fn each_stream_is_a_device_with_four_entities_that_follow_the_discovery_schema() {
    let d = discovery();
    let cam = StreamId::new("lobby").unwrap();
    let configs = d.stream_configs(&cam);
    assert_eq!(configs.len(), 4);
    let mut unique = BTreeSet::new();
    let mut components = BTreeSet::new();
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
        assert_eq!(d.stream_of(topic).as_ref(), Some(&cam), "{topic}");
        components.insert(levels[1].to_string());
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let allowed = documented(levels[1]);
        assert!(
            keys.is_subset(&allowed),
            "{topic}: {:?}",
            keys.difference(&allowed)
        );
        for required in [
            "unique_id",
            "state_topic",
            "availability",
            "device",
            "name",
            "origin",
        ] {
            assert!(keys.contains(required), "{topic} lacks {required}");
        }
        assert!(unique.insert(v["unique_id"].as_str().unwrap().to_string()));
        // One device per stream, linked to the page.
        assert_eq!(
            v["device"]["identifiers"],
            serde_json::json!(["dfwatch:edge-1:lobby"])
        );
        assert_eq!(v["device"]["configuration_url"], "http://127.0.0.1:8787/");
        assert_eq!(v["origin"]["name"], "dfwatch");
        let avail = v["availability"].as_array().unwrap();
        assert_eq!(avail[0]["topic"], "dfwatch/edge-1/status");
        assert_eq!(avail[0]["payload_available"], "online");
        assert_eq!(v["availability_mode"], "all");
        // Every entity but the stream's own state needs the stream online too.
        if topic.ends_with("_state/config") {
            assert_eq!(avail.len(), 1, "{topic}");
            assert_eq!(v["entity_category"], "diagnostic");
        } else {
            assert_eq!(avail.len(), 2, "{topic}");
            assert_eq!(
                avail[1]["topic"],
                "dfwatch/edge-1/streams/lobby/availability"
            );
        }
        let state = v["state_topic"].as_str().unwrap();
        assert!(
            state.starts_with("dfwatch/edge-1/streams/lobby/"),
            "{state}"
        );
        if topic.ends_with("_score/config") {
            assert_eq!(v["unit_of_measurement"], "%");
            assert_ne!(v["icon"], "mdi:percent");
        }
        if levels[1] == "event" {
            assert_eq!(
                v["event_types"],
                serde_json::json!(["new", "update", "end"])
            );
            assert_eq!(state, d.event_topic(&cam));
        }
    }
    assert_eq!(
        components,
        ["binary_sensor", "event", "sensor"]
            .map(String::from)
            .into()
    );
}

#[test]
fn the_templates_read_fields_the_daemon_publishes_and_only_when_they_are_json() {
    // The retained verdict and status payloads, as the daemon serialises them.
    let verdict = serde_json::to_value(crate::decide::StreamVerdict {
        stream: StreamId::new("lobby").unwrap(),
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
        for key in ["value_template", "json_attributes_template"] {
            let Some(template) = v[key].as_str() else {
                continue;
            };
            // An emptied topic (a removed stream) has no value_json: never read it then.
            assert!(
                template.starts_with("{% if value_json is defined %}"),
                "{topic}: {template}"
            );
            let Some(field) = template
                .split("value_json.")
                .nth(1)
                .and_then(|r| r.split(|c: char| !(c.is_alphanumeric() || c == '_')).next())
            else {
                continue;
            };
            let source = if v["state_topic"].as_str().unwrap().ends_with("/verdict") {
                &verdict
            } else {
                &status
            };
            assert!(
                source.get(field).is_some(),
                "{topic}: {field} not in {source}"
            );
        }
        if let Some(options) = v["options"].as_array() {
            // Every state the stream can be in is an option of the enum sensor.
            assert_eq!(options.len(), crate::ingest::StreamState::ALL.len());
            for state in crate::ingest::StreamState::ALL {
                assert!(options.contains(&state.as_str().into()), "{state:?}");
            }
            assert!(options.contains(&status["state"]));
        }
    }
    // The binary sensor maps every verdict the daemon writes: unknown stays unknown.
    let (_, fake) = &d.stream_configs(&StreamId::new("lobby").unwrap())[0];
    let fake: serde_json::Value = serde_json::from_slice(fake).unwrap();
    let t = fake["value_template"].as_str().unwrap();
    for v in ["fake", "real", "uncertain", "none"] {
        assert!(t.contains(&format!("'{v}'")), "{t}");
    }
    assert!(t.contains("else None"), "{t}");
    let unknown = crate::decide::StreamVerdict::unknown(&StreamId::new("lobby").unwrap(), true);
    assert_eq!(unknown.verdict, "unknown");
}

#[test]
fn an_alert_event_carries_its_type_explanation_and_page() {
    let d = discovery();
    let v: serde_json::Value = serde_json::from_slice(&d.event_payload(
        "new",
        "01JDF0A7Z3K9Q8R6T5V4W3X2Y1",
        "face likely manipulated (0.97)",
        0.97312,
    ))
    .unwrap();
    assert_eq!(v["event_type"], "new");
    assert_eq!(v["explanation"], "face likely manipulated (0.97)");
    assert_eq!(v["score"], 0.973);
    assert_eq!(
        v["url"],
        "http://127.0.0.1:8787/#ev-01JDF0A7Z3K9Q8R6T5V4W3X2Y1"
    );
    assert!(EVENT_TYPES.contains(&v["event_type"].as_str().unwrap()));
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
        let d = Discovery::new(
            "homeassistant",
            "dfwatch",
            &NodeId::new(node).unwrap(),
            None,
        );
        d.stream_configs(&StreamId::new(stream).unwrap())
            .into_iter()
            .flat_map(|(topic, payload)| {
                let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                [
                    topic,
                    v["unique_id"].as_str().unwrap().to_string(),
                    v["device"]["identifiers"][0].as_str().unwrap().to_string(),
                ]
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
    let edge = Discovery::new(
        "homeassistant",
        "dfwatch",
        &NodeId::new("edge").unwrap(),
        None,
    );
    let edge_1 = Discovery::new(
        "homeassistant",
        "dfwatch",
        &NodeId::new("edge_1").unwrap(),
        None,
    );
    for (topic, _) in edge_1.stream_configs(&StreamId::new("cam_2").unwrap()) {
        assert!(!edge.owns(&topic), "{topic}");
        assert_eq!(
            edge_1.stream_of(&topic),
            Some(StreamId::new("cam_2").unwrap()),
            "{topic}"
        );
    }
    assert_eq!(edge.birth_topic(), "homeassistant/status");
}
