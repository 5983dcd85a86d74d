//! Dashboard in a real browser (headless Chromium via chromedriver and fantoccini): login, live
//! status badges over server-sent events, a confirmed restart followed to "succeeded", a pause
//! seen without reloading, and the service and nodes pages; a maintenance window created from
//! the service page and its badge in the list; the service page's uptime bars, with no console
//! errors.

use std::time::Duration;

use fantoccini::Locator;
use reqwest::StatusCode;
use vigil_collector::web::auth::{Role, create_token};
use vigil_collector::{Collector, Config};
use vigil_tests::browser::Browser;
use vigil_tests::{Workspace, connected, init, pg, start_agent, wait_for};

const LIMIT: Duration = Duration::from_secs(60);
const BADGE: &str = r#"tr[data-service="web"] [data-field="status"]"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_live_updates_and_restart() -> anyhow::Result<()> {
    init();
    // The browser first: a missing chromedriver fails the test with an install hint.
    let browser = Browser::start().await?;
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    ws.write_service("web", &vigil_tests::web_front_service("web", "n1"))?;
    ws.write_service(
        "db",
        "id: db\nname: Database\ncategory: system\nnode: n1\n\
         check:\n  type: command\n  interval: 1s\n  argv: [\"/bin/true\"]\n",
    )?;
    let path = ws.write_collector(&db.url, &["n1"])?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let (token, _) = create_token(&collector.hub.store, "operator-1", Role::Operator).await?;
    let base = format!("http://{}", collector.http_addr.expect("http enabled"));
    let agent = start_agent(&ws.write_agent("a", "n1", "n1", collector.grpc_addr)?).await?;
    connected(&agent).await?;

    let c = &browser.client;

    // Not logged in: the dashboard sends the browser to /login.
    c.goto(&format!("{base}/")).await?;
    let url = c.current_url().await?;
    assert_eq!(url.path(), "/login", "{url}");
    c.find(Locator::Css("#token"))
        .await?
        .send_keys(&token)
        .await?;
    c.find(Locator::Css("#login")).await?.click().await?;

    // The services page lists both services; the badge turns "running" live.
    wait_for("the services page after login", LIMIT, || async {
        Ok(browser
            .exists(r#"tr[data-service="web"]"#)
            .await?
            .then_some(()))
    })
    .await?;
    assert_eq!(c.current_url().await?.path(), "/");
    assert!(browser.exists(r#"tr[data-service="db"]"#).await?);
    browser.wait_text(BADGE, "running", LIMIT).await?;

    // Restart, confirmed: the flash line follows the command to "succeeded".
    browser.js("window.confirm = () => true;").await?;
    c.find(Locator::Css(
        r#"tr[data-service="web"] button[data-action="restart"]"#,
    ))
    .await?
    .click()
    .await?;
    let status = browser
        .wait_attr("#flash .msg", "data-command-status", LIMIT, |s| {
            matches!(
                s,
                "succeeded" | "failed" | "error" | "timed_out" | "cancelled"
            )
        })
        .await?;
    let line = browser.text("#flash .msg").await?;
    assert_eq!(status, "succeeded", "flash: {line}");

    // A pause through the REST API shows up on the open page without a reload.
    let marker: bool = browser
        .js("window.__vigilNoReload = true; return true;")
        .await?
        .as_bool()
        .unwrap_or(false);
    assert!(marker);
    let resp = reqwest::Client::new()
        .post(format!("{base}/api/services/web/pause"))
        .bearer_auth(&token)
        .send()
        .await?;
    let st = resp.status();
    let body = resp.text().await?;
    assert_eq!(st, StatusCode::OK, "{body}");
    browser.wait_text(BADGE, "paused", LIMIT).await?;
    let same_page = browser
        .js("return window.__vigilNoReload === true;")
        .await?;
    assert_eq!(
        same_page,
        serde_json::Value::Bool(true),
        "the page was reloaded"
    );

    // The service page: timeline and (once there are two results) the response-time chart.
    c.goto(&format!("{base}/services/web")).await?;
    wait_for(
        "svg.timeline and svg.chart on /services/web",
        LIMIT,
        || async {
            if browser.exists("svg.timeline").await? && browser.exists("svg.chart").await? {
                return Ok(Some(()));
            }
            c.refresh().await?;
            Ok(None)
        },
    )
    .await?;

    // Uptime bars: 24 h per hour, 7/30/90 days per day, each range's figure as text and each
    // bar's in words (not only in colour); no console errors on the page.
    let bars = browser
        .js("return ['24h', '7d', '30d', '90d'].map(r => \
             document.querySelectorAll(`section.uptime [data-range=\"${r}\"] li.bar`).length);")
        .await?;
    assert_eq!(bars, serde_json::json!([24, 7, 30, 90]));
    let figure = browser.text(r#"[data-field="uptime-24h"]"#).await?;
    assert_eq!(
        figure, "100.00 %",
        "web was healthy, then paused (not counted)"
    );
    let sr = browser
        .js(
            "const b = document.querySelectorAll('section.uptime [data-range=\"24h\"] li.bar'); \
             return b[b.length - 1].textContent;",
        )
        .await?;
    assert!(
        sr.as_str().is_some_and(|t| t.contains("UTC: 100.00 %")),
        "the current hour's bar says its figure in words: {sr}"
    );
    let errors = browser.console_errors().await?;
    assert!(
        errors.is_empty(),
        "console errors on /services/web: {errors:?}"
    );

    // The nodes page lists the agent's node.
    c.goto(&format!("{base}/nodes")).await?;
    assert!(
        browser.exists(r#"tr[data-node="n1"]"#).await?,
        "no n1 row on /nodes"
    );

    browser.close().await?;
    drop(agent);
    Ok(())
}

/// The service page's maintenance form creates a one-off window for the service (with the
/// session's CSRF token); the page then says until when, and the services list shows the
/// "maintenance" badge (and no "gave up" badge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_form_and_badges() -> anyhow::Result<()> {
    init();
    let browser = Browser::start().await?;
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.write_service("web", &vigil_tests::web_front_service("web", "n1"))?;
    ws.write_service("db", &vigil_tests::true_service("db", "n1"))?;
    let path = ws.write_collector(&db.url, &["n1"])?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let (token, _) = create_token(&collector.hub.store, "operator-1", Role::Operator).await?;
    let base = format!("http://{}", collector.http_addr.expect("http enabled"));
    let c = &browser.client;
    c.goto(&format!("{base}/login")).await?;
    c.find(Locator::Css("#token"))
        .await?
        .send_keys(&token)
        .await?;
    c.find(Locator::Css("#login")).await?.click().await?;
    wait_for("the services page after login", LIMIT, || async {
        Ok(browser
            .exists(r#"tr[data-service="web"]"#)
            .await?
            .then_some(()))
    })
    .await?;
    let hidden = |css: &'static str| {
        let b = &browser;
        async move {
            let v = b
                .js(&format!("return document.querySelector('{css}').hidden;"))
                .await?;
            anyhow::Ok(v.as_bool())
        }
    };
    const MAINT: &str = r#"tr[data-service="web"] [data-field="maintenance"]"#;
    assert_eq!(hidden(MAINT).await?, Some(true));

    c.goto(&format!("{base}/services/web")).await?;
    assert!(
        browser
            .text("#maintenance-now")
            .await?
            .contains("Not in maintenance")
    );
    c.find(Locator::Css(r#"#maintenance-form input[name="name"]"#))
        .await?
        .send_keys("browser window")
        .await?;
    c.find(Locator::Css(r#"#maintenance-form button[type="submit"]"#))
        .await?
        .click()
        .await?;
    let outcome = browser
        .wait_attr("#flash .msg", "data-maintenance", LIMIT, |s| {
            matches!(s, "created" | "error")
        })
        .await?;
    let line = browser.text("#flash .msg").await?;
    assert_eq!(outcome, "created", "flash: {line}");
    // The page reloads and says until when.
    let now_text = wait_for("the page to say until when", LIMIT, || async {
        let t = browser.text("#maintenance-now").await.unwrap_or_default();
        Ok(t.contains("browser window").then_some(t))
    })
    .await?;
    assert!(now_text.contains("until"), "{now_text}");
    let m: Option<i64> = db
        .connect()
        .await?
        .query_one(
            "SELECT maintenance_id FROM service_state WHERE service_id = 'web'",
            &[],
        )
        .await?
        .get(0);
    assert!(m.is_some(), "web not in maintenance in the database");

    c.goto(&format!("{base}/")).await?;
    assert_eq!(hidden(MAINT).await?, Some(false));
    assert_eq!(
        hidden(r#"tr[data-service="web"] [data-field="gave_up"]"#).await?,
        Some(true)
    );
    assert_eq!(
        hidden(r#"tr[data-service="db"] [data-field="maintenance"]"#).await?,
        Some(true)
    );
    browser.close().await?;
    collector.shutdown().await;
    Ok(())
}
