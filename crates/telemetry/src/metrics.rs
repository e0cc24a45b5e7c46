//! The Prometheus metrics of one process (`prometheus` crate, own registry per [`Metrics`]).
//!
//! Every metric is documented in `docs/metrics.md`; keep the two in step.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder as _, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tonic::Code;
use tracing::Span;

/// Distinct `method` label values kept before further methods are counted as `other`
/// (bounds the label set when clients probe random paths).
pub(crate) const MAX_METHOD_LABELS: usize = 64;

const TTFT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const PER_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
];
const PER_IMAGE_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0,
];
const QUEUE_WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
const REQUEST_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Version and source revision of the running binary, exported as `janus_build_info`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildInfo {
    /// Crate version of the binary.
    pub version: String,
    /// Git commit the binary was built from (`unknown` when not known at build time).
    pub git_sha: String,
}

impl BuildInfo {
    /// From explicit values (`git_sha` `None` → `unknown`).
    pub fn new(version: impl Into<String>, git_sha: Option<&str>) -> Self {
        Self {
            version: version.into(),
            git_sha: git_sha
                .filter(|s| !s.is_empty())
                .unwrap_or("unknown")
                .to_owned(),
        }
    }
}

/// [`BuildInfo`] of the crate that expands it: `CARGO_PKG_VERSION` and the `JANUS_GIT_SHA`
/// environment variable seen by the compiler (the Dockerfiles pass it as a build argument).
#[macro_export]
macro_rules! build_info {
    () => {
        $crate::BuildInfo::new(env!("CARGO_PKG_VERSION"), option_env!("JANUS_GIT_SHA"))
    };
}

/// Which kind of output token a count refers to (`kind` label of `janus_output_tokens_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// Text tokens streamed by the understanding service.
    Text,
    /// VQ image tokens sampled by the generation service (576 per 384×384 image).
    Image,
}

impl TokenKind {
    fn label(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Image => "image",
        }
    }
}

/// The canonical upper-case name of a gRPC status code, as used in the `code` label.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Codes that mark a server span as failed (OpenTelemetry gRPC semantic conventions).
pub(crate) fn is_server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

struct Inner {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    in_flight: IntGaugeVec,
    ttft: Histogram,
    per_token: Histogram,
    per_image: Histogram,
    queue_wait: Histogram,
    queue_depth: IntGauge,
    batch_size: Histogram,
    output_tokens: IntCounterVec,
    prompt_tokens: IntCounter,
    images: IntCounter,
    model_load: Gauge,
    auth: IntCounterVec,
    methods: Mutex<HashSet<Arc<str>>>,
}

/// The metrics of one process. Cheap to clone (shared handles); create one per process with
/// [`Metrics::new`], hand clones to the server layer, the engine and the metrics endpoint.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid histogram definition")
}

