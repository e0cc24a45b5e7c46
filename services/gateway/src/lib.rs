//! The gateway: the one public endpoint. It holds no model; it forwards `janus.v1.Understanding`
//! and `janus.v1.Generation` calls to backends discovered from their targets (DNS names are
//! re-resolved: one channel per address), balanced by least outstanding streams (power of two
//! choices) with a circuit breaker per backend, health-checks them with `grpc.health.v1`,
//! retries a call that failed before any response message once on another backend, streams
//! responses through, propagates `x-request-id` (generated when absent) and W3C trace context,
//! enforces `grpc-timeout` deadlines and turns backend failures into clear statuses (a backend
//! lost mid-stream: UNAVAILABLE naming it).

pub mod discovery;
pub mod http;
mod openai;
pub mod pool;

use discovery::Resolver;
use janus_proto::v1 as pb;
use janus_proto::v1::generation_client::GenerationClient;
use janus_proto::v1::generation_server::{Generation, GenerationServer};
use janus_proto::v1::understanding_client::UnderstandingClient;
use janus_proto::v1::understanding_server::{Understanding, UnderstandingServer};
use janus_service::stream::{forward, BoxStream};
use janus_service::{meta, server, status, Lifecycle, Running, ServerOptions};
pub use pool::BackendSettings;
pub use pool::Balance;
use pool::{Backend, Lease, Pool};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_health::pb::health_check_response::ServingStatus as PbServing;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::Instrument as _;

/// Discovery, balancing, health-checking and failure knobs (shared by `janus-gateway` and
/// `janus serve`).
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayTuning {
    /// How a backend is picked for each request: least-outstanding (power of two choices over
    /// streams in flight) or round-robin.
    #[arg(long, env = "JANUS_BALANCE", value_enum, default_value_t = Balance::LeastOutstanding)]
    pub balance: Balance,
    /// Seconds between grpc.health.v1 checks of each backend.
    #[arg(long, env = "JANUS_HEALTH_INTERVAL", default_value_t = 2.0)]
    pub health_interval: f64,
    /// Seconds to wait for a TCP/HTTP2 connection to a backend.
    #[arg(long, env = "JANUS_CONNECT_TIMEOUT", default_value_t = 2.0)]
    pub connect_timeout: f64,
    /// Seconds between DNS re-resolutions of backend names (a headless Service's pods).
    #[arg(long, env = "JANUS_RESOLVE_INTERVAL", default_value_t = 5.0)]
    pub resolve_interval: f64,
    /// DNS server (ip:port) to resolve backend names with, instead of /etc/resolv.conf.
    #[arg(long, env = "JANUS_DNS_SERVER")]
    pub dns_server: Option<std::net::SocketAddr>,
    /// Seconds between HTTP/2 PINGs on backend connections (also while streams are open).
    #[arg(long, env = "JANUS_BACKEND_KEEPALIVE", default_value_t = 5.0)]
    pub backend_keepalive: f64,
    /// Seconds a PING may go unanswered before the connection and its streams fail with
    /// UNAVAILABLE (a frozen backend is detected within keepalive + this).
    #[arg(long, env = "JANUS_BACKEND_KEEPALIVE_TIMEOUT", default_value_t = 5.0)]
    pub backend_keepalive_timeout: f64,
    /// Seconds a forwarded stream may go without a message before it ends with UNAVAILABLE
    /// (0 = no limit; a long prefill sends nothing until its first token).
    #[arg(long, env = "JANUS_STREAM_IDLE_TIMEOUT", default_value_t = 0.0)]
    pub stream_idle_timeout: f64,
    /// Consecutive failed calls that eject a backend (circuit breaker).
    #[arg(long, env = "JANUS_EJECT_AFTER", default_value_t = 3)]
    pub eject_after: u32,
    /// Longest ejection in seconds (the first is 1 s, doubling while failures go on).
    #[arg(long, env = "JANUS_MAX_EJECTION", default_value_t = 30.0)]
    pub max_ejection: f64,
}

impl Default for GatewayTuning {
    fn default() -> Self {
        Self {
            balance: Balance::LeastOutstanding,
            health_interval: 2.0,
            connect_timeout: 2.0,
            resolve_interval: 5.0,
            dns_server: None,
            backend_keepalive: 5.0,
            backend_keepalive_timeout: 5.0,
            stream_idle_timeout: 0.0,
            eject_after: 3,
            max_ejection: 30.0,
        }
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.01))
}

