//! `vigil-agent doctor`: a pre-flight check of this node: agent.yaml, the TLS files, the
//! collector's reachability and a real mutual-TLS handshake, the Docker engine, the NVIDIA driver
//! and the state directory. Each finding is one line `OK|WARN|ERROR <what>: <detail> — <how to
//! fix>`; doctor changes nothing (it does not even create the state directory).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{CertificateError, ClientConfig, ClientConnection, RootCertStore};
use vigil_checks::gpu::{GpuSource, NvmlSource};
pub use vigil_doctor::{Finding, Level, PROBE_TIMEOUT, Report};
use vigil_doctor::{Purpose, Signed, common_name, secret_files, signed_by, validity};

use crate::config::AgentConfig;

/// Runs every check for the agent configured by `path`.
pub async fn run(path: &Path) -> Report {
    let mut out = Vec::new();
    let config = match AgentConfig::load(path) {
        Ok(c) => {
            out.push(Finding::ok(
                format!("config {}", path.display()),
                format!("loads (node {}, collector {})", c.node, c.collector.url),
            ));
            c
        }
        Err(e) => {
            out.push(Finding::error(
                format!("config {}", path.display()),
                e.to_string(),
                "correct the file and key named (config/agent.yaml documents every key)",
            ));
            return Report { findings: out };
        }
    };
    let files = check_files(&config, SystemTime::now(), &mut out);
    out.extend(check_collector(&config, files).await);
    out.push(check_docker().await);
    out.push(check_gpu().await);
    out.push(check_state_dir(&config.state_dir));
    Report { findings: out }
}

fn renew_agent(node: &str) -> String {
    format!(
        "on the collector: `vigil-collector ca issue --node {node} --dir CERTS` (it refuses to \
         overwrite: move the old {node}.pem and {node}.key aside first), then copy the new \
         {node}.pem and {node}.key here"
    )
}

const RENEW_CA: &str = "the CA belongs to the collector: run `vigil-collector doctor` there, \
    then copy its current ca.pem here";

/// Reads every certificate of a PEM file.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate found (expected a \"CERTIFICATE\" block)".into());
    }
    Ok(certs)
}

