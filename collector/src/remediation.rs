//! Remediation: decides when a down service is restarted (restart budget, give-up and retry,
//! grace period, flapping, dependencies, operator modes), turns decisions and operator requests
//! into commands, dispatches them to the node's agent, and applies their outcomes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use vigil_control::{Action, How, Plan, Via};
use vigil_proto::v1::{self, collector_message::Msg as Out};

use crate::config::{FailureAction, NodeConfig, Service};
use crate::grpc::Hub;
use crate::state::State;
use crate::store::{CommandRow, NewCommand, ResultIn, ServiceView};

/// What the engine does about one service now.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Nothing,
    Restart {
        reason: String,
    },
    GiveUp {
        reason: String,
    },
    /// Healthy for a whole window: the restart budget is full again.
    Refill,
    /// A pause has expired: back to active.
    Resume,
}

fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// The pure decision for one service. `deps_down` are the ids of its dependencies that are not
/// healthy.
pub fn decide(
    v: &ServiceView,
    svc: &Service,
    deps_down: &[String],
    now: DateTime<Utc>,
) -> Decision {
    if v.mode == "paused" && v.paused_until.is_some_and(|u| u <= now) {
        return Decision::Resume;
    }
    if v.mode != "active" {
        return Decision::Nothing;
    }
    let window = chrono::Duration::from_std(svc.within).unwrap_or(chrono::Duration::MAX);
    if v.state == State::Healthy {
        if v.restarts_used > 0 && v.healthy_since.is_some_and(|h| now - h >= window) {
            return Decision::Refill;
        }
        return Decision::Nothing;
    }
    if v.state != State::Down || svc.action != FailureAction::Restart || svc.control.is_none() {
        return Decision::Nothing;
    }
    // Stale: what the service is like now is not known; the last result is no reason to act.
    if v.in_flight || v.flapping || v.stale || !deps_down.is_empty() {
        return Decision::Nothing;
    }
    if v.grace_until.is_some_and(|g| now < g) {
        return Decision::Nothing;
    }
    // Restart again only on a failure seen after the last restart finished.
    if let Some(restarted) = v.last_restart_at
        && v.last_error_at.is_none_or(|e| e <= restarted)
    {
        return Decision::Nothing;
    }
    if v.restarts_used >= svc.max_restarts {
        let retry = chrono::Duration::from_std(svc.retry_after).unwrap_or(chrono::Duration::MAX);
        return match v.gave_up_at {
            None => Decision::GiveUp {
                reason: format!(
                    "{} automatic restarts did not bring it back (max_restarts {} within {}); \
                     next try in {}",
                    v.restarts_used,
                    svc.max_restarts,
                    human(svc.within),
                    human(svc.retry_after)
                ),
            },
            Some(at) if now - at >= retry => Decision::Restart {
                reason: format!("retry after giving up {} ago", human(svc.retry_after)),
            },
            Some(_) => Decision::Nothing,
        };
    }
    Decision::Restart {
        reason: format!(
            "down; automatic restart {} of {} within {}",
            v.restarts_used + 1,
            svc.max_restarts,
            human(svc.within)
        ),
    }
}

/// Evaluates services (after new results, and periodically) and acts on the decisions.
pub async fn evaluate(hub: &Hub, ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    let cfg = hub.config().await;
    let mut wanted: Vec<&str> = ids.iter().map(String::as_str).collect();
    for id in ids {
        if let Some(s) = cfg.service(id) {
            wanted.extend(s.depends_on.iter().map(String::as_str));
        }
    }
    wanted.sort_unstable();
    wanted.dedup();
    let views = match hub.store.views(&wanted).await {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "remediation: cannot read service state");
            return;
        }
    };
    let now = Utc::now();
    for id in ids {
        let (Some(svc), Some(view)) = (cfg.service(id), views.iter().find(|v| &v.service_id == id))
        else {
            continue;
        };
        // A dependency that is not known healthy (down, failing, or no result yet) blocks
        // restarts: restarting a dependent cannot help, and might hurt.
        let deps_down: Vec<String> = svc
            .depends_on
            .iter()
            .filter(|d| {
                !views
                    .iter()
                    .any(|v| &v.service_id == *d && v.state == State::Healthy)
            })
            .cloned()
            .collect();
        let result = match decide(view, svc, &deps_down, now) {
            Decision::Nothing => Ok(()),
            Decision::Refill => hub.store.refill_budget(id).await,
            Decision::Resume => {
                hub.store
                    .set_mode(id, "active", None, "pause expired")
                    .await
            }
            Decision::GiveUp { reason } => {
                tracing::warn!(service = %id, %reason, "gave up restarting");
                let given_up = hub.store.give_up(id, &reason).await;
                hub.alerts
                    .service_event(&cfg, svc, "gave_up", &reason)
                    .await;
                given_up
            }
            Decision::Restart { reason } => auto_restart(hub, svc, &reason).await,
        };
        if let Err(e) = result {
            tracing::error!(service = %id, error = %e, "remediation failed");
        }
    }
}

