//! The cgroups of a service: their kernel ids (the inode numbers of the cgroup v2 directories,
//! which is what `bpf_get_current_cgroup_id` returns), descendants included, and their memory.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// A cgroup directory given by the scaler: absolute, or relative to the cgroup v2 root.
pub fn resolve(root: &Path, given: &str) -> PathBuf {
    let p = Path::new(given);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        root.join(p)
    }
}

/// The ids of `dir` and every cgroup below it. A directory that is gone yields nothing.
pub fn ids_with_descendants(dir: &Path) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&d) else { continue };
        ids.push(meta.ino());
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    ids
}

/// Memory in use by a cgroup: `memory.current` where the memory controller is enabled on the v2
/// hierarchy; otherwise (hybrid layouts, where memory is a v1 controller) the resident memory of
/// every process in it and below it.
pub fn memory_bytes(dir: &Path) -> u64 {
    if let Some(v) = std::fs::read_to_string(dir.join("memory.current"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        return v;
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
            for pid in procs.lines() {
                let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
                let resident: u64 = statm
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                total += resident * page;
            }
        }
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_under_the_root() {
        assert_eq!(
            resolve(Path::new("/sys/fs/cgroup"), "surge/web-1"),
            PathBuf::from("/sys/fs/cgroup/surge/web-1")
        );
        assert_eq!(
            resolve(Path::new("/sys/fs/cgroup"), "/x/y"),
            PathBuf::from("/x/y")
        );
    }

    #[test]
    fn a_tree_yields_every_directory_once() {
        let root = std::env::temp_dir().join(format!("surge-cg-{}", std::process::id()));
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        std::fs::create_dir_all(root.join("c")).expect("mkdir");
        let mut ids = ids_with_descendants(&root);
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 4);
        assert!(ids_with_descendants(&root.join("missing")).is_empty());
        let _ = std::fs::remove_dir_all(&root);
    }
}