/// The TLS files, when all of them are usable.
struct TlsMaterial {
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn check_files(
    config: &AgentConfig,
    now: SystemTime,
    out: &mut Vec<Finding>,
) -> Option<TlsMaterial> {
    let node = &config.node;
    let renew = renew_agent(node);
    let ca_what = format!("CA certificate {}", config.tls.ca.display());
    let cert_what = format!("client certificate {}", config.tls.cert.display());
    let key_what = format!("private key {}", config.tls.key.display());

    let ca = match read_certs(&config.tls.ca) {
        Ok(c) => {
            out.push(validity(&ca_what, &c[0], now, RENEW_CA));
            Some(c)
        }
        Err(e) => {
            out.push(Finding::error(
                &ca_what,
                e,
                "tls.ca must be the collector's ca.pem (copy it from the collector's CA directory)",
            ));
            None
        }
    };
    let chain = match read_certs(&config.tls.cert) {
        Ok(c) => {
            out.push(validity(&cert_what, &c[0], now, &renew));
            Some(c)
        }
        Err(e) => {
            out.push(Finding::error(&cert_what, e, &renew));
            None
        }
    };
    if let Some(chain) = &chain {
        match common_name(&chain[0]) {
            Some(cn) if cn == *node => out.push(Finding::ok(
                &cert_what,
                format!("its common name {cn} equals node: {node}"),
            )),
            Some(cn) => out.push(Finding::error(
                &cert_what,
                format!(
                    "its common name is {cn}, but agent.yaml says node: {node} (the collector \
                     refuses the agent)"
                ),
                format!(
                    "set node: {cn} in agent.yaml if this is node {cn}; else install {node}'s \
                     certificate ({})",
                    renew
                ),
            )),
            None => out.push(Finding::error(
                &cert_what,
                "has no subject common name (the collector names the node after it)",
                &renew,
            )),
        }
    }
    let roots = match (&ca, &chain) {
        (Some(ca), Some(chain)) => signed_by_ca(&cert_what, chain, ca, config, out),
        _ => None,
    };

    let key = match std::fs::read(&config.tls.key) {
        Err(e) => {
            out.push(Finding::error(
                &key_what,
                format!("cannot read: {e}"),
                &renew,
            ));
            None
        }
        Ok(pem) => match PrivateKeyDer::from_pem_slice(&pem) {
            Ok(k) => Some(k),
            Err(e) => {
                out.push(Finding::error(
                    &key_what,
                    format!("no PEM private key found ({e})"),
                    &renew,
                ));
                None
            }
        },
    };
    out.extend(secret_files([("private key", config.tls.key.as_path())]));
    let (Some(key), Some(chain), Some(roots)) = (key, chain, roots) else {
        return None;
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let matched = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())
        .and_then(|b| {
            b.with_root_certificates(RootCertStore::empty())
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(|e| e.to_string())
        });
    match matched {
        Ok(_) => {
            out.push(Finding::ok(&key_what, "matches the client certificate"));
            Some(TlsMaterial { roots, chain, key })
        }
        Err(e) => {
            out.push(Finding::error(
                &key_what,
                format!("does not go with {}: {e}", config.tls.cert.display()),
                format!(
                    "tls.key must be the key issued with tls.cert ({node}.key next to {node}.pem)"
                ),
            ));
            None
        }
    }
}

/// Whether the client certificate is signed by the CA file; returns the CA as roots when usable.
fn signed_by_ca(
    what: &str,
    chain: &[CertificateDer<'static>],
    ca: &[CertificateDer<'static>],
    config: &AgentConfig,
    out: &mut Vec<Finding>,
) -> Option<RootCertStore> {
    let ca_path = config.tls.ca.display();
    let fix = format!(
        "tls.ca must be the collector's ca.pem and tls.cert a certificate it issued: {}",
        renew_agent(&config.node)
    );
    let (signed, roots) = signed_by(chain, ca, Purpose::Client, SystemTime::now());
    match signed {
        Signed::Yes => out.push(Finding::ok(what, format!("signed by the CA in {ca_path}"))),
        Signed::NotByCa => out.push(Finding::error(
            what,
            format!("not signed by the CA in {ca_path}"),
            &fix,
        )),
        Signed::BadCa(e) => {
            out.push(Finding::error(
                format!("CA certificate {ca_path}"),
                format!("not a usable CA certificate: {e}"),
                RENEW_CA,
            ));
            return None;
        }
        Signed::BadCert(e) | Signed::Refused(e) => out.push(Finding::error(
            what,
            format!("not accepted under the CA in {ca_path}: {e}"),
            &fix,
        )),
    }
    roots
}

/// `(host, port)` of the collector URL.
fn host_port(url: &str) -> Option<(String, u16)> {
    let uri: tonic::transport::Uri = url.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_string(), uri.port_u16().unwrap_or(443)))
}

/// What went wrong talking to the collector.
enum ProbeError {
    /// Name resolution or TCP connect.
    Tcp(String),
    /// During the handshake (usually the collector's certificate).
    Handshake(std::io::Error),
    /// After the handshake: the collector refused our certificate, or said nothing.
    Session(std::io::Error),
}

/// TCP connect, then TLS handshake with our identity, then the HTTP/2 preface: with TLS 1.3 a
/// refused client certificate only shows after the handshake, as an alert in answer to our
/// first bytes; an accepted one gets the server's HTTP/2 SETTINGS.
fn probe(
    addrs: Vec<SocketAddr>,
    tls: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    timings: &mut Vec<(SocketAddr, Duration)>,
) -> Result<(), ProbeError> {
    let mut last = "the host name resolves to no address".to_string();
    let mut tcp = None;
    for addr in addrs {
        let started = Instant::now();
        match TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) {
            Ok(s) => {
                timings.push((addr, started.elapsed()));
                tcp = Some(s);
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                last = format!(
                    "no TCP connection to {addr} within {}",
                    humantime::format_duration(PROBE_TIMEOUT)
                );
            }
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    let mut tcp = tcp.ok_or(ProbeError::Tcp(last))?;
    let _ = tcp.set_read_timeout(Some(PROBE_TIMEOUT));
    let _ = tcp.set_write_timeout(Some(PROBE_TIMEOUT));
    let mut conn = ClientConnection::new(tls, server_name)
        .map_err(|e| ProbeError::Handshake(std::io::Error::other(e)))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(ProbeError::Handshake)?;
    }
    let mut stream = rustls::Stream::new(&mut conn, &mut tcp);
    // HTTP/2 client preface and an empty SETTINGS frame.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    stream.write_all(&hello).map_err(ProbeError::Session)?;
    stream.flush().map_err(ProbeError::Session)?;
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => Err(ProbeError::Session(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the collector closed the connection",
        ))),
        Ok(_) => Ok(()),
        Err(e) => Err(ProbeError::Session(e)),
    }
}

