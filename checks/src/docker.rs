//! `docker` check: inspect one container through the Docker Engine API (bollard, the unix
//! socket by default) and judge its state, health, restart count, OOM kill and exit code.
//!
//! OK: running (and healthy when it has a health check). WARNING: health `starting`, more
//! restarts than `max_restarts`, or running again after an OOM kill. CRITICAL: not found, not
//! running (message with the exit code and OOM kill), paused, restarting or unhealthy. UNKNOWN:
//! the engine cannot be reached.

use std::time::{Duration, Instant, SystemTime};

use bollard::Docker;
use bollard::models::{ContainerStateStatusEnum, HealthStatusEnum};
use serde::{Deserialize, Serialize};

use crate::threshold::{invalid, worst};
use crate::{Metric, Outcome, SpecError, Status, internal_deadline};

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// A container check, as written under `check:` with `type: docker`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerCheck {
    /// Container name or id (`mineru_container`).
    pub container: String,
    /// Docker engine address: `unix:///var/run/docker.sock` (default; also `DOCKER_HOST` when it
    /// is a unix socket) or `tcp://host:2375` / `http://host:2375`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Restart count (as Docker counts it since the container was created) above which the
    /// result is WARNING. Default: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restarts: Option<u64>,
    /// Judge the container's own health check (default true): `unhealthy` is CRITICAL,
    /// `starting` WARNING. A container without a health check is judged by its state alone.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub require_healthy: bool,
}

/// What the engine said about the container, reduced to what the check judges.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ContainerFacts {
    pub state: String,
    pub health: Option<String>,
    pub restart_count: u64,
    pub oom_killed: bool,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    pub uptime: Option<Duration>,
}

/// Connects to the engine at `host` (or the local default) and agrees on an API version.
pub async fn connect(host: Option<&str>, timeout: Duration) -> Result<Docker, String> {
    let secs = timeout.as_secs().max(1);
    let client = match host {
        None => Docker::connect_with_local_defaults(),
        Some(h) if h.starts_with("unix://") || h.starts_with('/') => {
            Docker::connect_with_unix(h, secs, bollard::API_DEFAULT_VERSION)
        }
        Some(h) => Docker::connect_with_http(h, secs, bollard::API_DEFAULT_VERSION),
    }
    .map_err(|e| format!("cannot reach the Docker engine: {e}"))?;
    // The engine may speak an older API than bollard's default (20.10 speaks 1.41).
    client
        .negotiate_version()
        .await
        .map_err(|e| format!("cannot reach the Docker engine: {e}"))
}

fn engine_name(host: Option<&str>) -> &str {
    host.unwrap_or("the local Docker engine")
}

