use super::*;

/// A synthetic face of side `s` centred at (cx, cy), landmarks in the template's proportions.
pub(crate) fn face(cx: f32, cy: f32, s: f32) -> Detection {
    let rel = [
        [-0.2, -0.1],
        [0.2, -0.1],
        [0.0, 0.08],
        [-0.17, 0.25],
        [0.17, 0.25],
    ];
    Detection {
        bbox: BBox {
            x0: cx - s / 2.0,
            y0: cy - s / 2.0,
            x1: cx + s / 2.0,
            y1: cy + s / 2.0,
        },
        landmarks: rel.map(|[x, y]| [cx + x * s, cy + y * s]),
        score: 0.99,
    }
}

fn frames(n: usize, fps: f32) -> impl Iterator<Item = (usize, Instant)> {
    let t0 = Instant::now();
    (0..n).map(move |i| (i, t0 + Duration::from_secs_f32(i as f32 / fps)))
}

#[test]
fn a_moving_face_keeps_one_id_and_is_born_after_two_hits() {
    let mut tr = Tracker::new(TrackConfig::default(), 10.0);
    let mut ids = std::collections::BTreeSet::new();
    for (i, now) in frames(60, 10.0) {
        let (faces, events) = tr.update(&[(face(100.0 + 6.0 * i as f32, 200.0, 80.0), 1.0)], now);
        if i == 0 {
            assert!(
                faces.is_empty() && events.is_empty(),
                "born on the first hit"
            );
        }
        if i == 1 {
            assert_eq!(events, vec![TrackEvent::Born(TrackId(1))]);
        }
        ids.extend(faces.iter().map(|f| f.track));
    }
    assert_eq!(ids.into_iter().collect::<Vec<_>>(), vec![TrackId(1)]);
}

#[test]
fn two_faces_crossing_keep_their_ids() {
    let mut tr = Tracker::new(TrackConfig::default(), 10.0);
    // A moves right, B moves left on nearly the same row; they pass through each other.
    let path_a = |t: f32| 100.0 + 12.0 * t;
    let path_b = |t: f32| 568.0 - 12.0 * t;
    let mut checked = 0;
    for (i, now) in frames(40, 10.0) {
        let t = i as f32;
        let a = face(path_a(t), 300.0, 90.0);
        let b = face(path_b(t), 306.0, 90.0);
        // Present them in alternating order so list position carries no identity.
        let dets = if i % 2 == 0 {
            [(a, 1.0), (b, 1.0)]
        } else {
            [(b, 1.0), (a, 1.0)]
        };
        let (faces, _) = tr.update(&dets, now);
        for f in faces {
            let cx = (f.bbox.x0 + f.bbox.x1) / 2.0;
            let want = match f.track.0 {
                1 => path_a(t),
                2 => path_b(t),
                other => panic!("a third track {other} appeared at frame {i}"),
            };
            assert!(
                (cx - want).abs() < 0.5,
                "frame {i}: track {} at {cx}, its path is at {want}",
                f.track
            );
            checked += 1;
        }
    }
    assert!(checked >= 76, "{checked}");
}

#[test]
fn a_face_that_leaves_ends_its_track_after_the_patience() {
    let cfg = TrackConfig::default();
    let mut tr = Tracker::new(cfg.clone(), 10.0);
    let t0 = Instant::now();
    let ms = |v: u64| t0 + Duration::from_millis(v);
    tr.update(&[(face(100.0, 100.0, 60.0), 1.0)], ms(0));
    tr.update(&[(face(101.0, 100.0, 60.0), 1.0)], ms(100));
    assert_eq!(tr.len(), 1);
    let (_, ev) = tr.update(&[], ms(1500));
    assert!(ev.is_empty(), "ended before its patience");
    let (_, ev) = tr.update(&[], ms(100 + cfg.patience.as_millis() as u64));
    assert_eq!(ev, vec![TrackEvent::Lost(TrackId(1))]);
    assert!(tr.is_empty());
    // A one-frame false detection never becomes a track, and says nothing when it goes.
    let (_, ev) = tr.update(&[(face(400.0, 400.0, 60.0), 1.0)], ms(2000));
    assert!(ev.is_empty());
    let (_, ev) = tr.update(&[], ms(2100));
    assert!(ev.is_empty());
}

