//! Agentless nodes and control over SSH, against a real sshd on loopback: a service checked over
//! SSH is restarted over SSH when it fails; a wrong host key is refused; with `via: auto` and the
//! agent stopped, a restart goes over SSH.

use std::time::Duration;

use vigil_collector::{Collector, Config};
use vigil_tests::{Workspace, connected, count, init, pg, sshd, start_agent, state, wait_for};

const LIMIT: Duration = Duration::from_secs(60);

fn node_yaml(name: &str, agent: bool, s: &sshd::Sshd, fingerprint: &str) -> String {
    format!(
        "  - name: {name}\n    address: 127.0.0.1\n    agent: {agent}\n    ssh:\n      port: {}\n      user: {}\n      key: {}\n      host_key_fingerprint: \"{fingerprint}\"\n      connect_timeout: 5s\n",
        s.port,
        s.user,
        s.client_key.display()
    )
}

/// A service checked by `test -f FLAG` and restarted by `touch FLAG`.
fn flag_service(id: &str, node: &str, flag: &std::path::Path, via: &str) -> String {
    let f = flag.display();
    format!(
        "id: {id}\ncategory: api\nnode: {node}\ncheck:\n  type: command\n  interval: 1s\n  timeout: 5s\n  argv: [\"/bin/sh\", \"-c\", \"test -f {f} || exit 2\"]\n\
         control:\n  via: {via}\n  restart: [[\"/bin/touch\", \"{f}\"]]\n  timeout: 10s\n\
         on_failure:\n  action: restart\n  after: 2\n  recover_after: 1\n  grace: 0s\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentless_service_is_checked_and_restarted_over_ssh_and_a_wrong_host_key_is_refused()
-> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    let flag = ws.path().join("edge.up");
    ws.write_service("edge-app", &flag_service("edge-app", "edge", &flag, "ssh"))?;
    ws.write_service(
        "rogue-app",
        &flag_service("rogue-app", "rogue", &ws.path().join("never"), "ssh"),
    )?;
    let wrong = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let yaml = format!(
        "grpc_listen: 127.0.0.1:0\nhttp: {{ listen: 127.0.0.1:0 }}\nmetrics: {{ listen: 127.0.0.1:0 }}\ndatabase: {{ url: \"{}\" }}\n\
         tls: {{ ca: certs/ca.pem, cert: certs/collector.pem, key: certs/collector.key }}\nnodes:\n{}{}",
        db.url,
        node_yaml("edge", false, &sshd, &sshd.host_fingerprint),
        node_yaml("rogue", false, &sshd, wrong),
    );
    std::fs::write(ws.path().join("collector.yaml"), yaml)?;
    let collector = Collector::start(Config::load(&ws.path().join("collector.yaml"))?).await?;
    let client = db.connect().await?;

    // The flag is missing: down, restarted over SSH (touch), healthy.
    wait_for("edge-app healthy after a restart over SSH", LIMIT, || {
        let client = &client;
        async move { Ok((state(client, "edge-app").await? == "healthy").then_some(())) }
    })
    .await?;
    assert!(flag.exists());
    let row = client
        .query_one(
            "SELECT status, via, origin FROM commands WHERE service_id = 'edge-app' ORDER BY id LIMIT 1",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), "succeeded");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("ssh"));
    assert_eq!(row.get::<_, String>(2), "auto");

    // The wrong pinned key: every check fails with a host key error, nothing runs there.
    let message: String = wait_for("a refused rogue check", LIMIT, || {
        let client = &client;
        async move {
            Ok(client
                .query_opt(
                    "SELECT message FROM check_results WHERE service_id = 'rogue-app' LIMIT 1",
                    &[],
                )
                .await?
                .map(|r| r.get(0)))
        }
    })
    .await?;
    assert!(
        message.contains("host key") && message.contains("127.0.0.1"),
        "{message}"
    );
    collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_agent_stopped_an_auto_restart_goes_over_ssh() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    let flag = ws.path().join("app.up");
    std::fs::write(&flag, "")?;
    ws.write_service("app", &flag_service("app", "n1", &flag, "auto"))?;
    let yaml = format!(
        "grpc_listen: 127.0.0.1:0\nhttp: {{ listen: 127.0.0.1:0 }}\nmetrics: {{ listen: 127.0.0.1:0 }}\ndatabase: {{ url: \"{}\" }}\n\
         tls: {{ ca: certs/ca.pem, cert: certs/collector.pem, key: certs/collector.key }}\nnodes:\n{}",
        db.url,
        node_yaml("n1", true, &sshd, &sshd.host_fingerprint),
    );
    std::fs::write(ws.path().join("collector.yaml"), yaml)?;
    let collector = Collector::start(Config::load(&ws.path().join("collector.yaml"))?).await?;
    let agent = start_agent(&ws.write_agent("a", "n1", "n1", collector.grpc_addr)?).await?;
    connected(&agent).await?;
    let client = db.connect().await?;
    wait_for("app healthy", LIMIT, || {
        let client = &client;
        async move { Ok((state(client, "app").await? == "healthy").then_some(())) }
    })
    .await?;
    agent.shutdown().await;
    wait_for("the agent seen as gone", LIMIT, || {
        let hub = &collector.hub;
        async move { Ok(hub.connected_nodes().is_empty().then_some(())) }
    })
    .await?;
    std::fs::remove_file(&flag)?;
    let store = vigil_collector::Store::connect(&db.url, 1).await?;
    let id = store
        .create_command(&vigil_collector::store::NewCommand {
            service_id: "app",
            node: "n1",
            action: "restart",
            origin: "manual",
            requested_by: "test",
            reason: "agent is down",
            deadline: chrono::Utc::now() + chrono::Duration::minutes(5),
        })
        .await?
        .expect("created");
    let row = wait_for("the restart finished", LIMIT, || {
        let store = &store;
        async move { Ok(store.command(id).await?.filter(|c| c.finished_at.is_some())) }
    })
    .await?;
    assert_eq!(row.status, "succeeded", "{}", row.output);
    assert_eq!(row.via.as_deref(), Some("ssh"));
    assert!(flag.exists(), "the restart did not run");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM commands WHERE service_id = $1 AND action <> 'check'",
            "app"
        )
        .await?,
        1
    );
    // The successful restart is verified by a check at once (over SSH too).
    wait_for("the verification check", LIMIT, || {
        let client = &client;
        async move {
            let n = count(
                client,
                "SELECT count(*) FROM commands WHERE service_id = $1 AND action = 'check'
                 AND origin = 'auto' AND status = 'succeeded' AND via = 'ssh'",
                "app",
            )
            .await?;
            Ok((n >= 1).then_some(()))
        }
    })
    .await?;
    collector.shutdown().await;
    Ok(())
}

