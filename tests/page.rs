//! The web page in a real browser: Debian's chromium, headless, driven through chromedriver's
//! WebDriver (installed by `tools/setup.sh --dev`). The daemon runs a fake-shifted synthetic
//! bundle on a looping face clip, its reads behind the token (as on a non-loopback listener),
//! and an event store seeded with older events so there is history to page through.
//!
//! Screenshots at desktop and phone widths go to `$CARGO_TARGET_TMPDIR/page/`.
#![cfg(feature = "gstreamer")]

mod daemon_support;
mod mqtt_support;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use daemon_support::{Daemon, SECS, TOKEN, bundle, face_clip, http, media_stream_config, on_topic};
use mqtt_support::{Broker, free_port, subscriber, wait_until};
use serde_json::{Value, json};

/// One WebDriver call; the answer's `value` (a WebDriver error fails the test, naming it).
fn wd(port: u16, method: &str, path: &str, body: Option<Value>) -> Value {
    wd_result(port, method, path, body).unwrap_or_else(|e| panic!("{e}"))
}

/// One WebDriver call; a WebDriver error comes back as `Err("<method> <path>: <error>: ...")`.
fn wd_result(port: u16, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("chromedriver");
    s.set_read_timeout(Some(SECS(60))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    // chromedriver keeps connections open: read the head, then Content-Length bytes.
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    let (head_end, len) = loop {
        let n = s.read(&mut buf).unwrap_or(0);
        assert!(n > 0, "WebDriver {method} {path}: connection closed");
        out.extend_from_slice(&buf[..n]);
        if let Some(i) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..i]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .expect("a Content-Length");
            break (i + 4, len);
        }
    };
    while out.len() < head_end + len {
        let n = s.read(&mut buf).unwrap_or(0);
        assert!(n > 0, "WebDriver {method} {path}: body cut short");
        out.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&out);
    let json = String::from_utf8_lossy(&out[head_end..head_end + len]);
    let v: Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}: {text}"));
    if let Some(err) = v["value"]["error"].as_str() {
        return Err(format!(
            "WebDriver {method} {path}: {err}: {}",
            v["value"]["message"]
        ));
    }
    Ok(v["value"].clone())
}

/// chromedriver on a free port, and one headless chromium session.
struct Browser {
    driver: Child,
    port: u16,
    session: String,
}

impl Browser {
    fn start(profile: &std::path::Path) -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (run ./tools/setup.sh --dev: Debian's chromium-driver)");
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < SECS(20), "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900",
                         format!("--user-data-dir={}", profile.display())],
            }
        }}});
        let v = wd(port, "POST", "/session", Some(caps));
        let session = v["sessionId"].as_str().expect("a session id").to_string();
        Browser {
            driver,
            port,
            session,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        wd(
            self.port,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        )
    }

    fn go(&self, url: &str) {
        self.call("POST", "/url", Some(json!({"url": url})));
    }

    fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    fn find(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .expect("an element reference")
            .to_string()
    }

    /// Clicks the element `css` names. Live updates replace cards in place, so an element
    /// found a moment ago may be gone: it is found again then.
    fn click(&self, css: &str) {
        for _ in 0..10 {
            let e = self.find(css);
            match wd_result(
                self.port,
                "POST",
                &format!("/session/{}/element/{e}/click", self.session),
                Some(json!({})),
            ) {
                Ok(_) => return,
                Err(why) if why.contains("stale element") => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(why) => panic!("{why}"),
            }
        }
        panic!("{css} kept going stale");
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        );
    }

    fn key(&self, key: &str) {
        self.call(
            "POST",
            "/actions",
            Some(
                json!({"actions": [{"type": "key", "id": "keyboard", "actions": [
                {"type": "keyDown", "value": key}, {"type": "keyUp", "value": key}]}]}),
            ),
        );
    }

    fn size(&self, width: u32, height: u32) {
        self.call(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        );
    }

    fn screenshot(&self, to: &std::path::Path) {
        let b64 = self.call("GET", "/screenshot", None);
        let png = base64_decode(b64.as_str().expect("base64 PNG"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(to, png).unwrap();
    }

    /// Polls `script` (an expression) until it is true.
    async fn until(&self, what: &str, timeout: Duration, script: &str) {
        let t0 = Instant::now();
        loop {
            if self.js(&format!("return !!({script});")) == json!(true) {
                return;
            }
            assert!(
                t0.elapsed() < timeout,
                "the page did not show {what} within {timeout:?}; page text:\n{}",
                self.js("return document.body.innerText;")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| self.call("DELETE", "", None));
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter_map(val) {
        acc = (acc << 6) | c;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Older events, ended, in the store before the daemon starts (ids older than any new one).
fn seed_history(state: &std::path::Path, n: u32) -> Vec<String> {
    use dfwatch::events::db::{Change, Db, Limits, Record};
    let limits = Limits {
        max_age: SECS(30 * 24 * 3600),
        max_events: 1000,
        max_media_bytes: 1 << 30,
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
