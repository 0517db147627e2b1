//! The webhooks' side of the publisher: a worker per webhook, fed one delivery at a time from
//! the outbox, and what each says back.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::publish::mqtt::session::AbortOnDrop;
use crate::publish::outbox::{Outbox, Sink, SinkId};
use crate::publish::spool::Spool;
use crate::publish::webhook::{Delivery, Outcome, Webhook};

/// The webhooks' side of the task: a worker per webhook (ended with the run that started it)
/// and the channel their outcomes come back on.
pub(crate) struct Hooks {
    pub(crate) hooks: Vec<Arc<Webhook>>,
    pub(crate) senders: Vec<mpsc::Sender<Delivery>>,
    pub(crate) results_tx: mpsc::Sender<(SinkId, u64, Outcome)>,
    pub(crate) results: mpsc::Receiver<(SinkId, u64, Outcome)>,
    /// Per webhook: the oldest event it still owes (its worker abandons anything below).
    pub(crate) floors: Vec<Arc<std::sync::atomic::AtomicU64>>,
    pub(crate) workers: Vec<AbortOnDrop>,
}

impl Hooks {
    pub(crate) fn start(hooks: &[Arc<Webhook>]) -> Hooks {
        let (results_tx, results) = mpsc::channel(hooks.len().max(1) * 2);
        let mut h = Hooks {
            hooks: hooks.to_vec(),
            senders: Vec::new(),
            results_tx,
            results,
            floors: Vec::new(),
            workers: Vec::new(),
        };
        for i in 0..hooks.len() {
            h.floors.push(Arc::default());
            let (tx, worker) = h.spawn_worker(i);
            h.senders.push(tx);
            h.workers.push(worker);
        }
        h
    }

    /// Webhook `i`'s worker: one delivery at a time (the outbox keeps the rest, oldest first).
    pub(crate) fn spawn_worker(&self, i: usize) -> (mpsc::Sender<Delivery>, AbortOnDrop) {
        let (tx, rx) = mpsc::channel(1);
        let worker = AbortOnDrop(tokio::spawn(crate::publish::webhook::worker(
            self.hooks[i].clone(),
            Sink::Webhook(i).id(),
            rx,
            self.results_tx.clone(),
            self.floors[i].clone(),
        )));
        (tx, worker)
    }

    /// A durable alert joining the outbox: webhooks that take no events of its kind never owe
    /// it (so such events never count against their caps, and `pump` never sees them).
    pub(crate) fn settle_unwanted(&self, outbox: &mut Outbox, spool: &mut Spool, seq: u64) {
        let Some(kind) = spool.get(seq).map(|e| e.kind) else {
            return;
        };
        for (i, hook) in self.hooks.iter().enumerate() {
            if !hook.cfg.wants(kind)
                && let Some(done) = outbox.settled(Sink::Webhook(i).id(), seq)
            {
                spool.ack(done);
            }
        }
    }

    /// Moves each worker's floor up to the oldest event its webhook still owes.
    pub(crate) fn share_floors(&self, outbox: &Outbox) {
        for (i, f) in self.floors.iter().enumerate() {
            let first = outbox.first_owed(Sink::Webhook(i).id()).unwrap_or(u64::MAX);
            f.store(first, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub(crate) fn sink_name(&self, sink: SinkId) -> String {
        Sink::of(sink).name(|i| self.hooks[i].cfg.name.clone())
    }

    /// Hands each webhook what the outbox says is next (one at a time).
    pub(crate) fn pump(&mut self, outbox: &mut Outbox, spool: &mut Spool) {
        let mut restart = Vec::new();
        for (i, hook) in self.hooks.iter().enumerate() {
            let sink = Sink::Webhook(i).id();
            while let Some(seq) = outbox.next(sink) {
                let Some(entry) = spool.get(seq) else {
                    outbox.forget(seq);
                    continue;
                };
                let d = Delivery {
                    seq,
                    alert_id: entry.key.clone(),
                    kind: entry.kind,
                    payload: entry.payload.clone(),
                };
                match self.senders[i].try_send(d) {
                    Ok(()) => {
                        outbox.handed(sink, Some(seq));
                        outbox.tagged(sink, seq);
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        outbox.refused(sink, seq);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        // The worker is gone (a panic): what it held is forgotten and sent
                        // again by a new one.
                        tracing::error!(webhook = %hook.cfg.name, "Webhook worker stopped; starting it again.");
                        outbox.disconnected(sink);
                        outbox.connected(sink);
                        restart.push(i);
                        break;
                    }
                }
            }
        }
        for i in restart {
            let (tx, worker) = self.spawn_worker(i);
            self.senders[i] = tx;
            self.workers[i] = worker;
        }
    }
}

/// A sink has its copy of `seq`: the spool lets it go when no sink owes it, else records the
/// sink's copy (so a restart does not send it to that sink again).
pub(crate) fn sink_took(spool: &mut Spool, acked: Option<(u64, bool)>, name: &str) {
    match acked {
        Some((seq, true)) => {
            spool.ack(seq);
        }
        Some((seq, false)) => {
            spool.sink_ack(seq, name);
        }
        None => {}
    }
}
