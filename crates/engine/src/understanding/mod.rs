//! The understanding engine: conversations with images in, token events out.
//!
//! - this file: configuration, the request and event types, the handle's state;
//! - `handle.rs`: [`UnderstandingEngine`]: start the model thread, submit, close, abort;
//! - `prepare.rs`: validation, image decoding and tokenization (on the caller's blocking pool);
//! - `runner.rs`: the model thread: admission ([`crate::admission`]), chunked prefill within
//!   the step budget ([`crate::schedule`]), the batch's steps, events.

use crate::control::{Control, StepObserver};
use janus_pipeline::understand::Prepared;
use janus_pipeline::{FinishReason, ImageLimits, Scope, UnderstandingModel};
use std::sync::Arc;
use std::time::Duration;

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
    /// Byte limit of the prefix KV cache (0: off).
    pub prefix_cache_bytes: usize,
    /// Byte limit of the image-feature cache (0: off).
    pub image_cache_bytes: usize,
    /// Whose cache entries a request may reuse (the service derives each request's
    /// [`Scope`] from it).
    pub cache_scope: CacheScope,
}

/// How cache entries are shared between callers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheScope {
    /// Per API key: a request reuses only what requests with the same key left (a request
    /// without a key shares with the others without one).
    #[default]
    Key,
    /// Every request reuses every entry (one tenant).
    Global,
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
            prefix_cache_bytes: 0,
            image_cache_bytes: 0,
            cache_scope: CacheScope::Key,
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
    /// Whose cache entries the request may reuse and leaves.
    pub scope: Scope,
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
        /// Prompt tokens taken from the prefix cache (not prefilled).
        cached_tokens: usize,
        completion_tokens: usize,
        timings: UnderstandTimings,
    },
}

mod handle;
mod prepare;
mod runner;

/// A queued understanding request.
type Work = crate::control::Work<UnderstandTicket, UnderstandEvent>;

/// Handle to the thread that owns an [`UnderstandingModel`].
#[derive(Debug, Clone)]
pub struct UnderstandingEngine {
    model: Arc<UnderstandingModel>,
    control: Arc<Control<Work>>,
    config: UnderstandingConfig,
}
