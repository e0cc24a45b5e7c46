//! End-to-end tests through the gateway: real servers on 127.0.0.1 ephemeral ports, the
//! vendored tiny checkpoint, tonic clients.

use crate::common::*;
use janus_proto::v1 as pb;
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::{Code, Request};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_understanding_streams_the_golden_tokens() {
    let stack = start_stack(StackConfig::default()).await;
    let mut client = und_client(&stack.gw.url()).await;
    let g = Golden::load();
    let mut checked = 0;
    for (case, c) in g.cases("understanding") {
        let max_new = c["max_new_tokens"].as_u64().unwrap() as u32;
        let want = g.u32s(&case, "greedy_tokens");
        let texts = c["greedy_text"].as_array().unwrap();
        // Every conversation of a case (both rows of und_batch) as its own request, one at a time.
        for (row, conv) in c["conversations"].as_array().unwrap().iter().enumerate() {
            let id = format!("{case}-{row}");
            let mut req = Request::new(pb::UnderstandRequest {
                messages: Golden::messages(conv),
                sampling: Some(greedy_sampling(max_new)),
                request_id: String::new(),
            });
            req.metadata_mut()
                .insert("x-request-id", id.parse().unwrap());
            let a = collect_answer(&mut client, req).await.unwrap();
            let golden_row = &want[row * max_new as usize..(row + 1) * max_new as usize];
            assert_eq!(a.ids, golden_row, "{case} row {row}: token ids");
            assert_eq!(
                a.text,
                texts[row].as_str().unwrap(),
                "{case} row {row}: streamed text"
            );
            let fin = a.fin.expect("final message");
            assert_eq!(fin.finish_reason, pb::FinishReason::Length as i32);
            let usage = fin.usage.unwrap();
            assert_eq!(usage.completion_tokens, max_new);
            assert!(usage.prompt_tokens > 0);
            assert_eq!(
                fin.request_id, id,
                "x-request-id propagates through the gateway"
            );
            let t = fin.timings.unwrap();
            assert!(t.total_ms >= t.decode_ms && t.total_ms > 0.0);
            checked += 1;
        }
    }
    assert_eq!(checked, 4, "und_single, both und_batch rows, und_text_only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_generation_yields_the_golden_image_tokens() {
    let stack = start_stack(StackConfig::default()).await;
    let g = Golden::load();
    let cases = g.cases("generation");
    let url = stack.gw.url();
    // Both cases concurrently (the engine interleaves them); gen0 with n = 2 and previews.
    let runs = cases.iter().enumerate().map(|(k, (case, c))| {
        let url = url.clone();
        let req = pb::GenerateRequest {
            prompt: c["prompt"].as_str().unwrap().into(),
            n: Some(if k == 0 { 2 } else { 1 }),
            cfg_weight: Some(c["cfg_weight"].as_f64().unwrap() as f32),
            temperature: Some(0.0),
            seed: Some(7),
            output_format: pb::OutputFormat::Png as i32,
            preview_interval: if k == 0 { 12 } else { 0 },
            ..Default::default()
        };
        let case = case.clone();
        async move {
            let mut client = gen_client(&url).await;
            (
                case,
                collect_images(&mut client, Request::new(req))
                    .await
                    .unwrap(),
            )
        }
    });
    let results = futures_join(runs.collect()).await;
    for (case, out) in results {
        let want = g.u32s(&case, "greedy_image_tokens");
        let margins = g.f32s(&case, "top2_margins");
        let first_small = margins
            .iter()
            .position(|&m| m <= 1e-3)
            .unwrap_or(margins.len());
        // Progress: every step, in order.
        assert_eq!(out.total, 576, "{case}");
        assert_eq!(
            out.steps,
            (1..=576).collect::<Vec<u32>>(),
            "{case}: progress step by step"
        );
        let n = out.images.len();
        assert!(n == 1 || n == 2, "{case}");
        for (i, img) in out.images.iter().enumerate() {
            assert_eq!(img.index as usize, i);
            assert_eq!(img.seed, 7 + i as u64);
            assert_eq!(img.tokens.len(), 576);
            assert_eq!(img.mime_type, "image/png");
            assert_eq!(
                img.tokens[..first_small],
                want[..first_small],
                "{case} image {i}: golden tokens up to the first step with margin ≤ 1e-3 ({first_small})"
            );
            let decoded = image::load_from_memory(&img.data).unwrap().to_rgb8();
            assert_eq!(decoded.dimensions(), (384, 384));
            assert_eq!((img.width, img.height), (384, 384));
        }
        if n == 2 {
            assert_eq!(
                out.images[0].tokens, out.images[1].tokens,
                "greedy images are equal"
            );
            // Preview every 12 rows of 24 → one at step 288 per image.
            assert_eq!(out.previews.len(), 2, "{case}: previews");
            for p in &out.previews {
                assert_eq!(p.step, 288);
                let thumb = image::load_from_memory(&p.png).unwrap();
                assert_eq!((thumb.width(), thumb.height()), (p.width, p.height));
            }
        } else {
            assert!(out.previews.is_empty());
        }
        if first_small == 576 {
            // Every token is pinned down: the picture must match the reference's to ±1 level.
            let golden = image::open(fixture().join(format!("{case}_greedy.png")))
                .unwrap()
                .to_rgb8();
            let ours = image::load_from_memory(&out.images[0].data)
                .unwrap()
                .to_rgb8();
            let off = ours
                .as_raw()
                .iter()
                .zip(golden.as_raw())
                .filter(|(a, b)| a.abs_diff(**b) > 1)
                .count();
            assert_eq!(off, 0, "{case}: decoded image differs from the reference");
        }
        let fin = out.fin.expect("final message");
        assert_eq!(fin.usage.unwrap().completion_tokens as usize, 576 * n);
    }
}

/// Runs futures concurrently and returns their outputs in order.
async fn futures_join<F: std::future::Future + Send + 'static>(futs: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// A sampled request. top_k = 3: inverse-CDF sampling over all 16 384 codes of the
/// random-weight fixture (near-uniform probabilities) flips on last-bit logit differences, which
/// the CPU kernels do not rule out between runs; among 3 candidates it cannot.
fn sampled(seed: u64, n: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: "a lighthouse at dusk".into(),
        n: Some(n),
        temperature: Some(1.0),
        top_k: Some(3),
        seed: Some(seed),
        output_format: pb::OutputFormat::TokensOnly as i32,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_seed_same_images_other_seed_other_images() {
    // One request at a time: batching with other requests changes float summation order, which
    // can move a sample drawn right at a probability boundary (see tests/pipeline/batching.rs).
    let mut cfg = StackConfig::default();
    cfg.gen.max_batch = 1;
    let stack = start_stack(cfg).await;
    let url = stack.gw.url();
    let reqs = vec![sampled(100, 2), sampled(100, 2), sampled(200, 1)];
    let outs = futures_join(
        reqs.into_iter()
            .map(|r| {
                let url = url.clone();
                async move {
                    let mut c = gen_client(&url).await;
                    collect_images(&mut c, Request::new(r)).await.unwrap()
                }
            })
            .collect(),
    )
    .await;
    let (a, b, c) = (&outs[0], &outs[1], &outs[2]);
    assert_eq!(a.images.len(), 2, "n = 2 gives two images");
    assert_eq!(c.images.len(), 1);
    for img in a.images.iter().chain(&c.images) {
        assert!(
            img.data.is_empty() && img.mime_type.is_empty(),
            "tokens only"
        );
        assert_eq!(img.tokens.len(), 576);
    }
    assert_eq!((a.images[0].seed, a.images[1].seed), (100, 101));
    assert_eq!(
        a.images.iter().map(|i| &i.tokens).collect::<Vec<_>>(),
        b.images.iter().map(|i| &i.tokens).collect::<Vec<_>>(),
        "same seed, same images"
    );
    assert_ne!(
        a.images[0].tokens, a.images[1].tokens,
        "image 1 uses seed + 1"
    );
    assert_ne!(
        a.images[0].tokens, c.images[0].tokens,
        "another seed, another image"
    );
}

async fn und_stats(url: &str) -> pb::EngineStats {
    und_client(url)
        .await
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap()
}

async fn gen_stats(url: &str) -> pb::EngineStats {
    gen_client(url)
        .await
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_stream_stops_its_work() {
    let mut cfg = StackConfig::default();
    cfg.und.max_new_tokens_limit = 16000;
    let stack = start_stack(cfg).await;
    let gw = stack.gw.url();

    // Generation: read a few progress messages, then drop the stream.
    {
        let mut c = gen_client(&gw).await;
        // 16 images: long enough that the work cannot finish before the cancellation arrives.
        let mut s = c.generate(sampled(1, 16)).await.unwrap().into_inner();
        for _ in 0..5 {
            within(WAIT, "progress", s.message())
                .await
                .unwrap()
                .unwrap();
        }
    }
    wait_for(Duration::from_secs(20), "generation work stops", || async {
        let st = gen_stats(&gw).await;
        st.active == 0 && st.cancelled == 1
    })
    .await;
    let st = gen_stats(&gw).await;
    assert_eq!(
        st.completed, 0,
        "the cancelled request did not run to the end"
    );
    assert!(st.steps < 577, "stopped before all 576 steps: {}", st.steps);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        gen_stats(&gw).await.steps,
        st.steps,
        "no steps after cancellation"
    );

    // Understanding: a long answer, dropped after three tokens.
    {
        let mut c = und_client(&gw).await;
        let req = pb::UnderstandRequest {
            messages: vec![user("Tell a long story.", vec![])],
            sampling: Some(greedy_sampling(16000)),
            request_id: String::new(),
        };
        let mut s = c.understand(req).await.unwrap().into_inner();
        for _ in 0..3 {
            within(WAIT, "token", s.message()).await.unwrap().unwrap();
        }
    }
    wait_for(
        Duration::from_secs(20),
        "understanding work stops",
        || async {
            let st = und_stats(&gw).await;
            st.active == 0 && st.cancelled == 1
        },
    )
    .await;
    let st = und_stats(&gw).await;
    assert_eq!(
        st.completed, 0,
        "the cancelled answer did not run to the end: {st:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        und_stats(&gw).await.steps,
        st.steps,
        "no steps after cancellation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_concurrent_clients_all_succeed() {
    let stack = start_stack(StackConfig::default()).await;
    let url = stack.gw.url();
    let images = ["wide.png", "tall.png", "square.png"];
    let outs = futures_join(
        (0..8)
            .map(|i| {
                let url = url.clone();
                let img = images[i % 3];
                async move {
                    let mut c = und_client(&url).await;
                    let req = pb::UnderstandRequest {
                        messages: vec![user(
                            &format!("<image_placeholder>\nQuestion {i}: what is shown?"),
                            vec![png_bytes(img)],
                        )],
                        sampling: Some(greedy_sampling(12)),
                        request_id: format!("client-{i}"),
                    };
                    collect_answer(&mut c, Request::new(req)).await.unwrap()
                }
            })
            .collect(),
    )
    .await;
    for (i, a) in outs.iter().enumerate() {
        assert_eq!(a.ids.len(), 12, "client {i}");
        let fin = a.fin.as_ref().unwrap();
        assert_eq!(fin.request_id, format!("client-{i}"));
        assert_eq!(fin.finish_reason, pb::FinishReason::Length as i32);
    }
    let st = und_stats(&url).await;
    assert_eq!((st.completed, st.active, st.failed), (8, 0, 0));
}

async fn reflection_services_v1(url: &str) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut c = ServerReflectionClient::new(channel(url).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut s = within(
        WAIT,
        "reflection v1",
        c.server_reflection_info(tokio_stream::iter(vec![req])),
    )
    .await
    .unwrap()
    .into_inner();
    match within(WAIT, "reflection v1", s.next())
        .await
        .unwrap()
        .unwrap()
        .message_response
    {
        Some(MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

async fn reflection_v1alpha(url: &str) -> (Vec<String>, usize) {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    let mut c = ServerReflectionClient::new(channel(url).await);
    let reqs = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "grpc.health.v1.Health".into(),
            )),
        },
    ];
    let mut s = within(
        WAIT,
        "reflection v1alpha",
        c.server_reflection_info(tokio_stream::iter(reqs)),
    )
    .await
    .unwrap()
    .into_inner();
    let names = match within(WAIT, "v1alpha", s.next())
        .await
        .unwrap()
        .unwrap()
        .message_response
    {
        Some(MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    };
    let files = match within(WAIT, "v1alpha", s.next())
        .await
        .unwrap()
        .unwrap()
        .message_response
    {
        Some(MessageResponse::FileDescriptorResponse(f)) => f.file_descriptor_proto.len(),
        other => panic!("unexpected reflection answer {other:?}"),
    };
    (names, files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_and_reflection_answer_on_every_server() {
    let stack = start_stack(StackConfig::default()).await;
    let servers = [
        (
            "understanding",
            stack.und.url(),
            vec![janus_proto::UNDERSTANDING_SERVICE],
        ),
        (
            "generation",
            stack.gen.url(),
            vec![janus_proto::GENERATION_SERVICE],
        ),
        (
            "gateway",
            stack.gw.url(),
            vec![
                janus_proto::UNDERSTANDING_SERVICE,
                janus_proto::GENERATION_SERVICE,
            ],
        ),
    ];
    for (name, url, services) in servers {
        let ch = channel(&url).await;
        assert_eq!(
            health_status(ch.clone(), "").await,
            Some(1),
            "{name}: server SERVING"
        );
        for svc in &services {
            assert_eq!(
                health_status(ch.clone(), svc).await,
                Some(1),
                "{name}: {svc} SERVING"
            );
        }
        for listed in [
            reflection_services_v1(&url).await,
            reflection_v1alpha(&url).await.0,
        ] {
            for svc in services.iter().chain(&["grpc.health.v1.Health"]) {
                assert!(
                    listed.iter().any(|l| l == svc),
                    "{name}: reflection lists {svc}: {listed:?}"
                );
            }
        }
        assert!(
            reflection_v1alpha(&url).await.1 >= 1,
            "{name}: health descriptor registered"
        );
    }
    // Info through the gateway reaches each half.
    let gw = stack.gw.url();
    let ui = und_client(&gw)
        .await
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ui.half, pb::ModelHalf::Understanding as i32);
    assert_eq!(ui.device, "cpu");
    assert!(ui.limits.unwrap().context_window > 0);
    let gi = gen_client(&gw)
        .await
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gi.half, pb::ModelHalf::Generation as i32);
    assert_eq!(gi.limits.unwrap().image_tokens, 576);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_that_is_down_gives_unavailable_quickly() {
    // A port nobody listens on.
    let dead = {
        let l = bind().await;
        l.local_addr().unwrap().to_string()
    };
    let gw = start_gateway(vec![dead.clone()], vec![dead.clone()], Default::default()).await;
    let url = gw.url();
    let t0 = tokio::time::Instant::now();
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
    assert!(err.message().contains("understanding"), "{}", err.message());
    let err = collect_images(&mut gen_client(&url).await, Request::new(sampled(1, 1)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = und_client(&url)
        .await
        .info(pb::InfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(t0.elapsed() < Duration::from_secs(10), "fails quickly");
    // The gateway reports the services as not serving, itself as serving.
    let ch = channel(&url).await;
    assert_eq!(health_status(ch.clone(), "").await, Some(1));
    wait_for(
        Duration::from_secs(10),
        "gateway marks the service NOT_SERVING",
        || {
            let ch = ch.clone();
            async move { health_status(ch, janus_proto::UNDERSTANDING_SERVICE).await == Some(2) }
        },
    )
    .await;

    // A second, healthy backend takes over; the dead one is skipped.
    let cfg = StackConfig::default();
    let und = start_understanding(&cfg).await;
    let gw2 = start_gateway(vec![dead, und.url()], vec![], Default::default()).await;
    let mut c = und_client(&gw2.url()).await;
    for _ in 0..4 {
        let a = collect_answer(
            &mut c,
            Request::new(pb::UnderstandRequest {
                messages: vec![user("hi", vec![])],
                sampling: Some(greedy_sampling(2)),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
        assert_eq!(a.ids.len(), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadlines_answer_deadline_exceeded_and_stop_the_work() {
    let mut cfg = StackConfig::default();
    cfg.und.max_new_tokens_limit = 16000;
    let stack = start_stack(cfg).await;
    for url in [stack.gw.url(), stack.gen.url()] {
        // 16 images take far longer than the 300 ms deadline.
        let mut req = Request::new(sampled(3, 16));
        req.set_timeout(Duration::from_millis(300));
        let t0 = tokio::time::Instant::now();
        let err = collect_images(&mut gen_client(&url).await, req)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{url}: {err:?}");
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
    let gen = stack.gen.url();
    wait_for(Duration::from_secs(20), "generation work stops", || async {
        let st = gen_stats(&gen).await;
        st.active == 0 && st.cancelled == 2
    })
    .await;
    assert_eq!(gen_stats(&gen).await.completed, 0);
    // Understanding too.
    let mut req = Request::new(pb::UnderstandRequest {
        messages: vec![user("Tell a long story.", vec![])],
        sampling: Some(greedy_sampling(16000)),
        request_id: String::new(),
    });
    req.set_timeout(Duration::from_millis(200));
    let err = collect_answer(&mut und_client(&stack.gw.url()).await, req)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_cancels_in_flight_streams_after_the_grace_period() {
    let mut cfg = StackConfig::default();
    cfg.server.grace_period = Duration::from_millis(200);
    cfg.und.max_new_tokens_limit = 16000;
    let und = start_understanding(&cfg).await;
    let url = und.url();
    let mut c = und_client(&url).await;
    let req = pb::UnderstandRequest {
        messages: vec![user("Tell a very long story.", vec![])],
        sampling: Some(greedy_sampling(16000)),
        request_id: String::new(),
    };
    let mut s = c.understand(req).await.unwrap().into_inner();
    within(WAIT, "first token", s.message())
        .await
        .unwrap()
        .unwrap();
    und.shutdown();
    let mut last = None;
    let mut tokens = 1;
    while let Some(m) = within(WAIT, "stream end", s.message()).await.unwrap() {
        match m.event.unwrap() {
            pb::understand_response::Event::Token(_) => tokens += 1,
            pb::understand_response::Event::Final(f) => last = Some(f),
        }
    }
    let fin = last.expect("a final message");
    assert_eq!(
        fin.finish_reason,
        pb::FinishReason::Cancelled as i32,
        "after {tokens} tokens"
    );
    assert!(tokens < 16000);
    within(Duration::from_secs(20), "server stops", und.wait())
        .await
        .unwrap();
}

/// A stand-in backend that reports the metadata it received in `Info.model_id`.
#[derive(Default)]
struct Recorder;

#[tonic::async_trait]
impl janus_proto::v1::understanding_server::Understanding for Recorder {
    type UnderstandStream = janus_service::stream::BoxStream<pb::UnderstandResponse>;

    async fn understand(
        &self,
        _req: Request<pb::UnderstandRequest>,
    ) -> Result<tonic::Response<Self::UnderstandStream>, tonic::Status> {
        Err(tonic::Status::permission_denied(
            "recorder: no answers here",
        ))
    }

    async fn info(
        &self,
        req: Request<pb::InfoRequest>,
    ) -> Result<tonic::Response<pb::InfoResponse>, tonic::Status> {
        let get = |k: &str| {
            req.metadata()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        Ok(tonic::Response::new(pb::InfoResponse {
            model_id: format!(
                "{}|{}|{}",
                get("x-request-id"),
                get("traceparent"),
                get("tracestate")
            ),
            ..Default::default()
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_propagates_request_id_and_trace_context() {
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<janus_proto::v1::understanding_server::UnderstandingServer<Recorder>>()
        .await;
    let listener = bind().await;
    let addr = listener.local_addr().unwrap();
    let backend = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_svc)
            .add_service(janus_proto::v1::understanding_server::UnderstandingServer::new(Recorder))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let gw = start_gateway(vec![addr.to_string()], vec![], Default::default()).await;
    let mut c = und_client(&gw.url()).await;

    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut req = Request::new(pb::InfoRequest {});
    req.metadata_mut()
        .insert("x-request-id", "req-42".parse().unwrap());
    req.metadata_mut()
        .insert("traceparent", tp.parse().unwrap());
    req.metadata_mut()
        .insert("tracestate", "vendor=1".parse().unwrap());
    let seen = c.info(req).await.unwrap().into_inner().model_id;
    assert_eq!(seen, format!("req-42|{tp}|vendor=1"));

    // Without an id the gateway makes one up.
    let seen = c
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .model_id;
    let id = seen.split('|').next().unwrap();
    assert_eq!(id.len(), 32, "{seen}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));

    // Backend statuses pass through with their code and message.
    let err = c
        .understand(pb::UnderstandRequest {
            messages: vec![user("hi", vec![])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("recorder"), "{}", err.message());
    backend.abort();
}
