//! Queries behind the REST API and the dashboard: service health with 24-hour figures (from the
//! hourly roll-ups), results, events, nodes, runtime settings, API tokens and dashboard sessions.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::{Store, StoreError};

impl StoreError {
    /// PostgreSQL refused a value the request carried (SQLSTATE class 22 — a NUL, an invalid
    /// byte sequence, a number out of range — or 54000, a value too large): the request is at
    /// fault, not the database, so the API answers 400 rather than 503.
    pub fn is_bad_input(&self) -> bool {
        let StoreError::Sql(e) = self else {
            return false;
        };
        e.as_db_error().is_some_and(|db| {
            let code = db.code().code();
            code.starts_with("22") || code == "54000"
        })
    }
}

/// A service's current state as the API and the dashboard show it (from `services` and
/// `service_state`; the 24-hour counts are 0 when not asked for).
#[derive(Debug, Clone)]
pub struct HealthRow {
    pub service_id: String,
    pub name: String,
    pub node: String,
    pub category: String,
    pub description: String,
    pub state: String,
    pub mode: String,
    pub paused_until: Option<DateTime<Utc>>,
    pub flapping: bool,
    pub consecutive_failures: i32,
    pub consecutive_successes: i32,
    pub last_status: Option<i16>,
    pub last_check_at: Option<DateTime<Utc>>,
    pub last_response_ms: Option<i32>,
    pub last_message: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub healthy_since: Option<DateTime<Utc>>,
    pub state_since: DateTime<Utc>,
    pub restarts_used: i32,
    pub gave_up_at: Option<DateTime<Utc>>,
    pub checks_24h: i64,
    pub failures_24h: i64,
    /// Since when the newest result is too old (None: fresh).
    pub stale_since: Option<DateTime<Utc>>,
    pub stale_reason: Option<String>,
    /// Since when the service's node is down, and why (None: up).
    pub node_down_since: Option<DateTime<Utc>>,
    pub node_down_reason: Option<String>,
    /// The maintenance window the service is in now (None: not in maintenance).
    pub maintenance: Option<super::ActiveMaintenance>,
}

impl HealthRow {
    /// Healthy, and a recent result says so: the one meaning of "up" everywhere.
    pub fn is_up(&self) -> bool {
        self.state == "healthy" && self.stale_since.is_none() && self.node_down_since.is_none()
    }

    /// The state shown to operators: `stale` while no recent result says anything, else the
    /// state machine's.
    pub fn shown_state(&self) -> &str {
        if self.stale_since.is_some() {
            "stale"
        } else {
            &self.state
        }
    }

    /// Why the service is not up when its state alone does not say it: stale, or node down.
    pub fn reason(&self) -> Option<String> {
        match (&self.stale_reason, &self.node_down_reason) {
            (Some(r), _) if self.stale_since.is_some() => Some(format!("stale: {r}")),
            (_, Some(r)) if self.node_down_since.is_some() => {
                Some(format!("node {} is down: {r}", self.node))
            }
            _ => None,
        }
    }
}

/// One stored check result.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResultRow {
    /// Row id; pass it as `before` to page back.
    pub id: i64,
    pub node: String,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i32,
    /// ok | warning | critical | unknown
    pub status: String,
    pub message: String,
    /// Performance data: one object per metric (label, value, unit, warn, crit, min, max).
    #[schema(value_type = Vec<Object>)]
    pub metrics: serde_json::Value,
    /// Output excerpt (command checks).
    pub output: String,
}

/// One event: a state change, an operator mode change, flapping, or a remediation step.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EventRow {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// state | mode | flapping | remediation
    pub kind: String,
    pub from_state: String,
    pub to_state: String,
    pub reason: String,
}

