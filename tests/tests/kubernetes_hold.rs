//! Scale from zero on Kubernetes: a pod that connects to a Service's ClusterIP while the
//! SurgeScaler's target has no ready replica is held by the agent on its node and answered by
//! the first replica once it is ready; after that, connections to the ClusterIP are left to the
//! cluster's Service routing, with nothing of Surge's in the path. Needs root (eBPF, network
//! namespaces, nftables).
//!
//! What is real: the API server (a Service with a ClusterIP it allocated, the Deployment, the
//! SurgeScaler, core/v1 Endpoints as 1.20 serves them), the surge-scaler in Kubernetes mode, the
//! surge-agent with its eBPF programs, the client's own network namespace (a pod's, joined to
//! the node by a veth pair) and an HTTP server. What stands in, because no kubelet, container
//! runtime or kube-proxy runs here: the test starts the replica when the Deployment asks for
//! one, writes its Endpoints as the endpoints controller would, and routes the ClusterIP to it
//! with an nftables DNAT rule, as kube-proxy's nftables mode does. The replica runs on the
//! node's network (as a hostNetwork pod does), on the veth's host address.

use std::{
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
    time::Duration,
};

use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::{
    api::{Patch, PatchParams, PostParams},
    Api,
};
use serde_json::json;
use surge_tests::{
    harness::{bin, free_port, require_root, scratch, wait_listening, Agent, Proc},
    http_client::Connection,
    kube_env::{quick_policy, Env, Flavor, ScalerApi},
    netns::{ip, Outside},
};

const NS: &str = "surge-hold";
const SERVICE: &str = "surge-hold/web";

/// kube-proxy's part: an nftables table that DNATs the ClusterIP's port to the replica. Removed on
/// drop.
struct ServiceRoute {
    table: String,
}

impl ServiceRoute {
    fn new(cluster_ip: IpAddr, port: u16, to: SocketAddr) -> Self {
        let table = format!("surge_hold_{}", std::process::id());
        let script = format!(
            "table ip {table} {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr {cluster_ip} tcp dport {port} counter dnat to {to}\n  }}\n}}\n"
        );
        let path = std::env::temp_dir().join(format!("{table}.nft"));
        std::fs::write(&path, script).expect("nft script");
        let out = Command::new("nft")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .expect("nft (Debian's nftables; deploy/setup.sh installs it)");
        assert!(
            out.status.success(),
            "nft -f: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { table }
    }
}

impl ServiceRoute {
    /// Connections the rule routed (a nat chain sees each connection's first packet only).
    fn routed(&self) -> u64 {
        let out = Command::new("nft")
            .args(["list", "table", "ip", &self.table])
            .output()
            .expect("nft list");
        let text = String::from_utf8_lossy(&out.stdout);
        let after = text
            .split("counter packets ")
            .nth(1)
            .unwrap_or_else(|| panic!("no counter in:\n{text}"));
        after
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no packet count in:\n{text}"))
    }
}

impl Drop for ServiceRoute {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", &self.table])
            .status();
    }
}

/// Waits for the agent's log line saying it holds the service's connections.
fn wait_holding(agent: &Proc) {
    let want = format!("service={SERVICE} ");
    agent.wait_for_log_line(&[
        "holding connections while the service has no ready replica",
        &want,
    ]);
}

