//! The cluster's Services, their endpoints objects and the scale targets' replica counts, kept
//! current by watches (one list, then changes) instead of read for every SurgeScaler on every
//! tick: that was three API requests per SurgeScaler per second. Every change bumps a generation that the control loop waits on, so
//! the agents hear of a Service's first ready endpoint (and stop holding its connections) as soon
//! as the API server has it, not at the next tick.
//!
//! Until a kind's first list is complete its readers get `None` and read the API themselves.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Debug,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, RwLock,
    },
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Endpoints, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{ApiResource, DynamicObject},
    runtime::{watcher, WatchStreamExt},
    Api, Client, Resource, ResourceExt,
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::endpoints::{self, Seen};

/// A Service: its namespace and name.
pub type ServiceKey = (String, String);

/// The label an EndpointSlice names its Service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

type Groups<K> = HashMap<ServiceKey, BTreeMap<String, Arc<K>>>;

/// One kind's objects, grouped by the Service they belong to and keyed by their own name.
/// Pure: watch events in, what a reader sees out.
pub struct Table<K> {
    groups: Groups<K>,
    /// The Service each object (namespace, name) was last filed under.
    owners: HashMap<ServiceKey, ServiceKey>,
    /// A relist in progress: filled between `Init` and `InitDone`, then swapped in whole.
    relisting: Option<(Groups<K>, HashMap<ServiceKey, ServiceKey>)>,
    synced: bool,
    owner: fn(&K) -> Option<ServiceKey>,
}

impl<K: Resource> Table<K> {
    /// An empty table; `owner` names the Service an object belongs to (`None`: none).
    pub fn new(owner: fn(&K) -> Option<ServiceKey>) -> Self {
        Self {
            groups: HashMap::new(),
            owners: HashMap::new(),
            relisting: None,
            synced: false,
            owner,
        }
    }

    /// Applies one watch event; true when what a reader sees changed.
    pub fn apply(&mut self, event: watcher::Event<K>) -> bool {
        match event {
            watcher::Event::Apply(obj) => {
                let (groups, owners) = (&mut self.groups, &mut self.owners);
                file(groups, owners, self.owner, obj);
                self.synced
            }
            watcher::Event::Delete(obj) => {
                let id = id(&obj);
                if let Some(owner) = self.owners.remove(&id) {
                    remove(&mut self.groups, &owner, &id.1);
                }
                self.synced
            }
            watcher::Event::Init => {
                self.relisting = Some((HashMap::new(), HashMap::new()));
                false
            }
            watcher::Event::InitApply(obj) => {
                let owner = self.owner;
                match &mut self.relisting {
                    Some((groups, owners)) => file(groups, owners, owner, obj),
                    None => file(&mut self.groups, &mut self.owners, owner, obj),
                }
                false
            }
            watcher::Event::InitDone => {
                if let Some((groups, owners)) = self.relisting.take() {
                    self.groups = groups;
                    self.owners = owners;
                }
                self.synced = true;
                true
            }
        }
    }

    /// The objects of one Service (empty when it has none); `None` until the first list is in.
    pub fn group(&self, service: &ServiceKey) -> Option<Vec<Arc<K>>> {
        self.synced.then(|| {
            self.groups
                .get(service)
                .map(|g| g.values().cloned().collect())
                .unwrap_or_default()
        })
    }

    pub fn synced(&self) -> bool {
        self.synced
    }
}

