//! The control loop: every tick, for each service with a policy, feed the policy engine what the
//! agents measured, ask it for a decision, and hand the count to the service's actuator. The
//! engine is the pure core; this module is the adapter that owns time, I/O and errors.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use serde::Serialize;
use surge_policy::{config::Defaults, Decision, Engine, Timestamp};

use crate::{
    actuator::{Actuator, Simulated},
    catalog::{Mode, ServiceSpec},
    observations,
    policies::PolicyDir,
    sources::MetricSources,
    state::Shared,
};

/// Decisions kept per service for the API.
pub const HISTORY: usize = 50;

/// What the API shows of a controlled service.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ControlStatus {
    pub policy: Option<String>,
    pub actuator: Option<&'static str>,
    /// Replicas asked for (the spec) and ready, as the actuator last reported them.
    pub replicas: Option<ReplicaCounts>,
    /// The newest decision first.
    pub decisions: VecDeque<Decision>,
    /// Decisions ever taken, by mode (stable, panic, activating, idle, fallback, paused).
    pub decisions_by_mode: BTreeMap<String, u64>,
    /// Why the service is not being controlled right now, if it is not.
    pub error: Option<String>,
    /// Metric sources (Prometheus queries) of its policy that are failing, one line each.
    pub source_errors: Vec<String>,
}

