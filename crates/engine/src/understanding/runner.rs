//! The understanding model thread: admission, chunked prefill within each step's budget,
//! the running batch's steps and the events they send.

use super::*;
use crate::admission::{Admission, Decision, Load};
use crate::control::{guarded, observe_step, Control, Output, Stats};
use crate::error::EngineError;
use crate::schedule::{prefill_round, StepBudget};
use janus_pipeline::understand::{Prefill, TokenEvent, UnderstandBatch};
use janus_pipeline::UnderstandingModel;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A running request inside the batch.
struct Row {
    out: Output<UnderstandEvent>,
    sent: u32,
    queue: Duration,
    vision: Duration,
    prefill: Duration,
    first_token: Option<Instant>,
    prompt_tokens: usize,
    cached_tokens: usize,
    /// KV slots this row may use (prompt + max_new_tokens), counted against the budget.
    reserve: usize,
}

/// A request whose images are being encoded and whose prompt is being prefilled, a piece per
/// engine iteration.
struct Waiting {
    prefill: Prefill,
    out: Output<UnderstandEvent>,
    prompt_tokens: usize,
    reserve: usize,
    admitted: Instant,
    vision: Duration,
    prefill_time: Duration,
}

/// KV slots a queued request will need.
fn reserve_of(w: &Work) -> usize {
    w.ticket.prepared.ids.len() + w.ticket.prepared.params.max_new_tokens
}

/// Requests decoded together, keyed by their row id in the batch.
struct Group {
    batch: UnderstandBatch,
    rows: HashMap<usize, Row>,
}

/// The engine thread's state: at most one running batch, and the requests being prefilled
/// (in arrival order) that join it one by one as their first token is sampled.
pub(super) struct Runner {
    model: Arc<UnderstandingModel>,
    control: Arc<Control<Work>>,
    config: UnderstandingConfig,
    admission: Admission,
    budget: StepBudget,
    running: Option<Group>,
    waiting: Vec<Waiting>,
    /// The head of the queue, popped but waiting for KV budget (FIFO is kept).
    held: Option<Work>,
}

impl Runner {
    pub(super) fn new(
        model: Arc<UnderstandingModel>,
        control: Arc<Control<Work>>,
        config: UnderstandingConfig,
    ) -> Self {
        Self {
            model,
            control,
            admission: Admission {
                slots: config.max_batch,
                tokens: config.max_batch_tokens,
            },
            budget: StepBudget::new(config.step_tokens),
            config,
            running: None,
            waiting: Vec::new(),
            held: None,
        }
    }

    /// Rows running or being prefilled.
    fn live(&self) -> usize {
        self.running.as_ref().map_or(0, |g| g.rows.len()) + self.waiting.len()
    }

    /// KV slots reserved by running and waiting rows.
    fn reserved(&self) -> usize {
        self.running
            .as_ref()
            .map_or(0, |g| g.rows.values().map(|r| r.reserve).sum())
            + self.waiting.iter().map(|w| w.reserve).sum::<usize>()
    }

    /// Takes queued requests in FIFO order while batch slots and KV budget allow. Blocks
    /// briefly when nothing runs. Returns `None` when the queue is closed and empty.
    fn take_admissible(&mut self) -> Option<Vec<Work>> {
        let live = self.live();
        let mut round = self.admission.round(Load {
            live,
            reserved: self.reserved(),
            paused: false,
        });
        let mut out = Vec::new();
        let mut idle = live == 0;
        while round.free() > 0 {
            let next = match self.held.take() {
                Some(w) => Some(w),
                None if idle && out.is_empty() => {
                    let (mut items, finished) =
                        self.control.queue.pop_wait(1, Duration::from_millis(50));
                    if finished && items.is_empty() {
                        return None;
                    }
                    items.pop()
                }
                None => self.control.queue.try_pop(1).pop(),
            };
            let Some(w) = next else { break };
            idle = false;
            match round.offer(reserve_of(&w)) {
                Decision::Admit => out.push(w),
                Decision::Hold => {
                    self.held = Some(w);
                    break;
                }
            }
        }
        Some(out)
    }

    fn stats(&self) -> &Stats {
        &self.control.stats
    }

    /// Admission and stepping until the queue is closed and all work is done.
    pub(super) fn run(mut self) {
        loop {
            if self.control.aborted() {
                self.abort_all();
                let (late, finished) = self
                    .control
                    .queue
                    .pop_wait(usize::MAX, Duration::from_millis(50));
                self.refuse(late);
                if finished {
                    break;
                }
                continue;
            }
            let Some(items) = self.take_admissible() else {
                break;
            };
            self.admit(items);
            self.step();
            self.prefill_some();
        }
        tracing::debug!("understanding engine thread stops");
    }

    /// One request left the running set (called before its last event is sent, so a client
    /// that saw the end never reads a stale `active`).
    fn leave(&self) {
        self.stats().active.fetch_sub(1, Ordering::Relaxed);
    }

