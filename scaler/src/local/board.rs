//! What the local actuator shows: each service's replicas, and what every agent's kernel load
//! balancer holds (read back from the map with each report), so a drained replica is known to be
//! out of rotation everywhere and tests can compare the two views.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use serde::Serialize;
use surge_proto::v1::Balancer;

use super::ReplicaStatus;

/// A node's readback older than this no longer holds back a drain.
const FRESH: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Board(Mutex<Inner>);

#[derive(Default)]
struct Inner {
    services: BTreeMap<String, (u32, Vec<ReplicaStatus>)>,
    /// node → (when, service → backends in the kernel map).
    nodes: BTreeMap<String, (Duration, BTreeMap<String, Vec<String>>)>,
}

/// The API's view of a local service.
#[derive(Debug, Clone, Serialize)]
pub struct LocalView {
    pub desired: u32,
    pub replicas: Vec<ReplicaStatus>,
    /// Per node: the backends its kernel map holds for the service, in slot order.
    pub kernel_backends: BTreeMap<String, Vec<String>>,
}

impl Board {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_replicas(&self, service: &str, desired: u32, replicas: Vec<ReplicaStatus>) {
        self.lock()
            .services
            .insert(service.to_string(), (desired, replicas));
    }

    /// Records what a node's kernel load balancer holds (from its report).
    pub fn record(&self, node: &str, balancers: &[Balancer], now: Duration) {
        let map = balancers
            .iter()
            .map(|b| {
                (
                    b.service.clone(),
                    b.backends
                        .iter()
                        .filter_map(|e| {
                            e.ip.parse()
                                .ok()
                                .map(|ip| SocketAddr::new(ip, e.port as u16).to_string())
                        })
                        .collect(),
                )
            })
            .collect();
        self.lock().nodes.insert(node.to_string(), (now, map));
    }

    /// Whether no node that reported recently still has `addr` in `service`'s rotation.
    pub fn out_of_rotation(&self, service: &str, addr: SocketAddr, now: Duration) -> bool {
        let addr = addr.to_string();
        self.lock().nodes.values().all(|(at, map)| {
            now.saturating_sub(*at) > FRESH || !map.get(service).is_some_and(|b| b.contains(&addr))
        })
    }

    pub fn view(&self, service: &str) -> Option<LocalView> {
        let inner = self.lock();
        let (desired, replicas) = inner.services.get(service)?.clone();
        let kernel_backends = inner
            .nodes
            .iter()
            .map(|(node, (_, map))| (node.clone(), map.get(service).cloned().unwrap_or_default()))
            .collect();
        Some(LocalView {
            desired,
            replicas,
            kernel_backends,
        })
    }
}
