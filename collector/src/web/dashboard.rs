//! The dashboard: server-rendered pages (maud) with a little plain JavaScript, login with a
//! token into a session cookie, and live updates over server-sent events.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::{HeaderMap, StatusCode, header, request::Parts};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use super::api::{ServiceHealth, badge, node_views, service_health};
use super::auth::{self, Caller, Role};
use super::{ApiError, AppState};
use crate::maintenance::{WindowView, describe};

const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/", get(services_page))
        .route("/services/{id}", get(service_page))
        .route("/nodes", get(nodes_page))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/events", get(events))
        .route(
            "/static/app.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    APP_JS,
                )
            }),
        )
        .route(
            "/static/app.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS) }),
        )
}

/// A logged-in dashboard user; without a session the page redirects to `/login`.
pub struct User(pub Caller);

impl FromRequestParts<AppState> for User {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        match auth::identify(&parts.method, &parts.headers, state).await {
            Ok(Some(c)) => Ok(User(c)),
            Ok(None) => Err(Redirect::to("/login").into_response()),
            Err(e) => Err(e.into_response()),
        }
    }
}

fn layout(title: &str, user: Option<&Caller>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(csrf) = user.and_then(|u| u.csrf.as_deref()) {
                    meta name="csrf-token" content=(csrf);
                }
                @if let Some(u) = user {
                    meta name="vigil-role" content=(u.role.as_str());
                }
                title { (title) " · Vigil" }
                link rel="stylesheet" href="/static/app.css";
                // No icon: without this the browser asks for /favicon.ico and logs its 404.
                link rel="icon" href="data:,";
                script src="/static/app.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/" { "Vigil" }
                    @if let Some(u) = user {
                        nav { a href="/" { "Services" } a href="/nodes" { "Nodes" } }
                        div.who {
                            span { (u.name) " · " (u.role.as_str()) }
                            form method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(u.csrf.as_deref().unwrap_or(""));
                                button.link type="submit" { "Log out" }
                            }
                        }
                    }
                }
                div #flash role="status" aria-live="polite" {}
                main { (body) }
            }
        }
    }
}

fn ago(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    match t {
        Some(t) => format!("{} ago", human((now - t).num_seconds().max(0))),
        None => "never".into(),
    }
}

