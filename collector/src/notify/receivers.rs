//! Alert receivers behind one trait: JSON webhook, Slack webhook, email over SMTP (lettre,
//! STARTTLS) and PagerDuty Events API v2. Each renders the stored alert in its own format and
//! sends it once; the delivery worker retries. Every alert carries its stable id (`id` in JSON
//! bodies, an `Idempotency-Key` header, the email's Message-ID): delivery is at least once, so
//! receivers de-duplicate on it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::{Webhook, WebhookFormat, is_resolve};
use crate::secret::{self, Secret};
use crate::store::AlertRow;

/// HTTP receivers give up an attempt after this long.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// PagerDuty's Events API v2.
pub const PAGERDUTY_URL: &str = "https://events.pagerduty.com/v2/enqueue";

/// One entry of `notify.receivers`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ReceiverConfig {
    /// POSTs the alert as a JSON object.
    Webhook(WebhookReceiver),
    /// POSTs `{"text": ...}` to a Slack incoming webhook.
    Slack(WebhookReceiver),
    /// Sends an email over SMTP.
    Email(EmailReceiver),
    /// PagerDuty Events API v2: trigger and resolve, deduplicated by the incident.
    Pagerduty(PagerDutyReceiver),
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookReceiver {
    pub name: String,
    /// The URL; one of `url`, `url_file`, `url_env` (a Slack webhook URL is itself a secret).
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    #[serde(default)]
    pub url_env: Option<String>,
    /// Extra headers (e.g. an Authorization header), inline,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// or each read from a file,
    #[serde(default)]
    pub headers_file: BTreeMap<String, PathBuf>,
    /// or from an environment variable.
    #[serde(default)]
    pub headers_env: BTreeMap<String, String>,
    /// What `validate` read; never serialized, never shown.
    #[serde(skip)]
    pub resolved: ResolvedHttp,
}

/// The URL and header values of an HTTP receiver as read from the config, files and
/// environment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResolvedHttp {
    pub url: Secret,
    pub headers: BTreeMap<String, Secret>,
}

impl WebhookReceiver {
    /// Reads the URL and every header value (inline, file or environment); errors name the key.
    fn resolve(&mut self, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<(), (String, String)> {
        let url = secret::resolve(
            secret::Ways {
                key: "url",
                inline: self.url.as_deref(),
                file: self.url_file.as_deref(),
                env: self.url_env.as_deref(),
            },
            resolve,
        )?
        .ok_or_else(|| {
            (
                "url".to_string(),
                "missing: give url, url_file or url_env".to_string(),
            )
        })?;
        // The URL's own text is shown only when it is written inline (it is no secret then).
        check_url(url.expose()).map_err(|r| {
            let key = if self.url.is_some() {
                "url"
            } else {
                "url_file"
            };
            let r = if self.url.is_some() {
                r
            } else {
                "is not an http(s) URL with a host".to_string()
            };
            (key.to_string(), r)
        })?;
        let mut headers = BTreeMap::new();
        let names = self
            .headers
            .keys()
            .chain(self.headers_file.keys())
            .chain(self.headers_env.keys());
        for k in names {
            let value = secret::resolve(
                secret::Ways {
                    key: "headers",
                    inline: self.headers.get(k).map(String::as_str),
                    file: self.headers_file.get(k).map(PathBuf::as_path),
                    env: self.headers_env.get(k).map(String::as_str),
                },
                resolve,
            )
            .map_err(|(key, r)| (format!("{key}.{k}"), r))?
            .unwrap_or_default();
            reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| (format!("headers.{k}"), e.to_string()))?;
            reqwest::header::HeaderValue::from_str(value.expose()).map_err(|_| {
                (
                    format!("headers.{k}"),
                    "the value is not a valid header value (a line break or control character?)"
                        .into(),
                )
            })?;
            headers.insert(k.clone(), value);
        }
        self.resolved = ResolvedHttp { url, headers };
        Ok(())
    }
}

