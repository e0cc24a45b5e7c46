//! Serving connections: the one accept loop and connection driver of every listening port
//! (the gRPC ports of the gateway and the model services, the plaintext health port, the
//! gateway's HTTP port). Everything a single connection may hold is bounded here:
//!
//! - every accepted socket gets `TCP_NODELAY` (without it a streamed message waits for the
//!   peer's delayed ACK: ≈ 40 ms before the first message of every response);
//! - HTTP/2: `SETTINGS_MAX_CONCURRENT_STREAMS` and `SETTINGS_MAX_HEADER_LIST_SIZE` advertised
//!   and enforced (streams beyond the limit are refused with `REFUSED_STREAM`; a header list
//!   over the limit fails its own stream with 431, up to h2's abuse limit of four times it),
//!   keepalive pings (a peer that stops answering is dropped);
//! - request bodies still being received on a connection may hold at most
//!   [`ConnLimits::max_buffered_request_bytes`] together — on gRPC ports counted by the
//!   lengths the messages declare, which the decoder reserves up front (a client that declares
//!   16 MiB messages and sends five bytes of each cannot make the server reserve gigabytes);
//!   and all connections of a port [`ConnLimits::max_buffered_request_bytes_total`]; a body
//!   that stalls for [`ConnLimits::request_read_timeout`] fails;
//! - timeouts: the TLS handshake ([`crate::tls::HANDSHAKE_TIMEOUT`]), the HTTP/2 connection
//!   preface or the first byte of an HTTP/1 request ([`ConnLimits::preface_timeout`]), HTTP/1
//!   request headers ([`ConnLimits::request_read_timeout`], also the HTTP/1 keep-alive idle
//!   limit), and a connection with no request in flight ([`ConnLimits::idle_timeout`]: GOAWAY,
//!   then close);
//! - a maximum connection age (GOAWAY at the age, closed at age + grace), for rebalancing;
//! - when descriptors run out (`EMFILE`/`ENFILE`) the accept loop backs off (10 ms doubling to
//!   1 s) instead of spinning, and [`raise_fd_limit`] lifts the soft descriptor limit to the
//!   hard one at start.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use pin_project_lite::pin_project;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

/// Boxed error of bodies and services.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What one connection may hold and how long it may take; the same on every port.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnLimits {
    /// HTTP/2 streams one connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_concurrent_streams: u32,
    /// Largest request header list in bytes (`SETTINGS_MAX_HEADER_LIST_SIZE`; HTTP/1 too).
    pub max_header_list_bytes: u32,
    /// Bytes of request bodies a connection may have received for requests whose bodies have
    /// not ended yet, all streams together.
    pub max_buffered_request_bytes: usize,
    /// The same for all connections of the port together.
    pub max_buffered_request_bytes_total: usize,
    /// From accept (after the TLS handshake) to the HTTP/2 connection preface, or to the first
    /// byte of an HTTP/1 request.
    pub preface_timeout: Duration,
    /// Longest silence while a request's headers (HTTP/1) or body (both) are being received;
    /// also how long an HTTP/1 keep-alive connection may wait for its next request.
    pub request_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/2: GOAWAY first).
    pub idle_timeout: Duration,
    /// Interval of HTTP/2 keepalive pings.
    pub keepalive_interval: Duration,
    /// A ping not acknowledged within this closes the connection.
    pub keepalive_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 128,
            max_header_list_bytes: 16 * 1024,
            max_buffered_request_bytes: 64 << 20,
            max_buffered_request_bytes_total: 256 << 20,
            preface_timeout: Duration::from_secs(10),
            request_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// Which protocols a port speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocols {
    /// gRPC: HTTP/2 only; request bodies are gRPC messages, whose declared lengths count
    /// against the buffer budget as soon as their 5-byte prefix arrives (a decoder reserves
    /// that much at once).
    Grpc,
    /// HTTP/1.1 and HTTP/2 (the HTTP port); request body bytes count as they arrive.
    Http,
}

/// How a port serves its connections.
#[derive(Debug, Clone)]
pub struct ConnOptions {
    /// Limits and timeouts.
    pub limits: ConnLimits,
    /// Protocols spoken.
    pub protocols: Protocols,
    /// TLS (rustls); `None`: plaintext.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Maximum connection age and the grace after it: GOAWAY at the age, closed at age + grace.
    pub max_age: Option<(Duration, Duration)>,
}

