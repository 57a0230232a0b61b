//! HTTP/1.x accounting from cgroup_skb: every TCP payload of a watched connection is framed by the
//! shared [`Framer`] (one per direction), so each request start, pipelined ones included, opens a
//! request, and each final response start closes the oldest open one. TLS connections are marked
//! and only counted as such.

use aya_ebpf::{
    bindings::{__sk_buff, BPF_NOEXIST},
    helpers::{bpf_ktime_get_ns, bpf_loop, bpf_skb_load_bytes},
    programs::SkBuffContext,
};
use core::{
    ffi::c_void,
    intrinsics::{atomic_or, AtomicOrdering},
};
use surge_common::{
    http::PREFIX_LEN,
    stream::{Framer, HeadQueue, Side, Starts, CANCEL_IDS, CHUNK, STREAM_IDS},
    ConnKey, ConnState, ServiceCounters, StreamKey, CONN_CLIENT, CONN_SEEN_EGRESS, CONN_SEEN_PAYLOAD,
    CONN_TLS, START_SLOTS,
};

use crate::{
    counters,
    maps::{counters_of, port_watched, service_of, FrameScratch, CONNS, FRAMING, FRESH_CONN, STREAM_STARTS},
    packet::{Direction, Segment},
};

/// Framing rounds per segment at most: one per chunk of header bytes or body skip. A segment
/// that needs more gives the stream up until a message starts a segment again.
const MAX_ROUNDS: u32 = 8192;

/// Looks a segment's local endpoint up, then accounts its payload and flags to the service.
#[inline(always)]
pub fn observe(ctx: &SkBuffContext, dir: Direction) -> Result<(), i64> {
    // The socket's own local port (a context field, no packet read): most traffic stops here.
    // SAFETY: one field of the program's context, read once at its constant offset.
    let port = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ctx.skb.skb).local_port)) };
    if port != 0 && !port_watched(port) {
        return Ok(());
    }
    let seg = Segment::parse(ctx, dir)?;
    let Some(service_id) = service_of(seg.conn.local_addr, seg.conn.local_port) else {
        return Ok(());
    };
    let c = counters_of(service_id).ok_or(-1i64)?;

    if seg.payload_len > 0 {
        let state = conn_state(&seg, service_id);
        if matches!(&state, Some(s) if s.flags & CONN_CLIENT != 0) {
            return Ok(());
        }
        match dir {
            Direction::Ingress => counters::add_u64(&mut c.rx_bytes, seg.payload_len as u64),
            Direction::Egress => counters::add_u64(&mut c.tx_bytes, seg.payload_len as u64),
        }
        if let Some(state) = state {
            on_payload(ctx, &seg, dir, state, c)?;
        }
    }
    // A reset from either side, or the server's FIN, ends the connection and anything still in
    // flight on it. A client's FIN alone is a half-close: its request may still be answered.
    if seg.rst || (seg.fin && matches!(dir, Direction::Egress)) {
        close(&seg.conn, c);
    }
    Ok(())
}

/// Whether sock_ops marked the connection as a client's (an active open from a watched endpoint).
#[inline(always)]
pub fn is_client(conn: &surge_common::ConnKey) -> bool {
    // SAFETY: the flags are copied out at once.
    unsafe { CONNS.get(conn).map(|s| s.flags & CONN_CLIENT != 0) }.unwrap_or(false)
}

