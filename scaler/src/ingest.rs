//! Merges the agents' cumulative reports into per-service figures. Each (service, node) pair is a
//! series of cumulative samples from one agent instance; a new instance (or a counter that goes
//! down) is a reset, and the old instance's last totals are carried into a base so totals never
//! go backwards and rates are never negative. Time is a parameter: `now` from the injected clock.

use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;
use surge_proto::v1::{Report, ServiceCounters};

use surge_common::latency::LATENCY_BUCKETS;

/// Cumulative totals of one series (or of their sum).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Totals {
    pub requests: u64,
    pub responses: u64,
    pub in_flight_seconds: f64,
    pub latency_seconds_sum: f64,
    pub latency_buckets: [u64; LATENCY_BUCKETS],
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub cpu_seconds: f64,
    pub connections_opened: u64,
    pub connections_closed: u64,
    pub tls_connections: u64,
    /// Requests (in `requests` too) that were health probes.
    pub probe_requests: u64,
    /// How long held connections waited (latency bucket layout), and the sum of the waits.
    pub hold_buckets: [u64; LATENCY_BUCKETS],
    pub hold_seconds_sum: f64,
}

impl Default for Totals {
    fn default() -> Self {
        Self {
            requests: 0,
            responses: 0,
            in_flight_seconds: 0.0,
            latency_seconds_sum: 0.0,
            latency_buckets: [0; LATENCY_BUCKETS],
            rx_bytes: 0,
            tx_bytes: 0,
            cpu_seconds: 0.0,
            connections_opened: 0,
            connections_closed: 0,
            tls_connections: 0,
            probe_requests: 0,
            hold_buckets: [0; LATENCY_BUCKETS],
            hold_seconds_sum: 0.0,
        }
    }
}

impl Totals {
    fn from_wire(c: &ServiceCounters) -> Self {
        let mut latency_buckets = [0; LATENCY_BUCKETS];
        for (dst, src) in latency_buckets.iter_mut().zip(&c.latency_buckets) {
            *dst = *src;
        }
        let mut hold_buckets = [0; LATENCY_BUCKETS];
        for (dst, src) in hold_buckets.iter_mut().zip(&c.hold_duration_buckets) {
            *dst = *src;
        }
        Self {
            requests: c.requests,
            responses: c.responses,
            in_flight_seconds: c.in_flight_seconds,
            latency_seconds_sum: c.latency_seconds_sum,
            latency_buckets,
            rx_bytes: c.rx_bytes,
            tx_bytes: c.tx_bytes,
            cpu_seconds: c.cpu_seconds,
            connections_opened: c.connections_opened,
            connections_closed: c.connections_closed,
            tls_connections: c.tls_connections,
            probe_requests: c.probe_requests,
            hold_buckets,
            hold_seconds_sum: c.hold_duration_seconds_sum,
        }
    }

    fn add(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.responses += o.responses;
        self.in_flight_seconds += o.in_flight_seconds;
        self.latency_seconds_sum += o.latency_seconds_sum;
        for (a, b) in self.latency_buckets.iter_mut().zip(&o.latency_buckets) {
            *a += b;
        }
        self.rx_bytes += o.rx_bytes;
        self.tx_bytes += o.tx_bytes;
        self.cpu_seconds += o.cpu_seconds;
        self.connections_opened += o.connections_opened;
        self.connections_closed += o.connections_closed;
        self.tls_connections += o.tls_connections;
        self.probe_requests += o.probe_requests;
        for (a, b) in self.hold_buckets.iter_mut().zip(&o.hold_buckets) {
            *a += b;
        }
        self.hold_seconds_sum += o.hold_seconds_sum;
    }

