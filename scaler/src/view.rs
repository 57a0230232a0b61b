//! The per-service view shared by the JSON API and /metrics: the catalog's declaration joined
//! with the merged figures at one instant.

use serde::Serialize;

use surge_policy::Decision;

use crate::{
    catalog::{Mode, ServiceSpec},
    control::{ControlStatus, ReplicaCounts},
    ingest::{Ingest, NodeStatus, ServiceFigures},
    latency::{percentiles, Percentiles},
    state::Shared,
};

#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    pub name: String,
    pub mode: Mode,
    pub endpoints: Vec<String>,
    /// Whether any agent has reported this service yet.
    pub reported: bool,
    /// The merged figures; request figures are null when `requests_available` is false.
    #[serde(flatten, serialize_with = "masked")]
    pub figures: ServiceFigures,
    /// Latency percentiles over the last report interval; null when no request finished in it.
    pub latency: Option<Percentiles>,
    /// How long held connections waited for a ready replica (the cold-start delay clients
    /// saw), over every hold so far; null when no connection was ever held.
    pub hold_duration: Option<Percentiles>,
    /// The policy that decides its replicas, if any.
    pub policy: Option<String>,
    /// Replicas desired (by the last decision), asked for, and ready.
    pub replicas: Option<ReplicaCounts>,
    /// The last decision, with its mode, inputs, limits and reason.
    pub last_decision: Option<Decision>,
    /// Why the service is not being controlled right now, if it is not.
    pub control_error: Option<String>,
    /// Decisions ever taken, by mode.
    pub decisions_by_mode: std::collections::BTreeMap<String, u64>,
    /// Metric sources (Prometheus queries) of its policy that are failing, one line each.
    pub source_errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub services: Vec<ServiceView>,
    pub nodes: Vec<NodeStatus>,
}

fn view(
    spec: &ServiceSpec,
    ingest: &Ingest,
    control: Option<ControlStatus>,
    now: std::time::Duration,
) -> ServiceView {
    let control = control.unwrap_or_default();
    let figures = ingest.figures(&spec.name, now);
    let latency = figures
        .as_ref()
        .and_then(|f| percentiles(&f.recent_latency_buckets));
    let hold_duration = figures
        .as_ref()
        .and_then(|f| percentiles(&f.hold_duration_buckets));
    ServiceView {
        name: spec.name.clone(),
        mode: spec.mode,
        endpoints: spec.endpoints.iter().map(|e| e.to_string()).collect(),
        reported: figures.is_some(),
        figures: figures.unwrap_or_else(|| ServiceFigures {
            requests_available: true,
            ..Default::default()
        }),
        latency,
        hold_duration,
        policy: spec.policy.clone(),
        replicas: control.replicas,
        last_decision: control.decisions.front().cloned(),
        control_error: control.error,
        decisions_by_mode: control.decisions_by_mode,
        source_errors: control.source_errors,
    }
}

/// Request figures a service carrying only TLS cannot have: shown as null, not as zero.
const REQUEST_FIELDS: [&str; 5] = [
    "requests_total",
    "responses_total",
    "request_rate",
    "in_flight",
    "concurrency",
];

fn masked<S: serde::Serializer>(f: &ServiceFigures, s: S) -> Result<S::Ok, S::Error> {
    let mut v = serde_json::to_value(f).map_err(serde::ser::Error::custom)?;
    if !f.requests_available {
        if let Some(map) = v.as_object_mut() {
            for k in REQUEST_FIELDS {
                map.insert(k.to_string(), serde_json::Value::Null);
            }
        }
    }
    serde::Serialize::serialize(&v, s)
}

/// Every declared service and every node, as of now.
pub fn snapshot(shared: &Shared) -> Snapshot {
    let specs = shared.catalog.specs();
    let now = shared.clock.now();
    let ingest = shared.ingest();
    Snapshot {
        services: specs
            .iter()
            .map(|s| view(s, &ingest, shared.control.get(&s.name), now))
            .collect(),
        nodes: ingest.nodes(now),
    }
}
