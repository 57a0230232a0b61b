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
    // Utilization, as the HPA defines it: percent of what the ready replicas asked for. Without a
    // request per replica (cpu_request / memory_request) there is no utilization to report.
    if ready > 0 {
        if let Some(cores) = requests.cpu_cores {
            out.push((
                Metric::Cpu,
                Sample::Value(100.0 * f.cpu_cores / (cores * ready as f64)),
            ));
        }
        if let Some(bytes) = requests.memory_bytes {
            let used = f.memory_bytes as f64;
            out.push((
                Metric::Memory,
                Sample::Value(100.0 * used / (bytes as f64 * ready as f64)),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(samples: &[(Metric, Sample)], m: Metric) -> Option<f64> {
        samples.iter().find(|(k, _)| *k == m).and_then(|(_, s)| match s {
            Sample::Value(v) => Some(*v),
            Sample::Failed => None,
        })
    }

    #[test]
    fn utilization_is_a_percentage_of_what_ready_replicas_asked_for() {
        let f = ServiceFigures {
            cpu_cores: 0.9,
            memory_bytes: 600 << 20,
            ..Default::default()
        };
        let req = Requests {
            cpu_cores: Some(0.5),
            memory_bytes: Some(512 << 20),
        };
        let s = samples(Some(&f), &req, 3);
        assert_eq!(value(&s, Metric::Cpu), Some(60.0));
        assert_eq!(
            value(&s, Metric::Memory).map(|v| (v * 1000.0).round() / 1000.0),
            Some(39.063)
        );
    }

    #[test]
    fn no_request_or_no_ready_replica_means_no_utilization() {
        let f = ServiceFigures {
            cpu_cores: 0.9,
            ..Default::default()
        };
        assert_eq!(
            value(&samples(Some(&f), &Requests::default(), 3), Metric::Cpu),
            None
        );
        let req = Requests {
            cpu_cores: Some(0.5),
            memory_bytes: None,
        };
        assert_eq!(value(&samples(Some(&f), &req, 0), Metric::Cpu), None);
        assert!(
            samples(None, &req, 3).is_empty(),
            "no report yet: no samples at all"
        );
    }
}
