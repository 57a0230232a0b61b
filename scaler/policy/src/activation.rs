//! Activity and the step to or from zero/idle: KEDA activation, cooldownPeriod, initialCooldownPeriod.
//!
//! Activation wins over scaling (KEDA): while no trigger is above its `activationThreshold`,
//! the service goes to `idleReplicaCount` (or 0) once it has been inactive for the zero delay
//! (KEDA `cooldownPeriod`; for `kpa`, a whole stable window plus the scale-to-zero grace
//! period), even if the targets would want replicas. Connections held by an agent always count
//! as activity.

use crate::config::Policy;
use crate::decision::Limit;
use crate::time::Timestamp;

/// What the zero/idle stage decides.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ZeroStep {
    /// Nothing special: normal scaling, at least the active floor.
    Scale,
    /// At zero/idle with activity: go to at least this count now.
    Activate(u32),
    /// Inactive long enough: go to the idle count.
    Idle,
    /// Inactive, but this limit keeps the replicas for now.
    Wait(Limit),
}

/// When activity was last seen.
#[derive(Clone, Debug)]
pub struct ActivityState {
    started: Timestamp,
    last_active: Option<Timestamp>,
}

impl ActivityState {
    /// Starts tracking at `now` (the policy's creation, for `initialCooldownPeriod`).
    pub fn new(now: Timestamp) -> Self {
        ActivityState {
            started: now,
            last_active: None,
        }
    }

    /// Last time activity was seen.
    pub fn last_active(&self) -> Option<Timestamp> {
        self.last_active
    }

    /// Notes one evaluation and decides the zero/idle step.
    pub fn step(&mut self, p: &Policy, now: Timestamp, active: bool, current: u32) -> ZeroStep {
        if active {
            self.last_active = Some(now);
        }
        if !p.can_idle() {
            return ZeroStep::Scale;
        }
        let at_idle = current <= p.idle_count();
        if active {
            if at_idle {
                let floor = p.active_floor().max(match p.algorithm {
                    crate::config::Algorithm::Kpa => p.knative.activation_scale,
                    _ => 1,
                });
                return ZeroStep::Activate(floor);
            }
            return ZeroStep::Scale;
        }
        if at_idle {
            return ZeroStep::Idle;
        }
        if now.since(self.started) < p.initial_cooldown_period {
            return ZeroStep::Wait(Limit::InitialCooldownPeriod);
        }
        let since = self.last_active.unwrap_or(self.started);
        if now.since(since) < p.zero_delay() {
            return ZeroStep::Wait(Limit::CooldownPeriod);
        }
        ZeroStep::Idle
    }
}
