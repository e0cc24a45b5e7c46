//! The generation engine: prompts in, progress, previews and encoded images out.

use crate::control::{
    guarded, observe_step, Control, Output, RequestMeta, Stats, StatsSnapshot, StepObserver,
};
use crate::encode;
use crate::error::{EngineError, Result};
use crate::schedule::{take_done, StepBudget};
use janus_pipeline::gen_batch::GenBatch;
use janus_pipeline::generate::{
    GenPrefill, GenPrepared, GenerateParams, GenerationModel, MAX_IMAGES,
};
use janus_vq::image_buf::Rgb8;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Capacities and output settings of a generation engine.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Requests that may wait before new ones are refused.
    pub max_queue: usize,
    /// Requests in the running batch at most (all advance in one forward per step).
    pub max_batch: usize,
    /// Side of preview thumbnails in pixels.
    pub preview_size: u32,
    /// JPEG quality of `OutputFormat::Jpeg` images.
    pub jpeg_quality: u8,
    /// Longest accepted prompt in bytes (checked before tokenizing).
    pub max_prompt_bytes: usize,
    /// Previews are at least this many token rows apart.
    pub min_preview_rows: usize,
    /// Work per engine iteration in prompt-token units: running CFG rows take one unit each,
    /// the rest prefills waiting prompts (see `schedule`).
    pub step_tokens: usize,
    /// Finished requests whose images may wait for the decode worker; while this many wait, no
    /// new request is admitted (their pixels are decoded one request at a time).
    pub max_decode_queue: usize,
    /// Threads of the decode worker's own pool (it runs beside the model thread).
    pub decode_threads: usize,
    /// Told the rows of every batched forward (prefill, step; a CFG pair counts as two).
    pub step_observer: Option<StepObserver>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_queue: 64,
            max_batch: 8,
            preview_size: 96,
            jpeg_quality: 90,
            max_prompt_bytes: 64 * 1024,
            min_preview_rows: 1,
            step_tokens: 128,
            max_decode_queue: 8,
            decode_threads: 1,
            step_observer: None,
        }
    }
}

/// How finished images are returned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutputFormat {
    #[default]
    Png,
    Jpeg,
    /// Token ids only; the VQ decoder does not run.
    TokensOnly,
}

/// A generation request as the client sent it (unset = default).
#[derive(Debug, Clone, Default)]
pub struct GenerateInput {
    pub prompt: String,
    pub n: Option<u32>,
    pub cfg_weight: Option<f32>,
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub format: OutputFormat,
    /// Preview every this many token rows; 0 = none.
    pub preview_interval: u32,
}

/// A validated request, ready to submit.
#[derive(Debug, Clone)]
pub struct GenerateTicket {
    prepared: GenPrepared,
    format: OutputFormat,
    preview_interval: u32,
}

impl GenerateTicket {
    /// The settings the request will run with (defaults and seed resolved).
    pub fn params(&self) -> &GenerateParams {
        &self.prepared.params
    }

    fn prompt_tokens(&self) -> usize {
        self.prepared.cond.len()
    }
}

/// Where a generation request's time went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerateTimings {
    pub queue: Duration,
    pub prefill: Duration,
    pub decode: Duration,
    pub vq_decode: Duration,
    pub encode: Duration,
    pub preview: Duration,
    pub total: Duration,
}

/// What a generation request streams.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateEvent {
    /// `step` of `total` tokens per image are done.
    Progress { step: u32, total: u32 },
    /// A thumbnail of the partially generated image `index`.
    Preview {
        index: u32,
        step: u32,
        png: Vec<u8>,
        width: u32,
        height: u32,
    },
    /// A finished image.
    Image {
        index: u32,
        data: Vec<u8>,
        mime_type: &'static str,
        seed: u64,
        tokens: Vec<u32>,
        width: u32,
        height: u32,
    },
    /// The end of the stream.
    Finished {
        prompt_tokens: usize,
        completion_tokens: usize,
        timings: GenerateTimings,
    },
}

struct Work {
    ticket: GenerateTicket,
    out: Output<GenerateEvent>,
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Work")
            .field("request_id", &self.out.meta.request_id)
            .finish()
    }
}

/// Handle to the thread that owns a [`GenerationModel`].
#[derive(Debug, Clone)]
pub struct GenerationEngine {
    model: Arc<GenerationModel>,
    control: Arc<Control<Work>>,
    config: GenerationConfig,
}

