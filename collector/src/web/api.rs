//! The REST API under `/api`: service health, force-check, runtime health-check config,
//! start/stop/restart/pause/resume, commands, results, events, daily roll-ups and nodes; the
//! OpenAPI document is generated from these handlers (utoipa).

use std::time::Duration;

use crate::rollup::MetricSummary;
use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};
use vigil_checks::{CheckKind, CheckSpec};

use super::auth::{Caller, Role};
use super::settings::{HealthConfigBody, HealthConfigView};
use super::{ApiError, AppState, ErrorBody};
use crate::config::{Config, Service};
use crate::store::{
    AlertRow, AttemptRow, CommandRow, DailyRow, EventRow, HealthRow, IncidentRow, NodeEventRow,
    NodeRow, ResultRow,
};

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/api/openapi.json", get(openapi))
        .route("/api/services/health", get(list_health))
        .route("/api/services/health/{id}", get(one_health))
        .route("/api/health-check/force/{id}", post(force_check))
        .route("/api/health-check/config", get(get_config).put(put_config))
        .route("/api/services/{id}/results", get(results))
        .route("/api/services/{id}/events", get(events))
        .route("/api/services/{id}/commands", get(service_commands))
        .route("/api/services/{id}/daily", get(daily))
        .route("/api/services/{id}/{action}", post(act))
        .route("/api/commands/{id}", get(command))
        .route("/api/nodes", get(nodes))
        .merge(super::maintenance::routes())
        .merge(super::availability::routes())
        .route("/api/incidents", get(incidents))
        .route("/api/incidents/{id}", get(incident))
        .route("/api/incidents/{id}/ack", post(ack_incident))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(super::refuse_bad_bytes))
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {}", uri.path()))
}

/// The dashboard's words for a service's condition.
pub fn badge(row: &HealthRow) -> &'static str {
    match (row.mode.as_str(), row.flapping, row.state.as_str()) {
        ("stopped", _, _) => "stopped",
        ("paused", _, _) => "paused",
        _ if row.stale_since.is_some() || row.node_down_since.is_some() => "stale",
        (_, true, _) => "flapping",
        (_, _, "healthy") => "running",
        (_, _, "failing" | "down") => "abnormal",
        _ => "unknown",
    }
}

/// Where a check looks: host:port for network checks, the container, unit or process otherwise.
pub fn target_of(spec: &CheckSpec, node_address: &str) -> String {
    let from_url = |u: &str| {
        reqwest::Url::parse(u)
            .ok()
            .and_then(|u| {
                Some(format!(
                    "{}:{}",
                    u.host_str()?,
                    u.port_or_known_default().unwrap_or(0)
                ))
            })
            .unwrap_or_else(|| u.to_string())
    };
    match &spec.kind {
        CheckKind::Http(h) => from_url(&h.request.url),
        CheckKind::Web(w) => from_url(&w.url),
        CheckKind::Tcp(t) => t.address.clone(),
        CheckKind::Grpc(g) => g.address.clone(),
        CheckKind::Docker(d) => format!("{node_address} container {}", d.container),
        CheckKind::Systemd(s) => format!("{node_address} unit {}", s.unit),
        CheckKind::Process(p) => match &p.name {
            Some(n) => format!("{node_address} process {n}"),
            None => node_address.to_string(),
        },
        _ => node_address.to_string(),
    }
}

