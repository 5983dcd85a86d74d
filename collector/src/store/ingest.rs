//! Result ingest: one transaction per batch stores the results new to the database, advances
//! their services' state and records transitions as events; the caller acks after it returns.
//!
//! Two ways to tell a new result from a re-sent one ([`Dedupe`]). An agent's outbox stream
//! sends each `(node, epoch)`'s results in seq order and its session commits them in that order,
//! so every seq up to the highest one stored is stored (`outbox_progress.stored_seq`): results
//! above it are new and go in with one binary `COPY`. Results from other sources (agentless
//! checks, check-now answers) come in any order and go through `INSERT … ON CONFLICT DO NOTHING`
//! on the `(node, outbox_epoch, seq)` key. The key is in force on both paths; a `COPY` that meets
//! it (rows written by something that did not advance `outbox_progress`, such as a collector of
//! an older version during an upgrade) is rolled back and the batch is stored result by result.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use tokio_postgres::Row;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Json, ToSql, Type};

use super::{IngestReport, ResultIn, ServiceAfter, Store, StoreError, status_code};
use crate::config::Thresholds;
use crate::state::{State, Tracker};

/// How a batch's new results are told from re-sent ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dedupe {
    /// An agent outbox stream: seqs of one `(node, epoch)` arrive and commit in increasing order.
    Outbox,
    /// Any other source: each result is checked against the unique key.
    PerResult,
}

/// Seqs missing from an outbox: `from..=to`, of which `dropped` the agent reported dropping
/// itself (outbox full) and `lost` nobody accounts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub epoch: u64,
    pub from: u64,
    pub to: u64,
    pub dropped: u64,
    pub lost: u64,
}

/// The gaps that `fresh` (sorted, above `stored`) leaves after `stored`; seqs up to
/// `dropped_through` were dropped by the agent.
pub(crate) fn gaps_of(epoch: u64, stored: i64, fresh: &[i64], dropped_through: i64) -> Vec<Gap> {
    let mut out = Vec::new();
    let mut prev = stored;
    for &seq in fresh {
        if seq > prev + 1 {
            let (from, to) = (prev + 1, seq - 1);
            let dropped = (to.min(dropped_through) - from + 1).max(0);
            out.push(Gap {
                epoch,
                from: from as u64,
                to: to as u64,
                dropped: dropped as u64,
                lost: (to - from + 1 - dropped) as u64,
            });
        }
        prev = prev.max(seq);
    }
    out
}

/// From this many new results on, a batch is written with COPY; fewer go in with one INSERT.
pub const COPY_FROM: usize = 32;

/// How one attempt writes a batch's results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    /// The results above the outbox's stored seq: one COPY (one INSERT for a few).
    Copy,
    /// `INSERT … ON CONFLICT DO NOTHING`, raising the outbox's stored seq (after a COPY met the key).
    InsertOutbox,
    /// `INSERT … ON CONFLICT DO NOTHING` (results not from an outbox stream).
    Insert,
}

/// How long a batch of passing results waits for its turn (as long as the pool waits for a
/// connection): the agent keeps the results and sends them again after the error.
const BULK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The `check_results` columns an ingest writes, in COPY order.
pub const RESULT_COLUMNS: &str = "node, outbox_epoch, seq, service_id, started_at, duration_ms, \
                              status, message, metrics, output, config_version";

/// Column types of [`RESULT_COLUMNS`] for the binary COPY.
pub const RESULT_TYPES: [Type; 11] = [
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::INT4,
    Type::INT2,
    Type::TEXT,
    Type::JSONB,
    Type::TEXT,
    Type::INT8,
];

