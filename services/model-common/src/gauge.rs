//! One engine's queue length in `janus_queue_depth`, and engine counters as the protocol's
//! `EngineStats`.

/// How often [`QueueGauge::spawn`] samples the engine's queue.
pub const QUEUE_GAUGE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// One engine's admission queue in `janus_queue_depth`. Each gauge adds the change of its own
/// queue's length, so engines sharing a registry (`janus serve`) report the sum of their
/// queues. Updated after every submission ([`QueueGauge::update`]) and sampled every
/// [`QUEUE_GAUGE_INTERVAL`] ([`QueueGauge::spawn`]) for the requests the engine takes.
#[derive(Clone)]
pub struct QueueGauge {
    inner: std::sync::Arc<QueueGaugeInner>,
}

struct QueueGaugeInner {
    metrics: janus_telemetry::Metrics,
    queued: Box<dyn Fn() -> usize + Send + Sync>,
    /// This queue's contribution to the gauge.
    reported: std::sync::Mutex<i64>,
}

impl std::fmt::Debug for QueueGauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueGauge").finish_non_exhaustive()
    }
}

impl QueueGauge {
    /// A gauge reading the queue length from `stats` (e.g. `move || engine.stats()`).
    pub fn new(
        metrics: janus_telemetry::Metrics,
        stats: impl Fn() -> janus_engine::StatsSnapshot + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner: std::sync::Arc::new(QueueGaugeInner {
                metrics,
                queued: Box::new(move || stats().queued),
                reported: std::sync::Mutex::new(0),
            }),
        }
    }

    /// Reports the queue's current length.
    pub fn update(&self) {
        self.report(i64::try_from((self.inner.queued)()).unwrap_or(i64::MAX));
    }

    fn report(&self, now: i64) {
        let mut reported = self
            .inner
            .reported
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.inner.metrics.add_queue_depth(now - *reported);
        *reported = now;
    }

    /// Samples the queue every [`QUEUE_GAUGE_INTERVAL`] until `stop` fires, then withdraws
    /// this queue from the gauge.
    pub fn spawn(&self, stop: tokio_util::sync::CancellationToken) {
        self.update();
        let gauge = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(QUEUE_GAUGE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => gauge.update(),
                }
            }
            gauge.report(0);
        });
    }
}

/// Engine counters as the protocol's `EngineStats`.
pub fn stats_to_proto(s: janus_engine::StatsSnapshot) -> janus_proto::v1::EngineStats {
    let c = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    janus_proto::v1::EngineStats {
        queued: c(s.queued),
        active: c(s.active),
        steps: s.steps,
        completed: s.completed,
        cancelled: s.cancelled,
        failed: s.failed,
        rejected: s.rejected,
    }
}
