use std::time::Duration;

use surge_common::latency::{bucket_of, LATENCY_BUCKETS};
use surge_proto::v1::{Report, ServiceCounters};

use super::*;
use crate::test_support::{catalog, Manual};

fn shared() -> Arc<Shared> {
    Arc::new(Shared::new(
        catalog(&["web=127.0.0.1:8080", "idle=127.0.0.1:8081"]),
        Arc::new(Manual::at(Duration::from_secs(3))),
        Duration::from_secs(10),
    ))
}

fn report(requests: u64) -> Report {
    let mut latency_buckets = vec![0; LATENCY_BUCKETS];
    latency_buckets[bucket_of(20_000)] = requests;
    Report {
        seq: 1,
        monotonic_ns: 1_000_000_000,
        services: vec![ServiceCounters {
            service: "web".into(),
            requests,
            responses: requests,
            latency_seconds_sum: requests as f64 * 0.02,
            latency_buckets,
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn every_family_is_exposed_with_exact_values() {
    let s = shared();
    s.ingest().connected("n1", 1, Duration::from_secs(1));
    s.ingest().record("n1", 1, &report(42), Duration::from_secs(1));
    let _sub = s.feed.subscribe(Duration::ZERO);
    let text = encode(&registry(Arc::clone(&s))).expect("encodes");
    for line in [
        "# TYPE surge_service_requests counter",
        "surge_service_requests_total{service=\"web\"} 42",
        "surge_service_requests_total{service=\"idle\"} 0",
        "surge_service_responses_total{service=\"web\"} 42",
        "# TYPE surge_service_request_latency_seconds histogram",
        "surge_service_request_latency_seconds_count{service=\"web\"} 42",
        "surge_service_request_latency_seconds_sum{service=\"web\"} 0.84",
        "surge_service_request_latency_seconds_bucket{le=\"0.016384\",service=\"web\"} 0",
        "surge_service_request_latency_seconds_bucket{le=\"0.024576\",service=\"web\"} 42",
        "surge_service_request_latency_seconds_bucket{le=\"+Inf\",service=\"web\"} 42",
        "surge_service_request_latency_seconds_bucket{le=\"+Inf\",service=\"idle\"} 0",
        "surge_service_nodes{service=\"web\"} 1",
        "surge_service_counter_resets_total{service=\"web\"} 0",
        "surge_agent_connected{node=\"n1\"} 1",
        "surge_agent_report_age_seconds{node=\"n1\"} 2.0",
        "surge_agent_reports_total{node=\"n1\"} 1",
        "surge_agent_report_lag_seconds{node=\"n1\"} 0.0",
        "surge_agents_connected 1",
        "surge_consumer_streams 1",
        "# EOF",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
}

#[test]
fn resources_are_exposed_and_tls_only_services_have_no_request_series() {
    let s = shared();
    s.ingest().connected("n1", 1, Duration::from_secs(1));
    let r = Report {
        seq: 1,
        monotonic_ns: 1_000_000_000,
        services: vec![
            ServiceCounters {
                service: "web".into(),
                requests: 5,
                cpu_seconds: 1.5,
                memory_bytes: 4096,
                connections_opened: 7,
                connections_closed: 2,
                ..Default::default()
            },
            ServiceCounters {
                service: "idle".into(),
                connections_opened: 2,
                tls_connections: 2,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    s.ingest().record("n1", 1, &r, Duration::from_secs(1));
    let text = encode(&registry(Arc::clone(&s))).expect("encodes");
    for line in [
        "surge_service_cpu_seconds_total{service=\"web\"} 1.5",
        "surge_service_memory_bytes{service=\"web\"} 4096",
        "surge_service_connections_opened_total{service=\"web\"} 7",
        "surge_service_active_connections{service=\"web\"} 5",
        "surge_service_tls_connections_total{service=\"idle\"} 2",
        "surge_service_requests_available{service=\"web\"} 1",
        "surge_service_requests_available{service=\"idle\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    assert!(
        !text.contains("surge_service_requests_total{service=\"idle\"}"),
        "{text}"
    );
    let snap = crate::view::snapshot(&s);
    let json = serde_json::to_value(&snap).expect("json");
    let idle = &json["services"][1];
    assert_eq!(idle["name"], "idle");
    assert_eq!(idle["requests_available"], false, "{idle}");
    assert!(idle["requests_total"].is_null(), "{idle}");
    assert!(idle["request_rate"].is_null(), "{idle}");
    assert_eq!(json["services"][0]["requests_total"], 5);
}

#[test]
fn replicas_decisions_and_held_connections_are_exposed() {
    let s = shared();
    let mut r = report(5);
    r.services[0].held_now = 3;
    r.services[0].relayed_now = 2;
    r.services[0].probe_requests = 4;
    r.services[0].held_total = 9;
    r.services[0].hold_timeouts = 1;
    r.services[0].held_left_path = 6;
    s.ingest().connected("n1", 1, Duration::from_secs(1));
    s.ingest().record("n1", 1, &r, Duration::from_secs(1));
    s.control.update("web", |c| {
        c.replicas = Some(crate::control::ReplicaCounts {
            desired: 4,
            current: 2,
            ready: 1,
        });
        c.decisions_by_mode.insert("panic".into(), 7);
        c.decisions_by_mode.insert("stable".into(), 2);
    });
    let text = encode(&registry(Arc::clone(&s))).expect("encodes");
    for line in [
        "surge_service_held_connections{service=\"web\"} 3",
        "surge_service_relayed_connections{service=\"web\"} 2",
        "surge_service_probe_requests_total{service=\"web\"} 4",
        "surge_service_held_connections_seen_total{service=\"web\"} 9",
        "surge_service_hold_timeouts_total{service=\"web\"} 1",
        "surge_service_held_left_path_total{service=\"web\"} 6",
        "surge_service_replicas{service=\"web\",state=\"desired\"} 4",
        "surge_service_replicas{service=\"web\",state=\"current\"} 2",
        "surge_service_replicas{service=\"web\",state=\"ready\"} 1",
        "surge_scaling_decisions_total{service=\"web\",mode=\"panic\"} 7",
        "surge_scaling_decisions_total{service=\"web\",mode=\"stable\"} 2",
        "# TYPE surge_scaler_tick_duration_seconds gauge",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    }
    assert!(
        !text.contains("surge_service_replicas{service=\"idle\""),
        "no replicas without a policy"
    );
}

#[test]
fn hold_durations_are_a_histogram_and_percentiles_in_the_api() {
    let s = shared();
    let mut r = report(5);
    let mut buckets = vec![0; LATENCY_BUCKETS];
    buckets[bucket_of(2_000_000)] = 99; // 99 connections held 2 s
    buckets[bucket_of(20_000_000)] = 1; // one held until the 20 s timeout
    r.services[0].hold_duration_buckets = buckets;
    r.services[0].hold_duration_seconds_sum = 99.0 * 2.0 + 20.0;
    r.services[0].held_total = 100;
    s.ingest().connected("n1", 1, Duration::from_secs(1));
    s.ingest().record("n1", 1, &r, Duration::from_secs(1));
    let text = encode(&registry(Arc::clone(&s))).expect("encodes");
    for line in [
        "# TYPE surge_service_hold_duration_seconds histogram",
        "surge_service_hold_duration_seconds_count{service=\"web\"} 100",
        "surge_service_hold_duration_seconds_sum{service=\"web\"} 218.0",
        // 2 s lies in [1.966, 2.097) s; 20 s in [18.87, 20.97) s.
        "surge_service_hold_duration_seconds_bucket{le=\"1.572864\",service=\"web\"} 0",
        "surge_service_hold_duration_seconds_bucket{le=\"2.097152\",service=\"web\"} 99",
        "surge_service_hold_duration_seconds_bucket{le=\"16.777216\",service=\"web\"} 99",
        "surge_service_hold_duration_seconds_bucket{le=\"25.165824\",service=\"web\"} 100",
        "surge_service_hold_duration_seconds_bucket{le=\"+Inf\",service=\"web\"} 100",
        "surge_service_hold_duration_seconds_count{service=\"idle\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    }
    let json = serde_json::to_value(crate::view::snapshot(&s)).expect("json");
    let web = &json["services"][0];
    assert_eq!(web["hold_duration_count"], 100);
    let p50 = web["hold_duration"]["p50_ms"].as_f64().expect("p50");
    let p99 = web["hold_duration"]["p99_ms"].as_f64().expect("p99");
    assert!((p50 - 2000.0).abs() / 2000.0 < 0.07, "{web}");
    assert!((p99 - 2000.0).abs() / 2000.0 < 0.07, "{web}");
    assert!(
        json["services"][1]["hold_duration"].is_null(),
        "never held: no percentiles"
    );
}
