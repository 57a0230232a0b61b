//! The kernel's log-linear latency buckets as a Prometheus histogram. Every `le` bound is a
//! kernel bucket edge, so the cumulative counts are exact: 1, 2, 4 and 8 µs, then two bounds per
//! power of two (1.5·2^k and 2^(k+1) µs) up to ~201 s; the kernel's last, open-ended bucket is
//! `+Inf`. 54 series per service, instead of the kernel's 208 buckets.

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::MetricType,
};
use surge_common::latency::{bounds_us, LATENCY_BUCKETS};

/// Whether kernel bucket `i`'s upper edge is an exposed `le` bound.
fn exposed(i: usize) -> bool {
    if i + 1 >= LATENCY_BUCKETS {
        return false;
    }
    if i < 8 {
        return (i + 1).is_power_of_two();
    }
    i % 8 == 3 || i % 8 == 7
}

/// A histogram built at scrape time from cumulative kernel bucket counts.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyHistogram {
    sum_seconds: f64,
    count: u64,
    /// (upper bound in seconds, count in this bound but not the previous one); the last is +Inf.
    buckets: Vec<(f64, u64)>,
}

impl LatencyHistogram {
    /// From the kernel's bucket counts (missing buckets count 0) and the sum of latencies.
    pub fn from_kernel(kernel: &[u64], sum_seconds: f64) -> Self {
        let mut buckets = Vec::with_capacity(64);
        let mut acc = 0u64;
        let mut count = 0u64;
        for i in 0..LATENCY_BUCKETS {
            let n = kernel.get(i).copied().unwrap_or(0);
            acc += n;
            count += n;
            if exposed(i) {
                buckets.push((bounds_us(i).1 as f64 / 1e6, acc));
                acc = 0;
            }
        }
        buckets.push((f64::INFINITY, acc));
        Self {
            sum_seconds,
            count,
            buckets,
        }
    }

    /// Cumulative count at each bound, as Prometheus shows it.
    #[cfg(test)]
    fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut acc = 0;
        self.buckets
            .iter()
            .map(|&(le, n)| {
                acc += n;
                (le, acc)
            })
            .collect()
    }
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum_seconds, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use surge_common::latency::bucket_of;

    use super::*;

    #[test]
    fn counts_are_exact_at_every_bound() {
        let mut k = vec![0u64; LATENCY_BUCKETS];
        k[bucket_of(20_000)] += 90; // 20 ms
        k[bucket_of(200_000)] += 10; // 200 ms
        k[LATENCY_BUCKETS - 1] += 1; // beyond the last bound
        let h = LatencyHistogram::from_kernel(&k, 3.8);
        assert_eq!(h.count, 101);
        let c = h.cumulative();
        // 20 ms lies in [16.384, 24.576) ms: every bound up to 16.384 ms counts 0, from 24.576 on 90.
        let at = |le: f64| c.iter().find(|(b, _)| (*b - le).abs() < 1e-12).map(|x| x.1);
        assert_eq!(at(0.016384), Some(0));
        assert_eq!(at(0.024576), Some(90));
        assert_eq!(at(0.131072), Some(90));
        assert_eq!(at(0.262144), Some(100));
        assert_eq!(c.last(), Some(&(f64::INFINITY, 101)));
        assert!(c.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{c:?}");
    }

    #[test]
    fn bounds_are_kernel_edges_from_a_microsecond_to_three_minutes() {
        let h = LatencyHistogram::from_kernel(&[], 0.0);
        let les: Vec<f64> = h.buckets.iter().map(|b| b.0).collect();
        assert_eq!(&les[..6], &[1e-6, 2e-6, 4e-6, 8e-6, 12e-6, 16e-6]);
        assert_eq!(les[les.len() - 2], 201.326592);
        assert_eq!(les.len(), 54);
        assert_eq!(h.count, 0);
    }
}
