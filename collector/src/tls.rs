//! TLS for the agent stream: the rustls server config (client certificates from our CA, optional
//! so that `grpc.health.v1` answers without one), the accept loop that logs refused handshakes
//! with their reason (rate-limited per reason), and reading a node's identity from its certificate.

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

/// How long a refused-handshake reason is quiet after it was logged; what it refuses meanwhile
/// is counted and summed up in one line when the window ends.
pub const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(60);

/// Why a TLS handshake was refused, as logged (`reason=`) and rate-limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The peer closed the connection without sending anything (a port scan, a TCP probe).
    ClosedEarly,
    /// The peer spoke plain HTTP to the TLS port.
    PlainHttp,
    /// The first bytes are not a TLS record (garbage, another protocol).
    NotTls,
    /// The handshake did not finish within [`HANDSHAKE_TIMEOUT`].
    Timeout,
    /// A client certificate signed by another CA.
    UnknownCa,
    /// A client certificate that has expired or is not valid yet.
    Expired,
    /// Any other problem with the client certificate.
    BadCertificate,
    /// The client aborted the handshake (it does not trust this collector's certificate, …).
    ClientAlert,
    /// Anything else (protocol error, connection reset).
    Other,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::ClosedEarly => "closed_before_handshake",
            Refusal::PlainHttp => "plain_http",
            Refusal::NotTls => "not_tls",
            Refusal::Timeout => "handshake_timeout",
            Refusal::UnknownCa => "certificate_from_another_ca",
            Refusal::Expired => "certificate_expired",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::ClientAlert => "client_aborted",
            Refusal::Other => "tls_error",
        }
    }

    fn explain(self) -> &'static str {
        match self {
            Refusal::ClosedEarly => {
                "the peer closed the connection without a TLS handshake (a port scan or a TCP probe)"
            }
            Refusal::PlainHttp => "the peer spoke plain HTTP to the TLS port (use https://)",
            Refusal::NotTls => "the peer did not speak TLS",
            Refusal::Timeout => "the handshake did not finish in time",
            Refusal::UnknownCa => {
                "the client certificate is not signed by this collector's CA \
                 (vigil-collector ca issue --node NAME)"
            }
            Refusal::Expired => {
                "the client certificate has expired or is not valid yet (check both clocks, or \
                 issue a new one: vigil-collector ca issue --node NAME)"
            }
            Refusal::BadCertificate => "the client certificate is not acceptable",
            Refusal::ClientAlert => {
                "the client aborted the handshake (does it trust this collector's CA?)"
            }
            Refusal::Other => "TLS error",
        }
    }

    /// Classifies a failed `accept`.
    pub fn of(e: &std::io::Error) -> Refusal {
        use rustls::{CertificateError, Error};
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            return Refusal::ClosedEarly;
        }
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
            return Refusal::Other;
        };
        match tls {
            Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => Refusal::UnknownCa,
            Error::InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            ) => Refusal::Expired,
            Error::InvalidCertificate(_) | Error::NoCertificatesPresented => {
                Refusal::BadCertificate
            }
            Error::AlertReceived(_) => Refusal::ClientAlert,
            Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => Refusal::NotTls,
            _ => Refusal::Other,
        }
    }
}

/// What the first bytes of a connection say, before any TLS: `None` when they may start a TLS
/// handshake (a handshake record, 0x16).
fn sniff(first: &[u8]) -> Option<Refusal> {
    const HTTP: &[&[u8]] = &[
        b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC", b"PRI ",
    ];
    match first.first() {
        None => Some(Refusal::ClosedEarly),
        Some(0x16) => None,
        Some(_)
            if HTTP
                .iter()
                .any(|m| first.starts_with(&m[..m.len().min(first.len())])) =>
        {
            Some(Refusal::PlainHttp)
        }
        Some(_) => Some(Refusal::NotTls),
    }
}

/// Rate limit for refused-handshake lines: per reason, the first in a window is logged, the rest
/// are counted and summed up in one line when the window ends.
#[derive(Debug, Default)]
pub struct RefusalLog {
    windows: std::sync::Mutex<std::collections::HashMap<Refusal, Window>>,
}

#[derive(Debug)]
struct Window {
    since: std::time::Instant,
    suppressed: u64,
}

/// What to log for one refusal.
#[derive(Debug, PartialEq, Eq)]
pub enum LogDecision {
    /// Log it, after a summary of `suppressed` refusals of the previous window when not zero.
    Log { suppressed: u64 },
    /// Count it only.
    Quiet,
}

impl RefusalLog {
    /// Records one refusal at `now` and says whether to log it.
    pub fn record(&self, reason: Refusal, now: std::time::Instant) -> LogDecision {
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        match w.get_mut(&reason) {
            Some(win) if now.duration_since(win.since) < REFUSAL_LOG_WINDOW => {
                win.suppressed += 1;
                LogDecision::Quiet
            }
            Some(win) => {
                let suppressed = std::mem::take(&mut win.suppressed);
                win.since = now;
                LogDecision::Log { suppressed }
            }
            None => {
                w.insert(
                    reason,
                    Window {
                        since: now,
                        suppressed: 0,
                    },
                );
                LogDecision::Log { suppressed: 0 }
            }
        }
    }

