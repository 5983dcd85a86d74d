//! Maintenance windows: scheduled silences created ahead of time (one-off or daily/weekly in an
//! IANA time zone) that cover services matched by id, node, category and labels. The pure parts
//! (validation, [`active`], [`next`], [`Matcher::matches`], [`cover`]) decide; the maintenance
//! pass writes the result to `service_state.maintenance_id / maintenance_until`, which
//! remediation and alerts read ("in maintenance" means `maintenance_until > now()`).
//!
//! Time zones and DST: a recurring window starts at its local `start` time in `time_zone` and
//! lasts `duration` of real time. A start time that does not exist on a day (the hour skipped
//! when clocks go forward) starts the window at the end of the gap (02:30 in Europe/Berlin on
//! the last Sunday of March starts at 03:00 CEST). A start time that exists twice (clocks go
//! back) starts at its first occurrence. A window lasting exactly its period (daily 24h, weekly
//! on one day 7d, or as long as the gap to its next day) is continuous: each occurrence lasts
//! until the next one starts, so the day clocks go back leaves no hole (refusing such windows
//! would have silently dropped ones already stored).
//!
//! Nodes: a node is in maintenance while a window in force names it and nothing narrower (only
//! `nodes:`), or every service of it (at least one) is covered ([`node_cover`]); the pass writes
//! `nodes.maintenance_until`, which node alerts and the agent heal over SSH read. One-off
//! windows that ended more than 7 days ago are deleted by the pass (at most every 5 minutes).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use chrono::{DateTime, Datelike, LocalResult, NaiveDate, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::{Config, Service, valid_label_key};
use crate::grpc::Hub;
use crate::store::{Cover, MaintenanceRow, Store, StoreError};

/// Longest window (one-off or recurring duration).
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// Longest name and comment.
pub const MAX_NAME: usize = 100;
pub const MAX_COMMENT: usize = 1000;

/// A maintenance window as written by an operator (REST API body, CLI flags) and as stored.
///
/// One-off: `from` (default: now) and `to` or `duration`. Recurring: `recurrence` (`daily` or
/// `weekly` with `days`), `start` ("HH:MM" local time), `duration` and `time_zone` (IANA name,
/// default UTC). The matcher is any of `services`, `nodes`, `categories`, `labels`
/// ("key=value"); a service is covered when it satisfies every one given (ids, nodes and
/// categories: any of the list; labels: all of them). An empty matcher is refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    /// What the window is for (1 to 100 characters).
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comment: String,
    /// One-off: start (RFC 3339; default now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<DateTime<Utc>>,
    /// One-off: end (RFC 3339), or give `duration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<DateTime<Utc>>,
    /// Recurring: daily | weekly (absent: one-off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recurrence: Option<Recurrence>,
    /// Weekly: the days it starts on (mon, tue, wed, thu, fri, sat, sun).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<String>,
    /// Recurring: local start time, "HH:MM".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// How long it lasts ("90m", "2h"); one-off: instead of `to`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// Recurring: IANA time zone of `start` (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Service ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// Node names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Categories (api, web, container, system, gpu).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    /// Labels "key=value"; a service must carry all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Recurrence {
    Daily,
    Weekly,
}

/// When a window is in force.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    Once {
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    },
    Recurring {
        /// None: every day.
        days: Option<BTreeSet<u32>>,
        start: NaiveTime,
        duration: Duration,
        tz: Tz,
    },
}

/// Which services a window covers: every criterion given must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Matcher {
    pub services: BTreeSet<String>,
    pub nodes: BTreeSet<String>,
    pub categories: BTreeSet<String>,
    pub labels: BTreeMap<String, String>,
}

/// What a matcher looks at.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub id: &'a str,
    pub node: &'a str,
    pub category: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

impl<'a> From<&'a Service> for Target<'a> {
    fn from(s: &'a Service) -> Target<'a> {
        Target {
            id: &s.id,
            node: &s.node,
            category: s.category.as_str(),
            labels: &s.labels,
        }
    }
}

impl Matcher {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.nodes.is_empty()
            && self.categories.is_empty()
            && self.labels.is_empty()
    }

    /// Whether the window covers `t` (never for an empty matcher).
    pub fn matches(&self, t: Target<'_>) -> bool {
        !self.is_empty()
            && (self.services.is_empty() || self.services.contains(t.id))
            && (self.nodes.is_empty() || self.nodes.contains(t.node))
            && (self.categories.is_empty() || self.categories.contains(t.category))
            && self
                .labels
                .iter()
                .all(|(k, v)| t.labels.get(k).is_some_and(|have| have == v))
    }
}

/// A window ready to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub id: i64,
    pub name: String,
    pub schedule: Schedule,
    pub matcher: Matcher,
}

/// A refused window: the offending field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    pub field: &'static str,
    pub reason: String,
}

fn refuse(field: &'static str, reason: impl Into<String>) -> SpecError {
    SpecError {
        field,
        reason: reason.into(),
    }
}

/// What a new window's matcher may name (the config in force); `None` accepts any name.
#[derive(Debug, Clone, Default)]
pub struct Known {
    pub services: Option<HashSet<String>>,
    pub nodes: Option<HashSet<String>>,
}

impl Known {
    pub fn of(cfg: &Config) -> Known {
        Known {
            services: Some(cfg.services.iter().map(|s| s.id.clone()).collect()),
            nodes: Some(cfg.nodes.iter().map(|n| n.name.clone()).collect()),
        }
    }
}

const CATEGORIES: [&str; 5] = ["api", "web", "container", "system", "gpu"];

fn parse_duration(field: &'static str, s: &str) -> Result<Duration, SpecError> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        refuse(
            field,
            format!("{s:?} is not a duration like 90m or 2h: {e}"),
        )
    })?;
    if d < Duration::from_secs(1) {
        return Err(refuse(field, "must be at least 1s"));
    }
    if d > MAX_DURATION {
        return Err(refuse(field, "must be at most 366 days"));
    }
    Ok(d)
}