impl GatewayTuning {
    /// Channel and breaker settings of every backend.
    pub fn backend_settings(
        &self,
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> BackendSettings {
        BackendSettings {
            connect_timeout: secs(self.connect_timeout),
            keepalive_interval: secs(self.backend_keepalive),
            keepalive_timeout: secs(self.backend_keepalive_timeout),
            tls,
            eject_after: self.eject_after.max(1),
            base_ejection: Duration::from_secs(1).min(secs(self.max_ejection)),
            max_ejection: secs(self.max_ejection),
        }
    }
}

/// What the gateway forwards to.
#[derive(Debug, Clone, Default)]
pub struct GatewayOptions {
    /// Understanding backend addresses (`host:port` or `http://host:port`).
    pub understanding: Vec<String>,
    /// Generation backend addresses.
    pub generation: Vec<String>,
    /// Balancing and health checks.
    pub tuning: GatewayTuning,
    /// Message limits and grace period; TLS and API keys of the public port.
    pub server: ServerOptions,
    /// TLS to the backends (CA, client certificate for mTLS, name override): used for
    /// `https://` addresses and for `host:port` ones (`http://` stays plaintext).
    pub backend_tls: Option<tonic::transport::ClientTlsConfig>,
}

struct Shared {
    und: Pool,
    gen: Pool,
    max_message_bytes: usize,
    idle_limit: Option<Duration>,
    abort: CancellationToken,
}

/// The gateway's implementation of both services.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
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
    match s.code() {
        _ => {
            // Keep the code, message, details (`google.rpc.BadRequest`) and our own metadata
            // (e.g. `janus-field`); drop the backend's transport headers.
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
    }
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
fn refused_by_connection(s: &Status) -> bool {
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
        let candidates = pool.candidates();
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
        let call = Call::new(&req, UNDERSTAND, &req.get_ref().request_id);
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

/// One health check of a backend.
async fn check(b: &Backend, service: &str, timeout: Duration) -> Result<(), String> {
    let mut client = HealthClient::new(b.channel.clone());
    let req = HealthCheckRequest {
        service: service.to_string(),
    };
    let mut res = tokio::time::timeout(timeout, client.check(req.clone())).await;
    if matches!(&res, Ok(Err(s)) if refused_by_connection(s)) {
        // Raced a connection the backend is closing (its maximum age): ask again.
        res = tokio::time::timeout(timeout, client.check(req)).await;
    }
    match res {
        Err(_) => Err(format!("health check timed out after {timeout:?}")),
        Ok(Err(s)) => Err(format!(
            "health check failed: {} ({:?})",
            s.message(),
            s.code()
        )),
        Ok(Ok(r)) if r.get_ref().status == PbServing::Serving as i32 => Ok(()),
        Ok(Ok(r)) => Err(format!(
            "health status {:?}",
            PbServing::try_from(r.get_ref().status).unwrap_or(PbServing::Unknown)
        )),
    }
}

/// Checks every backend of a pool once and sets the gateway's health status for the service
/// (SERVING while any backend is healthy).
async fn check_round(
    shared: &Shared,
    which: fn(&Shared) -> &Pool,
    health: &HealthReporter,
    timeout: Duration,
) {
    let pool = which(shared);
    let backends = pool.backends();
    let checks = backends.iter().map(|b| async move {
        match check(b, pool.service, timeout).await {
            Ok(()) => b.mark_healthy(),
            Err(e) => b.mark_unhealthy(&e),
        }
    });
    futures_join(checks).await;
    let any = backends.iter().any(|b| b.healthy() && !b.ejected());
    let st = if any {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status(pool.service, st).await;
}

/// Repeats [`check_round`] every `interval` until `stop`.
fn spawn_health_checks(
    shared: Arc<Shared>,
    which: fn(&Shared) -> &Pool,
    health: HealthReporter,
    interval: Duration,
    timeout: Duration,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.cancelled() => return,
            }
            tokio::select! {
                _ = check_round(&shared, which, &health, timeout) => {}
                _ = stop.cancelled() => return,
            }
        }
    });
}

