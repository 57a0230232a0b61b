//! The policy directory: one YAML file per policy, read at start and re-read when a file changes.
//! A file that fails validation keeps its previous valid version in force; its error is shown.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use surge_policy::{config::Defaults, store::PolicyStore, Policy};

/// What the directory holds now.
#[derive(Default)]
pub struct PolicyDir {
    dir: PathBuf,
    store: PolicyStore,
    /// Each file's modification time and the policy name it produced.
    files: BTreeMap<String, (SystemTime, Option<String>)>,
    /// The current error of each file that failed, by file name.
    errors: BTreeMap<String, String>,
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq)]
pub struct Reload {
    pub applied: Vec<String>,
    pub rejected: Vec<(String, String)>,
    pub removed: Vec<String>,
}

impl PolicyDir {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            ..Default::default()
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The policy named `name`, if one is in force.
    pub fn get(&self, name: &str) -> Option<Arc<Policy>> {
        self.store.get(name).cloned()
    }

    /// Files whose last version was rejected, with the reason.
    pub fn errors(&self) -> &BTreeMap<String, String> {
        &self.errors
    }

    /// Re-reads files that are new or changed and forgets deleted ones. Blocking file I/O.
    pub fn reload(&mut self, defaults: &Defaults) -> Reload {
        let mut out = Reload::default();
        let mut seen = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                self.errors.insert(
                    String::new(),
                    format!("cannot read the policy directory {}: {e}", self.dir.display()),
                );
                return out;
            }
        };
        self.errors.remove("");
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(file) = path.file_name().and_then(|f| f.to_str()).map(str::to_string) else {
                continue;
            };
            if !(file.ends_with(".yaml") || file.ends_with(".yml")) || file.starts_with('.') {
                continue;
            }
            seen.push(file.clone());
            let mtime = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            if self.files.get(&file).is_some_and(|(t, _)| *t == mtime) {
                continue;
            }
            let previous = self.files.get(&file).and_then(|(_, n)| n.clone());
            let result = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| {
                    self.store
                        .apply(&file, &text, defaults)
                        .map_err(|e| e.to_string())
                });
            match result {
                Ok(policy) => {
                    self.errors.remove(&file);
                    out.applied.push(policy.name.clone());
                    self.files.insert(file, (mtime, Some(policy.name.clone())));
                }
                Err(message) => {
                    out.rejected.push((file.clone(), message.clone()));
                    self.errors.insert(file.clone(), message);
                    self.files.insert(file, (mtime, previous));
                }
            }
        }
        let gone: Vec<String> = self.files.keys().filter(|f| !seen.contains(f)).cloned().collect();
        for file in gone {
            if let Some((_, Some(name))) = self.files.remove(&file) {
                self.store.remove(&name);
                out.removed.push(name);
            }
            self.errors.remove(&file);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "policy:\n  name: web\n  algorithm: hpa\n  maxReplicaCount: 5\n  triggers:\n    - metric: rps\n      target: 10\n";

    fn dir(test: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("surge-policies-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn a_bad_version_keeps_the_previous_policy_in_force() {
        let d = dir("bad-version");
        std::fs::write(d.join("web.yaml"), GOOD).expect("write");
        let mut p = PolicyDir::new(d.clone());
        let r = p.reload(&Defaults::default());
        assert_eq!(r.applied, vec!["web".to_string()]);
        assert_eq!(p.get("web").map(|x| x.max_replicas), Some(5));

        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(
            d.join("web.yaml"),
            GOOD.replace("maxReplicaCount: 5", "maxReplicaCount: -1"),
        )
        .expect("write");
        let r = p.reload(&Defaults::default());
        assert_eq!(r.rejected.len(), 1, "{r:?}");
        assert!(
            p.errors()
                .get("web.yaml")
                .is_some_and(|e| e.contains("maxReplicaCount")),
            "{:?}",
            p.errors()
        );
        assert_eq!(
            p.get("web").map(|x| x.max_replicas),
            Some(5),
            "the previous policy stays in force"
        );

        std::fs::remove_file(d.join("web.yaml")).expect("rm");
        let r = p.reload(&Defaults::default());
        assert_eq!(r.removed, vec!["web".to_string()]);
        assert!(p.get("web").is_none());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn unchanged_files_are_not_read_again() {
        let d = dir("unchanged");
        std::fs::write(d.join("web.yaml"), GOOD).expect("write");
        let mut p = PolicyDir::new(d.clone());
        p.reload(&Defaults::default());
        assert_eq!(p.reload(&Defaults::default()), Reload::default());
        let _ = std::fs::remove_dir_all(&d);
    }
}
