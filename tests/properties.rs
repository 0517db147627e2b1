//! Properties of every parser that reads hostile input: config files, model manifests and
//! safetensors headers, spool records, alert payloads, API request bodies, stream URIs and the
//! redactor. Each states what must hold for any input: a clear error or a round trip, never
//! a panic. Bounded in time (a few hundred cases each); `cargo fuzz` targets in fuzz/ run the
//! same parsers for as long as one likes (see the README).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proptest::prelude::*;

use dfwatch::config::Config;
use dfwatch::evidence::{AlertEvent, AlertKind, EndReason, EvidenceFrame, Ulid, Verdict};
use dfwatch::ingest::source::{Redactor, Source};
use dfwatch::model::safetensors::SafeTensors;
use dfwatch::publish::payload::{AlertPayload, ModelInfo};
use dfwatch::publish::spool::record::{Record, decode, encode_put};
use dfwatch::score::LabelGraph;
use dfwatch::types::AlertChange;
use dfwatch::types::{BBox, NodeId, StreamId, TrackId};

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A value for a config key: right and wrong types, edges, NaN, huge numbers, odd strings.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
        Just("nan".to_string()),
        Just("-inf".to_string()),
        Just("true".to_string()),
        "[0-9]{1,4}(ms|s|m|h|d|years)".prop_map(|v| format!("\"{v}\"")),
        "\"[ -~]{0,12}\"",
        Just("\"rtsp://u:p@h/x?token=abc\"".to_string()),
        Just("[]".to_string()),
        Just("{ capacity = 0, policy = \"block\" }".to_string()),
    ]
}

const SECTIONS: &[(&str, &[&str])] = &[
    ("node", &["id", "shutdown_grace"]),
    (
        "ingest",
        &[
            "analysis_fps",
            "stall_timeout",
            "connect_timeout",
            "rtsp_latency",
            "max_pixels",
            "queue",
            "format",
        ],
    ),
    ("encoder", &["max_batch", "max_wait", "output_capacity"]),
    (
        "detect",
        &["max_side", "score_threshold", "min_face_px", "max_faces"],
    ),
    (
        "track",
        &[
            "birth_hits",
            "patience",
            "iou_min",
            "landmark_gate",
            "score_every",
            "detect_every",
        ],
    ),
    (
        "evidence",
        &[
            "window",
            "trim",
            "min_frames",
            "min_duration",
            "enter_fake",
            "exit_fake",
            "min_quality",
        ],
    ),
    (
        "mqtt",
        &[
            "url",
            "keep_alive",
            "spool_max_pending",
            "spool_max_bytes",
            "spool_max_age",
            "prefix",
        ],
    ),
    (
        "http",
        &["listen", "api_max_streams", "read_auth", "token_env"],
    ),
    ("bogus", &["x"]),
];

/// A config file of a few sections with random keys and values.
fn config_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        (
            0..SECTIONS.len(),
            prop::collection::vec((0usize..8, toml_value()), 0..4),
        ),
        0..5,
    )
    .prop_map(|sections| {
        let mut text = String::new();
        let mut seen = std::collections::BTreeSet::new();
        for (s, keys) in sections {
            let (name, known) = SECTIONS[s];
            if !seen.insert(name) {
                continue;
            }
            text.push_str(&format!("[{name}]\n"));
            let mut used = std::collections::BTreeSet::new();
            for (k, v) in keys {
                let key = known[k % known.len()];
                if used.insert(key) {
                    text.push_str(&format!("{key} = {v}\n"));
                }
            }
        }
        text
    })
}

