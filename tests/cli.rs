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
    assert_eq!(out.status.code(), Some(64));
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
    // The ONNX Runtime library found by default (tools/setup.sh's CPU build): its own version
    // string and the providers it was built with.
    let ort = &v["onnxruntime"];
    let version = ort["version"].as_str().unwrap_or_default();
    assert!(
        version.split('.').count() == 3 && version.split('.').all(|p| p.parse::<u32>().is_ok()),
        "{v}"
    );
    let providers = ort["available_providers"].to_string();
    assert!(providers.contains("CPUExecutionProvider"), "{v}");
    assert!(!providers.contains("CUDAExecutionProvider"), "{v}");
}

/// The configs of tests/fixtures/configs named `{prefix}*.toml`, with their text.
fn fixture_configs(prefix: &str) -> Vec<(std::path::PathBuf, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/configs");
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(prefix) && n.ends_with(".toml")
        })
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    out.sort();
    out
}

/// `text` with what a daemon run here needs where the fixture leaves it open: the tiny
/// bundle, a broker address nobody listens on, a spool, HTTP on a free port, one looping
/// file stream of the sample clip.
fn runnable(text: &str, dir: &std::path::Path, http_port: u16) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut t: toml::Table = text.parse().expect("fixture is TOML");
    let section = |name: &str| -> toml::Table {
        t.get(name)
            .and_then(|v| v.as_table())
            .cloned()
            .unwrap_or_default()
    };
    let mut model = section("model");
    model.entry("bundle").or_insert(
        root.join("tests/fixtures/tiny/bundle")
            .display()
            .to_string()
            .into(),
    );
    let mut mqtt = section("mqtt");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    mqtt.entry("url")
        .or_insert(format!("mqtt://127.0.0.1:{port}").into());
    mqtt.insert(
        "spool_dir".into(),
        dir.join("spool").display().to_string().into(),
    );
    let mut http = section("http");
    http.insert("listen".into(), format!("127.0.0.1:{http_port}").into());
    t.insert("model".into(), model.into());
    t.insert("mqtt".into(), mqtt.into());
    t.insert("http".into(), http.into());
    if !t.contains_key("streams") {
        let mut s = toml::Table::new();
        s.insert("id".into(), "sample".into());
        s.insert(
            "uri".into(),
            root.join("var/sample/face.mp4")
                .display()
                .to_string()
                .into(),
        );
        s.insert("on_eos".into(), "loop".into());
        t.insert("streams".into(), toml::Value::Array(vec![s.into()]));
    }
    toml::to_string(&t).unwrap()
}

/// `dfwatch validate FILE` (stdout, status) and `dfwatch run --config FILE` (stderr, status),
/// state under `dir`.
fn validate_and_run(path: &std::path::Path, dir: &std::path::Path) -> [(String, Option<i32>); 2] {
    let v = dfwatch().arg("validate").arg(path).output().unwrap();
    let r = dfwatch()
        .args(["run", "--config"])
        .arg(path)
        .env("STATE_DIRECTORY", dir.join("state"))
        .output()
        .unwrap();
    [
        (
            String::from_utf8_lossy(&v.stdout).into_owned(),
            v.status.code(),
        ),
        (
            String::from_utf8_lossy(&r.stderr).into_owned(),
            r.status.code(),
        ),
    ]
}

