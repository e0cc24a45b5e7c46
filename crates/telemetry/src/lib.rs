//! Telemetry for the Janus-Pro binaries: logs, traces and metrics.
//!
//! * **Logs** — a `tracing` subscriber filtered by `RUST_LOG` (default `info`), as human-readable text
//!   or one JSON object per line ([`LogFormat`], `JANUS_LOG_FORMAT=json`).
//! * **Traces** — OpenTelemetry spans exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT`
//!   (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and not at all otherwise. The service name
//!   comes from `OTEL_SERVICE_NAME` or the caller; sampling from `OTEL_TRACES_SAMPLER` /
//!   `OTEL_TRACES_SAMPLER_ARG` (read by the SDK, default `parentbased_always_on`). The W3C
//!   TraceContext propagator is always installed, and [`propagation`] moves `traceparent` through
//!   gRPC metadata so that one trace covers the gateway and the service behind it.
//! * **Metrics** — [`Metrics`] holds the Prometheus metrics of a process; [`MetricsLayer`] counts
//!   every RPC of a tonic server by method and status code; [`serve_metrics`] serves
//!   `GET /metrics` on its own port.
//!
//! A binary calls [`init`] once, inside its Tokio runtime, and keeps the returned [`Guard`] alive
//! until it exits (dropping it flushes the spans still buffered):
//!
//! ```no_run
//! # async fn run() {
//! let _telemetry = janus_telemetry::init("janus-gateway", janus_telemetry::LogFormat::from_env());
//! # }
//! ```

mod layer;
mod metrics;
pub mod propagation;
mod server;

use std::fmt;
use std::str::FromStr;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{Layer, Registry};

pub use layer::{MetricsBody, MetricsLayer, MetricsService};
pub use metrics::{code_name, BuildInfo, Metrics, RequestGuard, TokenKind};
/// The OpenTelemetry crates this crate is built on (use these in tests so versions match).
pub use opentelemetry;
pub use opentelemetry_sdk;
pub use propagation::{
    client_span, copy_request_id, extract_context, extract_context_from_headers, inject_context,
    inject_context_into, propagate_context, record_client_status, server_span, InjectContextExt,
    ServerSpan, ServerSpanLayer, REQUEST_ID_HEADER,
};
pub use server::{serve_metrics, serve_metrics_with_shutdown};
/// The filter type [`build_subscriber`] takes.
pub use tracing_subscriber::EnvFilter;

/// A tonic server with [`server_span`] as its `trace_fn` and [`MetricsLayer`] as its layer.
pub type InstrumentedServer =
    tonic::transport::Server<tower_layer::Stack<MetricsLayer, tower_layer::Identity>>;
/// The router of an [`InstrumentedServer`] (what `add_service` returns).
pub type InstrumentedRouter =
    tonic::transport::server::Router<tower_layer::Stack<MetricsLayer, tower_layer::Identity>>;

/// Adds per-RPC spans (remote parent from `traceparent`) and per-RPC metrics to a server builder:
/// `janus_telemetry::instrument(Server::builder().tcp_nodelay(true), &metrics).add_service(..)`.
pub fn instrument(server: tonic::transport::Server, metrics: &Metrics) -> InstrumentedServer {
    server.trace_fn(server_span).layer(metrics.layer())
}

/// Environment variable selecting the log format (`text` or `json`).
pub const LOG_FORMAT_ENV: &str = "JANUS_LOG_FORMAT";
/// Environment variable holding the filter for exported spans (`EnvFilter` syntax, default
/// `info`). Log output is filtered by `RUST_LOG` independently.
pub const TRACES_FILTER_ENV: &str = "JANUS_TRACES_FILTER";

/// Targets whose spans and events never become exported spans: the OTLP exporter itself runs on
/// tonic/hyper/h2, and exporting its own spans would feed back into the exporter.
const EXPORTER_INTERNALS_OFF: &str = "h2=off,hyper=off,hyper_util=off,tonic=off,tower=off,\
     opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off";

/// How log lines are written to stdout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable single lines (`tracing_subscriber::fmt`'s default format).
    #[default]
    Text,
    /// One JSON object per line, with the current span's fields (for log collectors).
    Json,
}

