//! Alerts end to end (real PostgreSQL, collector, agent): an alert outlives a receiver outage
//! and a SIGKILLed collector and arrives once; flapping sends flapping/flapping_ended and nothing
//! in between; a dependent's alert is suppressed and named by its dependency's; a pause closes
//! the incident as silenced; reminders come from the database and survive a restart; email over
//! STARTTLS to a real SMTP server (aiosmtpd); PagerDuty trigger then resolve; against the store
//! alone: late and lost incidents caught up, node maintenance, the quiet-rule lock, the lease.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use vigil_collector::web::auth::{Role, create_token};
use vigil_collector::{Collector, Config, Store};
use vigil_tests::{
    Killed, Workspace, connected, free_port, init, pg, spawn_collector, start_agent, wait_for,
};

const LIMIT: Duration = Duration::from_secs(60);

/// A receiver on 127.0.0.1:0 recording every JSON post with its Idempotency-Key; answers 503
/// while `down` is set.
struct Hook {
    url: String,
    got: Arc<Mutex<Vec<(String, Value)>>>,
    down: Arc<AtomicBool>,
    refused: Arc<Mutex<usize>>,
}

impl Hook {
    async fn start(path: &str) -> anyhow::Result<Hook> {
        use axum::{Json, Router, http::HeaderMap, http::StatusCode, routing::post};
        let got = Arc::new(Mutex::new(Vec::new()));
        let down = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(Mutex::new(0));
        let (g, d, r) = (got.clone(), down.clone(), refused.clone());
        let app = Router::new().route(
            path,
            post(move |h: HeaderMap, Json(v): Json<Value>| {
                let (g, d, r) = (g.clone(), d.clone(), r.clone());
                async move {
                    if d.load(Ordering::SeqCst) {
                        *r.lock().unwrap() += 1;
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let key = h
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    g.lock().unwrap().push((key, v));
                    StatusCode::ACCEPTED
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}{path}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Hook {
            url,
            got,
            down,
            refused,
        })
    }

    fn events(&self) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, v)| {
                let field = |k: &str| v[k].as_str().unwrap_or("").to_string();
                let ev = v["event"]
                    .as_str()
                    .or(v["event_action"].as_str())
                    .unwrap_or("");
                format!("{ev}:{}", field("service"))
            })
            .collect()
    }

    fn named(&self, event: &str) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, v)| v["event"] == event)
            .map(|(_, v)| v.clone())
            .collect()
    }

    async fn wait(&self, event: &str, n: usize, limit: Duration) -> anyhow::Result<()> {
        wait_for(&format!("{n} {event} alert(s)"), limit, || {
            let k = self.named(event).len();
            async move { Ok((k >= n).then_some(())) }
        })
        .await
        .with_context(|| format!("alerts so far: {:?}", self.events()))
    }
}

/// A command check that passes while `flag` exists.
fn flagged(id: &str, flag: &Path, extra: &str) -> String {
    format!(
        "id: {id}\ncategory: api\nnode: n1\ncheck:\n  type: command\n  interval: 1s\n  argv: [\"/bin/sh\", \"-c\", \"test -f {} || exit 2\"]\n{extra}",
        flag.display()
    )
}

/// Writes collector.yaml with `notify` appended (and optional fixed ports).
fn collector_yaml(ws: &Workspace, db: &str, notify: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = ws.write_collector(db, &["n1"])?;
    let mut text = std::fs::read_to_string(&path)?;
    text.push_str(notify);
    std::fs::write(&path, text)?;
    Ok(path)
}

async fn count(db: &tokio_postgres::Client, sql: &str) -> anyhow::Result<i64> {
    Ok(db.query_one(sql, &[]).await?.get(0))
}

