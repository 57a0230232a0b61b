//! Property tests of the engine: bounds, rate limits, panic and cooldown invariants on random traffic.

use std::collections::VecDeque;
use std::sync::Arc;

use proptest::prelude::*;
use surge_policy::kpa::KpaState;
use surge_policy::{parse_policy, Defaults, Engine, Metric, Mode, Replicas, Sample, Timestamp};

#[derive(Clone, Debug)]
struct Tick {
    dt_ms: u64,
    rps: f64,
    fail: bool,
}

fn ticks() -> impl Strategy<Value = Vec<Tick>> {
    prop::collection::vec(
        (
            200u64..20_000,
            prop_oneof![Just(0.0), 0.0..50.0, 0.0..5000.0],
            prop::bool::weighted(0.05),
        )
            .prop_map(|(dt_ms, rps, fail)| Tick { dt_ms, rps, fail }),
        1..200,
    )
}

/// Runs `ticks` with the replicas following the decisions (all ready at once) and calls
/// `check(now, current, decision)` after each decision.
fn run(
    yaml: &str,
    start: u32,
    ticks: &[Tick],
    mut check: impl FnMut(Timestamp, u32, &surge_policy::Decision),
) {
    let p = parse_policy(yaml, &Defaults::default(), "prop").expect("valid policy");
    let mut e = Engine::new(Arc::new(p), Timestamp::ZERO);
    let mut now = 0u64;
    let mut current = start;
    for t in ticks {
        now += t.dt_ms;
        let ts = Timestamp::from_millis(now);
        let s = if t.fail {
            Sample::Failed
        } else {
            Sample::Value(t.rps)
        };
        e.record(ts, &Metric::Rps, s);
        let d = e
            .decide(
                ts,
                Replicas {
                    current,
                    ready: current,
                },
            )
            .clone();
        if d.at == ts {
            check(ts, current, &d);
            current = d.desired;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn never_outside_min_max_except_idle(
        min in 0u32..4, span in 1u32..20, idle in prop::bool::ANY, kpa in prop::bool::ANY,
        fallback in prop::bool::ANY, ticks in ticks(),
    ) {
        let max = min + span;
        let min = if idle { min.max(1) } else { min };
        let mut yaml = format!("policy:\n  minReplicaCount: {min}\n  maxReplicaCount: {max}\n  pollingInterval: 5\n  cooldownPeriod: 30\n  triggers: [{{metric: rps, threshold: 100, activationThreshold: 20}}]\n");
        if idle { yaml.push_str("  idleReplicaCount: 0\n"); }
        if kpa { yaml.push_str("  algorithm: kpa\n  knative: {stable-window: 30s}\n"); }
        if fallback { yaml.push_str(&format!("  fallback: {{failureThreshold: 2, replicas: {}}}\n", max + 3)); }
        run(&yaml, min, &ticks, |_, _, d| {
            assert!(d.desired <= max, "{d:?}");
            if d.desired < min {
                assert_eq!(d.mode, Mode::Idle, "below min only when idle: {d:?}");
            }
        });
    }

    #[test]
    fn hpa_policies_bound_the_net_change_per_period(
        up in 1u32..5, down in 1u32..5, period in 5u64..60, ticks in ticks(),
    ) {
        let yaml = format!("policy:\n  minReplicaCount: 1\n  maxReplicaCount: 50\n  pollingInterval: 3\n  behavior:\n    scaleUp: {{policies: [{{type: Pods, value: {up}, periodSeconds: {period}}}]}}\n    scaleDown: {{stabilizationWindowSeconds: 0, policies: [{{type: Pods, value: {down}, periodSeconds: {period}}}]}}\n  triggers: [{{metric: rps, threshold: 100}}]\n");
        let mut changes: VecDeque<(Timestamp, i64)> = VecDeque::new();
        let p = std::time::Duration::from_secs(period);
        run(&yaml, 1, &ticks, |now, current, d| {
            while changes.front().is_some_and(|(t, _)| *t + p <= now) { changes.pop_front(); }
            let step = i64::from(d.desired) - i64::from(current);
            let ups: i64 = changes.iter().map(|c| c.1.max(0)).sum::<i64>() + step.max(0);
            let downs: i64 = changes.iter().map(|c| (-c.1).max(0)).sum::<i64>() + (-step).max(0);
            // HPA: a change is allowed while the net change over the period, this change
            // included, stays within the policy (scale-downs in the period make room for ups).
            let net = ups - downs;
            if step > 0 {
                assert!(net <= i64::from(up), "net +{net} within {period}s > {up}: {d:?}");
            }
            if step < 0 {
                assert!(-net <= i64::from(down), "net {net} within {period}s > -{down}: {d:?}");
            }
            if step != 0 { changes.push_back((now, step)); }
        });
    }

    #[test]
    fn kpa_within_rate_bounds_and_never_down_while_panicking(
        up_rate in 1.1f64..5.0, down_rate in 1.1f64..5.0, delay in prop::bool::ANY, ticks in ticks(),
    ) {
        let mut yaml = format!("policy:\n  minReplicaCount: 1\n  maxReplicaCount: 500\n  triggers: [{{metric: rps, threshold: 100}}]\n  knative:\n    stable-window: 20s\n    max-scale-up-rate: {up_rate}\n    max-scale-down-rate: {down_rate}\n");
        if delay { yaml.push_str("    scale-down-delay: 10s\n"); }
        let p = parse_policy(&yaml, &Defaults::default(), "prop").expect("valid");
        run(&yaml, 1, &ticks, |_, current, d| {
            let (lo, hi) = KpaState::rate_bounds(&p.knative, current);
            assert!(d.desired <= hi.max(p.min_replicas), "{d:?} > {hi}");
            assert!(d.desired >= lo.min(current), "{d:?} < {lo}");
            if d.mode == Mode::Panic {
                assert!(d.desired >= current, "down while panicking: {d:?}");
            }
        });
    }

    #[test]
    fn never_up_during_a_scale_up_cooldown(
        cd_up in 5u64..120, cd_down in 5u64..120, ticks in ticks(),
    ) {
        let yaml = format!("policy:\n  minReplicaCount: 1\n  maxReplicaCount: 30\n  pollingInterval: 5\n  scaleUpRules: [{{metric: rps, threshold: 500, scaleBy: 2}}]\n  scaleDownRules: [{{metric: rps, threshold: 100, scaleBy: 1, evaluationPeriods: 2}}]\n  cooldown: {{scaleUp: {cd_up}s, scaleDown: {cd_down}s}}\n");
        let mut last_up: Option<Timestamp> = None;
        let mut last_change: Option<Timestamp> = None;
        run(&yaml, 1, &ticks, |now, current, d| {
            if d.desired > current {
                if let Some(t) = last_up {
                    assert!(now.since(t).as_secs() >= cd_up, "up {}s after the last up: {d:?}", now.since(t).as_secs_f64());
                }
                last_up = Some(now);
            }
            if d.desired < current {
                if let Some(t) = last_change {
                    assert!(now.since(t).as_secs() >= cd_down, "down during the cooldown: {d:?}");
                }
            }
            if d.desired != current { last_change = Some(now); }
        });
    }
}
