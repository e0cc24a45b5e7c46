//! The understanding engine: conversations with images in, token events out.

use crate::control::{
    guarded, observe_step, Control, Output, RequestMeta, Stats, StatsSnapshot, StepObserver,
};
use crate::error::{EngineError, Result};
use crate::schedule::{take_done, StepBudget};
use janus_pipeline::understand::{Conversation, Prefill, Prepared, TokenEvent, UnderstandBatch};
use janus_pipeline::{
    prompt::IMAGE_TAG, FinishReason, ImageLimits, Message, Role, SamplingParams, UnderstandingModel,
};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Limits and capacities of an understanding engine.
#[derive(Debug, Clone)]
pub struct UnderstandingConfig {
    /// Requests that may wait before new ones are refused.
    pub max_queue: usize,
    /// Requests decoded together at most (rows of the running batch).
    pub max_batch: usize,
    /// Largest accepted `max_new_tokens`.
    pub max_new_tokens_limit: usize,
    /// `max_new_tokens` when the request leaves it unset (capped by the limit).
    pub default_max_new_tokens: usize,
    /// Image size limits, checked before decoding.
    pub image_limits: ImageLimits,
    /// Stop strings per request at most.
    pub max_stop_strings: usize,
    /// Most UTF-8 bytes of message text (all messages together), checked before tokenizing:
    /// bounds the tokenizer's work on a request far beyond any context window.
    pub max_prompt_bytes: usize,
    /// KV-cache budget in tokens: requests are admitted while the running rows' prompt plus
    /// `max_new_tokens` fit (a request larger than the whole budget runs alone).
    pub max_batch_tokens: usize,
    /// Work per engine iteration, in prompt-token units: running rows take one unit each, the
    /// rest goes to prompts being prefilled (vision-tower blocks and prompt chunks; see
    /// `schedule`). Bounds both the time between two tokens of a running row and the extra
    /// memory of a prefill (one chunk against its cache).
    pub step_tokens: usize,
    /// Told the rows of every batched forward (prefill, prefill chunk, decode step).
    pub step_observer: Option<StepObserver>,
}

impl Default for UnderstandingConfig {
    fn default() -> Self {
        Self {
            max_queue: 64,
            max_batch: 8,
            max_new_tokens_limit: 2048,
            default_max_new_tokens: 512,
            image_limits: ImageLimits::default(),
            max_stop_strings: 16,
            max_prompt_bytes: 256 * 1024,
            max_batch_tokens: 32_768,
            step_tokens: 128,
            step_observer: None,
        }
    }
}

/// An encoded input image.
#[derive(Debug, Clone, Default)]
pub struct InputImage {
    /// PNG or JPEG bytes.
    pub data: bytes::Bytes,
    /// Optional MIME type hint.
    pub mime_type: String,
}

/// One turn as the client sent it.
#[derive(Debug, Clone, Default)]
pub struct InputMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Text with `<image_placeholder>` tags.
    pub content: String,
    /// This turn's images.
    pub images: Vec<InputImage>,
}

/// Sampling settings as the client sent them (unset = default).
#[derive(Debug, Clone, Default)]
pub struct SamplingInput {
    pub max_new_tokens: Option<u32>,
    pub min_new_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

/// An understanding request as the client sent it.
#[derive(Debug, Clone, Default)]
pub struct UnderstandInput {
    pub messages: Vec<InputMessage>,
    pub sampling: SamplingInput,
}

/// A validated request, ready to submit.
#[derive(Debug)]
pub struct UnderstandTicket {
    prepared: Prepared,
}

impl UnderstandTicket {
    /// Prompt length in tokens (images expanded).
    pub fn prompt_tokens(&self) -> usize {
        self.prepared.ids.len()
    }
}

/// Why an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Eos,
    Length,
    Stop,
    /// The server stopped the request (shutdown).
    Cancelled,
}

impl From<FinishReason> for Finish {
    fn from(r: FinishReason) -> Self {
        match r {
            FinishReason::Eos => Finish::Eos,
            FinishReason::Length => Finish::Length,
            FinishReason::Stop => Finish::Stop,
        }
    }
}

