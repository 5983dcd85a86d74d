//! Certificate authority tooling: `ca init` creates the CA and the collector's server certificate,
//! `ca issue` creates an agent's client certificate whose identity (CN and DNS SAN) is the node name.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} already exists; remove it first or use another --dir (refusing to overwrite a CA)"
    )]
    Exists { path: PathBuf },
    #[error("{0:?} is not a valid node name (letters, digits, - _ ., at most 64)")]
    BadName(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// File names inside a CA directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "collector.pem";
pub const SERVER_KEY: &str = "collector.key";

const VALID_DAYS: i64 = 825;

fn write(path: &Path, contents: &str, secret: bool) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(path, contents).map_err(io)?;
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    // A day of slack for clocks that are a little behind.
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(VALID_DAYS);
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Vigil CA");
    dn.push(DnType::OrganizationName, "Vigil");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params);
    params
}

fn leaf_params(cn: &str, sans: Vec<String>, server: bool) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::new(sans)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "Vigil");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params);
    Ok(params)
}

fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, CaError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| CaError::Io { path, source })
    };
    let key = KeyPair::from_pem(&read(CA_KEY)?)?;
    Ok(Issuer::from_ca_cert_pem(&read(CA_CERT)?, key)?)
}

fn refuse_existing(paths: &[&Path]) -> Result<(), CaError> {
    for p in paths {
        if p.exists() {
            return Err(CaError::Exists {
                path: p.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Creates `DIR/ca.pem`, `ca.key`, `collector.pem`, `collector.key`. `hosts` are the collector's
/// DNS names or IPs that agents connect to (`localhost` and `127.0.0.1` are always included).
/// Returns the files written.
pub fn init(dir: &Path, hosts: &[String]) -> Result<Vec<PathBuf>, CaError> {
    std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let (ca_cert, ca_key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let (srv_cert, srv_key) = (dir.join(SERVER_CERT), dir.join(SERVER_KEY));
    refuse_existing(&[&ca_cert, &ca_key, &srv_cert, &srv_key])?;

    let key = KeyPair::generate()?;
    let params = ca_params();
    let cert = params.self_signed(&key)?;
    write(&ca_key, &key.serialize_pem(), true)?;
    write(&ca_cert, &cert.pem(), false)?;
    let issuer = Issuer::new(params, key);

    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for h in hosts {
        if !sans.contains(h) {
            sans.push(h.clone());
        }
    }
    let skey = KeyPair::generate()?;
    let sparams = leaf_params("vigil-collector", sans, true)?;
    let scert = sparams.signed_by(&skey, &issuer)?;
    write(&srv_key, &skey.serialize_pem(), true)?;
    write(&srv_cert, &scert.pem(), false)?;
    Ok(vec![ca_cert, ca_key, srv_cert, srv_key])
}

/// Creates `DIR/NODE.pem` and `DIR/NODE.key`: a client certificate whose identity is `node`.
pub fn issue(dir: &Path, node: &str) -> Result<Vec<PathBuf>, CaError> {
    if !crate::config::valid_name(node) || node == "ca" || node == "collector" {
        return Err(CaError::BadName(node.to_string()));
    }
    let issuer = load_issuer(dir)?;
    let (cert_path, key_path) = (
        dir.join(format!("{node}.pem")),
        dir.join(format!("{node}.key")),
    );
    refuse_existing(&[&cert_path, &key_path])?;
    let key = KeyPair::generate()?;
    let params = leaf_params(node, vec![node.to_string()], false)?;
    let cert = params.signed_by(&key, &issuer)?;
    write(&key_path, &key.serialize_pem(), true)?;
    write(&cert_path, &cert.pem(), false)?;
    Ok(vec![cert_path, key_path])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_issue_writes_files_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let files = init(dir.path(), &["collector.example".into()]).unwrap();
        assert_eq!(files.len(), 4);
        assert!(matches!(init(dir.path(), &[]), Err(CaError::Exists { .. })));
        let files = issue(dir.path(), "gpu-01").unwrap();
        assert!(files[0].ends_with("gpu-01.pem"));
        let pem = std::fs::read_to_string(&files[0]).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = der.parse_x509().unwrap();
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "gpu-01");
        assert!(matches!(
            issue(dir.path(), "gpu-01"),
            Err(CaError::Exists { .. })
        ));
        assert!(matches!(
            issue(dir.path(), "bad name"),
            Err(CaError::BadName(_))
        ));
    }

    #[test]
    fn issue_without_ca_names_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = issue(dir.path(), "n1").unwrap_err().to_string();
        assert!(err.contains("ca.key"), "{err}");
    }
}
