use std::time::Duration;

use surge_proto::v1::{Report, ServiceCounters};
use tokio_stream::StreamExt;

use super::*;
use crate::{
    clock::Clock,
    test_support::{catalog, Manual},
};

fn rig() -> (Arc<Shared>, Arc<Manual>) {
    let clock = Arc::new(Manual::default());
    let shared = Arc::new(Shared::new(
        catalog(&["web=127.0.0.1:8080"]),
        Arc::clone(&clock) as Arc<dyn Clock>,
        Duration::from_secs(10),
    ));
    shared.ingest().connected("n1", 1, Duration::ZERO);
    (shared, clock)
}

/// The agent reports `requests` (cumulative) at `s` seconds; ingest merges it and tells the feed.
fn report(shared: &Shared, clock: &Manual, s: u64, requests: u64) {
    let now = Duration::from_secs(s);
    clock.set(now);
    let r = Report {
        seq: s,
        monotonic_ns: s * 1_000_000_000,
        services: vec![ServiceCounters {
            service: "web".into(),
            requests,
            responses: requests,
            ..Default::default()
        }],
        ..Default::default()
    };
    shared.ingest().record("n1", 1, &r, now);
    shared.feed.publish(now);
}

fn r(pairs: &[(&str, &str)]) -> Request<ScaledObjectRef> {
    Request::new(ScaledObjectRef {
        name: "web".into(),
        namespace: "default".into(),
        scaler_metadata: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    })
}

async fn next(s: &mut ActiveStream) -> bool {
    tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .expect("a push")
        .expect("open")
        .expect("ok")
        .result
}

#[tokio::test]
async fn stream_is_active_pushes_each_change_once() {
    let (shared, clock) = rig();
    let svc = ExternalScalerService::new(Arc::clone(&shared));
    let mut stream = svc
        .stream_is_active(r(&[("service", "web"), ("activationThreshold", "5")]))
        .await
        .expect("stream")
        .into_inner();
    assert!(!next(&mut stream).await, "the current state at once");
    report(&shared, &clock, 1, 0);
    report(&shared, &clock, 2, 5); // 5 rps: not above the threshold
    report(&shared, &clock, 3, 20); // 15 rps
    assert!(next(&mut stream).await, "activation");
    report(&shared, &clock, 4, 40);
    report(&shared, &clock, 5, 40); // 0 rps
    assert!(!next(&mut stream).await, "deactivation");
    let nothing = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    assert!(nothing.is_err(), "no push without a change: {nothing:?}");
}

#[tokio::test]
async fn metric_values_and_specs_follow_the_figures() {
    let (shared, clock) = rig();
    let svc = ExternalScalerService::new(Arc::clone(&shared));
    report(&shared, &clock, 1, 100);
    report(&shared, &clock, 3, 105); // 2.5 rps
    let get = GetMetricsRequest {
        scaled_object_ref: Some(r(&[("service", "web")]).into_inner()),
        metric_name: String::new(),
    };
    let v = svc
        .get_metrics(Request::new(get))
        .await
        .expect("values")
        .into_inner();
    assert_eq!(v.metric_values.len(), 1);
    let mv = &v.metric_values[0];
    assert_eq!(
        (mv.metric_name.as_str(), mv.metric_value_float, mv.metric_value),
        ("surge-web-rps", 2.5, 3)
    );
    let spec = svc
        .get_metric_spec(r(&[("service", "web"), ("target", "0.4")]))
        .await
        .expect("spec")
        .into_inner();
    let s = &spec.metric_specs[0];
    assert_eq!(
        (s.metric_name.as_str(), s.target_size_float, s.target_size),
        ("surge-web-rps", 0.4, 1)
    );
    let active = |t: &'static str| svc.is_active(r(&[("service", "web"), ("activationThreshold", t)]));
    assert!(active("2").await.expect("answer").into_inner().result);
    assert!(
        !active("2.5").await.expect("answer").into_inner().result,
        "active only above the threshold"
    );
}
