//! Connection lifecycle from sock_ops: an accepted connection of a watched endpoint is counted
//! open and asked for state callbacks; when it reaches TCP_CLOSE it is counted closed, and any
//! request still open on it ends (so in-flight counts never leak, whatever the packets showed).
//! A connection made *from* a watched endpoint's address and port (a client that was given that
//! port while nothing listened on it) is marked as a client on its socket, so the packet
//! programs leave it out.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    programs::SockOpsContext,
};
use core::ptr::{addr_of, read_volatile};

use surge_common::{ConnKey, CONN_CLIENT};

use crate::{
    counters, http1,
    maps::{conn_state_of, counters_of, port_watched, service_of},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[inline(always)]
pub fn on_sock_op(ctx: &SockOpsContext) -> Result<(), i64> {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return Ok(());
    }
    // SAFETY: one field of the program's context, read once at its constant offset.
    let port = unsafe { read_volatile(addr_of!((*ctx.ops).local_port)) };
    if !port_watched(port) {
        return Ok(());
    }
    let conn = conn_key(ctx).ok_or(-1i64)?;
    let Some(service_id) = service_of(conn.local_addr, conn.local_port) else {
        return Ok(());
    };
    // SAFETY: one field of the program's context, read once at its constant offset.
    let sk = unsafe { read_volatile(addr_of!((*ctx.ops).__bindgen_anon_2.sk)) };
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // A client's socket, before its first payload: the packet programs leave it out.
        let state = conn_state_of(sk, true).ok_or(-1i64)?;
        http1::set_flag(state, CONN_CLIENT);
        return Ok(());
    }
    let c = counters_of(service_id).ok_or(-1i64)?;
    if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        counters::add_u64(&mut c.connections_opened, 1);
        // Its first payload may have come with its handshake, framed before this socket was.
        // SAFETY: one field of the program's context, read once at its constant offset.
        let rcv_nxt = unsafe { read_volatile(addr_of!((*ctx.ops).rcv_nxt)) };
        http1::adopt_handshake(sk, &conn, rcv_nxt, c);
        ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
            .map_err(|e| e as i64)?;
    } else if ctx.arg(1) == BPF_TCP_CLOSE {
        // Only accepted connections asked for state callbacks.
        counters::add_u64(&mut c.connections_closed, 1);
        if let Some(state) = conn_state_of(sk, false) {
            http1::close(state, c);
        }
    }
    Ok(())
}

/// The connection's 4-tuple in the form the cgroup_skb programs use (IPv4 as v4-mapped IPv6).
/// Every field is read once with a volatile load at its constant offset: the verifier refuses
/// context loads through a pointer the compiler has offset, which merged loads produce.
#[inline(always)]
fn conn_key(ctx: &SockOpsContext) -> Option<ConnKey> {
    let ops = ctx.ops;
    // SAFETY: `ops` is the program's context; each read is of one field of it.
    let (family, l4, r4, l6, r6, lport, rport) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).local_ip4)),
            read_volatile(addr_of!((*ops).remote_ip4)),
            [
                read_volatile(addr_of!((*ops).local_ip6[0])),
                read_volatile(addr_of!((*ops).local_ip6[1])),
                read_volatile(addr_of!((*ops).local_ip6[2])),
                read_volatile(addr_of!((*ops).local_ip6[3])),
            ],
            [
                read_volatile(addr_of!((*ops).remote_ip6[0])),
                read_volatile(addr_of!((*ops).remote_ip6[1])),
                read_volatile(addr_of!((*ops).remote_ip6[2])),
                read_volatile(addr_of!((*ops).remote_ip6[3])),
            ],
            read_volatile(addr_of!((*ops).local_port)),
            read_volatile(addr_of!((*ops).remote_port)),
        )
    };
    let (local_addr, remote_addr) = match family {
        AF_INET => (mapped(l4), mapped(r4)),
        AF_INET6 => (v6(l6), v6(r6)),
        _ => return None,
    };
    Some(ConnKey {
        local_addr,
        remote_addr,
        // local_port is in host byte order. remote_port is in network byte order, and in the
        // upper 16 bits on little-endian machines (the kernel shifts skc_dport left by 16).
        local_port: lport as u16,
        remote_port: u16::from_be(remote_port_bits(rport)),
    })
}

/// The 16 bits of `bpf_sock_ops::remote_port` that hold the port (network byte order).
#[inline(always)]
fn remote_port_bits(field: u32) -> u16 {
    if cfg!(target_endian = "little") {
        (field >> 16) as u16
    } else {
        field as u16
    }
}

#[inline(always)]
fn mapped(ip_be: u32) -> [u8; 16] {
    let b = ip_be.to_ne_bytes();
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3]]
}

#[inline(always)]
fn v6(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}
