//! Alerts you can trust: every alert belongs to an incident stored in PostgreSQL and is written
//! to the alert outbox (one row per receiver) in the transaction that opens or closes the
//! incident, before anything is sent; a delivery worker sends the rows at least once, with
//! backoff, in order per incident and receiver, and records every attempt. The quiet rules
//! (stopped, paused, maintenance, flapping, a dependency down) are read from the database.
//! Receivers: JSON webhook, Slack webhook, email over SMTP, PagerDuty Events API v2
//! ([`receivers`]); routes choose them per alert ([`route`]).

pub mod receivers;
pub mod route;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::config::{Config, Service};
use crate::store::{Attempt, NewIncident, Opened, Store, incident_key};
pub use receivers::{Delivery, Outgoing, Receiver, ReceiverConfig, Receivers};
pub use route::{Route, RouteMatch};

/// `notify:` in collector.yaml.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// Plain webhooks (the older form): each becomes a receiver named `webhook-<n>` (from 1).
    #[serde(default)]
    pub webhooks: Vec<Webhook>,
    /// Named receivers (webhook, slack, email, pagerduty).
    #[serde(default)]
    pub receivers: Vec<ReceiverConfig>,
    /// Which receivers get which alert; none: every receiver gets everything.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Repeat the alert of an open, unacknowledged incident this often (default: never).
    #[serde(default, with = "humantime_serde")]
    pub reminder: Option<Duration>,
    /// An alert not delivered after this long is given up (default 24 h).
    #[serde(default = "default_give_up_after", with = "humantime_serde")]
    pub give_up_after: Duration,
    /// The longest wait between two delivery attempts (from 1 s, doubling; default 5 min).
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
}

fn default_give_up_after() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(300)
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            webhooks: Vec::new(),
            receivers: Vec::new(),
            routes: Vec::new(),
            reminder: None,
            give_up_after: default_give_up_after(),
            max_backoff: default_max_backoff(),
        }
    }
}

/// One entry of the older `notify.webhooks:` list.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: String,
    /// `json` (the alert as a JSON object) or `slack` (`{"text": ...}`).
    #[serde(default)]
    pub format: WebhookFormat,
    /// Extra headers (e.g. an Authorization header), inline,
    #[serde(default)]
    pub headers: HashMap<String, String>,
    /// or each read from a file,
    #[serde(default)]
    pub headers_file: BTreeMap<String, std::path::PathBuf>,
    /// or from an environment variable.
    #[serde(default)]
    pub headers_env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    #[default]
    Json,
    Slack,
}

/// A problem in `notify:` (the config module adds the file name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyInvalid {
    pub key: String,
    pub reason: String,
}

impl NotifyConfig {
    /// Every receiver, the older `webhooks:` included (as `webhook-<n>`).
    pub fn all_receivers(&self) -> Vec<ReceiverConfig> {
        let mut out: Vec<ReceiverConfig> = self
            .webhooks
            .iter()
            .enumerate()
            .map(|(i, w)| ReceiverConfig::from_webhook(i, w))
            .collect();
        out.extend(self.receivers.iter().cloned());
        out
    }

    /// Every file a receiver reads a secret from, with its config key (paths as written).
    pub fn secret_files(&self) -> Vec<(String, std::path::PathBuf)> {
        let mut out = Vec::new();
        for (i, w) in self.webhooks.iter().enumerate() {
            for (h, p) in &w.headers_file {
                out.push((format!("notify.webhooks[{i}].headers_file.{h}"), p.clone()));
            }
        }
        for (i, r) in self.receivers.iter().enumerate() {
            let key = |k: &str| format!("notify.receivers[{i}].{k}");
            match r {
                ReceiverConfig::Webhook(w) | ReceiverConfig::Slack(w) => {
                    if let Some(p) = &w.url_file {
                        out.push((key("url_file"), p.clone()));
                    }
                    for (h, p) in &w.headers_file {
                        out.push((key(&format!("headers_file.{h}")), p.clone()));
                    }
                }
                ReceiverConfig::Pagerduty(p) => {
                    if let Some(f) = &p.routing_key_file {
                        out.push((key("routing_key_file"), f.clone()));
                    }
                }
                ReceiverConfig::Email(e) => {
                    if let Some(f) = &e.password_file {
                        out.push((key("password_file"), f.clone()));
                    }
                }
            }
        }
        out
    }

