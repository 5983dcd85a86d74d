//! The store's ingest against real PostgreSQL: a batch with a failing result is written while
//! batches of passing results are stuck, because passing batches never take the pool's last
//! connections (the path a threshold crossing takes to its restart command).

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use vigil_checks::Status;
use vigil_collector::Store;
use vigil_collector::config::Thresholds;
use vigil_collector::store::{Dedupe, ResultIn};
use vigil_tests::{init, pg, wait_for};

const LIMIT: Duration = Duration::from_secs(20);

fn result(seq: u64, service: &str, status: Status) -> ResultIn {
    ResultIn {
        duration_us: 0,
        seq,
        service_id: service.into(),
        started_at: Utc::now(),
        duration_ms: 1,
        status,
        message: format!("result {seq}"),
        metrics: Vec::new(),
        output: String::new(),
        config_version: 0,
    }
}

/// The collector's connections to this database waiting for a row lock.
async fn lock_waiters(client: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'vigil-collector'
               AND wait_event_type = 'Lock'",
            &[],
        )
        .await?
        .get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_batch_is_written_while_passing_batches_wait() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    // Pool of 3: passing batches may use 2 connections at once, the third stays free.
    let store = Store::connect(&db.url, 3).await?;
    let thresholds: HashMap<String, Thresholds> = ["busy", "sick"]
        .into_iter()
        .map(|s| {
            let t = Thresholds {
                after: 1,
                recover_after: 1,
                flap_high: 50,
                flap_low: 25,
            };
            (s.to_string(), t)
        })
        .collect();
    let client = db.connect().await?;
    client
        .execute(
            "INSERT INTO service_state (service_id) VALUES ('busy'), ('sick')",
            &[],
        )
        .await?;

    // Another session holds the row of "busy": every batch for it blocks inside its transaction.
    let mut holder = db.connect().await?;
    let lock = holder.transaction().await?;
    lock.execute(
        "SELECT 1 FROM service_state WHERE service_id = 'busy' FOR UPDATE",
        &[],
    )
    .await?;

    // Three passing batches for "busy" (three outboxes of one node): two get connections and
    // wait for the row lock, the third waits for its turn without taking the last connection.
    let mut passing = Vec::new();
    for epoch in 1..=3u64 {
        let store = store.clone();
        let th = thresholds.clone();
        passing.push(tokio::spawn(async move {
            store
                .ingest(
                    "n1",
                    epoch,
                    &[result(1, "busy", Status::Ok)],
                    &th,
                    Dedupe::Outbox,
                )
                .await
        }));
    }
    wait_for(
        "two passing batches blocked on the row lock",
        LIMIT,
        || async { Ok((lock_waiters(&client).await? >= 2).then_some(())) },
    )
    .await?;

    // A failing result for another service is stored at once, the lock still held.
    let report = tokio::time::timeout(
        LIMIT,
        store.ingest(
            "n2",
            7,
            &[result(1, "sick", Status::Critical)],
            &thresholds,
            Dedupe::Outbox,
        ),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the failing batch waited behind the passing ones"))??;
    assert_eq!(report.inserted, 1);
    assert_eq!(report.transitions.len(), 1, "{:?}", report.transitions);
    assert_eq!(
        lock_waiters(&client).await?,
        2,
        "only two passing batches ever held connections"
    );

    // Released, every passing batch is stored.
    lock.rollback().await?;
    for p in passing {
        let report = tokio::time::timeout(LIMIT, p).await???;
        assert_eq!(report.inserted, 1);
    }
    let stored: i64 = client
        .query_one("SELECT count(*) FROM check_results", &[])
        .await?
        .get(0);
    assert_eq!(stored, 4);
    Ok(())
}
