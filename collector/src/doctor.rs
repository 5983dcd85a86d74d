//! `vigil-collector doctor`: a pre-flight check of the collector's config, certificates, database
//! and agentless nodes. Each finding is one line `OK|WARN|ERROR <what>: <detail> — <how to fix>`;
//! doctor only reads (it never migrates the database or writes a file).

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, RootCertStore};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use crate::config::{CollectorFile, Config, DATABASE_URL_ENV, NodeConfig, TlsFiles};
use crate::ssh::{SshError, SshPool};

/// The same embedded migrations as the store's: the newest version a migrated database holds.
mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Limit for each network probe (database, SSH).
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
    /// What was checked (`certificate /etc/vigil/collector.pem`, `database host:5432/vigil`).
    pub what: String,
    /// What was found.
    pub detail: String,
    /// How to fix it (empty for OK).
    pub fix: String,
}

impl Finding {
    fn ok(what: impl Into<String>, detail: impl Into<String>) -> Finding {
        Finding {
            level: Level::Ok,
            what: what.into(),
            detail: detail.into(),
            fix: String::new(),
        }
    }

    fn warn(what: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            level: Level::Warn,
            what: what.into(),
            detail: detail.into(),
            fix: fix.into(),
        }
    }

    fn error(
        what: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            level: Level::Error,
            what: what.into(),
            detail: detail.into(),
            fix: fix.into(),
        }
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

/// Every finding, in the order the checks ran.
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

/// What the checks after the config need; from the full config, or from collector.yaml alone
/// when a service file is broken (so that certificates and database are still checked).
struct Targets {
    tls: TlsFiles,
    grpc_listen: SocketAddr,
    database_url: Option<String>,
    nodes: Vec<NodeConfig>,
}

/// Runs every check against `config` (collector.yaml). `hosts` are extra names agents use to
/// reach the collector; the server certificate must cover them.
pub async fn run(config: &Path, hosts: &[String]) -> Report {
    let mut report = Report::default();
    let targets = check_config(config, &mut report.findings);
    let Some(targets) = targets else {
        return report;
    };
    report
        .findings
        .extend(check_tls(&targets.tls, targets.grpc_listen, hosts, now()));
    match &targets.database_url {
        Some(url) => report.findings.extend(check_database(url).await),
        None => report.findings.push(Finding::error(
            "database",
            "no database.url",
            format!("set database.url in collector.yaml or {DATABASE_URL_ENV}"),
        )),
    }
    report
        .findings
        .extend(check_ssh_nodes(&targets.nodes).await);
    report
}

fn check_config(path: &Path, findings: &mut Vec<Finding>) -> Option<Targets> {
    let what = format!("config {}", path.display());
    match Config::load(path) {
        Ok(cfg) => {
            findings.push(Finding::ok(
                what,
                format!(
                    "every file loads ({} nodes, {} services)",
                    cfg.nodes.len(),
                    cfg.services.len()
                ),
            ));
            Some(Targets {
                tls: cfg.tls,
                grpc_listen: cfg.grpc_listen,
                database_url: Some(cfg.database_url),
                nodes: cfg.nodes,
            })
        }
        Err(e) => {
            findings.push(Finding::error(
                what,
                e.to_string(),
                "correct the file and key named (config/services_template.yaml and \
                 config/collector.yaml document every field); `vigil-collector check-config` \
                 re-checks",
            ));
            // collector.yaml alone may still be readable: check what it points at.
            let text = std::fs::read_to_string(path).ok()?;
            let file: CollectorFile = crate::config::parse_yaml(path, &text).ok()?;
            let base = path.parent().unwrap_or(Path::new("."));
            let resolve = |p: &Path| {
                if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    base.join(p)
                }
            };
            Some(Targets {
                tls: TlsFiles {
                    ca: resolve(&file.tls.ca),
                    cert: resolve(&file.tls.cert),
                    key: resolve(&file.tls.key),
                },
                grpc_listen: file.grpc_listen,
                database_url: std::env::var(DATABASE_URL_ENV)
                    .ok()
                    .filter(|s| !s.is_empty())
                    .or(file.database.url),
                nodes: Vec::new(),
            })
        }
    }
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

const RENEW_CA: &str = "make a new CA with `vigil-collector ca init --dir DIR --host NAME` (it \
    refuses to overwrite: move the old files aside) and issue every agent a new certificate \
    with `vigil-collector ca issue --node NAME --dir DIR`";
const RENEW_SERVER: &str = "issue a new server certificate from the same CA (`vigil-collector ca \
    init` creates a new CA and server certificate together: move the old files aside, then \
    re-issue the agents' certificates with `ca issue`)";

