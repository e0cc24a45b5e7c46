//! Telemetry through the real servers (tiny checkpoint, 127.0.0.1): a request sent to the
//! gateway is one trace with spans from the gateway, from the service that served it and from
//! the engine (the spans docs/metrics.md names), and each process's `/metrics` shows the
//! requests and engine counts afterwards.
//!
//! Spans are collected with the SDK's in-memory exporter behind the same subscriber the
//! binaries install (`janus_telemetry::build_subscriber`), set once for this test binary.

mod common;

use common::*;
use janus_engine::{GenerationConfig, UnderstandingConfig};
use janus_proto::v1 as pb;
use janus_service::ServerOptions;
use janus_telemetry::opentelemetry::trace::{SpanId, SpanKind, TraceId};
use janus_telemetry::opentelemetry::Value;
use janus_telemetry::opentelemetry_sdk::trace::{
    InMemorySpanExporter, SdkTracerProvider, SpanData,
};
use janus_telemetry::{
    build_subscriber, install_propagator, traces_filter, BuildInfo, EnvFilter, LogFormat, Metrics,
};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Request;

const UNDERSTAND: &str = "janus.v1.Understanding/Understand";
const GENERATE: &str = "janus.v1.Generation/Generate";

/// The process-wide subscriber with an in-memory span exporter (installed on first use).
fn exporter() -> &'static InMemorySpanExporter {
    static TELEMETRY: OnceLock<(SdkTracerProvider, InMemorySpanExporter)> = OnceLock::new();
    &TELEMETRY
        .get_or_init(|| {
            install_propagator();
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            let subscriber = build_subscriber(
                LogFormat::Text,
                EnvFilter::new("warn"),
                Some((&provider, traces_filter("info"))),
                std::io::sink,
            );
            tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
            (provider, exporter)
        })
        .1
}

fn attr<'a>(s: &'a SpanData, key: &str) -> Option<&'a Value> {
    s.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn in_trace(trace: TraceId) -> Vec<SpanData> {
    exporter()
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect()
}

/// The spans of `trace` whose parent is `parent`, by name.
fn children<'a>(spans: &'a [SpanData], parent: &SpanData) -> BTreeMap<String, Vec<&'a SpanData>> {
    let mut out: BTreeMap<String, Vec<&SpanData>> = BTreeMap::new();
    for s in spans {
        if s.parent_span_id == parent.span_context.span_id() {
            out.entry(s.name.to_string()).or_default().push(s);
        }
    }
    out
}

/// One span named `name` among `kids`, inside `parent`'s time range.
fn only<'a>(
    kids: &BTreeMap<String, Vec<&'a SpanData>>,
    name: &str,
    parent: &SpanData,
) -> &'a SpanData {
    let found = kids.get(name).map(Vec::as_slice).unwrap_or_default();
    assert_eq!(
        found.len(),
        1,
        "exactly one {name} span under the backend's: {:?}",
        kids.keys().collect::<Vec<_>>()
    );
    let s = found[0];
    assert!(
        parent.start_time <= s.start_time && s.end_time <= parent.end_time,
        "{name} lies within the RPC's span: {:?}..{:?} vs {:?}..{:?}",
        s.start_time,
        s.end_time,
        parent.start_time,
        parent.end_time
    );
    s
}

/// A traceparent naming `trace` and the caller's span `caller`, sampled.
fn traceparent(
    trace: TraceId,
    caller: SpanId,
) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
    format!("00-{trace}-{caller}-01").parse().unwrap()
}

