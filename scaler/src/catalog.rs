//! The services the scaler knows: their names and endpoints, and the watch set every agent gets.
//! A change is published on a watch channel, so each agent stream pushes it at once.

use std::{net::SocketAddr, time::Duration};

use serde::Serialize;
use surge_proto::v1::{Endpoint, WatchSet, WatchedService};
use tokio::sync::watch;

/// Where a service's replica count goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Measured and reported; a policy, if any, only recommends (a dry run).
    Observe,
    /// An in-memory target whose replicas become ready after `startup` (tests, dry runs).
    Simulated,
    /// Processes on this machine, balanced in the kernel at connect (the local actuator).
    Local,
}

/// What an actuator adds to a service's watch entry: the address clients use, the replicas
/// ready to serve (in rotation), and every live replica's endpoint and cgroup (measured).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Balance {
    pub service_address: Option<SocketAddr>,
    pub backends: Vec<SocketAddr>,
    pub endpoints: Vec<SocketAddr>,
    pub cgroups: Vec<String>,
    /// The address is only held while no backend is ready (a Kubernetes Service's ClusterIP,
    /// which kube-proxy routes once it has endpoints); otherwise the agents balance it too.
    pub hold_only: bool,
}

/// Resources one replica asks for: the denominators of `Utilization` triggers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Requests {
    /// CPU cores per replica.
    pub cpu_cores: Option<f64>,
    /// Memory bytes per replica.
    pub memory_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceSpec {
    pub name: String,
    pub endpoints: Vec<SocketAddr>,
    /// cgroup v2 directories of the service's processes (absolute, or relative to the cgroup
    /// root on each node): CPU and memory are measured for them and their descendants.
    pub cgroups: Vec<String>,
    pub mode: Mode,
    /// The policy (by name, from the policy directory) that decides its replicas.
    pub policy: Option<String>,
    /// Start-up delay of a simulated replica.
    #[serde(skip)]
    pub startup: Duration,
    /// Replicas at start (simulated targets).
    #[serde(skip)]
    pub initial_replicas: u32,
    pub requests: Requests,
}

pub struct Catalog {
    specs: std::sync::RwLock<Vec<ServiceSpec>>,
    watch_tx: watch::Sender<WatchSet>,
    /// The local actuator's additions, by service.
    balance: std::sync::Mutex<std::collections::BTreeMap<String, Balance>>,
}

impl Catalog {
    pub fn new(specs: Vec<ServiceSpec>) -> Self {
        let set = watch_set(&specs, &Default::default(), 1);
        let (watch_tx, _) = watch::channel(set);
        Self {
            specs: std::sync::RwLock::new(specs),
            watch_tx,
            balance: Default::default(),
        }
    }

    /// The declared services, in declaration order.
    pub fn specs(&self) -> Vec<ServiceSpec> {
        self.specs.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// A receiver that always holds the current watch set.
    pub fn subscribe(&self) -> watch::Receiver<WatchSet> {
        self.watch_tx.subscribe()
    }

    /// Replaces the declared services and publishes the new watch set to every agent.
    pub fn replace(&self, specs: Vec<ServiceSpec>) {
        let generation = self.watch_tx.borrow().generation + 1;
        let balance = self.balance.lock().map(|b| b.clone()).unwrap_or_default();
        self.watch_tx
            .send_replace(watch_set(&specs, &balance, generation));
        if let Ok(mut s) = self.specs.write() {
            *s = specs;
        }
    }

    /// Sets what the local actuator adds to a service and publishes the new watch set if it
    /// changed. Returns the generation that carries it.
    pub fn set_balance(&self, service: &str, b: Balance) -> u64 {
        let mut all = self.balance.lock().unwrap_or_else(|e| e.into_inner());
        if all.get(service) == Some(&b) {
            return self.watch_tx.borrow().generation;
        }
        all.insert(service.to_string(), b);
        let generation = self.watch_tx.borrow().generation + 1;
        self.watch_tx
            .send_replace(watch_set(&self.specs(), &all, generation));
        generation
    }

    /// The local actuator's additions to a service, as published.
    pub fn balance(&self, service: &str) -> Option<Balance> {
        self.balance.lock().ok()?.get(service).cloned()
    }

    /// Forgets what an actuator added to a service, publishing the new watch set if it had any.
    pub fn clear_balance(&self, service: &str) {
        let mut all = self.balance.lock().unwrap_or_else(|e| e.into_inner());
        if all.remove(service).is_none() {
            return;
        }
        let generation = self.watch_tx.borrow().generation + 1;
        self.watch_tx
            .send_replace(watch_set(&self.specs(), &all, generation));
    }
}

fn endpoint(e: &SocketAddr) -> Endpoint {
    Endpoint {
        ip: e.ip().to_string(),
        port: e.port() as u32,
    }
}

fn watch_set(
    specs: &[ServiceSpec],
    balance: &std::collections::BTreeMap<String, Balance>,
    generation: u64,
) -> WatchSet {
    WatchSet {
        generation,
        services: specs
            .iter()
            .map(|s| {
                let b = balance.get(&s.name).cloned().unwrap_or_default();
                WatchedService {
                    name: s.name.clone(),
                    endpoints: s.endpoints.iter().chain(&b.endpoints).map(endpoint).collect(),
                    cgroups: s.cgroups.iter().chain(&b.cgroups).cloned().collect(),
                    service_address: b.service_address.as_ref().map(endpoint),
                    backends: b.backends.iter().map(endpoint).collect(),
                    hold_only: b.hold_only,
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacing_publishes_a_newer_generation() {
        let c = Catalog::new(vec![]);
        let rx = c.subscribe();
        assert_eq!(rx.borrow().generation, 1);
        c.replace(vec![ServiceSpec {
            name: "web".into(),
            endpoints: vec!["127.0.0.1:8080".parse().expect("literal")],
            cgroups: vec![],
            mode: Mode::Observe,
            policy: None,
            startup: Duration::ZERO,
            initial_replicas: 0,
            requests: Requests::default(),
        }]);
        let set = rx.borrow().clone();
        assert_eq!(set.generation, 2);
        assert_eq!(
            set.services[0].endpoints[0],
            Endpoint {
                ip: "127.0.0.1".into(),
                port: 8080
            }
        );
    }
}