fn parse_day(s: &str) -> Option<u32> {
    s.trim()
        .parse::<Weekday>()
        .ok()
        .map(|d| d.num_days_from_monday())
}

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl WindowSpec {
    /// Checks a new window and fills in what defaults to now (`from`, `to` from `duration`), so
    /// that the stored spec no longer depends on when it was created. `now` is the creation
    /// time; a one-off window already over is refused.
    pub fn normalize(mut self, known: &Known, now: DateTime<Utc>) -> Result<WindowSpec, SpecError> {
        self.name = self.name.trim().to_string();
        if self.name.is_empty() || self.name.chars().count() > MAX_NAME {
            return Err(refuse("name", "must be 1 to 100 characters"));
        }
        if self.comment.chars().count() > MAX_COMMENT {
            return Err(refuse("comment", "must be at most 1000 characters"));
        }
        if self.recurrence.is_none() {
            for (field, set) in [
                ("days", !self.days.is_empty()),
                ("start", self.start.is_some()),
                ("time_zone", self.time_zone.is_some()),
            ] {
                if set {
                    return Err(refuse(
                        field,
                        "only for a recurring window (set recurrence: daily or weekly)",
                    ));
                }
            }
            let from = self.from.unwrap_or(now);
            let to = match (self.to, &self.duration) {
                (Some(_), Some(_)) => {
                    return Err(refuse("duration", "give either to or duration, not both"));
                }
                (Some(to), None) => to,
                (None, Some(d)) => from + chrono_duration(parse_duration("duration", d)?),
                (None, None) => {
                    return Err(refuse(
                        "to",
                        "a one-off window needs to (or duration); a recurring one needs recurrence",
                    ));
                }
            };
            if to <= from {
                return Err(refuse("to", "must be after from"));
            }
            if to - from > chrono_duration(MAX_DURATION) {
                return Err(refuse("to", "a window lasts at most 366 days"));
            }
            if to <= now {
                return Err(refuse(
                    "to",
                    "is in the past: the window would never be in force",
                ));
            }
            self.from = Some(from);
            self.to = Some(to);
            self.duration = None;
        } else {
            for (field, set) in [("from", self.from.is_some()), ("to", self.to.is_some())] {
                if set {
                    return Err(refuse(
                        field,
                        "only for a one-off window (a recurring one has start and duration)",
                    ));
                }
            }
            if self.time_zone.is_none() {
                self.time_zone = Some("UTC".into());
            }
        }
        let w = self.compile(0)?;
        if let Some(services) = &known.services
            && let Some(s) = w.matcher.services.iter().find(|s| !services.contains(*s))
        {
            return Err(refuse("services", format!("unknown service {s:?}")));
        }
        if let Some(nodes) = &known.nodes
            && let Some(n) = w.matcher.nodes.iter().find(|n| !nodes.contains(*n))
        {
            return Err(refuse("nodes", format!("unknown node {n:?}")));
        }
        Ok(self)
    }

    /// The window this spec describes (stored specs are compiled on every pass).
    pub fn compile(&self, id: i64) -> Result<Window, SpecError> {
        let schedule = match self.recurrence {
            None => {
                let (Some(from), Some(to)) = (self.from, self.to) else {
                    return Err(refuse("to", "a one-off window needs from and to"));
                };
                Schedule::Once { from, to }
            }
            Some(rec) => {
                let start = self
                    .start
                    .as_deref()
                    .ok_or_else(|| refuse("start", "a recurring window needs start (HH:MM)"))?;
                let start = NaiveTime::parse_from_str(start.trim(), "%H:%M")
                    .map_err(|_| refuse("start", format!("{start:?} is not a time like 22:30")))?;
                let duration = parse_duration(
                    "duration",
                    self.duration
                        .as_deref()
                        .ok_or_else(|| refuse("duration", "a recurring window needs duration"))?,
                )?;
                let zone = self.time_zone.as_deref().unwrap_or("UTC");
                let tz: Tz = zone.parse().map_err(|_| {
                    refuse(
                        "time_zone",
                        format!("{zone:?} is not an IANA time zone like Europe/Berlin"),
                    )
                })?;
                let days = match rec {
                    Recurrence::Daily => {
                        if !self.days.is_empty() {
                            return Err(refuse("days", "only for a weekly window"));
                        }
                        if duration > Duration::from_secs(24 * 3600) {
                            return Err(refuse(
                                "duration",
                                "a daily window lasts at most 24h (longer than its period)",
                            ));
                        }
                        None
                    }
                    Recurrence::Weekly => {
                        if self.days.is_empty() {
                            return Err(refuse("days", "a weekly window needs days (mon ... sun)"));
                        }
                        let mut days = BTreeSet::new();
                        for d in &self.days {
                            days.insert(parse_day(d).ok_or_else(|| {
                                refuse("days", format!("{d:?} is not a day (mon ... sun)"))
                            })?);
                        }
                        let gap = shortest_gap(&days);
                        if duration > Duration::from_secs(u64::from(gap) * 24 * 3600) {
                            return Err(refuse(
                                "duration",
                                format!(
                                    "longer than its period: the window starts again {gap} day(s) later"
                                ),
                            ));
                        }
                        Some(days)
                    }
                };
                Schedule::Recurring {
                    days,
                    start,
                    duration,
                    tz,
                }
            }
        };
        let mut matcher = Matcher {
            services: self.services.iter().map(|s| s.trim().to_string()).collect(),
            nodes: self.nodes.iter().map(|s| s.trim().to_string()).collect(),
            categories: BTreeSet::new(),
            labels: BTreeMap::new(),
        };
        for c in &self.categories {
            let c = c.trim();
            if !CATEGORIES.contains(&c) {
                return Err(refuse(
                    "categories",
                    format!("{c:?} is not a category ({})", CATEGORIES.join(", ")),
                ));
            }
            matcher.categories.insert(c.to_string());
        }
        for l in &self.labels {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| refuse("labels", format!("{l:?} is not key=value")))?;
            let k = k.trim();
            if !valid_label_key(k) {
                return Err(refuse(
                    "labels",
                    format!("{k:?} is not a label key ([a-z0-9_.-], 1 to 63)"),
                ));
            }
            matcher.labels.insert(k.to_string(), v.trim().to_string());
        }
        if matcher.is_empty() {
            return Err(refuse(
                "matcher",
                "give at least one of services, nodes, categories, labels (an empty matcher would cover everything)",
            ));
        }
        Ok(Window {
            id,
            name: self.name.clone(),
            schedule,
            matcher,
        })
    }
}

