use std::fs::OpenOptions;
use std::io::Write;

use proptest::prelude::*;

use super::record::{PUT_LEGACY, crc32};
use super::*;

fn limits(max_pending: usize) -> SpoolLimits {
    SpoolLimits {
        max_pending,
        ..SpoolLimits::default()
    }
}

const T0: u64 = 1_800_000_000_000;

fn keys(s: &Spool) -> Vec<String> {
    s.pending().map(|e| e.key.clone()).collect()
}

#[test]
fn pending_alerts_survive_a_reopen_and_acks_remove_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), limits(100)).unwrap();
    let a = s.append("A", AlertChange::New, T0, b"new A".to_vec()).seq();
    let b = s.append("B", AlertChange::New, T0, b"new B".to_vec()).seq();
    s.sync().unwrap();
    assert!(s.ack(a));
    assert!(!s.ack(a), "acked once");
    s.sync().unwrap();
    drop(s);
    let s = Spool::open(dir.path(), limits(100)).unwrap();
    let p: Vec<&Entry> = s.pending().collect();
    assert_eq!(p.len(), 1);
    assert_eq!(
        (
            p[0].key.as_str(),
            p[0].payload.as_slice(),
            p[0].seq,
            p[0].at_ms
        ),
        ("B", b"new B".as_slice(), b, T0)
    );
}

#[test]
fn unsynced_appends_are_not_on_disk_and_a_torn_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), limits(100)).unwrap();
    s.append("A", AlertChange::New, T0, b"kept".to_vec());
    s.sync().unwrap();
    s.append("B", AlertChange::New, T0, b"lost with the crash".to_vec());
    drop(s); // never synced: like a crash before the group commit
    // A crash mid-write: half a record at the end.
    let path = dir.path().join("spool.log");
    let mut torn = Vec::new();
    encode_put(&mut torn, 99, AlertChange::New, "C", T0, b"half written");
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(&torn[..torn.len() / 2]).unwrap();
    drop(f);
    let mut s = Spool::open(dir.path(), limits(100)).unwrap();
    assert_eq!(keys(&s), ["A"]);
    assert_eq!(s.stats().torn_bytes_dropped, (torn.len() / 2) as u64);
    assert_eq!(s.stats().damaged_regions, 0, "a torn tail is not damage");
    // New records go after the good prefix and replay fine.
    s.append("D", AlertChange::New, T0, b"after".to_vec());
    s.sync().unwrap();
    drop(s);
    let s = Spool::open(dir.path(), limits(100)).unwrap();
    assert_eq!(keys(&s), ["A", "D"]);
}

#[test]
fn one_damaged_record_in_the_middle_costs_only_that_record() {
    // One flipped byte in the second of four records used to truncate the three after it.
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), limits(100)).unwrap();
    for k in ["A", "B", "C", "D"] {
        s.append(k, AlertChange::New, T0, format!("alert {k}").into_bytes());
    }
    s.sync().unwrap();
    drop(s);
    let path = dir.path().join("spool.log");
    let mut data = std::fs::read(&path).unwrap();
    let one = data.len() / 4;
    data[one + one / 2] ^= 0x40;
    std::fs::write(&path, &data).unwrap();
    let mut s = Spool::open(dir.path(), limits(100)).unwrap();
    assert_eq!(keys(&s), ["A", "C", "D"]);
    let st = s.stats();
    assert_eq!(
        (st.damaged_regions, st.damaged_bytes_skipped),
        (1, one as u64)
    );
    // The damaged file is kept aside, and the live log rewritten clean.
    let kept: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("spool.log.damaged-")
        })
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(std::fs::read(kept[0].path()).unwrap(), data);
    s.append("E", AlertChange::New, T0, b"after the damage".to_vec());
    s.sync().unwrap();
    drop(s);
    let s = Spool::open(dir.path(), limits(100)).unwrap();
    assert_eq!(keys(&s), ["A", "C", "D", "E"]);
    assert_eq!(s.stats().damaged_regions, 0);
}

