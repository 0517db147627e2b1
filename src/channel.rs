//! Bounded channels with a named policy for when they are full, usable from threads and from
//! async code alike, counting every item they drop by reason.
//!
//! Every edge between stages that carries frames, faces or embeddings is one of these
//! (docs/src/architecture.md); the publisher's requests go over a tokio `mpsc` (async callers
//! wait for room) and the event store's over a std `sync_channel` (its writer is a thread):
//!
//! | policy | when full | use it where |
//! |---|---|---|
//! | [`FullPolicy::DropOldest`] | the oldest queued item is evicted and the new one queued | live video: the newest frame wins |
//! | [`FullPolicy::DropNewest`] | the new item is refused and handed back | bursts where the queued work is worth more |
//! | [`FullPolicy::Block`] | the sender waits for room (back-pressure) | scores and alerts, which may not be lost |
//!
//! Sending never blocks under the two drop policies, so they are safe on a GStreamer streaming
//! thread; [`Sender::try_send`] never blocks under any policy. Evicted or refused items are
//! returned to the sender (inside [`Sent`]) so it can act on them, e.g. the tracker re-schedules
//! a face whose job was dropped, and they are counted in [`ChannelStats`].
//!
//! A channel made with [`bounded_keeping`] never drops the items its `keep` rule marks (for
//! example a track's end travelling in order with the faces): when full, the drop policies
//! evict the oldest item that may be dropped, refuse a droppable new item when every queued
//! one must be kept, and make a kept item wait for room ([`Sender::send`]) rather than drop it.
//!
//! The channel is multi-producer, multi-consumer: both ends are `Clone`. It closes for receivers
//! when every [`Sender`] is gone (they still drain what is queued), and for senders when every
//! [`Receiver`] is gone (sends then fail with the item handed back).
//!
//! ```
//! use std::num::NonZeroUsize;
//! use dfwatch::channel::{bounded, FullPolicy, Sent};
//! let (tx, rx) = bounded::<u32>("example", NonZeroUsize::new(2).unwrap(), FullPolicy::DropOldest);
//! tx.send(1).unwrap();
//! tx.send(2).unwrap();
//! assert_eq!(tx.send(3).unwrap(), Sent::DroppedOldest(1));
//! assert_eq!(rx.try_recv(), Some(2));
//! assert_eq!(rx.stats().dropped_oldest, 1);
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// What a channel does with a new item when it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Evict the oldest queued item, queue the new one.
    DropOldest,
    /// Refuse the new item.
    DropNewest,
    /// Wait for room (back-pressure). [`Sender::try_send`] reports `Full` instead of waiting.
    Block,
}

impl FullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FullPolicy::DropOldest => "drop_oldest",
            FullPolicy::DropNewest => "drop_newest",
            FullPolicy::Block => "block",
        }
    }
}

/// Capacity and full policy of one channel, as written in the config (for example
/// `queue = { capacity = 4, policy = "drop_oldest" }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Items the channel holds before its policy applies.
    pub capacity: NonZeroUsize,
    /// `drop_oldest`, `drop_newest` or `block`.
    pub policy: FullPolicy,
}

impl QueueConfig {
    /// Creates a channel with these settings.
    pub fn channel<T>(&self, name: impl Into<String>) -> (Sender<T>, Receiver<T>) {
        bounded(name, self.capacity, self.policy)
    }

    /// Creates a channel with these settings that never drops items `keep` marks.
    pub fn channel_keeping<T>(
        &self,
        name: impl Into<String>,
        keep: fn(&T) -> bool,
    ) -> (Sender<T>, Receiver<T>) {
        bounded_keeping(name, self.capacity, self.policy, keep)
    }
}

/// Why a channel dropped an item; the label used for drop metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Evicted to make room under [`FullPolicy::DropOldest`].
    FullEvictedOldest,
    /// Refused under [`FullPolicy::DropNewest`].
    FullRefusedNewest,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::FullEvictedOldest => "queue_full_evicted_oldest",
            DropReason::FullRefusedNewest => "queue_full_refused_newest",
        }
    }
}

