//! `janus.v1.Generation` over tonic: validation, queueing, the token loop, previews and image
//! encoding come from [`janus_engine::GenerationEngine`]; this crate converts the protocol,
//! maps errors to statuses and assembles the server (health, reflection, limits, shutdown).

/// Protocol → engine conversion; public only so the fuzz targets (`fuzz/`) run the real code.
#[doc(hidden)]
pub mod adapter;

use janus_engine::{GenerateEvent, GenerationConfig, GenerationEngine, RequestMeta, StepObserver};
use janus_model_service::status::{from_engine, to_status};
use janus_model_service::{cache, QueueGauge};
use janus_pipeline::generation::MAX_IMAGES;
use janus_pipeline::{GenerationModel, LoadOptions};
use janus_proto::v1 as pb;
use janus_proto::v1::generation_server::{Generation, GenerationServer};
use janus_service::stream::{forward, BoxStream};
use janus_service::{meta, status, Lifecycle, ModelInfo, Running, ServerOptions};
use janus_telemetry::{Metrics, TokenKind};
use std::path::Path;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

/// Loads the generation half and starts its engine thread (blocking; seconds to minutes).
pub fn load(
    dir: &Path,
    load: &LoadOptions,
    config: GenerationConfig,
) -> anyhow::Result<GenerationEngine> {
    let model = GenerationModel::load(dir, load)?;
    Ok(start(model, config))
}

/// Starts the engine of an already loaded model (e.g. one of [`janus_pipeline::load_both`]).
pub fn start(model: GenerationModel, config: GenerationConfig) -> GenerationEngine {
    GenerationEngine::start(model, config)
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct GenerationService {
    engine: GenerationEngine,
    info: ModelInfo,
    options: ServerOptions,
    queue: QueueGauge,
}

impl GenerationService {
    /// A service over a running engine; its metrics go to `options.metrics`.
    pub fn new(engine: GenerationEngine, info: ModelInfo, options: ServerOptions) -> Self {
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
impl Generation for GenerationService {
    type GenerateStream = BoxStream<pb::GenerateResponse>;

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let timeout = meta::grpc_timeout(req.metadata());
        let request_id = meta::request_id(&req.get_ref().request_id, req.metadata());
        // In the RPC's span (tonic's `trace_fn`): the engine's spans become its children.
        let rmeta = RequestMeta::new(request_id.clone(), timeout);
        let deadline = rmeta.deadline.map(tokio::time::Instant::from_std);
        if !adapter::known_format(req.get_ref().output_format) {
            return Err(to_status(&janus_engine::EngineError::invalid(
                "output_format",
                format!("unknown value {}", req.get_ref().output_format),
            )));
        }
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
                tracing::info!(%request_id, "generate refused: {e}");
                to_status(&e)
            })?;
        let rx = self
            .engine
            .submit(ticket, rmeta)
            .map_err(|e| to_status(&e))?;
        self.queue.update();
        let id = request_id.clone();
        let mut observe = observer(self.options.metrics.clone());
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
            half: pb::ModelHalf::Generation as i32,
            limits: Some(pb::Limits {
                max_image_bytes: 0,
                max_image_pixels: 0,
                max_new_tokens: 0,
                context_window: m.context() as u32,
                max_queue: c.max_queue as u32,
                max_batch: c.max_batch as u32,
                max_images: MAX_IMAGES as u32,
                image_size: self.engine.image_size() as u32,
                image_tokens: m.image_tokens() as u32,
                max_message_bytes: self.options.max_message_bytes as u64,
                tokens_per_input_image: 0,
                max_stop_strings: 0,
                max_prompt_bytes: c.max_prompt_bytes as u32,
                min_preview_rows: c.min_preview_rows.max(1) as u32,
                default_max_new_tokens: 0,
                step_tokens: c.step_tokens as u32,
                max_batch_tokens: 0,
            }),
            stats: Some(janus_model_service::stats_to_proto(self.engine.stats())),
            server_version: janus_service::VERSION.to_string(),
            cache: Some(cache::info(
                self.engine.config().cache_scope,
                janus_pipeline::CacheStats {
                    prefix: self.engine.model().cache_stats(),
                    images: Default::default(),
                },
            )),
        }))
    }
}

