//! A command runs at most once per id, whatever dies when: real `vigil-collector` and
//! `vigil-agent` processes, a real PostgreSQL, and a restart whose control step appends one line
//! to a file per run and then waits for a gate file (so the test decides when it ends). The
//! collector is killed (SIGKILL) or frozen (SIGSTOP) at each step of a restart, the agent is
//! killed while it runs or frozen when the restart is sent, the service is paused while its
//! automatic restart is in flight; every time the step ran exactly once and the stored outcome
//! says what happened. A last collector restart at the end of each test (the agent reconnects
//! and is sent the open commands again) proves nothing runs a second time later.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use vigil_collector::store::{CommandRow, NewCommand};
use vigil_tests::{Workspace, binary, init, pg, wait_for};

const LIMIT: Duration = Duration::from_secs(45);

/// A process started by the test (killed on drop; its log's tail is printed then).
struct Proc {
    name: &'static str,
    child: tokio::process::Child,
    pid: i32,
    log: PathBuf,
    log_from: u64,
}

impl Proc {
    fn spawn(name: &'static str, args: &[&str], config: &Path, log: &Path) -> anyhow::Result<Proc> {
        let out = OpenOptions::new().create(true).append(true).open(log)?;
        let log_from = out.metadata()?.len();
        let child = tokio::process::Command::new(binary(name)?)
            .args(args)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        let pid = i32::try_from(child.id().context("no pid")?)?;
        Ok(Proc {
            name,
            child,
            pid,
            log: log.to_path_buf(),
            log_from,
        })
    }

    fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        kill(Pid::from_raw(self.pid), sig).with_context(|| format!("kill -{sig} {}", self.pid))
    }

    /// SIGKILL, and reaps it.
    async fn kill9(mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGKILL)?;
        tokio::time::timeout(LIMIT, self.child.wait())
            .await
            .context("still running after SIGKILL")??;
        Ok(())
    }

    /// What it logged since it started.
    fn logged(&self) -> String {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        let from = usize::try_from(self.log_from)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        String::from_utf8_lossy(&bytes[from..]).into_owned()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let text = self.logged();
        let lines: Vec<&str> = text.lines().collect();
        let first = lines.len().saturating_sub(30);
        eprintln!(
            "--- {} {} (last lines) ---\n{}",
            self.name,
            self.pid,
            lines[first..].join("\n")
        );
    }
}

/// A collector and an agent on one node `n1` with one service `app` whose restart is gated.
struct Rig {
    ws: Workspace,
    /// Kept for the test's length (the database goes with it).
    _db: pg::TestDb,
    client: tokio_postgres::Client,
    store: vigil_collector::Store,
    collector_yaml: PathBuf,
    agent_yaml: PathBuf,
    /// One line per run of the restart step.
    runs: PathBuf,
    /// The restart step ends once this exists.
    gate: PathBuf,
}

impl Rig {
    async fn new() -> anyhow::Result<Rig> {
        init();
        let db = pg::test_db().await?;
        let ws = Workspace::new()?;
        ws.issue("n1")?;
        let runs = ws.path().join("runs");
        let gate = ws.path().join("gate");
        let script = format!(
            "echo run >> {}; while [ ! -e {} ]; do sleep 0.05; done; echo restarted",
            runs.display(),
            gate.display()
        );
        // Checked every hour: only commands run here, and no failure makes an automatic
        // restart of its own.
        ws.write_service(
            "app",
            &format!(
                "id: app\ncategory: api\nnode: n1\ncheck:\n  type: command\n  interval: 1h\n  argv: [\"/bin/true\"]\n\
                 control:\n  restart: [[\"/bin/sh\", \"-c\", {script:?}]]\n  timeout: 2m\n"
            ),
        )?;
        // A fixed port, so that the agent finds each new collector process where the last was.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let collector_yaml = ws.path().join("collector.yaml");
        std::fs::write(
            &collector_yaml,
            format!(
                "grpc_listen: 127.0.0.1:{port}\nhttp: {{ listen: 127.0.0.1:0 }}\nmetrics: {{ listen: 127.0.0.1:0 }}\n\
                 database: {{ url: \"{}\", pool_size: 4 }}\n\
                 tls: {{ ca: certs/ca.pem, cert: certs/collector.pem, key: certs/collector.key }}\n\
                 services_dir: services\ndefaults:\n  command_deadline: 5m\n\
                 nodes:\n  - {{ name: n1, address: 127.0.0.1 }}\n",
                db.url
            ),
        )?;
        let agent_yaml = ws.write_agent(
            "a",
            "n1",
            "n1",
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        )?;
        let client = db.connect().await?;
        let store = vigil_collector::Store::connect(&db.url, 1).await?;
        Ok(Rig {
            ws,
            _db: db,
            client,
            store,
            collector_yaml,
            agent_yaml,
            runs,
            gate,
        })
    }

