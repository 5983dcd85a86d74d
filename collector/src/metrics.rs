//! Prometheus metrics (prometheus-client): the registry the collector updates, and the
//! `/metrics` endpoint served on its own listen address.
//!
//! Exported (OpenMetrics text):
//! - `vigil_service_up{service,node,category}`: 1 while the service is healthy and its newest
//!   result is fresh, else 0 (stale counts as not up); loaded from the database at start-up
//!   ([`init`]) and kept current after every ingest and every liveness pass.
//! - `vigil_node_up{node}`: 1 while a node's agent is heard from within its `node_timeout` (and
//!   for agentless nodes), 0 while the node is down.
//! - `vigil_results_lost_total{node}`: seqs missing from a node's outbox that the agent did not
//!   report dropping; `vigil_results_dropped_total{node}`: those it dropped itself (outbox full);
//!   `vigil_results_refused_total{node}`: results refused (out-of-range seq, another node's
//!   service); `vigil_results_replaced_total{node}`: results PostgreSQL refused for good, stored
//!   as UNKNOWN results saying why.
//! - `vigil_agent_backlog_results{node}`, `vigil_agent_backlog_oldest_seconds{node}`: what each
//!   connected agent holds unacknowledged, and the age of the oldest.
//! - `vigil_check_duration_seconds{kind}`: run time of check results received from agents.
//! - `vigil_results_ingested_total`, `vigil_results_duplicate_total`: results stored / already
//!   stored (resent after a lost acknowledgement).
//! - `vigil_agents_connected`: agent streams open now.
//! - `vigil_commands_total{action,outcome}`: finished commands (`succeeded`, `failed`, `timed_out`,
//!   `unknown`, `cancelled`; `late_<outcome>` for an outcome reported after the command was closed).
//! - `vigil_ingest_batch_seconds`: time to store one agent batch (one transaction).
//! - `vigil_service_gave_up{service,node}`: 1 while remediation has given up restarting the
//!   service (its restart budget is spent), else 0; read from the database at each scrape.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::config::Config;
use crate::grpc::Hub;
use crate::state::State as ServiceState;
use crate::store::IngestReport;

/// The content type of the exposition `prometheus_client::encoding::text` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format, for scrapers that do not ask for OpenMetrics.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a scraper's `Accept` header asks for OpenMetrics (Prometheus does; curl and most
/// other tools get the classic text format).
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut fields = part.split(';').map(str::trim);
            let media = fields.next().unwrap_or("");
            let refused = fields.any(|f| {
                f.strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        })
    })
}

/// OpenMetrics text as the Prometheus text format 0.0.4: a counter family `x` is announced as
/// `x_total` (its samples already are), and the `# UNIT` and `# EOF` lines go.
pub fn to_text_004(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
    node: String,
    category: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    action: String,
    outcome: String,
}

