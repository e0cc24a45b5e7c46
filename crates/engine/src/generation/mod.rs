//! The generation engine: prompts in, progress, previews and encoded images out.
//!
//! - this file: configuration, the request and event types, the handle's state;
//! - `handle.rs`: [`GenerationEngine`]: start the model thread, submit, close, abort;
//! - `prepare.rs`: validation and tokenization (on the caller's blocking pool);
//! - `runner.rs`: the model thread: admission ([`crate::admission`]), chunked prefill within
//!   the step budget ([`crate::schedule`]), the batch's steps (the pipeline's `GenBatch`);
//! - `pixels.rs`: the decode worker: previews and final images off the model thread.

use crate::control::{Control, Output, StepObserver};
use janus_pipeline::generation::{GenPrepared, GenerateParams, GenerationModel};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Threads of the decode worker's own pool, for previews and final images decoded beside
    /// the model's steps; a final image decoded while the model thread has nothing to run uses
    /// the model's pool instead.
    pub decode_threads: usize,
    /// Told the rows of every batched forward (prefill, step; a CFG pair counts as two).
    pub step_observer: Option<StepObserver>,
    /// Byte limit of the prefix cache of prompt rows (0: off).
    pub prefix_cache_bytes: usize,
    /// Whose prefix cache entries a request may reuse (the service derives each request's
    /// scope from it).
    pub cache_scope: crate::CacheScope,
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
            prefix_cache_bytes: 0,
            cache_scope: crate::CacheScope::Key,
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
    /// Whose prefix cache entries the request may reuse and leaves.
    pub scope: janus_pipeline::Scope,
}

/// A validated request, ready to submit.
#[derive(Debug, Clone)]
pub struct GenerateTicket {
    prepared: GenPrepared,
    format: OutputFormat,
    preview_interval: u32,
    /// Conditional prompt positions the prefix cache supplied (known once the request began).
    cached_tokens: usize,
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
        /// Of `prompt_tokens`, those the prefix cache supplied.
        cached_tokens: usize,
        completion_tokens: usize,
        timings: GenerateTimings,
    },
}

mod handle;
mod pixels;
mod prepare;
mod runner;

/// A queued generation request.
type Work = crate::control::Work<GenerateTicket, GenerateEvent>;

/// Handle to the thread that owns a [`GenerationModel`].
#[derive(Debug, Clone)]
pub struct GenerationEngine {
    model: Arc<GenerationModel>,
    control: Arc<Control<Work>>,
    config: GenerationConfig,
}

/// A request in the running batch (and then in the decode worker).
struct Job {
    ticket: GenerateTicket,
    out: Output<GenerateEvent>,
    timings: GenerateTimings,
    decode_started: Instant,
}
