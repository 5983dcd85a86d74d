//! Queries behind availability (API, uptime bars, `vigil-collector report`): the services of a
//! scope, and for each the last transition of every kind before a window plus those inside it,
//! both index ranges of `events_service_kind_time` (V20).

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::{Store, StoreError};
use crate::availability::{Change, Condition, EVENT_KINDS};

/// Which services a figure is about.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// One service (configured now or not).
    Service(&'a str),
    /// The configured services of a node.
    Node(&'a str),
    /// The configured services of a category.
    Category(&'a str),
    /// Every configured service.
    All,
}

/// A service and what its events say about a window: its condition at the window's start and
/// the changes inside it, oldest first.
#[derive(Debug, Clone)]
pub struct ServiceHistory {
    pub service_id: String,
    pub name: String,
    pub node: String,
    pub category: String,
    pub initial: Condition,
    pub changes: Vec<(DateTime<Utc>, Change)>,
}

impl Store {
    /// The services of `scope` (ordered by node, then id) with their history over
    /// `[from, to)`: two index-range reads of `events` for all of them in one statement.
    pub async fn availability_histories(
        &self,
        scope: Scope<'_>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<ServiceHistory>, StoreError> {
        let client = self.pool.get().await?;
        let (sql, key) = match scope {
            Scope::Service(id) => ("id = $1", id),
            Scope::Node(n) => ("active AND node = $1", n),
            Scope::Category(c) => ("active AND category = $1", c),
            Scope::All => ("active AND $1 = ''", ""),
        };
        let rows = client
            .query(
                &format!(
                    "SELECT id, name, node, category FROM services WHERE {sql} ORDER BY node, id"
                ),
                &[&key],
            )
            .await?;
        let mut out: Vec<ServiceHistory> = rows
            .iter()
            .map(|r| ServiceHistory {
                service_id: r.get(0),
                name: r.get(1),
                node: r.get(2),
                category: r.get(3),
                initial: Condition::default(),
                changes: Vec::new(),
            })
            .collect();
        if out.is_empty() {
            return Ok(out);
        }
        let ids: Vec<&str> = out.iter().map(|s| s.service_id.as_str()).collect();
        let kinds: Vec<&str> = EVENT_KINDS.to_vec();
        let st = client
            .prepare_cached(
                "SELECT p.service_id, p.at, p.id, p.kind, p.to_state, true AS before
                 FROM unnest($1::text[]) AS s(service_id)
                 CROSS JOIN unnest($4::text[]) AS k(kind)
                 CROSS JOIN LATERAL (
                     SELECT e.service_id, e.at, e.id, e.kind, e.to_state FROM events e
                     WHERE e.service_id = s.service_id AND e.kind = k.kind AND e.at < $2
                     ORDER BY e.at DESC, e.id DESC LIMIT 1) p
                 UNION ALL
                 SELECT e.service_id, e.at, e.id, e.kind, e.to_state, false FROM events e
                 WHERE e.service_id = ANY($1::text[]) AND e.kind = ANY($4::text[])
                   AND e.at >= $2 AND e.at < $3
                 ORDER BY 1, 6 DESC, 2, 3",
            )
            .await?;
        let rows = client.query(&st, &[&ids, &from, &to, &kinds]).await?;
        let index: HashMap<String, usize> = out
            .iter()
            .enumerate()
            .map(|(i, s)| (s.service_id.clone(), i))
            .collect();
        for r in rows {
            let id: String = r.get(0);
            let Some(&i) = index.get(&id) else { continue };
            let kind: String = r.get(3);
            let to_state: String = r.get(4);
            let Some(change) = Change::from_event(&kind, &to_state) else {
                continue;
            };
            let s = &mut out[i];
            if r.get::<_, bool>(5) {
                s.initial.apply(&change);
            } else {
                s.changes.push((r.get(1), change));
            }
        }
        Ok(out)
    }

    /// Whether a category has a configured service (for 404).
    pub async fn category_exists(&self, category: &str) -> Result<bool, StoreError> {
        let client = self.pool.get().await?;
        Ok(client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM services WHERE active AND category = $1)",
                &[&category],
            )
            .await?
            .get(0))
    }
}