/// The fewest days between one start and the next of a weekly window (7 with one day).
fn shortest_gap(days: &BTreeSet<u32>) -> u32 {
    let v: Vec<u32> = days.iter().copied().collect();
    let mut gap = 7;
    for (i, d) in v.iter().enumerate() {
        let next = v.get(i + 1).copied().unwrap_or(v[0] + 7);
        gap = gap.min(next - d);
    }
    gap
}

/// The instant a recurring window starts on local `date` (see the module doc for DST).
fn start_on(tz: Tz, date: NaiveDate, at: NaiveTime) -> Option<DateTime<Utc>> {
    let mut local = date.and_time(at);
    // A skipped local time: the first minute after the gap. Gaps are at most a day.
    for _ in 0..=(26 * 60) {
        match tz.from_local_datetime(&local) {
            LocalResult::Single(t) => return Some(t.with_timezone(&Utc)),
            LocalResult::Ambiguous(a, b) => return Some(a.min(b).with_timezone(&Utc)),
            LocalResult::None => local += chrono::Duration::minutes(1),
        }
    }
    None
}

/// The occurrences (start, end) of a recurring window that start on local dates `first..=last`.
fn occurrences(
    days: &Option<BTreeSet<u32>>,
    start: NaiveTime,
    duration: Duration,
    tz: Tz,
    first: NaiveDate,
    last: NaiveDate,
) -> impl Iterator<Item = (DateTime<Utc>, DateTime<Utc>)> + '_ {
    first
        .iter_days()
        .take_while(move |d| *d <= last)
        .filter(move |d| {
            days.as_ref()
                .is_none_or(|ds| ds.contains(&d.weekday().num_days_from_monday()))
        })
        .filter_map(move |d| start_on(tz, d, start).map(|s| (d, s)))
        .map(move |(d, s)| {
            let mut end = s + chrono_duration(duration);
            // A window lasting exactly its period is continuous: on the day clocks go back it
            // lasts until the next start, not an hour less.
            let gap = next_gap(days, d);
            if duration >= Duration::from_secs(u64::from(gap) * 24 * 3600)
                && let Some(next) = start_on(tz, d + chrono::Duration::days(i64::from(gap)), start)
            {
                end = end.max(next);
            }
            (s, end)
        })
}

/// Days from local date `d` to the next day a recurring window starts on (1 for a daily one).
fn next_gap(days: &Option<BTreeSet<u32>>, d: NaiveDate) -> u32 {
    let Some(ds) = days else { return 1 };
    let wd = d.weekday().num_days_from_monday();
    (1..=7).find(|k| ds.contains(&((wd + k) % 7))).unwrap_or(7)
}

/// Until when `schedule` is in force at `now`, or `None` when it is not. Overlapping or
/// back-to-back occurrences give the end of the whole stretch (at most about a week ahead).
pub fn active(schedule: &Schedule, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    match schedule {
        Schedule::Once { from, to } => (*from <= now && now < *to).then_some(*to),
        Schedule::Recurring {
            days,
            start,
            duration,
            tz,
        } => {
            let today = now.with_timezone(tz).date_naive();
            let back = duration.as_secs().div_ceil(86400) as i64 + 1;
            let first = today - chrono::Duration::days(back);
            let mut occ: Vec<(DateTime<Utc>, DateTime<Utc>)> = occurrences(
                days,
                *start,
                *duration,
                *tz,
                first,
                today + chrono::Duration::days(8),
            )
            .collect();
            occ.sort();
            let mut until = occ
                .iter()
                .filter(|(s, e)| *s <= now && now < *e)
                .map(|(_, e)| *e)
                .max()?;
            // Occurrences that start before this one ends make one stretch (looking a week
            // ahead), so that the pass every 2 s leaves no hole between them.
            for (s, e) in &occ {
                if *s > until {
                    break;
                }
                until = until.max(*e);
            }
            Some(until)
        }
    }
}

/// The next time `schedule` starts after `now` (start, end), if it does.
pub fn next(schedule: &Schedule, now: DateTime<Utc>) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    match schedule {
        Schedule::Once { from, to } => (*from > now).then_some((*from, *to)),
        Schedule::Recurring {
            days,
            start,
            duration,
            tz,
        } => {
            let today = now.with_timezone(tz).date_naive();
            occurrences(
                days,
                *start,
                *duration,
                *tz,
                today - chrono::Duration::days(1),
                today + chrono::Duration::days(8),
            )
            .find(|(s, _)| *s > now)
        }
    }
}

/// For every service covered at `now`: the window that covers it and until when. Among several
/// windows, the one that lasts longest wins (then the lowest id).
pub fn cover<'a>(
    windows: &[Window],
    services: impl IntoIterator<Item = Target<'a>>,
    now: DateTime<Utc>,
) -> Vec<Cover> {
    let live: Vec<(&Window, DateTime<Utc>)> = windows
        .iter()
        .filter_map(|w| active(&w.schedule, now).map(|u| (w, u)))
        .collect();
    let mut out = Vec::new();
    for t in services {
        let best = live
            .iter()
            .filter(|(w, _)| w.matcher.matches(t))
            .max_by(|(a, ua), (b, ub)| ua.cmp(ub).then(b.id.cmp(&a.id)));
        if let Some((w, until)) = best {
            out.push(Cover {
                service_id: t.id.to_string(),
                window_id: w.id,
                until: *until,
            });
        }
    }
    out
}

