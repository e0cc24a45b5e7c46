//! The bad-input corpus, through the gateway: every image file of `tests/corpus/images/` (with
//! its expected outcome in `tests/corpus/images.tsv`, made by `tests/corpus/make_images.py`),
//! then request builders covering every numeric field at NaN / ±inf / negative / zero / huge,
//! enum values out of range, huge and empty strings, oversized messages and expired deadlines.
//! Each case has its expected status code (and for INVALID_ARGUMENT the field, in the message,
//! `janus-field` and `google.rpc.BadRequest`). After the whole corpus the services still
//! answer, report SERVING and count no engine failure.
//!
//! Limits of this stack: 100 000 image bytes, 40 000 header pixels, `max_new_tokens` ≤ 256, a
//! 1024-token context window, 1 MiB gRPC messages.

use crate::common::*;
use janus_proto::v1 as pb;
use std::path::PathBuf;
use std::time::Duration;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt as _;

/// What a case must get.
#[derive(Debug, Clone)]
enum Expect {
    /// A complete answer.
    Ok,
    /// INVALID_ARGUMENT naming `field`, whose message contains `contains`.
    Invalid { field: String, contains: String },
    /// Another code (message contains the text).
    Code(Code, &'static str),
    /// A deadline over on arrival: DEADLINE_EXCEEDED saying so, with `janus-field: grpc-timeout`.
    Expired,
}

enum Call {
    Und(pb::UnderstandRequest),
    Gen(pb::GenerateRequest),
    /// Sent over a bare HTTP/2 connection with this `grpc-timeout` header: a gRPC client
    /// library would enforce a deadline this short itself and never show the server's answer.
    Deadline {
        path: &'static str,
        grpc_timeout: &'static str,
        body: Vec<u8>,
    },
}

struct Case {
    name: String,
    call: Call,
    timeout: Option<Duration>,
    expect: Expect,
}

fn invalid(field: &str, contains: &str) -> Expect {
    Expect::Invalid {
        field: field.into(),
        contains: contains.into(),
    }
}

fn und_sampling(s: pb::SamplingParams) -> Call {
    Call::Und(pb::UnderstandRequest {
        messages: vec![user("hello", vec![])],
        sampling: Some(pb::SamplingParams {
            max_new_tokens: s.max_new_tokens.or(Some(2)),
            ..s
        }),
        request_id: String::new(),
    })
}

fn und_messages(messages: Vec<pb::ChatMessage>) -> Call {
    Call::Und(pb::UnderstandRequest {
        messages,
        sampling: Some(greedy_sampling(2)),
        request_id: String::new(),
    })
}

fn gen(f: impl FnOnce(&mut pb::GenerateRequest)) -> Call {
    let mut r = pb::GenerateRequest {
        prompt: "a cat".into(),
        output_format: pb::OutputFormat::TokensOnly as i32,
        temperature: Some(0.0),
        ..Default::default()
    };
    f(&mut r);
    Call::Gen(r)
}

fn image_message(data: Vec<u8>, mime: &str) -> pb::ChatMessage {
    pb::ChatMessage {
        role: "user".into(),
        content: "<image_placeholder>\nWhat is it?".into(),
        images: vec![pb::Image {
            data: data.into(),
            mime_type: mime.into(),
        }],
    }
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

/// The image files and their expectations.
fn image_cases() -> Vec<Case> {
    let tsv = std::fs::read_to_string(corpus_dir().join("images.tsv")).unwrap();
    let mut cases = Vec::new();
    for line in tsv.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let cols: Vec<&str> = line.split('\t').collect();
        let (file, expected, contains) = (cols[0], cols[1], cols[2]);
        let data = std::fs::read(corpus_dir().join("images").join(file)).unwrap();
        let expect = match expected {
            "OK" => Expect::Ok,
            "INVALID_ARGUMENT" => invalid("messages[0].images[0]", contains),
            other => panic!("images.tsv: unknown expectation {other}"),
        };
        cases.push(Case {
            name: format!("image {file} ({})", cols[3]),
            call: und_messages(vec![image_message(data, "")]),
            timeout: None,
            expect,
        });
    }
    assert!(cases.len() >= 30, "the corpus has its files");
    cases
}

/// Floats: NaN, ±inf, negative, zero, huge.
const FLOATS: [(&str, f32); 7] = [
    ("NaN", f32::NAN),
    ("+inf", f32::INFINITY),
    ("-inf", f32::NEG_INFINITY),
    ("-1", -1.0),
    ("0", 0.0),
    ("1", 1.0),
    ("f32::MAX", f32::MAX),
];

/// Which float values each field accepts (the rest must be INVALID_ARGUMENT naming it).
fn float_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let ok_temperature = |v: f32| v.is_finite() && v >= 0.0;
    let ok_top_p = |v: f32| v > 0.0 && v <= 1.0;
    let ok_penalty = |v: f32| v.is_finite() && v > 0.0;
    let ok_cfg = |v: f32| v.is_finite() && (0.0..=1000.0).contains(&v);
    for (label, v) in FLOATS {
        let expect = |ok: bool, field: &str, contains: &'static str| {
            if ok {
                Expect::Ok
            } else {
                invalid(field, contains)
            }
        };
        cases.push(Case {
            name: format!("understand sampling.temperature = {label}"),
            call: und_sampling(pb::SamplingParams {
                temperature: Some(v),
                ..Default::default()
            }),
            timeout: None,
            expect: expect(ok_temperature(v), "sampling.temperature", "finite"),
        });
        cases.push(Case {
            name: format!("understand sampling.top_p = {label}"),
            call: und_sampling(pb::SamplingParams {
                top_p: Some(v),
                temperature: Some(1.0),
                ..Default::default()
            }),
            timeout: None,
            expect: expect(ok_top_p(v), "sampling.top_p", "(0, 1]"),
        });
        cases.push(Case {
            name: format!("understand sampling.repetition_penalty = {label}"),
            call: und_sampling(pb::SamplingParams {
                repetition_penalty: Some(v),
                ..Default::default()
            }),
            timeout: None,
            expect: expect(ok_penalty(v), "sampling.repetition_penalty", "> 0"),
        });
        cases.push(Case {
            name: format!("generate temperature = {label}"),
            call: gen(|r| r.temperature = Some(v)),
            timeout: None,
            expect: expect(ok_temperature(v), "temperature", "finite"),
        });
        cases.push(Case {
            name: format!("generate top_p = {label}"),
            call: gen(|r| {
                r.top_p = Some(v);
                r.temperature = Some(1.0);
            }),
            timeout: None,
            expect: expect(ok_top_p(v), "top_p", "(0, 1]"),
        });
        cases.push(Case {
            name: format!("generate cfg_weight = {label}"),
            call: gen(|r| {
                r.cfg_weight = Some(v);
                r.temperature = Some(1.0);
            }),
            timeout: None,
            expect: expect(ok_cfg(v), "cfg_weight", "cfg_weight"),
        });
    }
    cases
}