/// The connection's state, created by its first payload either way (a server may speak first:
/// an HTTP/2 server's SETTINGS can leave before the client's preface arrives).
#[inline(always)]
fn conn_state(seg: &Segment, service_id: u32) -> Option<&'static mut ConnState> {
    if let Some(p) = CONNS.get_ptr_mut(&seg.conn) {
        // SAFETY: a pointer into the map's value for this connection.
        return Some(unsafe { &mut *p });
    }
    let fresh = FRESH_CONN.get(0)?;
    // Only if still absent: the other direction's first payload may be creating the state on the
    // other CPU right now (the server's SETTINGS as the client's preface arrives). Replacing it
    // would throw away what that program framed into it, the preface included, and the
    // connection's requests would never be counted. Losing the race, this one uses the winner's.
    let _ = CONNS.insert(&seg.conn, fresh, BPF_NOEXIST as u64);
    // SAFETY: as above.
    let state = CONNS.get_ptr_mut(&seg.conn).map(|p| unsafe { &mut *p })?;
    state.service_id = service_id;
    Some(state)
}

/// Sets `flag` in the connection's flags; returns whether it was set already. Atomic: the two
/// directions of a connection run on both CPUs at once, and a plain `|=` of one could undo the
/// other's (a lost TLS mark would have TLS bytes framed as HTTP).
#[inline(always)]
fn set_flag(state: &mut ConnState, flag: u32) -> bool {
    // The BPF instruction set (cpu v1, "generic") has 64-bit atomics only: the OR is done on the
    // 8-aligned word whose low half (little-endian) is `flags`; the high half, `spilled`, is ORed
    // with 0 and so left as it is.
    const _: () = assert!(core::mem::offset_of!(ConnState, flags) % 8 == 0);
    let word = &mut state.flags as *mut u32 as *mut u64;
    // SAFETY: `word` is the 8-aligned 8 bytes `flags` and `spilled` of a live map element.
    let old = unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(word, flag as u64) };
    old as u32 & flag != 0
}

/// Frames a payload and accounts the messages that started in it.
#[inline(always)]
fn on_payload(
    ctx: &SkBuffContext,
    seg: &Segment,
    dir: Direction,
    state: &mut ConnState,
    c: &mut ServiceCounters,
) -> Result<(), i64> {
    // The payload's first bytes are loaded only where they matter: a connection's first
    // payload (TLS?) and a lost stream (does a message start here?).
    let len32 = seg.payload_len as u32;
    let (seen, expected) = match dir {
        Direction::Ingress => {
            if !set_flag(state, CONN_SEEN_PAYLOAD) {
                let (prefix, len) = load_prefix(ctx, seg)?;
                // A TLS record header: handshake (22), version 3.x.
                if len >= 3 && prefix[0] == 0x16 && prefix[1] == 0x03 {
                    set_flag(state, CONN_TLS);
                    counters::add_u64(&mut c.tls_connections, 1);
                }
                state.next_seq_in = seg.seq;
            }
            let e = state.next_seq_in;
            state.next_seq_in = advance(e, seg.seq, len32);
            (true, e)
        }
        Direction::Egress => {
            let seen = set_flag(state, CONN_SEEN_EGRESS);
            let e = if seen { state.next_seq_out } else { seg.seq };
            state.next_seq_out = advance(e, seg.seq, len32);
            (seen, e)
        }
    };
    if state.flags & CONN_TLS != 0 {
        return Ok(());
    }
    let framer = match dir {
        Direction::Ingress => &mut state.requests,
        Direction::Egress => &mut state.responses,
    };
    // Bytes before the expected sequence number were framed already (a retransmission); a gap
    // means bytes were missed, so the framing is given up until a segment starts a message.
    let behind = expected.wrapping_sub(seg.seq) as i32;
    let mut skip = 0u32;
    if seen && behind > 0 {
        if behind as u32 >= len32 {
            return Ok(());
        }
        skip = behind as u32;
    } else if seen && behind < 0 {
        framer.lose();
    }
    if skip == 0 && framer.is_lost() {
        let (prefix, len) = load_prefix(ctx, seg)?;
        framer.resync(&prefix, len);
    }
    if skip == 0 && matches!(dir, Direction::Egress) && state.requests.is_h2() {
        state.responses.resync_h2();
    }
    let (framer, heads) = match dir {
        Direction::Ingress => (&mut state.requests, &mut state.heads),
        Direction::Egress => (&mut state.responses, &mut state.heads),
    };
    let side = match dir {
        Direction::Ingress => Side::Requests,
        Direction::Egress => Side::Responses,
    };
    let Some(starts) = frame(
        ctx,
        framer,
        heads,
        seg.payload_offset as u32 + skip,
        seg.payload_offset as u32 + len32,
        side,
    ) else {
        return Ok(());
    };
    if starts.probes > 0 {
        counters::add_u64(&mut c.probe_requests, starts.probes as u64);
    }
    if starts.messages > 0 {
        match dir {
            Direction::Ingress => open_requests(state, &seg.conn, starts, c),
            Direction::Egress => close_requests(state, &seg.conn, starts, c),
        }
    }
    // Resets and probes come from clients: only the request side has them.
    if matches!(dir, Direction::Ingress) {
        if starts.cancel_count > 0 {
            cancel_requests(state, &seg.conn, starts, c);
        }
        if starts.late_probes > 0 {
            end_late_probes(state, starts.late_probes, c);
        }
    }
    Ok(())
}

