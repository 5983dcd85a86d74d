//! Availability and SLA figures (uptime %, incidents, MTTR, MTBF) computed from a service's
//! recorded transitions, as pure functions: what counts as up, down or not counted, the
//! timeline of a window, its totals, per-hour/per-day buckets and how a percentage is shown.
//!
//! A service's condition at any moment is made of four things the collector records as events
//! when they change: its state (`state` events: unknown, healthy, failing, down), whether it is
//! stale (`stale` events: stale, fresh), its operator mode (`mode` events: active, paused,
//! stopped) and whether it is in maintenance (`maintenance` events). From them ([`Condition::class`]):
//!
//! - **not counted** (left out of the denominator, like status pages do): in maintenance, paused or
//!   stopped by an operator, and `unknown` (no result yet) unless stale;
//! - **down**: stale (no fresh result: the service, its check or its node went silent — a down
//!   node makes its services stale at once) or in state `down`;
//! - **up**: `healthy`, or `failing` (below its failure threshold, not yet declared down).
//!
//! The condition at the start of a window is what the last event of each kind before it left
//! (no event of a kind: unknown, fresh, active, not in maintenance). An **incident** is a
//! maximal stretch of down time; stretches separated only by time not counted (a pause, a
//! maintenance window) are one incident, and its length is its down time only. An incident that
//! began before the window or is still open at its end counts with the part inside the window.
//! MTTR = down time / incidents; MTBF = up time / incidents (both absent without incidents).

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use utoipa::ToSchema;

/// What one recorded event changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The state machine's state: unknown | healthy | failing | down.
    State(String),
    /// Stale (true) or fresh again (false).
    Stale(bool),
    /// The operator mode: active | paused | stopped.
    Mode(String),
    /// Entered (true) or left (false) maintenance.
    Maintenance(bool),
}

/// The event kinds availability reads.
pub const EVENT_KINDS: [&str; 4] = ["state", "stale", "mode", "maintenance"];

impl Change {
    /// The change an event row of `kind` with `to_state` records; `None` for kinds that do not
    /// bear on availability (flapping, remediation).
    pub fn from_event(kind: &str, to_state: &str) -> Option<Change> {
        match kind {
            "state" => Some(Change::State(to_state.to_string())),
            "stale" => Some(Change::Stale(to_state == "stale")),
            "mode" => Some(Change::Mode(to_state.to_string())),
            "maintenance" => Some(Change::Maintenance(to_state == "maintenance")),
            _ => None,
        }
    }
}

/// Up, down, or not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Up,
    Down,
    NotCounted,
}

/// A service's condition as far as availability is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub state: String,
    pub stale: bool,
    pub mode: String,
    pub maintenance: bool,
}

impl Default for Condition {
    /// Before any event: no result yet, fresh, active, not in maintenance.
    fn default() -> Condition {
        Condition {
            state: "unknown".into(),
            stale: false,
            mode: "active".into(),
            maintenance: false,
        }
    }
}

impl Condition {
    pub fn apply(&mut self, c: &Change) {
        match c {
            Change::State(s) => self.state.clone_from(s),
            Change::Stale(s) => self.stale = *s,
            Change::Mode(m) => self.mode.clone_from(m),
            Change::Maintenance(m) => self.maintenance = *m,
        }
    }

    /// Whether this condition counts as up, down, or not at all (see the module's text).
    pub fn class(&self) -> Class {
        if self.maintenance || self.mode != "active" {
            Class::NotCounted
        } else if self.stale || self.state == "down" {
            Class::Down
        } else if self.state == "healthy" || self.state == "failing" {
            Class::Up
        } else {
            Class::NotCounted
        }
    }
}

/// A stretch of time in one class, `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub class: Class,
}

