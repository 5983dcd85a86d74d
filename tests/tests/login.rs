//! POST /login against a real collector: a cross-origin form is refused (login CSRF), the
//! dashboard's own form and a client without Origin or Referer (curl) log in.

use reqwest::StatusCode;
use reqwest::header::{ORIGIN, REFERER, SET_COOKIE};
use vigil_collector::web::auth::{Role, create_token};
use vigil_collector::{Collector, Config};
use vigil_tests::{Workspace, init, pg};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_origin_login_is_refused() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    let path = ws.write_collector(&db.url, &["n1"])?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let (token, _) = create_token(&collector.hub.store, "viewer-1", Role::Viewer).await?;
    let base = format!("http://{}", collector.http_addr.expect("http enabled"));
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let post = |h: Option<(reqwest::header::HeaderName, String)>| {
        let mut req = http
            .post(format!("{base}/login"))
            .form(&[("token", token.as_str())]);
        if let Some((k, v)) = h {
            req = req.header(k, v);
        }
        req.send()
    };

    for bad in [
        (ORIGIN, "https://evil.example".to_string()),
        (ORIGIN, "null".to_string()),
        (REFERER, "https://evil.example/phish".to_string()),
    ] {
        let resp = post(Some(bad.clone())).await?;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{bad:?}");
        assert!(resp.headers().get(SET_COOKIE).is_none(), "{bad:?}");
        let body = resp.text().await?;
        assert!(body.contains("login refused"), "{bad:?}: {body}");
    }

    for good in [
        Some((ORIGIN, base.clone())),
        Some((REFERER, format!("{base}/login"))),
        None,
    ] {
        let resp = post(good.clone()).await?;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{good:?}");
        let cookie = resp
            .headers()
            .get(SET_COOKIE)
            .and_then(|c| c.to_str().ok())
            .unwrap_or_default();
        assert!(cookie.starts_with("vigil_session="), "{good:?}: {cookie}");
    }
    collector.shutdown().await;
    Ok(())
}
