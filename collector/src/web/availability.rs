//! Availability over HTTP: `GET /api/services/{id}/availability`,
//! `/api/nodes/{node}/availability` and `/api/categories/{category}/availability` (viewer;
//! documented with utoipa and merged into the API's OpenAPI document), and the service page's
//! uptime bars (24 h per hour; 7, 30 and 90 days per day).

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::routing::get;
use chrono::{DateTime, Duration, DurationRound, Utc};
use maud::{Markup, html};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::auth::{Caller, Role};
use super::{ApiError, AppState, ErrorBody};
use crate::availability::{
    Figures, ServiceAvailability, Totals, buckets, duration_text, percent_text, summarize,
    timeline, totals,
};
use crate::store::{Scope, Store};

/// The longest window one request may ask for.
pub const MAX_DAYS: i64 = 400;
/// The window when `from` is not given: this many days before `to`.
pub const DEFAULT_DAYS: i64 = 30;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/api/services/{id}/availability", get(service))
        .route("/api/nodes/{node}/availability", get(node))
        .route("/api/categories/{category}/availability", get(category))
}

/// The window of an availability request.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WindowQuery {
    /// Start of the window (RFC 3339, e.g. 2026-11-01T00:00:00Z; 1970 or later); default: 30
    /// days before `to`.
    #[param(value_type = Option<String>, format = DateTime)]
    pub from: Option<String>,
    /// End of the window, exclusive (RFC 3339); default: now. Time after now is not counted.
    /// At most 400 days after `from`.
    #[param(value_type = Option<String>, format = DateTime)]
    pub to: Option<String>,
}

/// Availability of a service, a node's services or a category's services over a window,
/// computed from the recorded transitions. Down: state `down` or stale; not counted: paused,
/// stopped, in maintenance, or no result yet.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AvailabilityReport {
    /// service | node | category
    pub scope: String,
    /// The service id, node name or category.
    pub id: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Where counting stopped: `to`, or the time of the answer when `to` is in the future.
    pub until: DateTime<Utc>,
    /// The figures of all the services together (their times added up).
    #[serde(flatten)]
    pub figures: Figures,
    /// Each service's own figures (node and category: its configured services).
    pub services: Vec<ServiceAvailability>,
}

fn time(field: &str, raw: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            ApiError::bad_request(
                Some(field),
                format!("{field} must be an RFC 3339 time such as 2026-11-01T00:00:00Z ({e})"),
            )
        })
}

/// Checks a window: from 1970 on, `from` before `to`, at most [`MAX_DAYS`] long. Shared by the API and
/// `vigil-collector report`; the error names the offending field.
pub fn check_window(from: DateTime<Utc>, to: DateTime<Utc>) -> Result<(), (&'static str, String)> {
    if from < DateTime::UNIX_EPOCH {
        return Err((
            "from",
            "from must not be before 1970-01-01T00:00:00Z".into(),
        ));
    }
    if from >= to {
        return Err(("from", "from must be before to".into()));
    }
    if to - from > Duration::days(MAX_DAYS) {
        return Err((
            "to",
            format!("the window may be at most {MAX_DAYS} days long"),
        ));
    }
    Ok(())
}

/// The window a request asks for (defaults filled in, checked).
fn window(
    q: Result<Query<WindowQuery>, QueryRejection>,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(None, e.body_text()))?;
    let to = match &q.to {
        Some(t) => time("to", t)?,
        None => now,
    };
    let from = match &q.from {
        Some(f) => time("from", f)?,
        None => to
            .checked_sub_signed(Duration::days(DEFAULT_DAYS))
            .ok_or_else(|| ApiError::bad_request(Some("to"), "to is out of range"))?,
    };
    check_window(from, to).map_err(|(field, msg)| ApiError::bad_request(Some(field), msg))?;
    Ok((from, to))
}

fn name(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(n)| n)
        .map_err(|e| ApiError::bad_request(None, e.body_text()))
}

