//! `grpc` check: the standard `grpc.health.v1.Health/Check` call (tonic-health client), over
//! plain HTTP/2 or TLS (own rustls connector, so CA file, client certificate, server name and
//! `insecure_skip_verify` all work).
//!
//! OK when the answer is SERVING; CRITICAL for NOT_SERVING, an unknown service, a server without
//! the health service, or a connection failure; UNKNOWN when the TLS files cannot be read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tonic::transport::{Endpoint, Uri};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use vigil_error::describe;

use crate::threshold::invalid;
use crate::tls::{TlsOptions, client_config};
use crate::{Metric, Outcome, SpecError, Status, internal_deadline};

/// A gRPC health check, as written under `check:` with `type: grpc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcCheck {
    /// `host:port` of the gRPC server (`10.0.0.5:50051`, `[::1]:50051`).
    pub address: String,
    /// Service name to ask about (`vigil.v1.AgentService`); empty (default) asks about the
    /// server as a whole.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
    /// TLS settings; without `tls:` the connection is plain HTTP/2 (h2c).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsOptions>,
}

fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

impl GrpcCheck {
    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        crate::tcp::TcpCheck {
            address: self.address.clone(),
        }
        .validate()?;
        if let Some(t) = &self.tls {
            t.validate("tls")?;
        }
        if self.service.contains(char::is_whitespace) {
            return Err(invalid("service", "must not contain spaces"));
        }
        Ok(())
    }

    fn label(&self) -> String {
        let scheme = if self.tls.is_some() { "grpcs" } else { "grpc" };
        if self.service.is_empty() {
            format!("{scheme}://{}", self.address)
        } else {
            format!("{scheme}://{} {}", self.address, self.service)
        }
    }

    pub(crate) async fn run(&self, timeout: Duration) -> Outcome {
        let start = Instant::now();
        let deadline = internal_deadline(timeout);
        let mut o = match tokio::time::timeout(deadline, self.call(deadline)).await {
            Ok(o) => o,
            Err(_) => Outcome::new(
                Status::Critical,
                format!(
                    "{}: timed out after {}",
                    self.label(),
                    humantime::format_duration(deadline)
                ),
            ),
        };
        o.duration = start.elapsed();
        tracing::debug!(address = %self.address, service = %self.service, status = %o.status,
            message = %o.message, "grpc check finished");
        o
    }

    async fn call(&self, deadline: Duration) -> Outcome {
        let label = self.label();
        let endpoint = match Endpoint::from_shared(format!("http://{}", self.address)) {
            Ok(e) => e.connect_timeout(deadline).timeout(deadline),
            Err(e) => return Outcome::new(Status::Unknown, format!("{label}: {e}")),
        };
        let sent = Instant::now();
        let channel = match &self.tls {
            None => endpoint.connect().await,
            Some(t) => {
                let client_cert = t.client_cert.as_deref().zip(t.client_key.as_deref());
                let config = match client_config(
                    t.ca_file.as_deref(),
                    !t.insecure_skip_verify,
                    client_cert,
                    None,
                    &[b"h2"],
                ) {
                    Ok(c) => c,
                    Err(e) => return Outcome::new(Status::Unknown, format!("{label}: {e}")),
                };
                let name = t
                    .server_name
                    .clone()
                    .unwrap_or_else(|| host_of(&self.address).to_string());
                let Ok(server_name) = rustls::pki_types::ServerName::try_from(name.clone()) else {
                    return Outcome::new(
                        Status::Unknown,
                        format!("{label}: {name:?} is not a valid TLS server name"),
                    );
                };
                let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
                let address = self.address.clone();
                endpoint
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let connector = connector.clone();
                        let address = address.clone();
                        let server_name = server_name.clone();
                        async move {
                            let tcp = tokio::net::TcpStream::connect(address.as_str()).await?;
                            let tls = connector.connect(server_name, tcp).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(tls))
                        }
                    }))
                    .await
            }
        };
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                return Outcome::new(
                    Status::Critical,
                    format!("{label}: cannot connect: {}", describe(&e)),
                );
            }
        };
        let mut client = HealthClient::new(channel);
        let answer = client
            .check(HealthCheckRequest {
                service: self.service.clone(),
            })
            .await;
        let took = sent.elapsed();
        let metrics = vec![Metric::new("time", took.as_secs_f64(), "s")];
        let (status, message) = match answer {
            Ok(resp) => {
                let s = ServingStatus::try_from(resp.into_inner().status)
                    .unwrap_or(ServingStatus::Unknown);
                let st = if s == ServingStatus::Serving {
                    Status::Ok
                } else {
                    Status::Critical
                };
                (
                    st,
                    format!(
                        "{label}: {} in {:.0} ms",
                        s.as_str_name(),
                        took.as_secs_f64() * 1000.0
                    ),
                )
            }
            Err(s) => {
                let why = match s.code() {
                    tonic::Code::NotFound => {
                        format!("service {:?} is unknown to the server", self.service)
                    }
                    tonic::Code::Unimplemented => {
                        "the server does not implement grpc.health.v1".to_string()
                    }
                    tonic::Code::DeadlineExceeded => "timed out".to_string(),
                    code => format!("{code:?}: {}", s.message()),
                };
                (Status::Critical, format!("{label}: {why}"))
            }
        };
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
    use tonic::service::Routes;
    use vigil_testkit::grpc;

    /// A real tonic-health server on 127.0.0.1:0; the reporter switches its answers.
    async fn serve() -> (tonic_health::server::HealthReporter, String) {
        let (reporter, service) = tonic_health::server::health_reporter();
        let server = grpc::serve(None, Routes::new(service)).await;
        (reporter, server.addr.to_string())
    }

    fn spec(v: serde_json::Value) -> CheckSpec {
        let s: CheckSpec = serde_json::from_value(v).unwrap();
        s.validate().unwrap();
        s
    }

    #[tokio::test]
    async fn serving_not_serving_unknown_service_and_unreachable() {
        let (reporter, addr) = serve().await;
        reporter
            .set_service_status("vigil.Test", tonic_health::ServingStatus::Serving)
            .await;
        let files = Attachments::default();

        let o = spec(serde_json::json!({"type": "grpc", "address": addr}))
            .run(&files)
            .await;
        assert_eq!(o.status, Status::Ok, "{}", o.message);
        assert!(o.message.contains("SERVING"), "{}", o.message);
        assert_eq!(o.metrics[0].label, "time");

        let svc =
            spec(serde_json::json!({"type": "grpc", "address": addr, "service": "vigil.Test"}));
        let o = svc.run(&files).await;
        assert_eq!(o.status, Status::Ok, "{}", o.message);

        reporter
            .set_service_status("vigil.Test", tonic_health::ServingStatus::NotServing)
            .await;
        let o = svc.run(&files).await;
        assert_eq!(o.status, Status::Critical, "{}", o.message);
        assert!(o.message.contains("NOT_SERVING"), "{}", o.message);

        let o = spec(serde_json::json!({"type": "grpc", "address": addr, "service": "nope.Svc"}))
            .run(&files)
            .await;
        assert_eq!(o.status, Status::Critical, "{}", o.message);
        assert!(o.message.contains("unknown to the server"), "{}", o.message);

        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let o = spec(serde_json::json!({"type": "grpc", "timeout": "3s", "address": closed_addr}))
            .run(&files)
            .await;
        assert_eq!(o.status, Status::Critical, "{}", o.message);
        assert!(o.message.contains("cannot connect"), "{}", o.message);
    }

    #[tokio::test]
    async fn tls_server_with_ca_file_insecure_and_unknown_ca() {
        let cert = vigil_testkit::pki::self_signed(&["localhost"], 365);
        let identity = tonic::transport::Identity::from_pem(&cert.pem, &cert.key_pem);
        let (_reporter, service) = tonic_health::server::health_reporter();
        let server = grpc::serve(
            Some(tonic::transport::ServerTlsConfig::new().identity(identity)),
            Routes::new(service),
        )
        .await;
        let port = server.addr.port();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &cert.pem).unwrap();
        let files = Attachments::default();
        let address = format!("127.0.0.1:{port}");

        let o = spec(serde_json::json!({"type": "grpc", "address": address,
            "tls": {"ca_file": ca, "server_name": "localhost"}}))
        .run(&files)
        .await;
        assert_eq!(o.status, Status::Ok, "{}", o.message);
        assert!(o.message.starts_with("grpcs://"), "{}", o.message);

        let o = spec(serde_json::json!({"type": "grpc", "address": address,
            "tls": {"insecure_skip_verify": true}}))
        .run(&files)
        .await;
        assert_eq!(o.status, Status::Ok, "{}", o.message);

        // The system roots do not trust it.
        let o = spec(
            serde_json::json!({"type": "grpc", "timeout": "3s", "address": address,
            "tls": {"server_name": "localhost"}}),
        )
        .run(&files)
        .await;
        assert_eq!(o.status, Status::Critical, "{}", o.message);

        // Plain h2c against a TLS port fails too.
        let o = spec(serde_json::json!({"type": "grpc", "timeout": "3s", "address": address}))
            .run(&files)
            .await;
        assert_eq!(o.status, Status::Critical, "{}", o.message);

        let o = spec(serde_json::json!({"type": "grpc", "address": address,
            "tls": {"ca_file": dir.path().join("missing.pem")}}))
        .run(&files)
        .await;
        assert_eq!(o.status, Status::Unknown, "{}", o.message);
    }

    #[test]
    fn validation() {
        for bad in [
            serde_json::json!({"type": "grpc", "address": "nohost"}),
            serde_json::json!({"type": "grpc", "address": "a:1", "tls": {"client_cert": "/x"}}),
            serde_json::json!({"type": "grpc", "address": "a:1", "service": "a b"}),
        ] {
            let s: CheckSpec = serde_json::from_value(bad.clone()).unwrap();
            assert!(s.validate().is_err(), "{bad}");
        }
        let err = serde_json::from_value::<CheckSpec>(serde_json::json!({
            "type": "grpc", "address": "a:1", "tls": {"verify": false}}))
        .unwrap_err()
        .to_string();
        assert!(err.contains("insecure_skip_verify"), "{err}");
    }
}
