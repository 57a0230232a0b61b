//! The agent's view of its node: the attribution of endpoints and cgroups to services, and the
//! kernel maps that implement it, changed together.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
};

use surge_proto::v1::{ServiceCounters as WireCounters, WatchSet};

use crate::{
    attribution::{Attribution, AttributionError},
    backends, cgroups,
    kernel::{KernelError, KernelProbe},
    report,
};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid watch set: {0}")]
    Attribution(#[from] AttributionError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

pub struct Node {
    probe: KernelProbe,
    attribution: Attribution,
    cgroup_root: PathBuf,
    /// Each service's cgroup directories, as the scaler gave them, resolved.
    service_cgroups: BTreeMap<String, Vec<PathBuf>>,
    /// Cgroup ids now in the kernel's CGROUPS map.
    cgroup_ids: HashMap<u64, u32>,
}

impl Node {
    pub fn new(probe: KernelProbe, cgroup_root: PathBuf) -> Self {
        Self {
            probe,
            attribution: Attribution::default(),
            cgroup_root,
            service_cgroups: BTreeMap::new(),
            cgroup_ids: HashMap::new(),
        }
    }

    /// The sk_lookup program's socket map, for the holders (once).
    pub fn take_steering(&mut self) -> Option<crate::steer::Steering> {
        self.probe.steering.take()
    }

    /// Makes the kernel watch exactly `set`. An invalid set is rejected whole and the previous
    /// one stays in force.
    /// `holder_ports`: the agent's holder port of each balanced service (see holding.rs).
    pub fn apply(&mut self, set: &WatchSet, holder_ports: &HashMap<String, u16>) -> Result<(), NodeError> {
        let plan = self.attribution.plan(set)?;
        for (_, id) in &plan.new_services {
            self.probe.reset(*id)?;
        }
        for key in &plan.remove_endpoints {
            self.probe.unwatch(key)?;
        }
        for (key, id) in &plan.upsert_endpoints {
            self.probe.watch(*key, *id)?;
        }
        for (name, id) in &plan.new_services {
            tracing::info!(service = %name, id, "watching service");
        }
        for (name, id) in &plan.removed_services {
            tracing::info!(service = %name, id, "no longer watching service");
        }
        self.attribution.apply(&plan);
        self.service_cgroups = set
            .services
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.cgroups
                        .iter()
                        .map(|c| cgroups::resolve(&self.cgroup_root, c))
                        .collect(),
                )
            })
            .collect();
        self.refresh_cgroups()?;
        let ids: HashMap<String, u32> = self
            .attribution
            .services()
            .map(|(n, id)| (n.to_string(), id))
            .collect();
        self.probe.balancer.apply(backends::wanted(
            set,
            |n| ids.get(n).copied(),
            |n| holder_ports.get(n).copied().unwrap_or(0),
        ))?;
        Ok(())
    }

    /// No connect goes to this agent's holders any more (see `Balancer::release_holders`).
    pub fn release_holders(&mut self) -> Result<(), NodeError> {
        Ok(self.probe.balancer.release_holders()?)
    }

    /// What the kernel's load balancer holds now.
    pub fn balancers(&self) -> Result<Vec<surge_proto::v1::Balancer>, NodeError> {
        Ok(self.probe.balancer.read()?)
    }

    /// Brings the kernel's cgroup map in line with the cgroup tree now: replicas come and go, and
    /// their children (containers) appear after them.
    fn refresh_cgroups(&mut self) -> Result<(), NodeError> {
        let ids: HashMap<&str, u32> = self.attribution.services().collect();
        let mut wanted = HashMap::new();
        for (service, dirs) in &self.service_cgroups {
            let Some(&sid) = ids.get(service.as_str()) else {
                continue;
            };
            for d in dirs {
                for cg in cgroups::ids_with_descendants(d) {
                    wanted.insert(cg, sid);
                }
            }
        }
        for (cg, _) in self.cgroup_ids.iter().filter(|(cg, _)| !wanted.contains_key(cg)) {
            self.probe.unwatch_cgroup(*cg)?;
        }
        for (cg, sid) in &wanted {
            if self.cgroup_ids.get(cg) != Some(sid) {
                self.probe.watch_cgroup(*cg, *sid)?;
            }
        }
        self.cgroup_ids = wanted;
        Ok(())
    }

    /// Reads every watched service's counters; `now` is called right after the reads, so the
    /// in-flight integral is evaluated at the instant they were taken.
    pub fn read_all(&mut self, now: impl FnOnce() -> u64) -> Result<(u64, Vec<WireCounters>), NodeError> {
        self.refresh_cgroups()?;
        let mut raw = Vec::new();
        for (name, id) in self.attribution.services() {
            raw.push((name.to_string(), self.probe.read(id)?));
        }
        let t = now();
        let memory = |name: &str| -> u64 {
            self.service_cgroups
                .get(name)
                .map(|dirs| dirs.iter().map(|d| cgroups::memory_bytes(d)).sum())
                .unwrap_or(0)
        };
        Ok((
            t,
            raw.iter()
                .map(|(n, c)| report::to_wire(n, c, memory(n), t))
                .collect(),
        ))
    }
}
