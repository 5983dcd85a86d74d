//! Roll-up arithmetic (pure): the per-service hourly and daily figures that ingest merges new
//! results into — checks, failures, min/avg/p95/max response time, the same per numeric
//! perfdata label — and the time each service spent up, down, stale, paused or unknown.
//!
//! p95 comes from a log-bucket histogram (8 buckets per doubling, so an estimate is within
//! 4.5 % of the true nearest-rank p95, and always within [min, max]); histograms of two periods
//! add up, which is what lets an hour be merged batch by batch and a day from its batches too.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Buckets per doubling of a value.
const PER_DOUBLING: f64 = 8.0;
/// Added to a bucket's exponent so that every nonzero value's key is positive.
const OFFSET: i32 = 10_000;
/// Labels kept per service and period; further labels are counted, not aggregated.
pub const MAX_LABELS: usize = 64;

/// The histogram key of `v`: 0 for zero, else ±(exponent bucket + OFFSET).
pub fn bucket(v: f64) -> i32 {
    if v == 0.0 || !v.is_finite() {
        return 0;
    }
    let k = (v.abs().log2() * PER_DOUBLING).floor() as i32 + OFFSET;
    if v < 0.0 { -k } else { k }
}

/// A representative value of bucket `k` (the geometric middle of its range).
pub fn bucket_value(k: i32) -> f64 {
    if k == 0 {
        return 0.0;
    }
    let e = (k.abs() - OFFSET) as f64 + 0.5;
    let v = (e / PER_DOUBLING).exp2();
    if k < 0 { -v } else { v }
}

/// Count, min, max, sum and histogram of a set of numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Agg {
    pub n: i64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    /// Bucket key → count.
    pub hist: BTreeMap<i32, i64>,
}

impl Agg {
    pub fn add(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        if self.n == 0 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.n += 1;
        self.sum += v;
        *self.hist.entry(bucket(v)).or_default() += 1;
    }

    pub fn merge(&mut self, o: &Agg) {
        if o.n == 0 {
            return;
        }
        if self.n == 0 {
            self.min = o.min;
            self.max = o.max;
        } else {
            self.min = self.min.min(o.min);
            self.max = self.max.max(o.max);
        }
        self.n += o.n;
        self.sum += o.sum;
        for (k, c) in &o.hist {
            *self.hist.entry(*k).or_default() += c;
        }
    }

    pub fn avg(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }

    /// The estimated nearest-rank quantile `q` (0 < q ≤ 1), clamped to [min, max].
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let rank = ((q * self.n as f64).ceil() as i64).clamp(1, self.n);
        let mut seen = 0;
        for (k, c) in &self.hist {
            seen += c;
            if seen >= rank {
                return Some(bucket_value(*k).clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }

    pub fn p95(&self) -> Option<f64> {
        self.quantile(0.95)
    }
}

/// One service's figures for one period (an hour or a day), as the results made them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Period {
    pub checks: i64,
    /// Results with status critical or unknown.
    pub failures: i64,
    /// Response time, ms.
    pub response: Agg,
    /// Numeric perfdata by label (at most [`MAX_LABELS`]).
    pub metrics: BTreeMap<String, Agg>,
    /// Metric values not aggregated because their label came after the first [`MAX_LABELS`].
    pub metrics_dropped: i64,
}

/// What a roll-up needs of one result.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    pub duration_ms: u32,
    /// Critical or unknown.
    pub failed: bool,
    pub metrics: &'a [vigil_checks::Metric],
}

impl Period {
    pub fn add(&mut self, s: Sample<'_>) {
        self.checks += 1;
        if s.failed {
            self.failures += 1;
        }
        self.response.add(s.duration_ms as f64);
        for m in s.metrics {
            if !m.value.is_finite() {
                continue;
            }
            if let Some(a) = self.metrics.get_mut(&m.label) {
                a.add(m.value);
            } else if self.metrics.len() < MAX_LABELS {
                let mut a = Agg::default();
                a.add(m.value);
                self.metrics.insert(m.label.clone(), a);
            } else {
                self.metrics_dropped += 1;
            }
        }
    }

