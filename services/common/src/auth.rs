//! API keys: `authorization: Bearer <key>` checked by a tower layer in front of every RPC of a
//! server ([`AuthLayer`], installed by [`crate::server::builder`]).
//!
//! Keys are kept only as SHA-256 digests and compared in constant time (`subtle`): every
//! configured digest is compared, whichever matches. `grpc.health.v1` is always open (probes
//! carry no key); reflection is open unless `reflection_requires_key`. A refused request gets
//! UNAUTHENTICATED naming what is wrong (no header, not `Bearer`, unknown key) and never the
//! key. Each checked request is counted in `janus_auth_requests_total{key, result}` with the
//! key's short hash ([`key_label`]); keys themselves are never logged. The gateway forwards
//! the caller's `authorization` header to its backends ([`crate::meta::PROPAGATED`]), so model
//! services given the same keys accept what the gateway accepted.

use anyhow::Context as _;
use http::{Request, Response};
use pin_project_lite::pin_project;
use sha2::{Digest, Sha256};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use tower_layer::Layer;
use tower_service::Service;

/// Path prefix of the health service (never needs a key).
pub(crate) const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";
/// Path prefix of both reflection versions.
pub(crate) const REFLECTION_PREFIX: &str = "/grpc.reflection.";

/// The accepted API keys, as SHA-256 digests.
#[derive(Clone)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
    labels: Vec<String>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Labels only: never the keys (which are not kept) nor the digests.
        f.debug_struct("ApiKeys")
            .field("keys", &self.labels)
            .finish()
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `authorization` header.
    Missing,
    /// A header that is not `Bearer <key>`.
    Malformed,
    /// A well-formed key that is not configured.
    UnknownKey,
}

impl AuthFailure {
    /// The `result` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::UnknownKey => "unknown_key",
        }
    }

    /// The UNAUTHENTICATED message.
    pub fn message(self) -> &'static str {
        match self {
            Self::Missing => {
                "missing API key: send the header `authorization: Bearer <key>` (janus CLI: --api-key or JANUS_API_KEY)"
            }
            Self::Malformed => {
                "malformed authorization header: expected `authorization: Bearer <key>`"
            }
            Self::UnknownKey => "unknown API key",
        }
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The label of a key in metrics and logs: the first 8 hex digits of its SHA-256.
pub fn key_label(key: &str) -> String {
    digest(key)[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Keys of a keys file: one per line, blank lines and lines starting with `#` skipped,
/// surrounding whitespace trimmed.
pub fn parse_keys_file(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

impl ApiKeys {
    /// Accepts `keys` (trimmed; empty ones skipped). Fails when none is left or a key cannot
    /// be sent in a header (control characters, inner whitespace).
    pub fn new<I, S>(keys: I) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut digests = Vec::new();
        let mut labels = Vec::new();
        for (i, key) in keys.into_iter().enumerate() {
            let key = key.as_ref().trim();
            if key.is_empty() {
                continue;
            }
            if key
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || !c.is_ascii())
            {
                // The key is not shown: only its position.
                anyhow::bail!(
                    "API key #{} contains whitespace, control or non-ASCII characters",
                    i + 1
                );
            }
            let d = digest(key);
            if !digests.contains(&d) {
                digests.push(d);
                labels.push(key_label(key));
            }
        }
        anyhow::ensure!(!digests.is_empty(), "no API key given");
        Ok(Self { digests, labels })
    }

    /// Keys from a file (`--api-keys-file`) and/or a comma- or newline-separated list
    /// (`JANUS_API_KEYS`);
    /// `None` when neither is given. A given source without any key is an error (a typo must
    /// not silently open the server).
    pub fn from_sources(file: Option<&Path>, list: Option<&str>) -> anyhow::Result<Option<Self>> {
        let mut keys = Vec::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the API keys file {}", path.display()))?;
            let from_file = parse_keys_file(&text);
            anyhow::ensure!(
                !from_file.is_empty(),
                "the API keys file {} holds no key",
                path.display()
            );
            keys.extend(from_file);
        }
        if let Some(list) = list {
            // Commas or newlines (a Secret created from a file ends with one).
            let from_list: Vec<String> = list
                .split(|c: char| c == ',' || c.is_whitespace())
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_string)
                .collect();
            anyhow::ensure!(
                !from_list.is_empty(),
                "JANUS_API_KEYS is set but holds no key"
            );
            keys.extend(from_list);
        }
        if file.is_none() && list.is_none() {
            return Ok(None);
        }
        Self::new(keys).map(Some)
    }

    /// Number of distinct keys.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// Never true (a key set holds at least one key).
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// The label ([`key_label`]) of the configured key equal to `key`, compared in constant
    /// time against every configured digest.
    pub fn find(&self, key: &str) -> Option<&str> {
        let d = digest(key);
        let mut found = subtle::Choice::from(0u8);
        let mut index = 0u32;
        for (i, stored) in self.digests.iter().enumerate() {
            let eq = stored.ct_eq(&d);
            index = u32::conditional_select(&index, &(i as u32), eq);
            found |= eq;
        }
        bool::from(found).then(|| self.labels[index as usize].as_str())
    }

    /// Checks an `authorization` header value; the key's label when accepted.
    pub fn check(&self, header: Option<&http::HeaderValue>) -> Result<&str, AuthFailure> {
        let value = header.ok_or(AuthFailure::Missing)?;
        let value = value.to_str().map_err(|_| AuthFailure::Malformed)?;
        self.find(bearer_key(value)?).ok_or(AuthFailure::UnknownKey)
    }
}