/// `GET /whoami` from the pod's namespace: the status and the client address the replica saw.
fn whoami_from(pod: &Outside, address: SocketAddr) -> std::thread::JoinHandle<Result<(u16, String), String>> {
    pod.run(move || {
        let mut c = Connection::open(address).map_err(|e| format!("connect {address}: {e}"))?;
        let reply = c
            .request("GET", "/whoami", b"", true)
            .map_err(|e| format!("GET /whoami: {e}"))?;
        Ok((
            reply.status,
            String::from_utf8_lossy(&reply.body).trim().to_string(),
        ))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_connecting_to_a_service_clusterip_at_zero_is_held_then_answered() {
    require_root();
    let env = Env::new(NS, Flavor::Endpoints).await;
    let pod = Outside::create(0);
    let node_ip = pod.host_ip;
    // As a pod's: everything else goes through the node.
    ip(&[
        "-n",
        &pod.name,
        "route",
        "add",
        "default",
        "via",
        &node_ip.to_string(),
    ])
    .expect("default route");
    let target_port = free_port();
    env.create_deployment("web", 0).await;
    // No selector: the endpoints controller leaves its Endpoints to this test.
    let services: Api<Service> = Api::namespaced(env.client.clone(), NS);
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": target_port}]},
    }))
    .expect("service");
    let svc = services
        .create(&PostParams::default(), &svc)
        .await
        .expect("create the Service");
    let cluster_ip: IpAddr = svc
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("an allocated clusterIP")
        .parse()
        .expect("clusterIP is an IP");
    let service_address = SocketAddr::new(cluster_ip, 80);

    let dir = scratch("kubernetes-hold");
    let agent = Agent::start(&dir, &env.scaler.grpc, &["--node-ip".into(), node_ip.to_string()]);
    env.create_scaler(
        "web",
        json!({"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
               "policy": quick_policy(json!({"minReplicaCount": 0, "maxReplicaCount": 1, "cooldownPeriod": 300}))}),
        json!({}),
    )
    .await;
    let api = ScalerApi::new(env.scaler.http, SERVICE);
    wait_holding(&agent.proc);
    api.settle(2);

    // The pod connects to the ClusterIP while nothing serves it: held on the node.
    let held = whoami_from(&pod, service_address);
    let v = api.wait("the held connection", &agent.proc, |v| v["held_connections"] == 1);
    assert_eq!(v["held_total"], 1, "{v}");
    // Which activates the target; the test starts the replica it asks for (the kubelet's part).
    env.wait_replicas("web", 1, Duration::from_secs(30)).await;
    let replica_address = SocketAddr::new(IpAddr::V4(node_ip), target_port);
    let mut replica = Proc::spawn(
        "replica",
        &bin("surge-sample"),
        &["--listen".into(), replica_address.to_string()],
        &dir,
    );
    wait_listening(replica_address, &mut replica);
    let endpoints: Api<Endpoints> = Api::namespaced(env.client.clone(), NS);
    let ep = json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "web"},
        "subsets": [{"addresses": [{"ip": node_ip.to_string()}],
                     "ports": [{"name": "http", "port": target_port}]}],
    });
    endpoints
        .patch(
            "web",
            &PatchParams::apply("fake-kubelet").force(),
            &Patch::Apply(&ep),
        )
        .await
        .expect("write the Endpoints");
    let written = std::time::Instant::now();

    let (status, peer) = held
        .join()
        .expect("client thread")
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.proc.log_tail()));
    assert_eq!(status, 200);
    // A figure, not a check (timing is for benchmarks): the scaler hears of the endpoint from
    // its watch, not at its next tick.
    eprintln!(
        "Endpoints written → held client answered: {:?}",
        written.elapsed()
    );
    // The agent's holder relayed it: the replica saw a connection from the node.
    assert!(peer.starts_with(&format!("{node_ip}:")), "{peer}");
    let v = api.wait("the hold over", &agent.proc, |v| {
        v["held_connections"] == 0 && v["relayed_connections"] == 0
    });
    assert_eq!(v["held_total"], 1, "{v}");
    assert_eq!(v["hold_timeouts"], 0, "{v}");

    // Warm: the ClusterIP is the cluster's to route again. The replica sees the pod's own
    // address, and the agent holds nothing more.
    api.settle(2);
    let route = ServiceRoute::new(cluster_ip, 80, replica_address);
    let (status, peer) = whoami_from(&pod, service_address)
        .join()
        .expect("client thread")
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.proc.log_tail()));
    assert_eq!(status, 200);
    assert!(peer.starts_with(&format!("{}:", pod.ns_ip)), "{peer}");
    assert_eq!(
        route.routed(),
        1,
        "the connection went through the cluster's routing"
    );
    let v = api.settle(2);
    assert_eq!(v["held_total"], 1, "{v}");
}
