//! Places for long answers (live subscribers of the SSE stream, running exports): bounded
//! in all and per client, and never held by a client that stops reading.
//!
//! - At most `max` places at once and `per_client` for one client address (the guard's
//!   [`super::guard::client_ip`]: behind a trusted proxy, the client it names).
//! - Full, a new place either evicts the oldest one (of its own client first, then of
//!   everyone: [`WhenFull::EvictOldest`], for subscribers, whose pages reconnect by
//!   themselves) or is refused ([`WhenFull::Refuse`], for exports). Either way nobody can
//!   hold every place for good: a page that signs in always gets its live updates.
//! - [`stall_guarded`]: a body whose next piece the client has not taken within the stall
//!   deadline is abandoned (its place freed, counted); an export cut so ends without its
//!   final chunk, so the client sees an incomplete transfer, never a short one that looks
//!   whole.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::metrics::Counter;

/// What a new place does when there is no room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// The oldest place (of the same client, if it is at its own cap) ends.
    EvictOldest,
    /// The new one is refused.
    Refuse,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    client: IpAddr,
    end: CancellationToken,
}

/// A bounded set of places.
#[derive(Debug)]
pub struct Places {
    book: Mutex<VecDeque<Entry>>,
    next_id: AtomicU64,
    max: usize,
    per_client: usize,
    when_full: WhenFull,
    /// Places now.
    pub held: AtomicU64,
    /// New places refused ([`WhenFull::Refuse`]).
    pub refused: Counter,
    /// Places ended to make room for newer ones ([`WhenFull::EvictOldest`]).
    pub evicted: Counter,
    /// Bodies abandoned because the client stopped taking them ([`stall_guarded`]).
    pub stalled: Counter,
}

/// One held place: freed when dropped. `ended` fires when a newer place evicted it.
#[derive(Debug)]
pub struct Place {
    places: Arc<Places>,
    id: u64,
    pub ended: CancellationToken,
}

impl Places {
    pub fn new(max: usize, per_client: usize, when_full: WhenFull) -> Arc<Places> {
        Arc::new(Places {
            book: Mutex::new(VecDeque::new()),
            next_id: AtomicU64::new(0),
            max: max.max(1),
            per_client: per_client.clamp(1, max.max(1)),
            when_full,
            held: AtomicU64::new(0),
            refused: Counter::default(),
            evicted: Counter::default(),
            stalled: Counter::default(),
        })
    }

