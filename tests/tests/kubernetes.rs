//! The scaler against a real Kubernetes 1.20 API server, as 1.20 is: no discovery.k8s.io/v1, so
//! readiness comes from core/v1 Endpoints (the scaler's fallback). See `surge_tests::kube_env` for
//! what is real and what stands in (the agent's reports, the kubelet's endpoints).

use std::{
    process::Command,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use k8s_openapi::api::autoscaling::v1::HorizontalPodAutoscaler;
use kube::{
    api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
    core::GroupVersionKind,
    Api,
};
use serde_json::json;
use surge_tests::{
    harness::bin,
    kube_env::{condition, condition_is, fake_agent, quick_policy, wait_until, Env, Flavor},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_a_deployment_up_and_down_on_injected_traffic() {
    let env = Env::new("surge-updown", Flavor::Endpoints).await;
    env.create_deployment("web", 2).await;
    let _endpoints = env.fake_endpoints("web", "web");
    let rps = Arc::new(AtomicU64::new(50));
    let agent = fake_agent(&env.scaler.grpc, "surge-updown/web", Arc::clone(&rps));
    env.create_scaler(
        "web",
        json!({"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
               "policy": quick_policy(json!({}))}),
        json!({}),
    )
    .await;

    // 50 rps at 10 per replica: 5 replicas.
    env.wait_replicas("web", 5, Duration::from_secs(30)).await;
    let s = env
        .wait_status("web", "5 ready replicas", |s| {
            s["readyReplicas"] == 5 && s["desiredReplicas"] == 5 && s["currentReplicas"] == 5
        })
        .await;
    assert_eq!(s["originalReplicas"], 2, "{s}");
    assert!(condition_is(&s, "Ready", "True"), "{s}");
    assert!(condition_is(&s, "Conflict", "False"), "{s}");
    assert!(condition_is(&s, "Active", "True"), "{s}");
    assert!(condition_is(&s, "Paused", "False"), "{s}");
    assert!(condition_is(&s, "Fallback", "False"), "{s}");
    for c in s["conditions"].as_array().expect("conditions") {
        assert!(
            c["lastTransitionTime"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{c}"
        );
    }
    let last = &s["lastDecision"];
    assert_eq!(last["desired"], 5, "{s}");
    assert!(last["reason"].as_str().is_some_and(|r| !r.is_empty()), "{s}");

    // The agents are told to watch the Service's endpoints (pod IP and port).
    let mut watch_set = agent.watch_set.clone();
    let set = tokio::time::timeout(
        Duration::from_secs(10),
        watch_set.wait_for(|w| {
            w.services
                .iter()
                .any(|s| s.name == "surge-updown/web" && s.endpoints.len() == 5)
        }),
    )
    .await
    .expect("a watch set with the 5 endpoints")
    .expect("watch set")
    .clone();
    let web = set
        .services
        .iter()
        .find(|s| s.name == "surge-updown/web")
        .expect("web");
    assert!(
        web.endpoints.iter().any(|e| e.ip == "10.1.0.1" && e.port == 8080),
        "{web:?}"
    );

    // 10 rps: one replica.
    rps.store(10, Ordering::Relaxed);
    env.wait_replicas("web", 1, Duration::from_secs(30)).await;
    env.wait_status("web", "1 desired and ready replica", |s| {
        s["desiredReplicas"] == 1 && s["readyReplicas"] == 1 && s["lastDecision"]["desired"] == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_scaled_by_an_hpa_or_another_surgescaler_is_refused() {
    let env = Env::new("surge-conflict", Flavor::Endpoints).await;
    env.create_deployment("api", 3).await;
    env.create_deployment("web", 2).await;
    let rps = Arc::new(AtomicU64::new(80));
    let _a = fake_agent(&env.scaler.grpc, "surge-conflict/api", Arc::clone(&rps));
    let hpa: HorizontalPodAutoscaler = serde_json::from_value(json!({
        "metadata": {"name": "api"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api"},
            "minReplicas": 1, "maxReplicas": 5, "targetCPUUtilizationPercentage": 50
        }
    }))
    .expect("hpa");
    Api::<HorizontalPodAutoscaler>::namespaced(env.client.clone(), &env.ns)
        .create(&PostParams::default(), &hpa)
        .await
        .expect("create hpa");
    env.create_scaler(
        "api",
        json!({"scaleTargetRef": {"kind": "Deployment", "name": "api"}, "policy": quick_policy(json!({}))}),
        json!({}),
    )
    .await;
    let s = env
        .wait_status("api", "Conflict=True", |s| condition_is(s, "Conflict", "True"))
        .await;
    let c = condition(&s, "Conflict").expect("Conflict");
    assert_eq!(c["reason"], "HorizontalPodAutoscaler", "{s}");
    assert!(
        c["message"].as_str().is_some_and(|m| m.contains("\"api\"")),
        "{s}"
    );
    assert!(condition_is(&s, "Ready", "False"), "{s}");
    assert!(s.get("originalReplicas").is_none(), "{s}");

    // A second SurgeScaler on a target the first one already scales.
    env.create_scaler(
        "web-first",
        json!({"scaleTargetRef": {"kind": "Deployment", "name": "web"}, "policy": quick_policy(json!({}))}),
        json!({}),
    )
    .await;
    env.wait_status("web-first", "Ready=True", |s| condition_is(s, "Ready", "True"))
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // a later creationTimestamp (seconds)
    env.create_scaler(
        "web-second",
        json!({"scaleTargetRef": {"kind": "Deployment", "name": "web"}, "policy": quick_policy(json!({}))}),
        json!({}),
    )
    .await;
    let s = env
        .wait_status("web-second", "Conflict=True", |s| {
            condition_is(s, "Conflict", "True")
        })
        .await;
    assert_eq!(
        condition(&s, "Conflict").expect("Conflict")["reason"],
        "SurgeScaler",
        "{s}"
    );
    let first = env.status("web-first").await;
    assert!(condition_is(&first, "Conflict", "False"), "{first}");

    // With 80 rps the policy would ask for 8: the HPA's target is left alone.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.replicas("api").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_is_rejected_with_the_message_of_surgectl_validate() {
    let env = Env::new("surge-invalid", Flavor::Endpoints).await;
    env.create_deployment("web", 2).await;
    let rps = Arc::new(AtomicU64::new(80));
    let _a = fake_agent(&env.scaler.grpc, "surge-invalid/web", Arc::clone(&rps));
    let policy = quick_policy(json!({"minReplicaCount": 5, "maxReplicaCount": 2}));
    env.create_scaler(
        "web",
        json!({"scaleTargetRef": {"kind": "Deployment", "name": "web"}, "policy": policy.clone()}),
        json!({}),
    )
    .await;
    let s = env
        .wait_status("web", "Ready=False", |s| condition_is(s, "Ready", "False"))
        .await;
    let ready = condition(&s, "Ready").expect("Ready");
    assert_eq!(ready["reason"], "InvalidPolicy", "{s}");
    let message = ready["message"].as_str().expect("message");

    // The same policy as a file, through the real surgectl.
    let file = env.dir.join("web.yaml");
    std::fs::write(&file, format!("policy: {policy}\n")).expect("policy file");
    let out = Command::new(bin("surgectl"))
        .arg("validate")
        .arg(&file)
        .output()
        .expect("surgectl");
    assert!(!out.status.success());
    let surgectl = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let expected = surge_policy::parse_policy(&format!("policy: {policy}\n"), &Default::default(), "web")
        .expect_err("invalid")
        .to_string();
    assert!(!expected.is_empty());
    assert!(
        surgectl.contains(&expected),
        "surgectl said {surgectl:?}, not {expected:?}"
    );
    assert_eq!(message, format!("{expected}; nothing is scaled"), "{s}");

    // Nothing changed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.replicas("web").await, 2);
    assert!(env.status("web").await.get("originalReplicas").is_none());

    // An invalid annotation is rejected the same way.
    env.create_scaler(
        "paused",
        json!({"scaleTargetRef": {"kind": "Deployment", "name": "other"}, "policy": quick_policy(json!({}))}),
        json!({"autoscaling.keda.sh/paused": "maybe"}),
    )
    .await;
    let s = env
        .wait_status("paused", "Ready=False", |s| condition_is(s, "Ready", "False"))
        .await;
    assert_eq!(
        condition(&s, "Ready").expect("Ready")["message"],
        "autoscaling.keda.sh/paused = maybe, must be true or false; nothing is scaled",
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_replicas_hold_and_delete_restores_the_original_count() {
    let env = Env::new("surge-restore", Flavor::Endpoints).await;
    env.create_deployment("web", 3).await;
    let _endpoints = env.fake_endpoints("web", "web");
    let rps = Arc::new(AtomicU64::new(60));
    let _a = fake_agent(&env.scaler.grpc, "surge-restore/web", Arc::clone(&rps));
    env.create_scaler(
        "web",
        json!({"scaleTargetRef": {"kind": "Deployment", "name": "web"},
               "policy": quick_policy(json!({"advanced": {"restoreToOriginalReplicaCount": true}}))}),
        json!({"autoscaling.keda.sh/paused-replicas": "4"}),
    )
    .await;
    // Paused at 4 whatever the traffic says.
    env.wait_replicas("web", 4, Duration::from_secs(30)).await;
    let s = env
        .wait_status("web", "Paused=True", |s| condition_is(s, "Paused", "True"))
        .await;
    assert_eq!(s["originalReplicas"], 3, "{s}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.replicas("web").await, 4);

    // Unpaused: 60 rps asks for 6.
    env.scalers()
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"autoscaling.keda.sh/paused-replicas": null}}}),
            ),
        )
        .await
        .expect("unpause");
    env.wait_replicas("web", 6, Duration::from_secs(30)).await;
    env.wait_status("web", "Paused=False", |s| condition_is(s, "Paused", "False"))
        .await;

    // Deleted: back to the 3 it had before Surge took over, and the finalizer lets it go.
    env.scalers()
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete");
    env.wait_replicas("web", 3, Duration::from_secs(30)).await;
    let scalers = env.scalers();
    wait_until("the SurgeScaler to be gone", Duration::from_secs(20), || async {
        matches!(scalers.get_opt("web").await, Ok(None))
    })
    .await;
}

/// The manifests under deploy/ are accepted by a real API server (server-side dry run, after the
/// namespace and the CRD they need), and the example SurgeScalers are valid for the scaler too.
/// (No container engine or kubelet runs here: the images are never built or started.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifests_and_examples_are_accepted_by_the_api_server() {
    let env = Env::new("surge-manifests", Flavor::Endpoints).await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files: Vec<_> = ["namespace", "rbac", "configmap", "scaler", "agent", "cleanup"]
        .iter()
        .map(|f| root.join(format!("deploy/kubernetes/{f}.yaml")))
        .collect();
    for e in std::fs::read_dir(root.join("deploy/examples/kubernetes")).expect("examples") {
        files.push(e.expect("entry").path());
    }
    let mut seen = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).expect("manifest");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: serde_json::Value = serde::Deserialize::deserialize(doc).expect("YAML");
            if value.is_null() {
                continue;
            }
            let obj: DynamicObject = serde_json::from_value(value.clone()).expect("an object");
            let types = obj.types.clone().expect("apiVersion and kind");
            let (group, version) = types
                .api_version
                .split_once('/')
                .unwrap_or(("", &types.api_version));
            let gvk = GroupVersionKind::gvk(group, version, &types.kind);
            let (ar, caps) = kube::discovery::pinned_kind(&env.client, &gvk)
                .await
                .unwrap_or_else(|e| panic!("{}: {gvk:?} is not served: {e}", file.display()));
            let api: Api<DynamicObject> = if caps.scope == kube::discovery::Scope::Namespaced {
                let ns = obj.metadata.namespace.clone().unwrap_or_else(|| env.ns.clone());
                Api::namespaced_with(env.client.clone(), &ns, &ar)
            } else {
                Api::all_with(env.client.clone(), &ar)
            };
            // The namespace for real (the others need it); everything else as a dry run.
            let pp = if types.kind == "Namespace" {
                PostParams::default()
            } else {
                PostParams {
                    dry_run: true,
                    ..Default::default()
                }
            };
            match api.create(&pp, &obj).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => panic!(
                    "{}: {} {:?} rejected: {e}",
                    file.display(),
                    types.kind,
                    obj.metadata.name
                ),
            }
            if types.kind == "SurgeScaler" {
                // The scaler's check: the policy as a policy file, with the annotations.
                let text = json!({
                    "metadata": {"name": obj.metadata.name, "annotations": obj.metadata.annotations.unwrap_or_default()},
                    "policy": value["spec"]["policy"],
                })
                .to_string();
                surge_policy::parse_policy(&text, &Default::default(), "example")
                    .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            }
            seen += 1;
        }
    }
    assert!(seen >= 12, "only {seen} objects");
}
