//! The durable spool: every alert is on disk before it is published, and leaves only when the
//! broker acknowledged it.
//!
//! An append-only log of records `[len u32][crc32 u32][seq u64][kind u8][key len u16][key]
//! [payload]`, little-endian, where `kind` is 1 (put), 3 (put of an update) or 2 (ack) and
//! `key` is the alert id.
//! [`Spool::append`] only buffers; [`Spool::sync`] writes and fsyncs everything buffered in
//! one go (group commit), so a burst of alerts costs one fsync. The file itself is a
//! [`SpoolLog`], which a caller can detach and drive from a thread of its own
//! ([`spawn_writer`]): the publisher does, so fsyncs never stall its network side and the
//! alerts that arrive during one fsync form the next group. On open the log is replayed:
//! puts without an ack are pending again; a torn last record (a crash mid-write) fails its
//! CRC and is cut off. When the log holds mostly acknowledged records it is rewritten with
//! only the pending ones (write, fsync, rename, fsync the directory).
//!
//! Bounded: past `max_pending`, a new update of an alert replaces that alert's older pending
//! update (coalescing); new and end events are always kept. The spool also remembers the
//! last `history` payloads for the HTTP API.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

const PUT: u8 = 1;
const ACK: u8 = 2;
/// A put of an update (which may be coalesced).
const PUT_UPDATE: u8 = 3;
const HEADER: usize = 4 + 4 + 8 + 1 + 2;
/// Largest record accepted on replay (a corrupt length must not allocate gigabytes).
const MAX_RECORD: usize = 16 << 20;

/// CRC-32 (IEEE) over the parts in order.
fn crc32(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

/// A pending entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    /// The alert id the payload belongs to.
    pub key: String,
    /// Whether it is an update (may be coalesced) rather than new/end.
    pub coalescible: bool,
    pub payload: Vec<u8>,
}

/// What [`Spool::append`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Stored(u64),
    /// Stored, replacing the older pending update `replaced` of the same alert.
    Coalesced {
        seq: u64,
        replaced: u64,
    },
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    pub pending: usize,
    pub appended: u64,
    pub acked: u64,
    pub coalesced: u64,
    pub torn_bytes_dropped: u64,
    pub compactions: u64,
}

/// The log file of a spool: appends made durable, and compaction by atomic replacement.
#[derive(Debug)]
pub struct SpoolLog {
    dir: PathBuf,
    file: File,
}

impl SpoolLog {
    /// Appends `bytes` (encoded records) and fsyncs.
    pub fn write_durably(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.file.write_all(bytes)?;
        self.file.sync_data()
    }

    /// Replaces the whole log with `snapshot` (write, fsync, rename, fsync the directory).
    pub fn replace(&mut self, snapshot: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join("spool.log.tmp");
        let path = self.dir.join("spool.log");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(snapshot)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        sync_dir(&self.dir)?;
        self.file = OpenOptions::new().append(true).open(&path)?;
        Ok(())
    }
}

/// The spool in one directory.
#[derive(Debug)]
pub struct Spool {
    /// None once detached ([`Spool::detach_log`]).
    log: Option<SpoolLog>,
    next_seq: u64,
    pending: BTreeMap<u64, Entry>,
    buffer: Vec<u8>,
    log_records: usize,
    max_pending: usize,
    history: VecDeque<Vec<u8>>,
    history_len: usize,
    stats: SpoolStats,
}

fn encode(out: &mut Vec<u8>, seq: u64, kind: u8, key: &str, payload: &[u8]) {
    let key = key.as_bytes();
    let body_len = 8 + 1 + 2 + key.len() + payload.len();
    let seq_b = seq.to_le_bytes();
    let klen = (key.len() as u16).to_le_bytes();
    let crc = crc32(&[&seq_b, &[kind], &klen, key, payload]);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&seq_b);
    out.push(kind);
    out.extend_from_slice(&klen);
    out.extend_from_slice(key);
    out.extend_from_slice(payload);
}

/// One record as read back: sequence number, kind, key, payload.
type Record = (u64, u8, String, Vec<u8>);

/// Parses records from `data`; returns them and the length of the valid prefix.
fn decode(data: &[u8]) -> (Vec<Record>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while data.len() - pos >= HEADER {
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().expect("4 bytes"));
        if !(11..=MAX_RECORD).contains(&len) || data.len() - pos - 8 < len {
            break;
        }
        let body = &data[pos + 8..pos + 8 + len];
        let seq_b = &body[..8];
        let kind = body[8];
        let klen = u16::from_le_bytes([body[9], body[10]]) as usize;
        if 11 + klen > len {
            break;
        }
        let key = &body[11..11 + klen];
        let payload = &body[11 + klen..];
        if crc32(&[seq_b, &[kind], &body[9..11], key, payload]) != crc
            || !matches!(kind, PUT | ACK | PUT_UPDATE)
        {
            break;
        }
        let seq = u64::from_le_bytes(seq_b.try_into().expect("8 bytes"));
        out.push((
            seq,
            kind,
            String::from_utf8_lossy(key).into_owned(),
            payload.to_vec(),
        ));
        pos += 8 + len;
    }
    (out, pos)
}

