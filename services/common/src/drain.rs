//! Draining: from the shutdown signal until the listener closes, a server keeps accepting
//! connections and answering — health says NOT_SERVING, reflection still works, and every new
//! RPC gets UNAVAILABLE ("draining") — while the RPCs already running finish. The listener
//! closes (tonic's graceful shutdown: no more connections, GOAWAY on open ones) once no RPC is
//! in flight or the grace period is over, whichever comes first ([`crate::server::spawn`]).
//!
//! Without this, tonic stops accepting at the signal itself: a readiness probe or a client
//! dialling then sees "connection refused", never the NOT_SERVING / UNAVAILABLE that tell it
//! to go elsewhere.

use http::{Request, Response};
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::Notify;
use tower_layer::Layer;
use tower_service::Service;

/// Paths that are served during the drain and not counted as in flight: health (the drain is
/// what it reports) and reflection (clients such as grpcurl need it to call health).
fn exempt(path: &str) -> bool {
    path.starts_with(crate::auth::HEALTH_PREFIX) || path.starts_with(crate::auth::REFLECTION_PREFIX)
}

/// The answer to new work while draining: UNAVAILABLE, so clients retry elsewhere.
pub fn refusal() -> tonic::Status {
    tonic::Status::unavailable(
        "the server is draining for shutdown and takes no new requests; retry on another replica",
    )
}

/// A server's drain state: whether it drains and how many RPCs are in flight. Cheap to clone
/// (shared).
#[derive(Debug, Clone, Default)]
pub struct Drain {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

impl Drain {
    /// Starts draining: new RPCs are refused from now on.
    pub fn start(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// Whether [`Drain::start`] was called.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// RPCs running now (health and reflection not counted).
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// Resolves when no RPC is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Counts one unit of work in flight until the returned guard (or the body it is moved
    /// into, [`InFlight::body`]) is dropped. The layer does this for every RPC; call it for
    /// work that does not pass the layer (the gateway's HTTP port), after checking
    /// [`Drain::is_draining`].
    pub fn enter(&self) -> InFlight {
        self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight {
            inner: self.inner.clone(),
        }
    }

    /// The tower layer refusing new RPCs while draining and counting the others.
    pub fn layer(&self) -> DrainLayer {
        DrainLayer {
            drain: self.clone(),
        }
    }
}

/// One RPC in flight; counted until its response body is dropped (the stream ended or the
/// client went away).
#[derive(Debug)]
pub struct InFlight {
    inner: Arc<Inner>,
}

impl InFlight {
    /// `inner` as a body that keeps this work counted until it is dropped.
    pub fn body<B>(self, inner: B) -> DrainBody<B> {
        DrainBody::new(inner, Some(self))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.inner.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

/// See [`Drain::layer`].
#[derive(Debug, Clone)]
pub struct DrainLayer {
    drain: Drain,
}

impl<S> Layer<S> for DrainLayer {
    type Service = DrainService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DrainService {
            inner,
            drain: self.drain.clone(),
        }
    }
}

/// The service [`DrainLayer`] wraps around a tonic router.
#[derive(Debug, Clone)]
pub struct DrainService<S> {
    inner: S,
    drain: Drain,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for DrainService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<DrainBody<ResBody>>;
    type Error = S::Error;
    type Future = DrainFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if exempt(request.uri().path()) {
            return DrainFuture::Inner {
                future: self.inner.call(request),
                guard: None,
            };
        }
        if self.drain.is_draining() {
            return DrainFuture::Refused {
                response: Some(refusal().into_http()),
            };
        }
        let guard = self.drain.enter();
        DrainFuture::Inner {
            future: self.inner.call(request),
            guard: Some(guard),
        }
    }
}

pin_project! {
    /// Future of [`DrainService`].
    #[project = DrainFutureProj]
    pub enum DrainFuture<F, B> {
        /// The request was let through (and is counted while `guard` lives).
        Inner { #[pin] future: F, guard: Option<InFlight> },
        /// Refused: the server drains.
        Refused { response: Option<Response<B>> },
    }
}

impl<F, B, E> Future for DrainFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<DrainBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            DrainFutureProj::Inner { future, guard } => match future.poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(r)) => {
                    let guard = guard.take();
                    Poll::Ready(Ok(r.map(|inner| DrainBody::new(inner, guard))))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            },
            DrainFutureProj::Refused { response } => Poll::Ready(Ok(response
                .take()
                .expect("DrainFuture polled after completion")
                .map(|inner| DrainBody::new(inner, None)))),
        }
    }
}

/// Response body of [`DrainService`]: the RPC counts as in flight until it is dropped.
pub type DrainBody<B> = crate::conn::GuardedBody<B, InFlight>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_and_refuses() {
        let drain = Drain::default();
        let mut svc = drain
            .layer()
            .layer(tower_service_fn(|_req: Request<()>| async {
                Ok::<_, std::convert::Infallible>(Response::new(String::from("ok")))
            }));
        let req = |p: &str| Request::builder().uri(p).body(()).unwrap();
        let a = svc
            .call(req("/janus.v1.Understanding/Understand"))
            .await
            .unwrap();
        assert_eq!(drain.in_flight(), 1);
        let h = svc.call(req("/grpc.health.v1.Health/Check")).await.unwrap();
        assert_eq!(drain.in_flight(), 1, "health is not counted");
        drain.start();
        let refused = svc
            .call(req("/janus.v1.Generation/Generate"))
            .await
            .unwrap();
        let status = tonic::Status::from_header_map(refused.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("draining"));
        assert_eq!(drain.in_flight(), 1);
        let h2 = svc.call(req("/grpc.health.v1.Health/Check")).await.unwrap();
        assert!(tonic::Status::from_header_map(h2.headers()).is_none());
        drop(h);
        let waiter = tokio::spawn({
            let d = drain.clone();
            async move { d.idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(drain.in_flight(), 0);
    }

    /// A tower service from a closure (tower's `service_fn` without the dependency).
    fn tower_service_fn<F, Fut>(f: F) -> FnService<F>
    where
        F: FnMut(Request<()>) -> Fut,
    {
        FnService(f)
    }

    struct FnService<F>(F);

    impl<F, Fut, R, E> Service<Request<()>> for FnService<F>
    where
        F: FnMut(Request<()>) -> Fut,
        Fut: Future<Output = Result<R, E>>,
    {
        type Response = R;
        type Error = E;
        type Future = Fut;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), E>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<()>) -> Fut {
            (self.0)(req)
        }
    }
}
