//! The event store's database: one SQLite file in WAL mode, written and read through one
//! connection ([`Db`]). Sans-threads: the store's writer and the API call it under a lock.
//!
//! Tables:
//! - `events`: one row per alert (its latest state, the operator's review, `seq` of its last
//!   change);
//! - `lifecycle`: every payload the alert published (new, updates, end), in order;
//! - `media`: the alert's snapshot and face crop as JPEG blobs (streams with `store_media`);
//! - `meta`: the schema version and the change counter.
//!
//! Alert ids are ULIDs made in time order, so `ORDER BY alert_id DESC` is newest first and a
//! page's last id is a cursor that stays put while new events arrive.
//!
//! Bounds: [`Limits`] (age, events, media bytes, updates kept per event), each enforced as it
//! is written or by [`Db::sweep`]; what a bound removed is counted in [`Pruned`].

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

/// Schema version in `meta`; a database from a newer dfwatch is moved aside.
pub const SCHEMA_VERSION: i64 = 1;
/// The most `events.max_updates` may be: updates kept per alert (the new and end events are
/// always kept), so a long alert keeps its latest updates.
pub const MAX_UPDATES_PER_EVENT: u64 = 256;
/// Events deleted at a time while the database is over `events.max_db_bytes`.
const SIZE_CHUNK: u64 = 16;
/// Largest page of `list`.
pub const MAX_PAGE: usize = 500;
/// Events deleted in one transaction by retention.
pub const CHUNK: u64 = 1000;
/// Corrupt databases kept aside (older ones are deleted).
pub const KEEP_CORRUPT: usize = 2;

/// What retention keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_age: Duration,
    pub max_events: u64,
    pub max_media_bytes: u64,
    /// The database's own pages (rows and media; the WAL aside) at most: the oldest events
    /// go first, so it never stays past this for longer than one write.
    pub max_db_bytes: u64,
    /// Updates kept per event (the newest), beside its new and end.
    pub max_updates: u64,
}

impl Default for Limits {
    /// `[events]`'s defaults.
    fn default() -> Self {
        crate::events::EventsConfig::default().limits()
    }
}

/// What the bounds removed since the database was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Events removed for age.
    pub age: u64,
    /// Events removed because `max_events` was reached.
    pub count: u64,
    /// Media of old events removed to keep `max_media_bytes`.
    pub media: u64,
    /// Media not kept because one item alone is larger than `max_media_bytes`.
    pub media_too_large: u64,
    /// Old updates of long alerts removed.
    pub updates: u64,
    /// Events removed to keep the database within `max_db_bytes`.
    pub size: u64,
}

/// One step of an event's life: an alert event (its kind), or what an operator did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    New,
    Update,
    End,
    Review,
    Delete,
}

impl Change {
    fn as_str(self) -> &'static str {
        match self {
            Change::New => crate::types::AlertChange::New.as_str(),
            Change::Update => crate::types::AlertChange::Update.as_str(),
            Change::End => crate::types::AlertChange::End.as_str(),
            Change::Review => "review",
            Change::Delete => "delete",
        }
    }
}

impl From<crate::types::AlertChange> for Change {
    fn from(c: crate::types::AlertChange) -> Change {
        match c {
            crate::types::AlertChange::New => Change::New,
            crate::types::AlertChange::Update => Change::Update,
            crate::types::AlertChange::End => Change::End,
        }
    }
}

/// An alert event to record.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    pub alert_id: &'a str,
    pub change: Change,
    pub stream: &'a str,
    pub track: u64,
    pub at: SystemTime,
    /// The alert payload (JSON, as published).
    pub payload: &'a [u8],
    pub facts: &'a Facts,
}

/// The operator's word on an event: labels calibration can use later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Review {
    FalseAlarm,
    Confirmed,
}

impl Review {
    fn as_str(self) -> &'static str {
        match self {
            Review::FalseAlarm => "false_alarm",
            Review::Confirmed => "confirmed",
        }
    }
}

/// Media kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    /// The strongest frame, face box drawn.
    Snapshot,
    /// The aligned face crop.
    Face,
}

impl MediaKind {
    fn as_str(self) -> &'static str {
        match self {
            MediaKind::Snapshot => "snapshot",
            MediaKind::Face => "face",
        }
    }
}

