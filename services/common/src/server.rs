//! Assembling and running a tonic server: health, reflection (v1 and v1alpha), message limits,
//! TLS and API keys ([`Security`]), ephemeral-port friendly binding, and graceful shutdown with
//! a bounded grace period.

use crate::auth::{AuthLayer, AuthPolicy};
use crate::drain::{Drain, DrainLayer};
use anyhow::Context;
use janus_telemetry::MetricsLayer;
use std::future::Future as _;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, ServerTlsConfig};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tower_layer::{Identity, Stack};

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
        }
    }
}

/// TLS and API keys of a server's port, applied by [`builder`] to every RPC.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// API keys (`authorization: Bearer <key>`); no keys: every request passes.
    pub auth: AuthPolicy,
    /// TLS of the port (with a client CA: mTLS); `None`: plaintext.
    pub tls: Option<ServerTlsConfig>,
    /// The PEM files `tls` was built from, for listeners that are not tonic servers (the
    /// gateway's HTTP port uses the same certificate).
    pub tls_files: Option<crate::tls::TlsFiles>,
}

/// The layers of every server: per-RPC metrics outside, the API-key check inside (a refused
/// request is counted as UNAUTHENTICATED), then the drain ([`crate::drain`]: refuses new RPCs
/// during shutdown, counts those in flight), innermost the statuses of undecodable or oversized
/// requests ([`crate::wire`]).
pub type Layers = Stack<
    crate::wire::RequestStatusLayer,
    Stack<DrainLayer, Stack<AuthLayer, Stack<MetricsLayer, Identity>>>,
>;
/// A server built by [`builder`].
pub type JanusServer = Server<Layers>;
/// The router of a [`JanusServer`] (what `add_service` returns).
pub type Router = tonic::transport::server::Router<Layers>;

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