/// The receiver answers 503 while the service goes down; the collector is SIGKILLed and
/// started again during the outage; when the receiver is back, the down alert arrives exactly
/// once, with its stable id as Idempotency-Key, and the failed attempts are in the API.
///
/// The outage lasts 2 minutes (the collector is killed after one); with `max_backoff: 10s` the
/// alert is tried every 10 s by then, so it arrives within about 10 s of the receiver's return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_survives_receiver_outage_and_collector_sigkill() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    let hook = Hook::start("/hook").await?;
    hook.down.store(true, Ordering::SeqCst);
    let flag = ws.path().join("never");
    ws.write_service("app", &flagged("app", &flag, "on_failure:\n  after: 1\n"))?;
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
        );
    std::fs::write(
        &path,
        format!(
            "{text}notify:\n  max_backoff: 10s\n  webhooks:\n    - {{ url: \"{}\" }}\n",
            hook.url
        ),
    )?;
    let outage = std::time::Instant::now();
    let first = spawn_collector(&path)?;
    let agent =
        start_agent(&ws.write_agent("a", "n1", "n1", format!("127.0.0.1:{grpc}").parse()?)?)
            .await?;
    connected(&agent).await?;
    let client = db.connect().await?;
    let attempts = || {
        let client = &client;
        async move { count(client, "SELECT count(*) FROM alert_attempts").await }
    };
    wait_for("two failed attempts", LIMIT, || async {
        Ok((attempts().await? >= 2).then_some(()))
    })
    .await?;
    // A minute into the outage: SIGKILL, then a new collector on the same database.
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(outage.elapsed())).await;
    drop(first);
    let before = attempts().await?;
    let _second = spawn_collector(&path)?;
    wait_for(
        "two more failed attempts after the restart",
        LIMIT,
        || async { Ok((attempts().await? >= before + 2).then_some(())) },
    )
    .await?;
    // The receiver stays down for 2 minutes in all (a scenario's length, not a wait for
    // something to happen).
    tokio::time::sleep(Duration::from_secs(120).saturating_sub(outage.elapsed())).await;
    assert!(hook.got.lock().unwrap().is_empty());
    hook.down.store(false, Ordering::SeqCst);
    hook.wait("down", 1, LIMIT).await?;
    wait_for("delivered_at recorded", LIMIT, || {
        let client = &client;
        async move {
            Ok((count(
                client,
                "SELECT count(*) FROM alerts WHERE delivered_at IS NOT NULL",
            )
            .await?
                == 1)
                .then_some(()))
        }
    })
    .await?;
    let got = hook.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{:?}", hook.events());
    let (key, body) = &got[0];
    assert_eq!(body["event"], "down");
    assert_eq!(body["service"], "app");
    assert!(
        !key.is_empty() && body["id"] == key.as_str(),
        "{key} {body}"
    );
    assert!(*hook.refused.lock().unwrap() >= 4);

    // The API shows the incident, its alert and every attempt.
    let store = Store::connect(&db.url, 1).await?;
    let (token, _) = create_token(&store, "viewer", Role::Viewer).await?;
    let http_client = reqwest::Client::new();
    let get = |url: String| {
        let req = http_client.get(url).bearer_auth(&token);
        async move {
            anyhow::Ok(
                req.send()
                    .await?
                    .error_for_status()?
                    .json::<Value>()
                    .await?,
            )
        }
    };
    let list = get(format!(
        "http://127.0.0.1:{http}/api/incidents?open=true&service=app"
    ))
    .await?;
    let id = list[0]["id"].as_i64().context("an incident")?;
    assert_eq!(list[0]["family"], "service");
    assert_eq!(list[0]["alerts_pending"], 0);
    let one = get(format!("http://127.0.0.1:{http}/api/incidents/{id}")).await?;
    let alert = &one["alerts"][0];
    assert_eq!(alert["uid"], key.as_str());
    let history = alert["history"].as_array().context("history")?;
    assert!(history.len() >= 5, "{history:?}");
    assert!(
        history[..history.len() - 1]
            .iter()
            .all(|a| a["ok"] == false && a["http_status"] == 503)
    );
    assert_eq!(history.last().unwrap()["ok"], true);
    agent.shutdown().await;
    Ok(())
}

