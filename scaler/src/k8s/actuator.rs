//! The Kubernetes actuator: replicas asked for are the target's `/scale` `spec.replicas`; ready
//! replicas are the ready endpoints of the target's Service (discovery.k8s.io/v1 EndpointSlices,
//! or core/v1 Endpoints where v1 is not served), or the target's own `status.readyReplicas` when
//! the Service has no endpoints object; `scale` patches `/scale`. The Service's ClusterIP and
//! port, with its ready endpoints on the matching target port, are what the agents hold while
//! the target is at zero (see [`Hold`]).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc, RwLock,
    },
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams},
    core::GroupVersionKind,
    Api, Client,
};
use surge_policy::Replicas;

use super::{
    cache::{ClusterCache, SERVICE_NAME_LABEL},
    endpoints::{self, Seen},
};
use crate::actuator::{Actuator, ActuatorError};

/// Field manager of every write Surge makes.
pub const MANAGER: &str = "surge-scaler";

/// A resolved scale target.
#[derive(Debug, Clone)]
pub struct Target {
    pub namespace: String,
    pub resource: ApiResource,
    pub name: String,
    /// The Service whose endpoints are the replicas.
    pub service: String,
    /// The Service port held at zero (`spec.servicePort`); `None`: the first TCP port.
    pub service_port: Option<u16>,
}

/// What the agents hold for a target at zero: connections to the Service's ClusterIP and port,
/// handed to the ready endpoints on the target port that the Service port names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub address: SocketAddr,
    pub backends: Vec<SocketAddr>,
}

/// What the agents are told of one scaled Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watched {
    /// Every endpoint (pod IP and port, ready or not): measured.
    pub endpoints: Vec<SocketAddr>,
    /// `None` where the Service cannot be held (headless, no TCP port, not readable).
    pub hold: Option<Hold>,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("scaleTargetRef.apiVersion = {0:?}: must be GROUP/VERSION or VERSION")]
    ApiVersion(String),
    #[error("scaleTargetRef {api_version}/{kind} is not served by this cluster: {source}")]
    Unknown {
        api_version: String,
        kind: String,
        source: kube::Error,
    },
    #[error("scaleTargetRef {0} has no /scale subresource")]
    NotScalable(String),
}

/// Finds the resource of `api_version`/`kind` and checks that it has `/scale`.
pub async fn resolve(client: &Client, api_version: &str, kind: &str) -> Result<ApiResource, TargetError> {
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) if !g.is_empty() && !v.is_empty() && !v.contains('/') => (g, v),
        None if !api_version.is_empty() => ("", api_version),
        _ => return Err(TargetError::ApiVersion(api_version.into())),
    };
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .map_err(|source| TargetError::Unknown {
            api_version: api_version.into(),
            kind: kind.into(),
            source,
        })?;
    if !caps.subresources.iter().any(|(r, _)| r.plural == "scale") {
        return Err(TargetError::NotScalable(format!("{api_version}/{kind}")));
    }
    Ok(resource)
}

const SLICES_UNKNOWN: u8 = 0;
const SLICES_V1: u8 = 1;
const SLICES_NOT_SERVED: u8 = 2;

pub struct KubeActuator {
    client: Client,
    /// Services and endpoints as watched; read from the API until it is listed.
    cache: Arc<ClusterCache>,
    /// Targets by the service key the control loop uses (`namespace/name`).
    targets: RwLock<HashMap<String, Target>>,
    /// Whether discovery.k8s.io/v1 EndpointSlices are served (learned on first use).
    slices: AtomicU8,
    /// What the agents should know of each service, as last seen.
    watched: RwLock<BTreeMap<String, Watched>>,
    /// The last reason a Service could not be held, by service: logged when it changes.
    unheld: RwLock<BTreeMap<String, String>>,
}

/// Why a Service's connections cannot be held.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HoldError {
    #[error("Service {0:?} is headless (clusterIP None): there is no address to hold")]
    Headless(String),
    #[error("Service {0:?} has no clusterIP yet")]
    NoClusterIp(String),
    #[error("Service {service:?} has no TCP port {port}")]
    NoSuchPort { service: String, port: u16 },
    #[error("Service {0:?} has no TCP port")]
    NoTcpPort(String),
    #[error("Service {service:?} has clusterIP {ip:?}, which is not an IP address")]
    BadClusterIp { service: String, ip: String },
}

/// The ClusterIP and the Service port to hold, with that port's name: `wanted` or the first TCP
/// port.
pub fn held_port(svc: &Service, wanted: Option<u16>) -> Result<(SocketAddr, String), HoldError> {
    let name = svc.metadata.name.clone().unwrap_or_default();
    let spec = svc.spec.clone().unwrap_or_default();
    let ip = spec.cluster_ip.clone().unwrap_or_default();
    if ip == "None" {
        return Err(HoldError::Headless(name));
    }
    if ip.is_empty() {
        return Err(HoldError::NoClusterIp(name));
    }
    let ip: IpAddr = ip.parse().map_err(|_| HoldError::BadClusterIp {
        service: name.clone(),
        ip: ip.clone(),
    })?;
    let tcp = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP");
    let port = match wanted {
        Some(w) => tcp
            .clone()
            .find(|p| p.port == i32::from(w))
            .ok_or(HoldError::NoSuchPort {
                service: name.clone(),
                port: w,
            })?,
        None => tcp.clone().next().ok_or(HoldError::NoTcpPort(name.clone()))?,
    };
    let number = u16::try_from(port.port).map_err(|_| HoldError::NoTcpPort(name))?;
    Ok((SocketAddr::new(ip, number), port.name.clone().unwrap_or_default()))
}

