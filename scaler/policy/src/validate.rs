//! Range checks that turn a [`PolicySpec`] into a valid [`Policy`], with messages naming field, value and range.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;
use serde_yaml::Value;

use crate::config::{
    Algorithm, Behavior, Cooldown, Defaults, Fallback, HpaPolicy, HpaPolicyType, Policy, Rule, ScalingRules,
    SelectPolicy, Trigger,
};
use crate::knative::{self, KnativeOverrides};
use crate::metric::{Metric, MetricType};
use crate::spec::{
    scalar_text, BehaviorSpec, PolicyFile, PolicySpec, RuleSpec, ScalingRulesSpec, TriggerSpec,
};
use crate::time::parse_duration;

/// One rejected value: renders as `panic-threshold-percentage = 90, must be between 110 and 1000`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field} = {value}, must be {allowed}")]
pub struct ValidationError {
    /// The field as the user named it (`minReplicaCount`, `behavior.scaleDown.policies[0].value`,
    /// `autoscaling.knative.dev/window`, `MIN_REPLICAS`).
    pub field: String,
    /// The rejected value as written.
    pub value: String,
    /// What is allowed (`between 110 and 1000`, `at least 0`, `one of Max, Min, Disabled`).
    pub allowed: String,
}

impl ValidationError {
    /// Builds an error.
    pub fn new(field: impl Into<String>, value: impl fmt::Display, allowed: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }
}

/// All problems found in one input, in field order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// Why a policy file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Not YAML of the expected shape (unknown field, wrong type…); the message names the field.
    #[error("{0}")]
    Parse(String),
    /// Neither `policy:` nor `spec:` is present.
    #[error("the file has neither a `policy:` nor a `spec:` section")]
    Empty,
    /// Values out of range.
    #[error("{0}")]
    Invalid(#[from] ValidationErrors),
}

/// Parses and validates one policy file. `fallback_name` (usually the file stem) names the policy
/// when the file does not.
pub fn parse_policy(yaml: &str, defaults: &Defaults, fallback_name: &str) -> Result<Policy, PolicyError> {
    let file: PolicyFile = serde_yaml::from_str(yaml).map_err(|e| PolicyError::Parse(e.to_string()))?;
    resolve_file(&file, defaults, fallback_name)
}

/// Validates a parsed policy file (annotations included).
pub fn resolve_file(
    file: &PolicyFile,
    defaults: &Defaults,
    fallback_name: &str,
) -> Result<Policy, PolicyError> {
    let mut spec = match (&file.policy, &file.spec) {
        (Some(p), _) => p.clone(),
        (None, Some(s)) => s.clone(),
        (None, None) => return Err(PolicyError::Empty),
    };
    let mut name = fallback_name.to_string();
    if let Some(meta) = &file.metadata {
        if let Some(n) = &meta.name {
            name.clone_from(n);
        }
        crate::annotations::merge(&mut spec, &meta.annotations)?;
    }
    Ok(resolve(&spec, defaults, &name)?)
}

