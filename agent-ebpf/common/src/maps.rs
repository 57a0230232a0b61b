//! The layout of every map the kernel programs and the agent both touch.

use crate::latency::LATENCY_BUCKETS;

/// How many services one agent can watch at once: the size of the per-service counter array.
pub const MAX_SERVICES: u32 = 256;
/// How many watched endpoints (address, port) one agent can hold.
pub const MAX_ENDPOINTS: u32 = 16384;
/// How many tracked TCP connections (by 4-tuple) the kernel keeps state for (LRU).
pub const MAX_CONNECTIONS: u32 = 262_144;
/// How many cgroups (a service's replicas and their descendants) can be attributed.
pub const MAX_CGROUPS: u32 = 16384;
/// How many service addresses the connect-time load balancer can hold.
pub const MAX_BALANCED: u32 = 1024;
/// How many ready backends one balanced service can have (the slots of `BACKENDS` per service).
pub const MAX_BACKENDS: u32 = 64;

/// `ConnState::flags`: the connection's first payload has been seen.
pub const CONN_SEEN_PAYLOAD: u32 = 1;
/// `ConnState::flags`: the connection carries TLS; its requests cannot be seen.
pub const CONN_TLS: u32 = 2;

/// A local endpoint a service listens on. IPv4 addresses are stored IPv4-mapped
/// (`::ffff:a.b.c.d`); the all-zero address with a port matches any local address on that port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    /// IPv6 address (or IPv4-mapped), network byte order.
    pub addr: [u8; 16],
    /// Port, host byte order.
    pub port: u16,
    /// Explicit padding so the key has no uninitialised bytes.
    pub _pad: u16,
}

impl EndpointKey {
    pub const fn new(addr: [u8; 16], port: u16) -> Self {
        Self { addr, port, _pad: 0 }
    }

    /// The IPv4-mapped form of an IPv4 address given as its four octets.
    pub const fn v4(octets: [u8; 4], port: u16) -> Self {
        let [a, b, c, d] = octets;
        Self::new([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d], port)
    }

    /// The key that matches every local address on `port`.
    pub const fn any(port: u16) -> Self {
        Self::new([0; 16], port)
    }
}

/// A TCP connection as seen from the server's side: local endpoint first.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
}

/// What the kernel remembers of one HTTP connection between segments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    /// Start (bpf_ktime_get_ns) of the oldest request still open, 0 when none is.
    pub request_start_ns: u64,
    /// TCP sequence number of the segment that started the last request, so a retransmitted
    /// first segment does not count twice.
    pub last_request_seq: u32,
    /// The same for the last response's first segment.
    pub last_response_seq: u32,
    /// Requests started and not yet answered.
    pub open_requests: u32,
    /// Requests and responses seen on this connection (wrapping): tell a first segment from a
    /// retransmission when the sequence number happens to be 0.
    pub requests_seen: u32,
    pub responses_seen: u32,
    /// The service this connection's local endpoint belongs to.
    pub service_id: u32,
    /// `CONN_*` bits.
    pub flags: u32,
    /// Explicit padding to a multiple of 8 bytes.
    pub _pad: u32,
}

/// Cumulative per-service counters, one copy per CPU; the agent sums the copies. Counters only
/// grow (like Prometheus counters), so a lost report loses nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceCounters {
    /// HTTP requests started (first segment of a request seen on ingress).
    pub requests: u64,
    /// Final HTTP responses started (status line seen on egress; 1xx excluded).
    pub responses: u64,
    /// Σ sign over request starts (+1) and ends (−1): the in-flight count.
    pub inflight_sign_sum: i64,
    /// Σ sign·t (ns) over the same events; with `inflight_sign_sum` it gives the time integral of
    /// in-flight requests: A(T) = T·C − S.
    pub inflight_time_sum: i64,
    /// Sum of request latencies (first request byte in → first response byte out), ns.
    pub latency_sum_ns: u64,
    /// Latency histogram in the buckets of [`crate::latency`].
    pub latency_buckets: [u64; LATENCY_BUCKETS],
    /// TCP payload bytes received by the service.
    pub rx_bytes: u64,
    /// TCP payload bytes sent by the service.
    pub tx_bytes: u64,
    /// Nanoseconds on CPU of the tasks in the service's cgroups (sched_switch).
    pub cpu_ns: u64,
    /// Connections accepted (established, server side) and closed (sock_ops).
    pub connections_opened: u64,
    pub connections_closed: u64,
    /// Connections whose first bytes were a TLS handshake: their requests cannot be counted.
    pub tls_connections: u64,
}

/// A service address of the connect-time load balancer (`SERVICE_ADDRS` value): which block of
/// `BACKENDS` holds its ready backends and how many there are.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Balanced {
    /// The service's id: its backends are `BACKENDS[id * MAX_BACKENDS ..][..count]`.
    pub service_id: u32,
    /// Ready backends, 0 to `MAX_BACKENDS`; with 0, connections go to the holder, if any.
    pub count: u32,
    /// Round-robin cursor, incremented atomically by every redirected connect.
    pub next: u32,
    /// With no ready backend (`count == 0`), connects go to the agent's holder on
    /// 127.0.0.1:`holder_port` (host byte order); 0: no holder, connections are left alone.
    pub holder_port: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is #[repr(C)], made only of integers and arrays of integers, with all
    // padding explicit, so any bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::ConnState {}
    unsafe impl aya::Pod for super::ServiceCounters {}
    unsafe impl aya::Pod for super::Balanced {}
}

impl Default for ServiceCounters {
    fn default() -> Self {
        Self {
            requests: 0,
            responses: 0,
            inflight_sign_sum: 0,
            inflight_time_sum: 0,
            latency_sum_ns: 0,
            latency_buckets: [0; LATENCY_BUCKETS],
            rx_bytes: 0,
            tx_bytes: 0,
            cpu_ns: 0,
            connections_opened: 0,
            connections_closed: 0,
            tls_connections: 0,
        }
    }
}
