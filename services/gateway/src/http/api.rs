//! The routes of the HTTP port. Handlers read the body, convert it with `crate::openai`, and
//! call the in-process gateway through its tonic service traits with the metadata a gRPC
//! client would send (`x-request-id`, `authorization`, trace context, `grpc-timeout`), so the
//! backends, limits, validation, request ids, traces and metrics are the gRPC path's. Each call
//! is counted and traced as the RPC it makes (`janus_rpc_requests_total{method=
//! "janus.v1.Understanding/Understand"}`, a `grpc.server` span). Handlers never touch a model.

use super::fetch::Fetcher;
use super::guard::{self, SitePolicy};
use crate::openai::chat::{self, ChatRequest, Completion, ImageSource};
use crate::openai::images::{self, ImagesRequest, ImagesResponse};
use crate::openai::{models, spec, unix_now, ApiError};
use crate::Gateway;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http::{header, HeaderMap, HeaderValue, Method, Uri};
use http_body_util::BodyExt as _;
use janus_proto::v1 as pb;
use janus_proto::v1::generation_server::Generation;
use janus_proto::v1::understanding_server::Understanding;
use janus_service::auth::AuthPolicy;
use janus_service::meta;
use janus_telemetry::{Metrics, RequestGuard};
use serde_json::Value;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::StreamExt as _;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};
use tracing::{Instrument as _, Span};

const UNDERSTAND: &str = "/janus.v1.Understanding/Understand";
const UNDERSTANDING_INFO: &str = "/janus.v1.Understanding/Info";
const GENERATE: &str = "/janus.v1.Generation/Generate";
const GENERATION_INFO: &str = "/janus.v1.Generation/Info";

/// Request header with a deadline in seconds (decimal), sent on as `grpc-timeout`.
pub const TIMEOUT_HEADER: &str = "x-janus-timeout";

/// How long an `Info` answer is reused for model ids and limits.
const INFO_TTL: Duration = Duration::from_secs(5);

/// A caller's deadline no longer than this was over before the gateway could do anything: the
/// servers' margin, the same rule as `grpc-timeout` at every gRPC server (`janus_service::deadline`).
const DEADLINE_FLOOR: Duration = meta::DEADLINE_MARGIN;

/// How long `GET /openapi.json` waits for the limits it fills in (`Info`).
const SPEC_INFO_TIMEOUT: Duration = Duration::from_secs(2);

static PLAYGROUND: &str = include_str!("../../assets/playground.html");
static OPENAPI: &str = include_str!("../../assets/openapi.json");
static OPENAPI_DOC: LazyLock<Value> =
    LazyLock::new(|| serde_json::from_str(OPENAPI).unwrap_or(Value::Null));

/// The model half an `Info` comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Half {
    Understanding,
    Generation,
}

/// Shared by the handlers.
pub(crate) struct AppState {
    pub gateway: Gateway,
    pub auth: AuthPolicy,
    pub metrics: Metrics,
    /// Largest request body.
    pub body_limit: usize,
    pub fetcher: Fetcher,
    /// `created` of the model objects: when the port started.
    pub started: u64,
    /// Recent `Info` answers of each half.
    pub infos: Mutex<[Option<(Instant, pb::InfoResponse)>; 2]>,
    /// The gateway server's drain: API calls are refused (503) while it drains and counted
    /// in flight otherwise, as gRPC calls are.
    pub drain: janus_service::drain::Drain,
    /// Which hosts and origins may use the port (`--allowed-hosts`, `--cors-origins`).
    pub site: SitePolicy,
}

type St = State<Arc<AppState>>;

/// The router of the HTTP port. Every route is behind the cross-site checks of `guard`.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let gate = Arc::new(guard::Gate {
        policy: state.site.clone(),
        auth: state.auth.clone(),
    });
    Router::new()
        .route("/", get(playground))
        .route("/openapi.json", get(openapi))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/images/generations", post(image_generations))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            drain_gate,
        ))
        .layer(axum::middleware::from_fn_with_state(gate, guard::gate))
        .with_state(state)
}

/// During the drain `/v1/` calls get 503 (UNAVAILABLE, "draining"); otherwise each counts as
/// in flight until its response body (a whole SSE stream) is done, so the drain waits for it.
async fn drain_gate(State(state): St, req: Request, next: axum::middleware::Next) -> Response {
    if !req.uri().path().starts_with("/v1/") {
        return next.run(req).await;
    }
    if state.drain.is_draining() {
        return ApiError::from_status(&janus_service::drain::refusal(), |_| None).into_response();
    }
    let flight = state.drain.enter();
    next.run(req).await.map(|body| Body::new(flight.body(body)))
}

