//! Liveness in the database: when each node's agent was last heard from, which nodes are down,
//! which services are stale, agent backlogs and their alerts, node events. Every decision is one
//! set-based statement, so that it costs the same at 10 services and at 10,000 and so that two
//! collectors on one database can never both take it.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::{Store, StoreError};

/// A node that went down or came back in this pass.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeChange {
    pub node: String,
    /// Why it is down (for a node that came back: why it had been down).
    pub reason: String,
    /// Since when it had been down (for a node that came back).
    pub down_since: Option<DateTime<Utc>>,
}

/// A service that became stale in this pass.
#[derive(Debug, Clone, PartialEq)]
pub struct StaleChange {
    pub service_id: String,
    pub node: String,
    pub reason: String,
    /// `on_stale: alert`, the service is active (not stopped or paused) and its node is not
    /// down (the node's own alert speaks for its services).
    pub alert: bool,
}

/// A backlog incident opened or closed in this pass.
#[derive(Debug, Clone, PartialEq)]
pub struct BacklogChange {
    pub node: String,
    pub opened: bool,
    pub reason: String,
}

/// What an agent said about its outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxStatus {
    pub depth: u64,
    pub oldest_age_ms: u64,
    pub dropped_total: u64,
    pub dropped_through_seq: u64,
}

/// One thing that happened to a node.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NodeEventRow {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// down | up | gap | dropped | refused | backlog | backlog_cleared | agent_heal |
    /// maintenance
    pub kind: String,
    pub reason: String,
    /// Results concerned (gap, dropped, refused), else 0.
    pub count: i64,
}

/// The `commands.service_id` of a node's agent restarts (service ids cannot contain ':', so it
/// never names a service; one restart in flight per node).
pub fn agent_command_key(node: &str) -> String {
    format!("agent:{node}")
}

