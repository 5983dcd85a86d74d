//! History storage: the day partitions of `check_results` (created ahead, dropped whole past
//! retention), the hourly and daily roll-ups, and their retention.

use std::collections::HashMap;

use chrono::{DateTime, Duration, DurationRound, NaiveDate, TimeZone, Utc};
use deadpool_postgres::Transaction;
use serde::Serialize;
use tokio_postgres::types::{Json, ToSql};
use utoipa::ToSchema;

use super::{ResultIn, Store, StoreError};
use crate::rollup::{Condition, MetricSummary, Period, Sample, state_times};

/// Prefix of a day partition's name; the rest is the UTC day as `YYYYMMDD`.
pub const PARTITION_PREFIX: &str = "check_results_p";
/// The partition of results dated outside every day partition.
pub const DEFAULT_PARTITION: &str = "check_results_default";
/// Days ahead of today for which partitions exist.
pub const DAYS_AHEAD: i64 = 3;
/// How long partition maintenance waits for its lock on `check_results` before giving up until
/// the next pass (ingest transactions are short; a long one must not stall ingest behind us).
const LOCK_TIMEOUT: &str = "2s";

/// The name of the partition holding UTC day `day`.
pub fn partition_name(day: NaiveDate) -> String {
    format!("{PARTITION_PREFIX}{}", day.format("%Y%m%d"))
}

/// The UTC day a partition name stands for (None: not a day partition).
pub fn partition_day(name: &str) -> Option<NaiveDate> {
    let digits = name.strip_prefix(PARTITION_PREFIX)?;
    if digits.len() != 8 {
        return None;
    }
    NaiveDate::parse_from_str(digits, "%Y%m%d").ok()
}

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).expect("midnight exists"))
}

/// Day partitions whose every row is older than `cutoff` (their day ends at or before it).
pub fn expired(days: &[NaiveDate], cutoff: DateTime<Utc>) -> Vec<NaiveDate> {
    days.iter()
        .copied()
        .filter(|d| midnight(*d + Duration::days(1)) <= cutoff)
        .collect()
}

/// What one retention pass removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Purged {
    /// Day partitions dropped.
    pub partitions: Vec<NaiveDate>,
    /// Rows deleted from the default partition (stragglers dated outside every partition).
    pub stragglers: u64,
    pub hourly: u64,
    pub daily: u64,
}