/// The sequence number after this segment, unless it is a retransmission of older bytes.
#[inline(always)]
fn advance(expected: u32, seq: u32, len: u32) -> u32 {
    let end = seq.wrapping_add(len);
    if (end.wrapping_sub(expected) as i32) > 0 {
        end
    } else {
        expected
    }
}

/// What the bpf_loop callback is given: the packet, and the scratch slot that holds the state.
#[repr(C)]
struct FrameLoop {
    skb: *mut __sk_buff,
    scratch: *mut FrameScratch,
}

/// Frames the payload bytes `[off, end)` of the packet with a bounded `bpf_loop` whose every
/// round is one [`Cursor::round`] (skip body bytes by count, or frame one byte). The loop's state
/// lives in the per-CPU FRAMING map rather than on the stack: the verifier does not track map
/// contents, so every round looks the same to it and the callback is verified once.
#[inline(always)]
fn frame(
    ctx: &SkBuffContext,
    framer: &mut Framer,
    heads: &mut HeadQueue,
    off: u32,
    end: u32,
    side: Side,
) -> Option<&'static Starts> {
    if framer.is_lost() {
        return None;
    }
    // Ingress runs in softirq and can interrupt an egress program on this CPU: one slot each.
    let slot = match side {
        Side::Requests => 1,
        Side::Responses => 0,
    };
    let s = FRAMING.get_ptr_mut(slot)?;
    // SAFETY: this CPU's slot; a nested program that reuses it is detected by the generation.
    let s = unsafe { &mut *s };
    s.generation = s.generation.wrapping_add(1);
    let generation = s.generation;
    copy_framer(&mut s.framer, framer);
    s.cursor.reset(off, end);
    s.starts.messages = 0;
    s.starts.interim = 0;
    s.starts.probes = 0;
    s.starts.id_count = 0;
    s.starts.cancel_count = 0;
    s.starts.probe_mask = 0;
    s.starts.late_probes = 0;
    s.starts.last_start = 0;
    s.starts.heads.bits = heads.bits;
    s.starts.heads.len = heads.len;
    s.starts.heads.probes = heads.probes;
    s.side = slot;
    let mut l = FrameLoop {
        skb: ctx.skb.skb,
        scratch: &mut *s as *mut FrameScratch,
    };
    // SAFETY: the callback only reads `l`, which outlives the call.
    let rounds = unsafe {
        bpf_loop(
            MAX_ROUNDS,
            frame_round as *mut c_void,
            &mut l as *mut FrameLoop as *mut c_void,
            0,
        )
    };
    if s.generation != generation {
        // Another program on this CPU used the slot meanwhile: this segment's framing is lost.
        framer.lose();
        framer.settle_heads(side, heads);
        return None;
    }
    if rounds as u32 >= MAX_ROUNDS && !s.cursor.finished() {
        // More header bytes than the bound: give the stream up rather than miscount it.
        s.framer.lose();
    }
    copy_framer(framer, &s.framer);
    s.framer.settle_heads(side, &mut s.starts.heads);
    heads.bits = s.starts.heads.bits;
    heads.len = s.starts.heads.len;
    heads.probes = s.starts.heads.probes;
    // This CPU's slot for this direction: read by the caller before the program ends, and a
    // nested program uses the other slot.
    Some(&s.starts)
}

