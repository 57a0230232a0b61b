//! The agent's view of its node: the attribution of endpoints to services and the kernel maps
//! that implement it, changed together.

use surge_proto::v1::{ServiceCounters as WireCounters, WatchSet};

use crate::{
    attribution::{Attribution, AttributionError},
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
}

impl Node {
    pub fn new(probe: KernelProbe) -> Self {
        Self {
            probe,
            attribution: Attribution::default(),
        }
    }

    /// Makes the kernel watch exactly `set`. An invalid set is rejected whole and the previous
    /// one stays in force.
    pub fn apply(&mut self, set: &WatchSet) -> Result<(), NodeError> {
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
        Ok(())
    }

    /// Reads every watched service's counters; `now` is called right after the reads, so the
    /// in-flight integral is evaluated at the instant they were taken.
    pub fn read_all(&self, now: impl FnOnce() -> u64) -> Result<(u64, Vec<WireCounters>), NodeError> {
        let mut raw = Vec::new();
        for (name, id) in self.attribution.services() {
            raw.push((name.to_string(), self.probe.read(id)?));
        }
        let t = now();
        Ok((t, raw.iter().map(|(n, c)| report::to_wire(n, c, t)).collect()))
    }
}
