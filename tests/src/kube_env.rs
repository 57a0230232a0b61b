//! A real Kubernetes 1.20 API server for the tests (etcd + kube-apiserver on loopback, built and
//! started by `deploy/kube-test/cluster.sh`, once per test binary), a surge-scaler watching one
//! namespace of it, and the stand-ins for what cannot run here.
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

use crate::harness::{bin, free_port};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Endpoints, core::v1::Namespace};
use kube::{
    api::{DynamicObject, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    core::{ApiResource, GroupVersionKind},
    Api, Client, Config,
};
use serde_json::{json, Value};
use surge_proto::v1::{
    agent_message, scaler_command, AgentMessage, Hello, Report, ServiceCounters, WatchSet,
};

const CLUSTER_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kube-test/cluster.sh");
const CRD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubernetes/crd.yaml");

/// Which readiness API the cluster serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// As 1.20 is: core/v1 Endpoints, no discovery.k8s.io/v1 (the scaler's fallback path).
    Endpoints,
    /// discovery.k8s.io/v1 EndpointSlices served (a CRD stand-in), v1beta1 off.
    EndpointSliceV1,
}

/// The cluster of this test binary: started on first use, stopped by cluster.sh's watchdog when
/// this process exits. One flavor per test binary.
fn kubeconfig(flavor: Flavor) -> &'static PathBuf {
    static CLUSTER: OnceLock<(Flavor, PathBuf)> = OnceLock::new();
    let (started, path) = CLUSTER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("surge-kube-test-{}", std::process::id()));
        let slices = if flavor == Flavor::EndpointSliceV1 {
            "1"
        } else {
            "0"
        };
        let out = Command::new(CLUSTER_SCRIPT)
            .arg("start")
            .arg(&dir)
            .env("SURGE_KUBE_ENDPOINTSLICE_V1", slices)
            .env("SURGE_KUBE_OWNER_PID", std::process::id().to_string())
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("running deploy/kube-test/cluster.sh");
        assert!(
            out.status.success(),
            "deploy/kube-test/cluster.sh start failed (run deploy/setup.sh as root first)"
        );
        (flavor, PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    });
    assert_eq!(*started, flavor, "one cluster flavor per test binary");
    path
}

async fn client(flavor: Flavor) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig(flavor)).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("client config");
    Client::try_from(config).expect("client")
}

pub fn scalers_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("surge.dev", "v1alpha1", "SurgeScaler"),
        "surgescalers",
    )
}

/// A namespace of its own, the CRD applied, and a surge-scaler watching only that namespace.
pub struct Env {
    pub client: Client,
    pub ns: String,
    pub scaler: Scaler,
    pub dir: PathBuf,
    /// The kubeconfig of the test cluster (an admin token), for other programs under test.
    pub kubeconfig: PathBuf,
}

pub struct Scaler {
    child: Child,
    pub grpc: String,
    /// The HTTP API's address (`/api/v1/services`).
    pub http: SocketAddr,
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
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Env {
    pub async fn new(ns: &str, flavor: Flavor) -> Env {
        let client = client(flavor).await;
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
            .env("KUBECONFIG", kubeconfig(flavor))
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
            http: http.parse().expect("address"),
            log,
        };
        wait_listening_addr(grpc.parse().expect("address"));
        Env {
            client,
            ns: ns.into(),
            scaler,
            dir,
            kubeconfig: kubeconfig(flavor).clone(),
        }
    }

