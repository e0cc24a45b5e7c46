//! Statuses for requests that never reach a handler: tonic answers a request body that is not
//! valid protobuf (truncated, a string that is not UTF-8, …) with INTERNAL and an oversized one
//! with OUT_OF_RANGE. Both are the client's doing: this layer turns them into
//! INVALID_ARGUMENT and RESOURCE_EXHAUSTED (gRPC's code for a message over the size limit),
//! with the reason kept in the message and `janus-field: request`.

use http::Response;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::{Code, Status};
use tower_layer::Layer;
use tower_service::Service;

/// Rewrites the status of trailers-only responses of undecodable or oversized requests.
pub fn fix_request_status<B>(mut response: Response<B>) -> Response<B> {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    let msg = status.message();
    let fixed = match status.code() {
        Code::Internal if msg.starts_with("failed to decode Protobuf message") => {
            crate::status::invalid_field(
                "request",
                format!("invalid request: {msg}"),
                "not a valid protobuf message of the method's request type",
            )
        }
        Code::OutOfRange if msg.contains("decoded message length too large") => {
            crate::status::field_status(
                Code::ResourceExhausted,
                "request",
                format!("request too large: {msg}"),
                "larger than the server's maximum message size (Info.limits)",
            )
        }
        _ => return response,
    };
    let headers = response.headers_mut();
    headers.remove(Status::GRPC_MESSAGE);
    let _ = fixed.add_header(headers);
    response
}

/// The layer applying [`fix_request_status`] to every response of a server.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestStatusLayer;

impl<S> Layer<S> for RequestStatusLayer {
    type Service = RequestStatus<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestStatus { inner }
    }
}

/// See [`RequestStatusLayer`].
#[derive(Debug, Clone)]
pub struct RequestStatus<S> {
    inner: S,
}

impl<S, Req, B> Service<Req> for RequestStatus<S>
where
    S: Service<Req, Response = Response<B>>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = RequestStatusFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        RequestStatusFuture {
            inner: self.inner.call(request),
        }
    }
}

pin_project! {
    /// Future of [`RequestStatus`].
    pub struct RequestStatusFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, B, E> Future for RequestStatusFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project()
            .inner
            .poll(cx)
            .map(|r| r.map(fix_request_status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(r: &Response<()>) -> Status {
        Status::from_header_map(r.headers()).unwrap()
    }

    #[test]
    fn decode_and_size_errors_become_client_errors() {
        let bad = Status::internal("failed to decode Protobuf message: invalid string value");
        let r = fix_request_status(bad.into_http::<()>());
        let s = status_of(&r);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message().contains("invalid string value"),
            "{}",
            s.message()
        );
        assert_eq!(
            r.headers().get(crate::status::FIELD_METADATA).unwrap(),
            "request"
        );
        let big = Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 4 bytes",
        );
        assert_eq!(
            status_of(&fix_request_status(big.into_http::<()>())).code(),
            Code::ResourceExhausted
        );
        // Anything else is left alone.
        let other = Status::internal("model failed");
        assert_eq!(
            status_of(&fix_request_status(other.into_http::<()>())).code(),
            Code::Internal
        );
        let ok = Response::new(());
        assert!(Status::from_header_map(fix_request_status(ok).headers()).is_none());
    }
}