    fn collector(&self) -> anyhow::Result<Proc> {
        Proc::spawn(
            "vigil-collector",
            &["serve"],
            &self.collector_yaml,
            &self.ws.path().join("collector.log"),
        )
    }

    fn agent(&self) -> anyhow::Result<Proc> {
        Proc::spawn(
            "vigil-agent",
            &[],
            &self.agent_yaml,
            &self.ws.path().join("agent.log"),
        )
    }

    /// Starts the collector and the agent; returns them once the agent is connected.
    async fn up(&self) -> anyhow::Result<(Proc, Proc)> {
        let collector = self.collector()?;
        let t0 = Utc::now();
        let agent = self.agent()?;
        self.connected_since(t0).await?;
        Ok((collector, agent))
    }

    /// Waits until the agent has said Hello to a collector after `since`.
    async fn connected_since(&self, since: DateTime<Utc>) -> anyhow::Result<()> {
        wait_for("the agent connected", LIMIT, || async move {
            let row = self
                .client
                .query_opt(
                    "SELECT 1 FROM nodes WHERE name = 'n1' AND agent_connected AND connected_at > $1",
                    &[&since],
                )
                .await?;
            Ok(row.map(|_| ()))
        })
        .await
    }

    /// A restart of `app` as an operator (or remediation, `origin`) asks for it.
    async fn request(&self, origin: &str) -> anyhow::Result<i64> {
        self.store
            .create_command(&NewCommand {
                service_id: "app",
                node: "n1",
                action: "restart",
                origin,
                requested_by: "test",
                reason: "test",
                deadline: Utc::now() + chrono::Duration::minutes(5),
            })
            .await?
            .context("a restart is already in flight")
    }

    fn runs(&self) -> usize {
        std::fs::read_to_string(&self.runs)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    async fn running(&self) -> anyhow::Result<()> {
        wait_for("the restart step running", LIMIT, || async move {
            Ok((self.runs() >= 1).then_some(()))
        })
        .await
    }

    async fn command(&self, id: i64) -> anyhow::Result<CommandRow> {
        self.store.command(id).await?.context("no such command")
    }

    async fn finished(&self, id: i64) -> anyhow::Result<CommandRow> {
        wait_for("the command's outcome", LIMIT, || async move {
            Ok(self
                .store
                .command(id)
                .await?
                .filter(|c| c.finished_at.is_some()))
        })
        .await
    }

    fn open_gate(&self) -> anyhow::Result<()> {
        std::fs::write(&self.gate, "")?;
        Ok(())
    }

    /// One more collector restart after everything settled: the agent reconnects (and is sent
    /// every open command again); then the step has still run exactly once.
    async fn settle(&self, collector: Proc) -> anyhow::Result<Proc> {
        collector.kill9().await?;
        let since = Utc::now();
        let collector = self.collector()?;
        self.connected_since(since).await?;
        // The resends (if any) went out with the reconnection; a check-now sent after them is
        // answered after them on the same stream.
        let probe = self
            .store
            .create_command(&NewCommand {
                service_id: "app",
                node: "n1",
                action: "check",
                origin: "manual",
                requested_by: "test",
                reason: "probe",
                deadline: Utc::now() + chrono::Duration::minutes(1),
            })
            .await?
            .context("probe")?;
        let p = self.finished(probe).await?;
        assert_eq!(p.status, "succeeded", "{}", p.output);
        assert_eq!(self.runs(), 1, "the restart step ran again");
        Ok(collector)
    }
}

/// The collector is killed right after the command row is written (here: the row is written
/// while no collector runs, as the API or `ctl` does): the next collector sends it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_killed_after_the_row_is_written() -> anyhow::Result<()> {
    let rig = Rig::new().await?;
    let (collector, _agent) = rig.up().await?;
    collector.kill9().await?;
    let id = rig.request("auto").await?;
    rig.open_gate()?;
    let since = Utc::now();
    let collector = rig.collector()?;
    rig.connected_since(since).await?;
    let row = rig.finished(id).await?;
    assert_eq!(
        (row.status.as_str(), row.attempt),
        ("succeeded", 1),
        "{row:?}"
    );
    assert_eq!(rig.runs(), 1);
    rig.settle(collector).await?;
    Ok(())
}