async fn playground() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PLAYGROUND,
    )
        .into_response()
}

/// The OpenAPI document with this server's limits (`Info` of both halves, when they answer
/// within [`SPEC_INFO_TIMEOUT`]) and image-fetch setting filled in.
async fn openapi(State(st): St, headers: HeaderMap) -> Response {
    let mut ctx = Ctx::new(&headers);
    ctx.timeout = Some(SPEC_INFO_TIMEOUT);
    let (u, g) = tokio::join!(
        st.info(Half::Understanding, &ctx),
        st.info(Half::Generation, &ctx)
    );
    let limits = |r: Result<pb::InfoResponse, Status>| r.ok().and_then(|i| i.limits);
    let doc = spec::document(
        &OPENAPI_DOC,
        limits(u).as_ref(),
        limits(g).as_ref(),
        st.fetcher.enabled(),
    );
    json_response(&doc)
}

async fn unknown_route(method: Method, uri: Uri) -> Response {
    ApiError::unknown_route(&method, uri.path()).into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::method_not_allowed(&method, uri.path()).into_response()
}

/// Request-scoped facts of one HTTP request, as a gRPC client would send them.
struct Ctx {
    request_id: String,
    /// `x-request-id`, trace context and `authorization`.
    metadata: MetadataMap,
    timeout: Option<Duration>,
    /// The caller's deadline in seconds ([`TIMEOUT_HEADER`]), for messages.
    deadline_s: Option<f64>,
}

impl Ctx {
    fn new(headers: &HeaderMap) -> Self {
        let mut forwarded = HeaderMap::new();
        for key in meta::PROPAGATED {
            if let Some(v) = headers.get(*key) {
                forwarded.insert(*key, v.clone());
            }
        }
        let mut metadata = MetadataMap::from_headers(forwarded);
        let request_id = meta::request_id("", &metadata);
        meta::set_request_id(&mut metadata, &request_id);
        Self {
            request_id,
            metadata,
            timeout: None,
            deadline_s: None,
        }
    }

    /// Reads the deadline header: a number of seconds, more than 0 and less than 10^9.
    fn deadline(&mut self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(v) = headers.get(TIMEOUT_HEADER) else {
            return Ok(());
        };
        let secs = v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9);
        match secs {
            Some(s) => {
                self.timeout = Some(Duration::from_secs_f64(s));
                self.deadline_s = Some(s);
                Ok(())
            }
            None => Err(ApiError::invalid_header(
                TIMEOUT_HEADER,
                format!(
                    "header {TIMEOUT_HEADER} must be a number of seconds more than 0 and less than 1000000000, got '{}'",
                    String::from_utf8_lossy(v.as_bytes())
                ),
            )),
        }
    }

    /// 504 when the caller's deadline is shorter than anything the gateway could serve
    /// ([`DEADLINE_FLOOR`]): called once the request is known to be valid, before any work.
    fn arrived(&self) -> Result<(), ApiError> {
        match self.deadline_s {
            Some(s) if s <= DEADLINE_FLOOR.as_secs_f64() => {
                Err(ApiError::deadline_over_on_arrival(TIMEOUT_HEADER, s))
            }
            _ => Ok(()),
        }
    }

    /// A gateway request carrying this context.
    fn request<T>(&self, body: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(body);
        *r.metadata_mut() = self.metadata.clone();
        if let Some(t) = self.timeout {
            r.set_timeout(t);
        }
        r
    }
}

impl AppState {
    /// The server span and the metrics guard of one RPC made for an HTTP request.
    fn rpc(&self, path: &'static str, ctx: &Ctx) -> (Span, RequestGuard) {
        let mut req = http::Request::new(());
        *req.uri_mut() = Uri::from_static(path);
        *req.headers_mut() = ctx.metadata.clone().into_headers();
        let span = janus_telemetry::server_span(&req);
        let guard = self.metrics.request_started(path).with_span(span.clone());
        (span, guard)
    }

    /// Checks the API key of a `/v1` request (the gRPC servers' check and counters).
    fn authorize(&self, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
        self.auth
            .authorize(&self.metrics, path, headers)
            .map_err(|s| ApiError::from_status(&s, |_| None))
    }

