//! The README's first command as a new user meets it: `dfwatch run --config
//! configs/default.toml` from the checkout's root, the file exactly as shipped (its embedded
//! broker on 127.0.0.1:1883, HTTP on 127.0.0.1:8787, the sample clip named relative to the
//! file, the model it picks with no `[model]` section: the synthetic ViT-B/32 that
//! `tools/setup.sh` makes). Then the same file named by an absolute path from another working
//! directory, as systemd starts the daemon in its state directory. Each run must see the
//! stream online, faces scored, a `new` alert on the broker, and the stream listed online by
//! `/api/streams` and by the page in a real browser.
//!
//! The shipped ports are fixed, so this is a test binary of its own (cargo runs test binaries
//! one after another) with its two runs in one test, one after the other.
#![cfg(feature = "gstreamer")]

mod browser_support;
mod daemon_support;
mod mqtt_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use browser_support::Browser;
use daemon_support::{Daemon, SECS, http, metric, metrics, on_topic};
use mqtt_support::{subscriber, wait_until};

/// The ports `configs/default.toml` ships with.
const MQTT_PORT: u16 = 1883;
const HTTP_PORT: u16 = 8787;

fn checkout() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shipped ports must be free: a daemon or broker left running would answer instead.
fn assert_free(port: u16) {
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "127.0.0.1:{port} is taken: configs/default.toml's port; stop what holds it \
         (a dfwatch or mosquitto left running) and run again"
    );
}

/// Runs the daemon on the shipped config (`config` spelled as given, from `cwd`) and checks
/// what the README promises; returns the first `new` alert's delay from the start.
async fn run_the_shipped_config(config: &Path, cwd: &Path, name: &str) -> Duration {
    assert_free(MQTT_PORT);
    assert_free(HTTP_PORT);
    let tmp = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    // STATE_DIRECTORY as systemd sets it: the spool, the API token and the event store go
    // there, not into the checkout.
    let daemon = Daemon::start_in(config, tmp.path(), cwd);
    let got = subscriber(MQTT_PORT, name);
    wait_until("the sample stream online on MQTT", SECS(120), || {
        on_topic(&got, "/streams/sample/status")
            .last()
            .is_some_and(|s| s["state"] == "online")
    })
    .await;
    let online = t0.elapsed();
    wait_until("a new alert on the broker", SECS(120), || {
        on_topic(&got, "/alerts").iter().any(|a| a["type"] == "new")
    })
    .await;
    let first_alert = t0.elapsed();
    let alerts = on_topic(&got, "/alerts");
    let new = alerts.iter().find(|a| a["type"] == "new").unwrap();
    assert_eq!(new["stream"], "sample", "{new}");
    // The model the shipped config picks in a fresh checkout, and says so in every alert.
    assert_eq!(new["model"]["trained"], false, "{new}");
    assert_eq!(new["model"]["name"], "sjedd-synth-vit-b-32-ffpp", "{new}");
    let text = metrics(HTTP_PORT);
    let scored = metric(&text, "dfwatch_faces_scored_total{stream=\"sample\"}").unwrap_or(0.0);
    assert!(scored > 0.0, "no face scored:\n{text}");
    // /api/streams: reads are open on a loopback listener, as shipped.
    let (code, body) = http(HTTP_PORT, "GET", "/api/streams", None, "");
    assert_eq!(code, 200, "{body}");
    let streams: serde_json::Value = serde_json::from_str(&body).unwrap();
    let sample = streams
        .as_array()
        .and_then(|a| a.iter().find(|s| s["id"] == "sample"))
        .unwrap_or_else(|| panic!("no stream sample in {body}"));
    assert_eq!(sample["status"]["state"], "online", "{sample}");
    // One spelling of the clip: the normalised file URI, no `configs/..` in it.
    let want = format!("file://{}/var/sample/face.mp4", checkout().display());
    assert_eq!(sample["uri"], want.as_str(), "{sample}");
    let (code, ready) = http(HTTP_PORT, "GET", "/readyz", None, "");
    assert_eq!(code, 200, "{ready}");
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["degraded"], serde_json::json!([]), "{ready}");
    // The page lists the stream online.
    let browser = Browser::start(&tmp.path().join("profile"));
    browser.go(&format!("http://127.0.0.1:{HTTP_PORT}/"));
    browser
        .until(
            "the sample stream online",
            SECS(30),
            r#"[...document.querySelectorAll('li.stream[data-stream="sample"] dd')]
                .some((d) => d.textContent === "online")"#,
        )
        .await;
    drop(browser);
    let log = daemon.log();
    assert!(!log.contains("Source refused"), "{log}");
    eprintln!(
        "{name}: online {online:.1?} after the start, first new alert {first_alert:.1?} after \
         the start ({:.1?} after online), {scored} faces scored",
        first_alert - online
    );
    let mut daemon = daemon;
    daemon.signal("TERM");
    let (code, _) = daemon.wait_exit(SECS(30));
    assert_eq!(code, Some(0), "{}", daemon.log());
    first_alert
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_first_command_scores_the_sample_and_alerts_from_the_checkout_and_from_elsewhere()
 {
    let root = checkout();
    assert!(
        root.join("var/sample/face.mp4").exists() && root.join("var/models/mtcnn").exists(),
        "run ./tools/setup.sh first"
    );
    // With an imported (trained) SJEDD bundle the default config runs it instead, and the
    // sample's real face rightly raises nothing: this test is about a fresh checkout.
    assert!(
        !root.join("var/models/sjedd/manifest.toml").exists(),
        "var/models/sjedd is installed, so configs/default.toml runs a trained model, which \
         raises no alert on the sample's real face; move it aside to run this test"
    );
    // From the checkout's root, the config named as the README names it.
    run_the_shipped_config(Path::new("configs/default.toml"), &root, "quickstart-root").await;
    // From another directory (systemd starts the daemon in its state directory), the same
    // file named by its absolute path: the clip, the model and the detector are found.
    let elsewhere = tempfile::tempdir().unwrap();
    run_the_shipped_config(
        &root.join("configs/default.toml"),
        elsewhere.path(),
        "quickstart-elsewhere",
    )
    .await;
}
