//! Alert routing: `notify.routes` chooses the receivers of an incident's opening alert by its
//! category, node, service, severity and service labels (its later alerts follow it there).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::NotifyConfig;

/// One entry of `notify.routes`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// What the alert must match (every field given must match; none: everything).
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    /// Receiver names.
    pub receivers: Vec<String>,
    /// Go on to the next routes after a match (default: stop at the first match).
    #[serde(default, rename = "continue")]
    pub continue_: bool,
}

/// `match:` of a route.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Service category (`node` for a node's own alerts).
    #[serde(default)]
    pub category: Option<String>,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub service: Option<String>,
    /// `critical` or `warning`.
    #[serde(default)]
    pub severity: Option<String>,
    /// Service labels that must all be present with these values.
    #[serde(default)]
    pub label: BTreeMap<String, String>,
}

impl RouteMatch {
    fn matches(&self, alert: &serde_json::Value) -> bool {
        let field = |k: &str| alert.get(k).and_then(|v| v.as_str()).unwrap_or("");
        let eq = |want: &Option<String>, k: &str| want.as_deref().is_none_or(|w| w == field(k));
        eq(&self.category, "category")
            && eq(&self.node, "node")
            && eq(&self.service, "service")
            && eq(&self.severity, "severity")
            && self.label.iter().all(|(k, v)| {
                alert
                    .get("labels")
                    .and_then(|l| l.get(k))
                    .and_then(|x| x.as_str())
                    == Some(v.as_str())
            })
    }
}

/// The receivers of an alert (its JSON payload): with no routes every receiver; otherwise the
/// receivers of the first matching route, and of the routes after it while they say
/// `continue: true`. An alert no route matches goes nowhere (a warning is logged; end the
/// routes with one without `match:` to catch everything else).
pub fn route(cfg: &NotifyConfig, alert: &serde_json::Value) -> Vec<String> {
    if cfg.routes.is_empty() {
        return cfg
            .all_receivers()
            .iter()
            .map(|r| r.name().to_string())
            .collect();
    }
    let mut out: Vec<String> = Vec::new();
    let mut matched = false;
    for r in &cfg.routes {
        if !r.matches.matches(alert) {
            continue;
        }
        matched = true;
        for name in &r.receivers {
            if !out.contains(name) {
                out.push(name.clone());
            }
        }
        if !r.continue_ {
            break;
        }
    }
    if !matched {
        tracing::warn!(event = ?alert.get("event"), service = ?alert.get("service"),
            node = ?alert.get("node"), "no notify route matches this alert: it goes to no receiver");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> NotifyConfig {
        serde_norway::from_str(yaml).unwrap()
    }

    fn alert(category: &str, severity: &str, labels: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"event": "down", "service": "api", "node": "n1", "category": category,
                           "severity": severity, "labels": labels})
    }

    const RECEIVERS: &str = "receivers:\n  - {name: ops, type: webhook, url: \"http://127.0.0.1:1/\"}\n  - {name: chat, type: slack, url: \"http://127.0.0.1:2/\"}\n  - {name: pd, type: pagerduty, routing_key: k}\n";

    #[test]
    fn no_routes_means_every_receiver_including_the_older_webhooks() {
        let c = cfg(&format!(
            "webhooks:\n  - url: \"http://127.0.0.1:9/\"\n{RECEIVERS}"
        ));
        assert_eq!(
            route(&c, &alert("api", "critical", serde_json::json!({}))),
            ["webhook-1", "ops", "chat", "pd"]
        );
    }

    #[test]
    fn first_match_wins_unless_continue_and_labels_must_all_match() {
        let c = cfg(&format!(
            "{RECEIVERS}routes:\n\
             \x20 - match: {{severity: critical, label: {{team: db}}}}\n    receivers: [pd]\n    continue: true\n\
             \x20 - match: {{category: database}}\n    receivers: [chat]\n\
             \x20 - match: {{category: api}}\n    receivers: [ops]\n"
        ));
        let db = serde_json::json!({"team": "db", "tier": "1"});
        // Critical, labelled team=db: pd, then (continue) the category route.
        assert_eq!(
            route(&c, &alert("database", "critical", db.clone())),
            ["pd", "chat"]
        );
        // A warning does not match the first route.
        assert_eq!(route(&c, &alert("database", "warning", db)), ["chat"]);
        // A label with another value does not match.
        let other = serde_json::json!({"team": "web"});
        assert_eq!(route(&c, &alert("api", "critical", other)), ["ops"]);
        // Nothing matches: nowhere.
        assert!(route(&c, &alert("system", "warning", serde_json::json!({}))).is_empty());
    }

    #[test]
    fn validation_names_the_key_of_an_unknown_receiver_or_bad_url() {
        let mut c = cfg(&format!(
            "{RECEIVERS}routes:\n  - match: {{node: n1}}\n    receivers: [ops, nope]\n"
        ));
        let e = c.validate(&|p| p.to_path_buf()).unwrap_err();
        assert_eq!(e.key, "notify.routes[0].receivers[1]");
        assert!(
            e.reason.contains("nope") && e.reason.contains("ops"),
            "{e:?}"
        );
        let mut c = cfg("receivers:\n  - {name: x, type: webhook, url: \"ftp://h/\"}\n");
        let e = c.validate(&|p| p.to_path_buf()).unwrap_err();
        assert_eq!(e.key, "notify.receivers[0].url");
        let mut c = cfg(
            "receivers:\n  - {name: x, type: slack, url: \"http://a/\"}\n  - {name: x, type: slack, url: \"http://b/\"}\n",
        );
        let e = c.validate(&|p| p.to_path_buf()).unwrap_err();
        assert_eq!(e.key, "notify.receivers[1].name");
        let mut c = cfg(&format!(
            "{RECEIVERS}routes:\n  - match: {{severity: loud}}\n    receivers: [ops]\n"
        ));
        let e = c.validate(&|p| p.to_path_buf()).unwrap_err();
        assert_eq!(e.key, "notify.routes[0].match.severity");
    }
}
