//! A SurgeScaler's policy, checked by the same code and with the same messages as
//! `surgectl validate`: the CR's `spec.policy` is the `policy:` section of a policy file, and its
//! `autoscaling.keda.sh/…` and `autoscaling.knative.dev/…` annotations apply as in a file's metadata.
//! (Users of KEDA rely on its admission webhook for this; a 1.20 API server also ignores CRD CEL
//! rules, so the scaler is where it happens.)

use std::collections::BTreeMap;

use surge_policy::{parse_policy, Defaults, Policy};

use super::crd::SurgeScaler;

/// Annotation prefixes that reach the policy.
const PREFIXES: [&str; 2] = ["autoscaling.keda.sh/", surge_policy::annotations::KNATIVE_PREFIX];

/// The policy of `cr`, or the validation message (`minReplicaCount = -1, must be at least 0`).
pub fn policy_of(cr: &SurgeScaler, defaults: &Defaults) -> Result<Policy, String> {
    let name = cr.metadata.name.clone().unwrap_or_default();
    let annotations: BTreeMap<String, String> = cr
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| PREFIXES.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let policy = match &cr.spec.policy {
        serde_json::Value::Null => serde_json::Value::Object(Default::default()),
        v => v.clone(),
    };
    let file = serde_json::json!({
        "metadata": { "name": name, "annotations": annotations },
        "policy": policy,
    });
    // JSON is YAML: the policy parser gets the CR's policy as a policy file's text.
    let text = serde_json::to_string(&file).map_err(|e| e.to_string())?;
    parse_policy(&text, defaults, &name).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crd::{ScaleTargetRef, SurgeScalerSpec};

    fn cr(policy: serde_json::Value, annotations: &[(&str, &str)]) -> SurgeScaler {
        let mut cr = SurgeScaler::new(
            "web",
            SurgeScalerSpec {
                scale_target_ref: ScaleTargetRef {
                    api_version: "apps/v1".into(),
                    kind: "Deployment".into(),
                    name: "web".into(),
                },
                service: None,
                service_port: None,
                policy,
            },
        );
        cr.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        cr
    }

    #[test]
    fn a_valid_policy_gets_its_name_and_annotations() {
        let p = policy_of(
            &cr(
                serde_json::json!({"minReplicaCount": 1, "maxReplicaCount": 5,
                    "triggers": [{"metric": "rps", "threshold": 10}]}),
                &[("autoscaling.keda.sh/paused-replicas", "3"), ("other", "x")],
            ),
            &Defaults::default(),
        )
        .expect("valid");
        assert_eq!(p.name, "web");
        assert_eq!((p.min_replicas, p.max_replicas), (1, 5));
        assert!(p.paused);
        assert_eq!(p.paused_replicas, Some(3));
    }

    #[test]
    fn invalid_policies_get_the_messages_of_surgectl_validate() {
        let policy = serde_json::json!({"minReplicaCount": 5, "maxReplicaCount": 2,
            "triggers": [{"metric": "rps", "threshold": 10}]});
        let text = format!("policy: {policy}\n");
        let expected = parse_policy(&text, &Defaults::default(), "web")
            .expect_err("invalid")
            .to_string();
        let got = policy_of(&cr(policy, &[]), &Defaults::default()).expect_err("invalid");
        assert_eq!(got, expected);
        assert!(got.contains("maxReplicaCount"), "{got}");
        let got = policy_of(
            &cr(serde_json::json!({}), &[("autoscaling.keda.sh/paused", "maybe")]),
            &Defaults::default(),
        )
        .expect_err("invalid");
        assert_eq!(got, "autoscaling.keda.sh/paused = maybe, must be true or false");
    }
}