/// The request body handed to services: the connection's body with the stall timeout and the
/// connection's buffer budget applied.
pub type RequestBody = ReadBody<hyper::body::Incoming>;

/// Serves `listener` until `close` fires (then stops accepting, asks every connection to finish
/// gracefully — HTTP/2 GOAWAY — and resolves once all have ended); `abort` drops the connections
/// still open at once. `service` is cloned per request.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    opts: ConnOptions,
    close: CancellationToken,
    abort: CancellationToken,
) where
    S: Service<http::Request<RequestBody>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let tracker = TaskTracker::new();
    let local = listener.local_addr().ok();
    let port_buffered = Arc::new(AtomicUsize::new(0));
    let mut backoff = Backoff::default();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => { backoff.reset(); c }
                Err(e) => { backoff.wait(&e, local).await; continue; }
            },
            _ = close.cancelled() => break,
        };
        let _ = tcp.set_nodelay(true);
        let (service, opts) = (service.clone(), opts.clone());
        let (close, abort) = (close.clone(), abort.clone());
        let port_buffered = port_buffered.clone();
        tracker.spawn(async move {
            let info = ConnInfo { local, peer };
            match opts.tls.clone() {
                None => drive(tcp, info, service, &opts, port_buffered, close, abort).await,
                Some(cfg) => {
                    let accept = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp);
                    match tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, accept).await {
                        Ok(Ok(tls)) => {
                            drive(tls, info, service, &opts, port_buffered, close, abort).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// The addresses of a connection, in every request's extensions as tonic's `TcpConnectInfo`.
#[derive(Debug, Clone, Copy)]
struct ConnInfo {
    local: Option<SocketAddr>,
    peer: SocketAddr,
}

/// Backing off from failed accepts: descriptor exhaustion is not cured by retrying at once.
#[derive(Debug, Default)]
struct Backoff {
    delay: Duration,
    failures: u64,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    fn reset(&mut self) {
        if self.failures > 0 {
            tracing::info!(
                failures = self.failures,
                "accepting connections again after {} failed accepts",
                self.failures
            );
        }
        *self = Self::default();
    }

    async fn wait(&mut self, e: &std::io::Error, local: Option<SocketAddr>) {
        self.failures += 1;
        self.delay = (self.delay * 2).clamp(Self::FIRST, Self::MAX);
        // Once per doubling and then once a second at most: never a log line per failure.
        if self.failures.is_power_of_two() || self.delay == Self::MAX {
            tracing::warn!(
                addr = ?local,
                failures = self.failures,
                "accept failed ({e}); retrying in {:?}{}",
                self.delay,
                if is_fd_exhaustion(e) {
                    " (out of file descriptors: raise `ulimit -n` or lower the connection count)"
                } else {
                    ""
                }
            );
        }
        tokio::time::sleep(self.delay).await;
    }
}

fn is_fd_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Serves one connection until it ends, is idle too long, outlives its age plus grace, or
/// `abort` fires; from `close` (or its age, or idleness) it finishes gracefully.
async fn drive<I, S, B>(
    io: I,
    info: ConnInfo,
    service: S,
    opts: &ConnOptions,
    port_buffered: Arc<AtomicUsize>,
    close: CancellationToken,
    abort: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<http::Request<RequestBody>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let limits = &opts.limits;
    let activity = Arc::new(Activity::new());
    let tracked = Tracked {
        inner: service,
        activity: activity.clone(),
        info,
        read_timeout: limits.request_read_timeout,
        budget: Budget {
            activity: activity.clone(),
            max: limits.max_buffered_request_bytes,
            port: port_buffered,
            max_port: limits.max_buffered_request_bytes_total,
        },
        grpc: opts.protocols == Protocols::Grpc,
    };
    let builder = builder(opts);
    let io = PrefaceIo::new(io, limits.preface_timeout);
    let conn = builder
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(tracked))
        .into_owned();
    tokio::pin!(conn);
    let started = Instant::now();
    let (age_at, closed_at) = match opts.max_age {
        Some((age, grace)) => (Some(started + age), Some(started + age + grace)),
        None => (None, None),
    };
    let mut finishing = false;
    loop {
        let idle_check = activity.idle_deadline(limits.idle_timeout);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(peer = %info.peer, "connection ended: {e}");
                }
                return;
            }
            _ = tokio::time::sleep_until(idle_check), if !finishing => {
                if activity.idle_for() >= limits.idle_timeout {
                    tracing::debug!(peer = %info.peer, "closing a connection idle for {:?}", limits.idle_timeout);
                    conn.as_mut().graceful_shutdown();
                    finishing = true;
                }
            }
            _ = sleep_until_opt(age_at), if !finishing => {
                tracing::debug!(peer = %info.peer, "connection reached its maximum age: GOAWAY");
                conn.as_mut().graceful_shutdown();
                finishing = true;
            }
            _ = sleep_until_opt(closed_at) => {
                tracing::debug!(peer = %info.peer, "connection past its maximum age and grace: closing it");
                return;
            }
            _ = close.cancelled(), if !finishing => {
                conn.as_mut().graceful_shutdown();
                finishing = true;
            }
            _ = abort.cancelled() => return,
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The hyper connection builder of `opts`.
fn builder(opts: &ConnOptions) -> auto::Builder<TokioExecutor> {
    let l = &opts.limits;
    let mut b = auto::Builder::new(TokioExecutor::new());
    if opts.protocols == Protocols::Grpc {
        b = b.http2_only();
    }
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(l.request_read_timeout)
        .max_buf_size((l.max_header_list_bytes as usize).max(8192));
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(l.max_concurrent_streams)
        .max_header_list_size(l.max_header_list_bytes)
        .keep_alive_interval(l.keepalive_interval)
        .keep_alive_timeout(l.keepalive_timeout);
    b
}

/// Requests in flight on one connection, and since when none has been.
#[derive(Debug)]
struct Activity {
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
    /// Request body bytes received for bodies that have not ended yet.
    buffered: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            buffered: AtomicUsize::new(0),
        }
    }

    fn enter(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(self.clone())
    }

    /// How long no request has been in flight (zero while one is).
    fn idle_for(&self) -> Duration {
        if self.active.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        self.idle_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    /// When to look again: when the idle period would reach `timeout`, or a `timeout` from now
    /// while requests are in flight.
    fn idle_deadline(&self, timeout: Duration) -> Instant {
        if self.active.load(Ordering::SeqCst) > 0 {
            return Instant::now() + timeout;
        }
        *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) + timeout
    }
}

/// One request in flight on a connection, until its response body is done.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Activity>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut since = self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            *since = Instant::now();
        }
    }
}