impl GenerationEngine {
    /// Starts the engine thread that owns `model`.
    pub fn start(model: GenerationModel, config: GenerationConfig) -> Self {
        let model = Arc::new(model);
        let control = Arc::new(Control::new(config.max_queue));
        let engine = Self {
            model: model.clone(),
            control: control.clone(),
            config: config.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("janus-generation".into())
            .spawn(move || Runner::new(model, control, config).run());
        if let Err(e) = spawned {
            tracing::error!("cannot spawn the generation engine thread: {e}");
            engine.control.queue.close();
        }
        engine
    }

    /// The loaded model.
    pub fn model(&self) -> &GenerationModel {
        &self.model
    }

    /// Capacities and output settings.
    pub fn config(&self) -> &GenerationConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.control.snapshot()
    }

    /// Side of a generated image in pixels.
    pub fn image_size(&self) -> usize {
        self.model.config().vision.image_size
    }

    /// Validates a request and tokenizes its prompt (CPU work for a blocking pool).
    pub fn prepare(&self, input: GenerateInput) -> Result<GenerateTicket> {
        if input.prompt.len() > self.config.max_prompt_bytes {
            return Err(EngineError::invalid(
                "prompt",
                format!(
                    "{} bytes, at most {} allowed",
                    input.prompt.len(),
                    self.config.max_prompt_bytes
                ),
            ));
        }
        let n = input.n.unwrap_or(1);
        if !(1..=MAX_IMAGES as u32).contains(&n) {
            return Err(EngineError::invalid(
                "n",
                format!("must be in 1..={MAX_IMAGES}, got {n}"),
            ));
        }
        let params = GenerateParams {
            n: n as usize,
            cfg_weight: input.cfg_weight.unwrap_or(5.0),
            temperature: input.temperature.unwrap_or(1.0),
            top_k: input.top_k.unwrap_or(0) as usize,
            top_p: input.top_p.unwrap_or(1.0),
            seed: input.seed.unwrap_or_else(crate::random_seed),
        };
        let prepared = guarded("prepare", || self.model.prepare(&input.prompt, &params))?;
        Ok(GenerateTicket {
            prepared,
            format: input.format,
            preview_interval: input.preview_interval,
        })
    }

    /// Queues a prepared request. Dropping the receiver cancels it at the next step.
    pub fn submit(
        &self,
        ticket: GenerateTicket,
        meta: RequestMeta,
    ) -> Result<mpsc::Receiver<Result<GenerateEvent>>> {
        let total = self.model.image_tokens();
        let previews = if ticket.preview_interval == 0 {
            0
        } else {
            total / (self.side() * ticket.preview_interval as usize) + 1
        };
        // Progress per step, previews, images and the final event all fit.
        let cap = total + (previews + 1) * ticket.params().n + 4;
        let (tx, rx) = mpsc::channel(cap);
        self.control.submit(Work {
            ticket,
            out: Output::new(tx, meta),
        })?;
        Ok(rx)
    }

    fn side(&self) -> usize {
        (self.model.image_tokens() as f64).sqrt().round().max(1.0) as usize
    }

    /// Stops accepting requests; queued and running ones continue.
    pub fn close(&self) {
        self.control.queue.close();
    }

    /// Ends all queued and running requests at the next step (`Unavailable`).
    pub fn abort(&self) {
        self.control.queue.close();
        self.control.abort.store(true, Ordering::Relaxed);
    }
}

/// A request in the running batch (and then in the decode worker).
struct Job {
    ticket: GenerateTicket,
    out: Output<GenerateEvent>,
    timings: GenerateTimings,
    decode_started: Instant,
}

/// A request whose prompt rows are being prefilled, a piece per engine iteration.
struct Waiting {
    id: u64,
    prefill: GenPrefill,
    work: Work,
    admitted: Instant,
    spent: Duration,
}

/// The engine thread's state: one running [`GenBatch`]; requests are prefilled within each
/// iteration's token budget and join it between steps; every running request advances in the
/// same forward (cross-request batching). Pixels (final images, previews) are the decode
/// worker's.
struct Runner {
    model: Arc<GenerationModel>,
    control: Arc<Control<Work>>,
    config: GenerationConfig,
    budget: StepBudget,
    batch: GenBatch,
    jobs: HashMap<u64, Job>,
    waiting: Vec<Waiting>,
    pixels: Arc<PixelQueue>,
    next_id: u64,
}