    /// Checks names, URLs, files and routes; relative file paths are resolved with `resolve`.
    pub fn validate(
        &mut self,
        resolve: &dyn Fn(&std::path::Path) -> std::path::PathBuf,
    ) -> Result<(), NotifyInvalid> {
        let bad = |key: String, reason: String| NotifyInvalid { key, reason };
        if self.max_backoff < Duration::from_secs(1) {
            return Err(bad(
                "notify.max_backoff".into(),
                "must be at least 1s".into(),
            ));
        }
        if self.give_up_after < Duration::from_secs(1) {
            return Err(bad(
                "notify.give_up_after".into(),
                "must be at least 1s".into(),
            ));
        }
        if self.reminder.is_some_and(|r| r < Duration::from_secs(1)) {
            return Err(bad("notify.reminder".into(), "must be at least 1s".into()));
        }
        // The older `webhooks:` become receivers here, their secrets read like the others'.
        let mut legacy = Vec::new();
        for (i, w) in self.webhooks.iter().enumerate() {
            let mut r = ReceiverConfig::from_webhook(i, w);
            r.validate(resolve)
                .map_err(|(k, reason)| bad(format!("notify.webhooks[{i}].{k}"), reason))?;
            legacy.push(r);
        }
        let mut names = std::collections::HashSet::new();
        for r in &legacy {
            names.insert(r.name().to_string());
        }
        let first = legacy.len();
        self.webhooks.clear();
        legacy.append(&mut self.receivers);
        self.receivers = legacy;
        for (i, r) in self.receivers.iter_mut().enumerate().skip(first) {
            let i = i - first;
            if r.name().is_empty() {
                return Err(bad(
                    format!("notify.receivers[{i}].name"),
                    "is empty".into(),
                ));
            }
            if !names.insert(r.name().to_string()) {
                return Err(bad(
                    format!("notify.receivers[{i}].name"),
                    format!("duplicate receiver {:?}", r.name()),
                ));
            }
            r.validate(resolve)
                .map_err(|(k, reason)| bad(format!("notify.receivers[{i}].{k}"), reason))?;
        }
        for (i, route) in self.routes.iter().enumerate() {
            if route.receivers.is_empty() {
                return Err(bad(
                    format!("notify.routes[{i}].receivers"),
                    "names no receiver".into(),
                ));
            }
            for (j, name) in route.receivers.iter().enumerate() {
                if !names.contains(name) {
                    let mut known: Vec<_> = names.iter().cloned().collect();
                    known.sort();
                    return Err(bad(
                        format!("notify.routes[{i}].receivers[{j}]"),
                        format!("unknown receiver {name:?} (known: {})", known.join(", ")),
                    ));
                }
            }
            if let Some(sev) = &route.matches.severity
                && !matches!(sev.as_str(), "critical" | "warning")
            {
                return Err(bad(
                    format!("notify.routes[{i}].match.severity"),
                    format!("{sev:?} is not critical or warning"),
                ));
            }
        }
        Ok(())
    }
}

/// The severity of an incident opened by `event`: critical for down, node_down and gave_up;
/// warning for stale, flapping and backlog. Closing events inherit their incident's.
pub fn severity_of(event: &str) -> &'static str {
    match event {
        "down" | "node_down" | "gave_up" => "critical",
        _ => "warning",
    }
}

/// Whether `event` closes an incident (PagerDuty `resolve`).
pub fn is_resolve(event: &str) -> bool {
    matches!(
        event,
        "recovered"
            | "fresh"
            | "flapping_ended"
            | "node_up"
            | "backlog_cleared"
            | "silenced"
            | "removed"
    )
}

