//! Environment variables (`SCALING_POLICY`, `MIN_REPLICAS`, …) read through an injected [`EnvSource`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::config::{Cooldown, Defaults, KpaConfig};
use crate::validate::{ValidationError, ValidationErrors};

/// Name of the policy used for services without one of their own (`default`).
pub const SCALING_POLICY: &str = "SCALING_POLICY";
/// Default `minReplicaCount` for policies that do not set it.
pub const MIN_REPLICAS: &str = "MIN_REPLICAS";
/// Default `maxReplicaCount` for policies that do not set it.
pub const MAX_REPLICAS: &str = "MAX_REPLICAS";
/// Where metrics come from: `agent` or `prometheus` (`prometheus`).
pub const METRIC_PROVIDER: &str = "METRIC_PROVIDER";
/// Prometheus base URL; required when `METRIC_PROVIDER=prometheus` and a policy uses it.
pub const PROMETHEUS_ENDPOINT: &str = "PROMETHEUS_ENDPOINT";
/// Scale-up cooldown in seconds (300).
pub const COOLDOWN_SCALE_UP: &str = "COOLDOWN_SCALE_UP";
/// Scale-down cooldown in seconds (600).
pub const COOLDOWN_SCALE_DOWN: &str = "COOLDOWN_SCALE_DOWN";
/// CPU utilization target in percent (70).
pub const TARGET_CPU_USAGE: &str = "TARGET_CPU_USAGE";
/// Memory utilization target in percent (80).
pub const TARGET_MEM_USAGE: &str = "TARGET_MEM_USAGE";
/// The policy directory (`/etc/surge/policies`).
pub const SURGE_POLICY_DIR: &str = "SURGE_POLICY_DIR";
/// Default policy directory.
pub const DEFAULT_POLICY_DIR: &str = "/etc/surge/policies";

/// Where variables come from: the process environment in `main`, a map in tests.
pub trait EnvSource {
    /// The value of `name`, if set.
    fn get(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Copy, Clone, Debug, Default)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl EnvSource for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name).cloned()
    }
}

impl EnvSource for [(&str, &str)] {
    fn get(&self, name: &str) -> Option<String> {
        self.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }
}

/// Metric provider.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricProvider {
    /// Surge's agents.
    Agent,
    /// A Prometheus server.
    Prometheus,
}

/// Settings from the environment.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvConfig {
    /// `SCALING_POLICY`.
    pub scaling_policy: String,
    /// `METRIC_PROVIDER`.
    pub metric_provider: MetricProvider,
    /// `PROMETHEUS_ENDPOINT`.
    pub prometheus_endpoint: Option<String>,
    /// `SURGE_POLICY_DIR`.
    pub policy_dir: String,
    /// What policies inherit.
    pub defaults: Defaults,
}

