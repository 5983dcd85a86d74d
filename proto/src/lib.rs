//! Vigil wire protocol `vigil.v1`: the generated tonic/prost types and small helpers around them.
//! Only this crate defines protobuf types; other crates convert at their edges.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("vigil.v1");
}

pub use v1::*;

pub mod sanitize;

/// Largest message either side accepts on the agent stream (bytes).
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

impl From<vigil_checks::Status> for v1::Status {
    fn from(s: vigil_checks::Status) -> Self {
        match s {
            vigil_checks::Status::Ok => v1::Status::Ok,
            vigil_checks::Status::Warning => v1::Status::Warning,
            vigil_checks::Status::Critical => v1::Status::Critical,
            vigil_checks::Status::Unknown => v1::Status::Unknown,
        }
    }
}

/// Converts a wire status (an `i32` in prost) to the domain status; an unspecified or unknown
/// value becomes UNKNOWN, never an error: a result is never dropped for its status.
pub fn status_from_wire(code: i32) -> vigil_checks::Status {
    match v1::Status::try_from(code) {
        Ok(v1::Status::Ok) => vigil_checks::Status::Ok,
        Ok(v1::Status::Warning) => vigil_checks::Status::Warning,
        Ok(v1::Status::Critical) => vigil_checks::Status::Critical,
        _ => vigil_checks::Status::Unknown,
    }
}

impl From<vigil_checks::Metric> for v1::Metric {
    fn from(m: vigil_checks::Metric) -> Self {
        v1::Metric {
            label: m.label,
            value: m.value,
            unit: m.unit,
            warn: m.warn,
            crit: m.crit,
            min: m.min,
            max: m.max,
        }
    }
}

impl From<v1::Metric> for vigil_checks::Metric {
    fn from(m: v1::Metric) -> Self {
        vigil_checks::Metric {
            label: m.label,
            value: m.value,
            unit: m.unit,
            warn: m.warn,
            crit: m.crit,
            min: m.min,
            max: m.max,
        }
    }
}
