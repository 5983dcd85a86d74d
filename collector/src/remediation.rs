//! Remediation: decides when a down service is restarted (restart budget, give-up and retry,
//! grace period, flapping, dependencies, operator modes), turns decisions and operator requests
//! into commands, dispatches them to the node's agent, and applies their outcomes.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
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
    // In maintenance: operators are working on it.
    if v.in_flight || v.flapping || v.stale || v.maintenance || !deps_down.is_empty() {
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
    // A restart decided from these views is created only if none was since (see
    // `Store::create_auto_restart`); a second earlier, for clocks of collector and database.
    let decided_at = Utc::now() - chrono::Duration::seconds(1);
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
            Decision::Restart { reason } => auto_restart(hub, svc, &reason, decided_at).await,
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
    decided_at: DateTime<Utc>,
) -> Result<(), crate::store::StoreError> {
    let deadline =
        Utc::now() + chrono::Duration::from_std(svc.command_deadline).unwrap_or_default();
    let Some(id) = hub
        .store
        .create_auto_restart(
            &NewCommand {
                service_id: &svc.id,
                node: &svc.node,
                action: "restart",
                origin: "auto",
                requested_by: "vigil",
                reason,
                deadline,
            },
            decided_at,
        )
        .await?
    else {
        return Ok(()); // one is in flight, or another evaluation acted meanwhile
    };
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

/// Why an automatic start/stop/restart must not be sent now (the service was paused, stopped
/// or put in maintenance since it was decided), read from the database at the moment of sending.
/// Operators' own commands and checks always go.
async fn must_not_send(
    hub: &Hub,
    cmd: &CommandRow,
) -> Result<Option<String>, crate::store::StoreError> {
    if cmd.origin != "auto" || cmd.action == "check" {
        return Ok(None);
    }
    let views = hub.store.views(&[cmd.service_id.as_str()]).await?;
    let Some(v) = views.first() else {
        return Ok(None);
    };
    Ok(if v.mode != "active" {
        Some(format!(
            "automatic {} cancelled before it was sent: the service is {}",
            cmd.action, v.mode
        ))
    } else if v.maintenance {
        Some(format!(
            "automatic {} cancelled before it was sent: the service is in maintenance",
            cmd.action
        ))
    } else {
        None
    })
}

/// Cancels `cmd` (never sent, or not to be sent again), with its audit event.
async fn cancel(hub: &Hub, cmd: &CommandRow, why: &str) -> Result<(), crate::store::StoreError> {
    tracing::warn!(command_id = cmd.id, service = %cmd.service_id, reason = why, "command cancelled");
    if let Some(row) = hub.store.cancel_command(cmd.id, why).await? {
        after_finish(hub, &row).await;
    }
    Ok(())
}

/// The protocol message for `cmd`.
fn command_message(hub: &Hub, cmd: &CommandRow, plan_json: String) -> v1::CollectorMessage {
    v1::CollectorMessage {
        msg: Some(Out::Command(v1::Command {
            command_id: cmd.id.to_string(),
            service_id: cmd.service_id.clone(),
            action: cmd.action.clone(),
            deadline_ms: cmd.deadline.timestamp_millis(),
            plan_json,
            issuer: hub.store.uid().to_string(),
        })),
    }
}

/// The plan of `cmd` as JSON ("" for a check), or why it cannot be carried out.
fn plan_of(svc: &Service, cmd: &CommandRow) -> Result<String, String> {
    if cmd.action == "check" {
        return Ok(String::new());
    }
    let Some(action) = Action::parse(&cmd.action) else {
        return Err(format!("unknown action {:?}", cmd.action));
    };
    let Some(control) = &svc.control else {
        return Err(format!(
            "{} has no control: block, so it cannot be {action}ed",
            svc.id
        ));
    };
    control
        .plan(action)
        .map(|plan| serde_json::to_string(&plan).unwrap_or_default())
        .map_err(|e| e.to_string())
}

/// A command sent to `node`'s agent earlier (by this collector before a restart, or on a
/// stream that broke) is sent again with the same id now that the agent is connected: its
/// journal decides — the recorded outcome if it ran, "still running", or it runs now if it
/// never arrived. Never run twice, never silently forgotten.
pub async fn resend_to_agent(hub: &Hub, node: &str) {
    let rows = match hub.store.open_commands().await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!(%node, error = %e, "cannot read open commands");
            return;
        }
    };
    let Some(tx) = hub.session_tx(node) else {
        return;
    };
    let cfg = hub.config().await;
    for row in rows
        .iter()
        .filter(|r| r.node == node && r.status == "sent" && r.via.as_deref() == Some("agent"))
    {
        if row.deadline <= Utc::now() {
            // Timed out by the next pass; an outcome the agent still holds arrives late.
            continue;
        }
        match must_not_send(hub, row).await {
            Ok(Some(why)) => {
                let _ = cancel(hub, row, &why).await;
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(command_id = row.id, error = %e, "cannot read the service's mode; not sent again now");
                continue;
            }
        }
        let Some(svc) = cfg.service(&row.service_id) else {
            let _ = fail(hub, row, "the service is no longer configured").await;
            continue;
        };
        let plan_json = match plan_of(svc, row) {
            Ok(p) => p,
            Err(why) => {
                let _ = fail(hub, row, &why).await;
                continue;
            }
        };
        match hub.store.mark_resent(row.id).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::error!(command_id = row.id, error = %e, "cannot record a resend");
                continue;
            }
        }
        tracing::info!(command_id = row.id, %node, service = %row.service_id, action = %row.action,
            "command sent again to the reconnected agent (its journal decides whether it runs)");
        if tx
            .send(Ok(command_message(hub, row, plan_json)))
            .await
            .is_err()
        {
            tracing::warn!(command_id = row.id, %node, "agent stream closed while sending a command");
        }
    }
}