/// Validates a policy spec, filling documented defaults.
pub fn resolve(
    spec: &PolicySpec,
    defaults: &Defaults,
    fallback_name: &str,
) -> Result<Policy, ValidationErrors> {
    let mut errs = Vec::new();
    let mut e = |r: Result<(), ValidationError>| {
        if let Err(x) = r {
            errs.push(x);
        }
    };

    // Knative keys: file keys first, then annotations (which override them).
    let mut kpa = defaults.knative.clone();
    let mut over = KnativeOverrides::default();
    let (annotated, plain): (Vec<_>, Vec<_>) = spec
        .knative
        .iter()
        .partition(|(k, _)| k.starts_with(crate::annotations::KNATIVE_PREFIX));
    for (k, v) in plain.into_iter().chain(annotated) {
        let key = k.strip_prefix(crate::annotations::KNATIVE_PREFIX).unwrap_or(k);
        let field = k.clone();
        match scalar_text(v) {
            Some(text) => e(knative::apply(&mut kpa, &mut over, key, &text, &field)),
            None => e(Err(ValidationError::new(
                field,
                "(not a scalar)",
                "a number, duration or string",
            ))),
        }
    }
    e(knative::check(&kpa, ""));

    let has_rules = !spec.scale_up_rules.is_empty() || !spec.scale_down_rules.is_empty();
    let algorithm = match spec.algorithm.as_deref() {
        Some(a) => match Algorithm::parse(a) {
            Some(alg) => alg,
            None => {
                e(Err(ValidationError::new(
                    "algorithm",
                    a,
                    "one of kpa, hpa, rules",
                )));
                Algorithm::Hpa
            }
        },
        None if has_rules => Algorithm::Rules,
        None => over.class.unwrap_or(if spec.knative.is_empty() {
            Algorithm::Hpa
        } else {
            Algorithm::Kpa
        }),
    };
    if has_rules && algorithm != Algorithm::Rules {
        e(Err(ValidationError::new(
            "algorithm",
            format!("{algorithm:?}").to_lowercase(),
            "rules when scaleUpRules or scaleDownRules are given",
        )));
    }
    if !has_rules && algorithm == Algorithm::Rules {
        e(Err(ValidationError::new(
            "scaleUpRules",
            "[]",
            "non-empty when algorithm is rules",
        )));
    }

    // Replica bounds.
    // Knative's min-scale/max-scale (file block or annotation) override KEDA's names.
    let keda_min = opt_count(&mut e, "minReplicaCount", spec.min_replica_count, 0);
    let keda_max = opt_count(&mut e, "maxReplicaCount", spec.max_replica_count, 1);
    let min = over.min_scale.or(keda_min).unwrap_or(defaults.min_replicas);
    let max = match over.max_scale {
        Some(0) => u32::MAX,
        Some(m) => m,
        None => keda_max.unwrap_or(defaults.max_replicas),
    };
    if min > max {
        e(Err(ValidationError::new(
            "minReplicaCount",
            min,
            format!("at most maxReplicaCount ({max})"),
        )));
    }
    let idle = opt_count(&mut e, "idleReplicaCount", spec.idle_replica_count, 0);
    if let Some(i) = idle {
        if i >= min {
            e(Err(ValidationError::new(
                "idleReplicaCount",
                i,
                format!("less than minReplicaCount ({min})"),
            )));
        }
    }

    let polling = match spec.polling_interval {
        Some(p) => secs(count(&mut e, "pollingInterval", p, 1).unwrap_or(30)),
        None if algorithm == Algorithm::Kpa => Duration::from_secs(2),
        None => Duration::from_secs(30),
    };
    let cooldown_period = match spec.cooldown_period {
        Some(c) => secs(count(&mut e, "cooldownPeriod", c, 0).unwrap_or(300)),
        None if algorithm == Algorithm::Kpa => Duration::ZERO,
        None => Duration::from_secs(300),
    };
    let initial_cooldown =
        secs(opt_count(&mut e, "initialCooldownPeriod", spec.initial_cooldown_period, 0).unwrap_or(0));

    let fallback = spec.fallback.as_ref().and_then(|f| {
        let t = match f.failure_threshold {
            Some(t) => count(&mut e, "fallback.failureThreshold", t, 1),
            None => {
                e(Err(ValidationError::new(
                    "fallback.failureThreshold",
                    "(missing)",
                    "set when fallback is given",
                )));
                None
            }
        };
        let r = match f.replicas {
            Some(r) => count(&mut e, "fallback.replicas", r, 0),
            None => {
                e(Err(ValidationError::new(
                    "fallback.replicas",
                    "(missing)",
                    "set when fallback is given",
                )));
                None
            }
        };
        Some(Fallback {
            failure_threshold: t?,
            replicas: r?,
        })
    });
    let paused_replicas = opt_count(&mut e, "pausedReplicas", spec.paused_replicas, 0);

    // Triggers.
    let mut triggers: Vec<Trigger> = spec
        .triggers
        .iter()
        .enumerate()
        .filter_map(|(i, t)| trigger(&mut e, i, t, defaults, &kpa))
        .collect();
    if triggers.is_empty() && algorithm != Algorithm::Rules {
        triggers = default_triggers(algorithm, &over, defaults, &kpa);
    } else if let (Some(first), true) = (
        triggers.first_mut(),
        over.target.is_some() || over.metric.is_some(),
    ) {
        if let Some(m) = &over.metric {
            first.metric = m.clone();
            first.metric_type = m.default_type();
        }
        if let Some(t) = over.target {
            first.target = t;
        }
    }

    // HPA behavior.
    let (behavior_spec, prefix) = match (
        &spec.behavior,
        spec.advanced
            .as_ref()
            .and_then(|a| a.horizontal_pod_autoscaler_config.as_ref())
            .and_then(|h| h.behavior.as_ref()),
    ) {
        (Some(b), _) => (Some(b), "behavior"),
        (None, Some(b)) => (Some(b), "advanced.horizontalPodAutoscalerConfig.behavior"),
        (None, None) => (None, ""),
    };
    let behavior = match behavior_spec {
        Some(b) => Some(behavior(&mut e, prefix, b)),
        None if algorithm == Algorithm::Hpa => Some(Behavior::default()),
        None => None,
    };

    // Rules and cooldown.
    let scale_up_rules = rules(&mut e, "scaleUpRules", &spec.scale_up_rules);
    let scale_down_rules = rules(&mut e, "scaleDownRules", &spec.scale_down_rules);
    let cooldown = match &spec.cooldown {
        Some(c) => Some(Cooldown {
            scale_up: opt_duration(&mut e, "cooldown.scaleUp", c.scale_up.as_ref())
                .unwrap_or(defaults.cooldown.scale_up),
            scale_down: opt_duration(&mut e, "cooldown.scaleDown", c.scale_down.as_ref())
                .unwrap_or(defaults.cooldown.scale_down),
        }),
        None if algorithm == Algorithm::Rules => Some(defaults.cooldown),
        None => None,
    };

    if !errs.is_empty() {
        return Err(ValidationErrors(errs));
    }
    Ok(Policy {
        name: spec.name.clone().unwrap_or_else(|| fallback_name.to_string()),
        algorithm,
        min_replicas: min,
        max_replicas: max,
        idle_replicas: idle,
        polling_interval: polling,
        cooldown_period,
        initial_cooldown_period: initial_cooldown,
        fallback,
        paused: spec.paused.unwrap_or(false),
        paused_replicas,
        restore_to_original_replica_count: spec
            .advanced
            .as_ref()
            .and_then(|a| a.restore_to_original_replica_count)
            .unwrap_or(false),
        triggers,
        knative: kpa,
        behavior,
        scale_up_rules,
        scale_down_rules,
        cooldown,
    })
}

