//! Shared harness for Vigil's end-to-end tests: a private PostgreSQL ([`pg`]), a service that
//! behaves like the things Vigil monitors ([`testsvc`]), certificates, and an in-process collector
//! and agents on `127.0.0.1:0` wired together over real mTLS.

pub mod browser;
pub mod docker;
pub mod pg;
pub mod sshd;
pub mod testsvc;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vigil_agent::{Agent, AgentConfig, AgentHandle, ConnState};

/// Installs the process-wide crypto provider and a test log subscriber (once).
pub fn init() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `f` until it returns `Some`, at most `limit`; the error says what was awaited.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    let mut last_err = None;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => bail!("timed out after {limit:?} waiting for {what}; last error: {e:#}"),
                None => bail!("timed out after {limit:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A directory with a collector config, its certificates and agent configs.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    /// Creates a CA (and the collector's certificate) and the services directory.
    pub fn new() -> anyhow::Result<Workspace> {
        let dir = tempfile::tempdir()?;
        vigil_collector::ca::init(&dir.path().join("certs"), &[])?;
        std::fs::create_dir(dir.path().join("services"))?;
        Ok(Workspace { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn certs(&self) -> PathBuf {
        self.path().join("certs")
    }

    /// Issues an agent certificate for `node` in this workspace's CA.
    pub fn issue(&self, node: &str) -> anyhow::Result<()> {
        vigil_collector::ca::issue(&self.certs(), node)?;
        Ok(())
    }

    /// Writes collector.yaml: listens on 127.0.0.1:0, the given nodes and database.
    pub fn write_collector(&self, database_url: &str, nodes: &[&str]) -> anyhow::Result<PathBuf> {
        let mut text = format!(
            "grpc_listen: 127.0.0.1:0\nhttp: {{ listen: 127.0.0.1:0 }}\nmetrics: {{ listen: 127.0.0.1:0 }}\n\
             database: {{ url: \"{database_url}\", pool_size: 4 }}\n\
             tls: {{ ca: certs/ca.pem, cert: certs/collector.pem, key: certs/collector.key }}\n\
             services_dir: services\n\
             nodes:\n"
        );
        for n in nodes {
            text.push_str(&format!("  - {{ name: {n}, address: 127.0.0.1 }}\n"));
        }
        let path = self.path().join("collector.yaml");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Writes `services/<id>.yaml`.
    pub fn write_service(&self, id: &str, yaml: &str) -> anyhow::Result<()> {
        std::fs::write(
            self.path().join("services").join(format!("{id}.yaml")),
            yaml,
        )?;
        Ok(())
    }

    /// Copies a file into the workspace (for multipart attachments, relative to collector.yaml).
    pub fn add_file(&self, rel: &str, from: &Path) -> anyhow::Result<()> {
        let to = self.path().join(rel);
        std::fs::create_dir_all(to.parent().expect("relative path has a parent"))?;
        std::fs::copy(from, &to).with_context(|| format!("copy {}", from.display()))?;
        Ok(())
    }

    /// Writes an agent config for `node` using `cert_node`'s certificate, with its own state
    /// directory `agent-<name>`; returns its path.
    pub fn write_agent(
        &self,
        name: &str,
        node: &str,
        cert_node: &str,
        collector: std::net::SocketAddr,
    ) -> anyhow::Result<PathBuf> {
        let text = format!(
            "node: {node}\n\
             collector:\n  url: https://{collector}\n  server_name: localhost\n  connect_timeout: 5s\n\
             tls: {{ ca: certs/ca.pem, cert: certs/{cert_node}.pem, key: certs/{cert_node}.key }}\n\
             state_dir: agent-{name}\n\
             reconnect: {{ initial: 100ms, max: 1s }}\n"
        );
        let path = self.path().join(format!("agent-{name}.yaml"));
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

/// The repository's `config/` directory (example configs and the sample PDF).
pub fn repo_config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config")
}

/// A service file for `node` whose check runs `/bin/true` every second.
pub fn true_service(id: &str, node: &str) -> String {
    format!(
        "id: {id}\ncategory: system\nnode: {node}\ncheck:\n  type: command\n  interval: 1s\n  argv: [\"/bin/true\"]\n"
    )
}

/// A controllable `web` service for `node` named "Web front": its check runs `/bin/true` every
/// second and its start, stop and restart run `/bin/true`.
pub fn web_front_service(id: &str, node: &str) -> String {
    format!(
        "id: {id}\nname: Web front\ncategory: web\nnode: {node}\ndescription: the front page\n\
         check:\n  type: command\n  interval: 1s\n  argv: [\"/bin/true\"]\n\
         control:\n  start: [[\"/bin/true\"]]\n  stop: [[\"/bin/true\"]]\n  restart: [[\"/bin/true\"]]\n"
    )
}

/// Loads an agent config and starts the agent in-process.
pub async fn start_agent(path: &Path) -> anyhow::Result<AgentHandle> {
    Ok(Agent::start(AgentConfig::load(path)?).await?)
}

/// Waits until the agent is connected; fails at once if it is refused.
pub async fn connected(agent: &AgentHandle) -> anyhow::Result<()> {
    let mut st = agent.state();
    wait_for("agent connected", Duration::from_secs(30), || {
        let s = st.borrow_and_update().clone();
        async move {
            match s {
                ConnState::Connected { .. } => Ok(Some(())),
                ConnState::Refused { reason } => bail!("refused: {reason}"),
                _ => Ok(None),
            }
        }
    })
    .await
}

/// `SELECT count(*) ...` with one text parameter.
pub async fn count(db: &tokio_postgres::Client, sql: &str, param: &str) -> anyhow::Result<i64> {
    Ok(db.query_one(sql, &[&param]).await?.get(0))
}

/// Path of a workspace binary (`vigil-collector`, `vigil-agent`, ...), built by
/// `cargo build --workspace` (deploy/test.sh does that before the tests).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/debug/deps/<test> -> target/debug/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("unexpected test executable location")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is not built; run `cargo build --workspace` first (deploy/test.sh does)",
            path.display()
        );
    }
    Ok(path)
}

/// A free TCP port on 127.0.0.1 (for a process that must be told its port before it starts).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A child process, SIGKILLed (and reaped) on drop.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `vigil-collector serve --config CONFIG` with `RUST_LOG=warn`, killed on drop.
pub fn spawn_collector(config: &Path) -> anyhow::Result<Killed> {
    Ok(Killed(
        std::process::Command::new(binary("vigil-collector")?)
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .spawn()?,
    ))
}

/// The state of a service in `service_state` (`unknown`, `healthy`, `failing`, `down`).
pub async fn state(db: &tokio_postgres::Client, service: &str) -> anyhow::Result<String> {
    Ok(db
        .query_one(
            "SELECT state FROM service_state WHERE service_id = $1",
            &[&service],
        )
        .await?
        .get(0))
}
