//! Node liveness end to end: real `vigil-agent` processes killed (SIGKILL, SIGTERM) or frozen
//! (SIGSTOP) under an in-process collector with a real PostgreSQL, a webhook receiver and a real
//! sshd. A silent node goes down and comes back by itself, its service goes stale and fresh
//! again without being restarted, a dead agent is restarted over SSH (or the alert says SSH is
//! unreachable too) while a frozen one found running is not, `on_stale` decides whether a stale
//! service alerts, and an agent restarted twenty times in a row leaves no hole in its outbox's
//! sequence numbers.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use vigil_collector::web::auth::{Role, create_token};
use vigil_collector::{Collector, Config, status};
use vigil_tests::{Workspace, binary, count, init, pg, sshd, wait_for};

/// `node_timeout` of every test: an agent silent this long makes its node down.
const NODE_TIMEOUT: Duration = Duration::from_secs(3);
/// The collector's liveness pass runs this often.
const PASS: Duration = Duration::from_secs(2);
/// How long a node-down alert waits for the SSH heal's outcome (`liveness::HEAL_WAIT`).
const HEAL_WAIT: Duration = Duration::from_secs(4);
/// Allowed on top of `node_timeout` (and the pass period) for a node to be declared down.
const DOWN_SLACK: Duration = Duration::from_secs(5);
/// Limit of the waits that no latency promise bounds (startup, coming back, ...).
const LIMIT: Duration = Duration::from_secs(45);

/// Webhook posts received so far, in order.
type Alerts = Arc<Mutex<Vec<Value>>>;

/// A webhook receiver on 127.0.0.1:0 that records every JSON post; returns its URL.
async fn webhook() -> anyhow::Result<(String, Alerts)> {
    use axum::{Json, Router, routing::post};
    let got: Alerts = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let app = Router::new().route(
        "/hook",
        post(move |Json(v): Json<Value>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(v);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, got))
}

/// A `vigil-agent` process started by the test (killed on drop; what it logged is printed then,
/// so that a failing test shows it).
struct AgentProc {
    child: tokio::process::Child,
    pid: i32,
    log: PathBuf,
    /// Where its output starts in `log` (shared by the agent's successive processes).
    log_from: u64,
}

impl AgentProc {
    /// Starts `vigil-agent --config CONFIG`, appending its output to `log` (RUST_LOG:
    /// `VIGIL_TEST_AGENT_LOG`, default `info`).
    fn spawn(config: &Path, log: &Path) -> anyhow::Result<AgentProc> {
        let out = OpenOptions::new().create(true).append(true).open(log)?;
        let log_from = out.metadata()?.len();
        let child = tokio::process::Command::new(binary("vigil-agent")?)
            .arg("--config")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("VIGIL_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .context("start vigil-agent")?;
        let pid = i32::try_from(child.id().context("the agent has no pid")?)?;
        Ok(AgentProc {
            child,
            pid,
            log: log.to_path_buf(),
            log_from,
        })
    }

    fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        kill(Pid::from_raw(self.pid), sig).with_context(|| format!("kill -{sig} {}", self.pid))
    }

    /// Waits (at most `limit`) for the process to exit, and reaps it.
    async fn exited(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .with_context(|| format!("agent {} still running after {limit:?}", self.pid))?
            .context("wait for the agent")
    }

    /// SIGKILL, and reaps it (a zombie would still answer `kill -0`).
    async fn kill(&mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGKILL)?;
        self.exited(LIMIT).await?;
        Ok(())
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        print_tail(&format!("agent {}", self.pid), &self.log, self.log_from);
    }
}

/// Prints the last lines written to `log` from byte `from` on to stderr (shown for failing
/// tests).
fn print_tail(who: &str, log: &Path, from: u64) {
    // Gone with its workspace once a test passed.
    let Ok(bytes) = std::fs::read(log) else {
        return;
    };
    let start = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[start..]);
    let lines: Vec<&str> = text.lines().collect();
    let first = lines.len().saturating_sub(25);
    eprintln!(
        "--- {who}: {} (last {} lines) ---\n{}",
        log.display(),
        lines.len() - first,
        lines[first..].join("\n")
    );
}

/// Makes sure the outbox in `state_dir` has an epoch in `1..=i64::MAX`, the range the collector
/// accepts; returns it. The agent on this branch still draws a new outbox's epoch from all of
/// `u64` (refused by the collector half of the time, and for good: the agent keeps its epoch);
/// the agent that renews such epochs is on its own branch. With it this is a no-op.
fn outbox_in_range(state_dir: &Path) -> anyhow::Result<u64> {
    use vigil_agent::outbox::{FILE_NAME, Outbox};
    std::fs::create_dir_all(state_dir)?;
    let path = state_dir.join(FILE_NAME);
    loop {
        let epoch = Outbox::open(&path, 1)?.epoch();
        if epoch <= i64::MAX as u64 {
            return Ok(epoch);
        }
        std::fs::remove_file(&path)?;
    }
}