/// The per-connection service: counts requests in flight (until their response bodies are
/// done), wraps request bodies in [`ReadBody`] and adds the connection's addresses.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    info: ConnInfo,
    read_timeout: Duration,
    /// The connection's and the port's budgets, shared by its request bodies.
    budget: Budget,
    grpc: bool,
}

impl<S, B> Service<http::Request<hyper::body::Incoming>> for Tracked<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<GuardedBody<B, ActiveGuard>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        let guard = self.activity.enter();
        let budget = self.budget.clone();
        let framing = self.grpc.then(GrpcFraming::default);
        let mut req = req.map(|b| ReadBody::new(b, self.read_timeout, budget, framing));
        req.extensions_mut()
            .insert(tonic::transport::server::TcpConnectInfo {
                local_addr: self.info.local,
                remote_addr: Some(self.info.peer),
            });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|body| GuardedBody::new(body, Some(guard))))
        })
    }
}

pin_project! {
    /// A response body holding a guard until it is dropped: its request counts as in flight
    /// (on its connection here, in the server's drain in [`crate::drain`]) until the response
    /// is over.
    pub struct GuardedBody<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> GuardedBody<B, G> {
    /// `inner`, holding `guard` (none: nothing is counted).
    pub fn new(inner: B, guard: Option<G>) -> Self {
        Self { inner, guard }
    }
}

impl<B: Default, G> Default for GuardedBody<B, G> {
    fn default() -> Self {
        Self::new(B::default(), None)
    }
}

impl<B: Body, G> Body for GuardedBody<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The budgets for request bytes of unfinished bodies: the connection's and the port's.
#[derive(Debug, Clone)]
pub struct Budget {
    activity: Arc<Activity>,
    max: usize,
    port: Arc<AtomicUsize>,
    max_port: usize,
}

impl Budget {
    /// Counts `n` more bytes; an error (with nothing counted) when either budget would be over.
    fn charge(&self, n: usize) -> Result<(), ReadError> {
        let conn = self
            .activity
            .buffered
            .fetch_add(n, Ordering::SeqCst)
            .saturating_add(n);
        let port = self.port.fetch_add(n, Ordering::SeqCst).saturating_add(n);
        let over = if conn > self.max {
            Some(ReadError::OverBudget(self.max))
        } else if port > self.max_port {
            Some(ReadError::PortOverBudget(self.max_port))
        } else {
            None
        };
        match over {
            Some(e) => {
                self.release(n);
                Err(e)
            }
            None => Ok(()),
        }
    }

    fn release(&self, n: usize) {
        self.activity.buffered.fetch_sub(n, Ordering::SeqCst);
        self.port.fetch_sub(n, Ordering::SeqCst);
    }
}

/// Why a request body failed at this layer.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// No data for the read timeout.
    #[error("the request body stalled: no data for {0:?} (--request-read-timeout)")]
    Stalled(Duration),
    /// The connection's unfinished bodies hold too many bytes.
    #[error(
        "this connection's requests still being received exceed {0} bytes \
         (--max-buffered-request-bytes)"
    )]
    OverBudget(usize),
    /// All connections of the port together hold too many.
    #[error(
        "this server's requests still being received exceed {0} bytes \
         (--max-buffered-request-bytes-total); retry shortly"
    )]
    PortOverBudget(usize),
}

