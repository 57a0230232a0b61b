//! How long held connections waited, from accept until they were handed to a replica, timed
//! out, or ended: a cumulative histogram in the kernel's latency bucket layout
//! (surge_common::latency), so the scaler merges and exposes it like request latency.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use surge_common::latency::{bucket_of, LATENCY_BUCKETS};

/// Lock-free: every held connection records once, the report reads whenever it likes.
#[derive(Debug)]
pub struct WaitHistogram {
    buckets: Box<[AtomicU64]>,
    micros_sum: AtomicU64,
}

impl Default for WaitHistogram {
    fn default() -> Self {
        Self {
            buckets: (0..LATENCY_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            micros_sum: AtomicU64::new(0),
        }
    }
}

impl WaitHistogram {
    /// Counts one wait.
    pub fn record(&self, waited: Duration) {
        let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        self.micros_sum.fetch_add(us, Ordering::Relaxed);
        // Release: whoever sees the count also sees the sum.
        self.buckets[bucket_of(us)].fetch_add(1, Ordering::Release);
    }

    /// The cumulative counts without their trailing empty buckets (the wire may leave them
    /// out), and the sum of the waits in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        let mut counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Acquire)).collect();
        while counts.last() == Some(&0) {
            counts.pop();
        }
        let sum = self.micros_sum.load(Ordering::Relaxed) as f64 / 1e6;
        (counts, sum)
    }

    /// Waits counted so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Acquire)).sum()
    }
}

#[cfg(test)]
mod tests {
    use surge_common::latency::bounds_us;

    use super::*;

    #[test]
    fn each_wait_lands_in_its_bucket_and_the_sum_is_exact() {
        let h = WaitHistogram::default();
        assert_eq!(h.snapshot(), (vec![], 0.0));
        h.record(Duration::from_millis(2_000));
        h.record(Duration::from_millis(2_003));
        h.record(Duration::from_micros(150));
        let (counts, sum) = h.snapshot();
        assert_eq!(h.count(), 3);
        assert_eq!(counts.iter().sum::<u64>(), 3);
        assert_eq!(counts.len(), bucket_of(2_003_000) + 1, "no trailing empty bucket");
        let (lo, hi) = bounds_us(bucket_of(150));
        assert!(lo <= 150 && 150 < hi);
        assert_eq!(counts[bucket_of(150)], 1);
        // 2 s and 2.003 s share the bucket [1.966, 2.097) s.
        assert_eq!(bucket_of(2_000_000), bucket_of(2_003_000));
        assert_eq!(counts[bucket_of(2_000_000)], 2);
        assert!((sum - 4.00315).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn waits_beyond_the_last_bound_are_counted_in_the_last_bucket() {
        let h = WaitHistogram::default();
        h.record(Duration::from_secs(100_000));
        let (counts, _) = h.snapshot();
        assert_eq!(counts.len(), LATENCY_BUCKETS);
        assert_eq!(counts[LATENCY_BUCKETS - 1], 1);
    }
}
