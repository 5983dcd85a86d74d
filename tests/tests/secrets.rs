//! Secrets outside collector.yaml, end to end (real PostgreSQL, collector binary, agent): the
//! database URL, a webhook's URL and headers and a PagerDuty routing key read from files and
//! environment variables reach their receivers; none of them, nor a check's own credentials,
//! ends up in the database, the REST API's answers, the collector's log or `check-config`.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use vigil_collector::Store;
use vigil_collector::web::auth::{Role, create_token};
use vigil_tests::{Killed, Workspace, connected, free_port, init, pg, start_agent, wait_for};

const LIMIT: Duration = Duration::from_secs(60);

/// Secrets the test hands the collector; none may show up anywhere but at the receivers.
const HEADER_FILE_SECRET: &str = "Bearer hdr-file-7f3a9";
const HEADER_ENV_SECRET: &str = "tok-env-5c21e";
const URL_PATH_SECRET: &str = "hookpath-a8d04";
const DEAD_URL_SECRET: &str = "deadpath-91b7c";
const ROUTING_KEY_SECRET: &str = "rk-env-3e6f2";
const CHECK_HEADER_SECRET: &str = "chk-hdr-0d9e4";
const CHECK_PASSWORD_SECRET: &str = "chk-pw-62fa1";
const DB_PASSWORD_SECRET: &str = "dbpw-4b8c7";

fn all_secrets() -> [&'static str; 8] {
    [
        HEADER_FILE_SECRET,
        HEADER_ENV_SECRET,
        URL_PATH_SECRET,
        DEAD_URL_SECRET,
        ROUTING_KEY_SECRET,
        CHECK_HEADER_SECRET,
        CHECK_PASSWORD_SECRET,
        DB_PASSWORD_SECRET,
    ]
}

/// A receiver recording each post's path, headers and body.
#[derive(Clone, Default)]
struct Got(Arc<Mutex<Vec<(String, axum::http::HeaderMap, Value)>>>);

