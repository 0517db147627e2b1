//! The durable spool: every alert is on disk before it is published, and leaves only when the
//! broker acknowledged it.
//!
//! An append-only log of records ([`record`]): puts (a `new`, `update` or `end` event of an
//! alert, with the wall-clock time of the put) and acks. [`Spool::append`] only buffers;
//! the publisher hands the buffered bytes to a writer thread ([`log::spawn_writer`]) that
//! writes and fsyncs them in groups, so fsyncs never stall its network side.
//!
//! Recovery: on open the log is replayed, and a damaged record does not end the replay: the
//! reader resynchronises on the next valid record, so every intact record before and after
//! the damage is recovered; the damaged file is kept aside (`spool.log.damaged-<ms>`, the
//! newest three) and the live log rewritten clean. A torn tail (a crash mid-write) is cut. A
//! write the disk refuses (ENOSPC) is cut back to the last good length, so it never poisons
//! later appends; meanwhile alerts still go to the broker, and the spool reports itself not
//! durable until a rewrite of everything pending succeeds.
//!
//! Bounds: past `max_pending` entries, a new update of an alert replaces that alert's older
//! pending update (coalescing). Past `max_bytes`, entries are dropped in this order: updates
//! first (oldest first), then whole alerts that have ended (their new, updates and end, the
//! oldest end first), and only then the oldest `new` of an alert still open. Entries older
//! than `max_age` are dropped whatever they are. Every drop is counted by reason. The
//! bookkeeping is indexed: no operation scans the pending entries. (Alert history is the event
//! store's: `crate::events`.)

pub mod log;
pub mod record;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::time::Duration;

use crate::types::AlertChange;
pub use log::{LogCommand, LogDone, SpoolLog, spawn_writer};

/// The MQTT sink's name in per-sink acknowledgements: what it has is dropped first when the
/// spool is over its byte cap.
pub const MQTT_SINK: &str = "mqtt";
use record::{Record, decode, encode_ack, encode_put};

/// A pending entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    /// The alert id the payload belongs to.
    pub key: String,
    pub kind: AlertChange,
    /// Wall-clock milliseconds of the put.
    pub at_ms: u64,
    pub payload: Vec<u8>,
    /// Sinks that have their copy already (the entry stays for the others).
    pub acked_by: Vec<String>,
}