/// A collector with a webhook, its database and API tokens.
struct Env {
    ws: Workspace,
    collector: Collector,
    client: tokio_postgres::Client,
    alerts: Alerts,
    http: reqwest::Client,
    viewer: String,
    operator: String,
    // Last: fields drop in order, and the database goes once nothing uses it.
    _db: pg::TestDb,
}

/// The node list entry of an agent node `n1` without SSH.
fn plain_node(_ws: &Path) -> anyhow::Result<String> {
    Ok("  - { name: n1, address: 127.0.0.1 }\n".into())
}

/// Starts a collector for node `n1` with `node_timeout: 3s`, the given services and a webhook
/// receiver; `nodes` gives the items under `nodes:` from the workspace's directory.
async fn start(
    services: &[(&str, String)],
    nodes: impl FnOnce(&Path) -> anyhow::Result<String>,
) -> anyhow::Result<Env> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    let nodes_yaml = nodes(ws.path())?;
    ws.issue("n1")?;
    for (id, yaml) in services {
        ws.write_service(id, yaml)?;
    }
    let (hook, alerts) = webhook().await?;
    let yaml = format!(
        "grpc_listen: 127.0.0.1:0\nhttp: {{ listen: 127.0.0.1:0 }}\nmetrics: {{ listen: 127.0.0.1:0 }}\n\
         database: {{ url: \"{}\" }}\n\
         tls: {{ ca: certs/ca.pem, cert: certs/collector.pem, key: certs/collector.key }}\n\
         services_dir: services\nnode_timeout: {}s\n\
         notify:\n  webhooks:\n    - {{ url: \"{hook}\" }}\n\
         nodes:\n{nodes_yaml}",
        db.url,
        NODE_TIMEOUT.as_secs(),
    );
    let path = ws.path().join("collector.yaml");
    std::fs::write(&path, yaml)?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let client = db.connect().await?;
    let store = &collector.hub.store;
    let (viewer, _) = create_token(store, "viewer-1", Role::Viewer).await?;
    let (operator, _) = create_token(store, "operator-1", Role::Operator).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    Ok(Env {
        _db: db,
        ws,
        collector,
        client,
        alerts,
        http,
        viewer,
        operator,
    })
}

impl Env {
    /// Writes the agent config of `n1` (state dir `agent-a`, its outbox's epoch one the
    /// collector accepts); returns its path.
    fn agent_config(&self) -> anyhow::Result<PathBuf> {
        outbox_in_range(&self.ws.path().join("agent-a"))?;
        self.ws
            .write_agent("a", "n1", "n1", self.collector.grpc_addr)
    }

    fn agent_log(&self) -> PathBuf {
        self.ws.path().join("agent-a.log")
    }

    /// Starts a `vigil-agent` process for `n1`.
    fn spawn_agent(&self) -> anyhow::Result<AgentProc> {
        AgentProc::spawn(&self.agent_config()?, &self.agent_log())
    }

