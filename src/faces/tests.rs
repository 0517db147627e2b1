use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use super::*;
use crate::channel::{FullPolicy, bounded, bounded_keeping};
use crate::crop::CropMethod;
use crate::detect::image::RgbF32;
use crate::detect::{DetectConfig, DetectError, Detection, Detector};
use crate::types::{FrameMeta, PixelFormat, Plane, TrackId};

/// A detector that answers from a script, one entry per call (then nothing).
struct Scripted(Arc<Mutex<VecDeque<Vec<Detection>>>>);

impl Detector for Scripted {
    fn detect(&mut self, _: &RgbF32, _: f32) -> Result<Vec<Detection>, DetectError> {
        Ok(self.0.lock().unwrap().pop_front().unwrap_or_default())
    }
}

/// A face of side 80 centred at (cx, 120).
fn face(cx: f32) -> Detection {
    crate::track::tests::face(cx, 120.0, 80.0)
}

fn frame(i: usize, t0: Instant, fps: f64) -> Frame {
    let (w, h) = (320u32, 240u32);
    let data: Arc<[u8]> = vec![90u8; (w * h * 3) as usize].into();
    Frame::new(
        FrameMeta {
            stream: StreamId::new("cam").unwrap(),
            seq: i as u64,
            pts: Some(Duration::from_secs_f64(i as f64 / fps)),
            capture_time: SystemTime::now(),
            capture_time_from_sender: false,
            mono: t0 + Duration::from_secs_f64(i as f64 / fps),
            width: w,
            height: h,
            format: PixelFormat::Rgb8,
            color: None,
        },
        &[Plane {
            offset: 0,
            stride: (w * 3) as usize,
        }],
        data,
    )
    .unwrap()
}

/// Runs a face stage over `script` (the detections of each frame, 5 fps) on this thread,
/// with an encode queue of `capacity`; returns what it queued, in order, and its counters.
fn run_stage(
    script: Vec<Vec<Detection>>,
    track: TrackConfig,
    capacity: usize,
) -> (Vec<EncodeItem>, Arc<StreamMetrics>) {
    let fps = 5.0;
    let n = script.len();
    let (ftx, frx) = bounded(
        "frames",
        NonZeroUsize::new(n + 1).unwrap(),
        FullPolicy::Block,
    );
    let t0 = Instant::now();
    for i in 0..n {
        ftx.send(frame(i, t0, fps)).unwrap();
    }
    drop(ftx);
    let (etx, erx) = bounded_keeping(
        "encode",
        NonZeroUsize::new(capacity).unwrap(),
        FullPolicy::DropOldest,
        EncodeItem::must_keep,
    );
    let metrics = Arc::new(StreamMetrics::default());
    let detector = FaceDetector::with_model(
        Box::new(Scripted(Arc::new(Mutex::new(script.into())))),
        &DetectConfig::default(),
    );
    FaceStage {
        stream: StreamId::new("cam").unwrap(),
        frames: frx,
        detector,
        track,
        fps,
        crop: CropSpec {
            size: 32,
            mean: [0.5; 3],
            std: [0.25; 3],
            method: CropMethod::Fused,
        },
        keep_crops: false,
        encode: etx,
        metrics: metrics.clone(),
        stop: Arc::new(AtomicBool::new(false)),
    }
    .run();
    let items = std::iter::from_fn(|| erx.try_recv()).collect();
    (items, metrics)
}

/// A short description of the queue: `F1` a face of track 1, `E1` its end, `S` the stream's.
fn shape(items: &[EncodeItem]) -> Vec<String> {
    items
        .iter()
        .map(|i| match i {
            Queued::Face(j) => format!("F{}", j.meta.track.0),
            Queued::Pass(FaceEvent::TrackEnded { track, .. }) => format!("E{}", track.0),
            Queued::Pass(FaceEvent::StreamEnded { .. }) => "S".into(),
        })
        .collect()
}

#[test]
fn due_faces_then_the_track_end_then_the_stream_end_in_order() {
    // A face for 3 s (15 frames at 5 fps), then nothing for 2 s: the track ends after its
    // 1.5 s patience.
    let mut script: Vec<Vec<Detection>> = (0..15).map(|i| vec![face(100.0 + i as f32)]).collect();
    script.extend((0..10).map(|_| Vec::new()));
    let (items, m) = run_stage(script, TrackConfig::default(), 64);
    // Born on frame 1, then every third frame (500 ms at 5 fps): frames 1, 4, 7, 10, 13.
    assert_eq!(shape(&items), ["F1", "F1", "F1", "F1", "F1", "E1", "S"]);
    assert_eq!(m.faces_due.get(), 5);
    assert_eq!(m.frames_analysed.get(), 25);
    assert_eq!(m.faces_crop_failed.get(), 0);
    // Each face carries its crop's quality and the frame's times.
    let Queued::Face(first) = &items[0] else {
        panic!()
    };
    assert_eq!(first.pixels.len(), 3 * 32 * 32);
    assert!((0.0..=1.0).contains(&first.meta.quality));
    assert_eq!(first.meta.pts, Some(Duration::from_millis(200)));
}

#[test]
fn a_full_encode_queue_drops_faces_but_never_a_track_end() {
    // Two faces alternating in and out so tracks start and end often, scored on every frame,
    // into a queue of 5 that nobody reads while the stage runs (room for the four track ends
    // and the stream's end: a kept item finding only kept items would wait for a reader).
    let mut script = Vec::new();
    for k in 0..4 {
        for _ in 0..6 {
            script.push(vec![face(60.0 + 150.0 * (k % 2) as f32)]);
        }
        script.extend((0..9).map(|_| Vec::new()));
    }
    let track = TrackConfig {
        score_every: Duration::from_millis(100),
        ..TrackConfig::default()
    };
    let (items, m) = run_stage(script, track, 5);
    let s = shape(&items);
    // Every track end and the stream end survive; faces were evicted to make room.
    assert_eq!(s, ["E1", "E2", "E3", "E4", "S"].map(String::from), "{s:?}");
    assert_eq!(m.faces_due.get(), 4 * 5);
    assert_eq!(m.faces_dropped_encode_queue.get(), 4 * 5);
}

#[test]
fn a_track_end_is_queued_after_every_face_of_its_track() {
    // Two faces; the first (track 1) leaves after 2 s, the second stays: E1 must follow the
    // last F1.
    let mut script = Vec::new();
    for i in 0..30 {
        let mut d = Vec::new();
        if i < 10 {
            d.push(face(60.0));
        }
        d.push(face(250.0));
        script.push(d);
    }
    let (items, _) = run_stage(script, TrackConfig::default(), 256);
    let s = shape(&items);
    let end = s.iter().position(|x| x == "E1").expect("track 1 ended");
    let last_face = s.iter().rposition(|x| x == "F1").unwrap();
    assert!(last_face < end, "{s:?}");
    assert!(s[end + 1..].iter().any(|x| x == "F2"), "{s:?}");
    assert_eq!(s.last().map(String::as_str), Some("S"));
    assert_eq!(s.iter().filter(|x| *x == "E2").count(), 1, "{s:?}");
    assert!(matches!(
        items.iter().find_map(|i| match i {
            Queued::Pass(FaceEvent::TrackEnded { track, .. }) => Some(*track),
            _ => None,
        }),
        Some(TrackId(1))
    ));
}
