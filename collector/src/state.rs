//! The per-service state machine: consecutive failures and successes move a service between
//! unknown, healthy, failing and down according to its thresholds. Pure: no I/O.

use serde::Serialize;

use crate::config::Thresholds;

/// Where a service stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// No result yet.
    Unknown,
    Healthy,
    /// Failing, but fewer consecutive failures than the threshold.
    Failing,
    /// At or past the failure threshold.
    Down,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::Healthy => "healthy",
            State::Failing => "failing",
            State::Down => "down",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        Some(match s {
            "unknown" => State::Unknown,
            "healthy" => State::Healthy,
            "failing" => State::Failing,
            "down" => State::Down,
            _ => return None,
        })
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A service's state and its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracker {
    pub state: State,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    /// The last results, one bit each (1 = up), newest in bit 0.
    pub history: u64,
    /// How many bits of `history` are filled (at most [`FLAP_WINDOW`]).
    pub history_len: u32,
    pub flapping: bool,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            state: State::Unknown,
            consecutive_failures: 0,
            consecutive_successes: 0,
            history: 0,
            history_len: 0,
            flapping: false,
        }
    }
}

/// Results considered for flap detection (as Nagios: 21 results, 20 possible changes).
pub const FLAP_WINDOW: u32 = 21;

/// Nagios-style percent state change over the last [`FLAP_WINDOW`] results: each change between
/// consecutive results counts with a weight from 0.8 (oldest) to 1.2 (newest). `None` until the
/// window is full.
pub fn percent_state_change(history: u64, len: u32) -> Option<f64> {
    if len < FLAP_WINDOW {
        return None;
    }
    let pairs = FLAP_WINDOW - 1;
    let mut total = 0.0;
    // Pair k compares result k and k+1 counted from the oldest (k = 0) to the newest.
    for k in 0..pairs {
        let older = (history >> (FLAP_WINDOW - 1 - k)) & 1;
        let newer = (history >> (FLAP_WINDOW - 2 - k)) & 1;
        if older != newer {
            total += 0.8 + 0.4 * k as f64 / (pairs - 1) as f64;
        }
    }
    Some(total * 100.0 / pairs as f64)
}

/// A change of state and why it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub reason: String,
}

/// A change of the flapping flag and the percent that caused it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlapChange {
    pub flapping: bool,
    pub percent: f64,
}

impl Tracker {
    /// Feeds one result (`up`: OK or WARNING) and returns the transition it caused, if any, and
    /// whether the service started or stopped flapping (high/low hysteresis, in percent).
    pub fn observe_all(
        &mut self,
        up: bool,
        message: &str,
        th: Thresholds,
    ) -> (Option<Transition>, Option<FlapChange>) {
        self.history = ((self.history << 1) | up as u64) & ((1u64 << FLAP_WINDOW) - 1);
        self.history_len = (self.history_len + 1).min(FLAP_WINDOW);
        let mut flap = None;
        if let Some(percent) = percent_state_change(self.history, self.history_len) {
            if !self.flapping && percent > th.flap_high as f64 {
                self.flapping = true;
                flap = Some(FlapChange {
                    flapping: true,
                    percent,
                });
            } else if self.flapping && percent < th.flap_low as f64 {
                self.flapping = false;
                flap = Some(FlapChange {
                    flapping: false,
                    percent,
                });
            }
        }
        (self.observe(up, message, th), flap)
    }

