use super::*;
use crate::config::HpaPolicy;

fn t(s: u64) -> Timestamp {
    Timestamp::from_secs(s)
}

fn pol(kind: HpaPolicyType, value: u32, period: u64) -> HpaPolicy {
    HpaPolicy {
        kind,
        value,
        period: Duration::from_secs(period),
    }
}

#[test]
fn ratio_and_tolerance() {
    // 450 rps over 2 pods at 100 per pod → 5.
    assert_eq!(
        recommend(MetricType::AverageValue, 450.0, 100.0, 2, 2, 0.1, 0.1),
        (5, 5)
    );
    // CPU 90 % of a 60 % target on 4 pods → 6.
    assert_eq!(
        recommend(MetricType::Utilization, 90.0, 60.0, 4, 4, 0.1, 0.1),
        (6, 6)
    );
    // Ratio 1.05 is within the 0.1 tolerance: stay at 4.
    assert_eq!(
        recommend(MetricType::Utilization, 63.0, 60.0, 4, 4, 0.1, 0.1),
        (5, 4)
    );
    // Ratio 0.95 within tolerance down.
    assert_eq!(
        recommend(MetricType::AverageValue, 380.0, 100.0, 4, 4, 0.1, 0.1),
        (4, 4)
    );
    // 0.85: outside.
    assert_eq!(
        recommend(MetricType::AverageValue, 340.0, 100.0, 4, 4, 0.1, 0.1),
        (4, 4)
    );
    assert_eq!(
        recommend(MetricType::AverageValue, 290.0, 100.0, 4, 4, 0.1, 0.1),
        (3, 3)
    );
    // Per-direction tolerance (Kubernetes 1.33): 0 up.
    assert_eq!(
        recommend(MetricType::Utilization, 63.0, 60.0, 4, 4, 0.0, 0.1),
        (5, 5)
    );
}

#[test]
fn default_scale_up_is_4_pods_or_100_percent_per_15s() {
    let b = Behavior::default();
    let s = HpaState::default();
    let mut d = Decision::default();
    assert_eq!(s.rate_limit(&b, t(0), 10, 50, &mut d), 20);
    assert_eq!(d.clipped_by, Some(Limit::ScaleUpPolicy));
    assert_eq!(s.rate_limit(&b, t(0), 2, 50, &mut Decision::default()), 6);
    assert_eq!(s.rate_limit(&b, t(0), 1, 50, &mut Decision::default()), 5);
}

#[test]
fn events_inside_the_period_count_against_it() {
    let b = Behavior::default();
    let mut s = HpaState::default();
    s.record_change(&b, t(0), 2, 6);
    // 10 s later the period started at 2: still max(2+4, 4) = 6.
    assert_eq!(s.rate_limit(&b, t(10), 6, 50, &mut Decision::default()), 6);
    // 15 s later the event has left the period: max(6+4, 12) = 12.
    assert_eq!(s.rate_limit(&b, t(15), 6, 50, &mut Decision::default()), 12);
}

#[test]
fn select_policy_min_and_disabled() {
    let mut b = Behavior::default();
    b.scale_up.select_policy = SelectPolicy::Min;
    let s = HpaState::default();
    assert_eq!(s.rate_limit(&b, t(0), 10, 50, &mut Decision::default()), 14);
    b.scale_up.select_policy = SelectPolicy::Disabled;
    assert_eq!(s.rate_limit(&b, t(0), 10, 50, &mut Decision::default()), 10);
    b.scale_down.select_policy = SelectPolicy::Disabled;
    assert_eq!(s.rate_limit(&b, t(0), 10, 1, &mut Decision::default()), 10);
}

#[test]
fn scale_down_pods_policy_per_period() {
    let mut b = Behavior::default();
    b.scale_down.policies = vec![pol(HpaPolicyType::Pods, 1, 60)];
    let mut s = HpaState::default();
    assert_eq!(s.rate_limit(&b, t(0), 10, 2, &mut Decision::default()), 9);
    s.record_change(&b, t(0), 10, 9);
    assert_eq!(s.rate_limit(&b, t(30), 9, 2, &mut Decision::default()), 9);
    assert_eq!(s.rate_limit(&b, t(60), 9, 2, &mut Decision::default()), 8);
    // Percent down truncates: 50 % of 9 → 4.
    b.scale_down.policies = vec![pol(HpaPolicyType::Percent, 50, 15)];
    assert_eq!(
        HpaState::default().rate_limit(&b, t(0), 9, 0, &mut Decision::default()),
        4
    );
    // The default 100 % allows the step to zero at once.
    let b = Behavior::default();
    assert_eq!(
        HpaState::default().rate_limit(&b, t(0), 9, 0, &mut Decision::default()),
        0
    );
}

#[test]
fn scale_down_stabilization_uses_the_highest_recommendation_of_the_window() {
    let b = Behavior::default(); // down window 300 s, up window 0
    let mut s = HpaState::default();
    assert_eq!(s.stabilize(&b, t(0), 10, 10, &mut Decision::default()), 10);
    let mut d = Decision::default();
    assert_eq!(s.stabilize(&b, t(60), 10, 4, &mut d), 10);
    assert_eq!(d.clipped_by, Some(Limit::ScaleDownStabilization));
    assert_eq!(s.stabilize(&b, t(299), 10, 3, &mut Decision::default()), 10);
    assert_eq!(s.stabilize(&b, t(300), 10, 3, &mut Decision::default()), 4);
    assert_eq!(s.stabilize(&b, t(360), 4, 3, &mut Decision::default()), 3);
    // Up is not stabilized by default.
    assert_eq!(s.stabilize(&b, t(361), 3, 9, &mut Decision::default()), 9);
}

#[test]
fn scale_up_stabilization_uses_the_lowest() {
    let mut b = Behavior::default();
    b.scale_up.stabilization_window = Duration::from_secs(60);
    let mut s = HpaState::default();
    assert_eq!(s.stabilize(&b, t(0), 2, 2, &mut Decision::default()), 2);
    let mut d = Decision::default();
    assert_eq!(s.stabilize(&b, t(30), 2, 8, &mut d), 2);
    assert_eq!(d.clipped_by, Some(Limit::ScaleUpStabilization));
    assert_eq!(s.stabilize(&b, t(60), 2, 8, &mut Decision::default()), 8);
}