/// Unsigned fields at zero, one and their maximum (proto3 `uint32`/`uint64` cannot be
/// negative on the wire), plus enum values out of range.
fn integer_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let mut add = |name: String, call: Call, expect: Expect| {
        cases.push(Case {
            name,
            call,
            timeout: None,
            expect,
        })
    };
    for (v, expect) in [
        (0, invalid("sampling.max_new_tokens", "at least 1")),
        (1, Expect::Ok),
        (257, invalid("sampling.max_new_tokens", "limit of 256")),
        (u32::MAX, invalid("sampling.max_new_tokens", "limit of 256")),
    ] {
        add(
            format!("understand sampling.max_new_tokens = {v}"),
            und_sampling(pb::SamplingParams {
                max_new_tokens: Some(v),
                ..Default::default()
            }),
            expect,
        );
    }
    for (v, expect) in [
        (0, Expect::Ok),
        (2, Expect::Ok),
        (3, invalid("sampling.min_new_tokens", "larger")),
        (u32::MAX, invalid("sampling.min_new_tokens", "larger")),
    ] {
        add(
            format!("understand sampling.min_new_tokens = {v} (max 2)"),
            und_sampling(pb::SamplingParams {
                min_new_tokens: Some(v),
                ..Default::default()
            }),
            expect,
        );
    }
    for v in [0, 1, u32::MAX] {
        add(
            format!("understand sampling.top_k = {v}"),
            und_sampling(pb::SamplingParams {
                top_k: Some(v),
                temperature: Some(1.0),
                ..Default::default()
            }),
            Expect::Ok,
        );
        add(
            format!("generate top_k = {v}"),
            gen(|r| {
                r.top_k = Some(v);
                r.temperature = Some(1.0);
            }),
            Expect::Ok,
        );
        add(
            format!("generate preview_interval = {v}"),
            gen(|r| {
                r.preview_interval = v;
                r.output_format = pb::OutputFormat::Png as i32;
            }),
            Expect::Ok,
        );
    }
    for v in [0, u64::MAX] {
        add(
            format!("understand sampling.seed = {v}"),
            und_sampling(pb::SamplingParams {
                seed: Some(v),
                temperature: Some(1.0),
                ..Default::default()
            }),
            Expect::Ok,
        );
        add(
            format!("generate seed = {v}"),
            gen(|r| r.seed = Some(v)),
            Expect::Ok,
        );
    }
    for (v, expect) in [
        (0, invalid("n", "1..=16")),
        (1, Expect::Ok),
        (2, Expect::Ok),
        (17, invalid("n", "1..=16")),
        (u32::MAX, invalid("n", "1..=16")),
    ] {
        add(format!("generate n = {v}"), gen(|r| r.n = Some(v)), expect);
    }
    for v in [4, 99, -1, i32::MIN, i32::MAX] {
        add(
            format!("generate output_format = {v}"),
            gen(|r| r.output_format = v),
            invalid("output_format", "output_format"),
        );
    }
    cases
}

