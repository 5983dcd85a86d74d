//! Availability end to end: a scripted sequence of results written through the real ingest path
//! (the agent protocol spoken directly), a service going stale and an operator's pause give, from the API (service,
//! node, category) and from `vigil-collector report` in JSON, CSV and HTML, the figures the
//! recorded transitions say; bad windows and unknown names are refused with JSON errors.

use std::time::Duration;

use chrono::{DateTime, DurationRound, Utc};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use vigil_collector::web::auth::{Role, create_token};
use vigil_collector::{Collector, Config};
use vigil_proto::v1::{
    self, AgentMessage, agent_message::Msg as In, agent_service_client::AgentServiceClient,
    collector_message::Msg as Out,
};
use vigil_tests::{Workspace, init, pg};

const EPOCH: u64 = 0xa7a1;

/// One agent stream of node n1, spoken directly: each result is sent and its Ack awaited, so
/// each is stored (and its transition recorded) in its own transaction, in order.
struct Stream {
    tx: mpsc::Sender<AgentMessage>,
    inbound: tonic::Streaming<v1::CollectorMessage>,
    seq: u64,
}

impl Stream {
    async fn open(ws: &Workspace, collector: &Collector) -> anyhow::Result<Stream> {
        let ca = std::fs::read(ws.certs().join("ca.pem"))?;
        let cert = std::fs::read(ws.certs().join("n1.pem"))?;
        let key = std::fs::read(ws.certs().join("n1.key"))?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("localhost")
            .identity(Identity::from_pem(cert, key));
        let ch = Channel::from_shared(format!("https://{}", collector.grpc_addr))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        let (tx, rx) = mpsc::channel(16);
        tx.send(AgentMessage {
            msg: Some(In::Hello(v1::Hello {
                node: "n1".into(),
                agent_version: "test".into(),
                outbox_epoch: EPOCH,
                first_unacked_seq: 1,
                ..Default::default()
            })),
        })
        .await?;
        let inbound = AgentServiceClient::new(ch)
            .session(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Stream {
            tx,
            inbound,
            seq: 0,
        })
    }

    /// Sends one result of `service` and waits until it is acknowledged (stored).
    async fn result(&mut self, service: &str, status: v1::Status) -> anyhow::Result<()> {
        self.seq += 1;
        let seq = self.seq;
        self.tx
            .send(AgentMessage {
                msg: Some(In::Results(v1::ResultBatch {
                    outbox_epoch: EPOCH,
                    results: vec![v1::CheckResult {
                        seq,
                        service_id: service.into(),
                        started_at_ms: Utc::now().timestamp_millis(),
                        duration_ms: 3,
                        status: status as i32,
                        message: format!("result {seq}"),
                        ..Default::default()
                    }],
                })),
            })
            .await?;
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match self.inbound.message().await?.and_then(|m| m.msg) {
                    Some(Out::Ack(a)) if a.up_to_seq >= seq => return anyhow::Ok(()),
                    Some(_) => continue,
                    None => anyhow::bail!("stream ended without an Ack"),
                }
            }
        })
        .await?
    }
}

/// The time of the `n`th (0-based) event of `svc` of `kind` that went to `to_state`.
async fn event_at(
    db: &tokio_postgres::Client,
    svc: &str,
    kind: &str,
    to_state: &str,
    n: i64,
) -> anyhow::Result<DateTime<Utc>> {
    Ok(db
        .query_one(
            "SELECT at FROM events WHERE service_id = $1 AND kind = $2 AND to_state = $3
             ORDER BY at, id OFFSET $4 LIMIT 1",
            &[&svc, &kind, &to_state, &n],
        )
        .await?
        .get(0))
}

fn secs(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    (b - a).num_microseconds().expect("short") as f64 / 1e6
}

/// Figures from the API against figures from the events: both in microseconds, so equal but for
/// floating-point rounding.
fn close(got: &Value, want: f64, what: &str) {
    let got = got
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: not a number: {got}"));
    assert!(
        (got - want).abs() < 1e-6 * want.abs().max(1.0),
        "{what}: got {got}, the events say {want}"
    );
}