/// Compiles stored windows; one that no longer compiles (a time zone gone from the database)
/// is logged and skipped.
pub fn compile_rows(rows: &[MaintenanceRow]) -> Vec<Window> {
    rows.iter()
        .filter_map(|r| match r.spec.compile(r.id) {
            Ok(mut w) => {
                w.name = r.name.clone();
                Some(w)
            }
            Err(e) => {
                tracing::error!(window = r.id, name = %r.name, error = %e, "maintenance window cannot be evaluated; skipped");
                None
            }
        })
        .collect()
}

/// Evaluates every window now and writes which services are in maintenance (one set-based
/// statement, with an event per service that enters or leaves maintenance).
pub async fn apply(store: &Store, cfg: &Config) -> Result<(), StoreError> {
    purge_ended(store).await;
    let windows = compile_rows(&store.maintenance_windows().await?);
    let now = Utc::now();
    let targets: Vec<Target<'_>> = cfg.services.iter().map(Target::from).collect();
    let covered = cover(&windows, targets.iter().copied(), now);
    let nodes = node_cover(
        &windows,
        cfg.nodes.iter().map(|n| n.name.as_str()),
        &targets,
        &covered,
        now,
    );
    for (node, until) in store.apply_node_maintenance(&nodes).await? {
        match until {
            Some(u) => tracing::info!(%node, until = %u, "node maintenance started"),
            None => tracing::info!(%node, "node maintenance ended"),
        }
    }
    for c in store.apply_maintenance(&covered).await? {
        match c.window_id {
            Some(w) => {
                tracing::info!(service = %c.service_id, window = w, until = ?c.until, "maintenance started")
            }
            None => tracing::info!(service = %c.service_id, "maintenance ended"),
        }
    }
    Ok(())
}

/// One-off windows are deleted this long after they ended.
pub const KEEP_ENDED: Duration = Duration::from_secs(7 * 24 * 3600);
/// The purge of ended windows runs at most this often per process.
const PURGE_EVERY: Duration = Duration::from_secs(300);
/// When this process last purged (Unix seconds; 0: never).
static LAST_PURGE: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Deletes one-off windows that ended more than [`KEEP_ENDED`] ago, at most every
/// [`PURGE_EVERY`]; a failure is logged (it only costs a little work in the next passes).
async fn purge_ended(store: &Store) {
    use std::sync::atomic::Ordering;
    let now = Utc::now().timestamp();
    let last = LAST_PURGE.load(Ordering::Relaxed);
    if now - last < PURGE_EVERY.as_secs() as i64
        || LAST_PURGE
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    match store.purge_ended_maintenance(KEEP_ENDED).await {
        Ok(names) => {
            for name in names {
                tracing::info!(window = %name, "maintenance window ended more than 7 days ago: deleted");
            }
        }
        Err(e) => tracing::warn!(error = %e, "maintenance: cannot delete ended windows"),
    }
}

/// Which nodes are in maintenance at `now`, until when: a node named by a window in force whose
/// matcher has nothing narrower (no services, categories or labels), or whose services (at
/// least one) are all `covered` (until the first of them ends). The later end wins.
pub fn node_cover<'a>(
    windows: &[Window],
    nodes: impl IntoIterator<Item = &'a str>,
    services: &[Target<'_>],
    covered: &[Cover],
    now: DateTime<Utc>,
) -> Vec<(String, DateTime<Utc>)> {
    let whole: Vec<(&Window, DateTime<Utc>)> = windows
        .iter()
        .filter(|w| {
            !w.matcher.nodes.is_empty()
                && w.matcher.services.is_empty()
                && w.matcher.categories.is_empty()
                && w.matcher.labels.is_empty()
        })
        .filter_map(|w| active(&w.schedule, now).map(|u| (w, u)))
        .collect();
    let until_of: BTreeMap<&str, DateTime<Utc>> = covered
        .iter()
        .map(|c| (c.service_id.as_str(), c.until))
        .collect();
    let mut out = Vec::new();
    for node in nodes {
        let named = whole
            .iter()
            .filter(|(w, _)| w.matcher.nodes.contains(node))
            .map(|(_, u)| *u)
            .max();
        let mut all: Option<DateTime<Utc>> = None;
        let mut every = true;
        for t in services.iter().filter(|t| t.node == node) {
            match until_of.get(t.id) {
                Some(u) => all = Some(all.map_or(*u, |a| a.min(*u))),
                None => every = false,
            }
        }
        let all = all.filter(|_| every);
        if let Some(u) = named.into_iter().chain(all).max() {
            out.push((node.to_string(), u));
        }
    }
    out
}

/// The maintenance pass (every 2 s from the collector's ticker).
pub async fn pass(hub: &Hub) {
    let cfg = hub.config().await;
    if let Err(e) = apply(&hub.store, &cfg).await {
        tracing::error!(error = %e, "maintenance: cannot evaluate windows");
    }
}

/// A stored window with what it means now.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WindowView {
    pub id: i64,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    #[serde(flatten)]
    pub spec: WindowSpec,
    /// In force now: until when (null when not).
    pub active_until: Option<DateTime<Utc>>,
    /// The next start after now and its end (null: none to come).
    pub next_start: Option<DateTime<Utc>>,
    pub next_end: Option<DateTime<Utc>>,
    /// Active services the window covers now or when it is next in force.
    pub covers: Vec<String>,
}

