//! REST API end to end: every endpoint against a real collector, agent and PostgreSQL; the role
//! matrix (viewer reads, operator acts, admin changes config); JSON errors for bad input; runtime
//! settings put in force without a restart; dashboard login with CSRF protection.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use vigil_collector::web::auth::{Role, create_token};
use vigil_collector::{Collector, Config};
use vigil_tests::{Workspace, connected, init, pg, start_agent, wait_for};

const LIMIT: Duration = Duration::from_secs(60);

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
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
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, v))
    }
    async fn get(&self, path: &str, token: &str) -> anyhow::Result<(StatusCode, Value)> {
        self.call(reqwest::Method::GET, path, Some(token), None)
            .await
    }
    async fn post(&self, path: &str, token: &str) -> anyhow::Result<(StatusCode, Value)> {
        self.call(reqwest::Method::POST, path, Some(token), None)
            .await
    }
    async fn put(
        &self,
        path: &str,
        token: &str,
        body: Value,
    ) -> anyhow::Result<(StatusCode, Value)> {
        self.call(reqwest::Method::PUT, path, Some(token), Some(body))
            .await
    }
}

fn assert_error(got: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(got.0, status, "{:?}", got.1);
    assert_eq!(got.1["error"], code, "{:?}", got.1);
    assert!(
        got.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{:?}",
        got.1
    );
}

struct Setup {
    _db: pg::TestDb,
    _ws: Workspace,
    collector: Collector,
    api: Api,
    viewer: String,
    operator: String,
    admin: String,
}

async fn setup() -> anyhow::Result<Setup> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    ws.write_service("web", &vigil_tests::web_front_service("web", "n1"))?;
    // Sets its interval but not `after`: the runtime max_error_count applies to it.
    ws.write_service(
        "broken",
        "id: broken\ncategory: system\nnode: n1\ncheck:\n  type: command\n  interval: 1s\n  argv: [\"/bin/sh\", \"-c\", \"echo CRITICAL - down; exit 2\"]\n",
    )?;
    let path = ws.write_collector(&db.url, &["n1"])?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let store = &collector.hub.store;
    let (viewer, _) = create_token(store, "viewer-1", Role::Viewer).await?;
    let (operator, _) = create_token(store, "operator-1", Role::Operator).await?;
    let (admin, _) = create_token(store, "admin-1", Role::Admin).await?;
    let api = Api {
        base: format!("http://{}", collector.http_addr.expect("http enabled")),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?,
    };
    Ok(Setup {
        _db: db,
        _ws: ws,
        collector,
        api,
        viewer,
        operator,
        admin,
    })
}