    /// `self − earlier` for a later sample of the same instance (saturating: never negative).
    fn since(&self, earlier: &Totals) -> Totals {
        let mut d = Totals {
            requests: self.requests.saturating_sub(earlier.requests),
            responses: self.responses.saturating_sub(earlier.responses),
            in_flight_seconds: (self.in_flight_seconds - earlier.in_flight_seconds).max(0.0),
            latency_seconds_sum: (self.latency_seconds_sum - earlier.latency_seconds_sum).max(0.0),
            rx_bytes: self.rx_bytes.saturating_sub(earlier.rx_bytes),
            tx_bytes: self.tx_bytes.saturating_sub(earlier.tx_bytes),
            cpu_seconds: (self.cpu_seconds - earlier.cpu_seconds).max(0.0),
            connections_opened: self.connections_opened.saturating_sub(earlier.connections_opened),
            connections_closed: self.connections_closed.saturating_sub(earlier.connections_closed),
            tls_connections: self.tls_connections.saturating_sub(earlier.tls_connections),
            probe_requests: self.probe_requests.saturating_sub(earlier.probe_requests),
            ..Default::default()
        };
        for ((d, a), b) in d
            .latency_buckets
            .iter_mut()
            .zip(&self.latency_buckets)
            .zip(&earlier.latency_buckets)
        {
            *d = a.saturating_sub(*b);
        }
        d
    }

    /// A counter went down: the agent's counters restarted.
    fn went_down_from(&self, earlier: &Totals) -> bool {
        self.requests < earlier.requests
            || self.responses < earlier.responses
            || self.rx_bytes < earlier.rx_bytes
            || self.cpu_seconds < earlier.cpu_seconds
            || self.connections_opened < earlier.connections_opened
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// The agent's CLOCK_MONOTONIC at reading, ns.
    at_ns: u64,
    totals: Totals,
    in_flight: i64,
    /// Connections the agent holds now for the service (it has no ready replica).
    held_now: u64,
    /// Held connections the agent still relays to a replica.
    relayed_now: u64,
    /// Held connections ever, and those that timed out, by this agent instance.
    held_total: u64,
    hold_timeouts: u64,
    /// Held connections that left the path (told to reconnect), by this agent instance.
    held_left_path: u64,
    /// Memory in use by the service's cgroups at the sample (a gauge).
    memory_bytes: u64,
}

#[derive(Debug, Clone)]
struct Series {
    instance: u64,
    /// Totals of earlier instances of this node's agent.
    base: Totals,
    last: Sample,
    prev: Option<Sample>,
    received: Duration,
    resets: u64,
}

/// What the scaler knows of one node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub node: String,
    pub instance_id: u64,
    pub connected: bool,
    pub reports: u64,
    pub last_report_age_seconds: f64,
    /// From the agent reading its counters to the scaler receiving them (wall clocks; clock
    /// skew between the machines adds to it).
    pub report_lag_seconds: f64,
}

#[derive(Debug, Clone)]
struct NodeState {
    instance: u64,
    connected: bool,
    reports: u64,
    last_report: Duration,
    report_lag: Duration,
}