impl EnvConfig {
    /// Reads and checks every variable; all problems are reported at once.
    pub fn from_env(env: &(impl EnvSource + ?Sized), knative: KpaConfig) -> Result<Self, ValidationErrors> {
        let mut errs = Vec::new();
        let mut int = |name: &str, default: u32, lo: u32| -> u32 {
            let Some(text) = env.get(name) else {
                return default;
            };
            match text.trim().parse::<i64>() {
                Ok(v) if v >= i64::from(lo) && v <= i64::from(u32::MAX) => v as u32,
                Ok(_) => {
                    errs.push(ValidationError::new(name, text.trim(), format!("at least {lo}")));
                    default
                }
                Err(_) => {
                    errs.push(ValidationError::new(name, text.trim(), "a whole number"));
                    default
                }
            }
        };
        let min = int(MIN_REPLICAS, 0, 0);
        let max = int(MAX_REPLICAS, 100, 1);
        let up = int(COOLDOWN_SCALE_UP, 300, 0);
        let down = int(COOLDOWN_SCALE_DOWN, 600, 0);
        let cpu = int(TARGET_CPU_USAGE, 70, 1);
        let mem = int(TARGET_MEM_USAGE, 80, 1);
        if min > max {
            errs.push(ValidationError::new(
                MIN_REPLICAS,
                min,
                format!("at most MAX_REPLICAS ({max})"),
            ));
        }
        for (name, v) in [(TARGET_CPU_USAGE, cpu), (TARGET_MEM_USAGE, mem)] {
            if v > 100 {
                errs.push(ValidationError::new(name, v, "between 1 and 100"));
            }
        }
        let metric_provider = match env.get(METRIC_PROVIDER).as_deref().map(str::trim) {
            None | Some("prometheus") => MetricProvider::Prometheus,
            Some("agent") => MetricProvider::Agent,
            Some(other) => {
                errs.push(ValidationError::new(
                    METRIC_PROVIDER,
                    other,
                    "one of agent, prometheus",
                ));
                MetricProvider::Prometheus
            }
        };
        let prometheus_endpoint = env.get(PROMETHEUS_ENDPOINT).map(|s| s.trim().to_string());
        if let Some(url) = &prometheus_endpoint {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                errs.push(ValidationError::new(
                    PROMETHEUS_ENDPOINT,
                    url,
                    "an http:// or https:// URL",
                ));
            }
        }
        let scaling_policy = env.get(SCALING_POLICY).unwrap_or_else(|| "default".to_string());
        if scaling_policy.is_empty() || scaling_policy.contains('/') {
            errs.push(ValidationError::new(
                SCALING_POLICY,
                &scaling_policy,
                "a policy file name without '/'",
            ));
        }
        if !errs.is_empty() {
            return Err(ValidationErrors(errs));
        }
        Ok(EnvConfig {
            scaling_policy,
            metric_provider,
            prometheus_endpoint,
            policy_dir: env
                .get(SURGE_POLICY_DIR)
                .unwrap_or_else(|| DEFAULT_POLICY_DIR.to_string()),
            defaults: Defaults {
                min_replicas: min,
                max_replicas: max,
                cooldown: Cooldown {
                    scale_up: Duration::from_secs(u64::from(up)),
                    scale_down: Duration::from_secs(u64::from(down)),
                },
                target_cpu: f64::from(cpu),
                target_memory: f64::from(mem),
                knative,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vars: &[(&str, &str)]) -> Result<EnvConfig, ValidationErrors> {
        EnvConfig::from_env(vars, KpaConfig::default())
    }

    #[test]
    fn documented_defaults() {
        let c = cfg(&[]).expect("empty env is valid");
        assert_eq!(c.scaling_policy, "default");
        assert_eq!(c.metric_provider, MetricProvider::Prometheus);
        assert_eq!(c.policy_dir, "/etc/surge/policies");
        assert_eq!(c.defaults.cooldown.scale_up, Duration::from_secs(300));
        assert_eq!(c.defaults.cooldown.scale_down, Duration::from_secs(600));
        assert_eq!(c.defaults.target_cpu, 70.0);
        assert_eq!(c.defaults.target_memory, 80.0);
        assert_eq!((c.defaults.min_replicas, c.defaults.max_replicas), (0, 100));
    }

    #[test]
    fn seed_compose_file_values() {
        let c = cfg(&[
            ("SCALING_POLICY", "ecommerce"),
            ("MIN_REPLICAS", "3"),
            ("MAX_REPLICAS", "15"),
            ("METRIC_PROVIDER", "prometheus"),
            ("PROMETHEUS_ENDPOINT", "http://prometheus:9090"),
            ("COOLDOWN_SCALE_UP", "180"),
            ("COOLDOWN_SCALE_DOWN", "300"),
        ])
        .expect("valid");
        assert_eq!(c.scaling_policy, "ecommerce");
        assert_eq!((c.defaults.min_replicas, c.defaults.max_replicas), (3, 15));
        assert_eq!(c.defaults.cooldown.scale_up, Duration::from_secs(180));
        // A policy without bounds inherits them.
        let p = crate::parse_policy(
            "policy:\n  triggers: [{metric: rps, threshold: 5}]\n",
            &c.defaults,
            "x",
        )
        .expect("valid");
        assert_eq!((p.min_replicas, p.max_replicas), (3, 15));
        // The built-in default policy scales on CPU and memory utilization.
        let p = crate::parse_policy("policy: {}\n", &c.defaults, "default").expect("valid");
        assert_eq!(p.triggers.len(), 2);
        assert_eq!((p.triggers[0].target, p.triggers[1].target), (70.0, 80.0));
    }

    #[test]
    fn messages_name_the_variable() {
        let msgs = |vars: &[(&str, &str)]| -> Vec<String> {
            match cfg(vars) {
                Ok(_) => vec![],
                Err(e) => e.0.iter().map(ToString::to_string).collect(),
            }
        };
        assert_eq!(
            msgs(&[("MIN_REPLICAS", "-1")]),
            ["MIN_REPLICAS = -1, must be at least 0"]
        );
        assert_eq!(
            msgs(&[("MAX_REPLICAS", "ten")]),
            ["MAX_REPLICAS = ten, must be a whole number"]
        );
        assert_eq!(
            msgs(&[("MIN_REPLICAS", "5"), ("MAX_REPLICAS", "2")]),
            ["MIN_REPLICAS = 5, must be at most MAX_REPLICAS (2)"]
        );
        assert_eq!(
            msgs(&[("TARGET_CPU_USAGE", "150")]),
            ["TARGET_CPU_USAGE = 150, must be between 1 and 100"]
        );
        assert_eq!(
            msgs(&[("METRIC_PROVIDER", "datadog")]),
            ["METRIC_PROVIDER = datadog, must be one of agent, prometheus"]
        );
        assert_eq!(
            msgs(&[("PROMETHEUS_ENDPOINT", "prometheus:9090")]),
            ["PROMETHEUS_ENDPOINT = prometheus:9090, must be an http:// or https:// URL"]
        );
    }
}
