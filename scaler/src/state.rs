//! What the scaler's tasks share: the catalog of services, the merged metrics, the clock, and the
//! feed that tells consumers about each merge.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use crate::{catalog::Catalog, clock::Clock, control::StatusBoard, feed::Feed, ingest::Ingest};

pub struct Shared {
    pub catalog: Catalog,
    ingest: Mutex<Ingest>,
    pub clock: Arc<dyn Clock>,
    /// Told after every merged report; consumers (Subscribe, KEDA) listen.
    pub feed: Feed,
    /// What the control loop last did for each service with a policy.
    pub control: StatusBoard,
    /// The local actuator's replicas and the agents' kernel load balancers.
    pub local: crate::local::Board,
}

impl Shared {
    pub fn new(catalog: Catalog, clock: Arc<dyn Clock>, stale_after: Duration) -> Self {
        Self {
            catalog,
            ingest: Mutex::new(Ingest::new(stale_after)),
            clock,
            feed: Feed::default(),
            control: StatusBoard::default(),
            local: Default::default(),
        }
    }

    /// The merged metrics. Held only for short, non-async sections.
    pub fn ingest(&self) -> MutexGuard<'_, Ingest> {
        // A panic while holding the lock leaves consistent data (every update is one call).
        self.ingest.lock().unwrap_or_else(|e| e.into_inner())
    }
}
