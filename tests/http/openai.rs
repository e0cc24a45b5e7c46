//! The OpenAI-compatible HTTP port end to end: real `janus serve` (and `janus gateway`)
//! processes on the tiny fixture, real HTTP requests (reqwest), every endpoint and every error
//! class, and the server still serving afterwards.

use crate::common::fixture;
use base64::Engine as _;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const JANUS: &str = env!("CARGO_BIN_EXE_janus");
const KEY: &str = "sk-openai-test-key";

/// A `janus` server process (killed on drop) and the URLs it printed.
struct Server {
    child: Child,
    http: String,
    metrics: Option<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// `janus ARGS…` until it prints `janus: serving on` (after `janus: http api on`).
    fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(JANUS);
        cmd.args(args)
            .env("RUST_LOG", "warn")
            .env_remove("JANUS_API_KEYS")
            .env_remove("JANUS_HTTP_LISTEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut http, mut metrics) = (None, None);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("janus: http api on ") {
                    http = rest.split_whitespace().next().map(str::to_string);
                }
                if let Some(url) = line.strip_prefix("janus: metrics on ") {
                    metrics = Some(url.trim().to_string());
                }
                if line.starts_with("janus: serving on ")
                    || line.contains("janus gateway listening")
                {
                    let _ = tx.send((http.take(), metrics.take()));
                }
            }
        });
        let (http, metrics) = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(v) => v,
            Err(_) => {
                let _ = child.kill();
                panic!("janus {args:?} did not report its addresses");
            }
        };
        Self {
            child,
            http: http.expect("a `janus: http api on` line"),
            metrics,
        }
    }

    /// `janus serve` on the tiny fixture with an HTTP port chosen by the OS.
    fn serve(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let model = fixture().join("model");
        let mut args = vec![
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--grace-period",
            "1",
        ];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::start(&refs, env)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.http)
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// Status, headers and JSON body of a request.
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Asserts an OpenAI error of `status` and returns its `error` object.
    fn error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        let v = self.json();
        let e = v["error"].clone();
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert!(e.get("param").is_some(), "{v}");
        assert!(
            e["code"].as_str().is_some_and(|c| !c.is_empty()),
            "every error has a code: {v}"
        );
        e
    }
}

async fn send(req: reqwest::RequestBuilder) -> Reply {
    let r = req.send().await.expect("the server answers");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.text().await.unwrap();
    Reply {
        status,
        headers,
        body,
    }
}

async fn post(s: &Server, path: &str, body: &Value) -> Reply {
    send(client().post(s.url(path)).json_body(body)).await
}

/// JSON bodies without reqwest's `json` feature.
trait JsonBody {
    fn json_body(self, v: &Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, v: &Value) -> Self {
        self.header("content-type", "application/json")
            .body(v.to_string())
    }
}

/// The `data:` payloads (and event names) of an event-stream body.
fn events(body: &str) -> Vec<(Option<String>, String)> {
    body.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut event = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = Some(e.to_string());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            (event, data)
        })
        .collect()
}