/// A service's health.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ServiceHealth {
    pub id: String,
    pub name: String,
    pub node: String,
    pub category: String,
    pub description: String,
    /// Where the check looks (host:port, container, unit, ...).
    pub target: String,
    /// Check kind (http, tcp, docker, ...).
    pub check: String,
    /// running | abnormal | stopped | paused | flapping | stale | unknown
    pub status: String,
    /// unknown | healthy | failing | down (the state machine), or stale: no recent result, so
    /// nothing is known now (counts as not up)
    pub state: String,
    /// Why the service is not up when `state` alone does not say: stale (and since when
    /// nothing arrived), or its node is down.
    pub reason: Option<String>,
    pub stale_since: Option<DateTime<Utc>>,
    /// Operator mode: active | stopped | paused
    pub mode: String,
    pub paused_until: Option<DateTime<Utc>>,
    pub flapping: bool,
    /// Healthy and a recent result says so (false while stale or while the node is down).
    pub is_healthy: bool,
    /// Consecutive failed checks.
    pub error_count: i32,
    pub consecutive_successes: i32,
    /// Percent of successful checks over the last 24 hours (null without checks).
    pub success_rate_24h: Option<f64>,
    pub total_checks_24h: i64,
    pub failures_24h: i64,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub last_message: Option<String>,
    pub last_check_at: Option<DateTime<Utc>>,
    pub last_response_ms: Option<i32>,
    /// Seconds since the last transition to healthy (null unless healthy).
    pub uptime_seconds: Option<i64>,
    pub healthy_since: Option<DateTime<Utc>>,
    pub state_since: DateTime<Utc>,
    /// Automatic restarts used in the current window.
    pub restarts_used: i32,
    /// When remediation gave up restarting it (the restart budget was spent); null when it has
    /// not given up.
    pub gave_up_at: Option<DateTime<Utc>>,
    /// Whether the service can be started/stopped/restarted (it has a control block).
    pub controllable: bool,
    /// The maintenance window the service is in now (no restarts, no alerts); null when none.
    pub maintenance: Option<crate::store::ActiveMaintenance>,
    /// `labels:` of the service file.
    pub labels: std::collections::BTreeMap<String, String>,
}

pub fn service_health(cfg: &Config, row: &HealthRow, now: DateTime<Utc>) -> ServiceHealth {
    let svc = cfg.service(&row.service_id);
    let address = cfg
        .node(&row.node)
        .map(|n| n.address.as_str())
        .unwrap_or("");
    let healthy = row.is_up();
    ServiceHealth {
        id: row.service_id.clone(),
        name: row.name.clone(),
        node: row.node.clone(),
        category: row.category.clone(),
        description: row.description.clone(),
        target: svc
            .map(|s| target_of(&s.check, address))
            .unwrap_or_default(),
        check: svc
            .map(|s| s.check.kind.name().to_string())
            .unwrap_or_default(),
        status: badge(row).into(),
        state: row.shown_state().to_string(),
        reason: row.reason(),
        stale_since: row.stale_since,
        mode: row.mode.clone(),
        paused_until: row.paused_until,
        flapping: row.flapping,
        is_healthy: healthy,
        error_count: row.consecutive_failures,
        consecutive_successes: row.consecutive_successes,
        success_rate_24h: (row.checks_24h > 0).then(|| {
            let ok = (row.checks_24h - row.failures_24h) as f64 * 100.0 / row.checks_24h as f64;
            (ok * 100.0).round() / 100.0
        }),
        total_checks_24h: row.checks_24h,
        failures_24h: row.failures_24h,
        last_error: row.last_error.clone(),
        last_error_at: row.last_error_at,
        last_message: row.last_message.clone(),
        last_check_at: row.last_check_at,
        last_response_ms: row.last_response_ms,
        uptime_seconds: row
            .healthy_since
            .filter(|_| healthy)
            .map(|h| (now - h).num_seconds().max(0)),
        healthy_since: row.healthy_since,
        state_since: row.state_since,
        restarts_used: row.restarts_used,
        gave_up_at: row.gave_up_at,
        controllable: svc.is_some_and(|s| s.control.is_some()),
        maintenance: row.maintenance.clone(),
        labels: svc.map(|s| s.labels.clone()).unwrap_or_default(),
    }
}

/// Filters of the service list (all optional).
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HealthFilter {
    pub category: Option<String>,
    pub node: Option<String>,
    /// running | abnormal | stopped | paused | flapping | stale | unknown
    pub status: Option<String>,
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::bad_request(None, e.body_text()))
}

fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(t)| t)
        .map_err(|e| ApiError::bad_request(None, e.body_text()))
}

async fn service_of(state: &AppState, id: &str) -> Result<Service, ApiError> {
    state
        .hub
        .config()
        .await
        .service(id)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no service {id:?}")))
}