/// A check alternating pass/fail every second: one `flapping` alert, no down/recovered while it
/// flaps, one `flapping_ended` once it passes steadily.
///
/// It flaps for 3 minutes (180 results at 1 s) after flapping was detected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_sends_two_alerts_and_nothing_in_between() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    let hook = Hook::start("/hook").await?;
    let steady = ws.path().join("steady");
    let ctr = ws.path().join("ctr");
    let (s, c) = (steady.display(), ctr.display());
    ws.write_service(
        "flappy",
        &format!(
            "id: flappy\ncategory: api\nnode: n1\ncheck:\n  type: command\n  interval: 1s\n  argv: [\"/bin/sh\", \"-c\", \
             \"test -f {s} && exit 0; n=$(cat {c} 2>/dev/null || echo 0); echo $((n+1)) > {c}; [ $((n % 2)) -eq 0 ] && exit 0; exit 2\"]\n\
             on_failure:\n  after: 1\n  recover_after: 1\n"
        ),
    )?;
    let path = collector_yaml(
        &ws,
        &db.url,
        &format!("notify:\n  webhooks:\n    - {{ url: \"{}\" }}\n", hook.url),
    )?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let agent = start_agent(&ws.write_agent("a", "n1", "n1", collector.grpc_addr)?).await?;
    connected(&agent).await?;
    hook.wait("flapping", 1, LIMIT).await?;
    let at_flapping = hook.events().len();
    let client = db.connect().await?;
    let results = || {
        let client = &client;
        async move {
            count(
                client,
                "SELECT count(*) FROM check_results WHERE service_id = 'flappy'",
            )
            .await
        }
    };
    let n = results().await?;
    wait_for(
        "180 more results (3 minutes) while flapping",
        Duration::from_secs(300),
        || async { Ok((results().await? >= n + 180).then_some(())) },
    )
    .await?;
    std::fs::write(&steady, "")?;
    hook.wait("flapping_ended", 1, Duration::from_secs(120))
        .await?;
    let events = hook.events();
    let end = events
        .iter()
        .position(|e| e == "flapping_ended:flappy")
        .unwrap();
    let between = &events[at_flapping..end];
    assert!(
        between
            .iter()
            .all(|e| !e.starts_with("down:") && !e.starts_with("recovered:")),
        "alerts while flapping: {events:?}"
    );
    assert_eq!(hook.named("flapping").len(), 1, "{events:?}");
    assert_eq!(hook.named("flapping_ended").len(), 1, "{events:?}");
    let ended = &hook.named("flapping_ended")[0];
    assert!(ended["reason"].as_str().unwrap().contains("now"), "{ended}");
    agent.shutdown().await;
    collector.shutdown().await;
    Ok(())
}

/// A dependent and its dependency both fail: one alert, the dependency's, naming the
/// dependent; when both recover, one recovered alert naming it, nothing for the dependent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependency_down_speaks_for_its_dependents() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    let hook = Hook::start("/hook").await?;
    let flag = ws.path().join("up");
    std::fs::write(&flag, "")?;
    // The dependency goes down first (after 1 failure), the dependent after 3.
    ws.write_service(
        "db",
        &flagged("db", &flag, "on_failure:\n  after: 1\n  recover_after: 1\n"),
    )?;
    ws.write_service(
        "api",
        &flagged(
            "api",
            &flag,
            "depends_on: [db]\non_failure:\n  after: 3\n  recover_after: 2\n",
        ),
    )?;
    let path = collector_yaml(
        &ws,
        &db.url,
        &format!("notify:\n  webhooks:\n    - {{ url: \"{}\" }}\n", hook.url),
    )?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let agent = start_agent(&ws.write_agent("a", "n1", "n1", collector.grpc_addr)?).await?;
    connected(&agent).await?;
    let client = db.connect().await?;
    let st = |id: &'static str, want: &'static str| {
        let client = &client;
        move || async move { Ok((vigil_tests::state(client, id).await? == want).then_some(())) }
    };
    wait_for("api healthy", LIMIT, st("api", "healthy")).await?;
    wait_for("db healthy", LIMIT, st("db", "healthy")).await?;
    std::fs::remove_file(&flag)?;
    wait_for("api down", LIMIT, st("api", "down")).await?;
    hook.wait("down", 1, LIMIT).await?;
    // The dependent is recorded in the dependency's incident.
    wait_for("api affected by db's incident", LIMIT, || {
        let client = &client;
        async move {
            Ok((count(
                client,
                "SELECT count(*) FROM incidents WHERE service_id = 'db' AND 'api' = ANY(affected)",
            )
            .await?
                == 1)
                .then_some(()))
        }
    })
    .await?;
    std::fs::write(&flag, "")?;
    hook.wait("recovered", 1, LIMIT).await?;
    wait_for("api healthy again", LIMIT, st("api", "healthy")).await?;
    let events = hook.events();
    assert_eq!(events, ["down:db", "recovered:db"], "{events:?}");
    let rec = &hook.named("recovered")[0];
    assert_eq!(rec["affected"], serde_json::json!(["api"]), "{rec}");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM incidents WHERE service_id = 'api'"
        )
        .await?,
        0
    );
    agent.shutdown().await;
    collector.shutdown().await;
    Ok(())
}

