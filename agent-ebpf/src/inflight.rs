//! The open requests of a connection: opened by the client's segments, ended by the server's
//! answers, by the client's resets, or by the connection's end; each with its start time, for
//! its latency.
//!
//! The two directions of a connection run at once on two CPUs, so every open request is held by
//! one claim in [`ConnState`] (its slot's bit in `used`, or one unit of `spilled` or
//! `unslotted`), and whatever ends it first takes the claim with one atomic instruction. A plain
//! read-modify-write of a shared count here once lost an end now and then on a busy HTTP/2
//! connection, which then showed one request in flight forever.

use aya_ebpf::helpers::{bpf_ktime_get_ns, bpf_loop};
use core::ffi::c_void;
use surge_common::{
    stream::{Starts, CANCEL_IDS, STREAM_IDS},
    ConnKey, ConnState, ServiceCounters, StreamKey, CONN_BLIND, START_SLOTS,
};

use crate::{atomic, counters, maps::STREAM_STARTS};

/// Ends of one segment matched one by one, each a round of a `bpf_loop` (more than a 64 KiB
/// segment of 9-byte HTTP/2 frames can hold); any past them end requests without a start of
/// their own, or spilled streams.
const CLOSE_ROUNDS: u32 = 8192;

/// The `used` bits of all slots.
const ALL_SLOTS: u64 = (1 << START_SLOTS) - 1;

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper with no arguments and no side effects.
    unsafe { bpf_ktime_get_ns() }
}

/// The index of the lowest set bit of `bits` (some bit of `ALL_SLOTS` set), without branches:
/// the verifier walks every branch of every call.
#[inline(always)]
fn lowest_slot(bits: u64) -> usize {
    let bit = bits & bits.wrapping_neg();
    // `x != 0` for x < 256, as arithmetic.
    let nonzero = |x: u64| (x + 0xff) >> 8;
    (nonzero(bit & 0xaa) | nonzero(bit & 0xcc) << 1 | nonzero(bit & 0xf0) << 2) as usize & (START_SLOTS - 1)
}

/// The slots whose stream id is `id`, without branches.
#[inline(always)]
fn slots_of(state: &ConnState, id: u32) -> u64 {
    let mut mask = 0u64;
    let mut j = 0;
    while j < START_SLOTS {
        // 1 when equal: the difference is 0, and 0 - 1 sets the top bit.
        let same = ((state.stream_ids[j] ^ id) as u64).wrapping_sub(1) >> 63;
        mask |= same << j;
        j += 1;
    }
    mask
}

/// `a < b` as 1 or 0, without branches (Hacker's Delight, 2-12).
#[inline(always)]
fn below(a: u64, b: u64) -> u64 {
    ((!a & b) | ((!a | b) & a.wrapping_sub(b))) >> 63
}

/// The slot among `used` with the oldest start (or the newest), without branches: each slot is
/// one straight run of arithmetic, so the verifier walks one path, not one per slot.
#[inline(always)]
fn pick_slot(state: &ConnState, used: u64, newest: bool) -> usize {
    let mut best = u64::MAX;
    let mut found = START_SLOTS as u64;
    let mut j = 0;
    while j < START_SLOTS {
        // The newest start is the oldest of the complements.
        let key = if newest { !state.starts[j] } else { state.starts[j] };
        let first = ((found ^ START_SLOTS as u64).wrapping_sub(1)) >> 63;
        let take = (below(key, best) | first) & (used >> j) & 1;
        let mask = 0u64.wrapping_sub(take);
        best ^= (best ^ key) & mask;
        found ^= (found ^ j as u64) & mask;
        j += 1;
    }
    found as usize
}

/// Counts `n` requests out of flight at `now`.
#[inline(always)]
fn out_of_flight(c: &mut ServiceCounters, n: u32, now: u64) {
    if n > 0 {
        counters::add_i64(&mut c.inflight_sign_sum, -(n as i64));
        counters::add_i64(&mut c.inflight_time_sum, -(now as i64 * n as i64));
    }
}

/// Keeps the start of a request just opened: in a free slot (for HTTP/1.1 only while every
/// earlier open request has one, so that the oldest is answered first), else an HTTP/2 stream's
/// in `STREAM_STARTS`, else none (the first without one keeps its start in `request_start_ns`).
/// Only the client's side runs this: nothing else fills a slot or adds a claim.
#[inline(always)]
fn keep_start(state: &mut ConnState, conn: &ConnKey, id: u32, now: u64) {
    let in_order = atomic::load(&state.unslotted) <= 0;
    let free = !atomic::load(&state.used) & ALL_SLOTS;
    if free != 0 && (in_order || id != 0) {
        // The slot is free and only this side fills slots: it is written before its bit says
        // it is there to be taken.
        let j = lowest_slot(free);
        state.starts[j] = now;
        state.stream_ids[j] = id;
        atomic::or(&mut state.used, 1 << j);
        return;
    }
    if id != 0 {
        let key = StreamKey {
            conn: *conn,
            stream_id: id,
        };
        if STREAM_STARTS.insert(&key, &now, 0).is_ok() {
            atomic::add(&mut state.spilled, 1);
            return;
        }
    }
    add_unslotted(state, 1, now);
}