#[utoipa::path(get, path = "/api/services/health", params(HealthFilter),
    responses((status = 200, body = [ServiceHealth]), (status = 401, body = ErrorBody)),
    security(("bearer" = [])), tag = "health")]
/// Every configured service with its health and 24-hour figures.
async fn list_health(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<HealthFilter>, QueryRejection>,
) -> Result<Json<Vec<ServiceHealth>>, ApiError> {
    caller.require(Role::Viewer)?;
    let f = query(q)?;
    let rows = state.hub.store.health(None, true).await?;
    let cfg = state.hub.config().await;
    let now = Utc::now();
    Ok(Json(
        rows.iter()
            .filter(|r| f.category.as_ref().is_none_or(|c| &r.category == c))
            .filter(|r| f.node.as_ref().is_none_or(|n| &r.node == n))
            .filter(|r| f.status.as_ref().is_none_or(|s| badge(r) == s))
            .map(|r| service_health(&cfg, r, now))
            .collect(),
    ))
}

#[utoipa::path(get, path = "/api/services/health/{id}", params(("id" = String, Path)),
    responses((status = 200, body = ServiceHealth), (status = 404, body = ErrorBody)),
    security(("bearer" = [])), tag = "health")]
/// One service's health.
async fn one_health(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ServiceHealth>, ApiError> {
    caller.require(Role::Viewer)?;
    let id = path(id)?;
    let rows = state.hub.store.health(Some(&id), true).await?;
    let row = rows
        .first()
        .ok_or_else(|| ApiError::not_found(format!("no service {id:?}")))?;
    Ok(Json(service_health(
        &*state.hub.config().await,
        row,
        Utc::now(),
    )))
}

/// The result of a check run on request.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CheckNow {
    /// ok | warning | critical | unknown
    pub status: String,
    pub message: String,
    pub duration_ms: i32,
}

/// A force-check: the command and, once it finished, the check's result.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ForceCheck {
    pub command: CommandRow,
    /// Null while the check is still running (HTTP 202) or when it could not run.
    pub result: Option<CheckNow>,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WaitParam {
    /// Seconds to wait for the result (default 30, at most 120); 0 answers at once.
    pub wait: Option<u64>,
}

/// Creates a manual command, sends it, and maps "one already in flight" to 409.
async fn request(
    state: &AppState,
    svc: &Service,
    action: &str,
    caller: &Caller,
) -> Result<i64, ApiError> {
    let id = crate::remediation::request(&state.hub.store, svc, action, &caller.who())
        .await?
        .ok_or_else(|| {
            ApiError::conflict(format!(
                "{} already has a start/stop/restart in flight; wait for its outcome",
                svc.id
            ))
        })?;
    tracing::info!(service = %svc.id, action, command_id = id, by = %caller.name, "command requested through the API");
    if let Some(cmd) = state.hub.store.command(id).await? {
        crate::remediation::dispatch(&state.hub, &cmd).await;
    }
    Ok(id)
}

#[utoipa::path(post, path = "/api/health-check/force/{id}", params(("id" = String, Path), WaitParam),
    responses((status = 200, description = "the check ran", body = ForceCheck),
              (status = 202, description = "still running; poll /api/commands/{id}", body = ForceCheck),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, description = "a command for the service is already in flight", body = ErrorBody)),
    security(("bearer" = [])), tag = "health")]