impl Store {
    /// The UTC days that have a partition, oldest first.
    pub async fn partitions(&self) -> Result<Vec<NaiveDate>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT c.relname FROM pg_inherits i
                 JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = 'check_results'::regclass",
                &[],
            )
            .await?;
        let mut days: Vec<NaiveDate> = rows
            .iter()
            .filter_map(|r| partition_day(r.get::<_, &str>(0)))
            .collect();
        days.sort_unstable();
        Ok(days)
    }

    /// Creates the partitions of the days from `from` to `to` (inclusive) that do not exist
    /// yet; returns the days created. Rows of such a day already in the default partition are
    /// moved into the new partition in the same transaction.
    pub async fn ensure_partitions(
        &self,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<NaiveDate>, StoreError> {
        let have = self.partitions().await?;
        let mut created = Vec::new();
        let mut day = from;
        while day <= to {
            if !have.contains(&day) {
                self.create_partition(day).await?;
                created.push(day);
            }
            day += Duration::days(1);
        }
        Ok(created)
    }

    async fn create_partition(&self, day: NaiveDate) -> Result<(), StoreError> {
        let name = partition_name(day);
        let (lo, hi) = (midnight(day), midnight(day + Duration::days(1)));
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.batch_execute(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
            .await?;
        // A table of its own first, filled from the default partition, then attached: creating
        // it as a partition directly would fail if the default partition held rows of its day.
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {name} (LIKE check_results INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        ))
        .await?;
        tx.execute(
            &format!(
                "WITH moved AS (
                    DELETE FROM {DEFAULT_PARTITION} WHERE started_at >= $1 AND started_at < $2
                    RETURNING *)
                 INSERT INTO {name} SELECT * FROM moved"
            ),
            &[&lo, &hi],
        )
        .await?;
        // The bounds as literals: ATTACH takes no parameters.
        tx.batch_execute(&format!(
            "ALTER TABLE check_results ATTACH PARTITION {name}
             FOR VALUES FROM ('{}') TO ('{}')",
            lo.to_rfc3339(),
            hi.to_rfc3339()
        ))
        .await?;
        tx.commit().await?;
        tracing::info!(partition = %name, "created a day partition of check_results");
        Ok(())
    }

    /// Drops the day partitions whose whole day is older than `raw_cutoff`, deletes rows older
    /// than it from the default partition, and deletes roll-ups older than their cutoffs.
    pub async fn purge_history(
        &self,
        raw_cutoff: DateTime<Utc>,
        hourly_cutoff: DateTime<Utc>,
        daily_cutoff: DateTime<Utc>,
    ) -> Result<Purged, StoreError> {
        let mut purged = Purged::default();
        for day in expired(&self.partitions().await?, raw_cutoff) {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            tx.batch_execute(&format!(
                "SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; DROP TABLE IF EXISTS {}",
                partition_name(day)
            ))
            .await?;
            tx.commit().await?;
            tracing::info!(day = %day, "dropped a day partition of check_results (retention.raw)");
            purged.partitions.push(day);
        }
        let client = self.pool.get().await?;
        purged.stragglers = client
            .execute(
                &format!("DELETE FROM {DEFAULT_PARTITION} WHERE started_at < $1"),
                &[&raw_cutoff],
            )
            .await?;
        // The wide rows first, found through the narrow table's hour index.
        client
            .execute(
                "DELETE FROM rollup_hourly_detail d USING rollup_hourly h
                 WHERE h.hour < $1 AND d.service_id = h.service_id AND d.hour = h.hour",
                &[&hourly_cutoff],
            )
            .await?;
        purged.hourly = client
            .execute(
                "DELETE FROM rollup_hourly WHERE hour < $1",
                &[&hourly_cutoff],
            )
            .await?;
        let day_cutoff = daily_cutoff.date_naive();
        purged.daily = client
            .execute("DELETE FROM rollup_daily WHERE day < $1", &[&day_cutoff])
            .await?;
        Ok(purged)
    }
}

/// The hour a time falls in.
pub fn hour_of(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(Duration::hours(1)).unwrap_or(t)
}

/// The periods `new` adds to, by (service, hour) and (service, UTC day).
type Periods<'a, K> = HashMap<(&'a str, K), Period>;

fn periods_of<'a>(new: &[&'a ResultIn]) -> (Periods<'a, DateTime<Utc>>, Periods<'a, NaiveDate>) {
    let mut hours: Periods<'a, DateTime<Utc>> = HashMap::new();
    let mut days: Periods<'a, NaiveDate> = HashMap::new();
    for r in new {
        let s = Sample {
            duration_ms: r.duration_ms,
            failed: !r.status.is_up(),
            metrics: &r.metrics,
        };
        hours
            .entry((r.service_id.as_str(), hour_of(r.started_at)))
            .or_default()
            .add(s);
        days.entry((r.service_id.as_str(), r.started_at.date_naive()))
            .or_default()
            .add(s);
    }
    (hours, days)
}

/// A stored `agg` column back as a period (an unreadable one starts afresh, logged).
fn stored_period(v: serde_json::Value) -> Period {
    if v.as_object().is_some_and(|o| o.is_empty()) {
        return Period::default();
    }
    serde_json::from_value(v).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "an unreadable roll-up is started afresh");
        Period::default()
    })
}

/// Columns of a period for the upsert: checks, failures, min, avg, p95, max (ms), metric
/// summaries, the mergeable form.
type Row = (
    i64,
    i64,
    Option<f64>,
    Option<f64>,
    Option<f64>,
    Option<f64>,
    serde_json::Value,
    serde_json::Value,
);

