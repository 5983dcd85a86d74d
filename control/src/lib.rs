//! Vigil service control: how a service is started, stopped and restarted (`control:` in a
//! service file), turned into a [`Plan`] that travels to whoever carries it out (the agent, or
//! the collector over SSH), and executed locally by the agent. Knows no gRPC and no SQL.

pub mod docker;
pub mod exec;

use std::time::Duration;

pub use exec::execute;
use serde::{Deserialize, Serialize};

/// `control:` as written in a service file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSpec {
    /// `agent`, `ssh` or `auto` (agent first, SSH when the agent is not connected).
    #[serde(default)]
    pub via: Via,
    /// A Docker container: start/stop/restart through the Docker Engine API on the agent, or
    /// `docker start|stop|restart NAME` over SSH. Used for an action that has no steps below.
    #[serde(default)]
    pub container: Option<String>,
    /// Argument vectors run in order, stopping at the first failure; never a shell string.
    #[serde(default)]
    pub start: Vec<Vec<String>>,
    #[serde(default)]
    pub stop: Vec<Vec<String>>,
    #[serde(default)]
    pub restart: Vec<Vec<String>>,
    /// Limit for each step (default 60s).
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Prefix every step with `sudo -n` (non-interactive: fails instead of asking for a password).
    #[serde(default)]
    pub sudo: bool,
}

/// Who carries out a service's commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Agent,
    Ssh,
    #[default]
    Auto,
}

/// What an operator or the remediation engine asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Start,
    Stop,
    Restart,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Restart => "restart",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "start" => Action::Start,
            "stop" => Action::Stop,
            "restart" => Action::Restart,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Default limit for one step.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// One action made concrete: what to run, with which limits. Serialized as JSON into the
/// protocol's `Command.plan_json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub action: Action,
    pub how: How,
    /// Limit for each step.
    #[serde(with = "humantime_serde")]
    pub step_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum How {
    /// A Docker container through the Docker Engine API (agent) or the docker CLI (SSH).
    Container { name: String },
    /// Argument vectors run in order, stopping at the first failure (already `sudo -n`-prefixed
    /// when the spec asked for sudo).
    Steps { steps: Vec<Vec<String>> },
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ControlError {
    #[error("the service has no control spec, so it cannot be {0}ed")]
    NoControl(Action),
    #[error("control has neither `{0}` steps nor a container")]
    NothingToRun(Action),
}

impl ControlSpec {
    /// Checks the spec: every step names a program.
    pub fn validate(&self) -> Result<(), String> {
        for (name, seq) in [
            ("start", &self.start),
            ("stop", &self.stop),
            ("restart", &self.restart),
        ] {
            if seq
                .iter()
                .any(|argv| argv.first().is_none_or(|p| p.is_empty()))
            {
                return Err(format!("control.{name}: every command needs a program"));
            }
        }
        if self.container.as_deref() == Some("") {
            return Err("control.container: must not be empty".into());
        }
        Ok(())
    }

    /// The plan for `action`: its steps if the spec has some, else the container, else an error.
    /// A `restart` without restart steps but with stop and start steps runs stop then start.
    pub fn plan(&self, action: Action) -> Result<Plan, ControlError> {
        let steps = match action {
            Action::Start => self.start.clone(),
            Action::Stop => self.stop.clone(),
            Action::Restart if self.restart.is_empty() && self.container.is_none() => {
                let mut s = self.stop.clone();
                s.extend(self.start.iter().cloned());
                if self.stop.is_empty() || self.start.is_empty() {
                    Vec::new()
                } else {
                    s
                }
            }
            Action::Restart => self.restart.clone(),
        };
        let how = if !steps.is_empty() {
            let steps = if self.sudo {
                steps
                    .into_iter()
                    .map(|argv| {
                        ["sudo".to_string(), "-n".to_string()]
                            .into_iter()
                            .chain(argv)
                            .collect()
                    })
                    .collect()
            } else {
                steps
            };
            How::Steps { steps }
        } else if let Some(name) = &self.container {
            How::Container { name: name.clone() }
        } else {
            return Err(ControlError::NothingToRun(action));
        };
        Ok(Plan {
            action,
            how,
            step_timeout: self.timeout.unwrap_or(DEFAULT_STEP_TIMEOUT),
        })
    }
}

/// What running a plan (or a check-now) gave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Execution {
    pub success: bool,
    /// Exit code of the last step run (-1 when there was none, e.g. a Docker API call or a kill).
    pub exit_code: i32,
    /// Bounded excerpt of the steps' output, or the error.
    pub output: String,
    pub timed_out: bool,
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml_like: serde_json::Value) -> ControlSpec {
        serde_json::from_value(yaml_like).unwrap()
    }

    #[test]
    fn steps_win_over_container_and_sudo_prefixes() {
        let s = spec(serde_json::json!({
            "container": "c1", "restart": [["docker", "restart", "c1"], ["docker", "exec", "-d", "c1", "run"]],
            "sudo": true, "timeout": "2m"
        }));
        let p = s.plan(Action::Restart).unwrap();
        assert_eq!(p.step_timeout, Duration::from_secs(120));
        match p.how {
            How::Steps { steps } => {
                assert_eq!(steps[0], ["sudo", "-n", "docker", "restart", "c1"]);
                assert_eq!(steps.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        // No start steps: the container is used.
        assert_eq!(
            s.plan(Action::Start).unwrap().how,
            How::Container { name: "c1".into() }
        );
    }

    #[test]
    fn restart_falls_back_to_stop_then_start() {
        let s = spec(serde_json::json!({"start": [["a"]], "stop": [["b"]]}));
        assert_eq!(
            s.plan(Action::Restart).unwrap().how,
            How::Steps {
                steps: vec![vec!["b".into()], vec!["a".into()]]
            }
        );
        let s = spec(serde_json::json!({"start": [["a"]]}));
        assert_eq!(
            s.plan(Action::Restart),
            Err(ControlError::NothingToRun(Action::Restart))
        );
    }

    #[test]
    fn unknown_fields_and_empty_programs_are_refused() {
        assert!(
            serde_json::from_value::<ControlSpec>(serde_json::json!({"restart_cmd": []})).is_err()
        );
        let s = spec(serde_json::json!({"start": [[]]}));
        assert!(s.validate().unwrap_err().contains("control.start"));
    }
}
