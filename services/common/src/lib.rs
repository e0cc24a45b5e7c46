//! What every Janus-Pro gRPC server shares: server assembly with health, reflection, message
//! limits and graceful shutdown ([`server`]); the one engine-error → `tonic::Status` mapping
//! and the deadline-aware stream forwarder ([`status`], [`stream`]); `grpc-timeout` and
//! metadata helpers ([`meta`]); model source resolution (local directory or Hugging Face hub
//! id, [`model_source`]); and the command-line flags the binaries share ([`flags`]).

pub mod flags;
pub mod meta;
pub mod model_source;
pub mod server;
pub mod status;
pub mod stream;

pub use server::{Lifecycle, ModelInfo, Running, ServerOptions};

/// Version of the server crates, reported by `Info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Installs a `tracing` subscriber writing to stderr; `RUST_LOG` filters (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Engine counters as the protocol's `EngineStats`.
pub fn stats_to_proto(s: janus_engine::StatsSnapshot) -> janus_proto::v1::EngineStats {
    let c = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    janus_proto::v1::EngineStats {
        queued: c(s.queued),
        active: c(s.active),
        steps: s.steps,
        completed: s.completed,
        cancelled: s.cancelled,
        failed: s.failed,
        rejected: s.rejected,
    }
}

/// Milliseconds of a duration, for timings fields.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
