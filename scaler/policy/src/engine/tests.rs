use std::time::Duration;

use super::*;
use crate::{parse_policy, Defaults};

fn engine(yaml: &str) -> Engine {
    let p = parse_policy(yaml, &Defaults::default(), "svc").expect("valid policy");
    Engine::new(Arc::new(p), Timestamp::ZERO)
}

fn t(s: u64) -> Timestamp {
    Timestamp::from_secs(s)
}

fn r(current: u32, ready: u32) -> Replicas {
    Replicas { current, ready }
}

const KEDA_ACT: &str = "policy:\n  pollingInterval: 30\n  cooldownPeriod: 60\n  behavior:\n    scaleDown: {stabilizationWindowSeconds: 0}\n  triggers:\n  - {metric: rps, metricType: AverageValue, threshold: 10, activationThreshold: 50}\n";

#[test]
fn activation_wins_over_scaling() {
    // threshold 10, activationThreshold 50, value 40: the HPA would want 4, but the trigger is
    // inactive, so the service goes to zero once cooldownPeriod has passed.
    let mut e = engine(KEDA_ACT);
    e.record(t(0), &Metric::Rps, Sample::Value(40.0));
    let d = e.decide(t(0), r(4, 4));
    assert_eq!(d.recommended, 4);
    assert_eq!(d.desired, 4);
    assert_eq!(d.mode, Mode::Stable);
    e.record(t(30), &Metric::Rps, Sample::Value(40.0));
    assert_eq!(e.decide(t(30), r(4, 4)).desired, 4);
    e.record(t(60), &Metric::Rps, Sample::Value(40.0));
    let d = e.decide(t(60), r(4, 4));
    assert_eq!((d.mode, d.desired), (Mode::Idle, 0));
    assert!(d
        .steps
        .iter()
        .any(|s| s.limit == Limit::Idle && s.before == 4 && s.after == 0));
    // At zero and still inactive: stays at zero.
    e.record(t(90), &Metric::Rps, Sample::Value(40.0));
    assert_eq!(e.decide(t(90), r(0, 0)).desired, 0);
    // 60 > 50: active → minReplicaCount (at least 1) at once.
    e.record(t(120), &Metric::Rps, Sample::Value(60.0));
    let d = e.decide(t(120), r(0, 0));
    assert_eq!((d.mode, d.desired), (Mode::Activating, 1));
    // Then the HPA takes over: 60 / 10 = 6, within the default scale-up policy (max(1+4, 2)).
    e.record(t(150), &Metric::Rps, Sample::Value(60.0));
    let d = e.decide(t(150), r(1, 1));
    assert_eq!(
        (d.mode, d.desired, d.clipped_by),
        (Mode::Stable, 5, Some(Limit::ScaleUpPolicy))
    );
}

#[test]
fn default_scale_down_stabilization_governs_the_step_to_zero() {
    // keda#7770: with the default 300 s scale-down window, the step to zero waits until no
    // recommendation above zero is left in the window.
    let yaml = "policy:\n  cooldownPeriod: 60\n  triggers:\n  - {metric: rps, threshold: 10, activationThreshold: 50}\n";
    let mut e = engine(yaml);
    let mut zero_at = None;
    for s in (0..=600).step_by(30) {
        e.record(t(s), &Metric::Rps, Sample::Value(40.0));
        let d = e.decide(t(s), r(4, 4));
        if d.desired == 0 && zero_at.is_none() {
            zero_at = Some(s);
        }
        if (60..330).contains(&s) {
            assert_eq!(d.clipped_by, Some(Limit::ScaleDownStabilization), "at {s}");
        }
    }
    // The last recommendation of 4 was at t=30 (cooldown ran until 60): zero at 30 + 300.
    assert_eq!(zero_at, Some(330));
}

#[test]
fn idle_replica_count_and_min() {
    let yaml = "policy:\n  pollingInterval: 10\n  cooldownPeriod: 20\n  idleReplicaCount: 0\n  minReplicaCount: 2\n  maxReplicaCount: 5\n  behavior: {scaleDown: {stabilizationWindowSeconds: 0}}\n  triggers:\n  - {metric: rps, threshold: 100}\n";
    let mut e = engine(yaml);
    e.record(t(0), &Metric::Rps, Sample::Value(50.0));
    let d = e.decide(t(0), r(3, 3));
    assert_eq!(d.desired, 2, "{d:?}");
    assert_eq!(d.clipped_by, Some(Limit::MinReplicaCount));
    e.record(t(10), &Metric::Rps, Sample::Value(0.0));
    assert_eq!(e.decide(t(10), r(2, 2)).desired, 2);
    e.record(t(30), &Metric::Rps, Sample::Value(0.0));
    assert_eq!(e.decide(t(30), r(2, 2)).desired, 0);
    e.record(t(40), &Metric::Rps, Sample::Value(5000.0));
    let d = e.decide(t(40), r(0, 0));
    assert_eq!((d.mode, d.desired), (Mode::Activating, 2));
    // 15 s after activation (the HPA's scale-up period), 50 wanted, max(2 + 4, 4) allowed, 5 max.
    e.record(t(60), &Metric::Rps, Sample::Value(5000.0));
    let d = e.decide(t(60), r(2, 2));
    assert_eq!((d.desired, d.clipped_by), (5, Some(Limit::MaxReplicaCount)));
}

