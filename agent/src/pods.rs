//! Which pods of this node serve which Kubernetes Service, and where their cgroups are. Turns the
//! node's pods and the cluster's EndpointSlices into, per service (`NAMESPACE/SERVICE`, the name
//! the scaler gives it in its watch set), the pods on this node, their endpoints (address × port)
//! and their cgroup directories; then adds those to the scaler's watch set. Pure: the API
//! watching is in k8s.rs, the kernel side in node.rs.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use k8s_openapi::api::{core::v1::Pod, discovery::v1::EndpointSlice};
use surge_proto::v1::{Endpoint, WatchSet};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A pod's QoS class: it decides where the kubelet puts the pod's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    pub const ALL: [Qos; 3] = [Qos::Guaranteed, Qos::Burstable, Qos::BestEffort];

    /// `status.qosClass` as the API writes it.
    pub fn parse(s: &str) -> Option<Qos> {
        match s {
            "Guaranteed" => Some(Qos::Guaranteed),
            "Burstable" => Some(Qos::Burstable),
            "BestEffort" => Some(Qos::BestEffort),
            _ => None,
        }
    }

    /// The name of the class's parent cgroup; Guaranteed pods have none (they sit directly
    /// under the kubepods cgroup).
    fn parent(self) -> Option<&'static str> {
        match self {
            Qos::Guaranteed => None,
            Qos::Burstable => Some("burstable"),
            Qos::BestEffort => Some("besteffort"),
        }
    }
}

