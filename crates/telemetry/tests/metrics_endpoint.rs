//! `/metrics` after real RPCs: a tonic server (the standard health service) with the metrics
//! layer, a few calls with different outcomes, engine-style observations, then a scrape over a
//! plain TCP HTTP/1.1 client and a parse of the text format.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use janus_telemetry::{instrument, BuildInfo, InstrumentedRouter, Metrics, TokenKind};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::ServingStatus;

const CHECK: &str = "grpc.health.v1.Health/Check";
const WATCH: &str = "grpc.health.v1.Health/Watch";
/// Bound on every wait in this file (never reached when things work).
const PATIENCE: Duration = Duration::from_secs(20);

#[derive(Debug, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format (0.0.4), checking that every sample's family was declared
/// with `# HELP` and `# TYPE` first.
fn parse(text: &str) -> Vec<Sample> {
    let mut declared = BTreeMap::<String, String>::new();
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            declared.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("number in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let labels = body
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|pair| {
                        let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect();
                (name.to_owned(), labels)
            }
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| declared.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(&name);
        assert!(declared.contains_key(family), "{name} has no # TYPE line");
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

/// The value of the one sample named `name` whose labels include `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert!(
        found.len() <= 1,
        "{name} {labels:?} is ambiguous: {found:?}"
    );
    found.first().map(|s| s.value)
}

/// `GET path` over a fresh TCP connection; returns (status line, headers, body).
async fn http_get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("header/body separator");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (
        status.to_owned(),
        headers.to_ascii_lowercase(),
        body.to_owned(),
    )
}

