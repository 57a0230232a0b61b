//! What the local actuator asks of the operating system: the cgroup v2 tree its replicas live
//! in, free loopback ports, signals, and a replica's established connections (for draining).

use std::{
    ffi::CString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
};

/// The cgroup v2 mount point, from a /proc/mounts text.
pub fn cgroup2_root(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// A free port on the loopback address of the service address's family.
pub fn free_addr(service_address: SocketAddr) -> std::io::Result<SocketAddr> {
    let ip = match service_address.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    };
    TcpListener::bind(SocketAddr::new(ip, 0))?.local_addr()
}

/// `cgroup.procs` of `dir` as a C string, made before fork so the child only makes syscalls.
pub fn procs_path(dir: &Path) -> Option<CString> {
    CString::new(dir.join("cgroup.procs").into_os_string().into_encoded_bytes()).ok()
}

/// In the forked child, before exec: join the cgroup (writing "0" to cgroup.procs moves the
/// writer) and die with the scaler. Only async-signal-safe calls.
pub fn in_child(procs: Option<&CString>) -> std::io::Result<()> {
    // SAFETY: prctl, open, write and close with valid arguments; no allocation.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if let Some(p) = procs {
            let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Sends `signal` to the replica's process group (its pid: replicas lead their own group).
pub fn signal_group(pid: u32, signal: i32) {
    // SAFETY: kill with a negative pid signals that process group; no memory is touched.
    unsafe { libc::kill(-(pid as i32), signal) };
}

/// Kills everything left in a cgroup (`cgroup.kill`, Linux 5.14+), then removes it.
pub fn remove_cgroup(dir: &Path) {
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..50 {
        let empty = std::fs::read_to_string(dir.join("cgroup.procs"))
            .map(|s| s.trim().is_empty())
            .unwrap_or(true);
        if empty && std::fs::remove_dir(dir).is_ok() {
            return;
        }
        if !dir.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    tracing::warn!(cgroup = %dir.display(), "could not remove a replica's cgroup");
}

/// Established TCP connections whose local port is `port`, from /proc/net/tcp{,6} texts.
pub fn established_on(tables: &[String], port: u16) -> usize {
    tables
        .iter()
        .flat_map(|t| t.lines().skip(1))
        .filter(|l| {
            let mut f = l.split_whitespace();
            let (Some(_), Some(local), Some(_), Some(state)) = (f.next(), f.next(), f.next(), f.next())
            else {
                return false;
            };
            state == "01"
                && local
                    .rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                    == Some(port)
        })
        .count()
}

/// Established connections of a local port now, in the network namespace of process `pid`.
pub async fn established_now(pid: u32, port: u16) -> usize {
    let mut tables = Vec::new();
    for f in [format!("/proc/{pid}/net/tcp"), format!("/proc/{pid}/net/tcp6")] {
        if let Ok(t) = tokio::fs::read_to_string(f).await {
            tables.push(t);
        }
    }
    established_on(&tables, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let m = "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_root(m), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(cgroup2_root("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn counts_established_connections_of_a_port() {
        let t = "  sl  local_address rem_address   st\n\
                 0: 0100007F:1F90 00000000:0000 0A 0\n\
                 1: 0100007F:1F90 0100007F:D2F0 01 0\n\
                 2: 0100007F:D2F0 0100007F:1F90 01 0\n\
                 3: 0100007F:1F90 0100007F:D2F1 06 0\n";
        assert_eq!(established_on(&[t.to_string()], 8080), 1);
        assert_eq!(established_on(&[t.to_string()], 8081), 0);
    }
}
