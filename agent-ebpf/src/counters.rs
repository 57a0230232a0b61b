//! Updates to the per-CPU service counters. Adds are atomic even on per-CPU memory: an ingress
//! softirq can interrupt an egress program on the same CPU, and a plain read-modify-write would
//! then lose a count. The BPF target has no `AtomicU64::fetch_add`, so the intrinsic (a BPF
//! `atomic add` instruction, whose result is unused: no fetch) is used directly.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use surge_common::{latency, ServiceCounters};

#[inline(always)]
pub fn add_u64(field: &mut u64, v: u64) {
    // SAFETY: `field` is a valid, aligned u64 in map memory.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, v) };
}

#[inline(always)]
pub fn add_i64(field: &mut i64, v: i64) {
    // SAFETY: as for `add_u64`.
    unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(field, v) };
}

/// Counts one latency into its bucket.
#[inline(always)]
pub fn record_latency(c: &mut ServiceCounters, latency_ns: u64) {
    let bucket = latency::bucket_of(latency_ns / 1000);
    if let Some(slot) = c.latency_buckets.get_mut(bucket) {
        add_u64(slot, 1);
    }
}
