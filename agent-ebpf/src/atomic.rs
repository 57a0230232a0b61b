//! Single-instruction atomic operations on 64-bit words of map memory. The BPF target's `core`
//! has no `AtomicU64` methods for these, so the intrinsics (BPF `atomic` instructions, 64-bit:
//! the "generic" CPU has no 32-bit forms, and its add returns nothing) are used directly.

use aya_ebpf::helpers::bpf_loop;
use core::{
    ffi::c_void,
    intrinsics::{atomic_and, atomic_cxchg, atomic_or, atomic_xadd, atomic_xchg, AtomicOrdering},
};

/// `*word += v`.
#[inline(always)]
pub fn add(word: &mut i64, v: i64) {
    // SAFETY: `word` is a valid, aligned i64 in map memory; the result is unused, so this is a
    // plain BPF atomic add.
    unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::SeqCst }>(word, v) };
}

/// `*word |= bits`; returns the value before.
#[inline(always)]
pub fn or(word: &mut u64, bits: u64) -> u64 {
    // SAFETY: as for `add`.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(word, bits) }
}

/// `*word &= bits`; returns the value before.
#[inline(always)]
pub fn and(word: &mut u64, bits: u64) -> u64 {
    // SAFETY: as for `add`.
    unsafe { atomic_and::<u64, u64, { AtomicOrdering::SeqCst }>(word, bits) }
}

/// Puts `v` in `*word`; returns the value before.
#[inline(always)]
pub fn swap(word: &mut i64, v: i64) -> i64 {
    // SAFETY: as for `add`.
    unsafe { atomic_xchg::<i64, { AtomicOrdering::SeqCst }>(word, v) }
}

/// Reads a word another CPU may be changing (a fresh load, never one the compiler kept).
#[inline(always)]
pub fn load<T: Copy>(word: &T) -> T {
    // SAFETY: `word` is a valid, aligned value.
    unsafe { core::ptr::read_volatile(word) }
}

/// What each round of [`take_units`]' loop is given, and its outcome.
#[repr(C)]
struct Take {
    word: *mut i64,
    n: u32,
    took: u32,
}

/// One attempt of [`take_units`]; returns 1 (stop) once it is settled.
#[inline(never)]
extern "C" fn take_round(_i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Take` on the caller's stack, whose `word` is a live map word.
    let t = unsafe { &mut *(ctx as *mut Take) };
    let word = unsafe { &mut *t.word };
    let seen = load(word);
    if seen <= 0 {
        return 1;
    }
    let took = if seen < t.n as i64 { seen as u32 } else { t.n };
    // SAFETY: as for `add`.
    let (_, done) = unsafe {
        atomic_cxchg::<i64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            word,
            seen,
            seen - took as i64,
        )
    };
    if done {
        t.took = took;
        return 1;
    }
    0
}

/// Takes up to `n` units of the count `*word` (open requests that each hold one unit); returns
/// how many it took. A unit is taken by one caller only, whatever runs at once: the count is
/// lowered only from the value just read (compare-and-exchange), tried again if another CPU
/// changed it meanwhile. After 16 lost races it takes none: the requests stay open, for a
/// later end or the connection's end, rather than end twice. The attempts are the rounds of a
/// `bpf_loop`, whose round the verifier walks once rather than once per attempt and per caller.
#[inline(always)]
pub fn take_units(word: &mut i64, n: u32) -> u32 {
    if n == 0 || load(word) <= 0 {
        return 0;
    }
    let mut t = Take {
        word: word as *mut i64,
        n,
        took: 0,
    };
    // SAFETY: the callback only uses `t`, which outlives the call.
    unsafe {
        bpf_loop(
            16,
            take_round as *mut c_void,
            &mut t as *mut Take as *mut c_void,
            0,
        )
    };
    t.took
}