/// `n` more open requests without a start of their own.
#[inline(always)]
fn add_unslotted(state: &mut ConnState, n: u32, now: u64) {
    if atomic::load(&state.unslotted) <= 0 {
        state.request_start_ns = now;
    }
    atomic::add(&mut state.unslotted, n as i64);
}

/// What one round of a per-message `bpf_loop` here is given, and what the rounds count. Each
/// loop's round is verified once, however many rounds it runs; inline, every round of every
/// loop multiplied the paths the verifier walks past its limit.
#[repr(C)]
struct MessageLoop {
    state: *mut ConnState,
    conn: *const ConnKey,
    starts: *const Starts,
    now: u64,
    /// Requests opened (or ended) so far.
    count: u32,
}

impl MessageLoop {
    #[inline(always)]
    fn new(state: &mut ConnState, conn: &ConnKey, starts: &Starts, now: u64) -> Self {
        Self {
            state: state as *mut ConnState,
            conn: conn as *const ConnKey,
            starts: starts as *const Starts,
            now,
            count: 0,
        }
    }

    /// Runs `round` for indexes `0..n` (`n` at most `max`).
    #[inline(always)]
    fn run(&mut self, n: u32, max: u32, round: extern "C" fn(u32, *mut c_void) -> i64) {
        let n = if n < max { n } else { max };
        if n == 0 {
            return;
        }
        // SAFETY: the callback only uses `self`, which outlives the call.
        unsafe { bpf_loop(n, round as *mut c_void, self as *mut Self as *mut c_void, 0) };
    }

    /// The state, key and starts the loop was given.
    #[inline(always)]
    fn parts(&mut self) -> (&mut ConnState, &ConnKey, &Starts) {
        // SAFETY: the caller's connection state, key and starts, valid as long as `self` is.
        unsafe { (&mut *self.state, &*self.conn, &*self.starts) }
    }
}

/// The `i`th request of the segment opens.
#[inline(always)]
fn open_at(l: &mut MessageLoop, i: u32) {
    let now = l.now;
    let (state, conn, starts) = l.parts();
    // A probe's request is counted (as a probe) but never open: it is not traffic.
    if !is_probe(starts, i) {
        keep_start(state, conn, stream_at(starts, i), now);
        l.count += 1;
    }
}

/// One round of the loop in [`open_requests`].
#[inline(never)]
extern "C" fn open_one(i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `MessageLoop` on the caller's stack.
    open_at(unsafe { &mut *(ctx as *mut MessageLoop) }, i);
    0
}

/// The requests started in one segment (`starts.messages`), now.
#[inline(always)]
pub fn open_requests(state: &mut ConnState, conn: &ConnKey, starts: &Starts, c: &mut ServiceCounters) {
    let k = starts.messages;
    let now = now_ns();
    let mut l = MessageLoop::new(state, conn, starts, now);
    if k == 1 {
        // One request, as a segment mostly has: no loop.
        open_at(&mut l, 0);
    } else {
        l.run(k, STREAM_IDS as u32, open_one);
    }
    let mut opened = l.count;
    if k > STREAM_IDS as u32 {
        add_unslotted(state, k - STREAM_IDS as u32, now);
        opened += k - STREAM_IDS as u32;
    }
    counters::add_u64(&mut c.requests, k as u64);
    counters::add_i64(&mut c.inflight_sign_sum, opened as i64);
    counters::add_i64(&mut c.inflight_time_sum, now as i64 * opened as i64);
}

/// How many of a segment's final responses answer probes.
#[inline(always)]
pub fn probe_answers(starts: &Starts) -> u32 {
    let m = starts.messages;
    let mask = if m >= 32 { u32::MAX } else { (1u32 << m) - 1 };
    (starts.probe_mask & mask).count_ones()
}

/// Whether the `i`th message of a segment is a probe's request, or a final response to one.
#[inline(always)]
fn is_probe(starts: &Starts, i: u32) -> bool {
    i < 32 && starts.probe_mask & (1 << i) != 0
}

/// Which way [`take_slot`] picks among the open requests whose stream it does not know.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pick {
    /// Only the stream's own slot.
    Own,
    /// Else the oldest (HTTP/1.1 answers in order).
    Oldest,
    /// Else the newest (a late probe: the newest request was a probe).
    Newest,
}

