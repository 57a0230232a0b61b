//! The local actuator: a whole scaling system on one machine. Each replica of a service is a
//! child process on a free loopback port, in its own cgroup (`surge/grpc-<scaler's gRPC
//! port>/<service>/<replica>` under the cgroup v2 root, so the agent attributes its CPU and two
//! scalers on one machine never touch each other's replicas), probed for readiness, restarted with
//! backoff when it dies. Clients connect to the service address; the agent's connect hook sends
//! each connection to a ready replica (round robin), so no proxy is in the path. Scale-down
//! drains: out of rotation first, connections finish (bounded), then SIGTERM, then SIGKILL.

pub mod board;
pub mod config;
pub mod netns;
pub mod os;
pub mod probe;
mod replica;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use serde::Serialize;
use surge_policy::Replicas;
use tokio::{sync::watch, task::JoinHandle};

pub use board::Board;
pub use config::LocalSpec;

use crate::{
    actuator::{Actuator, ActuatorError},
    catalog::Balance,
    state::Shared,
};

/// Where a replica is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// Started, not yet passing its readiness probe (or failing it after having passed).
    Starting,
    /// Passing its probe: in the kernel's rotation.
    Ready,
    /// Failed (exited, or never ready): waiting before the next start.
    Backoff,
    /// Out of rotation, finishing its connections.
    Draining,
    /// Sent SIGTERM (then SIGKILL after the grace period).
    Stopping,
}

/// What the API shows of one replica.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaStatus {
    pub name: String,
    pub state: ReplicaState,
    pub addr: Option<SocketAddr>,
    pub pid: Option<u32>,
    /// The replica's cgroup, relative to the cgroup v2 root.
    pub cgroup: Option<String>,
    /// Starts so far (1 + restarts).
    pub starts: u32,
    pub restarts: u32,
    /// Why it last failed: the exit status, or the readiness probe's error.
    pub last_error: Option<String>,
}

/// How a replica is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Scale-down: leave rotation, drain, SIGTERM, SIGKILL.
    Drain,
    /// Scaler shutdown: SIGTERM, then SIGKILL after the grace period.
    Now,
}

struct Handle {
    status: ReplicaStatus,
    stop: watch::Sender<Option<Stop>>,
    task: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct State {
    desired: u32,
    next_id: u32,
    replicas: BTreeMap<u32, Handle>,
    shut_down: bool,
    /// Address blocks of the network-namespace subnet in use.
    slots: std::collections::BTreeSet<u32>,
}

pub(crate) struct Service {
    name: String,
    spec: LocalSpec,
    /// The service's cgroup directory (absolute) and its path relative to the cgroup root.
    cgroup: Option<(PathBuf, String)>,
    shared: Arc<Shared>,
    state: Mutex<State>,
}

impl Service {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes a replica's status and republishes the service.
    fn update(&self, id: u32, f: impl FnOnce(&mut ReplicaStatus)) {
        if let Some(h) = self.lock().replicas.get_mut(&id) {
            f(&mut h.status);
        }
        self.publish();
    }

    /// The lowest free address block below `blocks`.
    fn alloc_slot(&self, blocks: u32) -> Option<u32> {
        let mut st = self.lock();
        let slot = (0..blocks).find(|s| !st.slots.contains(s))?;
        st.slots.insert(slot);
        Some(slot)
    }

    fn free_slot(&self, slot: u32) {
        self.lock().slots.remove(&slot);
    }

    /// A replica's task ended: it is gone.
    fn finished(&self, id: u32) {
        self.lock().replicas.remove(&id);
        self.publish();
    }

    /// Publishes the ready replicas (the kernel's rotation), every live replica's endpoint (the
    /// agents measure them as the service) and the replicas' status for the API.
    fn publish(&self) {
        let (balance, desired, statuses) = {
            let st = self.lock();
            let statuses: Vec<ReplicaStatus> = st.replicas.values().map(|h| h.status.clone()).collect();
            let balance = balance(
                self.spec.service_address,
                &statuses,
                self.cgroup.as_ref().map(|(_, rel)| rel.as_str()),
            );
            (balance, st.desired, statuses)
        };
        self.shared.local.set_replicas(&self.name, desired, statuses);
        self.shared.catalog.set_balance(&self.name, balance);
    }