/// 42s, 5m, 3h 12m, 2d 4h.
pub fn human(secs: i64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

fn failure_rate(h: &ServiceHealth) -> String {
    match h.success_rate_24h {
        Some(ok) => format!("{:.1}%", 100.0 - ok),
        None => "–".into(),
    }
}

fn actions(h: &ServiceHealth, user: &Caller) -> Markup {
    html! {
        @if user.role >= Role::Operator {
            div.actions {
                button data-action="check" data-service=(h.id) { "Check now" }
                @if h.controllable {
                    button data-action="restart" data-service=(h.id) { "Restart" }
                    @if h.mode == "stopped" {
                        button data-action="start" data-service=(h.id) { "Start" }
                    } @else {
                        button data-action="stop" data-service=(h.id) { "Stop" }
                    }
                }
            }
        }
    }
}

fn select(name: &str, label: &str, values: &[String]) -> Markup {
    html! {
        label { (label) " "
            select name=(name) data-filter=(name) {
                option value="" { "all" }
                @for v in values { option value=(v) { (v) } }
            }
        }
    }
}

/// "NAME until HH:MM:SS UTC" while the service is in maintenance, else empty.
fn maintenance_text(h: &ServiceHealth) -> String {
    h.maintenance
        .as_ref()
        .map(|m| {
            format!(
                "{} until {}",
                m.name,
                m.until.format("%Y-%m-%d %H:%M:%S UTC")
            )
        })
        .unwrap_or_default()
}

/// "gave up at ..." once remediation gave up restarting the service, else empty.
fn gave_up_text(h: &ServiceHealth) -> String {
    h.gave_up_at
        .map(|g| {
            format!(
                "gave up restarting at {} ({} restarts used)",
                g.format("%Y-%m-%d %H:%M:%S UTC"),
                h.restarts_used
            )
        })
        .unwrap_or_default()
}

/// The badges shown beside a service's status: in maintenance, and remediation gave up.
fn flags(h: &ServiceHealth) -> Markup {
    let m = maintenance_text(h);
    let g = gave_up_text(h);
    html! {
        " " span.badge.maintenance data-field="maintenance" title=(m) hidden[m.is_empty()] { "maintenance" }
        " " span.badge.gave-up data-field="gave_up" title=(g) hidden[g.is_empty()] { "gave up" }
    }
}

/// The service page's maintenance: the window in force or the next one, the windows that cover
/// the service, and (operators) a form for a one-off window.
fn maintenance_section(
    h: &ServiceHealth,
    windows: &[WindowView],
    user: &Caller,
    now: DateTime<Utc>,
) -> Markup {
    let next = windows
        .iter()
        .filter_map(|w| Some((w.next_start?, w.next_end?, w)))
        .min_by_key(|(s, _, _)| *s);
    html! {
        h2 { "Maintenance" }
        p #maintenance-now {
            @if let Some(m) = &h.maintenance {
                span.badge.maintenance { "maintenance" } " "
                strong { (m.name) } " (window " (m.id) ") until " (m.until.format("%Y-%m-%d %H:%M:%S UTC"))
                " — no restarts, no alerts"
            } @else if let Some((s, e, w)) = next {
                "Not in maintenance. Next: " strong { (w.spec.name) } " from "
                (s.format("%Y-%m-%d %H:%M UTC")) " to " (e.format("%Y-%m-%d %H:%M UTC"))
                " (in " (human((s - now).num_seconds().max(0))) ")"
            } @else {
                "Not in maintenance; no window ahead."
            }
        }
        @if !windows.is_empty() {
            table.maintenance {
                thead { tr { th { "#" } th { "Name" } th { "Schedule" } th { "State" } th { "By" } th {} } }
                tbody { @for w in windows { tr data-window=(w.id) {
                    td { (w.id) } td { (w.spec.name) @if !w.spec.comment.is_empty() { div.muted { (w.spec.comment) } } }
                    td { (describe(&w.spec)) }
                    td { @if let Some(u) = w.active_until { "active until " (u.format("%m-%d %H:%M:%S")) }
                         @else if let Some(n) = w.next_start { "next " (n.format("%m-%d %H:%M")) }
                         @else { "over" } }
                    td { (w.created_by) }
                    td { @if user.role >= Role::Operator {
                        button.link-bad data-maintenance-delete=(w.id) data-name=(w.spec.name) { "Delete" } } }
                } } }
            }
        }
        @if user.role >= Role::Operator {
            form #maintenance-form .maintenance data-service=(h.id) {
                strong { "New one-off window for this service" }
                label { "Name " input name="name" required maxlength="100" placeholder="e.g. database upgrade"; }
                label { "From (UTC) " input name="from" type="datetime-local" step="60"; }
                span.muted { "empty: now" }
                label { "Lasts " input name="duration" required value="1h" size="6" placeholder="90m, 2h"; }
                label { "Comment " input name="comment" maxlength="1000"; }
                button type="submit" { "Create" }
            }
        }
    }
}

