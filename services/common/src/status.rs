//! The single mapping from engine errors to gRPC statuses.

use janus_engine::EngineError;
use tonic::{Code, Status};

/// Metadata key carrying the offending field of an INVALID_ARGUMENT status.
pub const FIELD_METADATA: &str = "janus-field";

/// Client errors → INVALID_ARGUMENT (the message and `janus-field` name the field), a full
/// queue → RESOURCE_EXHAUSTED, deadline → DEADLINE_EXCEEDED, shutdown → UNAVAILABLE, the rest →
/// INTERNAL.
pub fn to_status(e: &EngineError) -> Status {
    match e {
        EngineError::InvalidArgument { field, .. } => {
            let mut s = Status::invalid_argument(e.to_string());
            if let Ok(v) = field.parse() {
                s.metadata_mut().insert(FIELD_METADATA, v);
            }
            s
        }
        EngineError::Overloaded { .. } => Status::resource_exhausted(e.to_string()),
        EngineError::DeadlineExceeded(_) => Status::deadline_exceeded(e.to_string()),
        EngineError::Unavailable(_) => Status::unavailable(e.to_string()),
        EngineError::Internal(_) => Status::internal(e.to_string()),
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
        assert_eq!(
            to_status(&EngineError::Unavailable("x".into())).code(),
            Code::Unavailable
        );
    }
}