    /// Asks for `n` replicas: starts new ones, or drains the least useful (not ready first,
    /// then the newest).
    fn scale(self: &Arc<Self>, n: u32) {
        {
            let mut st = self.lock();
            if st.shut_down {
                return;
            }
            st.desired = n;
            let mut active: Vec<(u32, bool)> = st
                .replicas
                .iter()
                .filter(|(_, h)| h.stop.borrow().is_none())
                .map(|(id, h)| (*id, h.status.state == ReplicaState::Ready))
                .collect();
            while (active.len() as u32) < n {
                let id = st.next_id;
                st.next_id += 1;
                let (stop, stop_rx) = watch::channel(None);
                let status = ReplicaStatus {
                    name: format!("{}-{id}", self.name),
                    state: ReplicaState::Starting,
                    addr: None,
                    pid: None,
                    cgroup: None,
                    starts: 0,
                    restarts: 0,
                    last_error: None,
                };
                let task = tokio::spawn(replica::run(Arc::clone(self), id, stop_rx));
                st.replicas.insert(
                    id,
                    Handle {
                        status,
                        stop,
                        task: Some(task),
                    },
                );
                active.push((id, false));
            }
            for id in victims(active, n) {
                if let Some(h) = st.replicas.get_mut(&id) {
                    h.stop.send_replace(Some(Stop::Drain));
                    h.status.state = ReplicaState::Draining;
                    tracing::info!(service = %self.name, replica = %h.status.name, "draining replica");
                }
            }
        }
        self.publish();
    }

    fn replicas(&self) -> Replicas {
        let st = self.lock();
        let ready = st
            .replicas
            .values()
            .filter(|h| h.stop.borrow().is_none() && h.status.state == ReplicaState::Ready)
            .count() as u32;
        Replicas {
            current: st.desired,
            ready,
        }
    }