    fn api(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.collector.http_addr.expect("http enabled")
        )
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self
            .http
            .get(self.api(path))
            .bearer_auth(&self.viewer)
            .send()
            .await?;
        let st = resp.status();
        let text = resp.text().await?;
        ensure!(st.is_success(), "GET {path}: {st}: {text}");
        Ok(serde_json::from_str(&text)?)
    }

    /// `GET /api/services/health/{id}`.
    async fn health(&self, id: &str) -> anyhow::Result<Value> {
        self.get(&format!("/api/services/health/{id}")).await
    }

    /// `n1` as `GET /api/nodes` shows it.
    async fn node_view(&self) -> anyhow::Result<Value> {
        let nodes = self.get("/api/nodes").await?;
        nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["name"] == "n1"))
            .cloned()
            .with_context(|| format!("no n1 in /api/nodes: {nodes}"))
    }

    /// The value of the sample of `name` whose labels include `label="value"` on `/metrics`.
    async fn metric(&self, name: &str, label: &str, value: &str) -> anyhow::Result<Option<f64>> {
        let addr = self.collector.metrics_addr.expect("metrics enabled");
        let text = self
            .http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        let want = format!("{label}=\"{value}\"");
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            let Some((labels, v)) = rest.rsplit_once(' ') else {
                continue;
            };
            if labels.starts_with('{')
                && (labels.contains(&format!("{{{want}")) || labels.contains(&format!(",{want}")))
            {
                return Ok(Some(v.parse()?));
            }
        }
        Ok(None)
    }

    /// Waits until `name{label="value"}` is `want` on `/metrics`.
    async fn wait_metric(
        &self,
        name: &str,
        label: &str,
        value: &str,
        want: f64,
    ) -> anyhow::Result<()> {
        wait_for(
            &format!("{name}{{{label}=\"{value}\"}} {want}"),
            LIMIT,
            || async move {
                let got = self.metric(name, label, value).await?;
                Ok((got == Some(want)).then_some(()))
            },
        )
        .await
    }

    /// Every alert received so far as `event:node:service`.
    fn events(&self) -> Vec<String> {
        self.alerts
            .lock()
            .unwrap()
            .iter()
            .map(|a| {
                format!(
                    "{}:{}:{}",
                    a["event"].as_str().unwrap_or("?"),
                    a["node"].as_str().unwrap_or("?"),
                    a["service"].as_str().unwrap_or("?")
                )
            })
            .collect()
    }

    /// Alerts named `event` received so far.
    fn alerts_named(&self, event: &str) -> Vec<Value> {
        self.alerts
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a["event"] == event)
            .cloned()
            .collect()
    }

    /// Waits at most `limit` for the first alert named `event`.
    async fn wait_alert(&self, event: &str, limit: Duration) -> anyhow::Result<Value> {
        wait_for(&format!("a {event} alert"), limit, || {
            let found = self.alerts_named(event).into_iter().next();
            async move { Ok(found) }
        })
        .await
        .with_context(|| format!("alerts so far: {:?}", self.events()))
    }

    /// Waits until `id` is healthy in the API (state healthy, is_healthy true).
    async fn wait_healthy(&self, id: &str, limit: Duration) -> anyhow::Result<Value> {
        wait_for(&format!("{id} healthy in the API"), limit, || async move {
            let h = self.health(id).await?;
            Ok((h["state"] == "healthy" && h["is_healthy"] == true).then_some(h))
        })
        .await
    }

    /// Waits until `id` is stale in the API.
    async fn wait_stale(&self, id: &str, limit: Duration) -> anyhow::Result<Value> {
        wait_for(&format!("{id} stale in the API"), limit, || async move {
            let h = self.health(id).await?;
            Ok((h["state"] == "stale").then_some(h))
        })
        .await
    }

    /// Waits until `n1`'s agent holds a stream to the collector.
    async fn wait_connected(&self) -> anyhow::Result<()> {
        let hub = &self.collector.hub;
        wait_for("n1's agent connected", LIMIT, || async move {
            Ok(hub
                .connected_nodes()
                .iter()
                .any(|n| n == "n1")
                .then_some(()))
        })
        .await
    }

    /// Rows in `commands` (any service, agent restarts included).
    async fn commands(&self) -> anyhow::Result<i64> {
        Ok(self
            .client
            .query_one("SELECT count(*) FROM commands", &[])
            .await?
            .get(0))
    }

    /// `vigil-collector status` as the binary prints it (the same two render calls).
    async fn status_text(&self) -> anyhow::Result<String> {
        let store = &self.collector.hub.store;
        let now = chrono::Utc::now();
        Ok(format!(
            "{}{}",
            status::render(&store.status().await?, now),
            status::render_nodes(&store.nodes().await?, now)
        ))
    }

    async fn shutdown(self) {
        self.collector.shutdown().await;
    }
}

/// A service checked every second by `/bin/true`, with a restart that must never be used: on
/// failure it is restarted after one bad result, so a stale service taken for a failed one
/// would show as a command.
fn app_service() -> String {
    "id: app\ncategory: api\nnode: n1\ncheck:\n  type: command\n  interval: 1s\n  argv: [\"/bin/true\"]\n\
     control:\n  restart: [[\"/bin/sh\", \"-c\", \"echo never; exit 1\"]]\n\
     on_failure:\n  action: restart\n  after: 1\n  grace: 0s\n"
        .into()
}

