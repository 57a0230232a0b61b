use super::*;

fn policy(yaml: &str) -> Result<Policy, PolicyError> {
    parse_policy(yaml, &Defaults::default(), "test")
}

fn messages(yaml: &str) -> Vec<String> {
    match policy(yaml) {
        Ok(p) => panic!("accepted: {p:?}"),
        Err(PolicyError::Invalid(v)) => v.0.iter().map(ToString::to_string).collect(),
        Err(other) => vec![other.to_string()],
    }
}

fn one(yaml: &str) -> String {
    let m = messages(yaml);
    assert_eq!(m.len(), 1, "{m:?}");
    m[0].clone()
}

#[test]
fn knative_ranges_word_for_word() {
    let cases = [
        (
            "panic-threshold-percentage: 90",
            "panic-threshold-percentage = 90, must be between 110 and 1000",
        ),
        (
            "panic-threshold-percentage: 1000.5",
            "panic-threshold-percentage = 1000.5, must be between 110 and 1000",
        ),
        (
            "panic-window-percentage: 0.5",
            "panic-window-percentage = 0.5, must be between 1 and 100",
        ),
        (
            "stable-window: 5s",
            "stable-window = 5s, must be between 6s and 1h",
        ),
        (
            "stable-window: 2h",
            "stable-window = 2h, must be between 6s and 1h",
        ),
        (
            "stable-window: 6500ms",
            "stable-window = 6500ms, must be specified with at most second precision",
        ),
        (
            "target-utilization-percentage: 0",
            "target-utilization-percentage = 0, must be between 1 and 100",
        ),
        (
            "max-scale-up-rate: 1",
            "max-scale-up-rate = 1, must be greater than 1",
        ),
        (
            "max-scale-down-rate: 0.5",
            "max-scale-down-rate = 0.5, must be greater than 1",
        ),
        (
            "scale-down-delay: 2h",
            "scale-down-delay = 2h, must be between 0s and 1h",
        ),
        (
            "scale-to-zero-grace-period: 5s",
            "scale-to-zero-grace-period = 5s, must be at least 6s",
        ),
        ("activation-scale: 0", "activation-scale = 0, must be at least 1"),
        (
            "initial-scale: 0",
            "initial-scale = 0, must be at least 1 unless allow-zero-initial-scale is true",
        ),
        (
            "stable-window: soon",
            "stable-window = soon, must be a duration such as 30s",
        ),
        (
            "panic-window-percentage: ten",
            "panic-window-percentage = ten, must be a number",
        ),
        (
            "metric: qps",
            "metric = qps, must be one of concurrency, rps, cpu, memory",
        ),
    ];
    for (kv, want) in cases {
        let yaml = format!("policy:\n  knative:\n    {kv}\n");
        assert_eq!(one(&yaml), want, "{kv}");
    }
}

#[test]
fn knative_accepts_documented_defaults_and_strings() {
    let p = policy(
        "policy:\n  knative:\n    stable-window: 40s\n    panic-window-percentage: \"20.0\"\n    panic-threshold-percentage: 150\n    initial-scale: 0\n    allow-zero-initial-scale: true\n",
    )
    .expect("valid");
    assert_eq!(p.algorithm, Algorithm::Kpa);
    assert_eq!(p.knative.stable_window, Duration::from_secs(40));
    assert_eq!(p.knative.panic_window_percentage, 20.0);
    assert_eq!(p.knative.panic_window(), Duration::from_secs(8));
    assert_eq!(p.knative.panic_threshold_percentage, 150.0);
    assert_eq!(p.knative.target_utilization_percentage, 70.0);
    assert_eq!(p.knative.max_scale_up_rate, 1000.0);
    assert_eq!(p.knative.max_scale_down_rate, 2.0);
    assert_eq!(p.knative.scale_to_zero_grace_period, Duration::from_secs(30));
    assert_eq!(p.polling_interval, Duration::from_secs(2));
    assert_eq!(p.triggers.len(), 1);
    assert_eq!(p.triggers[0].metric, Metric::Concurrency);
    assert_eq!(p.triggers[0].target, 100.0);
}

#[test]
fn keda_ranges_word_for_word() {
    let cases = [
        ("minReplicaCount: -1", "minReplicaCount = -1, must be at least 0"),
        ("maxReplicaCount: 0", "maxReplicaCount = 0, must be at least 1"),
        (
            "minReplicaCount: 5\n  maxReplicaCount: 3",
            "minReplicaCount = 5, must be at most maxReplicaCount (3)",
        ),
        (
            "minReplicaCount: 1\n  idleReplicaCount: 1",
            "idleReplicaCount = 1, must be less than minReplicaCount (1)",
        ),
        ("pollingInterval: 0", "pollingInterval = 0, must be at least 1"),
        ("cooldownPeriod: -5", "cooldownPeriod = -5, must be at least 0"),
        (
            "initialCooldownPeriod: -1",
            "initialCooldownPeriod = -1, must be at least 0",
        ),
        (
            "fallback: {failureThreshold: 0, replicas: 3}",
            "fallback.failureThreshold = 0, must be at least 1",
        ),
        (
            "fallback: {failureThreshold: 3}",
            "fallback.replicas = (missing), must be set when fallback is given",
        ),
        ("pausedReplicas: -2", "pausedReplicas = -2, must be at least 0"),
        (
            "algorithm: magic",
            "algorithm = magic, must be one of kpa, hpa, rules",
        ),
    ];
    for (kv, want) in cases {
        let yaml = format!("policy:\n  {kv}\n");
        assert_eq!(one(&yaml), want, "{kv}");
    }
}

