//! Credentials reach the source and nowhere else: not in logs (ours or GStreamer's debug
//! output, which dfwatch routes through its redactor), not in statuses or errors.
#![cfg(feature = "gstreamer")]

mod common;

use std::time::Duration;

use common::*;
use dfwatch::ingest::{CredentialsConfig, StreamState};
use gstreamer as gst;

const USER: &str = "camuser-7f3a";
const PASSWORD: &str = "pw-Zq81-unlikely-string";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtsp_credentials_work_and_appear_in_no_log_line() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let logs = captured_logs();
        init();
        // Make GStreamer's RTSP elements log everything they do, requests and headers included.
        gst::log::set_active(true);
        gst::log::set_threshold_for_name("rtsp*", gst::DebugLevel::Log);
        gst::log::set_threshold_for_name("souphttpsrc", gst::DebugLevel::Log);

        let auth = RtspAuth {
            user: USER.into(),
            password: PASSWORD.into(),
        };
        let server = RtspServer::start(H264_LIVE, "rtph264pay", 0, Some(&auth));
        let dir = tempfile::tempdir().unwrap();
        let good_pw = dir.path().join("good");
        std::fs::write(&good_pw, PASSWORD).unwrap();
        let bad_pw = dir.path().join("bad");
        std::fs::write(&bad_pw, "wrong-password-42").unwrap();

        let mut good = stream("with-login", &server.url());
        good.credentials = Some(CredentialsConfig {
            username: Some(USER.into()),
            password_file: Some(good_pw),
            ..Default::default()
        });
        let mut bad = stream("wrong-login", &server.url());
        bad.credentials = Some(CredentialsConfig {
            username: Some(USER.into()),
            password_file: Some(bad_pw),
            ..Default::default()
        });
        let mut none = stream("no-login", &server.url());
        none.credentials = None;

        let ingest = fast_ingest();
        let (hg, rx) = spawn(&good, &ingest, 8);
        let (hb, _rb) = spawn(&bad, &ingest, 8);
        let (hn, _rn) = spawn(&none, &ingest, 8);
        let frames = collect_frames(&rx, Duration::from_secs(20), Duration::from_secs(1)).await;
        assert!(!frames.is_empty());
        assert_eq!(hg.status().state, StreamState::Online);
        for h in [&hb, &hn] {
            wait_state(h, Duration::from_secs(20), |s| {
                s == StreamState::Reconnecting
            })
            .await;
            let err = h.status().last_error.expect("an error is recorded");
            assert_eq!(err.kind, "auth_failed", "{} {err:?}", h.id());
        }
        for h in [hg, hb, hn] {
            let json = serde_json::to_string(&h.status()).unwrap();
            assert!(
                !json.contains(PASSWORD) && !json.contains("wrong-password-42"),
                "{json}"
            );
            h.stop().await;
        }
        let text = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
        // The capture really saw GStreamer's RTSP traffic, so the check below means something.
        assert!(
            text.contains("gstreamer") || text.contains("rtsp"),
            "no GStreamer log captured"
        );
        assert!(
            text.contains("DESCRIBE"),
            "RTSP requests were not logged; the check is void"
        );
        assert!(!text.contains(PASSWORD), "password leaked into logs");
        assert!(
            !text.contains("wrong-password-42"),
            "password leaked into logs"
        );
        let basic = "Y2FtdXNlci03ZjNhOnB3LVpxODEtdW5saWtlbHktc3RyaW5n"; // base64(user:password)
        assert!(!text.contains(basic), "Basic token leaked into logs");
        assert!(!text.contains(USER), "user name leaked into logs");
    })
    .await
    .expect("test finished in time");
}
