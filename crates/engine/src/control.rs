//! What an engine thread shares with the handles that submit to it: the queue, counters and
//! the abort flag; plus the per-request output slot.

use crate::error::{EngineError, Result};
use crate::queue::{PushError, Queue};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Transport-independent facts about a request.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    /// Id used in logs and echoed in the final message.
    pub request_id: String,
    /// When the request reached the server (timings and `total` are measured from here).
    pub received: Instant,
    /// The request is abandoned with [`EngineError::DeadlineExceeded`] after this instant.
    pub deadline: Option<Instant>,
}

impl RequestMeta {
    /// Metadata for a request arriving now.
    pub fn new(request_id: impl Into<String>, timeout: Option<Duration>) -> Self {
        let received = Instant::now();
        Self {
            request_id: request_id.into(),
            received,
            deadline: timeout.map(|t| received + t),
        }
    }
}

/// Counters of an engine (a consistent-enough snapshot; each value is read atomically).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Requests waiting in the queue.
    pub queued: usize,
    /// Requests being computed.
    pub active: usize,
    /// Model forward passes (prefills and steps).
    pub steps: u64,
    /// Requests that ran to completion.
    pub completed: u64,
    /// Requests dropped: client gone, deadline passed or shutdown.
    pub cancelled: u64,
    /// Requests that failed inside the engine.
    pub failed: u64,
    /// Requests refused because the queue was full.
    pub rejected: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub active: AtomicUsize,
    pub steps: AtomicU64,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    pub rejected: AtomicU64,
}

impl Stats {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// State shared between an engine's handle and its thread.
#[derive(Debug)]
pub(crate) struct Control<W> {
    pub queue: Queue<W>,
    pub stats: Stats,
    /// Set by `abort`: the thread ends all work at the next step.
    pub abort: AtomicBool,
}

impl<W> Control<W> {
    pub fn new(max_queue: usize) -> Self {
        Self {
            queue: Queue::new(max_queue.max(1)),
            stats: Stats::default(),
            abort: AtomicBool::new(false),
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let s = &self.stats;
        StatsSnapshot {
            queued: self.queue.len(),
            active: s.active.load(Ordering::Relaxed),
            steps: s.steps.load(Ordering::Relaxed),
            completed: s.completed.load(Ordering::Relaxed),
            cancelled: s.cancelled.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            rejected: s.rejected.load(Ordering::Relaxed),
        }
    }

    /// Queues `work`, mapping a full or closed queue to the matching error.
    pub fn submit(&self, work: W) -> Result<()> {
        match self.queue.push(work) {
            Ok(()) => Ok(()),
            Err(PushError::Full(_, queued)) => {
                Stats::bump(&self.stats.rejected);
                Err(EngineError::Overloaded {
                    queued,
                    limit: self.queue.capacity(),
                })
            }
            Err(PushError::Closed(_)) => Err(EngineError::Unavailable(
                "the server is shutting down".into(),
            )),
        }
    }

    pub fn aborted(&self) -> bool {
        self.abort.load(Ordering::Relaxed)
    }
}

/// Why running work should stop before its next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The receiver was dropped: the client cancelled or disconnected.
    Gone,
    /// The deadline passed (an error was sent).
    Deadline,
}

/// Where one request's events go.
#[derive(Debug)]
pub(crate) struct Output<E> {
    pub tx: mpsc::Sender<Result<E>>,
    pub meta: RequestMeta,
}

impl<E> Output<E> {
    /// Sends without ever blocking the engine thread. Channels are sized for every event a
    /// request can produce, so a full channel means a bug; the event is dropped with a warning.
    pub fn send(&self, ev: Result<E>) -> bool {
        match self.tx.try_send(ev) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(request_id = %self.meta.request_id, "event channel full; event dropped");
                false
            }
        }
    }

    /// Checks the client and the deadline; on a passed deadline the error is sent.
    pub fn check(&self, now: Instant) -> Option<Stop> {
        if self.tx.is_closed() {
            return Some(Stop::Gone);
        }
        if let Some(d) = self.meta.deadline {
            if now >= d {
                let _ = self.send(Err(EngineError::DeadlineExceeded(now - self.meta.received)));
                return Some(Stop::Deadline);
            }
        }
        None
    }
}

/// Runs model code, turning a panic into an internal error so the engine thread survives.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> janus_pipeline::Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(EngineError::from_pipeline(e, |f| f.to_string())),
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            tracing::error!("{what} panicked: {msg}");
            Err(EngineError::Internal(format!("{what} panicked: {msg}")))
        }
    }
}