/// The wait before the next attempt after `attempts` failed ones: 1 s, doubling, at most `max`.
pub fn backoff(attempts: i32, max: Duration) -> Duration {
    let exp = attempts.clamp(1, 32) as u32 - 1;
    Duration::from_secs(1u64 << exp.min(30)).min(max)
}

/// A worker's lease on a claimed alert row: longer than any send may take ([`SEND_LIMIT`]).
const LEASE: Duration = Duration::from_secs(90);
/// The longest one send may take, whatever the receiver (an SMTP server's timeouts are per
/// command): well inside the lease, so that no other worker claims the row meanwhile.
pub const SEND_LIMIT: Duration = Duration::from_secs(LEASE.as_secs() - 15);
/// A stale service, or a node's incident, is opened late only when its quiet condition
/// (maintenance, pause, flapping, its node down) ended at least this long ago.
const LATE_SETTLE: Duration = Duration::from_secs(10);
/// A node down or a backlog without an incident this long is opened late (the node_down alert
/// normally waits up to 4 s for the SSH heal).
const NODE_GRACE: Duration = Duration::from_secs(15);
/// Rows claimed at once (at most one per subject — a service or a node — and receiver, sent
/// concurrently).
const CLAIM: i64 = 32;
/// A down service without an incident gets one only when this long has passed since its
/// dependency, mode or flapping changed, or a start or restart ran (its next results tell).
const DEPENDENCY_SETTLE: Duration = Duration::from_secs(30);

/// The alerting side of the hub: writes incidents and alerts to the database and delivers them.
pub struct Alerts {
    store: Store,
    wake: Arc<tokio::sync::Notify>,
    receivers: std::sync::RwLock<Arc<Receivers>>,
    /// `notify.give_up_after`, `notify.max_backoff` in force.
    timing: std::sync::RwLock<(Duration, Duration)>,
}

/// The opening event, family and incident severity of service events that open incidents.
fn opening_family(event: &str) -> Option<&'static str> {
    match event {
        "down" => Some("service"),
        "stale" => Some("stale"),
        "flapping" => Some("flapping"),
        "node_down" => Some("node"),
        "backlog" => Some("backlog"),
        _ => None,
    }
}

/// The family and resolution of closing events.
fn closing_family(event: &str) -> Option<(&'static str, &'static str)> {
    match event {
        "recovered" => Some(("service", "recovered")),
        "fresh" => Some(("stale", "a result arrived again")),
        "flapping_ended" => Some(("flapping", "stopped flapping")),
        "node_up" => Some(("node", "node up")),
        "backlog_cleared" => Some(("backlog", "backlog cleared")),
        _ => None,
    }
}

impl Alerts {
    pub fn new(store: Store, cfg: &NotifyConfig) -> Alerts {
        Alerts {
            store,
            wake: Arc::new(tokio::sync::Notify::new()),
            receivers: std::sync::RwLock::new(Arc::new(Receivers::build(cfg))),
            timing: std::sync::RwLock::new((cfg.give_up_after, cfg.max_backoff)),
        }
    }

    /// Puts a new `notify:` in force (receivers, backoff); rows already enqueued keep their
    /// receivers.
    pub fn configure(&self, cfg: &NotifyConfig) {
        *self.receivers.write().expect("receivers lock") = Arc::new(Receivers::build(cfg));
        *self.timing.write().expect("timing lock") = (cfg.give_up_after, cfg.max_backoff);
    }

    /// A service event: `down`, `recovered`, `stale`, `fresh`, `flapping`, `flapping_ended`,
    /// `gave_up`. Written to the database (or not, by the quiet rules) before this returns; a
    /// failure to write is logged as an error (the alert is not sent from memory instead).
    pub async fn service_event(&self, cfg: &Config, svc: &Service, event: &str, reason: &str) {
        let r = self.service_event_inner(cfg, svc, event, reason).await;
        match r {
            Ok(true) => self.wake.notify_one(),
            Ok(false) => {}
            Err(e) => tracing::error!(
                service = %svc.id, node = %svc.node, event, error = %e,
                "ALERT NOT RECORDED: cannot write the incident and its alert to the database"
            ),
        }
    }

