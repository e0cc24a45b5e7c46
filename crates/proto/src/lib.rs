//! Generated code of the `janus.v1` protocol (`proto/janus/v1/*.proto`): messages, the
//! `Understanding` and `Generation` clients and servers, and the encoded file descriptor set
//! for server reflection. No logic lives here.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

/// `package janus.v1`.
pub mod v1 {
    tonic::include_proto!("janus.v1");
}

/// Encoded `FileDescriptorSet` of `janus.v1`, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("janus_v1_descriptor");

/// Full gRPC name of the understanding service (also its health-check name).
pub const UNDERSTANDING_SERVICE: &str = "janus.v1.Understanding";
/// Full gRPC name of the generation service (also its health-check name).
pub const GENERATION_SERVICE: &str = "janus.v1.Generation";
