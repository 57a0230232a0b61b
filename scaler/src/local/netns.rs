//! Replicas in their own network namespaces (`network: {namespace: SUBNET}`): each replica gets a
//! namespace, a veth pair and a /30 of the service's subnet (the host side .1, the replica .2 of
//! its block), so it has an address of its own. Made and removed with `ip` (iproute2).

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd, RawFd},
};

/// A /24 or larger IPv4 subnet replicas take their /30 blocks from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    /// `A.B.C.D/N` with N from 16 to 28 and no host bits set.
    pub fn parse(s: &str) -> Option<Self> {
        let (ip, prefix) = s.split_once('/')?;
        let base: Ipv4Addr = ip.parse().ok()?;
        let prefix: u8 = prefix.parse().ok()?;
        if !(16..=28).contains(&prefix) {
            return None;
        }
        let mask = u32::MAX << (32 - prefix);
        (u32::from(base) & !mask == 0).then_some(Self { base, prefix })
    }

    /// How many /30 blocks it holds.
    pub fn blocks(&self) -> u32 {
        1 << (30 - self.prefix)
    }

    /// The host side and replica addresses of block `slot`.
    pub fn block(&self, slot: u32) -> (Ipv4Addr, Ipv4Addr) {
        let b = u32::from(self.base) + slot * 4;
        (Ipv4Addr::from(b + 1), Ipv4Addr::from(b + 2))
    }
}

/// A replica's namespace; `remove` deletes it with its veth pair.
pub struct NetNs {
    pub name: String,
    pub replica_ip: IpAddr,
    file: File,
}

impl NetNs {
    /// The namespace's file descriptor, for `setns` in the child.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Makes namespace `name` with a veth pair to the host, addressed from block `slot`.
    pub async fn create(name: &str, subnet: &Subnet, slot: u32) -> Result<Self, String> {
        let (host, replica) = subnet.block(slot);
        // Interface names are at most 15 bytes: derive them from the block's address.
        let tag = format!("{:08x}", u32::from(host));
        let (host_if, ns_if) = (format!("sg{tag}h"), format!("sg{tag}n"));
        let _ = ip(&["netns", "del", name]).await;
        let _ = ip(&["link", "del", &host_if]).await;
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), name.into()],
            vec![
                "link".into(),
                "add".into(),
                host_if.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                ns_if.clone(),
                "netns".into(),
                name.into(),
            ],
            vec![
                "addr".into(),
                "add".into(),
                format!("{host}/30"),
                "dev".into(),
                host_if.clone(),
            ],
            vec!["link".into(), "set".into(), host_if.clone(), "up".into()],
            vec![
                "-n".into(),
                name.into(),
                "addr".into(),
                "add".into(),
                format!("{replica}/30"),
                "dev".into(),
                ns_if.clone(),
            ],
            vec![
                "-n".into(),
                name.into(),
                "link".into(),
                "set".into(),
                ns_if,
                "up".into(),
            ],
            vec![
                "-n".into(),
                name.into(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
        ];
        for step in &steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            if let Err(e) = ip(&args).await {
                let _ = ip(&["netns", "del", name]).await;
                return Err(e);
            }
        }
        let file = File::open(format!("/run/netns/{name}")).map_err(|e| format!("/run/netns/{name}: {e}"))?;
        Ok(Self {
            name: name.to_string(),
            replica_ip: IpAddr::V4(replica),
            file,
        })
    }

    pub async fn remove(self) {
        if let Err(e) = ip(&["netns", "del", &self.name]).await {
            tracing::warn!(netns = %self.name, error = %e, "cannot remove a replica's network namespace");
        }
    }
}

async fn ip(args: &[&str]) -> Result<(), String> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(|e| format!("running ip {}: {e}", args.join(" ")))?;
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

/// In the forked child: enter the namespace. Async-signal-safe.
pub fn enter(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: setns on a descriptor opened before fork.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_split_into_blocks() {
        let s = Subnet::parse("10.213.4.0/24").expect("valid");
        assert_eq!(s.blocks(), 64);
        assert_eq!(
            s.block(0),
            (Ipv4Addr::new(10, 213, 4, 1), Ipv4Addr::new(10, 213, 4, 2))
        );
        assert_eq!(
            s.block(63),
            (Ipv4Addr::new(10, 213, 4, 253), Ipv4Addr::new(10, 213, 4, 254))
        );
        assert_eq!(Subnet::parse("10.213.4.1/24"), None);
        assert_eq!(Subnet::parse("10.213.4.0/30"), None);
        assert_eq!(Subnet::parse("fd00::/64"), None);
    }
}
