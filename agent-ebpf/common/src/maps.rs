//! The layout of every map the kernel programs and the agent both touch.

use crate::{latency::LATENCY_BUCKETS, stream::Framer};

/// How many services one agent can watch at once: the size of the per-service counter array.
pub const MAX_SERVICES: u32 = 256;
/// How many watched endpoints (address, port) one agent can hold.
pub const MAX_ENDPOINTS: u32 = 16384;
/// How many connections still in their handshake the kernel keeps state for (LRU): those whose
/// first payload came with their handshake's last packet, for the moment until they are
/// established.
pub const MAX_HANDSHAKE_CONNECTIONS: u32 = 4096;
/// The generation of the watch set before the agent's first change: a connection's cached
/// service is never of it.
pub const NO_WATCH_GENERATION: u32 = 0;
/// Words of the watched-port bitmap: 64 ports each.
pub const WATCHED_PORT_WORDS: u32 = 65536 / 64;
/// How many cgroups (a service's replicas and their descendants) can be attributed.
pub const MAX_CGROUPS: u32 = 16384;
/// How many service addresses the connect-time load balancer can hold.
pub const MAX_BALANCED: u32 = 1024;
/// How many ready backends one balanced service can have (the slots of `BACKENDS` per service).
pub const MAX_BACKENDS: u32 = 64;
/// The version of the load balancer's maps (`SERVICE_ADDRS`, `BACKENDS`, `Balanced`), which stay
/// pinned across agent restarts: bump it whenever their layout or meaning changes, so a new agent
/// never reuses maps it would misread.
pub const LB_LAYOUT_VERSION: u32 = 1;

/// `ConnState::flags`: the connection's first payload has been seen.
pub const CONN_SEEN_PAYLOAD: u32 = 1;
/// `ConnState::flags`: the connection carries TLS; its requests cannot be seen.
pub const CONN_TLS: u32 = 2;
/// `ConnState::flags`: `next_seq_out` is known (a server payload has been seen).
pub const CONN_SEEN_EGRESS: u32 = 4;
/// `ConnState::flags`: the socket connected out (an active open) from a watched endpoint's
/// address and port, which only happens while nothing listens there: it is a client, and none
/// of its traffic is the service's.
pub const CONN_CLIENT: u32 = 8;
/// `ConnState::flags`: the connection ended and its open requests were ended with it; a request
/// opened at the same moment on the other CPU is ended by its opener.
pub const CONN_CLOSED: u32 = 16;
/// `ConnState::flags`: an HTTP/2 end took a claim that may not have been its stream's, so an
/// end that finds no claim of its own takes another (see the agent's `inflight`).
pub const CONN_BLIND: u32 = 32;

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

/// How many open requests of one connection keep their own start time in its state (pipelined
/// HTTP/1.1, concurrent HTTP/2 streams). HTTP/1.1 requests beyond it share the start of the
/// first of them; HTTP/2 streams beyond it keep theirs in `STREAM_STARTS`, by [`StreamKey`].
pub const START_SLOTS: usize = 8;

/// How many HTTP/2 streams, over all connections, keep their start outside their connection's
/// slots (the least recently used go first when it is full).
pub const MAX_SPILLED_STREAMS: u32 = 65_536;

/// One HTTP/2 stream of a connection: where a stream past its connection's [`START_SLOTS`]
/// keeps its start.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StreamKey {
    pub conn: ConnKey,
    pub stream_id: u32,
}

/// What the kernel remembers of one HTTP connection between segments.
///
/// A connection's two directions are framed by two programs that can run at once on two CPUs
/// (the client's request arriving as the server's answer leaves). Each framer is written by its
/// own direction only. The open requests are shared: the client's side opens them, either side
/// may end them (a response; a client's reset). Every open request is held by exactly one claim
/// (its bit in `used`, or one unit of `spilled` or of `unslotted`), and ending it means taking
/// that claim with an atomic instruction: no request ends twice or never, whatever runs at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    /// Start (bpf_ktime_get_ns) of the first open request that has no start of its own.
    pub request_start_ns: u64,
    /// Start times of open requests: slot `j` holds one while bit `j` of `used` is set.
    pub starts: [u64; START_SLOTS],
    /// HTTP/2: the stream id of each slot's request (0: HTTP/1), so a stream's end finds its own
    /// start.
    pub stream_ids: [u32; START_SLOTS],
    /// Which slots hold an open request. Only the client's side fills a slot (then sets its
    /// bit); whoever clears the bit ends that request.
    pub used: u64,
    /// Open HTTP/2 streams whose start is in `STREAM_STARTS` (a count of claims: the entries
    /// there only carry the start times).
    pub spilled: i64,
    /// Open requests with no start of their own (more than the slots, or a segment with more
    /// starts than its ids): a count of claims.
    pub unslotted: i64,
    /// The TCP sequence number expected next from the client and from the server: a segment
    /// before it is a retransmission (its bytes were framed already), one after it a gap.
    pub next_seq_in: u32,
    pub next_seq_out: u32,
    /// `CONN_*` bits, set atomically (8-aligned: the kernel's atomics are 64-bit).
    pub flags: u32,
    /// The sequence number of the first client byte framed (set once, with
    /// `CONN_SEEN_PAYLOAD`). For a connection whose first payload came with its handshake, it
    /// tells that connection from an earlier one on the same 4-tuple. The upper half of the
    /// 8-byte word the flags are set in: atomic ORs of the flags leave it as it is.
    pub first_seq_in: u32,
    /// Which open requests are HEAD (their responses have no body), oldest first.
    pub heads: crate::stream::HeadQueue,
    /// HTTP/1 message framing of the client's bytes (requests) and the server's (responses).
    pub requests: Framer,
    pub responses: Framer,
    /// The service of the connection's local endpoint as last looked up: the watch set's
    /// generation in the upper half, the service id in the lower (one word, written whole). While
    /// the generation is the current one, no lookup is needed.
    pub service: u64,
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
    /// TCP payload bytes received by the service; a retransmitted byte counts once.
    pub rx_bytes: u64,
    /// TCP payload bytes sent by the service; a retransmitted byte counts once.
    pub tx_bytes: u64,
    /// Nanoseconds on CPU of the tasks in the service's cgroups (sched_switch).
    pub cpu_ns: u64,
    /// Connections accepted (established, server side) and closed (sock_ops).
    pub connections_opened: u64,
    pub connections_closed: u64,
    /// Connections whose first bytes were a TLS handshake: their requests cannot be counted.
    pub tls_connections: u64,
    /// Requests (counted in `requests` too) whose `User-Agent` names a health probe: the
    /// kubelet's `kube-probe/…` or the local actuator's `surge-probe`. Probes are not traffic.
    pub probe_requests: u64,
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
    unsafe impl aya::Pod for super::StreamKey {}
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
            probe_requests: 0,
        }
    }
}