#[test]
fn configs_that_crashed_or_hung_the_daemon_are_refused_by_validate_and_run_alike() {
    let dir = tempfile::tempdir().unwrap();
    let cases = fixture_configs("refused-");
    assert!(cases.len() >= 25);
    for (file, text) in &cases {
        let key = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# refused: "))
            .unwrap_or_else(|| panic!("{}: first line must name the key", file.display()));
        let path = dir.path().join("config.toml");
        std::fs::write(&path, runnable(text, dir.path(), 1)).unwrap();
        let [(said, v), (err, r)] = validate_and_run(&path, dir.path());
        assert_eq!(v, Some(2), "{}: {said}", file.display());
        assert!(
            said.contains(&format!("  {key}: ")),
            "{}: {said}",
            file.display()
        );
        // The daemon refuses it the same way, before starting anything.
        assert_eq!(r, Some(2), "{}: {err}", file.display());
        assert!(
            err.contains(&format!("  {key}: ")),
            "{}: {err}",
            file.display()
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// `onnx.providers` with fall-backs on the CPU build of ONNX Runtime: `validate` accepts it
/// and says which providers the library lacks and what runs instead (the daemon logs the same
/// line at start; edge-17 runs it).
#[test]
fn validate_says_where_onnx_providers_fall_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("tests/fixtures/configs/edge-17.toml")).unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, runnable(&text, dir.path(), 1)).unwrap();
    let v = dfwatch().arg("validate").arg(&path).output().unwrap();
    let said = String::from_utf8_lossy(&v.stdout);
    assert!(v.status.success(), "{said}");
    assert!(said.contains("onnx.providers: ONNX Runtime"), "{said}");
    assert!(said.contains("sessions use cpu"), "{said}");
    assert!(said.contains("tensorrt is not in this library"), "{said}");
    assert!(said.contains("cuda is not in this library"), "{said}");
    // Several files in one call are each judged on their own list (the library is loaded
    // once): a refused one first does not spoil the next.
    let bad = root.join("tests/fixtures/configs/refused-33-onnx-providers.toml");
    let bad_path = dir.path().join("bad.toml");
    std::fs::write(
        &bad_path,
        runnable(&std::fs::read_to_string(bad).unwrap(), dir.path(), 1),
    )
    .unwrap();
    let v = dfwatch()
        .arg("validate")
        .arg(&bad_path)
        .arg(&path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&v.stdout);
    assert_eq!(v.status.code(), Some(2), "{said}");
    assert!(said.contains("bad.toml: 1 problem(s)"), "{said}");
    assert!(said.contains("config.toml: ok"), "{said}");
    assert!(said.contains("sessions use cpu"), "{said}");
}