/// A node: configured, and what its agent said when it connected.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NodeRow {
    pub name: String,
    pub address: String,
    pub description: String,
    /// Still in collector.yaml.
    pub active: bool,
    pub agent_connected: bool,
    pub agent_version: Option<String>,
    /// What the agent reported: check kinds, inventory (CPU, memory, GPUs, Docker, ...).
    #[schema(value_type = Option<Object>)]
    pub capabilities: Option<serde_json::Value>,
    pub connected_at: Option<DateTime<Utc>>,
    /// When the agent was last heard from (any message, Pongs included).
    pub last_seen: Option<DateTime<Utc>>,
    /// Whether an agent runs there (false: the collector checks it over SSH).
    pub has_agent: bool,
    /// How long its agent may be silent before the node is down (ms).
    pub node_timeout_ms: i64,
    pub disconnected_at: Option<DateTime<Utc>>,
    /// Since when the node is down (its agent silent longer than its timeout), and why.
    pub down_since: Option<DateTime<Utc>>,
    pub down_reason: Option<String>,
    /// Results the agent holds unacknowledged, as it last reported.
    pub backlog_results: Option<i64>,
    /// When the oldest of them was taken (collector clock).
    pub backlog_oldest_at: Option<DateTime<Utc>>,
    /// Since when the backlog is too old (an open backlog incident).
    pub backlog_alert_since: Option<DateTime<Utc>>,
    /// Results missing from its outbox that the agent did not report dropping.
    pub results_lost: i64,
    /// Results the agent dropped itself (outbox full).
    pub results_dropped: i64,
    /// Results refused by the collector (out-of-range seq, another node's service).
    pub results_refused: i64,
    /// The node's clock minus the collector's (ms), as measured at its agent's last Hello.
    pub clock_offset_ms: Option<i64>,
    pub clock_checked_at: Option<DateTime<Utc>>,
}

/// A stored API token (never its secret).
#[derive(Debug, Clone)]
pub struct TokenRow {
    pub id: i64,
    pub name: String,
    pub role: String,
    pub secret_hash: String,
    pub created_at: DateTime<Utc>,
    pub last_used: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A live dashboard session and the token it was opened with.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub token_id: i64,
    pub token_name: String,
    pub role: String,
    pub csrf: String,
    pub expires_at: DateTime<Utc>,
}

/// A stored setting.
#[derive(Debug, Clone)]
pub struct SettingRow {
    pub value: serde_json::Value,
    pub updated_at: DateTime<Utc>,
    pub updated_by: String,
}

fn event_row(r: &tokio_postgres::Row) -> EventRow {
    EventRow {
        id: r.get(0),
        at: r.get(1),
        kind: r.get(2),
        from_state: r.get(3),
        to_state: r.get(4),
        reason: r.get(5),
    }
}

fn status_name(code: i16) -> &'static str {
    match code {
        0 => "ok",
        1 => "warning",
        2 => "critical",
        _ => "unknown",
    }
}

/// The service list with its 24-hour figures (`$1` one service id or NULL, `$2` whether to
/// add the figures): state and the hourly roll-ups only, never `check_results` (public so
/// that a test can EXPLAIN it).
pub const HEALTH_SQL: &str = "SELECT s.id, s.name, s.node, s.category, s.description,
                        COALESCE(st.state, 'unknown'), COALESCE(st.mode, 'active'), st.paused_until,
                        COALESCE(st.flapping, false), COALESCE(st.consecutive_failures, 0),
                        COALESCE(st.consecutive_successes, 0), st.last_status, st.last_check_at,
                        st.last_response_ms, st.last_message, st.last_error, st.last_error_at,
                        st.healthy_since, COALESCE(st.state_since, s.updated_at),
                        COALESCE(st.restarts_used, 0), st.gave_up_at,
                        COALESCE(c.total, 0), COALESCE(c.failed, 0),
                        st.stale_since, st.stale_reason, n.down_since, n.down_reason,
                        CASE WHEN st.maintenance_until > now() THEN st.maintenance_id END,
                        COALESCE(mw.name, ''), st.maintenance_until
                 FROM services s
                 LEFT JOIN service_state st ON st.service_id = s.id
                 LEFT JOIN nodes n ON n.name = s.node
                 LEFT JOIN maintenance_windows mw ON mw.id = st.maintenance_id
                 LEFT JOIN (
                    SELECT r.service_id, sum(r.checks)::int8 AS total,
                           sum(r.failures)::int8 AS failed
                    FROM rollup_hourly r
                    WHERE $2 AND r.hour >= date_trunc('hour', now(), 'UTC') - interval '23 hours' AND ($1::text IS NULL OR r.service_id = $1)
                    GROUP BY r.service_id
                 ) c ON c.service_id = s.id
                 WHERE s.active AND ($1::text IS NULL OR s.id = $1)
                 ORDER BY s.node, s.id";

