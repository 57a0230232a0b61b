//! The agent learns from a real Kubernetes API server which pods run on its node and which
//! Service each belongs to, finds their cgroups as the kubelet names them, and measures the
//! service's requests and CPU there. Needs root (eBPF, cgroups).
//!
//! What is real: the API server (with discovery.k8s.io/v1 EndpointSlices; see
//! `surge_tests::kube_env`), Pods and their status subresource, the surge-scaler in Kubernetes
//! mode with a SurgeScaler (it names the service `NAMESPACE/SERVICE` in its watch set), the
//! surge-agent with its eBPF programs, a cgroup v2 hierarchy, an HTTP server burning real CPU.
//! What stands in, because no kubelet or container runtime runs here: this test writes the pods'
//! status (IP, QoS class) as the kubelet would, the EndpointSlice as the endpointslice controller
//! would, and makes the pod cgroups as the kubelet's systemd driver would, under a cgroup of its
//! own that the agent is told is the kubelet's cgroup root. The pods' address is on loopback.
//! The agent authenticates as its own ServiceAccount with the ClusterRole and binding of
//! `deploy/kubernetes/rbac.yaml`: the manifests grant what it needs.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    core::v1::{Namespace, Pod, ServiceAccount},
    discovery::v1::EndpointSlice,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::{
    api::{DeleteParams, Patch, PatchParams, PostParams},
    Api,
};
use serde::Deserialize;
use serde_json::{json, Value};
use surge_tests::{
    harness::{bin, free_port, require_root, scratch, wait_listening, Agent, Proc},
    kube_env::{quick_policy, Env, Flavor, ScalerApi},
    load::{run, LoadSpec},
};

const SERVICE: &str = "surge-kubepods/web";
const RBAC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubernetes/rbac.yaml");

/// Applies the agent's ServiceAccount, ClusterRole and binding from `deploy/kubernetes/rbac.yaml`
/// and returns a kubeconfig that authenticates as that ServiceAccount (a TokenRequest token).
async fn agent_kubeconfig(env: &Env, dir: &Path) -> PathBuf {
    let apply = PatchParams::apply("surge-tests").force();
    let _ = Api::<Namespace>::all(env.client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "surge-system"}})).expect("namespace"),
        )
        .await;
    let text = std::fs::read_to_string(RBAC).expect("rbac.yaml");
    let mut applied = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc).expect("rbac.yaml parses");
        if v["metadata"]["name"] != "surge-agent" {
            continue;
        }
        let kind = v["kind"].as_str().expect("kind").to_string();
        match kind.as_str() {
            "ServiceAccount" => {
                let api: Api<ServiceAccount> = Api::namespaced(env.client.clone(), "surge-system");
                api.patch("surge-agent", &apply, &Patch::Apply(&v))
                    .await
                    .map(|_| ())
            }
            "ClusterRole" => {
                let api: Api<ClusterRole> = Api::all(env.client.clone());
                api.patch("surge-agent", &apply, &Patch::Apply(&v))
                    .await
                    .map(|_| ())
            }
            "ClusterRoleBinding" => {
                let api: Api<ClusterRoleBinding> = Api::all(env.client.clone());
                api.patch("surge-agent", &apply, &Patch::Apply(&v))
                    .await
                    .map(|_| ())
            }
            other => panic!("unexpected {other} surge-agent in rbac.yaml"),
        }
        .unwrap_or_else(|e| panic!("applying {kind} surge-agent: {e}"));
        applied.push(kind);
    }
    applied.sort();
    assert_eq!(applied, ["ClusterRole", "ClusterRoleBinding", "ServiceAccount"]);
    let token: TokenRequest = Api::<ServiceAccount>::namespaced(env.client.clone(), "surge-system")
        .create_subresource(
            "token",
            "surge-agent",
            &PostParams::default(),
            &json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": ["https://kubernetes.default.svc.cluster.local"]},
            }),
        )
        .await
        .expect("a token for the agent's ServiceAccount");
    let token = token.status.expect("token").token;
    let admin = std::fs::read_to_string(&env.kubeconfig).expect("kubeconfig");
    let config: String = admin
        .lines()
        .map(|l| match l.trim_start().strip_prefix("token: ") {
            Some(_) => format!("{}token: {token}\n", &l[..l.len() - l.trim_start().len()]),
            None => format!("{l}\n"),
        })
        .collect();
    assert!(
        config.contains(&token),
        "the kubeconfig has a token line:\n{admin}"
    );
    let path = dir.join("agent-kubeconfig");
    std::fs::write(&path, config).expect("write kubeconfig");
    path
}

/// The cgroup v2 mount point, from /proc/mounts.
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
        .expect("a cgroup2 mount")
}

/// A cgroup of this test standing in for the kubelet's cgroup root; removed on drop, deepest
/// first (after the processes in it are gone).
struct KubeletCgroups(PathBuf);