fn id<K: Resource>(obj: &K) -> ServiceKey {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

fn file<K: Resource>(
    groups: &mut Groups<K>,
    owners: &mut HashMap<ServiceKey, ServiceKey>,
    owner_of: fn(&K) -> Option<ServiceKey>,
    obj: K,
) {
    let id = id(&obj);
    let owner = owner_of(&obj);
    if let Some(before) = owners.remove(&id) {
        remove(groups, &before, &id.1);
    }
    if let Some(owner) = owner {
        groups
            .entry(owner.clone())
            .or_default()
            .insert(id.1.clone(), Arc::new(obj));
        owners.insert(id, owner);
    }
}

fn remove<K>(groups: &mut Groups<K>, owner: &ServiceKey, name: &str) {
    if let Some(group) = groups.get_mut(owner) {
        group.remove(name);
        if group.is_empty() {
            groups.remove(owner);
        }
    }
}

/// A Service and a core/v1 Endpoints object belong to the Service of their own name.
fn named<K: Resource>(obj: &K) -> Option<ServiceKey> {
    Some(id(obj))
}

/// An EndpointSlice belongs to the Service its label names.
fn labelled(slice: &EndpointSlice) -> Option<ServiceKey> {
    let service = slice.labels().get(SERVICE_NAME_LABEL)?;
    Some((slice.namespace().unwrap_or_default(), service.clone()))
}

type Shared<K> = Arc<RwLock<Table<K>>>;

/// The watched Services, endpoints objects and scale targets.
pub struct ClusterCache {
    client: Client,
    namespace: Option<String>,
    stop: watch::Receiver<bool>,
    services: Shared<Service>,
    slices: Shared<EndpointSlice>,
    endpoints: Shared<Endpoints>,
    /// discovery.k8s.io/v1 is not served: endpoints come from core/v1 Endpoints.
    slices_not_served: AtomicBool,
    /// The objects of each target kind whose `/scale` is its `spec.replicas`, by plural (each
    /// object trimmed to that field), watched from the first time a target of the kind is read.
    targets: Mutex<HashMap<String, Shared<DynamicObject>>>,
    generation: watch::Sender<u64>,
}

impl ClusterCache {
    /// Starts watching Services and EndpointSlices (core/v1 Endpoints where EndpointSlices are
    /// not served) in `namespace` (`None`: all), until `stop` turns true.
    pub fn start(client: Client, namespace: Option<&str>, stop: watch::Receiver<bool>) -> Arc<Self> {
        let cache = Arc::new(Self {
            client: client.clone(),
            namespace: namespace.map(str::to_string),
            stop: stop.clone(),
            services: Arc::new(RwLock::new(Table::new(named))),
            slices: Arc::new(RwLock::new(Table::new(labelled))),
            endpoints: Arc::new(RwLock::new(Table::new(named))),
            slices_not_served: AtomicBool::new(false),
            targets: Mutex::new(HashMap::new()),
            generation: watch::Sender::new(0),
        });
        fn api<K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>>(
            client: &Client,
            namespace: Option<&str>,
        ) -> Api<K> {
            match namespace {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            }
        }
        let services = follow(
            Arc::clone(&cache),
            api::<Service>(&client, namespace),
            watcher::Config::default(),
            Arc::clone(&cache.services),
            trim_managed_fields,
            stop.clone(),
        );
        tokio::spawn(async move {
            services.await;
        });
        let (slices_api, endpoints_api) = (
            api::<EndpointSlice>(&client, namespace),
            api::<Endpoints>(&client, namespace),
        );
        let c = Arc::clone(&cache);
        tokio::spawn(async move {
            let slices = watcher::Config::default().labels(SERVICE_NAME_LABEL);
            let table = Arc::clone(&c.slices);
            if follow(
                Arc::clone(&c),
                slices_api,
                slices,
                table,
                trim_managed_fields,
                stop.clone(),
            )
            .await
                == Followed::NotServed
            {
                tracing::info!(
                    "discovery.k8s.io/v1 EndpointSlices are not served; watching core/v1 Endpoints"
                );
                c.slices_not_served.store(true, Ordering::Relaxed);
                follow(
                    Arc::clone(&c),
                    endpoints_api,
                    watcher::Config::default(),
                    Arc::clone(&c.endpoints),
                    trim_managed_fields,
                    stop,
                )
                .await;
            }
        });
        cache
    }

    /// Bumped on every change a reader can see.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The Service `namespace/name` (`Some(None)`: there is none); `None` until Services are listed.
    pub fn service(&self, namespace: &str, name: &str) -> Option<Option<Arc<Service>>> {
        let table = self.services.read().ok()?;
        let group = table.group(&(namespace.into(), name.into()))?;
        Some(group.into_iter().next())
    }

    /// What the Service's endpoints objects say (`Some(None)`: it has none); `None` until they
    /// are listed.
    pub fn seen(&self, namespace: &str, service: &str) -> Option<Option<Seen>> {
        let key = (namespace.to_string(), service.to_string());
        if self.slices_not_served.load(Ordering::Relaxed) {
            let table = self.endpoints.read().ok()?;
            let group = table.group(&key)?;
            return Some(group.first().map(|ep| endpoints::from_endpoints(ep)));
        }
        let table = self.slices.read().ok()?;
        let group = table.group(&key)?;
        Some(endpoints::from_slices(group.iter().map(|s| &**s)))
    }

    /// The replicas a scale target asks for (its `/scale` `spec.replicas`), from a watch of its
    /// kind, started on the first call for a kind: `Some(None)` when it is not there; `None`
    /// until the kind is listed, or for kinds whose `/scale` is not their `spec.replicas`.
    pub fn target_replicas(
        self: &Arc<Self>,
        namespace: &str,
        name: &str,
        resource: &ApiResource,
    ) -> Option<Option<u32>> {
        if !scale_is_spec_replicas(resource) {
            return None;
        }
        let table = {
            let mut targets = self.targets.lock().ok()?;
            match targets.get(&resource.plural) {
                Some(t) => Arc::clone(t),
                None => {
                    let table = Arc::new(RwLock::new(Table::new(named)));
                    targets.insert(resource.plural.clone(), Arc::clone(&table));
                    self.watch_targets(resource, Arc::clone(&table));
                    return None;
                }
            }
        };
        let table = table.read().ok()?;
        let group = table.group(&(namespace.into(), name.into()))?;
        Some(group.first().map(|obj| {
            let n = obj.data.pointer("/spec/replicas").and_then(|v| v.as_i64());
            // The API server defaults a missing spec.replicas to 1.
            n.unwrap_or(1).clamp(0, i64::from(u32::MAX)) as u32
        }))
    }

    fn watch_targets(self: &Arc<Self>, resource: &ApiResource, table: Shared<DynamicObject>) {
        let api: Api<DynamicObject> = match &self.namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, resource),
            None => Api::all_with(self.client.clone(), resource),
        };
        tracing::info!(kind = %resource.kind, "watching scale targets of this kind");
        let (cache, stop) = (Arc::clone(self), self.stop.clone());
        tokio::spawn(async move {
            follow(
                cache,
                api,
                watcher::Config::default(),
                table,
                keep_spec_replicas,
                stop,
            )
            .await;
        });
    }

    /// Whether both Services and endpoints are listed.
    pub fn synced(&self) -> bool {
        let endpoints = if self.slices_not_served.load(Ordering::Relaxed) {
            self.endpoints.read().map(|t| t.synced()).unwrap_or(false)
        } else {
            self.slices.read().map(|t| t.synced()).unwrap_or(false)
        };
        endpoints && self.services.read().map(|t| t.synced()).unwrap_or(false)
    }
}

