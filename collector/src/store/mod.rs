//! PostgreSQL store: migrations, config sync, idempotent result ingest with state evaluation in
//! the same transaction, node sessions, and the status query. The only module that issues SQL.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use vigil_checks::{Metric, Status};

use crate::config::Config;
use crate::state::{FlapChange, State, Transition};

mod availability;
pub use availability::{Scope, ServiceHistory};
mod ingest;
pub use ingest::{COPY_FROM, Dedupe, Gap, RESULT_COLUMNS, RESULT_TYPES};
mod liveness;
pub use liveness::*;
mod web;
pub use web::*;
mod history;
pub use history::*;
mod maintenance;
pub use maintenance::*;
mod alerts;
pub use alerts::*;

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
    #[error("PostgreSQL is not keeping up: passing results waited {0:?} for a database connection")]
    Busy(Duration),
    #[error("database: {}", sql_text(.0))]
    Sql(#[from] tokio_postgres::Error),
    #[error("migrations failed: {0}")]
    Migrate(#[from] refinery::Error),
}

/// A PostgreSQL error with its SQLSTATE, message, detail and constraint (tokio-postgres's own
/// text is only "db error").
pub fn sql_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut t = format!("SQLSTATE {}: {}", db.code().code(), db.message());
            if let Some(d) = db.detail() {
                t.push_str(&format!(" ({d})"));
            }
            if let Some(c) = db.constraint() {
                t.push_str(&format!(" [constraint {c}]"));
            }
            t
        }
        None => vigil_error::describe(e),
    }
}

/// The name of the idempotency key of `check_results` (V11: it includes the partition key).
pub const RESULT_KEY: &str = "check_results_key";

/// Whether a constraint named in an error is the idempotency key of `check_results`: PostgreSQL
/// names the index of the partition that refused the row (`check_results_p20261201_node_…`).
pub fn is_result_key(constraint: Option<&str>) -> bool {
    constraint.is_some_and(|c| {
        c == RESULT_KEY
            || (c.starts_with("check_results_")
                && c.ends_with("_node_outbox_epoch_seq_started_at_key"))
    })
}

impl StoreError {
    /// Whether PostgreSQL refused the data itself, so that sending it again can never succeed:
    /// a data exception (SQLSTATE class 22), an integrity constraint other than the results'
    /// idempotency key (class 23), or a value too large for a row or an index (54000). Anything
    /// else (connection lost, pool timeout, serialization failure, shutdown) is transient.
    pub fn is_permanent(&self) -> bool {
        let StoreError::Sql(e) = self else {
            return false;
        };
        let Some(db) = e.as_db_error() else {
            return false;
        };
        let code = db.code().code();
        if code.starts_with("22") || code == "54000" {
            return true;
        }
        code.starts_with("23") && !(code == "23505" && is_result_key(db.constraint()))
    }
}

/// A result as the collector ingests it (converted from the wire at the edge).
#[derive(Debug, Clone, PartialEq)]
pub struct ResultIn {
    /// How long the check took in microseconds, when known (0: only `duration_ms` is).
    pub duration_us: u64,
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
    pub flaps: Vec<(String, FlapChange)>,
    /// The state of every service that got new results, after them.
    pub states: Vec<ServiceAfter>,
    /// Services that were stale and got a result again.
    pub fresh_again: Vec<String>,
    /// Seqs missing from the outbox before or between this batch's results.
    pub gaps: Vec<Gap>,
    /// Results that PostgreSQL refused for good, stored instead as UNKNOWN results saying why.
    pub replaced: Vec<(u64, String)>,
}

impl IngestReport {
    /// Adds what another ingest of the same batch did.
    fn absorb(&mut self, o: IngestReport) {
        self.inserted += o.inserted;
        self.duplicates += o.duplicates;
        self.transitions.extend(o.transitions);
        self.flaps.extend(o.flaps);
        for st in o.states {
            self.states.retain(|s| s.service_id != st.service_id);
            self.states.push(st);
        }
        self.fresh_again.extend(o.fresh_again);
        self.gaps.extend(o.gaps);
        self.replaced.extend(o.replaced);
    }
}