proptest! {
    #![proptest_config(cases(300))]

    /// Any text: a config or errors with paths, never a panic; whatever is accepted is
    /// accepted again when written back out and read once more.
    #[test]
    fn config_files_parse_or_say_where_they_are_wrong(text in config_text()) {
        match Config::parse(&text, Path::new("/etc/dfwatch")) {
            Ok(c) => {
                let again = toml::to_string(&c).expect("an accepted config serialises");
                let back = Config::parse(&again, Path::new("/etc/dfwatch"));
                prop_assert!(back.is_ok(), "{text}\n->\n{again}\n-> {:?}", back.err());
            }
            Err(e) => {
                prop_assert!(!e.0.is_empty());
                for err in &e.0 {
                    prop_assert!(!err.message.is_empty(), "{text}");
                }
            }
        }
    }

    #[test]
    fn arbitrary_bytes_are_never_a_config_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = Config::parse(&text, Path::new("/"));
    }

    /// Safetensors: any bytes, and headers with any numbers, are a layout or an error.
    #[test]
    fn safetensors_headers_never_panic(
        header in prop_oneof![
            "[ -~]{0,64}",
            (any::<u64>(), any::<u64>(), prop::collection::vec(any::<u64>(), 0..4), "F32|F16|I8|X9")
                .prop_map(|(a, b, shape, dt)| format!(
                    r#"{{"t":{{"dtype":"{dt}","shape":{shape:?},"data_offsets":[{a},{b}]}}}}"#
                )),
        ],
        claimed_len in prop_oneof![Just(None), any::<u64>().prop_map(Some)],
        data in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let len = claimed_len.unwrap_or(header.len() as u64);
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&data);
        if let Ok(st) = SafeTensors::parse(bytes) {
            let _ = st.f32("t");
        }
    }

    /// Spool records: any bytes decode without a panic, and whole records written by the
    /// spool come back exactly, whatever garbage surrounds them.
    #[test]
    fn spool_records_survive_any_surrounding_bytes(
        before in prop::collection::vec(any::<u8>(), 0..64),
        after in prop::collection::vec(any::<u8>(), 0..64),
        key in "[0-9A-Z]{1,26}",
        payload in prop::collection::vec(any::<u8>(), 0..256),
        seq in 1u64..1_000_000,
        at in any::<u64>(),
    ) {
        let mut data = before.clone();
        let mut rec = Vec::new();
        encode_put(&mut rec, seq, AlertChange::End, &key, at, &payload);
        data.extend_from_slice(&rec);
        data.extend_from_slice(&after);
        let d = decode(&data);
        let want = Record::Put { seq, kind: AlertChange::End, key, at_ms: Some(at), payload };
        prop_assert!(d.records.contains(&want));
    }

    /// Alert payloads round-trip through their JSON.
    #[test]
    fn alert_payloads_round_trip(
        kind in 0u8..4,
        logit in -50.0f64..50.0,
        frames in 0usize..100,
        marg in prop::collection::vec(0.0f64..1.0, 10),
        x0 in 0.0f32..1000.0,
        ms in 0u64..4_000_000_000_000,
        random in any::<u128>(),
    ) {
        let graph = LabelGraph::ffpp();
        let t = UNIX_EPOCH + Duration::from_millis(ms);
        let kind = match kind {
            0 => AlertKind::New,
            1 => AlertKind::Update,
            2 => AlertKind::End { reason: EndReason::Cleared },
            _ => AlertKind::End { reason: EndReason::TrackLost },
        };
        let ev = AlertEvent {
            alert_id: Ulid::from_parts(t, random),
            kind,
            stream: StreamId::new("cam").unwrap(),
            track: TrackId(3),
            verdict: Verdict::Fake,
            logit,
            score: 1.0 / (1.0 + (-logit).exp()),
            threshold: 2.0,
            frames_scored: frames,
            frames_skipped_low_quality: 0,
            window_s: 4.0,
            mean_marginals: marg,
            top_frames: vec![EvidenceFrame {
                capture_time: t,
                pts_ms: Some(ms / 7),
                bbox: BBox { x0, y0: 1.0, x1: x0 + 50.0, y1: 51.0 },
                logit_q0: logit,
                quality: 0.5,
            }],
            started: t,
        };
        let model = ModelInfo {
            name: "m".into(),
            version: "1".into(),
            manifest_sha256: "0".repeat(64),
            trained: false,
            backend: "cpu-onnxruntime".into(),
            precision: "fp32".into(),
        };
        let p = AlertPayload::from_event(&ev, &NodeId::new("n").unwrap(), &graph, &model, t, 0.5, t);
        let json = serde_json::to_string(&p).unwrap();
        let back: AlertPayload = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, p);
    }

    /// API bodies: any bytes are a stream or a clear refusal; credentials are never a file or
    /// an environment variable whatever the body says.
    #[test]
    fn api_bodies_never_name_host_files_or_panic(
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            ("[a-z0-9_-]{0,70}", "(rtsp|file|http|ftp)://[a-z0-9./:?=&]{0,30}", prop_oneof![
                Just(String::new()),
                Just(r#","credentials":"cam""#.to_string()),
                Just(r#","credentials":{"password_file":"/etc/shadow"}"#.to_string()),
                Just(r#","credentials":{"password_env":"HOME"}"#.to_string()),
                Just(r#","credentials":null"#.to_string()),
            ]).prop_map(|(id, uri, cred)| format!(r#"{{"id":"{id}","uri":"{uri}"{cred}}}"#)),
        ],
    ) {
        // The fuzz target's body (fuzz/src/lib.rs) holds the properties: credentials only ever
        // name the operator's set, and what the URI opens is an allowed kind (schemes are
        // case-insensitive).
        fuzz_targets::api_stream(body.as_bytes());
    }

    /// Stream URIs parse or are refused; wherever one is shown, neither its user info nor
    /// any query value survives, whatever the keys.
    #[test]
    fn shown_uris_never_carry_user_info_or_query_values(
        scheme in "(rtsp|rtsps|srt|http|https)",
        user in "[a-z]{1,8}",
        pass in "[A-Za-z0-9]{8,16}",
        host in "[a-z]{1,10}(\\.[a-z]{2,5})?",
        key in "[A-Za-z_-]{1,20}",
        value in "[A-Za-z0-9]{8,24}",
        around in "[ -~]{0,20}",
    ) {
        let uri = format!("{scheme}://{user}:{pass}@{host}/live?{key}={value}&x={value}");
        let _ = Source::parse(&uri, Path::new("/"));
        let clean = format!("{scheme}://{host}/live?{key}={value}");
        if let Ok(s) = Source::parse(&clean, Path::new("/")) {
            prop_assert!(!s.redacted().contains(&value), "{}", s.redacted());
        }
        let text = format!("{around} {uri} {around}");
        let shown = Redactor::default().redact(&text);
        prop_assert!(!shown.contains(&pass), "{shown}");
        prop_assert!(!shown.contains(&value), "{shown}");
    }

    #[test]
    fn any_text_through_the_redactor_is_no_panic(text in "\\PC{0,200}") {
        let _ = Redactor::default().redact(&text);
        let _ = Source::parse(&text, Path::new("/"));
    }
}

/// The tiny fixture bundle with its manifest replaced.
fn bundle_with_manifest(dir: &Path, manifest: &str) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/bundle");
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "manifest.toml" {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    std::fs::write(dir.join("manifest.toml"), manifest).unwrap();
}

proptest! {
    #![proptest_config(cases(64))]

    /// Manifests with any numbers, names, levels and paths load or are refused naming the
    /// field; never a panic.
    #[test]
    fn manifests_load_or_name_the_field(
        image in prop_oneof![Just(0u64), Just(224), any::<u32>().prop_map(u64::from)],
        patch in prop_oneof![Just(0u64), Just(32), any::<u32>().prop_map(u64::from)],
        width in prop_oneof![Just(0u64), Just(64), Just(u64::from(u32::MAX))],
        heads in prop_oneof![Just(0u64), Just(2), Just(3)],
        embed in prop_oneof![Just(0u64), Just(64), Just(1u64 << 31)],
        mean in prop_oneof![Just("0.5".to_string()), Just("nan".to_string()), any::<f32>().prop_map(|v| format!("{v:?}"))],
        level in "(root|global|local|middle)",
        path in "(text_embeddings.safetensors|\\.\\./x|/etc/passwd|sub/t|)",
    ) {
        let fixture = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/bundle/manifest.toml"),
        )
        .unwrap();
        let manifest = fixture
            .replace("image_size = 224", &format!("image_size = {image}"))
            .replace("patch_size = 32", &format!("patch_size = {patch}"))
            .replace("width = 64", &format!("width = {width}"))
            .replace("heads = 2", &format!("heads = {heads}"))
            .replace("embed_dim = 64", &format!("embed_dim = {embed}"))
            .replace("mean = [0.48145466", &format!("mean = [{mean}"))
            .replacen("level = \"global\"", &format!("level = \"{level}\""), 1)
            .replace("path = \"text_embeddings.safetensors\"", &format!("path = \"{path}\""));
        let dir = tempfile::tempdir().unwrap();
        bundle_with_manifest(dir.path(), &manifest);
        match dfwatch::model::ModelBundle::load(dir.path()) {
            Ok(b) => prop_assert!(b.architecture().image_size > 0),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

#[test]
fn the_reference_manifest_still_loads() {
    // The property above only means something if the unmutated manifest loads.
    let dir = tempfile::tempdir().unwrap();
    let fixture = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/bundle/manifest.toml"),
    )
    .unwrap();
    bundle_with_manifest(dir.path(), &fixture);
    dfwatch::model::ModelBundle::load(dir.path()).unwrap();
    let _ = SystemTime::now();
}

#[path = "../fuzz/src/lib.rs"]
mod fuzz_targets;

/// The fuzz targets' seeds and every input a fuzzer once broke a parser with, through the
/// same target bodies `cargo fuzz` runs: fixed bugs stay fixed without a nightly toolchain.
#[test]
fn fuzz_seeds_and_regressions_replay() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    for (name, target) in fuzz_targets::TARGETS {
        assert!(
            manifest.contains(&format!("path = \"fuzz_targets/{name}.rs\"")),
            "fuzz/Cargo.toml has no binary for target {name}"
        );
        let mut inputs = 0;
        for kind in ["seeds", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(kind).join(name)) else {
                continue;
            };
            for e in entries {
                let path = e.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| target(&data));
                assert!(
                    outcome.is_ok(),
                    "fuzz target {name} panicked on {}",
                    path.display()
                );
                inputs += 1;
            }
        }
        assert!(
            inputs > 0,
            "fuzz target {name} has no seeds in fuzz/seeds/{name}"
        );
    }
}
