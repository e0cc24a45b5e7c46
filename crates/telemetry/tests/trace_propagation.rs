//! One trace across two "processes": a gateway and a backend, each on its own thread with its
//! own Tokio runtime, `tracing` subscriber and OpenTelemetry provider (in-memory exporter), talking
//! gRPC over loopback. Only the `traceparent` metadata links them, as between real pods.
//!
//! The services are `grpc.health.v1.Health` implementations (no generated code of our own needed):
//! the gateway forwards `Check` to the backend, the backend answers inside an engine-like span.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use janus_telemetry::{
    build_subscriber, client_span, copy_request_id, install_propagator, propagate_context,
    server_span, traces_filter, BuildInfo, LogFormat, Metrics,
};
use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use opentelemetry_sdk::Resource;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codegen::tokio_stream::Stream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{
    health_check_response::ServingStatus, HealthCheckRequest, HealthCheckResponse,
};
use tracing::Instrument as _;
use tracing_subscriber::EnvFilter;

const CHECK: &str = "grpc.health.v1.Health/Check";
/// Bound on every wait in this file (never reached when things work).
const PATIENCE: Duration = Duration::from_secs(20);

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

fn provider(service: &'static str) -> (SdkTracerProvider, InMemorySpanExporter) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .with_resource(Resource::builder_empty().with_service_name(service).build())
        .build();
    (provider, exporter)
}

/// The backend: answers `Check` inside a child span, like an engine step would.
struct Backend;

#[tonic::async_trait]
impl Health for Backend {
    async fn check(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let step = tracing::info_span!("prefill", rows = 2);
        async { tokio::task::yield_now().await }
            .instrument(step)
            .await;
        Ok(Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("watch"))
    }
}

type PropagatingClient =
    HealthClient<InterceptedService<Channel, fn(Request<()>) -> Result<Request<()>, Status>>>;

/// The gateway: forwards `Check` to the backend through a propagating client.
struct Gateway {
    backend: PropagatingClient,
}

#[tonic::async_trait]
impl Health for Gateway {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let mut outgoing = Request::new(request.get_ref().clone());
        copy_request_id(request.metadata(), outgoing.metadata_mut());
        let mut client = self.backend.clone();
        client.check(outgoing).instrument(client_span(CHECK)).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("watch"))
    }
}

/// Serves `service` on 127.0.0.1:0 with the telemetry hooks the real binaries use.
async fn serve<S: Health>(
    service: S,
    metrics: Metrics,
    stop: oneshot::Receiver<()>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        Server::builder()
            .trace_fn(server_span)
            .layer(metrics.layer())
            .add_service(HealthServer::new(service))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stop.await;
            })
            .await
            .unwrap();
    });
    (addr, task)
}

/// A backend "process": its own thread, runtime, subscriber and provider.
struct BackendProcess {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    /// Returns the backend's finished spans (read before its provider shuts down, which
    /// clears the in-memory exporter).
    thread: std::thread::JoinHandle<Vec<SpanData>>,
}

impl BackendProcess {
    fn start() -> Self {
        let (provider, exporter) = provider("backend");
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = std::thread::spawn(move || {
            let subscriber = build_subscriber(
                LogFormat::Text,
                EnvFilter::new("off"),
                Some((&provider, traces_filter("info"))),
                std::io::sink,
            );
            let _default = tracing::subscriber::set_default(subscriber);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let metrics = Metrics::new("backend", BuildInfo::new("0", None));
                let (addr, task) = serve(Backend, metrics, stop_rx).await;
                addr_tx.send(addr).unwrap();
                task.await.unwrap();
            });
            provider.force_flush().unwrap();
            exporter.get_finished_spans().unwrap()
        });
        let addr = addr_rx.recv_timeout(PATIENCE).expect("backend started");
        Self {
            addr,
            stop: stop_tx,
            thread,
        }
    }

    /// Stops the server and joins the thread.
    fn stop(self) -> Vec<SpanData> {
        let _ = self.stop.send(());
        self.thread.join().unwrap()
    }
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn find<'a>(spans: &'a [SpanData], name: &str, kind: SpanKind) -> &'a SpanData {
    let found: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == name && s.span_kind == kind)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {kind:?} span {name:?} among {:#?}",
        names(spans)
    );
    found[0]
}

fn names(spans: &[SpanData]) -> Vec<(String, SpanKind)> {
    spans
        .iter()
        .map(|s| (s.name.to_string(), s.span_kind.clone()))
        .collect()
}

