//! The HTTP port against cross-site use. A web page the user opens can make the browser send
//! requests to a server on the user's machine or network; three checks keep such pages out
//! unless the operator lets them in:
//!
//! - **Host** (DNS rebinding: a page whose name now resolves to this server is same-origin with
//!   it): every route answers only to `Host` values naming this server: `localhost` (any port),
//!   an IP literal equal to the listen address (any IP literal when it listens on 0.0.0.0 or
//!   `::`), and the `--allowed-hosts` entries (`host`: any port, `host:port`, `*`: any host).
//!   Others get 403 `host_not_allowed`. A request carrying a valid API key passes from any
//!   host (a page cannot know a key), as OpenAI clients expect. A request without a host (HTTP/1.0)
//!   is not from a browser and passes.
//! - **CORS**: `--cors-origins` lists the origins (`scheme://host[:port]`, `*`: any) whose
//!   pages may call the API. A preflight (`OPTIONS` with `Origin`) from one of them gets 204
//!   with the `Access-Control-Allow-*` headers; from any other origin, or with no CORS
//!   configured, 403 `origin_not_allowed`. Answers to an allowed origin carry
//!   `Access-Control-Allow-Origin` (that origin) and `Vary: Origin`, and expose `x-request-id`
//!   and `retry-after`.
//! - **Origin of unsafe requests**: a `POST` (any method but GET, HEAD and OPTIONS) whose
//!   `Origin` is neither allowed nor the server's own (the origin's host and port are the
//!   request's `Host`, as the playground's requests are) gets 403 `origin_not_allowed` before it
//!   runs: a "simple" cross-site request (a form, `text/plain`) is refused, not just unread.
//!
//! With the `/v1` POSTs' `Content-Type: application/json` requirement (415 otherwise, in
//! `api`), a page on another site can neither send an API call nor read an answer.

use crate::openai::ApiError;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::uri::Authority;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use std::net::IpAddr;
use std::sync::Arc;

/// Methods a preflight answer allows.
const ALLOW_METHODS: &str = "GET, POST, OPTIONS";
/// Request headers a preflight answer allows.
const ALLOW_HEADERS: &str =
    "authorization, content-type, x-request-id, x-janus-timeout, traceparent, tracestate, baggage";
/// Response headers a cross-origin page may read.
const EXPOSE_HEADERS: &str = "x-request-id, retry-after";
/// Seconds a browser may cache a preflight answer.
const MAX_AGE_S: &str = "600";

/// A `host` or `host:port` entry; hosts are lower-case, without IPv6 brackets or a final dot.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostEntry {
    host: String,
    port: Option<u16>,
}

/// A web origin, `scheme://host[:port]`, with the scheme's default port filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

/// A host name as compared: lower-case, no IPv6 brackets, no final dot.
fn normalize_host(host: &str) -> String {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// `host[:port]` of a `Host` header or an allow-list entry.
fn parse_authority(s: &str) -> Option<HostEntry> {
    let a: Authority = s.trim().parse().ok()?;
    if a.as_str().contains('@') || a.host().is_empty() {
        return None;
    }
    Some(HostEntry {
        host: normalize_host(a.host()),
        port: a.port_u16(),
    })
}

impl Origin {
    /// Parses an `Origin` value; `None` for `null` or anything that is not `scheme://host[:port]`.
    fn parse(s: &str) -> Option<Self> {
        let (scheme, rest) = s.trim().split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let scheme_ok = scheme
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !scheme_ok || rest.contains(['/', '?', '#']) {
            return None;
        }
        let a = parse_authority(rest)?;
        let default = match scheme.as_str() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        };
        Some(Self {
            port: a.port.or(default),
            scheme,
            host: a.host,
        })
    }
}

/// Checks one `--allowed-hosts` entry (clap's value parser): `*`, `host` or `host:port`.
pub(crate) fn host_entry(s: &str) -> Result<String, String> {
    let t = s.trim();
    if t.is_empty() || t == "*" || parse_authority(t).is_some() {
        Ok(t.to_string())
    } else {
        Err("is not a host or host:port (or *)".into())
    }
}

/// Checks one `--cors-origins` entry (clap's value parser): `*` or `scheme://host[:port]`.
pub(crate) fn origin_entry(s: &str) -> Result<String, String> {
    let t = s.trim();
    if t.is_empty() || t == "*" || Origin::parse(t).is_some() {
        Ok(t.to_string())
    } else {
        Err("is not an origin: scheme://host[:port] without a path, e.g. https://app.example.com (or *)".into())
    }
}

