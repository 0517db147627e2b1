//! The event store: alert history and evidence media on disk, the source of `/api/events`
//! and `/api/alerts`.
//!
//! SQLite (through `rusqlite`, its library bundled) rather than an embedded key-value store:
//! the API filters by stream, verdict and time and pages newest first, which is SQL with two
//! indexes instead of hand-kept ones; WAL with `synchronous = FULL` makes each commit
//! durable across SIGKILL and power loss; `quick_check` tells a damaged file at start; and
//! the file opens in the `sqlite3` shell for an operator's own questions.
//!
//! Data flow: the decision task hands each alert event (and, for streams with
//! `store_media = true`, the frame the track's strongest face was scored on) to
//! [`EventStore::record`], which never blocks: a bounded queue ([`QUEUE_LEN`]; what does not
//! fit is counted and logged) feeds one writer thread. The writer draws the face box, encodes
//! the JPEGs, commits, enforces retention (`[events]`: age, events, media bytes) and tells
//! live subscribers ([`EventStore::subscribe`], the SSE endpoint). API reads go through the
//! same connection under a lock, off the async runtime.
//!
//! Layout: [`db`] (schema, queries, retention; no threads), [`media`] (snapshot drawing),
//! this file (`[events]`, the queue and the writer thread).

pub mod db;
pub mod media;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub use db::{Change, Db, DbError, EventSummary, Facts, Filter, Limits, MediaKind, Review};
pub use media::AlertMedia;

use crate::metrics::Counter;
use crate::validation::{Checker, ConfigError};

/// Alert events waiting for the writer.
pub const QUEUE_LEN: usize = 4096;
/// How often age retention runs.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Live subscribers' backlog before they are told they lagged.
pub const LIVE_BACKLOG: usize = 256;

/// `max_age`: an hour to ten years.
pub const MAX_AGE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(3600)..=Duration::from_secs(10 * 365 * 24 * 3600);
/// `max_events`.
pub const MAX_EVENTS_RANGE: std::ops::RangeInclusive<u64> = 10..=10_000_000;
/// `max_media_bytes`: 1 MiB to 1 TiB.
pub const MAX_MEDIA_RANGE: std::ops::RangeInclusive<u64> = (1 << 20)..=(1 << 40);
/// What `max_db_bytes` must leave beside `max_media_bytes` for the events' rows.
pub const DB_HEADROOM: u64 = 8 << 20;
/// `max_db_bytes`: 16 MiB to 2 TiB.
pub const MAX_DB_RANGE: std::ops::RangeInclusive<u64> = (16 << 20)..=(2 << 40);
/// `held_frames`.
pub const HELD_FRAMES_RANGE: std::ops::RangeInclusive<u64> = 1..=1024;

/// `[events]`: the event store's file and retention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// The database file (relative paths against the config file's directory); default
    /// `events.db` in the state directory (`$STATE_DIRECTORY`, else `var/state`). Never a
    /// symbolic link.
    pub path: Option<PathBuf>,
    /// Events unchanged for longer than this are deleted with their media. 1h to 10 years.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Events kept at most (the oldest go first). 10 to 10,000,000.
    pub max_events: u64,
    /// Bytes of evidence media kept at most; the media of the oldest events go first, so the
    /// total never passes it. 1 MiB to 1 TiB.
    pub max_media_bytes: u64,
    /// Bytes the database itself may take (its pages in use: rows, lifecycles and media; the
    /// write-ahead log aside): past it the oldest events go first. At least
    /// `max_media_bytes` plus 8 MiB; 16 MiB to 2 TiB. Default 4 GiB.
    pub max_db_bytes: u64,
    /// Updates kept per event, the newest (its new and end are always kept): each is a
    /// whole alert payload, about 2 KB. 0 to 256, default 32.
    pub max_updates: u64,
    /// Frames the decision stage holds for snapshots (one per live track of a stream with
    /// `store_media`; a 1080p RGB frame is 6 MB). Tracks beyond it get no snapshot
    /// (counted). 1 to 1024.
    pub held_frames: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            path: None,
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_events: 100_000,
            max_media_bytes: 1 << 30,
            max_db_bytes: 4 << 30,
            max_updates: 32,
            held_frames: 32,
        }
    }
}

