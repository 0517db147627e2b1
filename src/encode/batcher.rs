//! Forms batches by size or deadline, as a plain state machine (time passed in).
//!
//! A batch closes when it holds `max_batch` items, or when its first item has waited
//! `max_wait`: the largest batches the load allows, with a bound on the latency one face can
//! be held back.

use std::time::{Duration, Instant};

/// Batches items of type `T`.
#[derive(Debug)]
pub struct Batcher<T> {
    max_batch: usize,
    max_wait: Duration,
    pending: Vec<T>,
    first_at: Option<Instant>,
}

impl<T> Batcher<T> {
    /// `max_batch` is at least 1.
    pub fn new(max_batch: usize, max_wait: Duration) -> Self {
        let max_batch = max_batch.max(1);
        Batcher {
            max_batch,
            max_wait,
            pending: Vec::with_capacity(max_batch),
            first_at: None,
        }
    }

    /// Adds an item that arrived at `now`; returns a full batch if this filled one.
    pub fn push(&mut self, item: T, now: Instant) -> Option<Vec<T>> {
        if self.pending.is_empty() {
            self.first_at = Some(now);
        }
        self.pending.push(item);
        (self.pending.len() >= self.max_batch).then(|| self.take())
    }

    /// Returns the pending batch if its deadline has passed at `now`.
    pub fn poll(&mut self, now: Instant) -> Option<Vec<T>> {
        match self.deadline() {
            Some(d) if now >= d => Some(self.take()),
            _ => None,
        }
    }

    /// When the pending batch must go, if there is one.
    pub fn deadline(&self) -> Option<Instant> {
        self.first_at.map(|t| t + self.max_wait)
    }

    /// Takes whatever is pending (at shutdown).
    pub fn flush(&mut self) -> Option<Vec<T>> {
        (!self.pending.is_empty()).then(|| self.take())
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn take(&mut self) -> Vec<T> {
        self.first_at = None;
        std::mem::replace(&mut self.pending, Vec::with_capacity(self.max_batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_on_size() {
        let t = Instant::now();
        let mut b = Batcher::new(3, Duration::from_millis(20));
        assert_eq!(b.push(1, t), None);
        assert_eq!(b.push(2, t), None);
        assert_eq!(b.push(3, t), Some(vec![1, 2, 3]));
        assert!(b.is_empty());
        assert_eq!(b.deadline(), None);
    }

    #[test]
    fn closes_on_the_first_items_deadline() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut b = Batcher::new(8, ms(20));
        b.push('a', t);
        b.push('b', t + ms(15));
        assert_eq!(b.deadline(), Some(t + ms(20)));
        assert_eq!(b.poll(t + ms(19)), None);
        assert_eq!(b.poll(t + ms(20)), Some(vec!['a', 'b']));
        // The next batch's clock starts at its own first item.
        b.push('c', t + ms(30));
        assert_eq!(b.poll(t + ms(45)), None);
        assert_eq!(b.poll(t + ms(50)), Some(vec!['c']));
        assert_eq!(b.flush(), None);
    }

    #[test]
    fn a_batch_of_one_goes_at_once() {
        let mut b = Batcher::new(1, Duration::from_secs(1));
        assert_eq!(b.push(7, Instant::now()), Some(vec![7]));
    }
}
