//! The connect-time load balancer seen from userspace: attaches the connect4/connect6 programs,
//! writes each balanced service address and its ready backends into the kernel maps, and reads
//! them back for the scaler (which waits for a drained replica to be out of every node's map).
//!
//! The maps and the hooks stay pinned (pins.rs): a new agent adopts what the maps hold, and
//! removes the previous agent's hooks only once it has applied its first watch set.

use std::{
    collections::{HashMap as Map, HashSet},
    fs::File,
    net::IpAddr,
    path::PathBuf,
};

use aya::{
    maps::{Array, HashMap, MapData},
    programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr},
    Ebpf,
};
use surge_common::{Balanced, EndpointKey, MAX_BACKENDS, MAX_SERVICES};
use surge_proto::v1::{Balancer as WireBalancer, Endpoint, WatchSet};

use crate::{
    attribution::endpoint_key,
    kernel::{loaded, take_map, KernelError},
    pins::{self, MapsFound, PinDir},
};

const PROGRAMS: [(&str, &str); 2] = [("surge_connect4", "connect4"), ("surge_connect6", "connect6")];

/// One balanced address: its block of backend slots and its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The service's name; empty for an address adopted from a previous agent's maps until the
    /// watch set names it.
    pub service: String,
    /// The block of `BACKENDS` slots: the service's id when no other address has it, and kept
    /// for as long as the address is balanced (see [`place`]).
    pub service_id: u32,
    pub backends: Vec<EndpointKey>,
    /// The agent's holder port for this service (0: none).
    pub holder_port: u16,
}

/// What the balancer should hold for a watch set, given each service's id. Services without a
/// valid service address are not balanced; backends past `MAX_BACKENDS` or with a bad address
/// are left out (and logged). A hold-only address (a Kubernetes ClusterIP) is in the maps only
/// while it has no ready backend: then its connects go to the holder; otherwise they are left
/// to the cluster's Service routing.
pub fn wanted<'a>(
    set: &WatchSet,
    ids: impl Fn(&str) -> Option<u32> + 'a,
    holder_port: impl Fn(&str) -> u16 + 'a,
) -> Map<EndpointKey, Entry> {
    let mut out = Map::new();
    for s in &set.services {
        let Some(addr) = &s.service_address else { continue };
        if s.hold_only && !s.backends.is_empty() {
            continue;
        }
        let (Ok(key), Some(id)) = (endpoint_key(&s.name, &addr.ip, addr.port), ids(&s.name)) else {
            tracing::warn!(service = %s.name, ip = %addr.ip, port = addr.port, "bad service address; not balanced");
            continue;
        };
        if id >= MAX_SERVICES {
            continue;
        }
        let backends: Vec<EndpointKey> = s
            .backends
            .iter()
            .filter_map(|b| endpoint_key(&s.name, &b.ip, b.port).ok())
            .take(MAX_BACKENDS as usize)
            .collect();
        out.insert(
            key,
            Entry {
                service: s.name.clone(),
                service_id: id,
                backends,
                holder_port: holder_port(&s.name),
            },
        );
    }
    never_twice(&mut out);
    out
}

/// While a new agent takes over, its connect hooks and the previous agent's both run on every
/// connect: the second sees the destination the first wrote. That is harmless only if no
/// destination is itself a balanced address, so such backends (and holder ports) are left out.
fn never_twice(entries: &mut Map<EndpointKey, Entry>) {
    let addrs: HashSet<EndpointKey> = entries.keys().copied().collect();
    for e in entries.values_mut() {
        e.backends.retain(|b| {
            let ok = !addrs.contains(b);
            if !ok {
                tracing::warn!(service = %e.service, backend = ?wire(b), "a backend that is a balanced service address is left out: a connect would be rewritten twice");
            }
            ok
        });
        if e.holder_port != 0 && addrs.contains(&EndpointKey::v4([127, 0, 0, 1], e.holder_port)) {
            tracing::warn!(service = %e.service, port = e.holder_port, "the holder's port is a balanced service address; not holding");
            e.holder_port = 0;
        }
    }
}