impl Store {
    /// Active services with their state, in node then id order; `only` limits it to one
    /// service; `with_24h` adds the checks and failures of the last 24 hours.
    pub async fn health(
        &self,
        only: Option<&str>,
        with_24h: bool,
    ) -> Result<Vec<HealthRow>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client.query(HEALTH_SQL, &[&only, &with_24h]).await?;
        Ok(rows
            .iter()
            .map(|r| HealthRow {
                service_id: r.get(0),
                name: r.get(1),
                node: r.get(2),
                category: r.get(3),
                description: r.get(4),
                state: r.get(5),
                mode: r.get(6),
                paused_until: r.get(7),
                flapping: r.get(8),
                consecutive_failures: r.get(9),
                consecutive_successes: r.get(10),
                last_status: r.get(11),
                last_check_at: r.get(12),
                last_response_ms: r.get(13),
                last_message: r.get(14),
                last_error: r.get(15),
                last_error_at: r.get(16),
                healthy_since: r.get(17),
                state_since: r.get(18),
                restarts_used: r.get(19),
                gave_up_at: r.get(20),
                checks_24h: r.get(21),
                failures_24h: r.get(22),
                stale_since: r.get(23),
                stale_reason: r.get(24),
                node_down_since: r.get(25),
                node_down_reason: r.get(26),
                maintenance: r.get::<_, Option<i64>>(27).and_then(|id| {
                    Some(super::ActiveMaintenance {
                        id,
                        name: r.get(28),
                        until: r.get::<_, Option<DateTime<Utc>>>(29)?,
                    })
                }),
            })
            .collect())
    }

    /// Results of a service, newest first: at most `limit`, taken at or after `since`, with an
    /// id below `before` (the previous page's last id).
    pub async fn results_of(
        &self,
        service_id: &str,
        since: Option<DateTime<Utc>>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<ResultRow>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT id, node, started_at, duration_ms, status, message, metrics, output
                 FROM check_results
                 WHERE service_id = $1 AND ($2::timestamptz IS NULL OR started_at >= $2)
                   AND ($3::int8 IS NULL OR id < $3)
                 ORDER BY started_at DESC, id DESC LIMIT $4",
                &[&service_id, &since, &before, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ResultRow {
                id: r.get(0),
                node: r.get(1),
                started_at: r.get(2),
                duration_ms: r.get(3),
                status: status_name(r.get(4)).to_string(),
                message: r.get(5),
                metrics: r.get(6),
                output: r.get(7),
            })
            .collect())
    }

    /// Events of a service, newest first (ids below `before`, at most `limit`).
    pub async fn events_of(
        &self,
        service_id: &str,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<EventRow>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT id, at, kind, from_state, to_state, reason FROM events
                 WHERE service_id = $1 AND ($2::int8 IS NULL OR id < $2)
                 ORDER BY id DESC LIMIT $3",
                &[&service_id, &before, &limit],
            )
            .await?;
        Ok(rows.iter().map(event_row).collect())
    }

    /// The state of a service at `at` (the last state event before it), if any event says so.
    pub async fn state_at(
        &self,
        service_id: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<String>, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .query_opt(
                "SELECT to_state FROM events WHERE service_id = $1 AND kind = 'state' AND at < $2
                 ORDER BY id DESC LIMIT 1",
                &[&service_id, &at],
            )
            .await?
            .map(|r| r.get(0)))
    }

    /// State events of a service since `since`, oldest first (for the timeline).
    pub async fn state_events_since(
        &self,
        service_id: &str,
        since: DateTime<Utc>,
    ) -> Result<Vec<EventRow>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT id, at, kind, from_state, to_state, reason FROM events
                 WHERE service_id = $1 AND kind = 'state' AND at >= $2 ORDER BY id LIMIT 5000",
                &[&service_id, &since],
            )
            .await?;
        Ok(rows.iter().map(event_row).collect())
    }

    /// Every node the collector knows, configured ones first.
    pub async fn nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT name, address, description, active, agent_connected, agent_version,
                        capabilities, connected_at, last_seen, has_agent, timeout_ms,
                        disconnected_at, down_since, down_reason, backlog_results,
                        backlog_oldest_at, backlog_alert_since, results_lost, results_dropped,
                        results_refused, clock_offset_ms, clock_checked_at
                 FROM nodes ORDER BY active DESC, name",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| NodeRow {
                name: r.get(0),
                address: r.get(1),
                description: r.get(2),
                active: r.get(3),
                agent_connected: r.get(4),
                agent_version: r.get(5),
                capabilities: r.get(6),
                connected_at: r.get(7),
                last_seen: r.get(8),
                has_agent: r.get(9),
                node_timeout_ms: r.get(10),
                disconnected_at: r.get(11),
                down_since: r.get(12),
                down_reason: r.get(13),
                backlog_results: r.get(14),
                backlog_oldest_at: r.get(15),
                backlog_alert_since: r.get(16),
                results_lost: r.get(17),
                results_dropped: r.get(18),
                results_refused: r.get(19),
                clock_offset_ms: r.get(20),
                clock_checked_at: r.get(21),
            })
            .collect())
    }

    pub async fn setting(&self, key: &str) -> Result<Option<SettingRow>, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .query_opt(
                "SELECT value, updated_at, updated_by FROM settings WHERE key = $1",
                &[&key],
            )
            .await?
            .map(|r| SettingRow {
                value: r.get(0),
                updated_at: r.get(1),
                updated_by: r.get(2),
            }))
    }

    pub async fn put_setting(
        &self,
        key: &str,
        value: &serde_json::Value,
        by: &str,
    ) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO settings (key, value, updated_at, updated_by) VALUES ($1, $2, now(), $3)
                 ON CONFLICT (key) DO UPDATE SET value = $2, updated_at = now(), updated_by = $3",
                &[&key, value, &by],
            )
            .await?;
        Ok(())
    }

    /// Stores a new token; `None` when the name is taken.
    pub async fn create_token(
        &self,
        name: &str,
        role: &str,
        secret_hash: &str,
    ) -> Result<Option<i64>, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .query_opt(
                "INSERT INTO api_tokens (name, role, secret_hash) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING RETURNING id",
                &[&name, &role, &secret_hash],
            )
            .await?
            .map(|r| r.get(0)))
    }

    pub async fn token(&self, id: i64) -> Result<Option<TokenRow>, StoreError> {
        Ok(self.tokens_where(Some(id)).await?.into_iter().next())
    }

    /// Every token, revoked ones too, oldest first.
    pub async fn tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        self.tokens_where(None).await
    }

    async fn tokens_where(&self, id: Option<i64>) -> Result<Vec<TokenRow>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT id, name, role, secret_hash, created_at, last_used, revoked_at
                 FROM api_tokens WHERE $1::int8 IS NULL OR id = $1 ORDER BY id",
                &[&id],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| TokenRow {
                id: r.get(0),
                name: r.get(1),
                role: r.get(2),
                secret_hash: r.get(3),
                created_at: r.get(4),
                last_used: r.get(5),
                revoked_at: r.get(6),
            })
            .collect())
    }

    /// Revokes a token by name and ends its sessions; false if no live token has that name.
    pub async fn revoke_token(&self, name: &str) -> Result<bool, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let id: Option<i64> = tx
            .query_opt(
                "UPDATE api_tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL
                 RETURNING id",
                &[&name],
            )
            .await?
            .map(|r| r.get(0));
        if let Some(id) = id {
            tx.execute("DELETE FROM web_sessions WHERE token_id = $1", &[&id])
                .await?;
        }
        tx.commit().await?;
        Ok(id.is_some())
    }

    /// Records that a token was used (at most once a minute per token).
    pub async fn touch_token(&self, id: i64) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE api_tokens SET last_used = now()
                 WHERE id = $1 AND (last_used IS NULL OR last_used < now() - interval '1 minute')",
                &[&id],
            )
            .await?;
        Ok(())
    }

    pub async fn create_session(
        &self,
        id_hash: &str,
        token_id: i64,
        csrf: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute("DELETE FROM web_sessions WHERE expires_at < now()", &[])
            .await?;
        client
            .execute(
                "INSERT INTO web_sessions (id_hash, token_id, csrf, expires_at) VALUES ($1, $2, $3, $4)",
                &[&id_hash, &token_id, &csrf, &expires_at],
            )
            .await?;
        Ok(())
    }

    /// A session that has not expired and whose token is not revoked.
    pub async fn session(&self, id_hash: &str) -> Result<Option<SessionRow>, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .query_opt(
                "SELECT t.id, t.name, t.role, s.csrf, s.expires_at
                 FROM web_sessions s JOIN api_tokens t ON t.id = s.token_id
                 WHERE s.id_hash = $1 AND s.expires_at > now() AND t.revoked_at IS NULL",
                &[&id_hash],
            )
            .await?
            .map(|r| SessionRow {
                token_id: r.get(0),
                token_name: r.get(1),
                role: r.get(2),
                csrf: r.get(3),
                expires_at: r.get(4),
            }))
    }

    pub async fn delete_session(&self, id_hash: &str) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute("DELETE FROM web_sessions WHERE id_hash = $1", &[&id_hash])
            .await?;
        Ok(())
    }
}