/// Empty, huge and odd strings and lists.
fn string_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let mut add = |name: &str, call: Call, expect: Expect| {
        cases.push(Case {
            name: name.into(),
            call,
            timeout: None,
            expect,
        })
    };
    let msg = |role: &str, content: &str| pb::ChatMessage {
        role: role.into(),
        content: content.into(),
        images: vec![],
    };
    add(
        "no messages",
        und_messages(vec![]),
        invalid("messages", "empty"),
    );
    add(
        "empty role",
        und_messages(vec![msg("", "hi")]),
        invalid("messages[0].role", "role"),
    );
    add(
        "a 64 KiB role",
        und_messages(vec![msg(&"r".repeat(65536), "hi")]),
        invalid("messages[0].role", "role"),
    );
    add(
        "empty user text",
        und_messages(vec![msg("user", "")]),
        Expect::Ok,
    );
    add(
        "NUL and control characters in text",
        und_messages(vec![msg("user", "a\0b\u{1b}[31mc\r\n")]),
        Expect::Ok,
    );
    add(
        "a 200 KiB user text (beyond the context window)",
        und_messages(vec![msg("user", &"word ".repeat(40_000))]),
        invalid("messages", "context window"),
    );
    add(
        "300 KiB of user text (over max_prompt_bytes, refused before tokenizing)",
        und_messages(vec![msg("user", &"word ".repeat(61_440))]),
        invalid("messages", "at most 262144 allowed"),
    );
    add(
        "5000 user messages",
        und_messages((0..5000).map(|_| msg("user", "hi")).collect()),
        invalid("messages", "context window"),
    );
    add(
        "an image without a placeholder",
        und_messages(vec![pb::ChatMessage {
            content: "no placeholder".into(),
            ..image_message(small_png(8, 8), "")
        }]),
        invalid("messages[0].images", "placeholder"),
    );
    add(
        "mime_type image/gif",
        und_messages(vec![image_message(small_png(8, 8), "image/gif")]),
        invalid("messages[0].images[0].mime_type", "image/gif"),
    );
    add(
        "a 64 KiB mime_type",
        und_messages(vec![image_message(small_png(8, 8), &"x".repeat(65536))]),
        invalid("messages[0].images[0].mime_type", "mime"),
    );
    add(
        "mime_type image/jpeg on PNG data (the data decides)",
        und_messages(vec![image_message(small_png(8, 8), "image/jpeg")]),
        Expect::Ok,
    );
    add(
        "an empty stop string",
        und_sampling(pb::SamplingParams {
            stop: vec![String::new()],
            ..Default::default()
        }),
        invalid("sampling.stop", "empty"),
    );
    add(
        "17 stop strings",
        und_sampling(pb::SamplingParams {
            stop: (0..17).map(|i| format!("s{i}")).collect(),
            ..Default::default()
        }),
        invalid("sampling.stop", "at most 16"),
    );
    add(
        "a 64 KiB stop string (never matches; bounded by the message size)",
        und_sampling(pb::SamplingParams {
            stop: vec!["z".repeat(65536)],
            ..Default::default()
        }),
        Expect::Ok,
    );
    add(
        "empty prompt",
        gen(|r| r.prompt.clear()),
        invalid("prompt", "empty"),
    );
    add(
        "whitespace prompt",
        gen(|r| r.prompt = " \n\t ".into()),
        invalid("prompt", "empty"),
    );
    add(
        "a 65 537-byte prompt",
        gen(|r| r.prompt = "a".repeat(65_537)),
        invalid("prompt", "bytes"),
    );
    add(
        "a prompt of NUL bytes",
        gen(|r| r.prompt = "\0\0\0".into()),
        Expect::Ok,
    );
    add(
        "a 10 KiB request id with a newline (replaced)",
        gen(|r| r.request_id = format!("x\n{}", "y".repeat(10_000))),
        Expect::Ok,
    );
    add(
        "a 2 MiB message (limit 1 MiB)",
        und_messages(vec![image_message(vec![0u8; 2 << 20], "")]),
        Expect::Code(Code::ResourceExhausted, "too large"),
    );
    cases
}

