//! `janus.v1.Understanding` over tonic: validation errors, queueing, streaming and
//! cancellation come from [`janus_engine::UnderstandingEngine`]; this crate converts the
//! protocol, maps errors to statuses and assembles the server (health, reflection, limits,
//! graceful shutdown).

/// Protocol → engine conversion; public only so the fuzz targets (`fuzz/`) run the real code.
#[doc(hidden)]
pub mod adapter;

use janus_engine::{
    RequestMeta, StepObserver, UnderstandEvent, UnderstandingConfig, UnderstandingEngine,
};
use janus_model_service::status::{from_engine, to_status};
use janus_model_service::{cache, QueueGauge};
use janus_pipeline::{LoadOptions, UnderstandingModel};
use janus_proto::v1 as pb;
use janus_proto::v1::understanding_server::{Understanding, UnderstandingServer};
use janus_service::stream::{forward, BoxStream};
use janus_service::{meta, status, Lifecycle, ModelInfo, Running, ServerOptions};
use janus_telemetry::{Metrics, TokenKind};
use std::path::Path;
use std::time::Instant;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

/// Loads the understanding half and starts its engine thread (blocking; seconds to minutes).
pub fn load(
    dir: &Path,
    load: &LoadOptions,
    config: UnderstandingConfig,
) -> anyhow::Result<UnderstandingEngine> {
    let model = UnderstandingModel::load(dir, load)?;
    Ok(start(model, config))
}

