//! SQL of maintenance windows: the stored windows (and the purge of one-off windows long over),
//! the set-based statements that write which services and nodes are in maintenance (with an
//! event per service or node entering or leaving it), the "in maintenance" lookups remediation,
//! alerts and the agent heal use, and the gave-up flags for metrics.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::{Store, StoreError};
use crate::maintenance::WindowSpec;

/// A stored maintenance window.
#[derive(Debug, Clone)]
pub struct MaintenanceRow {
    pub id: i64,
    pub name: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub spec: WindowSpec,
}

/// A service covered now: by which window, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cover {
    pub service_id: String,
    pub window_id: i64,
    pub until: DateTime<Utc>,
}

/// A service that entered (`window_id` set) or left (`None`) maintenance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintenanceChange {
    pub service_id: String,
    pub window_id: Option<i64>,
    pub until: Option<DateTime<Utc>>,
}

/// The maintenance window a service is in now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ActiveMaintenance {
    /// The window's id (`/api/maintenance`).
    pub id: i64,
    pub name: String,
    /// When this occurrence of the window ends.
    pub until: DateTime<Utc>,
}

fn window_row(r: &tokio_postgres::Row) -> Option<MaintenanceRow> {
    let id: i64 = r.get(0);
    let spec: serde_json::Value = r.get(4);
    match serde_json::from_value(spec) {
        Ok(spec) => Some(MaintenanceRow {
            id,
            name: r.get(1),
            created_by: r.get(2),
            created_at: r.get(3),
            spec,
        }),
        Err(e) => {
            tracing::error!(window = id, error = %e, "stored maintenance window cannot be read; skipped");
            None
        }
    }
}

impl Store {
    /// Stores a new (already validated) window; returns its id.
    pub async fn create_maintenance(&self, spec: &WindowSpec, by: &str) -> Result<i64, StoreError> {
        let client = self.pool.get().await?;
        let json = serde_json::to_value(spec).unwrap_or(serde_json::Value::Null);
        Ok(client
            .query_one(
                "INSERT INTO maintenance_windows (name, created_by, spec) VALUES ($1, $2, $3)
                 RETURNING id",
                &[&spec.name, &by, &json],
            )
            .await?
            .get(0))
    }

