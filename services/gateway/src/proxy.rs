//! Forwarding: the gateway's implementation of `janus.v1.Understanding` and
//! `janus.v1.Generation`. A call goes to the less busy of two healthy backends (`pool`), is
//! retried once on another backend when it failed before any response message ([`retryable`]),
//! streams through with the caller's deadline, request id and trace context, and a backend lost
//! mid-stream ends it with UNAVAILABLE naming the backend.

use crate::affinity::conversation_key;
use crate::pool::{AffinityKey, Backend, Lease, Pool};
use crate::GatewayOptions;
use janus_proto::v1 as pb;
use janus_proto::v1::generation_client::GenerationClient;
use janus_proto::v1::generation_server::Generation;
use janus_proto::v1::understanding_client::UnderstandingClient;
use janus_proto::v1::understanding_server::Understanding;
use janus_service::stream::{forward, BoxStream};
use janus_service::{meta, status};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument as _;

/// What every clone of the gateway shares: the two backend pools and the forwarding limits.
pub(crate) struct Shared {
    pub(crate) und: Pool,
    pub(crate) gen: Pool,
    max_message_bytes: usize,
    idle_limit: Option<Duration>,
    abort: CancellationToken,
}

/// The gateway's implementation of both services.
#[derive(Clone)]
pub struct Gateway {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("understanding", &self.shared.und.backends().len())
            .field("generation", &self.shared.gen.backends().len())
            .finish()
    }
}

fn shutting_down() -> Status {
    Status::unavailable("the gateway is shutting down")
}

/// Full gRPC methods the gateway forwards (names of its client spans).
const UNDERSTAND: &str = "janus.v1.Understanding/Understand";
const UNDERSTANDING_INFO: &str = "janus.v1.Understanding/Info";
const GENERATE: &str = "janus.v1.Generation/Generate";
const GENERATION_INFO: &str = "janus.v1.Generation/Info";

/// Request-scoped facts the gateway forwards.
struct Call {
    /// Full gRPC method, the name of the client span of each attempt.
    method: &'static str,
    deadline: Option<Instant>,
    request_id: String,
    metadata: MetadataMap,
    /// Requests with the same key prefer the same backend ([`Balance::PrefixAffinity`]).
    affinity: Option<AffinityKey>,
}

impl Call {
    fn new<T>(req: &Request<T>, method: &'static str, body_id: &str) -> Self {
        let deadline = meta::grpc_timeout(req.metadata()).map(|d| Instant::now() + d);
        let request_id = meta::request_id(body_id, req.metadata());
        // The server span has the caller's `x-request-id`; a generated one is recorded here.
        tracing::Span::current().record("request_id", request_id.as_str());
        Self {
            method,
            deadline,
            request_id,
            metadata: req.metadata().clone(),
            affinity: None,
        }
    }

    /// An outgoing request with propagated metadata and the remaining deadline. Call it in the
    /// attempt's client span: its context goes out as `traceparent`.
    fn outgoing<T>(&self, body: T) -> Result<Request<T>, Status> {
        let mut r = Request::new(body);
        meta::propagate(&self.metadata, r.metadata_mut(), &self.request_id);
        // After `propagate` (which copies the caller's trace context): the current span, the
        // client span of this attempt, becomes the backend's parent.
        janus_telemetry::inject_context(r.metadata_mut());
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(status::deadline_status("waiting for a backend"));
            }
            r.set_timeout(left);
        }
        Ok(r)
    }
}

/// A backend's status as the gateway's answer: codes pass through; transport failures become
/// UNAVAILABLE naming the backend.
fn from_backend(kind: &str, b: &Backend, s: Status) -> Status {
    if is_lost(&s) {
        return Status::unavailable(format!(
            "{kind} backend {} is unavailable: {}",
            b.name(),
            s.message()
        ));
    }
    // Keep the code, message, details (`google.rpc.BadRequest`) and our own metadata (e.g.
    // `janus-field`); drop the backend's transport headers.
    let mut md = MetadataMap::new();
    for key in [status::FIELD_METADATA, meta::REQUEST_ID] {
        if let Some(v) = s.metadata().get(key) {
            md.insert(key, v.clone());
        }
    }
    Status::with_details_and_metadata(
        s.code(),
        s.message().to_string(),
        bytes::Bytes::copy_from_slice(s.details()),
        md,
    )
}

fn is_transport(s: &Status) -> bool {
    let m = s.message().to_ascii_lowercase();
    m.contains("transport")
        || m.contains("connect")
        || m.contains("connection")
        || m.contains("broken pipe")
        || m.contains("h2 protocol error")
        || m.contains("keep-alive")
        || m.contains("stream closed")
        || m.contains("reset")
}

/// The backend (or the connection to it) failed, as opposed to answering with a status.
fn is_lost(s: &Status) -> bool {
    s.code() == Code::Unavailable
        || (matches!(s.code(), Code::Unknown | Code::Internal | Code::Cancelled) && is_transport(s))
        || refused_by_connection(s)
}

