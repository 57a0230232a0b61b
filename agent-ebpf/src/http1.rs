//! HTTP accounting from cgroup_skb: every TCP payload of a watched connection is framed by the
//! shared [`Framer`] (one per direction), so each request start (pipelined HTTP/1.1 requests and
//! HTTP/2 streams included) opens a request, and each final response start ends one (see
//! `inflight`). TLS connections are marked and only counted as such.

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock, BPF_NOEXIST},
    helpers::{bpf_loop, bpf_skb_load_bytes},
    programs::SkBuffContext,
};
use core::ffi::c_void;
use surge_common::{
    http::PREFIX_LEN,
    stream::{Framer, HeadQueue, Side, Starts, CHUNK},
    ConnState, ServiceCounters, CONN_CLIENT, CONN_CLOSED, CONN_SEEN_EGRESS, CONN_SEEN_PAYLOAD, CONN_TLS,
};

use crate::{
    atomic, counters, inflight,
    maps::{
        adopt_handshake_state, cache_service, cached_service, conn_state_of, counters_of, handshake_state_of,
        is_listening, port_watched, service_of, watch_generation, Adopted, FrameScratch, FRAMING,
        HANDSHAKE_CONNS, HANDSHAKE_PROGRAM, HANDSHAKE_STARTS,
    },
    packet::{Direction, Segment},
};

/// Framing rounds per segment at most: one per chunk of header bytes or body skip. A segment
/// that needs more gives the stream up until a message starts a segment again.
const MAX_ROUNDS: u32 = 8192;

/// Looks a segment's local endpoint up, then accounts its payload and flags to the service.
#[inline(always)]
pub fn observe(ctx: &SkBuffContext, dir: Direction) -> Result<(), i64> {
    observe_on::<false>(ctx, dir)
}

/// [`observe`] for an arriving segment the kernel filtered on a listening socket: the last
/// packet of a handshake, with the connection's first payload. A program of its own (reached by
/// a tail call), so that the verifier walks each program with one kind of state pointer.
#[inline(always)]
pub fn observe_handshake(ctx: &SkBuffContext) -> Result<(), i64> {
    observe_on::<true>(ctx, Direction::Ingress)
}

#[inline(always)]
fn observe_on<const HANDSHAKE: bool>(ctx: &SkBuffContext, dir: Direction) -> Result<(), i64> {
    // The socket's own local port (a context field, no packet read): most traffic stops here.
    // SAFETY: one field of the program's context, read once at its constant offset.
    let port = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ctx.skb.skb).local_port)) };
    if port != 0 && !port_watched(port) {
        return Ok(());
    }
    let seg = Segment::parse(ctx, dir)?;
    let ends = seg.rst || (seg.fin && matches!(dir, Direction::Egress));
    if seg.payload_len == 0 && !ends {
        // A bare acknowledgment: nothing to account.
        return Ok(());
    }
    let sk = socket_of(ctx);
    if !HANDSHAKE && matches!(dir, Direction::Ingress) && is_listening(sk) {
        // SAFETY: the program array holds cgroup_skb ingress programs only.
        let _ = unsafe { HANDSHAKE_PROGRAM.tail_call(ctx, 0) };
        return Ok(());
    }
    let create = seg.payload_len > 0;
    let (service_id, state) = if HANDSHAKE {
        let Some(id) = service_of(seg.conn.local_addr, seg.conn.local_port) else {
            return Ok(());
        };
        (id, handshake_state_of(&seg.conn, create))
    } else {
        // The service is cached in the connection's state while the watch set is unchanged:
        // most segments need no lookup of their endpoint.
        let generation = watch_generation();
        let mut state = conn_state_of(sk, false);
        match state.as_deref().and_then(|s| cached_service(s, generation)) {
            Some(id) => (id, state),
            None => {
                let Some(id) = service_of(seg.conn.local_addr, seg.conn.local_port) else {
                    return Ok(());
                };
                if state.is_none() && create {
                    state = conn_state_of(sk, true);
                }
                if let Some(s) = state.as_deref_mut() {
                    cache_service(s, generation, id);
                }
                (id, state)
            }
        }
    };
    let c = counters_of(service_id).ok_or(-1i64)?;
    if matches!(&state, Some(s) if s.flags & CONN_CLIENT != 0) {
        return Ok(());
    }
    let Some(state) = state else {
        // No state (its storage could not be allocated) to tell retransmitted bytes apart: the
        // segment's bytes as they are. A handshake always has state.
        if seg.payload_len > 0 && !HANDSHAKE {
            add_bytes(c, dir, seg.payload_len as u64);
        }
        return Ok(());
    };
    if seg.payload_len > 0 {
        on_payload::<HANDSHAKE>(ctx, &seg, dir, state, c)?;
    }
    // A reset from either side, or the server's FIN, ends the connection and anything still in
    // flight on it. A client's FIN alone is a half-close: its request may still be answered.
    if ends {
        if HANDSHAKE {
            // Nothing of it was counted yet, and now nothing will be.
            let _ = HANDSHAKE_CONNS.remove(&seg.conn);
            let _ = HANDSHAKE_STARTS.remove(&seg.conn);
        } else {
            close(state, c);
        }
    }
    Ok(())
}