fn rfc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn q(t: DateTime<Utc>) -> String {
    rfc(t).replace('+', "%2B")
}

async fn get(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(StatusCode, Value)> {
    let mut r = http.get(format!("{base}{path}"));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

fn assert_error(got: &(StatusCode, Value), status: StatusCode, field: Option<&str>) {
    assert_eq!(got.0, status, "{}", got.1);
    assert!(
        got.1["error"].as_str().is_some_and(|e| !e.is_empty()),
        "JSON error body: {}",
        got.1
    );
    assert!(
        got.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        got.1
    );
    if let Some(f) = field {
        assert_eq!(got.1["field"], f, "{}", got.1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_from_the_api_and_the_report_follow_the_recorded_transitions() -> anyhow::Result<()>
{
    init();
    let pgdb = pg::test_db().await?;
    let db = pgdb.connect().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    let on_failure = "on_failure:\n  after: 2\n  recover_after: 1\n";
    ws.write_service(
        "svc",
        &format!("id: svc\nname: Scripted API\ncategory: api\nnode: n1\ncheck:\n  type: command\n  interval: 1h\n  argv: [\"/bin/true\"]\n{on_failure}"),
    )?;
    ws.write_service(
        "other",
        &format!("id: other\ncategory: system\nnode: n1\ncheck:\n  type: command\n  interval: 1h\n  argv: [\"/bin/true\"]\nstale_after: 1s\n{on_failure}"),
    )?;
    let path = ws.write_collector(&pgdb.url, &["n1", "n2"])?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let store = &collector.hub.store;
    let (viewer, _) = create_token(store, "viewer-1", Role::Viewer).await?;
    let (operator, _) = create_token(store, "operator-1", Role::Operator).await?;
    let base = format!("http://{}", collector.http_addr.expect("http enabled"));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;

    let start: DateTime<Utc> = db.query_one("SELECT now()", &[]).await?.get(0);
    // The script. other: healthy, then stale (no result for 1 s, decided by the collector's
    // liveness pass), fresh again at the end. svc: healthy; down (2 failures); healthy; paused
    // and resumed; down again, still open at the end.
    let mut s = Stream::open(&ws, &collector).await?;
    s.result("other", v1::Status::Ok).await?;
    let stale_at = vigil_tests::wait_for("other to go stale", Duration::from_secs(30), || async {
        let r = db
            .query_opt(
                "SELECT at FROM events WHERE service_id = 'other' AND kind = 'stale' AND to_state = 'stale'",
                &[],
            )
            .await?;
        Ok(r.map(|r| r.get::<_, DateTime<Utc>>(0)))
    })
    .await?;
    s.result("svc", v1::Status::Ok).await?;
    s.result("svc", v1::Status::Critical).await?;
    s.result("svc", v1::Status::Critical).await?;
    s.result("svc", v1::Status::Ok).await?;
    for action in ["pause", "resume"] {
        let r = http
            .post(format!("{base}/api/services/svc/{action}"))
            .bearer_auth(&operator)
            .send()
            .await?;
        assert_eq!(r.status(), StatusCode::OK, "{action}");
    }
    s.result("svc", v1::Status::Warning).await?;
    s.result("svc", v1::Status::Critical).await?;
    s.result("svc", v1::Status::Critical).await?;
    s.result("other", v1::Status::Ok).await?;

    // What the events say.
    let other_up = event_at(&db, "other", "state", "healthy", 0).await?;
    let up1 = event_at(&db, "svc", "state", "healthy", 0).await?;
    let down1 = event_at(&db, "svc", "state", "down", 0).await?;
    let up2 = event_at(&db, "svc", "state", "healthy", 1).await?;
    let paused = event_at(&db, "svc", "mode", "paused", 0).await?;
    let resumed = event_at(&db, "svc", "mode", "active", 0).await?;
    let down2 = event_at(&db, "svc", "state", "down", 1).await?;
    let fresh_at = event_at(&db, "other", "stale", "fresh", 0).await?;
    // The window ends just after the last transition of the script (other could go stale
    // again a second later), once that is in the past.
    let end = fresh_at + chrono::Duration::milliseconds(1);
    vigil_tests::wait_for(
        "the end of the window to pass",
        Duration::from_secs(10),
        || async {
            let now: DateTime<Utc> = db.query_one("SELECT clock_timestamp()", &[]).await?.get(0);
            Ok((now > end).then_some(()))
        },
    )
    .await?;
    assert!(other_up < stale_at && stale_at < up1 && down2 < fresh_at);
    assert!(start <= other_up && other_up < up1 && up1 < down1 && down1 < up2);
    assert!(up2 < paused && paused < resumed && resumed < down2 && down2 < end);
    let want_up = secs(up1, down1) + secs(up2, paused) + secs(resumed, down2);
    let want_down = secs(down1, up2) + secs(down2, end);
    let want_not_counted = secs(start, up1) + secs(paused, resumed);

    let window = format!("?from={}&to={}", q(start), q(end));
    let (st, a) = get(
        &http,
        &base,
        &format!("/api/services/svc/availability{window}"),
        Some(&viewer),
    )
    .await?;
    assert_eq!(st, StatusCode::OK, "{a}");
    println!("service availability: {a:#}");
    assert_eq!(a["scope"], "service");
    assert_eq!(a["id"], "svc");
    assert_eq!(
        a["until"], a["to"],
        "the window is in the past: counted to its end"
    );
    assert_eq!(a["incidents"], 2);
    assert_eq!(a["down_at_end"], true, "the second incident is still open");
    close(&a["up_seconds"], want_up, "up");
    close(&a["down_seconds"], want_down, "down");
    close(
        &a["not_counted_seconds"],
        want_not_counted,
        "not counted (before the first result, paused)",
    );
    close(
        &a["uptime_percent"],
        want_up * 100.0 / (want_up + want_down),
        "uptime",
    );
    close(&a["mttr_seconds"], want_down / 2.0, "MTTR");
    close(&a["mtbf_seconds"], want_up / 2.0, "MTBF");
    close(
        &a["longest_incident_seconds"],
        secs(down1, up2).max(secs(down2, end)),
        "longest",
    );
    assert_eq!(a["services"].as_array().map(Vec::len), Some(1));

    // A window that starts inside the first incident: the state at `from` is the last
    // transition's before it (down), and the incident counts with its part inside.
    // Whole microseconds, as the query carries it.
    let mid = (down1 + (up2 - down1) / 2).duration_trunc(chrono::Duration::microseconds(1))?;
    let (st, b) = get(
        &http,
        &base,
        &format!(
            "/api/services/svc/availability?from={}&to={}",
            q(mid),
            q(end)
        ),
        Some(&viewer),
    )
    .await?;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["incidents"], 2);
    close(
        &b["down_seconds"],
        secs(mid, up2) + secs(down2, end),
        "down from mid-incident",
    );
    close(
        &b["not_counted_seconds"],
        secs(paused, resumed),
        "not counted from mid-incident",
    );

    // A window that ends before the second incident: it does not count; no transitions inside
    // [resumed + a bit, down2) at all: fully up.
    let quiet_from = resumed + (down2 - resumed) / 4;
    let quiet_to = resumed + (down2 - resumed) / 2;
    let (st, c) = get(
        &http,
        &base,
        &format!(
            "/api/services/svc/availability?from={}&to={}",
            q(quiet_from),
            q(quiet_to)
        ),
        Some(&viewer),
    )
    .await?;
    assert_eq!(st, StatusCode::OK, "{c}");
    assert_eq!(c["incidents"], 0);
    assert_eq!(c["uptime_percent"], 100.0);
    assert_eq!(c["mttr_seconds"], Value::Null);
    assert_eq!(c["down_at_end"], false);

    // other: its stale stretch is down time, one incident.
    let (st, o) = get(
        &http,
        &base,
        &format!("/api/services/other/availability{window}"),
        Some(&viewer),
    )
    .await?;
    assert_eq!(st, StatusCode::OK, "{o}");
    assert_eq!(o["incidents"], 1);
    assert_eq!(o["down_at_end"], false);
    let other_down = secs(stale_at, fresh_at);
    let other_up = secs(other_up, stale_at) + secs(fresh_at, end);
    close(&o["down_seconds"], other_down, "other stale");
    close(&o["up_seconds"], other_up, "other up");

    // The node adds its services' times; the category holds svc alone.
    let (st, n) = get(
        &http,
        &base,
        &format!("/api/nodes/n1/availability{window}"),
        Some(&viewer),
    )
    .await?;
    assert_eq!(st, StatusCode::OK, "{n}");
    assert_eq!(n["scope"], "node");
    assert_eq!(n["incidents"], 3);
    close(&n["up_seconds"], want_up + other_up, "node up");
    close(&n["down_seconds"], want_down + other_down, "node down");
    let ids: Vec<&str> = n["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| s["service"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["other", "svc"]);
    let (st, cat) = get(
        &http,
        &base,
        &format!("/api/categories/api/availability{window}"),
        Some(&viewer),
    )
    .await?;
    assert_eq!(st, StatusCode::OK, "{cat}");
    assert_eq!(cat["services"].as_array().map(Vec::len), Some(1));
    assert_eq!(cat["incidents"], 2);
    // n2 has no services: nothing counted, and no figure claimed.
    let (st, n2) = get(&http, &base, "/api/nodes/n2/availability", Some(&viewer)).await?;
    assert_eq!(st, StatusCode::OK, "{n2}");
    assert_eq!(n2["uptime_percent"], Value::Null);
    // Defaults: the last 30 days until now; the open incident is still open.
    let (st, d) = get(
        &http,
        &base,
        "/api/services/svc/availability",
        Some(&viewer),
    )
    .await?;
    assert_eq!(st, StatusCode::OK, "{d}");
    assert_eq!(d["down_at_end"], true);
    assert_eq!(d["incidents"], 2);

    // Bad input.
    let bad = [
        (
            format!(
                "/api/services/svc/availability?from={}&to={}",
                q(end),
                q(start)
            ),
            StatusCode::BAD_REQUEST,
            Some("from"),
        ),
        (
            format!(
                "/api/services/svc/availability?from={}&to={}",
                q(end),
                q(end)
            ),
            StatusCode::BAD_REQUEST,
            Some("from"),
        ),
        (
            "/api/services/svc/availability?from=2026-02-30T00:00:00Z".into(),
            StatusCode::BAD_REQUEST,
            Some("from"),
        ),
        (
            "/api/services/svc/availability?to=yesterday".into(),
            StatusCode::BAD_REQUEST,
            Some("to"),
        ),
        (
            "/api/services/svc/availability?from=2000-01-01T00:00:00Z&to=9999-12-31T23:59:59Z"
                .into(),
            StatusCode::BAD_REQUEST,
            Some("to"),
        ),
        (
            "/api/services/svc/availability?to=0000-01-01T00:00:00Z".into(),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "/api/services/svc/availability?from=2026-01-01T00:00:00Z%00".into(),
            StatusCode::BAD_REQUEST,
            Some("from"),
        ),
        (
            "/api/services/svc/availability?from=%FF".into(),
            StatusCode::BAD_REQUEST,
            Some("from"),
        ),
        (
            "/api/services/svc/availability?since=2026-01-01T00:00:00Z".into(),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "/api/services/nope/availability".into(),
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            "/api/services/sv%00c/availability".into(),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "/api/nodes/n3/availability".into(),
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            "/api/categories/database/availability".into(),
            StatusCode::NOT_FOUND,
            None,
        ),
    ];
    for (path, status, field) in &bad {
        let got = get(&http, &base, path, Some(&viewer)).await?;
        println!("{path} -> {} {}", got.0, got.1);
        assert_error(&got, *status, *field);
    }
    let got = get(&http, &base, "/api/services/svc/availability", None).await?;
    assert_error(&got, StatusCode::UNAUTHORIZED, None);

    // The report reads the same database through the config, in every format.
    collector.shutdown().await;
    let bin = vigil_tests::binary("vigil-collector")?;
    let run = |format: &'static str, out: Option<std::path::PathBuf>| {
        let mut c = std::process::Command::new(&bin);
        c.arg("report").arg("-c").arg(&path).args([
            "--from",
            &rfc(start),
            "--to",
            &rfc(end),
            "--format",
            format,
        ]);
        if let Some(o) = &out {
            c.arg("--out").arg(o);
        }
        c
    };
    let out = run("json", None).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout)?;
    let svc = r["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| s["service"] == "svc")
        .expect("svc in the report")
        .clone();
    for k in [
        "uptime_percent",
        "up_seconds",
        "down_seconds",
        "not_counted_seconds",
        "incidents",
        "mttr_seconds",
        "mtbf_seconds",
        "longest_incident_seconds",
        "down_at_end",
    ] {
        assert_eq!(svc[k], a[k], "report and API agree on {k}");
    }
    let n1 = r["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["node"] == "n1")
        .expect("n1 in the report")
        .clone();
    assert_eq!(n1["services"], 2);
    assert_eq!(n1["down_seconds"], n["down_seconds"]);
    assert_eq!(n1["up_seconds"], n["up_seconds"]);
    assert_eq!(r["total"]["incidents"], 3);

    let out = run("csv", None).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rd = csv::Reader::from_reader(out.stdout.as_slice());
    let header: Vec<String> = rd.headers()?.iter().map(str::to_string).collect();
    let col = |name: &str| header.iter().position(|h| h == name).expect(name);
    let rows: Vec<csv::StringRecord> = rd.records().collect::<Result<_, _>>()?;
    assert_eq!(rows.len(), 2 + 1 + 1, "two services, one node, the total");
    let row = rows
        .iter()
        .find(|r| &r[col("kind")] == "service" && &r[col("id")] == "svc")
        .expect("svc row");
    assert_eq!(&row[col("name")], "Scripted API");
    assert_eq!(&row[col("incidents")], "2");
    close(
        &Value::from(row[col("down_seconds")].parse::<f64>()?),
        want_down,
        "CSV down",
    );
    close(
        &Value::from(row[col("uptime_percent")].parse::<f64>()?),
        want_up * 100.0 / (want_up + want_down),
        "CSV uptime",
    );
    assert_eq!(&row[col("down_at_end")], "true");
    assert!(rows.iter().any(|r| &r[col("kind")] == "total"));

    let dir = tempfile::tempdir()?;
    let file = dir.path().join("report.html");
    let out = run("html", Some(file.clone())).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout.is_empty(),
        "--out writes the file, not standard output"
    );
    let page = std::fs::read_to_string(&file)?;
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.contains("Scripted API"));
    let pct = vigil_collector::availability::percent_text(a["uptime_percent"].as_f64());
    assert!(page.contains(&pct), "the uptime {pct} is in the page");
    for external in [
        "<script", "<link", "<img", "<iframe", "src=", "href=", "url(", "@import", "http://",
        "https://",
    ] {
        assert!(
            !page.contains(external),
            "{external} in a self-contained report"
        );
    }

    // A bad window is refused before the database is read.
    let out = std::process::Command::new(&bin)
        .arg("report")
        .arg("-c")
        .arg(&path)
        .args(["--from", "2026-11-01", "--to", "2026-10-01"])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--from"));

    // A database that cannot be reached: an error that says so, no report.
    let unreachable = ws.write_collector("postgres://vigil@127.0.0.1:1/vigil", &["n1", "n2"])?;
    let out = std::process::Command::new(&bin)
        .arg("report")
        .arg("-c")
        .arg(&unreachable)
        .output()?;
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no partial report");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to PostgreSQL"), "{err}");
    Ok(())
}
