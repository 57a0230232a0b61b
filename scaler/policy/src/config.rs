//! The resolved policy model: every knob with its documented default filled in and checked.

use std::time::Duration;

use serde::Serialize;

use crate::metric::{Metric, MetricType};

/// How metric values turn into a replica count.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Knative Pod Autoscaler: stable and panic windows, rate limits.
    Kpa,
    /// Kubernetes HPA (as driven by KEDA): ratio to target, tolerance, behavior.
    Hpa,
    /// ecommerce-style step rules with cooldowns.
    Rules,
}

impl Algorithm {
    /// Parses `kpa`, `hpa` or `rules`.
    pub fn parse(s: &str) -> Option<Algorithm> {
        match s {
            "kpa" => Some(Algorithm::Kpa),
            "hpa" => Some(Algorithm::Hpa),
            "rules" => Some(Algorithm::Rules),
            _ => None,
        }
    }
}

/// A valid policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// Name (file stem or `policy.name`).
    pub name: String,
    /// The algorithm.
    pub algorithm: Algorithm,
    /// `minReplicaCount`.
    pub min_replicas: u32,
    /// `maxReplicaCount`.
    pub max_replicas: u32,
    /// `idleReplicaCount`.
    pub idle_replicas: Option<u32>,
    /// How often the policy is evaluated.
    pub polling_interval: Duration,
    /// Time without activity before the step to zero/idle (KEDA `cooldownPeriod`).
    pub cooldown_period: Duration,
    /// No step to zero/idle before this much time after the policy starts.
    pub initial_cooldown_period: Duration,
    /// KEDA fallback.
    pub fallback: Option<Fallback>,
    /// Scaling paused.
    pub paused: bool,
    /// Count to hold while paused (otherwise the current count).
    pub paused_replicas: Option<u32>,
    /// KEDA `advanced.restoreToOriginalReplicaCount` (for the scaler, when the policy goes away).
    pub restore_to_original_replica_count: bool,
    /// Targets.
    pub triggers: Vec<Trigger>,
    /// Knative settings (used by the `kpa` algorithm and for scale-to-zero timing).
    pub knative: KpaConfig,
    /// HPA behavior, when it applies (always for `hpa`, when given for the others).
    pub behavior: Option<Behavior>,
    /// Step rules up.
    pub scale_up_rules: Vec<Rule>,
    /// Step rules down.
    pub scale_down_rules: Vec<Rule>,
    /// Cooldowns, when they apply (always for `rules`, when given for the others).
    pub cooldown: Option<Cooldown>,
}

impl Policy {
    /// Whether the policy may go below one replica (`minReplicaCount` 0 or an idle count).
    pub fn can_idle(&self) -> bool {
        (self.min_replicas == 0 && self.knative.enable_scale_to_zero) || self.idle_replicas.is_some()
    }

    /// The count the policy rests at when inactive.
    pub fn idle_count(&self) -> u32 {
        self.idle_replicas.unwrap_or(0)
    }

    /// The lowest count while active: `minReplicaCount`, but at least 1 when it can idle.
    pub fn active_floor(&self) -> u32 {
        if self.can_idle() {
            self.min_replicas.max(1)
        } else {
            self.min_replicas
        }
    }

    /// Time without activity before the step to zero/idle: KEDA's `cooldownPeriod`, and for the
    /// `kpa` algorithm a whole stable window plus the scale-to-zero grace period (or pod retention).
    pub fn zero_delay(&self) -> Duration {
        match self.algorithm {
            Algorithm::Kpa => {
                let k = &self.knative;
                (k.stable_window
                    + k.scale_to_zero_grace_period
                        .max(k.scale_to_zero_pod_retention_period))
                .max(self.cooldown_period)
            }
            _ => self.cooldown_period,
        }
    }
}

/// A target on one metric.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Trigger {
    /// What is measured.
    pub metric: Metric,
    /// How it is compared with the target.
    pub metric_type: MetricType,
    /// The target (KEDA `threshold`).
    pub target: f64,
    /// Active above this value (KEDA `activationThreshold`).
    pub activation_threshold: f64,
    /// PromQL query (external metrics).
    pub query: Option<String>,
    /// Prometheus address (external metrics).
    pub server_address: Option<String>,
}

/// KEDA `fallback`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Fallback {
    /// Consecutive failures of a source before it applies.
    pub failure_threshold: u32,
    /// Replicas while it applies.
    pub replicas: u32,
}

/// Knative Pod Autoscaler settings, by their `config-autoscaler` keys.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct KpaConfig {
    /// 6 s–1 h (60 s).
    pub stable_window: Duration,
    /// 1–100 (10).
    pub panic_window_percentage: f64,
    /// 110–1000 (200).
    pub panic_threshold_percentage: f64,
    /// 1–100 (70).
    pub target_utilization_percentage: f64,
    /// > 1 (1000).
    pub max_scale_up_rate: f64,
    /// > 1 (2).
    pub max_scale_down_rate: f64,
    /// 0–1 h (0).
    pub scale_down_delay: Duration,
    /// ≥ 6 s (30 s).
    pub scale_to_zero_grace_period: Duration,
    /// ≥ 0 (0).
    pub scale_to_zero_pod_retention_period: Duration,
    /// ≥ 0, 0 only with allow-zero-initial-scale (1).
    pub initial_scale: u32,
    /// (false).
    pub allow_zero_initial_scale: bool,
    /// ≥ 1 (1).
    pub activation_scale: u32,
    /// (true).
    pub enable_scale_to_zero: bool,
    /// Default concurrency target per replica (100).
    pub container_concurrency_target_default: f64,
    /// Default rps target per replica (200).
    pub requests_per_second_target_default: f64,
}