fn row_of(p: &Period) -> Row {
    let r = &p.response;
    (
        p.checks,
        p.failures,
        (r.n > 0).then_some(r.min),
        r.avg(),
        r.p95(),
        (r.n > 0).then_some(r.max),
        serde_json::to_value(p.metric_summaries()).unwrap_or_default(),
        serde_json::to_value(p).unwrap_or_default(),
    )
}

/// Merges the results `new` (newly stored, of services whose state rows this transaction has
/// locked — so no other transaction writes these roll-up rows meanwhile) into the hourly and
/// daily roll-ups: one read of both and one upsert of each.
pub(super) async fn merge_rollups(
    tx: &Transaction<'_>,
    new: &[&ResultIn],
) -> Result<(), StoreError> {
    let (mut hours, mut days) = periods_of(new);
    let h_ids: Vec<&str> = hours.keys().map(|k| k.0).collect();
    let h_at: Vec<DateTime<Utc>> = hours.keys().map(|k| k.1).collect();
    let d_ids: Vec<&str> = days.keys().map(|k| k.0).collect();
    let d_at: Vec<NaiveDate> = days.keys().map(|k| k.1).collect();
    let read_h = tx
        .prepare_cached(
            "SELECT k.service_id, k.hour, r.agg
             FROM UNNEST($1::text[], $2::timestamptz[]) AS k(service_id, hour)
             JOIN LATERAL (SELECT agg FROM rollup_hourly_detail d
                           WHERE d.service_id = k.service_id AND d.hour = k.hour LIMIT 1) r
               ON true",
        )
        .await?;
    let read_d = tx
        .prepare_cached(
            "SELECT k.service_id, k.day, r.agg
             FROM UNNEST($1::text[], $2::date[]) AS k(service_id, day)
             JOIN LATERAL (SELECT agg FROM rollup_daily d
                           WHERE d.service_id = k.service_id AND d.day = k.day LIMIT 1) r
               ON true",
        )
        .await?;
    let hp: [&(dyn ToSql + Sync); 2] = [&h_ids, &h_at];
    let dp: [&(dyn ToSql + Sync); 2] = [&d_ids, &d_at];
    // One index probe per key (LATERAL … LIMIT 1): a join could scan the whole table.
    let (old_h, old_d) = tokio::try_join!(tx.query(&read_h, &hp), tx.query(&read_d, &dp))?;
    for row in old_h {
        let id: &str = row.get(0);
        let at: DateTime<Utc> = row.get(1);
        let mut p = stored_period(row.get(2));
        if let Some((k, add)) = hours.iter_mut().find(|((i, a), _)| *i == id && *a == at) {
            let _ = k;
            p.merge(add);
            *add = p;
        }
    }
    for row in old_d {
        let id: &str = row.get(0);
        let at: NaiveDate = row.get(1);
        let mut p = stored_period(row.get(2));
        if let Some((_, add)) = days.iter_mut().find(|((i, a), _)| *i == id && *a == at) {
            p.merge(add);
            *add = p;
        }
    }
    let up_h = tx.prepare_cached(HOURLY_UPSERT).await?;
    let up_hd = tx.prepare_cached(HOURLY_DETAIL_UPSERT).await?;
    let up_d = tx
        .prepare_cached(&upsert_sql("rollup_daily", "day", "date"))
        .await?;
    // Rows in key order, as the time-in-state worker writes them: no deadlock between the two.
    let mut hours: Vec<_> = hours.into_iter().collect();
    hours.sort_unstable_by_key(|(k, _)| *k);
    let mut days: Vec<_> = days.into_iter().collect();
    days.sort_unstable_by_key(|(k, _)| *k);
    let h = columns(hours.iter().map(|((id, at), p)| (*id, *at, row_of(p))));
    let d = columns(days.iter().map(|((id, at), p)| (*id, *at, row_of(p))));
    let (hp, hdp, dp) = (h.figures(), h.detail(), d.params());
    tokio::try_join!(
        tx.execute(&up_h, &hp),
        tx.execute(&up_hd, &hdp),
        tx.execute(&up_d, &dp)
    )?;
    Ok(())
}

