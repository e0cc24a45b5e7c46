//! The single mapping from engine errors to gRPC statuses.

use janus_engine::EngineError;
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

/// Client errors → INVALID_ARGUMENT (the message, a `google.rpc.BadRequest` field violation
/// and `janus-field` name the field), a full
/// queue → RESOURCE_EXHAUSTED, deadline → DEADLINE_EXCEEDED, shutdown → UNAVAILABLE, the rest →
/// INTERNAL.
pub fn to_status(e: &EngineError) -> Status {
    match e {
        EngineError::InvalidArgument { field, reason } => {
            invalid_field(field, e.to_string(), reason)
        }
        EngineError::Overloaded { .. } => Status::resource_exhausted(e.to_string()),
        EngineError::DeadlineExceeded(_) => Status::deadline_exceeded(e.to_string()),
        EngineError::Unavailable(_) => Status::unavailable(capped(e.to_string())),
        EngineError::Internal(_) => Status::internal(capped(e.to_string())),
    }
}

/// A status for a deadline that passed while the request was handled at this hop.
pub fn deadline_status(what: &str) -> Status {
    Status::new(
        Code::DeadlineExceeded,
        format!("deadline exceeded while {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let s = to_status(&EngineError::invalid("sampling.top_p", "must be in (0, 1]"));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("sampling.top_p"));
        assert_eq!(s.metadata().get(FIELD_METADATA).unwrap(), "sampling.top_p");
        let bad = s.get_details_bad_request().expect("BadRequest details");
        assert_eq!(bad.field_violations.len(), 1);
        assert_eq!(bad.field_violations[0].field, "sampling.top_p");
        assert_eq!(bad.field_violations[0].description, "must be in (0, 1]");
        // The details survive the trip through HTTP/2 headers (as the gateway sees them).
        let mut headers = http::HeaderMap::new();
        s.add_header(&mut headers).unwrap();
        let back = Status::from_header_map(&headers).unwrap();
        assert_eq!(
            back.get_details_bad_request().unwrap().field_violations[0].field,
            "sampling.top_p"
        );
        let s = to_status(&EngineError::Overloaded {
            queued: 1,
            limit: 1,
        });
        assert_eq!(s.code(), Code::ResourceExhausted);
        let s = to_status(&EngineError::DeadlineExceeded(
            std::time::Duration::from_millis(5),
        ));
        assert_eq!(s.code(), Code::DeadlineExceeded);
        assert_eq!(
            to_status(&EngineError::Internal("x".into())).code(),
            Code::Internal
        );
        // Quoted client input is cut, at a character boundary.
        let huge = format!("unknown role '{}'", "é".repeat(40_000));
        let s = to_status(&EngineError::invalid("messages[0].role", huge.clone()));
        assert!(
            s.message().len() < MAX_MESSAGE_BYTES + 64,
            "{}",
            s.message().len()
        );
        assert!(s.message().contains("bytes in all"));
        let bad = s.get_details_bad_request().unwrap();
        assert!(bad.field_violations[0].description.len() < MAX_MESSAGE_BYTES + 64);
        assert_eq!(capped("short"), "short");
        assert_eq!(
            to_status(&EngineError::Unavailable("x".into())).code(),
            Code::Unavailable
        );
    }
}