/// A server builder with the settings every Janus server uses, instrumented: a span per RPC
/// (`janus_telemetry::server_span`, parented by the caller's `traceparent`) and per-RPC
/// metrics (method, status code, duration, in flight) in `options.metrics`; TLS and the API-key
/// check of `options.security` (the one place where every server gets them); the drain of
/// `life` (serve it with [`spawn`] or [`spawn_with`] and the same `life`).
pub fn builder(options: &ServerOptions, life: &Lifecycle) -> anyhow::Result<JanusServer> {
    let mut server = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    // Only the graceful part comes from tonic: with its `max_connection_age_grace` set, tonic
    // 0.14 sends no GOAWAY at the age and just drops the connection at age + grace. The forced
    // close at age + grace is [`AgedIo`]'s (see [`spawn`]).
    if let Some(age) = options.max_connection_age {
        server = server.max_connection_age(age);
    }
    if let Some(tls) = &options.security.tls {
        server = server
            .tls_config(tls.clone())
            .context("TLS configuration (certificate or key not usable)")?;
    }
    Ok(janus_telemetry::instrument(server, &options.metrics)
        .layer(AuthLayer::new(
            options.security.auth.clone(),
            options.metrics.clone(),
        ))
        .layer(life.drain.layer())
        .layer(crate::wire::RequestStatusLayer))
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

/// Binds a listener; `127.0.0.1:0` picks a free port.
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Runs `router` on `listener` until `life.shutdown` fires, then drains: marks `services` (and
/// the whole server) NOT_SERVING and refuses new RPCs with UNAVAILABLE while still accepting
/// connections, lets in-flight streams run until none is left or the grace period is over, then
/// stops accepting; if streams are still running, fires `life.abort` and gives them a few more
/// seconds to end before dropping them.
pub fn spawn(
    router: Router,
    listener: TcpListener,
    health: HealthReporter,
    services: Vec<&'static str>,
    grace: Duration,
    life: Lifecycle,
) -> anyhow::Result<Running> {
    spawn_inner(router, listener, health, services, grace, None, life)
}

/// [`spawn`] with the grace period and connection age of `options`: a connection older than
/// `max_connection_age` gets a GOAWAY (from [`builder`]) and is closed
/// `max_connection_age_grace` (default: the grace period) later if streams still hold it.
pub fn spawn_with(
    router: Router,
    listener: TcpListener,
    health: HealthReporter,
    services: Vec<&'static str>,
    options: &ServerOptions,
    life: Lifecycle,
) -> anyhow::Result<Running> {
    let close_after = options.max_connection_age.map(|age| {
        age + options
            .max_connection_age_grace
            .unwrap_or(options.grace_period)
    });
    spawn_inner(
        router,
        listener,
        health,
        services,
        options.grace_period,
        close_after,
        life,
    )
}

fn spawn_inner(
    router: Router,
    listener: TcpListener,
    health: HealthReporter,
    services: Vec<&'static str>,
    grace: Duration,
    close_after: Option<Duration>,
    life: Lifecycle,
) -> anyhow::Result<Running> {
    let addr = listener.local_addr().context("local address")?;
    let reporter = health.clone();
    let life2 = life.clone();
    let task = tokio::spawn(async move {
        // tonic's graceful shutdown (stop accepting, GOAWAY) starts only when the drain is
        // over: until then new connections are accepted and answered (see [`crate::drain`]).
        let close = CancellationToken::new();
        let incoming = TcpListenerStream::new(listener)
            .map(move |r| r.map(|tcp| AgedIo::new(tcp, close_after)));
        let serve = router.serve_with_incoming_shutdown(incoming, close.clone().cancelled_owned());
        tokio::pin!(serve);
        tokio::select! {
            r = &mut serve => return r.context("server"),
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
            r = &mut serve => return r.context("server"),
            _ = life2.drain.idle() => true,
            _ = tokio::time::sleep(grace) => false,
        };
        close.cancel();
        life2.closed.cancel();
        if idle {
            tracing::info!(%addr, "drained: closing the listener");
            let left = grace.saturating_sub(started.elapsed());
            if let Ok(r) = tokio::time::timeout(left, &mut serve).await {
                return r.context("server");
            }
        }
        tracing::warn!(%addr, "grace period of {grace:?} over: cancelling in-flight streams");
        life2.abort.cancel();
        match tokio::time::timeout(Duration::from_secs(5), &mut serve).await {
            Ok(r) => r.context("server"),
            Err(_) => {
                tracing::warn!(%addr, "connections still open after cancelling; closing them");
                Ok(())
            }
        }
    });
    Ok(Running {
        addr,
        life,
        health: reporter,
        task,
    })
}

pin_project_lite::pin_project! {
    /// An accepted connection that fails every read and write once `close_after` has passed
    /// since it was accepted: the forced end of a connection that outlived its maximum age
    /// plus grace (the GOAWAY at the age itself is tonic's).
    struct AgedIo {
        #[pin]
        tcp: tokio::net::TcpStream,
        deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    }
}

impl AgedIo {
    fn new(tcp: tokio::net::TcpStream, close_after: Option<Duration>) -> Self {
        Self {
            tcp,
            deadline: close_after.map(|d| Box::pin(tokio::time::sleep(d))),
        }
    }
}

fn aged_out(
    deadline: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    cx: &mut std::task::Context<'_>,
) -> Option<std::io::Error> {
    let d = deadline.as_mut()?;
    d.as_mut().poll(cx).is_ready().then(|| {
        tracing::debug!("connection past its maximum age and grace: closing it");
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connection past --max-connection-age + --max-connection-age-grace",
        )
    })
}

impl tokio::io::AsyncRead for AgedIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        if let Some(e) = aged_out(this.deadline, cx) {
            return std::task::Poll::Ready(Err(e));
        }
        this.tcp.poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for AgedIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.project();
        if let Some(e) = aged_out(this.deadline, cx) {
            return std::task::Poll::Ready(Err(e));
        }
        this.tcp.poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().tcp.poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().tcp.poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for AgedIo {
    type ConnectInfo = <tokio::net::TcpStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp.connect_info()
    }
}

/// Serves `grpc.health.v1` alone, in plaintext and without keys, on `addr` with the statuses of
/// `health`, until `stop` fires: kubelet's native gRPC probes speak neither TLS nor API keys,
/// so a server whose port needs them is probed here (`--health-listen`). Returns the bound
/// address.
pub async fn serve_health(
    addr: &str,
    health: &HealthReporter,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = bind(addr).await?;
    let bound = listener.local_addr().context("local address")?;
    let svc = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(health.clone()),
    );
    tokio::spawn(async move {
        let r = Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled_owned())
            .await;
        if let Err(e) = r {
            tracing::warn!(%bound, "health port stopped: {e}");
        }
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