fn i64_of(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// Formats a timestamp column as `YYYY-MM-DD HH:MM:SS UTC` in SQL.
macro_rules! utc {
    ($col:literal) => {
        concat!(
            "to_char(",
            $col,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"')"
        )
    };
}

impl Store {
    /// The agent of `node` was heard from now.
    pub async fn touch_node(&self, node: &str) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        let st = client
            .prepare_cached("UPDATE nodes SET last_seen = now() WHERE name = $1")
            .await?;
        client.execute(&st, &[&node]).await?;
        Ok(())
    }

    /// Records what `node`'s agent says about outbox `epoch` (and that it was heard from now).
    /// The dropped seqs are stored with the outbox's progress, so that a gap the agent made on
    /// purpose is told from a loss.
    pub async fn outbox_status(
        &self,
        node: &str,
        epoch: u64,
        s: &OutboxStatus,
    ) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        let nodes = client
            .prepare_cached(
                "UPDATE nodes SET last_seen = now(), backlog_results = $2::int8,
                   backlog_oldest_at = CASE WHEN $2::int8 > 0
                                            THEN now() - $3::float8 * interval '1 millisecond' END,
                   backlog_status_at = now()
                 WHERE name = $1",
            )
            .await?;
        // The drops first: they decide how the next batch's gaps are told.
        if s.dropped_through_seq > 0 {
            let progress = client
                .prepare_cached(
                    "INSERT INTO outbox_progress (node, outbox_epoch, stored_seq, dropped_through_seq)
                     VALUES ($1, $2, 0, $3)
                     ON CONFLICT (node, outbox_epoch) DO UPDATE
                     SET dropped_through_seq = GREATEST(outbox_progress.dropped_through_seq, $3)",
                )
                .await?;
            client
                .execute(
                    &progress,
                    &[&node, &(epoch as i64), &i64_of(s.dropped_through_seq)],
                )
                .await?;
        }
        let (depth, age) = (i64_of(s.depth), i64_of(s.oldest_age_ms) as f64);
        client.execute(&nodes, &[&node, &depth, &age]).await?;
        Ok(())
    }

    /// A Hello for outbox `epoch` whose first seq is `start_seq`: a new outbox's progress starts
    /// just below it, so that its first result is expected at `start_seq`.
    pub async fn outbox_opened(
        &self,
        node: &str,
        epoch: u64,
        start_seq: u64,
    ) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO outbox_progress (node, outbox_epoch, stored_seq) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                &[
                    &node,
                    &(epoch as i64),
                    &i64_of(start_seq.max(1).saturating_sub(1)),
                ],
            )
            .await?;
        Ok(())
    }

    /// Records results of `node` the collector refused (not stored, acknowledged), one event
    /// per reason.
    pub async fn refused(&self, node: &str, reasons: &[String]) -> Result<(), StoreError> {
        if reasons.is_empty() {
            return Ok(());
        }
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO node_events (node, kind, reason, count)
             SELECT $1, 'refused', r, 1 FROM UNNEST($2::text[]) AS r",
            &[&node, &reasons],
        )
        .await?;
        tx.execute(
            "UPDATE nodes SET results_refused = results_refused + $2 WHERE name = $1",
            &[&node, &(reasons.len() as i64)],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks down every node with an agent that was silent longer than its timeout, counting
    /// silence from `watching_since` at the earliest (the collector's start: a collector that was
    /// away itself heard nothing). Returns the nodes that went down now.
    pub async fn mark_nodes_down(
        &self,
        watching_since: DateTime<Utc>,
    ) -> Result<Vec<NodeChange>, StoreError> {
        let client = self.pool.get().await?;
        let st = client
            .prepare_cached(concat!(
                "WITH due AS (
                   SELECT name FROM nodes
                   WHERE active AND has_agent AND down_since IS NULL
                     AND GREATEST(COALESCE(last_seen, added_at), $1)
                         < now() - timeout_ms * interval '1 millisecond'
                   FOR UPDATE SKIP LOCKED
                 ), down AS (
                   UPDATE nodes n SET down_since = now(), down_reason = CASE
                     WHEN n.last_seen IS NULL THEN 'its agent never connected'
                     WHEN n.agent_connected THEN format(
                       'its agent is connected but silent for %s s (frozen or hung?); last heard at %s',
                       floor(extract(epoch FROM now() - n.last_seen))::bigint, ",
                utc!("n.last_seen"),
                ")
                     ELSE format('its agent disconnected at %s', ",
                utc!("COALESCE(n.disconnected_at, n.last_seen)"),
                ")
                   END
                   FROM due WHERE n.name = due.name
                   RETURNING n.name, n.down_reason
                 ), ev AS (
                   INSERT INTO node_events (node, kind, reason) SELECT name, 'down', down_reason FROM down
                 )
                 SELECT name, down_reason FROM down ORDER BY name"
            ))
            .await?;
        let rows = client.query(&st, &[&watching_since]).await?;
        Ok(rows
            .iter()
            .map(|r| NodeChange {
                node: r.get(0),
                reason: r.get(1),
                down_since: None,
            })
            .collect())
    }

    /// Ends the down state of every node whose agent was heard from within its timeout (or that
    /// no longer has an agent or is no longer configured). Returns the nodes that came back.
    pub async fn mark_nodes_up(&self) -> Result<Vec<NodeChange>, StoreError> {
        let client = self.pool.get().await?;
        let st = client
            .prepare_cached(
                "WITH due AS (
                   SELECT name, down_since, down_reason FROM nodes
                   WHERE down_since IS NOT NULL
                     AND (NOT active OR NOT has_agent
                          OR last_seen >= now() - timeout_ms * interval '1 millisecond')
                   FOR UPDATE SKIP LOCKED
                 ), up AS (
                   UPDATE nodes n SET down_since = NULL, down_reason = NULL
                   FROM due WHERE n.name = due.name
                   RETURNING n.name, due.down_since, due.down_reason
                 ), ev AS (
                   INSERT INTO node_events (node, kind, reason)
                   SELECT name, 'up', format('back after %s s down (%s)',
                          floor(extract(epoch FROM now() - down_since))::bigint, down_reason)
                   FROM up
                 )
                 SELECT name, down_reason, down_since FROM up ORDER BY name",
            )
            .await?;
        let rows = client.query(&st, &[]).await?;
        Ok(rows
            .iter()
            .map(|r| NodeChange {
                node: r.get(0),
                reason: r.get(1),
                down_since: r.get(2),
            })
            .collect())
    }

    /// Marks stale every active service whose newest result is older than its `stale_after_ms`
    /// (counted from `watching_since` at the earliest, and for a service without any result from
    /// when it was added) or whose node is down; one `stale` event
    /// each. One statement for all services. Returns the services that became stale now.
    pub async fn mark_stale(
        &self,
        watching_since: DateTime<Utc>,
    ) -> Result<Vec<StaleChange>, StoreError> {
        let client = self.pool.get().await?;
        let st = client
            .prepare_cached(
                "WITH due AS (
                   SELECT st.service_id, st.state, st.mode, st.last_result_at, s.node, s.on_stale,
                          n.has_agent, n.agent_connected, n.down_since, n.down_reason
                   FROM service_state st
                   JOIN services s ON s.id = st.service_id
                   LEFT JOIN nodes n ON n.name = s.node
                   WHERE s.active AND st.stale_since IS NULL AND s.stale_after_ms > 0
                     AND (n.down_since IS NOT NULL
                          OR GREATEST(COALESCE(st.last_result_at, st.state_since), $1)
                             < now() - s.stale_after_ms * interval '1 millisecond')
                   FOR UPDATE OF st SKIP LOCKED
                 ), marked AS (
                   UPDATE service_state st SET stale_since = now(), stale_reason =
                     CASE WHEN due.last_result_at IS NULL THEN 'no result yet'
                          ELSE format('no result for %s s',
                                      floor(extract(epoch FROM now() - due.last_result_at))::bigint)
                     END ||
                     CASE WHEN NOT COALESCE(due.has_agent, true)
                            THEN '; the collector checks this node itself (agentless)'
                          WHEN due.down_since IS NOT NULL
                            THEN format('; node %s is down: %s', due.node, due.down_reason)
                          WHEN due.agent_connected
                            THEN format('; the agent of %s is connected but this result is not arriving', due.node)
                          ELSE format('; the agent of %s is disconnected', due.node)
                     END
                   FROM due WHERE st.service_id = due.service_id
                   RETURNING st.service_id, due.node, st.stale_reason, due.state,
                             (due.on_stale = 'alert' AND due.mode = 'active' AND due.down_since IS NULL)
                               AS alert
                 ), ev AS (
                   INSERT INTO events (service_id, kind, from_state, to_state, reason)
                   SELECT service_id, 'stale', state, 'stale', stale_reason FROM marked
                 )
                 SELECT service_id, node, stale_reason, alert FROM marked ORDER BY service_id",
            )
            .await?;
        let rows = client.query(&st, &[&watching_since]).await?;
        Ok(rows
            .iter()
            .map(|r| StaleChange {
                service_id: r.get(0),
                node: r.get(1),
                reason: r.get(2),
                alert: r.get(3),
            })
            .collect())
    }

    /// Opens a backlog incident for every connected node whose oldest unacknowledged result is
    /// older than `threshold`, and closes those whose backlog is gone or young again.
    pub async fn backlog_pass(
        &self,
        threshold: std::time::Duration,
    ) -> Result<Vec<BacklogChange>, StoreError> {
        let client = self.pool.get().await?;
        let ms = threshold.as_millis().min(i64::MAX as u128) as f64;
        let st = client
            .prepare_cached(
                "WITH opened AS (
                   UPDATE nodes SET backlog_alert_since = now()
                   WHERE active AND has_agent AND backlog_alert_since IS NULL AND down_since IS NULL
                     AND backlog_results > 0
                     AND backlog_oldest_at < now() - $1 * interval '1 millisecond'
                   RETURNING name, format('%s result(s) waiting on the node, the oldest for %s s',
                       backlog_results, floor(extract(epoch FROM now() - backlog_oldest_at))::bigint)
                       AS reason
                 ), closed AS (
                   UPDATE nodes SET backlog_alert_since = NULL
                   WHERE backlog_alert_since IS NOT NULL
                     AND (NOT active OR COALESCE(backlog_results, 0) = 0
                          OR backlog_oldest_at >= now() - $1 * interval '1 millisecond')
                   RETURNING name, format('backlog down to %s result(s)', COALESCE(backlog_results, 0))
                       AS reason
                 ), ev AS (
                   INSERT INTO node_events (node, kind, reason)
                   SELECT name, 'backlog', reason FROM opened
                   UNION ALL SELECT name, 'backlog_cleared', reason FROM closed
                 )
                 SELECT name, true, reason FROM opened
                 UNION ALL SELECT name, false, reason FROM closed",
            )
            .await?;
        let rows = client.query(&st, &[&ms]).await?;
        Ok(rows
            .iter()
            .map(|r| BacklogChange {
                node: r.get(0),
                opened: r.get(1),
                reason: r.get(2),
            })
            .collect())
    }

    /// The latest `per_node` events of every node, newest first, in one query.
    pub async fn recent_node_events(
        &self,
        per_node: i64,
    ) -> Result<std::collections::HashMap<String, Vec<NodeEventRow>>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT n.name, e.id, e.at, e.kind, e.reason, e.count FROM nodes n
                 CROSS JOIN LATERAL (
                   SELECT id, at, kind, reason, count FROM node_events
                   WHERE node = n.name ORDER BY id DESC LIMIT $1
                 ) e
                 ORDER BY n.name, e.id DESC",
                &[&per_node],
            )
            .await?;
        let mut out: std::collections::HashMap<String, Vec<NodeEventRow>> = Default::default();
        for r in &rows {
            out.entry(r.get(0)).or_default().push(NodeEventRow {
                id: r.get(1),
                at: r.get(2),
                kind: r.get(3),
                reason: r.get(4),
                count: r.get(5),
            });
        }
        Ok(out)
    }

    /// Opens a `restart-agent` command for `node` (origin `auto`, already claimed for SSH by the
    /// caller) unless one is in flight or `max` were created within `within`. Returns its id, or
    /// the reason it was not opened.
    pub async fn open_agent_restart(
        &self,
        node: &str,
        reason: &str,
        deadline: DateTime<Utc>,
        max: u32,
        within: std::time::Duration,
    ) -> Result<Result<i64, String>, StoreError> {
        let client = self.pool.get().await?;
        let within_ms = within.as_millis().min(i64::MAX as u128) as f64;
        let used: i64 = client
            .query_one(
                "SELECT count(*) FROM commands WHERE node = $1 AND action = 'restart-agent'
                 AND created_at > now() - $2 * interval '1 millisecond'",
                &[&node, &within_ms],
            )
            .await?
            .get(0);
        if used >= i64::from(max) {
            return Ok(Err(format!(
                "restart budget spent: {used} agent restart(s) within {}",
                humantime::format_duration(within)
            )));
        }
        let row = client
            .query_opt(
                "INSERT INTO commands (service_id, node, action, origin, requested_by, reason,
                                       deadline, status, via, sent_at)
                 VALUES ($1, $2, 'restart-agent', 'auto', 'vigil', $3, $4, 'sent', 'ssh', now())
                 ON CONFLICT (service_id) WHERE status IN ('pending', 'sent') AND action <> 'check'
                 DO NOTHING RETURNING id",
                &[&agent_command_key(node), &node, &reason, &deadline],
            )
            .await?;
        Ok(match row {
            Some(r) => Ok(r.get(0)),
            None => Err("an agent restart is already in flight".into()),
        })
    }

    /// Nodes down since before `retry` ago whose agent was not checked over SSH within `retry`
    /// (the first check runs when the node goes down), and that are not in maintenance.
    pub async fn nodes_to_heal(
        &self,
        retry: &[(String, std::time::Duration)],
    ) -> Result<Vec<String>, StoreError> {
        if retry.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<&str> = retry.iter().map(|(n, _)| n.as_str()).collect();
        let ms: Vec<f64> = retry
            .iter()
            .map(|(_, d)| d.as_millis().min(i64::MAX as u128) as f64)
            .collect();
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT n.name FROM nodes n
                 JOIN UNNEST($1::text[], $2::float8[]) AS r(name, ms) ON r.name = n.name
                 WHERE n.down_since < now() - r.ms * interval '1 millisecond'
                   AND NOT COALESCE(n.maintenance_until > now(), false)
                   AND NOT EXISTS (SELECT 1 FROM node_events e
                                   WHERE e.node = n.name AND e.kind = 'agent_heal'
                                     AND e.at > now() - r.ms * interval '1 millisecond')",
                &[&names, &ms],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Records a node event.
    pub async fn add_node_event(
        &self,
        node: &str,
        kind: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO node_events (node, kind, reason) VALUES ($1, $2, $3)",
                &[&node, &kind, &reason],
            )
            .await?;
        Ok(())
    }
}