impl Store {
    /// Stores a batch from one node in one transaction: results new to the database are inserted
    /// (a re-sent result is skipped), the state of their services is advanced, and transitions
    /// become events. When this returns Ok everything is committed.
    pub async fn ingest(
        &self,
        node: &str,
        epoch: u64,
        results: &[ResultIn],
        thresholds: &HashMap<String, Thresholds>,
        dedupe: Dedupe,
    ) -> Result<IngestReport, StoreError> {
        if results.is_empty() {
            return Ok(IngestReport::default());
        }
        // Failing results go first: they do not wait behind a backlog of passing ones.
        let _slot = if results.iter().all(|r| r.status.is_up()) {
            let wait = tokio::time::timeout(BULK_WAIT, self.bulk.acquire()).await;
            wait.map_err(|_| StoreError::Busy(BULK_WAIT))?.ok()
        } else {
            None
        };
        let first = if dedupe == Dedupe::PerResult {
            self.ingest_once(node, epoch, results, thresholds, Write::Insert)
                .await
        } else {
            match self
                .ingest_once(node, epoch, results, thresholds, Write::Copy)
                .await
            {
                Err(StoreError::Sql(e))
                    if e.code() == Some(&SqlState::UNIQUE_VIOLATION)
                        && super::is_result_key(e.as_db_error().and_then(|d| d.constraint())) =>
                {
                    tracing::warn!(
                        %node, epoch,
                        "results above the outbox's stored seq were already in the database (written by an older collector?); storing this batch result by result"
                    );
                    self.ingest_once(node, epoch, results, thresholds, Write::InsertOutbox)
                        .await
                }
                done => done,
            }
        };
        match first {
            Err(e) if e.is_permanent() => {
                tracing::warn!(
                    %node, epoch, results = results.len(), error = %e,
                    "PostgreSQL refused this batch for good; storing it result by result and replacing the results it refuses"
                );
                self.ingest_each(node, epoch, results, thresholds, dedupe)
                    .await
            }
            done => done,
        }
    }

