//! The spool's file: appends made durable (rolled back to the last good length when a write
//! fails), compaction by atomic replacement, and the writer thread that drives both.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Damaged logs kept aside for a person to look at; older ones are removed.
pub const DAMAGED_KEPT: usize = 3;

/// The log file of a spool.
#[derive(Debug)]
pub struct SpoolLog {
    dir: PathBuf,
    /// `None` after a compaction renamed the new file in but could not open it: the next
    /// write opens it (never the unlinked old inode).
    file: Option<File>,
    /// Bytes known to be whole records, durable.
    len: u64,
    /// Tests: fail the next write after this many bytes, as a full disk would.
    #[cfg(test)]
    pub(crate) fail_after: Option<usize>,
}

fn path_of(dir: &Path) -> PathBuf {
    dir.join("spool.log")
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl SpoolLog {
    /// Opens the log in `dir` for appending, cut to `valid_len` (a torn tail).
    pub fn open(dir: &Path, valid_len: u64) -> io::Result<SpoolLog> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path_of(dir))?;
        if file.metadata()?.len() != valid_len {
            file.set_len(valid_len)?;
            file.sync_all()?;
        }
        Ok(SpoolLog {
            dir: dir.to_path_buf(),
            file: Some(file),
            len: valid_len,
            #[cfg(test)]
            fail_after: None,
        })
    }

    fn file(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            let f = OpenOptions::new().append(true).open(path_of(&self.dir))?;
            self.len = f.metadata()?.len();
            self.file = Some(f);
        }
        Ok(self.file.as_mut().expect("just opened"))
    }

    /// Appends `bytes` (whole records) and fsyncs. On failure (a full disk) the file is cut
    /// back to its last good length, so a partial record never poisons later appends.
    pub fn write_durably(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let good = self.len;
        #[cfg(test)]
        let fail_after = self.fail_after.take();
        let f = self.file()?;
        #[cfg(test)]
        let result = match fail_after {
            Some(n) => f
                .write_all(&bytes[..n.min(bytes.len())])
                .and_then(|_| Err(io::Error::from_raw_os_error(28))),
            None => f.write_all(bytes).and_then(|_| f.sync_data()),
        };
        #[cfg(not(test))]
        let result = f.write_all(bytes).and_then(|_| f.sync_data());
        match result {
            Ok(()) => {
                self.len = good + bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                if let Err(cut) = f.set_len(good).and_then(|_| f.sync_data()) {
                    tracing::error!(error = %cut, "Spool: could not cut a failed write back; reopening the log.");
                    self.file = None;
                }
                Err(e)
            }
        }
    }

    /// Replaces the whole log with `snapshot`: write a temporary file, fsync, rename it in,
    /// open it, then fsync the directory. On failure the temporary file is removed and the
    /// old log stays as it was.
    pub fn replace(&mut self, snapshot: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join("spool.log.tmp");
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(snapshot)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path_of(&self.dir))
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        // The new file first: whatever happens next, writes go to the log on disk now.
        self.file = None;
        self.file()?;
        self.len = snapshot.len() as u64;
        sync_dir(&self.dir)
    }

    /// Keeps the damaged log `data` aside as `spool.log.damaged-<ms>` for a person to look
    /// at, keeping only the newest [`DAMAGED_KEPT`].
    pub fn keep_damaged(dir: &Path, data: &[u8], now_ms: u64) -> io::Result<PathBuf> {
        let path = dir.join(format!("spool.log.damaged-{now_ms}"));
        let mut f = File::create(&path)?;
        f.write_all(data)?;
        f.sync_all()?;
        let mut kept: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("spool.log.damaged-"))
            })
            .collect();
        kept.sort();
        while kept.len() > DAMAGED_KEPT {
            let _ = std::fs::remove_file(kept.remove(0));
        }
        Ok(path)
    }
}

/// What the writer thread is asked to do, in order.
pub enum LogCommand {
    /// Append these records and fsync; `batch` comes back in [`LogDone::Written`].
    Write { batch: u64, bytes: Vec<u8> },
    /// Replace the log with this snapshot (after the writes before it).
    Compact(Vec<u8>),
}

/// What the writer thread did.
#[derive(Debug)]
pub enum LogDone {
    /// Every batch up to and including `through` is settled with `result`.
    Written {
        through: u64,
        result: io::Result<()>,
    },
    /// A compaction finished (or failed, leaving the old log as it was).
    Compacted { result: io::Result<()> },
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
                            tracing::error!(error = %e, "Spool: write failed; alerts are published but not durable until the disk takes writes again.");
                        }
                        let _ = done.send(LogDone::Written { through, result });
                    }
                    LogCommand::Compact(snapshot) => {
                        let result = log.replace(&snapshot);
                        if let Err(e) = &result {
                            tracing::error!(error = %e, "Spool: compaction failed; the old log stays and it is tried again.");
                        }
                        let _ = done.send(LogDone::Compacted { result });
                    }
                }
                if next.is_none() {
                    next = rx.recv().ok();
                }
            }
        })?;
    Ok((tx, thread))
}
