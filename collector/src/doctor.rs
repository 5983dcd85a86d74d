//! `vigil-collector doctor`: a pre-flight check of the collector's config, certificates, database
//! and agentless nodes. Each finding is one line `OK|WARN|ERROR <what>: <detail> — <how to fix>`;
//! doctor only reads (it never migrates the database or writes a file).

use std::net::SocketAddr;
use std::path::Path;
use std::time::SystemTime;

use rustls::client::verify_server_name;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::ParsedCertificate;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
pub use vigil_doctor::{Finding, Level, PROBE_TIMEOUT, Report};
use vigil_doctor::{Purpose, Signed, secret_files, signed_by, subject_alt_names, validity};
use vigil_error::{causes, describe};

use crate::config::{CollectorFile, Config, DATABASE_URL_ENV, NodeConfig, TlsFiles};
use crate::ssh::{SshError, SshPool};

/// The same embedded migrations as the store's: the newest version a migrated database holds.
mod embedded {
    refinery::embed_migrations!("migrations");
}

/// What the checks after the config need; from the full config, or from collector.yaml alone
/// when a service file is broken (so that certificates and database are still checked).
struct Targets {
    tls: TlsFiles,
    grpc_listen: SocketAddr,
    database_url: Option<String>,
    nodes: Vec<NodeConfig>,
    /// Files secrets are read from (config key, path).
    secret_files: Vec<(String, std::path::PathBuf)>,
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
    report.findings.extend(secret_files(
        targets
            .secret_files
            .iter()
            .map(|(key, p)| (key.as_str(), p.as_path())),
    ));
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
                secret_files: cfg.secret_files,
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
                secret_files: file
                    .notify
                    .secret_files()
                    .into_iter()
                    .map(|(k, p)| (k, resolve(&p)))
                    .collect(),
            })
        }
    }
}

fn now() -> SystemTime {
    SystemTime::now()
}

const RENEW_CA: &str = "make a new CA with `vigil-collector ca init --dir DIR --host NAME` (it \
    refuses to overwrite: move the old files aside) and issue every agent a new certificate \
    with `vigil-collector ca issue --node NAME --dir DIR`";