/// Starts the engine of an already loaded model (e.g. one of [`janus_pipeline::load_both`]).
pub fn start(model: UnderstandingModel, config: UnderstandingConfig) -> UnderstandingEngine {
    UnderstandingEngine::start(model, config)
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct UnderstandingService {
    engine: UnderstandingEngine,
    info: ModelInfo,
    options: ServerOptions,
    queue: QueueGauge,
}

impl UnderstandingService {
    /// A service over a running engine; its metrics go to `options.metrics`.
    pub fn new(engine: UnderstandingEngine, info: ModelInfo, options: ServerOptions) -> Self {
        let e = engine.clone();
        let queue = QueueGauge::new(options.metrics.clone(), move || e.stats());
        Self {
            engine,
            info,
            options,
            queue,
        }
    }
}

fn no_abort() -> Status {
    Status::unavailable("the server is shutting down")
}

#[tonic::async_trait]
impl Understanding for UnderstandingService {
    type UnderstandStream = BoxStream<pb::UnderstandResponse>;

    async fn understand(
        &self,
        req: Request<pb::UnderstandRequest>,
    ) -> Result<Response<Self::UnderstandStream>, Status> {
        let timeout = meta::grpc_timeout(req.metadata());
        let request_id = meta::request_id(&req.get_ref().request_id, req.metadata());
        // In the RPC's span (tonic's `trace_fn`): the engine's spans become its children.
        let rmeta = RequestMeta::new(request_id.clone(), timeout);
        let deadline = rmeta.deadline.map(tokio::time::Instant::from_std);
        let scope = cache::scope(self.engine.config().cache_scope, req.metadata());
        let mut input = adapter::input(req.into_inner());
        input.scope = scope;
        let engine = self.engine.clone();
        let span = rmeta.span.clone();
        let prepared = tokio::task::spawn_blocking(move || span.in_scope(|| engine.prepare(input)));
        let prepared = match deadline {
            Some(d) => tokio::time::timeout_at(d, prepared)
                .await
                .map_err(|_| status::deadline_status("validating the request"))?,
            None => prepared.await,
        };
        let ticket = prepared
            .map_err(|e| Status::internal(format!("request preparation failed: {e}")))?
            .map_err(|e| {
                tracing::info!(%request_id, "understand refused: {e}");
                to_status(&e)
            })?;
        let received = rmeta.received;
        let rx = self
            .engine
            .submit(ticket, rmeta)
            .map_err(|e| to_status(&e))?;
        self.queue.update();
        let id = request_id.clone();
        let mut observe = observer(self.options.metrics.clone(), received);
        let events = from_engine(rx, move |e| {
            observe(&e);
            adapter::event(e, &id)
        });
        let mut resp = Response::new(forward(events, deadline, None, no_abort));
        meta::set_request_id(resp.metadata_mut(), &request_id);
        Ok(resp)
    }

    async fn info(
        &self,
        _req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let m = self.engine.model();
        let c = self.engine.config();
        let i = &self.info;
        Ok(Response::new(pb::InfoResponse {
            model_id: i.model_id.clone(),
            model_path: i.model_path.clone(),
            dtype: i.dtype.clone(),
            weight_dtype: i.weight_dtype.clone(),
            device: i.device.clone(),
            half: pb::ModelHalf::Understanding as i32,
            limits: Some(pb::Limits {
                max_image_bytes: c.image_limits.max_bytes as u64,
                max_image_pixels: c.image_limits.max_pixels,
                max_new_tokens: c.max_new_tokens_limit as u32,
                context_window: m.context() as u32,
                max_queue: c.max_queue as u32,
                max_batch: c.max_batch as u32,
                max_images: 0,
                image_size: 0,
                image_tokens: 0,
                max_message_bytes: self.options.max_message_bytes as u64,
                tokens_per_input_image: m.config().vision.num_patches() as u32,
                max_stop_strings: c.max_stop_strings as u32,
                max_prompt_bytes: c.max_prompt_bytes as u32,
                min_preview_rows: 0,
                default_max_new_tokens: c.default_max_new_tokens.min(c.max_new_tokens_limit) as u32,
                step_tokens: c.step_tokens as u32,
                max_batch_tokens: c.max_batch_tokens as u32,
            }),
            stats: Some(janus_model_service::stats_to_proto(self.engine.stats())),
            server_version: janus_service::VERSION.to_string(),
            cache: Some(cache::info(c.cache_scope, m.cache_stats())),
        }))
    }
}

/// Records a request's engine metrics from its events: time to first token at the first token;
/// queue wait, prompt and output tokens and mean time per output token at the end.
fn observer(metrics: Metrics, received: Instant) -> impl FnMut(&UnderstandEvent) + Send {
    let mut first_token = true;
    move |e| match e {
        UnderstandEvent::Token { .. } if first_token => {
            first_token = false;
            metrics.observe_ttft(received.elapsed());
        }
        UnderstandEvent::Token { .. } => {}
        UnderstandEvent::Finished {
            prompt_tokens,
            completion_tokens,
            timings,
            ..
        } => {
            metrics.observe_queue_wait(timings.queue);
            metrics.add_prompt_tokens(*prompt_tokens as u64);
            metrics.add_output_tokens(TokenKind::Text, *completion_tokens as u64);
            if *completion_tokens >= 2 {
                let gaps = u32::try_from(*completion_tokens - 1).unwrap_or(u32::MAX);
                metrics.observe_time_per_token(timings.decode / gaps);
            }
        }
    }
}

/// The engine configuration with `janus_batch_size` recorded in `metrics` (unless the caller
/// already set a step observer).
pub fn with_metrics(mut config: UnderstandingConfig, metrics: &Metrics) -> UnderstandingConfig {
    if config.step_observer.is_none() {
        let m = metrics.clone();
        config.step_observer = Some(StepObserver::new(move |rows| m.observe_batch_size(rows)));
    }
    config
}

/// Serves `janus.v1.Understanding`, health and reflection on `listener` until `life.shutdown`.
/// New requests are refused once shutdown starts; in-flight answers end with finish reason
/// CANCELLED when the grace period is over.
pub async fn serve(
    engine: UnderstandingEngine,
    info: ModelInfo,
    options: ServerOptions,
    listener: TcpListener,
    life: Lifecycle,
) -> anyhow::Result<Running> {
    let n = options.max_message_bytes;
    let service = UnderstandingService::new(engine.clone(), info, options.clone());
    service.queue.spawn(life.shutdown.clone());
    let e = engine.clone();
    janus_model_service::cache_metrics::register(&options.metrics, "understanding", move || {
        e.model().cache_stats()
    });
    let svc = UnderstandingServer::new(service)
        .max_decoding_message_size(n)
        .max_encoding_message_size(n);
    let closing = engine.clone();
    janus_model_service::half::serve_service(
        janus_proto::UNDERSTANDING_SERVICE,
        |router| router.add_service(svc),
        move || closing.close(),
        move || engine.abort(),
        &options,
        listener,
        life,
    )
    .await
}

/// Command-line arguments of `janus-understanding` / `janus serve-understanding`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "JANUS_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: String,
    #[command(flatten)]
    pub model: janus_model_service::flags::ModelFlags,
    #[command(flatten)]
    pub server: janus_service::flags::ServerFlags,
    #[command(flatten)]
    pub connection_age: janus_service::flags::ConnectionAgeFlags,
    #[command(flatten)]
    pub engine: janus_model_service::flags::UnderstandingFlags,
}

/// This service as a [`janus_model_service::half::ModelHalf`].
pub struct Half;

impl janus_model_service::half::ModelHalf for Half {
    type Engine = UnderstandingEngine;
    type Config = UnderstandingConfig;
    const NAME: &'static str = "understanding";

    fn with_metrics(config: UnderstandingConfig, metrics: &Metrics) -> UnderstandingConfig {
        with_metrics(config, metrics)
    }

    fn load(
        dir: &Path,
        opts: &LoadOptions,
        config: UnderstandingConfig,
    ) -> anyhow::Result<UnderstandingEngine> {
        load(dir, opts, config)
    }

    fn serve(
        engine: UnderstandingEngine,
        info: ModelInfo,
        options: ServerOptions,
        listener: TcpListener,
        life: Lifecycle,
    ) -> impl std::future::Future<Output = anyhow::Result<Running>> + Send {
        serve(engine, info, options, listener, life)
    }
}

/// Resolves and loads the model, serves until SIGTERM/ctrl-c, then shuts down gracefully.
pub async fn run(args: Args) -> anyhow::Result<()> {
    janus_model_service::half::run::<Half>(
        &args.listen,
        &args.model,
        &args.server,
        &args.connection_age,
        args.engine.config(),
    )
    .await
}