/// Nothing here reads managed fields: keeping them would double the memory.
fn trim_managed_fields<K: Resource>(obj: &mut K) {
    obj.managed_fields_mut().clear();
}

/// Of a scale target, only `spec.replicas` is read: the rest (a pod template, a status) is not
/// kept.
fn keep_spec_replicas(obj: &mut DynamicObject) {
    let replicas = obj.data.pointer("/spec/replicas").cloned();
    obj.data = serde_json::json!({ "spec": { "replicas": replicas } });
    obj.metadata.managed_fields = None;
    obj.metadata.annotations = None;
    obj.metadata.labels = None;
}

/// The kinds whose `/scale` `spec.replicas` is the object's own `spec.replicas`.
fn scale_is_spec_replicas(resource: &ApiResource) -> bool {
    resource.group == "apps"
        && matches!(
            resource.plural.as_str(),
            "deployments" | "statefulsets" | "replicasets"
        )
}

#[derive(Debug, PartialEq, Eq)]
enum Followed {
    Stopped,
    /// The API server does not serve the kind (404 on the first list).
    NotServed,
}

/// Applies the watch events of `api`, each object trimmed by `trim`, to `table`, until `stop`
/// turns true. Errors are retried with backoff, and logged when they change.
async fn follow<K>(
    cache: Arc<ClusterCache>,
    api: Api<K>,
    config: watcher::Config,
    table: Shared<K>,
    trim: fn(&mut K),
    mut stop: watch::Receiver<bool>,
) -> Followed
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let kind = std::any::type_name::<K>().rsplit("::").next().unwrap_or_default();
    let mut events = watcher(api, config).modify(trim).default_backoff().boxed();
    let mut last_error = None;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = stop.wait_for(|s| *s) => return Followed::Stopped,
        };
        match event {
            None => return Followed::Stopped,
            Some(Ok(event)) => {
                last_error = None;
                let changed = table.write().map(|mut t| t.apply(event)).unwrap_or(false);
                if changed {
                    cache.generation.send_modify(|g| *g += 1);
                }
            }
            Some(Err(watcher::Error::InitialListFailed(kube::Error::Api(s))))
                if s.is_not_found() && !table.read().map(|t| t.synced()).unwrap_or(true) =>
            {
                return Followed::NotServed;
            }
            Some(Err(e)) => {
                let message = e.to_string();
                if last_error.as_ref() != Some(&message) {
                    tracing::warn!(kind = %kind, error = %message, "watch failed; retrying with backoff");
                    last_error = Some(message);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use watcher::Event;

    fn slice(name: &str, service: Option<&str>, address: &str) -> EndpointSlice {
        let labels = match service {
            Some(s) => serde_json::json!({ SERVICE_NAME_LABEL: s }),
            None => serde_json::json!({}),
        };
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "labels": labels},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": [{"addresses": [address]}],
        }))
        .expect("slice")
    }

    fn names(table: &Table<EndpointSlice>, service: &str) -> Option<Vec<String>> {
        table
            .group(&("shop".into(), service.into()))
            .map(|g| g.iter().map(|s| s.name_any()).collect())
    }

    #[test]
    fn nothing_is_read_until_the_first_list_is_complete() {
        let mut t = Table::new(labelled);
        assert!(!t.apply(Event::Init));
        assert!(!t.apply(Event::InitApply(slice("web-a", Some("web"), "10.1.0.1"))));
        assert_eq!(names(&t, "web"), None, "half a list is not the cluster");
        assert!(t.apply(Event::InitDone));
        assert_eq!(names(&t, "web"), Some(vec!["web-a".into()]));
        assert_eq!(names(&t, "api"), Some(vec![]), "listed, and it has none");
    }

    #[test]
    fn slices_are_filed_under_their_service_and_follow_changes() {
        let mut t = Table::new(labelled);
        t.apply(Event::Init);
        t.apply(Event::InitDone);
        assert!(t.apply(Event::Apply(slice("web-a", Some("web"), "10.1.0.1"))));
        assert!(t.apply(Event::Apply(slice("web-b", Some("web"), "10.1.0.2"))));
        t.apply(Event::Apply(slice("stray", None, "10.1.0.9")));
        assert_eq!(names(&t, "web"), Some(vec!["web-a".into(), "web-b".into()]));
        // A changed slice replaces the one before it; a relabelled one moves.
        t.apply(Event::Apply(slice("web-a", Some("web"), "10.1.0.3")));
        t.apply(Event::Apply(slice("web-b", Some("api"), "10.1.0.2")));
        let web = t.group(&("shop".into(), "web".into())).expect("synced");
        assert_eq!(web.len(), 1);
        assert_eq!(web[0].endpoints[0].addresses, vec!["10.1.0.3".to_string()]);
        assert_eq!(names(&t, "api"), Some(vec!["web-b".into()]));
        assert!(t.apply(Event::Delete(slice("web-a", Some("web"), "10.1.0.3"))));
        assert_eq!(names(&t, "web"), Some(vec![]));
    }

    #[test]
    fn of_a_scale_target_only_spec_replicas_is_kept() {
        let mut d: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"replicas": 4, "template": {"spec": {"containers": [{"name": "web"}]}}},
            "status": {"readyReplicas": 2},
        }))
        .expect("deployment");
        keep_spec_replicas(&mut d);
        assert_eq!(d.data, serde_json::json!({"spec": {"replicas": 4}}));
        assert_eq!(d.metadata.labels, None);
        let mut t = Table::new(named);
        t.apply(Event::Init);
        t.apply(Event::InitApply(d));
        t.apply(Event::InitDone);
        assert_eq!(t.group(&("shop".into(), "web".into())).map(|g| g.len()), Some(1));
        let apps = |plural: &str| ApiResource {
            group: "apps".into(),
            version: "v1".into(),
            api_version: "apps/v1".into(),
            kind: String::new(),
            plural: plural.into(),
        };
        assert!(scale_is_spec_replicas(&apps("deployments")));
        assert!(scale_is_spec_replicas(&apps("statefulsets")));
        assert!(!scale_is_spec_replicas(&ApiResource {
            group: "argoproj.io".into(),
            ..apps("rollouts")
        }));
    }

    #[test]
    fn a_relist_replaces_everything_at_once() {
        let mut t = Table::new(labelled);
        t.apply(Event::Init);
        t.apply(Event::InitApply(slice("web-a", Some("web"), "10.1.0.1")));
        t.apply(Event::InitDone);
        // The watch restarts; while it relists, readers still see the last complete list.
        t.apply(Event::Init);
        t.apply(Event::InitApply(slice("web-b", Some("web"), "10.1.0.2")));
        assert_eq!(names(&t, "web"), Some(vec!["web-a".into()]));
        t.apply(Event::InitDone);
        assert_eq!(
            names(&t, "web"),
            Some(vec!["web-b".into()]),
            "web-a was deleted meanwhile"
        );
        // And a delete of what the relist dropped finds nothing to remove.
        t.apply(Event::Delete(slice("web-a", Some("web"), "10.1.0.1")));
        assert_eq!(names(&t, "web"), Some(vec!["web-b".into()]));
    }
}
