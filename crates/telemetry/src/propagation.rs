//! W3C trace context (`traceparent`, `tracestate`) and request ids over gRPC metadata.
//!
//! Server side: pass [`server_span`] to `tonic::transport::Server::builder().trace_fn(..)`; every
//! RPC then runs in a span named after its method whose parent is the caller's span.
//!
//! Client side (the gateway): make the outgoing call inside a span ([`client_span`]) and attach
//! the context, either per request (`Request::new(msg).with_trace_context()`, see
//! [`InjectContextExt`]) or for every call of a client
//! (`XClient::with_interceptor(channel, janus_telemetry::propagate_context)`).

use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry::Context;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Request id header, recorded on the server span and forwarded by the gateway.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest request id recorded or forwarded (longer ones are ignored).
const MAX_REQUEST_ID_LEN: usize = 128;

/// Reads text map entries from tonic metadata (ASCII keys only; binary `-bin` keys are skipped).
pub struct MetadataExtractor<'a>(pub &'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes text map entries into tonic metadata (entries that are not valid metadata are dropped).
pub struct MetadataInjector<'a>(pub &'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Reads text map entries from HTTP headers (what tonic's `trace_fn` sees).
pub struct HeaderExtractor<'a>(pub &'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Injects the context of the current `tracing` span into outgoing metadata.
pub fn inject_context(metadata: &mut MetadataMap) {
    inject_context_into(&Span::current().context(), metadata);
}

/// Injects `cx` into outgoing metadata with the global propagator (W3C after [`crate::init`]).
pub fn inject_context_into(cx: &Context, metadata: &mut MetadataMap) {
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(cx, &mut MetadataInjector(metadata))
    });
}

/// The remote parent carried by incoming metadata (an empty context when there is none).
pub fn extract_context(metadata: &MetadataMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)))
}

/// The remote parent carried by incoming HTTP headers.
pub fn extract_context_from_headers(headers: &HeaderMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// A tonic client interceptor injecting the current span's context into every request:
/// `XClient::with_interceptor(channel, janus_telemetry::propagate_context)`.
pub fn propagate_context(
    mut request: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    inject_context(request.metadata_mut());
    Ok(request)
}

/// Adds trace context to a single outgoing request.
pub trait InjectContextExt {
    /// Injects the current span's context into the request's metadata.
    fn with_trace_context(self) -> Self;
}

impl<T> InjectContextExt for tonic::Request<T> {
    fn with_trace_context(mut self) -> Self {
        inject_context(self.metadata_mut());
        self
    }
}

/// Copies `x-request-id` from an incoming request's metadata to an outgoing one (gateway).
pub fn copy_request_id(from: &MetadataMap, to: &mut MetadataMap) {
    if let Some(id) = from
        .get(REQUEST_ID_HEADER)
        .filter(|v| v.len() <= MAX_REQUEST_ID_LEN)
    {
        to.insert(REQUEST_ID_HEADER, id.clone());
    }
}

/// Splits a gRPC request path `/pkg.Service/Method` into (`pkg.Service`, `Method`).
pub(crate) fn split_path(path: &str) -> (&str, &str) {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    trimmed.rsplit_once('/').unwrap_or((trimmed, ""))
}

/// A tower layer giving every request its [`server_span`], entered while the response future
/// is polled (what tonic's `trace_fn` does, for servers that serve their own connections).
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerSpanLayer;

impl<S> tower_layer::Layer<S> for ServerSpanLayer {
    type Service = ServerSpan<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerSpan { inner }
    }
}

/// See [`ServerSpanLayer`].
#[derive(Debug, Clone)]
pub struct ServerSpan<S> {
    inner: S,
}

impl<S, B> tower_service::Service<http::Request<B>> for ServerSpan<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tracing::instrument::Instrumented<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let mut bare = http::Request::new(());
        *bare.method_mut() = req.method().clone();
        *bare.uri_mut() = req.uri().clone();
        *bare.version_mut() = req.version();
        *bare.headers_mut() = req.headers().clone();
        let span = server_span(&bare);
        tracing::Instrument::instrument(self.inner.call(req), span)
    }
}

