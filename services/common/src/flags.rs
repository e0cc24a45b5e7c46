//! Command-line flags (with environment variables) shared by the server binaries and `janus`.

use crate::server::{Security, ServerOptions};
use anyhow::Context;
use std::path::PathBuf;
use std::time::Duration;

/// Transport settings.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerFlags {
    /// Largest gRPC message received or sent, in bytes.
    #[arg(long, env = "JANUS_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Seconds in-flight streams may continue after SIGTERM/ctrl-c before they are cancelled.
    #[arg(long, env = "JANUS_GRACE_PERIOD", default_value_t = 30.0)]
    pub grace_period: f64,
    /// Address of the Prometheus `GET /metrics` endpoint, e.g. 0.0.0.0:9464 (off when not given).
    #[arg(long, env = "JANUS_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Address of an extra plaintext port serving only grpc.health.v1 (no key), e.g.
    /// 0.0.0.0:8086: for Kubernetes gRPC probes when the main port uses TLS (off when not given).
    #[arg(long, env = "JANUS_HEALTH_LISTEN")]
    pub health_listen: Option<String>,
    #[command(flatten)]
    pub security: SecurityFlags,
    #[command(flatten)]
    pub conn: ConnFlags,
}

/// What one connection may hold and how long it may take, on every port of the server
/// ([`crate::conn`]).
#[derive(clap::Args, Debug, Clone)]
pub struct ConnFlags {
    /// HTTP/2 streams one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS;
    /// streams beyond it are refused).
    #[arg(long, env = "JANUS_MAX_CONCURRENT_STREAMS", default_value_t = 128)]
    pub max_concurrent_streams: u32,
    /// Largest request header list in bytes (SETTINGS_MAX_HEADER_LIST_SIZE): a larger one fails
    /// its own request (HTTP 431), up to four times this (then the connection is closed).
    #[arg(long, env = "JANUS_MAX_HEADER_LIST_BYTES", default_value_t = 16 * 1024)]
    pub max_header_list_bytes: u32,
    /// Bytes of request bodies one connection may have received for requests still being
    /// received, all its streams together (default: 4 × --max-message-bytes).
    #[arg(long, env = "JANUS_MAX_BUFFERED_REQUEST_BYTES")]
    pub max_buffered_request_bytes: Option<usize>,
    /// The same for all connections of a port together (default: 16 × --max-message-bytes).
    #[arg(long, env = "JANUS_MAX_BUFFERED_REQUEST_BYTES_TOTAL")]
    pub max_buffered_request_bytes_total: Option<usize>,
    /// Seconds from accepting a connection (after TLS) to its HTTP/2 preface or the first byte
    /// of an HTTP/1 request.
    #[arg(long, env = "JANUS_PREFACE_TIMEOUT", default_value_t = 10.0)]
    pub preface_timeout: f64,
    /// Seconds of silence allowed while a request's headers (HTTP/1) or body is being received;
    /// also how long an HTTP/1 keep-alive connection waits for its next request.
    #[arg(long, env = "JANUS_REQUEST_READ_TIMEOUT", default_value_t = 10.0)]
    pub request_read_timeout: f64,
    /// Seconds a connection with no request in flight stays open (HTTP/2: GOAWAY, then close).
    #[arg(long, env = "JANUS_IDLE_TIMEOUT", default_value_t = 120.0)]
    pub idle_timeout: f64,
    /// Seconds between HTTP/2 keepalive pings to clients.
    #[arg(long, env = "JANUS_KEEPALIVE_INTERVAL", default_value_t = 30.0)]
    pub keepalive_interval: f64,
    /// Seconds a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "JANUS_KEEPALIVE_TIMEOUT", default_value_t = 20.0)]
    pub keepalive_timeout: f64,
}

impl ConnFlags {
    /// As limits, for a server whose largest message is `max_message_bytes`.
    pub fn limits(&self, max_message_bytes: usize) -> crate::conn::ConnLimits {
        let secs = |s: f64| Duration::from_secs_f64(s.clamp(0.001, 86_400.0));
        let per_conn = self
            .max_buffered_request_bytes
            .unwrap_or_else(|| max_message_bytes.saturating_mul(4))
            .max(max_message_bytes);
        crate::conn::ConnLimits {
            max_concurrent_streams: self.max_concurrent_streams.max(1),
            max_header_list_bytes: self.max_header_list_bytes.max(1024),
            max_buffered_request_bytes: per_conn,
            max_buffered_request_bytes_total: self
                .max_buffered_request_bytes_total
                .unwrap_or_else(|| max_message_bytes.saturating_mul(16))
                .max(per_conn),
            preface_timeout: secs(self.preface_timeout),
            request_read_timeout: secs(self.request_read_timeout),
            idle_timeout: secs(self.idle_timeout),
            keepalive_interval: secs(self.keepalive_interval),
            keepalive_timeout: secs(self.keepalive_timeout),
        }
    }
}

/// A secret given on the command line or in the environment; `Debug` does not show it.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

