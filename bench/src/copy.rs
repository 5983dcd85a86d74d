//! The physical limit: the same rows the collector stores, written straight into
//! `check_results` with one binary `COPY` (tokio-postgres `BinaryCopyInWriter`), with a fresh
//! outbox epoch so that nothing conflicts with what the collector stored.

use std::time::{Duration, Instant};

use futures::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::ToSql;
use vigil_collector::store::{RESULT_COLUMNS, RESULT_TYPES};
use vigil_proto::v1;

/// Copies `rows` results spread over `nodes` × `checks` (as the simulated agents send them) in
/// `streams` parallel COPY statements; returns the elapsed time (including commit).
pub async fn copy_rows(
    url: &str,
    nodes: &[String],
    checks_per_node: usize,
    rows: usize,
    streams: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let per = rows.div_ceil(streams.max(1));
    let mut tasks = Vec::new();
    for s in 0..streams.max(1) {
        let url = url.to_string();
        let nodes = nodes.to_vec();
        let n = per.min(rows.saturating_sub(s * per));
        tasks.push(tokio::spawn(async move {
            copy_one(&url, &nodes, checks_per_node, n, s).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed())
}

async fn copy_one(
    url: &str,
    nodes: &[String],
    checks_per_node: usize,
    rows: usize,
    stream: usize,
) -> anyhow::Result<()> {
    let mut client = crate::env::connect(url).await?;
    let tx = client.transaction().await?;
    // The collector's own COPY statement: the same columns and types.
    let sink = tx
        .copy_in(&format!(
            "COPY check_results ({RESULT_COLUMNS}) FROM STDIN BINARY"
        ))
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &RESULT_TYPES);
    pin_mut!(writer);
    // A fresh epoch per stream: (node, epoch, seq) never meets the collector's rows.
    let epoch: i64 = (rand::random::<u64>() >> 1) as i64 | 1;
    let epoch = epoch ^ stream as i64;
    for i in 0..rows {
        let node = &nodes[i % nodes.len()];
        let check = (i / nodes.len()) % checks_per_node.max(1);
        let service = crate::service_id(node, check);
        let seq = (i + 1) as u64;
        // The same conversion the collector makes (grpc::result_in, store::ingest).
        let r = crate::sim::result(seq, &service, v1::Status::Ok, 1);
        let metrics: Vec<vigil_checks::Metric> = r.metrics.into_iter().map(Into::into).collect();
        let metrics = serde_json::to_value(&metrics)?;
        let started = chrono::DateTime::from_timestamp_millis(r.started_at_ms)
            .unwrap_or_else(chrono::Utc::now);
        let status: i16 = 0;
        let values: [&(dyn ToSql + Sync); 11] = [
            node,
            &epoch,
            &(seq as i64),
            &service,
            &started,
            &(r.duration_ms as i32),
            &status,
            &r.message,
            &metrics,
            &r.output,
            &(r.config_version as i64),
        ];
        writer.as_mut().write(&values).await?;
    }
    writer.finish().await?;
    tx.commit().await?;
    Ok(())
}