async fn services_page(
    State(state): State<AppState>,
    User(user): User,
) -> Result<Markup, ApiError> {
    let rows = state.hub.store.health(None, true).await?;
    let cfg = state.hub.config().await;
    let now = Utc::now();
    let mut list: Vec<ServiceHealth> = rows.iter().map(|r| service_health(&cfg, r, now)).collect();
    // Problems first: what needs a look at 3 a.m. is at the top.
    let rank = |s: &str| match s {
        "abnormal" => 0,
        "flapping" => 1,
        "unknown" => 2,
        "paused" => 3,
        "stopped" => 4,
        _ => 5,
    };
    list.sort_by(|a, b| (rank(&a.status), &a.node, &a.id).cmp(&(rank(&b.status), &b.node, &b.id)));
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for h in &list {
        *counts.entry(h.status.as_str()).or_default() += 1;
    }
    let distinct = |f: fn(&ServiceHealth) -> &str| {
        let mut v: Vec<String> = list.iter().map(|h| f(h).to_string()).collect();
        v.sort();
        v.dedup();
        v
    };
    let statuses: Vec<String> = [
        "running", "abnormal", "stale", "stopped", "paused", "flapping", "unknown",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Ok(layout(
        "Services",
        Some(&user),
        html! {
            div.summary {
                span { strong { (list.len()) } " services" }
                @for s in &statuses {
                    @if let Some(n) = counts.get(s.as_str()) {
                        span.badge.(s) { (n) " " (s) }
                    }
                }
                span #live.muted { "connecting…" }
            }
            form.filters onsubmit="return false" {
                (select("category", "Category", &distinct(|h| &h.category)))
                (select("node", "Node", &distinct(|h| &h.node)))
                (select("status", "Status", &statuses))
                label { "Search " input type="search" data-filter="text" placeholder="name, target, error"; }
                span #shown.muted {}
            }
            table.services {
                thead { tr {
                    th { "Service" } th { "Node" } th { "Target" } th { "Category" } th { "Status" }
                    th { "Uptime" } th { "Failures 24h" } th { "Response" } th { "Last check" }
                    th { "Last failure" } th {}
                } }
                tbody {
                    @for h in &list {
                        tr data-service=(h.id) data-category=(h.category) data-node=(h.node) data-status=(h.status) {
                            td { a href={ "/services/" (h.id) } { strong { (h.name) } } div.muted title=(h.description) { (h.description) } }
                            td { (h.node) }
                            td.mono { (h.target) }
                            td { (h.category) }
                            td { span.badge.(h.status) data-field="status" title=(h.reason.as_deref().unwrap_or("")) { (h.status) } (flags(h)) }
                            td data-field="uptime" { (h.uptime_seconds.map(human).unwrap_or_else(|| "–".into())) }
                            td data-field="failure_rate" { (failure_rate(h)) }
                            td data-field="response" { (h.last_response_ms.map(|m| format!("{m} ms")).unwrap_or_else(|| "–".into())) }
                            td data-field="last_check" { (ago(h.last_check_at, now)) }
                            @let problem = h.reason.as_deref().or(h.last_error.as_deref()).unwrap_or("");
                            td.error data-field="last_error" title=(problem) { (problem) }
                            td { (actions(h, &user)) }
                        }
                    }
                }
            }
            @if list.is_empty() { p.muted { "No services configured: add files to the services directory and reload (SIGHUP)." } }
        },
    ))
}

/// Server-sent events: every two seconds, the services whose row changed (status, uptime,
/// response time, last check, last failure) as JSON `{"id": ..., "status": ..., ...}`.
async fn events(
    State(state): State<AppState>,
    User(_user): User,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let stream = futures::stream::unfold(
        (state, HashMap::<String, String>::new(), true),
        |(state, mut last, first)| async move {
            if !first {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            let mut events = Vec::new();
            match state.hub.store.health(None, false).await {
                Ok(rows) => {
                    let now = Utc::now();
                    let cfg = state.hub.config().await;
                    for r in &rows {
                        let h = service_health(&cfg, r, now);
                        let (maintenance, gave_up) = (maintenance_text(&h), gave_up_text(&h));
                        let v = serde_json::json!({
                            "id": h.id, "status": badge(r),
                            "uptime": h.uptime_seconds.map(human).unwrap_or_else(|| "–".into()),
                            "response": h.last_response_ms.map(|m| format!("{m} ms")).unwrap_or_else(|| "–".into()),
                            "last_check": ago(h.last_check_at, now),
                            "last_error": h.reason.or(h.last_error).unwrap_or_default(),
                            "mode": h.mode,
                            "maintenance": maintenance,
                            "gave_up": gave_up,
                        });
                        let text = v.to_string();
                        if last.get(&h.id) != Some(&text) {
                            last.insert(h.id.clone(), text.clone());
                            events.push(Ok(Event::default().event("service").data(text)));
                        }
                    }
                    events.push(Ok(Event::default().event("tick").data(now.to_rfc3339())));
                }
                Err(e) => tracing::warn!(error = %e, "live updates: cannot read service state"),
            }
            Some((futures::stream::iter(events), (state, last, false)))
        },
    );
    use futures::StreamExt;
    Sse::new(stream.flatten()).keep_alive(KeepAlive::default())
}

/// A bar of coloured segments: the service's state over the last 24 hours.
fn timeline(
    segments: &[(DateTime<Utc>, DateTime<Utc>, String)],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Markup {
    let span = (to - from).num_seconds().max(1) as f64;
    let x = |t: DateTime<Utc>| ((t - from).num_seconds() as f64 / span * 1000.0).clamp(0.0, 1000.0);
    html! {
        svg.timeline viewBox="0 0 1000 24" preserveAspectRatio="none" role="img" aria-label="state over the last 24 hours" {
            @for (a, b, st) in segments {
                rect class={ "st-" (st) } x=(format!("{:.1}", x(*a))) y="0" width=(format!("{:.1}", (x(*b) - x(*a)).max(2.0))) height="24" {
                    title { (st) " from " (a.format("%m-%d %H:%M:%S")) " to " (b.format("%m-%d %H:%M:%S")) }
                }
            }
        }
        div.axis { span { (from.format("%m-%d %H:%M")) } span { "now" } }
    }
}

/// Response times of the recent results (newest last) as a line; failures as red dots.
fn chart(points: &[(DateTime<Utc>, i32, bool)]) -> Markup {
    if points.len() < 2 {
        return html! { p.muted { "Not enough results for a chart yet." } };
    }
    let (t0, t1) = (points[0].0, points[points.len() - 1].0);
    let span = (t1 - t0).num_milliseconds().max(1) as f64;
    let max = points.iter().map(|p| p.1).max().unwrap_or(1).max(1) as f64;
    let x = |t: DateTime<Utc>| (t - t0).num_milliseconds() as f64 / span * 980.0 + 10.0;
    let y = |ms: i32| 190.0 - ms as f64 / max * 170.0;
    let line: Vec<String> = points
        .iter()
        .map(|p| format!("{:.1},{:.1}", x(p.0), y(p.1)))
        .collect();
    html! {
        svg.chart viewBox="0 0 1000 200" role="img" aria-label="response time" {
            line x1="10" y1="190" x2="990" y2="190" class="grid" {}
            line x1="10" y1="20" x2="990" y2="20" class="grid" {}
            text x="12" y="16" { (format!("{max:.0} ms")) }
            polyline points=(line.join(" ")) class="line" {}
            @for p in points.iter().filter(|p| p.2) {
                circle cx=(format!("{:.1}", x(p.0))) cy=(format!("{:.1}", y(p.1))) r="3" class="fail" {
                    title { (p.0.format("%H:%M:%S")) ": failed" }
                }
            }
        }
        div.axis { span { (t0.format("%m-%d %H:%M:%S")) } span { (t1.format("%m-%d %H:%M:%S")) } }
    }
}

async fn service_page(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let store = &state.hub.store;
    let rows = store.health(Some(&id), true).await?;
    let Some(row) = rows.first() else {
        return Ok((
            StatusCode::NOT_FOUND,
            layout(
                "Not found",
                Some(&user),
                html! {
                    h1 { "No service " (id) } p { a href="/" { "Back to the services" } }
                },
            ),
        )
            .into_response());
    };
    let cfg = state.hub.config().await;
    let now = Utc::now();
    let h = service_health(&cfg, row, now);
    let from = now - chrono::Duration::hours(24);
    let mut cur = store
        .state_at(&id, from)
        .await?
        .unwrap_or_else(|| "unknown".into());
    let mut start = from;
    let mut segments = Vec::new();
    for e in store.state_events_since(&id, from).await? {
        segments.push((start, e.at, cur));
        cur = e.to_state;
        start = e.at;
    }
    segments.push((start, now, cur));
    let results = store.results_of(&id, None, None, 200).await?;
    let points: Vec<(DateTime<Utc>, i32, bool)> = results
        .iter()
        .rev()
        .map(|r| {
            (
                r.started_at,
                r.duration_ms,
                r.status == "critical" || r.status == "unknown",
            )
        })
        .collect();
    let events = store.events_of(&id, None, 50).await?;
    let commands = store.commands_of(&id, 20).await?;
    let daily = store.daily_of(&id, 14).await?;
    let windows: Vec<WindowView> =
        crate::maintenance::views(&store.maintenance_windows().await?, &cfg, now)
            .into_iter()
            .filter(|w| w.covers.contains(&h.id))
            .collect();
    let incidents = store.incidents(None, Some(&id), 10).await?;
    let uptime = super::availability::uptime_bars(store, &id, now).await?;
    Ok(layout(&h.name, Some(&user), html! {
        div.title data-service=(h.id) data-status=(h.status) {
            h1 { (h.name) " " span.badge.(h.status) data-field="status" { (h.status) } }
            (actions(&h, &user))
        }
        p.muted { (h.description) }
        dl.facts {
            dt { "Node" } dd { (h.node) }
            dt { "Target" } dd.mono { (h.target) }
            dt { "Check" } dd { (h.check) }
            dt { "Category" } dd { (h.category) }
            dt { "State" } dd { (h.state) " since " (h.state_since.format("%Y-%m-%d %H:%M:%S UTC")) }
            dt { "Uptime" } dd data-field="uptime" { (h.uptime_seconds.map(human).unwrap_or_else(|| "–".into())) }
            dt { "Failures 24h" } dd { (failure_rate(&h)) " of " (h.total_checks_24h) " checks" }
            dt { "Last check" } dd data-field="last_check" { (ago(h.last_check_at, now)) }
            dt { "Response" } dd data-field="response" { (h.last_response_ms.map(|m| format!("{m} ms")).unwrap_or_else(|| "–".into())) }
            dt { "Restarts used" } dd { (h.restarts_used) @if let Some(g) = h.gave_up_at { " (gave up at " (g.format("%H:%M:%S")) ")" } }
            dt { "Last failure" } dd.error data-field="last_error" { (h.last_error.as_deref().unwrap_or("–")) }
            dt { "Labels" } dd.labels { @if h.labels.is_empty() { "–" } @for (k, v) in &h.labels { span.label { (k) "=" (v) } " " } }
        }
        (maintenance_section(&h, &windows, &user, now))
        (uptime)
        h2 { "Last 24 hours" }
        (timeline(&segments, from, now))
        h2 { "Response time (last " (points.len()) " checks)" }
        (chart(&points))
        h2 { "Commands" }
        table { thead { tr { th { "#" } th { "Action" } th { "By" } th { "Status" } th { "Created" } th { "Via" } th { "Output" } } }
            tbody { @for c in &commands { tr {
                td { (c.id) } td { (c.action) " (" (c.origin) ")" } td { (c.requested_by) }
                td { span.badge.{ "cmd-" (c.status) } { (c.status) }
                    @if let Some(late) = &c.late_status {
                        " " span.badge.{ "cmd-" (late) } title=(c.late_output.as_deref().unwrap_or("")) { "reported later: " (late) }
                    } }
                td { (c.created_at.format("%m-%d %H:%M:%S")) } td { (c.via.as_deref().unwrap_or("–")) }
                td { @if !c.output.is_empty() { details { summary { (c.output.lines().last().unwrap_or("")) } pre { (c.output) } } } }
            } } }
        }
        (incidents_table(&incidents))
        h2 { "Events" }
        table { thead { tr { th { "At" } th { "Kind" } th { "Change" } th { "Reason" } } }
            tbody { @for e in &events { tr {
                td { (e.at.format("%m-%d %H:%M:%S")) } td { (e.kind) }
                td { (e.from_state) " → " (e.to_state) } td { (e.reason) }
            } } }
        }
        h2 { "Recent results" }
        table { thead { tr { th { "Started" } th { "Status" } th { "Time" } th { "Message" } } }
            tbody { @for r in results.iter().take(50) { tr {
                td { (r.started_at.format("%m-%d %H:%M:%S")) } td { span.badge.{ "res-" (r.status) } { (r.status) } }
                td { (r.duration_ms) " ms" }
                td { (r.message) @if !r.output.is_empty() { details { summary { "output" } pre { (r.output) } } } }
            } } }
        }
        @if !daily.is_empty() {
            h2 { "Daily" }
            table { thead { tr { th { "Day" } th { "Checks" } th { "Failures" } th { "Average" } th { "p95" } } }
                tbody { @for d in &daily { tr {
                    td { (d.day) } td { (d.checks) } td { (d.failures) }
                    td { (d.avg_ms.map(|v| format!("{v:.0} ms")).unwrap_or_default()) }
                    td { (d.p95_ms.map(|v| format!("{v:.0} ms")).unwrap_or_default()) }
                } } }
            }
        }
    }).into_response())
}

async fn nodes_page(State(state): State<AppState>, User(user): User) -> Result<Markup, ApiError> {
    let nodes = node_views(&state).await?;
    let now = Utc::now();
    Ok(layout(
        "Nodes",
        Some(&user),
        html! {
            h1 { "Nodes" }
            table.nodes {
                thead { tr { th { "Node" } th { "Address" } th { "State" } th { "Agent" } th { "Version" } th { "Last seen" } th { "Backlog" } th { "Lost / dropped" } th { "Clock" } th { "Services" } th { "GPUs" } th { "Events" } th { "Capabilities" } } }
                tbody { @for n in &nodes {
                    @let caps = n.node.capabilities.clone().unwrap_or_default();
                    @let gpus = caps.pointer("/inventory/gpus").and_then(|g| g.as_array()).cloned().unwrap_or_default();
                    tr data-node=(n.node.name) {
                        td { strong { (n.node.name) } div.muted { (n.node.description) } }
                        td.mono { (n.node.address) }
                        td data-field="node_state" {
                            @if n.up { span.badge.running { "up" } }
                            @else { span.badge.abnormal title=(n.node.down_reason.as_deref().unwrap_or("")) { "down" }
                                    div.error { (n.node.down_reason.as_deref().unwrap_or("")) " (since " (ago(n.node.down_since, now)) ")" } } }
                        td { @if !n.node.has_agent { span.badge.paused { "agentless (SSH)" } }
                             @else if n.connected { span.badge.running { "connected" } }
                             @else { span.badge.abnormal { "disconnected" } } }
                        td { (n.node.agent_version.as_deref().unwrap_or("–")) }
                        td { (ago(n.node.last_seen, now)) }
                        td data-field="backlog" {
                            @match n.node.backlog_results { Some(b) if b > 0 => {
                                span.(if n.node.backlog_alert_since.is_some() { "error" } else { "" }) {
                                    (b) " results, oldest " (ago(n.node.backlog_oldest_at, now)) } }
                                _ => { "–" } } }
                        td data-field="lost" { (n.node.results_lost) " / " (n.node.results_dropped) }
                        td data-field="clock" { @match n.node.clock_offset_ms {
                            None => "–",
                            Some(o) => {
                                (format!("{:+.1} s", o as f64 / 1000.0))
                                @if n.clock_skewed { " " span.badge.res-warning title="This node's clock is off by more than max_clock_skew: fix its time (NTP)." { "clock off" } }
                            }
                        } }
                        td { (n.services) }
                        td { @if gpus.is_empty() { "–" } @else { ul { @for g in &gpus { li { (g.get("name").and_then(|v| v.as_str()).unwrap_or("GPU")) } } } } }
                        td { @if n.events.is_empty() { "–" } @else { details { summary { (n.events[0].kind) " " (ago(Some(n.events[0].at), now)) }
                            ul { @for e in &n.events { li { (e.at.format("%m-%d %H:%M:%S")) " " strong { (e.kind) } ": " (e.reason) } } } } } }
                        td { @if caps.is_null() { "–" } @else { details { summary { "show" } pre { (serde_json::to_string_pretty(&caps).unwrap_or_default()) } } } }
                    }
                } }
            }
        },
    ))
}

async fn login_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Ok(Some(_)) = auth::identify(&axum::http::Method::GET, &headers, &state).await {
        return Redirect::to("/").into_response();
    }
    login_form(None).into_response()
}

fn login_form(error: Option<&str>) -> Markup {
    layout(
        "Log in",
        None,
        html! {
            form.login method="post" action="/login" {
                h1 { "Log in" }
                p.muted { "Paste an API token (vigil-collector token create --role operator --name NAME)." }
                @if let Some(e) = error { p.error #login-error { (e) } }
                label for="token" { "Token" }
                input #token type="password" name="token" autocomplete="off" required autofocus;
                button #login type="submit" { "Log in" }
            }
        },
    )
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: axum::extract::Form<LoginForm>,
) -> Response {
    // The session cookie is SameSite=Strict, but a cross-origin form could still log a browser
    // in with the attacker's token (login CSRF): the form must come from this dashboard.
    if let Err(why) = auth::check_same_origin(&headers) {
        tracing::warn!(reason = ?why, "dashboard login refused: cross-origin");
        return (StatusCode::FORBIDDEN, login_form(Some(&why))).into_response();
    }
    let caller = match state
        .tokens
        .check(&state.hub.store, form.token.trim())
        .await
    {
        Ok(Some(c)) => c,
        Ok(None) => {
            tracing::warn!("dashboard login refused: unknown, wrong or revoked token");
            return (
                StatusCode::UNAUTHORIZED,
                login_form(Some("That token is unknown, wrong or revoked.")),
            )
                .into_response();
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    let cfg = state.hub.config().await;
    match auth::open_session(&state.hub.store, &caller, cfg.http.session_ttl).await {
        Ok((id, _csrf)) => {
            tracing::info!(token = %caller.name, role = caller.role.as_str(), "dashboard login");
            let cookie =
                auth::session_cookie(Some(&id), cfg.http.session_ttl, cfg.http.secure_cookie);
            (
                StatusCode::SEE_OTHER,
                [
                    (header::SET_COOKIE, cookie),
                    (header::LOCATION, "/".to_string()),
                ],
            )
                .into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

#[derive(serde::Deserialize)]
struct LogoutForm {
    csrf: String,
}

async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: axum::extract::Form<LogoutForm>,
) -> Response {
    let cfg = state.hub.config().await;
    if let Some(id) = auth::session_id(&headers) {
        let hash = auth::sha256_hex(&id);
        match state.hub.store.session(&hash).await {
            Ok(Some(s)) if s.csrf == form.csrf => {
                if let Err(e) = state.hub.store.delete_session(&hash).await {
                    return ApiError::from(e).into_response();
                }
            }
            Ok(Some(_)) => return ApiError::forbidden("wrong CSRF token").into_response(),
            _ => {}
        }
    }
    let cookie = auth::session_cookie(None, Duration::ZERO, cfg.http.secure_cookie);
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, cookie),
            (header::LOCATION, "/login".to_string()),
        ],
    )
        .into_response()
}

/// A service's recent incidents and the delivery state of their alerts.
fn incidents_table(incidents: &[crate::store::IncidentRow]) -> Markup {
    html! {
        h2 { "Incidents" }
        table.incidents { thead { tr { th { "#" } th { "Kind" } th { "Opened" } th { "Reason" } th { "Closed" } th { "Alerts" } } }
            tbody { @for i in incidents { tr data-incident=(i.id) {
                td { (i.id) }
                td { span.badge.(i.severity) { (i.family) } }
                td { (i.opened_at.format("%m-%d %H:%M:%S")) }
                td { (i.reason) @if !i.affected.is_empty() { " (affected: " (i.affected.join(", ")) ")" } }
                td { @match (&i.resolved_at, &i.resolution) {
                    (Some(at), Some(r)) => { (at.format("%m-%d %H:%M:%S")) " — " (r) },
                    _ => { @if let Some(by) = &i.acknowledged_by { "open, acknowledged by " (by) } @else { "open" } },
                } }
                td { @if i.alerts_failed > 0 { span.error { (i.alerts_failed) " given up" } " " }
                     @if i.alerts_pending > 0 { (i.alerts_pending) " pending" }
                     @else if i.alerts_failed == 0 { "delivered" } }
            } } }
        }
    }
}
