//! Real sources for ingest tests: an in-process RTSP server on port 0, SRT and HLS senders,
//! encoded files, a tiny HTTP file server, and log capture. No GStreamer mocks.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::glib;
use gstreamer::prelude::*;
use gstreamer_rtsp_server as rtsp;
use gstreamer_rtsp_server::prelude::*;

use dfwatch::channel::{Receiver, bounded};
use dfwatch::ingest::{self, IngestConfig, StreamConfig, StreamHandle, StreamState};
use dfwatch::types::{Frame, StreamId};

pub fn init() {
    ingest::init().expect("GStreamer initialises");
}

/// Live H.264 test video, small and cheap to encode.
pub const H264_LIVE: &str = "videotestsrc is-live=true pattern=ball ! \
     video/x-raw,width=320,height=240,framerate=30/1 ! \
     x264enc tune=zerolatency speed-preset=ultrafast key-int-max=15 bitrate=500";

pub const H265_LIVE: &str = "videotestsrc is-live=true pattern=smpte ! \
     video/x-raw,width=320,height=240,framerate=30/1 ! \
     x265enc tune=zerolatency speed-preset=ultrafast key-int-max=15 bitrate=500";

/// An RTSP server running on its own GLib main loop thread.
pub struct RtspServer {
    pub port: u16,
    server: rtsp::RTSPServer,
    source: Option<glib::SourceId>,
    ctx: glib::MainContext,
    main_loop: glib::MainLoop,
    thread: Option<std::thread::JoinHandle<()>>,
    gate: Arc<Mutex<Option<gst::Element>>>,
}

pub struct RtspAuth {
    pub user: String,
    pub password: String,
}

impl RtspServer {
    /// Serves `encoder ! <payloader>` at `/test` on `port` (0 picks a free one).
    pub fn start(encoder: &str, payloader: &str, port: u16, auth: Option<&RtspAuth>) -> Self {
        init();
        let server = rtsp::RTSPServer::new();
        server.set_service(&port.to_string());
        let factory = rtsp::RTSPMediaFactory::new();
        factory.set_launch(&format!(
            "( {encoder} ! valve name=gate drop=false ! {payloader} name=pay0 pt=96 )"
        ));
        factory.set_shared(true);
        let gate = Arc::new(Mutex::new(None));
        let g = gate.clone();
        factory.connect_media_configure(move |_, media| {
            let bin = media.element().downcast::<gst::Bin>().ok();
            *g.lock().unwrap() = bin.and_then(|b| b.by_name("gate"));
        });
        if let Some(a) = auth {
            let auth = rtsp::RTSPAuth::new();
            let token = rtsp::RTSPToken::builder()
                .field(rtsp::RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
                .build();
            let basic = rtsp::RTSPAuth::make_basic(&a.user, &a.password);
            auth.add_basic(basic.as_str(), &token);
            server.set_auth(Some(&auth));
            factory.add_role_from_structure(
                &gst::Structure::builder("user")
                    .field(rtsp::RTSP_PERM_MEDIA_FACTORY_ACCESS, true)
                    .field(rtsp::RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, true)
                    .build(),
            );
        }
        server
            .mount_points()
            .expect("mount points")
            .add_factory("/test", factory);
        let ctx = glib::MainContext::new();
        let source = server.attach(Some(&ctx)).expect("RTSP server attaches");
        let port = server.bound_port() as u16;
        let main_loop = glib::MainLoop::new(Some(&ctx), false);
        let ml = main_loop.clone();
        let c = ctx.clone();
        let thread = std::thread::spawn(move || {
            c.with_thread_default(|| ml.run()).expect("own the context");
        });
        RtspServer {
            port,
            server,
            source: Some(source),
            ctx,
            main_loop,
            thread: Some(thread),
            gate,
        }
    }

    /// Freezes (or resumes) the media: connections stay open but no data flows, as when a
    /// camera's encoder hangs or a link silently drops packets.
    pub fn set_frozen(&self, frozen: bool) {
        let gate = self.gate.lock().unwrap();
        gate.as_ref()
            .expect("a client is connected (media configured)")
            .set_property("drop", frozen);
    }

    pub fn url(&self) -> String {
        format!("rtsp://127.0.0.1:{}/test", self.port)
    }

    /// Stops listening and drops every client, as a camera that goes away would.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // The source lives in our own context, so it is looked up there (SourceId::remove
        // would search the default context).
        if let Some(id) = self.source.take()
            && let Some(src) = self.ctx.find_source_by_id(&id)
        {
            src.destroy();
        }
        self.server
            .client_filter(Some(&mut |_, _| rtsp::RTSPFilterResult::Remove));
        self.main_loop.quit();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A GStreamer pipeline run from a launch line until dropped.
pub struct Sender {
    pipeline: gst::Element,
}

impl Sender {
    pub fn start(launch: &str) -> Self {
        init();
        let pipeline = gst::parse::launch(launch).expect("launch line parses");
        pipeline.set_state(gst::State::Playing).expect("plays");
        Sender { pipeline }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// Runs a finite launch line to its end (for making files).
pub fn run_to_eos(launch: &str) {
    init();
    let pipeline = gst::parse::launch(launch).expect("launch line parses");
    pipeline.set_state(gst::State::Playing).expect("plays");
    let bus = pipeline.bus().expect("bus");
    let msg = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(120),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
        .expect("pipeline ends within 120 s");
    if let gst::MessageView::Error(e) = msg.view() {
        panic!("{launch}: {}", e.error());
    }
    pipeline.set_state(gst::State::Null).expect("stops");
}

/// Encodes `frames` frames of 320x240 30 fps H.264 into an MP4 file.
pub fn make_h264_mp4(path: &Path, frames: u32) {
    run_to_eos(&format!(
        "videotestsrc num-buffers={frames} pattern=ball ! \
         video/x-raw,width=320,height=240,framerate=30/1 ! \
         x264enc speed-preset=ultrafast key-int-max=15 ! h264parse ! mp4mux ! \
         filesink location={}",
        path.display()
    ));
}

/// A UDP port that was free a moment ago.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind")
        .port()
}

/// Serves files of `root` over HTTP/1.0 on 127.0.0.1 (port 0) until the process ends.
pub fn serve_dir(root: PathBuf) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let root = root.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let n = conn.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req
                    .lines()
                    .next()
                    .and_then(|l| l.split_whitespace().nth(1))
                    .unwrap_or("/")
                    .trim_start_matches('/')
                    .to_string();
                let file = root.join(path.split('?').next().unwrap_or(""));
                match std::fs::read(&file) {
                    Ok(body) => {
                        let ct = if file.extension().is_some_and(|e| e == "m3u8") {
                            "application/vnd.apple.mpegurl"
                        } else {
                            "video/mp2t"
                        };
                        let _ = write!(
                            conn,
                            "HTTP/1.0 200 OK\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
                            body.len()
                        );
                        let _ = conn.write_all(&body);
                    }
                    Err(_) => {
                        let _ =
                            conn.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                    }
                }
            });
        }
    });
    port
}