/// A service's state after an ingest, and its operator mode (`active`, `stopped`, `paused`).
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceAfter {
    pub service_id: String,
    pub state: State,
    pub mode: String,
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

/// Sets a service's operator mode within `tx`, with a `mode` event when it changes.
async fn set_mode_in(
    tx: &deadpool_postgres::Transaction<'_>,
    service_id: &str,
    mode: &str,
    paused_until: Option<DateTime<Utc>>,
    reason: &str,
) -> Result<(), StoreError> {
    let old: Option<String> = tx
        .query_opt(
            "SELECT mode FROM service_state WHERE service_id = $1 FOR UPDATE",
            &[&service_id],
        )
        .await?
        .map(|r| r.get(0));
    tx.execute(
        "UPDATE service_state SET mode = $2, paused_until = $3 WHERE service_id = $1",
        &[&service_id, &mode, &paused_until],
    )
    .await?;
    if old.as_deref() != Some(mode) {
        tx.execute(
            "INSERT INTO events (service_id, kind, from_state, to_state, reason) VALUES ($1, 'mode', $2, $3, $4)",
            &[&service_id, &old.unwrap_or_default(), &mode, &reason],
        )
        .await?;
    }
    // Stopped or paused: its open incidents close as silenced by the operator, in this
    // transaction.
    if mode != "active" {
        alerts::silence_in(tx, service_id, reason).await?;
    }
    Ok(())
}

/// The advisory lock held while migrations run ("vigil mi" in ASCII).
const MIGRATION_LOCK: i64 = 0x7669_6769_6c20_6d69;

/// Connection pool plus the queries.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// Held by a batch whose results all pass while it is written: such batches use at most
    /// `pool_size - reserved` connections, so that under a backlog of them a failing result (the
    /// one that may cross a threshold) and the command it causes still find a connection at once.
    bulk: std::sync::Arc<tokio::sync::Semaphore>,
    /// The database's identity (`instance.uid`): the issuer of its command ids.
    uid: std::sync::Arc<str>,
}

/// Connections batches of passing results leave for everything else (failing results, commands,
/// the API): 2 of a pool of 4 or more, 1 of 2 or 3, none of 1.
fn bulk_permits(pool_size: usize) -> usize {
    let reserved = match pool_size {
        0 | 1 => 0,
        2 | 3 => 1,
        _ => 2,
    };
    (pool_size - reserved).max(1)
}