/// The merged view of one service at `now`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ServiceFigures {
    /// Requests and final responses, health probes left out.
    pub requests_total: u64,
    pub responses_total: u64,
    /// Health probes (User-Agent `kube-probe/…` or `surge-probe`), not counted as requests.
    pub probe_requests_total: u64,
    /// Requests per second over each fresh node's last report interval, summed over nodes.
    pub request_rate: f64,
    pub in_flight: i64,
    /// Connections the agents hold now because the service has no ready replica (the demand
    /// that activates a service at zero), summed over fresh nodes.
    pub held_connections: u64,
    /// Formerly held connections the agents still relay to a replica, summed over fresh nodes.
    pub relayed_connections: u64,
    /// Held connections ever and hold timeouts, by the agents' current instances.
    pub held_total: u64,
    pub hold_timeouts: u64,
    /// Held connections that left the path after their answers (HTTP/1 `Connection: close`,
    /// HTTP/2 `GOAWAY`): their clients reconnect straight to a replica. By the agents' current
    /// instances.
    pub held_left_path: u64,
    /// Time-weighted average of in-flight requests over the last interval, summed over nodes.
    pub concurrency: f64,
    pub rx_bytes_total: u64,
    pub tx_bytes_total: u64,
    pub latency_seconds_sum: f64,
    /// Latency buckets (surge_common::latency), cumulative.
    #[serde(skip)]
    pub latency_buckets: Vec<u64>,
    /// Latency buckets of the last interval (fresh nodes).
    #[serde(skip)]
    pub recent_latency_buckets: Vec<u64>,
    /// CPU time of the service's cgroups (sched_switch), cumulative, seconds.
    pub cpu_seconds_total: f64,
    /// CPU cores in use over each fresh node's last report interval, summed over nodes.
    pub cpu_cores: f64,
    /// Memory in use by the service's cgroups at each fresh node's last report, summed.
    pub memory_bytes: u64,
    pub connections_opened_total: u64,
    pub connections_closed_total: u64,
    /// Connections open now: opened − closed over all nodes' totals.
    pub active_connections: u64,
    /// Connections that started with a TLS handshake, whose requests cannot be seen.
    pub tls_connections_total: u64,
    /// Held connections whose wait is over (handed to a replica, timed out or ended), summed
    /// over every agent instance: the count of the hold-duration histogram.
    pub hold_duration_count: u64,
    pub hold_duration_seconds_sum: f64,
    /// How long held connections waited, cumulative (surge_common::latency buckets).
    #[serde(skip)]
    pub hold_duration_buckets: Vec<u64>,
    /// False when the service carries TLS and no HTTP request was ever seen: its request figures
    /// are then unknown, not zero (the API shows them as null, /metrics leaves them out).
    pub requests_available: bool,
    /// Nodes that reported this service.
    pub nodes: usize,
    /// Counter resets seen (agent restarts).
    pub resets: u64,
}

/// All series, keyed by service then node.
#[derive(Debug, Default)]
pub struct Ingest {
    series: BTreeMap<String, BTreeMap<String, Series>>,
    nodes: BTreeMap<String, NodeState>,
    /// A node silent this long no longer contributes rates or in-flight counts.
    stale_after: Duration,
}

impl Ingest {
    pub fn new(stale_after: Duration) -> Self {
        Self {
            stale_after,
            ..Default::default()
        }
    }

    /// An agent opened a stream.
    pub fn connected(&mut self, node: &str, instance: u64, now: Duration) {
        let state = self.nodes.entry(node.to_string()).or_insert(NodeState {
            instance,
            connected: true,
            reports: 0,
            last_report: now,
            report_lag: Duration::ZERO,
        });
        state.instance = instance;
        state.connected = true;
    }

    /// An agent's stream ended. Its totals stay (they were counted); its rates stop.
    pub fn disconnected(&mut self, node: &str, instance: u64) {
        if let Some(state) = self.nodes.get_mut(node) {
            if state.instance == instance {
                state.connected = false;
            }
        }
    }