/// What happened to an item given to [`Sender::send`] or [`Sender::try_send`].
#[derive(Debug, PartialEq, Eq)]
pub enum Sent<T> {
    /// The item was queued and nothing was dropped.
    Queued,
    /// The item was queued; the channel was full and evicted this older item.
    DroppedOldest(T),
    /// The channel was full and refused this item (it is handed back).
    DroppedNewest(T),
}

impl<T> Sent<T> {
    /// `true` when the item given was queued (possibly evicting another).
    pub fn was_queued(&self) -> bool {
        !matches!(self, Sent::DroppedNewest(_))
    }
}

/// Every receiver is gone; the item is handed back.
#[derive(PartialEq, Eq)]
pub struct Closed<T>(pub T);

impl<T> fmt::Debug for Closed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Closed(..)")
    }
}

impl<T> fmt::Display for Closed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("channel closed: every receiver is gone")
    }
}

impl<T> std::error::Error for Closed<T> {}

/// Why [`Sender::try_send`] did not take the item; it is handed back.
#[derive(PartialEq, Eq)]
pub enum TrySendError<T> {
    /// Full under [`FullPolicy::Block`]: sending would have to wait.
    Full(T),
    Closed(T),
}

impl<T> fmt::Debug for TrySendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrySendError::Full(_) => f.write_str("Full(..)"),
            TrySendError::Closed(_) => f.write_str("Closed(..)"),
        }
    }
}

/// Why [`Receiver::recv_timeout`] returned no item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvTimeoutError {
    Timeout,
    /// Every sender is gone and the queue is empty.
    Disconnected,
}

/// A snapshot of one channel's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChannelStats {
    pub name: String,
    pub policy: FullPolicy,
    pub capacity: usize,
    /// Items queued right now.
    pub len: usize,
    /// Items ever accepted into the queue.
    pub sent: u64,
    /// Items ever taken out by receivers.
    pub received: u64,
    /// Items evicted under [`FullPolicy::DropOldest`].
    pub dropped_oldest: u64,
    /// Items refused under [`FullPolicy::DropNewest`].
    pub dropped_newest: u64,
}

impl ChannelStats {
    /// Drops by reason, for metrics: `(reason label, count)`.
    pub fn drops(&self) -> [(DropReason, u64); 2] {
        [
            (DropReason::FullEvictedOldest, self.dropped_oldest),
            (DropReason::FullRefusedNewest, self.dropped_newest),
        ]
    }
}

struct State<T> {
    queue: VecDeque<T>,
    senders: usize,
    receivers: usize,
}

#[derive(Clone, Copy)]
enum End {
    Sender,
    Receiver,
}

struct Shared<T> {
    name: String,
    capacity: usize,
    policy: FullPolicy,
    /// Items this marks are never dropped (see [`bounded_keeping`]).
    keep: Option<fn(&T) -> bool>,
    state: Mutex<State<T>>,
    /// Thread receivers wait here for items.
    not_empty: Condvar,
    /// Thread senders wait here for room (`Block` only).
    not_full: Condvar,
    /// Async receivers wait here for items or closure.
    items_async: Notify,
    /// Async senders wait here for room or closure.
    room_async: Notify,
    sent: AtomicU64,
    received: AtomicU64,
    dropped_oldest: AtomicU64,
    dropped_newest: AtomicU64,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding this lock cannot leave the queue inconsistent (every critical
        // section is a single VecDeque operation), so a poisoned lock is safe to reuse.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake_receivers(&self) {
        self.not_empty.notify_one();
        self.items_async.notify_waiters();
    }

    fn wake_senders(&self) {
        self.not_full.notify_one();
        self.room_async.notify_waiters();
    }