/// Re-resolves the pool's backend names every `interval` until `stop`.
fn spawn_discovery(
    shared: Arc<Shared>,
    which: fn(&Shared) -> &Pool,
    resolver: Resolver,
    interval: Duration,
    stop: CancellationToken,
) {
    if !which(&shared).has_names() {
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.cancelled() => return,
            }
            tokio::select! {
                _ = which(&shared).refresh(&resolver) => {}
                _ = stop.cancelled() => return,
            }
        }
    });
}

/// Runs futures concurrently to completion (a tiny `join_all`).
async fn futures_join<F: Future<Output = ()>>(futs: impl Iterator<Item = F>) {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut pending: Vec<_> = set.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for slot in pending.iter_mut() {
            if let Some(f) = slot {
                if f.as_mut().poll(cx).is_ready() {
                    *slot = None;
                } else {
                    done = false;
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// Serves both services (forwarded), health and reflection on `listener`.
pub async fn serve(
    opts: GatewayOptions,
    listener: TcpListener,
    life: Lifecycle,
) -> anyhow::Result<Running> {
    Ok(serve_with_http(opts, listener, None, life).await?.0)
}

/// The HTTP port of [`serve_with_http`]: where, and with which options.
#[derive(Debug)]
pub struct HttpPort {
    /// The bound listener.
    pub listener: TcpListener,
    /// Image fetching.
    pub options: http::HttpOptions,
}

/// [`serve`], plus the OpenAI-compatible HTTP port ([`http`]) over the same gateway when
/// `http` is given: same keys, TLS certificate, limits and metrics as the gRPC port. The HTTP
/// port closes to new connections when `life.shutdown` fires.
pub async fn serve_with_http(
    opts: GatewayOptions,
    listener: TcpListener,
    http: Option<HttpPort>,
    life: Lifecycle,
) -> anyhow::Result<(Running, Option<http::HttpRunning>)> {
    let gateway = Gateway::new(&opts, life.abort.clone())?;
    // Built first: a TLS file problem fails before anything is served.
    let http_running = match http {
        Some(port) => Some(http::spawn(
            gateway.clone(),
            &opts.server,
            port.options,
            port.listener,
            life.clone(),
        )?),
        None => None,
    };
    let (health, health_svc) = tonic_health::server::health_reporter();
    let n = opts.server.max_message_bytes;
    let router =
        server::add_reflection(server::builder(&opts.server, &life)?.add_service(health_svc))?
            .add_service(
                UnderstandingServer::new(gateway.clone())
                    .max_decoding_message_size(n)
                    .max_encoding_message_size(n),
            )
            .add_service(
                GenerationServer::new(gateway.clone())
                    .max_decoding_message_size(n)
                    .max_encoding_message_size(n),
            );
    // The gateway itself is up; per-service status follows the backends' health.
    health.set_service_status("", ServingStatus::Serving).await;
    let interval = Duration::from_secs_f64(opts.tuning.health_interval.max(0.05));
    let timeout =
        Duration::from_secs_f64(opts.tuning.connect_timeout.max(0.05)) + Duration::from_secs(1);
    // Names resolved and a first health round before serving, so answers are right from the
    // start.
    let resolver = match opts.tuning.dns_server {
        Some(addr) => Resolver::nameserver(addr),
        None => Resolver::system(),
    };
    tokio::join!(
        gateway.shared.und.refresh(&resolver),
        gateway.shared.gen.refresh(&resolver),
    );
    let every = secs(opts.tuning.resolve_interval);
    spawn_discovery(
        gateway.shared.clone(),
        |s| &s.und,
        resolver.clone(),
        every,
        life.shutdown.clone(),
    );
    spawn_discovery(
        gateway.shared.clone(),
        |s| &s.gen,
        resolver,
        every,
        life.shutdown.clone(),
    );
    tokio::join!(
        check_round(&gateway.shared, |s| &s.und, &health, timeout),
        check_round(&gateway.shared, |s| &s.gen, &health, timeout),
    );
    spawn_health_checks(
        gateway.shared.clone(),
        |s| &s.und,
        health.clone(),
        interval,
        timeout,
        life.shutdown.clone(),
    );
    spawn_health_checks(
        gateway.shared.clone(),
        |s| &s.gen,
        health.clone(),
        interval,
        timeout,
        life.shutdown.clone(),
    );
    let running = server::spawn(
        router,
        listener,
        health,
        vec![
            janus_proto::UNDERSTANDING_SERVICE,
            janus_proto::GENERATION_SERVICE,
        ],
        &opts.server,
        life,
    )?;
    Ok((running, http_running))
}

/// Command-line arguments of `janus-gateway` / `janus gateway`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "JANUS_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Understanding backends, comma-separated host:port or URLs.
    #[arg(long, env = "JANUS_UNDERSTANDING_BACKENDS", value_delimiter = ',')]
    pub understanding_backends: Vec<String>,
    /// Generation backends, comma-separated host:port or URLs.
    #[arg(long, env = "JANUS_GENERATION_BACKENDS", value_delimiter = ',')]
    pub generation_backends: Vec<String>,
    #[command(flatten)]
    pub tuning: GatewayTuning,
    #[command(flatten)]
    pub server: janus_service::flags::ServerFlags,
    #[command(flatten)]
    pub backend_tls: BackendTlsFlags,
    /// Address of the OpenAI-compatible HTTP port (/v1/chat/completions,
    /// /v1/images/generations, /v1/models, /openapi.json, playground at /), e.g. 127.0.0.1:8000
    /// (off when not given; `off` turns it off). Same API keys and TLS certificate as --listen.
    #[arg(long, env = "JANUS_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    #[command(flatten)]
    pub http: http::HttpFlags,
}

/// TLS from the gateway to its backends.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct BackendTlsFlags {
    /// PEM CA of the backends' certificates: backends are reached over TLS (`host:port` means
    /// `https://`; without this flag only `https://` addresses use TLS, with the system's roots).
    #[arg(long, env = "JANUS_BACKEND_CA")]
    pub backend_ca: Option<std::path::PathBuf>,
    /// PEM client certificate the gateway presents to the backends (mTLS; needs --backend-tls-key).
    #[arg(long, env = "JANUS_BACKEND_TLS_CERT")]
    pub backend_tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --backend-tls-cert.
    #[arg(long, env = "JANUS_BACKEND_TLS_KEY")]
    pub backend_tls_key: Option<std::path::PathBuf>,
    /// Name the backends' certificates are checked against instead of each address's host.
    #[arg(long, env = "JANUS_BACKEND_TLS_DOMAIN")]
    pub backend_tls_domain: Option<String>,
}

impl BackendTlsFlags {
    /// The client TLS configuration; `None` when no backend TLS flag is given.
    pub fn config(&self) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
        if self.backend_ca.is_none()
            && self.backend_tls_cert.is_none()
            && self.backend_tls_key.is_none()
            && self.backend_tls_domain.is_none()
        {
            return Ok(None);
        }
        janus_service::tls::client_config(
            self.backend_ca.as_deref(),
            self.backend_tls_cert.as_deref(),
            self.backend_tls_key.as_deref(),
            self.backend_tls_domain.as_deref(),
        )
        .map(Some)
    }
}

/// Serves until SIGTERM/ctrl-c, then shuts down gracefully.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.understanding_backends.is_empty() && args.generation_backends.is_empty() {
        anyhow::bail!("no backends: pass --understanding-backends and/or --generation-backends");
    }
    let server_options = args.server.secure_options("janus-gateway")?;
    let backend_tls = args.backend_tls.config()?;
    args.server.serve_metrics(&server_options.metrics).await?;
    let listener = server::bind(&args.listen).await?;
    let http_port = match args.http_listen.as_deref().and_then(http::listen_addr) {
        Some(addr) => Some(HttpPort {
            listener: server::bind(addr).await?,
            options: args.http.options(),
        }),
        None => None,
    };
    let life = Lifecycle::new();
    let (running, http_running) = serve_with_http(
        GatewayOptions {
            understanding: args.understanding_backends,
            generation: args.generation_backends,
            tuning: args.tuning,
            server: server_options,
            backend_tls,
        },
        listener,
        http_port,
        life.clone(),
    )
    .await?;
    if let Some(h) = &http_running {
        // A stable line for scripts and tests (the port may have been chosen by the OS).
        eprintln!("janus: http api on {} (playground: {}/)", h.url(), h.url());
    }
    tracing::info!("janus gateway listening on {}", running.local_addr());
    args.server.serve_health(&running).await?;
    server::spawn_signal_handler(
        life,
        std::time::Duration::from_secs_f64(args.server.grace_period.max(0.0)),
    );
    running.wait().await
}