impl KubeletCgroups {
    fn new() -> Self {
        let p = cgroup2_root().join(format!("surge-e2e-kubepods-{}", std::process::id()));
        std::fs::create_dir_all(&p).expect("mkdir cgroup");
        Self(p)
    }

    /// The pod's cgroup as the kubelet's systemd driver names it, with one container cgroup
    /// below it (where its processes go, as under a container runtime). Returns both.
    fn pod(&self, qos: &str, uid: &str) -> (PathBuf, PathBuf) {
        let u = uid.replace('-', "_");
        let pod = match qos {
            "Guaranteed" => self.0.join(format!("kubepods.slice/kubepods-pod{u}.slice")),
            "Burstable" => self.0.join(format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"
            )),
            other => panic!("no layout for {other}"),
        };
        let container = pod.join("cri-containerd-0123abcd.scope");
        std::fs::create_dir_all(&container).expect("mkdir pod cgroup");
        (pod, container)
    }
}

impl Drop for KubeletCgroups {
    fn drop(&mut self) {
        let mut dirs = Vec::new();
        let mut stack = vec![self.0.clone()];
        while let Some(d) = stack.pop() {
            if let Ok(entries) = std::fs::read_dir(&d) {
                stack.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            dirs.push(d);
        }
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            for _ in 0..50 {
                if std::fs::remove_dir(&d).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn adopt(cgroup: &Path, pid: u32) {
    std::fs::write(cgroup.join("cgroup.procs"), pid.to_string()).expect("move into cgroup");
}

/// CPU time used in `cgroup` and below, from its own cpu.stat.
fn usage_seconds(cgroup: &Path) -> f64 {
    let stat = std::fs::read_to_string(cgroup.join("cpu.stat")).expect("cpu.stat");
    let usec: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .expect("usage_usec");
    usec as f64 / 1e6
}

fn cpu(v: &Value) -> f64 {
    v["cpu_seconds_total"]
        .as_f64()
        .unwrap_or_else(|| panic!("cpu in {v}"))
}

/// Waits for the agent's log line saying which pods of this node serve the service.
fn wait_agent_pods(agent: &Proc, pods: &str) {
    let want = format!("service={SERVICE} pods={pods} ");
    agent.wait_for_log_line(&["pods of the service on this node", &want]);
}

/// Creates a pod bound to `node` (as the scheduler would) and writes its status (as the kubelet
/// would). Returns its UID and its QoS class as the API computed it.
async fn create_pod(pods: &Api<Pod>, name: &str, node: &str, resources: Value, ip: &str) -> (String, String) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "containers": [{"name": "web", "image": "registry.invalid/web:1", "resources": resources}],
        }
    }))
    .expect("pod");
    let created = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let uid = created.metadata.uid.clone().expect("uid");
    let qos = created
        .status
        .as_ref()
        .and_then(|s| s.qos_class.clone())
        .expect("the API server sets status.qosClass");
    let status = json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "qosClass": qos,
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("write pod status");
    (uid, qos)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_measures_the_pods_of_its_node_found_through_the_api() {
    require_root();
    let env = Env::new("surge-kubepods", Flavor::EndpointSliceV1).await;
    let ns = env.ns.clone();
    let dir = scratch("kubepods");
    let cgroups = KubeletCgroups::new();

    // Pods need the namespace's default service account (no controller-manager makes it here).
    let accounts: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &ns);
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "default"}})).expect("sa"),
        )
        .await
        .expect("create service account");

    // The pod on this node serves HTTP on loopback; the one on node-b only burns CPU here (its
    // cgroup exists on this machine only so that counting it by mistake would show).
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    let (uid_a, qos_a) = create_pod(
        &pods,
        "web-a",
        "node-a",
        json!({"requests": {"cpu": "100m", "memory": "64Mi"}}),
        "127.0.0.1",
    )
    .await;
    let (uid_b, qos_b) = create_pod(
        &pods,
        "web-b",
        "node-b",
        json!({"requests": {"cpu": "1", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "64Mi"}}),
        "127.0.0.2",
    )
    .await;
    assert_eq!((qos_a.as_str(), qos_b.as_str()), ("Burstable", "Guaranteed"));
    let (pod_a, container_a) = cgroups.pod(&qos_a, &uid_a);
    let (pod_b, container_b) = cgroups.pod(&qos_b, &uid_b);
    let mut web = Proc::spawn(
        "web-a",
        &bin("surge-sample"),
        &["--listen".into(), addr.to_string()],
        &dir,
    );
    wait_listening(addr, &mut web);
    adopt(&container_a, web.pid().expect("running"));

    // The Service's slice, as the endpointslice controller writes it.
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-x7k2p", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["127.0.0.1"], "conditions": {"ready": true}, "nodeName": "node-a",
             "targetRef": {"kind": "Pod", "namespace": ns, "name": "web-a", "uid": uid_a}},
            {"addresses": ["127.0.0.2"], "conditions": {"ready": true}, "nodeName": "node-b",
             "targetRef": {"kind": "Pod", "namespace": ns, "name": "web-b", "uid": uid_b}},
        ],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    });
    Api::<EndpointSlice>::namespaced(env.client.clone(), &ns)
        .patch(
            "web-x7k2p",
            &PatchParams::apply("fake-endpointslice-controller").force(),
            &Patch::Apply(&slice),
        )
        .await
        .expect("write the slice");

    // A SurgeScaler makes the scaler watch the service; its policy holds one replica.
    env.create_deployment("web", 1).await;
    env.create_scaler(
        "web",
        json!({"scaleTargetRef": {"kind": "Deployment", "name": "web"},
               "policy": quick_policy(json!({"minReplicaCount": 1, "maxReplicaCount": 1}))}),
        json!({}),
    )
    .await;

    let kubeconfig = agent_kubeconfig(&env, &dir).await;
    let agent = Agent::start(
        &dir,
        &env.scaler.grpc,
        &[
            "--node".into(),
            "node-a".into(),
            "--kubernetes".into(),
            "true".into(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--kube-cgroup-root".into(),
            cgroups.0.display().to_string(),
        ],
    );
    let api = ScalerApi::new(env.scaler.http, SERVICE);
    tokio::task::block_in_place(|| {
        // Only the pod of node-a is the service's on this node.
        wait_agent_pods(&agent.proc, &format!("{{\"{ns}/web-a\"}}"));
        api.wait("the agent's first report of the service", &agent.proc, |v| {
            v["reported"] == true
        });

        // Requests: exactly those sent.
        let v0 = api.settle(3);
        assert_eq!(v0["requests_total"], 0, "{v0}");
        let r = run(&LoadSpec {
            workers: 2,
            ..LoadSpec::get(addr, 40)
        });
        assert_eq!(r.ok, 40, "{:?}", r.errors);
        api.wait("40 requests", &agent.proc, |v| v["requests_total"] == 40);
        let v = api.settle(3);
        assert_eq!(v["requests_total"], 40, "{v}");
        assert_eq!(v["responses_total"], 40, "{v}");

        // CPU: the pod's cgroup's own cpu.stat, while the pod of node-b burns CPU too.
        let (cpu0, a0, b0) = (cpu(&v), usage_seconds(&pod_a), usage_seconds(&pod_b));
        let burner = Proc::spawn(
            "burner-b",
            Path::new("/bin/sh"),
            &["-c".into(), "while :; do :; done".into()],
            &dir,
        );
        adopt(&container_b, burner.pid().expect("running"));
        let r = run(&LoadSpec {
            workers: 2,
            path: "/burn?ms=250".into(),
            ..LoadSpec::get(addr, 8)
        });
        assert_eq!(r.ok, 8, "{:?}", r.errors);
        drop(burner);
        std::thread::sleep(Duration::from_millis(200));
        let v = api.settle(3);
        let (reported, truth, other) = (
            cpu(&v) - cpu0,
            usage_seconds(&pod_a) - a0,
            usage_seconds(&pod_b) - b0,
        );
        eprintln!(
            "cpu: reported {reported:.4} s, pod cgroup's cpu.stat {truth:.4} s, \
             the other node's pod {other:.4} s (not counted)"
        );
        assert!(truth > 1.9, "the pod burned {truth} s");
        assert!(other > 0.5, "the other pod burned {other} s");
        assert!(
            (reported - truth).abs() <= 0.05 * truth,
            "reported {reported} s, cpu.stat {truth} s"
        );
        assert_eq!(v["requests_total"], 48, "{v}");
    });

    // The pod is deleted (at once: no kubelet here to finish a graceful deletion). Its process
    // lingers, as a container's may while it stops: its CPU no longer counts for the service.
    pods.delete("web-a", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete pod");
    tokio::task::block_in_place(|| {
        wait_agent_pods(&agent.proc, "{}");
        let v = api.settle(3);
        let (cpu0, a0) = (cpu(&v), usage_seconds(&pod_a));
        let r = run(&LoadSpec {
            workers: 2,
            path: "/burn?ms=250".into(),
            ..LoadSpec::get(addr, 4)
        });
        assert_eq!(r.ok, 4, "{:?}", r.errors);
        std::thread::sleep(Duration::from_millis(200));
        let v = api.settle(3);
        let (reported, truth) = (cpu(&v) - cpu0, usage_seconds(&pod_a) - a0);
        eprintln!("after the pod's deletion: reported {reported:.4} s, its cgroup burned {truth:.4} s");
        assert!(truth > 0.9, "the process burned {truth} s");
        assert_eq!(reported, 0.0, "{v}");
    });
    drop(web);
}
