use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Instant;

use super::*;
use crate::channel::{FullPolicy, bounded, bounded_keeping};
use crate::crop::CropMethod;
use crate::detect::image::RgbF32;
use crate::detect::{DetectConfig, DetectError, Detection, Detector};
use crate::types::TrackId;

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
    // Texture, so that the crops' sharpness (and quality) is not zero.
    let data: Arc<[u8]> = (0..(w * h) as usize)
        .flat_map(|p| {
            let (x, y) = (p % w as usize, p / w as usize);
            [(x * 7 + y * 3) as u8, (x * y) as u8, (x ^ y) as u8]
        })
        .collect::<Vec<u8>>()
        .into();
    Frame::packed_rgb(
        StreamId::new("cam").unwrap(),
        i as u64,
        Some(Duration::from_secs_f64(i as f64 / fps)),
        t0 + Duration::from_secs_f64(i as f64 / fps),
        (w, h),
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
    run_stage_on(script, track, capacity, false)
}

fn small_crop() -> CropSpec {
    CropSpec {
        size: 32,
        mean: [0.5; 3],
        std: [0.25; 3],
        method: CropMethod::Fused,
    }
}

/// [`run_stage`], with the faces handed on for a device to crop when `device_crop`.
fn run_stage_on(
    script: Vec<Vec<Detection>>,
    track: TrackConfig,
    capacity: usize,
    device_crop: bool,
) -> (Vec<EncodeItem>, Arc<StreamMetrics>) {
    run_stage_with(script, track, capacity, device_crop, small_crop())
}

/// [`run_stage_on`] with crops of `crop`.
fn run_stage_with(
    script: Vec<Vec<Detection>>,
    track: TrackConfig,
    capacity: usize,
    device_crop: bool,
    crop: CropSpec,
) -> (Vec<EncodeItem>, Arc<StreamMetrics>) {
    // The script answers one frame per call: every frame is searched whole (the searches
    // between full ones have a test of their own, with a detector that knows its frames).
    let track = TrackConfig {
        detect_every: 1,
        ..track
    };
    let fps = 5.0;
    let n = script.len();
    let t0 = Instant::now();
    let detector = FaceDetector::with_model(
        Box::new(Scripted(Arc::new(Mutex::new(script.into())))),
        &DetectConfig::default(),
    );
    stage_over(
        (0..n).map(|i| frame(i, t0, fps)).collect(),
        detector,
        track,
        (capacity, device_crop, crop),
    )
}

