//! Metric sources besides the agents: today Prometheus. Each external trigger with a `query` gets
//! a poller task (one per distinct query and server) that runs at the policy's `pollingInterval`,
//! off the control loop. Every tick the control loop takes what the pollers found: the newest
//! value of each trigger, a failure once per failed poll (toward `fallback.failureThreshold`),
//! and the error text to show on the service.

pub mod prometheus;

use std::{collections::HashMap, sync::Arc, time::Duration};

use surge_policy::{Metric, Policy, Sample};
use tokio::sync::watch;

pub use prometheus::{Clients, PrometheusError, Query, Settings, SettingsError};

/// A poller nobody asked for this long is stopped.
const UNUSED_FOR: Duration = Duration::from_secs(60);

/// The result of one poll; `seq` counts polls.
#[derive(Debug, Clone)]
struct Outcome {
    seq: u64,
    result: Result<f64, PrometheusError>,
}

struct Poller {
    rx: watch::Receiver<Option<Outcome>>,
    task: tokio::task::JoinHandle<()>,
    last_used: Duration,
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the sources have for one service now.
#[derive(Debug, Default, PartialEq)]
pub struct External {
    /// To record into the service's engine.
    pub samples: Vec<(Metric, Sample)>,
    /// One line per trigger that is failing: `triggers[0] (external:queue): cannot reach …`.
    pub errors: Vec<String>,
}

/// The pollers of every service's external triggers.
pub struct MetricSources {
    settings: Settings,
    clients: Clients,
    pollers: HashMap<Arc<Query>, Poller>,
    /// The last poll taken, per (service, trigger index).
    taken: HashMap<(String, usize), (Arc<Query>, u64)>,
}

impl MetricSources {
    /// Reads the certificate files (off the runtime's threads) and sets up the HTTP clients.
    pub async fn start(settings: Settings) -> Result<Self, SettingsError> {
        let s = settings.clone();
        let clients = tokio::task::spawn_blocking(move || Clients::build(&s))
            .await
            .map_err(|e| SettingsError {
                name: prometheus::PROMETHEUS_CA_FILE,
                value: String::new(),
                message: format!("setting up TLS failed: {e}"),
            })??;
        Ok(Self {
            settings,
            clients,
            pollers: HashMap::new(),
            taken: HashMap::new(),
        })
    }

    /// The samples and errors of `service`'s external triggers at `now` (the scaler's clock),
    /// starting pollers for triggers that have none yet. Needs a tokio runtime; never blocks.
    pub fn poll(&mut self, service: &str, policy: &Policy, now: Duration) -> External {
        let mut out = External::default();
        for (i, trig) in policy.triggers.iter().enumerate() {
            if !matches!(trig.metric, Metric::External(_)) || trig.query.is_none() {
                continue;
            }
            let error = |e: &PrometheusError| format!("triggers[{i}] ({}): {e}", trig.metric);
            let query = match Query::from_trigger(trig, &self.settings, policy.polling_interval) {
                Ok(q) => Arc::new(q),
                Err(e) => {
                    // A trigger that cannot run holds the count where it is (no sample), as a
                    // metric that never arrived does.
                    out.errors.push(error(&e));
                    continue;
                }
            };
            let poller = self
                .pollers
                .entry(Arc::clone(&query))
                .or_insert_with(|| spawn(Arc::clone(&query), self.clients.clone()));
            poller.last_used = now;
            let Some(outcome) = poller.rx.borrow().clone() else {
                continue;
            };
            let key = (service.to_string(), i);
            let fresh = self
                .taken
                .get(&key)
                .is_none_or(|(q, seq)| **q != *query || outcome.seq > *seq);
            match &outcome.result {
                // The newest value every tick, so the policy's windows stay filled.
                Ok(v) => out.samples.push((trig.metric.clone(), Sample::Value(*v))),
                // A failure counts once per failed poll.
                Err(e) => {
                    if fresh {
                        out.samples.push((trig.metric.clone(), Sample::Failed));
                    }
                    out.errors.push(error(e));
                }
            }
            self.taken.insert(key, (query, outcome.seq));
        }
        self.pollers
            .retain(|_, p| now.saturating_sub(p.last_used) < UNUSED_FOR);
        out
    }
}

fn spawn(query: Arc<Query>, clients: Clients) -> Poller {
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        let mut interval = tokio::time::interval(query.interval.max(Duration::from_millis(100)));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0;
        let mut was_ok = true;
        loop {
            interval.tick().await;
            seq += 1;
            let result = query.run(&clients).await;
            match (&result, was_ok) {
                (Err(e), true) => {
                    tracing::warn!(server = %query.server, query = %query.query, error = %e, "Prometheus query failing")
                }
                (Ok(v), false) => {
                    tracing::info!(server = %query.server, query = %query.query, value = v, "Prometheus query answering again")
                }
                _ => {}
            }
            was_ok = result.is_ok();
            if tx.send(Some(Outcome { seq, result })).is_err() {
                return;
            }
        }
    });
    Poller {
        rx,
        task,
        last_used: Duration::ZERO,
    }
}

#[cfg(test)]
mod tests;