/// An event as the API shows it (its latest state).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventSummary {
    pub alert_id: String,
    pub stream: String,
    pub track_id: u64,
    /// `open`, `ended`, or `interrupted` (open when a previous run of the daemon stopped
    /// without ending it).
    pub state: String,
    pub verdict: String,
    pub score: f64,
    pub max_score: f64,
    pub sentence: String,
    pub end_reason: Option<String>,
    /// RFC 3339.
    pub started: String,
    pub updated: String,
    pub ended: Option<String>,
    pub review: Option<Review>,
    pub review_note: Option<String>,
    pub reviewed: Option<String>,
    pub has_snapshot: bool,
    pub has_face: bool,
    /// The change counter at this event's last change (the SSE id).
    pub seq: u64,
    /// The latest payload's explanation: `sentence`, and `attributes` and `regions` with
    /// their probabilities, most probable first.
    pub explanation: serde_json::Value,
}

/// A filter for [`Db::list`].
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub stream: Option<String>,
    pub verdict: Option<String>,
    /// Events that started at or after (unix ms).
    pub since_ms: Option<i64>,
    /// Events that started before (unix ms).
    pub until_ms: Option<i64>,
    /// Events older than this alert id (the previous page's `next_cursor`).
    pub before: Option<String>,
    pub limit: usize,
}

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{path}: {what}")]
    Path { path: String, what: String },
    #[error("event store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("event store: the database is corrupt ({0})")]
    Corrupt(String),
}

