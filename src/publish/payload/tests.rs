use std::time::{Duration, Instant, UNIX_EPOCH};

use serde_json::Value;

use super::*;
use crate::evidence::{Evidence, EvidenceConfig, Observation};
use crate::types::{StreamId, TrackId};

const GOLDEN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/alert-v1.example.json"
);

/// A deterministic alert: a fake-leaning track scored at 5 Hz until its alert opens.
fn example() -> AlertPayload {
    let graph = LabelGraph::ffpp();
    let levels = graph.nodes().iter().map(|n| n.level).collect();
    let mut ev = Evidence::new(EvidenceConfig::default(), levels);
    let t0 = Instant::now();
    let base = UNIX_EPOCH + Duration::from_millis(1_800_000_000_000);
    let stream = StreamId::new("lobby").unwrap();
    let mut event = None;
    let mut ids = crate::evidence::UlidGenerator::with_seed(1);
    for i in 0..10u64 {
        let mut marginals = vec![0.05; 10];
        marginals[0] = 0.95;
        marginals[2] = 0.91; // identity
        marginals[7] = 0.86; // mouth
        marginals[6] = 0.83; // lip
        let obs = Observation {
            stream: stream.clone(),
            track: TrackId(17),
            at: t0 + Duration::from_millis(200 * i),
            capture_time: base + Duration::from_millis(200 * i),
            pts: Some(Duration::from_millis(40_000 + 200 * i)),
            bbox: BBox {
                x0: 412.0,
                y0: 118.5,
                x1: 520.0,
                y1: 262.0,
            },
            logit_q0: 3.0 + 0.1 * i as f64,
            marginals,
            quality: 0.75,
        };
        if let Some(e) = ev.observe(obs, base + Duration::from_millis(200 * i), &mut ids) {
            event = Some(e);
            break;
        }
    }
    let event = event.expect("the alert opens");
    let model = ModelInfo {
        name: "sjedd-synth-vit-b-32-ffpp".into(),
        version: "0".into(),
        manifest_sha256: "44f913a3703502204fb9eb38a8ac7c241a05f32416876689c72b55d988582986".into(),
        trained: false,
        backend: "cpu-onnxruntime".into(),
        precision: "fp32".into(),
    };
    let observed = base + Duration::from_millis(1000);
    AlertPayload::from_event(
        &event,
        &NodeId::new("edge-01").unwrap(),
        &graph,
        &model,
        observed,
        0.75,
        observed + Duration::from_millis(180),
    )
}

/// Checks `v` against the subset of JSON Schema the schema file uses: type, enum, required,
/// properties, additionalProperties false, items and local $ref.
fn check(schema: &Value, root: &Value, v: &Value, path: &str, errors: &mut Vec<String>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/$defs/");
        return check(&root["$defs"][name], root, v, path, errors);
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let ok = types.iter().any(|t| match *t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_u64() || v.is_i64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => false,
        });
        if !ok {
            errors.push(format!("{path}: {v} is not of type {types:?}"));
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array)
        && !e.contains(v)
    {
        errors.push(format!("{path}: {v} is not one of {e:?}"));
    }
    if let (Some(obj), Some(props)) = (
        v.as_object(),
        schema.get("properties").and_then(Value::as_object),
    ) {
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let key = r.as_str().unwrap_or_default();
            if !obj.contains_key(key) {
                errors.push(format!("{path}: missing {key}"));
            }
        }
        for (k, val) in obj {
            match props.get(k) {
                Some(s) => check(s, root, val, &format!("{path}.{k}"), errors),
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    errors.push(format!("{path}: unexpected field {k}"))
                }
                None => {}
            }
        }
    }
    if let (Some(arr), Some(items)) = (v.as_array(), schema.get("items")) {
        for (i, item) in arr.iter().enumerate() {
            check(items, root, item, &format!("{path}[{i}]"), errors);
        }
    }
}

fn schema_errors(v: &Value) -> Vec<String> {
    let schema: Value = serde_json::from_str(SCHEMA).unwrap();
    let mut errors = vec![];
    check(&schema, &schema, v, "$", &mut errors);
    errors
}

#[test]
fn the_example_matches_the_golden_file_and_the_schema() {
    let p = example();
    let json = serde_json::to_string_pretty(&p).unwrap() + "\n";
    if std::env::var_os("DFWATCH_UPDATE_GOLDEN").is_some() {
        std::fs::write(GOLDEN, &json).unwrap();
    }
    let golden =
        std::fs::read_to_string(GOLDEN).expect("golden file (DFWATCH_UPDATE_GOLDEN=1 writes it)");
    assert_eq!(
        json, golden,
        "payload changed: update the schema version if it is not additive"
    );
    let v: Value = serde_json::from_str(&golden).unwrap();
    assert_eq!(schema_errors(&v), Vec::<String>::new());
    // Round trip through the typed form.
    let back: AlertPayload = serde_json::from_str(&golden).unwrap();
    assert_eq!(back, p);
    assert!(!back.model.trained);
    assert_eq!(back.model.manifest_sha256.len(), 64);
    assert!(
        back.explanation
            .sentence
            .contains("identity likely altered"),
        "{}",
        back.explanation.sentence
    );
    assert_eq!(back.event, crate::types::AlertChange::New);
    assert_eq!(back.alert_id.len(), 26);
}

#[test]
fn the_schema_catches_missing_unexpected_and_mistyped_fields() {
    let good = serde_json::to_value(example()).unwrap();
    let mut v = good.clone();
    v.as_object_mut().unwrap().remove("model");
    assert!(
        schema_errors(&v)
            .iter()
            .any(|e| e.contains("missing model"))
    );
    let mut v = good.clone();
    v["verdict"] = Value::from("maybe");
    assert!(schema_errors(&v).iter().any(|e| e.contains("$.verdict")));
    let mut v = good.clone();
    v["model"]["colour"] = Value::from("red");
    assert!(
        schema_errors(&v)
            .iter()
            .any(|e| e.contains("unexpected field colour"))
    );
    let mut v = good;
    v["evidence"]["top_frames"][0]["bbox"]["x0"] = Value::from("left");
    assert!(
        schema_errors(&v)
            .iter()
            .any(|e| e.contains("top_frames[0].bbox.x0"))
    );
}
