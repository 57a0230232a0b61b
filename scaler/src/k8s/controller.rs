//! The SurgeScaler reconciler and its control loop. The reconciler checks each resource (policy,
//! target, conflicts), records the target's original replica count before taking it over, and
//! keeps the conditions; a finalizer restores the original count on deletion when the policy asks.
//! The loop, every tick, feeds each admitted resource's policy engine what the agents measured for
//! its service (`namespace/service`) and sets the decision through `/scale`. Status has one
//! writer per field set and is written only when it changes.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use k8s_openapi::api::autoscaling::v1::HorizontalPodAutoscaler;
use kube::{
    api::{Patch, PatchParams},
    runtime::{
        controller::{Action, Controller},
        finalizer::{finalizer, Event},
        reflector::ObjectRef,
        watcher,
    },
    Api, Client, ResourceExt,
};
use surge_policy::{decision::Mode as DecisionMode, Defaults, Engine, Policy, Timestamp};
use tokio::sync::{watch, Mutex};

use super::{
    actuator::{resolve, KubeActuator, Target, Watched, MANAGER},
    cache::ClusterCache,
    conditions::{self, rfc3339, ACTIVE, CONFLICT, FALLBACK, PAUSED, READY},
    crd::{LastDecision, ScaleTargetRef, SurgeScaler, SurgeScalerStatus, FINALIZER},
    policy::policy_of,
};
use crate::{
    actuator::Actuator,
    catalog::{Balance, Mode, Requests, ServiceSpec},
    control::ReplicaCounts,
    observations,
    state::Shared,
};

/// How the Kubernetes side runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// How often admitted resources are evaluated.
    pub tick: Duration,
    /// How often every resource is checked again (conflicts, target) without a change.
    pub resync: Duration,
    /// Global policy defaults (the environment's).
    pub defaults: Defaults,
    /// Watch only this namespace (`None`: all).
    pub namespace: Option<String>,
}

/// Why a reconcile failed; `metric_label` names it for logs and metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

/// What the scaler holds for one SurgeScaler.
struct Entry {
    namespace: String,
    name: String,
    /// The metrics service (`namespace/service`).
    service: String,
    /// Present once a valid policy has been in force; it stays when a later edit is invalid.
    engine: Option<Engine>,
    /// May scale now: a policy in force, a scalable target, no conflict.
    admitted: bool,
    status: SurgeScalerStatus,
    published: Option<SurgeScalerStatus>,
}

struct Ctx {
    client: Client,
    /// The services declared outside Kubernetes (flags, config file), kept in the catalog.
    base: Vec<ServiceSpec>,
    shared: Arc<Shared>,
    actuator: Arc<KubeActuator>,
    options: Options,
    entries: Mutex<BTreeMap<String, Entry>>,
}

fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

/// Writes carry Surge's field manager.
fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    }
}

fn now() -> String {
    rfc3339(SystemTime::now())
}

/// Runs the reconciler and the control loop until `stop` turns true.
pub async fn run(client: Client, shared: Arc<Shared>, options: Options, stop: watch::Receiver<bool>) {
    let cache = ClusterCache::start(client.clone(), options.namespace.as_deref(), stop.clone());
    let ctx = Arc::new(Ctx {
        base: shared.catalog.specs(),
        actuator: Arc::new(KubeActuator::new(client.clone(), Arc::clone(&cache))),
        client: client.clone(),
        shared,
        options,
        entries: Mutex::new(BTreeMap::new()),
    });
    let (crs, hpas): (Api<SurgeScaler>, Api<HorizontalPodAutoscaler>) = match &ctx.options.namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client, ns)),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let controller = Controller::new(crs, watcher::Config::default());
    let store = controller.store();
    let mut stop_ctl = stop.clone();
    let reconciler = controller
        // A new or changed HPA re-checks the resources of its namespace that name its target.
        .watches(
            hpas,
            watcher::Config::default(),
            move |hpa: HorizontalPodAutoscaler| {
                let ns = hpa.namespace();
                let target = hpa.spec.map(|s| s.scale_target_ref.name);
                store
                    .state()
                    .into_iter()
                    .filter(|cr| {
                        cr.namespace() == ns && Some(&cr.spec.scale_target_ref.name) == target.as_ref()
                    })
                    .map(|cr| ObjectRef::from_obj(&*cr))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(async move {
            let _ = stop_ctl.wait_for(|s| *s).await;
        })
        .run(reconcile, error_policy, Arc::clone(&ctx))
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile");
            }
        });
    let control = control_loop(Arc::clone(&ctx), cache.changes(), stop);
    tokio::join!(reconciler, control);
}