/// Where an understanding request's time went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UnderstandTimings {
    pub queue: Duration,
    /// Embeddings, vision tower and aligner of the batch the request started in.
    pub vision: Duration,
    pub prefill: Duration,
    /// First token to last.
    pub decode: Duration,
    /// Arrival to the final event.
    pub total: Duration,
}

/// What an understanding request streams.
#[derive(Debug, Clone, PartialEq)]
pub enum UnderstandEvent {
    /// A produced token and the text it adds.
    Token { id: u32, text: String, index: u32 },
    /// The end of the answer.
    Finished {
        reason: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
        timings: UnderstandTimings,
    },
}

struct Work {
    ticket: UnderstandTicket,
    out: Output<UnderstandEvent>,
}

/// Handle to the thread that owns an [`UnderstandingModel`].
#[derive(Debug, Clone)]
pub struct UnderstandingEngine {
    model: Arc<UnderstandingModel>,
    control: Arc<Control<Work>>,
    config: UnderstandingConfig,
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Work")
            .field("request_id", &self.out.meta.request_id)
            .finish()
    }
}

fn sampling_field(f: &str) -> String {
    match f {
        "prompt" | "messages" => "messages".to_string(),
        "images" => "messages[].images".to_string(),
        f if f.starts_with("images[") => format!("messages[].{f}"),
        f => format!("sampling.{f}"),
    }
}

impl UnderstandingEngine {
    /// Starts the engine thread that owns `model`.
    pub fn start(model: UnderstandingModel, config: UnderstandingConfig) -> Self {
        let per_token = model.llm().kv_bytes_per_token();
        tracing::info!(
            kv_bytes_per_token = per_token,
            max_batch_tokens = config.max_batch_tokens,
            kv_budget_gib = (per_token * config.max_batch_tokens) as f64 / (1u64 << 30) as f64,
            "understanding engine: KV cache budget"
        );
        let model = Arc::new(model);
        let control = Arc::new(Control::new(config.max_queue));
        let engine = Self {
            model: model.clone(),
            control: control.clone(),
            config: config.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("janus-understanding".into())
            .spawn(move || Runner::new(model, control, config).run());
        if let Err(e) = spawned {
            // Without a thread nothing is served: refuse every submission.
            tracing::error!("cannot spawn the understanding engine thread: {e}");
            engine.control.queue.close();
        }
        engine
    }

    /// The loaded model (configuration, tokenizer, context window).
    pub fn model(&self) -> &UnderstandingModel {
        &self.model
    }

    /// The limits this engine enforces.
    pub fn config(&self) -> &UnderstandingConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.control.snapshot()
    }

