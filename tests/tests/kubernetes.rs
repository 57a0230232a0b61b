//! The scaler against a real Kubernetes 1.20 API server (etcd + kube-apiserver on loopback, built
//! and started by `deploy/kube-test/cluster.sh`, once per run of this test binary).
//!
//! What is real: the API server, the CRD, SurgeScaler resources, Deployments and their `/scale`
//! subresource, HPAs, Endpoints, the surge-scaler binary and its gRPC agent link.
//! What stands in, because no kubelet or container runtime runs here: the agent (a gRPC client in
//! this test injects the reports a surge-agent would send, with a request rate the test sets), and
//! the kubelet plus endpoints controller (a task in this test writes the Service's Endpoints with
//! one ready address per replica the Deployment asks for). The 1.20 server has no
//! discovery.k8s.io/v1 EndpointSlices, so the scaler's core/v1 Endpoints fallback is what runs.

use std::{
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::Deployment, autoscaling::v1::HorizontalPodAutoscaler, core::v1::Endpoints, core::v1::Namespace,
};
use kube::{
    api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    core::{ApiResource, GroupVersionKind},
    Api, Client, Config,
};
use serde_json::{json, Value};
use surge_proto::v1::{agent_message, AgentMessage, Hello, Report, ServiceCounters};
use surge_tests::harness::{bin, free_port};

const CLUSTER_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kube-test/cluster.sh");
const CRD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubernetes/crd.yaml");

/// The cluster of this test binary: started on first use, stopped by cluster.sh's watchdog when
/// this process exits.
fn kubeconfig() -> &'static PathBuf {
    static CLUSTER: OnceLock<PathBuf> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("surge-kube-test-{}", std::process::id()));
        let out = Command::new(CLUSTER_SCRIPT)
            .arg("start")
            .arg(&dir)
            .env("SURGE_KUBE_OWNER_PID", std::process::id().to_string())
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("running deploy/kube-test/cluster.sh");
        assert!(
            out.status.success(),
            "deploy/kube-test/cluster.sh start failed (run deploy/setup.sh as root first)"
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

async fn client() -> Client {
    let kc = Kubeconfig::read_from(kubeconfig()).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("client config");
    Client::try_from(config).expect("client")
}

fn scalers_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("surge.dev", "v1alpha1", "SurgeScaler"),
        "surgescalers",
    )
}

/// A namespace of its own, the CRD applied, and a surge-scaler watching only that namespace.
struct Env {
    client: Client,
    ns: String,
    scaler: Scaler,
    dir: PathBuf,
}

struct Scaler {
    child: Child,
    grpc: String,
    log: PathBuf,
}