/// The classes over `[from, to)`: `initial` holds at `from`, then each change in `changes`
/// (in time order; those before `from` are applied to the start, those at or after `to` are
/// ignored). Adjacent spans of one class are merged; empty spans are dropped.
pub fn timeline(
    initial: &Condition,
    changes: &[(DateTime<Utc>, Change)],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Vec<Span> {
    let mut spans: Vec<Span> = Vec::new();
    if to <= from {
        return spans;
    }
    let mut cond = initial.clone();
    let mut start = from;
    let push = |spans: &mut Vec<Span>, a: DateTime<Utc>, b: DateTime<Utc>, class: Class| {
        if b <= a {
            return;
        }
        match spans.last_mut() {
            Some(last) if last.class == class && last.to == a => last.to = b,
            _ => spans.push(Span {
                from: a,
                to: b,
                class,
            }),
        }
    };
    for (at, change) in changes {
        if *at >= to {
            break;
        }
        let at = (*at).max(from);
        push(&mut spans, start, at, cond.class());
        cond.apply(change);
        start = at;
    }
    push(&mut spans, start, to, cond.class());
    spans
}

/// Microsecond totals of a window (the resolution of recorded times): exact, so that services
/// and buckets add up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub up_us: i64,
    pub down_us: i64,
    pub not_counted_us: i64,
    pub incidents: u64,
    pub longest_incident_us: i64,
    /// Down at the end of the window (an incident still open).
    pub down_at_end: bool,
}

/// The totals of `spans` clipped to `[from, to)`.
pub fn totals(spans: &[Span], from: DateTime<Utc>, to: DateTime<Utc>) -> Totals {
    let mut t = Totals::default();
    // Down time of the incident in progress; None when not inside one.
    let mut open: Option<i64> = None;
    let mut last = Class::NotCounted;
    for s in spans {
        let (a, b) = (s.from.max(from), s.to.min(to));
        if b <= a {
            continue;
        }
        let us = (b - a).num_microseconds().unwrap_or(i64::MAX);
        match s.class {
            Class::Up => {
                t.up_us += us;
                if let Some(d) = open.take() {
                    t.longest_incident_us = t.longest_incident_us.max(d);
                }
            }
            Class::Down => {
                t.down_us += us;
                match open.as_mut() {
                    Some(d) => *d += us,
                    None => {
                        t.incidents += 1;
                        open = Some(us);
                    }
                }
            }
            Class::NotCounted => t.not_counted_us += us,
        }
        last = s.class;
    }
    if let Some(d) = open {
        t.longest_incident_us = t.longest_incident_us.max(d);
    }
    t.down_at_end = last == Class::Down;
    t
}

impl Totals {
    /// Adds another service's totals (a node's or a category's figures).
    pub fn add(&mut self, o: &Totals) {
        self.up_us += o.up_us;
        self.down_us += o.down_us;
        self.not_counted_us += o.not_counted_us;
        self.incidents += o.incidents;
        self.longest_incident_us = self.longest_incident_us.max(o.longest_incident_us);
        self.down_at_end |= o.down_at_end;
    }

    /// Up time over counted time, in percent; `None` when nothing was counted.
    pub fn uptime_percent(&self) -> Option<f64> {
        let counted = self.up_us + self.down_us;
        (counted > 0).then(|| self.up_us as f64 * 100.0 / counted as f64)
    }

    pub fn figures(&self) -> Figures {
        let secs = |us: i64| us as f64 / 1e6;
        let per_incident = |us: i64| (self.incidents > 0).then(|| secs(us) / self.incidents as f64);
        Figures {
            uptime_percent: self.uptime_percent(),
            counted_seconds: secs(self.up_us + self.down_us),
            up_seconds: secs(self.up_us),
            down_seconds: secs(self.down_us),
            not_counted_seconds: secs(self.not_counted_us),
            incidents: self.incidents,
            longest_incident_seconds: secs(self.longest_incident_us),
            mttr_seconds: per_incident(self.down_us),
            mtbf_seconds: per_incident(self.up_us),
            down_at_end: self.down_at_end,
        }
    }
}

