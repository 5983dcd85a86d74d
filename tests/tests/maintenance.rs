//! Maintenance windows, service labels and "gave up" end to end: windows created, listed and
//! deleted over the REST API and the CLI, bad windows refused with the field named, the role
//! matrix, a short one-off window setting and clearing `service_state.maintenance_until` (and
//! the API saying so), labels from a service file to the API, and a service that remediation gave
//! up on shown in the API and in `vigil_service_gave_up`; a node in maintenance when a window
//! names it or covers all its services; one-off windows long over deleted by the pass.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, SubsecRound, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use vigil_collector::web::auth::{Role, create_token};
use vigil_collector::{Collector, Config};
use vigil_tests::{Workspace, connected, init, pg, start_agent, wait_for};

const LIMIT: Duration = Duration::from_secs(60);

struct Setup {
    db: pg::TestDb,
    ws: Workspace,
    collector: Collector,
    base: String,
    http: reqwest::Client,
    viewer: String,
    operator: String,
}

impl Setup {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    async fn get(&self, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        self.call(reqwest::Method::GET, path, Some(&self.viewer), None)
            .await
    }

    async fn create(&self, token: &str, body: Value) -> anyhow::Result<(StatusCode, Value)> {
        self.call(
            reqwest::Method::POST,
            "/api/maintenance",
            Some(token),
            Some(body),
        )
        .await
    }

    async fn health(&self, id: &str) -> anyhow::Result<Value> {
        let (st, v) = self.get(&format!("/api/services/health/{id}")).await?;
        anyhow::ensure!(st == StatusCode::OK, "{st}: {v}");
        Ok(v)
    }

    /// `maintenance_id`, `maintenance_until` of a service in the database.
    async fn flag(&self, id: &str) -> anyhow::Result<(Option<i64>, Option<DateTime<Utc>>)> {
        let db = self.db.connect().await?;
        let r = db
            .query_one(
                "SELECT maintenance_id, maintenance_until FROM service_state WHERE service_id = $1",
                &[&id],
            )
            .await?;
        Ok((r.get(0), r.get(1)))
    }
}

fn assert_bad(got: &(StatusCode, Value), field: &str) {
    assert_eq!(got.0, StatusCode::BAD_REQUEST, "{}", got.1);
    assert_eq!(got.1["error"], "bad_request", "{}", got.1);
    assert_eq!(got.1["field"], field, "{}", got.1);
    assert!(
        got.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        got.1
    );
}

const WEB: &str = "id: web\nname: Web front\ncategory: web\nnode: n1\n\
    check:\n  type: command\n  interval: 1s\n  argv: [\"/bin/true\"]\n\
    labels:\n  env: prod\n  team: ocr\n";
const DB: &str = "id: db\ncategory: system\nnode: n1\n\
    check:\n  type: command\n  interval: 1s\n  argv: [\"/bin/true\"]\n\
    labels: { env: staging }\n";