    /// `Info` of a half through the gateway, reused for [`INFO_TTL`].
    async fn info(&self, half: Half, ctx: &Ctx) -> Result<pb::InfoResponse, Status> {
        let slot = half as usize;
        if let Some((at, info)) = &self.infos.lock().unwrap_or_else(|e| e.into_inner())[slot] {
            if at.elapsed() < INFO_TTL {
                return Ok(info.clone());
            }
        }
        let path = match half {
            Half::Understanding => UNDERSTANDING_INFO,
            Half::Generation => GENERATION_INFO,
        };
        let (span, guard) = self.rpc(path, ctx);
        let req = ctx.request(pb::InfoRequest {});
        let res = match half {
            Half::Understanding => {
                Understanding::info(&self.gateway, req)
                    .instrument(span)
                    .await
            }
            Half::Generation => Generation::info(&self.gateway, req).instrument(span).await,
        };
        guard.finish(res.as_ref().err().map_or(Code::Ok, Status::code));
        let info = res?.into_inner();
        self.infos.lock().unwrap_or_else(|e| e.into_inner())[slot] =
            Some((Instant::now(), info.clone()));
        Ok(info)
    }

    /// The served model id of `half`; `requested` must be it when given.
    async fn model(
        &self,
        half: Half,
        ctx: &Ctx,
        requested: Option<&str>,
    ) -> Result<pb::InfoResponse, ApiError> {
        let info = self
            .info(half, ctx)
            .await
            .map_err(|s| ApiError::from_status(&s, |_| None))?;
        match requested {
            Some(m) if m != info.model_id => Err(ApiError::model_not_found(
                m,
                std::slice::from_ref(&info.model_id),
            )),
            _ => Ok(info),
        }
    }
}

/// Runs a handler and stamps `x-request-id` on whatever it answers.
async fn respond<F, Fut>(headers: &HeaderMap, f: F) -> Response
where
    F: FnOnce(Ctx) -> Fut,
    Fut: std::future::Future<Output = Result<Response, ApiError>>,
{
    let mut ctx = Ctx::new(headers);
    let id = ctx.request_id.clone();
    let mut resp = match ctx.deadline(headers) {
        Ok(()) => {
            let secs = ctx.deadline_s;
            f(ctx)
                .await
                .unwrap_or_else(|e| e.with_caller_deadline(TIMEOUT_HEADER, secs).into_response())
        }
        Err(e) => e.into_response(),
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(meta::REQUEST_ID, v);
    }
    resp
}

/// The body, at most `limit` bytes (413 beyond).
async fn read_body(req: Request, limit: usize) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    match http_body_util::Limited::new(req.into_body(), limit)
        .collect()
        .await
    {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::too_large(limit))
        }
        Err(e) => Err(ApiError::unreadable_body(format!(
            "could not read the request body: {e}"
        ))),
    }
}

/// A `/v1` POST body must be declared JSON: `Content-Type: application/json`, parameters such
/// as `; charset=utf-8` allowed (415 otherwise: forms and `text/plain` are what other sites'
/// pages can send without asking).
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(v) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::unsupported_media_type(None));
    };
    let text = String::from_utf8_lossy(v.as_bytes());
    let essence = text.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(Some(text.trim())))
    }
}

fn json_response(v: &Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

/// One server-sent event.
fn sse(event: Option<&str>, data: &str) -> Bytes {
    let mut s = String::with_capacity(data.len() + 32);
    if let Some(e) = event {
        s.push_str("event: ");
        s.push_str(e);
        s.push('\n');
    }
    s.push_str("data: ");
    s.push_str(data);
    s.push_str("\n\n");
    Bytes::from(s)
}

/// An SSE response fed by `rx`.
fn sse_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream =
        tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>);
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// Sends an event unless the client went away (then `false`).
async fn send(tx: &mpsc::Sender<Bytes>, b: Bytes) -> bool {
    tx.send(b).await.is_ok()
}

async fn list_models(State(st): St, req: Request) -> Response {
    let headers = req.headers().clone();
    respond(&headers, |ctx| async move {
        st.authorize(req.uri().path(), req.headers())?;
        ctx.arrived()?;
        let ids = served_models(&st, &ctx).await?;
        Ok(json_response(&models::list(&ids, st.started)))
    })
    .await
}

