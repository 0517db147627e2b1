//! `dfwatch eval`, `dfwatch calibrate` and `dfwatch export-false-alarms` as a user runs them:
//! a small labelled set made here (clips of the astronaut's face, the tiny fixture crops) and
//! synthetic bundles. Synthetic bundles cannot separate real from fake, so these test the
//! plumbing: the report's metrics recomputed from its own per-file scores, per-file scores
//! equal to `analyze`'s and `score`'s, the cache, the page, the delay calibration measures.
#![cfg(feature = "gstreamer")]

mod daemon_support;

use std::path::Path;
use std::process::{Command, Output};

use daemon_support::{bundle, face_clip};
use dfwatch::offline::metrics;

fn dfwatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dfwatch"))
        .args(args)
        .output()
        .expect("dfwatch runs")
}

fn ok(out: &Output) -> &Output {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Two clips (2 s and 4 s) and four crops in `dir`, and a LIST naming them (two crops form
/// one unit by video_id).
fn labelled_set(dir: &Path) {
    for (name, secs) in [("a", 2), ("b", 4)] {
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let clip = face_clip(&sub, secs);
        std::fs::rename(clip, dir.join(format!("{name}.mp4"))).unwrap();
    }
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
    for i in 0..4 {
        std::fs::copy(
            fixtures.join(format!("crop{i}.png")),
            dir.join(format!("crop{i}.png")),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("list.csv"),
        "path,label,method,video_id\n\
         a.mp4,real,,\n\
         b.mp4,fake,Deepfakes,\n\
         crop0.png,real,,\n\
         crop1.png,fake,Face2Face,\n\
         crop2.png,fake,FaceSwap,pair\n\
         crop3.png,fake,FaceSwap,pair\n",
    )
    .unwrap();
}

#[test]
fn eval_reports_metrics_its_own_scores_reproduce_and_resumes_from_its_cache() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    labelled_set(d);
    let model = bundle(d, 0.0);
    let report = d.join("out/report.json");
    std::fs::create_dir_all(d.join("out")).unwrap();
    let list = d.join("list.csv");
    let args = [
        "eval",
        s(&list),
        "--model",
        s(&model),
        "--frames",
        "6",
        "--bootstrap",
        "200",
        "--seed",
        "7",
        "-o",
        s(&report),
    ];
    ok(&dfwatch(&args));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["counts"]["files"], 6);
    assert_eq!(r["counts"]["units"], 5, "{}", r["counts"]);
    assert_eq!(r["counts"]["failed"], 0);
    assert_eq!(r["counts"]["cached"], 0);
    assert_eq!(r["bootstrap"]["seed"], 7);
    assert_eq!(r["model"]["trained"], false);
    assert!(r["detector"].as_str().unwrap().contains("RetinaFace"));
    assert!(
        r["definitions"]["eer"]
            .as_str()
            .unwrap()
            .contains("interpolation")
    );

    // The video-level AUC and EER again, from the per-file scores of the report: a unit is a
    // video_id's files or one file, its score the mean over all its scored frames.
    let files = r["files"].as_array().unwrap();
    let mut units: std::collections::BTreeMap<String, (f64, f64, bool)> = Default::default();
    for f in files {
        let key = f["video_id"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| f["path"].as_str().unwrap().to_string());
        let n = f["frames_scored"].as_f64().unwrap();
        assert!(n >= 1.0, "{f}");
        let e = units.entry(key).or_insert((0.0, 0.0, f["label"] == "fake"));
        e.0 += f["score"].as_f64().unwrap() * n;
        e.1 += n;
    }
    let samples: Vec<(f64, bool)> = units
        .values()
        .map(|(sum, n, fake)| (sum / n, *fake))
        .collect();
    let level = &r["video_level"];
    for (key, want) in [
        ("auc", metrics::auc(&samples).unwrap()),
        ("eer", metrics::eer(&samples).unwrap()),
        ("ap", metrics::average_precision(&samples).unwrap()),
    ] {
        let got = level[key]["value"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-12, "{key}: {got} vs {want}");
        let (lo, hi) = (
            level[key]["low"].as_f64().unwrap(),
            level[key]["high"].as_f64().unwrap(),
        );
        assert!(
            lo <= got + 1e-12 && got <= hi + 1e-12,
            "{key} outside its interval"
        );
    }
    assert_eq!(level["real"], 2);
    assert_eq!(level["fake"], 3);
    assert!(!level["roc"].as_array().unwrap().is_empty());
    // Frame level: every scored frame; as many samples as frames scored.
    let frames: u64 = files
        .iter()
        .map(|f| f["frames_scored"].as_u64().unwrap())
        .sum();
    let fl = &r["frame_level"];
    assert_eq!(
        fl["real"].as_u64().unwrap() + fl["fake"].as_u64().unwrap(),
        frames
    );
    // Per method: three methods, each against both real units.
    let methods: Vec<&str> = r["per_method"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["Deepfakes", "Face2Face", "FaceSwap"]);
    assert!(
        r["per_method"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["real"] == 2)
    );
    // Explanations against the FF++ label vectors, for every known method.
    let ex = r["explanations"].as_array().unwrap();
    assert_eq!(ex.len(), 3);
    let swap = ex.iter().find(|e| e["method"] == "FaceSwap").unwrap();
    assert_eq!(swap["units"], 1);
    assert!(
        swap["altered"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "identity")
    );
    assert_eq!(swap["node_agreement"].as_object().unwrap().len(), 9);

    // Per-file scores are `analyze`'s and `score`'s.
    let a = ok(&dfwatch(&[
        "analyze",
        "--frames",
        "6",
        "--model",
        s(&model),
        s(&d.join("b.mp4")),
    ]))
    .stdout
    .clone();
    let a: serde_json::Value = serde_json::from_slice(&a).unwrap();
    let b = files.iter().find(|f| f["path"] == "b.mp4").unwrap();
    assert_eq!(
        b["score"].as_f64(),
        a["score"].as_f64(),
        "eval and analyze agree"
    );
    assert_eq!(b["frames_scored"], a["frames_with_face"]);
    let sc = ok(&dfwatch(&[
        "score",
        "--model",
        s(&model),
        s(&d.join("crop1.png")),
    ]))
    .stdout
    .clone();
    let sc: serde_json::Value = serde_json::from_slice(&sc).unwrap();
    let c1 = files.iter().find(|f| f["path"] == "crop1.png").unwrap();
    let q = sc["results"][0]["q0"].as_f64().unwrap();
    assert!(
        (c1["score"].as_f64().unwrap() - q).abs() < 1e-9,
        "eval and score agree"
    );

    // The page: self-contained, with both plots and every file.
    let page = std::fs::read_to_string(d.join("out/report.html")).unwrap();
    assert!(
        page.contains("<svg") && page.contains("ROC curves") && page.contains("score histograms")
    );
    assert!(page.contains("crop3.png") && !page.contains("<script"));
    assert!(page.contains("synthetic, untrained"));

    // A second run reads every file from the cache and reports the same numbers.
    ok(&dfwatch(&args));
    let again: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(again["counts"]["cached"], 6);
    assert_eq!(again["video_level"], r["video_level"]);
    assert_eq!(again["frame_level"], r["frame_level"]);
}

#[test]
fn eval_names_bad_rows_and_keeps_going_past_unreadable_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = bundle(d, 0.0);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
    for i in 0..2 {
        std::fs::copy(
            fixtures.join(format!("crop{i}.png")),
            d.join(format!("c{i}.png")),
        )
        .unwrap();
    }
    std::fs::write(d.join("broken.png"), b"not an image").unwrap();
    std::fs::write(
        d.join("list.csv"),
        "path,label\nc0.png,real\nc1.png,fake\nbroken.png,fake\nmissing.mp4,real\n",
    )
    .unwrap();
    let out = ok(&dfwatch(&[
        "eval",
        s(&d.join("list.csv")),
        "--model",
        s(&model),
        "--no-cache",
    ]))
    .stdout
    .clone();
    let r: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(r["counts"]["failed"], 2, "{}", r["counts"]);
    let files = r["files"].as_array().unwrap();
    assert!(
        files[2]["error"].as_str().unwrap().contains("line 4"),
        "{}",
        files[2]
    );
    assert!(
        files[3]["error"].as_str().unwrap().contains("missing.mp4"),
        "{}",
        files[3]
    );
    assert!(r["video_level"]["auc"]["value"].is_number());

    std::fs::write(
        d.join("bad.csv"),
        "path,label\nc0.png,real\nc1.png,perhaps\n",
    )
    .unwrap();
    let bad = dfwatch(&["eval", s(&d.join("bad.csv")), "--model", s(&model)]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("bad.csv") && err.contains("line 3") && err.contains("perhaps"),
        "{err}"
    );
}