    /// Validates a request, decodes its images and tokenizes it. CPU-bound: call it from a
    /// blocking pool, not an async worker. Runs in a `preprocess` span, a child of the current
    /// span (enter the request's span around the call on a blocking thread).
    pub fn prepare(&self, input: UnderstandInput) -> Result<UnderstandTicket> {
        let _span = tracing::info_span!("preprocess").entered();
        let cfg = &self.config;
        if input.messages.is_empty() {
            return Err(EngineError::invalid(
                "messages",
                "the conversation is empty",
            ));
        }
        let text: usize = input.messages.iter().map(|m| m.content.len()).sum();
        if text > cfg.max_prompt_bytes {
            return Err(EngineError::invalid(
                "messages",
                format!(
                    "{text} bytes of message text, at most {} allowed",
                    cfg.max_prompt_bytes
                ),
            ));
        }
        let s = &input.sampling;
        let max_new_tokens = match s.max_new_tokens {
            None => cfg.default_max_new_tokens.min(cfg.max_new_tokens_limit),
            Some(n) if n as usize > cfg.max_new_tokens_limit => {
                return Err(EngineError::invalid(
                    "sampling.max_new_tokens",
                    format!(
                        "{n} is over the server limit of {}",
                        cfg.max_new_tokens_limit
                    ),
                ))
            }
            Some(n) => n as usize,
        };
        let min_new_tokens = s.min_new_tokens.unwrap_or(0) as usize;
        if min_new_tokens > max_new_tokens {
            return Err(EngineError::invalid(
                "sampling.min_new_tokens",
                format!("{min_new_tokens} is larger than max_new_tokens {max_new_tokens}"),
            ));
        }
        if s.stop.len() > cfg.max_stop_strings {
            return Err(EngineError::invalid(
                "sampling.stop",
                format!(
                    "{} stop strings, at most {} allowed",
                    s.stop.len(),
                    cfg.max_stop_strings
                ),
            ));
        }
        let params = SamplingParams {
            max_new_tokens,
            min_new_tokens,
            temperature: s.temperature.unwrap_or(0.0),
            top_k: s.top_k.unwrap_or(0) as usize,
            top_p: s.top_p.unwrap_or(1.0),
            repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
            seed: s.seed.unwrap_or_else(crate::random_seed),
            stop: s.stop.clone(),
        };
        params
            .validate()
            .map_err(|e| EngineError::from_pipeline(e, sampling_field))?;

        // Roles, and the cheap checks that must come before any image is decoded.
        let mut messages = Vec::with_capacity(input.messages.len());
        let mut images = 0usize;
        let mut system: Option<usize> = None;
        for (i, m) in input.messages.iter().enumerate() {
            let role = Role::parse(&m.role).ok_or_else(|| {
                EngineError::invalid(
                    format!("messages[{i}].role"),
                    format!(
                        "unknown role '{}' (system, user or assistant, any letter case)",
                        m.role
                    ),
                )
            })?;
            if role == Role::System {
                if let Some(first) = system {
                    return Err(EngineError::invalid(
                        format!("messages[{i}].role"),
                        format!("a second system message (messages[{first}] is one; at most one)"),
                    ));
                }
                system = Some(i);
            }
            // Each message's images fill that message's own placeholders, in order.
            let tags = m.content.matches(IMAGE_TAG).count();
            if tags != m.images.len() {
                return Err(EngineError::invalid(
                    format!("messages[{i}].images"),
                    format!(
                        "message {i} has {tags} {IMAGE_TAG} tag(s) but {} image(s)",
                        m.images.len()
                    ),
                ));
            }
            images += m.images.len();
            messages.push(Message {
                role,
                content: m.content.clone(),
            });
        }
        if !messages.iter().any(|m| m.role == Role::User) {
            return Err(EngineError::invalid(
                "messages",
                "the conversation has no user message",
            ));
        }
        let per_image = self.model.config().vision.num_patches() + 2;
        let context = self.model.context();
        if images * per_image + max_new_tokens > context {
            return Err(EngineError::invalid(
                "messages",
                format!(
                    "{images} image(s) of {per_image} tokens plus {max_new_tokens} new tokens exceed the context window of {context} tokens"
                ),
            ));
        }

        // Images in the order the template writes their tags: the system message comes first.
        let mut decoded = Vec::with_capacity(images);
        let order = system
            .into_iter()
            .chain((0..input.messages.len()).filter(|&i| Some(i) != system));
        for i in order {
            let m = &input.messages[i];
            for (j, img) in m.images.iter().enumerate() {
                let field = || format!("messages[{i}].images[{j}]");
                let mime = img.mime_type.trim().to_ascii_lowercase();
                if !matches!(mime.as_str(), "" | "image/png" | "image/jpeg" | "image/jpg") {
                    return Err(EngineError::invalid(
                        format!("{}.mime_type", field()),
                        format!(
                            "'{}' is not supported (image/png, image/jpeg)",
                            img.mime_type
                        ),
                    ));
                }
                let rgb = janus_pipeline::decode_rgb(&img.data, &cfg.image_limits)
                    .map_err(|e| EngineError::invalid(field(), e.to_string()))?;
                decoded.push(rgb);
            }
        }
        let conv = Conversation {
            messages,
            images: decoded,
        };
        let prepared =
            guarded("prepare", || self.model.prepare(&conv, params)).map_err(|e| match e {
                EngineError::InvalidArgument { field, reason } => {
                    EngineError::invalid(sampling_field(&field), reason)
                }
                other => other,
            })?;
        Ok(UnderstandTicket { prepared })
    }

