//! Assembling and running a gRPC server: health, reflection (v1 and v1alpha), message limits,
//! TLS and API keys ([`Security`]), the caller's deadline ([`crate::deadline`]), connections
//! served and bounded by [`crate::conn`], ephemeral-port friendly binding, and graceful shutdown
//! with a bounded grace period.

use crate::auth::{AuthLayer, AuthPolicy};
use crate::conn::{ConnLimits, ConnOptions, Protocols};
use crate::drain::{Drain, DrainLayer};
use anyhow::Context;
use janus_telemetry::MetricsLayer;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tower::ServiceExt as _;
use tower_layer::{Identity, Layer as _, Stack};
use tower_service::Service;

/// Transport settings of a server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest message received or sent, in bytes.
    pub max_message_bytes: usize,
    /// How long in-flight streams may continue after a shutdown signal before they are cancelled.
    pub grace_period: Duration,
    /// The process's Prometheus metrics: every RPC of the server is counted here, and the
    /// model services record their engine metrics here.
    pub metrics: janus_telemetry::Metrics,
    /// TLS and API keys of the listening port (default: plaintext, no keys).
    pub security: Security,
    /// Connections older than this get an HTTP/2 GOAWAY (clients finish their streams there
    /// and re-dial, so long-lived gateway connections rebalance over new replicas); `None`:
    /// connections live on.
    pub max_connection_age: Option<Duration>,
    /// After `max_connection_age`, streams still open on the connection may run this much
    /// longer before it is closed (default: `grace_period`).
    pub max_connection_age_grace: Option<Duration>,
    /// What one connection may hold and how long it may take ([`crate::conn`]).
    pub conn: ConnLimits,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 * 1024 * 1024,
            grace_period: Duration::from_secs(30),
            metrics: janus_telemetry::Metrics::new("janus", janus_telemetry::build_info!()),
            security: Security::default(),
            max_connection_age: None,
            max_connection_age_grace: None,
            conn: ConnLimits::default(),
        }
    }
}

/// TLS and API keys of a server's port, applied by [`builder`] to every RPC.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// API keys (`authorization: Bearer <key>`); no keys: every request passes.
    pub auth: AuthPolicy,
    /// TLS of the port (with a client CA: mTLS); `None`: plaintext. The gateway's HTTP port
    /// uses the same certificate.
    pub tls: Option<crate::tls::ServerTls>,
}

/// The layers of every server, outermost first: per-RPC metrics (a refused request is counted
/// too), the API-key check, the drain ([`crate::drain`]: refuses new RPCs during shutdown,
/// counts those in flight), the statuses of undecodable or oversized requests
/// ([`crate::wire`]), innermost the caller's deadline ([`crate::deadline`]).
pub type Layers = Stack<
    crate::deadline::DeadlineLayer,
    Stack<
        crate::wire::RequestStatusLayer,
        Stack<DrainLayer, Stack<AuthLayer, Stack<MetricsLayer, Identity>>>,
    >,
>;

/// The services of a server being assembled, and the layers every RPC goes through; served by
/// [`spawn`] / [`spawn_with`].
#[derive(Debug, Clone)]
pub struct Router {
    routes: RoutesBuilder,
    layers: Layers,
}

impl Router {
    /// Adds a gRPC service.
    pub fn add_service<S>(mut self, svc: S) -> Self
    where
        S: Service<http::Request<tonic::body::Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.routes.add_service(svc);
        self
    }

    /// The service one connection's requests go to: a span per RPC, then the layers, then the
    /// routes; any error becomes a gRPC status.
    fn into_service(self) -> GrpcService {
        let svc = janus_telemetry::ServerSpanLayer.layer(self.layers.layer(self.routes.routes()));
        tower::util::BoxCloneSyncService::new(
            svc.map_request(|r: http::Request<crate::conn::RequestBody>| {
                r.map(tonic::body::Body::new)
            })
            .map_result(|r| {
                Ok::<_, Infallible>(match r {
                    Ok(resp) => resp.map(tonic::body::Body::new),
                    Err(e) => tonic::Status::from_error(e.into()).into_http(),
                })
            }),
        )
    }
}

/// A server's service as [`crate::conn::serve`] takes it.
type GrpcService = tower::util::BoxCloneSyncService<
    http::Request<crate::conn::RequestBody>,
    http::Response<tonic::body::Body>,
    Infallible,
>;

