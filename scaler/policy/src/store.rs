//! The policy directory's contents as a map: a new file version replaces a policy only if it is valid.
//!
//! No I/O: the scaler reads `/etc/surge/policies/*.yaml` (and watches it) and hands the text
//! here. A rejected version leaves the previous valid policy in force.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::{Defaults, Policy};
use crate::validate::{parse_policy, PolicyError};

/// Valid policies by name.
#[derive(Clone, Debug, Default)]
pub struct PolicyStore {
    policies: BTreeMap<String, Arc<Policy>>,
}

impl PolicyStore {
    /// An empty store.
    pub fn new() -> Self {
        PolicyStore::default()
    }

    /// Applies a new version of `file_name` (e.g. `ecommerce.yaml`). On error, the previous
    /// policy of that name (if any) stays in force and the error is returned.
    pub fn apply(
        &mut self,
        file_name: &str,
        yaml: &str,
        defaults: &Defaults,
    ) -> Result<Arc<Policy>, PolicyError> {
        let stem = file_name.rsplit('/').next().unwrap_or(file_name);
        let stem = stem
            .strip_suffix(".yaml")
            .or_else(|| stem.strip_suffix(".yml"))
            .unwrap_or(stem);
        let p = Arc::new(parse_policy(yaml, defaults, stem)?);
        self.policies.insert(p.name.clone(), Arc::clone(&p));
        Ok(p)
    }

    /// Forgets a policy whose file was deleted.
    pub fn remove(&mut self, name: &str) -> Option<Arc<Policy>> {
        self.policies.remove(name)
    }

    /// A policy by name.
    pub fn get(&self, name: &str) -> Option<&Arc<Policy>> {
        self.policies.get(name)
    }

    /// Names of all policies.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.policies.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_versions_keep_the_previous_policy() {
        let d = Defaults::default();
        let mut s = PolicyStore::new();
        let p = s
            .apply("web.yaml", "policy:\n  maxReplicaCount: 7\n", &d)
            .expect("valid");
        assert_eq!(p.name, "web");
        let err = s.apply(
            "web.yaml",
            "policy:\n  maxReplicaCount: 7\n  knative: {panic-threshold-percentage: 90}\n",
            &d,
        );
        assert_eq!(
            err.map(|_| ()).map_err(|e| e.to_string()),
            Err("panic-threshold-percentage = 90, must be between 110 and 1000".to_string())
        );
        assert_eq!(s.get("web").map(|p| p.max_replicas), Some(7));
        assert_eq!(s.names().collect::<Vec<_>>(), ["web"]);
        assert!(s.remove("web").is_some());
    }
}
