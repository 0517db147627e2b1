use super::*;
use crate::score::Level;

fn levels() -> Vec<Level> {
    crate::score::LabelGraph::ffpp()
        .nodes()
        .iter()
        .map(|n| n.level)
        .collect()
}

fn obs(stream: &StreamId, track: u64, t0: Instant, ms: u64, logit: f64, q: f32) -> Observation {
    let mut marginals = vec![0.1; 10];
    marginals[0] = sigmoid(logit);
    marginals[2] = 0.9; // identity
    marginals[7] = 0.8; // mouth
    Observation {
        stream: stream.clone(),
        track: TrackId(track),
        at: t0 + Duration::from_millis(ms),
        capture_time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_000 + ms),
        pts: Some(Duration::from_millis(ms)),
        bbox: BBox {
            x0: 10.0,
            y0: 10.0,
            x1: 90.0,
            y1: 90.0,
        },
        logit_q0: logit,
        marginals,
        quality: q,
    }
}

/// Feeds `seconds` of 5 Hz scores from `logit(t_ms)`; returns every event.
fn run(ev: &mut Evidence, seconds: u64, logit: impl Fn(u64) -> f64) -> Vec<(u64, AlertEvent)> {
    let s = StreamId::new("cam").unwrap();
    let t0 = Instant::now();
    let mut out = Vec::new();
    let mut ids = UlidGenerator::with_seed(1);
    for ms in (0..seconds * 1000).step_by(200) {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_000 + ms);
        if let Some(e) = ev.observe(obs(&s, 1, t0, ms, logit(ms), 0.8), wall, &mut ids) {
            out.push((ms, e));
        }
    }
    out
}

fn kinds(events: &[(u64, AlertEvent)]) -> Vec<AlertKind> {
    events.iter().map(|(_, e)| e.kind).collect()
}

#[test]
fn a_constantly_real_face_stays_silent_and_is_called_real() {
    let mut ev = Evidence::new(EvidenceConfig::default(), levels());
    let events = run(&mut ev, 30, |_| -4.0);
    assert!(events.is_empty(), "{events:?}");
    let s = StreamId::new("cam").unwrap();
    assert_eq!(ev.verdict(&s, TrackId(1)), Some(Verdict::Real));
}

#[test]
fn a_constantly_fake_face_raises_exactly_one_alert() {
    let mut ev = Evidence::new(EvidenceConfig::default(), levels());
    let events = run(&mut ev, 30, |_| 5.0);
    assert_eq!(
        kinds(&events),
        vec![AlertKind::New],
        "nothing changed, so no update"
    );
    let (at, e) = &events[0];
    // Not before min_frames and min_duration (1 s).
    assert!(*at >= 1000, "{at}");
    assert_eq!(e.verdict, Verdict::Fake);
    assert!((e.logit - 5.0).abs() < 1e-9 && e.score > 0.99);
    assert_eq!(e.threshold, 2.0);
    // The explanation averages the window's marginals: identity and mouth lead.
    assert!((e.mean_marginals[2] - 0.9).abs() < 1e-9);
    assert_eq!(e.top_frames.len(), 3);
    assert_eq!(e.alert_id.timestamp_ms(), 1_800_000_000_000 + at);
}

#[test]
fn an_onset_mid_stream_alerts_within_the_window() {
    let cfg = EvidenceConfig::default();
    let mut ev = Evidence::new(cfg.clone(), levels());
    let onset = 10_000;
    let events = run(&mut ev, 30, |ms| if ms < onset { -3.0 } else { 4.0 });
    // One alert, perhaps updated as the window fills with fake frames; never ended.
    assert_eq!(events[0].1.kind, AlertKind::New);
    assert!(
        events[1..].iter().all(|(_, e)| e.kind == AlertKind::Update),
        "{:?}",
        kinds(&events)
    );
    let delay = Duration::from_millis(events[0].0 - onset);
    // Stated bound: one window plus one scoring period.
    assert!(
        delay <= cfg.window + Duration::from_millis(200),
        "{delay:?}"
    );
    assert!(
        delay >= Duration::from_millis(600),
        "a single fake frame must not alert"
    );
}

#[test]
fn a_score_flickering_around_the_threshold_does_not_flap() {
    let mut ev = Evidence::new(EvidenceConfig::default(), levels());
    // Alternates 1.2 / 2.8 (mean 2.0, the enter threshold) with noise.
    let events = run(&mut ev, 60, |ms| {
        let k = ms / 200;
        (if k % 2 == 0 { 1.2 } else { 2.8 }) + ((k * 7919 % 13) as f64 - 6.0) * 0.05
    });
    let news = events
        .iter()
        .filter(|(_, e)| e.kind == AlertKind::New)
        .count();
    let ends = events
        .iter()
        .filter(|(_, e)| matches!(e.kind, AlertKind::End { .. }))
        .count();
    assert!(news <= 1 && ends == 0, "{:?}", kinds(&events));
}

#[test]
fn single_outliers_are_trimmed_away() {
    let mut ev = Evidence::new(EvidenceConfig::default(), levels());
    // Real, with one absurdly confident fake frame per second (a 20% glitch rate, from the
    // very first frame): clipping and trimming keep it silent.
    let events = run(&mut ev, 20, |ms| if ms % 1000 == 0 { 40.0 } else { -3.0 });
    assert!(events.is_empty(), "{events:?}");
}