impl EventsConfig {
    pub(crate) fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        let mut c = Checker::new(path, errors);
        c.duration("max_age", self.max_age, MAX_AGE_RANGE);
        c.count("max_events", self.max_events, MAX_EVENTS_RANGE);
        c.count("max_media_bytes", self.max_media_bytes, MAX_MEDIA_RANGE);
        c.count("max_db_bytes", self.max_db_bytes, MAX_DB_RANGE);
        c.count(
            "max_updates",
            self.max_updates,
            0..=db::MAX_UPDATES_PER_EVENT,
        );
        if self.max_db_bytes < self.max_media_bytes.saturating_add(DB_HEADROOM) {
            c.error(
                "max_db_bytes",
                format!(
                    "{} must be at least max_media_bytes ({}) plus {} MiB: the media are in the \
                     database beside the events' rows, and a cap the media alone could fill \
                     would remove events at every write",
                    self.max_db_bytes,
                    self.max_media_bytes,
                    DB_HEADROOM >> 20
                ),
            );
        }
        c.count("held_frames", self.held_frames as u64, HELD_FRAMES_RANGE);
        if let Some(p) = &self.path
            && (p.as_os_str().is_empty() || p.file_name().is_none())
        {
            c.error("path", format!("{} does not name a file", p.display()));
        }
    }

    /// The database file: `path` against `base_dir`, else `events.db` in `state_dir`.
    pub fn file(&self, base_dir: &Path, state_dir: &Path) -> PathBuf {
        match &self.path {
            Some(p) => crate::files::resolve(base_dir, p),
            None => state_dir.join("events.db"),
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_age: self.max_age,
            max_events: self.max_events,
            max_media_bytes: self.max_media_bytes,
            max_db_bytes: self.max_db_bytes,
            max_updates: self.max_updates,
        }
    }
}

/// An alert event for the store.
#[derive(Debug)]
pub struct Incoming {
    pub alert_id: String,
    pub change: Change,
    pub stream: String,
    pub track: u64,
    pub at: SystemTime,
    pub payload: Vec<u8>,
    pub facts: db::Facts,
    pub media: Option<AlertMedia>,
}

/// What the writer thread takes.
enum Job {
    /// Boxed: the queue holds up to [`QUEUE_LEN`] jobs, most of them small.
    Event(Box<Incoming>),
    /// Answered once everything queued before it is written.
    Flush(std::sync::mpsc::Sender<()>),
}

/// What live subscribers hear: an event's summary after a change, or that one was deleted.
#[derive(Debug, Clone, Serialize)]
pub struct Live {
    pub change: Change,
    /// The change counter (the SSE id); replay with `Last-Event-ID`.
    pub seq: u64,
    pub alert_id: String,
    /// `None` for `delete`.
    pub event: Option<EventSummary>,
}

/// The store's counters.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    /// Alert events written.
    pub written: Counter,
    /// Alert events lost because the writer's queue was full.
    pub dropped: Counter,
    /// Database calls that failed, writes and API reads alike (full disk, I/O error,
    /// damage).
    pub write_errors: Counter,
    /// Media items stored.
    pub media_written: Counter,
    /// Media not stored: `queue` (too many frames waiting), `encode` (the JPEG failed).
    pub media_dropped_queue: Counter,
    pub media_dropped_encode: Counter,
    /// Times a damaged database was moved aside and a fresh one started.
    pub resets: Counter,
    /// When the last reset (or failed reset) happened, and why: `/readyz` says degraded
    /// for a while after one.
    last_reset: std::sync::Mutex<Option<(std::time::Instant, String)>>,
    /// Deleted through the API.
    pub deleted: Counter,
    /// Gauges, refreshed by the writer.
    pub events: AtomicU64,
    pub media_bytes: AtomicU64,
    pub pruned_age: AtomicU64,
    pub pruned_count: AtomicU64,
    pub pruned_media: AtomicU64,
    pub pruned_media_too_large: AtomicU64,
    pub pruned_updates: AtomicU64,
    pub pruned_size: AtomicU64,
}