/// Records a request's engine metrics from its events: images as they are sent; queue wait,
/// prompt and image tokens, and the time per image (generation start to encoded images) at
/// the end.
fn observer(metrics: Metrics) -> impl FnMut(&GenerateEvent) + Send {
    let mut images = 0u32;
    move |e| match e {
        GenerateEvent::Image { .. } => {
            images += 1;
            metrics.add_images(1);
        }
        GenerateEvent::Finished {
            prompt_tokens,
            completion_tokens,
            timings,
            ..
        } => {
            metrics.observe_queue_wait(timings.queue);
            metrics.add_prompt_tokens(*prompt_tokens as u64);
            metrics.add_output_tokens(TokenKind::Image, *completion_tokens as u64);
            // The images of one request are generated together: each took the whole run.
            let per_image = timings.total.saturating_sub(timings.queue);
            for _ in 0..images {
                metrics.observe_image_time(per_image);
            }
        }
        GenerateEvent::Progress { .. } | GenerateEvent::Preview { .. } => {}
    }
}

/// The engine configuration with `janus_batch_size` recorded in `metrics` (unless the caller
/// already set a step observer).
pub fn with_metrics(mut config: GenerationConfig, metrics: &Metrics) -> GenerationConfig {
    if config.step_observer.is_none() {
        let m = metrics.clone();
        config.step_observer = Some(StepObserver::new(move |rows| m.observe_batch_size(rows)));
    }
    config
}

/// Serves `janus.v1.Generation`, health and reflection on `listener` until `life.shutdown`.
/// New requests are refused once shutdown starts; in-flight ones end with UNAVAILABLE when the
/// grace period is over.
pub async fn serve(
    engine: GenerationEngine,
    info: ModelInfo,
    options: ServerOptions,
    listener: TcpListener,
    life: Lifecycle,
) -> anyhow::Result<Running> {
    let n = options.max_message_bytes;
    let service = GenerationService::new(engine.clone(), info, options.clone());
    service.queue.spawn(life.shutdown.clone());
    let e = engine.clone();
    janus_model_service::cache_metrics::register(&options.metrics, "generation", move || {
        janus_pipeline::CacheStats {
            prefix: e.model().cache_stats(),
            images: Default::default(),
        }
    });
    let svc = GenerationServer::new(service)
        .max_decoding_message_size(n)
        .max_encoding_message_size(n);
    let closing = engine.clone();
    janus_model_service::half::serve_service(
        janus_proto::GENERATION_SERVICE,
        |router| router.add_service(svc),
        move || closing.close(),
        move || engine.abort(),
        &options,
        listener,
        life,
    )
    .await
}

/// Command-line arguments of `janus-generation` / `janus serve-generation`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "JANUS_LISTEN", default_value = "127.0.0.1:50053")]
    pub listen: String,
    #[command(flatten)]
    pub model: janus_model_service::flags::ModelFlags,
    #[command(flatten)]
    pub server: janus_service::flags::ServerFlags,
    #[command(flatten)]
    pub connection_age: janus_service::flags::ConnectionAgeFlags,
    #[command(flatten)]
    pub engine: janus_model_service::flags::GenerationFlags,
}

/// This service as a [`janus_model_service::half::ModelHalf`].
pub struct Half;

impl janus_model_service::half::ModelHalf for Half {
    type Engine = GenerationEngine;
    type Config = GenerationConfig;
    const NAME: &'static str = "generation";

    fn with_metrics(config: GenerationConfig, metrics: &Metrics) -> GenerationConfig {
        with_metrics(config, metrics)
    }

    fn load(
        dir: &Path,
        opts: &LoadOptions,
        config: GenerationConfig,
    ) -> anyhow::Result<GenerationEngine> {
        load(dir, opts, config)
    }

    fn serve(
        engine: GenerationEngine,
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