#[test]
fn a_write_the_disk_refuses_is_cut_back_and_loses_no_durable_alert() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), limits(100)).unwrap();
    s.append("A", AlertChange::New, T0, b"durable".to_vec());
    s.sync().unwrap();
    // ENOSPC after half of the next batch: the half record must not stay in the file.
    s.append(
        "B",
        AlertChange::New,
        T0,
        b"refused by a full disk".to_vec(),
    );
    s.log_mut().unwrap().fail_after = Some(10);
    let e = s.sync().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(28));
    // The disk takes writes again: a later alert, then the rewrite of everything pending.
    s.rewrite_all();
    s.buffer.clear();
    s.append("C", AlertChange::New, T0, b"later".to_vec());
    s.sync().unwrap();
    let snap = s.compaction_snapshot().expect("a rewrite is due");
    s.log_mut().unwrap().replace(&snap).unwrap();
    drop(s);
    let s = Spool::open(dir.path(), limits(100)).unwrap();
    assert_eq!(keys(&s), ["A", "B", "C"]);
    assert_eq!(
        s.stats().damaged_regions,
        0,
        "no partial record poisoned the log"
    );
    assert_eq!(s.stats().torn_bytes_dropped, 0);
}

#[test]
fn a_failed_compaction_leaves_the_old_log_and_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), limits(10_000)).unwrap();
    for i in 0..2000u64 {
        let seq = s
            .append(&format!("k{i}"), AlertChange::New, T0, vec![1; 50])
            .seq();
        if i % 100 != 0 {
            s.ack(seq);
        }
    }
    s.sync().unwrap();
    // The temporary file's name is taken by a directory: the compaction cannot write it.
    std::fs::create_dir(dir.path().join("spool.log.tmp")).unwrap();
    assert!(s.maybe_compact().is_err());
    std::fs::remove_dir(dir.path().join("spool.log.tmp")).unwrap();
    // It is due again at once, and succeeds now.
    assert!(s.maybe_compact().unwrap());
    assert!(!dir.path().join("spool.log.tmp").exists());
    drop(s);
    assert_eq!(Spool::open(dir.path(), limits(10_000)).unwrap().len(), 20);
}

#[test]
fn a_full_spool_coalesces_updates_but_never_drops_new_or_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), limits(3)).unwrap();
    s.append("A", AlertChange::New, T0, b"A new".to_vec());
    s.append("A", AlertChange::Update, T0, b"A update 1".to_vec());
    s.append("B", AlertChange::New, T0, b"B new".to_vec());
    // Full: A's next update replaces its older one.
    let r = s.append("A", AlertChange::Update, T0, b"A update 2".to_vec());
    assert!(
        matches!(r, Appended::Coalesced { replaced: 2, .. }),
        "{r:?}"
    );
    // New and end events are kept even past the bound.
    s.append("C", AlertChange::New, T0, b"C new".to_vec());
    s.append("B", AlertChange::End, T0, b"B end".to_vec());
    s.sync().unwrap();
    let payloads: Vec<Vec<u8>> = s.pending().map(|e| e.payload.clone()).collect();
    assert_eq!(
        payloads,
        vec![
            b"A new".to_vec(),
            b"B new".to_vec(),
            b"A update 2".to_vec(),
            b"C new".to_vec(),
            b"B end".to_vec()
        ]
    );
    assert_eq!(s.stats().coalesced, 1);
    drop(s);
    // The replacement is durable too.
    let s = Spool::open(dir.path(), limits(3)).unwrap();
    assert_eq!(s.len(), 5);
    assert!(s.pending().all(|e| e.payload != b"A update 1"));
}