    async fn service_event_inner(
        &self,
        cfg: &Config,
        svc: &Service,
        event: &str,
        reason: &str,
    ) -> Result<bool, crate::store::StoreError> {
        if let Some(family) = opening_family(event) {
            let severity = severity_of(event);
            let payload = payload(event, severity, svc, reason);
            let receivers = route::route(&cfg.notify, &payload);
            let dependents: Vec<String> = cfg
                .services
                .iter()
                .filter(|s| s.depends_on.contains(&svc.id))
                .map(|s| s.id.clone())
                .collect();
            let opened = self
                .store
                .open_incident(&NewIncident {
                    family,
                    node: &svc.node,
                    service_id: Some(&svc.id),
                    severity,
                    event,
                    reason,
                    payload,
                    receivers: &receivers,
                    depends_on: &svc.depends_on,
                    dependents: &dependents,
                    settle: None,
                })
                .await?;
            log_opened(&svc.id, event, &opened);
            return Ok(matches!(opened, Opened::Opened(_)));
        }
        if let Some((family, resolution)) = closing_family(event) {
            let key = incident_key(family, &svc.node, Some(&svc.id));
            let closed = self
                .store
                .close_incident(&key, event, reason, resolution)
                .await?;
            if let Some(id) = closed {
                tracing::info!(service = %svc.id, event, incident = id, "incident closed");
            }
            return Ok(closed.is_some());
        }
        if event == "gave_up" {
            let key = incident_key("service", &svc.node, Some(&svc.id));
            return self.store.incident_gave_up(&key, reason).await;
        }
        tracing::error!(service = %svc.id, event, "unknown alert event");
        Ok(false)
    }

    /// The service stopped flapping: its flapping incident closes (`flapping_ended`, saying the
    /// state now); then, steady again, a down service opens a normal incident and a healthy one
    /// closes the incident left open from before it flapped.
    pub async fn flapping_ended(&self, cfg: &Config, svc: &Service, state: &str, reason: &str) {
        self.service_event(cfg, svc, "flapping_ended", reason).await;
        match state {
            "down" => {
                self.service_event(cfg, svc, "down", "down when it stopped flapping")
                    .await
            }
            "healthy" => {
                self.service_event(cfg, svc, "recovered", "healthy when it stopped flapping")
                    .await
            }
            _ => {}
        }
    }

    /// A node event: `node_down`, `node_up`, `backlog`, `backlog_cleared`.
    pub async fn node_event(&self, cfg: &Config, node: &str, event: &str, reason: &str) {
        let r: Result<bool, crate::store::StoreError> = async {
            if let Some(family) = opening_family(event) {
                let severity = severity_of(event);
                let payload = serde_json::json!({
                    "event": event, "severity": severity, "service": "", "name": node,
                    "node": node, "category": "node", "labels": {}, "reason": reason,
                    "at": Utc::now(),
                });
                let receivers = route::route(&cfg.notify, &payload);
                let opened = self
                    .store
                    .open_incident(&NewIncident {
                        family,
                        node,
                        service_id: None,
                        severity,
                        event,
                        reason,
                        payload,
                        receivers: &receivers,
                        depends_on: &[],
                        dependents: &[],
                        settle: None,
                    })
                    .await?;
                log_opened(node, event, &opened);
                Ok(matches!(opened, Opened::Opened(_)))
            } else if let Some((family, resolution)) = closing_family(event) {
                let key = incident_key(family, node, None);
                Ok(self
                    .store
                    .close_incident(&key, event, reason, resolution)
                    .await?
                    .is_some())
            } else {
                tracing::error!(%node, event, "unknown alert event");
                Ok(false)
            }
        }
        .await;
        match r {
            Ok(true) => self.wake.notify_one(),
            Ok(false) => {}
            Err(e) => tracing::error!(
                %node, event, error = %e,
                "ALERT NOT RECORDED: cannot write the incident and its alert to the database"
            ),
        }
    }

