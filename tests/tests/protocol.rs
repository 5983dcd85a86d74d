//! The agent protocol spoken directly (no agent): re-sent results are stored once (also when an
//! older collector stored some without `outbox_progress`), a stream
//! without a client certificate gets a gRPC error, health answers without one, and oversized or
//! invalid messages are refused without harm.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use vigil_collector::{Collector, Config};
use vigil_proto::v1::{
    self, AgentMessage, agent_message::Msg as In, agent_service_client::AgentServiceClient,
    collector_message::Msg as Out,
};
use vigil_tests::{Workspace, init, pg, wait_for};

const EPOCH: u64 = 0x5eed;

async fn setup() -> anyhow::Result<(pg::TestDb, Workspace, Collector)> {
    setup_with(
        "id: svc\ncategory: system\nnode: n1\ncheck:\n  type: command\n  interval: 1h\n  argv: [\"/bin/true\"]\non_failure:\n  after: 2\n",
    )
    .await
}

/// A collector for node n1 with one service `svc` written as `yaml`.
async fn setup_with(yaml: &str) -> anyhow::Result<(pg::TestDb, Workspace, Collector)> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    ws.write_service("svc", yaml)?;
    let path = ws.write_collector(&db.url, &["n1"])?;
    let collector = Collector::start(Config::load(&path)?).await?;
    Ok((db, ws, collector))
}

