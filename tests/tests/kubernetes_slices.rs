//! The scaler against a real Kubernetes API server that serves discovery.k8s.io/v1 EndpointSlices
//! (on 1.20 a CRD stands in for them; see `deploy/kube-test/cluster.sh`): ready replicas come from
//! the slices, and endpoints whose `ready` condition is false do not count. The scaler keeps the
//! target's replica count, the slices and the Service from watches: its ticks read none of them
//! from the API, as the API server counts.

use std::{
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

use serde_json::json;
use surge_tests::kube_env::{condition_is, fake_agent, quick_policy, Env, Flavor, ScalerApi};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_replicas_come_from_endpoint_slices() {
    let env = Env::new("surge-slices", Flavor::EndpointSliceV1).await;
    env.create_deployment("web", 1).await;
    // The Service is named apart from the Deployment: spec.service picks it.
    let slices_writer = env.fake_endpoint_slices("web", "web-svc");
    let rps = Arc::new(AtomicU64::new(30));
    let agent = fake_agent(&env.scaler.grpc, "surge-slices/web-svc", Arc::clone(&rps));
    env.create_scaler(
        "web",
        json!({"scaleTargetRef": {"kind": "Deployment", "name": "web"}, "service": "web-svc",
               "policy": quick_policy(json!({}))}),
        json!({}),
    )
    .await;
    env.wait_replicas("web", 3, Duration::from_secs(30)).await;
    // Three ready endpoints and one that is not: 3 ready. (No Endpoints object and no
    // controller-manager here, so any other source would say 0.)
    let s = env
        .wait_status("web", "3 ready replicas", |s| s["readyReplicas"] == 3)
        .await;
    assert!(condition_is(&s, "Ready", "True"), "{s}");
    // Agents watch every endpoint of the slices, the not-ready one too (it may become ready).
    let mut watch_set = agent.watch_set.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        watch_set.wait_for(|w| {
            w.services.iter().any(|s| {
                s.name == "surge-slices/web-svc"
                    && s.endpoints.len() == 4
                    && s.endpoints.iter().any(|e| e.ip == "10.2.1.1" && e.port == 8080)
            })
        }),
    )
    .await
    .expect("a watch set with the slices' 4 endpoints")
    .expect("watch set");

    // The target's replicas, its Service's slices and the Service come from watches: the
    // decisions (one a second, pollingInterval 1) read none of them from the API (before the
    // watches, each tick got /scale, listed the slices and got the Service).
    // The stand-in for the kubelet reads /scale too: it stops first (the slices stay), and its
    // last request is given time to be counted before the count starts.
    slices_writer.abort();
    let _ = slices_writer.await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let api = ScalerApi::new(env.scaler.http, "surge-slices/web-svc");
    let decisions = |v: &serde_json::Value| -> u64 {
        v["decisions_by_mode"]
            .as_object()
            .map(|m| m.values().filter_map(|n| n.as_u64()).sum())
            .unwrap_or(0)
    };
    let before = env.api_requests().await;
    let first = decisions(&api.service());
    let mut taken = 0;
    for _ in 0..200 {
        taken = decisions(&api.service()) - first;
        if taken >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(taken >= 5, "{taken} decisions in 20 s");
    let after = env.api_requests().await;
    for (verb, resource, subresource) in [
        ("GET", "deployments", "scale"),
        ("LIST", "endpointslices", ""),
        ("GET", "services", ""),
        ("WATCH", "endpointslices", ""),
    ] {
        assert_eq!(
            after.since(&before, verb, resource, subresource),
            0,
            "{verb} {resource}/{subresource} during {taken} decisions"
        );
    }
}
