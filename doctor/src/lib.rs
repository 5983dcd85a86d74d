//! What `vigil-agent doctor` and `vigil-collector doctor` share: the finding line
//! `OK|WARN|ERROR <what>: <detail> — <how to fix>`, the report, a certificate's validity and
//! names, whether a chain is signed by a CA, and the warning for secret files that others can
//! read. Each doctor keeps its own checks and wording of fixes; this crate keeps them alike.

#![forbid(unsafe_code)]

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, RootCertStore};

/// Limit for each network probe (TCP connect, TLS handshake, database, SSH, Docker, NVML).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// A certificate expiring sooner than this is a warning.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    /// What was checked (`client certificate /etc/vigil/gpu-01.pem`, `database host:5432/vigil`).
    pub what: String,
    /// What was found.
    pub detail: String,
    /// How to fix it (empty for OK).
    pub fix: String,
}

impl Finding {
    pub fn new(
        level: Level,
        what: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            level,
            what: what.into(),
            detail: detail.into(),
            fix: fix.into(),
        }
    }

    pub fn ok(what: impl Into<String>, detail: impl Into<String>) -> Finding {
        Finding::new(Level::Ok, what, detail, "")
    }

    pub fn warn(
        what: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding::new(Level::Warn, what, detail, fix)
    }

    pub fn error(
        what: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding::new(Level::Error, what, detail, fix)
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.level.as_str(), self.what, self.detail)?;
        if !self.fix.is_empty() {
            write!(f, " — {}", self.fix)?;
        }
        Ok(())
    }
}

/// Every finding, in the order the checks ran; printed one line each.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    /// Whether any finding is an ERROR (the exit status is then non-zero).
    pub fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.level == Level::Error)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for finding in &self.findings {
            writeln!(f, "{finding}")?;
        }
        Ok(())
    }
}

/// Seconds since the Unix epoch (negative before it).
pub fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Validity of one certificate: ERROR when expired or not yet valid, WARN when it expires within
/// [`EXPIRY_WARNING`], else OK with the date. `renew` is the fix for an expired or unreadable one.
pub fn validity(what: &str, der: &CertificateDer<'_>, now: SystemTime, renew: &str) -> Finding {
    let cert = match x509_parser::parse_x509_certificate(der.as_ref()) {
        Ok((_, c)) => c,
        Err(e) => {
            return Finding::error(what, format!("not a valid X.509 certificate: {e}"), renew);
        }
    };
    let now = unix_secs(now);
    let v = cert.validity();
    let (nb, na) = (v.not_before.timestamp(), v.not_after.timestamp());
    let date = |t: &x509_parser::time::ASN1Time| t.to_datetime().date().to_string();
    if now < nb {
        return Finding::error(
            what,
            format!("not valid before {}", date(&v.not_before)),
            "check this machine's clock (timedatectl), or wait until then",
        );
    }
    if now > na {
        return Finding::error(what, format!("expired on {}", date(&v.not_after)), renew);
    }
    let left_days = (na - now) / 86_400;
    if na - now < i64::try_from(EXPIRY_WARNING.as_secs()).unwrap_or(i64::MAX) {
        return Finding::warn(
            what,
            format!("expires on {} (in {left_days} days)", date(&v.not_after)),
            renew,
        );
    }
    Finding::ok(
        what,
        format!("valid until {} ({left_days} days)", date(&v.not_after)),
    )
}

/// Now, clamped into the certificate's validity, so that checking who signed it is not masked
/// by its expiry (reported separately; webpki does not check the CA's own dates).
pub fn within_validity(leaf: &CertificateDer<'_>, now: SystemTime) -> UnixTime {
    let now = unix_secs(now);
    let t = match x509_parser::parse_x509_certificate(leaf.as_ref()) {
        Ok((_, c)) => {
            let (nb, na) = (
                c.validity().not_before.timestamp(),
                c.validity().not_after.timestamp(),
            );
            if nb <= na { now.clamp(nb, na) } else { now }
        }
        Err(_) => now,
    };
    UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(t).unwrap_or(0)))
}

/// The subject's common name.
pub fn common_name(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_string())
}

/// DNS names and IP addresses in a certificate's subjectAltName.
pub fn subject_alt_names(der: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_string()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::IpAddr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::IpAddr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// What a certificate is for: an agent's (client) or the collector's (server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Client,
    Server,
}