/// What each stored window means at `now` for the services of `cfg`.
pub fn views(rows: &[MaintenanceRow], cfg: &Config, now: DateTime<Utc>) -> Vec<WindowView> {
    rows.iter()
        .map(|r| {
            let w = r.spec.compile(r.id).ok();
            let active_until = w.as_ref().and_then(|w| active(&w.schedule, now));
            let next = w.as_ref().and_then(|w| next(&w.schedule, now));
            let covers = w
                .as_ref()
                .map(|w| {
                    cfg.services
                        .iter()
                        .filter(|s| w.matcher.matches(Target::from(*s)))
                        .map(|s| s.id.clone())
                        .collect()
                })
                .unwrap_or_default();
            WindowView {
                id: r.id,
                created_by: r.created_by.clone(),
                created_at: r.created_at,
                spec: r.spec.clone(),
                active_until,
                next_start: next.map(|n| n.0),
                next_end: next.map(|n| n.1),
                covers,
            }
        })
        .collect()
}

/// Human-readable schedule of a spec ("2025-03-30 01:00 UTC → 02:00 UTC", "weekly mon, thu at
/// 22:00 Europe/Berlin for 2h").
pub fn describe(spec: &WindowSpec) -> String {
    match spec.recurrence {
        None => match (spec.from, spec.to) {
            (Some(f), Some(t)) => format!(
                "{} → {}",
                f.format("%Y-%m-%d %H:%M:%S UTC"),
                t.format("%Y-%m-%d %H:%M:%S UTC")
            ),
            _ => "one-off".into(),
        },
        Some(r) => {
            let days = if r == Recurrence::Weekly {
                let mut ds: Vec<u32> = spec.days.iter().filter_map(|d| parse_day(d)).collect();
                ds.sort_unstable();
                ds.dedup();
                let names: Vec<&str> = ds.iter().map(|d| DAY_NAMES[*d as usize]).collect();
                format!("weekly {}", names.join(", "))
            } else {
                "daily".into()
            };
            format!(
                "{days} at {} {} for {}",
                spec.start.as_deref().unwrap_or("?"),
                spec.time_zone.as_deref().unwrap_or("UTC"),
                spec.duration.as_deref().unwrap_or("?")
            )
        }
    }
}

