//! `janus serve`: the gateway and both services in one process behind one public port. The
//! services listen on internal loopback ports (127.0.0.1, chosen by the OS) and the in-process
//! gateway forwards to them exactly as it would to remote backends.

use anyhow::Result;
use janus_gateway::{GatewayOptions, GatewayTuning};
use janus_model_service::flags::{ModelFlags, UnderstandingFlags};
use janus_service::flags::ServerFlags;
use janus_service::{server, Lifecycle};

/// Options of `janus serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Public address of the gateway.
    #[arg(long, env = "JANUS_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    #[command(flatten)]
    pub model: ModelFlags,
    /// Device of the understanding half (default: --device).
    #[arg(long, env = "JANUS_UNDERSTANDING_DEVICE")]
    pub understanding_device: Option<String>,
    /// Device of the generation half (default: --device).
    #[arg(long, env = "JANUS_GENERATION_DEVICE")]
    pub generation_device: Option<String>,
    /// Weight storage of the generation half (default: --weight-dtype). E.g. `--weight-dtype q4
    /// --generation-weight-dtype q8`: 4-bit understanding, 8-bit images (guidance amplifies
    /// 4-bit error; README "Quantized weights"). Halves stored differently each load their own
    /// language model.
    #[arg(long, env = "JANUS_GENERATION_WEIGHT_DTYPE")]
    pub generation_weight_dtype: Option<String>,
    #[command(flatten)]
    pub server: ServerFlags,
    #[command(flatten)]
    pub understanding: UnderstandingFlags,
    /// Generation requests that may wait before RESOURCE_EXHAUSTED.
    #[arg(long, env = "JANUS_GEN_MAX_QUEUE", default_value_t = 16)]
    pub gen_max_queue: usize,
    /// Generation requests batched into one forward at most.
    #[arg(long, env = "JANUS_GEN_MAX_BATCH", default_value_t = 8)]
    pub gen_max_batch: usize,
    /// Bytes of the generation half's prefix cache of prompt rows (prompts of equal length share
    /// the unconditional row; a prompt generated again reuses its own); 0 turns it off.
    #[arg(long, env = "JANUS_GEN_PREFIX_CACHE_BYTES", default_value_t = janus_model_service::flags::GEN_PREFIX_CACHE_BYTES)]
    pub gen_prefix_cache_bytes: usize,
    /// Side of generation preview thumbnails in pixels.
    #[arg(long, env = "JANUS_PREVIEW_SIZE", default_value_t = 96)]
    pub preview_size: u32,
    #[command(flatten)]
    pub tuning: GatewayTuning,
    /// Address of the OpenAI-compatible HTTP port (/v1/chat/completions,
    /// /v1/images/generations, /v1/models, /openapi.json, playground at /); `off` turns it
    /// off. Same API keys and TLS certificate as --listen.
    #[arg(long, env = "JANUS_HTTP_LISTEN", default_value = "127.0.0.1:8000")]
    pub http_listen: String,
    #[command(flatten)]
    pub http: janus_gateway::http::HttpFlags,
}

/// Loads both halves (one shared LLM when they share a device), starts the three servers, serves until SIGTERM/ctrl-c.
pub async fn run(args: ServeArgs) -> Result<()> {
    // The public port first: a busy port fails in a second, not after the model loaded.
    let public = server::bind(&args.listen).await?;
    let http_listener = match janus_gateway::http::listen_addr(&args.http_listen) {
        Some(addr) => Some(server::bind(addr).await?),
        None => None,
    };
    let resolved = args.model.resolve()?;
    let und_dev = args.understanding_device.clone();
    let gen_dev = args.generation_device.clone();
    let und_opts = args.model.load_options(und_dev.as_deref())?;
    let gen_model = janus_model_service::flags::ModelFlags {
        weight_dtype: args
            .generation_weight_dtype
            .clone()
            .or_else(|| args.model.weight_dtype.clone()),
        ..args.model.clone()
    };
    let gen_opts = gen_model.load_options(gen_dev.as_deref())?;
    // One process, one registry and one /metrics: the RPC counters see each request twice, at
    // the public gateway and at the internal service (docs/metrics.md).
    let opts = args.server.options("janus");
    // TLS and API keys only on the public port: the internal ports are loopback.
    let public_opts = janus_service::ServerOptions {
        security: args.server.security.security()?,
        ..opts.clone()
    };
    let scheme = if public_opts.security.tls.is_some() {
        "https"
    } else {
        "http"
    };
    if let Some(addr) = args.server.serve_metrics(&opts.metrics).await? {
        // A stable line for scripts and tests (the port may have been chosen by the OS).
        eprintln!("janus: metrics on http://{addr}/metrics");
    }
    let und_cfg = janus_understanding::with_metrics(args.understanding.config(), &opts.metrics);
    let mut gen_cfg = janus_model_service::flags::generation_config(
        args.gen_max_queue,
        args.gen_max_batch,
        args.preview_size,
        args.understanding.step_tokens,
    );
    gen_cfg.prefix_cache_bytes = args.gen_prefix_cache_bytes;
    gen_cfg.cache_scope = und_cfg.cache_scope;
    let gen_cfg = janus_generation::with_metrics(gen_cfg, &opts.metrics);
    tracing::info!(model = %resolved.id, path = %resolved.path.display(), "loading both halves");
    let dir = resolved.path.clone();
    let started = std::time::Instant::now();
    let (und, gen) = tokio::task::spawn_blocking(move || -> Result<_> {
        let (und, gen) = janus_pipeline::load_both(&dir, &und_opts, &gen_opts)?;
        Ok((
            janus_understanding::start(und, und_cfg),
            janus_generation::start(gen, gen_cfg),
        ))
    })
    .await??;
    opts.metrics.set_model_load_time(started.elapsed());

    let life = Lifecycle::new();
    let und_srv = janus_understanding::serve(
        und,
        args.model.info(&resolved.path, und_dev.as_deref()),
        opts.clone(),
        server::bind("127.0.0.1:0").await?,
        life.child(),
    )
    .await?;
    let gen_srv = janus_generation::serve(
        gen,
        gen_model.info(&resolved.path, gen_dev.as_deref()),
        opts.clone(),
        server::bind("127.0.0.1:0").await?,
        life.child(),
    )
    .await?;
    let (gateway, http) = janus_gateway::serve_with_http(
        GatewayOptions {
            understanding: vec![und_srv.url()],
            generation: vec![gen_srv.url()],
            tuning: args.tuning.clone(),
            server: public_opts,
            backend_tls: None,
        },
        public,
        http_listener.map(|listener| janus_gateway::HttpPort {
            listener,
            options: args.http.options(),
        }),
        life.child(),
    )
    .await?;
    tracing::info!(
        understanding = %und_srv.local_addr(),
        generation = %gen_srv.local_addr(),
        "internal services listening"
    );
    // The public port's health, for probes that speak neither TLS nor keys.
    let health = args.server.serve_health(&gateway).await?;
    // Stable lines for scripts and tests (the HTTP one first: "serving on" means all is up).
    if let Some(addr) = health {
        eprintln!("janus: health on {addr}");
    }
    if let Some(h) = &http {
        eprintln!("janus: http api on {} (playground: {}/)", h.url(), h.url());
    }
    eprintln!("janus: serving on {scheme}://{}", gateway.local_addr());
    server::spawn_signal_handler(
        life.clone(),
        std::time::Duration::from_secs_f64(args.server.grace_period.max(0.0)),
    );
    let (a, b, c) = tokio::join!(gateway.wait(), und_srv.wait(), gen_srv.wait());
    a.and(b).and(c)
}
