//! Request ids through the gateway: a client-chosen id is kept when it is short and plain; one
//! with control characters, spaces, non-ASCII or over 128 characters is replaced by a generated
//! id (it never reaches the logs or the response headers raw).

use crate::common::*;
use janus_proto::v1 as pb;
use tonic::Request;

fn ask(id: &str) -> Request<pb::UnderstandRequest> {
    Request::new(pb::UnderstandRequest {
        messages: vec![user("Hi", vec![])],
        sampling: Some(greedy_sampling(2)),
        request_id: id.to_string(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_ids_are_kept_and_odd_ones_replaced() {
    let stack = start_stack(StackConfig::default()).await;
    let mut client = und_client(&stack.gw.url()).await;
    let final_id = |a: &Answer| a.fin.as_ref().unwrap().request_id.clone();

    let a = collect_answer(&mut client, ask("order-42/attempt:1"))
        .await
        .unwrap();
    assert_eq!(final_id(&a), "order-42/attempt:1");

    let long = "x".repeat(8 * 1024);
    for odd in [
        "line\nERROR forged by the client",
        "\u{1b}[31mred",
        "naïve",
        "two words",
        long.as_str(),
    ] {
        let a = collect_answer(&mut client, ask(odd)).await.unwrap();
        let id = final_id(&a);
        assert_ne!(id, odd);
        assert_eq!(id.len(), 32, "a generated id: {id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    }

    // The same rule for the x-request-id header when the body leaves the id empty.
    let mut req = ask("");
    req.metadata_mut()
        .insert("x-request-id", "tab\there".parse().unwrap());
    let resp = client.understand(req).await.unwrap();
    let header = resp
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(header.len(), 32, "{header}");
}