impl LogFormat {
    /// Reads [`LOG_FORMAT_ENV`]; unset or unparsable values give [`LogFormat::Text`].
    pub fn from_env() -> Self {
        std::env::var(LOG_FORMAT_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_default()
    }
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" | "plain" | "" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format {other:?} (expected text or json)"
            )),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// What the OpenTelemetry part of [`init`] will do, decided from environment variables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtelSettings {
    /// The OTLP/gRPC endpoint spans go to; `None` = trace export off.
    pub endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Why export is off when it is (for the startup log line).
    pub disabled_reason: Option<&'static str>,
}

impl OtelSettings {
    /// Reads the process environment.
    pub fn from_env(default_service_name: &str) -> Self {
        Self::from_lookup(default_service_name, |k| std::env::var(k).ok())
    }

    /// Decides from `lookup` (a stand-in for the environment, for tests). Export is on when
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is non-empty, unless
    /// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
    pub fn from_lookup(
        default_service_name: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Self {
        let get = |k: &str| {
            lookup(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let service_name =
            get("OTEL_SERVICE_NAME").unwrap_or_else(|| default_service_name.to_owned());
        let endpoint = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| get("OTEL_EXPORTER_OTLP_ENDPOINT"));
        let disabled_reason =
            if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
                Some("OTEL_SDK_DISABLED=true")
            } else if get("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none")) {
                Some("OTEL_TRACES_EXPORTER=none")
            } else if endpoint.is_none() {
                Some("no OTEL_EXPORTER_OTLP_ENDPOINT")
            } else {
                None
            };
        Self {
            endpoint: if disabled_reason.is_some() {
                None
            } else {
                endpoint
            },
            service_name,
            disabled_reason,
        }
    }
}

/// Error building the OTLP exporter.
#[derive(Debug)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// Keeps the tracer provider alive; flushes buffered spans and shuts the exporter down on drop.
#[must_use = "dropping the guard shuts trace export down"]
#[derive(Debug, Default)]
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Guard {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// The tracer provider, when exporting.
    pub fn provider(&self) -> Option<&SdkTracerProvider> {
        self.provider.as_ref()
    }

    /// Flushes and shuts down now (same as dropping).
    pub fn shutdown(mut self) {
        self.shutdown_inner();
    }

    fn shutdown_inner(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                // The subscriber may already be gone at exit: stderr is the only safe channel.
                eprintln!("janus-telemetry: trace provider shutdown: {e}");
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shutdown_inner();
    }
}

/// Installs logging, trace export and the W3C propagator for this process.
///
/// Call once, early in `main`, from inside the Tokio runtime (the OTLP exporter is a tonic
/// client). Never fails: if the exporter cannot be built, logs go on and a warning says why.
/// A second call (or a subscriber installed elsewhere) leaves the existing subscriber in place.
pub fn init(service_name: &str, format: LogFormat) -> Guard {
    install_propagator();
    let settings = OtelSettings::from_env(service_name);
    let (provider, export_error) = match &settings.endpoint {
        None => (None, None),
        Some(_) => match otlp_provider(&settings.service_name) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        },
    };
    let subscriber = build_subscriber(
        format,
        log_filter_from_env(),
        provider.as_ref().map(|p| (p, traces_filter_from_env())),
        std::io::stderr,
    );
    let installed = tracing::subscriber::set_global_default(subscriber).is_ok();
    if let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
    }
    match (&settings.endpoint, &export_error) {
        (Some(endpoint), None) => tracing::info!(
            service = %settings.service_name, %endpoint, log_format = %format,
            "telemetry: exporting traces over OTLP/gRPC"
        ),
        (Some(endpoint), Some(e)) => tracing::warn!(
            service = %settings.service_name, %endpoint, error = %e,
            "telemetry: OTLP exporter could not be built; traces are not exported"
        ),
        (None, _) => tracing::debug!(
            service = %settings.service_name,
            reason = settings.disabled_reason.unwrap_or(""),
            "telemetry: trace export off"
        ),
    }
    if !installed {
        tracing::debug!("telemetry: a global subscriber was already installed; kept it");
    }
    Guard { provider }
}

/// Installs the W3C TraceContext propagator globally (idempotent; [`init`] does it).
pub fn install_propagator() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
}

/// `RUST_LOG`, or `info` when unset or invalid.
pub fn log_filter_from_env() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// [`TRACES_FILTER_ENV`] (default `info`) with the exporter's own transport crates switched off.
pub fn traces_filter_from_env() -> EnvFilter {
    let user = std::env::var(TRACES_FILTER_ENV).unwrap_or_else(|_| "info".to_owned());
    traces_filter(&user)
}