/// Records an operator's start/stop/restart/check of `svc` (origin `manual`, audited with `who`)
/// and notifies every collector; the one holding the agent's stream sends it. `None` when the
/// service already has a start/stop/restart in flight.
pub async fn request(
    store: &crate::store::Store,
    svc: &Service,
    action: &str,
    who: &str,
) -> Result<Option<i64>, crate::store::StoreError> {
    let deadline =
        Utc::now() + chrono::Duration::from_std(svc.command_deadline).unwrap_or_default();
    let reason = format!("{action} requested by {who}");
    store
        .create_command(&NewCommand {
            service_id: &svc.id,
            node: &svc.node,
            action,
            origin: "manual",
            requested_by: who,
            reason: &reason,
            deadline,
        })
        .await
}

async fn auto_restart(
    hub: &Hub,
    svc: &Service,
    reason: &str,
) -> Result<(), crate::store::StoreError> {
    let deadline =
        Utc::now() + chrono::Duration::from_std(svc.command_deadline).unwrap_or_default();
    let Some(id) = hub
        .store
        .create_command(&NewCommand {
            service_id: &svc.id,
            node: &svc.node,
            action: "restart",
            origin: "auto",
            requested_by: "vigil",
            reason,
            deadline,
        })
        .await?
    else {
        return Ok(()); // one is already in flight
    };
    hub.store.count_restart(&svc.id).await?;
    hub.store
        .add_event(
            &svc.id,
            "remediation",
            "down",
            "restarting",
            &format!("command {id}: {reason}"),
        )
        .await?;
    tracing::info!(service = %svc.id, node = %svc.node, command_id = id, %reason, "automatic restart");
    if let Some(cmd) = hub.store.command(id).await? {
        dispatch(hub, &cmd).await;
    }
    Ok(())
}

/// Sends an open command to whoever can carry it out now; leaves it pending if nobody can yet
/// (the agent may come back before the deadline). A command that cannot be carried out at all
/// fails at once with the reason.
pub fn dispatch<'a>(
    hub: &'a Hub,
    cmd: &'a CommandRow,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
    // Boxed: a check-now over SSH stores its result, which may lead to remediation and another
    // dispatch.
    Box::pin(async move {
        if let Err(e) = try_dispatch(hub, cmd).await {
            tracing::error!(command_id = cmd.id, error = %e, "cannot dispatch command");
        }
    })
}

async fn fail(hub: &Hub, cmd: &CommandRow, why: &str) -> Result<(), crate::store::StoreError> {
    tracing::warn!(command_id = cmd.id, service = %cmd.service_id, reason = why, "command failed");
    if let Some(row) = hub
        .store
        .finish_command(cmd.id, "failed", None, why, None)
        .await?
    {
        after_finish(hub, &row).await;
    }
    Ok(())
}

