//! The agent's clock, injected wherever time is read. The kernel programs stamp events with
//! `bpf_ktime_get_ns`, which is CLOCK_MONOTONIC, so reports use that clock too.

/// A source of the two timestamps a report carries.
pub trait Clock: Send + Sync + 'static {
    /// CLOCK_MONOTONIC in nanoseconds: the kernel programs' clock.
    fn monotonic_ns(&self) -> u64;
    /// Wall-clock Unix time in milliseconds, for display.
    fn unix_ms(&self) -> i64;
}

/// The machine's clocks.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn monotonic_ns(&self) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    fn unix_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}