    /// Refuses queued work after an abort.
    fn refuse(&self, items: Vec<Work>) {
        for w in items {
            let _ = w.out.send(Err(EngineError::Unavailable(
                "the server is shutting down".into(),
            )));
            Stats::bump(&self.stats().cancelled);
        }
    }

    /// Ends everything: running rows get a `Cancelled` final event, queued work an error.
    fn abort_all(&mut self) {
        let now = Instant::now();
        if let Some(g) = self.running.take() {
            for (_, row) in g.rows {
                self.leave();
                let _ = row.out.send(Ok(UnderstandEvent::Finished {
                    reason: Finish::Cancelled,
                    prompt_tokens: row.prompt_tokens,
                    cached_tokens: row.cached_tokens,
                    completion_tokens: row.sent as usize,
                    timings: UnderstandTimings {
                        queue: row.queue,
                        vision: row.vision,
                        prefill: row.prefill,
                        decode: row.first_token.map(|t| now - t).unwrap_or_default(),
                        total: now - row.out.meta.received,
                    },
                }));
                Stats::bump(&self.control.stats.cancelled);
            }
        }
        for w in std::mem::take(&mut self.waiting) {
            self.leave();
            let _ = w.out.send(Err(EngineError::Unavailable(
                "the server is shutting down".into(),
            )));
            Stats::bump(&self.control.stats.cancelled);
        }
        let mut queued: Vec<Work> = self.held.take().into_iter().collect();
        queued.extend(self.control.queue.drain());
        self.refuse(queued);
    }

    /// Fails every row with `e`.
    fn fail(&self, rows: HashMap<usize, Row>, e: &EngineError) {
        for (_, row) in rows {
            self.leave();
            let _ = row.out.send(Err(e.clone()));
            Stats::bump(&self.stats().failed);
        }
    }

