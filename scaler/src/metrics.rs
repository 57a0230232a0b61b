//! /metrics in the Prometheus (OpenMetrics) text format, written by the prometheus-client library
//! from a snapshot taken at scrape time (a collector: nothing is kept twice). Per service: requests,
//! responses, rate, in-flight, concurrency, bytes, a latency histogram, held connections and a
//! hold-duration histogram; the scaler's own health: agents connected, report age, reports and
//! counter resets, consumers subscribed.

mod histogram;

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};

use crate::{state::Shared, view::snapshot};
use histogram::LatencyHistogram;

#[derive(Debug)]
struct ServiceCollector {
    shared: SharedRef,
}

/// `Shared` holds a trait object without Debug; this wrapper gives the collector one.
struct SharedRef(Arc<Shared>);

impl std::fmt::Debug for SharedRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

fn family<L: EncodeLabelSet, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl Iterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error> {
    let mut fam = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in rows {
        metric.encode(fam.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for ServiceCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = snapshot(&self.shared.0);
        let svc = |name: &str| [("service", name.to_string())];
        let all = &snap.services;
        // Services whose requests cannot be seen (TLS only) have no request series at all.
        let visible: Vec<_> = all.iter().filter(|v| v.figures.requests_available).collect();
        let s = &visible;
        family(
            &mut enc,
            "surge_service_requests",
            "HTTP requests started, counted in the kernel (health probes left out).",
            MetricType::Counter,
            s.iter()
                .map(|v| (svc(&v.name), ConstCounter::new(v.figures.requests_total))),
        )?;
        family(
            &mut enc,
            "surge_service_probe_requests",
            "Health probes (User-Agent kube-probe/... or surge-probe) seen in the kernel, not counted as requests.",
            MetricType::Counter,
            s.iter()
                .map(|v| (svc(&v.name), ConstCounter::new(v.figures.probe_requests_total))),
        )?;
        family(
            &mut enc,
            "surge_service_responses",
            "Final HTTP responses started, counted in the kernel.",
            MetricType::Counter,
            s.iter()
                .map(|v| (svc(&v.name), ConstCounter::new(v.figures.responses_total))),
        )?;
        family(
            &mut enc,
            "surge_service_request_rate",
            "Requests per second over the last report interval.",
            MetricType::Gauge,
            s.iter()
                .map(|v| (svc(&v.name), ConstGauge::new(v.figures.request_rate))),
        )?;
        family(
            &mut enc,
            "surge_service_in_flight_requests",
            "Requests in flight at the last report.",
            MetricType::Gauge,
            s.iter()
                .map(|v| (svc(&v.name), ConstGauge::new(v.figures.in_flight))),
        )?;
        family(
            &mut enc,
            "surge_service_concurrency",
            "Time-weighted average of in-flight requests over the last report interval.",
            MetricType::Gauge,
            s.iter()
                .map(|v| (svc(&v.name), ConstGauge::new(v.figures.concurrency))),
        )?;
        family(
            &mut enc,
            "surge_service_received_bytes",
            "TCP payload bytes received by the service (a retransmitted byte counts once).",
            MetricType::Counter,
            all.iter()
                .map(|v| (svc(&v.name), ConstCounter::new(v.figures.rx_bytes_total))),
        )?;
        family(
            &mut enc,
            "surge_service_sent_bytes",
            "TCP payload bytes sent by the service (a retransmitted byte counts once).",
            MetricType::Counter,
            all.iter()
                .map(|v| (svc(&v.name), ConstCounter::new(v.figures.tx_bytes_total))),
        )?;
        family(
            &mut enc,
            "surge_service_request_latency_seconds",
            "Request latency (request start to response start), measured in the kernel.",
            MetricType::Histogram,
            s.iter().map(|v| {
                let f = &v.figures;
                (
                    svc(&v.name),
                    LatencyHistogram::from_kernel(&f.latency_buckets, f.latency_seconds_sum),
                )
            }),
        )?;
        family(
            &mut enc,
            "surge_service_nodes",
            "Nodes whose agent reported the service.",
            MetricType::Gauge,
            all.iter()
                .map(|v| (svc(&v.name), ConstGauge::new(v.figures.nodes as i64))),
        )?;
        family(
            &mut enc,
            "surge_service_counter_resets",
            "Agent counter restarts carried over for the service.",
            MetricType::Counter,
            all.iter()
                .map(|v| (svc(&v.name), ConstCounter::new(v.figures.resets))),
        )?;
        family(
            &mut enc,
            "surge_service_requests_available",
            "1 when the service's requests can be counted; 0 when it carries only TLS, whose \
             requests cannot be seen (its request series are then absent, not zero).",
            MetricType::Gauge,
            all.iter()
                .map(|v| (svc(&v.name), ConstGauge::new(v.figures.requests_available as i64))),
        )?;
        family(
            &mut enc,
            "surge_service_cpu_seconds",
            "CPU time of the service's cgroups, from the sched_switch tracepoint.",
            MetricType::Counter,
            all.iter()
                .map(|v| (svc(&v.name), ConstCounter::new(v.figures.cpu_seconds_total))),
        )?;
        family(
            &mut enc,
            "surge_service_cpu_cores",
            "CPU cores used by the service's cgroups over the last report interval.",
            MetricType::Gauge,
            all.iter()
                .map(|v| (svc(&v.name), ConstGauge::new(v.figures.cpu_cores))),
        )?;
        family(
            &mut enc,
            "surge_service_memory_bytes",
            "Memory in use by the service's cgroups.",
            MetricType::Gauge,
            all.iter()
                .map(|v| (svc(&v.name), ConstGauge::new(v.figures.memory_bytes as i64))),
        )?;
        family(
            &mut enc,
            "surge_service_connections_opened",
            "TCP connections accepted by the service's endpoints (sock_ops).",
            MetricType::Counter,
            all.iter().map(|v| {
                (
                    svc(&v.name),
                    ConstCounter::new(v.figures.connections_opened_total),
                )
            }),
        )?;
        family(
            &mut enc,
            "surge_service_connections_closed",
            "TCP connections of the service's endpoints that closed (sock_ops).",
            MetricType::Counter,
            all.iter().map(|v| {
                (
                    svc(&v.name),
                    ConstCounter::new(v.figures.connections_closed_total),
                )
            }),
        )?;
        family(
            &mut enc,
            "surge_service_active_connections",
            "TCP connections of the service's endpoints open now.",
            MetricType::Gauge,
            all.iter()
                .map(|v| (svc(&v.name), ConstGauge::new(v.figures.active_connections as i64))),
        )?;
        family(
            &mut enc,
            "surge_service_tls_connections",
            "Connections that started with a TLS handshake (their requests cannot be seen).",
            MetricType::Counter,
            all.iter()
                .map(|v| (svc(&v.name), ConstCounter::new(v.figures.tls_connections_total))),
        )?;
        family(
            &mut enc,
            "surge_service_held_connections",
            "Connections the agents hold now because the service has no ready replica.",
            MetricType::Gauge,
            all.iter()
                .map(|v| (svc(&v.name), ConstGauge::new(v.figures.held_connections as i64))),
        )?;
        family(
            &mut enc,
            "surge_service_relayed_connections",
            "Formerly held connections the agents still relay to a replica.",
            MetricType::Gauge,
            all.iter().map(|v| {
                (
                    svc(&v.name),
                    ConstGauge::new(v.figures.relayed_connections as i64),
                )
            }),
        )?;
        family(
            &mut enc,
            "surge_service_held_connections_seen",
            "Connections ever held by the agents' current instances.",
            MetricType::Counter,
            all.iter()
                .map(|v| (svc(&v.name), ConstCounter::new(v.figures.held_total))),
        )?;
        family(
            &mut enc,
            "surge_service_hold_timeouts",
            "Held connections that timed out (503 with Retry-After, or closed).",
            MetricType::Counter,
            all.iter()
                .map(|v| (svc(&v.name), ConstCounter::new(v.figures.hold_timeouts))),
        )?;
        family(
            &mut enc,
            "surge_service_held_left_path",
            "Held connections that left the path after their answers (HTTP/1: Connection: close; \
             HTTP/2: a graceful GOAWAY): their clients reconnect straight to a replica. By the \
             agents' current instances.",
            MetricType::Counter,
            all.iter()
                .map(|v| (svc(&v.name), ConstCounter::new(v.figures.held_left_path))),
        )?;
        family(
            &mut enc,
            "surge_service_hold_duration_seconds",
            "How long held connections waited for a ready replica: from the agent's accept until \
             handed to a replica, timed out, or ended.",
            MetricType::Histogram,
            all.iter().map(|v| {
                let f = &v.figures;
                (
                    svc(&v.name),
                    LatencyHistogram::from_kernel(&f.hold_duration_buckets, f.hold_duration_seconds_sum),
                )
            }),
        )?;
        family(
            &mut enc,
            "surge_service_replicas",
            "Replicas by state: desired (the last decision), current (asked for), ready.",
            MetricType::Gauge,
            all.iter()
                .filter_map(|v| v.replicas.map(|r| (v, r)))
                .flat_map(|(v, r)| {
                    [("desired", r.desired), ("current", r.current), ("ready", r.ready)].map(|(state, n)| {
                        (
                            [("service", v.name.clone()), ("state", state.to_string())],
                            ConstGauge::new(n as i64),
                        )
                    })
                }),
        )?;
        family(
            &mut enc,
            "surge_scaling_decisions",
            "Scaling decisions taken, by mode (stable, panic, activating, idle, fallback, paused).",
            MetricType::Counter,
            all.iter().flat_map(|v| {
                v.decisions_by_mode.iter().map(|(mode, n)| {
                    (
                        [("service", v.name.clone()), ("mode", mode.clone())],
                        ConstCounter::new(*n),
                    )
                })
            }),
        )?;
        let node = |name: &str| [("node", name.to_string())];
        family(
            &mut enc,
            "surge_agent_connected",
            "1 while the node's agent is connected.",
            MetricType::Gauge,
            snap.nodes
                .iter()
                .map(|n| (node(&n.node), ConstGauge::new(n.connected as i64))),
        )?;
        family(
            &mut enc,
            "surge_agent_report_age_seconds",
            "Seconds since the node's agent last reported.",
            MetricType::Gauge,
            snap.nodes
                .iter()
                .map(|n| (node(&n.node), ConstGauge::new(n.last_report_age_seconds))),
        )?;
        family(
            &mut enc,
            "surge_agent_report_lag_seconds",
            "From the agent reading its counters to the scaler receiving them, for the last report.",
            MetricType::Gauge,
            snap.nodes
                .iter()
                .map(|n| (node(&n.node), ConstGauge::new(n.report_lag_seconds))),
        )?;
        family(
            &mut enc,
            "surge_agent_reports",
            "Reports received from the node's agent.",
            MetricType::Counter,
            snap.nodes
                .iter()
                .map(|n| (node(&n.node), ConstCounter::new(n.reports))),
        )?;
        let connected = snap.nodes.iter().filter(|n| n.connected).count() as i64;
        ConstGauge::new(connected).encode(enc.encode_descriptor(
            "surge_agents_connected",
            "Agents connected now.",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(self.shared.0.feed.subscribers() as i64).encode(enc.encode_descriptor(
            "surge_consumer_streams",
            "Open consumer streams (Subscribe and KEDA StreamIsActive).",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(self.shared.0.control.last_tick_seconds()).encode(enc.encode_descriptor(
            "surge_scaler_tick_duration_seconds",
            "How long the last evaluation of every service's policy took.",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

/// The registry /metrics encodes.
pub fn registry(shared: Arc<Shared>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(ServiceCollector {
        shared: SharedRef(shared),
    }));
    r
}

/// The text exposition of a registry.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests;
