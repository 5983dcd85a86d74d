//! `vigil-collector doctor` and `vigil-agent doctor` run as the built binaries, one test per kind
//! of finding (good setup, expired certificate, another CA, database, bad config, wrong node,
//! SSH), and `deploy/install-agent.sh --prefix`.

use std::path::{Path, PathBuf};
use std::process::Output;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use vigil_collector::{Collector, Config};
use vigil_tests::{Workspace, binary, init, pg, sshd};

/// Runs a doctor; returns its exit code and its stdout lines.
async fn doctor(bin: &str, args: &[&str]) -> anyhow::Result<(i32, Vec<String>)> {
    let out: Output = tokio::process::Command::new(binary(bin)?)
        .arg("doctor")
        .args(args)
        // The config file's database.url must be the one in force.
        .env_remove(vigil_collector::config::DATABASE_URL_ENV)
        .env_remove("VIGIL_AGENT_CONFIG")
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<String> = stdout.lines().map(str::to_string).collect();
    for l in &lines {
        assert!(
            l.starts_with("OK ") || l.starts_with("WARN ") || l.starts_with("ERROR "),
            "not a finding line: {l:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
    }
    Ok((out.status.code().unwrap_or(-1), lines))
}

async fn collector_doctor(config: &Path, extra: &[&str]) -> anyhow::Result<(i32, Vec<String>)> {
    let path = config.display().to_string();
    let mut args = vec!["--config", path.as_str()];
    args.extend_from_slice(extra);
    doctor("vigil-collector", &args).await
}

async fn agent_doctor(config: &Path) -> anyhow::Result<(i32, Vec<String>)> {
    doctor("vigil-agent", &["--config", &config.display().to_string()]).await
}

/// The line with this level that contains every one of `parts`.
fn find<'a>(lines: &'a [String], level: &str, parts: &[&str]) -> &'a str {
    lines
        .iter()
        .find(|l| l.starts_with(&format!("{level} ")) && parts.iter().all(|p| l.contains(p)))
        .unwrap_or_else(|| panic!("no {level} line with {parts:?} in:\n{}", lines.join("\n")))
}

/// A PostgreSQL URL on a port nobody listens on; returns it and the port.
fn closed_port_url() -> anyhow::Result<(String, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok((format!("postgres://vigil@127.0.0.1:{port}/vigil"), port))
}

/// A certificate signed by the workspace CA that expired in 2021, written to `certs/NAME.pem` and
/// `certs/NAME.key` (replacing them). A server certificate covers localhost and 127.0.0.1.
fn write_expired(ws: &Workspace, name: &str, cn: &str, server: bool) -> anyhow::Result<()> {
    let certs = ws.certs();
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(certs.join("ca.key"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&std::fs::read_to_string(certs.join("ca.pem"))?, ca_key)?;
    let sans = if server {
        vec!["localhost".to_string(), "127.0.0.1".to_string()]
    } else {
        vec![cn.to_string()]
    };
    let mut params = CertificateParams::new(sans)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::write(certs.join(format!("{name}.pem")), cert.pem())?;
    std::fs::write(certs.join(format!("{name}.key")), key.serialize_pem())?;
    set_mode(&certs.join(format!("{name}.key")), 0o600)?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn mode(path: &Path) -> anyhow::Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o7777)
}

/// Copies `certs/FROM.{pem,key}` of `src` to `certs/TO.{pem,key}` of `dst`.
fn copy_pair(src: &Workspace, from: &str, dst: &Workspace, to: &str) -> anyhow::Result<()> {
    for ext in ["pem", "key"] {
        std::fs::copy(
            src.certs().join(format!("{from}.{ext}")),
            dst.certs().join(format!("{to}.{ext}")),
        )?;
    }
    Ok(())
}

