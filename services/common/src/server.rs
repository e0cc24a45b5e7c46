//! Assembling and running a tonic server: health, reflection (v1 and v1alpha), message limits,
//! ephemeral-port friendly binding, and graceful shutdown with a bounded grace period.

use anyhow::Context;
use janus_telemetry::{InstrumentedRouter as Router, InstrumentedServer};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

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
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 * 1024 * 1024,
            grace_period: Duration::from_secs(30),
            metrics: janus_telemetry::Metrics::new("janus", janus_telemetry::build_info!()),
        }
    }
}

/// Shutdown signalling of a server: `shutdown` starts draining (health NOT_SERVING, no new
/// connections or requests), `abort` fires when the grace period is over (in-flight streams
/// are cancelled).
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    /// Cancel to start a graceful shutdown.
    pub shutdown: CancellationToken,
    /// Cancelled by the server when the grace period ends.
    pub abort: CancellationToken,
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
/// metrics (method, status code, duration, in flight) in `metrics`.
pub fn builder(metrics: &janus_telemetry::Metrics) -> InstrumentedServer {
    janus_telemetry::instrument(
        Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20))),
        metrics,
    )
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

/// Runs `router` on `listener` until `life.shutdown` fires, then: marks `services` (and the
/// whole server) NOT_SERVING, stops accepting, lets in-flight streams run for the grace period,
/// fires `life.abort`, and gives streams a few more seconds to end before dropping them.
pub fn spawn(
    router: Router,
    listener: TcpListener,
    health: HealthReporter,
    services: Vec<&'static str>,
    grace: Duration,
    life: Lifecycle,
) -> anyhow::Result<Running> {
    let addr = listener.local_addr().context("local address")?;
    let life2 = life.clone();
    let task = tokio::spawn(async move {
        let drain = life2.shutdown.clone();
        let health2 = health.clone();
        let names = services.clone();
        let signal = async move {
            drain.cancelled().await;
            for name in &names {
                health2
                    .set_service_status(*name, ServingStatus::NotServing)
                    .await;
            }
            health2
                .set_service_status("", ServingStatus::NotServing)
                .await;
            tracing::info!(%addr, "shutting down: draining in-flight requests");
        };
        let serve = router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal);
        tokio::pin!(serve);
        tokio::select! {
            r = &mut serve => return r.context("server"),
            _ = life2.shutdown.cancelled() => {}
        }
        if let Ok(r) = tokio::time::timeout(grace, &mut serve).await {
            return r.context("server");
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
    Ok(Running { addr, life, task })
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