type Sink<'a> = dyn FnMut(Result<(), ValidationError>) + 'a;

fn secs(s: u32) -> Duration {
    Duration::from_secs(u64::from(s))
}

fn count(e: &mut Sink<'_>, field: &str, v: i64, lo: u32) -> Option<u32> {
    if v < i64::from(lo) {
        e(Err(ValidationError::new(field, v, format!("at least {lo}"))));
        return None;
    }
    match u32::try_from(v) {
        Ok(c) => Some(c),
        Err(_) => {
            e(Err(ValidationError::new(
                field,
                v,
                format!("at most {}", u32::MAX),
            )));
            None
        }
    }
}

fn opt_count(e: &mut Sink<'_>, field: &str, v: Option<i64>, lo: u32) -> Option<u32> {
    v.and_then(|v| count(e, field, v, lo))
}

fn number(e: &mut Sink<'_>, field: &str, v: &Value) -> Option<f64> {
    let text = scalar_text(v).unwrap_or_else(|| "(not a scalar)".to_string());
    match text.parse::<f64>() {
        Ok(x) if x.is_finite() => Some(x),
        _ => {
            e(Err(ValidationError::new(field, text, "a number")));
            None
        }
    }
}

fn opt_duration(e: &mut Sink<'_>, field: &str, v: Option<&Value>) -> Option<Duration> {
    let text = scalar_text(v?).unwrap_or_default();
    match parse_duration(&text) {
        Ok(d) => Some(d),
        Err(_) => {
            e(Err(ValidationError::new(field, text, "a duration such as 180s")));
            None
        }
    }
}

fn parse_metric(e: &mut Sink<'_>, field: &str, name: &str) -> Option<Metric> {
    let m = Metric::parse(name);
    if m.is_none() {
        e(Err(ValidationError::new(
            field,
            name,
            "a known metric (rps, concurrency, cpu, memory, latency_p50, latency_p90, latency_p99, \
             held_connections, external:<name>)",
        )));
    }
    m
}