/// Validity of one certificate: ERROR when expired or not yet valid, WARN when it expires within
/// [`EXPIRY_WARNING`], else OK with the date.
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
fn within_validity(leaf: &CertificateDer<'_>, now: SystemTime) -> UnixTime {
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

/// DNS names and IP addresses in a certificate's subjectAltName.
fn subject_alt_names(der: &CertificateDer<'_>) -> Vec<String> {
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

fn check_tls(
    tls: &TlsFiles,
    listen: SocketAddr,
    hosts: &[String],
    now: SystemTime,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let ca_what = format!("CA certificate {}", tls.ca.display());
    let cert_what = format!("server certificate {}", tls.cert.display());

    let ca = match crate::tls::load_certs(&tls.ca) {
        Ok(c) => Some(c),
        Err(e) => {
            out.push(Finding::error(
                &ca_what,
                e.to_string(),
                "tls.ca must be the PEM CA certificate written by `vigil-collector ca init` \
                 (ca.pem)",
            ));
            None
        }
    };
    if let Some(ca) = &ca {
        out.push(validity(&ca_what, &ca[0], now, RENEW_CA));
    }
    let cert = match crate::tls::load_certs(&tls.cert) {
        Ok(c) => Some(c),
        Err(e) => {
            out.push(Finding::error(
                &cert_what,
                e.to_string(),
                "tls.cert must be the PEM server certificate written by `vigil-collector ca \
                 init` (collector.pem)",
            ));
            None
        }
    };
    let Some(cert) = cert else {
        return out;
    };
    out.push(validity(&cert_what, &cert[0], now, RENEW_SERVER));

    if let Some(ca) = &ca {
        out.push(signed_by_ca(&cert_what, &cert, ca, &tls.ca, now));
        match crate::tls::server_config(&tls.ca, &tls.cert, &tls.key) {
            Ok(_) => out.push(Finding::ok(
                format!("server key {}", tls.key.display()),
                "matches the server certificate",
            )),
            Err(e) => out.push(Finding::error(
                format!("server key {}", tls.key.display()),
                e.to_string(),
                "tls.key must be the private key of tls.cert (collector.key, written next to \
                 collector.pem by `vigil-collector ca init`)",
            )),
        }
    }
    if let Some(f) = key_mode(&tls.key) {
        out.push(f);
    }
    out.extend(host_names(&cert_what, &cert[0], listen, hosts));
    out
}

/// WARN when the private key is readable by group or others.
fn key_mode(path: &Path) -> Option<Finding> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        Finding::warn(
            format!("server key {}", path.display()),
            format!("readable by group or others (mode {mode:04o})"),
            format!("chmod 600 {}", path.display()),
        )
    })
}

fn signed_by_ca(
    what: &str,
    chain: &[CertificateDer<'static>],
    ca: &[CertificateDer<'static>],
    ca_path: &Path,
    now: SystemTime,
) -> Finding {
    let fix_ca = "tls.cert and tls.ca must come from the same `vigil-collector ca init` (agents \
                  trust tls.ca): point tls.ca at the CA that issued the certificate, or re-create \
                  both";
    let mut roots = RootCertStore::empty();
    for c in ca {
        if let Err(e) = roots.add(c.clone()) {
            return Finding::error(
                what,
                format!("{} is not a usable CA certificate: {e}", ca_path.display()),
                fix_ca,
            );
        }
    }
    let parsed = match ParsedCertificate::try_from(&chain[0]) {
        Ok(p) => p,
        Err(e) => return Finding::error(what, format!("cannot be parsed: {e}"), RENEW_SERVER),
    };
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let result = verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        &chain[1..],
        within_validity(&chain[0], now),
        provider.signature_verification_algorithms.all,
    );
    match result {
        Ok(()) => Finding::ok(what, format!("signed by the CA in {}", ca_path.display())),
        Err(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        )) => Finding::error(
            what,
            format!("not signed by the CA in {}", ca_path.display()),
            fix_ca,
        ),
        Err(e) => Finding::error(
            what,
            format!("not accepted under the CA in {}: {e}", ca_path.display()),
            RENEW_SERVER,
        ),
    }
}

