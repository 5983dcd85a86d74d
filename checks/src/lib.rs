//! Vigil check library: check specs (serde, from the operator's YAML) and the runners that execute
//! one check and return an [`Outcome`]. It knows nothing of gRPC or SQL.
//!
//! Adding a check kind: write a module with its spec struct and `run` function, add one variant to
//! [`CheckKind`] and one arm to [`registry`]. See ARCHITECTURE.md, "Add a check kind".

#![forbid(unsafe_code)]

pub mod command;
pub mod docker;
pub mod gpu;
pub mod grpc;
pub mod http;
pub mod inventory;
pub mod perfdata;
pub mod presets;
pub mod process;
pub mod registry;
pub mod system;
pub mod systemd;
pub mod tcp;
mod threshold;
pub mod tls;
pub mod web;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use perfdata::Metric;
pub use registry::{CheckKind, KINDS};

/// Result status, in the Nagios plugin convention (exit codes 0..=3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warning,
    Critical,
    Unknown,
}

impl Status {
    /// Maps a plugin exit code: 0 OK, 1 WARNING, 2 CRITICAL, anything else UNKNOWN.
    pub fn from_exit_code(code: i32) -> Self {
        match code {
            0 => Status::Ok,
            1 => Status::Warning,
            2 => Status::Critical,
            _ => Status::Unknown,
        }
    }

    /// Whether the service counts as up (OK or WARNING) for thresholds.
    pub fn is_up(self) -> bool {
        matches!(self, Status::Ok | Status::Warning)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warning => "warning",
            Status::Critical => "critical",
            Status::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one run of a check found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub status: Status,
    /// One line for a human ("HTTP 200 in 35 ms", "connection refused").
    pub message: String,
    pub metrics: Vec<Metric>,
    /// Bounded excerpt of the raw output (response body, program output); may be empty.
    pub output: String,
    /// Wall time the check took.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Exit code of the program the check ran (`command` checks), if it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

impl Outcome {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Outcome {
            status,
            message: message.into(),
            metrics: Vec::new(),
            output: String::new(),
            duration: Duration::ZERO,
            exit_code: None,
        }
    }
}

/// Bytes of a file a check refers to (a multipart upload), keyed by the path written in the spec.
/// The collector reads them from its config directory and ships them with the config, so the
/// agent needs no copy on its disk. A path missing here is read from the local disk.
pub type Attachments = Arc<HashMap<String, Vec<u8>>>;

/// Largest output excerpt kept in an [`Outcome`] (bytes).
pub const MAX_OUTPUT_BYTES: usize = 4096;

/// How often a check runs when its spec does not say.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

fn default_interval() -> Duration {
    DEFAULT_INTERVAL
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// A check as written under `check:` in a service file.
///
/// Unknown keys are rejected by the kind's own struct (each has `deny_unknown_fields`): serde
/// does not support `deny_unknown_fields` together with `flatten` here (it would reject every
/// field of the kind), so this struct must not carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckSpec {
    /// How often the check runs (default 30s). Each run is jittered by up to 10 %.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Hard limit on one run (default 10s); a run past it is CRITICAL ("timed out").
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// The kind and its fields (`type: http`, ...).
    #[serde(flatten)]
    pub kind: CheckKind,
}

/// Errors in a check spec found before running it.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

impl CheckSpec {
    /// Checks what serde cannot: regexes compile, JSON paths parse, numbers are in range.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.interval < Duration::from_secs(1) {
            return Err(SpecError::Invalid {
                field: "interval".into(),
                reason: "must be at least 1s".into(),
            });
        }
        if self.timeout.is_zero() {
            return Err(SpecError::Invalid {
                field: "timeout".into(),
                reason: "must be more than 0s".into(),
            });
        }
        self.kind.validate()
    }

    /// Paths of local files the check needs (multipart uploads), as written in the spec.
    pub fn attachments(&self) -> Vec<String> {
        self.kind.attachments()
    }

    /// Runs the check once, never longer than `timeout` (plus a small grace for clean-up), and
    /// never panics: every failure becomes an [`Outcome`].
    pub async fn run(&self, files: &Attachments) -> Outcome {
        let start = std::time::Instant::now();
        let mut outcome =
            match tokio::time::timeout(self.timeout, self.kind.run(self.timeout, files)).await {
                Ok(o) => o,
                Err(_) => Outcome::new(
                    Status::Critical,
                    format!(
                        "timed out after {}",
                        humantime::format_duration(self.timeout)
                    ),
                ),
            };
        outcome.duration = start.elapsed();
        outcome
    }
}

/// Time a runner keeps back from the check timeout to stop its work and report the reason itself,
/// before [`CheckSpec::run`]'s outer timeout fires and reports a bare "timed out".
pub(crate) fn grace(timeout: Duration) -> Duration {
    (timeout / 10).min(Duration::from_millis(500))
}

/// The part of the check timeout a runner's own work may use (see [`grace`]).
pub(crate) fn internal_deadline(timeout: Duration) -> Duration {
    timeout.saturating_sub(grace(timeout))
}

/// Cuts `s` to at most `max` bytes on a char boundary, marking the cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[truncated]", &s[..end])
}

/// Like [`truncate`], and also replaces NUL characters (binary output) with U+FFFD, so the
/// excerpt can be stored as text anywhere (PostgreSQL `text` rejects NUL).
pub fn excerpt(s: &str, max: usize) -> String {
    let cut = truncate(s, max);
    if cut.contains('\0') {
        truncate(&cut.replace('\0', "\u{FFFD}"), max)
    } else {
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_and_excerpt() {
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("abcd", 3), "abc…[truncated]");
        // Never splits a character.
        assert_eq!(truncate("aé", 2), "a…[truncated]");
        assert_eq!(excerpt("a\0b", 10), "a\u{FFFD}b");
        let binary = "\0".repeat(100);
        let e = excerpt(&binary, 10);
        assert!(!e.contains('\0'));
        assert!(e.len() <= 10 + "…[truncated]".len(), "{e:?}");
    }

    #[test]
    fn spec_defaults_and_unknown_fields() {
        let spec: CheckSpec =
            serde_json::from_value(serde_json::json!({"type": "tcp", "address": "db:5432"}))
                .unwrap();
        assert_eq!(spec.interval, Duration::from_secs(30));
        assert_eq!(spec.timeout, Duration::from_secs(10));
        spec.validate().unwrap();
        for bad in [
            serde_json::json!({"type": "tcp", "address": "db:5432", "intervall": "5s"}),
            serde_json::json!({"type": "tcp", "address": "db:5432", "port": 1}),
            serde_json::json!({"type": "nope", "address": "db:5432"}),
            serde_json::json!({"address": "db:5432"}),
        ] {
            assert!(
                serde_json::from_value::<CheckSpec>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }
}
