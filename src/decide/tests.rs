//! The decision stage without threads, brokers or models: a scorer over the FF++ label
//! graph with identity text embeddings, so an embedding's values are its label logits.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::*;
use crate::score::LabelGraph;
use crate::types::BBox;

fn scoring() -> Scoring {
    identity_scoring()
}

fn decider() -> (Decider, Arc<AnalysisMetrics>) {
    let metrics = Arc::new(AnalysisMetrics::default());
    let d = Decider::new(
        NodeId::new("node").unwrap(),
        scoring(),
        EvidenceConfig::default(),
        metrics.clone(),
        UlidGenerator::with_seed(5),
    );
    (d, metrics)
}

/// An embedding that scores `fake` (every label logit +6) or real (every one -6; the scorer
/// divides by 10).
fn embedding(fake: bool) -> Vec<f32> {
    vec![if fake { 60.0 } else { -60.0 }; LabelGraph::ffpp().len()]
}

struct Face {
    stream: &'static str,
    track: u64,
    at_ms: u64,
    fake: bool,
}

fn embedded(
    f: Face,
    t0: Instant,
    metrics: &Arc<crate::metrics::StreamMetrics>,
) -> Embedded<FaceMeta> {
    Embedded {
        meta: FaceMeta {
            stream: StreamId::new(f.stream).unwrap(),
            track: TrackId(f.track),
            mono: t0 + Duration::from_millis(f.at_ms),
            capture_time: UNIX_EPOCH + Duration::from_millis(1_800_000_000_000 + f.at_ms),
            pts: Some(Duration::from_millis(f.at_ms)),
            bbox: BBox {
                x0: 10.0,
                y0: 10.0,
                x1: 90.0,
                y1: 90.0,
            },
            quality: 0.8,
            crop: Some(vec![128; 3 * 16 * 16]),
            publish_crop: true,
            frame: None,
            metrics: metrics.clone(),
        },
        embedding: embedding(f.fake),
        batch_size: 1,
        batch_time: Duration::from_millis(5),
    }
}

/// Feeds `n` faces of one track, 600 ms apart (the default cadence at 5 fps); returns every
/// output.
fn feed(d: &mut Decider, stream: &'static str, track: u64, n: u64, fake: bool) -> Vec<Output> {
    let t0 = Instant::now();
    let m = Arc::new(crate::metrics::StreamMetrics::default());
    let wall = SystemTime::now();
    (0..n)
        .flat_map(|i| {
            let f = Face {
                stream,
                track,
                at_ms: 600 * i,
                fake,
            };
            d.on_embedding(embedded(f, t0, &m), wall)
        })
        .collect()
}

/// Every alert's type (`new`, `update`, `end`) and payload.
fn alerts(out: &[Output]) -> Vec<(&'static str, serde_json::Value)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Alert { kind, payload, .. } => Some((
                kind.change().as_str(),
                serde_json::from_slice(payload).unwrap(),
            )),
            _ => None,
        })
        .collect()
}

fn summaries(out: &[Output]) -> Vec<serde_json::Value> {
    out.iter()
        .filter_map(|o| match o {
            Output::Verdict(v) => Some(serde_json::to_value(v).unwrap()),
            _ => None,
        })
        .collect()
}

#[test]
fn the_test_embeddings_score_as_intended() {
    let s = scoring();
    assert!(s.scorer.score(&embedding(true)).unwrap().q0 > 0.99);
    assert!(s.scorer.score(&embedding(false)).unwrap().q0 < 0.01);
}

#[test]
fn a_fake_track_opens_one_alert_and_its_end_closes_it() {
    let (mut d, metrics) = decider();
    let out = feed(&mut d, "cam", 1, 8, true);
    let a = alerts(&out);
    // The fifth face (min_frames) decides; later faces only keep it open.
    assert_eq!(a.len(), 1, "{a:?}");
    let (kind, new) = &a[0];
    assert_eq!(*kind, "new");
    assert_eq!(new["verdict"], "fake");
    assert_eq!(new["evidence"]["frames_scored"], 5);
    assert_eq!(new["track_id"], 1);
    let id = new["alert_id"].as_str().unwrap().to_string();
    // The new alert carries the face crop as a JPEG (the stream opted in).
    assert!(out.iter().any(
        |o| matches!(o, Output::Alert { face_jpeg: Some(j), .. } if j.starts_with(&[0xFF, 0xD8]))
    ));
    // Summaries: uncertain while evidence gathers, then fake with the open alert.
    let s = summaries(&out);
    assert_eq!(s.first().unwrap()["verdict"], "uncertain");
    assert_eq!(s.last().unwrap()["verdict"], "fake");
    assert_eq!(s.last().unwrap()["open_alerts"][0], id.as_str());
    assert_eq!(s.len(), 2, "published only when it changes: {s:?}");
    // The leading track's probability, to 0.01: the alert's score.
    let score = s.last().unwrap()["score"].as_f64().unwrap();
    let alert_score = new["score"].as_f64().unwrap();
    assert!(
        (score - alert_score).abs() <= 0.005 + 1e-9,
        "{score} vs {alert_score}"
    );
    // The track ends: its alert ends (track_lost), the stream has no track left.
    let out = d.on_track_end(
        &StreamId::new("cam").unwrap(),
        TrackId(1),
        SystemTime::now(),
    );
    let a = alerts(&out);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].0, "end");
    assert_eq!(a[0].1["alert_id"], id.as_str());
    assert_eq!(a[0].1["end_reason"], "track_lost");
    assert_eq!(summaries(&out)[0]["verdict"], "none");
    assert!(summaries(&out)[0]["score"].is_null());
    assert_eq!(d.verdict(&StreamId::new("cam").unwrap(), TrackId(1)), None);
    let counted = metrics.alerts.lock().unwrap().clone();
    assert_eq!(counted.get(&("new", "fake")), Some(&1));
    assert_eq!(counted.get(&("end", "fake")), Some(&1));
}