/// The server certificate must cover every name agents use: the listen address when it is a
/// specific one, and each `--host`.
fn host_names(
    what: &str,
    cert: &CertificateDer<'_>,
    listen: SocketAddr,
    hosts: &[String],
) -> Vec<Finding> {
    let covered = subject_alt_names(cert).join(", ");
    let mut names: Vec<String> = Vec::new();
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    for h in hosts {
        if !names.contains(h) {
            names.push(h.clone());
        }
    }
    if names.is_empty() {
        return vec![Finding::ok(
            what,
            format!(
                "covers {covered} (grpc_listen is {}: pass --host NAME to check the name agents \
                 connect to)",
                listen.ip()
            ),
        )];
    }
    let Ok(parsed) = ParsedCertificate::try_from(cert) else {
        return Vec::new(); // reported by the signature check
    };
    names
        .into_iter()
        .map(|name| {
            let ok = ServerName::try_from(name.as_str())
                .map_err(|e| e.to_string())
                .and_then(|sn| verify_server_name(&parsed, &sn).map_err(|e| e.to_string()));
            match ok {
                Ok(()) => Finding::ok(what, format!("covers {name}")),
                Err(_) => Finding::error(
                    what,
                    format!("does not cover {name} (it covers {covered})"),
                    format!(
                        "agents connecting to {name} will refuse the collector: re-create the \
                         server certificate with `vigil-collector ca init --host {name}`, or \
                         have agents use a covered name (collector.server_name in agent.yaml)"
                    ),
                ),
            }
        })
        .collect()
}

/// An error and its sources, each once.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}

/// Reachable within [`PROBE_TIMEOUT`], and migrated to the newest embedded version (read from
/// refinery's schema history; doctor never migrates).
async fn check_database(url: &str) -> Vec<Finding> {
    let mut pg: tokio_postgres::Config = match url.parse() {
        Ok(c) => c,
        Err(e) => {
            return vec![Finding::error(
                "database",
                format!("database.url is not a PostgreSQL URL: {e}"),
                "write it as postgres://USER@HOST:PORT/DB (or set VIGIL_DATABASE_URL)",
            )];
        }
    };
    pg.connect_timeout(PROBE_TIMEOUT);
    pg.application_name("vigil-collector doctor");
    let target = crate::store::describe(&pg);
    let what = format!("database {target}");
    let unreachable_fix = format!(
        "start PostgreSQL on {target}, or correct database.url (or {DATABASE_URL_ENV}); check \
         the firewall and pg_hba.conf"
    );
    let (mut client, conn) = match tokio::time::timeout(PROBE_TIMEOUT, pg.connect(NoTls)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return vec![Finding::error(
                what,
                format!("cannot connect: {}", chain(&e)),
                unreachable_fix,
            )];
        }
        Err(_) => {
            return vec![Finding::error(
                what,
                format!(
                    "no answer within {}",
                    humantime::format_duration(PROBE_TIMEOUT)
                ),
                unreachable_fix,
            )];
        }
    };
    let conn_task = tokio::spawn(conn);
    let runner = embedded::migrations::runner();
    let newest = runner
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or(0);
    let migrate_fix = "`vigil-collector serve` migrates the database when it starts: start it \
                       once (doctor never changes the database)";
    let last = tokio::time::timeout(
        PROBE_TIMEOUT,
        runner.get_last_applied_migration_async(&mut client),
    )
    .await;
    let finding = match last {
        Err(_) => Finding::error(
            &what,
            format!(
                "no answer to a query within {}",
                humantime::format_duration(PROBE_TIMEOUT)
            ),
            unreachable_fix,
        ),
        Ok(Err(e)) if undefined_table(&e) => Finding::error(
            &what,
            format!(
                "reachable but not migrated (no refinery_schema_history table; this collector needs version {newest})"
            ),
            migrate_fix,
        ),
        Ok(Err(e)) => Finding::error(
            &what,
            format!("cannot read the schema version: {}", chain(&e)),
            "check that the database user may read refinery_schema_history",
        ),
        Ok(Ok(None)) => Finding::error(
            &what,
            format!(
                "reachable but not migrated (no migration applied; this collector needs version {newest})"
            ),
            migrate_fix,
        ),
        Ok(Ok(Some(m))) if m.version() < newest => Finding::error(
            &what,
            format!(
                "migrated to version {} only; this collector needs version {newest}",
                m.version()
            ),
            migrate_fix,
        ),
        Ok(Ok(Some(m))) if m.version() > newest => Finding::warn(
            &what,
            format!(
                "schema version {} is newer than this collector's {newest}",
                m.version()
            ),
            "a newer collector migrated it: upgrade this binary",
        ),
        Ok(Ok(Some(m))) => Finding::ok(
            &what,
            format!("reachable, migrated (version {})", m.version()),
        ),
    };
    drop(client);
    conn_task.abort();
    vec![finding]
}

fn undefined_table(e: &refinery::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(pg) = s.downcast_ref::<tokio_postgres::Error>() {
            return pg.code() == Some(&SqlState::UNDEFINED_TABLE);
        }
        source = s.source();
    }
    false
}

/// Every node without an agent or with an `ssh:` block: log in and run `true`.
async fn check_ssh_nodes(nodes: &[NodeConfig]) -> Vec<Finding> {
    let pool = SshPool::new();
    let probes = nodes
        .iter()
        .filter(|n| !n.agent || n.ssh.is_some())
        .map(|n| check_ssh(&pool, n));
    futures::future::join_all(probes).await
}

