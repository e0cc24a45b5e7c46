//! The gateway's command-line flags (with environment variables): discovery, balancing, health
//! checks and failure handling ([`GatewayTuning`], shared with `janus serve`), TLS to the
//! backends, and `janus-gateway`'s own arguments.

use crate::http;
use crate::pool::{BackendSettings, Balance};
use std::time::Duration;

/// Discovery, balancing, health-checking and failure knobs (shared by `janus-gateway` and
/// `janus serve`).
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayTuning {
    /// How a backend is picked for each request. prefix-affinity: an understanding request
    /// goes to the replica rendezvous hashing picks for its conversation's beginning (system
    /// prompt, first user message and its images), where its earlier turns are cached, unless
    /// that replica has more than --affinity-slack streams beyond the least busy one; otherwise
    /// (and for generation) least-outstanding. least-outstanding: power of two choices over
    /// streams in flight. round-robin.
    #[arg(long, env = "JANUS_BALANCE", value_enum, default_value_t = Balance::PrefixAffinity)]
    pub balance: Balance,
    /// prefix-affinity: streams in flight a request's preferred replica may have beyond the
    /// least busy one before the request goes elsewhere.
    #[arg(long, env = "JANUS_AFFINITY_SLACK", default_value_t = 4)]
    pub affinity_slack: usize,
    /// Seconds between grpc.health.v1 checks of each backend.
    #[arg(long, env = "JANUS_HEALTH_INTERVAL", default_value_t = 2.0)]
    pub health_interval: f64,
    /// Seconds to wait for a TCP/HTTP2 connection to a backend.
    #[arg(long, env = "JANUS_CONNECT_TIMEOUT", default_value_t = 2.0)]
    pub connect_timeout: f64,
    /// Seconds between DNS re-resolutions of backend names (a headless Service's pods).
    #[arg(long, env = "JANUS_RESOLVE_INTERVAL", default_value_t = 5.0)]
    pub resolve_interval: f64,
    /// DNS server (ip:port) to resolve backend names with, instead of /etc/resolv.conf.
    #[arg(long, env = "JANUS_DNS_SERVER")]
    pub dns_server: Option<std::net::SocketAddr>,
    /// Seconds between HTTP/2 PINGs on backend connections (also while streams are open).
    #[arg(long, env = "JANUS_BACKEND_KEEPALIVE", default_value_t = 5.0)]
    pub backend_keepalive: f64,
    /// Seconds a PING may go unanswered before the connection and its streams fail with
    /// UNAVAILABLE (a frozen backend is detected within keepalive + this).
    #[arg(long, env = "JANUS_BACKEND_KEEPALIVE_TIMEOUT", default_value_t = 5.0)]
    pub backend_keepalive_timeout: f64,
    /// Seconds a forwarded stream may go without a message before it ends with UNAVAILABLE
    /// (0 = no limit; a long prefill sends nothing until its first token).
    #[arg(long, env = "JANUS_STREAM_IDLE_TIMEOUT", default_value_t = 0.0)]
    pub stream_idle_timeout: f64,
    /// Consecutive failed calls that eject a backend (circuit breaker).
    #[arg(long, env = "JANUS_EJECT_AFTER", default_value_t = 3)]
    pub eject_after: u32,
    /// Longest ejection in seconds (the first is 1 s, doubling while failures go on).
    #[arg(long, env = "JANUS_MAX_EJECTION", default_value_t = 30.0)]
    pub max_ejection: f64,
}

impl Default for GatewayTuning {
    fn default() -> Self {
        Self {
            balance: Balance::PrefixAffinity,
            affinity_slack: 4,
            health_interval: 2.0,
            connect_timeout: 2.0,
            resolve_interval: 5.0,
            dns_server: None,
            backend_keepalive: 5.0,
            backend_keepalive_timeout: 5.0,
            stream_idle_timeout: 0.0,
            eject_after: 3,
            max_ejection: 30.0,
        }
    }
}

pub(crate) fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.01))
}

impl GatewayTuning {
    /// Channel and breaker settings of every backend.
    pub fn backend_settings(
        &self,
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> BackendSettings {
        BackendSettings {
            connect_timeout: secs(self.connect_timeout),
            keepalive_interval: secs(self.backend_keepalive),
            keepalive_timeout: secs(self.backend_keepalive_timeout),
            tls,
            eject_after: self.eject_after.max(1),
            base_ejection: Duration::from_secs(1).min(secs(self.max_ejection)),
            max_ejection: secs(self.max_ejection),
            affinity_slack: self.affinity_slack,
        }
    }
}

/// Command-line arguments of `janus-gateway` / `janus gateway`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "JANUS_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Understanding backends, comma-separated host:port or URLs.
    #[arg(long, env = "JANUS_UNDERSTANDING_BACKENDS", value_delimiter = ',')]
    pub understanding_backends: Vec<String>,
    /// Generation backends, comma-separated host:port or URLs.
    #[arg(long, env = "JANUS_GENERATION_BACKENDS", value_delimiter = ',')]
    pub generation_backends: Vec<String>,
    #[command(flatten)]
    pub tuning: GatewayTuning,
    #[command(flatten)]
    pub server: janus_service::flags::ServerFlags,
    #[command(flatten)]
    pub backend_tls: BackendTlsFlags,
    /// Address of the OpenAI-compatible HTTP port (/v1/chat/completions,
    /// /v1/images/generations, /v1/models, /openapi.json, playground at /), e.g. 127.0.0.1:8000
    /// (off when not given; `off` turns it off). Same API keys and TLS certificate as --listen.
    #[arg(long, env = "JANUS_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    #[command(flatten)]
    pub http: http::HttpFlags,
}

/// TLS from the gateway to its backends.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct BackendTlsFlags {
    /// PEM CA of the backends' certificates: backends are reached over TLS (`host:port` means
    /// `https://`; without this flag only `https://` addresses use TLS, with the system's roots).
    #[arg(long, env = "JANUS_BACKEND_CA")]
    pub backend_ca: Option<std::path::PathBuf>,
    /// PEM client certificate the gateway presents to the backends (mTLS; needs --backend-tls-key).
    #[arg(long, env = "JANUS_BACKEND_TLS_CERT")]
    pub backend_tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --backend-tls-cert.
    #[arg(long, env = "JANUS_BACKEND_TLS_KEY")]
    pub backend_tls_key: Option<std::path::PathBuf>,
    /// Name the backends' certificates are checked against instead of each address's host.
    #[arg(long, env = "JANUS_BACKEND_TLS_DOMAIN")]
    pub backend_tls_domain: Option<String>,
}

impl BackendTlsFlags {
    /// The client TLS configuration; `None` when no backend TLS flag is given.
    pub fn config(&self) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
        if self.backend_ca.is_none()
            && self.backend_tls_cert.is_none()
            && self.backend_tls_key.is_none()
            && self.backend_tls_domain.is_none()
        {
            return Ok(None);
        }
        janus_service::tls::client_config(
            self.backend_ca.as_deref(),
            self.backend_tls_cert.as_deref(),
            self.backend_tls_key.as_deref(),
            self.backend_tls_domain.as_deref(),
        )
        .map(Some)
    }
}
