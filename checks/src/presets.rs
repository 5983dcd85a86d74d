//! Platform presets: thin specs that expand into `http` checks (no runner logic of their own).
//! `docker_engine` (`/_ping` then `/version` of the Docker Engine API over TCP), `lxd` and
//! `incus` (`/1.0` with a client certificate, JSON `metadata`), `proxmox` (`/api2/json/version`
//! with an API token whose secret comes from an environment variable, never from the config).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::http::{HttpCheck, HttpExpect, HttpRequest, HttpTls, JsonExpect};
use crate::threshold::invalid;
use crate::{Attachments, Outcome, SpecError, Status};

fn join(base: &str, path: &str) -> String {
    format!("{}{path}", base.trim_end_matches('/'))
}

fn get(
    url: String,
    headers: BTreeMap<String, String>,
    expect: HttpExpect,
    tls: &HttpTls,
) -> HttpCheck {
    HttpCheck {
        request: HttpRequest {
            method: "GET".into(),
            url,
            headers,
            body: None,
            multipart: None,
            follow_redirects: false,
        },
        expect,
        tls: tls.clone(),
    }
}

fn json_exists(path: &str) -> JsonExpect {
    JsonExpect {
        path: path.into(),
        exists: Some(true),
        equals: None,
    }
}

/// Runs the expanded checks in order; the first that is not OK is the result. Each runs with
/// what is left of the timeout.
async fn run_all(checks: &[HttpCheck], timeout: Duration) -> (Outcome, Vec<Outcome>) {
    let start = Instant::now();
    let files = Attachments::default();
    let mut done = Vec::new();
    for c in checks {
        let left = timeout.saturating_sub(start.elapsed());
        let o = c.run(left, &files).await;
        let failed = o.status != Status::Ok;
        done.push(o.clone());
        if failed {
            let mut o = o;
            o.message = format!("{} {}: {}", c.request.method, c.request.url, o.message);
            return (o, done);
        }
    }
    let mut last = done
        .last()
        .cloned()
        .unwrap_or_else(|| Outcome::new(Status::Unknown, "no request"));
    last.metrics = done.iter().flat_map(|o| o.metrics.clone()).collect();
    (last, done)
}

/// String at a JSON path of an outcome's body excerpt (for the OK message).
fn json_str(o: &Outcome, pointer: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(&o.output).ok()?;
    v.pointer(pointer)?.as_str().map(str::to_string)
}

// ---- docker_engine ----

/// A Docker engine's API, as written under `check:` with `type: docker_engine`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerEngineCheck {
    /// Base URL of the engine's TCP API: `http://host:2375`, `https://host:2376`.
    pub url: String,
    /// TLS options for `https://` (the engine's `--tlsverify` wants a client certificate).
    #[serde(default, skip_serializing_if = "is_default_tls")]
    pub tls: HttpTls,
}

fn is_default_tls(t: &HttpTls) -> bool {
    *t == HttpTls::default()
}

impl DockerEngineCheck {
    /// `GET /_ping` (body `OK`), then `GET /version` (JSON with `Version` and `ApiVersion`).
    pub fn to_http(&self) -> Vec<HttpCheck> {
        vec![
            get(
                join(&self.url, "/_ping"),
                BTreeMap::new(),
                HttpExpect {
                    body_contains: vec!["OK".into()],
                    ..HttpExpect::default()
                },
                &self.tls,
            ),
            get(
                join(&self.url, "/version"),
                BTreeMap::new(),
                HttpExpect {
                    json: vec![json_exists("$.Version"), json_exists("$.ApiVersion")],
                    ..HttpExpect::default()
                },
                &self.tls,
            ),
        ]
    }

    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        self.to_http().iter().try_for_each(HttpCheck::validate)
    }

    pub(crate) async fn run(&self, timeout: Duration) -> Outcome {
        let start = Instant::now();
        let (mut o, done) = run_all(&self.to_http(), timeout).await;
        if o.status == Status::Ok
            && let Some(v) = done.last()
        {
            o.message = format!(
                "Docker engine {} (API {}) at {}: ping OK",
                json_str(v, "/Version").unwrap_or_default(),
                json_str(v, "/ApiVersion").unwrap_or_default(),
                crate::http::shown_url(&self.url)
            );
        }
        o.duration = start.elapsed();
        o
    }
}

// ---- lxd / incus ----

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// An LXD or Incus server's REST API, as written under `check:` with `type: lxd` or
/// `type: incus` (the two speak the same `/1.0`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LxdCheck {
    /// Base URL: `https://host:8443`.
    pub url: String,
    /// TLS: `client_cert` and `client_key` (a certificate the server trusts) are required;
    /// `ca_file` is the server's certificate (LXD's is self-signed) or use `insecure_skip_verify`.
    pub tls: HttpTls,
    /// Require `metadata.auth` to be `trusted` (default true): an untrusted client certificate
    /// is CRITICAL rather than a silently thinner answer.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub require_trusted: bool,
}

