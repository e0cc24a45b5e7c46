//! The gateway's HTTP port (`--http-listen`): OpenAI-compatible `/v1` routes, an OpenAPI
//! document and a playground page, served by axum on hyper (the versions tonic pulls in),
//! HTTP/1.1 and HTTP/2, with the gRPC port's certificate when it has TLS, connections served and
//! bounded as the gRPC port's (`janus_service::conn`). Every `/v1` call
//! goes through the same in-process [`Gateway`] as gRPC (see `api`).
//!
//! Body limit: the gateway's `--max-message-bytes` plus a third for the base64 of inline
//! images and 64 KiB for the JSON around them ([`body_limit`]).

mod api;
pub mod fetch;
mod guard;

pub use fetch::{FetchError, FetchPolicy, Fetcher};

use crate::Gateway;
use anyhow::Context as _;
use janus_service::conn::Protocols;
use janus_service::{Lifecycle, ServerOptions};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use api::TIMEOUT_HEADER;

/// Options of the HTTP port.
#[derive(Debug, Clone, Default)]
pub struct HttpOptions {
    /// Which remote `image_url`s may be fetched.
    pub fetch: FetchPolicy,
    /// `Host` values answered beyond `localhost` and the listen IP: `host`, `host:port`, `*`
    /// (see `guard`).
    pub allowed_hosts: Vec<String>,
    /// Origins whose pages may call the API (CORS): `scheme://host[:port]`, `*`.
    pub cors_origins: Vec<String>,
}

/// Flags of the HTTP port shared by `janus gateway` and `janus serve` (the listen address is
/// each command's own: off by default for the gateway, on for `janus serve`).
#[derive(clap::Args, Debug, Clone)]
pub struct HttpFlags {
    /// Hosts whose http(s) image URLs chat requests may use, comma-separated `host` or
    /// `host:port` (default: none, images must be inline data: URIs).
    #[arg(long, env = "JANUS_IMAGE_FETCH_HOSTS", value_delimiter = ',')]
    pub image_fetch_hosts: Vec<String>,
    /// Largest fetched image in bytes.
    #[arg(long, env = "JANUS_IMAGE_FETCH_MAX_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub image_fetch_max_bytes: usize,
    /// Seconds a fetch of an image URL may take.
    #[arg(long, env = "JANUS_IMAGE_FETCH_TIMEOUT", default_value_t = 10.0)]
    pub image_fetch_timeout: f64,
    /// Host names the HTTP port answers to besides localhost and its listen IP (any IP when it
    /// listens on 0.0.0.0 or ::), comma-separated `host` (any port) or `host:port`; `*` = any.
    /// Other Host headers get 403 (DNS rebinding) unless the request carries a valid API key.
    #[arg(long, env = "JANUS_ALLOWED_HOSTS", value_delimiter = ',', value_parser = guard::host_entry)]
    pub allowed_hosts: Vec<String>,
    /// Origins whose web pages may call the HTTP API (CORS), comma-separated
    /// `scheme://host[:port]`; `*` = any (default: none; the playground needs none).
    #[arg(long, env = "JANUS_CORS_ORIGINS", value_delimiter = ',', value_parser = guard::origin_entry)]
    pub cors_origins: Vec<String>,
}

impl HttpFlags {
    /// As options.
    pub fn options(&self) -> HttpOptions {
        HttpOptions {
            fetch: FetchPolicy {
                allow_hosts: self
                    .image_fetch_hosts
                    .iter()
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
                    .collect(),
                max_bytes: self.image_fetch_max_bytes,
                timeout: Duration::from_secs_f64(self.image_fetch_timeout.clamp(0.01, 3600.0)),
            },
            allowed_hosts: self.allowed_hosts.clone(),
            cors_origins: self.cors_origins.clone(),
        }
    }
}

/// The address of an `--http-listen` value; `off`, `none` or empty: no HTTP port.
pub fn listen_addr(value: &str) -> Option<&str> {
    let v = value.trim();
    (!v.is_empty() && !v.eq_ignore_ascii_case("off") && !v.eq_ignore_ascii_case("none"))
        .then_some(v)
}

/// Largest HTTP request body for a gateway whose largest gRPC message is `max_message_bytes`:
/// base64 makes inline images a third larger, and the JSON around them gets 64 KiB.
pub fn body_limit(max_message_bytes: usize) -> usize {
    max_message_bytes
        .saturating_add(max_message_bytes.div_ceil(3))
        .saturating_add(64 * 1024)
}

/// The running HTTP port.
#[derive(Debug)]
pub struct HttpRunning {
    addr: SocketAddr,
    tls: bool,
    task: JoinHandle<()>,
}

impl HttpRunning {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` or `https://ADDR`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Waits until the port has stopped accepting (after the shutdown signal).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Serves the HTTP port on `listener` over `gateway`. From `life.shutdown` the gateway drains:
/// new API calls get 503, running ones are counted in its drain; once its listener closes
/// (`life.closed`) no new connections, open ones finish their requests (streams end with the
/// gateway's grace period).
pub(crate) fn spawn(
    gateway: Gateway,
    server: &ServerOptions,
    opts: HttpOptions,
    listener: TcpListener,
    life: Lifecycle,
) -> anyhow::Result<HttpRunning> {
    let addr = listener.local_addr().context("local address")?;
    let conn = janus_service::server::conn_options(server, Protocols::Http, None);
    let state = Arc::new(api::AppState {
        gateway,
        auth: server.security.auth.clone(),
        metrics: server.metrics.clone(),
        body_limit: body_limit(server.max_message_bytes),
        fetcher: Fetcher::new(opts.fetch).context("image fetch client")?,
        site: guard::SitePolicy::new(
            addr.ip(),
            conn.tls.is_some(),
            &opts.allowed_hosts,
            &opts.cors_origins,
        )?,
        started: crate::openai::unix_now(),
        infos: Mutex::new([None, None]),
        drain: life.drain.clone(),
    });
    let router = api::router(state);
    let is_tls = conn.tls.is_some();
    // Accepting until the gateway's listener closes (its drain is over), as gRPC; open
    // connections then finish their requests gracefully until the gateway's abort.
    let task = tokio::spawn(async move {
        janus_service::conn::serve(
            listener,
            router,
            conn,
            life.closed.clone(),
            life.abort.clone(),
        )
        .await;
        tracing::info!(%addr, "HTTP port closed");
    });
    Ok(HttpRunning {
        addr,
        tls: is_tls,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_values_and_limits() {
        assert_eq!(listen_addr("127.0.0.1:8000"), Some("127.0.0.1:8000"));
        assert_eq!(listen_addr("off"), None);
        assert_eq!(listen_addr(" OFF "), None);
        assert_eq!(listen_addr(""), None);
        assert_eq!(body_limit(3 << 20), (4 << 20) + 64 * 1024);
    }
}
