//! The `GET /metrics` endpoint (axum 0.8 over HTTP/1.1), one per process on its own port.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;

/// Prometheus text exposition format 0.0.4.
const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn metrics_handler(State(metrics): State<Metrics>) -> impl IntoResponse {
    ([(CONTENT_TYPE, CONTENT_TYPE_TEXT)], metrics.encode())
}

fn router(metrics: Metrics) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state(metrics)
}

/// Binds `addr` and serves `GET /metrics` in a spawned task until the handle is aborted.
/// Returns the bound address (useful with port 0).
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Metrics,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    serve_metrics_with_shutdown(addr, metrics, std::future::pending()).await
}

/// As [`serve_metrics`], stopping when `shutdown` completes.
pub async fn serve_metrics_with_shutdown(
    addr: SocketAddr,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(metrics))
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    tracing::info!(addr = %local, "metrics endpoint listening (GET /metrics)");
    Ok((local, handle))
}

impl Metrics {
    /// [`serve_metrics`] for this registry.
    pub async fn serve(&self, addr: SocketAddr) -> io::Result<(SocketAddr, JoinHandle<()>)> {
        serve_metrics(addr, self.clone()).await
    }
}
