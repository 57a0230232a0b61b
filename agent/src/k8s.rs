//! The agent's Kubernetes source: watches the pods of this node (`spec.nodeName`) and the
//! cluster's EndpointSlices (discovery.k8s.io/v1), and publishes, whenever they change, which
//! services those pods serve, with their endpoints and cgroups (the mapping is pods.rs). The link
//! adds what it publishes to the scaler's watch set.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::{core::v1::Pod, discovery::v1::EndpointSlice};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{reflector, watcher, WatchStreamExt},
    Api, Client, Config,
};
use tokio::sync::watch;

use crate::pods::{self, Driver, View, SERVICE_NAME_LABEL};

/// Turns the Kubernetes source on: `true`, `false`, or `auto` (the default: on in a pod, where
/// `KUBERNETES_SERVICE_HOST` is set), as for the scaler.
pub const ENV_KUBERNETES: &str = "SURGE_KUBERNETES";

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("{ENV_KUBERNETES} = {0:?}: must be true, false or auto")]
    Setting(String),
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("kubernetes: no usable kubeconfig or service account: {0}")]
    Client(#[source] kube::Error),
}

/// Whether the agent watches the API, from the setting and whether it runs in a pod.
pub fn enabled(setting: Option<&str>, in_cluster: bool) -> Result<bool, K8sError> {
    match setting.map(str::trim) {
        None | Some("") | Some("auto") => Ok(in_cluster),
        Some("true") | Some("1") => Ok(true),
        Some("false") | Some("0") => Ok(false),
        Some(other) => Err(K8sError::Setting(other.to_string())),
    }
}

/// What the source watches.
#[derive(Debug, Clone)]
pub struct Options {
    /// This node's name, as the API knows it (`NODE_NAME` from the downward API).
    pub node: String,
    /// The directory that holds the kubelet's `kubepods.slice` or `kubepods`.
    pub cgroup_root: PathBuf,
}

/// A client from `kubeconfig` when given, else the usual places (the pod's service account,
/// `KUBECONFIG`, `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, K8sError> {
    let Some(path) = kubeconfig else {
        return Client::try_default().await.map_err(K8sError::Client);
    };
    let bad = |message: String| K8sError::Kubeconfig {
        path: path.display().to_string(),
        message,
    };
    let kc = Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| bad(e.to_string()))?;
    Client::try_from(config).map_err(K8sError::Client)
}

/// Starts watching; the receiver holds the latest view (empty until both watches have listed).
pub fn spawn(client: Client, options: Options, stop: watch::Receiver<bool>) -> watch::Receiver<View> {
    let (tx, rx) = watch::channel(View::new());
    tokio::spawn(run(client, options, tx, stop));
    rx
}

/// Which watch an event came from.
#[derive(Debug, Clone, Copy)]
enum Source {
    Pods,
    Slices,
}

impl Source {
    fn what(self) -> &'static str {
        match self {
            Source::Pods => "pods of this node",
            Source::Slices => "discovery.k8s.io/v1 EndpointSlices",
        }
    }
}

async fn run(client: Client, options: Options, tx: watch::Sender<View>, mut stop: watch::Receiver<bool>) {
    let (pod_store, pod_writer) = reflector::store::<Pod>();
    let (slice_store, slice_writer) = reflector::store::<EndpointSlice>();
    let on_node = watcher::Config::default().fields(&format!("spec.nodeName={}", options.node));
    let pods = watcher(Api::<Pod>::all(client.clone()), on_node)
        .default_backoff()
        .reflect(pod_writer)
        .map(|e| (Source::Pods, e.map(|ev| matches!(ev, watcher::Event::InitDone))));
    // Only slices of a Service (they carry its name); the pods pick the few that matter.
    let of_services = watcher::Config::default().labels(SERVICE_NAME_LABEL);
    let node = options.node.clone();
    let slices = watcher(Api::<EndpointSlice>::all(client), of_services)
        .default_backoff()
        .modify(move |slice| pods::trim_slice(&node, slice))
        .reflect(slice_writer)
        .map(|e| (Source::Slices, e.map(|ev| matches!(ev, watcher::Event::InitDone))));
    let mut events = std::pin::pin!(futures::stream::select(pods, slices));
    let (mut pods_listed, mut slices_listed) = (false, false);
    let mut reported: BTreeSet<pods::Skipped> = BTreeSet::new();
    let mut last_driver: Option<Option<Driver>> = None;
    tracing::info!(node = %options.node, cgroup_root = %options.cgroup_root.display(), "watching this node's pods");
    loop {
        let first = tokio::select! {
            e = events.next() => e,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Some(first) = first else { return };
        // Whatever else is ready now goes into the same recomputation.
        let mut batch = vec![first];
        while let Some(Some(e)) = events.next().now_or_never() {
            batch.push(e);
        }
        for (source, result) in batch {
            match result {
                Ok(true) => match source {
                    Source::Pods => pods_listed = true,
                    Source::Slices => slices_listed = true,
                },
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(watching = source.what(), error = %e, "kubernetes watch failed; retrying")
                }
            }
        }
        if !(pods_listed && slices_listed) {
            continue;
        }
        let (pods_now, slices_now) = (pod_store.state(), slice_store.state());
        let (node, root) = (options.node.clone(), options.cgroup_root.clone());
        // Stats the cgroup root and walks every slice: off the runtime threads.
        let computed = tokio::task::spawn_blocking(move || {
            let driver = Driver::detect(&root);
            let (view, skipped) = pods::view(
                &node,
                pods_now.iter().map(|p| &**p),
                slices_now.iter().map(|s| &**s),
                &root,
                driver,
            );
            (driver, view, skipped)
        })
        .await;
        let Ok((driver, view, skipped)) = computed else {
            continue;
        };
        if last_driver != Some(driver) {
            match driver {
                Some(d) => {
                    tracing::info!(driver = ?d, cgroup_root = %options.cgroup_root.display(), "kubelet cgroup driver")
                }
                None => tracing::warn!(
                    cgroup_root = %options.cgroup_root.display(),
                    "neither kubepods.slice (systemd driver) nor kubepods (cgroupfs driver) is under the kubelet cgroup root; \
                     looking for every layout (set --kube-cgroup-root if the kubelet runs with --cgroup-root)"
                ),
            }
            last_driver = Some(driver);
        }
        for s in &skipped {
            if !reported.contains(s) {
                tracing::warn!(problem = %s, "pod skipped");
            }
        }
        reported = skipped.into_iter().collect();
        tx.send_if_modified(|current| {
            let changed = pods::changes(current, &view);
            let any = !changed.is_empty();
            for (service, now) in changed {
                tracing::info!(
                    service = %service,
                    pods = ?now.pods,
                    endpoints = now.endpoints.len(),
                    cgroups = now.cgroups.len(),
                    driver = ?driver,
                    "pods of the service on this node"
                );
            }
            *current = view;
            any
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enabled_in_a_pod_by_default_and_on_request() {
        assert!(enabled(None, true).expect("valid"));
        assert!(!enabled(Some("auto"), false).expect("valid"));
        assert!(enabled(Some("true"), false).expect("valid"));
        assert!(!enabled(Some("false"), true).expect("valid"));
        assert_eq!(
            enabled(Some("yes"), true).expect_err("invalid").to_string(),
            "SURGE_KUBERNETES = \"yes\": must be true, false or auto"
        );
    }
}