/// Gives each wanted address its block of backend slots: the block it has now, else its
/// service id if no other address keeps that block, else the lowest free one. A block never
/// changes under an address, so adopted maps (whose ids came from the previous agent) are
/// updated in place, and two addresses never share a block, even for an instant.
pub fn place(current: &Map<EndpointKey, Entry>, wanted: Map<EndpointKey, Entry>) -> Map<EndpointKey, Entry> {
    let mut used: HashSet<u32> = current
        .iter()
        .filter(|(k, _)| wanted.contains_key(k))
        .map(|(_, e)| e.service_id)
        .collect();
    let mut out = Map::new();
    let mut new = Vec::new();
    for (key, mut entry) in wanted {
        match current.get(&key) {
            Some(now) => {
                entry.service_id = now.service_id;
                out.insert(key, entry);
            }
            None => new.push((key, entry)),
        }
    }
    new.sort_by_key(|(_, e)| e.service_id);
    for (key, mut entry) in new {
        if used.contains(&entry.service_id) {
            match (0..MAX_SERVICES).find(|b| !used.contains(b)) {
                Some(b) => entry.service_id = b,
                None => {
                    tracing::warn!(service = %entry.service, "no free block of backend slots; not balanced");
                    continue;
                }
            }
        }
        used.insert(entry.service_id);
        out.insert(key, entry);
    }
    out
}

pub struct Balancer {
    addrs: HashMap<MapData, EndpointKey, Balanced>,
    backends: Array<MapData, EndpointKey>,
    current: Map<EndpointKey, Entry>,
    /// The previous agents' pinned hooks, removed once this agent has applied a watch set.
    previous_hooks: Vec<PathBuf>,
}

impl Balancer {
    /// Loads and attaches the connect programs to the cgroup root, pins the links, and takes
    /// the (pinned) maps; with `maps` reused, adopts what they hold. The previous agents' hooks
    /// stay attached until [`Balancer::apply`] first succeeds.
    pub fn attach(
        ebpf: &mut Ebpf,
        cgroup: &File,
        pins: &PinDir,
        maps: &MapsFound,
    ) -> Result<Self, KernelError> {
        let previous = pins.link_pins().map_err(KernelError::Pin)?;
        let generation = pins::next_generation(&previous);
        for (name, hook) in PROGRAMS {
            let program: &mut CgroupSockAddr = loaded(ebpf, name)?;
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(|source| KernelError::Program { name, source })?;
            let link = program
                .take_link(id)
                .map_err(|source| KernelError::Program { name, source })?;
            let link = FdLink::try_from(link).map_err(|source| KernelError::Link { name, source })?;
            let path = pins.link_path(hook, generation);
            // The pin holds the link: it stays attached when this process ends, however it ends.
            link.pin(&path)
                .map_err(|source| KernelError::PinLink { path, source })?;
        }
        let mut balancer = Self {
            addrs: take_map(ebpf, "SERVICE_ADDRS")?,
            backends: take_map(ebpf, "BACKENDS")?,
            current: Map::new(),
            previous_hooks: previous.into_iter().map(|(p, _)| p).collect(),
        };
        if *maps == MapsFound::Reused {
            balancer.adopt()?;
        }
        tracing::info!(
            generation,
            adopted = balancer.current.len(),
            previous_hooks = balancer.previous_hooks.len(),
            maps = ?maps,
            "connect hooks attached and pinned"
        );
        Ok(balancer)
    }

