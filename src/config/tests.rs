use std::path::Path;

use super::*;

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(text, Path::new("/etc/dfwatch"))
}

fn paths(e: &ConfigErrors) -> Vec<&str> {
    e.0.iter().map(|e| e.path.as_str()).collect()
}

#[test]
fn an_empty_file_is_a_valid_config_with_defaults() {
    let c = parse("").unwrap();
    assert!(c.streams.is_empty());
    assert_eq!(c.ingest.analysis_fps, 5.0);
    assert!(crate::types::check_id(c.node.id.as_str()).is_ok());
}

#[test]
fn a_full_config_parses_with_overrides_and_durations() {
    let c = parse(
        r#"
        [node]
        id = "edge-01"

        [ingest]
        analysis_fps = 2.5
        stall_timeout = "3s"
        queue = { capacity = 2, policy = "drop_newest" }
        backoff = { base = "250ms", cap = "20s", reset_after = "1m" }

        [[streams]]
        id = "lobby"
        uri = "rtsp://10.1.2.3:554/main"
        rtsp_transport = "tcp"
        credentials = { username = "viewer", password_env = "LOBBY_PASS" }

        [[streams]]
        id = "sample"
        uri = "../var/sample.mp4"
        on_eos = "loop"
        format = "rgb8"
        "#,
    )
    .unwrap();
    assert_eq!(c.node.id.as_str(), "edge-01");
    assert_eq!(c.ingest.stall_timeout, std::time::Duration::from_secs(3));
    assert_eq!(c.ingest.queue.capacity.get(), 2);
    assert_eq!(c.ingest.backoff.reset_after.as_secs(), 60);
    assert_eq!(c.streams.len(), 2);
    assert_eq!(c.streams[1].on_eos, crate::ingest::EosAction::Loop);
    assert_eq!(c.streams[1].format, Some(crate::types::PixelFormat::Rgb8));
}

#[test]
fn nv12_is_refused_on_the_cpu_backend_that_crops_rgb() {
    let e = parse(
        r#"
        [ingest]
        format = "nv12"

        [[streams]]
        id = "a"
        uri = "rtsp://10.0.0.1/x"
        format = "nv12"
        "#,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("ingest.format: \"nv12\" is for model.backend = \"cuda\""),
        "{e}"
    );
    assert!(e.contains("streams[0].format"), "{e}");
}

#[test]
fn validate_lists_every_mistake_with_its_path() {
    let e = parse(
        r#"
        [node]
        id = "bad/node"

        [ingest]
        analysis_fps = 0
        queue = { capacity = 4, policy = "block" }
        backoff = { base = "0s", cap = "1s" }

        [[streams]]
        id = "ok-1"
        uri = "ftp://example.com/x"

        [[streams]]
        id = "ok-2"
        uri = "rtsp://admin:hunter2@cam/stream"
        analysis_fps = 500

        [[streams]]
        id = "ok-3"
        uri = "rtsp://cam/stream"
        fpss = 3

        [[streams]]
        id = "ok-1"
        uri = "srt://h:9000"
        credentials = { password = "inline" }

        [[streams]]
        id = "ok-5"
        uri = "file:///x.mp4"
        enabled = "yes"

        [mqtt_typo]
        x = 1
        "#,
    )
    .unwrap_err();
    let text = e.to_string();
    let p = paths(&e);
    for expected in [
        "node.id",
        "ingest.analysis_fps",
        "ingest.queue.policy",
        "ingest.backoff.base",
        "streams[0].uri",
        "streams[1].uri",
        "streams[1].analysis_fps",
        "streams[2].fpss",
        "streams[3].id",
        "streams[3].credentials.password",
        "streams[4].enabled",
        "mqtt_typo",
    ] {
        assert!(p.contains(&expected), "missing {expected} in:\n{text}");
    }
    assert!(
        text.contains(r#"streams[0].uri: unsupported scheme "ftp""#),
        "{text}"
    );
    assert!(text.contains("fpss"), "{text}");
    assert!(text.contains("already used by streams[0]"), "{text}");
    // The inline password itself is never echoed back.
    assert!(!text.contains("hunter2"), "{text}");
    assert!(!text.contains("\"inline\""), "{text}");
}

#[test]
fn toml_syntax_errors_name_line_and_column() {
    let e = parse("[node]\nid = \n").unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert!(e.0[0].message.contains("line 2"), "{e}");
}

#[test]
fn wrong_section_types_are_reported() {
    let e = parse("node = 3\nstreams = \"x\"\n").unwrap_err();
    assert_eq!(paths(&e), vec!["node", "streams"]);
}

/// The configs in tests/fixtures/configs: `refused-*.toml` (first line `# refused: KEY`)
/// hold values that passed `validate` before every number had a range and made the daemon
/// panic, hang or misbehave; `edge-*.toml` hold the edges of each range, which are accepted.
/// tests/cli.rs feeds the same files to `dfwatch validate` and `dfwatch run`.
fn fixture_configs(prefix: &str) -> Vec<(String, String, Option<String>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/configs");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/fixtures/configs")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".toml"))
        })
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let key = text
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("# refused: "))
                .map(str::to_string);
            (p.display().to_string(), text, key)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_value_the_daemon_would_crash_or_hang_on_is_refused_naming_its_key() {
    let cases = fixture_configs("refused-");
    assert!(cases.len() >= 25, "{} cases", cases.len());
    for (file, text, key) in cases {
        let key = key.unwrap_or_else(|| panic!("{file}: first line must be `# refused: KEY`"));
        // Checks against the machine (the ONNX Runtime library, the bundle on disk) are the
        // CLI's (tests/cli.rs runs every fixture through validate and run).
        if text.contains("\n# beyond parse: ") {
            continue;
        }
        let e = parse(&text).expect_err(&file);
        assert!(
            paths(&e).contains(&key.as_str()),
            "{file} should name {key}, got:\n{e}"
        );
    }
}