    fn wake_all(&self) {
        self.not_empty.notify_all();
        self.not_full.notify_all();
        self.items_async.notify_waiters();
        self.room_async.notify_waiters();
    }

    fn kept(&self, item: &T) -> bool {
        self.keep.is_some_and(|keep| keep(item))
    }

    /// One attempt that never waits. `Err(Full)` under `Block`, and for an item that must be
    /// kept when nothing queued may be dropped.
    fn try_push(&self, st: &mut State<T>, item: T) -> Result<Sent<T>, TrySendError<T>> {
        if st.receivers == 0 {
            return Err(TrySendError::Closed(item));
        }
        if st.queue.len() < self.capacity {
            st.queue.push_back(item);
            self.sent.fetch_add(1, Ordering::Relaxed);
            return Ok(Sent::Queued);
        }
        let must_keep = self.kept(&item);
        match self.policy {
            FullPolicy::DropOldest => {
                let oldest_droppable = if self.keep.is_some() {
                    st.queue.iter().position(|q| !self.kept(q))
                } else {
                    Some(0)
                };
                match oldest_droppable.and_then(|i| st.queue.remove(i)) {
                    Some(old) => {
                        st.queue.push_back(item);
                        self.sent.fetch_add(1, Ordering::Relaxed);
                        self.dropped_oldest.fetch_add(1, Ordering::Relaxed);
                        Ok(Sent::DroppedOldest(old))
                    }
                    None if must_keep => Err(TrySendError::Full(item)),
                    None => {
                        self.dropped_newest.fetch_add(1, Ordering::Relaxed);
                        Ok(Sent::DroppedNewest(item))
                    }
                }
            }
            FullPolicy::DropNewest if !must_keep => {
                self.dropped_newest.fetch_add(1, Ordering::Relaxed);
                Ok(Sent::DroppedNewest(item))
            }
            FullPolicy::DropNewest | FullPolicy::Block => Err(TrySendError::Full(item)),
        }
    }

    fn count(st: &mut State<T>, end: End) -> &mut usize {
        match end {
            End::Sender => &mut st.senders,
            End::Receiver => &mut st.receivers,
        }
    }

    /// One more handle on `end`.
    fn attach(&self, end: End) {
        *Self::count(&mut self.lock(), end) += 1;
    }

    /// One handle on `end` fewer; the last one closes that side and wakes every waiter.
    fn detach(&self, end: End) {
        let last = {
            let mut st = self.lock();
            let n = Self::count(&mut st, end);
            *n -= 1;
            *n == 0
        };
        if last {
            self.wake_all();
        }
    }

    fn pop(&self, st: &mut State<T>) -> Option<T> {
        let item = st.queue.pop_front()?;
        self.received.fetch_add(1, Ordering::Relaxed);
        Some(item)
    }
}

/// Creates a bounded channel named `name` (the label in logs and metrics).
pub fn bounded<T>(
    name: impl Into<String>,
    capacity: NonZeroUsize,
    policy: FullPolicy,
) -> (Sender<T>, Receiver<T>) {
    make(name.into(), capacity, policy, None)
}

/// [`bounded`] whose drop policies never drop an item `keep` marks: they evict the oldest
/// droppable item instead, refuse a droppable new item when every queued one is kept, and a
/// kept item finds no room it waits ([`Sender::send`]) or is reported `Full`
/// ([`Sender::try_send`]). Use it where a few control items travel in order with many
/// droppable ones.
pub fn bounded_keeping<T>(
    name: impl Into<String>,
    capacity: NonZeroUsize,
    policy: FullPolicy,
    keep: fn(&T) -> bool,
) -> (Sender<T>, Receiver<T>) {
    make(name.into(), capacity, policy, Some(keep))
}

