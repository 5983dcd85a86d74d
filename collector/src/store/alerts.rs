//! Incidents and the alert outbox: opening and closing an incident enqueues its alert rows in the
//! same transaction; the quiet rules (operator modes, maintenance, flapping, dependencies) are
//! read from `service_state` in that transaction; the delivery worker claims due rows under a
//! lease and records every attempt; the API reads incidents with their alerts and attempts.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::types::Json;

use super::{Store, StoreError};

/// An incident to open, with its opening alert.
#[derive(Debug, Clone)]
pub struct NewIncident<'a> {
    /// `service`, `stale`, `node`, `backlog` or `flapping`.
    pub family: &'a str,
    pub node: &'a str,
    /// None for a node's own incidents.
    pub service_id: Option<&'a str>,
    pub severity: &'a str,
    pub event: &'a str,
    pub reason: &'a str,
    /// The alert as receivers get it (without its ids, added here).
    pub payload: serde_json::Value,
    /// Where the opening alert goes; its closing, reminder and gave-up alerts go there too.
    pub receivers: &'a [String],
    /// The service's `depends_on` (service families only).
    pub depends_on: &'a [String],
    /// Services that depend on this one.
    pub dependents: &'a [String],
    /// Also quiet while a dependency changed state this recently (catch-up openings: a
    /// dependent is given time to recover after its dependency did).
    pub settle: Option<Duration>,
}

/// What [`Store::open_incident`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// A new incident, its alerts enqueued.
    Opened(i64),
    /// An incident with this key was open already.
    AlreadyOpen,
    /// No alert: the service is stopped, paused, in maintenance or flapping.
    Quiet(String),
    /// No alert: a dependency is down or stale; recorded in its incident's `affected`.
    Suppressed { by: String },
}

/// An incident to open late (see [`Store::alert_catch_up_late`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LateOpening {
    /// `stale`, `node` or `backlog`.
    pub family: &'static str,
    pub node: String,
    pub service_id: Option<String>,
    pub reason: String,
}

/// The incident key of a family, node and service.
pub fn incident_key(family: &str, node: &str, service: Option<&str>) -> String {
    format!("{family}:{node}:{}", service.unwrap_or(""))
}

/// One incident, as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct IncidentRow {
    pub id: i64,
    pub key: String,
    pub family: String,
    pub node: String,
    pub service_id: Option<String>,
    pub severity: String,
    pub opened_at: DateTime<Utc>,
    pub reason: String,
    pub acknowledged_at: Option<DateTime<Utc>>,
    pub acknowledged_by: Option<String>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolution: Option<String>,
    pub last_alert_at: DateTime<Utc>,
    pub gave_up_sent: bool,
    pub affected: Vec<String>,
    /// Alert rows of the incident not delivered yet (neither delivered nor given up).
    pub alerts_pending: i64,
    /// Alert rows given up on.
    pub alerts_failed: i64,
}

const INCIDENT_COLUMNS: &str = "i.id, i.key, i.family, i.node, i.service_id, i.severity, i.opened_at,
    i.reason, i.acknowledged_at, i.acknowledged_by, i.resolved_at, i.resolution, i.last_alert_at,
    i.gave_up_sent, i.affected,
    (SELECT count(*) FROM alerts a WHERE a.incident_id = i.id AND a.delivered_at IS NULL AND a.failed_at IS NULL),
    (SELECT count(*) FROM alerts a WHERE a.incident_id = i.id AND a.failed_at IS NOT NULL)";

fn incident_row(r: &tokio_postgres::Row) -> IncidentRow {
    IncidentRow {
        id: r.get(0),
        key: r.get(1),
        family: r.get(2),
        node: r.get(3),
        service_id: r.get(4),
        severity: r.get(5),
        opened_at: r.get(6),
        reason: r.get(7),
        acknowledged_at: r.get(8),
        acknowledged_by: r.get(9),
        resolved_at: r.get(10),
        resolution: r.get(11),
        last_alert_at: r.get(12),
        gave_up_sent: r.get(13),
        affected: r.get(14),
        alerts_pending: r.get(15),
        alerts_failed: r.get(16),
    }
}