/// The upsert of an hour's figures (the narrow `rollup_hourly`).
const HOURLY_UPSERT: &str = "INSERT INTO rollup_hourly (service_id, hour, checks, failures,
                                                       min_ms, avg_ms, p95_ms, max_ms)
     SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::int8[], $4::int8[], $5::float8[],
                          $6::float8[], $7::float8[], $8::float8[])
     ON CONFLICT (service_id, hour) DO UPDATE SET checks = EXCLUDED.checks,
       failures = EXCLUDED.failures, min_ms = EXCLUDED.min_ms, avg_ms = EXCLUDED.avg_ms,
       p95_ms = EXCLUDED.p95_ms, max_ms = EXCLUDED.max_ms";

/// The upsert of an hour's wide part (`rollup_hourly_detail`).
const HOURLY_DETAIL_UPSERT: &str =
    "INSERT INTO rollup_hourly_detail (service_id, hour, metrics, agg)
     SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::jsonb[], $4::jsonb[])
     ON CONFLICT (service_id, hour) DO UPDATE SET metrics = EXCLUDED.metrics, agg = EXCLUDED.agg";

/// The upsert of whole roll-up rows into `table` keyed by (service_id, `key`).
fn upsert_sql(table: &str, key: &str, key_type: &str) -> String {
    format!(
        "INSERT INTO {table} (service_id, {key}, checks, failures, min_ms, avg_ms, p95_ms,
                              max_ms, metrics, agg)
         SELECT * FROM UNNEST($1::text[], $2::{key_type}[], $3::int8[], $4::int8[],
                              $5::float8[], $6::float8[], $7::float8[], $8::float8[],
                              $9::jsonb[], $10::jsonb[])
         ON CONFLICT (service_id, {key}) DO UPDATE SET checks = EXCLUDED.checks,
           failures = EXCLUDED.failures, min_ms = EXCLUDED.min_ms, avg_ms = EXCLUDED.avg_ms,
           p95_ms = EXCLUDED.p95_ms, max_ms = EXCLUDED.max_ms, metrics = EXCLUDED.metrics,
           agg = EXCLUDED.agg"
    )
}

/// A period's rows as the column arrays of the upsert.
struct Columns<'a, K> {
    ids: Vec<&'a str>,
    keys: Vec<K>,
    checks: Vec<i64>,
    failures: Vec<i64>,
    min: Vec<Option<f64>>,
    avg: Vec<Option<f64>>,
    p95: Vec<Option<f64>>,
    max: Vec<Option<f64>>,
    metrics: Vec<Json<serde_json::Value>>,
    agg: Vec<Json<serde_json::Value>>,
}

fn columns<'a, K>(rows: impl Iterator<Item = (&'a str, K, Row)>) -> Columns<'a, K> {
    let mut c = Columns {
        ids: Vec::new(),
        keys: Vec::new(),
        checks: Vec::new(),
        failures: Vec::new(),
        min: Vec::new(),
        avg: Vec::new(),
        p95: Vec::new(),
        max: Vec::new(),
        metrics: Vec::new(),
        agg: Vec::new(),
    };
    for (id, k, r) in rows {
        c.ids.push(id);
        c.keys.push(k);
        c.checks.push(r.0);
        c.failures.push(r.1);
        c.min.push(r.2);
        c.avg.push(r.3);
        c.p95.push(r.4);
        c.max.push(r.5);
        c.metrics.push(Json(r.6));
        c.agg.push(Json(r.7));
    }
    c
}

impl<K: ToSql + Sync> Columns<'_, K> {
    /// Parameters of [`HOURLY_UPSERT`].
    fn figures(&self) -> [&(dyn ToSql + Sync); 8] {
        [
            &self.ids,
            &self.keys,
            &self.checks,
            &self.failures,
            &self.min,
            &self.avg,
            &self.p95,
            &self.max,
        ]
    }

    /// Parameters of [`HOURLY_DETAIL_UPSERT`].
    fn detail(&self) -> [&(dyn ToSql + Sync); 4] {
        [&self.ids, &self.keys, &self.metrics, &self.agg]
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 10] {
        [
            &self.ids,
            &self.keys,
            &self.checks,
            &self.failures,
            &self.min,
            &self.avg,
            &self.p95,
            &self.max,
            &self.metrics,
            &self.agg,
        ]
    }
}

