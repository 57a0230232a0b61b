//! Every map of the kernel programs, and the lookups they share.

use aya_ebpf::{
    bindings::{bpf_sock, BPF_SK_STORAGE_GET_F_CREATE, BPF_TCP_LISTEN},
    btf_maps::SkStorage,
    helpers::bpf_sk_storage_get,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
};
use core::ffi::c_void;
use surge_common::{
    stream::{Cursor, Framer, Starts},
    ConnKey, ConnState, EndpointKey, ServiceCounters, StreamKey, CONN_TLS, MAX_CGROUPS, MAX_ENDPOINTS,
    MAX_HANDSHAKE_CONNECTIONS, MAX_SERVICES, MAX_SPILLED_STREAMS, NO_WATCH_GENERATION, WATCHED_PORT_WORDS,
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

/// The state of connections whose first payload came with the last packet of their handshake
/// (a server with `TCP_DEFER_ACCEPT`, as nginx's `listen … deferred`; TCP Fast Open; SYN
/// cookies): the kernel filters that packet on the listening socket, before the connection's
/// own socket exists. Kept by 4-tuple from the server's side until sock_ops sees the connection
/// established and moves it onto its socket, a moment later.
#[map(name = "HANDSHAKE_CONNS")]
pub static HANDSHAKE_CONNS: LruHashMap<ConnKey, ConnState> =
    LruHashMap::with_max_entries(MAX_HANDSHAKE_CONNECTIONS, 0);

/// What the framing of a connection still in its handshake found (requests started), by
/// 4-tuple: counted only once sock_ops sees the connection established (a moment later). A
/// segment that reaches a listening socket without a handshake to complete (a late one, after
/// the connection's socket was reset away) is refused by the kernel; its entries are never
/// counted, and go when a later connection on the same 4-tuple is established, or when the
/// LRU needs their room.
#[map(name = "HANDSHAKE_STARTS")]
pub static HANDSHAKE_STARTS: LruHashMap<ConnKey, Starts> =
    LruHashMap::with_max_entries(MAX_HANDSHAKE_CONNECTIONS, 0);

/// The program that accounts segments filtered on a listening socket (`surge_skb_handshake`, at
/// index 0): the ingress program tail-calls it. Written by the agent.
#[map(name = "HANDSHAKE_PROGRAM")]
pub static HANDSHAKE_PROGRAM: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// One all-zero connection state, never written: new HANDSHAKE_CONNS entries are copied from it
/// rather than from a value built on the stack, which the verifier's 512-byte limit makes scarce.
#[map(name = "FRESH_CONN")]
pub static FRESH_CONN: Array<ConnState> = Array::with_max_entries(1, 0);

/// The state of a connection still in its handshake, created all zero first if `create`.
#[inline(always)]
pub fn handshake_state_of(conn: &ConnKey, create: bool) -> Option<&'static mut ConnState> {
    if let Some(p) = HANDSHAKE_CONNS.get_ptr_mut(conn) {
        // SAFETY: a pointer into the map's value for this connection.
        return Some(unsafe { &mut *p });
    }
    if !create {
        return None;
    }
    let fresh = FRESH_CONN.get(0)?;
    let _ = HANDSHAKE_CONNS.insert(conn, fresh, 0);
    // What an earlier connection on this 4-tuple left is not this one's.
    let _ = HANDSHAKE_STARTS.remove(conn);
    // SAFETY: as above.
    HANDSHAKE_CONNS.get_ptr_mut(conn).map(|p| unsafe { &mut *p })
}

/// What a connection's handshake carried, moved onto its socket.
pub struct Adopted {
    /// The socket's state.
    pub state: &'static mut ConnState,
    /// The requests that started in the handshake's payload, if any did.
    pub starts: Option<&'static Starts>,
    /// How many payload bytes of the client's came with the handshake (retransmissions once).
    pub rx_bytes: u32,
    /// Whether those bytes began a TLS handshake.
    pub tls: bool,
}

/// The connection `conn` is established on socket `sk`, whose next expected client byte is
/// `rcv_nxt`: what was framed of it during its handshake becomes the socket's state, returned
/// with the requests that started then and the bytes it carried. Entries of an earlier
/// connection on the same 4-tuple (a segment that reached the listening socket with no
/// handshake to complete) start elsewhere in the sequence space: they go, unused.
#[inline(always)]
pub fn adopt_handshake_state(sk: *mut bpf_sock, conn: &ConnKey, rcv_nxt: u32) -> Option<Adopted> {
    let p = HANDSHAKE_CONNS.get_ptr_mut(conn)?;
    // SAFETY: a pointer into the map's value for this connection.
    let (first, next, flags) = unsafe { ((*p).first_seq_in, (*p).next_seq_in, (*p).flags) };
    if sk.is_null() || first != rcv_nxt {
        let _ = HANDSHAKE_CONNS.remove(conn);
        let _ = HANDSHAKE_STARTS.remove(conn);
        return None;
    }
    let map = &CONN_STATES as *const SkStorage<ConnState> as *mut c_void;
    // SAFETY: a socket the verifier knows non-null, and a whole ConnState map value to copy
    // the new storage from.
    let state = unsafe {
        bpf_sk_storage_get(
            map,
            sk as *mut c_void,
            p as *mut c_void,
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        )
    };
    let _ = HANDSHAKE_CONNS.remove(conn);
    if state.is_null() {
        let _ = HANDSHAKE_STARTS.remove(conn);
        return None;
    }
    // SAFETY: the entry's value, valid while the program runs (the caller removes it after).
    let starts = unsafe { HANDSHAKE_STARTS.get(conn) };
    Some(Adopted {
        // SAFETY: the socket's value, valid while the program runs.
        state: unsafe { &mut *(state as *mut ConnState) },
        starts,
        // The framed bytes run from the first to the next expected one.
        rx_bytes: next.wrapping_sub(first),
        tls: flags & CONN_TLS != 0,
    })
}

/// Whether `sk` (a program context's socket, maybe null) is a listening socket.
#[inline(always)]
pub fn is_listening(sk: *mut bpf_sock) -> bool {
    // SAFETY: one field of a socket the verifier knows non-null.
    !sk.is_null() && unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*sk).state)) } == BPF_TCP_LISTEN
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

/// Bumped by the agent after every change of `WATCHED`: a connection's cached service is good
/// while its generation is this one.
#[map(name = "WATCH_GENERATION")]
pub static WATCH_GENERATION: Array<u32> = Array::with_max_entries(1, 0);

/// The watch set's generation now.
#[inline(always)]
pub fn watch_generation() -> u32 {
    WATCH_GENERATION.get(0).copied().unwrap_or(NO_WATCH_GENERATION)
}

/// A connection's service as cached in its state, if cached in this `generation`.
#[inline(always)]
pub fn cached_service(state: &ConnState, generation: u32) -> Option<u32> {
    // One load: the other direction may be writing the word.
    // SAFETY: a field of a live map value.
    let cached = unsafe { core::ptr::read_volatile(&state.service) };
    (generation != NO_WATCH_GENERATION && (cached >> 32) as u32 == generation).then_some(cached as u32)
}

/// Caches a connection's service, as looked up in `generation`.
#[inline(always)]
pub fn cache_service(state: &mut ConnState, generation: u32, id: u32) {
    // One store: a lookup racing on the other CPU writes a whole word too.
    // SAFETY: a field of a live map value.
    unsafe { core::ptr::write_volatile(&mut state.service, (generation as u64) << 32 | id as u64) };
}

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