async fn receiver(got: Got) -> anyhow::Result<String> {
    use axum::{Json, Router, extract::OriginalUri, http::HeaderMap, http::StatusCode};
    let app = Router::new().fallback(
        move |uri: OriginalUri, h: HeaderMap, Json(v): Json<Value>| {
            let got = got.clone();
            async move {
                got.0.lock().unwrap().push((uri.path().to_string(), h, v));
                StatusCode::ACCEPTED
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(base)
}

fn secret_file(dir: &Path, name: &str, value: &str) -> anyhow::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("{value}\n"))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
    Ok(p)
}

/// Every table's rows as text.
async fn database_text(db: &tokio_postgres::Client) -> anyhow::Result<String> {
    let tables = db
        .query(
            "SELECT quote_ident(table_name) FROM information_schema.tables
             WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
            &[],
        )
        .await?;
    let mut text = String::new();
    for t in tables {
        let name: String = t.get(0);
        for r in db
            .query(&format!("SELECT t::text FROM {name} t"), &[])
            .await?
        {
            let row: String = r.get(0);
            text.push_str(&row);
            text.push('\n');
        }
    }
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_from_files_and_environment_reach_receivers_and_nowhere_else() -> anyhow::Result<()>
{
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    let got = Got::default();
    let base = receiver(got.clone()).await?;

    // The collector reaches PostgreSQL with a URL (password included) it reads from a file.
    // The test cluster trusts local connections, so the password is carried, not checked.
    let mut url = reqwest::Url::parse(&db.url)?;
    url.set_password(Some(DB_PASSWORD_SECRET)).ok();
    assert!(url.as_str().contains(DB_PASSWORD_SECRET));
    let secrets = ws.path().join("secrets");
    std::fs::create_dir_all(&secrets)?;
    let db_url = secret_file(&secrets, "db-url", url.as_str())?;
    let auth = secret_file(&secrets, "auth", HEADER_FILE_SECRET)?;
    let hook_url = secret_file(&secrets, "hook", &format!("{base}/{URL_PATH_SECRET}"))?;
    let dead_url = secret_file(
        &secrets,
        "dead",
        &format!("http://127.0.0.1:{}/{DEAD_URL_SECRET}", free_port()?),
    )?;

    // A service that is down from the start, and whose check carries credentials of its own.
    ws.write_service(
        "app",
        "id: app\ncategory: api\nnode: n1\ncheck:\n  type: command\n  interval: 1s\n  argv: [\"/bin/sh\", \"-c\", \"exit 2\"]\non_failure:\n  after: 1\n",
    )?;
    ws.write_service(
        "web",
        &format!(
            "id: web\ncategory: web\nnode: n1\ncheck:\n  type: http\n  interval: 1h\n  request:\n    url: \"http://user:{CHECK_PASSWORD_SECRET}@127.0.0.1:9/\"\n    headers: {{ Authorization: \"Bearer {CHECK_HEADER_SECRET}\" }}\n"
        ),
    )?;
    let (grpc, http) = (free_port()?, free_port()?);
    let path = ws.write_collector(&db.url, &["n1"])?;
    let text = std::fs::read_to_string(&path)?
        .replace(
            "grpc_listen: 127.0.0.1:0",
            &format!("grpc_listen: 127.0.0.1:{grpc}"),
        )
        .replace(
            "http: { listen: 127.0.0.1:0 }",
            &format!("http: {{ listen: 127.0.0.1:{http} }}"),
        )
        .replace(
            &format!("url: \"{}\"", db.url),
            &format!("url_file: {}", db_url.display()),
        );
    assert!(text.contains("url_file"), "{text}");
    std::fs::write(
        &path,
        format!(
            "{text}notify:\n  max_backoff: 2s\n  receivers:\n\
             \x20   - name: hook\n      type: webhook\n      url_file: {}\n      headers_file: {{ Authorization: {} }}\n      headers_env: {{ X-Token: VIGIL_TEST_HEADER_TOKEN }}\n\
             \x20   - name: pd\n      type: pagerduty\n      routing_key_env: VIGIL_TEST_ROUTING_KEY\n      url: \"{base}/v2/enqueue\"\n\
             \x20   - name: dead\n      type: slack\n      url_file: {}\n",
            hook_url.display(),
            auth.display(),
            dead_url.display()
        ),
    )?;
    assert!(
        all_secrets()
            .iter()
            .filter(|s| ![CHECK_HEADER_SECRET, CHECK_PASSWORD_SECRET].contains(s))
            .all(|s| !std::fs::read_to_string(&path).unwrap().contains(s)),
        "no receiver secret is written in collector.yaml"
    );

    let check = std::process::Command::new(vigil_tests::binary("vigil-collector")?)
        .args(["check-config", "--config"])
        .arg(&path)
        .env("VIGIL_TEST_HEADER_TOKEN", HEADER_ENV_SECRET)
        .env("VIGIL_TEST_ROUTING_KEY", ROUTING_KEY_SECRET)
        .env_remove("VIGIL_DATABASE_URL")
        .output()?;
    let check_text = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success(), "{check_text}");

    let log_path = ws.path().join("collector.log");
    let log = std::fs::File::create(&log_path)?;
    let _collector = Killed(
        std::process::Command::new(vigil_tests::binary("vigil-collector")?)
            .args(["serve", "--config"])
            .arg(&path)
            .env(
                "RUST_LOG",
                "debug,h2=info,hyper=info,rustls=info,tokio_postgres=info",
            )
            .env("VIGIL_TEST_HEADER_TOKEN", HEADER_ENV_SECRET)
            .env("VIGIL_TEST_ROUTING_KEY", ROUTING_KEY_SECRET)
            .env_remove("VIGIL_DATABASE_URL")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    let agent =
        start_agent(&ws.write_agent("a", "n1", "n1", format!("127.0.0.1:{grpc}").parse()?)?)
            .await?;
    connected(&agent).await?;

    // The webhook and PagerDuty get the down alert with the secrets read from elsewhere.
    wait_for(
        "the down alert at the webhook and at PagerDuty",
        LIMIT,
        || {
            let g = got.0.lock().unwrap().clone();
            async move {
                let hook = g
                    .iter()
                    .any(|(p, _, v)| p == &format!("/{URL_PATH_SECRET}") && v["event"] == "down");
                let pd = g.iter().any(|(p, _, _)| p == "/v2/enqueue");
                Ok((hook && pd).then_some(()))
            }
        },
    )
    .await
    .with_context(|| {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains("batch committed"))
            .rev()
            .take(60)
            .collect();
        let seen: Vec<(String, Value)> = got
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _, v)| (p.clone(), v["event"].clone()))
            .collect();
        format!(
            "received {seen:?}; the collector's log ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    })?;
    let g = got.0.lock().unwrap().clone();
    let (_, headers, _) = g
        .iter()
        .find(|(p, _, _)| p == &format!("/{URL_PATH_SECRET}"))
        .expect("found above");
    assert_eq!(headers["authorization"], HEADER_FILE_SECRET);
    assert_eq!(headers["x-token"], HEADER_ENV_SECRET);
    let (_, _, pd) = g
        .iter()
        .find(|(p, _, _)| p == "/v2/enqueue")
        .expect("found above");
    assert_eq!(pd["routing_key"], ROUTING_KEY_SECRET);

    // The receiver that cannot be reached has failed attempts recorded (their errors included).
    let client = db.connect().await?;
    wait_for("failed attempts at the dead receiver", LIMIT, || {
        let client = &client;
        async move {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM alert_attempts t JOIN alerts a ON a.id = t.alert_id
                     WHERE a.receiver = 'dead' AND NOT t.ok AND t.error IS NOT NULL",
                    &[],
                )
                .await?
                .get(0);
            Ok((n >= 2).then_some(()))
        }
    })
    .await?;

    // Every GET of the API without a path parameter, and those with one for the services,
    // nodes and incidents the test made.
    let store = Store::connect(&db.url, 1).await?;
    let (token, _) = create_token(&store, "admin", Role::Admin).await?;
    let http_client = reqwest::Client::new();
    let api = format!("http://127.0.0.1:{http}");
    let doc: Value = http_client
        .get(format!("{api}/api/openapi.json"))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    let incident: i64 = client
        .query_one("SELECT min(id) FROM incidents", &[])
        .await?
        .get(0);
    let command: Option<i64> = client
        .query_one("SELECT min(id) FROM commands", &[])
        .await?
        .get(0);
    let mut answers = String::new();
    let mut fetched = 0;
    for (p, ops) in doc["paths"].as_object().expect("paths") {
        if ops.get("get").is_none() {
            continue;
        }
        let mut url = p.clone();
        for (param, value) in [
            (
                "{id}",
                if p.contains("incident") {
                    incident.to_string()
                } else if p.contains("command") {
                    command.unwrap_or(1).to_string()
                } else {
                    "web".into()
                },
            ),
            ("{service}", "web".into()),
            ("{node}", "n1".into()),
            ("{name}", "n1".into()),
        ] {
            url = url.replace(param, &value);
        }
        if url.contains('{') {
            continue;
        }
        let r = http_client
            .get(format!("{api}{url}"))
            .bearer_auth(&token)
            .send()
            .await?;
        answers.push_str(&format!("{url} {}\n{}\n", r.status(), r.text().await?));
        fetched += 1;
    }
    assert!(fetched >= 10, "the API answered {fetched} GETs:\n{answers}");
    let stored = database_text(&client).await?;
    assert!(
        stored.contains("127.0.0.1:9") && stored.contains("Authorization"),
        "the services table still describes the check (its target, its header's name)"
    );
    let log_text = std::fs::read_to_string(&log_path)?;
    assert!(log_text.contains("DEBUG"), "the log is at debug level");
    for secret in all_secrets() {
        assert!(!stored.contains(secret), "{secret} is in the database");
        assert!(
            !answers.contains(secret),
            "{secret} is in the API's answers"
        );
        assert!(
            !log_text.contains(secret),
            "{secret} is in the collector's log"
        );
        assert!(
            !check_text.contains(secret),
            "{secret} is in check-config's output"
        );
    }
    agent.shutdown().await;
    Ok(())
}