impl KubeActuator {
    pub fn new(client: Client, cache: Arc<ClusterCache>) -> Self {
        Self {
            client,
            cache,
            targets: RwLock::new(HashMap::new()),
            slices: AtomicU8::new(SLICES_UNKNOWN),
            watched: RwLock::new(BTreeMap::new()),
            unheld: RwLock::new(BTreeMap::new()),
        }
    }

    pub fn set_target(&self, service: &str, target: Target) {
        if let Ok(mut t) = self.targets.write() {
            t.insert(service.into(), target);
        }
    }

    pub fn remove_target(&self, service: &str) {
        if let Ok(mut t) = self.targets.write() {
            t.remove(service);
        }
        if let Ok(mut e) = self.watched.write() {
            e.remove(service);
        }
    }

    /// What was last seen for each service with a target: what the agents should watch.
    pub fn watched(&self) -> BTreeMap<String, Watched> {
        self.watched.read().map(|e| e.clone()).unwrap_or_default()
    }

    fn target(&self, service: &str) -> Result<Target, ActuatorError> {
        self.targets
            .read()
            .ok()
            .and_then(|t| t.get(service).cloned())
            .ok_or_else(|| ActuatorError::UnknownService {
                service: service.into(),
            })
    }

    fn api(&self, t: &Target) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &t.namespace, &t.resource)
    }

    /// Replicas asked for now (`/scale` spec.replicas): from the watch cache for the kinds where
    /// that is the object's `spec.replicas`, else read from the API.
    pub async fn current(&self, t: &Target) -> Result<u32, kube::Error> {
        if let Some(Some(n)) = self.cache.target_replicas(&t.namespace, &t.name, &t.resource) {
            return Ok(n);
        }
        let scale = self.api(t).get_scale(&t.name).await?;
        Ok(scale.spec.and_then(|s| s.replicas).unwrap_or(0).max(0) as u32)
    }

    /// Sets `/scale` spec.replicas.
    pub async fn set(&self, t: &Target, replicas: u32) -> Result<(), kube::Error> {
        let patch = serde_json::json!({ "spec": { "replicas": replicas } });
        self.api(t)
            .patch_scale(
                &t.name,
                &PatchParams {
                    field_manager: Some(MANAGER.into()),
                    ..Default::default()
                },
                &Patch::Merge(&patch),
            )
            .await
            .map(|_| ())
    }

    /// The target's Service's endpoints; `None` when the Service has no endpoints object. From
    /// the watch cache once it is listed, else read from the API.
    async fn seen(&self, t: &Target) -> Result<Option<Seen>, kube::Error> {
        if let Some(cached) = self.cache.seen(&t.namespace, &t.service) {
            return Ok(cached);
        }
        if self.slices.load(Ordering::Relaxed) != SLICES_NOT_SERVED {
            let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &t.namespace);
            let lp = ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={}", t.service));
            match api.list(&lp).await {
                Ok(list) => {
                    self.slices.store(SLICES_V1, Ordering::Relaxed);
                    return Ok(endpoints::from_slices(&list.items));
                }
                Err(kube::Error::Api(s))
                    if s.is_not_found() && self.slices.load(Ordering::Relaxed) == SLICES_UNKNOWN =>
                {
                    tracing::info!(
                        "discovery.k8s.io/v1 EndpointSlices are not served; reading core/v1 Endpoints"
                    );
                    self.slices.store(SLICES_NOT_SERVED, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        let api: Api<Endpoints> = Api::namespaced(self.client.clone(), &t.namespace);
        Ok(api
            .get_opt(&t.service)
            .await?
            .as_ref()
            .map(endpoints::from_endpoints))
    }

    /// Ready replicas: the Service's ready endpoints, else the target's status.readyReplicas,
    /// else the `/scale` status.replicas.
    /// Records the Service's endpoints under `service`.
    pub async fn ready(&self, service: &str, t: &Target) -> Result<u32, kube::Error> {
        let seen = self.seen(t).await?;
        let found = match self.cache.service(&t.namespace, &t.service) {
            Some(cached) => Ok(cached),
            None => {
                let api: Api<Service> = Api::namespaced(self.client.clone(), &t.namespace);
                api.get_opt(&t.service).await.map(|s| s.map(Arc::new))
            }
        };
        self.record(service, t, found, seen.as_ref());
        if let Some(s) = seen {
            return Ok(s.ready);
        }
        let obj = self.api(t).get(&t.name).await?;
        if let Some(n) = obj.data.pointer("/status/readyReplicas").and_then(|v| v.as_u64()) {
            return Ok(n as u32);
        }
        let scale = self.api(t).get_scale(&t.name).await?;
        Ok(scale.status.map_or(0, |s| s.replicas.max(0) as u32))
    }

    /// Records what the agents should know of every target's Service from the watch cache,
    /// without an API request; does nothing until the cache is listed.
    pub fn refresh_from_cache(&self) {
        if !self.cache.synced() {
            return;
        }
        let targets: Vec<(String, Target)> = match self.targets.read() {
            Ok(t) => t.iter().map(|(s, t)| (s.clone(), t.clone())).collect(),
            Err(_) => return,
        };
        for (service, t) in targets {
            let (Some(seen), Some(found)) = (
                self.cache.seen(&t.namespace, &t.service),
                self.cache.service(&t.namespace, &t.service),
            ) else {
                continue;
            };
            self.record(&service, &t, Ok(found), seen.as_ref());
        }
    }

    /// Records the endpoints of `service` and how its connections are held, from its Service
    /// (`found`) and endpoints (`seen`).
    fn record(
        &self,
        service: &str,
        t: &Target,
        found: Result<Option<Arc<Service>>, kube::Error>,
        seen: Option<&Seen>,
    ) {
        let hold = self.hold(service, t, found, seen);
        if let Ok(mut e) = self.watched.write() {
            e.insert(
                service.into(),
                Watched {
                    endpoints: seen.map(|s| s.endpoints.clone()).unwrap_or_default(),
                    hold,
                },
            );
        }
    }

    /// The target's Service's ClusterIP and port, and the ready endpoints on its target port;
    /// `None`, logged once per reason, where it cannot be held.
    fn hold(
        &self,
        service: &str,
        t: &Target,
        found: Result<Option<Arc<Service>>, kube::Error>,
        seen: Option<&Seen>,
    ) -> Option<Hold> {
        let found = match found {
            Ok(Some(svc)) => held_port(&svc, t.service_port).map_err(|e| e.to_string()),
            Ok(None) => Err(format!("Service {:?} not found", t.service)),
            Err(e) => Err(format!("cannot read Service {:?}: {e}", t.service)),
        };
        let (address, port_name) = match found {
            Ok(x) => x,
            Err(why) => {
                let mut unheld = self.unheld.write().ok()?;
                if unheld.get(service) != Some(&why) {
                    tracing::warn!(service, reason = %why, "connections to the service are not held at zero");
                    unheld.insert(service.into(), why);
                }
                return None;
            }
        };
        if let Ok(mut unheld) = self.unheld.write() {
            unheld.remove(service);
        }
        let backends = seen
            .and_then(|s| s.ready_by_port.get(&port_name))
            .map(|b| b.iter().copied().collect())
            .unwrap_or_default();
        Some(Hold { address, backends })
    }
}

#[tonic::async_trait]
impl Actuator for KubeActuator {
    async fn replicas(&self, service: &str) -> Result<Replicas, ActuatorError> {
        let t = self.target(service)?;
        let read = |e: kube::Error| ActuatorError::Read {
            service: service.into(),
            message: e.to_string(),
        };
        let current = self.current(&t).await.map_err(read)?;
        let ready = self.ready(service, &t).await.map_err(read)?;
        Ok(Replicas { current, ready })
    }

    async fn scale(&self, service: &str, replicas: u32) -> Result<(), ActuatorError> {
        let t = self.target(service)?;
        self.set(&t, replicas).await.map_err(|e| ActuatorError::Scale {
            service: service.into(),
            replicas,
            message: e.to_string(),
        })
    }

    fn kind(&self) -> &'static str {
        "kubernetes"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(cluster_ip: &str, ports: serde_json::Value) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web"},
            "spec": {"clusterIP": cluster_ip, "ports": ports},
        }))
        .expect("service")
    }

    #[test]
    fn the_held_port_is_the_one_asked_for_or_the_first_tcp_one() {
        let ports = serde_json::json!([
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "http", "port": 80, "targetPort": 8080},
            {"name": "grpc", "port": 9090, "protocol": "TCP"},
        ]);
        let svc = service("10.0.0.7", ports);
        assert_eq!(
            held_port(&svc, None),
            Ok(("10.0.0.7:80".parse().expect("literal"), "http".into()))
        );
        assert_eq!(
            held_port(&svc, Some(9090)),
            Ok(("10.0.0.7:9090".parse().expect("literal"), "grpc".into()))
        );
        assert_eq!(
            held_port(&svc, Some(53)).map_err(|e| e.to_string()),
            Err("Service \"web\" has no TCP port 53".into())
        );
        assert_eq!(
            held_port(&service("None", serde_json::json!([{"port": 80}])), None).map_err(|e| e.to_string()),
            Err("Service \"web\" is headless (clusterIP None): there is no address to hold".into())
        );
        assert_eq!(
            held_port(
                &service("10.0.0.7", serde_json::json!([{"port": 53, "protocol": "UDP"}])),
                None
            )
            .map_err(|e| e.to_string()),
            Err("Service \"web\" has no TCP port".into())
        );
    }
}