/// STARTTLS on an SMTP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StartTls {
    /// The server must offer STARTTLS (the default).
    #[default]
    Required,
    /// STARTTLS when offered, plain text otherwise.
    Opportunistic,
    /// Plain text (only for a relay on the same host).
    None,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmailReceiver {
    pub name: String,
    pub host: String,
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    #[serde(default)]
    pub starttls: StartTls,
    /// SMTP AUTH user (with `password_file` or `password_env`).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// The password `validate` read; never serialized, never shown.
    #[serde(skip)]
    pub resolved_password: Option<Secret>,
    pub from: String,
    pub to: Vec<String>,
    /// An extra CA (PEM) to trust for the server's certificate, besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_smtp_port() -> u16 {
    587
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PagerDutyReceiver {
    pub name: String,
    /// The integration's routing key: one of `routing_key`, `routing_key_file`,
    /// `routing_key_env`.
    #[serde(default)]
    pub routing_key: Option<String>,
    #[serde(default)]
    pub routing_key_file: Option<PathBuf>,
    #[serde(default)]
    pub routing_key_env: Option<String>,
    #[serde(default = "default_pagerduty_url")]
    pub url: String,
    /// The key `validate` read; never serialized, never shown.
    #[serde(skip)]
    pub resolved_key: Secret,
}

fn default_pagerduty_url() -> String {
    PAGERDUTY_URL.to_string()
}

/// `http://` or `https://` with a host.
pub fn check_url(url: &str) -> Result<(), String> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        Ok(u) => Err(format!(
            "{url:?} is not an http(s) URL with a host (scheme {})",
            u.scheme()
        )),
        Err(e) => Err(format!("{url:?} is not a URL: {e}")),
    }
}

impl ReceiverConfig {
    pub fn name(&self) -> &str {
        match self {
            ReceiverConfig::Webhook(w) | ReceiverConfig::Slack(w) => &w.name,
            ReceiverConfig::Email(e) => &e.name,
            ReceiverConfig::Pagerduty(p) => &p.name,
        }
    }

    /// The receiver an entry of the older `notify.webhooks:` list stands for.
    pub fn from_webhook(i: usize, w: &Webhook) -> ReceiverConfig {
        let r = WebhookReceiver {
            name: format!("webhook-{}", i + 1),
            url: Some(w.url.clone()),
            url_file: None,
            url_env: None,
            headers: w
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            headers_file: w.headers_file.clone(),
            headers_env: w.headers_env.clone(),
            resolved: ResolvedHttp::default(),
        };
        match w.format {
            WebhookFormat::Json => ReceiverConfig::Webhook(r),
            WebhookFormat::Slack => ReceiverConfig::Slack(r),
        }
    }