    /// A place for `client`, or `None` when it is refused (counted).
    pub fn take(self: &Arc<Self>, client: IpAddr) -> Option<Place> {
        let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        let mine = book.iter().filter(|e| e.client == client).count();
        let full = book.len() >= self.max;
        if mine >= self.per_client || full {
            if self.when_full == WhenFull::Refuse {
                self.refused.inc();
                return None;
            }
            // The client's own oldest when it is at its cap, else everyone's oldest.
            let victim = if mine >= self.per_client {
                book.iter().position(|e| e.client == client)
            } else {
                (!book.is_empty()).then_some(0)
            };
            if let Some(i) = victim
                && let Some(old) = book.remove(i)
            {
                old.end.cancel();
                self.evicted.inc();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let end = CancellationToken::new();
        book.push_back(Entry {
            id,
            client,
            end: end.clone(),
        });
        self.held.store(book.len() as u64, Ordering::Relaxed);
        Some(Place {
            places: self.clone(),
            id,
            ended: end,
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut book = self.places.book.lock().unwrap_or_else(|e| e.into_inner());
        book.retain(|e| e.id != self.id);
        self.places.held.store(book.len() as u64, Ordering::Relaxed);
    }
}

/// `body` fed through a hand-over of one piece: a task pulls `body` and waits at most
/// `stall` for the client to take each piece. When it does not, or when `place` is
/// evicted, the task drops `body` and the place (freeing it at once, whatever the
/// connection does next) and the stream ends with an error rather than cleanly.
pub fn stall_guarded<T, S>(
    body: S,
    place: Place,
    stall: Duration,
) -> impl Stream<Item = Result<T, std::io::Error>> + Send + 'static
where
    T: Send + 'static,
    S: Stream<Item = Result<T, std::io::Error>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<T, std::io::Error>>(1);
    let cut = Arc::new(AtomicBool::new(false));
    let cut_by_task = cut.clone();
    tokio::spawn(async move {
        let mut body = std::pin::pin!(body);
        loop {
            let next = tokio::select! {
                _ = place.ended.cancelled() => None,
                // The client went away while nothing was due (a quiet events stream): the
                // place is freed now, not at the next event.
                _ = tx.closed() => return,
                n = body.next() => Some(n),
            };
            let Some(Some(item)) = next else {
                // Evicted (cut), or the body ended (clean).
                if next.is_none() {
                    cut_by_task.store(true, Ordering::Relaxed);
                }
                return;
            };
            tokio::select! {
                _ = place.ended.cancelled() => {
                    cut_by_task.store(true, Ordering::Relaxed);
                    return;
                }
                sent = tokio::time::timeout(stall, tx.send(item)) => match sent {
                    Ok(Ok(())) => {}
                    // The response was dropped: the client went away.
                    Ok(Err(_)) => return,
                    Err(_) => {
                        place.places.stalled.inc();
                        cut_by_task.store(true, Ordering::Relaxed);
                        tracing::debug!(stall_s = stall.as_secs_f64(), "A client stopped reading a long answer; it was abandoned.");
                        return;
                    }
                },
            }
        }
    });
    futures_util::stream::unfold((rx, cut, false), |(mut rx, cut, done)| async move {
        if done {
            return None;
        }
        match rx.recv().await {
            Some(item) => Some((item, (rx, cut, false))),
            None if cut.load(Ordering::Relaxed) => Some((
                Err(std::io::Error::other(
                    "the answer was cut: the client stopped reading, or a newer one took its place",
                )),
                (rx, cut, true),
            )),
            None => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refused_beyond_the_caps_in_all_and_per_client() {
        let p = Places::new(2, 1, WhenFull::Refuse);
        let a = p.take(ip("10.0.0.1")).expect("first");
        assert!(p.take(ip("10.0.0.1")).is_none(), "one per client");
        let _b = p.take(ip("10.0.0.2")).expect("another client");
        assert!(p.take(ip("10.0.0.3")).is_none(), "two in all");
        assert_eq!(p.refused.get(), 2);
        assert_eq!(p.held.load(Ordering::Relaxed), 2);
        drop(a);
        assert_eq!(p.held.load(Ordering::Relaxed), 1);
        assert!(p.take(ip("10.0.0.3")).is_some());
    }

    #[test]
    fn a_new_subscriber_evicts_its_own_oldest_then_everyones_oldest() {
        let p = Places::new(3, 2, WhenFull::EvictOldest);
        let a1 = p.take(ip("127.0.0.1")).unwrap();
        let a2 = p.take(ip("127.0.0.1")).unwrap();
        let b1 = p.take(ip("10.0.0.2")).unwrap();
        // At its own cap: its own oldest goes, not b1.
        let a3 = p.take(ip("127.0.0.1")).unwrap();
        assert!(a1.ended.is_cancelled());
        assert!(!a2.ended.is_cancelled() && !b1.ended.is_cancelled());
        drop(a1);
        // Full in all (a2, b1, a3): everyone's oldest goes.
        let c1 = p.take(ip("10.0.0.3")).unwrap();
        assert!(a2.ended.is_cancelled());
        assert!(!b1.ended.is_cancelled() && !a3.ended.is_cancelled());
        assert_eq!(p.evicted.get(), 2);
        assert_eq!(p.refused.get(), 0);
        drop((a2, b1, a3, c1));
        assert_eq!(p.held.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_frees_its_place_and_sees_a_cut() {
        let p = Places::new(1, 1, WhenFull::Refuse);
        let place = p.take(ip("10.0.0.1")).unwrap();
        let body = futures_util::stream::iter((0..100).map(Ok::<u32, std::io::Error>));
        let mut s = Box::pin(stall_guarded(body, place, Duration::from_millis(100)));
        assert_eq!(s.next().await.unwrap().unwrap(), 0);
        // The client stops reading: within the deadline (and a little), the place is free.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(p.held.load(Ordering::Relaxed), 0);
        assert_eq!(p.stalled.get(), 1);
        assert!(p.take(ip("10.0.0.2")).is_some());
        // What was handed over is still read, then the cut shows as an error, not an end.
        let rest: Vec<_> = s.collect().await;
        assert!(rest.last().unwrap().is_err(), "{rest:?}");
    }

    #[tokio::test]
    async fn a_client_gone_while_nothing_is_due_frees_its_place_at_once() {
        let p = Places::new(1, 1, WhenFull::Refuse);
        let place = p.take(ip("10.0.0.1")).unwrap();
        // A body that yields nothing for a long time (a quiet events stream).
        let body = futures_util::stream::pending::<Result<u32, std::io::Error>>();
        let s = stall_guarded(body, place, Duration::from_secs(3600));
        drop(s);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(p.held.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_ends_cleanly() {
        let p = Places::new(1, 1, WhenFull::Refuse);
        let place = p.take(ip("10.0.0.1")).unwrap();
        let body = futures_util::stream::iter((0..5).map(Ok::<u32, std::io::Error>));
        let got: Vec<_> = stall_guarded(body, place, Duration::from_secs(5))
            .collect()
            .await;
        assert_eq!(got.len(), 5);
        assert!(got.iter().all(Result::is_ok));
        assert_eq!(p.stalled.get(), 0);
    }
}
