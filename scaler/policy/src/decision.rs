//! The decision record: inputs, window values, mode, each limit's before/after, and the limit that clipped.

use std::fmt;

use serde::{Serialize, Serializer};

use crate::metric::Metric;
use crate::time::Timestamp;

/// What the policy was doing.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Normal scaling on the stable window (or the latest poll).
    #[default]
    Stable,
    /// Knative panic mode: the panic window is over the panic threshold.
    Panic,
    /// Scaling from zero/idle because activity appeared.
    Activating,
    /// Resting at zero/idle (or stepping down to it) for lack of activity.
    Idle,
    /// A metric source failed `failureThreshold` times in a row.
    Fallback,
    /// Scaling paused.
    Paused,
}

/// A rule that changed the count, by its documented name.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Limit {
    /// HPA tolerance: the ratio to the target was within it, the count stays.
    Tolerance,
    /// A metric source is failing (below the fallback threshold): no scale-down on missing data.
    MissingMetric,
    /// KEDA fallback replicas.
    Fallback,
    /// Knative `max-scale-up-rate`.
    MaxScaleUpRate,
    /// Knative `max-scale-down-rate`.
    MaxScaleDownRate,
    /// Knative: no scale-down while panicking.
    PanicHold,
    /// Knative `scale-down-delay`.
    ScaleDownDelay,
    /// Knative `initial-scale`.
    InitialScale,
    /// Knative `activation-scale` (or 1) when activating from zero.
    ActivationScale,
    /// KEDA: inactive, step to `idleReplicaCount`/0 after `cooldownPeriod`.
    Idle,
    /// KEDA `cooldownPeriod` (or Knative stable window + grace) not yet elapsed: stay up.
    CooldownPeriod,
    /// KEDA `initialCooldownPeriod` not yet elapsed.
    InitialCooldownPeriod,
    /// HPA `behavior.scaleUp.stabilizationWindowSeconds`.
    ScaleUpStabilization,
    /// HPA `behavior.scaleDown.stabilizationWindowSeconds`.
    ScaleDownStabilization,
    /// HPA `behavior.scaleUp.policies` (or `selectPolicy: Disabled`).
    ScaleUpPolicy,
    /// HPA `behavior.scaleDown.policies` (or `selectPolicy: Disabled`).
    ScaleDownPolicy,
    /// `cooldown.scaleUp`.
    ScaleUpCooldown,
    /// `cooldown.scaleDown`.
    ScaleDownCooldown,
    /// `minReplicaCount`.
    MinReplicaCount,
    /// `maxReplicaCount`.
    MaxReplicaCount,
    /// `pausedReplicas` (or the current count while paused).
    Paused,
}

/// One limit's effect.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    /// Which limit.
    pub limit: Limit,
    /// Count before it.
    pub before: u32,
    /// Count after it.
    pub after: u32,
}

/// What was known about one metric at decision time.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricInput {
    /// The metric.
    pub metric: Metric,
    /// Latest sample.
    pub value: Option<f64>,
    /// Stable-window (or polling-window) average.
    pub stable: Option<f64>,
    /// Panic-window average (`kpa` only).
    pub panic: Option<f64>,
    /// The target, if the metric is a trigger.
    pub target: Option<f64>,
    /// Replicas this metric alone asks for.
    pub wants: Option<u32>,
    /// Consecutive source failures.
    pub failures: u32,
}

/// One decision for one service.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// When it was taken.
    pub at: Timestamp,
    /// Policy name.
    pub policy: String,
    /// Mode.
    pub mode: Mode,
    /// Replicas asked for before (spec).
    pub current: u32,
    /// Ready replicas.
    pub ready: u32,
    /// Metric inputs.
    pub inputs: Vec<MetricInput>,
    /// The count the metrics ask for, before any limit.
    pub recommended: u32,
    /// Limits that changed the count, in order.
    pub steps: Vec<Step>,
    /// The last limit that changed the count, if any.
    pub clipped_by: Option<Limit>,
    /// The result.
    pub desired: u32,
    /// A one-line explanation.
    pub reason: Reason,
}

impl Decision {
    /// Applies a limit that turns `value` into `new`: records a step when they differ.
    pub fn clip(&mut self, limit: Limit, value: u32, new: u32) -> u32 {
        if new != value {
            self.steps.push(Step {
                limit,
                before: value,
                after: new,
            });
            self.clipped_by = Some(limit);
        }
        new
    }
}

/// A one-line explanation, rendered on demand (no allocation per tick).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Reason {
    /// Mode.
    pub mode: Mode,
    /// Count before.
    pub current: u32,
    /// Count asked for by the metrics.
    pub recommended: u32,
    /// Result.
    pub desired: u32,
    /// Binding limit.
    pub clipped_by: Option<Limit>,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.mode {
            Mode::Stable => "stable",
            Mode::Panic => "panic",
            Mode::Activating => "activating",
            Mode::Idle => "idle",
            Mode::Fallback => "fallback",
            Mode::Paused => "paused",
        };
        write!(f, "{mode}: {} -> {}", self.current, self.desired)?;
        if self.recommended != self.desired {
            write!(f, " (metrics want {})", self.recommended)?;
        }
        if let Some(l) = self.clipped_by {
            let name = serde_json::to_value(l).ok();
            let name = name.as_ref().and_then(|v| v.as_str()).unwrap_or("limit");
            write!(f, ", limited by {name}")?;
        }
        Ok(())
    }
}

impl Serialize for Reason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