/// API keys and TLS of a server's listening port.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SecurityFlags {
    /// File of accepted API keys, one per line (`#` starts a comment line). Clients send
    /// `authorization: Bearer <key>`; grpc.health.v1 stays open.
    #[arg(long, env = "JANUS_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Accepted API keys, comma- or newline-separated (prefer the environment variable or --api-keys-file:
    /// command lines are visible to other users).
    #[arg(
        long,
        env = "JANUS_API_KEYS",
        hide_env_values = true,
        value_name = "KEYS"
    )]
    pub api_keys: Option<Secret>,
    /// Reflection needs an API key too (default: open, like health).
    #[arg(long, env = "JANUS_REFLECTION_REQUIRES_KEY")]
    pub reflection_requires_key: bool,
    /// PEM certificate chain of this server: serve TLS (needs --tls-key).
    #[arg(long, env = "JANUS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "JANUS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA: require client certificates signed by it (mTLS; model services behind a gateway
    /// with --backend-tls-cert).
    #[arg(long, env = "JANUS_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
}

impl SecurityFlags {
    /// Reads the keys and certificates.
    pub fn security(&self) -> anyhow::Result<Security> {
        let keys = crate::auth::ApiKeys::from_sources(
            self.api_keys_file.as_deref(),
            self.api_keys.as_ref().map(|s| s.0.as_str()),
        )?;
        if let Some(k) = &keys {
            tracing::info!(keys = k.len(), "API keys required (grpc.health.v1 open)");
        }
        let tls = crate::tls::server_config_from(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_client_ca.as_deref(),
        )?;
        Ok(Security {
            auth: crate::auth::AuthPolicy {
                keys: keys.map(std::sync::Arc::new),
                reflection_requires_key: self.reflection_requires_key,
            },
            tls,
        })
    }
}

impl ServerFlags {
    /// As options, with a fresh metrics registry labelled `service` (`janus_build_info{service}`),
    /// without TLS or keys (see [`ServerFlags::secure_options`]).
    pub fn options(&self, service: &str) -> ServerOptions {
        ServerOptions {
            max_message_bytes: self.max_message_bytes,
            grace_period: Duration::from_secs_f64(self.grace_period.max(0.0)),
            metrics: janus_telemetry::Metrics::new(service, janus_telemetry::build_info!()),
            security: Security::default(),
            max_connection_age: None,
            max_connection_age_grace: None,
            conn: self.conn.limits(self.max_message_bytes),
        }
    }

    /// As [`ServerFlags::options`], with the TLS and API keys of the flags (files read now).
    pub fn secure_options(&self, service: &str) -> anyhow::Result<ServerOptions> {
        Ok(ServerOptions {
            security: self.security.security()?,
            ..self.options(service)
        })
    }

    /// Starts the plaintext health port of `running` when `--health-listen` is given (it
    /// closes when the server starts draining); returns the bound address.
    pub async fn serve_health(
        &self,
        running: &crate::Running,
    ) -> anyhow::Result<Option<std::net::SocketAddr>> {
        let Some(addr) = &self.health_listen else {
            return Ok(None);
        };
        crate::server::serve_health(
            addr,
            running.health(),
            &self.conn.limits(self.max_message_bytes),
            running.lifecycle().closed.clone(),
        )
        .await
        .map(Some)
    }

    /// Starts the `/metrics` endpoint serving `metrics` when `--metrics-listen` is given;
    /// returns the bound address.
    pub async fn serve_metrics(
        &self,
        metrics: &janus_telemetry::Metrics,
    ) -> anyhow::Result<Option<std::net::SocketAddr>> {
        let Some(addr) = &self.metrics_listen else {
            return Ok(None);
        };
        let parsed: std::net::SocketAddr = addr.parse().with_context(|| {
            format!("--metrics-listen {addr}: expected host:port, e.g. 0.0.0.0:9464")
        })?;
        let (bound, _task) = metrics
            .serve(parsed)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        Ok(Some(bound))
    }
}

/// How long a model service keeps a client connection (the gateway's) before asking it to
/// re-dial, so that replicas added by a scale-up get a share of long-lived connections.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectionAgeFlags {
    /// Seconds after which a connection gets an HTTP/2 GOAWAY: the client finishes its streams
    /// on it and opens a new connection for new calls (0 = never).
    #[arg(long, env = "JANUS_MAX_CONNECTION_AGE", default_value_t = 300.0)]
    pub max_connection_age: f64,
    /// Seconds streams may still run on a connection past its maximum age before it is closed
    /// (default: --grace-period).
    #[arg(long, env = "JANUS_MAX_CONNECTION_AGE_GRACE")]
    pub max_connection_age_grace: Option<f64>,
}

impl ConnectionAgeFlags {
    /// Sets the connection age and grace of `options`.
    pub fn apply(&self, options: ServerOptions) -> ServerOptions {
        let age = (self.max_connection_age > 0.0)
            .then(|| Duration::from_secs_f64(self.max_connection_age));
        ServerOptions {
            max_connection_age: age,
            max_connection_age_grace: self
                .max_connection_age_grace
                .map(|g| Duration::from_secs_f64(g.max(0.0))),
            ..options
        }
    }
}