    /// How late `node`'s last report arrived.
    pub fn report_lag(&mut self, node: &str, lag: Duration) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.report_lag = lag;
        }
    }

    /// Records one report of `node`'s agent instance `instance`, received at `now`.
    pub fn record(&mut self, node: &str, instance: u64, report: &Report, now: Duration) {
        let state = self.nodes.entry(node.to_string()).or_insert(NodeState {
            instance,
            connected: true,
            reports: 0,
            last_report: now,
            report_lag: Duration::ZERO,
        });
        state.instance = instance;
        state.reports += 1;
        state.last_report = now;
        for c in &report.services {
            let sample = Sample {
                at_ns: report.monotonic_ns,
                totals: Totals::from_wire(c),
                in_flight: c.in_flight,
                held_now: c.held_now,
                relayed_now: c.relayed_now,
                held_total: c.held_total,
                hold_timeouts: c.hold_timeouts,
                held_left_path: c.held_left_path,
                memory_bytes: c.memory_bytes,
            };
            let by_node = self.series.entry(c.service.clone()).or_default();
            match by_node.get_mut(node) {
                None => {
                    by_node.insert(
                        node.to_string(),
                        Series {
                            instance,
                            base: Totals::default(),
                            last: sample,
                            prev: None,
                            received: now,
                            resets: 0,
                        },
                    );
                }
                Some(s) if s.instance != instance || sample.totals.went_down_from(&s.last.totals) => {
                    tracing::info!(service = %c.service, node, instance, "agent counters restarted; carrying totals over");
                    s.base.add(&s.last.totals);
                    s.instance = instance;
                    s.last = sample;
                    s.prev = None;
                    s.received = now;
                    s.resets += 1;
                }
                Some(s) if sample.at_ns > s.last.at_ns => {
                    s.prev = Some(s.last);
                    s.last = sample;
                    s.received = now;
                }
                // An out-of-order or duplicate report adds nothing.
                Some(_) => {}
            }
        }
    }

    /// The merged figures of `service` at `now`, if any agent reported it.
    pub fn figures(&self, service: &str, now: Duration) -> Option<ServiceFigures> {
        let by_node = self.series.get(service)?;
        let mut f = ServiceFigures::default();
        let mut total = Totals::default();
        let mut recent = [0u64; LATENCY_BUCKETS];
        for (node, s) in by_node {
            total.add(&s.base);
            total.add(&s.last.totals);
            f.resets += s.resets;
            f.nodes += 1;
            let fresh = now.saturating_sub(s.received) <= self.stale_after
                && self
                    .nodes
                    .get(node)
                    .is_some_and(|n| n.connected && n.instance == s.instance);
            f.held_total += s.last.held_total;
            f.hold_timeouts += s.last.hold_timeouts;
            f.held_left_path += s.last.held_left_path;
            if !fresh {
                continue;
            }
            f.in_flight += s.last.in_flight;
            f.held_connections += s.last.held_now;
            f.relayed_connections += s.last.relayed_now;
            f.memory_bytes += s.last.memory_bytes;
            if let Some(prev) = &s.prev {
                let dt = (s.last.at_ns - prev.at_ns) as f64 / 1e9;
                let d = s.last.totals.since(&prev.totals);
                f.request_rate += d.requests.saturating_sub(d.probe_requests) as f64 / dt;
                f.concurrency += d.in_flight_seconds / dt;
                f.cpu_cores += d.cpu_seconds / dt;
                for (r, b) in recent.iter_mut().zip(&d.latency_buckets) {
                    *r += b;
                }
            }
        }
        // Health probes are not traffic: their requests and responses are left out (a probe
        // whose User-Agent is still in flight may be in for one report).
        f.requests_total = total.requests.saturating_sub(total.probe_requests);
        f.responses_total = total.responses.saturating_sub(total.probe_requests);
        f.probe_requests_total = total.probe_requests;
        f.rx_bytes_total = total.rx_bytes;
        f.tx_bytes_total = total.tx_bytes;
        f.latency_seconds_sum = total.latency_seconds_sum;
        f.latency_buckets = total.latency_buckets.to_vec();
        f.recent_latency_buckets = recent.to_vec();
        f.cpu_seconds_total = total.cpu_seconds;
        f.connections_opened_total = total.connections_opened;
        f.connections_closed_total = total.connections_closed;
        f.active_connections = total.connections_opened.saturating_sub(total.connections_closed);
        f.tls_connections_total = total.tls_connections;
        f.hold_duration_count = total.hold_buckets.iter().sum();
        f.hold_duration_seconds_sum = total.hold_seconds_sum;
        f.hold_duration_buckets = total.hold_buckets.to_vec();
        f.requests_available = total.tls_connections == 0 || total.requests > 0;
        Some(f)
    }

    /// Every node that ever connected.
    pub fn nodes(&self, now: Duration) -> Vec<NodeStatus> {
        self.nodes
            .iter()
            .map(|(name, n)| NodeStatus {
                node: name.clone(),
                instance_id: n.instance,
                connected: n.connected,
                reports: n.reports,
                last_report_age_seconds: now.saturating_sub(n.last_report).as_secs_f64(),
                report_lag_seconds: n.report_lag.as_secs_f64(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
