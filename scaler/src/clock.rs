//! The scaler's clock, injected into everything that reads time so tests run on a fake one.

use std::time::{Duration, Instant};

pub trait Clock: Send + Sync + 'static {
    /// Time since an arbitrary fixed origin; only differences mean anything.
    fn now(&self) -> Duration;

    /// Wall-clock Unix time in milliseconds: only to compare with agents' report stamps.
    fn unix_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// The machine's monotonic clock, measured from when this value was made.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}