    pub fn merge(&mut self, o: &Period) {
        self.checks += o.checks;
        self.failures += o.failures;
        self.response.merge(&o.response);
        for (label, a) in &o.metrics {
            if let Some(mine) = self.metrics.get_mut(label) {
                mine.merge(a);
            } else if self.metrics.len() < MAX_LABELS {
                self.metrics.insert(label.clone(), a.clone());
            } else {
                self.metrics_dropped += a.n;
            }
        }
        self.metrics_dropped += o.metrics_dropped;
    }
}

/// Per label min/avg/p95/max, as stored beside a period's columns and shown by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MetricSummary {
    pub n: i64,
    pub min: f64,
    pub avg: f64,
    pub p95: f64,
    pub max: f64,
}

impl Period {
    /// min/avg/p95/max of each label.
    pub fn metric_summaries(&self) -> BTreeMap<String, MetricSummary> {
        self.metrics
            .iter()
            .filter(|(_, a)| a.n > 0)
            .map(|(l, a)| {
                (
                    l.clone(),
                    MetricSummary {
                        n: a.n,
                        min: a.min,
                        avg: a.avg().unwrap_or_default(),
                        p95: a.p95().unwrap_or_default(),
                        max: a.max,
                    },
                )
            })
            .collect()
    }
}

/// Where a service stands at one moment, for the time-in-state figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// The state machine's state: unknown | healthy | failing | down.
    pub state: String,
    pub stale: bool,
    /// The operator mode: active | paused | stopped.
    pub mode: String,
}

impl Default for Condition {
    fn default() -> Self {
        Condition {
            state: "unknown".into(),
            stale: false,
            mode: "active".into(),
        }
    }
}

/// Which bucket of time a condition counts toward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Up,
    Down,
    Stale,
    Paused,
    Unknown,
}

impl Condition {
    /// Paused (or stopped) by an operator over stale over the state: down is down, healthy or
    /// failing (below the threshold) is up, anything else unknown.
    pub fn bucket(&self) -> Bucket {
        if self.mode != "active" {
            Bucket::Paused
        } else if self.stale {
            Bucket::Stale
        } else {
            match self.state.as_str() {
                "down" => Bucket::Down,
                "healthy" | "failing" => Bucket::Up,
                _ => Bucket::Unknown,
            }
        }
    }

    /// Applies one event (`kind` state | stale | mode, its `to_state`); other kinds do nothing.
    pub fn apply(&mut self, kind: &str, to: &str) {
        match kind {
            "state" => self.state = to.to_string(),
            "stale" => self.stale = to == "stale",
            "mode" => self.mode = to.to_string(),
            _ => {}
        }
    }
}

/// Milliseconds spent in each bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateTimes {
    pub up_ms: i64,
    pub down_ms: i64,
    pub stale_ms: i64,
    pub paused_ms: i64,
    pub unknown_ms: i64,
}

impl StateTimes {
    fn add(&mut self, b: Bucket, ms: i64) {
        match b {
            Bucket::Up => self.up_ms += ms,
            Bucket::Down => self.down_ms += ms,
            Bucket::Stale => self.stale_ms += ms,
            Bucket::Paused => self.paused_ms += ms,
            Bucket::Unknown => self.unknown_ms += ms,
        }
    }

    pub fn total_ms(&self) -> i64 {
        self.up_ms + self.down_ms + self.stale_ms + self.paused_ms + self.unknown_ms
    }
}