#[test]
fn a_real_track_stays_silent() {
    let (mut d, _) = decider();
    let out = feed(&mut d, "cam", 3, 10, false);
    assert!(alerts(&out).is_empty());
    assert_eq!(summaries(&out).last().unwrap()["verdict"], "real");
    // Its end publishes no alert either.
    let out = d.on_face_event(
        FaceEvent::TrackEnded {
            stream: StreamId::new("cam").unwrap(),
            track: TrackId(3),
        },
        SystemTime::now(),
    );
    assert!(alerts(&out).is_empty());
}

#[test]
fn removing_a_stream_ends_only_its_alerts() {
    let (mut d, _) = decider();
    feed(&mut d, "a", 1, 6, true);
    feed(&mut d, "b", 1, 6, true);
    let out = d.on_face_event(
        FaceEvent::StreamEnded {
            stream: StreamId::new("a").unwrap(),
        },
        SystemTime::now(),
    );
    let a = alerts(&out);
    assert_eq!(a.len(), 1);
    assert_eq!((a[0].0, &a[0].1["stream"]), ("end", &"a".into()));
    assert_eq!(a[0].1["end_reason"], "stream_stopped");
    // The other stream's alert is still open and ends at shutdown.
    let a = alerts(&d.finish(SystemTime::now()));
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].1["stream"], "b");
}

#[test]
fn a_model_swap_ends_every_open_alert_and_scores_with_the_new_model() {
    let (mut d, _) = decider();
    feed(&mut d, "a", 1, 6, true);
    feed(&mut d, "b", 2, 6, true);
    let mut next = scoring();
    next.model.manifest_sha256 = "1".repeat(64);
    let out = d.on_model_swap(next, SystemTime::now());
    let a = alerts(&out);
    assert_eq!(a.len(), 2);
    assert!(
        a.iter()
            .all(|(k, v)| *k == "end" && v["end_reason"] == "model_swapped")
    );
    assert_eq!(d.model().manifest_sha256, "1".repeat(64));
    // The same track afterwards starts a new alert under the new model.
    let a = alerts(&feed(&mut d, "a", 1, 6, true));
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].1["model"]["manifest_sha256"], "1".repeat(64));
}

#[test]
fn an_embedding_the_scorer_refuses_is_counted_and_publishes_nothing() {
    let (mut d, metrics) = decider();
    let m = Arc::new(crate::metrics::StreamMetrics::default());
    let mut e = embedded(
        Face {
            stream: "cam",
            track: 1,
            at_ms: 0,
            fake: true,
        },
        Instant::now(),
        &m,
    );
    e.embedding.truncate(3);
    assert!(d.on_embedding(e, SystemTime::now()).is_empty());
    assert_eq!(metrics.score_errors.get(), 1);
    assert_eq!(m.faces_scored.get(), 0);
}