impl StoreMetrics {
    fn reset_happened(&self, why: String) {
        *self.last_reset.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), why));
    }

    /// Why the database was last reset, while that is recent enough to call the daemon
    /// degraded ([`crate::fault::DEGRADED_FOR`]).
    pub fn recent_reset(&self) -> Option<String> {
        let last = self.last_reset.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref()
            .filter(|(at, _)| at.elapsed() < crate::fault::DEGRADED_FOR)
            .map(|(_, why)| why.clone())
    }
}

struct Shared {
    db: Mutex<Db>,
    metrics: StoreMetrics,
    live: tokio::sync::broadcast::Sender<Live>,
    /// Alert events in the queue that carry a frame.
    media_in_flight: AtomicUsize,
    media_cap: usize,
}

/// The event store: a handle to its writer thread and its database.
#[derive(Clone)]
pub struct EventStore {
    shared: Arc<Shared>,
    queue: std::sync::mpsc::SyncSender<Job>,
}

/// Why the store did not open.
#[derive(Debug, thiserror::Error)]
#[error("[events] {0}")]
pub struct OpenError(#[from] DbError);

impl EventStore {
    /// Opens the database (moving a damaged one aside, logged and counted) and starts the
    /// writer thread, which ends when every handle is dropped.
    pub fn open(cfg: &EventsConfig, file: &Path) -> Result<EventStore, OpenError> {
        let (db, reset) = Db::open(file, cfg.limits())?;
        let metrics = StoreMetrics::default();
        if let Some(why) = reset {
            metrics.resets.inc();
            tracing::error!(path = %file.display(), reason = %why, "The event store's database was damaged; it was moved aside and a fresh one started.");
            metrics.reset_happened(format!(
                "damage found at start ({why}); the database was moved aside"
            ));
        }
        let (live, _) = tokio::sync::broadcast::channel(LIVE_BACKLOG);
        let shared = Arc::new(Shared {
            db: Mutex::new(db),
            metrics,
            live,
            media_in_flight: AtomicUsize::new(0),
            media_cap: cfg.held_frames.max(1),
        });
        let (queue, rx) = std::sync::mpsc::sync_channel(QUEUE_LEN);
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| {
                OpenError(DbError::Path {
                    path: file.display().to_string(),
                    what: format!("cannot start the writer thread: {e}"),
                })
            })?;
        let store = EventStore { shared, queue };
        store.shared.refresh_gauges(&store.shared.lock());
        tracing::info!(path = %file.display(), events = store.shared.metrics.events.load(Ordering::Relaxed), "Event store open.");
        Ok(store)
    }

    /// Hands an alert event to the writer; never blocks. A full queue loses it (counted,
    /// logged): the spool, not this history, is what delivers alerts.
    pub fn record(&self, mut ev: Incoming) {
        if ev.media.is_some() {
            let n = self.shared.media_in_flight.fetch_add(1, Ordering::Relaxed);
            if n >= self.shared.media_cap {
                self.shared.media_in_flight.fetch_sub(1, Ordering::Relaxed);
                self.shared.metrics.media_dropped_queue.inc();
                ev.media = None;
            }
        }
        let had_media = ev.media.is_some();
        if let Err(e) = self.queue.try_send(Job::Event(Box::new(ev))) {
            let (std::sync::mpsc::TrySendError::Full(Job::Event(ev))
            | std::sync::mpsc::TrySendError::Disconnected(Job::Event(ev))) = e
            else {
                return;
            };
            if had_media {
                self.shared.media_in_flight.fetch_sub(1, Ordering::Relaxed);
            }
            let n = self.shared.metrics.dropped.get();
            self.shared.metrics.dropped.inc();
            if n.is_power_of_two() || n == 0 {
                tracing::warn!(alert_id = %ev.alert_id, dropped = n + 1, "The event store's queue is full; an alert event is not in the history.");
            }
        }
    }

    /// Live changes, as they are committed.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Live> {
        self.shared.live.subscribe()
    }

    pub fn metrics(&self) -> &StoreMetrics {
        &self.shared.metrics
    }

    /// Runs `f` on the database (blocking: call it off the async runtime).
    pub fn read<T>(&self, f: impl FnOnce(&Db) -> Result<T, DbError>) -> Result<T, DbError> {
        let mut db = self.shared.lock();
        let r = f(&db);
        self.shared.checked(&mut db, r)
    }

    /// Deletes an event and its media; `false` when there was none.
    pub fn delete(&self, alert_id: &str) -> Result<bool, DbError> {
        let mut db = self.shared.lock();
        let gone = db.delete(alert_id);
        let gone = self.shared.checked(&mut db, gone)?;
        if gone {
            self.shared.metrics.deleted.inc();
            let seq = db.seq().unwrap_or(0);
            let _ = self.shared.live.send(Live {
                change: Change::Delete,
                seq,
                alert_id: alert_id.to_string(),
                event: None,
            });
        }
        self.shared.refresh_gauges(&db);
        Ok(gone)
    }

    /// Marks an event as a false alarm or confirmed.
    pub fn review(
        &self,
        alert_id: &str,
        review: Review,
        note: Option<&str>,
    ) -> Result<Option<EventSummary>, DbError> {
        let mut db = self.shared.lock();
        let r = db.review(alert_id, review, note, SystemTime::now());
        let r = self.shared.checked(&mut db, r)?;
        if let Some(e) = &r {
            let _ = self.shared.live.send(Live {
                change: Change::Review,
                seq: e.seq,
                alert_id: alert_id.to_string(),
                event: Some(e.clone()),
            });
        }
        Ok(r)
    }

    /// Waits until the writer has taken everything queued before this call (tests, and the
    /// daemon's stop).
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let (tx, rx) = std::sync::mpsc::channel();
        let mut job = Job::Flush(tx);
        // A full queue is waited for only until the deadline.
        loop {
            match self.queue.try_send(job) {
                Ok(()) => break,
                Err(std::sync::mpsc::TrySendError::Full(j)) => {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    job = j;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return false,
            }
        }
        rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .is_ok()
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A database error: counted; a damaged file is moved aside and a fresh one opened in
    /// its place.
    fn checked<T>(&self, db: &mut Db, r: Result<T, DbError>) -> Result<T, DbError> {
        let e = match r {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        self.metrics.write_errors.inc();
        if e.is_corrupt() || db.detached() {
            match db.reset() {
                Ok(aside) => {
                    self.metrics.resets.inc();
                    let aside = aside.map(|p| p.display().to_string()).unwrap_or_default();
                    tracing::error!(path = %db.path().display(), error = %e, moved_to = %aside, "The event store's database was damaged while running; it was moved aside and a fresh one started.");
                    self.metrics
                        .reset_happened(format!("{e}; the database was moved to {aside}"));
                }
                Err(e2) => {
                    tracing::error!(path = %db.path().display(), error = %e2, "The event store's damaged database could not be replaced.");
                    self.metrics
                        .reset_happened(format!("{e}; replacing the database failed: {e2}"));
                }
            }
        }
        Err(e)
    }

    fn refresh_gauges(&self, db: &Db) {
        let m = &self.metrics;
        m.events.store(db.events(), Ordering::Relaxed);
        m.media_bytes.store(db.media_bytes(), Ordering::Relaxed);
        let p = db.pruned;
        m.pruned_age.store(p.age, Ordering::Relaxed);
        m.pruned_count.store(p.count, Ordering::Relaxed);
        m.pruned_media.store(p.media, Ordering::Relaxed);
        m.pruned_media_too_large
            .store(p.media_too_large, Ordering::Relaxed);
        m.pruned_updates.store(p.updates, Ordering::Relaxed);
        m.pruned_size.store(p.size, Ordering::Relaxed);
    }

    /// The writer thread: events in queue order, media drawn and encoded outside the lock,
    /// retention by age every [`SWEEP_EVERY`].
    fn run(self: Arc<Self>, rx: std::sync::mpsc::Receiver<Job>) {
        let mut next_sweep = std::time::Instant::now();
        loop {
            if std::time::Instant::now() >= next_sweep {
                // A chunk per lock: API reads get their turn between chunks.
                let mut deleted = 0;
                loop {
                    let mut db = self.lock();
                    let r = db.sweep(SystemTime::now());
                    let n = self.checked(&mut db, r).unwrap_or(0);
                    self.refresh_gauges(&db);
                    drop(db);
                    deleted += n;
                    if n < db::CHUNK {
                        break;
                    }
                }
                if deleted > 0 {
                    tracing::info!(
                        deleted,
                        "Event store: events past [events] max_age or max_events deleted."
                    );
                }
                next_sweep = std::time::Instant::now() + SWEEP_EVERY;
            }
            let ev = match rx.recv_timeout(SWEEP_EVERY) {
                Ok(Job::Event(ev)) => *ev,
                Ok(Job::Flush(done)) => {
                    let _ = done.send(());
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            };
            self.write(ev);
        }
    }

    fn write(&self, mut ev: Incoming) {
        let media = ev.media.take();
        if media.is_some() {
            self.media_in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        // The JPEGs first, without the lock: API reads go on meanwhile. A panic drawing them
        // costs the media, not the writer.
        let jpegs = media.and_then(|m| match crate::fault::catch(|| m.render()) {
            Ok(j) => Some(j),
            Err(why) => {
                self.metrics.media_dropped_encode.inc();
                tracing::warn!(alert_id = %ev.alert_id, reason = %why, "Evidence media not drawn.");
                None
            }
        });
        let mut db = self.lock();
        let r = db.record(&db::Record {
            alert_id: &ev.alert_id,
            change: ev.change,
            stream: &ev.stream,
            track: ev.track,
            at: ev.at,
            payload: &ev.payload,
            facts: &ev.facts,
        });
        let mut summary = match self.checked(&mut db, r) {
            Ok(s) => {
                self.metrics.written.inc();
                s
            }
            Err(e) => {
                tracing::warn!(alert_id = %ev.alert_id, error = %e, "An alert event could not be written to the event store.");
                return;
            }
        };
        let mut stored = false;
        for (kind, jpeg) in jpegs.into_iter().flatten() {
            match jpeg {
                Ok(jpeg) => {
                    let r = db.put_media(&ev.alert_id, kind, &jpeg);
                    match self.checked(&mut db, r) {
                        Ok(true) => {
                            self.metrics.media_written.inc();
                            stored = true;
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(alert_id = %ev.alert_id, error = %e, "Evidence media could not be written to the event store.");
                        }
                    }
                }
                Err(e) => {
                    self.metrics.media_dropped_encode.inc();
                    tracing::warn!(alert_id = %ev.alert_id, error = %e, "Evidence media not encoded.");
                }
            }
        }
        // The media moved the event's change counter on: its summary once more.
        if stored && let Ok(Some(s)) = db.get(&ev.alert_id) {
            summary = Some(s);
        }
        self.refresh_gauges(&db);
        // Told under the lock: subscribers hear changes in the order they were committed.
        if let Some(s) = summary {
            let _ = self.live.send(Live {
                change: ev.change,
                seq: s.seq,
                alert_id: ev.alert_id,
                event: Some(s),
            });
        }
        drop(db);
    }
}

#[cfg(test)]
mod tests;