const RENEW_SERVER: &str = "issue a new server certificate from the same CA (`vigil-collector ca \
    init` creates a new CA and server certificate together: move the old files aside, then \
    re-issue the agents' certificates with `ca issue`)";

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
    // The CA's key is not in collector.yaml: `ca init` writes it next to ca.pem.
    let ca_key = tls
        .ca
        .parent()
        .unwrap_or(Path::new("."))
        .join(crate::ca::CA_KEY);
    out.extend(secret_files([
        ("server key", tls.key.as_path()),
        ("CA key", ca_key.as_path()),
    ]));
    out.extend(host_names(&cert_what, &cert[0], listen, hosts));
    out
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
    match signed_by(chain, ca, Purpose::Server, now).0 {
        Signed::Yes => Finding::ok(what, format!("signed by the CA in {}", ca_path.display())),
        Signed::NotByCa => Finding::error(
            what,
            format!("not signed by the CA in {}", ca_path.display()),
            fix_ca,
        ),
        Signed::BadCa(e) => Finding::error(
            what,
            format!("{} is not a usable CA certificate: {e}", ca_path.display()),
            fix_ca,
        ),
        Signed::BadCert(e) => Finding::error(what, format!("cannot be parsed: {e}"), RENEW_SERVER),
        Signed::Refused(e) => Finding::error(
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
                format!("cannot connect: {}", describe(&e)),
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
            format!("cannot read the schema version: {}", describe(&e)),
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
    causes(e)
        .find_map(|s| s.downcast_ref::<tokio_postgres::Error>())
        .is_some_and(|pg| pg.code() == Some(&SqlState::UNDEFINED_TABLE))
}

/// Every node without an agent or with an `ssh:` block: log in and run `true`; then a warning for
/// each SSH key or password file that others can read.
async fn check_ssh_nodes(nodes: &[NodeConfig]) -> Vec<Finding> {
    let pool = SshPool::new();
    let probes = nodes
        .iter()
        .filter(|n| !n.agent || n.ssh.is_some())
        .map(|n| check_ssh(&pool, n));
    let mut out = futures::future::join_all(probes).await;
    out.extend(ssh_secret_files(nodes));
    out
}

/// A WARN for each SSH key or password file of `nodes` that others can read.
fn ssh_secret_files(nodes: &[NodeConfig]) -> Vec<Finding> {
    let files: Vec<(String, &Path)> = nodes
        .iter()
        .filter_map(|n| Some((n, n.ssh.as_ref()?)))
        .flat_map(|(n, ssh)| {
            let key = ssh
                .key
                .as_deref()
                .map(|k| (format!("SSH key of node {}", n.name), k));
            let password = ssh
                .password_file
                .as_deref()
                .map(|f| (format!("SSH password file of node {}", n.name), f));
            key.into_iter().chain(password)
        })
        .collect();
    secret_files(files.iter().map(|(what, path)| (what.as_str(), *path)))
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
    use std::time::Duration;

    fn chmod(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn warnings(found: &[Finding]) -> Vec<String> {
        found
            .iter()
            .filter(|f| f.level == Level::Warn)
            .map(|f| f.to_string())
            .collect()
    }

    #[test]
    fn server_and_ca_keys_readable_by_others_are_warnings() {
        let dir = tempfile::tempdir().unwrap();
        crate::ca::init(dir.path(), &[]).unwrap();
        let tls = TlsFiles {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("collector.pem"),
            key: dir.path().join("collector.key"),
        };
        let listen: SocketAddr = "127.0.0.1:7443".parse().unwrap();
        let found = check_tls(&tls, listen, &[], now());
        assert!(warnings(&found).is_empty(), "{found:#?}");
        let ca_key = dir.path().join("ca.key");
        chmod(&tls.key, 0o644);
        chmod(&ca_key, 0o640);
        let found = check_tls(&tls, listen, &[], now());
        assert_eq!(
            warnings(&found),
            vec![
                format!(
                    "WARN server key {0}: readable by group or others (mode 0644) — chmod 600 {0}",
                    tls.key.display()
                ),
                format!(
                    "WARN CA key {0}: readable by group or others (mode 0640) — chmod 600 {0}",
                    ca_key.display()
                ),
            ]
        );
        chmod(&tls.key, 0o600);
        chmod(&ca_key, 0o600);
        assert!(warnings(&check_tls(&tls, listen, &[], now())).is_empty());
    }

    #[test]
    fn ssh_keys_and_password_files_readable_by_others_are_warnings() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id_ed25519");
        let password = dir.path().join("password");
        std::fs::write(&key, "key").unwrap();
        std::fs::write(&password, "secret").unwrap();
        let node = |name: &str, ssh: serde_json::Value| -> NodeConfig {
            serde_json::from_value(serde_json::json!({"name": name, "ssh": ssh})).unwrap()
        };
        let nodes = vec![
            node("db-1", serde_json::json!({"user": "vigil", "key": key})),
            node(
                "db-2",
                serde_json::json!({"user": "vigil", "password_file": password}),
            ),
            serde_json::from_value(serde_json::json!({"name": "web-1"})).unwrap(),
        ];
        chmod(&key, 0o600);
        chmod(&password, 0o600);
        assert!(ssh_secret_files(&nodes).is_empty());
        chmod(&key, 0o644);
        chmod(&password, 0o604);
        let found: Vec<String> = ssh_secret_files(&nodes)
            .iter()
            .map(|f| f.to_string())
            .collect();
        assert_eq!(
            found,
            vec![
                format!(
                    "WARN SSH key of node db-1 {0}: readable by group or others (mode 0644) — \
                     chmod 600 {0}",
                    key.display()
                ),
                format!(
                    "WARN SSH password file of node db-2 {0}: readable by group or others (mode \
                     0604) — chmod 600 {0}",
                    password.display()
                ),
            ]
        );
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