    /// Ends the windows over at `now`: each reason with refusals counted and not yet reported,
    /// with their number.
    pub fn flush(&self, now: std::time::Instant) -> Vec<(Refusal, u64)> {
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        w.retain(|reason, win| {
            if now.duration_since(win.since) < REFUSAL_LOG_WINDOW {
                return true;
            }
            if win.suppressed > 0 {
                out.push((*reason, win.suppressed));
            }
            false
        });
        out
    }
}

fn log_suppressed(reason: Refusal, count: u64) {
    tracing::warn!(
        reason = %reason.as_str(),
        count,
        window_s = REFUSAL_LOG_WINDOW.as_secs(),
        "more TLS handshakes refused for the same reason were not logged"
    );
}

/// Accepts TCP connections and runs TLS handshakes concurrently; successful streams go to the
/// returned channel (fed to tonic), refused ones are logged with the peer and the reason, at
/// most one line per reason per [`REFUSAL_LOG_WINDOW`] plus a count of the others.
pub fn accept_loop(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> mpsc::Receiver<Result<TlsStream<tokio::net::TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let log = Arc::new(RefusalLog::default());
    {
        let log = log.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            while !tx.is_closed() {
                tick.tick().await;
                for (reason, count) in log.flush(std::time::Instant::now()) {
                    log_suppressed(reason, count);
                }
            }
        });
    }
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
            let log = log.clone();
            tokio::spawn(async move {
                // Refusals are logged before the connection is dropped.
                let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
                let mut first = [0u8; 4];
                match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
                    Err(_) => return log_refused(&log, peer, Refusal::Timeout, ""),
                    Ok(Err(e)) => return log_refused(&log, peer, Refusal::Other, &e.to_string()),
                    Ok(Ok(n)) => {
                        if let Some(r) = sniff(&first[..n]) {
                            return log_refused(&log, peer, r, "");
                        }
                    }
                }
                match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => log_refused(&log, peer, Refusal::of(&e), &e.to_string()),
                    Err(_) => log_refused(&log, peer, Refusal::Timeout, ""),
                }
            });
        }
    });
    rx
}

fn log_refused(log: &RefusalLog, peer: SocketAddr, reason: Refusal, detail: &str) {
    if let LogDecision::Log { suppressed } = log.record(reason, std::time::Instant::now()) {
        if suppressed > 0 {
            log_suppressed(reason, suppressed);
        }
        tracing::warn!(
            %peer,
            reason = %reason.as_str(),
            detail = ?detail,
            "TLS handshake refused: {}",
            reason.explain()
        );
    }
}

/// The node name in a client certificate: its subject common name.
pub fn node_of_certificate(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn first_bytes_tell_http_garbage_and_tls_apart() {
        assert_eq!(sniff(b""), Some(Refusal::ClosedEarly));
        assert_eq!(sniff(b"GET "), Some(Refusal::PlainHttp));
        assert_eq!(sniff(b"PO"), Some(Refusal::PlainHttp));
        assert_eq!(sniff(b"PRI "), Some(Refusal::PlainHttp));
        assert_eq!(sniff(b"\x00\x01zz"), Some(Refusal::NotTls));
        assert_eq!(sniff(b"SSH-"), Some(Refusal::NotTls));
        assert_eq!(sniff(b"\x16\x03\x01\x02"), None);
    }

    #[test]
    fn one_line_per_reason_per_window_then_a_count() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        assert_eq!(
            log.record(Refusal::NotTls, t0),
            LogDecision::Log { suppressed: 0 }
        );
        for _ in 0..199 {
            assert_eq!(log.record(Refusal::NotTls, t0), LogDecision::Quiet);
        }
        // Another reason has its own window.
        assert_eq!(
            log.record(Refusal::Timeout, t0),
            LogDecision::Log { suppressed: 0 }
        );
        assert!(log.flush(t0 + Duration::from_secs(1)).is_empty());
        // The window ends: the next refusal is logged after the count of the quiet ones.
        let t1 = t0 + REFUSAL_LOG_WINDOW;
        assert_eq!(
            log.record(Refusal::NotTls, t1),
            LogDecision::Log { suppressed: 199 }
        );
        assert_eq!(log.record(Refusal::NotTls, t1), LogDecision::Quiet);
        // With no further refusal, the flush reports the count once.
        let t2 = t1 + REFUSAL_LOG_WINDOW;
        assert_eq!(log.flush(t2), vec![(Refusal::NotTls, 1)]);
        assert!(log.flush(t2).is_empty());
        assert_eq!(
            log.record(Refusal::NotTls, t2),
            LogDecision::Log { suppressed: 0 }
        );
    }
}
