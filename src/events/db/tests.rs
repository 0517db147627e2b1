use super::*;

fn limits() -> Limits {
    Limits {
        max_age: Duration::from_secs(3600),
        max_events: 1000,
        max_media_bytes: 10_000,
        ..Limits::default()
    }
}

fn payload(id: &str, kind: &str, verdict: &str, score: f64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "alert_id": id, "type": kind, "verdict": verdict, "score": score,
        "end_reason": if kind == "end" { Some("cleared") } else { None },
        "explanation": {"sentence": format!("{verdict} at {score}")},
    }))
    .unwrap()
}

/// What the decision stage types beside [`payload`].
fn facts(kind: &str, verdict: &'static str, score: f64) -> Facts {
    Facts {
        verdict,
        score,
        sentence: format!("{verdict} at {score}"),
        end_reason: (kind == "end").then_some("cleared"),
    }
}

/// Time-ordered ids as the ULID generator makes them (same length, later sorts higher).
fn id(n: u32) -> String {
    format!("01J{n:023}")
}

fn record(db: &mut Db, n: u32, change: Change, stream: &str, at: SystemTime) -> EventSummary {
    let kind = change.as_str();
    db.record(&Record {
        alert_id: &id(n),
        change,
        stream,
        track: u64::from(n),
        at,
        payload: &payload(&id(n), kind, "fake", 0.9),
        facts: &facts(kind, "fake", 0.9),
    })
    .unwrap()
    .unwrap()
}

#[test]
fn a_lifecycle_is_kept_in_order_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let t = SystemTime::now();
    {
        let (mut db, reset) = Db::open(&path, limits()).unwrap();
        assert!(reset.is_none());
        let s = record(&mut db, 1, Change::New, "cam", t);
        assert_eq!(s.state, "open");
        assert_eq!(s.verdict, "fake");
        record(&mut db, 1, Change::Update, "cam", t);
        let end = db
            .record(&Record {
                alert_id: &id(1),
                change: Change::End,
                stream: "cam",
                track: 1,
                at: t,
                payload: &payload(&id(1), "end", "real", 0.2),
                facts: &facts("end", "real", 0.2),
            })
            .unwrap()
            .unwrap();
        assert_eq!(end.state, "ended");
        assert_eq!(end.end_reason.as_deref(), Some("cleared"));
        assert_eq!(end.verdict, "real");
        assert!((end.max_score - 0.9).abs() < 1e-9, "{end:?}");
        record(&mut db, 2, Change::New, "cam", t);
    }
    // Reopened: everything committed is there; the alert the previous run left open is
    // marked interrupted, not left pretending to be live.
    let (db, _) = Db::open(&path, limits()).unwrap();
    let steps: Vec<String> = db
        .lifecycle(&id(1))
        .unwrap()
        .into_iter()
        .map(|s| s.0)
        .collect();
    assert_eq!(steps, ["new", "update", "end"]);
    assert_eq!(db.get(&id(1)).unwrap().unwrap().state, "ended");
    assert_eq!(db.get(&id(2)).unwrap().unwrap().state, "interrupted");
    assert_eq!(db.events(), 2);
    // Private: the file holds evidence media.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn paging_is_newest_first_and_stable_while_events_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, _) = Db::open(&dir.path().join("e.db"), limits()).unwrap();
    let t = SystemTime::now();
    for n in 1..=10 {
        record(
            &mut db,
            n,
            Change::New,
            if n % 2 == 0 { "a" } else { "b" },
            t,
        );
    }
    let mut f = Filter {
        limit: 4,
        ..Filter::default()
    };
    let (page1, next) = db.list(&f).unwrap();
    let ids: Vec<_> = page1.iter().map(|e| e.alert_id.clone()).collect();
    assert_eq!(ids, [id(10), id(9), id(8), id(7)]);
    // New events arrive between pages: the next page goes on where the first stopped.
    for n in 11..=13 {
        record(&mut db, n, Change::New, "a", t);
    }
    f.before = next;
    let (page2, next) = db.list(&f).unwrap();
    let ids: Vec<_> = page2.iter().map(|e| e.alert_id.clone()).collect();
    assert_eq!(ids, [id(6), id(5), id(4), id(3)]);
    f.before = next;
    let (page3, next) = db.list(&f).unwrap();
    assert_eq!(page3.len(), 2);
    assert!(next.is_none());
    // Filters.
    let (only_a, _) = db
        .list(&Filter {
            stream: Some("a".into()),
            limit: 100,
            ..Filter::default()
        })
        .unwrap();
    assert!(only_a.iter().all(|e| e.stream == "a"));
    assert_eq!(only_a.len(), 8);
    let (none, _) = db
        .list(&Filter {
            verdict: Some("real".into()),
            limit: 100,
            ..Filter::default()
        })
        .unwrap();
    assert!(none.is_empty());
    let ms = unix_ms(t);
    let (later, _) = db
        .list(&Filter {
            since_ms: Some(ms + 1),
            limit: 100,
            ..Filter::default()
        })
        .unwrap();
    assert!(later.is_empty());
    let (all, _) = db
        .list(&Filter {
            since_ms: Some(ms),
            until_ms: Some(ms + 1),
            limit: 100,
            ..Filter::default()
        })
        .unwrap();
    assert_eq!(all.len(), 13);
}

