//! Exponential backoff between reconnection attempts, with jitter so a fleet of agents does not
//! reconnect in step after the scaler comes back.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay: doubles up to `max`, with up to 20 % taken off at random (`jitter` in 0..1).
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        d.mul_f64(1.0 - 0.2 * jitter.clamp(0.0, 1.0))
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let got: Vec<_> = (0..5).map(|_| b.next_delay(0.0).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_millis(80));
    }
}
