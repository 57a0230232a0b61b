//! Knative (`autoscaling.knative.dev/…`) and KEDA (`autoscaling.keda.sh/…`) annotations mapped onto a policy spec.

use std::collections::BTreeMap;

use serde_yaml::Value;

use crate::spec::PolicySpec;
use crate::validate::{ValidationError, ValidationErrors};

/// Prefix of Knative per-service annotations; the rest of the key is the `config-autoscaler` key
/// (`window` standing for `stable-window`).
pub const KNATIVE_PREFIX: &str = "autoscaling.knative.dev/";
/// KEDA: pause scaling at the current count.
pub const KEDA_PAUSED: &str = "autoscaling.keda.sh/paused";
/// KEDA: pause scaling at this count.
pub const KEDA_PAUSED_REPLICAS: &str = "autoscaling.keda.sh/paused-replicas";

/// Merges annotations into `spec`; annotations win over the file. Unrelated annotations are
/// ignored; Knative ones are checked when the spec is resolved (messages name the annotation key).
pub fn merge(spec: &mut PolicySpec, annotations: &BTreeMap<String, String>) -> Result<(), ValidationErrors> {
    let mut errors = Vec::new();
    for (k, v) in annotations {
        if k.starts_with(KNATIVE_PREFIX) {
            spec.knative.insert(k.clone(), Value::String(v.clone()));
        } else if k == KEDA_PAUSED {
            match v.trim() {
                "true" => spec.paused = Some(true),
                "false" => spec.paused = Some(false),
                other => errors.push(ValidationError::new(k.as_str(), other, "true or false")),
            }
        } else if k == KEDA_PAUSED_REPLICAS {
            match v.trim().parse::<i64>() {
                Ok(n) if n >= 0 => {
                    spec.paused_replicas = Some(n);
                    spec.paused = Some(true);
                }
                _ => errors.push(ValidationError::new(k.as_str(), v.trim(), "at least 0")),
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(errors))
    }
}
