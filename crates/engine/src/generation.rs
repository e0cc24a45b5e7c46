//! The generation engine: prompts in, progress, previews and encoded images out.

use crate::control::{
    guarded, observe_step, Control, Output, RequestMeta, Stats, StatsSnapshot, StepObserver,
};
use crate::encode;
use crate::error::{EngineError, Result};
use janus_pipeline::gen_batch::GenBatch;
use janus_pipeline::generate::{GenerateParams, GenerationModel, MAX_IMAGES};
use janus_vq::image_buf::Rgb8;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
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
    /// Previews are at least this many token rows apart (each costs a VQ decode).
    pub min_preview_rows: usize,
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
            min_preview_rows: 2,
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
    prompt: String,
    params: GenerateParams,
    format: OutputFormat,
    preview_interval: u32,
    prompt_tokens: usize,
}

impl GenerateTicket {
    /// The settings the request will run with (defaults and seed resolved).
    pub fn params(&self) -> &GenerateParams {
        &self.params
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
        params
            .validate()
            .map_err(|e| EngineError::from_pipeline(e, |f| f.to_string()))?;
        let (cond, _) = guarded("tokenize", || {
            self.model.tokenizer().encode_generation(&input.prompt)
        })?;
        let total = self.model.image_tokens();
        let context = self.model.context();
        if cond.len() + total > context {
            return Err(EngineError::invalid(
                "prompt",
                format!(
                    "{} prompt tokens plus {total} image tokens exceed the context window of {context} tokens",
                    cond.len()
                ),
            ));
        }
        Ok(GenerateTicket {
            prompt: input.prompt,
            params,
            format: input.format,
            preview_interval: input.preview_interval,
            prompt_tokens: cond.len(),
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
        let cap = total + (previews + 1) * ticket.params.n + 4;
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

/// A request in the running batch.
struct Job {
    ticket: GenerateTicket,
    out: Output<GenerateEvent>,
    timings: GenerateTimings,
    decode_started: Instant,
}

/// The engine thread's state: one running [`GenBatch`]; requests join it between steps and
/// every running request advances in the same forward (cross-request batching).
struct Runner {
    model: Arc<GenerationModel>,
    control: Arc<Control<Work>>,
    config: GenerationConfig,
    batch: GenBatch,
    jobs: HashMap<u64, Job>,
    next_id: u64,
}

impl Runner {
    fn new(
        model: Arc<GenerationModel>,
        control: Arc<Control<Work>>,
        config: GenerationConfig,
    ) -> Self {
        Self {
            model,
            control,
            config,
            batch: GenBatch::new(),
            jobs: HashMap::new(),
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
                for (_, j) in self.jobs.drain() {
                    let _ = j.out.send(Err(shutting()));
                    Stats::bump(&self.control.stats.cancelled);
                }
                self.batch = GenBatch::new();
                for w in self.control.queue.drain() {
                    let _ = w.out.send(Err(shutting()));
                    Stats::bump(&self.control.stats.cancelled);
                }
                self.stats().active.store(0, Ordering::Relaxed);
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
            let free = self.config.max_batch.max(1).saturating_sub(self.jobs.len());
            let items = if free == 0 {
                Vec::new()
            } else if self.jobs.is_empty() {
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
        }
        tracing::debug!("generation engine thread stops");
    }

    /// Prefills one request and joins it to the running batch.
    fn admit(&mut self, mut w: Work) {
        if w.out.check(Instant::now()).is_some() {
            Stats::bump(&self.stats().cancelled);
            return;
        }
        let admitted = Instant::now();
        let model = self.model.clone();
        let (prompt, params) = (w.ticket.prompt.clone(), w.ticket.params.clone());
        let id = self.next_id;
        self.next_id += 1;
        // A CFG pair (conditional + unconditional) per image.
        let (images, rows) = (params.n, 2 * params.n);
        let prompt_tokens = w.ticket.prompt_tokens;
        w.out.phase(|p| {
            let prompt_tokens = prompt_tokens as i64;
            tracing::info_span!(parent: p, "prefill", rows = rows as i64, prompt_tokens)
        });
        let batch = &mut self.batch;
        let joined = guarded("prefill", move || {
            let job = model.start(&prompt, &params)?;
            model.join(batch, id, job)
        });
        Stats::bump(&self.stats().steps);
        observe_step(&self.config.step_observer, rows);
        if let Err(e) = joined {
            tracing::error!("generation prefill failed: {e}");
            let _ = w.out.send(Err(e));
            Stats::bump(&self.stats().failed);
            return;
        }
        // The image-token steps of this request, aggregated in one span until its last token.
        let steps = self.model.image_tokens();
        w.out.phase(|p| {
            let (images, steps) = (images as i64, steps as i64);
            tracing::info_span!(parent: p, "generate_steps", images, steps)
        });
        let now = Instant::now();
        let timings = GenerateTimings {
            queue: admitted.saturating_duration_since(w.out.meta.received),
            prefill: now - admitted,
            ..Default::default()
        };
        self.jobs.insert(
            id,
            Job {
                ticket: w.ticket,
                out: w.out,
                timings,
                decode_started: now,
            },
        );
        self.stats().active.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops a job from the batch (client gone, deadline passed, or its events cannot be sent).
    fn drop_job(&mut self, id: u64) {
        if let Some(j) = self.jobs.remove(&id) {
            tracing::debug!(request_id = %j.out.meta.request_id, "generation cancelled");
            self.leave();
            self.batch.cancel(id);
            Stats::bump(&self.stats().cancelled);
        }
    }

    /// One step for every running job; progress and previews out; finished jobs are decoded
    /// and sent.
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
        let mut due = Vec::new();
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
            // Previews cost a VQ decode each: at least `min_preview_rows` rows apart.
            let rows =
                (j.ticket.preview_interval as usize).max(self.config.min_preview_rows.max(1));
            let every = if j.ticket.preview_interval == 0 {
                0
            } else {
                rows * side
            };
            if every > 0 && step % every == 0 && step < total {
                due.push(id);
            }
        }
        if !due.is_empty() {
            if let Err(e) = self.previews(&due) {
                tracing::warn!("preview failed: {e}");
            }
        }
        // Requests that finished in this step are VQ-decoded together.
        let mut finished: Vec<(Job, Vec<Vec<u32>>)> = Vec::new();
        for f in self.batch.take_finished() {
            let Some(mut j) = self.jobs.remove(&f.id) else {
                continue;
            };
            self.leave();
            j.timings.decode = j.decode_started.elapsed();
            // `generate_steps` ends; the batched VQ decode is the request's next span.
            let images = f.tokens.len();
            match j.ticket.format {
                OutputFormat::TokensOnly => j.out.end_phase(None),
                _ => j
                    .out
                    .phase(|p| tracing::info_span!(parent: p, "vq_decode", images = images as i64)),
            }
            finished.push((j, f.tokens));
        }
        if !finished.is_empty() {
            let grids: Vec<Vec<u32>> = finished
                .iter()
                .filter(|(j, _)| j.ticket.format != OutputFormat::TokensOnly)
                .flat_map(|(_, t)| t.iter().cloned())
                .collect();
            let t = Instant::now();
            let model = self.model.clone();
            let decoded = if grids.is_empty() {
                Ok(Vec::new())
            } else {
                guarded("VQ decode", move || model.decode(&grids))
            };
            let vq_time = t.elapsed();
            for (j, _) in finished.iter_mut() {
                j.out.end_phase(None);
            }
            let mut images = match decoded {
                Ok(images) => Some(images.into_iter()),
                Err(e) => {
                    for (j, _) in finished.drain(..) {
                        let _ = j.out.send(Err(e.clone()));
                        Stats::bump(&self.stats().failed);
                    }
                    None
                }
            };
            for (mut j, tokens) in finished {
                let pixels = match (&mut images, j.ticket.format) {
                    (_, OutputFormat::TokensOnly) | (None, _) => None,
                    (Some(it), _) => Some(it.by_ref().take(tokens.len()).collect()),
                };
                if pixels.is_some() {
                    j.timings.vq_decode = vq_time;
                }
                match self.finish(&mut j, tokens, pixels) {
                    Ok(()) => Stats::bump(&self.stats().completed),
                    Err(e) => {
                        let _ = j.out.send(Err(e));
                        Stats::bump(&self.stats().failed);
                    }
                }
            }
        }
        if self.jobs.is_empty() {
            self.batch = GenBatch::new();
        }
    }

    /// Decodes the partial grids of the jobs in `ids` (missing codes repeat the last generated
    /// one) to thumbnails, all in one VQ decode.
    fn previews(&mut self, ids: &[u64]) -> Result<()> {
        let t = Instant::now();
        let total = self.model.image_tokens();
        let mut grids = Vec::new();
        let mut owners = Vec::new();
        for &id in ids {
            let Some(tokens) = self.batch.tokens(id) else {
                continue;
            };
            let step = tokens.first().map_or(0, Vec::len) as u32;
            for (i, seq) in tokens.iter().enumerate() {
                let last = seq.last().copied().unwrap_or(0);
                let mut v = seq.clone();
                v.resize(total, last);
                grids.push(v);
                owners.push((id, i as u32, step));
            }
        }
        if grids.is_empty() {
            return Ok(());
        }
        let model = self.model.clone();
        let images = guarded("preview decode", move || model.decode(&grids))?;
        let size = self.config.preview_size;
        let spent = t.elapsed() / ids.len().max(1) as u32;
        for (img, (id, index, step)) in images.into_iter().zip(owners) {
            let Some(j) = self.jobs.get_mut(&id) else {
                continue;
            };
            let png = encode::thumbnail_png(img.width, img.height, img.data, size)?;
            j.out.send(Ok(GenerateEvent::Preview {
                index,
                step,
                png,
                width: size,
                height: size,
            }));
            if index == 0 {
                j.timings.preview += spent;
            }
        }
        Ok(())
    }

    /// Decodes, encodes and sends every image, then the final event.
    fn finish(&self, j: &mut Job, tokens: Vec<Vec<u32>>, pixels: Option<Vec<Rgb8>>) -> Result<()> {
        let params = &j.ticket.params;
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
            prompt_tokens: j.ticket.prompt_tokens,
            completion_tokens: total * params.n,
            timings: j.timings,
        }));
        Ok(())
    }
}
