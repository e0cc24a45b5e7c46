//! OpenAI's error body, `{"error":{"message","type","param","code"}}`, with its HTTP status,
//! and the one mapping from a `tonic::Status` of the gateway to it ([`ApiError::from_status`]).

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use janus_service::status::FIELD_METADATA;
use tonic::{Code, Status};

/// Seconds a client is told to wait (`Retry-After`) after a full queue or no backend.
pub(crate) const RETRY_AFTER_S: u64 = 1;

/// An error as an OpenAI-compatible client expects it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {message}")]
pub(crate) struct ApiError {
    pub status: StatusCode,
    /// The `type` field.
    pub kind: &'static str,
    pub message: String,
    /// The offending request parameter, in OpenAI's naming.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// `Retry-After` seconds.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 400 naming a parameter.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        e.param = Some(param.into());
        e.code("invalid_value")
    }

    /// 400 about the body as a whole: not JSON, or not a JSON object (`invalid_json`).
    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message).code("invalid_json")
    }

    /// 400 for a body that could not be read (the connection failed mid-body).
    pub fn unreadable_body(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message).code("invalid_body")
    }

    /// 400 for a request header with a bad value (`param`: the header's name).
    pub fn invalid_header(header: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
            .code("invalid_header");
        e.param = Some(header.to_string());
        e
    }

    /// 400 for an integer parameter outside the range this server accepts.
    pub fn out_of_range(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::invalid(param, message);
        e.code = Some("integer_out_of_range");
        e
    }

    /// 415 for a body that is not declared `application/json`.
    pub fn unsupported_media_type(received: Option<&str>) -> Self {
        let got = match received {
            Some(t) => format!("Content-Type '{t}'"),
            None => "no Content-Type".to_string(),
        };
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            format!(
                "the request body must be JSON sent with Content-Type: application/json, got {got}"
            ),
        )
        .code("unsupported_media_type")
    }

    /// 403 for a `Host` this server does not answer to (DNS rebinding).
    pub fn host_not_allowed(host: &str, keys: bool) -> Self {
        let key = if keys {
            ", or send a valid API key"
        } else {
            ""
        };
        Self::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            format!(
                "Host '{host}' is not allowed: this server answers to localhost and its own IP address; add the name with --allowed-hosts (JANUS_ALLOWED_HOSTS){key}"
            ),
        )
        .code("host_not_allowed")
    }

    /// 403 for a cross-origin request (or preflight) from an origin not in `--cors-origins`.
    pub fn origin_not_allowed(origin: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            format!(
                "cross-origin requests from '{origin}' are not allowed: list the origin with --cors-origins (JANUS_CORS_ORIGINS)"
            ),
        )
        .code("origin_not_allowed")
    }

    /// 504 for a caller's deadline (`x-janus-timeout`) that was over before any work began.
    pub fn deadline_over_on_arrival(header: &str, secs: f64) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            format!(
                "the caller's deadline ({header}: {secs} s) was over on arrival: nothing was started"
            ),
        )
        .code("deadline_exceeded")
    }

    /// A 504 from a passed deadline names the caller's deadline (`header: secs`) it came from.
    pub fn with_caller_deadline(mut self, header: &str, secs: Option<f64>) -> Self {
        if let (StatusCode::GATEWAY_TIMEOUT, Some(s)) = (self.status, secs) {
            if !self.message.starts_with("the caller's deadline") {
                self.message = format!(
                    "the caller's deadline ({header}: {s} s) passed: {}",
                    self.message
                );
            }
        }
        self
    }

    /// 400 for a parameter this server does not support.
    pub fn unsupported(param: &str, why: &str) -> Self {
        let mut e = Self::invalid(param, format!("'{param}' is not supported: {why}"));
        e.code = Some("unsupported_parameter");
        e
    }

    /// 400 for a parameter OpenAI does not know either.
    pub fn unrecognized(param: &str) -> Self {
        let mut e = Self::invalid(
            param,
            format!("Unrecognized request argument supplied: {param}"),
        );
        e.code = Some("unrecognized_argument");
        e
    }

    /// 404 for a model that is not served.
    pub fn model_not_found(model: &str, served: &[String]) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "The model `{model}` does not exist or you do not have access to it (served: {})",
                served.join(", ")
            ),
        )
        .code("model_not_found");
        e.param = Some("model".into());
        e
    }

    /// 404 for an unknown route.
    pub fn unknown_route(method: &http::Method, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Invalid URL ({method} {path}): see /openapi.json for the routes"),
        )
        .code("unknown_url")
    }

    /// 405 for a known route with another method.
    pub fn method_not_allowed(method: &http::Method, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("Method {method} is not allowed on {path}: see /openapi.json"),
        )
        .code("method_not_allowed")
    }

    /// 413 for a body over the limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "request body over {limit} bytes (the gateway's --max-message-bytes plus the base64 overhead of images)"
            ),
        )
        .code("request_too_large")
    }

    /// The one mapping of a gateway status to HTTP: INVALID_ARGUMENT (and OUT_OF_RANGE) → 400
    /// with the `janus-field` metadata translated by `param` (proto field → OpenAI parameter),
    /// UNAUTHENTICATED → 401, PERMISSION_DENIED → 403, NOT_FOUND → 404, RESOURCE_EXHAUSTED →
    /// 429 with `Retry-After` (413 when the request itself was too large), UNAVAILABLE → 503
    /// with `Retry-After`, DEADLINE_EXCEEDED → 504, UNIMPLEMENTED → 501, the rest → 500.
    pub fn from_status(s: &Status, param: impl Fn(&str) -> Option<String>) -> Self {
        let field = s
            .metadata()
            .get(FIELD_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let msg = s.message().to_string();
        match s.code() {
            Code::InvalidArgument | Code::OutOfRange => {
                let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", msg)
                    .code("invalid_value");
                e.param = field.as_deref().filter(|f| *f != "request").and_then(param);
                e
            }
            Code::Unauthenticated => {
                Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", msg)
                    .code("invalid_api_key")
            }
            Code::PermissionDenied => {
                Self::new(StatusCode::FORBIDDEN, "invalid_request_error", msg)
                    .code("permission_denied")
            }
            Code::NotFound => {
                Self::new(StatusCode::NOT_FOUND, "invalid_request_error", msg).code("not_found")
            }
            Code::ResourceExhausted if field.as_deref() == Some("request") => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", msg)
                    .code("request_too_large")
            }
            Code::ResourceExhausted => {
                let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", msg)
                    .code("queue_full");
                e.retry_after = Some(RETRY_AFTER_S);
                e
            }
            Code::Unavailable => {
                let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", msg)
                    .code("service_unavailable");
                e.retry_after = Some(RETRY_AFTER_S);
                e
            }
            Code::DeadlineExceeded => Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", msg)
                .code("deadline_exceeded"),
            Code::Unimplemented => {
                Self::new(StatusCode::NOT_IMPLEMENTED, "invalid_request_error", msg)
                    .code("not_implemented")
            }
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", msg)
                .code("internal_error"),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.body().to_string(),
        )
            .into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_field(mut s: Status, field: &str) -> Status {
        s.metadata_mut()
            .insert(FIELD_METADATA, field.parse().unwrap());
        s
    }

    #[test]
    fn statuses_map_to_openai_errors() {
        let rename = |f: &str| Some(f.trim_start_matches("sampling.").to_string());
        let e = ApiError::from_status(
            &with_field(Status::invalid_argument("bad top_p"), "sampling.top_p"),
            rename,
        );
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("top_p"));
        assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        assert_eq!(e.body()["error"]["message"], "bad top_p");
        let e = ApiError::from_status(
            &with_field(Status::invalid_argument("undecodable"), "request"),
            rename,
        );
        assert_eq!((e.status, e.param), (StatusCode::BAD_REQUEST, None));
        let full = ApiError::from_status(&Status::resource_exhausted("queue full"), rename);
        assert_eq!(full.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(full.retry_after, Some(RETRY_AFTER_S));
        let big = ApiError::from_status(
            &with_field(Status::resource_exhausted("too large"), "request"),
            rename,
        );
        assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
        for (code, want) in [
            (Code::Unauthenticated, 401),
            (Code::PermissionDenied, 403),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
            (Code::Internal, 500),
            (Code::Unknown, 500),
        ] {
            let e = ApiError::from_status(&Status::new(code, "x"), rename);
            assert_eq!(e.status.as_u16(), want, "{code:?}");
        }
        let r = full.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    }
}
