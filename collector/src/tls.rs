//! TLS for the agent stream: the rustls server config (client certificates from our CA, optional
//! so that `grpc.health.v1` answers without one), the accept loop that logs refused handshakes,
//! and reading a node's identity from its certificate.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Pem {
        path: std::path::PathBuf,
        what: String,
    },
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads every certificate in a PEM file; an empty or invalid file is an error naming it.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut bytes.as_slice()).collect();
    let certs = certs.map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        what: format!("invalid PEM: {e}"),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "no certificate found (expected a PEM \"CERTIFICATE\" block)".into(),
        });
    }
    Ok(certs)
}

/// Loads the first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            what: format!("invalid PEM: {e}"),
        })?
        .ok_or_else(|| TlsError::Pem {
            path: path.to_path_buf(),
            what: "no private key found (expected a PEM \"PRIVATE KEY\" block)".into(),
        })
}

/// The server config: our certificate, client certificates verified against our CA.
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| TlsError::Pem {
            path: ca.to_path_buf(),
            what: format!("not a usable CA certificate: {e}"),
        })?;
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        // A connection without a certificate may reach grpc.health.v1 only; the agent service
        // refuses it (see grpc.rs). A certificate from another CA fails the handshake.
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| TlsError::Rustls(format!("{}: {e}", cert.display())))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections and runs TLS handshakes concurrently; successful streams go to the
/// returned channel (fed to tonic), refused ones are logged with the peer and the reason.
pub fn accept_loop(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> mpsc::Receiver<Result<TlsStream<tokio::net::TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if tx.is_closed() {
                break;
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => log_refused(peer, &e.to_string()),
                    Err(_) => log_refused(peer, "handshake timed out"),
                }
            });
        }
    });
    rx
}

fn log_refused(peer: SocketAddr, reason: &str) {
    tracing::warn!(
        %peer,
        reason,
        "TLS handshake refused: the agent's certificate must be signed by this collector's CA \
         (vigil-collector ca issue --node NAME)"
    );
}

/// The node name in a client certificate: its subject common name.
pub fn node_of_certificate(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_string())
}
