//! Notifications: a service went down, Vigil gave up restarting it, it recovered, it started
//! flapping, it went stale or fresh again; a node went down or came back, its agent's backlog
//! grew old or cleared. Sent to generic JSON and Slack-compatible webhooks from a background task (never
//! blocking the evaluator), with retries, one alert per incident and an optional reminder.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::Service;

/// `notify:` in collector.yaml.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    #[serde(default)]
    pub webhooks: Vec<Webhook>,
    /// Repeat the alert for a service that stays down this often (default: never).
    #[serde(default, with = "humantime_serde")]
    pub reminder: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: String,
    /// `json` (the alert as a JSON object) or `slack` (`{"text": ...}`).
    #[serde(default)]
    pub format: WebhookFormat,
    /// Extra headers (e.g. an Authorization header).
    #[serde(default)]
    pub headers: HashMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    #[default]
    Json,
    Slack,
}

/// One alert, as sent to a `json` webhook.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// `down`, `gave_up`, `recovered`, `flapping`, `stale`, `fresh`, `node_down`, `node_up`,
    /// `backlog`, `backlog_cleared`, or `reminder`.
    pub event: String,
    /// The service (empty for a node's own alerts).
    pub service: String,
    pub name: String,
    pub node: String,
    pub category: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

impl Alert {
    fn slack_text(&self) -> String {
        let icon = match self.event.as_str() {
            "recovered" | "fresh" | "node_up" | "backlog_cleared" => ":white_check_mark:",
            "flapping" | "stale" | "backlog" => ":warning:",
            _ => ":rotating_light:",
        };
        if self.service.is_empty() {
            return format!(
                "{icon} node *{}*: {} — {}",
                self.node, self.event, self.reason
            );
        }
        format!(
            "{icon} *{}* ({}) on {}: {} — {}",
            self.name, self.service, self.node, self.event, self.reason
        )
    }
}

/// Handle to the sending task; cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    tx: Option<mpsc::Sender<Alert>>,
}

const QUEUE: usize = 1024;

impl Notifier {
    /// Starts the sender task (nothing if no webhook is configured).
    pub fn start(cfg: &NotifyConfig) -> Notifier {
        if cfg.webhooks.is_empty() {
            return Notifier { tx: None };
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(cfg.clone(), rx));
        Notifier { tx: Some(tx) }
    }

    fn send(&self, svc: &Service, event: &str, reason: &str) {
        let Some(tx) = &self.tx else { return };
        let alert = Alert {
            event: event.into(),
            service: svc.id.clone(),
            name: svc.name.clone(),
            node: svc.node.clone(),
            category: svc.category.as_str().into(),
            reason: reason.into(),
            at: Utc::now(),
        };
        if tx.try_send(alert).is_err() {
            tracing::error!(service = %svc.id, event, "notification queue full; alert dropped");
        }
    }

    pub fn down(&self, svc: &Service, reason: &str) {
        self.send(svc, "down", reason)
    }
    pub fn gave_up(&self, svc: &Service, reason: &str) {
        self.send(svc, "gave_up", reason)
    }
    pub fn recovered(&self, svc: &Service, reason: &str) {
        self.send(svc, "recovered", reason)
    }
    pub fn flapping(&self, svc: &Service, reason: &str) {
        self.send(svc, "flapping", reason)
    }
    pub fn stale(&self, svc: &Service, reason: &str) {
        self.send(svc, "stale", reason)
    }
    pub fn fresh(&self, svc: &Service, reason: &str) {
        self.send(svc, "fresh", reason)
    }

    /// An alert about a node itself (`node_down`, `node_up`, `backlog`, `backlog_cleared`).
    pub fn node(&self, node: &str, event: &str, reason: &str) {
        let Some(tx) = &self.tx else { return };
        let alert = Alert {
            event: event.into(),
            service: String::new(),
            name: node.into(),
            node: node.into(),
            category: "node".into(),
            reason: reason.into(),
            at: Utc::now(),
        };
        if tx.try_send(alert).is_err() {
            tracing::error!(%node, event, "notification queue full; alert dropped");
        }
    }
}

