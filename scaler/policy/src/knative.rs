//! Knative autoscaler keys (`stable-window`, `panic-window-percentage`, …) parsed and range-checked.
//!
//! The same keys arrive from three places: the global `config-autoscaler` ConfigMap, the
//! `knative:` block of a policy file, and per-service annotations (see [`crate::annotations`]).

use std::time::Duration;

use crate::config::{Algorithm, KpaConfig};
use crate::metric::Metric;
use crate::time::{fmt_duration, parse_duration};
use crate::validate::ValidationError;

/// Keys that set policy-level values rather than KPA settings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KnativeOverrides {
    /// `min-scale`.
    pub min_scale: Option<u32>,
    /// `max-scale` (0 means no limit).
    pub max_scale: Option<u32>,
    /// `target`.
    pub target: Option<f64>,
    /// `metric` (`concurrency`, `rps`, `cpu`, `memory`).
    pub metric: Option<Metric>,
    /// `class` (`kpa.autoscaling.knative.dev` or `hpa.autoscaling.knative.dev`).
    pub class: Option<Algorithm>,
}

/// Every key understood, global spelling first.
pub const KEYS: &[&str] = &[
    "stable-window",
    "window",
    "panic-window-percentage",
    "panic-threshold-percentage",
    "target-utilization-percentage",
    "container-concurrency-target-percentage",
    "max-scale-up-rate",
    "max-scale-down-rate",
    "scale-down-delay",
    "scale-to-zero-grace-period",
    "scale-to-zero-pod-retention-period",
    "initial-scale",
    "allow-zero-initial-scale",
    "activation-scale",
    "enable-scale-to-zero",
    "container-concurrency-target-default",
    "requests-per-second-target-default",
    "min-scale",
    "max-scale",
    "target",
    "metric",
    "class",
];

/// Applies one key. `field` is the name to show in messages (the key as the user wrote it).
pub fn apply(
    cfg: &mut KpaConfig,
    over: &mut KnativeOverrides,
    key: &str,
    text: &str,
    field: &str,
) -> Result<(), ValidationError> {
    let text = text.trim();
    match key {
        "stable-window" | "window" => {
            cfg.stable_window = duration_between(field, text, secs(6), secs(3600))?;
            if cfg.stable_window.subsec_millis() != 0 {
                return Err(ValidationError::new(
                    field,
                    text,
                    "specified with at most second precision",
                ));
            }
        }
        "panic-window-percentage" => cfg.panic_window_percentage = f64_between(field, text, 1.0, 100.0)?,
        "panic-threshold-percentage" => {
            cfg.panic_threshold_percentage = f64_between(field, text, 110.0, 1000.0)?
        }
        "target-utilization-percentage" | "container-concurrency-target-percentage" => {
            cfg.target_utilization_percentage = f64_between(field, text, 1.0, 100.0)?
        }
        "max-scale-up-rate" => cfg.max_scale_up_rate = f64_greater(field, text, 1.0)?,
        "max-scale-down-rate" => cfg.max_scale_down_rate = f64_greater(field, text, 1.0)?,
        "scale-down-delay" => {
            cfg.scale_down_delay = duration_between(field, text, Duration::ZERO, secs(3600))?
        }
        "scale-to-zero-grace-period" => {
            cfg.scale_to_zero_grace_period = duration_at_least(field, text, secs(6))?
        }
        "scale-to-zero-pod-retention-period" => {
            cfg.scale_to_zero_pod_retention_period = duration_at_least(field, text, Duration::ZERO)?
        }
        "initial-scale" | "initialScale" => cfg.initial_scale = count_at_least(field, text, 0)?,
        "allow-zero-initial-scale" => cfg.allow_zero_initial_scale = boolean(field, text)?,
        "activation-scale" => cfg.activation_scale = count_at_least(field, text, 1)?,
        "enable-scale-to-zero" => cfg.enable_scale_to_zero = boolean(field, text)?,
        "container-concurrency-target-default" => {
            cfg.container_concurrency_target_default = f64_at_least(field, text, 0.01)?
        }
        "requests-per-second-target-default" => {
            cfg.requests_per_second_target_default = f64_at_least(field, text, 0.01)?
        }
        "min-scale" | "minScale" => over.min_scale = Some(count_at_least(field, text, 0)?),
        "max-scale" | "maxScale" => over.max_scale = Some(count_at_least(field, text, 0)?),
        "target" => over.target = Some(f64_at_least(field, text, 0.01)?),
        "metric" => {
            over.metric = Some(match text {
                "concurrency" => Metric::Concurrency,
                "rps" => Metric::Rps,
                "cpu" => Metric::Cpu,
                "memory" => Metric::Memory,
                _ => {
                    return Err(ValidationError::new(
                        field,
                        text,
                        "one of concurrency, rps, cpu, memory",
                    ))
                }
            })
        }
        "class" => {
            over.class = Some(match text {
                "kpa.autoscaling.knative.dev" | "kpa" => Algorithm::Kpa,
                "hpa.autoscaling.knative.dev" | "hpa" => Algorithm::Hpa,
                _ => {
                    return Err(ValidationError::new(
                        field,
                        text,
                        "one of kpa.autoscaling.knative.dev, hpa.autoscaling.knative.dev",
                    ))
                }
            })
        }
        _ => {
            return Err(ValidationError::new(
                field,
                text,
                "a known Knative autoscaler key (stable-window, panic-window-percentage, \
                 panic-threshold-percentage, target-utilization-percentage, max-scale-up-rate, \
                 max-scale-down-rate, scale-down-delay, scale-to-zero-grace-period, …)",
            ))
        }
    }
    Ok(())
}

