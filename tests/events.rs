//! The event store end to end: the `dfwatch` binary on a looping face clip with a model
//! shifted towards fake, a stream that stores evidence media, reads behind the token (so a
//! browser's session, its cookie and tab secret, is what the SSE stream is read with), and a
//! SIGKILL in the middle.
#![cfg(feature = "gstreamer")]

mod daemon_support;
mod mqtt_support;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use daemon_support::{Daemon, SECS, TOKEN, bundle, face_clip, http, media_stream_config, on_topic};
use mqtt_support::{Broker, free_port, subscriber, wait_until};

/// A request with extra headers; the status, the response head and the body as bytes.
fn request(port: u16, method: &str, path: &str, headers: &str) -> (u16, String, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(SECS(10))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}\
         Content-Length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(out.len());
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let body = out.get(split + 4..).unwrap_or_default().to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head, body)
}

/// A live SSE connection: everything it received so far, and when each `event:` arrived.
struct Sse {
    text: Arc<Mutex<String>>,
    events: Arc<Mutex<Vec<(String, Instant)>>>,
}

fn sse(port: u16, headers: &str) -> Sse {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let req = format!(
        "GET /api/events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n{headers}\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let text: Arc<Mutex<String>> = Default::default();
    let events: Arc<Mutex<Vec<(String, Instant)>>> = Default::default();
    let (t, e) = (text.clone(), events.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        let mut line = String::new();
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            let chunk = String::from_utf8_lossy(&buf[..n]).into_owned();
            t.lock().unwrap().push_str(&chunk);
            for c in chunk.chars() {
                if c == '\n' {
                    if let Some(name) = line.strip_prefix("event:") {
                        e.lock()
                            .unwrap()
                            .push((name.trim().to_string(), Instant::now()));
                    }
                    line.clear();
                } else {
                    line.push(c);
                }
            }
        }
    });
    Sse { text, events }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_are_kept_with_media_streamed_live_and_survive_a_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let clip = face_clip(tmp.path(), 10);
    let model = bundle(tmp.path(), 8.0);
    let mut broker = Broker::new(tmp.path());
    broker.start().await;
    let got = subscriber(broker.port, "events-e2e");
    let port = free_port();
    // Reads behind the token, as on a non-loopback listener.
    let config = media_stream_config(tmp.path(), port, &broker.url(), &model, &clip);
    let mut daemon = Daemon::start(&config, tmp.path(), &[]);
    wait_until("/readyz ready", SECS(60), || {
        http(port, "GET", "/readyz", None, "").0 == 200
    })
    .await;

    // A browser's way in: EventSource sends no Authorization header, so the page trades the
    // token for a session (a cookie and a tab secret) once.
    let (code, _, _) = request(port, "GET", "/api/events", "");
    assert_eq!(code, 401, "reads need the token or a session");
    let (code, head, _) = request(port, "POST", "/api/session", "");
    assert_eq!(code, 401, "a session needs the token");
    let (code, head2, session_body) = request(
        port,
        "POST",
        "/api/session",
        &format!("Authorization: Bearer {TOKEN}\r\n"),
    );
    assert_eq!(code, 200, "{head} / {head2}");
    let set = head2
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .expect("a session cookie");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let session: serde_json::Value = serde_json::from_slice(&session_body).unwrap();
    let tab = session["tab"].as_str().expect("a tab secret").to_string();
    let cookie_only = format!("Cookie: {}\r\n", set.split(';').next().unwrap());
    // The cookie alone (what a program on another port of this host can collect) reads
    // nothing; with the tab secret it does.
    let (code, _, _) = request(port, "GET", "/api/events", &cookie_only);
    assert_eq!(code, 401, "a cookie without its tab secret");
    let cookie = format!("{cookie_only}X-Dfwatch-Tab: {tab}\r\n");
    let live = sse(port, &cookie);

    // The fake face raises an alert: on MQTT, and within a few seconds on the SSE stream.
    wait_until("a new alert on MQTT", SECS(90), || {
        on_topic(&got, "/alerts").iter().any(|a| a["type"] == "new")
    })
    .await;
    let on_mqtt = Instant::now();
    let alert = on_topic(&got, "/alerts")
        .into_iter()
        .find(|a| a["type"] == "new")
        .unwrap();
    let id = alert["alert_id"].as_str().unwrap().to_string();
    wait_until("the new event on the SSE stream", SECS(5), || {
        live.text.lock().unwrap().contains(&id)
    })
    .await;
    let sse_new = live
        .events
        .lock()
        .unwrap()
        .iter()
        .find(|(e, _)| e == "new")
        .map(|(_, t)| *t)
        .expect("an `event: new` line");
    eprintln!(
        "SSE new event {:?} after the MQTT alert (negative: before it)",
        sse_new.saturating_duration_since(on_mqtt)
    );

    // The event through the API, with the session cookie.
    let (code, _, body) = request(port, "GET", "/api/events?stream=cam&verdict=fake", &cookie);
    assert_eq!(code, 200);
    let page: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(page["events"][0]["alert_id"], id.as_str(), "{page}");
    assert_eq!(page["events"][0]["verdict"], "fake");
    let (code, _, body) = request(port, "GET", &format!("/api/events/{id}"), &cookie);
    assert_eq!(code, 200);
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(event["lifecycle"][0]["change"], "new", "{event}");
    assert_eq!(event["lifecycle"][0]["payload"]["alert_id"], id.as_str());
    let sentence = event["lifecycle"][0]["payload"]["explanation"]["sentence"]
        .as_str()
        .unwrap();
    assert!(sentence.len() > 20, "{sentence}");
    // The media: the whole frame with the face box, and the aligned crop.
    wait_until("the snapshot stored", SECS(10), || {
        request(
            port,
            "GET",
            &format!("/api/events/{id}/snapshot.jpg"),
            &cookie,
        )
        .0 == 200
    })
    .await;
    let (_, head, jpeg) = request(
        port,
        "GET",
        &format!("/api/events/{id}/snapshot.jpg"),
        &cookie,
    );
    assert!(
        head.contains("image/jpeg") && head.contains("no-store"),
        "{head}"
    );
    let img = image::load_from_memory(&jpeg).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (480, 270));
    // The box is drawn in red around the face somewhere in the frame.
    let red = img
        .pixels()
        .filter(|p| p[0] > 200 && p[1] < 90 && p[2] < 90)
        .count();
    assert!(red > 100, "{red} red pixels");
    let (code, _, face) = request(port, "GET", &format!("/api/events/{id}/face.jpg"), &cookie);
    assert_eq!(code, 200);
    let face = image::load_from_memory(&face).unwrap();
    assert_eq!(face.width(), face.height());
    // A cookie reads; it never changes anything.
    let (code, _, _) = request(port, "DELETE", &format!("/api/events/{id}"), &cookie);
    assert_eq!(code, 401);
    // A review (bearer) comes out on the stream too.
    let (code, body) = http(
        port,
        "POST",
        &format!("/api/events/{id}/review"),
        Some(TOKEN),
        r#"{"review": "confirmed", "note": "checked against the studio feed"}"#,
    );
    assert_eq!(code, 200, "{body}");
    wait_until("the review on the SSE stream", SECS(5), || {
        live.events
            .lock()
            .unwrap()
            .iter()
            .any(|(e, _)| e == "review")
    })
    .await;
    let (code, body) = http(
        port,
        "POST",
        &format!("/api/events/{id}/review"),
        Some(TOKEN),
        r#"{"review": "maybe"}"#,
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("review"), "{body}");

    // SIGKILL: what was committed is there after the restart.
    daemon.signal("KILL");
    daemon.wait_exit(SECS(10));
    let before = on_topic(&got, "/alerts").len();
    let mut daemon = Daemon::start(&config, tmp.path(), &[]);
    wait_until("/readyz ready again", SECS(60), || {
        http(port, "GET", "/readyz", None, "").0 == 200
    })
    .await;
    let (code, body) = http(port, "GET", &format!("/api/events/{id}"), Some(TOKEN), "");
    assert_eq!(code, 200, "{body}");
    let event: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["review"], "confirmed", "{event}");
    assert_eq!(event["review_note"], "checked against the studio feed");
    assert!(event["has_snapshot"].as_bool().unwrap(), "{event}");
    assert_eq!(
        event["state"], "interrupted",
        "the killed run never ended it: {event}"
    );
    // The export has it, one JSON object per line.
    let (code, body) = http(port, "GET", "/api/events/export", Some(TOKEN), "");
    assert_eq!(code, 200);
    assert!(
        body.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|e| e["alert_id"] == id.as_str() && e["lifecycle"].is_array()),
        "{body}"
    );
    // A fresh alert for the same face after the restart (not the spool's replay of the old
    // one: delivery is at least once), kept too.
    wait_until("a new alert after the restart", SECS(90), || {
        on_topic(&got, "/alerts")[before..]
            .iter()
            .any(|a| a["type"] == "new" && a["alert_id"] != id.as_str())
    })
    .await;
    // Deleting an event takes its media with it.
    let (code, _) = http(
        port,
        "DELETE",
        &format!("/api/events/{id}"),
        Some(TOKEN),
        "",
    );
    assert_eq!(code, 204);
    let (code, _) = http(port, "GET", &format!("/api/events/{id}"), Some(TOKEN), "");
    assert_eq!(code, 404);
    let (code, _, _) = request(
        port,
        "GET",
        &format!("/api/events/{id}/snapshot.jpg"),
        &format!("Authorization: Bearer {TOKEN}\r\n"),
    );
    assert_eq!(code, 404);
    let (code, _) = http(port, "GET", "/api/events/..%2F..%2Fetc", Some(TOKEN), "");
    assert_eq!(code, 404);
    wait_until("the fresh alert written to the store", SECS(10), || {
        let metrics = daemon_support::metrics(port);
        daemon_support::metric(&metrics, "dfwatch_events_written_total").unwrap() >= 1.0
    })
    .await;
    daemon.signal("TERM");
    let (code, _) = daemon.wait_exit(SECS(15));
    assert_eq!(code, Some(0), "{}", daemon.log());
}