/// Waits (bounded) until `trace` holds two server spans and one client span of `method`, and
/// returns the trace's spans with the gateway's server span, the client span and the backend's
/// server span.
async fn gateway_trace(
    trace: TraceId,
    caller: SpanId,
    method: &str,
) -> (Vec<SpanData>, SpanData, SpanData, SpanData) {
    let complete = |spans: &[SpanData]| {
        spans
            .iter()
            .filter(|s| s.name == method && s.span_kind == SpanKind::Server)
            .count()
            == 2
            && spans
                .iter()
                .any(|s| s.name == method && s.span_kind == SpanKind::Client)
    };
    wait_for(WAIT, "gateway and backend spans exported", || async {
        complete(&in_trace(trace))
    })
    .await;
    let spans = in_trace(trace);
    let client = spans
        .iter()
        .find(|s| s.name == method && s.span_kind == SpanKind::Client)
        .unwrap()
        .clone();
    let server = |parent: SpanId| {
        spans
            .iter()
            .find(|s| {
                s.name == method && s.span_kind == SpanKind::Server && s.parent_span_id == parent
            })
            .cloned()
    };
    let gateway = server(caller).expect("gateway span under the caller's");
    let backend = server(client.span_context.span_id())
        .expect("backend span under the gateway's client span");
    assert!(gateway.parent_span_is_remote && backend.parent_span_is_remote);
    assert_eq!(client.parent_span_id, gateway.span_context.span_id());
    assert_eq!(attr(&client, "rpc.grpc.status_code"), Some(&Value::I64(0)));
    for s in [&gateway, &backend] {
        assert_eq!(attr(s, "rpc.grpc.status_code"), Some(&Value::I64(0)));
        assert!(s.start_time <= s.end_time);
    }
    // The gateway's span covers the backend's (it ends with the relayed stream).
    assert!(gateway.start_time <= backend.start_time && backend.end_time <= gateway.end_time);
    (spans, gateway, client, backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_through_the_gateway_is_one_trace_with_engine_spans() {
    exporter();
    let stack = start_stack(StackConfig::default()).await;
    let trace = TraceId::from_hex("5e1a2b3c4d5e6f708192a3b4c5d6e7f8").unwrap();
    let caller = SpanId::from_hex("1122334455667788").unwrap();

    let mut client = und_client(&stack.gw.url()).await;
    let mut req = Request::new(pb::UnderstandRequest {
        messages: vec![user(
            "<image_placeholder>\nWhat is shown?",
            vec![small_png(40, 30)],
        )],
        sampling: Some(greedy_sampling(4)),
        request_id: String::new(),
    });
    req.metadata_mut()
        .insert("traceparent", traceparent(trace, caller));
    req.metadata_mut()
        .insert("x-request-id", "trace-e2e-1".parse().unwrap());
    let answer = collect_answer(&mut client, req).await.unwrap();
    assert_eq!(answer.ids.len(), 4);

    let (spans, gateway, _client, backend) = gateway_trace(trace, caller, UNDERSTAND).await;
    for s in [&gateway, &backend] {
        assert_eq!(attr(s, "request_id"), Some(&Value::from("trace-e2e-1")));
    }

    // The engine's spans of this request: children of the backend's RPC span, in order.
    let kids = children(&spans, &backend);
    let queue = only(&kids, "queue_wait", &backend);
    let pre = only(&kids, "preprocess", &backend);
    let vision = only(&kids, "vision_encode", &backend);
    let prefill = only(&kids, "prefill", &backend);
    let decode = only(&kids, "decode", &backend);
    assert!(
        pre.end_time <= queue.start_time,
        "preprocessed before it is queued"
    );
    assert!(queue.end_time <= vision.start_time);
    assert!(vision.end_time <= prefill.start_time);
    assert!(prefill.end_time <= decode.start_time);
    // One decode span for the whole answer, not one per token.
    assert_eq!(attr(decode, "tokens"), Some(&Value::I64(4)));
    assert_eq!(attr(prefill, "rows"), Some(&Value::I64(1)));
    assert!(matches!(attr(prefill, "prompt_tokens"), Some(Value::I64(n)) if *n > 0));
    // No engine span escaped into a trace of its own.
    let engine_names = [
        "queue_wait",
        "preprocess",
        "vision_encode",
        "prefill",
        "decode",
    ];
    assert!(exporter()
        .get_finished_spans()
        .unwrap()
        .iter()
        .filter(|s| engine_names.contains(&&*s.name))
        .all(|s| s.parent_span_id != SpanId::INVALID));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_through_the_gateway_is_one_trace_with_engine_spans() {
    exporter();
    let stack = start_stack(StackConfig::default()).await;
    let trace = TraceId::from_hex("6f2b3c4d5e6f708192a3b4c5d6e7f809").unwrap();
    let caller = SpanId::from_hex("2233445566778899").unwrap();

    let mut client = gen_client(&stack.gw.url()).await;
    let mut req = Request::new(pb::GenerateRequest {
        prompt: "a red apple".into(),
        n: Some(2),
        temperature: Some(0.0),
        seed: Some(3),
        output_format: pb::OutputFormat::Png as i32,
        ..Default::default()
    });
    req.metadata_mut()
        .insert("traceparent", traceparent(trace, caller));
    let generated = collect_images(&mut client, req).await.unwrap();
    assert_eq!(generated.images.len(), 2);

    let (spans, gateway, _client, backend) = gateway_trace(trace, caller, GENERATE).await;
    // The gateway generated the request id; both hops carry it.
    let id = attr(&gateway, "request_id")
        .expect("generated request id")
        .clone();
    assert_eq!(attr(&backend, "request_id"), Some(&id));

    let kids = children(&spans, &backend);
    let queue = only(&kids, "queue_wait", &backend);
    let prefill = only(&kids, "prefill", &backend);
    let steps = only(&kids, "generate_steps", &backend);
    let vq = only(&kids, "vq_decode", &backend);
    let encode = only(&kids, "encode_image", &backend);
    assert!(queue.end_time <= prefill.start_time);
    assert!(prefill.end_time <= steps.start_time);
    assert!(steps.end_time <= vq.start_time);
    assert!(vq.end_time <= encode.start_time);
    // Two images: a CFG pair each.
    assert_eq!(attr(prefill, "rows"), Some(&Value::I64(4)));
    assert_eq!(attr(steps, "images"), Some(&Value::I64(2)));
    assert_eq!(attr(encode, "images"), Some(&Value::I64(2)));
    let per_image = generated.fin.unwrap().usage.unwrap().completion_tokens / 2;
    assert_eq!(attr(steps, "steps"), Some(&Value::I64(per_image as i64)));
}

/// `GET /metrics` over plain HTTP/1.1; the samples as (series, value).
async fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let mut s = within(WAIT, "connect", tokio::net::TcpStream::connect(addr))
        .await
        .unwrap();
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    within(WAIT, "scrape", s.read_to_string(&mut raw))
        .await
        .unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, v) = l.rsplit_once(' ').unwrap();
            (series.to_string(), v.parse().unwrap())
        })
        .collect()
}