/// Runs a service's check now (through its agent, or from the collector for agentless nodes)
/// and returns its result.
async fn force_check(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<WaitParam>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Operator)?;
    let id = path(id)?;
    let wait = query(q)?.wait.unwrap_or(30);
    if wait > 120 {
        return Err(ApiError::bad_request(
            Some("wait"),
            "must be at most 120 seconds",
        ));
    }
    let svc = service_of(&state, &id).await?;
    let cmd_id = request(&state, &svc, "check", &caller).await?;
    let until = tokio::time::Instant::now() + Duration::from_secs(wait);
    loop {
        let cmd = state
            .hub
            .store
            .command(cmd_id)
            .await?
            .ok_or_else(|| ApiError::not_found("the command disappeared"))?;
        if cmd.finished_at.is_some() {
            let result = state
                .hub
                .store
                .check_now_result(&cmd.node, cmd_id)
                .await?
                .map(|(status, message, duration_ms)| CheckNow {
                    status: status.as_str().to_string(),
                    message,
                    duration_ms,
                });
            return Ok((
                StatusCode::OK,
                Json(ForceCheck {
                    command: cmd,
                    result,
                }),
            ));
        }
        if tokio::time::Instant::now() >= until {
            return Ok((
                StatusCode::ACCEPTED,
                Json(ForceCheck {
                    command: cmd,
                    result: None,
                }),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[utoipa::path(get, path = "/api/health-check/config",
    responses((status = 200, body = HealthConfigView)), security(("bearer" = [])), tag = "config")]
/// The global health-check settings in force.
async fn get_config(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<HealthConfigView>, ApiError> {
    caller.require(Role::Viewer)?;
    Ok(Json(super::settings::view(&state.hub).await?))
}

#[utoipa::path(put, path = "/api/health-check/config", request_body = HealthConfigBody,
    responses((status = 200, body = HealthConfigView), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody)),
    security(("bearer" = [])), tag = "config")]
/// Changes the global health-check settings (admin). Stored in PostgreSQL and in force at once:
/// services that do not set these values themselves take them, and agents get their new checks.
async fn put_config(
    State(state): State<AppState>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<Json<HealthConfigView>, ApiError> {
    caller.require(Role::Admin)?;
    let mut de = serde_json::Deserializer::from_slice(&body);
    let parsed: HealthConfigBody = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let field = (field != ".").then_some(field);
        let msg = e.inner().to_string();
        // serde names a missing or unknown field only in its message.
        let named = msg
            .split('`')
            .nth(1)
            .filter(|_| msg.starts_with("missing field") || msg.starts_with("unknown field"))
            .map(str::to_string);
        ApiError::bad_request(named.or(field).as_deref(), format!("invalid body: {msg}"))
    })?;
    let settings = parsed
        .to_settings()
        .map_err(|e| ApiError::bad_request(Some(e.field), format!("{}: {}", e.field, e.reason)))?;
    super::settings::update(&state.hub, settings, &caller.who()).await?;
    Ok(Json(super::settings::view(&state.hub).await?))
}

/// A new command.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CommandCreated {
    pub command_id: i64,
    /// Where to follow it.
    pub url: String,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PauseParam {
    /// pause only: end the pause after this many minutes (default: until resumed).
    pub minutes: Option<u64>,
}

#[utoipa::path(post, path = "/api/services/{id}/{action}",
    params(("id" = String, Path), ("action" = String, Path, description = "start | stop | restart | pause | resume"), PauseParam),
    responses((status = 202, description = "start/stop/restart: command created", body = CommandCreated),
              (status = 200, description = "pause/resume: the service's health", body = ServiceHealth),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, description = "a start/stop/restart is in flight, or the service has no control block", body = ErrorBody)),
    security(("bearer" = [])), tag = "control")]
/// Acts on a service (operator). start/stop/restart go the same way as automatic remediation
/// and return the command to follow; a successful stop makes the service `stopped` (never
/// restarted automatically), a successful start or restart makes it active again (ending a stop
/// or a pause). pause silences remediation and alerts (checks go on); resume ends it.
async fn act(
    State(state): State<AppState>,
    caller: Caller,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<PauseParam>, QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    let (id, action) = path(p)?;
    if !matches!(
        action.as_str(),
        "start" | "stop" | "restart" | "pause" | "resume"
    ) {
        return Err(ApiError::not_found(format!(
            "no action {action:?}; actions: start, stop, restart, pause, resume"
        )));
    }
    caller.require(Role::Operator)?;
    let minutes = query(q)?.minutes;
    let svc = service_of(&state, &id).await?;
    match action.as_str() {
        "pause" | "resume" => {
            let (mode, until, reason) = if action == "pause" {
                let until = minutes.map(|m| Utc::now() + chrono::Duration::minutes(m as i64));
                ("paused", until, format!("paused by {}", caller.who()))
            } else {
                ("active", None, format!("resumed by {}", caller.who()))
            };
            state
                .hub
                .store
                .set_mode(&svc.id, mode, until, &reason)
                .await?;
            let rows = state.hub.store.health(Some(&svc.id), true).await?;
            let row = rows
                .first()
                .ok_or_else(|| ApiError::not_found(format!("no service {id:?}")))?;
            Ok(Json(service_health(&*state.hub.config().await, row, Utc::now())).into_response())
        }
        _ => {
            if svc.control.is_none() {
                return Err(ApiError::conflict(format!(
                    "{} has no control: block in its service file, so it cannot be {action}ed",
                    svc.id
                )));
            }
            let command_id = request(&state, &svc, &action, &caller).await?;
            Ok((
                StatusCode::ACCEPTED,
                Json(CommandCreated {
                    command_id,
                    url: format!("/api/commands/{command_id}"),
                }),
            )
                .into_response())
        }
    }
}