    pub fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn scalers(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.ns, &scalers_resource())
    }

    pub async fn create_deployment(&self, name: &str, replicas: i32) {
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

    pub async fn replicas(&self, name: &str) -> i32 {
        let scale = self.deployments().get_scale(name).await.expect("get /scale");
        scale.spec.and_then(|s| s.replicas).unwrap_or(0)
    }

    pub async fn wait_replicas(&self, name: &str, want: i32, within: Duration) {
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

    pub async fn create_scaler(&self, name: &str, spec: Value, annotations: Value) {
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

    /// The API server's own count of the requests it has served, from its `/metrics`
    /// (`apiserver_request_total`), by verb, resource and subresource ("" for none).
    pub async fn api_requests(&self) -> ApiRequests {
        let request = http::Request::get("/metrics").body(Vec::new()).expect("request");
        let text = self
            .client
            .request_text(request)
            .await
            .expect("the API server's /metrics");
        ApiRequests::parse(&text)
    }

    pub async fn status(&self, name: &str) -> Value {
        match self.scalers().get_opt(name).await {
            Ok(Some(o)) => o.data.get("status").cloned().unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }

    pub async fn status_text(&self, name: &str) -> String {
        serde_json::to_string_pretty(&self.status(name).await).unwrap_or_default()
    }

    /// Waits until the SurgeScaler's status satisfies `pred`, and returns it.
    pub async fn wait_status(&self, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
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
    pub fn fake_endpoints(&self, deployment: &str, service: &str) -> tokio::task::JoinHandle<()> {
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

impl Env {
    /// Like [`Env::fake_endpoints`], with a discovery.k8s.io/v1 EndpointSlice for `service`: one
    /// ready endpoint per replica `deployment` asks for, and one more that is not ready.
    pub fn fake_endpoint_slices(&self, deployment: &str, service: &str) -> tokio::task::JoinHandle<()> {
        let deployments = self.deployments();
        let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
            Api::namespaced(self.client.clone(), &self.ns);
        let (deployment, service) = (deployment.to_string(), service.to_string());
        tokio::spawn(async move {
            loop {
                if let Ok(scale) = deployments.get_scale(&deployment).await {
                    let n = scale.spec.and_then(|s| s.replicas).unwrap_or(0);
                    let mut endpoints: Vec<Value> = (0..n)
                        .map(|i| json!({"addresses": [format!("10.2.0.{}", i + 1)], "conditions": {"ready": true}}))
                        .collect();
                    endpoints.push(json!({"addresses": ["10.2.1.1"], "conditions": {"ready": false}}));
                    let slice = json!({
                        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                        "metadata": {"name": format!("{service}-abcde"),
                                     "labels": {"kubernetes.io/service-name": service}},
                        "addressType": "IPv4",
                        "endpoints": endpoints,
                        "ports": [{"port": 8080}],
                    });
                    let _ = slices
                        .patch(
                            &format!("{service}-abcde"),
                            &PatchParams::apply("fake-kubelet").force(),
                            &Patch::Apply(&slice),
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

/// Requests an API server has served, by (verb, resource, subresource).
#[derive(Debug, Default)]
pub struct ApiRequests(std::collections::BTreeMap<(String, String, String), f64>);

impl ApiRequests {
    fn parse(metrics: &str) -> Self {
        let mut counts = std::collections::BTreeMap::new();
        for line in metrics.lines() {
            let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            let label = |name: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                    .map(|v| v.trim_end_matches('"').to_string())
                    .unwrap_or_default()
            };
            let key = (label("verb"), label("resource"), label("subresource"));
            *counts.entry(key).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
        }
        Self(counts)
    }

    /// Requests of `verb` on `resource`/`subresource` served since `before`.
    pub fn since(&self, before: &ApiRequests, verb: &str, resource: &str, subresource: &str) -> u64 {
        let key = (verb.to_string(), resource.to_string(), subresource.to_string());
        let at = |r: &ApiRequests| r.0.get(&key).copied().unwrap_or(0.0);
        (at(self) - at(before)).round() as u64
    }
}

pub fn wait_listening_addr(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens at {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub async fn wait_until<F, Fut>(what: &str, within: Duration, f: F)
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

/// A stand-in surge-agent and what the scaler told it to watch.
pub struct FakeAgent {
    pub watch_set: tokio::sync::watch::Receiver<WatchSet>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Stands in for a surge-agent: reports cumulative counters for `service` every 200 ms at the
/// request rate in `rps`, over the scaler's real gRPC agent link, and keeps the watch sets the
/// scaler sends.
pub fn fake_agent(scaler: &str, service: &str, rps: Arc<AtomicU64>) -> FakeAgent {
    let (scaler, service) = (scaler.to_string(), service.to_string());
    let (watch_tx, watch_set) = tokio::sync::watch::channel(WatchSet::default());
    let task = tokio::spawn(async move {
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
        let mut commands = response.into_inner();
        tokio::spawn(async move {
            while let Ok(Some(cmd)) = commands.message().await {
                if let Some(scaler_command::Body::Watch(set)) = cmd.body {
                    watch_tx.send_replace(set);
                }
            }
        });
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
                ..Default::default()
            };
            let msg = AgentMessage {
                body: Some(agent_message::Body::Report(report)),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    });
    FakeAgent { watch_set, task }
}

/// An HPA-style policy on rps (10 per replica) that reacts within a second both ways.
pub fn quick_policy(extra: Value) -> Value {
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

pub fn condition<'a>(status: &'a Value, type_: &str) -> Option<&'a Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

pub fn condition_is(status: &Value, type_: &str, value: &str) -> bool {
    condition(status, type_).is_some_and(|c| c["status"] == value)
}

/// The scaler's HTTP API, as seen for one service.
pub struct ScalerApi {
    pub http: SocketAddr,
    pub service: String,
}

impl ScalerApi {
    pub fn new(http: SocketAddr, service: &str) -> Self {
        Self {
            http,
            service: service.into(),
        }
    }

    pub fn services(&self) -> Value {
        let (status, body) =
            crate::http_client::get_text(self.http, "/api/v1/services").expect("scaler API answers");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("JSON")
    }

    /// The service's view (null until the scaler knows it).
    pub fn service(&self) -> Value {
        let all = self.services();
        all["services"]
            .as_array()
            .and_then(|s| s.iter().find(|v| v["name"] == self.service.as_str()).cloned())
            .unwrap_or(Value::Null)
    }

    /// Reports received from every agent.
    pub fn reports(&self) -> u64 {
        self.services()["nodes"]
            .as_array()
            .map(|n| n.iter().filter_map(|x| x["reports"].as_u64()).sum())
            .unwrap_or(0)
    }

    /// Waits until the agents have sent `n` more reports: what they counted or applied before
    /// is in. Returns the service's view then.
    pub fn settle(&self, n: u64) -> Value {
        let start = self.reports();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.reports() < start + n {
            assert!(
                std::time::Instant::now() < deadline,
                "the agent stopped reporting"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        self.service()
    }

    /// Waits until the service's view satisfies `pred`; on timeout, fails with `agent`'s log.
    pub fn wait(&self, what: &str, agent: &crate::harness::Proc, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.service();
            if pred(&v) {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}; last: {v}\nagent log:\n{}",
                agent.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