/// Shutdown signalling of a server: `shutdown` starts draining (health NOT_SERVING, new RPCs
/// UNAVAILABLE, [`crate::drain`]), `abort` fires when the grace period is over (in-flight
/// streams are cancelled).
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    /// Cancel to start a graceful shutdown.
    pub shutdown: CancellationToken,
    /// Cancelled by the server when the grace period ends.
    pub abort: CancellationToken,
    /// The server's drain state (its layer is installed by [`builder`]).
    pub drain: Drain,
    /// Cancelled by the server when the drain is over and its listener closes.
    pub closed: CancellationToken,
}

impl Lifecycle {
    /// Fresh tokens.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens for a server inside a larger process: the parent's shutdown also shuts it down.
    pub fn child(&self) -> Self {
        Self {
            shutdown: self.shutdown.child_token(),
            abort: self.abort.child_token(),
            drain: Drain::default(),
            closed: CancellationToken::new(),
        }
    }
}

/// What `Info` reports about where a model came from and how it runs.
#[derive(Debug, Clone, Default)]
pub struct ModelInfo {
    /// The `--model` value (hub id or directory).
    pub model_id: String,
    /// The directory the weights were read from.
    pub model_path: String,
    /// Device name as given (`cpu`, `cuda:0`).
    pub device: String,
    /// Compute dtype name.
    pub dtype: String,
    /// Weight storage dtype name.
    pub weight_dtype: String,
}

/// A server running on its own task.
#[derive(Debug)]
pub struct Running {
    addr: SocketAddr,
    life: Lifecycle,
    health: HealthReporter,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's shutdown tokens.
    pub fn lifecycle(&self) -> &Lifecycle {
        &self.life
    }

    /// The server's health statuses (e.g. for [`serve_health`]).
    pub fn health(&self) -> &HealthReporter {
        &self.health
    }

    /// Starts a graceful shutdown without waiting.
    pub fn shutdown(&self) {
        self.life.shutdown.cancel();
    }

    /// Waits until the server has stopped.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("server task")?
    }

    /// Shuts down gracefully and waits.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown();
        self.wait().await
    }
}

/// A server with the settings every Janus server uses, instrumented: a span per RPC
/// (`janus_telemetry::server_span`, parented by the caller's `traceparent`) and per-RPC
/// metrics (method, status code, duration, in flight) in `options.metrics`; the API-key check
/// of `options.security` (the one place where every server gets it); the drain of `life`
/// (serve it with [`spawn`] or [`spawn_with`] and the same `life`). TLS is the connections'
/// ([`crate::conn`]).
pub fn builder(options: &ServerOptions, life: &Lifecycle) -> anyhow::Result<Router> {
    let layers = Stack::new(
        crate::deadline::DeadlineLayer,
        Stack::new(
            crate::wire::RequestStatusLayer,
            Stack::new(
                life.drain.layer(),
                Stack::new(
                    AuthLayer::new(options.security.auth.clone(), options.metrics.clone()),
                    Stack::new(options.metrics.layer(), Identity::new()),
                ),
            ),
        ),
    );
    Ok(Router {
        routes: RoutesBuilder::default(),
        layers,
    })
}

/// The connection options of a port speaking `protocols` on a server with `options`: its
/// limits and its TLS (ALPN for those protocols).
pub fn conn_options(
    options: &ServerOptions,
    protocols: Protocols,
    max_age: Option<(Duration, Duration)>,
) -> ConnOptions {
    ConnOptions {
        limits: options.conn.clone(),
        protocols,
        tls: options.security.tls.as_ref().map(|t| t.config(protocols)),
        max_age,
    }
}