#[test]
fn alert_ids_come_from_the_generator_in_order() {
    let (mut d, _) = decider();
    let ids: Vec<String> = (1..=3)
        .flat_map(|t| alerts(&feed(&mut d, "cam", t, 5, true)))
        .map(|(_, v)| v["alert_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
}

/// A face of a `store_media` stream: its frame (seq `i`, for identity) travels with it; its
/// embedding grows stronger with `i`.
fn face_with_frame(
    track: u64,
    i: u64,
    t0: Instant,
    m: &Arc<crate::metrics::StreamMetrics>,
) -> Embedded<FaceMeta> {
    let mut e = embedded(
        Face {
            stream: "cam",
            track,
            at_ms: 600 * i,
            fake: true,
        },
        t0,
        m,
    );
    let frame = crate::types::Frame::packed_rgb(
        StreamId::new("cam").unwrap(),
        i,
        None,
        t0,
        (8, 8),
        Arc::from(vec![0u8; 3 * 8 * 8]),
    )
    .unwrap();
    e.meta.frame = Some(Arc::new(frame));
    e.meta.publish_crop = false;
    e.embedding = vec![20.0 + i as f32; LabelGraph::ffpp().len()];
    e
}

#[test]
fn the_strongest_frame_goes_to_the_store_with_the_alert_and_again_when_a_stronger_comes() {
    let (mut d, metrics) = decider();
    d.set_held_frames(1);
    let t0 = Instant::now();
    let m = Arc::new(crate::metrics::StreamMetrics::default());
    let wall = SystemTime::now();
    let mut out = Vec::new();
    for i in 0..5 {
        out.extend(d.on_embedding(face_with_frame(1, i, t0, &m), wall));
    }
    let media: Vec<(AlertKind, Option<AlertMedia>, bool)> = out
        .iter()
        .filter_map(|o| match o {
            Output::Alert {
                kind,
                media,
                face_jpeg,
                ..
            } => Some((*kind, media.clone(), face_jpeg.is_some())),
            _ => None,
        })
        .collect();
    assert_eq!(media.len(), 1, "one new alert");
    let (kind, held, published) = &media[0];
    assert_eq!(*kind, AlertKind::New);
    assert!(!published, "this stream does not publish face crops");
    let held = held
        .as_ref()
        .expect("the new alert carries the strongest face");
    assert_eq!(held.frame.seq, 4, "the strongest face so far is the newest");
    assert_eq!(held.crop.as_ref().unwrap().1, 16);
    // A second track finds the one frame taken: no snapshot for it, counted.
    d.on_embedding(face_with_frame(2, 0, t0, &m), wall);
    assert_eq!(metrics.held_frames_refused.get(), 1);
    assert_eq!(
        metrics
            .held_frames
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // A weaker face changes nothing; the end carries nothing new ...
    let mut weaker = face_with_frame(1, 5, t0, &m);
    weaker.embedding = vec![1.0; LabelGraph::ffpp().len()];
    d.on_embedding(weaker, wall);
    let end = d.on_track_end(&StreamId::new("cam").unwrap(), TrackId(1), wall);
    let end_media = end.iter().find_map(|o| match o {
        Output::Alert {
            kind: AlertKind::End { .. },
            media,
            ..
        } => Some(media.clone()),
        _ => None,
    });
    assert_eq!(end_media, Some(None), "{end:?}");
    // ... and the ended track's frame is let go.
    assert_eq!(
        metrics
            .held_frames
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn a_stronger_face_after_the_alert_goes_to_the_store_with_the_end() {
    let (mut d, _) = decider();
    let t0 = Instant::now();
    let m = Arc::new(crate::metrics::StreamMetrics::default());
    let wall = SystemTime::now();
    for i in 0..5 {
        d.on_embedding(face_with_frame(1, i, t0, &m), wall);
    }
    d.on_embedding(face_with_frame(1, 9, t0, &m), wall);
    let end = d.on_track_end(&StreamId::new("cam").unwrap(), TrackId(1), wall);
    let seq = end.iter().find_map(|o| match o {
        Output::Alert { media: Some(m), .. } => Some(m.frame.seq),
        _ => None,
    });
    assert_eq!(seq, Some(9));
}

#[test]
fn a_second_alert_on_the_same_track_gets_the_strongest_face_too() {
    let (mut d, _) = decider();
    let t0 = Instant::now();
    let m = Arc::new(crate::metrics::StreamMetrics::default());
    let wall = SystemTime::now();
    let news = |out: &[Output]| -> Vec<Option<u64>> {
        out.iter()
            .filter_map(|o| match o {
                Output::Alert {
                    kind: AlertKind::New,
                    media,
                    ..
                } => Some(media.as_ref().map(|m| m.frame.seq)),
                _ => None,
            })
            .collect()
    };
    let mut out = Vec::new();
    for i in 0..5 {
        out.extend(d.on_embedding(face_with_frame(1, i, t0, &m), wall));
    }
    assert_eq!(news(&out), [Some(4)]);
    // The face turns real for long enough to clear the alert, then fake again (weaker than
    // before): the second new alert still carries the track's strongest face.
    let mut out = Vec::new();
    for i in 5..20 {
        let mut f = face_with_frame(1, i, t0, &m);
        f.embedding = vec![-60.0; LabelGraph::ffpp().len()];
        out.extend(d.on_embedding(f, wall));
    }
    assert!(
        out.iter().any(|o| matches!(
            o,
            Output::Alert {
                kind: AlertKind::End { .. },
                ..
            }
        )),
        "the first alert cleared"
    );
    let mut out = Vec::new();
    for i in 20..40 {
        let mut f = face_with_frame(1, i, t0, &m);
        f.embedding = vec![21.0; LabelGraph::ffpp().len()];
        out.extend(d.on_embedding(f, wall));
    }
    assert_eq!(news(&out), [Some(4)]);
}