/// Ingest settings that react fast enough for tests.
pub fn fast_ingest() -> IngestConfig {
    IngestConfig {
        stall_timeout: Duration::from_millis(1500),
        connect_timeout: Duration::from_secs(5),
        backoff: dfwatch::ingest::BackoffConfig {
            base: Duration::from_millis(100),
            cap: Duration::from_millis(500),
            ..Default::default()
        },
        rtsp_latency: Duration::from_millis(50),
        ..IngestConfig::default()
    }
}

pub fn stream(id: &str, uri: &str) -> StreamConfig {
    StreamConfig::new(StreamId::new(id).expect("valid id"), uri)
}

/// Starts a stream with its own queue; returns the handle and the receiving end.
pub fn spawn(
    cfg: &StreamConfig,
    ingest: &IngestConfig,
    capacity: usize,
) -> (StreamHandle, Receiver<Frame>) {
    let (tx, rx) = bounded(
        format!("frames-{}", cfg.id),
        std::num::NonZeroUsize::new(capacity).expect("non-zero"),
        ingest.queue.policy,
    );
    let h = ingest::spawn_stream(cfg, ingest, Path::new("/"), tx).expect("stream spawns");
    (h, rx)
}

/// Waits until the stream's state satisfies `pred`, or panics after `timeout` with the status.
pub async fn wait_state(h: &StreamHandle, timeout: Duration, pred: impl Fn(StreamState) -> bool) {
    let mut rx = h.subscribe();
    // Drop the watch guard at once: holding it would block the stream's status updates.
    let r = tokio::time::timeout(timeout, rx.wait_for(|s| pred(s.state)))
        .await
        .map(|r| r.map(|_| ()));
    assert!(
        matches!(r, Ok(Ok(()))),
        "stream {} did not reach the expected state within {timeout:?}: {:?}",
        h.id(),
        h.status()
    );
}

/// Takes frames from `rx` for `dur` (after the first one arrives, within `first_within`).
pub async fn collect_frames(
    rx: &Receiver<Frame>,
    first_within: Duration,
    dur: Duration,
) -> Vec<Frame> {
    let first = tokio::time::timeout(first_within, rx.recv_async())
        .await
        .expect("a first frame in time")
        .expect("stream open");
    let mut out = vec![first];
    let end = Instant::now() + dur;
    while let Ok(Some(f)) = tokio::time::timeout_at(end.into(), rx.recv_async()).await {
        out.push(f);
    }
    out
}

/// Everything logged through `tracing` in this test process, for checking what never appears.
pub fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = LogWriter(buf.clone());
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        buf
    })
    .clone()
}

#[derive(Clone)]
struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
