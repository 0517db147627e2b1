//! Garbage on the wire: cameras, playlists and brokers that answer with nonsense, stop in the
//! middle of a message, trickle or say nothing, and HTTP clients that flood the listener or
//! send a byte a second. Each costs a typed error, a retry or a bounded slot; the daemon keeps
//! serving the other streams, answers its health probes and loses no alert. Local servers
//! only (127.0.0.1).
#![cfg(feature = "gstreamer")]

mod common;
mod daemon_support;
mod mqtt_support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::RtspServer;
use daemon_support::{
    Daemon, SECS, TOKEN, bundle, face_clip, http, metric, metrics, on_topic, stream_report,
    write_config_with,
};
use mqtt_support::{Broker, free_port, subscriber, wait_until};

/// A TCP server on 127.0.0.1 that hands each connection, numbered from 0, to `answer` on a
/// thread of its own. Returns the port.
fn tcp_server(answer: impl Fn(usize, TcpStream) + Send + Sync + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for (i, conn) in listener.incoming().enumerate() {
            let Ok(conn) = conn else { continue };
            let answer = answer.clone();
            std::thread::spawn(move || answer(i, conn));
        }
    });
    port
}

/// Reads what the client sent first (a request, a CONNECT), up to a pause.
fn read_some(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    buf.truncate(n);
    buf
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(n as u64);
    (0..n).map(|_| rng.u8(..)).collect()
}

