//! The latency buckets the kernel fills and the scaler reads: log-linear, like HdrHistogram with
//! 3 significant bits. Microseconds below 8 have a bucket each; above, every power of two is cut
//! into 8 equal sub-buckets, so a bucket is at most 12.5 % of its value wide and its midpoint is
//! within 6.25 % of any value in it. The last bucket also holds everything beyond ~268 s.

/// Sub-buckets per power of two, as bits.
pub const SUB_BITS: u32 = 3;
const SUBS: u64 = 1 << SUB_BITS;
/// Highest power of two (in µs) with its own buckets: 2^27 µs ≈ 134 s.
const MAX_OCTAVE: u32 = 27;
/// Number of buckets.
pub const LATENCY_BUCKETS: usize = ((MAX_OCTAVE - SUB_BITS + 2) as usize) * SUBS as usize;

/// The bucket of a latency in microseconds.
#[inline(always)]
pub fn bucket_of(us: u64) -> usize {
    if us < SUBS {
        return us as usize;
    }
    let msb = 63 - us.leading_zeros();
    let sub = (us >> (msb - SUB_BITS)) & (SUBS - 1);
    let idx = ((msb - SUB_BITS + 1) as u64 * SUBS + sub) as usize;
    if idx >= LATENCY_BUCKETS {
        LATENCY_BUCKETS - 1
    } else {
        idx
    }
}

/// The range `[low, high)` of a bucket, in microseconds.
pub fn bounds_us(bucket: usize) -> (u64, u64) {
    let b = bucket as u64;
    if b < SUBS {
        return (b, b + 1);
    }
    let octave = b / SUBS - 1 + SUB_BITS as u64;
    let sub = b % SUBS;
    let width = 1u64 << (octave - SUB_BITS as u64);
    let low = (1u64 << octave) + sub * width;
    (low, low + width)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_falls_inside_its_bucket() {
        let mut us = 0u64;
        while us < (1 << (MAX_OCTAVE + 1)) {
            let b = bucket_of(us);
            let (lo, hi) = bounds_us(b);
            assert!(lo <= us && us < hi, "{us} in bucket {b} = [{lo}, {hi})");
            us = us * 9 / 8 + 1;
        }
    }

    #[test]
    fn buckets_are_contiguous_and_narrow() {
        for b in 1..LATENCY_BUCKETS {
            assert_eq!(bounds_us(b - 1).1, bounds_us(b).0, "gap before bucket {b}");
            let (lo, hi) = bounds_us(b);
            assert!((hi - lo) * 8 <= lo.max(8), "bucket {b} [{lo}, {hi}) is too wide");
        }
    }

    #[test]
    fn twenty_milliseconds_is_measured_within_seven_percent() {
        let (lo, hi) = bounds_us(bucket_of(20_000));
        let mid = (lo + hi) as f64 / 2.0;
        assert!((mid - 20_000.0).abs() / 20_000.0 < 0.07, "[{lo}, {hi})");
    }

    #[test]
    fn huge_values_land_in_the_last_bucket() {
        assert_eq!(bucket_of(u64::MAX / 4), LATENCY_BUCKETS - 1);
    }
}
