//! The connect-time load balancer seen from userspace: attaches the connect4/connect6 programs,
//! writes each balanced service address and its ready backends into the kernel maps, and reads
//! them back for the scaler (which waits for a drained replica to be out of every node's map).

use std::{collections::HashMap as Map, fs::File, net::IpAddr};

use aya::{
    maps::{Array, HashMap, MapData},
    programs::{CgroupAttachMode, CgroupSockAddr},
    Ebpf,
};
use surge_common::{Balanced, EndpointKey, MAX_BACKENDS, MAX_SERVICES};
use surge_proto::v1::{Balancer as WireBalancer, Endpoint, WatchSet};

use crate::{
    attribution::endpoint_key,
    kernel::{loaded, take_map, KernelError},
};

const PROGRAMS: [&str; 2] = ["surge_connect4", "surge_connect6"];

/// One balanced address: the service's id (its block of backend slots) and its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub service: String,
    pub service_id: u32,
    pub backends: Vec<EndpointKey>,
    /// The agent's holder port for this service (0: none).
    pub holder_port: u16,
}

/// What the balancer should hold for a watch set, given each service's id. Services without a
/// valid service address are not balanced; backends past `MAX_BACKENDS` or with a bad address
/// are left out (and logged).
pub fn wanted<'a>(
    set: &WatchSet,
    ids: impl Fn(&str) -> Option<u32> + 'a,
    holder_port: impl Fn(&str) -> u16 + 'a,
) -> Map<EndpointKey, Entry> {
    let mut out = Map::new();
    for s in &set.services {
        let Some(addr) = &s.service_address else { continue };
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
    out
}

pub struct Balancer {
    addrs: HashMap<MapData, EndpointKey, Balanced>,
    backends: Array<MapData, EndpointKey>,
    current: Map<EndpointKey, Entry>,
}

impl Balancer {
    /// Loads and attaches the connect programs to the cgroup root and takes their maps.
    pub fn attach(ebpf: &mut Ebpf, cgroup: &File) -> Result<Self, KernelError> {
        for name in PROGRAMS {
            let program: &mut CgroupSockAddr = loaded(ebpf, name)?;
            program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(|source| KernelError::Program { name, source })?;
        }
        Ok(Self {
            addrs: take_map(ebpf, "SERVICE_ADDRS")?,
            backends: take_map(ebpf, "BACKENDS")?,
            current: Map::new(),
        })
    }

    /// Makes the maps hold exactly `wanted`. Backend slots are written before the count that
    /// exposes them; a shrinking count is written first, so a connect never picks an empty slot.
    pub fn apply(&mut self, wanted: Map<EndpointKey, Entry>) -> Result<(), KernelError> {
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
        Ok(())
    }

    /// What the kernel maps hold now, for the scaler.
    pub fn read(&self) -> Result<Vec<WireBalancer>, KernelError> {
        let mut out = Vec::new();
        for (key, entry) in &self.current {
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
}