/// The checks of this module, from `--allowed-hosts` and `--cors-origins` and the address the
/// port listens on.
#[derive(Debug, Clone)]
pub(crate) struct SitePolicy {
    listen: IpAddr,
    tls: bool,
    any_host: bool,
    hosts: Vec<HostEntry>,
    any_origin: bool,
    origins: Vec<Origin>,
}

impl SitePolicy {
    /// The policy of a port listening on `listen` (`tls`: it speaks https); fails naming a
    /// malformed entry.
    pub fn new(
        listen: IpAddr,
        tls: bool,
        allowed_hosts: &[String],
        cors_origins: &[String],
    ) -> anyhow::Result<Self> {
        let mut p = Self {
            listen,
            tls,
            any_host: false,
            hosts: Vec::new(),
            any_origin: false,
            origins: Vec::new(),
        };
        for h in allowed_hosts
            .iter()
            .map(|h| h.trim())
            .filter(|h| !h.is_empty())
        {
            if h == "*" {
                p.any_host = true;
                continue;
            }
            host_entry(h).map_err(|e| anyhow::anyhow!("--allowed-hosts: '{h}' {e}"))?;
            p.hosts.extend(parse_authority(h));
        }
        for o in cors_origins
            .iter()
            .map(|o| o.trim())
            .filter(|o| !o.is_empty())
        {
            if o == "*" {
                p.any_origin = true;
                continue;
            }
            origin_entry(o).map_err(|e| anyhow::anyhow!("--cors-origins: '{o}' {e}"))?;
            p.origins.extend(Origin::parse(o));
        }
        Ok(p)
    }

    /// The authority the request was sent to: the URI's (HTTP/2 `:authority`, absolute-form
    /// requests), else the `Host` header.
    fn host_of(req: &Request) -> Option<String> {
        if let Some(a) = req.uri().authority() {
            return Some(a.as_str().to_string());
        }
        req.headers()
            .get(header::HOST)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// Whether this server answers to `host` (a `Host` value).
    fn host_allowed(&self, host: &str) -> bool {
        if self.any_host {
            return true;
        }
        let Some(h) = parse_authority(host) else {
            return false;
        };
        if h.host == "localhost" {
            return true;
        }
        if let Ok(ip) = h.host.parse::<IpAddr>() {
            if self.listen.is_unspecified() || ip == self.listen {
                return true;
            }
        }
        let port = h.port.unwrap_or(if self.tls { 443 } else { 80 });
        self.hosts
            .iter()
            .any(|e| e.host == h.host && e.port.is_none_or(|p| p == port))
    }

    /// Whether pages of `origin` may call the API (`--cors-origins`).
    fn origin_allowed(&self, origin: &str) -> bool {
        if self.any_origin {
            return true;
        }
        Origin::parse(origin).is_some_and(|o| self.origins.contains(&o))
    }

    /// Whether `origin` is this server's own: its host and port are the request's `Host`.
    fn own_origin(origin: &str, host: Option<&str>) -> bool {
        let (Some(o), Some(h)) = (Origin::parse(origin), host.and_then(parse_authority)) else {
            return false;
        };
        o.host == h.host
            && match h.port {
                Some(port) => o.port == Some(port),
                None => matches!(o.port, Some(80 | 443)),
            }
    }

    fn cors_configured(&self) -> bool {
        self.any_origin || !self.origins.is_empty()
    }
}

/// What the gate needs: the policy and whether a request carries a valid API key.
pub(crate) struct Gate {
    pub policy: SitePolicy,
    pub auth: janus_service::auth::AuthPolicy,
}

impl Gate {
    fn has_valid_key(&self, headers: &HeaderMap) -> bool {
        self.auth
            .keys
            .as_deref()
            .is_some_and(|k| k.check(headers.get(header::AUTHORIZATION)).is_ok())
    }
}

/// The middleware: the host check, preflights, the origin check of unsafe requests, and the
/// CORS headers of answers to allowed origins.
pub(crate) async fn gate(
    State(gate): State<Arc<Gate>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let p = &gate.policy;
    let host = SitePolicy::host_of(&req);
    if let Some(h) = host.as_deref() {
        if !p.host_allowed(h) && !gate.has_valid_key(req.headers()) {
            tracing::info!(host = h, "HTTP request refused: host not allowed");
            return ApiError::host_not_allowed(h, gate.auth.keys.is_some()).into_response();
        }
    }
    let Some(origin) = req
        .headers()
        .get(header::ORIGIN)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    else {
        return next.run(req).await;
    };
    let allowed = p.origin_allowed(&origin);
    if req.method() == Method::OPTIONS {
        if !allowed {
            return with_vary(ApiError::origin_not_allowed(&origin).into_response());
        }
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        allow_origin(h, &origin);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOW_METHODS),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOW_HEADERS),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(MAX_AGE_S),
        );
        return r;
    }
    let safe = matches!(*req.method(), Method::GET | Method::HEAD);
    if !allowed && !safe && !SitePolicy::own_origin(&origin, host.as_deref()) {
        tracing::info!(origin, "HTTP request refused: cross-origin");
        return with_vary(ApiError::origin_not_allowed(&origin).into_response());
    }
    let mut r = next.run(req).await;
    if allowed {
        allow_origin(r.headers_mut(), &origin);
        r.headers_mut().insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSE_HEADERS),
        );
    } else if p.cors_configured() {
        r = with_vary(r);
    }
    r
}