    /// Stops every replica at once (SIGTERM, then SIGKILL) and waits for them.
    async fn shutdown(&self) {
        let tasks: Vec<JoinHandle<()>> = {
            let mut st = self.lock();
            st.shut_down = true;
            st.replicas
                .values_mut()
                .filter_map(|h| {
                    h.stop.send_replace(Some(Stop::Now));
                    h.task.take()
                })
                .collect()
        };
        for t in tasks {
            let _ = t.await;
        }
        if let Some((dir, _)) = &self.cgroup {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Which of the active replicas (id, ready) to drain to keep `n`: the least useful, that is
/// replicas not ready before ready ones, newer before older.
fn victims(mut active: Vec<(u32, bool)>, n: u32) -> Vec<u32> {
    active.sort_by_key(|(id, ready)| (!*ready, *id));
    active.iter().skip(n as usize).map(|(id, _)| *id).collect()
}

/// What the agents get for a service: ready replicas in rotation, every live replica measured.
fn balance(service_address: SocketAddr, replicas: &[ReplicaStatus], cgroup: Option<&str>) -> Balance {
    Balance {
        service_address: Some(service_address),
        backends: replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Ready)
            .filter_map(|r| r.addr)
            .collect(),
        endpoints: replicas
            .iter()
            .filter(|r| r.state != ReplicaState::Backoff)
            .filter_map(|r| r.addr)
            .collect(),
        cgroups: cgroup.iter().map(|c| c.to_string()).collect(),
        hold_only: false,
    }
}

/// The local actuator of every `actuator: local` service.
pub struct LocalActuator {
    services: BTreeMap<String, Arc<Service>>,
    cgroup_root: Option<PathBuf>,
}

impl LocalActuator {
    /// Prepares the services and starts each one's initial replicas.
    pub fn start(
        shared: Arc<Shared>,
        specs: BTreeMap<String, LocalSpec>,
        initial: &BTreeMap<String, u32>,
        instance: &str,
    ) -> Self {
        let cgroup_root = std::fs::read_to_string("/proc/mounts")
            .ok()
            .and_then(|m| os::cgroup2_root(&m));
        if cgroup_root.is_none() && !specs.is_empty() {
            tracing::warn!("no cgroup v2 mount in /proc/mounts: replicas run without their own cgroups, so their CPU is not measured");
        }
        let mut services = BTreeMap::new();
        for (name, spec) in specs {
            let cgroup = cgroup_root.as_ref().and_then(|root| {
                let rel = format!("surge/{instance}/{name}");
                let dir = root.join(&rel);
                // Directories left by a scaler that died: empty ones go (busy ones stay).
                if let Ok(entries) = std::fs::read_dir(&dir) {
                    for e in entries.flatten() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
                match std::fs::create_dir_all(&dir) {
                    Ok(()) => Some((dir, rel)),
                    Err(e) => {
                        tracing::warn!(service = %name, cgroup = %dir.display(), error = %e, "cannot create the service's cgroup; its replicas run without one");
                        None
                    }
                }
            });
            let svc = Arc::new(Service {
                name: name.clone(),
                spec,
                cgroup,
                shared: Arc::clone(&shared),
                state: Mutex::new(State::default()),
            });
            svc.scale(initial.get(&name).copied().unwrap_or(1));
            services.insert(name, svc);
        }
        Self {
            services,
            cgroup_root,
        }
    }

    /// Stops every replica of every service and removes their cgroups; nothing is left running.
    pub async fn shutdown(&self) {
        let all: Vec<_> = self.services.values().map(|s| s.shutdown()).collect();
        for f in all {
            f.await;
        }
        // This scaler's directory (surge/grpc-<port>), then surge/ itself, when empty.
        for svc in self.services.values() {
            if let Some(instance_dir) = svc.cgroup.as_ref().and_then(|(dir, _)| dir.parent()) {
                let _ = std::fs::remove_dir(instance_dir);
            }
        }
        if let Some(root) = &self.cgroup_root {
            let _ = std::fs::remove_dir(root.join("surge"));
        }
    }

    fn service(&self, name: &str) -> Result<&Arc<Service>, ActuatorError> {
        self.services
            .get(name)
            .ok_or_else(|| ActuatorError::UnknownService { service: name.into() })
    }
}

/// How long a scale-down waits for every agent to drop a replica from its kernel map.
pub const ROTATION_WAIT: Duration = Duration::from_secs(3);

#[tonic::async_trait]
impl Actuator for LocalActuator {
    async fn replicas(&self, service: &str) -> Result<Replicas, ActuatorError> {
        Ok(self.service(service)?.replicas())
    }

    async fn scale(&self, service: &str, replicas: u32) -> Result<(), ActuatorError> {
        self.service(service)?.scale(replicas);
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "local"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_down_drains_the_not_ready_then_the_newest() {
        let active = vec![(0, true), (1, true), (2, false), (3, true)];
        assert_eq!(victims(active.clone(), 4), Vec::<u32>::new());
        assert_eq!(victims(active.clone(), 3), vec![2]);
        assert_eq!(victims(active.clone(), 1), vec![1, 3, 2]);
        assert_eq!(victims(active, 0), vec![0, 1, 3, 2]);
    }

    #[test]
    fn only_ready_replicas_are_in_rotation_and_live_ones_are_measured() {
        let r = |id: u16, state| ReplicaStatus {
            name: format!("web-{id}"),
            state,
            addr: Some(SocketAddr::from(([127, 0, 0, 1], 9000 + id))),
            pid: None,
            cgroup: None,
            starts: 1,
            restarts: 0,
            last_error: None,
        };
        let replicas = [
            r(0, ReplicaState::Ready),
            r(1, ReplicaState::Starting),
            r(2, ReplicaState::Draining),
            r(3, ReplicaState::Backoff),
            r(4, ReplicaState::Ready),
        ];
        let svc: SocketAddr = "127.0.0.1:8000".parse().expect("addr");
        let b = balance(svc, &replicas, Some("surge/web"));
        let port = |a: &SocketAddr| a.port();
        assert_eq!(b.service_address, Some(svc));
        assert_eq!(b.backends.iter().map(port).collect::<Vec<_>>(), vec![9000, 9004]);
        assert_eq!(
            b.endpoints.iter().map(port).collect::<Vec<_>>(),
            vec![9000, 9001, 9002, 9004]
        );
        assert_eq!(b.cgroups, vec!["surge/web".to_string()]);
    }
}
