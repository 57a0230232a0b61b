//! The scaler against a real Kubernetes API server that serves discovery.k8s.io/v1 EndpointSlices
//! (on 1.20 a CRD stands in for them; see `deploy/kube-test/cluster.sh`): ready replicas come from
//! the slices, and endpoints whose `ready` condition is false do not count. The scaler keeps the
//! slices and Services from watches: its ticks read only `/scale`, as the API server counts.

use std::{
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

use serde_json::json;
use surge_tests::kube_env::{condition_is, fake_agent, quick_policy, Env, Flavor};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_replicas_come_from_endpoint_slices() {
    let env = Env::new("surge-slices", Flavor::EndpointSliceV1).await;
    env.create_deployment("web", 1).await;
    // The Service is named apart from the Deployment: spec.service picks it.
    let _slices = env.fake_endpoint_slices("web", "web-svc");
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

    // Every tick (200 ms) reads the Deployment's /scale; the slices and the Service come from
    // watches, so no tick lists the one or gets the other (before the cache, each did both).
    let before = env.api_requests().await;
    let mut after = env.api_requests().await;
    for _ in 0..100 {
        if after.since(&before, "GET", "deployments", "scale") >= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = env.api_requests().await;
    }
    let scale_reads = after.since(&before, "GET", "deployments", "scale");
    assert!(scale_reads >= 10, "ticks read /scale {scale_reads} times in 20 s");
    assert_eq!(
        after.since(&before, "LIST", "endpointslices", ""),
        0,
        "EndpointSlices listed during {scale_reads} ticks"
    );
    assert_eq!(
        after.since(&before, "GET", "services", ""),
        0,
        "Services read during {scale_reads} ticks"
    );
    assert_eq!(
        after.since(&before, "WATCH", "endpointslices", ""),
        0,
        "the watch was not restarted"
    );
}
