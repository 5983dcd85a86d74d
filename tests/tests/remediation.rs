//! Remediation end to end: real PostgreSQL, collector and agent over mTLS, a real Docker
//! container. A killed container is restarted through the agent; a crash loop stops at the
//! budget; a flapping service is not restarted in a loop; commands survive a collector restart;
//! a healthy service is never restarted.

use std::time::{Duration, Instant};

use vigil_collector::{Collector, Config};
use vigil_tests::{Workspace, connected, count, docker, init, pg, start_agent, state, wait_for};

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

/// A killed container (`docker` check, scheduled only once an hour: the Docker event makes it
/// run at once) is restarted, and the successful restart is verified by a check at once, so it
/// reads healthy again within about a second instead of at its next scheduled check (here: an
/// hour away, so without the verification this test cannot pass).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_container_reads_healthy_right_after_its_restart() -> anyhow::Result<()> {
    let container = docker::Container::run_busybox_httpd().await?;
    let web = format!(
        "id: web\ncategory: container\nnode: n1\ncheck:\n  type: docker\n  interval: 1h\n  timeout: 5s\n  container: {0}\n\
         control:\n  container: {0}\n  timeout: 30s\non_failure:\n  action: restart\n  after: 1\n  recover_after: 1\n  grace: 5s\n",
        container.name
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
    let down = killed.elapsed();
    wait_for("web healthy after the restart", LIMIT, is("healthy")).await?;
    let healthy = killed.elapsed();
    eprintln!("kill -> down {down:?}, kill -> healthy again {healthy:?}");
    assert!(container.running()?, "the container is not running");
    let verified = count(
        &client,
        "SELECT count(*) FROM commands WHERE service_id = $1 AND action = 'check' AND origin = 'auto'
         AND status = 'succeeded' AND reason LIKE 'verify after command%'",
        "web",
    )
    .await?;
    assert!(verified >= 1, "no verification check");
    assert_eq!(auto_restarts(&client, "web").await?, 1);
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

/// Collects webhook posts.
async fn webhook() -> anyhow::Result<(
    String,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
)> {
    use axum::{Json, Router, routing::post};
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = got.clone();
    let app = Router::new().route(
        "/hook",
        post(move |Json(v): Json<serde_json::Value>| {
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

fn ctl(ws: &Workspace, db: &pg::TestDb, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let out = std::process::Command::new(vigil_tests::binary("vigil-collector")?)
        .arg("ctl")
        .arg("--config")
        .arg(ws.path().join("collector.yaml"))
        .args(args)
        .env("VIGIL_DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// Operator actions through the CLI (same path as automatic ones, audited), the stopped mode,
/// and one alert per incident on the webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_actions_stopped_mode_and_alerts() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    let (hook, alerts) = webhook().await?;
    let flag = ws.path().join("app.up");
    let f = flag.display();
    ws.write_service(
        "app",
        &format!(
            "id: app\ncategory: api\nnode: n1\ncheck:\n  type: command\n  interval: 1s\n  argv: [\"/bin/sh\", \"-c\", \"test -f {f} || exit 2\"]\n\
             control:\n  start: [[\"/bin/touch\", \"{f}\"]]\n  stop: [[\"/bin/rm\", \"-f\", \"{f}\"]]\n  restart: [[\"/bin/touch\", \"{f}\"]]\n\
             on_failure:\n  action: restart\n  after: 2\n  recover_after: 1\n  grace: 0s\n"
        ),
    )?;
    ws.write_service("steady", &steady("n1"))?;
    let path = ws.write_collector(&db.url, &["n1"])?;
    let mut text = std::fs::read_to_string(&path)?;
    text.push_str(&format!(
        "notify:\n  webhooks:\n    - {{ url: \"{hook}\" }}\n"
    ));
    std::fs::write(&path, text)?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let agent = start_agent(&ws.write_agent("a", "n1", "n1", collector.grpc_addr)?).await?;
    connected(&agent).await?;
    let client = db.connect().await?;
    let is = |want: &'static str| {
        let client = &client;
        move || async move { Ok((state(client, "app").await? == want).then_some(())) }
    };

    // Not running yet: it goes down and Vigil starts it by itself (restart = touch).
    wait_for(
        "app healthy after the automatic restart",
        LIMIT,
        is("healthy"),
    )
    .await?;
    assert_eq!(auto_restarts(&client, "app").await?, 1);

    // Check now, through the CLI.
    let (ok, out) = tokio::task::block_in_place(|| ctl(&ws, &db, &["check", "app"]))?;
    assert!(ok, "{out}");
    assert!(out.contains("check: OK"), "{out}");

    // Stop on purpose: the service is stopped, down, and never restarted automatically.
    let (ok, out) =
        tokio::task::block_in_place(|| ctl(&ws, &db, &["--as", "alice", "stop", "app"]))?;
    assert!(ok, "{out}");
    assert!(!flag.exists());
    assert_eq!(mode(&client).await?, "stopped");
    wait_for("app down while stopped", LIMIT, is("down")).await?;
    let n = count(
        &client,
        "SELECT count(*) FROM check_results WHERE service_id = $1",
        "app",
    )
    .await?;
    wait_for("three more results", LIMIT, || {
        let client = &client;
        async move {
            Ok((count(
                client,
                "SELECT count(*) FROM check_results WHERE service_id = $1",
                "app",
            )
            .await?
                >= n + 3)
                .then_some(()))
        }
    })
    .await?;
    assert_eq!(
        auto_restarts(&client, "app").await?,
        1,
        "a stopped service was restarted"
    );
    let who: String = client
        .query_one(
            "SELECT requested_by FROM commands WHERE service_id = 'app' AND action = 'stop'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(who, "alice");

    // Start again through the CLI: active and healthy.
    let (ok, out) = tokio::task::block_in_place(|| ctl(&ws, &db, &["start", "app"]))?;
    assert!(ok, "{out}");
    wait_for("app healthy after start", LIMIT, is("healthy")).await?;
    assert_eq!(mode(&client).await?, "active");
    // An unknown service is a clear error.
    let (ok, out) = tokio::task::block_in_place(|| ctl(&ws, &db, &["restart", "nope"]))?;
    assert!(!ok && out.contains("no service \"nope\""), "{out}");

    // Alerts: the first incident (down, recovered); nothing for the stopped period.
    wait_for("recovered alert", LIMIT, || {
        let n = alerts.lock().unwrap().len();
        async move { Ok((n >= 2).then_some(())) }
    })
    .await?;
    let events: Vec<String> = alerts
        .lock()
        .unwrap()
        .iter()
        .map(|a| {
            format!(
                "{}:{}",
                a["event"].as_str().unwrap_or(""),
                a["service"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(events, vec!["down:app", "recovered:app"]);
    assert_steady_untouched(&client).await?;
    agent.shutdown().await;
    collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_service_is_not_restarted_in_a_loop() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let flag = dir.path().join("flip");
    // Up, down, up, down...: each run flips a file.
    let flip = format!(
        "id: flip\ncategory: api\nnode: n1\ncheck:\n  type: command\n  interval: 1s\n  argv: [\"/bin/sh\", \"-c\", \"if [ -f {f} ]; then rm {f}; exit 2; else touch {f}; exit 0; fi\"]\n\
         control:\n  restart: [[\"/bin/true\"]]\non_failure:\n  action: restart\n  after: 1\n  recover_after: 1\n  max_restarts: 100\n  grace: 0s\n",
        f = flag.display()
    );
    let (db, ws, collector) = setup(&[("flip", flip)]).await?;
    let agent = start_agent(&ws.write_agent("a", "n1", "n1", collector.grpc_addr)?).await?;
    connected(&agent).await?;
    let client = db.connect().await?;
    wait_for("flapping detected", Duration::from_secs(90), || {
        let client = &client;
        async move {
            let n = count(
                client,
                "SELECT count(*) FROM events WHERE service_id = $1 AND to_state = 'flapping'",
                "flip",
            )
            .await?;
            Ok((n > 0).then_some(()))
        }
    })
    .await?;
    let at_detection = auto_restarts(&client, "flip").await?;
    let n = count(
        &client,
        "SELECT count(*) FROM check_results WHERE service_id = $1",
        "flip",
    )
    .await?;
    wait_for("six more results", LIMIT, || {
        let client = &client;
        async move {
            Ok((count(
                client,
                "SELECT count(*) FROM check_results WHERE service_id = $1",
                "flip",
            )
            .await?
                >= n + 6)
                .then_some(()))
        }
    })
    .await?;
    assert_eq!(
        auto_restarts(&client, "flip").await?,
        at_detection,
        "restarted while flapping"
    );
    assert!(
        at_detection <= 11,
        "{at_detection} restarts before the flapping was seen"
    );
    assert_steady_untouched(&client).await?;
    agent.shutdown().await;
    collector.shutdown().await;
    Ok(())
}

/// A command created while its agent is away survives a collector restart and is carried out
/// once when the agent comes; a dependent service is not restarted while its dependency is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_command_survives_collector_restart_and_dependencies_block_restarts()
-> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let db_svc = format!(
        "id: db\ncategory: api\nnode: n1\ncheck:\n  type: tcp\n  interval: 1s\n  timeout: 1s\n  address: 127.0.0.1:{port}\n\
         control:\n  restart: [[\"/bin/true\"]]\non_failure:\n  action: restart\n  after: 1\n  max_restarts: 1\n  grace: 0s\n"
    );
    let app = format!(
        "id: app\ncategory: api\nnode: n1\ndepends_on: [db]\ncheck:\n  type: tcp\n  interval: 1s\n  timeout: 1s\n  address: 127.0.0.1:{port}\n\
         control:\n  restart: [[\"/bin/true\"]]\non_failure:\n  action: restart\n  after: 1\n  grace: 0s\n"
    );
    let (db, ws, collector) = setup(&[("db", db_svc), ("app", app)]).await?;
    let store = vigil_collector::Store::connect(&db.url, 1).await?;
    let id = store
        .create_command(&vigil_collector::store::NewCommand {
            service_id: "steady",
            node: "n1",
            action: "check",
            origin: "manual",
            requested_by: "test",
            reason: "check while the agent is away",
            deadline: chrono::Utc::now() + chrono::Duration::minutes(5),
        })
        .await?
        .expect("created");
    collector.shutdown().await;
    let collector = Collector::start(Config::load(&ws.path().join("collector.yaml"))?).await?;
    let agent = start_agent(&ws.write_agent("a", "n1", "n1", collector.grpc_addr)?).await?;
    connected(&agent).await?;
    let client = db.connect().await?;
    wait_for("the pending command carried out", LIMIT, || {
        let store = &store;
        async move { Ok(store.command(id).await?.filter(|c| c.finished_at.is_some())) }
    })
    .await
    .map(|c| {
        assert_eq!(c.status, "succeeded");
        assert_eq!(c.attempt, 1);
    })?;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM commands WHERE service_id = $1",
            "steady"
        )
        .await?,
        1
    );

    // db and app are down; db is restarted (budget 1), app never (its dependency is down).
    wait_for("db gave up", LIMIT, || {
        let client = &client;
        async move {
            let n = count(
                client,
                "SELECT count(*) FROM events WHERE service_id = $1 AND to_state = 'gave_up'",
                "db",
            )
            .await?;
            Ok((n > 0).then_some(()))
        }
    })
    .await?;
    // (db gives up within a second of its restart: the restart is verified by a check at once;
    // app may not have its first result yet.)
    wait_for("app down", LIMIT, || {
        let client = &client;
        async move { Ok((state(client, "app").await? == "down").then_some(())) }
    })
    .await?;
    assert_eq!(
        auto_restarts(&client, "app").await?,
        0,
        "restarted while its dependency is down"
    );
    assert_eq!(auto_restarts(&client, "db").await?, 1);
    agent.shutdown().await;
    collector.shutdown().await;
    Ok(())
}

async fn mode(c: &tokio_postgres::Client) -> anyhow::Result<String> {
    Ok(c.query_one(
        "SELECT mode FROM service_state WHERE service_id = 'app'",
        &[],
    )
    .await?
    .get(0))
}

/// Two evaluations that read the same view of a failing service: only the first creates a
/// restart, even when that restart has already finished by the time the second one tries (the
/// in-flight index alone would let it through). A decision made after it may restart again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_evaluations_of_one_failure_restart_once() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let store = vigil_collector::Store::connect(&db.url, 2).await?;
    let new = |reason: &'static str| vigil_collector::store::NewCommand {
        service_id: "app",
        node: "n1",
        action: "restart",
        origin: "auto",
        requested_by: "vigil",
        reason,
        deadline: chrono::Utc::now() + chrono::Duration::minutes(5),
    };
    let decided = chrono::Utc::now() - chrono::Duration::seconds(1);
    let first = store.create_auto_restart(&new("first"), decided).await?;
    let first = first.expect("the first evaluation restarts");
    store
        .finish_command(first, "succeeded", Some(0), "", None)
        .await?
        .expect("finished");
    assert_eq!(
        store.create_auto_restart(&new("second"), decided).await?,
        None,
        "the second evaluation of the same failure restarted too"
    );
    let later = chrono::Utc::now();
    assert!(
        store
            .create_auto_restart(&new("later"), later)
            .await?
            .is_some()
    );
    Ok(())
}