async fn try_dispatch(hub: &Hub, cmd: &CommandRow) -> Result<(), crate::store::StoreError> {
    let cfg = hub.config().await;
    let Some(svc) = cfg.service(&cmd.service_id) else {
        return fail(hub, cmd, "the service is no longer configured").await;
    };
    let plan_json = if cmd.action == "check" {
        String::new()
    } else {
        let Some(action) = Action::parse(&cmd.action) else {
            return fail(hub, cmd, &format!("unknown action {:?}", cmd.action)).await;
        };
        let Some(control) = &svc.control else {
            return fail(
                hub,
                cmd,
                &format!(
                    "{} has no control: block, so it cannot be {action}ed",
                    svc.id
                ),
            )
            .await;
        };
        match control.plan(action) {
            Ok(plan) => serde_json::to_string(&plan).unwrap_or_default(),
            Err(e) => return fail(hub, cmd, &e.to_string()).await,
        }
    };
    let Some(node) = cfg.node(&cmd.node).cloned() else {
        return fail(
            hub,
            cmd,
            &format!("node {:?} is no longer configured", cmd.node),
        )
        .await;
    };
    let via = svc.control.as_ref().map(|c| c.via).unwrap_or_default();
    let agent = if node.agent {
        hub.session_tx(&node.name)
    } else {
        None
    };
    let ssh_ok = node.ssh.is_some() || (!node.agent && cmd.action == "check");
    let over_ssh = match via {
        Via::Agent => false,
        Via::Ssh => true,
        Via::Auto => agent.is_none() && ssh_ok,
    };
    if over_ssh {
        if !hub.store.mark_sent(cmd.id, "ssh").await? {
            return Ok(());
        }
        // On its own task: a slow SSH step must not hold up the caller (an agent's stream,
        // the periodic pass).
        if let Some(hub) = hub.arc() {
            let (cmd, svc) = (cmd.clone(), svc.clone());
            tokio::spawn(async move { run_over_ssh(&hub, &cmd, svc, node, plan_json).await });
        }
        return Ok(());
    }
    let Some(tx) = agent else {
        tracing::info!(command_id = cmd.id, node = %cmd.node, "agent not connected; command waits for it");
        return Ok(());
    };
    if !hub.store.mark_sent(cmd.id, "agent").await? {
        return Ok(()); // finished meanwhile
    }
    let msg = v1::CollectorMessage {
        msg: Some(Out::Command(v1::Command {
            command_id: cmd.id.to_string(),
            service_id: cmd.service_id.clone(),
            action: cmd.action.clone(),
            deadline_ms: cmd.deadline.timestamp_millis(),
            plan_json,
        })),
    };
    if tx.send(Ok(msg)).await.is_err() {
        tracing::warn!(command_id = cmd.id, node = %cmd.node, "agent stream closed while sending a command");
    } else {
        tracing::info!(command_id = cmd.id, node = %cmd.node, service = %cmd.service_id, action = %cmd.action, "command sent to agent");
    }
    Ok(())
}

/// Carries out a command from the collector: a check-now of an agentless service (locally or
/// over SSH), or a start/stop/restart plan over SSH. Records the outcome.
async fn run_over_ssh(
    hub: &Hub,
    cmd: &CommandRow,
    svc: Service,
    node: NodeConfig,
    plan_json: String,
) {
    tracing::info!(command_id = cmd.id, node = %node.name, service = %svc.id, action = %cmd.action, "running command over SSH");
    let (status, exit_code, output) = if cmd.action == "check" {
        let started_at = Utc::now();
        let outcome = crate::agentless::run_check(hub, &node, &svc.check).await;
        let text = format!(
            "{}: {}",
            outcome.status.as_str().to_uppercase(),
            outcome.message
        );
        let result = crate::agentless::result_of(cmd.id as u64, &svc.id, started_at, outcome);
        let map = std::iter::once((svc.id.clone(), svc.thresholds)).collect();
        match hub
            .store
            .ingest(
                &node.name,
                0,
                std::slice::from_ref(&result),
                &map,
                crate::store::Dedupe::PerResult,
            )
            .await
        {
            Ok(report) => crate::grpc::after_ingest(hub, &node.name, &report).await,
            Err(e) => {
                tracing::error!(command_id = cmd.id, error = %e, "cannot store a check-now result")
            }
        }
        ("succeeded", None, text)
    } else {
        let Some(ssh) = node.ssh.clone() else {
            let _ = fail(hub, cmd, &format!("node {} has no ssh: block", node.name)).await;
            return;
        };
        let plan: Plan = match serde_json::from_str(&plan_json) {
            Ok(p) => p,
            Err(e) => {
                let _ = fail(hub, cmd, &format!("bad plan: {e}")).await;
                return;
            }
        };
        let sudo = svc.control.as_ref().is_some_and(|c| c.sudo);
        let steps: Vec<Vec<String>> = match &plan.how {
            How::Steps { steps } => steps.clone(),
            How::Container { name } => {
                let mut argv: Vec<String> = Vec::new();
                if sudo {
                    argv.extend(["sudo".to_string(), "-n".to_string()]);
                }
                argv.extend([
                    "docker".to_string(),
                    plan.action.as_str().to_string(),
                    name.clone(),
                ]);
                vec![argv]
            }
        };
        let mut output = String::new();
        let mut outcome = ("succeeded", Some(0), String::new());
        for (i, argv) in steps.iter().enumerate() {
            output.push_str(&format!("$ {}\n", argv.join(" ")));
            match hub
                .ssh
                .run(&node.address, &ssh, argv, Some(plan.step_timeout))
                .await
            {
                Err(e) => {
                    output.push_str(&format!("step {}/{}: {e}\n", i + 1, steps.len()));
                    outcome = ("failed", None, String::new());
                    break;
                }
                Ok(o) => {
                    output.push_str(&vigil_checks::excerpt(&o.output, 4096));
                    if o.timed_out {
                        output.push_str(&format!("step {}/{} timed out\n", i + 1, steps.len()));
                        outcome = ("timed_out", None, String::new());
                        break;
                    }
                    if o.exit_code != Some(0) {
                        outcome = ("failed", o.exit_code, String::new());
                        break;
                    }
                }
            }
        }
        (outcome.0, outcome.1, output)
    };
    let output = vigil_checks::excerpt(&output, 8 * 1024);
    match hub
        .store
        .finish_command(cmd.id, status, exit_code, &output, Some(svc.grace))
        .await
    {
        Ok(Some(row)) => after_finish(hub, &row).await,
        Ok(None) => {}
        Err(e) => tracing::error!(command_id = cmd.id, error = %e, "cannot record command result"),
    }
}

