//! Request metadata: deadlines (`grpc-timeout`), request ids and trace-context propagation.

use std::time::Duration;
use tonic::metadata::MetadataMap;

/// Metadata key of the request id.
pub const REQUEST_ID: &str = "x-request-id";

/// Keys forwarded from a gateway request to the backend: the request id, W3C trace context and
/// the caller's API key (`authorization`, for model services that check keys too).
pub const PROPAGATED: &[&str] = &[
    REQUEST_ID,
    "traceparent",
    "tracestate",
    "baggage",
    "authorization",
];

/// How much earlier than the client's deadline a handler gives up, so that its own, more
/// specific DEADLINE_EXCEEDED (e.g. "while waiting for a backend") comes before the server's
/// generic one ([`crate::deadline`]). A deadline no longer than this is over on arrival.
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(2);

/// The time this hop has for a request whose client set `grpc-timeout`
/// (`<1–8 digits><H|M|S|m|u|n>`), if any and valid: the timeout less [`DEADLINE_MARGIN`].
pub fn grpc_timeout(md: &MetadataMap) -> Option<Duration> {
    parse_grpc_timeout(md.get("grpc-timeout")?.to_str().ok()?)
        .map(|d| d.saturating_sub(DEADLINE_MARGIN))
}

/// Parses a `grpc-timeout` value.
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let v = v.trim();
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A new random request id (32 hex digits).
pub fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Longest client-chosen request id kept.
pub const MAX_REQUEST_ID: usize = 128;

/// Whether a client-chosen request id is kept as is: 1 to [`MAX_REQUEST_ID`] characters of
/// `A–Z a–z 0–9 . _ : / + = -` (safe in logs, headers and span attributes).
pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:/+=".contains(&b))
}

/// The request id to use: the body's field, else `x-request-id`, else a new one. An id that is
/// too long or has other characters (control characters, spaces, non-ASCII) is replaced by a
/// new one, so it can never forge log lines or bloat response headers.
pub fn request_id(body: &str, md: &MetadataMap) -> String {
    let given = if !body.trim().is_empty() {
        Some(body.trim().to_string())
    } else {
        md.get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    match given {
        Some(id) if valid_request_id(&id) => id,
        Some(id) => {
            let fresh = new_request_id();
            tracing::debug!(
                request_id = %fresh,
                given_len = id.len(),
                "client request id replaced: over {MAX_REQUEST_ID} characters or outside [A-Za-z0-9._:/+=-]"
            );
            fresh
        }
        None => new_request_id(),
    }
}

#[cfg(test)]
mod request_id_tests {
    use super::*;

    #[test]
    fn odd_request_ids_are_replaced() {
        let md = MetadataMap::new();
        assert_eq!(request_id("demo-1", &md), "demo-1");
        assert_eq!(request_id("  a.b:c/d+e=f_g  ", &md), "a.b:c/d+e=f_g");
        for bad in [
            "x\nERROR forged",
            "\u{1b}[31mred",
            "é",
            "a b",
            &"x".repeat(129),
        ] {
            let got = request_id(bad, &md);
            assert_ne!(got, bad.trim());
            assert!(valid_request_id(&got) && got.len() == 32, "{got}");
        }
        let mut md = MetadataMap::new();
        md.insert(REQUEST_ID, "from-header".parse().unwrap());
        assert_eq!(request_id("", &md), "from-header");
    }
}

/// Copies the propagated keys from `from` into `to` and makes sure `x-request-id` is `id`.
pub fn propagate(from: &MetadataMap, to: &mut MetadataMap, id: &str) {
    for key in PROPAGATED {
        if let Some(v) = from.get(*key) {
            to.insert(*key, v.clone());
        }
    }
    if let Ok(v) = id.parse() {
        to.insert(REQUEST_ID, v);
    }
}

/// Sets `x-request-id` on a response.
pub fn set_request_id(md: &mut MetadataMap, id: &str) {
    if let Ok(v) = id.parse() {
        md.insert(REQUEST_ID, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99999999))
        );
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
    }

    #[test]
    fn request_ids() {
        let mut md = MetadataMap::new();
        assert_eq!(request_id("abc", &md), "abc");
        let fresh = request_id("", &md);
        assert_eq!(fresh.len(), 32);
        md.insert(REQUEST_ID, "from-header".parse().unwrap());
        md.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(request_id("", &md), "from-header");
        let mut out = MetadataMap::new();
        propagate(&md, &mut out, "id-2");
        assert_eq!(out.get(REQUEST_ID).unwrap(), "id-2");
        assert!(out.get("traceparent").is_some());
    }
}
