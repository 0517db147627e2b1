//! The daemon end to end: the `dfwatch` binary on a generated config, fed by an in-process RTSP
//! server streaming a clip with a real moving face (the astronaut photo), publishing to a real
//! mosquitto, observed through MQTT, HTTP and a systemd notify socket.
//!
//! Bundles are tiny synthetic models shifted towards fake or real (`tools/model.py synth
//! --shift`), so the verdicts are known in advance; the detector is the real MTCNN.
#![cfg(feature = "gstreamer")]

mod common;
mod daemon_support;
mod mqtt_support;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{H264_LIVE, RtspServer};
use daemon_support::{
    Daemon, SECS, TOKEN, TUNED_CADENCE, bundle, face_clip, http, metric, metrics, on_topic,
    stream_report, write_config_with,
};
use mqtt_support::{Broker, free_port, receiver, subscriber, subscriber_on, wait_until};

/// An RTSP server streaming `clip` in real time at `/test`.
fn serve_clip(clip: &Path, port: u16) -> RtspServer {
    RtspServer::start(
        &format!(
            "filesrc location={} ! qtdemux ! h264parse config-interval=-1",
            clip.display()
        ),
        "rtph264pay",
        port,
        None,
    )
}

struct Setup {
    dir: tempfile::TempDir,
    http_port: u16,
    config: PathBuf,
}

fn write_config(
    dir: &Path,
    http_port: u16,
    mqtt_url: &str,
    model: &Path,
    streams: &str,
) -> PathBuf {
    write_config_with(dir, http_port, mqtt_url, model, streams, TUNED_CADENCE)
}

fn stream_toml(id: &str, uri: &str) -> String {
    format!("[[streams]]\nid = \"{id}\"\nuri = \"{uri}\"\non_eos = \"loop\"\n")
}

