//! Checks that this machine can run the agent, before anything is loaded: privileges, kernel BTF,
//! a cgroup v2 hierarchy, tracefs. Each failure is one line that says what is missing and how to
//! fix it.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("missing privileges: the agent needs root, or the capabilities CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and CAP_SYS_RESOURCE (run it as root, or grant them in the DaemonSet's securityContext)")]
    NotPrivileged,
    #[error("kernel BTF not found at {path}: {reason} (the kernel needs CONFIG_DEBUG_INFO_BTF=y; or pass --btf with a BTF file for this kernel)")]
    NoBtf { path: PathBuf, reason: String },
    #[error("no cgroup v2 hierarchy is mounted ({mounts} lists none): mount one with `mount -t cgroup2 none /sys/fs/cgroup`, or pass --cgroup-root")]
    NoCgroup2 { mounts: PathBuf },
    #[error("{path} is not a cgroup v2 directory: pass --cgroup-root with the cgroup2 mount point (see `grep cgroup2 /proc/mounts`)")]
    NotCgroup2 { path: PathBuf },
    #[error("tracefs is not mounted and mounting it at {path} failed: {reason} (mount it with `mount -t tracefs nodev /sys/kernel/tracing`, or pass --tracefs)")]
    Tracefs { path: PathBuf, reason: String },
    #[error("cannot read the mount table {path}: {reason}")]
    Mounts { path: PathBuf, reason: String },
    #[error("no bpf filesystem is mounted and mounting one at {path} failed: {reason} (mount it with `mount -t bpf bpffs /sys/fs/bpf`; the load balancer stays pinned there across agent restarts)")]
    Bpffs { path: PathBuf, reason: String },
}

/// Where bpffs is mounted when no bpf filesystem is.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Mounts bpffs at [`BPFFS`] unless a bpf filesystem is mounted already (the pin directory is
/// then checked to be on one when it is opened).
pub fn ensure_bpffs(mounts_file: &Path) -> Result<(), PreflightError> {
    let mounts = std::fs::read_to_string(mounts_file).map_err(|e| PreflightError::Mounts {
        path: mounts_file.to_path_buf(),
        reason: e.to_string(),
    })?;
    if find_mount(&mounts, "bpf").is_some() {
        return Ok(());
    }
    let fail = |reason: String| PreflightError::Bpffs {
        path: PathBuf::from(BPFFS),
        reason,
    };
    let dir = CString::new(BPFFS).map_err(|e| fail(e.to_string()))?;
    // SAFETY: valid C strings; bpffs takes no data.
    let rc = unsafe {
        libc::mount(
            c"bpffs".as_ptr(),
            dir.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(fail(std::io::Error::last_os_error().to_string()));
    }
    tracing::info!(path = BPFFS, "mounted bpffs");
    Ok(())
}

/// What the checks found and the agent uses.
#[derive(Debug, Clone)]
pub struct Environment {
    pub cgroup_root: PathBuf,
    pub btf: PathBuf,
}

/// Capability numbers from linux/capability.h.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Runs every check in order: privileges first, since without them nothing else can be fixed.
pub fn check(
    btf: &Path,
    cgroup_root: Option<&Path>,
    tracefs: &Path,
    mounts_file: &Path,
) -> Result<Environment, PreflightError> {
    check_privileges()?;
    check_btf(btf)?;
    let mounts = std::fs::read_to_string(mounts_file).map_err(|e| PreflightError::Mounts {
        path: mounts_file.to_path_buf(),
        reason: e.to_string(),
    })?;
    let cgroup_root = match cgroup_root {
        Some(p) => {
            if !is_cgroup2(p) {
                return Err(PreflightError::NotCgroup2 {
                    path: p.to_path_buf(),
                });
            }
            p.to_path_buf()
        }
        None => find_mount(&mounts, "cgroup2").ok_or_else(|| PreflightError::NoCgroup2 {
            mounts: mounts_file.to_path_buf(),
        })?,
    };
    ensure_tracefs(&mounts, tracefs)?;
    Ok(Environment {
        cgroup_root,
        btf: btf.to_path_buf(),
    })
}

fn check_privileges() -> Result<(), PreflightError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    if (has(CAP_BPF) || has(CAP_SYS_ADMIN)) && has(CAP_NET_ADMIN) {
        Ok(())
    } else {
        Err(PreflightError::NotPrivileged)
    }
}

fn check_btf(path: &Path) -> Result<(), PreflightError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() > 0 => Ok(()),
        Ok(_) => Err(PreflightError::NoBtf {
            path: path.to_path_buf(),
            reason: "not a BTF file".into(),
        }),
        Err(e) => Err(PreflightError::NoBtf {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// The mount point of the first filesystem of type `fstype` in a /proc/mounts text.
pub fn find_mount(mounts: &str, fstype: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, ty) = (fields.next()?, fields.next()?, fields.next()?);
        (ty == fstype).then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// /proc/mounts escapes spaces and a few other bytes as octal (`\040`).
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_cgroup2(path: &Path) -> bool {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a statfs struct we own.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC
}

fn ensure_tracefs(mounts: &str, target: &Path) -> Result<(), PreflightError> {
    if find_mount(mounts, "tracefs").is_some() {
        return Ok(());
    }
    let fail = |reason: String| PreflightError::Tracefs {
        path: target.to_path_buf(),
        reason,
    };
    let dir = CString::new(target.as_os_str().as_encoded_bytes()).map_err(|e| fail(e.to_string()))?;
    // SAFETY: valid C strings; a null data pointer is allowed for tracefs.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            dir.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(fail(std::io::Error::last_os_error().to_string()));
    }
    tracing::info!(path = %target.display(), "mounted tracefs");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "sysfs /sys sysfs rw 0 0\n\
        cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
        cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n\
        nodev /sys/kernel/trac\\040ing tracefs rw 0 0\n";

    #[test]
    fn finds_the_cgroup2_mount_among_v1_ones() {
        assert_eq!(
            find_mount(MOUNTS, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn unescapes_octal_in_mount_points() {
        assert_eq!(
            find_mount(MOUNTS, "tracefs"),
            Some(PathBuf::from("/sys/kernel/trac ing"))
        );
    }

    #[test]
    fn absent_filesystem_is_none() {
        assert_eq!(find_mount(MOUNTS, "bpf"), None);
    }

    #[test]
    fn missing_btf_says_where_and_how() {
        let err = check_btf(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel BTF not found at /nonexistent/vmlinux: No such file or directory (os error 2) \
             (the kernel needs CONFIG_DEBUG_INFO_BTF=y; or pass --btf with a BTF file for this kernel)"
        );
    }
}
