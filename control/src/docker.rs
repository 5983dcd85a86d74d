//! Docker containers started, stopped and restarted through the Docker Engine API (bollard) on
//! the local socket (`DOCKER_HOST` when set, else `unix:///var/run/docker.sock`).
//!
//! The API version is negotiated with the engine: bollard asks with its newest version, and an
//! older engine (Debian 12's Docker 20.10 speaks 1.41) refuses every such request, including
//! bollard's own `negotiate_version`, with "client version X is too new. Maximum supported API
//! version is Y"; we then reconnect with Y.

use std::time::Duration;

use bollard::query_parameters::{RestartContainerOptions, StopContainerOptions};
use bollard::{API_DEFAULT_VERSION, ClientVersion, Docker};
use tokio::time::Instant;
use vigil_error::describe;

use crate::{Action, Execution};

/// Time a container gets to stop after SIGTERM before Docker kills it (less when the step
/// timeout is short: half of it).
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Why a container action failed.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot reach Docker at {host}: {reason}")]
    Unreachable { host: String, reason: String },
    #[error("container {name:?} not found")]
    NotFound { name: String },
    #[error(
        "invalid container name {name:?} (letters, digits, `_.-`, starting with a letter or digit)"
    )]
    InvalidName { name: String },
    #[error("docker {action} {name:?}: {message} (HTTP {status})")]
    Api {
        action: &'static str,
        name: String,
        status: u16,
        message: String,
    },
    #[error("docker {action} {name:?}: {reason}")]
    Request {
        action: &'static str,
        name: String,
        reason: String,
    },
    #[error("docker {action} {name:?} timed out after {after}")]
    TimedOut {
        action: &'static str,
        name: String,
        after: String,
    },
}

/// The Docker engine's address when `DOCKER_HOST` is not set.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// Where the Docker engine is: `DOCKER_HOST`, else [`DEFAULT_DOCKER_HOST`] (bollard's rule).
pub fn docker_host() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_string())
}

/// Whether the Docker engine answers a ping within `timeout`.
pub async fn ping(timeout: Duration) -> Result<(), DockerError> {
    ping_at(&docker_host(), timeout).await
}

async fn ping_at(host: &str, timeout: Duration) -> Result<(), DockerError> {
    let work = async {
        let docker = connect(host, timeout).await?;
        docker
            .ping()
            .await
            .map(drop)
            .map_err(|e| unreachable(host, &e))
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(DockerError::Unreachable {
                host: host.to_string(),
                reason: format!("no answer within {}", humantime::format_duration(timeout)),
            })
        })
}

/// Starts, stops or restarts container `name`, the whole call bounded by `timeout`. Starting a
/// running container and stopping a stopped one succeed (nothing to do).
pub async fn execute_container(action: Action, name: &str, timeout: Duration) -> Execution {
    execute_container_at(&docker_host(), action, name, timeout).await
}

async fn execute_container_at(
    host: &str,
    action: Action,
    name: &str,
    timeout: Duration,
) -> Execution {
    let started = Instant::now();
    let header = format!("docker {action} {name}\n");
    let result = match tokio::time::timeout(timeout, act(host, action, name, timeout)).await {
        Ok(r) => r,
        Err(_) => Err(DockerError::TimedOut {
            action: action.as_str(),
            name: name.to_string(),
            after: humantime::format_duration(timeout).to_string(),
        }),
    };
    let (success, timed_out, text) = match result {
        Ok(state) => (true, false, state),
        Err(e) => {
            tracing::debug!(container = %name, %action, error = %e, "container action failed");
            (
                false,
                matches!(e, DockerError::TimedOut { .. }),
                e.to_string(),
            )
        }
    };
    Execution {
        success,
        exit_code: -1,
        output: format!("{header}{text}\n"),
        timed_out,
        duration: started.elapsed(),
    }
}

/// Docker's rule for names (IDs are hex, so they pass too); also keeps the name from changing
/// the request path.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// Seconds Docker waits after SIGTERM before SIGKILL, so that the call ends within `timeout`.
fn stop_grace(timeout: Duration) -> i32 {
    let secs = STOP_GRACE.min(timeout / 2).as_secs();
    i32::try_from(secs).unwrap_or(10)
}

