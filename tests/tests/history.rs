//! History at scale against real PostgreSQL: day partitions and retention (old partitions
//! dropped, roll-ups kept), roll-ups equal to what the raw rows say (a property test over random
//! result sequences, resends included), the V11/V12 migration on a database holding data, and
//! the service list's query reading no raw results.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Duration as Span, DurationRound, Utc};
use proptest::prelude::*;
use vigil_checks::{Metric, Status};
use vigil_collector::Store;
use vigil_collector::config::{Retention, Thresholds};
use vigil_collector::store::{Dedupe, HEALTH_SQL, ResultIn, partition_name};
use vigil_tests::{init, pg};

const DAY: Duration = Duration::from_secs(86_400);

fn thresholds(ids: &[&str]) -> HashMap<String, Thresholds> {
    ids.iter()
        .map(|s| {
            let t = Thresholds {
                after: 2,
                recover_after: 1,
                flap_high: 50,
                flap_low: 25,
            };
            (s.to_string(), t)
        })
        .collect()
}

fn result(seq: u64, service: &str, at: DateTime<Utc>, ms: u32, status: Status) -> ResultIn {
    ResultIn {
        duration_us: 0,
        seq,
        service_id: service.into(),
        started_at: at,
        duration_ms: ms,
        status,
        message: format!("result {seq}"),
        metrics: vec![Metric::new("load", ms as f64 / 10.0, "")],
        output: String::new(),
        config_version: 0,
    }
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> anyhow::Result<i64> {
    Ok(client.query_one(sql, &[]).await?.get(0))
}

fn retention(raw_days: u32, hourly_days: u32) -> Retention {
    Retention {
        raw: DAY * raw_days,
        hourly: DAY * hourly_days,
        daily: DAY * 730,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_old_partitions_and_keeps_rollups() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let store = Store::connect(&db.url, 4).await?;
    let client = db.connect().await?;
    let now = Utc::now();
    let th = thresholds(&["svc"]);
    // Partitions for 30 days back, then results 20 days old, 10 days old and now.
    vigil_collector::history::pass(&store, retention(30, 90), now).await?;
    let days = store.partitions().await?;
    assert!(
        days.contains(&(now - Span::days(20)).date_naive()),
        "{days:?}"
    );
    let ages = [20i64, 10, 0];
    let mut seq = 0;
    for age in ages {
        let batch: Vec<ResultIn> = (0..40)
            .map(|i| {
                seq += 1;
                let at = now - Span::days(age) - Span::minutes(40 - i);
                result(seq, "svc", at, 10 + i as u32, Status::Ok)
            })
            .collect();
        store.ingest("n1", 1, &batch, &th, Dedupe::Outbox).await?;
    }
    // A straggler older than every partition goes to the default partition.
    let old = result(1, "svc", now - Span::days(400), 5, Status::Critical);
    store
        .ingest("n1", 0, &[old], &th, Dedupe::PerResult)
        .await?;
    assert_eq!(
        count(&client, "SELECT count(*) FROM check_results_default").await?,
        1
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM check_results").await?,
        121
    );
    let hourly_before = count(&client, "SELECT sum(checks)::int8 FROM rollup_hourly").await?;
    assert_eq!(hourly_before, 121);

    // Raw retention 14 days: the partitions of 15 days ago and older go, whole.
    vigil_collector::history::pass(&store, retention(14, 90), now).await?;
    let days = store.partitions().await?;
    let oldest = *days.first().expect("partitions");
    assert_eq!(oldest, (now - Span::days(14)).date_naive(), "{days:?}");
    assert!(!days.contains(&(now - Span::days(20)).date_naive()));
    let table = partition_name((now - Span::days(20)).date_naive());
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await?
        .get(0);
    assert!(!exists, "{table} is dropped");
    assert_eq!(
        count(&client, "SELECT count(*) FROM check_results").await?,
        80
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM check_results_default").await?,
        0,
        "the straggler past retention is purged"
    );
    // Roll-ups are kept: every hour and day still counts every result (but the straggler's
    // hour, 400 days old, is past retention.hourly).
    assert_eq!(
        count(&client, "SELECT sum(checks)::int8 FROM rollup_hourly").await?,
        120
    );
    assert_eq!(
        count(&client, "SELECT sum(checks)::int8 FROM rollup_daily").await?,
        121
    );
    // Hourly retention 2 days: hours older go, days stay.
    vigil_collector::history::pass(&store, retention(14, 2), now).await?;
    assert_eq!(
        count(&client, "SELECT sum(checks)::int8 FROM rollup_hourly").await?,
        40
    );
    assert_eq!(
        count(&client, "SELECT sum(checks)::int8 FROM rollup_daily").await?,
        121
    );
    // Partitions stay ahead of today and do not come back for dropped days.
    let days = store.partitions().await?;
    assert!(days.contains(&(now + Span::days(3)).date_naive()));
    assert_eq!(days.first(), Some(&oldest));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_of_a_day_without_partition_moves_in_when_the_partition_is_made()
-> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let store = Store::connect(&db.url, 4).await?;
    let client = db.connect().await?;
    let now = Utc::now();
    let th = thresholds(&["svc"]);
    // A backlog 5 days old arrives before any partition for that day exists.
    let batch: Vec<ResultIn> = (1..=40)
        .map(|i| {
            result(
                i,
                "svc",
                now - Span::days(5) + Span::seconds(i as i64),
                7,
                Status::Ok,
            )
        })
        .collect();
    store.ingest("n1", 9, &batch, &th, Dedupe::Outbox).await?;
    assert_eq!(
        count(&client, "SELECT count(*) FROM check_results_default").await?,
        40
    );
    vigil_collector::history::pass(&store, retention(14, 90), now).await?;
    assert_eq!(
        count(&client, "SELECT count(*) FROM check_results_default").await?,
        0
    );
    let table = partition_name((now - Span::days(5)).date_naive());
    assert_eq!(
        count(&client, &format!("SELECT count(*) FROM {table}")).await?,
        40
    );
    // Sent again: stored once (outbox progress), and once more through the per-result key.
    let report = store.ingest("n1", 9, &batch, &th, Dedupe::Outbox).await?;
    assert_eq!(report.inserted, 0);
    let report = store
        .ingest("n1", 9, &batch, &th, Dedupe::PerResult)
        .await?;
    assert_eq!(report.inserted, 0);
    assert_eq!(
        count(&client, "SELECT count(*) FROM check_results").await?,
        40
    );
    assert_eq!(
        count(&client, "SELECT sum(checks)::int8 FROM rollup_hourly").await?,
        40
    );
    Ok(())
}

/// Rows of `check_results` a V10 database held, as (id, node, epoch, seq, service, started_at).
type Key = (i64, String, i64, i64, String, DateTime<Utc>);

async fn keys(client: &tokio_postgres::Client) -> anyhow::Result<Vec<Key>> {
    Ok(client
        .query(
            "SELECT id, node, outbox_epoch, seq, service_id, started_at FROM check_results ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_converts_a_populated_database_in_place() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    Store::migrate_to(&db.url, 10).await?;
    let client = db.connect().await?;
    // Three days of results of two services, one dated 1999 and one in 2100 (stored before
    // clock sanity existed), and the outbox progress V4 derived.
    client
        .batch_execute(
            "INSERT INTO check_results (node, outbox_epoch, seq, service_id, started_at,
                                        duration_ms, status, message, metrics)
             SELECT 'n1', 5, g, CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END,
                    now() - make_interval(mins => 3 * 24 * 60 - g), g % 900, (g % 4)::int2,
                    'm' || g, jsonb_build_array(jsonb_build_object('label', 'x', 'value', g))
             FROM generate_series(1, 4000) AS g;
             INSERT INTO check_results (node, outbox_epoch, seq, service_id, started_at,
                                        duration_ms, status, message)
             VALUES ('n1', 0, 77, 'a', '1999-06-01T00:00:00Z', 3, 0, 'old clock'),
                    ('n1', 0, 78, 'a', '2100-01-01T00:00:00Z', 3, 0, 'future clock');
             INSERT INTO outbox_progress (node, outbox_epoch, stored_seq) VALUES ('n1', 5, 4000);
             INSERT INTO daily_stats (service_id, day, checks, failures)
             VALUES ('a', current_date, 1, 0);",
        )
        .await?;
    let before = keys(&client).await?;
    assert_eq!(before.len(), 4002);

    let store = Store::connect(&db.url, 4).await?;
    let after = keys(&client).await?;
    assert_eq!(before, after, "every row, id and key survives");
    let partitions: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'check_results'::regclass",
            &[],
        )
        .await?
        .get(0);
    assert!(partitions >= 5, "{partitions} partitions");
    assert_eq!(
        count(&client, "SELECT count(*) FROM check_results_default").await?,
        2,
        "the 1999 and 2100 rows"
    );
    // The roll-ups start from what was stored.
    assert_eq!(
        count(&client, "SELECT sum(checks)::int8 FROM rollup_hourly").await?,
        4002
    );
    assert_eq!(
        count(
            &client,
            "SELECT sum(failures)::int8 FROM rollup_daily WHERE service_id IN ('a', 'b')"
        )
        .await?,
        count(
            &client,
            "SELECT count(*) FROM check_results WHERE status >= 2"
        )
        .await?
    );
    // New ids continue after the old ones.
    let th = thresholds(&["a", "b"]);
    let now = Utc::now();
    let fresh: Vec<ResultIn> = (4001..=4040)
        .map(|s| result(s, "a", now, 1, Status::Ok))
        .collect();
    store.ingest("n1", 5, &fresh, &th, Dedupe::Outbox).await?;
    let max_old = before.iter().map(|k| k.0).max().unwrap_or(0);
    assert_eq!(
        count(
            &client,
            &format!("SELECT count(*) FROM check_results WHERE id > {max_old}")
        )
        .await?,
        40
    );
    // A re-sent old result is still stored once, on either path.
    let old = &before[10];
    let resent = result(old.3 as u64, &old.4, old.5, 1, Status::Ok);
    let r = store
        .ingest("n1", 5, std::slice::from_ref(&resent), &th, Dedupe::Outbox)
        .await?;
    assert_eq!(r.inserted, 0);
    let r = store
        .ingest(
            "n1",
            5,
            std::slice::from_ref(&resent),
            &th,
            Dedupe::PerResult,
        )
        .await?;
    assert_eq!(r.inserted, 0);
    let old_clock = result(78, "a", "2100-01-01T00:00:00Z".parse()?, 3, Status::Ok);
    let r = store
        .ingest("n1", 0, &[old_clock], &th, Dedupe::PerResult)
        .await?;
    assert_eq!(r.inserted, 0);
    assert_eq!(
        count(&client, "SELECT count(*) FROM check_results").await?,
        4042
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_list_reads_no_raw_results() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let _store = Store::connect(&db.url, 2).await?;
    let client = db.connect().await?;
    for with_24h in [true, false] {
        for only in [None, Some("x")] {
            let plan: serde_json::Value = client
                .query_one(
                    &format!("EXPLAIN (FORMAT JSON) {HEALTH_SQL}"),
                    &[&only, &with_24h],
                )
                .await?
                .get(0);
            let text = plan.to_string();
            // Without the figures PostgreSQL may still name the roll-ups under a false filter.
            assert!(!with_24h || text.contains("rollup_hourly"), "{text}");
            assert!(!text.contains("check_results"), "{text}");
        }
    }
    Ok(())
}

/// One generated result: service, minutes after the start, response ms, status, metrics.
type Gen = (usize, i64, u32, u8, Vec<(usize, f64)>);

fn gen_result() -> impl Strategy<Value = Gen> {
    (
        0usize..3,
        0i64..(3 * 60),
        prop_oneof![0u32..5, 1u32..100_000, Just(250u32)],
        0u8..4,
        prop::collection::vec((0usize..3, -1000.0f64..1000.0), 0..3),
    )
}

const LABELS: [&str; 3] = ["load", "temp", "rss"];

fn status(s: u8) -> Status {
    match s {
        0 => Status::Ok,
        1 => Status::Warning,
        2 => Status::Critical,
        _ => Status::Unknown,
    }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()) + 1e-9
}

/// Ingests `results` (in batches split at `cuts`, each batch sent twice) for services named
/// after `case`, then compares every hourly and daily roll-up with the raw rows.
async fn check_case(
    store: &Store,
    client: &tokio_postgres::Client,
    case: usize,
    start: DateTime<Utc>,
    results: &[Gen],
    cuts: &[usize],
) -> anyhow::Result<()> {
    let ids: Vec<String> = (0..3).map(|i| format!("p{case}-s{i}")).collect();
    let th = thresholds(&ids.iter().map(String::as_str).collect::<Vec<_>>());
    let all: Vec<ResultIn> = results
        .iter()
        .enumerate()
        .map(|(i, (svc, min, ms, st, metrics))| ResultIn {
            metrics: metrics
                .iter()
                .map(|(l, v)| Metric::new(LABELS[*l], *v, ""))
                .collect(),
            ..result(
                i as u64 + 1,
                &ids[*svc],
                start + Span::minutes(*min) + Span::milliseconds(i as i64),
                *ms,
                status(*st),
            )
        })
        .collect();
    let mut from = 0;
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (all.len() + 1)).collect();
    bounds.push(all.len());
    bounds.sort_unstable();
    for to in bounds {
        if to <= from {
            continue;
        }
        let batch = &all[from..to];
        let epoch = case as u64 + 1;
        store
            .ingest("n1", epoch, batch, &th, Dedupe::Outbox)
            .await?;
        // A resend (the ack was lost) changes nothing.
        let again = store
            .ingest("n1", epoch, batch, &th, Dedupe::Outbox)
            .await?;
        assert_eq!(again.inserted, 0);
        from = to;
    }
    let prefix = format!("p{case}-%");
    for (table, period) in [
        ("rollup_hourly", "date_trunc('hour', started_at, 'UTC')"),
        ("rollup_daily", "(started_at AT TIME ZONE 'UTC')::date"),
    ] {
        let (key, detail) = if table == "rollup_hourly" {
            ("hour", "rollup_hourly_detail")
        } else {
            ("day", "rollup_daily")
        };
        let raw = client
            .query(
                &format!(
                    "SELECT service_id, {period}::text, count(*), count(*) FILTER (WHERE status >= 2),
                            min(duration_ms)::float8, avg(duration_ms)::float8,
                            percentile_disc(0.95) WITHIN GROUP (ORDER BY duration_ms)::float8,
                            max(duration_ms)::float8
                     FROM check_results WHERE service_id LIKE $1 GROUP BY 1, 2 ORDER BY 1, 2"
                ),
                &[&prefix],
            )
            .await?;
        let rolled = client
            .query(
                &format!(
                    "SELECT service_id, {key}::text, checks, failures, min_ms, avg_ms, p95_ms, max_ms
                     FROM {table} WHERE service_id LIKE $1 ORDER BY 1, 2"
                ),
                &[&prefix],
            )
            .await?;
        assert_eq!(raw.len(), rolled.len(), "{table}: periods");
        for (r, u) in raw.iter().zip(&rolled) {
            let what = format!(
                "{table} {}/{}",
                r.get::<_, String>(0),
                r.get::<_, String>(1)
            );
            assert_eq!(r.get::<_, String>(0), u.get::<_, String>(0), "{what}");
            assert_eq!(r.get::<_, String>(1), u.get::<_, String>(1), "{what}");
            assert_eq!(r.get::<_, i64>(2), u.get::<_, i64>(2), "{what}: checks");
            assert_eq!(r.get::<_, i64>(3), u.get::<_, i64>(3), "{what}: failures");
            assert_eq!(r.get::<_, f64>(4), u.get::<_, f64>(4), "{what}: min");
            assert!(close(r.get(5), u.get(5), 1e-9), "{what}: avg");
            let (exact, est): (f64, f64) = (r.get(6), u.get(6));
            assert!(close(exact, est, 0.045), "{what}: p95 {est} vs {exact}");
            assert_eq!(r.get::<_, f64>(7), u.get::<_, f64>(7), "{what}: max");
        }
        // Perfdata by label.
        let raw = client
            .query(
                &format!(
                    "SELECT service_id, {period}::text, m->>'label', count(*),
                            min((m->>'value')::float8), avg((m->>'value')::float8),
                            max((m->>'value')::float8),
                            percentile_disc(0.95) WITHIN GROUP (ORDER BY (m->>'value')::float8)
                     FROM check_results, jsonb_array_elements(metrics) AS m
                     WHERE service_id LIKE $1 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
                ),
                &[&prefix],
            )
            .await?;
        let rolled = client
            .query(
                &format!(
                    "SELECT service_id, {key}::text, l.key, (l.value->>'n')::int8,
                            (l.value->>'min')::float8, (l.value->>'avg')::float8,
                            (l.value->>'max')::float8, (l.value->>'p95')::float8
                     FROM {detail}, jsonb_each(metrics) AS l
                     WHERE service_id LIKE $1 ORDER BY 1, 2, 3"
                ),
                &[&prefix],
            )
            .await?;
        assert_eq!(raw.len(), rolled.len(), "{table}: labels");
        for (r, u) in raw.iter().zip(&rolled) {
            let what = format!(
                "{table} {}/{}/{}",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2)
            );
            assert_eq!(r.get::<_, String>(2), u.get::<_, String>(2), "{what}");
            assert_eq!(r.get::<_, i64>(3), u.get::<_, i64>(3), "{what}: n");
            assert!(close(r.get(4), u.get(4), 1e-12), "{what}: min");
            assert!(close(r.get(5), u.get(5), 1e-9), "{what}: avg");
            assert!(close(r.get(6), u.get(6), 1e-12), "{what}: max");
            let (exact, est): (f64, f64) = (r.get(7), u.get(7));
            assert!(close(exact, est, 0.045), "{what}: p95 {est} vs {exact}");
        }
    }
    Ok(())
}