impl ReadError {
    /// As the body error services see: a gRPC status (tonic passes it through as the call's
    /// status; on the HTTP port it is the message of a 400).
    fn into_box(self) -> BoxError {
        let code = match self {
            Self::Stalled(_) => tonic::Code::InvalidArgument,
            Self::OverBudget(_) | Self::PortOverBudget(_) => tonic::Code::ResourceExhausted,
        };
        Box::new(tonic::Status::new(code, self.to_string()))
    }
}

pin_project! {
    /// A request body whose silence is bounded by a timeout and whose bytes count against the
    /// connection's [`Budget`] until it ends (or is dropped).
    pub struct ReadBody<B> {
        #[pin]
        inner: B,
        timeout: Duration,
        stall: Option<Pin<Box<Sleep>>>,
        budget: Budget,
        counted: usize,
        failed: bool,
        framing: Option<GrpcFraming>,
    }

    impl<B> PinnedDrop for ReadBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.budget.release(*this.counted);
        }
    }
}

impl<B> ReadBody<B> {
    fn new(inner: B, timeout: Duration, budget: Budget, framing: Option<GrpcFraming>) -> Self {
        Self {
            inner,
            timeout,
            stall: None,
            budget,
            counted: 0,
            failed: false,
            framing,
        }
    }
}

/// Where a gRPC request body is in its messages: what a chunk of it makes the decoder hold.
#[derive(Debug, Default, Clone, Copy)]
struct GrpcFraming {
    prefix: [u8; 5],
    have: usize,
    remaining: usize,
}

impl GrpcFraming {
    /// Bytes to charge for `data`: each message's prefix and declared length when its prefix
    /// completes; the message's bytes themselves are covered by that.
    fn charge(&mut self, mut data: &[u8]) -> usize {
        let mut charge = 0usize;
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                let len = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]) as usize;
                self.remaining = len;
                self.have = 0;
                charge = charge.saturating_add(5 + len);
            }
        }
        charge
    }
}