/// Copies a framer a word at a time: an aggregate copy compiles to a byte loop in BPF.
#[inline(always)]
fn copy_framer(dst: &mut Framer, src: &Framer) {
    const WORDS: usize = core::mem::size_of::<Framer>() / 8;
    const _: () = assert!(core::mem::size_of::<Framer>() % 8 == 0);
    let (d, s) = (dst as *mut Framer as *mut u64, src as *const Framer as *const u64);
    let mut i = 0;
    while i < WORDS {
        // SAFETY: both point to a whole, 8-aligned Framer; volatile keeps the compiler from
        // merging the loop back into a memcpy call.
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
        i += 1;
    }
}

/// One round of [`frame`]; returns 1 to stop the loop.
#[inline(never)]
extern "C" fn frame_round(_index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `FrameLoop` on the caller's stack.
    let l = unsafe { &*(ctx as *const FrameLoop) };
    let skb = l.skb;
    // SAFETY: this CPU's slot, set up by `frame`.
    let s = unsafe { &mut *l.scratch };
    let side = if s.side == 1 {
        Side::Requests
    } else {
        Side::Responses
    };
    let mut load = |off: u32, buf: &mut [u8; CHUNK], n: u32| {
        // Checked again on a value the compiler cannot reason about, so the check the verifier
        // sees is on the very register passed to the helper.
        let n = core::hint::black_box(n);
        if n == 0 || n > CHUNK as u32 {
            return false;
        }
        // SAFETY: loads at most CHUNK bytes into `buf`; the helper checks the packet bounds.
        unsafe { bpf_skb_load_bytes(skb as *const c_void, off, buf.as_mut_ptr() as *mut c_void, n) == 0 }
    };
    if s.cursor.round(&mut s.framer, side, &mut s.starts, &mut load) {
        0
    } else {
        1
    }
}

