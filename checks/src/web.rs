//! `web` check: a page is reachable, contains its `keywords` and none of the `absent` ones, and,
//! for `https://` URLs, its certificate is not about to expire. The page is fetched by the `http`
//! check (so TLS options and errors are the same); the certificate is read by a separate TLS
//! handshake that records the server's chain and parses the leaf's notAfter with x509-parser.
//!
//! Status: the page's result (CRITICAL when unreachable or a keyword test fails), made worse by
//! the certificate: fewer than `cert_warning_days` left is WARNING, fewer than
//! `cert_critical_days` (or expired) CRITICAL.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::http::{HttpCheck, HttpExpect, HttpRequest, HttpTls};
use crate::threshold::{invalid, worst};
use crate::tls::{PeerChain, client_config, leaf_expiry};
use crate::{Attachments, Metric, Outcome, SpecError, Status, internal_deadline};

fn d14() -> f64 {
    14.0
}

fn d7() -> f64 {
    7.0
}

fn default_status() -> Vec<u16> {
    vec![200]
}

/// A web page check, as written under `check:` with `type: web`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebCheck {
    /// `http://` or `https://` URL of the page (fetched with GET, redirects followed).
    pub url: String,
    /// Accepted status codes (default `[200]`).
    #[serde(default = "default_status")]
    pub status: Vec<u16>,
    /// Text that must appear in the page.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keywords: Vec<String>,
    /// Text that must not appear in the page (`"Internal Server Error"`, `"maintenance"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub absent: Vec<String>,
    /// Certificate days left below which the result is WARNING (default 14; https only).
    #[serde(default = "d14")]
    pub cert_warning_days: f64,
    /// Certificate days left below which the result is CRITICAL (default 7; https only).
    #[serde(default = "d7")]
    pub cert_critical_days: f64,
    /// Longest acceptable response time (`2s`).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_response_time: Option<Duration>,
    /// TLS options, as for `http` (`ca_file`, `insecure_skip_verify`, client certificate).
    #[serde(default, skip_serializing_if = "is_default_tls")]
    pub tls: HttpTls,
}

fn is_default_tls(t: &HttpTls) -> bool {
    *t == HttpTls::default()
}

