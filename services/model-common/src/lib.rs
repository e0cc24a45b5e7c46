//! What the two model services (and `janus serve`, local mode) share, and the gateway does not:
//! the one start-up path of a model half ([`half`]), model and engine flags ([`flags`]), model
//! source resolution (local directory or Hugging Face hub id, [`model_source`]), the one
//! engine-error → `tonic::Status` mapping ([`status`]), the engine queue gauge ([`gauge`]) and
//! the named math threads ([`threads`]).

pub mod cache;
pub mod cache_metrics;
pub mod flags;
pub mod gauge;
pub mod half;
pub mod model_source;
pub mod status;
pub mod threads;

pub use gauge::{stats_to_proto, QueueGauge};