/// Reminders for an open incident come every `reminder` and survive a collector restart; a
/// pause closes the incident as silenced by the operator with one `silenced` alert, and no
/// reminder follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reminders_survive_a_restart_and_a_pause_silences_the_incident() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    let hook = Hook::start("/hook").await?;
    let flag = ws.path().join("never");
    ws.write_service("app", &flagged("app", &flag, "on_failure:\n  after: 1\n"))?;
    let path = collector_yaml(
        &ws,
        &db.url,
        &format!(
            "notify:\n  reminder: 3s\n  webhooks:\n    - {{ url: \"{}\" }}\n",
            hook.url
        ),
    )?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let agent = start_agent(&ws.write_agent("a", "n1", "n1", collector.grpc_addr)?).await?;
    connected(&agent).await?;
    hook.wait("down", 1, LIMIT).await?;
    hook.wait("reminder", 2, LIMIT).await?;
    // Each reminder is at least the period after the previous alert (stored times).
    let ats: Vec<chrono::DateTime<chrono::Utc>> = ["down", "reminder"]
        .iter()
        .flat_map(|e| hook.named(e))
        .map(|v| serde_json::from_value(v["at"].clone()).unwrap())
        .collect();
    for w in ats.windows(2) {
        assert!(w[1] - w[0] >= chrono::Duration::seconds(3), "{ats:?}");
    }
    agent.shutdown().await;
    collector.shutdown().await;
    // A new collector reminds of the same incident.
    let before = hook.named("reminder").len();
    let collector = Collector::start(Config::load(&path)?).await?;
    hook.wait("reminder", before + 1, LIMIT).await?;
    let incident = hook.named("reminder").last().unwrap()["incident_id"].clone();
    assert_eq!(incident, hook.named("down")[0]["incident_id"]);

    // Pause: the incident closes as silenced, one silenced alert, no reminder afterwards.
    let store = &collector.hub.store;
    let (token, _) = create_token(store, "op", Role::Operator).await?;
    let base = format!("http://{}", collector.http_addr.unwrap());
    let http = reqwest::Client::new();
    http.post(format!("{base}/api/services/app/pause"))
        .bearer_auth(&token)
        .send()
        .await?
        .error_for_status()?;
    hook.wait("silenced", 1, LIMIT).await?;
    let client = db.connect().await?;
    let row = client
        .query_one(
            "SELECT resolution FROM incidents WHERE service_id = 'app'",
            &[],
        )
        .await?;
    assert_eq!(
        row.get::<_, Option<String>>(0).as_deref(),
        Some("silenced by operator")
    );
    let reminders = hook.named("reminder").len();
    // Two reminder periods pass (the incidents' last_alert_at would have become due twice).
    let t0: chrono::DateTime<chrono::Utc> = client.query_one("SELECT now()", &[]).await?.get(0);
    wait_for("two reminder periods", LIMIT, || {
        let client = &client;
        async move {
            let now: chrono::DateTime<chrono::Utc> =
                client.query_one("SELECT now()", &[]).await?.get(0);
            Ok((now - t0 >= chrono::Duration::seconds(7)).then_some(()))
        }
    })
    .await?;
    // Let the worker run once more before counting.
    wait_for("no alert pending", LIMIT, || {
        let client = &client;
        async move {
            Ok((count(
                client,
                "SELECT count(*) FROM alerts WHERE delivered_at IS NULL",
            )
            .await?
                == 0)
                .then_some(()))
        }
    })
    .await?;
    assert_eq!(
        hook.named("reminder").len(),
        reminders,
        "{:?}",
        hook.events()
    );
    assert_eq!(hook.named("silenced").len(), 1);
    // Ack needs operator; an unknown incident is 404.
    let r = http
        .post(format!("{base}/api/incidents/999999/ack"))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(r.status(), 404);
    let id = hook.named("silenced")[0]["incident_id"].as_i64().unwrap();
    let (viewer, _) = create_token(store, "viewer", Role::Viewer).await?;
    let r = http
        .post(format!("{base}/api/incidents/{id}/ack"))
        .bearer_auth(&viewer)
        .send()
        .await?;
    assert_eq!(r.status(), 403, "a viewer cannot acknowledge");
    let acked: Value = http
        .post(format!("{base}/api/incidents/{id}/ack"))
        .bearer_auth(&token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(acked["acknowledged_by"], "api:op");
    assert_eq!(acked["resolution"], "silenced by operator");
    collector.shutdown().await;
    Ok(())
}

