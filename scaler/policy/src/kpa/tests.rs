use std::time::Duration;

use super::*;

fn cfg() -> KpaConfig {
    KpaConfig::default()
}

fn t(s: u64) -> Timestamp {
    Timestamp::from_secs(s)
}

/// `ceil(avg / (target × utilization))`, as the engine computes it.
fn pods(avg: f64, target: f64, util: f64) -> u32 {
    (avg / (target * util / 100.0)).ceil() as u32
}

#[test]
fn worked_example_panic_desired_7() {
    // Stable avg 150, panic avg 450, target 70 % of 100, 2 ready pods.
    let c = cfg();
    let (s, p) = (pods(150.0, 100.0, 70.0), pods(450.0, 100.0, 70.0));
    assert_eq!((s, p), (3, 7));
    let mut k = KpaState::new();
    let mut d = Decision::default();
    // 7 / 2 = 3.5 ≥ 200 % → panic; desired = max(3, 7) = 7.
    assert_eq!(k.scale(&c, t(0), s, p, 2, &mut d), 7);
    assert!(k.panicking());
    assert!(d.steps.is_empty());
}

#[test]
fn below_threshold_is_stable() {
    let mut k = KpaState::new();
    let mut d = Decision::default();
    // 3 / 2 = 1.5 < 2 → stable, desired 3.
    assert_eq!(k.scale(&cfg(), t(0), 3, 3, 2, &mut d), 3);
    assert!(!k.panicking());
}

#[test]
fn rate_limits_and_plus_minus_one() {
    let mut c = cfg();
    c.max_scale_up_rate = 2.0;
    c.max_scale_down_rate = 4.0;
    assert_eq!(KpaState::rate_bounds(&c, 10), (2, 20));
    assert_eq!(KpaState::rate_bounds(&c, 1), (0, 2));
    assert_eq!(KpaState::rate_bounds(&c, 0), (0, 2));
    c.max_scale_up_rate = 1.01;
    c.max_scale_down_rate = 1.01;
    // ±1 always allowed even when the rates would forbid it.
    assert_eq!(KpaState::rate_bounds(&c, 3), (2, 4));

    let mut c = cfg();
    c.max_scale_up_rate = 2.0;
    let mut k = KpaState::new();
    let mut d = Decision::default();
    assert_eq!(k.scale(&c, t(0), 50, 50, 10, &mut d), 20);
    assert_eq!(d.clipped_by, Some(Limit::MaxScaleUpRate));
    let mut d = Decision::default();
    // Default down rate 2: from 10 ready, no lower than 5.
    assert_eq!(KpaState::new().scale(&cfg(), t(0), 1, 1, 10, &mut d), 5);
    assert_eq!(d.clipped_by, Some(Limit::MaxScaleDownRate));
}

#[test]
fn no_scale_down_while_panicking_and_panic_ends_after_a_stable_window() {
    let c = cfg();
    let mut k = KpaState::new();
    let mut d = Decision::default();
    assert_eq!(k.scale(&c, t(0), 3, 8, 2, &mut d), 8);
    // Load drops, still in panic: hold 8.
    let mut d = Decision::default();
    assert_eq!(k.scale(&c, t(10), 2, 2, 8, &mut d), 8);
    assert_eq!(d.clipped_by, Some(Limit::PanicHold));
    // 60 s after the last over-threshold tick: still panicking at exactly 60 s…
    assert_eq!(k.scale(&c, t(60), 2, 2, 8, &mut Decision::default()), 8);
    assert!(k.panicking());
    // …and out of panic just after.
    assert_eq!(k.scale(&c, t(61), 2, 2, 8, &mut Decision::default()), 4);
    assert!(!k.panicking());
}

#[test]
fn panic_is_extended_while_over_threshold() {
    let c = cfg();
    let mut k = KpaState::new();
    k.scale(&c, t(0), 3, 8, 2, &mut Decision::default());
    k.scale(&c, t(50), 8, 20, 8, &mut Decision::default());
    assert_eq!(k.scale(&c, t(100), 1, 1, 20, &mut Decision::default()), 20);
    assert!(k.panicking());
    assert_eq!(k.scale(&c, t(111), 1, 1, 20, &mut Decision::default()), 10);
}

#[test]
fn panic_threshold_is_a_percentage_of_ready() {
    let mut c = cfg();
    c.panic_threshold_percentage = 110.0;
    let mut k = KpaState::new();
    // 11 / 10 = 110 % → panic.
    k.scale(&c, t(0), 10, 11, 10, &mut Decision::default());
    assert!(k.panicking());
    let mut k = KpaState::new();
    k.scale(&c, t(0), 10, 10, 10, &mut Decision::default());
    assert!(!k.panicking());
}

#[test]
fn scale_down_delay_holds_the_max_over_the_delay() {
    let mut c = cfg();
    c.scale_down_delay = Duration::from_secs(30);
    let mut k = KpaState::new();
    assert_eq!(k.scale(&c, t(0), 6, 6, 6, &mut Decision::default()), 6);
    let mut d = Decision::default();
    assert_eq!(k.scale(&c, t(10), 3, 3, 6, &mut d), 6);
    assert_eq!(d.clipped_by, Some(Limit::ScaleDownDelay));
    assert_eq!(k.scale(&c, t(29), 3, 3, 6, &mut Decision::default()), 6);
    assert_eq!(k.scale(&c, t(30), 3, 3, 6, &mut Decision::default()), 3);
}