#[test]
fn a_long_outage_stays_under_the_byte_cap_in_the_documented_order() {
    // 300 alerts of a broker outage: each a new, two updates and, for the even ones, an end.
    let dir = tempfile::tempdir().unwrap();
    let cap = SpoolLimits {
        max_pending: 1_000_000,
        max_bytes: 64 * 1024,
        max_age: Duration::from_secs(3600),
    };
    let mut s = Spool::open(dir.path(), cap).unwrap();
    let body = |k: &str, what: &str| format!("{k} {what} {}", "x".repeat(100)).into_bytes();
    let mut max_bytes = 0;
    for i in 0..300u64 {
        let k = format!("alert{i:03}");
        let t = T0 + i * 1000;
        s.append(&k, AlertChange::New, t, body(&k, "new"));
        s.append(&k, AlertChange::Update, t + 1, body(&k, "update 1"));
        s.append(&k, AlertChange::Update, t + 2, body(&k, "update 2"));
        if i % 2 == 0 {
            s.append(&k, AlertChange::End, t + 3, body(&k, "end"));
        }
        max_bytes = max_bytes.max(s.stats().bytes);
    }
    s.sync().unwrap();
    let st = s.stats();
    assert!(max_bytes <= cap.max_bytes, "{max_bytes}");
    // Updates went first, then whole ended alerts; the news of open alerts were kept as
    // long as anything else could go.
    assert_eq!(st.dropped_update, 600, "{st:?}");
    assert!(st.dropped_ended > 0, "{st:?}");
    let kinds: Vec<AlertChange> = s.pending().map(|e| e.kind).collect();
    assert!(!kinds.contains(&AlertChange::Update));
    // Every open (odd) alert's new is still there when ended alerts remain to drop.
    let left: Vec<String> = keys(&s);
    let open_kept = (0..300)
        .filter(|i| i % 2 == 1)
        .filter(|i| left.contains(&format!("alert{i:03}")))
        .count();
    if st.dropped_open_new == 0 {
        assert_eq!(open_kept, 150);
    }
    // An ended alert is never half dropped: its new goes with its end.
    for i in (0..300).step_by(2) {
        let k = format!("alert{i:03}");
        let n = s.pending().filter(|e| e.key == k).count();
        assert!(n == 0 || n == 2, "{k}: {n} entries");
    }
    // The age cap: an hour later, everything older goes.
    s.enforce_limits(T0 + 300 * 1000 + 3_700_000);
    assert!(s.is_empty());
    assert!(s.stats().dropped_age > 0);
    // All of it is durable: a reopen agrees.
    s.sync().unwrap();
    drop(s);
    assert!(Spool::open(dir.path(), cap).unwrap().is_empty());
}

#[test]
fn compaction_keeps_exactly_the_pending_entries() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), limits(10_000)).unwrap();
    for i in 0..2000u64 {
        let seq = s
            .append(&format!("k{i}"), AlertChange::New, T0, vec![i as u8; 100])
            .seq();
        if i % 100 != 0 {
            s.ack(seq);
        }
    }
    s.sync().unwrap();
    let size = || {
        std::fs::metadata(dir.path().join("spool.log"))
            .unwrap()
            .len()
    };
    let before = size();
    assert!(s.maybe_compact().unwrap());
    assert!(size() * 10 < before, "{before} -> {}", size());
    s.append("late", AlertChange::New, T0, b"x".to_vec());
    s.sync().unwrap();
    drop(s);
    let s = Spool::open(dir.path(), limits(10_000)).unwrap();
    assert_eq!(s.len(), 21);
    assert_eq!(s.pending().last().unwrap().key, "late");
}