/// A command whose agent disconnects mid-run is never run again elsewhere (the agent may have
/// started it): it times out at its deadline, also on a node with SSH and `via: auto`; when the
/// agent comes back, its journal reports what it knows (here: outcome unknown, the step was cut
/// off) and both facts are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_agent_disconnects_mid_run_is_resolved() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    ws.issue("n2")?;
    let flag = ws.path().join("slow.done");
    let started = ws.path().join("slow.started");
    let (f, s) = (flag.display(), started.display());
    // Takes a while: long enough to pull the agent away while it runs.
    let slow = |id: &str, node: &str| {
        format!(
            "id: {id}\ncategory: api\nnode: {node}\ncheck:\n  type: command\n  interval: 1h\n  argv: [\"/bin/true\"]\n\
             control:\n  via: auto\n  restart: [[\"/bin/sh\", \"-c\", \"touch {s}; sleep 2; touch {f}\"]]\n  timeout: 30s\n"
        )
    };
    ws.write_service("with-ssh", &slow("with-ssh", "n1"))?;
    ws.write_service("no-ssh", &slow("no-ssh", "n2"))?;
    let yaml = format!(
        "grpc_listen: 127.0.0.1:0\nhttp: {{ listen: 127.0.0.1:0 }}\nmetrics: {{ listen: 127.0.0.1:0 }}\ndatabase: {{ url: \"{}\" }}\n\
         tls: {{ ca: certs/ca.pem, cert: certs/collector.pem, key: certs/collector.key }}\n\
         defaults:\n  command_deadline: 8s\nnodes:\n{}  - {{ name: n2, address: 127.0.0.1 }}\n",
        db.url,
        node_yaml("n1", true, &sshd, &sshd.host_fingerprint),
    );
    std::fs::write(ws.path().join("collector.yaml"), yaml)?;
    let collector = Collector::start(Config::load(&ws.path().join("collector.yaml"))?).await?;
    let store = vigil_collector::Store::connect(&db.url, 1).await?;

    for (service, node) in [("with-ssh", "n1"), ("no-ssh", "n2")] {
        let _ = std::fs::remove_file(&started);
        let _ = std::fs::remove_file(&flag);
        let agent = start_agent(&ws.write_agent(node, node, node, collector.grpc_addr)?).await?;
        connected(&agent).await?;
        let id = store
            .create_command(&vigil_collector::store::NewCommand {
                service_id: service,
                node,
                action: "restart",
                origin: "manual",
                requested_by: "test",
                reason: "test",
                deadline: chrono::Utc::now() + chrono::Duration::seconds(8),
            })
            .await?
            .expect("created");
        wait_for("the agent started the step", LIMIT, || {
            let started = started.clone();
            async move { Ok(started.exists().then_some(())) }
        })
        .await?;
        agent.shutdown().await; // kills the running step
        let row = wait_for("the command resolved", LIMIT, || {
            let store = &store;
            async move { Ok(store.command(id).await?.filter(|c| c.finished_at.is_some())) }
        })
        .await?;
        assert_eq!(
            (row.status.as_str(), row.via.as_deref(), row.attempt),
            ("timed_out", Some("agent"), 1),
            "{service}: {}",
            row.output
        );
        assert!(
            !flag.exists(),
            "{service}: the restart ran to its end somewhere"
        );
        // The agent comes back: its journal says the command was cut off mid-run.
        let agent = start_agent(&ws.write_agent(node, node, node, collector.grpc_addr)?).await?;
        connected(&agent).await?;
        let row = wait_for("the late outcome", LIMIT, || {
            let store = &store;
            async move { Ok(store.command(id).await?.filter(|c| c.late_status.is_some())) }
        })
        .await?;
        assert_eq!(row.status, "timed_out");
        assert_eq!(row.late_status.as_deref(), Some("unknown"), "{row:?}");
        assert!(row.started_at.is_some(), "{row:?}");
        assert!(!flag.exists(), "{service}: run again");
        agent.shutdown().await;
    }
    collector.shutdown().await;
    Ok(())
}

