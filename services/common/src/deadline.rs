//! The caller's deadline (`grpc-timeout`) at the door of every gRPC server: a deadline that is
//! over on arrival (no longer than [`meta::DEADLINE_MARGIN`]) is answered at once, and one that
//! passes before the handler has answered ends the call; both with DEADLINE_EXCEEDED naming
//! the caller's deadline, a `BadRequest` violation on the field `grpc-timeout` for the first.
//! An unparsable `grpc-timeout` is INVALID_ARGUMENT on that field. Handlers still enforce the
//! deadline over the response stream themselves ([`crate::stream`]); they give up
//! [`meta::DEADLINE_MARGIN`] early, so their own, more specific answer wins the race.
//!
//! This replaces tonic's transport timer, which answers CANCELLED "Timeout expired".

use crate::meta;
use crate::status::field_status;
use http::{Request, Response};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::{Code, Status};
use tower_layer::Layer;
use tower_service::Service;

/// The metadata key, as a field name.
const FIELD: &str = "grpc-timeout";

/// What a request's `grpc-timeout` asks of this server.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// No deadline.
    None,
    /// Answer within this.
    Within(Duration),
    /// Refused before any work with this status.
    Refuse(Status),
}

/// Judges a request's `grpc-timeout` header value.
pub fn judge(value: Option<&http::HeaderValue>) -> Verdict {
    let Some(v) = value else {
        return Verdict::None;
    };
    let raw = v.to_str().unwrap_or("");
    match meta::parse_grpc_timeout(raw) {
        None => Verdict::Refuse(field_status(
            Code::InvalidArgument,
            FIELD,
            format!(
                "invalid grpc-timeout {:?}: expected 1 to 8 digits and a unit (H, M, S, m, u, n)",
                String::from_utf8_lossy(v.as_bytes())
            ),
            "not a gRPC timeout value",
        )),
        Some(d) if d <= meta::DEADLINE_MARGIN => Verdict::Refuse(field_status(
            Code::DeadlineExceeded,
            FIELD,
            format!(
                "the caller's deadline (grpc-timeout {raw}, {}) was over on arrival: this server \
                 needs more than {} ms to answer anything",
                human(d),
                meta::DEADLINE_MARGIN.as_millis()
            ),
            "deadline over on arrival",
        )),
        Some(d) => Verdict::Within(d),
    }
}

fn human(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

/// The status of a call whose deadline passed before the handler answered.
pub fn passed(raw: &str, d: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "the caller's deadline (grpc-timeout {raw}, {}) passed before the server answered",
        human(d)
    ))
}

/// The layer of [`Deadline`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline { inner }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
}

impl<S, ReqB, B> Service<Request<ReqB>> for Deadline<S>
where
    S: Service<Request<ReqB>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Default + Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let value = req.headers().get(FIELD);
        match judge(value) {
            Verdict::Refuse(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
            Verdict::None => Box::pin(self.inner.call(req)),
            Verdict::Within(d) => {
                // Only a valid value gets here: it is ASCII.
                let raw = value
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let fut = self.inner.call(req);
                Box::pin(async move {
                    // `timeout` polls the handler first: its own answer wins a tie.
                    match tokio::time::timeout(d, fut).await {
                        Ok(r) => r,
                        Err(_) => Ok(passed(&raw, d).into_http()),
                    }
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn verdicts() {
        assert!(matches!(judge(None), Verdict::None));
        assert!(matches!(
            judge(Some(&hv("20m"))),
            Verdict::Within(d) if d == Duration::from_millis(20)
        ));
        for over in ["0n", "1n", "1u", "1m", "2m"] {
            let Verdict::Refuse(s) = judge(Some(&hv(over))) else {
                panic!("{over} not refused");
            };
            assert_eq!(s.code(), Code::DeadlineExceeded, "{over}");
            assert!(s.message().contains("over on arrival"), "{}", s.message());
            assert!(s.message().contains(over), "{}", s.message());
        }
        for bad in ["", "5", "123456789S", "1x", "-1S"] {
            let Verdict::Refuse(s) = judge(Some(&hv(bad))) else {
                panic!("{bad:?} not refused");
            };
            assert_eq!(s.code(), Code::InvalidArgument, "{bad:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_handler_gets_deadline_exceeded_naming_the_callers_deadline() {
        let slow = tower::service_fn(|_req: Request<()>| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, std::convert::Infallible>(Response::new(String::from("late")))
        });
        let mut svc = DeadlineLayer.layer(slow);
        let mut req = Request::new(());
        req.headers_mut().insert(FIELD, hv("20m"));
        let resp = svc.call(req).await.unwrap();
        let s = Status::from_header_map(resp.headers()).unwrap();
        assert_eq!(s.code(), Code::DeadlineExceeded);
        assert!(s.message().contains("grpc-timeout 20m"), "{}", s.message());
        // Without a deadline the handler answers.
        let resp = svc.call(Request::new(())).await.unwrap();
        assert_eq!(resp.body(), "late");
    }
}