#[utoipa::path(get, path = "/api/commands/{id}", params(("id" = i64, Path)),
    responses((status = 200, body = CommandRow), (status = 404, body = ErrorBody)),
    security(("bearer" = [])), tag = "control")]
/// A command and its outcome.
async fn command(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<CommandRow>, ApiError> {
    caller.require(Role::Viewer)?;
    let id = path(id)?;
    let cmd = state
        .hub
        .store
        .command(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no command {id}")))?;
    Ok(Json(cmd))
}

const MAX_PAGE: i64 = 1000;

fn page_limit(limit: Option<i64>, default: i64) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(default);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            Some("limit"),
            format!("limit must be between 1 and {MAX_PAGE}"),
        ));
    }
    Ok(limit)
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ResultsQuery {
    /// Only results taken at or after this time (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Page size (default 100, at most 1000).
    pub limit: Option<i64>,
    /// The previous page's `next_before`.
    pub before: Option<i64>,
}

/// A page of results, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResultsPage {
    pub items: Vec<ResultRow>,
    /// Pass as `before` for the next (older) page; null on the last page.
    pub next_before: Option<i64>,
}

#[utoipa::path(get, path = "/api/services/{id}/results", params(("id" = String, Path), ResultsQuery),
    responses((status = 200, body = ResultsPage), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])), tag = "history")]
/// A service's check results, newest first, paginated.
async fn results(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<ResultsQuery>, QueryRejection>,
) -> Result<Json<ResultsPage>, ApiError> {
    caller.require(Role::Viewer)?;
    let id = path(id)?;
    let q = query(q)?;
    let limit = page_limit(q.limit, 100)?;
    known(&state, &id).await?;
    let items = state
        .hub
        .store
        .results_of(&id, q.since, q.before, limit)
        .await?;
    let next_before = (items.len() as i64 == limit)
        .then(|| items.last().map(|r| r.id))
        .flatten();
    Ok(Json(ResultsPage { items, next_before }))
}

/// 404 unless the service is (or was) configured.
async fn known(state: &AppState, id: &str) -> Result<(), ApiError> {
    if state.hub.config().await.service(id).is_some() {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("no service {id:?}")))
    }
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Page size (default 100, at most 1000).
    pub limit: Option<i64>,
    /// The previous page's `next_before`.
    pub before: Option<i64>,
}

/// A page of events, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EventsPage {
    pub items: Vec<EventRow>,
    pub next_before: Option<i64>,
}

#[utoipa::path(get, path = "/api/services/{id}/events", params(("id" = String, Path), PageQuery),
    responses((status = 200, body = EventsPage), (status = 404, body = ErrorBody)),
    security(("bearer" = [])), tag = "history")]
/// A service's events (state changes, modes, flapping, remediation), newest first.
async fn events(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<EventsPage>, ApiError> {
    caller.require(Role::Viewer)?;
    let id = path(id)?;
    let q = query(q)?;
    let limit = page_limit(q.limit, 100)?;
    known(&state, &id).await?;
    let items = state.hub.store.events_of(&id, q.before, limit).await?;
    let next_before = (items.len() as i64 == limit)
        .then(|| items.last().map(|r| r.id))
        .flatten();
    Ok(Json(EventsPage { items, next_before }))
}

#[utoipa::path(get, path = "/api/services/{id}/commands", params(("id" = String, Path), PageQuery),
    responses((status = 200, body = [CommandRow]), (status = 404, body = ErrorBody)),
    security(("bearer" = [])), tag = "control")]
