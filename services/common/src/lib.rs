//! What every Janus-Pro gRPC server shares: server assembly with health, reflection, message
//! limits and graceful shutdown ([`server`]); the one engine-error → `tonic::Status` mapping
//! and the deadline-aware stream forwarder ([`status`], [`stream`]); `grpc-timeout` and
//! metadata helpers ([`meta`]); model source resolution (local directory or Hugging Face hub
//! id, [`model_source`]); API keys ([`auth`]) and TLS ([`tls`]); and the command-line flags
//! the binaries share ([`flags`]).

pub mod auth;
pub mod conn;
pub mod deadline;
pub mod drain;
pub mod flags;
pub mod half;
pub mod meta;
pub mod model_source;
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

/// How often [`QueueGauge::spawn`] samples the engine's queue.
pub const QUEUE_GAUGE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// One engine's admission queue in `janus_queue_depth`. Each gauge adds the change of its own
/// queue's length, so engines sharing a registry (`janus serve`) report the sum of their
/// queues. Updated after every submission ([`QueueGauge::update`]) and sampled every
/// [`QUEUE_GAUGE_INTERVAL`] ([`QueueGauge::spawn`]) for the requests the engine takes.
#[derive(Clone)]
pub struct QueueGauge {
    inner: std::sync::Arc<QueueGaugeInner>,
}

struct QueueGaugeInner {
    metrics: janus_telemetry::Metrics,
    queued: Box<dyn Fn() -> usize + Send + Sync>,
    /// This queue's contribution to the gauge.
    reported: std::sync::Mutex<i64>,
}

impl std::fmt::Debug for QueueGauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueGauge").finish_non_exhaustive()
    }
}

impl QueueGauge {
    /// A gauge reading the queue length from `stats` (e.g. `move || engine.stats()`).
    pub fn new(
        metrics: janus_telemetry::Metrics,
        stats: impl Fn() -> janus_engine::StatsSnapshot + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner: std::sync::Arc::new(QueueGaugeInner {
                metrics,
                queued: Box::new(move || stats().queued),
                reported: std::sync::Mutex::new(0),
            }),
        }
    }

    /// Reports the queue's current length.
    pub fn update(&self) {
        self.report(i64::try_from((self.inner.queued)()).unwrap_or(i64::MAX));
    }

    fn report(&self, now: i64) {
        let mut reported = self
            .inner
            .reported
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.inner.metrics.add_queue_depth(now - *reported);
        *reported = now;
    }

    /// Samples the queue every [`QUEUE_GAUGE_INTERVAL`] until `stop` fires, then withdraws
    /// this queue from the gauge.
    pub fn spawn(&self, stop: tokio_util::sync::CancellationToken) {
        self.update();
        let gauge = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(QUEUE_GAUGE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => gauge.update(),
                }
            }
            gauge.report(0);
        });
    }
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
