//! The liveness pass: nodes whose agent fell silent go down (and come back), services without a
//! recent result go stale, old agent backlogs raise alerts, and a down node's agent is restarted
//! over SSH when the node has an `ssh:` block. Decisions are taken in the database
//! ([`crate::store::Store::mark_nodes_down`] and friends); this module acts on them.

use std::time::Duration;

use chrono::Utc;

use crate::config::NodeConfig;
use crate::grpc::Hub;
use crate::store::NodeChange;

/// How long a node-down alert waits for the SSH heal's outcome before it goes out without it.
const HEAL_WAIT: Duration = Duration::from_secs(4);

/// One pass (run every few seconds by the collector's ticker).
pub async fn pass(hub: &Hub) {
    let since = hub.started_at;
    match hub.store.mark_nodes_down(since).await {
        Ok(down) => {
            for n in down {
                node_down(hub, n).await;
            }
        }
        Err(e) => tracing::error!(error = %e, "liveness: cannot evaluate nodes"),
    }
    match hub.store.mark_nodes_up().await {
        Ok(up) => {
            for n in up {
                let was = n
                    .down_since
                    .map(|s| (Utc::now() - s).num_seconds().max(0))
                    .unwrap_or(0);
                tracing::info!(node = %n.node, down_for_s = was, "node is up again: its agent is heard from");
                hub.metrics.set_node_up(&n.node, true);
                let reason = format!("its agent is heard from again after {was} s down");
                // A node_down alert still waiting for its heal goes first; this one follows it.
                let send_now = {
                    let mut pending = hub.pending_down.lock().expect("pending_down lock");
                    match pending.get_mut(&n.node) {
                        Some(up) => {
                            *up = Some(reason.clone());
                            false
                        }
                        None => true,
                    }
                };
                if send_now {
                    let cfg = hub.config().await;
                    hub.alerts
                        .node_event(&cfg, &n.node, "node_up", &reason)
                        .await;
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "liveness: cannot evaluate nodes"),
    }
    let cfg = hub.config().await;
    retry_heals(hub, &cfg).await;
    // With scheduled checks suspended (runtime setting enabled: false) silence is expected, and
    // once they run again it counts from then.
    if !cfg.checks_enabled() {
        *hub.results_expected_since
            .lock()
            .expect("results_expected_since lock") = Utc::now();
    } else {
        let expected = *hub
            .results_expected_since
            .lock()
            .expect("results_expected_since lock");
        match hub.store.mark_stale(expected).await {
            Ok(stale) => {
                for s in stale {
                    tracing::warn!(service = %s.service_id, node = %s.node, reason = %s.reason, "service is stale: no recent result");
                    if let Some(svc) = cfg.service(&s.service_id) {
                        hub.metrics.set_service_up(
                            &svc.id,
                            &svc.node,
                            svc.category.as_str(),
                            false,
                        );
                        if s.alert {
                            hub.alerts
                                .service_event(&cfg, svc, "stale", &s.reason)
                                .await;
                        }
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "liveness: cannot evaluate stale services"),
        }
    }
    match hub.store.backlog_pass(cfg.backlog_alert).await {
        Ok(changes) => {
            for b in changes {
                if b.opened {
                    tracing::warn!(node = %b.node, reason = %b.reason, "agent backlog too old: results are not reaching the collector");
                    hub.alerts
                        .node_event(&cfg, &b.node, "backlog", &b.reason)
                        .await;
                } else {
                    tracing::info!(node = %b.node, reason = %b.reason, "agent backlog cleared");
                    hub.alerts
                        .node_event(&cfg, &b.node, "backlog_cleared", &b.reason)
                        .await;
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "liveness: cannot evaluate agent backlogs"),
    }
}

/// Nodes that stayed down: their agent is checked (and restarted) over SSH again every
/// `agent_control.retry_after`, within the restart budget.
async fn retry_heals(hub: &Hub, cfg: &crate::config::Config) {
    let candidates: Vec<(String, Duration)> = cfg
        .nodes
        .iter()
        .filter(|n| n.agent && n.agent_control.heal && n.ssh.is_some())
        .map(|n| (n.name.clone(), n.agent_control.retry_after))
        .collect();
    let due = match hub.store.nodes_to_heal(&candidates).await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "liveness: cannot list nodes to heal");
            return;
        }
    };
    for name in due {
        let Some(node) = cfg.node(&name).cloned() else {
            continue;
        };
        if !hub
            .healing
            .lock()
            .expect("healing lock")
            .insert(name.clone())
        {
            continue;
        }
        let Some(hub) = hub.arc() else { return };
        tokio::spawn(async move {
            tracing::info!(node = %name, "node still down: checking its agent over SSH again");
            heal(&hub, &node, "the node is still down").await;
        });
    }
}

/// A node went down: metric, then — after trying to heal its agent over SSH for a moment — one
/// alert that says what was found.
async fn node_down(hub: &Hub, n: NodeChange) {
    tracing::error!(node = %n.node, reason = %n.reason, "node is down");
    hub.metrics.set_node_up(&n.node, false);
    let cfg = hub.config().await;
    let node = cfg.node(&n.node).cloned();
    let Some(hub) = hub.arc() else { return };
    hub.pending_down
        .lock()
        .expect("pending_down lock")
        .insert(n.node.clone(), None);
    tokio::spawn(async move {
        let healing = node
            .filter(|nc| nc.agent_control.heal && nc.ssh.is_some())
            .map(|nc| {
                let hub = hub.clone();
                let reason = n.reason.clone();
                tokio::spawn(async move { heal(&hub, &nc, &reason).await })
            });
        let outcome = match healing {
            None => String::new(),
            Some(mut task) => match tokio::time::timeout(HEAL_WAIT, &mut task).await {
                Ok(Ok(text)) => format!("; {text}"),
                Ok(Err(e)) => format!("; healing its agent over SSH failed: {e}"),
                Err(_) => "; restarting its agent over SSH is under way (see the node's events)"
                    .to_string(),
            },
        };
        let cfg = hub.config().await;
        hub.alerts
            .node_event(
                &cfg,
                &n.node,
                "node_down",
                &format!("{}{outcome}", n.reason),
            )
            .await;
        let up = hub
            .pending_down
            .lock()
            .expect("pending_down lock")
            .remove(&n.node)
            .flatten();
        if let Some(reason) = up {
            hub.alerts
                .node_event(&cfg, &n.node, "node_up", &reason)
                .await;
        }
    });
}

/// Checks over SSH whether `node`'s agent runs and restarts it if not, within the node's
/// restart budget; the restart is a `commands` row (origin `auto`, action `restart-agent`).
/// Returns what was found and done, for the alert.
pub async fn heal(hub: &Hub, node: &NodeConfig, why: &str) -> String {
    hub.healing
        .lock()
        .expect("healing lock")
        .insert(node.name.clone());
    let text = heal_once(hub, node, why).await;
    hub.healing.lock().expect("healing lock").remove(&node.name);
    text
}

async fn heal_once(hub: &Hub, node: &NodeConfig, why: &str) -> String {
    let Some(ssh) = node.ssh.clone() else {
        return "no ssh: block to heal its agent with".into();
    };
    // An operator working on a node under a maintenance window (a reboot, an agent upgrade)
    // does not get its agent restarted under him; the heal comes back once the window ends.
    match hub.store.node_in_maintenance(&node.name).await {
        Ok(Some(until)) => {
            tracing::info!(node = %node.name, %until, "node down in a maintenance window: its agent is not healed over SSH");
            return format!(
                "the node is in maintenance until {}: its agent is not healed over SSH",
                until.format("%Y-%m-%d %H:%M:%S UTC")
            );
        }
        Ok(None) => {}
        Err(e) => {
            tracing::error!(node = %node.name, error = %e, "cannot read the node's maintenance; its agent is not healed now");
            return format!("its agent is not healed now: cannot read the node's maintenance: {e}");
        }
    }
    let ac = &node.agent_control;
    let host = &node.address;
    let text = match hub.ssh.run(host, &ssh, &ac.check, Some(ac.timeout)).await {
        Err(e) => {
            let t = format!("the node is unreachable over SSH too: {e}");
            tracing::error!(node = %node.name, error = %e, "node down and unreachable over SSH");
            t
        }
        Ok(o) if o.exit_code == Some(0) => {
            let t = format!(
                "over SSH its agent is running ({} exits 0) but does not reach the collector: a network problem, or a hung agent",
                ac.check.join(" ")
            );
            tracing::warn!(node = %node.name, "node down but its agent runs (checked over SSH)");
            t
        }
        Ok(_) => restart(hub, node, &ssh, why).await,
    };
    if let Err(e) = hub
        .store
        .add_node_event(&node.name, "agent_heal", &text)
        .await
    {
        tracing::error!(node = %node.name, error = %e, "cannot record the agent heal");
    }
    text
}

async fn restart(hub: &Hub, node: &NodeConfig, ssh: &crate::ssh::SshConfig, why: &str) -> String {
    let ac = &node.agent_control;
    let deadline = Utc::now() + chrono::Duration::from_std(ac.timeout * 2).unwrap_or_default();
    let reason = format!("agent not running ({why})");
    let id = match hub
        .store
        .open_agent_restart(&node.name, &reason, deadline, ac.max_restarts, ac.within)
        .await
    {
        Ok(Ok(id)) => id,
        Ok(Err(refused)) => {
            tracing::warn!(node = %node.name, %refused, "agent not running; not restarted");
            return format!("its agent is not running and was not restarted: {refused}");
        }
        Err(e) => {
            tracing::error!(node = %node.name, error = %e, "cannot record the agent restart");
            return format!("its agent is not running; cannot record a restart: {e}");
        }
    };
    tracing::warn!(node = %node.name, command_id = id, "agent not running: restarting it over SSH");
    let (status, exit_code, output) = match hub
        .ssh
        .run(&node.address, ssh, &ac.restart, Some(ac.timeout))
        .await
    {
        Err(e) => ("failed", None, e.to_string()),
        Ok(o) if o.timed_out => ("timed_out", None, vigil_checks::excerpt(&o.output, 4096)),
        Ok(o) if o.exit_code == Some(0) => (
            "succeeded",
            o.exit_code,
            vigil_checks::excerpt(&o.output, 4096),
        ),
        Ok(o) => (
            "failed",
            o.exit_code,
            vigil_checks::excerpt(&o.output, 4096),
        ),
    };
    hub.metrics.command_finished("restart-agent", status);
    if let Err(e) = hub
        .store
        .finish_command(id, status, exit_code, &output, None)
        .await
    {
        tracing::error!(node = %node.name, command_id = id, error = %e, "cannot record the agent restart's outcome");
    }
    tracing::info!(node = %node.name, command_id = id, %status, "agent restart over SSH finished");
    if status == "succeeded" {
        format!("its agent was not running and was restarted over SSH (command {id})")
    } else {
        format!(
            "its agent is not running and restarting it over SSH {status} (command {id}): {}",
            output.lines().last().unwrap_or("")
        )
    }
}