fn png_data_uri() -> String {
    let bytes = std::fs::read(fixture().join("square.png")).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn decode_png(b64: &str) -> image::DynamicImage {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    image::load_from_memory(&bytes).expect("a decodable PNG")
}

async fn model_id(s: &Server) -> String {
    let r = send(client().get(s.url("/v1/models"))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["data"][0]["id"].as_str().unwrap().to_string()
}

fn chat_body(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": png_data_uri()}},
                {"type": "text", "text": "What is in this picture?"}
            ]}
        ],
        "max_tokens": 6,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_answer_in_openai_shapes() {
    let s = Server::serve(&["--metrics-listen", "127.0.0.1:0"], &[]);
    let c = client();

    // Models: derived from Info (the --model value).
    let r = send(c.get(s.url("/v1/models"))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let list = r.json();
    assert_eq!(list["object"], "list");
    let id = list["data"][0]["id"].as_str().unwrap().to_string();
    assert!(id.ends_with("janus-tiny/model"), "{id}");
    assert_eq!(list["data"][0]["object"], "model");
    let r = send(c.get(s.url(&format!("/v1/models/{id}")))).await;
    assert_eq!(
        (r.status, r.json()["id"].as_str()),
        (200, Some(id.as_str()))
    );
    let r = send(c.get(s.url(&format!("/v1/models/{}", id.replace('/', "%2F"))))).await;
    assert_eq!(
        (r.status, r.json()["id"].as_str()),
        (200, Some(id.as_str())),
        "a percent-encoded id is the same id"
    );
    let e = send(c.get(s.url("/v1/models/deepseek-ai/Janus-Pro-7B")))
        .await
        .error(404);
    assert_eq!(e["code"], "model_not_found");

    // Chat, not streamed, with an image; the caller's request id comes back.
    let r = send(
        c.post(s.url("/v1/chat/completions"))
            .header("x-request-id", "openai-test-1")
            .json_body(&chat_body(&id, false)),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers["x-request-id"], "openai-test-1");
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["id"], "chatcmpl-openai-test-1");
    assert_eq!(v["model"], id.as_str());
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["choices"][0]["message"]["content"].is_string());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let u = &v["usage"];
    assert_eq!(u["completion_tokens"], 6);
    assert!(
        u["prompt_tokens"].as_u64().unwrap() > 576,
        "the image counts: {u}"
    );
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + 6)
    );
    assert_eq!(
        u["prompt_tokens_details"]["cached_tokens"], 0,
        "a fresh server"
    );
    let prompt_tokens = u["prompt_tokens"].as_u64().unwrap();
    let full_text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();

    // The same request streamed: role first, deltas, finish, usage chunk, [DONE].
    let r = post(&s, "/v1/chat/completions", &chat_body(&id, true)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let ev = events(&r.body);
    assert_eq!(ev.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, full_text, "greedy: the stream spells the same answer");
    let fin = &chunks[chunks.len() - 2];
    assert_eq!(fin["choices"][0]["finish_reason"], "length");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    assert_eq!(
        usage["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(),
        Some(prompt_tokens - 1),
        "the same prompt again: all but its last token from the prefix cache"
    );

    // Images, not streamed: n PNGs of 384×384.
    let r = post(
        &s,
        "/v1/images/generations",
        &json!({"model": id, "prompt": "a red apple", "n": 2, "seed": 3, "cfg_weight": 4.0,
                "size": "384x384", "response_format": "b64_json"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert!(v["created"].as_u64().unwrap() > 0);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for d in data {
        let img = decode_png(d["b64_json"].as_str().unwrap());
        assert_eq!((img.width(), img.height()), (384, 384));
    }
    assert_eq!(data[1]["janus_seed"], 4, "image i uses seed + i");
    assert_eq!(v["usage"]["output_tokens"], 2 * 576);

    // Images streamed with partial images and Janus progress.
    let r = post(
        &s,
        "/v1/images/generations",
        &json!({"prompt": "a red apple", "n": 2, "stream": true, "partial_images": 2, "janus_progress": true}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ev = events(&r.body);
    let mut partial = [0u32; 2];
    let mut completed = Vec::new();
    let mut steps = 0;
    let mut out_tokens = 0;
    for (name, data) in &ev {
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(name.as_deref(), v["type"].as_str(), "event name = type");
        match v["type"].as_str().unwrap() {
            "janus.progress" => {
                steps += 1;
                assert_eq!(v["total_steps"], 576);
            }
            "image_generation.partial_image" => {
                let i = v["janus_image_index"].as_u64().unwrap() as usize;
                assert_eq!(v["partial_image_index"], partial[i]);
                partial[i] += 1;
                decode_png(v["b64_json"].as_str().unwrap());
                assert_eq!(v["size"], "384x384");
                assert!(completed.is_empty(), "previews come before the images");
            }
            "image_generation.completed" => {
                let img = decode_png(v["b64_json"].as_str().unwrap());
                assert_eq!((img.width(), img.height()), (384, 384));
                out_tokens += v["usage"]["output_tokens"].as_u64().unwrap();
                completed.push(v["janus_image_index"].as_u64().unwrap());
            }
            other => panic!("unexpected event {other}"),
        }
    }
    assert_eq!(steps, 576);
    assert_eq!(partial, [2, 2], "partial_images previews per image");
    assert_eq!(completed, vec![0, 1]);
    assert_eq!(
        out_tokens,
        2 * 576,
        "the completed events add up to the request's usage"
    );

    // Without janus_progress a stream carries only OpenAI's events.
    let r = post(
        &s,
        "/v1/images/generations",
        &json!({"prompt": "x", "stream": true, "partial_images": 1}),
    )
    .await;
    let names: Vec<_> = events(&r.body)
        .into_iter()
        .map(|(n, _)| n.unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "image_generation.partial_image",
            "image_generation.completed"
        ]
    );

    // The playground and the OpenAPI document.
    let r = send(c.get(s.url("/"))).await;
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(r.body.contains("/v1/images/generations"));
    let spec = send(c.get(s.url("/openapi.json"))).await.json();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
    for p in [
        "/v1/chat/completions",
        "/v1/images/generations",
        "/v1/models",
    ] {
        assert!(spec["paths"].get(p).is_some(), "{p}");
    }

    // The HTTP calls are the gateway's RPCs in its metrics.
    let m = send(c.get(s.metrics.clone().unwrap())).await.body;
    let count = |method: &str| -> f64 {
        m.lines()
            .filter(|l| {
                l.starts_with("janus_grpc_requests_total")
                    && l.contains(&format!("method=\"{method}\""))
                    && l.contains("code=\"OK\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    // Each call is counted at the gateway (HTTP) and at the internal service.
    assert_eq!(count("janus.v1.Understanding/Understand"), 4.0, "{m}");
    assert_eq!(count("janus.v1.Generation/Generate"), 6.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_openai_errors_and_the_server_keeps_serving() {
    let s = Server::serve(&["--max-message-bytes", "400000"], &[]);
    let id = model_id(&s).await;
    let c = client();
    let user = |content: Value| json!({"messages": [{"role": "user", "content": content}], "max_tokens": 2});

    // 400 naming the parameter, found by the gateway or by the service (janus-field).
    let cases = [
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "top_p": 7}),
            "top_p",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}),
            "max_tokens",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100000}),
            "max_completion_tokens",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "n": 3}),
            "n",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}),
            "tools",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}),
            "temperature",
        ),
        (
            json!({"messages": [{"role": "wizard", "content": "hi"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "assistant", "content": "hi"}]}),
            "messages",
        ),
        (
            user(json!([{"type": "text", "text": "a"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}])),
            "messages[0].content[1].image_url",
        ),
        (
            user(
                json!([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]),
            ),
            "messages[0].content[0].image_url",
        ),
    ];
    for (body, param) in cases {
        let e = post(&s, "/v1/chat/completions", &body).await.error(400);
        assert_eq!(e["param"], param, "{body}: {e}");
        assert_eq!(e["type"], "invalid_request_error");
    }
    let e = post(
        &s,
        "/v1/chat/completions",
        &user(json!([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}])),
    )
    .await
    .error(400);
    assert!(e["message"].as_str().unwrap().contains("data: URI"), "{e}");
    let e = send(
        c.post(s.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body("{not json"),
    )
    .await
    .error(400);
    assert!(e["message"].as_str().unwrap().contains("JSON"), "{e}");
    assert_eq!(e["code"], "invalid_json");
    let e = post(&s, "/v1/chat/completions", &json!([1]))
        .await
        .error(400);
    assert_eq!(e["code"], "invalid_json");

    // Integers out of range say so, with the range (1e12 is an integer in JSON).
    for (path, body, param, range) in [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e12}),
            "max_tokens",
            "from 1 to 4294967295",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}),
            "max_tokens",
            "from 1 to 2048 (the server's limit)",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "seed": 1e30}),
            "seed",
            "from 0 to 18446744073709551615",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "top_k": -1}),
            "top_k",
            "from 0 to 4294967295",
        ),
        (
            "/v1/images/generations",
            json!({"prompt": "x", "n": 1e12}),
            "n",
            "from 1 to 16",
        ),
        (
            "/v1/images/generations",
            json!({"prompt": "x", "partial_images": 4, "stream": true}),
            "partial_images",
            "from 0 to 3",
        ),
    ] {
        let e = post(&s, path, &body).await.error(400);
        assert_eq!(e["param"], param, "{body}: {e}");
        assert_eq!(e["code"], "integer_out_of_range", "{body}: {e}");
        let m = e["message"].as_str().unwrap();
        assert!(
            m.contains("out of range") && m.contains(range),
            "{body}: {m}"
        );
    }
    let e = post(
        &s,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5}),
    )
    .await
    .error(400);
    assert_eq!(
        e["code"], "invalid_value",
        "a fraction is not an integer: {e}"
    );
    // What the service would refuse is refused by the gateway too, naming the parameter.
    for (body, param) in [
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}),
            "stop",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "min_tokens": 5, "max_tokens": 2}),
            "min_tokens",
        ),
        (
            json!({"messages": [{"role": "system", "content": "a"}, {"role": "developer", "content": "b"},
                                {"role": "user", "content": "hi"}]}),
            "messages[1].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": "see <image_placeholder>"}]}),
            "messages[0].content",
        ),
    ] {
        let e = post(&s, "/v1/chat/completions", &body).await.error(400);
        assert_eq!(e["param"], param, "{body}: {e}");
    }
    // An empty (or blank) prompt is refused, as the OpenAPI document says (pattern).
    for prompt in ["", " \n\t"] {
        let e = post(&s, "/v1/images/generations", &json!({"prompt": prompt}))
            .await
            .error(400);
        assert_eq!(e["param"], "prompt", "{e}");
    }

    for (body, param) in [
        (json!({"prompt": "x", "size": "1024x1024"}), "size"),
        (
            json!({"prompt": "x", "response_format": "url"}),
            "response_format",
        ),
        (json!({"prompt": "x", "n": 17}), "n"),
        (json!({"prompt": "x", "top_p": 0}), "top_p"),
        (
            json!({"prompt": "x", "partial_images": 9, "stream": true}),
            "partial_images",
        ),
        (json!({"n": 1}), "prompt"),
    ] {
        let e = post(&s, "/v1/images/generations", &body).await.error(400);
        assert_eq!(e["param"], param, "{body}: {e}");
    }
    let e = post(
        &s,
        "/v1/images/generations",
        &json!({"prompt": "x", "size": "512x512"}),
    )
    .await
    .error(400);
    assert!(e["message"].as_str().unwrap().contains("384x384"), "{e}");

    // 404: unknown model (OpenAI's code) and unknown route; 405: wrong method.
    let mut b = user(json!("hi"));
    b["model"] = json!("gpt-4o");
    let e = post(&s, "/v1/chat/completions", &b).await.error(404);
    assert_eq!(e["code"], "model_not_found");
    let e = post(
        &s,
        "/v1/images/generations",
        &json!({"prompt": "x", "model": "dall-e-3"}),
    )
    .await
    .error(404);
    assert_eq!(e["code"], "model_not_found");
    send(c.get(s.url("/v1/completions"))).await.error(404);
    send(c.get(s.url("/v1/chat/completions"))).await.error(405);

    // 413: a body over --max-message-bytes plus the base64 overhead.
    let big = "A".repeat(700_000);
    let e = post(&s, "/v1/chat/completions", &user(json!(big)))
        .await
        .error(413);
    assert_eq!(e["code"], "request_too_large");

    // 504: the deadline header passes while the images are drawn; the message names it.
    let e = send(
        c.post(s.url("/v1/images/generations"))
            .header("x-janus-timeout", "0.01")
            .json_body(&json!({"prompt": "x", "n": 4})),
    )
    .await
    .error(504);
    assert_eq!(e["code"], "deadline_exceeded");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("the caller's deadline (x-janus-timeout: 0.01 s) passed"),
        "{e}"
    );
    // A deadline shorter than the gateway could serve is over on arrival: 504 at once, naming
    // it; but an invalid body gets its 400 first, whatever the deadline.
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "top_p": 7}),
        ),
        ("/v1/images/generations", json!({"prompt": "x", "top_p": 7})),
    ] {
        let e = send(
            c.post(s.url(path))
                .header("x-janus-timeout", "1e-6")
                .json_body(&body),
        )
        .await
        .error(400);
        assert_eq!(e["param"], "top_p", "{path}: {e}");
    }
    let e = send(
        c.post(s.url("/v1/chat/completions"))
            .header("x-janus-timeout", "1e-6")
            .json_body(&user(json!("hi"))),
    )
    .await
    .error(504);
    assert_eq!(e["code"], "deadline_exceeded");
    assert_eq!(
        e["message"],
        "the caller's deadline (x-janus-timeout: 0.000001 s) was over on arrival: nothing was started"
    );
    let e = send(
        c.get(s.url("/v1/models"))
            .header("x-janus-timeout", "0.0005"),
    )
    .await
    .error(504);
    assert!(e["message"].as_str().unwrap().contains("0.0005 s"), "{e}");
    for bad in ["soon", "0", "-1", "1e9", "inf"] {
        let e = send(
            c.post(s.url("/v1/chat/completions"))
                .header("x-janus-timeout", bad)
                .json_body(&user(json!("hi"))),
        )
        .await
        .error(400);
        assert_eq!(e["param"], "x-janus-timeout", "{bad}: {e}");
        assert_eq!(e["code"], "invalid_header", "{bad}: {e}");
    }

    // Still serving, with the served model named.
    let mut b = user(json!("hi"));
    b["model"] = json!(id);
    let r = post(&s, "/v1/chat/completions", &b).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_a_full_queue() {
    let s = Server::serve(
        &["--gen-max-queue", "1", "--gen-max-batch", "1"],
        &[("JANUS_API_KEYS", KEY)],
    );
    let c = client();
    // 401 without a key, with a malformed header and with an unknown key; the page stays open.
    let e = send(c.get(s.url("/v1/models"))).await.error(401);
    assert_eq!(e["code"], "invalid_api_key");
    assert!(e["message"].as_str().unwrap().contains("missing"), "{e}");
    send(
        c.get(s.url("/v1/models"))
            .header("authorization", "Basic eDp5"),
    )
    .await
    .error(401);
    let e = send(c.get(s.url("/v1/models")).bearer_auth("sk-wrong"))
        .await
        .error(401);
    assert!(
        !e["message"].as_str().unwrap().contains("sk-wrong"),
        "never echoes a key"
    );
    send(
        c.post(s.url("/v1/chat/completions"))
            .json_body(&json!({"messages": []})),
    )
    .await
    .error(401);
    assert_eq!(send(c.get(s.url("/"))).await.status, 200);
    assert_eq!(send(c.get(s.url("/openapi.json"))).await.status, 200);
    let r = send(c.get(s.url("/v1/models")).bearer_auth(KEY)).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // 429 with Retry-After: one request drawing, one waiting, the others refused.
    let body = json!({"prompt": "a long drawing", "n": 4});
    let calls = (0..4).map(|_| {
        let req = c
            .post(s.url("/v1/images/generations"))
            .bearer_auth(KEY)
            .json_body(&body);
        send(req)
    });
    let replies = futures_join(calls).await;
    let refused: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert!(
        !refused.is_empty(),
        "a queue of 1 refuses some of 4 concurrent requests"
    );
    for r in &refused {
        let e = r.error(429);
        assert_eq!(e["code"], "queue_full");
        assert_eq!(r.headers["retry-after"], "1");
    }
    assert!(
        replies.iter().any(|r| r.status == 200),
        "the first one is drawn"
    );
    assert!(replies.iter().all(|r| r.status == 200 || r.status == 429));
}