/// Checks that need several keys at once.
pub fn check(cfg: &KpaConfig, field_prefix: &str) -> Result<(), ValidationError> {
    if cfg.initial_scale == 0 && !cfg.allow_zero_initial_scale {
        return Err(ValidationError::new(
            format!("{field_prefix}initial-scale"),
            0,
            "at least 1 unless allow-zero-initial-scale is true",
        ));
    }
    Ok(())
}

/// Builds the global KPA settings from `config-autoscaler` style pairs.
pub fn from_map<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<(KpaConfig, KnativeOverrides), Vec<ValidationError>> {
    let mut cfg = KpaConfig::default();
    let mut over = KnativeOverrides::default();
    let mut errors = Vec::new();
    for (k, v) in pairs {
        if let Err(e) = apply(&mut cfg, &mut over, k, v, k) {
            errors.push(e);
        }
    }
    if let Err(e) = check(&cfg, "") {
        errors.push(e);
    }
    if errors.is_empty() {
        Ok((cfg, over))
    } else {
        Err(errors)
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn number(field: &str, text: &str) -> Result<f64, ValidationError> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(ValidationError::new(field, text, "a number")),
    }
}

pub(crate) fn f64_between(field: &str, text: &str, lo: f64, hi: f64) -> Result<f64, ValidationError> {
    let v = number(field, text)?;
    if v < lo || v > hi {
        return Err(ValidationError::new(
            field,
            text,
            format!("between {lo} and {hi}"),
        ));
    }
    Ok(v)
}

fn f64_greater(field: &str, text: &str, lo: f64) -> Result<f64, ValidationError> {
    let v = number(field, text)?;
    if v <= lo {
        return Err(ValidationError::new(field, text, format!("greater than {lo}")));
    }
    Ok(v)
}

fn f64_at_least(field: &str, text: &str, lo: f64) -> Result<f64, ValidationError> {
    let v = number(field, text)?;
    if v < lo {
        return Err(ValidationError::new(field, text, format!("at least {lo}")));
    }
    Ok(v)
}

fn count_at_least(field: &str, text: &str, lo: u32) -> Result<u32, ValidationError> {
    let v = number(field, text)?;
    if v.fract() != 0.0 {
        return Err(ValidationError::new(field, text, "a whole number"));
    }
    if v < f64::from(lo) || v > f64::from(u32::MAX) {
        return Err(ValidationError::new(field, text, format!("at least {lo}")));
    }
    Ok(v as u32)
}

fn boolean(field: &str, text: &str) -> Result<bool, ValidationError> {
    match text {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(ValidationError::new(field, text, "true or false")),
    }
}

fn duration(field: &str, text: &str) -> Result<Duration, ValidationError> {
    parse_duration(text).map_err(|_| ValidationError::new(field, text, "a duration such as 30s"))
}

fn duration_between(
    field: &str,
    text: &str,
    lo: Duration,
    hi: Duration,
) -> Result<Duration, ValidationError> {
    let d = duration(field, text)?;
    if d < lo || d > hi {
        return Err(ValidationError::new(
            field,
            text,
            format!("between {} and {}", fmt_duration(lo), fmt_duration(hi)),
        ));
    }
    Ok(d)
}

fn duration_at_least(field: &str, text: &str, lo: Duration) -> Result<Duration, ValidationError> {
    let d = duration(field, text)?;
    if d < lo {
        return Err(ValidationError::new(
            field,
            text,
            format!("at least {}", fmt_duration(lo)),
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_config_map_uses_the_same_keys() {
        let (cfg, over) = from_map([
            ("stable-window", "40s"),
            ("panic-threshold-percentage", "150.0"),
            ("max-scale", "0"),
        ])
        .expect("valid");
        assert_eq!(cfg.stable_window, Duration::from_secs(40));
        assert_eq!(cfg.panic_threshold_percentage, 150.0);
        assert_eq!(over.max_scale, Some(0));
        let errs = from_map([("panic-threshold-percentage", "90"), ("max-scale-up-rate", "0.5")])
            .expect_err("invalid");
        let msgs: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(
            msgs,
            [
                "panic-threshold-percentage = 90, must be between 110 and 1000",
                "max-scale-up-rate = 0.5, must be greater than 1",
            ]
        );
    }
}