/// The figures of `scope` over `[from, to)`, counted until now at the latest: the sum, each
/// service's, and where counting stopped. Shared by the API and `vigil-collector report`.
pub async fn compute(
    store: &Store,
    scope: Scope<'_>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(Totals, Vec<(ServiceAvailability, Totals)>, DateTime<Utc>), crate::store::StoreError> {
    let until = to.min(now).max(from);
    let histories = store.availability_histories(scope, from, until).await?;
    let (sum, per) = summarize(&histories, from, until);
    Ok((sum, per, until))
}

async fn answer(
    state: &AppState,
    scope_name: &str,
    id: String,
    scope: Scope<'_>,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
) -> Result<Json<AvailabilityReport>, ApiError> {
    let (sum, per, until) = compute(&state.hub.store, scope, from, to, Utc::now()).await?;
    Ok(Json(AvailabilityReport {
        scope: scope_name.into(),
        id,
        from,
        to,
        until,
        figures: sum.figures(),
        services: per.into_iter().map(|(s, _)| s).collect(),
    }))
}

#[utoipa::path(get, path = "/api/services/{id}/availability",
    params(("id" = String, Path), WindowQuery),
    responses((status = 200, body = AvailabilityReport),
              (status = 400, description = "a bad window: not RFC 3339, from not before to, longer than 400 days", body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("bearer" = [])), tag = "availability")]
/// A service's availability over a window (viewer): uptime %, incidents and their total length,
/// MTTR, MTBF — from its recorded transitions. Down: state `down` or stale (also while its node
/// is down); not counted: paused, stopped, in maintenance, no result yet. The condition at
/// `from` is the one the last transitions before it left.
async fn service(
    State(state): State<AppState>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<WindowQuery>, QueryRejection>,
) -> Result<Json<AvailabilityReport>, ApiError> {
    caller.require(Role::Viewer)?;
    let id = name(id)?;
    let w = window(q, Utc::now())?;
    if state.hub.config().await.service(&id).is_none() {
        return Err(ApiError::not_found(format!("no service {id:?}")));
    }
    answer(&state, "service", id.clone(), Scope::Service(&id), w).await
}

#[utoipa::path(get, path = "/api/nodes/{node}/availability",
    params(("node" = String, Path), WindowQuery),
    responses((status = 200, body = AvailabilityReport),
              (status = 400, description = "a bad window: not RFC 3339, from not before to, longer than 400 days", body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("bearer" = [])), tag = "availability")]
/// The availability of a node's configured services over a window (viewer), together and one
/// by one. Their times add up: the uptime is their up time over their counted time.
async fn node(
    State(state): State<AppState>,
    caller: Caller,
    node: Result<Path<String>, PathRejection>,
    q: Result<Query<WindowQuery>, QueryRejection>,
) -> Result<Json<AvailabilityReport>, ApiError> {
    caller.require(Role::Viewer)?;
    let node = name(node)?;
    let w = window(q, Utc::now())?;
    if state.hub.config().await.node(&node).is_none() {
        return Err(ApiError::not_found(format!("no node {node:?}")));
    }
    answer(&state, "node", node.clone(), Scope::Node(&node), w).await
}

/// The categories a service can have.
const CATEGORIES: [&str; 5] = ["api", "web", "container", "system", "gpu"];

/// A service category (the OpenAPI document's view of the path parameter; any other value is
/// answered 404).
#[derive(ToSchema)]
#[schema(as = Category)]
#[allow(dead_code)]
enum CategoryName {
    #[schema(rename = "api")]
    Api,
    #[schema(rename = "web")]
    Web,
    #[schema(rename = "container")]
    Container,
    #[schema(rename = "system")]
    System,
    #[schema(rename = "gpu")]
    Gpu,
}

#[utoipa::path(get, path = "/api/categories/{category}/availability",
    params(("category" = CategoryName, Path, description = "api | web | container | system | gpu"), WindowQuery),
    responses((status = 200, body = AvailabilityReport),
              (status = 400, description = "a bad window: not RFC 3339, from not before to, longer than 400 days", body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("bearer" = [])), tag = "availability")]