/// Whether a chain is signed by a CA.
#[derive(Debug)]
pub enum Signed {
    Yes,
    /// Another CA signed it (unknown issuer or bad signature).
    NotByCa,
    /// The CA file's certificates cannot serve as a trust anchor.
    BadCa(String),
    /// The leaf cannot be parsed.
    BadCert(String),
    /// Signed, but refused for another reason (key usage, constraints, …): rustls's words.
    Refused(String),
}

/// Checks `chain` (leaf first) against the certificates of `ca` as trust anchors, at `now`
/// clamped into the leaf's validity (see [`within_validity`]). Returns the roots too, for a
/// caller that goes on to a handshake.
pub fn signed_by(
    chain: &[CertificateDer<'static>],
    ca: &[CertificateDer<'static>],
    purpose: Purpose,
    now: SystemTime,
) -> (Signed, Option<RootCertStore>) {
    let Some(leaf) = chain.first() else {
        return (Signed::BadCert("no certificate".into()), None);
    };
    let mut roots = RootCertStore::empty();
    for c in ca {
        if let Err(e) = roots.add(c.clone()) {
            return (Signed::BadCa(e.to_string()), None);
        }
    }
    let when = within_validity(leaf, now);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let result = match purpose {
        Purpose::Client => {
            let verifier = match WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots.clone()),
                provider,
            )
            .build()
            {
                Ok(v) => v,
                Err(e) => return (Signed::BadCa(e.to_string()), None),
            };
            verifier
                .verify_client_cert(leaf, &chain[1..], when)
                .map(|_| ())
        }
        Purpose::Server => {
            let parsed = match ParsedCertificate::try_from(leaf) {
                Ok(p) => p,
                Err(e) => return (Signed::BadCert(e.to_string()), Some(roots)),
            };
            verify_server_cert_signed_by_trust_anchor(
                &parsed,
                &roots,
                &chain[1..],
                when,
                provider.signature_verification_algorithms.all,
            )
        }
    };
    let signed = match result {
        Ok(()) => Signed::Yes,
        Err(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        )) => Signed::NotByCa,
        Err(e) => Signed::Refused(e.to_string()),
    };
    (signed, Some(roots))
}

