//! The `history` scenario: N services × D days of results every 30 s, COPYed into the real
//! (partitioned) schema with their roll-ups computed by the collector's own `rollup` code, then
//! the reads of the operator surface timed through the store (the queries the handlers run):
//! the service list / `/api/services/health`, a service page with its 24 h timeline, dropping a
//! day's partition, and the database size per million results. Before loading, the write cost
//! of the old indexes against the new ones (the same rows COPYed into a V10-shaped table and a
//! V11-shaped one).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound, NaiveDate, Utc};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{Json, ToSql, Type};
use vigil_checks::Metric;
use vigil_collector::config::Retention;
use vigil_collector::rollup::{Period, Sample};
use vigil_collector::store::{RESULT_COLUMNS, RESULT_TYPES};

use crate::env::{self, Pg};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// p50 and p99 of `v`, ms.
fn p50_p99(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |q: f64| ms(v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]);
    (at(0.5), at(0.99))
}

/// What the scenario loads.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    pub services: usize,
    pub days: f64,
    pub interval_s: i64,
    pub streams: usize,
    /// Requests per timed read.
    pub requests: usize,
}

fn service(i: usize) -> String {
    format!("hist-{i:05}")
}

/// The result of service `svc` at tick `t`: (ms, status code, failed). One service in 50 is
/// down for 10 minutes each day (so that timelines and roll-ups have failures).
fn sample(svc: usize, t: i64, ticks_per_day: i64) -> (u32, i16) {
    let x = (svc as u64).wrapping_mul(2_654_435_761) ^ (t as u64).wrapping_mul(40_503);
    let ms = 5 + (x % 200) as u32 + if x.is_multiple_of(97) { 900 } else { 0 };
    let in_day = t.rem_euclid(ticks_per_day);
    let down = svc.is_multiple_of(50) && (100..120).contains(&in_day);
    (ms, if down { 2 } else { 0 })
}

