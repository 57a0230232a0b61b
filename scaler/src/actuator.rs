//! Where replica counts go. The control loop only knows this interface: the local actuator
//! (processes on this machine), Kubernetes (`/scale`), a simulation, or nothing at all.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use surge_policy::Replicas;

use crate::clock::Clock;

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ActuatorError {
    #[error("service {service:?} has no scale target in this actuator")]
    UnknownService { service: String },
    #[error("scaling {service:?} to {replicas} failed: {message}")]
    Scale {
        service: String,
        replicas: u32,
        message: String,
    },
    #[error("reading the replicas of {service:?} failed: {message}")]
    Read { service: String, message: String },
}

/// Sets and reads replica counts of services.
#[tonic::async_trait]
pub trait Actuator: Send + Sync + 'static {
    /// Replicas asked for and replicas ready to serve, now.
    async fn replicas(&self, service: &str) -> Result<Replicas, ActuatorError>;
    /// Asks for `replicas` replicas. Returns once the request is accepted, not once they are ready.
    async fn scale(&self, service: &str, replicas: u32) -> Result<(), ActuatorError>;
    /// A short name for logs and the API ("local", "kubernetes", "simulated").
    fn kind(&self) -> &'static str;
}

/// A simulated target: a replica asked for becomes ready after its service's start-up delay.
/// Lets a policy run end to end with no processes or cluster (tests, demos, and dry runs of
/// observe-only services, whose start-up is zero).
pub struct Simulated {
    clock: Arc<dyn Clock>,
    state: Mutex<HashMap<String, SimState>>,
    kind: &'static str,
}

#[derive(Debug, Clone, Default)]
struct SimState {
    startup: Duration,
    desired: u32,
    /// When each replica asked for becomes ready, in order.
    ready_at: Vec<Duration>,
}

impl Simulated {
    pub fn new(clock: Arc<dyn Clock>, kind: &'static str) -> Self {
        Self {
            clock,
            state: Mutex::new(HashMap::new()),
            kind,
        }
    }

    /// Declares a service with `initial` ready replicas and a start-up delay for new ones.
    pub fn add(&self, service: &str, initial: u32, startup: Duration) {
        let now = self.clock.now();
        self.lock().insert(
            service.to_string(),
            SimState {
                startup,
                desired: initial,
                ready_at: vec![now; initial as usize],
            },
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SimState>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[tonic::async_trait]
impl Actuator for Simulated {
    async fn replicas(&self, service: &str) -> Result<Replicas, ActuatorError> {
        let now = self.clock.now();
        let state = self.lock();
        let s = state.get(service).ok_or_else(|| ActuatorError::UnknownService {
            service: service.into(),
        })?;
        let ready = s.ready_at.iter().filter(|t| **t <= now).count() as u32;
        Ok(Replicas {
            current: s.desired,
            ready,
        })
    }

    async fn scale(&self, service: &str, replicas: u32) -> Result<(), ActuatorError> {
        let now = self.clock.now();
        let mut state = self.lock();
        let s = state
            .get_mut(service)
            .ok_or_else(|| ActuatorError::UnknownService {
                service: service.into(),
            })?;
        s.desired = replicas;
        // Scale-down removes the newest replicas first; scale-up starts new ones now.
        s.ready_at.truncate(replicas as usize);
        while s.ready_at.len() < replicas as usize {
            s.ready_at.push(now + s.startup);
        }
        Ok(())
    }

    fn kind(&self) -> &'static str {
        self.kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::Manual;

    #[tokio::test]
    async fn replicas_become_ready_after_startup() {
        let clock = Arc::new(Manual::at(Duration::ZERO));
        let sim = Simulated::new(clock.clone(), "simulated");
        sim.add("web", 1, Duration::from_secs(2));
        assert_eq!(sim.replicas("web").await, Ok(Replicas { current: 1, ready: 1 }));
        sim.scale("web", 3).await.expect("scale");
        assert_eq!(sim.replicas("web").await, Ok(Replicas { current: 3, ready: 1 }));
        clock.set(Duration::from_secs(2));
        assert_eq!(sim.replicas("web").await, Ok(Replicas { current: 3, ready: 3 }));
        sim.scale("web", 0).await.expect("scale");
        assert_eq!(sim.replicas("web").await, Ok(Replicas { current: 0, ready: 0 }));
        assert_eq!(
            sim.replicas("nope").await.map_err(|e| e.to_string()),
            Err("service \"nope\" has no scale target in this actuator".to_string())
        );
    }
}