    /// Starts admitted requests (dropping those whose client left or deadline passed while
    /// they were queued); their work is done a piece per iteration by `prefill_some`.
    fn admit(&mut self, items: Vec<Work>) {
        let now = Instant::now();
        for w in items {
            if w.out.check(now).is_some() {
                Stats::bump(&self.stats().cancelled);
                continue;
            }
            let reserve = reserve_of(&w);
            let Work { ticket, mut out } = w;
            let prompt_tokens = ticket.prepared.ids.len();
            // Takes what the caches hold of the request (a prefix, image features).
            let prefill = match guarded("begin", || self.model.begin(ticket.prepared)) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!("understanding request could not begin: {e}");
                    let _ = out.send(Err(e));
                    Stats::bump(&self.stats().failed);
                    continue;
                }
            };
            if prefill.in_vision() {
                let images = prefill.images_to_encode() as i64;
                out.phase(|p| tracing::info_span!(parent: p, "vision_encode", images));
            } else {
                out.phase(|p| {
                    let prompt_tokens = prompt_tokens as i64;
                    let cached_tokens = prefill.cached_tokens() as i64;
                    tracing::info_span!(parent: p, "prefill", rows = 1i64, prompt_tokens, cached_tokens)
                });
            }
            self.stats().active.fetch_add(1, Ordering::Relaxed);
            self.waiting.push(Waiting {
                prefill,
                out,
                prompt_tokens,
                reserve,
                admitted: now,
                vision: Duration::ZERO,
                prefill_time: Duration::ZERO,
            });
        }
    }

    /// Spends what the running rows leave of this iteration's budget on waiting requests
    /// (see [`StepBudget::plan`]); those that sampled their first token join the batch.
    fn prefill_some(&mut self) {
        let now = Instant::now();
        let decode_rows = self.running.as_ref().map_or(0, |g| g.rows.len());
        let model = self.model.clone();
        let (control, observer) = (&self.control, &self.config.step_observer);
        // Requests that left while being prefilled are dropped.
        let round = prefill_round(
            &mut self.waiting,
            &self.budget,
            decode_rows,
            |w| w.out.check(now).is_some(),
            |w| model.cost_left(&w.prefill),
            |w, units| {
                let in_vision = w.prefill.in_vision();
                let t = Instant::now();
                let prefill = &mut w.prefill;
                let res = guarded("prefill", || model.prefill(prefill, units));
                if in_vision {
                    w.vision += t.elapsed();
                    if !w.prefill.in_vision() {
                        let prompt_tokens = w.prompt_tokens as i64;
                        w.out.phase(
                        |p| tracing::info_span!(parent: p, "prefill", rows = 1i64, prompt_tokens),
                    );
                    }
                } else {
                    w.prefill_time += t.elapsed();
                }
                Stats::bump(&control.stats.steps);
                observe_step(observer, 1);
                res.transpose()
            },
        );
        for _ in 0..round.dropped {
            self.leave();
            Stats::bump(&self.stats().cancelled);
        }
        let mut joined = Vec::new();
        for (w, res) in round.done {
            match res {
                Ok((batch, events)) => joined.push((w, batch, events)),
                Err(e) => {
                    tracing::error!("understanding prefill failed: {e}");
                    self.leave();
                    let _ = w.out.send(Err(e));
                    Stats::bump(&self.stats().failed);
                }
            }
        }
        // Join in arrival order.
        for (w, batch, events) in joined {
            let row = Row {
                queue: w.admitted.saturating_duration_since(w.out.meta.received),
                out: w.out,
                sent: 0,
                vision: w.vision,
                prefill: w.prefill_time,
                first_token: None,
                prompt_tokens: w.prompt_tokens,
                cached_tokens: w.prefill.cached_tokens(),
                reserve: w.reserve,
            };
            let group = Group {
                batch,
                rows: HashMap::from([(0, row)]),
            };
            self.join(group, events);
        }
    }

    /// Sends a new group's first tokens and merges it into the running batch.
    fn join(&mut self, mut group: Group, events: Vec<TokenEvent>) {
        self.dispatch(&mut group, events);
        if group.rows.is_empty() {
            return;
        }
        match self.running.take() {
            None => self.running = Some(group),
            Some(mut run) => {
                let Group { batch, mut rows } = group;
                match guarded("batch merge", || run.batch.merge(batch)) {
                    Ok(ids) => {
                        for (local, global) in ids.into_iter().enumerate() {
                            if let (Some(global), Some(row)) = (global, rows.remove(&local)) {
                                run.rows.insert(global, row);
                            }
                        }
                        // Rows that did not make it into the batch (none expected) fail.
                        for (_, row) in rows {
                            self.leave();
                            let _ = row.out.send(Err(EngineError::Internal(
                                "row lost while merging batches".into(),
                            )));
                            Stats::bump(&self.stats().failed);
                        }
                        self.running = Some(run);
                    }
                    Err(e) => {
                        tracing::error!("understanding batch merge failed: {e}");
                        self.fail(run.rows, &e);
                        self.fail(rows, &e);
                    }
                }
            }
        }
    }

    /// Advances the batch by one token, dropping rows whose client left or deadline passed.
    fn step(&mut self) {
        let Some(mut g) = self.running.take() else {
            return;
        };
        let now = Instant::now();
        let stopped: Vec<usize> = g
            .rows
            .iter()
            .filter(|(_, r)| r.out.check(now).is_some())
            .map(|(&id, _)| id)
            .collect();
        for id in stopped {
            if let Some(r) = g.rows.remove(&id) {
                tracing::debug!(request_id = %r.out.meta.request_id, "row cancelled (client gone or deadline)");
            }
            self.leave();
            g.batch.cancel(id);
            Stats::bump(&self.control.stats.cancelled);
        }
        if g.rows.is_empty() || g.batch.is_done() {
            return;
        }
        let model = self.model.clone();
        let rows = g.rows.len();
        let batch = &mut g.batch;
        let stepped = guarded("decode step", || model.step(batch));
        Stats::bump(&self.stats().steps);
        observe_step(&self.config.step_observer, rows);
        match stepped {
            Ok(events) => {
                self.dispatch(&mut g, events);
                if !g.rows.is_empty() && !g.batch.is_done() {
                    self.running = Some(g);
                }
            }
            Err(e) => {
                tracing::error!("understanding step failed: {e}");
                self.fail(g.rows, &e);
            }
        }
    }
    /// Routes a step's events to their requests.
    fn dispatch(&self, g: &mut Group, events: Vec<TokenEvent>) {
        let now = Instant::now();
        for e in events {
            match e {
                TokenEvent::Token { row, id, text } => {
                    let Some(r) = g.rows.get_mut(&row) else {
                        continue;
                    };
                    if r.first_token.is_none() {
                        // One `decode` span from the first token to the last, not one per token.
                        r.out.phase(|p| {
                            tracing::info_span!(parent: p, "decode", tokens = tracing::field::Empty)
                        });
                    }
                    r.first_token.get_or_insert(now);
                    let index = r.sent;
                    r.sent += 1;
                    if !r.out.send(Ok(UnderstandEvent::Token { id, text, index })) {
                        self.leave();
                        g.batch.cancel(row);
                        g.rows.remove(&row);
                        Stats::bump(&self.stats().cancelled);
                    }
                }
                TokenEvent::Finished {
                    row,
                    reason,
                    prompt_tokens,
                    cached_tokens,
                    completion_tokens,
                } => {
                    if let Some(mut r) = g.rows.remove(&row) {
                        self.leave();
                        r.out.end_phase(Some(("tokens", completion_tokens as i64)));
                        let timings = UnderstandTimings {
                            queue: r.queue,
                            vision: r.vision,
                            prefill: r.prefill,
                            decode: r.first_token.map(|t| now - t).unwrap_or_default(),
                            total: now - r.out.meta.received,
                        };
                        let _ = r.out.send(Ok(UnderstandEvent::Finished {
                            reason: reason.into(),
                            prompt_tokens,
                            cached_tokens,
                            completion_tokens,
                            timings,
                        }));
                        Stats::bump(&self.stats().completed);
                    }
                }
            }
        }
    }
}
