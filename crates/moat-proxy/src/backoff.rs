//! Retry delays toward the control plane: doubling from a first step up to a cap, each one
//! spread by ±25 % so a fleet that lost the control plane together does not return in lockstep.

use std::time::Duration;

use rand::Rng as _;

#[derive(Debug)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    step: Duration,
}

impl Backoff {
    /// Starts at `first`, doubles after every delay, never above `cap`.
    pub fn new(first: Duration, cap: Duration) -> Self {
        Backoff {
            first,
            cap,
            step: first,
        }
    }

    /// The delay before the next attempt: the current step, ±25 %; the step then grows.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.step.mul_f64(rand::rng().random_range(0.75..1.25));
        self.step = (self.step * 2).min(self.cap);
        delay
    }

    /// Back to the first step, after a success.
    pub fn reset(&mut self) {
        self.step = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_a_quarter_of_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let steps: Vec<u64> = (0..5).map(|_| b.next_delay().as_millis() as u64).collect();
        for (got, step) in steps.iter().zip([100, 200, 400, 500, 500]) {
            assert!(
                (step * 3 / 4..=step * 5 / 4).contains(got),
                "{got} ms for a {step} ms step"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }
}
