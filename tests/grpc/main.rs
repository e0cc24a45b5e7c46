//! The gRPC services and the gateway over real loopback sockets: golden outputs end to end,
//! batching through the services, every bad-input class and the corpus, malformed bodies,
//! request ids, keys and TLS, the gateway against model services that fail, and the caches
//! (cached tokens, per-key scopes, routing to the replica that holds a conversation).
//! One test binary; `cargo test --release --test grpc gateway_faults::` runs one file's tests.

#[path = "../common/mod.rs"]
mod common;

mod bad_input;
mod batching;
mod corpus;
mod gateway;
mod gateway_faults;
mod malformed;
mod prefix_cache;
mod request_ids;
mod security;