/// The rustls error inside an I/O error, if any.
fn tls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

async fn check_collector(config: &AgentConfig, files: Option<TlsMaterial>) -> Vec<Finding> {
    let url = &config.collector.url;
    let Some((host, port)) = host_port(url) else {
        return vec![Finding::error(
            format!("collector {url}"),
            "no host in the URL",
            "write collector.url as https://HOST:PORT",
        )];
    };
    let what = format!("collector {host}:{port}");
    let tls_what = format!("TLS to collector {host}:{port}");
    let server_name = config.server_name();
    let Ok(sn) = ServerName::try_from(server_name.clone()) else {
        return vec![Finding::error(
            &tls_what,
            format!("{server_name:?} is not a host name"),
            "set collector.server_name to the name in the collector's certificate",
        )];
    };
    let tls = files.and_then(|m| {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .ok()?
            .with_root_certificates(m.roots)
            .with_client_auth_cert(m.chain, m.key)
            .ok()?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Some(Arc::new(cfg))
    });
    let Some(tls) = tls else {
        // TCP only: the TLS files above are not usable.
        let addr = format!("{host}:{port}");
        let reach =
            tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(&addr)).await;
        let tcp = match reach {
            Ok(Ok(_)) => Finding::ok(&what, "reachable (TCP)"),
            Ok(Err(e)) => Finding::error(&what, format!("cannot connect: {e}"), UNREACHABLE),
            Err(_) => Finding::error(
                &what,
                format!(
                    "no TCP connection within {}",
                    humantime::format_duration(PROBE_TIMEOUT)
                ),
                UNREACHABLE,
            ),
        };
        return vec![
            tcp,
            Finding::warn(&tls_what, "not tried: fix the TLS files above first", ""),
        ];
    };
    let addrs = match tokio::time::timeout(
        PROBE_TIMEOUT,
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(a)) => a.collect::<Vec<_>>(),
        Ok(Err(e)) => {
            return vec![Finding::error(
                &what,
                format!("cannot resolve {host}: {e}"),
                UNREACHABLE,
            )];
        }
        Err(_) => {
            return vec![Finding::error(
                &what,
                format!(
                    "{host} not resolved within {}",
                    humantime::format_duration(PROBE_TIMEOUT)
                ),
                UNREACHABLE,
            )];
        }
    };
    let n = config.node.clone();
    let job = tokio::task::spawn_blocking(move || {
        let mut timings = Vec::new();
        let r = probe(addrs, tls, sn, &mut timings);
        (r, timings)
    });
    let (result, timings) = match job.await {
        Ok(x) => x,
        Err(e) => {
            return vec![Finding::error(&what, format!("probe failed: {e}"), "")];
        }
    };
    let tcp_ok = timings.first().map(|(addr, took)| {
        Finding::ok(
            &what,
            format!("reachable (TCP to {addr} in {} ms)", took.as_millis()),
        )
    });
    let refused_fix = format!(
        "the collector accepts only certificates from its own CA: {}",
        renew_agent(&n)
    );
    match result {
        Ok(()) => vec![
            tcp_ok.unwrap_or_else(|| Finding::ok(&what, "reachable")),
            Finding::ok(
                &tls_what,
                format!(
                    "handshake done: the collector's certificate is valid for {server_name} and \
                     it accepted this agent's certificate"
                ),
            ),
        ],
        Err(ProbeError::Tcp(e)) => vec![Finding::error(&what, e, UNREACHABLE)],
        Err(ProbeError::Handshake(e)) => {
            let detail = match tls_error(&e) {
                Some(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature,
                )) => (
                    "the collector's certificate is not signed by the CA in tls.ca".to_string(),
                    "tls.ca must be the collector's ca.pem".to_string(),
                ),
                Some(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => (
                    format!("the collector's certificate does not cover {server_name}"),
                    "set collector.server_name to a name in the collector's certificate, or \
                     re-create it on the collector with `vigil-collector ca init --host NAME`"
                        .to_string(),
                ),
                Some(rustls::Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. },
                )) => (
                    "the collector's certificate has expired".to_string(),
                    "run `vigil-collector doctor` on the collector".to_string(),
                ),
                Some(rustls::Error::AlertReceived(alert)) => (
                    format!("the collector refused this agent's certificate ({alert:?})"),
                    refused_fix.clone(),
                ),
                _ => (
                    format!("handshake failed: {e}"),
                    "check that collector.url points at the collector's agent port (grpc_listen)"
                        .to_string(),
                ),
            };
            let mut v: Vec<Finding> = tcp_ok.into_iter().collect();
            v.push(Finding::error(&tls_what, detail.0, &detail.1));
            v
        }
        Err(ProbeError::Session(e)) => {
            let mut v: Vec<Finding> = tcp_ok.into_iter().collect();
            v.push(match tls_error(&e) {
                Some(rustls::Error::AlertReceived(alert)) => Finding::error(
                    &tls_what,
                    format!("the collector refused this agent's certificate ({alert:?})"),
                    &refused_fix,
                ),
                _ => Finding::error(
                    &tls_what,
                    format!("handshake done, but no HTTP/2 answer: {e}"),
                    "check that collector.url points at the collector's agent port \
                     (grpc_listen), not at a proxy",
                ),
            });
            v
        }
    }
}

