//! Request bodies that are not valid messages, sent raw through the gateway: a truncated
//! protobuf or a string field that is not UTF-8 is INVALID_ARGUMENT (`janus-field: request`), a
//! message over the size limit is RESOURCE_EXHAUSTED, and the service keeps serving.

use crate::common::*;
use bytes::{Buf, BufMut};
use janus_proto::v1 as pb;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Code, Request, Status};

/// Sends and receives message bodies as raw bytes.
#[derive(Debug, Clone, Default)]
struct Raw;

#[derive(Debug)]
struct RawEncoder;

#[derive(Debug)]
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let v = src.chunk().to_vec();
        src.advance(v.len());
        Ok(Some(v))
    }
}

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

async fn send_raw(url: &str, path: &'static str, body: Vec<u8>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel(url).await);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut stream = grpc
        .server_streaming(Request::new(body), PathAndQuery::from_static(path), Raw)
        .await?
        .into_inner();
    while stream.message().await?.is_some() {}
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests() {
    let mut cfg = StackConfig::default();
    cfg.server.max_message_bytes = 64 * 1024;
    let stack = start_stack(cfg).await;
    let url = stack.gw.url();
    const GENERATE: &str = "/janus.v1.Generation/Generate";
    const UNDERSTAND: &str = "/janus.v1.Understanding/Understand";
    // GenerateRequest.prompt (field 1, length-delimited) holding bytes that are not UTF-8.
    let not_utf8 = vec![0x0A, 0x02, 0xFF, 0xFE];
    // A length prefix of 16 bytes followed by one.
    let truncated = vec![0x0A, 0x10, b'a'];
    for (path, body, what) in [
        (GENERATE, not_utf8.clone(), "not UTF-8"),
        (GENERATE, truncated.clone(), "truncated"),
        (UNDERSTAND, truncated, "truncated"),
    ] {
        let err = within(WAIT, what, send_raw(&url, path, body))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message().contains("invalid request"),
            "{}",
            err.message()
        );
        assert_eq!(
            err.metadata()
                .get("janus-field")
                .map(|v| v.to_str().unwrap()),
            Some("request")
        );
    }
    // Over the 64 KiB limit: a prompt of 100 000 bytes.
    let mut big = vec![0x0A, 0xA0, 0x8D, 0x06];
    big.extend(std::iter::repeat_n(b'a', 100_000));
    let err = within(WAIT, "oversized", send_raw(&url, GENERATE, big))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // Still serving.
    let mut client = und_client(&url).await;
    let a = collect_answer(
        &mut client,
        Request::new(pb::UnderstandRequest {
            messages: vec![user("Hi", vec![])],
            sampling: Some(greedy_sampling(2)),
            request_id: String::new(),
        }),
    )
    .await
    .unwrap();
    assert_eq!(a.ids.len(), 2);
}