fn deadline_cases() -> Vec<Case> {
    use prost::Message as _;
    let und = pb::UnderstandRequest {
        messages: vec![user("hello", vec![])],
        sampling: Some(pb::SamplingParams {
            min_new_tokens: Some(256),
            ..greedy_sampling(256)
        }),
        request_id: String::new(),
    }
    .encode_to_vec();
    let gen = pb::GenerateRequest {
        prompt: "a cat".into(),
        n: Some(16),
        ..Default::default()
    }
    .encode_to_vec();
    let mut cases = Vec::new();
    // Deadlines that expire while the request is handled: DEADLINE_EXCEEDED. Deadlines already
    // over on arrival (up to 2 ms, the servers' margin) are refused at the door with
    // DEADLINE_EXCEEDED naming the field; never tonic's CANCELLED "Timeout expired".
    for grpc_timeout in ["0n", "1n", "1u", "1m", "20m", "100m"] {
        let expect = if matches!(grpc_timeout, "20m" | "100m") {
            Expect::Code(Code::DeadlineExceeded, "deadline")
        } else {
            Expect::Expired
        };
        // (The understanding request is 256 forced tokens, about 0.1 s on the tiny model.)
        if grpc_timeout != "100m" {
            cases.push(Case {
                name: format!("understand with grpc-timeout {grpc_timeout}"),
                call: Call::Deadline {
                    path: "/janus.v1.Understanding/Understand",
                    grpc_timeout,
                    body: und.clone(),
                },
                timeout: None,
                expect: expect.clone(),
            });
        }
        cases.push(Case {
            name: format!("generate with grpc-timeout {grpc_timeout}"),
            call: Call::Deadline {
                path: "/janus.v1.Generation/Generate",
                grpc_timeout,
                body: gen.clone(),
            },
            timeout: None,
            expect: expect.clone(),
        });
    }
    cases
}

/// One gRPC call over a bare HTTP/2 connection: the final status as the server sent it.
async fn bare_call(url: &str, path: &str, grpc_timeout: &str, body: &[u8]) -> Status {
    let addr = url.trim_start_matches("http://").to_string();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", grpc_timeout)
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(req, false).unwrap();
    let mut framed = vec![0u8];
    framed.extend((body.len() as u32).to_be_bytes());
    framed.extend(body);
    // The server may answer (and reset the stream) before the body is sent, e.g. for an
    // expired deadline: the answer below is what counts.
    let _ = send.send_data(framed.into(), true);
    let response = within(WAIT, "bare call", response).await.unwrap();
    if let Some(s) = Status::from_header_map(response.headers()) {
        return s;
    }
    let mut body = response.into_body();
    while let Some(chunk) = within(WAIT, "bare call body", body.data()).await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    Status::from_header_map(&trailers).expect("a grpc-status")
}