/// The socket a segment belongs to: the server's, a client's (sock_ops marks those), or the
/// listening socket for the last packet of a handshake.
#[inline(always)]
fn socket_of(ctx: &SkBuffContext) -> *mut bpf_sock {
    // SAFETY: one field of the program's context, read once at its constant offset.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ctx.skb.skb).__bindgen_anon_2.sk)) }
}

/// The connection `conn` is established on socket `sk` (sock_ops): what its handshake's last
/// packet carried was framed on the listening socket; it becomes the socket's state, and the
/// requests that started in it, its bytes and its TLS mark are counted now.
#[inline(always)]
pub fn adopt_handshake(
    sk: *mut bpf_sock,
    conn: &surge_common::ConnKey,
    rcv_nxt: u32,
    c: &mut ServiceCounters,
) {
    let Some(Adopted {
        state,
        starts,
        rx_bytes,
        tls,
    }) = adopt_handshake_state(sk, conn, rcv_nxt)
    else {
        return;
    };
    add_bytes(c, Direction::Ingress, rx_bytes as u64);
    if tls {
        counters::add_u64(&mut c.tls_connections, 1);
    }
    let Some(starts) = starts else {
        return;
    };
    if starts.probes > 0 {
        counters::add_u64(&mut c.probe_requests, starts.probes as u64);
    }
    if starts.messages > 0 {
        inflight::open_requests(state, conn, starts, c);
    }
    if starts.cancel_count > 0 {
        inflight::cancel_requests(state, conn, starts, c);
    }
    let _ = HANDSHAKE_STARTS.remove(conn);
}

/// Sets `flag` in the connection's flags; returns the flags before. Atomic, and a full barrier:
/// the two directions of a connection run on both CPUs at once, and a plain `|=` of one could
/// undo the other's (a lost TLS mark would have TLS bytes framed as HTTP).
#[inline(always)]
pub fn set_flag(state: &mut ConnState, flag: u32) -> u32 {
    // The kernel's atomics are 64-bit: the OR is done on the 8-aligned word whose low half
    // (little-endian) is `flags`; the high half, `first_seq_in`, is ORed with 0 and left as it is.
    const FLAGS: usize = core::mem::offset_of!(ConnState, flags);
    const _: () = assert!(FLAGS % 8 == 0);
    // SAFETY: `flags` and the field after it are the 8 aligned bytes at FLAGS of one live map
    // element.
    let word = unsafe { &mut *((state as *mut ConnState as *mut u8).add(FLAGS) as *mut u64) };
    atomic::or(word, flag as u64) as u32
}

/// Sets `flag`; true for the one program that set it. A plain read first: once set, as it is
/// for every segment but a connection's first, no atomic instruction (and no exclusive claim
/// on the cache line the other direction reads) is needed.
#[inline(always)]
fn first_time(state: &mut ConnState, flag: u32) -> bool {
    atomic::load(&state.flags) & flag == 0 && set_flag(state, flag) & flag == 0
}

