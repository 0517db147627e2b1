//! The promise of the shipped defaults, as a user meets it: the sample clip the README's
//! first command runs, the `[track]` and `[evidence]` sections left out, a tiny bundle shifted
//! towards fake or real. A test binary of its own, and the two runs one after the other, so
//! the daemon is not starved by other tests: the stated delay assumes the analysis keeps up
//! with the stream (a machine too busy to do so drops frames, and says so in
//! `dfwatch_frames_dropped_total{reason="analysis_behind"}`).
#![cfg(feature = "gstreamer")]

mod daemon_support;
mod mqtt_support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use daemon_support::{Daemon, SECS, bundle, metric, metrics, on_topic, write_config_with};
use mqtt_support::{Broker, free_port, subscriber, wait_until};

/// What the shipped defaults did with the sample clip the README's first command runs.
struct DefaultsRun {
    /// Frames the face stage could not keep up with.
    behind: f64,
    alerts: Vec<serde_json::Value>,
    /// The worst-case alert delay `dfwatch validate` states for the config.
    stated: Duration,
    faces_scored: f64,
    verdicts: Vec<serde_json::Value>,
    /// From the stream coming online to each alert's arrival.
    arrivals: Vec<Duration>,
}

/// The sample clip (var/sample/face.mp4, 10 s, looping at its own frame rate) through the
/// daemon with the shipped `[track]` and `[evidence]` (no overrides) and a tiny bundle
/// shifted towards fake or real, watched for 9 s from the stream coming online: less than
/// one loop of the clip.
async fn watch_the_sample_with_the_shipped_defaults(shift: f64, name: &str) -> DefaultsRun {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("var/sample/face.mp4");
    assert!(sample.exists(), "run ./tools/setup.sh first");
    let tmp = tempfile::tempdir().unwrap();
    let mut broker = Broker::new(tmp.path());
    broker.start().await;
    let got = subscriber(broker.port, name);
    let model = bundle(tmp.path(), shift);
    let http_port = free_port();
    let stream = format!(
        "[[streams]]\nid = \"sample\"\nuri = \"{}\"\non_eos = \"loop\"\n",
        sample.display()
    );
    let config = write_config_with(tmp.path(), http_port, &broker.url(), &model, &stream, "");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(!text.contains("[track]") && !text.contains("[evidence]"));
    // The delay the config promises, as `validate` states it.
    let out = Command::new(env!("CARGO_BIN_EXE_dfwatch"))
        .arg("validate")
        .arg(&config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{said}");
    let stated = said
        .split_once("alerts within ")
        .and_then(|(_, rest)| rest.split_once(" plus"))
        .and_then(|(d, _)| humantime::parse_duration(d).ok())
        .unwrap_or_else(|| panic!("no stated delay in {said:?}"));
    let _daemon = Daemon::start(&config, tmp.path(), &[]);
    wait_until("the sample stream online", SECS(60), || {
        on_topic(&got, "/streams/sample/status")
            .last()
            .is_some_and(|s| s["state"] == "online")
    })
    .await;
    let online = Instant::now();
    let mut arrivals = Vec::new();
    while online.elapsed() < SECS(9) {
        let n = on_topic(&got, "/alerts").len();
        while arrivals.len() < n {
            arrivals.push(online.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let alerts = on_topic(&got, "/alerts");
    let text = metrics(http_port);
    let faces_scored =
        metric(&text, "dfwatch_faces_scored_total{stream=\"sample\"}").unwrap_or(0.0);
    let behind = metric(
        &text,
        "dfwatch_frames_dropped_total{stream=\"sample\",reason=\"analysis_behind\"}",
    )
    .unwrap_or(0.0);
    DefaultsRun {
        behind,
        alerts,
        stated,
        faces_scored,
        verdicts: on_topic(&got, "/streams/sample/verdict"),
        arrivals,
    }
}

/// A fake-shifted bundle raises exactly one `new` for the face within the stated delay.
async fn a_steady_fake_face_alerts_within_the_stated_delay() {
    let run = watch_the_sample_with_the_shipped_defaults(9.0, "e2e-defaults-fake").await;
    let news: Vec<_> = run.alerts.iter().filter(|a| a["type"] == "new").collect();
    assert_eq!(
        news.len(),
        1,
        "exactly one new alert for the one face: {:?}",
        run.alerts
    );
    let a = news[0];
    assert_eq!(a["stream"], "sample");
    assert_eq!(a["verdict"], "fake");
    // The defaults' own evidence rule decided it: at least min_frames = 5 faces.
    assert!(a["evidence"]["frames_scored"].as_u64().unwrap() >= 5, "{a}");
    // In the clip's own time line (the face is on screen from its first frame, pts 0), the
    // alert came from a frame no later than the stated worst case; the pipeline's latency
    // (encode, score, publish) comes on top, in wall time.
    let last_pts = a["times"]["last_pts_ms"].as_u64().unwrap();
    eprintln!(
        "shipped defaults: new alert on the frame at {last_pts} ms of the clip (stated worst \
         case {:?}), arrived {:?} after the stream came online, latency {} ms",
        run.stated, run.arrivals, a["latency_ms"]
    );
    assert!(
        Duration::from_millis(last_pts) <= run.stated,
        "alerted on the frame at {last_pts} ms, stated worst case {:?}; arrived {:?} after \
         the stream came online, latency {} ms; {} frames dropped because the analysis fell \
         behind (the stated delay assumes it keeps up)",
        run.stated,
        run.arrivals,
        a["latency_ms"],
        run.behind
    );
    assert_eq!(
        run.stated,
        Duration::from_millis(3800),
        "README and example.toml say 3.8 s"
    );
    assert_eq!(run.verdicts.last().unwrap()["verdict"], "fake");
    assert!(run.faces_scored >= 5.0);
}

/// A real-shifted bundle raises none in the same time, with every face judged.
async fn a_real_face_stays_silent() {
    let run = watch_the_sample_with_the_shipped_defaults(-9.0, "e2e-defaults-real").await;
    assert!(run.alerts.is_empty(), "{:?}", run.alerts);
    // Not silent for want of evidence: the faces were scored and judged real.
    assert!(run.faces_scored >= 5.0, "{}", run.faces_scored);
    assert_eq!(
        run.verdicts.last().expect("a retained verdict")["verdict"],
        "real",
        "{:?}",
        run.verdicts
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_defaults_alert_on_a_fake_face_within_the_stated_delay_and_not_on_a_real_one() {
    a_steady_fake_face_alerts_within_the_stated_delay().await;
    a_real_face_stays_silent().await;
}