#[test]
fn rollups_equal_what_the_raw_rows_say() -> anyhow::Result<()> {
    init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (db, store, client) = rt.block_on(async {
        let db = pg::test_db().await?;
        let store = Store::connect(&db.url, 4).await?;
        let client = db.connect().await?;
        anyhow::Ok((db, store, client))
    })?;
    // Two hours before the last midnight: a sequence spans hours and usually two days.
    let start = Utc::now().duration_trunc(Span::days(1))? - Span::hours(2);
    let case = std::sync::atomic::AtomicUsize::new(0);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = (
        prop::collection::vec(gen_result(), 1..150),
        prop::collection::vec(0usize..200, 0..5),
    );
    runner
        .run(&strategy, |(results, cuts)| {
            let case = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            rt.block_on(check_case(&store, &client, case, start, &results, &cuts))
                .map_err(|e| TestCaseError::fail(format!("{e:#}")))
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    drop(db);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_in_state_of_an_hour_is_written_once() -> anyhow::Result<()> {
    init();
    let db = pg::test_db().await?;
    let store = Store::connect(&db.url, 2).await?;
    let client = db.connect().await?;
    client
        .batch_execute(
            "INSERT INTO services (id, name, category, node, check_kind, spec, after_failures,
                                   recover_after)
             VALUES ('a', 'a', 'api', 'n1', 'tcp', '{}', 3, 2),
                    ('b', 'b', 'api', 'n1', 'tcp', '{}', 3, 2)",
        )
        .await?;
    let hour = (Utc::now() - Span::hours(3)).duration_trunc(Span::hours(1))?;
    let at = |m: i64| hour + Span::minutes(m);
    // a: healthy before the hour, down for 10 minutes, stale for 5, paused for the last 15.
    for (t, kind, from, to) in [
        (hour - Span::hours(1), "state", "unknown", "healthy"),
        (at(10), "state", "healthy", "down"),
        (at(20), "state", "down", "healthy"),
        (at(30), "stale", "healthy", "stale"),
        (at(35), "stale", "stale", "fresh"),
        (at(45), "mode", "active", "paused"),
        (at(70), "mode", "paused", "active"),
    ] {
        client
            .execute(
                "INSERT INTO events (service_id, kind, from_state, to_state, reason, at)
                 VALUES ('a', $1, $2, $3, 'scripted', $4)",
                &[&kind, &from, &to, &t],
            )
            .await?;
    }
    assert_eq!(store.roll_up_states(hour).await?, 2);
    // Run again (another collector, a retried pass): nothing is added twice.
    assert_eq!(store.roll_up_states(hour).await?, 0);
    let min = 60_000i64;
    let row = client
        .query_one(
            "SELECT up_ms, down_ms, stale_ms, paused_ms, unknown_ms FROM rollup_hourly
             WHERE service_id = 'a' AND hour = $1",
            &[&hour],
        )
        .await?;
    let got: Vec<i64> = (0..5).map(|i| row.get(i)).collect();
    assert_eq!(got, vec![30 * min, 10 * min, 5 * min, 15 * min, 0]);
    let row = client
        .query_one(
            "SELECT up_ms, down_ms, stale_ms, paused_ms, unknown_ms FROM rollup_daily
             WHERE service_id = 'b' AND day = $1",
            &[&hour.date_naive()],
        )
        .await?;
    let got: Vec<i64> = (0..5).map(|i| row.get(i)).collect();
    assert_eq!(got, vec![0, 0, 0, 0, 60 * min], "b never reported");
    assert_eq!(store.states_done().await?, Some(hour + Span::hours(1)));
    Ok(())
}