fn get(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("{series} missing from {samples:#?}"))
}

fn options(service: &str) -> ServerOptions {
    ServerOptions {
        grace_period: Duration::from_secs(2),
        metrics: Metrics::new(service, BuildInfo::new("test", None)),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_requests_show_the_counts() {
    exporter();
    let und_server = options("janus-understanding");
    let gen_server = options("janus-generation");
    // As the binaries do: the engines report their batch sizes into the service's registry.
    let und_cfg = StackConfig {
        und: janus_understanding::with_metrics(UnderstandingConfig::default(), &und_server.metrics),
        server: und_server,
        ..Default::default()
    };
    let gen_cfg = StackConfig {
        gen: janus_generation::with_metrics(GenerationConfig::default(), &gen_server.metrics),
        server: gen_server,
        ..Default::default()
    };
    let und = start_understanding(&und_cfg).await;
    let gen = start_generation(&gen_cfg).await;
    let gw_opts = options("janus-gateway");
    let gw = start_gateway(vec![und.url()], vec![gen.url()], gw_opts.clone()).await;
    let ch = channel(&gw.url()).await;
    for svc in [
        janus_proto::UNDERSTANDING_SERVICE,
        janus_proto::GENERATION_SERVICE,
    ] {
        wait_for(Duration::from_secs(20), "backends healthy", || {
            let ch = ch.clone();
            async move { health_status(ch, svc).await == Some(1) }
        })
        .await;
    }
    let serve = |m: &Metrics| {
        let m = m.clone();
        async move { m.serve("127.0.0.1:0".parse().unwrap()).await.unwrap().0 }
    };
    let und_m = serve(&und_cfg.server.metrics).await;
    let gen_m = serve(&gen_cfg.server.metrics).await;
    let gw_m = serve(&gw_opts.metrics).await;

    // Two answers, one refused request, one generation of two images.
    let mut u = und_client(&gw.url()).await;
    let mut completion = 0;
    for q in ["What is shown?", "Which colours?"] {
        let a = collect_answer(
            &mut u,
            Request::new(pb::UnderstandRequest {
                messages: vec![user(
                    &format!("<image_placeholder>\n{q}"),
                    vec![small_png(24, 24)],
                )],
                sampling: Some(greedy_sampling(3)),
                request_id: String::new(),
            }),
        )
        .await
        .unwrap();
        completion += a.fin.unwrap().usage.unwrap().completion_tokens;
    }
    let bad = collect_answer(
        &mut u,
        Request::new(pb::UnderstandRequest {
            messages: vec![user("<image_placeholder>\nno image attached", vec![])],
            sampling: Some(greedy_sampling(3)),
            request_id: String::new(),
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let mut g = gen_client(&gw.url()).await;
    let generated = collect_images(
        &mut g,
        Request::new(pb::GenerateRequest {
            prompt: "a red apple".into(),
            n: Some(2),
            temperature: Some(0.0),
            seed: Some(1),
            output_format: pb::OutputFormat::Png as i32,
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    assert_eq!(generated.images.len(), 2);
    let gen_usage = generated.fin.unwrap().usage.unwrap();

    // Counts are final once the server-side streams have ended: wait (bounded) for them.
    let ok_und = format!("janus_grpc_requests_total{{code=\"OK\",method=\"{UNDERSTAND}\"}}");
    let ok_gen = format!("janus_grpc_requests_total{{code=\"OK\",method=\"{GENERATE}\"}}");
    wait_for(
        WAIT,
        "gateway counted both answers and the images",
        || async {
            let s = scrape(gw_m).await;
            s.get(&ok_und) == Some(&2.0) && s.get(&ok_gen) == Some(&1.0)
        },
    )
    .await;
    let gw_s = scrape(gw_m).await;
    let bad_und =
        format!("janus_grpc_requests_total{{code=\"INVALID_ARGUMENT\",method=\"{UNDERSTAND}\"}}");
    assert_eq!(get(&gw_s, &bad_und), 1.0);
    assert_eq!(
        get(
            &gw_s,
            &format!("janus_grpc_request_duration_seconds_count{{method=\"{UNDERSTAND}\"}}")
        ),
        3.0
    );
    assert_eq!(
        get(
            &gw_s,
            &format!("janus_grpc_requests_in_flight{{method=\"{UNDERSTAND}\"}}")
        ),
        0.0
    );
    assert_eq!(
        get(
            &gw_s,
            "janus_build_info{git_sha=\"unknown\",service=\"janus-gateway\",version=\"test\"}"
        ),
        1.0
    );
    // The gateway runs no engine.
    assert_eq!(get(&gw_s, "janus_output_tokens_total{kind=\"text\"}"), 0.0);
    assert_eq!(get(&gw_s, "janus_batch_size_count"), 0.0);

    wait_for(WAIT, "understanding counted both answers", || async {
        scrape(und_m).await.get(&ok_und) == Some(&2.0)
    })
    .await;
    let und_s = scrape(und_m).await;
    assert_eq!(get(&und_s, &bad_und), 1.0);
    assert_eq!(get(&und_s, "janus_time_to_first_token_seconds_count"), 2.0);
    assert_eq!(
        get(&und_s, "janus_time_per_output_token_seconds_count"),
        2.0
    );
    assert_eq!(get(&und_s, "janus_queue_wait_seconds_count"), 2.0);
    assert_eq!(
        get(&und_s, "janus_output_tokens_total{kind=\"text\"}"),
        completion as f64
    );
    assert_eq!(
        get(&und_s, "janus_output_tokens_total{kind=\"image\"}"),
        0.0
    );
    assert!(get(&und_s, "janus_prompt_tokens_total") > 0.0);
    // Every answer was prefilled and decoded in batched steps of at least one row.
    assert!(get(&und_s, "janus_batch_size_count") >= 2.0 + 2.0);
    assert!(get(&und_s, "janus_batch_size_sum") >= get(&und_s, "janus_batch_size_count"));
    // Sampled after each submission and periodically: back to 0 once the engine took them.
    wait_for(WAIT, "understanding queue depth back to 0", || async {
        scrape(und_m).await.get("janus_queue_depth") == Some(&0.0)
    })
    .await;

    wait_for(WAIT, "generation counted the request", || async {
        scrape(gen_m).await.get(&ok_gen) == Some(&1.0)
    })
    .await;
    let gen_s = scrape(gen_m).await;
    assert_eq!(get(&gen_s, "janus_images_generated_total"), 2.0);
    assert_eq!(get(&gen_s, "janus_time_per_image_seconds_count"), 2.0);
    assert_eq!(
        get(&gen_s, "janus_output_tokens_total{kind=\"image\"}"),
        gen_usage.completion_tokens as f64
    );
    assert_eq!(
        get(&gen_s, "janus_prompt_tokens_total"),
        gen_usage.prompt_tokens as f64
    );
    assert_eq!(get(&gen_s, "janus_queue_wait_seconds_count"), 1.0);
    // One prefill of the prompt's two rows (conditional, unconditional; broadcast to the two
    // images' CFG pairs after it) and one step per image token, all of 4 rows.
    let per_image = (gen_usage.completion_tokens / 2) as f64;
    assert_eq!(get(&gen_s, "janus_batch_size_count"), 1.0 + per_image);
    assert_eq!(get(&gen_s, "janus_batch_size_sum"), 2.0 + 4.0 * per_image);
    wait_for(WAIT, "generation queue depth back to 0", || async {
        scrape(gen_m).await.get("janus_queue_depth") == Some(&0.0)
    })
    .await;
}
