//! A bounded multi-producer queue that refuses instead of blocking when full.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Why a push was refused.
#[derive(Debug)]
pub(crate) enum PushError<T> {
    /// `len == capacity`; the item is handed back.
    Full(T, usize),
    /// The queue was closed.
    Closed(T),
}

#[derive(Debug)]
struct State<T> {
    items: VecDeque<T>,
    closed: bool,
}

/// Requests waiting for an engine thread.
#[derive(Debug)]
pub(crate) struct Queue<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    capacity: usize,
}

impl<T> Queue<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // A panic while holding the lock cannot leave the deque inconsistent: keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `item`, or hands it back when the queue is full or closed.
    pub fn push(&self, item: T) -> Result<(), PushError<T>> {
        let mut s = self.lock();
        if s.closed {
            return Err(PushError::Closed(item));
        }
        if s.items.len() >= self.capacity {
            let n = s.items.len();
            return Err(PushError::Full(item, n));
        }
        s.items.push_back(item);
        drop(s);
        self.ready.notify_one();
        Ok(())
    }

    /// Up to `max` items without waiting.
    pub fn try_pop(&self, max: usize) -> Vec<T> {
        let mut s = self.lock();
        let n = max.min(s.items.len());
        s.items.drain(..n).collect()
    }

    /// Up to `max` items, waiting at most `wait` for the first one. The flag is true when the
    /// queue is closed and empty (the consumer may stop).
    pub fn pop_wait(&self, max: usize, wait: Duration) -> (Vec<T>, bool) {
        let mut s = self.lock();
        if s.items.is_empty() && !s.closed {
            s = self
                .ready
                .wait_timeout_while(s, wait, |s| s.items.is_empty() && !s.closed)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let n = max.min(s.items.len());
        let items: Vec<T> = s.items.drain(..n).collect();
        let finished = s.closed && s.items.is_empty();
        (items, finished)
    }

    /// Refuses further pushes; items already queued are still handed out.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Removes and returns everything queued.
    pub fn drain(&self) -> Vec<T> {
        self.lock().items.drain(..).collect()
    }

    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_closed() {
        let q = Queue::new(2);
        q.push(1).unwrap();
        q.push(2).unwrap();
        assert!(matches!(q.push(3), Err(PushError::Full(3, 2))));
        assert_eq!(q.try_pop(1), vec![1]);
        q.push(4).unwrap();
        q.close();
        assert!(matches!(q.push(5), Err(PushError::Closed(5))));
        let (items, finished) = q.pop_wait(8, Duration::from_millis(1));
        assert_eq!(items, vec![2, 4]);
        assert!(finished);
    }

    #[test]
    fn pop_wait_times_out() {
        let q: Queue<u8> = Queue::new(1);
        let (items, finished) = q.pop_wait(1, Duration::from_millis(5));
        assert!(items.is_empty() && !finished);
    }
}