/// The availability of a category's configured services over a window (viewer), together and
/// one by one.
async fn category(
    State(state): State<AppState>,
    caller: Caller,
    category: Result<Path<String>, PathRejection>,
    q: Result<Query<WindowQuery>, QueryRejection>,
) -> Result<Json<AvailabilityReport>, ApiError> {
    caller.require(Role::Viewer)?;
    let category = name(category)?;
    let w = window(q, Utc::now())?;
    if !CATEGORIES.contains(&category.as_str()) {
        return Err(ApiError::not_found(format!(
            "no category {category:?}; categories: {}",
            CATEGORIES.join(", ")
        )));
    }
    answer(
        &state,
        "category",
        category.clone(),
        Scope::Category(&category),
        w,
    )
    .await
}

#[derive(OpenApi)]
#[openapi(
    paths(service, node, category),
    components(schemas(AvailabilityReport, ServiceAvailability, Figures, CategoryName))
)]
pub struct AvailabilityDoc;

/// A bar's class by its uptime: the colour, and a height that says the same without colour.
fn bar_class(t: &Totals) -> &'static str {
    match t.uptime_percent() {
        None => "u-none",
        Some(p) if p >= 100.0 => "u-full",
        Some(p) if p >= 99.9 => "u-high",
        Some(p) if p >= 99.0 => "u-mid",
        Some(p) if p >= 95.0 => "u-low",
        Some(_) => "u-bad",
    }
}

fn bar_text(label: &str, t: &Totals) -> String {
    let f = t.figures();
    match f.uptime_percent {
        None => format!("{label}: no data"),
        Some(_) if f.incidents == 0 => format!("{label}: {}", percent_text(f.uptime_percent)),
        Some(_) => format!(
            "{label}: {}, {} down",
            percent_text(f.uptime_percent),
            duration_text(Some(f.down_seconds))
        ),
    }
}