/// An agent went away: its commands still in flight are re-sent over SSH where the service
/// allows it (`via: auto` and the node has SSH); the others time out at their deadline.
pub async fn agent_gone(hub: &Hub, node: &str) {
    let Ok(rows) = hub.store.open_commands().await else {
        return;
    };
    let cfg = hub.config().await;
    let has_ssh = cfg.node(node).is_some_and(|n| n.ssh.is_some());
    for row in rows
        .iter()
        .filter(|r| r.node == node && r.status == "sent" && r.via.as_deref() == Some("agent"))
    {
        let auto = cfg
            .service(&row.service_id)
            .and_then(|s| s.control.as_ref())
            .is_none_or(|c| c.via == Via::Auto);
        if auto && has_ssh {
            tracing::warn!(command_id = row.id, %node, "agent disconnected with the command in flight; re-running it over SSH");
            if hub.store.requeue(row.id).await.is_ok() {
                dispatch(hub, row).await;
            }
        }
    }
}

/// Applies a command result reported by `node`'s agent.
pub async fn on_agent_result(hub: &Hub, node: &str, mut r: v1::CommandResult) {
    vigil_proto::sanitize::command_result(&mut r);
    let Ok(id) = r.command_id.parse::<i64>() else {
        tracing::warn!(%node, command_id = %r.command_id, "result for an unknown command id");
        return;
    };
    let cmd = match hub.store.command(id).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            tracing::warn!(%node, command_id = id, "result for an unknown command");
            return;
        }
        Err(e) => {
            tracing::error!(%node, command_id = id, error = %e, "cannot read command");
            return;
        }
    };
    if cmd.node != node {
        tracing::warn!(%node, command_id = id, command_node = %cmd.node, "an agent reported a command of another node; ignored");
        return;
    }
    if cmd.action == "check"
        && let Some(c) = r.check.clone()
    {
        let svc_thresholds = hub
            .config()
            .await
            .service(&cmd.service_id)
            .map(|s| s.thresholds);
        if let Some(th) = svc_thresholds {
            let result = ResultIn {
                seq: id as u64,
                service_id: cmd.service_id.clone(),
                ..crate::grpc::result_in(c)
            };
            let map = std::iter::once((cmd.service_id.clone(), th)).collect();
            // Epoch 0 is reserved for check-now results; the command id keeps them unique.
            match hub
                .store
                .ingest(
                    node,
                    0,
                    std::slice::from_ref(&result),
                    &map,
                    crate::store::Dedupe::PerResult,
                )
                .await
            {
                Ok(report) => crate::grpc::after_ingest(hub, node, &report).await,
                Err(e) => {
                    tracing::error!(command_id = id, error = %e, "cannot store a check-now result")
                }
            }
        }
    }
    let status = if r.success {
        "succeeded"
    } else if r.timed_out {
        "timed_out"
    } else {
        "failed"
    };
    let output = vigil_checks::excerpt(&r.output, 8 * 1024);
    let grace = hub.config().await.service(&cmd.service_id).map(|s| s.grace);
    match hub
        .store
        .finish_command(id, status, Some(r.exit_code), &output, grace)
        .await
    {
        Ok(Some(row)) => after_finish(hub, &row).await,
        Ok(None) => tracing::info!(
            command_id = id,
            "result for a command that had already finished"
        ),
        Err(e) => tracing::error!(command_id = id, error = %e, "cannot record command result"),
    }
}

