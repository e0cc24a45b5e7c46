//! Batching through the services: concurrent requests that join a running batch (through
//! chunked prefill) and leave it produce exactly what they produce alone.

use crate::common::*;
use janus_proto::v1 as pb;
use std::time::Duration;
use tonic::Request;

/// The four golden conversations sent at once, with a tiny prefill chunk so the ones that
/// arrive while another decodes are prefilled in many pieces between decode steps; a fifth
/// request is cancelled midway. Each answer equals the reference's greedy tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_understanding_requests_keep_golden_tokens() {
    let mut cfg = StackConfig::default();
    cfg.und.step_tokens = 64;
    cfg.und.max_batch = 8;
    let stack = start_stack(cfg).await;
    let url = stack.gw.url();
    let g = Golden::load();
    let mut tasks = Vec::new();
    for (case, c) in g.cases("understanding") {
        let max_new = c["max_new_tokens"].as_u64().unwrap() as u32;
        let want = g.u32s(&case, "greedy_tokens");
        for (row, conv) in c["conversations"].as_array().unwrap().iter().enumerate() {
            let messages = Golden::messages(conv);
            let golden_row = want[row * max_new as usize..(row + 1) * max_new as usize].to_vec();
            let url = url.clone();
            let delay = Duration::from_millis(40 * tasks.len() as u64);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let mut client = und_client(&url).await;
                let req = Request::new(pb::UnderstandRequest {
                    messages,
                    sampling: Some(greedy_sampling(max_new)),
                    request_id: String::new(),
                });
                let a = collect_answer(&mut client, req).await.unwrap();
                (a.ids, golden_row)
            }));
        }
    }
    // A long request that is dropped after a few tokens.
    let cancel_url = url.clone();
    let cancelled = tokio::spawn(async move {
        let mut client = und_client(&cancel_url).await;
        let req = Request::new(pb::UnderstandRequest {
            messages: vec![user("Tell me a very long story.", vec![])],
            sampling: Some(greedy_sampling(400)),
            request_id: String::new(),
        });
        let mut s = client.understand(req).await.unwrap().into_inner();
        for _ in 0..3 {
            s.message().await.unwrap();
        }
    });
    let mut checked = 0;
    for t in tasks {
        let (got, want) = within(Duration::from_secs(120), "answer", t).await.unwrap();
        assert_eq!(got, want, "request {checked}");
        checked += 1;
    }
    cancelled.await.unwrap();
    assert_eq!(checked, 4);
    let mut info =
        pb::understanding_client::UnderstandingClient::new(channel(&stack.und.url()).await);
    wait_for(Duration::from_secs(20), "engine idle", || {
        let mut info = info.clone();
        async move {
            let s = info
                .info(pb::InfoRequest {})
                .await
                .unwrap()
                .into_inner()
                .stats
                .unwrap();
            s.active == 0 && s.queued == 0
        }
    })
    .await;
    let s = info
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert_eq!(s.completed, 4);
    assert!(s.cancelled >= 1);
}