/// Runs gateway + backend, sends one `Check` to the gateway with `metadata`, returns
/// (gateway spans, backend spans).
fn round_trip(metadata: &[(&'static str, &'static str)]) -> (Vec<SpanData>, Vec<SpanData>) {
    install_propagator();
    let backend = BackendProcess::start();
    let (provider, gateway_exporter) = provider("gateway");
    let subscriber = build_subscriber(
        LogFormat::Text,
        EnvFilter::new("off"),
        Some((&provider, traces_filter("info"))),
        std::io::sink,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tracing::subscriber::with_default(subscriber, || {
        rt.block_on(async {
            let channel = Channel::from_shared(format!("http://{}", backend.addr))
                .unwrap()
                .connect_lazy();
            let backend_client: PropagatingClient = HealthClient::with_interceptor(
                channel,
                propagate_context as fn(Request<()>) -> Result<Request<()>, Status>,
            );
            let (stop_tx, stop_rx) = oneshot::channel();
            let metrics = Metrics::new("gateway", BuildInfo::new("0", None));
            let (addr, task) = serve(
                Gateway {
                    backend: backend_client,
                },
                metrics,
                stop_rx,
            )
            .await;

            let channel = Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut client = HealthClient::new(channel);
            let mut request = Request::new(HealthCheckRequest {
                service: String::new(),
            });
            for (k, v) in metadata {
                request.metadata_mut().insert(*k, v.parse().unwrap());
            }
            let reply = tokio::time::timeout(PATIENCE, client.check(request))
                .await
                .expect("gateway answered in time")
                .expect("check succeeded");
            assert_eq!(reply.get_ref().status, ServingStatus::Serving as i32);
            drop(client);
            let _ = stop_tx.send(());
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("gateway stopped")
                .unwrap();
        })
    });
    drop(rt);
    provider.force_flush().unwrap();
    let gateway_spans = gateway_exporter.get_finished_spans().unwrap();
    (gateway_spans, backend.stop())
}

#[test]
fn incoming_traceparent_continues_through_gateway_into_backend() {
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let (gateway, backend) = round_trip(&[
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("x-request-id", "req-42"),
    ]);
    let trace = TraceId::from_hex(trace).unwrap();

    let gw_server = find(&gateway, CHECK, SpanKind::Server);
    let gw_client = find(&gateway, CHECK, SpanKind::Client);
    let be_server = find(&backend, CHECK, SpanKind::Server);
    let be_step = find(&backend, "prefill", SpanKind::Internal);

    // One trace, four spans, parent links across the process boundary.
    for s in [gw_server, gw_client, be_server, be_step] {
        assert_eq!(
            s.span_context.trace_id(),
            trace,
            "{} in the caller's trace",
            s.name
        );
    }
    assert_eq!(
        gw_server.parent_span_id,
        SpanId::from_hex(caller_span).unwrap()
    );
    assert!(gw_server.parent_span_is_remote);
    assert_eq!(gw_client.parent_span_id, gw_server.span_context.span_id());
    assert_eq!(be_server.parent_span_id, gw_client.span_context.span_id());
    assert!(be_server.parent_span_is_remote);
    assert_eq!(be_step.parent_span_id, be_server.span_context.span_id());

    // Attributes the server span carries.
    for s in [gw_server, be_server] {
        assert_eq!(attr(s, "rpc.system"), Some(&Value::from("grpc")));
        assert_eq!(
            attr(s, "rpc.service"),
            Some(&Value::from("grpc.health.v1.Health"))
        );
        assert_eq!(attr(s, "rpc.method"), Some(&Value::from("Check")));
        assert_eq!(attr(s, "rpc.grpc.status_code"), Some(&Value::I64(0)));
        assert_eq!(attr(s, "trace_id"), Some(&Value::from(trace.to_string())));
    }
    assert_eq!(attr(gw_server, "request_id"), Some(&Value::from("req-42")));
    assert_eq!(
        attr(be_server, "request_id"),
        Some(&Value::from("req-42")),
        "gateway forwards x-request-id"
    );
    assert_eq!(attr(be_step, "rows"), Some(&Value::I64(2)));
}

#[test]
fn without_traceparent_the_gateway_starts_the_trace() {
    let (gateway, backend) = round_trip(&[]);
    let gw_server = find(&gateway, CHECK, SpanKind::Server);
    let be_server = find(&backend, CHECK, SpanKind::Server);
    assert_eq!(gw_server.parent_span_id, SpanId::INVALID, "a root span");
    assert_ne!(gw_server.span_context.trace_id(), TraceId::INVALID);
    assert_eq!(
        be_server.span_context.trace_id(),
        gw_server.span_context.trace_id()
    );
    assert_eq!(attr(gw_server, "request_id"), None);
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
fn with_export_off_logs_still_carry_the_remote_trace_id_and_request_id() {
    install_propagator();
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = build_subscriber(LogFormat::Json, EnvFilter::new("info"), None, move || {
        writer.clone()
    });
    tracing::subscriber::with_default(subscriber, || {
        let request = http::Request::builder()
            .uri("/janus.v1.UnderstandingService/Understand")
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .header("x-request-id", "abc")
            .body(())
            .unwrap();
        let span = server_span(&request);
        let _entered = span.enter();
        tracing::info!("handled");
    });
    let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(
        out.contains(r#""trace_id":"0af7651916cd43dd8448eb211c80319c""#),
        "{out}"
    );
    assert!(out.contains(r#""request_id":"abc""#), "{out}");
    assert!(out.contains(r#""rpc.method":"Understand""#), "{out}");
}