    /// Checks URLs, addresses and files (resolving relative paths); errors name the key.
    pub fn validate(&mut self, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<(), (String, String)> {
        match self {
            ReceiverConfig::Webhook(w) | ReceiverConfig::Slack(w) => w.resolve(resolve)?,
            ReceiverConfig::Pagerduty(p) => {
                check_url(&p.url).map_err(|r| ("url".to_string(), r))?;
                p.resolved_key = secret::resolve(
                    secret::Ways {
                        key: "routing_key",
                        inline: p.routing_key.as_deref(),
                        file: p.routing_key_file.as_deref(),
                        env: p.routing_key_env.as_deref(),
                    },
                    resolve,
                )?
                .ok_or_else(|| {
                    (
                        "routing_key".to_string(),
                        "missing: give routing_key, routing_key_file or routing_key_env"
                            .to_string(),
                    )
                })?;
            }
            ReceiverConfig::Email(e) => {
                if e.host.is_empty() {
                    return Err(("host".into(), "is empty".into()));
                }
                e.from
                    .parse::<lettre::message::Mailbox>()
                    .map_err(|x| ("from".to_string(), format!("{:?}: {x}", e.from)))?;
                if e.to.is_empty() {
                    return Err(("to".into(), "names no address".into()));
                }
                for (i, t) in e.to.iter().enumerate() {
                    t.parse::<lettre::message::Mailbox>()
                        .map_err(|x| (format!("to[{i}]"), format!("{t:?}: {x}")))?;
                }
                e.resolved_password = secret::resolve(
                    secret::Ways {
                        key: "password",
                        inline: None,
                        file: e.password_file.as_deref(),
                        env: e.password_env.as_deref(),
                    },
                    resolve,
                )?;
                if e.username.is_some() != e.resolved_password.is_some() {
                    return Err((
                        "username".into(),
                        "username and password_file (or password_env) go together".into(),
                    ));
                }
                if let Some(p) = &mut e.password_file {
                    *p = resolve(p);
                }
                for (key, p) in [("ca_file", &mut e.ca_file)] {
                    if let Some(p) = p {
                        *p = resolve(p);
                        std::fs::read(&*p).map_err(|x| {
                            (key.to_string(), format!("cannot read {}: {x}", p.display()))
                        })?;
                    }
                }
                if let Some(ca) = &e.ca_file {
                    let pem = std::fs::read(ca).unwrap_or_default();
                    lettre::transport::smtp::client::Certificate::from_pem(&pem).map_err(|x| {
                        (
                            "ca_file".to_string(),
                            format!("{}: not a PEM certificate: {x}", ca.display()),
                        )
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// An alert row as a receiver sends it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The stable id (de-duplication key for receivers).
    pub id: String,
    pub event: String,
    /// The stored alert with `id` added.
    pub body: serde_json::Value,
}

impl Outgoing {
    pub fn of(row: &AlertRow) -> Outgoing {
        let mut body = row.payload.clone();
        if let Some(o) = body.as_object_mut() {
            o.insert("id".into(), row.uid.clone().into());
            o.insert("event".into(), row.event.clone().into());
        }
        Outgoing {
            id: row.uid.clone(),
            event: row.event.clone(),
            body,
        }
    }

    fn field(&self, k: &str) -> &str {
        self.body.get(k).and_then(|v| v.as_str()).unwrap_or("")
    }

    /// One line: what happened to what, and why.
    pub fn summary(&self) -> String {
        let (service, node, reason) = (
            self.field("service"),
            self.field("node"),
            self.field("reason"),
        );
        let affected = self
            .body
            .get("affected")
            .and_then(|a| a.as_array())
            .filter(|a| !a.is_empty())
            .map(|a| {
                let names: Vec<&str> = a.iter().filter_map(|v| v.as_str()).collect();
                format!(" (affected: {})", names.join(", "))
            })
            .unwrap_or_default();
        if service.is_empty() {
            format!("node {node}: {} — {reason}{affected}", self.event)
        } else {
            format!(
                "{} ({service}) on {node}: {} — {reason}{affected}",
                self.field("name"),
                self.event
            )
        }
    }

    /// Slack's `{"text": ...}`.
    pub fn slack(&self) -> serde_json::Value {
        let icon = if is_resolve(&self.event) {
            ":white_check_mark:"
        } else if self.field("severity") == "warning" {
            ":warning:"
        } else {
            ":rotating_light:"
        };
        serde_json::json!({ "text": format!("{icon} {}", self.summary()) })
    }

    /// A PagerDuty Events API v2 event: trigger (or resolve), deduplicated by the incident key.
    pub fn pagerduty(&self, routing_key: &str) -> serde_json::Value {
        let dedup_key = self.field("incident_key").to_string();
        if is_resolve(&self.event) {
            return serde_json::json!({
                "routing_key": routing_key,
                "event_action": "resolve",
                "dedup_key": dedup_key,
            });
        }
        let component = self.field("service");
        serde_json::json!({
            "routing_key": routing_key,
            "event_action": "trigger",
            "dedup_key": dedup_key,
            "payload": {
                "summary": self.summary().chars().take(1024).collect::<String>(),
                "source": self.field("node"),
                "severity": if self.field("severity") == "critical" { "critical" } else { "warning" },
                "component": if component.is_empty() { None } else { Some(component) },
                "group": self.field("category"),
                "class": self.event,
                "custom_details": self.body,
            },
        })
    }

    /// The email's subject and text body.
    pub fn email(&self) -> (String, String) {
        let subject = format!("[Vigil] {}", self.summary())
            .chars()
            .take(200)
            .collect::<String>();
        let pretty = serde_json::to_string_pretty(&self.body).unwrap_or_default();
        let body = format!(
            "{}\n\nAlert id: {}\nIncident: {}\n\n{pretty}\n",
            self.summary(),
            self.id,
            self.field("incident_key")
        );
        (subject, body)
    }
}

/// What one attempt did.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub ok: bool,
    pub http_status: Option<i32>,
    pub error: Option<String>,
}

impl Delivery {
    pub fn delivered(status: Option<i32>) -> Delivery {
        Delivery {
            ok: true,
            http_status: status,
            error: None,
        }
    }
    pub fn failed(status: Option<i32>, error: String) -> Delivery {
        Delivery {
            ok: false,
            http_status: status,
            error: Some(error),
        }
    }
}

/// A receiver: sends one alert once.
pub trait Receiver: Send + Sync {
    fn send<'a>(&'a self, alert: &'a Outgoing) -> BoxFuture<'a, Delivery>;
}

/// The configured receivers by name.
#[derive(Default)]
pub struct Receivers {
    by_name: HashMap<String, Arc<dyn Receiver>>,
}

impl Receivers {
    /// Builds every receiver of `cfg` (a receiver that cannot be built is logged and left out:
    /// its alerts wait, and are retried until given up).
    pub fn build(cfg: &super::NotifyConfig) -> Receivers {
        let http = match reqwest::Client::builder().timeout(HTTP_TIMEOUT).build() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the HTTP client of the alert receivers");
                return Receivers::default();
            }
        };
        let mut by_name: HashMap<String, Arc<dyn Receiver>> = HashMap::new();
        for rc in cfg.all_receivers() {
            let r: Arc<dyn Receiver> = match &rc {
                ReceiverConfig::Webhook(w) => Arc::new(Http {
                    client: http.clone(),
                    target: w.resolved.clone(),
                    format: Format::Json,
                }),
                ReceiverConfig::Slack(w) => Arc::new(Http {
                    client: http.clone(),
                    target: w.resolved.clone(),
                    format: Format::Slack,
                }),
                ReceiverConfig::Pagerduty(p) => Arc::new(Http {
                    client: http.clone(),
                    target: ResolvedHttp {
                        url: Secret::new(p.url.clone()),
                        headers: BTreeMap::new(),
                    },
                    format: Format::PagerDuty(p.resolved_key.clone()),
                }),
                ReceiverConfig::Email(e) => match Email::build(e) {
                    Ok(m) => Arc::new(m),
                    Err(err) => {
                        tracing::error!(receiver = %e.name, error = %err, "cannot set up the email receiver");
                        continue;
                    }
                },
            };
            by_name.insert(rc.name().to_string(), r);
        }
        Receivers { by_name }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Receiver>> {
        self.by_name.get(name)
    }
}

enum Format {
    Json,
    Slack,
    PagerDuty(Secret),
}

/// The HTTP receivers: JSON webhook, Slack, PagerDuty.
struct Http {
    client: reqwest::Client,
    target: ResolvedHttp,
    format: Format,
}

impl Receiver for Http {
    fn send<'a>(&'a self, alert: &'a Outgoing) -> BoxFuture<'a, Delivery> {
        Box::pin(async move {
            let body = match &self.format {
                Format::Json => alert.body.clone(),
                Format::Slack => alert.slack(),
                Format::PagerDuty(key) => alert.pagerduty(key.expose()),
            };
            let mut req = self
                .client
                .post(self.target.url.expose())
                .header("Idempotency-Key", &alert.id)
                .json(&body);
            for (k, v) in &self.target.headers {
                req = req.header(k, v.expose());
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => {
                    Delivery::delivered(Some(r.status().as_u16() as i32))
                }
                Ok(r) => {
                    let status = r.status();
                    let text: String = r
                        .text()
                        .await
                        .unwrap_or_default()
                        .chars()
                        .take(300)
                        .collect();
                    Delivery::failed(
                        Some(status.as_u16() as i32),
                        format!("HTTP {status}: {text}"),
                    )
                }
                // Without the URL: it may be the secret (a Slack webhook's path is).
                Err(e) => Delivery::failed(None, vigil_error::describe(&e.without_url())),
            }
        })
    }
}

/// Email over SMTP (lettre on tokio with rustls).
struct Email {
    transport: lettre::AsyncSmtpTransport<lettre::Tokio1Executor>,
    from: lettre::message::Mailbox,
    to: Vec<lettre::message::Mailbox>,
}

impl Email {
    fn build(e: &EmailReceiver) -> Result<Email, String> {
        use lettre::transport::smtp::authentication::Credentials;
        use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
        let params = || -> Result<TlsParameters, String> {
            let mut b = TlsParameters::builder(e.host.clone());
            if let Some(ca) = &e.ca_file {
                let pem = std::fs::read(ca).map_err(|x| format!("{}: {x}", ca.display()))?;
                b = b.add_root_certificate(Certificate::from_pem(&pem).map_err(|x| x.to_string())?);
            }
            b.build_rustls().map_err(|x| x.to_string())
        };
        let tls = match e.starttls {
            StartTls::Required => Tls::Required(params()?),
            StartTls::Opportunistic => Tls::Opportunistic(params()?),
            StartTls::None => Tls::None,
        };
        let mut b =
            lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous(&e.host)
                .port(e.port)
                .tls(tls)
                .timeout(Some(Duration::from_secs(30)));
        if let (Some(user), Some(pw)) = (&e.username, &e.resolved_password) {
            b = b.credentials(Credentials::new(user.clone(), pw.expose().to_string()));
        }
        Ok(Email {
            transport: b.build(),
            from: e.from.parse().map_err(|x| format!("from: {x}"))?,
            to: e
                .to
                .iter()
                .map(|t| t.parse())
                .collect::<Result<_, _>>()
                .map_err(|x| format!("to: {x}"))?,
        })
    }
}

impl Receiver for Email {
    fn send<'a>(&'a self, alert: &'a Outgoing) -> BoxFuture<'a, Delivery> {
        Box::pin(async move {
            use lettre::AsyncTransport;
            let (subject, body) = alert.email();
            let mut m = lettre::Message::builder()
                .from(self.from.clone())
                .subject(subject)
                .message_id(Some(format!("<{}@vigil>", alert.id)));
            for t in &self.to {
                m = m.to(t.clone());
            }
            let msg = match m.body(body) {
                Ok(m) => m,
                Err(e) => return Delivery::failed(None, format!("cannot build the email: {e}")),
            };
            match self.transport.send(msg).await {
                Ok(r) => Delivery::delivered(Some(u16::from(r.code()) as i32)),
                Err(e) => Delivery::failed(
                    e.status().map(|c| u16::from(c) as i32),
                    vigil_error::describe(&e),
                ),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(event: &str, severity: &str) -> Outgoing {
        let row = AlertRow {
            id: 7,
            uid: "u-1".into(),
            incident_id: 3,
            event: event.into(),
            receiver: "r".into(),
            payload: serde_json::json!({
                "event": "down", "severity": severity, "service": "api", "name": "The API",
                "node": "n1", "category": "api", "labels": {}, "reason": "3 consecutive failures",
                "incident_id": 3, "incident_key": "service:n1:api", "affected": ["web"],
            }),
            created_at: chrono::Utc::now(),
            next_attempt_at: chrono::Utc::now(),
            attempts: 1,
            delivered_at: None,
            failed_at: None,
            last_error: None,
            claimed_until: None,
            history: vec![],
        };
        Outgoing::of(&row)
    }

    #[test]
    fn json_carries_the_stable_id_and_the_event_of_the_row() {
        let o = out("recovered", "critical");
        assert_eq!(o.body["id"], "u-1");
        assert_eq!(o.body["event"], "recovered");
        assert_eq!(o.body["incident_key"], "service:n1:api");
    }

    #[test]
    fn slack_text_names_service_event_reason_and_affected() {
        let t = out("down", "critical").slack()["text"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(t.starts_with(":rotating_light:"), "{t}");
        assert!(
            t.contains("The API")
                && t.contains("down")
                && t.contains("3 consecutive failures")
                && t.contains("affected: web"),
            "{t}"
        );
        assert!(
            out("recovered", "critical").slack()["text"]
                .as_str()
                .unwrap()
                .starts_with(":white_check_mark:")
        );
        assert!(
            out("stale", "warning").slack()["text"]
                .as_str()
                .unwrap()
                .starts_with(":warning:")
        );
    }

    #[test]
    fn pagerduty_triggers_and_resolves_with_the_incident_as_dedup_key() {
        let t = out("down", "critical").pagerduty("KEY");
        assert_eq!(t["routing_key"], "KEY");
        assert_eq!(t["event_action"], "trigger");
        assert_eq!(t["dedup_key"], "service:n1:api");
        assert_eq!(t["payload"]["severity"], "critical");
        assert_eq!(t["payload"]["source"], "n1");
        assert_eq!(t["payload"]["component"], "api");
        assert!(
            t["payload"]["summary"]
                .as_str()
                .unwrap()
                .contains("The API")
        );
        let w = out("flapping", "warning").pagerduty("KEY");
        assert_eq!(w["payload"]["severity"], "warning");
        for ev in [
            "recovered",
            "silenced",
            "flapping_ended",
            "node_up",
            "fresh",
            "backlog_cleared",
            "removed",
        ] {
            let r = out(ev, "critical").pagerduty("KEY");
            assert_eq!(r["event_action"], "resolve", "{ev}");
            assert_eq!(r["dedup_key"], "service:n1:api");
        }
    }

    #[test]
    fn email_has_the_alert_and_its_id() {
        let (subject, body) = out("down", "critical").email();
        assert!(
            subject.starts_with("[Vigil] The API (api) on n1: down"),
            "{subject}"
        );
        assert!(
            body.contains("Alert id: u-1") && body.contains("3 consecutive failures"),
            "{body}"
        );
    }
}