#[test]
fn media_retention_removes_the_oldest_first_and_never_passes_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, _) = Db::open(&dir.path().join("e.db"), limits()).unwrap();
    let t = SystemTime::now();
    for n in 1..=20 {
        record(&mut db, n, Change::New, "cam", t);
        assert!(
            db.put_media(&id(n), MediaKind::Snapshot, &vec![n as u8; 1500])
                .unwrap()
        );
        assert!(db.media_bytes() <= 10_000, "{}", db.media_bytes());
    }
    // 6 snapshots of 1500 bytes fit in 10,000: the newest six are kept, the oldest went
    // first; the events themselves stay.
    assert_eq!(db.media_bytes(), 9000);
    for n in 1..=14 {
        assert!(
            db.media(&id(n), MediaKind::Snapshot).unwrap().is_none(),
            "{n}"
        );
        assert!(db.get(&id(n)).unwrap().is_some());
    }
    for n in 15..=20 {
        assert_eq!(
            db.media(&id(n), MediaKind::Snapshot).unwrap().unwrap(),
            vec![n as u8; 1500]
        );
        assert!(db.get(&id(n)).unwrap().unwrap().has_snapshot);
    }
    assert_eq!(db.pruned.media, 14);
    // Replacing an event's snapshot counts its old size once.
    assert!(
        db.put_media(&id(20), MediaKind::Snapshot, &[1; 100])
            .unwrap()
    );
    assert_eq!(db.media_bytes(), 7600);
    // One item larger than the cap is refused and counted, nothing else is touched.
    assert!(
        !db.put_media(&id(19), MediaKind::Face, &vec![0; 10_001])
            .unwrap()
    );
    assert_eq!(db.pruned.media_too_large, 1);
    assert_eq!(db.media_bytes(), 7600);
    // Media of an event that is gone is not stored.
    assert!(!db.put_media(&id(99), MediaKind::Face, &[0; 10]).unwrap());
    // Deleting an event takes its media with it.
    assert!(db.delete(&id(20)).unwrap());
    assert!(!db.delete(&id(20)).unwrap());
    assert_eq!(db.media_bytes(), 7500);
    assert!(db.lifecycle(&id(20)).unwrap().is_empty());
    // The total is what is on disk after a reopen.
    let path = db.path().to_path_buf();
    drop(db);
    let (db, _) = Db::open(&path, limits()).unwrap();
    assert_eq!(db.media_bytes(), 7500);
}

#[test]
fn age_and_count_retention_delete_the_oldest_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = limits();
    l.max_events = 5;
    let (mut db, _) = Db::open(&dir.path().join("e.db"), l).unwrap();
    let now = SystemTime::now();
    let old = now - Duration::from_secs(7200);
    for n in 1..=3 {
        record(&mut db, n, Change::New, "cam", old);
    }
    for n in 4..=7 {
        record(&mut db, n, Change::New, "cam", now);
    }
    // Seven events, five kept: the two oldest went as the sixth and seventh arrived.
    assert_eq!(db.events(), 5);
    assert_eq!(db.pruned.count, 2);
    assert!(db.get(&id(1)).unwrap().is_none());
    assert!(db.get(&id(2)).unwrap().is_none());
    // Event 3 is older than max_age (one hour): the sweep deletes it, not the fresh ones.
    assert_eq!(db.sweep(now).unwrap(), 1);
    assert!(db.get(&id(3)).unwrap().is_none());
    assert_eq!(db.events(), 4);
    assert_eq!(db.pruned.age, 1);
    // An update keeps an old event alive.
    record(
        &mut db,
        4,
        Change::Update,
        "cam",
        now + Duration::from_secs(3000),
    );
    assert_eq!(db.sweep(now + Duration::from_secs(3700)).unwrap(), 3);
    assert!(db.get(&id(4)).unwrap().is_some());
}