/// "host:port/db" of a URL, for messages (never the password).
pub fn describe(cfg: &tokio_postgres::Config) -> String {
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
        // One process migrates at a time (several collectors, or a CLI, starting together):
        // the others wait, then find the migrations applied. Released with the connection.
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        let report = embedded::migrations::runner()
            .run_async(&mut client)
            .await?;
        for m in report.applied_migrations() {
            tracing::info!(version = m.version(), name = m.name(), "applied migration");
        }
        let uid: String = client
            .query_one("SELECT uid FROM instance", &[])
            .await?
            .get(0);
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
        Ok(Store {
            pool,
            bulk: std::sync::Arc::new(tokio::sync::Semaphore::new(bulk_permits(pool_size))),
            uid: uid.into(),
        })
    }

    /// Runs the embedded migrations up to `version` only (tests of a migration on a database
    /// holding data of an older version); [`Store::connect`] runs the rest.
    pub async fn migrate_to(url: &str, version: i32) -> Result<(), StoreError> {
        let (mut client, conn) = tokio_postgres::connect(url, NoTls)
            .await
            .map_err(|source| StoreError::Connect {
                target: "the test database".into(),
                source,
            })?;
        let conn_task = tokio::spawn(conn);
        embedded::migrations::runner()
            .set_target(refinery::Target::Version(version))
            .run_async(&mut client)
            .await?;
        drop(client);
        let _ = conn_task.await;
        Ok(())
    }

    /// The database's identity: agents key their command journal by it and the command id.
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// Makes the nodes and services tables match the config; services no longer configured are
    /// marked inactive (their history stays).
    pub async fn sync_config(&self, cfg: &Config) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        for n in &cfg.nodes {
            let timeout_ms = cfg.node_timeout_of(n).as_millis().min(i64::MAX as u128) as i64;
            tx.execute(
                "INSERT INTO nodes (name, address, description, active, has_agent, timeout_ms)
                 VALUES ($1, $2, $3, true, $4, $5)
                 ON CONFLICT (name) DO UPDATE SET address = $2, description = $3, active = true,
                   has_agent = $4, timeout_ms = $5",
                &[&n.name, &n.address, &n.description, &n.agent, &timeout_ms],
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
            // Without header values, URL credentials, bodies and arguments: the agent gets the
            // real spec, the database only what describes the check.
            let spec = crate::secret::redact_spec(
                serde_json::to_value(&s.check).unwrap_or(serde_json::Value::Null),
            );
            let stale_ms = s.stale_after().as_millis().min(i64::MAX as u128) as i64;
            tx.execute(
                "INSERT INTO services (id, name, category, node, description, check_kind, spec,
                                       after_failures, recover_after, active, updated_at,
                                       stale_after_ms, on_stale)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, true, now(), $10, $11)
                 ON CONFLICT (id) DO UPDATE SET name = $2, category = $3, node = $4, description = $5,
                   check_kind = $6, spec = $7, after_failures = $8, recover_after = $9, active = true,
                   updated_at = now(), stale_after_ms = $10, on_stale = $11",
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
                    &stale_ms,
                    &s.on_stale.as_str(),
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
        // `labels:` of every service, in one statement.
        let labels: Vec<serde_json::Value> = cfg
            .services
            .iter()
            .map(|s| serde_json::to_value(&s.labels).unwrap_or_default())
            .collect();
        tx.execute(
            "UPDATE services s SET labels = l.labels
             FROM unnest($1::text[], $2::jsonb[]) AS l(id, labels)
             WHERE s.id = l.id AND s.labels IS DISTINCT FROM l.labels",
            &[&ids, &labels],
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
                    "UPDATE nodes SET agent_connected = false, last_seen = now(), disconnected_at = now()
                     WHERE name = $1",
                    &[&node],
                )
                .await?;
        }
        Ok(())
    }

    /// The status table: every configured service with its state and 24-hour figures.
    pub async fn status(&self) -> Result<Vec<StatusRow>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT s.id, s.node, s.category,
                        CASE WHEN st.stale_since IS NOT NULL THEN 'stale'
                             ELSE COALESCE(st.state, 'unknown') END,
                        st.last_check_at,
                        st.last_response_ms, COALESCE(c.total, 0), COALESCE(c.failed, 0),
                        CASE WHEN st.stale_since IS NOT NULL THEN 'stale: ' || st.stale_reason
                             ELSE st.last_error END
                 FROM services s
                 LEFT JOIN service_state st ON st.service_id = s.id
                 LEFT JOIN (
                    SELECT r.service_id, sum(r.checks)::int8 AS total,
                           sum(r.failures)::int8 AS failed
                    FROM rollup_hourly r
                    WHERE r.hour >= date_trunc('hour', now(), 'UTC') - interval '23 hours'
                    GROUP BY r.service_id
                 ) c ON c.service_id = s.id
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

/// A command to create.
#[derive(Debug, Clone)]
pub struct NewCommand<'a> {
    pub service_id: &'a str,
    pub node: &'a str,
    pub action: &'a str,
    pub origin: &'a str,
    pub requested_by: &'a str,
    pub reason: &'a str,
    pub deadline: DateTime<Utc>,
}

/// A row of `commands` (also what the API answers for a command).
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct CommandRow {
    pub id: i64,
    pub service_id: String,
    pub node: String,
    /// start | stop | restart | check
    pub action: String,
    /// auto | manual
    pub origin: String,
    pub requested_by: String,
    pub reason: String,
    /// agent | ssh, once sent
    pub via: Option<String>,
    /// pending | sent | succeeded | failed | timed_out | unknown (it may or may not have run) |
    /// cancelled (never sent)
    pub status: String,
    pub attempt: i32,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub deadline: DateTime<Utc>,
    pub exit_code: Option<i32>,
    pub output: String,
    /// When the agent started it (from its journal).
    pub started_at: Option<DateTime<Utc>>,
    /// The outcome the agent reported after the command had been closed (timed out at its
    /// deadline, cancelled, unknown): what really happened, kept beside `status`.
    pub late_status: Option<String>,
    pub late_exit_code: Option<i32>,
    pub late_output: Option<String>,
    pub late_at: Option<DateTime<Utc>>,
}

const COMMAND_COLUMNS: &str =
    "id, service_id, node, action, origin, requested_by, reason, via, status, attempt,
     created_at, sent_at, finished_at, deadline, exit_code, output,
     started_at, late_status, late_exit_code, late_output, late_at";