impl WebCheck {
    /// The `http` check that fetches the page.
    pub fn to_http(&self) -> HttpCheck {
        HttpCheck {
            request: HttpRequest {
                method: "GET".into(),
                url: self.url.clone(),
                headers: Default::default(),
                body: None,
                multipart: None,
                follow_redirects: true,
            },
            expect: HttpExpect {
                status: self.status.clone(),
                body_contains: self.keywords.clone(),
                body_not_contains: self.absent.clone(),
                max_response_time: self.max_response_time,
                ..HttpExpect::default()
            },
            tls: self.tls.clone(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        self.to_http().validate()?;
        if self
            .keywords
            .iter()
            .chain(&self.absent)
            .any(String::is_empty)
        {
            return Err(invalid("keywords", "a keyword is empty"));
        }
        crate::threshold::validate_pair(
            "cert_warning_days",
            self.cert_critical_days,
            self.cert_warning_days,
            None,
        )
        .map_err(|_| {
            invalid(
                "cert_warning_days",
                "must be at least cert_critical_days, both >= 0",
            )
        })?;
        Ok(())
    }

    pub(crate) async fn run(&self, timeout: Duration, files: &Attachments) -> Outcome {
        let start = Instant::now();
        let http = self.to_http();
        let page = http.run(timeout, files);
        let cert = async {
            if self.url.starts_with("https://") {
                let left = internal_deadline(timeout);
                Some(
                    tokio::time::timeout(left, self.probe_certificate())
                        .await
                        .unwrap_or_else(|_| Err("timed out reading the certificate".into())),
                )
            } else {
                None
            }
        };
        let (mut o, cert) = tokio::join!(page, cert);
        if let Some(cert) = cert {
            match cert {
                Ok((days, subject)) => {
                    let st = if days < self.cert_critical_days {
                        Status::Critical
                    } else if days < self.cert_warning_days {
                        Status::Warning
                    } else {
                        Status::Ok
                    };
                    let text = if days < 0.0 {
                        format!("certificate expired {:.1} days ago", -days)
                    } else {
                        format!("certificate expires in {days:.1} days")
                    };
                    if st != Status::Ok {
                        let limit = if st == Status::Critical {
                            self.cert_critical_days
                        } else {
                            self.cert_warning_days
                        };
                        o.message =
                            format!("{} (below {limit} days, {subject}); {}", text, o.message);
                    } else {
                        o.message = format!("{}, {text}", o.message);
                    }
                    o.status = worst(o.status, st);
                    let mut m = Metric::new("cert_days_left", days, "d");
                    // Nagios ranges: alert below the threshold.
                    m.warn = format!("{}:", self.cert_warning_days);
                    m.crit = format!("{}:", self.cert_critical_days);
                    o.metrics.push(m);
                }
                // The page fetch reports connection problems already; only say why the
                // certificate could not be judged.
                Err(e) => {
                    o.message = format!("{}; certificate not checked: {e}", o.message);
                    o.status = worst(o.status, Status::Unknown);
                }
            }
        }
        o.duration = start.elapsed();
        tracing::debug!(url = %crate::http::shown_url(&self.url), status = %o.status, message = %o.message,
            "web check finished");
        o
    }

    /// One TLS handshake that accepts any certificate and records the chain (expired ones too:
    /// their expiry is what this reports; the page fetch verifies the certificate).
    async fn probe_certificate(&self) -> Result<(f64, String), String> {
        let url = reqwest::Url::parse(&self.url).map_err(|e| e.to_string())?;
        let host = url.host_str().ok_or("URL has no host")?.to_string();
        let port = url.port_or_known_default().unwrap_or(443);
        let chain: PeerChain = Arc::new(Mutex::new(Vec::new()));
        let config = client_config(None, false, None, Some(chain.clone()), &[b"http/1.1"])?;
        let name = rustls::pki_types::ServerName::try_from(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
        )
        .map_err(|e| format!("{host}: {e}"))?;
        let tcp = tokio::net::TcpStream::connect((
            host.trim_start_matches('[').trim_end_matches(']'),
            port,
        ))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {host}:{port}: {e}"))?;
        drop(tls);
        let chain = chain.lock().map(|c| c.clone()).unwrap_or_default();
        leaf_expiry(&chain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CheckSpec;

    fn spec(v: serde_json::Value) -> CheckSpec {
        let s: CheckSpec = serde_json::from_value(v).unwrap();
        s.validate().unwrap();
        s
    }

    /// A local HTTPS page whose self-signed certificate expires in `days` days.
    async fn serve_tls_expiring(days: i64) -> (String, String) {
        let cert = vigil_testkit::pki::self_signed(&["127.0.0.1"], days);
        let url =
            vigil_testkit::https::serve_url(cert.rustls_server(), "welcome to the vigil shop")
                .await;
        (url, cert.pem)
    }

    #[tokio::test]
    async fn certificate_expiring_in_three_days() {
        let (url, pem) = serve_tls_expiring(3).await;
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, pem).unwrap();
        let files = Attachments::default();

        // Defaults: warning 14, critical 7 -> 3 days left is CRITICAL.
        let o = spec(
            serde_json::json!({"type": "web", "url": url, "tls": {"ca_file": ca},
            "keywords": ["vigil shop"]}),
        )
        .run(&files)
        .await;
        assert_eq!(o.status, Status::Critical, "{}", o.message);
        assert!(
            o.message.starts_with("certificate expires in 3.0 days"),
            "{}",
            o.message
        );
        let m = o
            .metrics
            .iter()
            .find(|m| m.label == "cert_days_left")
            .unwrap();
        assert!(m.value > 2.9 && m.value <= 3.0, "{m:?}");
        assert_eq!((m.warn.as_str(), m.crit.as_str()), ("14:", "7:"));

        // warning 7, critical 2 -> WARNING.
        let o = spec(
            serde_json::json!({"type": "web", "url": url, "tls": {"ca_file": ca},
            "cert_warning_days": 7, "cert_critical_days": 2}),
        )
        .run(&files)
        .await;
        assert_eq!(o.status, Status::Warning, "{}", o.message);

        // warning 2, critical 1 -> OK, the page fetch message first.
        let o = spec(
            serde_json::json!({"type": "web", "url": url, "tls": {"ca_file": ca},
            "cert_warning_days": 2, "cert_critical_days": 1}),
        )
        .run(&files)
        .await;
        assert_eq!(o.status, Status::Ok, "{}", o.message);
        assert!(o.message.starts_with("HTTP 200"), "{}", o.message);
        assert!(
            o.message.ends_with("certificate expires in 3.0 days"),
            "{}",
            o.message
        );
    }

    #[tokio::test]
    async fn expired_certificate_is_critical_with_its_age() {
        let (url, _) = serve_tls_expiring(-2).await;
        let o = spec(serde_json::json!({"type": "web", "url": url,
            "tls": {"insecure_skip_verify": true}}))
        .run(&Attachments::default())
        .await;
        assert_eq!(o.status, Status::Critical, "{}", o.message);
        assert!(
            o.message.starts_with("certificate expired 2.0 days ago"),
            "{}",
            o.message
        );
    }

    async fn serve_page() -> String {
        use axum::{Router, routing::get};
        let app = Router::new().route(
            "/",
            get(|| async { "<html><h1>Vigil shop</h1><p>all systems normal</p></html>" }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn keywords_present_and_absent() {
        let url = serve_page().await;
        let files = Attachments::default();
        let o = spec(serde_json::json!({"type": "web", "url": url,
            "keywords": ["Vigil shop", "normal"], "absent": ["maintenance"]}))
        .run(&files)
        .await;
        assert_eq!(o.status, Status::Ok, "{}", o.message);
        assert!(!o.metrics.iter().any(|m| m.label == "cert_days_left"));

        let o = spec(serde_json::json!({"type": "web", "url": url, "keywords": ["checkout"]}))
            .run(&files)
            .await;
        assert_eq!(o.status, Status::Critical);
        assert_eq!(o.message, "body does not contain \"checkout\"");

        let o = spec(serde_json::json!({"type": "web", "url": url, "absent": ["normal"]}))
            .run(&files)
            .await;
        assert_eq!(o.status, Status::Critical);
        assert_eq!(o.message, "body contains \"normal\"");

        let o = spec(serde_json::json!({"type": "web", "url": format!("{url}missing")}))
            .run(&files)
            .await;
        assert_eq!(o.status, Status::Critical);
        assert!(o.message.contains("404"), "{}", o.message);
    }

    #[test]
    fn validation() {
        for bad in [
            serde_json::json!({"type": "web", "url": "ftp://x/"}),
            serde_json::json!({"type": "web", "url": "http://x/", "keywords": [""]}),
            serde_json::json!({"type": "web", "url": "http://x/", "cert_warning_days": 1,
                "cert_critical_days": 5}),
        ] {
            let s: CheckSpec = serde_json::from_value(bad.clone()).unwrap();
            assert!(s.validate().is_err(), "{bad}");
        }
        let err = serde_json::from_value::<CheckSpec>(serde_json::json!({
            "type": "web", "url": "http://x/", "contains": ["a"]}))
        .unwrap_err()
        .to_string();
        assert!(err.contains("keywords"), "{err}");
    }
}