/// Availability figures of a window (seconds, to the microsecond).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, ToSchema)]
pub struct Figures {
    /// Up time over counted time (up + down), in percent; null when nothing was counted (no
    /// result yet, or paused, stopped or in maintenance the whole window).
    pub uptime_percent: Option<f64>,
    /// Up + down: the denominator of the uptime.
    pub counted_seconds: f64,
    pub up_seconds: f64,
    /// Down or stale: the total length of the incidents inside the window.
    pub down_seconds: f64,
    /// Paused, stopped, in maintenance or without a result yet: not counted.
    pub not_counted_seconds: f64,
    /// Incidents with down time inside the window (one that began before it or is still open
    /// counts).
    pub incidents: u64,
    pub longest_incident_seconds: f64,
    /// Mean time to recover: down time / incidents; null without incidents.
    pub mttr_seconds: Option<f64>,
    /// Mean time between failures: up time / incidents; null without incidents.
    pub mtbf_seconds: Option<f64>,
    /// Down at the end of the window: an incident is still open.
    pub down_at_end: bool,
}

/// The totals of `n` consecutive buckets of length `step` from `from` (the uptime bars: one per
/// hour or per day).
pub fn buckets(spans: &[Span], from: DateTime<Utc>, step: Duration, n: usize) -> Vec<Totals> {
    (0..n)
        .map(|i| {
            let a = from + step * i as i32;
            totals(spans, a, a + step)
        })
        .collect()
}

/// A percentage as shown to people, two decimals ("99.31 %"); below 100 never shows as
/// "100.00 %", above 0 never as "0.00 %"; "–" when nothing was counted.
pub fn percent_text(p: Option<f64>) -> String {
    match p {
        None => "–".into(),
        Some(p) => {
            let mut r = (p * 100.0).round() / 100.0;
            if p < 100.0 && r >= 100.0 {
                r = 99.99;
            }
            if p > 0.0 && r <= 0.0 {
                r = 0.01;
            }
            format!("{r:.2} %")
        }
    }
}

/// A duration in seconds as "1 h 5 min", "42 s"; "–" for none.
pub fn duration_text(secs: Option<f64>) -> String {
    let Some(s) = secs else { return "–".into() };
    let s = s.round() as i64;
    let (d, h, m, sec) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec} s"),
        (0, 0, _) => format!("{m} min {sec} s"),
        (0, _, _) => format!("{h} h {m} min"),
        _ => format!("{d} d {h} h"),
    }
}

/// One service's figures over a window.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ServiceAvailability {
    pub service: String,
    pub name: String,
    pub node: String,
    pub category: String,
    #[serde(flatten)]
    pub figures: Figures,
}