/// One alert row (one alert for one receiver) with its delivery state.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AlertRow {
    pub id: i64,
    /// The alert's stable id (sent as `id` and `Idempotency-Key`).
    pub uid: String,
    pub incident_id: i64,
    pub event: String,
    pub receiver: String,
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub next_attempt_at: DateTime<Utc>,
    pub attempts: i32,
    pub delivered_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// A worker's lease on the row: nobody else sends it before then.
    pub claimed_until: Option<DateTime<Utc>>,
    /// Every delivery attempt, oldest first (filled by [`Store::incident`] only).
    pub history: Vec<AttemptRow>,
}

/// One delivery attempt.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AttemptRow {
    pub at: DateTime<Utc>,
    pub ok: bool,
    pub http_status: Option<i32>,
    pub error: Option<String>,
}

const ALERT_COLUMNS: &str =
    "a.id, a.uid, a.incident_id, a.event, a.receiver, a.payload, a.created_at,
    a.next_attempt_at, a.attempts, a.delivered_at, a.failed_at, a.last_error, a.claimed_until";

fn alert_row(r: &tokio_postgres::Row) -> AlertRow {
    AlertRow {
        id: r.get(0),
        uid: r.get(1),
        incident_id: r.get(2),
        event: r.get(3),
        receiver: r.get(4),
        payload: r.get::<_, Json<serde_json::Value>>(5).0,
        created_at: r.get(6),
        next_attempt_at: r.get(7),
        attempts: r.get(8),
        delivered_at: r.get(9),
        failed_at: r.get(10),
        last_error: r.get(11),
        claimed_until: r.get(12),
        history: Vec::new(),
    }
}

/// A delivery attempt's outcome.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub ok: bool,
    pub http_status: Option<i32>,
    pub error: Option<String>,
    /// When to try again after a failure.
    pub retry_in: Duration,
    /// Give up after a failure when the row is this old.
    pub give_up_after: Duration,
}

/// Enqueues `event` for every receiver of incident `id`'s opening alert, its payload being the
/// opening one with `event`, `reason`, `at` and `affected` replaced.
const ENQUEUE_FOLLOW_UP: &str = "INSERT INTO alerts (incident_id, event, receiver, payload)
    SELECT DISTINCT ON (a.receiver) a.incident_id, $2, a.receiver,
           a.payload || jsonb_build_object('event', $2::text, 'reason', $3::text, 'at', now(),
                                           'affected', to_jsonb(i.affected),
                                           'resolution', i.resolution)
    FROM alerts a JOIN incidents i ON i.id = a.incident_id
    WHERE a.incident_id = $1 ORDER BY a.receiver, a.id";

/// Whether the service's alerts are silenced by the operator or a maintenance window; why.
/// The row is locked (`FOR SHARE`) until the caller's transaction ends, so a pause or a
/// maintenance window written meanwhile waits for the incident to be opened (and then closes it
/// as silenced) instead of slipping in between this read and the incident's INSERT.
async fn silenced_why(
    tx: &deadpool_postgres::Transaction<'_>,
    service_id: &str,
) -> Result<Option<(String, bool)>, StoreError> {
    let row = tx
        .query_opt(
            "SELECT mode, COALESCE(maintenance_until > now(), false), flapping
             FROM service_state WHERE service_id = $1 FOR SHARE",
            &[&service_id],
        )
        .await?;
    Ok(row.map(|r| {
        let mode: String = r.get(0);
        let maint: bool = r.get(1);
        let why = if mode != "active" {
            format!("service is {mode}")
        } else if maint {
            "service is in maintenance".to_string()
        } else {
            String::new()
        };
        (why, r.get(2))
    }))
}