/// The permission bits of a file that its group or others may read or write; `None` when only
/// its owner may (or it cannot be read: other checks say why).
pub fn open_to_others(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

/// A WARN for each secret file (a private key, a password or token file) that its group or
/// others may read or write: `what` names the kind (`private key`, `SSH key of node db-1`), the
/// finding names the file, its mode and the `chmod 600` fix. Files that are fine, missing or
/// unreadable add nothing.
pub fn secret_files<'a>(files: impl IntoIterator<Item = (&'a str, &'a Path)>) -> Vec<Finding> {
    files
        .into_iter()
        .filter_map(|(what, path)| {
            let mode = open_to_others(path)?;
            Some(Finding::warn(
                format!("{what} {}", path.display()),
                format!("readable by group or others (mode {mode:04o})"),
                format!("chmod 600 {}", path.display()),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use vigil_testkit::pki::Pki;

    #[test]
    fn finding_line_format() {
        let f = Finding::warn("NVIDIA driver", "no NVIDIA driver found", "install it");
        assert_eq!(
            f.to_string(),
            "WARN NVIDIA driver: no NVIDIA driver found — install it"
        );
        let f = Finding::ok("config c.yaml", "every file loads");
        assert_eq!(f.to_string(), "OK config c.yaml: every file loads");
        let report = Report {
            findings: vec![
                f.clone(),
                Finding::error("database x:1/db", "down", "start it"),
            ],
        };
        assert!(report.has_errors());
        assert_eq!(
            report.to_string(),
            "OK config c.yaml: every file loads\nERROR database x:1/db: down — start it\n"
        );
        assert!(!Report { findings: vec![f] }.has_errors());
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn secret_files_readable_by_others_are_warnings_naming_file_mode_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("node.key");
        let token = dir.path().join("routing key");
        std::fs::write(&key, "secret").unwrap();
        std::fs::write(&token, "secret").unwrap();
        chmod(&key, 0o644);
        chmod(&token, 0o600);
        let missing = dir.path().join("missing.key");
        let found = secret_files([
            ("private key", key.as_path()),
            ("PagerDuty routing key", token.as_path()),
            ("SSH key of node n1", missing.as_path()),
        ]);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(
            found[0].to_string(),
            format!(
                "WARN private key {0}: readable by group or others (mode 0644) — chmod 600 {0}",
                key.display()
            )
        );
        chmod(&key, 0o600);
        assert!(secret_files([("private key", key.as_path())]).is_empty());
        // Group-writable or world-readable alone is enough; owner-only bits never are.
        for mode in [0o620, 0o604, 0o640, 0o660, 0o777] {
            chmod(&key, mode);
            assert_eq!(open_to_others(&key), Some(mode), "{mode:o}");
        }
        for mode in [0o400, 0o600, 0o700] {
            chmod(&key, mode);
            assert_eq!(open_to_others(&key), None, "{mode:o}");
        }
    }

    #[test]
    fn validity_ok_warn_expired_and_not_yet_valid() {
        let pki = Pki::new("node-a");
        let der = pki.client_der();
        let now = SystemTime::now();
        let f = validity("client certificate c.pem", &der, now, "renew it");
        assert_eq!(f.level, Level::Ok, "{f}");
        assert!(f.detail.starts_with("valid until"), "{f}");
        let days = |n: u64| Duration::from_secs(n * 86_400);
        let f = validity("c", &der, now + days(pki::VALID_DAYS - 10), "renew it");
        assert_eq!(f.level, Level::Warn, "{f}");
        assert!(f.detail.starts_with("expires on"), "{f}");
        assert_eq!(f.fix, "renew it");
        let f = validity("c", &der, now + days(pki::VALID_DAYS + 1), "renew it");
        assert_eq!(f.level, Level::Error, "{f}");
        assert!(f.detail.starts_with("expired on"), "{f}");
        let f = validity("c", &der, now - days(2), "renew it");
        assert_eq!(f.level, Level::Error, "{f}");
        assert!(f.detail.starts_with("not valid before"), "{f}");
        let f = validity("c", &CertificateDer::from(vec![0u8, 1, 2]), now, "renew it");
        assert_eq!(f.level, Level::Error, "{f}");
        assert!(f.detail.starts_with("not a valid X.509"), "{f}");
    }

    use vigil_testkit::pki;

    #[test]
    fn chains_signed_by_their_ca_and_not_by_another() {
        let pki = Pki::new("node-a");
        let other = Pki::new("node-a");
        let now = SystemTime::now();
        let (s, roots) = signed_by(&[pki.client_der()], &[pki.ca_der()], Purpose::Client, now);
        assert!(matches!(s, Signed::Yes), "{s:?}");
        assert!(roots.is_some());
        let (s, _) = signed_by(&[pki.server_der()], &[pki.ca_der()], Purpose::Server, now);
        assert!(matches!(s, Signed::Yes), "{s:?}");
        let (s, _) = signed_by(&[pki.client_der()], &[other.ca_der()], Purpose::Client, now);
        assert!(matches!(s, Signed::NotByCa), "{s:?}");
        let (s, _) = signed_by(&[pki.server_der()], &[other.ca_der()], Purpose::Server, now);
        assert!(matches!(s, Signed::NotByCa), "{s:?}");
        // Expired long ago: who signed it is still judged.
        let later = now + Duration::from_secs(10 * 365 * 86_400);
        let (s, _) = signed_by(&[pki.client_der()], &[pki.ca_der()], Purpose::Client, later);
        assert!(matches!(s, Signed::Yes), "{s:?}");
        assert_eq!(common_name(&pki.client_der()).as_deref(), Some("node-a"));
        assert_eq!(
            subject_alt_names(&pki.server_der()),
            vec!["localhost".to_string(), "127.0.0.1".to_string()]
        );
        let garbage = CertificateDer::from(vec![0u8; 8]);
        let (s, _) = signed_by(&[garbage], &[pki.ca_der()], Purpose::Server, now);
        assert!(matches!(s, Signed::BadCert(_)), "{s:?}");
        let (s, _) = signed_by(&[], &[pki.ca_der()], Purpose::Server, now);
        assert!(matches!(s, Signed::BadCert(_)), "{s:?}");
    }
}
