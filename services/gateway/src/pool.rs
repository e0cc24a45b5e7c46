//! Backends of one service: one channel per discovered address, health state, outstanding
//! streams, a circuit breaker per backend, and the balancing policy.
//!
//! A configured target (`host:port` or a URL) stands for every address its name resolves to
//! ([`crate::discovery`]); the pool re-resolves its targets every few seconds ([`Pool::refresh`])
//! and keeps one HTTP/2 channel per address, so the pods an autoscaler adds behind a headless
//! Service take traffic. An address that disappears stops getting new calls at once; its
//! in-flight streams keep their channel until they end. A failed lookup keeps the last good
//! addresses.

use crate::discovery::{Resolver, Target};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, ClientTlsConfig};

/// How a backend is picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Balance {
    /// Each request goes to the next healthy backend in turn.
    RoundRobin,
    /// Power of two choices: of two healthy backends picked at random, the one with fewer
    /// streams in flight (counted until each stream ends).
    LeastOutstanding,
    /// A request with an affinity key (an understanding request: its conversation's beginning)
    /// goes to the backend that rendezvous hashing ranks first for the key, so every turn of a
    /// conversation finds the replica whose prefix cache holds the earlier ones, unless that
    /// backend has more than `--affinity-slack` streams in flight beyond the least busy one;
    /// then, and for requests without a key, least-outstanding. A backend that leaves moves only
    /// its own keys (each key's next-ranked backend takes them).
    #[default]
    PrefixAffinity,
}

/// What a request's affinity is computed from: requests with equal keys prefer one backend.
pub type AffinityKey = [u8; 32];

/// Rank of `backend` for `key` in rendezvous (highest random weight) hashing: the backend
/// with the highest rank takes the key. SHA-256, so every gateway replica ranks alike.
fn rendezvous(key: &AffinityKey, backend: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(key);
    h.update(backend.as_bytes());
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

const UNKNOWN: u8 = 0;
const HEALTHY: u8 = 1;
const UNHEALTHY: u8 = 2;

/// Channel, balancing and failure-handling settings of every backend of a pool.
#[derive(Debug, Clone)]
pub struct BackendSettings {
    /// TCP (+ TLS) connection timeout.
    pub connect_timeout: Duration,
    /// HTTP/2 PING interval on backend connections, also while streams are open.
    pub keepalive_interval: Duration,
    /// A connection whose PING is not answered within this is closed: its streams fail with
    /// UNAVAILABLE (a frozen backend).
    pub keepalive_timeout: Duration,
    /// TLS to the backends (`https://` targets, or all when configured).
    pub tls: Option<ClientTlsConfig>,
    /// Consecutive failed calls that eject a backend.
    pub eject_after: u32,
    /// First ejection; doubles for each further failure up to `max_ejection`.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// [`Balance::PrefixAffinity`]: streams in flight a request's preferred backend may have
    /// beyond the least busy one before the request goes elsewhere.
    pub affinity_slack: usize,
}

impl Default for BackendSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(5),
            tls: None,
            eject_after: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(30),
            affinity_slack: 4,
        }
    }
}

/// Consecutive failures and the ejection they caused.
#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    ejected_until: Option<Instant>,
    ejection: Duration,
}

/// One backend address.
#[derive(Debug)]
pub struct Backend {
    /// `scheme://address:port` the channel connects to.
    pub url: String,
    /// The configured target it was discovered from (`scheme://host:port`).
    pub target: String,
    /// Shared HTTP/2 channel (connects lazily, reconnects by itself).
    pub channel: Channel,
    state: AtomicU8,
    outstanding: AtomicUsize,
    breaker: Mutex<Breaker>,
    last_error: Mutex<String>,
}

