//! The Kubernetes actuator: replicas asked for are the target's `/scale` `spec.replicas`; ready
//! replicas are the ready endpoints of the target's Service (discovery.k8s.io/v1 EndpointSlices,
//! or core/v1 Endpoints where v1 is not served), or the target's own `status.readyReplicas` when
//! the Service has no endpoints object; `scale` patches `/scale`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU8, Ordering},
        RwLock,
    },
};

use k8s_openapi::api::{core::v1::Endpoints, discovery::v1::EndpointSlice};
use kube::{
    api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams},
    core::GroupVersionKind,
    Api, Client,
};
use surge_policy::Replicas;

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
    /// Targets by the service key the control loop uses (`namespace/name`).
    targets: RwLock<HashMap<String, Target>>,
    /// Whether discovery.k8s.io/v1 EndpointSlices are served (learned on first use).
    slices: AtomicU8,
    /// The endpoints (pod IP and port, ready or not) last seen for each service.
    endpoints: RwLock<BTreeMap<String, Vec<SocketAddr>>>,
}

/// What a Service's endpoints objects say.
struct Seen {
    ready: u32,
    endpoints: Vec<SocketAddr>,
}

/// Every address × port pair that parses, sorted and without duplicates.
fn pairs<'a>(addresses: impl Iterator<Item = &'a str>, ports: &[i32]) -> BTreeSet<SocketAddr> {
    let ips: Vec<IpAddr> = addresses.filter_map(|a| a.parse().ok()).collect();
    ips.iter()
        .flat_map(|ip| {
            ports
                .iter()
                .filter_map(|p| u16::try_from(*p).ok())
                .map(move |p| SocketAddr::new(*ip, p))
        })
        .collect()
}

impl KubeActuator {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            targets: RwLock::new(HashMap::new()),
            slices: AtomicU8::new(SLICES_UNKNOWN),
            endpoints: RwLock::new(BTreeMap::new()),
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
        if let Ok(mut e) = self.endpoints.write() {
            e.remove(service);
        }
    }

    /// The endpoints last seen for each service with a target: what the agents should watch.
    pub fn endpoints(&self) -> BTreeMap<String, Vec<SocketAddr>> {
        self.endpoints.read().map(|e| e.clone()).unwrap_or_default()
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

    /// Replicas asked for now (`/scale` spec.replicas).
    pub async fn current(&self, t: &Target) -> Result<u32, kube::Error> {
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

    /// The target's Service's endpoints; `None` when the Service has no endpoints object.
    async fn seen(&self, t: &Target) -> Result<Option<Seen>, kube::Error> {
        if self.slices.load(Ordering::Relaxed) != SLICES_NOT_SERVED {
            let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &t.namespace);
            let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={}", t.service));
            match api.list(&lp).await {
                Ok(list) => {
                    self.slices.store(SLICES_V1, Ordering::Relaxed);
                    if list.items.is_empty() {
                        return Ok(None);
                    }
                    let mut ready = BTreeSet::new();
                    let mut all = BTreeSet::new();
                    for slice in &list.items {
                        let ports: Vec<i32> = slice.ports.iter().flatten().filter_map(|p| p.port).collect();
                        for e in &slice.endpoints {
                            all.extend(pairs(e.addresses.iter().map(String::as_str), &ports));
                            // An endpoint without a ready condition is ready (the API's rule).
                            if e.conditions.as_ref().and_then(|c| c.ready) != Some(false) {
                                ready.insert(e.addresses.first().cloned().unwrap_or_default());
                            }
                        }
                    }
                    return Ok(Some(Seen {
                        ready: ready.len() as u32,
                        endpoints: all.into_iter().collect(),
                    }));
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
        let Some(ep) = api.get_opt(&t.service).await? else {
            return Ok(None);
        };
        let mut ready = 0;
        let mut all = BTreeSet::new();
        for subset in ep.subsets.iter().flatten() {
            let ports: Vec<i32> = subset.ports.iter().flatten().map(|p| p.port).collect();
            let addresses = subset.addresses.iter().flatten();
            ready += addresses.clone().count() as u32;
            let not_ready = subset.not_ready_addresses.iter().flatten();
            all.extend(pairs(addresses.chain(not_ready).map(|a| a.ip.as_str()), &ports));
        }
        Ok(Some(Seen {
            ready,
            endpoints: all.into_iter().collect(),
        }))
    }

    /// Ready replicas: the Service's ready endpoints, else the target's status.readyReplicas,
    /// else the `/scale` status.replicas.
    /// Records the Service's endpoints under `service`.
    pub async fn ready(&self, service: &str, t: &Target) -> Result<u32, kube::Error> {
        let seen = self.seen(t).await?;
        if let Ok(mut e) = self.endpoints.write() {
            e.insert(
                service.into(),
                seen.as_ref().map(|s| s.endpoints.clone()).unwrap_or_default(),
            );
        }
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

    #[test]
    fn endpoints_are_every_address_and_port() {
        let got = pairs(
            ["10.0.0.2", "fd00::1", "not-an-ip"].into_iter(),
            &[8080, 70000, 9090],
        );
        let want: BTreeSet<SocketAddr> = [
            "10.0.0.2:8080",
            "10.0.0.2:9090",
            "[fd00::1]:8080",
            "[fd00::1]:9090",
        ]
        .iter()
        .map(|s| s.parse().expect("literal"))
        .collect();
        assert_eq!(got, want);
    }
}