/// A config in a temp dir; `{clip}` in `streams` becomes a face clip of `clip_seconds`.
fn setup(streams: &str, mqtt_url: &str, shift: f64, clip_seconds: u32) -> (Setup, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let clip = if streams.contains("{clip}") {
        face_clip(dir.path(), clip_seconds)
    } else {
        PathBuf::new()
    };
    let model = bundle(dir.path(), shift);
    let http_port = free_port();
    let streams = streams.replace("{clip}", &clip.display().to_string());
    let config = write_config(dir.path(), http_port, mqtt_url, &model, &streams);
    (
        Setup {
            dir,
            http_port,
            config,
        },
        clip,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_face_over_rtsp_raises_one_explained_alert() {
    let tmp = tempfile::tempdir().unwrap();
    let clip = face_clip(tmp.path(), 40);
    let server = serve_clip(&clip, 0);
    let rtsp_port = server.port;
    let mut broker = Broker::new(tmp.path());
    broker.start().await;
    let got = subscriber(broker.port, "e2e-fake");
    // This stream opts in to face crops with its alerts.
    let stream = format!(
        "{}publish_face_crops = true\n",
        stream_toml("cam", &server.url())
    );
    let (s, _) = setup(&stream, &broker.url(), 8.0, 0);
    // Home Assistant discovery on, and a webhook that takes the alert events.
    let ha = subscriber_on(broker.port, "e2e-ha", "homeassistant/#");
    let (hook_port, hits) = receiver(tokio::time::Instant::now()).await;
    let text = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace("[mqtt]\n", "[mqtt]\nhomeassistant = true\n");
    std::fs::write(
        &s.config,
        format!(
            "{text}\n[[webhooks]]\nname = \"ops\"\nurl = \"http://127.0.0.1:{hook_port}/hook/secret-path\"\n"
        ),
    )
    .unwrap();
    // A systemd notify socket, as the unit would give it.
    let notify_path = s.dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut daemon = Daemon::start(
        &s.config,
        s.dir.path(),
        &[
            ("NOTIFY_SOCKET", notify_path.display().to_string()),
            ("WATCHDOG_USEC", "1000000".to_string()),
        ],
    );
    let notes: Arc<Mutex<Vec<String>>> = Default::default();
    let sink = notes.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let t0 = Instant::now();
        while t0.elapsed() < SECS(120) {
            if let Ok(n) = notify.recv(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    });
    let port = s.http_port;
    wait_until("/readyz ready", SECS(60), || {
        http(port, "GET", "/readyz", None, "").0 == 200
    })
    .await;
    wait_until("READY=1 and WATCHDOG=1 on NOTIFY_SOCKET", SECS(20), || {
        let n = notes.lock().unwrap();
        n.iter().any(|m| m.starts_with("READY=1")) && n.iter().any(|m| m == "WATCHDOG=1")
    })
    .await;
    wait_until("a new alert on dfwatch/e2e/alerts", SECS(60), || {
        !on_topic(&got, "/alerts").is_empty()
    })
    .await;
    let alerts = on_topic(&got, "/alerts");
    let a = &alerts[0];
    assert_eq!(a["type"], "new", "{a}");
    assert_eq!(a["verdict"], "fake", "{a}");
    assert_eq!(a["stream"], "cam");
    assert!(a["track_id"].as_u64().unwrap() >= 1);
    assert_eq!(a["model"]["trained"], false);
    assert_eq!(a["schema_version"], 1);
    let sentence = a["explanation"]["sentence"].as_str().unwrap();
    assert!(sentence.len() > 20, "{sentence}");
    assert!(a["evidence"]["frames_scored"].as_u64().unwrap() >= 3, "{a}");
    let text = metrics(port);
    assert!(metric(&text, "dfwatch_faces_scored_total{stream=\"cam\"}").unwrap() >= 3.0);
    assert!(metric(&text, "dfwatch_faces_detected_total{stream=\"cam\"}").unwrap() >= 3.0);
    assert!(metric(&text, "dfwatch_alerts_total{type=\"new\",verdict=\"fake\"}").unwrap() >= 1.0);
    assert!(text.contains("dfwatch_build_info{"), "{text}");
    assert!(text.contains("trained=\"false\""));
    assert_eq!(http(port, "GET", "/livez", None, "").0, 200);
    // The face crop of the new alert, as a JPEG on its own topic.
    let face_topic = format!(
        "dfwatch/e2e/alerts/{}/face",
        a["alert_id"].as_str().unwrap()
    );
    wait_until("the face crop JPEG", SECS(10), || {
        got.lock().unwrap().iter().any(|(t, _)| *t == face_topic)
    })
    .await;
    let (code, body) = http(port, "GET", "/api/alerts?limit=5", None, "");
    assert_eq!(code, 200);
    assert!(body.contains(a["alert_id"].as_str().unwrap()), "{body}");
    // Reads are open on this loopback listener: a page elsewhere that points a name of its
    // own at 127.0.0.1 (DNS rebinding) is refused by Host.
    {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(SECS(10))).unwrap();
        c.write_all(
            b"GET /api/events HTTP/1.1\r\nHost: rebinding.example:8787\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 421"), "{out}");
    }
    // Only one track, so only one new alert however long the face stays fake.
    tokio::time::sleep(SECS(3)).await;
    let news = on_topic(&got, "/alerts")
        .into_iter()
        .filter(|a| a["type"] == "new")
        .count();
    assert_eq!(news, 1, "{:?}", on_topic(&got, "/alerts"));
    // The retained per-stream verdict says fake, with the leading track's score.
    let verdicts = on_topic(&got, "/streams/cam/verdict");
    assert_eq!(verdicts.last().unwrap()["verdict"], "fake", "{verdicts:?}");
    assert!(
        verdicts.last().unwrap()["score"].as_f64().unwrap() > 0.5,
        "{verdicts:?}"
    );
    // The webhook got the same new alert, keyed by alert id, kind and spool sequence.
    let id = a["alert_id"].as_str().unwrap().to_string();
    wait_until("the new alert at the webhook", SECS(10), || {
        hits.lock()
            .unwrap()
            .iter()
            .any(|h| h.0.starts_with(&format!("{id}:new:")) && h.3.contains(&id))
    })
    .await;
    // Home Assistant sees the stream: four entities of the stream's device, available while
    // the stream is online, and the alert as an event with its explanation.
    wait_until("Home Assistant discovery configs for cam", SECS(10), || {
        ha.lock()
            .unwrap()
            .iter()
            .filter(|(t, p)| t.contains("/dfwatch_e2e/cam_") && p.contains("\"unique_id\""))
            .count()
            >= 4
    })
    .await;
    let available = got
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|(t, _)| t.ends_with("/streams/cam/availability"))
        .map(|(_, p)| p.clone());
    assert_eq!(available.as_deref(), Some("online"));
    let events = on_topic(&got, "/streams/cam/event");
    let first_new = on_topic(&got, "/alerts")
        .into_iter()
        .find(|a| a["type"] == "new")
        .unwrap();
    let ev = events
        .iter()
        .find(|e| e["event_type"] == "new")
        .unwrap_or_else(|| panic!("no alert event entity message: {events:?}"));
    assert_eq!(ev["alert_id"], first_new["alert_id"]);
    assert_eq!(
        ev["explanation"], first_new["explanation"]["sentence"],
        "{ev}"
    );
    // The webhook's URL path (often a secret) is not in the log or the metrics.
    assert!(!daemon.log().contains("secret-path"));
    let text = metrics(port);
    assert!(!text.contains("secret-path"));
    assert!(
        metric(&text, "dfwatch_webhook_delivered_total{webhook=\"ops\"}").unwrap() >= 1.0,
        "{text}"
    );

    // The server goes away: the retained stream status says reconnecting, then online again.
    server.stop();
    wait_until("retained status reconnecting", SECS(30), || {
        on_topic(&got, "/streams/cam/status")
            .last()
            .is_some_and(|s| s["state"] == "reconnecting")
    })
    .await;
    let server = serve_clip(&clip, rtsp_port);
    wait_until("retained status online again", SECS(40), || {
        on_topic(&got, "/streams/cam/status")
            .last()
            .is_some_and(|s| s["state"] == "online")
    })
    .await;

    daemon.signal("TERM");
    let (code, took) = daemon.wait_exit(SECS(15));
    assert_eq!(code, Some(0), "{}", daemon.log());
    assert!(took < SECS(6), "stopped in {took:?}");
    wait_until("status stopped", SECS(5), || {
        got.lock()
            .unwrap()
            .iter()
            .any(|(t, p)| t == "dfwatch/e2e/status" && p == "stopped")
    })
    .await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_face_is_scored_and_stays_silent() {
    let tmp = tempfile::tempdir().unwrap();
    let clip = face_clip(tmp.path(), 40);
    let server = serve_clip(&clip, 0);
    let mut broker = Broker::new(tmp.path());
    broker.start().await;
    let got = subscriber(broker.port, "e2e-real");
    let (s, _) = setup(&stream_toml("cam", &server.url()), &broker.url(), -8.0, 0);
    let mut daemon = Daemon::start(&s.config, s.dir.path(), &[]);
    let port = s.http_port;
    wait_until("20 faces scored", SECS(90), || {
        metric(&metrics(port), "dfwatch_faces_scored_total{stream=\"cam\"}").unwrap_or(0.0) >= 20.0
    })
    .await;
    let text = metrics(port);
    let coverage = metric(&text, "dfwatch_coverage_ratio{stream=\"cam\"}").unwrap();
    assert!(coverage > 0.9, "coverage {coverage}\n{text}");
    assert!(
        on_topic(&got, "/alerts").is_empty(),
        "{:?}",
        on_topic(&got, "/alerts")
    );
    let verdicts = on_topic(&got, "/streams/cam/verdict");
    assert_eq!(verdicts.last().unwrap()["verdict"], "real", "{verdicts:?}");
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(SECS(15)).0, Some(0));
    drop(server);
}