fn check_duration_histogram() -> Histogram {
    // 1 ms .. ~33 s: from a local command to an HTTP check near its timeout.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Every metric the collector exports.
pub struct Metrics {
    registry: Registry,
    service_up: Family<ServiceLabels, Gauge>,
    /// The label set each service is exported under, so that a service that moved to another
    /// node or category does not leave its old series behind.
    service_labels: Mutex<HashMap<String, ServiceLabels>>,
    check_duration: Family<KindLabels, Histogram, fn() -> Histogram>,
    results_ingested: Counter,
    results_duplicate: Counter,
    agents_connected: Gauge,
    commands: Family<CommandLabels, Counter>,
    ingest_batch: Histogram,
    node_up: Family<NodeLabels, Gauge>,
    results_lost: Family<NodeLabels, Counter>,
    results_dropped: Family<NodeLabels, Counter>,
    results_refused: Family<NodeLabels, Counter>,
    results_replaced: Family<NodeLabels, Counter>,
    backlog_results: Family<NodeLabels, Gauge>,
    backlog_oldest: Family<NodeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    service_gave_up: Family<GaveUpLabels, Gauge>,
    /// Held while `vigil_service_gave_up` is rebuilt and the exposition written.
    scrape_lock: tokio::sync::Mutex<()>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GaveUpLabels {
    service: String,
    node: String,
}

fn node_labels(node: &str) -> NodeLabels {
    NodeLabels {
        node: node.to_string(),
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let service_up = Family::<ServiceLabels, Gauge>::default();
        registry.register(
            "vigil_service_up",
            "1 when the service is healthy, 0 otherwise (unknown, failing, down)",
            service_up.clone(),
        );
        let check_duration: Family<KindLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(check_duration_histogram);
        registry.register_with_unit(
            "vigil_check_duration",
            "Run time of the check results received from agents, by check kind",
            Unit::Seconds,
            check_duration.clone(),
        );
        let results_ingested = Counter::default();
        registry.register(
            "vigil_results_ingested",
            "Check results newly stored",
            results_ingested.clone(),
        );
        let results_duplicate = Counter::default();
        registry.register(
            "vigil_results_duplicate",
            "Check results received again and not stored twice",
            results_duplicate.clone(),
        );
        let agents_connected = Gauge::default();
        registry.register(
            "vigil_agents_connected",
            "Agent streams connected now",
            agents_connected.clone(),
        );
        let commands = Family::<CommandLabels, Counter>::default();
        registry.register(
            "vigil_commands",
            "Finished commands, by action and outcome (succeeded, failed, timed_out, unknown, cancelled; late_* when reported after it was closed)",
            commands.clone(),
        );
        // 1 ms .. ~4 s.
        let ingest_batch = Histogram::new(exponential_buckets(0.001, 2.0, 13));
        registry.register_with_unit(
            "vigil_ingest_batch",
            "Time to store one batch of agent results (one transaction)",
            Unit::Seconds,
            ingest_batch.clone(),
        );
        let node_up = Family::<NodeLabels, Gauge>::default();
        registry.register(
            "vigil_node_up",
            "1 while the node's agent is heard from within node_timeout, 0 while the node is down",
            node_up.clone(),
        );
        let results_lost = Family::<NodeLabels, Counter>::default();
        registry.register(
            "vigil_results_lost",
            "Results missing from a node's outbox seqs that the agent did not report dropping",
            results_lost.clone(),
        );
        let results_dropped = Family::<NodeLabels, Counter>::default();
        registry.register(
            "vigil_results_dropped",
            "Results the agent reported dropping itself because its outbox was full",
            results_dropped.clone(),
        );
        let results_refused = Family::<NodeLabels, Counter>::default();
        registry.register(
            "vigil_results_refused",
            "Results refused and not stored (seq out of range, service not assigned to the node)",
            results_refused.clone(),
        );
        let results_replaced = Family::<NodeLabels, Counter>::default();
        registry.register(
            "vigil_results_replaced",
            "Results PostgreSQL refused for good, stored as UNKNOWN results that say why",
            results_replaced.clone(),
        );
        let backlog_results = Family::<NodeLabels, Gauge>::default();
        registry.register(
            "vigil_agent_backlog_results",
            "Results the node's agent holds unacknowledged, as it last reported",
            backlog_results.clone(),
        );
        let backlog_oldest =
            Family::<NodeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register_with_unit(
            "vigil_agent_backlog_oldest",
            "Age of the oldest result the node's agent holds unacknowledged, as it last reported",
            Unit::Seconds,
            backlog_oldest.clone(),
        );
        let service_gave_up = Family::<GaveUpLabels, Gauge>::default();
        registry.register(
            "vigil_service_gave_up",
            "1 while remediation has given up restarting the service (restart budget spent), else 0",
            service_gave_up.clone(),
        );
        Metrics {
            service_gave_up,
            scrape_lock: tokio::sync::Mutex::new(()),
            node_up,
            results_lost,
            results_dropped,
            results_refused,
            results_replaced,
            backlog_results,
            backlog_oldest,
            registry,
            service_up,
            service_labels: Mutex::new(HashMap::new()),
            check_duration,
            results_ingested,
            results_duplicate,
            agents_connected,
            commands,
            ingest_batch,
        }
    }

    /// The text exposition (OpenMetrics) of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Sets `vigil_service_up` of one service.
    pub fn set_service_up(&self, service: &str, node: &str, category: &str, up: bool) {
        self.put_service_up(service, node, category, up, true);
    }

    /// Sets `vigil_service_up` of one service unless it is set already (start-up load, which must
    /// not overwrite what an ingest that raced it recorded).
    fn init_service_up(&self, service: &str, node: &str, category: &str, up: bool) {
        self.put_service_up(service, node, category, up, false);
    }

    fn put_service_up(&self, service: &str, node: &str, category: &str, up: bool, replace: bool) {
        let labels = ServiceLabels {
            service: service.to_string(),
            node: node.to_string(),
            category: category.to_string(),
        };
        let mut known = self.service_labels.lock().expect("service labels lock");
        if !replace && known.contains_key(service) {
            return;
        }
        if let Some(old) = known.get(service)
            && *old != labels
        {
            self.service_up.remove(old);
        }
        self.service_up.get_or_create(&labels).set(i64::from(up));
        known.insert(service.to_string(), labels);
    }

    /// Counts stored and duplicate results.
    pub fn count_results(&self, inserted: usize, duplicates: usize) {
        self.results_ingested.inc_by(inserted as u64);
        self.results_duplicate.inc_by(duplicates as u64);
    }

    /// After a committed ingest: counts its results and updates `vigil_service_up` of every
    /// service in it (node and category from `cfg`; services no longer configured are skipped).
    pub fn ingested(&self, cfg: &Config, report: &IngestReport) {
        self.count_results(report.inserted, report.duplicates);
        for s in &report.states {
            if let Some(svc) = cfg.service(&s.service_id) {
                self.set_service_up(
                    &s.service_id,
                    &svc.node,
                    svc.category.as_str(),
                    s.state == ServiceState::Healthy,
                );
            }
        }
    }

    /// Records the run time of one check result of the given kind.
    pub fn observe_check(&self, kind: &str, duration: std::time::Duration) {
        self.check_duration
            .get_or_create(&KindLabels {
                kind: kind.to_string(),
            })
            .observe(duration.as_secs_f64());
    }

    /// Records how long storing one batch took.
    pub fn observe_ingest_batch(&self, elapsed: std::time::Duration) {
        self.ingest_batch.observe(elapsed.as_secs_f64());
    }

    /// Sets the number of connected agents.
    pub fn set_agents_connected(&self, n: usize) {
        self.agents_connected
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Sets `vigil_node_up` of one node.
    pub fn set_node_up(&self, node: &str, up: bool) {
        self.node_up
            .get_or_create(&node_labels(node))
            .set(i64::from(up));
    }

    /// Counts seqs missing from `node`'s outbox: `lost` unaccounted for, `dropped` by the agent.
    pub fn results_missing(&self, node: &str, lost: u64, dropped: u64) {
        if lost > 0 {
            self.results_lost
                .get_or_create(&node_labels(node))
                .inc_by(lost);
        }
        if dropped > 0 {
            self.results_dropped
                .get_or_create(&node_labels(node))
                .inc_by(dropped);
        }
    }

    /// Counts results of `node` refused before storage.
    pub fn results_refused(&self, node: &str, n: usize) {
        self.results_refused
            .get_or_create(&node_labels(node))
            .inc_by(n as u64);
    }

    /// Counts results of `node` that PostgreSQL refused and that were stored as UNKNOWN.
    pub fn results_replaced(&self, node: &str, n: usize) {
        self.results_replaced
            .get_or_create(&node_labels(node))
            .inc_by(n as u64);
    }

    /// Sets the backlog `node`'s agent reported.
    pub fn set_backlog(&self, node: &str, results: u64, oldest_age_ms: u64) {
        self.backlog_results
            .get_or_create(&node_labels(node))
            .set(i64::try_from(results).unwrap_or(i64::MAX));
        self.backlog_oldest
            .get_or_create(&node_labels(node))
            .set(oldest_age_ms as f64 / 1000.0);
    }

    /// Counts a finished command (`outcome`: its final status).
    pub fn command_finished(&self, action: &str, outcome: &str) {
        self.commands
            .get_or_create(&CommandLabels {
                action: action.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }
}

impl Metrics {
    /// Replaces `vigil_service_gave_up` with `flags` (service, node, gave up): services no
    /// longer configured disappear.
    pub fn set_gave_up(&self, flags: &[(String, String, bool)]) {
        self.service_gave_up.clear();
        for (service, node, gave_up) in flags {
            self.service_gave_up
                .get_or_create(&GaveUpLabels {
                    service: service.clone(),
                    node: node.clone(),
                })
                .set(i64::from(*gave_up));
        }
    }

    /// The exposition after reading the gave-up flags from the database (on failure the last
    /// values are kept and the failure logged).
    pub async fn scrape(&self, store: &crate::store::Store) -> String {
        let _one = self.scrape_lock.lock().await;
        match store.gave_up_flags().await {
            Ok(flags) => self.set_gave_up(&flags),
            Err(e) => tracing::warn!(error = %e, "metrics: cannot read gave-up flags"),
        }
        self.encode()
    }
}

/// Loads `vigil_service_up` of every service from the database (at start-up, before any ingest
/// updates it). A failure is logged: the gauges then appear as results arrive.
pub async fn init(hub: &Hub) {
    match hub.store.health(None, false).await {
        Ok(rows) => {
            for r in &rows {
                hub.metrics
                    .init_service_up(&r.service_id, &r.node, &r.category, r.is_up());
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot load service states for vigil_service_up"),
    }
    match hub.store.nodes().await {
        Ok(rows) => {
            for n in rows.iter().filter(|n| n.active) {
                hub.metrics.set_node_up(&n.name, n.down_since.is_none());
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot load node states for vigil_node_up"),
    }
}

/// Whether `headers` carry `Authorization: Bearer <token>` (scheme case-insensitive; the token
/// compared in constant time).
fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, given)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn scrape(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> Response {
    let cfg = hub.config().await;
    if let Some(token) = &cfg.metrics_token
        && !authorized(&headers, token)
    {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"vigil-metrics\"")],
            "a bearer token is required (Authorization: Bearer <token>)\n",
        )
            .into_response();
    }
    let text = hub.metrics.scrape(&hub.store).await;
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if wants_openmetrics(accept) {
        ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
    } else {
        (
            [(header::CONTENT_TYPE, TEXT_CONTENT_TYPE)],
            to_text_004(&text),
        )
            .into_response()
    }
}

/// The `/metrics` endpoint (bearer token required when `metrics.bearer_token_file` is set).
pub fn router(hub: Arc<Hub>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(hub)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_writes_every_metric_in_openmetrics_text() {
        let m = Metrics::new();
        m.set_service_up("web", "n1", "web", true);
        m.set_service_up("db", "n1", "database", false);
        m.observe_check("http", std::time::Duration::from_millis(250));
        m.observe_ingest_batch(std::time::Duration::from_millis(3));
        m.count_results(5, 2);
        m.set_agents_connected(2);
        m.command_finished("restart", "succeeded");
        let text = m.encode();
        let lines: Vec<&str> = text.lines().collect();
        for want in [
            "# TYPE vigil_service_up gauge",
            "vigil_service_up{service=\"web\",node=\"n1\",category=\"web\"} 1",
            "vigil_service_up{service=\"db\",node=\"n1\",category=\"database\"} 0",
            "# TYPE vigil_check_duration_seconds histogram",
            "# UNIT vigil_check_duration_seconds seconds",
            "vigil_check_duration_seconds_count{kind=\"http\"} 1",
            "vigil_check_duration_seconds_sum{kind=\"http\"} 0.25",
            "vigil_check_duration_seconds_bucket{le=\"0.256\",kind=\"http\"} 1",
            "vigil_check_duration_seconds_bucket{le=\"0.128\",kind=\"http\"} 0",
            "# TYPE vigil_results_ingested counter",
            "vigil_results_ingested_total 5",
            "vigil_results_duplicate_total 2",
            "vigil_agents_connected 2",
            "vigil_commands_total{action=\"restart\",outcome=\"succeeded\"} 1",
            "vigil_ingest_batch_seconds_count 1",
            "# EOF",
        ] {
            assert!(lines.contains(&want), "missing {want:?} in:\n{text}");
        }
        assert_eq!(lines.last(), Some(&"# EOF"));
    }

    #[test]
    fn gave_up_is_exported_and_forgotten_services_disappear() {
        let m = Metrics::new();
        m.set_gave_up(&[
            ("web".into(), "n1".into(), true),
            ("db".into(), "n1".into(), false),
        ]);
        let text = m.encode();
        assert!(
            text.contains("# TYPE vigil_service_gave_up gauge"),
            "{text}"
        );
        assert!(
            text.contains("vigil_service_gave_up{service=\"web\",node=\"n1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("vigil_service_gave_up{service=\"db\",node=\"n1\"} 0"),
            "{text}"
        );
        m.set_gave_up(&[("db".into(), "n1".into(), false)]);
        let text = m.encode();
        assert!(!text.contains("service=\"web\""), "{text}");
    }

    #[test]
    fn a_service_that_moves_leaves_no_stale_series() {
        let m = Metrics::new();
        m.set_service_up("web", "n1", "web", true);
        m.set_service_up("web", "n2", "web", false);
        let text = m.encode();
        assert!(!text.contains("node=\"n1\""), "{text}");
        assert!(
            text.contains("vigil_service_up{service=\"web\",node=\"n2\",category=\"web\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn bearer_token_is_checked() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().expect("header value"));
            h
        };
        assert!(authorized(&with("Bearer s3cret"), "s3cret"));
        assert!(authorized(&with("bearer s3cret"), "s3cret"));
        assert!(!authorized(&with("Bearer s3cre"), "s3cret"));
        assert!(!authorized(&with("Bearer s3cretx"), "s3cret"));
        assert!(!authorized(&with("Basic s3cret"), "s3cret"));
        assert!(!authorized(&with("s3cret"), "s3cret"));
        assert!(!authorized(&HeaderMap::new(), "s3cret"));
    }

    #[test]
    fn openmetrics_only_when_asked_and_counters_renamed_for_the_text_format() {
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
        let om = "# HELP vigil_x Things.\n# TYPE vigil_x counter\nvigil_x_total 3\n\
                  # HELP vigil_up Up.\n# TYPE vigil_up gauge\n# UNIT vigil_up seconds\nvigil_up 1\n# EOF\n";
        assert_eq!(
            to_text_004(om),
            "# HELP vigil_x_total Things.\n# TYPE vigil_x_total counter\nvigil_x_total 3\n\
             # HELP vigil_up Up.\n# TYPE vigil_up gauge\nvigil_up 1\n"
        );
    }
}
