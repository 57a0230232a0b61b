//! HTTP/1.x accounting from cgroup_skb: a request's first segment arriving opens it, a final
//! response's first segment leaving closes the oldest open one. TLS connections are marked and
//! only counted as such.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::SkBuffContext};
use surge_common::{
    http::{classify, SegmentStart, PREFIX_LEN},
    ConnState, ServiceCounters, CONN_SEEN_PAYLOAD, CONN_TLS,
};

use crate::{
    counters,
    maps::{counters_of, service_of, CONNS},
    packet::{Direction, Segment},
};

/// Looks a segment's local endpoint up, then accounts its payload and flags to the service.
#[inline(always)]
pub fn observe(ctx: &SkBuffContext, dir: Direction) -> Result<(), i64> {
    let seg = Segment::parse(ctx, dir)?;
    let Some(service_id) = service_of(seg.conn.local_addr, seg.conn.local_port) else {
        return Ok(());
    };
    let c = counters_of(service_id).ok_or(-1i64)?;

    if seg.payload_len > 0 {
        let (prefix, len) = load_prefix(ctx, &seg)?;
        match dir {
            Direction::Ingress => {
                counters::add_u64(&mut c.rx_bytes, seg.payload_len as u64);
                on_ingress_payload(&seg, service_id, &prefix, len, c);
            }
            Direction::Egress => {
                counters::add_u64(&mut c.tx_bytes, seg.payload_len as u64);
                if classify(&prefix, len) == SegmentStart::FinalResponse {
                    on_response(&seg, c);
                }
            }
        }
    }
    // A reset from either side, or the server's FIN, ends the connection and anything still in
    // flight on it. A client's FIN alone is a half-close: its request may still be answered.
    if seg.rst || (seg.fin && matches!(dir, Direction::Egress)) {
        close(&seg.conn, c);
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
    } else if seg.payload_len >= 3 {
        let head: [u8; 3] = ctx.load(seg.payload_offset).map_err(|e| e as i64)?;
        prefix[..3].copy_from_slice(&head);
        Ok((prefix, 3))
    } else {
        Ok((prefix, 0))
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper with no arguments and no side effects.
    unsafe { bpf_ktime_get_ns() }
}

/// Client bytes arrived: the first ones tell TLS apart; a request line opens a request.
#[inline(always)]
fn on_ingress_payload(
    seg: &Segment,
    service_id: u32,
    prefix: &[u8; PREFIX_LEN],
    len: usize,
    c: &mut ServiceCounters,
) {
    let state = match CONNS.get_ptr_mut(&seg.conn) {
        // SAFETY: a pointer into the map's value for this connection.
        Some(p) => unsafe { &mut *p },
        None => {
            let fresh = ConnState {
                service_id,
                ..ConnState::default()
            };
            if CONNS.insert(&seg.conn, &fresh, 0).is_err() {
                return;
            }
            match CONNS.get_ptr_mut(&seg.conn) {
                // SAFETY: as above.
                Some(p) => unsafe { &mut *p },
                None => return,
            }
        }
    };
    if state.flags & CONN_SEEN_PAYLOAD == 0 {
        state.flags |= CONN_SEEN_PAYLOAD;
        // A TLS record header: handshake (22), version 3.x.
        if len >= 3 && prefix[0] == 0x16 && prefix[1] == 0x03 {
            state.flags |= CONN_TLS;
            counters::add_u64(&mut c.tls_connections, 1);
        }
    }
    if state.flags & CONN_TLS != 0 || classify(prefix, len) != SegmentStart::Request {
        return;
    }
    // A retransmission of the segment that started the last request adds nothing.
    if state.requests_seen > 0 && state.last_request_seq == seg.seq {
        return;
    }
    let now = now_ns();
    state.last_request_seq = seg.seq;
    state.requests_seen = state.requests_seen.wrapping_add(1);
    if state.open_requests == 0 {
        state.request_start_ns = now;
    }
    state.open_requests += 1;
    counters::add_u64(&mut c.requests, 1);
    counters::add_i64(&mut c.inflight_sign_sum, 1);
    counters::add_i64(&mut c.inflight_time_sum, now as i64);
}

/// The first segment of a final response left: close the oldest open request on the connection.
#[inline(always)]
fn on_response(seg: &Segment, c: &mut ServiceCounters) {
    let Some(state) = CONNS.get_ptr_mut(&seg.conn) else {
        return;
    };
    // SAFETY: a pointer into the map's value for this connection.
    let state = unsafe { &mut *state };
    if state.open_requests == 0 || (state.responses_seen > 0 && state.last_response_seq == seg.seq) {
        return;
    }
    state.last_response_seq = seg.seq;
    state.responses_seen = state.responses_seen.wrapping_add(1);
    let now = now_ns();
    let latency = now.saturating_sub(state.request_start_ns);
    state.open_requests -= 1;
    // With pipelining the next request's own start is not kept; it is taken as now.
    state.request_start_ns = if state.open_requests > 0 { now } else { 0 };
    counters::add_u64(&mut c.responses, 1);
    counters::add_i64(&mut c.inflight_sign_sum, -1);
    counters::add_i64(&mut c.inflight_time_sum, -(now as i64));
    counters::add_u64(&mut c.latency_sum_ns, latency);
    counters::record_latency(c, latency);
}

/// The connection ended: requests still open on it end now, and its state goes.
#[inline(always)]
pub fn close(conn: &surge_common::ConnKey, c: &mut ServiceCounters) {
    // SAFETY: the value is copied out at once.
    let open = unsafe { CONNS.get(conn).map(|s| s.open_requests) };
    let Some(open) = open else {
        return;
    };
    if open > 0 {
        let now = now_ns() as i64;
        counters::add_i64(&mut c.inflight_sign_sum, -(open as i64));
        counters::add_i64(&mut c.inflight_time_sum, -(now * open as i64));
    }
    let _ = CONNS.remove(conn);
}