/// Copies the start of the payload with constant-size loads, which the verifier can check: 16
/// bytes, or 12 of a shorter payload (enough for a status line, or the longest method and the
/// first byte of its target). Shorter payloads cannot start a message and are not read.
#[inline(always)]
fn load_prefix(ctx: &SkBuffContext, seg: &Segment) -> Result<([u8; PREFIX_LEN], usize), i64> {
    if seg.payload_len >= PREFIX_LEN {
        let prefix: [u8; PREFIX_LEN] = crate::packet::load(ctx, seg.payload_offset)?;
        return Ok((prefix, PREFIX_LEN));
    }
    let mut prefix = [0u8; PREFIX_LEN];
    if seg.payload_len >= 12 {
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

/// HTTP/2 streams the client reset (a cancelled call): the server may never end them, so each
/// that is still open ends now, with no response and no latency.
#[inline(always)]
fn cancel_requests(state: &mut ConnState, conn: &ConnKey, starts: &Starts, c: &mut ServiceCounters) {
    let mut i = 0;
    while i < CANCEL_IDS as u32 {
        if i >= starts.cancel_count || state.open_requests == 0 {
            break;
        }
        if take_start(state, conn, starts.cancelled(i), false).is_some() {
            state.open_requests -= 1;
            let now = now_ns() as i64;
            counters::add_i64(&mut c.inflight_sign_sum, -1);
            counters::add_i64(&mut c.inflight_time_sum, -now);
        }
        i += 1;
    }
}

/// Takes an open request's start: HTTP/2 stream `id`'s own (from the ring, or from
/// `STREAM_STARTS` for a stream past the ring), or else (with `or_oldest`) the oldest one in the
/// ring, as HTTP/1.1 answers in order and its ids are all 0. The oldest start moves into the
/// place of the one taken: only HTTP/1.1 needs the order kept.
#[inline(always)]
fn take_start(state: &mut ConnState, conn: &ConnKey, id: u32, or_oldest: bool) -> Option<u64> {
    if id != 0 && state.spilled > 0 {
        let key = StreamKey {
            conn: *conn,
            stream_id: id,
        };
        // SAFETY: the value is copied out at once.
        if let Some(start) = unsafe { STREAM_STARTS.get(&key) }.copied() {
            let _ = STREAM_STARTS.remove(&key);
            state.spilled -= 1;
            return Some(start);
        }
    }
    if state.stored == 0 {
        return None;
    }
    let oldest = state.oldest as usize & (START_SLOTS - 1);
    let start = match own_slot(state, id) {
        Some(own) => {
            let start = state.starts[own];
            state.starts[own] = state.starts[oldest];
            state.stream_ids[own] = state.stream_ids[oldest];
            start
        }
        None if or_oldest => state.starts[oldest],
        None => return None,
    };
    state.oldest = (state.oldest + 1) & (START_SLOTS as u32 - 1);
    state.stored -= 1;
    Some(start)
}

/// The ring slot of the open request of HTTP/2 stream `id` (0: none).
#[inline(always)]
fn own_slot(state: &ConnState, id: u32) -> Option<usize> {
    if id == 0 {
        return None;
    }
    let mut j = 0;
    while j < START_SLOTS as u32 {
        if j >= state.stored {
            break;
        }
        let slot = (state.oldest + j) as usize & (START_SLOTS - 1);
        if state.stream_ids[slot] == id {
            return Some(slot);
        }
        j += 1;
    }
    None
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper with no arguments and no side effects.
    unsafe { bpf_ktime_get_ns() }
}

/// Keeps the start of a request: in the ring while it has room (for HTTP/1.1 only while every
/// earlier open request has a slot, so the order is kept), else an HTTP/2 stream's in
/// `STREAM_STARTS`, else, for the first request without a place, in `request_start_ns`.
#[inline(always)]
fn keep_start(state: &mut ConnState, conn: &ConnKey, id: u32, now: u64) {
    let in_order = state.stored == state.open_requests;
    if state.stored < START_SLOTS as u32 && (in_order || id != 0) {
        let slot = (state.oldest + state.stored) as usize & (START_SLOTS - 1);
        state.starts[slot] = now;
        state.stream_ids[slot] = id;
        state.stored += 1;
        return;
    }
    if id != 0 {
        let key = StreamKey {
            conn: *conn,
            stream_id: id,
        };
        if STREAM_STARTS.insert(&key, &now, 0).is_ok() {
            state.spilled += 1;
            return;
        }
    }
    if state.stored + state.spilled == state.open_requests {
        state.request_start_ns = now;
    }
}

/// The requests started in one segment (`starts.messages`), now.
#[inline(always)]
fn open_requests(state: &mut ConnState, conn: &ConnKey, starts: &Starts, c: &mut ServiceCounters) {
    let k = starts.messages;
    let now = now_ns();
    let mut opened = 0u32;
    let mut i = 0;
    while i < STREAM_IDS as u32 {
        if i >= k {
            break;
        }
        // A probe's request is counted (as a probe) but never open: it is not traffic.
        if !is_probe(starts, i) {
            keep_start(state, conn, starts.stream_of(i), now);
            state.open_requests += 1;
            opened += 1;
        }
        i += 1;
    }
    if k > STREAM_IDS as u32 {
        if state.stored + state.spilled == state.open_requests {
            state.request_start_ns = now;
        }
        state.open_requests += k - STREAM_IDS as u32;
        opened += k - STREAM_IDS as u32;
    }
    counters::add_u64(&mut c.requests, k as u64);
    counters::add_i64(&mut c.inflight_sign_sum, opened as i64);
    counters::add_i64(&mut c.inflight_time_sum, now as i64 * opened as i64);
}

/// How many of a segment's final responses answer probes.
#[inline(always)]
fn probe_answers(starts: &Starts) -> u32 {
    let m = starts.messages;
    let mask = if m >= 32 { u32::MAX } else { (1u32 << m) - 1 };
    (starts.probe_mask & mask).count_ones()
}

/// Whether the `i`th message of a segment is a probe's request, or a final response to one.
#[inline(always)]
fn is_probe(starts: &Starts, i: u32) -> bool {
    i < 32 && starts.probe_mask & (1 << i) != 0
}

/// Requests opened in earlier segments that turned out to be probes (their `User-Agent` came
/// later): the newest open ones. Each ends now, with no response and no latency.
#[inline(always)]
fn end_late_probes(state: &mut ConnState, n: u32, c: &mut ServiceCounters) {
    let n = if n > state.open_requests {
        state.open_requests
    } else {
        n
    };
    let mut i = 0;
    while i < 4 {
        if i >= n {
            break;
        }
        // HTTP/1.1 keeps its starts in order: the newest is the last in the ring, unless it
        // had no slot.
        if state.stored > 0 && state.stored + state.spilled == state.open_requests {
            state.stored -= 1;
        }
        state.open_requests -= 1;
        i += 1;
    }
    let ended = i as i64;
    if ended > 0 {
        let now = now_ns() as i64;
        counters::add_i64(&mut c.inflight_sign_sum, -ended);
        counters::add_i64(&mut c.inflight_time_sum, -(now * ended));
    }
}

/// [`Starts::stream_of`] for a loop round's index, bounded where the verifier sees it: the
/// compiler would test a copy of the index and use another.
#[inline(always)]
fn stream_at(starts: &Starts, i: u32) -> u32 {
    let j = core::hint::black_box(i as usize);
    if j < STREAM_IDS && (j as u32) < starts.id_count {
        starts.ids[j]
    } else {
        0
    }
}

/// What one round of [`close_one`] is given, and what the rounds count.
#[repr(C)]
struct CloseLoop {
    state: *mut ConnState,
    conn: *const ConnKey,
    starts: *const Starts,
    c: *mut ServiceCounters,
    now: u64,
    /// Requests ended so far: with their own start, and without one.
    ended: u32,
    unslotted: u32,
}

/// The end of the `i`th message of the segment: its request's own start, else (HTTP/1.1, or an
/// HTTP/2 id not kept) the oldest, else one of the open requests without a start of their own.
/// An HTTP/2 end whose stream is not open ends nothing. Returns false past the last end.
#[inline(always)]
fn close_at(l: &mut CloseLoop, i: u32) -> bool {
    // SAFETY: the pointers are the caller's connection state, key, starts and counters, valid
    // for as long as `l` is.
    let (state, conn, starts, c) = unsafe { (&mut *l.state, &*l.conn, &*l.starts, &mut *l.c) };
    if i >= starts.messages {
        return false;
    }
    if is_probe(starts, i) {
        // A probe's answer ends no request (see `probe_answers`).
        return true;
    }
    if l.ended >= state.open_requests {
        return false;
    }
    let id = stream_at(starts, i);
    if let Some(start) = take_start(state, conn, id, id == 0) {
        let latency = l.now.saturating_sub(start);
        counters::add_u64(&mut c.latency_sum_ns, latency);
        counters::record_latency(c, latency);
        l.ended += 1;
    } else if state.open_requests - l.ended > state.stored + state.spilled {
        l.unslotted += 1;
        l.ended += 1;
    }
    true
}

/// One round of the `bpf_loop` in [`close_requests`]; returns 1 to stop the loop.
#[inline(never)]
extern "C" fn close_one(i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `CloseLoop` on the caller's stack.
    let l = unsafe { &mut *(ctx as *mut CloseLoop) };
    if close_at(l, i) {
        0
    } else {
        1
    }
}

/// The final responses (or HTTP/2 stream ends) in one segment (`starts.messages`): each ends
/// its own stream's request where the stream id is known (HTTP/2 answers in any order), else
/// the oldest open request (HTTP/1.1 answers in order). An HTTP/2 end whose stream is not open
/// (it crossed the client's reset, which ended it already) ends nothing and is no response.
/// Several ends go through a `bpf_loop`, whose round is verified once, however many ends a
/// segment has.
#[inline(always)]
fn close_requests(state: &mut ConnState, conn: &ConnKey, starts: &Starts, c: &mut ServiceCounters) {
    let mut l = CloseLoop {
        state: state as *mut ConnState,
        conn: conn as *const ConnKey,
        starts: starts as *const Starts,
        c: c as *mut ServiceCounters,
        now: now_ns(),
        ended: 0,
        unslotted: 0,
    };
    if starts.messages == 1 {
        // One end, as an HTTP/1.1 response segment mostly has: no loop.
        close_at(&mut l, 0);
    } else {
        // SAFETY: the callback only uses `l`, which outlives the call.
        unsafe {
            bpf_loop(
                STREAM_IDS as u32,
                close_one as *mut c_void,
                &mut l as *mut CloseLoop as *mut c_void,
                0,
            )
        };
    }
    let (now, mut ended, mut unslotted) = (l.now, l.ended, l.unslotted);
    let answers = probe_answers(starts);
    if answers > 0 {
        // Counted as responses, as their requests were as requests.
        counters::add_u64(&mut c.responses, answers as u64);
    }
    if starts.messages > STREAM_IDS as u32 && ended <= state.open_requests {
        // Ends past the ids kept: each ends an open request without a start of its own.
        let without = state.open_requests - ended;
        let rest = starts.messages - STREAM_IDS as u32;
        let n = if rest < without { rest } else { without };
        unslotted += n;
        ended += n;
    }
    if ended == 0 || ended > state.open_requests {
        return;
    }
    if unslotted > 0 {
        let latency = now.saturating_sub(state.request_start_ns);
        counters::add_u64(&mut c.latency_sum_ns, latency * unslotted as u64);
        let bucket = surge_common::latency::bucket_of(latency / 1000);
        if let Some(slot) = c.latency_buckets.get_mut(bucket) {
            counters::add_u64(slot, unslotted as u64);
        }
    }
    state.open_requests -= ended;
    if state.open_requests == 0 {
        state.oldest = 0;
        state.stored = 0;
        // Any start left in STREAM_STARTS belongs to no open stream; the LRU drops it.
        state.spilled = 0;
    }
    counters::add_u64(&mut c.responses, ended as u64);
    counters::add_i64(&mut c.inflight_sign_sum, -(ended as i64));
    counters::add_i64(&mut c.inflight_time_sum, -(now as i64 * ended as i64));
}

/// The connection ended: requests still open on it end now, and its state goes. A client
/// socket's mark stays until sock_ops sees it closed.
#[inline(always)]
pub fn close(conn: &surge_common::ConnKey, c: &mut ServiceCounters) {
    // SAFETY: the values are copied out at once.
    let state = unsafe { CONNS.get(conn).map(|s| (s.open_requests, s.flags)) };
    let Some((open, flags)) = state else {
        return;
    };
    if flags & CONN_CLIENT != 0 {
        return;
    }
    if open > 0 {
        let now = now_ns() as i64;
        counters::add_i64(&mut c.inflight_sign_sum, -(open as i64));
        counters::add_i64(&mut c.inflight_time_sum, -(now * open as i64));
    }
    let _ = CONNS.remove(conn);
}