impl Drop for Scaler {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Scaler {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Env {
    async fn new(ns: &str) -> Env {
        let client = client().await;
        let crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
            serde_yaml::from_str(&std::fs::read_to_string(CRD).expect("crd.yaml")).expect("crd.yaml parses");
        let crds: Api<
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
        > = Api::all(client.clone());
        crds.patch(
            "surgescalers.surge.dev",
            &PatchParams::apply("surge-tests").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("apply the CRD");
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let _ = namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}})).expect("namespace"),
            )
            .await;
        // The CRD is served a moment after it is applied.
        let scalers: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &scalers_resource());
        wait_until(
            "the SurgeScaler API is served",
            Duration::from_secs(20),
            || async { scalers.list(&Default::default()).await.is_ok() },
        )
        .await;

        let dir = std::env::temp_dir().join(format!("surge-kube-{ns}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policies")).expect("scratch");
        let grpc = format!("127.0.0.1:{}", free_port());
        let http = format!("127.0.0.1:{}", free_port());
        let log = dir.join("scaler.log");
        let out = std::fs::File::create(&log).expect("log");
        let child = Command::new(bin("surge-scaler"))
            .args(["--grpc-listen", &grpc, "--http-listen", &http, "--tick", "200ms"])
            .arg("--policy-dir")
            .arg(dir.join("policies"))
            .env("KUBECONFIG", kubeconfig())
            .env("SURGE_KUBERNETES", "true")
            .env("SURGE_KUBERNETES_NAMESPACE", ns)
            .env("SURGE_KUBERNETES_RESYNC", "1s")
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("starting surge-scaler");
        let scaler = Scaler {
            child,
            grpc: format!("http://{grpc}"),
            log,
        };
        wait_listening_addr(grpc.parse().expect("address"));
        Env {
            client,
            ns: ns.into(),
            scaler,
            dir,
        }
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn scalers(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.ns, &scalers_resource())
    }

    async fn create_deployment(&self, name: &str, replicas: i32) {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{"name": "web", "image": "registry.invalid/web:1"}]}
                }
            }
        }))
        .expect("deployment");
        self.deployments()
            .create(&PostParams::default(), &d)
            .await
            .expect("create deployment");
    }

    async fn replicas(&self, name: &str) -> i32 {
        let scale = self.deployments().get_scale(name).await.expect("get /scale");
        scale.spec.and_then(|s| s.replicas).unwrap_or(0)
    }

    async fn wait_replicas(&self, name: &str, want: i32, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let got = self.replicas(name).await;
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: {got} replicas, expected {want}\nstatus: {}\nscaler log:\n{}",
                self.status_text(name).await,
                self.scaler.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn create_scaler(&self, name: &str, spec: Value, annotations: Value) {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "surge.dev/v1alpha1",
            "kind": "SurgeScaler",
            "metadata": {"name": name, "annotations": annotations},
            "spec": spec,
        }))
        .expect("SurgeScaler");
        self.scalers()
            .create(&PostParams::default(), &obj)
            .await
            .expect("create SurgeScaler");
    }

    async fn status(&self, name: &str) -> Value {
        match self.scalers().get_opt(name).await {
            Ok(Some(o)) => o.data.get("status").cloned().unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }

    async fn status_text(&self, name: &str) -> String {
        serde_json::to_string_pretty(&self.status(name).await).unwrap_or_default()
    }

    /// Waits until the SurgeScaler's status satisfies `pred`, and returns it.
    async fn wait_status(&self, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status(name).await;
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: status never showed {what}:\n{}\nscaler log:\n{}",
                serde_json::to_string_pretty(&s).unwrap_or_default(),
                self.scaler.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stands in for the kubelet and the endpoints controller: keeps Endpoints `service` at one
    /// ready address per replica `deployment` asks for.
    fn fake_endpoints(&self, deployment: &str, service: &str) -> tokio::task::JoinHandle<()> {
        let deployments = self.deployments();
        let endpoints: Api<Endpoints> = Api::namespaced(self.client.clone(), &self.ns);
        let (deployment, service) = (deployment.to_string(), service.to_string());
        tokio::spawn(async move {
            loop {
                if let Ok(scale) = deployments.get_scale(&deployment).await {
                    let n = scale.spec.and_then(|s| s.replicas).unwrap_or(0);
                    let addresses: Vec<Value> = (0..n)
                        .map(|i| json!({"ip": format!("10.1.0.{}", i + 1)}))
                        .collect();
                    let subsets = if addresses.is_empty() {
                        json!([])
                    } else {
                        json!([{"addresses": addresses, "ports": [{"port": 8080}]}])
                    };
                    let ep = json!({
                        "apiVersion": "v1", "kind": "Endpoints",
                        "metadata": {"name": service},
                        "subsets": subsets,
                    });
                    let _ = endpoints
                        .patch(
                            &service,
                            &PatchParams::apply("fake-kubelet").force(),
                            &Patch::Apply(&ep),
                        )
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::env::var_os("SURGE_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn wait_listening_addr(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens at {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn wait_until<F, Fut>(what: &str, within: Duration, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stands in for a surge-agent: reports cumulative counters for `service` every 200 ms at the
/// request rate in `rps`, over the scaler's real gRPC agent link.
fn fake_agent(scaler: &str, service: &str, rps: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    let (scaler, service) = (scaler.to_string(), service.to_string());
    tokio::spawn(async move {
        let mut client = surge_proto::v1::agent_link_client::AgentLinkClient::connect(scaler)
            .await
            .expect("connect to the scaler");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let hello = AgentMessage {
            body: Some(agent_message::Body::Hello(Hello {
                node: "node-1".into(),
                instance_id: 42,
                version: "fake".into(),
            })),
        };
        tx.send(hello).await.expect("hello");
        let response = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("stream");
        let _commands = response.into_inner();
        let start = Instant::now();
        let (mut requests, mut seq) = (0f64, 0u64);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            requests += rps.load(Ordering::Relaxed) as f64 * 0.2;
            seq += 1;
            let report = Report {
                seq,
                monotonic_ns: start.elapsed().as_nanos() as u64,
                unix_ms: 0,
                services: vec![ServiceCounters {
                    service: service.clone(),
                    requests: requests as u64,
                    responses: requests as u64,
                    ..Default::default()
                }],
            };
            let msg = AgentMessage {
                body: Some(agent_message::Body::Report(report)),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    })
}

/// An HPA-style policy on rps (10 per replica) that reacts within a second both ways.
fn quick_policy(extra: Value) -> Value {
    let mut p = json!({
        "algorithm": "hpa",
        "minReplicaCount": 1,
        "maxReplicaCount": 10,
        "pollingInterval": 1,
        "triggers": [{"metric": "rps", "metricType": "AverageValue", "threshold": 10}],
        "behavior": {
            "scaleUp": {"stabilizationWindowSeconds": 0,
                        "policies": [{"type": "Pods", "value": 10, "periodSeconds": 1}]},
            "scaleDown": {"stabilizationWindowSeconds": 0,
                          "policies": [{"type": "Percent", "value": 100, "periodSeconds": 1}]}
        }
    });
    if let (Some(p), Some(extra)) = (p.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            p.insert(k.clone(), v.clone());
        }
    }
    p
}

fn condition<'a>(status: &'a Value, type_: &str) -> Option<&'a Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

fn condition_is(status: &Value, type_: &str, value: &str) -> bool {
    condition(status, type_).is_some_and(|c| c["status"] == value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_a_deployment_up_and_down_on_injected_traffic() {
    let env = Env::new("surge-updown").await;
    env.create_deployment("web", 2).await;
    let _endpoints = env.fake_endpoints("web", "web");
    let rps = Arc::new(AtomicU64::new(50));
    let _agent = fake_agent(&env.scaler.grpc, "surge-updown/web", Arc::clone(&rps));
    env.create_scaler(
        "web",
        json!({"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
               "policy": quick_policy(json!({}))}),
        json!({}),
    )
    .await;

    // 50 rps at 10 per replica: 5 replicas.
    env.wait_replicas("web", 5, Duration::from_secs(30)).await;
    let s = env
        .wait_status("web", "5 ready replicas", |s| {
            s["readyReplicas"] == 5 && s["desiredReplicas"] == 5 && s["currentReplicas"] == 5
        })
        .await;
    assert_eq!(s["originalReplicas"], 2, "{s}");
    assert!(condition_is(&s, "Ready", "True"), "{s}");
    assert!(condition_is(&s, "Conflict", "False"), "{s}");
    assert!(condition_is(&s, "Active", "True"), "{s}");
    assert!(condition_is(&s, "Paused", "False"), "{s}");
    assert!(condition_is(&s, "Fallback", "False"), "{s}");
    for c in s["conditions"].as_array().expect("conditions") {
        assert!(
            c["lastTransitionTime"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{c}"
        );
    }
    let last = &s["lastDecision"];
    assert_eq!(last["desired"], 5, "{s}");
    assert!(last["reason"].as_str().is_some_and(|r| !r.is_empty()), "{s}");

    // 10 rps: one replica.
    rps.store(10, Ordering::Relaxed);
    env.wait_replicas("web", 1, Duration::from_secs(30)).await;
    env.wait_status("web", "1 desired and ready replica", |s| {
        s["desiredReplicas"] == 1 && s["readyReplicas"] == 1 && s["lastDecision"]["desired"] == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_scaled_by_an_hpa_or_another_surgescaler_is_refused() {
    let env = Env::new("surge-conflict").await;
    env.create_deployment("api", 3).await;
    env.create_deployment("web", 2).await;
    let rps = Arc::new(AtomicU64::new(80));
    let _a = fake_agent(&env.scaler.grpc, "surge-conflict/api", Arc::clone(&rps));
    let hpa: HorizontalPodAutoscaler = serde_json::from_value(json!({
        "metadata": {"name": "api"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api"},
            "minReplicas": 1, "maxReplicas": 5, "targetCPUUtilizationPercentage": 50
        }
    }))
    .expect("hpa");
    Api::<HorizontalPodAutoscaler>::namespaced(env.client.clone(), &env.ns)
        .create(&PostParams::default(), &hpa)
        .await
        .expect("create hpa");
    env.create_scaler(
        "api",
        json!({"scaleTargetRef": {"kind": "Deployment", "name": "api"}, "policy": quick_policy(json!({}))}),
        json!({}),
    )
    .await;
    let s = env
        .wait_status("api", "Conflict=True", |s| condition_is(s, "Conflict", "True"))
        .await;
    let c = condition(&s, "Conflict").expect("Conflict");
    assert_eq!(c["reason"], "HorizontalPodAutoscaler", "{s}");
    assert!(
        c["message"].as_str().is_some_and(|m| m.contains("\"api\"")),
        "{s}"
    );
    assert!(condition_is(&s, "Ready", "False"), "{s}");
    assert!(s.get("originalReplicas").is_none(), "{s}");

    // A second SurgeScaler on a target the first one already scales.
    env.create_scaler(
        "web-first",
        json!({"scaleTargetRef": {"kind": "Deployment", "name": "web"}, "policy": quick_policy(json!({}))}),
        json!({}),
    )
    .await;
    env.wait_status("web-first", "Ready=True", |s| condition_is(s, "Ready", "True"))
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // a later creationTimestamp (seconds)
    env.create_scaler(
        "web-second",
        json!({"scaleTargetRef": {"kind": "Deployment", "name": "web"}, "policy": quick_policy(json!({}))}),
        json!({}),
    )
    .await;
    let s = env
        .wait_status("web-second", "Conflict=True", |s| {
            condition_is(s, "Conflict", "True")
        })
        .await;
    assert_eq!(
        condition(&s, "Conflict").expect("Conflict")["reason"],
        "SurgeScaler",
        "{s}"
    );
    let first = env.status("web-first").await;
    assert!(condition_is(&first, "Conflict", "False"), "{first}");

    // With 80 rps the policy would ask for 8: the HPA's target is left alone.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.replicas("api").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_is_rejected_with_the_message_of_surgectl_validate() {
    let env = Env::new("surge-invalid").await;
    env.create_deployment("web", 2).await;
    let rps = Arc::new(AtomicU64::new(80));
    let _a = fake_agent(&env.scaler.grpc, "surge-invalid/web", Arc::clone(&rps));
    let policy = quick_policy(json!({"minReplicaCount": 5, "maxReplicaCount": 2}));
    env.create_scaler(
        "web",
        json!({"scaleTargetRef": {"kind": "Deployment", "name": "web"}, "policy": policy.clone()}),
        json!({}),
    )
    .await;
    let s = env
        .wait_status("web", "Ready=False", |s| condition_is(s, "Ready", "False"))
        .await;
    let ready = condition(&s, "Ready").expect("Ready");
    assert_eq!(ready["reason"], "InvalidPolicy", "{s}");
    let message = ready["message"].as_str().expect("message");

    // The same policy as a file, through the real surgectl.
    let file = env.dir.join("web.yaml");
    std::fs::write(&file, format!("policy: {policy}\n")).expect("policy file");
    let out = Command::new(bin("surgectl"))
        .arg("validate")
        .arg(&file)
        .output()
        .expect("surgectl");
    assert!(!out.status.success());
    let surgectl = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let expected = surge_policy::parse_policy(&format!("policy: {policy}\n"), &Default::default(), "web")
        .expect_err("invalid")
        .to_string();
    assert!(!expected.is_empty());
    assert!(
        surgectl.contains(&expected),
        "surgectl said {surgectl:?}, not {expected:?}"
    );
    assert_eq!(message, format!("{expected}; nothing is scaled"), "{s}");

    // Nothing changed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.replicas("web").await, 2);
    assert!(env.status("web").await.get("originalReplicas").is_none());

    // An invalid annotation is rejected the same way.
    env.create_scaler(
        "paused",
        json!({"scaleTargetRef": {"kind": "Deployment", "name": "other"}, "policy": quick_policy(json!({}))}),
        json!({"autoscaling.keda.sh/paused": "maybe"}),
    )
    .await;
    let s = env
        .wait_status("paused", "Ready=False", |s| condition_is(s, "Ready", "False"))
        .await;
    assert_eq!(
        condition(&s, "Ready").expect("Ready")["message"],
        "autoscaling.keda.sh/paused = maybe, must be true or false; nothing is scaled",
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_replicas_hold_and_delete_restores_the_original_count() {
    let env = Env::new("surge-restore").await;
    env.create_deployment("web", 3).await;
    let _endpoints = env.fake_endpoints("web", "web");
    let rps = Arc::new(AtomicU64::new(60));
    let _a = fake_agent(&env.scaler.grpc, "surge-restore/web", Arc::clone(&rps));
    env.create_scaler(
        "web",
        json!({"scaleTargetRef": {"kind": "Deployment", "name": "web"},
               "policy": quick_policy(json!({"advanced": {"restoreToOriginalReplicaCount": true}}))}),
        json!({"autoscaling.keda.sh/paused-replicas": "4"}),
    )
    .await;
    // Paused at 4 whatever the traffic says.
    env.wait_replicas("web", 4, Duration::from_secs(30)).await;
    let s = env
        .wait_status("web", "Paused=True", |s| condition_is(s, "Paused", "True"))
        .await;
    assert_eq!(s["originalReplicas"], 3, "{s}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.replicas("web").await, 4);

    // Unpaused: 60 rps asks for 6.
    env.scalers()
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"autoscaling.keda.sh/paused-replicas": null}}}),
            ),
        )
        .await
        .expect("unpause");
    env.wait_replicas("web", 6, Duration::from_secs(30)).await;
    env.wait_status("web", "Paused=False", |s| condition_is(s, "Paused", "False"))
        .await;

    // Deleted: back to the 3 it had before Surge took over, and the finalizer lets it go.
    env.scalers()
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete");
    env.wait_replicas("web", 3, Duration::from_secs(30)).await;
    let scalers = env.scalers();
    wait_until("the SurgeScaler to be gone", Duration::from_secs(20), || async {
        matches!(scalers.get_opt("web").await, Ok(None))
    })
    .await;
}