    /// What the database says is due but no transition raised: incidents of services (and
    /// nodes) that went quiet close as silenced; incidents whose condition is over (fresh, node
    /// up, backlog cleared: the closing transition was lost) or whose service or node was
    /// removed from the config close; down services without an incident (their alert was held
    /// back while flapping, paused or behind a dependency) open one, and so do stale services,
    /// down nodes and backlogs whose alert was held back (maintenance, pause, node down) or
    /// lost; open service incidents of services healthy again close.
    pub async fn catch_up(&self, cfg: &Config) {
        match self.store.silence_quiet_incidents().await {
            Ok(s) if !s.is_empty() => self.wake.notify_one(),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "alerts: cannot close silenced incidents"),
        }
        match self.store.close_settled_incidents().await {
            Ok(closed) => {
                for (key, event) in &closed {
                    tracing::info!(incident = %key, event = %event, "incident closed by the catch-up");
                }
                if !closed.is_empty() {
                    self.wake.notify_one();
                }
            }
            Err(e) => tracing::error!(error = %e, "alerts: cannot close settled incidents"),
        }
        match self
            .store
            .alert_catch_up_late(LATE_SETTLE, NODE_GRACE, cfg.checks_enabled())
            .await
        {
            Ok(late) => {
                for l in late {
                    match (l.family, l.service_id.as_deref()) {
                        ("stale", Some(id)) => {
                            let Some(svc) = cfg.service(id) else { continue };
                            tracing::warn!(service = %id, "stale without an incident: opening one");
                            let reason = format!(
                                "still stale after its alert was held back (maintenance, pause, flapping or its node down): {}",
                                l.reason
                            );
                            self.service_event(cfg, svc, "stale", &reason).await;
                        }
                        ("node", None) => {
                            tracing::warn!(node = %l.node, "node down without an incident: opening one");
                            self.node_event(cfg, &l.node, "node_down", &l.reason).await;
                        }
                        ("backlog", None) => {
                            tracing::warn!(node = %l.node, "backlog without an incident: opening one");
                            self.node_event(cfg, &l.node, "backlog", &l.reason).await;
                        }
                        _ => {}
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "alerts: cannot read what to catch up on"),
        }
        let (down, healed) = match self.store.alert_catch_up(DEPENDENCY_SETTLE).await {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "alerts: cannot read what to catch up on");
                return;
            }
        };
        for id in down {
            let Some(svc) = cfg.service(&id) else {
                continue;
            };
            let reason = "down (its alert was held back before: flapping, paused, in maintenance or behind a dependency)";
            let payload = payload("down", "critical", svc, reason);
            let receivers = route::route(&cfg.notify, &payload);
            let dependents: Vec<String> = cfg
                .services
                .iter()
                .filter(|s| s.depends_on.contains(&svc.id))
                .map(|s| s.id.clone())
                .collect();
            match self
                .store
                .open_incident(&NewIncident {
                    family: "service",
                    node: &svc.node,
                    service_id: Some(&svc.id),
                    severity: "critical",
                    event: "down",
                    reason,
                    payload,
                    receivers: &receivers,
                    depends_on: &svc.depends_on,
                    dependents: &dependents,
                    settle: Some(DEPENDENCY_SETTLE),
                })
                .await
            {
                Ok(Opened::Opened(n)) => {
                    tracing::warn!(service = %id, incident = n, "down without an incident: opened one");
                    self.wake.notify_one();
                }
                Ok(_) => {}
                Err(e) => tracing::error!(service = %id, error = %e, "ALERT NOT RECORDED"),
            }
        }
        for key in healed {
            match self
                .store
                .close_incident(&key, "recovered", "healthy again", "recovered")
                .await
            {
                Ok(Some(_)) => self.wake.notify_one(),
                Ok(None) => {}
                Err(e) => tracing::error!(%key, error = %e, "ALERT NOT RECORDED"),
            }
        }
    }

    /// The periodic part: catch-up and reminders.
    pub async fn tick(&self, cfg: &Config) {
        self.catch_up(cfg).await;
        if let Some(every) = cfg.notify.reminder {
            match self.store.remind(every).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(incidents = n, "reminders enqueued");
                    self.wake.notify_one();
                }
                Err(e) => tracing::error!(error = %e, "alerts: cannot enqueue reminders"),
            }
        }
    }

    /// Starts the delivery worker: woken at once after an enqueue, and every second.
    pub fn start_worker(self: &Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = me.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                me.deliver_due().await;
            }
        });
    }

    /// Sends every due row (claimed under a lease), recording each attempt.
    pub async fn deliver_due(&self) {
        loop {
            let rows = match self.store.claim_alerts(CLAIM, LEASE).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "alerts: cannot claim alerts to deliver");
                    return;
                }
            };
            if rows.is_empty() {
                return;
            }
            let receivers = self.receivers.read().expect("receivers lock").clone();
            let (give_up_after, max_backoff) = *self.timing.read().expect("timing lock");
            // At most one row per subject (service or node) and receiver is claimed at once:
            // sending them concurrently keeps each subject's alerts in the order written.
            let sends = rows.iter().map(|row| {
                let receivers = receivers.clone();
                async move {
                    let out = Outgoing::of(row);
                    let d = match receivers.get(&row.receiver) {
                        Some(r) => send_within(r.as_ref(), &out, SEND_LIMIT).await,
                        None => Delivery::failed(
                            None,
                            format!("receiver {:?} is not configured", row.receiver),
                        ),
                    };
                    (row, d)
                }
            });
            for (row, d) in futures::future::join_all(sends).await {
                if d.ok {
                    tracing::info!(alert = %row.uid, incident = row.incident_id, event = %row.event,
                        receiver = %row.receiver, attempts = row.attempts, "alert delivered");
                } else {
                    tracing::warn!(alert = %row.uid, incident = row.incident_id, event = %row.event,
                        receiver = %row.receiver, attempts = row.attempts,
                        status = ?d.http_status, error = ?d.error, "alert not delivered; will retry");
                }
                let attempt = Attempt {
                    ok: d.ok,
                    http_status: d.http_status,
                    error: d.error,
                    retry_in: backoff(row.attempts, max_backoff),
                    give_up_after,
                };
                match self
                    .store
                    .record_attempt(row.id, row.claimed_until, &attempt)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!(alert = %row.uid, incident = row.incident_id,
                        "alerts: the lease on this alert expired before its attempt was recorded; the attempt is kept, the row left to its new holder"),
                    Err(e) => {
                        tracing::error!(alert = %row.uid, error = %e, "alerts: cannot record a delivery attempt")
                    }
                }
            }
        }
    }
}

