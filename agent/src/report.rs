//! Turns kernel counters into the wire form of a report: the in-flight integral A(T) = T·C − S
//! is evaluated here, at the instant the counters were read.

use surge_common::ServiceCounters;
use surge_proto::v1::ServiceCounters as WireCounters;

/// The wire counters of one service, read at `now_ns` (CLOCK_MONOTONIC, the kernel's clock).
pub fn to_wire(service: &str, c: &ServiceCounters, memory_bytes: u64, now_ns: u64) -> WireCounters {
    let in_flight = c.inflight_sign_sum;
    // A(T) = T·C − S: the integral of in-flight requests up to T, in request-nanoseconds.
    let integral_ns = now_ns as i128 * in_flight as i128 - c.inflight_time_sum as i128;
    WireCounters {
        service: service.to_string(),
        requests: c.requests,
        responses: c.responses,
        in_flight,
        in_flight_seconds: integral_ns as f64 / 1e9,
        latency_seconds_sum: c.latency_sum_ns as f64 / 1e9,
        latency_buckets: c.latency_buckets.to_vec(),
        rx_bytes: c.rx_bytes,
        tx_bytes: c.tx_bytes,
        cpu_seconds: c.cpu_ns as f64 / 1e9,
        memory_bytes,
        connections_opened: c.connections_opened,
        connections_closed: c.connections_closed,
        tls_connections: c.tls_connections,
        probe_requests: c.probe_requests,
        // Filled by the holders (holding.rs), which live outside the kernel.
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integral_counts_open_and_finished_requests() {
        // One request from t=1s to t=3s (finished), one open since t=4s; read at t=10s.
        let c = ServiceCounters {
            requests: 2,
            responses: 1,
            inflight_sign_sum: 1,
            inflight_time_sum: 1_000_000_000 - 3_000_000_000 + 4_000_000_000,
            ..Default::default()
        };
        let w = to_wire("web", &c, 0, 10_000_000_000);
        assert_eq!(w.in_flight, 1);
        // 2 s finished + 6 s open so far.
        assert!(
            (w.in_flight_seconds - 8.0).abs() < 1e-9,
            "{}",
            w.in_flight_seconds
        );
    }
}