/// Runs the scenario; returns its report section.
pub async fn run(pg: &Pg, size: &Size) -> anyhow::Result<String> {
    let name = "vigil_bench_history";
    let url = pg.fresh_db(name).await?;
    let store = vigil_collector::Store::connect(&url, 4).await?;
    let db = env::connect(&url).await?;
    let mut out = String::new();
    writeln!(out, "## history\n")?;
    let now = Utc::now();
    let ticks_per_day = 86_400 / size.interval_s;
    let ticks = (size.days * ticks_per_day as f64) as i64;
    let start = now - chrono::Duration::seconds(ticks * size.interval_s);
    let total = ticks as usize * size.services;
    writeln!(
        out,
        "{} services × {:.1} days × {} s = {} results, binary COPY into the real schema \
         ({} streams), roll-ups computed by `vigil_collector::rollup` and written with \
         `Store::put_rollups`; reads timed through the store ({} requests each).\n",
        size.services, size.days, size.interval_s, total, size.streams, size.requests
    )?;

    // Services and their state, on 100 nodes.
    db.execute(
        "INSERT INTO nodes (name, has_agent, timeout_ms, last_seen)
         SELECT 'node-' || n, true, 60000, now() FROM generate_series(0, 99) n",
        &[],
    )
    .await?;
    let ids: Vec<String> = (0..size.services).map(service).collect();
    db.execute(
        "INSERT INTO services (id, name, category, node, check_kind, spec, after_failures,
                               recover_after, stale_after_ms)
         SELECT id, id, 'api', 'node-' || (n % 100), 'tcp', '{}', 3, 2, 65000
         FROM UNNEST($1::text[]) WITH ORDINALITY AS s(id, n)",
        &[&ids],
    )
    .await?;
    db.execute(
        "INSERT INTO service_state (service_id, state, last_result_at, last_check_at)
         SELECT id, 'healthy', now(), now() FROM services",
        &[],
    )
    .await?;

    // The write cost of the indexes, before and after, on the same 500,000 rows.
    let probe = 500_000.min(total.max(1));
    for (table, ddl) in [
        (
            "cr_v10",
            "CREATE TABLE cr_v10 (id BIGSERIAL PRIMARY KEY, node TEXT NOT NULL,
                outbox_epoch BIGINT NOT NULL, seq BIGINT NOT NULL, service_id TEXT NOT NULL,
                started_at TIMESTAMPTZ NOT NULL, duration_ms INTEGER NOT NULL,
                status SMALLINT NOT NULL, message TEXT NOT NULL, metrics JSONB NOT NULL DEFAULT '[]',
                output TEXT NOT NULL DEFAULT '', config_version BIGINT NOT NULL DEFAULT 0,
                received_at TIMESTAMPTZ NOT NULL DEFAULT now(), UNIQUE (node, outbox_epoch, seq));
             CREATE INDEX ON cr_v10 (service_id, started_at DESC);",
        ),
        (
            "cr_v11",
            "CREATE SEQUENCE cr_v11_id;
             CREATE TABLE cr_v11 (id BIGINT NOT NULL DEFAULT nextval('cr_v11_id'),
                node TEXT NOT NULL, outbox_epoch BIGINT NOT NULL, seq BIGINT NOT NULL,
                service_id TEXT NOT NULL, started_at TIMESTAMPTZ NOT NULL,
                duration_ms INTEGER NOT NULL, status SMALLINT NOT NULL, message TEXT NOT NULL,
                metrics JSONB NOT NULL DEFAULT '[]', output TEXT NOT NULL DEFAULT '',
                config_version BIGINT NOT NULL DEFAULT 0,
                received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                UNIQUE (node, outbox_epoch, seq, started_at)) PARTITION BY RANGE (started_at);
             CREATE INDEX ON cr_v11 (service_id, started_at DESC);
             CREATE TABLE cr_v11_all PARTITION OF cr_v11 DEFAULT;",
        ),
    ] {
        db.batch_execute(ddl).await?;
        let t = Instant::now();
        copy_range(&url, table, size, start, probe).await?;
        let e = t.elapsed();
        writeln!(
            out,
            "- index cost probe: {probe} rows COPYed into a {} table: {:.1} s ({:.0} rows/s)",
            if table == "cr_v10" {
                "V10-shaped (3 B-trees: id, key, service/time)"
            } else {
                "V11-shaped partitioned (2 B-trees: key with started_at, service/time)"
            },
            e.as_secs_f64(),
            probe as f64 / e.as_secs_f64()
        )?;
        db.batch_execute(&format!("DROP TABLE {table}")).await?;
    }

    // Partitions for the whole period, then the load.
    let keep = Retention {
        raw: Duration::from_secs(((size.days + 2.0) * 86_400.0) as u64),
        ..Retention::default()
    };
    vigil_collector::history::pass(&store, keep, now).await?;
    let t = Instant::now();
    let per = size.services.div_ceil(size.streams.max(1));
    let mut tasks = Vec::new();
    for s in 0..size.streams.max(1) {
        let url = url.clone();
        let (lo, hi) = (s * per, ((s + 1) * per).min(size.services));
        let size = *size;
        tasks.push(tokio::spawn(async move {
            copy_services(&url, &size, start, lo, hi, ticks).await
        }));
    }
    let mut hourly = Vec::new();
    let mut daily = Vec::new();
    for task in tasks {
        let (h, d) = task.await??;
        hourly.extend(h);
        daily.extend(d);
    }
    let load = t.elapsed();
    let t = Instant::now();
    for chunk in hourly.chunks(20_000) {
        store.put_rollups(chunk, &[]).await?;
    }
    for chunk in daily.chunks(20_000) {
        store.put_rollups(&[], chunk).await?;
    }
    let rollups = t.elapsed();
    // Two state events a day for the services that go down.
    db.execute(
        "INSERT INTO events (service_id, kind, from_state, to_state, reason, at)
         SELECT s.id, 'state', e.f, e.t, 'bench', d + e.o
         FROM services s,
              generate_series(date_trunc('day', $1::timestamptz), now(), interval '1 day') d,
              (VALUES ('healthy', 'down', interval '3000 seconds'),
                      ('down', 'healthy', interval '3600 seconds')) AS e(f, t, o)
         WHERE substr(s.id, 6)::int % 50 = 0 AND d + e.o BETWEEN $1 AND now()",
        &[&start],
    )
    .await?;
    let t = Instant::now();
    db.batch_execute("ANALYZE").await?;
    let analyze = t.elapsed();
    writeln!(
        out,
        "- load: {total} results in {:.0} s ({:.0} rows/s); {} hourly and {} daily roll-ups \
         written in {:.1} s; ANALYZE {:.1} s",
        load.as_secs_f64(),
        total as f64 / load.as_secs_f64(),
        hourly.len(),
        daily.len(),
        rollups.as_secs_f64(),
        analyze.as_secs_f64()
    )?;

    // Sizes.
    let size_of = |like: &'static str| {
        let db = &db;
        async move {
            let r = db
                .query_one(
                    "SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0)::int8,
                            COALESCE(sum(pg_indexes_size(c.oid)), 0)::int8
                     FROM pg_class c WHERE c.relkind = 'r' AND c.relname LIKE $1",
                    &[&like],
                )
                .await?;
            anyhow::Ok((r.get::<_, i64>(0), r.get::<_, i64>(1)))
        }
    };
    let (raw_bytes, raw_index) = size_of("check_results_%").await?;
    let (hourly_bytes, _) = size_of("rollup_hourly").await?;
    let (daily_bytes, _) = size_of("rollup_daily").await?;
    let mib = |b: i64| b as f64 / 1_048_576.0;
    writeln!(
        out,
        "- database size: raw {:.0} MiB ({:.0} MiB of it indexes) = **{:.0} MiB per million \
         results** ({:.0} bytes a result); hourly roll-ups {:.1} MiB ({} rows), daily {:.1} MiB\n",
        mib(raw_bytes),
        mib(raw_index),
        mib(raw_bytes) / (total as f64 / 1e6),
        raw_bytes as f64 / total as f64,
        mib(hourly_bytes),
        hourly.len(),
        mib(daily_bytes)
    )?;

    // Reads.
    writeln!(out, "| read | p50 ms | p99 ms |\n|---|---|---|")?;
    let n = size.requests.max(1);
    let mut times = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let rows = store.health(None, true).await?;
        times.push(t.elapsed());
        anyhow::ensure!(rows.len() == size.services, "every service listed");
    }
    let (p50, p99) = p50_p99(times);
    writeln!(
        out,
        "| service list / `/api/services/health` (`Store::health`, {} services, 24 h figures) | {p50:.1} | **{p99:.1}** |",
        size.services
    )?;
    let plan = db
        .query(
            &format!(
                "EXPLAIN (ANALYZE, BUFFERS) {}",
                vigil_collector::store::HEALTH_SQL
            ),
            &[&None::<&str>, &true],
        )
        .await?;
    let plan: Vec<String> = plan.iter().map(|r| r.get(0)).collect();
    eprintln!("service list plan:\n{}", plan.join("\n"));
    let alone = plan
        .iter()
        .find(|l| l.starts_with("Execution Time"))
        .cloned()
        .unwrap_or_default();
    let mut times = Vec::new();
    for i in 0..n {
        let id = service((i * 50) % size.services);
        let t = Instant::now();
        service_page(&store, &id).await?;
        times.push(t.elapsed());
    }
    let (p50, p99) = p50_p99(times);
    writeln!(
        out,
        "| a service page: its health, 24 h timeline (state events), 200 newest results, 50 events, 20 commands, 14 daily roll-ups | {p50:.1} | **{p99:.1}** |"
    )?;
    let mut times = Vec::new();
    for i in 0..n {
        let id = service((i * 37) % size.services);
        let t = Instant::now();
        store
            .hourly_of(&id, Utc::now() - chrono::Duration::days(30))
            .await?;
        times.push(t.elapsed());
    }
    let (p50, p99) = p50_p99(times);
    writeln!(
        out,
        "| one service's hourly roll-ups over 30 days (`Store::hourly_of`) | {p50:.1} | {p99:.1} |"
    )?;
    writeln!(
        out,
        "\nThe service list's query alone (EXPLAIN ANALYZE, once): {alone}."
    )?;
    writeln!(
        out,
        "\nAvailability over 30 days (`GET /api/services/{{id}}/availability`) is not on this \
         branch; not measured.\n"
    )?;

    // Dropping a whole day's partition: the partitions before the data and the first (partial)
    // day go first, then the first full day is timed.
    let days = store.partitions().await?;
    let first_data = start.date_naive();
    let full_day = first_data + chrono::Duration::days(1);
    anyhow::ensure!(days.contains(&full_day), "no partition for {full_day}");
    let midnight = |d: NaiveDate| {
        chrono::TimeZone::from_utc_datetime(&Utc, &d.and_hms_opt(0, 0, 0).expect("midnight"))
    };
    let far = |c: DateTime<Utc>| {
        (
            c - chrono::Duration::days(3650),
            c - chrono::Duration::days(3650),
        )
    };
    let (h, d) = far(midnight(full_day));
    let t = Instant::now();
    let before = store.purge_history(midnight(full_day), h, d).await?;
    let partial = t.elapsed();
    let rows_in: i64 = db
        .query_one(
            &format!(
                "SELECT count(*) FROM {}",
                vigil_collector::store::partition_name(full_day)
            ),
            &[],
        )
        .await?
        .get(0);
    let (h, d) = far(midnight(full_day + chrono::Duration::days(1)));
    let t = Instant::now();
    let purged = store
        .purge_history(midnight(full_day + chrono::Duration::days(1)), h, d)
        .await?;
    let dropped = t.elapsed();
    anyhow::ensure!(purged.partitions == vec![full_day], "{purged:?}");
    writeln!(
        out,
        "- dropping a whole day's partition ({full_day}, {rows_in} rows) through \
         `Store::purge_history`: **{:.0} ms** (before it: {} partitions up to the first, \
         partial day of data in {:.0} ms)\n",
        ms(dropped),
        before.partitions.len(),
        ms(partial)
    )?;
    drop(db);
    drop(store);
    pg.drop_db(name).await;
    Ok(out)
}

