//! The backends' health and names: a `grpc.health.v1` round over a pool sets the gateway's own
//! status per service (SERVING while any backend is healthy); DNS names are re-resolved; both
//! repeat on one periodic loop ([`spawn_every`]).

use crate::discovery::Resolver;
use crate::pool::{Backend, Pool};
use crate::proxy::{refused_by_connection, Shared};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus as PbServing;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// One health check of a backend.
async fn check(b: &Backend, service: &str, timeout: Duration) -> Result<(), String> {
    let mut client = HealthClient::new(b.channel.clone());
    let req = HealthCheckRequest {
        service: service.to_string(),
    };
    let mut res = tokio::time::timeout(timeout, client.check(req.clone())).await;
    if matches!(&res, Ok(Err(s)) if refused_by_connection(s)) {
        // Raced a connection the backend is closing (its maximum age): ask again.
        res = tokio::time::timeout(timeout, client.check(req)).await;
    }
    match res {
        Err(_) => Err(format!("health check timed out after {timeout:?}")),
        Ok(Err(s)) => Err(format!(
            "health check failed: {} ({:?})",
            s.message(),
            s.code()
        )),
        Ok(Ok(r)) if r.get_ref().status == PbServing::Serving as i32 => Ok(()),
        Ok(Ok(r)) => Err(format!(
            "health status {:?}",
            PbServing::try_from(r.get_ref().status).unwrap_or(PbServing::Unknown)
        )),
    }
}

/// Checks every backend of a pool once and sets the gateway's health status for the service
/// (SERVING while any backend is healthy).
pub(crate) async fn check_round(
    shared: &Shared,
    which: fn(&Shared) -> &Pool,
    health: &HealthReporter,
    timeout: Duration,
) {
    let pool = which(shared);
    let backends = pool.backends();
    let mut checks = tokio::task::JoinSet::new();
    for b in &backends {
        let (b, service) = (Arc::clone(b), pool.service);
        checks.spawn(async move {
            match check(&b, service, timeout).await {
                Ok(()) => b.mark_healthy(),
                Err(e) => b.mark_unhealthy(&e),
            }
        });
    }
    while checks.join_next().await.is_some() {}
    let any = backends.iter().any(|b| b.healthy() && !b.ejected());
    let st = if any {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status(pool.service, st).await;
}

/// Runs `task` every `interval` (first after one interval) until `stop`, which also ends a
/// round in progress: the one loop behind the health checks and the discovery.
fn spawn_every<F, Fut>(interval: Duration, stop: CancellationToken, mut task: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.cancelled() => return,
            }
            tokio::select! {
                _ = task() => {}
                _ = stop.cancelled() => return,
            }
        }
    });
}

/// Repeats [`check_round`] every `interval` until `stop`.
pub(crate) fn spawn_health_checks(
    shared: Arc<Shared>,
    which: fn(&Shared) -> &Pool,
    health: HealthReporter,
    interval: Duration,
    timeout: Duration,
    stop: CancellationToken,
) {
    spawn_every(interval, stop, move || {
        let (shared, health) = (shared.clone(), health.clone());
        async move { check_round(&shared, which, &health, timeout).await }
    });
}

/// Re-resolves the pool's backend names every `interval` until `stop`.
pub(crate) fn spawn_discovery(
    shared: Arc<Shared>,
    which: fn(&Shared) -> &Pool,
    resolver: Resolver,
    interval: Duration,
    stop: CancellationToken,
) {
    if !which(&shared).has_names() {
        return;
    }
    spawn_every(interval, stop, move || {
        let (shared, resolver) = (shared.clone(), resolver.clone());
        async move { which(&shared).refresh(&resolver).await }
    });
}