/// The key of an `authorization` value `Bearer <key>` (scheme in any letter case, surrounding
/// whitespace ignored): what [`ApiKeys::check`] checks, and what the model services scope
/// their caches by.
pub fn bearer_key(value: &str) -> Result<&str, AuthFailure> {
    let (scheme, key) = value.trim().split_once(' ').ok_or(AuthFailure::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthFailure::Malformed);
    }
    let key = key.trim();
    if key.is_empty() {
        return Err(AuthFailure::Malformed);
    }
    Ok(key)
}

/// What the layer enforces.
#[derive(Debug, Clone, Default)]
pub struct AuthPolicy {
    /// Accepted keys; `None`: every request passes (nothing is counted).
    pub keys: Option<Arc<ApiKeys>>,
    /// Reflection needs a key too (default: open, like health).
    pub reflection_requires_key: bool,
}

impl AuthPolicy {
    /// Whether a request to `path` must carry a key.
    pub fn protects(&self, path: &str) -> bool {
        if self.keys.is_none() || path.starts_with(HEALTH_PREFIX) {
            return false;
        }
        !path.starts_with(REFLECTION_PREFIX) || self.reflection_requires_key
    }
}

impl AuthPolicy {
    /// Checks the `authorization` header of a request to `path` against the keys and counts
    /// it in `janus_auth_requests_total`: the one check of every transport (the tower layer of
    /// the gRPC servers, the gateway's HTTP port). UNAUTHENTICATED naming what is wrong (never
    /// the key) when refused; always `Ok` without keys.
    pub fn authorize(
        &self,
        metrics: &janus_telemetry::Metrics,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Result<(), tonic::Status> {
        let Some(keys) = self.keys.as_deref() else {
            return Ok(());
        };
        match keys.check(headers.get(http::header::AUTHORIZATION)) {
            Ok(label) => {
                metrics.count_auth(label, "ok");
                Ok(())
            }
            Err(why) => {
                metrics.count_auth("none", why.label());
                tracing::info!(
                    path,
                    reason = why.label(),
                    "request refused: {}",
                    why.message()
                );
                Err(tonic::Status::unauthenticated(why.message()))
            }
        }
    }
}

/// The tower layer checking API keys (see the module documentation).
#[derive(Debug, Clone)]
pub struct AuthLayer {
    policy: Arc<AuthPolicy>,
    metrics: janus_telemetry::Metrics,
}

impl AuthLayer {
    /// A layer enforcing `policy`, counting in `metrics`.
    pub fn new(policy: AuthPolicy, metrics: janus_telemetry::Metrics) -> Self {
        Self {
            policy: Arc::new(policy),
            metrics,
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            policy: self.policy.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around a tonic router.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    policy: Arc<AuthPolicy>,
    metrics: janus_telemetry::Metrics,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AuthService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = AuthFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        if self.policy.protects(path) {
            if let Err(status) = self
                .policy
                .authorize(&self.metrics, path, request.headers())
            {
                return AuthFuture::Refused {
                    response: Some(status.into_http()),
                };
            }
        }
        AuthFuture::Inner {
            future: self.inner.call(request),
        }
    }
}

pin_project! {
    /// Future of [`AuthService`]: the inner service's, or an immediate UNAUTHENTICATED.
    #[project = AuthFutureProj]
    pub enum AuthFuture<F, B> {
        /// The request was let through.
        Inner { #[pin] future: F },
        /// The request was refused.
        Refused { response: Option<Response<B>> },
    }
}

impl<F, B, E> Future for AuthFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AuthFutureProj::Inner { future } => future.poll(cx),
            AuthFutureProj::Refused { response } => Poll::Ready(Ok(response
                .take()
                .expect("AuthFuture polled after completion"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn keys_are_checked() {
        let keys = ApiKeys::new(["alpha-key", " beta-key ", "", "alpha-key"]).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(
            keys.check(Some(&hv("Bearer beta-key"))),
            Ok(key_label("beta-key").as_str())
        );
        assert_eq!(
            keys.check(Some(&hv("bearer alpha-key"))),
            Ok(key_label("alpha-key").as_str())
        );
        assert_eq!(keys.check(None), Err(AuthFailure::Missing));
        assert_eq!(
            keys.check(Some(&hv("Basic YWxwaGE="))),
            Err(AuthFailure::Malformed)
        );
        assert_eq!(
            keys.check(Some(&hv("alpha-key"))),
            Err(AuthFailure::Malformed)
        );
        assert_eq!(
            keys.check(Some(&hv("Bearer "))),
            Err(AuthFailure::Malformed)
        );
        assert_eq!(
            keys.check(Some(&hv("Bearer gamma"))),
            Err(AuthFailure::UnknownKey)
        );
        assert_eq!(key_label("alpha-key").len(), 8);
        assert!(!format!("{keys:?}").contains("alpha"));
        assert!(ApiKeys::new(["", " "]).is_err());
        let e = ApiKeys::new(["ok", "has space"]).unwrap_err().to_string();
        assert!(e.contains("#2") && !e.contains("has space"), "{e}");
    }

    #[test]
    fn sources() {
        assert!(ApiKeys::from_sources(None, None).unwrap().is_none());
        let dir = std::env::temp_dir().join(format!("janus-keys-{}", std::process::id()));
        std::fs::write(&dir, "# team a\nkey-one\n\n  key-two  \n# key-three\n").unwrap();
        let keys = ApiKeys::from_sources(Some(&dir), Some("key-four, ,key-one\n"))
            .unwrap()
            .unwrap();
        assert_eq!(keys.len(), 3);
        assert!(keys.find("key-two").is_some());
        assert!(keys.find("key-three").is_none());
        std::fs::write(&dir, "# nothing\n").unwrap();
        assert!(ApiKeys::from_sources(Some(&dir), None).is_err());
        assert!(ApiKeys::from_sources(None, Some(" , ")).is_err());
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn open_paths() {
        let open = AuthPolicy::default();
        assert!(!open.protects("/janus.v1.Generation/Generate"));
        let keys = Some(Arc::new(ApiKeys::new(["k"]).unwrap()));
        let p = AuthPolicy {
            keys: keys.clone(),
            reflection_requires_key: false,
        };
        assert!(p.protects("/janus.v1.Generation/Generate"));
        assert!(!p.protects("/grpc.health.v1.Health/Check"));
        assert!(!p.protects("/grpc.health.v1.Health/Watch"));
        assert!(!p.protects("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
        let strict = AuthPolicy {
            keys,
            reflection_requires_key: true,
        };
        assert!(strict.protects("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"));
        assert!(!strict.protects("/grpc.health.v1.Health/Check"));
    }
}