fn command_row(r: &tokio_postgres::Row) -> CommandRow {
    CommandRow {
        id: r.get(0),
        service_id: r.get(1),
        node: r.get(2),
        action: r.get(3),
        origin: r.get(4),
        requested_by: r.get(5),
        reason: r.get(6),
        via: r.get(7),
        status: r.get(8),
        attempt: r.get(9),
        created_at: r.get(10),
        sent_at: r.get(11),
        finished_at: r.get(12),
        deadline: r.get(13),
        exit_code: r.get(14),
        output: r.get(15),
        started_at: r.get(16),
        late_status: r.get(17),
        late_exit_code: r.get(18),
        late_output: r.get(19),
        late_at: r.get(20),
    }
}

/// What remediation needs to know about one service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceView {
    pub service_id: String,
    pub state: State,
    pub mode: String,
    pub paused_until: Option<DateTime<Utc>>,
    pub flapping: bool,
    pub restarts_used: u32,
    pub gave_up_at: Option<DateTime<Utc>>,
    pub healthy_since: Option<DateTime<Utc>>,
    pub grace_until: Option<DateTime<Utc>>,
    pub in_flight: bool,
    /// When the last failing result was taken.
    pub last_error_at: Option<DateTime<Utc>>,
    /// When the last start/restart command finished.
    pub last_restart_at: Option<DateTime<Utc>>,
    /// No recent result: its state is not known now.
    pub stale: bool,
    /// A maintenance window covers it now: no restarts.
    pub maintenance: bool,
}

/// The channel the collector listens on for new commands (`NOTIFY vigil_commands, 'ID'`).
pub const COMMANDS_CHANNEL: &str = "vigil_commands";

impl Store {
    /// Creates a command and notifies listening collectors. `None` when the service already has
    /// a start/stop/restart in flight (only one at a time).
    pub async fn create_command(&self, c: &NewCommand<'_>) -> Result<Option<i64>, StoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "INSERT INTO commands (service_id, node, action, origin, requested_by, reason, deadline)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (service_id) WHERE status IN ('pending', 'sent') AND action <> 'check' DO NOTHING
                 RETURNING id",
                &[&c.service_id, &c.node, &c.action, &c.origin, &c.requested_by, &c.reason, &c.deadline],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let id: i64 = row.get(0);
        client
            .execute(
                "SELECT pg_notify($1, $2)",
                &[&COMMANDS_CHANNEL, &id.to_string()],
            )
            .await?;
        Ok(Some(id))
    }

