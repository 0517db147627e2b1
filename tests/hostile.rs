//! Hostile callers and files against the built binary and a running daemon, with canary
//! secrets planted in the environment, in files and in query strings. Every case here made
//! an earlier build leak a secret, open a file it was not meant to, crash or hang; each now
//! gets a clear refusal, and no canary appears in the log, `/metrics`, API responses or MQTT
//! messages. Local servers only (127.0.0.1).
#![cfg(feature = "gstreamer")]

mod common;
mod daemon_support;
mod mqtt_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{H264_LIVE, RtspAuth, RtspServer, serve_dir};
use daemon_support::{Daemon, SECS, http, last_error_kind, metric, metrics, stream_report};
use mqtt_support::{Broker, free_port, subscriber, wait_until};

const TOKEN: &str = "hostile-test-token-0123456789";
const CANARY_ENV: &str = "cAnArY-env-7f3a91";
const CANARY_FILE: &str = "cAnArY-file-52be0c";
const CANARY_QUERY: &str = "cAnArY-query-d41e77";
const CANARY_MQTT: &str = "cAnArY-mqtt-9c2d08";
const CANARIES: [&str; 4] = [CANARY_ENV, CANARY_FILE, CANARY_QUERY, CANARY_MQTT];

/// A copy of the tiny fixture bundle, to be damaged later.
fn bundle_copy(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/bundle");
    let out = dir.join("bundle");
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), out.join(e.file_name())).unwrap();
    }
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Replaces the bundle's text embeddings with a safetensors file whose offsets wrap
/// (`base + end` overflowed and the slice panicked: `dfwatch score` exited 101 and a reload
/// killed the daemon), fixing the manifest's checksum so only the layout is wrong.
fn craft_wrapping_safetensors(bundle: &Path) {
    let file = bundle.join("text_embeddings.safetensors");
    let old = sha256_hex(&std::fs::read(&file).unwrap());
    let header = format!(
        r#"{{"text_embeddings":{{"dtype":"F32","shape":[10,64],"data_offsets":[{},{}]}}}}"#,
        usize::MAX - 7,
        usize::MAX
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 64]);
    std::fs::write(&file, &bytes).unwrap();
    let manifest = bundle.join("manifest.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace(&old, &sha256_hex(&bytes))).unwrap();
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// An HTTP request with a raw Authorization header (or none) and a body of any size.
fn request(port: u16, method: &str, path: &str, auth: Option<&str>, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(SECS(10))).unwrap();
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (and close) before the whole body is sent: that is the point.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// A request written out whole: its status, head and body.
fn raw(port: u16, request: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new(), String::new());
    };
    s.set_read_timeout(Some(SECS(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (status, head.to_string(), body.to_string())
}

/// POST /api/streams with the token.
fn add_stream(port: u16, body: &str) -> (u16, String) {
    request(
        port,
        "POST",
        "/api/streams",
        Some(&bearer(TOKEN)),
        body.as_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_callers_and_files_get_clear_refusals_and_no_secret_leaks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut tried = 0usize;
    let mut broker = Broker::new(dir);
    broker.start().await;
    let got = subscriber(broker.port, "hostile-sub");
    // An RTSP camera whose password is the environment canary.
    let auth = RtspAuth {
        user: "viewer".into(),
        password: CANARY_ENV.into(),
    };
    let cam = RtspServer::start(H264_LIVE, "rtph264pay", 0, Some(&auth));
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    std::fs::write(dir.join("cam-pw"), format!("{CANARY_FILE}\n")).unwrap();
    let bundle = bundle_copy(dir);
    let port = free_port();
    let config = dir.join("dfwatch.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[node]
id = "hostile"
shutdown_grace = "4s"

[ingest]
analysis_fps = 2.0
stall_timeout = "3s"
connect_timeout = "5s"
backoff = {{ base = "200ms", cap = "1s" }}

[model]
bundle = "{bundle}"

[onnx]
threads = 1

[mqtt]
url = "mqtt://127.0.0.1:{mqtt}"
spool_dir = "{spool}"
username = "dfwatch"
password_env = "HOSTILE_MQTT_PASSWORD"
backoff = {{ base = "100ms", cap = "500ms", reset_after = "5s" }}

[http]
listen = "127.0.0.1:{port}"
token_file = "token"
api_schemes = ["rtsp", "http"]
api_max_streams = 3
read_auth = "token"

[http.api_credentials.cam]
username = "viewer"
password_env = "HOSTILE_CAM_PASSWORD"

[[streams]]
id = "authcam"
uri = "{cam}"
credentials = {{ username = "viewer", password_env = "HOSTILE_CAM_PASSWORD" }}

[[streams]]
id = "filecam"
uri = "{cam}"
credentials = {{ username = "viewer", password_file = "{cam_pw}" }}

[[streams]]
id = "zerocam"
uri = "{cam}"
credentials = {{ username = "viewer", password_file = "/dev/zero" }}

[[streams]]
id = "querycam"
uri = "rtsp://127.0.0.1:1/x?access_token={CANARY_QUERY}&apikey={CANARY_QUERY}"
"#,
            bundle = bundle.display(),
            mqtt = broker.port,
            spool = dir.join("spool").display(),
            cam = cam.url(),
            cam_pw = dir.join("cam-pw").display(),
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start(
        &config,
        dir,
        &[
            ("HOSTILE_CAM_PASSWORD", CANARY_ENV.to_string()),
            ("HOSTILE_MQTT_PASSWORD", CANARY_MQTT.to_string()),
        ],
    );
    wait_until("/readyz", SECS(60), || {
        http(port, "GET", "/readyz", None, "").0 == 200
    })
    .await;
    let sha_before = http(port, "GET", "/readyz", None, "").1;

    // Credentials from the environment work; the wrong one from a file fails typed; a
    // password "file" that is /dev/zero is refused (it grew the daemon to 2 GB).
    wait_until("authcam online with its env password", SECS(30), || {
        stream_report(port, TOKEN, "authcam").is_some_and(|s| s["status"]["state"] == "online")
    })
    .await;
    wait_until("filecam fails authentication", SECS(30), || {
        last_error_kind(port, TOKEN, "filecam").as_deref() == Some("auth_failed")
    })
    .await;
    wait_until(
        "zerocam refuses /dev/zero as a password file",
        SECS(30),
        || last_error_kind(port, TOKEN, "zerocam").as_deref() == Some("credentials"),
    )
    .await;
    tried += 3;

    // Reads need the token here (read_auth = "token"); `bearer` in any case.
    assert_eq!(http(port, "GET", "/api/streams", None, "").0, 401);
    let (code, _) = request(
        port,
        "GET",
        "/api/alerts",
        Some(&format!("bearer {TOKEN}")),
        b"",
    );
    assert_eq!(code, 200);
    tried += 2;

    // API callers cannot name files or environment variables for credentials.
    for (body, why) in [
        (
            format!(
                r#"{{"id":"steal1","uri":"{}","credentials":{{"password_file":"/etc/hostname"}}}}"#,
                cam.url()
            ),
            "files and environment variables cannot be named",
        ),
        (
            format!(
                r#"{{"id":"steal2","uri":"{}","credentials":{{"password_env":"HOSTILE_MQTT_PASSWORD"}}}}"#,
                cam.url()
            ),
            "files and environment variables cannot be named",
        ),
        (
            format!(
                r#"{{"id":"steal3","uri":"{}","credentials":"nope"}}"#,
                cam.url()
            ),
            "no set",
        ),
        (
            r#"{"id":"local","uri":"file:///etc/hostname"}"#.to_string(),
            "not allowed through the API",
        ),
    ] {
        let (code, resp) = add_stream(port, &body);
        assert_eq!(code, 400, "{body} -> {resp}");
        assert!(resp.contains(why), "{body} -> {resp}");
        tried += 1;
    }
    // A named set works.
    let body = format!(
        r#"{{"id":"apicam","uri":"{}","credentials":"cam"}}"#,
        cam.url()
    );
    let (code, resp) = request(
        port,
        "POST",
        "/api/streams",
        Some(&format!("BEARER {TOKEN}")),
        body.as_bytes(),
    );
    assert_eq!(code, 201, "{resp}");
    wait_until("apicam online with the operator's set", SECS(30), || {
        stream_report(port, TOKEN, "apicam").is_some_and(|s| s["status"]["state"] == "online")
    })
    .await;

    // Query values are masked whatever their key; the last error shows its kind only.
    let body = format!(
        r#"{{"id":"apiquery","uri":"rtsp://127.0.0.1:1/y?access_token={q}&X-Amz-Signature={q}"}}"#,
        q = CANARY_QUERY
    );
    let (code, resp) = add_stream(port, &body);
    assert_eq!(code, 201, "{resp}");
    wait_until("apiquery fails", SECS(30), || {
        last_error_kind(port, TOKEN, "apiquery").is_some()
    })
    .await;
    let report = stream_report(port, TOKEN, "apiquery").unwrap();
    let e = &report["status"]["last_error"];
    assert_eq!(e["message"], e["kind"], "{report}");
    assert!(
        report["uri"]
            .as_str()
            .unwrap()
            .ends_with("?access_token=***&X-Amz-Signature=***"),
        "{report}"
    );
    tried += 2;

    // An HLS playlist listing a local FIFO: the segment source is refused before it opens.
    let hls = tempfile::tempdir().unwrap();
    let fifo = hls.path().join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    std::fs::write(
        hls.path().join("evil.m3u8"),
        format!(
            "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\nfile://{}\n#EXT-X-ENDLIST\n",
            fifo.display()
        ),
    )
    .unwrap();
    let hls_port = serve_dir(hls.path().to_path_buf());
    let body = format!(r#"{{"id":"evilhls","uri":"http://127.0.0.1:{hls_port}/evil.m3u8"}}"#);
    let (code, resp) = add_stream(port, &body);
    assert_eq!(code, 201, "{resp}");
    wait_until("evilhls refused its file:// segment", SECS(30), || {
        last_error_kind(port, TOKEN, "evilhls").as_deref() == Some("source_not_allowed")
    })
    .await;
    {
        use std::os::unix::fs::OpenOptionsExt;
        let reader = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&fifo);
        assert!(reader.is_err(), "someone holds the FIFO open for reading");
    }
    tried += 1;

    let mut api_bodies = vec![
        http(port, "GET", "/api/streams", Some(TOKEN), "").1,
        http(port, "GET", "/api/alerts", Some(TOKEN), "").1,
    ];

    // The API's stream cap (3 here).
    let body = format!(r#"{{"id":"onetoomany","uri":"{}"}}"#, cam.url());
    let (code, resp) = add_stream(port, &body);
    assert_eq!(code, 403, "{resp}");
    assert!(resp.contains("api_max_streams"), "{resp}");
    tried += 1;

    // Bodies: capped at 64 KiB; without the token nothing of the body is read.
    let big = vec![b' '; 200 * 1024];
    assert_eq!(request(port, "POST", "/api/streams", None, &big).0, 401);
    assert_eq!(
        request(port, "POST", "/api/streams", Some(&bearer(TOKEN)), &big).0,
        413
    );
    tried += 2;

    // A bundle whose safetensors offsets wrap: `score` says so (it used to exit 101) ...
    let crafted = dir.join("crafted");
    std::fs::create_dir_all(&crafted).unwrap();
    for e in std::fs::read_dir(&bundle).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), crafted.join(e.file_name())).unwrap();
    }
    craft_wrapping_safetensors(&crafted);
    let crop = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/crop0.png");
    let out = Command::new(env!("CARGO_BIN_EXE_dfwatch"))
        .args(["score", "--model"])
        .arg(&crafted)
        .arg(&crop)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("outside the data") && !err.contains("panicked"),
        "{err}"
    );
    // ... and a reload onto it (it used to kill the daemon) is refused, changing nothing.
    craft_wrapping_safetensors(&bundle);
    let (code, resp) = request(port, "POST", "/api/reload", Some(&bearer(TOKEN)), b"");
    assert_eq!(code, 400, "{resp}");
    assert!(resp.contains("outside the data"), "{resp}");
    assert_eq!(http(port, "GET", "/livez", None, "").0, 200);
    let sha_after = http(port, "GET", "/readyz", None, "").1;
    let sha = |b: &str| {
        serde_json::from_str::<serde_json::Value>(b).unwrap()["model"]["manifest_sha256"].clone()
    };
    assert_eq!(sha(&sha_before), sha(&sha_after));
    tried += 2;

    // The events API: every query parameter is checked and named; ids that are not alert ids
    // (paths, say) find nothing; a forged session cookie reads nothing.
    let auth = bearer(TOKEN);
    for (path, says) in [
        ("/api/events?limit=100000", "limit"),
        ("/api/events?limit=0", "limit"),
        ("/api/events?cursor=..%2F..%2Fetc", "cursor"),
        ("/api/events?since=yesterday", "since"),
        ("/api/events?until=2026-13-45T99:00:00Z", "until"),
        ("/api/events?verdict=maybe", "verdict"),
        ("/api/events?stream=a%2Fb", "stream"),
        ("/api/events?color=red", "color"),
        ("/api/alerts?limit=1000000", "limit"),
        ("/api/events/export?since=%00", "since"),
    ] {
        let (code, resp) = request(port, "GET", path, Some(&auth), b"");
        assert_eq!(code, 400, "{path}: {resp}");
        assert!(resp.contains(says), "{path}: {resp}");
    }
    for path in [
        "/api/events/..%2F..%2Fetc%2Fpasswd",
        "/api/events/01JDF0A7Z3K9Q8R6T5V4W3X2Y1",
        "/api/events/01JDF0A7Z3K9Q8R6T5V4W3X2Y1/snapshot.jpg",
        "/api/events/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA/face.jpg",
    ] {
        assert_eq!(
            request(port, "GET", path, Some(&auth), b"").0,
            404,
            "{path}"
        );
    }
    for (body, says) in [
        (b"not json".as_slice(), "body"),
        (
            br#"{"review": "confirmed", "extra": 1}"#.as_slice(),
            "extra",
        ),
        (br#"{"review": ["confirmed"]}"#.as_slice(), "review"),
        // One JSON object and nothing after it.
        (
            br#"{"review": "confirmed"} {"review": "false_alarm"}"#.as_slice(),
            "trailing",
        ),
        (br#"{"review": "confirmed"}garbage"#.as_slice(), "trailing"),
    ] {
        let (code, resp) = request(
            port,
            "POST",
            "/api/events/01JDF0A7Z3K9Q8R6T5V4W3X2Y1/review",
            Some(&auth),
            body,
        );
        assert_eq!(code, 400, "{resp}");
        assert!(resp.contains(says), "{resp}");
    }
    let long_note = format!(
        r#"{{"review": "confirmed", "note": "{}"}}"#,
        "n".repeat(1001)
    );
    let (code, resp) = request(
        port,
        "POST",
        "/api/events/01JDF0A7Z3K9Q8R6T5V4W3X2Y1/review",
        Some(&auth),
        long_note.as_bytes(),
    );
    assert_eq!(code, 400, "{resp}");
    // Reads only with a live session: a made-up cookie is no session (a GET without a token
    // answers 401 here, read_auth = "token").
    {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(SECS(10))).unwrap();
        let req = format!(
            "GET /api/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\nCookie: dfwatch_session_{port}={}\r\nX-Dfwatch-Tab: {}\r\n\r\n",
            "0".repeat(64),
            "1".repeat(64)
        );
        std::io::Write::write_all(&mut s, req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut out);
        assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    }
    api_bodies.push(request(port, "GET", "/api/events", Some(&auth), b"").1);
    tried += 22;

    // Long answers are bounded per client: a fifth live subscriber from one address ends the
    // oldest (its page would reconnect), and a second export from one address is refused.
    {
        use std::io::{Read, Write};
        let open = |path: &str| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(SECS(10))).unwrap();
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
            )
            .unwrap();
            let mut head = [0u8; 12];
            s.read_exact(&mut head).unwrap();
            (s, String::from_utf8_lossy(&head).into_owned())
        };
        let mut subscribers: Vec<_> = (0..5).map(|_| open("/api/events/stream")).collect();
        for (_, head) in &subscribers {
            assert!(head.ends_with("200"), "{head}");
        }
        // The oldest was ended: its stream closes (after whatever it had been sent).
        let (first, _) = &mut subscribers[0];
        let mut rest = Vec::new();
        let closed = first.read_to_end(&mut rest).is_ok();
        assert!(closed, "the oldest subscriber of the client was not ended");
        let text = metrics(port);
        assert!(
            metric(&text, "dfwatch_events_subscribers_evicted_total").unwrap() >= 1.0,
            "{text}"
        );
        drop(subscribers);
    }
    tried += 1;

    // Nobody locks the operator out by sending nothing: header-less writes (any local
    // process) and another site's fetches from the operator's browser are refused without
    // counting as guesses, the latter before the token is looked at; the token still works.
    let failures = |port| metric(&metrics(port), "dfwatch_api_auth_failures_total").unwrap_or(0.0);
    let before = failures(port);
    for _ in 0..10 {
        assert_eq!(request(port, "POST", "/api/reload", None, b"").0, 401);
    }
    for (site, origin, token) in [
        (
            "Sec-Fetch-Site: cross-site\r\n",
            "Origin: http://evil.example\r\n",
            "",
        ),
        ("Sec-Fetch-Site: same-site\r\n", "", ""),
        ("", "Origin: http://127.0.0.1:1\r\n", ""),
        ("", "Origin: null\r\n", ""),
        // Even with the right token (a page cannot send one cross-site, but order matters).
        (
            "Sec-Fetch-Site: cross-site\r\n",
            "",
            "Authorization: Bearer wrong\r\n",
        ),
    ] {
        for path in [
            "/api/reload",
            "/api/session",
            "/api/events/01JDF0A7Z3K9Q8R6T5V4W3X2Y1/review",
        ] {
            let (code, head, body) = raw(
                port,
                &format!(
                    "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{site}{origin}{token}\
                     Content-Type: text/plain\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
                ),
            );
            assert_eq!(code, 403, "{site}{origin}: {head}{body}");
            assert!(body.contains("cross_site"), "{body}");
        }
    }
    assert_eq!(failures(port), before, "no refusal above was a guess");
    // The page's own requests (same origin) still work, and so does the token.
    let (code, head, body) = raw(
        port,
        &format!(
            "POST /api/session HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nSec-Fetch-Site: same-origin\r\n\
             Origin: http://127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\
             Content-Length: 0\r\n\r\n"
        ),
    );
    assert_eq!(code, 200, "{head}{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-content-type-options: nosniff"),
        "{head}"
    );
    // The session reads, HEAD included (the cookie with its tab secret).
    let session: serde_json::Value = serde_json::from_str(&body).unwrap();
    let cookie = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie:")
                .then(|| l[11..].trim().to_string())
        })
        .and_then(|c| c.split(';').next().map(str::to_string))
        .expect("a session cookie");
    let tab = session["tab"].as_str().unwrap();
    for method in ["GET", "HEAD"] {
        let (code, head, _) = raw(
            port,
            &format!(
                "{method} /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nCookie: {cookie}\r\n\
                 X-Dfwatch-Tab: {tab}\r\nConnection: close\r\n\r\n"
            ),
        );
        assert_eq!(code, 200, "{method}: {head}");
    }
    tried += 19;

    // A client that keeps failing the token is throttled (last: this address is then
    // refused for a minute).
    for _ in 0..5 {
        assert_eq!(
            request(
                port,
                "POST",
                "/api/reload",
                Some("Bearer wrong-token-0000000000"),
                b""
            )
            .0,
            401
        );
    }
    let (code, _) = request(port, "POST", "/api/reload", Some(&bearer(TOKEN)), b"");
    assert_eq!(code, 429);
    let text = metrics(port);
    assert!(
        metric(&text, "dfwatch_api_auth_failures_total").unwrap() >= 5.0,
        "{text}"
    );
    assert!(metric(&text, "dfwatch_api_throttled_total").unwrap() >= 1.0);
    tried += 1;

    // Every change left an audit line with the caller's address.
    let log = daemon.log();
    assert!(
        log.lines().any(|l| l.contains("API change.")
            && l.contains("127.0.0.1")
            && l.contains("add_stream")),
        "no audit line"
    );

    // No canary anywhere: log, metrics, API responses, MQTT messages.
    daemon.signal("TERM");
    let (code, _) = daemon.wait_exit(SECS(20));
    assert_eq!(code, Some(0));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut leaks = Vec::new();
    api_bodies.extend([resp, text, sha_after]);
    let mqtt: Vec<String> = got
        .lock()
        .unwrap()
        .iter()
        .map(|(t, p)| format!("{t} {p}"))
        .collect();
    assert!(!mqtt.is_empty(), "no MQTT message seen");
    for (place, texts) in [
        ("log", vec![daemon.log()]),
        ("api", api_bodies),
        ("mqtt", mqtt),
    ] {
        for t in texts {
            for c in CANARIES {
                if t.contains(c) {
                    leaks.push(format!("{place}: {c}"));
                }
            }
        }
    }
    let panics = usize::from(daemon.log().contains("panicked"));
    println!(
        "hostile inputs tried: {tried}, panics: {panics}, leaks: {}",
        leaks.len()
    );
    assert!(leaks.is_empty(), "{leaks:?}");
    assert_eq!(panics, 0);
    drop(cam);
}
