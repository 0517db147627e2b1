//! The `dfwatch` binary as a user runs it.

use std::process::Command;

fn dfwatch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dfwatch"))
}

#[test]
fn validate_accepts_every_shipped_config() {
    let configs: Vec<_> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/configs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    assert!(configs.len() >= 2);
    let out = dfwatch().arg("validate").args(&configs).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches(": ok (").count(), configs.len(), "{text}");
}

#[test]
fn validate_lists_every_error_with_its_path_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"
[ingest]
stall_timeout = "soon"

[[streams]]
id = "cam 1"
uri = "rtsp://cam/live"

[[streams]]
id = "cam2"
uri = "ftp://example.com/video"

[[streams]]
id = "cam3"
uri = "rtsp://admin:secret-pw@cam/live"
"#,
    )
    .unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[[streams]]\nid = \"a\"\nuri = \"rtsp://cam/x\"\n").unwrap();
    let out = dfwatch()
        .arg("validate")
        .arg(&good)
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("good.toml: ok (1 streams)"), "{text}");
    assert!(text.contains("bad.toml: 4 problem(s)"), "{text}");
    for line in [
        "ingest.stall_timeout: ",
        "streams[0].id: ",
        "streams[1].uri: unsupported scheme \"ftp\"",
        "streams[2].uri: credentials written inline in the URI are refused",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(!text.contains("secret-pw"), "{text}");
}

#[test]
fn validate_reports_an_unreadable_file() {
    let out = dfwatch()
        .args(["validate", "/nonexistent/dfwatch.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cannot read"));
}

#[test]
fn an_unknown_benchmark_is_refused_with_the_list() {
    let out = dfwatch().args(["bench", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no benchmark \"nope\""), "{err}");
}

#[test]
fn version_reports_features_and_gstreamer() {
    let out = dfwatch().args(["version", "--json"]).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    if cfg!(feature = "gstreamer") {
        let gst = &v["gstreamer"];
        assert!(
            gst["version"].as_str().unwrap().starts_with("GStreamer 1."),
            "{v}"
        );
        assert!(
            gst["decoders"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["codecs"].to_string().contains("video/x-h264")),
            "no H.264 decoder listed: {v}"
        );
    }
}