/// A service's recent commands, newest first.
async fn service_commands(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Vec<CommandRow>>, ApiError> {
    caller.require(Role::Viewer)?;
    let id = path(id)?;
    let q = query(q)?;
    let limit = page_limit(q.limit, 50)?;
    known(&state, &id).await?;
    let rows = state.hub.store.commands_of(&id, limit).await?;
    Ok(Json(rows))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DaysQuery {
    /// How many days back (default 30, at most 366).
    pub days: Option<i32>,
}

#[utoipa::path(get, path = "/api/services/{id}/daily", params(("id" = String, Path), DaysQuery),
    responses((status = 200, body = [DailyRow]), (status = 404, body = ErrorBody)),
    security(("bearer" = [])), tag = "history")]
/// A service's daily roll-ups (checks, failures, min/avg/p95/max response time, numeric
/// perfdata by label, time in each state), newest first. Merged as results are stored.
async fn daily(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<DaysQuery>, QueryRejection>,
) -> Result<Json<Vec<DailyRow>>, ApiError> {
    caller.require(Role::Viewer)?;
    let id = path(id)?;
    let days = query(q)?.days.unwrap_or(30);
    if !(1..=366).contains(&days) {
        return Err(ApiError::bad_request(
            Some("days"),
            "days must be between 1 and 366",
        ));
    }
    known(&state, &id).await?;
    Ok(Json(state.hub.store.daily_of(&id, days).await?))
}

/// A node and its agent.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NodeView {
    #[serde(flatten)]
    pub node: NodeRow,
    /// Whether the agent holds a stream to this collector now.
    pub connected: bool,
    /// False while the node is down (its agent silent longer than its node timeout).
    pub up: bool,
    pub services: usize,
    /// The node's clock is off by more than `max_clock_skew` (see `clock_offset_ms`).
    pub clock_skewed: bool,
    /// The node's latest events (down, up, gap, dropped, refused, backlog, agent_heal), newest
    /// first.
    pub events: Vec<NodeEventRow>,
}

pub async fn node_views(state: &AppState) -> Result<Vec<NodeView>, ApiError> {
    let cfg = state.hub.config().await;
    let connected = state.hub.connected_nodes();
    let mut events = state.hub.store.recent_node_events(10).await?;
    Ok(state
        .hub
        .store
        .nodes()
        .await?
        .into_iter()
        .map(|n| NodeView {
            connected: connected.contains(&n.name),
            up: n.down_since.is_none(),
            services: cfg.services_of(&n.name).count(),
            clock_skewed: n
                .clock_offset_ms
                .is_some_and(|o| o.unsigned_abs() as u128 > cfg.max_clock_skew.as_millis()),
            events: events.remove(&n.name).unwrap_or_default(),
            node: n,
        })
        .collect())
}

#[utoipa::path(get, path = "/api/nodes",
    responses((status = 200, body = [NodeView])), security(("bearer" = [])), tag = "nodes")]
/// Every node: whether its agent is connected, version, last seen, capabilities and inventory.
async fn nodes(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<NodeView>>, ApiError> {
    caller.require(Role::Viewer)?;
    Ok(Json(node_views(&state).await?))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct IncidentsQuery {
    /// true: open incidents only; false: closed ones only; absent: both.
    pub open: Option<bool>,
    /// Only this service's incidents.
    pub service: Option<String>,
    /// At most this many, newest first (default 100, at most 1000).
    pub limit: Option<i64>,
}

/// An incident with its alerts (one per receiver) and every delivery attempt.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IncidentDetail {
    pub incident: IncidentRow,
    pub alerts: Vec<AlertRow>,
}

#[utoipa::path(get, path = "/api/incidents", params(IncidentsQuery),
    responses((status = 200, body = [IncidentRow]), (status = 400, body = ErrorBody)),
    security(("bearer" = [])), tag = "alerts")]
