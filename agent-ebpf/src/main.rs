//! Surge's kernel programs. `cgroup_skb` ingress/egress on the cgroup v2 root see every TCP
//! segment of watched server endpoints: a request's first segment arriving, a response's first
//! segment leaving. They keep per-connection state and cumulative per-service counters; the agent
//! reads the counters, this side never allocates or blocks.
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod counters;
mod packet;

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{cgroup_skb, map},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::SkBuffContext,
};
use surge_common::{
    http::{classify, SegmentStart, PREFIX_LEN},
    ConnKey, ConnState, EndpointKey, ServiceCounters, MAX_CONNECTIONS, MAX_ENDPOINTS, MAX_SERVICES,
};

use crate::packet::{Direction, Segment};

/// Watched local endpoints → service id. Written by the agent.
#[map(name = "WATCHED")]
static WATCHED: HashMap<EndpointKey, u32> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// Per-service cumulative counters, indexed by service id, one copy per CPU.
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<ServiceCounters> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// HTTP state of each watched connection, by 4-tuple from the server's side.
#[map(name = "CONNS")]
static CONNS: LruHashMap<ConnKey, ConnState> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

/// cgroup_skb programs return 1 to let the packet through; Surge only observes.
const PASS: i32 = 1;

#[cgroup_skb(ingress)]
pub fn surge_skb_ingress(ctx: SkBuffContext) -> i32 {
    let _ = observe(&ctx, Direction::Ingress);
    PASS
}

#[cgroup_skb(egress)]
pub fn surge_skb_egress(ctx: SkBuffContext) -> i32 {
    let _ = observe(&ctx, Direction::Egress);
    PASS
}

/// Looks a segment's local endpoint up, then accounts its payload and flags to the service.
#[inline(always)]
fn observe(ctx: &SkBuffContext, dir: Direction) -> Result<(), i64> {
    let seg = Segment::parse(ctx, dir)?;
    let service_id = match lookup_service(&seg.conn) {
        Some(id) => id,
        None => return Ok(()),
    };
    let counters = COUNTERS.get_ptr_mut(service_id).ok_or(-1i64)?;
    // SAFETY: the pointer is to this CPU's copy of a map value, valid for the whole program run.
    let counters = unsafe { &mut *counters };

    if seg.payload_len > 0 {
        match dir {
            Direction::Ingress => counters::add_u64(&mut counters.rx_bytes, seg.payload_len as u64),
            Direction::Egress => counters::add_u64(&mut counters.tx_bytes, seg.payload_len as u64),
        }
        let (prefix, len) = load_prefix(ctx, &seg)?;
        match (dir, classify(&prefix, len)) {
            (Direction::Ingress, SegmentStart::Request) => on_request(&seg, service_id, counters),
            (Direction::Egress, SegmentStart::FinalResponse) => on_response(&seg, counters),
            _ => {}
        }
    }
    // A reset from either side, or the server's FIN, ends the connection and anything still in
    // flight on it. A client's FIN alone is a half-close: its request may still be answered.
    if seg.rst || (seg.fin && matches!(dir, Direction::Egress)) {
        on_close(&seg, counters);
    }
    Ok(())
}

/// Copies the start of the payload with constant-size loads, which the verifier can check: 16
/// bytes, or 12 of a shorter payload (enough for a status line, or the longest method and the
/// first byte of its target). Shorter payloads cannot start a message and are not read.
#[inline(always)]
fn load_prefix(ctx: &SkBuffContext, seg: &Segment) -> Result<([u8; PREFIX_LEN], usize), i64> {
    let mut prefix = [0u8; PREFIX_LEN];
    if seg.payload_len >= PREFIX_LEN {
        prefix = ctx.load(seg.payload_offset).map_err(|e| e as i64)?;
        Ok((prefix, PREFIX_LEN))
    } else if seg.payload_len >= 12 {
        let head: [u8; 12] = ctx.load(seg.payload_offset).map_err(|e| e as i64)?;
        prefix[..12].copy_from_slice(&head);
        Ok((prefix, 12))
    } else {
        Ok((prefix, 0))
    }
}

#[inline(always)]
fn lookup_service(conn: &ConnKey) -> Option<u32> {
    let exact = EndpointKey::new(conn.local_addr, conn.local_port);
    // SAFETY: values are plain u32s copied out at once.
    unsafe {
        if let Some(id) = WATCHED.get(&exact) {
            return Some(*id);
        }
        WATCHED.get(&EndpointKey::any(conn.local_port)).copied()
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper with no arguments and no side effects.
    unsafe { bpf_ktime_get_ns() }
}

/// The first segment of a request arrived: count it and open it, unless it is a retransmission
/// of the segment that started the request before.
#[inline(always)]
fn on_request(seg: &Segment, service_id: u32, counters: &mut ServiceCounters) {
    let now = now_ns();
    match CONNS.get_ptr_mut(&seg.conn) {
        Some(state) => {
            // SAFETY: a pointer into the map's value for this connection.
            let state = unsafe { &mut *state };
            if state.last_request_seq == seg.seq && state.requests_seen > 0 {
                return;
            }
            state.last_request_seq = seg.seq;
            state.requests_seen = state.requests_seen.wrapping_add(1);
            if state.open_requests == 0 {
                state.request_start_ns = now;
            }
            state.open_requests += 1;
        }
        None => {
            let state = ConnState {
                request_start_ns: now,
                last_request_seq: seg.seq,
                last_response_seq: 0,
                open_requests: 1,
                requests_seen: 1,
                responses_seen: 0,
                service_id,
            };
            if CONNS.insert(&seg.conn, &state, 0).is_err() {
                return;
            }
        }
    }
    counters::add_u64(&mut counters.requests, 1);
    counters::add_i64(&mut counters.inflight_sign_sum, 1);
    counters::add_i64(&mut counters.inflight_time_sum, now as i64);
}

/// The first segment of a final response left: close the oldest open request on the connection.
#[inline(always)]
fn on_response(seg: &Segment, counters: &mut ServiceCounters) {
    let Some(state) = CONNS.get_ptr_mut(&seg.conn) else {
        return;
    };
    // SAFETY: a pointer into the map's value for this connection.
    let state = unsafe { &mut *state };
    if state.open_requests == 0 || (state.last_response_seq == seg.seq && state.responses_seen > 0) {
        return;
    }
    state.last_response_seq = seg.seq;
    state.responses_seen = state.responses_seen.wrapping_add(1);
    let now = now_ns();
    let latency = now.saturating_sub(state.request_start_ns);
    state.open_requests -= 1;
    // With pipelining the next request's own start is not kept; it is taken as now.
    state.request_start_ns = if state.open_requests > 0 { now } else { 0 };
    counters::add_u64(&mut counters.responses, 1);
    counters::add_i64(&mut counters.inflight_sign_sum, -1);
    counters::add_i64(&mut counters.inflight_time_sum, -(now as i64));
    counters::add_u64(&mut counters.latency_sum_ns, latency);
    counters::record_latency(counters, latency);
}

/// The connection ended: requests still open on it end now, and its state goes.
#[inline(always)]
fn on_close(seg: &Segment, counters: &mut ServiceCounters) {
    // SAFETY: the value is copied out at once.
    let open = unsafe { CONNS.get(&seg.conn).map(|s| s.open_requests) };
    let Some(open) = open else {
        return;
    };
    if open > 0 {
        let now = now_ns() as i64;
        counters::add_i64(&mut counters.inflight_sign_sum, -(open as i64));
        counters::add_i64(&mut counters.inflight_time_sum, -(now * open as i64));
    }
    let _ = CONNS.remove(&seg.conn);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
