//! A real browser for page tests: Debian's chromium, headless, driven through chromedriver's
//! WebDriver (installed by `tools/setup.sh --dev`), shared by the page test and the quick
//! start's test of the shipped config.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::daemon_support::SECS;
use crate::mqtt_support::free_port;

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
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
}

impl Browser {
    pub fn start(profile: &std::path::Path) -> Browser {
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

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        wd(
            self.port,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        )
    }

    pub fn go(&self, url: &str) {
        self.call("POST", "/url", Some(json!({"url": url})));
    }

    pub fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    pub fn find(&self, css: &str) -> String {
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
    pub fn click(&self, css: &str) {
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

    pub fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        );
    }

    pub fn key(&self, key: &str) {
        self.call(
            "POST",
            "/actions",
            Some(
                json!({"actions": [{"type": "key", "id": "keyboard", "actions": [
                {"type": "keyDown", "value": key}, {"type": "keyUp", "value": key}]}]}),
            ),
        );
    }

    pub fn size(&self, width: u32, height: u32) {
        self.call(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        );
    }

    pub fn screenshot(&self, to: &std::path::Path) {
        let b64 = self.call("GET", "/screenshot", None);
        let png = base64_decode(b64.as_str().expect("base64 PNG"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(to, png).unwrap();
    }

    /// Polls `script` (an expression) until it is true.
    pub async fn until(&self, what: &str, timeout: Duration, script: &str) {
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