impl DbError {
    /// The file itself is damaged (as opposed to a full disk or a lock).
    pub fn is_corrupt(&self) -> bool {
        match self {
            DbError::Corrupt(_) => true,
            DbError::Sql(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase
            ),
            _ => false,
        }
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// A connection to the file at `path` in `mode` (read-only or read-write), never through a
/// symlink, waiting up to 5 s for a lock another process holds.
fn connect(path: &Path, mode: rusqlite::OpenFlags) -> Result<Connection, DbError> {
    let conn = Connection::open_with_flags(
        path,
        mode | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
            | rusqlite::OpenFlags::SQLITE_OPEN_NOFOLLOW,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// The open database.
pub struct Db {
    conn: Connection,
    path: PathBuf,
    limits: Limits,
    media_bytes: u64,
    events: u64,
    pub pruned: Pruned,
    /// See [`Db::reset`].
    detached: bool,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    alert_id TEXT PRIMARY KEY,
    stream TEXT NOT NULL,
    track INTEGER NOT NULL,
    state TEXT NOT NULL,
    verdict TEXT NOT NULL,
    score REAL NOT NULL,
    max_score REAL NOT NULL,
    sentence TEXT NOT NULL,
    end_reason TEXT,
    started_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    review TEXT,
    review_note TEXT,
    reviewed_ms INTEGER,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_stream ON events (stream, alert_id);
CREATE INDEX IF NOT EXISTS events_updated ON events (updated_ms);
CREATE INDEX IF NOT EXISTS events_seq ON events (seq);
CREATE TABLE IF NOT EXISTS lifecycle (
    id INTEGER PRIMARY KEY,
    alert_id TEXT NOT NULL,
    change TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS lifecycle_alert ON lifecycle (alert_id, id);
CREATE TABLE IF NOT EXISTS media (
    alert_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    jpeg BLOB NOT NULL,
    PRIMARY KEY (alert_id, kind)
) WITHOUT ROWID;
";

/// What an alert event says of the alert's state, typed by the decision stage beside the
/// payload it publishes (the store never reads the payload back).
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    /// `fake`, `real` or `uncertain`.
    pub verdict: &'static str,
    pub score: f64,
    /// The explanation's sentence.
    pub sentence: String,
    /// Why it ended (an `end`).
    pub end_reason: Option<&'static str>,
}

impl Db {
    /// Opens (or creates) the database at `path`. A damaged file, or one from a newer
    /// schema, is moved aside (`<name>.corrupt-<unix time>`, with its WAL) and a fresh one
    /// started; the second value says so. Refuses a symlink. Events a previous run left open
    /// become `interrupted`.
    pub fn open(path: &Path, limits: Limits) -> Result<(Db, Option<String>), DbError> {
        let path_err = |what: String| DbError::Path {
            path: path.display().to_string(),
            what,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| path_err(format!("cannot create its directory: {e}")))?;
        }
        match Db::open_checked(path, limits) {
            Ok(db) => Ok((db, None)),
            Err(e) if e.is_corrupt() => {
                let aside = move_aside(path)
                    .map_err(|e| path_err(format!("corrupt, and cannot be moved aside: {e}")))?;
                let why = format!("{e}; moved to {}", aside.display());
                let db = Db::open_checked(path, limits)?;
                Ok((db, Some(why)))
            }
            Err(e) => Err(e),
        }
    }

    /// Opens an existing database to read only (what offline tools use, beside a running
    /// daemon): never created, changed, moved aside or followed through a symlink.
    pub fn open_read_only(path: &Path) -> Result<Db, DbError> {
        let path_err = |what: String| DbError::Path {
            path: path.display().to_string(),
            what,
        };
        match check_file(path) {
            Err(what) => return Err(path_err(what)),
            Ok(false) => return Err(path_err("does not exist".into())),
            Ok(true) => {}
        }
        let conn = connect(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let tables: i64 = conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('events', 'media')",
            [],
            |r| r.get(0),
        )?;
        if tables != 2 {
            return Err(path_err("is not a dfwatch event store".into()));
        }
        Ok(Db {
            conn,
            path: path.to_path_buf(),
            // Never applied: nothing is written.
            limits: Limits {
                max_age: Duration::MAX,
                max_events: u64::MAX,
                max_media_bytes: u64::MAX,
                max_db_bytes: u64::MAX,
                max_updates: MAX_UPDATES_PER_EVENT,
            },
            media_bytes: 0,
            events: 0,
            pruned: Pruned::default(),
            detached: false,
        })
    }

    fn open_checked(path: &Path, limits: Limits) -> Result<Db, DbError> {
        let path_err = |what: String| DbError::Path {
            path: path.display().to_string(),
            what,
        };
        match check_file(path) {
            Err(what) => return Err(path_err(what)),
            Ok(true) => {}
            Ok(false) => {
                // Created private: frames and face crops are biometric data. SQLite gives
                // its WAL and shared-memory files the database's mode.
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(path)
                    .map_err(|e| path_err(format!("cannot create: {e}")))?;
            }
        }
        let conn = connect(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        // Incremental vacuum must be chosen before the first table exists; later it is a
        // no-op, and pages freed by retention go back to the file system.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(path_err(format!(
                "the file system refused WAL mode (got {mode})"
            )));
        }
        // Every commit reaches the disk before it is reported: committed events survive a
        // SIGKILL and a power cut.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
        let check: String = conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(DbError::Corrupt(check));
        }
        conn.execute_batch(SCHEMA)?;
        let version: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()?;
        match version {
            None => {
                // The change counter starts at the clock (ms): a database started afresh
                // after damage counts on above every id a client saw from the old one.
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?1), ('seq', ?2)",
                    params![SCHEMA_VERSION, unix_ms(SystemTime::now())],
                )?;
            }
            Some(v) if v == SCHEMA_VERSION => {}
            Some(v) => {
                return Err(DbError::Corrupt(format!(
                    "schema version {v}, this dfwatch reads {SCHEMA_VERSION}"
                )));
            }
        }
        let mut db = Db {
            conn,
            path: path.to_path_buf(),
            limits,
            media_bytes: 0,
            events: 0,
            pruned: Pruned::default(),
            detached: false,
        };
        db.media_bytes = db
            .conn
            .query_row("SELECT COALESCE(SUM(bytes), 0) FROM media", [], |r| {
                r.get::<_, i64>(0)
            })?
            .max(0) as u64;
        db.events = db
            .conn
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get::<_, i64>(0))?
            .max(0) as u64;
        let seq = bump_seq(&db.conn)?;
        db.conn.execute(
            "UPDATE events SET state = 'interrupted', seq = ?1 WHERE state = 'open'",
            [seq],
        )?;
        Ok(db)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Events in the database.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Bytes of media in the database.
    pub fn media_bytes(&self) -> u64 {
        self.media_bytes
    }

    /// Records one lifecycle step in one transaction; returns the event's summary after it.
    pub fn record(&mut self, r: &Record<'_>) -> Result<Option<EventSummary>, DbError> {
        let tx = self.conn.transaction()?;
        let seq: i64 = bump_seq(&tx)?;
        let at = unix_ms(r.at);
        let f = r.facts;
        let payload = std::str::from_utf8(r.payload).unwrap_or("{}");
        let exists = has_event(&tx, r.alert_id)?;
        // An update or end whose new was not recorded (a full queue, a store that was
        // reset) still makes an event: history with a gap beats none.
        let (state, ended) = match r.change {
            Change::End => ("ended", Some(at)),
            _ => ("open", None),
        };
        tx.execute(
            "INSERT INTO events (alert_id, stream, track, state, verdict, score, max_score,
                sentence, end_reason, started_ms, updated_ms, ended_ms, seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7, ?8, ?9, ?9, ?10, ?11)
             ON CONFLICT (alert_id) DO UPDATE SET state = excluded.state,
                verdict = excluded.verdict, score = excluded.score,
                max_score = MAX(max_score, excluded.score), sentence = excluded.sentence,
                end_reason = COALESCE(excluded.end_reason, end_reason),
                updated_ms = excluded.updated_ms,
                ended_ms = COALESCE(excluded.ended_ms, ended_ms), seq = excluded.seq",
            params![
                r.alert_id,
                r.stream,
                i64::try_from(r.track).unwrap_or(i64::MAX),
                state,
                f.verdict,
                f.score,
                f.sentence,
                f.end_reason,
                at,
                ended,
                seq
            ],
        )?;
        let added = !exists;
        tx.execute(
            "INSERT INTO lifecycle (alert_id, change, at_ms, payload) VALUES (?1, ?2, ?3, ?4)",
            params![r.alert_id, r.change.as_str(), at, payload],
        )?;
        let mut pruned_updates = 0;
        if r.change == Change::Update {
            pruned_updates = tx.execute(
                "DELETE FROM lifecycle WHERE id IN (
                    SELECT id FROM lifecycle WHERE alert_id = ?1 AND change = 'update'
                    ORDER BY id DESC LIMIT -1 OFFSET ?2)",
                params![
                    r.alert_id,
                    i64::try_from(self.limits.max_updates).unwrap_or(i64::MAX)
                ],
            )?;
        }
        tx.commit()?;
        self.pruned.updates += pruned_updates as u64;
        if added {
            self.events += 1;
            if self.events > self.limits.max_events {
                let over = self.events - self.limits.max_events;
                let n = self.delete_oldest(over)?;
                self.pruned.count += n;
            }
        }
        self.keep_size(Some(r.alert_id))?;
        self.get(r.alert_id)
    }

    /// Stores (or replaces) a media item of an existing event, first removing the media of
    /// the oldest events while the total would pass `max_media_bytes`: the total never
    /// passes it. `false` when the event is gone or the item alone is larger than the cap.
    pub fn put_media(
        &mut self,
        alert_id: &str,
        kind: MediaKind,
        jpeg: &[u8],
    ) -> Result<bool, DbError> {
        let n = jpeg.len() as u64;
        if n > self.limits.max_media_bytes {
            self.pruned.media_too_large += 1;
            return Ok(false);
        }
        if !has_event(&self.conn, alert_id)? {
            return Ok(false);
        }
        let old: u64 = self
            .conn
            .query_row(
                "SELECT bytes FROM media WHERE alert_id = ?1 AND kind = ?2",
                params![alert_id, kind.as_str()],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .unwrap_or(0)
            .max(0) as u64;
        let freed_any = self.evict_media(n, old, Some(alert_id))?;
        if self.media_bytes - old + n > self.limits.max_media_bytes {
            self.pruned.media_too_large += 1;
            return Ok(false);
        }
        let tx = self.conn.transaction()?;
        let seq: i64 = bump_seq(&tx)?;
        tx.execute(
            "INSERT OR REPLACE INTO media (alert_id, kind, bytes, jpeg) VALUES (?1, ?2, ?3, ?4)",
            params![alert_id, kind.as_str(), n as i64, jpeg],
        )?;
        tx.execute(
            "UPDATE events SET seq = ?2 WHERE alert_id = ?1",
            params![alert_id, seq],
        )?;
        tx.commit()?;
        self.media_bytes = self.media_bytes - old + n;
        if freed_any {
            self.give_back_pages()?;
        }
        self.keep_size(Some(alert_id))?;
        Ok(true)
    }

    /// Bytes of the database's pages in use (its file less the free pages, the WAL aside).
    pub fn db_bytes(&self) -> Result<u64, DbError> {
        let pragma = |name: &str| -> Result<u64, DbError> {
            let v: i64 = self
                .conn
                .query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))?;
            Ok(v.max(0) as u64)
        };
        let used = pragma("page_count")?.saturating_sub(pragma("freelist_count")?);
        Ok(used.saturating_mul(pragma("page_size")?))
    }

    /// Removes the oldest events (all but `spare`, the one just written) while the database
    /// is over `max_db_bytes`; counted, and the freed pages given back.
    fn keep_size(&mut self, spare: Option<&str>) -> Result<(), DbError> {
        let mut freed = false;
        while self.db_bytes()? > self.limits.max_db_bytes {
            let ids: Vec<String> = {
                let mut st = self.conn.prepare(
                    "SELECT alert_id FROM events WHERE ?1 IS NULL OR alert_id != ?1
                     ORDER BY alert_id LIMIT ?2",
                )?;
                st.query_map(params![spare, SIZE_CHUNK as i64], |r| r.get(0))?
                    .collect::<Result<_, _>>()?
            };
            if ids.is_empty() {
                break;
            }
            self.pruned.size += self.delete_ids(&ids)?;
            freed = true;
        }
        if freed {
            self.give_back_pages()?;
        }
        Ok(())
    }

    /// Removes the media of the oldest events (all but `spare`'s) while the total, less
    /// `credit` bytes about to be replaced, plus `need` new bytes is over `max_media_bytes`;
    /// counted. Returns whether anything went.
    fn evict_media(
        &mut self,
        need: u64,
        credit: u64,
        spare: Option<&str>,
    ) -> Result<bool, DbError> {
        let mut freed = false;
        while self.media_bytes - credit + need > self.limits.max_media_bytes {
            let oldest: Option<String> = self
                .conn
                .query_row(
                    "SELECT alert_id FROM media WHERE ?1 IS NULL OR alert_id != ?1
                     ORDER BY alert_id LIMIT 1",
                    [spare],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(oldest) = oldest else { break };
            self.drop_media(&oldest)?;
            self.pruned.media += 1;
            freed = true;
        }
        Ok(freed)
    }

    fn drop_media(&mut self, alert_id: &str) -> Result<(), DbError> {
        let bytes: i64 = self.conn.query_row(
            "SELECT COALESCE(SUM(bytes), 0) FROM media WHERE alert_id = ?1",
            [alert_id],
            |r| r.get(0),
        )?;
        self.conn
            .execute("DELETE FROM media WHERE alert_id = ?1", [alert_id])?;
        self.media_bytes = self.media_bytes.saturating_sub(bytes.max(0) as u64);
        Ok(())
    }

    /// Removes up to `n` (at most [`CHUNK`]) of the oldest events with their lifecycle and
    /// media.
    fn delete_oldest(&mut self, n: u64) -> Result<u64, DbError> {
        let ids: Vec<String> = {
            let mut st = self
                .conn
                .prepare("SELECT alert_id FROM events ORDER BY alert_id LIMIT ?1")?;
            st.query_map([n.min(CHUNK) as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        self.delete_ids(&ids)
    }

    /// Deletes events with their lifecycle and media in one transaction (one sync however
    /// many); returns how many there were.
    fn delete_ids(&mut self, ids: &[String]) -> Result<u64, DbError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let tx = self.conn.transaction()?;
        let (mut bytes, mut n) = (0i64, 0u64);
        for id in ids {
            bytes += tx.query_row(
                "SELECT COALESCE(SUM(bytes), 0) FROM media WHERE alert_id = ?1",
                [id],
                |r| r.get::<_, i64>(0),
            )?;
            tx.execute("DELETE FROM media WHERE alert_id = ?1", [id])?;
            tx.execute("DELETE FROM lifecycle WHERE alert_id = ?1", [id])?;
            n += tx.execute("DELETE FROM events WHERE alert_id = ?1", [id])? as u64;
        }
        bump_seq(&tx)?;
        tx.commit()?;
        self.media_bytes = self.media_bytes.saturating_sub(bytes.max(0) as u64);
        self.events = self.events.saturating_sub(n);
        Ok(n)
    }

    /// Deletes one event and its media; `false` when there was none. A deletion advances
    /// the change counter like any change.
    pub fn delete(&mut self, alert_id: &str) -> Result<bool, DbError> {
        Ok(self.delete_ids(&[alert_id.to_string()])? > 0)
    }

    /// Retention, one chunk at a time (the caller releases the database between calls, so
    /// API reads are never held up for long): up to [`CHUNK`] events not changed within
    /// `max_age` of `now`, then up to [`CHUNK`] past `max_events`, oldest first; then the
    /// media of the oldest events while their total is over `max_media_bytes` (after the
    /// cap was lowered). Returns how many events went: [`CHUNK`] or more means call again.
    pub fn sweep(&mut self, now: SystemTime) -> Result<u64, DbError> {
        let cutoff = unix_ms(now)
            .saturating_sub(i64::try_from(self.limits.max_age.as_millis()).unwrap_or(i64::MAX));
        let ids: Vec<String> = {
            let mut st = self.conn.prepare(
                "SELECT alert_id FROM events WHERE updated_ms < ?1 ORDER BY alert_id LIMIT ?2",
            )?;
            st.query_map(params![cutoff, CHUNK as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        let aged = self.delete_ids(&ids)?;
        self.pruned.age += aged;
        let mut counted = 0;
        if self.events > self.limits.max_events {
            counted = self.delete_oldest(self.events - self.limits.max_events)?;
            self.pruned.count += counted;
        }
        self.evict_media(0, 0, None)?;
        if aged + counted > 0 {
            self.give_back_pages()?;
        }
        // After the cap was lowered.
        self.keep_size(None)?;
        Ok(aged + counted)
    }

    fn give_back_pages(&self) -> Result<(), DbError> {
        self.conn
            .execute_batch("PRAGMA incremental_vacuum(4096);")?;
        Ok(())
    }

    /// Sets (or replaces) the review of an event; its summary after, `None` when there is
    /// no such event.
    pub fn review(
        &mut self,
        alert_id: &str,
        review: Review,
        note: Option<&str>,
        now: SystemTime,
    ) -> Result<Option<EventSummary>, DbError> {
        let tx = self.conn.transaction()?;
        let seq: i64 = bump_seq(&tx)?;
        let n = tx.execute(
            "UPDATE events SET review = ?2, review_note = ?3, reviewed_ms = ?4, seq = ?5
             WHERE alert_id = ?1",
            params![alert_id, review.as_str(), note, unix_ms(now), seq],
        )?;
        tx.commit()?;
        if n == 0 {
            return Ok(None);
        }
        self.get(alert_id)
    }

    fn summary_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventSummary> {
        let review: Option<String> = r.get("review")?;
        Ok(EventSummary {
            alert_id: r.get("alert_id")?,
            stream: r.get("stream")?,
            track_id: r.get::<_, i64>("track")?.max(0) as u64,
            state: r.get("state")?,
            verdict: r.get("verdict")?,
            score: r.get("score")?,
            max_score: r.get("max_score")?,
            sentence: r.get("sentence")?,
            end_reason: r.get("end_reason")?,
            started: rfc3339(r.get("started_ms")?),
            updated: rfc3339(r.get("updated_ms")?),
            ended: r.get::<_, Option<i64>>("ended_ms")?.map(rfc3339),
            review: match review.as_deref() {
                Some("false_alarm") => Some(Review::FalseAlarm),
                Some("confirmed") => Some(Review::Confirmed),
                _ => None,
            },
            review_note: r.get("review_note")?,
            reviewed: r.get::<_, Option<i64>>("reviewed_ms")?.map(rfc3339),
            has_snapshot: r.get("has_snapshot")?,
            has_face: r.get("has_face")?,
            seq: r.get::<_, i64>("seq")?.max(0) as u64,
            explanation: r
                .get::<_, Option<String>>("latest")?
                .and_then(|p| serde_json::from_str::<serde_json::Value>(&p).ok())
                .map(|mut v| v["explanation"].take())
                .unwrap_or_default(),
        })
    }

    const SELECT: &'static str = "SELECT e.*,
        EXISTS (SELECT 1 FROM media m WHERE m.alert_id = e.alert_id AND m.kind = 'snapshot')
            AS has_snapshot,
        EXISTS (SELECT 1 FROM media m WHERE m.alert_id = e.alert_id AND m.kind = 'face')
            AS has_face,
        (SELECT l.payload FROM lifecycle l WHERE l.alert_id = e.alert_id ORDER BY l.id DESC
            LIMIT 1) AS latest
        FROM events e";

    /// One event's summary.
    pub fn get(&self, alert_id: &str) -> Result<Option<EventSummary>, DbError> {
        Ok(self
            .conn
            .query_row(
                &format!("{} WHERE e.alert_id = ?1", Db::SELECT),
                [alert_id],
                Db::summary_row,
            )
            .optional()?)
    }

    /// One event's lifecycle: `(change, unix ms, payload JSON)` in order.
    pub fn lifecycle(&self, alert_id: &str) -> Result<Vec<(String, i64, String)>, DbError> {
        let mut st = self.conn.prepare(
            "SELECT change, at_ms, payload FROM lifecycle WHERE alert_id = ?1 ORDER BY id",
        )?;
        let rows = st
            .query_map([alert_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// A page of events, newest first, and the cursor of the next page (`None` at the end).
    pub fn list(&self, f: &Filter) -> Result<(Vec<EventSummary>, Option<String>), DbError> {
        let limit = f.limit.clamp(1, MAX_PAGE);
        let sql = format!(
            "{} WHERE (?1 IS NULL OR e.stream = ?1) AND (?2 IS NULL OR e.verdict = ?2)
               AND (?3 IS NULL OR e.started_ms >= ?3) AND (?4 IS NULL OR e.started_ms < ?4)
               AND (?5 IS NULL OR e.alert_id < ?5)
             ORDER BY e.alert_id DESC LIMIT ?6",
            Db::SELECT
        );
        let mut st = self.conn.prepare(&sql)?;
        let mut items: Vec<EventSummary> = st
            .query_map(
                params![
                    f.stream,
                    f.verdict,
                    f.since_ms,
                    f.until_ms,
                    f.before,
                    (limit + 1) as i64
                ],
                Db::summary_row,
            )?
            .collect::<Result<_, _>>()?;
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|e| e.alert_id.clone())
        } else {
            None
        };
        Ok((items, next))
    }

    /// Events changed after `seq`, oldest change first (SSE replay after a reconnect).
    pub fn changed_since(&self, seq: u64, limit: usize) -> Result<Vec<EventSummary>, DbError> {
        let mut st = self.conn.prepare(&format!(
            "{} WHERE e.seq > ?1 ORDER BY e.seq LIMIT ?2",
            Db::SELECT
        ))?;
        let rows = st
            .query_map(
                params![i64::try_from(seq).unwrap_or(i64::MAX), limit as i64],
                Db::summary_row,
            )?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Events that started at or after `since_ms` and after the alert id `after`, oldest
    /// first (the export's pages).
    pub fn export_page(
        &self,
        since_ms: Option<i64>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EventSummary>, DbError> {
        let mut st = self.conn.prepare(&format!(
            "{} WHERE (?1 IS NULL OR e.started_ms >= ?1) AND (?2 IS NULL OR e.alert_id > ?2)
             ORDER BY e.alert_id LIMIT ?3",
            Db::SELECT
        ))?;
        let rows = st
            .query_map(params![since_ms, after, limit as i64], Db::summary_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// A media item.
    pub fn media(&self, alert_id: &str, kind: MediaKind) -> Result<Option<Vec<u8>>, DbError> {
        Ok(self
            .conn
            .query_row(
                "SELECT jpeg FROM media WHERE alert_id = ?1 AND kind = ?2",
                params![alert_id, kind.as_str()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The newest `limit` payloads, newest last (`/api/alerts`).
    pub fn recent_payloads(&self, limit: usize) -> Result<Vec<String>, DbError> {
        let mut st = self
            .conn
            .prepare("SELECT payload FROM lifecycle ORDER BY id DESC LIMIT ?1")?;
        let mut rows: Vec<String> = st
            .query_map([limit as i64], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        rows.reverse();
        Ok(rows)
    }

    /// Moves the damaged file aside and opens a fresh one in its place (the counters of
    /// what retention removed carry over). Returns where the old file went. When this fails
    /// (the file cannot be moved, the disk is full), the database stays detached: every call
    /// fails until a later reset succeeds ([`Db::detached`]).
    pub fn reset(&mut self) -> Result<Option<PathBuf>, DbError> {
        if !self.detached {
            // The damaged connection closes before its file moves.
            drop(std::mem::replace(
                &mut self.conn,
                Connection::open_in_memory()?,
            ));
            self.detached = true;
        }
        let aside = match std::fs::symlink_metadata(&self.path) {
            Ok(_) => Some(move_aside(&self.path).map_err(|e| DbError::Path {
                path: self.path.display().to_string(),
                what: format!("corrupt, and cannot be moved aside: {e}"),
            })?),
            Err(_) => None,
        };
        let pruned = self.pruned;
        *self = Db::open_checked(&self.path, self.limits)?;
        self.pruned = pruned;
        Ok(aside)
    }

    /// The connection was closed by a reset that has not succeeded yet.
    pub fn detached(&self) -> bool {
        self.detached
    }

    /// The change counter now.
    pub fn seq(&self) -> Result<u64, DbError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'seq'", [], |r| {
                r.get::<_, i64>(0)
            })?
            .max(0) as u64)
    }
}

/// The event `alert_id` is in the database.
fn has_event(conn: &Connection, alert_id: &str) -> rusqlite::Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM events WHERE alert_id = ?1",
            [alert_id],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// The change counter, one step on: every change stamps its event with it (the SSE id).
fn bump_seq(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "UPDATE meta SET value = value + 1 WHERE key = 'seq' RETURNING value",
        [],
        |r| r.get(0),
    )
}

/// What the daemon needs of the database's path before it opens it (`validate` checks the
/// same): `Ok(true)` when a regular file is there, `Ok(false)` when none is yet; refused: a
/// symbolic link (never followed), anything but a regular file, a parent that is not a
/// directory.
pub fn check_file(path: &Path) -> Result<bool, String> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && let Ok(m) = std::fs::metadata(parent)
        && !m.is_dir()
    {
        return Err(format!("{} is not a directory", parent.display()));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err("is a symbolic link; not followed".into()),
        Ok(m) if !m.is_file() => Err("is not a regular file".into()),
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("cannot read: {e}")),
    }
}

/// Moves a damaged database (and its WAL and shared-memory files) aside; keeps the newest
/// [`KEEP_CORRUPT`] of them.
fn move_aside(path: &Path) -> std::io::Result<PathBuf> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "events.db".into());
    let aside = path.with_file_name(format!("{name}.corrupt-{stamp}"));
    std::fs::rename(path, &aside)?;
    for ext in ["-wal", "-shm"] {
        let side = path.with_file_name(format!("{name}{ext}"));
        if side.exists() {
            let _ = std::fs::rename(
                &side,
                aside.with_file_name(format!("{name}.corrupt-{stamp}{ext}")),
            );
        }
    }
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        let prefix = format!("{name}.corrupt-");
        let mut kept: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                let stamp = n.strip_prefix(&prefix)?.parse::<u64>().ok()?;
                Some((stamp, e.path()))
            })
            .collect();
        kept.sort();
        let excess = kept.len().saturating_sub(KEEP_CORRUPT);
        for (stamp, p) in kept.into_iter().take(excess) {
            let _ = std::fs::remove_file(&p);
            for ext in ["-wal", "-shm"] {
                let _ =
                    std::fs::remove_file(p.with_file_name(format!("{name}.corrupt-{stamp}{ext}")));
            }
        }
    }
    Ok(aside)
}

#[cfg(test)]
mod tests;