/// The span for one incoming RPC, for `Server::builder().trace_fn(janus_telemetry::server_span)`.
///
/// Named (`otel.name`) after the full method, `pkg.Service/Method`, of kind server, with
/// `rpc.system`, `rpc.service`, `rpc.method`, `request_id` (from `x-request-id`) and `trace_id`
/// fields; its parent is the remote span in `traceparent` when there is one. `rpc.grpc.status_code`
/// and `otel.status_code` are declared empty and filled in by [`crate::MetricsLayer`].
pub fn server_span(request: &http::Request<()>) -> Span {
    let path = request.uri().path();
    let (service, method) = split_path(path);
    let full_method = path.strip_prefix('/').unwrap_or(path);
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID_LEN);
    let span = tracing::info_span!(
        target: "janus_telemetry::rpc",
        "grpc.server",
        otel.name = full_method,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        request_id = request_id,
        trace_id = tracing::field::Empty,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let parent = extract_context_from_headers(request.headers());
    let remote_trace = parent.span().span_context().clone();
    // Fails only when no OpenTelemetry layer is installed (export off): nothing to parent then.
    let _ = span.set_parent(parent);
    let own = span.context().span().span_context().trace_id();
    let trace_id = if own != opentelemetry::trace::TraceId::INVALID {
        Some(own)
    } else if remote_trace.is_valid() {
        Some(remote_trace.trace_id())
    } else {
        None
    };
    if let Some(trace_id) = trace_id {
        span.record("trace_id", tracing::field::display(trace_id));
    }
    span
}

/// A span for an outgoing RPC (gateway → service). Make the call inside it
/// (`.instrument(client_span(..))`) so the injected `traceparent` names it as the parent.
/// `server.address` (the backend) and the status ([`record_client_status`]) are recorded later.
pub fn client_span(full_method: &str) -> Span {
    let full_method = full_method.strip_prefix('/').unwrap_or(full_method);
    let (service, method) = split_path(full_method);
    tracing::info_span!(
        target: "janus_telemetry::rpc",
        "grpc.client",
        otel.name = full_method,
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        server.address = tracing::field::Empty,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// Records the outcome of an outgoing RPC on its [`client_span`]: `rpc.grpc.status_code`, and
/// `otel.status_code = "ERROR"` for every code but `OK` (client-side semantic conventions).
pub fn record_client_status(span: &Span, code: tonic::Code) {
    span.record("rpc.grpc.status_code", code as i64);
    if code != tonic::Code::Ok {
        span.record("otel.status_code", "ERROR");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            split_path("/janus.v1.Gen/Generate"),
            ("janus.v1.Gen", "Generate")
        );
        assert_eq!(split_path("/odd"), ("odd", ""));
    }

    #[test]
    fn metadata_round_trips_a_remote_context() {
        crate::install_propagator();
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = Context::new().with_remote_span_context(sc.clone());
        let mut md = MetadataMap::new();
        inject_context_into(&cx, &mut md);
        assert_eq!(
            md.get("traceparent").unwrap().to_str().unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let back = extract_context(&md);
        let got = back.span().span_context().clone();
        assert_eq!(got.trace_id(), sc.trace_id());
        assert_eq!(got.span_id(), sc.span_id());
        assert!(got.is_remote() && got.is_sampled());
    }

    #[test]
    fn request_id_is_copied_when_present_and_sane() {
        let mut from = MetadataMap::new();
        let mut to = MetadataMap::new();
        copy_request_id(&from, &mut to);
        assert!(to.get(REQUEST_ID_HEADER).is_none());
        from.insert(REQUEST_ID_HEADER, "abc-123".parse().unwrap());
        copy_request_id(&from, &mut to);
        assert_eq!(to.get(REQUEST_ID_HEADER).unwrap(), "abc-123");
        let mut to2 = MetadataMap::new();
        from.insert(REQUEST_ID_HEADER, "x".repeat(500).parse().unwrap());
        copy_request_id(&from, &mut to2);
        assert!(to2.get(REQUEST_ID_HEADER).is_none());
    }
}
