//! TLS (rustls with the `ring` provider, as tonic's `tls-ring` feature): server
//! configurations for every port of a server, with client certificates required when a client
//! CA is given (mTLS), client configurations for the gateway's backend channels and for the CLI, and the
//! URL scheme rule for backend addresses.
//!
//! All files are PEM (cert-manager's `tls.crt`, `tls.key`, `ca.crt` work as they are).

use anyhow::Context as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

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

/// A server's TLS: the PEM files and the rustls configuration built from them, which every
/// port of the server shares ([`crate::conn`] serves it; ALPN per port, [`ServerTls::config`]).
#[derive(Clone)]
pub struct ServerTls {
    /// The files it was read from.
    pub files: TlsFiles,
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads and checks the files (certificate chain and key match, client CA usable).
    pub fn from_files(files: TlsFiles) -> anyhow::Result<Self> {
        let config = Arc::new(rustls_config(&files)?);
        Ok(Self { files, config })
    }

    /// The configuration for a port speaking `protocols` (ALPN `h2`, plus `http/1.1` on the
    /// HTTP port).
    pub fn config(&self, protocols: crate::conn::Protocols) -> Arc<rustls::ServerConfig> {
        let mut cfg = (*self.config).clone();
        cfg.alpn_protocols = match protocols {
            crate::conn::Protocols::Grpc => vec![b"h2".to_vec()],
            crate::conn::Protocols::Http => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        Arc::new(cfg)
    }
}

fn rustls_config(files: &TlsFiles) -> anyhow::Result<rustls::ServerConfig> {
    let (cert, key, client_ca) = files.read()?;
    let chain = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("certificate {}", files.cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "certificate {} holds no certificate",
        files.cert.display()
    );
    let key = PrivateKeyDer::from_pem_slice(&key)
        .with_context(|| format!("private key {}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&ca) {
                roots
                    .add(c.context("client CA")?)
                    .context("client CA certificate")?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .context("client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder
        .with_single_cert(chain, key)
        .context("TLS certificate and key do not match or are not usable")
}

/// A server's TLS: its certificate chain and key; with `client_ca`, clients must present a
/// certificate signed by that CA (mTLS).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> anyhow::Result<ServerTls> {
    ServerTls::from_files(TlsFiles {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        client_ca: client_ca.map(Path::to_path_buf),
    })
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

/// PEM bytes of a certificate chain, its private key and an optional client CA.
pub type Pems = (Vec<u8>, Vec<u8>, Option<Vec<u8>>);

impl TlsFiles {
    /// The certificate chain, key and client CA as PEM bytes (checked to be PEM).
    pub fn read(&self) -> anyhow::Result<Pems> {
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
) -> anyhow::Result<Option<ServerTls>> {
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
