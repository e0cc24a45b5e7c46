//! What an engine thread shares with the handles that submit to it: the queue, counters and
//! the abort flag; plus the per-request output slot.

use crate::error::{EngineError, Result};
use crate::queue::{PushError, Queue};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::Span;

/// Transport-independent facts about a request.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    /// Id used in logs and echoed in the final message.
    pub request_id: String,
    /// When the request reached the server (timings and `total` are measured from here).
    pub received: Instant,
    /// The request is abandoned with [`EngineError::DeadlineExceeded`] after this instant.
    pub deadline: Option<Instant>,
    /// The span of the request (the RPC's span in a server): the engine's spans for this
    /// request (`queue_wait`, `prefill`, `decode`, …) are its children, so a trace shows the
    /// request's share of the batched work. `Span::none()` = no engine spans.
    pub span: Span,
}

impl RequestMeta {
    /// Metadata for a request arriving now, in the current span (see [`RequestMeta::span`]).
    pub fn new(request_id: impl Into<String>, timeout: Option<Duration>) -> Self {
        let received = Instant::now();
        Self {
            request_id: request_id.into(),
            received,
            deadline: timeout.map(|t| received + t),
            span: Span::current(),
        }
    }

    /// The same metadata with `span` as the parent of the engine's spans.
    pub fn with_span(mut self, span: Span) -> Self {
        self.span = span;
        self
    }
}

/// Called by an engine thread after each batched model forward (prefill, prefill chunk or
/// step) with the number of rows it computed: sequences, a generation CFG pair counting as
/// two. Servers record it as `janus_batch_size`. Runs on the engine thread: keep it cheap.
#[derive(Clone)]
pub struct StepObserver(Arc<dyn Fn(usize) + Send + Sync>);

impl StepObserver {
    /// Wraps `f`.
    pub fn new(f: impl Fn(usize) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Reports a step of `rows` rows.
    pub fn observe(&self, rows: usize) {
        (self.0)(rows)
    }
}

impl std::fmt::Debug for StepObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepObserver(..)")
    }
}

/// Reports a step to the configured observer, if any.
pub(crate) fn observe_step(observer: &Option<StepObserver>, rows: usize) {
    if let Some(o) = observer {
        if rows > 0 {
            o.observe(rows);
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

/// A queued request: its ticket and where its events go.
pub(crate) struct Work<T, E> {
    pub ticket: T,
    pub out: Output<E>,
}

impl<T, E> std::fmt::Debug for Work<T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Work")
            .field("request_id", &self.out.meta.request_id)
            .finish()
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

    /// Stops accepting requests; queued and running ones continue.
    pub fn close(&self) {
        self.queue.close();
    }

    /// Refuses new requests and ends queued and running ones at the thread's next step.
    pub fn abort(&self) {
        self.queue.close();
        self.abort.store(true, Ordering::Relaxed);
    }
}

impl<W: Send + 'static> Control<W> {
    /// The state an engine's handle and its model thread share, and the thread `name` running
    /// `run` on it. Without a thread nothing is served: the queue is closed, so every
    /// submission is refused.
    pub fn spawn(
        name: &str,
        max_queue: usize,
        run: impl FnOnce(Arc<Self>) + Send + 'static,
    ) -> Arc<Self> {
        let control = Arc::new(Self::new(max_queue));
        let thread = control.clone();
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(thread));
        if let Err(e) = spawned {
            tracing::error!("cannot spawn the {name} engine thread: {e}");
            control.close();
        }
        control
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

/// Where one request's events go, and the engine's spans for it.
#[derive(Debug)]
pub(crate) struct Output<E> {
    pub tx: mpsc::Sender<Result<E>>,
    pub meta: RequestMeta,
    /// `queue_wait`: open from submission until the engine takes the request.
    queued: Span,
    /// The engine phase the request is in (`vision_encode`, `prefill`, `decode`, …).
    phase: Span,
}

impl<E> Output<E> {
    /// The output of a request being submitted now: opens its `queue_wait` span.
    pub fn new(tx: mpsc::Sender<Result<E>>, meta: RequestMeta) -> Self {
        let queued = child(&meta.span, |p| tracing::info_span!(parent: p, "queue_wait"));
        Self {
            tx,
            meta,
            queued,
            phase: Span::none(),
        }
    }

    /// Ends the queue wait (when still open) and the current phase, and opens the next phase
    /// with `make(parent)` as a child of the request's span, e.g.
    /// `out.phase(|p| tracing::info_span!(parent: p, "prefill", rows = 2i64))`.
    ///
    /// Spans of a request are only opened when its span is enabled (no orphan root spans).
    pub fn phase(&mut self, make: impl FnOnce(&Span) -> Span) {
        self.queued = Span::none();
        self.phase = Span::none();
        self.phase = child(&self.meta.span, make);
    }

    /// Ends the queue wait and the current phase, recording `field = value` on the phase first
    /// (e.g. the number of tokens of `decode`; signed: the OpenTelemetry layer exports `u64`
    /// values as strings).
    pub fn end_phase(&mut self, record: Option<(&'static str, i64)>) {
        if let Some((field, value)) = record {
            self.phase.record(field, value);
        }
        self.queued = Span::none();
        self.phase = Span::none();
    }

    /// A span `make(request_span)` that is not the phase (it ends when dropped), e.g. around
    /// a piece of work done while the request is in no phase.
    pub fn child(&self, make: impl FnOnce(&Span) -> Span) -> Span {
        child(&self.meta.span, make)
    }
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

/// `make(parent)` when `parent` is enabled, otherwise no span (a child of a disabled span
/// would become the root of a trace of its own).
pub(crate) fn child(parent: &Span, make: impl FnOnce(&Span) -> Span) -> Span {
    if parent.is_disabled() {
        Span::none()
    } else {
        make(parent)
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
