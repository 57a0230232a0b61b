//! Replays a trace through the real engine on a simulated clock, with a replica start-up delay.
//!
//! Each tick the simulator reports the trace's current values like an agent would: while no
//! replica is ready, traffic on `rps`/`concurrency` is held (reported as `held_connections`,
//! and the served `rps` is 0); replicas asked for become ready `startup_delay` later; removed
//! replicas go at once (starting ones first).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::config::Policy;
use crate::decision::{Mode, Reason};
use crate::engine::{Engine, Replicas, Sample};
use crate::metric::Metric;
use crate::time::Timestamp;
use crate::trace::Trace;

/// Simulation settings.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Time from asking for a replica to it being ready.
    pub startup_delay: Duration,
    /// Simulated tick (how often metrics are reported and the engine asked).
    pub tick: Duration,
    /// Replicas at the start (all ready).
    pub initial_replicas: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            startup_delay: Duration::from_secs(10),
            tick: Duration::from_secs(1),
            initial_replicas: 1,
        }
    }
}

/// The state at one tick.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SimPoint {
    /// Time since the start, seconds.
    pub time: f64,
    /// Offered load on the first trigger's metric (or the first metric of the trace).
    pub load: f64,
    /// Ready replicas × the first trigger's target: the load they are sized for.
    pub capacity: f64,
    /// Replicas asked for.
    pub desired: u32,
    /// Ready replicas.
    pub ready: u32,
    /// Mode.
    pub mode: Mode,
    /// Why.
    pub reason: Reason,
}

/// Runs the simulation and returns one point per tick.
pub fn simulate(policy: Arc<Policy>, trace: &Trace, cfg: &SimConfig) -> Vec<SimPoint> {
    let load_metric = policy
        .triggers
        .first()
        .map(|t| t.metric.clone())
        .or_else(|| policy.scale_up_rules.first().map(|r| r.metric.clone()))
        .unwrap_or(Metric::Rps);
    let per_replica = policy.triggers.first().map_or(0.0, |t| t.target);
    let mut engine = Engine::new(Arc::clone(&policy), Timestamp::ZERO);
    let mut current: Vec<(Metric, Sample)> = Vec::new();
    let mut next_point = 0;
    let mut ready = cfg.initial_replicas;
    let mut starting: VecDeque<Timestamp> = VecDeque::new();
    let mut out = Vec::new();
    let end = trace.end();
    let mut now = Timestamp::ZERO;
    while now <= end {
        while let Some(p) = trace.points.get(next_point).filter(|p| p.time <= now) {
            for (m, s) in &p.samples {
                match current.iter_mut().find(|(cm, _)| cm == m) {
                    Some(slot) => slot.1 = *s,
                    None => current.push((m.clone(), *s)),
                }
            }
            next_point += 1;
        }
        while starting.front().is_some_and(|t| *t <= now) {
            starting.pop_front();
            ready += 1;
        }
        let mut load = 0.0;
        let mut held = 0.0;
        for (m, s) in &current {
            let mut s = *s;
            if let Sample::Value(v) = s {
                if *m == load_metric {
                    load = v;
                }
                if ready == 0 && matches!(m, Metric::Rps | Metric::Concurrency) {
                    held = f64::max(held, v);
                    s = Sample::Value(0.0);
                }
            }
            engine.record(now, m, s);
        }
        engine.record(now, &Metric::HeldConnections, Sample::Value(held));
        let asked = ready + starting.len() as u32;
        let d = engine.decide(
            now,
            Replicas {
                current: asked,
                ready,
            },
        );
        let desired = d.desired;
        let (mode, reason) = (d.mode, d.reason);
        if desired > asked {
            for _ in asked..desired {
                starting.push_back(now + cfg.startup_delay);
            }
        } else {
            for _ in desired..asked {
                if starting.pop_back().is_none() {
                    ready -= 1;
                }
            }
        }
        out.push(SimPoint {
            time: now.as_secs_f64(),
            load,
            capacity: f64::from(ready) * per_replica,
            desired,
            ready,
            mode,
            reason,
        });
        now = now + cfg.tick;
    }
    out
}

/// The points where the desired count or the mode changed (and the first one).
pub fn changes(points: &[SimPoint]) -> Vec<&SimPoint> {
    let mut out: Vec<&SimPoint> = Vec::new();
    for p in points {
        if out
            .last()
            .is_none_or(|l| l.desired != p.desired || l.mode != p.mode)
        {
            out.push(p);
        }
    }
    out
}
