//! The `stale` scenario: the cost of the collector's liveness statements over many services
//! (the set-based pass that marks services stale and nodes down), timed against a real
//! PostgreSQL holding N services on M nodes.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::env::{self, Pg};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Runs the scenario; returns its report section.
pub async fn stale(pg: &Pg, services: usize, nodes: usize) -> anyhow::Result<String> {
    let name = "vigil_bench_stale";
    let url = pg.fresh_db(name).await?;
    // Migrations run here, as in the collector.
    let store = vigil_collector::Store::connect(&url, 2).await?;
    let db = env::connect(&url).await?;
    db.execute(
        "INSERT INTO nodes (name, has_agent, timeout_ms, last_seen)
         SELECT 'node-' || n, true, 60000, now() FROM generate_series(1, $1::int) n",
        &[&(nodes as i32)],
    )
    .await?;
    db.execute(
        "INSERT INTO services (id, name, category, node, check_kind, spec, after_failures,
                               recover_after, stale_after_ms)
         SELECT 'svc-' || s, 'svc-' || s, 'api', 'node-' || (1 + s % $2::int), 'tcp', '{}', 3, 2,
                65000
         FROM generate_series(1, $1::int) s",
        &[&(services as i32), &(nodes as i32)],
    )
    .await?;
    db.execute(
        "INSERT INTO service_state (service_id, state, last_result_at)
         SELECT id, 'healthy', now() FROM services",
        &[],
    )
    .await?;
    db.execute("ANALYZE", &[]).await?;
    let since = chrono::Utc::now() - chrono::Duration::hours(1);

    // The common case, every 2 s: nothing is due.
    let mut idle = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        let marked = store.mark_stale(since).await?;
        idle.push(t.elapsed());
        anyhow::ensure!(marked.is_empty(), "nothing should be stale yet");
    }
    let mut nodes_idle = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        let down = store.mark_nodes_down(since).await?;
        nodes_idle.push(t.elapsed());
        anyhow::ensure!(down.is_empty(), "no node should be down yet");
    }
    // The worst case: every service goes stale in one pass (events written too).
    db.execute(
        "UPDATE service_state SET last_result_at = now() - interval '1 hour'",
        &[],
    )
    .await?;
    let t = Instant::now();
    let marked = store.mark_stale(since).await?;
    let all = t.elapsed();
    anyhow::ensure!(
        marked.len() == services,
        "{} of {services} marked stale",
        marked.len()
    );
    // Every node down at once, then every service of a down node (already stale: no-op).
    db.execute(
        "UPDATE nodes SET last_seen = now() - interval '1 hour'",
        &[],
    )
    .await?;
    let t = Instant::now();
    let down = store.mark_nodes_down(since).await?;
    let nodes_all = t.elapsed();
    anyhow::ensure!(down.len() == nodes, "{} of {nodes} nodes down", down.len());
    drop(store);
    pg.drop_db(name).await;

    let mut out = String::new();
    writeln!(out, "## stale\n")?;
    writeln!(
        out,
        "{services} services on {nodes} nodes (the liveness pass runs every 2 s):\n"
    )?;
    writeln!(
        out,
        "- stale pass, nothing due: median {:.2} ms (30 passes)",
        ms(median(idle))
    )?;
    writeln!(
        out,
        "- stale pass marking all {services} services stale (with their events): {:.1} ms",
        ms(all)
    )?;
    writeln!(
        out,
        "- node pass, nothing due: median {:.2} ms; marking all {nodes} nodes down: {:.1} ms\n",
        ms(median(nodes_idle)),
        ms(nodes_all)
    )?;
    Ok(out)
}
