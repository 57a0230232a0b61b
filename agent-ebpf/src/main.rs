//! Surge's kernel programs:
//! - `cgroup_skb` ingress/egress on the cgroup v2 root see every TCP segment of watched server
//!   endpoints: requests arriving, responses leaving, bytes, TLS (http1.rs);
//! - `sock_ops` sees connections of those endpoints open and close (connections.rs);
//! - the `sched_switch` raw tracepoint charges CPU time to watched cgroups (cpu.rs);
//! - `cgroup_sock_addr` connect4/connect6 balance connections to service addresses over ready
//!   replicas (balance.rs);
//! - `sk_lookup` in the agent's network namespace gives connections from outside to a held
//!   service address to the agent's holder (steer.rs).
//!
//! They keep cumulative per-service counters the agent reads; this side never allocates or blocks.
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod atomic;
mod balance;
mod connections;
mod counters;
mod cpu;
mod http1;
mod inflight;
mod maps;
mod packet;
mod steer;

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock_addr, raw_tracepoint, sk_lookup, sock_ops},
    programs::{RawTracePointContext, SkBuffContext, SkLookupContext, SockAddrContext, SockOpsContext},
};

use crate::packet::Direction;

/// cgroup_skb programs return 1 to let the packet through; Surge only observes.
const PASS: i32 = 1;

#[cgroup_skb(ingress)]
pub fn surge_skb_ingress(ctx: SkBuffContext) -> i32 {
    let _ = http1::observe(&ctx, Direction::Ingress);
    PASS
}

/// Reached only by a tail call from `surge_skb_ingress`, never attached.
#[cgroup_skb(ingress)]
pub fn surge_skb_handshake(ctx: SkBuffContext) -> i32 {
    let _ = http1::observe_handshake(&ctx);
    PASS
}

#[cgroup_skb(egress)]
pub fn surge_skb_egress(ctx: SkBuffContext) -> i32 {
    let _ = http1::observe(&ctx, Direction::Egress);
    PASS
}

#[sock_ops]
pub fn surge_sock_ops(ctx: SockOpsContext) -> u32 {
    let _ = connections::on_sock_op(&ctx);
    1
}

/// Connect hooks always allow the connect (1); they may have rewritten its destination.
#[cgroup_sock_addr(connect4)]
pub fn surge_connect4(ctx: SockAddrContext) -> i32 {
    let _ = balance::connect4(&ctx);
    1
}

#[cgroup_sock_addr(connect6)]
pub fn surge_connect6(ctx: SockAddrContext) -> i32 {
    let _ = balance::connect6(&ctx);
    1
}

/// sk_lookup programs return SK_PASS (1): the lookup goes on, with the socket assigned, if any.
#[sk_lookup]
pub fn surge_sk_lookup(ctx: SkLookupContext) -> u32 {
    let _ = steer::lookup(&ctx);
    1
}

/// A raw tracepoint: the program gets the tracepoint's arguments as they are, without the
/// formatted trace record a classic tracepoint program pays for on every switch.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn surge_sched_switch(_ctx: RawTracePointContext) -> i32 {
    let _ = cpu::on_switch();
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