impl Backend {
    /// A backend at `addr`, one of `target`'s addresses. The channel's URL keeps the target's
    /// host name (TLS server name and `:authority`) but connects to `addr`.
    pub fn new(target: &Target, addr: SocketAddr, s: &BackendSettings) -> anyhow::Result<Self> {
        let name_url = target.display();
        let endpoint = janus_service::tls::endpoint(&name_url, s.tls.as_ref())
            .map_err(|e| anyhow::anyhow!("bad backend address '{name_url}': {e}"))?
            .connect_timeout(s.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(s.keepalive_interval)
            .keep_alive_timeout(s.keepalive_timeout)
            .keep_alive_while_idle(true);
        let connector = tower::service_fn(move |_uri: http::Uri| async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tcp))
        });
        Ok(Self {
            url: target.url_for(addr),
            target: name_url,
            channel: endpoint.connect_with_connector_lazy(connector),
            state: AtomicU8::new(UNKNOWN),
            outstanding: AtomicUsize::new(0),
            breaker: Mutex::new(Breaker::default()),
            last_error: Mutex::new(String::new()),
        })
    }

    /// `url (target)` for messages, or just the URL when they are the same.
    pub fn name(&self) -> String {
        if self.target == self.url {
            self.url.clone()
        } else {
            format!("{} ({})", self.url, self.target)
        }
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True unless the last health check failed or the circuit breaker ejected it.
    pub fn eligible(&self) -> bool {
        self.state.load(Ordering::Relaxed) != UNHEALTHY && !self.ejected()
    }

    /// True while ejected by the circuit breaker.
    pub fn ejected(&self) -> bool {
        self.breaker()
            .ejected_until
            .is_some_and(|t| Instant::now() < t)
    }

    /// True when the last health check said SERVING.
    pub fn healthy(&self) -> bool {
        self.state.load(Ordering::Relaxed) == HEALTHY
    }

    /// Records a passed health check.
    pub fn mark_healthy(&self) {
        if self.state.swap(HEALTHY, Ordering::Relaxed) != HEALTHY {
            tracing::info!(backend = %self.name(), "backend is healthy");
        }
    }

    /// Records a failed health check or call.
    pub fn mark_unhealthy(&self, why: &str) {
        if self.state.swap(UNHEALTHY, Ordering::Relaxed) != UNHEALTHY {
            tracing::warn!(backend = %self.name(), "backend is unhealthy: {why}");
        }
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = why.to_string();
    }

    /// A call reached the backend and got an answer: the breaker closes.
    pub fn record_success(&self) {
        let mut b = self.breaker();
        b.failures = 0;
        b.ejected_until = None;
        b.ejection = Duration::ZERO;
    }

    /// A call failed at the transport level (or the backend was unavailable). After
    /// `eject_after` in a row the backend is ejected for a backoff that doubles while the
    /// failures go on. Returns true when this failure ejected it.
    pub fn record_failure(&self, why: &str, s: &BackendSettings) -> bool {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = why.to_string();
        let mut b = self.breaker();
        b.failures += 1;
        if b.failures < s.eject_after.max(1) {
            return false;
        }
        b.ejection = if b.ejection.is_zero() {
            s.base_ejection
        } else {
            (b.ejection * 2).min(s.max_ejection)
        };
        b.ejected_until = Some(Instant::now() + b.ejection);
        tracing::warn!(backend = %self.name(), failures = b.failures, ejection_s = b.ejection.as_secs_f64(), "backend ejected: {why}");
        true
    }

    /// Why the backend was last marked unhealthy or failed.
    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Streams in flight.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }
}

/// Counts a stream as outstanding on a backend until dropped (the end of the stream).
#[derive(Debug)]
pub struct Lease(Arc<Backend>);

impl Lease {
    pub fn new(b: Arc<Backend>) -> Self {
        b.outstanding.fetch_add(1, Ordering::Relaxed);
        Self(b)
    }

    /// The backend this lease counts on.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
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
    targets: Vec<Target>,
    backends: RwLock<Vec<Arc<Backend>>>,
    /// The last good addresses of each target.
    resolved: Mutex<HashMap<usize, Vec<SocketAddr>>>,
    pub settings: BackendSettings,
    balance: Balance,
    next: AtomicUsize,
    rng: AtomicU64,
}

