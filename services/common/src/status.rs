//! Statuses every server sends: INVALID_ARGUMENT naming the offending field (BadRequest details
//! and `janus-field` metadata), messages capped in length, deadline statuses. The engine-error
//! mapping is `janus_model_service::status`.

use tonic::metadata::MetadataMap;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Metadata key carrying the offending field of an INVALID_ARGUMENT status.
pub const FIELD_METADATA: &str = "janus-field";

/// Longest status message (and field description) a server sends, in bytes. Messages may quote
/// what the client sent (an unknown role, a MIME type): quoted whole, a 64 KiB value would make
/// the `grpc-message` header larger than clients accept, and the answer unreadable.
pub const MAX_MESSAGE_BYTES: usize = 512;

/// `s` cut to [`MAX_MESSAGE_BYTES`] (at a character boundary), saying how long it was.
pub fn capped(s: impl Into<String>) -> String {
    let s = s.into();
    if s.len() <= MAX_MESSAGE_BYTES {
        return s;
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… (cut; {} bytes in all)", &s[..end], s.len())
}

/// An INVALID_ARGUMENT naming the offending request `field` three ways: in the message, in
/// gRPC's standard `google.rpc.BadRequest` details (one field violation, readable by every
/// language's client: `grpc-status-details-bin`) and in the `janus-field` metadata.
pub fn invalid_field(field: &str, message: impl Into<String>, description: &str) -> Status {
    field_status(Code::InvalidArgument, field, message, description)
}

/// [`invalid_field`] with another code (RESOURCE_EXHAUSTED for a request over the size limit).
pub fn field_status(
    code: Code,
    field: &str,
    message: impl Into<String>,
    description: &str,
) -> Status {
    let mut md = MetadataMap::new();
    if let Ok(v) = field.parse() {
        md.insert(FIELD_METADATA, v);
    }
    Status::with_error_details_and_metadata(
        code,
        capped(message),
        ErrorDetails::with_bad_request_violation(field, capped(description)),
        md,
    )
}

/// A status for a deadline that passed while the request was handled at this hop.
pub fn deadline_status(what: &str) -> Status {
    Status::new(
        Code::DeadlineExceeded,
        format!("deadline exceeded while {what}"),
    )
}