/// A face stage over `frames` (5 fps) with `detector` on this thread, into an encode queue
/// of `capacity`; what it queued, in order, and its counters.
fn stage_over(
    frames: Vec<Frame>,
    detector: FaceDetector,
    track: TrackConfig,
    (capacity, device_crop, crop): (usize, bool, CropSpec),
) -> (Vec<EncodeItem>, Arc<StreamMetrics>) {
    let (ftx, frx) = bounded(
        "frames",
        NonZeroUsize::new(frames.len() + 1).unwrap(),
        FullPolicy::Block,
    );
    for f in frames {
        ftx.send(f).unwrap();
    }
    drop(ftx);
    let (etx, erx) = bounded_keeping(
        "encode",
        NonZeroUsize::new(capacity).unwrap(),
        FullPolicy::DropOldest,
        EncodeItem::must_keep,
    );
    let metrics = Arc::new(StreamMetrics::default());
    FaceStage {
        stream: StreamId::new("cam").unwrap(),
        frames: frx,
        detector,
        track,
        fps: 5.0,
        crop,
        publish_crops: false,
        keep_media: false,
        device_crop,
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
    let FaceInput::Pixels(pixels) = &first.input else {
        panic!("the CPU path hands on normalised pixels")
    };
    assert_eq!(pixels.len(), 3 * 32 * 32);
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

#[test]
fn on_the_gpu_path_faces_leave_aligned_with_the_cpu_paths_quality_and_order() {
    let mut script: Vec<Vec<Detection>> = (0..15).map(|i| vec![face(100.0 + i as f32)]).collect();
    script.extend((0..10).map(|_| Vec::new()));
    let (cpu, _) = run_stage_on(script.clone(), TrackConfig::default(), 64, false);
    let (gpu, m) = run_stage_on(script, TrackConfig::default(), 64, true);
    // The same faces, track end and stream end, in the same order.
    assert_eq!(shape(&gpu), shape(&cpu));
    assert_eq!(m.faces_crop_failed.get(), 0);
    for (g, c) in gpu.iter().zip(&cpu) {
        let (Queued::Face(g), Queued::Face(c)) = (g, c) else {
            continue;
        };
        let FaceInput::Aligned { frame, inverse } = &g.input else {
            panic!("the GPU path hands on the frame and the crop's map")
        };
        assert_eq!(frame.mono, g.meta.mono);
        // The map is the fused crop's: the CPU fused crop through it is the CPU path's crop.
        let FaceInput::Pixels(cpu_pixels) = &c.input else {
            panic!()
        };
        let view = crate::crop::warp::RgbView {
            data: &frame.data,
            width: frame.width as usize,
            height: frame.height as usize,
            stride: frame.planes[0].stride,
        };
        let rgb = crate::crop::warp::warp_affine_bilinear(view, inverse, 32, 32);
        let mut again = vec![0.0; 3 * 32 * 32];
        crate::encode::normalise_rgb(&rgb, 32, [0.5; 3], [0.25; 3], &mut again);
        assert_eq!(&again, cpu_pixels);
        // Quality from a quarter of the crop on the host: the CPU path's.
        assert!(c.meta.quality > 0.05, "{}", c.meta.quality);
        assert!(
            (g.meta.quality - c.meta.quality).abs() < 1e-3,
            "{} vs {}",
            g.meta.quality,
            c.meta.quality
        );
    }
}

/// Every item through the daemon's encoder loop with `encoder`; what came out, in order.
fn encode_all(
    encoder: impl crate::encode::BatchEncoder,
    items: Vec<EncodeItem>,
) -> Vec<crate::encode::Encoded<FaceMeta, FaceEvent>> {
    let (tx, rx) = bounded_keeping(
        "encode",
        NonZeroUsize::new(items.len() + 1).unwrap(),
        FullPolicy::Block,
        EncodeItem::must_keep,
    );
    for i in items {
        tx.send(i).unwrap();
    }
    drop(tx);
    let (otx, orx) = bounded("out", NonZeroUsize::new(1024).unwrap(), FullPolicy::Block);
    let failed = crate::encode::run_encoder_until(
        encoder,
        &crate::encode::EncoderConfig::default(),
        rx,
        otx,
        &AtomicBool::new(false),
        &crate::fault::Restarts::default(),
        &mut |_, _| {},
    );
    assert_eq!(failed, 0);
    std::iter::from_fn(|| orx.try_recv()).collect()
}

/// The GPU backend's wiring end to end, with the CPU twin of the device: two faces a frame
/// from the face stage, aligned, through the encoder loop (batches of up to 8 holding several
/// faces of one frame), cropped and encoded by the twin. Each embedding is the one the engine
/// gives the CPU path's crop of that face, and the track and stream ends keep their places.
#[test]
fn the_gpu_path_with_the_twin_device_embeds_each_face_like_the_cpu_crop() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny/bundle");
    let bundle = crate::model::ModelBundle::load(std::path::Path::new(dir)).unwrap();
    let a = bundle.architecture();
    let spec = CropSpec {
        size: a.image_size as usize,
        mean: a.mean,
        std: a.std,
        method: CropMethod::Fused,
    };
    let mut script: Vec<Vec<Detection>> = (0..12)
        .map(|i| vec![face(80.0 + i as f32), face(240.0 - i as f32)])
        .collect();
    script.extend((0..10).map(|_| Vec::new()));
    let (aligned, _) = run_stage_with(
        script.clone(),
        TrackConfig::default(),
        256,
        true,
        spec.clone(),
    );
    let (cropped, _) = run_stage_with(script, TrackConfig::default(), 256, false, spec);
    assert_eq!(shape(&aligned), shape(&cropped));
    let faces = shape(&aligned)
        .iter()
        .filter(|s| s.starts_with('F'))
        .count();
    assert!(faces >= 8, "{:?}", shape(&aligned));
    let twin = crate::gpu::backend::twin_encoder(&bundle).unwrap();
    let out = encode_all(twin, aligned);
    let mut engine =
        crate::gpu::vit::cpu::CpuEngine::new(&bundle, crate::gpu::vit::cpu::Precision::F16)
            .unwrap();
    assert_eq!(out.len(), cropped.len());
    let mut batched = 0;
    for (o, c) in out.iter().zip(&cropped) {
        match (o, c) {
            (crate::encode::Encoded::Face(e), Queued::Face(c)) => {
                assert_eq!((e.meta.track, e.meta.pts), (c.meta.track, c.meta.pts));
                let FaceInput::Pixels(p) = &c.input else {
                    panic!()
                };
                let want = engine.encode(p, 1).unwrap();
                let worst = want
                    .iter()
                    .zip(&e.embedding)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst < 1e-4,
                    "track {:?}: largest difference {worst}",
                    e.meta.track
                );
                batched += usize::from(e.batch_size > 1);
            }
            (crate::encode::Encoded::Pass(a), Queued::Pass(b)) => {
                assert_eq!(format!("{a:?}"), format!("{b:?}"));
            }
            _ => panic!("the order changed"),
        }
    }
    assert!(batched > 0, "no batch held more than one face");
}