/// The hostile review's ghost: a stream added through the API turns fake, the daemon is
/// SIGKILLed and started again without it (API streams are runtime-only). Afterwards the
/// persistent broker holds nothing of it (no Home Assistant config, verdict, status or
/// availability), and the config stream's availability is not the dead run's `online` until
/// it is online again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_gone_with_a_killed_daemon_leaves_no_ghost_entities_after_the_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut broker = Broker::new(tmp.path());
    broker.start().await;
    let (s, clip) = setup(&stream_toml("cam", "{clip}"), &broker.url(), 8.0, 10);
    let server = serve_clip(&clip, 0);
    let text = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace("[mqtt]\n", "[mqtt]\nhomeassistant = true\n");
    std::fs::write(&s.config, text).unwrap();
    let port = s.http_port;
    let mut daemon = Daemon::start(&s.config, s.dir.path(), &[]);
    let got = subscriber(broker.port, "ghost-watch");
    wait_until("/readyz ready", SECS(60), || {
        http(port, "GET", "/readyz", None, "").0 == 200
    })
    .await;
    let body = format!(r#"{{"id":"guest","uri":"{}"}}"#, server.url());
    assert_eq!(
        http(port, "POST", "/api/streams", Some(TOKEN), &body).0,
        201
    );
    wait_until("the guest stream's verdict fake", SECS(90), || {
        on_topic(&got, "/streams/guest/verdict")
            .last()
            .is_some_and(|v| v["verdict"] == "fake")
    })
    .await;
    daemon.signal("KILL");
    daemon.wait_exit(SECS(10));
    let _daemon = Daemon::start(&s.config, s.dir.path(), &[]);
    wait_until("the node online again", SECS(60), || {
        got.lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(t, _)| t == "dfwatch/e2e/status")
            .is_some_and(|(_, p)| p == "online")
            && http(port, "GET", "/readyz", None, "").0 == 200
    })
    .await;
    // What a client arriving finds retained, once the state topics' grace after the configs
    // (Home Assistant drops the entities first) has passed: nothing of the guest.
    let ghosts = |name: &str| {
        let fresh = subscriber_on(broker.port, name, "#");
        async move {
            tokio::time::sleep(SECS(2)).await;
            fresh
                .lock()
                .unwrap()
                .iter()
                .filter(|(t, p)| t.contains("guest") && !p.is_empty())
                .map(|(t, _)| t.clone())
                .collect::<Vec<String>>()
        }
    };
    tokio::time::sleep(SECS(6)).await;
    let left = ghosts("ghost-fresh").await;
    assert!(left.is_empty(), "left behind: {left:?}");
    // The config stream is back, with this run's verdict, never the dead run's fake as if
    // judged: it starts unknown.
    let verdicts = on_topic(&got, "/streams/cam/verdict");
    assert!(
        verdicts.iter().any(|v| v["verdict"] == "unknown"),
        "{verdicts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_come_and_go_through_the_api_and_sighup_without_touching_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let server = RtspServer::start(common::H264_LIVE, "rtph264pay", 0, None);
    let mut broker = Broker::new(tmp.path());
    broker.start().await;
    let (s, clip) = setup(&stream_toml("steady", "{clip}"), &broker.url(), -8.0, 8);
    let mut daemon = Daemon::start(&s.config, s.dir.path(), &[]);
    let port = s.http_port;
    let steady = || {
        metric(
            &metrics(port),
            "dfwatch_frames_analysed_total{stream=\"steady\"}",
        )
        .unwrap_or(0.0)
    };
    wait_until("steady analyses frames", SECS(60), || steady() > 0.0).await;
    // The steady stream's counter must rise through every change below.
    let rising = |before: f64| async move {
        wait_until("the steady stream keeps going", SECS(10), || {
            steady() > before
        })
        .await;
        steady()
    };

    let body = format!(r#"{{"id": "extra", "uri": "{}"}}"#, server.url());
    assert_eq!(http(port, "POST", "/api/streams", None, &body).0, 401);
    assert_eq!(
        http(
            port,
            "POST",
            "/api/streams",
            Some("wrong-token-0123456789"),
            &body
        )
        .0,
        401
    );
    let (code, err) = http(
        port,
        "POST",
        "/api/streams",
        Some(TOKEN),
        r#"{"id": "bad", "uri": "ftp://example.com/x"}"#,
    );
    assert_eq!(code, 400, "{err}");
    assert!(err.contains("ftp"), "{err}");
    let (code, err) = http(
        port,
        "POST",
        "/api/streams",
        Some(TOKEN),
        r#"{"id": "typo", "uri": "rtsp://127.0.0.1/x", "enabeld": true}"#,
    );
    assert_eq!(code, 400, "{err}");
    assert!(err.contains("enabeld"), "{err}");
    let mut n = steady();
    let (code, reply) = http(port, "POST", "/api/streams", Some(TOKEN), &body);
    assert_eq!(code, 201, "{reply}");
    assert_eq!(
        http(port, "POST", "/api/streams", Some(TOKEN), &body).0,
        409
    );
    wait_until("the added stream comes online", SECS(30), || {
        let (_, b) = http(port, "GET", "/api/streams", None, "");
        let v: serde_json::Value = serde_json::from_str(&b).unwrap_or_default();
        v.as_array().is_some_and(|a| {
            a.iter().any(|s| {
                s["id"] == "extra" && s["status"]["state"] == "online" && s["runtime_only"] == true
            })
        })
    })
    .await;
    n = rising(n).await;
    assert_eq!(
        http(port, "DELETE", "/api/streams/extra", Some(TOKEN), "").0,
        204
    );
    assert_eq!(
        http(port, "DELETE", "/api/streams/extra", Some(TOKEN), "").0,
        404
    );
    n = rising(n).await;

    // SIGHUP: the file gains a stream; the steady one is untouched.
    let text = std::fs::read_to_string(&s.config).unwrap();
    let added = stream_toml("hup", &server.url());
    std::fs::write(
        &s.config,
        text.replacen("[model]", &format!("{added}\n[model]"), 1),
    )
    .unwrap();
    let reconnects_before = metric(
        &metrics(port),
        "dfwatch_stream_reconnects_total{stream=\"steady\"}",
    );
    daemon.signal("HUP");
    wait_until("the stream from the file appears", SECS(30), || {
        metrics(port).contains("dfwatch_frames_analysed_total{stream=\"hup\"}")
    })
    .await;
    n = rising(n).await;
    // A broken file: refused as a whole, nothing changes.
    std::fs::write(&s.config, "[[streams]]\nid = \"x\"\nuri = \"ftp://nope\"\n").unwrap();
    let (code, err) = http(port, "POST", "/api/reload", Some(TOKEN), "");
    assert_eq!(code, 400, "{err}");
    assert!(err.contains("streams[0].uri"), "{err}");
    assert!(metrics(port).contains("{stream=\"hup\"}"));
    rising(n).await;
    let text = metrics(port);
    assert_eq!(
        metric(&text, "dfwatch_stream_reconnects_total{stream=\"steady\"}"),
        reconnects_before
    );
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(SECS(15)).0, Some(0));
    drop(clip);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_broker_down_ends_in_time_and_keeps_the_spool() {
    let down = format!("mqtt://127.0.0.1:{}", free_port());
    let (s, _) = setup(&stream_toml("cam", "{clip}"), &down, 8.0, 20);
    let mut daemon = Daemon::start(&s.config, s.dir.path(), &[]);
    let port = s.http_port;
    wait_until("an alert waits in the spool", SECS(90), || {
        metric(&metrics(port), "dfwatch_spool_pending").unwrap_or(0.0) >= 1.0
    })
    .await;
    daemon.signal("TERM");
    let (code, took) = daemon.wait_exit(SECS(15));
    assert_eq!(code, Some(0), "{}", daemon.log());
    assert!(took < SECS(6), "stopped in {took:?} with a 4 s grace");
    let log = std::fs::read(s.dir.path().join("spool/spool.log")).unwrap();
    assert!(
        String::from_utf8_lossy(&log).contains("\"verdict\":\"fake\""),
        "the alert is on disk for the next start"
    );
}

/// Live RTSP, SRT and HLS sources (gst-rtsp-server in process, an SRT listener, an HLS
/// writer served over HTTP) with the broker down, as in a fault run: the daemon is SIGKILLed
/// and started again on the same state, and every stream comes back online, twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_with_the_broker_down_brings_rtsp_srt_and_hls_back_after_a_restart() {
    common::init();
    let rtsp = RtspServer::start(H264_LIVE, "rtph264pay", 0, None);
    let srt_port = common::free_udp_port();
    let _srt = common::Sender::start(&format!(
        "{H264_LIVE} ! h264parse config-interval=-1 ! mpegtsmux alignment=7 ! \
         srtsink uri=srt://127.0.0.1:{srt_port}?mode=listener wait-for-connection=false"
    ));
    let hls_dir = tempfile::tempdir().unwrap();
    let d = hls_dir.path().display();
    let _hls = common::Sender::start(&format!(
        "{H264_LIVE} ! h264parse ! hlssink2 location={d}/seg%05d.ts \
         playlist-location={d}/live.m3u8 target-duration=1 playlist-length=5 max-files=10"
    ));
    let hls_port = common::serve_dir(hls_dir.path().to_path_buf());
    let streams = [
        ("rtsp", rtsp.url()),
        ("srt", format!("srt://127.0.0.1:{srt_port}?mode=caller")),
        ("hls", format!("http://127.0.0.1:{hls_port}/live.m3u8")),
    ]
    .iter()
    .map(|(id, uri)| format!("[[streams]]\nid = \"{id}\"\nuri = \"{uri}\"\n"))
    .collect::<String>();
    let down = format!("mqtt://127.0.0.1:{}", free_port());
    let (s, _) = setup(&streams, &down, 8.0, 0);
    let port = s.http_port;
    let all_online = || {
        ["rtsp", "srt", "hls"].iter().all(|id| {
            stream_report(port, TOKEN, id).is_some_and(|r| r["status"]["state"] == "online")
        })
    };
    for round in 0..3 {
        let mut daemon = Daemon::start(&s.config, s.dir.path(), &[]);
        let t0 = Instant::now();
        let what = format!("RTSP, SRT and HLS online (start {round})");
        let t = tokio::time::Instant::now();
        while !all_online() {
            let states: Vec<_> = ["rtsp", "srt", "hls"]
                .iter()
                .map(|id| stream_report(port, TOKEN, id).map(|r| r["status"].clone()))
                .collect();
            assert!(
                t.elapsed() < SECS(60),
                "timed out waiting for {what}: {states:?}\n{}",
                daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!("{what} after {:.1?}", t0.elapsed());
        if round < 2 {
            daemon.signal("KILL");
            daemon.wait_exit(SECS(10));
        }
    }
}

#[test]
fn analyze_gives_one_verdict_over_the_requested_frames() {
    let dir = tempfile::tempdir().unwrap();
    let clip = face_clip(dir.path(), 6);
    for (shift, want) in [(8.0, "fake"), (-8.0, "real")] {
        let model = bundle(dir.path(), shift);
        let out = Command::new(env!("CARGO_BIN_EXE_dfwatch"))
            .args(["analyze", "--frames", "30", "--model"])
            .arg(&model)
            .arg(&clip)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["frames_requested"], 30);
        assert_eq!(r["frames_decoded"], 30, "{r}");
        assert_eq!(r["frames"].as_array().unwrap().len(), 30);
        assert!(r["frames_with_face"].as_u64().unwrap() >= 25, "{r}");
        assert_eq!(r["verdict"], want, "{r}");
        assert!((r["duration_s"].as_f64().unwrap() - 6.0).abs() < 0.2);
        assert_eq!(r["model"]["trained"], false);
        assert!(r["explanation"]["sentence"].as_str().unwrap().len() > 10);
        let tracks = r["tracks"].as_array().unwrap();
        assert!(!tracks.is_empty(), "{r}");
        assert_eq!(tracks[0]["verdict"], want, "{r}");
    }
    // A source without a duration is refused with the reason.
    let out = Command::new(env!("CARGO_BIN_EXE_dfwatch"))
        .args(["analyze", "--model"])
        .arg(dir.path().join("bundle8"))
        .arg(dir.path().join("missing.mp4"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.mp4"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_swap_on_reload_ends_open_alerts_and_changes_the_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let mut broker = Broker::new(tmp.path());
    broker.start().await;
    let got = subscriber(broker.port, "e2e-swap");
    let (s, _) = setup(&stream_toml("cam", "{clip}"), &broker.url(), 8.0, 20);
    let real = bundle(s.dir.path(), -8.0);
    let mut daemon = Daemon::start(&s.config, s.dir.path(), &[]);
    let port = s.http_port;
    wait_until("a new alert", SECS(90), || {
        on_topic(&got, "/alerts").iter().any(|a| a["type"] == "new")
    })
    .await;
    let sha_before = on_topic(&got, "/alerts")[0]["model"]["manifest_sha256"].clone();
    let text = std::fs::read_to_string(&s.config).unwrap();
    let fake = s.dir.path().join("bundle8");
    std::fs::write(
        &s.config,
        text.replace(&fake.display().to_string(), &real.display().to_string()),
    )
    .unwrap();
    let (code, report) = http(port, "POST", "/api/reload", Some(TOKEN), "");
    assert_eq!(code, 200, "{report}");
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["model_swapped"], true, "{report}");
    assert_eq!(report["restarted"], serde_json::json!([]), "{report}");
    wait_until("the open alert ends with model_swapped", SECS(20), || {
        on_topic(&got, "/alerts")
            .iter()
            .any(|a| a["type"] == "end" && a["end_reason"] == "model_swapped")
    })
    .await;
    let (_, ready) = http(port, "GET", "/readyz", None, "");
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_ne!(ready["model"]["manifest_sha256"], sha_before);
    // The new model scores faces too (the encoder thread was replaced, not lost).
    let before = metric(&metrics(port), "dfwatch_faces_scored_total{stream=\"cam\"}").unwrap();
    wait_until("faces scored by the new model", SECS(20), || {
        metric(&metrics(port), "dfwatch_faces_scored_total{stream=\"cam\"}").unwrap() > before
    })
    .await;
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(SECS(15)).0, Some(0));
}

/// A panic injected into each stage (a face stage, the encoder, the decision stage, the
/// publisher; `DFWATCH_FAULT_INJECT`) is caught where the stage loops: the daemon goes on
/// analysing and alerting, counts each restart, and says so in `/readyz`, `/api/streams` and
/// `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_any_stage_is_survived_counted_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let mut broker = Broker::new(tmp.path());
    broker.start().await;
    let got = subscriber(broker.port, "e2e-faults");
    let (s, _) = setup(&stream_toml("cam", "{clip}"), &broker.url(), 8.0, 20);
    let mut daemon = Daemon::start(
        &s.config,
        s.dir.path(),
        &[(
            "DFWATCH_FAULT_INJECT",
            "faces=4,encoder=3,decide=5,publisher=7".to_string(),
        )],
    );
    let port = s.http_port;
    let restarts = |stage: &str, text: &str| {
        let series = if stage == "faces" {
            "dfwatch_stage_restarts_total{stage=\"faces\",stream=\"cam\"}".to_string()
        } else {
            format!("dfwatch_stage_restarts_total{{stage=\"{stage}\"}}")
        };
        metric(text, &series).unwrap_or(0.0)
    };
    wait_until("a restart of every stage", SECS(90), || {
        let text = metrics(port);
        ["faces", "encoder", "decide", "publisher"]
            .iter()
            .all(|st| restarts(st, &text) >= 1.0)
    })
    .await;
    // Reported where an operator looks.
    let (code, body) = http(port, "GET", "/readyz", None, "");
    assert_eq!(code, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    let degraded = ready["degraded"].to_string();
    for what in ["publisher", "encoder", "decision stage", "stream cam"] {
        assert!(degraded.contains(what), "{what} missing in {degraded}");
    }
    assert!(degraded.contains("fault injected"), "{degraded}");
    let (_, body) = http(port, "GET", "/api/streams", None, "");
    let streams: serde_json::Value = serde_json::from_str(&body).unwrap();
    let cam = &streams[0];
    assert!(cam["analysis_restarts"].as_u64().unwrap() >= 1, "{cam}");
    assert!(
        cam["analysis_error"]
            .as_str()
            .unwrap()
            .contains("fault injected at faces"),
        "{cam}"
    );
    // And it goes on: faces are scored and alerts published after the last restart.
    let scored = metric(&metrics(port), "dfwatch_faces_scored_total{stream=\"cam\"}").unwrap();
    let alerts_before = on_topic(&got, "/alerts").len();
    wait_until("more faces scored", SECS(30), || {
        metric(&metrics(port), "dfwatch_faces_scored_total{stream=\"cam\"}").unwrap_or(0.0)
            >= scored + 5.0
    })
    .await;
    wait_until(
        "an alert event published after the restarts",
        SECS(60),
        || on_topic(&got, "/alerts").len() > alerts_before,
    )
    .await;
    daemon.signal("TERM");
    let (code, _) = daemon.wait_exit(SECS(20));
    assert_eq!(code, Some(0), "{}", daemon.log());
}
