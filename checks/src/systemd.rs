//! `systemd` check: a unit's state from `systemctl show --property=LoadState,ActiveState,
//! SubState,NRestarts UNIT` (an argument vector, with a deadline). `active` is OK,
//! `activating`/`reloading` WARNING, anything else (and a unit that does not exist) CRITICAL.
//! Without systemctl, or on a machine where systemd is not the init system (a container), the
//! result is UNKNOWN with the reason.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::threshold::invalid;
use crate::{Metric, Outcome, SpecError, Status, internal_deadline};

/// A systemd unit check, as written under `check:` with `type: systemd`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemdCheck {
    /// Unit name (`nginx.service`, `docker.socket`); without a suffix systemd assumes
    /// `.service`.
    pub unit: String,
    /// Restart count (`NRestarts`, since the unit was last started by hand) above which the
    /// result is WARNING. Default: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restarts: Option<u64>,
}

const SYSTEMCTL: &str = "systemctl";

/// The unit's properties as printed by `systemctl show` (`Key=value` lines).
pub(crate) fn parse_show(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

impl SystemdCheck {
    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        let u = &self.unit;
        if u.is_empty()
            || u.starts_with('-')
            || !u
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c))
        {
            return Err(invalid(
                "unit",
                format!("{u:?} is not a unit name (letters, digits, \":-_.\\@\")"),
            ));
        }
        Ok(())
    }

    pub(crate) async fn run(&self, timeout: Duration) -> Outcome {
        self.run_with(SYSTEMCTL, timeout).await
    }

    /// Runs with `program` as systemctl (tests point it at a missing program).
    pub(crate) async fn run_with(&self, program: &str, timeout: Duration) -> Outcome {
        let start = Instant::now();
        let mut cmd = tokio::process::Command::new(program);
        cmd.args([
            "show",
            "--property=LoadState,ActiveState,SubState,NRestarts",
            "--",
            &self.unit,
        ])
        .env("LC_ALL", "C")
        .env("SYSTEMD_PAGER", "")
        .stdin(Stdio::null())
        .kill_on_drop(true);
        let out = match tokio::time::timeout(internal_deadline(timeout), cmd.output()).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Outcome::new(
                    Status::Unknown,
                    format!("{program} not found: systemd is not installed here"),
                );
            }
            Ok(Err(e)) => {
                return Outcome::new(Status::Unknown, format!("cannot run {program}: {e}"));
            }
            Err(_) => {
                return Outcome::new(
                    Status::Unknown,
                    format!("{program} show {} timed out", self.unit),
                );
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut o = if out.status.success() {
            self.evaluate(&parse_show(&stdout))
        } else {
            let booted = Path::new("/run/systemd/system").exists();
            let detail = stderr.lines().next().unwrap_or("").trim().to_string();
            let reason = if booted {
                format!("{program} failed: {detail}")
            } else {
                format!("systemd is not running on this machine (not the init system): {detail}")
            };
            Outcome::new(Status::Unknown, reason)
        };
        o.output = crate::excerpt(&format!("{stdout}{stderr}"), crate::MAX_OUTPUT_BYTES);
        o.duration = start.elapsed();
        tracing::debug!(unit = %self.unit, status = %o.status, message = %o.message,
            "systemd check finished");
        o
    }

    /// Judges the properties (pure; tested on captured `systemctl show` output).
    pub(crate) fn evaluate(&self, props: &BTreeMap<String, String>) -> Outcome {
        let get = |k: &str| props.get(k).map_or("", String::as_str);
        let (load, active, sub) = (get("LoadState"), get("ActiveState"), get("SubState"));
        if active.is_empty() {
            return Outcome::new(
                Status::Unknown,
                format!("systemctl show {} printed no ActiveState", self.unit),
            );
        }
        let restarts: Option<u64> = get("NRestarts").parse().ok();
        let mut status = match active {
            "active" => Status::Ok,
            "activating" | "reloading" | "refreshing" => Status::Warning,
            _ => Status::Critical,
        };
        let mut message = format!("{} is {active} ({sub})", self.unit);
        if load == "not-found" {
            status = Status::Critical;
            message = format!("{} not found (LoadState=not-found)", self.unit);
        } else if load == "masked" {
            message.push_str(", masked");
        }
        if let Some(n) = restarts {
            message.push_str(&format!(", {n} restarts"));
            if let Some(max) = self.max_restarts
                && n > max
                && status == Status::Ok
            {
                status = Status::Warning;
                message.push_str(&format!(" (more than max_restarts {max})"));
            }
        }
        let mut metrics = vec![Metric::new(
            "active",
            if active == "active" { 1.0 } else { 0.0 },
            "",
        )];
        if let Some(n) = restarts {
            let mut m = Metric::new("restarts", n as f64, "c");
            if let Some(max) = self.max_restarts {
                m.warn = max.to_string();
            }
            metrics.push(m);
        }
        Outcome {
            status,
            message,
            metrics,
            output: String::new(),
            duration: Duration::ZERO,
            exit_code: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Attachments, CheckSpec};

    fn unit(name: &str) -> SystemdCheck {
        SystemdCheck {
            unit: name.into(),
            max_restarts: Some(2),
        }
    }

    /// Output captured from `systemctl show --property=LoadState,ActiveState,SubState,NRestarts`
    /// on a Debian 12 host.
    const ACTIVE: &str = "NRestarts=0\nLoadState=loaded\nActiveState=active\nSubState=running\n";
    const FAILED: &str = "NRestarts=5\nLoadState=loaded\nActiveState=failed\nSubState=failed\n";
    const STARTING: &str =
        "NRestarts=3\nLoadState=loaded\nActiveState=activating\nSubState=auto-restart\n";
    const MISSING: &str = "LoadState=not-found\nActiveState=inactive\nSubState=dead\n";

    #[test]
    fn parses_and_judges_captured_output() {
        let c = unit("nginx.service");
        let o = c.evaluate(&parse_show(ACTIVE));
        assert_eq!(o.status, Status::Ok);
        assert_eq!(o.message, "nginx.service is active (running), 0 restarts");
        assert_eq!(o.metrics[0].value, 1.0);
        assert_eq!(o.metrics[1].label, "restarts");

        let o = c.evaluate(&parse_show(FAILED));
        assert_eq!(o.status, Status::Critical);
        assert_eq!(o.message, "nginx.service is failed (failed), 5 restarts");
        assert_eq!(o.metrics[1].value, 5.0);

        let o = c.evaluate(&parse_show(STARTING));
        assert_eq!(o.status, Status::Warning);

        let o = c.evaluate(&parse_show(MISSING));
        assert_eq!(o.status, Status::Critical);
        assert!(o.message.contains("not found"), "{}", o.message);

        let restarted = ACTIVE.replace("NRestarts=0", "NRestarts=7");
        let o = c.evaluate(&parse_show(&restarted));
        assert_eq!(o.status, Status::Warning);
        assert!(o.message.ends_with("(more than max_restarts 2)"));

        let o = c.evaluate(&parse_show(""));
        assert_eq!(o.status, Status::Unknown);
    }

    /// For real: this machine is a container where systemd is not the init system (or has no
    /// systemctl at all); either way the check is UNKNOWN and says why.
    #[tokio::test]
    async fn real_systemctl_without_systemd_is_unknown() {
        let s: CheckSpec =
            serde_json::from_value(serde_json::json!({"type": "systemd", "unit": "ssh.service"}))
                .unwrap();
        s.validate().unwrap();
        let o = s.run(&Attachments::default()).await;
        if Path::new("/run/systemd/system").exists() {
            assert_ne!(
                o.status,
                Status::Unknown,
                "systemd runs here: {}",
                o.message
            );
        } else {
            assert_eq!(o.status, Status::Unknown, "{}", o.message);
            assert!(
                o.message.contains("systemd is not running")
                    || o.message.contains("systemd is not installed"),
                "{}",
                o.message
            );
        }
    }

    #[tokio::test]
    async fn missing_systemctl_is_unknown() {
        let o = unit("nginx.service")
            .run_with("/nonexistent/vigil-systemctl", Duration::from_secs(5))
            .await;
        assert_eq!(o.status, Status::Unknown);
        assert!(o.message.contains("not found"), "{}", o.message);
    }

    #[test]
    fn validation() {
        assert!(unit("nginx.service").validate().is_ok());
        assert!(unit("getty@tty1.service").validate().is_ok());
        for bad in ["", "--all", "a b", "x;rm"] {
            assert!(unit(bad).validate().is_err(), "{bad:?}");
        }
    }
}
