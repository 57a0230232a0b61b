//! Kubernetes HPA: per-metric ratio with tolerance, then `behavior` (stabilization windows and rate policies).
//!
//! Follows `pkg/controller/podautoscaler` (`replica_calculator.go`,
//! `normalizeDesiredReplicasWithBehaviors`, `calculateScaleUpLimitWithScalingRules`,
//! `calculateScaleDownLimitWithBehaviors`).

use std::collections::VecDeque;
use std::time::Duration;

use crate::config::{Behavior, HpaPolicyType, ScalingRules, SelectPolicy};
use crate::decision::{Decision, Limit};
use crate::metric::MetricType;
use crate::time::Timestamp;
use crate::window::Extremum;

/// The count one metric asks for: `(without tolerance, with tolerance)`. Within tolerance of
/// the target (ratio in `[1 - down, 1 + up]`) the count stays at `current`.
pub fn recommend(
    metric_type: MetricType,
    value: f64,
    target: f64,
    ready: u32,
    current: u32,
    tolerance_up: f64,
    tolerance_down: f64,
) -> (u32, u32) {
    let exact = metric_type.replicas_for(value, target, ready).max(0.0);
    let raw = exact.ceil().min(f64::from(u32::MAX)) as u32;
    let ratio = exact / f64::from(ready.max(1));
    let within = if ratio >= 1.0 {
        ratio - 1.0 <= tolerance_up
    } else {
        1.0 - ratio <= tolerance_down
    };
    (raw, if within && current > 0 { current } else { raw })
}

/// Per-service behavior state: recommendation history and scale events.
#[derive(Clone, Debug)]
pub struct HpaState {
    up_window: Extremum,
    down_window: Extremum,
    up_events: VecDeque<(Timestamp, u32)>,
    down_events: VecDeque<(Timestamp, u32)>,
}

impl Default for HpaState {
    fn default() -> Self {
        HpaState {
            up_window: Extremum::min(),
            down_window: Extremum::max(),
            up_events: VecDeque::new(),
            down_events: VecDeque::new(),
        }
    }
}

impl HpaState {
    /// Stabilization: the count moves up only as far as the lowest recommendation of the
    /// scale-up window, and down only as far as the highest of the scale-down window.
    pub fn stabilize(
        &mut self,
        b: &Behavior,
        now: Timestamp,
        current: u32,
        desired: u32,
        d: &mut Decision,
    ) -> u32 {
        let up = self
            .up_window
            .observe(now, desired, b.scale_up.stabilization_window);
        let down = self
            .down_window
            .observe(now, desired, b.scale_down.stabilization_window);
        let mut rec = current.max(up).min(down);
        if desired == current {
            rec = current;
        }
        let limit = if desired > current {
            Limit::ScaleUpStabilization
        } else {
            Limit::ScaleDownStabilization
        };
        let mut v = desired;
        v = d.clip(limit, v, rec);
        v
    }

    /// Rate policies: how far the count may move from `current` given the scale events of each
    /// policy's period.
    pub fn rate_limit(
        &self,
        b: &Behavior,
        now: Timestamp,
        current: u32,
        desired: u32,
        d: &mut Decision,
    ) -> u32 {
        let mut v = desired;
        if desired > current {
            let limit = self.scale_up_limit(&b.scale_up, now, current).max(current);
            v = d.clip(Limit::ScaleUpPolicy, v, desired.min(limit));
        } else if desired < current {
            let limit = self.scale_down_limit(&b.scale_down, now, current).min(current);
            v = d.clip(Limit::ScaleDownPolicy, v, desired.max(limit));
        }
        v
    }

    fn period_start(&self, now: Timestamp, current: u32, period: Duration) -> i64 {
        let sum = |ev: &VecDeque<(Timestamp, u32)>| -> i64 {
            ev.iter()
                .filter(|(t, _)| *t + period > now)
                .map(|(_, n)| i64::from(*n))
                .sum()
        };
        i64::from(current) - sum(&self.up_events) + sum(&self.down_events)
    }

    fn scale_up_limit(&self, r: &ScalingRules, now: Timestamp, current: u32) -> u32 {
        let proposals = r.policies.iter().map(|p| {
            let start = self.period_start(now, current, p.period) as f64;
            match p.kind {
                HpaPolicyType::Pods => start + f64::from(p.value),
                HpaPolicyType::Percent => (start * (1.0 + f64::from(p.value) / 100.0)).ceil(),
            }
        });
        let limit = match r.select_policy {
            SelectPolicy::Disabled => return current,
            SelectPolicy::Max => proposals.fold(f64::MIN, f64::max),
            SelectPolicy::Min => proposals.fold(f64::MAX, f64::min),
        };
        limit.clamp(0.0, f64::from(u32::MAX)) as u32
    }

    fn scale_down_limit(&self, r: &ScalingRules, now: Timestamp, current: u32) -> u32 {
        let proposals = r.policies.iter().map(|p| {
            let start = self.period_start(now, current, p.period) as f64;
            match p.kind {
                HpaPolicyType::Pods => start - f64::from(p.value),
                HpaPolicyType::Percent => (start * (1.0 - f64::from(p.value) / 100.0)).trunc(),
            }
        });
        let limit = match r.select_policy {
            SelectPolicy::Disabled => return current,
            SelectPolicy::Max => proposals.fold(f64::MAX, f64::min),
            SelectPolicy::Min => proposals.fold(f64::MIN, f64::max),
        };
        limit.clamp(0.0, f64::from(u32::MAX)) as u32
    }

    /// Records a change of the count (the HPA's scale events), forgetting events older than the
    /// longest policy period.
    pub fn record_change(&mut self, b: &Behavior, now: Timestamp, from: u32, to: u32) {
        let longest = |r: &ScalingRules| r.policies.iter().map(|p| p.period).max().unwrap_or_default();
        let (up, down) = (longest(&b.scale_up), longest(&b.scale_down));
        while self.up_events.front().is_some_and(|(t, _)| *t + up <= now) {
            self.up_events.pop_front();
        }
        while self.down_events.front().is_some_and(|(t, _)| *t + down <= now) {
            self.down_events.pop_front();
        }
        if to > from {
            self.up_events.push_back((now, to - from));
        } else if to < from {
            self.down_events.push_back((now, from - to));
        }
    }
}

#[cfg(test)]
mod tests;
