//! TLS (rustls with the `ring` provider, through tonic's `tls-ring` feature): server
//! configurations for the public port and for model services requiring client certificates
//! (mTLS), client configurations for the gateway's backend channels and for the CLI, and the
//! URL scheme rule for backend addresses.
//!
//! All files are PEM (cert-manager's `tls.crt`, `tls.key`, `ca.crt` work as they are).

use anyhow::Context as _;
use std::path::Path;
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// Longest a TLS handshake may take, on either side (a stalled client cannot hold a slot).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    anyhow::ensure!(
        text.contains("-----BEGIN "),
        "{what} {} is not PEM (expected a -----BEGIN ...----- block)",
        path.display()
    );
    Ok(bytes)
}

fn identity(cert: &Path, key: &Path) -> anyhow::Result<Identity> {
    Ok(Identity::from_pem(
        read(cert, "certificate")?,
        read(key, "private key")?,
    ))
}

/// A server's TLS: its certificate chain and key; with `client_ca`, clients must present a
/// certificate signed by that CA (mTLS).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> anyhow::Result<ServerTlsConfig> {
    let mut cfg = ServerTlsConfig::new()
        .identity(identity(cert, key)?)
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca) = client_ca {
        cfg = cfg.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
    }
    Ok(cfg)
}

/// The PEM files of a server's TLS (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: std::path::PathBuf,
    /// Private key of `cert`.
    pub key: std::path::PathBuf,
    /// CA that client certificates must be signed by (mTLS).
    pub client_ca: Option<std::path::PathBuf>,
}

impl TlsFiles {
    /// The certificate chain, key and client CA as PEM bytes (checked to be PEM).
    pub fn read(&self) -> anyhow::Result<(Vec<u8>, Vec<u8>, Option<Vec<u8>>)> {
        Ok((
            read(&self.cert, "certificate")?,
            read(&self.key, "private key")?,
            self.client_ca
                .as_deref()
                .map(|ca| read(ca, "client CA"))
                .transpose()?,
        ))
    }
}

/// Server TLS from optional flags: none without `--tls-cert`; both of `--tls-cert` and
/// `--tls-key` are needed, and `--tls-client-ca` only makes sense with them.
pub fn server_config_from(
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
) -> anyhow::Result<Option<ServerTlsConfig>> {
    match (cert, key) {
        (Some(c), Some(k)) => server_config(c, k, client_ca).map(Some),
        (None, None) => {
            anyhow::ensure!(
                client_ca.is_none(),
                "--tls-client-ca needs --tls-cert and --tls-key (client certificates are checked only over TLS)"
            );
            Ok(None)
        }
        (Some(_), None) => anyhow::bail!("--tls-cert needs --tls-key"),
        (None, Some(_)) => anyhow::bail!("--tls-key needs --tls-cert"),
    }
}

/// A client's TLS: trust `ca` (else the system's roots), present `cert`/`key` when given
/// (mTLS), and check the server's certificate against `domain` instead of the URL's host.
pub fn client_config(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
    domain: Option<&str>,
) -> anyhow::Result<ClientTlsConfig> {
    let mut cfg = ClientTlsConfig::new().timeout(HANDSHAKE_TIMEOUT);
    cfg = match ca {
        Some(ca) => cfg.ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?)),
        None => cfg.with_native_roots(),
    };
    match (cert, key) {
        (Some(c), Some(k)) => cfg = cfg.identity(identity(c, k)?),
        (None, None) => {}
        _ => anyhow::bail!("a client certificate needs both its certificate and its key"),
    }
    if let Some(d) = domain.filter(|d| !d.is_empty()) {
        cfg = cfg.domain_name(d);
    }
    Ok(cfg)
}

/// The URL of a backend address: as given when it has a scheme; otherwise `https://` when
/// backend TLS is configured, `http://` when not.
pub fn backend_url(addr: &str, tls: bool) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

/// An endpoint for `url`: `https://` URLs use `tls` (the system's roots when `None`), other
/// schemes are plaintext.
pub fn endpoint(url: &str, tls: Option<&ClientTlsConfig>) -> anyhow::Result<Endpoint> {
    let ep = Endpoint::from_shared(url.to_string()).map_err(|e| anyhow::anyhow!("{e}"))?;
    if !url.starts_with("https://") {
        return Ok(ep);
    }
    let cfg = tls.cloned().unwrap_or_else(|| {
        ClientTlsConfig::new()
            .with_native_roots()
            .timeout(HANDSHAKE_TIMEOUT)
    });
    ep.tls_config(cfg).map_err(|e| anyhow::anyhow!("TLS: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_flag_rules() {
        assert_eq!(backend_url("h:1", false), "http://h:1");
        assert_eq!(backend_url("h:1", true), "https://h:1");
        assert_eq!(backend_url("http://h:1", true), "http://h:1");
        assert_eq!(backend_url("https://h:1", false), "https://h:1");
        assert!(server_config_from(None, None, None).unwrap().is_none());
        let p = Path::new("/nonexistent");
        assert!(server_config_from(Some(p), None, None).is_err());
        assert!(server_config_from(None, Some(p), None).is_err());
        assert!(server_config_from(None, None, Some(p)).is_err());
        let e = server_config_from(Some(p), Some(p), None).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent"), "{e:#}");
        assert!(endpoint("http://127.0.0.1:1", None).is_ok());
        assert!(endpoint("https://127.0.0.1:1", None).is_ok());
    }
}
