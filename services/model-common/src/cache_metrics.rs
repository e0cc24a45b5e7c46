//! The caches' counters and sizes in Prometheus, read from the model at each scrape (the
//! pipeline keeps them; nothing is counted twice), labelled with the model half
//! (`janus serve` has both in one registry).

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntGauge, Opts};

/// `janus_prefix_cache_*` and `janus_image_cache_*{half}`.
pub struct CacheMetrics {
    stats: Box<dyn Fn() -> janus_pipeline::CacheStats + Send + Sync>,
    counters: Vec<(IntCounter, Read)>,
    gauges: Vec<(IntGauge, Read)>,
}

/// Reads one figure out of the caches' stats.
type Read = fn(&janus_pipeline::CacheStats) -> u64;

impl CacheMetrics {
    /// The collector of one model half's caches (`half`: "understanding" or "generation"),
    /// reading them with `stats`; register it with [`register`].
    pub fn new(
        half: &str,
        stats: impl Fn() -> janus_pipeline::CacheStats + Send + Sync + 'static,
    ) -> Self {
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("half", half);
        let counter = |name: &str, help: &str, read: Read| {
            let m = IntCounter::with_opts(opts(name, help)).expect("valid metric");
            (m, read)
        };
        let gauge = |name: &str, help: &str, read: Read| {
            let m = IntGauge::with_opts(opts(name, help)).expect("valid metric");
            (m, read)
        };
        Self {
            stats: Box::new(stats),
            counters: vec![
                counter("janus_prefix_cache_hits_total", "Requests (generation: prompt rows) that reused a cached prefix", |s| s.prefix.hits),
                counter("janus_prefix_cache_misses_total", "Requests (generation: prompt rows) that reused no cached prefix", |s| s.prefix.misses),
                counter("janus_prefix_cache_hit_tokens_total", "Prompt tokens taken from the prefix cache instead of prefilled", |s| s.prefix.hit_tokens),
                counter("janus_prefix_cache_evictions_total", "Prefix cache entries evicted (least recently used) to stay within --prefix-cache-bytes", |s| s.prefix.evictions),
                counter("janus_image_cache_hits_total", "Input images whose vision features came from the image cache", |s| s.images.hits),
                counter("janus_image_cache_misses_total", "Input images whose vision features were computed", |s| s.images.misses),
                counter("janus_image_cache_evictions_total", "Image cache entries evicted to stay within --image-cache-bytes", |s| s.images.evictions),
            ],
            gauges: vec![
                gauge("janus_prefix_cache_bytes", "Bytes held by the prefix cache", |s| s.prefix.bytes as u64),
                gauge("janus_prefix_cache_limit_bytes", "--prefix-cache-bytes (0: off)", |s| s.prefix.limit as u64),
                gauge("janus_prefix_cache_entries", "Sequences held by the prefix cache", |s| s.prefix.entries as u64),
                gauge("janus_image_cache_bytes", "Bytes held by the image cache", |s| s.images.bytes as u64),
                gauge("janus_image_cache_limit_bytes", "--image-cache-bytes (0: off)", |s| s.images.limit as u64),
            ],
        }
    }
}

impl Collector for CacheMetrics {
    fn desc(&self) -> Vec<&Desc> {
        let c = self.counters.iter().flat_map(|(m, _)| m.desc());
        c.chain(self.gauges.iter().flat_map(|(m, _)| m.desc()))
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let stats = (self.stats)();
        let mut out = Vec::new();
        for (m, read) in &self.counters {
            m.reset();
            m.inc_by(read(&stats));
            out.extend(m.collect());
        }
        for (m, read) in &self.gauges {
            m.set(i64::try_from(read(&stats)).unwrap_or(i64::MAX));
            out.extend(m.collect());
        }
        out
    }
}

/// Registers the collector of one half's caches in `metrics`' registry. A second collector for
/// the same half (two services of one kind on one registry, as in tests) is left out with a
/// warning: the first one's caches show.
pub fn register(
    metrics: &janus_telemetry::Metrics,
    half: &str,
    stats: impl Fn() -> janus_pipeline::CacheStats + Send + Sync + 'static,
) {
    if let Err(e) = metrics
        .registry()
        .register(Box::new(CacheMetrics::new(half, stats)))
    {
        tracing::warn!("{half} cache metrics not registered: {e}");
    }
}