/// The kubelet's cgroup driver, which decides how pod cgroups are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Driver {
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice`
    Systemd,
    /// `kubepods/burstable/pod<uid>`
    Cgroupfs,
}

impl Driver {
    pub const ALL: [Driver; 2] = [Driver::Systemd, Driver::Cgroupfs];

    /// The driver whose top cgroup exists under `root`: `kubepods.slice` (systemd) or `kubepods`
    /// (cgroupfs). `None` while neither exists (no kubelet yet, or the wrong root).
    pub fn detect(root: &Path) -> Option<Driver> {
        if root.join("kubepods.slice").is_dir() {
            Some(Driver::Systemd)
        } else if root.join("kubepods").is_dir() {
            Some(Driver::Cgroupfs)
        } else {
            None
        }
    }
}

/// Whether `uid` can name a cgroup: a Kubernetes UID is hex digits and dashes. Anything else
/// (a slash, a dot) could point outside the pods' cgroups and is refused.
fn valid_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= 64 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// The cgroup directory of a pod, relative to the kubelet's cgroup root, as the kubelet names it.
pub fn pod_cgroup(driver: Driver, qos: Qos, uid: &str) -> PathBuf {
    match driver {
        Driver::Systemd => {
            let uid = uid.replace('-', "_");
            let mut p = PathBuf::from("kubepods.slice");
            match qos.parent() {
                None => p.push(format!("kubepods-pod{uid}.slice")),
                Some(q) => {
                    p.push(format!("kubepods-{q}.slice"));
                    p.push(format!("kubepods-{q}-pod{uid}.slice"));
                }
            }
            p
        }
        Driver::Cgroupfs => {
            let mut p = PathBuf::from("kubepods");
            if let Some(q) = qos.parent() {
                p.push(q);
            }
            p.push(format!("pod{uid}"));
            p
        }
    }
}

/// The directories where a pod's cgroup can be, under `root`: one when the driver and the QoS
/// class are known, else every candidate (only one can exist, as the UID is unique; the others
/// yield no cgroup id and no memory).
pub fn pod_cgroups(root: &Path, driver: Option<Driver>, qos: Option<Qos>, uid: &str) -> Vec<PathBuf> {
    let drivers = driver.map_or(Driver::ALL.to_vec(), |d| vec![d]);
    let classes = qos.map_or(Qos::ALL.to_vec(), |q| vec![q]);
    drivers
        .iter()
        .flat_map(|d| classes.iter().map(move |q| root.join(pod_cgroup(*d, *q, uid))))
        .collect()
}

/// What this node runs for one service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServicePods {
    /// The pods, as `namespace/name`.
    pub pods: BTreeSet<String>,
    /// Each pod address × each TCP port of the service's slices.
    pub endpoints: BTreeSet<SocketAddr>,
    /// The pods' cgroup directories (absolute).
    pub cgroups: BTreeSet<PathBuf>,
}

/// Per service (`namespace/service`), what this node runs for it.
pub type View = BTreeMap<String, ServicePods>;

/// A pod left out of the view, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
pub enum Skipped {
    #[error("pod {pod}: metadata.uid = {uid:?}, must be a UID (hex digits and dashes): its cgroup is not looked for")]
    BadUid { pod: String, uid: String },
}

/// A pod of this node that can be in a service.
struct Local {
    uid: String,
    cgroups: Vec<PathBuf>,
}

/// Which pods of `node` each service's EndpointSlices point at (`targetRef` of kind Pod, same
/// UID when the reference carries one), with their endpoints and cgroups under `cgroup_root`.
/// Pods that have finished (phase Succeeded or Failed) are left out; so are endpoints that point
/// at pods of other nodes. Only TCP ports count: the agent measures TCP.
pub fn view<'a>(
    node: &str,
    pods: impl IntoIterator<Item = &'a Pod>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    cgroup_root: &Path,
    driver: Option<Driver>,
) -> (View, Vec<Skipped>) {
    let mut skipped = Vec::new();
    let mut local: HashMap<(String, String), Local> = HashMap::new();
    for pod in pods {
        let spec_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref());
        if spec_node != Some(node) || matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let (Some(ns), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
            continue;
        };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if !valid_uid(&uid) {
            skipped.push(Skipped::BadUid {
                pod: format!("{ns}/{name}"),
                uid,
            });
            continue;
        }
        let qos = status.and_then(|s| s.qos_class.as_deref()).and_then(Qos::parse);
        local.insert(
            (ns.clone(), name.clone()),
            Local {
                cgroups: pod_cgroups(cgroup_root, driver, qos, &uid),
                uid,
            },
        );
    }

    let mut out = View::new();
    for slice in slices {
        let meta = &slice.metadata;
        let (Some(ns), Some(service)) = (
            &meta.namespace,
            meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)),
        ) else {
            continue;
        };
        let ports: Vec<u16> = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
            .filter_map(|p| p.port.and_then(|n| u16::try_from(n).ok()))
            .filter(|n| *n != 0)
            .collect();
        for ep in &slice.endpoints {
            let Some(r) = &ep.target_ref else { continue };
            if r.kind.as_deref() != Some("Pod") {
                continue;
            }
            let key = (
                r.namespace.clone().unwrap_or_else(|| ns.clone()),
                r.name.clone().unwrap_or_default(),
            );
            let Some(pod) = local.get(&key) else { continue };
            // A slice that still names an earlier pod of the same name (a StatefulSet's) is stale.
            if r.uid.as_ref().is_some_and(|u| *u != pod.uid) {
                continue;
            }
            let entry = out.entry(format!("{ns}/{service}")).or_default();
            entry.pods.insert(format!("{}/{}", key.0, key.1));
            entry.cgroups.extend(pod.cgroups.iter().cloned());
            for ip in ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                entry
                    .endpoints
                    .extend(ports.iter().map(|p| SocketAddr::new(ip, *p)));
            }
        }
    }
    skipped.sort();
    skipped.dedup();
    (out, skipped)
}

/// Reduces an EndpointSlice to what [`view`] reads for `node`, before it is kept: endpoints of
/// pods on other nodes go (those whose node is not given stay, and [`view`] still matches them
/// to this node's pods), and so do the metadata fields nothing reads. The agent keeps every
/// Service's slices of the cluster, so what it keeps of each is this node's share.
pub fn trim_slice(node: &str, slice: &mut EndpointSlice) {
    slice
        .endpoints
        .retain(|ep| ep.node_name.as_deref().is_none_or(|n| n == node));
    for ep in &mut slice.endpoints {
        ep.hints = None;
        ep.deprecated_topology = None;
        ep.zone = None;
    }
    let meta = &mut slice.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
}

/// The scaler's watch set with this node's pods added to the services it names: their endpoints
/// (those the scaler already lists are not repeated) and their cgroups. Services the scaler does
/// not name are not added: the scaler decides what is watched, the node fills in what it runs.
pub fn merge(set: &WatchSet, view: &View) -> WatchSet {
    let mut out = set.clone();
    for s in &mut out.services {
        let Some(local) = view.get(&s.name) else { continue };
        let listed: BTreeSet<(Option<IpAddr>, u32)> =
            s.endpoints.iter().map(|e| (e.ip.parse().ok(), e.port)).collect();
        for addr in &local.endpoints {
            if !listed.contains(&(Some(addr.ip()), addr.port() as u32)) {
                s.endpoints.push(Endpoint {
                    ip: addr.ip().to_string(),
                    port: addr.port() as u32,
                });
            }
        }
        for dir in &local.cgroups {
            let dir = dir.to_string_lossy().into_owned();
            if !s.cgroups.contains(&dir) {
                s.cgroups.push(dir);
            }
        }
    }
    out
}

/// The services whose entry differs between two views, with their new entry (empty when gone).
pub fn changes<'a>(before: &'a View, after: &'a View) -> Vec<(&'a str, ServicePods)> {
    let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    names
        .into_iter()
        .filter(|n| before.get(*n) != after.get(*n))
        .map(|n| (n.as_str(), after.get(n).cloned().unwrap_or_default()))
        .collect()
}

#[cfg(test)]
mod tests;