/// Email over SMTP with STARTTLS required, to Debian's aiosmtpd with a certificate of the test
/// CA: the email arrives over TLS with the alert in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_arrives_over_starttls() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    let maildir = ws.path().join("mail");
    std::fs::create_dir(&maildir)?;
    let port = free_port()?;
    let script = ws.path().join("smtpd.py");
    std::fs::write(
        &script,
        r#"
import os, ssl, sys, time
from aiosmtpd.controller import Controller
cert, key, out, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
class Handler:
    async def handle_DATA(self, server, session, envelope):
        tls = b"yes" if session.ssl is not None else b"no"
        name = os.path.join(out, "%d.eml" % len(os.listdir(out)))
        with open(name + ".tmp", "wb") as f:
            f.write(b"X-Test-TLS: " + tls + b"\r\n" + envelope.content)
        os.rename(name + ".tmp", name)
        return "250 OK"
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)
c = Controller(Handler(), hostname="127.0.0.1", port=port, tls_context=ctx, require_starttls=True)
c.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"#,
    )?;
    let certs = ws.certs();
    let _smtpd = Killed(
        std::process::Command::new("/usr/bin/python3")
            .arg(&script)
            .arg(certs.join("collector.pem"))
            .arg(certs.join("collector.key"))
            .arg(&maildir)
            .arg(port.to_string())
            .spawn()
            .context("python3-aiosmtpd (Debian package) is needed")?,
    );
    wait_for("the SMTP server listening", LIMIT, || async move {
        Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ()))
    })
    .await?;
    let flag = ws.path().join("never");
    ws.write_service("app", &flagged("app", &flag, "on_failure:\n  after: 1\n"))?;
    let path = collector_yaml(
        &ws,
        &db.url,
        &format!(
            "notify:\n  receivers:\n    - name: mail\n      type: email\n      host: 127.0.0.1\n      port: {port}\n      starttls: required\n      from: vigil@example.test\n      to: [ops@example.test]\n      ca_file: certs/ca.pem\n"
        ),
    )?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let agent = start_agent(&ws.write_agent("a", "n1", "n1", collector.grpc_addr)?).await?;
    connected(&agent).await?;
    let mail = wait_for("an email", LIMIT, || {
        let dir = maildir.clone();
        async move {
            for e in std::fs::read_dir(&dir)? {
                let p = e?.path();
                if p.extension().is_some_and(|x| x == "eml") {
                    return Ok(Some(std::fs::read_to_string(p)?));
                }
            }
            Ok(None)
        }
    })
    .await?;
    assert!(mail.starts_with("X-Test-TLS: yes"), "{mail}");
    assert!(mail.contains("app") && mail.contains("down"), "{mail}");
    let client = db.connect().await?;
    let uid: String = client
        .query_one("SELECT uid FROM alerts", &[])
        .await?
        .get(0);
    assert!(mail.contains(&uid), "the alert id is in the email: {mail}");
    agent.shutdown().await;
    collector.shutdown().await;
    Ok(())
}

/// A fake PagerDuty Events API receives trigger, then resolve, with the same dedup_key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagerduty_trigger_then_resolve_with_one_dedup_key() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    let pd = Hook::start("/v2/enqueue").await?;
    let flag = ws.path().join("up");
    ws.write_service(
        "app",
        &flagged(
            "app",
            &flag,
            "on_failure:\n  after: 1\n  recover_after: 1\n",
        ),
    )?;
    let path = collector_yaml(
        &ws,
        &db.url,
        &format!(
            "notify:\n  receivers:\n    - {{ name: pd, type: pagerduty, routing_key: R0UT1NG, url: \"{}\" }}\n  routes:\n    - match: {{ severity: critical }}\n      receivers: [pd]\n",
            pd.url
        ),
    )?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let agent = start_agent(&ws.write_agent("a", "n1", "n1", collector.grpc_addr)?).await?;
    connected(&agent).await?;
    wait_for("a trigger", LIMIT, || {
        let n = pd.got.lock().unwrap().len();
        async move { Ok((n >= 1).then_some(())) }
    })
    .await?;
    std::fs::write(&flag, "")?;
    wait_for("a resolve", LIMIT, || {
        let n = pd.got.lock().unwrap().len();
        async move { Ok((n >= 2).then_some(())) }
    })
    .await?;
    let got: Vec<Value> = pd
        .got
        .lock()
        .unwrap()
        .iter()
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0]["event_action"], "trigger");
    assert_eq!(got[0]["routing_key"], "R0UT1NG");
    assert_eq!(got[0]["payload"]["severity"], "critical");
    assert_eq!(got[0]["payload"]["source"], "n1");
    assert_eq!(got[1]["event_action"], "resolve");
    assert_eq!(got[0]["dedup_key"], got[1]["dedup_key"]);
    assert_eq!(got[0]["dedup_key"], "service:n1:app");
    agent.shutdown().await;
    collector.shutdown().await;
    Ok(())
}

