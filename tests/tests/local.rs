//! The local actuator end to end: the real scaler runs a real HTTP service's replicas as processes
//! in their own cgroups, the real agent balances connections to the service address over the
//! ready ones in the kernel, and real load scales it 1 → 3 → 1 with every request answered.
//! Needs root (eBPF, cgroups).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;
use surge_tests::{
    harness::{bin, free_port, require_root, scratch, Agent, Scaler},
    http_client::get_text,
    load::{run_until, LoadReport, LoadSpec},
};

const POLICY: &str = "policy:
  name: local-e2e
  algorithm: hpa
  minReplicaCount: 1
  maxReplicaCount: 3
  pollingInterval: 1
  triggers:
    - {metric: concurrency, metricType: AverageValue, threshold: 2}
  behavior:
    scaleUp:
      stabilizationWindowSeconds: 0
      policies: [{type: Pods, value: 4, periodSeconds: 1}]
    scaleDown:
      stabilizationWindowSeconds: 2
      policies: [{type: Percent, value: 100, periodSeconds: 1}]
";

fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("a cgroup v2 mount")
}

/// Writes the policy directory and the scaler config; returns the scaler's flags.
fn configure(dir: &Path, services: &str) -> Vec<String> {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).expect("mkdir");
    std::fs::write(policies.join("local-e2e.yaml"), POLICY).expect("policy");
    let config = dir.join("surge.yaml");
    std::fs::write(&config, services).expect("config");
    vec![
        "--config".into(),
        config.display().to_string(),
        "--policy-dir".into(),
        policies.display().to_string(),
        "--tick".into(),
        "200ms".into(),
    ]
}

fn replicas_view(scaler: &Scaler, service: &str) -> Value {
    let (status, body) = get_text(scaler.http, &format!("/api/v1/services/{service}/replicas")).expect("API");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

/// Waits until the actuator has `n` ready replicas and nothing else, and the cgroup tree and
/// every node's kernel map agree with it; returns the replicas' (address, pid).
fn agreed(scaler: &Scaler, service: &str, n: usize) -> Vec<(String, u64)> {
    let root = cgroup2_root();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = replicas_view(scaler, service);
        let last = match check(&root, service, &v, n) {
            Ok(r) => return r,
            Err(e) => format!("{e}\n{v}"),
        };
        assert!(
            Instant::now() < deadline,
            "{service} never settled at {n} replicas: {last}\n{}",
            scaler.proc.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn check(root: &Path, service: &str, v: &Value, n: usize) -> Result<Vec<(String, u64)>, String> {
    let replicas = v["replicas"].as_array().ok_or("no replicas")?;
    if replicas.len() != n || replicas.iter().any(|r| r["state"] != "ready") {
        return Err(format!("want {n} ready replicas"));
    }
    let addrs: BTreeSet<String> = replicas
        .iter()
        .map(|r| r["addr"].as_str().unwrap_or_default().to_string())
        .collect();
    // The kernel's load balancer holds exactly the ready replicas, on every node.
    let kernel = v["kernel_backends"].as_object().ok_or("no kernel view")?;
    if kernel.is_empty() {
        return Err("no node reported its kernel map".into());
    }
    for (node, backends) in kernel {
        let b: BTreeSet<String> = backends
            .as_array()
            .ok_or("backends")?
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect();
        if b != addrs {
            return Err(format!("node {node}'s kernel map {b:?} != replicas {addrs:?}"));
        }
    }
    // One cgroup per replica, holding its process, and no other, all in this scaler's
    // directory for the service (surge/grpc-<port>/<service>).
    let cgroups: BTreeSet<String> = replicas
        .iter()
        .map(|r| r["cgroup"].as_str().unwrap_or_default().to_string())
        .collect();
    let parents: BTreeSet<&str> = cgroups
        .iter()
        .filter_map(|c| c.rsplit_once('/').map(|(p, _)| p))
        .collect();
    let [parent] = parents.into_iter().collect::<Vec<_>>()[..] else {
        return Err(format!("replica cgroups {cgroups:?} are not in one directory"));
    };
    let suffix = format!("/{service}");
    if !(parent.starts_with("surge/grpc-") && parent.ends_with(&suffix)) {
        return Err(format!(
            "replica cgroup directory {parent} is not surge/grpc-<port>/{service}"
        ));
    }
    let dir = root.join(parent);
    let dirs: BTreeSet<String> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| format!("{parent}/{}", e.file_name().to_string_lossy()))
        .collect();
    if dirs != cgroups {
        return Err(format!("cgroup dirs {dirs:?} != replicas' cgroups {cgroups:?}"));
    }
    let mut out = Vec::new();
    for r in replicas {
        let pid = r["pid"].as_u64().ok_or("no pid")?;
        let procs = std::fs::read_to_string(
            root.join(r["cgroup"].as_str().unwrap_or_default())
                .join("cgroup.procs"),
        )
        .map_err(|e| e.to_string())?;
        if !procs.lines().any(|p| p.trim() == pid.to_string()) {
            return Err(format!("pid {pid} is not in its cgroup: {procs:?}"));
        }
        out.push((r["addr"].as_str().unwrap_or_default().to_string(), pid));
    }
    Ok(out)
}

/// A closed-loop load of `workers` clients, a new connection per request (each connect goes
/// through the kernel's load balancer), until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<LoadReport>,
}

impl Load {
    fn start(addr: std::net::SocketAddr, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let spec = LoadSpec {
            workers,
            keep_alive: false,
            path: "/sleep?ms=50".into(),
            ..LoadSpec::get(addr, usize::MAX)
        };
        let s = Arc::clone(&stop);
        Self {
            stop,
            thread: std::thread::spawn(move || run_until(&spec, s)),
        }
    }

    fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("load thread")
    }
}