/// Each service's totals over `[from, until)` and their sum (a node's or a category's figures:
/// service time adds up, so a service down for an hour weighs the same in any scope).
pub fn summarize(
    histories: &[crate::store::ServiceHistory],
    from: DateTime<Utc>,
    until: DateTime<Utc>,
) -> (Totals, Vec<(ServiceAvailability, Totals)>) {
    let mut sum = Totals::default();
    let per = histories
        .iter()
        .map(|h| {
            let t = totals(&timeline(&h.initial, &h.changes, from, until), from, until);
            sum.add(&t);
            (
                ServiceAvailability {
                    service: h.service_id.clone(),
                    name: h.name.clone(),
                    node: h.node.clone(),
                    category: h.category.clone(),
                    figures: t.figures(),
                },
                t,
            )
        })
        .collect();
    (sum, per)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> DateTime<Utc> {
        "2026-11-01T00:00:00Z".parse().unwrap()
    }

    fn min(m: i64) -> DateTime<Utc> {
        t0() + Duration::minutes(m)
    }

    fn healthy() -> Condition {
        Condition {
            state: "healthy".into(),
            ..Condition::default()
        }
    }

    fn st(s: &str) -> Change {
        Change::State(s.into())
    }

    fn figures(
        initial: &Condition,
        changes: &[(DateTime<Utc>, Change)],
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Figures {
        totals(&timeline(initial, changes, from, to), from, to).figures()
    }

    #[test]
    fn down_ten_minutes_out_of_a_day_is_99_31_percent() {
        let f = figures(
            &healthy(),
            &[(min(600), st("down")), (min(610), st("healthy"))],
            t0(),
            min(24 * 60),
        );
        assert_eq!(percent_text(f.uptime_percent), "99.31 %");
        assert_eq!(f.incidents, 1);
        assert_eq!(f.down_seconds, 600.0);
        assert_eq!(f.up_seconds, 86_400.0 - 600.0);
        assert_eq!(f.counted_seconds, 86_400.0);
        assert_eq!(f.mttr_seconds, Some(600.0));
        assert_eq!(f.longest_incident_seconds, 600.0);
        assert!(!f.down_at_end);
    }

    #[test]
    fn mtbf_with_one_incident_is_the_up_time() {
        let f = figures(
            &healthy(),
            &[(min(60), st("down")), (min(90), st("healthy"))],
            t0(),
            min(120),
        );
        assert_eq!(f.incidents, 1);
        assert_eq!(f.mtbf_seconds, Some(90.0 * 60.0));
        assert_eq!(f.mttr_seconds, Some(30.0 * 60.0));
        assert_eq!(f.uptime_percent, Some(75.0));
    }

    #[test]
    fn incidents_overlapping_both_edges_count_their_part_inside() {
        // Down from before the window until 10 min in; down again 10 min before its end and
        // after it.
        let initial = Condition {
            state: "down".into(),
            ..Condition::default()
        };
        let changes = [
            (min(-30), st("down")),
            (min(10), st("healthy")),
            (min(50), st("down")),
            (min(80), st("healthy")),
        ];
        let f = figures(&initial, &changes, t0(), min(60));
        assert_eq!(f.incidents, 2);
        assert_eq!(f.down_seconds, 20.0 * 60.0);
        assert_eq!(f.up_seconds, 40.0 * 60.0);
        assert_eq!(f.longest_incident_seconds, 600.0);
        assert!(f.down_at_end, "the second incident is open at the end");
    }

    #[test]
    fn the_state_at_from_comes_from_the_last_event_before_it() {
        // Events before the window are applied to the initial condition.
        let changes = [(min(-60), st("healthy")), (min(-5), st("down"))];
        let f = figures(&Condition::default(), &changes, t0(), min(10));
        assert_eq!(f.uptime_percent, Some(0.0));
        assert_eq!(f.incidents, 1);
        assert!(f.down_at_end);
    }

    #[test]
    fn an_incident_still_open_at_to_counts_until_to() {
        let f = figures(&healthy(), &[(min(50), st("down"))], t0(), min(60));
        assert_eq!(f.incidents, 1);
        assert_eq!(f.down_seconds, 600.0);
        assert!(f.down_at_end);
        assert_eq!(percent_text(f.uptime_percent), "83.33 %");
    }

    #[test]
    fn no_transitions_at_all() {
        let f = figures(&healthy(), &[], t0(), min(60));
        assert_eq!(f.uptime_percent, Some(100.0));
        assert_eq!(f.incidents, 0);
        assert_eq!(f.mttr_seconds, None);
        assert_eq!(f.mtbf_seconds, None);
        // Never a result: nothing is counted, and nothing is claimed.
        let f = figures(&Condition::default(), &[], t0(), min(60));
        assert_eq!(f.uptime_percent, None);
        assert_eq!(f.not_counted_seconds, 3600.0);
        assert_eq!(percent_text(f.uptime_percent), "–");
    }

    #[test]
    fn stale_counts_as_down_pause_and_maintenance_are_not_counted() {
        let changes = [
            (min(10), Change::Stale(true)),
            (min(20), Change::Stale(false)),
            (min(30), Change::Mode("paused".into())),
            (min(40), Change::Mode("active".into())),
            (min(45), Change::Maintenance(true)),
            (min(50), Change::Maintenance(false)),
        ];
        let f = figures(&healthy(), &changes, t0(), min(60));
        assert_eq!(f.down_seconds, 600.0);
        assert_eq!(f.not_counted_seconds, 900.0);
        assert_eq!(f.up_seconds, 35.0 * 60.0);
        assert_eq!(f.counted_seconds, 45.0 * 60.0);
        assert_eq!(f.incidents, 1);
    }

    #[test]
    fn down_across_a_pause_is_one_incident_of_its_down_time() {
        let changes = [
            (min(10), st("down")),
            (min(20), Change::Mode("paused".into())),
            (min(30), Change::Mode("active".into())),
            (min(40), st("healthy")),
        ];
        let f = figures(&healthy(), &changes, t0(), min(60));
        assert_eq!(f.incidents, 1);
        assert_eq!(f.down_seconds, 20.0 * 60.0);
        assert_eq!(f.longest_incident_seconds, 20.0 * 60.0);
        assert_eq!(f.not_counted_seconds, 600.0);
    }

    #[test]
    fn failing_is_up_and_unknown_is_not_counted_unless_stale() {
        let changes = [
            (min(10), st("failing")),
            (min(20), st("unknown")),
            (min(30), Change::Stale(true)),
        ];
        let f = figures(&healthy(), &changes, t0(), min(40));
        assert_eq!(f.up_seconds, 1200.0);
        assert_eq!(f.not_counted_seconds, 600.0);
        assert_eq!(f.down_seconds, 600.0);
    }

    #[test]
    fn events_at_or_after_to_and_empty_windows_are_ignored() {
        let f = figures(&healthy(), &[(min(60), st("down"))], t0(), min(60));
        assert_eq!(f.down_seconds, 0.0);
        assert!(timeline(&healthy(), &[], min(5), min(5)).is_empty());
        assert!(timeline(&healthy(), &[], min(6), min(5)).is_empty());
        assert_eq!(
            totals(&[], t0(), min(1)).figures().uptime_percent,
            None,
            "no spans, nothing counted"
        );
    }

    #[test]
    fn buckets_split_the_timeline_and_add_up_to_the_whole() {
        let changes = [(min(50), st("down")), (min(70), st("healthy"))];
        let spans = timeline(&healthy(), &changes, t0(), min(180));
        let b = buckets(&spans, t0(), Duration::hours(1), 3);
        assert_eq!(b.len(), 3);
        assert_eq!(b[0].down_us, 600_000_000);
        assert_eq!(b[1].down_us, 600_000_000);
        assert_eq!(b[2].down_us, 0);
        let mut sum = Totals::default();
        for t in &b {
            sum.add(t);
        }
        let whole = totals(&spans, t0(), min(180));
        assert_eq!(sum.up_us, whole.up_us);
        assert_eq!(sum.down_us, whole.down_us);
        // Split by the bucket edge, the one incident is counted in each bucket it touches.
        assert_eq!(sum.incidents, 2);
        assert_eq!(whole.incidents, 1);
    }

    #[test]
    fn percent_text_never_rounds_to_perfect_or_to_nothing() {
        assert_eq!(percent_text(Some(100.0)), "100.00 %");
        assert_eq!(percent_text(Some(99.9999)), "99.99 %");
        assert_eq!(percent_text(Some(0.0001)), "0.01 %");
        assert_eq!(percent_text(Some(0.0)), "0.00 %");
        assert_eq!(percent_text(Some(99.305_555)), "99.31 %");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(duration_text(None), "–");
        assert_eq!(duration_text(Some(42.4)), "42 s");
        assert_eq!(duration_text(Some(600.0)), "10 min 0 s");
        assert_eq!(duration_text(Some(3900.0)), "1 h 5 min");
        assert_eq!(duration_text(Some(90_000.0)), "1 d 1 h");
    }
}
