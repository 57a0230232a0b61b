//! Scale from zero for clients outside the host: connections that arrive at the node (here from
//! another network namespace, over a veth pair) to a service address of a service with no ready
//! replica are given to the agent's holder by its sk_lookup program, since the connect hook,
//! which runs for every socket of the cgroup tree, leaves sockets of other namespaces alone when
//! it would send them to a loopback address. Needs root (eBPF, network namespaces).

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use surge_tests::{
    harness::{free_port, require_root, scratch, Agent, LocalService, Scaler},
    http_client::Connection,
    netns::Outside,
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