/// Builds the exported-spans filter from `directives` plus the exporter-internals exclusions.
pub fn traces_filter(directives: &str) -> EnvFilter {
    EnvFilter::builder().parse_lossy(format!("{directives},{EXPORTER_INTERNALS_OFF}"))
}

/// Builds an OTLP/gRPC span exporter and a batching tracer provider. Endpoint, headers, timeout
/// and compression come from the standard `OTEL_EXPORTER_OTLP_*` variables, the sampler from
/// `OTEL_TRACES_SAMPLER*`. Must run inside a Tokio runtime.
pub fn otlp_provider(service_name: &str) -> Result<SdkTracerProvider, Error> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error(
            "the OTLP/gRPC exporter needs a Tokio runtime: call init() inside it".into(),
        ));
    }
    use opentelemetry_otlp::WithExportConfig as _;
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    // Passed explicitly so a bare `host:port` (no scheme) works as well as a URL.
    if let Some(endpoint) = OtelSettings::from_env(service_name).endpoint {
        let endpoint = if endpoint.contains("://") {
            endpoint
        } else {
            format!("http://{endpoint}")
        };
        builder = builder.with_endpoint(endpoint);
    }
    let exporter = builder
        .build()
        .map_err(|e| Error(format!("OTLP span exporter: {e}")))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.to_owned())
                .build(),
        )
        .build())
}

/// Assembles the subscriber [`init`] installs: a `fmt` layer (text or JSON, writing to `writer`)
/// filtered by `log_filter`, and — when a provider is given — a `tracing-opentelemetry` layer
/// filtered by its own filter. Exposed so tests can install it per thread with
/// `tracing::subscriber::set_default` and an in-memory span exporter.
pub fn build_subscriber<W>(
    format: LogFormat,
    log_filter: EnvFilter,
    traces: Option<(&SdkTracerProvider, EnvFilter)>,
    writer: W,
) -> impl Subscriber + Send + Sync + for<'a> LookupSpan<'a>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt_layer = match format {
        // Colour codes only when stderr is a terminal (not in files or log collectors).
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(writer)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .boxed(),
    };
    let otel_layer = traces.map(|(provider, filter)| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("janus"))
            .with_filter(filter)
    });
    Registry::default()
        .with(fmt_layer.with_filter(log_filter))
        .with(otel_layer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    fn settings(vars: &[(&str, &str)]) -> OtelSettings {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        OtelSettings::from_lookup("janus-test", |k| map.get(k).cloned())
    }

    #[test]
    fn export_is_off_without_an_endpoint() {
        let s = settings(&[]);
        assert_eq!(s.endpoint, None);
        assert_eq!(s.service_name, "janus-test");
        assert!(s.disabled_reason.is_some());
        assert_eq!(
            settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "  ")]).endpoint,
            None
        );
    }

    #[test]
    fn endpoint_and_service_name_come_from_the_standard_variables() {
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_SERVICE_NAME", "gw-canary"),
        ]);
        assert_eq!(s.endpoint.as_deref(), Some("http://collector:4317"));
        assert_eq!(s.service_name, "gw-canary");
        assert_eq!(s.disabled_reason, None);
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:4317"),
        ]);
        assert_eq!(
            s.endpoint.as_deref(),
            Some("http://b:4317"),
            "signal-specific wins"
        );
    }

    #[test]
    fn sdk_disabled_and_exporter_none_switch_export_off() {
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_SDK_DISABLED", "true"),
        ]);
        assert_eq!(s.endpoint, None);
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ]);
        assert_eq!(s.endpoint, None);
    }

    #[test]
    fn log_format_parses() {
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert_eq!("TEXT".parse::<LogFormat>().unwrap(), LogFormat::Text);
        assert!("xml".parse::<LogFormat>().is_err());
        assert_eq!(LogFormat::Json.to_string(), "json");
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_logs_are_one_object_per_line_with_span_fields() {
        let buf = Buf::default();
        let writer = buf.clone();
        let sub = build_subscriber(LogFormat::Json, EnvFilter::new("info"), None, move || {
            writer.clone()
        });
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("rpc", request_id = "req-7");
            let _e = span.enter();
            tracing::info!(tokens = 3, "finished");
            tracing::debug!("filtered out");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "{out}");
        let line = lines[0];
        assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
        assert!(line.contains(r#""message":"finished""#), "{line}");
        assert!(line.contains(r#""tokens":3"#), "{line}");
        assert!(line.contains(r#""request_id":"req-7""#), "{line}");
        assert!(line.contains(r#""level":"INFO""#), "{line}");
    }
}