impl ControlStatus {
    /// Records a decision: newest first in the kept history, and counted by its mode.
    pub fn record(&mut self, decision: Decision) {
        let mode = serde_json::to_value(decision.mode)
            .ok()
            .and_then(|m| m.as_str().map(str::to_string))
            .unwrap_or_default();
        *self.decisions_by_mode.entry(mode).or_default() += 1;
        self.decisions.push_front(decision);
        self.decisions.truncate(HISTORY);
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct ReplicaCounts {
    pub desired: u32,
    pub current: u32,
    pub ready: u32,
}

/// The control status of every service, shared with the HTTP side, and how long the last tick
/// took (microseconds on the injected clock).
#[derive(Default)]
pub struct StatusBoard(
    Mutex<BTreeMap<String, ControlStatus>>,
    std::sync::atomic::AtomicU64,
);

impl StatusBoard {
    /// Seconds the last evaluation of every service took.
    pub fn last_tick_seconds(&self) -> f64 {
        self.1.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6
    }

    pub fn get(&self, service: &str) -> Option<ControlStatus> {
        self.lock().get(service).cloned()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, ControlStatus>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn update(&self, service: &str, f: impl FnOnce(&mut ControlStatus)) {
        f(self.lock().entry(service.to_string()).or_default());
    }
}

pub struct Controller {
    shared: Arc<Shared>,
    policies: PolicyDir,
    defaults: Defaults,
    engines: HashMap<String, Engine>,
    /// Dry runs of observe-only services with a policy: replicas follow the decision at once.
    dry_run: Arc<Simulated>,
    simulated: Arc<Simulated>,
    /// Prometheus queries of external triggers; none until [`Controller::with_sources`].
    sources: Option<MetricSources>,
    /// The local actuator, when the binary runs one (see `with_local`).
    local: Arc<dyn Actuator>,
}

impl Controller {
    pub fn new(shared: Arc<Shared>, policies: PolicyDir, defaults: Defaults) -> Self {
        let dry_run = Arc::new(Simulated::new(Arc::clone(&shared.clock), "dry-run"));
        let simulated = Arc::new(Simulated::new(Arc::clone(&shared.clock), "simulated"));
        let shared_clock = Arc::clone(&shared.clock);
        for spec in shared.catalog.specs() {
            match spec.mode {
                Mode::Observe => dry_run.add(&spec.name, spec.initial_replicas, Duration::ZERO),
                Mode::Simulated => simulated.add(&spec.name, spec.initial_replicas, spec.startup),
                Mode::Local => {}
            }
        }
        Self {
            shared,
            policies,
            defaults,
            engines: HashMap::new(),
            dry_run,
            simulated,
            sources: None,
            // Until `with_local`: no local service has a target.
            local: Arc::new(Simulated::new(Arc::clone(&shared_clock), "local")),
        }
    }

    /// Queries external triggers (PromQL) through `sources`.
    pub fn with_sources(mut self, sources: MetricSources) -> Self {
        self.sources = Some(sources);
        self
    }

    /// Sends `actuator: local` services to `local`.
    pub fn with_local(mut self, local: Arc<dyn Actuator>) -> Self {
        self.local = local;
        self
    }

    fn actuator(&self, spec: &ServiceSpec) -> Arc<dyn Actuator> {
        match spec.mode {
            Mode::Observe => self.dry_run.clone(),
            Mode::Simulated => self.simulated.clone(),
            Mode::Local => self.local.clone(),
        }
    }

    /// Re-reads the policy directory (blocking file reads, off the runtime's threads).
    pub async fn reload_policies(&mut self) {
        let mut dir = std::mem::take(&mut self.policies);
        let defaults = self.defaults.clone();
        let (dir, reload) = match tokio::task::spawn_blocking(move || {
            let r = dir.reload(&defaults);
            (dir, r)
        })
        .await
        {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "policy reload task failed");
                return;
            }
        };
        self.policies = dir;
        for name in &reload.applied {
            tracing::info!(policy = %name, "policy applied");
        }
        for (file, error) in &reload.rejected {
            tracing::warn!(file = %file, error = %error, "policy rejected; the previous version stays in force");
        }
        for name in &reload.removed {
            tracing::info!(policy = %name, "policy removed");
        }
    }

    /// One evaluation of every service with a policy, at the clock's now.
    pub async fn tick(&mut self) {
        let now = self.shared.clock.now();
        let ts = Timestamp::from_millis(now.as_millis() as u64);
        for spec in self.shared.catalog.specs() {
            let Some(policy_name) = spec.policy.clone() else {
                continue;
            };
            let Some(policy) = self.policies.get(&policy_name) else {
                let error = match self.policies.errors().values().next() {
                    Some(e) if self.policies.errors().len() == 1 => {
                        format!("policy {policy_name:?} is not in force: {e}")
                    }
                    _ => format!(
                        "no policy named {policy_name:?} in {}",
                        self.policies.dir().display()
                    ),
                };
                self.shared.control.update(&spec.name, |s| {
                    s.policy = Some(policy_name.clone());
                    s.error = Some(error);
                });
                continue;
            };
            let actuator = self.actuator(&spec);
            let replicas = match actuator.replicas(&spec.name).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(service = %spec.name, error = %e, "cannot read replicas");
                    self.shared
                        .control
                        .update(&spec.name, |s| s.error = Some(e.to_string()));
                    continue;
                }
            };
            let engine = self
                .engines
                .entry(spec.name.clone())
                .or_insert_with(|| Engine::new(Arc::clone(&policy), ts));
            if !Arc::ptr_eq(engine.policy(), &policy) {
                engine.set_policy(Arc::clone(&policy), ts);
            }
            let figures = self.shared.ingest().figures(&spec.name, now);
            for (metric, sample) in observations::samples(figures.as_ref(), &spec.requests, replicas.ready) {
                engine.record(ts, &metric, sample);
            }
            if let Some(sources) = self.sources.as_mut() {
                let external = sources.poll(&spec.name, &policy, now);
                for (metric, sample) in &external.samples {
                    engine.record(ts, metric, *sample);
                }
                self.shared
                    .control
                    .update(&spec.name, |s| s.source_errors = external.errors);
            }
            let kind = actuator.kind();
            if !engine.due(ts, replicas.current) {
                self.shared.control.update(&spec.name, |s| {
                    s.actuator = Some(kind);
                    if let Some(r) = s.replicas.as_mut() {
                        r.current = replicas.current;
                        r.ready = replicas.ready;
                    }
                });
                continue;
            }
            let decision = engine.decide(ts, replicas).clone();
            let mut error = None;
            if decision.desired != replicas.current {
                tracing::info!(
                    service = %spec.name,
                    from = replicas.current,
                    to = decision.desired,
                    reason = %decision.reason,
                    "scaling"
                );
                if let Err(e) = actuator.scale(&spec.name, decision.desired).await {
                    tracing::warn!(service = %spec.name, error = %e, "scaling failed");
                    error = Some(e.to_string());
                }
            }
            self.shared.control.update(&spec.name, |s| {
                s.policy = Some(policy_name.clone());
                s.actuator = Some(kind);
                s.replicas = Some(ReplicaCounts {
                    desired: decision.desired,
                    current: replicas.current,
                    ready: replicas.ready,
                });
                s.error = error;
                s.record(decision);
            });
        }
    }

    /// Runs until `stop` turns true: reloads policies every few ticks, evaluates every tick.
    pub async fn run(mut self, tick: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let reload_every = (Duration::from_secs(2).as_millis() / tick.as_millis().max(1)).max(1) as u64;
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = stop.changed() => return,
            }
            if n.is_multiple_of(reload_every) {
                self.reload_policies().await;
            }
            n += 1;
            let started = self.shared.clock.now();
            self.tick().await;
            let took = self.shared.clock.now().saturating_sub(started);
            self.shared
                .control
                .1
                .store(took.as_micros() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests;
