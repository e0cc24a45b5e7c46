//! TLS of the HTTP port: the certificate, key and client CA of the gateway's gRPC port
//! (`--tls-cert`, `--tls-key`, `--tls-client-ca`), rustls with ring, ALPN h2 and http/1.1.

use anyhow::Context as _;
use janus_service::tls::TlsFiles;
use std::sync::Arc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A rustls server configuration from the gateway's TLS files.
pub fn server_config(files: &TlsFiles) -> anyhow::Result<Arc<rustls::ServerConfig>> {
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
    let mut cfg = builder
        .with_single_cert(chain, key)
        .context("TLS certificate and key do not match or are not usable")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
