//! The store's writer thread: events in order, media drawn and stored, live subscribers told.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::*;
use crate::types::{BBox, Frame, StreamId};

fn payload(id: &str, kind: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "alert_id": id, "type": kind, "verdict": "fake", "score": 0.97,
        "explanation": {"sentence": "The face looks swapped."},
    }))
    .unwrap()
}

fn frame(w: u32, h: u32) -> Arc<Frame> {
    let data: Vec<u8> = (0..3 * w * h).map(|i| (i % 251) as u8).collect();
    Arc::new(
        Frame::packed_rgb(
            StreamId::new("cam").unwrap(),
            0,
            None,
            Instant::now(),
            (w, h),
            Arc::from(data),
        )
        .unwrap(),
    )
}

fn incoming(id: &str, change: Change, media: Option<AlertMedia>) -> Incoming {
    Incoming {
        alert_id: id.into(),
        change,
        stream: "cam".into(),
        track: 1,
        at: SystemTime::now(),
        payload: payload(id, "new"),
        facts: Facts {
            verdict: "fake",
            score: 0.97,
            sentence: "The face looks swapped.".into(),
            end_reason: None,
        },
        media,
    }
}

const ID: &str = "01JDF0A7Z3K9Q8R6T5V4W3X2Y1";

#[test]
fn the_writer_stores_events_and_media_and_tells_subscribers() {
    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::open(&EventsConfig::default(), &dir.path().join("e.db")).unwrap();
    let mut live = store.subscribe();
    let media = AlertMedia {
        frame: frame(1600, 900),
        bbox: BBox {
            x0: 600.0,
            y0: 300.0,
            x1: 900.0,
            y1: 700.0,
        },
        crop: Some((vec![90; 3 * 32 * 32], 32)),
        logit: 4.0,
    };
    store.record(incoming(ID, Change::New, Some(media)));
    store.record(incoming(ID, Change::Update, None));
    assert!(store.flush(Duration::from_secs(10)));
    let got = live.try_recv().unwrap();
    assert_eq!(got.change, Change::New);
    assert!(got.event.as_ref().unwrap().has_snapshot);
    assert_eq!(live.try_recv().unwrap().change, Change::Update);
    let snap = store
        .read(|db| db.media(ID, MediaKind::Snapshot))
        .unwrap()
        .unwrap();
    // Frames wider than SNAPSHOT_MAX_SIDE are scaled down.
    let img = image::load_from_memory(&snap).unwrap();
    assert_eq!((img.width(), img.height()), (1280, 720));
    let face = store
        .read(|db| db.media(ID, MediaKind::Face))
        .unwrap()
        .unwrap();
    assert_eq!(image::load_from_memory(&face).unwrap().width(), 32);
    assert_eq!(store.metrics().written.get(), 2);
    assert_eq!(store.metrics().media_written.get(), 2);
    assert_eq!(store.metrics().events.load(Ordering::Relaxed), 1);
    // Deleting tells subscribers too.
    assert!(store.delete(ID).unwrap());
    assert_eq!(live.try_recv().unwrap().change, Change::Delete);
    assert_eq!(store.metrics().media_bytes.load(Ordering::Relaxed), 0);
}

#[test]
fn frames_waiting_for_the_writer_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = EventsConfig {
        held_frames: 2,
        ..EventsConfig::default()
    };
    let store = EventStore::open(&cfg, &dir.path().join("e.db")).unwrap();
    // Hold the database so the writer cannot drain while the queue fills.
    let lock = store.shared.lock();
    for n in 0..6 {
        let id = format!("01JDF0A7Z3K9Q8R6T5V4W3X2Y{n}");
        let media = AlertMedia {
            frame: frame(64, 48),
            bbox: BBox {
                x0: 1.0,
                y0: 1.0,
                x1: 20.0,
                y1: 20.0,
            },
            crop: None,
            logit: 1.0,
        };
        store.record(incoming(&id, Change::New, Some(media)));
    }
    // The writer may have taken the first one off the queue already (it waits on the lock
    // with it): at most held_frames + 1 frames are alive, the rest were let go, counted.
    let dropped = store.metrics().media_dropped_queue.get();
    assert!((3..=4).contains(&dropped), "{dropped}");
    drop(lock);
    assert!(store.flush(Duration::from_secs(10)));
    // Every event is stored all the same.
    assert_eq!(store.metrics().events.load(Ordering::Relaxed), 6);
}

/// A damaged database is moved aside and a fresh one started; the store says so for a while
/// (`/readyz` lists it as degraded), and a healthy one says nothing.
#[test]
fn a_reset_is_reported_for_a_while() {
    let dir = tempfile::tempdir().unwrap();
    let healthy = EventStore::open(&EventsConfig::default(), &dir.path().join("ok.db")).unwrap();
    assert_eq!(healthy.metrics().recent_reset(), None);
    let bad = dir.path().join("bad.db");
    std::fs::write(&bad, vec![0x5a; 8192]).unwrap();
    let store = EventStore::open(&EventsConfig::default(), &bad).unwrap();
    assert_eq!(store.metrics().resets.get(), 1);
    let why = store.metrics().recent_reset().expect("a recent reset");
    assert!(why.contains("moved aside"), "{why}");
}
