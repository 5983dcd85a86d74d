//! Runtime health-check settings: the API's shape of them (`interval_minutes`,
//! `max_error_count`, `retry_after_hours`), their validation, and putting them in force.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::HealthSettings;
use crate::grpc::Hub;
use crate::store::{Store, StoreError};

/// The `settings` key they are kept under.
pub const KEY: &str = "health_check";

/// The settings stored by an earlier `PUT` (`None`: never changed through the API).
pub async fn stored(store: &Store) -> Result<Option<HealthSettings>, StoreError> {
    let Some(row) = store.setting(KEY).await? else {
        return Ok(None);
    };
    match serde_json::from_value(row.value) {
        Ok(s) => Ok(Some(s)),
        Err(e) => {
            tracing::error!(error = %e, key = KEY, "stored settings are unreadable; using the config file's defaults");
            Ok(None)
        }
    }
}

/// Global defaults for every service that does not set its own.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthConfigBody {
    /// False suspends every scheduled check (check-now still runs).
    pub enabled: bool,
    /// Check interval in minutes (fractions allowed; 1/60 to 1440).
    pub interval_minutes: f64,
    /// Consecutive failures before a service counts as down (1 to 100).
    pub max_error_count: u32,
    /// After the restart budget is spent, retry after this many hours (fractions allowed;
    /// more than 0, at most 720).
    pub retry_after_hours: f64,
}

/// The settings in force and where they come from.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HealthConfigView {
    // The body's fields spelled out rather than flattened: the body refuses unknown fields, and a
    // flattened schema would carry that refusal into the view (`additionalProperties: false`).
    pub enabled: bool,
    pub interval_minutes: f64,
    pub max_error_count: u32,
    pub retry_after_hours: f64,
    /// `api` (changed at run time) or `config file` (collector.yaml's defaults).
    pub source: String,
    pub updated_at: Option<chrono::DateTime<chrono::Utc>>,
    pub updated_by: Option<String>,
}

/// A value out of range: the field and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub field: &'static str,
    pub reason: String,
}

impl HealthConfigBody {
    /// Validates and converts to the settings the collector applies.
    pub fn to_settings(&self) -> Result<HealthSettings, Invalid> {
        let bad = |field, reason: &str| Invalid {
            field,
            reason: reason.to_string(),
        };
        if !self.interval_minutes.is_finite()
            || self.interval_minutes * 60.0 < 1.0 - 1e-9
            || self.interval_minutes > 1440.0
        {
            return Err(bad(
                "interval_minutes",
                "must be between 1/60 (one second) and 1440 (a day)",
            ));
        }
        if !(1..=100).contains(&self.max_error_count) {
            return Err(bad("max_error_count", "must be between 1 and 100"));
        }
        if !self.retry_after_hours.is_finite()
            || self.retry_after_hours <= 0.0
            || self.retry_after_hours > 720.0
        {
            return Err(bad(
                "retry_after_hours",
                "must be more than 0 and at most 720 (30 days)",
            ));
        }
        Ok(HealthSettings {
            enabled: self.enabled,
            interval: Duration::from_secs_f64(self.interval_minutes * 60.0)
                .max(Duration::from_secs(1)),
            max_error_count: self.max_error_count,
            retry_after: Duration::from_secs_f64(self.retry_after_hours * 3600.0),
        })
    }

    pub fn from_settings(s: &HealthSettings) -> HealthConfigBody {
        HealthConfigBody {
            enabled: s.enabled,
            interval_minutes: s.interval.as_secs_f64() / 60.0,
            max_error_count: s.max_error_count,
            retry_after_hours: s.retry_after.as_secs_f64() / 3600.0,
        }
    }
}

/// What is in force now.
pub async fn view(hub: &Hub) -> Result<HealthConfigView, StoreError> {
    let cfg = hub.config().await;
    let row = hub.store.setting(KEY).await?;
    let values = match cfg.settings {
        Some(s) => HealthConfigBody::from_settings(&s),
        None => HealthConfigBody::from_settings(&HealthSettings {
            enabled: true,
            interval: vigil_checks::DEFAULT_INTERVAL,
            max_error_count: cfg.defaults.after,
            retry_after: cfg.defaults.retry_after,
        }),
    };
    Ok(HealthConfigView {
        enabled: values.enabled,
        interval_minutes: values.interval_minutes,
        max_error_count: values.max_error_count,
        retry_after_hours: values.retry_after_hours,
        source: if cfg.settings.is_some() {
            "api".into()
        } else {
            "config file".into()
        },
        updated_at: row.as_ref().map(|r| r.updated_at),
        updated_by: row.map(|r| r.updated_by),
    })
}

/// Stores new settings and puts them in force at once: every service without its own values
/// takes them, and every connected agent gets its new checks.
pub async fn update(hub: &Hub, settings: HealthSettings, by: &str) -> Result<(), StoreError> {
    let value = serde_json::to_value(settings).unwrap_or_default();
    hub.store.put_setting(KEY, &value, by).await?;
    let cfg = (*hub.config().await).clone().with_settings(Some(settings));
    hub.apply(cfg).await?;
    tracing::info!(
        by, enabled = settings.enabled, interval = ?settings.interval,
        max_error_count = settings.max_error_count, retry_after = ?settings.retry_after,
        "health-check settings changed"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(i: f64, m: u32, r: f64) -> HealthConfigBody {
        HealthConfigBody {
            enabled: true,
            interval_minutes: i,
            max_error_count: m,
            retry_after_hours: r,
        }
    }

    #[test]
    fn ranges_name_the_field() {
        assert_eq!(
            body(0.0, 3, 1.0).to_settings().unwrap_err().field,
            "interval_minutes"
        );
        assert_eq!(
            body(1441.0, 3, 1.0).to_settings().unwrap_err().field,
            "interval_minutes"
        );
        assert_eq!(
            body(f64::NAN, 3, 1.0).to_settings().unwrap_err().field,
            "interval_minutes"
        );
        assert_eq!(
            body(5.0, 0, 1.0).to_settings().unwrap_err().field,
            "max_error_count"
        );
        assert_eq!(
            body(5.0, 101, 1.0).to_settings().unwrap_err().field,
            "max_error_count"
        );
        assert_eq!(
            body(5.0, 3, 0.0).to_settings().unwrap_err().field,
            "retry_after_hours"
        );
        assert_eq!(
            body(5.0, 3, 721.0).to_settings().unwrap_err().field,
            "retry_after_hours"
        );
        let s = body(0.5, 4, 2.0).to_settings().unwrap();
        assert_eq!(s.interval, Duration::from_secs(30));
        assert_eq!(s.max_error_count, 4);
        assert_eq!(s.retry_after, Duration::from_secs(7200));
        let back = HealthConfigBody::from_settings(&s);
        assert_eq!(back.interval_minutes, 0.5);
        assert_eq!(back.retry_after_hours, 2.0);
    }
}