async fn try_dispatch(hub: &Hub, cmd: &CommandRow) -> Result<(), crate::store::StoreError> {
    if cmd.deadline <= Utc::now() {
        tracing::info!(
            command_id = cmd.id,
            "deadline passed before the command could be sent; not sent"
        );
        return Ok(()); // the next pass times it out
    }
    if let Some(why) = must_not_send(hub, cmd).await? {
        return cancel(hub, cmd, &why).await;
    }
    let cfg = hub.config().await;
    let Some(svc) = cfg.service(&cmd.service_id) else {
        return fail(hub, cmd, "the service is no longer configured").await;
    };
    let plan_json = match plan_of(svc, cmd) {
        Ok(p) => p,
        Err(why) => return fail(hub, cmd, &why).await,
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
    let msg = command_message(hub, cmd, plan_json);
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
        let exit_code = outcome.exit_code;
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
        ("succeeded", exit_code, text)
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
            if Utc::now() > cmd.deadline {
                // Like an agent: nothing starts after the deadline.
                output.push_str(&format!(
                    "step {}/{} not started: the command's deadline passed\n",
                    i + 1,
                    steps.len()
                ));
                outcome = ("timed_out", None, String::new());
                break;
            }
            output.push_str(&format!("$ {}\n", argv.join(" ")));
            match hub
                .ssh
                .run(&node.address, &ssh, argv, Some(plan.step_timeout))
                .await
            {
                Err(e) => {
                    output.push_str(&format!("step {}/{}: {e}\n", i + 1, steps.len()));
                    // The connection broke after the step was sent: it may have run. Reported
                    // as unknown and never run again; any other error means it did not start.
                    let status = if matches!(e, crate::ssh::SshError::Lost { .. }) {
                        "unknown"
                    } else {
                        "failed"
                    };
                    outcome = (status, None, String::new());
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
        // Closed meanwhile (the backstop expiry, a restarted collector): keep what happened.
        Ok(None) => match hub
            .store
            .late_outcome(cmd.id, status, exit_code, &output)
            .await
        {
            Ok(Some(row)) => tracing::warn!(command_id = cmd.id, closed_as = %row.status,
                reported = status, "a command run over SSH ended after it had been closed; both are kept"),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(command_id = cmd.id, error = %e, "cannot record a late outcome")
            }
        },
        Err(e) => tracing::error!(command_id = cmd.id, error = %e, "cannot record command result"),
    }
}

/// An agent went away. Its commands in flight stay with it: it may have received and started
/// them, so running them elsewhere (over SSH) could run them twice. When it reconnects they are
/// sent again and its journal decides; otherwise they time out at their deadline.
pub async fn agent_gone(hub: &Hub, node: &str) {
    let Ok(rows) = hub.store.open_commands().await else {
        return;
    };
    let waiting = rows
        .iter()
        .filter(|r| r.node == node && r.status == "sent" && r.via.as_deref() == Some("agent"))
        .count();
    if waiting > 0 {
        tracing::warn!(%node, commands = waiting,
            "agent disconnected with commands in flight; they wait for it (never re-run elsewhere) until their deadline");
    }
}

/// Applies a command result reported by `node`'s agent. Returns whether the agent may forget
/// it (`CommandAck`): true once the outcome is recorded (or can never be: an unknown command,
/// another database's or another node's), false when it could not be stored now (the agent
/// sends it again on its next stream).
pub async fn on_agent_result(hub: &Hub, node: &str, mut r: v1::CommandResult) -> bool {
    vigil_proto::sanitize::command_result(&mut r);
    if !r.issuer.is_empty() && r.issuer != hub.store.uid() {
        tracing::warn!(%node, command_id = ?r.command_id, issuer = ?r.issuer,
            "outcome of a command issued by another database; ignored");
        return true;
    }
    let Ok(id) = r.command_id.parse::<i64>() else {
        tracing::warn!(%node, command_id = ?r.command_id, "result for an unknown command id");
        return true;
    };
    let cmd = match hub.store.command(id).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            tracing::warn!(%node, command_id = id, "result for an unknown command");
            return true;
        }
        Err(e) => {
            tracing::error!(%node, command_id = id, error = %e, "cannot read command");
            return false;
        }
    };
    if cmd.node != node {
        tracing::warn!(%node, command_id = id, command_node = %cmd.node, "an agent reported a command of another node; ignored");
        return true;
    }
    // The agent's clock, held to the same rule as its results' (`max_clock_skew`).
    let max_skew = hub.config().await.max_clock_skew;
    let now_ms = Utc::now().timestamp_millis();
    let started_at = (r.started_at_ms > 0)
        .then(|| {
            let (at, _) = crate::grpc::plausible_start(r.started_at_ms, now_ms, max_skew);
            Utc.timestamp_millis_opt(at).single()
        })
        .flatten();
    if let Some(at) = started_at
        && let Err(e) = hub.store.command_started(id, at).await
    {
        tracing::error!(command_id = id, error = %e, "cannot record when the command started");
    }
    if r.running {
        tracing::info!(command_id = id, %node, service = %cmd.service_id,
            "the agent is still running the command (sent again after a reconnect); its outcome follows");
        return false;
    }
    if cmd.action == "check"
        && let Some(mut c) = r.check.clone()
    {
        let (at, skew) = crate::grpc::plausible_start(c.started_at_ms, now_ms, max_skew);
        if let Some(skew_ms) = skew {
            tracing::warn!(%node, command_id = id, skew_ms,
                "a check-now result with an implausible time is stored with the receive time; check the node's clock");
            c.started_at_ms = at;
        }
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
                    tracing::error!(command_id = id, error = %e, "cannot store a check-now result");
                    return false;
                }
            }
        }
    }
    let status = if r.outcome_unknown {
        "unknown"
    } else if r.success {
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
        Ok(Some(row)) => {
            after_finish(hub, &row).await;
            true
        }
        Ok(None) => match hub
            .store
            .late_outcome(id, status, Some(r.exit_code), &output)
            .await
        {
            Ok(Some(row)) => {
                tracing::warn!(command_id = id, %node, service = %row.service_id, closed_as = %row.status,
                    reported = status, "the agent reported the outcome of a command already closed; both are kept");
                hub.metrics
                    .command_finished(&row.action, &format!("late_{status}"));
                if row.action != "check" {
                    let what = format!(
                        "command {id} ({} {}) was {} but the agent reported later: {status}: {}",
                        row.origin,
                        row.action,
                        row.status,
                        output.lines().last().unwrap_or("")
                    );
                    if let Err(e) = hub
                        .store
                        .add_event(&row.service_id, "remediation", &row.status, status, &what)
                        .await
                    {
                        tracing::error!(command_id = id, error = %e, "cannot record the late outcome's event");
                    }
                }
                true
            }
            Ok(None) => {
                tracing::info!(
                    command_id = id,
                    "outcome of a command already recorded (sent again)"
                );
                true
            }
            Err(e) => {
                tracing::error!(command_id = id, error = %e, "cannot record a late outcome");
                false
            }
        },
        Err(e) => {
            tracing::error!(command_id = id, error = %e, "cannot record command result");
            false
        }
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
    if row.status == "succeeded"
        && matches!(row.action.as_str(), "start" | "restart")
        && let Some(hub) = hub.arc()
    {
        let row = row.clone();
        tokio::spawn(async move { verify(&hub, &row).await });
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

/// Time between the checks that verify a service after a successful start or restart.
pub const VERIFY_SPACING: Duration = Duration::from_secs(1);
/// How long a verification check may wait to be carried out.
const VERIFY_DEADLINE: Duration = Duration::from_secs(60);

/// After a successful start or restart the service is checked at once (and `recover_after` - 1
/// more times, [`VERIFY_SPACING`] apart), so that it reads healthy again within about a second
/// instead of at its next scheduled check. Stops early once the service is healthy.
async fn verify(hub: &Hub, row: &CommandRow) {
    let Some(svc) = hub.config().await.service(&row.service_id).cloned() else {
        return;
    };
    let n = svc.thresholds.recover_after.max(1);
    for i in 0..n {
        if i > 0 {
            tokio::time::sleep(VERIFY_SPACING).await;
            match hub.store.views(&[svc.id.as_str()]).await {
                Ok(v) if v.first().is_some_and(|v| v.state == State::Healthy) => return,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(service = %svc.id, error = %e, "cannot read the state; verification stops");
                    return;
                }
            }
        }
        let reason = format!(
            "verify after command {} ({} succeeded), check {} of {n}",
            row.id,
            row.action,
            i + 1
        );
        let created = hub
            .store
            .create_command(&NewCommand {
                service_id: &svc.id,
                node: &svc.node,
                action: "check",
                origin: "auto",
                requested_by: "vigil",
                reason: &reason,
                deadline: Utc::now()
                    + chrono::Duration::from_std(VERIFY_DEADLINE).unwrap_or_default(),
            })
            .await;
        match created {
            Ok(Some(id)) => {
                tracing::debug!(service = %svc.id, command_id = id, "verification check");
                match hub.store.command(id).await {
                    Ok(Some(cmd)) => dispatch(hub, &cmd).await,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(command_id = id, error = %e, "cannot read a verification check")
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(service = %svc.id, error = %e, "cannot create a verification check");
                return;
            }
        }
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

/// On collector start-up: overdue commands are timed out, pending ones dispatched (their
/// service's mode checked again). A command the previous run had sent to an agent stays sent: it
/// goes again when the agent connects, and the agent's journal decides whether it runs. One it
/// was running over SSH may or may not have run: its outcome is `unknown`, it is never re-run.
pub async fn recover(hub: &Hub) {
    // What the previous run left, read before this run sends anything (a command this run
    // sends over SSH must not be taken for one the previous run left running).
    let rows = match hub.store.open_commands().await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the commands left open");
            tick(hub).await;
            return;
        }
    };
    for row in rows
        .iter()
        .filter(|r| r.status == "sent" && r.via.as_deref() != Some("agent"))
    {
        let why = if row.action == "check" {
            "the collector stopped while the check ran over SSH; not run again"
        } else {
            "outcome unknown: the collector stopped while this ran over SSH (it may or may not \
             have completed); not run again"
        };
        tracing::warn!(command_id = row.id, service = %row.service_id, action = %row.action, "{why}");
        let status = if row.action == "check" {
            "failed"
        } else {
            "unknown"
        };
        match hub
            .store
            .finish_command(row.id, status, None, why, None)
            .await
        {
            Ok(Some(done)) => after_finish(hub, &done).await,
            Ok(None) => {}
            Err(e) => tracing::error!(command_id = row.id, error = %e, "cannot close a command"),
        }
    }
    let waiting = rows
        .iter()
        .filter(|r| r.status == "sent" && r.via.as_deref() == Some("agent"))
        .count();
    if waiting > 0 {
        tracing::info!(
            commands = waiting,
            "commands sent to agents by the previous run go again when their agent connects"
        );
    }
    tick(hub).await;
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
            maintenance: false,
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
                maintenance: true,
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