fn alive(pid: u64) -> bool {
    // A zombie is not running; /proc/PID/stat's third field says.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

#[test]
fn load_scales_a_local_service_1_3_1_with_every_request_answered() {
    require_root();
    let dir = scratch("local-scale");
    let service = format!("lb{}", std::process::id());
    let address: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let flags = configure(
        &dir,
        &format!(
            "services:
  - name: {service}
    actuator: local
    policy: local-e2e
    replicas: 1
    local:
      command: [{sample:?}, \"--listen\", \"{{addr}}\"]
      service_address: \"{address}\"
      readiness: {{http: \"/\"}}
      drain_timeout: 5s
      grace_period: 2s
",
            sample = bin("surge-sample").display().to_string()
        ),
    );
    let mut scaler = Scaler::start(&dir, free_port(), &flags);
    let _agent = Agent::start(&dir, &scaler.grpc_url(), &[]);

    let first = agreed(&scaler, &service, 1);

    // A replica that dies is restarted and reported; it leaves the rotation while it is down.
    // SAFETY: kill on a pid the scaler reported for its own child.
    unsafe { libc::kill(first[0].1 as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = replicas_view(&scaler, &service);
        let r = &v["replicas"][0];
        if r["restarts"] == 1 && r["state"] == "ready" {
            assert_eq!(r["last_error"], "exited with signal: 9 (SIGKILL)", "{v}");
            assert_eq!(r["starts"], 2, "{v}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the killed replica was not restarted: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let one = agreed(&scaler, &service, 1);
    assert_ne!(one[0].1, first[0].1, "a new process");

    // Six clients, each with a 50 ms request in flight: concurrency 6, 2 per replica → 3.
    let heavy = Load::start(address, 6);
    let three = agreed(&scaler, &service, 3);
    assert!(
        three.iter().any(|r| r == &one[0]),
        "the first replica stays: {one:?} {three:?}"
    );
    // Every replica serves: the kernel spreads connections round robin.
    std::thread::sleep(Duration::from_secs(1));
    let light = {
        let heavy = heavy.finish();
        assert_eq!(
            heavy.failed,
            0,
            "heavy load: {:?}",
            &heavy.errors[..heavy.errors.len().min(5)]
        );
        assert!(heavy.ok > 100, "{}", heavy.ok);
        // One client keeps going across the scale-down.
        Load::start(address, 1)
    };
    let back = agreed(&scaler, &service, 1);
    std::thread::sleep(Duration::from_secs(1));
    let light = light.finish();
    assert_eq!(
        light.failed,
        0,
        "every request is answered across the scale-down: {:?}",
        &light.errors[..light.errors.len().min(5)]
    );
    assert!(light.ok > 20, "{}", light.ok);
    let gone: Vec<_> = three.iter().filter(|r| !back.contains(r)).collect();
    assert_eq!(gone.len(), 2, "{three:?} → {back:?}");
    for (_, pid) in &gone {
        assert!(!alive(*pid), "a drained replica {pid} still runs");
    }

    // The service measured the replicas' requests.
    let v = scaler.service(&service);
    assert!(v["requests_total"].as_u64().unwrap_or(0) > 100, "{v}");

    // Stopping the scaler stops its replicas and removes their cgroups.
    scaler.proc.stop_with(libc::SIGTERM);
    for (_, pid) in &back {
        assert!(!alive(*pid), "replica {pid} outlived the scaler");
    }
    assert!(
        !cgroup2_root().join("surge").join(&service).exists(),
        "the service's cgroup is left"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn replicas_that_fail_are_reported_retried_and_not_counted_ready() {
    require_root();
    let dir = scratch("local-bad");
    let id = std::process::id();
    let sleep = "/bin/sleep";
    let flags = configure(
        &dir,
        &format!(
            "services:
  - name: exits{id}
    actuator: local
    policy: local-e2e
    local:
      command: [\"/bin/sh\", \"-c\", \"exit 3\", \"{{port}}\"]
      service_address: \"127.0.0.1:{p1}\"
  - name: silent{id}
    actuator: local
    policy: local-e2e
    local:
      command: [\"{sleep}\", \"1000\", \"{{port}}\"]
      service_address: \"127.0.0.1:{p2}\"
      ready_timeout: 1s
  - name: missing{id}
    actuator: local
    local:
      command: [\"/nonexistent/server\", \"{{addr}}\"]
      service_address: \"127.0.0.1:{p3}\"
",
            p1 = free_port(),
            p2 = free_port(),
            p3 = free_port()
        ),
    );
    let mut scaler = Scaler::start(&dir, free_port(), &flags);
    let wait = |service: &str, what: &str, pred: &dyn Fn(&Value) -> bool| -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = replicas_view(&scaler, service);
            if pred(&v["replicas"][0]) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{service}: {what}; last {v}\n{}",
                scaler.proc.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let restarts = |r: &Value| r["restarts"].as_u64().unwrap_or(0);
    let error = |r: &Value| r["last_error"].as_str().unwrap_or("").to_string();

    let v = wait(&format!("exits{id}"), "restarted twice", &|r| restarts(r) >= 2);
    let r = &v["replicas"][0];
    assert_eq!(
        error(r),
        "exited with exit status: 3 before becoming ready",
        "{v}"
    );
    assert!(
        v["kernel_backends"]
            .as_object()
            .is_none_or(|m| m.values().all(|b| b.as_array().is_none_or(Vec::is_empty))),
        "{v}"
    );

    let v = wait(&format!("silent{id}"), "given up on once", &|r| restarts(r) >= 1);
    let e = error(&v["replicas"][0]);
    assert!(
        e.starts_with("not ready after 1s: TCP connect to 127.0.0.1:"),
        "{e}"
    );
    let silent_pid = {
        let v = wait(&format!("silent{id}"), "restarted", &|r| r["pid"].is_u64());
        v["replicas"][0]["pid"].as_u64().expect("pid")
    };

    let v = wait(&format!("missing{id}"), "failed", &|r| restarts(r) >= 1);
    let e = error(&v["replicas"][0]);
    assert!(e.starts_with("cannot start \"/nonexistent/server\": "), "{e}");

    // Backoff: restarts grow slower than the probe period (0.5 s, 1 s, 2 s, ...).
    let v = replicas_view(&scaler, &format!("exits{id}"));
    assert!(restarts(&v["replicas"][0]) <= 6, "{v}");

    // The policy sees no capacity: not one ready replica.
    for name in [format!("exits{id}"), format!("silent{id}")] {
        let s = scaler.wait_for(&name, "controlled", |s| s["replicas"].is_object());
        assert_eq!(s["replicas"]["ready"], 0, "{s}");
    }

    scaler.proc.stop_with(libc::SIGTERM);
    assert!(!alive(silent_pid), "a replica outlived the scaler");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn replicas_can_have_their_own_network_namespace_and_address() {
    require_root();
    let dir = scratch("local-netns");
    let service = format!("ns{}", std::process::id());
    let subnet = format!("10.214.{}.0/24", std::process::id() % 250);
    let address: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let flags = configure(
        &dir,
        &format!(
            "services:
  - name: {service}
    actuator: local
    replicas: 2
    local:
      command: [{sample:?}, \"--listen\", \"{{addr}}\"]
      service_address: \"{address}\"
      readiness: {{http: \"/\"}}
      netns_subnet: \"{subnet}\"
",
            sample = bin("surge-sample").display().to_string()
        ),
    );
    let mut scaler = Scaler::start(&dir, free_port(), &flags);
    let _agent = Agent::start(&dir, &scaler.grpc_url(), &[]);
    let two = agreed(&scaler, &service, 2);
    let prefix = subnet.trim_end_matches("0/24");
    let ips: BTreeSet<&str> = two
        .iter()
        .map(|(a, _)| a.split(':').next().unwrap_or(""))
        .collect();
    assert_eq!(ips.len(), 2, "an address each: {two:?}");
    assert!(ips.iter().all(|ip| ip.starts_with(prefix)), "{two:?} in {subnet}");
    for id in 0..2 {
        assert!(
            Path::new(&format!("/run/netns/surge-{service}-{id}")).exists(),
            "namespace of replica {id}"
        );
    }

    let load = Load::start(address, 4);
    std::thread::sleep(Duration::from_secs(2));
    let r = load.finish();
    assert_eq!(r.failed, 0, "{:?}", &r.errors[..r.errors.len().min(5)]);
    assert!(r.ok > 50, "{}", r.ok);
    // The replicas' requests are measured in their namespaces too.
    scaler.wait_for(&service, "the load counted", |v| {
        v["requests_total"].as_u64().unwrap_or(0) >= r.ok as u64
    });

    scaler.proc.stop_with(libc::SIGTERM);
    for (_, pid) in &two {
        assert!(!alive(*pid), "replica {pid} outlived the scaler");
    }
    for id in 0..2 {
        assert!(
            !Path::new(&format!("/run/netns/surge-{service}-{id}")).exists(),
            "namespace of replica {id} is left"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
