//! What every Janus-Pro gRPC server shares, the gateway included: server assembly with health,
//! reflection, message limits and graceful shutdown ([`server`]) on one connection layer
//! ([`conn`]); deadlines at the door ([`deadline`]); field-naming statuses and the
//! deadline-aware stream forwarder ([`status`], [`stream`]); `grpc-timeout` and metadata
//! helpers ([`meta`]); API keys ([`auth`]), TLS ([`tls`]) and drain ([`drain`]); and the
//! transport and security flags ([`flags`]). Nothing here knows the model: what only the model
//! services share is the `janus-model-service` crate.

pub mod auth;
pub mod conn;
pub mod deadline;
pub mod drain;
pub mod flags;
pub mod meta;
pub mod server;
pub mod status;
pub mod stream;
pub mod tls;
pub mod wire;

pub use server::{Lifecycle, ModelInfo, Running, Security, ServerOptions};

/// Version of the server crates, reported by `Info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Installs a `tracing` subscriber writing to stderr; `RUST_LOG` filters (default `info`).
/// Plain text logs only: the server binaries use [`init_telemetry`] (JSON logs, trace export).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Logs (`RUST_LOG`, `JANUS_LOG_FORMAT`), trace export (`OTEL_*`, off without an endpoint) and
/// the W3C propagator for a server process. Call it inside the Tokio runtime (the OTLP exporter
/// is a tonic client) and keep the guard until exit: dropping it flushes buffered spans.
pub fn init_telemetry(service: &str) -> janus_telemetry::Guard {
    janus_telemetry::init(service, janus_telemetry::LogFormat::from_env())
}

/// Milliseconds of a duration, for timings fields.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