/// Keeps the last `len` payloads.
fn remember(history: &mut VecDeque<Vec<u8>>, len: usize, payload: &[u8]) {
    if len > 0 {
        history.push_back(payload.to_vec());
        if history.len() > len {
            history.pop_front();
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, replaying its log.
    pub fn open(dir: &Path, max_pending: usize, history_len: usize) -> io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("spool.log");
        let mut data = Vec::new();
        if path.exists() {
            File::open(&path)?.read_to_end(&mut data)?;
        }
        let (records, valid) = decode(&data);
        let mut stats = SpoolStats {
            torn_bytes_dropped: (data.len() - valid) as u64,
            ..SpoolStats::default()
        };
        let mut pending = BTreeMap::new();
        let mut history = VecDeque::new();
        let mut next_seq = 1;
        for (seq, kind, key, payload) in &records {
            next_seq = next_seq.max(seq + 1);
            match *kind {
                PUT | PUT_UPDATE => {
                    let coalescible = *kind == PUT_UPDATE;
                    remember(&mut history, history_len, payload);
                    pending.insert(
                        *seq,
                        Entry {
                            seq: *seq,
                            key: key.clone(),
                            coalescible,
                            payload: payload.clone(),
                        },
                    );
                }
                _ => {
                    pending.remove(seq);
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        if valid < data.len() {
            // Cut the torn tail so new records follow the last good one.
            file.set_len(valid as u64)?;
            file.sync_all()?;
            tracing::warn!(
                dropped_bytes = data.len() - valid,
                "Spool: cut a torn record at the end of the log (crash mid-write)."
            );
        }
        stats.pending = pending.len();
        Ok(Spool {
            log: Some(SpoolLog {
                dir: dir.to_path_buf(),
                file,
            }),
            next_seq,
            pending,
            buffer: Vec::new(),
            log_records: records.len(),
            max_pending,
            history,
            history_len,
            stats,
        })
    }

    /// Buffers a payload for alert `key`; durable after the next [`Spool::sync`].
    /// `coalescible` marks updates, which may replace an older pending update of the same
    /// alert when the spool is full.
    pub fn append(&mut self, key: &str, coalescible: bool, payload: Vec<u8>) -> Appended {
        let seq = self.next_seq;
        self.next_seq += 1;
        let kind = if coalescible { PUT_UPDATE } else { PUT };
        encode(&mut self.buffer, seq, kind, key, &payload);
        self.log_records += 1;
        self.stats.appended += 1;
        let mut result = Appended::Stored(seq);
        if coalescible && self.pending.len() >= self.max_pending {
            let older = self
                .pending
                .values()
                .find(|e| e.coalescible && e.key == key)
                .map(|e| e.seq);
            if let Some(old) = older {
                self.ack(old);
                self.stats.coalesced += 1;
                tracing::warn!(
                    alert_id = key,
                    "Spool full: an older update of this alert was replaced."
                );
                result = Appended::Coalesced { seq, replaced: old };
            }
        }
        remember(&mut self.history, self.history_len, &payload);
        self.pending.insert(
            seq,
            Entry {
                seq,
                key: key.to_string(),
                coalescible,
                payload,
            },
        );
        self.stats.pending = self.pending.len();
        result
    }

    /// Writes and fsyncs everything buffered (one fsync for the whole batch).
    pub fn sync(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        self.log
            .as_mut()
            .ok_or_else(detached)?
            .write_durably(&self.buffer)?;
        self.buffer.clear();
        Ok(())
    }

    /// Takes the log file out, for a writer thread; from then on the caller moves the bytes of
    /// [`Spool::take_buffer`] and [`Spool::compaction_snapshot`] to it in order.
    pub fn detach_log(&mut self) -> Option<SpoolLog> {
        self.log.take()
    }

    /// The records buffered since the last call (or sync), to be written in this order.
    pub fn take_buffer(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buffer)
    }

    /// When acknowledged records dominate the log: the pending entries encoded as a new log,
    /// to replace the file after everything taken from [`Spool::take_buffer`] so far is
    /// written (records buffered later go after it). The caller must take the buffer first.
    pub fn compaction_snapshot(&mut self) -> Option<Vec<u8>> {
        debug_assert!(
            self.buffer.is_empty(),
            "take the buffer before the snapshot"
        );
        if self.log_records < 1024 || self.log_records < 4 * (self.pending.len() + 1) {
            return None;
        }
        let mut data = Vec::new();
        for e in self.pending.values() {
            let kind = if e.coalescible { PUT_UPDATE } else { PUT };
            encode(&mut data, e.seq, kind, &e.key, &e.payload);
        }
        self.log_records = self.pending.len();
        self.stats.compactions += 1;
        Some(data)
    }

    /// The broker acknowledged `seq`: it leaves the spool (durably at the next sync).
    pub fn ack(&mut self, seq: u64) -> bool {
        if self.pending.remove(&seq).is_none() {
            return false;
        }
        encode(&mut self.buffer, seq, ACK, "", &[]);
        self.log_records += 1;
        self.stats.acked += 1;
        self.stats.pending = self.pending.len();
        true
    }

    /// The pending entry `seq`, if it is still pending.
    pub fn get(&self, seq: u64) -> Option<&Entry> {
        self.pending.get(&seq)
    }

    /// Pending entries, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &Entry> {
        self.pending.values()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The most recent payloads, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &[u8]> {
        self.history.iter().map(Vec::as_slice)
    }

    pub fn stats(&self) -> SpoolStats {
        self.stats
    }

    /// Rewrites the log with only the pending entries when acknowledged records dominate.
    pub fn maybe_compact(&mut self) -> io::Result<bool> {
        if self.log.is_none() {
            return Err(detached());
        }
        self.sync()?;
        let Some(snapshot) = self.compaction_snapshot() else {
            return Ok(false);
        };
        self.log.as_mut().ok_or_else(detached)?.replace(&snapshot)?;
        Ok(true)
    }
}

fn detached() -> io::Error {
    io::Error::other("the spool's log is driven by a writer thread")
}

/// What the writer thread is asked to do, in order.
pub enum LogCommand {
    /// Append these records and fsync; `batch` comes back in [`LogDone`].
    Write { batch: u64, bytes: Vec<u8> },
    /// Replace the log with this snapshot (after the writes before it).
    Compact(Vec<u8>),
}

/// A batch made durable (or not).
#[derive(Debug)]
pub struct LogDone {
    /// Every batch up to and including this one is settled.
    pub through: u64,
    pub result: io::Result<()>,
}

/// Runs `log` on a thread of its own: consecutive writes waiting in the queue share one fsync
/// (group commit). Ends when the command sender is dropped, after the commands sent so far.
pub fn spawn_writer(
    mut log: SpoolLog,
    done: tokio::sync::mpsc::UnboundedSender<LogDone>,
) -> io::Result<(
    std::sync::mpsc::Sender<LogCommand>,
    std::thread::JoinHandle<()>,
)> {
    let (tx, rx) = std::sync::mpsc::channel::<LogCommand>();
    let thread = std::thread::Builder::new()
        .name("dfwatch-spool".into())
        .spawn(move || {
            let mut next = rx.recv().ok();
            while let Some(cmd) = next.take() {
                match cmd {
                    LogCommand::Write { batch, mut bytes } => {
                        let mut through = batch;
                        // Gather the writes queued meanwhile; stop at a compaction.
                        loop {
                            match rx.try_recv() {
                                Ok(LogCommand::Write { batch, bytes: more }) => {
                                    through = batch;
                                    bytes.extend_from_slice(&more);
                                }
                                Ok(other) => {
                                    next = Some(other);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        let result = log.write_durably(&bytes);
                        if let Err(e) = &result {
                            tracing::error!(error = %e, "Spool: write failed; alerts stay in memory only.");
                        }
                        let _ = done.send(LogDone { through, result });
                    }
                    LogCommand::Compact(snapshot) => {
                        if let Err(e) = log.replace(&snapshot) {
                            tracing::error!(error = %e, "Spool: compaction failed.");
                        }
                    }
                }
                if next.is_none() {
                    next = rx.recv().ok();
                }
            }
        })?;
    Ok((tx, thread))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_alerts_survive_a_reopen_and_acks_remove_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 100, 10).unwrap();
        let a = s.append("A", false, b"new A".to_vec());
        let b = s.append("B", false, b"new B".to_vec());
        s.sync().unwrap();
        let Appended::Stored(a) = a else { panic!() };
        assert!(s.ack(a));
        assert!(!s.ack(a), "acked once");
        s.sync().unwrap();
        drop(s);
        let s = Spool::open(dir.path(), 100, 10).unwrap();
        let p: Vec<&Entry> = s.pending().collect();
        assert_eq!(p.len(), 1);
        assert_eq!(
            (p[0].key.as_str(), p[0].payload.as_slice()),
            ("B", b"new B".as_slice())
        );
        assert_eq!(Appended::Stored(p[0].seq), b);
        assert_eq!(s.history().count(), 2);
    }

    #[test]
    fn unsynced_appends_are_not_on_disk_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 100, 0).unwrap();
        s.append("A", false, b"kept".to_vec());
        s.sync().unwrap();
        s.append("B", false, b"lost with the crash".to_vec());
        drop(s); // never synced: like a crash before the group commit
        // A crash mid-write: half a record at the end.
        let path = dir.path().join("spool.log");
        let mut torn = Vec::new();
        encode(&mut torn, 99, PUT, "C", b"half written");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&torn[..torn.len() / 2]).unwrap();
        drop(f);
        let mut s = Spool::open(dir.path(), 100, 0).unwrap();
        assert_eq!(
            s.pending().map(|e| e.key.clone()).collect::<Vec<_>>(),
            vec!["A"]
        );
        assert_eq!(s.stats().torn_bytes_dropped, (torn.len() / 2) as u64);
        // New records go after the good prefix and replay fine.
        s.append("D", false, b"after".to_vec());
        s.sync().unwrap();
        drop(s);
        let s = Spool::open(dir.path(), 100, 0).unwrap();
        assert_eq!(
            s.pending().map(|e| e.key.clone()).collect::<Vec<_>>(),
            vec!["A", "D"]
        );
    }

    #[test]
    fn a_full_spool_coalesces_updates_but_never_drops_new_or_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 3, 0).unwrap();
        s.append("A", false, b"A new".to_vec());
        s.append("A", true, b"A update 1".to_vec());
        s.append("B", false, b"B new".to_vec());
        // Full: A's next update replaces its older one.
        let r = s.append("A", true, b"A update 2".to_vec());
        assert!(
            matches!(r, Appended::Coalesced { replaced: 2, .. }),
            "{r:?}"
        );
        // New and end events are kept even past the bound.
        s.append("C", false, b"C new".to_vec());
        s.append("B", false, b"B end".to_vec());
        s.sync().unwrap();
        let keys: Vec<Vec<u8>> = s.pending().map(|e| e.payload.clone()).collect();
        assert_eq!(
            keys,
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
        let s = Spool::open(dir.path(), 3, 0).unwrap();
        assert_eq!(s.len(), 5);
        assert!(s.pending().all(|e| e.payload != b"A update 1"));
    }

    #[test]
    fn compaction_keeps_exactly_the_pending_entries() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 10_000, 0).unwrap();
        for i in 0..2000u64 {
            let Appended::Stored(seq) = s.append(&format!("k{i}"), false, vec![i as u8; 100])
            else {
                panic!()
            };
            if i % 100 != 0 {
                s.ack(seq);
            }
        }
        s.sync().unwrap();
        let before = std::fs::metadata(dir.path().join("spool.log"))
            .unwrap()
            .len();
        assert!(s.maybe_compact().unwrap());
        let after = std::fs::metadata(dir.path().join("spool.log"))
            .unwrap()
            .len();
        assert!(after * 10 < before, "{before} -> {after}");
        s.append("late", false, b"x".to_vec());
        s.sync().unwrap();
        drop(s);
        let s = Spool::open(dir.path(), 10_000, 0).unwrap();
        assert_eq!(s.len(), 21);
        assert_eq!(s.pending().last().unwrap().key, "late");
    }

    #[test]
    fn the_writer_thread_keeps_order_across_group_commits_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 10_000, 0).unwrap();
        let log = s.detach_log().unwrap();
        assert!(s.sync().is_ok(), "nothing buffered: nothing to write");
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        let (tx, thread) = spawn_writer(log, done_tx).unwrap();
        let mut batch = 0;
        let mut compacted = false;
        for i in 0..3000u64 {
            let Appended::Stored(seq) = s.append(&format!("k{i}"), false, vec![i as u8; 64]) else {
                panic!()
            };
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
        s.append("late", false, b"after the last compaction".to_vec());
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
            d.result.unwrap();
            assert!(d.through > through, "settled in order");
            through = d.through;
        }
        assert_eq!(through, batch, "every batch settled");
        let reopened = Spool::open(dir.path(), 10_000, 0).unwrap();
        let mut want: Vec<String> = (0..3000)
            .filter(|i| i % 7 == 0)
            .map(|i| format!("k{i}"))
            .collect();
        want.push("late".into());
        let got: Vec<String> = reopened.pending().map(|e| e.key.clone()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn crc_matches_the_standard_check_value() {
        assert_eq!(crc32(&[b"123456789"]), 0xCBF4_3926);
        assert_eq!(crc32(&[b"1234", b"56789"]), 0xCBF4_3926);
    }
}