/// CANCELLED made by the gateway's own HTTP/2 client (the status has a source error; a
/// backend's CANCELLED status has none): the request was not taken by the connection, e.g. it
/// raced the GOAWAY of a backend closing a connection at `--max-connection-age`. The backend
/// is fine and the channel re-dials: the call is resent, to the same backend if need be.
pub(crate) fn refused_by_connection(s: &Status) -> bool {
    s.code() == Code::Cancelled && std::error::Error::source(s).is_some()
}

/// Worth trying another backend when nothing was streamed yet: the backend is down, drains
/// or is overloaded.
fn retryable(s: &Status) -> bool {
    is_lost(s) || s.code() == Code::ResourceExhausted
}

impl Gateway {
    /// A gateway over the configured backends (no connection is made yet).
    pub fn new(opts: &GatewayOptions, abort: CancellationToken) -> anyhow::Result<Self> {
        let settings = opts.tuning.backend_settings(opts.backend_tls.clone());
        let idle = opts.tuning.stream_idle_timeout;
        Ok(Self {
            shared: Arc::new(Shared {
                und: Pool::new(
                    janus_proto::UNDERSTANDING_SERVICE,
                    "understanding",
                    &opts.understanding,
                    opts.tuning.balance,
                    settings.clone(),
                )?,
                gen: Pool::new(
                    janus_proto::GENERATION_SERVICE,
                    "generation",
                    &opts.generation,
                    opts.tuning.balance,
                    settings,
                )?,
                max_message_bytes: opts.server.max_message_bytes,
                idle_limit: (idle > 0.0).then(|| Duration::from_secs_f64(idle)),
                abort,
            }),
        })
    }

    /// Runs `attempt` on the policy's backend; when it fails before the backend sent anything
    /// (down, draining, overloaded, connection lost), once more on another eligible backend.
    /// Other statuses are the answer. Transport failures count against the backend's circuit
    /// breaker; a success closes it.
    async fn dispatch<T, F, Fut>(
        &self,
        pool: &Pool,
        call: &Call,
        mut attempt: F,
    ) -> Result<(T, Lease), Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let candidates = pool.candidates_for(call.affinity.as_ref());
        if candidates.is_empty() {
            return Err(Status::unavailable(pool.unavailable_message()));
        }
        let mut last = None;
        let mut order = candidates.into_iter();
        let mut next = order.next();
        let mut tries = 0;
        while let Some(b) = next.take() {
            tries += 1;
            let lease = Lease::new(b.clone());
            let span = janus_telemetry::client_span(call.method);
            span.record("server.address", b.url.as_str());
            // Built and polled in the span: `outgoing` injects it as the backend's parent.
            let fut = span
                .in_scope(|| attempt(b.channel.clone()))
                .instrument(span.clone());
            let res = match call.deadline {
                Some(d) => match tokio::time::timeout_at(d, fut).await {
                    Ok(r) => r,
                    Err(_) => {
                        janus_telemetry::record_client_status(&span, Code::DeadlineExceeded);
                        return Err(status::deadline_status("waiting for a backend"));
                    }
                },
                None => fut.await,
            };
            janus_telemetry::record_client_status(
                &span,
                res.as_ref().err().map_or(Code::Ok, Status::code),
            );
            match res {
                Ok(v) => {
                    b.record_success();
                    return Ok((v, lease));
                }
                Err(s) if retryable(&s) => {
                    let refused = refused_by_connection(&s);
                    if is_lost(&s) && !refused {
                        b.mark_unhealthy(s.message());
                        b.record_failure(s.message(), &pool.settings);
                    }
                    tracing::warn!(request_id = %call.request_id, backend = %b.name(), "backend failed before answering ({:?}): {}", s.code(), s.message());
                    last = Some(from_backend(pool.kind, &b, s));
                    if tries < 2 {
                        // Another backend; the same one again only when its connection
                        // refused the request (it re-dials).
                        next = order.next().or_else(|| refused.then(|| b.clone()));
                    }
                }
                Err(s) => {
                    b.record_success();
                    return Err(from_backend(pool.kind, &b, s));
                }
            }
        }
        Err(last.unwrap_or_else(|| Status::unavailable(pool.unavailable_message())))
    }

    /// One streaming call through the pool: the backend's first message is awaited inside the
    /// attempt (so a backend that fails before it is retried), then the stream is relayed.
    async fn stream_call<Req, Item, F, Fut>(
        &self,
        pool: &Pool,
        call: &Call,
        body: Req,
        open: F,
    ) -> Result<Response<BoxStream<Item>>, Status>
    where
        Req: Clone,
        Item: Send + 'static,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Streaming<Item>>, Status>>,
    {
        let ((first, rest), lease) = self
            .dispatch(pool, call, |ch| {
                let r = call.outgoing(body.clone());
                let opened = r.map(|r| open(ch, r));
                async move {
                    let mut stream = opened?.await?.into_inner();
                    let first = stream.message().await?;
                    Ok((first, stream))
                }
            })
            .await?;
        Ok(self.relay(pool, call, first, rest, lease))
    }

    /// One unary call through the pool.
    async fn unary_call<Req, Resp, F, Fut>(
        &self,
        pool: &Pool,
        call: &Call,
        body: Req,
        send: F,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Clone,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let (resp, _lease) = self
            .dispatch(pool, call, |ch| {
                let r = call.outgoing(body.clone());
                let sent = r.map(|r| send(ch, r));
                async move { sent?.await }
            })
            .await?;
        let mut out = Response::new(resp.into_inner());
        meta::set_request_id(out.metadata_mut(), &call.request_id);
        Ok(out)
    }

    /// Streams a backend response through, holding the backend lease until it ends. A failure
    /// of the backend mid-stream ends the stream with UNAVAILABLE naming it (and counts against
    /// its breaker); so does a stream idle for longer than `--stream-idle-timeout`.
    fn relay<T: Send + 'static>(
        &self,
        pool: &Pool,
        call: &Call,
        first: Option<T>,
        stream: Streaming<T>,
        lease: Lease,
    ) -> Response<BoxStream<T>> {
        let kind = pool.kind;
        let settings = pool.settings.clone();
        let backend = lease.backend().clone();
        let idle = self.shared.idle_limit;
        let rest: BoxStream<T> = match idle {
            None => Box::pin(stream),
            Some(limit) => {
                let name = backend.name();
                Box::pin(stream.timeout(limit).map(move |r| match r {
                    Ok(item) => item,
                    Err(_) => Err(Status::unavailable(format!(
                        "{kind} backend {name} sent nothing for {limit:?} (--stream-idle-timeout)"
                    ))),
                }))
            }
        };
        let mut failed = false;
        let source = tokio_stream::iter(first.map(Ok))
            .chain(rest)
            .map_while(move |item| {
                let _held = &lease;
                if failed {
                    return None;
                }
                Some(match item {
                    Ok(v) => Ok(v),
                    Err(s) => {
                        failed = true;
                        if is_lost(&s) {
                            backend.mark_unhealthy(s.message());
                            backend.record_failure(s.message(), &settings);
                            tracing::warn!(backend = %backend.name(), "{kind} backend lost mid-stream: {}", s.message());
                        }
                        Err(from_backend(kind, &backend, s))
                    }
                })
            });
        let mut resp = Response::new(forward(
            source,
            call.deadline,
            Some(self.shared.abort.clone()),
            shutting_down,
        ));
        meta::set_request_id(resp.metadata_mut(), &call.request_id);
        resp
    }

    fn und_client(&self, ch: Channel) -> UnderstandingClient<Channel> {
        let n = self.shared.max_message_bytes;
        UnderstandingClient::new(ch)
            .max_decoding_message_size(n)
            .max_encoding_message_size(n)
    }

    fn gen_client(&self, ch: Channel) -> GenerationClient<Channel> {
        let n = self.shared.max_message_bytes;
        GenerationClient::new(ch)
            .max_decoding_message_size(n)
            .max_encoding_message_size(n)
    }
}

