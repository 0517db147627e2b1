//! The web page in a real browser: Debian's chromium, headless, driven through chromedriver's
//! WebDriver (installed by `tools/setup.sh --dev`). The daemon runs a fake-shifted synthetic
//! bundle on a looping face clip, its reads behind the token (as on a non-loopback listener),
//! and an event store seeded with older events so there is history to page through.
//!
//! Screenshots at desktop and phone widths go to `$CARGO_TARGET_TMPDIR/page/`.
#![cfg(feature = "gstreamer")]

mod browser_support;
mod daemon_support;
mod mqtt_support;

use std::time::{Duration, Instant, SystemTime};

use browser_support::Browser;

use daemon_support::{Daemon, SECS, TOKEN, bundle, face_clip, http, media_stream_config, on_topic};
use mqtt_support::{Broker, free_port, subscriber, wait_until};
use serde_json::{Value, json};

/// Older events, ended, in the store before the daemon starts (ids older than any new one).
fn seed_history(state: &std::path::Path, n: u32) -> Vec<String> {
    use dfwatch::events::db::{Change, Db, Facts, Limits, Record};
    let limits = Limits {
        max_age: SECS(30 * 24 * 3600),
        max_events: 1000,
        max_media_bytes: 1 << 30,
        ..Limits::default()
    };
    let (mut db, _) = Db::open(&state.join("events.db"), limits).unwrap();
    let at = SystemTime::now() - SECS(3600);
    (0..n)
        .map(|i| {
            let id = format!("01AAAAAAAAAAAAAAAAAAAAA{i:03}");
            for (change, kind) in [(Change::New, "new"), (Change::End, "end")] {
                let payload = json!({
                    "alert_id": id, "type": kind, "verdict": "fake", "score": 0.9,
                    "end_reason": if kind == "end" { Some("track_lost") } else { None },
                    "explanation": {
                        "sentence": format!("Seeded event {i}: the face looks swapped."),
                        "attributes": [{"name": "face swap", "q": 0.8}],
                        "regions": [{"name": "mouth", "q": 0.6}],
                    },
                });
                db.record(&Record {
                    alert_id: &id,
                    change,
                    stream: "archive",
                    track: u64::from(i),
                    at,
                    payload: payload.to_string().as_bytes(),
                    facts: &Facts {
                        verdict: "fake",
                        score: 0.9,
                        sentence: format!("Seeded event {i}: the face looks swapped."),
                        end_reason: (kind == "end").then_some("track_lost"),
                    },
                })
                .unwrap();
            }
            id
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_streams_and_live_alerts_pages_back_and_takes_a_review() {
    let tmp = tempfile::tempdir().unwrap();
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("page");
    std::fs::create_dir_all(&shots).unwrap();
    let clip = face_clip(tmp.path(), 10);
    let model = bundle(tmp.path(), 8.0);
    let mut broker = Broker::new(tmp.path());
    broker.start().await;
    let got = subscriber(broker.port, "page-e2e");
    let port = free_port();
    let config = media_stream_config(tmp.path(), port, &broker.url(), &model, &clip);
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let seeded = seed_history(&state, 12);
    let mut daemon = Daemon::start(&config, tmp.path(), &[]);
    wait_until("/readyz ready", SECS(60), || {
        http(port, "GET", "/readyz", None, "").0 == 200
    })
    .await;
    // Nothing the page loads comes from elsewhere.
    for path in ["/", "/page.js", "/page.css"] {
        let (code, body) = http(port, "GET", path, None, "");
        assert_eq!(code, 200, "{path}");
        assert!(
            !body.contains("http://") && !body.contains("https://") && !body.contains("//cdn"),
            "{path} names another origin"
        );
    }

    let browser = Browser::start(&tmp.path().join("chromium-profile"));
    let base = format!("http://127.0.0.1:{port}/");
    browser.go(&base);
    // Reads need the token here: the page says so, and the synthetic model's banner shows.
    browser
        .until(
            "the sign-in request",
            SECS(10),
            "document.getElementById('signin-msg').classList.contains('error')",
        )
        .await;
    browser
        .until(
            "the synthetic-model banner",
            SECS(10),
            "!document.getElementById('synthetic').hidden",
        )
        .await;
    // A page left unsigned for a while keeps its address usable: reads without a token are
    // not counted as failed guesses, and the page stops asking until it is signed in.
    tokio::time::sleep(SECS(7)).await;
    browser.type_into("#token", TOKEN);
    browser.click("#signin-form button[type=submit]");
    browser
        .until(
            "the stream cam",
            SECS(15),
            "document.querySelector('#streams li[data-stream=\"cam\"]')",
        )
        .await;
    browser
        .until(
            "the live connection",
            SECS(15),
            "document.getElementById('conn').classList.contains('live')",
        )
        .await;
    // The first page of history: ten events, and a way back.
    browser
        .until(
            "the first page of events",
            SECS(10),
            "document.querySelectorAll('#events article').length >= 10",
        )
        .await;

    // The fake face raises an alert: on the page within a few seconds of MQTT.
    wait_until("a new alert on MQTT", SECS(90), || {
        on_topic(&got, "/alerts").iter().any(|a| a["type"] == "new")
    })
    .await;
    let on_mqtt = Instant::now();
    let id = on_topic(&got, "/alerts")
        .into_iter()
        .find(|a| a["type"] == "new")
        .unwrap()["alert_id"]
        .as_str()
        .unwrap()
        .to_string();
    let card = format!("#ev-{id}");
    browser
        .until(
            "the live alert",
            SECS(5),
            &format!("document.querySelector('{card}')"),
        )
        .await;
    eprintln!("live alert on the page {:?} after MQTT", on_mqtt.elapsed());
    let first = browser.js("return document.querySelector('#events article').id;");
    assert_eq!(
        first,
        json!(format!("ev-{id}")),
        "the newest event comes first"
    );
    browser
        .until(
            "the alert's explanation bars",
            SECS(10),
            &format!("document.querySelectorAll('{card} .bar').length > 0"),
        )
        .await;
    // A bar's fill is as wide as its value.
    let widths = browser.js(&format!(
        "const b = document.querySelector('{card} .bar'); \
         return [b.querySelector('.fill').getBoundingClientRect().width, \
                 b.querySelector('.track').getBoundingClientRect().width, \
                 b.querySelector('.pct').textContent];"
    ));
    let (fill, track) = (widths[0].as_f64().unwrap(), widths[1].as_f64().unwrap());
    let shown: f64 = widths[2]
        .as_str()
        .unwrap()
        .trim_end_matches('%')
        .parse()
        .unwrap();
    assert!(
        (fill / track * 100.0 - shown).abs() < 2.0,
        "a bar of {shown}% is {fill} of {track} px"
    );
    browser
        .until(
            "the alert's snapshot",
            SECS(15),
            &format!("(() => {{ const i = document.querySelector('{card} .media img'); return i && i.complete && i.naturalWidth > 0; }})()"),
        )
        .await;

    // Paging back reaches the oldest seeded event.
    browser.click("#older");
    browser
        .until(
            "every seeded event after paging back",
            SECS(10),
            &format!("document.querySelector('#ev-{}')", seeded[0]),
        )
        .await;
    assert_eq!(
        browser.js("return document.getElementById('older').hidden;"),
        json!(true),
        "no older page is left"
    );

    // Marking the live alert a false alarm: the store has it, the page shows it pressed.
    browser.click(&format!("{card} .review-false_alarm"));
    browser
        .until(
            "the review pressed",
            SECS(10),
            &format!("document.querySelector('{card} .review-false_alarm').getAttribute('aria-pressed') === 'true'"),
        )
        .await;
    let (code, body) = http(port, "GET", &format!("/api/events/{id}"), Some(TOKEN), "");
    assert_eq!(code, 200);
    let event: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["review"], "false_alarm", "{event}");

    // The keyboard reaches every control, with a visible focus ring.
    browser.js("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0);");
    let controls = browser
        .js("return document.querySelectorAll('button:not([hidden]), input').length;")
        .as_u64()
        .unwrap();
    let mut reached = std::collections::BTreeSet::new();
    let mut ringed = true;
    for _ in 0..controls + 3 {
        browser.key("\u{E004}");
        let v = browser.js(
            "const a = document.activeElement; if (!a || a === document.body) return null; \
             const all = [...document.querySelectorAll('button:not([hidden]), input')]; \
             return [all.indexOf(a), getComputedStyle(a).outlineStyle];",
        );
        if let Some(pair) = v.as_array()
            && let Some(index) = pair[0].as_i64().filter(|i| *i >= 0)
        {
            reached.insert(index);
            ringed &= pair[1] != "none";
        }
    }
    assert_eq!(
        reached.len() as u64,
        controls,
        "Tab reached {reached:?} of {controls} controls"
    );
    assert!(ringed, "a focused control showed no outline");

    let top = "document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0);";
    browser.size(1280, 900);
    browser.js(top);
    browser.screenshot(&shots.join("desktop.png"));
    // Phone width: no horizontal scroll.
    browser.size(375, 812);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (inner, scroll, client) = {
        let v = browser.js(
            "return [window.innerWidth, document.documentElement.scrollWidth, \
             document.documentElement.clientWidth];",
        );
        (
            v[0].as_u64().unwrap(),
            v[1].as_u64().unwrap(),
            v[2].as_u64().unwrap(),
        )
    };
    assert!(inner <= 400, "the window is {inner} px wide");
    assert!(
        scroll <= client,
        "horizontal scroll at {inner} px: content {scroll} px in {client} px"
    );
    browser.js(top);
    browser.screenshot(&shots.join("phone.png"));

    // The daemon goes away: the page says so.
    daemon.signal("TERM");
    let (code, _) = daemon.wait_exit(SECS(15));
    assert_eq!(code, Some(0), "{}", daemon.log());
    browser
        .until(
            "the lost connection",
            SECS(10),
            "!document.getElementById('conn').classList.contains('live')",
        )
        .await;
    eprintln!("screenshots in {}", shots.display());
}