/// A restart over SSH cut off by a collector crash (SIGKILL while the step runs): the next
/// collector does not run it again but records its outcome as unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssh_restart_cut_off_by_a_collector_crash_is_unknown_never_run_twice()
-> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    let runs = ws.path().join("runs");
    let gate = ws.path().join("gate");
    let script = format!(
        "echo run >> {}; while [ ! -e {} ]; do sleep 0.05; done",
        runs.display(),
        gate.display()
    );
    ws.write_service(
        "slow",
        &format!(
            "id: slow\ncategory: api\nnode: edge\ncheck:\n  type: command\n  interval: 1h\n  argv: [\"/bin/true\"]\n\
             control:\n  via: ssh\n  restart: [[\"/bin/sh\", \"-c\", {script:?}]]\n  timeout: 2m\n"
        ),
    )?;
    let yaml = format!(
        "grpc_listen: 127.0.0.1:0\nhttp: {{ listen: 127.0.0.1:0 }}\nmetrics: {{ listen: 127.0.0.1:0 }}\ndatabase: {{ url: \"{}\" }}\n\
         tls: {{ ca: certs/ca.pem, cert: certs/collector.pem, key: certs/collector.key }}\nnodes:\n{}",
        db.url,
        node_yaml("edge", false, &sshd, &sshd.host_fingerprint),
    );
    let config = ws.path().join("collector.yaml");
    std::fs::write(&config, yaml)?;
    /// The collector process, killed (SIGKILL) when dropped.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let spawn = || -> anyhow::Result<Killed> {
        Ok(Killed(
            std::process::Command::new(vigil_tests::binary("vigil-collector")?)
                .arg("serve")
                .arg("--config")
                .arg(&config)
                .env("RUST_LOG", "warn")
                .spawn()?,
        ))
    };
    let first = spawn()?;
    let store = vigil_collector::Store::connect(&db.url, 1).await?;
    let id = store
        .create_command(&vigil_collector::store::NewCommand {
            service_id: "slow",
            node: "edge",
            action: "restart",
            origin: "manual",
            requested_by: "test",
            reason: "test",
            deadline: chrono::Utc::now() + chrono::Duration::minutes(5),
        })
        .await?
        .expect("created");
    let lines = || {
        std::fs::read_to_string(&runs)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    wait_for("the step running over SSH", LIMIT, || async {
        Ok((lines() >= 1).then_some(()))
    })
    .await?;
    drop(first); // SIGKILL
    let second = spawn()?;
    let row = wait_for("the command closed", LIMIT, || {
        let store = &store;
        async move { Ok(store.command(id).await?.filter(|c| c.finished_at.is_some())) }
    })
    .await?;
    assert_eq!(
        (row.status.as_str(), row.via.as_deref()),
        ("unknown", Some("ssh")),
        "{row:?}"
    );
    assert!(row.output.contains("not run again"), "{}", row.output);
    std::fs::write(&gate, "")?;
    // Another restart of the collector: still nothing runs it again (an operator's new
    // request is a new command, and it does run).
    drop(second);
    let third = spawn()?;
    let again = store
        .create_command(&vigil_collector::store::NewCommand {
            service_id: "slow",
            node: "edge",
            action: "restart",
            origin: "manual",
            requested_by: "test",
            reason: "a new request",
            deadline: chrono::Utc::now() + chrono::Duration::minutes(5),
        })
        .await?
        .expect("created");
    let row = wait_for("the new command's outcome", LIMIT, || {
        let store = &store;
        async move {
            Ok(store
                .command(again)
                .await?
                .filter(|c| c.finished_at.is_some()))
        }
    })
    .await?;
    assert_eq!(row.status, "succeeded", "{}", row.output);
    assert_eq!(lines(), 2, "one run per command id");
    drop(third);
    Ok(())
}