#[test]
fn calibrate_measures_false_alarms_and_delay_through_the_daemons_chain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let clip = face_clip(d, 6);
    std::fs::copy(&clip, d.join("real.mp4")).unwrap();
    std::fs::rename(&clip, d.join("fake.mp4")).unwrap();
    std::fs::write(
        d.join("list.csv"),
        "path,label\nreal.mp4,real\nfake.mp4,fake\n",
    )
    .unwrap();
    // Every face of this bundle looks fake (median logit(q0) 20, far past the clip of 8): the
    // real clip alarms under every threshold of the grid too.
    let model = bundle(d, 20.0);
    let section = d.join("evidence.toml");
    let run = |budget: &str| {
        dfwatch(&[
            "calibrate",
            s(&d.join("list.csv")),
            "--model",
            s(&model),
            "--false-alarms-per-hour",
            budget,
            "-o",
            s(&section),
        ])
    };
    // A budget nothing meets: refused, the curve written for the operator to read.
    let tight = run("1");
    assert!(!tight.status.success());
    let err = String::from_utf8_lossy(&tight.stderr);
    assert!(err.contains("no [evidence] setting"), "{err}");
    let curve: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("evidence.curve.json")).unwrap()).unwrap();
    assert_eq!(curve["real_videos"], 1);
    assert!((curve["real_hours"].as_f64().unwrap() * 3600.0 - 6.0).abs() < 0.5);
    assert!(curve["curve"].as_array().unwrap().len() > 50);
    assert!(
        !curve["refused"].as_array().unwrap().is_empty(),
        "validate refuses some windows"
    );
    // A loose budget, the LIST named relative to the working directory (where the default
    // config finds var/, linked here): the fake is found, about as fast as validate's alert
    // delay says.
    std::os::unix::fs::symlink(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("var"),
        d.join("var"),
    )
    .unwrap();
    let loose = Command::new(env!("CARGO_BIN_EXE_dfwatch"))
        .current_dir(d)
        .args(["calibrate", "list.csv", "--model", s(&model)])
        .args(["--false-alarms-per-hour", "100000", "-o", "evidence.toml"])
        .output()
        .unwrap();
    ok(&loose);
    let text = std::fs::read_to_string(&section).unwrap();
    assert!(text.contains("[evidence]"), "{text}");
    let curve: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("evidence.curve.json")).unwrap()).unwrap();
    let videos = curve["videos"].as_array().unwrap();
    assert_eq!(videos.len(), 2);
    assert!(
        videos
            .iter()
            .all(|v| v["error"].is_null() && v["faces_scored"].as_u64().unwrap() > 5),
        "{videos:?}"
    );
    assert!(
        videos
            .iter()
            .all(|v| (v["duration_s"].as_f64().unwrap() - 6.0).abs() < 0.2),
        "{videos:?}"
    );
    let chosen = &curve["chosen"];
    assert_eq!(chosen["fakes_detected"], 1, "{chosen}");
    assert!(chosen["false_alarms"].as_u64().unwrap() >= 1, "{chosen}");
    let delay = chosen["median_delay_s"].as_f64().unwrap();
    assert!(delay > 0.5 && delay <= 3.8 + 0.5, "delay {delay} s");
    // What it wrote is a config `validate` accepts.
    let cfg = d.join("cfg.toml");
    std::fs::write(&cfg, text).unwrap();
    ok(&dfwatch(&["validate", s(&cfg)]));
    // A FIFO in the LIST (eval refuses it): calibrate names it and goes on, never waiting
    // for a writer that does not come.
    assert!(
        Command::new("mkfifo")
            .arg(d.join("fifo.mp4"))
            .status()
            .unwrap()
            .success()
    );
    std::fs::write(
        d.join("fifo.csv"),
        "path,label\nreal.mp4,real\nfifo.mp4,fake\nfake.mp4,fake\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dfwatch"))
        .current_dir(d)
        .args(["calibrate", "fifo.csv", "--model", s(&model)])
        .args(["--false-alarms-per-hour", "100000", "-o", "fifo.toml"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > std::time::Duration::from_secs(120) {
            let _ = child.kill();
            panic!("calibrate hung on a FIFO in its LIST");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.success());
    let curve: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("fifo.curve.json")).unwrap()).unwrap();
    let fifo = curve["videos"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["path"] == "fifo.mp4")
        .unwrap_or_else(|| panic!("{}", curve["videos"]))
        .clone();
    assert!(
        fifo["error"]
            .as_str()
            .unwrap()
            .contains("not a regular file"),
        "{fifo}"
    );
}