    /// Stores a batch that PostgreSQL refused for a permanent reason one result at a time, in
    /// seq order: a result it refuses again is replaced by an UNKNOWN result that says why
    /// (without its metrics and output), so that one bad value never blocks a node. A
    /// transient error still fails the whole call (what was stored stays; the rest is re-sent).
    async fn ingest_each(
        &self,
        node: &str,
        epoch: u64,
        results: &[ResultIn],
        thresholds: &HashMap<String, Thresholds>,
        dedupe: Dedupe,
    ) -> Result<IngestReport, StoreError> {
        let write = match dedupe {
            Dedupe::Outbox => Write::InsertOutbox,
            Dedupe::PerResult => Write::Insert,
        };
        let mut sorted: Vec<&ResultIn> = results.iter().collect();
        sorted.sort_by_key(|r| r.seq);
        let mut report = IngestReport::default();
        for r in sorted {
            match self
                .ingest_once(node, epoch, std::slice::from_ref(r), thresholds, write)
                .await
            {
                Ok(one) => report.absorb(one),
                Err(e) if e.is_permanent() => {
                    let why = e.to_string();
                    tracing::error!(
                        %node, epoch, seq = r.seq, service = %r.service_id, error = %why,
                        "PostgreSQL refused a result; storing an UNKNOWN result in its place"
                    );
                    // The stand-in says why; if even that is refused, one that says less.
                    let stand_in = |message: String| ResultIn {
                        status: vigil_checks::Status::Unknown,
                        message,
                        metrics: Vec::new(),
                        output: String::new(),
                        ..r.clone()
                    };
                    let stand_ins = [
                        stand_in(vigil_checks::truncate(
                            &format!(
                                "this result could not be stored ({why}); the check reported {}",
                                r.status.as_str()
                            ),
                            1000,
                        )),
                        stand_in(
                            "this result could not be stored (see the collector's log)".into(),
                        ),
                    ];
                    let mut one = None;
                    for s in &stand_ins {
                        match self
                            .ingest_once(node, epoch, std::slice::from_ref(s), thresholds, write)
                            .await
                        {
                            Ok(done) => {
                                one = Some(done);
                                break;
                            }
                            Err(e) if e.is_permanent() => {
                                tracing::error!(%node, epoch, seq = r.seq, error = %e, "PostgreSQL refused a stand-in too");
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    let mut one = one.unwrap_or_default();
                    one.replaced.push((r.seq, why));
                    report.absorb(one);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }

    async fn ingest_once(
        &self,
        node: &str,
        epoch: u64,
        results: &[ResultIn],
        thresholds: &HashMap<String, Thresholds>,
        write: Write,
    ) -> Result<IngestReport, StoreError> {
        let epoch = epoch as i64;
        let top = results.iter().map(|r| r.seq as i64).max().unwrap_or(0);
        let mut gaps = Vec::new();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // Prepared once per pooled connection (a parse and plan per statement otherwise).
        let lock = tx.prepare_cached(LOCK_STATES).await?;
        // The services this batch may advance, locked in id order. A service whose results all
        // turn out to be re-sent is locked but left as it is.
        let mut ids: Vec<&str> = results
            .iter()
            .filter(|r| thresholds.contains_key(&r.service_id))
            .map(|r| r.service_id.as_str())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let lock_params: [&(dyn ToSql + Sync); 1] = [&ids];

        // The results new to the database, in seq order, and the locked state rows. Statements
        // sent together are pipelined (one round trip); they run in the order written, so the
        // outbox row is always locked before the services.
        let (fresh, locked): (Vec<&ResultIn>, Vec<Row>) = if write == Write::Copy {
            let ensure = tx
                .prepare_cached(
                    "INSERT INTO outbox_progress (node, outbox_epoch, stored_seq) VALUES ($1, $2, 0)
                     ON CONFLICT DO NOTHING",
                )
                .await?;
            let read = tx
                .prepare_cached(
                    "SELECT stored_seq, dropped_through_seq FROM outbox_progress
                     WHERE node = $1 AND outbox_epoch = $2 FOR UPDATE",
                )
                .await?;
            let advance = tx.prepare_cached(ADVANCE_PROGRESS).await?;
            let key: [&(dyn ToSql + Sync); 2] = [&node, &epoch];
            let key_top: [&(dyn ToSql + Sync); 3] = [&node, &epoch, &top];
            let (stored, locked) = match tokio::join!(
                tx.execute(&ensure, &key),
                tx.query_one(&read, &key),
                tx.execute(&advance, &key_top),
                tx.query(&lock, &lock_params),
            ) {
                (Ok(_), Ok(stored), Ok(_), Ok(locked)) => (stored, locked),
                (a, b, c, d) => {
                    return Err(root_cause([
                        a.err().map(StoreError::from),
                        b.err().map(StoreError::from),
                        c.err().map(StoreError::from),
                        d.err().map(StoreError::from),
                    ]));
                }
            };
            let dropped_through: i64 = stored.get(1);
            let stored: i64 = stored.get(0);
            let mut fresh: Vec<&ResultIn> =
                results.iter().filter(|r| r.seq as i64 > stored).collect();
            fresh.sort_by_key(|r| r.seq);
            fresh.dedup_by_key(|r| r.seq);
            let seqs: Vec<i64> = fresh.iter().map(|r| r.seq as i64).collect();
            gaps = gaps_of(epoch as u64, stored, &seqs, dropped_through);
            if !gaps.is_empty() {
                record_gaps(&tx, node, &gaps).await?;
            }
            if fresh.len() >= COPY_FROM {
                copy_results(&tx, node, epoch, &fresh).await?;
            } else if !fresh.is_empty() {
                // A few rows: one INSERT is a round trip less than COPY's start and end.
                fresh = insert_results(&tx, node, epoch, &fresh).await?;
            }
            (fresh, locked)
        } else {
            let all: Vec<&ResultIn> = results.iter().collect();
            let locking = async { Ok::<_, StoreError>(tx.query(&lock, &lock_params).await?) };
            if write == Write::InsertOutbox {
                // Stored result by result after a COPY met the key: the outbox row catches up.
                let upsert = tx
                    .prepare_cached(
                        "INSERT INTO outbox_progress (node, outbox_epoch, stored_seq) VALUES ($1, $2, $3)
                         ON CONFLICT (node, outbox_epoch)
                         DO UPDATE SET stored_seq = GREATEST(outbox_progress.stored_seq, $3)",
                    )
                    .await?;
                let key_top: [&(dyn ToSql + Sync); 3] = [&node, &epoch, &top];
                let upserting = async { Ok::<_, StoreError>(tx.execute(&upsert, &key_top).await?) };
                match tokio::join!(upserting, insert_results(&tx, node, epoch, &all), locking) {
                    (Ok(_), Ok(fresh), Ok(locked)) => (fresh, locked),
                    (a, b, c) => return Err(root_cause([a.err(), b.err(), c.err()])),
                }
            } else {
                match tokio::join!(insert_results(&tx, node, epoch, &all), locking) {
                    (Ok(fresh), Ok(locked)) => (fresh, locked),
                    (a, b) => return Err(root_cause([a.err(), b.err()])),
                }
            }
        };
        let mut report = IngestReport {
            inserted: fresh.len(),
            duplicates: results.len() - fresh.len(),
            gaps,
            ..IngestReport::default()
        };
        let new: Vec<&ResultIn> = fresh
            .into_iter()
            .filter(|r| thresholds.contains_key(&r.service_id))
            .collect();
        if !new.is_empty() {
            advance_states(&tx, &new, locked, &ids, thresholds, &mut report).await?;
        }
        tx.commit().await?;
        Ok(report)
    }
}

/// Locks the state rows of services `$1`, in id order (the order every writer locks them in).
const LOCK_STATES: &str = "SELECT service_id, state, consecutive_failures, consecutive_successes,
                                  history, history_len, flapping, grace_until, mode, stale_since
                           FROM service_state WHERE service_id = ANY($1)
                           ORDER BY service_id FOR UPDATE";

/// Records `gaps` of `node`'s outbox as node events and adds them to the node's counters.
async fn record_gaps(tx: &Transaction<'_>, node: &str, gaps: &[Gap]) -> Result<(), StoreError> {
    let mut kinds = Vec::new();
    let mut reasons = Vec::new();
    let mut counts = Vec::new();
    for g in gaps {
        if g.lost > 0 {
            tracing::error!(
                %node, epoch = g.epoch, from = g.from, to = g.to, lost = g.lost,
                "results missing from the agent's outbox: lost (never received, not reported dropped)"
            );
            kinds.push("gap");
            reasons.push(format!(
                "{} result(s) lost: seqs {}..={} of outbox {} never arrived and the agent did not report dropping them",
                g.lost, g.from, g.to, g.epoch
            ));
            counts.push(g.lost as i64);
        }
        if g.dropped > 0 {
            tracing::warn!(
                %node, epoch = g.epoch, from = g.from, to = g.to, dropped = g.dropped,
                "results the agent dropped because its outbox was full"
            );
            kinds.push("dropped");
            reasons.push(format!(
                "{} result(s) dropped by the agent (outbox full): seqs {}..={} of outbox {}",
                g.dropped,
                g.from,
                g.to.min(g.from + g.dropped - 1),
                g.epoch
            ));
            counts.push(g.dropped as i64);
        }
    }
    let lost: i64 = gaps.iter().map(|g| g.lost as i64).sum();
    let dropped: i64 = gaps.iter().map(|g| g.dropped as i64).sum();
    tx.execute(
        "INSERT INTO node_events (node, kind, reason, count)
         SELECT $1, k, r, c FROM UNNEST($2::text[], $3::text[], $4::int8[]) AS e(k, r, c)",
        &[&node, &kinds, &reasons, &counts],
    )
    .await?;
    tx.execute(
        "UPDATE nodes SET results_lost = results_lost + $2, results_dropped = results_dropped + $3
         WHERE name = $1",
        &[&node, &lost, &dropped],
    )
    .await?;
    Ok(())
}

const ADVANCE_PROGRESS: &str = "UPDATE outbox_progress SET stored_seq = GREATEST(stored_seq, $3)
                                WHERE node = $1 AND outbox_epoch = $2";

/// Inserts `rows` with `INSERT … ON CONFLICT DO NOTHING`; returns those inserted (not already
/// stored), in seq order.
async fn insert_results<'r>(
    tx: &Transaction<'_>,
    node: &str,
    epoch: i64,
    rows: &[&'r ResultIn],
) -> Result<Vec<&'r ResultIn>, StoreError> {
    let insert = tx
        .prepare_cached(&format!(
            "INSERT INTO check_results ({RESULT_COLUMNS})
             SELECT $1, $2, * FROM UNNEST($3::int8[], $4::text[], $5::timestamptz[],
                 $6::int4[], $7::int2[], $8::text[], $9::jsonb[], $10::text[], $11::int8[])
             ON CONFLICT (node, outbox_epoch, seq, started_at) DO NOTHING
             RETURNING seq"
        ))
        .await?;
    let n = rows.len();
    let mut seqs = Vec::with_capacity(n);
    let mut services = Vec::with_capacity(n);
    let mut started = Vec::with_capacity(n);
    let mut durations = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut messages = Vec::with_capacity(n);
    let mut metrics = Vec::with_capacity(n);
    let mut outputs = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    for r in rows {
        seqs.push(r.seq as i64);
        services.push(r.service_id.as_str());
        started.push(r.started_at);
        durations.push(r.duration_ms.min(i32::MAX as u32) as i32);
        statuses.push(status_code(r.status));
        messages.push(r.message.as_str());
        metrics.push(Json(&r.metrics));
        outputs.push(r.output.as_str());
        versions.push(r.config_version as i64);
    }
    let params: [&(dyn ToSql + Sync); 11] = [
        &node, &epoch, &seqs, &services, &started, &durations, &statuses, &messages, &metrics,
        &outputs, &versions,
    ];
    let inserted: HashSet<i64> = tx
        .query(&insert, &params)
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut fresh: Vec<&ResultIn> = rows
        .iter()
        .copied()
        .filter(|r| inserted.contains(&(r.seq as i64)))
        .collect();
    fresh.sort_by_key(|r| r.seq);
    fresh.dedup_by_key(|r| r.seq);
    Ok(fresh)
}

/// Writes `rows` into `check_results` with one binary COPY.
async fn copy_results(
    tx: &Transaction<'_>,
    node: &str,
    epoch: i64,
    rows: &[&ResultIn],
) -> Result<(), StoreError> {
    let copy = tx
        .prepare_cached(&format!(
            "COPY check_results ({RESULT_COLUMNS}) FROM STDIN BINARY"
        ))
        .await?;
    let sink = tx.copy_in(&copy).await?;
    let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &RESULT_TYPES));
    for r in rows {
        let values: [&(dyn ToSql + Sync); 11] = [
            &node,
            &epoch,
            &(r.seq as i64),
            &r.service_id,
            &r.started_at,
            &(r.duration_ms.min(i32::MAX as u32) as i32),
            &status_code(r.status),
            &r.message,
            &Json(&r.metrics),
            &r.output,
            &(r.config_version as i64),
        ];
        writer.as_mut().write(&values).await?;
    }
    writer.finish().await?;
    Ok(())
}

/// Advances the state of the services that got new results (`new`, in seq order) from their
/// locked rows, writes every touched service in one UPDATE and the transitions as events.
async fn advance_states(
    tx: &Transaction<'_>,
    new: &[&ResultIn],
    mut locked: Vec<Row>,
    ids: &[&str],
    thresholds: &HashMap<String, Thresholds>,
    report: &mut IngestReport,
) -> Result<(), StoreError> {
    if locked.len() < ids.len() {
        // Normally sync_config created every row; a service added since gets one now.
        let ensure = tx
            .prepare_cached(
                "INSERT INTO service_state (service_id) SELECT * FROM UNNEST($1::text[])
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        tx.execute(&ensure, &[&ids]).await?;
        let lock = tx.prepare_cached(LOCK_STATES).await?;
        locked = tx.query(&lock, &[&ids]).await?;
    }
    struct Slot {
        tracker: Tracker,
        changed: bool,
        grace_until: Option<DateTime<Utc>>,
        became_healthy: bool,
        mode: String,
        stale: bool,
    }
    let mut slots: HashMap<String, Slot> = HashMap::new();
    for row in locked {
        let state: String = row.get(1);
        slots.insert(
            row.get(0),
            Slot {
                tracker: Tracker {
                    state: State::parse(&state).unwrap_or(State::Unknown),
                    consecutive_failures: row.get::<_, i32>(2).max(0) as u32,
                    consecutive_successes: row.get::<_, i32>(3).max(0) as u32,
                    history: row.get::<_, i64>(4) as u64,
                    history_len: row.get::<_, i32>(5).max(0) as u32,
                    flapping: row.get(6),
                },
                changed: false,
                grace_until: row.get(7),
                became_healthy: false,
                mode: row.get(8),
                stale: row.get::<_, Option<DateTime<Utc>>>(9).is_some(),
            },
        );
    }
    let mut last: HashMap<&str, &ResultIn> = HashMap::new();
    let mut last_failure: HashMap<&str, &ResultIn> = HashMap::new();
    for r in new {
        let Some(slot) = slots.get_mut(&r.service_id) else {
            continue;
        };
        let up = r.status.is_up();
        last.insert(&r.service_id, r);
        if !up {
            last_failure.insert(&r.service_id, r);
            // A failure during the grace period after a restart does not count.
            if slot.grace_until.is_some_and(|g| r.started_at < g) {
                continue;
            }
        }
        let (t, flap) = slot
            .tracker
            .observe_all(up, &r.message, thresholds[&r.service_id]);
        if let Some(t) = t {
            slot.changed = true;
            slot.became_healthy = t.to == State::Healthy;
            report.transitions.push((r.service_id.clone(), t));
        }
        if let Some(f) = flap {
            report.flaps.push((r.service_id.clone(), f));
        }
    }
    // Every touched service in one UPDATE ... FROM UNNEST.
    let mut u_id = Vec::with_capacity(last.len());
    let mut u_state = Vec::with_capacity(last.len());
    let mut u_changed = Vec::with_capacity(last.len());
    let mut u_cf = Vec::with_capacity(last.len());
    let mut u_cs = Vec::with_capacity(last.len());
    let mut u_status = Vec::with_capacity(last.len());
    let mut u_at = Vec::with_capacity(last.len());
    let mut u_ms = Vec::with_capacity(last.len());
    let mut u_msg = Vec::with_capacity(last.len());
    let mut u_err: Vec<Option<&str>> = Vec::with_capacity(last.len());
    let mut u_err_at: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(last.len());
    let mut u_hist = Vec::with_capacity(last.len());
    let mut u_hlen = Vec::with_capacity(last.len());
    let mut u_flap = Vec::with_capacity(last.len());
    let mut u_healthy = Vec::with_capacity(last.len());
    let mut touched: Vec<(&str, &ResultIn)> = last.into_iter().collect();
    touched.sort_unstable_by_key(|(id, _)| *id);
    for (id, r) in &touched {
        let slot = &slots[*id];
        let t = slot.tracker;
        let fail = last_failure.get(id);
        u_id.push(*id);
        u_state.push(t.state.as_str());
        u_changed.push(slot.changed);
        u_cf.push(t.consecutive_failures.min(i32::MAX as u32) as i32);
        u_cs.push(t.consecutive_successes.min(i32::MAX as u32) as i32);
        u_status.push(status_code(r.status));
        u_at.push(r.started_at);
        u_ms.push(r.duration_ms.min(i32::MAX as u32) as i32);
        u_msg.push(r.message.as_str());
        u_err.push(fail.map(|f| f.message.as_str()));
        u_err_at.push(fail.map(|f| f.started_at));
        u_hist.push(t.history as i64);
        u_hlen.push(t.history_len as i32);
        u_flap.push(t.flapping);
        u_healthy.push(slot.became_healthy);
        if slot.stale {
            report.fresh_again.push(id.to_string());
        }
        report.states.push(ServiceAfter {
            service_id: id.to_string(),
            state: t.state,
            mode: slot.mode.clone(),
        });
    }
    let update = tx
        .prepare_cached(
            "UPDATE service_state s SET state = u.state,
                   state_since = CASE WHEN u.changed THEN now() ELSE s.state_since END,
                   consecutive_failures = u.cf, consecutive_successes = u.cs,
                   last_status = u.last_status, last_check_at = u.last_check_at,
                   last_response_ms = u.last_response_ms, last_message = u.last_message,
                   last_error = COALESCE(u.last_error, s.last_error),
                   last_error_at = COALESCE(u.last_error_at, s.last_error_at),
                   history = u.history, history_len = u.history_len, flapping = u.flapping,
                   healthy_since = CASE WHEN u.became_healthy THEN now()
                                        WHEN u.state = 'healthy' THEN s.healthy_since ELSE NULL END,
                   last_result_at = now(), stale_since = NULL, stale_reason = NULL
                 FROM UNNEST($1::text[], $2::text[], $3::bool[], $4::int4[], $5::int4[], $6::int2[],
                             $7::timestamptz[], $8::int4[], $9::text[], $10::text[],
                             $11::timestamptz[], $12::int8[], $13::int4[], $14::bool[], $15::bool[])
                   AS u(service_id, state, changed, cf, cs, last_status, last_check_at,
                        last_response_ms, last_message, last_error, last_error_at, history,
                        history_len, flapping, became_healthy)
                 WHERE s.service_id = u.service_id",
        )
        .await?;
    let update_params: [&(dyn tokio_postgres::types::ToSql + Sync); 15] = [
        &u_id, &u_state, &u_changed, &u_cf, &u_cs, &u_status, &u_at, &u_ms, &u_msg, &u_err,
        &u_err_at, &u_hist, &u_hlen, &u_flap, &u_healthy,
    ];
    // State transitions, then flapping changes, as events (one INSERT, in order).
    let mut e_id: Vec<&str> = Vec::new();
    let mut e_kind: Vec<&str> = Vec::new();
    let mut e_from: Vec<&str> = Vec::new();
    let mut e_to: Vec<&str> = Vec::new();
    let mut e_reason: Vec<String> = Vec::new();
    for (id, t) in &report.transitions {
        e_id.push(id);
        e_kind.push("state");
        e_from.push(t.from.as_str());
        e_to.push(t.to.as_str());
        e_reason.push(t.reason.clone());
    }
    for id in &report.fresh_again {
        e_id.push(id);
        e_kind.push("stale");
        e_from.push("stale");
        e_to.push("fresh");
        e_reason.push("a result arrived again".to_string());
    }
    for (id, f) in &report.flaps {
        let (to, reason) = if f.flapping {
            (
                "flapping",
                format!(
                    "started flapping: {:.0}% state change over the last 21 results",
                    f.percent
                ),
            )
        } else {
            (
                "steady",
                format!("stopped flapping: {:.0}% state change", f.percent),
            )
        };
        e_id.push(id);
        e_kind.push("flapping");
        e_from.push("");
        e_to.push(to);
        e_reason.push(reason);
    }
    let rollups = super::history::merge_rollups(tx, new);
    if e_id.is_empty() {
        if let (a, b) = tokio::join!(tx.execute(&update, &update_params), rollups)
            && (a.is_err() || b.is_err())
        {
            return Err(root_cause([a.err().map(StoreError::from), b.err()]));
        }
    } else {
        let events = tx
            .prepare_cached(
                "INSERT INTO events (service_id, kind, from_state, to_state, reason)
                     SELECT e.service_id, e.kind, e.from_state, e.to_state, e.reason
                     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
                       WITH ORDINALITY AS e(service_id, kind, from_state, to_state, reason, n)
                     ORDER BY n",
            )
            .await?;
        let event_params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&e_id, &e_kind, &e_from, &e_to, &e_reason];
        if let (a, b, c) = tokio::join!(
            tx.execute(&update, &update_params),
            tx.execute(&events, &event_params),
            rollups,
        ) && (a.is_err() || b.is_err() || c.is_err())
        {
            return Err(root_cause([
                a.err().map(StoreError::from),
                b.err().map(StoreError::from),
                c.err(),
            ]));
        }
    }
    Ok(())
}

/// The error that made statements pipelined in one transaction fail. After the first failure
/// PostgreSQL answers every later statement with 25P02 ("current transaction is aborted"),
/// which says nothing of the cause, and which of the answers a join sees first depends on
/// timing: the cause decides whether a batch is refused for good or retried.
fn root_cause<const N: usize>(errors: [Option<StoreError>; N]) -> StoreError {
    let mut errors: Vec<StoreError> = errors.into_iter().flatten().collect();
    let aborted = |e: &StoreError| matches!(e, StoreError::Sql(s) if s.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    let i = errors.iter().position(|e| !aborted(e)).unwrap_or(0);
    errors.swap_remove(i)
}

impl Store {
    /// Records a node's clock offset (its agent's clock minus the collector's, ms) as measured
    /// at its Hello.
    pub async fn node_clock(&self, node: &str, offset_ms: i64) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE nodes SET clock_offset_ms = $2, clock_checked_at = now() WHERE name = $1",
                &[&node, &offset_ms],
            )
            .await?;
        Ok(())
    }

    /// Records `count` results whose start time was implausible and replaced by the time they
    /// were received: one `clock` node event saying why.
    pub async fn clock_event(
        &self,
        node: &str,
        reason: &str,
        count: i64,
    ) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO node_events (node, kind, reason, count) VALUES ($1, 'clock', $2, $3)",
                &[&node, &reason, &count],
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(from: u64, to: u64, dropped: u64, lost: u64) -> Gap {
        Gap {
            epoch: 7,
            from,
            to,
            dropped,
            lost,
        }
    }

    #[test]
    fn gaps_before_and_between_results() {
        assert_eq!(gaps_of(7, 0, &[1, 2, 3], 0), vec![]);
        assert_eq!(gaps_of(7, 3, &[4], 0), vec![]);
        assert_eq!(
            gaps_of(7, 3, &[6, 7, 10], 0),
            vec![g(4, 5, 0, 2), g(8, 9, 0, 2)]
        );
        // The agent's own drops: wholly, partly, or not at all in a gap.
        assert_eq!(gaps_of(7, 3, &[10], 9), vec![g(4, 9, 6, 0)]);
        assert_eq!(gaps_of(7, 3, &[10], 5), vec![g(4, 9, 2, 4)]);
        assert_eq!(gaps_of(7, 3, &[10], 2), vec![g(4, 9, 0, 6)]);
        // Huge gaps do not overflow.
        let top = i64::MAX;
        assert_eq!(
            gaps_of(7, 0, &[top], 0),
            vec![g(1, (top - 1) as u64, 0, (top - 1) as u64)]
        );
    }
}