/// The uptime bars of a service page: 24 hours (a bar per hour), 7, 30 and 90 days (a bar per
/// UTC day, today's counted until now), each with its figure as text. One read of the last 90
/// days' transitions.
pub async fn uptime_bars(store: &Store, id: &str, now: DateTime<Utc>) -> Result<Markup, ApiError> {
    let day = Duration::days(1);
    let hour = Duration::hours(1);
    let today = now.duration_trunc(day).unwrap_or(now);
    let this_hour = now.duration_trunc(hour).unwrap_or(now);
    let from90 = today - day * 89;
    let from24 = this_hour - hour * 23;
    let start = from90.min(from24);
    let histories = store
        .availability_histories(Scope::Service(id), start, now)
        .await?;
    let spans = histories
        .first()
        .map(|h| timeline(&h.initial, &h.changes, start, now))
        .unwrap_or_default();
    struct Range {
        key: &'static str,
        label: &'static str,
        from: DateTime<Utc>,
        step: Duration,
        n: usize,
        per: &'static str,
    }
    let ranges = [
        Range {
            key: "24h",
            label: "24 hours",
            from: from24,
            step: hour,
            n: 24,
            per: "hour",
        },
        Range {
            key: "7d",
            label: "7 days",
            from: today - day * 6,
            step: day,
            n: 7,
            per: "day",
        },
        Range {
            key: "30d",
            label: "30 days",
            from: today - day * 29,
            step: day,
            n: 30,
            per: "day",
        },
        Range {
            key: "90d",
            label: "90 days",
            from: from90,
            step: day,
            n: 90,
            per: "day",
        },
    ];
    Ok(html! {
        section.uptime aria-labelledby="uptime-title" {
            h2 #uptime-title { "Uptime" }
            @for r in &ranges {
                @let whole = totals(&spans, r.from, now);
                @let f = whole.figures();
                @let bars = buckets(&spans, r.from, r.step, r.n);
                div.uptime-range data-range=(r.key) {
                    div.uptime-head {
                        span.uptime-label { (r.label) }
                        " "
                        strong.uptime-figure data-field={ "uptime-" (r.key) } { (percent_text(f.uptime_percent)) }
                        " "
                        span.muted {
                            (f.incidents) @if f.incidents == 1 { " incident" } @else { " incidents" }
                            @if f.incidents > 0 { ", " (duration_text(Some(f.down_seconds))) " down" }
                        }
                    }
                    ol.bars aria-label={ "uptime per " (r.per) " over the last " (r.label) } {
                        @for (i, t) in bars.iter().enumerate() {
                            @let a = r.from + r.step * i as i32;
                            @let label = if r.step == hour {
                                format!("{}–{} UTC", a.format("%m-%d %H:%M"), (a + hour).format("%H:%M"))
                            } else {
                                a.format("%Y-%m-%d").to_string()
                            };
                            @let text = bar_text(&label, t);
                            li.bar.(bar_class(t)) title=(text) { span.sr { (text) } }
                        }
                    }
                }
            }
            p.muted { "Down: state down or stale. Not counted: paused, stopped, in maintenance, no result yet. Days are UTC days." }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_checked() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        assert!(check_window(t("2026-11-01T00:00:00Z"), t("2026-12-01T00:00:00Z")).is_ok());
        assert_eq!(
            check_window(t("2026-12-01T00:00:00Z"), t("2026-11-01T00:00:00Z"))
                .unwrap_err()
                .0,
            "from"
        );
        assert_eq!(
            check_window(t("2026-11-01T00:00:00Z"), t("2026-11-01T00:00:00Z"))
                .unwrap_err()
                .0,
            "from"
        );
        assert_eq!(
            check_window(t("2020-01-01T00:00:00Z"), t("2026-01-01T00:00:00Z"))
                .unwrap_err()
                .0,
            "to"
        );
        assert_eq!(
            check_window(t("1969-12-31T00:00:00Z"), t("1970-01-02T00:00:00Z"))
                .unwrap_err()
                .0,
            "from"
        );
        assert!(time("from", "2026-13-01T00:00:00Z").is_err());
        assert!(time("from", "yesterday").is_err());
    }

    #[test]
    fn the_document_declares_the_window_and_the_categories() {
        let doc = serde_json::to_value(super::super::api::document()).unwrap();
        let op = &doc["paths"]["/api/categories/{category}/availability"]["get"];
        let params = op["parameters"].as_array().unwrap();
        let by_name = |n: &str| params.iter().find(|p| p["name"] == n).unwrap().clone();
        assert_eq!(by_name("from")["in"], "query");
        assert_eq!(by_name("from")["schema"]["format"], "date-time");
        assert_eq!(by_name("to")["in"], "query");
        let category = by_name("category");
        assert_eq!(category["in"], "path");
        let r = category["schema"]["$ref"].as_str().unwrap();
        let name = r.rsplit('/').next().unwrap();
        assert_eq!(
            doc["components"]["schemas"][name]["enum"],
            serde_json::json!(CATEGORIES)
        );
        for code in ["200", "400", "401", "404", "503"] {
            assert!(op["responses"].get(code).is_some(), "{code}");
        }
    }

    #[test]
    fn bars_say_without_colour_what_the_colour_says() {
        let t = Totals {
            up_us: 3_000_000_000,
            down_us: 600_000_000,
            ..Totals::default()
        };
        assert_eq!(bar_class(&t), "u-bad");
        let text = bar_text("11-01 10:00–11:00 UTC", &Totals { incidents: 1, ..t });
        assert_eq!(text, "11-01 10:00–11:00 UTC: 83.33 %, 10 min 0 s down");
        assert_eq!(bar_text("x", &Totals::default()), "x: no data");
        assert_eq!(bar_class(&Totals::default()), "u-none");
    }
}