/// The matcher of a spec in one line ("services=web,db nodes=n1 labels=env=prod").
pub fn describe_matcher(spec: &WindowSpec) -> String {
    let mut parts = Vec::new();
    for (k, v) in [
        ("services", &spec.services),
        ("nodes", &spec.nodes),
        ("categories", &spec.categories),
        ("labels", &spec.labels),
    ] {
        if !v.is_empty() {
            parts.push(format!("{k}={}", v.join(",")));
        }
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn recurring(rec: Recurrence, days: &[&str], start: &str, dur: &str, tz: &str) -> WindowSpec {
        WindowSpec {
            name: "w".into(),
            recurrence: Some(rec),
            days: days.iter().map(|d| d.to_string()).collect(),
            start: Some(start.into()),
            duration: Some(dur.into()),
            time_zone: Some(tz.into()),
            services: vec!["web".into()],
            ..Default::default()
        }
    }

    fn schedule(spec: &WindowSpec) -> Schedule {
        spec.compile(1).unwrap().schedule
    }

    #[test]
    fn one_off_is_active_between_from_and_to() {
        let now = at("2025-06-01T12:00:00Z");
        let spec = WindowSpec {
            name: "db upgrade".into(),
            duration: Some("2h".into()),
            services: vec!["web".into()],
            ..Default::default()
        }
        .normalize(&Known::default(), now)
        .unwrap();
        assert_eq!(spec.from, Some(now));
        assert_eq!(spec.to, Some(at("2025-06-01T14:00:00Z")));
        let s = schedule(&spec);
        assert_eq!(active(&s, now), Some(at("2025-06-01T14:00:00Z")));
        assert_eq!(
            active(&s, at("2025-06-01T13:59:59Z")),
            Some(at("2025-06-01T14:00:00Z"))
        );
        assert_eq!(
            active(&s, at("2025-06-01T14:00:00Z")),
            None,
            "the end is excluded"
        );
        assert_eq!(active(&s, at("2025-06-01T11:59:59Z")), None);
        assert_eq!(
            next(&s, at("2025-06-01T11:00:00Z")),
            Some((now, at("2025-06-01T14:00:00Z")))
        );
        assert_eq!(next(&s, now), None);
    }

    #[test]
    fn daily_window_across_midnight() {
        // 23:00 UTC for 2h: covers 23:00..01:00 of the next day.
        let s = schedule(&recurring(Recurrence::Daily, &[], "23:00", "2h", "UTC"));
        assert_eq!(
            active(&s, at("2025-06-01T23:30:00Z")),
            Some(at("2025-06-02T01:00:00Z"))
        );
        assert_eq!(
            active(&s, at("2025-06-02T00:59:00Z")),
            Some(at("2025-06-02T01:00:00Z"))
        );
        assert_eq!(active(&s, at("2025-06-02T01:00:00Z")), None);
        assert_eq!(active(&s, at("2025-06-02T12:00:00Z")), None);
        assert_eq!(
            next(&s, at("2025-06-02T12:00:00Z")),
            Some((at("2025-06-02T23:00:00Z"), at("2025-06-03T01:00:00Z")))
        );
    }

    #[test]
    fn weekly_window_across_midnight_only_on_its_days() {
        // Saturdays 22:00 Berlin (summer: UTC+2) for 4h: Sat 20:00Z .. Sun 00:00Z.
        let s = schedule(&recurring(
            Recurrence::Weekly,
            &["sat"],
            "22:00",
            "4h",
            "Europe/Berlin",
        ));
        // 2025-06-07 is a Saturday.
        assert_eq!(
            active(&s, at("2025-06-07T23:30:00Z")),
            Some(at("2025-06-08T00:00:00Z"))
        );
        assert_eq!(active(&s, at("2025-06-08T00:00:00Z")), None);
        // Friday at the same hour: not its day.
        assert_eq!(active(&s, at("2025-06-06T21:00:00Z")), None);
        assert_eq!(
            next(&s, at("2025-06-08T00:00:00Z")),
            Some((at("2025-06-14T20:00:00Z"), at("2025-06-15T00:00:00Z")))
        );
    }

    #[test]
    fn local_start_time_stays_across_a_dst_change() {
        // Daily 09:00 Europe/Berlin: 08:00Z in winter, 07:00Z once the clocks went forward on
        // 2025-03-30.
        let s = schedule(&recurring(
            Recurrence::Daily,
            &[],
            "09:00",
            "1h",
            "Europe/Berlin",
        ));
        assert_eq!(
            next(&s, at("2025-03-29T00:00:00Z")),
            Some((at("2025-03-29T08:00:00Z"), at("2025-03-29T09:00:00Z")))
        );
        assert_eq!(
            next(&s, at("2025-03-29T12:00:00Z")),
            Some((at("2025-03-30T07:00:00Z"), at("2025-03-30T08:00:00Z")))
        );
        assert_eq!(
            active(&s, at("2025-03-30T07:30:00Z")),
            Some(at("2025-03-30T08:00:00Z"))
        );
        assert_eq!(active(&s, at("2025-03-30T08:30:00Z")), None);
        // And back in October (2025-10-26): 08:00Z again.
        assert_eq!(
            active(&s, at("2025-10-26T08:30:00Z")),
            Some(at("2025-10-26T09:00:00Z"))
        );
    }

    #[test]
    fn weekly_window_over_the_night_the_clocks_go_forward() {
        // Saturday 23:00 Berlin for 4h of real time, the night of 2025-03-29/30: starts 22:00Z
        // (CET), ends 02:00Z = 04:00 CEST (not 03:00: the local hour 02:00..03:00 does not
        // exist, the window still lasts 4 hours).
        let s = schedule(&recurring(
            Recurrence::Weekly,
            &["sat"],
            "23:00",
            "4h",
            "Europe/Berlin",
        ));
        assert_eq!(active(&s, at("2025-03-29T21:59:00Z")), None);
        assert_eq!(
            active(&s, at("2025-03-29T22:00:00Z")),
            Some(at("2025-03-30T02:00:00Z"))
        );
        assert_eq!(
            active(&s, at("2025-03-30T01:30:00Z")),
            Some(at("2025-03-30T02:00:00Z"))
        );
        assert_eq!(active(&s, at("2025-03-30T02:00:00Z")), None);
    }

    #[test]
    fn start_in_the_skipped_hour_starts_at_the_end_of_the_gap() {
        // 02:30 does not exist in Berlin on 2025-03-30: the window starts at 03:00 CEST (01:00Z).
        let s = schedule(&recurring(
            Recurrence::Daily,
            &[],
            "02:30",
            "1h",
            "Europe/Berlin",
        ));
        assert_eq!(
            next(&s, at("2025-03-29T12:00:00Z")),
            Some((at("2025-03-30T01:00:00Z"), at("2025-03-30T02:00:00Z")))
        );
        assert_eq!(active(&s, at("2025-03-30T00:59:00Z")), None);
        assert_eq!(
            active(&s, at("2025-03-30T01:00:00Z")),
            Some(at("2025-03-30T02:00:00Z"))
        );
        // A repeated local time (2025-10-26, 02:30 exists twice) starts at its first occurrence
        // (CEST, 00:30Z).
        assert_eq!(
            next(&s, at("2025-10-25T12:00:00Z")),
            Some((at("2025-10-26T00:30:00Z"), at("2025-10-26T01:30:00Z")))
        );
    }

    #[test]
    fn windows_longer_than_their_period_are_refused() {
        let err = recurring(Recurrence::Daily, &[], "22:00", "25h", "UTC")
            .compile(1)
            .unwrap_err();
        assert_eq!(err.field, "duration");
        recurring(Recurrence::Daily, &[], "22:00", "24h", "UTC")
            .compile(1)
            .unwrap();
        // Mondays and Tuesdays: one day apart.
        let err = recurring(Recurrence::Weekly, &["mon", "tue"], "22:00", "30h", "UTC")
            .compile(1)
            .unwrap_err();
        assert_eq!(err.field, "duration");
        // Sunday and Monday wrap around the week: one day apart too.
        let err = recurring(Recurrence::Weekly, &["sun", "mon"], "22:00", "2d", "UTC")
            .compile(1)
            .unwrap_err();
        assert_eq!(err.field, "duration");
        recurring(Recurrence::Weekly, &["sun"], "22:00", "3d", "UTC")
            .compile(1)
            .unwrap();
    }

    #[test]
    fn bad_specs_name_the_field() {
        let now = at("2025-06-01T12:00:00Z");
        let base = WindowSpec {
            name: "x".into(),
            duration: Some("1h".into()),
            services: vec!["web".into()],
            ..Default::default()
        };
        let known = Known {
            services: Some(["web".to_string()].into()),
            nodes: Some(["n1".to_string()].into()),
        };
        let cases: Vec<(WindowSpec, &str)> = vec![
            (
                WindowSpec {
                    name: " ".into(),
                    ..base.clone()
                },
                "name",
            ),
            (
                WindowSpec {
                    services: vec![],
                    ..base.clone()
                },
                "matcher",
            ),
            (
                WindowSpec {
                    services: vec!["nope".into()],
                    ..base.clone()
                },
                "services",
            ),
            (
                WindowSpec {
                    nodes: vec!["n9".into()],
                    ..base.clone()
                },
                "nodes",
            ),
            (
                WindowSpec {
                    categories: vec!["database".into()],
                    ..base.clone()
                },
                "categories",
            ),
            (
                WindowSpec {
                    labels: vec!["env".into()],
                    ..base.clone()
                },
                "labels",
            ),
            (
                WindowSpec {
                    labels: vec!["Env=prod".into()],
                    ..base.clone()
                },
                "labels",
            ),
            (
                WindowSpec {
                    duration: Some("soon".into()),
                    ..base.clone()
                },
                "duration",
            ),
            (
                WindowSpec {
                    duration: None,
                    ..base.clone()
                },
                "to",
            ),
            (
                WindowSpec {
                    to: Some(now),
                    ..base.clone()
                },
                "duration",
            ),
            (
                WindowSpec {
                    duration: None,
                    from: Some(at("2025-05-01T00:00:00Z")),
                    to: Some(at("2025-05-02T00:00:00Z")),
                    ..base.clone()
                },
                "to",
            ),
            (
                WindowSpec {
                    start: Some("22:00".into()),
                    ..base.clone()
                },
                "start",
            ),
            (
                WindowSpec {
                    recurrence: Some(Recurrence::Daily),
                    start: Some("25:00".into()),
                    ..base.clone()
                },
                "start",
            ),
            (
                WindowSpec {
                    recurrence: Some(Recurrence::Daily),
                    start: Some("22:00".into()),
                    time_zone: Some("Mars/Olympus".into()),
                    ..base.clone()
                },
                "time_zone",
            ),
            (
                WindowSpec {
                    recurrence: Some(Recurrence::Weekly),
                    start: Some("22:00".into()),
                    ..base.clone()
                },
                "days",
            ),
            (
                WindowSpec {
                    recurrence: Some(Recurrence::Weekly),
                    start: Some("22:00".into()),
                    days: vec!["someday".into()],
                    ..base.clone()
                },
                "days",
            ),
            (
                WindowSpec {
                    recurrence: Some(Recurrence::Daily),
                    start: Some("22:00".into()),
                    from: Some(now),
                    ..base.clone()
                },
                "from",
            ),
        ];
        for (spec, field) in cases {
            let err = spec.clone().normalize(&known, now).unwrap_err();
            assert_eq!(err.field, field, "{spec:?}: {err}");
        }
        let ok = base.normalize(&known, now).unwrap();
        assert_eq!(ok.time_zone, None);
        let rec = recurring(Recurrence::Daily, &[], "22:00", "1h", "UTC");
        let rec = WindowSpec {
            time_zone: None,
            ..rec
        };
        assert_eq!(
            rec.normalize(&known, now).unwrap().time_zone.as_deref(),
            Some("UTC")
        );
    }

    #[test]
    fn matcher_needs_every_criterion_given() {
        let prod: BTreeMap<String, String> = [
            ("env".to_string(), "prod".to_string()),
            ("team".into(), "ocr".into()),
        ]
        .into();
        let none = BTreeMap::new();
        let t = |id, node, category, labels| Target {
            id,
            node,
            category,
            labels,
        };
        let m = |spec: WindowSpec| spec.compile(1).unwrap().matcher;
        let by_node = m(WindowSpec {
            name: "x".into(),
            duration: Some("1h".into()),
            nodes: vec!["n1".into()],
            from: Some(Utc::now()),
            to: Some(Utc::now()),
            ..Default::default()
        });
        assert!(by_node.matches(t("a", "n1", "api", &none)));
        assert!(!by_node.matches(t("a", "n2", "api", &none)));

        let spec = |services: Vec<&str>, categories: Vec<&str>, labels: Vec<&str>| WindowSpec {
            name: "x".into(),
            from: Some(Utc::now()),
            to: Some(Utc::now()),
            services: services.into_iter().map(String::from).collect(),
            categories: categories.into_iter().map(String::from).collect(),
            labels: labels.into_iter().map(String::from).collect(),
            ..Default::default()
        };
        let labels = m(spec(vec![], vec![], vec!["env=prod", "team=ocr"]));
        assert!(labels.matches(t("a", "n1", "api", &prod)));
        let only_env: BTreeMap<String, String> = [("env".to_string(), "prod".to_string())].into();
        assert!(
            !labels.matches(t("a", "n1", "api", &only_env)),
            "all labels must match"
        );
        let staging: BTreeMap<String, String> = [
            ("env".to_string(), "staging".to_string()),
            ("team".into(), "ocr".into()),
        ]
        .into();
        assert!(!labels.matches(t("a", "n1", "api", &staging)));

        let both = m(spec(vec!["a", "b"], vec!["api"], vec![]));
        assert!(both.matches(t("a", "n1", "api", &none)));
        assert!(both.matches(t("b", "n9", "api", &none)));
        assert!(
            !both.matches(t("b", "n9", "web", &none)),
            "category must match too"
        );
        assert!(!both.matches(t("c", "n1", "api", &none)));

        assert!(
            !Matcher::default().matches(t("a", "n1", "api", &none)),
            "empty covers nothing"
        );
    }

    #[test]
    fn cover_picks_the_longest_window() {
        let now = at("2025-06-01T12:00:00Z");
        let once = |id, to: &str, services: Vec<&str>| Window {
            id,
            name: format!("w{id}"),
            schedule: Schedule::Once {
                from: at("2025-06-01T11:00:00Z"),
                to: at(to),
            },
            matcher: Matcher {
                services: services.into_iter().map(String::from).collect(),
                ..Default::default()
            },
        };
        let windows = vec![
            once(1, "2025-06-01T13:00:00Z", vec!["a", "b"]),
            once(2, "2025-06-01T15:00:00Z", vec!["b"]),
            once(3, "2025-06-01T11:30:00Z", vec!["c"]),
        ];
        let none = BTreeMap::new();
        let targets = ["a", "b", "c"].map(|id| Target {
            id,
            node: "n1",
            category: "api",
            labels: &none,
        });
        let got = cover(&windows, targets, now);
        assert_eq!(
            got,
            vec![
                Cover {
                    service_id: "a".into(),
                    window_id: 1,
                    until: at("2025-06-01T13:00:00Z")
                },
                Cover {
                    service_id: "b".into(),
                    window_id: 2,
                    until: at("2025-06-01T15:00:00Z")
                },
            ]
        );
    }

    #[test]
    fn a_window_as_long_as_its_period_has_no_hole_when_clocks_go_back() {
        // Daily 22:00 Europe/Berlin for 24h: 2025-10-26 has 25 hours (clocks go back at 03:00
        // CEST); every minute of that week must be covered, and the end reported reaches past
        // the next start (no hole between two passes either).
        let daily = schedule(&recurring(
            Recurrence::Daily,
            &[],
            "22:00",
            "24h",
            "Europe/Berlin",
        ));
        // Weekly on Sundays 00:00 for 7d over the same change.
        let weekly = schedule(&recurring(
            Recurrence::Weekly,
            &["sun"],
            "00:00",
            "7d",
            "Europe/Berlin",
        ));
        // Weekly on Mondays and Thursdays, lasting the shorter gap (3 days): not continuous,
        // covered from Monday 00:00 to Thursday 00:00 + 3d = Sunday 00:00, then a day's hole.
        let two_days = schedule(&recurring(
            Recurrence::Weekly,
            &["mon", "thu"],
            "00:00",
            "3d",
            "Europe/Berlin",
        ));
        let mut t = at("2025-10-20T00:00:00Z");
        while t < at("2025-11-02T00:00:00Z") {
            for (name, s) in [("daily", &daily), ("weekly", &weekly)] {
                let until = active(s, t).unwrap_or_else(|| panic!("{name} not in force at {t}"));
                assert!(
                    until > t + chrono::Duration::hours(1),
                    "{name} at {t}: {until}"
                );
            }
            t += chrono::Duration::minutes(10);
        }
        // The 25-hour day: the occurrence of Saturday 22:00 CEST (20:00Z) would end at 20:00Z
        // Sunday, an hour before Sunday 22:00 CET (21:00Z); it lasts until then.
        assert!(active(&daily, at("2025-10-26T20:30:00Z")).is_some());
        // Not continuous: Sunday 2025-10-26, 12:00 local is outside (Thu 00:00 + 3d = Sun 00:00).
        assert_eq!(active(&two_days, at("2025-10-26T11:00:00Z")), None);
        assert_eq!(
            active(&two_days, at("2025-10-23T12:00:00Z")),
            Some(at("2025-10-25T22:00:00Z"))
        );
        // A 23h daily window keeps its hour off, on the 25-hour day two.
        let short = schedule(&recurring(
            Recurrence::Daily,
            &[],
            "22:00",
            "23h",
            "Europe/Berlin",
        ));
        assert_eq!(active(&short, at("2025-10-26T19:30:00Z")), None);
        assert_eq!(active(&short, at("2025-10-26T20:30:00Z")), None);
        assert_eq!(
            active(&short, at("2025-10-26T21:30:00Z")),
            Some(at("2025-10-27T20:00:00Z"))
        );
    }

    #[test]
    fn a_node_is_in_maintenance_when_named_or_when_all_its_services_are() {
        let now = at("2025-06-01T12:00:00Z");
        let win = |id, to: &str, m: Matcher| Window {
            id,
            name: format!("w{id}"),
            schedule: Schedule::Once {
                from: at("2025-06-01T11:00:00Z"),
                to: at(to),
            },
            matcher: m,
        };
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let windows = vec![
            // n1 named alone: the whole node.
            win(
                1,
                "2025-06-01T13:00:00Z",
                Matcher {
                    nodes: names(&["n1"]),
                    ..Default::default()
                },
            ),
            // n2 named with a category: only its api services, not the node.
            win(
                2,
                "2025-06-01T14:00:00Z",
                Matcher {
                    nodes: names(&["n2"]),
                    categories: names(&["api"]),
                    ..Default::default()
                },
            ),
            // Both services of n3 by id, ending at different times: the node until the first.
            win(
                3,
                "2025-06-01T15:00:00Z",
                Matcher {
                    services: names(&["c1"]),
                    ..Default::default()
                },
            ),
            win(
                4,
                "2025-06-01T16:00:00Z",
                Matcher {
                    services: names(&["c2", "d1"]),
                    ..Default::default()
                },
            ),
        ];
        let none = BTreeMap::new();
        let t = |id, node, category| Target {
            id,
            node,
            category,
            labels: &none,
        };
        let targets = vec![
            t("a1", "n1", "api"),
            t("b1", "n2", "api"),
            t("b2", "n2", "web"),
            t("c1", "n3", "api"),
            t("c2", "n3", "web"),
            t("d1", "n4", "api"),
            t("d2", "n4", "api"),
        ];
        let covered = cover(&windows, targets.iter().copied(), now);
        let got = node_cover(
            &windows,
            ["n1", "n2", "n3", "n4", "n5"],
            &targets,
            &covered,
            now,
        );
        assert_eq!(
            got,
            vec![
                ("n1".to_string(), at("2025-06-01T13:00:00Z")),
                ("n3".to_string(), at("2025-06-01T15:00:00Z")),
            ]
        );
        // A node without services is in maintenance only when named.
        let got = node_cover(&windows, ["n5"], &[], &[], now);
        assert!(got.is_empty());
        // Once window 1 ended, n1 (all of whose services were covered by it) is out too.
        let later = at("2025-06-01T13:30:00Z");
        let covered = cover(&windows, targets.iter().copied(), later);
        let got = node_cover(&windows, ["n1"], &targets, &covered, later);
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn stored_spec_round_trips_as_json() {
        let spec = recurring(
            Recurrence::Weekly,
            &["mon", "thu"],
            "22:00",
            "2h",
            "Europe/Berlin",
        );
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["recurrence"], "weekly");
        assert!(json.get("from").is_none());
        let back: WindowSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, spec);
        assert_eq!(
            describe(&spec),
            "weekly mon, thu at 22:00 Europe/Berlin for 2h"
        );
        assert_eq!(describe_matcher(&spec), "services=web");
    }
}
