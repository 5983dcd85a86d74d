//! The history worker: keeps day partitions of `check_results` ahead of time, applies the
//! retention settings (whole partitions for raw results), and writes the time each service
//! spent in each state once an hour is over. The figures of results are merged into the
//! roll-ups by ingest itself (store/history.rs, rollup.rs).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::grpc::Hub;
use crate::store::{DAYS_AHEAD, StoreError, hour_of};

/// How often the worker runs (it also runs at start-up).
pub const EVERY: Duration = Duration::from_secs(60);
/// Hours of time-in-state written per pass at most (a collector that was away catches up over
/// a few passes instead of holding a connection for long).
const HOURS_PER_PASS: usize = 48;

/// Starts the worker; it stops with the hub.
pub fn start(hub: Arc<Hub>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = hub.shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            let retention = hub.config().await.retention;
            if let Err(e) = pass(&hub.store, retention, Utc::now()).await {
                tracing::warn!(error = %e, "history pass failed; trying again in a minute");
            }
        }
    });
}

/// One pass at `now`: partitions from the oldest day still kept to `DAYS_AHEAD` days ahead,
/// retention, and the time in state of every hour over since the last pass.
pub async fn pass(
    store: &crate::store::Store,
    retention: crate::config::Retention,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let raw_cutoff = now - chrono::Duration::from_std(retention.raw).unwrap_or_default();
    let created = store
        .ensure_partitions(
            raw_cutoff.date_naive(),
            now.date_naive() + chrono::Duration::days(DAYS_AHEAD),
        )
        .await?;
    if !created.is_empty() {
        tracing::debug!(days = created.len(), "day partitions created");
    }
    let purged = store
        .purge_history(
            raw_cutoff,
            now - chrono::Duration::from_std(retention.hourly).unwrap_or_default(),
            now - chrono::Duration::from_std(retention.daily).unwrap_or_default(),
        )
        .await?;
    if purged.stragglers > 0 || purged.hourly > 0 || purged.daily > 0 {
        tracing::info!(
            partitions = purged.partitions.len(),
            stragglers = purged.stragglers,
            hourly = purged.hourly,
            daily = purged.daily,
            "history past retention removed"
        );
    }
    let mut next = store.states_done().await?.unwrap_or_else(|| hour_of(now));
    for _ in 0..HOURS_PER_PASS {
        if next + chrono::Duration::hours(1) > now {
            break;
        }
        store.roll_up_states(next).await?;
        next += chrono::Duration::hours(1);
    }
    Ok(())
}