#[test]
fn trigger_messages() {
    let cases = [
        ("- metric: rps\n    threshold: 0", "triggers[0].threshold = 0, must be greater than 0"),
        ("- metric: rps\n    threshold: lots", "triggers[0].threshold = lots, must be a number"),
        ("- metric: rps\n    activationThreshold: -1", "triggers[0].activationThreshold = -1, must be at least 0"),
        ("- metric: rps\n    metricType: Average", "triggers[0].metricType = Average, must be one of AverageValue, Value, Utilization"),
        ("- metric: latency_p99", "triggers[0].threshold = (missing), must be set for metric latency_p99"),
        ("- metric: qps\n    threshold: 3", "triggers[0].metric = qps, must be a known metric (rps, concurrency, cpu, memory, latency_p50, latency_p90, latency_p99, held_connections, external:<name>)"),
    ];
    for (t, want) in cases {
        let yaml = format!("policy:\n  triggers:\n  {t}\n");
        assert_eq!(one(&yaml), want, "{t}");
    }
}

#[test]
fn hpa_behavior_messages() {
    let cases = [
        (
            "scaleDown: {stabilizationWindowSeconds: 3601}",
            "behavior.scaleDown.stabilizationWindowSeconds = 3601, must be between 0 and 3600",
        ),
        (
            "scaleUp: {selectPolicy: Biggest}",
            "behavior.scaleUp.selectPolicy = Biggest, must be one of Max, Min, Disabled",
        ),
        (
            "scaleUp: {policies: [{type: Pods, value: 4, periodSeconds: 1801}]}",
            "behavior.scaleUp.policies[0].periodSeconds = 1801, must be between 1 and 1800",
        ),
        (
            "scaleUp: {policies: [{type: Pods, value: 0, periodSeconds: 15}]}",
            "behavior.scaleUp.policies[0].value = 0, must be greater than 0",
        ),
        (
            "scaleUp: {policies: [{type: Replicas, value: 1, periodSeconds: 15}]}",
            "behavior.scaleUp.policies[0].type = Replicas, must be one of Pods, Percent",
        ),
        (
            "scaleDown: {policies: []}",
            "behavior.scaleDown.policies = [], must be at least one policy unless selectPolicy is Disabled",
        ),
        (
            "scaleDown: {tolerance: 1.5}",
            "behavior.scaleDown.tolerance = 1.5, must be at least 0 and less than 1",
        ),
    ];
    for (b, want) in cases {
        let yaml = format!("policy:\n  behavior:\n    {b}\n");
        assert_eq!(one(&yaml), want, "{b}");
    }
    let keda = "spec:\n  advanced:\n    horizontalPodAutoscalerConfig:\n      behavior:\n        scaleDown:\n          stabilizationWindowSeconds: -1\n";
    assert_eq!(
        one(keda),
        "advanced.horizontalPodAutoscalerConfig.behavior.scaleDown.stabilizationWindowSeconds = -1, must be between 0 and 3600"
    );
}

#[test]
fn hpa_defaults() {
    let p = policy("policy:\n  triggers:\n  - metric: rps\n    threshold: 100\n").expect("valid");
    assert_eq!(p.algorithm, Algorithm::Hpa);
    assert_eq!(p.min_replicas, 0);
    assert_eq!(p.max_replicas, 100);
    assert_eq!(p.polling_interval, Duration::from_secs(30));
    assert_eq!(p.cooldown_period, Duration::from_secs(300));
    assert_eq!(p.initial_cooldown_period, Duration::ZERO);
    let b = p.behavior.expect("hpa has behavior");
    assert_eq!(b, Behavior::default());
    assert_eq!(b.scale_up.stabilization_window, Duration::ZERO);
    assert_eq!(b.scale_down.stabilization_window, Duration::from_secs(300));
    assert_eq!(b.scale_up.policies.len(), 2);
    assert_eq!(b.scale_down.tolerance, 0.1);
    assert_eq!(p.triggers[0].metric_type, MetricType::AverageValue);
}