impl Entry {
    /// Bytes this entry holds (payload and key), for the byte cap.
    fn size(&self) -> u64 {
        (self.payload.len() + self.key.len() + record::HEADER + 8) as u64
    }
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

impl Appended {
    pub fn seq(self) -> u64 {
        match self {
            Appended::Stored(s) | Appended::Coalesced { seq: s, .. } => s,
        }
    }
}

/// How far the spool may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    /// Past this many entries, updates of one alert replace each other.
    pub max_pending: usize,
    /// Past this many bytes, entries are dropped in the documented order.
    pub max_bytes: u64,
    /// Entries older than this are dropped.
    pub max_age: Duration,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        SpoolLimits {
            max_pending: 10_000,
            max_bytes: 256 << 20,
            max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Why an entry was dropped before the broker took it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// An update, over the byte cap.
    Update,
    /// Part of an alert that had ended, over the byte cap.
    Ended,
    /// The `new` of an alert still open: the last resort over the byte cap.
    OpenNew,
    /// Older than the age cap.
    Age,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Update => "update",
            DropReason::Ended => "ended_alert",
            DropReason::OpenNew => "open_new",
            DropReason::Age => "age",
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    pub pending: usize,
    pub bytes: u64,
    pub appended: u64,
    pub acked: u64,
    pub coalesced: u64,
    pub dropped_update: u64,
    pub dropped_ended: u64,
    pub dropped_open_new: u64,
    pub dropped_age: u64,
    pub torn_bytes_dropped: u64,
    /// Damaged bytes skipped on replay (between valid records), and their regions.
    pub damaged_bytes_skipped: u64,
    pub damaged_regions: u64,
    pub compactions: u64,
}

impl SpoolStats {
    pub fn dropped(&self) -> [(DropReason, u64); 4] {
        [
            (DropReason::Update, self.dropped_update),
            (DropReason::Ended, self.dropped_ended),
            (DropReason::OpenNew, self.dropped_open_new),
            (DropReason::Age, self.dropped_age),
        ]
    }
}

/// The indexes that keep every operation off a scan of the pending entries.
#[derive(Debug, Default)]
struct Index {
    bytes: u64,
    /// Pending updates, oldest first.
    updates: BTreeSet<u64>,
    /// Each alert's newest pending update (for coalescing).
    latest_update: HashMap<String, u64>,
    /// Each alert's pending entries.
    by_key: HashMap<String, BTreeSet<u64>>,
    /// Alerts whose end is pending: end seq -> alert id, oldest end first.
    ended: BTreeMap<u64, String>,
}

/// The spool in one directory.
#[derive(Debug)]
pub struct Spool {
    /// None once detached ([`Spool::detach_log`]).
    log: Option<SpoolLog>,
    next_seq: u64,
    pending: BTreeMap<u64, Entry>,
    index: Index,
    buffer: Vec<u8>,
    log_records: usize,
    limits: SpoolLimits,
    /// A write failed: the next snapshot rewrites everything pending.
    rewrite_due: bool,
    stats: SpoolStats,
}

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, replaying its log (see the module doc), then
    /// applies the limits.
    pub fn open(dir: &Path, limits: SpoolLimits) -> io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("spool.log");
        let mut data = Vec::new();
        match File::open(&path) {
            Ok(f) => {
                // Bounded: a log never legitimately holds much more than its byte cap.
                let cap = limits.max_bytes.saturating_mul(4).max(64 << 20);
                f.take(cap).read_to_end(&mut data)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let now = now_ms();
        let decoded = decode(&data);
        let mut spool = Spool {
            log: None,
            next_seq: 1,
            pending: BTreeMap::new(),
            index: Index::default(),
            buffer: Vec::new(),
            log_records: decoded.records.len(),
            limits,
            rewrite_due: false,
            stats: SpoolStats {
                torn_bytes_dropped: (data.len() - decoded.valid_end) as u64,
                damaged_bytes_skipped: decoded.skipped_bytes() as u64,
                damaged_regions: decoded.skipped.len() as u64,
                ..SpoolStats::default()
            },
        };
        for r in &decoded.records {
            match r {
                Record::Put {
                    seq,
                    kind,
                    key,
                    at_ms,
                    payload,
                } => {
                    spool.next_seq = spool.next_seq.max(seq + 1);
                    spool.insert(Entry {
                        seq: *seq,
                        key: key.clone(),
                        kind: *kind,
                        at_ms: at_ms.unwrap_or(now),
                        payload: payload.clone(),
                        acked_by: Vec::new(),
                    });
                }
                Record::Ack { seq } => {
                    spool.next_seq = spool.next_seq.max(seq + 1);
                    spool.remove(*seq);
                }
                Record::SinkAck { seq, sink } => {
                    if let Some(e) = spool.pending.get_mut(seq)
                        && !e.acked_by.contains(sink)
                    {
                        e.acked_by.push(sink.clone());
                    }
                }
            }
        }
        if !decoded.skipped.is_empty() {
            let kept = SpoolLog::keep_damaged(dir, &data, now);
            tracing::warn!(
                regions = decoded.skipped.len(),
                skipped_bytes = decoded.skipped_bytes(),
                recovered = spool.pending.len(),
                kept = ?kept.as_ref().map(|p| p.display().to_string()),
                "Spool: the log was damaged; every intact record around the damage was recovered and the damaged file kept aside."
            );
        }
        if data.len() > decoded.valid_end {
            tracing::warn!(
                dropped_bytes = data.len() - decoded.valid_end,
                "Spool: cut a torn record at the end of the log (crash mid-write)."
            );
        }
        let mut log = SpoolLog::open(dir, decoded.valid_end as u64)?;
        // A damaged log is rewritten clean, so new records never follow garbage.
        if !decoded.skipped.is_empty() {
            log.replace(&spool.snapshot())?;
            spool.log_records = spool.pending.len();
        }
        spool.log = Some(log);
        spool.enforce_limits(now);
        Ok(spool)
    }

    fn insert(&mut self, e: Entry) {
        let ix = &mut self.index;
        ix.bytes += e.size();
        ix.by_key.entry(e.key.clone()).or_default().insert(e.seq);
        match e.kind {
            AlertChange::Update => {
                ix.updates.insert(e.seq);
                let latest = ix.latest_update.entry(e.key.clone()).or_insert(e.seq);
                *latest = (*latest).max(e.seq);
            }
            AlertChange::End => {
                ix.ended.insert(e.seq, e.key.clone());
            }
            AlertChange::New => {}
        }
        self.pending.insert(e.seq, e);
        self.stats.pending = self.pending.len();
        self.stats.bytes = self.index.bytes;
    }

    /// Takes `seq` out of the pending set and its indexes (no record written).
    fn remove(&mut self, seq: u64) -> Option<Entry> {
        let e = self.pending.remove(&seq)?;
        let ix = &mut self.index;
        ix.bytes -= e.size();
        if let Some(set) = ix.by_key.get_mut(&e.key) {
            set.remove(&seq);
            if set.is_empty() {
                ix.by_key.remove(&e.key);
            }
        }
        match e.kind {
            AlertChange::Update => {
                ix.updates.remove(&seq);
                if ix.latest_update.get(&e.key) == Some(&seq) {
                    ix.latest_update.remove(&e.key);
                }
            }
            AlertChange::End => {
                ix.ended.remove(&seq);
            }
            AlertChange::New => {}
        }
        self.stats.pending = self.pending.len();
        self.stats.bytes = self.index.bytes;
        Some(e)
    }

    /// Removes `seq` and records that durably (at the next write).
    fn retire(&mut self, seq: u64) -> bool {
        if self.remove(seq).is_none() {
            return false;
        }
        encode_ack(&mut self.buffer, seq);
        self.log_records += 1;
        true
    }

    fn drop_entry(&mut self, seq: u64, why: DropReason) {
        if self.retire(seq) {
            let s = &mut self.stats;
            match why {
                DropReason::Update => s.dropped_update += 1,
                DropReason::Ended => s.dropped_ended += 1,
                DropReason::OpenNew => s.dropped_open_new += 1,
                DropReason::Age => s.dropped_age += 1,
            }
        }
    }

    /// Applies the age and byte caps at wall-clock `now_ms`, in the documented drop order.
    pub fn enforce_limits(&mut self, now_ms: u64) {
        let max_age = self.limits.max_age.as_millis() as u64;
        while let Some((&seq, e)) = self.pending.first_key_value() {
            if now_ms.saturating_sub(e.at_ms) <= max_age {
                break;
            }
            self.drop_entry(seq, DropReason::Age);
        }
        let mut dropped = 0u64;
        while self.index.bytes > self.limits.max_bytes {
            dropped += 1;
            // First what the broker has already: only another sink (a webhook) loses it.
            let taken = self
                .pending
                .values()
                .find(|e| e.acked_by.iter().any(|s| s == MQTT_SINK))
                .map(|e| (e.seq, e.kind));
            if let Some((seq, kind)) = taken {
                let why = match kind {
                    AlertChange::Update => DropReason::Update,
                    AlertChange::End => DropReason::Ended,
                    AlertChange::New => DropReason::OpenNew,
                };
                self.drop_entry(seq, why);
            } else if let Some(&seq) = self.index.updates.first() {
                self.drop_entry(seq, DropReason::Update);
            } else if let Some((_, key)) = self.index.ended.first_key_value() {
                let key = key.clone();
                let seqs: Vec<u64> = self
                    .index
                    .by_key
                    .get(&key)
                    .map(|s| s.iter().copied().collect())
                    .unwrap_or_default();
                for seq in seqs {
                    self.drop_entry(seq, DropReason::Ended);
                }
            } else if let Some(&seq) = self.pending.keys().next() {
                self.drop_entry(seq, DropReason::OpenNew);
            } else {
                break;
            }
        }
        if dropped > 0 {
            tracing::warn!(
                bytes = self.index.bytes,
                max_bytes = self.limits.max_bytes,
                "Spool over its byte cap: the oldest updates (then ended alerts) were dropped."
            );
        }
    }

    /// Buffers a payload of alert `key` put at `at_ms`; durable once the buffered bytes are
    /// written. Past `max_pending`, an update replaces the alert's older pending update.
    pub fn append(
        &mut self,
        key: &str,
        kind: AlertChange,
        at_ms: u64,
        payload: Vec<u8>,
    ) -> Appended {
        let seq = self.next_seq;
        self.next_seq += 1;
        encode_put(&mut self.buffer, seq, kind, key, at_ms, &payload);
        self.log_records += 1;
        self.stats.appended += 1;
        let mut result = Appended::Stored(seq);
        if kind == AlertChange::Update
            && self.pending.len() >= self.limits.max_pending
            && let Some(&old) = self.index.latest_update.get(key)
        {
            self.retire(old);
            self.stats.coalesced += 1;
            tracing::warn!(
                alert_id = key,
                "Spool full: an older update of this alert was replaced."
            );
            result = Appended::Coalesced { seq, replaced: old };
        }
        self.insert(Entry {
            seq,
            key: key.to_string(),
            kind,
            at_ms,
            payload,
            acked_by: Vec::new(),
        });
        self.enforce_limits(at_ms);
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

    /// A write failed: the log on disk lacks some pending entries, so the next snapshot
    /// rewrites them all.
    pub fn rewrite_all(&mut self) {
        self.rewrite_due = true;
    }

    /// A compaction failed: offer it again at the next chance.
    pub fn compaction_failed(&mut self) {
        self.rewrite_due = true;
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut data = Vec::new();
        for e in self.pending.values() {
            encode_put(&mut data, e.seq, e.kind, &e.key, e.at_ms, &e.payload);
            for sink in &e.acked_by {
                record::encode_sink_ack(&mut data, e.seq, sink);
            }
        }
        data
    }

    /// When acknowledged records dominate the log, or a write or compaction failed: the
    /// pending entries encoded as a new log, to replace the file after everything taken from
    /// [`Spool::take_buffer`] so far is written (records buffered later go after it). The
    /// caller must take the buffer first.
    pub fn compaction_snapshot(&mut self) -> Option<Vec<u8>> {
        debug_assert!(
            self.buffer.is_empty(),
            "take the buffer before the snapshot"
        );
        let dominated =
            self.log_records >= 1024 && self.log_records >= 4 * (self.pending.len() + 1);
        if !(dominated || self.rewrite_due) {
            return None;
        }
        self.rewrite_due = false;
        self.log_records = self.pending.len();
        self.stats.compactions += 1;
        Some(self.snapshot())
    }

    /// Sink `sink` has its copy of `seq`, which stays pending for the other sinks: recorded
    /// durably (at the next write), so a restart does not send it to `sink` again. `false`
    /// when `seq` is not pending or `sink` had it already.
    pub fn sink_ack(&mut self, seq: u64, sink: &str) -> bool {
        let Some(e) = self.pending.get_mut(&seq) else {
            return false;
        };
        if sink.is_empty() || sink.len() > record::MAX_KEY || e.acked_by.iter().any(|s| s == sink) {
            return false;
        }
        e.acked_by.push(sink.to_string());
        record::encode_sink_ack(&mut self.buffer, seq, sink);
        self.log_records += 1;
        true
    }

    /// The broker acknowledged `seq`: it leaves the spool (durably at the next write).
    pub fn ack(&mut self, seq: u64) -> bool {
        if !self.retire(seq) {
            return false;
        }
        self.stats.acked += 1;
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
        if let Err(e) = self.log.as_mut().ok_or_else(detached)?.replace(&snapshot) {
            self.compaction_failed();
            return Err(e);
        }
        Ok(true)
    }

    /// The log, for tests that inject faults.
    #[cfg(test)]
    pub(crate) fn log_mut(&mut self) -> Option<&mut SpoolLog> {
        self.log.as_mut()
    }
}

fn detached() -> io::Error {
    io::Error::other("the spool's log is driven by a writer thread")
}

#[cfg(test)]
mod tests;