#[test]
fn clearing_and_losing_the_track_end_the_alert() {
    let mut ev = Evidence::new(EvidenceConfig::default(), levels());
    let events = run(&mut ev, 20, |ms| if ms < 8000 { 4.0 } else { -3.0 });
    let k = kinds(&events);
    assert_eq!(k.first(), Some(&AlertKind::New));
    assert_eq!(
        k.last(),
        Some(&AlertKind::End {
            reason: EndReason::Cleared
        })
    );
    assert!(
        k[1..k.len() - 1].iter().all(|e| *e == AlertKind::Update),
        "{k:?}"
    );
    assert!(
        events
            .iter()
            .all(|(_, e)| e.alert_id == events[0].1.alert_id)
    );
    // Fake again, then the face leaves.
    let mut ev = Evidence::new(EvidenceConfig::default(), levels());
    let events = run(&mut ev, 5, |_| 4.0);
    assert_eq!(kinds(&events), vec![AlertKind::New]);
    let s = StreamId::new("cam").unwrap();
    let end = ev.track_lost(&s, TrackId(1)).expect("an end event");
    assert_eq!(
        end.kind,
        AlertKind::End {
            reason: EndReason::TrackLost
        }
    );
    assert_eq!(end.alert_id, events[0].1.alert_id);
    assert!(ev.track_lost(&s, TrackId(1)).is_none(), "ended once");
}

#[test]
fn q0_rounding_to_one_does_not_break_the_rule() {
    let mut ev = Evidence::new(EvidenceConfig::default(), levels());
    // logit 60: q0 is exactly 1.0 in f64, the logit is not.
    assert_eq!(sigmoid(60.0), 1.0);
    let events = run(&mut ev, 10, |ms| if ms < 5000 { 60.0 } else { 80.0 });
    assert_eq!(events[0].1.kind, AlertKind::New);
    assert!(events.iter().all(|(_, e)| e.logit.is_finite()));
}

#[test]
fn updates_come_at_most_every_period_and_only_on_change() {
    let cfg = EvidenceConfig::default();
    let mut ev = Evidence::new(cfg.clone(), levels());
    // Fake throughout, and the evidence keeps moving (slowly, inside the clip range).
    let events = run(&mut ev, 30, |ms| 4.5 + 3.0 * (ms as f64 / 2000.0).sin());
    assert_eq!(events[0].1.kind, AlertKind::New);
    let updates: Vec<u64> = events
        .iter()
        .filter(|(_, e)| e.kind == AlertKind::Update)
        .map(|(t, _)| *t)
        .collect();
    assert!(updates.len() >= 3, "{updates:?}");
    assert!(
        !events
            .iter()
            .any(|(_, e)| matches!(e.kind, AlertKind::End { .. }))
    );
    let mut last = events[0].0;
    for t in updates {
        assert!(
            Duration::from_millis(t - last) >= cfg.update_every,
            "{t} after {last}"
        );
        last = t;
    }
}

#[test]
fn low_quality_faces_are_skipped_and_counted() {
    let mut ev = Evidence::new(EvidenceConfig::default(), levels());
    let s = StreamId::new("cam").unwrap();
    let t0 = Instant::now();
    let wall = SystemTime::now();
    let mut first = None;
    let mut ids = UlidGenerator::with_seed(1);
    for i in 0..50u64 {
        // Every other face is blurred/tiny (weight 0.05) and looks fake: it must not count.
        let (logit, q) = if i % 2 == 0 { (6.0, 0.05) } else { (-3.0, 0.9) };
        if let Some(e) = ev.observe(obs(&s, 7, t0, i * 100, logit, q), wall, &mut ids) {
            first.get_or_insert(e);
        }
    }
    assert!(first.is_none(), "{first:?}");
    assert_eq!(ev.verdict(&s, TrackId(7)), Some(Verdict::Real));
}

#[test]
fn a_model_swap_ends_every_open_alert() {
    let mut ev = Evidence::new(EvidenceConfig::default(), levels());
    let a = StreamId::new("a").unwrap();
    let b = StreamId::new("b").unwrap();
    let t0 = Instant::now();
    let wall = SystemTime::now();
    let mut ids = UlidGenerator::with_seed(1);
    for i in 0..20u64 {
        for (s, track) in [(&a, 1), (&b, 2), (&b, 3)] {
            let logit = if track == 3 { -3.0 } else { 5.0 };
            ev.observe(obs(s, track, t0, i * 200, logit, 0.9), wall, &mut ids);
        }
    }
    let ends = ev.end_all(None, EndReason::ModelSwapped);
    assert_eq!(ends.len(), 2, "only the two fake tracks had alerts");
    assert!(ends.iter().all(|e| e.kind
        == AlertKind::End {
            reason: EndReason::ModelSwapped
        }));
    assert!(ev.end_all(None, EndReason::ModelSwapped).is_empty());
}

#[test]
fn trimmed_mean_cuts_weight_from_both_ends() {
    let v: Vec<(f64, f64)> = [1.0, 2.0, 3.0, 4.0, 100.0]
        .iter()
        .map(|x| (*x, 1.0))
        .collect();
    assert!((trimmed_mean(&v, 0.2).unwrap() - 3.0).abs() < 1e-12);
    assert!((trimmed_mean(&v, 0.0).unwrap() - 22.0).abs() < 1e-12);
    // Weights: a heavy middle value dominates.
    let w = [(0.0, 1.0), (10.0, 8.0), (20.0, 1.0)];
    assert!((trimmed_mean(&w, 0.1).unwrap() - 10.0).abs() < 1e-12);
    assert_eq!(trimmed_mean(&[], 0.2), None);
}
