//! Connections that arrive from outside (another machine, another network namespace) never pass
//! the connect hook of balance.rs on their way to a held service address. An `sk_lookup` program
//! in the agent's network namespace steers them: when a TCP SYN's destination is a service address
//! (or any address on a service's wildcard port) whose service has no ready backend and a holder,
//! the kernel hands the connection to the holder's listening socket of the same family
//! (`HOLDERS` for IPv4, `HOLDERS6` for IPv6, filled by the agent). Every other lookup leaves after a protocol check and one bitmap read (`HELD_PORTS`); a warm
//! service is never steered (outside clients then need a real listener, e.g. kube-proxy's).

use aya_ebpf::{
    macros::map,
    maps::{Array, SockHash},
    programs::SkLookupContext,
};
use core::ptr::{addr_of, read_volatile};

use surge_common::{EndpointKey, MAX_BALANCED, WATCHED_PORT_WORDS};

use crate::balance::SERVICE_ADDRS;

/// The holders' IPv4 listening sockets (on 127.0.0.1), by holder port (host byte order).
/// Written by the agent.
#[map(name = "HOLDERS")]
pub static HOLDERS: SockHash<u32> = SockHash::with_max_entries(MAX_BALANCED, 0);

/// The holders' IPv6 listening sockets (on ::1, same port), by holder port. Written by the agent.
#[map(name = "HOLDERS6")]
pub static HOLDERS6: SockHash<u32> = SockHash::with_max_entries(MAX_BALANCED, 0);

/// Ports of the service addresses of held services, as a bitmap (bit `p & 63` of word `p >> 6`).
/// Written by the agent.
#[map(name = "HELD_PORTS")]
pub static HELD_PORTS: Array<u64> = Array::with_max_entries(WATCHED_PORT_WORDS, 0);

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;

#[inline(always)]
pub fn lookup(ctx: &SkLookupContext) -> Option<()> {
    let l = ctx.lookup;
    // SAFETY: `l` is the program's context; each access is one field at its constant offset.
    // Every field is read here, once, at its constant offset: the verifier refuses context loads
    // through a pointer the compiler has offset, which reads in a branch below could become.
    let (family, protocol, port, ip4, ip6) = unsafe {
        (
            read_volatile(addr_of!((*l).family)),
            read_volatile(addr_of!((*l).protocol)),
            read_volatile(addr_of!((*l).local_port)),
            read_volatile(addr_of!((*l).local_ip4)),
            [
                read_volatile(addr_of!((*l).local_ip6[0])),
                read_volatile(addr_of!((*l).local_ip6[1])),
                read_volatile(addr_of!((*l).local_ip6[2])),
                read_volatile(addr_of!((*l).local_ip6[3])),
            ],
        )
    };
    if protocol != IPPROTO_TCP || (family != AF_INET && family != AF_INET6) || port > u16::MAX as u32 {
        return None;
    }
    match HELD_PORTS.get(port >> 6) {
        Some(word) if word & (1u64 << (port & 63)) != 0 => {}
        _ => return None,
    }
    let port = port as u16;
    // The addresses are in network byte order: their bytes in memory order are the octets.
    let key = if family == AF_INET {
        EndpointKey::v4(ip4.to_ne_bytes(), port)
    } else {
        let w = ip6;
        let (a, b, c, d) = (
            w[0].to_ne_bytes(),
            w[1].to_ne_bytes(),
            w[2].to_ne_bytes(),
            w[3].to_ne_bytes(),
        );
        EndpointKey::new(
            [
                a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
                d[3],
            ],
            port,
        )
    };
    let b = match SERVICE_ADDRS.get_ptr(&key) {
        Some(b) => b,
        None => SERVICE_ADDRS.get_ptr(&EndpointKey::any(port))?,
    };
    // SAFETY: `b` points at a map value, valid while the program runs.
    let (count, holder_port) = unsafe {
        (
            read_volatile(addr_of!((*b).count)),
            read_volatile(addr_of!((*b).holder_port)),
        )
    };
    if count != 0 || holder_port == 0 {
        return None;
    }
    let holders = if family == AF_INET { &HOLDERS } else { &HOLDERS6 };
    holders.redirect_sk_lookup(ctx, holder_port, 0).ok()
}
