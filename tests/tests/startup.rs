//! Bad input at start-up and on reload: a clear error naming what is wrong, never a panic, and a
//! bad reload leaves the running config in force.

use std::time::Duration;

use vigil_collector::{Collector, CollectorError, Config};
use vigil_tests::{Workspace, connected, count, init, pg, start_agent, true_service, wait_for};

#[tokio::test]
async fn dead_postgres_at_startup_is_a_clear_error() -> anyhow::Result<()> {
    init();
    let ws = Workspace::new()?;
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let path = ws.write_collector(&format!("postgres://vigil@127.0.0.1:{port}/vigil"), &["n1"])?;
    let err = match Collector::start(Config::load(&path)?).await {
        Ok(_) => anyhow::bail!("started without a database"),
        Err(e) => e,
    };
    let text = err.to_string();
    assert!(matches!(err, CollectorError::Store(_)), "{text}");
    assert!(
        text.contains(&format!(
            "cannot connect to PostgreSQL at 127.0.0.1:{port}/vigil"
        )),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn unreadable_certificate_is_named() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    std::fs::remove_file(ws.certs().join("collector.key"))?;
    let path = ws.write_collector(&db.url, &["n1"])?;
    let err = match Collector::start(Config::load(&path)?).await {
        Ok(_) => anyhow::bail!("started without its key"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("collector.key") && err.contains("cannot read"),
        "{err}"
    );
    // A key file that holds no key.
    std::fs::write(ws.certs().join("collector.key"), "not a key\n")?;
    let err = match Collector::start(Config::load(&path)?).await {
        Ok(_) => anyhow::bail!("started with a garbage key"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("collector.key") && err.contains("no private key"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_pushes_new_checks_and_a_bad_reload_keeps_the_running_config() -> anyhow::Result<()>
{
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    ws.write_service("tick", &true_service("tick", "n1"))?;
    let path = ws.write_collector(&db.url, &["n1"])?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let agent = start_agent(&ws.write_agent("a", "n1", "n1", collector.grpc_addr)?).await?;
    connected(&agent).await?;
    let v1 = agent.config_version().await;

    // A broken service file: the reload fails with its name and line; nothing changes.
    ws.write_service("broken", "id: broken\ncategory: system\nnode: n1\ncheck:\n  type: command\n  argv: [\"/bin/true\"]\n  colour: red\n")?;
    let err = collector
        .reload(&path)
        .await
        .expect_err("a bad config must not load")
        .to_string();
    assert!(
        err.contains("broken.yaml:") && err.contains("colour"),
        "{err}"
    );
    assert_eq!(collector.hub.config().await.services.len(), 1);
    std::fs::remove_file(ws.path().join("services/broken.yaml"))?;

    // A good new service: pushed to the connected agent, which runs it at once.
    ws.write_service("tock", &true_service("tock", "n1"))?;
    collector.reload(&path).await?;
    let client = db.connect().await?;
    const SQL: &str = "SELECT count(*) FROM check_results WHERE service_id = $1";
    wait_for(
        "a result of the new service",
        Duration::from_secs(30),
        || async { Ok((count(&client, SQL, "tock").await? > 0).then_some(())) },
    )
    .await?;
    assert_ne!(agent.config_version().await, v1);
    agent.shutdown().await;
    collector.shutdown().await;
    Ok(())
}

/// Several processes migrating an empty database at the same moment (collectors starting
/// together, a CLI beside them): one migrates, the others wait for it; none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_of_an_empty_database_all_succeed() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let tries: Vec<_> = (0..6)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move { vigil_collector::Store::connect(&url, 1).await })
        })
        .collect();
    let mut uids = Vec::new();
    for t in tries {
        let store = t.await?.map_err(|e| anyhow::anyhow!("{e}"))?;
        uids.push(store.uid().to_string());
    }
    uids.dedup();
    assert_eq!(uids.len(), 1, "one database, one identity: {uids:?}");
    Ok(())
}