#[test]
fn scoring_is_due_at_birth_then_on_cadence_or_better_quality() {
    let cfg = TrackConfig {
        score_every: Duration::from_secs(1),
        ..TrackConfig::default()
    };
    let mut tr = Tracker::new(cfg, 10.0);
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let step = |tr: &mut Tracker, ms: u64, q: f32| {
        let (faces, _) = tr.update(&[(face(200.0, 200.0, 80.0), q)], at(ms));
        faces.first().map(|f| f.due)
    };
    assert_eq!(step(&mut tr, 0, 1.0), None, "not born yet");
    assert_eq!(step(&mut tr, 100, 1.0), Some(true), "due at birth");
    assert_eq!(step(&mut tr, 200, 1.0), Some(false));
    assert_eq!(step(&mut tr, 600, 1.1), Some(false), "a small gain waits");
    assert_eq!(
        step(&mut tr, 700, 1.3),
        Some(true),
        "25% better quality is due at once"
    );
    assert_eq!(step(&mut tr, 1600, 1.3), Some(false));
    assert_eq!(
        step(&mut tr, 1700, 1.0),
        Some(true),
        "one second after the last scoring"
    );
}

#[test]
fn prediction_bridges_frames_without_detection() {
    let mut tr = Tracker::new(TrackConfig::default(), 10.0);
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    tr.update(&[(face(100.0, 100.0, 60.0), 1.0)], at(0));
    tr.update(&[(face(110.0, 100.0, 60.0), 1.0)], at(100));
    let (faces, _) = tr.predict(at(200));
    assert_eq!(faces.len(), 1);
    let cx = (faces[0].bbox.x0 + faces[0].bbox.x1) / 2.0;
    assert!((cx - 120.0).abs() < 0.5, "predicted centre {cx}");
    assert!(!faces[0].due);
    // And the next detection where the prediction said keeps the id.
    let (faces, _) = tr.update(&[(face(130.0, 100.0, 60.0), 1.0)], at(300));
    assert_eq!(faces[0].track, TrackId(1));
    assert_eq!(tr.clear(), vec![TrackEvent::Lost(TrackId(1))]);
}

/// Runs a steady face through a tracker at `fps` with arrival times jittered by up to
/// `jitter` (alternately early and late: up to a quarter frame each way keeps the cadence);
/// returns the frame indices where it was due.
fn due_frames(cfg: &TrackConfig, fps: f64, jitter: Duration, frames: usize) -> Vec<usize> {
    let mut tr = Tracker::new(cfg.clone(), fps);
    let t0 = Instant::now() + Duration::from_secs(1);
    let mut due = Vec::new();
    for i in 0..frames {
        let nominal = t0 + Duration::from_secs_f64(i as f64 / fps);
        let at = if i % 2 == 0 {
            nominal + jitter
        } else {
            nominal - jitter
        };
        let (faces, _) = tr.update(&[(face(200.0, 200.0, 80.0), 1.0)], at);
        if faces.first().is_some_and(|f| f.due) {
            due.push(i);
        }
    }
    due
}

#[test]
fn the_default_cadence_is_whole_frames_and_jitter_never_costs_a_frame() {
    let cfg = TrackConfig::default();
    // 500 ms at 5 fps is 2.5 frames: every third frame, born on frame 1.
    assert_eq!(cfg.frames_per_score(5.0), 3);
    for jitter_ms in [0, 20, 45] {
        let jitter = Duration::from_millis(jitter_ms);
        assert_eq!(
            due_frames(&cfg, 5.0, jitter, 14),
            vec![1, 4, 7, 10, 13],
            "jitter {jitter_ms} ms"
        );
    }
    // An exact multiple (1 s at 5 fps: 5 frames) with jitter: still every 5th frame.
    let one_s = TrackConfig {
        score_every: Duration::from_secs(1),
        ..cfg.clone()
    };
    assert_eq!(one_s.frames_per_score(5.0), 5);
    assert_eq!(
        due_frames(&one_s, 5.0, Duration::from_millis(40), 17),
        vec![1, 6, 11, 16]
    );
    // 2 fps: every frame (500 ms is one frame).
    assert_eq!(cfg.frames_per_score(2.0), 1);
    assert_eq!(due_frames(&cfg, 2.0, Duration::ZERO, 4), vec![1, 2, 3]);
}

#[test]
fn frames_per_score_is_whole_frames_whatever_the_full_search_cadence() {
    let cfg = TrackConfig {
        score_every: Duration::from_millis(300),
        detect_every: 3,
        ..TrackConfig::default()
    };
    // 300 ms at 5 fps is 1.5 -> 2 frames; between full searches, tracks are detected
    // around their predictions, so detect_every does not stretch it.
    assert_eq!(cfg.frames_per_score(5.0), 2);
    assert_eq!(cfg.frames_per_score(30.0), 9);
    let every_frame = TrackConfig {
        score_every: Duration::from_millis(100),
        ..TrackConfig::default()
    };
    assert_eq!(every_frame.frames_per_score(5.0), 1);
    assert_eq!(every_frame.frames_per_score(0.1), 1);
}