impl Default for KpaConfig {
    fn default() -> Self {
        KpaConfig {
            stable_window: Duration::from_secs(60),
            panic_window_percentage: 10.0,
            panic_threshold_percentage: 200.0,
            target_utilization_percentage: 70.0,
            max_scale_up_rate: 1000.0,
            max_scale_down_rate: 2.0,
            scale_down_delay: Duration::ZERO,
            scale_to_zero_grace_period: Duration::from_secs(30),
            scale_to_zero_pod_retention_period: Duration::ZERO,
            initial_scale: 1,
            allow_zero_initial_scale: false,
            activation_scale: 1,
            enable_scale_to_zero: true,
            container_concurrency_target_default: 100.0,
            requests_per_second_target_default: 200.0,
        }
    }
}

impl KpaConfig {
    /// The panic window: `panic-window-percentage` of the stable window.
    pub fn panic_window(&self) -> Duration {
        self.stable_window.mul_f64(self.panic_window_percentage / 100.0)
    }
}

/// HPA `behavior`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Behavior {
    /// Scaling up.
    pub scale_up: ScalingRules,
    /// Scaling down (also the step to zero).
    pub scale_down: ScalingRules,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            scale_up: ScalingRules {
                stabilization_window: Duration::ZERO,
                select_policy: SelectPolicy::Max,
                policies: vec![
                    HpaPolicy {
                        kind: HpaPolicyType::Pods,
                        value: 4,
                        period: Duration::from_secs(15),
                    },
                    HpaPolicy {
                        kind: HpaPolicyType::Percent,
                        value: 100,
                        period: Duration::from_secs(15),
                    },
                ],
                tolerance: 0.1,
            },
            scale_down: ScalingRules {
                stabilization_window: Duration::from_secs(300),
                select_policy: SelectPolicy::Max,
                policies: vec![HpaPolicy {
                    kind: HpaPolicyType::Percent,
                    value: 100,
                    period: Duration::from_secs(15),
                }],
                tolerance: 0.1,
            },
        }
    }
}

/// HPA `HPAScalingRules`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScalingRules {
    /// `stabilizationWindowSeconds`.
    pub stabilization_window: Duration,
    /// `selectPolicy`.
    pub select_policy: SelectPolicy,
    /// `policies`.
    pub policies: Vec<HpaPolicy>,
    /// `tolerance`.
    pub tolerance: f64,
}

/// HPA `selectPolicy`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
pub enum SelectPolicy {
    /// The policy allowing the largest change.
    Max,
    /// The policy allowing the smallest change.
    Min,
    /// No scaling in this direction.
    Disabled,
}

/// HPA `HPAScalingPolicy`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HpaPolicy {
    /// `type`.
    #[serde(rename = "type")]
    pub kind: HpaPolicyType,
    /// `value`.
    pub value: u32,
    /// `periodSeconds`.
    pub period: Duration,
}

/// HPA policy types.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
pub enum HpaPolicyType {
    /// A number of pods per period.
    Pods,
    /// A percentage of the count at the start of the period.
    Percent,
}

/// An ecommerce-style step rule.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// What is compared.
    pub metric: Metric,
    /// Up rules fire above it, down rules below it.
    pub threshold: f64,
    /// Replicas added or removed.
    pub scale_by: u32,
    /// Consecutive evaluations before it fires.
    pub evaluation_periods: u32,
}

/// ecommerce-style cooldowns.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Cooldown {
    /// No scale-up sooner than this after a scale-up.
    pub scale_up: Duration,
    /// No scale-down sooner than this after any scaling.
    pub scale_down: Duration,
}

/// Global defaults a policy inherits where it is silent (from the environment and Knative's
/// global `config-autoscaler`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Defaults {
    /// `MIN_REPLICAS` (KEDA default 0).
    pub min_replicas: u32,
    /// `MAX_REPLICAS` (KEDA default 100).
    pub max_replicas: u32,
    /// `COOLDOWN_SCALE_UP`/`COOLDOWN_SCALE_DOWN` (300 s / 600 s).
    pub cooldown: Cooldown,
    /// `TARGET_CPU_USAGE` (70).
    pub target_cpu: f64,
    /// `TARGET_MEM_USAGE` (80).
    pub target_memory: f64,
    /// Knative global settings.
    pub knative: KpaConfig,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            min_replicas: 0,
            max_replicas: 100,
            cooldown: Cooldown {
                scale_up: Duration::from_secs(300),
                scale_down: Duration::from_secs(600),
            },
            target_cpu: 70.0,
            target_memory: 80.0,
            knative: KpaConfig::default(),
        }
    }
}