/// Every range edge that `validate` accepts, run by the daemon: it becomes ready, analyses
/// the sample clip, and stops cleanly on SIGTERM without a panic.
#[cfg(feature = "gstreamer")]
#[test]
fn the_daemon_starts_and_stops_cleanly_at_every_range_edge() {
    use std::time::{Duration, Instant};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        root.join("var/sample/face.mp4").exists(),
        "run ./tools/setup.sh first"
    );
    let cases = fixture_configs("edge-");
    assert!(cases.len() >= 10);
    for (file, text) in &cases {
        let fixture = text.clone();
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, runnable(text, dir.path(), port)).unwrap();
        let v = dfwatch().arg("validate").arg(&path).output().unwrap();
        assert!(
            v.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&v.stdout)
        );
        let log = dir.path().join("daemon.log");
        let mut child = dfwatch()
            .args(["run", "--config"])
            .arg(&path)
            .env("STATE_DIRECTORY", dir.path().join("state"))
            .env("DFWATCH_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let read = || std::fs::read_to_string(&log).unwrap_or_default();
        let t0 = Instant::now();
        while !read().contains("dfwatch ready.") {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("{}: exited {st} before ready:\n{}", file.display(), read());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{}: not ready:\n{}",
                file.display(),
                read()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // Let the stream run through detection, tracking and the encoder for a moment.
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
        let t1 = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t1.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!(
                    "{}: no exit 30 s after SIGTERM:\n{}",
                    file.display(),
                    read()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let text = read();
        assert_eq!(status.code(), Some(0), "{}:\n{text}", file.display());
        assert!(!text.contains("panicked"), "{}:\n{text}", file.display());
        // A fixture's `# log: TEXT` lines must appear in the daemon's log.
        for want in fixture.lines().filter_map(|l| l.strip_prefix("# log: ")) {
            assert!(
                text.contains(want),
                "{}: no {want:?} in\n{text}",
                file.display()
            );
        }
        assert!(
            text.contains("dfwatch stopped."),
            "{}:\n{text}",
            file.display()
        );
    }
}

/// Operator conveniences: usage errors exit 64 (2 is an invalid config), the config comes from
/// `$DFWATCH_CONFIG` when none is named, `validate --json`, JSON logs, the man page with the
/// exit statuses, shell completions.
#[test]
fn exit_statuses_config_lookup_json_output_man_page_and_completions() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let bogus = dfwatch().arg("no-such-command").output().unwrap();
    assert_eq!(bogus.status.code(), Some(64));
    let missing = dfwatch().args(["run", "--no-such-flag"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(64));
    assert_eq!(
        dfwatch().arg("--help").output().unwrap().status.code(),
        Some(0)
    );

    // No --config, no $DFWATCH_CONFIG: the package's path, or a clear exit 2.
    if !std::path::Path::new("/etc/dfwatch/dfwatch.toml").exists() {
        let r = dfwatch()
            .arg("run")
            .env_remove("DFWATCH_CONFIG")
            .output()
            .unwrap();
        assert_eq!(r.status.code(), Some(2));
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(
            err.contains("/etc/dfwatch/dfwatch.toml") && err.contains("DFWATCH_CONFIG"),
            "{err}"
        );
    }
    // $DFWATCH_CONFIG, logged as JSON lines when asked.
    let v = dfwatch()
        .arg("validate")
        .env("DFWATCH_CONFIG", root.join("configs/default.toml"))
        .env("DFWATCH_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let log = String::from_utf8_lossy(&v.stderr);
    let line = log
        .lines()
        .find(|l| l.contains("config file"))
        .expect("the config file is logged");
    let j: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(j["level"], "INFO");
    assert_eq!(j["from"], "$DFWATCH_CONFIG");
    assert!(
        j["config"]
            .as_str()
            .unwrap()
            .ends_with("configs/default.toml")
    );

    // validate --json: one object per file.
    let bad = root.join("tests/fixtures/configs/refused-29-http-max_connections.toml");
    let v = dfwatch()
        .args(["validate", "--json"])
        .arg(root.join("configs/default.toml"))
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(v.status.code(), Some(2));
    let out = String::from_utf8_lossy(&v.stdout);
    let objs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objs.len(), 2, "{out}");
    assert_eq!(objs[0]["ok"], true);
    assert!(objs[0]["alert_delay_s"].as_f64().unwrap() > 0.0);
    assert_eq!(objs[1]["ok"], false);
    assert_eq!(objs[1]["errors"][0]["path"], "http.max_connections");

    let man = dfwatch().arg("man").output().unwrap();
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(
        man.contains(".TH dfwatch 1") && man.contains("Exit status"),
        "{man}"
    );
    assert!(man.contains("64") && man.contains("invalid config"));
    let bash = dfwatch().args(["completions", "bash"]).output().unwrap();
    let bash = String::from_utf8_lossy(&bash.stdout);
    assert!(
        bash.contains("_dfwatch()") && bash.contains("validate"),
        "{bash}"
    );
}

/// `model.backend = "cuda"` where it cannot run: `validate` and `run` say what is missing (the
/// feature in a default build; in a `cuda` build, the driver, a library, the headers or the
/// device), exit 2, and nothing panics. .ci/run runs this test in the `cuda` build too.
#[test]
fn the_gpu_backend_where_it_cannot_run_is_refused_naming_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpu.toml");
    let text = "[model]\nbackend = \"cuda\"\n";
    std::fs::write(&path, runnable(text, dir.path(), 1)).unwrap();
    let gpu = std::process::Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .is_ok_and(|o| o.status.success());
    if cfg!(feature = "cuda") && gpu {
        eprintln!("skipped: this machine has a GPU, so the cuda build accepts the backend");
        return;
    }
    let [(said, v), (err, r)] = validate_and_run(&path, dir.path());
    for out in [&said, &err] {
        assert!(out.contains("  model.backend: \"cuda\""), "{out}");
        if cfg!(feature = "cuda") {
            assert!(out.contains("cannot run on this machine"), "{out}");
            assert!(
                [
                    "libcuda",
                    "libnvrtc",
                    "libcublasLt",
                    "cuda_fp16.h",
                    "CUDA device"
                ]
                .iter()
                .any(|what| out.contains(what)),
                "names what is missing: {out}"
            );
        } else {
            assert!(out.contains("without the `cuda` feature"), "{out}");
        }
        assert!(!out.contains("panicked"), "{out}");
    }
    assert_eq!(v, Some(2), "{said}");
    assert_eq!(r, Some(2), "{err}");
}
