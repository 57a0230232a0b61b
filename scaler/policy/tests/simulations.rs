//! Simulations of the shipped example traces through the shipped example policies, with checked timelines.

use std::sync::Arc;
use std::time::Duration;

use surge_policy::simulate::{changes, simulate, SimConfig, SimPoint};
use surge_policy::trace::Trace;
use surge_policy::{parse_policy, Defaults, Mode};

macro_rules! example {
    ($dir:literal, $name:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/examples/",
            $dir,
            "/",
            $name
        ))
    };
}

fn run(policy: &str, trace: &str, startup: u64, initial: u32) -> Vec<SimPoint> {
    let p = parse_policy(policy, &Defaults::default(), "example").expect("example policy is valid");
    let t = Trace::parse(trace).expect("example trace is valid");
    let cfg = SimConfig {
        startup_delay: Duration::from_secs(startup),
        initial_replicas: initial,
        ..SimConfig::default()
    };
    simulate(Arc::new(p), &t, &cfg)
}

fn timeline(points: &[SimPoint]) -> Vec<(u64, u32, Mode)> {
    changes(points)
        .iter()
        .map(|p| (p.time as u64, p.desired, p.mode))
        .collect()
}

fn at(points: &[SimPoint], s: u64) -> &SimPoint {
    &points[s as usize]
}

#[test]
fn all_example_policies_are_valid() {
    for (name, text) in [
        ("knative-kpa", example!("policies", "knative-kpa.yaml")),
        (
            "keda-scaledobject",
            example!("policies", "keda-scaledobject.yaml"),
        ),
        ("keda-prometheus", example!("policies", "keda-prometheus.yaml")),
        ("hpa-behavior", example!("policies", "hpa-behavior.yaml")),
        ("hpa-multi-metric", example!("policies", "hpa-multi-metric.yaml")),
        ("ecommerce", example!("policies", "ecommerce.yaml")),
    ] {
        let p = parse_policy(text, &Defaults::default(), "x").unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(p.name, name);
    }
}

use Mode::{Activating, Idle, Panic, Stable};

#[test]
fn kpa_idle_then_burst_from_zero() {
    let pts = run(
        example!("policies", "knative-kpa.yaml"),
        example!("traces", "idle-burst.json"),
        10,
        1,
    );
    let want = vec![
        // Initial scale 1; no traffic for a stable window (60 s) + grace (30 s): zero.
        (0, 1, Stable),
        (90, 0, Idle),
        // The burst arrives at t=300 as held connections: activation at once, no poll wait.
        (300, 1, Activating),
        (302, 1, Stable),
        // The replica is ready at 310 and traffic flows: 800 rps / (70 % of 100) → 12, in panic.
        (310, 2, Panic),
        (312, 6, Panic),
        (314, 10, Panic),
        (316, 12, Panic),
        // Panic ends a stable window after the last over-threshold tick.
        (384, 12, Stable),
        // Traffic stops at 420: down by at most half per tick (max-scale-down-rate 2) as the
        // stable window drains…
        (422, 11, Stable),
        (428, 10, Stable),
        (432, 9, Stable),
        (438, 8, Stable),
        (444, 7, Stable),
        (448, 6, Stable),
        (454, 5, Stable),
        (458, 4, Stable),
        (464, 3, Stable),
        (470, 2, Stable),
        (474, 1, Stable),
        // …and zero 60 s + 30 s after the last tick with traffic (418).
        (508, 0, Idle),
    ];
    assert_eq!(timeline(&pts), want);
    // Capacity catches up with the load within 20 s of the first ready replica.
    assert!(at(&pts, 330).capacity >= at(&pts, 330).load);
}

