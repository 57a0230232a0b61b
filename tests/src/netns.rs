//! A network namespace joined to the host by a veth pair: another machine's (or a pod's) view of
//! this host, for tests whose clients must not share the agent's network namespace.

use std::{
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::Path,
    process::Command,
};

/// Runs `ip ARGS`; its error output on failure.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace joined to the host by a veth pair in a /30 of 10.213.0.0/16 (the host side
/// .1, the namespace side .2) and in a /64 of fd53:7267:6500::/48 (::1 and ::2). Removed on drop
/// (with the pair), also when the test panics.
pub struct Outside {
    pub name: String,
    host_veth: String,
    /// The host's end of the pair.
    pub host_ip: Ipv4Addr,
    pub host_ip6: Ipv6Addr,
    /// The namespace's own address.
    pub ns_ip: Ipv4Addr,
}

impl Outside {
    /// `tag` (0 to 3) tells apart the namespaces of the tests of one process.
    pub fn create(tag: u32) -> Self {
        let pid = std::process::id();
        // A block per test, so tests running at the same time do not meet.
        let block = (pid * 4 + tag) % 16_384;
        let base = u32::from(Ipv4Addr::new(10, 213, 0, 0)) + block * 4;
        let (host_ip, ns_ip) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        let net6 = [0xfd53, 0x7267, 0x6500, block as u16, 0, 0, 0];
        let v6 = |last: u16| {
            let [a, b, c, d, e, f, g] = net6;
            Ipv6Addr::new(a, b, c, d, e, f, g, last)
        };
        let (host_ip6, ns_ip6) = (v6(1), v6(2));
        let this = Self {
            name: format!("surge-outside-{pid}-{tag}"),
            host_veth: format!("sgo{pid:x}{tag}h"),
            host_ip,
            host_ip6,
            ns_ip,
        };
        let ns_veth = format!("sgo{pid:x}{tag}n");
        let _ = ip(&["netns", "del", &this.name]);
        let _ = ip(&["link", "del", &this.host_veth]);
        let (host_cidr, ns_cidr) = (format!("{host_ip}/30"), format!("{ns_ip}/30"));
        let (host_cidr6, ns_cidr6) = (format!("{host_ip6}/64"), format!("{ns_ip6}/64"));
        let steps: [&[&str]; 10] = [
            &["netns", "add", &this.name],
            &[
                "link",
                "add",
                &this.host_veth,
                "type",
                "veth",
                "peer",
                "name",
                &ns_veth,
            ],
            &["link", "set", &ns_veth, "netns", &this.name],
            &["addr", "add", &host_cidr, "dev", &this.host_veth],
            // No duplicate address detection: the addresses are usable at once.
            &["addr", "add", &host_cidr6, "dev", &this.host_veth, "nodad"],
            &["link", "set", &this.host_veth, "up"],
            &["-n", &this.name, "addr", "add", &ns_cidr, "dev", &ns_veth],
            &[
                "-n", &this.name, "addr", "add", &ns_cidr6, "dev", &ns_veth, "nodad",
            ],
            &["-n", &this.name, "link", "set", &ns_veth, "up"],
            &["-n", &this.name, "link", "set", "lo", "up"],
        ];
        for step in steps {
            ip(step).expect("network namespace setup");
        }
        this
    }

    /// Runs `f` on a thread of its own that has entered the namespace: its sockets are there.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let ns = File::open(Path::new("/var/run/netns").join(&self.name)).expect("open the namespace");
        std::thread::spawn(move || {
            // SAFETY: setns on this thread only, with a namespace descriptor that lives across the call.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it the host's.
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
        let _ = ip(&["link", "del", &self.host_veth]);
    }
}
