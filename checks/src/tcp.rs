//! `tcp` check: open a TCP connection to `host:port` within the timeout (name resolution
//! included), then close it. OK with the connect time, CRITICAL with the error otherwise.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{Metric, Outcome, SpecError, Status};

/// A TCP port to connect to, as written under `check:` with `type: tcp`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpCheck {
    /// `host:port`: `db01:5432`, `10.0.0.5:22`, `[::1]:8080`.
    pub address: String,
}

/// Splits `host:port` (IPv6 hosts in brackets); `None` when the port is missing or invalid.
fn split_host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    if host.is_empty() {
        return None;
    }
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']')?;
        inner.parse::<std::net::Ipv6Addr>().ok()?;
        return Some((host, port));
    }
    // An unbracketed IPv6 address would be ambiguous (`::1:80`).
    if host.contains(':') || host.contains(char::is_whitespace) {
        return None;
    }
    Some((host, port))
}

impl TcpCheck {
    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        match split_host_port(&self.address) {
            Some(_) => Ok(()),
            None => Err(SpecError::Invalid {
                field: "address".into(),
                reason: format!(
                    "{:?} is not host:port (port 1-65535; IPv6 as [addr]:port)",
                    self.address
                ),
            }),
        }
    }

    pub(crate) async fn run(&self, timeout: Duration) -> Outcome {
        let start = Instant::now();
        let connect = tokio::net::TcpStream::connect(self.address.as_str());
        let (status, message, metrics) = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(stream)) => {
                let took = start.elapsed();
                let peer = stream
                    .peer_addr()
                    .map_or_else(|_| self.address.clone(), |a| a.to_string());
                drop(stream);
                (
                    Status::Ok,
                    format!(
                        "connected to {} ({peer}) in {:.1} ms",
                        self.address,
                        took.as_secs_f64() * 1000.0
                    ),
                    vec![Metric::new("time", took.as_secs_f64(), "s")],
                )
            }
            Ok(Err(e)) => (
                Status::Critical,
                format!("connect to {} failed: {e}", self.address),
                Vec::new(),
            ),
            Err(_) => (
                Status::Critical,
                format!(
                    "connect to {} timed out after {}",
                    self.address,
                    humantime::format_duration(timeout)
                ),
                Vec::new(),
            ),
        };
        tracing::debug!(address = %self.address, status = %status, "tcp check finished");
        Outcome {
            status,
            message,
            metrics,
            output: String::new(),
            duration: start.elapsed(),
            exit_code: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Attachments, CheckKind, CheckSpec};

    fn tcp(address: &str) -> TcpCheck {
        TcpCheck {
            address: address.to_string(),
        }
    }

    #[tokio::test]
    async fn open_port_is_ok_with_time_metric() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let o = tcp(&addr).run(Duration::from_secs(5)).await;
        assert_eq!(o.status, Status::Ok, "{}", o.message);
        assert_eq!(o.metrics.len(), 1);
        assert_eq!(o.metrics[0].label, "time");
        assert_eq!(o.metrics[0].unit, "s");
        assert!(o.message.starts_with(&format!("connected to {addr}")));
    }

    #[tokio::test]
    async fn closed_port_is_critical() {
        // Bind then drop to get a port that is (almost certainly) closed.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let o = tcp(&addr).run(Duration::from_secs(5)).await;
        assert_eq!(o.status, Status::Critical);
        assert!(o.message.contains("failed"), "{}", o.message);
        assert!(o.metrics.is_empty());
    }

    #[tokio::test]
    async fn unresolvable_host_is_critical() {
        let o = tcp("vigil-no-such-host.invalid:80")
            .run(Duration::from_secs(5))
            .await;
        assert_eq!(o.status, Status::Critical);
        assert!(
            o.message.contains("vigil-no-such-host.invalid"),
            "{}",
            o.message
        );
    }

    #[tokio::test]
    async fn via_check_spec() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let spec: CheckSpec = serde_json::from_value(serde_json::json!({
            "type": "tcp",
            "timeout": "3s",
            "address": listener.local_addr().unwrap().to_string(),
        }))
        .unwrap();
        spec.validate().unwrap();
        assert!(matches!(spec.kind, CheckKind::Tcp(_)));
        let o = spec.run(&Attachments::default()).await;
        assert_eq!(o.status, Status::Ok);
        assert!(o.duration > Duration::ZERO);
    }

    #[test]
    fn validate_address() {
        for good in ["db:5432", "10.0.0.1:22", "[::1]:8080", "a.b.c:65535"] {
            assert!(tcp(good).validate().is_ok(), "{good}");
        }
        for bad in [
            "db", "db:", ":80", "db:0", "db:65536", "db:http", "::1:80", "[::1]", "[zz]:80",
            "a b:80",
        ] {
            assert!(tcp(bad).validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_fields_rejected() {
        let err = serde_json::from_value::<TcpCheck>(serde_json::json!({
            "address": "a:1", "send": "PING"
        }))
        .unwrap_err();
        assert!(err.to_string().contains("send"), "{err}");
    }
}