/// After the agent of `n1` fell silent at `t0`: within node_timeout + 5 s (+ the pass period)
/// one `node_down` alert whose reason contains `why`, the service stale in the API, on
/// `/metrics` and in `status`; still one alert two passes later.
async fn assert_down(env: &Env, t0: Instant, why: &str) -> anyhow::Result<()> {
    let budget = NODE_TIMEOUT + DOWN_SLACK + PASS;
    let left = || budget.saturating_sub(t0.elapsed());
    let down = env.wait_alert("node_down", left()).await?;
    eprintln!("silent -> node_down alert: {:?}", t0.elapsed());
    assert_eq!(down["node"], "n1", "{down}");
    assert_eq!(down["service"], "", "{down}");
    let reason = down["reason"].as_str().unwrap_or("");
    assert!(reason.contains(why), "{down}");
    let h = env.wait_stale("app", left()).await?;
    assert_eq!(h["status"], "stale", "{h}");
    assert_eq!(h["is_healthy"], false, "{h}");
    let r = h["reason"].as_str().unwrap_or("");
    assert!(
        r.starts_with("stale: ") && r.contains("node n1 is down"),
        "{h}"
    );

    env.wait_metric("vigil_node_up", "node", "n1", 0.0).await?;
    env.wait_metric("vigil_service_up", "service", "app", 0.0)
        .await?;
    let text = env.status_text().await?;
    let line = text
        .lines()
        .find(|l| l.starts_with("app "))
        .with_context(|| format!("no app line in status:\n{text}"))?;
    assert!(line.contains("STALE"), "{text}");
    assert!(text.contains("NODE n1 DOWN"), "{text}");
    let view = env.node_view().await?;
    assert_eq!(view["up"], false, "{view}");

    // Two more liveness passes with the node down: still one alert, one `down` event.
    wait_for("two more liveness passes", LIMIT, || async move {
        let row = env
            .client
            .query_one(
                "SELECT down_since IS NOT NULL, now() - down_since >= $1 * interval '1 millisecond'
                 FROM nodes WHERE name = 'n1'",
                &[&((2 * PASS + Duration::from_secs(1)).as_millis() as f64)],
            )
            .await?;
        if !row.get::<_, bool>(0) {
            bail!("n1 is no longer down");
        }
        Ok(row.get::<_, Option<bool>>(1).unwrap_or(false).then_some(()))
    })
    .await?;
    assert_eq!(env.alerts_named("node_down").len(), 1, "{:?}", env.events());
    assert_eq!(
        count(
            &env.client,
            "SELECT count(*) FROM node_events WHERE node = $1 AND kind = 'down'",
            "n1"
        )
        .await?,
        1
    );
    Ok(())
}

