//! Scale from zero for clients outside the host: connections that arrive at the node (here from
//! another network namespace, over a veth pair) to a service address of a service with no ready
//! replica are given to the agent's holder by its sk_lookup program, since the connect hook,
//! which runs for every socket of the cgroup tree, leaves sockets of other namespaces alone when
//! it would send them to a loopback address. Needs root (eBPF, network namespaces).

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    path::Path,
    process::Command,
};

use surge_tests::{
    harness::{free_port, require_root, scratch, Agent, LocalService, Scaler},
    http_client::Connection,
};

const POLICY: &str = "policy:
  name: zero
  algorithm: hpa
  minReplicaCount: 0
  maxReplicaCount: 1
  pollingInterval: 1
  cooldownPeriod: 300
  triggers:
    - {metric: rps, metricType: AverageValue, threshold: 100000}
";

/// How many clients connect at once from the other namespace.
const CLIENTS: usize = 20;

fn ip(args: &[&str]) -> Result<(), String> {
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
struct Outside {
    name: String,
    host_veth: String,
    host_ip: Ipv4Addr,
    host_ip6: Ipv6Addr,
}

impl Outside {
    /// `tag` (0 to 3) tells apart the namespaces of the tests of one process.
    fn create(tag: u32) -> Self {
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
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
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

fn configure(dir: &Path, name: &str, address: SocketAddr) -> Vec<String> {
    LocalService {
        name,
        address,
        policy: ("zero", POLICY),
        replicas: 0,
        sample_args: &["--startup-delay", "1s"],
        readiness: "{tcp: true}",
        local_extra: &["drain_timeout: 2s", "grace_period: 1s"],
    }
    .scaler_flags(dir)
}

/// `CLIENTS` clients at once from the namespace, each posting its own body to `/mirror`: each
/// gets its own body back.
fn send_from_outside(outside: &Outside, address: SocketAddr, agent: &Agent) {
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            outside.run(move || -> Result<(String, String), String> {
                let mut c = Connection::open(address).map_err(|e| format!("client {i}: {e}"))?;
                let sent = format!("outside client {i}");
                let reply = c
                    .request("POST", "/mirror", sent.as_bytes(), true)
                    .map_err(|e| format!("client {i}: {e}"))?;
                if reply.status != 200 {
                    return Err(format!("client {i}: status {}", reply.status));
                }
                Ok((sent, String::from_utf8_lossy(&reply.body).into_owned()))
            })
        })
        .collect();
    let mut answered = 0;
    for c in clients {
        let (sent, got) = c
            .join()
            .expect("client thread")
            .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.proc.log_tail()));
        assert_eq!(got, sent, "each client gets its own body back");
        answered += 1;
    }
    assert_eq!(answered, CLIENTS);
}

/// Waits until every hold is over and reported; then exactly `CLIENTS` were held, none timed out.
fn every_client_held_once(scaler: &Scaler, name: &str) {
    let v = scaler.wait_for(name, "every hold reported and over", |v| {
        v["held_connections"] == 0 && v["held_total"].as_u64() >= Some(CLIENTS as u64)
    });
    assert_eq!(v["held_total"], CLIENTS as u64, "{v}");
    assert_eq!(v["hold_timeouts"], 0, "{v}");
    assert_eq!(v["hold_duration_count"], CLIENTS as u64, "{v}");
}

/// A scaler with service `name` at zero on `ip` (a free port) and an agent, once the agent has
/// reported it at zero.
fn at_zero(dir: &Path, name: &str, ip: IpAddr) -> (SocketAddr, Scaler, Agent) {
    let address = SocketAddr::new(ip, free_port());
    let scaler = Scaler::start(dir, free_port(), &configure(dir, name, address));
    let agent = Agent::start(dir, &scaler.grpc_url(), &[]);
    scaler.wait_for(name, "the agent's first report at zero", |v| {
        v["reported"] == true && v["replicas"]["current"] == 0
    });
    (address, scaler, agent)
}

#[test]
fn clients_in_another_namespace_are_held_at_zero_by_sk_lookup_and_all_answered() {
    require_root();
    let name = "cold-outside";
    let dir = scratch("outside");
    let outside = Outside::create(0);
    let (address, scaler, agent) = at_zero(&dir, name, outside.host_ip.into());

    // Nothing listens on the service address: only the holder, through sk_lookup, can answer.
    send_from_outside(&outside, address, &agent);

    // Every one of them was held, none timed out, and each wait is in the histogram once.
    every_client_held_once(&scaler, name);
    scaler.wait_for(name, "the replica ready", |v| v["replicas"]["ready"] == 1);

    // Warm: the host's own clients go straight to the replica and are not held.
    let mut c = Connection::open(address).expect("connect from the host");
    let me = c.local_addr().expect("local addr");
    let reply = c.request("GET", "/whoami", &[], true).expect("whoami");
    assert_eq!(String::from_utf8_lossy(&reply.body).trim(), me.to_string());
    // sk_lookup steers only while the service is cold: a warm service needs a real listener
    // on the service address for outside clients (kube-proxy's, in a cluster); here there is
    // none, so the connection is refused, and the connect hook did not send it to the other
    // namespace's loopback either.
    let refused = outside
        .run(move || {
            std::net::TcpStream::connect(address)
                .map(|_| ())
                .map_err(|e| e.kind())
        })
        .join()
        .expect("client thread");
    assert_eq!(refused, Err(std::io::ErrorKind::ConnectionRefused));
    scaler.wait_reports(3);
    assert_eq!(
        scaler.service(name)["held_total"],
        CLIENTS as u64,
        "no warm connection was held"
    );
}

#[test]
fn ipv6_clients_in_another_namespace_are_held_at_zero_too() {
    require_root();
    let name = "cold-outside-v6";
    let dir = scratch("outside-v6");
    let outside = Outside::create(2);
    let (address, scaler, agent) = at_zero(&dir, name, outside.host_ip6.into());

    // Over IPv6, to an address nothing listens on: only the holder's IPv6 listener can answer.
    send_from_outside(&outside, address, &agent);
    every_client_held_once(&scaler, name);
}

#[test]
fn after_the_agent_is_killed_a_new_agent_steers_outside_clients_to_its_own_holder() {
    require_root();
    let name = "cold-outside-restart";
    let dir = scratch("outside-restart");
    let outside = Outside::create(1);
    let address = SocketAddr::new(outside.host_ip.into(), free_port());
    let scaler = Scaler::start(&dir, free_port(), &configure(&dir, name, address));
    let pin_dir = Agent::new_pin_dir();
    let first = Agent::start_pinned(&dir, &scaler.grpc_url(), &pin_dir, &[]);
    scaler.wait_for(name, "the first agent's report at zero", |v| {
        v["reported"] == true && v["replicas"]["current"] == 0
    });
    // Killed: its sk_lookup link goes with its descriptors; the pinned connect hooks stay.
    first.stop_keeping_pins(libc::SIGKILL);
    let agent = Agent::start_pinned(&dir, &scaler.grpc_url(), &pin_dir, &[]);
    scaler.wait_reports(3);
    assert_eq!(scaler.service(name)["replicas"]["current"], 0);

    send_from_outside(&outside, address, &agent);
    every_client_held_once(&scaler, name);
}
