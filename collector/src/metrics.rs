//! Prometheus metrics (prometheus-client): the registry the collector updates, and the
//! `/metrics` endpoint served on its own listen address.

use std::sync::Arc;

use crate::grpc::Hub;

/// Every metric the collector exports.
pub struct Metrics {
    registry: prometheus_client::registry::Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            registry: prometheus_client::registry::Registry::default(),
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The `/metrics` endpoint (bearer token required when `metrics.bearer_token_file` is set).
pub fn router(hub: Arc<Hub>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let hub = hub.clone();
            async move { hub.metrics.encode() }
        }),
    )
}