/// Closes every open incident of `service_id` as silenced by the operator and enqueues a
/// `silenced` closing alert for each (so that PagerDuty resolves), within the caller's
/// transaction (the one that changes the mode).
pub(crate) async fn silence_in(
    tx: &deadpool_postgres::Transaction<'_>,
    service_id: &str,
    reason: &str,
) -> Result<Vec<i64>, StoreError> {
    let ids: Vec<i64> = tx
        .query(
            "UPDATE incidents SET resolved_at = now(), resolution = 'silenced by operator'
             WHERE service_id = $1 AND resolved_at IS NULL RETURNING id",
            &[&service_id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for id in &ids {
        tx.execute(ENQUEUE_FOLLOW_UP, &[id, &"silenced", &reason])
            .await?;
    }
    if !ids.is_empty() {
        tracing::info!(service = %service_id, incidents = ids.len(), "incidents closed: silenced by operator");
    }
    Ok(ids)
}

impl Store {
    /// Opens an incident and enqueues its opening alert for each receiver, in one transaction,
    /// unless the quiet rules say no (read from `service_state` in that transaction): the
    /// service is stopped, paused or in maintenance; it is flapping (service and stale
    /// families); a dependency is down or stale (its open incident records this service in
    /// `affected`). Idempotent: at most one open incident per key.
    pub async fn open_incident(&self, n: &NewIncident<'_>) -> Result<Opened, StoreError> {
        let key = incident_key(n.family, n.node, n.service_id);
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let mut affected: Vec<String> = Vec::new();
        if n.service_id.is_none() {
            // A node's own incidents: quiet while the node is in maintenance (row locked like
            // a service's, see `silenced_why`).
            let maint = tx
                .query_opt(
                    "SELECT maintenance_until FROM nodes
                     WHERE name = $1 AND maintenance_until > now() FOR SHARE",
                    &[&n.node],
                )
                .await?;
            if maint.is_some() {
                return Ok(Opened::Quiet("node is in maintenance".into()));
            }
        }
        if let Some(svc) = n.service_id {
            if let Some((why, flapping)) = silenced_why(&tx, svc).await? {
                if !why.is_empty() {
                    return Ok(Opened::Quiet(why));
                }
                if flapping && matches!(n.family, "service" | "stale") {
                    return Ok(Opened::Quiet("service is flapping".into()));
                }
            }
            if matches!(n.family, "service" | "stale") {
                let deps: Vec<String> = tx
                    .query(
                        "SELECT service_id FROM service_state
                         WHERE service_id = ANY($1) AND (state = 'down' OR stale_since IS NOT NULL)
                         ORDER BY service_id",
                        &[&n.depends_on],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                if let Some(first) = deps.first() {
                    // Recorded in the first open incident of a down dependency, if any.
                    let by: Option<String> = tx
                        .query_opt(
                            "UPDATE incidents SET affected = array_append(affected, $2)
                             WHERE id = (SELECT id FROM incidents WHERE resolved_at IS NULL
                                           AND family IN ('service', 'stale')
                                           AND service_id = ANY($1) ORDER BY id LIMIT 1)
                               AND NOT ($2 = ANY(affected))
                             RETURNING service_id",
                            &[&deps, &svc],
                        )
                        .await?
                        .and_then(|r| r.get(0));
                    tx.commit().await?;
                    return Ok(Opened::Suppressed {
                        by: by.unwrap_or_else(|| first.clone()),
                    });
                }
                if let Some(settle) = n.settle {
                    let settle_ms = settle.as_millis().min(i64::MAX as u128) as i64;
                    let recent = tx
                        .query_one(
                            "SELECT EXISTS (SELECT 1 FROM service_state WHERE service_id = ANY($1)
                               AND state_since > now() - make_interval(secs => $2::bigint / 1000.0))",
                            &[&n.depends_on, &settle_ms],
                        )
                        .await?
                        .get::<_, bool>(0);
                    if recent {
                        return Ok(Opened::Quiet("a dependency changed state just now".into()));
                    }
                }
                // Dependents already down or stale without an incident of their own were
                // suppressed because of this service (they went down first, in the same batch).
                affected = tx
                    .query(
                        "SELECT st.service_id FROM service_state st
                         WHERE st.service_id = ANY($1)
                           AND (st.state = 'down' OR st.stale_since IS NOT NULL)
                           AND NOT EXISTS (SELECT 1 FROM incidents i WHERE i.resolved_at IS NULL
                                           AND i.service_id = st.service_id
                                           AND i.family IN ('service', 'stale'))
                         ORDER BY st.service_id",
                        &[&n.dependents],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
            }
        }
        let Some(row) = tx
            .query_opt(
                "INSERT INTO incidents (key, family, node, service_id, severity, reason, affected)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (key) WHERE resolved_at IS NULL DO NOTHING RETURNING id",
                &[
                    &key,
                    &n.family,
                    &n.node,
                    &n.service_id,
                    &n.severity,
                    &n.reason,
                    &affected,
                ],
            )
            .await?
        else {
            return Ok(Opened::AlreadyOpen);
        };
        let id: i64 = row.get(0);
        let mut payload = n.payload.clone();
        if let Some(o) = payload.as_object_mut() {
            o.insert("incident_id".into(), id.into());
            o.insert("incident_key".into(), key.clone().into());
            o.insert("affected".into(), serde_json::json!(affected));
        }
        tx.execute(
            "INSERT INTO alerts (incident_id, event, receiver, payload)
             SELECT $1, $2, r, $3 FROM unnest($4::text[]) AS r",
            &[&id, &n.event, &Json(&payload), &n.receivers],
        )
        .await?;
        tx.commit().await?;
        Ok(Opened::Opened(id))
    }

    /// Closes the open incident `key` (resolution `resolution`) and enqueues `event` for its
    /// receivers, in one transaction. A service incident of a flapping service stays open (its
    /// recovery is decided when flapping ends). Returns the closed incident's id.
    pub async fn close_incident(
        &self,
        key: &str,
        event: &str,
        reason: &str,
        resolution: &str,
    ) -> Result<Option<i64>, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let Some(row) = tx
            .query_opt(
                "UPDATE incidents i SET resolved_at = now(), resolution = $2
                 WHERE key = $1 AND resolved_at IS NULL
                   AND NOT (i.family = 'service' AND EXISTS (SELECT 1 FROM service_state st
                            WHERE st.service_id = i.service_id AND st.flapping))
                 RETURNING id",
                &[&key, &resolution],
            )
            .await?
        else {
            return Ok(None);
        };
        let id: i64 = row.get(0);
        tx.execute(ENQUEUE_FOLLOW_UP, &[&id, &event, &reason])
            .await?;
        tx.commit().await?;
        Ok(Some(id))
    }

    /// Enqueues the gave-up alert of the open service incident `key`, once per incident.
    pub async fn incident_gave_up(&self, key: &str, reason: &str) -> Result<bool, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let Some(row) = tx
            .query_opt(
                "UPDATE incidents SET gave_up_sent = true, last_alert_at = now()
                 WHERE key = $1 AND resolved_at IS NULL AND NOT gave_up_sent RETURNING id",
                &[&key],
            )
            .await?
        else {
            return Ok(false);
        };
        let id: i64 = row.get(0);
        tx.execute(ENQUEUE_FOLLOW_UP, &[&id, &"gave_up", &reason])
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Enqueues a reminder for every open, unacknowledged incident whose last alert is `every`
    /// old, unless its service is silenced (stopped, paused, maintenance) or flapping, its node
    /// (node families) is in maintenance, or its service or node is gone from the config; one
    /// statement, so two collectors never remind twice. Returns how many incidents.
    pub async fn remind(&self, every: Duration) -> Result<u64, StoreError> {
        let every_ms = every.as_millis().min(i64::MAX as u128) as i64;
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "WITH due AS (
                   UPDATE incidents i SET last_alert_at = now()
                   WHERE i.resolved_at IS NULL AND i.acknowledged_at IS NULL
                     AND i.last_alert_at <= now() - make_interval(secs => $1::bigint / 1000.0)
                     AND NOT EXISTS (SELECT 1 FROM service_state st WHERE st.service_id = i.service_id
                           AND (st.mode <> 'active' OR COALESCE(st.maintenance_until > now(), false)
                                OR (st.flapping AND i.family <> 'flapping')))
                     AND NOT (i.service_id IS NULL AND EXISTS (SELECT 1 FROM nodes n
                           WHERE n.name = i.node AND n.maintenance_until > now()))
                     AND (CASE WHEN i.service_id IS NULL
                               THEN EXISTS (SELECT 1 FROM nodes n WHERE n.name = i.node AND n.active)
                               ELSE EXISTS (SELECT 1 FROM services s WHERE s.id = i.service_id AND s.active)
                          END)
                   RETURNING i.id, i.affected)
                 INSERT INTO alerts (incident_id, event, receiver, payload)
                 SELECT DISTINCT ON (a.incident_id, a.receiver) a.incident_id, 'reminder', a.receiver,
                        a.payload || jsonb_build_object('event', 'reminder', 'at', now(),
                                                        'affected', to_jsonb(due.affected))
                 FROM alerts a JOIN due ON due.id = a.incident_id
                 ORDER BY a.incident_id, a.receiver, a.id
                 RETURNING incident_id",
                &[&every_ms],
            )
            .await?;
        let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        ids.dedup();
        Ok(ids.len() as u64)
    }

    /// What the database says alerts should catch up on: active services that are down with no
    /// open service incident (their alert was suppressed while flapping, paused or behind a
    /// dependency, and that reason is gone), and open service incidents whose service is
    /// healthy and not flapping (its recovery came while an alert could not be sent).
    /// A down service is left alone while its mode or flapping changed, or a start or restart
    /// was in flight or finished, within `settle` (its next results will tell).
    pub async fn alert_catch_up(
        &self,
        settle: Duration,
    ) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let settle_ms = settle.as_millis().min(i64::MAX as u128) as i64;
        let client = self.pool.get().await?;
        let down = client
            .query(
                "SELECT st.service_id FROM service_state st JOIN services s ON s.id = st.service_id
                 WHERE s.active AND st.state = 'down' AND st.stale_since IS NULL
                   AND st.mode = 'active' AND NOT st.flapping
                   AND NOT COALESCE(st.maintenance_until > now(), false)
                   AND NOT EXISTS (SELECT 1 FROM incidents i WHERE i.resolved_at IS NULL
                                   AND i.service_id = st.service_id AND i.family = 'service')
                   AND NOT EXISTS (SELECT 1 FROM events e WHERE e.service_id = st.service_id
                                   AND e.kind IN ('mode', 'flapping')
                                   AND e.at > now() - make_interval(secs => $1::bigint / 1000.0))
                   AND NOT EXISTS (SELECT 1 FROM commands c WHERE c.service_id = st.service_id
                                   AND c.action IN ('start', 'restart')
                                   AND (c.status IN ('pending', 'sent')
                                        OR c.finished_at > now() - make_interval(secs => $1::bigint / 1000.0)))
                 ORDER BY st.service_id",
                &[&settle_ms],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let healed = client
            .query(
                "SELECT i.key FROM incidents i JOIN service_state st ON st.service_id = i.service_id
                 WHERE i.resolved_at IS NULL AND i.family = 'service'
                   AND st.state = 'healthy' AND NOT st.flapping
                 ORDER BY i.id",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok((down, healed))
    }

    /// Incidents the transitions should have opened but did not (late rather than never): a
    /// stale service (`on_stale: alert`, active, not flapping, neither it nor its node in
    /// maintenance, its node not down) without an open stale incident, stale for `settle` and
    /// with no mode, flapping or maintenance change within `settle` and no node up or node
    /// maintenance change within the longer of `settle` and its `stale_after` (a node back
    /// gets time to deliver); a node down for `grace` (its own alert waits for the SSH heal)
    /// and a node backlog open for `grace`, neither in maintenance (nor out of it for less than
    /// `settle`) and without an open incident. Stale services only with `stale` set.
    pub async fn alert_catch_up_late(
        &self,
        settle: Duration,
        grace: Duration,
        stale: bool,
    ) -> Result<Vec<LateOpening>, StoreError> {
        let settle_ms = settle.as_millis().min(i64::MAX as u128) as f64;
        let grace_ms = grace.as_millis().min(i64::MAX as u128) as f64;
        let client = self.pool.get().await?;
        let mut out = Vec::new();
        if stale {
            let rows = client
                .query(
                    "SELECT st.service_id, s.node, COALESCE(st.stale_reason, 'no recent result')
                     FROM service_state st JOIN services s ON s.id = st.service_id
                     LEFT JOIN nodes n ON n.name = s.node
                     WHERE s.active AND s.on_stale = 'alert'
                       AND st.stale_since < now() - $1 * interval '1 millisecond'
                       AND st.mode = 'active' AND NOT st.flapping
                       AND NOT COALESCE(st.maintenance_until > now(), false)
                       AND n.down_since IS NULL
                       AND NOT COALESCE(n.maintenance_until > now(), false)
                       AND NOT EXISTS (SELECT 1 FROM incidents i WHERE i.resolved_at IS NULL
                                       AND i.service_id = st.service_id AND i.family = 'stale')
                       AND NOT EXISTS (SELECT 1 FROM events e WHERE e.service_id = st.service_id
                                       AND e.kind IN ('mode', 'flapping', 'maintenance')
                                       AND e.at > now() - $1 * interval '1 millisecond')
                       AND NOT EXISTS (SELECT 1 FROM node_events ne WHERE ne.node = s.node
                                       AND ne.kind IN ('up', 'maintenance')
                                       AND ne.at > now() - GREATEST($1, s.stale_after_ms)
                                                           * interval '1 millisecond')
                     ORDER BY st.service_id",
                    &[&settle_ms],
                )
                .await?;
            out.extend(rows.iter().map(|r| LateOpening {
                family: "stale",
                service_id: Some(r.get(0)),
                node: r.get(1),
                reason: r.get(2),
            }));
        }
        let rows = client
            .query(
                "SELECT 'node', n.name, COALESCE(n.down_reason, 'its agent is not heard from')
                 FROM nodes n
                 WHERE n.active AND n.has_agent
                   AND n.down_since < now() - $2 * interval '1 millisecond'
                   AND NOT COALESCE(n.maintenance_until > now(), false)
                   AND NOT EXISTS (SELECT 1 FROM incidents i WHERE i.resolved_at IS NULL
                                   AND i.service_id IS NULL AND i.node = n.name AND i.family = 'node')
                   AND NOT EXISTS (SELECT 1 FROM node_events ne WHERE ne.node = n.name
                                   AND ne.kind = 'maintenance'
                                   AND ne.at > now() - $1 * interval '1 millisecond')
                 UNION ALL
                 SELECT 'backlog', n.name,
                        format('%s result(s) waiting on the node, the oldest for %s s',
                               COALESCE(n.backlog_results, 0),
                               COALESCE(floor(extract(epoch FROM now() - n.backlog_oldest_at))::bigint, 0))
                 FROM nodes n
                 WHERE n.active AND n.down_since IS NULL
                   AND n.backlog_alert_since < now() - $2 * interval '1 millisecond'
                   AND NOT COALESCE(n.maintenance_until > now(), false)
                   AND NOT EXISTS (SELECT 1 FROM incidents i WHERE i.resolved_at IS NULL
                                   AND i.service_id IS NULL AND i.node = n.name AND i.family = 'backlog')
                   AND NOT EXISTS (SELECT 1 FROM node_events ne WHERE ne.node = n.name
                                   AND ne.kind = 'maintenance'
                                   AND ne.at > now() - $1 * interval '1 millisecond')
                 ORDER BY 1, 2",
                &[&settle_ms, &grace_ms],
            )
            .await?;
        out.extend(rows.iter().map(|r| LateOpening {
            family: if r.get::<_, &str>(0) == "node" {
                "node"
            } else {
                "backlog"
            },
            service_id: None,
            node: r.get(1),
            reason: r.get(2),
        }));
        Ok(out)
    }

    /// Closes, in one transaction, the open incidents the database says are over although no
    /// transition closed them (a lost `fresh`, `node_up` or `backlog_cleared`: a collector that
    /// crashed between its commit and the alert's), and those of services or nodes removed from
    /// the config; each gets its closing alert. Returns (incident key, event) of each.
    pub async fn close_settled_incidents(&self) -> Result<Vec<(String, String)>, StoreError> {
        const CLOSES: [(&str, &str, &str, &str); 4] = [
            (
                "removed",
                "removed from the config",
                "removed from the config",
                "(i.service_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM services s
                   WHERE s.id = i.service_id AND s.active))
                 OR (i.service_id IS NULL AND NOT EXISTS (SELECT 1 FROM nodes n
                   WHERE n.name = i.node AND n.active))",
            ),
            (
                "fresh",
                "a result arrived again",
                "a result arrived again",
                "i.family = 'stale' AND EXISTS (SELECT 1 FROM service_state st
                   WHERE st.service_id = i.service_id AND st.stale_since IS NULL)",
            ),
            (
                "node_up",
                "node up",
                "its agent is heard from again",
                "i.family = 'node' AND i.service_id IS NULL AND EXISTS (SELECT 1 FROM nodes n
                   WHERE n.name = i.node AND n.down_since IS NULL)",
            ),
            (
                "backlog_cleared",
                "backlog cleared",
                "the backlog is gone",
                "i.family = 'backlog' AND i.service_id IS NULL AND EXISTS (SELECT 1 FROM nodes n
                   WHERE n.name = i.node AND n.backlog_alert_since IS NULL)",
            ),
        ];
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let mut out = Vec::new();
        for (event, resolution, reason, cond) in CLOSES {
            let sql = format!(
                "UPDATE incidents i SET resolved_at = now(), resolution = $1
                 WHERE i.resolved_at IS NULL AND ({cond}) RETURNING i.id, i.key"
            );
            let rows = tx.query(&sql, &[&resolution]).await?;
            for r in &rows {
                let id: i64 = r.get(0);
                tx.execute(ENQUEUE_FOLLOW_UP, &[&id, &event, &reason])
                    .await?;
                out.push((r.get(1), event.to_string()));
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Closes the open incidents of services that are stopped, paused or in maintenance (a mode
    /// set without [`silence_in`], or a maintenance window that began), and the node incidents
    /// of nodes in maintenance, with a `silenced` alert. Returns the services and nodes.
    pub async fn silence_quiet_incidents(&self) -> Result<Vec<String>, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let services: Vec<(String, String)> = tx
            .query(
                "SELECT DISTINCT i.service_id, CASE WHEN st.mode <> 'active' THEN 'service is ' || st.mode
                                                    ELSE 'maintenance window' END
                 FROM incidents i JOIN service_state st ON st.service_id = i.service_id
                 WHERE i.resolved_at IS NULL
                   AND (st.mode <> 'active' OR COALESCE(st.maintenance_until > now(), false))",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for (s, why) in &services {
            silence_in(&tx, s, why).await?;
        }
        let nodes: Vec<(i64, String)> = tx
            .query(
                "UPDATE incidents i SET resolved_at = now(), resolution = 'maintenance window'
                 WHERE i.resolved_at IS NULL AND i.service_id IS NULL
                   AND EXISTS (SELECT 1 FROM nodes n WHERE n.name = i.node
                               AND n.maintenance_until > now())
                 RETURNING i.id, i.node",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for (id, _) in &nodes {
            tx.execute(ENQUEUE_FOLLOW_UP, &[id, &"silenced", &"maintenance window"])
                .await?;
        }
        tx.commit().await?;
        if !nodes.is_empty() {
            tracing::info!(
                incidents = nodes.len(),
                "node incidents closed: node in maintenance"
            );
        }
        Ok(services
            .into_iter()
            .map(|(s, _)| s)
            .chain(nodes.into_iter().map(|(_, n)| n))
            .collect())
    }

    /// Claims up to `limit` due alert rows for `lease` (rows whose earlier rows for the same
    /// incident and receiver are still undelivered wait for them: a recovered never overtakes
    /// its down). `FOR UPDATE SKIP LOCKED` and the lease keep two collectors from sending the
    /// same row at once; a dead collector's lease expires.
    pub async fn claim_alerts(
        &self,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<AlertRow>, StoreError> {
        let lease_ms = lease.as_millis().min(i64::MAX as u128) as i64;
        let client = self.pool.get().await?;
        let sql = format!(
            "UPDATE alerts a SET claimed_until = now() + make_interval(secs => $2::bigint / 1000.0),
                                 attempts = a.attempts + 1
             WHERE a.id IN (
               SELECT p.id FROM alerts p
               WHERE p.delivered_at IS NULL AND p.failed_at IS NULL AND p.next_attempt_at <= now()
                 AND (p.claimed_until IS NULL OR p.claimed_until < now())
                 -- One subject (a service, or a node) at a time per receiver, oldest first:
                 -- its alerts of different incidents (recovered, then flapping) arrive in the
                 -- order they were written.
                 AND NOT EXISTS (SELECT 1 FROM alerts e
                                 JOIN incidents ie ON ie.id = e.incident_id
                                 JOIN incidents ip ON ip.id = p.incident_id
                                 WHERE ie.node = ip.node
                                   AND ie.service_id IS NOT DISTINCT FROM ip.service_id
                                   AND e.receiver = p.receiver AND e.id < p.id
                                   AND e.delivered_at IS NULL AND e.failed_at IS NULL)
               ORDER BY p.id LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING {ALERT_COLUMNS}"
        );
        let mut rows: Vec<AlertRow> = client
            .query(&sql, &[&limit, &lease_ms])
            .await?
            .iter()
            .map(alert_row)
            .collect();
        rows.sort_by_key(|r| r.id);
        Ok(rows)
    }

    /// Records a delivery attempt of a claimed row and releases it: delivered, due again after
    /// `retry_in`, or given up when older than `give_up_after` — only while this worker still
    /// holds the lease it took (`claimed_until` as [`Store::claim_alerts`] returned it) and the
    /// row is not delivered: a late outcome after the lease expired (another worker may have
    /// claimed and delivered it) is kept in the attempts and changes nothing else. Returns
    /// whether the row was updated.
    pub async fn record_attempt(
        &self,
        id: i64,
        claimed_until: Option<DateTime<Utc>>,
        a: &Attempt,
    ) -> Result<bool, StoreError> {
        let retry_ms = a.retry_in.as_millis().min(i64::MAX as u128) as i64;
        let give_up_ms = a.give_up_after.as_millis().min(i64::MAX as u128) as i64;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO alert_attempts (alert_id, ok, http_status, error) VALUES ($1, $2, $3, $4)",
            &[&id, &a.ok, &a.http_status, &a.error],
        )
        .await?;
        let n = tx
            .execute(
                "UPDATE alerts SET claimed_until = NULL,
                delivered_at = CASE WHEN $2 THEN now() END,
                last_error = $3,
                next_attempt_at = now() + make_interval(secs => $4::bigint / 1000.0),
                failed_at = CASE WHEN NOT $2 AND created_at <= now() - make_interval(secs => $5::bigint / 1000.0)
                                 THEN now() END
             WHERE id = $1 AND delivered_at IS NULL AND failed_at IS NULL
               AND claimed_until = $6",
                &[&id, &a.ok, &a.error, &retry_ms, &give_up_ms, &claimed_until],
            )
            .await?;
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Incidents, newest first: open or closed only, of one service only.
    pub async fn incidents(
        &self,
        open: Option<bool>,
        service: Option<&str>,
        limit: i64,
    ) -> Result<Vec<IncidentRow>, StoreError> {
        let client = self.pool.get().await?;
        let sql = format!(
            "SELECT {INCIDENT_COLUMNS} FROM incidents i
             WHERE ($1::bool IS NULL OR (i.resolved_at IS NULL) = $1)
               AND ($2::text IS NULL OR i.service_id = $2)
             ORDER BY i.id DESC LIMIT $3"
        );
        Ok(client
            .query(&sql, &[&open, &service, &limit])
            .await?
            .iter()
            .map(incident_row)
            .collect())
    }

    /// One incident with its alerts and each one's delivery attempts.
    pub async fn incident(
        &self,
        id: i64,
    ) -> Result<Option<(IncidentRow, Vec<AlertRow>)>, StoreError> {
        let client = self.pool.get().await?;
        let sql = format!("SELECT {INCIDENT_COLUMNS} FROM incidents i WHERE i.id = $1");
        let Some(inc) = client
            .query_opt(&sql, &[&id])
            .await?
            .map(|r| incident_row(&r))
        else {
            return Ok(None);
        };
        let sql =
            format!("SELECT {ALERT_COLUMNS} FROM alerts a WHERE a.incident_id = $1 ORDER BY a.id");
        let mut alerts: Vec<AlertRow> = client
            .query(&sql, &[&id])
            .await?
            .iter()
            .map(alert_row)
            .collect();
        let attempts = client
            .query(
                "SELECT t.alert_id, t.at, t.ok, t.http_status, t.error FROM alert_attempts t
                 JOIN alerts a ON a.id = t.alert_id WHERE a.incident_id = $1 ORDER BY t.id",
                &[&id],
            )
            .await?;
        for r in &attempts {
            let alert_id: i64 = r.get(0);
            if let Some(a) = alerts.iter_mut().find(|a| a.id == alert_id) {
                a.history.push(AttemptRow {
                    at: r.get(1),
                    ok: r.get(2),
                    http_status: r.get(3),
                    error: r.get(4),
                });
            }
        }
        Ok(Some((inc, alerts)))
    }

    /// Acknowledges an incident (no reminders afterwards); `None` if there is no such incident.
    pub async fn ack_incident(&self, id: i64, by: &str) -> Result<Option<IncidentRow>, StoreError> {
        let client = self.pool.get().await?;
        let n = client
            .execute(
                "UPDATE incidents SET acknowledged_at = COALESCE(acknowledged_at, now()),
                                      acknowledged_by = COALESCE(acknowledged_by, $2)
                 WHERE id = $1",
                &[&id, &by],
            )
            .await?;
        drop(client);
        if n == 0 {
            return Ok(None);
        }
        Ok(self.incident(id).await?.map(|(i, _)| i))
    }
}