/// A crash inside a maintenance window: no restart and no alert while the window lasts; once it
/// ends, the normal policy takes over (the service is restarted and healthy again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_in_a_maintenance_window_is_left_alone_until_the_window_ends() -> anyhow::Result<()>
{
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    let hook = Hook::start("/hook").await?;
    let flag = ws.path().join("up");
    std::fs::write(&flag, "")?;
    ws.write_service(
        "app",
        &flagged(
            "app",
            &flag,
            &format!(
                "control:\n  restart: [[\"/bin/touch\", \"{}\"]]\non_failure:\n  action: restart\n  after: 1\n  recover_after: 1\n  grace: 0s\n",
                flag.display()
            ),
        ),
    )?;
    let path = collector_yaml(
        &ws,
        &db.url,
        &format!("notify:\n  webhooks:\n    - {{ url: \"{}\" }}\n", hook.url),
    )?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let agent = start_agent(&ws.write_agent("a", "n1", "n1", collector.grpc_addr)?).await?;
    connected(&agent).await?;
    let client = db.connect().await?;
    let state = || {
        let client = &client;
        async move { vigil_tests::state(client, "app").await }
    };
    wait_for("app healthy", LIMIT, || async {
        Ok((state().await? == "healthy").then_some(()))
    })
    .await?;

    let (token, _) = create_token(&collector.hub.store, "op", Role::Operator).await?;
    let from = chrono::Utc::now();
    let to = from + chrono::Duration::seconds(20);
    let r = reqwest::Client::new()
        .post(format!(
            "http://{}/api/maintenance",
            collector.http_addr.context("http")?
        ))
        .bearer_auth(&token)
        .json(
            &serde_json::json!({"name": "upgrade", "from": from.to_rfc3339(),
                                   "to": to.to_rfc3339(), "services": ["app"]}),
        )
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "{}", r.text().await?);

    std::fs::remove_file(&flag)?; // the crash
    wait_for("app down", LIMIT, || async {
        Ok((state().await? == "down").then_some(()))
    })
    .await?;
    anyhow::ensure!(
        chrono::Utc::now() < to - chrono::Duration::seconds(3),
        "the window ended before the test saw the crash; make it longer"
    );
    wait_for("the window over", LIMIT, || async {
        let n = count(
            &client,
            "SELECT count(*) FROM service_state WHERE service_id = 'app' AND maintenance_until IS NULL",
        )
        .await?;
        Ok((n == 1).then_some(()))
    })
    .await?;
    // Nothing was done or said while it lasted.
    let during = |sql: &'static str| {
        let client = &client;
        async move { anyhow::Ok(client.query_one(sql, &[&to]).await?.get::<_, i64>(0)) }
    };
    assert_eq!(
        during(
            "SELECT count(*) FROM commands WHERE service_id = 'app' AND action = 'restart' AND created_at < $1"
        )
        .await?,
        0,
        "restarted during the maintenance window"
    );
    assert_eq!(
        during("SELECT count(*) FROM alerts a JOIN incidents i ON i.id = a.incident_id WHERE i.service_id = 'app' AND a.created_at < $1").await?,
        0,
        "alerted during the maintenance window"
    );
    // Then the normal policy: restarted, healthy again.
    wait_for("app healthy again", LIMIT, || async {
        Ok((state().await? == "healthy").then_some(()))
    })
    .await?;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM commands WHERE service_id = 'app' AND action = 'restart' AND origin = 'auto' AND status = 'succeeded'"
        )
        .await?,
        1
    );
    agent.shutdown().await;
    collector.shutdown().await;
    Ok(())
}

