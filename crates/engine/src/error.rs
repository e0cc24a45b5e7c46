//! The one error type of the engines; transports map it to their status codes.

use std::time::Duration;

/// Why a request was refused or stopped.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The request is malformed; `field` names the offending request field.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// Request field path, e.g. `messages[0].images[1]` or `sampling.top_p`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The admission queue is full.
    #[error("the server is overloaded: {queued} requests are already waiting (limit {limit}); retry later")]
    Overloaded {
        /// Requests waiting when this one arrived.
        queued: usize,
        /// The queue capacity.
        limit: usize,
    },
    /// The request's deadline passed.
    #[error("deadline exceeded after {0:?}")]
    DeadlineExceeded(Duration),
    /// The engine is shutting down or stopped.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A model or device failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// Shorthand for [`EngineError::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Converts a pipeline error; client errors become `InvalidArgument` with `field` mapped
    /// through `rename` (pipeline field name → request field path).
    pub fn from_pipeline(e: janus_pipeline::Error, rename: impl Fn(&str) -> String) -> Self {
        use janus_pipeline::Error as P;
        match e {
            P::InvalidArgument { field, reason } => Self::invalid(rename(field), reason),
            P::PromptTooLong { .. } => Self::invalid(rename("prompt"), e.to_string()),
            P::ImageCountMismatch { .. } => Self::invalid(rename("images"), e.to_string()),
            P::Image { index, ref source } => {
                Self::invalid(rename(&format!("images[{index}]")), source.to_string())
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

/// Result alias of the engines.
pub type Result<T> = std::result::Result<T, EngineError>;