async fn setup(extra: &[(&str, &str)]) -> anyhow::Result<Setup> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    ws.write_service("web", WEB)?;
    ws.write_service("db", DB)?;
    for (id, yaml) in extra {
        ws.write_service(id, yaml)?;
    }
    let path = ws.write_collector(&db.url, &["n1"])?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let store = &collector.hub.store;
    let (viewer, _) = create_token(store, "viewer-1", Role::Viewer).await?;
    let (operator, _) = create_token(store, "operator-1", Role::Operator).await?;
    Ok(Setup {
        base: format!("http://{}", collector.http_addr.expect("http enabled")),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?,
        db,
        ws,
        collector,
        viewer,
        operator,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api_roles_and_bad_windows() -> anyhow::Result<()> {
    let s = setup(&[]).await?;
    // Nothing yet; reading needs a token, changing needs the operator role.
    let (st, list) = s.get("/api/maintenance").await?;
    assert_eq!(st, StatusCode::OK, "{list}");
    assert_eq!(list, json!([]));
    let anon = s
        .call(reqwest::Method::GET, "/api/maintenance", None, None)
        .await?;
    assert_eq!(anon.0, StatusCode::UNAUTHORIZED);
    let tomorrow = Utc::now() + chrono::Duration::days(1);
    let good = json!({
        "name": "db upgrade", "comment": "ticket OPS-1",
        "from": tomorrow.to_rfc3339(), "duration": "1h", "services": ["web"],
    });
    let by_viewer = s.create(&s.viewer, good.clone()).await?;
    assert_eq!(by_viewer.0, StatusCode::FORBIDDEN, "{}", by_viewer.1);
    assert_eq!(by_viewer.1["error"], "forbidden");

    // Bad windows: 400 naming the field.
    let bad = |patch: Value| {
        let mut b = good.clone();
        for (k, v) in patch.as_object().expect("object") {
            if v.is_null() {
                b.as_object_mut().expect("object").remove(k);
            } else {
                b[k] = v.clone();
            }
        }
        b
    };
    for (patch, field) in [
        (json!({"services": null}), "matcher"),
        (json!({"services": ["nope"]}), "services"),
        (json!({"services": "web"}), "services"),
        (json!({"nodes": ["n9"]}), "nodes"),
        (json!({"categories": ["database"]}), "categories"),
        (json!({"labels": ["env"]}), "labels"),
        (json!({"name": ""}), "name"),
        (json!({"name": null}), "name"),
        (json!({"colour": "red"}), "colour"),
        (json!({"duration": "soon"}), "duration"),
        (json!({"duration": null}), "to"),
        (json!({"from": "yesterday"}), "from"),
        (
            json!({"from": null, "duration": null, "to": (Utc::now() - chrono::Duration::hours(1)).to_rfc3339()}),
            "to",
        ),
        (
            json!({"from": null, "recurrence": "daily", "start": "22:00", "time_zone": "Mars/Olympus"}),
            "time_zone",
        ),
        (
            json!({"from": null, "recurrence": "weekly", "days": ["mon", "tue"], "start": "22:00", "duration": "30h"}),
            "duration",
        ),
        (
            json!({"from": null, "recurrence": "hourly", "start": "22:00"}),
            "recurrence",
        ),
    ] {
        let got = s.create(&s.operator, bad(patch.clone())).await?;
        assert_bad(&got, field);
    }
    let (_, list) = s.get("/api/maintenance").await?;
    assert_eq!(list, json!([]), "a refused window was stored");

    // A one-off window tomorrow: stored, not in force, next start known, covers web.
    let (st, w) = s.create(&s.operator, good.clone()).await?;
    assert_eq!(st, StatusCode::CREATED, "{w}");
    let id = w["id"].as_i64().expect("id");
    assert_eq!(w["name"], "db upgrade");
    assert_eq!(w["comment"], "ticket OPS-1");
    assert_eq!(w["created_by"], "api:operator-1");
    assert!(w["active_until"].is_null(), "{w}");
    let from: DateTime<Utc> = serde_json::from_value(w["from"].clone())?;
    let to: DateTime<Utc> = serde_json::from_value(w["to"].clone())?;
    assert_eq!(to - from, chrono::Duration::hours(1));
    assert_eq!(w["next_start"], w["from"]);
    assert_eq!(w["covers"], json!(["web"]));
    // A weekly window by label: covers web (env=prod) only.
    let (st, weekly) = s
        .create(
            &s.operator,
            json!({"name": "backups", "recurrence": "weekly", "days": ["sat", "sun"],
                   "start": "02:00", "duration": "90m", "time_zone": "Europe/Berlin",
                   "labels": ["env=prod"]}),
        )
        .await?;
    assert_eq!(st, StatusCode::CREATED, "{weekly}");
    assert_eq!(weekly["covers"], json!(["web"]));
    assert!(weekly["next_start"].is_string(), "{weekly}");
    let weekly_id = weekly["id"].as_i64().expect("id");

    let (st, list) = s.get("/api/maintenance").await?;
    assert_eq!(st, StatusCode::OK);
    let ids: Vec<i64> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|w| w["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(ids, [id, weekly_id]);
    let (st, one) = s.get(&format!("/api/maintenance/{id}")).await?;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(one["name"], "db upgrade");
    assert_eq!(
        s.get("/api/maintenance/99999").await?.0,
        StatusCode::NOT_FOUND
    );
    assert_bad(&s.get("/api/maintenance/abc").await?, "id");

    // Documented in the OpenAPI document.
    let (_, doc) = s
        .call(reqwest::Method::GET, "/api/openapi.json", None, None)
        .await?;
    for p in ["/api/maintenance", "/api/maintenance/{id}"] {
        assert!(doc["paths"][p].is_object(), "{p} not documented");
    }
    assert!(doc["paths"]["/api/maintenance"]["post"].is_object());
    assert!(doc["paths"]["/api/maintenance/{id}"]["delete"].is_object());
    assert!(doc["components"]["schemas"]["WindowSpec"].is_object());
    assert!(doc["components"]["schemas"]["ServiceHealth"]["properties"]["maintenance"].is_object());

    // Delete: operator only; gone afterwards; twice is 404.
    let path = format!("/api/maintenance/{id}");
    let del = s
        .call(reqwest::Method::DELETE, &path, Some(&s.viewer), None)
        .await?;
    assert_eq!(del.0, StatusCode::FORBIDDEN);
    let del = s
        .call(reqwest::Method::DELETE, &path, Some(&s.operator), None)
        .await?;
    assert_eq!(del.0, StatusCode::OK, "{}", del.1);
    assert_eq!(del.1, json!({"id": id, "name": "db upgrade"}));
    let del = s
        .call(reqwest::Method::DELETE, &path, Some(&s.operator), None)
        .await?;
    assert_eq!(del.0, StatusCode::NOT_FOUND);
    let (_, list) = s.get("/api/maintenance").await?;
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    s.collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_window_sets_and_clears_the_maintenance_flag() -> anyhow::Result<()> {
    let s = setup(&[]).await?;
    // Starts in 2 s and lasts 4 s: it is not in force when created, so the maintenance pass
    // (not the API) must put it in force, and take it out again.
    // Whole seconds: PostgreSQL keeps microseconds.
    let from = Utc::now().trunc_subsecs(0) + chrono::Duration::seconds(2);
    let to = from + chrono::Duration::seconds(4);
    let (st, w) = s
        .create(
            &s.operator,
            json!({"name": "quick fix", "from": from.to_rfc3339(), "to": to.to_rfc3339(),
                   "services": ["web"]}),
        )
        .await?;
    assert_eq!(st, StatusCode::CREATED, "{w}");
    let id = w["id"].as_i64().expect("id");
    assert!(w["active_until"].is_null(), "{w}");

    let until = wait_for("web in maintenance", LIMIT, || async {
        Ok(match s.flag("web").await? {
            (Some(m), Some(u)) => Some((m, u)),
            _ => None,
        })
    })
    .await?;
    assert_eq!(until, (id, to));
    // Never before the window's start.
    assert!(Utc::now() >= from);
    let health = s.health("web").await?;
    assert_eq!(
        health["maintenance"],
        json!({"id": id, "name": "quick fix", "until": health["maintenance"]["until"]})
    );
    let shown: DateTime<Utc> = serde_json::from_value(health["maintenance"]["until"].clone())?;
    assert_eq!(shown, to);
    assert_eq!(
        s.collector.hub.store.in_maintenance("web").await?,
        Some(vigil_collector::store::ActiveMaintenance {
            id,
            name: "quick fix".into(),
            until: to
        })
    );
    // db is not matched.
    assert_eq!(s.flag("db").await?, (None, None));
    assert!(s.health("db").await?["maintenance"].is_null());
    let (_, all) = s.get("/api/services/health").await?;
    let web_row = all
        .as_array()
        .expect("array")
        .iter()
        .find(|r| r["id"] == "web")
        .cloned()
        .expect("web row");
    assert_eq!(web_row["maintenance"]["id"], id);

    // The window ends: the flag clears (never before the end), and the API says so.
    wait_for("web out of maintenance", LIMIT, || async {
        Ok((s.flag("web").await? == (None, None)).then_some(()))
    })
    .await?;
    assert!(Utc::now() >= to, "cleared before the window ended");
    assert!(s.health("web").await?["maintenance"].is_null());
    assert_eq!(s.collector.hub.store.in_maintenance("web").await?, None);

    // One event each way.
    let (_, events) = s.get("/api/services/web/events").await?;
    let reasons: Vec<&str> = events["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|e| e["kind"] == "maintenance")
        .map(|e| e["reason"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert_eq!(reasons[0], "maintenance ended: quick fix");
    assert!(
        reasons[1].starts_with("maintenance started: quick fix until "),
        "{reasons:?}"
    );
    s.collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_adds_lists_and_deletes_windows() -> anyhow::Result<()> {
    let s = setup(&[]).await?;
    let exe = vigil_tests::binary("vigil-collector")?;
    let config = s.ws.path().join("collector.yaml");
    let run = |args: &[&str]| -> anyhow::Result<(bool, String, String)> {
        let out = std::process::Command::new(&exe)
            .arg("maintenance")
            .args(args)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    // Refused, naming the flag.
    let (ok, _, err) = run(&[
        "add",
        "--name",
        "x",
        "--service",
        "nope",
        "--duration",
        "1h",
    ])?;
    assert!(
        !ok && err.contains("--service") && err.contains("nope"),
        "{err}"
    );
    let (ok, _, err) = run(&["add", "--name", "x", "--duration", "1h"])?;
    assert!(
        !ok && err.contains("--service/--node/--category/--label"),
        "{err}"
    );
    let (ok, _, err) = run(&[
        "add",
        "--name",
        "x",
        "--label",
        "env=prod",
        "--every",
        "daily",
        "--start",
        "22:00",
        "--duration",
        "25h",
    ])?;
    assert!(!ok && err.contains("--duration"), "{err}");
    let (ok, help, _) = run(&["add", "--help"])?;
    assert!(
        ok && help.contains("--time-zone") && help.contains("Examples"),
        "{help}"
    );

    // A one-off window by label, in force at once.
    let (ok, out, err) = run(&[
        "add",
        "--as",
        "alice",
        "--name",
        "prod freeze",
        "--label",
        "env=prod",
        "--duration",
        "1h",
    ])?;
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("in force now") && out.contains("covers: web"),
        "{out}"
    );
    let (_, list) = s.get("/api/maintenance").await?;
    let w = list[0].clone();
    assert_eq!(w["name"], "prod freeze");
    assert_eq!(w["created_by"], "cli:alice");
    assert_eq!(w["labels"], json!(["env=prod"]));
    let id = w["id"].as_i64().expect("id");
    // The CLI put it in force itself.
    let (m, _) = s.flag("web").await?;
    assert_eq!(m, Some(id));
    assert_eq!(s.flag("db").await?, (None, None));
    wait_for("the API shows web in maintenance", LIMIT, || async {
        Ok((s.health("web").await?["maintenance"]["id"] == id).then_some(()))
    })
    .await?;

    // A weekly one for a node.
    let (ok, out, err) = run(&[
        "add",
        "--name",
        "patch night",
        "--node",
        "n1",
        "--every",
        "weekly",
        "--days",
        "tue,thu",
        "--start",
        "23:30",
        "--duration",
        "2h",
        "--time-zone",
        "Europe/Berlin",
    ])?;
    assert!(ok, "{out}{err}");
    let (ok, list, _) = run(&["list"])?;
    assert!(ok);
    assert!(
        list.contains("prod freeze") && list.contains("ACTIVE until"),
        "{list}"
    );
    assert!(
        list.contains("patch night")
            && list.contains("weekly tue, thu at 23:30 Europe/Berlin for 2h"),
        "{list}"
    );

    // Delete: web leaves maintenance at once; deleting again fails.
    let (ok, out, _) = run(&["delete", &id.to_string()])?;
    assert!(ok && out.contains("deleted"), "{out}");
    let (m, _) = s.flag("web").await?;
    assert!(m.is_none() || m != Some(id), "still in the deleted window");
    let (ok, _, err) = run(&["delete", &id.to_string()])?;
    assert!(!ok && err.contains("no maintenance window"), "{err}");
    let (_, list, _) = run(&["list"])?;
    assert!(!list.contains("prod freeze"), "{list}");
    s.collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_round_trip_and_gave_up_is_visible() -> anyhow::Result<()> {
    // `broken` fails at once and may not be restarted at all (max_restarts 0): remediation
    // gives up as soon as it is down.
    let broken = "id: broken\ncategory: system\nnode: n1\n\
        check:\n  type: command\n  interval: 1s\n  argv: [\"/bin/sh\", \"-c\", \"exit 2\"]\n\
        control:\n  restart: [[\"/bin/true\"]]\n\
        on_failure:\n  action: restart\n  after: 1\n  max_restarts: 0\n";
    let s = setup(&[("broken", broken)]).await?;

    // Labels from the service files, in the API and in the database.
    let web = s.health("web").await?;
    assert_eq!(web["labels"], json!({"env": "prod", "team": "ocr"}));
    assert_eq!(s.health("db").await?["labels"], json!({"env": "staging"}));
    assert_eq!(s.health("broken").await?["labels"], json!({}));
    let db = s.db.connect().await?;
    let stored: Value = db
        .query_one("SELECT labels FROM services WHERE id = 'web'", &[])
        .await?
        .get(0);
    assert_eq!(stored, json!({"env": "prod", "team": "ocr"}));
    // Not given up: the field is there, null.
    assert!(web.as_object().expect("object").contains_key("gave_up_at"));
    assert!(web["gave_up_at"].is_null());

    let agent = start_agent(&s.ws.write_agent("a", "n1", "n1", s.collector.grpc_addr)?).await?;
    connected(&agent).await?;
    let gave_up = wait_for("remediation gives up on broken", LIMIT, || async {
        let h = s.health("broken").await?;
        Ok(h["gave_up_at"].is_string().then_some(h))
    })
    .await?;
    assert_eq!(gave_up["status"], "abnormal");
    let (_, all) = s.get("/api/services/health").await?;
    for row in all.as_array().expect("array") {
        let gave = row["gave_up_at"].is_string();
        assert_eq!(gave, row["id"] == "broken", "{row}");
    }

    // vigil_service_gave_up: 1 for broken, 0 for the others.
    let metrics = format!(
        "http://{}/metrics",
        s.collector.metrics_addr.expect("metrics enabled")
    );
    let text = s.http.get(&metrics).send().await?.text().await?;
    for (service, v) in [("broken", 1), ("web", 0), ("db", 0)] {
        let line = format!("vigil_service_gave_up{{service=\"{service}\",node=\"n1\"}} {v}");
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    drop(agent);
    s.collector.shutdown().await;
    Ok(())
}

/// The maintenance pass run directly on a store: a node is in maintenance (with a node event)
/// while a window names it alone or every service of it is covered, not when only some are or a
/// window names it with a category; one-off windows that ended more than 7 days ago are deleted
/// (at most every 5 minutes), recent and recurring ones kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_maintenance_and_purge_of_old_windows() -> anyhow::Result<()> {
    use vigil_collector::maintenance::{WindowSpec, apply};
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    ws.write_service("web", WEB)?;
    ws.write_service("db", DB)?;
    let path = ws.write_collector(&db.url, &["n1", "n2"])?;
    let cfg = Config::load(&path)?;
    let store = vigil_collector::Store::connect(&db.url, 2).await?;
    store.sync_config(&cfg).await?;
    let sql = db.connect().await?;
    let node_until = |name: &'static str| {
        let sql = &sql;
        async move {
            let r = sql
                .query_one(
                    "SELECT maintenance_until > now() FROM nodes WHERE name = $1",
                    &[&name],
                )
                .await?;
            anyhow::Ok(r.get::<_, Option<bool>>(0).unwrap_or(false))
        }
    };
    let now = Utc::now();
    let once = |name: &str, from: DateTime<Utc>, to: DateTime<Utc>| WindowSpec {
        name: name.into(),
        from: Some(from),
        to: Some(to),
        ..Default::default()
    };
    let hour = chrono::Duration::hours(1);
    let day = chrono::Duration::days(1);
    let old = store
        .create_maintenance(
            &WindowSpec {
                services: vec!["web".into()],
                ..once("old", now - day * 9, now - day * 8)
            },
            "t",
        )
        .await?;
    let recent = store
        .create_maintenance(
            &WindowSpec {
                services: vec!["web".into()],
                ..once("recent", now - day * 2, now - day)
            },
            "t",
        )
        .await?;
    let daily = store
        .create_maintenance(
            &WindowSpec {
                name: "nightly".into(),
                recurrence: Some(vigil_collector::maintenance::Recurrence::Daily),
                start: Some("03:00".into()),
                duration: Some("1m".into()),
                time_zone: Some("UTC".into()),
                // A service not in the config: this window never changes who is covered.
                services: vec!["gone".into()],
                ..Default::default()
            },
            "t",
        )
        .await?;
    // Only web covered: n1 is not in maintenance.
    let web = store
        .create_maintenance(
            &WindowSpec {
                services: vec!["web".into()],
                ..once("web", now - hour, now + hour)
            },
            "t",
        )
        .await?;
    // n1 named with a category: not the whole node either.
    store
        .create_maintenance(
            &WindowSpec {
                nodes: vec!["n1".into()],
                categories: vec!["system".into()],
                ..once("n1 system", now - hour, now + hour)
            },
            "t",
        )
        .await?;
    apply(&store, &cfg).await?;
    let ids: Vec<i64> = sql
        .query("SELECT id FROM maintenance_windows ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!ids.contains(&old), "{ids:?}");
    assert!(ids.contains(&recent) && ids.contains(&daily), "{ids:?}");
    // web and db (system) are both covered now, by two windows: n1 is in maintenance.
    assert!(node_until("n1").await?);
    assert!(!node_until("n2").await?);
    // Without the category window, only web is: n1 leaves maintenance.
    let cat = *ids.last().context("ids")?;
    store.delete_maintenance(cat).await?;
    apply(&store, &cfg).await?;
    assert!(!node_until("n1").await?);
    // A window naming n2 alone covers n2, which has no service.
    store
        .create_maintenance(
            &WindowSpec {
                nodes: vec!["n2".into()],
                ..once("n2", now - hour, now + hour)
            },
            "t",
        )
        .await?;
    apply(&store, &cfg).await?;
    assert!(node_until("n2").await?);
    let kinds: Vec<(String, String)> = sql
        .query(
            "SELECT node, reason FROM node_events WHERE kind = 'maintenance' ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(kinds.len(), 3, "{kinds:?}");
    assert_eq!(kinds[0].0, "n1");
    assert!(kinds[0].1.starts_with("maintenance started"), "{kinds:?}");
    assert_eq!(
        kinds[1],
        ("n1".to_string(), "maintenance ended".to_string())
    );
    assert_eq!(kinds[2].0, "n2");
    // The purge runs at most every 5 minutes: another old window stays for now.
    let old2 = store
        .create_maintenance(
            &WindowSpec {
                services: vec!["web".into()],
                ..once("old2", now - day * 9, now - day * 8)
            },
            "t",
        )
        .await?;
    apply(&store, &cfg).await?;
    assert!(store.maintenance_window(old2).await?.is_some());
    assert!(store.maintenance_window(web).await?.is_some());
    Ok(())
}