impl LxdCheck {
    /// `GET /1.0`, JSON with `metadata` (and `metadata.auth == "trusted"`).
    pub fn to_http(&self) -> HttpCheck {
        let mut json = vec![json_exists("$.metadata")];
        if self.require_trusted {
            json.push(JsonExpect {
                path: "$.metadata.auth".into(),
                exists: None,
                equals: Some(serde_json::json!("trusted")),
            });
        }
        get(
            join(&self.url, "/1.0"),
            BTreeMap::new(),
            HttpExpect {
                json,
                ..HttpExpect::default()
            },
            &self.tls,
        )
    }

    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        if self.tls.client_cert.is_none() {
            return Err(invalid(
                "tls",
                "client_cert and client_key are required (the server authenticates clients by certificate)",
            ));
        }
        if !self.url.starts_with("https://") {
            return Err(invalid("url", "must be https://"));
        }
        self.to_http().validate()
    }

    pub(crate) async fn run(&self, kind: &str, timeout: Duration) -> Outcome {
        let start = Instant::now();
        let (mut o, done) = run_all(&[self.to_http()], timeout).await;
        if o.status == Status::Ok
            && let Some(v) = done.last()
        {
            o.message = format!(
                "{kind} {} at {}: API {}, auth {}",
                json_str(v, "/metadata/environment/server_version").unwrap_or_default(),
                self.url,
                json_str(v, "/metadata/api_version").unwrap_or_default(),
                json_str(v, "/metadata/auth").unwrap_or_default(),
            );
        }
        o.duration = start.elapsed();
        o
    }
}

// ---- proxmox ----

/// A Proxmox VE API, as written under `check:` with `type: proxmox`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxmoxCheck {
    /// Base URL: `https://pve1:8006`.
    pub url: String,
    /// API token id `USER@REALM!TOKENID` (`monitor@pve!vigil`).
    pub token_id: String,
    /// Name of the environment variable (of the agent) that holds the token secret. The secret
    /// itself is never written in the config.
    pub token_secret_env: String,
    /// TLS options (Proxmox's certificate is self-signed unless replaced: give `ca_file`).
    #[serde(default, skip_serializing_if = "is_default_tls")]
    pub tls: HttpTls,
}

