//! The one mapping from engine errors to gRPC statuses, and engine event streams as gRPC
//! response streams.

use janus_engine::EngineError;
use janus_service::status::{capped, invalid_field};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

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

/// An engine event receiver as a stream of converted messages.
pub fn from_engine<E, T>(
    rx: mpsc::Receiver<janus_engine::Result<E>>,
    mut convert: impl FnMut(E) -> T + Send + 'static,
) -> impl Stream<Item = Result<T, Status>> + Send + 'static
where
    E: Send + 'static,
    T: Send + 'static,
{
    ReceiverStream::new(rx).map(move |r| match r {
        Ok(e) => Ok(convert(e)),
        Err(e) => Err(to_status(&e)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use janus_service::status::{FIELD_METADATA, MAX_MESSAGE_BYTES};
    use tonic::Code;
    use tonic_types::StatusExt;

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
