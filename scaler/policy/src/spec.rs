//! The policy file format, as users write it: KEDA camelCase names, Knative keys, HPA behavior, ecommerce-style rules.
//!
//! Everything is optional here; [`crate::validate`] fills in documented defaults and checks ranges.
//! A file holds one policy, either under `policy:` (the `ecommerce.yaml` layout) or under `spec:`
//! (a KEDA `ScaledObject` can be used as is), with optional `metadata.annotations` carrying
//! Knative (`autoscaling.knative.dev/…`) and KEDA (`autoscaling.keda.sh/…`) annotations.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

/// A whole policy file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyFile {
    /// Free-form, e.g. `surge.dev/v1` or `keda.sh/v1alpha1`; not interpreted.
    pub api_version: Option<String>,
    /// Free-form, e.g. `Policy` or `ScaledObject`; not interpreted.
    pub kind: Option<String>,
    /// Name and annotations.
    pub metadata: Option<Metadata>,
    /// The policy (ecommerce layout).
    pub policy: Option<PolicySpec>,
    /// The policy (KEDA ScaledObject layout).
    pub spec: Option<PolicySpec>,
}

/// Kubernetes-style metadata: only the name and the annotations are used.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    /// The policy name, if `policy.name` does not give one.
    pub name: Option<String>,
    /// Knative and KEDA annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// One policy, with every knob by its documented name.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    /// Policy name (defaults to the file name without extension).
    pub name: Option<String>,
    /// `kpa`, `hpa` or `rules`; inferred when absent.
    pub algorithm: Option<String>,
    /// KEDA `minReplicaCount` (0).
    pub min_replica_count: Option<i64>,
    /// KEDA `maxReplicaCount` (100).
    pub max_replica_count: Option<i64>,
    /// KEDA `idleReplicaCount` (unset; must be below `minReplicaCount`).
    pub idle_replica_count: Option<i64>,
    /// KEDA `pollingInterval` in seconds (30; Knative's 2 s tick for `kpa`).
    pub polling_interval: Option<i64>,
    /// KEDA `cooldownPeriod` in seconds (300), before the step to zero/idle.
    pub cooldown_period: Option<i64>,
    /// KEDA `initialCooldownPeriod` in seconds (0).
    pub initial_cooldown_period: Option<i64>,
    /// KEDA `fallback`.
    pub fallback: Option<FallbackSpec>,
    /// Pause scaling (KEDA `autoscaling.keda.sh/paused`).
    pub paused: Option<bool>,
    /// Pause at this count (KEDA `autoscaling.keda.sh/paused-replicas`).
    pub paused_replicas: Option<i64>,
    /// KEDA `advanced`.
    pub advanced: Option<AdvancedSpec>,
    /// HPA `behavior` (same as `advanced.horizontalPodAutoscalerConfig.behavior`).
    pub behavior: Option<BehaviorSpec>,
    /// KEDA-style triggers.
    #[serde(default)]
    pub triggers: Vec<TriggerSpec>,
    /// Knative autoscaler keys (`stable-window`, `panic-window-percentage`, …).
    #[serde(default)]
    pub knative: BTreeMap<String, Value>,
    /// ecommerce-style step rules for scaling up.
    #[serde(default)]
    pub scale_up_rules: Vec<RuleSpec>,
    /// ecommerce-style step rules for scaling down.
    #[serde(default)]
    pub scale_down_rules: Vec<RuleSpec>,
    /// ecommerce-style cooldowns.
    pub cooldown: Option<CooldownSpec>,
    /// KEDA `scaleTargetRef`: accepted for compatibility, used by the scaler, not by the policy.
    pub scale_target_ref: Option<Value>,
    /// KEDA `envSourceContainerName`: accepted for compatibility, not used.
    pub env_source_container_name: Option<String>,
}

/// KEDA `fallback`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FallbackSpec {
    /// Consecutive source failures before the fallback applies.
    pub failure_threshold: Option<i64>,
    /// Replicas to run while it applies.
    pub replicas: Option<i64>,
}

/// KEDA `advanced`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdvancedSpec {
    /// Restore the original count when the policy is removed (false).
    pub restore_to_original_replica_count: Option<bool>,
    /// The HPA options.
    pub horizontal_pod_autoscaler_config: Option<HpaConfigSpec>,
}

/// KEDA `advanced.horizontalPodAutoscalerConfig`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HpaConfigSpec {
    /// Name of the HPA KEDA would create; not used.
    pub name: Option<String>,
    /// HPA behavior.
    pub behavior: Option<BehaviorSpec>,
}

/// HPA `behavior`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BehaviorSpec {
    /// Rules for scaling up.
    pub scale_up: Option<ScalingRulesSpec>,
    /// Rules for scaling down.
    pub scale_down: Option<ScalingRulesSpec>,
}

/// HPA `HPAScalingRules`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScalingRulesSpec {
    /// 0–3600 (up 0, down 300).
    pub stabilization_window_seconds: Option<i64>,
    /// `Max`, `Min` or `Disabled` (Max).
    pub select_policy: Option<String>,
    /// Rate policies.
    pub policies: Option<Vec<HpaPolicySpec>>,
    /// Tolerance around the target (0.1).
    pub tolerance: Option<f64>,
}

/// HPA `HPAScalingPolicy`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HpaPolicySpec {
    /// `Pods` or `Percent`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Pods or percent per period; > 0.
    pub value: i64,
    /// 1–1800.
    pub period_seconds: i64,
}

/// A KEDA trigger, or Surge's short form `{metric, metricType, threshold, activationThreshold}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TriggerSpec {
    /// Surge metric name (`rps`, `cpu`, `external:<name>`, …).
    pub metric: Option<String>,
    /// KEDA scaler type (`cpu`, `memory`, `prometheus`, …).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// KEDA trigger name (names the external metric).
    pub name: Option<String>,
    /// `AverageValue`, `Value` or `Utilization`.
    pub metric_type: Option<String>,
    /// The target (KEDA `threshold`).
    pub threshold: Option<Value>,
    /// Alias of `threshold`.
    pub target: Option<Value>,
    /// KEDA `activationThreshold` (0).
    pub activation_threshold: Option<Value>,
    /// PromQL query for external metrics.
    pub query: Option<String>,
    /// KEDA `useCachedMetrics`; accepted, not used.
    pub use_cached_metrics: Option<bool>,
    /// KEDA `authenticationRef`; accepted, used by the metric source.
    pub authentication_ref: Option<Value>,
    /// KEDA scaler metadata (`threshold`, `activationThreshold`, `value`, `query`, `serverAddress`).
    #[serde(default)]
    pub metadata: BTreeMap<String, Value>,
}

/// One ecommerce-style rule.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    /// Metric name (`http_requests_per_second`, `cpu_usage`, …).
    pub metric: String,
    /// Fires above (up rules) or below (down rules) this value.
    pub threshold: f64,
    /// Replicas added or removed (1).
    pub scale_by: Option<i64>,
    /// Consecutive evaluations the condition must hold (1).
    pub evaluation_periods: Option<i64>,
}

/// ecommerce-style `cooldown`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CooldownSpec {
    /// Time after a scale-up before the next scale-up (`COOLDOWN_SCALE_UP`, 300 s).
    pub scale_up: Option<Value>,
    /// Time after any scaling before a scale-down (`COOLDOWN_SCALE_DOWN`, 600 s).
    pub scale_down: Option<Value>,
}

/// The text of a YAML scalar (numbers and booleans as written), or `None` for maps and lists.
pub fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}
