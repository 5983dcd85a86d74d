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
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            state: State::Unknown,
            consecutive_failures: 0,
            consecutive_successes: 0,
        }
    }
}

/// A change of state and why it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub reason: String,
}

impl Tracker {
    /// Feeds one result (`up`: OK or WARNING) and returns the transition it caused, if any.
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
}