#[test]
fn false_alarms_in_the_event_store_become_a_list_eval_reads() {
    use dfwatch::events::db::{Change, Db, Facts, Limits, MediaKind, Record, Review};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = d.join("events.db");
    let crop =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/crop0.png"))
            .unwrap();
    // The store keeps JPEGs: the fixture crop re-encoded as one.
    let img = image::load_from_memory(&crop).unwrap().to_rgb8();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
        .encode_image(&img)
        .unwrap();
    {
        let limits = Limits {
            max_age: std::time::Duration::from_secs(3600),
            max_events: 100,
            max_media_bytes: 1 << 20,
            ..Limits::default()
        };
        let (mut db, _) = Db::open(&store, limits).unwrap();
        let t = std::time::SystemTime::now();
        for (n, review, with_crop) in [
            (1, Some(Review::FalseAlarm), true),
            (2, Some(Review::FalseAlarm), false),
            (3, Some(Review::Confirmed), true),
            (4, None, true),
        ] {
            let id = format!("01J{n:023}");
            assert_eq!(id.len(), 26);
            let payload = serde_json::to_vec(&serde_json::json!({
                "alert_id": id, "type": "new", "verdict": "fake", "score": 0.9,
                "explanation": {"sentence": "face likely manipulated"},
            }))
            .unwrap();
            db.record(&Record {
                alert_id: &id,
                change: Change::New,
                stream: "lobby",
                track: n,
                at: t,
                payload: &payload,
                facts: &Facts {
                    verdict: "fake",
                    score: 0.9,
                    sentence: "face likely manipulated".into(),
                    end_reason: None,
                },
            })
            .unwrap();
            if with_crop {
                assert!(db.put_media(&id, MediaKind::Face, &jpeg).unwrap());
            }
            if let Some(r) = review {
                db.review(&id, r, None, t).unwrap();
            }
        }
    }
    let out = d.join("fa");
    let done = ok(&dfwatch(&[
        "export-false-alarms",
        "--events",
        s(&store),
        "-o",
        s(&out),
    ]))
    .stderr
    .clone();
    let said = String::from_utf8_lossy(&done);
    assert!(
        said.contains("1 false alarms with a face crop") && said.contains("1 without"),
        "{said}"
    );
    let list = std::fs::read_to_string(out.join("list.csv")).unwrap();
    let id1 = format!("01J{:023}", 1);
    let id2 = format!("01J{:023}", 2);
    let rows: Vec<&str> = list
        .lines()
        .filter(|l| {
            !l.starts_with("# False") && !l.starts_with("# crops") && !l.starts_with("# from")
        })
        .collect();
    assert_eq!(
        rows,
        [
            "path,label,method,video_id".to_string(),
            format!("{id1}.jpg,real,,{id1}"),
            format!("# {id2}: no face crop stored (its stream had store_media = false)"),
        ]
    );
    // The crop is 224 px square: eval scores it as a real face.
    let model = bundle(d, 0.0);
    let r = ok(&dfwatch(&[
        "eval",
        s(&out.join("list.csv")),
        "--model",
        s(&model),
        "--no-cache",
    ]))
    .stdout
    .clone();
    let r: serde_json::Value = serde_json::from_slice(&r).unwrap();
    assert_eq!(r["counts"]["files"], 1);
    assert_eq!(r["files"][0]["label"], "real");
    assert!(r["files"][0]["score"].is_number(), "{}", r["files"][0]);
    // The AUC needs both classes: said, not invented.
    assert!(r["video_level"]["auc"].is_null());
    // Not an event store: refused with the reason.
    std::fs::write(d.join("not.db"), b"hello").unwrap();
    let bad = dfwatch(&[
        "export-false-alarms",
        "--events",
        s(&d.join("not.db")),
        "-o",
        s(&out),
    ]);
    assert!(!bad.status.success());
}