/// Copies bytes one way until either side closes.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// A broker in front of `upstream` whose first five connections misbehave, each its own way;
/// later ones are passed through. Returns the port.
fn hostile_broker(upstream: u16) -> u16 {
    tcp_server(move |i, mut s| {
        if i >= 5 {
            let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                return;
            };
            let (s2, up2) = (s.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || pipe(s2, up2));
            pipe(up, s);
            return;
        }
        let _connect = read_some(&mut s);
        match i {
            // Noise instead of a CONNACK.
            0 => {
                let _ = s.write_all(&random_bytes(300));
            }
            // A CONNACK cut off in the middle.
            1 => {
                let _ = s.write_all(&[0x20, 0x02, 0x00]);
            }
            // A remaining length whose varint never ends (five continuation bytes).
            2 => {
                let _ = s.write_all(&[0x20, 0xff, 0xff, 0xff, 0xff, 0x7f]);
                std::thread::sleep(SECS(2));
            }
            // A good CONNACK, then a PUBLISH that claims 256 MiB: whatever the client sent
            // meanwhile is never acknowledged and must be sent again.
            3 => {
                let _ = s.write_all(&[0x20, 0x02, 0x00, 0x00]);
                std::thread::sleep(Duration::from_millis(300));
                let _ = s.write_all(&[0x30, 0xff, 0xff, 0xff, 0x7f]);
                let _ = s.write_all(&random_bytes(100));
                std::thread::sleep(SECS(2));
            }
            // Silence for longer than the test waits for the alert: only the client's own
            // connect timeout gets it past this one.
            _ => std::thread::sleep(SECS(120)),
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_sources_and_brokers_costs_retries_not_alerts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut broker = Broker::new(dir);
    broker.start().await;
    let got = subscriber(broker.port, "wire-sub");
    let mqtt_port = hostile_broker(broker.port);

    // The good camera: a fake face.
    let clip = face_clip(dir, 40);
    let cam = RtspServer::start(
        &format!(
            "filesrc location={} ! qtdemux ! h264parse config-interval=-1",
            clip.display()
        ),
        "rtph264pay",
        0,
        None,
    );
    // An RTSP "camera" that answers noise.
    let rtsp_noise = tcp_server(|_, mut s| {
        read_some(&mut s);
        let _ = s.write_all(&random_bytes(700));
    });
    // One that starts a good answer and hangs up in the middle of it.
    let rtsp_cut = tcp_server(|_, mut s| {
        read_some(&mut s);
        let _ = s.write_all(b"RTSP/1.0 200 OK\r\nCSeq: 1\r\nContent-Length: 4096\r\n\r\npart");
    });
    // An HLS server with a good playlist whose segment is noise.
    let hls = tcp_server(|_, mut s| {
        let req = String::from_utf8_lossy(&read_some(&mut s)).into_owned();
        let (kind, body) = if req.contains(".m3u8") {
            (
                "application/vnd.apple.mpegurl",
                b"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n\
                  #EXTINF:2.0,\nseg0.ts\n#EXTINF:2.0,\nseg1.ts\n"
                    .to_vec(),
            )
        } else {
            ("video/mp2t", random_bytes(188 * 64))
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(&body);
    });
    // An HTTP server that sends its status line a byte a second, forever.
    let trickle = tcp_server(|_, mut s| {
        read_some(&mut s);
        for b in b"HTTP/1.1 200 OK\r\nContent-Type: video/mp2t\r\n"
            .iter()
            .cycle()
        {
            if s.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(SECS(1));
        }
    });

    let streams = format!(
        "[[streams]]\nid = \"cam\"\nuri = \"{cam}\"\n\n\
         [[streams]]\nid = \"rtsp-noise\"\nuri = \"rtsp://127.0.0.1:{rtsp_noise}/live\"\n\n\
         [[streams]]\nid = \"rtsp-cut\"\nuri = \"rtsp://127.0.0.1:{rtsp_cut}/live\"\n\n\
         [[streams]]\nid = \"hls-noise\"\nuri = \"http://127.0.0.1:{hls}/live.m3u8\"\n\n\
         [[streams]]\nid = \"http-trickle\"\nuri = \"http://127.0.0.1:{trickle}/live.ts\"\n",
        cam = cam.url(),
    );
    let model = bundle(dir, 8.0);
    let port = free_port();
    let cadence = "[track]\nscore_every = \"300ms\"\n\n[evidence]\nwindow = \"3s\"\n\
                   min_frames = 3\nmin_duration = \"600ms\"\n";
    let config = write_config_with(
        dir,
        port,
        &format!("mqtt://127.0.0.1:{mqtt_port}"),
        &model,
        &streams,
        cadence,
    );
    // A shorter connect timeout than the default 10 s, so the trickle is cut within the test.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "analysis_fps = 5.0",
        "analysis_fps = 5.0\nconnect_timeout = \"4s\"",
    );
    std::fs::write(&config, text).unwrap();
    let daemon = Daemon::start(&config, dir, &[]);

    // Every bad source ends in a typed error and keeps being retried; none of them is
    // "online", and the daemon answers its probes throughout.
    let typed = [
        "refused",
        "not_found",
        "unsupported_codec",
        "decode_error",
        "network",
        "connect_timeout",
        "stalled",
        "end_of_stream",
        "pipeline",
    ];
    for id in ["rtsp-noise", "rtsp-cut", "hls-noise", "http-trickle"] {
        wait_until(&format!("{id}: a typed error"), SECS(60), || {
            stream_report(port, TOKEN, id).is_some_and(|r| {
                r["status"]["state"] != "online"
                    && r["status"]["last_error"]["kind"]
                        .as_str()
                        .is_some_and(|k| typed.contains(&k))
            })
        })
        .await;
        assert_eq!(http(port, "GET", "/livez", None, "").0, 200);
    }
    // The good camera raises its alert, through a broker that spent its first five
    // connections on garbage.
    wait_until(
        "the cam's alert through the hostile broker",
        SECS(90),
        || {
            on_topic(&got, "/alerts")
                .iter()
                .any(|a| a["stream"] == "cam" && a["type"] == "new")
        },
    )
    .await;
    let m = metrics(port);
    // Four connections failed before or at the CONNACK; one was lost after it.
    let failures = metric(&m, "dfwatch_mqtt_connect_failures_total").unwrap();
    let lost = metric(&m, "dfwatch_mqtt_reconnects_total").unwrap();
    assert!(
        failures >= 4.0 && lost >= 1.0,
        "failures {failures}, lost {lost}\n{m}"
    );
    // The silent broker was given up on by the connect timeout, not waited on forever.
    assert!(
        daemon.log().contains("MQTT connect failed"),
        "{}",
        daemon.log()
    );
    // The bad sources were retried, not given up on.
    for id in ["rtsp-noise", "rtsp-cut", "hls-noise"] {
        let r = stream_report(port, TOKEN, id).unwrap();
        assert!(
            matches!(
                r["status"]["state"].as_str(),
                Some("reconnecting" | "starting" | "stalled")
            ),
            "{id}: {r}"
        );
    }
    let log = daemon.log();
    assert!(!log.contains("panicked"), "{log}");
    drop(daemon);
    drop(cam);
}

/// Opens a connection and sends the start of a request head that never ends.
fn slow_client(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .unwrap();
    s
}

/// Whether the server has closed `s` (end of stream or reset), waiting up to `wait`.
fn closed_by_server(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // The eviction and timeout paths answer nothing; anything read is not a close.
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// With the shipped `[http]` settings and the open-file limit of a service (512 here): 600
/// clients that never finish a request head do not lock out `/livez` (the oldest are closed
/// past `max_connections`), are all cut off by `header_timeout`, and a request whose body
/// stalls is answered 408 after `request_timeout`. Without the bound, the descriptors ran out
/// and every accept failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_flooding_http_clients_never_lock_out_the_probes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut broker = Broker::new(dir);
    broker.start().await;
    let bundle = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/bundle");
    let port = free_port();
    let config = write_config_with(dir, port, &broker.url(), &bundle, "", "");
    let daemon = Daemon::start_with_nofile(&config, dir, &[], Some(512));
    wait_until("/readyz ready", SECS(60), || {
        http(port, "GET", "/readyz", None, "").0 == 200
    })
    .await;

    let t0 = Instant::now();
    let mut slow: Vec<TcpStream> = (0..600).map(|_| slow_client(port)).collect();
    // An authorised request whose body stops after 10 of 1000 bytes.
    let mut stalled_body = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stalled_body
        .write_all(
            format!(
                "POST /api/streams HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"id\":\"x\","
            )
            .as_bytes(),
        )
        .unwrap();
    let body_sent = Instant::now();

    // The probes still get through, one after another.
    for _ in 0..20 {
        assert_eq!(http(port, "GET", "/livez", None, "").0, 200);
    }
    let m = metrics(port);
    let open = metric(&m, "dfwatch_http_connections").unwrap();
    let evicted = metric(&m, "dfwatch_http_connections_evicted_total").unwrap();
    let accept_errors = metric(&m, "dfwatch_http_accept_errors_total").unwrap();
    // An evicted connection closes when its task next runs: a moment over the bound at most.
    assert!(open <= 256.0 + 2.0, "open {open}");
    assert!(evicted >= 600.0 - 256.0, "evicted {evicted}");
    assert_eq!(accept_errors, 0.0, "{m}");

    // The survivors keep trickling a byte a second; the header deadline (10 s from their
    // first byte) closes every one of them.
    while t0.elapsed() < SECS(12) {
        for s in &mut slow {
            let _ = s.write_all(b"x");
        }
        tokio::time::sleep(SECS(1)).await;
    }
    // Each deadline runs from the connection's accept, which a loaded machine may do a few
    // seconds after the connect: allow until 25 s in all.
    let mut still_open = 0;
    for s in &mut slow {
        let left = SECS(25).saturating_sub(t0.elapsed());
        if !closed_by_server(s, left.max(Duration::from_millis(100))) {
            still_open += 1;
        }
    }
    assert_eq!(
        still_open, 0,
        "slow clients still connected after header_timeout"
    );
    let m = metrics(port);
    assert!(
        metric(&m, "dfwatch_http_header_timeouts_total").unwrap() >= 1.0,
        "{m}"
    );
    assert_eq!(http(port, "GET", "/livez", None, "").0, 200);

    // The stalled body: 408 once request_timeout (30 s) has passed, not before.
    stalled_body.set_read_timeout(Some(SECS(40))).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match stalled_body.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let waited = body_sent.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(waited >= SECS(29), "answered after {waited:?}");
    let m = metrics(port);
    assert_eq!(metric(&m, "dfwatch_http_request_timeouts_total"), Some(1.0));
    // A head larger than a connection's read buffer is refused, not buffered.
    let mut big = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let padding = "a".repeat(20 * 1024);
    let _ = big.write_all(
        format!("GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: {padding}\r\n\r\n").as_bytes(),
    );
    big.set_read_timeout(Some(SECS(10))).unwrap();
    let mut head = [0u8; 12];
    let _ = big.read_exact(&mut head);
    assert_eq!(
        &head,
        b"HTTP/1.1 431",
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    let log = daemon.log();
    assert!(!log.contains("panicked"), "{log}");
}
