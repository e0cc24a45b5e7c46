//! The gateway: the one public endpoint. It holds no model; it forwards `janus.v1.Understanding`
//! and `janus.v1.Generation` calls to backends discovered from their targets (DNS names are
//! re-resolved: one channel per address), balanced by least outstanding streams (power of two
//! choices; an understanding request prefers the replica that holds its conversation's cached
//! prefix, `affinity.rs`) with a circuit breaker per backend, health-checks them with `grpc.health.v1`,
//! retries a call that failed before any response message once on another backend, streams
//! responses through, propagates `x-request-id` (generated when absent) and W3C trace context,
//! enforces `grpc-timeout` deadlines and turns backend failures into clear statuses (a backend
//! lost mid-stream: UNAVAILABLE naming it).

mod affinity;
pub mod discovery;
mod flags;
mod health;
pub mod http;
mod openai;
pub mod pool;
mod proxy;

pub use flags::{Args, BackendTlsFlags, GatewayTuning};
pub use proxy::Gateway;

use discovery::Resolver;
use flags::secs;
use health::{check_round, spawn_discovery, spawn_health_checks};
use janus_proto::v1::generation_server::GenerationServer;
use janus_proto::v1::understanding_server::UnderstandingServer;
use janus_service::{server, Lifecycle, Running, ServerOptions};
pub use pool::BackendSettings;
pub use pool::Balance;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

/// What the gateway forwards to.
#[derive(Debug, Clone, Default)]
pub struct GatewayOptions {
    /// Understanding backend addresses (`host:port` or `http://host:port`).
    pub understanding: Vec<String>,
    /// Generation backend addresses.
    pub generation: Vec<String>,
    /// Balancing and health checks.
    pub tuning: GatewayTuning,
    /// Message limits and grace period; TLS and API keys of the public port.
    pub server: ServerOptions,
    /// TLS to the backends (CA, client certificate for mTLS, name override): used for
    /// `https://` addresses and for `host:port` ones (`http://` stays plaintext).
    pub backend_tls: Option<tonic::transport::ClientTlsConfig>,
}

/// Serves both services (forwarded), health and reflection on `listener`.
pub async fn serve(
    opts: GatewayOptions,
    listener: TcpListener,
    life: Lifecycle,
) -> anyhow::Result<Running> {
    Ok(serve_with_http(opts, listener, None, life).await?.0)
}

/// The HTTP port of [`serve_with_http`]: where, and with which options.
#[derive(Debug)]
pub struct HttpPort {
    /// The bound listener.
    pub listener: TcpListener,
    /// Image fetching.
    pub options: http::HttpOptions,
}

/// [`serve`], plus the OpenAI-compatible HTTP port ([`http`]) over the same gateway when
/// `http` is given: same keys, TLS certificate, limits and metrics as the gRPC port. The HTTP
/// port closes to new connections when `life.shutdown` fires.
pub async fn serve_with_http(
    opts: GatewayOptions,
    listener: TcpListener,
    http: Option<HttpPort>,
    life: Lifecycle,
) -> anyhow::Result<(Running, Option<http::HttpRunning>)> {
    let gateway = Gateway::new(&opts, life.abort.clone())?;
    // Built first: a TLS file problem fails before anything is served.
    let http_running = match http {
        Some(port) => Some(http::spawn(
            gateway.clone(),
            &opts.server,
            port.options,
            port.listener,
            life.clone(),
        )?),
        None => None,
    };
    let (health, health_svc) = tonic_health::server::health_reporter();
    let n = opts.server.max_message_bytes;
    let router =
        server::add_reflection(server::builder(&opts.server, &life)?.add_service(health_svc))?
            .add_service(
                UnderstandingServer::new(gateway.clone())
                    .max_decoding_message_size(n)
                    .max_encoding_message_size(n),
            )
            .add_service(
                GenerationServer::new(gateway.clone())
                    .max_decoding_message_size(n)
                    .max_encoding_message_size(n),
            );
    // The gateway itself is up; per-service status follows the backends' health.
    health.set_service_status("", ServingStatus::Serving).await;
    let interval = Duration::from_secs_f64(opts.tuning.health_interval.max(0.05));
    let timeout =
        Duration::from_secs_f64(opts.tuning.connect_timeout.max(0.05)) + Duration::from_secs(1);
    // Names resolved and a first health round before serving, so answers are right from the
    // start.
    let resolver = match opts.tuning.dns_server {
        Some(addr) => Resolver::nameserver(addr),
        None => Resolver::system(),
    };
    tokio::join!(
        gateway.shared.und.refresh(&resolver),
        gateway.shared.gen.refresh(&resolver),
    );
    let every = secs(opts.tuning.resolve_interval);
    spawn_discovery(
        gateway.shared.clone(),
        |s| &s.und,
        resolver.clone(),
        every,
        life.shutdown.clone(),
    );
    spawn_discovery(
        gateway.shared.clone(),
        |s| &s.gen,
        resolver,
        every,
        life.shutdown.clone(),
    );
    tokio::join!(
        check_round(&gateway.shared, |s| &s.und, &health, timeout),
        check_round(&gateway.shared, |s| &s.gen, &health, timeout),
    );
    spawn_health_checks(
        gateway.shared.clone(),
        |s| &s.und,
        health.clone(),
        interval,
        timeout,
        life.shutdown.clone(),
    );
    spawn_health_checks(
        gateway.shared.clone(),
        |s| &s.gen,
        health.clone(),
        interval,
        timeout,
        life.shutdown.clone(),
    );
    let running = server::spawn(
        router,
        listener,
        health,
        vec![
            janus_proto::UNDERSTANDING_SERVICE,
            janus_proto::GENERATION_SERVICE,
        ],
        &opts.server,
        life,
    )?;
    Ok((running, http_running))
}

/// Serves until SIGTERM/ctrl-c, then shuts down gracefully.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.understanding_backends.is_empty() && args.generation_backends.is_empty() {
        anyhow::bail!("no backends: pass --understanding-backends and/or --generation-backends");
    }
    let server_options = args.server.secure_options("janus-gateway")?;
    let backend_tls = args.backend_tls.config()?;
    args.server.serve_metrics(&server_options.metrics).await?;
    let listener = server::bind(&args.listen).await?;
    let http_port = match args.http_listen.as_deref().and_then(http::listen_addr) {
        Some(addr) => Some(HttpPort {
            listener: server::bind(addr).await?,
            options: args.http.options(),
        }),
        None => None,
    };
    let life = Lifecycle::new();
    let (running, http_running) = serve_with_http(
        GatewayOptions {
            understanding: args.understanding_backends,
            generation: args.generation_backends,
            tuning: args.tuning,
            server: server_options,
            backend_tls,
        },
        listener,
        http_port,
        life.clone(),
    )
    .await?;
    if let Some(h) = &http_running {
        // A stable line for scripts and tests (the port may have been chosen by the OS).
        eprintln!("janus: http api on {} (playground: {}/)", h.url(), h.url());
    }
    tracing::info!("janus gateway listening on {}", running.local_addr());
    args.server.serve_health(&running).await?;
    server::spawn_signal_handler(
        life,
        std::time::Duration::from_secs_f64(args.server.grace_period.max(0.0)),
    );
    running.wait().await
}