#[test]
fn keda_idle_then_burst_from_zero() {
    let pts = run(
        example!("policies", "keda-scaledobject.yaml"),
        example!("traces", "idle-burst.json"),
        10,
        1,
    );
    let want = vec![
        (0, 1, Stable),
        // Inactive (rps ≤ activationThreshold 5) for cooldownPeriod 120 s → idle; the 60 s
        // scale-down stabilization window (behavior) governs the step itself: zero at 165.
        (120, 1, Idle),
        (165, 0, Idle),
        // Held connections activate at once to minReplicaCount…
        (300, 1, Activating),
        // …then the HPA: 4 pods per 15 s from the period's start (0), then 8 = 800 / 100.
        (315, 4, Stable),
        (330, 8, Stable),
        // Traffic stops at 420: 60 s stabilization after the last high poll window (420).
        (480, 1, Stable),
        // Last active poll at 405: idle at 405 + 120, zero after the stabilization window.
        (525, 1, Idle),
        (570, 0, Idle),
    ];
    assert_eq!(timeline(&pts), want);
}

#[test]
fn hpa_burst_follows_the_behavior_block() {
    let pts = run(
        example!("policies", "hpa-behavior.yaml"),
        example!("traces", "burst.csv"),
        10,
        2,
    );
    // Up: max(4 pods, 100 %) per 15 s; down: 300 s stabilization, then 50 % per 60 s, min 2.
    let want = vec![
        (0, 2, Stable),
        (135, 6, Stable),
        (150, 12, Stable),
        (600, 6, Stable),
        (660, 3, Stable),
        (720, 2, Stable),
    ];
    assert_eq!(timeline(&pts), want);
}

#[test]
fn ecommerce_rules_on_the_burst() {
    let pts = run(
        example!("policies", "ecommerce.yaml"),
        example!("traces", "burst.csv"),
        10,
        3,
    );
    // rps > 1000 for 3 evaluations (30 s polls from 150) → +2 at 210; the scale-up cooldown
    // (180 s) outlasts the burst. rps < 200 for 5 evaluations → −1, at most once per 300 s
    // (scale-down cooldown since the last change).
    let want = vec![
        (0, 3, Stable),
        (210, 5, Stable),
        (510, 4, Stable),
        (810, 3, Stable),
    ];
    assert_eq!(timeline(&pts), want);
}

#[test]
fn steady_load_settles_at_the_target() {
    let kpa = run(
        example!("policies", "knative-kpa.yaml"),
        example!("traces", "steady.csv"),
        10,
        1,
    );
    // 450 rps / 70 → 7 replicas; the jump from 1 is a panic, which ends after a stable window.
    assert_eq!(timeline(&kpa), vec![(0, 7, Panic), (70, 7, Stable)]);
    let hpa = run(
        example!("policies", "hpa-behavior.yaml"),
        example!("traces", "steady.csv"),
        10,
        2,
    );
    assert_eq!(timeline(&hpa), vec![(0, 5, Stable)]);
}

#[test]
fn diurnal_cycle_tracks_the_load() {
    for (policy, min, peak) in [
        (example!("policies", "knative-kpa.yaml"), 2, 13), // ceil(900 / 70)
        (example!("policies", "hpa-behavior.yaml"), 2, 9), // ceil(900 / 100)
    ] {
        let pts = run(policy, example!("traces", "diurnal.csv"), 10, 2);
        let max = pts.iter().map(|p| p.desired).max();
        assert_eq!(max, Some(peak));
        let noon = pts.iter().position(|p| p.desired == peak).map(|i| pts[i].time);
        assert!(
            noon.is_some_and(|t| (2500.0..3700.0).contains(&t)),
            "peak at {noon:?}"
        );
        assert!(pts.iter().all(|p| p.desired >= min), "never below min");
        assert_eq!(
            pts.last().map(|p| p.desired),
            Some(min),
            "back to the night level"
        );
        // Never more than 30 % short of capacity once warmed up (load changes slowly).
        assert!(
            pts.iter().skip(300).all(|p| p.capacity >= p.load * 0.7),
            "capacity keeps up"
        );
    }
}