/// One service's figures for one hour or one UTC day.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub checks: i64,
    /// Results that were critical or unknown.
    pub failures: i64,
    pub min_ms: Option<f64>,
    pub avg_ms: Option<f64>,
    /// Estimated from a histogram (within 4.5 %).
    pub p95_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// Numeric perfdata by label: n, min, avg, p95, max.
    pub metrics: std::collections::BTreeMap<String, MetricSummary>,
    /// Time in each state (ms), written once each hour is over: up (healthy, or failing below
    /// the threshold), down, stale, paused (or stopped) by an operator, unknown.
    pub up_ms: i64,
    pub down_ms: i64,
    pub stale_ms: i64,
    pub paused_ms: i64,
    pub unknown_ms: i64,
}

/// One service's figures for one UTC day.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DailyRow {
    pub day: NaiveDate,
    pub checks: i64,
    /// Results that were critical or unknown.
    pub failures: i64,
    pub min_ms: Option<f64>,
    pub avg_ms: Option<f64>,
    /// Estimated from a histogram (within 4.5 %).
    pub p95_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// Numeric perfdata by label: n, min, avg, p95, max.
    pub metrics: std::collections::BTreeMap<String, MetricSummary>,
    /// Time in each state (ms), added once each hour of the day is over: up (healthy, or
    /// failing below the threshold), down, stale, paused (or stopped) by an operator, unknown.
    pub up_ms: i64,
    pub down_ms: i64,
    pub stale_ms: i64,
    pub paused_ms: i64,
    pub unknown_ms: i64,
}

fn figures(r: &tokio_postgres::Row) -> Figures {
    Figures {
        checks: r.get(1),
        failures: r.get(2),
        min_ms: r.get(3),
        avg_ms: r.get(4),
        p95_ms: r.get(5),
        max_ms: r.get(6),
        metrics: serde_json::from_value(r.get(7)).unwrap_or_default(),
        up_ms: r.get(8),
        down_ms: r.get(9),
        stale_ms: r.get(10),
        paused_ms: r.get(11),
        unknown_ms: r.get(12),
    }
}

const ROLLUP_COLUMNS: &str = "checks, failures, min_ms, avg_ms, p95_ms, max_ms, metrics, \
                              up_ms, down_ms, stale_ms, paused_ms, unknown_ms";

