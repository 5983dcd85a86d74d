//! The REST API of maintenance windows: `GET /api/maintenance` (viewer), `POST /api/maintenance`
//! and `DELETE /api/maintenance/{id}` (operator), documented with utoipa and merged into the
//! API's OpenAPI document.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use chrono::Utc;
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use super::auth::{Caller, Role};
use super::{ApiError, AppState, ErrorBody};
use crate::maintenance::{Known, Recurrence, WindowSpec, WindowView};
use crate::store::ActiveMaintenance;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/api/maintenance", get(list).post(create))
        .route("/api/maintenance/{id}", get(one).delete(delete))
}

/// Reads a JSON body, naming the offending field on error.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
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
    })
}

fn id_of(p: Result<Path<i64>, PathRejection>) -> Result<i64, ApiError> {
    p.map(|Path(id)| id)
        .map_err(|e| ApiError::bad_request(Some("id"), e.body_text()))
}

/// Puts the windows in force now rather than at the next pass (a failure is logged; the pass
/// catches up within seconds).
async fn apply_now(state: &AppState) {
    let cfg = state.hub.config().await;
    if let Err(e) = crate::maintenance::apply(&state.hub.store, &cfg).await {
        tracing::warn!(error = %e, "maintenance: cannot apply the windows now; the next pass will");
    }
}

async fn view_of(state: &AppState, id: i64) -> Result<WindowView, ApiError> {
    let row = state
        .hub
        .store
        .maintenance_window(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no maintenance window {id}")))?;
    let cfg = state.hub.config().await;
    crate::maintenance::views(&[row], &cfg, Utc::now())
        .pop()
        .ok_or_else(|| ApiError::not_found(format!("no maintenance window {id}")))
}

#[utoipa::path(get, path = "/api/maintenance",
    responses((status = 200, body = [WindowView]), (status = 401, body = ErrorBody)),
    security(("bearer" = [])), tag = "maintenance")]
/// Every maintenance window, with whether it is in force now, its next start and the services it
/// covers.
async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<WindowView>>, ApiError> {
    caller.require(Role::Viewer)?;
    let rows = state.hub.store.maintenance_windows().await?;
    let cfg = state.hub.config().await;
    Ok(Json(crate::maintenance::views(&rows, &cfg, Utc::now())))
}

#[utoipa::path(get, path = "/api/maintenance/{id}", params(("id" = i64, Path)),
    responses((status = 200, body = WindowView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])), tag = "maintenance")]
/// One maintenance window.
async fn one(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<WindowView>, ApiError> {
    caller.require(Role::Viewer)?;
    Ok(Json(view_of(&state, id_of(id)?).await?))
}

#[utoipa::path(post, path = "/api/maintenance", request_body = WindowSpec,
    responses((status = 201, description = "created", body = WindowView),
              (status = 400, description = "a bad window; `field` names what is wrong", body = ErrorBody),
              (status = 403, body = ErrorBody)),
    security(("bearer" = [])), tag = "maintenance")]
/// Creates a maintenance window (operator). While it is in force, the services it covers are
/// neither restarted nor alerted about. One-off: `from` (default now) and `to` or `duration`;
/// recurring: `recurrence` daily or weekly (`days`), `start` "HH:MM", `duration`, `time_zone`.
/// The matcher (`services`, `nodes`, `categories`, `labels` "key=value") must not be empty; a
/// service is covered when it satisfies every criterion given.
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<WindowView>), ApiError> {
    caller.require(Role::Operator)?;
    let spec: WindowSpec = json_body(&body)?;
    let known = Known::of(&*state.hub.config().await);
    let spec = spec
        .normalize(&known, Utc::now())
        .map_err(|e| ApiError::bad_request(Some(e.field), e.to_string()))?;
    let id = state
        .hub
        .store
        .create_maintenance(&spec, &caller.who())
        .await?;
    tracing::info!(window = id, name = %spec.name, by = %caller.who(),
        schedule = %crate::maintenance::describe(&spec),
        matcher = %crate::maintenance::describe_matcher(&spec), "maintenance window created");
    apply_now(&state).await;
    Ok((StatusCode::CREATED, Json(view_of(&state, id).await?)))
}

/// A deleted window.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Deleted {
    pub id: i64,
    pub name: String,
}

#[utoipa::path(delete, path = "/api/maintenance/{id}", params(("id" = i64, Path)),
    responses((status = 200, body = Deleted), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("bearer" = [])), tag = "maintenance")]
/// Deletes a maintenance window (operator); the services it covered leave maintenance at once
/// unless another window covers them.
async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<Deleted>, ApiError> {
    caller.require(Role::Operator)?;
    let id = id_of(id)?;
    let name = state
        .hub
        .store
        .delete_maintenance(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no maintenance window {id}")))?;
    tracing::info!(window = id, %name, by = %caller.who(), "maintenance window deleted");
    apply_now(&state).await;
    Ok(Json(Deleted { id, name }))
}

#[derive(OpenApi)]
#[openapi(
    paths(list, one, create, delete),
    components(schemas(WindowSpec, WindowView, Recurrence, Deleted, ActiveMaintenance))
)]
pub struct MaintenanceDoc;
