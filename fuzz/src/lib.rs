//! The fuzz targets' bodies: one function per parser that reads hostile input, each stating
//! what must hold for any bytes (a clear error or a sound value, never a panic). The
//! `fuzz_targets/` binaries hand libFuzzer's input to them; `tests/properties.rs` compiles
//! this file too and replays `seeds/` and `regressions/` through it on every test run.

use std::collections::BTreeMap;
use std::path::Path;

use dfwatch::config::Config;
use dfwatch::http::ApiPolicy;
use dfwatch::ingest::CredentialsConfig;
use dfwatch::ingest::source::{Redactor, Source, SourceKind};
use dfwatch::model::safetensors::SafeTensors;
use dfwatch::publish::spool::record::{Record, decode, encode_ack, encode_put, encode_sink_ack};

/// One target's body.
pub type Target = fn(&[u8]);

/// The targets by name, as `cargo fuzz run <name>` and the seed folders know them.
pub const TARGETS: &[(&str, Target)] = &[
    ("config", config),
    ("safetensors", safetensors),
    ("spool_record", spool_record),
    ("api_stream", api_stream),
    ("uri", uri),
];

/// A config file: parsed, or refused with at least one error, each naming what is wrong.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = Config::parse(&text, Path::new("/etc/dfwatch")) {
        assert!(!e.0.is_empty(), "a refusal without a reason");
        for err in &e.0 {
            assert!(
                !err.message.is_empty(),
                "an error without a message: {err:?}"
            );
        }
    }
}

/// A safetensors file: a layout whose every tensor reads back with as many values as its
/// shape says, or an error.
pub fn safetensors(data: &[u8]) {
    let Ok(st) = SafeTensors::parse(data.to_vec()) else {
        return;
    };
    let names: Vec<String> = st.tensors.keys().cloned().collect();
    for name in names {
        if let Ok((shape, values)) = st.f32(&name) {
            let n = shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
            assert_eq!(n, Some(values.len()), "tensor {name:?}: shape {shape:?}");
        }
    }
}

/// A spool log: whatever the bytes, every record read back is written again to exactly the
/// same record, and the damaged ranges lie inside the input.
pub fn spool_record(data: &[u8]) {
    let d = decode(data);
    assert!(d.valid_end <= data.len());
    for &(a, b) in &d.skipped {
        assert!(
            a < b && b <= d.valid_end,
            "skipped {a}..{b} of {}",
            data.len()
        );
    }
    for r in &d.records {
        let mut again = Vec::new();
        match r {
            Record::Put {
                seq,
                kind,
                key,
                at_ms: Some(at),
                payload,
            } => encode_put(&mut again, *seq, *kind, key, *at, payload),
            // A put of an earlier version carries no time; it is never written again.
            Record::Put { at_ms: None, .. } => continue,
            Record::Ack { seq } => encode_ack(&mut again, *seq),
            Record::SinkAck { seq, sink } => encode_sink_ack(&mut again, *seq, sink),
        }
        assert_eq!(decode(&again).records, vec![r.clone()]);
    }
}

/// An API request body that adds a stream: a stream or a refusal; credentials only ever
/// name a set the operator configured, never a host file or an environment variable.
pub fn api_stream(data: &[u8]) {
    let mut credentials = BTreeMap::new();
    credentials.insert(
        "cam".to_string(),
        CredentialsConfig {
            username: Some("viewer".into()),
            password_env: Some("CAM_PASSWORD".into()),
            ..Default::default()
        },
    );
    let policy = ApiPolicy {
        token: "t".repeat(20),
        schemes: vec!["rtsp".into(), "http".into()],
        credentials,
        max_streams: 4,
        reads_need_token: true,
        loopback_hosts_only: false,
        trusted_proxies: Vec::new(),
    };
    if let Ok(s) = dfwatch::http::api_stream(data, &policy) {
        if let Some(c) = &s.credentials {
            assert_eq!(c.password_env.as_deref(), Some("CAM_PASSWORD"));
            assert!(c.password_file.is_none());
        }
        // Schemes are case-insensitive (RFC 3986); the daemon then parses the URI, and what
        // it would open must be one of the allowed kinds.
        let lower = s.uri.to_ascii_lowercase();
        assert!(
            lower.starts_with("rtsp://") || lower.starts_with("http://"),
            "{}",
            s.uri
        );
        if let Ok(src) = Source::parse(&s.uri, Path::new("/")) {
            assert!(
                matches!(src.kind, SourceKind::Rtsp | SourceKind::Http),
                "{} opens as {:?}",
                s.uri,
                src.kind
            );
        }
    }
}

/// Any text as a stream URI: parsed or refused; and a password put in the user info of a
/// URI inside the text never survives redaction, whatever surrounds it.
pub fn uri(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(s) = Source::parse(&text, Path::new("/")) {
        let _ = s.redacted();
    }
    let pass: String = text
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(16)
        .collect();
    if pass.len() < 8 {
        return;
    }
    let line = format!("{text} rtsp://user:{pass}@camera/live {text}");
    let shown = Redactor::default().redact(&line);
    // The surrounding text may contain the same characters; count what redaction left.
    assert!(
        shown.matches(pass.as_str()).count() < line.matches(pass.as_str()).count(),
        "{shown}"
    );
}
