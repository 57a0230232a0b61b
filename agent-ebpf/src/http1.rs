//! HTTP accounting from cgroup_skb: every TCP payload of a watched connection is framed by the
//! shared [`Framer`] (one per direction), so each request start (pipelined HTTP/1.1 requests and
//! HTTP/2 streams included) opens a request, and each final response start ends one (see
//! `inflight`). TLS connections are marked and only counted as such.

use aya_ebpf::{
    bindings::{__sk_buff, BPF_NOEXIST},
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
    maps::{counters_of, port_watched, service_of, FrameScratch, CONNS, FRAMING, FRESH_CONN},
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

/// Sets `flag` in the connection's flags; returns the flags before. Atomic, and a full barrier:
/// the two directions of a connection run on both CPUs at once, and a plain `|=` of one could
/// undo the other's (a lost TLS mark would have TLS bytes framed as HTTP).
#[inline(always)]
pub fn set_flag(state: &mut ConnState, flag: u32) -> u32 {
    // The kernel's atomics are 64-bit: the OR is done on the 8-aligned word whose low half
    // (little-endian) is `flags`; the high half, `service_id`, is ORed with 0 and left as it is.
    const FLAGS: usize = core::mem::offset_of!(ConnState, flags);
    const _: () = assert!(FLAGS % 8 == 0);
    // SAFETY: `flags` and the field after it are the 8 aligned bytes at FLAGS of one live map
    // element.
    let word = unsafe { &mut *((state as *mut ConnState as *mut u8).add(FLAGS) as *mut u64) };
    atomic::or(word, flag as u64) as u32
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
            if set_flag(state, CONN_SEEN_PAYLOAD) & CONN_SEEN_PAYLOAD == 0 {
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
            let seen = set_flag(state, CONN_SEEN_EGRESS) & CONN_SEEN_EGRESS != 0;
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

/// The connection ended: requests still open on it end now, and its state goes. A client
/// socket's mark stays until sock_ops sees it closed.
#[inline(always)]
pub fn close(conn: &surge_common::ConnKey, c: &mut ServiceCounters) {
    let Some(state) = CONNS.get_ptr_mut(conn) else {
        return;
    };
    // SAFETY: a pointer into the map's value for this connection.
    let state = unsafe { &mut *state };
    if set_flag(state, CONN_CLOSED) & CONN_CLIENT != 0 {
        return;
    }
    inflight::end_all(state, c);
    let _ = CONNS.remove(conn);
}