    /// Takes in what a previous agent left in the maps, so its addresses keep their blocks and
    /// keep routing until the watch set says otherwise. Holder ports are cleared: that agent's
    /// holders are gone, and its ports may be anyone's now.
    fn adopt(&mut self) -> Result<(), KernelError> {
        let map_err = |name: &'static str| move |source| KernelError::Map { name, source };
        let mut found = Vec::new();
        for item in self.addrs.iter() {
            found.push(item.map_err(map_err("SERVICE_ADDRS"))?);
        }
        for (key, mut b) in found {
            if b.service_id >= MAX_SERVICES || b.count > MAX_BACKENDS {
                match self.addrs.remove(&key) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err("SERVICE_ADDRS")(e)),
                }
                continue;
            }
            let mut backends = Vec::new();
            for i in 0..b.count {
                backends.push(
                    self.backends
                        .get(&(b.service_id * MAX_BACKENDS + i), 0)
                        .map_err(map_err("BACKENDS"))?,
                );
            }
            if b.holder_port != 0 {
                b.holder_port = 0;
                self.addrs.insert(key, b, 0).map_err(map_err("SERVICE_ADDRS"))?;
            }
            self.current.insert(
                key,
                Entry {
                    service: String::new(),
                    service_id: b.service_id,
                    backends,
                    holder_port: 0,
                },
            );
        }
        Ok(())
    }

    /// Detaches the previous agents' hooks (by removing their pins). Failures are logged and
    /// retried at the next apply.
    fn finish_handover(&mut self) {
        let before = self.previous_hooks.len();
        self.previous_hooks.retain(|path| match pins::unpin_link(path) {
            Ok(()) => false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a previous agent's hook; retrying later");
                true
            }
        });
        let removed = before - self.previous_hooks.len();
        if removed > 0 {
            tracing::info!(
                removed,
                "watch set applied: the previous agent's connect hooks are detached"
            );
        }
    }

    /// Makes the maps hold exactly `wanted`. Backend slots are written before the count that
    /// exposes them; a shrinking count is written first, so a connect never picks an empty slot.
    /// Then, the first time, the previous agent's hooks are detached.
    pub fn apply(&mut self, wanted: Map<EndpointKey, Entry>) -> Result<(), KernelError> {
        let wanted = place(&self.current, wanted);
        let map_err = |name: &'static str| move |source| KernelError::Map { name, source };
        for key in self.current.keys().filter(|k| !wanted.contains_key(k)) {
            match self.addrs.remove(key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err("SERVICE_ADDRS")(e)),
            }
        }
        for (key, entry) in &wanted {
            if self.current.get(key) == Some(entry) {
                continue;
            }
            let balanced = |count: usize| Balanced {
                service_id: entry.service_id,
                count: count as u32,
                next: 0,
                holder_port: entry.holder_port as u32,
            };
            let old = self
                .current
                .get(key)
                .filter(|o| o.service_id == entry.service_id)
                .map(|o| o.backends.len())
                .unwrap_or(0);
            let n = entry.backends.len();
            if n < old {
                self.addrs
                    .insert(key, balanced(n), 0)
                    .map_err(map_err("SERVICE_ADDRS"))?;
            }
            for (i, b) in entry.backends.iter().enumerate() {
                self.backends
                    .set(entry.service_id * MAX_BACKENDS + i as u32, b, 0)
                    .map_err(map_err("BACKENDS"))?;
            }
            self.addrs
                .insert(key, balanced(n), 0)
                .map_err(map_err("SERVICE_ADDRS"))?;
        }
        self.current = wanted;
        self.finish_handover();
        Ok(())
    }

    /// Stops sending connects to this agent's holders, which end with it: an address with no
    /// ready backend is left alone from now on (a ClusterIP goes to kube-proxy again) until the
    /// next agent holds it. Called as the agent exits; the maps and hooks stay pinned.
    pub fn release_holders(&mut self) -> Result<(), KernelError> {
        for (key, entry) in self.current.iter_mut() {
            if entry.holder_port == 0 {
                continue;
            }
            entry.holder_port = 0;
            let b = Balanced {
                service_id: entry.service_id,
                count: entry.backends.len() as u32,
                next: 0,
                holder_port: 0,
            };
            self.addrs.insert(key, b, 0).map_err(|source| KernelError::Map {
                name: "SERVICE_ADDRS",
                source,
            })?;
        }
        Ok(())
    }

    /// What the kernel maps hold now, for the scaler.
    pub fn read(&self) -> Result<Vec<WireBalancer>, KernelError> {
        let mut out = Vec::new();
        // Adopted addresses are reported once the watch set names their service.
        for (key, entry) in self.current.iter().filter(|(_, e)| !e.service.is_empty()) {
            let b = match self.addrs.get(key, 0) {
                Ok(b) => b,
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(source) => {
                    return Err(KernelError::Map {
                        name: "SERVICE_ADDRS",
                        source,
                    })
                }
            };
            let mut backends = Vec::new();
            for i in 0..b.count.min(MAX_BACKENDS) {
                let k = self
                    .backends
                    .get(&(b.service_id * MAX_BACKENDS + i), 0)
                    .map_err(|source| KernelError::Map {
                        name: "BACKENDS",
                        source,
                    })?;
                backends.push(wire(&k));
            }
            out.push(WireBalancer {
                service: entry.service.clone(),
                address: Some(wire(key)),
                backends,
            });
        }
        Ok(out)
    }
}