/// Which incident an alert belongs to, whether it opens (true) or closes (false) it; None for
/// alerts outside incidents.
fn incident_of(a: &Alert) -> Option<(String, bool)> {
    let (family, opens) = match a.event.as_str() {
        "down" => ("service", true),
        "recovered" => ("service", false),
        "stale" => ("stale", true),
        "fresh" => ("stale", false),
        "node_down" => ("node", true),
        "node_up" => ("node", false),
        "backlog" => ("backlog", true),
        "backlog_cleared" => ("backlog", false),
        _ => return None,
    };
    Some((format!("{family}:{}:{}", a.node, a.service), opens))
}

/// Open incidents: the down alert that opened each, for de-duplication and reminders.
struct Incident {
    alert: Alert,
    last_sent: tokio::time::Instant,
    gave_up_sent: bool,
}

async fn run(cfg: NotifyConfig, mut rx: mpsc::Receiver<Alert>) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook client; notifications are off");
            return;
        }
    };
    let mut open: HashMap<String, Incident> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        let alert = tokio::select! {
            a = rx.recv() => match a { Some(a) => a, None => return },
            _ = tick.tick() => {
                if let Some(every) = cfg.reminder {
                    let now = tokio::time::Instant::now();
                    let due: Vec<Alert> = open
                        .values_mut()
                        .filter(|i| now - i.last_sent >= every)
                        .map(|i| {
                            i.last_sent = now;
                            Alert { event: "reminder".into(), at: Utc::now(), ..i.alert.clone() }
                        })
                        .collect();
                    for a in due {
                        deliver(&client, &cfg, &a).await;
                    }
                }
                continue;
            }
        };
        // One alert per incident: down (stale, node_down, backlog) opens it, recovered (fresh,
        // node_up, backlog_cleared) closes it.
        let send = match (alert.event.as_str(), incident_of(&alert)) {
            ("gave_up", _) => {
                let key = format!("service:{}:{}", alert.node, alert.service);
                match open.get_mut(&key) {
                    Some(i) if i.gave_up_sent => false,
                    Some(i) => {
                        i.gave_up_sent = true;
                        true
                    }
                    None => true,
                }
            }
            (_, Some((key, true))) => match open.entry(key) {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(Incident {
                        alert: alert.clone(),
                        last_sent: tokio::time::Instant::now(),
                        gave_up_sent: false,
                    });
                    true
                }
            },
            (_, Some((key, false))) => open.remove(&key).is_some(),
            _ => true,
        };
        if send {
            deliver(&client, &cfg, &alert).await;
        }
    }
}