/// Does the action and describes the container's state afterwards.
async fn act(
    host: &str,
    action: Action,
    name: &str,
    timeout: Duration,
) -> Result<String, DockerError> {
    if !valid_name(name) {
        return Err(DockerError::InvalidName {
            name: name.to_string(),
        });
    }
    let docker = connect(host, timeout).await?;
    let t = Some(stop_grace(timeout));
    let op = action.as_str();
    let result = match action {
        Action::Start => docker.start_container(name, None).await,
        Action::Stop => {
            docker
                .stop_container(name, Some(StopContainerOptions { t, signal: None }))
                .await
        }
        Action::Restart => {
            docker
                .restart_container(name, Some(RestartContainerOptions { t, signal: None }))
                .await
        }
    };
    result.map_err(|e| api_error(host, op, name, e))?;
    let info = docker
        .inspect_container(name, None)
        .await
        .map_err(|e| api_error(host, "inspect", name, e))?;
    let state = info.state.unwrap_or_default();
    let status = state
        .status
        .map(|s| s.to_string())
        .unwrap_or_else(|| "unknown".into());
    let since = if state.running == Some(true) {
        format!(
            ", started at {}",
            state.started_at.as_deref().unwrap_or("?")
        )
    } else {
        state
            .exit_code
            .map(|c| format!(", exit code {c}"))
            .unwrap_or_default()
    };
    Ok(format!("done; container is {status}{since}"))
}

/// A client for `host` speaking an API version the engine accepts.
async fn connect(host: &str, timeout: Duration) -> Result<Docker, DockerError> {
    let docker = client(host, API_DEFAULT_VERSION, timeout)?;
    match docker.negotiate_version().await {
        Ok(d) => Ok(d),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 400,
            message,
        }) => match max_version(&message) {
            Some(v) => client(host, &v, timeout),
            None => Err(DockerError::Unreachable {
                host: host.to_string(),
                reason: message,
            }),
        },
        Err(e) => Err(unreachable(host, &e)),
    }
}

fn client(host: &str, version: &ClientVersion, timeout: Duration) -> Result<Docker, DockerError> {
    // bollard's request timeout is in whole seconds; ours (tokio) is the one that fires.
    let secs = timeout.as_secs().saturating_add(2);
    let r = if host.starts_with("unix://") {
        Docker::connect_with_unix(host, secs, version)
    } else if host.starts_with("tcp://") || host.starts_with("http://") {
        Docker::connect_with_http(host, secs, version)
    } else {
        return Err(DockerError::Unreachable {
            host: host.to_string(),
            reason: "unsupported address (use unix:// or tcp://)".into(),
        });
    };
    r.map_err(|e| unreachable(host, &e))
}

/// `Y` of "client version X is too new. Maximum supported API version is Y".
fn max_version(message: &str) -> Option<ClientVersion> {
    let (_, v) = message.split_once("Maximum supported API version is ")?;
    let v = v.trim().trim_end_matches('.');
    let (major, minor) = v.split_once('.')?;
    Some(ClientVersion {
        major_version: major.parse().ok()?,
        minor_version: minor.parse().ok()?,
    })
}

fn unreachable(host: &str, e: &bollard::errors::Error) -> DockerError {
    let reason = match e {
        bollard::errors::Error::SocketNotFoundError(_) => "socket not found".to_string(),
        e => describe(e),
    };
    DockerError::Unreachable {
        host: host.to_string(),
        reason,
    }
}

fn api_error(
    host: &str,
    action: &'static str,
    name: &str,
    e: bollard::errors::Error,
) -> DockerError {
    use bollard::errors::Error as E;
    match e {
        E::DockerResponseServerError {
            status_code: 404, ..
        } => DockerError::NotFound {
            name: name.to_string(),
        },
        E::DockerResponseServerError {
            status_code,
            message,
        } => DockerError::Api {
            action,
            name: name.to_string(),
            status: status_code,
            message,
        },
        E::RequestTimeoutError => DockerError::Request {
            action,
            name: name.to_string(),
            reason: "timed out".into(),
        },
        E::IOError { .. } | E::HyperLegacyError { .. } | E::SocketNotFoundError(_) => {
            unreachable(host, &e)
        }
        e => DockerError::Request {
            action,
            name: name.to_string(),
            reason: describe(&e),
        },
    }
}

#[cfg(test)]
mod tests;