impl Metrics {
    /// Registers every metric in a fresh registry and sets `janus_build_info{service,..} 1`.
    pub fn new(service: &str, build: BuildInfo) -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "janus_grpc_requests_total",
                "RPCs finished, by full method and gRPC status code",
            ),
            &["method", "code"],
        )
        .expect("valid metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "janus_grpc_request_duration_seconds",
                "Time from receiving an RPC to its last response message (end of stream)",
            )
            .buckets(REQUEST_BUCKETS.to_vec()),
            &["method"],
        )
        .expect("valid metric");
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "janus_grpc_requests_in_flight",
                "RPCs received and not yet finished",
            ),
            &["method"],
        )
        .expect("valid metric");
        let ttft = histogram(
            "janus_time_to_first_token_seconds",
            "Time from receiving a request to its first output token",
            TTFT_BUCKETS,
        );
        let per_token = histogram(
            "janus_time_per_output_token_seconds",
            "Mean time per output token after the first, one observation per finished request",
            PER_TOKEN_BUCKETS,
        );
        let per_image = histogram(
            "janus_time_per_image_seconds",
            "Time from the start of generation to an encoded image, one observation per image",
            PER_IMAGE_BUCKETS,
        );
        let queue_wait = histogram(
            "janus_queue_wait_seconds",
            "Time a request waited in the admission queue before its first model step",
            QUEUE_WAIT_BUCKETS,
        );
        let queue_depth = IntGauge::new(
            "janus_queue_depth",
            "Requests waiting in the admission queue",
        )
        .expect("valid metric");
        let batch_size = histogram(
            "janus_batch_size",
            "Rows in each batched model step (sequences; CFG pairs count twice)",
            BATCH_BUCKETS,
        );
        let output_tokens = IntCounterVec::new(
            Opts::new(
                "janus_output_tokens_total",
                "Tokens produced: text tokens or VQ image tokens",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let prompt_tokens = IntCounter::new(
            "janus_prompt_tokens_total",
            "Prompt tokens prefilled (incl. image tokens)",
        )
        .expect("valid metric");
        let images = IntCounter::new(
            "janus_images_generated_total",
            "Images generated and encoded",
        )
        .expect("valid metric");
        let model_load = Gauge::new(
            "janus_model_load_seconds",
            "Seconds it took to load the model at startup (0 until loaded)",
        )
        .expect("valid metric");
        let auth = IntCounterVec::new(
            Opts::new(
                "janus_auth_requests_total",
                "Requests checked for an API key, by key (first 8 hex digits of its SHA-256; `none` when refused) and result",
            ),
            &["key", "result"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "janus_build_info",
                "Always 1; labels name the service, version and git commit",
            ),
            &["service", "version", "git_sha"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[service, &build.version, &build.git_sha])
            .set(1);

        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(in_flight.clone()),
            Box::new(ttft.clone()),
            Box::new(per_token.clone()),
            Box::new(per_image.clone()),
            Box::new(queue_wait.clone()),
            Box::new(queue_depth.clone()),
            Box::new(batch_size.clone()),
            Box::new(output_tokens.clone()),
            Box::new(prompt_tokens.clone()),
            Box::new(images.clone()),
            Box::new(model_load.clone()),
            Box::new(auth.clone()),
            Box::new(build_info),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // Both kinds exist from the start so dashboards see zeros rather than gaps.
        output_tokens.with_label_values(&["text"]);
        output_tokens.with_label_values(&["image"]);

        Self {
            inner: Arc::new(Inner {
                registry,
                requests,
                request_duration,
                in_flight,
                ttft,
                per_token,
                per_image,
                queue_wait,
                queue_depth,
                batch_size,
                output_tokens,
                prompt_tokens,
                images,
                model_load,
                auth,
                methods: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// The registry, to add process-specific collectors.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Prometheus text exposition format (version 0.0.4) of every metric.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.inner.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    /// The `method` label for a request path or method name (`pkg.Service/Method`): the method
    /// itself while fewer than [`MAX_METHOD_LABELS`] distinct ones were seen, `other` after.
    pub(crate) fn method_label(&self, path: &str) -> Arc<str> {
        let name = path.strip_prefix('/').unwrap_or(path);
        let mut seen = self.inner.methods.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = seen.get(name) {
            return known.clone();
        }
        if seen.len() >= MAX_METHOD_LABELS {
            return Arc::from("other");
        }
        let label: Arc<str> = Arc::from(name);
        seen.insert(label.clone());
        label
    }

    /// Counts an RPC as started (in-flight +1). Finish it with [`RequestGuard::finish`]; a guard
    /// dropped unfinished counts as `CANCELLED`. [`crate::MetricsLayer`] does this for every RPC
    /// of a server; call it directly only for work that is not an RPC of a layered server.
    pub fn request_started(&self, method: &str) -> RequestGuard {
        let method = self.method_label(method);
        self.inner.in_flight.with_label_values(&[&method]).inc();
        RequestGuard {
            metrics: self.clone(),
            method,
            start: Instant::now(),
            span: Span::none(),
            done: false,
        }
    }

    /// Time to first token (understanding: from receipt to the first streamed token).
    pub fn observe_ttft(&self, d: Duration) {
        self.inner.ttft.observe(d.as_secs_f64());
    }

    /// Mean time per output token after the first, once per finished request:
    /// `(finish - first_token) / (tokens - 1)` (skip requests with one token).
    pub fn observe_time_per_token(&self, d: Duration) {
        self.inner.per_token.observe(d.as_secs_f64());
    }

    /// Time to produce one image (from generation start to its PNG); once per image.
    pub fn observe_image_time(&self, d: Duration) {
        self.inner.per_image.observe(d.as_secs_f64());
    }

    /// Time a request spent queued before the engine took it.
    pub fn observe_queue_wait(&self, d: Duration) {
        self.inner.queue_wait.observe(d.as_secs_f64());
    }

    /// Current number of queued requests.
    pub fn set_queue_depth(&self, n: usize) {
        self.inner
            .queue_depth
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Adds `delta` to the queue depth: for several queues in one process, each reporting the
    /// change of its own length (the gauge is then their sum).
    pub fn add_queue_depth(&self, delta: i64) {
        self.inner.queue_depth.add(delta);
    }

    /// Rows in one batched model step.
    pub fn observe_batch_size(&self, rows: usize) {
        self.inner.batch_size.observe(rows as f64);
    }

    /// Adds produced tokens.
    pub fn add_output_tokens(&self, kind: TokenKind, n: u64) {
        self.inner
            .output_tokens
            .with_label_values(&[kind.label()])
            .inc_by(n);
    }

    /// Adds prefilled prompt tokens.
    pub fn add_prompt_tokens(&self, n: u64) {
        self.inner.prompt_tokens.inc_by(n);
    }

    /// Adds generated (encoded) images.
    pub fn add_images(&self, n: u64) {
        self.inner.images.inc_by(n);
    }

    /// Records how long the model took to load.
    pub fn set_model_load_time(&self, d: Duration) {
        self.inner.model_load.set(d.as_secs_f64());
    }

    /// Counts a request checked for an API key: `key` is the key's short hash (`none` when
    /// refused, so guessed keys cannot grow the label set), `result` `ok`, `missing`,
    /// `malformed` or `unknown_key`.
    pub fn count_auth(&self, key: &str, result: &str) {
        self.inner.auth.with_label_values(&[key, result]).inc();
    }

    fn finish(&self, method: &str, start: Instant, code: Code) {
        self.inner.in_flight.with_label_values(&[method]).dec();
        self.inner
            .requests
            .with_label_values(&[method, code_name(code)])
            .inc();
        self.inner
            .request_duration
            .with_label_values(&[method])
            .observe(start.elapsed().as_secs_f64());
    }
}

/// One RPC being counted: in flight until [`RequestGuard::finish`] or drop (`CANCELLED`).
///
/// When it carries the RPC's span, finishing records `rpc.grpc.status_code` (and
/// `otel.status_code = "ERROR"` for server-side failures) on it, and the span, held until then,
/// ends with the response stream rather than with the handler's first return.
#[must_use = "an unfinished guard counts the request as CANCELLED when dropped"]
pub struct RequestGuard {
    metrics: Metrics,
    method: Arc<str>,
    start: Instant,
    span: Span,
    done: bool,
}

impl std::fmt::Debug for RequestGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestGuard")
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

impl RequestGuard {
    /// Attaches the span the status code is recorded on.
    pub fn with_span(mut self, span: Span) -> Self {
        self.span = span;
        self
    }

    /// The `method` label this request is counted under.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The span attached with [`RequestGuard::with_span`] (`Span::none()` otherwise).
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// Counts the request as finished with `code`.
    pub fn finish(mut self, code: Code) {
        self.record(code);
    }

    fn record(&mut self, code: Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.metrics.finish(&self.method, self.start, code);
        self.span.record("rpc.grpc.status_code", code as i64);
        if is_server_error(code) {
            self.span.record("otel.status_code", "ERROR");
        }
        self.span = Span::none();
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.record(Code::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_counts_and_dropped_guard_is_cancelled() {
        let m = Metrics::new("test", BuildInfo::new("1.2.3", None));
        let g = m.request_started("/a.B/C");
        assert_eq!(g.method(), "a.B/C");
        assert_eq!(m.inner.in_flight.with_label_values(&["a.B/C"]).get(), 1);
        g.finish(Code::InvalidArgument);
        drop(m.request_started("a.B/C"));
        assert_eq!(m.inner.in_flight.with_label_values(&["a.B/C"]).get(), 0);
        assert_eq!(
            m.inner
                .requests
                .with_label_values(&["a.B/C", "INVALID_ARGUMENT"])
                .get(),
            1
        );
        assert_eq!(
            m.inner
                .requests
                .with_label_values(&["a.B/C", "CANCELLED"])
                .get(),
            1
        );
        let text = m.encode();
        assert!(
            text.contains(
                r#"janus_build_info{git_sha="unknown",service="test",version="1.2.3"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn method_labels_are_bounded() {
        let m = Metrics::new("test", BuildInfo::new("0", None));
        for i in 0..MAX_METHOD_LABELS {
            assert_eq!(&*m.method_label(&format!("/s/M{i}")), format!("s/M{i}"));
        }
        assert_eq!(&*m.method_label("/s/one-too-many"), "other");
        assert_eq!(
            &*m.method_label("/s/M0"),
            "s/M0",
            "known methods keep their label"
        );
    }

    #[test]
    fn every_code_has_a_distinct_name() {
        let names: HashSet<&str> = (0..17).map(|i| code_name(Code::from_i32(i))).collect();
        assert_eq!(names.len(), 17);
    }
}