async fn get_model(State(st): St, req: Request) -> Response {
    let headers = req.headers().clone();
    respond(&headers, |ctx| async move {
        st.authorize(req.uri().path(), req.headers())?;
        ctx.arrived()?;
        // Hub ids hold slashes, sent as they are or percent-encoded (`%2F`).
        let id = percent_decode(req.uri().path().trim_start_matches("/v1/models/"));
        let ids = served_models(&st, &ctx).await?;
        if ids.contains(&id) {
            Ok(json_response(&models::model(&id, st.started)))
        } else {
            Err(ApiError::model_not_found(&id, &ids))
        }
    })
    .await
}

/// A URL path segment with its `%XX` escapes decoded (invalid UTF-8 replaced).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The distinct model ids of the halves that answer `Info`; the first error when none does.
async fn served_models(st: &AppState, ctx: &Ctx) -> Result<Vec<String>, ApiError> {
    let (u, g) = tokio::join!(
        st.info(Half::Understanding, ctx),
        st.info(Half::Generation, ctx)
    );
    let mut ids = Vec::new();
    let mut first_err = None;
    for r in [u, g] {
        match r {
            Ok(i) if !ids.contains(&i.model_id) => ids.push(i.model_id),
            Ok(_) => {}
            Err(s) => {
                first_err.get_or_insert(s);
            }
        }
    }
    match (ids.is_empty(), first_err) {
        (true, Some(s)) => Err(ApiError::from_status(&s, |_| None)),
        _ => Ok(ids),
    }
}

async fn chat_completions(State(st): St, req: Request) -> Response {
    let headers = req.headers().clone();
    respond(&headers, |ctx| chat(st, ctx, req)).await
}

async fn chat(st: Arc<AppState>, ctx: Ctx, req: Request) -> Result<Response, ApiError> {
    st.authorize(req.uri().path(), req.headers())?;
    require_json(req.headers())?;
    let body = read_body(req, st.body_limit).await?;
    let mut chat_req = ChatRequest::try_from(&body[..])?;
    drop(body);
    ctx.arrived()?;
    let info = st
        .model(Half::Understanding, &ctx, chat_req.model.as_deref())
        .await?;
    chat_req.check_limits(&info.limits.unwrap_or_default())?;
    for part in chat_req.images.iter_mut() {
        if let ImageSource::Remote(url) = &part.source {
            let data = st
                .fetcher
                .fetch(url)
                .await
                .map_err(|e| ApiError::invalid(part.param(), e.to_string()))?;
            part.source = ImageSource::Inline {
                data,
                mime: String::new(),
            };
        }
    }
    let params = chat_req.params.clone();
    let (stream, include_usage) = (chat_req.stream, chat_req.include_usage);
    let proto: pb::UnderstandRequest = chat_req.into();
    let (span, guard) = st.rpc(UNDERSTAND, &ctx);
    let res = Understanding::understand(&st.gateway, ctx.request(proto))
        .instrument(span.clone())
        .await;
    let deadline_s = ctx.deadline_s;
    let to_api = move |s: &Status| {
        ApiError::from_status(s, |f| params.param(f))
            .with_caller_deadline(TIMEOUT_HEADER, deadline_s)
    };
    let mut answer = match res {
        Ok(r) => r.into_inner(),
        Err(s) => {
            guard.finish(s.code());
            return Err(to_api(&s));
        }
    };
    let completion = Completion {
        id: format!("chatcmpl-{}", ctx.request_id),
        created: unix_now(),
        model: info.model_id,
    };
    if !stream {
        let mut text = String::new();
        let mut fin = None;
        while let Some(item) = answer.next().await {
            match item {
                Ok(pb::UnderstandResponse { event: Some(e) }) => match e {
                    pb::understand_response::Event::Token(t) => text.push_str(&t.text),
                    pb::understand_response::Event::Final(f) => fin = Some(f),
                },
                Ok(_) => {}
                Err(s) => {
                    guard.finish(s.code());
                    return Err(to_api(&s));
                }
            }
        }
        guard.finish(Code::Ok);
        let fin = fin.ok_or_else(|| {
            to_api(&Status::internal(
                "the answer ended without a final message",
            ))
        })?;
        let reason = chat::finish_reason(&fin).ok_or_else(|| {
            to_api(&Status::unavailable(
                "the server stopped the request (shutting down)",
            ))
        })?;
        let v = completion.full(&text, reason, chat::usage(fin.usage.as_ref()));
        return Ok(json_response(&v));
    }
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    let task = async move {
        let guard = guard;
        let chunk = |v: Value| sse(None, &v.to_string());
        let first = completion.chunk(
            serde_json::json!({"role": "assistant", "content": ""}),
            None,
            include_usage,
        );
        if !send(&tx, chunk(first)).await {
            return;
        }
        loop {
            let item = tokio::select! {
                item = answer.next() => item,
                // The client went away: dropping the stream cancels the request.
                _ = tx.closed() => return,
            };
            match item {
                Some(Ok(pb::UnderstandResponse { event: Some(e) })) => match e {
                    pb::understand_response::Event::Token(t) => {
                        if t.text.is_empty() {
                            continue;
                        }
                        let c = completion.chunk(
                            serde_json::json!({"content": t.text}),
                            None,
                            include_usage,
                        );
                        if !send(&tx, chunk(c)).await {
                            return;
                        }
                    }
                    pb::understand_response::Event::Final(f) => {
                        let Some(reason) = chat::finish_reason(&f) else {
                            guard.finish(Code::Unavailable);
                            let e = to_api(&Status::unavailable(
                                "the server stopped the request (shutting down)",
                            ));
                            send(&tx, sse(None, &e.body().to_string())).await;
                            return;
                        };
                        let c =
                            completion.chunk(serde_json::json!({}), Some(reason), include_usage);
                        if !send(&tx, chunk(c)).await {
                            return;
                        }
                        if include_usage {
                            let u = completion.usage_chunk(chat::usage(f.usage.as_ref()));
                            if !send(&tx, chunk(u)).await {
                                return;
                            }
                        }
                    }
                },
                Some(Ok(_)) => {}
                Some(Err(s)) => {
                    guard.finish(s.code());
                    send(&tx, sse(None, &to_api(&s).body().to_string())).await;
                    return;
                }
                None => break,
            }
        }
        guard.finish(Code::Ok);
        send(&tx, sse(None, "[DONE]")).await;
    };
    tokio::spawn(task.instrument(span));
    Ok(sse_response(rx))
}

