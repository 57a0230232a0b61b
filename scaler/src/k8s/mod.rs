//! Surge in Kubernetes: the `SurgeScaler` custom resource, the actuator that sets replicas through
//! `/scale`, and the reconciler that turns the resources into scaled targets.

pub mod actuator;
pub mod cache;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod endpoints;
pub mod policy;

pub use actuator::KubeActuator;
pub use controller::{run, Options};
pub use crd::{SurgeScaler, SurgeScalerSpec, SurgeScalerStatus};

/// Environment variable that turns the Kubernetes side on: `true`, `false`, or `auto` (the
/// default: on when running in a pod, where `KUBERNETES_SERVICE_HOST` is set).
pub const ENV_KUBERNETES: &str = "SURGE_KUBERNETES";

/// Namespace to watch (empty or unset: all namespaces).
pub const ENV_NAMESPACE: &str = "SURGE_KUBERNETES_NAMESPACE";
/// How often every SurgeScaler is checked again without a change (default 30s).
pub const ENV_RESYNC: &str = "SURGE_KUBERNETES_RESYNC";

/// Starts the Kubernetes side when [`ENV_KUBERNETES`] (read through `env`) turns it on: a client
/// from the kubeconfig or the pod's service account, then [`run`]. `None` when it is off.
pub async fn spawn_from_env(
    env: impl Fn(&str) -> Option<String>,
    shared: std::sync::Arc<crate::state::Shared>,
    defaults: surge_policy::Defaults,
    tick: std::time::Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Option<tokio::task::JoinHandle<()>>, String> {
    let in_cluster = env("KUBERNETES_SERVICE_HOST").is_some();
    if !enabled(env(ENV_KUBERNETES).as_deref(), in_cluster)? {
        return Ok(None);
    }
    let resync = match env(ENV_RESYNC) {
        Some(v) => humantime::parse_duration(v.trim())
            .map_err(|e| format!("{ENV_RESYNC} = {v:?}: {e} (examples: 10s, 1m)"))?,
        None => std::time::Duration::from_secs(30),
    };
    let namespace = env(ENV_NAMESPACE).filter(|n| !n.trim().is_empty());
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("kubernetes: no usable kubeconfig or service account: {e}"))?;
    tracing::info!(namespace = ?namespace, "watching SurgeScalers");
    let options = Options {
        tick,
        resync,
        defaults,
        namespace,
    };
    Ok(Some(tokio::spawn(run(client, shared, options, stop))))
}

/// Whether the scaler should watch SurgeScalers, from the value of [`ENV_KUBERNETES`] and whether
/// `KUBERNETES_SERVICE_HOST` is set.
pub fn enabled(setting: Option<&str>, in_cluster: bool) -> Result<bool, String> {
    match setting.map(str::trim) {
        None | Some("") | Some("auto") => Ok(in_cluster),
        Some("true") | Some("1") => Ok(true),
        Some("false") | Some("0") => Ok(false),
        Some(other) => Err(format!(
            "{ENV_KUBERNETES} = {other:?}: must be true, false or auto"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enabled_in_a_pod_by_default_and_on_request() {
        assert_eq!(enabled(None, true), Ok(true));
        assert_eq!(enabled(Some("auto"), false), Ok(false));
        assert_eq!(enabled(Some("true"), false), Ok(true));
        assert_eq!(enabled(Some("false"), true), Ok(false));
        assert_eq!(
            enabled(Some("yes"), true),
            Err("SURGE_KUBERNETES = \"yes\": must be true, false or auto".to_string())
        );
    }
}