async fn deliver(client: &reqwest::Client, cfg: &NotifyConfig, alert: &Alert) {
    for hook in &cfg.webhooks {
        let body = match hook.format {
            WebhookFormat::Json => serde_json::to_value(alert).unwrap_or_default(),
            WebhookFormat::Slack => serde_json::json!({ "text": alert.slack_text() }),
        };
        let mut delay = Duration::from_millis(500);
        for attempt in 1..=3 {
            let mut req = client.post(&hook.url).json(&body);
            for (k, v) in &hook.headers {
                req = req.header(k, v);
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => {
                    tracing::info!(service = %alert.service, node = %alert.node, event = %alert.event, "notification sent");
                    break;
                }
                Ok(r) => {
                    tracing::warn!(status = %r.status(), attempt, event = %alert.event, "webhook refused the notification")
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, event = %alert.event, "webhook unreachable")
                }
            }
            if attempt == 3 {
                tracing::error!(service = %alert.service, event = %alert.event, "notification not delivered after 3 attempts");
            } else {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A webhook receiver on 127.0.0.1:0 that answers 500 to the first `fail_first` posts.
    async fn receiver(fail_first: usize) -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
        use axum::{Json, Router, http::StatusCode, routing::post};
        let got = Arc::new(Mutex::new(Vec::new()));
        let tries = Arc::new(Mutex::new(0usize));
        let sink = got.clone();
        let app = Router::new().route(
            "/",
            post(move |Json(v): Json<serde_json::Value>| {
                let (sink, tries) = (sink.clone(), tries.clone());
                async move {
                    let mut t = tries.lock().unwrap();
                    *t += 1;
                    if *t <= fail_first {
                        return StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    sink.lock().unwrap().push(v);
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, got)
    }

    fn service() -> Service {
        Service {
            id: "api".into(),
            name: "The API".into(),
            category: crate::config::Category::Api,
            node: "n1".into(),
            description: String::new(),
            check: serde_json::from_value(
                serde_json::json!({"type": "tcp", "address": "127.0.0.1:1"}),
            )
            .unwrap(),
            control: None,
            action: crate::config::FailureAction::Notify,
            thresholds: crate::config::Thresholds {
                after: 1,
                recover_after: 1,
                flap_high: 50,
                flap_low: 25,
            },
            max_restarts: 1,
            within: Duration::from_secs(60),
            retry_after: Duration::from_secs(60),
            grace: Duration::ZERO,
            depends_on: vec![],
            command_deadline: Duration::from_secs(60),
            stale_after_explicit: None,
            on_stale: crate::config::OnStale::Alert,
            source: "api.yaml".into(),
            explicit: Default::default(),
            labels: Default::default(),
        }
    }

    async fn wait_len(got: &Arc<Mutex<Vec<serde_json::Value>>>, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while got.lock().unwrap().len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {:?}",
                got.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn one_alert_per_incident_retried_until_delivered_in_both_formats() {
        let (json_url, json) = receiver(1).await; // the first post fails: retried
        let (slack_url, slack) = receiver(0).await;
        let n = Notifier::start(&NotifyConfig {
            webhooks: vec![
                Webhook {
                    url: json_url,
                    format: WebhookFormat::Json,
                    headers: HashMap::new(),
                },
                Webhook {
                    url: slack_url,
                    format: WebhookFormat::Slack,
                    headers: HashMap::new(),
                },
            ],
            reminder: None,
        });
        let s = service();
        n.down(&s, "3 consecutive failures");
        n.down(&s, "again"); // same incident: no second alert
        n.gave_up(&s, "budget spent");
        n.gave_up(&s, "budget spent"); // once per incident
        n.recovered(&s, "2 consecutive successes");
        n.recovered(&s, "again"); // no open incident: nothing
        n.down(&s, "a new incident");
        wait_len(&json, 4).await;
        wait_len(&slack, 4).await;
        let events: Vec<String> = json
            .lock()
            .unwrap()
            .iter()
            .map(|v| v["event"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(events, ["down", "gave_up", "recovered", "down"]);
        // Node and staleness incidents are their own: one alert each way.
        n.node("n1", "node_down", "its agent disconnected");
        n.node("n1", "node_down", "still");
        n.stale(&s, "no result for 95 s");
        n.stale(&s, "still");
        n.fresh(&s, "a result arrived");
        n.node("n1", "node_up", "back");
        n.node("n1", "node_up", "again");
        wait_len(&json, 8).await;
        let events: Vec<String> = json.lock().unwrap()[4..]
            .iter()
            .map(|v| v["event"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(events, ["node_down", "stale", "fresh", "node_up"]);
        assert_eq!(json.lock().unwrap()[4]["service"], "");
        let first = json.lock().unwrap()[0].clone();
        assert_eq!(first["service"], "api");
        assert_eq!(first["node"], "n1");
        assert_eq!(first["reason"], "3 consecutive failures");
        let text = slack.lock().unwrap()[0]["text"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            text.contains("The API")
                && text.contains("down")
                && text.contains("3 consecutive failures"),
            "{text}"
        );
    }
}