/// After `n1`'s agent is back: a `node_up` alert, the service healthy again by itself, the
/// metrics back to 1, and no command at all.
async fn assert_back_up(env: &Env) -> anyhow::Result<()> {
    let up = env.wait_alert("node_up", LIMIT).await?;
    assert_eq!(up["node"], "n1", "{up}");
    assert_eq!(up["service"], "", "{up}");
    let h = env.wait_healthy("app", LIMIT).await?;
    assert_eq!(h["status"], "running", "{h}");
    assert!(h["reason"].is_null(), "{h}");
    env.wait_metric("vigil_node_up", "node", "n1", 1.0).await?;
    env.wait_metric("vigil_service_up", "service", "app", 1.0)
        .await?;
    let view = env.node_view().await?;
    assert_eq!(view["up"], true, "{view}");
    let kinds: Vec<&str> = view["events"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["kind"].as_str()).collect())
        .unwrap_or_default();
    assert!(kinds.contains(&"down") && kinds.contains(&"up"), "{view}");
    assert_eq!(env.commands().await?, 0, "a command was created");
    assert!(
        count(
            &env.client,
            "SELECT count(*) FROM events WHERE service_id = $1 AND to_state = 'fresh'",
            "app"
        )
        .await?
            > 0,
        "no stale -> fresh event"
    );
    assert_eq!(
        env.events(),
        vec!["node_down:n1:", "node_up:n1:"],
        "alerts other than the node's own"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_node_down_service_stale_then_back_by_itself() -> anyhow::Result<()> {
    let env = start(&[("app", app_service())], plain_node).await?;
    let mut agent = env.spawn_agent()?;
    env.wait_connected().await?;
    env.wait_healthy("app", LIMIT).await?;

    agent.kill().await?;
    let t0 = Instant::now();
    assert_down(&env, t0, "its agent disconnected at").await?;

    let _agent = env.spawn_agent()?;
    assert_back_up(&env).await?;
    env.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_agent_node_down_service_stale_then_back_by_itself() -> anyhow::Result<()> {
    let env = start(&[("app", app_service())], plain_node).await?;
    let agent = env.spawn_agent()?;
    env.wait_connected().await?;
    env.wait_healthy("app", LIMIT).await?;

    agent.signal(Signal::SIGSTOP)?;
    let t0 = Instant::now();
    assert_down(&env, t0, "connected but silent").await?;

    agent.signal(Signal::SIGCONT)?;
    assert_back_up(&env).await?;
    env.shutdown().await;
    Ok(())
}

/// Where the agent started over SSH writes its pid and its output (in the workspace).
const PID_FILE: &str = "agent.pid";
const SSH_AGENT_LOG: &str = "agent-ssh.log";

/// An agent started outside the test's process tree (over SSH) writes its pid here; that
/// process is killed on drop.
struct PidFile {
    path: PathBuf,
    log: PathBuf,
}

impl PidFile {
    /// The pid file and log of the agent that `agent_control.restart` starts in `dir`.
    fn in_dir(dir: &Path) -> PidFile {
        PidFile {
            path: dir.join(PID_FILE),
            log: dir.join(SSH_AGENT_LOG),
        }
    }

    /// The pid in the file if that process runs (not a zombie) and is a `vigil-agent`.
    fn running_agent(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(&self.path)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let zombie = status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'));
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let is_agent = String::from_utf8_lossy(&cmdline).contains("vigil-agent");
        (!zombie && is_agent).then_some(pid)
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Some(pid) = self.running_agent() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        print_tail("agent started over SSH", &self.log, 0);
    }
}

/// The `nodes:` item of `n1` with an `ssh:` block for `port` (the harness sshd's user, key and
/// host key) and an `agent_control` that tells whether the agent named by the pid file in `ws`
/// runs, and starts `vigil-agent --config ws/agent-a.yaml` in the background writing that file.
fn ssh_node(s: &sshd::Sshd, port: u16, ws: &Path) -> anyhow::Result<String> {
    ssh_node_with(s, port, ws, "", "")
}

/// [`ssh_node`] whose restart runs `before` first (a shell snippet) and whose agent_control
/// gets `extra` (YAML lines, indented for agent_control).
fn ssh_node_with(
    s: &sshd::Sshd,
    port: u16,
    ws: &Path,
    before: &str,
    extra: &str,
) -> anyhow::Result<String> {
    let pid = ws.join(PID_FILE).display().to_string();
    let log = ws.join(SSH_AGENT_LOG).display().to_string();
    let check = serde_json::json!([
        "sh",
        "-c",
        format!(
            "p=$(cat {pid}) && kill -0 \"$p\" && ! grep -q '^State:[[:space:]]*Z' /proc/$p/status"
        )
    ]);
    let restart = serde_json::json!([
        "sh",
        "-c",
        format!(
            "{before}setsid sh -c 'echo $$ > {pid}; exec {} --config {}' </dev/null >>{log} 2>&1 &",
            binary("vigil-agent")?.display(),
            ws.join("agent-a.yaml").display(),
        )
    ]);
    Ok(format!(
        "  - name: n1\n    address: 127.0.0.1\n    ssh:\n      port: {port}\n      user: {}\n      key: {}\n\
         \x20     host_key_fingerprint: \"{}\"\n      connect_timeout: 5s\n\
         \x20   agent_control:\n      check: {check}\n      restart: {restart}\n      timeout: 10s\n{extra}",
        s.user,
        s.client_key.display(),
        s.host_fingerprint,
    ))
}

/// A service checked every second by `/bin/true`, without control.
fn plain_service() -> String {
    "id: app\ncategory: api\nnode: n1\ncheck:\n  type: command\n  interval: 1s\n  argv: [\"/bin/true\"]\n"
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_agent_is_restarted_over_ssh_and_the_node_comes_back() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let env = start(&[("app", plain_service())], |ws| {
        ssh_node(&sshd, sshd.port, ws)
    })
    .await?;
    // Declared after env: dropped (the agent killed) before the workspace goes.
    let pids = PidFile::in_dir(env.ws.path());
    let mut agent = env.spawn_agent()?;
    std::fs::write(&pids.path, agent.pid.to_string())?;
    env.wait_connected().await?;
    env.wait_healthy("app", LIMIT).await?;
    let first = agent.pid;

    agent.kill().await?;
    let t0 = Instant::now();
    let down = env
        .wait_alert("node_down", NODE_TIMEOUT + DOWN_SLACK + PASS + HEAL_WAIT)
        .await?;
    eprintln!("killed -> node_down alert: {:?}", t0.elapsed());
    let reason = down["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("its agent disconnected at")
            && reason.contains("was not running and was restarted over SSH"),
        "{down}\nsshd log:\n{}",
        sshd.log()
    );

    let up = env.wait_alert("node_up", LIMIT).await?;
    assert_eq!(up["node"], "n1", "{up}");
    env.wait_healthy("app", LIMIT).await?;
    let restarted = pids
        .running_agent()
        .context("no agent runs under the pid file after the restart")?;
    assert_ne!(
        restarted, first,
        "the pid file still names the killed agent"
    );

    let rows = env
        .client
        .query(
            "SELECT service_id, action, status, origin, via, output FROM commands ORDER BY id",
            &[],
        )
        .await?;
    assert_eq!(rows.len(), 1, "commands: {rows:?}");
    let row = &rows[0];
    let col = |i: usize| row.get::<_, Option<String>>(i).unwrap_or_default();
    assert_eq!(
        [col(0), col(1), col(2), col(3), col(4)],
        ["agent:n1", "restart-agent", "succeeded", "auto", "ssh"].map(String::from),
        "output: {}",
        col(5)
    );
    let view = env.node_view().await?;
    assert_eq!(view["up"], true, "{view}");
    assert!(
        view["events"].as_array().is_some_and(|a| a.iter().any(|e| {
            e["kind"] == "agent_heal"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("restarted"))
        })),
        "{view}"
    );
    assert_eq!(env.alerts_named("node_down").len(), 1, "{:?}", env.events());
    drop(pids);
    env.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_agent_restart_is_tried_again_while_the_node_stays_down() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    // The first restart fails (as when the unit cannot start); the next one, after
    // retry_after, works.
    let env = start(&[("app", plain_service())], |ws| {
        let marker = ws.join("failed-once").display().to_string();
        ssh_node_with(
            &sshd,
            sshd.port,
            ws,
            &format!(
                "if [ ! -e {marker} ]; then touch {marker}; echo cannot start >&2; exit 1; fi; "
            ),
            "      retry_after: 2s\n",
        )
    })
    .await?;
    let pids = PidFile::in_dir(env.ws.path());
    let mut agent = env.spawn_agent()?;
    std::fs::write(&pids.path, agent.pid.to_string())?;
    env.wait_connected().await?;
    env.wait_healthy("app", LIMIT).await?;
    agent.kill().await?;
    let down = env
        .wait_alert("node_down", NODE_TIMEOUT + DOWN_SLACK + PASS + HEAL_WAIT)
        .await?;
    let reason = down["reason"].as_str().unwrap_or("");
    assert!(reason.contains("restarting it over SSH failed"), "{down}");
    env.wait_alert("node_up", LIMIT).await?;
    env.wait_healthy("app", LIMIT).await?;
    let statuses: Vec<String> = env
        .client
        .query(
            "SELECT status FROM commands WHERE action = 'restart-agent' ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(statuses, ["failed", "succeeded"]);
    assert_eq!(env.alerts_named("node_down").len(), 1, "{:?}", env.events());
    drop(pids);
    env.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_agent_on_a_node_unreachable_over_ssh_is_reported_so() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    // Nothing listens on this port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let env = start(&[("app", plain_service())], |ws| {
        ssh_node(&sshd, closed, ws)
    })
    .await?;
    let mut agent = env.spawn_agent()?;
    env.wait_connected().await?;
    env.wait_healthy("app", LIMIT).await?;

    agent.kill().await?;
    let t0 = Instant::now();
    let down = env
        .wait_alert("node_down", NODE_TIMEOUT + DOWN_SLACK + PASS + HEAL_WAIT)
        .await?;
    eprintln!("killed -> node_down alert: {:?}", t0.elapsed());
    let reason = down["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("its agent disconnected at")
            && reason.contains("unreachable over SSH too")
            && reason.contains(&closed.to_string()),
        "{down}"
    );
    assert_eq!(env.commands().await?, 0, "a restart was attempted");
    let view = env.node_view().await?;
    assert_eq!(view["up"], false, "{view}");
    assert!(
        view["events"].as_array().is_some_and(|a| a.iter().any(|e| {
            e["kind"] == "agent_heal"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("unreachable over SSH"))
        })),
        "{view}"
    );
    env.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_agent_found_running_over_ssh_is_not_restarted() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let env = start(&[("app", plain_service())], |ws| {
        ssh_node(&sshd, sshd.port, ws)
    })
    .await?;
    let agent = env.spawn_agent()?;
    std::fs::write(env.ws.path().join(PID_FILE), agent.pid.to_string())?;
    env.wait_connected().await?;
    env.wait_healthy("app", LIMIT).await?;

    agent.signal(Signal::SIGSTOP)?;
    let t0 = Instant::now();
    let down = env
        .wait_alert("node_down", NODE_TIMEOUT + DOWN_SLACK + PASS + HEAL_WAIT)
        .await?;
    eprintln!("frozen -> node_down alert: {:?}", t0.elapsed());
    let reason = down["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("connected but silent") && reason.contains("its agent is running"),
        "{down}\nsshd log:\n{}",
        sshd.log()
    );
    assert_eq!(env.commands().await?, 0, "a running agent was restarted");

    agent.signal(Signal::SIGCONT)?;
    env.wait_alert("node_up", LIMIT).await?;
    env.wait_healthy("app", LIMIT).await?;
    assert_eq!(env.commands().await?, 0, "a running agent was restarted");
    assert_eq!(
        env.events(),
        vec!["node_down:n1:", "node_up:n1:"],
        "alerts other than the node's own"
    );
    env.shutdown().await;
    Ok(())
}

