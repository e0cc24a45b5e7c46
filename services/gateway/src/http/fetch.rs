//! Fetching `image_url` images given as `http(s)` URLs: off unless the operator lists the
//! hosts (`--image-fetch-hosts`); bounded in bytes (`--image-fetch-max-bytes`) and time
//! (`--image-fetch-timeout`); redirects are not followed (a redirect could leave the
//! allow-list). reqwest with rustls (ring) and the webpki roots.

use std::time::Duration;

/// What may be fetched.
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    /// Allowed hosts: `host` (any port) or `host:port`, compared case-insensitively. Empty:
    /// nothing is fetched.
    pub allow_hosts: Vec<String>,
    /// Largest image body, in bytes.
    pub max_bytes: usize,
    /// Longest a fetch may take, connection included.
    pub timeout: Duration,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        Self {
            allow_hosts: Vec::new(),
            max_bytes: 10 * 1024 * 1024,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Why an image could not be fetched (a 400 naming the part).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No host is allowed.
    #[error("remote image URLs are not fetched by this server: send the image inline as a data: URI (data:image/png;base64,...), or ask the operator to allow the host (--image-fetch-hosts)")]
    Disabled,
    /// The URL does not parse or has no host.
    #[error("invalid image URL: {0}")]
    BadUrl(String),
    /// The host is not in the allow-list.
    #[error("fetching images from '{0}' is not allowed (--image-fetch-hosts)")]
    NotAllowed(String),
    /// A non-success status (redirects included).
    #[error("fetching the image failed: HTTP {0}")]
    Status(u16),
    /// Over `max_bytes`.
    #[error("the image at the URL is over {0} bytes (--image-fetch-max-bytes)")]
    TooLarge(usize),
    /// Over `timeout`.
    #[error("fetching the image took longer than {0:?} (--image-fetch-timeout)")]
    Timeout(Duration),
    /// Connection or protocol failure.
    #[error("fetching the image failed: {0}")]
    Transport(String),
}

/// Fetches images under a [`FetchPolicy`].
#[derive(Debug, Clone)]
pub struct Fetcher {
    policy: FetchPolicy,
    client: Option<reqwest::Client>,
}

impl Fetcher {
    /// A fetcher; builds an HTTP client only when some host is allowed.
    pub fn new(policy: FetchPolicy) -> Result<Self, FetchError> {
        let client = if policy.allow_hosts.is_empty() {
            None
        } else {
            Some(
                reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(policy.timeout)
                    .connect_timeout(policy.timeout)
                    .user_agent(concat!("janus-gateway/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| FetchError::Transport(e.to_string()))?,
            )
        };
        Ok(Self { policy, client })
    }

    /// Whether any host is allowed (remote image URLs can be fetched at all).
    pub fn enabled(&self) -> bool {
        self.client.is_some()
    }

    /// Whether `url`'s host (and port) is allowed.
    fn allowed(&self, url: &reqwest::Url) -> Result<(), FetchError> {
        let host = url
            .host_str()
            .ok_or_else(|| FetchError::BadUrl("no host".into()))?
            .to_ascii_lowercase();
        let port = url.port_or_known_default();
        let with_port = match port {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let ok = self.policy.allow_hosts.iter().any(|a| {
            let a = a.trim().to_ascii_lowercase();
            a == host || a == with_port
        });
        if ok {
            Ok(())
        } else {
            Err(FetchError::NotAllowed(with_port))
        }
    }

    /// The body at `url`, at most `max_bytes`.
    pub async fn fetch(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let Some(client) = &self.client else {
            return Err(FetchError::Disabled);
        };
        let parsed = reqwest::Url::parse(url).map_err(|e| FetchError::BadUrl(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(FetchError::BadUrl(format!("scheme {}", parsed.scheme())));
        }
        self.allowed(&parsed)?;
        let timeout = self.policy.timeout;
        let max = self.policy.max_bytes;
        let run = async {
            let mut resp = client.get(parsed).send().await.map_err(|e| {
                if e.is_timeout() {
                    FetchError::Timeout(timeout)
                } else {
                    FetchError::Transport(e.to_string())
                }
            })?;
            if !resp.status().is_success() {
                return Err(FetchError::Status(resp.status().as_u16()));
            }
            if resp.content_length().is_some_and(|n| n > max as u64) {
                return Err(FetchError::TooLarge(max));
            }
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| {
                if e.is_timeout() {
                    FetchError::Timeout(timeout)
                } else {
                    FetchError::Transport(e.to_string())
                }
            })? {
                if body.len() + chunk.len() > max {
                    return Err(FetchError::TooLarge(max));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(body)
        };
        // reqwest's timeout covers the whole exchange; this bounds it even if it did not.
        match tokio::time::timeout(timeout + Duration::from_millis(100), run).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout(timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list() {
        let f = Fetcher::new(FetchPolicy {
            allow_hosts: vec!["Images.Example.com".into(), "127.0.0.1:8080".into()],
            ..Default::default()
        })
        .unwrap();
        let u = |s: &str| reqwest::Url::parse(s).unwrap();
        assert!(f.allowed(&u("https://images.example.com/a.png")).is_ok());
        assert!(f.allowed(&u("http://images.example.com:81/a.png")).is_ok());
        assert!(f.allowed(&u("http://127.0.0.1:8080/a.png")).is_ok());
        assert!(matches!(
            f.allowed(&u("http://127.0.0.1:8081/a.png")),
            Err(FetchError::NotAllowed(h)) if h == "127.0.0.1:8081"
        ));
        assert!(f.allowed(&u("https://evil.example.com/")).is_err());
    }

    #[tokio::test]
    async fn disabled_without_hosts() {
        let f = Fetcher::new(FetchPolicy::default()).unwrap();
        assert!(matches!(
            f.fetch("https://example.com/a.png").await,
            Err(FetchError::Disabled)
        ));
    }
}
