//! The spool's writer thread, seen from the publisher's task: batches of records go to it,
//! and alerts are answered once their batch is durable (group commit).

use std::collections::VecDeque;

use tokio::sync::{mpsc, oneshot};

use crate::publish::spool::{LogDone, Spool};

/// The spool's writer thread, seen from the publisher task.
pub(crate) struct Writer {
    pub(crate) commands: std::sync::mpsc::Sender<crate::publish::spool::LogCommand>,
    pub(crate) done: mpsc::UnboundedReceiver<LogDone>,
    pub(crate) thread: std::thread::JoinHandle<()>,
    pub(crate) next_batch: u64,
    pub(crate) awaiting: Awaiting,
}

impl Writer {
    /// Sends what the spool buffered since the last call; `alerts` are answered once durable.
    pub(crate) fn flush(
        &mut self,
        spool: &mut Spool,
        alerts: Vec<(u64, oneshot::Sender<std::io::Result<u64>>)>,
    ) {
        spool.enforce_limits(crate::publish::spool::now_ms());
        let bytes = spool.take_buffer();
        if bytes.is_empty() && alerts.is_empty() {
            // Nothing new, but a rewrite may be due (a failed write or compaction).
            if let Some(snapshot) = spool.compaction_snapshot() {
                let _ = self
                    .commands
                    .send(crate::publish::spool::LogCommand::Compact(snapshot));
            }
            return;
        }
        self.next_batch += 1;
        let batch = self.next_batch;
        if self
            .commands
            .send(crate::publish::spool::LogCommand::Write { batch, bytes })
            .is_err()
        {
            tracing::error!("Spool writer thread is gone; alerts are not durable.");
            for (_, tx) in alerts {
                let _ = tx.send(Err(std::io::Error::other(
                    "the spool writer thread is gone",
                )));
            }
            return;
        }
        if !alerts.is_empty() {
            self.awaiting.push_back((batch, alerts));
        }
        if let Some(snapshot) = spool.compaction_snapshot() {
            let _ = self
                .commands
                .send(crate::publish::spool::LogCommand::Compact(snapshot));
        }
    }

    /// Writes what is left, waits for the thread and answers everyone.
    pub(crate) async fn finish(mut self, spool: &mut Spool) {
        self.flush(spool, Vec::new());
        drop(self.commands);
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        while let Ok(d) = self.done.try_recv() {
            if let LogDone::Written { through, result } = d {
                settle(&mut self.awaiting, through, &result);
            }
        }
    }
}

/// Alerts waiting for the fsync of their batch, in batch order.
pub(crate) type Awaiting = VecDeque<(u64, Vec<(u64, oneshot::Sender<std::io::Result<u64>>)>)>;

/// Answers the alerts of every batch through `through` with `result`; returns their sequence
/// numbers, to be published (durable or not: while the disk refuses writes, alerts still go
/// to the broker).
pub(crate) fn settle(
    awaiting: &mut Awaiting,
    through: u64,
    result: &std::io::Result<()>,
) -> Vec<u64> {
    let mut settled = Vec::new();
    while awaiting.front().is_some_and(|(batch, _)| *batch <= through) {
        let (_, alerts) = awaiting.pop_front().expect("front exists");
        for (seq, tx) in alerts {
            let _ = tx.send(match result {
                Ok(()) => Ok(seq),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            });
            settled.push(seq);
        }
    }
    settled
}