fn make<T>(
    name: String,
    capacity: NonZeroUsize,
    policy: FullPolicy,
    keep: Option<fn(&T) -> bool>,
) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        name,
        capacity: capacity.get(),
        policy,
        keep,
        state: Mutex::new(State {
            queue: VecDeque::with_capacity(capacity.get().min(1024)),
            senders: 1,
            receivers: 1,
        }),
        not_empty: Condvar::new(),
        not_full: Condvar::new(),
        items_async: Notify::new(),
        room_async: Notify::new(),
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        dropped_oldest: AtomicU64::new(0),
        dropped_newest: AtomicU64::new(0),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

fn stats_of<T>(shared: &Shared<T>) -> ChannelStats {
    let len = shared.lock().queue.len();
    ChannelStats {
        name: shared.name.clone(),
        policy: shared.policy,
        capacity: shared.capacity,
        len,
        sent: shared.sent.load(Ordering::Relaxed),
        received: shared.received.load(Ordering::Relaxed),
        dropped_oldest: shared.dropped_oldest.load(Ordering::Relaxed),
        dropped_newest: shared.dropped_newest.load(Ordering::Relaxed),
    }
}

/// The sending end. Cloning adds a sender; the channel closes for receivers when the last is
/// dropped.
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Sender<T> {
    /// Sends from a thread. Under `Block` it waits for room; under the drop policies it never
    /// waits, except for an item a [`bounded_keeping`] channel must keep when nothing queued
    /// may be dropped. Fails only when every receiver is gone.
    pub fn send(&self, item: T) -> Result<Sent<T>, Closed<T>> {
        let mut st = self.shared.lock();
        let mut item = item;
        loop {
            match self.shared.try_push(&mut st, item) {
                Ok(sent) => {
                    drop(st);
                    if sent.was_queued() {
                        self.shared.wake_receivers();
                    }
                    return Ok(sent);
                }
                Err(TrySendError::Closed(it)) => return Err(Closed(it)),
                Err(TrySendError::Full(it)) => {
                    item = it;
                    st = self
                        .shared
                        .not_full
                        .wait(st)
                        .unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    /// Sends without ever waiting, under any policy (safe on a GStreamer streaming thread).
    pub fn try_send(&self, item: T) -> Result<Sent<T>, TrySendError<T>> {
        let sent = self.shared.try_push(&mut self.shared.lock(), item)?;
        if sent.was_queued() {
            self.shared.wake_receivers();
        }
        Ok(sent)
    }

    /// Sends from async code: like [`Sender::send`], but waits for room without blocking the
    /// executor thread.
    pub async fn send_async(&self, item: T) -> Result<Sent<T>, Closed<T>> {
        let mut item = item;
        loop {
            let notified = self.shared.room_async.notified();
            tokio::pin!(notified);
            // Register before looking, so a wake between the look and the await is not lost.
            notified.as_mut().enable();
            match self.try_send(item) {
                Ok(sent) => return Ok(sent),
                Err(TrySendError::Closed(it)) => return Err(Closed(it)),
                Err(TrySendError::Full(it)) => item = it,
            }
            notified.await;
        }
    }

    pub fn stats(&self) -> ChannelStats {
        stats_of(&self.shared)
    }

    /// `true` once every receiver is gone.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().receivers == 0
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.attach(End::Sender);
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.shared.detach(End::Sender);
    }
}

/// The receiving end. Cloning adds a receiver (items go to whichever asks first).
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// Takes the next item if one is queued.
    pub fn try_recv(&self) -> Option<T> {
        let item = self.shared.pop(&mut self.shared.lock());
        if item.is_some() {
            self.shared.wake_senders();
        }
        item
    }

    /// Waits on this thread for the next item; `None` once every sender is gone and the queue
    /// is drained.
    pub fn recv(&self) -> Option<T> {
        let mut st = self.shared.lock();
        loop {
            if let Some(item) = self.shared.pop(&mut st) {
                drop(st);
                self.shared.wake_senders();
                return Some(item);
            }
            if st.senders == 0 {
                return None;
            }
            st = self
                .shared
                .not_empty
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Like [`Receiver::recv`], giving up after `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvTimeoutError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if let Some(item) = self.shared.pop(&mut st) {
                drop(st);
                self.shared.wake_senders();
                return Ok(item);
            }
            if st.senders == 0 {
                return Err(RecvTimeoutError::Disconnected);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(RecvTimeoutError::Timeout);
            }
            st = self
                .shared
                .not_empty
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits in async code for the next item; `None` once every sender is gone and the queue is
    /// drained.
    pub async fn recv_async(&self) -> Option<T> {
        loop {
            let notified = self.shared.items_async.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.shared.lock();
                if let Some(item) = self.shared.pop(&mut st) {
                    drop(st);
                    self.shared.wake_senders();
                    return Some(item);
                }
                if st.senders == 0 {
                    return None;
                }
            }
            notified.await;
        }
    }

    pub fn stats(&self) -> ChannelStats {
        stats_of(&self.shared)
    }

    pub fn len(&self) -> usize {
        self.shared.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Clone for Receiver<T> {
    fn clone(&self) -> Self {
        self.shared.attach(End::Receiver);
        Receiver {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.shared.detach(End::Receiver);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn cap(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).unwrap()
    }

    /// Odd numbers are control items that must never be dropped.
    fn odd(v: &u32) -> bool {
        v % 2 == 1
    }

    #[test]
    fn a_keeping_channel_evicts_the_oldest_droppable_item_and_never_a_kept_one() {
        let (tx, rx) = bounded_keeping("keep", cap(3), FullPolicy::DropOldest, odd);
        for v in [1, 2, 4] {
            assert_eq!(tx.send(v).unwrap(), Sent::Queued);
        }
        // Full: 1 must stay, so 2 goes; order is kept.
        assert_eq!(tx.send(6).unwrap(), Sent::DroppedOldest(2));
        assert_eq!(tx.send(3).unwrap(), Sent::DroppedOldest(4));
        // Only kept items and 6: a droppable newcomer evicts 6.
        assert_eq!(tx.send(8).unwrap(), Sent::DroppedOldest(6));
        assert_eq!(tx.send(5).unwrap(), Sent::DroppedOldest(8));
        // Nothing droppable left: a droppable newcomer is refused, a kept one must wait.
        assert_eq!(tx.send(10).unwrap(), Sent::DroppedNewest(10));
        assert!(matches!(tx.try_send(7), Err(TrySendError::Full(7))));
        let got: Vec<u32> = std::iter::from_fn(|| rx.try_recv()).collect();
        assert_eq!(got, vec![1, 3, 5]);
        let st = rx.stats();
        assert_eq!((st.dropped_oldest, st.dropped_newest), (4, 1));
    }

    #[test]
    fn a_kept_item_waits_for_room_instead_of_being_dropped() {
        let (tx, rx) = bounded_keeping("keep", cap(1), FullPolicy::DropNewest, odd);
        tx.send(1).unwrap();
        assert_eq!(tx.send(2).unwrap(), Sent::DroppedNewest(2));
        let t = thread::spawn(move || tx.send(3).map(|s| s.was_queued()));
        thread::sleep(Duration::from_millis(50));
        assert_eq!(rx.recv(), Some(1));
        assert_eq!(t.join().unwrap().ok(), Some(true));
        assert_eq!(rx.recv(), Some(3));
    }

    #[test]
    fn drop_oldest_drops_exactly_the_excess_and_keeps_the_newest() {
        let (tx, rx) = bounded("t", cap(4), FullPolicy::DropOldest);
        let mut evicted = vec![];
        for i in 0..10u32 {
            if let Sent::DroppedOldest(old) = tx.send(i).unwrap() {
                evicted.push(old);
            }
        }
        assert_eq!(evicted, vec![0, 1, 2, 3, 4, 5]);
        let s = rx.stats();
        assert_eq!(
            (s.sent, s.dropped_oldest, s.dropped_newest, s.len),
            (10, 6, 0, 4)
        );
        let got: Vec<u32> = std::iter::from_fn(|| rx.try_recv()).collect();
        assert_eq!(got, vec![6, 7, 8, 9]);
        assert_eq!(rx.stats().received, 4);
    }

    #[test]
    fn drop_newest_refuses_exactly_the_excess_and_keeps_the_oldest() {
        let (tx, rx) = bounded("t", cap(3), FullPolicy::DropNewest);
        let mut refused = vec![];
        for i in 0..8u32 {
            if let Sent::DroppedNewest(it) = tx.try_send(i).unwrap() {
                refused.push(it);
            }
        }
        assert_eq!(refused, vec![3, 4, 5, 6, 7]);
        let s = rx.stats();
        assert_eq!((s.sent, s.dropped_oldest, s.dropped_newest), (3, 0, 5));
        let got: Vec<u32> = std::iter::from_fn(|| rx.try_recv()).collect();
        assert_eq!(got, vec![0, 1, 2]);
    }

    #[test]
    fn block_never_drops_and_try_send_reports_full() {
        let (tx, rx) = bounded("t", cap(2), FullPolicy::Block);
        tx.send(0u32).unwrap();
        tx.send(1).unwrap();
        assert_eq!(tx.try_send(2), Err(TrySendError::Full(2)));
        let producer = {
            let tx = tx.clone();
            thread::spawn(move || {
                for i in 2..100u32 {
                    assert_eq!(tx.send(i).unwrap(), Sent::Queued);
                }
            })
        };
        drop(tx);
        let mut got = vec![];
        while let Some(v) = rx.recv() {
            got.push(v);
        }
        producer.join().unwrap();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        let s = rx.stats();
        assert_eq!(
            (s.sent, s.received, s.dropped_oldest, s.dropped_newest),
            (100, 100, 0, 0)
        );
    }

    #[test]
    fn receivers_drain_after_senders_close_then_see_the_end() {
        let (tx, rx) = bounded("t", cap(4), FullPolicy::Block);
        tx.send(1u8).unwrap();
        drop(tx);
        assert_eq!(rx.recv(), Some(1));
        assert_eq!(rx.recv(), None);
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(1)),
            Err(RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn send_fails_with_the_item_when_receivers_are_gone() {
        let (tx, rx) = bounded("t", cap(1), FullPolicy::Block);
        tx.send(1u8).unwrap();
        let waiter = {
            let tx = tx.clone();
            thread::spawn(move || tx.send(2))
        };
        thread::sleep(Duration::from_millis(20));
        drop(rx);
        // The blocked sender is woken by the close and gets its item back.
        assert_eq!(waiter.join().unwrap(), Err(Closed(2)));
        assert!(tx.is_closed());
    }

    #[test]
    fn recv_timeout_times_out_on_an_empty_open_channel() {
        let (_tx, rx) = bounded::<u8>("t", cap(1), FullPolicy::Block);
        let t0 = Instant::now();
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(30)),
            Err(RecvTimeoutError::Timeout)
        );
        assert!(t0.elapsed() >= Duration::from_millis(30));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn async_block_policy_applies_back_pressure_without_loss() {
        let (tx, rx) = bounded("t", cap(3), FullPolicy::Block);
        let producer = tokio::spawn(async move {
            for i in 0..500u32 {
                tx.send_async(i).await.unwrap();
            }
        });
        let mut got = vec![];
        while let Some(v) = rx.recv_async().await {
            got.push(v);
        }
        producer.await.unwrap();
        assert_eq!(got, (0..500).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn async_receiver_wakes_for_a_thread_sender() {
        let (tx, rx) = bounded("t", cap(8), FullPolicy::DropOldest);
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            tx.send(7u8).unwrap();
        });
        assert_eq!(rx.recv_async().await, Some(7));
        assert_eq!(rx.recv_async().await, None);
        t.join().unwrap();
    }
}
