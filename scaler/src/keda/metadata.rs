//! A KEDA trigger's `scalerMetadata`: which service, which metric, the target and the activation
//! threshold. Every error names the key, the value and what is allowed; keys Surge does not use
//! (KEDA also passes `scalerAddress`, TLS settings) are ignored.

use std::collections::HashMap;

use crate::view::ServiceView;

pub const SERVICE: &str = "service";
pub const METRIC: &str = "metric";
pub const TARGET: &str = "target";
pub const ACTIVATION_THRESHOLD: &str = "activationThreshold";

/// A metric a trigger can scale on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Rps,
    Concurrency,
    InFlight,
    LatencyP50Ms,
    LatencyP90Ms,
    LatencyP99Ms,
}

impl Metric {
    pub const ALL: [Metric; 6] = [
        Metric::Rps,
        Metric::Concurrency,
        Metric::InFlight,
        Metric::LatencyP50Ms,
        Metric::LatencyP90Ms,
        Metric::LatencyP99Ms,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Rps => "rps",
            Metric::Concurrency => "concurrency",
            Metric::InFlight => "in_flight",
            Metric::LatencyP50Ms => "latency_p50_ms",
            Metric::LatencyP90Ms => "latency_p90_ms",
            Metric::LatencyP99Ms => "latency_p99_ms",
        }
    }

    /// The metric's current value in a service's view: the same figures as /api/v1/services
    /// (latency is 0 when no request finished in the last interval).
    pub fn value(self, v: &ServiceView) -> f64 {
        let f = &v.figures;
        match self {
            Metric::Rps => f.request_rate,
            Metric::Concurrency => f.concurrency,
            Metric::InFlight => f.in_flight as f64,
            Metric::LatencyP50Ms => v.latency.map_or(0.0, |l| l.p50_ms),
            Metric::LatencyP90Ms => v.latency.map_or(0.0, |l| l.p90_ms),
            Metric::LatencyP99Ms => v.latency.map_or(0.0, |l| l.p99_ms),
        }
    }
}

/// A parsed trigger.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    pub service: String,
    pub metric: Metric,
    /// Required by GetMetricSpec only; validated whenever present.
    pub target: Option<f64>,
    /// Active when the metric is above this (KEDA's activationThreshold; default 0).
    pub activation_threshold: f64,
}

impl Trigger {
    /// The metric's name as KEDA sees it (KEDA prefixes it with the trigger's index).
    pub fn metric_name(&self) -> String {
        format!("surge-{}-{}", self.service, self.metric.name().replace('_', "-"))
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetadataError {
    #[error("scalerMetadata.service is missing: it must name a Surge service")]
    MissingService,
    #[error("no service named {name:?} (known: {known})")]
    UnknownService { name: String, known: String },
    #[error("scalerMetadata.metric = {value:?}: must be one of {allowed}")]
    BadMetric { value: String, allowed: String },
    #[error("scalerMetadata.target is missing: it must be a number greater than 0")]
    MissingTarget,
    #[error("scalerMetadata.target = {value:?}: must be a number greater than 0")]
    BadTarget { value: String },
    #[error("scalerMetadata.activationThreshold = {value:?}: must be a number of 0 or more")]
    BadActivationThreshold { value: String },
}

impl From<MetadataError> for tonic::Status {
    fn from(e: MetadataError) -> Self {
        match e {
            MetadataError::UnknownService { .. } => tonic::Status::not_found(e.to_string()),
            _ => tonic::Status::invalid_argument(e.to_string()),
        }
    }
}

/// A finite number, or None.
fn number(text: &str) -> Option<f64> {
    text.trim().parse::<f64>().ok().filter(|x| x.is_finite())
}

/// Parses `metadata` against the declared service names (`known`, in declaration order).
pub fn parse(metadata: &HashMap<String, String>, known: &[String]) -> Result<Trigger, MetadataError> {
    let service = metadata
        .get(SERVICE)
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .ok_or(MetadataError::MissingService)?;
    if !known.iter().any(|k| k == service) {
        return Err(unknown_service(service, known));
    }
    let metric = match metadata.get(METRIC).map(|s| s.trim()) {
        None | Some("") => Metric::Rps,
        Some(m) => {
            Metric::ALL
                .into_iter()
                .find(|x| x.name() == m)
                .ok_or_else(|| MetadataError::BadMetric {
                    value: m.to_string(),
                    allowed: Metric::ALL.map(Metric::name).join(", "),
                })?
        }
    };
    let target = match metadata.get(TARGET) {
        None => None,
        Some(t) => Some(
            number(t)
                .filter(|x| *x > 0.0)
                .ok_or_else(|| MetadataError::BadTarget { value: t.clone() })?,
        ),
    };
    let activation_threshold = match metadata.get(ACTIVATION_THRESHOLD) {
        None => 0.0,
        Some(a) => number(a)
            .filter(|x| *x >= 0.0)
            .ok_or_else(|| MetadataError::BadActivationThreshold { value: a.clone() })?,
    };
    Ok(Trigger {
        service: service.to_string(),
        metric,
        target,
        activation_threshold,
    })
}

/// The NOT_FOUND error for a service name, listing the declared ones.
pub fn unknown_service(name: &str, known: &[String]) -> MetadataError {
    MetadataError::UnknownService {
        name: name.to_string(),
        known: if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        },
    }
}

#[cfg(test)]
mod tests;