/// A world of faces per frame, as a detector sees it: the frame's index is written in its
/// first pixel; `detect` finds every face of the frame, `detect_around` those whose box
/// overlaps one of the regions it is given.
struct World {
    faces: Vec<Vec<Detection>>,
    calls: Arc<Mutex<Vec<(usize, &'static str)>>>,
}

impl World {
    fn index(img: &RgbF32) -> usize {
        img.px(0, 0, 0) as usize
    }
}

impl Detector for World {
    fn detect(&mut self, img: &RgbF32, _: f32) -> Result<Vec<Detection>, DetectError> {
        let i = World::index(img);
        self.calls.lock().unwrap().push((i, "full"));
        Ok(self.faces[i].clone())
    }

    fn detect_around(
        &mut self,
        frame: crate::crop::warp::RgbView<'_>,
        around: &[crate::types::BBox],
    ) -> Option<Result<Vec<Detection>, DetectError>> {
        let i = usize::from(frame.data[0]);
        self.calls.lock().unwrap().push((i, "around"));
        Some(Ok(self.faces[i]
            .iter()
            .filter(|f| {
                around
                    .iter()
                    .any(|r| crate::detect::nms::iou(r, &f.bbox) > 0.3)
            })
            .copied()
            .collect()))
    }
}

#[test]
fn between_full_searches_tracks_are_found_around_their_predictions_and_new_faces_wait_at_most_detect_every_frames()
 {
    let fps = 5.0;
    let n = 30;
    // Face A from the start until frame 15; face B from frame 7 on.
    let faces: Vec<Vec<Detection>> = (0..n)
        .map(|i| {
            let mut v = Vec::new();
            if i <= 15 {
                v.push(face(90.0));
            }
            if i >= 7 {
                v.push(face(230.0));
            }
            v
        })
        .collect();
    let t0 = Instant::now();
    let frames: Vec<Frame> = (0..n)
        .map(|i| {
            let f = frame(i, t0, fps);
            let mut data = f.data.to_vec();
            data[..3].copy_from_slice(&[i as u8; 3]);
            Frame::packed_rgb(
                f.stream.clone(),
                f.seq,
                f.pts,
                f.mono,
                (320, 240),
                data.into(),
            )
            .unwrap()
        })
        .collect();
    let calls: Arc<Mutex<Vec<(usize, &'static str)>>> = Default::default();
    let detector = FaceDetector::with_model(
        Box::new(World {
            faces,
            calls: calls.clone(),
        }),
        &DetectConfig::default(),
    );
    let track = TrackConfig {
        detect_every: 5,
        ..TrackConfig::default()
    };
    let (items, metrics) = stage_over(frames, detector, track, (256, false, small_crop()));
    let calls = calls.lock().unwrap().clone();
    let full: Vec<usize> = calls
        .iter()
        .filter(|c| c.1 == "full")
        .map(|c| c.0)
        .collect();
    // Every 5th frame whole, and frame 17 after A was missing where predicted on 16.
    assert_eq!(full, [0, 5, 10, 15, 17, 22, 27], "{calls:?}");
    assert_eq!(calls.len(), n, "one search per frame: {calls:?}");
    assert_eq!(metrics.detector_runs.get(), 7);
    assert_eq!(metrics.detector_around_runs.get(), 23);
    // B appeared on frame 7 and was found by the full search of frame 10 (3 frames: at most
    // detect_every), born on frame 11 from the search around its prediction, and scored.
    let frame_of =
        |j: &EncodeJob<FaceMeta>| (j.meta.pts.unwrap().as_secs_f64() * fps).round() as usize;
    let first_b = items
        .iter()
        .find_map(|i| match i {
            Queued::Face(j) if j.meta.track.0 == 2 => Some(frame_of(j)),
            _ => None,
        })
        .expect("face B scored");
    assert_eq!(first_b, 11);
    // Faces are scored at the default cadence between full searches too: A on frames 1, 4,
    // 7, 10, 13 (every 3rd at 5 fps), found around its prediction on all but 10.
    let a: Vec<usize> = items
        .iter()
        .filter_map(|i| match i {
            Queued::Face(j) if j.meta.track.0 == 1 => Some(frame_of(j)),
            _ => None,
        })
        .collect();
    assert_eq!(a, [1, 4, 7, 10, 13], "{}", shape(&items).join(" "));
    // One track per face, and A's end after it left.
    assert!(shape(&items).contains(&"E1".to_string()));
    assert!(!shape(&items).iter().any(|s| s == "F3"));
}