async fn image_generations(State(st): St, req: Request) -> Response {
    let headers = req.headers().clone();
    respond(&headers, |ctx| generate(st, ctx, req)).await
}

async fn generate(st: Arc<AppState>, ctx: Ctx, req: Request) -> Result<Response, ApiError> {
    st.authorize(req.uri().path(), req.headers())?;
    require_json(req.headers())?;
    let body = read_body(req, st.body_limit).await?;
    let img_req = ImagesRequest::try_from(&body[..])?;
    ctx.arrived()?;
    let info = st
        .model(Half::Generation, &ctx, img_req.model.as_deref())
        .await?;
    let limits = info.limits.unwrap_or_default();
    img_req.check_limits(&limits)?;
    let out = ImagesResponse {
        created: unix_now(),
        size: img_req.size(limits.image_size)?,
        output_format: img_req.output_format,
    };
    let proto = img_req.to_proto(limits.image_tokens);
    let (span, guard) = st.rpc(GENERATE, &ctx);
    let res = Generation::generate(&st.gateway, ctx.request(proto))
        .instrument(span.clone())
        .await;
    let deadline_s = ctx.deadline_s;
    let to_api = move |s: &Status| {
        ApiError::from_status(s, images::param).with_caller_deadline(TIMEOUT_HEADER, deadline_s)
    };
    let mut events = match res {
        Ok(r) => r.into_inner(),
        Err(s) => {
            guard.finish(s.code());
            return Err(to_api(&s));
        }
    };
    use pb::generate_response::Event;
    if !img_req.stream {
        let mut done = Vec::new();
        let mut fin = None;
        while let Some(item) = events.next().await {
            match item {
                Ok(pb::GenerateResponse {
                    event: Some(Event::Image(i)),
                }) => done.push(i),
                Ok(pb::GenerateResponse {
                    event: Some(Event::Final(f)),
                }) => fin = Some(f),
                Ok(_) => {}
                Err(s) => {
                    guard.finish(s.code());
                    return Err(to_api(&s));
                }
            }
        }
        guard.finish(Code::Ok);
        let fin = fin.ok_or_else(|| {
            to_api(&Status::internal(
                "the stream ended without a final message",
            ))
        })?;
        done.sort_by_key(|i| i.index);
        return Ok(json_response(
            &out.full(&done, images::usage(fin.usage.as_ref())),
        ));
    }
    let (partials, progress) = (img_req.partial_images, img_req.janus_progress);
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    let task = async move {
        let guard = guard;
        let mut sent_partials: Vec<u32> = Vec::new();
        let mut total_steps = 0;
        let mut done = Vec::new();
        loop {
            let item = tokio::select! {
                item = events.next() => item,
                _ = tx.closed() => return,
            };
            let ev = match item {
                Some(Ok(pb::GenerateResponse { event: Some(e) })) => e,
                Some(Ok(_)) => continue,
                Some(Err(s)) => {
                    guard.finish(s.code());
                    send(&tx, sse(Some("error"), &to_api(&s).body().to_string())).await;
                    return;
                }
                None => break,
            };
            let frame = match ev {
                Event::Progress(p) => {
                    total_steps = p.total_steps;
                    if !progress {
                        continue;
                    }
                    sse(Some("janus.progress"), &images::progress(&p).to_string())
                }
                Event::Preview(p) => {
                    let i = p.index as usize;
                    if sent_partials.len() <= i {
                        sent_partials.resize(i + 1, 0);
                    }
                    if sent_partials[i] >= partials {
                        continue;
                    }
                    let v = out.partial(&p, sent_partials[i], total_steps);
                    sent_partials[i] += 1;
                    sse(Some("image_generation.partial_image"), &v.to_string())
                }
                Event::Image(i) => {
                    done.push(i);
                    continue;
                }
                Event::Final(f) => {
                    // One completed event per image; the request's tokens split over them
                    // (the prompt counted once), so the events add up to the request's usage.
                    let u = f.usage.unwrap_or_default();
                    done.sort_by_key(|i| i.index);
                    let n = done.len().max(1) as u32;
                    for (k, img) in done.iter().enumerate() {
                        let share = pb::Usage {
                            prompt_tokens: if k == 0 { u.prompt_tokens } else { 0 },
                            completion_tokens: u.completion_tokens / n
                                + if k == 0 { u.completion_tokens % n } else { 0 },
                            cached_tokens: if k == 0 { u.cached_tokens } else { 0 },
                        };
                        let v = out.completed(img, images::usage(Some(&share)));
                        if !send(&tx, sse(Some("image_generation.completed"), &v.to_string())).await
                        {
                            return;
                        }
                    }
                    continue;
                }
            };
            if !send(&tx, frame).await {
                return;
            }
        }
        guard.finish(Code::Ok);
    };
    tokio::spawn(task.instrument(span));
    Ok(sse_response(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_are_embedded() {
        let spec: Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
        for path in [
            "/v1/chat/completions",
            "/v1/images/generations",
            "/v1/models",
            "/v1/models/{model}",
            "/openapi.json",
            "/",
        ] {
            assert!(
                spec["paths"].get(path).is_some(),
                "{path} missing from openapi.json"
            );
        }
        assert!(PLAYGROUND.contains("/v1/chat/completions"));
        assert!(
            !PLAYGROUND.contains("http://") && !PLAYGROUND.contains("https://"),
            "the playground fetches nothing from outside"
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("deepseek-ai%2FJanus-Pro-7B"),
            "deepseek-ai/Janus-Pro-7B"
        );
        assert_eq!(percent_decode("a/b%2fc%20d"), "a/b/c d");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%C3%A9"), "é");
    }

    #[test]
    fn sse_frames() {
        assert_eq!(sse(None, "[DONE]"), Bytes::from("data: [DONE]\n\n"));
        assert_eq!(
            sse(Some("error"), "{}"),
            Bytes::from("event: error\ndata: {}\n\n")
        );
    }

    #[test]
    fn context_carries_metadata() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer k".parse().unwrap());
        h.insert("x-request-id", "abc-1".parse().unwrap());
        h.insert("cookie", "no".parse().unwrap());
        h.insert(TIMEOUT_HEADER, "2.5".parse().unwrap());
        let mut ctx = Ctx::new(&h);
        ctx.deadline(&h).unwrap();
        assert_eq!(ctx.request_id, "abc-1");
        let r = ctx.request(());
        assert_eq!(r.metadata().get("authorization").unwrap(), "Bearer k");
        assert!(r.metadata().get("cookie").is_none());
        assert_eq!(
            meta::grpc_timeout(r.metadata()),
            Some(Duration::from_millis(2500) - meta::DEADLINE_MARGIN)
        );
        h.insert(TIMEOUT_HEADER, "soon".parse().unwrap());
        assert!(ctx.deadline(&h).is_err());
    }
}