/// Takes the slot of HTTP/2 stream `id` (0: none), or else the one `pick` says; returns its
/// start. None when there is none, or when another program took it first.
#[inline(always)]
fn take_slot(state: &mut ConnState, id: u32, pick: Pick) -> Option<u64> {
    let used = atomic::load(&state.used) & ALL_SLOTS;
    if used == 0 {
        return None;
    }
    let own = if id != 0 { slots_of(state, id) & used } else { 0 };
    let mut found = if own != 0 { lowest_slot(own) } else { START_SLOTS };
    if found == START_SLOTS && pick != Pick::Own {
        found = pick_slot(state, used, pick == Pick::Newest);
    }
    if found >= START_SLOTS {
        return None;
    }
    // Masked where the verifier sees it (the compiler may test one copy and index with another).
    let found = found & (START_SLOTS - 1);
    // Read before the claim: once its bit is clear the slot may be filled again.
    let start = state.starts[found];
    let bit = 1u64 << found;
    (atomic::and(&mut state.used, !bit) & bit != 0).then_some(start)
}

/// Takes an open request's start: HTTP/2 stream `id`'s own (in its slot, or in `STREAM_STARTS`
/// for a stream past the slots), or else the one `pick` says among the slots.
#[inline(always)]
fn take_start(state: &mut ConnState, conn: &ConnKey, id: u32, pick: Pick) -> Option<u64> {
    if let Some(start) = take_slot(state, id, Pick::Own) {
        return Some(start);
    }
    if id != 0 && atomic::load(&state.spilled) > 0 {
        let key = StreamKey {
            conn: *conn,
            stream_id: id,
        };
        // SAFETY: the value is copied out at once.
        if let Some(start) = unsafe { STREAM_STARTS.get(&key) }.copied() {
            // The entry only carries the start; the claim is the unit of `spilled`, which the
            // connection's end may have taken meanwhile.
            if STREAM_STARTS.remove(&key).is_ok() && atomic::take_units(&mut state.spilled, 1) == 1 {
                return Some(start);
            }
            return None;
        }
    }
    if pick == Pick::Own {
        return None;
    }
    take_slot(state, 0, pick)
}

/// One round of the loop in [`cancel_requests`]: the `i`th stream the client reset ends.
#[inline(never)]
extern "C" fn cancel_one(i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `MessageLoop` on the caller's stack.
    let l = unsafe { &mut *(ctx as *mut MessageLoop) };
    let (state, conn, starts) = l.parts();
    let ended = take_start(state, conn, cancelled_at(starts, i), Pick::Own).is_some();
    l.count += ended as u32;
    0
}

/// HTTP/2 streams the client reset (a cancelled call): the server may never end them, so each
/// that is still open ends now, with no response and no latency.
#[inline(always)]
pub fn cancel_requests(state: &mut ConnState, conn: &ConnKey, starts: &Starts, c: &mut ServiceCounters) {
    let mut l = MessageLoop::new(state, conn, starts, 0);
    l.run(starts.cancel_count, CANCEL_IDS as u32, cancel_one);
    out_of_flight(c, l.count, now_ns());
}

/// One round of the loop in [`end_late_probes`]: the newest open request ends.
#[inline(never)]
extern "C" fn end_newest(_i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `MessageLoop` on the caller's stack.
    let l = unsafe { &mut *(ctx as *mut MessageLoop) };
    let (state, conn, _) = l.parts();
    // HTTP/1.1 fills slots in order: the newest request has none if any has none.
    let ended = atomic::take_units(&mut state.unslotted, 1) == 1
        || take_start(state, conn, 0, Pick::Newest).is_some();
    l.count += ended as u32;
    0
}

/// Requests opened in earlier segments that turned out to be probes (their `User-Agent` came
/// later): the newest open ones (at most 4). Each ends now, with no response and no latency.
#[inline(always)]
pub fn end_late_probes(
    state: &mut ConnState,
    conn: &ConnKey,
    starts: &Starts,
    n: u32,
    c: &mut ServiceCounters,
) {
    let mut l = MessageLoop::new(state, conn, starts, 0);
    l.run(n, 4, end_newest);
    out_of_flight(c, l.count, now_ns());
}

/// The `i`th of the first `count` ids kept in `ids` (0: none), bounded where the verifier sees
/// it: the compiler would test a copy of the index and use another.
#[inline(always)]
fn kept_id<const N: usize>(ids: &[u32; N], count: u32, i: u32) -> u32 {
    let j = core::hint::black_box(i as usize);
    if j < N && (j as u32) < count {
        ids[j]
    } else {
        0
    }
}

