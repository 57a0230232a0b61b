use super::*;

const S: u64 = 1_000_000_000;

fn report(at_s: u64, services: &[(&str, u64, f64)]) -> Report {
    Report {
        seq: at_s,
        monotonic_ns: at_s * S,
        unix_ms: 0,
        services: services
            .iter()
            .map(|(name, requests, in_flight_seconds)| ServiceCounters {
                service: name.to_string(),
                requests: *requests,
                responses: *requests,
                in_flight_seconds: *in_flight_seconds,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn rate_and_concurrency_come_from_differences() {
    let mut i = Ingest::new(secs(10));
    i.connected("n1", 7, secs(0));
    i.record("n1", 7, &report(100, &[("web", 1000, 50.0)]), secs(0));
    i.record("n1", 7, &report(102, &[("web", 1300, 53.0)]), secs(2));
    let f = i.figures("web", secs(2)).expect("reported");
    assert_eq!(f.requests_total, 1300);
    assert_eq!(f.request_rate, 150.0);
    assert_eq!(f.concurrency, 1.5);
}

#[test]
fn nodes_are_summed() {
    let mut i = Ingest::new(secs(10));
    for (node, inst) in [("a", 1), ("b", 2)] {
        i.connected(node, inst, secs(0));
        i.record(node, inst, &report(10, &[("web", 100, 0.0)]), secs(0));
        i.record(node, inst, &report(11, &[("web", 110, 0.0)]), secs(1));
    }
    let f = i.figures("web", secs(1)).expect("reported");
    assert_eq!((f.requests_total, f.request_rate, f.nodes), (220, 20.0, 2));
}

#[test]
fn agent_restart_carries_totals_and_is_never_a_negative_rate() {
    let mut i = Ingest::new(secs(10));
    i.connected("n1", 1, secs(0));
    i.record("n1", 1, &report(10, &[("web", 500, 0.0)]), secs(0));
    i.record("n1", 1, &report(11, &[("web", 600, 0.0)]), secs(1));
    i.disconnected("n1", 1);
    i.connected("n1", 2, secs(3));
    i.record("n1", 2, &report(2, &[("web", 40, 0.0)]), secs(3));
    let f = i.figures("web", secs(3)).expect("reported");
    assert_eq!(f.requests_total, 640);
    assert_eq!(
        f.request_rate, 0.0,
        "no rate until two samples of the new instance"
    );
    assert_eq!(f.resets, 1);
    i.record("n1", 2, &report(3, &[("web", 90, 0.0)]), secs(4));
    let f = i.figures("web", secs(4)).expect("reported");
    assert_eq!((f.requests_total, f.request_rate), (690, 50.0));
}

#[test]
fn a_counter_going_down_in_the_same_instance_is_a_reset() {
    let mut i = Ingest::new(secs(10));
    i.connected("n1", 1, secs(0));
    i.record("n1", 1, &report(10, &[("web", 500, 0.0)]), secs(0));
    i.record("n1", 1, &report(11, &[("web", 3, 0.0)]), secs(1));
    let f = i.figures("web", secs(1)).expect("reported");
    assert_eq!((f.requests_total, f.request_rate), (503, 0.0));
}

#[test]
fn stale_or_disconnected_nodes_keep_totals_but_add_no_rate() {
    let mut i = Ingest::new(secs(5));
    i.connected("n1", 1, secs(0));
    i.record("n1", 1, &report(10, &[("web", 100, 0.0)]), secs(0));
    i.record("n1", 1, &report(11, &[("web", 200, 0.0)]), secs(1));
    assert_eq!(i.figures("web", secs(7)).expect("reported").request_rate, 0.0);
    assert_eq!(i.figures("web", secs(7)).expect("reported").requests_total, 200);
    i.disconnected("n1", 1);
    assert_eq!(i.figures("web", secs(1)).expect("reported").request_rate, 0.0);
}

#[test]
fn duplicate_reports_add_nothing() {
    let mut i = Ingest::new(secs(10));
    i.connected("n1", 1, secs(0));
    let r = report(10, &[("web", 100, 0.0)]);
    i.record("n1", 1, &r, secs(0));
    i.record("n1", 1, &r, secs(0));
    assert_eq!(i.figures("web", secs(0)).expect("reported").requests_total, 100);
}

#[test]
fn unknown_service_has_no_figures() {
    assert!(Ingest::new(secs(1)).figures("nope", secs(0)).is_none());
}

fn resources(at_s: u64, cpu: f64, mem: u64, opened: u64, closed: u64, tls: u64, requests: u64) -> Report {
    Report {
        seq: at_s,
        monotonic_ns: at_s * S,
        unix_ms: 0,
        services: vec![ServiceCounters {
            service: "web".into(),
            requests,
            cpu_seconds: cpu,
            memory_bytes: mem,
            connections_opened: opened,
            connections_closed: closed,
            tls_connections: tls,
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn cpu_memory_and_connections_are_merged() {
    let mut i = Ingest::new(secs(10));
    for (node, inst) in [("a", 1), ("b", 2)] {
        i.connected(node, inst, secs(0));
        i.record(node, inst, &resources(10, 3.0, 100, 10, 4, 0, 5), secs(0));
        i.record(node, inst, &resources(12, 4.0, 200, 12, 5, 0, 5), secs(2));
    }
    let f = i.figures("web", secs(2)).expect("reported");
    assert_eq!(f.cpu_seconds_total, 8.0);
    assert_eq!(f.cpu_cores, 1.0, "0.5 core on each node");
    assert_eq!(f.memory_bytes, 400);
    assert_eq!(
        (
            f.connections_opened_total,
            f.connections_closed_total,
            f.active_connections
        ),
        (24, 10, 14)
    );
    assert!(f.requests_available);
}

#[test]
fn tls_without_requests_makes_requests_unavailable() {
    let mut i = Ingest::new(secs(10));
    i.connected("n1", 1, secs(0));
    i.record("n1", 1, &resources(10, 0.0, 0, 3, 0, 3, 0), secs(0));
    let f = i.figures("web", secs(0)).expect("reported");
    assert!(!f.requests_available);
    assert_eq!(f.tls_connections_total, 3);
    // Plain HTTP beside the TLS: requests are seen, so they are available.
    i.record("n1", 1, &resources(11, 0.0, 0, 4, 0, 3, 1), secs(1));
    assert!(i.figures("web", secs(1)).expect("reported").requests_available);
}

#[test]
fn report_lag_is_kept_per_node() {
    let mut i = Ingest::new(secs(10));
    i.connected("n1", 1, secs(0));
    i.record("n1", 1, &report(10, &[("web", 1, 0.0)]), secs(0));
    i.report_lag("n1", Duration::from_millis(250));
    i.report_lag("nobody", Duration::from_millis(999));
    let nodes = i.nodes(secs(1));
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].report_lag_seconds, 0.25);
}

/// A report whose service held connections that waited `waits_us` (cumulative).
fn holds(at_s: u64, waits_us: &[u64]) -> Report {
    let mut r = report(at_s, &[("web", 0, 0.0)]);
    let c = &mut r.services[0];
    for &us in waits_us {
        let b = surge_common::latency::bucket_of(us);
        if c.hold_duration_buckets.len() <= b {
            c.hold_duration_buckets.resize(b + 1, 0);
        }
        c.hold_duration_buckets[b] += 1;
        c.hold_duration_seconds_sum += us as f64 / 1e6;
    }
    c.held_total = waits_us.len() as u64;
    r
}

#[test]
fn hold_durations_are_merged_over_nodes_and_carried_over_restarts() {
    use surge_common::latency::bucket_of;

    let mut i = Ingest::new(secs(10));
    i.connected("a", 1, secs(0));
    i.record("a", 1, &holds(10, &[2_000_000, 2_100_000]), secs(0));
    i.connected("b", 2, secs(0));
    i.record("b", 2, &holds(10, &[500]), secs(0));
    let f = i.figures("web", secs(0)).expect("reported");
    assert_eq!(f.hold_duration_count, 3);
    assert!((f.hold_duration_seconds_sum - 4.1005).abs() < 1e-9);
    assert_eq!(f.hold_duration_buckets.len(), LATENCY_BUCKETS);
    assert_eq!(f.hold_duration_buckets[bucket_of(500)], 1);

    // Node a's agent restarts: what it counted before stays, its new counts add.
    i.connected("a", 3, secs(5));
    i.record("a", 3, &holds(1, &[40_000]), secs(5));
    let f = i.figures("web", secs(5)).expect("reported");
    assert_eq!(f.hold_duration_count, 4);
    assert_eq!(f.hold_duration_buckets[bucket_of(40_000)], 1);
    assert_eq!(f.hold_duration_buckets[bucket_of(500)], 1);
    assert!((f.hold_duration_seconds_sum - 4.1405).abs() < 1e-9);
}

#[test]
fn health_probes_are_left_out_of_requests_responses_and_rate() {
    let with_probes = |at_s: u64, requests: u64, probes: u64| {
        let mut r = report(at_s, &[("web", requests, 0.0)]);
        r.services[0].probe_requests = probes;
        r
    };
    let mut i = Ingest::new(secs(10));
    i.connected("n1", 7, secs(0));
    i.record("n1", 7, &with_probes(100, 1000, 40), secs(0));
    // 300 requests in 2 s, 20 of them probes.
    i.record("n1", 7, &with_probes(102, 1300, 60), secs(2));
    let f = i.figures("web", secs(2)).expect("reported");
    assert_eq!(f.requests_total, 1240);
    assert_eq!(f.responses_total, 1240);
    assert_eq!(f.probe_requests_total, 60);
    assert_eq!(f.request_rate, 140.0);
    // Only probes: a service at rest has no traffic.
    i.record("n1", 7, &with_probes(104, 1310, 70), secs(4));
    let f = i.figures("web", secs(4)).expect("reported");
    assert_eq!(f.request_rate, 0.0);
}