/// Awaits futures concurrently, in order.
async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futs.map(|f| Box::pin(f)).collect();
    let mut out = Vec::new();
    let mut set: Vec<_> = handles.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, slot) in set.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.extend(results.into_iter().map(Option::unwrap));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_backend_is_503() {
    // A gateway alone whose backends are down.
    let s = Server::start(
        &[
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--understanding-backends",
            "127.0.0.1:1",
            "--generation-backends",
            "127.0.0.1:1",
            "--connect-timeout",
            "0.2",
            "--http-listen",
            "127.0.0.1:0",
        ],
        &[("RUST_LOG", "info")],
    );
    let e = post(
        &s,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .error(503);
    assert_eq!(e["code"], "service_unavailable");
    let r = send(client().get(s.url("/v1/models"))).await;
    assert_eq!(r.headers["retry-after"], "1");
    r.error(503);
}

/// A loopback HTTP server for image URLs: `/square.png`, `/big` (over the limit), `/slow`
/// (never answers), anything else 404. Returns its port.
fn image_host() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let png = std::fs::read(fixture().join("square.png")).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let png = png.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let n = conn.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
                let (status, body): (&str, Vec<u8>) = match path.as_str() {
                    "/square.png" => ("200 OK", png),
                    "/big" => ("200 OK", vec![0u8; 2_000_000]),
                    "/slow" => {
                        std::thread::sleep(Duration::from_secs(30));
                        return;
                    }
                    _ => ("404 Not Found", b"no".to_vec()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: image/png\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(&body);
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_images_are_fetched_only_from_allowed_hosts() {
    let port = image_host();
    let allowed = format!("127.0.0.1:{port}");
    let s = Server::serve(
        &[
            "--image-fetch-hosts",
            &allowed,
            "--image-fetch-max-bytes",
            "1000000",
            "--image-fetch-timeout",
            "1",
        ],
        &[],
    );
    let ask = |url: String| {
        json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": url}}]}], "max_tokens": 2})
    };
    let r = post(
        &s,
        "/v1/chat/completions",
        &ask(format!("http://{allowed}/square.png")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.json()["usage"]["prompt_tokens"].as_u64().unwrap() > 576,
        "the image was used"
    );
    for (url, words) in [
        (format!("http://127.0.0.2:{port}/square.png"), "not allowed"),
        (format!("http://{allowed}/big"), "over 1000000 bytes"),
        (format!("http://{allowed}/slow"), "longer than"),
        (format!("http://{allowed}/missing.png"), "HTTP 404"),
    ] {
        let e = post(&s, "/v1/chat/completions", &ask(url.clone()))
            .await
            .error(400);
        assert_eq!(e["param"], "messages[0].content[1].image_url", "{url}");
        assert!(e["message"].as_str().unwrap().contains(words), "{url}: {e}");
    }
    let r = post(
        &s,
        "/v1/chat/completions",
        &ask(format!("http://{allowed}/square.png")),
    )
    .await;
    assert_eq!(r.status, 200, "still serving: {}", r.body);
}

/// The port of a server's HTTP URL.
fn port_of(s: &Server) -> u16 {
    s.http.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_use_is_refused_by_default() {
    let s = Server::serve(&["--max-new-tokens-limit", "64"], &[]);
    let c = client();
    let port = port_of(&s);
    let hi = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});

    // POST bodies must be declared JSON: what a page's form or text/plain fetch sends is 415.
    for (ct, shown) in [
        (Some("text/plain"), "'text/plain'"),
        (
            Some("text/plain; charset=utf-8"),
            "'text/plain; charset=utf-8'",
        ),
        (
            Some("application/x-www-form-urlencoded"),
            "'application/x-www-form-urlencoded'",
        ),
        (
            Some("multipart/form-data; boundary=x"),
            "'multipart/form-data; boundary=x'",
        ),
        (None, "no Content-Type"),
    ] {
        for path in ["/v1/chat/completions", "/v1/images/generations"] {
            let mut req = c.post(s.url(path)).body(hi.to_string());
            if let Some(ct) = ct {
                req = req.header("content-type", ct);
            }
            let e = send(req).await.error(415);
            assert_eq!(e["code"], "unsupported_media_type", "{ct:?}: {e}");
            let m = e["message"].as_str().unwrap();
            assert!(m.contains(shown) && m.contains("application/json"), "{m}");
        }
    }
    for ct in ["application/json; charset=utf-8", "Application/JSON"] {
        let r = send(
            c.post(s.url("/v1/chat/completions"))
                .header("content-type", ct)
                .body(hi.to_string()),
        )
        .await;
        assert_eq!(r.status, 200, "{ct}: {}", r.body);
    }

    // Host: localhost and the listen IP are served; any other name is 403 on every route.
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "localhost".into(),
    ] {
        let r = send(c.get(s.url("/v1/models")).header("host", &host)).await;
        assert_eq!(r.status, 200, "{host}: {}", r.body);
    }
    for path in ["/v1/models", "/", "/openapi.json", "/v1/nowhere"] {
        let e = send(
            c.get(s.url(path))
                .header("host", format!("rebound.example:{port}")),
        )
        .await
        .error(403);
        assert_eq!(e["code"], "host_not_allowed", "{path}: {e}");
        let m = e["message"].as_str().unwrap();
        assert!(
            m.contains(&format!("'rebound.example:{port}'")) && m.contains("--allowed-hosts"),
            "{m}"
        );
        assert!(!m.contains("API key"), "no keys configured: {m}");
    }
    let e = send(
        c.post(s.url("/v1/chat/completions"))
            .header("host", "127.0.0.2")
            .json_body(&hi),
    )
    .await
    .error(403);
    assert_eq!(e["code"], "host_not_allowed");

    // No CORS configured: every preflight is refused, naming the origin and the flag.
    let e = send(
        c.request(reqwest::Method::OPTIONS, s.url("/v1/chat/completions"))
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type"),
    )
    .await
    .error(403);
    assert_eq!(e["code"], "origin_not_allowed");
    let m = e["message"].as_str().unwrap();
    assert!(
        m.contains("'https://app.example.com'") && m.contains("--cors-origins"),
        "{m}"
    );

    // A cross-site POST is refused before it runs, whatever its content type; the page's
    // own origin (the playground) is served.
    for ct in ["text/plain", "application/json"] {
        let e = send(
            c.post(s.url("/v1/images/generations"))
                .header("origin", "https://evil.example")
                .header("content-type", ct)
                .body(json!({"prompt": "x"}).to_string()),
        )
        .await
        .error(403);
        assert_eq!(e["code"], "origin_not_allowed", "{ct}: {e}");
        assert!(e["message"]
            .as_str()
            .unwrap()
            .contains("'https://evil.example'"));
    }
    let r = send(
        c.post(s.url("/v1/chat/completions"))
            .header("origin", format!("http://127.0.0.1:{port}"))
            .json_body(&hi),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.headers.get("access-control-allow-origin").is_none());
    // A cross-origin GET is answered (nothing runs) but without CORS headers: unreadable.
    let r = send(
        c.get(s.url("/v1/models"))
            .header("origin", "https://evil.example"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.headers.get("access-control-allow-origin").is_none());

    // The served OpenAPI document carries this server's limits.
    let spec = send(c.get(s.url("/openapi.json"))).await.json();
    let props = &spec["components"]["schemas"]["ChatCompletionRequest"]["properties"];
    assert_eq!(props["max_tokens"]["maximum"], 64);
    assert_eq!(props["min_tokens"]["maximum"], 64);
    let img = &spec["components"]["schemas"]["ImageRequest"]["properties"];
    assert_eq!(img["size"]["enum"], json!(["384x384", "auto", null]));
    assert_eq!(img["n"]["maximum"], 16);
    assert_eq!(img["prompt"]["type"], "string");
    assert!(
        img["prompt"]["pattern"].is_string(),
        "an empty prompt is refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_hosts_origins_and_keys() {
    let s = Server::serve(
        &["--allowed-hosts", "janus.example.com,api.example.com:8443"],
        &[
            ("JANUS_API_KEYS", KEY),
            (
                "JANUS_CORS_ORIGINS",
                "https://app.example.com, http://localhost:3000",
            ),
        ],
    );
    let c = client();
    let hi = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});

    // Listed hosts are served (any port for a bare name, the listed port otherwise).
    for host in [
        "janus.example.com",
        "janus.example.com:1234",
        "api.example.com:8443",
    ] {
        let r = send(
            c.get(s.url("/v1/models"))
                .header("host", host)
                .bearer_auth(KEY),
        )
        .await;
        assert_eq!(r.status, 200, "{host}: {}", r.body);
        let r = send(c.get(s.url("/")).header("host", host)).await;
        assert_eq!(r.status, 200, "{host}: {}", r.body);
    }
    // An unlisted host: 403 without a valid key (the message says a key would do), served
    // with one, as OpenAI clients reaching the server by any name expect.
    for (what, key) in [("no key", None), ("a wrong key", Some("sk-wrong"))] {
        let mut req = c
            .get(s.url("/v1/models"))
            .header("host", "api.example.com:9999");
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let e = send(req).await.error(403);
        assert_eq!(e["code"], "host_not_allowed", "{what}");
        assert!(
            e["message"].as_str().unwrap().contains("valid API key"),
            "{e}"
        );
    }
    let r = send(
        c.post(s.url("/v1/chat/completions"))
            .header("host", "gateway.elsewhere.example")
            .bearer_auth(KEY)
            .json_body(&hi),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Preflight from a listed origin: 204 with the CORS headers; from another: 403.
    let r = send(
        c.request(reqwest::Method::OPTIONS, s.url("/v1/chat/completions"))
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            ),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let h = |name: &str| {
        r.headers
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing: {:?}", r.headers))
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(h("access-control-allow-origin"), "https://app.example.com");
    assert_eq!(h("access-control-allow-methods"), "GET, POST, OPTIONS");
    let allowed = h("access-control-allow-headers");
    for name in [
        "authorization",
        "content-type",
        "x-request-id",
        "x-janus-timeout",
        "traceparent",
        "tracestate",
        "baggage",
    ] {
        assert!(allowed.contains(name), "{name} in {allowed}");
    }
    assert!(h("access-control-max-age").parse::<u32>().unwrap() > 0);
    assert_eq!(h("vary").to_ascii_lowercase(), "origin");
    let e = send(
        c.request(reqwest::Method::OPTIONS, s.url("/v1/models"))
            .header("origin", "https://app.example.com.evil.example")
            .header("access-control-request-method", "GET"),
    )
    .await
    .error(403);
    assert_eq!(e["code"], "origin_not_allowed");
    let r = send(
        c.request(reqwest::Method::OPTIONS, s.url("/v1/models"))
            .header("origin", "http://localhost:3000")
            .header("access-control-request-method", "GET"),
    )
    .await;
    assert_eq!(
        r.status, 204,
        "the second listed origin (from the variable)"
    );

    // The actual request from a listed origin: served, readable by the page.
    let r = send(
        c.post(s.url("/v1/chat/completions"))
            .header("origin", "https://app.example.com")
            .header("x-request-id", "cors-1")
            .bearer_auth(KEY)
            .json_body(&hi),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(r.headers["vary"], "origin");
    assert!(r.headers["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .contains("x-request-id"));
    assert_eq!(r.headers["x-request-id"], "cors-1");
    // Errors to a listed origin are readable too.
    let r = send(
        c.post(s.url("/v1/chat/completions"))
            .header("origin", "https://app.example.com")
            .json_body(&hi),
    )
    .await;
    r.error(401);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    // Another origin's POST is refused even with a key; its GET is answered without CORS.
    let e = send(
        c.post(s.url("/v1/chat/completions"))
            .header("origin", "https://other.example")
            .bearer_auth(KEY)
            .json_body(&hi),
    )
    .await
    .error(403);
    assert_eq!(e["code"], "origin_not_allowed");
    let r = send(
        c.get(s.url("/v1/models"))
            .header("origin", "https://other.example")
            .bearer_auth(KEY),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.headers.get("access-control-allow-origin").is_none());
    assert_eq!(r.headers["vary"], "origin");
}

#[test]
fn malformed_site_flags_fail_at_start() {
    for (flag, value, words) in [
        ("--cors-origins", "app.example.com", "is not an origin"),
        (
            "--cors-origins",
            "https://app.example.com/",
            "is not an origin",
        ),
        ("--allowed-hosts", "janus.example.com/v1", "is not a host"),
    ] {
        let model = fixture().join("model");
        let out = Command::new(JANUS)
            .args(["serve", "--model", model.to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .args([flag, value])
            .env_remove("JANUS_API_KEYS")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value}: {err}");
        assert!(
            err.contains(flag) && err.contains(words),
            "{flag} {value}: {err}"
        );
    }
}
