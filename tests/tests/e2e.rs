//! End-to-end: a real PostgreSQL, the real collector and agents in-process on 127.0.0.1:0 over
//! mutual TLS, and a real HTTP service to check.

use std::time::Duration;

use anyhow::Context;
use vigil_agent::ConnState;
use vigil_collector::{Collector, Config};
use vigil_tests::{
    Workspace, connected, count, init, pg, repo_config_dir, start_agent, state, testsvc,
    true_service, wait_for,
};

const LIMIT: Duration = Duration::from_secs(30);

async fn start_collector(
    ws: &Workspace,
    db: &pg::TestDb,
    nodes: &[&str],
) -> anyhow::Result<Collector> {
    let path = ws.write_collector(&db.url, nodes)?;
    Ok(Collector::start(Config::load(&path)?).await?)
}

/// (rows, distinct seqs, min seq, max seq) stored for node n1's outbox `epoch`.
async fn stored(
    client: &tokio_postgres::Client,
    epoch: i64,
) -> anyhow::Result<(i64, i64, i64, i64)> {
    let r = client
        .query_one(
            "SELECT count(*), count(DISTINCT seq), COALESCE(min(seq), 0), COALESCE(max(seq), 0)
             FROM check_results WHERE node = 'n1' AND outbox_epoch = $1",
            &[&epoch],
        )
        .await?;
    Ok((r.get(0), r.get(1), r.get(2), r.get(3)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_multipart_and_command_results_arrive_in_postgres() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let svc = testsvc::spawn("127.0.0.1:0".parse()?).await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    ws.add_file("data/test.pdf", &repo_config_dir().join("data/test.pdf"))?;
    ws.write_service(
        "web",
        &format!(
            "id: web\ncategory: web\nnode: n1\ncheck:\n  type: http\n  interval: 1s\n  timeout: 5s\n  request:\n    url: {}\n  expect:\n    status: [200]\n    body_contains: [\"ok\"]\n",
            svc.url("/health")
        ),
    )?;
    ws.write_service(
        "ocr",
        &format!(
            "id: ocr\ncategory: api\nnode: n1\ncheck:\n  type: http\n  interval: 1s\n  timeout: 5s\n  request:\n    method: POST\n    url: {}\n    multipart:\n      - {{ field: files, file: data/test.pdf, content_type: application/pdf }}\n  expect:\n    status: [200]\n    body_contains: [md_content]\n    json:\n      - {{ path: \"$.results\", exists: true }}\n",
            svc.url("/file_parse")
        ),
    )?;
    ws.write_service(
        "cmd",
        "id: cmd\ncategory: system\nnode: n1\ncheck:\n  type: command\n  interval: 1s\n  timeout: 5s\n  argv: [\"/bin/sh\", \"-c\", \"echo 'DISK WARNING - 91% used | used=91%;80;90;0;100'; exit 1\"]\n",
    )?;
    let collector = start_collector(&ws, &db, &["n1"]).await?;
    let agent = start_agent(&ws.write_agent("a", "n1", "n1", collector.grpc_addr)?).await?;
    connected(&agent).await?;

    let client = db.connect().await?;
    for service in ["web", "ocr", "cmd"] {
        wait_for(&format!("a result of {service}"), LIMIT, || {
            let client = &client;
            async move {
                let n = count(
                    client,
                    "SELECT count(*) FROM check_results WHERE service_id = $1",
                    service,
                )
                .await?;
                Ok((n > 0).then_some(()))
            }
        })
        .await?;
    }
    // The upload check really uploaded the PDF and its answer passed: OK, not just stored.
    let row = client
        .query_one(
            "SELECT status, message FROM check_results WHERE service_id = 'ocr' ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .await?;
    let (status, message): (i16, String) = (row.get(0), row.get(1));
    assert_eq!(status, 0, "ocr check failed: {message}");
    let web: i16 = client
        .query_one(
            "SELECT status FROM check_results WHERE service_id = 'web' LIMIT 1",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(web, 0);
    // The command's exit code 1 is WARNING; its message and perfdata are kept.
    let row = client
        .query_one(
            "SELECT status, message, metrics FROM check_results WHERE service_id = 'cmd' LIMIT 1",
            &[],
        )
        .await?;
    let (status, message, metrics): (i16, String, serde_json::Value) =
        (row.get(0), row.get(1), row.get(2));
    assert_eq!(status, 1);
    assert!(message.starts_with("DISK WARNING - 91% used"), "{message}");
    assert_eq!(metrics[0]["label"], "used");
    assert_eq!(metrics[0]["value"], 91.0);
    assert_eq!(metrics[0]["unit"], "%");
    // WARNING counts as up: the service is healthy.
    assert_eq!(state(&client, "cmd").await?, "healthy");
    // The node is recorded as connected with what the agent reported.
    let row = client
        .query_one(
            "SELECT agent_connected, agent_version FROM nodes WHERE name = 'n1'",
            &[],
        )
        .await?;
    assert!(row.get::<_, bool>(0));
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );

    agent.shutdown().await;
    collector.shutdown().await;
    svc.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_service_goes_down_after_threshold_and_recovers_after_recovery_threshold()
-> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let svc = testsvc::spawn("127.0.0.1:0".parse()?).await?;
    let addr = svc.addr;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    ws.write_service(
        "api",
        &format!(
            "id: api\ncategory: api\nnode: n1\ncheck:\n  type: http\n  interval: 1s\n  timeout: 2s\n  request:\n    url: {}\non_failure:\n  after: 3\n  recover_after: 2\n",
            svc.url("/health")
        ),
    )?;
    let collector = start_collector(&ws, &db, &["n1"]).await?;
    let agent = start_agent(&ws.write_agent("a", "n1", "n1", collector.grpc_addr)?).await?;
    connected(&agent).await?;
    let client = db.connect().await?;
    let state_is = |want: &'static str| {
        let client = &client;
        move || async move { Ok((state(client, "api").await? == want).then_some(())) }
    };
    wait_for("api healthy", LIMIT, state_is("healthy")).await?;

    svc.stop().await;
    wait_for("api down", LIMIT, state_is("down")).await?;
    let events: Vec<(String, String, String)> = client
        .query(
            "SELECT from_state, to_state, reason FROM events WHERE service_id = 'api' ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let path: Vec<(&str, &str)> = events
        .iter()
        .map(|(f, t, _)| (f.as_str(), t.as_str()))
        .collect();
    assert_eq!(
        path,
        vec![
            ("unknown", "healthy"),
            ("healthy", "failing"),
            ("failing", "down")
        ],
        "{events:?}"
    );
    assert!(
        events[2].2.starts_with("3 consecutive failures"),
        "{}",
        events[2].2
    );
    // Exactly `after` failures had been stored when it went down.
    let row = client
        .query_one(
            "SELECT consecutive_failures, last_error FROM service_state WHERE service_id = 'api'",
            &[],
        )
        .await?;
    assert!(row.get::<_, i32>(0) >= 3);
    assert!(row.get::<_, Option<String>>(1).is_some());

    let svc = testsvc::spawn(addr)
        .await
        .context("restart the service on its port")?;
    wait_for("api healthy again", LIMIT, state_is("healthy")).await?;
    let last: String = client
        .query_one(
            "SELECT from_state || '->' || to_state || ': ' || reason FROM events WHERE service_id = 'api' ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        last,
        "down->healthy: 2 consecutive successes (recover_after 2)"
    );

    // The status CLI's query sees the same.
    let store = vigil_collector::Store::connect(&db.url, 1).await?;
    let rows = store.status().await?;
    let api = rows
        .iter()
        .find(|r| r.service_id == "api")
        .expect("api in status");
    assert_eq!(api.state, "healthy");
    assert!(
        api.failures_24h >= 3 && api.checks_24h > api.failures_24h,
        "{api:?}"
    );

    agent.shutdown().await;
    collector.shutdown().await;
    svc.stop().await;
    Ok(())
}

/// Checks run on while the collector is away; after an agent restart and the collector's
/// return, every result is stored exactly once, with no gap in the sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_lost_nothing_doubled_across_collector_outage_and_agent_restart()
-> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    ws.write_service("tick", &true_service("tick", "n1"))?;
    let collector = start_collector(&ws, &db, &["n1"]).await?;
    let listen = collector.grpc_addr;
    let agent_yaml = ws.write_agent("a", "n1", "n1", listen)?;
    let agent = start_agent(&agent_yaml).await?;
    connected(&agent).await?;
    let epoch = agent.outbox_epoch() as i64;
    let client = db.connect().await?;
    wait_for("first results stored", LIMIT, || async {
        Ok((stored(&client, epoch).await?.0 >= 2).then_some(()))
    })
    .await?;

    // The collector goes away; the agent keeps checking into its outbox.
    collector.shutdown().await;
    wait_for("results piling up in the outbox", LIMIT, || async {
        Ok((agent.outbox_len().await >= 3).then_some(()))
    })
    .await?;
    // The agent restarts while the collector is still away: it runs its cached checks.
    agent.shutdown().await;
    let agent = start_agent(&agent_yaml).await?;
    assert_eq!(
        agent.outbox_epoch() as i64,
        epoch,
        "outbox identity survives a restart"
    );
    let before = agent.outbox_len().await;
    wait_for(
        "cached checks running without the collector",
        LIMIT,
        || async { Ok((agent.outbox_len().await > before).then_some(())) },
    )
    .await?;

    // The collector returns on the same address; the agent drains its outbox.
    let collector = Collector::start(Config::load(&ws.path().join("collector.yaml")).map(
        |mut c| {
            c.grpc_listen = listen;
            c
        },
    )?)
    .await?;
    connected(&agent).await?;
    wait_for("outbox drained", LIMIT, || async {
        Ok((agent.outbox_len().await == 0).then_some(()))
    })
    .await?;
    let (n, distinct, min, max) = stored(&client, epoch).await?;
    assert_eq!(n, distinct, "a result was stored twice");
    assert_eq!(min, 1);
    assert_eq!(max - min + 1, n, "a gap in the sequence: a result was lost");
    assert!(n >= 6, "{n}");

    agent.shutdown().await;
    collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_claiming_another_node_than_its_certificate_is_refused() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("node-a")?;
    ws.write_service("b-check", &true_service("b-check", "node-b"))?;
    let collector = start_collector(&ws, &db, &["node-a", "node-b"]).await?;
    // Certificate for node-a, claiming node-b.
    let agent = start_agent(&ws.write_agent("x", "node-b", "node-a", collector.grpc_addr)?).await?;
    let mut st = agent.state();
    let reason = wait_for("refusal", LIMIT, || {
        let s = st.borrow_and_update().clone();
        async move {
            match s {
                ConnState::Refused { reason } => Ok(Some(reason)),
                ConnState::Connected { .. } => {
                    anyhow::bail!("an agent claiming another node was accepted")
                }
                _ => Ok(None),
            }
        }
    })
    .await?;
    assert!(
        reason.contains("node-a") && reason.contains("node-b"),
        "{reason}"
    );
    let client = db.connect().await?;
    let n: i64 = client
        .query_one("SELECT count(*) FROM check_results", &[])
        .await?
        .get(0);
    assert_eq!(n, 0);
    let connected: bool = client
        .query_one(
            "SELECT agent_connected FROM nodes WHERE name = 'node-b'",
            &[],
        )
        .await?
        .get(0);
    assert!(!connected);
    agent.shutdown().await;
    collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_with_certificate_from_another_ca_is_refused() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.write_service("c", &true_service("c", "n1"))?;
    // A certificate for n1 from a CA the collector does not know.
    let rogue = Workspace::new()?;
    rogue.issue("n1")?;
    for f in ["n1.pem", "n1.key"] {
        std::fs::copy(rogue.certs().join(f), ws.certs().join(f))?;
    }
    let collector = start_collector(&ws, &db, &["n1"]).await?;
    let agent = start_agent(&ws.write_agent("r", "n1", "n1", collector.grpc_addr)?).await?;
    let mut st = agent.state();
    let reason = wait_for("a failed attempt", LIMIT, || {
        let s = st.borrow_and_update().clone();
        async move {
            match s {
                ConnState::Connected { .. } => {
                    anyhow::bail!("an agent with a foreign certificate was accepted")
                }
                ConnState::Refused { reason } | ConnState::Disconnected { reason } => {
                    Ok(Some(reason))
                }
                ConnState::Connecting => Ok(None),
            }
        }
    })
    .await?;
    eprintln!("agent saw: {reason}");
    let client = db.connect().await?;
    let n: i64 = client
        .query_one("SELECT count(*) FROM check_results", &[])
        .await?
        .get(0);
    assert_eq!(n, 0);
    agent.shutdown().await;
    collector.shutdown().await;
    Ok(())
}