fn error_policy(cr: Arc<SurgeScaler>, error: &Error, _: Arc<Ctx>) -> Action {
    tracing::warn!(scaler = %cr.name_any(), namespace = ?cr.namespace(), error = %error, kind = error.metric_label(), "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(cr: Arc<SurgeScaler>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = cr.namespace().unwrap_or_default();
    let api: Api<SurgeScaler> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, cr, |event| async {
        match event {
            Event::Apply(cr) => apply(&cr, &ctx).await,
            Event::Cleanup(cr) => cleanup(&cr, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Whether a reference names the same object as `t`: same kind and name, and the same API group
/// (versions may differ; a reference without apiVersion, allowed in an HPA, matches any group).
fn same_target(api_version: Option<&str>, kind: &str, name: &str, t: &ScaleTargetRef) -> bool {
    let group = |v: &str| v.split_once('/').map_or("", |(g, _)| g).to_string();
    kind == t.kind
        && name == t.name
        && api_version.is_none_or(|v| v.is_empty() || group(v) == group(&t.api_version))
}

/// Another scaler of the same target: an HPA, or an older SurgeScaler.
async fn conflict(cr: &SurgeScaler, client: &Client) -> Result<Option<(String, String)>, kube::Error> {
    let ns = cr.namespace().unwrap_or_default();
    let t = &cr.spec.scale_target_ref;
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns);
    for hpa in hpas.list(&Default::default()).await? {
        let Some(spec) = &hpa.spec else { continue };
        let r = &spec.scale_target_ref;
        if same_target(r.api_version.as_deref(), &r.kind, &r.name, t) {
            return Ok(Some((
                "HorizontalPodAutoscaler".into(),
                format!(
                    "{}/{} is already scaled by the HorizontalPodAutoscaler {:?}; Surge leaves it alone",
                    t.kind,
                    t.name,
                    hpa.name_any()
                ),
            )));
        }
    }
    let crs: Api<SurgeScaler> = Api::namespaced(client.clone(), &ns);
    let me = (cr.metadata.creation_timestamp.clone(), cr.name_any());
    for other in crs.list(&Default::default()).await? {
        let o = &other.spec.scale_target_ref;
        if other.name_any() == cr.name_any() || other.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if same_target(Some(&o.api_version), &o.kind, &o.name, t) {
            let theirs = (other.metadata.creation_timestamp.clone(), other.name_any());
            if theirs < me {
                return Ok(Some((
                    "SurgeScaler".into(),
                    format!(
                        "{}/{} is already scaled by the SurgeScaler {:?}; Surge leaves it alone",
                        t.kind,
                        t.name,
                        other.name_any()
                    ),
                )));
            }
        }
    }
    Ok(None)
}

async fn apply(cr: &SurgeScaler, ctx: &Ctx) -> Result<Action, Error> {
    let ns = cr.namespace().unwrap_or_default();
    let name = cr.name_any();
    let t = &cr.spec.scale_target_ref;
    let policy = policy_of(cr, &ctx.options.defaults);
    let resource = resolve(&ctx.client, &t.api_version, &t.kind).await;
    let conflict = conflict(cr, &ctx.client).await?;
    let service = cr.spec.service.clone().unwrap_or_else(|| t.name.clone());
    let target = resource.as_ref().ok().map(|r| Target {
        namespace: ns.clone(),
        resource: r.clone(),
        name: t.name.clone(),
        service: service.clone(),
        service_port: cr.spec.service_port,
    });
    let k = key(&ns, &name);

    // Record the original count before the first scaling, so a restore never loses it.
    let recorded = cr.status.as_ref().and_then(|s| s.original_replicas);
    let mut original = recorded;
    if let (Ok(_), Some(target), None, None) = (&policy, &target, &conflict, recorded) {
        let n = ctx.actuator.current(target).await?;
        let api: Api<SurgeScaler> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({ "status": { "originalReplicas": n } });
        api.patch_status(&name, &params(), &Patch::Merge(&patch)).await?;
        tracing::info!(scaler = %name, namespace = %ns, replicas = n, "took over the target; original count recorded");
        original = Some(n);
    }

    let now = now();
    let mut entries = ctx.entries.lock().await;
    let e = entries.entry(k).or_insert_with(|| Entry {
        namespace: ns.clone(),
        name: name.clone(),
        service: key(&ns, &service),
        engine: None,
        admitted: false,
        status: cr.status.clone().unwrap_or_default(),
        published: cr.status.clone(),
    });
    if e.service != key(&ns, &service) {
        ctx.actuator.remove_target(&e.service);
        e.service = key(&ns, &service);
    }
    e.status.original_replicas = original;
    e.status.observed_generation = cr.metadata.generation;
    let c = &mut e.status.conditions;
    match &conflict {
        Some((reason, message)) => conditions::set(c, CONFLICT, true, reason, message, &now),
        None => conditions::set(
            c,
            CONFLICT,
            false,
            "NoConflict",
            "no other scaler targets it",
            &now,
        ),
    }
    let ts = timestamp(ctx);
    if let Ok(p) = &policy {
        let p = Arc::new(p.clone());
        match &mut e.engine {
            Some(engine) if **engine.policy() == *p => {}
            Some(engine) => engine.set_policy(p, ts),
            None => e.engine = Some(Engine::new(p, ts)),
        }
    }
    let in_force: Option<Arc<Policy>> = e.engine.as_ref().map(|en| Arc::clone(en.policy()));
    match &in_force {
        Some(p) if p.paused => {
            let msg = match p.paused_replicas {
                Some(n) => format!("scaling is paused at {n} replicas"),
                None => "scaling is paused at the current count".to_string(),
            };
            conditions::set(c, PAUSED, true, "Paused", &msg, &now);
        }
        _ => conditions::set(c, PAUSED, false, "NotPaused", "scaling is not paused", &now),
    }
    let (ready, reason, message) = match (&policy, &resource, &conflict) {
        (Err(msg), _, _) => {
            let tail = if in_force.is_some() {
                "; the previous valid policy stays in force"
            } else {
                "; nothing is scaled"
            };
            (false, "InvalidPolicy", format!("{msg}{tail}"))
        }
        (_, Err(err), _) => (false, "InvalidTarget", err.to_string()),
        (_, _, Some((_, msg))) => (false, "Conflict", msg.clone()),
        (Ok(_), Ok(_), None) => (
            true,
            "Scaling",
            format!("scaling {}/{} on service {service}", t.kind, t.name),
        ),
    };
    conditions::set(c, READY, ready, reason, &message, &now);
    e.admitted = in_force.is_some() && target.is_some() && conflict.is_none();
    match (&target, e.admitted) {
        (Some(target), true) => ctx.actuator.set_target(&e.service, target.clone()),
        _ => ctx.actuator.remove_target(&e.service),
    }
    if !ready {
        tracing::warn!(scaler = %name, namespace = %ns, reason, message = %message, "not scaling");
    }
    publish(&ctx.client, e).await?;
    Ok(Action::requeue(ctx.options.resync))
}

async fn cleanup(cr: &SurgeScaler, ctx: &Ctx) -> Result<Action, Error> {
    let ns = cr.namespace().unwrap_or_default();
    let name = cr.name_any();
    let entry = ctx.entries.lock().await.remove(&key(&ns, &name));
    if let Some(e) = &entry {
        ctx.actuator.remove_target(&e.service);
    }
    let status = cr.status.clone().unwrap_or_default();
    let restore = match policy_of(cr, &ctx.options.defaults) {
        Ok(p) => p.restore_to_original_replica_count,
        Err(_) => entry
            .as_ref()
            .and_then(|e| e.engine.as_ref())
            .is_some_and(|en| en.policy().restore_to_original_replica_count),
    };
    let in_conflict = conditions::is_true(&status.conditions, CONFLICT);
    if let (true, false, Some(n)) = (restore, in_conflict, status.original_replicas) {
        let t = &cr.spec.scale_target_ref;
        match resolve(&ctx.client, &t.api_version, &t.kind).await {
            Ok(resource) => {
                let target = Target {
                    namespace: ns.clone(),
                    resource,
                    name: t.name.clone(),
                    service: String::new(),
                    service_port: None,
                };
                match ctx.actuator.set(&target, n).await {
                    Ok(()) => {
                        tracing::info!(scaler = %name, namespace = %ns, replicas = n, "restored the original replica count")
                    }
                    Err(kube::Error::Api(s)) if s.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => tracing::warn!(scaler = %name, error = %e, "cannot restore the original replica count"),
        }
    }
    Ok(Action::await_change())
}

/// Writes the entry's status when it differs from what was written last.
async fn publish(client: &Client, e: &mut Entry) -> Result<(), kube::Error> {
    if e.published.as_ref() == Some(&e.status) {
        return Ok(());
    }
    let api: Api<SurgeScaler> = Api::namespaced(client.clone(), &e.namespace);
    let patch = serde_json::json!({ "status": e.status });
    match api.patch_status(&e.name, &params(), &Patch::Merge(&patch)).await {
        Ok(_) => {
            e.published = Some(e.status.clone());
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(err) => Err(err),
    }
}

fn timestamp(ctx: &Ctx) -> Timestamp {
    Timestamp::from_millis(ctx.shared.clock.now().as_millis() as u64)
}

/// Every tick, evaluates each admitted resource; between ticks, as soon as a watched Service or
/// its endpoints change, tells the agents (a first ready endpoint ends holding).
async fn control_loop(ctx: Arc<Ctx>, mut changes: watch::Receiver<u64>, mut stop: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(ctx.options.tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut watched = BTreeMap::new();
    loop {
        let ticked = tokio::select! {
            _ = interval.tick() => true,
            Ok(()) = changes.changed() => false,
            _ = stop.wait_for(|s| *s) => return,
        };
        if ticked {
            let mut entries = ctx.entries.lock().await;
            for e in entries.values_mut().filter(|e| e.admitted) {
                if let Err(err) = tick(&ctx, e).await {
                    tracing::warn!(scaler = %e.name, namespace = %e.namespace, error = %err, "status write failed");
                }
            }
        } else {
            ctx.actuator.refresh_from_cache();
        }
        let now_watched = ctx.actuator.watched();
        if now_watched != watched {
            publish_watch_set(&ctx, &watched, &now_watched);
            watched = now_watched;
        }
    }
}

/// Tells the agents (through the catalog's watch set) to watch the endpoints of every scaled
/// Service, next to the services declared outside Kubernetes, and to hold connections to its
/// ClusterIP and port while it has no ready endpoint. They are observed only: the SurgeScalers'
/// own loop scales them.
fn publish_watch_set(ctx: &Ctx, before: &BTreeMap<String, Watched>, now: &BTreeMap<String, Watched>) {
    for (name, w) in now {
        let b = Balance {
            service_address: w.hold.as_ref().map(|h| h.address),
            backends: w.hold.as_ref().map(|h| h.backends.clone()).unwrap_or_default(),
            endpoints: Vec::new(),
            cgroups: Vec::new(),
            hold_only: true,
        };
        if w.hold.is_some() {
            ctx.shared.catalog.set_balance(name, b);
        } else {
            ctx.shared.catalog.clear_balance(name);
        }
    }
    for name in before.keys().filter(|n| !now.contains_key(*n)) {
        ctx.shared.catalog.clear_balance(name);
    }
    let mut specs = ctx.base.clone();
    specs.extend(
        now.iter()
            .filter(|(name, _)| !ctx.base.iter().any(|b| &b.name == *name))
            .map(|(name, w)| ServiceSpec {
                name: name.clone(),
                endpoints: w.endpoints.clone(),
                cgroups: Vec::new(),
                mode: Mode::Observe,
                policy: None,
                startup: Duration::ZERO,
                initial_replicas: 0,
                requests: Requests::default(),
            }),
    );
    tracing::info!(
        services = now.len(),
        held = now.values().filter(|w| w.hold.is_some()).count(),
        "watch set of the scaled services changed"
    );
    ctx.shared.catalog.replace(specs);
}

/// One evaluation of one admitted resource.
async fn tick(ctx: &Ctx, e: &mut Entry) -> Result<(), kube::Error> {
    let now = ctx.shared.clock.now();
    let ts = Timestamp::from_millis(now.as_millis() as u64);
    let Some(engine) = e.engine.as_mut() else {
        return Ok(());
    };
    let replicas = match ctx.actuator.replicas(&e.service).await {
        Ok(r) => r,
        Err(err) => {
            conditions::set(
                &mut e.status.conditions,
                READY,
                false,
                "TargetUnreadable",
                &err.to_string(),
                &rfc3339(SystemTime::now()),
            );
            return publish(&ctx.client, e).await;
        }
    };
    let figures = ctx.shared.ingest().figures(&e.service, now);
    for (metric, sample) in observations::samples(figures.as_ref(), &Requests::default(), replicas.ready) {
        engine.record(ts, &metric, sample);
    }
    e.status.current_replicas = Some(replicas.current);
    e.status.ready_replicas = Some(replicas.ready);
    if engine.due(ts, replicas.current) {
        let decision = engine.decide(ts, replicas).clone();
        let wall = rfc3339(SystemTime::now());
        if decision.desired != replicas.current {
            tracing::info!(service = %e.service, from = replicas.current, to = decision.desired, reason = %decision.reason, "scaling");
            match ctx.actuator.scale(&e.service, decision.desired).await {
                Ok(()) => e.status.current_replicas = Some(decision.desired),
                Err(err) => tracing::warn!(service = %e.service, error = %err, "scaling failed"),
            }
        }
        let mode = serde_json::to_value(decision.mode)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let c = &mut e.status.conditions;
        match decision.mode {
            DecisionMode::Idle => conditions::set(
                c,
                ACTIVE,
                false,
                "Idle",
                "no activity above the activation threshold",
                &wall,
            ),
            DecisionMode::Paused => {}
            _ => conditions::set(c, ACTIVE, true, "Active", &format!("{mode} scaling"), &wall),
        }
        if decision.mode == DecisionMode::Fallback {
            conditions::set(
                c,
                FALLBACK,
                true,
                "MetricsFailing",
                &decision.reason.to_string(),
                &wall,
            );
        } else {
            conditions::set(
                c,
                FALLBACK,
                false,
                "MetricsAvailable",
                "the policy has the metrics it needs",
                &wall,
            );
        }
        let changed = e.status.desired_replicas != Some(decision.desired)
            || e.status.last_decision.as_ref().map(|d| (&d.reason, &d.mode))
                != Some((&decision.reason.to_string(), &mode));
        e.status.desired_replicas = Some(decision.desired);
        if changed {
            e.status.last_decision = Some(LastDecision {
                time: wall,
                mode,
                current: replicas.current,
                desired: decision.desired,
                reason: decision.reason.to_string(),
            });
        }
        ctx.shared.control.update(&e.service, |s| {
            s.policy = Some(decision.policy.clone());
            s.actuator = Some("kubernetes");
            s.replicas = Some(ReplicaCounts {
                desired: decision.desired,
                current: replicas.current,
                ready: replicas.ready,
            });
            s.error = None;
            s.record(decision);
        });
    }
    publish(&ctx.client, e).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_target_compares_kind_name_and_group_not_version() {
        let t = ScaleTargetRef {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: "web".into(),
        };
        assert!(same_target(Some("apps/v1"), "Deployment", "web", &t));
        assert!(same_target(Some("apps/v1beta2"), "Deployment", "web", &t));
        assert!(same_target(None, "Deployment", "web", &t));
        assert!(!same_target(Some("apps/v1"), "Deployment", "api", &t));
        assert!(!same_target(Some("apps/v1"), "StatefulSet", "web", &t));
        assert!(!same_target(Some("example.com/v1"), "Deployment", "web", &t));
    }
}
