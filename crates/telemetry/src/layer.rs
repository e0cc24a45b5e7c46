//! A tower layer that counts every RPC of a tonic server by method and final status code.
//!
//! The status of a gRPC call is known only at its end: in the response headers for a
//! "trailers-only" reply (errors returned before any message), otherwise in the trailers after
//! the last message. The layer therefore wraps the response body and finishes its
//! [`RequestGuard`] when the trailers go out; a body dropped before that (client went away)
//! counts as `CANCELLED`, and so does a request dropped before any response (server timeout,
//! connection closed).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Code;
use tower_layer::Layer;
use tower_service::Service;

use crate::metrics::{Metrics, RequestGuard};

/// `Server::builder().layer(metrics.layer())`: counts requests, durations and in-flight RPCs
/// per method, and records the status code on the RPC's span (see [`crate::server_span`]).
#[derive(Clone, Debug)]
pub struct MetricsLayer {
    metrics: Metrics,
}

impl Metrics {
    /// The tower layer for a tonic server.
    pub fn layer(&self) -> MetricsLayer {
        MetricsLayer {
            metrics: self.clone(),
        }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`MetricsLayer`] wraps around a tonic router.
#[derive(Clone, Debug)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Metrics,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for MetricsService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<MetricsBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let guard = self.metrics.request_started(request.uri().path());
        ResponseFuture {
            inner: self.inner.call(request),
            guard: Some(guard),
        }
    }
}

pin_project! {
    /// Future of [`MetricsService`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        guard: Option<RequestGuard>,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<MetricsBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // tonic enters the `trace_fn` span while polling (not while calling) the service: pick
        // it up here so the status lands on it and it lives as long as the response stream.
        let guard = this
            .guard
            .take()
            .map(|g| g.with_span(tracing::Span::current()));
        let result = match this.inner.poll(cx) {
            Poll::Pending => {
                *this.guard = guard;
                return Poll::Pending;
            }
            Poll::Ready(result) => result,
        };
        let Some(guard) = guard else {
            panic!("ResponseFuture polled after completion");
        };
        match result {
            Ok(response) => {
                let guard = match status_in_headers(&response) {
                    // Trailers-only response: the status is final now.
                    Some(code) => {
                        guard.finish(code);
                        None
                    }
                    None => Some(guard),
                };
                Poll::Ready(Ok(response.map(|inner| MetricsBody { inner, guard })))
            }
            Err(e) => {
                guard.finish(Code::Unknown);
                Poll::Ready(Err(e))
            }
        }
    }
}

/// The final status when the response headers already carry it: `grpc-status` (trailers-only
/// reply), or a non-200 HTTP status mapped as in gRPC's "HTTP to gRPC status code mapping".
fn status_in_headers<B>(response: &Response<B>) -> Option<Code> {
    if let Some(code) = grpc_status(response.headers()) {
        return Some(code);
    }
    match response.status() {
        StatusCode::OK => None,
        StatusCode::BAD_REQUEST => Some(Code::Internal),
        StatusCode::UNAUTHORIZED => Some(Code::Unauthenticated),
        StatusCode::FORBIDDEN => Some(Code::PermissionDenied),
        StatusCode::NOT_FOUND => Some(Code::Unimplemented),
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Some(Code::Unavailable),
        _ => Some(Code::Unknown),
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|v| Code::from_bytes(v.as_bytes()))
}

pin_project! {
    /// Response body of [`MetricsService`]: forwards frames and finishes the request's count
    /// when the trailers pass (or the body ends or is dropped).
    pub struct MetricsBody<B> {
        #[pin]
        inner: B,
        guard: Option<RequestGuard>,
    }
}

impl<B: Body> Body for MetricsBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        // In the RPC's span: logs written while streaming carry its fields, and its
        // OpenTelemetry end time (the last exit) is the end of the stream, not the handler's
        // return.
        let span = this.guard.as_ref().map(|g| g.span().clone());
        let _entered = span.as_ref().map(|s| s.enter());
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(trailers) = f.trailers_ref() {
                    if let Some(guard) = this.guard.take() {
                        guard.finish(grpc_status(trailers).unwrap_or(Code::Unknown));
                    }
                }
            }
            // A body error aborts the stream without a status.
            Some(Err(_)) => {
                if let Some(guard) = this.guard.take() {
                    guard.finish(Code::Unknown);
                }
            }
            // Ended without trailers: not a well-formed gRPC response.
            None => {
                if let Some(guard) = this.guard.take() {
                    guard.finish(Code::Unknown);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
