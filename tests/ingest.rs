//! Ingest against real GStreamer sources: RTSP (H.264, H.265), SRT, HLS, files.
#![cfg(feature = "gstreamer")]

mod common;

use std::time::Duration;

use common::*;
use dfwatch::channel::FullPolicy;
use dfwatch::ingest::{EosAction, StreamState};
use dfwatch::types::PixelFormat;

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtsp_h264_frames_arrive_sized_with_rising_pts_at_the_analysis_rate() {
    tokio::time::timeout(SECS(60), async {
        let server = RtspServer::start(H264_LIVE, "rtph264pay", 0, None);
        let mut cfg = stream("rtsp-h264", &server.url());
        cfg.analysis_fps = Some(5.0);
        let ingest = fast_ingest();
        let (h, rx) = spawn(&cfg, &ingest, 64);
        let frames = collect_frames(&rx, SECS(20), SECS(4)).await;
        let st = h.status();
        assert_eq!(st.state, StreamState::Online);
        assert_eq!(st.decoder.as_deref(), Some("avdec_h264"));
        for f in &frames {
            assert_eq!((f.width, f.height, f.format), (320, 240, PixelFormat::Rgb8));
            assert!(f.planes[0].stride >= 960);
            assert_eq!(f.stream.as_str(), "rtsp-h264");
        }
        let pts: Vec<Duration> = frames
            .iter()
            .map(|f| f.pts.expect("RTSP frames carry pts"))
            .collect();
        assert!(
            pts.windows(2).all(|w| w[1] > w[0]),
            "pts not increasing: {pts:?}"
        );
        let seqs: Vec<u64> = frames.iter().map(|f| f.seq).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        // 5 fps from a 30 fps source: 5 +/- 1 frames per second of stream time.
        let span = (*pts.last().unwrap() - pts[0]).as_secs_f64();
        let rate = (frames.len() - 1) as f64 / span;
        assert!(
            (4.0..=6.0).contains(&rate),
            "{} frames over {span:.2} s = {rate:.2} fps",
            frames.len()
        );
        // Once the first RTCP sender report arrives, frames carry the sender's NTP capture
        // time; the server shares our clock, so it must be close to the arrival time.
        let from_sender: Vec<_> = frames
            .iter()
            .filter(|f| f.capture_time_from_sender)
            .collect();
        assert!(
            !from_sender.is_empty(),
            "no frame carried the sender's NTP time"
        );
        let now = std::time::SystemTime::now();
        for f in from_sender {
            let age = now.duration_since(f.capture_time).unwrap_or_default();
            assert!(
                age < SECS(10),
                "sender time {:?} is far from now",
                f.capture_time
            );
        }
        let stats = h.stats();
        assert!(
            stats.frames_sampled_out > 3 * stats.frames_delivered,
            "{stats:?}"
        );
        h.stop().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtsp_h265_is_decoded() {
    tokio::time::timeout(SECS(60), async {
        let server = RtspServer::start(H265_LIVE, "rtph265pay", 0, None);
        let (h, rx) = spawn(&stream("rtsp-h265", &server.url()), &fast_ingest(), 16);
        let frames = collect_frames(&rx, SECS(30), SECS(1)).await;
        assert_eq!((frames[0].width, frames[0].height), (320, 240));
        let dec = h.status().decoder.unwrap_or_default();
        assert!(dec.contains("h265") || dec.contains("265"), "decoder {dec}");
        h.stop().await;
    })
    .await
    .expect("test finished in time");
}

/// Records every state a stream goes through, until the stream stops.
fn record_states(h: &dfwatch::ingest::StreamHandle) -> tokio::task::JoinHandle<Vec<StreamState>> {
    let mut watch = h.subscribe();
    tokio::spawn(async move {
        let mut seen = vec![watch.borrow().state];
        while watch.changed().await.is_ok() {
            let s = watch.borrow().state;
            if seen.last() != Some(&s) {
                seen.push(s);
            }
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtsp_server_stop_reconnects_once_and_spares_the_other_stream() {
    tokio::time::timeout(SECS(90), async {
        let flaky = RtspServer::start(H264_LIVE, "rtph264pay", 0, None);
        let port = flaky.port;
        let steady = RtspServer::start(H264_LIVE, "rtph264pay", 0, None);
        let ingest = fast_ingest();
        let (ha, _rxa) = spawn(&stream("flaky", &flaky.url()), &ingest, 4);
        let (hb, _rxb) = spawn(&stream("steady", &steady.url()), &ingest, 4);
        let states = record_states(&ha);
        wait_state(&ha, SECS(20), |s| s == StreamState::Online).await;
        wait_state(&hb, SECS(20), |s| s == StreamState::Online).await;
        tokio::time::sleep(SECS(1)).await;

        flaky.stop();
        let mut b_counts = vec![hb.stats().frames_delivered];
        wait_state(&ha, SECS(15), |s| s == StreamState::Reconnecting).await;
        // Away for a while: the failed attempts meanwhile must not count as reconnects.
        for _ in 0..3 {
            tokio::time::sleep(SECS(1)).await;
            b_counts.push(hb.stats().frames_delivered);
        }
        let away = ha.status();
        assert_ne!(away.state, StreamState::Online);
        assert!(away.last_error.is_some(), "{away:?}");
        let back = RtspServer::start(H264_LIVE, "rtph264pay", port, None);
        assert_eq!(back.port, port);
        wait_state(&ha, SECS(30), |s| s == StreamState::Online).await;
        tokio::time::sleep(SECS(1)).await;
        b_counts.push(hb.stats().frames_delivered);

        let st = ha.status();
        assert_eq!(st.reconnects, 1, "{st:?}");
        assert!(st.attempts >= 3, "{st:?}");
        assert!(
            b_counts.windows(2).all(|w| w[1] > w[0]),
            "the steady stream stopped while the other reconnected: {b_counts:?}"
        );
        assert_eq!(hb.status().reconnects, 0);
        ha.stop().await;
        let seen = states.await.unwrap();
        assert_eq!(
            seen.iter().filter(|s| **s == StreamState::Online).count(),
            2,
            "{seen:?}"
        );
        hb.stop().await;
        drop(back);
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_media_is_a_stall_then_reconnects_once_when_it_flows_again() {
    tokio::time::timeout(SECS(90), async {
        let server = RtspServer::start(H264_LIVE, "rtph264pay", 0, None);
        let ingest = fast_ingest();
        let (h, _rx) = spawn(&stream("freezing", &server.url()), &ingest, 4);
        let states = record_states(&h);
        wait_state(&h, SECS(20), |s| s == StreamState::Online).await;
        tokio::time::sleep(SECS(1)).await;
        server.set_frozen(true);
        wait_state(&h, SECS(10), |s| s == StreamState::Reconnecting).await;
        assert_eq!(h.status().last_error.unwrap().kind, "stalled");
        tokio::time::sleep(SECS(2)).await;
        server.set_frozen(false);
        wait_state(&h, SECS(30), |s| s == StreamState::Online).await;
        assert_eq!(h.status().reconnects, 1, "{:?}", h.status());
        h.stop().await;
        let seen = states.await.unwrap();
        let pos = |s| seen.iter().position(|x| *x == s);
        let (online, stalled, reconnecting) = (
            pos(StreamState::Online).unwrap(),
            pos(StreamState::Stalled).unwrap_or_else(|| panic!("never stalled: {seen:?}")),
            pos(StreamState::Reconnecting).unwrap(),
        );
        assert!(online < stalled && stalled < reconnecting, "{seen:?}");
        assert_eq!(
            seen.iter().filter(|s| **s == StreamState::Online).count(),
            2,
            "{seen:?}"
        );
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_and_random_files_fail_typed_while_a_good_stream_runs() {
    tokio::time::timeout(SECS(90), async {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.mp4");
        make_h264_mp4(&good, 60);
        let bytes = std::fs::read(&good).unwrap();
        let truncated = dir.path().join("truncated.mp4");
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let random = dir.path().join("random.mp4");
        let mut x: u64 = 0x1234_5678_9abc_def0;
        let noise: Vec<u8> = (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(&random, noise).unwrap();

        let ingest = fast_ingest();
        let mut g = stream("good", good.to_str().unwrap());
        g.on_eos = EosAction::Loop;
        let (hg, _rg) = spawn(&g, &ingest, 4);
        let (ht, _rt) = spawn(
            &stream("truncated", truncated.to_str().unwrap()),
            &ingest,
            4,
        );
        let (hr, _rr) = spawn(&stream("random", random.to_str().unwrap()), &ingest, 4);
        // Under load, decodebin (GStreamer 1.22) can swallow the demuxer's error while it is
        // still plugging the demuxer in; the attempt then hangs until the connect timeout and
        // the retry reports the error. Allow for two such attempts.
        wait_state(&ht, SECS(30), |s| s == StreamState::Offline).await;
        wait_state(&hr, SECS(30), |s| s == StreamState::Offline).await;
        let kind = |h: &dfwatch::ingest::StreamHandle| {
            h.status().last_error.map(|e| e.kind).unwrap_or("none")
        };
        assert_eq!(kind(&hr), "unsupported_codec", "{:?}", hr.status());
        assert!(
            ["decode_error", "unsupported_codec"].contains(&kind(&ht)),
            "{:?}",
            ht.status()
        );
        assert!(!ht.status().finished);
        // The good file keeps delivering, looping past its 2 s end.
        wait_state(&hg, SECS(10), |s| s == StreamState::Online).await;
        let before = hg.stats().frames_delivered;
        tokio::time::sleep(SECS(3)).await;
        let after = hg.stats().frames_delivered;
        assert!(
            after > before + 5,
            "good stream stalled: {before} -> {after}"
        );
        assert_eq!(hg.status().state, StreamState::Online);
        assert_eq!(hg.status().reconnects, 0, "a loop is not a reconnect");
        for h in [hg, ht, hr] {
            h.stop().await;
        }
    })
    .await
    .expect("test finished in time");
}

/// The stream's own source is let through by what it is, not by how its URI is spelled: a
/// file URI with a percent-encoded letter (which GStreamer's file source reports decoded)
/// and a plain path with `.` and `..` segments both play, and no attempt is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_stream_plays_whatever_the_spelling_of_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip.mp4");
    make_h264_mp4(&clip, 60);
    std::fs::create_dir(dir.path().join("configs")).unwrap();
    let d = dir.path().display();
    for (id, uri) in [
        ("encoded", format!("file://{d}/cl%69p.mp4")),
        ("dotted", format!("{d}/configs/./../clip.mp4")),
    ] {
        let (h, rx) = spawn(&stream(id, &uri), &fast_ingest(), 16);
        let frames = collect_frames(&rx, SECS(20), SECS(1)).await;
        assert!(!frames.is_empty(), "{id}: {:?}", h.status());
        let st = h.status();
        assert!(st.last_error.is_none(), "{id}: {st:?}");
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_file_is_reported_not_found() {
    let (h, _rx) = spawn(
        &stream("missing", "/nonexistent/dir/clip.mp4"),
        &fast_ingest(),
        2,
    );
    wait_state(&h, SECS(20), |s| s == StreamState::Offline).await;
    assert_eq!(h.status().last_error.unwrap().kind, "not_found");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srt_on_loopback_with_a_passphrase() {
    tokio::time::timeout(SECS(60), async {
        let port = free_udp_port();
        let passphrase = "srt-test-passphrase-1";
        let _sender = Sender::start(&format!(
            "{H264_LIVE} ! h264parse config-interval=-1 ! mpegtsmux alignment=7 ! \
             srtsink uri=srt://127.0.0.1:{port}?mode=listener passphrase={passphrase} wait-for-connection=false"
        ));
        // The passphrase comes from a file, as a systemd credential would provide it.
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("srt-pass");
        std::fs::write(&pw, format!("{passphrase}\n")).unwrap();
        let mut cfg = stream("srt", &format!("srt://127.0.0.1:{port}?mode=caller"));
        cfg.credentials = Some(dfwatch::ingest::CredentialsConfig {
            password_file: Some(pw),
            ..Default::default()
        });
        let (h, rx) = spawn(&cfg, &fast_ingest(), 16);
        let frames = collect_frames(&rx, SECS(30), SECS(1)).await;
        assert_eq!((frames[0].width, frames[0].height), (320, 240));
        assert_eq!(h.status().state, StreamState::Online);
        h.stop().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hls_over_http_on_loopback() {
    tokio::time::timeout(SECS(90), async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        run_to_eos(&format!(
            "videotestsrc num-buffers=90 pattern=ball ! \
             video/x-raw,width=320,height=240,framerate=30/1 ! \
             x264enc speed-preset=ultrafast key-int-max=15 ! h264parse ! \
             hlssink2 location={d}/seg%05d.ts playlist-location={d}/playlist.m3u8 \
             target-duration=1 playlist-length=0 max-files=0"
        ));
        let port = serve_dir(dir.path().to_path_buf());
        let mut cfg = stream("hls", &format!("http://127.0.0.1:{port}/playlist.m3u8"));
        cfg.analysis_fps = Some(30.0);
        let (h, rx) = spawn(&cfg, &fast_ingest(), 256);
        let frames = collect_frames(&rx, SECS(30), SECS(2)).await;
        assert_eq!((frames[0].width, frames[0].height), (320, 240));
        assert!(frames.len() >= 30, "only {} frames", frames.len());
        h.stop().await;
    })
    .await
    .expect("test finished in time");
}

/// With nobody reading, a queue of capacity C fed N frames drops exactly N - C under either
/// drop policy, and the stream's counters agree with the channel's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_exactly_the_excess_under_each_policy() {
    tokio::time::timeout(SECS(60), async {
        let dir = tempfile::tempdir().unwrap();
        let clip = dir.path().join("clip.mp4");
        make_h264_mp4(&clip, 45);
        for policy in [FullPolicy::DropOldest, FullPolicy::DropNewest] {
            let mut ingest = fast_ingest();
            ingest.queue.policy = policy;
            let mut cfg = stream("queue", clip.to_str().unwrap());
            cfg.realtime = false;
            cfg.analysis_fps = Some(30.0);
            let (h, rx) = spawn(&cfg, &ingest, 3);
            wait_state(&h, SECS(20), |s| s == StreamState::Offline).await;
            assert!(h.status().finished, "{:?}", h.status());
            let s = h.stats();
            let ch = rx.stats();
            assert_eq!(s.frames_decoded, 45, "{s:?}");
            assert_eq!(s.frames_sampled_out, 0, "{s:?}");
            match policy {
                FullPolicy::DropOldest => {
                    assert_eq!(s.frames_delivered, 45);
                    assert_eq!(s.frames_dropped_queue_full, 42);
                    assert_eq!((ch.dropped_oldest, ch.dropped_newest), (42, 0));
                    let seqs: Vec<u64> = std::iter::from_fn(|| rx.try_recv())
                        .map(|f| f.seq)
                        .collect();
                    assert_eq!(seqs, vec![42, 43, 44], "the newest frames win");
                }
                _ => {
                    assert_eq!(s.frames_delivered, 3);
                    assert_eq!(s.frames_dropped_queue_full, 42);
                    assert_eq!((ch.dropped_oldest, ch.dropped_newest), (0, 42));
                    let seqs: Vec<u64> = std::iter::from_fn(|| rx.try_recv())
                        .map(|f| f.seq)
                        .collect();
                    assert_eq!(seqs, vec![0, 1, 2], "the oldest frames stay");
                }
            }
            h.stop().await;
        }
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nv12_frames_carry_two_planes_and_colour_info() {
    tokio::time::timeout(SECS(60), async {
        let dir = tempfile::tempdir().unwrap();
        let clip = dir.path().join("clip.mp4");
        make_h264_mp4(&clip, 10);
        let mut cfg = stream("nv12", clip.to_str().unwrap());
        cfg.format = Some(PixelFormat::Nv12);
        cfg.realtime = false;
        let (h, rx) = spawn(&cfg, &fast_ingest(), 16);
        let f = collect_frames(&rx, SECS(20), Duration::ZERO)
            .await
            .remove(0);
        assert_eq!(f.format, PixelFormat::Nv12);
        assert!(f.planes[1].offset >= 320 * 240);
        assert_eq!(f.row(1, 119).len(), 320);
        assert!(f.color.is_some());
        h.stop().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_stream_is_listed_and_never_opened() {
    let mut cfg = stream("off", "rtsp://127.0.0.1:1/never");
    cfg.enabled = false;
    let (h, _rx) = spawn(&cfg, &fast_ingest(), 2);
    wait_state(&h, SECS(5), |s| s == StreamState::Disabled).await;
    assert_eq!(h.status().attempts, 0);
    h.stop().await;
}

/// A stream above `ingest.max_pixels` is scaled down in GStreamer before any conversion, its
/// aspect kept (an 8K stream used to be converted to floats at full size); below the cap a
/// stream passes through at its own size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_above_max_pixels_arrive_scaled_down_with_their_aspect() {
    tokio::time::timeout(SECS(60), async {
        let server = RtspServer::start(H264_LIVE, "rtph264pay", 0, None);
        let mut cfg = stream("big", &server.url());
        cfg.analysis_fps = Some(5.0);
        // The source is 320 x 240 (76,800 pixels); cap it at a quarter.
        let ingest = dfwatch::ingest::IngestConfig {
            max_pixels: 160 * 120,
            ..fast_ingest()
        };
        let (h, rx) = spawn(&cfg, &ingest, 64);
        let frames = collect_frames(&rx, SECS(20), SECS(2)).await;
        assert!(!frames.is_empty());
        for f in &frames {
            assert_eq!((f.width, f.height, f.format), (160, 120, PixelFormat::Rgb8));
            assert!(f.data.len() >= 160 * 120 * 3);
        }
        h.stop().await;
        // At the default cap the same source keeps its size.
        let (h, rx) = spawn(&stream("small", &server.url()), &fast_ingest(), 64);
        let frames = collect_frames(&rx, SECS(20), SECS(1)).await;
        assert!(frames.iter().all(|f| (f.width, f.height) == (320, 240)));
        h.stop().await;
    })
    .await
    .expect("in time");
}

/// An HLS playlist over HTTP that lists `file://` segments (here a FIFO, which blocked a
/// streaming thread forever, and a readable file) made GStreamer open local files: sources
/// inside a stream are held to `ingest.child_schemes` (network schemes by default). The
/// stream fails typed, and the FIFO is never opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hls_playlist_cannot_make_the_daemon_open_local_files() {
    tokio::time::timeout(SECS(60), async {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        std::fs::write(
            dir.path().join("evil.m3u8"),
            format!(
                "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n\
                 #EXTINF:2.0,\nfile://{}\n#EXTINF:2.0,\nfile:///etc/hostname\n#EXT-X-ENDLIST\n",
                fifo.display()
            ),
        )
        .unwrap();
        let port = serve_dir(dir.path().to_path_buf());
        let cfg = stream("hls-evil", &format!("http://127.0.0.1:{port}/evil.m3u8"));
        let (h, _rx) = spawn(&cfg, &fast_ingest(), 16);
        // Meanwhile, nobody may ever hold the FIFO open for reading: a non-blocking writer
        // open fails with ENXIO exactly while there is no reader.
        let opened = {
            let fifo = fifo.clone();
            tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::OpenOptionsExt;
                let t0 = std::time::Instant::now();
                while t0.elapsed() < SECS(8) {
                    let r = std::fs::OpenOptions::new()
                        .write(true)
                        .custom_flags(nix::libc::O_NONBLOCK)
                        .open(&fifo);
                    if r.is_ok() {
                        return true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                false
            })
        };
        let mut status = h.subscribe();
        // The watch guard is dropped at once: holding it would block the stream's status.
        let got = tokio::time::timeout(
            SECS(30),
            status.wait_for(|s| {
                s.last_error
                    .as_ref()
                    .is_some_and(|e| e.kind == "source_not_allowed")
            }),
        )
        .await
        .map(|r| r.map(|_| ()));
        assert!(got.is_ok(), "no source_not_allowed error: {:?}", h.status());
        let message = h.status().last_error.unwrap().message;
        assert!(
            message.contains("file://") && message.contains("may not open"),
            "{message}"
        );
        // A refusal by policy is a configuration error: the stream fails and stays failed,
        // no attempt after the first.
        tokio::time::sleep(SECS(2)).await;
        let st = h.status();
        assert_eq!(st.state, StreamState::Failed, "{st:?}");
        assert_eq!(st.attempts, 1, "{st:?}");
        assert!(
            !opened.await.unwrap(),
            "the FIFO was opened by the pipeline"
        );
        h.stop().await;
    })
    .await
    .expect("test finished in time");
}