#[test]
fn a_long_alert_keeps_its_latest_updates() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, _) = Db::open(&dir.path().join("e.db"), limits()).unwrap();
    let t = SystemTime::now();
    let keep = limits().max_updates;
    assert_eq!(keep, 32, "the default bound on rows per event");
    record(&mut db, 1, Change::New, "cam", t);
    for _ in 0..(keep + 10) {
        record(&mut db, 1, Change::Update, "cam", t);
    }
    record(&mut db, 1, Change::End, "cam", t);
    let steps = db.lifecycle(&id(1)).unwrap();
    assert_eq!(steps.len() as u64, keep + 2);
    assert_eq!(steps.first().unwrap().0, "new");
    assert_eq!(steps.last().unwrap().0, "end");
    assert_eq!(db.pruned.updates, 10);
}

/// The database's own size is capped like the media: 2000 events with big lifecycles in a
/// 16 MiB cap never leave it over the cap after a write, the oldest events going first
/// (counted), the newest kept.
#[test]
fn the_database_never_stays_past_its_size_cap() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 16u64 << 20;
    let limits = Limits {
        max_events: 1_000_000,
        max_media_bytes: 1 << 20,
        max_db_bytes: cap,
        ..limits()
    };
    let (mut db, _) = Db::open(&dir.path().join("e.db"), limits).unwrap();
    let t = SystemTime::now();
    let big = "x".repeat(4000);
    for n in 0..2000u32 {
        let p = serde_json::to_vec(&serde_json::json!({
            "alert_id": id(n), "type": "new", "verdict": "fake", "score": 0.9,
            "explanation": {"sentence": big},
        }))
        .unwrap();
        for change in [Change::New, Change::Update, Change::End] {
            db.record(&Record {
                alert_id: &id(n),
                change,
                stream: "cam",
                track: 1,
                at: t,
                payload: &p,
                facts: &facts(change.as_str(), "fake", 0.9),
            })
            .unwrap();
        }
        assert!(
            db.db_bytes().unwrap() <= cap,
            "over the cap after event {n}"
        );
    }
    assert!(db.pruned.size > 0, "the cap removed events");
    assert!(db.get(&id(1999)).unwrap().is_some(), "the newest is kept");
    assert!(db.get(&id(0)).unwrap().is_none(), "the oldest went first");
    assert_eq!(db.events() + db.pruned.size, 2000);
}

#[test]
fn reviews_are_kept_and_bump_the_change_counter() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, _) = Db::open(&dir.path().join("e.db"), limits()).unwrap();
    let t = SystemTime::now();
    let s = record(&mut db, 1, Change::New, "cam", t);
    let r = db
        .review(&id(1), Review::FalseAlarm, Some("a known presenter"), t)
        .unwrap()
        .unwrap();
    assert_eq!(r.review, Some(Review::FalseAlarm));
    assert_eq!(r.review_note.as_deref(), Some("a known presenter"));
    assert!(r.seq > s.seq);
    assert!(
        db.review(&id(2), Review::Confirmed, None, t)
            .unwrap()
            .is_none()
    );
    let changed = db.changed_since(s.seq, 10).unwrap();
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].review, Some(Review::FalseAlarm));
    assert!(db.changed_since(r.seq, 10).unwrap().is_empty());
}

#[test]
fn a_corrupt_database_is_moved_aside_and_a_fresh_one_started() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let (mut db, reset) = Db::open(&path, limits()).unwrap();
    let why = reset.expect("the damage is reported");
    assert!(why.contains("corrupt"), "{why}");
    record(&mut db, 1, Change::New, "cam", SystemTime::now());
    let aside: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("events.db.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        std::fs::read(dir.path().join(&aside[0])).unwrap(),
        vec![0x5a; 8192],
        "the damaged file is kept for a look"
    );
    // A database damaged while open: the running store replaces it too.
    drop(db);
    let mut bytes = std::fs::read(&path).unwrap();
    for b in bytes.iter_mut().skip(100) {
        *b = 0xff;
    }
    std::fs::write(&path, &bytes).unwrap();
    let (db, reset) = Db::open(&path, limits()).unwrap();
    assert!(reset.is_some());
    assert_eq!(db.events(), 0);
}

#[test]
fn a_symlink_is_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("elsewhere.db");
    std::fs::write(&target, b"").unwrap();
    let link = dir.path().join("events.db");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let err = Db::open(&link, limits()).err().unwrap().to_string();
    assert!(err.contains("symbolic link"), "{err}");
}