impl<B> Body for ReadBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.stall = None;
                let release = |counted: &mut usize| this.budget.release(std::mem::take(counted));
                match frame {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            let n = match this.framing.as_mut() {
                                Some(f) => f.charge(data),
                                None => data.len(),
                            };
                            if let Err(e) = this.budget.charge(n) {
                                *this.failed = true;
                                release(this.counted);
                                return Poll::Ready(Some(Err(e.into_box())));
                            }
                            *this.counted += n;
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Some(Err(e)) => {
                        release(this.counted);
                        Poll::Ready(Some(Err(e.into())))
                    }
                    None => {
                        release(this.counted);
                        Poll::Ready(None)
                    }
                }
            }
            Poll::Pending => {
                let timeout = *this.timeout;
                let stall = this
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if stall.as_mut().poll(cx).is_ready() {
                    *this.failed = true;
                    return Poll::Ready(Some(Err(ReadError::Stalled(timeout).into_box())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The HTTP/2 connection preface.
const H2_PREFACE_LEN: usize = 24;

pin_project! {
    /// An accepted connection that must deliver the HTTP/2 preface (or, for HTTP/1, its first
    /// byte) within the preface timeout; reads fail with `TimedOut` after that.
    struct PrefaceIo<T> {
        #[pin]
        inner: T,
        deadline: Option<Pin<Box<Sleep>>>,
        seen: usize,
    }
}

impl<T> PrefaceIo<T> {
    fn new(inner: T, timeout: Duration) -> Self {
        Self {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            seen: 0,
        }
    }
}

impl<T: AsyncRead> AsyncRead for PrefaceIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        let Some(deadline) = this.deadline.as_mut() else {
            return r;
        };
        if let Poll::Ready(Ok(())) = &r {
            let new = &buf.filled()[before..];
            // HTTP/1 requests start with a method, never with the preface's `P`RI.
            let http1 = *this.seen == 0 && new.first().is_some_and(|b| *b != b'P');
            *this.seen += new.len();
            if http1 || *this.seen >= H2_PREFACE_LEN || new.is_empty() {
                *this.deadline = None;
            }
            return r;
        }
        if r.is_pending() && deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no HTTP/2 preface or HTTP/1 request within --preface-timeout",
            )));
        }
        r
    }
}

impl<T: AsyncWrite> AsyncWrite for PrefaceIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Raises this process's soft limit of open descriptors to its hard limit (once; later calls do
/// nothing). Returns the soft limit in force afterwards.
pub fn raise_fd_limit() -> Option<u64> {
    static ONCE: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *ONCE.get_or_init(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain getrlimit/setrlimit on a local struct.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return None;
            }
            if lim.rlim_cur < lim.rlim_max {
                let before = lim.rlim_cur;
                let raised = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    tracing::debug!(
                        before,
                        after = raised.rlim_cur,
                        "raised the open-file limit"
                    );
                    return Some(raised.rlim_cur);
                }
            }
        }
        Some(lim.rlim_cur)
    })
}

/// Binds a listener on `addr` (`127.0.0.1:0` picks a free port), first raising the descriptor
/// limit ([`raise_fd_limit`]).
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    raise_fd_limit();
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let mut b = Backoff::default();
            let e = std::io::Error::from_raw_os_error(libc::EMFILE);
            assert!(is_fd_exhaustion(&e));
            let mut delays = Vec::new();
            for _ in 0..10 {
                b.wait(&e, None).await;
                delays.push(b.delay);
            }
            assert_eq!(delays[0], Backoff::FIRST);
            assert_eq!(delays[1], Backoff::FIRST * 2);
            assert_eq!(*delays.last().unwrap(), Backoff::MAX);
            b.reset();
            assert_eq!(b.failures, 0);
        });
    }

    #[test]
    fn grpc_messages_are_charged_their_declared_length_once() {
        let mut f = GrpcFraming::default();
        let mut msg = vec![0u8, 0, 0, 0, 10];
        msg.extend_from_slice(&[7; 10]);
        // Whole message: prefix + declared length.
        assert_eq!(f.charge(&msg), 15);
        // Split anywhere, including inside the prefix: the same total, charged when the
        // prefix completes.
        for split in 1..msg.len() {
            let mut f = GrpcFraming::default();
            let total = f.charge(&msg[..split]) + f.charge(&msg[split..]);
            assert_eq!(total, 15, "split at {split}");
            let mut f = GrpcFraming::default();
            assert_eq!(f.charge(&msg[..split]), if split >= 5 { 15 } else { 0 });
        }
        // A huge declared length is charged in full from five bytes.
        let mut f = GrpcFraming::default();
        assert_eq!(f.charge(&[0, 1, 0, 0, 0]), 5 + (1 << 24));
        // Two messages in one chunk.
        let mut f = GrpcFraming::default();
        let two = [msg.clone(), msg].concat();
        assert_eq!(f.charge(&two), 30);
    }

    #[test]
    fn raising_the_fd_limit_reaches_the_hard_limit() {
        let soft = raise_fd_limit().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit on a local struct.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, soft);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
    }
}
