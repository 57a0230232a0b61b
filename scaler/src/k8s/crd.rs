//! The `SurgeScaler` custom resource (group `surge.dev`): a scale target and the policy that
//! scales it; its status shows the replicas, the last decision and the conditions.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of Surge's resources.
pub const GROUP: &str = "surge.dev";
/// The finalizer that lets the scaler restore the original replica count on deletion.
pub const FINALIZER: &str = "surge.dev/restore";

/// Scales `scaleTargetRef` with `policy`, on the traffic the Surge agents measure.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "surge.dev",
    version = "v1alpha1",
    kind = "SurgeScaler",
    namespaced,
    status = "SurgeScalerStatus",
    shortname = "surge",
    category = "surge",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.scaleTargetRef.name"}"#,
    printcolumn = r#"{"name":"Current","type":"integer","jsonPath":".status.currentReplicas"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.desiredReplicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.lastDecision.reason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SurgeScalerSpec {
    /// What is scaled: a Deployment, a StatefulSet, or any resource with a `/scale` subresource.
    pub scale_target_ref: ScaleTargetRef,
    /// The Service in front of the target: its EndpointSlices give the ready replicas and the
    /// endpoints the agents watch. Default: the target's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The port of that Service (its `port`, not the pods' target port) whose new connections
    /// the agents hold while the target has no ready replica, and hand to a replica once one is
    /// ready. Default: the Service's first TCP port. A headless Service is not held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub service_port: Option<u16>,
    /// The policy, with the fields of a Surge policy file's `policy:` section (or of a KEDA
    /// ScaledObject's `spec`). Checked by the scaler with the messages of `surgectl validate`.
    #[schemars(schema_with = "free_form")]
    pub policy: serde_json::Value,
}

/// A reference to the scaled resource, as in an HPA or a KEDA ScaledObject.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleTargetRef {
    /// Default `apps/v1`.
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// Default `Deployment`.
    #[serde(default = "default_kind")]
    pub kind: String,
    pub name: String,
}

fn default_api_version() -> String {
    "apps/v1".into()
}

fn default_kind() -> String {
    "Deployment".into()
}

fn free_form(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// What the scaler last saw and did.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SurgeScalerStatus {
    /// The `metadata.generation` these conditions are about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replicas the target asks for now (its `/scale` `spec.replicas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_replicas: Option<u32>,
    /// Replicas the policy asked for last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<u32>,
    /// Ready replicas (ready endpoints of the Service, or the target's readyReplicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<u32>,
    /// The target's replica count when Surge took it over, restored on deletion when the policy
    /// sets `restoreToOriginalReplicaCount`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_replicas: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<LastDecision>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The policy engine's latest decision.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastDecision {
    /// When it was taken (RFC 3339).
    pub time: String,
    /// stable, panic, activating, idle, fallback or paused.
    pub mode: String,
    pub current: u32,
    pub desired: u32,
    /// One line: why this count.
    pub reason: String,
}

/// A condition in the usual Kubernetes shape. Types: Ready, Active, Fallback, Paused, Conflict.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    /// CamelCase, for machines.
    pub reason: String,
    /// For people.
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
}

/// The CRD as YAML, as `crdgen` writes it to `deploy/kubernetes/crd.yaml`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = SurgeScaler::crd();
    let body = serde_yaml::to_string(&crd).unwrap_or_default();
    format!("# Generated by `cargo run --release -p surge-scaler --bin crdgen`; do not edit.\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed CRD must be what the types generate.
    #[test]
    fn committed_crd_matches_the_types() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubernetes/crd.yaml");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == crd_yaml(),
            "deploy/kubernetes/crd.yaml is out of date with scaler/src/k8s/crd.rs; regenerate it with \
             `cargo run --release -p surge-scaler --bin crdgen > deploy/kubernetes/crd.yaml`"
        );
    }

    #[test]
    fn target_defaults_to_an_apps_v1_deployment() {
        let spec: SurgeScalerSpec =
            serde_json::from_value(serde_json::json!({"scaleTargetRef": {"name": "web"}, "policy": {}}))
                .expect("spec");
        assert_eq!(spec.scale_target_ref.api_version, "apps/v1");
        assert_eq!(spec.scale_target_ref.kind, "Deployment");
    }
}
