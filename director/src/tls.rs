//! QUIC/TLS configuration for the agent listener: TLS 1.3 only, mutual authentication against the cluster CA.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// How long a silent agent connection lives; agents send keep-alives well inside it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).with_context(|| format!("reading the private key {}", path.display()))
}

/// The QUIC server config: presents `cert`, requires a client certificate chaining to `ca`.
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca_cert in load_certs(ca)? {
        roots.add(ca_cert).with_context(|| format!("adding the CA certificate {}", ca.display()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("building the client-certificate verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("selecting TLS 1.3")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .with_context(|| format!("using the certificate {} with the key {}", cert.display(), key.display()))?;
    tls.alpn_protocols = vec![fulcrum_protocol::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).context("building the QUIC TLS config")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().context("idle timeout")?));
    // One stream per agent connection; refuse more rather than buffer them.
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Whether `name` is one of the DNS names of the peer's (already CA-verified) end-entity certificate.
pub fn certificate_names(chain: &[CertificateDer<'static>], name: &str) -> bool {
    let (Some(end_entity), Ok(server_name)) = (chain.first(), ServerName::try_from(name)) else {
        return false;
    };
    webpki::EndEntityCert::try_from(end_entity)
        .and_then(|cert| cert.verify_is_valid_for_subject_name(&server_name))
        .is_ok()
}

/// The certificate chain the peer of `connection` presented (the verifier has already checked it).
pub fn peer_chain(connection: &quinn::Connection) -> Vec<CertificateDer<'static>> {
    connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|chain| *chain)
        .unwrap_or_default()
}