#[tonic::async_trait]
impl Understanding for Gateway {
    type UnderstandStream = BoxStream<pb::UnderstandResponse>;

    async fn understand(
        &self,
        req: Request<pb::UnderstandRequest>,
    ) -> Result<Response<Self::UnderstandStream>, Status> {
        let mut call = Call::new(&req, UNDERSTAND, &req.get_ref().request_id);
        call.affinity = Some(conversation_key(req.get_ref()));
        let mut body = req.into_inner();
        body.request_id = call.request_id.clone();
        self.stream_call(&self.shared.und, &call, body, |ch, r| {
            let mut client = self.und_client(ch);
            async move { client.understand(r).await }
        })
        .await
    }

    async fn info(
        &self,
        req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let call = Call::new(&req, UNDERSTANDING_INFO, "");
        self.unary_call(&self.shared.und, &call, pb::InfoRequest {}, |ch, r| {
            let mut client = self.und_client(ch);
            async move { client.info(r).await }
        })
        .await
    }
}

#[tonic::async_trait]
impl Generation for Gateway {
    type GenerateStream = BoxStream<pb::GenerateResponse>;

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let call = Call::new(&req, GENERATE, &req.get_ref().request_id);
        let mut body = req.into_inner();
        body.request_id = call.request_id.clone();
        self.stream_call(&self.shared.gen, &call, body, |ch, r| {
            let mut client = self.gen_client(ch);
            async move { client.generate(r).await }
        })
        .await
    }

    async fn info(
        &self,
        req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let call = Call::new(&req, GENERATION_INFO, "");
        self.unary_call(&self.shared.gen, &call, pb::InfoRequest {}, |ch, r| {
            let mut client = self.gen_client(ch);
            async move { client.info(r).await }
        })
        .await
    }
}