/// Track continuity (#19's guard): the sample clip (var/sample/face.mp4, one face panned and
/// zoomed for 10 s) through the daemon's face stage keeps one track, with the shipped search
/// (whole frame every `track.detect_every` = 5 frames, around the track between) and with a
/// whole-frame search on every frame.
#[test]
fn the_sample_clip_keeps_one_track_with_and_without_searching_around_tracks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sample = root.join("var/sample/face.mp4");
    assert!(sample.exists(), "run ./tools/setup.sh first");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::os::unix::fs::symlink(root.join("var"), d.join("var")).unwrap();
    std::fs::copy(&sample, d.join("sample.mp4")).unwrap();
    std::fs::write(d.join("list.csv"), "path,label\nsample.mp4,real\n").unwrap();
    std::fs::write(d.join("every.toml"), "[track]\ndetect_every = 1\n").unwrap();
    let model = bundle(d, 0.0);
    let mut scored = Vec::new();
    for config in [None, Some("every.toml")] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dfwatch"));
        cmd.current_dir(d)
            .args(["calibrate", "list.csv", "--model", s(&model)])
            .args(["--false-alarms-per-hour", "100000", "--curve", "curve.json"]);
        if let Some(c) = config {
            cmd.args(["--config", c]);
        }
        ok(&cmd.output().unwrap());
        let curve: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("curve.json")).unwrap()).unwrap();
        let v = &curve["videos"][0];
        assert_eq!(v["tracks"], 1, "{config:?}: {v}");
        assert_eq!(v["detector_errors"], 0);
        // 10 s at 5 fps analysed.
        assert!(
            (v["frames"].as_u64().unwrap() as i64 - 50).abs() <= 1,
            "{v}"
        );
        scored.push(v["faces_scored"].as_u64().unwrap());
    }
    // Searching around the track finds the face as often as searching every frame whole.
    assert!(
        scored[0] >= scored[1] * 9 / 10 && scored[0] > 5,
        "{scored:?}"
    );
}
