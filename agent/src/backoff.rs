//! Capped exponential backoff with jitter between connection attempts.

use std::time::Duration;

use rand::Rng;

/// Delays grow from `initial`, doubling up to `max`; each delay is drawn from [75 %, 100 %] of the
/// current step so that many agents restarted together do not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        let max = max.max(initial);
        Backoff {
            initial,
            max,
            step: initial,
        }
    }

    /// Back to `initial` (after a connection was established).
    pub fn reset(&mut self) {
        self.step = self.initial;
    }

    /// The next delay, with random jitter.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(rand::rng().random_range(0.0..=1.0))
    }

    /// The next delay for a jitter draw `r` in [0, 1]: `step * (1 - r/4)`; then the step doubles
    /// (capped at `max`).
    pub fn next_delay_with(&mut self, r: f64) -> Duration {
        let r = r.clamp(0.0, 1.0);
        let delay = self.step.mul_f64(1.0 - r / 4.0);
        self.step = self.step.saturating_mul(2).min(self.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn doubles_up_to_the_cap() {
        let mut b = Backoff::new(S(1), S(60));
        let steps: Vec<Duration> = (0..9).map(|_| b.next_delay_with(0.0)).collect();
        assert_eq!(
            steps,
            [S(1), S(2), S(4), S(8), S(16), S(32), S(60), S(60), S(60)]
        );
    }

    #[test]
    fn jitter_stays_within_75_to_100_percent() {
        let mut b = Backoff::new(S(4), S(4));
        assert_eq!(b.next_delay_with(1.0), S(3));
        assert_eq!(b.next_delay_with(0.0), S(4));
        for _ in 0..1000 {
            let d = b.next_delay();
            assert!(d >= S(3) && d <= S(4), "{d:?}");
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(S(1), S(60));
        for _ in 0..5 {
            b.next_delay_with(0.0);
        }
        b.reset();
        assert_eq!(b.next_delay_with(0.0), S(1));
        assert_eq!(b.next_delay_with(0.0), S(2));
    }

    #[test]
    fn never_exceeds_max_even_with_odd_settings() {
        let mut b = Backoff::new(S(50), S(60));
        for _ in 0..100 {
            assert!(b.next_delay() <= S(60));
        }
        // max below initial is raised to initial.
        let mut b = Backoff::new(S(5), S(1));
        assert_eq!(b.next_delay_with(0.0), S(5));
        assert_eq!(b.next_delay_with(0.0), S(5));
    }
}