/// An endpoint key as text: IPv4-mapped addresses as IPv4.
pub fn wire(k: &EndpointKey) -> Endpoint {
    let v6 = std::net::Ipv6Addr::from(k.addr);
    let ip: IpAddr = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    Endpoint {
        ip: ip.to_string(),
        port: k.port as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use surge_proto::v1::WatchedService;

    fn ep(ip: &str, port: u32) -> Endpoint {
        Endpoint { ip: ip.into(), port }
    }

    #[test]
    fn only_services_with_an_address_are_balanced() {
        let set = WatchSet {
            generation: 1,
            services: vec![
                WatchedService {
                    name: "web".into(),
                    service_address: Some(ep("127.0.0.1", 8000)),
                    backends: vec![ep("127.0.0.1", 9001), ep("127.0.0.1", 9002), ep("nope", 1)],
                    ..Default::default()
                },
                WatchedService {
                    name: "plain".into(),
                    ..Default::default()
                },
            ],
        };
        let w = wanted(&set, |n| (n == "web").then_some(3), |_| 0);
        assert_eq!(w.len(), 1);
        let (key, entry) = w.iter().next().expect("one");
        assert_eq!(*key, EndpointKey::v4([127, 0, 0, 1], 8000));
        assert_eq!(entry.service_id, 3);
        assert_eq!(
            entry.backends.iter().map(wire).collect::<Vec<_>>(),
            vec![ep("127.0.0.1", 9001), ep("127.0.0.1", 9002)]
        );
    }

    #[test]
    fn a_hold_only_address_is_balanced_only_while_it_has_no_backend() {
        let cold = WatchedService {
            name: "ns/web".into(),
            service_address: Some(ep("10.0.0.7", 80)),
            hold_only: true,
            ..Default::default()
        };
        let warm = WatchedService {
            backends: vec![ep("10.2.0.1", 8080)],
            ..cold.clone()
        };
        let set = |s: &WatchedService| WatchSet {
            generation: 1,
            services: vec![s.clone()],
        };
        let w = wanted(&set(&cold), |_| Some(1), |_| 7000);
        let entry = &w[&EndpointKey::v4([10, 0, 0, 7], 80)];
        assert_eq!((entry.backends.len(), entry.holder_port), (0, 7000));
        assert!(wanted(&set(&warm), |_| Some(1), |_| 7000).is_empty());
    }

    fn entry(service: &str, block: u32) -> Entry {
        Entry {
            service: service.into(),
            service_id: block,
            backends: vec![EndpointKey::v4([127, 0, 0, 1], 9000 + block as u16)],
            holder_port: 0,
        }
    }

    #[test]
    fn an_address_keeps_its_block_and_new_ones_never_share_one() {
        let (a, b, c) = (
            EndpointKey::v4([127, 0, 0, 1], 1),
            EndpointKey::v4([127, 0, 0, 1], 2),
            EndpointKey::v4([127, 0, 0, 1], 3),
        );
        // Adopted from a previous agent: a in block 1, b in block 0.
        let current = Map::from([(a, entry("", 1)), (b, entry("", 0))]);
        // This agent numbered the services the other way round, and c takes id 0 too.
        let wanted = Map::from([(a, entry("a", 0)), (b, entry("b", 1)), (c, entry("c", 0))]);
        let placed = place(&current, wanted);
        let blocks: Vec<(u16, u32)> = {
            let mut v: Vec<_> = placed.iter().map(|(k, e)| (k.port, e.service_id)).collect();
            v.sort();
            v
        };
        assert_eq!(blocks, vec![(1, 1), (2, 0), (3, 2)]);
        assert_eq!(placed[&a].service, "a");

        // Once b is gone its block is free for the next new address.
        let d = EndpointKey::v4([127, 0, 0, 1], 4);
        let wanted = Map::from([(a, entry("a", 0)), (c, entry("c", 0)), (d, entry("d", 5))]);
        let placed = place(&placed, wanted);
        assert_eq!(
            (
                placed[&a].service_id,
                placed[&c].service_id,
                placed[&d].service_id
            ),
            (1, 2, 5)
        );
    }

    #[test]
    fn a_destination_that_is_itself_balanced_is_left_out() {
        let set = WatchSet {
            generation: 1,
            services: vec![
                WatchedService {
                    name: "front".into(),
                    service_address: Some(ep("127.0.0.1", 8000)),
                    backends: vec![ep("127.0.0.1", 8001), ep("127.0.0.1", 9001)],
                    ..Default::default()
                },
                WatchedService {
                    name: "back".into(),
                    service_address: Some(ep("127.0.0.1", 8001)),
                    backends: vec![ep("127.0.0.1", 9002)],
                    ..Default::default()
                },
            ],
        };
        let holder = |n: &str| if n == "back" { 8000 } else { 7000 };
        let ids = |n: &str| Some(if n == "front" { 0 } else { 1 });
        let w = wanted(&set, ids, holder);
        let front = &w[&EndpointKey::v4([127, 0, 0, 1], 8000)];
        assert_eq!(
            front.backends.iter().map(wire).collect::<Vec<_>>(),
            vec![ep("127.0.0.1", 9001)]
        );
        assert_eq!(front.holder_port, 7000);
        assert_eq!(w[&EndpointKey::v4([127, 0, 0, 1], 8001)].holder_port, 0);
    }
}