impl DockerCheck {
    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        if self.container.trim().is_empty() {
            return Err(invalid("container", "is empty"));
        }
        if self.container.contains('/') && !self.container.starts_with('/') {
            return Err(invalid(
                "container",
                format!("{:?} is not a container name or id", self.container),
            ));
        }
        if let Some(h) = &self.host
            && !["unix://", "tcp://", "http://", "/"]
                .iter()
                .any(|p| h.starts_with(p))
        {
            return Err(invalid(
                "host",
                format!("{h:?}: use unix:///path, tcp://host:port or http://host:port"),
            ));
        }
        Ok(())
    }

    pub(crate) async fn run(&self, timeout: Duration) -> Outcome {
        let start = Instant::now();
        let deadline = internal_deadline(timeout);
        let mut o = match tokio::time::timeout(deadline, self.inspect(deadline)).await {
            Ok(Ok(Some(facts))) => self.evaluate(&facts),
            Ok(Ok(None)) => Outcome::new(
                Status::Critical,
                format!("container {} not found", self.container),
            ),
            Ok(Err(e)) => Outcome::new(
                Status::Unknown,
                format!("{}: {e}", engine_name(self.host.as_deref())),
            ),
            Err(_) => Outcome::new(
                Status::Unknown,
                format!(
                    "{} did not answer within {}",
                    engine_name(self.host.as_deref()),
                    humantime::format_duration(deadline)
                ),
            ),
        };
        o.duration = start.elapsed();
        tracing::debug!(container = %self.container, status = %o.status, message = %o.message,
            "docker check finished");
        o
    }

    /// `Ok(None)` when the engine says the container does not exist.
    async fn inspect(&self, deadline: Duration) -> Result<Option<ContainerFacts>, String> {
        let docker = connect(self.host.as_deref(), deadline).await?;
        let info = match docker.inspect_container(&self.container, None).await {
            Ok(i) => i,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return Ok(None),
            Err(e) => return Err(format!("inspecting {}: {e}", self.container)),
        };
        let state = info.state.unwrap_or_default();
        let status = state
            .status
            .map_or_else(|| "unknown".to_string(), |s| s.to_string());
        let health = state
            .health
            .and_then(|h| h.status)
            .filter(|s| !matches!(s, HealthStatusEnum::EMPTY | HealthStatusEnum::NONE))
            .map(|s| s.to_string());
        let uptime = if state.status == Some(ContainerStateStatusEnum::RUNNING) {
            state
                .started_at
                .as_deref()
                .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
                .and_then(|t| SystemTime::now().duration_since(t).ok())
        } else {
            None
        };
        Ok(Some(ContainerFacts {
            state: status,
            health,
            restart_count: info.restart_count.unwrap_or(0).max(0) as u64,
            oom_killed: state.oom_killed.unwrap_or(false),
            exit_code: state.exit_code,
            error: state.error.filter(|e| !e.is_empty()),
            uptime,
        }))
    }

    /// Judges the facts (pure, so every branch is tested without an engine).
    pub(crate) fn evaluate(&self, f: &ContainerFacts) -> Outcome {
        let name = &self.container;
        let running = f.state == "running";
        let mut status = Status::Ok;
        let mut parts: Vec<String> = Vec::new();
        if running {
            parts.push(format!("container {name} is running"));
            if let Some(up) = f.uptime {
                parts.push(format!(
                    "up {}",
                    humantime::format_duration(Duration::from_secs(up.as_secs()))
                ));
            }
        } else {
            status = Status::Critical;
            let mut s = format!("container {name} is {}", f.state);
            if let Some(code) = f.exit_code
                && f.state != "created"
            {
                s.push_str(&format!(" (exit code {code}"));
                if f.oom_killed {
                    s.push_str(", OOM-killed");
                }
                s.push(')');
            }
            if let Some(e) = &f.error {
                s.push_str(&format!(": {e}"));
            }
            parts.push(s);
        }
        if let Some(h) = &f.health {
            parts.push(format!("health {h}"));
            if self.require_healthy && running {
                status = worst(
                    status,
                    match h.as_str() {
                        "healthy" => Status::Ok,
                        "starting" => Status::Warning,
                        _ => Status::Critical,
                    },
                );
            }
        }
        if running && f.oom_killed {
            status = worst(status, Status::Warning);
            parts.push("was OOM-killed".into());
        }
        if f.restart_count > 0 || self.max_restarts.is_some() {
            parts.push(format!("{} restarts", f.restart_count));
        }
        if let Some(max) = self.max_restarts
            && f.restart_count > max
        {
            status = worst(status, Status::Warning);
            parts.push(format!("more than max_restarts {max}"));
        }
        let mut restarts = Metric::new("restarts", f.restart_count as f64, "c");
        if let Some(max) = self.max_restarts {
            restarts.warn = max.to_string();
        }
        let mut metrics = vec![
            Metric::new("running", if running { 1.0 } else { 0.0 }, ""),
            restarts,
            Metric::new("oom_killed", if f.oom_killed { 1.0 } else { 0.0 }, ""),
        ];
        if let Some(code) = f.exit_code {
            metrics.push(Metric::new("exit_code", code as f64, ""));
        }
        if let Some(up) = f.uptime {
            metrics.push(Metric::new("uptime", up.as_secs_f64().floor(), "s"));
        }
        if let Some(h) = &f.health {
            let v = match h.as_str() {
                "healthy" => 1.0,
                "starting" => 0.5,
                _ => 0.0,
            };
            metrics.push(Metric::new("healthy", v, ""));
        }
        Outcome {
            status,
            message: parts.join(", "),
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
    use crate::{Attachments, CheckKind, CheckSpec};
    use vigil_testkit::docker::{Container, docker};

    fn check(container: &str) -> DockerCheck {
        DockerCheck {
            container: container.into(),
            host: None,
            max_restarts: Some(3),
            require_healthy: true,
        }
    }

    #[test]
    fn judging_facts() {
        let c = check("web");
        let running = ContainerFacts {
            state: "running".into(),
            uptime: Some(Duration::from_secs(90)),
            ..Default::default()
        };
        let o = c.evaluate(&running);
        assert_eq!(o.status, Status::Ok, "{}", o.message);
        assert_eq!(o.message, "container web is running, up 1m 30s, 0 restarts");

        let o = c.evaluate(&ContainerFacts {
            health: Some("unhealthy".into()),
            ..running.clone()
        });
        assert_eq!(o.status, Status::Critical);
        let o = c.evaluate(&ContainerFacts {
            health: Some("starting".into()),
            ..running.clone()
        });
        assert_eq!(o.status, Status::Warning);
        let o = DockerCheck {
            require_healthy: false,
            ..c.clone()
        }
        .evaluate(&ContainerFacts {
            health: Some("unhealthy".into()),
            ..running.clone()
        });
        assert_eq!(o.status, Status::Ok);
        let o = c.evaluate(&ContainerFacts {
            restart_count: 4,
            oom_killed: true,
            ..running.clone()
        });
        assert_eq!(o.status, Status::Warning);
        assert!(o.message.contains("was OOM-killed"), "{}", o.message);
        assert!(o.message.contains("4 restarts, more than max_restarts 3"));

        let o = c.evaluate(&ContainerFacts {
            state: "exited".into(),
            exit_code: Some(137),
            oom_killed: true,
            ..Default::default()
        });
        assert_eq!(o.status, Status::Critical);
        assert!(
            o.message
                .starts_with("container web is exited (exit code 137, OOM-killed)"),
            "{}",
            o.message
        );
        let labels: Vec<&str> = o.metrics.iter().map(|m| m.label.as_str()).collect();
        assert_eq!(labels, ["running", "restarts", "oom_killed", "exit_code"]);
    }

    #[test]
    fn spec_and_validation() {
        let s: CheckSpec = serde_json::from_value(serde_json::json!({
            "type": "docker", "container": "mineru_container", "max_restarts": 3}))
        .unwrap();
        s.validate().unwrap();
        let CheckKind::Docker(d) = &s.kind else {
            panic!()
        };
        assert!(d.require_healthy);
        for bad in [
            serde_json::json!({"type": "docker", "container": ""}),
            serde_json::json!({"type": "docker", "container": "a", "host": "ftp://x"}),
        ] {
            let s: CheckSpec = serde_json::from_value(bad.clone()).unwrap();
            assert!(s.validate().is_err(), "{bad}");
        }
        assert!(
            serde_json::from_value::<CheckSpec>(serde_json::json!({
                "type": "docker", "container": "a", "image": "x"}))
            .is_err()
        );
    }

    #[tokio::test]
    async fn unreachable_engine_is_unknown() {
        let c = DockerCheck {
            host: Some("unix:///nonexistent/vigil-docker.sock".into()),
            ..check("web")
        };
        let o = c.run(Duration::from_secs(5)).await;
        assert_eq!(o.status, Status::Unknown, "{}", o.message);
        assert!(o.message.contains("cannot reach"), "{}", o.message);
    }

    // ---- against the real Docker engine ----

    async fn poll<F: Fn(&Outcome) -> bool>(spec: &CheckSpec, cond: F) -> Outcome {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let o = spec.run(&Attachments::default()).await;
            if cond(&o) || Instant::now() > until {
                return o;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn real_container_running_stopped_and_missing() {
        // Docker is a real dependency of this test: unreachable is a failure, not a skip.
        let probe = connect(None, Duration::from_secs(5)).await;
        assert!(
            probe.is_ok(),
            "the Docker engine is unreachable, this test needs it: {}",
            probe.err().unwrap_or_default()
        );
        let container =
            Container::run_sh("trap 'exit 3' TERM; while true; do sleep 1; done").unwrap();
        let name = container.name.clone();
        let spec: CheckSpec = serde_json::from_value(serde_json::json!({
            "type": "docker", "timeout": "10s", "container": name, "max_restarts": 0}))
        .unwrap();
        spec.validate().unwrap();
        let o = poll(&spec, |o| o.status == Status::Ok).await;
        assert_eq!(o.status, Status::Ok, "{}", o.message);
        assert!(o.message.contains("is running"), "{}", o.message);
        assert_eq!(o.metrics[0].label, "running");
        assert_eq!(o.metrics[0].value, 1.0);

        docker(&["stop", "-t", "5", &name]);
        let o = poll(&spec, |o| o.status == Status::Critical).await;
        assert_eq!(o.status, Status::Critical, "{}", o.message);
        assert!(
            o.message.contains("is exited (exit code 3)"),
            "{}",
            o.message
        );
        let code = o.metrics.iter().find(|m| m.label == "exit_code").unwrap();
        assert_eq!(code.value, 3.0);

        docker(&["rm", "-f", &name]);
        let o = spec.run(&Attachments::default()).await;
        assert_eq!(o.status, Status::Critical, "{}", o.message);
        assert!(o.message.ends_with("not found"), "{}", o.message);
    }
}
