//! The durable spool: every alert is on disk before it is published, and leaves only when the
//! broker acknowledged it.
//!
//! An append-only log of records `[len u32][crc32 u32][seq u64][kind u8][key len u16][key]
//! [payload]`, little-endian, where `kind` is 1 (put), 3 (put of an update) or 2 (ack) and
//! `key` is the alert id.
//! [`Spool::append`] only buffers; [`Spool::sync`] writes and fsyncs everything buffered in
//! one go (group commit), so a burst of alerts costs one fsync. On open the log is replayed:
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

/// CRC-32 (IEEE), bitwise: records are small and fsync dominates anyway.
fn crc32(parts: &[&[u8]]) -> u32 {
    let mut crc = !0u32;
    for p in parts {
        for &b in *p {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
    }
    !crc
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

/// The spool in one directory.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    file: File,
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
            dir: dir.to_path_buf(),
            file,
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
        self.file.write_all(&self.buffer)?;
        self.file.sync_data()?;
        self.buffer.clear();
        Ok(())
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
        if self.log_records < 1024 || self.log_records < 4 * (self.pending.len() + 1) {
            return Ok(false);
        }
        self.sync()?;
        let mut data = Vec::new();
        for e in self.pending.values() {
            let kind = if e.coalescible { PUT_UPDATE } else { PUT };
            encode(&mut data, e.seq, kind, &e.key, &e.payload);
        }
        let tmp = self.dir.join("spool.log.tmp");
        let path = self.dir.join("spool.log");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        sync_dir(&self.dir)?;
        self.file = OpenOptions::new().append(true).open(&path)?;
        self.log_records = self.pending.len();
        self.stats.compactions += 1;
        Ok(true)
    }
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
    fn crc_matches_the_standard_check_value() {
        assert_eq!(crc32(&[b"123456789"]), 0xCBF4_3926);
        assert_eq!(crc32(&[b"1234", b"56789"]), 0xCBF4_3926);
    }
}