/// Frames a payload and accounts the messages that started in it.
#[inline(always)]
fn on_payload<const HANDSHAKE: bool>(
    ctx: &SkBuffContext,
    seg: &Segment,
    dir: Direction,
    state: &mut ConnState,
    c: &mut ServiceCounters,
) -> Result<(), i64> {
    // The payload's first bytes are loaded only where they matter: a connection's first
    // payload (TLS?) and a lost stream (does a message start here?).
    let len32 = seg.payload_len as u32;
    let (seen, expected, next) = match dir {
        Direction::Ingress => {
            if first_time(state, CONN_SEEN_PAYLOAD) {
                let (prefix, len) = load_prefix(ctx, seg)?;
                // A TLS record header: handshake (22), version 3.x.
                if len >= 3 && prefix[0] == 0x16 && prefix[1] == 0x03 {
                    set_flag(state, CONN_TLS);
                    // A handshake's connection counts once established (`adopt_handshake`).
                    if !HANDSHAKE {
                        counters::add_u64(&mut c.tls_connections, 1);
                    }
                }
                state.next_seq_in = seg.seq;
                state.first_seq_in = seg.seq;
            }
            let e = state.next_seq_in;
            let next = advance(e, seg.seq, len32);
            state.next_seq_in = next;
            (true, e, next)
        }
        Direction::Egress => {
            let seen = !first_time(state, CONN_SEEN_EGRESS);
            let e = if seen { state.next_seq_out } else { seg.seq };
            let next = advance(e, seg.seq, len32);
            state.next_seq_out = next;
            (seen, e, next)
        }
    };
    // The bytes this segment adds to the stream: a retransmission's count once. A handshake's
    // count once it completes (`adopt_handshake`).
    if !HANDSHAKE {
        add_bytes(c, dir, next.wrapping_sub(expected) as u64);
    }
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
    if HANDSHAKE {
        // Counted once the connection is established (see `adopt_handshake`): a segment that
        // reaches a listening socket with no handshake to complete is refused, and never is.
        if starts.messages > 0 || starts.probes > 0 || starts.cancel_count > 0 {
            // The first segment's only (more come only when the accept queue is full).
            let _ = HANDSHAKE_STARTS.insert(&seg.conn, starts, BPF_NOEXIST as u64);
        }
        return Ok(());
    }
    if starts.probes > 0 {
        counters::add_u64(&mut c.probe_requests, starts.probes as u64);
    }
    if starts.messages > 0 {
        match dir {
            Direction::Ingress => {
                inflight::open_requests(state, &seg.conn, starts, c);
                // The connection's end may have taken its claims on the other CPU just before
                // these were added: then they are this program's to end.
                if set_flag(state, 0) & CONN_CLOSED != 0 {
                    inflight::end_all(state, c);
                }
            }
            Direction::Egress => inflight::close_requests(state, &seg.conn, starts, c),
        }
    }
    // Resets and probes come from clients: only the request side has them.
    if matches!(dir, Direction::Ingress) {
        if starts.cancel_count > 0 {
            inflight::cancel_requests(state, &seg.conn, starts, c);
        }
        if starts.late_probes > 0 {
            inflight::end_late_probes(state, &seg.conn, starts, starts.late_probes, c);
        }
    }
    Ok(())
}

/// Counts payload bytes received (ingress) or sent (egress) by the service.
#[inline(always)]
fn add_bytes(c: &mut ServiceCounters, dir: Direction, bytes: u64) {
    if bytes == 0 {
        return;
    }
    match dir {
        Direction::Ingress => counters::add_u64(&mut c.rx_bytes, bytes),
        Direction::Egress => counters::add_u64(&mut c.tx_bytes, bytes),
    }
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
    copy_heads_in(&mut s.starts.heads, heads);
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
        if matches!(side, Side::Requests) {
            heads.clear();
        }
        return None;
    }
    if rounds as u32 >= MAX_ROUNDS && !s.cursor.finished() {
        // More header bytes than the bound: give the stream up rather than miscount it.
        s.framer.lose();
    }
    copy_framer(framer, &s.framer);
    s.framer.settle_heads(side, &mut s.starts.heads);
    copy_heads_out(heads, &s.starts.heads, side);
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

/// Copies the connection's open requests into the scratch, a word at a time.
#[inline(always)]
fn copy_heads_in(dst: &mut HeadQueue, src: &HeadQueue) {
    const WORDS: usize = core::mem::size_of::<HeadQueue>() / 8;
    const _: () =
        assert!(core::mem::size_of::<HeadQueue>() % 8 == 0 && core::mem::align_of::<HeadQueue>() == 8);
    let (d, s) = (
        dst as *mut HeadQueue as *mut u64,
        src as *const HeadQueue as *const u64,
    );
    let mut i = 0;
    while i < WORDS {
        // SAFETY: both point to a whole, 8-aligned HeadQueue; volatile, as in `copy_framer`.
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
        i += 1;
    }
}

/// Writes back what this side of the connection changed in its open requests, and nothing
/// else: the other side may be changing its own fields on the other CPU right now. The request
/// side writes `pushed`, `forgotten` and the tags; the response side `popped`.
#[inline(always)]
fn copy_heads_out(dst: &mut HeadQueue, src: &HeadQueue, side: Side) {
    // SAFETY: plain stores of fields of a live map value, each with one writer.
    unsafe {
        match side {
            Side::Requests => {
                core::ptr::write_volatile(&mut dst.pushed, src.pushed);
                core::ptr::write_volatile(&mut dst.forgotten, src.forgotten);
                let words = core::mem::size_of_val(&src.tags) / 8;
                let (d, s) = (dst.tags.as_mut_ptr() as *mut u64, src.tags.as_ptr() as *const u64);
                let mut i = 0;
                while i < words {
                    core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i)));
                    i += 1;
                }
            }
            Side::Responses => core::ptr::write_volatile(&mut dst.popped, src.popped),
        }
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

/// The connection ended: requests still open on it end now. Its state stays on the socket,
/// marked closed, until the kernel frees the socket: a segment framed after this one (a
/// retransmission, a late request) finds the mark and ends what it opens. A client's socket
/// has nothing in flight.
#[inline(always)]
pub fn close(state: &mut ConnState, c: &mut ServiceCounters) {
    if set_flag(state, CONN_CLOSED) & CONN_CLIENT != 0 {
        return;
    }
    inflight::end_all(state, c);
}
