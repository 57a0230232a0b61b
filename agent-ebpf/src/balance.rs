//! The connect-time load balancer: a `cgroup_sock_addr` connect4/connect6 program on the cgroup v2
//! root. When a TCP socket connects to a balanced service address (`SERVICE_ADDRS`), the
//! destination is rewritten to one of the service's ready backends (`BACKENDS`), round robin.
//! Nothing stays in the request path: the client talks to the replica directly.
//!
//! Every connect is allowed (the programs return 1); an address that is not balanced is left
//! alone, and a service with no ready backend is sent to the agent's holder (holder.rs), if any.
//! A loopback destination (the holder, a replica on 127.0.0.1) is only used for sockets of the
//! agent's own network namespace. From any other (a pod's), a connect that would go to the
//! holder goes to the holder's port on the node address (`NODE_ADDR`) if the agent has one;
//! else, like a connect to a loopback replica, it is left alone, and if it reaches this host,
//! the sk_lookup program (steer.rs) gives it to the holder.

use aya_ebpf::{
    helpers::bpf_get_netns_cookie,
    macros::map,
    maps::{Array, HashMap},
    programs::SockAddrContext,
};
use core::{
    ffi::c_void,
    intrinsics::{atomic_xadd, AtomicOrdering},
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
};

use surge_common::{Balanced, EndpointKey, MAX_BACKENDS, MAX_BALANCED, MAX_SERVICES};

/// Balanced service addresses (IPv4 as v4-mapped) → where their backends are. Written by the agent.
#[map(name = "SERVICE_ADDRS")]
pub static SERVICE_ADDRS: HashMap<EndpointKey, Balanced> = HashMap::with_max_entries(MAX_BALANCED, 0);

/// Ready backends: service id × `MAX_BACKENDS` slots. Written by the agent.
#[map(name = "BACKENDS")]
pub static BACKENDS: Array<EndpointKey> = Array::with_max_entries(MAX_SERVICES * MAX_BACKENDS, 0);

/// The network namespace cookie of the agent, whose loopback the holders listen on; 0: unknown
/// (every namespace is taken for the agent's). Written by the agent.
#[map(name = "AGENT_NETNS")]
pub static AGENT_NETNS: Array<u64> = Array::with_max_entries(1, 0);

/// The node address other network namespaces reach the holders at (IPv4 as v4-mapped; port 1
/// when set, 0 when the agent has none). Written by the agent.
#[map(name = "NODE_ADDR")]
pub static NODE_ADDR: Array<EndpointKey> = Array::with_max_entries(1, 0);

const SOCK_STREAM: u32 = 1;
const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// Where a connect goes: the next backend of a balanced address, or its holder.
enum Destination {
    Backend(EndpointKey),
    /// The holder's port on the agent's loopback.
    Holder(u16),
}

/// The next backend of a balanced address, or its holder if it has no ready backend.
#[inline(always)]
fn pick(key: &EndpointKey) -> Option<Destination> {
    let b = SERVICE_ADDRS.get_ptr_mut(key)?;
    // SAFETY: `b` points at a map value, valid while the program runs; the cursor is only ever
    // changed with an atomic add (a racing connect may reuse a slot, which is harmless).
    let (id, count, next, holder_port) = unsafe {
        (
            read_volatile(addr_of!((*b).service_id)),
            read_volatile(addr_of!((*b).count)),
            read_volatile(addr_of!((*b).next)),
            read_volatile(addr_of!((*b).holder_port)),
        )
    };
    // No ready replica: the agent's holder accepts the connection and keeps it until one is.
    if count == 0 && holder_port != 0 && holder_port <= u16::MAX as u32 {
        return Some(Destination::Holder(holder_port as u16));
    }
    if count == 0 || count > MAX_BACKENDS || id >= MAX_SERVICES {
        return None;
    }
    // SAFETY: as above; the result is unused, so this is a plain BPF atomic add.
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(addr_of_mut!((*b).next), 1) };
    let slot = id * MAX_BACKENDS + next % count;
    BACKENDS.get(slot).copied().map(Destination::Backend)
}

