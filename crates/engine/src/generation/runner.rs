//! The generation model thread: admission, chunked prefill of the CFG rows within each step's
//! budget, the batch's steps, progress and previews handed to the decode worker.

use super::pixels::{FinalTask, PixelQueue, PreviewTask};
use super::*;
use crate::admission::{Admission, Load};
use crate::control::{guarded, observe_step, Control, Stats};
use crate::error::EngineError;
use crate::schedule::{prefill_round, StepBudget};
use janus_pipeline::generation::{GenPrefill, GenerationModel};
use janus_pipeline::GenBatch;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
pub(super) struct Runner {
    model: Arc<GenerationModel>,
    control: Arc<Control<Work>>,
    config: GenerationConfig,
    admission: Admission,
    budget: StepBudget,
    batch: GenBatch,
    jobs: HashMap<u64, Job>,
    waiting: Vec<Waiting>,
    pixels: Arc<PixelQueue>,
    next_id: u64,
}

impl Runner {
    pub(super) fn new(
        model: Arc<GenerationModel>,
        control: Arc<Control<Work>>,
        config: GenerationConfig,
    ) -> Self {
        let pixels = PixelQueue::spawn_worker(&model, &control, &config);
        Self {
            model,
            control,
            admission: Admission {
                slots: config.max_batch,
                tokens: usize::MAX,
            },
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

    /// Tells the decode worker whether this thread has requests to run.
    fn tell_busy(&self) {
        self.pixels
            .set_model_busy(!self.jobs.is_empty() || !self.waiting.is_empty());
    }

    /// One job left the running set (before its last event is sent).
    fn leave(&self) {
        self.stats().active.fetch_sub(1, Ordering::Relaxed);
    }

    pub(super) fn run(mut self) {
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
            // Slots only (a request's KV is bounded by MAX_IMAGES pairs); none while the decode
            // backlog is full.
            let free = self
                .admission
                .round(Load {
                    live,
                    reserved: 0,
                    paused: self.pixels.finals() >= self.config.max_decode_queue.max(1),
                })
                .free();
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
            self.tell_busy();
            self.step();
            self.prefill_some();
            self.tell_busy();
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
        // Takes what the prefix cache holds of the two prompt rows.
        let prefill = match guarded("begin", || self.model.begin(w.ticket.prepared.clone())) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("generation request could not begin: {e}");
                let _ = w.out.send(Err(e));
                Stats::bump(&self.stats().failed);
                return;
            }
        };
        w.ticket.cached_tokens = prefill.cached_tokens();
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
            prefill,
            work: w,
            admitted: Instant::now(),
            spent: Duration::ZERO,
        });
    }

    /// Spends what the running rows leave of this iteration's budget on waiting prompts;
    /// completed ones join the batch.
    fn prefill_some(&mut self) {
        let now = Instant::now();
        let model = self.model.clone();
        let (control, observer) = (&self.control, &self.config.step_observer);
        let round = prefill_round(
            &mut self.waiting,
            &self.budget,
            self.batch.rows(),
            |w| w.work.out.check(now).is_some(),
            |w| model.cost_left(&w.prefill),
            |w, units| {
                let t = Instant::now();
                let rows = w.prefill.rows_left();
                let prefill = &mut w.prefill;
                let res = guarded("prefill", || model.prefill(prefill, units));
                w.spent += t.elapsed();
                Stats::bump(&control.stats.steps);
                observe_step(observer, rows);
                res.transpose()
            },
        );
        for _ in 0..round.dropped {
            self.leave();
            Stats::bump(&self.stats().cancelled);
        }
        for (w, res) in round.done {
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
        // Requests that finished in this step go to the decode worker, told first whether
        // this thread still has requests (all of a burst may finish in the same step).
        let finished: Vec<_> = self
            .batch
            .take_finished()
            .into_iter()
            .filter_map(|f| self.jobs.remove(&f.id).map(|j| (f, j)))
            .collect();
        self.tell_busy();
        for (f, mut j) in finished {
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