#[test]
fn the_edges_of_every_range_are_accepted() {
    let cases = fixture_configs("edge-");
    assert!(cases.len() >= 10, "{} cases", cases.len());
    for (file, text, _) in cases {
        if let Err(e) = parse(&text) {
            panic!("{file} refused:\n{e}");
        }
    }
}

#[test]
fn the_shipped_defaults_and_configs_pass() {
    let c = parse("").unwrap();
    assert!(c.cadence(c.ingest.analysis_fps).fits());
    for file in ["configs/default.toml", "configs/example.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        if let Err(e) = Config::load(&path) {
            panic!("{file}:\n{e}");
        }
    }
}

#[test]
fn the_cadence_error_shows_the_keys_and_the_arithmetic() {
    let e = parse("[ingest]\nanalysis_fps = 1.0\n").unwrap_err();
    let text = e.to_string();
    assert_eq!(paths(&e), ["evidence.window"], "{text}");
    for part in [
        "at 1 fps (ingest.analysis_fps)",
        "track.score_every = 500ms",
        "evidence.min_frames = 5",
        "4s, plus one frame of margin for jitter = 5s, more than evidence.window = 4s",
    ] {
        assert!(text.contains(part), "missing {part:?} in {text}");
    }
    // A longer window fixes it.
    parse("[ingest]\nanalysis_fps = 1.0\n[evidence]\nwindow = \"5s\"\n").unwrap();
}

/// NV12 is what the GPU backend's crop takes (the path contains `gpu`: CI runs it in the
/// cuda build).
#[cfg(feature = "cuda")]
#[test]
fn gpu_backend_takes_nv12() {
    let c = parse(
        r#"
        [model]
        backend = "cuda"

        [ingest]
        format = "nv12"
        "#,
    );
    assert!(c.is_ok(), "{:?}", c.err().map(|e| e.to_string()));
}

#[test]
fn relative_paths_are_anchored_at_the_file_and_spelled_once() {
    let c = Config::parse(
        r#"
        [model]
        bundle = "../var/models/x"

        [detect]
        model_dir = "./mtcnn/../mtcnn"

        [mqtt]
        spool_dir = "../var/spool"

        [http]
        token_file = "secrets/./token"

        [[streams]]
        id = "sample"
        uri = "../var/sample/face.mp4"
        credentials = { password_file = "../secrets/pw" }

        [[streams]]
        id = "cam"
        uri = "rtsp://10.0.0.1/a/../b"
        "#,
        Path::new("/srv/checkout/configs"),
    )
    .unwrap();
    assert_eq!(
        c.model.bundle.as_deref(),
        Some(Path::new("/srv/checkout/var/models/x"))
    );
    assert_eq!(
        c.detect.model_dir.as_deref(),
        Some(Path::new("/srv/checkout/configs/mtcnn"))
    );
    assert_eq!(
        c.mqtt.spool_dir.as_deref(),
        Some(Path::new("/srv/checkout/var/spool"))
    );
    assert_eq!(
        c.http.token_file.as_deref(),
        Some(Path::new("/srv/checkout/configs/secrets/token"))
    );
    // A plain path becomes its one file:// spelling, which is what the guard, the logs and
    // /api/streams show; a URI with a scheme is left as written.
    assert_eq!(c.streams[0].uri, "file:///srv/checkout/var/sample/face.mp4");
    assert_eq!(
        c.streams[0]
            .credentials
            .as_ref()
            .and_then(|x| x.password_file.as_deref()),
        Some(Path::new("/srv/checkout/secrets/pw"))
    );
    assert_eq!(c.streams[1].uri, "rtsp://10.0.0.1/a/../b");
    // Loading again (a reload) gives the same spelling: the stream is unchanged.
    let again = Config::parse(
        "[[streams]]\nid = \"sample\"\nuri = \"file:///srv/checkout/var/sample/face.mp4\"\n",
        Path::new("/elsewhere"),
    )
    .unwrap();
    assert_eq!(again.streams[0].uri, c.streams[0].uri);
}

#[test]
fn validate_warns_of_a_missing_local_clip_without_refusing_the_file() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("there.mp4"), b"x").unwrap();
    let c = Config::parse(
        "[[streams]]\nid = \"a\"\nuri = \"there.mp4\"\n\
         [[streams]]\nid = \"b\"\nuri = \"../gone.mp4\"\n\
         [[streams]]\nid = \"c\"\nuri = \"gone.mp4\"\nenabled = false\n\
         [[streams]]\nid = \"d\"\nuri = \"rtsp://10.0.0.1/x\"\n",
        d.path(),
    )
    .unwrap();
    let w = c.warnings();
    assert_eq!(paths(&ConfigErrors(w.clone())), ["streams[1].uri"], "{w:?}");
    assert!(w[0].message.contains("not_found"), "{}", w[0].message);
}