/// Reflection v1 and v1alpha (grpcurl 1.8 speaks v1alpha) over `janus.v1` and the health service.
pub fn add_reflection(router: Router) -> anyhow::Result<Router> {
    let configure = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(janus_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = configure().build_v1().context("reflection v1")?;
    let v1alpha = configure().build_v1alpha().context("reflection v1alpha")?;
    Ok(router.add_service(v1).add_service(v1alpha))
}

/// Binds a listener; `127.0.0.1:0` picks a free port. The first bind of a process raises its
/// soft descriptor limit to the hard one ([`crate::conn::raise_fd_limit`]).
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    crate::conn::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Runs `router` on `listener` with the connection limits, TLS, grace period and connection
/// age of `options` until `life.shutdown` fires, then drains: marks `services` (and the whole
/// server) NOT_SERVING and refuses new RPCs with UNAVAILABLE while still accepting connections,
/// lets in-flight streams run until none is left or the grace period is over, then stops
/// accepting (GOAWAY on open connections); if streams are still running, fires `life.abort`
/// and gives them a few more seconds to end before dropping them. A connection older than
/// `max_connection_age` gets a GOAWAY and is closed `max_connection_age_grace` (default: the
/// grace period) later if streams still hold it.
pub fn spawn(
    router: Router,
    listener: TcpListener,
    health: HealthReporter,
    services: Vec<&'static str>,
    options: &ServerOptions,
    life: Lifecycle,
) -> anyhow::Result<Running> {
    let addr = listener.local_addr().context("local address")?;
    let grace = options.grace_period;
    let max_age = options.max_connection_age.map(|age| {
        (
            age,
            options
                .max_connection_age_grace
                .unwrap_or(options.grace_period),
        )
    });
    let conn = conn_options(options, Protocols::Grpc, max_age);
    let service = router.into_service();
    let reporter = health.clone();
    let life2 = life.clone();
    let task = tokio::spawn(async move {
        // The graceful end of connections (stop accepting, GOAWAY) starts only when the drain
        // is over: until then new connections are accepted and answered (see [`crate::drain`]).
        let close = CancellationToken::new();
        // Connections are dropped only after the cancelled streams had a few seconds to send
        // their last messages (`kill`), not when `abort` cancels them.
        let kill = CancellationToken::new();
        let serve = crate::conn::serve(listener, service, conn, close.clone(), kill.clone());
        tokio::pin!(serve);
        tokio::select! {
            () = &mut serve => return Ok(()),
            _ = life2.shutdown.cancelled() => {}
        }
        let started = tokio::time::Instant::now();
        life2.drain.start();
        for name in &services {
            health
                .set_service_status(*name, ServingStatus::NotServing)
                .await;
        }
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let running = life2.drain.in_flight();
        tracing::info!(
            %addr,
            in_flight = running,
            "shutting down: draining {running} in-flight requests for up to {grace:?} \
             (health NOT_SERVING, new requests UNAVAILABLE)"
        );
        let idle = tokio::select! {
            () = &mut serve => return Ok(()),
            _ = life2.drain.idle() => true,
            _ = tokio::time::sleep(grace) => false,
        };
        close.cancel();
        life2.closed.cancel();
        if idle {
            tracing::info!(%addr, "drained: closing the listener");
            let left = grace.saturating_sub(started.elapsed());
            if tokio::time::timeout(left, &mut serve).await.is_ok() {
                return Ok(());
            }
        }
        tracing::warn!(%addr, "grace period of {grace:?} over: cancelling in-flight streams");
        life2.abort.cancel();
        if tokio::time::timeout(Duration::from_secs(5), &mut serve)
            .await
            .is_err()
        {
            tracing::warn!(%addr, "connections still open after cancelling; closing them");
            kill.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut serve).await;
        }
        Ok(())
    });
    Ok(Running {
        addr,
        life,
        health: reporter,
        task,
    })
}

/// Serves `grpc.health.v1` alone, in plaintext and without keys, on `addr` with the statuses of
/// `health` and the connection limits of `limits`, until `stop` fires: kubelet's native gRPC
/// probes speak neither TLS nor API keys, so a server whose port needs them is probed here
/// (`--health-listen`). Returns the bound address.
pub async fn serve_health(
    addr: &str,
    health: &HealthReporter,
    limits: &ConnLimits,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = bind(addr).await?;
    let bound = listener.local_addr().context("local address")?;
    let svc = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(health.clone()),
    );
    let mut routes = RoutesBuilder::default();
    routes.add_service(svc);
    let service = routes.routes();
    let conn = ConnOptions {
        limits: limits.clone(),
        protocols: Protocols::Grpc,
        tls: None,
        max_age: None,
    };
    tokio::spawn(async move {
        crate::conn::serve(listener, service, conn, stop.clone(), stop).await;
        tracing::debug!(%bound, "health port closed");
    });
    tracing::info!(%bound, "grpc.health.v1 (plaintext, no key) listening");
    Ok(bound)
}

/// Marks `services` and the whole server SERVING.
pub async fn set_serving(health: &HealthReporter, services: &[&'static str]) {
    for name in services {
        health
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    health.set_service_status("", ServingStatus::Serving).await;
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Drains `life` on the first SIGTERM/ctrl-c (the log says how long the drain may take), and
/// exits the process at once on a second one.
pub fn spawn_signal_handler(life: Lifecycle, grace: Duration) {
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::warn!(
            grace_s = grace.as_secs_f64(),
            "shutting down: in-flight requests may run for up to {grace:?}; a second ctrl-c or SIGTERM exits now"
        );
        eprintln!(
            "janus: draining for up to {:.0} s (ctrl-c again to exit now)",
            grace.as_secs_f64()
        );
        life.shutdown.cancel();
        shutdown_signal().await;
        tracing::warn!("second signal: exiting without waiting for in-flight requests");
        eprintln!("janus: second signal, exiting now");
        std::process::exit(130);
    });
}
