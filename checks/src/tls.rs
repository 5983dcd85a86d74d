//! TLS client settings shared by checks that open their own TLS connections (`grpc`, and the
//! certificate probe of `web`): a rustls `ClientConfig` (aws-lc-rs provider) with the system
//! roots or a CA file, an optional client certificate, and a verifier that can record the
//! server's certificate chain.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};

/// TLS options of a check that speaks TLS itself (`grpc`). Giving `tls:` at all turns TLS on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsOptions {
    /// PEM file of CA certificates to trust *instead of* the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Accept any server certificate (expired, self-signed, wrong host). Default false.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// PEM client certificate (chain) for mutual TLS; needs `client_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, RSA or SEC1) of `client_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    /// Name to send (SNI) and to verify the certificate against; default: the host of the
    /// address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

impl TlsOptions {
    pub(crate) fn validate(&self, field: &str) -> Result<(), crate::SpecError> {
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(crate::threshold::invalid(
                field,
                "client_cert and client_key go together",
            ));
        }
        if let Some(n) = &self.server_name {
            ServerName::try_from(n.as_str()).map_err(|_| {
                crate::threshold::invalid(field, format!("server_name {n:?} is not a host name"))
            })?;
        }
        Ok(())
    }
}

/// The server's certificate chain (leaf first) as seen during the last handshake.
pub(crate) type PeerChain = Arc<Mutex<Vec<CertificateDer<'static>>>>;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// Records the chain, then verifies it with `inner` (or accepts it when `inner` is `None`).
/// Handshake signatures are always verified.
#[derive(Debug)]
struct Recording {
    inner: Option<Arc<dyn ServerCertVerifier>>,
    chain: Option<PeerChain>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(chain) = &self.chain
            && let Ok(mut c) = chain.lock()
        {
            *c = std::iter::once(end_entity)
                .chain(intermediates)
                .map(|d| d.clone().into_owned())
                .collect();
        }
        match &self.inner {
            Some(v) => {
                v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Builds a client config. `verify: false` accepts any certificate; `chain` (when given)
/// receives the server's chain. Errors are the check's own (unreadable or invalid files).
pub(crate) fn client_config(
    ca_file: Option<&Path>,
    verify: bool,
    client_cert: Option<(&Path, &Path)>,
    chain: Option<PeerChain>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, String> {
    let provider = provider();
    let inner: Option<Arc<dyn ServerCertVerifier>> = if !verify {
        None
    } else if let Some(ca) = ca_file {
        let pem = read(ca, "tls.ca_file")?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!(
                "tls.ca_file {}: no certificate found",
                ca.display()
            ));
        }
        Some(
            rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| format!("tls.ca_file {}: {e}", ca.display()))?,
        )
    } else {
        Some(Arc::new(
            rustls_platform_verifier::Verifier::new(provider.clone())
                .map_err(|e| format!("cannot load the system's root certificates: {e}"))?,
        ))
    };
    let verifier = Arc::new(Recording {
        inner,
        chain,
        provider: provider.clone(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS settings: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let pem = read(cert, "tls.client_cert")?;
            let certs = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("tls.client_cert {}: {e}", cert.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "tls.client_cert {}: no certificate found",
                    cert.display()
                ));
            }
            let kpem = read(key, "tls.client_key")?;
            let key_der: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut kpem.as_slice())
                .map_err(|e| format!("tls.client_key {}: {e}", key.display()))?
                .ok_or_else(|| format!("tls.client_key {}: no private key found", key.display()))?;
            builder
                .with_client_auth_cert(certs, key_der)
                .map_err(|e| format!("tls.client_cert/client_key: {e}"))?
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Days from now until the leaf certificate of `chain` expires (negative when expired), and
/// its subject, read with x509-parser.
pub(crate) fn leaf_expiry(chain: &[CertificateDer<'_>]) -> Result<(f64, String), String> {
    let leaf = chain
        .first()
        .ok_or_else(|| "the server sent no certificate".to_string())?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("cannot parse the server certificate: {e}"))?;
    let not_after = cert.validity().not_after.timestamp();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    Ok((
        (not_after - now) as f64 / 86_400.0,
        cert.subject().to_string(),
    ))
}
