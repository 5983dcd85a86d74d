//! Agents' clocks: results dated in 2100 or 1969 — streamed or answering a check-now — are stored
//! with the receive time and recorded as a `clock` node event; the clock offset sent in Hello is
//! recorded per node, shown in `/api/nodes` and flagged beyond `max_clock_skew`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use vigil_collector::web::auth::{Role, create_token};
use vigil_collector::{Collector, Config};
use vigil_proto::v1::{
    self, AgentMessage, agent_message::Msg as In, agent_service_client::AgentServiceClient,
    collector_message::Msg as Out,
};
use vigil_tests::{Workspace, init, pg, wait_for};

const EPOCH: u64 = 0xc10c;
/// How far ahead the fake agent's clock runs (the default max_clock_skew is 5 minutes).
const AHEAD_MS: i64 = 3_600_000;

async fn channel(ws: &Workspace, collector: &Collector) -> anyhow::Result<Channel> {
    let ca = std::fs::read(ws.certs().join("ca.pem"))?;
    let cert = std::fs::read(ws.certs().join("n1.pem"))?;
    let key = std::fs::read(ws.certs().join("n1.key"))?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost")
        .identity(Identity::from_pem(cert, key));
    Ok(
        Channel::from_shared(format!("https://{}", collector.grpc_addr))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?,
    )
}

fn result(seq: u64, started_at_ms: i64) -> v1::CheckResult {
    v1::CheckResult {
        seq,
        service_id: "svc".into(),
        started_at_ms,
        duration_ms: 1,
        status: v1::Status::Ok as i32,
        message: format!("result {seq}"),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implausible_times_are_replaced_and_the_node_clock_is_recorded() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    ws.write_service(
        "svc",
        "id: svc\ncategory: system\nnode: n1\ncheck:\n  type: command\n  interval: 1h\n  argv: [\"/bin/true\"]\n",
    )?;
    let path = ws.write_collector(&db.url, &["n1"])?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let client = db.connect().await?;

    let before = Utc::now();
    let now = before.timestamp_millis();
    let (tx, rx) = mpsc::channel(16);
    tx.send(AgentMessage {
        msg: Some(In::Hello(v1::Hello {
            node: "n1".into(),
            agent_version: "test".into(),
            outbox_epoch: EPOCH,
            first_unacked_seq: 1,
            next_seq: 4,
            agent_time_ms: now + AHEAD_MS,
            ..Default::default()
        })),
    })
    .await?;
    let mut inbound = AgentServiceClient::new(channel(&ws, &collector).await?)
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let y2100 = 4_102_444_800_000;
    tx.send(AgentMessage {
        msg: Some(In::Results(v1::ResultBatch {
            outbox_epoch: EPOCH,
            results: vec![result(1, y2100), result(2, -86_400_000), result(3, now)],
        })),
    })
    .await?;
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match inbound.message().await?.and_then(|m| m.msg) {
                Some(Out::Ack(a)) if a.up_to_seq >= 3 => return anyhow::Ok(()),
                Some(_) => continue,
                None => anyhow::bail!("stream ended without an Ack"),
            }
        }
    })
    .await??;
    let after = Utc::now();

    // The implausible times were replaced by the receive time; the plausible one kept.
    let rows = client
        .query(
            "SELECT seq, started_at FROM check_results WHERE node = 'n1' ORDER BY seq",
            &[],
        )
        .await?;
    let times: Vec<(i64, DateTime<Utc>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(times.len(), 3, "{times:?}");
    for (seq, at) in &times[..2] {
        assert!(
            *at >= before - chrono::Duration::seconds(1) && *at <= after,
            "seq {seq} stored at {at}"
        );
    }
    assert_eq!(times[2].1.timestamp_millis(), now);
    let events = client
        .query(
            "SELECT reason, count FROM node_events WHERE node = 'n1' AND kind = 'clock'",
            &[],
        )
        .await?;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].get::<_, i64>(1), 2);
    assert!(
        events[0].get::<_, String>(0).contains("2 result(s)"),
        "{}",
        events[0].get::<_, String>(0)
    );

    // The node's clock offset, measured at Hello, is in /api/nodes and flagged.
    let (token, _) = create_token(&collector.hub.store, "viewer-1", Role::Viewer).await?;
    let base = format!("http://{}", collector.http_addr.expect("http enabled"));
    let http = reqwest::Client::new();
    let node = wait_for(
        "the clock offset in /api/nodes",
        Duration::from_secs(20),
        || async {
            let nodes: serde_json::Value = http
                .get(format!("{base}/api/nodes"))
                .bearer_auth(&token)
                .send()
                .await?
                .json()
                .await?;
            Ok(nodes
                .as_array()
                .and_then(|a| a.iter().find(|n| n["name"] == "n1"))
                .filter(|n| !n["clock_offset_ms"].is_null())
                .cloned())
        },
    )
    .await?;
    let offset = node["clock_offset_ms"].as_i64().unwrap_or_default();
    // Hello travelled between `before` and `after`.
    let travel = (after - before).num_milliseconds();
    assert!(
        (AHEAD_MS - travel..=AHEAD_MS).contains(&offset),
        "{offset} {node}"
    );
    assert_eq!(node["clock_skewed"], true, "{node}");

    // A check-now answered by the same agent, its clock still an hour ahead and the result
    // dated 2100: stored (epoch 0) with the receive time, the command's start held to the rule.
    let (op, _) = create_token(&collector.hub.store, "operator-1", Role::Operator).await?;
    let force = {
        let (http, base) = (http.clone(), base.clone());
        tokio::spawn(async move {
            http.post(format!("{base}/api/health-check/force/svc?wait=20"))
                .bearer_auth(&op)
                .send()
                .await?
                .json::<serde_json::Value>()
                .await
        })
    };
    let cmd = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match inbound.message().await?.and_then(|m| m.msg) {
                Some(Out::Command(c)) if c.action == "check" => return anyhow::Ok(c),
                Some(_) => continue,
                None => anyhow::bail!("stream ended without the check-now command"),
            }
        }
    })
    .await??;
    let asked = Utc::now();
    tx.send(AgentMessage {
        msg: Some(In::CommandResult(v1::CommandResult {
            command_id: cmd.command_id.clone(),
            issuer: cmd.issuer.clone(),
            success: true,
            started_at_ms: y2100,
            check: Some(v1::CheckResult {
                seq: 0,
                ..result(0, y2100)
            }),
            ..Default::default()
        })),
    })
    .await?;
    let answer = force.await??;
    let answered = Utc::now();
    assert_eq!(answer["command"]["status"], "succeeded", "{answer}");
    let row = client
        .query_one(
            "SELECT started_at FROM check_results WHERE node = 'n1' AND outbox_epoch = 0",
            &[],
        )
        .await?;
    let at: DateTime<Utc> = row.get(0);
    assert!(
        at >= asked - chrono::Duration::seconds(1) && at <= answered,
        "check-now result stored at {at}"
    );
    let started: Option<DateTime<Utc>> = client
        .query_one(
            "SELECT started_at FROM commands WHERE id = $1",
            &[&cmd.command_id.parse::<i64>()?],
        )
        .await?
        .get(0);
    assert!(
        started.is_some_and(|s| s <= answered),
        "command started_at {started:?}"
    );
    drop(tx);
    collector.shutdown().await;
    Ok(())
}
