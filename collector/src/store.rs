//! PostgreSQL store: migrations, config sync, idempotent result ingest with state evaluation in
//! the same transaction, node sessions, and the status query. The only module that issues SQL.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use vigil_checks::{Metric, Status};

use crate::config::{Config, Thresholds};
use crate::state::{State, Tracker, Transition};

mod embedded {
    refinery::embed_migrations!("migrations");
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database URL: {0}")]
    Url(String),
    #[error("cannot connect to PostgreSQL at {target}: {source}")]
    Connect {
        target: String,
        source: tokio_postgres::Error,
    },
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database: {0}")]
    Sql(#[from] tokio_postgres::Error),
    #[error("migrations failed: {0}")]
    Migrate(#[from] refinery::Error),
}

/// A result as the collector ingests it (converted from the wire at the edge).
#[derive(Debug, Clone, PartialEq)]
pub struct ResultIn {
    pub seq: u64,
    pub service_id: String,
    pub started_at: DateTime<Utc>,
    pub duration_ms: u32,
    pub status: Status,
    pub message: String,
    pub metrics: Vec<Metric>,
    pub output: String,
    pub config_version: u64,
}

/// What one ingest did.
#[derive(Debug, Default)]
pub struct IngestReport {
    pub inserted: usize,
    pub duplicates: usize,
    pub transitions: Vec<(String, Transition)>,
}

/// One line of `vigil-collector status`.
#[derive(Debug, Clone)]
pub struct StatusRow {
    pub service_id: String,
    pub node: String,
    pub category: String,
    pub state: String,
    pub last_check_at: Option<DateTime<Utc>>,
    pub last_response_ms: Option<i32>,
    pub checks_24h: i64,
    pub failures_24h: i64,
    pub last_error: Option<String>,
}

pub fn status_code(s: Status) -> i16 {
    match s {
        Status::Ok => 0,
        Status::Warning => 1,
        Status::Critical => 2,
        Status::Unknown => 3,
    }
}

/// Connection pool plus the queries.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

/// "host:port/db" of a URL, for messages (never the password).
fn describe(cfg: &tokio_postgres::Config) -> String {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", cfg.get_dbname().unwrap_or("(default)"))
}

impl Store {
    /// Connects, checks the server answers, and runs the embedded migrations.
    pub async fn connect(url: &str, pool_size: usize) -> Result<Store, StoreError> {
        let mut pg: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Url(e.to_string()))?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(10));
        }
        pg.application_name("vigil-collector");
        let target = describe(&pg);

        // A direct connection first: a clear error if the server is not there, and migrations.
        let (mut client, conn) = pg
            .connect(NoTls)
            .await
            .map_err(|source| StoreError::Connect {
                target: target.clone(),
                source,
            })?;
        let conn_task = tokio::spawn(conn);
        let report = embedded::migrations::runner()
            .run_async(&mut client)
            .await?;
        for m in report.applied_migrations() {
            tracing::info!(version = m.version(), name = m.name(), "applied migration");
        }
        drop(client);
        let _ = conn_task.await;

