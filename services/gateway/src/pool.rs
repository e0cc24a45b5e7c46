//! Backends of one service: channels, health state, outstanding-request counts and the
//! balancing policy.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Channel, ClientTlsConfig};

/// How a backend is picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Balance {
    /// Each request goes to the next healthy backend in turn.
    #[default]
    RoundRobin,
    /// Each request goes to the healthy backend with the fewest requests in flight.
    LeastOutstanding,
}

const UNKNOWN: u8 = 0;
const HEALTHY: u8 = 1;
const UNHEALTHY: u8 = 2;

/// One backend address.
#[derive(Debug)]
pub struct Backend {
    /// `http://host:port`.
    pub url: String,
    /// Shared HTTP/2 channel (connects lazily, reconnects by itself).
    pub channel: Channel,
    state: AtomicU8,
    outstanding: AtomicUsize,
    last_error: Mutex<String>,
}

impl Backend {
    /// A backend at `addr` (`host:port` or a URL); `https://` (and `host:port` when `tls` is
    /// given) connects with `tls`.
    pub fn new(
        addr: &str,
        connect_timeout: Duration,
        tls: Option<&ClientTlsConfig>,
    ) -> anyhow::Result<Self> {
        let url = janus_service::tls::backend_url(addr, tls.is_some());
        let channel = janus_service::tls::endpoint(&url, tls)
            .map_err(|e| anyhow::anyhow!("bad backend address '{addr}': {e}"))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .connect_lazy();
        Ok(Self {
            url,
            channel,
            state: AtomicU8::new(UNKNOWN),
            outstanding: AtomicUsize::new(0),
            last_error: Mutex::new(String::new()),
        })
    }

    /// True unless the last health check or call failed.
    pub fn eligible(&self) -> bool {
        self.state.load(Ordering::Relaxed) != UNHEALTHY
    }

    /// True when the last health check said SERVING.
    pub fn healthy(&self) -> bool {
        self.state.load(Ordering::Relaxed) == HEALTHY
    }

    /// Records a passed health check.
    pub fn mark_healthy(&self) {
        if self.state.swap(HEALTHY, Ordering::Relaxed) != HEALTHY {
            tracing::info!(backend = %self.url, "backend is healthy");
        }
    }

    /// Records a failed health check or call.
    pub fn mark_unhealthy(&self, why: &str) {
        if self.state.swap(UNHEALTHY, Ordering::Relaxed) != UNHEALTHY {
            tracing::warn!(backend = %self.url, "backend is unhealthy: {why}");
        }
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = why.to_string();
    }

    /// Why the backend was last marked unhealthy.
    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Requests in flight.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }
}

/// Counts a request as outstanding on a backend until dropped.
#[derive(Debug)]
pub struct Lease(Arc<Backend>);

impl Lease {
    pub fn new(b: Arc<Backend>) -> Self {
        b.outstanding.fetch_add(1, Ordering::Relaxed);
        Self(b)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The backends of one service.
#[derive(Debug)]
pub struct Pool {
    /// Full gRPC service name (also the health-check name).
    pub service: &'static str,
    /// Short name for messages.
    pub kind: &'static str,
    pub backends: Vec<Arc<Backend>>,
    balance: Balance,
    next: AtomicUsize,
}

impl Pool {
    pub fn new(
        service: &'static str,
        kind: &'static str,
        addrs: &[String],
        balance: Balance,
        connect_timeout: Duration,
        tls: Option<&ClientTlsConfig>,
    ) -> anyhow::Result<Self> {
        let backends = addrs
            .iter()
            .map(|a| Backend::new(a.trim(), connect_timeout, tls).map(Arc::new))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            service,
            kind,
            backends,
            balance,
            next: AtomicUsize::new(0),
        })
    }

    /// Eligible backends in the order to try them.
    pub fn candidates(&self) -> Vec<Arc<Backend>> {
        let n = self.backends.len();
        if n == 0 {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut order: Vec<Arc<Backend>> = (0..n)
            .map(|i| self.backends[(start + i) % n].clone())
            .filter(|b| b.eligible())
            .collect();
        if self.balance == Balance::LeastOutstanding {
            // Stable: ties keep the round-robin order.
            order.sort_by_key(|b| b.outstanding());
        }
        order
    }

    /// Why no backend can take a request.
    pub fn unavailable_message(&self) -> String {
        if self.backends.is_empty() {
            return format!("no {} backend is configured", self.kind);
        }
        let details: Vec<String> = self
            .backends
            .iter()
            .map(|b| format!("{}: {}", b.url, b.last_error()))
            .collect();
        format!(
            "no healthy {} backend ({} configured; {})",
            self.kind,
            self.backends.len(),
            details.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn policies() {
        let addrs: Vec<String> = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = Pool::new(
            "s",
            "test",
            &addrs,
            Balance::RoundRobin,
            Duration::from_secs(1),
            None,
        )
        .unwrap();
        let firsts: Vec<String> = (0..3).map(|_| p.candidates()[0].url.clone()).collect();
        assert_eq!(
            firsts,
            vec![
                "http://127.0.0.1:1",
                "http://127.0.0.1:2",
                "http://127.0.0.1:3"
            ]
        );
        p.backends[1].mark_unhealthy("down");
        assert!(p.candidates().iter().all(|b| b.url != "http://127.0.0.1:2"));
        assert!(p.unavailable_message().contains("down"));

        let q = Pool::new(
            "s",
            "test",
            &addrs,
            Balance::LeastOutstanding,
            Duration::from_secs(1),
            None,
        )
        .unwrap();
        let _a = Lease::new(q.backends[0].clone());
        let _b = Lease::new(q.backends[1].clone());
        assert_eq!(q.candidates()[0].url, "http://127.0.0.1:3");
        drop(_a);
        assert_eq!(q.backends[0].outstanding(), 0);
    }
}
