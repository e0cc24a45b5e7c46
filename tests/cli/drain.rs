//! Shutdown of a real `janus serve` process: after SIGTERM it keeps accepting connections while
//! it drains, a new connection sees health NOT_SERVING and a new call UNAVAILABLE ("draining"),
//! the request already running finishes whole, and the process then exits by itself long
//! before its grace period (the listener closes once nothing is in flight). The OpenAI HTTP
//! port of the gateway answers 503 during the drain too.

use crate::common::*;
use janus_proto::v1 as pb;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;
use tonic::{Code, Request};

const JANUS: &str = env!("CARGO_BIN_EXE_janus");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_answers_new_connections_and_finishes_running_requests() {
    let model = fixture().join("model");
    let mut server = Command::new(JANUS)
        .args(["serve", "--model", model.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--grace-period", "600"])
        .args([
            "--max-new-tokens-limit",
            "4000",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info")
        .env("JANUS_LOG_FORMAT", "text")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stderr = server.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut wait_line = async |what: &str| loop {
        match within(Duration::from_secs(120), what, rx.recv()).await {
            Some(l) if l.contains(what) => return l,
            Some(_) => {}
            None => panic!("server exited before printing '{what}'"),
        }
    };
    let http = wait_line("janus: http api on ")
        .await
        .split("janus: http api on ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    let url = wait_line("janus: serving on ")
        .await
        .split("janus: serving on ")
        .nth(1)
        .unwrap()
        .trim()
        .to_string();

    // A long answer (4000 tokens: seconds on the tiny model) keeps the drain busy.
    let mut c = und_client(&url).await;
    let mut running = c
        .understand(pb::UnderstandRequest {
            messages: vec![user("Tell me a long story.", vec![])],
            sampling: Some(pb::SamplingParams {
                min_new_tokens: Some(4000),
                ..greedy_sampling(4000)
            }),
            request_id: "long-one".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = within(WAIT, "first token", running.message())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        first.event,
        Some(pb::understand_response::Event::Token(_))
    ));
    let reader = tokio::spawn(async move {
        let mut tokens = 1;
        let mut fin = None;
        while let Some(m) = running.message().await.unwrap() {
            match m.event.unwrap() {
                pb::understand_response::Event::Token(_) => tokens += 1,
                pb::understand_response::Event::Final(f) => fin = Some(f),
            }
        }
        (tokens, fin.expect("a final message"))
    });

    let kill = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let said = wait_line("draining").await;
    assert!(said.contains("600"), "the log says how long: {said}");

    // A new connection during the drain: accepted, health NOT_SERVING, calls UNAVAILABLE.
    assert!(!reader.is_finished(), "the long request is still running");
    let ch = channel(&url).await;
    assert_eq!(health_status(ch.clone(), "").await, Some(2), "NOT_SERVING");
    assert_eq!(
        health_status(ch.clone(), janus_proto::UNDERSTANDING_SERVICE).await,
        Some(2)
    );
    let err = collect_answer(
        &mut und_client(&url).await,
        Request::new(pb::UnderstandRequest {
            messages: vec![user("hi", vec![])],
            ..Default::default()
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("draining"), "{}", err.message());
    let err = collect_images(
        &mut gen_client(&url).await,
        Request::new(Default::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // The OpenAI HTTP port of the same gateway: 503 in OpenAI's error shape.
    let r = reqwest::Client::new()
        .post(format!("{http}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(r#"{"model": "x", "messages": [{"role": "user", "content": "hi"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    let msg = body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(msg.contains("draining"), "{body}");
    assert!(
        !reader.is_finished(),
        "the checks ran while the request was in flight"
    );

    // The running request finishes whole, then the server exits on its own (grace: 600 s).
    let (tokens, fin) = within(WAIT, "long request", reader).await.unwrap();
    assert_eq!(fin.finish_reason, pb::FinishReason::Length as i32);
    assert_eq!(tokens, 4000);
    let status = within(Duration::from_secs(60), "server exit", async {
        loop {
            if let Some(s) = server.try_wait().unwrap() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(status.code(), Some(0));
    // The listener is closed now.
    assert!(
        tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
            .await
            .is_err()
    );
}