/// An agent.yaml with explicit TLS files (relative to the workspace) and its own state dir.
fn write_agent(
    ws: &Workspace,
    name: &str,
    node: &str,
    collector: &str,
    ca: &str,
    cert: &str,
) -> anyhow::Result<PathBuf> {
    let text = format!(
        "node: {node}\n\
         collector:\n  url: https://{collector}\n  server_name: localhost\n  connect_timeout: 5s\n\
         tls: {{ ca: {ca}, cert: certs/{cert}.pem, key: certs/{cert}.key }}\n\
         state_dir: agent-{name}\n"
    );
    let path = ws.path().join(format!("agent-{name}.yaml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The collector's gRPC port for agents that must find nobody there.
fn closed_collector() -> anyhow::Result<String> {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    Ok(addr.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_setup_is_all_ok() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    let path = ws.write_collector(&db.url, &["n1"])?;
    // Starting the collector migrates the database (doctor itself never does).
    let collector = Collector::start(Config::load(&path)?).await?;

    let (code, lines) = collector_doctor(&path, &["--host", "localhost"]).await?;
    assert_eq!(code, 0, "{}", lines.join("\n"));
    assert!(
        lines.iter().all(|l| l.starts_with("OK ")),
        "{}",
        lines.join("\n")
    );
    find(
        &lines,
        "OK",
        &["config", "collector.yaml", "every file loads"],
    );
    find(&lines, "OK", &["collector.pem", "signed by the CA"]);
    find(&lines, "OK", &["collector.pem", "covers localhost"]);
    find(&lines, "OK", &["collector.pem", "covers 127.0.0.1"]);
    find(&lines, "OK", &["database 127.0.0.1:", "migrated (version"]);

    let agent = ws.write_agent("a", "n1", "n1", collector.grpc_addr)?;
    let (code, lines) = agent_doctor(&agent).await?;
    assert_eq!(code, 0, "{}", lines.join("\n"));
    // Not every node runs Docker or has a GPU: those two may only warn.
    for l in &lines {
        assert!(
            l.starts_with("OK ")
                || l.starts_with("WARN NVIDIA driver: no NVIDIA driver found")
                || l.starts_with("WARN Docker "),
            "{}",
            lines.join("\n")
        );
    }
    find(&lines, "OK", &["n1.pem", "common name n1 equals node: n1"]);
    find(&lines, "OK", &["n1.pem", "signed by the CA"]);
    find(
        &lines,
        "OK",
        &[
            &format!("TLS to collector {}", collector.grpc_addr),
            "accepted this agent's certificate",
        ],
    );
    find(&lines, "OK", &["state dir", "agent-a"]);
    assert!(
        !ws.path().join("agent-a").exists(),
        "doctor created the state dir"
    );
    collector.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn expired_certificates_are_errors_naming_the_file() -> anyhow::Result<()> {
    init();
    let ws = Workspace::new()?;
    write_expired(&ws, "collector", "vigil-collector", true)?;
    write_expired(&ws, "n1", "n1", false)?;
    let (url, _) = closed_port_url()?;
    let path = ws.write_collector(&url, &["n1"])?;

    let (code, lines) = collector_doctor(&path, &[]).await?;
    assert_eq!(code, 1, "{}", lines.join("\n"));
    let line = find(
        &lines,
        "ERROR",
        &[
            "server certificate",
            "certs/collector.pem",
            "expired on 2021-01-01",
        ],
    );
    assert!(line.contains(" — "), "no fix in {line}");
    // Expired, but still signed by the right CA.
    find(&lines, "OK", &["certs/collector.pem", "signed by the CA"]);

    let agent = write_agent(&ws, "a", "n1", &closed_collector()?, "certs/ca.pem", "n1")?;
    let (code, lines) = agent_doctor(&agent).await?;
    assert_eq!(code, 1, "{}", lines.join("\n"));
    let line = find(
        &lines,
        "ERROR",
        &[
            "client certificate",
            "certs/n1.pem",
            "expired on 2021-01-01",
        ],
    );
    assert!(
        line.contains("vigil-collector ca issue --node n1"),
        "{line}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_another_ca_are_errors() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    let other = Workspace::new()?;
    ws.issue("n1")?;
    other.issue("n1")?;
    copy_pair(&other, "n1", &ws, "alien")?;
    std::fs::copy(
        other.certs().join("ca.pem"),
        ws.certs().join("other-ca.pem"),
    )?;
    let path = ws.write_collector(&db.url, &["n1"])?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let addr = collector.grpc_addr.to_string();

    // An agent certificate from another CA: refused locally and by the collector.
    let agent = write_agent(&ws, "a", "n1", &addr, "certs/ca.pem", "alien")?;
    let (code, lines) = agent_doctor(&agent).await?;
    assert_eq!(code, 1, "{}", lines.join("\n"));
    find(
        &lines,
        "ERROR",
        &[
            "client certificate",
            "alien.pem",
            "not signed by the CA in",
            "ca.pem",
        ],
    );
    find(
        &lines,
        "ERROR",
        &[
            "TLS to collector",
            "the collector refused this agent's certificate",
        ],
    );

    // Trusting another CA: the collector's certificate is refused in the handshake.
    let agent = write_agent(&ws, "b", "n1", &addr, "certs/other-ca.pem", "alien")?;
    let (code, lines) = agent_doctor(&agent).await?;
    assert_eq!(code, 1, "{}", lines.join("\n"));
    find(&lines, "OK", &["alien.pem", "signed by the CA in"]);
    find(
        &lines,
        "ERROR",
        &[
            "TLS to collector",
            "collector's certificate is not signed by the CA in tls.ca",
        ],
    );
    collector.shutdown().await;

    // A server certificate from another CA.
    copy_pair(&other, "collector", &ws, "collector")?;
    let (code, lines) = collector_doctor(&path, &[]).await?;
    assert_eq!(code, 1, "{}", lines.join("\n"));
    find(
        &lines,
        "ERROR",
        &[
            "server certificate",
            "certs/collector.pem",
            "not signed by the CA in",
            "certs/ca.pem",
        ],
    );
    Ok(())
}

#[tokio::test]
async fn database_unreachable_or_not_migrated_is_an_error() -> anyhow::Result<()> {
    init();
    let ws = Workspace::new()?;
    let (url, port) = closed_port_url()?;
    let path = ws.write_collector(&url, &[])?;
    let (code, lines) = collector_doctor(&path, &[]).await?;
    assert_eq!(code, 1, "{}", lines.join("\n"));
    let line = find(
        &lines,
        "ERROR",
        &[
            &format!("database 127.0.0.1:{port}/vigil"),
            "cannot connect",
        ],
    );
    assert!(line.contains("start PostgreSQL"), "{line}");
    // Only the database is wrong here.
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("ERROR")).count(),
        1,
        "{}",
        lines.join("\n")
    );

    // Reachable, but nobody migrated it; doctor leaves it so.
    let db = pg::test_db().await?;
    let path = ws.write_collector(&db.url, &[])?;
    let (code, lines) = collector_doctor(&path, &[]).await?;
    assert_eq!(code, 1, "{}", lines.join("\n"));
    find(&lines, "ERROR", &["database", "not migrated"]);
    let client = db.connect().await?;
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(tables, 0, "doctor changed the database");
    Ok(())
}

#[tokio::test]
async fn bad_config_is_an_error_naming_file_and_key() -> anyhow::Result<()> {
    init();
    let ws = Workspace::new()?;
    let (url, _) = closed_port_url()?;
    let path = ws.write_collector(&url, &["n1"])?;

    // An unknown key in collector.yaml.
    let text = std::fs::read_to_string(&path)?;
    std::fs::write(&path, format!("{text}retention: 30d\n"))?;
    let (code, lines) = collector_doctor(&path, &[]).await?;
    assert_eq!(code, 1, "{}", lines.join("\n"));
    find(&lines, "ERROR", &["collector.yaml", "retention"]);

    // An unknown key in a service file: the file, line and key; certificates are still checked.
    std::fs::write(&path, &text)?;
    ws.write_service(
        "web",
        "id: web\ncategory: web\nnode: n1\ncheck:\n  type: tcp\n  address: 127.0.0.1:1\nowner: ops\n",
    )?;
    let (code, lines) = collector_doctor(&path, &[]).await?;
    assert_eq!(code, 1, "{}", lines.join("\n"));
    find(&lines, "ERROR", &["services/web.yaml:7", "owner"]);
    find(&lines, "OK", &["certs/collector.pem", "signed by the CA"]);

    // An unknown key in agent.yaml.
    ws.issue("n1")?;
    let agent = write_agent(&ws, "a", "n1", &closed_collector()?, "certs/ca.pem", "n1")?;
    let text = std::fs::read_to_string(&agent)?;
    std::fs::write(&agent, format!("{text}retries: 3\n"))?;
    let (code, lines) = agent_doctor(&agent).await?;
    assert_eq!(code, 1, "{}", lines.join("\n"));
    find(&lines, "ERROR", &["agent-a.yaml", "retries"]);
    Ok(())
}

#[tokio::test]
async fn agent_certificate_of_another_node_is_an_error() -> anyhow::Result<()> {
    init();
    let ws = Workspace::new()?;
    ws.issue("n2")?;
    let agent = write_agent(&ws, "a", "n1", &closed_collector()?, "certs/ca.pem", "n2")?;
    let (code, lines) = agent_doctor(&agent).await?;
    assert_eq!(code, 1, "{}", lines.join("\n"));
    find(
        &lines,
        "ERROR",
        &["n2.pem", "common name is n2, but agent.yaml says node: n1"],
    );
    // Otherwise the certificate is fine.
    find(&lines, "OK", &["n2.pem", "signed by the CA"]);
    find(&lines, "ERROR", &["collector 127.0.0.1:", "cannot connect"]);
    Ok(())
}

#[tokio::test]
async fn keys_readable_by_others_are_warnings_naming_file_mode_and_fix() -> anyhow::Result<()> {
    init();
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    let (url, _) = closed_port_url()?;
    let collector = ws.write_collector(&url, &["n1"])?;
    let agent = write_agent(&ws, "a", "n1", &closed_collector()?, "certs/ca.pem", "n1")?;
    let warnings = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l.contains("readable by group or others"))
            .cloned()
            .collect()
    };
    // As `ca init` and `ca issue` write them: owner only.
    let (_, lines) = collector_doctor(&collector, &[]).await?;
    assert_eq!(
        warnings(&lines),
        Vec::<String>::new(),
        "{}",
        lines.join("\n")
    );
    let (_, lines) = agent_doctor(&agent).await?;
    assert_eq!(
        warnings(&lines),
        Vec::<String>::new(),
        "{}",
        lines.join("\n")
    );

    for (name, m) in [
        ("collector.key", 0o644),
        ("ca.key", 0o640),
        ("n1.key", 0o644),
    ] {
        set_mode(&ws.certs().join(name), m)?;
    }
    let (_, lines) = collector_doctor(&collector, &[]).await?;
    let key = ws.certs().join("collector.key");
    let ca_key = ws.certs().join("ca.key");
    assert_eq!(
        warnings(&lines),
        vec![
            format!(
                "WARN server key {0}: readable by group or others (mode 0644) — chmod 600 {0}",
                key.display()
            ),
            format!(
                "WARN CA key {0}: readable by group or others (mode 0640) — chmod 600 {0}",
                ca_key.display()
            ),
        ],
        "{}",
        lines.join("\n")
    );
    let (_, lines) = agent_doctor(&agent).await?;
    let n1_key = ws.certs().join("n1.key");
    assert_eq!(
        warnings(&lines),
        vec![format!(
            "WARN private key {0}: readable by group or others (mode 0644) — chmod 600 {0}",
            n1_key.display()
        )],
        "{}",
        lines.join("\n")
    );

    // Secrets read from files (collector.yaml's `_file` keys): the same rule, named by key.
    let secret = ws.path().join("hook.auth");
    std::fs::write(&secret, "Bearer t0k3n-doctor\n")?;
    set_mode(&secret, 0o644)?;
    let mut text = std::fs::read_to_string(&collector)?;
    text.push_str(&format!(
        "notify:\n  receivers:\n    - name: hook\n      type: webhook\n      url: \"http://127.0.0.1:9/\"\n      headers_file: {{ Authorization: {} }}\n",
        secret.display()
    ));
    std::fs::write(&collector, text)?;
    let (_, lines) = collector_doctor(&collector, &[]).await?;
    let want = format!(
        "WARN notify.receivers[0].headers_file.Authorization {0}: readable by group or others (mode 0644) — chmod 600 {0}",
        secret.display()
    );
    assert!(warnings(&lines).contains(&want), "{}", lines.join("\n"));
    assert!(
        !lines.iter().any(|l| l.contains("t0k3n-doctor")),
        "{}",
        lines.join("\n")
    );
    set_mode(&secret, 0o600)?;
    let (_, lines) = collector_doctor(&collector, &[]).await?;
    assert!(
        !warnings(&lines).iter().any(|l| l.contains("hook.auth")),
        "{}",
        lines.join("\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_findings_name_host_key_auth_and_connect_errors() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let ws = Workspace::new()?;
    let stranger = sshd.generate_key("stranger", "").await?;
    let (url, _) = closed_port_url()?;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let node = |name: &str, port: u16, key: &Path, fingerprint: &str| {
        format!(
            "  - name: {name}\n    address: 127.0.0.1\n    agent: false\n    ssh:\n      port: {port}\n      user: {}\n      key: {}\n      host_key_fingerprint: \"{fingerprint}\"\n",
            sshd.user,
            key.display()
        )
    };
    let wrong = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let yaml = format!(
        "grpc_listen: 127.0.0.1:0\nhttp: {{ listen: 127.0.0.1:0 }}\nmetrics: {{ listen: 127.0.0.1:0 }}\ndatabase: {{ url: \"{url}\" }}\n\
         tls: {{ ca: certs/ca.pem, cert: certs/collector.pem, key: certs/collector.key }}\nnodes:\n{}{}{}{}",
        node("good", sshd.port, &sshd.client_key, &sshd.host_fingerprint),
        node("rogue", sshd.port, &sshd.client_key, wrong),
        node("locked", sshd.port, &stranger, &sshd.host_fingerprint),
        node("gone", closed, &sshd.client_key, &sshd.host_fingerprint),
    );
    let path = ws.path().join("collector.yaml");
    std::fs::write(&path, yaml)?;
    let (code, lines) = collector_doctor(&path, &[]).await?;
    assert_eq!(code, 1, "{}", lines.join("\n"));
    find(&lines, "OK", &["ssh node good", "logged in and ran `true`"]);
    find(
        &lines,
        "ERROR",
        &["ssh node rogue", "host key refused", "ssh-keyscan"],
    );
    find(
        &lines,
        "ERROR",
        &[
            "ssh node locked",
            "authentication refused",
            "authorized_keys",
        ],
    );
    find(
        &lines,
        "ERROR",
        &[
            &format!("ssh node gone ({}@127.0.0.1:{closed})", sshd.user),
            "unreachable",
        ],
    );
    Ok(())
}

#[tokio::test]
async fn install_script_with_prefix_installs_files_with_their_modes() -> anyhow::Result<()> {
    init();
    let ws = Workspace::new()?;
    ws.issue("gpu-01")?;
    let agent_yaml = ws.path().join("agent.yaml");
    // A state dir other than the unit's: installed anyway, with a warning. (The documented
    // /var/lib/vigil-agent would make doctor probe this machine's /var/lib.)
    let state = ws.path().join("state");
    std::fs::write(
        &agent_yaml,
        format!(
            "node: gpu-01\ncollector: {{ url: \"https://{}\", server_name: localhost }}\n\
             tls: {{ ca: ca.pem, cert: gpu-01.pem, key: gpu-01.key }}\nstate_dir: {}\n",
            closed_collector()?,
            state.display()
        ),
    )?;
    let prefix = tempfile::tempdir()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/install-agent.sh");
    let agent_bin = binary("vigil-agent")?;
    let certs = ws.certs();
    let run = || {
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(&script)
            .arg("--prefix")
            .arg(prefix.path())
            .arg("--binary")
            .arg(&agent_bin)
            .arg("--config")
            .arg(&agent_yaml)
            .arg("--ca")
            .arg(certs.join("ca.pem"))
            .arg("--cert")
            .arg(certs.join("gpu-01.pem"))
            .arg("--key")
            .arg(certs.join("gpu-01.key"));
        cmd
    };
    // Twice: the second run must succeed and change nothing.
    for round in 0..2 {
        let out = run().output().await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "round {round}: {}\n{stderr}",
            String::from_utf8_lossy(&out.stdout),
        );
        assert!(
            stderr.contains("set state_dir: /var/lib/vigil-agent"),
            "no state_dir warning: {stderr}"
        );
        let p = prefix.path();
        let expect: [(&str, u32); 7] = [
            ("usr/local/bin/vigil-agent", 0o755),
            ("etc/vigil/agent.yaml", 0o644),
            ("etc/vigil/ca.pem", 0o644),
            ("etc/vigil/gpu-01.pem", 0o644),
            ("etc/vigil/gpu-01.key", 0o600),
            ("var/lib/vigil-agent", 0o750),
            ("etc/systemd/system/vigil-agent.service", 0o644),
        ];
        for (rel, want) in expect {
            let got = mode(&p.join(rel))?;
            assert_eq!(
                got, want,
                "round {round}: {rel} has mode {got:o}, want {want:o}"
            );
        }
        assert_eq!(
            std::fs::read(p.join("usr/local/bin/vigil-agent"))?,
            std::fs::read(&agent_bin)?
        );
        assert_eq!(
            std::fs::read(p.join("etc/vigil/gpu-01.key"))?,
            std::fs::read(certs.join("gpu-01.key"))?
        );
        let unit = std::fs::read_to_string(p.join("etc/systemd/system/vigil-agent.service"))?;
        for want in [
            "ExecStart=/usr/local/bin/vigil-agent --config /etc/vigil/agent.yaml",
            "Restart=on-failure",
            "User=vigil",
            "ReadWritePaths=/var/lib/vigil-agent",
        ] {
            assert!(unit.contains(want), "unit lacks {want}");
        }
        // Nothing left behind from the copy-then-rename.
        let leftovers: Vec<_> = walk(p)?
            .into_iter()
            .filter(|f| f.to_string_lossy().contains(".new."))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
    // The installed config works where it was installed: its relative TLS paths resolve.
    let (_, lines) = agent_doctor(&prefix.path().join("etc/vigil/agent.yaml")).await?;
    find(
        &lines,
        "OK",
        &[
            "etc/vigil/gpu-01.pem",
            "common name gpu-01 equals node: gpu-01",
        ],
    );
    find(
        &lines,
        "OK",
        &["etc/vigil/gpu-01.key", "matches the client certificate"],
    );
    Ok(())
}

fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        }
        out.push(p);
    }
    Ok(out)
}