/// The collector is killed after it sent the command to a frozen agent (which could not act on
/// it yet): the agent resumes, reconnects to the next collector, and the step runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_killed_after_it_sent_the_command() -> anyhow::Result<()> {
    let rig = Rig::new().await?;
    let (collector, agent) = rig.up().await?;
    rig.open_gate()?;
    agent.signal(Signal::SIGSTOP)?;
    let id = rig.request("manual").await?;
    wait_for("the command sent", LIMIT, || async {
        Ok((rig.command(id).await?.status == "sent").then_some(()))
    })
    .await?;
    collector.kill9().await?;
    agent.signal(Signal::SIGCONT)?;
    let since = Utc::now();
    let collector = rig.collector()?;
    rig.connected_since(since).await?;
    let row = rig.finished(id).await?;
    assert_eq!(row.status, "succeeded", "{row:?}");
    assert_eq!(rig.runs(), 1);
    rig.settle(collector).await?;
    Ok(())
}

/// The collector is killed while the step runs: the next collector sends the command again, the
/// agent answers "still running" from its journal, and the outcome follows when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_killed_while_the_command_runs() -> anyhow::Result<()> {
    let rig = Rig::new().await?;
    let (collector, agent) = rig.up().await?;
    let id = rig.request("manual").await?;
    rig.running().await?;
    collector.kill9().await?;
    let since = Utc::now();
    let collector = rig.collector()?;
    rig.connected_since(since).await?;
    wait_for("the agent's answer: still running", LIMIT, || async {
        Ok(agent
            .logged()
            .contains("command sent again: answered from the journal")
            .then_some(()))
    })
    .await?;
    assert_eq!(rig.command(id).await?.status, "sent");
    rig.open_gate()?;
    let row = rig.finished(id).await?;
    assert_eq!(
        (row.status.as_str(), row.attempt),
        ("succeeded", 2),
        "{row:?}"
    );
    assert!(row.output.contains("restarted"), "{}", row.output);
    assert!(row.started_at.is_some());
    assert_eq!(rig.runs(), 1);
    rig.settle(collector).await?;
    Ok(())
}

/// The step ends while the collector is frozen and the collector is killed before it stored the
/// outcome: the agent keeps the outcome in its journal and delivers it to the next collector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_killed_after_the_command_finished_before_the_outcome_is_stored()
-> anyhow::Result<()> {
    let rig = Rig::new().await?;
    let (collector, agent) = rig.up().await?;
    let id = rig.request("manual").await?;
    rig.running().await?;
    collector.signal(Signal::SIGSTOP)?;
    rig.open_gate()?;
    wait_for("the agent done with the command", LIMIT, || async {
        Ok(agent.logged().contains("command done").then_some(()))
    })
    .await?;
    collector.kill9().await?;
    assert_eq!(
        rig.command(id).await?.status,
        "sent",
        "stored before the kill"
    );
    let since = Utc::now();
    let collector = rig.collector()?;
    rig.connected_since(since).await?;
    let row = rig.finished(id).await?;
    assert_eq!(row.status, "succeeded", "{row:?}");
    assert!(row.output.contains("restarted"), "{}", row.output);
    assert_eq!(rig.runs(), 1);
    rig.settle(collector).await?;
    Ok(())
}

