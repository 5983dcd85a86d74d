//! Agentless nodes: the collector runs their checks itself — `command` checks over SSH, the
//! other kinds from the collector — and stores the results through the same ingest path as an
//! agent's, so thresholds, remediation and alerts work the same.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use vigil_checks::{CheckKind, CheckSpec, Outcome, Status};

use crate::config::{NodeConfig, Service};
use crate::grpc::Hub;
use crate::store::ResultIn;

/// Runs one check for an agentless node: a `command` check over SSH, anything else locally.
pub async fn run_check(hub: &Hub, node: &NodeConfig, spec: &CheckSpec) -> Outcome {
    let CheckKind::Command(cmd) = &spec.kind else {
        let files = Arc::new(hub.config().await.attachments.clone());
        return spec.run(&files).await;
    };
    let Some(ssh) = &node.ssh else {
        return Outcome::new(
            Status::Unknown,
            format!("node {} has no ssh: block", node.name),
        );
    };
    let started = std::time::Instant::now();
    let mut outcome = match hub
        .ssh
        .run(&node.address, ssh, &cmd.argv, Some(spec.timeout))
        .await
    {
        Ok(out) if out.timed_out => Outcome::new(
            Status::Unknown,
            format!(
                "timed out after {} over SSH",
                humantime::format_duration(spec.timeout)
            ),
        ),
        Ok(out) => {
            let parsed = vigil_checks::perfdata::parse_plugin_output_struct(&out.output);
            let program = cmd.argv.first().map_or("", String::as_str);
            let plugin_message = (!parsed.message.is_empty()).then(|| parsed.message.clone());
            let signal = out.exit_signal.as_ref().map(|s| format!("signal {s}"));
            // The same rule as a `command` check run by an agent.
            let (status, message) = vigil_checks::command::plugin_outcome(
                program,
                out.exit_code,
                signal.as_deref(),
                plugin_message,
            );
            let mut o = Outcome::new(status, message);
            o.exit_code = out.exit_code;
            o.metrics = parsed.metrics;
            o.output = vigil_checks::excerpt(&out.output, vigil_checks::MAX_OUTPUT_BYTES);
            o
        }
        // The node cannot be reached or refused us: the check could not run.
        Err(e) => Outcome::new(Status::Unknown, format!("ssh: {e}")),
    };
    outcome.duration = started.elapsed();
    outcome
}

/// Converts an outcome into a result to store, bounded and cleaned like an agent's.
pub fn result_of(
    seq: u64,
    service_id: &str,
    started_at: chrono::DateTime<Utc>,
    o: Outcome,
) -> ResultIn {
    let mut r = crate::grpc::result_in(vigil_proto::v1::CheckResult {
        seq,
        service_id: service_id.to_string(),
        started_at_ms: started_at.timestamp_millis(),
        duration_ms: o.duration.as_millis().min(u32::MAX as u128) as u32,
        status: vigil_proto::v1::Status::from(o.status) as i32,
        message: o.message,
        metrics: o.metrics.into_iter().map(Into::into).collect(),
        output: o.output,
        config_version: 0,
        exit_code: o.exit_code,
        duration_us: u64::try_from(o.duration.as_micros()).unwrap_or(u64::MAX),
    });
    r.started_at = started_at;
    r
}

/// Keeps one task per service of an agentless node running, following config reloads.
pub fn start(hub: Arc<Hub>) {
    tokio::spawn(async move {
        // A fresh epoch per collector run; seq counts up within it.
        let epoch = rand_epoch();
        let seq = Arc::new(AtomicU64::new(0));
        let mut running: HashMap<String, (String, tokio::task::JoinHandle<()>)> = HashMap::new();
        let mut every = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = hub.shutdown.cancelled() => break,
                _ = every.tick() => {}
            }
            let cfg = hub.config().await;
            let mut wanted: HashMap<String, (String, Service, NodeConfig)> = HashMap::new();
            // Scheduled checks suspended by the runtime settings: none runs (check-now still does).
            let enabled = cfg.checks_enabled();
            for svc in cfg.services.iter().filter(|_| enabled) {
                if let Some(node) = cfg.node(&svc.node).filter(|n| !n.agent) {
                    let key = format!(
                        "{}|{}",
                        serde_json::to_string(&svc.check).unwrap_or_default(),
                        serde_json::to_string(node).unwrap_or_default()
                    );
                    wanted.insert(svc.id.clone(), (key, svc.clone(), node.clone()));
                }
            }
            running.retain(|id, (key, task)| {
                let keep = wanted.get(id).is_some_and(|(k, _, _)| k == key);
                if !keep {
                    task.abort();
                }
                keep
            });
            for (id, (key, svc, node)) in wanted {
                if running.contains_key(&id) {
                    continue;
                }
                let task = tokio::spawn(run_service(hub.clone(), epoch, seq.clone(), svc, node));
                running.insert(id, (key, task));
            }
        }
        for (_, (_, task)) in running {
            task.abort();
        }
    });
}

fn rand_epoch() -> u64 {
    // Time-based and never 0; distinct per collector run.
    (Utc::now().timestamp_nanos_opt().unwrap_or(1) as u64) | 1
}

async fn run_service(
    hub: Arc<Hub>,
    epoch: u64,
    seq: Arc<AtomicU64>,
    svc: Service,
    node: NodeConfig,
) {
    tracing::info!(service = %svc.id, node = %node.name, kind = svc.check.kind.name(), "checking an agentless service from the collector");
    let first = Duration::from_millis((epoch % 1000).min(svc.check.interval.as_millis() as u64));
    tokio::time::sleep(first).await;
    loop {
        let started_at = Utc::now();
        let outcome = run_check(&hub, &node, &svc.check).await;
        let n = seq.fetch_add(1, Ordering::Relaxed) + 1;
        let result = result_of(n, &svc.id, started_at, outcome);
        let th = std::iter::once((svc.id.clone(), svc.thresholds)).collect();
        match hub
            .store
            .ingest(
                &node.name,
                epoch,
                std::slice::from_ref(&result),
                &th,
                crate::store::Dedupe::PerResult,
            )
            .await
        {
            Ok(report) => crate::grpc::after_ingest(&hub, &node.name, &report).await,
            Err(e) => {
                tracing::error!(service = %svc.id, error = %e, "cannot store an agentless result")
            }
        }
        // ±10 % jitter.
        let interval = svc.check.interval.as_secs_f64();
        let jitter = ((n.wrapping_mul(2654435761) % 2001) as f64 / 1000.0 - 1.0) * 0.1;
        tokio::time::sleep(Duration::from_secs_f64(
            (interval * (1.0 + jitter)).max(0.1),
        ))
        .await;
    }
}
