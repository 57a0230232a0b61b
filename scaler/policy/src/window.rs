//! Time-windowed aggregation that takes `now`: bucketed averages and sliding max/min of counts.

use std::collections::VecDeque;
use std::time::Duration;

use crate::time::{millis, Timestamp};

/// Most buckets a window keeps; longer windows use coarser buckets.
pub const MAX_BUCKETS: u64 = 120;

/// Averages of recorded values over a trailing window, in fixed buckets (Knative's
/// `TimedFloat64Buckets`). A bucket holding several samples counts as their mean; buckets without
/// samples are unknown and left out (sources report zeros when there is no traffic).
#[derive(Clone, Debug)]
pub struct Window {
    granularity_ms: u64,
    sums: Box<[f64]>,
    counts: Box<[u32]>,
    last_bucket: Option<u64>,
}

impl Window {
    /// A window of `length`, with 1 s buckets or coarser so that it holds at most
    /// [`MAX_BUCKETS`] buckets.
    pub fn new(length: Duration) -> Self {
        let len_ms = millis(length).max(1000);
        let granularity_ms = len_ms.div_ceil(MAX_BUCKETS).div_ceil(1000).max(1) * 1000;
        let n = len_ms.div_ceil(granularity_ms).max(1) as usize;
        Window {
            granularity_ms,
            sums: vec![0.0; n].into_boxed_slice(),
            counts: vec![0; n].into_boxed_slice(),
            last_bucket: None,
        }
    }

    /// The whole window's length.
    pub fn length(&self) -> Duration {
        Duration::from_millis(self.granularity_ms * self.sums.len() as u64)
    }

    /// Records `value` observed at `now`. Samples older than the window are dropped.
    pub fn record(&mut self, now: Timestamp, value: f64) {
        if !value.is_finite() {
            return;
        }
        let b = now.as_millis() / self.granularity_ms;
        let n = self.sums.len() as u64;
        match self.last_bucket {
            Some(last) if b > last => {
                // Clear the buckets skipped since the last write (at most the whole ring).
                let clear = (b - last).min(n);
                for k in 0..clear {
                    let i = ((b - k) % n) as usize;
                    self.sums[i] = 0.0;
                    self.counts[i] = 0;
                }
                self.last_bucket = Some(b);
            }
            Some(last) if last - b >= n => return,
            Some(_) => {}
            None => {
                self.last_bucket = Some(b);
            }
        }
        let i = (b % n) as usize;
        self.sums[i] += value;
        self.counts[i] += 1;
    }

    /// Mean over the trailing `span` ending at `now` (whole window if `span` is longer), or
    /// `None` when no sample falls in it.
    pub fn average(&self, now: Timestamp, span: Duration) -> Option<f64> {
        let last = self.last_bucket?;
        let n = self.sums.len() as u64;
        let b = now.as_millis() / self.granularity_ms;
        let span_buckets = millis(span).div_ceil(self.granularity_ms).clamp(1, n);
        let oldest = b.saturating_sub(span_buckets - 1);
        let (mut total, mut used) = (0.0, 0u32);
        // Buckets newer than the last write are empty; older than the ring are gone.
        let hi = b.min(last);
        let lo = oldest.max(last.saturating_sub(n - 1));
        if hi < lo {
            return None;
        }
        for bucket in lo..=hi {
            let i = (bucket % n) as usize;
            if self.counts[i] > 0 {
                total += self.sums[i] / f64::from(self.counts[i]);
                used += 1;
            }
        }
        (used > 0).then(|| total / f64::from(used))
    }
}

/// The largest (or smallest) count seen over a trailing span, kept as a monotonic deque so each
/// observation costs O(1) amortized. Used for HPA stabilization and Knative's scale-down delay.
#[derive(Clone, Debug, Default)]
pub struct Extremum {
    keep_max: bool,
    items: VecDeque<(Timestamp, u32)>,
}

impl Extremum {
    /// Tracks the maximum.
    pub fn max() -> Self {
        Extremum {
            keep_max: true,
            items: VecDeque::new(),
        }
    }

    /// Tracks the minimum.
    pub fn min() -> Self {
        Extremum {
            keep_max: false,
            items: VecDeque::new(),
        }
    }

    /// Adds `v` observed at `now` and returns the extremum of the values observed strictly after
    /// `now - span`, `v` included.
    pub fn observe(&mut self, now: Timestamp, v: u32, span: Duration) -> u32 {
        while self.items.front().is_some_and(|&(t, _)| t + span <= now) {
            self.items.pop_front();
        }
        while let Some(&(_, back)) = self.items.back() {
            let dominated = if self.keep_max { back <= v } else { back >= v };
            if !dominated {
                break;
            }
            self.items.pop_back();
        }
        self.items.push_back((now, v));
        self.items.front().map_or(v, |&(_, x)| x)
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.items.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> Timestamp {
        Timestamp::from_secs(s)
    }

    #[test]
    fn averages_over_stable_and_panic_spans() {
        let mut w = Window::new(Duration::from_secs(60));
        assert_eq!(w.length(), Duration::from_secs(60));
        for s in 0..54 {
            w.record(t(s), 100.0);
        }
        for s in 54..60 {
            w.record(t(s), 400.0);
        }
        assert_eq!(w.average(t(59), Duration::from_secs(6)), Some(400.0));
        assert_eq!(w.average(t(59), Duration::from_secs(60)), Some(130.0));
        // Sixty seconds later the old samples have left the window.
        for s in 60..120 {
            w.record(t(s), 10.0);
        }
        assert_eq!(w.average(t(119), Duration::from_secs(60)), Some(10.0));
    }

    #[test]
    fn several_samples_in_a_bucket_count_as_their_mean() {
        let mut w = Window::new(Duration::from_secs(10));
        w.record(Timestamp::from_millis(100), 10.0);
        w.record(Timestamp::from_millis(600), 30.0);
        w.record(Timestamp::from_millis(1100), 50.0);
        assert_eq!(
            w.average(Timestamp::from_millis(1200), Duration::from_secs(10)),
            Some(35.0)
        );
    }

    #[test]
    fn gaps_and_old_data() {
        let mut w = Window::new(Duration::from_secs(10));
        assert_eq!(w.average(t(5), Duration::from_secs(10)), None);
        w.record(t(1), 5.0);
        assert_eq!(w.average(t(10), Duration::from_secs(10)), Some(5.0));
        assert_eq!(w.average(t(11), Duration::from_secs(10)), None);
        assert_eq!(w.average(t(30), Duration::from_secs(10)), None);
        w.record(t(40), 7.0);
        w.record(t(2), 100.0); // too old: dropped
        assert_eq!(w.average(t(40), Duration::from_secs(10)), Some(7.0));
    }

    #[test]
    fn long_windows_use_coarse_buckets() {
        let w = Window::new(Duration::from_secs(3600));
        assert_eq!(w.sums.len() as u64, MAX_BUCKETS);
        assert_eq!(w.length(), Duration::from_secs(3600));
    }

    #[test]
    fn extremum_slides() {
        let mut m = Extremum::max();
        let span = Duration::from_secs(10);
        assert_eq!(m.observe(t(0), 5, span), 5);
        assert_eq!(m.observe(t(3), 2, span), 5);
        assert_eq!(m.observe(t(9), 3, span), 5);
        assert_eq!(m.observe(t(10), 1, span), 3);
        let mut lo = Extremum::min();
        assert_eq!(lo.observe(t(0), 5, Duration::ZERO), 5);
        assert_eq!(lo.observe(t(1), 7, Duration::ZERO), 7);
    }
}