async fn check_ssh(pool: &SshPool, node: &NodeConfig) -> Finding {
    let Some(ssh) = &node.ssh else {
        return Finding::error(
            format!("node {}", node.name),
            "agent: false but no ssh: block",
            "add an ssh: block (user, key, host_key_fingerprint) under the node in collector.yaml",
        );
    };
    let host = node.address.as_str();
    let what = format!("ssh node {} ({}@{host}:{})", node.name, ssh.user, ssh.port);
    if host.is_empty() {
        return Finding::error(
            format!("ssh node {}", node.name),
            "no address",
            "set address: to the host name or IP the collector reaches the node at",
        );
    }
    let mut cfg = ssh.clone();
    cfg.connect_timeout = cfg.connect_timeout.min(PROBE_TIMEOUT);
    let argv = ["true".to_string()];
    match pool.run(host, &cfg, &argv, Some(PROBE_TIMEOUT)).await {
        Ok(out) if out.exit_code == Some(0) => Finding::ok(what, "logged in and ran `true`"),
        Ok(out) => Finding::error(
            what,
            format!(
                "logged in, but `true` {}",
                if out.timed_out {
                    "timed out".to_string()
                } else if let Some(sig) = out.exit_signal {
                    format!("was killed by {sig}")
                } else {
                    format!(
                        "exited with {}",
                        out.exit_code
                            .map(|c| c.to_string())
                            .unwrap_or_else(|| "no status".into())
                    )
                }
            ),
            "check the account's shell and that it may run commands (no forced command in \
             authorized_keys)",
        ),
        Err(e @ SshError::HostKey { .. }) => Finding::error(
            what,
            format!("host key refused: {e}"),
            format!(
                "if the node was reinstalled, verify its new key out of band and pin it: \
                 `ssh-keyscan -p {} {host} | ssh-keygen -lf -` gives host_key_fingerprint (or \
                 update known_hosts)",
                ssh.port
            ),
        ),
        Err(e @ SshError::Auth { .. }) => Finding::error(
            what,
            format!("authentication refused: {e}"),
            format!(
                "add the collector's public key to ~{}/.ssh/authorized_keys on the node, or fix \
                 ssh.password_env / ssh.password_file",
                ssh.user
            ),
        ),
        Err(e @ (SshError::Connect { .. } | SshError::ConnectTimeout { .. })) => Finding::error(
            what,
            format!("unreachable: {e}"),
            "check that sshd runs on the node, the address and port, and the firewall \
                 between collector and node",
        ),
        Err(e @ (SshError::KeyFile { .. } | SshError::Secret { .. })) => Finding::error(
            what,
            format!("credentials: {e}"),
            "ssh.key must be a readable OpenSSH private key on the collector (its passphrase \
             in key_passphrase_env); a password comes from password_env or password_file",
        ),
        Err(e) => Finding::error(
            what,
            e.to_string(),
            "check the node's sshd log (journalctl -u ssh)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finding_line_format() {
        let f = Finding::error("database x:1/db", "cannot connect", "start it");
        assert_eq!(
            f.to_string(),
            "ERROR database x:1/db: cannot connect — start it"
        );
        let f = Finding::ok("config c.yaml", "every file loads");
        assert_eq!(f.to_string(), "OK config c.yaml: every file loads");
    }

    #[test]
    fn certificates_of_a_fresh_ca_are_ok_and_cover_localhost() {
        let dir = tempfile::tempdir().unwrap();
        crate::ca::init(dir.path(), &["collector.example".into()]).unwrap();
        let tls = TlsFiles {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("collector.pem"),
            key: dir.path().join("collector.key"),
        };
        let listen: SocketAddr = "127.0.0.1:7443".parse().unwrap();
        let found = check_tls(&tls, listen, &["collector.example".into()], now());
        assert!(found.iter().all(|f| f.level == Level::Ok), "{found:#?}");
        let found = check_tls(&tls, listen, &["other.example".into()], now());
        assert!(
            found
                .iter()
                .any(|f| f.level == Level::Error
                    && f.detail.contains("does not cover other.example")),
            "{found:#?}"
        );
        // Far in the future: expired.
        let later = now() + Duration::from_secs(3000 * 86_400);
        let found = check_tls(&tls, listen, &[], later);
        assert!(
            found
                .iter()
                .any(|f| f.level == Level::Error && f.detail.starts_with("expired on")),
            "{found:#?}"
        );
        // Within 30 days of the end: a warning.
        let soon = now() + Duration::from_secs(810 * 86_400);
        let found = check_tls(&tls, listen, &[], soon);
        assert!(
            found
                .iter()
                .any(|f| f.level == Level::Warn && f.detail.starts_with("expires on")),
            "{found:#?}"
        );
    }
}
