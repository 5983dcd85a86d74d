//! The test PKI: a CA made by rcgen in a temporary directory, a server certificate for
//! `localhost` and `127.0.0.1`, and a client certificate for one node, as PEM files (`ca.pem`,
//! `server.pem`, `server.key`, `client.pem`, `client.key`; keys mode 0600) and as DER; and
//! self-signed certificates with a chosen lifetime.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Days the CA's, server's and client's certificates are valid from now (they became valid a
/// day ago).
pub const VALID_DAYS: u64 = 365;

/// One certificate and its key.
pub struct Issued {
    pub pem: String,
    pub der: CertificateDer<'static>,
    pub key_pem: String,
    key_der: Vec<u8>,
}

impl Issued {
    fn new(cert: &rcgen::Certificate, key: &KeyPair) -> Issued {
        Issued {
            pem: cert.pem(),
            der: cert.der().clone(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }

    /// The private key (PKCS #8).
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days);
}

/// A CA, a server certificate and a client certificate, written to a temporary directory.
pub struct Pki {
    dir: tempfile::TempDir,
    node: String,
    pub ca: Issued,
    pub server: Issued,
    pub client: Issued,
}

impl Pki {
    /// A new CA ("vigil test CA"), a server certificate (common name `localhost`; names
    /// `localhost` and `127.0.0.1`) and a client certificate whose common name is `node`.
    pub fn new(node: &str) -> Pki {
        let dir = tempfile::tempdir().expect("temporary directory");
        let days = i64::try_from(VALID_DAYS).expect("days fit");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "vigil test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut ca_params, days);
        let ca_key = KeyPair::generate().expect("CA key");
        let (key_pem, key_der) = (ca_key.serialize_pem(), ca_key.serialize_der());
        let issuer = CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA certificate");
        let ca = Issued {
            pem: issuer.pem(),
            der: issuer.der().clone(),
            key_pem,
            key_der,
        };
        let issue = |names: Vec<String>, cn: &str, eku: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(names).expect("params");
            p.distinguished_name.push(DnType::CommonName, cn);
            p.extended_key_usages = vec![eku];
            validity(&mut p, days);
            let cert = p.signed_by(&key, &issuer).expect("sign");
            Issued::new(&cert, &key)
        };
        let server = issue(
            vec!["localhost".into(), "127.0.0.1".into()],
            "localhost",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = issue(
            vec![node.to_string()],
            node,
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let pki = Pki {
            dir,
            node: node.to_string(),
            ca,
            server,
            client,
        };
        pki.write("ca.pem", &pki.ca.pem, false);
        pki.write("server.pem", &pki.server.pem, false);
        pki.write("server.key", &pki.server.key_pem, true);
        pki.write("client.pem", &pki.client.pem, false);
        pki.write("client.key", &pki.client.key_pem, true);
        pki
    }

    fn write(&self, name: &str, text: &str, secret: bool) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.file(name);
        std::fs::write(&path, text).expect("write PKI file");
        if secret {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod 600");
        }
    }

    /// The directory holding the files.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The path of one of the files (`ca.pem`, `client.key`, …).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The bytes of one of the files.
    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.file(name)).expect("read PKI file")
    }

    /// The node named in the client certificate.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der.clone()
    }

    pub fn server_der(&self) -> CertificateDer<'static> {
        self.server.der.clone()
    }

    pub fn client_der(&self) -> CertificateDer<'static> {
        self.client.der.clone()
    }

    /// tonic's TLS for a server with the server certificate that requires a client certificate
    /// from this CA (mutual TLS, as the collector does).
    pub fn mtls(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.server.pem,
                &self.server.key_pem,
            ))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca.pem))
    }

    /// A rustls server config with the server certificate; with `client_auth` it demands a
    /// client certificate signed by this CA.
    pub fn rustls_server(&self, client_auth: bool) -> rustls::ServerConfig {
        server_config(
            vec![self.server_der()],
            self.server.key(),
            client_auth.then(|| self.ca_der()),
        )
    }

    /// agent.yaml for this node, with this PKI's files (relative to the PKI directory, where the
    /// config is taken to live), the collector at `url` (`server_name: localhost`) and quick
    /// reconnects; `extra` is appended as is.
    pub fn agent_yaml(&self, url: &str, state_dir: &Path, extra: &str) -> String {
        format!(
            "node: {}\n\
             collector: {{ url: '{url}', server_name: localhost, connect_timeout: 2s }}\n\
             tls: {{ ca: ca.pem, cert: client.pem, key: client.key }}\n\
             state_dir: '{}'\n\
             reconnect: {{ initial: 200ms, max: 400ms }}\n{extra}",
            self.node,
            state_dir.display()
        )
    }
}

/// A self-signed certificate for `names` (DNS names or IP addresses), valid from a day ago for
/// `days` days from now (negative: expired that many days ago).
pub fn self_signed(names: &[&str], days: i64) -> Issued {
    let key = KeyPair::generate().expect("key");
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("params");
    validity(&mut params, days);
    let cert = params.self_signed(&key).expect("self-signed");
    Issued::new(&cert, &key)
}

impl Issued {
    /// A rustls server config presenting this certificate alone (no client authentication).
    pub fn rustls_server(&self) -> rustls::ServerConfig {
        server_config(vec![self.der.clone()], self.key(), None)
    }
}

/// A rustls server config (aws-lc-rs) with `chain` and `key`; with `client_ca` it demands a client
/// certificate signed by it.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: Option<CertificateDer<'static>>,
) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca).expect("CA certificate");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(chain, key)
        .expect("server certificate and key")
}