/// What the dashboard's service page reads.
async fn service_page(store: &vigil_collector::Store, id: &str) -> anyhow::Result<()> {
    let now = Utc::now();
    let from = now - chrono::Duration::hours(24);
    store.health(Some(id), true).await?;
    store.state_at(id, from).await?;
    store.state_events_since(id, from).await?;
    store.results_of(id, None, None, 200).await?;
    store.events_of(id, None, 50).await?;
    store.commands_of(id, 20).await?;
    store.daily_of(id, 14).await?;
    Ok(())
}

type HourKey = (String, DateTime<Utc>, Period);
type DayKey = (String, NaiveDate, Period);

/// COPYs the results of services `lo..hi` (every tick) into check_results and returns their
/// roll-ups.
async fn copy_services(
    url: &str,
    size: &Size,
    start: DateTime<Utc>,
    lo: usize,
    hi: usize,
    ticks: i64,
) -> anyhow::Result<(Vec<HourKey>, Vec<DayKey>)> {
    let mut client = env::connect(url).await?;
    let mut hours: HashMap<(usize, DateTime<Utc>), Period> = HashMap::new();
    let mut days: HashMap<(usize, NaiveDate), Period> = HashMap::new();
    // One transaction per day of ticks: a failure does not lose a whole load's work.
    let per_tx = (86_400 / size.interval_s).max(1);
    let mut t0 = 0;
    while t0 < ticks {
        let t1 = (t0 + per_tx).min(ticks);
        let tx = client.transaction().await?;
        let sink = tx
            .copy_in(&format!(
                "COPY check_results ({RESULT_COLUMNS}) FROM STDIN BINARY"
            ))
            .await?;
        let writer = BinaryCopyInWriter::new(sink, &RESULT_TYPES);
        let mut writer = std::pin::pin!(writer);
        for t in t0..t1 {
            let at = start + chrono::Duration::seconds(t * size.interval_s);
            let hour = at.duration_trunc(chrono::Duration::hours(1))?;
            for svc in lo..hi {
                let (ms, status) = sample(svc, t, 86_400 / size.interval_s);
                let metrics = vec![Metric::new("time", ms as f64 / 1000.0, "s")];
                let s = Sample {
                    duration_ms: ms,
                    failed: status >= 2,
                    metrics: &metrics,
                };
                hours.entry((svc, hour)).or_default().add(s);
                days.entry((svc, at.date_naive())).or_default().add(s);
                let node = format!("node-{}", (svc + 1) % 100);
                let id = service(svc);
                let message = if status == 0 {
                    format!("OK - answered in {ms} ms")
                } else {
                    "CRITICAL - connection refused".to_string()
                };
                let epoch = 1i64 + svc as i64;
                let seq = 1 + t;
                let values: [&(dyn ToSql + Sync); 11] = [
                    &node,
                    &epoch,
                    &seq,
                    &id,
                    &at,
                    &(ms as i32),
                    &status,
                    &message,
                    &Json(&metrics),
                    &"",
                    &1i64,
                ];
                writer.as_mut().write(&values).await?;
            }
        }
        writer.finish().await?;
        tx.commit().await?;
        t0 = t1;
    }
    Ok((
        hours
            .into_iter()
            .map(|((s, h), p)| (service(s), h, p))
            .collect(),
        days.into_iter()
            .map(|((s, d), p)| (service(s), d, p))
            .collect(),
    ))
}

