//! Engines that own the Janus-Pro model halves and serve requests from a bounded queue.
//!
//! Each engine runs its model on one dedicated OS thread, so async runtimes never block on
//! compute. Callers first [`prepare`](UnderstandingEngine::prepare) a request (validation,
//! image decoding, tokenization — CPU work meant for a blocking pool), then
//! [`submit`](UnderstandingEngine::submit) it and read domain events from a
//! `tokio::sync::mpsc::Receiver`. Submission fails fast with [`EngineError::Overloaded`] when
//! the queue is full.
//!
//! The engine loop separates *admission* (take waiting requests, prefill them as one batch)
//! from *stepping* (advance every running batch by one token). Between steps it drops work
//! whose receiver is gone (client cancelled or disconnected) or whose deadline passed.

mod admission;
mod control;
mod encode;
pub mod error;
pub mod generation;
mod queue;
mod schedule;
pub mod understanding;

pub use control::{RequestMeta, StatsSnapshot, StepObserver};
pub use error::{EngineError, Result};
pub use generation::{
    GenerateEvent, GenerateInput, GenerateTicket, GenerateTimings, GenerationConfig,
    GenerationEngine, OutputFormat,
};
pub use understanding::{
    CacheScope, Finish, InputImage, InputMessage, SamplingInput, UnderstandEvent, UnderstandInput,
    UnderstandTicket, UnderstandTimings, UnderstandingConfig, UnderstandingEngine,
};

/// A fresh random seed for requests that do not name one (kept in u32 range so it survives
/// JSON clients that read numbers as doubles).
pub(crate) fn random_seed() -> u64 {
    rand::random::<u32>() as u64
}
