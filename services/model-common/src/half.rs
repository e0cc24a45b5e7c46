//! One start-up path for both model services: bind, resolve and load the model, serve, drain.

use crate::flags::ModelFlags;
use janus_service::flags::{ConnectionAgeFlags, ServerFlags};
use janus_service::{server, Lifecycle, ModelInfo, Running, ServerOptions};
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// A model service (the understanding or the generation half): how it loads its engine and
/// serves it. [`run`] does the rest, the same for both.
pub trait ModelHalf {
    /// The engine the half serves (owns the model thread).
    type Engine: Send + 'static;
    /// The engine's configuration.
    type Config: Send + 'static;
    /// `understanding` or `generation`: logs, and the metrics label `janus-<name>`.
    const NAME: &'static str;
    /// The configuration with the server's metrics hooked in.
    fn with_metrics(config: Self::Config, metrics: &janus_telemetry::Metrics) -> Self::Config;
    /// Loads the half and starts its engine (blocking; seconds to minutes).
    fn load(
        dir: &Path,
        opts: &janus_pipeline::LoadOptions,
        config: Self::Config,
    ) -> anyhow::Result<Self::Engine>;
    /// Serves the engine (health, reflection, limits) on `listener` until `life` ends.
    fn serve(
        engine: Self::Engine,
        info: ModelInfo,
        options: ServerOptions,
        listener: TcpListener,
        life: Lifecycle,
    ) -> impl Future<Output = anyhow::Result<Running>> + Send;
}

/// Runs a model service until SIGTERM/ctrl-c: the address is bound first (a busy port fails at
/// once, not after the model loaded), metrics are up during the load, then the half serves and
/// drains on the first signal (a second exits at once).
pub async fn run<H: ModelHalf>(
    listen: &str,
    model: &ModelFlags,
    server_flags: &ServerFlags,
    age: &ConnectionAgeFlags,
    config: H::Config,
) -> anyhow::Result<()> {
    let listener = server::bind(listen).await?;
    let resolved = model.resolve()?;
    let opts = model.load_options(None)?;
    let options = age.apply(server_flags.secure_options(&format!("janus-{}", H::NAME))?);
    // Up before the (long) model load: janus_model_load_seconds is 0 until it is done.
    server_flags.serve_metrics(&options.metrics).await?;
    let config = H::with_metrics(config, &options.metrics);
    let dir = resolved.path.clone();
    tracing::info!(model = %resolved.id, path = %dir.display(), device = %model.device, "loading the {} half", H::NAME);
    let started = Instant::now();
    let engine = tokio::task::spawn_blocking(move || H::load(&dir, &opts, config)).await??;
    options.metrics.set_model_load_time(started.elapsed());
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        "{} half loaded",
        H::NAME
    );
    let life = Lifecycle::new();
    let running = H::serve(
        engine,
        model.info(&resolved.path, None),
        options,
        listener,
        life.clone(),
    )
    .await?;
    tracing::info!(
        "the {} service listens on {}",
        H::NAME,
        running.local_addr()
    );
    server_flags.serve_health(&running).await?;
    server::spawn_signal_handler(
        life,
        Duration::from_secs_f64(server_flags.grace_period.max(0.0)),
    );
    running.wait().await
}

/// Serves one model service with health and reflection on `listener`: `name` is its health
/// name, `add` adds the service itself to the router. From `life.shutdown` the server drains
/// and `close` runs (the engine takes no new work); when the grace period is over `abort` runs
/// (the engine cancels what is left).
pub async fn serve_service(
    name: &'static str,
    add: impl FnOnce(server::Router) -> server::Router,
    close: impl FnOnce() + Send + 'static,
    abort: impl FnOnce() + Send + 'static,
    options: &ServerOptions,
    listener: TcpListener,
    life: Lifecycle,
) -> anyhow::Result<Running> {
    let (health, health_svc) = tonic_health::server::health_reporter();
    let router = add(server::add_reflection(
        server::builder(options, &life)?.add_service(health_svc),
    )?);
    let names = vec![name];
    server::set_serving(&health, &names).await;
    let l = life.clone();
    tokio::spawn(async move {
        l.shutdown.cancelled().await;
        close();
        l.abort.cancelled().await;
        abort();
    });
    server::spawn(router, listener, health, names, options, life)
}
