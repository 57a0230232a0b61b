//! Latency percentiles from the kernel's bucket counts, through an HdrHistogram: each bucket's
//! count is recorded at the bucket's midpoint, so a percentile is within half a bucket (≤ 6.25 %).

use hdrhistogram::Histogram;
use serde::Serialize;
use surge_common::latency::bounds_us;

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

/// The percentiles of the latencies counted in `buckets`, or None when they count nothing.
pub fn percentiles(buckets: &[u64]) -> Option<Percentiles> {
    let mut h = Histogram::<u64>::new(3).ok()?;
    let mut any = false;
    for (i, &n) in buckets.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let (lo, hi) = bounds_us(i);
        // Midpoint in nanoseconds, so sub-microsecond buckets are not rounded to zero.
        let mid_ns = (lo + hi) * 500;
        h.record_n(mid_ns.max(1), n).ok()?;
        any = true;
    }
    if !any {
        return None;
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e6;
    Some(Percentiles {
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
    })
}

#[cfg(test)]
mod tests {
    use surge_common::latency::{bucket_of, LATENCY_BUCKETS};

    use super::*;

    #[test]
    fn percentiles_land_in_the_right_buckets() {
        let mut b = vec![0u64; LATENCY_BUCKETS];
        b[bucket_of(20_000)] += 90; // 90 requests of 20 ms
        b[bucket_of(200_000)] += 10; // 10 requests of 200 ms
        let p = percentiles(&b).expect("counted");
        assert!((p.p50_ms - 20.0).abs() / 20.0 < 0.07, "{p:?}");
        assert!((p.p99_ms - 200.0).abs() / 200.0 < 0.07, "{p:?}");
    }

    #[test]
    fn nothing_counted_is_none() {
        assert_eq!(percentiles(&[0; 8]), None);
    }
}