    /// Queues a prepared request. Events arrive on the returned receiver; dropping it cancels
    /// the request at the engine's next step.
    pub fn submit(
        &self,
        ticket: UnderstandTicket,
        meta: RequestMeta,
    ) -> Result<mpsc::Receiver<Result<UnderstandEvent>>> {
        // Every token, a possible flush at EOS and the final event fit: the engine never waits.
        let (tx, rx) = mpsc::channel(ticket.prepared.params.max_new_tokens + 4);
        self.control.submit(Work {
            ticket,
            out: Output::new(tx, meta),
        })?;
        Ok(rx)
    }

    /// Stops accepting requests; queued and running ones continue.
    pub fn close(&self) {
        self.control.queue.close();
    }

    /// Ends all queued and running requests at the next step (finish reason `Cancelled`).
    pub fn abort(&self) {
        self.control.queue.close();
        self.control.abort.store(true, Ordering::Relaxed);
    }
}

/// A running request inside the batch.
struct Row {
    out: Output<UnderstandEvent>,
    sent: u32,
    queue: Duration,
    vision: Duration,
    prefill: Duration,
    first_token: Option<Instant>,
    prompt_tokens: usize,
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
struct Runner {
    model: Arc<UnderstandingModel>,
    control: Arc<Control<Work>>,
    config: UnderstandingConfig,
    budget: StepBudget,
    running: Option<Group>,
    waiting: Vec<Waiting>,
    /// The head of the queue, popped but waiting for KV budget (FIFO is kept).
    held: Option<Work>,
}

impl Runner {
    fn new(
        model: Arc<UnderstandingModel>,
        control: Arc<Control<Work>>,
        config: UnderstandingConfig,
    ) -> Self {
        Self {
            model,
            control,
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
        let mut free = self.config.max_batch.max(1).saturating_sub(live);
        let mut budget = self.config.max_batch_tokens.saturating_sub(self.reserved());
        let mut out = Vec::new();
        let mut idle = live == 0;
        while free > 0 {
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
            let need = reserve_of(&w);
            // A request larger than the whole budget still runs, alone.
            if need > budget && !(out.is_empty() && live == 0) {
                self.held = Some(w);
                break;
            }
            budget = budget.saturating_sub(need);
            free -= 1;
            out.push(w);
        }
        Some(out)
    }

    fn stats(&self) -> &Stats {
        &self.control.stats
    }

    /// Admission and stepping until the queue is closed and all work is done.
    fn run(mut self) {
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
            let images = ticket.prepared.images.len();
            if images > 0 {
                out.phase(
                    |p| tracing::info_span!(parent: p, "vision_encode", images = images as i64),
                );
            } else {
                out.phase(|p| {
                    let prompt_tokens = prompt_tokens as i64;
                    tracing::info_span!(parent: p, "prefill", rows = 1i64, prompt_tokens)
                });
            }
            self.stats().active.fetch_add(1, Ordering::Relaxed);
            self.waiting.push(Waiting {
                prefill: self.model.begin(ticket.prepared),
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
        // Requests that left while being prefilled are dropped.
        let before = self.waiting.len();
        self.waiting.retain(|w| w.out.check(now).is_none());
        for _ in self.waiting.len()..before {
            self.leave();
            Stats::bump(&self.stats().cancelled);
        }
        if self.waiting.is_empty() {
            return;
        }
        let decode_rows = self.running.as_ref().map_or(0, |g| g.rows.len());
        let costs: Vec<usize> = self
            .waiting
            .iter()
            .map(|w| self.model.cost_left(&w.prefill))
            .collect();
        let mut done = Vec::new();
        for grant in self.budget.plan(decode_rows, &costs) {
            let model = self.model.clone();
            let w = &mut self.waiting[grant.index];
            let in_vision = w.prefill.in_vision();
            let t = Instant::now();
            let prefill = &mut w.prefill;
            let res = guarded("prefill", || model.prefill(prefill, grant.units));
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
            Stats::bump(&self.control.stats.steps);
            observe_step(&self.config.step_observer, 1);
            match res {
                Ok(None) => {}
                Ok(Some(first)) => done.push((grant.index, Ok(first))),
                Err(e) => done.push((grant.index, Err(e))),
            }
        }
        let mut joined = Vec::new();
        for (w, res) in take_done(&mut self.waiting, done) {
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