impl Store {
    /// A service's hourly roll-ups from the hour of `from` on, newest first.
    pub async fn hourly_of(
        &self,
        service_id: &str,
        from: DateTime<Utc>,
    ) -> Result<Vec<(DateTime<Utc>, Figures)>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT h.hour, checks, failures, min_ms, avg_ms, p95_ms, max_ms,
                            COALESCE(d.metrics, '{}'), up_ms, down_ms, stale_ms, paused_ms,
                            unknown_ms
                     FROM rollup_hourly h
                     LEFT JOIN rollup_hourly_detail d
                       ON d.service_id = h.service_id AND d.hour = h.hour
                     WHERE h.service_id = $1 AND h.hour >= $2 ORDER BY h.hour DESC",
                &[&service_id, &hour_of(from)],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), figures(r))).collect())
    }

    /// A service's daily roll-ups of the last `days` UTC days (today included), newest first.
    pub async fn daily_of(&self, service_id: &str, days: i32) -> Result<Vec<DailyRow>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT day, {ROLLUP_COLUMNS} FROM rollup_daily
                     WHERE service_id = $1 AND day > (now() AT TIME ZONE 'UTC')::date - $2::int4
                     ORDER BY day DESC"
                ),
                &[&service_id, &days],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let f = figures(r);
                DailyRow {
                    day: r.get(0),
                    checks: f.checks,
                    failures: f.failures,
                    min_ms: f.min_ms,
                    avg_ms: f.avg_ms,
                    p95_ms: f.p95_ms,
                    max_ms: f.max_ms,
                    metrics: f.metrics,
                    up_ms: f.up_ms,
                    down_ms: f.down_ms,
                    stale_ms: f.stale_ms,
                    paused_ms: f.paused_ms,
                    unknown_ms: f.unknown_ms,
                }
            })
            .collect())
    }

    /// Writes the time each active service spent in each state during the hour starting at
    /// `hour` (from its state, stale and mode events), adds it to the day, and records the hour
    /// as done — all in one transaction, so an hour is counted once. Returns the services.
    pub async fn roll_up_states(&self, hour: DateTime<Utc>) -> Result<usize, StoreError> {
        let (from, to) = (hour, hour + Duration::hours(1));
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // One writer per hour, whoever runs it: the progress row is locked and read first.
        tx.execute(
            "INSERT INTO rollup_progress (key, done) VALUES ('states', $1) ON CONFLICT DO NOTHING",
            &[&from],
        )
        .await?;
        let done: DateTime<Utc> = tx
            .query_one(
                "SELECT done FROM rollup_progress WHERE key = 'states' FOR UPDATE",
                &[],
            )
            .await?
            .get(0);
        if done >= to {
            return Ok(0);
        }
        // Each service's condition when the hour began: its last event of each kind before it.
        let start = tx
            .query(
                "SELECT s.id, st.to_state, sl.to_state, md.to_state FROM services s
                 LEFT JOIN LATERAL (SELECT to_state FROM events WHERE service_id = s.id
                     AND kind = 'state' AND at < $1 ORDER BY at DESC, id DESC LIMIT 1) st ON true
                 LEFT JOIN LATERAL (SELECT to_state FROM events WHERE service_id = s.id
                     AND kind = 'stale' AND at < $1 ORDER BY at DESC, id DESC LIMIT 1) sl ON true
                 LEFT JOIN LATERAL (SELECT to_state FROM events WHERE service_id = s.id
                     AND kind = 'mode' AND at < $1 ORDER BY at DESC, id DESC LIMIT 1) md ON true
                 WHERE s.active ORDER BY s.id",
                &[&from],
            )
            .await?;
        let during = tx
            .query(
                "SELECT s.id, e.at, e.kind, e.to_state FROM services s
                 JOIN LATERAL (SELECT at, id, kind, to_state FROM events WHERE service_id = s.id
                     AND kind IN ('state', 'stale', 'mode') AND at >= $1 AND at < $2) e ON true
                 WHERE s.active ORDER BY s.id, e.at, e.id",
                &[&from, &to],
            )
            .await?;
        let mut events: HashMap<String, Vec<(DateTime<Utc>, String, String)>> = HashMap::new();
        for r in &during {
            events
                .entry(r.get(0))
                .or_default()
                .push((r.get(1), r.get(2), r.get(3)));
        }
        let mut ids = Vec::new();
        let mut cols: [Vec<i64>; 5] = Default::default();
        for r in &start {
            let id: String = r.get(0);
            let mut c = Condition::default();
            if let Some(s) = r.get::<_, Option<String>>(1) {
                c.apply("state", &s);
            }
            if let Some(s) = r.get::<_, Option<String>>(2) {
                c.apply("stale", &s);
            }
            if let Some(s) = r.get::<_, Option<String>>(3) {
                c.apply("mode", &s);
            }
            let ev = events.remove(&id).unwrap_or_default();
            let (t, _) = state_times(c, &ev, from, to);
            for (col, v) in
                cols.iter_mut()
                    .zip([t.up_ms, t.down_ms, t.stale_ms, t.paused_ms, t.unknown_ms])
            {
                col.push(v);
            }
            ids.push(id);
        }
        let day = from.date_naive();
        tx.execute(
            "INSERT INTO rollup_hourly (service_id, hour, up_ms, down_ms, stale_ms, paused_ms, unknown_ms)
             SELECT u.id, $1, u.up, u.down, u.stale, u.paused, u.unknown
             FROM UNNEST($2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::int8[])
               AS u(id, up, down, stale, paused, unknown)
             ON CONFLICT (service_id, hour) DO UPDATE SET up_ms = EXCLUDED.up_ms,
               down_ms = EXCLUDED.down_ms, stale_ms = EXCLUDED.stale_ms,
               paused_ms = EXCLUDED.paused_ms, unknown_ms = EXCLUDED.unknown_ms",
            &[&from, &ids, &cols[0], &cols[1], &cols[2], &cols[3], &cols[4]],
        )
        .await?;
        tx.execute(
            "INSERT INTO rollup_daily (service_id, day, up_ms, down_ms, stale_ms, paused_ms, unknown_ms)
             SELECT u.id, $1, u.up, u.down, u.stale, u.paused, u.unknown
             FROM UNNEST($2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::int8[])
               AS u(id, up, down, stale, paused, unknown)
             ON CONFLICT (service_id, day) DO UPDATE SET
               up_ms = rollup_daily.up_ms + EXCLUDED.up_ms,
               down_ms = rollup_daily.down_ms + EXCLUDED.down_ms,
               stale_ms = rollup_daily.stale_ms + EXCLUDED.stale_ms,
               paused_ms = rollup_daily.paused_ms + EXCLUDED.paused_ms,
               unknown_ms = rollup_daily.unknown_ms + EXCLUDED.unknown_ms",
            &[&day, &ids, &cols[0], &cols[1], &cols[2], &cols[3], &cols[4]],
        )
        .await?;
        tx.execute(
            "INSERT INTO rollup_progress (key, done) VALUES ('states', $1)
             ON CONFLICT (key) DO UPDATE SET done = $1",
            &[&to],
        )
        .await?;
        tx.commit().await?;
        Ok(ids.len())
    }

    /// Writes whole roll-up rows (replacing any there): history loaded from elsewhere, such as
    /// the benchmark's, which COPYs raw results and writes their roll-ups here.
    pub async fn put_rollups(
        &self,
        hourly: &[(String, DateTime<Utc>, Period)],
        daily: &[(String, NaiveDate, Period)],
    ) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        let h = columns(
            hourly
                .iter()
                .map(|(id, at, p)| (id.as_str(), *at, row_of(p))),
        );
        let d = columns(
            daily
                .iter()
                .map(|(id, at, p)| (id.as_str(), *at, row_of(p))),
        );
        if !hourly.is_empty() {
            let (hp, hdp) = (h.figures(), h.detail());
            client.execute(HOURLY_UPSERT, &hp).await?;
            client.execute(HOURLY_DETAIL_UPSERT, &hdp).await?;
        }
        if !daily.is_empty() {
            let dp = d.params();
            client
                .execute(&upsert_sql("rollup_daily", "day", "date"), &dp)
                .await?;
        }
        Ok(())
    }

    /// The end of the last hour whose time in state is written (None: none yet).
    pub async fn states_done(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .query_opt("SELECT done FROM rollup_progress WHERE key = 'states'", &[])
            .await?
            .map(|r| r.get(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn partition_names_round_trip() {
        assert_eq!(partition_name(d("2026-12-01")), "check_results_p20261201");
        assert_eq!(
            partition_day("check_results_p20261201"),
            Some(d("2026-12-01"))
        );
        assert_eq!(partition_day("check_results_default"), None);
        assert_eq!(partition_day("check_results_p2026120"), None);
        assert_eq!(partition_day("check_results_p20261301"), None);
    }

    #[test]
    fn a_partition_expires_once_its_whole_day_is_past_the_cutoff() {
        let days = [d("2026-11-29"), d("2026-11-30"), d("2026-12-01")];
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        assert_eq!(
            expired(&days, at("2026-11-30T00:00:00Z")),
            vec![d("2026-11-29")]
        );
        assert_eq!(
            expired(&days, at("2026-11-30T23:59:59Z")),
            vec![d("2026-11-29")]
        );
        assert_eq!(
            expired(&days, at("2026-12-01T00:00:00Z")),
            vec![d("2026-11-29"), d("2026-11-30")]
        );
        assert!(expired(&days, at("2026-11-29T12:00:00Z")).is_empty());
    }
}