impl Runner {
    fn new(
        model: Arc<GenerationModel>,
        control: Arc<Control<Work>>,
        config: GenerationConfig,
    ) -> Self {
        let pixels = Arc::new(PixelQueue::default());
        let worker = PixelWorker {
            model: model.clone(),
            control: control.clone(),
            queue: pixels.clone(),
            config: config.clone(),
            preview_spent: HashMap::new(),
        };
        let threads = config.decode_threads.max(1);
        let spawned = std::thread::Builder::new()
            .name("janus-pixels".into())
            .spawn(move || {
                match rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("janus-pixels-{i}"))
                    .build()
                {
                    Ok(pool) => pool.install(|| worker.run()),
                    Err(e) => {
                        tracing::warn!("decode worker pool: {e}; using the global pool");
                        worker.run()
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot spawn the decode worker: {e}");
            pixels.close();
        }
        Self {
            model,
            control,
            budget: StepBudget::new(config.step_tokens),
            config,
            batch: GenBatch::new(),
            jobs: HashMap::new(),
            waiting: Vec::new(),
            pixels,
            next_id: 0,
        }
    }

    fn stats(&self) -> &Stats {
        &self.control.stats
    }

    /// One job left the running set (before its last event is sent).
    fn leave(&self) {
        self.stats().active.fetch_sub(1, Ordering::Relaxed);
    }

    fn run(mut self) {
        loop {
            if self.control.aborted() {
                let shutting = || EngineError::Unavailable("the server is shutting down".into());
                for (_, j) in std::mem::take(&mut self.jobs) {
                    self.leave();
                    let _ = j.out.send(Err(shutting()));
                    Stats::bump(&self.control.stats.cancelled);
                }
                for w in std::mem::take(&mut self.waiting) {
                    self.leave();
                    let _ = w.work.out.send(Err(shutting()));
                    Stats::bump(&self.control.stats.cancelled);
                }
                self.batch = GenBatch::new();
                for w in self.control.queue.drain() {
                    let _ = w.out.send(Err(shutting()));
                    Stats::bump(&self.control.stats.cancelled);
                }
                let (late, finished) = self
                    .control
                    .queue
                    .pop_wait(usize::MAX, Duration::from_millis(50));
                for w in late {
                    let _ = w.out.send(Err(shutting()));
                }
                if finished {
                    break;
                }
                continue;
            }
            let live = self.jobs.len() + self.waiting.len();
            let free = if self.pixels.finals() >= self.config.max_decode_queue.max(1) {
                0
            } else {
                self.config.max_batch.max(1).saturating_sub(live)
            };
            let items = if free == 0 {
                Vec::new()
            } else if live == 0 {
                let (items, finished) =
                    self.control.queue.pop_wait(free, Duration::from_millis(50));
                if finished && items.is_empty() {
                    break;
                }
                items
            } else {
                self.control.queue.try_pop(free)
            };
            for w in items {
                self.admit(w);
            }
            self.step();
            self.prefill_some();
            if live == 0 && free == 0 {
                // Only the decode worker has work: do not spin.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.pixels.close();
        tracing::debug!("generation engine thread stops");
    }

    /// Starts a request's prefill (nothing is computed yet).
    fn admit(&mut self, mut w: Work) {
        if w.out.check(Instant::now()).is_some() {
            Stats::bump(&self.stats().cancelled);
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let rows = 2 * w.ticket.params().n;
        let prompt_tokens = w.ticket.prompt_tokens() as i64;
        w.out.phase(
            |p| tracing::info_span!(parent: p, "prefill", rows = rows as i64, prompt_tokens),
        );
        self.stats().active.fetch_add(1, Ordering::Relaxed);
        self.waiting.push(Waiting {
            id,
            prefill: self.model.begin(w.ticket.prepared.clone()),
            work: w,
            admitted: Instant::now(),
            spent: Duration::ZERO,
        });
    }

    /// Spends what the running rows leave of this iteration's budget on waiting prompts;
    /// completed ones join the batch.
    fn prefill_some(&mut self) {
        let now = Instant::now();
        let before = self.waiting.len();
        self.waiting.retain(|w| w.work.out.check(now).is_none());
        for _ in self.waiting.len()..before {
            self.leave();
            Stats::bump(&self.stats().cancelled);
        }
        if self.waiting.is_empty() {
            return;
        }
        let costs: Vec<usize> = self
            .waiting
            .iter()
            .map(|w| self.model.cost_left(&w.prefill))
            .collect();
        let mut done = Vec::new();
        for grant in self.budget.plan(self.batch.rows(), &costs) {
            let model = self.model.clone();
            let w = &mut self.waiting[grant.index];
            let t = Instant::now();
            let rows = w.prefill.rows_left();
            let prefill = &mut w.prefill;
            let res = guarded("prefill", || model.prefill(prefill, grant.units));
            w.spent += t.elapsed();
            Stats::bump(&self.control.stats.steps);
            observe_step(&self.config.step_observer, rows);
            match res {
                Ok(None) => {}
                Ok(Some(job)) => done.push((grant.index, Ok(job))),
                Err(e) => done.push((grant.index, Err(e))),
            }
        }
        for (w, res) in take_done(&mut self.waiting, done) {
            let Waiting {
                id,
                work,
                admitted,
                spent,
                ..
            } = w;
            let Work { ticket, mut out } = work;
            let joined = res.and_then(|job| {
                let model = self.model.clone();
                let batch = &mut self.batch;
                guarded("join", move || model.join(batch, id, job))
            });
            if let Err(e) = joined {
                tracing::error!("generation prefill failed: {e}");
                self.leave();
                let _ = out.send(Err(e));
                Stats::bump(&self.stats().failed);
                continue;
            }
            // The image-token steps of this request, aggregated in one span until its last token.
            let (images, steps) = (ticket.params().n as i64, self.model.image_tokens() as i64);
            out.phase(|p| tracing::info_span!(parent: p, "generate_steps", images, steps));
            let now = Instant::now();
            let timings = GenerateTimings {
                queue: admitted.saturating_duration_since(out.meta.received),
                prefill: spent,
                ..Default::default()
            };
            self.jobs.insert(
                id,
                Job {
                    ticket,
                    out,
                    timings,
                    decode_started: now,
                },
            );
        }
    }

    /// Drops a job from the batch (client gone, deadline passed, or its events cannot be sent).
    fn drop_job(&mut self, id: u64) {
        if let Some(j) = self.jobs.remove(&id) {
            tracing::debug!(request_id = %j.out.meta.request_id, "generation cancelled");
            self.leave();
            self.batch.cancel(id);
            self.pixels.forget_preview(id);
            Stats::bump(&self.stats().cancelled);
        }
    }

    /// One step for every running job; progress out, previews and finished jobs to the decode
    /// worker.
    fn step(&mut self) {
        if self.jobs.is_empty() {
            return;
        }
        let now = Instant::now();
        let stopped: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.out.check(now).is_some())
            .map(|(&id, _)| id)
            .collect();
        for id in stopped {
            self.drop_job(id);
        }
        if self.jobs.is_empty() {
            self.batch = GenBatch::new();
            return;
        }
        let model = self.model.clone();
        let rows = self.batch.rows();
        let batch = &mut self.batch;
        let stepped = guarded("generation step", || model.step_batch(batch));
        Stats::bump(&self.stats().steps);
        observe_step(&self.config.step_observer, rows);
        let sampled = match stepped {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("generation step failed: {e}");
                for (_, j) in self.jobs.drain() {
                    self.control.stats.active.fetch_sub(1, Ordering::Relaxed);
                    let _ = j.out.send(Err(e.clone()));
                    Stats::bump(&self.control.stats.failed);
                }
                self.batch = GenBatch::new();
                return;
            }
        };
        for (id, _) in sampled {
            let Some((step, total)) = self.batch.progress(id) else {
                continue;
            };
            let Some(j) = self.jobs.get(&id) else {
                continue;
            };
            let sent = j.out.send(Ok(GenerateEvent::Progress {
                step: step as u32,
                total: total as u32,
            }));
            if !sent {
                self.drop_job(id);
                continue;
            }
            let side = (total as f64).sqrt().round().max(1.0) as usize;
            let rows =
                (j.ticket.preview_interval as usize).max(self.config.min_preview_rows.max(1));
            let every = if j.ticket.preview_interval == 0 {
                0
            } else {
                rows * side
            };
            if every > 0 && step % every == 0 && step < total {
                if let Some(tokens) = self.batch.tokens(id) {
                    self.pixels.preview(
                        id,
                        PreviewTask {
                            step: step as u32,
                            tokens: tokens.to_vec(),
                            tx: j.out.tx.clone(),
                        },
                    );
                }
            }
        }
        // Requests that finished in this step go to the decode worker.
        for f in self.batch.take_finished() {
            let Some(mut j) = self.jobs.remove(&f.id) else {
                continue;
            };
            j.timings.decode = j.decode_started.elapsed();
            // `generate_steps` ends; the VQ decode is the request's next span.
            let images = f.tokens.len();
            match j.ticket.format {
                OutputFormat::TokensOnly => j.out.end_phase(None),
                _ => j
                    .out
                    .phase(|p| tracing::info_span!(parent: p, "vq_decode", images = images as i64)),
            }
            self.pixels.finish(
                f.id,
                FinalTask {
                    job: j,
                    tokens: f.tokens,
                },
            );
        }
        if self.jobs.is_empty() {
            self.batch = GenBatch::new();
        }
    }
}

/// A request's preview: its tokens so far, and where to send the thumbnails.
struct PreviewTask {
    step: u32,
    tokens: Vec<Vec<u32>>,
    tx: mpsc::Sender<Result<GenerateEvent>>,
}

/// A request whose tokens are complete: decode, encode and send.
struct FinalTask {
    job: Job,
    tokens: Vec<Vec<u32>>,
}

#[derive(Default)]
struct PixelState {
    finals: VecDeque<(u64, Box<FinalTask>)>,
    /// The latest preview per request: an older one not yet rendered is replaced.
    previews: BTreeMap<u64, PreviewTask>,
    closed: bool,
}

/// The decode worker's queue, filled by the engine thread (which never waits on it).
#[derive(Default)]
struct PixelQueue {
    state: Mutex<PixelState>,
    ready: Condvar,
    /// Finished requests queued or being decoded.
    finals: AtomicUsize,
}

impl PixelQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, PixelState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn finals(&self) -> usize {
        self.finals.load(Ordering::Relaxed)
    }

    fn preview(&self, id: u64, task: PreviewTask) {
        self.lock().previews.insert(id, task);
        self.ready.notify_one();
    }

    fn forget_preview(&self, id: u64) {
        self.lock().previews.remove(&id);
    }

    fn finish(&self, id: u64, task: FinalTask) {
        self.finals.fetch_add(1, Ordering::Relaxed);
        let mut s = self.lock();
        s.previews.remove(&id);
        s.finals.push_back((id, Box::new(task)));
        drop(s);
        self.ready.notify_one();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

enum PixelWork {
    Preview(u64, PreviewTask),
    Final(u64, Box<FinalTask>),
}

/// Turns tokens into pixels off the model thread: cheap previews first (latest wins), then
/// finished requests one at a time, their decode stopped between decoder blocks when the
/// client leaves or the deadline passes.
struct PixelWorker {
    model: Arc<GenerationModel>,
    control: Arc<Control<Work>>,
    queue: Arc<PixelQueue>,
    config: GenerationConfig,
    /// Time spent on each request's previews, reported in its final timings.
    preview_spent: HashMap<u64, Duration>,
}

impl PixelWorker {
    fn next(&self) -> Option<PixelWork> {
        let mut s = self.queue.lock();
        loop {
            if let Some((id, _)) = s.previews.iter().next() {
                let id = *id;
                let task = s.previews.remove(&id).expect("present");
                return Some(PixelWork::Preview(id, task));
            }
            if let Some((id, task)) = s.finals.pop_front() {
                return Some(PixelWork::Final(id, task));
            }
            if s.closed {
                return None;
            }
            s = self
                .queue
                .ready
                .wait_timeout(s, Duration::from_millis(200))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn run(mut self) {
        // Ready for the first preview before any request asks for one.
        let model = self.model.clone();
        if let Err(e) = guarded("preview calibration", || model.calibrate_previews()) {
            tracing::warn!("preview calibration failed: {e}");
        }
        while let Some(work) = self.next() {
            match work {
                PixelWork::Preview(id, task) => self.preview(id, task),
                PixelWork::Final(id, task) => {
                    self.finish(id, *task);
                    self.queue.finals.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        tracing::debug!("decode worker stops");
    }

    fn preview(&mut self, id: u64, task: PreviewTask) {
        if task.tx.is_closed() {
            return;
        }
        let t = Instant::now();
        let size = self.config.preview_size;
        for (index, tokens) in task.tokens.iter().enumerate() {
            let model = self.model.clone();
            let png = guarded("preview", || model.preview(tokens, size))
                .and_then(|img| encode::png(img.width, img.height, &img.data));
            match png {
                Ok(png) => {
                    let _ = task.tx.try_send(Ok(GenerateEvent::Preview {
                        index: index as u32,
                        step: task.step,
                        png,
                        width: size,
                        height: size,
                    }));
                }
                Err(e) => {
                    tracing::warn!("preview failed: {e}");
                    return;
                }
            }
        }
        *self.preview_spent.entry(id).or_default() += t.elapsed();
    }

    fn finish(&mut self, id: u64, task: FinalTask) {
        let FinalTask { mut job, tokens } = task;
        job.timings.preview = self.preview_spent.remove(&id).unwrap_or_default();
        let stats = &self.control.stats;
        let leave = || stats.active.fetch_sub(1, Ordering::Relaxed);
        if self.control.aborted() {
            leave();
            let _ = job.out.send(Err(EngineError::Unavailable(
                "the server is shutting down".into(),
            )));
            Stats::bump(&stats.cancelled);
            return;
        }
        let pixels = if job.ticket.format == OutputFormat::TokensOnly {
            Ok(None)
        } else {
            let t = Instant::now();
            let model = self.model.clone();
            let out = &job.out;
            let control = &self.control;
            // Stops between decoder blocks: client gone, deadline passed (the error is sent)
            // or shutdown.
            let stop = || control.aborted() || out.check(Instant::now()).is_some();
            let decoded = guarded("VQ decode", || model.decode_until(&tokens, &stop));
            job.timings.vq_decode = t.elapsed();
            job.out.end_phase(None);
            match decoded {
                Ok(Some(images)) => Ok(Some(images)),
                Ok(None) => {
                    tracing::debug!(request_id = %job.out.meta.request_id, "decode stopped");
                    leave();
                    if self.control.aborted() {
                        let _ = job.out.send(Err(EngineError::Unavailable(
                            "the server is shutting down".into(),
                        )));
                    }
                    Stats::bump(&stats.cancelled);
                    return;
                }
                Err(e) => Err(e),
            }
        };
        leave();
        match pixels.and_then(|px| self.send(&mut job, tokens, px)) {
            Ok(()) => Stats::bump(&stats.completed),
            Err(e) => {
                let _ = job.out.send(Err(e));
                Stats::bump(&stats.failed);
            }
        }
    }

    /// Encodes and sends every image, then the final event.
    fn send(&self, j: &mut Job, tokens: Vec<Vec<u32>>, pixels: Option<Vec<Rgb8>>) -> Result<()> {
        let params = j.ticket.params().clone();
        let total = self.model.image_tokens();
        let side = self.model.config().vision.image_size as u32;
        let t = Instant::now();
        let encoding = match &pixels {
            Some(px) => j.out.child(
                |p| tracing::info_span!(parent: p, "encode_image", images = px.len() as i64),
            ),
            None => tracing::Span::none(),
        };
        let mut out = Vec::with_capacity(tokens.len());
        for (i, toks) in tokens.into_iter().enumerate() {
            let seed = params.seed.wrapping_add(i as u64);
            let (data, mime_type, width, height) = match &pixels {
                None => (Vec::new(), "", side, side),
                Some(images) => {
                    let img = images.get(i).ok_or_else(|| {
                        EngineError::Internal("VQ decoder returned too few images".into())
                    })?;
                    let (data, mime) = match j.ticket.format {
                        OutputFormat::Jpeg => (
                            encode::jpeg(
                                img.width,
                                img.height,
                                &img.data,
                                self.config.jpeg_quality,
                            )?,
                            "image/jpeg",
                        ),
                        _ => (encode::png(img.width, img.height, &img.data)?, "image/png"),
                    };
                    (data, mime, img.width, img.height)
                }
            };
            out.push(GenerateEvent::Image {
                index: i as u32,
                data,
                mime_type,
                seed,
                tokens: toks,
                width,
                height,
            });
        }
        j.timings.encode = t.elapsed();
        drop(encoding);
        for ev in out {
            j.out.send(Ok(ev));
        }
        j.timings.total = j.out.meta.received.elapsed();
        j.out.send(Ok(GenerateEvent::Finished {
            prompt_tokens: j.ticket.prompt_tokens(),
            completion_tokens: total * params.n,
            timings: j.timings,
        }));
        Ok(())
    }
}