#[test]
fn initial_cooldown_period_delays_the_first_step_to_zero() {
    let yaml = "policy:\n  pollingInterval: 10\n  cooldownPeriod: 0\n  initialCooldownPeriod: 120\n  behavior: {scaleDown: {stabilizationWindowSeconds: 0}}\n  triggers:\n  - {metric: rps, threshold: 100}\n";
    let mut e = engine(yaml);
    for s in (0..120).step_by(10) {
        e.record(t(s), &Metric::Rps, Sample::Value(0.0));
        let d = e.decide(t(s), r(1, 1));
        assert_eq!(
            (d.desired, d.clipped_by),
            (1, Some(Limit::InitialCooldownPeriod)),
            "at {s}"
        );
    }
    e.record(t(120), &Metric::Rps, Sample::Value(0.0));
    assert_eq!(e.decide(t(120), r(1, 1)).desired, 0);
}

#[test]
fn fallback_after_consecutive_failures() {
    let yaml = "policy:\n  pollingInterval: 1\n  minReplicaCount: 1\n  fallback: {failureThreshold: 3, replicas: 6}\n  triggers:\n  - {metric: 'external:queue', threshold: 10}\n";
    let q = Metric::External("queue".into());
    let mut e = engine(yaml);
    e.record(t(0), &q, Sample::Value(20.0));
    assert_eq!(e.decide(t(0), r(2, 2)).desired, 2);
    e.record(t(1), &q, Sample::Failed);
    let d = e.decide(t(1), r(2, 2));
    assert_eq!((d.mode, d.desired), (Mode::Stable, 2));
    e.record(t(2), &q, Sample::Failed);
    assert_eq!(e.decide(t(2), r(2, 2)).desired, 2);
    e.record(t(3), &q, Sample::Failed);
    let d = e.decide(t(3), r(2, 2));
    assert_eq!(
        (d.mode, d.desired, d.clipped_by),
        (Mode::Fallback, 6, Some(Limit::Fallback))
    );
    // The source recovers: normal scaling again.
    e.record(t(4), &q, Sample::Value(20.0));
    let d = e.decide(t(4), r(6, 6));
    assert_eq!(d.mode, Mode::Stable);
}

#[test]
fn a_failing_source_blocks_scale_down() {
    let yaml = "policy:\n  pollingInterval: 1\n  minReplicaCount: 1\n  behavior: {scaleDown: {stabilizationWindowSeconds: 0}}\n  triggers:\n  - {metric: rps, threshold: 10}\n  - {metric: 'external:q', threshold: 10}\n";
    let mut e = engine(yaml);
    e.record(t(0), &Metric::Rps, Sample::Value(10.0));
    e.record(t(0), &Metric::External("q".into()), Sample::Failed);
    let d = e.decide(t(0), r(5, 5));
    assert_eq!((d.desired, d.clipped_by), (5, Some(Limit::MissingMetric)));
}

#[test]
fn paused_and_paused_replicas() {
    let mut e = engine("policy:\n  paused: true\n  triggers: [{metric: rps, threshold: 1}]\n");
    e.record(t(0), &Metric::Rps, Sample::Value(100.0));
    let d = e.decide(t(0), r(3, 3));
    assert_eq!((d.mode, d.desired), (Mode::Paused, 3));
    let mut e =
        engine("policy:\n  paused: true\n  pausedReplicas: 7\n  triggers: [{metric: rps, threshold: 1}]\n");
    let d = e.decide(t(0), r(3, 3));
    assert_eq!(
        (d.mode, d.desired, d.clipped_by),
        (Mode::Paused, 7, Some(Limit::Paused))
    );
}

#[test]
fn several_metrics_the_largest_count_wins() {
    let yaml = "policy:\n  pollingInterval: 1\n  minReplicaCount: 1\n  triggers:\n  - {metric: rps, threshold: 100}\n  - {metric: cpu, metricType: Utilization, threshold: 50}\n  - {metric: latency_p99, metricType: Value, threshold: 200}\n";
    let mut e = engine(yaml);
    e.record(t(0), &Metric::Rps, Sample::Value(300.0)); // 3
    e.record(t(0), &Metric::Cpu, Sample::Value(80.0)); // ceil(4 × 1.6) = 7
    e.record(t(0), &Metric::LatencyP99, Sample::Value(300.0)); // ceil(4 × 1.5) = 6
    let d = e.decide(t(0), r(4, 4));
    assert_eq!(d.recommended, 7);
    assert_eq!(d.desired, 7);
    let wants: Vec<_> = d.inputs.iter().filter_map(|i| i.wants).collect();
    assert_eq!(wants, vec![3, 7, 6]);
}