#[test]
fn rule_messages_and_ecommerce_file() {
    assert_eq!(
        one("policy:\n  scaleUpRules:\n  - {metric: cpu_usage, threshold: 85, scaleBy: 0}\n"),
        "scaleUpRules[0].scaleBy = 0, must be at least 1"
    );
    assert_eq!(
        one("policy:\n  scaleDownRules:\n  - {metric: rps, threshold: 5, evaluationPeriods: 0}\n"),
        "scaleDownRules[0].evaluationPeriods = 0, must be at least 1"
    );
    assert_eq!(
        one("policy:\n  scaleUpRules:\n  - {metric: rps, threshold: 5}\n  cooldown: {scaleUp: later}\n"),
        "cooldown.scaleUp = later, must be a duration such as 180s"
    );
    assert_eq!(
        one("policy:\n  algorithm: hpa\n  scaleUpRules:\n  - {metric: rps, threshold: 5}\n"),
        "algorithm = hpa, must be rules when scaleUpRules or scaleDownRules are given"
    );
    let ecommerce = "policy:\n  name: ecommerce\n  scaleUpRules:\n    - metric: http_requests_per_second\n      threshold: 1000\n      scaleBy: 2\n      evaluationPeriods: 3\n    - metric: cpu_usage\n      threshold: 85\n      scaleBy: 1\n      evaluationPeriods: 2\n  scaleDownRules:\n    - metric: http_requests_per_second\n      threshold: 200\n      scaleBy: 1\n      evaluationPeriods: 5\n  cooldown:\n    scaleUp: 180s\n    scaleDown: 300s\n";
    let p = policy(ecommerce).expect("the seed's ecommerce.yaml is valid");
    assert_eq!(p.name, "ecommerce");
    assert_eq!(p.algorithm, Algorithm::Rules);
    assert_eq!(p.scale_up_rules[0].metric, Metric::Rps);
    assert_eq!(p.scale_up_rules[1].metric, Metric::Cpu);
    assert_eq!(p.scale_down_rules[0].evaluation_periods, 5);
    assert_eq!(
        p.cooldown,
        Some(Cooldown {
            scale_up: Duration::from_secs(180),
            scale_down: Duration::from_secs(300)
        })
    );
}

#[test]
fn keda_scaled_object_is_a_policy() {
    let yaml = r#"
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: checkout
  annotations:
    autoscaling.keda.sh/paused-replicas: "3"
spec:
  scaleTargetRef: {name: checkout}
  pollingInterval: 15
  cooldownPeriod: 120
  idleReplicaCount: 0
  minReplicaCount: 1
  maxReplicaCount: 20
  fallback: {failureThreshold: 3, replicas: 6}
  triggers:
  - type: prometheus
    name: queue
    metricType: AverageValue
    metadata:
      serverAddress: http://prometheus:9090
      query: sum(queue_depth)
      threshold: "50"
      activationThreshold: "5"
  - type: cpu
    metricType: Utilization
    metadata: {value: "60"}
"#;
    let p = policy(yaml).expect("valid");
    assert_eq!(p.name, "checkout");
    assert_eq!(p.idle_replicas, Some(0));
    assert_eq!(
        p.fallback,
        Some(Fallback {
            failure_threshold: 3,
            replicas: 6
        })
    );
    assert!(p.paused);
    assert_eq!(p.paused_replicas, Some(3));
    assert_eq!(p.triggers[0].metric, Metric::External("queue".into()));
    assert_eq!(p.triggers[0].target, 50.0);
    assert_eq!(p.triggers[0].activation_threshold, 5.0);
    assert_eq!(p.triggers[0].query.as_deref(), Some("sum(queue_depth)"));
    assert_eq!(p.triggers[1].metric, Metric::Cpu);
    assert_eq!(p.triggers[1].target, 60.0);
    assert_eq!(p.triggers[1].metric_type, MetricType::Utilization);
}

#[test]
fn annotations_override_and_name_their_key() {
    let yaml = "metadata:\n  annotations:\n    autoscaling.knative.dev/window: 40s\n    autoscaling.knative.dev/min-scale: \"2\"\n    autoscaling.knative.dev/target: \"50\"\n    autoscaling.knative.dev/metric: rps\npolicy:\n  knative:\n    stable-window: 90s\n";
    let p = policy(yaml).expect("valid");
    assert_eq!(p.knative.stable_window, Duration::from_secs(40));
    assert_eq!(p.min_replicas, 2);
    assert_eq!(p.triggers[0].metric, Metric::Rps);
    assert_eq!(p.triggers[0].target, 50.0);

    let bad = "metadata:\n  annotations:\n    autoscaling.knative.dev/panic-threshold-percentage: \"90\"\npolicy: {}\n";
    assert_eq!(
        one(bad),
        "autoscaling.knative.dev/panic-threshold-percentage = 90, must be between 110 and 1000"
    );
    let keda = "metadata:\n  annotations:\n    autoscaling.keda.sh/paused-replicas: \"-1\"\npolicy: {}\n";
    assert_eq!(
        one(keda),
        "autoscaling.keda.sh/paused-replicas = -1, must be at least 0"
    );
}

#[test]
fn parse_errors_name_the_field() {
    match policy("policy:\n  minReplicas: 3\n") {
        Err(PolicyError::Parse(m)) => assert!(m.contains("unknown field `minReplicas`"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(policy("apiVersion: v1\n"), Err(PolicyError::Empty)));
}

#[test]
fn several_errors_are_all_reported() {
    let m = messages("policy:\n  minReplicaCount: -1\n  knative:\n    panic-threshold-percentage: 90\n");
    assert_eq!(m.len(), 2, "{m:?}");
}