    /// Feeds one result to the thresholds only (no flap history) and returns the transition.
    /// `message` is the check's message, quoted in the reason of a failure transition.
    pub fn observe(&mut self, up: bool, message: &str, th: Thresholds) -> Option<Transition> {
        let from = self.state;
        let (to, reason) = if up {
            self.consecutive_successes = self.consecutive_successes.saturating_add(1);
            self.consecutive_failures = 0;
            match from {
                State::Down if self.consecutive_successes >= th.recover_after => (
                    State::Healthy,
                    format!(
                        "{} consecutive successes (recover_after {})",
                        self.consecutive_successes, th.recover_after
                    ),
                ),
                State::Down => return None,
                State::Unknown | State::Failing => (State::Healthy, "check succeeded".to_string()),
                State::Healthy => return None,
            }
        } else {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            self.consecutive_successes = 0;
            let n = self.consecutive_failures;
            match from {
                State::Down => return None,
                _ if n >= th.after => (
                    State::Down,
                    format!("{n} consecutive failures (after {}): {message}", th.after),
                ),
                State::Failing => return None,
                State::Unknown | State::Healthy => (
                    State::Failing,
                    format!("{n} of {} failures: {message}", th.after),
                ),
            }
        };
        self.state = to;
        Some(Transition { from, to, reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TH: Thresholds = Thresholds {
        after: 3,
        recover_after: 2,
        flap_high: 50,
        flap_low: 25,
    };

    fn run(t: &mut Tracker, seq: &str) -> Vec<State> {
        seq.chars()
            .map(|c| {
                t.observe(c == '+', "boom", TH);
                t.state
            })
            .collect()
    }

    #[test]
    fn first_success_makes_healthy() {
        let mut t = Tracker::default();
        let tr = t.observe(true, "", TH).unwrap();
        assert_eq!((tr.from, tr.to), (State::Unknown, State::Healthy));
    }

    #[test]
    fn down_after_threshold_and_healthy_after_recovery_threshold() {
        use State::*;
        let mut t = Tracker::default();
        assert_eq!(
            run(&mut t, "+---+--++"),
            vec![
                Healthy, Failing, Failing, Down, Down, Down, Down, Down, Healthy
            ]
        );
        assert_eq!(t.consecutive_successes, 2);
        assert_eq!(t.consecutive_failures, 0);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        use State::*;
        let mut t = Tracker::default();
        assert_eq!(
            run(&mut t, "+--+--+"),
            vec![
                Healthy, Failing, Failing, Healthy, Failing, Failing, Healthy
            ]
        );
    }

    #[test]
    fn threshold_of_one_goes_down_at_once() {
        let mut t = Tracker::default();
        let th = Thresholds {
            after: 1,
            recover_after: 1,
            ..TH
        };
        let tr = t.observe(false, "refused", th).unwrap();
        assert_eq!(tr.to, State::Down);
        assert!(tr.reason.contains("refused"), "{}", tr.reason);
        assert_eq!(t.observe(true, "", th).unwrap().to, State::Healthy);
    }

    #[test]
    fn failures_while_down_make_no_transition() {
        let mut t = Tracker::default();
        run(&mut t, "---");
        assert_eq!(t.state, State::Down);
        assert_eq!(t.observe(false, "x", TH), None);
        assert_eq!(t.consecutive_failures, 4);
    }

    fn feed(t: &mut Tracker, seq: &str) -> Vec<FlapChange> {
        seq.chars()
            .filter_map(|c| t.observe_all(c == '+', "x", TH).1)
            .collect()
    }

    #[test]
    fn percent_state_change_weights_recent_changes_more() {
        // Steady: no change.
        assert_eq!(percent_state_change((1 << 21) - 1, 21), Some(0.0));
        // Alternating: every pair changes: 100 %.
        let alt = (0..21).fold(0u64, |h, i| (h << 1) | (i % 2));
        assert!((percent_state_change(alt, 21).unwrap() - 100.0).abs() < 1e-9);
        // One change, newest pair (weight 1.2) vs oldest pair (weight 0.8).
        let newest = ((1u64 << 21) - 1) & !1; // all up but the newest
        let oldest = (1u64 << 20) - 1; // all up but the oldest
        assert!((percent_state_change(newest, 21).unwrap() - 6.0).abs() < 1e-9);
        assert!((percent_state_change(oldest, 21).unwrap() - 4.0).abs() < 1e-9);
        assert_eq!(percent_state_change(0, 20), None);
    }

    #[test]
    fn flapping_starts_above_high_and_stops_below_low() {
        let mut t = Tracker::default();
        // 21 results alternating: flapping starts once the window is full.
        let changes = feed(&mut t, "+-+-+-+-+-+-+-+-+-+-+");
        assert_eq!(changes.len(), 1);
        assert!(changes[0].flapping && changes[0].percent > 50.0);
        assert!(t.flapping);
        // Still above the low threshold for a while: no change (hysteresis).
        assert!(feed(&mut t, "+++++").is_empty());
        assert!(t.flapping);
        // Steady for long enough: it stops.
        let changes = feed(&mut t, "++++++++++++++++");
        assert_eq!(changes.len(), 1);
        assert!(!changes[0].flapping && changes[0].percent < 25.0);
    }

    #[test]
    fn a_steady_failure_is_down_not_flapping() {
        let mut t = Tracker::default();
        assert!(feed(&mut t, "+++++++++++++++++++++---------------------").is_empty());
        assert_eq!(t.state, State::Down);
        assert!(!t.flapping);
    }
}
