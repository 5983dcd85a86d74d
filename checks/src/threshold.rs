//! Shared helpers for checks that compare readings against warning/critical thresholds: the
//! comparison, the worst of several statuses, and spec validation of a threshold pair.

use crate::{Metric, SpecError, Status};

/// How bad a status is when several readings are combined into one result:
/// OK < WARNING < UNKNOWN < CRITICAL (UNKNOWN counts as a failure, WARNING as up).
pub(crate) fn severity(s: Status) -> u8 {
    match s {
        Status::Ok => 0,
        Status::Warning => 1,
        Status::Unknown => 2,
        Status::Critical => 3,
    }
}

/// The worse of two statuses (see [`severity`]).
pub(crate) fn worst(a: Status, b: Status) -> Status {
    if severity(b) > severity(a) { b } else { a }
}

/// CRITICAL when `value > critical`, else WARNING when `value > warning`, else OK (the Nagios
/// meaning of a plain range `N`: alert above N).
pub(crate) fn above(value: f64, warning: Option<f64>, critical: Option<f64>) -> Status {
    if critical.is_some_and(|c| value > c) {
        Status::Critical
    } else if warning.is_some_and(|w| value > w) {
        Status::Warning
    } else {
        Status::Ok
    }
}

/// A metric carrying its thresholds as Nagios ranges (`80` = alert above 80).
pub(crate) fn metric(
    label: impl Into<String>,
    value: f64,
    unit: &str,
    warning: Option<f64>,
    critical: Option<f64>,
) -> Metric {
    let mut m = Metric::new(label, value, unit);
    m.warn = warning.map(|w| w.to_string()).unwrap_or_default();
    m.crit = critical.map(|c| c.to_string()).unwrap_or_default();
    m
}

pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// Validates a pair: both finite, at least 0, at most `max` (if given), warning <= critical.
pub(crate) fn validate_pair(
    field: &str,
    warning: f64,
    critical: f64,
    max: Option<f64>,
) -> Result<(), SpecError> {
    for (name, v) in [("warning", warning), ("critical", critical)] {
        if !v.is_finite() || v < 0.0 {
            return Err(invalid(field, format!("{name} {v} must be a number >= 0")));
        }
        if let Some(m) = max
            && v > m
        {
            return Err(invalid(field, format!("{name} {v} must be at most {m}")));
        }
    }
    if warning > critical {
        return Err(invalid(
            field,
            format!("warning {warning} is above critical {critical}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn above_and_worst() {
        assert_eq!(above(5.0, Some(5.0), Some(10.0)), Status::Ok);
        assert_eq!(above(5.1, Some(5.0), Some(10.0)), Status::Warning);
        assert_eq!(above(10.1, Some(5.0), Some(10.0)), Status::Critical);
        assert_eq!(above(100.0, None, None), Status::Ok);
        assert_eq!(worst(Status::Ok, Status::Warning), Status::Warning);
        assert_eq!(worst(Status::Unknown, Status::Warning), Status::Unknown);
        assert_eq!(worst(Status::Critical, Status::Unknown), Status::Critical);
        assert!(validate_pair("x", 80.0, 90.0, Some(100.0)).is_ok());
        assert!(validate_pair("x", 95.0, 90.0, Some(100.0)).is_err());
        assert!(validate_pair("x", 80.0, 190.0, Some(100.0)).is_err());
        assert!(validate_pair("x", -1.0, 1.0, None).is_err());
        assert!(validate_pair("x", f64::NAN, 1.0, None).is_err());
    }
}