#[test]
fn the_writer_thread_keeps_order_across_group_commits_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), limits(10_000)).unwrap();
    let log = s.detach_log().unwrap();
    assert!(s.sync().is_ok(), "nothing buffered: nothing to write");
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let (tx, thread) = spawn_writer(log, done_tx).unwrap();
    let mut batch = 0;
    let mut compacted = false;
    for i in 0..3000u64 {
        let seq = s
            .append(&format!("k{i}"), AlertChange::New, T0, vec![i as u8; 64])
            .seq();
        if i % 7 != 0 {
            s.ack(seq);
        }
        if i % 50 == 49 {
            batch += 1;
            tx.send(LogCommand::Write {
                batch,
                bytes: s.take_buffer(),
            })
            .unwrap();
            if let Some(snap) = s.compaction_snapshot() {
                compacted = true;
                tx.send(LogCommand::Compact(snap)).unwrap();
            }
        }
    }
    assert!(compacted, "3000 records, 6 in 7 acked: compaction is due");
    s.append(
        "late",
        AlertChange::New,
        T0,
        b"after the last compaction".to_vec(),
    );
    assert!(s.sync().is_err(), "the log is the writer's now");
    batch += 1;
    tx.send(LogCommand::Write {
        batch,
        bytes: s.take_buffer(),
    })
    .unwrap();
    drop(tx);
    thread.join().unwrap();
    let mut through = 0;
    while let Ok(d) = done_rx.try_recv() {
        match d {
            LogDone::Written { through: t, result } => {
                result.unwrap();
                assert!(t > through, "settled in order");
                through = t;
            }
            LogDone::Compacted { result } => result.unwrap(),
        }
    }
    assert_eq!(through, batch, "every batch settled");
    let reopened = Spool::open(dir.path(), limits(10_000)).unwrap();
    let mut want: Vec<String> = (0..3000)
        .filter(|i| i % 7 == 0)
        .map(|i| format!("k{i}"))
        .collect();
    want.push("late".into());
    assert_eq!(keys(&reopened), want);
}

#[test]
fn logs_of_the_previous_version_replay() {
    // Records without a time (kinds 1 and 3), as the previous version wrote them.
    let dir = tempfile::tempdir().unwrap();
    let mut data = Vec::new();
    for (seq, kind, key) in [(1u64, PUT_LEGACY, "A"), (2, 3u8, "A")] {
        let seq_b = seq.to_le_bytes();
        let klen = 1u16.to_le_bytes();
        let payload = b"old";
        let crc = crc32(&[&seq_b, &[kind], &klen, key.as_bytes(), payload]);
        data.extend_from_slice(&((11 + 1 + payload.len()) as u32).to_le_bytes());
        data.extend_from_slice(&crc.to_le_bytes());
        data.extend_from_slice(&seq_b);
        data.push(kind);
        data.extend_from_slice(&klen);
        data.extend_from_slice(key.as_bytes());
        data.extend_from_slice(payload);
    }
    std::fs::write(dir.path().join("spool.log"), &data).unwrap();
    let s = Spool::open(dir.path(), limits(100)).unwrap();
    let kinds: Vec<AlertChange> = s.pending().map(|e| e.kind).collect();
    assert_eq!(kinds, [AlertChange::New, AlertChange::Update]);
}

#[test]
fn crc_matches_the_standard_check_value() {
    assert_eq!(crc32(&[b"123456789"]), 0xCBF4_3926);
    assert_eq!(crc32(&[b"1234", b"56789"]), 0xCBF4_3926);
}

