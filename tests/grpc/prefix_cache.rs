//! The caches through the gateway with API keys: `usage.cached_tokens` reports what a request
//! reused, entries are scoped per key (two keys, the same request: no hit across keys), and
//! `Info` and `/metrics` show the caches' sizes, limits and counters.

use crate::common::*;
use janus_engine::CacheScope;
use janus_proto::v1 as pb;
use janus_service::auth::{ApiKeys, AuthPolicy};
use janus_service::{Security, ServerOptions};
use std::sync::Arc;
use std::time::Duration;
use tonic::Request;

const KEY_A: &str = "cache-test-key-a";
const KEY_B: &str = "cache-test-key-b";

fn with_key<T>(body: T, key: &str) -> Request<T> {
    let mut r = Request::new(body);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

fn question() -> pb::UnderstandRequest {
    pb::UnderstandRequest {
        messages: vec![user(
            "<image_placeholder>\nWhat is shown?",
            vec![png_bytes("wide.png")],
        )],
        sampling: Some(greedy_sampling(4)),
        ..Default::default()
    }
}

fn usage(a: &Answer) -> pb::Usage {
    a.fin.as_ref().unwrap().usage.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_tokens_are_reported_and_scoped_per_key() {
    let mut cfg = StackConfig::default();
    cfg.und.prefix_cache_bytes = 1 << 30;
    cfg.und.image_cache_bytes = 1 << 28;
    cfg.und.cache_scope = CacheScope::Key;
    let und = start_understanding(&cfg).await;
    let gen = start_generation(&cfg).await;
    // Keys at the gateway only: it forwards the caller's `authorization` to the services.
    let server = ServerOptions {
        security: Security {
            auth: AuthPolicy {
                keys: Some(Arc::new(ApiKeys::new([KEY_A, KEY_B]).unwrap())),
                reflection_requires_key: false,
            },
            tls: None,
        },
        ..cfg.server.clone()
    };
    let gw = start_gateway(vec![und.url()], vec![gen.url()], server).await;
    let ch = channel(&gw.url()).await;
    wait_for(Duration::from_secs(20), "gateway sees the backend", || {
        let ch = ch.clone();
        async move { health_status(ch, janus_proto::UNDERSTANDING_SERVICE).await == Some(1) }
    })
    .await;
    let mut c = pb::understanding_client::UnderstandingClient::new(ch);
    let ask = |key| with_key(question(), key);

    let a1 = collect_answer(&mut c, ask(KEY_A)).await.unwrap();
    assert_eq!(usage(&a1).cached_tokens, 0);
    let prompt = usage(&a1).prompt_tokens;
    // The same request with the same key: all but the last prompt token reused.
    let a2 = collect_answer(&mut c, ask(KEY_A)).await.unwrap();
    assert_eq!(usage(&a2).cached_tokens, prompt - 1);
    assert_eq!(a2.ids, a1.ids);
    // Another key sees nothing of key A's entries, nor of its image's features.
    let b1 = collect_answer(&mut c, ask(KEY_B)).await.unwrap();
    assert_eq!(usage(&b1).cached_tokens, 0);
    assert_eq!(b1.ids, a1.ids);

    let info = c
        .info(with_key(pb::InfoRequest {}, KEY_A))
        .await
        .unwrap()
        .into_inner();
    let cache = info.cache.expect("understanding Info has the caches");
    assert_eq!(cache.scope, "key");
    assert_eq!(
        (cache.prefix_hits, cache.prefix_misses),
        (1, 2),
        "{cache:?}"
    );
    assert_eq!(cache.prefix_hit_tokens, u64::from(prompt - 1));
    assert_eq!((cache.image_hits, cache.image_misses), (0, 2), "{cache:?}");
    assert_eq!(cache.prefix_entries, 2, "one per key");
    assert_eq!(cache.prefix_limit_bytes, 1 << 30);
    assert!(cache.prefix_bytes > 0 && cache.prefix_bytes <= cache.prefix_limit_bytes);
    assert_eq!(cache.image_entries, 2);
    assert_eq!(cache.image_limit_bytes, 1 << 28);

    // The same counters in Prometheus, read at the scrape.
    let text = cfg.server.metrics.encode();
    for line in [
        r#"janus_prefix_cache_hits_total{half="understanding"} 1"#.to_string(),
        r#"janus_prefix_cache_misses_total{half="understanding"} 2"#.to_string(),
        format!(
            r#"janus_prefix_cache_hit_tokens_total{{half="understanding"}} {}"#,
            prompt - 1
        ),
        r#"janus_prefix_cache_evictions_total{half="understanding"} 0"#.to_string(),
        format!(
            r#"janus_prefix_cache_bytes{{half="understanding"}} {}"#,
            cache.prefix_bytes
        ),
        r#"janus_image_cache_misses_total{half="understanding"} 2"#.to_string(),
        // The generation half's prefix cache is off in this stack.
        r#"janus_prefix_cache_limit_bytes{half="generation"} 0"#.to_string(),
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
}

/// Two replicas behind the gateway (default balancing, prefix affinity): every second turn goes
/// to the replica that answered the first, so it reuses the first turn's prompt; the
/// conversations spread over both replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_routes_a_conversation_to_the_replica_that_holds_it() {
    let mut cfg = StackConfig::default();
    cfg.und.prefix_cache_bytes = 1 << 30;
    cfg.und.image_cache_bytes = 0;
    let (r1, r2) = (
        start_understanding(&cfg).await,
        start_understanding(&cfg).await,
    );
    let gen = start_generation(&cfg).await;
    let gw = start_gateway(
        vec![r1.url(), r2.url()],
        vec![gen.url()],
        cfg.server.clone(),
    )
    .await;
    let ch = channel(&gw.url()).await;
    wait_for(Duration::from_secs(20), "gateway sees the backends", || {
        let ch = ch.clone();
        async move { health_status(ch, janus_proto::UNDERSTANDING_SERVICE).await == Some(1) }
    })
    .await;
    let mut c = pb::understanding_client::UnderstandingClient::new(ch);
    // 16 conversations: all on one replica would take odds of 2 in 65 536.
    let conversations = 16;
    for i in 0..conversations {
        let first = user(
            &format!("<image_placeholder>\nQuestion {i}: what is shown?"),
            vec![png_bytes("wide.png")],
        );
        let turn = |messages| pb::UnderstandRequest {
            messages,
            sampling: Some(greedy_sampling(3)),
            ..Default::default()
        };
        let a1 = collect_answer(&mut c, Request::new(turn(vec![first.clone()])))
            .await
            .unwrap();
        let mut answer = pb::ChatMessage {
            role: "assistant".into(),
            content: a1.text.clone(),
            ..Default::default()
        };
        answer.images.clear();
        let a2 = collect_answer(
            &mut c,
            Request::new(turn(vec![first, answer, user("And then?", vec![])])),
        )
        .await
        .unwrap();
        let p1 = usage(&a1).prompt_tokens;
        assert!(
            usage(&a2).cached_tokens >= p1 - 1,
            "conversation {i}: turn 2 reused {} of turn 1's {p1}",
            usage(&a2).cached_tokens
        );
    }
    let mut entries = Vec::new();
    for r in [&r1, &r2] {
        let mut direct = und_client(&r.url()).await;
        let info = direct.info(pb::InfoRequest {}).await.unwrap().into_inner();
        entries.push(info.cache.unwrap().prefix_entries);
    }
    assert!(
        entries.iter().all(|&n| n > 0),
        "both replicas hold conversations: {entries:?}"
    );
    assert!(entries.iter().sum::<u32>() >= conversations, "{entries:?}");
}

/// Generation with its prefix cache on: the same prompt again takes both prompt rows whole
/// (`cached_tokens` = the prompt), and its images are the same, bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_generated_again_reuses_its_prefill() {
    let mut cfg = StackConfig::default();
    cfg.gen.prefix_cache_bytes = 1 << 28;
    let stack = start_stack(cfg).await;
    let mut c = gen_client(&stack.gw.url()).await;
    let ask = || {
        Request::new(pb::GenerateRequest {
            prompt: "a red apple on a table".into(),
            n: Some(1),
            seed: Some(3),
            temperature: Some(1.0),
            ..Default::default()
        })
    };
    let first = collect_images(&mut c, ask()).await.unwrap();
    let u1 = first.fin.as_ref().unwrap().usage.unwrap();
    assert_eq!(u1.cached_tokens, 0);
    let again = collect_images(&mut c, ask()).await.unwrap();
    let u2 = again.fin.as_ref().unwrap().usage.unwrap();
    assert_eq!(
        u2.cached_tokens, u2.prompt_tokens,
        "the whole prompt from the cache"
    );
    assert_eq!(again.images[0].tokens, first.images[0].tokens);
    assert_eq!(
        again.images[0].data, first.images[0].data,
        "bit-equal image"
    );
    let info = c.info(pb::InfoRequest {}).await.unwrap().into_inner();
    let cache = info.cache.expect("generation Info has its prefix cache");
    // Two prompt rows per request: the first missed both, the second hit both.
    assert_eq!(
        (cache.prefix_hits, cache.prefix_misses),
        (2, 2),
        "{cache:?}"
    );
    assert_eq!(cache.prefix_limit_bytes, 1 << 28);
}
