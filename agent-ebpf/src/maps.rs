//! Every map of the kernel programs, and the lookups they share.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use surge_common::{
    stream::{Cursor, Framer, Starts},
    ConnKey, ConnState, EndpointKey, ServiceCounters, StreamKey, MAX_CGROUPS, MAX_CONNECTIONS, MAX_ENDPOINTS,
    MAX_SERVICES, MAX_SPILLED_STREAMS, WATCHED_PORT_WORDS,
};

/// Watched local endpoints → service id. Written by the agent.
#[map(name = "WATCHED")]
pub static WATCHED: HashMap<EndpointKey, u32> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// Watched local ports as a bitmap (bit `p & 63` of word `p >> 6`): every other segment and
/// socket event is dropped after one array read. Written by the agent.
#[map(name = "WATCHED_PORTS")]
pub static WATCHED_PORTS: Array<u64> = Array::with_max_entries(WATCHED_PORT_WORDS, 0);

/// Whether any endpoint on local `port` (host byte order) is watched.
#[inline(always)]
pub fn port_watched(port: u32) -> bool {
    match WATCHED_PORTS.get(port >> 6) {
        Some(word) => word & (1u64 << (port & 63)) != 0,
        None => false,
    }
}

/// Watched cgroup ids → service id. Written by the agent.
#[map(name = "CGROUPS")]
pub static CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_CGROUPS, 0);

/// Per-service cumulative counters, indexed by service id, one copy per CPU.
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<ServiceCounters> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// HTTP state of each watched connection, by 4-tuple from the server's side.
#[map(name = "CONNS")]
pub static CONNS: LruHashMap<ConnKey, ConnState> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

/// Starts (bpf_ktime_get_ns) of HTTP/2 streams open past their connection's slots, so that a
/// gRPC channel with many calls at once gets each one's latency, and a reset ends the right one.
/// Least recently used entries go first: those of connections that closed with streams open.
#[map(name = "STREAM_STARTS")]
pub static STREAM_STARTS: LruHashMap<StreamKey, u64> = LruHashMap::with_max_entries(MAX_SPILLED_STREAMS, 0);

/// One all-zero connection state, never written: new CONNS entries are copied from it rather
/// than from a value built on the stack, which the verifier's 512-byte limit makes scarce.
#[map(name = "FRESH_CONN")]
pub static FRESH_CONN: Array<ConnState> = Array::with_max_entries(1, 0);

/// When this CPU last switched tasks (bpf_ktime_get_ns).
#[map(name = "LAST_SWITCH")]
pub static LAST_SWITCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The state of one framing loop (see http1::frame): slot 0 egress, slot 1 ingress.
#[repr(C)]
pub struct FrameScratch {
    pub framer: Framer,
    pub cursor: Cursor,
    pub starts: Starts,
    /// 1 when framing requests (ingress), 0 responses.
    pub side: u32,
    /// Bumped by every use, so a nested use of the slot is noticed.
    pub generation: u32,
}

/// Per-CPU scratch space of the framing loops.
#[map(name = "FRAMING")]
pub static FRAMING: PerCpuArray<FrameScratch> = PerCpuArray::with_max_entries(2, 0);

/// The service a local endpoint belongs to: the exact address first, then any address.
#[inline(always)]
pub fn service_of(local_addr: [u8; 16], local_port: u16) -> Option<u32> {
    // SAFETY: values are plain u32s copied out at once.
    unsafe {
        if let Some(id) = WATCHED.get(&EndpointKey::new(local_addr, local_port)) {
            return Some(*id);
        }
        WATCHED.get(&EndpointKey::any(local_port)).copied()
    }
}

/// This CPU's copy of a service's counters.
#[inline(always)]
pub fn counters_of(service_id: u32) -> Option<&'static mut ServiceCounters> {
    // SAFETY: a pointer to this CPU's copy of a map value, valid while the program runs; per-CPU
    // copies are only ever changed with atomic adds.
    COUNTERS.get_ptr_mut(service_id).map(|p| unsafe { &mut *p })
}