impl Pool {
    /// A pool over `addrs` (`host:port` or URLs). IP-literal targets get their backend at once;
    /// names get theirs at the first [`Pool::refresh`].
    pub fn new(
        service: &'static str,
        kind: &'static str,
        addrs: &[String],
        balance: Balance,
        settings: BackendSettings,
    ) -> anyhow::Result<Self> {
        let targets = addrs
            .iter()
            .map(|a| {
                let url = janus_service::tls::backend_url(a.trim(), settings.tls.is_some());
                Target::parse(&url).map_err(anyhow::Error::msg)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let pool = Self {
            service,
            kind,
            targets,
            backends: RwLock::new(Vec::new()),
            resolved: Mutex::new(HashMap::new()),
            settings,
            balance,
            next: AtomicUsize::new(0),
            rng: AtomicU64::new(0x2545_F491_4F6C_DD1D),
        };
        let literals: HashMap<usize, Vec<SocketAddr>> = pool
            .targets
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.literal().map(|a| (i, vec![a])))
            .collect();
        pool.apply(literals)?;
        Ok(pool)
    }

    /// True when some target is a DNS name (the pool needs periodic refreshes).
    pub fn has_names(&self) -> bool {
        self.targets.iter().any(|t| t.literal().is_none())
    }

    /// The current backends.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.backends
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-resolves every name target; a target whose lookup fails keeps its last good
    /// addresses. Backends of addresses that are gone leave the pool (their streams go on).
    pub async fn refresh(&self, resolver: &Resolver) {
        let mut found = HashMap::new();
        for (i, t) in self.targets.iter().enumerate() {
            if t.literal().is_some() {
                continue;
            }
            match resolver.resolve(t).await {
                Ok(addrs) => {
                    found.insert(i, addrs);
                }
                Err(e) => {
                    tracing::warn!(target = %t.display(), "{e}; keeping the last good addresses")
                }
            }
        }
        if let Err(e) = self.apply(found) {
            tracing::error!("{} backends: {e}", self.kind);
        }
    }

    /// Makes the backend set match `found` (target index → addresses) plus the other targets'
    /// last good addresses.
    fn apply(&self, found: HashMap<usize, Vec<SocketAddr>>) -> anyhow::Result<()> {
        let mut resolved = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        for (i, addrs) in found {
            resolved.insert(i, addrs);
        }
        let current = self.backends();
        let mut next = Vec::new();
        for (i, t) in self.targets.iter().enumerate() {
            for &addr in resolved.get(&i).map(Vec::as_slice).unwrap_or(&[]) {
                let url = t.url_for(addr);
                let target = t.display();
                if next.iter().any(|b: &Arc<Backend>| b.url == url) {
                    continue;
                }
                match current.iter().find(|b| b.url == url && b.target == target) {
                    Some(b) => next.push(b.clone()),
                    None => {
                        tracing::info!(backend = %url, target = %target, "{} backend added", self.kind);
                        next.push(Arc::new(Backend::new(t, addr, &self.settings)?));
                    }
                }
            }
        }
        for b in &current {
            if !next.iter().any(|n| Arc::ptr_eq(n, b)) {
                tracing::info!(backend = %b.name(), in_flight = b.outstanding(), "{} backend removed (its streams finish)", self.kind);
            }
        }
        *self.backends.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    fn random(&self) -> u64 {
        // xorshift64*, good enough to pick two backends.
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Ordering::Relaxed);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Eligible backends in the order to try them for a request with `affinity` (see
    /// [`Balance::PrefixAffinity`]): the policy's pick first, then the others (fewest
    /// outstanding streams first) for a retry.
    pub fn candidates_for(&self, affinity: Option<&AffinityKey>) -> Vec<Arc<Backend>> {
        let mut order = self.candidates();
        let Some(key) = affinity.filter(|_| self.balance == Balance::PrefixAffinity) else {
            return order;
        };
        let preferred = order
            .iter()
            .enumerate()
            .max_by_key(|(_, b)| rendezvous(key, &b.url))
            .map(|(i, _)| i);
        let least = order.iter().map(|b| b.outstanding()).min().unwrap_or(0);
        if let Some(i) = preferred {
            if order[i].outstanding() <= least + self.settings.affinity_slack {
                let b = order.remove(i);
                order.insert(0, b);
            }
        }
        order
    }

    /// Eligible backends in the order to try them: the policy's pick first, then the others
    /// (fewest outstanding streams first) for a retry.
    pub fn candidates(&self) -> Vec<Arc<Backend>> {
        let all = self.backends();
        let n = all.len();
        if n == 0 {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut order: Vec<Arc<Backend>> = (0..n)
            .map(|i| all[(start + i) % n].clone())
            .filter(|b| b.eligible())
            .collect();
        if self.balance != Balance::RoundRobin && order.len() > 1 {
            let m = order.len();
            let a = (self.random() % m as u64) as usize;
            let mut b = (self.random() % (m as u64 - 1)) as usize;
            if b >= a {
                b += 1;
            }
            let pick = if order[b].outstanding() < order[a].outstanding() {
                b
            } else {
                a
            };
            let first = order.remove(pick);
            // Stable: ties keep the round-robin order.
            order.sort_by_key(|b| b.outstanding());
            order.insert(0, first);
        }
        order
    }

    /// Why no backend can take a request.
    pub fn unavailable_message(&self) -> String {
        let all = self.backends();
        if all.is_empty() {
            let targets: Vec<String> = self.targets.iter().map(Target::display).collect();
            return if targets.is_empty() {
                format!("no {} backend is configured", self.kind)
            } else {
                format!(
                    "no {} backend address is known yet ({})",
                    self.kind,
                    targets.join(", ")
                )
            };
        }
        let details: Vec<String> = all
            .iter()
            .map(|b| {
                let why = b.last_error();
                if b.ejected() {
                    format!("{}: ejected after repeated failures ({why})", b.name())
                } else {
                    format!("{}: {why}", b.name())
                }
            })
            .collect();
        format!(
            "no healthy {} backend ({} known; {})",
            self.kind,
            all.len(),
            details.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(balance: Balance) -> Pool {
        let addrs: Vec<String> = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        Pool::new("s", "test", &addrs, balance, BackendSettings::default()).unwrap()
    }

    #[tokio::test]
    async fn round_robin_skips_unhealthy() {
        let p = pool(Balance::RoundRobin);
        let firsts: Vec<String> = (0..3).map(|_| p.candidates()[0].url.clone()).collect();
        assert_eq!(
            firsts,
            vec![
                "http://127.0.0.1:1",
                "http://127.0.0.1:2",
                "http://127.0.0.1:3"
            ]
        );
        p.backends()[1].mark_unhealthy("down");
        assert!(p.candidates().iter().all(|b| b.url != "http://127.0.0.1:2"));
        assert!(p.unavailable_message().contains("down"));
    }

    #[tokio::test]
    async fn two_choices_prefer_fewer_outstanding_streams() {
        let q = pool(Balance::LeastOutstanding);
        let bs = q.backends();
        let _a = Lease::new(bs[0].clone());
        let _b = Lease::new(bs[0].clone());
        let _c = Lease::new(bs[1].clone());
        // Of any two, the busier never wins: backend 0 (2 streams) is never picked first.
        let mut counts = HashMap::new();
        for _ in 0..300 {
            *counts.entry(q.candidates()[0].url.clone()).or_insert(0) += 1;
        }
        assert_eq!(counts.get("http://127.0.0.1:1"), None, "{counts:?}");
        assert!(
            counts["http://127.0.0.1:3"] > counts["http://127.0.0.1:2"],
            "{counts:?}"
        );
        // All eligible backends are still offered for a retry.
        assert_eq!(q.candidates().len(), 3);
        drop(_a);
        assert_eq!(bs[0].outstanding(), 1);
    }

    #[tokio::test]
    async fn a_key_keeps_its_backend_unless_it_is_much_busier_or_gone() {
        let p = pool(Balance::PrefixAffinity);
        let keys: Vec<AffinityKey> = (0..64u8).map(|i| [i; 32]).collect();
        let pick = |p: &Pool, k: &AffinityKey| p.candidates_for(Some(k))[0].url.clone();
        let first: Vec<String> = keys.iter().map(|k| pick(&p, k)).collect();
        // Stable, and spread over all three backends.
        assert_eq!(first, keys.iter().map(|k| pick(&p, k)).collect::<Vec<_>>());
        for b in p.backends() {
            let n = first.iter().filter(|u| **u == b.url).count();
            assert!(n >= 10, "{} takes {n} of 64 keys", b.url);
        }
        // A backend that is down moves only its own keys.
        let bs = p.backends();
        bs[1].mark_unhealthy("down");
        for (k, was) in keys.iter().zip(&first) {
            let now = pick(&p, k);
            if *was == bs[1].url {
                assert_ne!(now, bs[1].url);
            } else {
                assert_eq!(&now, was, "a key of a backend still up moved");
            }
        }
        bs[1].mark_healthy();
        // Up to `affinity_slack` (4) more streams than the least busy: still preferred.
        let k = &keys[0];
        let home = p
            .backends()
            .into_iter()
            .find(|b| b.url == first[0])
            .unwrap();
        let mut leases: Vec<Lease> = (0..4).map(|_| Lease::new(home.clone())).collect();
        assert_eq!(pick(&p, k), home.url);
        leases.push(Lease::new(home.clone()));
        assert_ne!(pick(&p, k), home.url, "five more streams: passed over");
        assert_eq!(
            p.candidates_for(Some(k)).len(),
            3,
            "all still offered for a retry"
        );
        drop(leases);
        assert_eq!(pick(&p, k), home.url);
        // Other policies ignore the key.
        let rr = pool(Balance::RoundRobin);
        let firsts: Vec<String> = (0..3).map(|_| pick(&rr, k)).collect();
        assert_eq!(
            firsts
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            3
        );
    }

    #[tokio::test]
    async fn consecutive_failures_eject_with_backoff() {
        let s = BackendSettings {
            eject_after: 2,
            base_ejection: Duration::from_millis(200),
            ..Default::default()
        };
        let addrs = vec!["127.0.0.1:1".to_string()];
        let p = Pool::new("s", "test", &addrs, Balance::LeastOutstanding, s.clone()).unwrap();
        let b = p.backends()[0].clone();
        assert!(!b.record_failure("refused", &s));
        assert!(b.eligible());
        assert!(b.record_failure("refused", &s));
        assert!(!b.eligible() && b.ejected());
        assert!(p.candidates().is_empty());
        assert!(p.unavailable_message().contains("ejected"));
        // The next failure doubles the ejection; a success closes the breaker.
        assert!(b.record_failure("refused", &s));
        assert_eq!(b.breaker().ejection, Duration::from_millis(400));
        b.record_success();
        assert!(b.eligible());
    }

    #[tokio::test]
    async fn a_failed_lookup_keeps_the_last_good_addresses() {
        let addrs = vec!["backend.invalid:7".to_string()];
        let p = Pool::new(
            "s",
            "test",
            &addrs,
            Balance::LeastOutstanding,
            BackendSettings::default(),
        )
        .unwrap();
        assert!(p.has_names() && p.backends().is_empty());
        p.apply(HashMap::from([(0, vec!["127.0.0.2:7".parse().unwrap()])]))
            .unwrap();
        let before = p.backends();
        assert_eq!(before.len(), 1);
        assert_eq!(before[0].url, "http://127.0.0.2:7");
        assert_eq!(before[0].target, "http://backend.invalid:7");
        // `.invalid` never resolves: the pool keeps what it had.
        p.refresh(&Resolver::system()).await;
        assert!(Arc::ptr_eq(&p.backends()[0], &before[0]));
        // A new answer replaces the set; the kept address keeps its backend (and channel).
        p.apply(HashMap::from([(
            0,
            vec![
                "127.0.0.2:7".parse().unwrap(),
                "127.0.0.3:7".parse().unwrap(),
            ],
        )]))
        .unwrap();
        let after = p.backends();
        assert_eq!(after.len(), 2);
        assert!(Arc::ptr_eq(&after[0], &before[0]));
        p.apply(HashMap::from([(0, vec!["127.0.0.3:7".parse().unwrap()])]))
            .unwrap();
        assert_eq!(p.backends().len(), 1);
        assert_eq!(p.backends()[0].url, "http://127.0.0.3:7");
    }
}
