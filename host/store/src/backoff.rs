//! Exponential backoff with jitter: the one retry pacing of the gateway (the uplink's
//! reconnects and registration, the firmware cache's upstream downloads).

use std::time::Duration;

/// Delays that double from `min` up to `max`, each drawn at random from the upper half
/// of the current step (so a fleet that lost its broker together does not return
/// together, and no delay is shorter than half a step).
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// A backoff from `min` to `max` (`max` is raised to `min` if smaller).
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            step: min,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step / 2;
        half + jitter(step - half)
    }

    /// Back to the first step (after a success).
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

/// A random duration in `[0, up_to]`.
pub fn jitter(up_to: Duration) -> Duration {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    let nanos = u64::try_from(up_to.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(u64::from_le_bytes(bytes) % (nanos + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_within_bounds_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(60));
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        let steps = [5u64, 10, 20, 40, 60, 60, 60, 60];
        for (delay, step) in delays.iter().zip(steps) {
            let step = Duration::from_secs(step);
            assert!(
                *delay >= step / 2 && *delay <= step,
                "{delay:?} for step {step:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_secs(5));
    }
}