const UNREACHABLE: &str = "is the collector running (`vigil-collector serve`)? check \
    collector.url, name resolution and the firewall between this node and the collector";

async fn check_docker() -> Finding {
    let host = vigil_control::docker::docker_host();
    let what = format!("Docker {host}");
    match vigil_control::docker::ping(PROBE_TIMEOUT).await {
        Ok(()) => Finding::ok(what, "the engine answers"),
        Err(e) => Finding::warn(
            what,
            format!("no answer: {e}"),
            "fine if this node runs no containers; else start Docker (systemctl start docker) \
             and let the agent's user use it (the systemd unit adds the docker group)",
        ),
    }
}

async fn check_gpu() -> Finding {
    let job = tokio::task::spawn_blocking(|| NvmlSource.read());
    match tokio::time::timeout(PROBE_TIMEOUT, job).await {
        Ok(Ok(Ok(snap))) => {
            let mut names: Vec<String> = snap.gpus.iter().map(|g| g.name.clone()).collect();
            names.dedup();
            Finding::ok(
                "NVIDIA driver",
                format!(
                    "version {}, {} GPU(s){}",
                    snap.driver_version,
                    snap.gpus.len(),
                    if names.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", names.join(", "))
                    }
                ),
            )
        }
        Ok(Ok(Err(reason))) => Finding::warn(
            "NVIDIA driver",
            if reason.starts_with("no NVIDIA driver found") {
                reason
            } else {
                format!("no NVIDIA driver found: {reason}")
            },
            "fine on a node without GPUs; on a GPU node install the NVIDIA driver (gpu checks \
             read it through NVML)",
        ),
        Ok(Err(e)) => Finding::warn("NVIDIA driver", format!("NVML probe failed: {e}"), ""),
        Err(_) => Finding::warn(
            "NVIDIA driver",
            format!(
                "NVML did not answer within {}",
                humantime::format_duration(PROBE_TIMEOUT)
            ),
            "check the driver with nvidia-smi",
        ),
    }
}

