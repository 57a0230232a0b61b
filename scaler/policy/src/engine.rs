//! Per-service state and the tick API: `record(now, metric, sample)`, then `decide(now, replicas) -> &Decision`.
//!
//! The order of a decision: paused → the algorithm (KPA, HPA ratio, or rules) per trigger →
//! fallback / missing metrics → activation and the step to zero/idle → HPA behavior
//! (stabilization and rate policies, which also govern the step to zero) → min/max →
//! cooldowns. Each limit that changes the count is recorded in the [`Decision`].

use std::sync::Arc;

use crate::activation::{ActivityState, ZeroStep};
use crate::config::{Algorithm, Policy};
use crate::decision::{Decision, Limit, MetricInput, Mode, Reason};
use crate::hpa::{self, HpaState};
use crate::kpa::KpaState;
use crate::metric::{Metric, MetricType};
use crate::rules::{CooldownState, RulesState};
use crate::time::Timestamp;
use crate::window::Window;

/// A sample from a metric source.
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum Sample {
    /// A value.
    Value(f64),
    /// The source could not be read (counts towards `fallback.failureThreshold`).
    Failed,
}

/// Replica counts as the actuator sees them.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Replicas {
    /// Replicas asked for (the `/scale` spec).
    pub current: u32,
    /// Replicas ready to serve.
    pub ready: u32,
}

#[derive(Clone, Debug)]
struct Tracked {
    metric: Metric,
    window: Window,
    latest: Option<f64>,
    failures: u32,
}

/// One service's policy state.
#[derive(Clone, Debug)]
pub struct Engine {
    policy: Arc<Policy>,
    tracked: Vec<Tracked>,
    /// Index into `tracked` for each trigger.
    trigger_slots: Vec<usize>,
    held_slot: usize,
    kpa: KpaState,
    hpa: HpaState,
    rules: RulesState,
    cooldown: CooldownState,
    activity: ActivityState,
    next_eval: Option<Timestamp>,
    initial_scale_reached: bool,
    decision: Decision,
}

impl Engine {
    /// A fresh engine for `policy`, created at `now`.
    pub fn new(policy: Arc<Policy>, now: Timestamp) -> Self {
        let window_len = match policy.algorithm {
            Algorithm::Kpa => policy.knative.stable_window,
            _ => policy.polling_interval,
        };
        let mut tracked: Vec<Tracked> = Vec::new();
        let mut slot = |m: &Metric| match tracked.iter().position(|t| &t.metric == m) {
            Some(i) => i,
            None => {
                tracked.push(Tracked {
                    metric: m.clone(),
                    window: Window::new(window_len),
                    latest: None,
                    failures: 0,
                });
                tracked.len() - 1
            }
        };
        let trigger_slots = policy.triggers.iter().map(|t| slot(&t.metric)).collect();
        for r in policy.scale_up_rules.iter().chain(&policy.scale_down_rules) {
            slot(&r.metric);
        }
        let held_slot = slot(&Metric::HeldConnections);
        let rules = RulesState::new(&policy);
        let initial_scale_reached = policy.algorithm != Algorithm::Kpa || policy.knative.initial_scale == 0;
        let decision = Decision {
            at: now,
            policy: policy.name.clone(),
            ..Decision::default()
        };
        Engine {
            policy,
            tracked,
            trigger_slots,
            held_slot,
            kpa: KpaState::new(),
            hpa: HpaState::default(),
            rules,
            cooldown: CooldownState::default(),
            activity: ActivityState::new(now),
            next_eval: None,
            initial_scale_reached,
            decision,
        }
    }

    /// Replaces the policy (after a reload), keeping windows of unchanged metrics, activity and
    /// scaling history.
    pub fn set_policy(&mut self, policy: Arc<Policy>, now: Timestamp) {
        let mut next = Engine::new(policy, now);
        for t in &mut next.tracked {
            if let Some(old) = self.tracked.iter().find(|o| o.metric == t.metric) {
                if old.window.length() == t.window.length() {
                    t.window = old.window.clone();
                }
                t.latest = old.latest;
                t.failures = old.failures;
            }
        }
        next.activity = self.activity.clone();
        next.kpa = std::mem::take(&mut self.kpa);
        next.hpa = std::mem::take(&mut self.hpa);
        next.cooldown = std::mem::take(&mut self.cooldown);
        next.initial_scale_reached |= self.initial_scale_reached;
        *self = next;
    }

    /// The policy in force.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// The last decision.
    pub fn last(&self) -> &Decision {
        &self.decision
    }