/// What follows a finished command (its grace period and mode were set with its outcome): log,
/// metric, audit event.
async fn after_finish(hub: &Hub, row: &CommandRow) {
    tracing::info!(
        command_id = row.id, service = %row.service_id, action = %row.action, origin = %row.origin,
        status = %row.status, exit_code = ?row.exit_code, "command finished"
    );
    hub.metrics.command_finished(&row.action, &row.status);
    if row.action == "check" {
        return;
    }
    let what = format!(
        "command {} ({} {}, {}) {}: {}",
        row.id,
        row.origin,
        row.action,
        row.requested_by,
        row.status,
        row.output.lines().last().unwrap_or("")
    );
    if let Err(e) = hub
        .store
        .add_event(
            &row.service_id,
            "remediation",
            &row.action,
            &row.status,
            &what,
        )
        .await
    {
        tracing::error!(command_id = row.id, error = %e, "cannot record the command's audit event");
    }
}

/// The periodic pass: times out overdue commands, dispatches pending ones, and re-evaluates
/// services that are down, paused or have spent some of their budget.
pub async fn tick(hub: &Hub) {
    match hub.store.expire_commands().await {
        Ok(rows) => {
            for row in rows {
                after_finish(hub, &row).await;
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot expire commands"),
    }
    match hub.store.open_commands().await {
        Ok(rows) => {
            for row in rows.iter().filter(|r| r.status == "pending") {
                dispatch(hub, row).await;
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read open commands"),
    }
    match hub.store.down_services().await {
        Ok(ids) => evaluate(hub, &ids).await,
        Err(e) => tracing::error!(error = %e, "cannot list services to evaluate"),
    }
}

/// On collector start-up: overdue commands are timed out, the others sent (again).
pub async fn recover(hub: &Hub) {
    tick(hub).await;
    if let Ok(rows) = hub.store.open_commands().await {
        for row in rows.iter().filter(|r| r.status == "sent") {
            if row.action == "restart-agent" {
                // Ran over SSH by the previous run; its outcome is unknown, and running it
                // again is the next liveness pass's decision, not a resend.
                let _ = hub
                    .store
                    .finish_command(
                        row.id,
                        "failed",
                        None,
                        "the collector restarted while the agent restart ran",
                        None,
                    )
                    .await;
                continue;
            }
            tracing::info!(command_id = row.id, service = %row.service_id, "re-sending a command left in flight by the previous run");
            if let Err(e) = hub.store.requeue(row.id).await {
                tracing::error!(command_id = row.id, error = %e, "cannot requeue command");
                continue;
            }
            dispatch(hub, row).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Thresholds;

    fn svc() -> Service {
        Service {
            id: "s".into(),
            name: "s".into(),
            category: crate::config::Category::Api,
            node: "n".into(),
            description: String::new(),
            check: serde_json::from_value(
                serde_json::json!({"type": "tcp", "address": "127.0.0.1:1"}),
            )
            .unwrap(),
            control: Some(
                serde_json::from_value(serde_json::json!({"restart": [["true"]]})).unwrap(),
            ),
            action: FailureAction::Restart,
            thresholds: Thresholds {
                after: 3,
                recover_after: 2,
                flap_high: 50,
                flap_low: 25,
            },
            max_restarts: 3,
            within: Duration::from_secs(3600),
            retry_after: Duration::from_secs(600),
            grace: Duration::from_secs(60),
            depends_on: vec![],
            command_deadline: Duration::from_secs(300),
            stale_after_explicit: None,
            on_stale: crate::config::OnStale::Alert,
            source: "s.yaml".into(),
            explicit: Default::default(),
            labels: Default::default(),
        }
    }

    fn down() -> ServiceView {
        ServiceView {
            service_id: "s".into(),
            state: State::Down,
            mode: "active".into(),
            paused_until: None,
            flapping: false,
            restarts_used: 0,
            gave_up_at: None,
            healthy_since: None,
            grace_until: None,
            in_flight: false,
            last_error_at: None,
            last_restart_at: None,
            stale: false,
        }
    }

    #[test]
    fn down_service_is_restarted_within_budget() {
        let now = Utc::now();
        assert!(matches!(
            decide(&down(), &svc(), &[], now),
            Decision::Restart { .. }
        ));
        let v = ServiceView {
            restarts_used: 2,
            ..down()
        };
        match decide(&v, &svc(), &[], now) {
            Decision::Restart { reason } => assert!(reason.contains("3 of 3"), "{reason}"),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn nothing_while_in_flight_flapping_in_grace_paused_stopped_or_dependency_down() {
        let now = Utc::now();
        let s = svc();
        for v in [
            ServiceView {
                stale: true,
                ..down()
            },
            ServiceView {
                in_flight: true,
                ..down()
            },
            ServiceView {
                flapping: true,
                ..down()
            },
            ServiceView {
                grace_until: Some(now + chrono::Duration::seconds(10)),
                ..down()
            },
            ServiceView {
                mode: "stopped".into(),
                ..down()
            },
            ServiceView {
                mode: "paused".into(),
                ..down()
            },
        ] {
            assert_eq!(decide(&v, &s, &[], now), Decision::Nothing, "{v:?}");
        }
        assert_eq!(decide(&down(), &s, &["db".into()], now), Decision::Nothing);
        // No failure seen since the last restart finished: wait for evidence.
        let t = now - chrono::Duration::seconds(5);
        let no_news = ServiceView {
            last_restart_at: Some(t),
            last_error_at: Some(t - chrono::Duration::seconds(1)),
            ..down()
        };
        assert_eq!(decide(&no_news, &s, &[], now), Decision::Nothing);
        let news = ServiceView {
            last_error_at: Some(now),
            ..no_news
        };
        assert!(matches!(
            decide(&news, &s, &[], now),
            Decision::Restart { .. }
        ));
        // Notify-only services are never restarted.
        let notify = Service {
            action: FailureAction::Notify,
            ..svc()
        };
        assert_eq!(decide(&down(), &notify, &[], now), Decision::Nothing);
    }

    #[test]
    fn budget_spent_gives_up_then_retries_after_retry_after() {
        let now = Utc::now();
        let s = svc();
        let spent = ServiceView {
            restarts_used: 3,
            ..down()
        };
        assert!(matches!(
            decide(&spent, &s, &[], now),
            Decision::GiveUp { .. }
        ));
        let gave_up = ServiceView {
            gave_up_at: Some(now - chrono::Duration::seconds(60)),
            ..spent.clone()
        };
        assert_eq!(decide(&gave_up, &s, &[], now), Decision::Nothing);
        let later = ServiceView {
            gave_up_at: Some(now - chrono::Duration::seconds(601)),
            ..spent
        };
        assert!(matches!(
            decide(&later, &s, &[], now),
            Decision::Restart { .. }
        ));
    }

    #[test]
    fn budget_refills_after_a_whole_healthy_window_and_pause_expires() {
        let now = Utc::now();
        let s = svc();
        let healthy = ServiceView {
            state: State::Healthy,
            restarts_used: 2,
            ..down()
        };
        let recent = ServiceView {
            healthy_since: Some(now - chrono::Duration::minutes(30)),
            ..healthy.clone()
        };
        assert_eq!(decide(&recent, &s, &[], now), Decision::Nothing);
        let long = ServiceView {
            healthy_since: Some(now - chrono::Duration::minutes(61)),
            ..healthy
        };
        assert_eq!(decide(&long, &s, &[], now), Decision::Refill);
        let paused = ServiceView {
            mode: "paused".into(),
            paused_until: Some(now - chrono::Duration::seconds(1)),
            ..down()
        };
        assert_eq!(decide(&paused, &s, &[], now), Decision::Resume);
    }
}