async fn channel(
    ws: &Workspace,
    collector: &Collector,
    identity: Option<&str>,
) -> anyhow::Result<Channel> {
    let ca = std::fs::read(ws.certs().join("ca.pem"))?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(node) = identity {
        let cert = std::fs::read(ws.certs().join(format!("{node}.pem")))?;
        let key = std::fs::read(ws.certs().join(format!("{node}.key")))?;
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Ok(
        Channel::from_shared(format!("https://{}", collector.grpc_addr))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?,
    )
}

fn hello() -> AgentMessage {
    AgentMessage {
        msg: Some(In::Hello(v1::Hello {
            node: "n1".into(),
            agent_version: "test".into(),
            capabilities: None,
            config_version: 0,
            outbox_epoch: EPOCH,
            first_unacked_seq: 1,
            inventory_json: String::new(),
            ..Default::default()
        })),
    }
}

fn batch(seqs: std::ops::RangeInclusive<u64>, status: v1::Status) -> AgentMessage {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    AgentMessage {
        msg: Some(In::Results(v1::ResultBatch {
            outbox_epoch: EPOCH,
            results: seqs
                .map(|seq| v1::CheckResult {
                    seq,
                    service_id: "svc".into(),
                    started_at_ms: now + seq as i64,
                    duration_ms: 3,
                    status: status as i32,
                    message: format!("result {seq}"),
                    ..Default::default()
                })
                .collect(),
        })),
    }
}

/// Opens a stream, sends `msgs` after Hello, and returns the first Ack's up_to_seq.
async fn send_and_ack(ch: Channel, msgs: Vec<AgentMessage>) -> anyhow::Result<u64> {
    Ok(send_and_acks(ch, msgs, 0).await?[0])
}

/// Opens a stream, sends `msgs` after Hello, and returns every Ack's up_to_seq until one
/// reaches `until` (at least one).
async fn send_and_acks(
    ch: Channel,
    msgs: Vec<AgentMessage>,
    until: u64,
) -> anyhow::Result<Vec<u64>> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(hello()).await?;
    let mut inbound = AgentServiceClient::new(ch)
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    for m in msgs {
        tx.send(m).await?;
    }
    let mut acks = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match inbound.message().await?.and_then(|m| m.msg) {
                Some(Out::Ack(a)) => {
                    assert_eq!(a.outbox_epoch, EPOCH);
                    acks.push(a.up_to_seq);
                    if a.up_to_seq >= until {
                        return anyhow::Ok(());
                    }
                }
                Some(_) => continue,
                None => anyhow::bail!("stream ended without an Ack"),
            }
        }
    })
    .await??;
    Ok(acks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_results_are_stored_once_and_counted_once() -> anyhow::Result<()> {
    let (db, ws, collector) = setup().await?;
    // First connection: 10 failures, acknowledged.
    let up_to = send_and_ack(
        channel(&ws, &collector, Some("n1")).await?,
        vec![batch(1..=10, v1::Status::Critical)],
    )
    .await?;
    assert_eq!(up_to, 10);
    // A "restarted agent" that never saw the ack resends them, plus 5 new successes.
    let acks = send_and_acks(
        channel(&ws, &collector, Some("n1")).await?,
        vec![
            batch(1..=10, v1::Status::Critical),
            batch(11..=15, v1::Status::Ok),
        ],
        15,
    )
    .await?;
    assert_eq!(
        acks,
        vec![10, 15],
        "each batch is acked once it is committed"
    );
    let client = db.connect().await?;
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT seq) FROM check_results WHERE service_id = 'svc'",
            &[],
        )
        .await?;
    let (n, distinct): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!((n, distinct), (15, 15));
    // State advanced once per unique result: down after 2 failures (not re-counted), then 5
    // successes -> healthy (recover_after 2), and exactly 3 transitions.
    let row = client
        .query_one(
            "SELECT state, consecutive_successes FROM service_state WHERE service_id = 'svc'",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), "healthy");
    assert_eq!(row.get::<_, i32>(1), 5);
    let events: Vec<String> = client
        .query(
            "SELECT from_state || '->' || to_state FROM events ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        events,
        vec!["unknown->failing", "failing->down", "down->healthy"]
    );
    collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_stored_without_outbox_progress_are_not_stored_twice() -> anyhow::Result<()> {
    let (db, ws, collector) = setup().await?;
    let client = db.connect().await?;
    // Seqs 3 and 7 of this outbox stored the way a collector of an older version stored them:
    // in check_results (the same results: the same times), with no outbox_progress row. The
    // batch (large enough to be written with COPY) meets the unique key, is rolled back, and is
    // stored result by result.
    let n = vigil_collector::store::COPY_FROM as u64 + 8;
    let first = batch(1..=n, v1::Status::Critical);
    let Some(In::Results(b)) = &first.msg else {
        unreachable!("a result batch")
    };
    for r in b.results.iter().filter(|r| r.seq == 3 || r.seq == 7) {
        let at = chrono::DateTime::from_timestamp_millis(r.started_at_ms).expect("a time");
        client
            .execute(
                "INSERT INTO check_results (node, outbox_epoch, seq, service_id, started_at,
                                            duration_ms, status, message)
                 VALUES ('n1', $1, $2, 'svc', $3, 1, 2, 'stored before')",
                &[&(EPOCH as i64), &(r.seq as i64), &at],
            )
            .await?;
    }
    let ch = channel(&ws, &collector, Some("n1")).await?;
    let acks = send_and_acks(ch.clone(), vec![first], n).await?;
    assert_eq!(acks, vec![n]);
    // A later batch overlapping the stored seqs (5 again, 2 new) is filtered by the outbox's
    // stored seq.
    let acks = send_and_acks(ch, vec![batch(n - 4..=n + 2, v1::Status::Critical)], n + 2).await?;
    assert_eq!(acks, vec![n + 2]);
    let n = n as i64;
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT seq), count(*) FILTER (WHERE message = 'stored before')
             FROM check_results WHERE node = 'n1' AND outbox_epoch = $1",
            &[&(EPOCH as i64)],
        )
        .await?;
    let counts: (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        counts,
        (n + 2, n + 2, 2),
        "every seq once; the older rows kept"
    );
    let stored: i64 = client
        .query_one(
            "SELECT stored_seq FROM outbox_progress WHERE node = 'n1' AND outbox_epoch = $1",
            &[&(EPOCH as i64)],
        )
        .await?
        .get(0);
    assert_eq!(stored, n + 2);
    // Only the results this collector inserted count toward the state (not 3 and 7, not the
    // re-sent ones).
    let failures: i32 = client
        .query_one(
            "SELECT consecutive_failures FROM service_state WHERE service_id = 'svc'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(failures as i64, n);
    collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_without_client_certificate_gets_unauthenticated() -> anyhow::Result<()> {
    let (db, ws, collector) = setup().await?;
    let ch = channel(&ws, &collector, None).await?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(hello()).await?;
    let err = AgentServiceClient::new(ch.clone())
        .session(ReceiverStream::new(rx))
        .await
        .expect_err("a stream without a certificate must be refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    assert!(err.message().contains("client certificate"), "{err}");
    // The standard health service answers without a certificate (for probes).
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "vigil.v1.AgentService".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        resp.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let client = db.connect().await?;
    let n: i64 = client
        .query_one("SELECT count(*) FROM check_results", &[])
        .await?
        .get(0);
    assert_eq!(n, 0);
    collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_invalid_messages_are_refused_and_the_collector_keeps_serving()
-> anyhow::Result<()> {
    let (db, ws, collector) = setup().await?;
    // A message over the limit: the stream fails with an error, nothing is stored.
    let mut big = batch(1..=1, v1::Status::Ok);
    if let Some(In::Results(b)) = &mut big.msg {
        b.results[0].output = "x".repeat(vigil_proto::MAX_MESSAGE_BYTES + 1);
    }
    let err = send_and_ack(channel(&ws, &collector, Some("n1")).await?, vec![big])
        .await
        .expect_err("an oversized message must not be acked");
    eprintln!("oversized: {err:#}");
    // A batch with epoch 0 is invalid.
    let mut bad = batch(1..=1, v1::Status::Ok);
    if let Some(In::Results(b)) = &mut bad.msg {
        b.outbox_epoch = 0;
    }
    let err = send_and_ack(channel(&ws, &collector, Some("n1")).await?, vec![bad])
        .await
        .expect_err("epoch 0 must be refused");
    assert!(format!("{err:#}").contains("outbox_epoch"), "{err:#}");
    // Results for a service that is not this node's are acked but not stored.
    let mut foreign = batch(1..=2, v1::Status::Ok);
    if let Some(In::Results(b)) = &mut foreign.msg {
        b.results[1].service_id = "someone-else".into();
    }
    assert_eq!(
        send_and_ack(channel(&ws, &collector, Some("n1")).await?, vec![foreign]).await?,
        2
    );
    let client = db.connect().await?;
    let ids: Vec<String> = client
        .query("SELECT service_id FROM check_results", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec!["svc"]);
    collector.shutdown().await;
    Ok(())
}

fn msg_batch(results: Vec<v1::CheckResult>) -> AgentMessage {
    AgentMessage {
        msg: Some(In::Results(v1::ResultBatch {
            outbox_epoch: EPOCH,
            results,
        })),
    }
}

fn result(seq: u64, message: &str) -> v1::CheckResult {
    v1::CheckResult {
        seq,
        service_id: "svc".into(),
        started_at_ms: chrono::Utc::now().timestamp_millis(),
        duration_ms: 1,
        status: v1::Status::Ok as i32,
        message: message.into(),
        ..Default::default()
    }
}

async fn node_events(
    client: &tokio_postgres::Client,
    kind: &str,
) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(client
        .query(
            "SELECT reason, count FROM node_events WHERE node = 'n1' AND kind = $1 ORDER BY id",
            &[&kind],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_strings_are_stored_sanitised_and_out_of_range_seqs_refused_with_a_reason()
-> anyhow::Result<()> {
    let (db, ws, collector) = setup().await?;
    let client = db.connect().await?;
    // NUL in the message, the output and a metric label and unit; 1,200 metrics.
    let mut poison = result(1, "bad\0message");
    poison.output = "out\0put".into();
    poison.metrics = (0..1200)
        .map(|i| v1::Metric {
            label: format!("x\0y{i}"),
            value: i as f64,
            unit: "\0".into(),
            ..Default::default()
        })
        .collect();
    let huge_seq = (1u64 << 63) + 5;
    let acks = send_and_acks(
        channel(&ws, &collector, Some("n1")).await?,
        vec![
            msg_batch(vec![poison, result(2, "honest")]),
            msg_batch(vec![result(huge_seq, "seq too big"), result(3, "honest")]),
            msg_batch(vec![result(4, "honest after")]),
            msg_batch(vec![result(u64::MAX, "seq max")]),
        ],
        u64::MAX,
    )
    .await?;
    // Every batch acknowledged (the refused results too: sending them again cannot succeed).
    assert_eq!(acks, vec![2, huge_seq, 4, u64::MAX]);
    let rows = client
        .query(
            "SELECT seq, message, output, jsonb_array_length(metrics), metrics->0->>'label',
                    metrics->0->>'unit'
             FROM check_results WHERE node = 'n1' ORDER BY seq",
            &[],
        )
        .await?;
    let seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        seqs,
        vec![1, 2, 3, 4],
        "honest results stored, nothing else"
    );
    let (message, output): (String, String) = (rows[0].get(1), rows[0].get(2));
    assert!(message.starts_with("bad\u{FFFD}message"), "{message}");
    assert!(
        message.contains("1200 metrics reported, the first 256 kept"),
        "{message}"
    );
    assert_eq!(output, "out\u{FFFD}put");
    assert_eq!(rows[0].get::<_, i32>(3), 256);
    assert_eq!(rows[0].get::<_, String>(4), "x\u{FFFD}y0");
    assert_eq!(rows[0].get::<_, String>(5), "\u{FFFD}");
    // The refusals are recorded with their reasons, and counted on the node.
    let refused = node_events(&client, "refused").await?;
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused[0].0.contains(&huge_seq.to_string()) && refused[0].0.contains("2^63-1"),
        "{refused:?}"
    );
    assert!(refused[1].0.contains(&u64::MAX.to_string()), "{refused:?}");
    let n: i64 = client
        .query_one("SELECT results_refused FROM nodes WHERE name = 'n1'", &[])
        .await?
        .get(0);
    assert_eq!(n, 2);
    collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_above_i64_max_is_refused_at_hello() -> anyhow::Result<()> {
    let (_db, ws, collector) = setup().await?;
    let (tx, rx) = mpsc::channel(4);
    let mut h = hello();
    if let Some(In::Hello(h)) = &mut h.msg {
        h.outbox_epoch = (1 << 63) + 1;
    }
    tx.send(h).await?;
    let err = AgentServiceClient::new(channel(&ws, &collector, Some("n1")).await?)
        .session(ReceiverStream::new(rx))
        .await
        .expect_err("an epoch above 2^63-1 must be refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("2^63-1"), "{err}");
    collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_in_an_outbox_are_recorded_and_told_from_the_agents_own_drops() -> anyhow::Result<()> {
    let (db, ws, collector) = setup().await?;
    let client = db.connect().await?;
    let status = |dropped_total, dropped_through_seq| AgentMessage {
        msg: Some(In::Status(v1::AgentStatus {
            outbox_depth: 1,
            oldest_unacked_age_ms: 10,
            dropped_total,
            dropped_through_seq,
        })),
    };
    // 1..=3, then 6..=7 (4 and 5 never arrive), then the agent says it dropped up to 9 and
    // sends 10: 8 and 9 are its own drops.
    send_and_acks(
        channel(&ws, &collector, Some("n1")).await?,
        vec![
            batch(1..=3, v1::Status::Ok),
            batch(6..=7, v1::Status::Ok),
            status(2, 9),
            batch(10..=10, v1::Status::Ok),
        ],
        10,
    )
    .await?;
    let gaps = node_events(&client, "gap").await?;
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(gaps[0].1, 2);
    assert!(gaps[0].0.contains("seqs 4..=5"), "{gaps:?}");
    let dropped = node_events(&client, "dropped").await?;
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert_eq!(dropped[0].1, 2);
    assert!(dropped[0].0.contains("seqs 8..=9"), "{dropped:?}");
    let row = client
        .query_one(
            "SELECT results_lost, results_dropped, backlog_results FROM nodes WHERE name = 'n1'",
            &[],
        )
        .await?;
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (2, 2),
        "lost and dropped counted apart"
    );
    assert_eq!(row.get::<_, Option<i64>>(2), Some(1), "backlog recorded");
    // A reconnecting agent that resends what was stored makes no new gap.
    send_and_acks(
        channel(&ws, &collector, Some("n1")).await?,
        vec![batch(6..=11, v1::Status::Ok)],
        11,
    )
    .await?;
    assert_eq!(node_events(&client, "gap").await?.len(), 1);
    collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_postgres_refuses_for_good_is_replaced_and_the_rest_is_stored()
-> anyhow::Result<()> {
    let (db, ws, collector) = setup().await?;
    let client = db.connect().await?;
    // A constraint other than the idempotency key, as a stand-in for any value PostgreSQL
    // refuses for good (the sanitiser leaves no NUL to trip on).
    client
        .execute(
            "ALTER TABLE check_results ADD CONSTRAINT no_poison CHECK (message NOT IN ('poison', 'poison again'))",
            &[],
        )
        .await?;
    let mut many: Vec<v1::CheckResult> = (3..=42).map(|s| result(s, "fine")).collect();
    many[9].message = "poison".into();
    let acks = send_and_acks(
        channel(&ws, &collector, Some("n1")).await?,
        vec![
            msg_batch(vec![result(1, "poison again"), result(2, "fine")]),
            msg_batch(many),
        ],
        42,
    )
    .await?;
    assert_eq!(acks, vec![2, 42], "both batches acknowledged");
    let rows = client
        .query(
            "SELECT seq, status, message FROM check_results WHERE node = 'n1' ORDER BY seq",
            &[],
        )
        .await?;
    let seqs: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        seqs,
        (1..=42).collect::<Vec<i64>>(),
        "every seq stored once"
    );
    for seq in [1i64, 12] {
        let r = rows.iter().find(|r| r.get::<_, i64>(0) == seq).unwrap();
        assert_eq!(r.get::<_, i16>(1), 3, "seq {seq} stored as UNKNOWN");
        let m: String = r.get(2);
        assert!(
            m.contains("could not be stored") && m.contains("23514") && m.contains("no_poison"),
            "{m}"
        );
    }
    let fine = rows.iter().filter(|r| r.get::<_, i16>(1) == 0).count();
    assert_eq!(fine, 40);
    assert!(
        node_events(&client, "gap").await?.is_empty(),
        "no seq missing"
    );
    collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_a_recent_result_is_stale_until_one_arrives() -> anyhow::Result<()> {
    // Checked hourly, stale after 2 s: the test needs no waiting for an hour.
    let (db, ws, collector) = setup_with(
        "id: svc\ncategory: system\nnode: n1\nstale_after: 2s\ncheck:\n  type: command\n  interval: 1h\n  argv: [\"/bin/true\"]\n",
    )
    .await?;
    let client = db.connect().await?;
    send_and_ack(
        channel(&ws, &collector, Some("n1")).await?,
        vec![batch(1..=2, v1::Status::Ok)],
    )
    .await?;
    assert_eq!(stale(&client).await?, ("healthy".into(), None));
    let reason = wait_for("svc stale", Duration::from_secs(20), || async {
        Ok(stale(&client).await?.1)
    })
    .await?;
    assert!(reason.starts_with("no result for"), "{reason}");
    // The health API's row says so too.
    let rows = collector.hub.store.health(Some("svc"), false).await?;
    assert_eq!(rows[0].shown_state(), "stale");
    assert!(!rows[0].is_up());
    // One result: fresh again, with both events.
    send_and_ack(
        channel(&ws, &collector, Some("n1")).await?,
        vec![batch(3..=3, v1::Status::Ok)],
    )
    .await?;
    assert_eq!(stale(&client).await?, ("healthy".into(), None));
    let events: Vec<String> = client
        .query(
            "SELECT from_state || '->' || to_state FROM events WHERE kind = 'stale' ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(events, vec!["healthy->stale", "stale->fresh"]);
    collector.shutdown().await;
    Ok(())
}

async fn stale(client: &tokio_postgres::Client) -> anyhow::Result<(String, Option<String>)> {
    let r = client
        .query_one(
            "SELECT state, stale_reason FROM service_state WHERE service_id = 'svc'",
            &[],
        )
        .await?;
    Ok((r.get(0), r.get(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_backlog_opens_an_incident_that_closes_when_it_drains() -> anyhow::Result<()> {
    let (db, ws, collector) = setup().await?;
    let client = db.connect().await?;
    let status = |depth, age_ms| AgentMessage {
        msg: Some(In::Status(v1::AgentStatus {
            outbox_depth: depth,
            oldest_unacked_age_ms: age_ms,
            ..Default::default()
        })),
    };
    let (tx, rx) = mpsc::channel(16);
    tx.send(hello()).await?;
    let _inbound = AgentServiceClient::new(channel(&ws, &collector, Some("n1")).await?)
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    // 5,000 results held, the oldest for 10 minutes (the default threshold is 5).
    tx.send(status(5000, 600_000)).await?;
    let reason = wait_for("backlog incident", Duration::from_secs(20), || async {
        Ok(node_events(&client, "backlog").await?.pop().map(|e| e.0))
    })
    .await?;
    assert!(reason.contains("5000 result(s)"), "{reason}");
    let nodes = collector.hub.store.nodes().await?;
    let n1 = nodes.iter().find(|n| n.name == "n1").unwrap();
    assert_eq!(n1.backlog_results, Some(5000));
    assert!(n1.backlog_alert_since.is_some());
    // Drained: the incident closes, once.
    tx.send(status(0, 0)).await?;
    wait_for("backlog cleared", Duration::from_secs(20), || async {
        Ok((!node_events(&client, "backlog_cleared").await?.is_empty()).then_some(()))
    })
    .await?;
    assert_eq!(node_events(&client, "backlog").await?.len(), 1);
    collector.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_added_by_a_reload_gets_its_whole_stale_after() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let ws = Workspace::new()?;
    ws.issue("n1")?;
    let svc = |id: &str| {
        format!(
            "id: {id}\ncategory: system\nnode: n1\nstale_after: 3s\ncheck:\n  type: command\n  interval: 1h\n  argv: [\"/bin/true\"]\n"
        )
    };
    ws.write_service("old", &svc("old"))?;
    let path = ws.write_collector(&db.url, &["n1"])?;
    let collector = Collector::start(Config::load(&path)?).await?;
    let client = db.connect().await?;
    let stale_of = |id: &'static str| {
        let client = &client;
        async move {
            Ok(client
                .query_opt(
                    "SELECT extract(epoch FROM stale_since - state_since)::float8
                     FROM service_state WHERE service_id = $1 AND stale_since IS NOT NULL",
                    &[&id],
                )
                .await?
                .map(|r| r.get::<_, f64>(0)))
        }
    };
    // Without any result, "old" is stale 3 s after the collector started...
    wait_for("old stale", Duration::from_secs(20), || stale_of("old")).await?;
    // ... and "new", added now by a reload, 3 s after it was added, not at the next pass.
    ws.write_service("new", &svc("new"))?;
    collector.reload(&path).await?;
    let after = wait_for("new stale", Duration::from_secs(20), || stale_of("new")).await?;
    assert!(after >= 3.0, "stale {after:.1} s after it was added");
    collector.shutdown().await;
    Ok(())
}