/// The database side of the alerts without a running collector, the liveness state written
/// directly: node alerts, reminders and the SSH heal are quiet while the node is in
/// maintenance; the catch-up opens late stale, node_down and backlog incidents and closes them
/// when the database says they are over (a lost closing alert), and closes (never reminds) the
/// incidents of a service removed from the config; a pause committed while an incident is being
/// opened waits for it (quiet rules read under a lock); a late attempt after the lease expired
/// does not undo a delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_node_maintenance_quiet_lock_and_lease() -> anyhow::Result<()> {
    use vigil_collector::notify::Alerts;
    use vigil_collector::store::{Attempt, NewIncident, Opened};
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    ws.write_service("s1", &vigil_tests::true_service("s1", "n1"))?;
    ws.write_service("s2", &vigil_tests::true_service("s2", "n1"))?;
    let notify = "notify:\n  webhooks:\n    - { url: \"http://127.0.0.1:9/\" }\n";
    let path = collector_yaml(&ws, &db.url, notify)?;
    let cfg = Config::load(&path)?;
    let store = Store::connect(&db.url, 4).await?;
    store.sync_config(&cfg).await?;
    let alerts = Alerts::new(store.clone(), &cfg.notify);
    let sql = db.connect().await?;
    let open = |family: &'static str| {
        let sql = &sql;
        async move {
            count(
                sql,
                &format!("SELECT count(*) FROM incidents WHERE family = '{family}' AND resolved_at IS NULL"),
            )
            .await
        }
    };
    let events = |family: &'static str| {
        let sql = &sql;
        async move {
            let rows = sql
                .query(
                    "SELECT a.event FROM alerts a JOIN incidents i ON i.id = a.incident_id
                     WHERE i.family = $1 ORDER BY a.id",
                    &[&family],
                )
                .await?;
            anyhow::Ok(
                rows.iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>(),
            )
        }
    };

    // A backlog incident is open when the node enters maintenance: it is not reminded, and
    // the catch-up closes it as silenced.
    alerts
        .node_event(&cfg, "n1", "backlog", "5 result(s) waiting")
        .await;
    assert_eq!(open("backlog").await?, 1);
    sql.execute(
        "UPDATE nodes SET maintenance_until = now() + interval '1 hour',
                          down_since = now() - interval '1 minute', down_reason = 'test'
         WHERE name = 'n1'",
        &[],
    )
    .await?;
    assert_eq!(
        store.remind(Duration::ZERO).await?,
        0,
        "reminded in maintenance"
    );
    // Down in maintenance: no node_down alert, now or late, and no heal over SSH.
    alerts
        .node_event(&cfg, "n1", "node_down", "its agent disconnected")
        .await;
    alerts.catch_up(&cfg).await;
    assert_eq!(open("node").await?, 0);
    assert_eq!(open("backlog").await?, 0);
    assert_eq!(events("backlog").await?, ["backlog", "silenced"]);
    let heal = [("n1".to_string(), Duration::from_millis(1))];
    assert!(store.nodes_to_heal(&heal).await?.is_empty());

    // The window ends with the node still down: node_down late, and the heal is due again.
    sql.execute("UPDATE nodes SET maintenance_until = NULL", &[])
        .await?;
    assert_eq!(store.nodes_to_heal(&heal).await?, ["n1"]);
    alerts.catch_up(&cfg).await;
    assert_eq!(open("node").await?, 1);
    // The node comes back and its node_up is lost: the catch-up closes the incident.
    sql.execute("UPDATE nodes SET down_since = NULL", &[])
        .await?;
    alerts.catch_up(&cfg).await;
    assert_eq!(open("node").await?, 0);
    assert_eq!(events("node").await?, ["node_down", "node_up"]);

    // A backlog flagged without its incident (alert lost) opens late; cleared, it closes.
    sql.execute(
        "UPDATE nodes SET backlog_alert_since = now() - interval '1 minute', backlog_results = 7",
        &[],
    )
    .await?;
    alerts.catch_up(&cfg).await;
    assert_eq!(open("backlog").await?, 1);
    sql.execute("UPDATE nodes SET backlog_alert_since = NULL", &[])
        .await?;
    alerts.catch_up(&cfg).await;
    assert_eq!(open("backlog").await?, 0);
    assert_eq!(
        events("backlog").await?,
        ["backlog", "silenced", "backlog", "backlog_cleared"]
    );

    // Stale during a maintenance window: nothing; still stale after it: late stale alert;
    // fresh again with the fresh alert lost: closed.
    sql.execute(
        "UPDATE service_state SET stale_since = now() - interval '1 minute',
                stale_reason = 'no result for 60 s', maintenance_until = now() + interval '1 hour'
         WHERE service_id = 's1'",
        &[],
    )
    .await?;
    alerts.catch_up(&cfg).await;
    assert_eq!(open("stale").await?, 0);
    sql.execute(
        "UPDATE service_state SET maintenance_until = NULL WHERE service_id = 's1'",
        &[],
    )
    .await?;
    alerts.catch_up(&cfg).await;
    assert_eq!(open("stale").await?, 1);
    sql.execute(
        "UPDATE service_state SET stale_since = NULL WHERE service_id = 's1'",
        &[],
    )
    .await?;
    alerts.catch_up(&cfg).await;
    assert_eq!(open("stale").await?, 0);
    assert_eq!(events("stale").await?, ["stale", "fresh"]);

    // A pause committed while the incident is being opened: the opening waits for it and
    // is quiet (without the lock it would open and be silenced right after).
    let mut pauser = db.connect().await?;
    let tx = pauser.transaction().await?;
    tx.execute(
        "UPDATE service_state SET mode = 'paused' WHERE service_id = 's2'",
        &[],
    )
    .await?;
    let svc = cfg.service("s2").context("s2")?.clone();
    let opening = {
        let store = store.clone();
        let receivers = vec!["webhook-1".to_string()];
        tokio::spawn(async move {
            store
                .open_incident(&NewIncident {
                    family: "service",
                    node: "n1",
                    service_id: Some("s2"),
                    severity: "critical",
                    event: "down",
                    reason: "3 consecutive failures",
                    payload: vigil_collector::notify::payload("down", "critical", &svc, "x"),
                    receivers: &receivers,
                    depends_on: &[],
                    dependents: &[],
                    settle: None,
                })
                .await
        })
    };
    wait_for("the opening to wait for the pause", LIMIT, || {
        let sql = &sql;
        async move {
            let waiting = count(
                sql,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'
                 AND query LIKE '%FOR SHARE%'",
            )
            .await?;
            Ok((waiting > 0).then_some(()))
        }
    })
    .await?;
    tx.commit().await?;
    assert_eq!(opening.await??, Opened::Quiet("service is paused".into()));
    sql.execute(
        "UPDATE service_state SET mode = 'active' WHERE service_id = 's2'",
        &[],
    )
    .await?;

    // s2 down with an incident, then removed from the config: never reminded, closed.
    alerts
        .service_event(&cfg, cfg.service("s2").context("s2")?, "down", "down")
        .await;
    assert_eq!(open("service").await?, 1);
    std::fs::remove_file(ws.path().join("services/s2.yaml"))?;
    let cfg = Config::load(&path)?;
    store.sync_config(&cfg).await?;
    assert_eq!(
        store.remind(Duration::ZERO).await?,
        0,
        "reminded once removed"
    );
    alerts.catch_up(&cfg).await;
    assert_eq!(open("service").await?, 0);
    assert_eq!(events("service").await?, ["down", "removed"]);

    // Leases: worker 1's lease expires, worker 2 claims and delivers; worker 1's late failure
    // is kept as an attempt and does not undo the delivery.
    sql.execute("UPDATE alerts SET delivered_at = now()", &[])
        .await?;
    alerts
        .node_event(&cfg, "n1", "node_down", "its agent disconnected")
        .await;
    let first = store.claim_alerts(10, Duration::ZERO).await?;
    assert_eq!(first.len(), 1);
    let second = wait_for("the lease to expire", LIMIT, || {
        let store = store.clone();
        async move {
            let r = store.claim_alerts(10, Duration::from_secs(90)).await?;
            Ok((!r.is_empty()).then_some(r))
        }
    })
    .await?;
    assert_eq!(second[0].id, first[0].id);
    let attempt = |ok| Attempt {
        ok,
        http_status: None,
        error: (!ok).then(|| "timed out".to_string()),
        retry_in: Duration::from_secs(1),
        give_up_after: Duration::from_secs(3600),
    };
    assert!(
        store
            .record_attempt(second[0].id, second[0].claimed_until, &attempt(true))
            .await?
    );
    assert!(
        !store
            .record_attempt(first[0].id, first[0].claimed_until, &attempt(false))
            .await?
    );
    let r = sql
        .query_one(
            "SELECT delivered_at IS NOT NULL, (SELECT count(*) FROM alert_attempts t
                                               WHERE t.alert_id = a.id)
             FROM alerts a WHERE id = $1",
            &[&first[0].id],
        )
        .await?;
    assert!(r.get::<_, bool>(0), "a late failure undid the delivery");
    assert_eq!(r.get::<_, i64>(1), 2);
    Ok(())
}