/// Incidents (viewer), newest first: what was alerted, whether it is open, acknowledged, and how
/// many of its alerts are still undelivered or were given up.
async fn incidents(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<IncidentsQuery>, QueryRejection>,
) -> Result<Json<Vec<IncidentRow>>, ApiError> {
    caller.require(Role::Viewer)?;
    let q = query(q)?;
    let limit = page_limit(q.limit, 100)?;
    Ok(Json(
        state
            .hub
            .store
            .incidents(q.open, q.service.as_deref(), limit)
            .await?,
    ))
}

#[utoipa::path(get, path = "/api/incidents/{id}", params(("id" = i64, Path)),
    responses((status = 200, body = IncidentDetail), (status = 404, body = ErrorBody)),
    security(("bearer" = [])), tag = "alerts")]
/// One incident (viewer) with its alerts and each delivery attempt (time, ok, HTTP status or
/// error). Delivery is at least once: receivers de-duplicate on the alert's `uid`.
async fn incident(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<IncidentDetail>, ApiError> {
    caller.require(Role::Viewer)?;
    let id = path(id)?;
    let (incident, alerts) = state
        .hub
        .store
        .incident(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no incident {id}")))?;
    Ok(Json(IncidentDetail { incident, alerts }))
}

#[utoipa::path(post, path = "/api/incidents/{id}/ack", params(("id" = i64, Path)),
    responses((status = 200, body = IncidentRow), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])), tag = "alerts")]
/// Acknowledges an incident (operator): no more reminders for it.
async fn ack_incident(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<IncidentRow>, ApiError> {
    caller.require(Role::Operator)?;
    let id = path(id)?;
    let row = state
        .hub
        .store
        .ack_incident(id, &caller.who())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no incident {id}")))?;
    Ok(Json(row))
}

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Vigil collector API", description = "Service health, remediation and history. \
        Authenticate with `Authorization: Bearer TOKEN` (vigil-collector token create). Roles: \
        viewer reads; operator also acts on services; admin also changes the health-check config."),
    paths(list_health, one_health, force_check, get_config, put_config, act, command, results,
          events, service_commands, daily, nodes, incidents, incident, ack_incident),
    components(schemas(ErrorBody, ServiceHealth, CommandRow, CheckNow, ForceCheck, HealthConfigBody,
                       HealthConfigView, CommandCreated, ResultsPage, EventsPage, ResultRow, EventRow,
                       DailyRow, MetricSummary, NodeRow, NodeView, NodeEventRow, IncidentRow, IncidentDetail,
                       AlertRow, AttemptRow)),
    modifiers(&SecurityAddon)
)]
pub struct ApiDoc;

/// Documents, on every operation, the errors any of them can answer (each with the JSON
/// [`ErrorBody`]): 401 and 503 (the database unreachable) wherever a token is required, 400
/// wherever the request carries parameters or a body, 404 wherever the path names something.
/// Codes an operation documents itself (403, 409, a described 400) are kept.
struct ErrorResponses;

impl utoipa::Modify for ErrorResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::ParameterIn;
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for item in openapi.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                let params = op.parameters.as_deref().unwrap_or_default();
                let in_path = params
                    .iter()
                    .any(|p| matches!(p.parameter_in, ParameterIn::Path));
                let mut add = Vec::new();
                if op.security.is_some() {
                    add.push(("401", "no valid token or session"));
                    add.push(("503", "the database is not available; try again"));
                }
                if !params.is_empty() || op.request_body.is_some() {
                    add.push((
                        "400",
                        "a bad parameter or body; `field` names it when it can",
                    ));
                }
                if in_path {
                    add.push(("404", "no such object"));
                }
                for (code, description) in add {
                    op.responses
                        .responses
                        .entry(code.to_string())
                        .or_insert_with(|| error(description).into());
                }
            }
        }
    }
}

/// The whole OpenAPI document: the API's paths, the maintenance windows', availability's, and
/// the errors every operation can answer.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi()
        .merge_from(super::maintenance::MaintenanceDoc::openapi())
        .merge_from(super::availability::AvailabilityDoc::openapi());
    utoipa::Modify::modify(&ErrorResponses, &mut doc);
    doc
}

/// The OpenAPI document (no authentication).
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(document())
}