/// A plugin run over SSH is judged by the same rule as one an agent runs: exit 5 (not a plugin
/// code) is UNKNOWN and the message says "exit code 5".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_over_ssh_follows_the_agents_exit_code_rule() -> anyhow::Result<()> {
    init();
    let sshd = sshd::start().await?;
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.write_service(
        "odd",
        "id: odd\ncategory: api\nnode: edge\ncheck:\n  type: command\n  interval: 1s\n  argv: [\"/bin/sh\", \"-c\", \"echo 'weird | x=1'; exit 5\"]\n",
    )?;
    let yaml = format!(
        "grpc_listen: 127.0.0.1:0\nhttp: {{ listen: 127.0.0.1:0 }}\nmetrics: {{ listen: 127.0.0.1:0 }}\ndatabase: {{ url: \"{}\" }}\n\
         tls: {{ ca: certs/ca.pem, cert: certs/collector.pem, key: certs/collector.key }}\nnodes:\n{}",
        db.url,
        node_yaml("edge", false, &sshd, &sshd.host_fingerprint),
    );
    std::fs::write(ws.path().join("collector.yaml"), yaml)?;
    let collector = Collector::start(Config::load(&ws.path().join("collector.yaml"))?).await?;
    let client = db.connect().await?;
    let (status, message): (i16, String) = wait_for("a result of odd", LIMIT, || {
        let client = &client;
        async move {
            Ok(client
                .query_opt(
                    "SELECT status, message FROM check_results WHERE service_id = 'odd' LIMIT 1",
                    &[],
                )
                .await?
                .map(|r| (r.get(0), r.get(1))))
        }
    })
    .await?;
    assert_eq!(status, 3, "UNKNOWN");
    assert_eq!(message, "exit code 5: weird");
    collector.shutdown().await;
    Ok(())
}