    /// Creates an automatic restart decided from a view of the service read at `decided_at`,
    /// counts it against the budget and records its event, in one transaction. `None` when a
    /// start/stop/restart is in flight or was created since `decided_at` (another evaluation
    /// acted on the same failure meanwhile): one failure, one restart.
    pub async fn create_auto_restart(
        &self,
        c: &NewCommand<'_>,
        decided_at: DateTime<Utc>,
    ) -> Result<Option<i64>, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // Serialises the evaluations of this service.
        tx.execute(
            "SELECT 1 FROM service_state WHERE service_id = $1 FOR UPDATE",
            &[&c.service_id],
        )
        .await?;
        let row = tx
            .query_opt(
                "INSERT INTO commands (service_id, node, action, origin, requested_by, reason, deadline)
                 SELECT $1, $2, $3, $4, $5, $6, $7
                 WHERE NOT EXISTS (SELECT 1 FROM commands WHERE service_id = $1
                                   AND action IN ('start', 'stop', 'restart') AND created_at >= $8)
                 ON CONFLICT (service_id) WHERE status IN ('pending', 'sent') AND action <> 'check' DO NOTHING
                 RETURNING id",
                &[&c.service_id, &c.node, &c.action, &c.origin, &c.requested_by, &c.reason, &c.deadline, &decided_at],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let id: i64 = row.get(0);
        tx.execute(
            "UPDATE service_state SET restarts_used = restarts_used + 1, gave_up_at = NULL WHERE service_id = $1",
            &[&c.service_id],
        )
        .await?;
        tx.execute(
            "INSERT INTO events (service_id, kind, from_state, to_state, reason)
             VALUES ($1, 'remediation', 'down', 'restarting', $2)",
            &[&c.service_id, &format!("command {id}: {}", c.reason)],
        )
        .await?;
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&COMMANDS_CHANNEL, &id.to_string()],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(id))
    }

    /// The commands a statement returns (it selects or returns [`COMMAND_COLUMNS`]).
    async fn query_commands(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<CommandRow>, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .query(sql, params)
            .await?
            .iter()
            .map(command_row)
            .collect())
    }

    pub async fn command(&self, id: i64) -> Result<Option<CommandRow>, StoreError> {
        let sql = format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE id = $1");
        Ok(self.query_commands(&sql, &[&id]).await?.pop())
    }

    /// Commands still pending or sent, oldest first.
    pub async fn open_commands(&self) -> Result<Vec<CommandRow>, StoreError> {
        let sql = format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE status IN ('pending', 'sent') ORDER BY id"
        );
        self.query_commands(&sql, &[]).await
    }

    /// Puts a command that was sent by a previous run back to pending, so that it is sent again
    /// when its agent (re)connects.
    pub async fn requeue(&self, id: i64) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE commands SET status = 'pending' WHERE id = $1 AND status = 'sent'",
                &[&id],
            )
            .await?;
        Ok(())
    }

    /// Claims a pending command for sending (by `via`), counting the attempt. False if another
    /// dispatcher claimed it first or it is no longer pending: exactly one sender wins.
    pub async fn mark_sent(&self, id: i64, via: &str) -> Result<bool, StoreError> {
        let client = self.pool.get().await?;
        let n = client
            .execute(
                "UPDATE commands SET status = 'sent', via = $2, sent_at = now(),
                   attempt = CASE WHEN sent_at IS NULL THEN attempt ELSE attempt + 1 END
                 WHERE id = $1 AND status = 'pending'",
                &[&id, &via],
            )
            .await?;
        Ok(n == 1)
    }

    /// Records a command's outcome (`succeeded`, `failed`, `timed_out`) if it is still open and,
    /// in the same transaction, what a success means for the service: after a start or restart
    /// its grace period (`grace`, when known) and, when an operator asked, mode `active`; after
    /// a stop, mode `stopped`. Whoever sees the outcome sees the mode too. Returns the finished
    /// row, or `None` if it had already finished.
    pub async fn finish_command(
        &self,
        id: i64,
        status: &str,
        exit_code: Option<i32>,
        output: &str,
        grace: Option<Duration>,
    ) -> Result<Option<CommandRow>, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let sql = format!(
            "UPDATE commands SET status = $2, exit_code = $3, output = $4, finished_at = now()
             WHERE id = $1 AND status IN ('pending', 'sent') RETURNING {COMMAND_COLUMNS}"
        );
        let Some(row) = tx
            .query_opt(&sql, &[&id, &status, &exit_code, &output])
            .await?
            .as_ref()
            .map(command_row)
        else {
            return Ok(None);
        };
        if row.status == "succeeded" {
            let (service, by) = (row.service_id.as_str(), row.requested_by.as_str());
            match row.action.as_str() {
                "restart" | "start" => {
                    if let Some(grace) = grace {
                        let until =
                            Utc::now() + chrono::Duration::from_std(grace).unwrap_or_default();
                        tx.execute(
                            "UPDATE service_state SET grace_until = $2 WHERE service_id = $1",
                            &[&service, &until],
                        )
                        .await?;
                    }
                    if row.origin == "manual" {
                        let reason = format!("{} by {by}", row.action);
                        set_mode_in(&tx, service, "active", None, &reason).await?;
                    }
                }
                "stop" => {
                    set_mode_in(&tx, service, "stopped", None, &format!("stopped by {by}")).await?
                }
                _ => {}
            }
        }
        tx.commit().await?;
        Ok(Some(row))
    }

    /// Times out every open command past its deadline; returns them.
    pub async fn expire_commands(&self) -> Result<Vec<CommandRow>, StoreError> {
        let sql = format!(
            "UPDATE commands SET status = 'timed_out', finished_at = now(),
               output = CASE WHEN output = '' THEN 'no result before the deadline' ELSE output END
             WHERE status IN ('pending', 'sent') AND deadline < now()
               -- A run over SSH starts no step after the deadline and ends with its steps'
               -- timeouts; it records its own outcome (an hour past the deadline: backstop).
               AND NOT (status = 'sent' AND via = 'ssh' AND deadline > now() - interval '1 hour')
             RETURNING {COMMAND_COLUMNS}"
        );
        self.query_commands(&sql, &[]).await
    }

    /// Cancels an open command that must not be (re-)sent; returns it, or `None` if it had
    /// finished meanwhile.
    pub async fn cancel_command(
        &self,
        id: i64,
        why: &str,
    ) -> Result<Option<CommandRow>, StoreError> {
        let sql = format!(
            "UPDATE commands SET status = 'cancelled', finished_at = now(), output = $2
             WHERE id = $1 AND status IN ('pending', 'sent') RETURNING {COMMAND_COLUMNS}"
        );
        Ok(self.query_commands(&sql, &[&id, &why]).await?.pop())
    }

    /// Counts another send of a command already sent to an agent (after it reconnected). False
    /// if it is no longer open.
    pub async fn mark_resent(&self, id: i64) -> Result<bool, StoreError> {
        let client = self.pool.get().await?;
        let n = client
            .execute(
                "UPDATE commands SET attempt = attempt + 1, sent_at = now()
                 WHERE id = $1 AND status = 'sent' AND via = 'agent'",
                &[&id],
            )
            .await?;
        Ok(n == 1)
    }

    /// Records when the agent started a command (the first report wins).
    pub async fn command_started(&self, id: i64, at: DateTime<Utc>) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE commands SET started_at = coalesce(started_at, $2) WHERE id = $1",
                &[&id, &at],
            )
            .await?;
        Ok(())
    }

    /// Records the outcome an agent reported for a command the collector had already closed
    /// (timed out, cancelled, unknown): both facts are kept. Returns the row if this was news.
    pub async fn late_outcome(
        &self,
        id: i64,
        status: &str,
        exit_code: Option<i32>,
        output: &str,
    ) -> Result<Option<CommandRow>, StoreError> {
        let sql = format!(
            "UPDATE commands SET late_status = $2, late_exit_code = $3, late_output = $4, late_at = now()
             WHERE id = $1 AND late_status IS NULL
               AND status IN ('timed_out', 'cancelled', 'unknown')
               AND NOT (status = 'unknown' AND $2 = 'unknown')
             RETURNING {COMMAND_COLUMNS}"
        );
        Ok(self
            .query_commands(&sql, &[&id, &status, &exit_code, &output])
            .await?
            .pop())
    }

    /// Recent commands of a service, newest first.
    pub async fn commands_of(
        &self,
        service_id: &str,
        limit: i64,
    ) -> Result<Vec<CommandRow>, StoreError> {
        let sql = format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE service_id = $1 ORDER BY id DESC LIMIT $2"
        );
        self.query_commands(&sql, &[&service_id, &limit]).await
    }

    pub async fn views(&self, ids: &[&str]) -> Result<Vec<ServiceView>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT st.service_id, st.state, st.mode, st.paused_until, st.flapping, st.restarts_used,
                        st.gave_up_at, st.healthy_since, st.grace_until,
                        EXISTS (SELECT 1 FROM commands c WHERE c.service_id = st.service_id
                                AND c.status IN ('pending', 'sent') AND c.action <> 'check'),
                        st.last_error_at,
                        (SELECT max(c.finished_at) FROM commands c WHERE c.service_id = st.service_id
                                AND c.action IN ('start', 'restart')),
                        st.stale_since IS NOT NULL,
                        coalesce(st.maintenance_until > now(), false)
                 FROM service_state st WHERE st.service_id = ANY($1)",
                &[&ids],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ServiceView {
                service_id: r.get(0),
                state: State::parse(r.get(1)).unwrap_or(State::Unknown),
                mode: r.get(2),
                paused_until: r.get(3),
                flapping: r.get(4),
                restarts_used: r.get::<_, i32>(5).max(0) as u32,
                gave_up_at: r.get(6),
                healthy_since: r.get(7),
                grace_until: r.get(8),
                in_flight: r.get(9),
                last_error_at: r.get(10),
                last_restart_at: r.get(11),
                stale: r.get(12),
                maintenance: r.get(13),
            })
            .collect())
    }

    /// Ids of active services that are down (for the periodic remediation pass).
    pub async fn down_services(&self) -> Result<Vec<String>, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .query(
                "SELECT st.service_id FROM service_state st JOIN services s ON s.id = st.service_id
                 WHERE s.active AND (st.state = 'down' OR st.restarts_used > 0 OR st.mode = 'paused')",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Records an event.
    pub async fn add_event(
        &self,
        service_id: &str,
        kind: &str,
        from: &str,
        to: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO events (service_id, kind, from_state, to_state, reason) VALUES ($1, $2, $3, $4, $5)",
                &[&service_id, &kind, &from, &to, &reason],
            )
            .await?;
        Ok(())
    }

    /// Records giving up (the budget is spent).
    pub async fn give_up(&self, service_id: &str, reason: &str) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "UPDATE service_state SET gave_up_at = now() WHERE service_id = $1",
            &[&service_id],
        )
        .await?;
        tx.execute(
            "INSERT INTO events (service_id, kind, from_state, to_state, reason) VALUES ($1, 'remediation', 'down', 'gave_up', $2)",
            &[&service_id, &reason],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Refills the restart budget (healthy for a whole window).
    pub async fn refill_budget(&self, service_id: &str) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE service_state SET restarts_used = 0, gave_up_at = NULL WHERE service_id = $1",
                &[&service_id],
            )
            .await?;
        Ok(())
    }

    /// Sets the operator mode (`active`, `stopped`, `paused`) and records who and why.
    pub async fn set_mode(
        &self,
        service_id: &str,
        mode: &str,
        paused_until: Option<DateTime<Utc>>,
        reason: &str,
    ) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        set_mode_in(&tx, service_id, mode, paused_until, reason).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Listens for new command ids (NOTIFY on [`COMMANDS_CHANNEL`]) on a dedicated connection;
    /// reconnects after a failure. Ends when the receiver is dropped.
    pub fn listen_commands(url: &str) -> Result<tokio::sync::mpsc::Receiver<i64>, StoreError> {
        let cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Url(e.to_string()))?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                if tx.is_closed() {
                    return;
                }
                match cfg.connect(NoTls).await {
                    Ok((client, mut conn)) => {
                        let (ntx, mut nrx) = tokio::sync::mpsc::unbounded_channel();
                        let driver = tokio::spawn(async move {
                            let mut stream =
                                futures::stream::poll_fn(move |cx| conn.poll_message(cx));
                            use futures::StreamExt;
                            while let Some(msg) = stream.next().await {
                                match msg {
                                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                                        let _ = ntx.send(n.payload().to_string());
                                    }
                                    Ok(_) => {}
                                    Err(e) => {
                                        tracing::warn!(error = %sql_text(&e), "command listener connection failed");
                                        break;
                                    }
                                }
                            }
                        });
                        if let Err(e) = client
                            .batch_execute(&format!("LISTEN {COMMANDS_CHANNEL}"))
                            .await
                        {
                            tracing::warn!(error = %e, "cannot LISTEN for commands");
                        } else {
                            while let Some(payload) = nrx.recv().await {
                                if let Ok(id) = payload.parse::<i64>()
                                    && tx.send(id).await.is_err()
                                {
                                    return;
                                }
                            }
                        }
                        driver.abort();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "command listener cannot connect; retrying")
                    }
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        Ok(rx)
    }
}

impl Store {
    /// The result a check-now command stored (epoch 0, seq = command id): status, message,
    /// duration in ms.
    pub async fn check_now_result(
        &self,
        node: &str,
        command_id: i64,
    ) -> Result<Option<(Status, String, i32)>, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .query_opt(
                "SELECT status, message, duration_ms FROM check_results
                 WHERE node = $1 AND outbox_epoch = 0 AND seq = $2",
                &[&node, &command_id],
            )
            .await?
            .map(|r| {
                let status = match r.get::<_, i16>(0) {
                    0 => Status::Ok,
                    1 => Status::Warning,
                    2 => Status::Critical,
                    _ => Status::Unknown,
                };
                (status, r.get(1), r.get(2))
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::bulk_permits;

    #[test]
    fn passing_batches_leave_connections_free() {
        assert_eq!(bulk_permits(1), 1);
        assert_eq!(bulk_permits(2), 1);
        assert_eq!(bulk_permits(3), 2);
        assert_eq!(bulk_permits(8), 6);
        assert_eq!(bulk_permits(32), 30);
    }
}