/// The agent is killed while the step runs (the step itself goes on, orphaned, and ends): the
/// restarted agent does not run it again and reports its outcome as unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_while_the_command_runs() -> anyhow::Result<()> {
    let rig = Rig::new().await?;
    let (collector, agent) = rig.up().await?;
    let id = rig.request("manual").await?;
    rig.running().await?;
    agent.kill9().await?;
    rig.open_gate()?;
    let since = Utc::now();
    let _agent = rig.agent()?;
    rig.connected_since(since).await?;
    let row = rig.finished(id).await?;
    assert_eq!(row.status, "unknown", "{row:?}");
    assert!(row.output.contains("outcome unknown"), "{}", row.output);
    assert_eq!(rig.runs(), 1);
    rig.settle(collector).await?;
    Ok(())
}

/// An automatic restart is in flight, the collector stops, an operator pauses the service, the
/// collector starts again: the restart is not sent again but cancelled (with an event), and
/// what the agent reports later is kept beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_during_an_automatic_restart_in_flight_is_not_run_again() -> anyhow::Result<()> {
    let rig = Rig::new().await?;
    let (collector, _agent) = rig.up().await?;
    let id = rig.request("auto").await?;
    rig.running().await?;
    collector.kill9().await?;
    rig.store
        .set_mode("app", "paused", None, "paused by test")
        .await?;
    let since = Utc::now();
    let collector = rig.collector()?;
    rig.connected_since(since).await?;
    let row = rig.finished(id).await?;
    assert_eq!(row.status, "cancelled", "{row:?}");
    assert!(row.output.contains("paused"), "{}", row.output);
    let events: i64 = rig
        .client
        .query_one(
            "SELECT count(*) FROM events WHERE service_id = 'app' AND kind = 'remediation'
             AND to_state = 'cancelled'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(events, 1);
    // It was running already: it ends, and its outcome is recorded as reported late.
    rig.open_gate()?;
    let row = wait_for("the late outcome", LIMIT, || async {
        Ok(rig
            .store
            .command(id)
            .await?
            .filter(|c| c.late_status.is_some()))
    })
    .await?;
    assert_eq!(
        (row.status.as_str(), row.late_status.as_deref()),
        ("cancelled", Some("succeeded")),
        "{row:?}"
    );
    assert_eq!(rig.runs(), 1);
    rig.settle(collector).await?;
    Ok(())
}

/// A restart requested while the agent is frozen (SIGSTOP) runs once, soon after it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_due_while_the_agent_is_frozen_runs_once_after_it_resumes() -> anyhow::Result<()> {
    let rig = Rig::new().await?;
    let (collector, agent) = rig.up().await?;
    rig.open_gate()?;
    agent.signal(Signal::SIGSTOP)?;
    let id = rig.request("manual").await?;
    wait_for("the command sent", LIMIT, || async {
        Ok((rig.command(id).await?.status == "sent").then_some(()))
    })
    .await?;
    assert_eq!(rig.runs(), 0);
    let resumed = Instant::now();
    agent.signal(Signal::SIGCONT)?;
    let row = rig.finished(id).await?;
    eprintln!(
        "restart outcome stored {:?} after the agent resumed",
        resumed.elapsed()
    );
    assert_eq!(row.status, "succeeded", "{row:?}");
    assert_eq!(rig.runs(), 1);
    rig.settle(collector).await?;
    Ok(())
}
