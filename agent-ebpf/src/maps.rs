//! Every map of the kernel programs, and the lookups they share.

use aya_ebpf::{
    bindings::{bpf_sock, BPF_SK_STORAGE_GET_F_CREATE},
    btf_maps::SkStorage,
    helpers::bpf_sk_storage_get,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use core::ffi::c_void;
use surge_common::{
    stream::{Cursor, Framer, Starts},
    ConnState, EndpointKey, ServiceCounters, StreamKey, MAX_CGROUPS, MAX_ENDPOINTS, MAX_SERVICES,
    MAX_SPILLED_STREAMS, WATCHED_PORT_WORDS,
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

/// HTTP state of each watched connection, kept on the server's socket (socket-local storage):
/// one pointer away from the socket the packet programs are given, allocated only for
/// connections that carry payload to a watched endpoint, and freed by the kernel with the
/// socket, so no table fills up, no entry outlives its connection, and none is reused while a
/// program still holds it.
#[btf_map]
pub static CONN_STATES: SkStorage<ConnState> = SkStorage::new();

/// The state kept on socket `sk` (a program context's socket; null when there is none), created
/// all zero first if `create` and the socket is a full, live one.
#[inline(always)]
pub fn conn_state_of(sk: *mut bpf_sock, create: bool) -> Option<&'static mut ConnState> {
    if sk.is_null() {
        return None;
    }
    let map = &CONN_STATES as *const SkStorage<ConnState> as *mut c_void;
    let flags = if create {
        BPF_SK_STORAGE_GET_F_CREATE as u64
    } else {
        0
    };
    // SAFETY: a socket the verifier knows non-null; the helper returns this socket's value of
    // the map, or null.
    let mut p = unsafe { bpf_sk_storage_get(map, sk as *mut c_void, core::ptr::null_mut(), flags) };
    if p.is_null() && create {
        // The other direction's first payload created it on the other CPU just now (the
        // server's SETTINGS as the client's preface arrives): this one uses the winner's.
        // SAFETY: as above.
        p = unsafe { bpf_sk_storage_get(map, sk as *mut c_void, core::ptr::null_mut(), 0) };
    }
    // SAFETY: the socket's value, valid while the program runs (freed after an RCU grace period).
    (!p.is_null()).then(|| unsafe { &mut *(p as *mut ConnState) })
}

/// Starts (bpf_ktime_get_ns) of HTTP/2 streams open past their connection's slots, so that a
/// gRPC channel with many calls at once gets each one's latency, and a reset ends the right one.
/// Least recently used entries go first: those of connections that closed with streams open.
#[map(name = "STREAM_STARTS")]
pub static STREAM_STARTS: LruHashMap<StreamKey, u64> = LruHashMap::with_max_entries(MAX_SPILLED_STREAMS, 0);

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