fn trigger(
    e: &mut Sink<'_>,
    i: usize,
    t: &TriggerSpec,
    d: &Defaults,
    kpa: &crate::config::KpaConfig,
) -> Option<Trigger> {
    let f = |name: &str| format!("triggers[{i}].{name}");
    let meta = |k: &str| t.metadata.get(k);
    let metric = match (&t.metric, t.kind.as_deref()) {
        (Some(m), _) => parse_metric(e, &f("metric"), m)?,
        (None, Some("cpu")) => Metric::Cpu,
        (None, Some("memory")) => Metric::Memory,
        (None, Some(kind)) => {
            let n = t
                .name
                .clone()
                .or_else(|| meta("metricName").and_then(scalar_text))
                .unwrap_or_else(|| kind.to_string());
            Metric::External(n.as_str().into())
        }
        (None, None) => {
            e(Err(ValidationError::new(
                f("metric"),
                "(missing)",
                "set (or a KEDA `type`)",
            )));
            return None;
        }
    };
    let metric_type = match t.metric_type.as_deref().or(meta("type").and_then(Value::as_str)) {
        Some(s) => match MetricType::parse(s) {
            Some(mt) => mt,
            None => {
                e(Err(ValidationError::new(
                    f("metricType"),
                    s,
                    "one of AverageValue, Value, Utilization",
                )));
                return None;
            }
        },
        None => metric.default_type(),
    };
    let target_value = t
        .threshold
        .as_ref()
        .map(|v| (f("threshold"), v))
        .or_else(|| t.target.as_ref().map(|v| (f("target"), v)))
        .or_else(|| meta("threshold").map(|v| (f("metadata.threshold"), v)))
        .or_else(|| meta("value").map(|v| (f("metadata.value"), v)));
    let target = match target_value {
        Some((field, v)) => {
            let x = number(e, &field, v)?;
            if x <= 0.0 {
                e(Err(ValidationError::new(field, x, "greater than 0")));
                return None;
            }
            x
        }
        None => match metric {
            Metric::Cpu => d.target_cpu,
            Metric::Memory => d.target_memory,
            Metric::Concurrency => kpa.container_concurrency_target_default,
            Metric::Rps => kpa.requests_per_second_target_default,
            _ => {
                e(Err(ValidationError::new(
                    f("threshold"),
                    "(missing)",
                    format!("set for metric {metric}"),
                )));
                return None;
            }
        },
    };
    let activation_threshold = match t
        .activation_threshold
        .as_ref()
        .map(|v| (f("activationThreshold"), v))
        .or_else(|| meta("activationThreshold").map(|v| (f("metadata.activationThreshold"), v)))
        .or_else(|| meta("activationValue").map(|v| (f("metadata.activationValue"), v)))
    {
        Some((field, v)) => {
            let x = number(e, &field, v)?;
            if x < 0.0 {
                e(Err(ValidationError::new(field, x, "at least 0")));
                return None;
            }
            x
        }
        None => 0.0,
    };
    Some(Trigger {
        metric,
        metric_type,
        target,
        activation_threshold,
        query: t.query.clone().or_else(|| meta("query").and_then(scalar_text)),
        server_address: meta("serverAddress").and_then(scalar_text),
    })
}

/// Without triggers: Knative's metric/target for `kpa`, CPU and memory utilization
/// (`TARGET_CPU_USAGE`, `TARGET_MEM_USAGE`) for `hpa`.
fn default_triggers(
    alg: Algorithm,
    over: &KnativeOverrides,
    d: &Defaults,
    kpa: &crate::config::KpaConfig,
) -> Vec<Trigger> {
    let mk = |metric: Metric, target: f64| Trigger {
        metric_type: metric.default_type(),
        metric,
        target,
        activation_threshold: 0.0,
        query: None,
        server_address: None,
    };
    let default_target = |m: &Metric| match m {
        Metric::Rps => kpa.requests_per_second_target_default,
        Metric::Cpu => d.target_cpu,
        Metric::Memory => d.target_memory,
        _ => kpa.container_concurrency_target_default,
    };
    match (&over.metric, alg) {
        (Some(m), _) => vec![mk(m.clone(), over.target.unwrap_or_else(|| default_target(m)))],
        (None, Algorithm::Kpa) => vec![mk(
            Metric::Concurrency,
            over.target.unwrap_or(kpa.container_concurrency_target_default),
        )],
        (None, _) => vec![
            mk(Metric::Cpu, over.target.unwrap_or(d.target_cpu)),
            mk(Metric::Memory, d.target_memory),
        ],
    }
}