    /// Records one sample of `metric` at `now`. Metrics the policy does not use are ignored.
    pub fn record(&mut self, now: Timestamp, metric: &Metric, sample: Sample) {
        let Some(t) = self.tracked.iter_mut().find(|t| &t.metric == metric) else {
            return;
        };
        match sample {
            Sample::Value(v) if v.is_finite() => {
                t.window.record(now, v);
                t.latest = Some(v);
                t.failures = 0;
            }
            _ => t.failures = t.failures.saturating_add(1),
        }
    }

    /// Records a sample by metric name (`rps`, `external:queue`, …); unknown names are ignored.
    pub fn record_named(&mut self, now: Timestamp, metric: &str, sample: Sample) {
        if let Some(m) = Metric::parse(metric) {
            self.record(now, &m, sample);
        }
    }

    /// Whether a call to [`Engine::decide`] at `now` would evaluate (rather than repeat the
    /// last decision until the next polling interval).
    pub fn due(&self, now: Timestamp, current: u32) -> bool {
        let held = self.tracked[self.held_slot].latest.unwrap_or(0.0) > 0.0;
        self.next_eval.is_none_or(|n| now >= n) || (held && current <= self.policy.idle_count())
    }

    /// Decides the desired replica count at `now`. Between polling intervals the previous
    /// decision is returned, except that held connections at zero/idle activate at once.
    pub fn decide(&mut self, now: Timestamp, replicas: Replicas) -> &Decision {
        if !self.due(now, replicas.current) {
            return &self.decision;
        }
        let p = Arc::clone(&self.policy);
        self.next_eval = Some(now + p.polling_interval);
        let Replicas { current, ready } = replicas;
        let d = &mut self.decision;
        d.at = now;
        d.current = current;
        d.ready = ready;
        d.mode = Mode::Stable;
        d.steps.clear();
        d.clipped_by = None;
        if d.policy != p.name {
            d.policy.clone_from(&p.name);
        }

        // Inputs.
        let panic_span = p.knative.panic_window();
        let kpa = p.algorithm == Algorithm::Kpa;
        d.inputs.clear();
        for t in &self.tracked {
            let len = t.window.length();
            d.inputs.push(MetricInput {
                metric: t.metric.clone(),
                value: t.latest,
                stable: t.window.average(now, len),
                panic: if kpa {
                    t.window.average(now, panic_span)
                } else {
                    None
                },
                target: None,
                wants: None,
                failures: t.failures,
            });
        }

        if p.paused {
            d.mode = Mode::Paused;
            let mut v = current;
            d.recommended = current;
            v = d.clip(Limit::Paused, v, p.paused_replicas.unwrap_or(current));
            return self.finish(now, v);
        }

        // Activity: a trigger above its activation threshold, held connections, or (without
        // triggers) any traffic on a rule metric. A failing source is not proof of idleness.
        let mut active = self.tracked[self.held_slot].latest.unwrap_or(0.0) > 0.0;
        for (trig, &slot) in p.triggers.iter().zip(&self.trigger_slots) {
            let t = &self.tracked[slot];
            active |= t.failures > 0 || t.latest.is_some_and(|v| v > trig.activation_threshold);
        }
        if p.triggers.is_empty() {
            active |= self
                .tracked
                .iter()
                .any(|t| t.failures > 0 || t.latest.unwrap_or(0.0) > 0.0);
        }

        // The algorithm.
        let util = p.knative.target_utilization_percentage / 100.0;
        let (tol_up, tol_down) = p
            .behavior
            .as_ref()
            .map_or((0.1, 0.1), |b| (b.scale_up.tolerance, b.scale_down.tolerance));
        let (mut fallback_on, mut missing) = (false, false);
        let (mut raw, mut tolerant, mut stable_pods, mut panic_pods) = (0u32, 0u32, 0u32, 0u32);
        let mut any_data = false;
        for (trig, &slot) in p.triggers.iter().zip(&self.trigger_slots) {
            let t = &self.tracked[slot];
            let input = &mut d.inputs[slot];
            input.target = Some(trig.target);
            if let Some(fb) = p.fallback.filter(|fb| t.failures >= fb.failure_threshold) {
                fallback_on = true;
                input.wants = Some(fb.replicas);
                continue;
            }
            let Some(stable) = input.stable.filter(|_| t.failures == 0) else {
                missing = true;
                continue;
            };
            any_data = true;
            if kpa {
                let target = if trig.metric_type == MetricType::AverageValue {
                    trig.target * util
                } else {
                    trig.target
                };
                let pods = |v: f64| {
                    trig.metric_type
                        .replicas_for(v, target, ready)
                        .ceil()
                        .clamp(0.0, f64::from(u32::MAX)) as u32
                };
                let (s, pn) = (pods(stable), pods(input.panic.unwrap_or(stable)));
                stable_pods = stable_pods.max(s);
                panic_pods = panic_pods.max(pn);
                input.wants = Some(if self.kpa.panicking() { s.max(pn) } else { s });
            } else {
                let (r, tol) = hpa::recommend(
                    trig.metric_type,
                    stable,
                    trig.target,
                    ready,
                    current,
                    tol_up,
                    tol_down,
                );
                raw = raw.max(r);
                tolerant = tolerant.max(tol);
                input.wants = Some(r);
            }
        }
        let mut desired = match p.algorithm {
            Algorithm::Kpa if any_data => {
                let v = self.kpa.scale(&p.knative, now, stable_pods, panic_pods, ready, d);
                d.recommended = if self.kpa.panicking() {
                    stable_pods.max(panic_pods)
                } else {
                    stable_pods
                };
                if self.kpa.panicking() {
                    d.mode = Mode::Panic;
                }
                v
            }
            Algorithm::Hpa if any_data => {
                d.recommended = raw;
                let mut v = raw;
                v = d.clip(Limit::Tolerance, v, tolerant);
                v
            }
            Algorithm::Rules => {
                let (tracked, inputs) = (&self.tracked, &d.inputs);
                let v = self.rules.evaluate(&p, current, |m| {
                    tracked
                        .iter()
                        .position(|t| &t.metric == m)
                        .and_then(|i| inputs[i].stable)
                });
                d.recommended = v;
                v
            }
            _ => {
                d.recommended = current;
                current
            }
        };
        if fallback_on {
            if let Some(fb) = p.fallback {
                d.mode = Mode::Fallback;
                let v = if any_data {
                    desired.max(fb.replicas)
                } else {
                    fb.replicas
                };
                desired = d.clip(Limit::Fallback, desired, v);
            }
        } else if missing {
            desired = d.clip(Limit::MissingMetric, desired, desired.max(current));
        }
        if !self.initial_scale_reached {
            if ready >= p.knative.initial_scale {
                self.initial_scale_reached = true;
            } else {
                desired = d.clip(Limit::InitialScale, desired, desired.max(p.knative.initial_scale));
            }
        }

        // Activation and the step to zero/idle.
        // Fallback and Knative's initial scale keep the service up whatever the activity.
        let zero = self.activity.step(&p, now, active, current);
        let zero = if fallback_on || !self.initial_scale_reached {
            ZeroStep::Scale
        } else {
            zero
        };
        let mut activating = false;
        match zero {
            ZeroStep::Activate(floor) => {
                d.mode = Mode::Activating;
                activating = true;
                // KEDA goes straight to minReplicaCount (at least 1) and lets the HPA take over
                // at the next poll; Knative's decider goes straight to what the windows want.
                let v = if kpa { desired.max(floor) } else { floor };
                desired = d.clip(Limit::ActivationScale, desired, v);
            }
            ZeroStep::Idle => {
                d.mode = Mode::Idle;
                desired = d.clip(Limit::Idle, desired, p.idle_count());
                if kpa && current > p.idle_count() {
                    let (lo, _) = KpaState::rate_bounds(&p.knative, ready);
                    desired = d.clip(Limit::MaxScaleDownRate, desired, desired.max(lo.min(current)));
                }
            }
            ZeroStep::Wait(limit) if desired < p.active_floor() && current >= p.active_floor() => {
                desired = d.clip(limit, desired, p.active_floor());
            }
            ZeroStep::Wait(_) | ZeroStep::Scale => {}
        }

        // HPA behavior, also on the step to zero (keda#7770).
        if let (Some(b), false) = (&p.behavior, activating) {
            desired = self.hpa.stabilize(b, now, current, desired, d);
            desired = self.hpa.rate_limit(b, now, current, desired, d);
        }

        // Bounds: idle is allowed below min.
        let floor = if d.mode == Mode::Idle || (activating && desired <= p.idle_count()) {
            p.idle_count()
        } else {
            p.active_floor()
        };
        desired = d.clip(Limit::MinReplicaCount, desired, desired.max(floor));
        desired = d.clip(Limit::MaxReplicaCount, desired, desired.min(p.max_replicas));

        if let Some(c) = &p.cooldown {
            desired = self.cooldown.apply(c, now, current, desired, d);
        }
        self.finish(now, desired)
    }

    fn finish(&mut self, now: Timestamp, desired: u32) -> &Decision {
        let d = &mut self.decision;
        d.desired = desired;
        d.reason = Reason {
            mode: d.mode,
            current: d.current,
            recommended: d.recommended,
            desired,
            clipped_by: d.clipped_by,
        };
        let current = d.current;
        if desired != current {
            if let Some(b) = &self.policy.behavior {
                self.hpa.record_change(b, now, current, desired);
            }
            self.cooldown.record_change(now, current, desired);
        }
        &self.decision
    }
}

#[cfg(test)]
mod tests;
