//! Metric names as the scaler reports them (`rps`, `cpu`, `external:<name>`…) and HPA metric types.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One observed quantity of a service. The agents report the first eight; anything else is an
/// external metric (for example a Prometheus query) named `external:<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Requests per second, summed over all replicas.
    Rps,
    /// In-flight requests (time-weighted average), summed over all replicas.
    Concurrency,
    /// CPU utilization in percent of the requested CPU, averaged over ready replicas.
    Cpu,
    /// Memory utilization in percent of the requested memory, averaged over ready replicas.
    Memory,
    /// Median request latency in milliseconds.
    LatencyP50,
    /// 90th percentile request latency in milliseconds.
    LatencyP90,
    /// 99th percentile request latency in milliseconds.
    LatencyP99,
    /// Connections held by the agents for a service without a ready replica.
    HeldConnections,
    /// A metric from another source, e.g. a Prometheus query.
    External(Arc<str>),
}

impl Metric {
    /// Parses a metric name. Accepts Surge's names and the aliases used by KEDA, Knative and
    /// `ecommerce.yaml` style rules (`http_requests_per_second`, `cpu_usage`, …).
    pub fn parse(name: &str) -> Option<Metric> {
        let n = name.trim();
        if let Some(ext) = n.strip_prefix("external:") {
            return (!ext.is_empty()).then(|| Metric::External(ext.into()));
        }
        Some(match n {
            "rps" | "http_requests_per_second" | "requests_per_second" => Metric::Rps,
            "concurrency" | "in_flight_requests" => Metric::Concurrency,
            "cpu" | "cpu_usage" | "cpu_utilization" => Metric::Cpu,
            "memory" | "mem" | "memory_usage" | "mem_usage" | "memory_utilization" => Metric::Memory,
            "latency_p50" => Metric::LatencyP50,
            "latency_p90" => Metric::LatencyP90,
            "latency_p99" => Metric::LatencyP99,
            "held_connections" => Metric::HeldConnections,
            _ => return None,
        })
    }

    /// The canonical name.
    pub fn name(&self) -> &str {
        match self {
            Metric::Rps => "rps",
            Metric::Concurrency => "concurrency",
            Metric::Cpu => "cpu",
            Metric::Memory => "memory",
            Metric::LatencyP50 => "latency_p50",
            Metric::LatencyP90 => "latency_p90",
            Metric::LatencyP99 => "latency_p99",
            Metric::HeldConnections => "held_connections",
            Metric::External(n) => n,
        }
    }

    /// The metric type users mean when they do not say: utilization for CPU and memory, a
    /// plain value for latency, and KEDA's default (a per-replica average) for the rest.
    pub fn default_type(&self) -> MetricType {
        match self {
            Metric::Cpu | Metric::Memory => MetricType::Utilization,
            Metric::Rps | Metric::Concurrency | Metric::HeldConnections | Metric::External(_) => {
                MetricType::AverageValue
            }
            _ => MetricType::Value,
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Metric::External(n) => write!(f, "external:{n}"),
            other => f.write_str(other.name()),
        }
    }
}

impl Serialize for Metric {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Metric {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Metric::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown metric {s:?}")))
    }
}

/// How a metric value is compared with its target (the HPA/KEDA `metricType`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetricType {
    /// The service total divided by the target per replica: `ceil(total / target)`.
    AverageValue,
    /// The value itself against the target: `ceil(ready × value / target)`.
    Value,
    /// A percentage averaged over ready replicas: `ceil(ready × utilization / target)`.
    Utilization,
}

impl MetricType {
    /// Parses the documented spelling.
    pub fn parse(s: &str) -> Option<MetricType> {
        match s {
            "AverageValue" => Some(MetricType::AverageValue),
            "Value" => Some(MetricType::Value),
            "Utilization" => Some(MetricType::Utilization),
            _ => None,
        }
    }

    /// The replica count (not rounded) at which `value` would sit exactly on `target`.
    pub fn replicas_for(self, value: f64, target: f64, ready: u32) -> f64 {
        let ready = f64::from(ready.max(1));
        match self {
            MetricType::AverageValue => value / target,
            MetricType::Value | MetricType::Utilization => ready * value / target,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases() {
        assert_eq!(Metric::parse("http_requests_per_second"), Some(Metric::Rps));
        assert_eq!(Metric::parse("cpu_usage"), Some(Metric::Cpu));
        assert_eq!(
            Metric::parse("external:queue").map(|m| m.to_string()),
            Some("external:queue".to_string())
        );
        assert_eq!(Metric::parse("external:"), None);
        assert_eq!(Metric::parse("bogus"), None);
        assert_eq!(Metric::LatencyP99.to_string(), "latency_p99");
    }

    #[test]
    fn replica_formulas() {
        assert_eq!(MetricType::AverageValue.replicas_for(450.0, 100.0, 2), 4.5);
        assert_eq!(MetricType::Utilization.replicas_for(90.0, 60.0, 4), 6.0);
        assert_eq!(MetricType::Value.replicas_for(400.0, 200.0, 0), 2.0);
    }
}