/// One send, bounded by `limit` whatever the receiver does (a slow SMTP server can take each
/// command's timeout in turn): past it, a failed attempt.
pub async fn send_within(r: &dyn Receiver, out: &Outgoing, limit: Duration) -> Delivery {
    match tokio::time::timeout(limit, r.send(out)).await {
        Ok(d) => d,
        Err(_) => Delivery::failed(
            None,
            format!(
                "no answer within {} (the send was abandoned)",
                humantime::format_duration(limit)
            ),
        ),
    }
}

fn log_opened(subject: &str, event: &str, opened: &Opened) {
    match opened {
        Opened::Opened(id) => tracing::info!(%subject, event, incident = id, "incident opened"),
        Opened::AlreadyOpen => {
            tracing::debug!(%subject, event, "incident already open")
        }
        Opened::Quiet(why) => tracing::info!(%subject, event, %why, "alert held back"),
        Opened::Suppressed { by } => {
            tracing::info!(%subject, event, dependency = %by, "alert suppressed: a dependency is down")
        }
    }
}

/// The alert as stored (receivers render it): what happened to which service, and why.
pub fn payload(event: &str, severity: &str, svc: &Service, reason: &str) -> serde_json::Value {
    serde_json::json!({
        "event": event,
        "severity": severity,
        "service": svc.id,
        "name": svc.name,
        "node": svc.node,
        "category": svc.category.as_str(),
        "labels": svc.labels,
        "reason": reason,
        "at": Utc::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_up_to_the_maximum() {
        let max = Duration::from_secs(300);
        let waits: Vec<u64> = (1..=12).map(|a| backoff(a, max).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(backoff(0, max), Duration::from_secs(1));
        assert_eq!(backoff(i32::MAX, max), max);
        assert_eq!(backoff(5, Duration::from_secs(3)), Duration::from_secs(3));
    }

    #[test]
    fn severities_and_resolve_events() {
        for e in ["down", "node_down", "gave_up"] {
            assert_eq!(severity_of(e), "critical", "{e}");
        }
        for e in ["stale", "flapping", "backlog"] {
            assert_eq!(severity_of(e), "warning", "{e}");
        }
        assert!(is_resolve("silenced") && is_resolve("recovered") && !is_resolve("reminder"));
        assert!(!is_resolve("gave_up"));
    }

    /// A receiver that never answers.
    struct Hangs;
    impl Receiver for Hangs {
        fn send<'a>(&'a self, _: &'a Outgoing) -> futures::future::BoxFuture<'a, Delivery> {
            Box::pin(futures::future::pending())
        }
    }

    #[tokio::test]
    async fn a_send_that_hangs_fails_before_the_lease_ends() {
        const { assert!(SEND_LIMIT.as_secs() + 10 <= LEASE.as_secs()) };
        assert_eq!(humantime::format_duration(SEND_LIMIT).to_string(), "1m 15s");
        let out = Outgoing {
            id: "u".into(),
            event: "down".into(),
            body: serde_json::json!({}),
        };
        let d = send_within(&Hangs, &out, Duration::from_millis(100)).await;
        assert!(!d.ok);
        assert!(
            d.error
                .as_deref()
                .unwrap_or("")
                .contains("no answer within 100ms"),
            "{:?}",
            d.error
        );
    }

    #[test]
    fn defaults_and_older_webhooks_stay_valid() {
        let mut c: NotifyConfig = serde_norway::from_str(
            "webhooks:\n  - url: \"http://127.0.0.1:9/\"\n    format: slack\n",
        )
        .unwrap();
        c.validate(&|p| p.to_path_buf()).unwrap();
        assert_eq!(c.give_up_after, Duration::from_secs(86400));
        assert_eq!(c.max_backoff, Duration::from_secs(300));
        let r = c.all_receivers();
        assert_eq!(r.len(), 1);
        assert!(matches!(&r[0], ReceiverConfig::Slack(w) if w.name == "webhook-1"));
    }

    fn parsed(yaml: &str) -> Result<NotifyConfig, NotifyInvalid> {
        let mut c: NotifyConfig = serde_norway::from_str(yaml).unwrap();
        c.validate(&|p| p.to_path_buf())?;
        Ok(c)
    }

    #[test]
    fn receiver_secrets_come_from_files_and_the_environment_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let auth = dir.path().join("auth");
        std::fs::write(&auth, "Bearer from-a-file\n").unwrap();
        let url = dir.path().join("url");
        std::fs::write(&url, "https://hooks.example/services/T0/B0/s3cr3t\n").unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "R0UT1NG-from-file").unwrap();
        // The environment is not ours to change here (no unsafe code): cargo sets this one.
        let c = parsed(&format!(
            "webhooks:\n  - url: \"http://127.0.0.1:9/\"\n    headers_env: {{X-Token: CARGO_MANIFEST_DIR}}\n\
             receivers:\n  - name: hook\n    type: webhook\n    url: \"http://127.0.0.1:9/h\"\n    headers: {{X-Plain: plain}}\n    headers_file: {{Authorization: {}}}\n\
             \x20 - name: chat\n    type: slack\n    url_file: {}\n\
             \x20 - name: pd\n    type: pagerduty\n    routing_key_file: {}\n",
            auth.display(),
            url.display(),
            key.display()
        ))
        .unwrap();
        let r = c.all_receivers();
        let ReceiverConfig::Webhook(legacy) = &r[0] else {
            panic!("{r:?}")
        };
        assert_eq!(legacy.name, "webhook-1");
        assert_eq!(
            legacy.resolved.headers["X-Token"].expose(),
            env!("CARGO_MANIFEST_DIR")
        );
        let ReceiverConfig::Webhook(hook) = &r[1] else {
            panic!("{r:?}")
        };
        assert_eq!(
            hook.resolved.headers["Authorization"].expose(),
            "Bearer from-a-file"
        );
        assert_eq!(hook.resolved.headers["X-Plain"].expose(), "plain");
        let ReceiverConfig::Slack(chat) = &r[2] else {
            panic!("{r:?}")
        };
        assert_eq!(
            chat.resolved.url.expose(),
            "https://hooks.example/services/T0/B0/s3cr3t"
        );
        let ReceiverConfig::Pagerduty(pd) = &r[3] else {
            panic!("{r:?}")
        };
        assert_eq!(pd.resolved_key.expose(), "R0UT1NG-from-file");
        // Neither the debug form nor the serialized config shows a value read from elsewhere.
        let shown = format!("{c:?}{}", serde_json::to_string(&c).unwrap());
        for secret in [
            "from-a-file",
            env!("CARGO_MANIFEST_DIR"),
            "s3cr3t",
            "R0UT1NG",
        ] {
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
        }
    }

    #[test]
    fn bad_secrets_are_named_by_their_key_without_their_value() {
        let dir = tempfile::tempdir().unwrap();
        let crlf = dir.path().join("crlf");
        std::fs::write(&crlf, "Bearer a\r\nX-Evil: 1").unwrap();
        let cases = [
            (
                "receivers:\n  - {name: h, type: webhook}\n".to_string(),
                "notify.receivers[0].url",
                "url_file",
            ),
            (
                "receivers:\n  - {name: h, type: webhook, url: \"http://a/\", url_env: X}\n"
                    .to_string(),
                "notify.receivers[0].url",
                "not several",
            ),
            (
                "receivers:\n  - {name: p, type: pagerduty, routing_key_env: VIGIL_TEST_UNSET_9}\n"
                    .to_string(),
                "notify.receivers[0].routing_key_env",
                "VIGIL_TEST_UNSET_9",
            ),
            (
                "receivers:\n  - {name: p, type: pagerduty}\n".to_string(),
                "notify.receivers[0].routing_key",
                "missing",
            ),
            (
                format!(
                    "receivers:\n  - {{name: h, type: webhook, url: \"http://a/\", headers: {{A: x}}, headers_file: {{A: {}}}}}\n",
                    crlf.display()
                ),
                "notify.receivers[0].headers.A",
                "not several",
            ),
            (
                format!(
                    "webhooks:\n  - {{url: \"http://a/\", headers_file: {{Authorization: {}}}}}\n",
                    crlf.display()
                ),
                "notify.webhooks[0].headers.Authorization",
                "not a valid header value",
            ),
            (
                "receivers:\n  - {name: m, type: email, host: h, from: a@b.c, to: [d@e.f], username: u, password_env: VIGIL_TEST_UNSET_9}\n"
                    .to_string(),
                "notify.receivers[0].password_env",
                "not set",
            ),
        ];
        for (yaml, key, why) in cases {
            let e = parsed(&yaml).unwrap_err();
            assert_eq!(e.key, key, "{yaml}: {e:?}");
            assert!(e.reason.contains(why), "{yaml}: {e:?}");
            assert!(!e.reason.contains("X-Evil"), "{e:?}");
        }
    }
}