#[test]
fn polling_interval_gates_evaluations_but_held_connections_do_not_wait() {
    let yaml = "policy:\n  pollingInterval: 30\n  cooldownPeriod: 0\n  triggers:\n  - {metric: rps, threshold: 10}\n";
    let mut e = engine(yaml);
    e.record(t(0), &Metric::Rps, Sample::Value(0.0));
    assert_eq!(e.decide(t(0), r(0, 0)).desired, 0);
    e.record(t(5), &Metric::Rps, Sample::Value(100.0));
    let d = e.decide(t(5), r(0, 0));
    assert_eq!(d.at, t(0), "repeats the last decision before the next poll");
    e.record(t(6), &Metric::HeldConnections, Sample::Value(3.0));
    let d = e.decide(t(6), r(0, 0));
    assert_eq!((d.at, d.mode, d.desired), (t(6), Mode::Activating, 1));
}

#[test]
fn kpa_worked_example_through_the_engine() {
    // Stable avg 150, panic avg 450 (6 s panic window of a 60 s stable window), target 70 % of
    // 100, 2 ready pods → panic, desired 7.
    let mut e = engine("policy:\n  knative: {stable-window: 60s}\n  minReplicaCount: 1\n");
    for s in 0..54 {
        e.record(t(s), &Metric::Concurrency, Sample::Value(350.0 / 3.0));
    }
    for s in 54..60 {
        e.record(t(s), &Metric::Concurrency, Sample::Value(450.0));
    }
    let d = e.decide(t(59), r(2, 2));
    let c = &d.inputs[0];
    assert!((c.stable.unwrap_or_default() - 150.0).abs() < 1e-9, "{c:?}");
    assert_eq!(c.panic, Some(450.0));
    assert_eq!((d.mode, d.desired), (Mode::Panic, 7), "{d:?}");
}

#[test]
fn kpa_scales_to_zero_after_a_stable_window_and_the_grace_period() {
    let mut e = engine("policy:\n  knative: {stable-window: 60s, scale-to-zero-grace-period: 30s}\n");
    let mut zero_at = None;
    for s in 0..300u64 {
        let v = if s < 100 { 50.0 } else { 0.0 };
        e.record(t(s), &Metric::Concurrency, Sample::Value(v));
        let cur = e.last().desired.max(if s == 0 { 1 } else { 0 });
        let d = e.decide(t(s), r(cur, cur));
        if d.desired == 0 && zero_at.is_none() && s > 0 {
            zero_at = Some(s);
        }
    }
    // Last traffic seen at the t=98 tick (2 s ticks) → zero at 98 + 60 s window + 30 s grace.
    assert_eq!(zero_at, Some(188));
}

#[test]
fn kpa_initial_scale_holds_until_reached() {
    let mut e = engine("policy:\n  knative: {initial-scale: 3}\n");
    e.record(t(0), &Metric::Concurrency, Sample::Value(0.0));
    let d = e.decide(t(0), r(0, 0));
    assert_eq!((d.desired, d.clipped_by), (3, Some(Limit::InitialScale)), "{d:?}");
}

#[test]
fn decisions_serialize_for_the_api() {
    let mut e = engine(KEDA_ACT);
    e.record(t(0), &Metric::Rps, Sample::Value(60.0));
    let d = e.decide(t(0), r(0, 0));
    let json = serde_json::to_value(d).expect("serializable");
    assert_eq!(json["mode"], "activating");
    assert_eq!(json["desired"], 1);
    assert_eq!(json["clippedBy"], "activationScale");
    assert_eq!(json["inputs"][0]["metric"], "rps");
    assert_eq!(
        json["reason"],
        "activating: 0 -> 1 (metrics want 6), limited by activationScale"
    );
}

#[test]
fn rules_with_cooldown_through_the_engine() {
    let yaml = "policy:\n  pollingInterval: 60\n  minReplicaCount: 1\n  scaleUpRules:\n  - {metric: rps, threshold: 1000, scaleBy: 2, evaluationPeriods: 2}\n  cooldown: {scaleUp: 180s, scaleDown: 300s}\n";
    let mut e = engine(yaml);
    let mut cur = 2;
    let mut timeline = Vec::new();
    for s in (0..600).step_by(60) {
        e.record(t(s), &Metric::Rps, Sample::Value(2000.0));
        cur = e.decide(t(s), r(cur, cur)).desired;
        timeline.push(cur);
    }
    // Fires on the 2nd evaluation (t=60), then every 180 s.
    assert_eq!(timeline, vec![2, 4, 4, 4, 6, 6, 6, 8, 8, 8]);
}

#[test]
fn policy_reload_keeps_state() {
    let mut e = engine(KEDA_ACT);
    e.record(t(0), &Metric::Rps, Sample::Value(60.0));
    e.decide(t(0), r(0, 0));
    let p2 = parse_policy(
        &KEDA_ACT.replace("threshold: 10,", "threshold: 20,"),
        &Defaults::default(),
        "svc",
    )
    .expect("valid");
    e.set_policy(Arc::new(p2), t(1));
    assert_eq!(e.policy().triggers[0].target, 20.0);
    let d = e.decide(t(1), r(1, 1));
    assert_eq!(d.inputs[0].value, Some(60.0));
    let _ = Duration::ZERO;
}