fn behavior(e: &mut Sink<'_>, prefix: &str, b: &BehaviorSpec) -> Behavior {
    let d = Behavior::default();
    Behavior {
        scale_up: scaling_rules(e, &format!("{prefix}.scaleUp"), b.scale_up.as_ref(), d.scale_up),
        scale_down: scaling_rules(
            e,
            &format!("{prefix}.scaleDown"),
            b.scale_down.as_ref(),
            d.scale_down,
        ),
    }
}

fn scaling_rules(
    e: &mut Sink<'_>,
    p: &str,
    s: Option<&ScalingRulesSpec>,
    mut out: ScalingRules,
) -> ScalingRules {
    let Some(s) = s else { return out };
    if let Some(w) = s.stabilization_window_seconds {
        if !(0..=3600).contains(&w) {
            e(Err(ValidationError::new(
                format!("{p}.stabilizationWindowSeconds"),
                w,
                "between 0 and 3600",
            )));
        } else {
            out.stabilization_window = Duration::from_secs(w as u64);
        }
    }
    if let Some(sp) = &s.select_policy {
        match sp.as_str() {
            "Max" => out.select_policy = SelectPolicy::Max,
            "Min" => out.select_policy = SelectPolicy::Min,
            "Disabled" => out.select_policy = SelectPolicy::Disabled,
            other => e(Err(ValidationError::new(
                format!("{p}.selectPolicy"),
                other,
                "one of Max, Min, Disabled",
            ))),
        }
    }
    if let Some(t) = s.tolerance {
        if !(0.0..1.0).contains(&t) {
            e(Err(ValidationError::new(
                format!("{p}.tolerance"),
                t,
                "at least 0 and less than 1",
            )));
        } else {
            out.tolerance = t;
        }
    }
    if let Some(policies) = &s.policies {
        if policies.is_empty() && out.select_policy != SelectPolicy::Disabled {
            e(Err(ValidationError::new(
                format!("{p}.policies"),
                "[]",
                "at least one policy unless selectPolicy is Disabled",
            )));
        }
        out.policies = policies
            .iter()
            .enumerate()
            .filter_map(|(i, pol)| {
                let f = |n: &str| format!("{p}.policies[{i}].{n}");
                let kind = match pol.kind.as_str() {
                    "Pods" => Some(HpaPolicyType::Pods),
                    "Percent" => Some(HpaPolicyType::Percent),
                    other => {
                        e(Err(ValidationError::new(
                            f("type"),
                            other,
                            "one of Pods, Percent",
                        )));
                        None
                    }
                };
                let value = if pol.value <= 0 || pol.value > i64::from(u32::MAX) {
                    e(Err(ValidationError::new(f("value"), pol.value, "greater than 0")));
                    None
                } else {
                    Some(pol.value as u32)
                };
                let period = if !(1..=1800).contains(&pol.period_seconds) {
                    e(Err(ValidationError::new(
                        f("periodSeconds"),
                        pol.period_seconds,
                        "between 1 and 1800",
                    )));
                    None
                } else {
                    Some(Duration::from_secs(pol.period_seconds as u64))
                };
                Some(HpaPolicy {
                    kind: kind?,
                    value: value?,
                    period: period?,
                })
            })
            .collect();
    }
    out
}

fn rules(e: &mut Sink<'_>, p: &str, specs: &[RuleSpec]) -> Vec<Rule> {
    specs
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let f = |n: &str| format!("{p}[{i}].{n}");
            let metric = parse_metric(e, &f("metric"), &r.metric);
            let scale_by = count(e, &f("scaleBy"), r.scale_by.unwrap_or(1), 1);
            let periods = count(e, &f("evaluationPeriods"), r.evaluation_periods.unwrap_or(1), 1);
            if !r.threshold.is_finite() {
                e(Err(ValidationError::new(
                    f("threshold"),
                    r.threshold,
                    "a finite number",
                )));
                return None;
            }
            Some(Rule {
                metric: metric?,
                threshold: r.threshold,
                scale_by: scale_by?,
                evaluation_periods: periods?,
            })
        })
        .collect()
}

/// Helper for callers holding string maps (e.g. ConfigMaps) of annotations.
pub fn annotations_map<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> BTreeMap<String, String> {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests;
