//! Turns the merged figures of a service into policy samples: the adapter between what the agents
//! measure and the metric names policies use.

use surge_policy::{Metric, Sample};

use crate::{catalog::Requests, ingest::ServiceFigures, latency::percentiles};

/// The samples a policy can use for a service now. `ready` replicas are the denominators of
/// utilization. A service no agent has reported yet gives no samples (no data, not zero).
pub fn samples(figures: Option<&ServiceFigures>, requests: &Requests, ready: u32) -> Vec<(Metric, Sample)> {
    let Some(f) = figures else { return Vec::new() };
    let mut out = vec![
        (Metric::Rps, Sample::Value(f.request_rate)),
        (Metric::Concurrency, Sample::Value(f.concurrency)),
        (Metric::HeldConnections, Sample::Value(f.held_connections as f64)),
    ];
    if let Some(p) = percentiles(&f.recent_latency_buckets) {
        out.push((Metric::LatencyP50, Sample::Value(p.p50_ms)));
        out.push((Metric::LatencyP90, Sample::Value(p.p90_ms)));
        out.push((Metric::LatencyP99, Sample::Value(p.p99_ms)));
    }
    // CPU and memory utilization (Metric::Cpu / Metric::Memory) join here once ingest merges
    // the agents' cpu_seconds and memory_bytes; `requests` and `ready` are their denominators.
    let _ = (requests, ready);
    out
}