/// The address a connect is rewritten to, as seen from the connecting socket's namespace: the
/// holder on the agent's loopback, or on the node address from another namespace (none if the
/// agent has no node address); a backend on loopback only from the agent's namespace.
#[inline(always)]
fn reachable(ctx: &SockAddrContext, to: Destination) -> Option<EndpointKey> {
    match to {
        Destination::Backend(b) => (!unreachable_loopback(ctx, &b)).then_some(b),
        Destination::Holder(port) => {
            let local = EndpointKey::v4([127, 0, 0, 1], port);
            if !unreachable_loopback(ctx, &local) {
                return Some(local);
            }
            let node = NODE_ADDR.get(0)?;
            (node.port != 0).then_some(EndpointKey::new(node.addr, port))
        }
    }
}

/// Whether `to` is a loopback address the connecting socket cannot reach: its network namespace
/// is not the agent's. The helper is only called for loopback destinations.
#[inline(always)]
fn unreachable_loopback(ctx: &SockAddrContext, to: &EndpointKey) -> bool {
    let a = &to.addr;
    let v4_loopback = a[..12] == V4_MAPPED_PREFIX && a[12] == 127;
    let v6_loopback = a[..15] == [0; 15] && a[15] == 1;
    if !v4_loopback && !v6_loopback {
        return false;
    }
    let agent = match AGENT_NETNS.get(0) {
        Some(c) if *c != 0 => *c,
        _ => return false,
    };
    // SAFETY: connect programs may ask for the netns cookie of their socket's context.
    unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut c_void) != agent }
}

#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) -> Option<()> {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the program's context; each access is one field at its constant offset.
    let (ty, ip, port) = unsafe {
        (
            read_volatile(addr_of!((*sa).type_)),
            read_volatile(addr_of!((*sa).user_ip4)),
            read_volatile(addr_of!((*sa).user_port)),
        )
    };
    if ty != SOCK_STREAM {
        return None;
    }
    // Both are in network byte order: the address's bytes in memory order are its octets.
    let key = EndpointKey::v4(ip.to_ne_bytes(), u16::from_be(port as u16));
    let to = reachable(ctx, pick(&key)?)?;
    if to.addr[..12] != V4_MAPPED_PREFIX {
        return None;
    }
    let ip = u32::from_ne_bytes([to.addr[12], to.addr[13], to.addr[14], to.addr[15]]);
    // SAFETY: connect4 programs may write user_ip4 and user_port.
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip4), ip);
        write_volatile(addr_of_mut!((*sa).user_port), to.port.to_be() as u32);
    }
    Some(())
}

#[inline(always)]
pub fn connect6(ctx: &SockAddrContext) -> Option<()> {
    let sa = ctx.sock_addr;
    // SAFETY: as in `connect4`.
    let (ty, w, port) = unsafe {
        (
            read_volatile(addr_of!((*sa).type_)),
            [
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ],
            read_volatile(addr_of!((*sa).user_port)),
        )
    };
    if ty != SOCK_STREAM {
        return None;
    }
    let mut addr = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    // IPv4 addresses are keyed v4-mapped, so a dual-stack socket connecting to
    // ::ffff:a.b.c.d finds an IPv4 service address too.
    let to = reachable(ctx, pick(&EndpointKey::new(addr, u16::from_be(port as u16)))?)?;
    let a = to.addr;
    // SAFETY: connect6 programs may write user_ip6 and user_port.
    unsafe {
        write_volatile(
            addr_of_mut!((*sa).user_ip6[0]),
            u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        );
        write_volatile(
            addr_of_mut!((*sa).user_ip6[1]),
            u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        );
        write_volatile(
            addr_of_mut!((*sa).user_ip6[2]),
            u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        );
        write_volatile(
            addr_of_mut!((*sa).user_ip6[3]),
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        );
        write_volatile(addr_of_mut!((*sa).user_port), to.port.to_be() as u32);
    }
    Some(())
}
