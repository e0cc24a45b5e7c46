//! The decode worker: turns tokens into pixels off the model thread (previews, final images).

use super::*;
use crate::control::{guarded, Control, Stats};
use crate::encode;
use crate::error::{EngineError, Result};
use janus_pipeline::generation::GenerationModel;
use janus_vq::image_buf::Rgb8;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A request's preview: its tokens so far, and where to send the thumbnails.
pub(super) struct PreviewTask {
    pub(super) step: u32,
    pub(super) tokens: Vec<Vec<u32>>,
    pub(super) tx: mpsc::Sender<Result<GenerateEvent>>,
}

/// A request whose tokens are complete: decode, encode and send.
pub(super) struct FinalTask {
    pub(super) job: Job,
    pub(super) tokens: Vec<Vec<u32>>,
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
pub(super) struct PixelQueue {
    state: Mutex<PixelState>,
    ready: Condvar,
    /// Finished requests queued or being decoded.
    finals: AtomicUsize,
    /// Whether the model thread has requests to run (set by it before it hands over finals).
    model_busy: AtomicBool,
}

impl PixelQueue {
    /// Starts the decode worker thread (with its own rayon pool of `decode_threads` for work
    /// beside the model's steps) and returns the queue the engine thread fills. Without a
    /// thread the queue is closed.
    pub(super) fn spawn_worker(
        model: &Arc<GenerationModel>,
        control: &Arc<Control<Work>>,
        config: &GenerationConfig,
    ) -> Arc<Self> {
        let pixels = Arc::new(PixelQueue::default());
        let (model, control, queue, config) = (
            model.clone(),
            control.clone(),
            pixels.clone(),
            config.clone(),
        );
        let threads = config.decode_threads.max(1);
        let spawned = std::thread::Builder::new()
            .name("janus-pixels".into())
            .spawn(move || {
                let beside = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("janus-pixels-{i}"))
                    .build()
                    .inspect_err(|e| {
                        tracing::warn!("decode worker pool: {e}; using the global pool")
                    })
                    .ok();
                PixelWorker {
                    model,
                    control,
                    queue,
                    config,
                    beside,
                    preview_spent: HashMap::new(),
                }
                .run()
            });
        if let Err(e) = spawned {
            tracing::error!("cannot spawn the decode worker: {e}");
            pixels.close();
        }
        pixels
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PixelState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn finals(&self) -> usize {
        self.finals.load(Ordering::Relaxed)
    }

    /// Tells the decode worker whether the model thread has requests to run (running or being
    /// prefilled): while it has none, final images are decoded on the model's pool, with all
    /// of its threads, instead of beside the steps.
    pub(super) fn set_model_busy(&self, busy: bool) {
        self.model_busy.store(busy, Ordering::Relaxed);
    }

    pub(super) fn preview(&self, id: u64, task: PreviewTask) {
        self.lock().previews.insert(id, task);
        self.ready.notify_one();
    }

    pub(super) fn forget_preview(&self, id: u64) {
        self.lock().previews.remove(&id);
    }

    pub(super) fn finish(&self, id: u64, task: FinalTask) {
        self.finals.fetch_add(1, Ordering::Relaxed);
        let mut s = self.lock();
        s.previews.remove(&id);
        s.finals.push_back((id, Box::new(task)));
        drop(s);
        self.ready.notify_one();
    }

    pub(super) fn close(&self) {
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
///
/// Beside the model's steps the worker runs on its own small pool (`decode_threads`), so a
/// decode takes what the steps leave of the cores rather than queueing its tasks among theirs.
/// A final image whose decode starts while the model thread has nothing to run (the last
/// requests of a burst finish together, or a lone request) runs on the model's pool instead,
/// with every core: at the end of a burst of eight the decodes then no longer run one thread
/// wide while the other cores wait. A request admitted meanwhile shares the pool for at most
/// the rest of that image's decode.
struct PixelWorker {
    model: Arc<GenerationModel>,
    control: Arc<Control<Work>>,
    queue: Arc<PixelQueue>,
    config: GenerationConfig,
    /// The pool for work beside the model's steps (`None`: the pool could not be built, and
    /// everything runs on the model's pool).
    beside: Option<rayon::ThreadPool>,
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

    /// Runs `f` on the worker's own pool, or with `shared` on the model's (global) pool.
    fn on_pool<R: Send>(&self, shared: bool, f: impl FnOnce() -> R + Send) -> R {
        match &self.beside {
            Some(pool) if !shared => pool.install(f),
            _ => f(),
        }
    }

    fn run(mut self) {
        // Ready for the first preview before any request asks for one.
        let model = self.model.clone();
        let calibrated = self.on_pool(false, || {
            guarded("preview calibration", || model.calibrate_previews())
        });
        if let Err(e) = calibrated {
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
            let png = self
                .on_pool(false, || guarded("preview", || model.preview(tokens, size)))
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
            let shared = !self.queue.model_busy.load(Ordering::Relaxed);
            let decoded = self.on_pool(shared, || {
                guarded("VQ decode", || model.decode_until(&tokens, &stop))
            });
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
            cached_tokens: j.ticket.cached_tokens,
            completion_tokens: total * params.n,
            timings: j.timings,
        }));
        Ok(())
    }
}