async fn run(url: &str, case: Case) -> Result<(), String> {
    let result: Result<(), Status> = match case.call {
        Call::Und(r) => {
            let mut req = Request::new(r);
            if let Some(t) = case.timeout {
                req.set_timeout(t);
            }
            collect_answer(&mut und_client(url).await, req)
                .await
                .map(|a| assert!(a.fin.is_some()))
        }
        Call::Gen(r) => {
            let n = r.n.unwrap_or(1) as usize;
            let mut req = Request::new(r);
            if let Some(t) = case.timeout {
                req.set_timeout(t);
            }
            collect_images(&mut gen_client(url).await, req)
                .await
                .map(|g| assert_eq!(g.images.len(), n))
        }
        Call::Deadline {
            path,
            grpc_timeout,
            body,
        } => match bare_call(url, path, grpc_timeout, &body).await {
            s if s.code() == Code::Ok => Ok(()),
            s => Err(s),
        },
    };
    let fail = |why: String| Err(format!("{}: {why}", case.name));
    match (&case.expect, result) {
        (Expect::Ok, Ok(())) => Ok(()),
        (Expect::Ok, Err(s)) => fail(format!("expected OK, got {:?} {}", s.code(), s.message())),
        (e, Ok(())) => fail(format!("expected {e:?}, got OK")),
        (Expect::Invalid { field, contains }, Err(s)) => {
            if s.code() != Code::InvalidArgument {
                return fail(format!(
                    "expected INVALID_ARGUMENT, got {:?} {}",
                    s.code(),
                    s.message()
                ));
            }
            if !s.message().contains(field.as_str()) || !s.message().contains(contains) {
                return fail(format!(
                    "message should name {field} and say '{contains}': {}",
                    s.message()
                ));
            }
            if s.message().len() > 1024 {
                return fail(format!("message of {} bytes", s.message().len()));
            }
            let md = s
                .metadata()
                .get("janus-field")
                .and_then(|v| v.to_str().ok());
            if md != Some(field.as_str()) {
                return fail(format!("janus-field {md:?}"));
            }
            match s.get_details_bad_request() {
                Some(b)
                    if b.field_violations.len() == 1 && b.field_violations[0].field == *field =>
                {
                    Ok(())
                }
                other => fail(format!("BadRequest details {other:?}")),
            }
        }
        (Expect::Expired, Err(s)) => {
            let field = s
                .metadata()
                .get(janus_service::status::FIELD_METADATA)
                .and_then(|v| v.to_str().ok());
            if s.code() == Code::DeadlineExceeded
                && s.message().contains("over on arrival")
                && field == Some("grpc-timeout")
            {
                Ok(())
            } else {
                fail(format!(
                    "expected a deadline over on arrival, got {:?} {} (field {field:?})",
                    s.code(),
                    s.message()
                ))
            }
        }
        (Expect::Code(code, contains), Err(s)) => {
            if s.code() != *code || !s.message().contains(contains) {
                return fail(format!(
                    "expected {code:?} ('{contains}'), got {:?} {}",
                    s.code(),
                    s.message()
                ));
            }
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_corpus_gets_its_expected_answers_and_the_services_keep_serving() {
    let mut cfg = StackConfig::default();
    cfg.und.image_limits = janus_pipeline::ImageLimits {
        max_bytes: 100_000,
        max_pixels: 40_000,
    };
    cfg.und.max_new_tokens_limit = 256;
    cfg.load.max_context = Some(1024);
    cfg.server.max_message_bytes = 1 << 20;
    let stack = start_stack(cfg).await;
    let url = stack.gw.url();
    // A loaded machine: two threads spinning for the whole corpus (the deadline cases must
    // get their answers however the scheduler interleaves the servers' timers and handlers).
    let hog_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let stop = hog_stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();

    let cases: Vec<Case> = image_cases()
        .into_iter()
        .chain(float_cases())
        .chain(integer_cases())
        .chain(string_cases())
        .chain(deadline_cases())
        .collect();
    let total = cases.len();
    let mut failures = Vec::new();
    for case in cases {
        if let Err(e) = run(&url, case).await {
            failures.push(e);
        }
    }
    hog_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Still serving: health, a normal answer with an image, a normal generation.
    let ch = channel(&url).await;
    for svc in [
        "",
        janus_proto::UNDERSTANDING_SERVICE,
        janus_proto::GENERATION_SERVICE,
    ] {
        assert_eq!(
            health_status(ch.clone(), svc).await,
            Some(1),
            "{svc} SERVING"
        );
    }
    let a = collect_answer(
        &mut und_client(&url).await,
        Request::new(pb::UnderstandRequest {
            messages: vec![image_message(small_png(64, 64), "image/png")],
            sampling: Some(greedy_sampling(4)),
            request_id: String::new(),
        }),
    )
    .await
    .unwrap();
    assert_eq!(a.ids.len(), 4);
    let g = collect_images(
        &mut gen_client(&url).await,
        Request::new(pb::GenerateRequest {
            prompt: "a cat".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    assert_eq!(g.images.len(), 1);
    for client_info in [
        und_client(&url).await.info(pb::InfoRequest {}).await,
        gen_client(&url).await.info(pb::InfoRequest {}).await,
    ] {
        let stats = client_info.unwrap().into_inner().stats.unwrap();
        assert_eq!(
            stats.failed, 0,
            "refusals are not engine failures: {stats:?}"
        );
    }
}