async fn health(s: &Setup, id: &str) -> anyhow::Result<Value> {
    let (st, v) = s
        .api
        .get(&format!("/api/services/health/{id}"), &s.viewer)
        .await?;
    anyhow::ensure!(st == StatusCode::OK, "{st}: {v}");
    Ok(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_roles_and_bad_input() -> anyhow::Result<()> {
    let s = setup().await?;
    let api = &s.api;
    // Settings first: `broken` must not go down before the test looks at it.
    let put = api
        .put(
            "/api/health-check/config",
            &s.admin,
            json!({"enabled": true, "interval_minutes": 1, "max_error_count": 100, "retry_after_hours": 2}),
        )
        .await?;
    assert_eq!(put.0, StatusCode::OK, "{}", put.1);
    assert_eq!(put.1["source"], "api");
    assert_eq!(put.1["max_error_count"], 100);
    assert_eq!(put.1["updated_by"], "api:admin-1");

    let agent = start_agent(&s._ws.write_agent("a", "n1", "n1", s.collector.grpc_addr)?).await?;
    connected(&agent).await?;

    // Authentication: JSON 401s.
    let none = api
        .call(reqwest::Method::GET, "/api/services/health", None, None)
        .await?;
    assert_error(&none, StatusCode::UNAUTHORIZED, "unauthorized");
    let wrong = api.get("/api/services/health", "vgl_1_0000").await?;
    assert_error(&wrong, StatusCode::UNAUTHORIZED, "unauthorized");
    let garbage = api.get("/api/services/health", "not-a-token").await?;
    assert_error(&garbage, StatusCode::UNAUTHORIZED, "unauthorized");

    // Health of every service, then of one.
    let web = wait_for("web healthy through the API", LIMIT, || async {
        let v = health(&s, "web").await?;
        Ok((v["is_healthy"] == true).then_some(v))
    })
    .await?;
    assert_eq!(web["status"], "running");
    assert_eq!(web["node"], "n1");
    assert_eq!(web["category"], "web");
    assert_eq!(web["name"], "Web front");
    assert_eq!(web["error_count"], 0);
    assert!(web["consecutive_successes"].as_i64().unwrap() >= 1);
    assert!(web["total_checks_24h"].as_i64().unwrap() >= 1);
    assert_eq!(web["success_rate_24h"], 100.0);
    assert!(web["uptime_seconds"].as_i64().is_some(), "{web}");
    assert!(web["last_check_at"].is_string() && web["last_response_ms"].is_number());
    let (st, all) = api.get("/api/services/health", &s.viewer).await?;
    assert_eq!(st, StatusCode::OK);
    let ids: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["broken", "web"]);
    let (_, filtered) = api
        .get(
            "/api/services/health?category=web&status=running",
            &s.viewer,
        )
        .await?;
    assert_eq!(filtered.as_array().unwrap().len(), 1);
    let (_, none_match) = api
        .get("/api/services/health?node=elsewhere", &s.viewer)
        .await?;
    assert_eq!(none_match.as_array().unwrap().len(), 0);
    assert_error(
        &api.get("/api/services/health?colour=red", &s.viewer)
            .await?,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &api.get("/api/services/health/nope", &s.viewer).await?,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    // Runtime settings in force without a restart: `broken` keeps failing but is not down
    // while max_error_count is 100 ...
    let failing = wait_for("broken fails 4 times", LIMIT, || async {
        let v = health(&s, "broken").await?;
        Ok((v["error_count"].as_i64().unwrap_or(0) >= 4).then_some(v))
    })
    .await?;
    assert_eq!(failing["state"], "failing", "{failing}");
    assert_eq!(failing["status"], "abnormal");
    assert_eq!(failing["is_healthy"], false);
    assert!(failing["last_error"].is_string());
    // ... and is down at its next failure once it is 2.
    let put = api
        .put(
            "/api/health-check/config",
            &s.admin,
            json!({"enabled": true, "interval_minutes": 1, "max_error_count": 2, "retry_after_hours": 1}),
        )
        .await?;
    assert_eq!(put.0, StatusCode::OK, "{}", put.1);
    wait_for(
        "broken down after the new max_error_count",
        LIMIT,
        || async { Ok((health(&s, "broken").await?["state"] == "down").then_some(())) },
    )
    .await?;
    let (st, cfg) = api.get("/api/health-check/config", &s.viewer).await?;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(cfg["max_error_count"], 2);
    assert_eq!(cfg["interval_minutes"], 1.0);
    assert_eq!(cfg["retry_after_hours"], 1.0);
    assert_eq!(cfg["enabled"], true);

    // Config: only admins change it; bad bodies are 400s naming the field.
    let body = json!({"enabled": true, "interval_minutes": 5, "max_error_count": 3, "retry_after_hours": 1});
    assert_error(
        &api.put("/api/health-check/config", &s.operator, body.clone())
            .await?,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &api.put("/api/health-check/config", &s.viewer, body).await?,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    for (bad, field) in [
        (
            json!({"enabled": true, "interval_minutes": 5, "max_error_count": 0, "retry_after_hours": 1}),
            "max_error_count",
        ),
        (
            json!({"enabled": true, "interval_minutes": 0, "max_error_count": 3, "retry_after_hours": 1}),
            "interval_minutes",
        ),
        (
            json!({"enabled": true, "interval_minutes": 5, "max_error_count": 3, "retry_after_hours": -1}),
            "retry_after_hours",
        ),
        (
            json!({"enabled": "yes", "interval_minutes": 5, "max_error_count": 3, "retry_after_hours": 1}),
            "enabled",
        ),
        (
            json!({"enabled": true, "interval_minutes": 5, "max_error_count": 3}),
            "retry_after_hours",
        ),
        (
            json!({"enabled": true, "interval_minutes": 5, "max_error_count": 3, "retry_after_hours": 1, "colour": 1}),
            "colour",
        ),
    ] {
        let got = api
            .put("/api/health-check/config", &s.admin, bad.clone())
            .await?;
        assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
        assert_eq!(got.1["field"], field, "{bad} -> {}", got.1);
    }
    let malformed = s
        .api
        .http
        .put(format!("{}/api/health-check/config", api.base))
        .bearer_auth(&s.admin)
        .header("content-type", "application/json")
        .body("{\"enabled\": tru")
        .send()
        .await?;
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let v: Value = malformed.json().await?;
    assert_eq!(v["error"], "bad_request");

    // Actions: viewers cannot, operators can; the command is followed to its outcome.
    assert_error(
        &api.post("/api/services/web/restart", &s.viewer).await?,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let (st, created) = api.post("/api/services/web/restart", &s.operator).await?;
    assert_eq!(st, StatusCode::ACCEPTED, "{created}");
    let id = created["command_id"].as_i64().unwrap();
    let done = wait_for("restart command finished", LIMIT, || async {
        let (st, c) = api.get(&format!("/api/commands/{id}"), &s.viewer).await?;
        anyhow::ensure!(st == StatusCode::OK, "{st}: {c}");
        Ok(c["finished_at"].is_string().then_some(c))
    })
    .await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["action"], "restart");
    assert_eq!(done["origin"], "manual");
    assert_eq!(done["requested_by"], "api:operator-1");
    assert_error(
        &api.get("/api/commands/999999", &s.viewer).await?,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &api.get("/api/commands/abc", &s.viewer).await?,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &api.post("/api/services/web/explode", &s.operator).await?,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &api.post("/api/services/nope/restart", &s.operator).await?,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &api.post("/api/services/broken/restart", &s.operator)
            .await?,
        StatusCode::CONFLICT,
        "conflict",
    );

    // Stop makes it `stopped`, start makes it active again; pause and resume.
    let (st, c) = api.post("/api/services/web/stop", &s.operator).await?;
    assert_eq!(st, StatusCode::ACCEPTED, "{c}");
    wait_for("web stopped", LIMIT, || async {
        Ok((health(&s, "web").await?["status"] == "stopped").then_some(()))
    })
    .await?;
    let (st, c) = api.post("/api/services/web/start", &s.operator).await?;
    assert_eq!(st, StatusCode::ACCEPTED, "{c}");
    wait_for("web active again", LIMIT, || async {
        Ok((health(&s, "web").await?["mode"] == "active").then_some(()))
    })
    .await?;
    let (st, paused) = api
        .post("/api/services/web/pause?minutes=30", &s.operator)
        .await?;
    assert_eq!(st, StatusCode::OK, "{paused}");
    assert_eq!(paused["status"], "paused");
    assert!(paused["paused_until"].is_string());
    let (_, resumed) = api.post("/api/services/web/resume", &s.operator).await?;
    assert_eq!(resumed["mode"], "active");
    assert_error(
        &api.post("/api/services/web/pause", &s.viewer).await?,
        StatusCode::FORBIDDEN,
        "forbidden",
    );

    // Force-check returns the result; with scheduled checks disabled it still works.
    assert_error(
        &api.post("/api/health-check/force/web", &s.viewer).await?,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let (st, forced) = api.post("/api/health-check/force/web", &s.operator).await?;
    assert_eq!(st, StatusCode::OK, "{forced}");
    assert_eq!(forced["result"]["status"], "ok", "{forced}");
    assert_eq!(forced["command"]["status"], "succeeded");
    let put = api
        .put(
            "/api/health-check/config",
            &s.admin,
            json!({"enabled": false, "interval_minutes": 1, "max_error_count": 2, "retry_after_hours": 1}),
        )
        .await?;
    assert_eq!(put.1["enabled"], false, "{}", put.1);
    let (st, forced) = api
        .post("/api/health-check/force/broken", &s.operator)
        .await?;
    assert_eq!(st, StatusCode::OK, "{forced}");
    assert_eq!(forced["result"]["status"], "critical", "{forced}");
    assert_error(
        &api.post("/api/health-check/force/nope", &s.operator)
            .await?,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    // History: results paginated, events, commands, daily roll-ups.
    let (st, page) = api
        .get("/api/services/web/results?limit=2", &s.viewer)
        .await?;
    assert_eq!(st, StatusCode::OK, "{page}");
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let before = page["next_before"].as_i64().expect("a next page");
    assert_eq!(before, items[1]["id"].as_i64().unwrap());
    let (_, next) = api
        .get(
            &format!("/api/services/web/results?limit=2&before={before}"),
            &s.viewer,
        )
        .await?;
    assert!(
        next["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["id"].as_i64().unwrap() < before)
    );
    assert!(items[0]["status"] == "ok" && items[0]["started_at"].is_string());
    let (_, future) = api
        .get(
            "/api/services/web/results?since=2999-01-01T00:00:00Z",
            &s.viewer,
        )
        .await?;
    assert_eq!(future["items"].as_array().unwrap().len(), 0);
    assert_eq!(future["next_before"], Value::Null);
    for bad in ["limit=0", "limit=1001", "limit=abc", "since=yesterday"] {
        let got = api
            .get(&format!("/api/services/web/results?{bad}"), &s.viewer)
            .await?;
        assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
    }
    assert_error(
        &api.get("/api/services/nope/results", &s.viewer).await?,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let (_, events) = api.get("/api/services/web/events", &s.viewer).await?;
    let events = events["items"].as_array().unwrap().clone();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "state" && e["to_state"] == "healthy"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "mode" && e["to_state"] == "stopped"),
        "{events:?}"
    );
    let (_, cmds) = api.get("/api/services/web/commands", &s.viewer).await?;
    // (Leaving out the checks that verify a successful start or restart.)
    let actions: Vec<&str> = cmds
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| !(c["action"] == "check" && c["origin"] == "auto"))
        .map(|c| c["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.starts_with(&["check", "start", "stop", "restart"]),
        "{actions:?}"
    );
    // Daily roll-ups are merged as results are stored: nothing to wait for.
    let (st, daily) = api
        .get("/api/services/broken/daily?days=7", &s.viewer)
        .await?;
    assert_eq!(st, StatusCode::OK, "{daily}");
    let today = &daily.as_array().unwrap()[0];
    assert!(today["checks"].as_i64().unwrap() >= 4, "{today}");
    assert_eq!(today["checks"], today["failures"], "{today}");
    assert!(
        today["avg_ms"].is_number() && today["p95_ms"].is_number(),
        "{today}"
    );
    assert!(today["metrics"].is_object(), "{today}");
    assert_error(
        &api.get("/api/services/web/daily?days=0", &s.viewer).await?,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );

    // Nodes.
    let (st, nodes) = api.get("/api/nodes", &s.viewer).await?;
    assert_eq!(st, StatusCode::OK);
    let n1 = &nodes.as_array().unwrap()[0];
    assert_eq!(n1["name"], "n1");
    assert_eq!(n1["connected"], true);
    assert_eq!(n1["agent_connected"], true);
    assert_eq!(n1["services"], 2);
    assert!(
        n1["agent_version"].is_string() && n1["last_seen"].is_string(),
        "{n1}"
    );
    assert!(n1["capabilities"].is_object(), "{n1}");

    // The OpenAPI document lists every endpoint.
    let (st, doc) = api
        .call(reqwest::Method::GET, "/api/openapi.json", None, None)
        .await?;
    assert_eq!(st, StatusCode::OK);
    for p in [
        "/api/services/health",
        "/api/services/health/{id}",
        "/api/health-check/force/{id}",
        "/api/health-check/config",
        "/api/services/{id}/{action}",
        "/api/commands/{id}",
        "/api/services/{id}/results",
        "/api/services/{id}/events",
        "/api/services/{id}/commands",
        "/api/services/{id}/daily",
        "/api/nodes",
        "/api/services/{id}/availability",
        "/api/nodes/{node}/availability",
        "/api/categories/{category}/availability",
    ] {
        assert!(
            doc["paths"][p].is_object(),
            "{p} missing from the OpenAPI document"
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    assert_error(
        &api.get("/api/nothing-here", &s.viewer).await?,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    // A revoked token is refused at once.
    s.collector.hub.store.revoke_token("viewer-1").await?;
    assert_error(
        &api.get("/api/services/health", &s.viewer).await?,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );

    agent.shutdown().await;
    s.collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_session_needs_csrf_for_changes() -> anyhow::Result<()> {
    let s = setup().await?;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()?;
    let base = &s.api.base;
    // A wrong token does not log in.
    let r = http
        .post(format!("{base}/login"))
        .form(&[("token", "vgl_1_nope")])
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get("set-cookie").is_none());
    // The right one opens a session: HttpOnly, SameSite=Strict.
    let r = http
        .post(format!("{base}/login"))
        .form(&[("token", s.operator.as_str())])
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let cookie = r.headers()["set-cookie"].to_str()?.to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    // Reading with the cookie works; the page carries the CSRF token.
    let r = http
        .get(format!("{base}/api/services/health"))
        .header("cookie", &session)
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);
    let page = http
        .get(format!("{base}/"))
        .header("cookie", &session)
        .send()
        .await?
        .text()
        .await?;
    let csrf = page
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("the page carries a CSRF token")
        .to_string();
    // A change without the CSRF token is refused, with it accepted.
    let r = http
        .post(format!("{base}/api/services/web/pause"))
        .header("cookie", &session)
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = http
        .post(format!("{base}/api/services/web/pause"))
        .header("cookie", &session)
        .header("x-csrf-token", "0000")
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = http
        .post(format!("{base}/api/services/web/pause"))
        .header("cookie", &session)
        .header("x-csrf-token", &csrf)
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);
    // Without a session the dashboard sends you to the login page.
    let r = http.get(format!("{base}/")).send().await?;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], "/login");
    // Logging out ends the session.
    let r = http
        .post(format!("{base}/logout"))
        .header("cookie", &session)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = http
        .get(format!("{base}/api/services/health"))
        .header("cookie", &session)
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    s.collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_cli_creates_lists_and_revokes() -> anyhow::Result<()> {
    let s = setup().await?;
    let exe = vigil_tests::binary("vigil-collector")?;
    let config = s._ws.path().join("collector.yaml");
    let run = |args: &[&str]| {
        std::process::Command::new(&exe)
            .arg("token")
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
    };
    let out = run(&["create", "--role", "operator", "--name", "ci-bot"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    assert!(token.starts_with("vgl_"), "{token}");
    // Only a hash is stored.
    let db = s._db.connect().await?;
    let hash: String = db
        .query_one(
            "SELECT secret_hash FROM api_tokens WHERE name = 'ci-bot'",
            &[],
        )
        .await?
        .get(0);
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!token.contains(&hash) && !hash.contains(token.rsplit('_').next().unwrap()));
    // The token works, with its role.
    let (st, _) = s.api.get("/api/nodes", &token).await?;
    assert_eq!(st, StatusCode::OK);
    assert_error(
        &s.api
            .put(
                "/api/health-check/config",
                &token,
                json!({"enabled": true, "interval_minutes": 5, "max_error_count": 3, "retry_after_hours": 1}),
            )
            .await?,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    // The same name twice is refused; an unknown role too.
    let dup = run(&["create", "--role", "viewer", "--name", "ci-bot"])?;
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("exists already"));
    let bad = run(&["create", "--role", "root", "--name", "x"])?;
    assert!(!bad.status.success());
    // List shows it without its secret; revoke ends it.
    let list = String::from_utf8(run(&["list"])?.stdout)?;
    assert!(
        list.contains("ci-bot") && list.contains("operator") && list.contains("active"),
        "{list}"
    );
    assert!(!list.contains(&token));
    assert!(run(&["revoke", "ci-bot"])?.status.success());
    let list = String::from_utf8(run(&["list"])?.stdout)?;
    assert!(list.contains("revoked"), "{list}");
    assert!(!run(&["revoke", "ci-bot"])?.status.success());
    let (st, _) = s.api.get("/api/nodes", &token).await?;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    s.collector.shutdown().await;
    Ok(())
}

/// Every path and query parameter of every endpoint, with `X` where the hostile value goes, and
/// the token that may call it.
const PARAMETERS: &[(&str, &str, bool)] = &[
    ("GET", "/api/services/health?category=X", false),
    ("GET", "/api/services/health?node=X", false),
    ("GET", "/api/services/health?status=X", false),
    ("GET", "/api/services/health/X", false),
    ("POST", "/api/health-check/force/X?wait=0", true),
    ("POST", "/api/health-check/force/web?wait=X", true),
    ("GET", "/api/services/X/results", false),
    ("GET", "/api/services/web/results?since=X", false),
    ("GET", "/api/services/web/results?limit=X", false),
    ("GET", "/api/services/web/results?before=X", false),
    ("GET", "/api/services/X/events", false),
    ("GET", "/api/services/web/events?limit=X", false),
    ("GET", "/api/services/web/events?before=X", false),
    ("GET", "/api/services/X/commands", false),
    ("GET", "/api/services/web/commands?limit=X", false),
    ("GET", "/api/services/X/daily", false),
    ("GET", "/api/services/web/daily?days=X", false),
    ("POST", "/api/services/X/restart", true),
    ("POST", "/api/services/X/pause", true),
    ("POST", "/api/services/web/X", true),
    ("POST", "/api/services/web/pause?minutes=X", true),
    ("GET", "/api/commands/X", false),
    ("GET", "/api/incidents?open=X", false),
    ("GET", "/api/incidents?service=X", false),
    ("GET", "/api/incidents?limit=X", false),
    ("GET", "/api/incidents/X", false),
    ("POST", "/api/incidents/X/ack", true),
    ("GET", "/api/maintenance/X", false),
    ("GET", "/api/services/X/availability", false),
    ("GET", "/api/services/web/availability?from=X", false),
    ("GET", "/api/services/web/availability?to=X", false),
    ("GET", "/api/nodes/X/availability", false),
    ("GET", "/api/nodes/n1/availability?from=X", false),
    ("GET", "/api/categories/X/availability", false),
    ("GET", "/api/categories/web/availability?to=X", false),
    ("DELETE", "/api/maintenance/X", true),
    ("GET", "/api/X", false),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_and_invalid_utf8_are_bad_input_never_an_outage() -> anyhow::Result<()> {
    let s = setup().await?;
    for (method, template, operator) in PARAMETERS {
        for hostile in ["%00", "a%00b", "%FF", "%C3%28", "web%00"] {
            let path = template.replace('X', hostile);
            let token = if *operator { &s.operator } else { &s.viewer };
            let got = s
                .api
                .call(method.parse()?, &path, Some(token), None)
                .await?;
            assert!(
                got.0 == StatusCode::BAD_REQUEST || got.0 == StatusCode::NOT_FOUND,
                "{method} {path}: {} {:?}",
                got.0,
                got.1
            );
            assert!(
                matches!(got.1["error"].as_str(), Some("bad_request" | "not_found")),
                "{method} {path}: {:?}",
                got.1
            );
        }
    }
    // A NUL inside a JSON body reaches PostgreSQL, which refuses it: the request's fault (400),
    // not an outage (503).
    let got = s
        .api
        .call(
            reqwest::Method::POST,
            "/api/maintenance",
            Some(&s.operator),
            Some(json!({"name": "a\u{0}b", "services": ["web"], "duration": "1h"})),
        )
        .await?;
    assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
    // The mapping itself: PostgreSQL's data errors (class 22) are bad input, the rest is not.
    let err = s
        .collector
        .hub
        .store
        .health(Some("a\0b"), true)
        .await
        .expect_err("PostgreSQL refuses a NUL in text");
    assert!(err.is_bad_input(), "{err}");
    let api = vigil_collector::web::ApiError::from(err);
    assert_eq!(api.status, StatusCode::BAD_REQUEST);
    s.collector.shutdown().await;
    Ok(())
}

/// The names of the query parameters the handlers read.
const QUERY_PARAMETERS: &[&str] = &[
    "category", "node", "status", "wait", "limit", "before", "since", "days", "minutes", "open",
    "service", "from", "to",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_declares_parameters_and_errors() -> anyhow::Result<()> {
    let s = setup().await?;
    let (st, doc) = s
        .api
        .call(reqwest::Method::GET, "/api/openapi.json", None, None)
        .await?;
    assert_eq!(st, StatusCode::OK);
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 15, "{paths:?}");
    let mut seen_query = std::collections::BTreeSet::new();
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("path item") {
            let what = format!("{method} {path}");
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            for p in &params {
                let name = p["name"].as_str().expect("name");
                match p["in"].as_str() {
                    Some("path") => assert!(
                        path.contains(&format!("{{{name}}}")),
                        "{what}: path parameter {name} is not in the path"
                    ),
                    Some("query") => {
                        assert!(QUERY_PARAMETERS.contains(&name), "{what}: query {name}");
                        assert_ne!(p["required"], true, "{what}: {name} is optional");
                        seen_query.insert(name.to_string());
                    }
                    other => panic!("{what}: {name} in {other:?}"),
                }
            }
            let responses = op["responses"].as_object().expect("responses");
            let mut need = vec!["401", "503"];
            if !params.is_empty() || op.get("requestBody").is_some() {
                need.push("400");
            }
            if path.contains('{') {
                need.push("404");
            }
            for code in need {
                let r = responses
                    .get(code)
                    .unwrap_or_else(|| panic!("{what}: {code} undocumented"));
                assert_eq!(
                    r["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{what} {code}"
                );
            }
        }
    }
    assert_eq!(
        seen_query.len(),
        QUERY_PARAMETERS.len(),
        "every query parameter is documented: {seen_query:?}"
    );
    // The schemas say what is answered: the settings view has its provenance, results carry
    // their metrics as an array.
    let schemas = &doc["components"]["schemas"];
    let view = &schemas["HealthConfigView"];
    for field in [
        "enabled",
        "interval_minutes",
        "source",
        "updated_at",
        "updated_by",
    ] {
        assert!(
            view["properties"].get(field).is_some(),
            "HealthConfigView.{field}: {view}"
        );
    }
    assert_eq!(
        schemas["ResultRow"]["properties"]["metrics"]["type"],
        "array"
    );
    s.collector.shutdown().await;
    Ok(())
}

/// The document validated by openapi-spec-validator and the live API checked against it by
/// schemathesis, with a viewer's and an operator's token: no server error, no undocumented
/// status code or content type, no response outside its schema. The tools come from PyPI in a
/// virtualenv that `deploy/conformance.sh` makes; it runs this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs openapi-spec-validator and schemathesis: run deploy/conformance.sh"]
async fn conformance_with_schemathesis() -> anyhow::Result<()> {
    let venv = std::env::var("VIGIL_CONFORMANCE_VENV")
        .map_err(|_| anyhow::anyhow!("set VIGIL_CONFORMANCE_VENV (deploy/conformance.sh does)"))?;
    let bin = std::path::Path::new(&venv).join("bin");
    let s = setup().await?;
    // With its agent connected, a force-check answers within a second instead of waiting out
    // its `wait` for a node that never runs it.
    let agent = start_agent(&s._ws.write_agent("a", "n1", "n1", s.collector.grpc_addr)?).await?;
    connected(&agent).await?;
    let url = format!("{}/api/openapi.json", s.api.base);
    let (st, doc) = s
        .api
        .call(reqwest::Method::GET, "/api/openapi.json", None, None)
        .await?;
    assert_eq!(st, StatusCode::OK);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&doc)?)?;
    let out = tokio::process::Command::new(bin.join("openapi-spec-validator"))
        .arg(&file)
        .output()
        .await?;
    assert!(
        out.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let examples = std::env::var("VIGIL_CONFORMANCE_EXAMPLES").unwrap_or_else(|_| "25".into());
    let max_time = std::env::var("VIGIL_CONFORMANCE_SECONDS").unwrap_or_else(|_| "40".into());
    for (who, token) in [("viewer", &s.viewer), ("operator", &s.operator)] {
        let reports = tempfile::tempdir()?;
        let out = tokio::process::Command::new(bin.join("st"))
            // One worker: hypothesis describes its filters by parsing their source with `ast`,
            // which Python 3.11 cannot do from two threads at once ("AST constructor recursion
            // depth mismatch", a runtime error of the tool, not a finding about the API).
            .args(["run", &url, "--no-color", "--workers", "1"])
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,\
                 response_schema_conformance",
            ])
            .args(["--max-examples", &examples, "--max-time", &max_time])
            // Longer than the longest `wait` a force-check may be given (120 s).
            .args(["--request-timeout", "130", "--generation-database", "none"])
            .arg("--report-dir")
            .arg(reports.path())
            .env("SCHEMATHESIS_HOOKS", "")
            .output()
            .await?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("schemathesis as {who}:\n{text}");
        assert!(
            out.status.success(),
            "schemathesis as {who} failed (its report is above)"
        );
    }
    s.collector.shutdown().await;
    Ok(())
}