/// A node whose agent is heard from again while the collector is still finding out over SSH
/// what happened to it (a slow `agent_control.check`): its alerts still say down, then up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_back_while_its_agent_is_checked_over_ssh_alerts_down_then_up() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let owned = start(&[("app", plain_service())], |ws| {
        // The check says the agent runs, after 3 s (less than the alert waits for it).
        let node = ssh_node(&sshd, sshd.port, ws)?;
        let (before, rest) = node.split_once("      check: ").context("no check line")?;
        let (_, after) = rest.split_once('\n').context("no end of the check line")?;
        Ok(format!(
            "{before}      check: [\"sh\", \"-c\", \"sleep 3\"]\n{after}"
        ))
    })
    .await?;
    let env = &owned;
    let agent = env.spawn_agent()?;
    env.wait_connected().await?;
    env.wait_healthy("app", LIMIT).await?;

    agent.signal(Signal::SIGSTOP)?;
    wait_for("n1 down", NODE_TIMEOUT + DOWN_SLACK + PASS, || async move {
        let down: bool = env
            .client
            .query_one(
                "SELECT down_since IS NOT NULL FROM nodes WHERE name = 'n1'",
                &[],
            )
            .await?
            .get(0);
        Ok(down.then_some(()))
    })
    .await?;
    // Back at once: heard from before the check over SSH ends.
    agent.signal(Signal::SIGCONT)?;
    wait_for("n1 up again", LIMIT, || async move {
        let up: bool = env
            .client
            .query_one(
                "SELECT down_since IS NULL FROM nodes WHERE name = 'n1'",
                &[],
            )
            .await?
            .get(0);
        Ok(up.then_some(()))
    })
    .await?;
    // Both alerts are due by the time the node_down alert's wait for the check is over.
    wait_for("node_down and node_up alerts", HEAL_WAIT + 2 * PASS, || {
        let n = env.events().len();
        async move { Ok((n >= 2).then_some(())) }
    })
    .await
    .with_context(|| format!("alerts: {:?}", env.events()))?;
    assert_eq!(
        env.events(),
        vec!["node_down:n1:", "node_up:n1:"],
        "alerts out of order"
    );
    owned.shutdown().await;
    Ok(())
}