async fn scrape(addr: SocketAddr) -> Vec<Sample> {
    let (status, headers, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    parse(&body)
}

/// Scrapes until `done` holds (the server side of a cancelled stream notices asynchronously).
async fn scrape_until(addr: SocketAddr, done: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let samples = scrape(addr).await;
        if done(&samples) {
            return samples;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached: {samples:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_after_requests_shows_the_counts() {
    let metrics = Metrics::new("janus-test", BuildInfo::new("9.9.9", Some("abc1234")));

    // gRPC server with the layer, as the services wire it.
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("janus.test.Ready", ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    // The one-line wiring the services use.
    let router: InstrumentedRouter = instrument(Server::builder(), &metrics).add_service(health);
    let server = tokio::spawn(router.serve_with_incoming_shutdown(
        TcpListenerStream::new(listener),
        async {
            let _ = stop_rx.await;
        },
    ));
    let (metrics_addr, metrics_task) = metrics.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();

    let channel = Channel::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let check = |service: &str| HealthCheckRequest {
        service: service.to_owned(),
    };
    client.check(check("")).await.unwrap();
    client.check(check("janus.test.Ready")).await.unwrap();
    let err = client.check(check("janus.test.Unknown")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // A streaming call: in flight while open, CANCELLED once the client drops it.
    let mut watch = client
        .watch(check("janus.test.Ready"))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(PATIENCE, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let open = scrape(metrics_addr).await;
    assert_eq!(
        value(&open, "janus_grpc_requests_in_flight", &[("method", WATCH)]),
        Some(1.0)
    );
    assert_eq!(
        value(&open, "janus_grpc_requests_in_flight", &[("method", CHECK)]),
        Some(0.0)
    );
    drop(watch);

    // Engine-side observations.
    for ms in [30, 80, 700] {
        metrics.observe_ttft(Duration::from_millis(ms));
    }
    metrics.observe_time_per_token(Duration::from_millis(12));
    metrics.observe_image_time(Duration::from_secs(3));
    metrics.observe_image_time(Duration::from_secs(3));
    metrics.observe_queue_wait(Duration::from_millis(4));
    metrics.set_queue_depth(5);
    metrics.observe_batch_size(2);
    metrics.observe_batch_size(32);
    metrics.add_output_tokens(TokenKind::Text, 17);
    metrics.add_output_tokens(TokenKind::Image, 2 * 576);
    metrics.add_prompt_tokens(600);
    metrics.add_images(2);
    metrics.set_model_load_time(Duration::from_millis(12_500));

    let s = scrape_until(metrics_addr, |s| {
        value(
            s,
            "janus_grpc_requests_total",
            &[("method", WATCH), ("code", "CANCELLED")],
        ) == Some(1.0)
    })
    .await;

    // Requests by method and code, durations, in-flight back to zero.
    let total = |method, code| {
        value(
            &s,
            "janus_grpc_requests_total",
            &[("method", method), ("code", code)],
        )
    };
    assert_eq!(total(CHECK, "OK"), Some(2.0));
    assert_eq!(total(CHECK, "NOT_FOUND"), Some(1.0));
    assert_eq!(total(WATCH, "CANCELLED"), Some(1.0));
    assert_eq!(total(WATCH, "OK"), None);
    assert_eq!(
        value(
            &s,
            "janus_grpc_request_duration_seconds_count",
            &[("method", CHECK)]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &s,
            "janus_grpc_request_duration_seconds_count",
            &[("method", WATCH)]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "janus_grpc_requests_in_flight", &[("method", WATCH)]),
        Some(0.0)
    );

    // Histograms: counts, sums and cumulative buckets.
    assert_eq!(
        value(&s, "janus_time_to_first_token_seconds_count", &[]),
        Some(3.0)
    );
    let ttft_sum = value(&s, "janus_time_to_first_token_seconds_sum", &[]).unwrap();
    assert!((ttft_sum - 0.81).abs() < 1e-9, "{ttft_sum}");
    let bucket = |le| {
        value(
            &s,
            "janus_time_to_first_token_seconds_bucket",
            &[("le", le)],
        )
    };
    assert_eq!(bucket("0.05"), Some(1.0));
    assert_eq!(bucket("0.1"), Some(2.0));
    assert_eq!(bucket("1"), Some(3.0));
    assert_eq!(bucket("+Inf"), Some(3.0));
    assert_eq!(
        value(&s, "janus_time_per_output_token_seconds_count", &[]),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "janus_time_per_image_seconds_count", &[]),
        Some(2.0)
    );
    assert_eq!(
        value(&s, "janus_time_per_image_seconds_sum", &[]),
        Some(6.0)
    );
    assert_eq!(value(&s, "janus_queue_wait_seconds_count", &[]), Some(1.0));
    assert_eq!(value(&s, "janus_batch_size_count", &[]), Some(2.0));
    assert_eq!(
        value(&s, "janus_batch_size_bucket", &[("le", "2")]),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "janus_batch_size_bucket", &[("le", "32")]),
        Some(2.0)
    );

    // Gauges and counters.
    assert_eq!(value(&s, "janus_queue_depth", &[]), Some(5.0));
    assert_eq!(
        value(&s, "janus_output_tokens_total", &[("kind", "text")]),
        Some(17.0)
    );
    assert_eq!(
        value(&s, "janus_output_tokens_total", &[("kind", "image")]),
        Some(1152.0)
    );
    assert_eq!(value(&s, "janus_prompt_tokens_total", &[]), Some(600.0));
    assert_eq!(value(&s, "janus_images_generated_total", &[]), Some(2.0));
    assert_eq!(value(&s, "janus_model_load_seconds", &[]), Some(12.5));
    assert_eq!(
        value(
            &s,
            "janus_build_info",
            &[
                ("service", "janus-test"),
                ("version", "9.9.9"),
                ("git_sha", "abc1234")
            ]
        ),
        Some(1.0)
    );

    // Only /metrics is served.
    let (status, _, _) = http_get(metrics_addr, "/").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    drop(client);
    let _ = stop_tx.send(());
    tokio::time::timeout(PATIENCE, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    metrics_task.abort();
}

#[tokio::test]
async fn metrics_endpoint_stops_on_shutdown_signal() {
    let metrics = Metrics::new("janus-test", BuildInfo::new("0", None));
    let (tx, rx) = oneshot::channel::<()>();
    let (addr, task) = janus_telemetry::serve_metrics_with_shutdown(
        "127.0.0.1:0".parse().unwrap(),
        metrics,
        async {
            let _ = rx.await;
        },
    )
    .await
    .unwrap();
    let (status, _, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("# TYPE janus_queue_depth gauge"), "{body}");
    // Labelled families appear with their first sample.
    assert!(!body.contains("janus_grpc_requests_total"), "{body}");
    tx.send(()).unwrap();
    tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap();
}