fn with_vary(mut r: Response) -> Response {
    r.headers_mut()
        .append(header::VARY, HeaderValue::from_static("origin"));
    r
}

fn allow_origin(h: &mut HeaderMap, origin: &str) {
    if let Ok(v) = HeaderValue::from_str(origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.append(header::VARY, HeaderValue::from_static("origin"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(listen: &str, hosts: &[&str], origins: &[&str]) -> SitePolicy {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        SitePolicy::new(listen.parse().unwrap(), false, &v(hosts), &v(origins)).unwrap()
    }

    #[test]
    fn hosts() {
        let p = policy(
            "127.0.0.1",
            &["janus.example.com", "api.internal:8080"],
            &[],
        );
        for ok in [
            "localhost",
            "LOCALHOST:8000",
            "localhost.:1",
            "127.0.0.1:8000",
            "janus.example.com:9",
            "Janus.Example.Com",
            "api.internal:8080",
        ] {
            assert!(p.host_allowed(ok), "{ok}");
        }
        for no in [
            "evil.example",
            "127.0.0.2:8000",
            "[::1]:8000",
            "api.internal:8081",
            "api.internal",
            "localhost.evil.example",
            "user@localhost",
            "",
        ] {
            assert!(!p.host_allowed(no), "{no}");
        }
        let any_ip = policy("0.0.0.0", &[], &[]);
        assert!(any_ip.host_allowed("10.1.2.3:8000") && any_ip.host_allowed("[fe80::1]:80"));
        assert!(!any_ip.host_allowed("gateway.ns.svc:8000"));
        assert!(policy("::1", &["*"], &[]).host_allowed("anything.example"));
        assert!(policy("::1", &[], &[]).host_allowed("[::1]:8000"));
        let bad = |h: &str| {
            SitePolicy::new("127.0.0.1".parse().unwrap(), false, &[h.to_string()], &[]).is_err()
        };
        assert!(bad("a b") && bad("host/path"));
    }

    #[test]
    fn origins() {
        let p = policy(
            "127.0.0.1",
            &[],
            &["https://app.example.com", "http://localhost:3000"],
        );
        assert!(p.origin_allowed("https://app.example.com"));
        assert!(p.origin_allowed("https://APP.example.com:443"));
        assert!(p.origin_allowed("http://localhost:3000"));
        assert!(!p.origin_allowed("http://app.example.com"));
        assert!(!p.origin_allowed("http://localhost:3001"));
        assert!(!p.origin_allowed("null"));
        assert!(policy("127.0.0.1", &[], &["*"]).origin_allowed("null"));
        assert!(!policy("127.0.0.1", &[], &[]).cors_configured());
        let bad = |o: &str| {
            SitePolicy::new("127.0.0.1".parse().unwrap(), false, &[], &[o.to_string()]).is_err()
        };
        assert!(bad("app.example.com") && bad("https://app.example.com/") && bad("null"));
        assert!(SitePolicy::own_origin(
            "http://127.0.0.1:8000",
            Some("127.0.0.1:8000")
        ));
        assert!(SitePolicy::own_origin(
            "https://janus.example.com",
            Some("janus.example.com")
        ));
        assert!(!SitePolicy::own_origin(
            "http://127.0.0.1:8001",
            Some("127.0.0.1:8000")
        ));
        assert!(!SitePolicy::own_origin("http://evil.example", None));
    }
}