        let mgr = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::Url(e.to_string()))?;
        Ok(Store { pool })
    }

    /// Makes the nodes and services tables match the config; services no longer configured are
    /// marked inactive (their history stays).
    pub async fn sync_config(&self, cfg: &Config) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        for n in &cfg.nodes {
            tx.execute(
                "INSERT INTO nodes (name, address, description, active) VALUES ($1, $2, $3, true)
                 ON CONFLICT (name) DO UPDATE SET address = $2, description = $3, active = true",
                &[&n.name, &n.address, &n.description],
            )
            .await?;
        }
        let names: Vec<&str> = cfg.nodes.iter().map(|n| n.name.as_str()).collect();
        tx.execute(
            "UPDATE nodes SET active = false WHERE NOT (name = ANY($1))",
            &[&names],
        )
        .await?;
        for s in &cfg.services {
            let spec = serde_json::to_value(&s.check).unwrap_or(serde_json::Value::Null);
            tx.execute(
                "INSERT INTO services (id, name, category, node, description, check_kind, spec,
                                       after_failures, recover_after, active, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, true, now())
                 ON CONFLICT (id) DO UPDATE SET name = $2, category = $3, node = $4, description = $5,
                   check_kind = $6, spec = $7, after_failures = $8, recover_after = $9, active = true,
                   updated_at = now()",
                &[
                    &s.id,
                    &s.name,
                    &s.category.as_str(),
                    &s.node,
                    &s.description,
                    &s.check.kind.name(),
                    &spec,
                    &(s.thresholds.after as i32),
                    &(s.thresholds.recover_after as i32),
                ],
            )
            .await?;
            tx.execute(
                "INSERT INTO service_state (service_id) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&s.id],
            )
            .await?;
        }
        let ids: Vec<&str> = cfg.services.iter().map(|s| s.id.as_str()).collect();
        tx.execute(
            "UPDATE services SET active = false WHERE NOT (id = ANY($1))",
            &[&ids],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records an agent connecting (with what it reported) or disconnecting.
    pub async fn node_session(
        &self,
        node: &str,
        connected: bool,
        agent_version: &str,
        capabilities: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        if connected {
            client
                .execute(
                    "INSERT INTO nodes (name, agent_connected, agent_version, capabilities, connected_at, last_seen)
                     VALUES ($1, true, $2, $3, now(), now())
                     ON CONFLICT (name) DO UPDATE SET agent_connected = true, agent_version = $2,
                       capabilities = $3, connected_at = now(), last_seen = now()",
                    &[&node, &agent_version, capabilities],
                )
                .await?;
        } else {
            client
                .execute(
                    "UPDATE nodes SET agent_connected = false, last_seen = now() WHERE name = $1",
                    &[&node],
                )
                .await?;
        }
        Ok(())
    }

    /// Stores a batch from one node in one transaction: results new to the database are inserted
    /// (a re-sent result is skipped), the state of their services is advanced, and transitions
    /// become events. When this returns Ok everything is committed.
    pub async fn ingest(
        &self,
        node: &str,
        epoch: u64,
        results: &[ResultIn],
        thresholds: &HashMap<String, Thresholds>,
    ) -> Result<IngestReport, StoreError> {
        let mut report = IngestReport::default();
        if results.is_empty() {
            return Ok(report);
        }
        let n = results.len();
        let mut seqs = Vec::with_capacity(n);
        let mut services = Vec::with_capacity(n);
        let mut started = Vec::with_capacity(n);
        let mut durations = Vec::with_capacity(n);
        let mut statuses = Vec::with_capacity(n);
        let mut messages = Vec::with_capacity(n);
        let mut metrics = Vec::with_capacity(n);
        let mut outputs = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        for r in results {
            seqs.push(r.seq as i64);
            services.push(r.service_id.as_str());
            started.push(r.started_at);
            durations.push(r.duration_ms.min(i32::MAX as u32) as i32);
            statuses.push(status_code(r.status));
            messages.push(r.message.as_str());
            metrics.push(serde_json::to_value(&r.metrics).unwrap_or(serde_json::Value::Null));
            outputs.push(r.output.as_str());
            versions.push(r.config_version as i64);
        }
        let epoch = epoch as i64;

        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "INSERT INTO check_results (node, outbox_epoch, seq, service_id, started_at, duration_ms,
                                            status, message, metrics, output, config_version)
                 SELECT $1, $2, * FROM UNNEST($3::int8[], $4::text[], $5::timestamptz[], $6::int4[],
                                              $7::int2[], $8::text[], $9::jsonb[], $10::text[], $11::int8[])
                 ON CONFLICT (node, outbox_epoch, seq) DO NOTHING
                 RETURNING seq",
                &[
                    &node, &epoch, &seqs, &services, &started, &durations, &statuses, &messages,
                    &metrics, &outputs, &versions,
                ],
            )
            .await?;
        let fresh: HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
        report.inserted = fresh.len();
        report.duplicates = n - fresh.len();

        // Advance the state of the services that got new results, in seq order.
        let mut new: Vec<&ResultIn> = results
            .iter()
            .filter(|r| fresh.contains(&(r.seq as i64)) && thresholds.contains_key(&r.service_id))
            .collect();
        new.sort_by_key(|r| r.seq);
        if !new.is_empty() {
            let mut ids: Vec<&str> = new.iter().map(|r| r.service_id.as_str()).collect();
            ids.sort_unstable();
            ids.dedup();
            for id in &ids {
                tx.execute(
                    "INSERT INTO service_state (service_id) VALUES ($1) ON CONFLICT DO NOTHING",
                    &[id],
                )
                .await?;
            }
            let rows = tx
                .query(
                    "SELECT service_id, state, consecutive_failures, consecutive_successes
                     FROM service_state WHERE service_id = ANY($1) ORDER BY service_id FOR UPDATE",
                    &[&ids],
                )
                .await?;
            let mut trackers: HashMap<String, (Tracker, bool)> = HashMap::new();
            for row in rows {
                let state: String = row.get(1);
                trackers.insert(
                    row.get(0),
                    (
                        Tracker {
                            state: State::parse(&state).unwrap_or(State::Unknown),
                            consecutive_failures: row.get::<_, i32>(2).max(0) as u32,
                            consecutive_successes: row.get::<_, i32>(3).max(0) as u32,
                        },
                        false,
                    ),
                );
            }
            let mut last: HashMap<&str, &ResultIn> = HashMap::new();
            let mut last_failure: HashMap<&str, &ResultIn> = HashMap::new();
            for r in &new {
                let (tracker, changed) = trackers.entry(r.service_id.clone()).or_default();
                if let Some(t) =
                    tracker.observe(r.status.is_up(), &r.message, thresholds[&r.service_id])
                {
                    *changed = true;
                    report.transitions.push((r.service_id.clone(), t));
                }
                last.insert(&r.service_id, r);
                if !r.status.is_up() {
                    last_failure.insert(&r.service_id, r);
                }
            }
            for (id, r) in &last {
                let (t, changed) = trackers[*id];
                let fail = last_failure.get(id);
                tx.execute(
                    "UPDATE service_state SET state = $2,
                       state_since = CASE WHEN $3 THEN now() ELSE state_since END,
                       consecutive_failures = $4, consecutive_successes = $5, last_status = $6,
                       last_check_at = $7, last_response_ms = $8, last_message = $9,
                       last_error = COALESCE($10, last_error), last_error_at = COALESCE($11, last_error_at)
                     WHERE service_id = $1",
                    &[
                        id,
                        &t.state.as_str(),
                        &changed,
                        &(t.consecutive_failures.min(i32::MAX as u32) as i32),
                        &(t.consecutive_successes.min(i32::MAX as u32) as i32),
                        &status_code(r.status),
                        &r.started_at,
                        &(r.duration_ms.min(i32::MAX as u32) as i32),
                        &r.message,
                        &fail.map(|f| f.message.as_str()),
                        &fail.map(|f| f.started_at),
                    ],
                )
                .await?;
            }
            for (id, t) in &report.transitions {
                tx.execute(
                    "INSERT INTO events (service_id, from_state, to_state, reason) VALUES ($1, $2, $3, $4)",
                    &[id, &t.from.as_str(), &t.to.as_str(), &t.reason],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(report)
    }

    /// The status table: every configured service with its state and 24-hour figures.
    pub async fn status(&self) -> Result<Vec<StatusRow>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT s.id, s.node, s.category, COALESCE(st.state, 'unknown'), st.last_check_at,
                        st.last_response_ms, COALESCE(c.total, 0), COALESCE(c.failed, 0), st.last_error
                 FROM services s
                 LEFT JOIN service_state st ON st.service_id = s.id
                 LEFT JOIN LATERAL (
                    SELECT count(*) AS total, count(*) FILTER (WHERE r.status >= 2) AS failed
                    FROM check_results r
                    WHERE r.service_id = s.id AND r.started_at > now() - interval '24 hours'
                 ) c ON true
                 WHERE s.active
                 ORDER BY s.node, s.id",
                &[],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| StatusRow {
                service_id: r.get(0),
                node: r.get(1),
                category: r.get(2),
                state: r.get(3),
                last_check_at: r.get(4),
                last_response_ms: r.get(5),
                checks_24h: r.get(6),
                failures_24h: r.get(7),
                last_error: r.get(8),
            })
            .collect())
    }
}