/// A service whose check runs once an hour: with `stale_after` short it goes stale while its
/// node is up.
fn hourly(id: &str, on_stale: &str, stale_after: &str) -> String {
    format!(
        "id: {id}\ncategory: api\nnode: n1\ncheck:\n  type: command\n  interval: 1h\n  argv: [\"/bin/true\"]\n\
         on_stale: {on_stale}\n{stale_after}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_stale_ignore_sends_nothing_and_alert_sends_stale_then_fresh() -> anyhow::Result<()> {
    // First without a short stale_after: both services get their first result before anything
    // can go stale (the agent's first run waits up to 2 s).
    let env = start(
        &[
            ("quiet", hourly("quiet", "ignore", "")),
            ("loud", hourly("loud", "alert", "")),
        ],
        plain_node,
    )
    .await?;
    let _agent = env.spawn_agent()?;
    env.wait_connected().await?;
    env.wait_healthy("quiet", LIMIT).await?;
    env.wait_healthy("loud", LIMIT).await?;

    // Now 2 s without a result makes them stale; the next run is an hour away.
    env.ws
        .write_service("quiet", &hourly("quiet", "ignore", "stale_after: 2s\n"))?;
    env.ws
        .write_service("loud", &hourly("loud", "alert", "stale_after: 2s\n"))?;
    env.collector
        .reload(&env.ws.path().join("collector.yaml"))
        .await?;
    for id in ["quiet", "loud"] {
        let h = env.wait_stale(id, LIMIT).await?;
        assert_eq!(h["is_healthy"], false, "{h}");
        let reason = h["reason"].as_str().unwrap_or("");
        assert!(
            reason.contains("no result for") && reason.contains("is connected"),
            "{h}"
        );
    }
    let stale = env.wait_alert("stale", LIMIT).await?;
    assert_eq!(stale["service"], "loud", "{stale}");

    // A result arrives for `loud` (a check run now): `fresh`. The notifier sends in order, so
    // by then a `stale` alert for `quiet` (marked stale before) would have arrived too.
    let resp = env
        .http
        .post(env.api("/api/health-check/force/loud?wait=30"))
        .bearer_auth(&env.operator)
        .send()
        .await?;
    let st = resp.status();
    let body = resp.text().await?;
    ensure!(st.is_success(), "force check: {st}: {body}");
    env.wait_alert("fresh", LIMIT).await?;
    assert_eq!(
        env.events(),
        vec!["stale:n1:loud", "fresh:n1:loud"],
        "alerts"
    );
    assert_eq!(env.health("quiet").await?["state"], "stale");
    for (id, to) in [("quiet", "stale"), ("loud", "stale"), ("loud", "fresh")] {
        let n: i64 = env
            .client
            .query_one(
                "SELECT count(*) FROM events WHERE service_id = $1 AND kind = 'stale' AND to_state = $2",
                &[&id, &to],
            )
            .await?
            .get(0);
        assert_eq!(n, 1, "{id}: events to {to}");
    }
    assert_eq!(env.commands().await?, 1, "only the check-now command");
    env.shutdown().await;
    Ok(())
}

/// `check_results` of `n1` from agent outboxes.
async fn stored(env: &Env) -> anyhow::Result<i64> {
    count(
        &env.client,
        "SELECT count(*) FROM check_results WHERE node = $1 AND outbox_epoch <> 0",
        "n1",
    )
    .await
}

/// The agent is stopped twenty times in a row while its checks run, alternately with SIGTERM
/// and SIGKILL, at different points of its stream; its outbox (on disk) survives every stop.
/// Afterwards every seq of the outbox, from 1 on, is stored exactly once and the collector
/// counted no result as lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restarted_twenty_times_loses_no_result() -> anyhow::Result<()> {
    // Checks run at most once a second (the minimum interval): five of them.
    let services: Vec<(String, String)> = (1..=5)
        .map(|i| {
            let id = format!("t{i}");
            let yaml = vigil_tests::true_service(&id, "n1");
            (id, yaml)
        })
        .collect();
    let refs: Vec<(&str, String)> = services
        .iter()
        .map(|(id, y)| (id.as_str(), y.clone()))
        .collect();
    let owned = start(&refs, plain_node).await?;
    let env = &owned;

    for life in 0..20i64 {
        let before = stored(env).await?;
        // Stop at different points of the stream: after 1 to 4 more stored results.
        let more = life % 4 + 1;
        let mut agent = env.spawn_agent()?;
        wait_for(
            &format!("life {life}: {more} more stored result(s)"),
            LIMIT,
            || async move { Ok((stored(env).await? >= before + more).then_some(())) },
        )
        .await?;
        let sig = if life % 2 == 0 {
            Signal::SIGTERM
        } else {
            Signal::SIGKILL
        };
        agent.signal(sig)?;
        let st = agent.exited(LIMIT).await?;
        eprintln!("life {life}: {sig:?} -> {st}");
    }
    // One more life that runs until its backlog is surely in (sent before new results), then
    // a clean stop.
    let before = stored(env).await?;
    let mut agent = env.spawn_agent()?;
    env.wait_connected().await?;
    wait_for("ten more stored results", LIMIT, || async move {
        Ok((stored(env).await? >= before + 10).then_some(()))
    })
    .await?;
    agent.signal(Signal::SIGTERM)?;
    agent.exited(LIMIT).await?;

    let rows = env
        .client
        .query(
            "SELECT outbox_epoch, count(*), min(seq), max(seq), count(DISTINCT seq)
             FROM check_results WHERE node = 'n1' AND outbox_epoch <> 0
             GROUP BY outbox_epoch ORDER BY min(seq)",
            &[],
        )
        .await?;
    ensure!(!rows.is_empty(), "no results stored");
    let mut bad = Vec::new();
    for r in &rows {
        let (epoch, n, lo, hi, distinct): (i64, i64, i64, i64, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        eprintln!("epoch {epoch}: {n} results, seq {lo}..={hi}, {distinct} distinct");
        // A new outbox numbers its results from 1.
        if lo != 1 || n != hi - lo + 1 || n != distinct {
            let missing: Vec<String> = env
                .client
                .query(
                    "SELECT s FROM generate_series($2::bigint, $3::bigint) s
                     WHERE NOT EXISTS (SELECT 1 FROM check_results
                                       WHERE node = 'n1' AND outbox_epoch = $1 AND seq = s)
                     ORDER BY s LIMIT 50",
                    &[&epoch, &1i64, &hi],
                )
                .await?
                .iter()
                .map(|m| m.get::<_, i64>(0).to_string())
                .collect();
            bad.push(format!(
                "epoch {epoch}: {n} results, seq {lo}..={hi} ({} expected from 1), {distinct} distinct; missing: {}",
                hi,
                missing.join(",")
            ));
        }
    }
    let (lost, events): (i64, Vec<String>) = {
        let lost = env
            .client
            .query_one("SELECT results_lost FROM nodes WHERE name = 'n1'", &[])
            .await?
            .get(0);
        let events = env
            .client
            .query(
                "SELECT kind || ': ' || reason FROM node_events
                 WHERE node = 'n1' AND kind IN ('gap', 'dropped', 'refused') ORDER BY id",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        (lost, events)
    };
    assert!(
        bad.is_empty() && lost == 0,
        "holes in the outbox sequence: {bad:#?}\nnodes.results_lost = {lost}\nnode events: {events:#?}"
    );
    owned.shutdown().await;
    Ok(())
}