/// A log of `n` puts (some acked), as bytes, and the keys pending at its end.
fn written_log(n: usize, ack_every: usize) -> (Vec<u8>, Vec<(u64, String)>) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), limits(1_000_000)).unwrap();
    for i in 0..n {
        let seq = s
            .append(
                &format!("key{i}"),
                AlertChange::New,
                T0,
                format!("payload {i}").into_bytes(),
            )
            .seq();
        if ack_every > 0 && i % ack_every == 0 {
            s.ack(seq);
        }
    }
    s.sync().unwrap();
    let pending = s.pending().map(|e| (e.seq, e.key.clone())).collect();
    (
        std::fs::read(dir.path().join("spool.log")).unwrap(),
        pending,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, .. ProptestConfig::default() })]

    /// Random damage anywhere (flipped bytes in one region): every record whose bytes the
    /// damage did not touch is recovered, before and after it, and the reopened spool is
    /// consistent with the undamaged one on those records.
    #[test]
    fn every_intact_record_survives_damage_anywhere(
        n in 2usize..40,
        start_frac in 0.0f64..1.0,
        len in 1usize..64,
        xor in 1u8..=255,
    ) {
        let (data, _) = written_log(n, 0);
        let start = ((data.len() as f64) * start_frac) as usize;
        let end = (start + len).min(data.len());
        let mut damaged = data.clone();
        for b in &mut damaged[start..end] {
            *b ^= xor;
        }
        // Which records the damage touched, from the clean log's layout.
        let clean = decode(&data);
        let mut bounds = Vec::new();
        let mut pos = 0;
        for _ in &clean.records {
            let l = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap()) as usize + 8;
            bounds.push((pos, pos + l));
            pos += l;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("spool.log"), &damaged).unwrap();
        let s = Spool::open(dir.path(), limits(1_000_000)).unwrap();
        let got: std::collections::BTreeSet<String> = keys(&s).into_iter().collect();
        for (i, (a, b)) in bounds.iter().enumerate() {
            let touched = *a < end && start < *b;
            if !touched {
                prop_assert!(got.contains(&format!("key{i}")), "record {i} lost; damage {start}..{end}");
            }
        }
        // Nothing is invented: every key recovered was written.
        for k in &got {
            prop_assert!(k.starts_with("key"));
        }
    }

    /// Truncation at any byte (a crash mid-write, a full disk): exactly the whole records
    /// before the cut come back, acks included.
    #[test]
    fn truncation_at_any_byte_keeps_the_whole_records_before_it(
        n in 1usize..30,
        ack_every in 0usize..4,
        cut_frac in 0.0f64..=1.0,
    ) {
        let (data, _) = written_log(n, ack_every);
        let cut = ((data.len() as f64) * cut_frac) as usize;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("spool.log"), &data[..cut]).unwrap();
        let s = Spool::open(dir.path(), limits(1_000_000)).unwrap();
        // The reference: replaying the whole records before the cut.
        let whole = decode(&data[..cut]);
        let mut want = BTreeMap::new();
        for r in whole.records {
            match r {
                Record::Put { seq, key, .. } => { want.insert(seq, key); }
                Record::Ack { seq } => { want.remove(&seq); }
                Record::SinkAck { .. } => {}
            }
        }
        let got: BTreeMap<u64, String> = s.pending().map(|e| (e.seq, e.key.clone())).collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(s.stats().damaged_regions, 0);
    }
}

/// A sink's acknowledgement keeps the entry for the other sinks, and survives a reopen and a
/// compaction, so a restart does not send it to that sink again.
#[test]
fn a_sinks_acknowledgement_survives_a_reopen_and_a_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), limits(100)).unwrap();
    let a = s.append("A", AlertChange::New, T0, b"new A".to_vec()).seq();
    let b = s.append("B", AlertChange::New, T0, b"new B".to_vec()).seq();
    assert!(s.sink_ack(a, "mqtt"));
    assert!(!s.sink_ack(a, "mqtt"), "once per sink");
    assert!(!s.sink_ack(999, "mqtt"), "not pending");
    assert!(!s.sink_ack(b, ""), "a sink has a name");
    s.sync().unwrap();
    drop(s);
    let mut s = Spool::open(dir.path(), limits(100)).unwrap();
    assert_eq!(s.get(a).unwrap().acked_by, ["mqtt"]);
    assert!(s.get(b).unwrap().acked_by.is_empty());
    // Rewritten from the pending set: the sink's copy is written with its entry.
    s.rewrite_all();
    assert!(s.maybe_compact().unwrap(), "compacted");
    drop(s);
    let s = Spool::open(dir.path(), limits(100)).unwrap();
    assert_eq!(s.get(a).unwrap().acked_by, ["mqtt"]);
    assert_eq!(s.len(), 2, "a sink's copy leaves the entry pending");
}