    /// Every stored window, oldest first.
    pub async fn maintenance_windows(&self) -> Result<Vec<MaintenanceRow>, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .query(
                "SELECT id, name, created_by, created_at, spec FROM maintenance_windows ORDER BY id",
                &[],
            )
            .await?
            .iter()
            .filter_map(window_row)
            .collect())
    }

    pub async fn maintenance_window(&self, id: i64) -> Result<Option<MaintenanceRow>, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .query_opt(
                "SELECT id, name, created_by, created_at, spec FROM maintenance_windows WHERE id = $1",
                &[&id],
            )
            .await?
            .as_ref()
            .and_then(window_row))
    }

    /// Deletes a window; its name, or `None` if there was none with that id. The services it
    /// covered leave maintenance at the next maintenance pass (unless another window covers them).
    pub async fn delete_maintenance(&self, id: i64) -> Result<Option<String>, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .query_opt(
                "DELETE FROM maintenance_windows WHERE id = $1 RETURNING name",
                &[&id],
            )
            .await?
            .map(|r| r.get(0)))
    }

    /// Makes `service_state.maintenance_id / maintenance_until` say exactly `covered` (every other
    /// service leaves maintenance) in one statement, and records a `maintenance` event for each
    /// service that enters, leaves or changes window. Rows are locked and compared, so that two
    /// collectors running it at once record each transition once. Returns the transitions.
    pub async fn apply_maintenance(
        &self,
        covered: &[Cover],
    ) -> Result<Vec<MaintenanceChange>, StoreError> {
        let ids: Vec<&str> = covered.iter().map(|c| c.service_id.as_str()).collect();
        let windows: Vec<i64> = covered.iter().map(|c| c.window_id).collect();
        let untils: Vec<DateTime<Utc>> = covered.iter().map(|c| c.until).collect();
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "WITH cover AS (
                    SELECT * FROM unnest($1::text[], $2::int8[], $3::timestamptz[])
                        AS c(service_id, window_id, until)
                 ), old AS (
                    SELECT st.service_id, st.maintenance_id
                    FROM service_state st LEFT JOIN cover c ON c.service_id = st.service_id
                    WHERE st.maintenance_id IS DISTINCT FROM c.window_id
                       OR st.maintenance_until IS DISTINCT FROM c.until
                    FOR UPDATE OF st
                 ), changed AS (
                    UPDATE service_state st
                    SET maintenance_id = c.window_id, maintenance_until = c.until
                    FROM old LEFT JOIN cover c ON c.service_id = old.service_id
                    WHERE st.service_id = old.service_id
                    RETURNING st.service_id, old.maintenance_id AS old_id,
                              st.maintenance_id AS new_id, st.maintenance_until AS until
                 ), logged AS (
                    INSERT INTO events (service_id, kind, from_state, to_state, reason)
                    SELECT ch.service_id, 'maintenance',
                           CASE WHEN ch.old_id IS NULL THEN '' ELSE 'maintenance' END,
                           CASE WHEN ch.new_id IS NULL THEN '' ELSE 'maintenance' END,
                           CASE WHEN ch.new_id IS NULL
                                THEN 'maintenance ended: ' || COALESCE(ow.name, 'window ' || ch.old_id || ' (deleted)')
                                ELSE 'maintenance started: ' || COALESCE(nw.name, 'window ' || ch.new_id)
                                     || ' until ' || to_char(ch.until AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"')
                           END
                    FROM changed ch
                    LEFT JOIN maintenance_windows ow ON ow.id = ch.old_id
                    LEFT JOIN maintenance_windows nw ON nw.id = ch.new_id
                    WHERE ch.old_id IS DISTINCT FROM ch.new_id
                 )
                 SELECT service_id, new_id, until FROM changed
                 WHERE old_id IS DISTINCT FROM new_id ORDER BY service_id",
                &[&ids, &windows, &untils],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| MaintenanceChange {
                service_id: r.get(0),
                window_id: r.get(1),
                until: r.get(2),
            })
            .collect())
    }

    /// Makes `nodes.maintenance_until` say exactly `covered` (node, until); every other node
    /// leaves maintenance. One statement that locks and compares the rows, with a node event
    /// `maintenance` for each node that enters or leaves maintenance. Returns those transitions
    /// (until `None`: left).
    pub async fn apply_node_maintenance(
        &self,
        covered: &[(String, DateTime<Utc>)],
    ) -> Result<Vec<(String, Option<DateTime<Utc>>)>, StoreError> {
        let names: Vec<&str> = covered.iter().map(|(n, _)| n.as_str()).collect();
        let untils: Vec<DateTime<Utc>> = covered.iter().map(|(_, u)| *u).collect();
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "WITH cover AS (
                    SELECT * FROM unnest($1::text[], $2::timestamptz[]) AS c(name, until)
                 ), old AS (
                    SELECT n.name, n.maintenance_until AS old_until, c.until
                    FROM nodes n LEFT JOIN cover c ON c.name = n.name
                    WHERE n.maintenance_until IS DISTINCT FROM c.until
                    FOR UPDATE OF n
                 ), changed AS (
                    UPDATE nodes n SET maintenance_until = old.until
                    FROM old WHERE n.name = old.name
                    RETURNING n.name, old.old_until, old.until
                 ), logged AS (
                    INSERT INTO node_events (node, kind, reason)
                    SELECT name, 'maintenance', CASE WHEN until IS NULL THEN 'maintenance ended'
                        ELSE 'maintenance started, until '
                             || to_char(until AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"') END
                    FROM changed WHERE (old_until IS NULL) <> (until IS NULL)
                 )
                 SELECT name, until FROM changed
                 WHERE (old_until IS NULL) <> (until IS NULL) ORDER BY name",
                &[&names, &untils],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Until when `node` is in maintenance (`nodes.maintenance_until > now()`), if it is.
    pub async fn node_in_maintenance(
        &self,
        node: &str,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .query_opt(
                "SELECT maintenance_until FROM nodes WHERE name = $1 AND maintenance_until > now()",
                &[&node],
            )
            .await?
            .map(|r| r.get(0)))
    }

    /// Deletes the one-off windows that ended more than `older_than` ago; returns their names.
    pub async fn purge_ended_maintenance(
        &self,
        older_than: std::time::Duration,
    ) -> Result<Vec<String>, StoreError> {
        let ms = older_than.as_millis().min(i64::MAX as u128) as f64;
        let client = self.pool.get().await?;
        Ok(client
            .query(
                "DELETE FROM maintenance_windows
                 WHERE NOT (spec ? 'recurrence') AND spec ? 'to'
                   AND (spec->>'to')::timestamptz < now() - $1 * interval '1 millisecond'
                 RETURNING name",
                &[&ms],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// The maintenance window `service_id` is in now (`maintenance_until > now()`), if any.
    /// Remediation and alerts use this (or the same condition in their own statements).
    pub async fn in_maintenance(
        &self,
        service_id: &str,
    ) -> Result<Option<ActiveMaintenance>, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .query_opt(
                "SELECT st.maintenance_id, COALESCE(w.name, ''), st.maintenance_until
                 FROM service_state st
                 LEFT JOIN maintenance_windows w ON w.id = st.maintenance_id
                 WHERE st.service_id = $1 AND st.maintenance_id IS NOT NULL
                   AND st.maintenance_until > now()",
                &[&service_id],
            )
            .await?
            .map(|r| ActiveMaintenance {
                id: r.get(0),
                name: r.get(1),
                until: r.get(2),
            }))
    }

    /// Every active service's node and whether remediation gave up on it (`gave_up_at` set),
    /// for `vigil_service_gave_up`.
    pub async fn gave_up_flags(&self) -> Result<Vec<(String, String, bool)>, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .query(
                "SELECT s.id, s.node, st.gave_up_at IS NOT NULL
                 FROM services s JOIN service_state st ON st.service_id = s.id
                 WHERE s.active ORDER BY s.id",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }
}