impl ProxmoxCheck {
    /// `GET /api2/json/version` with `Authorization: PVEAPIToken=<token_id>=<secret>`.
    pub fn to_http(&self, secret: &str) -> HttpCheck {
        let mut headers = BTreeMap::new();
        headers.insert(
            "Authorization".to_string(),
            format!("PVEAPIToken={}={secret}", self.token_id),
        );
        get(
            join(&self.url, "/api2/json/version"),
            headers,
            HttpExpect {
                json: vec![json_exists("$.data.version")],
                ..HttpExpect::default()
            },
            &self.tls,
        )
    }

    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        let t = &self.token_id;
        let ok = t
            .split_once('@')
            .and_then(|(user, rest)| Some((user, rest.split_once('!')?)))
            .is_some_and(|(user, (realm, id))| {
                !user.is_empty()
                    && !realm.is_empty()
                    && !id.is_empty()
                    && !t.contains(char::is_whitespace)
            });
        if !ok {
            return Err(invalid(
                "token_id",
                format!("{t:?} is not USER@REALM!TOKENID"),
            ));
        }
        let e = &self.token_secret_env;
        if e.is_empty() || !e.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(invalid(
                "token_secret_env",
                format!("{e:?} is not an environment variable name"),
            ));
        }
        self.to_http("x").validate()
    }

    pub(crate) async fn run(&self, timeout: Duration) -> Outcome {
        let start = Instant::now();
        let secret = match std::env::var(&self.token_secret_env) {
            Ok(s) if !s.is_empty() => s,
            _ => {
                return Outcome::new(
                    Status::Unknown,
                    format!(
                        "environment variable {} (the Proxmox token secret) is not set for the agent",
                        self.token_secret_env
                    ),
                );
            }
        };
        let (mut o, done) = run_all(&[self.to_http(&secret)], timeout).await;
        if o.status == Status::Ok
            && let Some(v) = done.last()
        {
            o.message = format!(
                "Proxmox VE {} at {}",
                json_str(v, "/data/version").unwrap_or_default(),
                self.url
            );
        }
        // The request carried the secret; never echo it back.
        o.message = o.message.replace(&secret, "***");
        o.output = o.output.replace(&secret, "***");
        o.duration = start.elapsed();
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CheckKind, CheckSpec};

    fn kind(v: serde_json::Value) -> CheckKind {
        let s: CheckSpec = serde_json::from_value(v).unwrap();
        s.validate().unwrap();
        s.kind
    }

    #[test]
    fn docker_engine_expands_to_ping_and_version() {
        let CheckKind::DockerEngine(c) =
            kind(serde_json::json!({"type": "docker_engine", "url": "http://10.0.0.5:2375/"}))
        else {
            panic!()
        };
        let h = c.to_http();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].request.method, "GET");
        assert_eq!(h[0].request.url, "http://10.0.0.5:2375/_ping");
        assert_eq!(h[0].expect.status, [200]);
        assert_eq!(h[0].expect.body_contains, ["OK"]);
        assert_eq!(h[1].request.url, "http://10.0.0.5:2375/version");
        assert_eq!(h[1].expect.json[0].path, "$.Version");
    }

    #[test]
    fn lxd_and_incus_expand_to_1_0_with_client_certificate() {
        for t in ["lxd", "incus"] {
            let k = kind(serde_json::json!({"type": t, "url": "https://h:8443",
                "tls": {"client_cert": "/etc/vigil/lxd.crt", "client_key": "/etc/vigil/lxd.key",
                        "insecure_skip_verify": true}}));
            assert_eq!(k.name(), t);
            let (CheckKind::Lxd(c) | CheckKind::Incus(c)) = k else {
                panic!()
            };
            let h = c.to_http();
            assert_eq!(h.request.url, "https://h:8443/1.0");
            assert_eq!(
                h.tls.client_cert.as_deref(),
                Some(std::path::Path::new("/etc/vigil/lxd.crt"))
            );
            assert!(h.tls.insecure_skip_verify);
            assert_eq!(h.expect.json[0].path, "$.metadata");
            assert_eq!(h.expect.json[1].equals, Some(serde_json::json!("trusted")));
        }
        // Without a client certificate the preset is refused.
        let s: CheckSpec = serde_json::from_value(serde_json::json!({"type": "lxd",
            "url": "https://h:8443", "tls": {}}))
        .unwrap();
        assert!(s.validate().is_err());
    }

    #[test]
    fn proxmox_expands_with_the_token_header() {
        let CheckKind::Proxmox(c) = kind(serde_json::json!({"type": "proxmox",
            "url": "https://pve1:8006", "token_id": "monitor@pve!vigil",
            "token_secret_env": "VIGIL_PVE_SECRET"}))
        else {
            panic!()
        };
        let h = c.to_http("s3cr3t");
        assert_eq!(h.request.url, "https://pve1:8006/api2/json/version");
        assert_eq!(
            h.request.headers["Authorization"],
            "PVEAPIToken=monitor@pve!vigil=s3cr3t"
        );
        assert_eq!(h.expect.json[0].path, "$.data.version");
        for bad in [
            serde_json::json!({"type": "proxmox", "url": "https://p:8006", "token_id": "monitor",
                "token_secret_env": "X"}),
            serde_json::json!({"type": "proxmox", "url": "https://p:8006",
                "token_id": "m@pve!v", "token_secret_env": "A B"}),
        ] {
            let s: CheckSpec = serde_json::from_value(bad.clone()).unwrap();
            assert!(s.validate().is_err(), "{bad}");
        }
        // An inline secret is not a field.
        assert!(
            serde_json::from_value::<CheckSpec>(serde_json::json!({"type": "proxmox",
                "url": "https://p:8006", "token_id": "m@pve!v", "token_secret_env": "X",
                "token_secret": "inline"}))
            .is_err()
        );
    }

    #[tokio::test]
    async fn proxmox_without_the_secret_is_unknown() {
        let c = ProxmoxCheck {
            url: "https://127.0.0.1:1".into(),
            token_id: "m@pve!v".into(),
            token_secret_env: "VIGIL_TEST_PVE_SECRET_NEVER_SET".into(),
            tls: HttpTls::default(),
        };
        let o = c.run(Duration::from_secs(2)).await;
        assert_eq!(o.status, Status::Unknown);
        assert!(
            o.message.contains("VIGIL_TEST_PVE_SECRET_NEVER_SET"),
            "{}",
            o.message
        );
    }

    async fn fake_engine(ping: &'static str) -> String {
        use axum::{Router, routing::get};
        let app = Router::new()
            .route("/_ping", get(move || async move { ping }))
            .route(
                "/version",
                get(|| async {
                    axum::Json(serde_json::json!({"Version": "20.10.24", "ApiVersion": "1.41"}))
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn docker_engine_against_a_local_server() {
        let url = fake_engine("OK").await;
        let s: CheckSpec =
            serde_json::from_value(serde_json::json!({"type": "docker_engine", "url": url}))
                .unwrap();
        s.validate().unwrap();
        let o = s.run(&Attachments::default()).await;
        assert_eq!(o.status, Status::Ok, "{}", o.message);
        assert_eq!(
            o.message,
            format!("Docker engine 20.10.24 (API 1.41) at {url}: ping OK")
        );
        assert_eq!(o.metrics.len(), 4, "{:?}", o.metrics);

        let url = fake_engine("starting").await;
        let s: CheckSpec =
            serde_json::from_value(serde_json::json!({"type": "docker_engine", "url": url}))
                .unwrap();
        let o = s.run(&Attachments::default()).await;
        assert_eq!(o.status, Status::Critical);
        assert_eq!(
            o.message,
            format!("GET {url}/_ping: body does not contain \"OK\"")
        );
    }
}