/// Time in each bucket over [`from`, `to`) for a service whose condition at `from` was
/// `start` and whose events in the period are `events` (time, kind, to_state), oldest first.
/// Returns the times and the condition at `to`.
pub fn state_times(
    start: Condition,
    events: &[(DateTime<Utc>, String, String)],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> (StateTimes, Condition) {
    let mut times = StateTimes::default();
    let mut cur = start;
    let mut at = from;
    for (t, kind, to_state) in events {
        let t = (*t).clamp(from, to);
        times.add(cur.bucket(), (t - at).num_milliseconds().max(0));
        at = at.max(t);
        cur.apply(kind, to_state);
    }
    times.add(cur.bucket(), (to - at).num_milliseconds().max(0));
    (times, cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_values_fall_in_their_bucket() {
        let mut last = i32::MIN;
        for v in [
            -1e9, -3.0, -0.001, 0.0, 1e-300, 0.5, 1.0, 1.1, 2.0, 999.0, 1e12,
        ] {
            let k = bucket(v);
            assert!(k > last || v == 0.0 && k == 0, "{v}: {k} after {last}");
            last = k;
            let rel = (bucket_value(k) - v).abs() / v.abs().max(f64::MIN_POSITIVE);
            assert!(v == 0.0 || rel < 0.045, "{v} → {} ({rel})", bucket_value(k));
        }
        assert_eq!(bucket(f64::NAN), 0);
    }

    #[test]
    fn p95_is_within_the_bucket_error_of_the_nearest_rank() {
        let mut a = Agg::default();
        let mut vals: Vec<f64> = (1..=1000).map(|i| (i * 7 % 997) as f64 + 1.0).collect();
        for v in &vals {
            a.add(*v);
        }
        vals.sort_by(f64::total_cmp);
        let exact = vals[(0.95 * 1000.0f64).ceil() as usize - 1];
        let est = a.p95().unwrap();
        assert!((est - exact).abs() <= exact * 0.045, "{est} vs {exact}");
        assert_eq!(a.min, 1.0);
        assert_eq!(a.max, vals[999]);
        // One value: exactly it.
        let mut one = Agg::default();
        one.add(42.0);
        assert_eq!(one.p95(), Some(42.0));
    }

    #[test]
    fn merging_equals_adding_everything_to_one() {
        let ms = [0u32, 5, 17, 17, 250, 3_000, 12];
        let metric = |v: f64| vec![vigil_checks::Metric::new("load", v, "")];
        let mut whole = Period::default();
        let mut a = Period::default();
        let mut b = Period::default();
        for (i, m) in ms.iter().enumerate() {
            let mx = metric(*m as f64 / 10.0);
            let s = Sample {
                duration_ms: *m,
                failed: i % 3 == 0,
                metrics: &mx,
            };
            whole.add(s);
            if i < 3 { a.add(s) } else { b.add(s) }
        }
        a.merge(&b);
        assert_eq!(a, whole);
        assert_eq!(whole.checks, 7);
        assert_eq!(whole.failures, 3);
        assert_eq!(whole.response.min, 0.0);
        assert_eq!(whole.response.max, 3000.0);
    }

    #[test]
    fn labels_beyond_the_limit_are_counted_not_kept() {
        let mut p = Period::default();
        let many: Vec<vigil_checks::Metric> = (0..MAX_LABELS + 5)
            .map(|i| vigil_checks::Metric::new(format!("m{i}"), 1.0, ""))
            .collect();
        p.add(Sample {
            duration_ms: 1,
            failed: false,
            metrics: &many,
        });
        assert_eq!(p.metrics.len(), MAX_LABELS);
        assert_eq!(p.metrics_dropped, 5);
    }

    #[test]
    fn time_in_state_follows_the_events() {
        let t = |m: i64| DateTime::from_timestamp(1_800_000_000 + m * 60, 0).unwrap();
        let ev = |m: i64, k: &str, to: &str| (t(m), k.to_string(), to.to_string());
        let start = Condition {
            state: "healthy".into(),
            ..Condition::default()
        };
        let events = vec![
            ev(10, "state", "down"),
            ev(20, "state", "healthy"),
            ev(30, "stale", "stale"),
            ev(35, "mode", "paused"),
            ev(40, "stale", "fresh"),
            ev(50, "mode", "active"),
            ev(55, "remediation", "restarting"),
        ];
        let (times, end) = state_times(start, &events, t(0), t(60));
        assert_eq!(
            times,
            StateTimes {
                up_ms: (10 + 10 + 10) * 60_000,
                down_ms: 10 * 60_000,
                stale_ms: 5 * 60_000,
                paused_ms: 15 * 60_000,
                unknown_ms: 0,
            }
        );
        assert_eq!(times.total_ms(), 3_600_000);
        assert_eq!(end.bucket(), Bucket::Up);
        // Events outside the period are clamped to it.
        let (times, _) = state_times(Condition::default(), &[ev(-5, "state", "down")], t(0), t(1));
        assert_eq!(times.down_ms, 60_000);
    }
}
