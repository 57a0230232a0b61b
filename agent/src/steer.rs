//! Steering connections from outside to the holders: the `sk_lookup` program (agent-ebpf's
//! steer.rs) attached to the agent's network namespace, and the `HOLDERS` socket map it assigns
//! from, which holding.rs fills with each holder's listening socket. The link is not pinned: held
//! connections end with the agent anyway, so the program is detached when the agent exits,
//! however it exits, and the next agent attaches its own.
//!
//! Also tells the connect hooks the agent's network namespace (`AGENT_NETNS`): a socket of any
//! other namespace is never sent to a loopback address, which there is another machine's.

use std::{
    collections::BTreeSet,
    fs::File,
    os::fd::{AsFd, AsRawFd},
};

use aya::{
    maps::{Array, MapData, SockHash},
    programs::SkLookup,
    Ebpf,
};

use crate::kernel::{loaded, take_map, KernelError};

const PROGRAM: &str = "surge_sk_lookup";
/// The agent's own network namespace.
const NETNS: &str = "/proc/self/ns/net";

#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error("cannot open {path}: {source}")]
    Netns {
        path: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("cannot read this network namespace's cookie (SO_NETNS_COOKIE needs Linux 5.14): {0}")]
    Cookie(std::io::Error),
}

/// The holders' socket map; the sk_lookup program stays attached while the `Ebpf` lives.
pub struct Steering {
    holders: SockHash<MapData, u32>,
    holders6: SockHash<MapData, u32>,
    /// The bitmap of service ports the program looks further at, and the ports set in it.
    held_ports: Array<MapData, u64>,
    ports: BTreeSet<u16>,
}

impl Steering {
    /// Makes `port`'s listeners the sockets outside connections to its service go to: the
    /// IPv4 one, and the IPv6 one where there is one.
    pub fn hold(&mut self, port: u16, listener: &impl AsRawFd, listener6: Option<&impl AsRawFd>) {
        match self.holders.insert(port as u32, listener.as_raw_fd(), 0) {
            Ok(()) => tracing::debug!(port, "outside IPv4 connections to the service go to its holder"),
            Err(e) => {
                tracing::warn!(port, error = %e, "cannot steer outside IPv4 connections to the holder; only this host's are held")
            }
        }
        let Some(listener6) = listener6 else { return };
        if let Err(e) = self.holders6.insert(port as u32, listener6.as_raw_fd(), 0) {
            tracing::warn!(port, error = %e, "cannot steer outside IPv6 connections to the holder")
        }
    }

    /// Makes the program look further only at lookups for `ports` (the held services' ports);
    /// every other lookup leaves after one bitmap read. Only the words that change are written.
    pub fn set_ports(&mut self, ports: BTreeSet<u16>) {
        let words: BTreeSet<u16> = self.ports.symmetric_difference(&ports).map(|p| p >> 6).collect();
        for w in words {
            let bits = ports
                .range(w << 6..=(w << 6 | 63))
                .fold(0u64, |acc, p| acc | 1 << (p & 63));
            if let Err(e) = self.held_ports.set(w as u32, bits, 0) {
                tracing::warn!(word = w, error = %e, "cannot write the held ports' bitmap");
                return;
            }
        }
        self.ports = ports;
    }

    /// Stops steering to `port` (the kernel also forgets a socket once it is closed).
    pub fn release(&mut self, port: u16) {
        for holders in [&mut self.holders, &mut self.holders6] {
            match holders.remove(&(port as u32)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => tracing::warn!(port, error = %e, "cannot remove a holder from the socket map"),
            }
        }
    }
}

/// Writes the agent's network namespace cookie for the connect hooks; call before they are
/// attached. Without it (older kernels) every socket is taken for one of the agent's namespace.
pub fn tell_netns(ebpf: &mut Ebpf) -> Result<(), SteerError> {
    let cookie = netns_cookie().map_err(SteerError::Cookie)?;
    let name = "AGENT_NETNS";
    // Borrowed, not taken: the connect programs are loaded later and need the map in the object.
    let map = ebpf.map_mut(name).ok_or(KernelError::MissingMap { name })?;
    let mut map: Array<&mut MapData, u64> =
        Array::try_from(map).map_err(|source| KernelError::Map { name, source })?;
    map.set(0, cookie, 0)
        .map_err(|source| KernelError::Map { name, source })?;
    Ok(())
}

/// Writes the node address other namespaces reach the holders at (`--node-ip`) for the connect
/// hooks; call before they are attached. Without one, other namespaces' connects to a service at
/// zero are left alone.
pub fn tell_node_addr(ebpf: &mut Ebpf, node_ip: Option<std::net::IpAddr>) -> Result<(), SteerError> {
    let Some(ip) = node_ip else { return Ok(()) };
    let name = "NODE_ADDR";
    let map = ebpf.map_mut(name).ok_or(KernelError::MissingMap { name })?;
    let mut map: Array<&mut MapData, surge_common::EndpointKey> =
        Array::try_from(map).map_err(|source| KernelError::Map { name, source })?;
    let addr = match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    };
    // Port 1 marks the entry as set; the hook puts the holder's own port there.
    map.set(0, surge_common::EndpointKey::new(addr, 1), 0)
        .map_err(|source| KernelError::Map { name, source })?;
    Ok(())
}

/// Loads the sk_lookup program, attaches it to the agent's network namespace and takes the
/// holders' socket map.
pub fn attach(ebpf: &mut Ebpf) -> Result<Steering, SteerError> {
    let netns = File::open(NETNS).map_err(|source| SteerError::Netns { path: NETNS, source })?;
    let program: &mut SkLookup = loaded(ebpf, PROGRAM)?;
    program
        .attach(netns.as_fd())
        .map_err(|source| KernelError::Program {
            name: PROGRAM,
            source,
        })?;
    Ok(Steering {
        holders: take_map(ebpf, "HOLDERS")?,
        holders6: take_map(ebpf, "HOLDERS6")?,
        held_ports: take_map(ebpf, "HELD_PORTS")?,
        ports: BTreeSet::new(),
    })
}

/// The cookie of the calling thread's network namespace.
fn netns_cookie() -> std::io::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which lives for the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}