/// The state dir must be writable (or creatable: its nearest existing parent writable). Doctor
/// writes and removes one probe file and creates nothing else.
fn check_state_dir(dir: &Path) -> Finding {
    let what = format!("state dir {}", dir.display());
    let fix = format!(
        "the agent's user must own it: install -d -o vigil -g vigil -m 0750 {}",
        dir.display()
    );
    let (probe_in, exists) = if dir.is_dir() {
        (dir.to_path_buf(), true)
    } else if dir.exists() {
        return Finding::error(what, "exists but is not a directory", &fix);
    } else {
        match dir.ancestors().skip(1).find(|a| a.is_dir()) {
            Some(a) => (a.to_path_buf(), false),
            None => return Finding::error(what, "no existing parent directory", &fix),
        }
    };
    let probe = probe_in.join(format!(".vigil-doctor-{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .and_then(|mut f| f.write_all(b"probe"));
    let _ = std::fs::remove_file(&probe);
    match (written, exists) {
        (Ok(()), true) => Finding::ok(what, "writable"),
        (Ok(()), false) => Finding::ok(
            what,
            format!(
                "does not exist yet; the agent creates it ({} is writable)",
                probe_in.display()
            ),
        ),
        (Err(e), true) => Finding::error(what, format!("not writable: {e}"), &fix),
        (Err(e), false) => Finding::error(
            what,
            format!(
                "does not exist and cannot be created: {} is not writable ({e})",
                probe_in.display()
            ),
            &fix,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_key_readable_by_others_is_a_warning() {
        use std::os::unix::fs::PermissionsExt;
        let pki = vigil_testkit::pki::Pki::new("node-a");
        let yaml = pki.agent_yaml("https://127.0.0.1:1", &pki.file("state"), "");
        let config = AgentConfig::from_yaml(&yaml, &pki.file("agent.yaml")).unwrap();
        let key = pki.file("client.key");
        let warnings = |mode: u32| {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let mut out = Vec::new();
            let material = check_files(&config, SystemTime::now(), &mut out);
            assert!(material.is_some(), "{out:#?}");
            out.iter()
                .filter(|f| f.level != Level::Ok)
                .map(|f| f.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(warnings(0o600), Vec::<String>::new());
        assert_eq!(
            warnings(0o644),
            vec![format!(
                "WARN private key {0}: readable by group or others (mode 0644) — chmod 600 {0}",
                key.display()
            )]
        );
    }

    #[test]
    fn state_dir_probe() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(check_state_dir(dir.path()).level, Level::Ok);
        let missing = dir.path().join("a/b");
        let f = check_state_dir(&missing);
        assert_eq!(f.level, Level::Ok, "{f}");
        assert!(f.detail.contains("does not exist yet"), "{f}");
        assert!(!missing.exists());
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert_eq!(check_state_dir(&file).level, Level::Error);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn url_host_and_port() {
        assert_eq!(
            host_port("https://collector.example:7443"),
            Some(("collector.example".into(), 7443))
        );
        assert_eq!(host_port("https://[::1]:7"), Some(("::1".into(), 7)));
        assert_eq!(
            host_port("https://c.example"),
            Some(("c.example".into(), 443))
        );
    }
}