/// COPYs `rows` results (services round-robin from tick 0) into `table`.
async fn copy_range(
    url: &str,
    table: &str,
    size: &Size,
    start: DateTime<Utc>,
    rows: usize,
) -> anyhow::Result<()> {
    let mut client = env::connect(url).await?;
    let tx = client.transaction().await?;
    let sink = tx
        .copy_in(&format!(
            "COPY {table} ({RESULT_COLUMNS}) FROM STDIN BINARY"
        ))
        .await?;
    let types: [Type; 11] = RESULT_TYPES;
    let writer = BinaryCopyInWriter::new(sink, &types);
    let mut writer = std::pin::pin!(writer);
    let services = size.services.max(1);
    for i in 0..rows {
        let svc = i % services;
        let t = (i / services) as i64;
        let at = start + chrono::Duration::seconds(t * size.interval_s);
        let (ms, status) = sample(svc, t, 86_400 / size.interval_s);
        let metrics = vec![Metric::new("time", ms as f64 / 1000.0, "s")];
        let node = format!("node-{}", (svc + 1) % 100);
        let id = service(svc);
        let message = format!("OK - answered in {ms} ms");
        let epoch = 1i64 + svc as i64;
        let seq = 1 + t;
        let values: [&(dyn ToSql + Sync); 11] = [
            &node,
            &epoch,
            &seq,
            &id,
            &at,
            &(ms as i32),
            &status,
            &message,
            &Json(&metrics),
            &"",
            &1i64,
        ];
        writer.as_mut().write(&values).await?;
    }
    writer.finish().await?;
    tx.commit().await?;
    Ok(())
}