/// [`Starts::stream_of`] for a loop round's index.
#[inline(always)]
fn stream_at(starts: &Starts, i: u32) -> u32 {
    kept_id(&starts.ids, starts.id_count, i)
}

/// [`Starts::cancelled`] for a loop round's index.
#[inline(always)]
fn cancelled_at(starts: &Starts, i: u32) -> u32 {
    kept_id(&starts.cancel_ids, starts.cancel_count, i)
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

/// The end of the `i`th message of the segment. HTTP/1.1 answers in order: it ends the oldest
/// open request, else one without a start of its own. An HTTP/2 end ends its own stream's
/// request. If that is not open, the end either crossed the client's reset (it ends nothing)
/// or its claim was taken blind (see [`take_blind`]); once a connection has had a blind take,
/// every end takes some claim, so the open count comes back to what it is. Returns false past
/// the last end.
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
    let id = stream_at(starts, i);
    let h2 = id != 0 || state.requests.is_h2();
    let own = if h2 {
        take_start(state, conn, id, Pick::Own)
    } else {
        take_slot(state, 0, Pick::Oldest)
    };
    if let Some(start) = own {
        l.record(start);
        return true;
    }
    if h2
        && id != 0
        && crate::http1::set_flag(state, 0) & CONN_BLIND == 0
        && atomic::load(&state.unslotted) <= 0
    {
        // No blind take yet, and no stream without a start: it crossed the client's reset.
        return true;
    }
    take_blind(l, h2);
    true
}

/// An end takes an open request's claim that may not be its own: HTTP/1.1 (in order) or an
/// HTTP/2 end whose stream id was not kept or whose claim is gone. A request without a start
/// first, then (HTTP/2) a spilled stream, then the oldest slot. Claims are taken one per end,
/// so the count stays right; the stream whose claim was taken finds none at its own end, which
/// then takes another blind. The connection is marked so that it does.
#[inline(always)]
fn take_blind(l: &mut CloseLoop, h2: bool) {
    // SAFETY: as in `close_at`.
    let state = unsafe { &mut *l.state };
    if atomic::take_units(&mut state.unslotted, 1) == 1 {
        l.unslotted += 1;
        l.ended += 1;
    } else if !h2 {
        return;
    } else if atomic::take_units(&mut state.spilled, 1) == 1 {
        // Its latency is unknown.
        l.ended += 1;
    } else if let Some(start) = take_slot(state, 0, Pick::Oldest) {
        l.record(start);
    } else {
        return;
    }
    if h2 {
        crate::http1::set_flag(state, CONN_BLIND);
    }
}

impl CloseLoop {
    /// A request ended that started at `start`.
    #[inline(always)]
    fn record(&mut self, start: u64) {
        // SAFETY: the caller's counters, valid for as long as `self` is.
        let c = unsafe { &mut *self.c };
        let latency = self.now.saturating_sub(start);
        counters::add_u64(&mut c.latency_sum_ns, latency);
        counters::record_latency(c, latency);
        self.ended += 1;
    }
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
pub fn close_requests(state: &mut ConnState, conn: &ConnKey, starts: &Starts, c: &mut ServiceCounters) {
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
        // Ends past the ids kept (id 0) are matched as `close_at` says.
        let rounds = if starts.messages < CLOSE_ROUNDS {
            starts.messages
        } else {
            CLOSE_ROUNDS
        };
        // SAFETY: the callback only uses `l`, which outlives the call.
        unsafe {
            bpf_loop(
                rounds,
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
    if starts.messages > CLOSE_ROUNDS {
        // Yet more ends: each ends an open request without a start of its own, else (HTTP/2)
        // any open stream, as in `close_at`.
        let rest = starts.messages - CLOSE_ROUNDS;
        let took = atomic::take_units(&mut state.unslotted, rest);
        unslotted += took;
        ended += took + atomic::take_units(&mut state.spilled, rest - took);
    }
    if ended == 0 {
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
    counters::add_u64(&mut c.responses, ended as u64);
    out_of_flight(c, ended, now);
}

/// The connection ended: every request still open on it ends now. Takes all the claims at
/// once, so an end racing with this one on the other CPU is counted by one of the two.
#[inline(always)]
pub fn end_all(state: &mut ConnState, c: &mut ServiceCounters) {
    let slots = (atomic::and(&mut state.used, 0) & ALL_SLOTS).count_ones();
    let spilled = atomic::swap(&mut state.spilled, 0).max(0) as u32;
    let unslotted = atomic::swap(&mut state.unslotted, 0).max(0) as u32;
    out_of_flight(c, slots + spilled + unslotted, now_ns());
}
